//! The mirror job and active commit over QMP: the same conversations with
//! strata-daemon and qemu-storage-daemon give the same answers and events,
//! and leave the same images.

mod daemon_support;
mod jobs_support;
use daemon_support::*;
use jobs_support::*;

/// A 4 MiB qcow2 target `cN-tgt.qcow2` beside each chain.
fn targets(side: &Side) {
    for i in 1..=3 {
        side.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &format!("c{i}-tgt.qcow2"),
            "4M",
        ]);
    }
}

/// The chains' nodes and a node `tN` for each target.
fn with_targets(side: &Side, n: usize) -> Vec<String> {
    let mut v = nodes(side, n);
    for i in 1..=n {
        v.push("--blockdev".into());
        v.push(format!(
            "driver=qcow2,node-name=t{i},file.driver=file,file.filename=$DIR/c{i}-tgt.qcow2"
        ));
    }
    v
}

const READY: &str = r#""status": "ready""#;

#[test]
fn a_full_mirror_gets_ready_and_pivots_as_in_qemu() {
    let steps = [
        S::Ask(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m1", "device": "c1-top", "target": "t1", "sync": "full"}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        S::Ask(
            r#"{"execute": "job-complete", "arguments": {"id": "m1"}}"#,
            5,
        ),
        S::Ask(r#"{"execute": "query-block"}"#, 0),
    ];
    same_jobs_and_images(1, with_targets, targets, &steps, &["c1-tgt.qcow2"]);
}

#[test]
fn refused_mirrors_as_qemu_storage_daemon_refuses_them() {
    let m = |args: &'static str| S::Ask(args, 0);
    let steps = [
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "nosuch", "target": "t1", "sync": "full"}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-mid", "target": "t1", "sync": "full"}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "nosuch", "sync": "full"}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "t1", "sync": "full", "granularity": 256}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "t1", "sync": "full", "granularity": 3000}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "t1", "sync": "incremental"}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "t1", "sync": "full", "buf-size": -1}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "c1-top", "sync": "full"}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "c1-mid", "sync": "full"}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "t1", "sync": "full", "replaces": "nosuch"}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "t1", "sync": "full", "replaces": "c1-mid"}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"device": "c1-top", "target": "t1", "sync": "full"}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "t1", "sync": "full", "speed": -1}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "t1", "sync": "full", "filter-node-name": "c1-base"}}"#,
        ),
        m(r#"{"execute": "query-jobs"}"#),
        // A job that cannot be completed or changed yet.
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "c2-top", "target": "t2", "sync": "full", "speed": 1}}"#,
        ),
        m(r#"{"execute": "job-complete", "arguments": {"id": "m"}}"#),
        m(
            r#"{"execute": "block-job-change", "arguments": {"id": "m", "type": "mirror", "copy-mode": "background"}}"#,
        ),
        m(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m2", "device": "c2-top", "target": "t1", "sync": "full"}}"#,
        ),
        // Answered first, as QEMU answers a mirror's cancel; the job's four
        // last events follow (how soon is the scheduler's business).
        S::Ask(
            r#"{"execute": "block-job-cancel", "arguments": {"device": "m"}}"#,
            4,
        ),
        m(r#"{"execute": "query-jobs"}"#),
    ];
    same_jobs_and_images(2, with_targets, targets, &steps, &[]);
}

