//! Extended L2 entries (subclusters) against QEMU's tools, both ways: the
//! same writes, zero writes, discards and compressed writes make the same
//! L2 tables, subcluster words included, whichever tool makes them; what
//! one tool writes the other reads; many writes in flight into the
//! subclusters of one cluster lose nothing; every image checks clean.

use std::path::Path;

mod img_support;

use img_support::{io, qemu_img, run, strata_as_qemu_img, QEMU_IMG};

const STRATA_IO: &str = env!("CARGO_BIN_EXE_strata-io");
const QEMU_IO: &str = "/usr/bin/qemu-io";

/// Runs `qemu-img args` with `prog` (QEMU's, or Strata's under that name).
fn img_ok(prog: &Path, dir: &Path, args: &[&str]) -> String {
    let (out, err, code) = run(prog, args, dir);
    assert_eq!(code, 0, "{prog:?} {args:?}: {out}{err}");
    out
}

/// A raw image of `size` filled with `pattern` (or zeroes).
fn raw_image(dir: &Path, name: &str, size: &str, pattern: Option<u8>) {
    img_ok(
        Path::new(QEMU_IMG),
        dir,
        &["create", "-q", "-f", "raw", name, size],
    );
    if let Some(p) = pattern {
        io(
            QEMU_IO,
            dir,
            "raw",
            name,
            &[format!("write -P {p} 0 {size}")],
        );
    }
}

/// The first L2 table of a qcow2 image, as bytes.
fn first_l2_table(path: &Path) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    let be = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let cluster = 1usize << u32::from_be_bytes(b[20..24].try_into().unwrap());
    let l1 = be(40) as usize;
    let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(l2, 0, "{path:?} has no L2 table");
    b[l2..l2 + cluster].to_vec()
}

/// A mixed sequence over the first clusters of a 1 MiB disk (64 KiB
/// clusters, 2 KiB subclusters): partial and whole subclusters, requests
/// across clusters, zero writes with and without unmap, a discard, a
/// compressed cluster and writes over it.
fn workload() -> Vec<String> {
    [
        "write -P 1 0 1k",
        "write -P 2 3k 512",
        "write -P 3 6k 4k",
        "write -P 4 62k 4k",
        "write -z 70k 6k",
        "write -z 130k 1k",
        "write -P 5 128k 64k",
        "write -z -u 128k 32k",
        "write -P 6 200k 9k",
        "discard 192k 64k",
        "write -c -P 7 256k 64k",
        "write -P 8 257k 1k",
        "write -c -P 9 320k 64k",
        "write -z 336k 32k",
        "write -P 10 400k 30k",
        "write -z 401k 1k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn the_same_requests_make_the_same_subcluster_words_as_qemu() {
    let Some(_) = qemu_img() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let qemu = Path::new(QEMU_IMG);
    let strata = strata_as_qemu_img(d);
    raw_image(d, "base.raw", "1M", Some(0xff));
    for with_backing in [false, true] {
        let mut tables = Vec::new();
        for (tag, img, io_prog) in [("q", qemu, QEMU_IO), ("s", strata.as_path(), STRATA_IO)] {
            let file = format!("{tag}{with_backing}.qcow2");
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "extended_l2=on"];
            if with_backing {
                args.extend_from_slice(&["-b", "base.raw", "-F", "raw"]);
            }
            args.extend_from_slice(&[&file, "1M"]);
            img_ok(img, d, &args);
            io(io_prog, d, "qcow2", &file, &workload());
            let out = img_ok(qemu, d, &["check", &file]);
            assert!(out.contains("No errors were found"), "{out}");
            tables.push((file.clone(), first_l2_table(&d.join(&file))));
        }
        let ((qf, q), (sf, s)) = (&tables[0], &tables[1]);
        for (i, (a, b)) in q.chunks(16).zip(s.chunks(16)).enumerate() {
            assert_eq!(a, b, "L2 entry {i} differs (backing file: {with_backing})");
        }
        let out = img_ok(qemu, d, &["compare", qf, sf]);
        assert!(out.contains("Images are identical"), "{out}");
        // Each tool maps the image Strata wrote as the other does.
        let qmap = img_ok(qemu, d, &["map", "--output=json", sf]);
        let smap = img_ok(&strata, d, &["map", "--output=json", sf]);
        assert_eq!(qmap, smap);
    }
}

#[test]
fn images_written_by_one_tool_read_right_with_the_other() {
    let Some(_) = qemu_img() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let qemu = Path::new(QEMU_IMG);
    let strata = strata_as_qemu_img(d);
    raw_image(d, "ref.raw", "1M", None);
    img_ok(
        qemu,
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "x.qcow2",
            "1M",
        ],
    );
    let first: Vec<String> = (0..24)
        .map(|i| format!("write -P {} {}k 1536", i + 1, i * 5))
        .collect();
    let second: Vec<String> = (0..24)
        .map(|i| format!("write -P {} {}k 3k", i + 100, i * 7 + 1))
        .collect();
    // QEMU writes, Strata writes over it, the reference gets both.
    io(QEMU_IO, d, "qcow2", "x.qcow2", &first);
    io(QEMU_IO, d, "raw", "ref.raw", &first);
    io(STRATA_IO, d, "qcow2", "x.qcow2", &second);
    io(QEMU_IO, d, "raw", "ref.raw", &second);
    for prog in [qemu, strata.as_path()] {
        let args = ["compare", "-f", "qcow2", "-F", "raw", "x.qcow2", "ref.raw"];
        let out = img_ok(prog, d, &args);
        assert!(out.contains("Images are identical"), "{prog:?}: {out}");
    }
    let out = img_ok(qemu, d, &["check", "x.qcow2"]);
    assert!(out.contains("No errors were found"), "{out}");
    let info = img_ok(&strata, d, &["info", "x.qcow2"]);
    assert!(info.contains("extended l2: true"), "{info}");
}

#[test]
fn writes_in_flight_into_one_clusters_subclusters_lose_nothing() {
    let Some(_) = qemu_img() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let strata = strata_as_qemu_img(d);
    raw_image(d, "base.raw", "1M", Some(0xee));
    raw_image(d, "ref.raw", "1M", Some(0xee));
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "x.qcow2",
        "1M",
    ];
    img_ok(&strata, d, &args);
    // Every request touches part of one or two subclusters of the first
    // two clusters, many of them the same subclusters, all in flight at
    // once: the copy-on-write of one must not undo another. None overlap,
    // so the order they land in does not matter.
    let mut reqs = Vec::new();
    for i in 0..64u64 {
        let off = i * 1900 + 300;
        if i % 7 == 3 {
            reqs.push(format!("aio_write -z {off} 700"));
        } else {
            reqs.push(format!("aio_write -P {} {off} 1100", i + 1));
        }
    }
    let mut cmds = reqs.clone();
    cmds.push("aio_flush".into());
    io(STRATA_IO, d, "qcow2", "x.qcow2", &cmds);
    let serial: Vec<String> = reqs
        .iter()
        .map(|r| r.replacen("aio_write", "write", 1))
        .collect();
    io(QEMU_IO, d, "raw", "ref.raw", &serial);
    let qemu = Path::new(QEMU_IMG);
    let out = img_ok(
        qemu,
        d,
        &["compare", "-f", "qcow2", "-F", "raw", "x.qcow2", "ref.raw"],
    );
    assert!(out.contains("Images are identical"), "{out}");
    let out = img_ok(qemu, d, &["check", "x.qcow2"]);
    assert!(out.contains("No errors were found"), "{out}");
}
