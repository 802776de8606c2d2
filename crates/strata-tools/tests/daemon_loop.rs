//! The daemon's event loop serves every client and node: work that takes
//! long on its own (deriving a LUKS key for seconds) runs beside it, never
//! on it, so exports keep serving meanwhile. (Monitor commands wait for
//! each other, in QEMU too.)

mod daemon_support;

use daemon_support::{strata, Running, Side};
use std::process::Command;

#[test]
fn exports_serve_while_a_luks_key_is_derived() {
    let dir = tempfile::tempdir().unwrap();
    let side = Side {
        prog: strata(dir.path()),
        dir,
    };
    let (img, disk, nbd) = (
        side.path("enc.qcow2"),
        side.path("disk.raw"),
        side.path("nbd.sock"),
    );
    std::fs::write(&disk, vec![0x5a; 1 << 20]).unwrap();
    // About three seconds of key derivation at open, far longer than a read
    // even on a loaded machine.
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=pw",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=3000",
            &img,
            "1M",
        ])
        .output()
        .expect("qemu-img is needed for this test");
    assert!(out.status.success(), "{out:?}");

    let args = [
        "--object".to_string(),
        "secret,id=sec0,data=pw".into(),
        "--blockdev".into(),
        format!("driver=file,filename={disk},node-name=disk"),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={nbd}"),
        "--export".into(),
        "type=nbd,id=e0,node-name=disk,name=disk".into(),
    ];
    let (d, mut c) = Running::start(&side, &args);
    c.line();
    assert_eq!(
        c.ask(r#"{"execute": "qmp_capabilities"}"#),
        "{\"return\": {}}\r\n"
    );
    c.send(&format!(
        r#"{{"execute": "blockdev-add", "arguments": {{"driver": "qcow2", "node-name": "enc", "file": {{"driver": "file", "filename": "{img}"}}, "encrypt": {{"format": "luks", "key-secret": "sec0"}}}}}}"#
    ));
    // Let the open reach its key derivation before the export is read.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let read = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x5a 0 64k"])
        .arg(format!("nbd+unix:///disk?socket={nbd}"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&read.stdout).contains("read 65536/65536"),
        "{read:?}"
    );
    assert!(
        !c.pending(),
        "blockdev-add answered before a read that began after it: the key was derived on the loop"
    );
    assert_eq!(c.line(), "{\"return\": {}}\r\n");
    assert!(c
        .ask(r#"{"execute": "query-named-block-nodes"}"#)
        .contains("\"encrypted\": true"));
    // The export ends with the daemon, announced before quit's answer.
    c.send(r#"{"execute": "quit"}"#);
    assert!(c.line().contains("\"BLOCK_EXPORT_DELETED\""));
    assert_eq!(c.line(), "{\"return\": {}}\r\n");
    assert_eq!(d.wait(), (0, String::new()));
}
