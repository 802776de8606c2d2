//! Large writes that extend a file, or land in one that had holes, reserve
//! their blocks first (fallocate with KEEP_SIZE): the file must look
//! exactly as if they had only been written.

mod common;

use std::os::unix::fs::MetadataExt;
use strata_block::{EventLoop, IoBuf, WriteFlags};

const MIB: u64 = 1 << 20;

#[test]
fn reserved_writes_leave_sizes_and_holes_as_plain_writes_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw").to_string_lossy().into_owned();
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        // A dense file of 1 MiB: a write past its end reserves only what it
        // writes, and the size ends where the write ends.
        std::fs::write(&path, vec![7u8; MIB as usize]).unwrap();
        let n = common::open(&path, Some("file")).await;
        n.write(
            3 * MIB,
            IoBuf::filled(2 * MIB as usize, 1),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        n.close().await.unwrap();
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.len(), 5 * MIB);
        // The gap stays a hole: 1 MiB + 2 MiB of blocks, not 5.
        assert!(
            md.blocks() * 512 <= 3 * MIB + 64 * 1024,
            "{} blocks",
            md.blocks()
        );

        // A sparse file (a new raw target): a write inside it keeps the size.
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(8 * MIB).unwrap();
        drop(f);
        let n = common::open(&path, Some("file")).await;
        n.write(
            2 * MIB,
            IoBuf::filled(2 * MIB as usize, 9),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        let back = n.read(0, IoBuf::zeroed(8 * MIB as usize)).await.unwrap();
        n.close().await.unwrap();
        let b = back.as_slice();
        assert!(b[..2 * MIB as usize].iter().all(|&x| x == 0));
        assert!(b[2 * MIB as usize..4 * MIB as usize]
            .iter()
            .all(|&x| x == 9));
        assert!(b[4 * MIB as usize..].iter().all(|&x| x == 0));
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.len(), 8 * MIB);
        assert!(
            md.blocks() * 512 <= 2 * MIB + 64 * 1024,
            "{} blocks",
            md.blocks()
        );
    });
}
