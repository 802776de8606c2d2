//! Tracked requests under concurrency: many unaligned writes into the same
//! aligned blocks (each a read-modify-write) and copy-on-read reads of the
//! same clusters, all in flight at once. Without serialising requests the
//! read-modify-writes overwrite each other's sectors; with a wrong wait
//! rule they deadlock (the test has a time limit for that).

mod common;

use std::sync::Arc;
use std::time::Duration;
use strata_block::options::Opts;
use strata_block::{EventLoop, IoBuf, Node, OpenCtx, OpenFlags, WriteFlags};

/// Opens `opts` with Strata's drivers.
async fn open_opts(opts: &[(&str, &str)], copy_on_read: bool) -> Arc<Node> {
    let reg = strata_drivers::registry();
    let ctx = OpenCtx::new(
        reg,
        OpenFlags {
            aio: strata_block::engine::Aio::Threads,
            copy_on_read,
            ..OpenFlags::default()
        },
    );
    let pairs: Vec<(String, String)> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let o: Opts = strata_block::options::nest(&pairs).unwrap();
    ctx.open_image(None, None, o).await.unwrap()
}

const SECTOR: u64 = 512;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = 64;

#[test]
fn unaligned_writes_and_copy_on_read_neither_tear_nor_deadlock() {
    let dir = tempdir();
    let base = format!("{dir}/base.qcow2");
    let top = format!("{dir}/top.qcow2");
    let size = (BLOCKS * BLOCK).to_string();
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        common::create(&base, "qcow2", &[("size", &size), ("cluster_size", "4096")]).await;
        let node = common::open(&base, Some("qcow2")).await;
        node.write(
            0,
            IoBuf::filled((BLOCKS * BLOCK) as usize, 0xee),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        node.close().await.unwrap();
        common::create(
            &top,
            "qcow2",
            &[
                ("size", &size),
                ("cluster_size", "4096"),
                ("backing_file", &base),
                ("backing_fmt", "qcow2"),
            ],
        )
        .await;
        // The first half of the top is allocated already: writes there go
        // in place, straight into the read-modify-write of the layer below.
        let node = common::open(&top, Some("qcow2")).await;
        node.write(
            0,
            IoBuf::filled((BLOCKS * BLOCK / 2) as usize, 0x11),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        node.close().await.unwrap();
    });

    // The top image under a blkdebug node that accepts only whole 4 KiB
    // blocks, so every 512-byte write is a read-modify-write; reads copy the
    // backing data up.
    let node = ev.block_on(open_opts(
        &[
            ("driver", "qcow2"),
            ("file.driver", "blkdebug"),
            ("file.align", "4096"),
            ("file.image.driver", "file"),
            ("file.image.filename", &top),
        ],
        true,
    ));

    ev.block_on(async {
        let mut tasks = Vec::new();
        for b in 0..BLOCKS {
            for s in 0..BLOCK / SECTOR {
                let writer = Arc::clone(&node);
                let pattern = (b * 8 + s) as u8 | 1;
                tasks.push(tokio::spawn(async move {
                    let off = b * BLOCK + s * SECTOR;
                    writer
                        .write(
                            off,
                            IoBuf::filled(SECTOR as usize, pattern),
                            WriteFlags::default(),
                        )
                        .await
                        .unwrap();
                }));
                if b < BLOCKS / 2 {
                    // Only writes here: they race each other's read-modify-write.
                    continue;
                }
                // A copy-on-read read of the same cluster, racing the writes.
                let reader = Arc::clone(&node);
                tasks.push(tokio::spawn(async move {
                    reader
                        .read(b * BLOCK, IoBuf::zeroed(BLOCK as usize))
                        .await
                        .unwrap();
                }));
            }
        }
        let all = async {
            for t in tasks {
                t.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("requests deadlocked");
    });

    // Every sector holds the pattern of the one write that covered it.
    let data = ev
        .block_on(node.read(0, IoBuf::zeroed((BLOCKS * BLOCK) as usize)))
        .unwrap();
    for b in 0..BLOCKS {
        for s in 0..BLOCK / SECTOR {
            let at = (b * BLOCK + s * SECTOR) as usize;
            let want = (b * 8 + s) as u8 | 1;
            let got = &data.as_slice()[at..at + SECTOR as usize];
            assert!(
                got.iter().all(|&x| x == want),
                "sector {s} of block {b} was torn: found {:#x}, want {want:#x}",
                got[0]
            );
        }
    }
    ev.block_on(node.close()).unwrap();
    if let Some(qemu_img) = common::qemu_tool("qemu-img") {
        let (code, out) = common::run(&qemu_img, &["check", &top]);
        assert_eq!(code, 0, "{out}");
    }
}

fn tempdir() -> String {
    let d = std::env::temp_dir().join(format!("strata-tracked-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}
