//! `transaction` and the snapshot commands that are its actions, over QMP:
//! the same conversations with strata-daemon and qemu-storage-daemon give
//! the same answers, leave the same graph (what the daemon shows of every
//! node) and the same images, whether a transaction goes through or is
//! undone by a later action's failure.

mod daemon_support;
mod jobs_support;
use jobs_support::*;

fn a(s: &'static str) -> S<'static> {
    S::Ask(s, 0)
}

const EXPORT: [&str; 2] = [
    r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}"#,
    r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "c1-top", "writable": true}}"#,
];

const NODES: &str = r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#;

#[test]
fn transactions_all_or_nothing_as_in_qemu() {
    let steps = [
        a(EXPORT[0]),
        a(EXPORT[1]),
        a(
            r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "c1-top", "name": "p1", "persistent": true}}"#,
        ),
        a(
            r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "c1-top", "name": "m1"}}"#,
        ),
        // Every kind of action, then `abort`: all of it is undone.
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "c1-top", "name": "t1"}}, {"type": "block-dirty-bitmap-disable", "data": {"node": "c1-top", "name": "m1"}}, {"type": "block-dirty-bitmap-merge", "data": {"node": "c1-top", "target": "t1", "bitmaps": ["m1"]}}, {"type": "blockdev-snapshot-internal-sync", "data": {"device": "c1-top", "name": "in1"}}, {"type": "block-dirty-bitmap-remove", "data": {"node": "c1-top", "name": "p1"}}, {"type": "blockdev-snapshot-sync", "data": {"node-name": "c1-top", "snapshot-file": "s0.qcow2", "snapshot-node-name": "s0"}}, {"type": "block-dirty-bitmap-clear", "data": {"node": "c1-top", "name": "m1"}}, {"type": "abort", "data": {}}]}}"#,
        ),
        a(NODES),
        a(r#"{"execute": "query-block-exports"}"#),
        // The second add fails: the overlay made by the first goes again.
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-snapshot-sync", "data": {"node-name": "c1-top", "snapshot-file": "s1.qcow2", "snapshot-node-name": "s1"}}, {"type": "block-dirty-bitmap-add", "data": {"node": "s1", "name": "x"}}, {"type": "block-dirty-bitmap-add", "data": {"node": "s1", "name": "x"}}]}}"#,
        ),
        a(r#"{"execute": "query-block-exports"}"#),
        // Through: the export moves to the overlay, which has a bitmap and
        // an internal snapshot; the old image loses its persistent bitmap.
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-snapshot-sync", "data": {"node-name": "c1-top", "snapshot-file": "s2.qcow2", "snapshot-node-name": "s2"}}, {"type": "block-dirty-bitmap-add", "data": {"node": "s2", "name": "x", "granularity": 4096}}, {"type": "blockdev-snapshot-internal-sync", "data": {"device": "s2", "name": "in2"}}, {"type": "blockdev-snapshot-internal-sync", "data": {"device": "s2", "name": "in3"}}, {"type": "block-dirty-bitmap-remove", "data": {"node": "c1-top", "name": "p1"}}]}}"#,
        ),
        a(NODES),
        a(r#"{"execute": "query-block-exports"}"#),
        a(
            r#"{"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "s2", "name": "x"}}"#,
        ),
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-clear", "data": {"node": "s2", "name": "x"}}, {"type": "block-dirty-bitmap-merge", "data": {"node": "s2", "target": "x", "bitmaps": ["nosuch"]}}]}}"#,
        ),
        // Only backups may complete as a group.
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "abort", "data": {}}], "properties": {"completion-mode": "grouped"}}}"#,
        ),
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [], "properties": {"completion-mode": "grouped"}}}"#,
        ),
        a(r#"{"execute": "transaction", "arguments": {"actions": []}}"#),
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "nosuch", "data": {}}]}}"#,
        ),
        a(r#"{"execute": "transaction", "arguments": {"actions": [{"type": "abort"}]}}"#),
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "abort", "data": {"x": 1}}]}}"#,
        ),
    ];
    same_jobs_and_images(1, nodes, |_| {}, &steps, &["s2.qcow2"]);
}

#[test]
fn internal_snapshots_and_backing_names_as_in_qemu() {
    let steps = [
        a(EXPORT[0]),
        a(EXPORT[1]),
        a(
            r#"{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "c1-top", "name": "s1"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "c1-top", "name": "s1"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "c1-top", "name": ""}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "c1-mid", "name": "x"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "nosuch", "name": "x"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "c1-top", "name": "s2"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "c1-top", "name": "s3"}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "c1-top"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "c1-top", "name": "nosuch"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "c1-top", "id": "1", "name": "s2"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "c1-top", "id": "1"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "c1-top", "name": "s2"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "c1-mid", "id": "1"}}"#,
        ),
        // The image's own format is stored as the backing format, as QEMU
        // stores it; a read-only image is reopened read-write for it.
        a(
            r#"{"execute": "change-backing-file", "arguments": {"device": "c1-top", "image-node-name": "c1-mid", "backing-file": "c1-base.qcow2"}}"#,
        ),
        a(
            r#"{"execute": "change-backing-file", "arguments": {"device": "c1-top", "image-node-name": "c1-top", "backing-file": "c1-mid.qcow2"}}"#,
        ),
        a(
            r#"{"execute": "change-backing-file", "arguments": {"device": "c1-top", "image-node-name": "c1-base", "backing-file": "x"}}"#,
        ),
        a(
            r#"{"execute": "change-backing-file", "arguments": {"device": "c1-mid", "image-node-name": "c1-mid", "backing-file": "x"}}"#,
        ),
        a(
            r#"{"execute": "change-backing-file", "arguments": {"device": "c1-top", "image-node-name": "nosuch", "backing-file": "x"}}"#,
        ),
        a(
            r#"{"execute": "change-backing-file", "arguments": {"device": "c2-top", "image-node-name": "c1-mid", "backing-file": "x"}}"#,
        ),
        a(NODES),
    ];
    same_jobs_and_images(2, nodes, |_| {}, &steps, &[]);
}
