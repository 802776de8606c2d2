//! Kill tests: strata-io, strata-img, strata-nbd and strata-daemon killed
//! with SIGKILL at random moments of their work. Afterwards `qemu-img check` finds no corruption
//! (leaks allowed), and no write the tool reported done is lost: strata-io
//! runs writethrough, so each write it reports was flushed, and the one in
//! flight at the kill may have landed in part. strata-img's amend, snapshot
//! and commit change no guest data, so the guest reads as before.
//!
//! The check after a kill retries while the image is still locked and
//! prints the longest wait; a restarted strata-io must not need to.

mod crash_support;

use crash_support::env_u64;
use crash_support::kill::{check_after_kill, guest_data, qemu_img, QEMU_IMG};
use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STRATA_IO: &str = env!("CARGO_BIN_EXE_strata-io");
const STRATA_IMG: &str = env!("CARGO_BIN_EXE_strata-img");

fn have_qemu() -> bool {
    if Path::new(QEMU_IMG).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{QEMU_IMG} is required on CI"
    );
    println!("skipped: qemu-img not found");
    false
}

fn rng(seed: u64) -> TestRng {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..].copy_from_slice(&(!seed).to_le_bytes());
    TestRng::from_seed(RngAlgorithm::XorShift, &s)
}

/// Runs `cmd` in `dir` and kills it after `after`; returns its stdout up to
/// the kill (lines as they came) and whether it was still running.
fn run_and_kill(dir: &Path, cmd: &str, args: &[String], after: Duration) -> (Vec<String>, bool) {
    let mut child = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the tool");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    std::thread::sleep(after);
    let running = child.try_wait().unwrap().is_none();
    child.kill().ok();
    child.wait().unwrap();
    (reader.join().unwrap(), running)
}

/// One strata-io request and the bytes it leaves.
#[derive(Clone, Copy)]
enum Req {
    Write { off: u64, len: u64, pattern: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
}

const IO_SIZE: u64 = 4 << 20;

fn random_req(rng: &mut TestRng, k: usize, cluster: u64) -> Req {
    let off = rng.random_range(0..IO_SIZE);
    let len = rng.random_range(1..256 << 10).min(IO_SIZE - off);
    match rng.random_range(0..10) {
        0..7 => Req::Write {
            off,
            len,
            pattern: (k % 254 + 1) as u8,
        },
        7 | 8 => Req::Zero { off, len },
        _ => {
            let c = off / cluster;
            let n = (len / cluster).max(1).min(IO_SIZE / cluster - c);
            Req::Discard {
                off: c * cluster,
                len: n * cluster,
            }
        }
    }
}

impl Req {
    fn command(&self) -> String {
        match *self {
            Req::Write { off, len, pattern } => format!("write -P {pattern} {off} {len}"),
            Req::Zero { off, len } => format!("write -z {off} {len}"),
            Req::Discard { off, len } => format!("discard {off} {len}"),
        }
    }
    fn range(&self) -> (usize, usize) {
        match *self {
            Req::Write { off, len, .. } | Req::Zero { off, len } | Req::Discard { off, len } => {
                (off as usize, (off + len) as usize)
            }
        }
    }
    fn value(&self) -> u8 {
        match *self {
            Req::Write { pattern, .. } => pattern,
            // Whole clusters of a v3 image read as zeroes after a discard.
            Req::Zero { .. } | Req::Discard { .. } => 0,
        }
    }
}

/// A fresh qcow2 image of IO_SIZE and a random workload for it.
fn workload(d: &Path, seed: u64) -> (TestRng, Vec<Req>) {
    let mut rng = rng(seed);
    let cluster = if seed.is_multiple_of(2) { 65536 } else { 4096 };
    let (code, out) = qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            "img.qcow2",
            &IO_SIZE.to_string(),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let reqs = (0..400).map(|k| random_req(&mut rng, k, cluster)).collect();
    (rng, reqs)
}

/// The qemu-io arguments that run `reqs` one after the other.
fn commands(reqs: &[Req]) -> Vec<String> {
    let mut args = Vec::new();
    for r in reqs {
        args.extend(["-c".to_string(), r.command()]);
    }
    args
}

/// The same, with a flush after each discard: over NBD, writethrough
/// makes qemu-io's writes FUA but leaves its discards unflushed.
fn commands_flushing_discards(reqs: &[Req]) -> Vec<String> {
    let mut args = Vec::new();
    for r in reqs {
        args.extend(["-c".to_string(), r.command()]);
        if matches!(r, Req::Discard { .. }) {
            args.extend(["-c".to_string(), "flush".to_string()]);
        }
    }
    args
}

/// How many requests the lines report done: one "wrote" or "discard"
/// line each. A failed discard's line starts with "discard" too
/// ("discard failed: ..."), as the requests after a server's death do.
fn reported(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| {
            (l.starts_with("wrote ") || l.starts_with("discard "))
                && l.contains(" bytes at offset ")
        })
        .count()
}