/// Cancelled once READY, a mirror ends as a success and leaves the target
/// a copy; the source stays in place. Top sync copies only the top image.
#[test]
fn a_mirror_cancelled_when_ready_completes_without_pivoting_as_in_qemu() {
    let steps = [
        S::Ask(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m1", "device": "c1-top", "target": "t1", "sync": "top"}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(
            r#"{"execute": "block-job-cancel", "arguments": {"device": "m1"}}"#,
            5,
        ),
        // Write-blocking from the start, and a change to it when ready.
        S::Ask(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m2", "device": "c2-top", "target": "t2", "sync": "full", "copy-mode": "write-blocking", "auto-dismiss": false}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        S::Ask(
            r#"{"execute": "block-job-change", "arguments": {"id": "m2", "type": "mirror", "copy-mode": "background"}}"#,
            0,
        ),
        S::Ask(r#"{"execute": "job-cancel", "arguments": {"id": "m2"}}"#, 3),
        S::Ask(
            r#"{"execute": "job-dismiss", "arguments": {"id": "m2"}}"#,
            0,
        ),
    ];
    same_jobs_and_images(
        2,
        with_targets,
        targets,
        &steps,
        &["c1-tgt.qcow2", "c2-tgt.qcow2"],
    );
}

/// Committing the active layer runs as a mirror into the base: READY, then
/// `job-complete` makes the base the disk.
#[test]
fn an_active_commit_gets_ready_and_pivots_as_in_qemu() {
    let steps = [
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k1", "device": "c1-top"}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        S::Ask(
            r#"{"execute": "job-complete", "arguments": {"id": "k1"}}"#,
            5,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k2", "device": "c2-top", "base-node": "c2-mid", "auto-finalize": false}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(
            r#"{"execute": "job-complete", "arguments": {"id": "k2"}}"#,
            3,
        ),
        S::Ask(
            r#"{"execute": "job-finalize", "arguments": {"id": "k2"}}"#,
            0,
        ),
    ];
    // The bases are written by copies in flight: their layout, and the
    // maps of the images over them, vary; their content may not.
    let written = [
        "c1-base.qcow2",
        "c1-mid.qcow2",
        "c1-top.qcow2",
        "c2-mid.qcow2",
        "c2-top.qcow2",
    ];
    same_jobs_and_images(2, with_targets, targets, &steps, &written);
}

