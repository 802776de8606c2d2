//! strata-nbd against QEMU's and libnbd's clients (issue "Serving disks
//! live"): what qemu-img, qemu-io and nbdinfo see of an image served by
//! strata-nbd is what they see of it served by qemu-nbd; data written over
//! NBD lands in the image; hostile clients get errors or a closed
//! connection while the server keeps serving the others.

mod nbd_support;
use nbd_support::{client, image, Served};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const STRATA_NBD: &str = env!("CARGO_BIN_EXE_strata-nbd");

/// What the clients print about an export, with the socket name made equal.
fn seen(uri: &str, sock: &Path, export: &str) -> String {
    let list = format!("nbd+unix://?socket={}", sock.display());
    let mut out = String::new();
    out += &client("qemu-img", &["map", "--output=json", uri]);
    out += &client("qemu-img", &["info", uri]);
    out += &client("nbdinfo", &["--json", uri]);
    out += &client("nbdinfo", &["--list", "--json", &list]);
    out += &client("nbdinfo", &["--map", uri]);
    out += &client("qemu-nbd", &["-L", "-k", sock.to_str().unwrap()]);
    if export == "exp1" {
        out += &client("nbdinfo", &["--map=qemu:allocation-depth", uri]);
    }
    out.replace(sock.to_str().unwrap(), "SOCK")
}

#[test]
fn clients_see_the_same_export_as_from_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let p = img.to_str().unwrap();
    let sock = dir.path().join("s.sock");
    for (opts, export) in [
        (vec![], ""),
        (vec!["-x", "exp1"], "exp1"),
        (
            vec!["-r", "-e", "2", "-x", "exp1", "-D", "a disk", "-A"],
            "exp1",
        ),
        // Served from 1 MiB into the image on.
        (vec!["-o", "1048576"], ""),
    ] {
        let mut args = opts.clone();
        args.extend(["-t", "-f", "qcow2", p]);
        let want = {
            let s = Served::start("qemu-nbd", &sock, &args);
            seen(&s.uri(export), &sock, export)
        };
        let got = {
            let s = Served::start(STRATA_NBD, &sock, &args);
            seen(&s.uri(export), &sock, export)
        };
        assert!(want.contains("\"data\": true"), "{want}");
        assert_eq!(got, want, "with {opts:?}");
    }
}

#[test]
fn writes_over_nbd_land_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let p = img.to_str().unwrap();
    let sock = dir.path().join("s.sock");
    {
        let s = Served::start(STRATA_NBD, &sock, &["-t", "-f", "qcow2", p]);
        let out = client(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "aio_write -P 0xcd 32M 1M",
                "-c",
                "aio_write -P 0xce 40M 1M",
                "-c",
                "aio_flush",
                "-c",
                "write -z 1M 64k",
                "-c",
                "discard 8M 64k",
                "-c",
                "read -P 0xab 0 64k",
                "-c",
                "read -P 0 1M 64k",
                &s.uri(""),
            ],
        );
        assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    }
    let check = client("qemu-img", &["check", p]);
    assert!(check.contains("No errors were found"), "{check}");
    let out = client(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0xcd 32M 1M",
            "-c",
            "read -P 0xce 40M 1M",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "read -P 0x5a 1088k 960k",
            p,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn a_read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("s.sock");
    let s = Served::start(
        STRATA_NBD,
        &sock,
        &["-t", "-r", "-f", "qcow2", img.to_str().unwrap()],
    );
    // QEMU's client will not even open it for writing (as with qemu-nbd).
    let out = client("qemu-io", &["-f", "raw", "-c", "write 0 4k", &s.uri("")]);
    assert!(out.contains("Permission denied"), "{out}");
    // A client that writes anyway gets EPERM.
    let mut c = greet(&sock);
    go(&mut c, "");
    let mut req = request(1, 5, 0, 512);
    req.extend_from_slice(&[0xee; 512]);
    c.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &1u32.to_be_bytes(), "EPERM");
    let out = client(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-r",
            "-U",
            "-c",
            "read -P 0 0 512",
            img.to_str().unwrap(),
        ],
    );
    assert!(out.contains("read 512/512"), "{out}");
}

/// Connects and reads the server's greeting.
fn greet(sock: &Path) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    c
}

