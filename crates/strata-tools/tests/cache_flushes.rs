//! Which opens make writes stable, seen as the system calls themselves
//! (strace, with the thread-pool engine so each flush is an fdatasync):
//! `cache=unsafe` never flushes, not even when the image closes, and a
//! read-only image has nothing to flush; every other mode flushes on close.
//! A convert (whose target is `unsafe` unless `-t` says otherwise) flushed
//! half a gigabyte of page cache to the disk at close, three times the
//! copy itself, until the file driver's close honoured `cache.no-flush`.

use std::path::Path;
use std::process::Command;

const STRATA_IO: &str = env!("CARGO_BIN_EXE_strata-io");
const STRATA_IMG: &str = env!("CARGO_BIN_EXE_strata-img");

/// The fsync and fdatasync calls `prog args` makes, from every thread.
fn flushes(dir: &Path, prog: &str, args: &[&str]) -> usize {
    let log = dir.join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&log)
        .arg(prog)
        .args(args)
        .output()
        .expect("strace (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    text.lines()
        .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
        .count()
}

fn qcow2(dir: &Path, name: &str) -> String {
    let p = dir.join(name).to_string_lossy().into_owned();
    let out = Command::new(STRATA_IMG)
        .args(["create", "-q", "-f", "qcow2", &p, "64M"])
        .output()
        .unwrap();
    assert!(out.status.success());
    p
}

#[test]
fn only_cache_modes_that_flush_reach_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "a.qcow2");
    let io = |cache: &str, cmds: &[&str]| {
        let mut args = vec!["-i", "threads", "-t", cache];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(&img);
        flushes(dir.path(), STRATA_IO, &args)
    };
    assert_eq!(io("unsafe", &["write 0 64k"]), 0, "cache=unsafe flushed");
    assert_eq!(io("unsafe", &["write 0 64k", "flush"]), 0);
    assert!(io("writeback", &["write 0 64k"]) > 0, "close did not flush");
    assert!(io("writethrough", &["write 0 64k"]) > 0);
    let ro = flushes(
        dir.path(),
        STRATA_IO,
        &[
            "-r",
            "-i",
            "threads",
            "-c",
            "read 0 64k",
            "-c",
            "flush",
            &img,
        ],
    );
    assert_eq!(ro, 0, "a read-only image was flushed");
}

#[test]
fn convert_flushes_its_target_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    let out = qcow2(dir.path(), "out.qcow2");
    // The existing target through the thread pool, so its flushes show.
    let target = format!("driver=qcow2,file.driver=file,file.filename={out},file.aio=threads");
    let convert = |cache: &str| {
        let args = [
            "convert",
            "-n",
            "-t",
            cache,
            "--target-image-opts",
            &src,
            &target,
        ];
        flushes(dir.path(), STRATA_IMG, &args)
    };
    assert_eq!(convert("unsafe"), 0, "convert -t unsafe flushed");
    assert!(
        convert("writeback") > 0,
        "convert -t writeback did not flush"
    );
}
