//! The `qcow` (version 1) format against QEMU's tools: strata-img and
//! strata-io print what qemu-img and qemu-io print and leave the same
//! files; backing files, compressed and encrypted clusters read alike
//! either way; damaged headers get QEMU's words; concurrent writes into
//! one new cluster, held by blkdebug, keep all data.

mod img_support;
use img_support::{
    both, io_status as io, mutant_rounds, mutants_read_alike, qemu_img, run, strata_as_qemu_img,
    without_disk_usage, STRATA_IO,
};
use std::path::Path;
use std::process::Command;

const QEMU_IMG: &str = "/usr/bin/qemu-img";
const SECRET: &str = "secret,id=s0,data=abc";

fn same_files(q: &Path, s: &Path, f: &str) {
    let (a, b) = (
        std::fs::read(q.join(f)).unwrap(),
        std::fs::read(s.join(f)).unwrap(),
    );
    let d: Vec<usize> = (0..a.len().min(b.len()))
        .filter(|&i| a[i] != b[i])
        .collect();
    assert!(
        d.is_empty() && a.len() == b.len(),
        "{f}: {d:?} {} {}",
        a.len(),
        b.len()
    );
}

/// Output of qemu-img's `args` from both tools, QEMU's required.
fn same_img(q: &Path, s: &Path, args: &[&str]) {
    let strata = strata_as_qemu_img(s);
    let want = without_disk_usage(run(Path::new(QEMU_IMG), args, q));
    let got = without_disk_usage(run(&strata, args, s));
    assert_eq!(got, want, "qemu-img {args:?}");
}

