//! strata-daemon's FUSE exports against qemu-storage-daemon's (issue
//! "Serving disks live"): a disk exported on a mount point is written with
//! `dd` and read back with `cmp`, and ordinary file tools (stat, chmod,
//! touch, truncate, fallocate, SEEK_DATA/SEEK_HOLE) see and do the same on
//! both; the qcow2 behind it then checks clean and holds the data. The QMP
//! side (errors, query-block-exports, deletion) answers the same bytes.
//! Mounting needs root and /dev/fuse; without them the tests say so and
//! skip, except under CI.

mod daemon_support;
use daemon_support::*;
use std::process::Command;

/// True where FUSE mounts can be made (root, /dev/fuse).
fn fuse_here() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && std::path::Path::new("/dev/fuse").exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "FUSE tests need root and /dev/fuse under CI"
        );
        eprintln!("skipped: FUSE mounts need root and /dev/fuse");
    }
    ok
}

/// A 64 MiB qcow2 `d.qcow2`, a 1 MiB raw `g.raw`, the empty files they are
/// mounted on, and 4 MiB of data to write.
fn setup(side: &Side) {
    side.qemu_img(&["create", "-q", "-f", "qcow2", "d.qcow2", "64M"]);
    side.qemu_img(&["create", "-q", "-f", "raw", "g.raw", "1M"]);
    for f in ["mnt", "grow"] {
        std::fs::write(side.path(f), b"").unwrap();
    }
    std::fs::create_dir_all(side.path("dir")).unwrap();
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(side.path("data"), data).unwrap();
}

const NODES: &[&str] = &[
    "--blockdev",
    "driver=file,filename=$DIR/d.qcow2,node-name=f",
    "--blockdev",
    "driver=qcow2,file=f,node-name=disk",
    "--blockdev",
    "driver=file,filename=$DIR/g.raw,node-name=g",
];

/// What file tools make of the two mounts, each step's output and status.
const SCRIPT: &str = r###"
step() { echo "## $*"; "$@" 2>&1 | sed "s|$PWD|\$DIR|g"; echo "rc ${PIPESTATUS[0]}"; }
step stat -c '%s %A %h %F' mnt grow
step dd if=data of=mnt bs=64k seek=16 conv=notrunc,fsync status=none
step cmp -n 4194304 data mnt -i 0:1048576
step dd if=data of=mnt bs=1M seek=63 count=2 conv=notrunc status=none
step stat -c %s mnt
step chmod 640 mnt
step stat -c %A mnt
step touch mnt
step fallocate -p -o 1M -l 128k mnt
step cmp -n 131072 mnt /dev/zero -i 1048576:0
step fallocate -z -o 2M -l 64k mnt
step python3 -c '
import os
fd = os.open("mnt", os.O_RDONLY)
for off in (0, 1 << 20, (1 << 20) + (128 << 10), 5 << 20, 63 << 20):
    for w, n in ((os.SEEK_DATA, "data"), (os.SEEK_HOLE, "hole")):
        try: print(n, off, os.lseek(fd, off, w))
        except OSError as e: print(n, off, e.strerror)
'
step dd if=data of=grow bs=64k seek=20 count=2 conv=notrunc status=none
step stat -c %s grow
step truncate -s 32M mnt
step stat -c %s mnt
"###;

