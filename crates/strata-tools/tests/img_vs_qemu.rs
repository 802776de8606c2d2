//! strata-img against qemu-img: the same command on the same image prints
//! the same bytes and exits with the same code. Both run under the name
//! `qemu-img` (a symlink), since messages start with the program's name.

use std::path::Path;
use std::process::Command;

mod img_support;

use img_support::{qemu_img, run, strata_as_qemu_img};

/// Both tools, same arguments, same results (disk usage lines aside, which
/// depend on the filesystem's allocation of two different files).
fn same(dir: &Path, ours: &Path, args: &[&str]) {
    let theirs = Path::new("/usr/bin/qemu-img");
    let a = run(ours, args, dir);
    let b = run(theirs, args, dir);
    assert_eq!(a, b, "qemu-img {}", args.join(" "));
}

fn qemu_io(dir: &Path, args: &[&str]) {
    let out = Command::new("/usr/bin/qemu-io")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn info_map_check_compare_print_what_qemu_img_prints() {
    let Some(qi) = qemu_img() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    let q = |args: &[&str]| {
        assert!(Command::new(qi)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap()
            .status
            .success())
    };
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 1 0 128k",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "write -c -P 3 2M 64k",
            "-c",
            "write -z 3M 64k",
            "base.qcow2",
        ],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 5 64k 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "discard 0 64k",
            "top.qcow2",
        ],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4k",
        "v2.qcow2",
        "1M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=1,lazy_refcounts=on,compression_type=zstd",
        "v3.qcow2",
        "1G",
    ]);
    q(&["create", "-q", "-f", "raw", "r.raw", "1234"]);
    std::fs::write(dir.join("text.txt"), "hello, not an image\n").unwrap();
    for img in ["base.qcow2", "top.qcow2", "v2.qcow2", "v3.qcow2", "r.raw"] {
        same(dir, &ours, &["map", img]);
        same(dir, &ours, &["map", "--output=json", img]);
        same(dir, &ours, &["check", img]);
        same(dir, &ours, &["check", "--output=json", img]);
    }
    same(dir, &ours, &["compare", "base.qcow2", "top.qcow2"]);
    same(dir, &ours, &["compare", "top.qcow2", "top.qcow2"]);
    same(dir, &ours, &["compare", "-s", "v2.qcow2", "r.raw"]);
    same(dir, &ours, &["map", "-f", "raw", "base.qcow2"]);
    same(dir, &ours, &["info", "--output=xml", "base.qcow2"]);
    same(dir, &ours, &["info", "nonexistent.qcow2"]);
    same(dir, &ours, &["info", "-f", "qcow2", "text.txt"]);
    same(dir, &ours, &["check", "-r", "bogus", "base.qcow2"]);
    same(dir, &ours, &["compare", "base.qcow2"]);
    same(dir, &ours, &["check", "r.raw"]);
}