#[test]
fn images_made_written_and_shown_as_qemu_does() {
    if qemu_img().is_none() {
        return;
    }
    let (q, s) = both(&[
        &["create", "-f", "qcow", "a.qcow", "10M"],
        &["create", "-f", "qcow", "-o", "help"],
        &["create", "-f", "raw", "base.raw", "3M"],
        &[
            "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", "b.qcow",
        ],
        &["create", "-f", "qcow", "-b", "base.raw", "n.qcow"],
        &[
            "create", "-f", "qcow", "-b", "base.raw", "-F", "nope", "n.qcow",
        ],
        &[
            "create",
            "--object",
            SECRET,
            "-f",
            "qcow",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s0",
            "c.qcow",
            "4M",
        ],
        &[
            "create",
            "--object",
            SECRET,
            "-f",
            "qcow",
            "-o",
            "encryption=on,encrypt.key-secret=s0",
            "d.qcow",
            "1M",
        ],
        // Refused after the file is made, as QEMU does.
        &["create", "-f", "qcow", "z.qcow", "0"],
        &[
            "create",
            "-f",
            "qcow",
            "-o",
            "encrypt.format=luks",
            "l.qcow",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow",
            "-o",
            "encrypt.format=aes",
            "k.qcow",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow",
            "-o",
            "encrypt.format=xts",
            "x.qcow",
            "1M",
        ],
        &["create", "-f", "qcow", "odd.qcow", "1000001"],
    ]);
    for f in [
        "a.qcow", "b.qcow", "c.qcow", "d.qcow", "z.qcow", "l.qcow", "odd.qcow",
    ] {
        same_files(q.path(), s.path(), f);
    }
    for dir in [q.path(), s.path()] {
        let (t, c) = io(
            "qemu-io",
            dir,
            &["-f", "raw", "base.raw"],
            &["write -P 9 0 3M"],
        );
        assert_eq!(c, 0, "{t}");
    }
    // Writes inside one cluster, across clusters and L2 tables, at odd
    // offsets; one at a time, so both tools place clusters alike.
    let writes = [
        "write -P 1 1536k 4k",
        "write -P 2 100 3000",
        "write -P 3 4000k 600k",
        "write -P 4 6M 8k",
        "write -z 64k 64k",
        "writev -P 5 9000k 512 1k 2k",
    ];
    let reads = [
        "read -P 2 100 3000",
        "read -P 0 0 100",
        "read -P 3 4000k 600k",
        "read -P 4 6M 8k",
        "read -P 0 8M 800k",
        "read -P 5 9000k 3584",
    ];
    for f in ["a.qcow", "b.qcow"] {
        let args = ["-f", "qcow", f];
        let (writes, reads) = if f == "b.qcow" {
            (
                &writes[..2],
                &["read -P 2 100 3000", "read -P 9 0 100", "read -P 9 3100 1M"][..],
            )
        } else {
            (&writes[..], &reads[..])
        };
        let want = io("qemu-io", q.path(), &args, writes);
        let got = io(STRATA_IO, s.path(), &args, writes);
        assert_eq!(got, want, "{f}");
        same_files(q.path(), s.path(), f);
        // Each tool reads what the other wrote.
        let want = io("qemu-io", s.path(), &args, reads);
        let got = io(STRATA_IO, q.path(), &args, reads);
        assert_eq!(got, want, "{f}");
        assert_eq!(got.1, 0, "{}", got.0);
    }
    // The encrypted image, written by each tool, read by the other.
    let spec = "driver=qcow,file.filename=c.qcow,encrypt.key-secret=s0";
    let ea = ["--object", SECRET, "--image-opts", spec];
    let (t, c) = io(
        STRATA_IO,
        s.path(),
        &ea,
        &["write -P 7 1000k 9k", "write -P 8 3M 4k"],
    );
    assert_eq!(c, 0, "{t}");
    let (t, c) = io(
        "qemu-io",
        q.path(),
        &ea,
        &["write -P 7 1000k 9k", "write -P 8 3M 4k"],
    );
    assert_eq!(c, 0, "{t}");
    same_files(q.path(), s.path(), "c.qcow");
    let r = ["read -P 7 1000k 9k", "read -P 8 3M 4k", "read -P 0 0 1000k"];
    assert_eq!(
        io("qemu-io", s.path(), &ea, &r),
        io(STRATA_IO, q.path(), &ea, &r)
    );
    for args in [
        &["info", "a.qcow"][..],
        &["info", "--output=json", "b.qcow"],
        &["info", "--backing-chain", "b.qcow"],
        &["info", "c.qcow"],
        &["info", "odd.qcow"],
        &["map", "--output=json", "a.qcow"],
        &["map", "--output=json", "b.qcow"],
        &["map", "a.qcow"],
        &["check", "a.qcow"],
        &["resize", "a.qcow", "20M"],
        &["rebase", "-u", "-b", "", "b.qcow"],
        &["convert", "-O", "qcow", "a.qcow", "ca.qcow"],
        &[
            "convert", "-O", "qcow", "-B", "base.raw", "-F", "raw", "b.qcow", "cb.qcow",
        ],
        &["compare", "a.qcow", "ca.qcow"],
        &["compare", "b.qcow", "cb.qcow"],
        &["commit", "b.qcow"],
        &["compare", "-f", "raw", "-F", "raw", "base.raw", "base.raw"],
        &["info", "b.qcow"],
        &["map", "--output=json", "b.qcow"],
    ] {
        same_img(q.path(), s.path(), args);
    }
    compressed_copy_succeeds(q.path(), s.path(), &["-O", "qcow", "a.qcow", "z1.qcow"]);
    same_img(q.path(), s.path(), &["compare", "a.qcow", "z1.qcow"]);
    same_img(q.path(), s.path(), &["map", "--output=json", "z1.qcow"]);
    same_files(q.path(), s.path(), "ca.qcow");
    same_files(q.path(), s.path(), "cb.qcow");
    same_files(q.path(), s.path(), "base.raw");
    same_files(q.path(), s.path(), "b.qcow");
}

/// `convert -c` with `args` by both tools. QEMU's ends its copy with an
/// empty compressed write, which its qcow driver refuses: qemu-img exits
/// 1, silently, having written everything. Strata takes the empty write
/// as the end it is and exits 0.
fn compressed_copy_succeeds(q: &Path, s: &Path, args: &[&str]) {
    let mut a = vec!["convert", "-c"];
    a.extend_from_slice(args);
    assert_eq!(
        run(Path::new(QEMU_IMG), &a, q),
        (String::new(), String::new(), 1)
    );
    assert_eq!(
        run(&strata_as_qemu_img(s), &a, s),
        (String::new(), String::new(), 0)
    );
}