/// Output to a pipe is buffered, qemu-io's and strata-io's alike: the
/// lines seen are a lower bound of what was done. Each request was
/// flushed before the next began, so the image must be the state after
/// some k >= done requests, with request k perhaps in part.
fn assert_fits_a_point(what: &str, got: &[u8], reqs: &[Req], done: usize) {
    let mut model = vec![0u8; IO_SIZE as usize];
    for r in &reqs[..done] {
        let (a, b) = r.range();
        model[a..b].fill(r.value());
    }
    let first_difference = (0..got.len()).find(|&i| got[i] != model[i]);
    let mut k = done;
    loop {
        let fits = match reqs.get(k) {
            None => got == model,
            Some(r) => {
                let (a, b) = r.range();
                got[..a] == model[..a]
                    && got[b..] == model[b..]
                    && got[a..b]
                        .iter()
                        .zip(&model[a..b])
                        .all(|(&g, &m)| g == m || g == r.value())
            }
        };
        if fits {
            return;
        }
        let Some(r) = reqs.get(k) else {
            let on_it: Vec<String> = first_difference
                .map(|i| {
                    reqs.iter()
                        .enumerate()
                        .filter(|(_, r)| (r.range().0..r.range().1).contains(&i))
                        .map(|(k, r)| format!("{k}: {}", r.command()))
                        .collect()
                })
                .unwrap_or_default();
            panic!(
                "{what}: after {done} requests reported done, the image fits no later point \
                 of the workload (first difference then: byte {first_difference:?}, which \
                 reads {:?}; requests on it: {on_it:?})",
                first_difference.map(|i| got[i])
            );
        };
        let (a, b) = r.range();
        model[a..b].fill(r.value());
        k += 1;
    }
}

/// strata-io killed while it writes, zeroes and discards on a qcow2 image,
/// each request flushed before it is reported (writethrough).
#[test]
fn strata_io_killed_mid_workload() {
    if !have_qemu() {
        return;
    }
    strata_io_kills(0..8);
}

/// Kills strata-io once per seed; see strata_io_killed_mid_workload.
fn strata_io_kills(seeds: std::ops::Range<u64>) {
    let mut longest_lock = Duration::ZERO;
    for seed in seeds {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (mut rng, reqs) = workload(d, seed);
        let mut args = vec!["-f".to_string(), "qcow2".to_string()];
        args.extend(commands(&reqs));
        args.push("img.qcow2".into());
        let after = Duration::from_millis(rng.random_range(5..400));
        let (lines, _) = run_and_kill(d, STRATA_IO, &args, after);
        longest_lock = longest_lock.max(check_after_kill(d, "img.qcow2"));
        let got = guest_data(d, "img.qcow2");
        assert_fits_a_point(&format!("seed {seed}"), &got, &reqs, reported(&lines));
    }
    println!("longest wait for a killed strata-io's lock: {longest_lock:?}");
}

