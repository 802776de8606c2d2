//! Image locking interoperates with QEMU's: a qemu-io writer and a
//! strata-io writer refuse each other with QEMU's message, and `-U -r`
//! gives a shared read-only look while the other writes.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const QEMU_IO: &str = "/usr/bin/qemu-io";
const QEMU_IMG: &str = "/usr/bin/qemu-img";

fn have_qemu() -> bool {
    if Path::new(QEMU_IO).exists() && Path::new(QEMU_IMG).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "qemu-io and qemu-img are required on CI"
    );
    println!("skipped: qemu-io not found");
    false
}

/// Starts `prog` on `img` reading commands from a pipe; returns once the
/// image is open (its first prompt has been printed).
fn hold_open(prog: &str, fmt: &str, img: &Path) -> Child {
    let mut child = Command::new(prog)
        .args(["-f", fmt])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.as_mut().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("> ") {
        assert_eq!(
            out.read(&mut byte).unwrap(),
            1,
            "{prog} exited before opening the image"
        );
        seen.push(byte[0]);
    }
    child
}

fn finish(mut child: Child) {
    child.stdin.as_mut().unwrap().write_all(b"quit\n").unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

fn run(prog: &str, args: &[&str], img: &Path) -> (i32, String, String) {
    let out = Command::new(prog).args(args).arg(img).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn qemu_and_strata_writers_refuse_each_other() {
    if !have_qemu() {
        return;
    }
    let strata_io = env!("CARGO_BIN_EXE_strata-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.qcow2");
    assert!(Command::new(QEMU_IMG)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1M")
        .status()
        .unwrap()
        .success());
    let name = img.display().to_string();

    for (holder, other) in [(QEMU_IO, strata_io), (strata_io, QEMU_IO)] {
        let held = hold_open(holder, "qcow2", &img);
        let (code, _, err) = run(other, &["-f", "qcow2", "-c", "read 0 512"], &img);
        assert_eq!(code, 1, "{other} while {holder} writes: {err}");
        assert!(
            err.ends_with(&format!("can't open device {name}: Failed to get \"write\" lock\nIs another process using the image [{name}]?\n")),
            "{other}: {err}"
        );
        let (code, _, err) = run(other, &["-f", "qcow2", "-r", "-c", "read 0 512"], &img);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("Failed to get shared \"write\" lock"),
            "{other} -r: {err}"
        );
        let (code, out, err) = run(
            other,
            &["-f", "qcow2", "-r", "-U", "-c", "read 0 512"],
            &img,
        );
        assert_eq!(code, 0, "{other} -r -U: {err}");
        assert!(out.starts_with("read 512/512 bytes at offset 0"), "{out}");
        finish(held);
    }
    // Released on exit: a writer gets in again.
    let (code, _, err) = run(strata_io, &["-f", "qcow2", "-c", "write 0 512"], &img);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn raw_writers_share_the_image_as_in_qemu() {
    if !have_qemu() {
        return;
    }
    let strata_io = env!("CARGO_BIN_EXE_strata-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let held = hold_open(QEMU_IO, "raw", &img);
    let (code, _, err) = run(strata_io, &["-f", "raw", "-c", "write 0 512"], &img);
    assert_eq!(code, 0, "raw shares write with other writers: {err}");
    // But nobody may open it as qcow2 (which refuses to share write).
    let (code, _, err) = run(strata_io, &["-f", "qcow2", "-r", "-c", "read 0 512"], &img);
    assert_eq!(code, 1, "{err}");
    finish(held);
}