/// Compressed images one tool wrote, read and partly overwritten by the
/// other: a write into a compressed cluster keeps the rest of it.
#[test]
fn compressed_clusters_read_and_rewritten_alike() {
    if qemu_img().is_none() {
        return;
    }
    let (q, s) = both(&[&["create", "-q", "-f", "raw", "src.raw", "5M"]]);
    let fill = [
        "write -P 1 0 1M",
        "write -P 2 1500k 700k",
        "write -P 3 4M 1000k",
    ];
    for dir in [q.path(), s.path()] {
        let (t, c) = io("qemu-io", dir, &["-f", "raw", "src.raw"], &fill);
        assert_eq!(c, 0, "{t}");
    }
    let strata = strata_as_qemu_img(s.path());
    compressed_copy_succeeds(
        q.path(),
        s.path(),
        &["-f", "raw", "-O", "qcow", "src.raw", "z.qcow"],
    );
    // Each tool's image, read by the other, then written into by it.
    let writes = ["write -P 7 1536 1k", "write -P 8 4100k 5k"];
    let reads = [
        "read -P 1 0 1536",
        "read -P 7 1536 1k",
        "read -P 1 2560 1021k",
        "read -P 2 1500k 700k",
        "read -P 3 4M 4k",
        "read -P 8 4100k 5k",
        "read -P 3 4105k 895k",
        "read -P 0 2200k 1848k",
    ];
    let args = ["-f", "qcow", "z.qcow"];
    for (writer, dir, reader) in [
        (STRATA_IO, q.path(), "qemu-io"),
        ("qemu-io", s.path(), STRATA_IO),
    ] {
        let (t, c) = io(writer, dir, &args, &writes);
        assert_eq!(c, 0, "{t}");
        let (t, c) = io(reader, dir, &args, &reads);
        assert!(
            c == 0 && !t.contains("verification failed"),
            "{reader}: {t}"
        );
    }
    for (dir, tool) in [(q.path(), QEMU_IMG.into()), (s.path(), strata.clone())] {
        let out = run(
            &tool,
            &["compare", "-f", "raw", "-F", "qcow", "src.raw", "z.qcow"],
            dir,
        );
        assert_eq!(out.2, 1, "{out:?}");
    }
}

/// A dir of its own with a 10 MiB qcow image `x.qcow` made by qemu-img.
fn fresh() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new(QEMU_IMG)
        .args(["create", "-q", "-f", "qcow", "x.qcow", "10M"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    dir
}

#[test]
fn damaged_headers_are_refused_in_qemus_words() {
    if qemu_img().is_none() {
        return;
    }
    // (where, bytes, what)
    let cases: &[(usize, &[u8], &str)] = &[
        (0, b"QFI\xfa", "magic"),
        (7, &[2], "version 2"),
        (7, &[9], "version 9"),
        (24, &[0; 8], "size 0"),
        (24, &[0, 0, 0, 0, 0, 0, 0, 1], "size 1"),
        (24, &[0xff; 8], "size past u64"),
        (24, &[0, 0x40, 0, 0, 0, 0, 0, 0], "size past int L1"),
        (32, &[8], "small clusters"),
        (32, &[17], "large clusters"),
        (33, &[5], "small tables"),
        (33, &[14], "large tables"),
        (36, &[0, 0, 0, 2], "crypt method"),
        (36, &[0, 0, 0, 1], "aes without a secret"),
        (
            40,
            &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0],
            "L1 out of reach",
        ),
        (40, &[0, 0, 0, 0, 0, 0x10, 0, 0], "L1 past the end"),
        (8, &[0, 0, 0, 0, 0, 0, 0, 48, 0, 0, 4, 0], "name too long"),
        (
            8,
            &[0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4],
            "name out of reach",
        ),
        (8, &[0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 4], "empty name"),
        (100, b"nope", "a name nothing points at"),
    ];
    for (at, bytes, what) in cases {
        let dir = fresh();
        let p = dir.path().join("x.qcow");
        let mut img = std::fs::read(&p).unwrap();
        img[*at..*at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&p, img).unwrap();
        for args in [&["info", "-f", "qcow", "x.qcow"][..], &["info", "x.qcow"]] {
            let want = run(Path::new(QEMU_IMG), args, dir.path());
            let got = run(&strata_as_qemu_img(dir.path()), args, dir.path());
            assert_eq!(got, want, "{what} {args:?}");
        }
    }
    // A backing file that is not there.
    let dir = fresh();
    let p = dir.path().join("x.qcow");
    let mut img = std::fs::read(&p).unwrap();
    img[8..20].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 100, 0, 0, 0, 4]);
    img[100..104].copy_from_slice(b"nope");
    std::fs::write(&p, img).unwrap();
    for args in [
        &["info", "x.qcow"][..],
        &["info", "-U", "--backing-chain", "x.qcow"],
    ] {
        let want = run(Path::new(QEMU_IMG), args, dir.path());
        let got = run(&strata_as_qemu_img(dir.path()), args, dir.path());
        assert_eq!(got, want, "{args:?}");
    }
    // Options that do not fit the header.
    for spec in [
        "driver=qcow,file.filename=x.qcow,encrypt.format=aes",
        "driver=qcow,file.filename=x.qcow,encrypt.format=luks",
    ] {
        let args = ["info", "--image-opts", spec];
        let want = run(Path::new(QEMU_IMG), &args, dir.path());
        let got = run(&strata_as_qemu_img(dir.path()), &args, dir.path());
        assert_eq!(got, want, "{spec}");
    }
}