/// The server closed the connection (a read sees the end).
fn closed(c: &mut UnixStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Option header for `opt` with `len` bytes of payload announced.
fn option(opt: u32, len: u32) -> Vec<u8> {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// A compact request header: command `kind`, no flags.
fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Finishes a handshake with OPT_EXPORT_NAME `name` (no zeroes).
fn go(c: &mut UnixStream, name: &str) {
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c.write_all(&option(1, name.len() as u32)).unwrap();
    c.write_all(name.as_bytes()).unwrap();
    let mut reply = [0u8; 10];
    c.read_exact(&mut reply).unwrap();
}

/// Hostile clients against the server `s` exporting `name` (a 64 MiB disk
/// with pattern 7 at 8M): each gets an error or a closed connection, the
/// server's memory stays bounded, and a well-behaved client is served
/// meanwhile.
fn hostile_clients(s: &Served, name: &str) {
    let sock = &s.sock;
    let rss_before = s.rss_kib();
    // Garbage instead of client flags and options.
    let mut c = greet(sock);
    c.write_all(&[0xff; 64]).unwrap();
    assert!(closed(&mut c));
    // An option announcing a huge payload: dropped before it is read.
    let mut c = greet(sock);
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c.write_all(&option(7, u32::MAX)).unwrap();
    assert!(closed(&mut c));
    // A truncated header, then silence: the handshake limit ends it; meanwhile
    // the others are served.
    let mut idle = greet(sock);
    idle.write_all(&[0, 0]).unwrap();
    // A write whose announced length is over the maximum: closed unread.
    let mut c = greet(sock);
    go(&mut c, name);
    let req = request(1, 7, 0, u32::MAX);
    c.write_all(&req).unwrap();
    assert!(closed(&mut c));
    // A read past the end: an EINVAL reply, and the connection lives on.
    let mut c = greet(sock);
    go(&mut c, name);
    let req = request(0, 9, 64 << 20, 4096);
    c.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(&reply[4..8], &22u32.to_be_bytes(), "EINVAL");
    assert_eq!(&reply[8..], &9u64.to_be_bytes());
    // An unknown command: EINVAL too, and the connection lives on.
    c.write_all(&request(0x55, 10, 0, 512)).unwrap();
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &22u32.to_be_bytes(), "EINVAL");
    // A client that sends reads and never reads a reply: the server stops
    // reading from it, and others are still served.
    let mut greedy = greet(sock);
    go(&mut greedy, name);
    greedy
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let req = request(0, 1, 0, 32 << 20);
    let mut sent = 0;
    while sent < 10_000 && greedy.write_all(&req).is_ok() {
        sent += 1;
    }
    assert!(
        sent < 10_000,
        "the server kept reading requests it could not answer"
    );
    // An option flood whose answers are never read: the server stops
    // reading options it cannot answer.
    let mut flood = greet(sock);
    flood.write_all(&3u32.to_be_bytes()).unwrap();
    flood
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let list: Vec<u8> = (0..1024).flat_map(|_| option(3, 0)).collect();
    let mut sent = 0;
    while sent < 10_000 && flood.write_all(&list).is_ok() {
        sent += 1;
    }
    assert!(
        sent < 10_000,
        "the server kept reading options it could not answer"
    );
    // A well-behaved client meanwhile.
    let out = client(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 7 8M 64k", &s.uri(name)],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    // A client holds one read larger than its budget at a time, buffer
    // and all, until the reply is written; nothing grows with what it sent.
    let grown = s.rss_kib().saturating_sub(rss_before);
    assert!(grown < 48 << 10, "the server grew by {grown} KiB");
    drop((idle, greedy, flood));
}

#[test]
fn hostile_clients_do_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("s.sock");
    let s = Served::start(
        STRATA_NBD,
        &sock,
        &["-t", "-e", "8", "-f", "qcow2", img.to_str().unwrap()],
    );
    hostile_clients(&s, "");
}

#[test]
fn hostile_clients_do_not_stop_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("s.sock");
    let file = format!("driver=file,filename={},node-name=f", img.display());
    let s = Served::daemon(
        &sock,
        &[
            "--blockdev",
            &file,
            "--blockdev",
            "driver=qcow2,file=f,node-name=disk",
            "--export",
            "type=nbd,id=e,node-name=disk,name=disk,writable=on",
        ],
    );
    hostile_clients(&s, "disk");
}
