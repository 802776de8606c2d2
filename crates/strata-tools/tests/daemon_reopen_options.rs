//! `blockdev-reopen` of a driver's own options, against
//! qemu-storage-daemon: raw's window (`offset`, `size`) moved under an
//! export, qcow2's runtime options (caches, lazy refcounts, overlap
//! checks) checked and put in force, and a node listed twice in one
//! reopen, whose later entry is filled in from the earlier one.

mod daemon_support;
mod jobs_support;
use jobs_support::*;

fn a(s: &'static str) -> S<'static> {
    S::Ask(s, 0)
}

const NODES: &str = r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#;

/// No chains: each test adds its own nodes.
fn none(_side: &daemon_support::Side, _n: usize) -> Vec<String> {
    Vec::new()
}

/// A 2 MiB raw image: 0xa0 in its first half, 0xa1 in its second.
fn raw_image(side: &daemon_support::Side) {
    side.qemu_img(&["create", "-q", "-f", "raw", "r.img", "2M"]);
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xa0 0 1M",
            "-c",
            "write -P 0xa1 1M 1M",
            "r.img",
        ])
        .current_dir(side.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn raw_window_moved_under_an_export_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "hd0", "file": {"driver": "file", "filename": "r.img", "node-name": "hd0-file"}}}"#,
        ),
        a(
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}"#,
        ),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "hd0", "writable": true}}"#,
        ),
        S::Run("qemu-io -f raw -c 'read -P 0xa0 0 1M' 'nbd+unix:///hd0?socket=nbd.sock'"),
        // The disk starts 1 MiB into the file.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "hd0", "offset": 1048576, "file": "hd0-file"}]}}"#,
        ),
        S::Run("qemu-io -f raw -c 'read -P 0xa1 0 1M' 'nbd+unix:///hd0?socket=nbd.sock'"),
        a(NODES),
        // Windows that do not fit, refused in QEMU's order.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "hd0", "offset": 3145728, "file": "hd0-file"}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "hd0", "offset": 1048576, "size": 1048577, "file": "hd0-file"}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "hd0", "offset": 1048576, "size": 1048575, "file": "hd0-file"}]}}"#,
        ),
        S::Run("qemu-io -f raw -c 'read -P 0xa1 0 1M' 'nbd+unix:///hd0?socket=nbd.sock'"),
        // A fixed size: the sector after it is out of the disk.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "hd0", "offset": 512, "size": 1048576, "file": "hd0-file"}]}}"#,
        ),
        S::Run(
            "qemu-io -f raw -c 'read -P 0xa0 0 1047552' -c 'read -P 0xa1 1047552 512' -c 'write -P 0xa2 1047552 512' 'nbd+unix:///hd0?socket=nbd.sock'",
        ),
        a(NODES),
        // Left out, the window goes back to the whole file.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "hd0", "file": "hd0-file"}]}}"#,
        ),
        S::Run(
            "qemu-io -f raw -c 'read -P 0xa0 0 1M' -c 'read -P 0xa2 1048576 512' 'nbd+unix:///hd0?socket=nbd.sock'",
        ),
        // Listed twice, the later entry wins where it says something and
        // the earlier one fills in the rest.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "hd0", "file": "hd0-file"}, {"driver": "raw", "node-name": "hd0", "offset": 1048576, "file": "hd0-file"}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "hd0", "offset": 512, "file": "hd0-file"}, {"driver": "raw", "node-name": "hd0", "file": "hd0-file"}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "hd0", "offset": 0, "file": "hd0-file"}, {"driver": "raw", "node-name": "hd0", "read-only": true, "file": "hd0-file"}]}}"#,
        ),
        a(NODES),
        // O_DIRECT goes on, then the switch to read-only is refused: the
        // file goes back to the page cache.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "hd0", "offset": 1048576, "cache": {"direct": true}, "read-only": true, "file": "hd0-file"}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "hd0-file", "filename": "r.img", "read-only": true}, {"driver": "raw", "node-name": "hd0", "file": "hd0-file", "read-only": true}]}}"#,
        ),
        S::Run("qemu-io -f raw -c 'read -P 0xa1 0 512' 'nbd+unix:///hd0?socket=nbd.sock'"),
    ];
    same_jobs_and_images(0, none, raw_image, &steps, &["r.img"]);
}

/// A 4 MiB qcow2 image `t.qcow2`, and `old.qcow2` in the 0.10 format.
fn qcow2_images(side: &daemon_support::Side) {
    side.qemu_img(&["create", "-q", "-f", "qcow2", "t.qcow2", "4M"]);
    side.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "old.qcow2",
        "4M",
    ]);
}

