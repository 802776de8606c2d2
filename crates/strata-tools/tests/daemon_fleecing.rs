//! Image fleecing as backup tools use it: `copy-before-write` and
//! `snapshot-access` nodes made with `blockdev-add`, a guest writing
//! through the filter, and a backup tool reading the point in time over
//! NBD. The conversation is compared with qemu-storage-daemon's; the
//! incremental backup runs on both daemons, and must equal the disk as it
//! was.

mod daemon_support;
mod jobs_support;
use daemon_support::*;
use jobs_support::*;
use std::process::Command;

fn a(s: &'static str) -> S<'static> {
    S::Ask(s, 0)
}

const NODES: &str = r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#;

/// A 4 MiB qcow2 target beside the chain.
fn target(side: &Side) {
    side.qemu_img(&["create", "-q", "-f", "qcow2", "fleece.qcow2", "4M"]);
}

#[test]
fn fleecing_nodes_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "tmp", "file": {"driver": "file", "filename": "fleece.qcow2"}}}"#,
        ),
        a(
            r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "c1-top", "name": "b0", "disabled": true}}"#,
        ),
        a(
            r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "c1-top", "name": "b1", "granularity": 4096}}"#,
        ),
        // Refused: no such bitmap, node or target; a cluster size that is
        // no power of two; an unknown option.
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "copy-before-write", "node-name": "x1", "file": "c1-top", "target": "tmp", "bitmap": {"node": "c1-top", "name": "nope"}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "copy-before-write", "node-name": "x2", "file": "c1-top", "target": "tmp", "bitmap": {"node": "nope", "name": "b1"}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "copy-before-write", "node-name": "x3", "file": "c1-top", "target": "nope"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "copy-before-write", "node-name": "x4", "file": "c1-top", "target": "tmp", "min-cluster-size": 1000}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "copy-before-write", "node-name": "x5", "file": "c1-top", "target": "tmp", "on-cbw-error": "nope"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "copy-before-write", "node-name": "x6", "file": "c1-top"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "copy-before-write", "node-name": "cbw", "file": "c1-top", "target": "tmp", "bitmap": {"node": "c1-top", "name": "b1"}, "on-cbw-error": "break-snapshot", "cbw-timeout": 30, "min-cluster-size": 131072}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}}"#,
        ),
        a(NODES),
        a(r#"{"execute": "x-debug-query-block-graph"}"#),
        a(
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}"#,
        ),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "acc", "bitmaps": [{"node": "c1-top", "name": "b0"}]}}"#,
        ),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e2", "node-name": "cbw", "name": "guest", "writable": true}}"#,
        ),
        // Someone else writing the disk beside the filter is refused.
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e3", "node-name": "c1-top", "name": "beside", "writable": true}}"#,
        ),
        a(r#"{"execute": "query-block-exports"}"#),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "acc"}}"#),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "cbw"}}"#),
        a(r#"{"execute": "block-export-del", "arguments": {"id": "e1"}}"#),
        S::Ask(
            r#"{"execute": "block-export-del", "arguments": {"id": "e2"}}"#,
            0,
        ),
        a(r#"{"execute": "query-block-exports"}"#),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "acc"}}"#),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "cbw"}}"#),
        a(NODES),
    ];
    same_jobs_and_images(1, nodes, target, &steps, &[]);
}

/// Runs `prog` in the side's folder; its standard output, after checking
/// it succeeded. Debian's Python comes first on the path: nbdsh and
/// libnbd's module belong to /usr/bin/python3.
fn run_ok(side: &Side, prog: &str, args: &[&str]) -> String {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new(prog)
        .args(args)
        .env("PATH", path)
        .current_dir(side.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{prog} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The dirty extents `nbdinfo --map` lists for a context.
fn dirty_extents(side: &Side, uri: &str, context: &str) -> Vec<(u64, u64)> {
    let map = run_ok(side, "nbdinfo", &[&format!("--map={context}"), uri]);
    map.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [off, len, "1", ..] => Some((off.parse().unwrap(), len.parse().unwrap())),
                _ => None,
            }
        })
        .collect()
}

