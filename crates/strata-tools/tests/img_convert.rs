//! `strata-img convert` against `qemu-img convert`: the same command in two
//! copies of one folder of images prints the same bytes, exits with the same
//! code and, where QEMU is deterministic, leaves the same image file byte
//! for byte. Both tools run under the name `qemu-img` (a symlink), since
//! messages start with the program's name.

use std::path::{Path, PathBuf};
use std::process::Command;

const QEMU_IMG: &str = "/usr/bin/qemu-img";
const QEMU_IO: &str = "/usr/bin/qemu-io";

fn have_qemu() -> bool {
    if Path::new(QEMU_IMG).exists() && Path::new(QEMU_IO).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "qemu-img and qemu-io are required under CI"
    );
    eprintln!("skipped: qemu-img not found");
    false
}

/// A folder with `qemu-img` linked to strata-img.
fn strata_bin(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("qemu-img");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_strata-img"), &link).unwrap();
    bin
}

/// Runs a command in `dir`, requiring success.
fn sh(dir: &Path, prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{prog} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// stdout, stderr and exit code of `qemu-img args` run from `bin` (or the
/// real one) in `dir`.
fn run(bin: Option<&Path>, dir: &Path, args: &[&str]) -> (String, String, i32) {
    let path = match bin {
        Some(b) => format!("{}:/usr/bin:/bin", b.display()),
        None => "/usr/bin:/bin".into(),
    };
    let out = Command::new("qemu-img")
        .env("PATH", path)
        .env_remove("RUST_BACKTRACE")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The images every test starts from, made by QEMU's tools.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    images: PathBuf,
    bin: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let images = root.join("images");
        std::fs::create_dir_all(&images).unwrap();
        let bin = strata_bin(&root);
        let d = images.as_path();
        let img = |a: &[&str]| sh(d, QEMU_IMG, a);
        let io = |a: &[&str]| sh(d, QEMU_IO, a);
        img(&["create", "-q", "-f", "raw", "src.raw", "64M"]);
        io(&[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 30M",
            "-c",
            "write -P 2 40M 20M",
            "-c",
            "write -P 3 63M 4k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -P 0 2M 8k",
            "src.raw",
        ]);
        img(&["create", "-q", "-f", "raw", "small.raw", "1M"]);
        io(&["-f", "raw", "-c", "write -P 4 0 512k", "small.raw"]);
        img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
        io(&[
            "-c",
            "write -P 5 0 8M",
            "-c",
            "write -P 6 32M 1M",
            "base.qcow2",
        ]);
        img(&[
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
        io(&[
            "-c",
            "write -P 7 1M 64k",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -z -u 6M 128k",
            "-c",
            "write -P 8 50M 3M",
            "-c",
            "discard 32M 64k",
            "top.qcow2",
        ]);
        img(&["convert", "-c", "-O", "qcow2", "src.raw", "comp.qcow2"]);
        img(&["create", "-q", "-f", "qcow2", "short.qcow2", "16M"]);
        io(&["-c", "write -P 9 15M 1M", "short.qcow2"]);
        img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "short.qcow2",
            "-F",
            "qcow2",
            "over.qcow2",
            "32M",
        ]);
        io(&["-c", "write -P 10 20M 64k", "over.qcow2"]);
        // Small clusters with data apart: compressed output must round
        // the areas to its own (larger) clusters.
        img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "c4k.qcow2",
            "8M",
        ]);
        io(&[
            "-c",
            "write -P 11 16k 4k",
            "-c",
            "write -P 12 52k 4k",
            "-c",
            "write -P 13 7M 4k",
            "c4k.qcow2",
        ]);
        img(&["create", "-q", "-f", "qcow2", "small.qcow2", "512k"]);
        img(&["create", "-q", "-f", "qcow2", "empty.qcow2", "64M"]);
        img(&["create", "-q", "-f", "raw", "empty.raw", "64M"]);
        std::fs::write(
            d.join("rerr.cfg"),
            "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n",
        )
        .unwrap();
        std::fs::write(
            d.join("werr.cfg"),
            "[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\n",
        )
        .unwrap();
        Fixture {
            _tmp: tmp,
            root,
            images,
            bin,
        }
    }

    /// Runs `qemu-img args` with both tools, each in a fresh copy of the
    /// images; requires the same output and exit code and returns the two
    /// folders (Strata's, QEMU's).
    fn both(&self, args: &[&str]) -> (PathBuf, PathBuf) {
        let ours = self.root.join("ours");
        let theirs = self.root.join("theirs");
        copy_dir(&self.images, &ours);
        copy_dir(&self.images, &theirs);
        let a = run(Some(&self.bin), &ours, args);
        let b = run(None, &theirs, args);
        assert_eq!(a, b, "qemu-img {}", args.join(" "));
        (ours, theirs)
    }

    /// As [`Fixture::both`], then the file `out` must be the same bytes.
    fn same_image(&self, out: &str, args: &[&str]) -> PathBuf {
        let (ours, theirs) = self.both(args);
        let a = std::fs::read(ours.join(out)).unwrap();
        let b = std::fs::read(theirs.join(out)).unwrap();
        assert!(a == b, "{out} differs after qemu-img {}", args.join(" "));
        ours
    }
}

