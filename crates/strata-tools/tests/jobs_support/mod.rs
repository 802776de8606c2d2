//! The job conversations the daemon tests share: three-image chains made
//! the same on both sides, the daemons started on them, the steps sent to
//! both, and the conversations and images compared.
#![allow(dead_code)]

use crate::daemon_support::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// One step of a job conversation.
#[derive(Clone, Copy)]
pub enum S<'a> {
    /// Send this, read up to its answer, then that many lines more.
    Ask(&'a str, usize),
    /// Poll `query-jobs` (unrecorded, with the events meanwhile) until its
    /// answer shows the text: a job's first chunk is copied in the
    /// background, after the answer that started it.
    Until(&'a str),
    /// Run this shell command in the daemon's folder (a client reading
    /// through an export) and record its output, without qemu-io's timings.
    Run(&'a str),
}

/// Three-image chains `cN-base <- cN-mid <- cN-top`, 4 MiB each: base has
/// data at [0, 1M) and [3M, 3.5M), mid at [1M, 2M), top at [2M, 2.5M).
pub fn chains(side: &Side, n: usize) {
    for i in 1..=n {
        let p = |l: &str| format!("c{i}-{l}.qcow2");
        side.qemu_img(&["create", "-q", "-f", "qcow2", &p("base"), "4M"]);
        for (l, b) in [("mid", "base"), ("top", "mid")] {
            side.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &p(b),
                "-F",
                "qcow2",
                &p(l),
            ]);
        }
        for (l, w) in [
            ("base", "write -P 0x11 0 1M"),
            ("base", "write -P 0x11 3M 512k"),
            ("mid", "write -P 0x22 1M 1M"),
            ("top", "write -P 0x33 2M 512k"),
        ] {
            let out = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", w, &p(l)])
                .current_dir(side.dir.path())
                .output()
                .unwrap();
            assert!(out.status.success());
        }
    }
}

/// `--blockdev` arguments naming every node of `n` chains; a base with a
/// blkdebug rule file `cN-base.cfg` in the folder is opened through it.
pub fn nodes(side: &Side, n: usize) -> Vec<String> {
    let mut v = Vec::new();
    for i in 1..=n {
        for (l, b) in [("base", None), ("mid", Some("base")), ("top", Some("mid"))] {
            let backing = b.map_or(String::new(), |b| format!(",backing=c{i}-{b}"));
            let cfg = format!("c{i}-{l}.cfg");
            let file = if side.dir.path().join(&cfg).exists() {
                format!(
                    "file.driver=blkdebug,file.config=$DIR/{cfg},\
                     file.image.driver=file,file.image.filename=$DIR/c{i}-{l}.qcow2"
                )
            } else {
                format!("file.driver=file,file.filename=$DIR/c{i}-{l}.qcow2")
            };
            v.push("--blockdev".to_string());
            v.push(format!("driver=qcow2,node-name=c{i}-{l},{file}{backing}"));
        }
    }
    v
}

/// `--blockdev` arguments opening each chain in one go, as a guest's disk
/// is opened: the backing files are nested options, so read-only.
pub fn disks(_side: &Side, n: usize) -> Vec<String> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.push("--blockdev".to_string());
        let mut opts = String::new();
        for (prefix, l) in [
            ("", "top"),
            ("backing.", "mid"),
            ("backing.backing.", "base"),
        ] {
            opts += &format!(
                "{prefix}driver=qcow2,{prefix}node-name=c{i}-{l},{prefix}file.driver=file,\
                 {prefix}file.filename=$DIR/c{i}-{l}.qcow2,"
            );
        }
        v.push(opts.trim_end_matches(',').to_string());
    }
    v
}

