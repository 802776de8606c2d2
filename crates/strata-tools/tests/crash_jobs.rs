//! Crash points of block jobs: strata-daemon's dispatcher, in this
//! process, runs stream, commit, active commit, mirror and backup on a
//! chain `c1-base <- c1-mid <- c1-top` (and a `target` image), each image
//! over a recording filter (crash_support/recorder.rs), so that one log
//! holds every request that
//! completed on any of their files, in order. A crash at log entry `p`
//! leaves each image with everything up to its own last flush before `p`,
//! and a random part of what came after (reordered, some writes torn), as
//! crash_points.rs cuts one image. A guest writes to the top through an
//! NBD export during the job. Every cut must leave every image clean
//! (leaks allowed), the top reading as the chain did before with every
//! guest write qemu-io had reported (writethrough), the images
//! whose view the job does not change reading as before, and, once a
//! mirror, an active commit (both after `job-complete`) or a backup has
//! reported its end, its target reading as the disk (for a backup, as it
//! was when the backup began): a job that has said it is done is on disk.

mod crash_support;

use crash_support::check::check_crashed;
use crash_support::kill::{guest_data, QEMU_IMG};
use crash_support::recorder::{Entry, Log, Op, RecorderClass};
use crash_support::{env_u64, Rng, SECTOR};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The images, in the order the views are kept.
const IMAGES: [&str; 4] = ["c1-top", "c1-mid", "c1-base", "target"];

struct Job {
    name: &'static str,
    command: &'static str,
    mid_holds: bool,
    base_holds: bool,
    /// Whether the job waits at READY for `job-complete`, which pivots.
    pivots: bool,
    /// The image that holds the disk once the job has reported its end.
    holds_disk: Option<&'static str>,
    /// That image holds the disk as it was when the job started (backup),
    /// not as the guest left it.
    point_in_time: bool,
}

const JOBS: &[Job] = &[
    Job {
        name: "stream",
        command: r#"{"execute": "block-stream", "arguments": {"job-id": "j", "device": "c1-top", "base-node": "c1-base", "backing-file": "c1-base.qcow2"}}"#,
        mid_holds: true,
        base_holds: true,
        pivots: false,
        holds_disk: None,
        point_in_time: false,
    },
    Job {
        name: "commit",
        command: r#"{"execute": "block-commit", "arguments": {"job-id": "j", "device": "c1-top", "top-node": "c1-mid", "base-node": "c1-base", "backing-file": "c1-base.qcow2"}}"#,
        mid_holds: true,
        base_holds: false,
        pivots: false,
        holds_disk: None,
        point_in_time: false,
    },
    Job {
        name: "active commit",
        command: r#"{"execute": "block-commit", "arguments": {"job-id": "j", "device": "c1-top"}}"#,
        mid_holds: false,
        base_holds: false,
        pivots: true,
        holds_disk: Some("c1-base"),
        point_in_time: false,
    },
    Job {
        name: "mirror",
        command: r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "j", "device": "c1-top", "target": "target", "sync": "full"}}"#,
        mid_holds: true,
        base_holds: true,
        pivots: true,
        holds_disk: Some("target"),
        point_in_time: false,
    },
    Job {
        name: "backup",
        command: r#"{"execute": "blockdev-backup", "arguments": {"job-id": "j", "device": "c1-top", "target": "target", "sync": "full"}}"#,
        mid_holds: true,
        base_holds: true,
        pivots: false,
        holds_disk: Some("target"),
        point_in_time: true,
    },
];

/// A job's run: the images before it, the log, and where the job had
/// reported its end (log entries then).
struct Recorded {
    dir: tempfile::TempDir,
    files: Vec<Vec<u8>>,
    views: Vec<Vec<u8>>,
    log: Vec<Entry>,
    ended_at: usize,
    /// The guest's writes (offset, length, byte), in order, and the log's
    /// length when qemu-io reported each (writethrough: then stable).
    writes: Vec<(usize, usize, u8)>,
    stable_at: Vec<usize>,
}

fn have_qemu() -> bool {
    Path::new(QEMU_IMG).exists() || {
        assert!(
            std::env::var_os("CI").is_none(),
            "{QEMU_IMG} is required under CI"
        );
        false
    }
}