/// `qemu-img compare` of two images in `dir` says they are identical.
fn identical(dir: &Path, a: &str, b: &str) {
    let (out, err, code) = run(None, dir, &["compare", "-U", a, b]);
    assert_eq!(code, 0, "compare {a} {b}: {out}{err}");
}

/// `qemu-img check` finds nothing wrong.
fn clean(dir: &Path, img: &str) {
    let (out, err, code) = run(None, dir, &["check", img]);
    assert_eq!(code, 0, "check {img}: {out}{err}");
}

#[test]
fn raw_to_qcow2_and_back_as_qemu_img_writes_them() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let d = f.same_image("o.qcow2", &["convert", "-O", "qcow2", "src.raw", "o.qcow2"]);
    identical(&d, "src.raw", "o.qcow2");
    clean(&d, "o.qcow2");
    let d = f.same_image("o.raw", &["convert", "src.raw", "o.raw"]);
    identical(&d, "src.raw", "o.raw");
    f.same_image(
        "o.qcow2",
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "src.raw",
            "o.qcow2",
        ],
    );
    f.same_image(
        "o.qcow2",
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "src.raw",
            "o.qcow2",
        ],
    );
    f.same_image(
        "o.qcow2",
        &[
            "convert", "-O", "qcow2", "-m", "1", "-q", "src.raw", "o.qcow2",
        ],
    );
    f.same_image(
        "o.qcow2",
        &[
            "convert", "-O", "qcow2", "-m", "16", "-T", "none", "src.raw", "o.qcow2",
        ],
    );
}

#[test]
fn qcow2_chains_compressed_and_zero_clusters_convert_as_qemu_img_converts_them() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let d = f.same_image("o.raw", &["convert", "top.qcow2", "o.raw"]);
    identical(&d, "top.qcow2", "o.raw");
    let d = f.same_image(
        "o.qcow2",
        &["convert", "-O", "qcow2", "top.qcow2", "o.qcow2"],
    );
    identical(&d, "top.qcow2", "o.qcow2");
    clean(&d, "o.qcow2");
    let d = f.same_image("o.raw", &["convert", "-f", "qcow2", "comp.qcow2", "o.raw"]);
    identical(&d, "src.raw", "o.raw");
    let d = f.same_image(
        "o.qcow2",
        &["convert", "-O", "qcow2", "comp.qcow2", "o.qcow2"],
    );
    identical(&d, "src.raw", "o.qcow2");
    f.same_image(
        "o.qcow2",
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "top.qcow2",
            "o.qcow2",
        ],
    );
    // A backing file shorter than its overlay.
    let d = f.same_image(
        "o.qcow2",
        &["convert", "-O", "qcow2", "over.qcow2", "o.qcow2"],
    );
    identical(&d, "over.qcow2", "o.qcow2");
}

