//! What a backup's `x-perf` and `discard-source` change, seen from inside:
//! the job's copies are held at a blkdebug breakpoint on their read of the
//! source, and the job's progress says how many copies went by meanwhile
//! and how long each was. With `discard-source`, what was copied leaves
//! the source, but a guest write that came during the copy stays.

mod races_support;
use races_support::*;

use std::sync::Arc;
use std::time::Duration;
use strata_block::{Backend, EventLoop, Graph, IoBuf, OpenCtx, OpenFlags, Perm, WriteFlags};
use strata_jobs::{blockdev_backup, BackupArgs, BackupPerf, JobList};

const CLUSTER: u64 = 65536;

/// A full backup of a 4 MiB raw disk of 0x11 into an empty one, its first
/// read of the source held; returns the job's progress while that read is
/// held, and at the next read (none: the job copied everything else
/// meanwhile).
fn progress_around_the_first_copy(perf: BackupPerf) -> (u64, Option<u64>) {
    let dir = tempfile::tempdir().unwrap();
    EventLoop::new().unwrap().block_on(async {
        let src = dir.path().join("src.raw").display().to_string();
        let tgt = dir.path().join("tgt.raw").display().to_string();
        std::fs::write(&src, vec![0x11u8; 4 * MIB as usize]).unwrap();
        std::fs::File::create(&tgt)
            .unwrap()
            .set_len(4 * MIB)
            .unwrap();
        let graph = Graph::new();
        let ctx = OpenCtx::with_graph(
            strata_drivers::registry(),
            OpenFlags::default(),
            Arc::clone(&graph),
        );
        let (source, target) = source_and_target(&ctx, &src, &tgt).await;
        let (list, events) = recording_list();
        let progress = |list: &Arc<JobList>| {
            list.find("b").unwrap().info()["current-progress"]
                .as_u64()
                .unwrap()
        };
        let hold = |tag: &str| {
            source
                .with_debug_hooks(|h| h.breakpoint("read_aio", tag))
                .unwrap()
        };
        hold("first");
        let args = BackupArgs {
            job_id: Some("b".into()),
            device: "src".into(),
            target: "tgt".into(),
            sync: "full".into(),
            auto_dismiss: Some(false),
            perf,
            ..BackupArgs::default()
        };
        blockdev_backup(&list, &graph, args).await.unwrap();
        until_suspended("the first copy to stop", &source, "first").await;
        // Whatever other copies may run, have run by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let during = progress(&list);
        hold("next");
        source.with_debug_hooks(|h| h.resume("first")).unwrap();
        let job_done = || list.find("b").unwrap().status().as_str() == "concluded";
        until("the next copy or the job's end", || {
            job_done()
                || source
                    .with_debug_hooks(|h| Ok(h.is_suspended("next")))
                    .unwrap()
        })
        .await;
        let next = (!job_done()).then(|| progress(&list));
        if next.is_some() {
            source.with_debug_hooks(|h| h.resume("next")).unwrap();
        } else {
            source
                .with_debug_hooks(|h| h.remove_breakpoint("next"))
                .unwrap();
        }
        until("the job to end", job_done).await;
        let ev = events.lock().unwrap().join("\n");
        assert!(!ev.contains("error"), "{ev}");
        list.find("b").unwrap().dismiss().await.unwrap();
        let tb = Backend::new(&target, "check", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
        holds(&tb, 0, 4 * MIB as usize, 0x11).await;
        tb.close().await.unwrap();
        target.close().await.unwrap();
        source.close().await.unwrap();
        (during, next)
    })
}

#[test]
fn by_default_other_copies_go_on_while_one_waits() {
    let (during, next) = progress_around_the_first_copy(BackupPerf::default());
    // Four 1 MiB copies in one batch: the three not held are done.
    assert_eq!(during, 3 * MIB);
    assert_eq!(next, None);
}

#[test]
fn max_workers_and_max_chunk_shape_the_copies() {
    let perf = BackupPerf {
        max_workers: Some(1),
        max_chunk: Some(CLUSTER as i64),
        ..BackupPerf::default()
    };
    let (during, next) = progress_around_the_first_copy(perf);
    // One copy at a time, one cluster each.
    assert_eq!(during, 0);
    assert_eq!(next, Some(CLUSTER));
}

/// `discard-source` on a disk of `format`: the job's held copy of
/// cluster 0 keeps a guest write to that cluster waiting, and the discard
/// that follows the copy is done before the write goes on, so the write
/// stays. Everything else the job copied is gone from the source.
fn discard_source_keeps_a_guest_write_that_waited_for_the_copy(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    EventLoop::new().unwrap().block_on(async {
        let src = dir.path().join("src.img").display().to_string();
        let tgt = dir.path().join("tgt.raw").display().to_string();
        if format == "qcow2" {
            create(&src, &[("size", "1M")]).await;
        } else {
            std::fs::File::create(&src).unwrap().set_len(MIB).unwrap();
        }
        std::fs::File::create(&tgt).unwrap().set_len(MIB).unwrap();
        let graph = Graph::new();
        let ctx = OpenCtx::with_graph(
            strata_drivers::registry(),
            OpenFlags::default(),
            Arc::clone(&graph),
        );
        let source = open(
            &ctx,
            &[
                ("driver", format),
                ("node-name", "src"),
                ("discard", "unmap"),
                ("file.driver", "blkdebug"),
                ("file.image.driver", "file"),
                ("file.image.filename", &src),
            ],
        )
        .await;
        let target = open(
            &ctx,
            &[
                ("driver", "raw"),
                ("node-name", "tgt"),
                ("file.driver", "file"),
                ("file.filename", &tgt),
            ],
        )
        .await;
        let guest = Backend::new(
            &source,
            "guest",
            Perm::CONSISTENT_READ.with(Perm::WRITE),
            Perm::ALL,
        )
        .unwrap();
        guest
            .write(0, IoBuf::filled(MIB as usize, 0x11), WriteFlags::default())
            .await
            .unwrap();
        let (list, events) = recording_list();
        source
            .with_debug_hooks(|h| h.breakpoint("read_aio", "copy"))
            .unwrap();
        let args = BackupArgs {
            job_id: Some("b".into()),
            device: "src".into(),
            target: "tgt".into(),
            sync: "full".into(),
            discard_source: true,
            perf: BackupPerf {
                max_workers: Some(1),
                max_chunk: Some(CLUSTER as i64),
                ..BackupPerf::default()
            },
            ..BackupArgs::default()
        };
        blockdev_backup(&list, &graph, args).await.unwrap();
        until_suspended("the copy to stop at its breakpoint", &source, "copy").await;
        let guest = Arc::new(guest);
        let g = Arc::clone(&guest);
        let write = tokio::spawn(async move {
            g.write(4096, IoBuf::filled(4096, 0x55), WriteFlags::default())
                .await
                .unwrap();
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!write.is_finished(), "the guest's write did not wait");
        source.with_debug_hooks(|h| h.resume("copy")).unwrap();
        write.await.unwrap();
        until("the job to end", || list.find("b").is_none()).await;
        let ev = events.lock().unwrap().join("\n");
        assert!(!ev.contains("error"), "{ev}");
        holds(&guest, 4096, 4096, 0x55).await;
        holds(&guest, 0, 4096, 0).await;
        holds(&guest, 8192, (MIB - 8192) as usize, 0).await;
        let tb = Backend::new(&target, "check", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
        holds(&tb, 0, MIB as usize, 0x11).await;
        tb.close().await.unwrap();
        // Only what the guest wrote afterwards holds data; the rest reads
        // as zeroes without any (qcow2's zero clusters, holes in a file).
        let written = if format == "qcow2" { CLUSTER } else { 8192 };
        let st = source.block_status(written, MIB - written).await.unwrap();
        assert!(!st.data && st.zero && st.len == MIB - written, "{st:?}");
        assert!(source.block_status(4096, 4096).await.unwrap().data);
        Arc::into_inner(guest).unwrap().close().await.unwrap();
        target.close().await.unwrap();
        source.close().await.unwrap();
    });
}

#[test]
fn discard_source_on_qcow2_keeps_a_guest_write_that_waited_for_the_copy() {
    discard_source_keeps_a_guest_write_that_waited_for_the_copy("qcow2");
}

#[test]
fn discard_source_on_raw_keeps_a_guest_write_that_waited_for_the_copy() {
    discard_source_keeps_a_guest_write_that_waited_for_the_copy("raw");
}
