//! libnbd's clients and fio against strata-nbd (issue "Serving disks
//! live"): an nbdsh script sees and does the same against strata-nbd as
//! against qemu-nbd; nbdcopy copies out and in exactly; fio's nbd engine
//! writes with verification at depth 16 and the image checks clean.

mod nbd_support;
use nbd_support::{client, image, Served};
use std::process::Command;

const STRATA_NBD: &str = env!("CARGO_BIN_EXE_strata-nbd");

/// Runs `prog` with Debian's Python first on the path: nbdsh and libnbd's
/// Python module belong to /usr/bin/python3, not to another python3.
fn debian(prog: &str, args: &[&str]) -> (String, bool) {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new(prog)
        .args(args)
        .env("PATH", path)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e} (.ci/run installs it)"));
    (
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        out.status.success(),
    )
}

/// What libnbd's Python binding sees of an export and does to it.
const NBDSH: &str = r#"
import hashlib
print("size", h.get_size())
for f in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
          "can_multi_conn", "can_cache", "can_df", "is_read_only",
          "is_rotational", "get_structured_replies_negotiated"):
    print(f, getattr(h, f)())
for f in ("block_size",):
    print(f, [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)])
print("read", hashlib.sha256(h.pread(1 << 20, 1 << 20)).hexdigest())
h.pwrite(b"\x11" * 65536, 12 << 20, nbd.CMD_FLAG_FUA)
h.zero(1 << 20, 1 << 20)
h.zero(65536, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
h.trim(65536, 8 << 20)
h.cache(65536, 12 << 20)
h.flush()
print("after", hashlib.sha256(h.pread(16 << 20, 0)).hexdigest())
def extents(meta, off, ents, err):
    print(meta, off, list(zip(ents[0::2], ents[1::2])))
h.block_status(64 << 20, 0, extents)
h.block_status(64 << 20, 0, extents, nbd.CMD_FLAG_REQ_ONE)
try:
    h.pread(4096, 64 << 20)
except nbd.Error as e:
    print("past the end:", e.errno)
"#;

fn nbdsh_session(server: &str, dir: &std::path::Path) -> String {
    let img = image(dir);
    let sock = dir.join("s.sock");
    let s = Served::start(server, &sock, &["-t", "-f", "qcow2", img.to_str().unwrap()]);
    let (out, ok) = debian(
        "nbdsh",
        &["--base-allocation", "-u", &s.uri(""), "-c", NBDSH],
    );
    assert!(ok, "{out}");
    s.stop();
    let check = client("qemu-img", &["check", img.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
    out
}

#[test]
fn nbdsh_sees_and_does_the_same_as_against_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let want = nbdsh_session("qemu-nbd", dir.path());
    let got = nbdsh_session(STRATA_NBD, dir.path());
    assert!(want.contains("base:allocation"), "{want}");
    assert_eq!(got, want);
}

/// The chunks of one structured read: offset, length, kind, bytes seen.
const CHUNKS: &str = r#"
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status, sorted(set(bytes(buf)))))
    return 0
h.pread_structured(5 * 65536, 0, chunk)
for c in chunks:
    print(*c)
"#;

#[test]
fn a_read_over_scattered_clusters_is_one_data_chunk() {
    // Clusters 1-3 hold data, written out of order so that cluster 3 sits
    // before 1 and 2 in the file; 0 and 4 are holes.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("scattered.qcow2");
    let p = img.to_str().unwrap();
    client("qemu-img", &["create", "-q", "-f", "qcow2", p, "320K"]);
    client(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 192K 64K",
            "-c",
            "write -P 0x11 64K 64K",
            "-c",
            "write -P 0x22 128K 64K",
            p,
        ],
    );
    let sock = dir.path().join("s.sock");
    let s = Served::start(STRATA_NBD, &sock, &["-t", "-f", "qcow2", p]);
    let (out, ok) = debian("nbdsh", &["-u", &s.uri(""), "-c", CHUNKS]);
    s.stop();
    assert!(ok, "{out}");
    // READ_HOLE is 2, READ_DATA 1: a hole, the three clusters in one data
    // chunk (QEMU sends two: its extents follow the file), a hole.
    assert_eq!(
        out,
        "0 65536 2 [0]\n65536 196608 1 [17, 34, 51]\n262144 65536 2 [0]\n"
    );
}

#[test]
fn nbdcopy_copies_out_and_in_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let p = img.to_str().unwrap();
    let sock = dir.path().join("s.sock");
    let out = dir.path().join("out.raw");
    let want = dir.path().join("want.raw");
    client(
        "qemu-img",
        &["convert", "-O", "raw", p, want.to_str().unwrap()],
    );
    {
        let s = Served::start(STRATA_NBD, &sock, &["-t", "-f", "qcow2", p]);
        let (o, ok) = debian("nbdcopy", &[&s.uri(""), out.to_str().unwrap()]);
        assert!(ok, "{o}");
    }
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&want).unwrap());
    // In: a fresh image filled from a raw file of random data.
    let data = dir.path().join("data.raw");
    let bytes: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 11) as u8)
        .collect();
    std::fs::write(&data, &bytes).unwrap();
    let target = dir.path().join("t.qcow2");
    let t = target.to_str().unwrap();
    client("qemu-img", &["create", "-q", "-f", "qcow2", t, "16M"]);
    {
        let s = Served::start(STRATA_NBD, &sock, &["-t", "-f", "qcow2", t]);
        let (o, ok) = debian("nbdcopy", &[data.to_str().unwrap(), &s.uri("")]);
        assert!(ok, "{o}");
        s.stop();
    }
    let cmp = client(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            data.to_str().unwrap(),
            t,
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let check = client("qemu-img", &["check", t]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn fio_writes_and_verifies_through_the_nbd_engine() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.qcow2");
    let p = img.to_str().unwrap();
    client("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"]);
    let sock = dir.path().join("s.sock");
    {
        let s = Served::start(STRATA_NBD, &sock, &["-t", "-f", "qcow2", p]);
        let uri = format!("--uri={}", s.uri(""));
        let (out, ok) = debian(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &uri,
                "--rw=randwrite",
                "--bs=4k",
                "--size=32M",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=terse",
            ],
        );
        assert!(ok, "{out}");
        s.stop();
    }
    let check = client("qemu-img", &["check", p]);
    assert!(check.contains("No errors were found"), "{check}");
    let map = client("qemu-img", &["map", "--output=json", p]);
    assert!(map.contains("\"data\": true"), "{map}");
}
