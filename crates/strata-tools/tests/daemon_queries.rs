//! strata-daemon's graph queries and the write threshold against
//! qemu-storage-daemon's (issue "Serving disks live"): query-named-block-nodes,
//! query-block, query-blockstats, x-debug-query-block-graph and
//! block-set-write-threshold answer with the same bytes, automatic node
//! names aside, and a write through an export past the threshold raises the
//! same BLOCK_WRITE_THRESHOLD event.

mod daemon_support;
use daemon_support::*;

/// A qcow2 `top.qcow2` over `base.qcow2` with data in both, and a lone
/// `other.raw`.
fn images(side: &Side) {
    side.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    side.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    side.qemu_img(&["create", "-q", "-f", "raw", "other.raw", "1M"]);
    for (cmd, img) in [
        ("write -P 1 0 128k", "base.qcow2"),
        ("write -P 2 64k 64k", "top.qcow2"),
    ] {
        let out = std::process::Command::new("qemu-io")
            .args(["-c", cmd, img])
            .current_dir(side.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
    }
}

const ARGS: &[&str] = &[
    "--blockdev",
    "driver=file,filename=$DIR/base.qcow2,node-name=bf",
    "--blockdev",
    "driver=qcow2,file=bf,node-name=base,read-only=on",
    "--blockdev",
    "driver=file,filename=$DIR/top.qcow2,node-name=tf,discard=unmap",
    "--blockdev",
    "driver=qcow2,file=tf,backing=base,node-name=top,detect-zeroes=on,cache.direct=off",
    "--blockdev",
    "driver=raw,file.driver=file,file.filename=$DIR/other.raw,node-name=other",
    "--nbd-server",
    "addr.type=unix,addr.path=$DIR/nbd.sock",
    "--export",
    "type=nbd,id=e0,node-name=top,writable=on",
];

/// Automatic node names are the daemon's own counter's, and how many
/// blocks the host file system gives an image (`actual-size`) depends on
/// its own layout (an ext4 file with more than four extents takes one
/// more block for the extent tree), not on what was written.
fn anonymous(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    loop {
        let next = [("#block", "N"), ("\"actual-size\": ", "A")]
            .into_iter()
            .filter_map(|(k, r)| rest.find(k).map(|i| (i, k, r)))
            .min();
        let Some((i, k, r)) = next else { break };
        out.push_str(&rest[..i + k.len()]);
        rest = rest[i + k.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push_str(r);
    }
    out + rest
}

/// The conversation: queries before and after a write through the export,
/// which crosses the threshold set on `top`.
fn conversation(side: &Side) -> Vec<String> {
    let extra: Vec<String> = ARGS
        .iter()
        .map(|a| a.replace("$DIR", &side.dir.path().display().to_string()))
        .collect();
    let (d, mut c) = Running::start(side, &extra);
    let mut out = vec![side.normalize(&c.line())];
    let mut ask = |c: &mut Client, cmd: &str| out.push(anonymous(&side.normalize(&c.ask(cmd))));
    ask(&mut c, r#"{"execute": "qmp_capabilities"}"#);
    for cmd in [
        r#"{"execute": "query-named-block-nodes"}"#,
        r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#,
        r#"{"execute": "query-block"}"#,
        r#"{"execute": "query-blockstats"}"#,
        r#"{"execute": "query-blockstats", "arguments": {"query-nodes": true}}"#,
        r#"{"execute": "x-debug-query-block-graph"}"#,
        r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "nope", "write-threshold": 1}}"#,
        r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "top", "write-threshold": 1048576}}"#,
        r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "top"}}"#,
        r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#,
    ] {
        ask(&mut c, cmd);
    }
    let uri = format!("nbd+unix:///top?socket={}", side.path("nbd.sock"));
    // Below the threshold: no event; then across it, once. Whole clusters:
    // QEMU leaves the zeroes of a partial new cluster unwritten, and how
    // fragmented that makes the file shows in actual-size.
    for cmd in [
        "write -P 3 512k 64k",
        "write -P 4 960k 128k",
        "write 2M 64k",
    ] {
        let io = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &uri])
            .output()
            .unwrap();
        assert!(io.status.success(), "{io:?}");
    }
    // The event was sent during the last write, once.
    out.push(side.normalize(&c.line()));
    out.push(anonymous(&side.normalize(&c.ask(
        r#"{"execute": "query-blockstats", "arguments": {"query-nodes": true}}"#,
    ))));
    out.push(anonymous(&side.normalize(&c.ask(
        r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#,
    ))));
    // The export's end, then quit's answer.
    out.push(side.normalize(&c.ask(r#"{"execute": "quit"}"#)));
    out.push(c.line());
    let (code, err) = d.wait();
    out.push(format!("exit {code}"));
    out.push(side.normalize(&err));
    out
}

#[test]
fn graph_queries_answer_as_qemu_storage_daemon_does() {
    let Some((s, q)) = sides() else { return };
    images(&s);
    images(&q);
    let got = conversation(&s);
    let want = conversation(&q);
    assert_same_lines(&got, &want);
    // The conversation shows what it is about.
    let event = &got[12];
    assert!(
        event.contains(r#""event": "BLOCK_WRITE_THRESHOLD""#),
        "{event}"
    );
    assert!(event.contains(r#""amount-exceeded": 65536"#), "{event}");
    assert!(
        got[13].contains(r#""wr_highest_offset": 2162688"#),
        "{}",
        got[13]
    );
}

/// Dirty bitmaps over QMP, then offered by an NBD export: the answers,
/// what `query-named-block-nodes` shows of them, and what nbdinfo maps of
/// `qemu:dirty-bitmap:b0` after writes through another export.
fn bitmap_session(side: &Side) -> Vec<String> {
    let extra: Vec<String> = ARGS[..8]
        .iter()
        .chain(&["--nbd-server", "addr.type=unix,addr.path=$DIR/nbd.sock"])
        .map(|a| a.replace("$DIR", &side.dir.path().display().to_string()))
        .collect();
    let (d, mut c) = Running::start(side, &extra);
    let mut out = vec![side.normalize(&c.line())];
    for cmd in [
        r#"{"execute": "qmp_capabilities"}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "top", "name": ""}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "nope", "name": "b0"}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "top", "name": "b0", "granularity": 1000}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "top", "name": "b0"}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "top", "name": "b0"}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "top", "name": "b1", "granularity": 4096, "disabled": true}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "tf", "name": "b2", "granularity": 65536}}"#,
        r#"{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "top", "name": "nob"}}"#,
        r#"{"execute": "block-dirty-bitmap-clear", "arguments": {"node": "nope", "name": "b0"}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "w", "node-name": "top", "name": "w", "writable": true}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "r", "node-name": "top", "name": "r", "bitmaps": ["b0"]}}"#,
    ] {
        out.push(anonymous(&side.normalize(&c.ask(cmd))));
    }
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", side.path("nbd.sock"));
    for cmd in [
        "write -P 3 512k 64k",
        "write -P 4 1000k 100k",
        "write -z 4M 64k",
    ] {
        let io = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &uri("w")])
            .output()
            .unwrap();
        assert!(io.status.success(), "{io:?}");
    }
    // A bitmap that stopped recording may back a read-only export.
    for cmd in [
        r#"{"execute": "block-dirty-bitmap-disable", "arguments": {"node": "top", "name": "b0"}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "r", "node-name": "top", "name": "r", "bitmaps": ["b0"]}}"#,
        r#"{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "top", "name": "b0"}}"#,
    ] {
        out.push(anonymous(&side.normalize(&c.ask(cmd))));
    }
    let map = std::process::Command::new("nbdinfo")
        .args(["--map=qemu:dirty-bitmap:b0", &uri("r")])
        .output()
        .unwrap();
    out.push(
        String::from_utf8_lossy(&map.stdout).into_owned() + &String::from_utf8_lossy(&map.stderr),
    );
    for cmd in [
        r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#,
        r#"{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "top", "target": "b1", "bitmaps": ["b0", {"node": "tf", "name": "b2"}]}}"#,
        r#"{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "top", "target": "b1", "bitmaps": ["nob"]}}"#,
        r#"{"execute": "block-dirty-bitmap-enable", "arguments": {"node": "top", "name": "b1"}}"#,
        r#"{"execute": "block-dirty-bitmap-clear", "arguments": {"node": "top", "name": "b0"}}"#,
        r#"{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "tf", "name": "b2"}}"#,
        r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#,
    ] {
        out.push(anonymous(&side.normalize(&c.ask(cmd))));
    }
    out.push(side.normalize(&c.ask(r#"{"execute": "quit"}"#)));
    // Each export's end, then quit's answer.
    for _ in 0..2 {
        out.push(side.normalize(&c.line()));
    }
    let (code, err) = d.wait();
    out.push(format!("exit {code} {}", side.normalize(&err)));
    out
}

#[test]
fn dirty_bitmaps_answer_and_export_as_qemu_storage_daemon_does() {
    let Some((s, q)) = sides() else { return };
    images(&s);
    images(&q);
    let got = bitmap_session(&s);
    let want = bitmap_session(&q);
    assert_same_lines(&got, &want);
    // nbdinfo mapped the writes as dirty, the rest as clean.
    assert!(
        got[16].contains("dirty") && got[16].contains("clean"),
        "{}",
        got[16]
    );
}

/// Persistent bitmaps over QMP: one made by qemu-img is loaded with the
/// image, a new one is added and written to through an export, the old one
/// removed from the image; what the queries show, and what qemu-img finds
/// in the image once the daemon is gone.
fn persistent_bitmap_session(side: &Side) -> Vec<String> {
    side.qemu_img(&["bitmap", "--add", "-g", "128k", "top.qcow2", "old"]);
    side.qemu_img(&["bitmap", "--add", "--disable", "top.qcow2", "keep"]);
    let extra: Vec<String> = ARGS[..12]
        .iter()
        .map(|a| a.replace("$DIR", &side.dir.path().display().to_string()))
        .collect();
    let (d, mut c) = Running::start(side, &extra);
    let mut out = vec![side.normalize(&c.line())];
    for cmd in [
        r#"{"execute": "qmp_capabilities"}"#,
        r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "top", "name": "old", "persistent": true}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "other", "name": "p", "persistent": true}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "top", "name": "p", "persistent": true, "granularity": 256}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "top", "name": "p", "persistent": true}}"#,
        r#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "top", "name": "mem"}}"#,
        r#"{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "top", "name": "old"}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "w", "node-name": "top", "name": "w", "writable": true}}"#,
    ] {
        out.push(anonymous(&side.normalize(&c.ask(cmd))));
    }
    let uri = format!("nbd+unix:///w?socket={}", side.path("nbd.sock"));
    let io = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 1M 64k", &uri])
        .output()
        .unwrap();
    assert!(io.status.success(), "{io:?}");
    for cmd in [
        r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#,
        r#"{"execute": "block-export-del", "arguments": {"id": "w"}}"#,
    ] {
        out.push(anonymous(&side.normalize(&c.ask(cmd))));
    }
    out.push(side.normalize(&c.line()));
    out.push(side.normalize(&c.ask(r#"{"execute": "quit"}"#)));
    let (code, err) = d.wait();
    out.push(format!("exit {code} {}", side.normalize(&err)));
    out.push(side.qemu_img(&["info", "--output=json", "top.qcow2"]).0);
    out.push(side.qemu_img(&["check", "top.qcow2"]).0);
    out
}

#[test]
fn persistent_bitmaps_over_qmp_match_qemu_storage_daemon() {
    let Some((s, q)) = sides() else { return };
    images(&s);
    images(&q);
    let got = persistent_bitmap_session(&s);
    let want = persistent_bitmap_session(&q);
    assert_same_lines(&got, &want);
    assert!(got.iter().any(|l| l.contains(r#""name": "p""#)), "{got:?}");
}
