//! `blockdev-snapshot-sync` over QMP: the same conversations with
//! strata-daemon and qemu-storage-daemon give the same answers, create the
//! same overlay (its backing file named as QEMU names the old image), and
//! move the export to it.

mod daemon_support;
mod jobs_support;
use daemon_support::*;
use jobs_support::*;

#[test]
fn snapshots_made_by_the_daemon_as_in_qemu() {
    let a = |s: &'static str| S::Ask(s, 0);
    let steps = [
        a(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"device": "c1-top", "snapshot-file": "s1.qcow2"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "c1-top", "snapshot-file": "s1.qcow2"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "c1-top", "snapshot-file": "s1.qcow2", "snapshot-node-name": "c1-mid"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "c1-mid", "snapshot-file": "s1.qcow2", "snapshot-node-name": "s1"}}"#,
        ),
        a(
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}"#,
        ),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "c1-top", "writable": true}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "c1-top", "snapshot-file": "s2.qcow2", "snapshot-node-name": "s2", "format": "qcow2"}}"#,
        ),
        a(r#"{"execute": "query-block-exports"}"#),
        a(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "c1-top", "snapshot-file": "s3.qcow2", "snapshot-node-name": "s3", "mode": "existing"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "s2", "snapshot-file": "s5.qcow2", "snapshot-node-name": "s5", "format": "nosuch"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "s2", "snapshot-file": "s5.qcow2", "snapshot-node-name": "s5", "mode": "existing"}}"#,
        ),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "s2"}}"#),
        // A node no one uses: the overlay is made, and goes with the
        // command, as QEMU's goes with its transaction; the node is now
        // read-only, and a second snapshot of it goes the same way.
        a(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "c2-top", "snapshot-file": "s6.qcow2", "snapshot-node-name": "s6"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "c2-top", "snapshot-file": "s7.qcow2", "snapshot-node-name": "s6"}}"#,
        ),
    ];
    let made = ["s2.qcow2", "s6.qcow2", "s7.qcow2"];
    same_jobs_and_images(2, nodes, |_| {}, &steps, &made);
}

/// The overlays each daemon made hold the same header (backing file name
/// and format) and read the same.
#[test]
fn the_overlay_names_its_backing_file_as_qemu_does() {
    let Some((s, q)) = sides() else {
        return;
    };
    let steps = [
        S::Ask(
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "c1-top", "writable": true}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "c1-top", "snapshot-file": "s1.qcow2", "snapshot-node-name": "s1"}}"#,
            0,
        ),
    ];
    for side in [&s, &q] {
        chains(side, 1);
        run(side, nodes, 1, &steps);
    }
    let info = |side: &Side| {
        let (out, code) = side.qemu_img(&["info", "-U", "--output=json", "s1.qcow2"]);
        let kept: Vec<String> = out
            .lines()
            .filter(|l| !l.contains("\"actual-size\""))
            .map(|l| side.normalize(l))
            .collect();
        (kept.join("\n"), code)
    };
    assert_eq!(info(&s), info(&q));
    let path = |side: &Side| side.dir.path().join("s1.qcow2").display().to_string();
    let (out, code) = s.qemu_img(&["compare", "-U", &path(&s), &path(&q)]);
    assert_eq!(code, 0, "{out}");
}
