//! Runs strata-io and QEMU's qemu-io on the same scratch images and
//! compares what they print: stdout, stderr and the exit code, with only
//! the timing numbers of the statistics lines filtered out.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The oracle.
pub const QEMU_IO: &str = "/usr/bin/qemu-io";

/// One run of a tool: what it printed and how it ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub code: Option<i32>,
}

/// True when the oracle is there. Without it a test is skipped, except on
/// CI (env CI set), where a missing oracle is a failure.
pub fn have_oracle() -> bool {
    if Path::new(QEMU_IO).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{QEMU_IO} is required on CI"
    );
    println!("skipped: qemu-io not found");
    false
}

/// The statistics line with its times and rates replaced, as the iotests'
/// _filter_qemu_io does; `-C` lines lose everything but bytes and ops.
fn filter_line(line: &str) -> String {
    if let Some(i) = line.find(" ops; ") {
        if line.ends_with(" ops/sec)") {
            let head = line[..i].trim_end_matches(|c: char| c.is_ascii_digit());
            return format!("{head}X ops; TIMING");
        }
    }
    let fields: Vec<&str> = line.split(',').collect();
    if fields.len() == 5 && fields[..2].iter().all(|f| f.parse::<u64>().is_ok()) {
        return format!("{},{},TIMING", fields[0], fields[1]);
    }
    line.to_string()
}

fn filter(text: &str) -> String {
    let mut out: Vec<String> = text.split('\n').map(filter_line).collect();
    if text.ends_with('\n') {
        out.pop();
        return out.join("\n") + "\n";
    }
    out.join("\n")
}

/// Makes the scratch images with QEMU's own tools (`sh -c` in `dir`).
fn setup(dir: &Path, script: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run setup script");
    assert!(st.success(), "setup failed: {script}");
}

/// Runs `bin` as `qemu-io` (argv[0] names the program in its messages).
fn run(bin: &str, dir: &Path, args: &[&str], stdin: Option<&str>) -> Outcome {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(bin)
        .arg0("qemu-io")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-io");
    {
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).expect("write stdin");
        }
    }
    let out = child.wait_with_output().expect("wait for qemu-io");
    Outcome {
        stdout: filter(&String::from_utf8_lossy(&out.stdout)),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code(),
    }
}

/// Runs both tools on fresh copies of the same setup and requires equal
/// results.
pub fn same(setup_script: &str, args: &[&str], stdin: Option<&str>) {
    same_files(setup_script, args, stdin, &[]);
}

/// As [`same`], and the `files` the runs leave must be equal byte for byte.
pub fn same_files(setup_script: &str, args: &[&str], stdin: Option<&str>, files: &[&str]) {
    let real_dir = tempfile::tempdir().expect("tempdir");
    let ours_dir = tempfile::tempdir().expect("tempdir");
    setup(real_dir.path(), setup_script);
    setup(ours_dir.path(), setup_script);
    let real = run(QEMU_IO, real_dir.path(), args, stdin);
    let ours = run(
        env!("CARGO_BIN_EXE_strata-io"),
        ours_dir.path(),
        args,
        stdin,
    );
    assert_eq!(ours, real, "strata-io differs from qemu-io for {args:?}");
    for f in files {
        let read = |d: &Path| std::fs::read(d.join(f)).unwrap_or_default();
        assert!(
            read(ours_dir.path()) == read(real_dir.path()),
            "{f} differs from qemu-io's after {args:?}"
        );
    }
}

/// Runs `-c` commands on one image opened with `-f fmt`.
pub fn commands(fmt: &str, image: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    same(IMAGES, &args, None);
}

/// Images most cases use: a 1 MiB qcow2 with data, an empty 1 MiB raw.
pub const IMAGES: &str = "qemu-img create -f qcow2 io.qcow2 1M && \
    qemu-img create -f raw p.raw 1M && \
    qemu-io -f qcow2 -c 'write -P 0xab 0 128k' io.qcow2";
