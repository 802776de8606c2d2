//! librbd's own encryption (`encrypt`): images formatted by strata-img, by
//! strata-daemon's `blockdev-create` and by `rbd encryption format`, read
//! and written through Strata with the passphrase. The oracles: QEMU's
//! `luks` driver decrypts what `rbd export` returns of a LUKS1 image, and
//! `cryptsetup` reads the header and checks the passphrase of a LUKS2 one.

use crate::cluster::{data_extents, fails, ok, path, Cluster, STRATA_IMG, STRATA_IO};
use crate::daemon_support::{Client, Running, Side};
use std::path::Path;
use std::process::Command;

const PASS: &str = "correct horse battery staple";
const STRATA_DAEMON: &str = env!("CARGO_BIN_EXE_strata-daemon");

fn secret(data: &str) -> [String; 2] {
    ["--object".into(), format!("secret,id=sec0,data={data}")]
}

/// A `json:` name of `image` as a raw disk, with `encrypt` if given.
fn json(cl: &Cluster, image: &str, encrypt: Option<&str>) -> String {
    let enc = encrypt.map_or(String::new(), |f| {
        format!(r#", "encrypt": {{"format": "{f}", "key-secret": "sec0"}}"#)
    });
    format!(
        r#"json:{{"driver": "raw", "file": {{"driver": "rbd", "pool": "rbd", "image": "{image}", "conf": "{}"{enc}}}}}"#,
        cl.conf
    )
}

fn io(cl: &Cluster, image: &str, format: &str, pass: &str, cmds: &[&str]) -> Command {
    let mut c = Command::new(STRATA_IO);
    c.args(secret(pass));
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(json(cl, image, Some(format)));
    c
}

fn images(cl: &Cluster) -> Vec<String> {
    cl.rbd(&["ls", "rbd"]).lines().map(str::to_string).collect()
}

pub fn encrypted_images(cl: &Cluster, dir: &Path) {
    // LUKS1, made by strata-img: the guest sees the size asked for.
    ok(Command::new(STRATA_IMG)
        .arg("create")
        .args(secret(PASS))
        .args(["-f", "raw"])
        .args(["-o", "encrypt.format=luks,encrypt.key-secret=sec0"])
        .args([&cl.name("enc1"), "32M"]));
    let out = ok(&mut io(
        cl,
        "enc1",
        "luks",
        PASS,
        &[
            "length",
            "write -P 0x3c 0 1M",
            "aio_write -P 0x4d 20M 64k",
            "aio_write -P 0x5e 5000 100",
            "aio_flush",
            "read -P 0x3c 0 5000",
            "read -P 0x5e 5000 100",
            "read -P 0 1M 1M",
            "read -P 0x4d 20M 64k",
        ],
    ));
    assert!(out.starts_with("32 MiB"), "{out}");
    assert!(!out.contains("fail"), "{out}");
    // Opened without the passphrase, the image shows its header.
    let info = ok(Command::new(STRATA_IMG).args(["info", &cl.name("enc1")]));
    assert!(info.contains("encryption format: luks\n"), "{info}");
    // What Ceph stores is a LUKS1 volume that QEMU's own driver opens.
    // (Where nothing was written, librbd reads zeroes but the volume has
    // zero cipher text, which QEMU decrypts to noise: not compared.)
    let raw = dir.join("enc1.raw");
    cl.rbd(&["export", "rbd/enc1", &path(&raw)]);
    let stored = std::fs::read(&raw).unwrap();
    assert!(
        !stored.windows(4096).any(|w| w.iter().all(|&b| b == 0x3c)),
        "plain text on the cluster"
    );
    let luks = format!("driver=luks,key-secret=sec0,file.filename={}", path(&raw));
    let out = ok(Command::new("qemu-io")
        .args(secret(PASS))
        .args(["-r", "--image-opts"])
        .args(["-c", "length"])
        .args(["-c", "read -P 0x3c 0 5000"])
        .args(["-c", "read -P 0x5e 5000 100"])
        .args(["-c", "read -P 0x3c 5100 1043476"])
        .args(["-c", "read -P 0x4d 20M 64k"])
        .arg(&luks));
    assert!(out.starts_with("32 MiB"), "{out}");
    assert!(!out.contains("fail"), "{out}");

    // Block status in the guest's terms: librbd 16's whole-object walk
    // would put the data a header further on, and convert would drop it.
    let copy = dir.join("enc1-copy.raw");
    ok(Command::new(STRATA_IMG)
        .arg("convert")
        .args(secret(PASS))
        .args(["-O", "raw", &json(cl, "enc1", Some("luks"))])
        .arg(&copy));
    let out = ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x3c 0 5000",
        "-c",
        "read -P 0x4d 20M 64k",
        "-c",
        "read -P 0 21M 11M",
        &path(&copy),
    ]));
    assert!(!out.contains("fail"), "{out}");
    let map = ok(Command::new(STRATA_IMG)
        .arg("map")
        .args(secret(PASS))
        .args(["--output=json", &json(cl, "enc1", Some("luks"))]));
    let data = data_extents(&map);
    assert!(
        data.iter()
            .any(|&(s, l)| s <= 20 << 20 && s + l >= (20 << 20) + 65536),
        "{map}"
    );
    assert!(!data.iter().any(|&(s, _)| s >= 24 << 20), "{map}");

    // The wrong passphrase, or the wrong format: an error, exit code 1.
    let out = fails(&mut io(cl, "enc1", "luks", "wrong", &["read 0 4k"]));
    assert!(
        out.contains("encryption load fail: Operation not permitted"),
        "{out}"
    );
    let out = fails(&mut io(cl, "enc1", "luks2", PASS, &["read 0 4k"]));
    assert!(
        out.contains("encryption load fail: Invalid argument"),
        "{out}"
    );

    // LUKS2 made by Ceph's CLI opens as luks2 and as luks-any.
    let passfile = dir.join("pass");
    std::fs::write(&passfile, PASS).unwrap();
    cl.rbd(&["create", "--size", "32M", "rbd/enc2"]);
    cl.rbd(&[
        "encryption",
        "format",
        "rbd/enc2",
        "luks2",
        &path(&passfile),
    ]);
    ok(&mut io(
        cl,
        "enc2",
        "luks2",
        PASS,
        &["write -P 0x6f 1M 64k"],
    ));
    let out = ok(&mut io(
        cl,
        "enc2",
        "luks-any",
        PASS,
        &["read -P 0x6f 1M 64k"],
    ));
    assert!(!out.contains("fail"), "{out}");

    // LUKS2 with AES-128 made by strata-img: cryptsetup agrees.
    ok(Command::new(STRATA_IMG)
        .arg("create")
        .args(secret(PASS))
        .args(["-f", "raw"])
        .args([
            "-o",
            "encrypt.format=luks2,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128",
        ])
        .args([&cl.name("enc3"), "16M"]));
    ok(&mut io(
        cl,
        "enc3",
        "luks-any",
        PASS,
        &["write -P 0x7a 0 64k"],
    ));
    let raw3 = dir.join("enc3.raw");
    cl.rbd(&["export", "rbd/enc3", &path(&raw3)]);
    let dump = ok(Command::new("cryptsetup").args(["luksDump", &path(&raw3)]));
    assert!(dump.contains("Version:       \t2"), "{dump}");
    assert!(dump.contains("aes-xts-plain64"), "{dump}");
    assert!(dump.contains("256 bits"), "{dump}");
    ok(Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&passfile)
        .arg(&raw3));

    // Nothing made half-way: a missing secret is found before the image
    // is made.
    let before = images(cl);
    let out = fails(Command::new(STRATA_IMG).args([
        "create",
        "-f",
        "raw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=nosuch",
        &cl.name("enc4"),
        "16M",
    ]));
    assert!(out.contains("No secret with id 'nosuch'"), "{out}");
    assert_eq!(images(cl), before);
    // An image smaller than its header, which QEMU cannot make: the
    // header gets room of its own.
    ok(Command::new(STRATA_IMG)
        .arg("create")
        .args(secret(PASS))
        .args(["-f", "raw"])
        .args(["-o", "encrypt.format=luks2,encrypt.key-secret=sec0"])
        .args([&cl.name("enc4"), "1M"]));
    let out = ok(&mut io(
        cl,
        "enc4",
        "luks2",
        PASS,
        &["length", "write -P 0x21 0 1M", "read -P 0x21 0 1M"],
    ));
    assert!(out.starts_with("1 MiB"), "{out}");
    assert!(!out.contains("fail"), "{out}");

    blockdev_create(cl, dir);
}

