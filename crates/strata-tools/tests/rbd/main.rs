//! Strata's tools on a real Ceph cluster (`scripts/ceph-cluster`: one
//! monitor, three OSDs on loopback). The oracle is Ceph's own `rbd` CLI:
//! what strata-io and strata-img write is what `rbd export` returns, `map`
//! agrees with `rbd diff`, a converted image takes only the space its data
//! needs (`rbd du`), and a qcow2 image on RBD checks clean once exported.
//! Data goes where `redundancy` says (`rbd info`, `ceph osd pool get`),
//! librbd encrypts what `encrypt` asks for in a LUKS that QEMU and
//! cryptsetup read, strata-daemon makes images over QMP and serves them
//! over NBD, backing files may live on RBD, and a machine without librbd
//! gets an error that says what to install. One cluster serves every
//! step, since it takes about 18 s to start.

mod cluster;
#[path = "../daemon_support/mod.rs"]
mod daemon_support;
mod encryption;
mod redundancy;
mod serving;

use cluster::{
    data_extents, fails, ok, path, qemu_img, qemu_io_ok, Cluster, STRATA_IMG, STRATA_IO,
};
use std::process::Command;

#[test]
fn strata_tools_on_a_ceph_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(cl) = Cluster::start(tmp.path()) else {
        return;
    };
    let p = |n: &str| tmp.path().join(n);

    // A raw image made by strata-img, written by strata-io.
    cl.create_raw("disk", "64M");
    let info = cl.rbd(&["info", "rbd/disk"]);
    assert!(info.contains("size 64 MiB in 64 objects"), "{info}");
    assert!(info.contains("order 20 (1 MiB objects)"), "{info}");
    ok(Command::new(STRATA_IO).args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 3M",
        "-c",
        "write -P 0x6b 10M 4k",
        "-c",
        "write -z 1536k 512k",
        "-c",
        "aio_write -P 0x11 20M 64k",
        "-c",
        "aio_write -P 0x22 30M 64k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x5a 1M 512k",
        "-c",
        "read -P 0 1536k 512k",
        "-c",
        "discard 3M 1M",
        &cl.name("disk"),
    ]));
    cl.rbd(&["export", "rbd/disk", &p("disk.raw").display().to_string()]);
    qemu_io_ok(
        "raw",
        &p("disk.raw"),
        &[
            "read -P 0 0 1M",
            "read -P 0x5a 1M 512k",
            "read -P 0 1536k 512k",
            "read -P 0x5a 2M 1M",
            "read -P 0 3M 1M",
            "read -P 0x6b 10M 4k",
            "read -P 0x11 20M 64k",
            "read -P 0x22 30M 64k",
        ],
    );
    // map says what `rbd diff` says: data in the objects written.
    let map = ok(Command::new(STRATA_IMG).args(["map", "--output=json", &cl.name("disk")]));
    let diff = cl.rbd(&["diff", "--whole-object", "--format", "json", "rbd/disk"]);
    let extents: Vec<serde_json::Value> = serde_json::from_str(&diff).unwrap();
    let data = data_extents(&map);
    let mut want: Vec<(u64, u64)> = Vec::new();
    for e in extents.iter().filter(|e| e["exists"] == "true") {
        let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match want.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += l,
            _ => want.push((o, l)),
        }
    }
    assert!(data.len() >= 3, "map {map}");
    assert_eq!(data, want, "map {map}\ndiff {diff}");

    // convert keeps the image sparse: 2 MiB of data in a 64 MiB image.
    qemu_img(&["create", "-q", "-f", "qcow2", &path(&p("src.qcow2")), "64M"]);
    ok(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x33 0 1M",
        "-c",
        "write -P 0x44 40M 1M",
        &path(&p("src.qcow2")),
    ]));
    ok(Command::new(STRATA_IMG).args([
        "convert",
        "-O",
        "raw",
        &path(&p("src.qcow2")),
        &cl.name("conv"),
    ]));
    let du = cl.rbd(&["du", "--format", "json", "rbd/conv"]);
    let du: serde_json::Value = serde_json::from_str(&du).unwrap();
    let used = du["images"][0]["used_size"].as_u64().unwrap();
    assert!(used <= 8 << 20, "{du}");
    cl.rbd(&["export", "rbd/conv", &path(&p("conv.raw"))]);
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &path(&p("src.qcow2")),
        &path(&p("conv.raw")),
    ]);

    // compare and resize, both ways.
    let compare = || {
        let mut c = Command::new(STRATA_IMG);
        c.args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(p("src.qcow2"))
            .arg(cl.name("conv"));
        c
    };
    let out = ok(&mut compare());
    assert!(out.contains("Images are identical."), "{out}");
    ok(Command::new(STRATA_IO).args(["-f", "raw", "-c", "write -P 0x55 8M 4k", &cl.name("conv")]));
    let out = fails(&mut compare());
    assert!(out.contains("Content mismatch at offset 8388608!"), "{out}");
    ok(Command::new(STRATA_IMG).args(["resize", "-f", "raw", &cl.name("conv"), "128M"]));
    assert!(cl.rbd(&["info", "rbd/conv"]).contains("size 128 MiB"));
    let out =
        fails(Command::new(STRATA_IMG).args(["resize", "-f", "raw", &cl.name("conv"), "32M"]));
    assert!(out.contains("Use the --shrink option"), "{out}");
    ok(Command::new(STRATA_IMG).args(["resize", "-f", "raw", "--shrink", &cl.name("conv"), "32M"]));
    assert!(cl.rbd(&["info", "rbd/conv"]).contains("size 32 MiB"));

    // qcow2 on RBD: it checks clean once exported, and holds the data.
    ok(Command::new(STRATA_IMG).args(["create", "-f", "qcow2", &cl.name("q"), "64M"]));
    ok(Command::new(STRATA_IO).args(["-f", "qcow2", "-c", "write -P 0x77 5M 192k", &cl.name("q")]));
    cl.rbd(&["export", "rbd/q", &path(&p("q.qcow2"))]);
    qemu_img(&["check", &path(&p("q.qcow2"))]);
    qemu_io_ok(
        "qcow2",
        &p("q.qcow2"),
        &["read -P 0x77 5M 192k", "read -P 0 0 5M"],
    );

    // Bad input: each a clear error and exit code 1.
    let conf = cl.conf.clone();
    let down = p("down.conf");
    std::fs::write(&down, "[global]\nmon host = v1:127.0.0.1:1\n").unwrap();
    for (name, want) in [
        (
            format!("rbd:nosuch/disk:conf={conf}"),
            "error opening pool nosuch: No such file or directory",
        ),
        (
            format!("rbd:rbd/nosuch:conf={conf}"),
            "error reading header from nosuch: No such file or directory",
        ),
        (
            "rbd:rbd/disk:conf=/nonexistent.conf".to_string(),
            "error reading conf file /nonexistent.conf: No such file or directory",
        ),
        ("rbd:nopool".to_string(), "Pool name is required"),
        // No cluster there: a timeout, not a hang.
        (
            format!(
                "rbd:rbd/disk:conf={}:client_mount_timeout=2",
                down.display()
            ),
            "error connecting: Connection timed out",
        ),
    ] {
        let out = fails(Command::new(STRATA_IO).args(["-f", "raw", "-c", "read 0 4k", &name]));
        assert!(out.contains(want), "{name}: {out}");
    }

    auth_options(&cl);
    redundancy::data_goes_where_redundancy_says(&cl, tmp.path());
    encryption::encrypted_images(&cl, tmp.path());
    serving::daemon_exports_an_rbd_image(&cl, tmp.path());
    serving::backing_files_on_rbd(&cl, tmp.path());
    serving::bench_on_rbd(&cl);
    serving::without_librbd(&cl);
}

