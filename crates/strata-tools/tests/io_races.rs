//! Interleavings that lost data, forced with blkdebug breakpoints through
//! strata-io (issue "A core that runs live"): each held a request at a
//! chosen point while others ran, then required the data to read back and
//! `qemu-img check` to find nothing wrong. Two of them (a late write into a
//! discarded or shrunk-away cluster) fail with QEMU 10.0.2's qemu-io too, so
//! they are checked on their own rather than against it.

mod io_support;
use io_support::{have_oracle, same};
use std::path::Path;
use std::process::Command;

const STRATA_IO: &str = env!("CARGO_BIN_EXE_strata-io");
const STRATA_IMG: &str = env!("CARGO_BIN_EXE_strata-img");

/// Runs a program in `dir` under a time limit (a lost wake-up must fail
/// the test, not hang it); returns stdout + stderr, requiring success.
fn run(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("60")
        .arg(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{prog} {args:?} failed: {text}");
    text
}

/// A fresh 1 MiB qcow2 image `a.qcow2`, made by strata-img.
fn fresh(dir: &Path) {
    run(dir, STRATA_IMG, &["create", "-f", "qcow2", "a.qcow2", "1M"]);
}

/// strata-io with `-c` for each command; no pattern check may fail.
fn io(dir: &Path, cmds: &[&str]) -> String {
    let mut args = Vec::new();
    for c in cmds {
        args.push("-c");
        args.push(*c);
    }
    let text = run(dir, STRATA_IO, &args);
    assert!(
        !text.contains("Pattern verification failed"),
        "data lost: {cmds:?}\n{text}"
    );
    text
}

/// `qemu-img check` finds nothing wrong.
fn check_clean(dir: &Path) {
    let text = run(dir, "qemu-img", &["check", "a.qcow2"]);
    assert!(text.contains("No errors were found"), "{text}");
}

const OPEN: &str = "open -o driver=qcow2 blkdebug::a.qcow2";

#[test]
fn zero_write_does_not_wipe_a_write_in_flight_in_the_same_cluster() {
    if !have_oracle() {
        return;
    }
    let cmds = [
        "-c",
        OPEN,
        "-c",
        "break write_aio A",
        "-c",
        "aio_write -P 0xaa 32k 4k",
        "-c",
        "wait_break A",
        "-c",
        "aio_write -z 0 4k",
        "-c",
        "resume A",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0xaa 32k 4k",
        "-c",
        "read -P 0 0 4k",
    ];
    // qemu-io gets this right: the same output, byte for byte.
    same("qemu-img create -f qcow2 a.qcow2 1M", &cmds, None);
    let dir = tempfile::tempdir().unwrap();
    fresh(dir.path());
    let only: Vec<&str> = cmds.iter().skip(1).step_by(2).copied().collect();
    io(dir.path(), &only);
    check_clean(dir.path());
}

#[test]
fn late_in_place_write_never_lands_in_a_reused_cluster() {
    if !have_oracle() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fresh(d);
    io(d, &["open a.qcow2", "write -P 1 0 64k"]);
    io(
        d,
        &[
            OPEN,
            "break write_aio A",
            "aio_write -P 0xaa 0 4k",
            "wait_break A",
            "discard 0 64k",
            "write -P 0xbb 128k 64k",
            "resume A",
            "aio_flush",
            "read -P 0xbb 128k 64k",
        ],
    );
    check_clean(d);
    io(d, &[OPEN, "read -P 0xbb 128k 64k"]);
}

/// Two late writes in two epochs (host_inflight.rs): A's cluster is freed
/// while only A runs, B starts after that and its cluster is freed while A
/// still runs. When A ends, A's cluster may be reused but B's may not, though
/// the two are neighbours and the next allocation wants two clusters.
#[test]
fn a_cluster_freed_under_two_epochs_waits_for_the_younger_write() {
    if !have_oracle() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fresh(d);
    io(
        d,
        &["open a.qcow2", "write -P 1 0 64k", "write -P 2 256k 64k"],
    );
    io(
        d,
        &[
            OPEN,
            "break write_aio A",
            "aio_write -P 0xaa 0 4k",
            "wait_break A",
            "discard 0 64k",
            "break write_aio B",
            "aio_write -P 0xbb 256k 4k",
            "wait_break B",
            "discard 256k 64k",
            "resume A",
            // Not aio_flush: that would wait for B too; the loop lets A land.
            "sleep 100",
            "write -P 0xcc 512k 128k",
            "resume B",
            "aio_flush",
            "read -P 0xcc 512k 128k",
        ],
    );
    check_clean(d);
    io(d, &[OPEN, "read -P 0xcc 512k 128k"]);
}

#[test]
fn late_write_past_a_shrink_never_lands_in_a_reused_cluster() {
    if !have_oracle() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fresh(d);
    io(d, &[OPEN, "write -P 1 0 64k", "write -P 2 512k 64k"]);
    io(
        d,
        &[
            OPEN,
            "break write_aio A",
            "aio_write -P 0xaa 512k 4k",
            "wait_break A",
            "truncate 256k",
            "write -P 0xbb 128k 64k",
            "resume A",
            "aio_flush",
            "read -P 0xbb 128k 64k",
            "read -P 1 0 64k",
        ],
    );
    check_clean(d);
    io(d, &[OPEN, "read -P 0xbb 128k 64k", "read -P 1 0 64k"]);
}

#[test]
fn unknown_autoclear_bits_are_cleared_by_a_writer() {
    if !have_oracle() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fresh(d);
    run(d, "qemu-img", &["bitmap", "--add", "a.qcow2", "b0"]);
    let before = run(d, "qemu-img", &["info", "--output=json", "a.qcow2"]);
    assert!(before.contains("\"b0\""), "{before}");
    // A reader changes nothing.
    io(d, &["open -r a.qcow2", "read 0 64k"]);
    let still = run(d, "qemu-img", &["info", "--output=json", "a.qcow2"]);
    assert!(still.contains("\"b0\""), "{still}");
    io(d, &["open a.qcow2", "write 0 64k"]);
    // Strata keeps bitmaps now: b0 recorded the write and stays valid.
    let after = run(d, "qemu-img", &["info", "--output=json", "a.qcow2"]);
    assert!(after.contains("\"b0\""), "{after}");
    assert!(
        !after.contains("a program lacking bitmap support modified this file"),
        "{after}"
    );
}

#[test]
fn direct_io_alignment_is_not_fooled_by_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::File::create(d.join("r.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let probe = Command::new(STRATA_IO)
        .args(["-f", "raw", "-t", "none", "-c", "read 0 512", "r.raw"])
        .current_dir(d)
        .output()
        .unwrap();
    if !probe.status.success() {
        // No O_DIRECT on this file system (tmpfs before Linux 6.6).
        println!("skipped: O_DIRECT not supported here");
        return;
    }
    let args = [
        "-f",
        "raw",
        "-t",
        "none",
        "-c",
        "write -P 1 1 128k",
        "r.raw",
    ];
    run(d, STRATA_IO, &args);
    let args = ["-f", "raw", "-t", "none", "-c", "read -P 1 1 128k", "r.raw"];
    let text = run(d, STRATA_IO, &args);
    assert!(!text.contains("Pattern verification failed"), "{text}");
}

/// A zero cluster that keeps its host cluster is written in place, as
/// qemu-io writes it: the same mapping and the same file size afterwards,
/// and the rest of the cluster reads as zeroes.
#[test]
fn a_zero_cluster_that_keeps_its_host_is_written_in_place() {
    if !have_oracle() {
        return;
    }
    let cmds = [
        "write -P 1 0 128k",
        "write -z 0 128k",
        "write -P 0xaa 4k 4k",
    ];
    let mut results = Vec::new();
    for prog in ["qemu-io", STRATA_IO] {
        let dir = tempfile::tempdir().unwrap();
        fresh(dir.path());
        let mut args = Vec::new();
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push("a.qcow2");
        run(dir.path(), prog, &args);
        let map = run(dir.path(), "qemu-img", &["map", "--output=json", "a.qcow2"]);
        let size = std::fs::metadata(dir.path().join("a.qcow2")).unwrap().len();
        io(
            dir.path(),
            &[
                "open a.qcow2",
                "read -P 0 0 4k",
                "read -P 0xaa 4k 4k",
                "read -P 0 8k 120k",
            ],
        );
        check_clean(dir.path());
        results.push((map, size));
    }
    assert_eq!(
        results[1], results[0],
        "strata-io placed the data elsewhere"
    );
}

/// A write into a zero cluster that keeps its host cluster goes there in
/// place, so that host cluster is not held like a data cluster's: what
/// keeps it is the guest cluster in flight. Held at `write_aio`, the write
/// must make a whole-cluster unmapping zero write of that cluster wait, so
/// the host cluster cannot be freed and handed to another write meanwhile
/// (the late in-place write would land in that write's data).
#[test]
fn in_place_write_into_a_zero_cluster_keeps_its_host_until_done() {
    if !have_oracle() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fresh(d);
    io(d, &["open a.qcow2", "write -P 1 0 64k", "write -z 0 64k"]);
    io(
        d,
        &[
            OPEN,
            "break write_aio A",
            "aio_write -P 0xaa 0 4k",
            "wait_break A",
            "aio_write -z -u 0 64k",
            "write -P 0xbb 128k 64k",
            "resume A",
            "aio_flush",
            "read -P 0xbb 128k 64k",
            "read -P 0 0 64k",
        ],
    );
    check_clean(d);
    io(d, &[OPEN, "read -P 0xbb 128k 64k", "read -P 0 0 64k"]);
}

/// A run of data clusters and a zero cluster that keeps its host cluster
/// is written in place in one request, as qemu-io writes it (iotest 066),
/// but only over the bytes asked for: an earlier write to the rest of the
/// first data cluster, held until the run has read what it would have
/// copied, must still be there afterwards.
#[test]
fn a_run_written_in_place_leaves_the_rest_of_its_data_clusters_alone() {
    if !have_oracle() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fresh(d);
    io(d, &[OPEN, "write -P 1 0 192k", "write -z 64k 64k"]);
    let before = run(d, "qemu-img", &["map", "--output=json", "a.qcow2"]);
    io(
        d,
        &[
            OPEN,
            "break write_aio A",
            "aio_write -P 0xbb 0 4k",
            "wait_break A",
            "break write_aio B",
            "aio_write -P 0xaa 32k 160k",
            "wait_break B",
            "resume A",
            "sleep 200",
            "resume B",
            "aio_flush",
            "read -P 0xbb 0 4k",
            "read -P 1 4k 28k",
            "read -P 0xaa 32k 160k",
        ],
    );
    check_clean(d);
    io(
        d,
        &[
            OPEN,
            "read -P 0xbb 0 4k",
            "read -P 1 4k 28k",
            "read -P 0xaa 32k 160k",
        ],
    );
    // In place: the three clusters where they were, now one data extent.
    let after = run(d, "qemu-img", &["map", "--output=json", "a.qcow2"]);
    let first_host = |m: &str| m.split("\"offset\": ").nth(1).map(|r| r[..6].to_string());
    assert_eq!(first_host(&after), first_host(&before), "the run moved");
    assert!(
        after.contains("\"start\": 0, \"length\": 196608"),
        "{after}"
    );
}