/// Writes into one cluster that has none yet, and into others: the first
/// is held by blkdebug after choosing its place, before writing it. The
/// others wait, find the cluster placed and write into it; nothing is
/// lost, and QEMU reads every pattern.
#[test]
fn writes_racing_into_a_new_cluster_share_it() {
    if qemu_img().is_none() {
        return;
    }
    let dir = fresh();
    let patterns = [
        "read -P 0xa 0 1k",
        "read -P 0xd 1k 1k",
        "read -P 0 2k 2k",
        "read -P 0xb 1M 4k",
        "read -P 0xc 3M 4k",
        "read -P 0 4M 1M",
    ];
    let mut cmds = vec![
        "open -o driver=qcow blkdebug::x.qcow",
        "break cluster_alloc A",
        "aio_write -P 0xa 0 1k",
        "wait_break A",
        "aio_write -P 0xb 1M 4k",
        "aio_write -P 0xc 3M 4k",
        "aio_write -P 0xd 1k 1k",
        "resume A",
        "aio_flush",
    ];
    cmds.extend(patterns);
    let (t, c) = io(STRATA_IO, dir.path(), &[], &cmds);
    assert!(c == 0 && !t.contains("verification failed"), "{t}");
    let (t, c) = io("qemu-io", dir.path(), &["-f", "qcow", "x.qcow"], &patterns);
    assert!(c == 0 && !t.contains("verification failed"), "{t}");
    // The 560 bytes of header and L1, then two L2 tables and three
    // clusters of 4 KiB.
    let len = std::fs::metadata(dir.path().join("x.qcow")).unwrap().len();
    assert_eq!(len, 4096 + 2 * 4096 + 3 * 4096);
}

/// Headers, L1 and L2 tables changed at random: Strata refuses what QEMU
/// refuses, in its words, and reads the rest as QEMU reads it.
#[test]
fn mutated_images_are_refused_or_read_as_qemu_reads_them() {
    if qemu_img().is_none() {
        return;
    }
    let dir = fresh();
    let (t, c) = io(
        "qemu-io",
        dir.path(),
        &["-f", "qcow", "x.qcow"],
        &["write -P 1 0 64k", "write -P 2 3M 1M", "write -P 3 9M 512k"],
    );
    assert_eq!(c, 0, "{t}");
    // Header, L1 and the first L2 table.
    let (rounds, seed) = mutant_rounds();
    let image = ("qcow", "x.qcow");
    let read = mutants_read_alike(dir.path(), image, 8192, (rounds, seed), |_, _| {}, &[]);
    eprintln!("{read} of {rounds} mutants read");
    assert!(read > rounds / 10, "only {read} mutants were read");
}
