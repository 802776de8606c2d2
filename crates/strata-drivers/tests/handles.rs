//! The handles live features stand on, through the real request path: user
//! handles and their permissions, node replacement under a handle, filter
//! insertion and removal, the write funnel (notifiers before, dirty
//! bitmaps after, the write threshold).

mod common;

use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use strata_block::options::{nest, Opts};
use strata_block::{
    replace_node, Backend, BeforeWrite, EventLoop, Graph, IoBuf, Node, OpenCtx, OpenFlags, Perm,
    Result, WriteFlags, WriteKind, WriteReq,
};

const MIB: u64 = 1 << 20;

fn tempdir(name: &str) -> String {
    let d = std::env::temp_dir().join(format!("strata-handles-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}

async fn open(ctx: &OpenCtx, opts: &[(&str, &str)]) -> Result<Arc<Node>> {
    let pairs: Vec<(String, String)> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let o: Opts = nest(&pairs).unwrap();
    ctx.open_image(None, None, o).await
}

fn ctx(graph: &Arc<Graph>) -> OpenCtx {
    OpenCtx::with_graph(
        strata_drivers::registry(),
        OpenFlags::default(),
        Arc::clone(graph),
    )
}

/// Two 1 MiB raw nodes `a` and `b` over files in `dir`.
async fn two_raw_nodes(dir: &str, ctx: &OpenCtx) -> (Arc<Node>, Arc<Node>) {
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let file = format!("{dir}/{name}.raw");
        common::create(&file, "raw", &[("size", "1048576")]).await;
        let opts = [
            ("driver", "raw"),
            ("node-name", name),
            ("file.driver", "file"),
            ("file.filename", &file),
        ];
        nodes.push(open(ctx, &opts).await.unwrap());
    }
    let b = nodes.pop().unwrap();
    (nodes.pop().unwrap(), b)
}

async fn read(b: &Backend, off: u64, len: usize) -> Vec<u8> {
    b.read(off, IoBuf::zeroed(len))
        .await
        .unwrap()
        .as_slice()
        .to_vec()
}

async fn write(b: &Backend, off: u64, len: usize, byte: u8) {
    b.write(off, IoBuf::filled(len, byte), WriteFlags::default())
        .await
        .unwrap();
}

#[test]
fn handles_take_permissions_and_conflicts_are_refused_with_qemus_text() {
    let dir = tempdir("perm");
    let img = format!("{dir}/a.qcow2");
    EventLoop::new().unwrap().block_on(async {
        common::create(&img, "qcow2", &[("size", "1048576")]).await;
        let node = common::open(&img, Some("qcow2")).await;
        let rw = Perm::CONSISTENT_READ.with(Perm::WRITE);
        // A writer that lets nobody else write.
        let a = Backend::new(&node, "block device 'a'", rw, Perm::CONSISTENT_READ).unwrap();
        let e = Backend::new(&node, "block device 'b'", rw, Perm::ALL)
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "Permission conflict on node '{n}': permissions 'write' are both required by block device 'b' (uses node '{n}' as 'root' child) and unshared by block device 'a' (uses node '{n}' as 'root' child).",
                n = node.name()
            )
        );
        // A reader is fine, and cannot write.
        let r = Backend::new(&node, "block device 'r'", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
        let err = r
            .write(0, IoBuf::filled(512, 1), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), libc::EPERM);
        write(&a, 0, 4096, 7).await;
        assert_eq!(read(&r, 0, 4096).await, vec![7; 4096]);
        // Once the writer is gone, another may take write.
        a.close().await.unwrap();
        let b = Backend::new(&node, "block device 'b'", rw, Perm::ALL).unwrap();
        b.close().await.unwrap();
        r.close().await.unwrap();
        node.close().await.unwrap();
    });
}