/// Runs the script on a daemon of `side` exporting `disk` on `mnt`
/// (writable) and `g` on `grow` (growable), then deletes one export and
/// quits; the outputs, QMP lines included.
fn session(side: &Side) -> Vec<String> {
    let extra: Vec<String> = NODES
        .iter()
        .chain(&[
            "--export",
            "type=fuse,id=e0,node-name=disk,mountpoint=$DIR/mnt,writable=on",
            "--export",
            "type=fuse,id=e1,node-name=g,mountpoint=$DIR/grow,writable=on,growable=on,allow-other=off",
        ])
        .map(|a| a.replace("$DIR", &side.dir.path().display().to_string()))
        .collect();
    let (d, mut c) = Running::start(side, &extra);
    let mut out = vec![side.normalize(&c.line())];
    out.push(c.ask(r#"{"execute": "qmp_capabilities"}"#));
    let sh = Command::new("bash")
        .args(["-c", SCRIPT])
        .current_dir(side.dir.path())
        .output()
        .unwrap();
    out.extend(
        String::from_utf8_lossy(&sh.stdout)
            .lines()
            .map(str::to_string),
    );
    out.push(c.ask(r#"{"execute": "query-block-exports"}"#));
    c.send(r#"{"execute": "block-export-del", "arguments": {"id": "e1"}}"#);
    for _ in 0..2 {
        out.push(side.normalize(&c.line()));
    }
    // Unmounted: the file under it is the empty one again.
    out.push(format!(
        "grow: {} bytes",
        std::fs::metadata(side.path("grow")).unwrap().len()
    ));
    c.send(r#"{"execute": "quit"}"#);
    for _ in 0..2 {
        out.push(side.normalize(&c.line()));
    }
    let (code, err) = d.wait();
    out.push(format!("exit {code} {}", side.normalize(&err)));
    out.push(format!(
        "mnt: {} bytes",
        std::fs::metadata(side.path("mnt")).unwrap().len()
    ));
    let check = side.qemu_img(&["check", "d.qcow2"]).0;
    assert!(check.contains("No errors were found"), "{check}");
    out.push(
        side.qemu_img(&["info", "--output=json", "g.raw"])
            .0
            .lines()
            .filter(|l| l.contains("virtual-size"))
            .collect(),
    );
    // The data written through the mount is in the image.
    let raw = side.path("d.raw");
    side.qemu_img(&["convert", "-O", "raw", "d.qcow2", &raw]);
    let img = std::fs::read(&raw).unwrap();
    let data = std::fs::read(side.path("data")).unwrap();
    // (Past the ranges the script punched and zeroed.)
    assert!(img[3 << 20..5 << 20] == data[2 << 20..]);
    assert!(img[1 << 20..(1 << 20) + (128 << 10)]
        .iter()
        .all(|&b| b == 0));
    out
}

#[test]
fn fuse_exports_serve_as_qemu_storage_daemons_do() {
    if !fuse_here() {
        return;
    }
    let Some((s, q)) = sides() else { return };
    setup(&s);
    setup(&q);
    let got = session(&s);
    let want = session(&q);
    assert_same_lines(&got, &want);
    // What the comparison is about happened.
    let all = got.join("\n");
    assert!(
        all.contains("## cmp -n 4194304 data mnt -i 0:1048576\nrc 0"),
        "{all}"
    );
    assert!(all.contains(r#""type": "fuse""#), "{all}");
}

#[test]
fn fuse_export_commands_answer_as_qemu_storage_daemon_does() {
    if !fuse_here() {
        return;
    }
    let steps: &[Step] = &[
        (r#"{"execute": "qmp_capabilities"}"#, 1),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e0", "node-name": "disk", "mountpoint": "$DIR/none"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e0", "node-name": "disk", "mountpoint": "$DIR/dir"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e0", "node-name": "disk"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e0", "node-name": "disk", "mountpoint": "$DIR/mnt", "allow-other": "sometimes"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e0", "node-name": "disk", "mountpoint": "$DIR/mnt", "writable": true}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e1", "node-name": "disk", "mountpoint": "$DIR/mnt"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e2", "node-name": "g", "mountpoint": "$DIR/grow", "growable": true}}"#,
            1,
        ),
        (r#"{"execute": "query-block-exports"}"#, 1),
        (
            r#"{"execute": "blockdev-del", "arguments": {"node-name": "disk"}}"#,
            1,
        ),
        (
            r#"{"execute": "block-export-del", "arguments": {"id": "e0"}}"#,
            2,
        ),
        (
            r#"{"execute": "block-export-del", "arguments": {"id": "e0"}}"#,
            1,
        ),
        (r#"{"execute": "query-block-exports"}"#, 1),
        (
            r#"{"execute": "block-export-del", "arguments": {"id": "e2", "mode": "hard"}}"#,
            2,
        ),
    ];
    same(steps, NODES, setup);
}
