//! The `nbd` protocol driver against QEMU's, nbdkit's and Strata's servers
//! (issue "Serving disks live"): what strata-img and strata-io make of a
//! remote disk is what qemu-img and qemu-io make of it, to the byte; data
//! written through the driver lands in the served image; a remote disk
//! serves as a backing file; errors read as QEMU's.

mod nbd_support;
use nbd_support::{client, image, Served};
use std::path::Path;
use std::process::Command;

const STRATA_NBD: &str = env!("CARGO_BIN_EXE_strata-nbd");
const STRATA_IMG: &str = env!("CARGO_BIN_EXE_strata-img");
const STRATA_IO: &str = env!("CARGO_BIN_EXE_strata-io");

/// Output and exit code of a program, its own name made QEMU's.
fn run(prog: &str, args: &[&str]) -> (String, i32) {
    let out = Command::new("timeout")
        .arg("60")
        .arg(prog)
        .args(args)
        .output()
        .expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = text
        .replace("strata-img:", "qemu-img:")
        .replace("strata-io:", "qemu-io:")
        .replace("strata-nbd:", "qemu-nbd:");
    (text, out.status.code().unwrap_or(-1))
}

/// strata-img and qemu-img (or strata-io and qemu-io) give the same answer.
fn same(strata: &str, qemu: &str, args: &[&str]) -> String {
    let want = run(qemu, args);
    let got = run(strata, args);
    assert_eq!(got, want, "{strata} {args:?}");
    want.0
}

/// Everything the image tools show of a remote disk, both tools alike.
fn inspect(uri: &str) {
    for args in [
        vec!["info", uri],
        vec!["info", "--output=json", uri],
        vec!["map", uri],
        vec!["map", "--output=json", uri],
        vec!["info", "-f", "raw", uri],
        vec!["map", "-f", "raw", "--output=json", uri],
    ] {
        same(STRATA_IMG, "qemu-img", &args);
    }
}

/// `strata-nbd -L` lists the server's exports as `qemu-nbd -L` does.
fn lists(sock: &Path) {
    let k = sock.to_str().unwrap();
    let want = run("qemu-nbd", &["-L", "-k", k]);
    let got = run(STRATA_NBD, &["-L", "-k", k]);
    assert!(want.0.contains("exports available"), "{want:?}");
    assert_eq!(got, want);
}

/// Copies the remote disk with strata-img convert; qemu-img finds the copy
/// equal to the disk.
fn converts(dir: &Path, uri: &str) {
    let out = dir.join("copy.qcow2");
    let o = out.to_str().unwrap();
    let (text, code) = run(STRATA_IMG, &["convert", "-O", "qcow2", uri, o]);
    assert_eq!(code, 0, "{text}");
    let cmp = client("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", uri, o]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let cmp = run(STRATA_IMG, &["compare", "-f", "raw", "-F", "qcow2", uri, o]).0;
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let check = client("qemu-img", &["check", o]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn remote_disks_look_the_same_to_strata_img_as_to_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let p = img.to_str().unwrap();
    let sock = dir.path().join("s.sock");
    for server in ["qemu-nbd", STRATA_NBD] {
        for (opts, export) in [(vec![], ""), (vec!["-x", "e 1"], "e%201")] {
            let mut args = opts.clone();
            args.extend(["-t", "-r", "-f", "qcow2", p]);
            let s = Served::start(server, &sock, &args);
            inspect(&s.uri(export));
            lists(&sock);
            converts(dir.path(), &s.uri(export));
        }
    }
}

#[test]
fn nbdkit_disks_read_as_qemu_img_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    for plugin in [
        vec!["memory", "64M"],
        vec!["sparse-random", "size=256M", "seed=7"],
        // A size that is no multiple of 512: byte-granular access.
        vec!["pattern", "size=1000013"],
    ] {
        let s = Served::nbdkit(&sock, &plugin);
        inspect(&s.uri(""));
        lists(&sock);
        converts(dir.path(), &s.uri(""));
    }
}

#[test]
fn writes_through_the_driver_land_in_the_served_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let p = img.to_str().unwrap();
    let sock = dir.path().join("s.sock");
    for server in ["qemu-nbd", STRATA_NBD] {
        {
            let s = Served::start(server, &sock, &["-f", "qcow2", p]);
            let uri = s.uri("");
            // Many requests in flight, unaligned ones among them.
            let mut cmds = vec!["-f", "raw"];
            let writes: Vec<String> = (0..24)
                .map(|i| format!("aio_write -P {} {} 40000", 0x10 + i, 16 << 20 | i << 16))
                .collect();
            for w in &writes {
                cmds.extend(["-c", w.as_str()]);
            }
            cmds.extend([
                "-c",
                "aio_flush",
                "-c",
                "write -z 1M 64k",
                "-c",
                "write -P 0x33 7 3",
                "-c",
                "flush",
                uri.as_str(),
            ]);
            let (text, code) = run(STRATA_IO, &cmds);
            assert_eq!(code, 0, "{text}");
            assert!(!text.contains("failed"), "{text}");
        }
        let check = client("qemu-img", &["check", p]);
        assert!(check.contains("No errors were found"), "{check}");
        let mut reads = vec!["-f", "qcow2"];
        let want: Vec<String> = (0..24)
            .map(|i| format!("read -P {} {} 40000", 0x10 + i, 16 << 20 | i << 16))
            .collect();
        for r in &want {
            reads.extend(["-c", r.as_str()]);
        }
        reads.extend(["-c", "read -P 0 1M 64k", "-c", "read -P 0x33 7 3", p]);
        let text = client("qemu-io", &reads);
        assert!(!text.contains("Pattern verification failed"), "{text}");
    }
}

