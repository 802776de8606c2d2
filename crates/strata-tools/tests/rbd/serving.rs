//! RBD images beyond strata-img and strata-io: served by strata-daemon over
//! NBD, as backing files, under `bench`, and on a machine without librbd.

use crate::cluster::{fails, ok, path, qemu_io_ok, text, Cluster, STRATA_IMG, STRATA_IO};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STRATA_DAEMON: &str = env!("CARGO_BIN_EXE_strata-daemon");

/// strata-daemon with `--blockdev driver=rbd` and an NBD export: what an
/// NBD client writes is what `rbd export` returns, and the export's map
/// keeps the image sparse.
pub fn daemon_exports_an_rbd_image(cl: &Cluster, dir: &Path) {
    cl.create_raw("served", "16M");
    let sock = dir.join("rbd-nbd.sock");
    let mut daemon = Command::new(STRATA_DAEMON)
        .args([
            "--blockdev",
            &format!(
                "driver=rbd,node-name=disk,pool=rbd,image=served,conf={}",
                cl.conf
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", path(&sock)),
            "--export",
            "type=nbd,id=e0,node-name=disk,writable=on",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        if let Ok(Some(_)) = daemon.try_wait() {
            panic!(
                "strata-daemon: {}",
                text(&daemon.wait_with_output().unwrap())
            );
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no NBD socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let uri = format!("nbd+unix:///disk?socket={}", path(&sock));
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x61 0 1M",
        "-c",
        "aio_write -P 0x62 8M 64k",
        "-c",
        "aio_write -P 0x63 12M 64k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x61 0 1M",
        &uri,
    ]));
    let map = ok(Command::new("nbdinfo").args(["--map", &uri]));
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // Data in the objects written (1 MiB each), a hole between them.
    assert_eq!(&rows[0][..2], ["0", "1048576"], "{map}");
    assert_eq!(rows[0].last(), Some(&"data"), "{map}");
    assert_eq!(&rows[1][..2], ["1048576", "7340032"], "{map}");
    assert_eq!(rows[1].last(), Some(&"hole,zero"), "{map}");
    // SIGTERM: the daemon closes the image and exits cleanly.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let out = daemon.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let raw = dir.join("served.raw");
    cl.rbd(&["export", "rbd/served", &path(&raw)]);
    qemu_io_ok(
        "raw",
        &raw,
        &[
            "read -P 0x61 0 1M",
            "read -P 0 1M 7M",
            "read -P 0x62 8M 64k",
            "read -P 0x63 12M 64k",
        ],
    );
}

/// Backing files on RBD: a local qcow2 over a raw RBD image, and a qcow2
/// on RBD over another qcow2 on RBD, flattened by convert.
pub fn backing_files_on_rbd(cl: &Cluster, dir: &Path) {
    // The raw image `disk` and the qcow2 image `q` are the main test's.
    let ov = path(&dir.join("over-rbd.qcow2"));
    ok(Command::new(STRATA_IMG).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &cl.name("disk"),
        "-F",
        "raw",
        &ov,
    ]));
    ok(Command::new(STRATA_IO).args([
        "-c",
        "write -P 0x99 1M 64k",
        "-c",
        "read -P 0x99 1M 64k",
        "-c",
        "read -P 0x5a 1088k 448k",
        "-c",
        "read -P 0x6b 10M 4k",
        &ov,
    ]));
    let chain = ok(Command::new(STRATA_IMG).args(["info", "--backing-chain", &ov]));
    assert!(
        chain.contains(&format!("backing file: {}\n", cl.name("disk"))),
        "{chain}"
    );
    assert!(chain.contains(r#""driver": "rbd""#), "{chain}");
    // The base is untouched.
    let base = ok(Command::new(STRATA_IO).args([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 1M 64k",
        &cl.name("disk"),
    ]));
    assert!(!base.contains("fail"), "{base}");

    ok(Command::new(STRATA_IMG).args([
        "create",
        "-f",
        "qcow2",
        "-b",
        &cl.name("q"),
        "-F",
        "qcow2",
        &cl.name("qov"),
    ]));
    ok(Command::new(STRATA_IO).args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x88 5M 64k",
        &cl.name("qov"),
    ]));
    let flat = dir.join("flat.qcow2");
    ok(Command::new(STRATA_IMG).args(["convert", "-O", "qcow2", &cl.name("qov"), &path(&flat)]));
    qemu_io_ok(
        "qcow2",
        &flat,
        &[
            "read -P 0 0 5M",
            "read -P 0x88 5M 64k",
            "read -P 0x77 5184k 128k",
            "read -P 0 5312k 1M",
        ],
    );
    ok(Command::new("qemu-img").args(["check", &path(&flat)]));
}

/// `strata-img bench` at depth 32 on an RBD image.
pub fn bench_on_rbd(cl: &Cluster) {
    for rw in [&["-w"][..], &[]] {
        let out = ok(Command::new(STRATA_IMG)
            .args(["bench", "-f", "raw", "-c", "512", "-d", "32", "-s", "4k"])
            .args(rw)
            .arg(cl.name("served")));
        assert!(out.contains("Run completed in"), "{out}");
    }
}

/// A machine without librbd: opening an `rbd:` image says what to
/// install; every other image still opens. Hides the library in a mount
/// namespace, so it needs root (CI has it).
pub fn without_librbd(cl: &Cluster) {
    let lib = "/lib/x86_64-linux-gnu/librbd.so.1";
    if !Path::new(lib).exists() {
        eprintln!("{lib} not found: the no-librbd case does not run");
        return;
    }
    let hidden = |cmd: &str| {
        let mut c = Command::new("unshare");
        c.args([
            "--mount",
            "sh",
            "-c",
            &format!("mount --bind /dev/null {lib} && exec {cmd}"),
        ]);
        c
    };
    let probe = Command::new("unshare")
        .args(["--mount", "true"])
        .output()
        .unwrap();
    if !probe.status.success() {
        eprintln!("no mount namespace here: the no-librbd case does not run");
        return;
    }
    let out = fails(&mut hidden(&format!(
        "{STRATA_IO} -f raw -c 'read 0 4k' '{}'",
        cl.name("served")
    )));
    assert!(
        out.contains("Could not load librbd.so.1") && out.contains("apt-get install librbd1"),
        "{out}"
    );
    let out = ok(&mut hidden(&format!(
        "{STRATA_IMG} info --image-opts driver=null-co"
    )));
    assert!(out.contains("file format: null-co"), "{out}");
}