pub fn run(side: &Side, open: Open, n: usize, steps: &[S]) -> Vec<String> {
    let dir = side.dir.path().display().to_string();
    let extra: Vec<String> = open(side, n)
        .iter()
        .map(|a| a.replace("$DIR", &dir))
        .collect();
    let (d, mut c) = Running::start(side, &extra);
    let mut out = vec![side.normalize(&c.line())];
    out.push(c.ask(r#"{"execute": "qmp_capabilities"}"#));
    for s in steps {
        match s {
            S::Ask(send, after) => {
                out.push(format!("-> {send}"));
                c.send(&send.replace("$DIR", &dir));
                loop {
                    let line = c.line();
                    let answer = line.starts_with("{\"return\"") || line.starts_with("{\"error\"");
                    out.push(side.normalize(&line));
                    if answer {
                        break;
                    }
                }
                for _ in 0..*after {
                    out.push(side.normalize(&c.line()));
                }
            }
            S::Until(text) => {
                let start = Instant::now();
                // Events that come while polling are dropped: when they
                // come is the daemon's timing, not its behaviour.
                let mut poll = || {
                    c.send(r#"{"execute": "query-jobs"}"#);
                    loop {
                        let l = c.line();
                        if l.starts_with("{\"return\"") || l.starts_with("{\"error\"") {
                            return l;
                        }
                    }
                };
                while !poll().contains(text) {
                    assert!(start.elapsed() < Duration::from_secs(20), "{text}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            S::Run(cmd) => {
                out.push(format!("$ {cmd}"));
                let o = std::process::Command::new("sh")
                    .args(["-c", cmd])
                    .current_dir(side.dir.path())
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&o.stdout).to_string()
                    + &String::from_utf8_lossy(&o.stderr);
                out.extend(
                    text.lines()
                        .filter(|l| !l.contains("ops/sec"))
                        .map(|l| side.normalize(l)),
                );
                out.push(format!("exit {}", o.status.code().unwrap_or(-1)));
            }
        }
    }
    c.send(r#"{"execute": "quit"}"#);
    while !c.line().starts_with("{\"return\"") {}
    let (code, err) = d.wait();
    out.push(format!("exit {code}"));
    out.push(side.normalize(&err));
    without_drain_pauses(out)
}

/// Drops the `paused` then `running` pair that qemu-storage-daemon sends
/// for every running job whenever the graph changes anywhere (it drains
/// every node then); Strata's jobs keep running. Two jobs started together
/// interleave their pairs; a command in between makes a pair the user's.
pub fn without_drain_pauses(lines: Vec<String>) -> Vec<String> {
    let change = |l: &str, s: &str| -> Option<String> {
        let status = format!("\"data\": {{\"status\": \"{s}\", \"id\": ");
        let id = l.split(&status).nth(1)?;
        id.split('}').next().map(str::to_string)
    };
    let mut out: Vec<Option<String>> = Vec::new();
    // Where each job's last `paused` is, while no command has come since.
    let mut paused: std::collections::HashMap<String, usize> = Default::default();
    for l in lines {
        if l.starts_with("-> ") {
            paused.clear();
        } else if let Some(id) = change(&l, "paused") {
            paused.insert(id, out.len());
        } else if let Some(at) = change(&l, "running").and_then(|id| paused.remove(&id)) {
            out[at] = None;
            continue;
        }
        out.push(Some(l));
    }
    out.into_iter().flatten().collect()
}

/// Runs `steps` on both daemons and compares the conversations, then the
/// images each left (their maps and backing files).
pub fn same_jobs(n: usize, steps: &[S]) -> Option<Vec<String>> {
    same_jobs_with(n, |_| {}, steps)
}

/// How a conversation's daemons open the chains: [`nodes`] or
/// [`disks`].
pub type Open = fn(&Side, usize) -> Vec<String>;

/// As [`same_jobs`], with `setup` run on each side after the chains are
/// made; returns Strata's side of the conversation.
pub fn same_jobs_with(n: usize, setup: impl Fn(&Side), steps: &[S]) -> Option<Vec<String>> {
    same_jobs_opened(n, nodes, setup, steps)
}

/// As [`same_jobs_with`], with the chains opened by `open`.
pub fn same_jobs_opened(
    n: usize,
    open: Open,
    setup: impl Fn(&Side),
    steps: &[S],
) -> Option<Vec<String>> {
    same_jobs_and_images(n, open, setup, steps, &[])
}

/// As [`same_jobs_opened`], comparing the images `extra` (a job's
/// targets, or chain images a job writes with copies in flight) by
/// content, not by where their clusters landed.
pub fn same_jobs_and_images(
    n: usize,
    open: Open,
    setup: impl Fn(&Side),
    steps: &[S],
    extra: &[&str],
) -> Option<Vec<String>> {
    let (s, q) = sides()?;
    chains(&s, n);
    chains(&q, n);
    setup(&s);
    setup(&q);
    let got = run(&s, open, n, steps);
    let want = run(&q, open, n, steps);
    assert_same_lines(&got, &want);
    let mut images: Vec<String> = extra.iter().map(|e| e.to_string()).collect();
    for i in 1..=n {
        for l in ["base", "mid", "top"] {
            let img = format!("c{i}-{l}.qcow2");
            if !images.contains(&img) {
                images.push(img);
            }
        }
    }
    for img in images {
        // Blocks on disk are the filesystem's business.
        let info = |side: &Side| {
            let (out, code) = side.qemu_img(&["info", "-U", "--output=json", &img]);
            let kept: Vec<&str> = out
                .lines()
                .filter(|l| !l.contains("\"actual-size\""))
                .collect();
            (kept.join("\n"), code)
        };
        assert_eq!(info(&s), info(&q), "{img}");
        let args = ["map", "-U", "--output=json", img.as_str()];
        if extra.contains(&img.as_str()) {
            // Where a job's concurrent copies land in a target is the
            // order they complete in; what the target holds is compared.
            let path = |side: &Side| side.dir.path().join(&img).display().to_string();
            let (out, code) = s.qemu_img(&["compare", "-U", &path(&s), &path(&q)]);
            assert_eq!(code, 0, "{img}: {out}");
        } else {
            assert_eq!(s.qemu_img(&args), q.qemu_img(&args), "{img}");
        }
        if img.ends_with(".qcow2") {
            // (qemu-img has no check for raw images.)
            assert_eq!(s.qemu_img(&["check", &img]).1, 0, "{img}");
        }
    }
    Some(got)
}

/// 4 MiB qcow2 targets `cN-tgt.qcow2` and `cN-tg2.qcow2` beside each
/// chain, and an 8 MiB one of the wrong size.
pub fn targets(side: &Side) {
    for (name, size) in [
        ("c1-tgt", "4M"),
        ("c1-tg2", "4M"),
        ("c1-tg3", "4M"),
        ("big", "8M"),
    ] {
        side.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &format!("{name}.qcow2"),
            size,
        ]);
    }
}

/// The chain's nodes and a node for each target; a target with a
/// blkdebug rule file `NAME.cfg` beside it is opened through it.
pub fn with_targets(side: &Side, n: usize) -> Vec<String> {
    let mut v = nodes(side, n);
    for (node, file) in [
        ("t1", "c1-tgt"),
        ("t2", "c1-tg2"),
        ("t3", "c1-tg3"),
        ("big", "big"),
    ] {
        let proto = if side.dir.path().join(format!("{file}.cfg")).exists() {
            format!(
                "file.driver=blkdebug,file.config=$DIR/{file}.cfg,\
                 file.image.driver=file,file.image.filename=$DIR/{file}.qcow2"
            )
        } else {
            format!("file.driver=file,file.filename=$DIR/{file}.qcow2")
        };
        v.push("--blockdev".into());
        v.push(format!("driver=qcow2,node-name={node},{proto}"));
    }
    v
}

pub const FIRST_CHUNK: &str = r#""current-progress": 524288"#;

/// Sends `cmd` and reads up to its answer, skipping events.
pub fn answer(c: &mut Client, cmd: &str) -> String {
    c.send(cmd);
    loop {
        let l = c.line();
        if l.starts_with("{\"return\"") || l.starts_with("{\"error\"") {
            return l;
        }
    }
}

/// Reads lines until one contains `text`.
pub fn wait_for(c: &mut Client, text: &str) {
    while !c.line().contains(text) {}
}

/// Starts the daemon of `side` with `args` (`$DIR` replaced) and exports
/// `c1-top` writable over NBD, as a guest's disk: the daemon, its monitor
/// (capabilities negotiated) and the export's URI.
pub fn start_exported(side: &Side, args: &[String]) -> (Running, Client, String) {
    let dir = side.dir.path().display().to_string();
    let extra: Vec<String> = args.iter().map(|a| a.replace("$DIR", &dir)).collect();
    let (d, mut c) = Running::start(side, &extra);
    c.line();
    answer(&mut c, r#"{"execute": "qmp_capabilities"}"#);
    let sock = side.path("nbd.sock");
    let start = format!(
        r#"{{"execute": "nbd-server-start", "arguments": {{"addr": {{"type": "unix", "data": {{"path": "{sock}"}}}}}}}}"#
    );
    assert!(answer(&mut c, &start).contains("return"));
    let export = r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "c1-top", "writable": true}}"#;
    assert!(answer(&mut c, export).contains("return"));
    (d, c, format!("nbd+unix:///c1-top?socket={sock}"))
}

/// Runs qemu-io commands, as a guest, on the disk at an NBD URI.
pub fn guest_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for cmd in cmds {
        args.push("-c");
        args.push(cmd);
    }
    args.push(uri);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    assert!(out.status.success(), "{out:?}");
}
