//! strata-daemon killed with SIGKILL while a block job runs: stream,
//! commit, active commit, mirror and backup, each on a three-image chain
//! whose top a guest writes through an NBD export during the paced runs. After
//! the kill every image checks clean (leaks allowed); the top reads as
//! the chain read before plus every guest write qemu-io reported done
//! (writethrough, so each was flushed); the images whose view the job
//! does not change read as before; and after `job-complete` has pivoted a
//! mirror or an active commit, the target reads as the disk.

mod crash_support;
mod daemon_support;
mod jobs_support;

use crash_support::kill::{check_after_kill, guest_data, QEMU_IMG};
use crash_support::{env_u64, Rng};
use daemon_support::{strata, Client, Running, Side};
use jobs_support::{answer, guest_io, nodes, start_exported, wait_for};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The disk's size: large enough that an unpaced job takes a while.
const SIZE: u64 = 64 * MIB;

/// A job and what it may change.
struct Job {
    name: &'static str,
    /// Its QMP command, `SPEED` standing for the speed argument.
    command: &'static str,
    /// Whether mid's own view and base's stay as they were.
    mid_holds: bool,
    base_holds: bool,
    /// The image that is the guest's disk once `job-complete` pivots.
    pivots_to: Option<&'static str>,
}

const JOBS: &[Job] = &[
    Job {
        name: "stream",
        command: r#"{"execute": "block-stream", "arguments": {"job-id": "j", "device": "c1-top"SPEED}}"#,
        mid_holds: true,
        base_holds: true,
        pivots_to: None,
    },
    Job {
        name: "commit",
        command: r#"{"execute": "block-commit", "arguments": {"job-id": "j", "device": "c1-top", "top-node": "c1-mid", "base-node": "c1-base"SPEED}}"#,
        mid_holds: true,
        base_holds: false,
        pivots_to: None,
    },
    Job {
        name: "active commit",
        command: r#"{"execute": "block-commit", "arguments": {"job-id": "j", "device": "c1-top"SPEED}}"#,
        mid_holds: false,
        base_holds: false,
        pivots_to: Some("c1-base.qcow2"),
    },
    Job {
        name: "mirror",
        command: r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "j", "device": "c1-top", "target": "t", "sync": "full"SPEED}}"#,
        mid_holds: true,
        base_holds: true,
        pivots_to: Some("target.qcow2"),
    },
    Job {
        name: "backup",
        command: r#"{"execute": "blockdev-backup", "arguments": {"job-id": "j", "device": "c1-top", "target": "t", "sync": "full"SPEED}}"#,
        mid_holds: true,
        base_holds: true,
        pivots_to: None,
    },
];

/// When a kill comes.
#[derive(Clone, Copy)]
enum When {
    /// At a random moment up to this long into the job.
    Within(Duration),
    /// As soon as the job has ended or is ready.
    AtEnd,
    /// As soon as `job-complete` has pivoted to the job's target.
    AfterPivot,
}

fn have_qemu() -> bool {
    daemon_support::qsd().is_some() && Path::new(QEMU_IMG).exists()
}

/// `c1-base <- c1-mid <- c1-top` of 64 MiB: base with 32 MiB of random
/// data, mid and top with patterns over parts of it and past it; and an
/// empty `target.qcow2` for mirror and backup.
fn images(side: &Side) {
    let script = format!(
        "head -c 32M /dev/urandom > data.raw && truncate -s {SIZE} data.raw && \
         qemu-img convert -O qcow2 data.raw c1-base.qcow2 && rm data.raw && \
         qemu-img create -q -f qcow2 -b c1-base.qcow2 -F qcow2 c1-mid.qcow2 && \
         qemu-img create -q -f qcow2 -b c1-mid.qcow2 -F qcow2 c1-top.qcow2 && \
         qemu-img create -q -f qcow2 target.qcow2 {SIZE} && \
         qemu-io -f qcow2 -c 'write -P 0x22 8M 8M' -c 'write -P 0x22 40M 4M' c1-mid.qcow2 >/dev/null && \
         qemu-io -f qcow2 -c 'write -P 0x33 20M 4M' -c 'write -P 0x33 48M 2M' c1-top.qcow2 >/dev/null"
    );
    let st = Command::new("sh")
        .args(["-c", &script])
        .current_dir(side.dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "could not make the images");
}

/// A daemon on fresh images with the chain's top exported: the daemon,
/// its monitor and the export's URI.
fn start(side: &Side) -> (Running, Client, String) {
    images(side);
    let mut args = nodes(side, 1);
    args.push("--blockdev".into());
    args.push("driver=qcow2,node-name=t,file.driver=file,file.filename=$DIR/target.qcow2".into());
    start_exported(side, &args)
}