/// `key-secret`, `auth-client-required` and `namespace` reach librados.
/// The cluster has no authentication, so any well-formed key is accepted.
/// A malformed key is an error only when cephx is among the modes: so
/// both options got there.
fn auth_options(cl: &Cluster) {
    let json = |extra: &str| {
        format!(
            r#"json:{{"driver": "raw", "file": {{"driver": "rbd", "pool": "rbd", "image": "disk", "conf": "{}"{extra}}}}}"#,
            cl.conf
        )
    };
    let key = ok(Command::new("ceph-authtool").arg("--gen-print-key"));
    let out = ok(Command::new(STRATA_IO).args([
        "--object",
        &format!("secret,id=k0,format=base64,data={}", key.trim()),
        "-c",
        "read -P 0x5a 1M 64k",
        &json(r#", "key-secret": "k0", "auth-client-required": ["none", "cephx"]"#),
    ]));
    assert!(!out.contains("fail"), "{out}");
    let out = fails(Command::new(STRATA_IO).args([
        "--object",
        "secret,id=k0,data=not-a-ceph-key",
        "-c",
        "read 0 4k",
        &json(r#", "key-secret": "k0", "auth-client-required": ["none", "cephx"]"#),
    ]));
    assert!(out.contains("error connecting: Invalid argument"), "{out}");
    for (extra, want) in [
        (r#", "key-secret": "nope""#, "No secret with id 'nope'"),
        (
            r#", "auth-client-required": ["kerberos"]"#,
            "Parameter 'auth-client-required[0]' does not accept value 'kerberos'",
        ),
        (
            r#", "key-secret": "k0", "password-secret": "k0""#,
            "Legacy 'password-secret' clashes with 'key-secret'",
        ),
        (
            r#", "namespace": "nons""#,
            "namespace 'nons' does not exist",
        ),
    ] {
        let out = fails(Command::new(STRATA_IO).args(["-c", "read 0 4k", &json(extra)]));
        assert!(out.contains(want), "{extra}: {out}");
    }
}