/// An NBD server (strata-nbd or strata-daemon) killed while qemu-io
/// writes, zeroes and discards through it, writethrough: the image checks
/// clean, leaks aside, and fits a point of the workload no earlier than
/// what qemu-io reported done.
fn server_killed_mid_workload(server: &str, args: &[&str], uri: &str) {
    // The first round runs to the end: how long the workload takes, so
    // that the kills of the others land inside it.
    let mut full = Duration::from_secs(10);
    for seed in 0..7u64 {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (mut rng, reqs) = workload(d, seed);
        let sock = d.join("nbd.sock").to_string_lossy().into_owned();
        let args: Vec<String> = args.iter().map(|a| a.replace("SOCK", &sock)).collect();
        let uri = uri.replace("SOCK", &sock);
        let mut srv = Command::new(server)
            .args(&args)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the server");
        let start = Instant::now();
        while !d.join("nbd.sock").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{server} did not listen"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut client = Command::new("/usr/bin/qemu-io")
            .args(["-f", "raw"])
            .args(commands_flushing_discards(&reqs))
            .arg(&uri)
            .current_dir(d)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-io");
        let stdout = client.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        let t = Instant::now();
        if seed == 0 {
            client.wait().unwrap();
            full = t.elapsed();
        } else {
            let ms = full.as_millis().max(2) as u64;
            std::thread::sleep(Duration::from_millis(rng.random_range(1..ms)));
        }
        srv.kill().ok();
        srv.wait().unwrap();
        // The client fails its remaining requests and exits.
        client.wait().unwrap();
        let lines = reader.join().unwrap();
        check_after_kill(d, "img.qcow2");
        // Each write qemu-io reported was flushed (writethrough: FUA); a
        // discard was once the next request's line came (its flush had
        // ended: flushes print nothing).
        let got = guest_data(d, "img.qcow2");
        let mut done = reported(&lines);
        if done > 0 && matches!(reqs[done - 1], Req::Discard { .. }) {
            done -= 1;
        }
        assert_fits_a_point(&format!("{server}, seed {seed}"), &got, &reqs, done);
    }
}

#[test]
fn strata_nbd_killed_mid_workload() {
    if !have_qemu() {
        return;
    }
    server_killed_mid_workload(
        env!("CARGO_BIN_EXE_strata-nbd"),
        &[
            "-f",
            "qcow2",
            "--discard=unmap",
            "-k",
            "nbd.sock",
            "-t",
            "img.qcow2",
        ],
        "nbd+unix:///?socket=SOCK",
    );
}

#[test]
fn strata_daemon_killed_mid_workload() {
    if !have_qemu() {
        return;
    }
    server_killed_mid_workload(
        env!("CARGO_BIN_EXE_strata-daemon"),
        &[
            "--blockdev",
            "driver=qcow2,node-name=d,discard=unmap,file.driver=file,file.filename=img.qcow2",
            "--nbd-server",
            "addr.type=unix,addr.path=SOCK",
            "--export",
            "type=nbd,id=e,node-name=d,name=disk,writable=on",
        ],
        "nbd+unix:///disk?socket=SOCK",
    );
}

/// strata-img killed in convert, amend, snapshot and commit: every image
/// checks clean but for leaks, and the ones whose guest data the command
/// does not change read as before.
#[test]
fn strata_img_killed_mid_operation() {
    if !have_qemu() {
        return;
    }
    strata_img_kills(42, 4);
}

