//! Two backups that end together (a grouped transaction), one of them with
//! a copy in flight when the other fails. The group is aborted only once
//! that copy is over: aborting a job takes its filter away and lets go of
//! its target, which a copy still writing into must not see. The copy is
//! held at a blkdebug breakpoint on its read of the source.

mod races_support;
use races_support::*;

use std::sync::Arc;
use std::time::Duration;
use strata_block::{EventLoop, Graph, OpenCtx, OpenFlags};
use strata_jobs::{backup_prepare, BackupArgs, JobTxn};

#[test]
fn a_failed_backup_aborts_its_group_only_after_the_others_copies_end() {
    let dir = tempfile::tempdir().unwrap();
    EventLoop::new().unwrap().block_on(async {
        let path = |n: &str| dir.path().join(n).display().to_string();
        for n in ["src.raw", "tgt.raw", "src2.raw", "tgt2.raw"] {
            std::fs::write(path(n), vec![0x11u8; MIB as usize]).unwrap();
        }
        let graph = Graph::new();
        let registry = strata_drivers::registry();
        let ctx = OpenCtx::with_graph(
            Arc::clone(&registry),
            OpenFlags::default(),
            Arc::clone(&graph),
        );
        // The first job: its reads of the source can be held.
        let (source, _target) = source_and_target(&ctx, &path("src.raw"), &path("tgt.raw")).await;
        // The second: every write to its target fails.
        let _source2 = open(
            &ctx,
            &[
                ("driver", "raw"),
                ("node-name", "src2"),
                ("file.driver", "file"),
                ("file.filename", &path("src2.raw")),
            ],
        )
        .await;
        let _target2 = open(
            &ctx,
            &[
                ("driver", "raw"),
                ("node-name", "tgt2"),
                ("file.driver", "blkdebug"),
                ("file.inject-error.0.event", "pwritev"),
                ("file.inject-error.0.errno", "5"),
                ("file.image.driver", "file"),
                ("file.image.filename", &path("tgt2.raw")),
            ],
        )
        .await;
        let (list, events) = recording_list();
        source
            .with_debug_hooks(|h| h.breakpoint("read_aio", "copy"))
            .unwrap();
        let group = JobTxn::new();
        let mut jobs = Vec::new();
        for (id, device, target) in [("b1", "src", "tgt"), ("b2", "src2", "tgt2")] {
            let args = BackupArgs {
                job_id: Some(id.into()),
                device: device.into(),
                target: target.into(),
                sync: "full".into(),
                ..BackupArgs::default()
            };
            let job = backup_prepare(&list, &graph, args).await.unwrap();
            group.join(&job);
            jobs.push(job);
        }
        for job in &jobs {
            list.start(job);
        }
        until_suspended("b1's copy to stop at its breakpoint", &source, "copy").await;
        let said = |what: &str| events.lock().unwrap().iter().any(|e| e.contains(what));
        let aborting = |e: &String, id: &str| e.contains("\"aborting\"") && e.contains(id);
        until("b2 to fail", || {
            events.lock().unwrap().iter().any(|e| aborting(e, "\"b2\""))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // b1 is cancelled, but its copy is held: nothing is aborted yet.
        assert!(jobs[0].is_cancelled());
        assert!(!said("BLOCK_JOB_COMPLETED"), "{:?}", events.lock().unwrap());
        assert!(!said("BLOCK_JOB_CANCELLED"), "{:?}", events.lock().unwrap());
        assert!(list.find("b1").is_some() && list.find("b2").is_some());
        source.with_debug_hooks(|h| h.resume("copy")).unwrap();
        until("both jobs to end", || list.jobs().is_empty()).await;
        let ev = events.lock().unwrap().clone();
        let at = |what: &str| ev.iter().position(|e| e.contains(what)).unwrap();
        assert!(ev[at("BLOCK_JOB_COMPLETED")].contains("Input/output error"));
        let b1_aborting = ev.iter().position(|e| aborting(e, "\"b1\"")).unwrap();
        assert!(b1_aborting < at("BLOCK_JOB_COMPLETED"), "{ev:?}");
        assert!(at("BLOCK_JOB_COMPLETED") < at("BLOCK_JOB_CANCELLED"));
        // Both filters are gone: the sources are theirs again.
        for n in ["src", "src2"] {
            let node = graph.find(n).unwrap();
            assert!(node.parents().is_empty(), "{n} still has a parent");
        }
    });
}
