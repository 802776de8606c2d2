//! The stream job against a guest that writes while it copies: the copy of
//! a backing cluster is held at a blkdebug breakpoint on its read of the
//! old data, and a guest write to the same cluster comes in. Without care
//! the guest's write lands first and the copy then writes the old data
//! over it. The copy-up is one serialising request, so the write waits for
//! it and lands after it.

mod races_support;
use races_support::*;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use strata_block::{Backend, EventLoop, Graph, IoBuf, Node, OpenCtx, OpenFlags, Perm, WriteFlags};
use strata_jobs::{block_stream, JobList, JobStatus, StreamArgs};

/// A graph of two images in `dir`, `base` (all 0x11) under `top` (empty),
/// `size` bytes each; the base's file through blkdebug if `debug_base`.
struct Chain {
    graph: Arc<Graph>,
    registry: Arc<strata_block::Registry>,
    base: Arc<Node>,
    top: Arc<Node>,
}

async fn chain(dir: &std::path::Path, size: u64, debug_base: bool) -> Chain {
    let base = dir.join("base.qcow2").display().to_string();
    let top = dir.join("top.qcow2").display().to_string();
    let size_s = size.to_string();
    create(&base, &[("size", size_s.as_str())]).await;
    create(
        &top,
        &[
            ("size", size_s.as_str()),
            ("backing_file", base.as_str()),
            ("backing_fmt", "qcow2"),
        ],
    )
    .await;
    let graph = Graph::new();
    let registry = strata_drivers::registry();
    let ctx = OpenCtx::with_graph(
        Arc::clone(&registry),
        OpenFlags::default(),
        Arc::clone(&graph),
    );
    let file: &[(&str, &str)] = if debug_base {
        &[
            ("file.driver", "blkdebug"),
            ("file.image.driver", "file"),
            ("file.image.filename", &base),
        ]
    } else {
        &[("file.driver", "file"), ("file.filename", &base)]
    };
    let mut opts = vec![("driver", "qcow2"), ("node-name", "base")];
    opts.extend_from_slice(file);
    let base_node = open(&ctx, &opts).await;
    base_node
        .write(0, IoBuf::filled(size as usize, 0x11), WriteFlags::default())
        .await
        .unwrap();
    let top_node = open(
        &ctx,
        &[
            ("driver", "qcow2"),
            ("node-name", "top"),
            ("backing", "base"),
            ("file.driver", "file"),
            ("file.filename", &top),
        ],
    )
    .await;
    Chain {
        graph,
        registry,
        base: base_node,
        top: top_node,
    }
}

#[test]
fn a_guest_write_during_a_copy_up_is_not_overwritten_by_it() {
    let dir = tempfile::tempdir().unwrap();
    EventLoop::new().unwrap().block_on(async {
        let Chain {
            graph,
            registry,
            base: base_node,
            top: top_node,
        } = chain(dir.path(), MIB, true).await;
        // The guest: a user of the top image, as an export would be.
        let guest = Backend::new(
            &top_node,
            "guest",
            Perm::CONSISTENT_READ.with(Perm::WRITE),
            Perm::ALL,
        )
        .unwrap();
        // The first read of the base is the copy-up of cluster 0.
        base_node
            .with_debug_hooks(|h| h.breakpoint("read_aio", "copy"))
            .unwrap();
        let (list, events) = recording_list();
        let args = StreamArgs {
            job_id: Some("s".into()),
            device: "top".into(),
            ..StreamArgs::default()
        };
        block_stream(&list, &graph, &registry, args).await.unwrap();
        until_suspended("the copy to stop at its breakpoint", &base_node, "copy").await;
        // The guest writes into the cluster being copied up.
        let write = tokio::spawn(async move {
            guest
                .write(4096, IoBuf::filled(4096, 0x55), WriteFlags::default())
                .await
                .unwrap();
            guest
        });
        // Give it every chance to overtake the copy.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        base_node.with_debug_hooks(|h| h.resume("copy")).unwrap();
        let guest = write.await.unwrap();
        until("the job to end", || list.find("s").is_none()).await;
        let ev = events.lock().unwrap().join("\n");
        assert!(ev.contains("BLOCK_JOB_COMPLETED"), "{ev}");
        assert!(!ev.contains("error"), "{ev}");
        // The guest's write survived the copy; the rest came from the base.
        holds(&guest, 4096, 4096, 0x55).await;
        holds(&guest, 0, 4096, 0x11).await;
        holds(&guest, 8192, MIB as usize - 8192, 0x11).await;
        // The stream is done: the top stands alone and holds it all.
        assert!(top_node.backing().is_none());
        let mut at = 0;
        while at < MIB {
            // Chunks copied side by side may sit apart in the file.
            let st = top_node.block_status(at, MIB - at).await.unwrap();
            assert!(st.allocated && st.len > 0, "at {at}: {st:?}");
            at += st.len;
        }
        guest.close().await.unwrap();
        top_node.close().await.unwrap();
        base_node.close().await.unwrap();
    });
}

