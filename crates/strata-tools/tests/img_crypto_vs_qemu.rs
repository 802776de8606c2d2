//! Encrypted images against QEMU's tools, both ways: LUKS and legacy AES
//! qcow2 images and standalone luks images made by either tool are read,
//! written and checked by the other, with many requests in flight and
//! writes that only cover parts of sectors and clusters; key slots added
//! by one open with the other; errors and `info` are the same text.

use std::path::Path;
use std::process::Command;

mod img_support;

use img_support::{qemu_img, run, strata_as_qemu_img, QEMU_IMG};

const SECRETS: [&str; 4] = [
    "--object",
    "secret,id=sec0,data=astrochicken",
    "--object",
    "secret,id=sec1,data=furby",
];

/// Which tool does a step.
#[derive(Clone, Copy, Debug)]
enum Tool {
    Qemu,
    Strata,
}

const BOTH: [Tool; 2] = [Tool::Qemu, Tool::Strata];

fn io_prog(t: Tool) -> &'static str {
    match t {
        Tool::Qemu => "/usr/bin/qemu-io",
        Tool::Strata => env!("CARGO_BIN_EXE_strata-io"),
    }
}

/// `qemu-io` (or strata-io) with the secrets and `--image-opts spec`;
/// stdout and the exit code.
fn io(t: Tool, dir: &Path, spec: &str, cmds: &[&str]) -> (String, i32) {
    let mut a: Vec<&str> = SECRETS.to_vec();
    for c in cmds {
        a.extend_from_slice(&["-c", c]);
    }
    a.extend_from_slice(&["--image-opts", spec]);
    let out = Command::new(io_prog(t))
        .args(&a)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        out.status.code().unwrap_or(-1),
    )
}

fn io_ok(t: Tool, dir: &Path, spec: &str, cmds: &[&str]) {
    let (text, code) = io(t, dir, spec, cmds);
    assert!(
        code == 0 && !text.contains("failed") && !text.contains("can't"),
        "{t:?} {spec} {cmds:?}: {text}"
    );
}

/// `qemu-img ARGS` by either tool (strata-img under qemu-img's name).
fn img(t: Tool, dir: &Path, args: &[&str]) -> (String, String, i32) {
    let prog = match t {
        Tool::Qemu => Path::new(QEMU_IMG).to_path_buf(),
        Tool::Strata => strata_as_qemu_img(dir),
    };
    run(&prog, args, dir)
}

/// `SUBCOMMAND --object ... ARGS`: a command line with the secrets.
fn with_secrets<'a>(subcommand: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![subcommand];
    a.extend_from_slice(&SECRETS);
    a.extend_from_slice(args);
    a
}

fn img_ok(t: Tool, dir: &Path, args: &[&str]) -> String {
    let (out, err, code) = img(t, dir, args);
    assert_eq!(code, 0, "{t:?} {args:?}: {out}{err}");
    out
}

/// Writes that touch whole and partial clusters (64 KiB) and sectors'
/// worth of neighbours, many in flight at once.
const WRITES: &[&str] = &[
    "aio_write -P 0x11 0 64k",
    "aio_write -P 0x22 65024 1024",
    "aio_write -P 0x33 200k 8k",
    "aio_write -P 0x44 1M 512",
    "aio_write -P 0x55 2M 192k",
    "aio_write -P 0x66 3M 4k",
    "aio_flush",
];

/// What WRITES leave, read back.
const READS: &[&str] = &[
    "read -P 0x11 0 65024",
    "read -P 0x22 65024 1024",
    "read -P 0x33 200k 8k",
    "read -P 0x44 1M 512",
    "read -P 0x55 2M 192k",
    "read -P 0x66 3M 4k",
];

fn check_clean(dir: &Path, spec: &str) {
    let a = with_secrets("check", &["--image-opts", spec]);
    for t in BOTH {
        let (out, err, code) = img(t, dir, &a);
        assert_eq!(code, 0, "{t:?} check: {out}{err}");
        assert!(out.contains("No errors were found"), "{t:?} check: {out}");
    }
}

/// Creates `name` with `opts` by `maker`, then every writer/reader pair.
fn round_trip(dir: &Path, fmt: &str, name: &str, opts: &str, spec: &str) {
    for maker in BOTH {
        for (writer, reader) in [(Tool::Qemu, Tool::Strata), (Tool::Strata, Tool::Qemu)] {
            let _ = std::fs::remove_file(dir.join(name));
            let a = with_secrets("create", &["-q", "-f", fmt, "-o", opts, name, "4M"]);
            img_ok(maker, dir, &a);
            io_ok(writer, dir, spec, WRITES);
            io_ok(reader, dir, spec, READS);
            // The reader's own writes over the writer's, read by the writer.
            io_ok(
                reader,
                dir,
                spec,
                &["aio_write -P 0x77 64512 1024", "aio_flush"],
            );
            io_ok(
                writer,
                dir,
                spec,
                &["read -P 0x77 64512 1024", "read -P 0x11 0 64512"],
            );
            if fmt == "qcow2" {
                check_clean(dir, spec);
            }
        }
    }
}

