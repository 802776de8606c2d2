//! Block jobs over QMP: the same conversations with strata-daemon and
//! qemu-storage-daemon give the same answers and events, in the same order,
//! and leave the same images.

mod daemon_support;
mod jobs_support;
use daemon_support::*;
use jobs_support::*;

#[test]
fn refused_stream_and_job_commands_as_qemu_storage_daemon_refuses_them() {
    let steps = [
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "x", "device": "nosuch"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"device": "c1-top"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "1bad", "device": "c1-top"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "e", "device": "c1-top", "base": "c1-base.qcow2", "base-node": "c1-base"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "e", "device": "c1-top", "base": "nosuch.qcow2"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "e", "device": "c1-mid", "base-node": "c1-top"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "e", "device": "c1-top", "bottom": "nosuch"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "e", "device": "c1-mid", "bottom": "c1-top"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "e", "device": "c1-top", "backing-file": "x"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "e", "device": "c1-top", "on-error": "bogus"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "e", "device": "c1-top", "filter-node-name": "c1-base"}}"#,
            0,
        ),
        // A negative speed is refused once the job exists: it is created
        // and gone again.
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "e", "device": "c1-top", "speed": -1}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "job-pause", "arguments": {"id": "nosuch"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "job-cancel", "arguments": {"id": "nosuch"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "job-dismiss", "arguments": {"id": "nosuch"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-set-speed", "arguments": {"device": "nosuch", "speed": 0}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-pause", "arguments": {"device": "nosuch"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-cancel", "arguments": {"device": "nosuch"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-finalize", "arguments": {"id": "nosuch"}}"#,
            0,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
    ];
    same_jobs(1, &steps);
}

#[test]
fn a_stream_job_pauses_resumes_refuses_and_completes_as_in_qemu() {
    let steps = [
        // speed 1: one chunk, then a wait of hours, so every state holds
        // still while it is looked at.
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s1", "device": "c1-top", "speed": 1}}"#,
            0,
        ),
        S::Until(FIRST_CHUNK),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        // Everything it holds is busy for other jobs; its id is taken.
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s2", "device": "c1-mid"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s2", "device": "c1-top"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s1", "device": "c2-top"}}"#,
            0,
        ),
        S::Ask(r#"{"execute": "job-pause", "arguments": {"id": "s1"}}"#, 0),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        S::Ask(r#"{"execute": "job-pause", "arguments": {"id": "s1"}}"#, 0),
        S::Ask(
            r#"{"execute": "block-job-cancel", "arguments": {"device": "s1"}}"#,
            0,
        ),
        S::Ask(r#"{"execute": "job-resume", "arguments": {"id": "s1"}}"#, 0),
        S::Ask(r#"{"execute": "job-resume", "arguments": {"id": "s1"}}"#, 0),
        S::Ask(
            r#"{"execute": "job-complete", "arguments": {"id": "s1"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-complete", "arguments": {"device": "s1"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-change", "arguments": {"id": "s1", "type": "stream"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-change", "arguments": {"id": "s1", "type": "mirror", "copy-mode": "write-blocking"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-change", "arguments": {"id": "nosuch", "type": "stream"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "job-dismiss", "arguments": {"id": "s1"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "job-finalize", "arguments": {"id": "s1"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-set-speed", "arguments": {"device": "s1", "speed": -1}}"#,
            0,
        ),
        // At full speed it runs to the end: the answer, then its events.
        S::Ask(
            r#"{"execute": "block-job-set-speed", "arguments": {"device": "s1", "speed": 0}}"#,
            5,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
        // Nothing left to stream: the job ends within the command.
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s3", "device": "c1-top"}}"#,
            0,
        ),
        // Nothing to stream and kept pending: it still answers, pending.
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s5", "device": "c1-top", "auto-finalize": false}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "job-finalize", "arguments": {"id": "s5"}}"#,
            0,
        ),
        // Down to a base that stays, with the name to store for it.
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s4", "device": "c2-top", "base-node": "c2-base", "backing-file": "c2-base.qcow2"}}"#,
            5,
        ),
    ];
    same_jobs(2, &steps);
}