/// The job's command at `speed` bytes a second (0: unpaced).
fn command(job: &Job, speed: u64) -> String {
    let speed = if speed == 0 {
        String::new()
    } else {
        format!(r#", "speed": {speed}"#)
    };
    job.command.replace("SPEED", &speed)
}

/// How long the job takes unkilled, from its start to its end or READY.
fn duration(job: &Job, speed: u64) -> Duration {
    let side = side();
    let (_d, mut c, _) = start(&side);
    let t = Instant::now();
    let ans = answer(&mut c, &command(job, speed));
    assert!(ans.contains("return"), "{}: {ans}", job.name);
    wait_for_end(&mut c, job);
    t.elapsed()
}

/// Reads events until the job has ended or is ready.
fn wait_for_end(c: &mut Client, job: &Job) {
    loop {
        let l = c.line();
        if l.contains("BLOCK_JOB_COMPLETED") || l.contains("BLOCK_JOB_READY") {
            assert!(!l.contains("\"error\""), "{}: {l}", job.name);
            return;
        }
    }
}

fn side() -> Side {
    let dir = tempfile::tempdir().unwrap();
    Side {
        prog: strata(dir.path()),
        dir,
    }
}

/// Random guest writes of 4 KiB to 1 MiB: qemu-io commands and what each
/// leaves, in order.
fn guest_writes(rng: &mut Rng) -> Vec<(String, u64, u64, u8)> {
    (0..8)
        .map(|i| {
            let len = (1 + rng.below(256)) * 4096;
            let off = rng.below((SIZE - len) / 4096) * 4096;
            let v = 0x40 + i as u8;
            (format!("write -P {v} {off} {len}"), off, len, v)
        })
        .collect()
}

/// One kill of `job` at `speed`. A paced job has the guest's writes
/// done first; they take a tenth of its time or so.
fn kill_once(job: &Job, speed: u64, when: When, rng: &mut Rng) {
    let side = side();
    let d = side.dir.path();
    let (daemon, mut c, uri) = start(&side);
    let before: Vec<Vec<u8>> = ["c1-top", "c1-mid", "c1-base"]
        .iter()
        .map(|i| guest_data(d, &format!("{i}.qcow2")))
        .collect();
    let ans = answer(&mut c, &command(job, speed));
    let t = Instant::now();
    assert!(ans.contains("return"), "{}: {ans}", job.name);
    // An unpaced job would be over before the guest's writes are.
    let writes = if speed == 0 {
        vec![]
    } else {
        guest_writes(rng)
    };
    let cmds: Vec<&str> = writes.iter().map(|w| w.0.as_str()).collect();
    if !cmds.is_empty() {
        guest_io(&uri, &cmds);
    }
    match when {
        When::Within(window) => {
            let at = Duration::from_millis(rng.below(window.as_millis() as u64 + 1));
            std::thread::sleep(at.saturating_sub(t.elapsed()));
        }
        // What the job said it did must be on disk.
        When::AtEnd => wait_for_end(&mut c, job),
        When::AfterPivot => {
            wait_for_end(&mut c, job);
            let ans = answer(
                &mut c,
                r#"{"execute": "job-complete", "arguments": {"id": "j"}}"#,
            );
            assert!(ans.contains("return"), "{}: {ans}", job.name);
            wait_for(&mut c, "BLOCK_JOB_COMPLETED");
        }
    }
    let after = t.elapsed();
    daemon.signal(libc::SIGKILL);
    drop(daemon);

    let what = format!(
        "{} at speed {speed}, {} guest writes, killed {after:?} into the job",
        job.name,
        writes.len()
    );
    for image in [
        "c1-top.qcow2",
        "c1-mid.qcow2",
        "c1-base.qcow2",
        "target.qcow2",
    ] {
        check_after_kill(d, image);
    }
    let mut want = before[0].clone();
    for (_, off, len, v) in &writes {
        want[*off as usize..(*off + *len) as usize].fill(*v);
    }
    assert!(
        guest_data(d, "c1-top.qcow2") == want,
        "{what}: the top does not read as the chain plus the guest's writes"
    );
    if let (When::AfterPivot, Some(image)) = (when, job.pivots_to) {
        assert!(
            guest_data(d, image) == want,
            "{what}: {image}, the guest's disk now, does not read as the chain plus the guest's writes"
        );
    }
    if job.mid_holds {
        assert!(
            guest_data(d, "c1-mid.qcow2") == before[1],
            "{what}: mid's view changed"
        );
    }
    if job.base_holds {
        assert!(
            guest_data(d, "c1-base.qcow2") == before[2],
            "{what}: base changed"
        );
    }
}

/// Kills every job `rounds` times from `seed`, unpaced and at 64 MiB/s by
/// turns, once more at each speed right after it ends, and once after a
/// pivot; returns the number of kills.
fn job_kills(seed: u64, rounds: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut kills = 0;
    for job in JOBS {
        for speed in [0, 64 * MIB] {
            let full = duration(job, speed);
            for _ in 0..rounds.div_ceil(2) {
                kill_once(job, speed, When::Within(full), &mut rng);
                kills += 1;
            }
            kill_once(job, speed, When::AtEnd, &mut rng);
            kills += 1;
            if job.pivots_to.is_some() {
                kill_once(job, speed, When::AfterPivot, &mut rng);
                kills += 1;
            }
        }
    }
    kills
}

#[test]
fn strata_daemon_killed_mid_job() {
    if !have_qemu() {
        return;
    }
    job_kills(42, 4);
}

/// The long run of `scripts/kill-soak`: STRATA_JOB_KILLS kills (default
/// 100) from seed STRATA_KILL_SEED.
#[test]
#[ignore]
fn job_kill_soak() {
    if !have_qemu() {
        return;
    }
    let (seed, want) = (
        env_u64("STRATA_KILL_SEED", 1000),
        env_u64("STRATA_JOB_KILLS", 100),
    );
    let (mut kills, mut s) = (0, seed);
    while kills < want {
        kills += job_kills(s, 10);
        s += 1;
    }
    println!("job kill soak: seeds {seed}..{s}, {kills} kills, every image checked clean");
}
