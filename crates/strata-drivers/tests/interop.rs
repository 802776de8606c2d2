//! Interop with QEMU's tools: images qemu-img and qemu-io make (every cluster
//! size and refcount width, compat 0.10 and 1.1, chains with relative
//! paths, zero clusters, compressed clusters with zlib and zstd) read right
//! through Strata; images Strata writes pass `qemu-img check` and read right
//! through QEMU.

mod common;

use strata_block::{EventLoop, IoBuf, WriteFlags};

/// Everything a node reads, from 0 to its length.
fn read_all(ev: &EventLoop, path: &str, fmt: &str) -> Vec<u8> {
    let node = ev.block_on(common::open(path, Some(fmt)));
    let len = node.length() as usize;
    let data = ev
        .block_on(node.read(0, IoBuf::zeroed(len)))
        .unwrap()
        .as_slice()
        .to_vec();
    ev.block_on(node.close()).unwrap();
    data
}

/// What QEMU reads from the image (via `qemu-img convert` to raw).
fn qemu_read_all(qemu_img: &str, dir: &std::path::Path, path: &str) -> Vec<u8> {
    let raw = dir.join("qemu-view.raw");
    let (code, out) = common::run(
        qemu_img,
        &["convert", "-O", "raw", path, &raw.to_string_lossy()],
    );
    assert_eq!(code, 0, "{out}");
    std::fs::read(raw).unwrap()
}

/// Writes a recognisable mix of data, zero and compressed clusters with qemu-io.
fn qemu_fill(qemu_io: &str, path: &str, cluster: u64, compressed: bool) {
    let c = cluster;
    let mut cmds = vec![
        format!("write -P 0x11 0 {}", 3 * c),
        format!("write -P 0x22 {} 777", 5 * c + 100),
        format!("write -z {} {}", c, c),
        format!("write -P 0x33 {} {}", 9 * c, 2 * c),
    ];
    if compressed {
        cmds.push(format!("write -c -P 0x44 {} {}", 12 * c, c));
        cmds.push(format!("write -c -P 0x55 {} {}", 13 * c, c));
    }
    let mut args: Vec<String> = Vec::new();
    for c in &cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(path.into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out) = common::run(qemu_io, &argv);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn qemu_images_of_every_geometry_read_right() {
    let (Some(qemu_img), Some(qemu_io)) =
        (common::qemu_tool("qemu-img"), common::qemu_tool("qemu-io"))
    else {
        return;
    };
    let ev = EventLoop::new().unwrap();
    for cluster in [512u64, 4096, 65536, 2 << 20] {
        for refcount in [1u32, 2, 4, 8, 16, 32, 64] {
            for compat in ["0.10", "1.1"] {
                if compat == "0.10" && refcount != 16 {
                    continue;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("q.qcow2").to_string_lossy().into_owned();
                let opts =
                    format!("cluster_size={cluster},refcount_bits={refcount},compat={compat}");
                let size = (cluster * 20).max(1 << 20).to_string();
                let (code, out) = common::run(
                    &qemu_img,
                    &["create", "-f", "qcow2", "-o", &opts, &path, &size],
                );
                assert_eq!(code, 0, "{out}");
                qemu_fill(&qemu_io, &path, cluster, true);
                let ours = read_all(&ev, &path, "qcow2");
                let theirs = qemu_read_all(&qemu_img, dir.path(), &path);
                assert!(ours == theirs, "contents differ for {opts}");
            }
        }
    }
}

#[test]
fn zstd_compressed_clusters_read_right() {
    let (Some(qemu_img), Some(qemu_io)) =
        (common::qemu_tool("qemu-img"), common::qemu_tool("qemu-io"))
    else {
        return;
    };
    let ev = EventLoop::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.qcow2").to_string_lossy().into_owned();
    let (code, out) = common::run(
        &qemu_img,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            &path,
            "4M",
        ],
    );
    assert_eq!(code, 0, "{out}");
    qemu_fill(&qemu_io, &path, 65536, true);
    assert!(read_all(&ev, &path, "qcow2") == qemu_read_all(&qemu_img, dir.path(), &path));
}

#[test]
fn chains_with_relative_backing_names() {
    let (Some(qemu_img), Some(qemu_io)) =
        (common::qemu_tool("qemu-img"), common::qemu_tool("qemu-io"))
    else {
        return;
    };
    let ev = EventLoop::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let base = dir.path().join("base.raw").to_string_lossy().into_owned();
    let mid = sub.join("mid.qcow2").to_string_lossy().into_owned();
    let top = sub.join("top.qcow2").to_string_lossy().into_owned();
    assert_eq!(
        common::run(&qemu_img, &["create", "-f", "raw", &base, "4M"]).0,
        0
    );
    assert_eq!(
        common::run(&qemu_io, &["-f", "raw", "-c", "write -P 1 0 4M", &base]).0,
        0
    );
    // Names relative to the image that holds them.
    assert_eq!(
        common::run(
            &qemu_img,
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "../base.raw",
                "-F",
                "raw",
                &mid
            ]
        )
        .0,
        0
    );
    assert_eq!(
        common::run(
            &qemu_io,
            &["-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k", &mid]
        )
        .0,
        0
    );
    assert_eq!(
        common::run(
            &qemu_img,
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                &top
            ]
        )
        .0,
        0
    );
    assert_eq!(
        common::run(
            &qemu_io,
            &["-c", "write -P 3 1M 4k", "-c", "write -P 4 3M 100k", &top]
        )
        .0,
        0
    );
    let ours = read_all(&ev, &top, "qcow2");
    assert!(ours == qemu_read_all(&qemu_img, dir.path(), &top));
    assert_eq!(
        ours[2 << 20],
        0,
        "a zero cluster in the middle hides the base"
    );
    assert_eq!(ours[0], 1);
}

