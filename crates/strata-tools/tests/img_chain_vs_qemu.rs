//! strata-img rebase, commit and amend against qemu-img: the same chain,
//! the same command, the same messages, exit codes and resulting images
//! (check, map and info of every image of the chain), and what the guest
//! sees through the top image never changes where the command promises it.

use std::path::Path;
use std::process::Command;

mod img_support;

use img_support::{qemu_img, run, strata_as_qemu_img, QEMU_IMG};

fn qemu_io(dir: &Path, img: &str, cmds: &[&str]) {
    let mut a: Vec<&str> = Vec::new();
    for c in cmds {
        a.extend_from_slice(&["-c", c]);
    }
    a.push(img);
    let out = Command::new("/usr/bin/qemu-io")
        .args(&a)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed"),
        "{cmds:?}: {text}"
    );
}

/// base (8M, data in places) <- mid (data over part of it) <- top (more,
/// a zero write, a partial overwrite), made by QEMU's own tools.
fn make_chain(dir: &Path, top_opts: &[&str]) {
    for f in [
        "base.qcow2",
        "mid.qcow2",
        "top.qcow2",
        "new.qcow2",
        "view.raw",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let q = Path::new(QEMU_IMG);
    assert_eq!(
        run(q, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"], dir).2,
        0
    );
    qemu_io(
        dir,
        "base.qcow2",
        &["write -P 1 0 1M", "write -P 2 3M 512k", "write -P 3 7M 1M"],
    );
    let mid = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
    ];
    assert_eq!(run(q, &mid, dir).2, 0);
    qemu_io(dir, "mid.qcow2", &["write -P 4 512k 1M", "write -z 3M 64k"]);
    let mut top = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
    ];
    top.extend_from_slice(top_opts);
    top.push("top.qcow2");
    assert_eq!(run(q, &top, dir).2, 0);
    qemu_io(
        dir,
        "top.qcow2",
        &["write -P 5 2M 100k", "write -z 7M 128k", "write -P 6 5M 4k"],
    );
    // Another image to rebase onto: the base with a change of its own.
    assert_eq!(
        run(q, &["create", "-q", "-f", "qcow2", "new.qcow2", "8M"], dir).2,
        0
    );
    qemu_io(dir, "new.qcow2", &["write -P 1 0 1M", "write -P 9 6M 1M"]);
}

/// What the guest sees through the top image, as raw bytes.
fn guest_view(dir: &Path) -> Vec<u8> {
    let args = ["convert", "-O", "raw", "top.qcow2", "view.raw"];
    assert_eq!(run(Path::new(QEMU_IMG), &args, dir).2, 0);
    std::fs::read(dir.join("view.raw")).unwrap()
}

/// check, map and info (sizes on disk aside) of each image, by qemu-img.
/// With `any_layout`, where clusters sit in the file is left out: QEMU's
/// commit job copies chunks in parallel and allocates them in whatever
/// order its reads complete.
fn state(dir: &Path, any_layout: bool) -> Vec<String> {
    let q = Path::new(QEMU_IMG);
    let mut log = Vec::new();
    for img in ["base.qcow2", "mid.qcow2", "top.qcow2", "new.qcow2"] {
        let check = run(q, &["check", "--output=json", img], dir);
        let map = run(q, &["map", "--output=json", img], dir);
        if any_layout {
            let mut c: serde_json::Value = serde_json::from_str(&check.0).unwrap();
            let o = c.as_object_mut().unwrap();
            o.remove("fragmented-clusters");
            o.remove("image-end-offset");
            // Without host offsets, runs that only differ in where they
            // sit are one run.
            let m: serde_json::Value = serde_json::from_str(&map.0).unwrap();
            let mut runs: Vec<serde_json::Map<String, serde_json::Value>> = Vec::new();
            for e in m.as_array().unwrap() {
                let mut e = e.as_object().unwrap().clone();
                e.remove("offset");
                let len = e.remove("length").unwrap().as_u64().unwrap();
                let start = e.remove("start").unwrap();
                match runs.last_mut() {
                    Some(r)
                        if r.iter()
                            .all(|(k, v)| k == "len" || k == "start" || e.get(k) == Some(v)) =>
                    {
                        let l = r["len"].as_u64().unwrap();
                        r.insert("len".into(), (l + len).into());
                    }
                    _ => {
                        e.insert("start".into(), start);
                        e.insert("len".into(), len.into());
                        runs.push(e);
                    }
                }
            }
            log.push(format!("{img} check: {c} {:?} {}", check.1, check.2));
            log.push(format!("{img} map: {runs:?} {:?} {}", map.1, map.2));
        } else {
            log.push(format!("{img} check: {check:?}"));
            log.push(format!("{img} map: {map:?}"));
        }
        let info = run(q, &["info", "--output=json", "-U", img], dir).0;
        let mut v: serde_json::Value = serde_json::from_str(&info).unwrap();
        v.as_object_mut().unwrap().remove("actual-size");
        if let Some(f) = v.pointer_mut("/children/0/info") {
            let f = f.as_object_mut().unwrap();
            f.remove("actual-size");
            if any_layout {
                f.remove("virtual-size");
            }
        }
        log.push(format!("{img} info: {v}"));
    }
    log
}

