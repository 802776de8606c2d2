//! The mirror job against a guest that writes while it copies. A copy of
//! granule 0 has read the old data and is held at a blkdebug breakpoint on
//! its write to the target; the guest then writes into granule 0.
//!
//! - In background mode the guest's write marks the granule dirty, and the
//!   job copies it again. That second copy must not overtake the first, or
//!   the first lands last with the old data.
//! - In write-blocking mode the guest's write goes to the target itself,
//!   and nothing marks the granule again: the guest's target write must
//!   wait for the copy in flight, or the copy's old data lands over it for
//!   good.
//!
//! Either way, after the pivot the disk must read the guest's data.

mod races_support;
use races_support::*;
use std::sync::Arc;
use std::time::Duration;
use strata_block::{Backend, EventLoop, Graph, IoBuf, OpenCtx, OpenFlags, Perm, WriteFlags};
use strata_jobs::{blockdev_mirror, MirrorArgs};

const GRANULE: u64 = 65536;

fn a_guest_write_into_a_granule_being_copied_lands_last(copy_mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    EventLoop::new().unwrap().block_on(async {
        let src = dir.path().join("src.qcow2").display().to_string();
        // A raw target: no cluster allocation in it orders writes.
        let tgt = dir.path().join("tgt.raw").display().to_string();
        create(&src, &[("size", "1048576")]).await;
        std::fs::File::create(&tgt).unwrap().set_len(MIB).unwrap();
        let graph = Graph::new();
        let registry = strata_drivers::registry();
        let ctx = OpenCtx::with_graph(
            Arc::clone(&registry),
            OpenFlags::default(),
            Arc::clone(&graph),
        );
        let source = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("node-name", "src"),
                ("file.driver", "file"),
                ("file.filename", &src),
            ],
        )
        .await;
        // Data in granule 0 only: the rest is copied as zeroes, which takes
        // no buffer, so the job has room to copy granule 0 again at once.
        source
            .write(
                0,
                IoBuf::filled(GRANULE as usize, 0x11),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        let target = open(
            &ctx,
            &[
                ("driver", "raw"),
                ("node-name", "tgt"),
                ("file.driver", "blkdebug"),
                ("file.image.driver", "file"),
                ("file.image.filename", &tgt),
            ],
        )
        .await;
        // The guest, as an export would use the disk.
        let guest = Backend::new(
            &source,
            "guest",
            Perm::CONSISTENT_READ.with(Perm::WRITE),
            Perm::ALL,
        )
        .unwrap();
        // The first write to the target belongs to the copy of granule 0.
        target
            .with_debug_hooks(|h| h.breakpoint("write_aio", "copy"))
            .unwrap();
        let (list, events) = recording_list();
        let args = MirrorArgs {
            job_id: Some("m".into()),
            device: "src".into(),
            target: "tgt".into(),
            sync: "full".into(),
            granularity: Some(GRANULE),
            buf_size: Some(2 * GRANULE as i64),
            copy_mode: Some(copy_mode.into()),
            ..MirrorArgs::default()
        };
        blockdev_mirror(&list, &graph, args).await.unwrap();
        until_suspended("the copy to stop at its breakpoint", &target, "copy").await;
        let write = tokio::spawn(async move {
            guest
                .write(4096, IoBuf::filled(4096, 0x55), WriteFlags::default())
                .await
                .unwrap();
            guest
        });
        // Give the guest's write, and any copy it causes, every chance to
        // overtake the copy that is held: past a slice of the job's time,
        // after which it looks at the bitmap again without waiting for
        // the copy in flight.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if copy_mode == "write-blocking" {
            assert!(!write.is_finished(), "the guest's write did not wait");
        }
        target.with_debug_hooks(|h| h.resume("copy")).unwrap();
        let guest = write.await.unwrap();
        let job = Arc::clone(&list.find("m").unwrap());
        let seen = Arc::clone(&events);
        until("READY", || {
            seen.lock()
                .unwrap()
                .iter()
                .any(|e| e.contains("BLOCK_JOB_READY"))
        })
        .await;
        job.complete().unwrap();
        until("the job to end", || list.find("m").is_none()).await;
        let ev = events.lock().unwrap().join("\n");
        assert!(ev.contains("BLOCK_JOB_COMPLETED"), "{ev}");
        assert!(!ev.contains("error"), "{ev}");
        // The guest now uses the target, which holds its write.
        assert!(Arc::ptr_eq(&guest.node(), &target));
        holds(&guest, 0, 4096, 0x11).await;
        holds(&guest, 4096, 4096, 0x55).await;
        holds(&guest, 8192, (GRANULE - 8192) as usize, 0x11).await;
        holds(&guest, GRANULE, (MIB - GRANULE) as usize, 0).await;
        guest.close().await.unwrap();
        target.close().await.unwrap();
        source.close().await.unwrap();
    });
}

#[test]
fn background_copies_of_one_granule_land_in_order() {
    a_guest_write_into_a_granule_being_copied_lands_last("background");
}

#[test]
fn a_write_blocking_guest_write_waits_for_the_copy_in_flight() {
    a_guest_write_into_a_granule_being_copied_lands_last("write-blocking");
}
