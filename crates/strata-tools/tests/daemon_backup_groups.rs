//! Backups started by one `transaction` with `completion-mode: grouped`
//! end together: they finalize as one, and when one fails or is cancelled
//! the others are cancelled. The same conversations with strata-daemon and
//! qemu-storage-daemon give the same answers and events.

mod daemon_support;
mod jobs_support;
use daemon_support::*;
use jobs_support::*;

fn a(s: &'static str) -> S<'static> {
    S::Ask(s, 0)
}

/// Every write to the third target fails.
fn failing_t3(side: &Side) {
    targets(side);
    let rule = "[inject-error]\nevent = \"pwritev\"\nerrno = \"5\"\n";
    std::fs::write(side.dir.path().join("c1-tg3.cfg"), rule).unwrap();
}

#[test]
fn grouped_backups_end_together_as_in_qemu() {
    let steps = [
        // Neither finalizes by itself: both wait, then both are pending,
        // and finalizing one finalizes the group.
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup", "data": {"job-id": "j1", "device": "c1-top", "target": "t1", "sync": "full", "auto-finalize": false}}, {"type": "blockdev-backup", "data": {"job-id": "j2", "device": "c1-mid", "target": "t2", "sync": "full", "auto-finalize": false}}], "properties": {"completion-mode": "grouped"}}}"#,
        ),
        S::Until(r#""status": "pending""#),
        a(r#"{"execute": "query-jobs"}"#),
        a(r#"{"execute": "job-finalize", "arguments": {"id": "j2"}}"#),
        a(r#"{"execute": "query-jobs"}"#),
        // Cancelling one cancels the other, each where it stopped.
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup", "data": {"job-id": "j3", "device": "c1-top", "target": "t1", "sync": "full", "speed": 1}}, {"type": "blockdev-backup", "data": {"job-id": "j4", "device": "c1-top", "target": "t2", "sync": "full", "speed": 1}}], "properties": {"completion-mode": "grouped"}}}"#,
        ),
        S::Until(
            r#"1048576, "status": "running", "total-progress": 4194304, "type": "backup", "id": "j4"}, {"current-progress": 1048576"#,
        ),
        a(r#"{"execute": "job-cancel", "arguments": {"id": "j3"}}"#),
        a(r#"{"execute": "query-jobs"}"#),
        // One fails: the other, a fleecing backup that would run until
        // cancelled, is cancelled with it.
        S::Ask(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup", "data": {"job-id": "j5", "device": "c1-top", "target": "t1", "sync": "none"}}, {"type": "blockdev-backup", "data": {"job-id": "j6", "device": "c1-top", "target": "t3", "sync": "full"}}], "properties": {"completion-mode": "grouped"}}}"#,
            9,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        // The failed group let go of its nodes: a new backup may use them.
        a(
            r#"{"execute": "blockdev-backup", "arguments": {"job-id": "j7", "device": "c1-top", "target": "t3", "sync": "none"}}"#,
        ),
        a(r#"{"execute": "job-cancel", "arguments": {"id": "j7"}}"#),
    ];
    same_jobs_and_images(1, with_targets, failing_t3, &steps, &["c1-tgt.qcow2"]);
}

/// A grouped transaction whose third backup is refused: the two backups
/// made before it never start, and the transaction fails. QEMU 10.0.2
/// hangs here (it waits for the older one to finish, which never started),
/// so this runs on Strata's side only.
#[test]
fn a_grouped_transaction_refused_after_two_backups_ends_both() {
    let Some((s, _)) = sides() else {
        return;
    };
    chains(&s, 1);
    targets(&s);
    let steps = [
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup", "data": {"job-id": "j1", "device": "c1-top", "target": "t1", "sync": "full"}}, {"type": "blockdev-backup", "data": {"job-id": "j2", "device": "c1-top", "target": "t2", "sync": "full"}}, {"type": "blockdev-backup", "data": {"job-id": "j3", "device": "c1-top", "target": "big", "sync": "full"}}], "properties": {"completion-mode": "grouped"}}}"#,
        ),
        a(r#"{"execute": "query-jobs"}"#),
        // Nothing is left holding the nodes.
        a(
            r#"{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup", "data": {"job-id": "j1", "device": "c1-top", "target": "t1", "sync": "full", "auto-dismiss": false}}, {"type": "blockdev-backup", "data": {"job-id": "j2", "device": "c1-top", "target": "t2", "sync": "full", "auto-dismiss": false}}], "properties": {"completion-mode": "grouped"}}}"#,
        ),
        S::Until(
            r#""status": "concluded", "total-progress": 4194304, "type": "backup", "id": "j2"}, {"current-progress": 4194304, "status": "concluded""#,
        ),
    ];
    let said = run(&s, with_targets, 1, &steps).join("\n");
    let ends: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("JOB_STATUS_CHANGE") && l.contains("\"null\""))
        .collect();
    assert_eq!(ends.len(), 2, "{said}");
    assert!(
        said.contains("Source and target image have different sizes"),
        "{said}"
    );
    assert!(
        said.contains("-> {\"execute\": \"query-jobs\"}\n{\"return\": []}"),
        "{said}"
    );
    for img in ["c1-tgt.qcow2", "c1-tg2.qcow2"] {
        let (out, code) = s.qemu_img(&["compare", "-U", "c1-top.qcow2", img]);
        assert_eq!(code, 0, "{img}: {out}");
    }
}