/// Kills each strata-img job `rounds` times at random moments.
fn strata_img_kills(seed: u64, rounds: usize) {
    let mut longest_lock = Duration::ZERO;
    let setup = |d: &Path| {
        let script = "head -c 24M /dev/urandom > data.raw && truncate -s 48M data.raw && \
            qemu-img convert -O qcow2 data.raw base.qcow2 && \
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && \
            qemu-io -f qcow2 -c 'write -P 7 8M 16M' top.qcow2 >/dev/null && \
            qemu-img snapshot -c old base.qcow2";
        let st = Command::new("sh")
            .args(["-c", script])
            .current_dir(d)
            .status()
            .unwrap();
        assert!(st.success());
    };
    type Job = (
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    );
    // (command line, images that must check clean, images whose guest
    // data must not change)
    let jobs: &[Job] = &[
        ("convert -O qcow2 data.raw out.qcow2", &["out.qcow2"], &[]),
        (
            "convert -c -O qcow2 data.raw out.qcow2",
            &["out.qcow2"],
            &[],
        ),
        (
            "amend -o refcount_bits=4 base.qcow2",
            &["base.qcow2"],
            &["base.qcow2"],
        ),
        (
            "amend -o compat=0.10 base.qcow2",
            &["base.qcow2"],
            &["base.qcow2"],
        ),
        (
            "snapshot -c new base.qcow2",
            &["base.qcow2"],
            &["base.qcow2"],
        ),
        (
            "snapshot -d old base.qcow2",
            &["base.qcow2"],
            &["base.qcow2"],
        ),
        (
            "commit top.qcow2",
            &["base.qcow2", "top.qcow2"],
            &["top.qcow2"],
        ),
    ];
    let mut r = rng(seed);
    for (cmd, checked, unchanged) in jobs {
        let args: Vec<String> = cmd.split(' ').map(String::from).collect();
        // How long the job takes, unkilled, so kills land inside it.
        let dir = tempfile::tempdir().unwrap();
        setup(dir.path());
        let t = Instant::now();
        let st = Command::new(STRATA_IMG)
            .args(&args)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "strata-img {cmd} failed");
        let full = t.elapsed().as_millis().max(2) as u64;
        for _ in 0..rounds {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            setup(d);
            let before: Vec<Vec<u8>> = unchanged.iter().map(|i| guest_data(d, i)).collect();
            let after = Duration::from_millis(r.random_range(1..full));
            run_and_kill(d, STRATA_IMG, &args, after);
            for image in *checked {
                longest_lock = longest_lock.max(check_after_kill(d, image));
            }
            for (image, was) in unchanged.iter().zip(&before) {
                assert!(
                    guest_data(d, image) == *was,
                    "{image} changed its guest data when `strata-img {cmd}` was killed after {after:?}"
                );
            }
        }
    }
    println!("longest wait for a killed strata-img's lock: {longest_lock:?}");
}

/// A tool started the moment another is killed opens the image: a killed
/// process is reaped before the kernel drops the requests it left in
/// flight, and with them its lock, so opening waits for the lock a little
/// before it reports a conflict. strata-img is killed as it opens (its
/// first requests in flight), strata-io with writes in flight, buffered
/// and O_DIRECT.
#[test]
fn a_restarted_tool_wins_the_lock_of_a_killed_one() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (code, out) = qemu_img(d, &["create", "-q", "-f", "qcow2", "img.qcow2", "256M"]);
    assert_eq!(code, 0, "{out}");
    let mut r = rng(7);
    for round in 0..60 {
        let (tool, args, after) = match round % 3 {
            0 => (
                STRATA_IMG,
                vec![
                    "snapshot".into(),
                    "-c".into(),
                    format!("s{round}"),
                    "img.qcow2".into(),
                ],
                r.random_range(1..6),
            ),
            n => {
                let cache = if n == 1 { "writeback" } else { "none" };
                let mut args: Vec<String> = vec!["-t".into(), cache.into()];
                for i in 0..64 {
                    args.extend(["-c".into(), format!("aio_write -P 1 {}M 4M", i * 4)]);
                }
                args.extend(["-c".into(), "aio_flush".into(), "img.qcow2".into()]);
                (STRATA_IO, args, r.random_range(2..40))
            }
        };
        let after = Duration::from_millis(after);
        run_and_kill(d, tool, &args, after);
        let out = Command::new(STRATA_IO)
            .args(["-c", "read 0 4k", "img.qcow2"])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: strata-io could not open the image {after:?} into a killed one's work: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The long run: STRATA_KILLS kills (default 1000) from seed
/// STRATA_KILL_SEED, alternating 50 of strata-io with 7 rounds of every
/// strata-img job (49 kills); prints the count. `scripts/kill-soak`.
#[test]
#[ignore]
fn kill_soak() {
    if !have_qemu() {
        return;
    }
    let (seed, want) = (
        env_u64("STRATA_KILL_SEED", 1000),
        env_u64("STRATA_KILLS", 1000),
    );
    let (mut kills, mut s) = (0, seed);
    while kills < want {
        strata_io_kills(s..s + 50);
        strata_img_kills(s, 7);
        kills += 50 + 7 * 7;
        s += 50;
    }
    println!("kill soak: seeds {seed}..{s}, {kills} kills, every image checked clean");
}
