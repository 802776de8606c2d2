//! The backup job over QMP: the same conversations with strata-daemon and
//! qemu-storage-daemon give the same answers, events and bitmaps, and
//! leave targets that hold the same disk; a guest writing during a backup
//! never changes what the target gets.

mod daemon_support;
mod jobs_support;
use daemon_support::*;
use jobs_support::*;

fn a(s: &'static str) -> S<'static> {
    S::Ask(s, 0)
}

const NODES: &str = r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#;

#[test]
fn refused_backups_as_qemu_storage_daemon_refuses_them() {
    let steps = [
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "c1-top", "sync": "full"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "big", "sync": "full"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "nosuch", "target": "t1", "sync": "full"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "nosuch", "sync": "full"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "bitmap"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "incremental", "bitmap": "x", "bitmap-mode": "never"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "bitmap": "x"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "bitmap-mode": "never"}}"#,
        ),
        a(r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "c1-top", "name": "x"}}"#),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "bitmap": "x"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "none", "bitmap": "x", "bitmap-mode": "always"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "top", "bitmap": "x", "bitmap-mode": "never"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "on-source-error": "enospc"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "speed": -1}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b1", "device": "c1-top", "target": "t1", "sync": "none"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b1", "device": "c1-mid", "target": "t2", "sync": "full"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b2", "device": "c1-top", "target": "t2", "sync": "none", "filter-node-name": "c1-mid"}}"#,
        ),
        a(r#"{"execute": "query-block-jobs"}"#),
        a(NODES),
        // Answered once the job is gone.
        a(r#"{"execute": "job-cancel", "arguments": {"id": "b1"}}"#),
        a(NODES),
    ];
    same_jobs_and_images(1, with_targets, targets, &steps, &[]);
}

#[test]
fn backups_and_their_bitmaps_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "c1-top", "name": "x", "persistent": true}}"#,
        ),
        // A full backup that keeps its bitmap for the next incremental
        // one, waiting to be finalized.
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b1", "device": "c1-top", "target": "t1", "sync": "full", "bitmap": "x", "bitmap-mode": "on-success", "auto-finalize": false, "auto-dismiss": false}}"#,
        ),
        S::Until(r#""status": "pending""#),
        a(NODES),
        S::Ask(
            r#"{"execute": "job-finalize", "arguments": {"id": "b1"}}"#,
            0,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "b1"}}"#),
        a(NODES),
        // The top image's own clusters, compressed.
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b2", "device": "c1-top", "target": "t2", "sync": "top", "compress": true, "auto-dismiss": false}}"#,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "b2"}}"#),
        // The image's own bitmap, with x merged in, drives a bitmap backup.
        a(
            r#"{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "c1-top", "target": "y", "bitmaps": ["x"]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b3", "device": "c1-top", "target": "t3", "sync": "bitmap", "bitmap": "y", "bitmap-mode": "always", "auto-dismiss": false}}"#,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "b3"}}"#),
        a(NODES),
    ];
    // A persistent bitmap `y`, disabled, that marks a guest write.
    let setup = |side: &Side| {
        targets(side);
        side.qemu_img(&["bitmap", "--add", "c1-top.qcow2", "y"]);
        let out = std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x55 512k 64k",
                "c1-top.qcow2",
            ])
            .current_dir(side.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        side.qemu_img(&["bitmap", "--disable", "c1-top.qcow2", "y"]);
    };
    same_jobs_and_images(
        1,
        with_targets,
        setup,
        &steps,
        &["c1-tgt.qcow2", "c1-tg2.qcow2", "c1-tg3.qcow2"],
    );
}

/// The incremental backup flow: a bitmap and a full backup started
/// together, in one transaction, or neither; a backup in a transaction
/// that fails is cancelled before it ran.
#[test]
fn backups_in_transactions_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "c1-top", "name": "x"}}, {"type": "blockdev-backup", "data": {"job-id": "j1", "device": "c1-top", "target": "t1", "sync": "full"}}, {"type": "abort", "data": {}}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "c1-top", "name": "x"}}, {"type": "blockdev-backup", "data": {"job-id": "j2", "device": "c1-top", "target": "t1", "sync": "full", "auto-dismiss": false}}]}}"#,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "j2"}}"#),
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup", "data": {"job-id": "j4", "device": "c1-top", "target": "t2", "sync": "incremental", "bitmap": "x"}}, {"type": "blockdev-backup", "data": {"job-id": "j4", "device": "c1-mid", "target": "t3", "sync": "full"}}]}}"#,
        ),
        // Only backups may complete as a group.
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup", "data": {"job-id": "j5", "device": "c1-top", "target": "t2", "sync": "full"}}, {"type": "abort", "data": {}}], "properties": {"completion-mode": "grouped"}}}"#,
        ),
        a(NODES),
    ];
    same_jobs_and_images(1, with_targets, targets, &steps, &["c1-tgt.qcow2"]);
}