#[test]
fn compressed_output_as_qemu_img_writes_it() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    // One worker: QEMU's parallel workers place compressed clusters in
    // whatever order they finish.
    let d = f.same_image(
        "o.qcow2",
        &[
            "convert", "-c", "-m", "1", "-O", "qcow2", "src.raw", "o.qcow2",
        ],
    );
    identical(&d, "src.raw", "o.qcow2");
    clean(&d, "o.qcow2");
    let d = f
        .both(&["convert", "-c", "-O", "qcow2", "src.raw", "p.qcow2"])
        .0;
    identical(&d, "src.raw", "p.qcow2");
    clean(&d, "p.qcow2");
    let d = f.same_image(
        "q.qcow2",
        &[
            "convert",
            "-c",
            "-m",
            "1",
            "-O",
            "qcow2",
            "c4k.qcow2",
            "q.qcow2",
        ],
    );
    identical(&d, "c4k.qcow2", "q.qcow2");
    // Into an image not known to read as zeroes: zero clusters are written
    // as zeroes, not compressed.
    let d = f.same_image(
        "empty.qcow2",
        &[
            "convert",
            "-n",
            "-c",
            "-m",
            "1",
            "-O",
            "qcow2",
            "src.raw",
            "empty.qcow2",
        ],
    );
    identical(&d, "src.raw", "empty.qcow2");
    clean(&d, "empty.qcow2");
}

#[test]
fn backing_file_of_the_target_keeps_what_it_supplies_unallocated() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let args = [
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "o.qcow2",
    ];
    let d = f.same_image("o.qcow2", &args);
    identical(&d, "top.qcow2", "o.qcow2");
    clean(&d, "o.qcow2");
    let (_, _, code) = run(None, &d, &["compare", "-U", "o.qcow2", "base.qcow2"]);
    assert_eq!(code, 1, "the overlay differs from its base");
    let args = [
        "convert",
        "-O",
        "qcow2",
        "-o",
        "backing_file=short.qcow2,backing_fmt=qcow2",
        "over.qcow2",
        "o.qcow2",
    ];
    let d = f.same_image("o.qcow2", &args);
    identical(&d, "over.qcow2", "o.qcow2");
}

#[test]
fn into_existing_images_with_n() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let d = f.same_image(
        "empty.qcow2",
        &["convert", "-n", "-O", "qcow2", "src.raw", "empty.qcow2"],
    );
    identical(&d, "src.raw", "empty.qcow2");
    clean(&d, "empty.qcow2");
    // Over old data: zero ranges must be written as zeroes.
    let d = f.same_image(
        "top.qcow2",
        &["convert", "-n", "-O", "qcow2", "src.raw", "top.qcow2"],
    );
    identical(&d, "src.raw", "top.qcow2");
    let d = f.same_image("empty.raw", &["convert", "-n", "top.qcow2", "empty.raw"]);
    identical(&d, "top.qcow2", "empty.raw");
    f.same_image(
        "empty.raw",
        &["convert", "-n", "--target-is-zero", "src.raw", "empty.raw"],
    );
    f.both(&["convert", "-n", "-O", "qcow2", "src.raw", "small.qcow2"]);
    f.both(&["convert", "-n", "src.raw", "small.raw"]);
}

#[test]
fn iotest_089_convert_line() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let bin = strata_bin(d);
    sh(d, QEMU_IMG, &["create", "-q", "-f", "raw", "base", "64M"]);
    sh(
        d,
        QEMU_IO,
        &["-f", "raw", "-c", "write -P 42 0 512", "base"],
    );
    sh(d, QEMU_IMG, &["create", "-q", "-f", "qcow2", "t", "64M"]);
    let r = run(
        Some(&bin),
        d,
        &["convert", "-f", "raw", "-O", "qcow2", "-n", "base", "t"],
    );
    assert_eq!(r, (String::new(), String::new(), 0));
    sh(d, QEMU_IO, &["-c", "read -P 42 0 512", "t"]);
    clean(d, "t");
}