/// The chain, 8 MiB: base with 4 MiB of random data, mid and top with
/// patterns over parts of it and past it; and an empty target.
fn images(dir: &Path) {
    let script = "head -c 4M /dev/urandom > data.raw && truncate -s 8M data.raw && \
         qemu-img convert -O qcow2 data.raw c1-base.qcow2 && rm data.raw && \
         qemu-img create -q -f qcow2 -b c1-base.qcow2 -F qcow2 c1-mid.qcow2 && \
         qemu-img create -q -f qcow2 -b c1-mid.qcow2 -F qcow2 c1-top.qcow2 && \
         qemu-img create -q -f qcow2 target.qcow2 8M && \
         qemu-io -f qcow2 -c 'write -P 0x22 1M 2M' -c 'write -P 0x22 5M 1M' c1-mid.qcow2 >/dev/null && \
         qemu-io -f qcow2 -c 'write -P 0x33 2536k 1M' -c 'write -P 0x33 7M 512k' c1-top.qcow2 >/dev/null";
    let st = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "could not make the images");
}

/// Sends `cmd`; the line that answers it, events skipped.
async fn ask<R, W>(lines: &mut tokio::io::Lines<R>, w: &mut W, cmd: &str) -> String
where
    R: tokio::io::AsyncBufRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    w.write_all(format!("{cmd}\n").as_bytes()).await.unwrap();
    loop {
        let l = lines.next_line().await.unwrap().expect("the monitor ended");
        if l.starts_with("{\"return\"") || l.starts_with("{\"error\"") {
            return l;
        }
    }
}

/// Reads lines until one contains `text`; fails on a job error.
async fn until<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut tokio::io::Lines<R>, text: &str) {
    loop {
        let l = lines.next_line().await.unwrap().expect("the monitor ended");
        assert!(!l.contains("BLOCK_JOB_ERROR"), "{l}");
        if l.contains(text) {
            assert!(!l.contains("\"error\""), "{l}");
            return;
        }
    }
}

/// The job's pace: slow enough that the guest's writes land during it.
const SPEED: &str = r#""job-id": "j", "speed": 4194304"#;

/// Random guest writes of 512 bytes to 256 KiB: (offset, length, byte).
fn guest_writes(rng: &mut Rng) -> Vec<(usize, usize, u8)> {
    (0..16)
        .map(|i| {
            let len = (1 + rng.below(512)) as usize * 512;
            let off = rng.below((8 << 20) as u64 - len as u64) as usize / 512 * 512;
            (off, len, 0x40 + i as u8)
        })
        .collect()
}