/// A guest writes over NBD while a slow full backup runs, and while a
/// `none` backup (fleecing) holds the point in time: the full backup's
/// target is the disk as it was when the job started, and the `none`
/// target holds the old data of exactly what the guest overwrote. Run on
/// both daemons.
#[test]
fn guest_writes_during_a_backup_never_reach_the_target() {
    let Some((s, q)) = sides() else {
        return;
    };
    for side in [&s, &q] {
        chains(side, 1);
        targets(side);
        // The disk as it is before the job: what the target must hold.
        side.qemu_img(&["convert", "-O", "raw", "c1-top.qcow2", "before.raw"]);
        let (d, mut c, uri) = start_exported(side, &with_targets(side, 1));
        // Hardly any speed: the job copies its first piece and waits.
        let backup = r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b1", "device": "c1-top", "target": "t1", "sync": "full", "speed": 1}}"#;
        assert!(answer(&mut c, backup).contains("return"));
        let fleece = r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b2", "device": "c1-top", "target": "t2", "sync": "none"}}"#;
        assert!(answer(&mut c, fleece).contains("return"));
        guest_io(
            &uri,
            &[
                "write -P 0x41 64k 64k",
                "write -P 0x42 3000k 4k",
                "write -P 0x43 4000 1000",
                "write -z 1M 128k",
                "discard 2M 64k",
                "write -P 0x44 2040k 16k",
            ],
        );
        let fast =
            r#"{"execute": "block-job-set-speed", "arguments": {"device": "b1", "speed": 0}}"#;
        assert!(answer(&mut c, fast).contains("return"));
        wait_for(&mut c, r#""status": "null", "id": "b1""#);
        guest_io(&uri, &["write -P 0x45 0 4k"]);
        // Answered once the job is gone.
        let stop = r#"{"execute": "job-cancel", "arguments": {"id": "b2"}}"#;
        assert!(answer(&mut c, stop).contains("return"));
        answer(&mut c, r#"{"execute": "quit"}"#);
        d.wait();
        let (out, code) = side.qemu_img(&["compare", "-U", "before.raw", "c1-tgt.qcow2"]);
        assert_eq!(code, 0, "{}: {out}", side.prog.display());
        // The fleecing target has the old data where the guest wrote, and
        // nothing else.
        let (map, _) = side.qemu_img(&["map", "-U", "--output=json", "c1-tg2.qcow2"]);
        for (off, len) in [
            (0u64, 64u64 << 10),
            (64 << 10, 64 << 10),
            (1 << 20, 128 << 10),
            (2 << 20, 64 << 10),
            (1984 << 10, 128 << 10),
            (2944 << 10, 64 << 10),
        ] {
            let read = format!("read -v {off} {len}");
            let got = std::process::Command::new("qemu-io")
                .args(["-U", "-f", "qcow2", "-c", &read, "c1-tg2.qcow2"])
                .current_dir(side.dir.path())
                .output()
                .unwrap();
            let want = std::process::Command::new("qemu-io")
                .args(["-U", "-f", "raw", "-c", &read, "before.raw"])
                .current_dir(side.dir.path())
                .output()
                .unwrap();
            let body = |o: &std::process::Output| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| !l.contains("ops/sec"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(body(&got), body(&want), "{off}: {map}");
        }
        let (out, code) = side.qemu_img(&["check", "c1-tg2.qcow2"]);
        assert_eq!(code, 0, "{out}");
    }
}

#[test]
fn drive_backups_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "drive-backup", "arguments": {"job-id": "x", "device": "nope", "target": "n.qcow2", "sync": "full"}}"#,
        ),
        // A new image in the source's format, then one over the source's
        // backing file (whose lock the open daemon holds, as in QEMU).
        a(
            r#"{"execute": "drive-backup", "arguments": {"job-id": "b1", "device": "c1-top", "target": "full.qcow2", "sync": "full", "auto-dismiss": false}}"#,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "b1"}}"#),
        a(
            r#"{"execute": "drive-backup", "arguments": {"job-id": "b2", "device": "c1-top", "target": "top.qcow2", "sync": "top"}}"#,
        ),
        // No backing file: top is a full backup; raw on request.
        a(
            r#"{"execute": "drive-backup", "arguments": {"job-id": "b3", "device": "c1-base", "target": "raw.img", "sync": "top", "format": "raw", "auto-dismiss": false}}"#,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "b3"}}"#),
        a(
            r#"{"execute": "drive-backup", "arguments": {"job-id": "b4", "device": "c1-top", "target": "c1-tgt.qcow2", "sync": "full", "mode": "existing"}}"#,
        ),
        // Fleecing: the new image goes over the source itself.
        a(
            r#"{"execute": "drive-backup", "arguments": {"job-id": "b5", "device": "c1-top", "target": "none.qcow2", "sync": "none", "filter-node-name": "f5"}}"#,
        ),
        a(NODES),
        a(r#"{"execute": "job-cancel", "arguments": {"id": "b5"}}"#),
        a(
            r#"{"execute": "drive-backup", "arguments": {"job-id": "b6", "device": "c1-top", "target": "bm.qcow2", "sync": "bitmap"}}"#,
        ),
        // In a transaction: undone by an abort, or started with a bitmap.
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "drive-backup", "data": {"job-id": "t1", "device": "c1-top", "target": "t1.qcow2", "sync": "full"}}, {"type": "abort", "data": {}}]}}"#,
        ),
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "c1-top", "name": "bm"}}, {"type": "drive-backup", "data": {"job-id": "t2", "device": "c1-top", "target": "t2.qcow2", "sync": "full", "auto-dismiss": false}}]}}"#,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "t2"}}"#),
        a(NODES),
    ];
    same_jobs_and_images(
        1,
        with_targets,
        targets,
        &steps,
        &["full.qcow2", "none.qcow2", "t2.qcow2"],
    );
}