#[test]
fn cancel_finalize_and_dismiss_as_in_qemu() {
    let steps = [
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s1", "device": "c1-top", "speed": 1, "filter-node-name": "c1-cor"}}"#,
            0,
        ),
        S::Until(FIRST_CHUNK),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s2", "device": "c1-cor"}}"#,
            0,
        ),
        S::Ask(r#"{"execute": "job-cancel", "arguments": {"id": "s1"}}"#, 0),
        // Paused, then cancelled by force: it runs again to stop.
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s3", "device": "c1-top", "speed": 1, "auto-dismiss": false}}"#,
            0,
        ),
        // The first chunk is in the image already: it copies the second.
        S::Until(r#""current-progress": 1048576"#),
        S::Ask(
            r#"{"execute": "block-job-pause", "arguments": {"device": "s3"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "block-job-cancel", "arguments": {"device": "s3", "force": true}}"#,
            0,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        S::Ask(r#"{"execute": "job-cancel", "arguments": {"id": "s3"}}"#, 0),
        S::Ask(
            r#"{"execute": "block-job-dismiss", "arguments": {"id": "s3"}}"#,
            0,
        ),
        // Kept pending until finalized, kept concluded until dismissed.
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s4", "device": "c2-top", "auto-finalize": false, "auto-dismiss": false}}"#,
            3,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
        S::Ask(
            r#"{"execute": "job-dismiss", "arguments": {"id": "s4"}}"#,
            0,
        ),
        S::Ask(
            r#"{"execute": "job-finalize", "arguments": {"id": "s4"}}"#,
            0,
        ),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        S::Ask(
            r#"{"execute": "job-dismiss", "arguments": {"id": "s4"}}"#,
            0,
        ),
        // Cancelled while pending: the data stays, the backing file too.
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s5", "device": "c3-top", "auto-finalize": false}}"#,
            3,
        ),
        S::Ask(r#"{"execute": "job-cancel", "arguments": {"id": "s5"}}"#, 0),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
    ];
    same_jobs(3, &steps);
}

#[test]
fn a_running_job_is_cancelled_at_quit() {
    let steps = [
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s1", "device": "c1-top", "speed": 1}}"#,
            0,
        ),
        S::Until(FIRST_CHUNK),
    ];
    same_jobs(1, &steps);
}

#[test]
fn a_top_larger_than_its_backing_files_streams_to_its_end() {
    let grow = |side: &Side| {
        assert_eq!(side.qemu_img(&["resize", "-q", "c1-top.qcow2", "8M"]).1, 0);
    };
    let steps = [
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s1", "device": "c1-top"}}"#,
            5,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
    ];
    same_jobs_with(1, grow, &steps);
}

/// Read errors from the base, by blkdebug, under each `on-error` policy:
/// `stop` pauses the job until it is resumed (the failing read is tried
/// again), `report` ends it with the error, `ignore` copies on and ends it
/// with the error, keeping the backing file.
#[test]
fn read_errors_as_each_on_error_policy_says() {
    let inject = |side: &Side| {
        // The base's first data cluster, where its file holds it.
        let (map, _) = side.qemu_img(&["map", "--output=json", "c1-base.qcow2"]);
        let at = map
            .split("\"offset\": ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u64>().ok())
            .expect("a data cluster in the base");
        for (i, once) in [(1, "on"), (2, "off"), (3, "off")] {
            let rule = format!(
                "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n\
                 sector = \"{}\"\nonce = \"{once}\"\n",
                at / 512
            );
            std::fs::write(side.dir.path().join(format!("c{i}-base.cfg")), rule).unwrap();
        }
    };
    let steps = [
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s1", "device": "c1-top", "on-error": "stop"}}"#,
            2,
        ),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        S::Ask(
            r#"{"execute": "block-job-resume", "arguments": {"device": "s1"}}"#,
            5,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s2", "device": "c2-top"}}"#,
            5,
        ),
        S::Ask(
            r#"{"execute": "block-stream", "arguments": {"job-id": "s3", "device": "c3-top", "on-error": "ignore"}}"#,
            5,
        ),
        S::Ask(r#"{"execute": "query-jobs"}"#, 0),
    ];
    let Some(got) = same_jobs_with(3, inject, &steps) else {
        return;
    };
    let said = got.join("\n");
    for action in ["stop", "report", "ignore"] {
        assert!(
            said.contains(&format!("\"action\": \"{action}\"")),
            "{said}"
        );
    }
    assert!(said.contains("\"io-status\": \"failed\""), "{said}");
}