/// Reads lines until one holds `text`; all of them.
fn until(c: &mut Client, text: &str) -> String {
    let mut seen = String::new();
    loop {
        let l = c.line();
        seen.push_str(&l);
        if l.contains(text) {
            return seen;
        }
    }
}

/// strata-daemon makes an encrypted image with redundancy over QMP, opens
/// it with its passphrase and serves it over NBD.
fn blockdev_create(cl: &Cluster, dir: &Path) {
    let side = Side {
        prog: STRATA_DAEMON.into(),
        dir: tempfile::tempdir_in(dir).unwrap(),
    };
    let sock = side.path("nbd.sock");
    let (_d, mut c) = Running::start(
        &side,
        &[
            secret(PASS).to_vec(),
            vec![
                "--nbd-server".into(),
                format!("addr.type=unix,addr.path={sock}"),
            ],
        ]
        .concat(),
    );
    c.line();
    assert!(c
        .ask(r#"{"execute": "qmp_capabilities"}"#)
        .contains("return"));
    let location = format!(
        r#""location": {{"pool": "rbd", "image": "qmp", "conf": "{}"}}"#,
        cl.conf
    );
    c.send(&format!(
        r#"{{"execute": "blockdev-create", "arguments": {{"job-id": "c0", "options": {{"driver": "rbd", {location}, "size": 8388608, "encrypt": {{"format": "luks2", "key-secret": "sec0"}}, "redundancy": "2"}}}}}}"#
    ));
    until(&mut c, r#""status": "concluded""#);
    let jobs = c.ask(r#"{"execute": "query-jobs"}"#);
    assert!(jobs.contains(r#""status": "concluded""#), "{jobs}");
    assert!(!jobs.contains("error"), "{jobs}");
    c.ask(r#"{"execute": "job-dismiss", "arguments": {"id": "c0"}}"#);
    let info = cl.rbd(&["info", "rbd/qmp"]);
    assert!(info.contains("data_pool: strata-copies-2"), "{info}");
    assert_eq!(
        cl.ceph(&["osd", "pool", "get", "strata-copies-2", "size"])
            .trim(),
        "size: 2"
    );
    // Bad options are the job's error, as in QEMU.
    c.send(&format!(
        r#"{{"execute": "blockdev-create", "arguments": {{"job-id": "c1", "options": {{"driver": "rbd", {location}, "size": 8388608, "cluster-size": 3000}}}}}}"#
    ));
    until(&mut c, r#""status": "concluded""#);
    let jobs = c.ask(r#"{"execute": "query-jobs"}"#);
    assert!(jobs.contains("obj size needs to be power of 2"), "{jobs}");
    c.ask(r#"{"execute": "job-dismiss", "arguments": {"id": "c1"}}"#);

    let add = format!(
        r#"{{"execute": "blockdev-add", "arguments": {{"driver": "raw", "node-name": "d", "file": {{"driver": "rbd", "pool": "rbd", "image": "qmp", "conf": "{}", "encrypt": {{"format": "luks2", "key-secret": "sec0"}}}}}}}}"#,
        cl.conf
    );
    let r = c.ask(&add);
    assert!(r.contains("return"), "{r}");
    let r = c.ask(
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "d", "writable": true}}"#,
    );
    assert!(r.contains("return"), "{r}");
    let uri = format!("nbd+unix:///d?socket={sock}");
    let out = ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "length",
        "-c",
        "write -P 0x42 4M 1M",
        "-c",
        "read -P 0x42 4M 1M",
        "-c",
        "read -P 0 0 4M",
        &uri,
    ]));
    assert!(out.starts_with("8 MiB"), "{out}");
    assert!(!out.contains("fail"), "{out}");
    c.ask(r#"{"execute": "quit"}"#);
    // Read back through strata-io: the data was encrypted with the key.
    let out = ok(&mut io(cl, "qmp", "luks2", PASS, &["read -P 0x42 4M 1M"]));
    assert!(!out.contains("fail"), "{out}");
}