#[test]
fn a_remote_disk_serves_as_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let p = img.to_str().unwrap();
    let sock = dir.path().join("s.sock");
    let s = Served::start(STRATA_NBD, &sock, &["-t", "-r", "-f", "qcow2", p]);
    let uri = s.uri("");
    let top = dir.path().join("top.qcow2");
    let t = top.to_str().unwrap();
    let (text, code) = run(
        STRATA_IMG,
        &["create", "-q", "-f", "qcow2", "-b", &uri, "-F", "raw", t],
    );
    assert_eq!(code, 0, "{text}");
    let (text, code) = run(
        STRATA_IO,
        &[
            "-c",
            "write -P 9 8M 4k",
            "-c",
            "read -P 9 8M 4k",
            "-c",
            "read -P 7 8196k 60k",
            "-c",
            "read -P 0x5a 1M 1M",
            t,
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    same(STRATA_IMG, "qemu-img", &["info", "--backing-chain", t]);
    same(STRATA_IMG, "qemu-img", &["map", "--output=json", t]);
}

#[test]
fn errors_read_as_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let p = img.to_str().unwrap();
    let sock = dir.path().join("s.sock");
    let s = Served::start(
        "qemu-nbd",
        &sock,
        &["-t", "-r", "-x", "e", "-f", "qcow2", p],
    );
    let good = s.uri("e");
    let missing = s.uri("nope");
    let gone = format!("nbd+unix:///e?socket={}", dir.path().join("x").display());
    for uri in [
        missing.as_str(),
        gone.as_str(),
        "nbd://localhost:notaport/e",
        "nbd://localhost:1/e",
        "nbd+unix:///e?socket=/s&x=1",
    ] {
        same(STRATA_IMG, "qemu-img", &["info", uri]);
    }
    // QEMU prints a GLib assertion before its message here; Strata does not.
    let (text, code) = run(STRATA_IMG, &["info", "nbd+unix:///e"]);
    assert_eq!(
        (text.as_str(), code),
        (
            "qemu-img: Could not open 'nbd+unix:///e': No valid URL specified\n",
            1
        )
    );
    // A read-only export opened for writing.
    same(STRATA_IO, "qemu-io", &["-c", "write 0 4k", &good]);
    same(
        STRATA_IO,
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4k", &good],
    );
}

#[test]
fn an_image_is_made_on_an_existing_export() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    for tool in ["qemu-img", STRATA_IMG] {
        let disk = dir.path().join("disk.raw");
        let d = disk.to_str().unwrap();
        client("qemu-img", &["create", "-q", "-f", "raw", d, "64M"]);
        let s = Served::start(STRATA_NBD, &sock, &["-t", "-f", "raw", d]);
        let uri = s.uri("");
        // The export keeps its size; a qcow2 image goes inside it.
        let made = run(tool, &["create", "-f", "qcow2", &uri, "32M"]);
        assert_eq!(made.1, 0, "{made:?}");
        let check = client("qemu-img", &["check", "-f", "qcow2", &uri]);
        assert!(check.contains("No errors were found"), "{tool}: {check}");
        let grown = run(
            tool,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                &uri,
                "128M",
            ],
        );
        assert_eq!(grown.1, 1, "{grown:?}");
        assert!(
            grown
                .0
                .ends_with("Could not resize image: Cannot grow NBD nodes\n"),
            "{grown:?}"
        );
        let resized = run(tool, &["resize", "-f", "raw", &uri, "128M"]);
        assert_eq!(resized, ("qemu-img: Cannot resize NBD nodes\n".into(), 1));
    }
    let io = |prog: &str, cmd: &str| {
        let disk = dir.path().join("disk.raw");
        let s = Served::start(
            STRATA_NBD,
            &sock,
            &["-t", "-f", "raw", disk.to_str().unwrap()],
        );
        run(prog, &["-f", "raw", "-c", cmd, &s.uri("")])
    };
    for cmd in ["truncate 128M", "truncate 32M", "truncate 64M"] {
        assert_eq!(io(STRATA_IO, cmd), io("qemu-io", cmd), "{cmd}");
    }
}