#[test]
fn several_sources_are_concatenated() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let d = f.same_image(
        "o.qcow2",
        &[
            "convert",
            "-O",
            "qcow2",
            "small.raw",
            "top.qcow2",
            "src.raw",
            "o.qcow2",
        ],
    );
    clean(&d, "o.qcow2");
    f.same_image(
        "o.raw",
        &["convert", "src.raw", "small.raw", "top.qcow2", "o.raw"],
    );
}

#[test]
fn sparse_sizes() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    for s in ["0", "512", "64k", "1.5k"] {
        let d = f.same_image(
            "o.qcow2",
            &["convert", "-S", s, "-O", "qcow2", "top.qcow2", "o.qcow2"],
        );
        identical(&d, "top.qcow2", "o.qcow2");
        f.same_image("o.raw", &["convert", "-S", s, "src.raw", "o.raw"]);
    }
}

#[test]
fn progress_is_printed_as_qemu_img_prints_it() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    f.same_image(
        "o.qcow2",
        &["convert", "-p", "-O", "qcow2", "src.raw", "o.qcow2"],
    );
    f.same_image("o.raw", &["convert", "-p", "top.qcow2", "o.raw"]);
    f.both(&["convert", "-p", "-q", "src.raw", "o.raw"]);
    f.both(&["convert", "-p", "nonexistent", "o.raw"]);
    // Rebase counts its own steps, amend the format's: the same lines.
    f.both(&["rebase", "-p", "-b", "", "top.qcow2"]);
    f.both(&["amend", "-p", "-o", "compat=0.10", "top.qcow2"]);
}

#[test]
fn read_and_write_errors() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    f.both(&["convert", "-f", "raw", "blkdebug:rerr.cfg:src.raw", "o.raw"]);
    f.both(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "blkdebug:rerr.cfg:src.raw",
        "o.qcow2",
    ]);
    f.both(&[
        "convert",
        "--salvage",
        "-f",
        "raw",
        "blkdebug:rerr.cfg:small.raw",
        "o.raw",
    ]);
    f.both(&[
        "convert",
        "-q",
        "--salvage",
        "-f",
        "raw",
        "blkdebug:rerr.cfg:small.raw",
        "o.raw",
    ]);
    f.both(&["convert", "-n", "src.raw", "blkdebug:werr.cfg:empty.raw"]);
    f.both(&[
        "convert",
        "-p",
        "-n",
        "-S",
        "0",
        "src.raw",
        "blkdebug:werr.cfg:empty.raw",
    ]);
    f.both(&[
        "convert",
        "-n",
        "--target-image-opts",
        "src.raw",
        "driver=raw,file.driver=blkdebug,file.config=werr.cfg,file.image.filename=empty.raw",
    ]);
    f.both(&["convert", "nonexistent", "o.raw"]);
    f.both(&["convert", "src.raw", "nonexistent", "o.raw"]);
}

