//! `blockdev-reopen` over QMP: the same conversations with strata-daemon
//! and qemu-storage-daemon give the same answers and leave the same graph
//! (what the daemon shows of every node): read-only and back, a new
//! backing file or none, zero detection and discards, and every refusal,
//! each in QEMU's order; a list of nodes changes all together or not at all.

mod daemon_support;
mod jobs_support;
use jobs_support::*;

fn a(s: &'static str) -> S<'static> {
    S::Ask(s, 0)
}

const NODES: &str = r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#;

/// Each image of one chain a node of its own, its file named relative to
/// the daemon's folder so the steps can give the same options again.
fn named_nodes(_side: &daemon_support::Side, _n: usize) -> Vec<String> {
    let mut v = Vec::new();
    for (l, b) in [("base", None), ("mid", Some("base")), ("top", Some("mid"))] {
        let backing = b.map_or(String::new(), |b| format!(",backing=c1-{b}"));
        v.push("--blockdev".to_string());
        v.push(format!(
            "driver=qcow2,node-name=c1-{l},file.driver=file,file.filename=c1-{l}.qcow2{backing}"
        ));
    }
    v
}

#[test]
fn nodes_reopened_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}"#,
        ),
        // Refusals, in the order QEMU checks.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "file": "x"}]}}"#,
        ),
        a(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2"}]}}"#),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "nosuch", "file": "x"}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "c1-top", "file": "x"}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "file": {"driver": "file", "filename": "c1-mid.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "file": {"driver": "file", "filename": "c1-top.qcow2", "locking": "off"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "file": {"driver": "file", "filename": "c1-top.qcow2", "node-name": "f"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "nosuch", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-base", "backing": "c1-top", "file": {"driver": "file", "filename": "c1-base.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "detect-zeroes": "unmap", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "discard": "sometimes", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        // Read-only, with its file, and back.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "read-only": true, "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "c1-top", "writable": true}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "c1-top", "writable": true}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "read-only": true, "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        // Zero detection and discards; runtime options of the format.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "detect-zeroes": "unmap", "discard": "unmap", "lazy-refcounts": true, "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(NODES),
        // A list fails as a whole: the first node stays read-write.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-mid", "backing": "c1-base", "read-only": true, "file": {"driver": "file", "filename": "c1-mid.qcow2"}}, {"driver": "qcow2", "node-name": "c1-top", "backing": "nosuch", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(NODES),
        // A new backing file, then none; the base stays for its own node.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-base", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": null, "file": {"driver": "file", "filename": "c1-top.qcow2"}}, {"driver": "qcow2", "node-name": "c1-mid", "backing": "c1-base", "read-only": true, "file": {"driver": "file", "filename": "c1-mid.qcow2"}}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-base", "read-only": true, "file": {"driver": "file", "filename": "c1-base.qcow2"}}]}}"#,
        ),
        a(r#"{"execute": "blockdev-del", "arguments": {"node-name": "c1-base"}}"#),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(NODES),
    ];
    same_jobs_and_images(1, named_nodes, |_| {}, &steps, &[]);
}

/// A chain opened in one go, as a guest's disk is: the backing files are
/// the top's own children, read-only, reopened through the top's options
/// or by their own names, and closed when the top lets go of them.
#[test]
fn a_chain_opened_in_one_go_reopened_as_in_qemu() {
    let steps = [
        // The middle image read-write by its own name, and back.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-mid", "read-only": false, "backing": "c1-base", "file": {"driver": "file", "filename": "$DIR/c1-mid.qcow2"}}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-mid", "read-only": true, "backing": "c1-base", "file": {"driver": "file", "filename": "$DIR/c1-mid.qcow2"}}]}}"#,
        ),
        // Through the top's options: read-write, then named as it is.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "file": {"driver": "file", "filename": "$DIR/c1-top.qcow2"}, "backing": {"driver": "qcow2", "node-name": "c1-mid", "read-only": false, "file": {"driver": "file", "filename": "$DIR/c1-mid.qcow2"}, "backing": "c1-base"}}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "read-only": true, "file": {"driver": "file", "filename": "$DIR/c1-top.qcow2"}, "backing": "c1-mid"}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "file": {"driver": "file", "filename": "$DIR/c1-top.qcow2"}, "backing": {"driver": "qcow2", "node-name": "c1-mid", "file": {"driver": "file", "filename": "$DIR/c1-base.qcow2"}, "backing": "c1-base"}}]}}"#,
        ),
        // Without its backing file, the chain below closes.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "file": {"driver": "file", "filename": "$DIR/c1-top.qcow2"}, "backing": null}]}}"#,
        ),
        a(NODES),
    ];
    same_jobs_and_images(1, disks, |_| {}, &steps, &[]);
}

