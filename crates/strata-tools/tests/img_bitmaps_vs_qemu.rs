//! Persistent dirty bitmaps against QEMU's tools, both ways: bitmaps added
//! and fed by one tool's qemu-img and qemu-io are read by the other, their
//! bits as QEMU's NBD server exports them (`qemu:dirty-bitmap:NAME`), and
//! every image checks clean with qemu-img. Writes come many at a time, so
//! the bitmaps see requests in flight together.

use std::path::Path;
use std::process::Command;

mod img_support;

use img_support::{io, qemu_img, run, strata_as_qemu_img, QEMU_IMG};

/// Which tool does a step.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tool {
    Qemu,
    Strata,
}

fn img(t: Tool, dir: &Path) -> std::path::PathBuf {
    match t {
        Tool::Qemu => QEMU_IMG.into(),
        Tool::Strata => strata_as_qemu_img(dir),
    }
}

fn img_ok(t: Tool, dir: &Path, args: &[&str]) -> String {
    let (out, err, code) = run(&img(t, dir), args, dir);
    assert_eq!(code, 0, "{t:?} qemu-img {args:?}: {out}{err}");
    out
}

fn io_ok(t: Tool, dir: &Path, file: &str, cmds: &[&str]) {
    let prog = match t {
        Tool::Qemu => "/usr/bin/qemu-io",
        Tool::Strata => env!("CARGO_BIN_EXE_strata-io"),
    };
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    io(prog, dir, "qcow2", file, &cmds);
}

