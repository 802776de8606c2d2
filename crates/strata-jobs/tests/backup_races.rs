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

/// A backup of an overlay whose backing file already carries another
/// backup's copy-before-write filter: the job sees the chain through that
/// filter (base data, top data, zeroes), and a guest write into a cluster
/// whose data lives in the base waits for the job's copy of it, held at a
/// breakpoint on the base's read. A guest write into a range of zeroes
/// goes through meanwhile (QEMU's shrunk copy task), and the backup still
/// holds zeroes there. The
/// target starts full of 0x99, so a range the job skipped instead of
/// copying would show.
#[test]
fn a_backup_through_another_backups_filter_keeps_its_point_in_time() {
    let dir = tempfile::tempdir().unwrap();
    EventLoop::new().unwrap().block_on(async {
        let path = |n: &str| dir.path().join(n).display().to_string();
        let (base, top) = (path("base.qcow2"), path("top.qcow2"));
        create(&base, &[("size", "1M")]).await;
        create(
            &top,
            &[
                ("size", "1M"),
                ("backing_file", &base),
                ("backing_fmt", "qcow2"),
            ],
        )
        .await;
        std::fs::File::create(path("fleece.raw"))
            .unwrap()
            .set_len(MIB)
            .unwrap();
        std::fs::write(path("tgt.raw"), vec![0x99u8; MIB as usize]).unwrap();
        let graph = Graph::new();
        let ctx = OpenCtx::with_graph(
            strata_drivers::registry(),
            OpenFlags::default(),
            Arc::clone(&graph),
        );
        let base_node = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("node-name", "base"),
                ("file.driver", "blkdebug"),
                ("file.image.driver", "file"),
                ("file.image.filename", &base),
            ],
        )
        .await;
        let top_node = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("node-name", "top"),
                ("file.driver", "file"),
                ("file.filename", &top),
                ("backing", "base"),
            ],
        )
        .await;
        let mut targets = Vec::new();
        for (name, file) in [("fleece", path("fleece.raw")), ("tgt", path("tgt.raw"))] {
            targets.push(
                open(
                    &ctx,
                    &[
                        ("driver", "raw"),
                        ("node-name", name),
                        ("file.driver", "file"),
                        ("file.filename", &file),
                    ],
                )
                .await,
            );
        }
        // The old disk: base data in cluster 0, top data in cluster 1.
        let b = Backend::new(&base_node, "fill", Perm::ALL, Perm::ALL).unwrap();
        b.write(
            0,
            IoBuf::filled(CLUSTER as usize, 0x11),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        b.close().await.unwrap();
        let guest = Arc::new(
            Backend::new(
                &top_node,
                "guest",
                Perm::CONSISTENT_READ.with(Perm::WRITE),
                Perm::ALL,
            )
            .unwrap(),
        );
        guest
            .write(
                CLUSTER,
                IoBuf::filled(CLUSTER as usize, 0x22),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        let (list, events) = recording_list();
        let backup = |id: &str, device: &str, target: &str, sync: &str| BackupArgs {
            job_id: Some(id.into()),
            device: device.into(),
            target: target.into(),
            sync: sync.into(),
            ..BackupArgs::default()
        };
        // The first backup puts its filter between the overlay and its base.
        blockdev_backup(&list, &graph, backup("fleece", "base", "fleece", "none"))
            .await
            .unwrap();
        assert_eq!(
            top_node.backing().map(|n| n.format_name()),
            Some("copy-before-write")
        );
        base_node
            .with_debug_hooks(|h| h.breakpoint("read_aio", "copy"))
            .unwrap();
        blockdev_backup(&list, &graph, backup("b", "top", "tgt", "full"))
            .await
            .unwrap();
        until_suspended("the copy of the base's cluster to stop", &base_node, "copy").await;
        let g = Arc::clone(&guest);
        let write = tokio::spawn(async move {
            g.write(4096, IoBuf::filled(4096, 0x55), WriteFlags::default())
                .await
                .unwrap();
        });
        // A write into the zeroes is not held by the copy of the data: the
        // job's claim shrank to its first run.
        let zeroes = guest.write(
            5 * CLUSTER,
            IoBuf::filled(4096, 0x66),
            WriteFlags::default(),
        );
        tokio::time::timeout(Duration::from_secs(10), zeroes)
            .await
            .expect("a write into the zeroes waited for the copy of the data")
            .unwrap();
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!write.is_finished(), "the guest's write did not wait");
        base_node.with_debug_hooks(|h| h.resume("copy")).unwrap();
        write.await.unwrap();
        until("the backup to end", || list.find("b").is_none()).await;
        let fleece = Arc::clone(&list.find("fleece").unwrap());
        fleece.user_cancel(true).await.unwrap();
        until("the fleecing job to end", || list.find("fleece").is_none()).await;
        let ev = events.lock().unwrap().join("\n");
        assert!(!ev.contains("error"), "{ev}");
        holds(&guest, 0, 4096, 0x11).await;
        holds(&guest, 4096, 4096, 0x55).await;
        holds(&guest, 5 * CLUSTER, 4096, 0x66).await;
        let [fleece_node, tgt]: [Arc<strata_block::Node>; 2] = targets.try_into().unwrap();
        let tb = Backend::new(&tgt, "check", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
        holds(&tb, 0, CLUSTER as usize, 0x11).await;
        holds(&tb, CLUSTER, CLUSTER as usize, 0x22).await;
        holds(&tb, 2 * CLUSTER, (MIB - 2 * CLUSTER) as usize, 0).await;
        tb.close().await.unwrap();
        // The base was never written: its own backup copied nothing.
        let fb = Backend::new(&fleece_node, "check", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
        holds(&fb, 0, MIB as usize, 0).await;
        fb.close().await.unwrap();
        Arc::into_inner(guest).unwrap().close().await.unwrap();
        for n in [top_node, base_node, fleece_node, tgt] {
            n.close().await.unwrap();
        }
    });
}