/// Whether the image's header has its dirty bit set, as qemu-img sees it.
const DIRTY: &str = "qemu-img info -U --output=json t.qcow2 | grep dirty-flag";

#[test]
fn qcow2_runtime_options_reopened_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": "t.qcow2"}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "old", "file": {"driver": "file", "filename": "old.qcow2"}}}"#,
        ),
        // Caches: refused as QEMU refuses them, then new sizes.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "l2-cache-entry-size": 131072, "file": {"driver": "file", "filename": "t.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "l2-cache-size": 1048576, "cache-size": 524288, "file": {"driver": "file", "filename": "t.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "l2-cache-size": 4194304, "refcount-cache-size": 4194304, "l2-cache-entry-size": 32768, "file": {"driver": "file", "filename": "t.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "pass-discard-request": true, "overlap-check": "all", "cache-clean-interval": 0, "file": {"driver": "file", "filename": "t.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "overlap-check": {"template": "none", "inactive-l2": true}, "file": {"driver": "file", "filename": "t.qcow2"}}]}}"#,
        ),
        // What a 0.10 image cannot do.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "old", "lazy-refcounts": true, "file": {"driver": "file", "filename": "old.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "old", "discard-no-unref": true, "file": {"driver": "file", "filename": "old.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "old", "lazy-refcounts": false, "discard-no-unref": false, "file": {"driver": "file", "filename": "old.qcow2"}}]}}"#,
        ),
        // Lazy refcounts on: a write leaves the image dirty; off again,
        // it is made clean.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "lazy-refcounts": true, "file": {"driver": "file", "filename": "t.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}"#,
        ),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "top", "writable": true}}"#,
        ),
        S::Run("qemu-io -f raw -c 'write -P 0x5a 64k 64k' 'nbd+unix:///top?socket=nbd.sock'"),
        S::Run(DIRTY),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": "t.qcow2"}}]}}"#,
        ),
        S::Run(DIRTY),
        // Listed twice: the first entry's lazy refcounts hold.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "lazy-refcounts": true, "file": {"driver": "file", "filename": "t.qcow2"}}, {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": "t.qcow2"}}]}}"#,
        ),
        S::Run("qemu-io -f raw -c 'write -P 0x5b 256k 64k' 'nbd+unix:///top?socket=nbd.sock'"),
        S::Run(DIRTY),
        // A list that fails changes nothing: the image stays dirty.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "lazy-refcounts": false, "file": {"driver": "file", "filename": "t.qcow2"}}, {"driver": "qcow2", "node-name": "top", "overlap-check": "bogus", "file": {"driver": "file", "filename": "t.qcow2"}}]}}"#,
        ),
        S::Run(DIRTY),
        // (Here QEMU's qcow2 makes the image clean while it prepares the
        // first entry, before the second fails; Strata changes nothing
        // until every entry has passed, so the dirty bit is not compared.)
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "lazy-refcounts": false, "file": {"driver": "file", "filename": "t.qcow2"}}, {"driver": "qcow2", "node-name": "old", "lazy-refcounts": true, "file": {"driver": "file", "filename": "old.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "lazy-refcounts": false, "file": {"driver": "file", "filename": "t.qcow2"}}]}}"#,
        ),
        S::Run(DIRTY),
        S::Run(
            "qemu-io -f raw -c 'read -P 0x5a 64k 64k' -c 'read -P 0x5b 256k 64k' 'nbd+unix:///top?socket=nbd.sock'",
        ),
        a(NODES),
    ];
    same_jobs_and_images(0, none, qcow2_images, &steps, &["t.qcow2", "old.qcow2"]);
}

/// Two 4 MiB qcow2 images laid out alike: `t.qcow2` holds 0x11 in its
/// first 64 KiB, `t2.qcow2` 0x22.
fn two_images(side: &daemon_support::Side) {
    for (img, p) in [("t.qcow2", "0x11"), ("t2.qcow2", "0x22")] {
        side.qemu_img(&["create", "-q", "-f", "qcow2", img, "4M"]);
        let w = format!("write -P {p} 0 64k");
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &w, img])
            .current_dir(side.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
    }
}

