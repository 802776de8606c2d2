//! `blockdev-create` and `x-blockdev-amend` over QMP: the same
//! conversations with strata-daemon and qemu-storage-daemon give the same
//! answers and events (a `create` or `amend` job, dismissed by its user),
//! and make the same images; an amended image opens with its new key.

mod daemon_support;
mod jobs_support;
use daemon_support::*;
use jobs_support::*;

/// Creates, then dismisses; the job's three events follow the answer.
fn made(cmd: &'static str) -> S<'static> {
    S::Ask(cmd, 3)
}

/// A create that fails: `aborting`, then `concluded`.
fn failed(cmd: &'static str) -> S<'static> {
    S::Ask(cmd, 2)
}

fn a(s: &'static str) -> S<'static> {
    S::Ask(s, 0)
}

/// The chain's nodes and a secret for an encrypted image.
fn with_secret(side: &Side, n: usize) -> Vec<String> {
    let mut v = nodes(side, n);
    v.push("--object".into());
    v.push("secret,id=sec0,data=123456".into());
    v
}

#[test]
fn images_made_over_qmp_as_qemu_makes_them() {
    let steps = [
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c1", "options": {"driver": "file", "filename": "a.qcow2", "size": 0}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "c1"}}"#),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", "filename": "a.qcow2"}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c2", "options": {"driver": "qcow2", "file": "f", "size": 67108864, "lazy-refcounts": true, "backing-file": "c1-base.qcow2", "backing-fmt": "qcow2"}}}"#,
        ),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "c2"}}"#),
        // A v2 image on a file defined in place, with small clusters.
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c3", "options": {"driver": "file", "filename": "b.qcow2", "size": 0}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c4", "options": {"driver": "qcow2", "file": {"driver": "file", "filename": "b.qcow2"}, "size": 1048576, "version": "v2", "cluster-size": 4096}}}"#,
        ),
        // An external data file, raw.
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c5", "options": {"driver": "file", "filename": "c.qcow2", "size": 0}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c6", "options": {"driver": "file", "filename": "c.data", "size": 0}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "fc", "filename": "c.qcow2"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "fd", "filename": "c.data"}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c7", "options": {"driver": "qcow2", "file": "fc", "data-file": "fd", "data-file-raw": true, "size": 1048576}}}"#,
        ),
        // Encrypted with LUKS (its header is random: not compared).
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c8", "options": {"driver": "file", "filename": "d.qcow2", "size": 0}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c9", "options": {"driver": "qcow2", "file": {"driver": "file", "filename": "d.qcow2"}, "size": 1048576, "encrypt": {"format": "luks", "key-secret": "sec0", "iter-time": 10}}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        // Refused before a job exists.
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "x", "options": {"driver": "raw", "file": "f", "size": 1048576}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "x", "options": {"driver": "null-co"}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c1", "options": {"driver": "qcow2", "file": "f"}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c3", "options": {"driver": "qcow2", "file": "f", "size": 1048576}}}"#,
        ),
        // Jobs that fail: no such node, a bad size, a node in use.
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e1", "options": {"driver": "qcow2", "file": "nope", "size": 1048576}}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e2", "options": {"driver": "qcow2", "file": "f", "size": 1000}}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e3", "options": {"driver": "qcow2", "file": "f", "size": 1048576, "version": "v2", "lazy-refcounts": true}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q", "file": "f"}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e4", "options": {"driver": "qcow2", "file": "f", "size": 1048576}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#),
    ];
    same_jobs_and_images(
        1,
        with_secret,
        |_| {},
        &steps,
        &["a.qcow2", "b.qcow2", "c.qcow2"],
    );
}

/// An encrypted image `enc.qcow2` (LUKS, key `sec0`) beside the chain.
fn encrypted(side: &Side) {
    let (out, code) = side.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "enc.qcow2",
        "1M",
    ]);
    assert_eq!(code, 0, "{out}");
}

