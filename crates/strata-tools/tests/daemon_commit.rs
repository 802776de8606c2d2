//! The commit job over QMP: the same conversations with strata-daemon and
//! qemu-storage-daemon give the same answers and events, and leave the
//! same images (data, backing file names, maps).

mod daemon_support;
mod jobs_support;
use daemon_support::*;
use jobs_support::*;

/// Where a commit of `cN-mid` waits at speed 1: past [0, 1M), which only
/// the base holds, and the first chunk it copied.
const FIRST_COPY: &str = r#""current-progress": 1572864"#;

#[test]
fn refused_commits_as_qemu_storage_daemon_refuses_them() {
    let steps = [
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "nosuch"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-mid"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top": "c1-mid.qcow2", "top-node": "c1-mid"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top-node": "nosuch"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top-node": "c2-mid"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top": "nosuch.qcow2"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top-node": "c1-mid", "base": "nosuch.qcow2"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top-node": "c1-mid", "base-node": "c1-base", "base": "c1-base.qcow2"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top-node": "c1-mid", "base-node": "c2-base"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top-node": "c1-base"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "backing-file": "x"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"device": "c1-top", "top-node": "c1-mid"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top-node": "c1-mid", "on-error": "bogus"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top-node": "c1-mid", "filter-node-name": "c1-base"}}"#,
            0,
        ),
        // A negative speed is refused once the job exists: it is created
        // and gone again, and the graph is as it was.
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k", "device": "c1-top", "top-node": "c1-mid", "speed": -1}}"#,
            0,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
    ];
    same_jobs(2, &steps);
}

#[test]
fn an_intermediate_commit_runs_pauses_and_completes_as_in_qemu() {
    let steps = [
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k1", "device": "c1-top", "top-node": "c1-mid", "speed": 1}}"#,
            0,
        ),
        S::Until(FIRST_COPY),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        // The images it works on are busy for other jobs.
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k2", "device": "c1-top", "top-node": "c1-mid"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "k2", "device": "c1-top"}}"#,
            0,
        ),
        S::Ask(r#"{"execute": "job-pause", "arguments": {"id": "k1"}}"#, 0),
        S::Ask(r#"{"execute": "job-resume", "arguments": {"id": "k1"}}"#, 0),
        S::Ask(
            r#"{"execute": "block-job-complete", "arguments": {"device": "k1"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-set-speed", "arguments": {"device": "k1", "speed": 0}}"#,
            5,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
        // With the name the overlay is to store for its new backing file.
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k3", "device": "c2-top", "top-node": "c2-mid", "base-node": "c2-base", "backing-file": "c2-base.qcow2"}}"#,
            5,
        ),
        // Kept pending, then cancelled: the chain is as it was.
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k4", "device": "c3-top", "top-node": "c3-mid", "auto-finalize": false}}"#,
            3,
        ),
        S::Ask(r#"{"execute": "job-cancel", "arguments": {"id": "k4"}}"#, 0),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
    ];
    same_jobs(3, &steps);
}

/// A disk opened in one go has read-only backing files: the job makes the
/// base writable while it runs, and read-only again after.
#[test]
fn a_commit_into_a_read_only_base_as_in_qemu() {
    let steps = [
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k1", "device": "c1-top", "top-node": "c1-mid", "speed": 1}}"#,
            0,
        ),
        S::Until(FIRST_COPY),
        S::Ask(
            r#"{"execute": "block-job-set-speed", "arguments": {"device": "k1", "speed": 0}}"#,
            5,
        ),
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k2", "device": "c2-top", "top-node": "c2-mid", "base-node": "c2-base", "backing-file": "c2-base.qcow2"}}"#,
            5,
        ),
        // Streaming into a read-only image makes it writable for a while too.
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s3", "device": "c3-mid"}}"#,
            5,
        ),
    ];
    same_jobs_opened(3, disks, |_| {}, &steps);
}

/// The overlay's new backing file name cannot be written (blkdebug fails
/// every write to its header): the job fails with the error, and the graph
/// and every image are as before. QEMU 10.0.2 changes its graph before it
/// writes the name, and then crashes in the job's abort (a segmentation
/// fault, seen here); Strata writes first and leaves the graph alone, so
/// this is checked on Strata's side only.
#[test]
fn a_backing_file_name_that_cannot_be_written_fails_the_job_and_loses_nothing() {
    let Some((s, _)) = sides() else {
        return;
    };
    chains(&s, 1);
    let rule = "[inject-error]\nevent = \"pwritev\"\nerrno = \"5\"\nsector = \"0\"\n";
    std::fs::write(s.dir.path().join("c1-top.cfg"), rule).unwrap();
    let steps = [
        S::Ask(
            r#"{"execute": "block-commit", "arguments": {"job-id": "k1", "device": "c1-top", "top-node": "c1-mid", "backing-file": "c1-base.qcow2"}}"#,
            5,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
        S::Ask(
            r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#,
            0,
        ),
    ];
    let said = run(&s, nodes, 1, &steps).join("\n");
    assert!(said.contains(r#""error": "Input/output error""#), "{said}");
    assert!(
        said.contains("Could not update backing file link"),
        "{said}"
    );
    assert!(said.contains(r#"{"return": []}"#), "{said}");
    // The overlay still reads through the old image.
    let top = said
        .split("\"node-name\": \"c1-top\"")
        .nth(1)
        .expect("c1-top is listed");
    let backing = top
        .split("\"backing_file\": \"")
        .nth(1)
        .and_then(|b| b.split("\", \"").next())
        .expect("c1-top has a backing file");
    assert!(backing.contains("c1-mid.qcow2"), "{backing}");
    for (img, want) in [
        ("c1-top.qcow2", "c1-mid.qcow2"),
        ("c1-mid.qcow2", "c1-base.qcow2"),
    ] {
        let (info, _) = s.qemu_img(&["info", "-U", img]);
        assert!(info.contains(&format!("backing file: {want}\n")), "{info}");
        assert_eq!(s.qemu_img(&["check", img]).1, 0, "{img}");
    }
    // Every layer still reads as the chain did: the base now holds the
    // middle image's data too, which the middle image still covers.
    let top = s.path("c1-top.qcow2");
    for (pattern, at) in [("0x11", "0"), ("0x22", "1M"), ("0x33", "2M")] {
        let out = std::process::Command::new("qemu-io")
            .args([
                "-r",
                "-f",
                "qcow2",
                "-c",
                &format!("read -P {pattern} {at} 512k"),
                &top,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("Pattern verification failed"), "{text}");
    }
}
