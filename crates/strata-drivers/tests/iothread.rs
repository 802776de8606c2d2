//! I/O threads: a qcow2 chain moves between event loops while writers keep
//! sending it requests. Every request runs on the node's home loop (its own
//! thread and ring), a move drains the whole chain first, and nothing is
//! lost or fails on the way.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use strata_block::engine::current_ring;
use strata_block::options::Opts;
use strata_block::{drained, EventLoop, IoBuf, IoThread, Node, OpenCtx, OpenFlags, WriteFlags};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 256;
const WRITERS: u64 = 4;
const ROUNDS: u64 = 6;

fn pattern(block: u64, round: u64) -> u8 {
    ((block * 7 + round * 31) % 251 + 1) as u8
}

/// Runs `fut` where the node lives, as a user of the node must.
async fn on_home<T: Send + 'static>(
    node: &Arc<Node>,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match node.home() {
        Some(h) => h.run(fut).await.expect("loop stopped"),
        None => fut.await,
    }
}

#[test]
fn a_chain_moves_between_io_threads_while_writes_run() {
    let dir = std::env::temp_dir().join(format!("strata-iothread-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.qcow2").to_string_lossy().into_owned();
    let top = dir.join("top.qcow2").to_string_lossy().into_owned();
    let size = (BLOCKS * BLOCK).to_string();
    let ev = EventLoop::new().unwrap();
    let a = IoThread::new("a").unwrap();
    let b = IoThread::new("b").unwrap();
    ev.block_on(async {
        common::create(&base, "qcow2", &[("size", &size)]).await;
        common::create(
            &top,
            "qcow2",
            &[
                ("size", &size),
                ("backing_file", &base),
                ("backing_fmt", "qcow2"),
            ],
        )
        .await;
        // io_uring: each loop's requests go through that loop's own ring.
        let ctx = OpenCtx::new(strata_drivers::registry(), OpenFlags::default());
        let node = ctx
            .open_image(Some(&top), Some("qcow2"), Opts::new())
            .await
            .unwrap();
        let chain = node.component();
        assert_eq!(chain.len(), 4, "top, its file, base, its file");

        node.move_to(Some(a.handle().clone())).await;
        assert!(chain.iter().all(|n| n.home().unwrap().same(a.handle())));

        // (loop the node was on when the request started, thread it ran on)
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let done = Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let node = Arc::clone(&node);
            let seen = Arc::clone(&seen);
            let done = Arc::clone(&done);
            writers.push(tokio::spawn(async move {
                for round in 0..ROUNDS {
                    for blk in (w..BLOCKS).step_by(WRITERS as usize) {
                        let home = node.home().map(|h| h.name().to_string());
                        let n = Arc::clone(&node);
                        let buf = IoBuf::filled(BLOCK as usize, pattern(blk, round));
                        let (thread, r) = on_home(&node, async move {
                            let t = std::thread::current().name().unwrap_or("").to_string();
                            assert!(current_ring().is_some(), "no ring on {t}");
                            (t, n.write(blk * BLOCK, buf, WriteFlags::default()).await)
                        })
                        .await;
                        r.expect("write failed");
                        seen.lock()
                            .unwrap()
                            .push((home.unwrap_or_default(), thread));
                    }
                }
                done.fetch_add(1, Ordering::Release);
            }));
        }

        // While they write: drained sections see nothing in flight, and the
        // chain moves back and forth.
        let idle_seen = Arc::new(AtomicBool::new(true));
        let mut moves = 0;
        while done.load(Ordering::Acquire) < WRITERS as usize {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let idle = drained(&chain, || chain.iter().all(|n| n.in_flight() == 0)).await;
            idle_seen.fetch_and(idle, Ordering::Relaxed);
            let to = if moves % 2 == 0 { &b } else { &a };
            node.move_to(Some(to.handle().clone())).await;
            assert!(chain.iter().all(|n| n.home().unwrap().same(to.handle())));
            moves += 1;
        }
        for w in writers {
            w.await.unwrap();
        }
        assert!(
            idle_seen.load(Ordering::Relaxed),
            "a drain saw requests in flight"
        );
        assert!(moves >= 2, "the writers finished before the chain moved");

        // Every request ran on the thread of the loop the node lived on.
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        assert_eq!(seen.len() as u64, WRITERS * ROUNDS * BLOCKS / WRITERS);
        for (home, thread) in seen.iter() {
            assert_eq!(thread, &format!("iothread-{home}"));
        }
        assert!(seen.iter().any(|(h, _)| h == "a") && seen.iter().any(|(h, _)| h == "b"));

        // Nothing was lost: each block holds its last round.
        node.move_to(None).await;
        for blk in 0..BLOCKS {
            let r = node
                .read(blk * BLOCK, IoBuf::zeroed(BLOCK as usize))
                .await
                .unwrap();
            let want = pattern(blk, ROUNDS - 1);
            assert!(
                r.as_slice().iter().all(|&x| x == want),
                "block {blk} lost its last write"
            );
        }
        node.close().await.unwrap();
    });
    drop((a, b));
    if let Some(img) = common::qemu_tool("qemu-img") {
        let (code, out) = common::run(&img, &["check", &top]);
        assert_eq!(code, 0, "{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
