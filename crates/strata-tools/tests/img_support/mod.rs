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

/// How many mutants a test tries and from which seed: 150 from 7, or
/// STRATA_MUTANTS from STRATA_MUTANT_SEED for a soak.
pub fn mutant_rounds() -> (u32, u64) {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    (
        env("STRATA_MUTANTS", 150) as u32,
        env("STRATA_MUTANT_SEED", 7),
    )
}

/// Mutates `image` (in `dir`, format `fmt`) `rounds` times from `seed`: a
/// few bytes of its first `region` bytes changed, then `fix` (a checksum
/// made to fit again, say) applied; both tools convert each mutant to raw.
/// They must agree: the same messages and exit code, and the same bytes
/// when both succeed; or Strata refuses where it is `stricter` on purpose
/// (a message it alone gives). Returns how many mutants both tools read.
pub fn mutants_read_alike(
    dir: &Path,
    (fmt, image): (&str, &str),
    region: usize,
    (rounds, seed): (u32, u64),
    fix: impl Fn(&mut [u8], u64),
    stricter: &[&str],
) -> u32 {
    let strata = strata_as_qemu_img(dir);
    let pristine = std::fs::read(dir.join(image)).unwrap();
    let mut state = seed | 1;
    let mut next = move || {
        // xorshift64: a fixed sequence for a seed, nothing to install.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut read = 0;
    for round in 0..rounds {
        let mut img = pristine.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % region as u64) as usize;
            img[at] = match next() % 3 {
                0 => next() as u8,
                1 => img[at] ^ (1 << (next() % 8)),
                _ => [0, 0xff, 0x7f, 0x80][(next() % 4) as usize],
            };
        }
        fix(&mut img, next());
        let mutant = format!("m{round}.{fmt}");
        std::fs::write(dir.join(&mutant), &img).unwrap();
        let args = ["convert", "-f", fmt, "-O", "raw", &mutant, "out.raw"];
        let want = run(Path::new(QEMU_IMG), &args, dir);
        let qemu_out = std::fs::read(dir.join("out.raw")).ok();
        let _ = std::fs::remove_file(dir.join("out.raw"));
        let got = run(&strata, &args, dir);
        let strata_out = std::fs::read(dir.join("out.raw")).ok();
        let _ = std::fs::remove_file(dir.join("out.raw"));
        if got.2 == 1 && stricter.iter().any(|m| got.1.contains(m)) {
            continue;
        }
        assert_eq!(got, want, "mutant {round} (seed {seed})");
        if want.2 == 0 {
            assert!(
                qemu_out == strata_out,
                "mutant {round} (seed {seed}) reads differently"
            );
            read += 1;
        }
        std::fs::remove_file(dir.join(&mutant)).unwrap();
    }
    read
}

/// A tool's output with the space its files take on disk blanked (`disk
/// size:` lines, `"actual-size"` values): ext4 lays out a file written
/// with flushes between its writes (as Strata's vdi and vpc allocations
/// are) in fewer extents, and an extent-tree block counts as used space.
pub fn without_disk_usage((out, err, code): (String, String, i32)) -> (String, String, i32) {
    let blank = |l: &str| {
        if let Some(i) = l.find("disk size: ") {
            format!("{}disk size: -", &l[..i])
        } else if let Some(i) = l.find("\"actual-size\": ") {
            let rest = &l[i + 15..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            format!("{}\"actual-size\": -{}", &l[..i], &rest[end..])
        } else {
            l.to_string()
        }
    };
    let out = out.lines().map(blank).collect::<Vec<_>>().join("\n");
    (out, err, code)
}