/// One incremental backup, as a backup tool takes it (libvirt's pull
/// mode): a persistent bitmap records the guest's writes across a restart
/// of the daemon; then a fleecing export serves the point in time and the
/// bitmap, the tool copies only the dirty ranges onto its last full
/// backup while the guest keeps writing, and the result is the disk as it
/// was.
fn incremental_backup(side: &Side) {
    chains(side, 1);
    target(side);
    // The last full backup, and a bitmap recording from then on.
    run_ok(
        side,
        "qemu-img",
        &["convert", "-O", "raw", "c1-top.qcow2", "backup.raw"],
    );
    let (d, mut c, uri) = start_exported(side, &nodes(side, 1));
    let add = r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "c1-top", "name": "inc0", "persistent": true}}"#;
    assert!(answer(&mut c, add).contains("return"));
    guest_io(
        &uri,
        &[
            "write -P 0x44 512k 64k",
            "write -P 0x55 2200k 8k",
            "write -z 3M 128k",
            "discard 1M 64k",
        ],
    );
    assert!(answer(&mut c, r#"{"execute": "quit"}"#).contains("return"));
    assert_eq!(d.wait().0, 0);
    // The disk at the point in time the backup must hold.
    run_ok(
        side,
        "qemu-img",
        &["convert", "-O", "raw", "c1-top.qcow2", "expect.raw"],
    );

    let dir = side.dir.path().display().to_string();
    let args: Vec<String> = nodes(side, 1)
        .iter()
        .map(|a| a.replace("$DIR", &dir))
        .collect();
    let (d, mut c) = Running::start(side, &args);
    c.line();
    answer(&mut c, r#"{"execute": "qmp_capabilities"}"#);
    let sock = side.path("nbd.sock");
    for cmd in [
        // The checkpoint: inc0 stops, inc1 records what comes next.
        r#"{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-disable", "data": {"node": "c1-top", "name": "inc0"}}, {"type": "block-dirty-bitmap-add", "data": {"node": "c1-top", "name": "inc1", "persistent": true}}]}}"#.to_string(),
        r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "tmp", "file": {"driver": "file", "filename": "fleece.qcow2"}}}"#.into(),
        r#"{"execute": "blockdev-add", "arguments": {"driver": "copy-before-write", "node-name": "cbw", "file": "c1-top", "target": "tmp", "bitmap": {"node": "c1-top", "name": "inc0"}}}"#.into(),
        r#"{"execute": "blockdev-add", "arguments": {"driver": "snapshot-access", "node-name": "acc", "file": "cbw", "discard": "unmap"}}"#.into(),
        format!(r#"{{"execute": "nbd-server-start", "arguments": {{"addr": {{"type": "unix", "data": {{"path": "{sock}"}}}}}}}}"#),
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "guest", "node-name": "cbw", "writable": true}}"#.into(),
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "fleece", "node-name": "acc", "writable": true, "bitmaps": [{"node": "c1-top", "name": "inc0"}]}}"#.into(),
    ] {
        let r = answer(&mut c, &cmd);
        assert!(r.contains("return"), "{cmd}: {r}");
    }
    let guest = format!("nbd+unix:///cbw?socket={sock}");
    let fleece = format!("nbd+unix:///acc?socket={sock}");
    // The guest overwrites dirty and clean clusters before the tool reads.
    guest_io(
        &guest,
        &[
            "write -P 0x66 500k 40k",
            "write -P 0x77 0 4k",
            "write -z 3M 4k",
        ],
    );
    let dirty = dirty_extents(side, &fleece, "qemu:dirty-bitmap:inc0");
    assert!(!dirty.is_empty());
    // Copy the dirty ranges, the guest writing between reads; then give
    // the first range back and find it no longer readable, and a clean
    // range never readable.
    let ranges: Vec<String> = dirty.iter().map(|(o, l)| format!("({o}, {l})")).collect();
    let (o0, l0) = dirty[0];
    let clean = if o0 == 0 { o0 + l0 } else { 0 };
    let script = format!(
        r#"
import subprocess
f = open("backup.raw", "r+b")
for (off, n) in [{ranges}]:
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x88 %d 4k" % off, "{guest}"], check=True, capture_output=True)
    f.seek(off)
    f.write(h.pread(n, off))
f.close()
h.trim({l0}, {o0})
for (off, n) in [({o0}, {l0}), ({clean}, 4096)]:
    try:
        h.pread(n, off)
        raise SystemExit("read %d+%d of a range not in the snapshot" % (off, n))
    except nbd.Error:
        pass
"#,
        ranges = ranges.join(", ")
    );
    run_ok(side, "nbdsh", &["-u", &fleece, "-c", &script]);
    for cmd in [
        r#"{"execute": "block-export-del", "arguments": {"id": "fleece"}}"#,
        r#"{"execute": "block-export-del", "arguments": {"id": "guest"}}"#,
    ] {
        assert!(answer(&mut c, cmd).contains("return"));
    }
    // The exports end once their clients are gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = answer(&mut c, r#"{"execute": "query-block-exports"}"#);
        if r.trim() == r#"{"return": []}"# {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "exports stay: {r}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for n in ["acc", "cbw", "tmp"] {
        let cmd = format!(r#"{{"execute": "blockdev-del", "arguments": {{"node-name": "{n}"}}}}"#);
        let r = answer(&mut c, &cmd);
        assert!(r.contains("return"), "{cmd}: {r}");
    }
    assert!(answer(&mut c, r#"{"execute": "quit"}"#).contains("return"));
    assert_eq!(d.wait().0, 0);

    let (out, code) = side.qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        "backup.raw",
        "expect.raw",
    ]);
    assert_eq!(
        code,
        0,
        "{}: the backup is not the disk as it was: {out}",
        side.prog.display()
    );
    // The guest's writes during the backup are on the disk, and the next
    // checkpoint's bitmap kept them.
    let (out, code) = side.qemu_img(&[
        "compare",
        "-U",
        "-f",
        "raw",
        "-F",
        "qcow2",
        "expect.raw",
        "c1-top.qcow2",
    ]);
    assert_eq!(code, 1, "{out}");
    let (info, _) = side.qemu_img(&["info", "--output=json", "c1-top.qcow2"]);
    assert!(
        info.contains("\"inc0\"") && info.contains("\"inc1\""),
        "{info}"
    );
    assert_eq!(side.qemu_img(&["check", "c1-top.qcow2"]).1, 0);
}

#[test]
fn incremental_backup_over_a_fleecing_export() {
    let Some((s, q)) = sides() else {
        return;
    };
    // The oracle first: the test's model holds for QEMU too.
    incremental_backup(&q);
    incremental_backup(&s);
}
