//! Reopening a node read-write and back in place, as a job does to the
//! image it writes into: the file descriptor, the image lock, the qcow2
//! metadata and its persistent bitmaps all follow, and QEMU's tools find
//! the image as they would after their own reopen.

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use strata_block::options::Opts;
use strata_block::{Backend, EventLoop, IoBuf, Node, OpenCtx, OpenFlags, Perm, WriteFlags};

fn tempdir(name: &str) -> String {
    let d = std::env::temp_dir().join(format!("strata-reopen-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}

fn qemu(tool: &str, args: &[&str]) -> Option<String> {
    let t = common::qemu_tool(tool)?;
    let (code, out) = common::run(&t, args);
    assert_eq!(code, 0, "{tool} {args:?}: {out}");
    Some(out)
}

async fn open_read_only(path: &str) -> Arc<Node> {
    let flags = OpenFlags {
        read_only: true,
        ..OpenFlags::default()
    };
    OpenCtx::new(strata_drivers::registry(), flags)
        .open_image(Some(path), Some("qcow2"), Opts::new())
        .await
        .unwrap()
}

/// Whether some process holds the image lock that a writer takes (QEMU's
/// byte 100 + the WRITE bit).
fn write_lock_held(path: &str) -> bool {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: an all-zero flock is valid; fcntl fills it in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = 101;
    fl.l_len = 1;
    // SAFETY: fl lives across the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(r, 0);
    fl.l_type != libc::F_UNLCK as i16
}

fn bitmap_flags(path: &str) -> String {
    let info = qemu("qemu-img", &["info", "-U", "--output=json", path]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["format-specific"]["data"]["bitmaps"][0]["flags"].to_string()
}

/// A graph of its own and a context that opens nodes into it, as the
/// daemon has, so that blockdev-reopen can name them.
fn graph_and_ctx() -> (Arc<strata_block::Graph>, OpenCtx) {
    let graph = strata_block::Graph::new();
    let ctx = OpenCtx::with_graph(
        strata_drivers::registry(),
        OpenFlags::default(),
        Arc::clone(&graph),
    );
    (graph, ctx)
}

/// Opens a node from its blockdev-add options.
async fn open_json(ctx: &OpenCtx, v: serde_json::Value) -> Arc<Node> {
    let o: Opts = serde_json::from_value(v).unwrap();
    ctx.open_image(None, None, o).await.unwrap()
}

/// blockdev-reopen of one node, on a task of its own so that the test can
/// watch it wait.
fn spawn_reopen(
    graph: &Arc<strata_block::Graph>,
    v: serde_json::Value,
) -> tokio::task::JoinHandle<strata_block::Result<()>> {
    let opts: Opts = serde_json::from_value(v).unwrap();
    let graph = Arc::clone(graph);
    tokio::spawn(async move { strata_block::reopen::reopen_multiple(&graph, vec![opts]).await })
}

/// Whether a request reached the blkdebug breakpoint `tag` below `node`
/// within ten seconds.
async fn wait_suspended(node: &Arc<Node>, tag: &str) -> bool {
    let suspended = || node.with_debug_hooks(|h| Ok(h.is_suspended(tag))).unwrap();
    for _ in 0..2000 {
        if suspended() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    suspended()
}

/// The race the reopen tests force: a guest write held at the blkdebug
/// breakpoint `write_aio` below `node`, then `reopen` of the node's
/// options, which must wait for it (`while_waiting` looks at the node
/// then), then a second write, which must wait at the drain; the held
/// write is let go and all three finish.
async fn reopen_between_writes(
    node: &Arc<Node>,
    graph: &Arc<strata_block::Graph>,
    guest: &Arc<Backend>,
    held: (u64, IoBuf),
    reopen: serde_json::Value,
    late: (u64, IoBuf),
    while_waiting: impl FnOnce(),
) {
    node.with_debug_hooks(|h| h.breakpoint("write_aio", "w"))
        .unwrap();
    let write = |(offset, buf): (u64, IoBuf)| {
        let g = Arc::clone(guest);
        tokio::spawn(async move { g.write(offset, buf, WriteFlags::default()).await.unwrap() })
    };
    let held = write(held);
    assert!(
        wait_suspended(node, "w").await,
        "the write did not reach its file"
    );
    let reopen = spawn_reopen(graph, reopen);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !reopen.is_finished(),
        "the reopen did not wait for the write"
    );
    while_waiting();
    let late = write(late);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!late.is_finished(), "a write went by the drain");
    node.with_debug_hooks(|h| h.resume("w")).unwrap();
    held.await.unwrap();
    reopen.await.unwrap().unwrap();
    late.await.unwrap();
}

#[test]
fn a_read_only_qcow2_becomes_writable_and_read_only_again() {
    let dir = tempdir("rw");
    let img = format!("{dir}/t.qcow2");
    if qemu("qemu-img", &["create", "-q", "-f", "qcow2", &img, "4M"]).is_none() {
        return;
    }
    qemu("qemu-io", &["-c", "write -P 1 0 64k", &img]);
    qemu("qemu-img", &["bitmap", "--add", &img, "b0"]);
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        let node = open_read_only(&img).await;
        assert!(!write_lock_held(&img));
        let e = node
            .write(0, IoBuf::filled(4096, 9), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), libc::EPERM);

        node.reopen_read_only(false).await.unwrap();
        assert!(!node.is_read_only());
        assert!(write_lock_held(&img), "a writable image holds the lock");
        assert_eq!(bitmap_flags(&img), r#"["in-use","auto"]"#);
        node.write(1 << 20, IoBuf::filled(65536, 2), WriteFlags::default())
            .await
            .unwrap();
        let b0 = node.bitmaps().find("b0").unwrap();
        assert_eq!(b0.count(), 65536, "the bitmap saw the write");

        node.reopen_read_only(true).await.unwrap();
        assert!(node.is_read_only());
        assert!(!write_lock_held(&img), "the lock went with the mode");
        // Written back, marked clean, the bitmap stored and no longer in use.
        qemu("qemu-img", &["check", "-U", &img]);
        assert_eq!(bitmap_flags(&img), r#"["auto"]"#);
        qemu("qemu-io", &["-U", "-r", "-c", "read -P 2 1M 64k", &img]);
        qemu("qemu-io", &["-U", "-r", "-c", "read -P 1 0 64k", &img]);
        node.close().await.unwrap();
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_node_with_a_writer_stays_writable() {
    let dir = tempdir("writer");
    let img = format!("{dir}/t.qcow2");
    if qemu("qemu-img", &["create", "-q", "-f", "qcow2", &img, "1M"]).is_none() {
        return;
    }
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        let node = common::open(&img, Some("qcow2")).await;
        let user = Backend::new(&node, "writer", Perm::WRITE, Perm::ALL).unwrap();
        let e = node.reopen_read_only(true).await.unwrap_err();
        assert!(
            e.to_string().contains("cannot support read-write users"),
            "{e}"
        );
        assert!(!node.is_read_only());
        user.close().await.unwrap();
        node.reopen_read_only(true).await.unwrap();
        node.close().await.unwrap();
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new backing file while the guest reads through the old one
/// (blockdev-reopen): a read held at a blkdebug breakpoint in the old
/// backing file holds the swap back, and returns the old data; a read that
/// comes while the swap waits is held at the drain and returns the new
/// data. No read ever sees half a swap.
#[test]
fn a_backing_file_swap_waits_for_reads_in_flight() {
    let dir = tempdir("swap");
    let p = |n: &str| format!("{dir}/{n}");
    if qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &p("b1.qcow2"), "1M"],
    )
    .is_none()
    {
        return;
    }
    qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &p("b2.qcow2"), "1M"],
    );
    qemu("qemu-io", &["-c", "write -P 0x11 0 64k", &p("b1.qcow2")]);
    qemu("qemu-io", &["-c", "write -P 0x22 0 64k", &p("b2.qcow2")]);
    let b1 = p("b1.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &b1,
            "-F",
            "qcow2",
            &p("top.qcow2"),
        ],
    );
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        let (graph, ctx) = graph_and_ctx();
        let open = |pairs: Vec<(&str, String)>| {
            let pairs: Vec<(String, String)> =
                pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let o = strata_block::options::nest(&pairs).unwrap();
            let ctx = ctx.clone();
            async move { ctx.open_image(None, None, o).await.unwrap() }
        };
        let b1 = open(vec![
            ("driver", "qcow2".into()),
            ("node-name", "b1".into()),
            ("read-only", "on".into()),
            ("file.driver", "blkdebug".into()),
            ("file.image.driver", "file".into()),
            ("file.image.filename", p("b1.qcow2")),
        ])
        .await;
        let b2 = open(vec![
            ("driver", "qcow2".into()),
            ("node-name", "b2".into()),
            ("read-only", "on".into()),
            ("file.driver", "file".into()),
            ("file.filename", p("b2.qcow2")),
        ])
        .await;
        let top = open(vec![
            ("driver", "qcow2".into()),
            ("node-name", "top".into()),
            ("file.driver", "file".into()),
            ("file.filename", p("top.qcow2")),
            ("backing", "b1".into()),
        ])
        .await;
        let guest =
            Arc::new(Backend::new(&top, "guest", Perm::CONSISTENT_READ, Perm::ALL).unwrap());
        b1.with_debug_hooks(|h| h.breakpoint("read_aio", "r"))
            .unwrap();
        let g = Arc::clone(&guest);
        let held = tokio::spawn(async move { g.read(0, IoBuf::zeroed(4096)).await.unwrap() });
        assert!(
            wait_suspended(&b1, "r").await,
            "the read did not reach its file"
        );
        let swap = spawn_reopen(
            &graph,
            serde_json::json!({
                "driver": "qcow2", "node-name": "top", "backing": "b2",
                "file": {"driver": "file", "filename": p("top.qcow2")}
            }),
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!swap.is_finished(), "the swap did not wait for the read");
        let g = Arc::clone(&guest);
        let late = tokio::spawn(async move { g.read(0, IoBuf::zeroed(4096)).await.unwrap() });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!late.is_finished(), "a read went by the drain");
        b1.with_debug_hooks(|h| h.resume("r")).unwrap();
        let old = held.await.unwrap();
        assert!(
            old.as_slice().iter().all(|&b| b == 0x11),
            "the held read saw the swap"
        );
        swap.await.unwrap().unwrap();
        let new = late.await.unwrap();
        assert!(
            new.as_slice().iter().all(|&b| b == 0x22),
            "the late read missed the swap"
        );
        assert_eq!(
            top.backing().map(|n| n.name().to_string()),
            Some("b2".into())
        );
        Arc::into_inner(guest).unwrap().close().await.unwrap();
        for n in [top, b1, b2] {
            n.close().await.unwrap();
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// `detect-zeroes` turned on while a guest write of zeroes is held at a
/// blkdebug breakpoint in the image's file: the reopen waits for the write,
/// which was issued before it and so lands as data; a write of zeroes that
/// comes while the reopen waits is held at the drain and then becomes a
/// zero cluster, as the new setting says.
#[test]
fn detect_zeroes_changes_only_between_writes() {
    let dir = tempdir("zeroes");
    let img = format!("{dir}/top.qcow2");
    if qemu("qemu-img", &["create", "-q", "-f", "qcow2", &img, "1M"]).is_none() {
        return;
    }
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        let (graph, ctx) = graph_and_ctx();
        let top = open_json(
            &ctx,
            serde_json::json!({
                "driver": "qcow2", "node-name": "top",
                "file": {"driver": "blkdebug", "node-name": "dbg",
                         "image": {"driver": "file", "filename": img}}
            }),
        )
        .await;
        let guest = Arc::new(Backend::new(&top, "guest", Perm::WRITE, Perm::ALL).unwrap());
        reopen_between_writes(
            &top,
            &graph,
            &guest,
            (0, IoBuf::zeroed(65536)),
            serde_json::json!({
                "driver": "qcow2", "node-name": "top", "detect-zeroes": "on", "file": "dbg"
            }),
            (256 << 10, IoBuf::zeroed(65536)),
            || {
                assert_eq!(top.detect_zeroes(), strata_block::DetectZeroes::Off);
            },
        )
        .await;
        assert_eq!(top.detect_zeroes(), strata_block::DetectZeroes::On);
        Arc::into_inner(guest).unwrap().close().await.unwrap();
        top.close().await.unwrap();
    });
    let map = qemu("qemu-img", &["map", "--output=json", &img]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let at = |off: u64| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["start"].as_u64().unwrap() <= off
                    && off < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()
            })
            .cloned()
            .unwrap()
    };
    assert_eq!(at(0)["data"], true, "the held write became zeroes: {map}");
    assert_eq!(
        at(256 << 10)["data"],
        false,
        "the late write was data: {map}"
    );
    assert_eq!(at(256 << 10)["zero"], true, "{map}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether this process's descriptor of `path` has O_DIRECT, as the kernel
/// shows it.
fn opened_direct(path: &str) -> bool {
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let e = e.unwrap();
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy() != path {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
        return u32::from_str_radix(flags.trim(), 8).unwrap() & libc::O_DIRECT as u32 != 0;
    }
    panic!("{path} is not open");
}

/// A raw disk's window moved and O_DIRECT switched on in one reopen while
/// a guest write is held at a blkdebug breakpoint in the file: the reopen
/// waits for the write, which lands where the old window said; an
/// unaligned write that comes while the reopen waits is held at the drain,
/// then lands where the new window says, made whole blocks for O_DIRECT.
#[test]
fn a_window_move_and_o_direct_wait_for_writes_in_flight() {
    let dir = tempdir("window");
    let img = format!("{dir}/disk.raw");
    if qemu("qemu-img", &["create", "-q", "-f", "raw", &img, "1M"]).is_none() {
        return;
    }
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        let (graph, ctx) = graph_and_ctx();
        let disk = open_json(
            &ctx,
            serde_json::json!({
                "driver": "raw", "node-name": "disk",
                "file": {"driver": "blkdebug", "node-name": "dbg",
                         "image": {"driver": "file", "filename": img}}
            }),
        )
        .await;
        let guest = Arc::new(Backend::new(&disk, "guest", Perm::WRITE, Perm::ALL).unwrap());
        reopen_between_writes(
            &disk,
            &graph,
            &guest,
            (0, IoBuf::from_slice(&[0x11; 4096])),
            serde_json::json!({
                "driver": "raw", "node-name": "disk", "offset": 65536,
                "cache": {"direct": true}, "file": "dbg"
            }),
            (3, IoBuf::from_slice(&[0x22; 1000])),
            || {
                assert!(!opened_direct(&img));
            },
        )
        .await;
        assert!(opened_direct(&img), "O_DIRECT is not on");
        assert_eq!(disk.length(), (1 << 20) - 65536);
        Arc::into_inner(guest).unwrap().close().await.unwrap();
        disk.close().await.unwrap();
    });
    let out = qemu(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 4096",
            "-c",
            "read -P 0 4096 61443",
            "-c",
            "read -P 0x22 65539 1000",
            "-c",
            "read -P 0 66539 4096",
            &img,
        ],
    )
    .unwrap();
    assert!(!out.contains("fail"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A qcow2 image moved onto another file (blockdev-reopen `file`) while a
/// guest write that allocates a cluster is held at a blkdebug breakpoint in
/// the old file: the swap waits for the write, whose data and mapping both
/// land in the old file; a write that comes while the swap waits is held at
/// the drain and lands in the new file, whose tables are read afresh. Both
/// images check clean.
#[test]
fn a_file_swap_under_qcow2_waits_for_writes_in_flight() {
    let dir = tempdir("file-swap");
    let (t1, t2) = (format!("{dir}/t1.qcow2"), format!("{dir}/t2.qcow2"));
    if qemu("qemu-img", &["create", "-q", "-f", "qcow2", &t1, "4M"]).is_none() {
        return;
    }
    std::fs::copy(&t1, &t2).unwrap();
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        let (graph, ctx) = graph_and_ctx();
        let f2 = open_json(
            &ctx,
            serde_json::json!({"driver": "file", "node-name": "f2", "filename": t2}),
        )
        .await;
        let top = open_json(
            &ctx,
            serde_json::json!({
                "driver": "qcow2", "node-name": "top",
                "file": {"driver": "blkdebug", "node-name": "dbg",
                         "image": {"driver": "file", "filename": t1}}
            }),
        )
        .await;
        let guest = Arc::new(Backend::new(&top, "guest", Perm::WRITE, Perm::ALL).unwrap());
        reopen_between_writes(
            &top,
            &graph,
            &guest,
            (0, IoBuf::filled(65536, 0x11)),
            serde_json::json!({
                "driver": "qcow2", "node-name": "top", "file": "f2"
            }),
            (1 << 20, IoBuf::filled(65536, 0x22)),
            || {},
        )
        .await;
        assert_eq!(
            top.child(strata_block::ChildRole::File)
                .map(|n| n.name().to_string()),
            Some("f2".into())
        );
        Arc::into_inner(guest).unwrap().close().await.unwrap();
        top.close().await.unwrap();
        f2.close().await.unwrap();
    });
    for (img, data, zero) in [(&t1, "0x11 0", "0 1M"), (&t2, "0x22 1M", "0 0")] {
        qemu("qemu-img", &["check", img]);
        let out = qemu(
            "qemu-io",
            &[
                "-r",
                "-c",
                &format!("read -P {data} 64k"),
                "-c",
                &format!("read -P {zero} 64k"),
                img,
            ],
        )
        .unwrap();
        assert!(!out.contains("fail"), "{img}: {out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
