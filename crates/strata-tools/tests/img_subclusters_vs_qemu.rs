//! Extended L2 entries (subclusters) against QEMU's tools, both ways: the
//! same writes, zero writes, discards and compressed writes make the same
//! L2 tables, subcluster words included, whichever tool makes them; what
//! one tool writes the other reads; many writes in flight into the
//! subclusters of one cluster lose nothing; every image checks clean.

use std::path::Path;
use std::process::Command;

mod img_support;

use img_support::{qemu_img, run, QEMU_IMG};

const STRATA_IO: &str = env!("CARGO_BIN_EXE_strata-io");
const STRATA_IMG: &str = env!("CARGO_BIN_EXE_strata-img");

/// Runs an I/O tool's commands on `file` (`-f` first) and returns its output.
fn io(prog: &str, dir: &Path, fmt: &str, file: &str, cmds: &[String]) -> String {
    let mut a = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        a.push("-c".into());
        a.push(c.clone());
    }
    a.push(file.into());
    let out = Command::new(prog)
        .args(&a)
        .current_dir(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed"),
        "{prog} {cmds:?}: {text}"
    );
    text
}

fn img_ok(prog: &str, dir: &Path, args: &[&str]) -> String {
    let (out, err, code) = run(Path::new(prog), args, dir);
    assert_eq!(code, 0, "{prog} {args:?}: {out}{err}");
    out
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
    for with_backing in [false, true] {
        let mut tables = Vec::new();
        for (tag, img, io_prog) in [
            ("q", QEMU_IMG, "/usr/bin/qemu-io"),
            ("s", STRATA_IMG, STRATA_IO),
        ] {
            let file = format!("{tag}{with_backing}.qcow2");
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "extended_l2=on"];
            if with_backing {
                img_ok(
                    QEMU_IMG,
                    d,
                    &["create", "-q", "-f", "raw", "base.raw", "1M"],
                );
                io(
                    "/usr/bin/qemu-io",
                    d,
                    "raw",
                    "base.raw",
                    &["write -P 0xff 0 1M".into()],
                );
                args.extend_from_slice(&["-b", "base.raw", "-F", "raw"]);
            }
            args.extend_from_slice(&[&file, "1M"]);
            img_ok(img, d, &args);
            io(io_prog, d, "qcow2", &file, &workload());
            let out = img_ok(QEMU_IMG, d, &["check", &file]);
            assert!(out.contains("No errors were found"), "{out}");
            tables.push((file.clone(), first_l2_table(&d.join(&file))));
        }
        let ((qf, q), (sf, s)) = (&tables[0], &tables[1]);
        for (i, (a, b)) in q.chunks(16).zip(s.chunks(16)).enumerate() {
            assert_eq!(a, b, "L2 entry {i} differs (backing file: {with_backing})");
        }
        let out = img_ok(QEMU_IMG, d, &["compare", qf, sf]);
        assert!(out.contains("Images are identical"), "{out}");
        // Each tool maps the other's image as it maps its own.
        let qmap = img_ok(QEMU_IMG, d, &["map", "--output=json", sf]);
        let smap = img_ok(STRATA_IMG, d, &["map", "--output=json", sf]);
        assert_eq!(qmap, smap);
    }
}

#[test]
fn images_written_by_one_tool_read_right_with_the_other() {
    let Some(_) = qemu_img() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    img_ok(QEMU_IMG, d, &["create", "-q", "-f", "raw", "ref.raw", "1M"]);
    img_ok(
        QEMU_IMG,
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
    // QEMU writes, Strata writes over it, both write the reference.
    io("/usr/bin/qemu-io", d, "qcow2", "x.qcow2", &first);
    io("/usr/bin/qemu-io", d, "raw", "ref.raw", &first);
    io(STRATA_IO, d, "qcow2", "x.qcow2", &second);
    io("/usr/bin/qemu-io", d, "raw", "ref.raw", &second);
    for prog in [QEMU_IMG, STRATA_IMG] {
        let out = img_ok(
            prog,
            d,
            &["compare", "-f", "qcow2", "-F", "raw", "x.qcow2", "ref.raw"],
        );
        assert!(out.contains("Images are identical"), "{prog}: {out}");
    }
    let out = img_ok(QEMU_IMG, d, &["check", "x.qcow2"]);
    assert!(out.contains("No errors were found"), "{out}");
    let info = img_ok(STRATA_IMG, d, &["info", "x.qcow2"]);
    assert!(info.contains("extended l2: true"), "{info}");
}

#[test]
fn writes_in_flight_into_one_clusters_subclusters_lose_nothing() {
    let Some(_) = qemu_img() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    img_ok(
        QEMU_IMG,
        d,
        &["create", "-q", "-f", "raw", "base.raw", "1M"],
    );
    io(
        "/usr/bin/qemu-io",
        d,
        "raw",
        "base.raw",
        &["write -P 0xee 0 1M".into()],
    );
    img_ok(QEMU_IMG, d, &["create", "-q", "-f", "raw", "ref.raw", "1M"]);
    io(
        "/usr/bin/qemu-io",
        d,
        "raw",
        "ref.raw",
        &["write -P 0xee 0 1M".into()],
    );
    img_ok(
        STRATA_IMG,
        d,
        &[
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
        ],
    );
    // Every request touches part of one or two subclusters of the first
    // two clusters, many of them the same subclusters, all in flight at
    // once: the copy-on-write of one must not undo another.
    let mut reqs = Vec::new();
    for i in 0..64u64 {
        let off = i * 1900 + 300;
        let pat = i + 1;
        if i % 7 == 3 {
            reqs.push(format!("aio_write -z {off} 700"));
        } else {
            reqs.push(format!("aio_write -P {pat} {off} 1100"));
        }
    }
    let mut cmds = reqs.clone();
    cmds.push("aio_flush".into());
    io(STRATA_IO, d, "qcow2", "x.qcow2", &cmds);
    // The reference gets them one by one, in the same order: requests of
    // one batch that overlap may land in any order, so none here overlap.
    let serial: Vec<String> = reqs
        .iter()
        .map(|r| r.replacen("aio_write", "write", 1))
        .collect();
    io("/usr/bin/qemu-io", d, "raw", "ref.raw", &serial);
    let out = img_ok(
        QEMU_IMG,
        d,
        &["compare", "-f", "qcow2", "-F", "raw", "x.qcow2", "ref.raw"],
    );
    assert!(out.contains("Images are identical"), "{out}");
    let out = img_ok(QEMU_IMG, d, &["check", "x.qcow2"]);
    assert!(out.contains("No errors were found"), "{out}");
}
