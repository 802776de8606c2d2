//! A file on tmpfs: small reads and writes are done on the event loop's
//! own thread (io_uring would hand each to a kernel worker), larger ones
//! through the ring; both must land and read back, many in flight at once.

mod common;

use strata_block::{EventLoop, IoBuf, WriteFlags};

#[test]
fn reads_and_writes_of_every_size_on_tmpfs_read_back() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let img = dir.path().join("t.raw").to_string_lossy().into_owned();
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        let node = common::open(&img, Some("raw")).await;
        // Sizes on both sides of the inline limit, each its own pattern.
        let sizes = [512usize, 4096, 65536, 65536 + 512, 1 << 20];
        let writes = sizes.iter().enumerate().map(|(i, &n)| {
            let node = &node;
            async move {
                let at = (i as u64) * (1 << 20) / 2 + 4096;
                node.write(at, IoBuf::filled(n, i as u8 + 1), WriteFlags::default())
                    .await
                    .unwrap();
                (at, n, i as u8 + 1)
            }
        });
        let done = futures::future::join_all(writes).await;
        let reads = done.iter().map(|&(at, n, v)| {
            let node = &node;
            async move {
                let b = node.read(at, IoBuf::zeroed(n)).await.unwrap();
                assert!(b.as_slice().iter().all(|&x| x == v), "{n} bytes at {at}");
                // A read across the written range's end: the zeroes after it.
                let b = node
                    .read(at + n as u64 - 512, IoBuf::zeroed(1024))
                    .await
                    .unwrap();
                assert!(b.as_slice()[..512].iter().all(|&x| x == v));
                assert!(b.as_slice()[512..].iter().all(|&x| x == 0));
            }
        });
        futures::future::join_all(reads).await;
        node.close().await.unwrap();
    });
}