#[test]
fn a_replaced_node_gets_every_request_after_the_swap_and_none_before() {
    let dir = tempdir("replace");
    EventLoop::new().unwrap().block_on(async {
        let graph = Graph::new();
        let (a, b) = two_raw_nodes(&dir, &ctx(&graph)).await;
        let rw = Perm::CONSISTENT_READ.with(Perm::WRITE);
        let user = Backend::new(&a, "block device 'disk'", rw, Perm::ALL).unwrap();
        write(&user, 0, 65536, 0x11).await;

        // Many writes in flight while the swap happens: each lands wholly
        // on one side, and the ones issued after it on `b` alone.
        let before: Vec<_> = (0..16u64)
            .map(|i| {
                user.write(
                    MIB / 2 + i * 4096,
                    IoBuf::filled(4096, 0x22),
                    WriteFlags::default(),
                )
            })
            .collect();
        let swap = replace_node(&a, &b);
        let (done, swapped) = futures::join!(futures::future::join_all(before), swap);
        swapped.unwrap();
        assert!(done.iter().all(|r| r.is_ok()));
        assert!(Arc::ptr_eq(&user.node(), &b));
        assert_eq!(a.backend_count(), 0);
        assert_eq!(b.backend_count(), 1);
        write(&user, 65536, 65536, 0x33).await;

        let on = |n: Arc<Node>, off: u64, len: usize| async move {
            n.read(off, IoBuf::zeroed(len))
                .await
                .unwrap()
                .as_slice()
                .to_vec()
        };
        assert_eq!(on(a.clone(), 0, 65536).await, vec![0x11; 65536]);
        assert_eq!(on(b.clone(), 0, 65536).await, vec![0; 65536]);
        assert_eq!(on(a.clone(), 65536, 65536).await, vec![0; 65536]);
        assert_eq!(on(b.clone(), 65536, 65536).await, vec![0x33; 65536]);
        for i in 0..16u64 {
            let (x, y) = (
                on(a.clone(), MIB / 2 + i * 4096, 4096).await,
                on(b.clone(), MIB / 2 + i * 4096, 4096).await,
            );
            assert!(
                (x == vec![0x22; 4096]) != (y == vec![0x22; 4096]),
                "write {i} landed on both sides or neither"
            );
        }
        user.close().await.unwrap();
        a.close().await.unwrap();
        b.close().await.unwrap();
    });
}

#[test]
fn a_replacement_the_permissions_forbid_changes_nothing() {
    let dir = tempdir("refuse");
    EventLoop::new().unwrap().block_on(async {
        let graph = Graph::new();
        let (a, b) = two_raw_nodes(&dir, &ctx(&graph)).await;
        let rw = Perm::CONSISTENT_READ.with(Perm::WRITE);
        let writer = Backend::new(&a, "block device 'disk'", rw, Perm::ALL).unwrap();
        // Someone reads `b` and lets nobody write it.
        let reader = Backend::new(
            &b,
            "block device 'ro'",
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ,
        )
        .unwrap();
        let e = replace_node(&a, &b).await.unwrap_err();
        assert!(
            e.to_string().starts_with("Permission conflict on node 'b'"),
            "{e}"
        );
        assert!(Arc::ptr_eq(&writer.node(), &a));
        assert_eq!((a.backend_count(), b.backend_count()), (1, 1));
        write(&writer, 0, 4096, 9).await;
        assert_eq!(read(&reader, 0, 4096).await, vec![0; 4096]);
        for x in [writer, reader] {
            x.close().await.unwrap();
        }
        a.close().await.unwrap();
        b.close().await.unwrap();
    });
}

#[test]
fn a_filter_goes_in_above_a_node_and_comes_out_again() {
    let dir = tempdir("filter");
    let img = format!("{dir}/a.qcow2");
    EventLoop::new().unwrap().block_on(async {
        common::create(&img, "qcow2", &[("size", "1048576")]).await;
        let graph = Graph::new();
        let ctx = ctx(&graph);
        let disk = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("node-name", "disk"),
                ("file.driver", "file"),
                ("file.filename", &img),
            ],
        )
        .await
        .unwrap();
        let rw = Perm::CONSISTENT_READ.with(Perm::WRITE);
        let user = Backend::new(&disk, "block device 'vm'", rw, Perm::ALL).unwrap();
        write(&user, 0, 4096, 1).await;
        // A blkdebug filter over the disk, then in its place.
        let filter = open(
            &ctx,
            &[
                ("driver", "blkdebug"),
                ("node-name", "dbg"),
                ("image", "disk"),
            ],
        )
        .await
        .unwrap();
        replace_node(&disk, &filter).await.unwrap();
        assert!(Arc::ptr_eq(&user.node(), &filter));
        assert_eq!(disk.parents().len(), 1, "only the filter uses the disk");
        // Requests now go through the filter: a bitmap on it sees them.
        let bm = filter
            .bitmaps()
            .create(Some("f"), 65536, filter.length())
            .unwrap();
        write(&user, 65536, 4096, 2).await;
        assert_eq!(bm.dirty_ranges(), vec![(65536, 65536)]);
        // Out again: the user is back on the disk, the filter goes.
        filter.close().await.unwrap();
        filter.drop_filter().await.unwrap();
        assert!(Arc::ptr_eq(&user.node(), &disk));
        assert!(filter.is_closed(), "nobody holds the filter any more");
        assert!(disk.parents().is_empty());
        write(&user, 131072, 4096, 3).await;
        assert_eq!(
            bm.dirty_ranges(),
            vec![(65536, 65536)],
            "the filter saw nothing after"
        );
        assert_eq!(
            read(&user, 0, 3 * 65536)
                .await
                .iter()
                .filter(|&&x| x != 0)
                .count(),
            3 * 4096
        );
        user.close().await.unwrap();
        disk.close().await.unwrap();
        if let Some(q) = common::qemu_tool("qemu-img") {
            let (code, out) = common::run(&q, &["check", &img]);
            assert_eq!(code, 0, "{out}");
        }
    });
}

