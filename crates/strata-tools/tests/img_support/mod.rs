//! What the tests of strata-img against qemu-img share: both tools run
//! under the name `qemu-img` (a symlink to strata-img in a folder of its
//! own), since messages start with the program's name.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The I/O tool under test.
pub const STRATA_IO: &str = env!("CARGO_BIN_EXE_strata-io");

/// The oracle.
pub const QEMU_IMG: &str = "/usr/bin/qemu-img";

/// The oracle, if installed; CI must have it.
pub fn qemu_img() -> Option<&'static str> {
    if Path::new(QEMU_IMG).exists() {
        return Some(QEMU_IMG);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "qemu-img is required under CI"
    );
    eprintln!("skipped: qemu-img not found");
    None
}

/// A folder with `qemu-img` linked to strata-img.
pub fn strata_as_qemu_img(dir: &Path) -> PathBuf {
    let link = dir.join("bin/qemu-img");
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_strata-img"), &link).unwrap();
    link
}

/// Runs an I/O tool (`qemu-io` or `strata-io`) with `-f fmt`, each of
/// `cmds` as a `-c`, on `file` in `dir`; its output. Fails the test if the
/// tool fails or reports a failed command.
pub fn io(prog: &str, dir: &Path, fmt: &str, file: &str, cmds: &[String]) -> String {
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

/// Runs `qemu-img args` in `dir` with `prog`'s folder first in PATH, so both
/// tools see the same argv[0]; stdout, stderr and the exit code.
pub fn run(prog: &Path, args: &[&str], dir: &Path) -> (String, String, i32) {
    let path = format!("{}:/usr/bin:/bin", prog.parent().unwrap().display());
    let out = Command::new("qemu-img")
        .env("PATH", path)
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

/// Runs an I/O tool (under a time limit) with `-c` for each command on `file`.
pub fn io_status(prog: &str, dir: &Path, args: &[&str], cmds: &[&str]) -> (String, i32) {
    let mut c = Command::new("timeout");
    c.arg("60").arg(prog).args(args);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.current_dir(dir).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // Timings differ from run to run.
    let text = text
        .lines()
        .filter(|l| !l.contains("ops/sec"))
        .collect::<Vec<_>>()
        .join("\n");
    (text, out.status.code().unwrap_or(-1))
}

/// Each qemu-img command run by both tools in dirs of their own, the same
/// output and exit code required; the dirs, QEMU's first.
pub fn both(setup: &[&[&str]]) -> (tempfile::TempDir, tempfile::TempDir) {
    let q = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let strata = strata_as_qemu_img(s.path());
    let qemu = Path::new("/usr/bin/qemu-img");
    for args in setup {
        let want = run(qemu, args, q.path());
        let got = run(&strata, args, s.path());
        assert_eq!(got, want, "qemu-img {args:?}");
    }
    (q, s)
}

/// An I/O tool's output lines sorted, with its exit code: the order of aio
/// completions is not what a test compares.
pub fn sorted_lines((text, code): (String, i32)) -> (Vec<String>, i32) {
    let mut l: Vec<String> = text.lines().map(String::from).collect();
    l.sort();
    (l, code)
}