/// A guest writes to the disk over NBD while a mirror runs: before the
/// copy reaches it, once READY (background copy), and after a switch to
/// write-blocking, some writes not aligned to the granularity. After the
/// pivot the target is the disk, and it holds every write: it compares
/// equal to the source chain. Run on both daemons.
#[test]
fn guest_writes_during_a_mirror_all_reach_the_target() {
    let Some((s, q)) = sides() else {
        return;
    };
    for side in [&s, &q] {
        chains(side, 1);
        targets(side);
        let (d, mut c, uri) = start_exported(side, &with_targets(side, 1));
        // One granule a step, and hardly any speed: the copy waits.
        let mirror = r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m1", "device": "c1-top", "target": "t1", "sync": "full", "granularity": 65536, "buf-size": 65536, "speed": 1}}"#;
        assert!(answer(&mut c, mirror).contains("return"));
        guest_io(
            &uri,
            &[
                "write -P 0x41 64k 64k",
                "write -P 0x42 3000k 4k",
                "write -P 0x43 4000 1000",
            ],
        );
        let fast =
            r#"{"execute": "block-job-set-speed", "arguments": {"device": "m1", "speed": 0}}"#;
        assert!(answer(&mut c, fast).contains("return"));
        wait_for(&mut c, "BLOCK_JOB_READY");
        guest_io(&uri, &["write -P 0x44 1M 128k", "write -P 0x45 200k 3k"]);
        let change = r#"{"execute": "block-job-change", "arguments": {"id": "m1", "type": "mirror", "copy-mode": "write-blocking"}}"#;
        assert!(answer(&mut c, change).contains("return"));
        guest_io(
            &uri,
            &[
                "write -P 0x46 2M 4k",
                "write -P 0x47 100000 5000",
                "write -z 3M 64k",
            ],
        );
        let done = r#"{"execute": "job-complete", "arguments": {"id": "m1"}}"#;
        assert!(answer(&mut c, done).contains("return"));
        wait_for(&mut c, r#""status": "null""#);
        // The export now serves the target: a write lands there only.
        guest_io(&uri, &["write -P 0x48 512k 4k"]);
        answer(&mut c, r#"{"execute": "quit"}"#);
        d.wait();
        let (out, code) = side.qemu_img(&["compare", "-U", "c1-top.qcow2", "c1-tgt.qcow2"]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("524288"), "{out}");
        let (out, code) = side.qemu_img(&["check", "c1-tgt.qcow2"]);
        assert_eq!(code, 0, "{out}");
        // Apart from the write after the pivot, they are the same disk.
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x48 512k 4k", "c1-top.qcow2"])
            .current_dir(side.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        let (out, code) = side.qemu_img(&["compare", "-U", "c1-top.qcow2", "c1-tgt.qcow2"]);
        assert_eq!(code, 0, "{out}");
    }
}

/// `drive-mirror` creates its target: without a backing file for `full`,
/// over the source's backing file for `top`; or mirrors onto an existing
/// image, which opens the backing file its header names at the end.
#[test]
fn drive_mirror_creates_its_target_as_in_qemu() {
    let steps = [
        S::Ask(
            r#"{"execute": "drive-mirror", "arguments": {"job-id": "m", "device": "c1-mid", "target": "d.qcow2", "sync": "full"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "drive-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "d.qcow2", "sync": "full", "replaces": "c1-top"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "drive-mirror", "arguments": {"job-id": "m", "device": "c1-top", "target": "d.qcow2", "sync": "full", "format": "nosuch"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "drive-mirror", "arguments": {"job-id": "m1", "device": "c1-top", "target": "d1.qcow2", "sync": "full", "node-name": "d1"}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(
            r#"{"execute": "job-complete", "arguments": {"id": "m1"}}"#,
            5,
        ),
        S::Ask(
            r#"{"execute": "drive-mirror", "arguments": {"job-id": "m2", "device": "c2-top", "target": "d2.qcow2", "sync": "top", "node-name": "d2"}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(
            r#"{"execute": "job-complete", "arguments": {"id": "m2"}}"#,
            5,
        ),
        S::Ask(
            r#"{"execute": "drive-mirror", "arguments": {"job-id": "m3", "device": "c3-top", "target": "c3-tgt.qcow2", "sync": "top", "mode": "existing", "node-name": "d3"}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(
            r#"{"execute": "job-complete", "arguments": {"id": "m3"}}"#,
            5,
        ),
        S::Ask(
            r#"{"execute": "drive-mirror", "arguments": {"job-id": "m4", "device": "c4-top", "target": "c4-tgt.qcow2", "sync": "top", "mode": "existing", "node-name": "d4"}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(
            r#"{"execute": "job-complete", "arguments": {"id": "m4"}}"#,
            5,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
    ];
    // c3's target names c3-mid as its backing file: the daemon has that
    // image open for writing, so the job fails at the end, in both. c4's
    // names a copy of c4-mid that no one has open: it is opened.
    let setup = |side: &Side| {
        targets(side);
        let create = |b: &str, img: &str| {
            side.qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", img]);
        };
        create("c3-mid.qcow2", "c3-tgt.qcow2");
        side.qemu_img(&["convert", "-O", "qcow2", "c4-mid.qcow2", "e4.qcow2"]);
        create("e4.qcow2", "c4-tgt.qcow2");
    };
    let made = ["d1.qcow2", "d2.qcow2", "c3-tgt.qcow2", "c4-tgt.qcow2"];
    let Some(got) = same_jobs_and_images(4, nodes, setup, &steps, &made) else {
        return;
    };
    let ended = |id: &str| {
        got.iter()
            .find(|l| l.contains("BLOCK_JOB_COMPLETED") && l.contains(&format!("\"{id}\"")))
            .cloned()
            .unwrap_or_default()
    };
    for id in ["m1", "m2", "m4"] {
        assert!(
            !ended(id).is_empty() && !ended(id).contains("error"),
            "{id}"
        );
    }
    assert!(ended("m3").contains("Invalid argument"));
}

/// The target of a `top` mirror over the source's own backing file, as
/// libvirt sets one up: the two share nodes, and the job's last drain
/// must not hold back its own flush of the target.
fn with_overlay_targets(side: &Side, n: usize) -> Vec<String> {
    let mut v = nodes(side, n);
    for i in 1..=n {
        v.push("--blockdev".into());
        v.push(format!(
            "driver=qcow2,node-name=t{i},file.driver=file,file.filename=$DIR/c{i}-tgt.qcow2,backing=c{i}-mid"
        ));
    }
    v
}

#[test]
fn a_top_mirror_onto_an_overlay_of_the_same_backing_file_as_in_qemu() {
    let steps = [
        S::Ask(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m1", "device": "c1-top", "target": "t1", "sync": "top"}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(
            r#"{"execute": "job-complete", "arguments": {"id": "m1"}}"#,
            5,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
    ];
    let setup = |side: &Side| {
        side.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "c1-mid.qcow2",
            "-F",
            "qcow2",
            "c1-tgt.qcow2",
        ]);
    };
    same_jobs_and_images(1, with_overlay_targets, setup, &steps, &["c1-tgt.qcow2"]);
}