#[test]
fn usage_errors_as_qemu_img_reports_them() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let cases: &[&[&str]] = &[
        &["convert"],
        &["convert", "src.raw"],
        &["convert", "-Z", "src.raw", "o"],
        &["convert", "-O"],
        &["convert", "--foo", "src.raw", "o"],
        &["convert", "--out=raw", "src.raw", "o"],
        &["convert", "--help"],
        &["convert", "-h"],
        &["convert", "-n", "-o", "cluster_size=4k", "src.raw", "o"],
        &["convert", "--target-is-zero", "src.raw", "o"],
        &["convert", "--target-image-opts", "src.raw", "o"],
        &["convert", "--skip-broken-bitmaps", "src.raw", "o"],
        &["convert", "--bitmaps", "src.raw", "src.raw", "o"],
        &["convert", "--bitmaps", "src.raw", "o"],
        &["convert", "-C", "-c", "src.raw", "o"],
        &["convert", "-C", "-S", "4k", "src.raw", "o"],
        &["convert", "-C", "--salvage", "src.raw", "o"],
        &["convert", "-c", "src.raw", "o"],
        &["convert", "-n", "-c", "src.raw", "empty.raw"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "preallocation=full",
            "src.raw",
            "o",
        ],
        &["convert", "-S", "100", "src.raw", "o"],
        &["convert", "-S", "foo", "src.raw", "o"],
        &["convert", "-S", "-1k", "src.raw", "o"],
        &["convert", "-S", "8E", "src.raw", "o"],
        &["convert", "-S", "17M", "src.raw", "o"],
        &["convert", "-m", "17", "src.raw", "o"],
        &["convert", "-m", "x", "src.raw", "o"],
        &["convert", "-m", "09", "src.raw", "o"],
        &["convert", "-r", "-5", "src.raw", "o"],
        &["convert", "-r", "1x", "src.raw", "o"],
        &["convert", "-T", "bogus", "src.raw", "o"],
        &["convert", "-t", "bogus", "src.raw", "o"],
        &["convert", "-O", "bogus", "src.raw", "o"],
        &["convert", "-O", "blkdebug", "src.raw", "o"],
        &["convert", "-O", "null-co", "src.raw", "o"],
        &["convert", "-o", "", "src.raw", "o"],
        &["convert", "-o", "a,", "src.raw", "o"],
        &["convert", "-O", "qcow2", "-o", "foo=bar", "src.raw", "o"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=abc",
            "src.raw",
            "o",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "src.raw",
            "o",
        ],
        &["convert", "-B", "base.qcow2", "src.raw", "o"],
        &["convert", "-F", "qcow2", "src.raw", "o"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "o",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "src.raw",
            "src.raw",
            "o",
        ],
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-B",
            "x",
            "-O",
            "qcow2",
            "src.raw",
            "empty.qcow2",
        ],
        &["convert", "-l", "snap", "src.raw", "o"],
        &["convert", "-l", "snapshot.foo=s", "src.raw", "o"],
        &["convert", "-l", "nosuch", "top.qcow2", "o"],
        &["convert", "-l", "nosuch", "top.qcow2", "top.qcow2", "o"],
        &["convert", "-O", "qcow2", "-o", "help"],
        &["convert", "-o", "help"],
        &["convert", "-o", "help", "src.raw", "o"],
        &["convert", "-O", "qcow2", "-o", "?", "src.raw", "o"],
        &["convert", "-n", "src.raw", "small.qcow2"],
    ];
    for args in cases {
        f.both(args);
    }
}

#[test]
fn rate_limit_and_cache_modes_copy_the_same_image() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    f.same_image(
        "o.qcow2",
        &["convert", "-r", "1G", "-O", "qcow2", "small.raw", "o.qcow2"],
    );
    f.same_image(
        "o.qcow2",
        &[
            "convert",
            "-t",
            "writethrough",
            "-O",
            "qcow2",
            "small.raw",
            "o.qcow2",
        ],
    );
    f.same_image(
        "o.qcow2",
        &["convert", "-U", "-C", "-O", "qcow2", "src.raw", "o.qcow2"],
    );
    // Out-of-order writes allocate in any order: only the content is fixed.
    let (d, _) = f.both(&[
        "convert", "-W", "-m", "16", "-O", "qcow2", "src.raw", "o.qcow2",
    ]);
    identical(&d, "src.raw", "o.qcow2");
    clean(&d, "o.qcow2");
}

