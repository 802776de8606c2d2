//! Node lifetime and op blockers in a graph: a node found by name is shared
//! by reference, lives until its last user closes it, and while it is the
//! backing file of an image in use every operation on it is blocked, but
//! those that work through a chain in use.

mod common;

use std::sync::Arc;
use strata_block::options::{nest, Opts};
use strata_block::{BlockOp, EventLoop, Graph, IoBuf, Node, OpenCtx, OpenFlags, WriteFlags};

fn ctx(graph: &Arc<Graph>) -> OpenCtx {
    OpenCtx::with_graph(
        strata_drivers::registry(),
        OpenFlags {
            aio: strata_block::engine::Aio::Threads,
            ..OpenFlags::default()
        },
        Arc::clone(graph),
    )
}

async fn open(ctx: &OpenCtx, opts: &[(&str, &str)]) -> strata_block::Result<Arc<Node>> {
    let pairs: Vec<(String, String)> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let o: Opts = nest(&pairs).unwrap();
    ctx.open_image(None, None, o).await
}

fn tempdir(name: &str) -> String {
    let d = std::env::temp_dir().join(format!("strata-graph-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}

#[test]
fn a_shared_backing_node_is_blocked_and_lives_until_its_last_user_goes() {
    let dir = tempdir("shared");
    let base = format!("{dir}/base.qcow2");
    let top = format!("{dir}/top.qcow2");
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        common::create(&base, "qcow2", &[("size", "1048576")]).await;
        common::create(&top, "qcow2", &[("size", "1048576")]).await;
        let graph = Graph::new();
        let ctx = ctx(&graph);
        let b = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("node-name", "base"),
                ("file.driver", "file"),
                ("file.filename", &base),
            ],
        )
        .await
        .unwrap();
        b.write(0, IoBuf::filled(4096, 0x5a), WriteFlags::default())
            .await
            .unwrap();
        assert!(b.check_op(BlockOp::Resize).is_ok());

        // The same name twice is refused, as QEMU refuses it.
        let dup = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("node-name", "base"),
                ("file.filename", &top),
            ],
        )
        .await
        .unwrap_err();
        assert_eq!(dup.to_string(), "Duplicate nodes with node-name='base'");

        let t = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("node-name", "top"),
                ("file.driver", "file"),
                ("file.filename", &top),
                ("backing", "base"),
            ],
        )
        .await
        .unwrap();
        assert!(Arc::ptr_eq(&t.backing().unwrap(), &b));
        assert_eq!(b.ref_count(), 2);
        assert_eq!(b.parents().len(), 1);
        assert_eq!(b.parents()[0].parent_name, "top");
        // Reads through the top see the shared node's data.
        let r = t.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(r.as_slice().iter().all(|&x| x == 0x5a));

        for op in BlockOp::ALL {
            let r = b.check_op(op);
            match op {
                BlockOp::CommitTarget
                | BlockOp::Stream
                | BlockOp::BackupSource
                | BlockOp::BackupTarget => assert!(r.is_ok(), "{op:?} blocked"),
                _ => assert_eq!(
                    r.unwrap_err().to_string(),
                    "Node 'base' is busy: node is used as backing hd of 'top'",
                    "{op:?}"
                ),
            }
        }
        // The top itself is not blocked.
        assert!(t.check_op(BlockOp::Resize).is_ok());

        // The monitor's reference goes first: the node stays, for the top.
        b.close().await.unwrap();
        assert!(!b.is_closed());
        assert!(graph.find("base").is_some());
        let r = t.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(r.as_slice().iter().all(|&x| x == 0x5a));

        // The last user goes: both close, the blockers with them.
        t.close().await.unwrap();
        assert!(t.is_closed() && b.is_closed());
        assert!(b.blockers().is_empty());
        assert!(b.parents().is_empty());
        assert!(graph.find("base").is_none());
        assert!(graph.nodes().is_empty());
    });
}

#[test]
fn references_to_missing_nodes_or_with_more_options_are_refused() {
    let dir = tempdir("refs");
    let top = format!("{dir}/top.qcow2");
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        common::create(&top, "qcow2", &[("size", "1048576")]).await;
        let graph = Graph::new();
        let ctx = ctx(&graph);
        let e = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("file.filename", &top),
                ("backing", "nope"),
            ],
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Could not open backing file: Cannot find device='nope' nor node-name='nope'"
        );
        let e = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("node-name", "9x"),
                ("file.filename", &top),
            ],
        )
        .await
        .unwrap_err();
        assert_eq!(e.to_string(), "Invalid node-name: '9x'");
        // A protocol node opened on its own can be the file of a format.
        let f = open(
            &ctx,
            &[
                ("driver", "file"),
                ("node-name", "proto"),
                ("filename", &top),
            ],
        )
        .await
        .unwrap();
        let q = open(&ctx, &[("driver", "qcow2"), ("file", "proto")])
            .await
            .unwrap();
        assert_eq!(f.ref_count(), 2);
        q.close().await.unwrap();
        assert!(!f.is_closed());
        f.close().await.unwrap();
        assert!(f.is_closed());
    });
}

#[test]
fn a_new_backing_file_is_blocked_referenced_and_merged_into_the_limits() {
    let dir = tempdir("set-backing");
    let base = format!("{dir}/base.qcow2");
    let top = format!("{dir}/top.qcow2");
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        common::create(&base, "qcow2", &[("size", "1048576")]).await;
        common::create(&top, "qcow2", &[("size", "1048576")]).await;
        let graph = Graph::new();
        let ctx = ctx(&graph);
        // The base sits under blkdebug, which caps its transfers.
        let b = open(
            &ctx,
            &[
                ("driver", "blkdebug"),
                ("node-name", "base"),
                ("max-transfer", "65536"),
                ("image.driver", "qcow2"),
                ("image.node-name", "base-img"),
                ("image.file.filename", &base),
            ],
        )
        .await
        .unwrap();
        b.write(0, IoBuf::filled(4096, 0x33), WriteFlags::default())
            .await
            .unwrap();
        let t = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("node-name", "top"),
                ("file.filename", &top),
            ],
        )
        .await
        .unwrap();
        assert_eq!(t.limits().max_transfer, 0);
        assert!(b.check_op(BlockOp::Resize).is_ok());

        t.set_backing(Some(Arc::clone(&b))).await.unwrap();
        assert_eq!(t.limits().max_transfer, 65536);
        assert_eq!(b.ref_count(), 2);
        assert_eq!(
            b.check_op(BlockOp::Resize).unwrap_err().to_string(),
            "Node 'base' is busy: node is used as backing hd of 'top'"
        );
        let r = t.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(r.as_slice().iter().all(|&x| x == 0x33));
        // The other way round would be a cycle.
        let img = graph.find("base-img").unwrap();
        let e = img.set_backing(Some(Arc::clone(&t))).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "Making 'top' a backing child of 'base-img' would create a cycle"
        );

        t.set_backing(None).await.unwrap();
        assert_eq!(t.limits().max_transfer, 0);
        assert_eq!(b.ref_count(), 1);
        assert!(b.blockers().is_empty() && b.parents().is_empty());
        let r = t.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(r.as_slice().iter().all(|&x| x == 0));
        t.close().await.unwrap();
        b.close().await.unwrap();
        assert!(graph.nodes().is_empty());
    });
}