#[test]
fn create_prints_and_makes_what_qemu_img_does() {
    let Some(_) = qemu_img() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    let cases: &[&[&str]] = &[
        &["-f", "qcow2", "IMG", "64M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,refcount_bits=8",
            "IMG",
            "1G",
        ],
        &["-f", "qcow2", "-o", "compat=0.10", "IMG", "16M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "IMG",
            "16M",
        ],
        &["-f", "qcow2", "-o", "cluster_size=3000", "IMG", "16M"],
        &["-f", "qcow2", "-o", "lazy_refcounts=yes", "IMG", "16M"],
        &["-f", "qcow2", "-o", "compression_type=lz4", "IMG", "16M"],
        &["-f", "qcow2", "-o", "preallocation=metadata", "IMG", "3M"],
        &["-f", "qcow2", "-o", "bogus=1", "IMG", "16M"],
        &["-f", "qcow2", "-o", "cluster_size=abc", "IMG", "16M"],
        &["-f", "qcow2", "-F", "qcow2", "IMG", "1M"],
        &["-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "IMG"],
        &[
            "-f",
            "qcow2",
            "-u",
            "-b",
            "we,ird.qcow2",
            "-F",
            "qcow2",
            "IMG",
            "1G",
        ],
        &["-f", "raw", "IMG", "1234"],
        &["-f", "raw", "-o", "preallocation=full", "IMG", "1M"],
        &["-f", "raw", "-b", "x", "-F", "raw", "IMG", "1M"],
        &["-f", "qcow2", "IMG", "1Z"],
        &["-f", "qcow2", "IMG"],
        &["-f", "qcow2", "-o", "help"],
        &["-f", "raw", "-o", "help"],
        &["-f", "qcow2", "-o", "help", "IMG"],
    ];
    for (i, case) in cases.iter().enumerate() {
        let ours_img = format!("s{i}.img");
        let theirs_img = format!("q{i}.img");
        let ours_args: Vec<&str> = std::iter::once("create")
            .chain(
                case.iter()
                    .map(|a| if *a == "IMG" { ours_img.as_str() } else { a }),
            )
            .collect();
        let theirs_args: Vec<&str> = std::iter::once("create")
            .chain(
                case.iter()
                    .map(|a| if *a == "IMG" { theirs_img.as_str() } else { a }),
            )
            .collect();
        let a = run(&ours, &ours_args, dir);
        let b = run(Path::new("/usr/bin/qemu-img"), &theirs_args, dir);
        let norm = |s: String, name: &str| s.replace(name, "IMG");
        assert_eq!(
            (norm(a.0, &ours_img), norm(a.1, &ours_img), a.2),
            (norm(b.0, &theirs_img), norm(b.1, &theirs_img), b.2),
            "create {}",
            case.join(" ")
        );
        let (pa, pb) = (dir.join(&ours_img), dir.join(&theirs_img));
        if pa.exists() || pb.exists() {
            let (da, db) = (
                std::fs::read(&pa).unwrap_or_default(),
                std::fs::read(&pb).unwrap_or_default(),
            );
            // The backing file name differs with the image name; compare the rest.
            if !case.contains(&"-b") {
                assert!(da == db, "create {}: files differ", case.join(" "));
            }
        }
    }
}

/// Broken and hostile images: absurd table sizes, unaligned and far-away
/// offsets, truncation. Strata must fail (or report) exactly as qemu-img
/// does, without a panic or an allocation sized by the file.
#[test]
fn hostile_images_fail_like_qemu() {
    let Some(qi) = qemu_img() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    assert!(Command::new(qi)
        .args(["create", "-q", "-f", "qcow2", "good.qcow2", "64M"])
        .current_dir(dir)
        .output()
        .unwrap()
        .status
        .success());
    qemu_io(dir, &["-c", "write 0 1M", "good.qcow2"]);
    let good = std::fs::read(dir.join("good.qcow2")).unwrap();
    let be32 = |v: u32| v.to_be_bytes().to_vec();
    let be64 = |v: u64| v.to_be_bytes().to_vec();
    let patches: Vec<(&str, usize, Vec<u8>)> = vec![
        ("l1-size-absurd", 36, be32(0x7fff_ffff)),
        ("reftable-absurd", 56, be32(0x7fff_ffff)),
        ("l1-unaligned", 40, be64(0x12345)),
        ("size-huge", 24, be64(1 << 62)),
        ("l1-far-away", 40, be64(1 << 50)),
        ("l2-unaligned", 0x30000, be64((1 << 63) | 0x1234_5600)),
        ("header-length-huge", 100, be32(0x10_0000)),
        ("snapshots-unaligned", 60, [be32(5), be64(0x1000)].concat()),
        ("version-4", 4, be32(4)),
        ("cluster-bits-30", 20, be32(30)),
        ("unknown-feature", 72, be64(1 << 5)),
    ];
    let mut names = Vec::new();
    for (name, at, bytes) in &patches {
        let mut img = good.clone();
        img[*at..*at + bytes.len()].copy_from_slice(bytes);
        let file = format!("{name}.qcow2");
        std::fs::write(dir.join(&file), img).unwrap();
        names.push(file);
    }
    std::fs::write(dir.join("truncated.qcow2"), &good[..0x20000]).unwrap();
    std::fs::write(dir.join("tiny.qcow2"), &good[..50]).unwrap();
    names.push("truncated.qcow2".into());
    names.push("tiny.qcow2".into());
    for n in &names {
        same(dir, &ours, &["info", n]);
        same(dir, &ours, &["check", n]);
        same(dir, &ours, &["map", "--output=json", n]);
    }
}

/// A lazy-refcounts image left dirty by a crash (qemu-io's `abort`):
/// check reports, `-r leaks` refuses, `-r all` rebuilds the refcount
/// structure; outputs and repaired files match qemu-img's.
#[test]
fn dirty_lazy_refcounts_image_is_checked_and_repaired_like_qemu() {
    let Some(qi) = qemu_img() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    assert!(Command::new(qi)
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "lz.qcow2",
            "64M"
        ])
        .current_dir(dir)
        .output()
        .unwrap()
        .status
        .success());
    // abort kills qemu-io before it marks the image clean.
    let _ = Command::new("/usr/bin/qemu-io")
        .args([
            "-c",
            "write 0 64k",
            "-c",
            "write 1M 64k",
            "-c",
            "abort",
            "lz.qcow2",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    let dirty = std::fs::read(dir.join("lz.qcow2")).unwrap();
    for args in [
        &["check"][..],
        &["check", "-r", "leaks"],
        &["check", "-r", "all"],
        &["check", "--output=json", "-r", "all"],
    ] {
        std::fs::write(dir.join("a.qcow2"), &dirty).unwrap();
        let mut full: Vec<&str> = args.to_vec();
        full.push("a.qcow2");
        let a = run(&ours, &full, dir);
        let ours_file = std::fs::read(dir.join("a.qcow2")).unwrap();
        std::fs::write(dir.join("a.qcow2"), &dirty).unwrap();
        let b = run(Path::new("/usr/bin/qemu-img"), &full, dir);
        let theirs_file = std::fs::read(dir.join("a.qcow2")).unwrap();
        assert_eq!(a, b, "qemu-img {}", full.join(" "));
        assert!(
            ours_file == theirs_file,
            "repaired files differ after {}",
            full.join(" ")
        );
    }
}

/// resize grows and, with --shrink, shrinks like qemu-img: same messages,
/// same exit codes, byte-identical files.
#[test]
fn resize_matches_qemu_img() {
    let Some(qi) = qemu_img() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    assert!(Command::new(qi)
        .args(["create", "-q", "-f", "qcow2", "r.qcow2", "8M"])
        .current_dir(dir)
        .output()
        .unwrap()
        .status
        .success());
    qemu_io(dir, &["-c", "write -P 1 0 8M", "r.qcow2"]);
    let start = std::fs::read(dir.join("r.qcow2")).unwrap();
    for args in [
        &["resize", "r.qcow2", "+1M"][..],
        &["resize", "r.qcow2", "3M"],
        &["resize", "--shrink", "r.qcow2", "3M"],
        &["resize", "-f", "qcow2", "r.qcow2", "1G"],
        &["resize", "r.qcow2"],
    ] {
        std::fs::write(dir.join("r.qcow2"), &start).unwrap();
        let a = run(&ours, args, dir);
        let ours_file = std::fs::read(dir.join("r.qcow2")).unwrap();
        std::fs::write(dir.join("r.qcow2"), &start).unwrap();
        let b = run(Path::new("/usr/bin/qemu-img"), args, dir);
        let theirs_file = std::fs::read(dir.join("r.qcow2")).unwrap();
        assert_eq!(a, b, "qemu-img {}", args.join(" "));
        assert!(
            ours_file == theirs_file,
            "files differ after {}",
            args.join(" ")
        );
    }
}

/// Internal snapshots made by qemu-img: info lists them and check counts
/// their clusters as qemu-img does; Strata's writes copy shared clusters
/// and leave every snapshot intact.
#[test]
fn images_with_internal_snapshots() {
    let Some(qi) = qemu_img() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    let q = |args: &[&str]| {
        assert!(
            Command::new(qi)
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap()
                .status
                .success(),
            "{args:?}"
        )
    };
    q(&["create", "-q", "-f", "qcow2", "sn.qcow2", "4M"]);
    qemu_io(dir, &["-c", "write -P 1 0 1M", "sn.qcow2"]);
    q(&["snapshot", "-c", "s1", "sn.qcow2"]);
    qemu_io(dir, &["-c", "write -P 2 0 64k", "sn.qcow2"]);
    q(&["snapshot", "-c", "snap-two", "sn.qcow2"]);
    for args in [
        &["info", "sn.qcow2"][..],
        &["info", "--output=json", "sn.qcow2"],
        &["check", "sn.qcow2"],
        &["check", "--output=json", "sn.qcow2"],
        &["map", "sn.qcow2"],
    ] {
        same(dir, &ours, args);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_strata-io"))
        .args([
            "-c",
            "write -P 9 0 128k",
            "-c",
            "write -z 512k 64k",
            "-c",
            "discard 768k 64k",
            "sn.qcow2",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let check = Command::new(qi)
        .args(["check", "sn.qcow2"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    qemu_io(
        dir,
        &[
            "-c",
            "read -P 9 0 128k",
            "-c",
            "read -P 1 128k 384k",
            "sn.qcow2",
        ],
    );
    q(&["snapshot", "-a", "s1", "sn.qcow2"]);
    let read = Command::new("/usr/bin/qemu-io")
        .args(["-c", "read -P 1 0 1M", "sn.qcow2"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&read.stdout).contains("verification"),
        "snapshot s1 damaged"
    );
}

/// One run of a snapshot scenario with `prog` as qemu-img: what each step
/// printed, and after each step what qemu-img check, map and info (dates
/// aside, which differ from run to run) say of the image.
fn snapshot_transcript(prog: &Path, dir: &Path, create: &[&str], steps: &[&[&str]]) -> Vec<String> {
    let qi = Path::new("/usr/bin/qemu-img");
    let img = "s.qcow2";
    let _ = std::fs::remove_file(dir.join(img));
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(create);
    args.extend_from_slice(&[img, "4M"]);
    assert_eq!(run(qi, &args, dir).2, 0);
    let mut log = Vec::new();
    for step in steps {
        if step[0] == "io" {
            // Guest writes between the snapshot commands, by qemu-io.
            let mut a: Vec<&str> = Vec::new();
            for c in &step[1..] {
                a.extend_from_slice(&["-c", c]);
            }
            a.push(img);
            let out = Command::new("/usr/bin/qemu-io")
                .args(&a)
                .current_dir(dir)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(!text.contains("fail"), "{step:?}: {text}");
            log.push(format!(
                "io {step:?}: {}",
                text.lines()
                    .filter(|l| l.starts_with("read") || l.starts_with("Pattern"))
                    .collect::<Vec<_>>()
                    .join("|")
            ));
            continue;
        }
        // The image goes last, or where the step says IMG.
        let mut a: Vec<&str> = step
            .iter()
            .map(|&x| if x == "IMG" { img } else { x })
            .collect();
        if !step.contains(&"IMG") {
            a.push(img);
        }
        let (out, err, code) = run(prog, &a, dir);
        // The DATE column of snapshot lists (tags are short here).
        let out: Vec<String> = out
            .lines()
            .map(|l| match l.get(34..53) {
                Some(d) if l.starts_with(|c: char| c.is_ascii_digit()) => l.replace(d, "DATE"),
                _ => l.to_string(),
            })
            .collect();
        log.push(format!("{step:?}: {out:?} {err:?} {code}"));
        for q in [&["check", "--output=json"][..], &["map", "--output=json"]] {
            let mut qa = q.to_vec();
            qa.push(img);
            log.push(format!("{q:?}: {:?}", run(qi, &qa, dir)));
        }
        let info = run(qi, &["info", "--output=json", img], dir).0;
        let mut v: serde_json::Value = serde_json::from_str(&info).unwrap();
        // Disk usage depends on the filesystem's allocation of the file.
        v.as_object_mut().unwrap().remove("actual-size");
        if let Some(f) = v.pointer_mut("/children/0/info") {
            f.as_object_mut().unwrap().remove("actual-size");
        }
        if let Some(s) = v.get_mut("snapshots").and_then(|s| s.as_array_mut()) {
            for sn in s {
                let o = sn.as_object_mut().unwrap();
                o.remove("date-sec");
                o.remove("date-nsec");
            }
        }
        log.push(format!("info: {v}"));
    }
    log
}

/// qemu-img snapshot -c/-a/-d/-l: the same messages, exit codes and
/// images (check, map, info) as qemu-img's, and the data of every
/// snapshot comes back when applied: normal, compressed and zero clusters,
/// a snapshot of a larger disk, version 2 and small clusters.
#[test]
fn snapshot_commands_do_what_qemu_img_does() {
    if qemu_img().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    let theirs = Path::new("/usr/bin/qemu-img");
    let steps: &[&[&str]] = &[
        &[
            "io",
            "write -P 0xa 4k 4k",
            "write -c -P 3 1M 64k",
            "write -z 2M 64k",
        ],
        &["snapshot", "-c", "sn1"],
        &["snapshot", "-c", "sn1"],
        &[
            "io",
            "write -P 0xc 4k 4k",
            "discard 1M 64k",
            "write -P 5 3M 8k",
        ],
        &["snapshot", "-c", "sn2"],
        &["snapshot", "-l"],
        &["io", "write -P 0xe 4k 4k"],
        &["snapshot", "-a", "sn1"],
        &[
            "io",
            "read -P 0xa 4k 4k",
            "read -P 3 1M 64k",
            "read -P 0 3M 8k",
        ],
        &["snapshot", "-d", "1"],
        &["snapshot", "-d", "sn1"],
        &["snapshot", "-a", "3"],
        &[
            "io",
            "read -P 0xc 4k 4k",
            "read -P 0 1M 64k",
            "read -P 5 3M 8k",
        ],
        &["snapshot", "-a", "nope"],
        &["snapshot", "-d", "nope"],
        &["snapshot", "-l", "-c", "x"],
        &["snapshot", "-U", "-c", "x"],
        &["resize", "IMG", "8M"],
        &["io", "write -P 7 6M 64k"],
        &["snapshot", "-a", "sn1"],
        &["io", "read -P 0xa 4k 4k"],
        &["snapshot", "-d", "sn2"],
        &["snapshot", "-d", "sn1"],
        // printf pads a UTF-8 tag by bytes.
        &["snapshot", "-c", "日本"],
        &["snapshot"],
    ];
    for create in [&[][..], &["-o", "compat=0.10"], &["-o", "cluster_size=512"]] {
        // Version 2 images cannot be resized with snapshots: skip that part.
        let steps: Vec<&[&str]> = if create.len() == 2 && create[1] == "compat=0.10" {
            steps
                .iter()
                .filter(|s| s[0] != "resize" && !s.iter().any(|a| a.contains("6M")))
                .copied()
                .collect()
        } else {
            steps.to_vec()
        };
        let a = snapshot_transcript(&ours, dir, create, &steps);
        let b = snapshot_transcript(theirs, dir, create, &steps);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x, y, "with {create:?}");
        }
        assert_eq!(a.len(), b.len());
    }
}

#[test]
fn dd_copies_and_answers_as_qemu_img() {
    if qemu_img().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    let theirs = Path::new("/usr/bin/qemu-img");
    run(
        theirs,
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
        dir,
    );
    qemu_io(
        dir,
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 5 0 64k",
            "-c",
            "write -P 6 512k 4k",
            "a.qcow2",
        ],
    );
    let cases: &[&[&str]] = &[
        &["if=a.qcow2", "of=o.raw"],
        // count limits the input from its start, then skip moves it.
        &[
            "-f",
            "qcow2",
            "if=a.qcow2",
            "of=o.raw",
            "bs=64k",
            "count=3",
            "skip=2",
        ],
        &["if=a.qcow2", "of=o.raw", "bs=512", "count=3", "skip=1"],
        &["if=a.qcow2", "of=o.raw", "bs=1.5k", "count=2"],
        &["if=a.qcow2", "of=o.raw", "count=0"],
        &["-U", "if=a.qcow2", "of=o.raw", "bs=4k", "count=2"],
        &["-O", "qcow2", "if=a.qcow2", "of=o.qcow2", "bs=4k"],
        &[
            "--output-format=qcow2",
            "if=a.qcow2",
            "of=o.qcow2",
            "skip=3",
            "bs=300k",
        ],
        &[
            "--image-opts",
            "if=driver=qcow2,file.filename=a.qcow2",
            "of=o.raw",
            "count=1",
        ],
        // Skipping past the end: a complaint, an empty output, success.
        &["if=a.qcow2", "of=o.raw", "skip=100000"],
        // Bad operands and options.
        &["if=a.qcow2"],
        &["if=a.qcow2", "of=o.raw", "bs=0"],
        &["if=a.qcow2", "of=o.raw", "bs=1x"],
        &["if=a.qcow2", "of=o.raw", "bs=3G"],
        &["if=a.qcow2", "of=o.raw", "count=-1"],
        &["if=a.qcow2", "of=o.raw", "count=1k"],
        &["if=a.qcow2", "of=o.raw", "skip=x"],
        &["if=a.qcow2", "of=o.raw", "foo=1"],
        &["if=a.qcow2", "of=o.raw", "junk"],
        &["-O", "foo", "if=a.qcow2", "of=o.raw"],
        &["if=nope", "of=o.raw"],
        &["if=a.qcow2", "of=/nonexistent/o.raw"],
        &["--image-opts", "-f", "qcow2", "if=a.qcow2", "of=o.raw"],
        &["-X", "if=a.qcow2", "of=o.raw"],
        &["-O"],
        &["--help"],
    ];
    for case in cases {
        let mut args = vec!["dd"];
        args.extend_from_slice(case);
        let mut outputs = Vec::new();
        for prog in [theirs, ours.as_path()] {
            let answer = run(prog, &args, dir);
            let mut files = Vec::new();
            for name in ["o.raw", "o.qcow2"] {
                let path = dir.join(name);
                if let Ok(bytes) = std::fs::read(&path) {
                    files.push((name, bytes));
                    std::fs::remove_file(&path).unwrap();
                }
            }
            outputs.push((answer, files));
        }
        // The same messages and code, and the same image, byte for byte.
        assert!(
            outputs[0] == outputs[1],
            "qemu-img {}: {:?}",
            args.join(" "),
            outputs[1].0
        );
    }
}

#[test]
fn measure_answers_as_qemu_img() {
    if qemu_img().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    let theirs = Path::new("/usr/bin/qemu-img");
    let setup: &[&[&str]] = &[
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["create", "-q", "-f", "raw", "sp.raw", "10M"],
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "5M",
        ],
    ];
    for args in setup {
        assert_eq!(run(theirs, args, dir).2, 0);
    }
    qemu_io(
        dir,
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 5 0 64k",
            "-c",
            "write 512k 4k",
            "a.qcow2",
        ],
    );
    qemu_io(
        dir,
        &["-f", "qcow2", "-c", "write -P 1 700k 8k", "top.qcow2"],
    );
    qemu_io(
        dir,
        &[
            "-f",
            "raw",
            "-c",
            "write 1M 100k",
            "-c",
            "write -z 3M 64k",
            "sp.raw",
        ],
    );
    assert_eq!(run(theirs, &["snapshot", "-c", "s1", "a.qcow2"], dir).2, 0);
    let cases: &[&str] = &[
        "--size 1G -O qcow2",
        "--size 1G",
        "--size 1000 -O qcow2",
        "--size 0 -O qcow2",
        "-O qcow2 a.qcow2",
        "-O raw a.qcow2",
        "a.qcow2",
        "--output=json -O qcow2 a.qcow2",
        "--output=json --size 1G",
        "--output=json -O qcow2 -o cluster_size=4k,preallocation=metadata --size 10G",
        "-O qcow2 -o compat=0.10 a.qcow2",
        "-O qcow2 -o preallocation=full a.qcow2",
        "-O qcow2 -o preallocation=falloc --size 3G",
        "-O qcow2 -o backing_file=x a.qcow2",
        "-O qcow2 -o refcount_bits=1 --size 1G",
        "-O qcow2 -o refcount_bits=64,cluster_size=512 --size 1G",
        "-O qcow2 -o cluster_size=4k -o refcount_bits=64 --size 1G",
        "--options cluster_size=2M --target-format qcow2 --size 100T",
        // Block status through a backing chain, and of a sparse raw file.
        "-O qcow2 top.qcow2",
        "-O qcow2 -o cluster_size=4k sp.raw",
        "-O raw sp.raw",
        // A v2 source has no bitmaps to count.
        "-O qcow2 v2.qcow2",
        "-O qcow2 -l s1 a.qcow2",
        "-O qcow2 --snapshot snapshot.name=s1 a.qcow2",
        "-O qcow2 -U a.qcow2",
        "--image-opts driver=qcow2,file.filename=a.qcow2 -O qcow2",
        // Errors.
        "-O qcow2 -o preallocation=bogus --size 3G",
        "-O qcow2 -o refcount_bits=3 --size 1G",
        "-O qcow2 -o refcount_bits=8,compat=0.10 --size 1G",
        "-O qcow2 -o extended_l2=on,cluster_size=8k --size 1G",
        "-O qcow2 --size 100T -o cluster_size=512",
        "-O qcow2 -l nope a.qcow2",
        "-O qcow2 -l snapshot.bad=1 a.qcow2",
        "-O qcow2 -o foo=1 --size 1G",
        "-O qcow2 -o cluster_size=3k --size 1G",
        "-O foo --size 1G",
        "--output=xml --size 1G",
        "-f qcow2 --size 1G",
        "a b",
        "--size 1G a.qcow2",
        "--size 1x",
        "",
        "-O qcow2 nope.qcow2",
        "-s 1G",
        "--help",
    ];
    for case in cases {
        let mut args = vec!["measure"];
        args.extend(case.split_whitespace());
        let a = run(&ours, &args, dir);
        let b = run(theirs, &args, dir);
        assert_eq!(a, b, "qemu-img {}", args.join(" "));
    }
}

#[test]
fn refcount_width_changes_keep_every_cluster_and_check_clean_in_qemu() {
    let Some(q) = qemu_img() else { return };
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let ours = strata_as_qemu_img(dir);
    // Small clusters, so the refcount structure spans several blocks, with
    // a snapshot (references of 2) and compressed clusters sharing hosts.
    let ok = |prog: &Path, args: &[&str]| {
        let (o, e, c) = run(prog, args, dir);
        assert_eq!(c, 0, "{args:?}: {o}{e}");
        o
    };
    let qp = Path::new(q);
    ok(
        qp,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "a.qcow2",
            "4M",
        ],
    );
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -c -P 2 2M 64k",
            "a.qcow2",
        ],
    );
    ok(qp, &["snapshot", "-c", "s1", "a.qcow2"]);
    ok(qp, &["convert", "-O", "raw", "a.qcow2", "snap.raw"]);
    qemu_io(dir, &["-c", "write -P 3 512k 1M", "a.qcow2"]);
    ok(qp, &["convert", "-O", "raw", "a.qcow2", "want.raw"]);
    for bits in ["64", "8", "16", "32"] {
        let o = format!("refcount_bits={bits}");
        ok(&ours, &["amend", "-o", &o, "a.qcow2"]);
        let info = ok(qp, &["info", "a.qcow2"]);
        assert!(info.contains(&format!("refcount bits: {bits}")), "{info}");
        let check = ok(qp, &["check", "a.qcow2"]);
        assert!(check.contains("No errors were found"), "{bits}: {check}");
        ok(
            qp,
            &["compare", "-f", "qcow2", "-F", "raw", "a.qcow2", "want.raw"],
        );
        ok(
            qp,
            &["convert", "-l", "s1", "-O", "raw", "a.qcow2", "s1.raw"],
        );
        ok(
            qp,
            &["compare", "-f", "raw", "-F", "raw", "s1.raw", "snap.raw"],
        );
    }
    // A width too small for the snapshot's references: both refuse alike.
    same(dir, &ours, &["amend", "-o", "refcount_bits=2", "a.qcow2"]);
}

