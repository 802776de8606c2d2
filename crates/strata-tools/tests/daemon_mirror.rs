//! The mirror job and active commit over QMP: the same conversations with
//! strata-daemon and qemu-storage-daemon give the same answers and events,
//! and leave the same images.

mod daemon_support;
mod jobs_support;
use daemon_support::*;
use jobs_support::*;

/// A 4 MiB qcow2 target `cN-tgt.qcow2` beside each chain.
fn targets(side: &Side) {
    for i in 1..=3 {
        side.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &format!("c{i}-tgt.qcow2"),
            "4M",
        ]);
    }
}

/// The chains' nodes and a node `tN` for each target.
fn with_targets(side: &Side, n: usize) -> Vec<String> {
    let mut v = nodes(side, n);
    for i in 1..=n {
        v.push("--blockdev".into());
        v.push(format!(
            "driver=qcow2,node-name=t{i},file.driver=file,file.filename=$DIR/c{i}-tgt.qcow2"
        ));
    }
    v
}

const READY: &str = r#""status": "ready""#;

#[test]
fn a_full_mirror_gets_ready_and_pivots_as_in_qemu() {
    let steps = [
        S::Ask(
            r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m1", "device": "c1-top", "target": "t1", "sync": "full"}}"#,
            0,
        ),
        S::Until(READY),
        S::Ask(r#"{"execute": "query-block-jobs"}"#, 0),
        S::Ask(
            r#"{"execute": "job-complete", "arguments": {"id": "m1"}}"#,
            5,
        ),
        S::Ask(r#"{"execute": "query-block"}"#, 0),
    ];
    same_jobs_and_images(1, with_targets, targets, &steps, &["c1-tgt.qcow2"]);
}