struct Case {
    top_opts: &'static [&'static str],
    args: &'static [&'static str],
    /// The guest's view of the top image is the same before and after.
    keeps_view: bool,
}

const fn case(args: &'static [&'static str], keeps_view: bool) -> Case {
    Case {
        top_opts: &[],
        args,
        keeps_view,
    }
}

fn cases() -> Vec<Case> {
    vec![
        // rebase: safe onto another image, onto one further down the chain,
        // to stand alone, compressed, unsafe, and what it refuses.
        case(
            &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
            true,
        ),
        case(
            &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
            true,
        ),
        case(&["rebase", "-b", "", "top.qcow2"], true),
        case(
            &[
                "rebase",
                "-c",
                "-b",
                "new.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
            true,
        ),
        case(
            &[
                "rebase",
                "-u",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
            false,
        ),
        case(&["rebase", "-u", "-b", "", "top.qcow2"], false),
        case(&["rebase", "-b", "new.qcow2", "top.qcow2"], true),
        case(&["rebase", "top.qcow2"], true),
        case(
            &["rebase", "-b", "nothere.qcow2", "-F", "qcow2", "top.qcow2"],
            true,
        ),
        case(
            &["rebase", "-b", "new.qcow2", "-F", "nofmt", "top.qcow2"],
            true,
        ),
        Case {
            top_opts: &["-o", "cluster_size=4k"],
            args: &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
            keeps_view: true,
        },
        // commit: into the image below (then emptied), -d, -b deeper.
        case(&["commit", "top.qcow2"], true),
        case(&["commit", "-d", "top.qcow2"], true),
        case(&["commit", "-b", "base.qcow2", "top.qcow2"], true),
        case(&["commit", "-b", "nothere.qcow2", "top.qcow2"], true),
        case(&["commit", "base.qcow2"], true),
        Case {
            top_opts: &["-o", "compat=0.10"],
            args: &["commit", "top.qcow2"],
            keeps_view: true,
        },
        // amend: versions both ways (zero clusters expanded), lazy refcounts,
        // size, and what it refuses.
        case(&["amend", "-o", "compat=0.10", "top.qcow2"], true),
        case(&["amend", "-o", "lazy_refcounts=on", "top.qcow2"], true),
        case(
            &["amend", "-o", "compat=0.10,lazy_refcounts=on", "top.qcow2"],
            true,
        ),
        case(&["amend", "-o", "size=16M", "top.qcow2"], false),
        case(&["amend", "-o", "cluster_size=4k", "top.qcow2"], true),
        case(
            &["amend", "-o", "backing_file=base.qcow2", "top.qcow2"],
            true,
        ),
        case(&["amend", "-o", "compat=2.0", "top.qcow2"], true),
        Case {
            top_opts: &["-o", "compat=0.10"],
            args: &["amend", "-o", "compat=1.1", "top.qcow2"],
            keeps_view: true,
        },
    ]
}

#[test]
fn rebase_commit_and_amend_do_what_qemu_img_does() {
    if qemu_img().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    for c in cases() {
        let mut transcripts = Vec::new();
        for prog in [ours.as_path(), Path::new(QEMU_IMG)] {
            make_chain(dir, c.top_opts);
            let before = guest_view(dir);
            let (out, err, code) = run(prog, c.args, dir);
            let mut log = vec![format!("{out:?} {err:?} {code}")];
            log.extend(state(dir, c.args[0] == "commit"));
            if c.keeps_view {
                assert!(
                    guest_view(dir) == before,
                    "{:?} by {}: the guest's view changed",
                    c.args,
                    prog.display()
                );
            }
            transcripts.push(log);
        }
        let (a, b) = (&transcripts[0], &transcripts[1]);
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x, y, "{:?} (top created with {:?})", c.args, c.top_opts);
        }
        assert_eq!(a.len(), b.len());
    }
}