#[test]
fn rate_limit_holds_writes_back() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let bin = strata_bin(d);
    sh(d, QEMU_IMG, &["create", "-q", "-f", "raw", "six.raw", "6M"]);
    sh(
        d,
        QEMU_IO,
        &["-f", "raw", "-c", "write -P 1 0 6M", "six.raw"],
    );
    let t = std::time::Instant::now();
    let r = run(Some(&bin), d, &["convert", "-r", "4M", "six.raw", "o.raw"]);
    assert_eq!(r.2, 0, "{r:?}");
    // Three 2 MiB writes at 4 MiB/s, the first one free: at least 0.8 s.
    assert!(t.elapsed().as_secs_f64() > 0.7, "{:?}", t.elapsed());
    identical(d, "six.raw", "o.raw");
}

#[test]
fn progress_as_json_lines_counts_the_bytes_copied() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    sh(
        dir,
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "src.qcow2", "64M"],
    );
    // 24 MiB of data in three runs, the rest unallocated.
    for w in ["write 0 8M", "write 20M 8M", "write 50M 8M"] {
        sh(dir, QEMU_IO, &["-c", w, "src.qcow2"]);
    }
    let bin = strata_bin(dir);
    let (out, err, code) = run(
        Some(&bin),
        dir,
        &[
            "convert",
            "--progress=json",
            "-O",
            "raw",
            "src.qcow2",
            "dst.raw",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "", "nothing on stdout");
    assert!(json_progress(&err, 24 << 20) > 10, "{err}");
    // Any other format name is refused.
    let (_, err, code) = run(
        Some(&bin),
        dir,
        &[
            "convert",
            "--progress=xml",
            "-O",
            "raw",
            "src.qcow2",
            "x.raw",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("Invalid progress format 'xml'"), "{err}");
}

/// Checks `--progress=json` lines on stderr: each a JSON object, `done`
/// never going back, `total` always `total`, from 0 to `total`. Returns
/// how many lines there were.
fn json_progress(err: &str, total: u64) -> usize {
    let lines: Vec<(u64, u64)> = err
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            (v["done"].as_u64().unwrap(), v["total"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(lines.first(), Some(&(0, total)), "{err}");
    assert_eq!(lines.last(), Some(&(total, total)), "{err}");
    assert!(
        lines.windows(2).all(|w| w[0].0 < w[1].0 && w[1].1 == total),
        "{err}"
    );
    lines.len()
}

#[test]
fn progress_as_json_lines_for_commit_rebase_and_amend() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    sh(
        dir,
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
    );
    let overlay = || {
        sh(
            dir,
            QEMU_IMG,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        );
        for w in ["write 0 8M", "write 32M 3M"] {
            sh(dir, QEMU_IO, &["-c", w, "top.qcow2"]);
        }
    };
    let bin = strata_bin(dir);
    let strata = |args: &[&str]| {
        let (out, err, code) = run(Some(&bin), dir, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        (out, err)
    };
    // Commit counts the 11 MiB allocated above the base.
    overlay();
    let (out, err) = strata(&["commit", "--progress=json", "top.qcow2"]);
    assert_eq!(out, "Image committed.\n");
    assert!(json_progress(&err, 11 << 20) > 5, "{err}");
    // Rebase onto nothing walks the whole disk.
    overlay();
    let (out, err) = strata(&["rebase", "--progress=json", "-b", "", "top.qcow2"]);
    assert_eq!(out, "");
    assert!(json_progress(&err, 64 << 20) > 5, "{err}");
    // Amend reports the format's steps (here, downgrading a v3 image).
    let (_, err) = strata(&["amend", "--progress=json", "-o", "compat=0.10", "top.qcow2"]);
    json_progress(&err, 1);
    for sub in [
        &["commit", "top.qcow2"][..],
        &["rebase", "-u", "-b", "", "top.qcow2"],
        &["amend", "-o", "compat=1.1", "top.qcow2"],
    ] {
        let mut args = vec![sub[0], "--progress=xml"];
        args.extend_from_slice(&sub[1..]);
        let (_, err, code) = run(Some(&bin), dir, &args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains("Invalid progress format 'xml'"), "{err}");
    }
}
