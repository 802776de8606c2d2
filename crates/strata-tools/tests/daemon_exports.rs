//! strata-daemon's NBD server and block exports against
//! qemu-storage-daemon's (issue "Serving disks live"): the same QMP
//! conversation gives the same answers and events, and an exported disk
//! looks the same to qemu-img and qemu-io and takes their writes.

mod daemon_support;
use daemon_support::*;

const CAPS: Step = (r#"{"execute": "qmp_capabilities"}"#, 1);

/// A 64 MiB qcow2 image `d.qcow2` with some data, in the side's folder.
fn disk(side: &Side) {
    side.qemu_img(&["create", "-q", "-f", "qcow2", "d.qcow2", "64M"]);
    let out = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 7 1M 64k", "d.qcow2"])
        .current_dir(side.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
}

const NODES: &[&str] = &[
    "--blockdev",
    "driver=file,filename=$DIR/d.qcow2,node-name=f",
    "--blockdev",
    "driver=qcow2,file=f,node-name=disk",
];

#[test]
fn export_commands_answer_as_qemu_storage_daemon_does() {
    let steps: &[Step] = &[
        CAPS,
        (r#"{"execute": "nbd-server-stop"}"#, 1),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk"}}"#,
            1,
        ),
        (
            r#"{"execute": "nbd-server-add", "arguments": {"device": "disk"}}"#,
            1,
        ),
        (
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$DIR/nbd.sock"}}}}"#,
            1,
        ),
        (
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$DIR/nbd2.sock"}}}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "nope"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "disk", "name": "e0"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e2", "node-name": "disk", "name": "other", "writable": true, "description": "d", "allocation-depth": true}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e3", "node-name": "disk", "name": "b", "bitmaps": ["nob"]}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "9x", "node-name": "disk"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e4", "node-name": "disk", "name": "t", "iothread": "nope"}}"#,
            1,
        ),
        (
            r#"{"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "io1"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e4", "node-name": "disk", "name": "t", "iothread": "io1"}}"#,
            1,
        ),
        (
            r#"{"execute": "nbd-server-add", "arguments": {"device": "disk", "name": "legacy", "writable": false}}"#,
            1,
        ),
        (r#"{"execute": "query-block-exports"}"#, 1),
        (
            r#"{"execute": "nbd-server-remove", "arguments": {"name": "legacy"}}"#,
            2,
        ),
        (
            r#"{"execute": "block-export-del", "arguments": {"id": "nope"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-del", "arguments": {"id": "e2", "mode": "hard"}}"#,
            2,
        ),
        (r#"{"execute": "query-block-exports"}"#, 1),
        (
            r#"{"execute": "blockdev-del", "arguments": {"node-name": "disk"}}"#,
            1,
        ),
        (r#"{"execute": "nbd-server-stop"}"#, 3),
        (r#"{"execute": "query-block-exports"}"#, 1),
        (r#"{"execute": "nbd-server-stop"}"#, 1),
    ];
    same(steps, NODES, disk);
}

/// What qemu-img and qemu-io make of the export `e0` of a daemon
/// started with `args`, and what they write through it.
fn served(side: &Side, args: &[&str]) -> Vec<String> {
    let extra: Vec<String> = NODES
        .iter()
        .chain(args)
        .map(|a| a.replace("$DIR", &side.dir.path().display().to_string()))
        .collect();
    let (d, mut c) = Running::start(side, &extra);
    let mut out = vec![side.normalize(&c.line())];
    c.ask(r#"{"execute": "qmp_capabilities"}"#);
    let uri = format!("nbd+unix:///e0?socket={}", side.path("nbd.sock"));
    for args in [
        vec!["info", uri.as_str()],
        vec!["map", "--output=json", uri.as_str()],
    ] {
        out.push(side.qemu_img(&args).0);
    }
    let io = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 9 4M 64k",
            "-c",
            "read -P 7 1M 64k",
            &uri,
        ])
        .output()
        .unwrap();
    // The timing lines vary from run to run (digits, decimals and units).
    let io_out: String = String::from_utf8_lossy(&io.stdout)
        .lines()
        .filter(|l| !l.contains("ops/sec"))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push(side.normalize(&io_out));
    out.push(side.normalize(&c.ask(r#"{"execute": "query-block-exports"}"#)));
    c.send(r#"{"execute": "quit"}"#);
    // The export's end, then quit's answer.
    out.push(side.normalize(&c.line()));
    out.push(c.line());
    let (code, _) = d.wait();
    out.push(format!("exit {code}"));
    let check = side.qemu_img(&["check", "d.qcow2"]).0;
    assert!(check.contains("No errors were found"), "{check}");
    let read = std::process::Command::new("qemu-io")
        .args(["-c", "read -P 9 4M 64k", "d.qcow2"])
        .current_dir(side.dir.path())
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&read.stdout).contains("verification failed"));
    out
}

#[test]
fn exported_disks_serve_as_qemu_storage_daemons_do() {
    let Some((s, q)) = sides() else { return };
    for args in [
        &[
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=x,node-name=disk,name=e0,writable=on",
        ][..],
        &[
            "--nbd-server",
            r#"{"addr": {"type": "unix", "path": "$DIR/nbd.sock"}, "max-connections": 2}"#,
            "--export",
            "nbd,id=x,node-name=disk,name=e0,writable=on,allocation-depth=on",
        ][..],
        // Served from an I/O thread: the disk's requests run there.
        &[
            "--object",
            "iothread,id=io0",
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=x,node-name=disk,name=e0,writable=on,iothread=io0,fixed-iothread=on",
        ][..],
    ] {
        disk(&s);
        disk(&q);
        assert_eq!(served(&s, args), served(&q, args), "{args:?}");
    }
}
