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

/// `x-perf` (QEMU's BackupPerf): each range and cluster size refused in
/// QEMU's order and words; accepted, it changes how the job copies, not
/// what the target gets. `c1-tg3` has 2 MiB clusters here.
#[test]
fn backup_performance_options_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "x-perf": {"max-workers": 0}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "x-perf": {"max-workers": 2147483648}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "x-perf": {"max-chunk": -1}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "x-perf": {"max-chunk": -1, "max-workers": 0}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "x-perf": {"min-cluster-size": 1000}}}"#,
        ),
        // Negative sizes wrap, as QEMU's visitor takes them.
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "x-perf": {"min-cluster-size": -5}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "x-perf": {"max-chunk": 4096}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "x-perf": {"max-chunk": 65536, "min-cluster-size": 131072}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t3", "sync": "full", "x-perf": {"max-chunk": 1048576}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "filter-node-name": "c1-mid", "x-perf": {"min-cluster-size": 1000}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "x-perf": {"max-workers": "a"}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "x-perf": {"foo": 1}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"device": "c1-top", "target": "t1", "sync": "full", "discard-source": 1}}"#,
        ),
        // One 64 KiB copy at a time; then clusters of 4 MiB.
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b1", "device": "c1-top", "target": "t1", "sync": "full", "auto-dismiss": false, "x-perf": {"max-workers": 1, "max-chunk": 65536, "use-copy-range": true}}}"#,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "b1"}}"#),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b2", "device": "c1-top", "target": "t3", "sync": "full", "auto-dismiss": false, "x-perf": {"min-cluster-size": 4194304, "max-chunk": 2097152}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b2", "device": "c1-top", "target": "t3", "sync": "full", "auto-dismiss": false, "x-perf": {"min-cluster-size": 4194304}}}"#,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "b2"}}"#),
    ];
    let setup = |side: &Side| {
        targets(side);
        side.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "c1-tg3.qcow2",
            "4M",
        ]);
    };
    same_jobs_and_images(
        1,
        with_targets,
        setup,
        &steps,
        &["c1-tgt.qcow2", "c1-tg3.qcow2"],
    );
}

