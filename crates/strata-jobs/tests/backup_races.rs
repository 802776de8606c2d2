//! The backup job against a guest that writes while it copies. The job's
//! copy of the first clusters is held at a blkdebug breakpoint on its read
//! of the source; the guest then writes into cluster 0. The guest's write
//! must wait for that copy: had it gone to the source first, the held copy
//! would read the guest's data and the backup would not be the disk as it
//! was when the job started. After the job, the target holds the old data
//! and the source the guest's.

mod races_support;
use races_support::*;

use std::sync::Arc;
use std::time::Duration;
use strata_block::{Backend, EventLoop, Graph, IoBuf, OpenCtx, OpenFlags, Perm, WriteFlags};
use strata_jobs::{blockdev_backup, BackupArgs};

const CLUSTER: u64 = 65536;

fn a_guest_write_waits_for_the_copy_of_its_cluster(sync: &str) {
    let dir = tempfile::tempdir().unwrap();
    EventLoop::new().unwrap().block_on(async {
        let src = dir.path().join("src.raw").display().to_string();
        let tgt = dir.path().join("tgt.raw").display().to_string();
        let mut old = vec![0u8; MIB as usize];
        old[..CLUSTER as usize].fill(0x11);
        std::fs::write(&src, &old).unwrap();
        std::fs::File::create(&tgt).unwrap().set_len(MIB).unwrap();
        let graph = Graph::new();
        let registry = strata_drivers::registry();
        let ctx = OpenCtx::with_graph(
            Arc::clone(&registry),
            OpenFlags::default(),
            Arc::clone(&graph),
        );
        let (source, target) = source_and_target(&ctx, &src, &tgt).await;
        // The guest, as an export would use the disk.
        let guest = Backend::new(
            &source,
            "guest",
            Perm::CONSISTENT_READ.with(Perm::WRITE),
            Perm::ALL,
        )
        .unwrap();
        let (list, events) = recording_list();
        // The first read of the source is the first copy: the job's own
        // (full), or that of a first guest write (none).
        source
            .with_debug_hooks(|h| h.breakpoint("read_aio", "copy"))
            .unwrap();
        let args = BackupArgs {
            job_id: Some("b".into()),
            device: "src".into(),
            target: "tgt".into(),
            sync: sync.into(),
            ..BackupArgs::default()
        };
        blockdev_backup(&list, &graph, args).await.unwrap();
        let guest = Arc::new(guest);
        let first = if sync == "none" {
            let g = Arc::clone(&guest);
            Some(tokio::spawn(async move {
                g.write(0, IoBuf::filled(4096, 0x44), WriteFlags::default())
                    .await
                    .unwrap();
            }))
        } else {
            None
        };
        until_suspended("the copy to stop at its breakpoint", &source, "copy").await;
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
        source.with_debug_hooks(|h| h.resume("copy")).unwrap();
        write.await.unwrap();
        if let Some(f) = first {
            f.await.unwrap();
        }
        if sync == "none" {
            // Fleecing lasts until cancelled.
            let job = Arc::clone(&list.find("b").unwrap());
            job.user_cancel(true).await.unwrap();
        }
        until("the job to end", || list.find("b").is_none()).await;
        let ev = events.lock().unwrap().join("\n");
        assert!(!ev.contains("error"), "{ev}");
        holds(&guest, 4096, 4096, 0x55).await;
        let tb = Backend::new(&target, "check", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
        holds(&tb, 0, CLUSTER as usize, 0x11).await;
        if sync == "full" {
            holds(&tb, CLUSTER, (MIB - CLUSTER) as usize, 0).await;
        }
        tb.close().await.unwrap();
        Arc::into_inner(guest).unwrap().close().await.unwrap();
        target.close().await.unwrap();
        source.close().await.unwrap();
    });
}

#[test]
fn a_guest_write_waits_for_the_job_copying_its_cluster() {
    a_guest_write_waits_for_the_copy_of_its_cluster("full");
}

#[test]
fn a_guest_write_waits_for_another_guest_write_copying_its_cluster() {
    a_guest_write_waits_for_the_copy_of_its_cluster("none");
}