/// The chain, the encrypted image as node `e` with two secrets, and a
/// bare file node.
fn with_encrypted(side: &Side, n: usize) -> Vec<String> {
    let mut v = with_secret(side, n);
    for a in [
        "--object",
        "secret,id=sec1,data=abcdef",
        "--blockdev",
        "driver=qcow2,node-name=e,encrypt.format=luks,encrypt.key-secret=sec0,file.driver=file,file.filename=$DIR/enc.qcow2",
        "--blockdev",
        "driver=file,node-name=fx,filename=$DIR/c1-top.qcow2,locking=off",
    ] {
        v.push(a.into());
    }
    v
}

const ADD_KEY: &str = r#"{"execute": "x-blockdev-amend", "arguments": {"job-id": "a1", "node-name": "e", "options": {"driver": "qcow2", "encrypt": {"format": "luks", "state": "active", "new-secret": "sec1", "iter-time": 10}}}}"#;
const DROP_OLD_KEY: &str = r#"{"execute": "x-blockdev-amend", "arguments": {"job-id": "a2", "node-name": "e", "options": {"driver": "qcow2", "encrypt": {"format": "luks", "state": "inactive", "old-secret": "sec0"}}}}"#;

#[test]
fn key_slots_amended_over_qmp_as_qemu_amends_them() {
    let steps = [
        made(ADD_KEY),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-dismiss", "arguments": {"id": "a1"}}"#),
        // Refused before a job exists.
        a(
            r#"{"execute": "x-blockdev-amend", "arguments": {"job-id": "x", "node-name": "nope", "options": {"driver": "qcow2"}}}"#,
        ),
        a(
            r#"{"execute": "x-blockdev-amend", "arguments": {"job-id": "x", "node-name": "e", "options": {"driver": "luks", "state": "active"}}}"#,
        ),
        a(
            r#"{"execute": "x-blockdev-amend", "arguments": {"job-id": "x", "node-name": "fx", "options": {"driver": "file"}}}"#,
        ),
        // A job that fails at once, before its answer: nothing to amend on
        // a clear image.
        a(
            r#"{"execute": "x-blockdev-amend", "arguments": {"job-id": "a3", "node-name": "c1-top", "options": {"driver": "qcow2", "encrypt": {"format": "luks", "state": "active", "new-secret": "sec1"}}}}"#,
        ),
        made(DROP_OLD_KEY),
        a(r#"{"execute": "query-jobs"}"#),
    ];
    same_jobs_and_images(1, with_encrypted, encrypted, &steps, &[]);
}

/// After the amends, the image opens with the new key only.
#[test]
fn an_amended_image_opens_with_its_new_key() {
    let Some((s, _)) = sides() else {
        return;
    };
    chains(&s, 1);
    encrypted(&s);
    run(&s, with_encrypted, 1, &[made(ADD_KEY), made(DROP_OLD_KEY)]);
    let io = |secret: &str| {
        std::process::Command::new("qemu-io")
            .args([
                "--object",
                secret,
                "--image-opts",
                "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=k",
                "-c",
                "read 0 4k",
            ])
            .current_dir(s.dir.path())
            .output()
            .unwrap()
    };
    let new = io("secret,id=k,data=abcdef");
    assert!(new.status.success(), "{new:?}");
    let old = io("secret,id=k,data=123456");
    assert!(!old.status.success(), "the old key still opens it: {old:?}");
    let (out, code) = s.qemu_img(&[
        "check",
        "--object",
        "secret,id=k,data=abcdef",
        "--image-opts",
        "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=k",
    ]);
    assert_eq!(code, 0, "{out}");
}

/// `luks` images over QMP: in a file, with a detached header (its payload
/// node only grown), a header alone, with every cipher option; and the
/// creates QEMU refuses. The headers are random, so the images are
/// compared by size and payload offset, and read back by QEMU.
#[test]
fn luks_images_made_over_qmp_as_qemu_makes_them() {
    let Some((s, q)) = sides() else {
        return;
    };
    chains(&s, 1);
    chains(&q, 1);
    let file = |id: &'static str, name: &'static str| -> S<'static> {
        made(Box::leak(
            format!(
                r#"{{"execute": "blockdev-create", "arguments": {{"job-id": "{id}", "options": {{"driver": "file", "filename": "{name}", "size": 0}}}}}}"#
            )
            .into_boxed_str(),
        ))
    };
    let steps = [
        file("f1", "l.luks"),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c1", "options": {"driver": "luks", "file": {"driver": "file", "filename": "l.luks"}, "size": 1048576, "key-secret": "sec0", "iter-time": 10}}}"#,
        ),
        file("f2", "h.luks"),
        file("f3", "p.raw"),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c2", "options": {"driver": "luks", "header": {"driver": "file", "filename": "h.luks"}, "file": {"driver": "file", "filename": "p.raw"}, "size": 2097152, "preallocation": "falloc", "key-secret": "sec0", "iter-time": 10}}}"#,
        ),
        file("f4", "h2.luks"),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c3", "options": {"driver": "luks", "header": {"driver": "file", "filename": "h2.luks"}, "size": 1048576, "key-secret": "sec0", "iter-time": 10}}}"#,
        ),
        file("f5", "o.luks"),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c4", "options": {"driver": "luks", "file": {"driver": "file", "filename": "o.luks"}, "size": 1048576, "preallocation": "full", "key-secret": "sec0", "iter-time": 10, "cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "sha256", "hash-alg": "sha1"}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        // Refused by the schema.
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "x", "options": {"driver": "luks", "file": "nope", "size": 1048576, "cipher-alg": "rot13"}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "x", "options": {"driver": "luks", "file": "nope"}}}"#,
        ),
        // Jobs that fail before their answer, opening nothing: nowhere to
        // write, preallocation without a payload.
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e1", "options": {"driver": "luks", "size": 1048576, "key-secret": "sec0"}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e2", "options": {"driver": "luks", "header": "nope", "size": 1048576, "preallocation": "falloc", "key-secret": "sec0"}}}"#,
        ),
        // Jobs that fail later: no secret, a read-only node.
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e3", "options": {"driver": "luks", "file": {"driver": "file", "filename": "o.luks"}, "size": 1048576}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "fl", "filename": "l.luks", "read-only": true}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e4", "options": {"driver": "luks", "file": "fl", "size": 1048576, "key-secret": "sec0", "iter-time": 10}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
    ];
    assert_same_lines(
        &run(&s, with_secret, 1, &steps),
        &run(&q, with_secret, 1, &steps),
    );
    let len = |side: &Side, f: &str| std::fs::metadata(side.dir.path().join(f)).unwrap().len();
    let offset = |side: &Side, spec: &str| {
        let (out, code) = side.qemu_img(&[
            "info",
            "--object",
            "secret,id=k,data=123456",
            "--image-opts",
            spec,
        ]);
        assert_eq!(code, 0, "{out}");
        out.lines()
            .filter(|l| l.contains("virtual size") || l.contains("payload offset"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let specs = [
        "driver=luks,key-secret=k,file.filename=l.luks",
        "driver=luks,key-secret=k,file.filename=p.raw,header.filename=h.luks",
        "driver=luks,key-secret=k,file.filename=o.luks",
        // A header made alone, over the other header's payload.
        "driver=luks,key-secret=k,file.filename=p.raw,header.filename=h2.luks",
    ];
    for f in ["l.luks", "h.luks", "p.raw", "h2.luks", "o.luks"] {
        assert_eq!(len(&s, f), len(&q, f), "{f}");
    }
    for spec in specs {
        assert_eq!(offset(&s, spec), offset(&q, spec), "{spec}");
        // What Strata made, QEMU writes and reads back.
        let io = std::process::Command::new("qemu-io")
            .args([
                "--object",
                "secret,id=k,data=123456",
                "--image-opts",
                spec,
                "-c",
                "write -P 0x5a 512 4096",
                "-c",
                "read -P 0x5a 512 4096",
            ])
            .current_dir(s.dir.path())
            .output()
            .unwrap();
        assert!(io.status.success(), "{spec}: {io:?}");
    }
}

/// `vdi` images over QMP: dynamic, static (`preallocation: metadata`) at a
/// size that is no multiple of a block, the creates QEMU refuses, then the
/// image opened as a node. The images are QEMU's byte for byte but for
/// their two random UUIDs, and each reads back what QEMU wrote into it.
#[test]
fn vdi_images_made_over_qmp_as_qemu_makes_them() {
    let Some((s, q)) = sides() else {
        return;
    };
    chains(&s, 1);
    chains(&q, 1);
    let steps = [
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "f1", "options": {"driver": "file", "filename": "d.vdi", "size": 0}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c1", "options": {"driver": "vdi", "file": {"driver": "file", "filename": "d.vdi"}, "size": 5242880}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "f2", "options": {"driver": "file", "filename": "s.vdi", "size": 0}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c2", "options": {"driver": "vdi", "file": {"driver": "file", "filename": "s.vdi"}, "size": 3146728, "preallocation": "metadata"}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        // Refused before the answer: a mode VDI lacks; after it: a size
        // past its map (QEMU's error path there yields first).
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e1", "options": {"driver": "vdi", "file": "nope", "size": 1048576, "preallocation": "full"}}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e2", "options": {"driver": "vdi", "file": "nope", "size": 576460752303423488}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "fr", "filename": "d.vdi", "read-only": true}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e3", "options": {"driver": "vdi", "file": "fr", "size": 1048576}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "vdi", "node-name": "v", "file": {"driver": "file", "filename": "s.vdi"}}}"#,
        ),
        a(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "v"}}"#),
    ];
    assert_same_lines(&run(&s, nodes, 1, &steps), &run(&q, nodes, 1, &steps));
    for f in ["d.vdi", "s.vdi"] {
        // The image and last-snapshot UUIDs (0x188..0x1a8) are random.
        alike_and_writable(&s, &q, f, "vdi", |i, _| (0x188..0x1a8).contains(&i));
        let (out, code) = s.qemu_img(&["check", f]);
        assert_eq!(code, 0, "{f}: {out}");
    }
}