/// A snapshot table of 900 entries (about 72 KB, more than one read
/// window of the table reader), written by qemu-storage-daemon: listed,
/// shown and checked as qemu-img does, and one entry from the middle
/// deleted as qemu-img deletes it.
#[test]
fn a_long_snapshot_table_reads_as_qemu_reads_it() {
    let Some(qi) = qemu_img() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    let img = dir.join("many.qcow2");
    let st = Command::new(qi)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    let mut qmp = String::from("{\"execute\":\"qmp_capabilities\"}\n");
    for i in 0..900 {
        qmp += &format!(
            "{{\"execute\":\"blockdev-snapshot-internal-sync\",\"arguments\":{{\"device\":\"d\",\"name\":\"snapshot-{i}\"}}}}\n"
        );
    }
    qmp += "{\"execute\":\"quit\"}\n";
    let mut qsd = Command::new("/usr/bin/qemu-storage-daemon")
        .args(["--chardev", "stdio,id=m", "--monitor", "m", "--blockdev"])
        .arg(format!(
            "driver=qcow2,node-name=d,file.driver=file,file.filename={}",
            img.display()
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon is needed for this test");
    std::io::Write::write_all(&mut qsd.stdin.take().unwrap(), qmp.as_bytes()).unwrap();
    assert!(qsd.wait().unwrap().success());
    for args in [
        &["snapshot", "-l", "many.qcow2"][..],
        &["info", "--output=json", "many.qcow2"],
        &["check", "many.qcow2"],
    ] {
        same(dir, &ours, args);
    }
    let (_, _, code) = run(
        &ours,
        &["snapshot", "-d", "snapshot-500", "many.qcow2"],
        dir,
    );
    assert_eq!(code, 0);
    let (list, _, _) = run(Path::new(qi), &["snapshot", "-l", "many.qcow2"], dir);
    assert_eq!(list.lines().count(), 2 + 899);
    assert!(!list.contains("snapshot-500 "));
    let (out, _, code) = run(Path::new(qi), &["check", "many.qcow2"], dir);
    assert_eq!(code, 0, "{out}");
}
