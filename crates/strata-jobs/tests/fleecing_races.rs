//! Image fleecing against a guest that writes while a backup tool reads.
//! A snapshot-access read of the source is held at a blkdebug breakpoint;
//! the guest then writes into the cluster it reads, through the
//! copy-before-write filter. The write must wait for the read: had it
//! reached the source first, the held read would return the guest's data
//! and the point in time would be broken. After the write, the point in
//! time is read from the target and still holds the old data. A read the
//! tool gives up half way must not hold the write for ever.

mod races_support;
use races_support::*;

use std::sync::Arc;
use std::time::Duration;
use strata_block::{Backend, EventLoop, Graph, IoBuf, OpenCtx, OpenFlags, Perm, WriteFlags};

const CLUSTER: usize = 65536;

/// The race, with a tool that reads to the end or gives up half way (an
/// NBD client gone): either way the guest's write goes through once the
/// read is over, and the point in time stays in the target.
fn a_snapshot_read_holds_a_guest_write(tool_gives_up: bool) {
    let dir = tempfile::tempdir().unwrap();
    EventLoop::new().unwrap().block_on(async {
        let src = dir.path().join("src.raw").display().to_string();
        let tgt = dir.path().join("tgt.raw").display().to_string();
        let mut old = vec![0u8; MIB as usize];
        old[..CLUSTER].fill(0x11);
        std::fs::write(&src, &old).unwrap();
        std::fs::File::create(&tgt).unwrap().set_len(MIB).unwrap();
        let graph = Graph::new();
        let registry =
            strata_drivers::registry_with(strata_jobs::backup::fleecing::driver_classes());
        let ctx = OpenCtx::with_graph(registry, OpenFlags::default(), Arc::clone(&graph));
        let (source, target) = source_and_target(&ctx, &src, &tgt).await;
        let cbw = open(
            &ctx,
            &[
                ("driver", "copy-before-write"),
                ("node-name", "cbw"),
                ("file", "src"),
                ("target", "tgt"),
            ],
        )
        .await;
        let access = open(
            &ctx,
            &[
                ("driver", "snapshot-access"),
                ("node-name", "acc"),
                ("file", "cbw"),
            ],
        )
        .await;
        let guest = Arc::new(
            Backend::new(
                &cbw,
                "guest",
                Perm::CONSISTENT_READ.with(Perm::WRITE),
                Perm::ALL,
            )
            .unwrap(),
        );
        let tool =
            Arc::new(Backend::new(&access, "tool", Perm::CONSISTENT_READ, Perm::ALL).unwrap());
        // The first read of the source is the tool's snapshot read.
        source
            .with_debug_hooks(|h| h.breakpoint("read_aio", "snap"))
            .unwrap();
        let t = Arc::clone(&tool);
        let read = tokio::spawn(async move { t.read(0, IoBuf::zeroed(CLUSTER)).await.unwrap() });
        until_suspended(
            "the snapshot read to stop at its breakpoint",
            &source,
            "snap",
        )
        .await;
        let g = Arc::clone(&guest);
        let write = tokio::spawn(async move {
            g.write(4096, IoBuf::filled(4096, 0x55), WriteFlags::default())
                .await
                .unwrap();
        });
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!write.is_finished(), "the guest's write did not wait");
        if tool_gives_up {
            read.abort();
            let _ = read.await;
            tokio::time::timeout(Duration::from_secs(10), write)
                .await
                .expect("the guest's write waits for a read no one makes any more")
                .unwrap();
            // The abandoned request itself may go on now.
            let _ = source.with_debug_hooks(|h| h.resume("snap"));
        } else {
            source.with_debug_hooks(|h| h.resume("snap")).unwrap();
            let got = read.await.unwrap();
            assert!(
                got.as_slice().iter().all(|&b| b == 0x11),
                "the snapshot read saw the guest's write"
            );
            write.await.unwrap();
        }
        // Now the cluster is copied: the snapshot reads it from the target.
        holds(&tool, 0, CLUSTER, 0x11).await;
        holds(&guest, 4096, 4096, 0x55).await;
        let tb = Backend::new(&target, "check", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
        holds(&tb, 0, CLUSTER, 0x11).await;
        tb.close().await.unwrap();
        Arc::into_inner(tool).unwrap().close().await.unwrap();
        Arc::into_inner(guest).unwrap().close().await.unwrap();
        for n in [access, cbw, target, source] {
            n.close().await.unwrap();
        }
    });
}

#[test]
fn a_guest_write_waits_for_a_snapshot_read_of_its_cluster() {
    a_snapshot_read_holds_a_guest_write(false);
}

#[test]
fn a_snapshot_read_given_up_half_way_releases_the_guest_write() {
    a_snapshot_read_holds_a_guest_write(true);
}