/// Checks that `f` made by Strata is QEMU's but where `random(offset,
/// length)` allows, and that qemu-io writes and reads it back as `fmt`.
fn alike_and_writable(
    s: &Side,
    q: &Side,
    f: &str,
    fmt: &str,
    random: impl Fn(usize, usize) -> bool,
) {
    let (a, b) = (
        std::fs::read(s.dir.path().join(f)).unwrap(),
        std::fs::read(q.dir.path().join(f)).unwrap(),
    );
    assert_eq!(a.len(), b.len(), "{f}");
    let differ: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert!(
        differ.iter().all(|&i| random(i, a.len())),
        "{f}: {differ:?}"
    );
    let io = std::process::Command::new("qemu-io")
        .args([
            "-f",
            fmt,
            "-c",
            "write -P 0x5a 1000k 100k",
            "-c",
            "read -P 0x5a 1000k 100k",
        ])
        .arg(s.dir.path().join(f))
        .output()
        .unwrap();
    assert!(io.status.success(), "{f}: {io:?}");
}

/// `vpc` images over QMP: dynamic at a size with a geometry of its own,
/// fixed at one forced past its geometry, the creates QEMU refuses, then
/// the image opened as a node. The images are QEMU's byte for byte but for
/// the footers' time stamp, checksum and UUID, and each reads back what
/// QEMU wrote into it.
#[test]
fn vpc_images_made_over_qmp_as_qemu_makes_them() {
    let Some((s, q)) = sides() else {
        return;
    };
    chains(&s, 1);
    chains(&q, 1);
    let steps = [
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "f1", "options": {"driver": "file", "filename": "d.vpc", "size": 0}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c1", "options": {"driver": "vpc", "file": {"driver": "file", "filename": "d.vpc"}, "size": 10514432}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "f2", "options": {"driver": "file", "filename": "f.vpc", "size": 0}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c2", "options": {"driver": "vpc", "file": {"driver": "file", "filename": "f.vpc"}, "size": 5242880, "subformat": "fixed", "force-size": true}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        // QAPI refuses an unknown subformat; the job, a size without a
        // geometry of its own, one past 2040 GiB, a read-only file.
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e1", "options": {"driver": "vpc", "file": "nope", "size": 1048576, "subformat": "big"}}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e2", "options": {"driver": "vpc", "file": {"driver": "file", "filename": "d.vpc"}, "size": 10485760}}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e3", "options": {"driver": "vpc", "file": {"driver": "file", "filename": "d.vpc"}, "size": 3298534883328}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "fr", "filename": "d.vpc", "read-only": true}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e4", "options": {"driver": "vpc", "file": "fr", "size": 1048576}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "vpc", "node-name": "v", "file": {"driver": "file", "filename": "d.vpc"}}}"#,
        ),
        a(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "v"}}"#),
    ];
    assert_same_lines(&run(&s, nodes, 1, &steps), &run(&q, nodes, 1, &steps));
    for f in ["d.vpc", "f.vpc"] {
        // The footers' time stamp, checksum and UUID differ in every image.
        alike_and_writable(&s, &q, f, "vpc", |i, len| {
            let random = (24..28).contains(&(i % 512)) || (64..84).contains(&(i % 512));
            random && (i < 512 || i >= len - 512)
        });
    }
}