/// A job whose image lives in an I/O thread runs there, while the verbs
/// come from the main loop: every pause, resume and speed change must
/// reach it (none lost between its decision to wait and its wait), and
/// every answer must come (none waiting for a stop that already passed).
#[test]
fn verbs_from_the_main_loop_reach_a_job_in_an_io_thread() {
    let dir = tempfile::tempdir().unwrap();
    let io = strata_block::IoThread::new("io0").unwrap();
    EventLoop::new().unwrap().block_on(async {
        let Chain {
            graph,
            registry,
            base: base_node,
            top: top_node,
        } = chain(dir.path(), 4 * MIB, false).await;
        top_node.move_to(Some(io.handle().clone())).await;
        let list = JobList::new(Arc::new(|_: &str, _: Value| {}));
        let args = StreamArgs {
            job_id: Some("s".into()),
            device: "top".into(),
            // One step, then a wait of hours: every stop is a sleep.
            speed: Some(1),
            ..StreamArgs::default()
        };
        block_stream(&list, &graph, &registry, args).await.unwrap();
        let job = list.find("s").unwrap();
        for _ in 0..1000 {
            match job.user_pause().unwrap() {
                // Woken from its sleep, it pauses before it yields again.
                Some(since) => job.settle(since).await,
                // Busy with its first chunks: it pauses when they are done.
                None => until("the job to pause", || job.status() == JobStatus::Paused).await,
            }
            assert_eq!(job.status(), JobStatus::Paused);
            if let Some(since) = job.user_resume().unwrap() {
                job.settle(since).await;
            }
            if let Some(since) = job.set_speed(1).unwrap() {
                job.settle(since).await;
            }
        }
        // Full speed: it runs to its end in the I/O thread.
        if let Some(since) = job.set_speed(0).unwrap() {
            job.settle(since).await;
        }
        until("the job to end", || list.find("s").is_none()).await;
        assert!(top_node.backing().is_none());
        top_node.move_to(None).await;
        top_node.close().await.unwrap();
        base_node.close().await.unwrap();
    });
}

/// With two copy-ups in flight, the guest writes into the one held at its
/// read of the base while the other finishes: the held one must still
/// serialise the write, and the chunk beside it must not be disturbed.
#[test]
fn a_guest_write_into_the_second_copy_in_flight_survives_it() {
    let dir = tempfile::tempdir().unwrap();
    EventLoop::new().unwrap().block_on(async {
        let size = 3 * CHUNK;
        let Chain {
            graph,
            registry,
            base: base_node,
            top: top_node,
        } = chain(dir.path(), size, true).await;
        let guest = Backend::new(
            &top_node,
            "guest",
            Perm::CONSISTENT_READ.with(Perm::WRITE),
            Perm::ALL,
        )
        .unwrap();
        base_node
            .with_debug_hooks(|h| h.breakpoint("read_aio", "first"))
            .unwrap();
        let list = JobList::new(Arc::new(|_: &str, _: Value| {}));
        let args = StreamArgs {
            job_id: Some("s".into()),
            device: "top".into(),
            ..StreamArgs::default()
        };
        block_stream(&list, &graph, &registry, args).await.unwrap();
        let suspended = |tag: &'static str| {
            let hooks = Arc::clone(&base_node);
            move || hooks.with_debug_hooks(|h| Ok(h.is_suspended(tag))).unwrap()
        };
        until("the first copy at its breakpoint", suspended("first")).await;
        // The next read of the base is the second chunk's, sent beside the
        // third once the first has succeeded.
        base_node
            .with_debug_hooks(|h| h.breakpoint("read_aio", "second"))
            .unwrap();
        base_node.with_debug_hooks(|h| h.resume("first")).unwrap();
        until("the second copy at its breakpoint", suspended("second")).await;
        let job = list.find("s").unwrap();
        let progress = || job.info()["current-progress"].as_u64().unwrap();
        until("the third chunk to be copied meanwhile", || {
            progress() == 2 * CHUNK
        })
        .await;
        let write = tokio::spawn(async move {
            guest
                .write(
                    CHUNK + 4096,
                    IoBuf::filled(4096, 0x55),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
            guest
        });
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        base_node.with_debug_hooks(|h| h.resume("second")).unwrap();
        let guest = write.await.unwrap();
        until("the job to end", || list.find("s").is_none()).await;
        holds(&guest, CHUNK + 4096, 4096, 0x55).await;
        holds(&guest, 0, (CHUNK + 4096) as usize, 0x11).await;
        holds(&guest, CHUNK + 8192, (size - CHUNK - 8192) as usize, 0x11).await;
        assert!(top_node.backing().is_none());
        guest.close().await.unwrap();
        top_node.close().await.unwrap();
        base_node.close().await.unwrap();
    });
}

/// The stream job's step (QEMU: STREAM_CHUNK).
const CHUNK: u64 = 512 << 10;