/// The dirty ranges of bitmap `name` as QEMU's own NBD server exports them
/// (a dirty range maps as not present).
fn dirty_ranges(dir: &Path, file: &str, name: &str) -> Vec<(u64, u64)> {
    let sock = dir.join("nbd.sock");
    let pid = dir.join("nbd.pid");
    let _ = std::fs::remove_file(&sock);
    let st = Command::new("/usr/bin/qemu-nbd")
        .args(["--fork", "-r", "-f", "qcow2", "-B", name, "-k"])
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid)
        .arg(dir.join(file))
        .status()
        .unwrap();
    assert!(st.success(), "qemu-nbd did not start");
    let spec = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let out = Command::new(QEMU_IMG)
        .args(["map", "--output=json", "--image-opts", &spec])
        .output()
        .unwrap();
    let pid = std::fs::read_to_string(&pid).unwrap();
    let _ = Command::new("kill").arg(pid.trim()).status();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["present"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// (name, granularity, flags) of the bitmaps `info --output=json` shows.
fn shown(t: Tool, dir: &Path, file: &str) -> Vec<(String, u64, Vec<String>)> {
    let out = img_ok(t, dir, &["info", "--output=json", file]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags = b["flags"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| f.as_str().unwrap().to_string())
                        .collect();
                    (
                        b["name"].as_str().unwrap().to_string(),
                        b["granularity"].as_u64().unwrap(),
                        flags,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn check_clean(dir: &Path, file: &str) {
    let (out, err, code) = run(QEMU_IMG.as_ref(), &["check", file], dir);
    assert_eq!(code, 0, "qemu-img check {file}: {out}{err}");
    assert!(!out.contains("leaked"), "{out}");
}

/// Many writes in flight at once (qemu-io's aio_write), then a flush.
const WRITES: [&str; 6] = [
    "aio_write -P 1 0 64k",
    "aio_write -P 2 1M 4k",
    "aio_write -P 3 3M 1M",
    "aio_write -P 4 9M 512",
    "aio_flush",
    "w -P 5 5M 64k",
];

#[test]
fn bitmaps_made_by_either_tool_are_read_right_by_the_other() {
    if qemu_img().is_none() {
        return;
    }
    for (maker, reader) in [(Tool::Qemu, Tool::Strata), (Tool::Strata, Tool::Qemu)] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        img_ok(maker, dir, &["create", "-f", "qcow2", "a.qcow2", "10M"]);
        img_ok(maker, dir, &["bitmap", "--add", "a.qcow2", "b0"]);
        img_ok(
            maker,
            dir,
            &["bitmap", "--add", "-g", "512k", "a.qcow2", "big"],
        );
        img_ok(
            maker,
            dir,
            &["bitmap", "--add", "--disable", "a.qcow2", "off"],
        );
        io_ok(maker, dir, "a.qcow2", &WRITES);
        check_clean(dir, "a.qcow2");
        // What QEMU exports of the maker's bitmaps.
        let want_b0 = dirty_ranges(dir, "a.qcow2", "b0");
        let want_big = dirty_ranges(dir, "a.qcow2", "big");
        assert_eq!(
            want_b0,
            vec![
                (0, 64 << 10),
                (1 << 20, 64 << 10),
                (3 << 20, 1 << 20),
                (5 << 20, 64 << 10),
                (9 << 20, 64 << 10)
            ],
            "{maker:?}"
        );
        assert!(dirty_ranges(dir, "a.qcow2", "off").is_empty());
        // Both tools show the same directory.
        assert_eq!(shown(reader, dir, "a.qcow2"), shown(maker, dir, "a.qcow2"));
        // The reader writes on (its bitmaps record), merges, and copies
        // them all into a new image.
        io_ok(
            reader,
            dir,
            "a.qcow2",
            &["aio_write -P 6 7M 4k", "aio_flush"],
        );
        img_ok(reader, dir, &["bitmap", "--merge", "b0", "a.qcow2", "off"]);
        img_ok(
            reader,
            dir,
            &["convert", "--bitmaps", "-O", "qcow2", "a.qcow2", "b.qcow2"],
        );
        for f in ["a.qcow2", "b.qcow2"] {
            check_clean(dir, f);
            let mut b0 = want_b0.clone();
            b0.insert(4, (7 << 20, 64 << 10));
            assert_eq!(dirty_ranges(dir, f, "b0"), b0, "{reader:?} {f}");
            assert_eq!(dirty_ranges(dir, f, "off"), b0, "{reader:?} {f}");
            let big = dirty_ranges(dir, f, "big");
            assert!(big.iter().any(|&(s, l)| s <= 7 << 20 && 7 << 20 < s + l));
            assert!(big.len() >= want_big.len().min(1));
            let names = shown(Tool::Qemu, dir, f);
            assert_eq!(
                names,
                vec![
                    ("b0".to_string(), 65536, vec!["auto".to_string()]),
                    ("big".to_string(), 512 << 10, vec!["auto".to_string()]),
                    ("off".to_string(), 65536, vec![]),
                ],
                "{reader:?} {f}"
            );
        }
        // Removing one frees its clusters: the image still checks clean.
        img_ok(reader, dir, &["bitmap", "--remove", "a.qcow2", "big"]);
        img_ok(maker, dir, &["bitmap", "--remove", "a.qcow2", "b0"]);
        check_clean(dir, "a.qcow2");
        assert_eq!(shown(maker, dir, "a.qcow2").len(), 1);
        assert_eq!(shown(reader, dir, "a.qcow2").len(), 1);
    }
}

#[test]
fn a_writer_killed_leaves_its_bitmaps_in_use_and_both_tools_refuse_to_trust_them() {
    if qemu_img().is_none() {
        return;
    }
    for killed in [Tool::Qemu, Tool::Strata] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        img_ok(Tool::Qemu, dir, &["create", "-f", "qcow2", "a.qcow2", "4M"]);
        img_ok(killed, dir, &["bitmap", "--add", "a.qcow2", "b0"]);
        let prog = match killed {
            Tool::Qemu => "/usr/bin/qemu-io",
            Tool::Strata => env!("CARGO_BIN_EXE_strata-io"),
        };
        let _ = Command::new(prog)
            .args(["-c", "w 0 4k", "-c", "abort", "a.qcow2"])
            .current_dir(dir)
            .output()
            .unwrap();
        for t in [Tool::Qemu, Tool::Strata] {
            assert_eq!(
                shown(t, dir, "a.qcow2"),
                vec![(
                    "b0".to_string(),
                    65536,
                    vec!["in-use".to_string(), "auto".to_string()]
                )],
                "{killed:?} killed, {t:?} reads"
            );
            let (_, err, code) = run(
                &img(t, dir),
                &["convert", "--bitmaps", "-O", "qcow2", "a.qcow2", "c.qcow2"],
                dir,
            );
            assert_eq!(code, 1, "{t:?}");
            assert!(
                err.contains("Cannot copy inconsistent bitmap 'b0'"),
                "{err}"
            );
            let (_, err, code) = run(&img(t, dir), &["bitmap", "--clear", "a.qcow2", "b0"], dir);
            assert_eq!(code, 1);
            assert!(
                err.contains("Operation clear on bitmap b0 failed: Bitmap 'b0' is inconsistent and cannot be used"),
                "{err}"
            );
        }
        // Removing it is what both advise; then a new one works again.
        img_ok(Tool::Strata, dir, &["bitmap", "--remove", "a.qcow2", "b0"]);
        img_ok(Tool::Strata, dir, &["bitmap", "--add", "a.qcow2", "b0"]);
        io_ok(Tool::Strata, dir, "a.qcow2", &["w 1M 4k"]);
        assert_eq!(
            dirty_ranges(dir, "a.qcow2", "b0"),
            vec![(1 << 20, 64 << 10)]
        );
        check_clean(dir, "a.qcow2");
    }
}

#[test]
fn bitmap_refusals_match_qemu_img() {
    if qemu_img().is_none() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    img_ok(Tool::Qemu, dir, &["create", "-f", "qcow2", "a.qcow2", "4M"]);
    img_ok(
        Tool::Qemu,
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "4M",
        ],
    );
    img_ok(Tool::Qemu, dir, &["create", "-f", "raw", "r.raw", "4M"]);
    img_ok(Tool::Qemu, dir, &["bitmap", "--add", "a.qcow2", "b0"]);
    let cases: &[&[&str]] = &[
        &["bitmap", "a.qcow2", "b0"],
        &["bitmap", "--remove", "-g", "64k", "a.qcow2", "b0"],
        &["bitmap", "--merge", "x", "-F", "qcow2", "a.qcow2", "b0"],
        &["bitmap", "--clear", "-b", "r.raw", "a.qcow2", "b0"],
        &["bitmap", "--add", "a.qcow2"],
        &["bitmap", "--add", "a.qcow2", "b0"],
        &["bitmap", "--add", "-g", "100", "a.qcow2", "b1"],
        &["bitmap", "--add", "-g", "4G", "a.qcow2", "b1"],
        &["bitmap", "--enable", "a.qcow2", "nope"],
        &["bitmap", "--add", "v2.qcow2", "b0"],
        &["bitmap", "--add", "-f", "raw", "r.raw", "b0"],
        &["convert", "--bitmaps", "-O", "raw", "a.qcow2", "out.raw"],
        &[
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "a.qcow2",
            "o.qcow2",
        ],
    ];
    for args in cases {
        let q = run(QEMU_IMG.as_ref(), args, dir);
        let s = run(&strata_as_qemu_img(dir), args, dir);
        // Auto node names differ between the tools.
        let norm = |t: &str| t.replace(|c: char| c.is_ascii_digit(), "N");
        assert_eq!((norm(&s.1), s.2), (norm(&q.1), q.2), "{args:?}");
        let _ = std::fs::remove_file(dir.join("out.raw"));
    }
}