/// A notifier that keeps the old data of every range before it is written
/// over, as copy-before-write does, reading it from the file below.
struct KeepOld {
    seen: Mutex<Vec<(WriteReq, Vec<u8>)>>,
}

#[async_trait]
impl BeforeWrite for KeepOld {
    async fn before_write(&self, node: &Node, req: &WriteReq) -> Result<()> {
        let file = node.primary_child().unwrap();
        let old = file
            .read(req.offset, IoBuf::zeroed(req.len as usize))
            .await?;
        self.seen
            .lock()
            .unwrap()
            .push((*req, old.as_slice().to_vec()));
        Ok(())
    }
}

#[test]
fn the_write_funnel_notifies_before_and_marks_bitmaps_after() {
    let dir = tempdir("funnel");
    let img = format!("{dir}/a.raw");
    EventLoop::new().unwrap().block_on(async {
        common::create(&img, "raw", &[("size", "4194304")]).await;
        let graph = Graph::new();
        let ctx = ctx(&graph);
        let node = open(
            &ctx,
            &[
                ("driver", "raw"),
                ("node-name", "d"),
                ("discard", "unmap"),
                ("file.driver", "file"),
                ("file.filename", &img),
            ],
        )
        .await
        .unwrap();
        let rw = Perm::CONSISTENT_READ.with(Perm::WRITE);
        let user = Backend::new(&node, "block device 'vm'", rw, Perm::ALL).unwrap();
        write(&user, 0, 8192, 0xaa).await;

        let keep = Arc::new(KeepOld {
            seen: Mutex::new(Vec::new()),
        });
        let n: Arc<dyn BeforeWrite> = keep.clone();
        node.add_before_write(Arc::clone(&n));
        let bm = node
            .bitmaps()
            .create(Some("b0"), 65536, node.length())
            .unwrap();
        let off = node
            .bitmaps()
            .create(Some("off"), 65536, node.length())
            .unwrap();
        node.bitmaps().set_enabled(&off, false).unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = Arc::clone(&events);
        node.set_write_threshold(
            MIB + 4096,
            Some(Arc::new(move |e| ev.lock().unwrap().push(e))),
        );

        write(&user, 4096, 4096, 0xbb).await; // over old data
        user.write_zeroes(MIB, 8192, WriteFlags::default())
            .await
            .unwrap();
        user.discard(2 * MIB, 65536).await.unwrap();
        user.write(3 * MIB + 100, IoBuf::filled(10, 1), WriteFlags::default())
            .await
            .unwrap();
        // Refused before the node: nothing marked.
        assert!(user
            .write(5 * MIB, IoBuf::filled(512, 1), WriteFlags::default())
            .await
            .is_err());

        let seen = keep.seen.lock().unwrap().clone();
        let kinds: Vec<_> = seen
            .iter()
            .map(|(r, _)| (r.kind, r.offset, r.len))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (WriteKind::Write, 4096, 4096),
                (WriteKind::Zeroes, MIB, 8192),
                (WriteKind::Discard, 2 * MIB, 65536),
                // Byte-aligned here (buffered I/O): no padding.
                (WriteKind::Write, 3 * MIB + 100, 10),
            ]
        );
        assert_eq!(seen[0].1, vec![0xaa; 4096], "the notifier saw the old data");
        assert_eq!(
            bm.dirty_ranges(),
            vec![(0, 65536), (MIB, 65536), (2 * MIB, 65536), (3 * MIB, 65536)]
        );
        assert!(
            off.dirty_ranges().is_empty(),
            "a disabled bitmap records nothing"
        );
        let ev = events.lock().unwrap().clone();
        assert_eq!(ev.len(), 1, "the threshold fires once");
        assert_eq!(
            (ev[0].amount_exceeded, ev[0].write_threshold),
            (4096, MIB + 4096)
        );
        assert_eq!(node.write_threshold(), 0);

        node.remove_before_write(&n);
        write(&user, 0, 512, 1).await;
        assert_eq!(keep.seen.lock().unwrap().len(), 4);
        user.close().await.unwrap();
        node.close().await.unwrap();
    });
}