/// qcow2's `file` replaced while a guest uses the disk through an export:
/// a filter put between the image and its file and taken out again, then
/// another image's file. Strata
/// writes back what it caches before each swap and reads the image again
/// after it (QEMU keeps its caches, which this conversation cannot tell).
#[test]
fn qcow2_file_replaced_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "t-file", "filename": "t.qcow2"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "top", "file": "t-file"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "t2-file", "filename": "t2.qcow2"}}"#,
        ),
        a(
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}"#,
        ),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "top", "writable": true}}"#,
        ),
        S::Run("qemu-io -f raw -c 'write -P 0x33 1M 64k' 'nbd+unix:///top?socket=nbd.sock'"),
        // A filter in, a write through it, and out again. (QEMU's filter
        // keeps the file's length from when it was added: reads past it
        // come back as zeroes, so it is added after the file has grown.)
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "blkdebug", "node-name": "dbg", "image": "t-file"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": "dbg"}]}}"#,
        ),
        a(NODES),
        S::Run(
            "qemu-io -f raw -c 'read -P 0x33 1M 64k' -c 'write -P 0x44 2M 64k' 'nbd+unix:///top?socket=nbd.sock'",
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": "t-file"}]}}"#,
        ),
        S::Run(
            "qemu-io -f raw -c 'read -P 0x11 0 64k' -c 'read -P 0x33 1M 64k' -c 'read -P 0x44 2M 64k' 'nbd+unix:///top?socket=nbd.sock'",
        ),
        // Another image's file: refused while another node writes to it
        // (the new parent named first, as in QEMU's list), then taken.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": "nosuch"}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "other", "file": "t2-file"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": "t2-file"}]}}"#,
        ),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "other"}}"#),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": "t2-file"}]}}"#,
        ),
        a(NODES),
        S::Run("qemu-io -f raw -c 'read -P 0x22 0 64k' 'nbd+unix:///top?socket=nbd.sock'"),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": "t-file"}]}}"#,
        ),
        S::Run(
            "qemu-io -f raw -c 'read -P 0x11 0 64k' -c 'read -P 0x44 2M 64k' 'nbd+unix:///top?socket=nbd.sock'",
        ),
        a(NODES),
    ];
    same_jobs_and_images(0, none, two_images, &steps, &["t.qcow2", "t2.qcow2"]);
}

/// Runs qemu-io on `img` in the side's folder; true when every command
/// succeeded and every pattern matched.
fn qemu_io_ok(side: &daemon_support::Side, img: &str, cmds: &[&str]) -> bool {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img);
    let out = std::process::Command::new("qemu-io")
        .args(&args)
        .current_dir(side.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("fail")
}

/// A qcow2 node given another image's file whose clusters lie elsewhere:
/// Strata reads the new image's tables and counts, so the disk shows the
/// new image and a write allocates where the new image has room. (QEMU
/// goes on with the old image's cached tables, which would read the old
/// image's mapping and count the wrong clusters.) Both images check clean
/// and hold what was written to each.
#[test]
fn a_qcow2_node_reads_its_new_file_after_a_swap() {
    let Some((s, _)) = daemon_support::sides() else {
        return;
    };
    two_images(&s);
    assert!(qemu_io_ok(&s, "t.qcow2", &["write -P 0x33 1M 64k"]));
    let steps = [
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "t-file", "filename": "t.qcow2"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "top", "file": "t-file"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "t2-file", "filename": "t2.qcow2"}}"#,
        ),
        a(
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}"#,
        ),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "top", "writable": true}}"#,
        ),
        S::Run("qemu-io -f raw -c 'read -P 0x33 1M 64k' 'nbd+unix:///top?socket=nbd.sock'"),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": "t2-file"}]}}"#,
        ),
        S::Run(
            "qemu-io -f raw -c 'read -P 0x22 0 64k' -c 'read -P 0 1M 64k' -c 'write -P 0x55 3M 64k' 'nbd+unix:///top?socket=nbd.sock'",
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": "t-file"}]}}"#,
        ),
        S::Run(
            "qemu-io -f raw -c 'read -P 0x11 0 64k' -c 'read -P 0x33 1M 64k' -c 'read -P 0 3M 64k' 'nbd+unix:///top?socket=nbd.sock'",
        ),
    ];
    let lines = run(&s, none, 0, &steps);
    let text = lines.join("\n");
    assert!(
        !text.contains("fail") && !text.contains("\"error\"") && text.contains("exit 0"),
        "{text}"
    );
    for img in ["t.qcow2", "t2.qcow2"] {
        assert_eq!(s.qemu_img(&["check", img]).1, 0, "{img}");
    }
    assert!(qemu_io_ok(
        &s,
        "t2.qcow2",
        &[
            "read -P 0x22 0 64k",
            "read -P 0x55 3M 64k",
            "read -P 0 1M 64k"
        ]
    ));
    assert!(qemu_io_ok(
        &s,
        "t.qcow2",
        &[
            "read -P 0x11 0 64k",
            "read -P 0x33 1M 64k",
            "read -P 0 3M 64k"
        ]
    ));
}