#[test]
fn luks_qcow2_images_are_shared_both_ways() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    round_trip(
        dir.path(),
        "qcow2",
        "l.qcow2",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=sec0",
    );
}

#[test]
fn legacy_aes_qcow2_images_are_shared_both_ways() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    round_trip(
        dir.path(),
        "qcow2",
        "a.qcow2",
        "encryption=on,encrypt.key-secret=sec0",
        "driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=sec0",
    );
}

#[test]
fn luks_images_are_shared_both_ways() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    round_trip(
        dir.path(),
        "luks",
        "x.luks",
        "key-secret=sec0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
        "driver=luks,file.filename=x.luks,key-secret=sec0",
    );
}

#[test]
fn serpent_twofish_and_cast5_images_are_shared_both_ways() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Each family in a mode and IV generator of its own; CAST5's 8-byte
    // blocks take CBC, not XTS.
    for cipher in [
        "cipher-alg=serpent-256,cipher-mode=xts,ivgen-alg=plain64",
        "cipher-alg=twofish-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
        "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
        "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=plain64",
    ] {
        round_trip(
            dir.path(),
            "luks",
            "c.luks",
            &format!("key-secret=sec0,iter-time=10,{cipher}"),
            "driver=luks,file.filename=c.luks,key-secret=sec0",
        );
    }
    // Refusals: XTS over an 8-byte block, ciphers QAPI knows and LUKS does
    // not, and a name nobody knows.
    let d = dir.path();
    for alg in ["cast5-128,cipher-mode=xts", "des", "sm4", "foo"] {
        let opts = format!("key-secret=sec0,iter-time=10,cipher-alg={alg}");
        let a = with_secrets("create", &["-q", "-f", "luks", "-o", &opts, "r.luks", "1M"]);
        let q = img(Tool::Qemu, d, &a);
        let _ = std::fs::remove_file(d.join("r.luks"));
        let s = img(Tool::Strata, d, &a);
        let _ = std::fs::remove_file(d.join("r.luks"));
        assert_ne!(q.2, 0, "{alg}");
        assert_eq!(s, q, "{alg}");
    }
}

#[test]
fn info_and_errors_match_qemu() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut a = with_secrets(
        "create",
        &[
            "-q",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cipher_size=512",
            "e.qcow2",
            "1M",
        ],
    );
    // An unknown option: the same refusal.
    let q = img(Tool::Qemu, d, &a);
    let s = img(Tool::Strata, d, &a);
    assert_eq!((q.1, q.2), (s.1, s.2));
    let n = a.len();
    a[n - 3] = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    img_ok(Tool::Qemu, d, &a);
    for args in [
        &["info", "e.qcow2"][..],
        &["info", "--output=json", "e.qcow2"],
        // Without the secret, with a wrong one, with one that does not exist.
        &["check", "e.qcow2"],
        &[
            "check",
            "--object",
            "secret,id=sec1,data=furby",
            "--image-opts",
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec1",
        ],
        &[
            "check",
            "--image-opts",
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=nosuch",
        ],
        &[
            "check",
            "--object",
            "secret,id=sec1,data=furby",
            "--image-opts",
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec1,encrypt.format=aes",
        ],
    ] {
        let q = img(Tool::Qemu, d, args);
        let s = img(Tool::Strata, d, args);
        assert_eq!(q, s, "{args:?}");
    }
}

#[test]
fn key_slots_added_by_one_open_with_the_other() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec0 = "driver=qcow2,file.filename=k.qcow2,encrypt.key-secret=sec0";
    let spec1 = "driver=qcow2,file.filename=k.qcow2,encrypt.key-secret=sec1";
    for (adder, eraser) in [(Tool::Strata, Tool::Qemu), (Tool::Qemu, Tool::Strata)] {
        let _ = std::fs::remove_file(d.join("k.qcow2"));
        let a = with_secrets(
            "create",
            &[
                "-q",
                "-f",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                "k.qcow2",
                "1M",
            ],
        );
        img_ok(adder, d, &a);
        io_ok(Tool::Qemu, d, spec0, &["write -P 0x5c 0 64k"]);
        let add = with_secrets(
            "amend",
            &[
                "--image-opts",
                spec0,
                "-o",
                "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10",
            ],
        );
        img_ok(adder, d, &add);
        // Erasing the only other slot by its password leaves sec1 alone.
        let erase = with_secrets(
            "amend",
            &[
                "--image-opts",
                spec1,
                "-o",
                "encrypt.state=inactive,encrypt.old-secret=sec0",
            ],
        );
        img_ok(eraser, d, &erase);
        for t in BOTH {
            io_ok(t, d, spec1, &["read -P 0x5c 0 64k"]);
            let (text, code) = io(t, d, spec0, &["read 0 512"]);
            assert_ne!(code, 0, "{t:?}");
            assert!(
                text.contains("Invalid password, cannot unlock any keyslot"),
                "{t:?}: {text}"
            );
        }
        // The last slot is refused by both, with the same words.
        let last = with_secrets(
            "amend",
            &[
                "--image-opts",
                spec1,
                "-o",
                "encrypt.state=inactive,encrypt.keyslot=1",
            ],
        );
        let q = img(Tool::Qemu, d, &last);
        let s = img(Tool::Strata, d, &last);
        assert_eq!(q, s);
        check_clean(d, spec1);
    }
}