/// qemu-io writing `writes` to the NBD export at `uri`, writethrough (each
/// write FUA), line-buffered: the log's length as each write is reported.
fn guest(uri: String, writes: Vec<(usize, usize, u8)>, log: Log) -> Vec<usize> {
    let mut args = vec![
        "-oL".to_string(),
        "qemu-io".into(),
        "-f".into(),
        "raw".into(),
    ];
    for (off, len, v) in &writes {
        args.extend(["-c".into(), format!("write -P {v} {off} {len}")]);
    }
    args.push(uri);
    let mut child = Command::new("stdbuf")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start qemu-io");
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    for line in std::io::BufRead::lines(out).map_while(Result::ok) {
        if line.starts_with("wrote ") {
            seen.push(log.lock().unwrap().len());
        }
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(seen.len(), writes.len(), "qemu-io failed writes");
    seen
}

/// Runs `job` on fresh images, recorded, to its end, while a guest writes
/// to the top through an NBD export; then every node closes.
fn record(job: &Job, rng: &mut Rng) -> Recorded {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let files = IMAGES
        .iter()
        .map(|i| std::fs::read(d.join(format!("{i}.qcow2"))).unwrap())
        .collect();
    let views = IMAGES
        .iter()
        .map(|i| guest_data(d, &format!("{i}.qcow2")))
        .collect();
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let registry = strata_daemon::registry_with(vec![Arc::new(RecorderClass {
        log: Arc::clone(&log),
    })]);
    let ended_at = Arc::new(Mutex::new(0));
    let writes = guest_writes(rng);
    let stable_at = Arc::new(Mutex::new(Vec::new()));
    let ev = strata_block::EventLoop::new().unwrap();
    ev.block_on(async {
        let (client, served) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(served);
        let server = strata_daemon::serve_connection(registry, r, w);
        let client_side = async {
            let (r, mut w) = tokio::io::split(client);
            let mut lines = tokio::io::BufReader::new(r).lines();
            lines.next_line().await.unwrap();
            ask(&mut lines, &mut w, r#"{"execute": "qmp_capabilities"}"#).await;
            for (name, backing) in [
                ("c1-base", None),
                ("c1-mid", Some("c1-base")),
                ("c1-top", Some("c1-mid")),
                ("target", None),
            ] {
                let mut args = serde_json::json!({
                    "driver": "qcow2", "node-name": name,
                    "file": {"driver": "throttle", "throttle-group": name,
                             "file": {"driver": "file", "filename": d.join(format!("{name}.qcow2"))}},
                });
                if let Some(b) = backing {
                    args["backing"] = b.into();
                }
                let cmd = serde_json::json!({"execute": "blockdev-add", "arguments": args});
                let ans = ask(&mut lines, &mut w, &cmd.to_string()).await;
                assert!(ans.contains("return"), "{ans}");
            }
            let sock = d.join("nbd.sock");
            let start = serde_json::json!({"execute": "nbd-server-start", "arguments":
                {"addr": {"type": "unix", "data": {"path": sock}}}});
            let ans = ask(&mut lines, &mut w, &start.to_string()).await;
            assert!(ans.contains("return"), "{ans}");
            let export = r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "c1-top", "writable": true}}"#;
            let ans = ask(&mut lines, &mut w, export).await;
            assert!(ans.contains("return"), "{ans}");
            let cmd = job.command.replacen(r#""job-id": "j""#, SPEED, 1);
            let ans = ask(&mut lines, &mut w, &cmd).await;
            assert!(ans.contains("return"), "{}: {ans}", job.name);
            let uri = format!("nbd+unix:///c1-top?socket={}", sock.display());
            let (writes, log2) = (writes.clone(), Arc::clone(&log));
            let writer = std::thread::spawn(move || guest(uri, writes, log2));
            if job.pivots {
                until(&mut lines, "BLOCK_JOB_READY").await;
            }
            // The guest is done before a pivot moves its disk.
            while !writer.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            *stable_at.lock().unwrap() = writer.join().unwrap();
            if job.pivots {
                let complete = r#"{"execute": "job-complete", "arguments": {"id": "j"}}"#;
                let ans = ask(&mut lines, &mut w, complete).await;
                assert!(ans.contains("return"), "{ans}");
            }
            until(&mut lines, "BLOCK_JOB_COMPLETED").await;
            *ended_at.lock().unwrap() = log.lock().unwrap().len();
            until(&mut lines, "\"status\": \"null\"").await;
            // The client goes: the daemon closes every node, recorded too.
            w.shutdown().await.unwrap();
            while lines.next_line().await.unwrap().is_some() {}
        };
        tokio::join!(server, client_side);
    });
    let log = log.lock().unwrap().clone();
    let ended_at = *ended_at.lock().unwrap();
    let stable_at = stable_at.lock().unwrap().clone();
    Recorded {
        dir,
        files,
        views,
        log,
        ended_at,
        writes,
        stable_at,
    }
}

/// Applies one entry to an image file; `torn` (a bit pattern) keeps only
/// some of a write's sectors.
fn apply(img: &mut Vec<u8>, e: &Entry, torn: Option<u64>) {
    let (start, len) = (e.offset as usize, e.len as usize);
    match &e.op {
        Op::Flush => {}
        // A punched hole or zeroes; neither makes the file longer.
        Op::Discard | Op::Zero => {
            let end = (start + len).min(img.len());
            if start < end {
                img[start..end].fill(0);
            }
        }
        Op::Write(data) => {
            if img.len() < start + len {
                img.resize(start + len, 0);
            }
            for (i, s) in data.chunks(SECTOR as usize).enumerate() {
                if torn.is_some_and(|bits| bits >> (i % 64) & 1 == 0) {
                    continue;
                }
                let at = start + i * SECTOR as usize;
                img[at..at + s.len()].copy_from_slice(s);
            }
        }
    }
}

/// The image files a crash at log entry `cut` may leave.
fn replay(rec: &Recorded, cut: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    let before = &rec.log[..cut];
    IMAGES
        .iter()
        .zip(&rec.files)
        .map(|(name, file)| {
            let mine: Vec<&Entry> = before.iter().filter(|e| e.image == *name).collect();
            let stable = mine
                .iter()
                .rposition(|e| matches!(e.op, Op::Flush))
                .map_or(0, |f| f + 1);
            let mut img = file.clone();
            for e in &mine[..stable] {
                apply(&mut img, e, None);
            }
            for (e, torn) in rng.crash_subset(&mine[stable..]) {
                apply(&mut img, e, torn);
            }
            img
        })
        .collect()
}

/// Whether `got` is `initial` with the first `stable` writes, and perhaps
/// any part of the later ones.
fn fits(
    got: &[u8],
    initial: &[u8],
    writes: &[(usize, usize, u8)],
    stable: usize,
) -> Result<(), String> {
    let mut model = initial.to_vec();
    for &(off, len, v) in &writes[..stable] {
        model[off..off + len].fill(v);
    }
    if got.len() != model.len() {
        return Err(format!("{} bytes, not {}", got.len(), model.len()));
    }
    let later = &writes[stable..];
    match (0..got.len()).find(|&i| {
        got[i] != model[i]
            && !later
                .iter()
                .any(|&(o, l, v)| (o..o + l).contains(&i) && got[i] == v)
    }) {
        None => Ok(()),
        Some(i) => Err(format!(
            "byte {i} reads {:#x} ({stable} of {} writes stable)",
            got[i],
            writes.len()
        )),
    }
}

/// Checks the crash at log entry `cut`; an error says what is wrong.
fn check_cut(job: &Job, rec: &Recorded, cut: usize, rng: &mut Rng) -> Result<(), String> {
    let files = replay(rec, cut, rng);
    let d = rec.dir.path().join("cut");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap();
    for (name, img) in IMAGES.iter().zip(&files) {
        std::fs::write(d.join(format!("{name}.qcow2")), img).unwrap();
    }
    for name in IMAGES {
        let file = d.join(format!("{name}.qcow2"));
        check_crashed(QEMU_IMG, &file.to_string_lossy(), "qcow2")
            .map_err(|e| format!("{name}: {e}"))?;
    }
    let view = |name: &str| guest_data(&d, &format!("{name}.qcow2"));
    let was = |name: &str| &rec.views[IMAGES.iter().position(|i| *i == name).unwrap()];
    // The guest's writes reported before the cut are stable; later ones
    // may have landed, whole or in part.
    let stable = rec.stable_at.iter().take_while(|&&at| at <= cut).count();
    fits(&view("c1-top"), was("c1-top"), &rec.writes, stable)
        .map_err(|e| format!("the top does not read as the chain and the guest's writes: {e}"))?;
    if job.mid_holds && view("c1-mid") != *was("c1-mid") {
        return Err("mid's view changed".into());
    }
    if job.base_holds && view("c1-base") != *was("c1-base") {
        return Err("base changed".into());
    }
    if let Some(to) = job.holds_disk.filter(|_| cut >= rec.ended_at) {
        // Every guest write was reported before the job's end.
        let writes: &[_] = if job.point_in_time { &[] } else { &rec.writes };
        fits(&view(to), was("c1-top"), writes, writes.len()).map_err(|e| {
            format!("{to} does not read as the disk, though the job had reported its end: {e}")
        })?;
    }
    Ok(())
}

/// Records every job and checks `cuts` random cuts of each, the cut where
/// the job reported its end and the one after everything; returns how
/// many were checked.
fn job_cuts(seed: u64, cuts: usize) -> usize {
    let mut rng = Rng(seed);
    let mut checked = 0;
    for job in JOBS {
        let rec = record(job, &mut rng);
        let len = rec.log.len();
        let mut at: Vec<usize> = (0..cuts)
            .map(|_| rng.below(len as u64 + 1) as usize)
            .collect();
        at.push(len);
        at.push(rec.ended_at);
        for cut in at {
            if let Err(e) = check_cut(job, &rec, cut, &mut rng) {
                panic!(
                    "{}: a crash at log entry {cut} of {len} (seed {seed}): {e}",
                    job.name
                );
            }
            checked += 1;
        }
        println!("{}: {len} log entries, {} cuts", job.name, cuts + 2);
    }
    checked
}

#[test]
fn every_job_survives_a_crash_at_any_point() {
    if !have_qemu() {
        return;
    }
    job_cuts(7, 24);
}

/// The long run: STRATA_JOB_CUTS cuts (default 1000) from seed
/// STRATA_CRASH_SEED (default 1000), `scripts/crash-soak`.
#[test]
#[ignore]
fn job_crash_soak() {
    if !have_qemu() {
        return;
    }
    let (seed, want) = (
        env_u64("STRATA_CRASH_SEED", 1000),
        env_u64("STRATA_JOB_CUTS", 1000),
    );
    let (mut done, mut s) = (0, seed);
    while (done as u64) < want {
        done += job_cuts(s, 50);
        s += 1;
    }
    println!("job crash soak: seeds {seed}..{s}, {done} cuts, every image checked clean");
}