/// `qcow` images over QMP: plain, with a backing file's name, encrypted;
/// the creates QEMU refuses; then the images opened as nodes. The images
/// are QEMU's byte for byte (qcow stores nothing random), and the plain
/// one reads back what QEMU wrote into it.
#[test]
fn qcow_images_made_over_qmp_as_qemu_makes_them() {
    let Some((s, q)) = sides() else {
        return;
    };
    chains(&s, 1);
    chains(&q, 1);
    let steps = [
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "f1", "options": {"driver": "file", "filename": "a.qcow", "size": 0}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c1", "options": {"driver": "qcow", "file": {"driver": "file", "filename": "a.qcow"}, "size": 10485760}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "f2", "options": {"driver": "file", "filename": "b.qcow", "size": 0}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c2", "options": {"driver": "qcow", "file": {"driver": "file", "filename": "b.qcow"}, "size": 1048577, "backing-file": "base.img"}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "f3", "options": {"driver": "file", "filename": "e.qcow", "size": 0}}}"#,
        ),
        made(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "c3", "options": {"driver": "qcow", "file": {"driver": "file", "filename": "e.qcow"}, "size": 1048576, "encrypt": {"format": "qcow", "key-secret": "sec0"}}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        // QAPI refuses an unknown encryption format; the job, before the
        // answer, a zero size and LUKS; after it, a read-only file and AES
        // without its secret.
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e0", "options": {"driver": "qcow", "file": "nope", "size": 1048576, "encrypt": {"format": "aes"}}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e1", "options": {"driver": "qcow", "file": {"driver": "file", "filename": "a.qcow"}, "size": 0}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e2", "options": {"driver": "qcow", "file": {"driver": "file", "filename": "a.qcow"}, "size": 1048576, "encrypt": {"format": "luks", "key-secret": "sec0"}}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "fr", "filename": "a.qcow", "read-only": true}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e3", "options": {"driver": "qcow", "file": "fr", "size": 1048576}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "fw", "filename": "e.qcow"}}"#,
        ),
        failed(
            r#"{"execute": "blockdev-create", "arguments": {"job-id": "e4", "options": {"driver": "qcow", "file": "fw", "size": 1048576, "encrypt": {"format": "qcow"}}}}"#,
        ),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "fw"}}"#),
        a(r#"{"execute": "query-jobs"}"#),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow", "node-name": "v", "file": {"driver": "file", "filename": "a.qcow"}}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow", "node-name": "w", "file": {"driver": "file", "filename": "e.qcow"}, "encrypt": {"format": "aes", "key-secret": "sec0"}}}"#,
        ),
        a(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "v"}}"#),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "w"}}"#),
    ];
    assert_same_lines(
        &run(&s, with_secret, 1, &steps),
        &run(&q, with_secret, 1, &steps),
    );
    alike_and_writable(&s, &q, "a.qcow", "qcow", |_, _| false);
    for f in ["b.qcow", "e.qcow"] {
        let (a, b) = (
            std::fs::read(s.dir.path().join(f)).unwrap(),
            std::fs::read(q.dir.path().join(f)).unwrap(),
        );
        assert_eq!(a, b, "{f}");
    }
}