#[test]
fn inactivation_drains_writes_in_flight_before_writing_caches_back() {
    let dir = tempdir("inactivate");
    let img = format!("{dir}/a.qcow2");
    EventLoop::new().unwrap().block_on(async {
        common::create(
            &img,
            "qcow2",
            &[("size", "4194304"), ("cluster_size", "4096")],
        )
        .await;
        let node = common::open(&img, Some("qcow2")).await;
        let rw = Perm::CONSISTENT_READ.with(Perm::WRITE);
        let user = Backend::new(&node, "block device 'vm'", rw, Perm::ALL).unwrap();
        // Allocating writes (each touches L2 and refcounts) racing the hand-over.
        let writes: Vec<_> = (0..64u64)
            .map(|i| {
                user.write(
                    i * 65536,
                    IoBuf::filled(4096, i as u8 + 1),
                    WriteFlags::default(),
                )
            })
            .collect();
        let (results, inactivated) =
            futures::join!(futures::future::join_all(writes), node.inactivate());
        inactivated.unwrap();
        // What completed is on disk now, as another process sees it.
        let q = common::qemu_tool("qemu-img");
        if let Some(q) = &q {
            let (code, out) = common::run(q, &["check", "-U", &img]);
            assert_eq!(code, 0, "{out}");
        }
        if let Some(qio) = common::qemu_tool("qemu-io") {
            for (i, r) in results.iter().enumerate() {
                if r.is_err() {
                    // Refused once inactive: nothing was written.
                    assert_eq!(r.as_ref().unwrap_err().code(), libc::EPERM);
                    continue;
                }
                let cmd = format!("read -P {} {} 4096", i + 1, i * 65536);
                let (code, out) = common::run(&qio, &["-U", "-r", "-f", "qcow2", "-c", &cmd, &img]);
                assert!(
                    code == 0 && !out.contains("Pattern verification failed"),
                    "{out}"
                );
            }
        }
        user.close().await.unwrap();
        node.close().await.unwrap();
    });
}

#[test]
fn a_request_runs_to_its_end_when_its_caller_gives_up() {
    let dir = tempdir("giveup");
    let img = format!("{dir}/a.qcow2");
    EventLoop::new().unwrap().block_on(async {
        common::create(&img, "qcow2", &[("size", "1048576")]).await;
        let graph = Graph::new();
        let ctx = ctx(&graph);
        let dbg = open(
            &ctx,
            &[
                ("driver", "qcow2"),
                ("file.driver", "blkdebug"),
                ("file.image.driver", "file"),
                ("file.image.filename", &img),
            ],
        )
        .await
        .unwrap();
        let rw = Perm::CONSISTENT_READ.with(Perm::WRITE);
        let user = Backend::new(&dbg, "block device 'vm'", rw, Perm::ALL).unwrap();
        let file = dbg.primary_child().unwrap();
        let hooks = || file.driver().debug_hooks().unwrap();
        hooks().breakpoint("write_aio", "A").unwrap();
        // The caller stops waiting while the write is held at the breakpoint.
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            user.write(0, IoBuf::filled(4096, 0x5c), WriteFlags::default()),
        )
        .await;
        assert!(gave_up.is_err());
        assert!(hooks().is_suspended("A"));
        assert_eq!(dbg.in_flight(), 1, "the write still holds its range");
        hooks().resume("A").unwrap();
        while dbg.in_flight() > 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(read(&user, 0, 4096).await, vec![0x5c; 4096], "it finished");
        user.close().await.unwrap();
        dbg.close().await.unwrap();
    });
}