#[test]
fn convert_into_a_new_encrypted_image_keeps_the_data() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    img_ok(
        Tool::Qemu,
        d,
        &["create", "-q", "-f", "raw", "src.raw", "8M"],
    );
    let raw = "driver=raw,file.filename=src.raw";
    io_ok(
        Tool::Qemu,
        d,
        raw,
        &["write -P 0x42 0 3M", "write -P 0x17 6M 100k"],
    );
    for prealloc in ["off", "metadata"] {
        let _ = std::fs::remove_file(d.join("enc.qcow2"));
        let o = format!(
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,preallocation={prealloc}"
        );
        let a = with_secrets(
            "convert",
            &["-O", "qcow2", "-o", &o, "src.raw", "enc.qcow2"],
        );
        img_ok(Tool::Strata, d, &a);
        let cmp = with_secrets(
            "compare",
            &[
                "--image-opts",
                raw,
                "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=sec0",
            ],
        );
        let out = img_ok(Tool::Qemu, d, &cmp);
        assert!(out.contains("Images are identical"), "{prealloc}: {out}");
    }
}

#[test]
fn detached_luks_headers_are_shared_both_ways() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // qemu-img 10.0.2 refuses its own detached-header option ("Parameter
    // 'detached-header' is unexpected") after printing the same line.
    let a = with_secrets(
        "create",
        &[
            "-f",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=10",
            "-o",
            "detached-header=true",
            "h.luks",
        ],
    );
    let (q_out, _, q_code) = img(Tool::Qemu, d, &a);
    assert_ne!(q_code, 0);
    let s_out = img_ok(Tool::Strata, d, &a);
    assert_eq!(s_out, q_out);
    // The payload is a plain file; the header says it starts at its byte 0.
    std::fs::File::create(d.join("p.raw"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let spec = "driver=luks,key-secret=sec0,file.filename=p.raw,header.filename=h.luks";
    for (writer, reader) in [(Tool::Qemu, Tool::Strata), (Tool::Strata, Tool::Qemu)] {
        io_ok(writer, d, spec, WRITES);
        io_ok(reader, d, spec, READS);
        io_ok(
            reader,
            d,
            spec,
            &["aio_write -P 0x77 64512 1024", "aio_flush"],
        );
        io_ok(writer, d, spec, &["read -P 0x77 64512 1024"]);
    }
    // No header bytes in the payload: its first sector is cipher text.
    let p = std::fs::read(d.join("p.raw")).unwrap();
    assert_ne!(&p[..4], b"LUKS");
    // The same info, and a key slot added by Strata opens with QEMU.
    let info = ["info", "--image-opts", spec];
    assert_eq!(
        img(Tool::Strata, d, &with_secrets(info[0], &info[1..])),
        img(Tool::Qemu, d, &with_secrets(info[0], &info[1..]))
    );
    let amend = with_secrets(
        "amend",
        &[
            "-o",
            "state=active,new-secret=sec1,keyslot=3,iter-time=10",
            "--image-opts",
            spec,
        ],
    );
    img_ok(Tool::Strata, d, &amend);
    let spec1 = "driver=luks,key-secret=sec1,file.filename=p.raw,header.filename=h.luks";
    io_ok(Tool::Qemu, d, spec1, &["read -P 0x77 64512 1024"]);
    // Opened as a whole image, the header is refused with QEMU's text.
    let whole = [
        "info",
        "--image-opts",
        "driver=luks,key-secret=sec0,file.filename=h.luks",
    ];
    let q = img(Tool::Qemu, d, &with_secrets(whole[0], &whole[1..]));
    assert_ne!(q.2, 0);
    assert_eq!(
        img(Tool::Strata, d, &with_secrets(whole[0], &whole[1..])),
        q
    );
}