/// While a commit or a stream works through a chain, the links it works
/// through are frozen: a reopen that would move them is refused, with
/// QEMU's words, and so is one that would replace the job's own filter.
/// Once the job is gone, the same reopen goes through.
#[test]
fn links_a_job_works_through_stay_until_it_ends() {
    let no_jobs = S::Until(r#""return": []"#);
    let steps = [
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k1", "device": "c1-top", "top-node": "c1-mid", "speed": 1}}"#,
            0,
        ),
        S::Until(r#""current-progress": 1572864"#),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-mid", "backing": null, "file": {"driver": "file", "filename": "c1-mid.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-base", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(r#"{"execute": "job-cancel", "arguments": {"id": "k1"}}"#),
        no_jobs,
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s1", "device": "c1-top", "speed": 1}}"#,
            0,
        ),
        S::Until(FIRST_CHUNK),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-mid", "backing": null, "file": {"driver": "file", "filename": "c1-mid.qcow2"}}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-base", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(r#"{"execute": "job-cancel", "arguments": {"id": "s1"}}"#),
        S::Until(r#""return": []"#),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-mid", "backing": null, "file": {"driver": "file", "filename": "c1-mid.qcow2"}}]}}"#,
        ),
        a(NODES),
    ];
    same_jobs_and_images(1, named_nodes, |_| {}, &steps, &[]);
}

/// Drivers that QEMU cannot reopen are refused by name: quorum, and the
/// copy-on-read filter.
#[test]
fn drivers_without_reopen_refused_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "quorum", "node-name": "q", "vote-threshold": 1, "children": [{"driver": "file", "filename": "q1.raw"}, {"driver": "file", "filename": "q2.raw"}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "quorum", "node-name": "q", "vote-threshold": 1, "children": [{"driver": "file", "filename": "q1.raw"}, {"driver": "file", "filename": "q2.raw"}], "read-only": true}]}}"#,
        ),
        a(
            r#"{"execute": "blockdev-add", "arguments": {"driver": "copy-on-read", "node-name": "cor", "file": "c1-top"}}"#,
        ),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "copy-on-read", "node-name": "cor", "file": "c1-top"}]}}"#,
        ),
        a(NODES),
    ];
    let setup = |side: &daemon_support::Side| {
        for f in ["q1.raw", "q2.raw"] {
            std::fs::write(side.path(f), vec![0u8; 1 << 20]).unwrap();
        }
    };
    same_jobs_and_images(1, named_nodes, setup, &steps, &[]);
}

/// `cache.direct` switched on and off in place, with the file that
/// inherits it, as QEMU reopens its files with and without O_DIRECT; a
/// file given its own value keeps it.
#[test]
fn cache_direct_switched_as_in_qemu() {
    let steps = [
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "cache": {"direct": true}, "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(NODES),
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "cache": {"direct": true}, "file": {"driver": "file", "filename": "c1-top.qcow2", "cache": {"direct": false}}}]}}"#,
        ),
        a(NODES),
        // Back, with a read-only switch in the same reopen.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-mid", "backing": "c1-base", "read-only": true, "cache": {"direct": true}, "file": {"driver": "file", "filename": "c1-mid.qcow2"}}, {"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "file": {"driver": "file", "filename": "c1-top.qcow2"}}]}}"#,
        ),
        a(NODES),
        // A list that fails leaves O_DIRECT as it was.
        a(
            r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "cache": {"direct": true}, "file": {"driver": "file", "filename": "c1-top.qcow2"}}, {"driver": "qcow2", "node-name": "c1-mid", "backing": "nosuch", "file": {"driver": "file", "filename": "c1-mid.qcow2"}}]}}"#,
        ),
        a(NODES),
    ];
    same_jobs_and_images(1, named_nodes, |_| {}, &steps, &[]);
}

/// The file's open flags, as the kernel shows them for the daemon's
/// descriptor of `name`.
fn open_flags(pid: u32, name: &str) -> u32 {
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let e = e.unwrap();
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.to_string_lossy().ends_with(name) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
        return u32::from_str_radix(flags.trim(), 8).unwrap();
    }
    panic!("{name} is not open");
}

/// While a guest writes through an export, O_DIRECT goes on and off: the
/// kernel's flags follow, unaligned writes are made whole blocks for
/// O_DIRECT, and every write reads back in QEMU afterwards.
#[test]
fn a_guest_writes_on_across_cache_direct_switches() {
    let Some((s, _)) = daemon_support::sides() else {
        return;
    };
    chains(&s, 1);
    let (d, mut c, uri) = start_exported(&s, &named_nodes(&s, 1));
    let pid = d.child.id();
    let reopen = |c: &mut daemon_support::Client, direct: bool| {
        let cmd = format!(
            r#"{{"execute": "blockdev-reopen", "arguments": {{"options": [{{"driver": "qcow2", "node-name": "c1-top", "backing": "c1-mid", "cache": {{"direct": {direct}}}, "file": {{"driver": "file", "filename": "c1-top.qcow2"}}}}]}}}}"#
        );
        let r = answer(c, &cmd);
        assert!(r.contains("return"), "{r}");
    };
    let direct = |pid| open_flags(pid, "c1-top.qcow2") & libc::O_DIRECT as u32 != 0;
    guest_io(&uri, &["write -P 0x11 0 64k"]);
    assert!(!direct(pid));
    reopen(&mut c, true);
    assert!(direct(pid));
    guest_io(
        &uri,
        &[
            "write -P 0x22 1000 3000",
            "write -P 0x33 1m 4k",
            "read -P 0x11 0 1000",
        ],
    );
    reopen(&mut c, false);
    assert!(!direct(pid));
    guest_io(&uri, &["write -P 0x44 70001 77", "read -P 0x22 1000 3000"]);
    answer(&mut c, r#"{"execute": "quit"}"#);
    let (code, err) = d.wait();
    assert_eq!(code, 0, "{err}");
    let io = std::process::Command::new("qemu-io")
        .args([
            "-c",
            "read -P 0x11 0 1000",
            "-c",
            "read -P 0x22 1000 3000",
            "-c",
            "read -P 0x11 4000 61536",
            "-c",
            "read -P 0x44 70001 77",
            "-c",
            "read -P 0x33 1m 4k",
            "c1-top.qcow2",
        ])
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&io.stdout);
    assert!(io.status.success() && !out.contains("fail"), "{out}");
    assert_eq!(s.qemu_img(&["check", "c1-top.qcow2"]).1, 0);
}