/// Push backup from a fleecing image with `discard-source` (QEMU's test
/// backup-discard-source): what the backup copied is given back by the
/// temporary image, and the copy-before-write filter stops copying those
/// clusters. Guest writes go through an NBD export of the filter.
#[test]
fn a_fleecing_image_given_back_as_the_backup_copies_it() {
    let setup = |side: &Side| {
        for img in ["src", "temp", "tgt"] {
            side.qemu_img(&["create", "-q", "-f", "qcow2", &format!("{img}.qcow2"), "1M"]);
        }
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x11 0 1M", "src.qcow2"])
            .current_dir(side.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    let nodes = [
        a(
            r#"{"execute": "blockdev-add", "arguments": {"node-name": "cbw", "driver": "copy-before-write", "file": {"driver": "qcow2", "file": {"driver": "file", "filename": "src.qcow2"}}, "target": {"driver": "qcow2", "discard": "unmap", "node-name": "temp", "file": {"driver": "file", "filename": "temp.qcow2"}}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"node-name": "access", "discard": "unmap", "driver": "snapshot-access", "file": "cbw"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "target", "file": {"driver": "file", "filename": "tgt.qcow2"}}}"#,
        ),
        a(
            r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "temp", "name": "bitmap0"}}"#,
        ),
        a(
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}"#,
        ),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "cbw", "writable": true}}"#,
        ),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "access"}}"#,
        ),
    ];
    let backup = [
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "backup0", "device": "access", "target": "target", "sync": "full", "discard-source": true, "auto-dismiss": false}}"#,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "backup0"}}"#),
    ];
    let bitmap = a(
        r#"{"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "temp", "name": "bitmap0"}}"#,
    );
    let guest_write =
        S::Run("qemu-io -f raw -c 'write -P 0x22 0 1M' 'nbd+unix:///cbw?socket=nbd.sock'");
    let after = [
        // Given back: a read of the point in time fails.
        S::Run("qemu-io -f raw -c 'read 0 64k' 'nbd+unix:///access?socket=nbd.sock'"),
        // Closed, the temporary image has its tables on disk to be mapped.
        a(r#"{"execute": "block-export-del", "arguments": {"id": "e0"}}"#),
        a(r#"{"execute": "block-export-del", "arguments": {"id": "e1"}}"#),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "access"}}"#),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "cbw"}}"#),
        S::Run("qemu-img map --output=json temp.qcow2"),
    ];
    // The guest writes first: the old data goes to the temporary image,
    // then the backup takes it from there and gives it back.
    let mut written_first: Vec<S> = nodes.to_vec();
    written_first.push(guest_write);
    written_first.push(bitmap);
    written_first.extend(backup.iter().copied());
    written_first.push(a(NODES));
    written_first.extend(after.iter().copied());
    let Some(first) = same_jobs_and_images(0, no_nodes, setup, &written_first, &["tgt.qcow2"])
    else {
        return;
    };
    // The backup first: the filter knows those clusters are done with,
    // and a guest write copies nothing to the temporary image.
    let mut backup_first: Vec<S> = nodes.to_vec();
    backup_first.extend(backup.iter().copied());
    backup_first.push(a(
        r#"{"execute": "block-dirty-bitmap-clear", "arguments": {"node": "temp", "name": "bitmap0"}}"#,
    ));
    backup_first.push(guest_write);
    backup_first.push(bitmap);
    // (Not the nodes: QEMU's discard of clusters never written gives the
    // temporary image an L2 table, and Strata's does not.)
    backup_first.extend(after.iter().copied());
    let second = same_jobs_and_images(0, no_nodes, setup, &backup_first, &["tgt.qcow2"]).unwrap();
    let sha = |lines: &[String]| {
        lines
            .iter()
            .find(|l| l.starts_with("{\"return\": {\"sha256\""))
            .cloned()
    };
    assert_ne!(
        sha(&first),
        sha(&second),
        "the filter copied after the backup"
    );
    for lines in [&first, &second] {
        let text = lines.join("\n");
        assert!(text.contains("Permission denied"), "{text}");
        // Nothing left in the temporary image.
        let map = lines.iter().find(|l| l.starts_with("[{ \"start\""));
        assert!(
            map.is_some_and(
                |m| m.contains(r#""length": 1048576"#) && m.contains(r#""data": false"#)
            ),
            "{text}"
        );
    }
}

fn no_nodes(_side: &Side, _n: usize) -> Vec<String> {
    Vec::new()
}

/// A backup reports its end only once the target is flushed (QEMU's does
/// not flush, so a crash loses what BLOCK_JOB_COMPLETED announced). A
/// failed flush is a target error: `stop` pauses the job, with every
/// cluster copied, and a resume flushes again; `report` fails the job.
/// The raw targets' first flush fails (blkdebug, once); raw makes no
/// flush of its own while the job writes, as qcow2 may.
#[test]
fn a_failed_target_flush_is_a_target_error() {
    let Some((s, _)) = sides() else {
        return;
    };
    chains(&s, 1);
    let rule =
        "[inject-error]\nevent = \"none\"\niotype = \"flush\"\nerrno = \"5\"\nonce = \"on\"\n";
    for t in ["r1", "r2"] {
        std::fs::write(s.dir.path().join(format!("{t}.cfg")), rule).unwrap();
        s.qemu_img(&["create", "-q", "-f", "raw", &format!("{t}.raw"), "4M"]);
    }
    let steps = [
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r1", "file": {"driver": "blkdebug", "config": "$DIR/r1.cfg", "image": {"driver": "file", "filename": "$DIR/r1.raw"}}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r2", "file": {"driver": "blkdebug", "config": "$DIR/r2.cfg", "image": {"driver": "file", "filename": "$DIR/r2.raw"}}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b1", "device": "c1-top", "target": "r1", "sync": "full", "on-target-error": "stop", "auto-dismiss": false}}"#,
        ),
        S::Until(r#""status": "paused""#),
        a(r#"{"execute": "query-block-jobs"}"#),
        a(r#"{"execute": "block-job-resume", "arguments": {"device": "b1"}}"#),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "b1"}}"#),
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "b2", "device": "c1-top", "target": "r2", "sync": "full", "auto-dismiss": false}}"#,
        ),
        S::Until(r#""status": "concluded""#),
        a(r#"{"execute": "query-jobs"}"#),
    ];
    let lines = run(&s, nodes, 1, &steps).join("\n");
    for want in [
        // Paused at the flush: everything copied, the error noted.
        r#"{"return": [{"auto-finalize": true, "io-status": "failed", "device": "b1", "auto-dismiss": false, "busy": false, "len": 4194304, "offset": 4194304, "status": "paused", "paused": true, "speed": 0, "ready": false, "type": "backup"}]}"#,
        r#"{"return": [{"current-progress": 4194304, "status": "concluded", "total-progress": 4194304, "type": "backup", "id": "b1"}]}"#,
        r#"{"return": [{"current-progress": 4194304, "status": "concluded", "total-progress": 4194304, "type": "backup", "id": "b2", "error": "Input/output error"}]}"#,
    ] {
        assert!(lines.contains(want), "{want}\n{lines}");
    }
    // What b1 copied and flushed is the disk.
    let (out, code) = s.qemu_img(&["compare", "-U", "-F", "raw", "c1-top.qcow2", "r1.raw"]);
    assert_eq!(code, 0, "{out}");
}