#[test]
fn backing_loop_is_refused() {
    let Some(qemu_img) = common::qemu_tool("qemu-img") else {
        return;
    };
    let ev = EventLoop::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2").to_string_lossy().into_owned();
    let b = dir.path().join("b.qcow2").to_string_lossy().into_owned();
    assert_eq!(
        common::run(&qemu_img, &["create", "-f", "qcow2", &a, "1M"]).0,
        0
    );
    assert_eq!(
        common::run(
            &qemu_img,
            &["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", &b]
        )
        .0,
        0
    );
    assert_eq!(
        common::run(
            &qemu_img,
            &["rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", &a]
        )
        .0,
        0
    );
    let reg = strata_drivers::registry();
    let ctx = strata_block::OpenCtx::new(reg, strata_block::OpenFlags::default());
    let err = ev
        .block_on(ctx.open_image(Some(&b), None, Default::default()))
        .unwrap_err();
    assert!(err.to_string().contains("loop"), "{err}");
}

#[test]
fn strata_written_images_pass_qemu_check_and_read_right() {
    let (Some(qemu_img), Some(qemu_io)) =
        (common::qemu_tool("qemu-img"), common::qemu_tool("qemu-io"))
    else {
        return;
    };
    let ev = EventLoop::new().unwrap();
    for (cluster, refcount, compat) in [
        (512u64, 16u32, "0.10"),
        (4096, 1, "1.1"),
        (65536, 16, "1.1"),
        (65536, 64, "1.1"),
        (2 << 20, 8, "1.1"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.qcow2").to_string_lossy().into_owned();
        let cs = cluster.to_string();
        let rb = refcount.to_string();
        ev.block_on(common::create(
            &path,
            "qcow2",
            &[
                ("size", "8388608"),
                ("cluster_size", &cs),
                ("refcount_bits", &rb),
                ("compat", compat),
            ],
        ));
        let node = ev.block_on(common::open(&path, Some("qcow2")));
        ev.block_on(node.write(1000, IoBuf::filled(70_000, 0x5a), WriteFlags::default()))
            .unwrap();
        ev.block_on(node.write_zeroes(3 << 20, 1 << 20, WriteFlags::default()))
            .unwrap();
        ev.block_on(node.write(5 << 20, IoBuf::filled(3 << 20, 0x6b), WriteFlags::default()))
            .unwrap();
        ev.block_on(node.close()).unwrap();
        drop(node);
        let (code, out) = common::run(&qemu_img, &["check", &path]);
        assert_eq!(code, 0, "check {cluster}/{refcount}/{compat}: {out}");
        let (code, out) = common::run(
            &qemu_io,
            &[
                "-c",
                "read -P 0x5a 1000 70000",
                "-c",
                "read -P 0 0 1000",
                "-c",
                "read -P 0x6b 5M 3M",
                &path,
            ],
        );
        assert_eq!(code, 0, "{out}");
        assert!(
            !out.contains("fail"),
            "{cluster}/{refcount}/{compat}: {out}"
        );
    }
}
