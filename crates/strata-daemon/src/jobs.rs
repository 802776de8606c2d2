//! The job commands (QEMU: job-qmp.c, the block-job-* commands of
//! blockdev.c, block-stream) and the QAPI types they take.

use crate::blockdev::Daemon;
use crate::commands::daemon_command;
use serde_json::{json, Value};
use std::sync::Arc;
use strata_jobs::{
    block_commit, block_stream, blockdev_backup, blockdev_mirror, drive_mirror, BackupArgs,
    CommitArgs, DriveMirrorArgs, Job, MirrorArgs, Refused, StreamArgs,
};
use strata_qmp::error::ErrorClass;
use strata_qmp::schema::Schema;
use strata_qmp::{Qmp, QmpError};

/// The QAPI types of the job commands.
pub(crate) fn schema(s: &mut Schema) {
    s.enumeration(
        "BlockdevOnError",
        &["report", "ignore", "enospc", "stop", "auto"],
    )
    .object(
        "q_obj_block-stream_arg",
        &[
            ("*job-id", "str"),
            ("device", "str"),
            ("*base", "str"),
            ("*base-node", "str"),
            ("*backing-file", "str"),
            ("*backing-mask-protocol", "bool"),
            ("*bottom", "str"),
            ("*speed", "int"),
            ("*on-error", "BlockdevOnError"),
            ("*filter-node-name", "str"),
            ("*auto-finalize", "bool"),
            ("*auto-dismiss", "bool"),
        ],
    )
    .object(
        "q_obj_block-commit_arg",
        &[
            ("*job-id", "str"),
            ("device", "str"),
            ("*base-node", "str"),
            ("*base", "str"),
            ("*top-node", "str"),
            ("*top", "str"),
            ("*backing-file", "str"),
            ("*backing-mask-protocol", "bool"),
            ("*speed", "int"),
            ("*on-error", "BlockdevOnError"),
            ("*filter-node-name", "str"),
            ("*auto-finalize", "bool"),
            ("*auto-dismiss", "bool"),
        ],
    )
    .enumeration(
        "MirrorSyncMode",
        &["top", "full", "none", "incremental", "bitmap"],
    )
    .object(
        "q_obj_blockdev-mirror_arg",
        &[
            ("*job-id", "str"),
            ("device", "str"),
            ("target", "str"),
            ("*replaces", "str"),
            ("sync", "MirrorSyncMode"),
            ("*speed", "int"),
            ("*granularity", "uint32"),
            ("*buf-size", "int"),
            ("*on-source-error", "BlockdevOnError"),
            ("*on-target-error", "BlockdevOnError"),
            ("*filter-node-name", "str"),
            ("*copy-mode", "MirrorCopyMode"),
            ("*auto-finalize", "bool"),
            ("*auto-dismiss", "bool"),
        ],
    )
    .object(
        "DriveMirror",
        &[
            ("*job-id", "str"),
            ("device", "str"),
            ("target", "str"),
            ("*format", "str"),
            ("*node-name", "str"),
            ("*replaces", "str"),
            ("sync", "MirrorSyncMode"),
            ("*mode", "NewImageMode"),
            ("*speed", "int"),
            ("*granularity", "uint32"),
            ("*buf-size", "int"),
            ("*on-source-error", "BlockdevOnError"),
            ("*on-target-error", "BlockdevOnError"),
            ("*unmap", "bool"),
            ("*copy-mode", "MirrorCopyMode"),
            ("*auto-finalize", "bool"),
            ("*auto-dismiss", "bool"),
        ],
    )
    .enumeration("BitmapSyncMode", &["on-success", "never", "always"])
    .object(
        "BackupPerf",
        &[
            ("*use-copy-range", "bool"),
            ("*max-workers", "int"),
            ("*max-chunk", "int64"),
            ("*min-cluster-size", "size"),
        ],
    )
    .object("BlockdevBackup", &backup_fields(&[("target", "str")]))
    .object(
        "DriveBackup",
        &backup_fields(&[
            ("target", "str"),
            ("*format", "str"),
            ("*mode", "NewImageMode"),
        ]),
    )
    .object("q_obj_job-id_arg", &[("id", "str")])
    .object("q_obj_block-job-device_arg", &[("device", "str")])
    .object(
        "q_obj_block-job-cancel_arg",
        &[("device", "str"), ("*force", "bool")],
    )
    .object(
        "q_obj_block-job-set-speed_arg",
        &[("device", "str"), ("speed", "int")],
    )
    .enumeration(
        "JobType",
        &[
            "commit",
            "stream",
            "mirror",
            "backup",
            "create",
            "amend",
            "snapshot-load",
            "snapshot-save",
            "snapshot-delete",
        ],
    )
    .enumeration("MirrorCopyMode", &["background", "write-blocking"])
    .object(
        "BlockJobChangeOptionsMirror",
        &[("copy-mode", "MirrorCopyMode")],
    )
    .union(
        "BlockJobChangeOptions",
        &[("id", "str"), ("type", "JobType")],
        "type",
        &[("mirror", "BlockJobChangeOptionsMirror")],
    );
}

/// QEMU's BackupCommon, then the fields of one backup command.
fn backup_fields(own: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("*job-id", "str"),
        ("device", "str"),
        ("sync", "MirrorSyncMode"),
        ("*speed", "int"),
        ("*bitmap", "str"),
        ("*bitmap-mode", "BitmapSyncMode"),
        ("*compress", "bool"),
        ("*on-source-error", "BlockdevOnError"),
        ("*on-target-error", "BlockdevOnError"),
        ("*auto-finalize", "bool"),
        ("*auto-dismiss", "bool"),
        ("*filter-node-name", "str"),
        ("*discard-source", "bool"),
        ("*x-perf", "BackupPerf"),
    ];
    v.extend_from_slice(own);
    v
}

/// The arguments both backup commands share.
pub(crate) fn backup_args(a: &Value) -> BackupArgs {
    let s = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
    let b = |k: &str| a.get(k).and_then(Value::as_bool);
    BackupArgs {
        job_id: s("job-id"),
        device: s("device").unwrap_or_default(),
        target: s("target").unwrap_or_default(),
        sync: s("sync").unwrap_or_default(),
        speed: a.get("speed").and_then(Value::as_i64),
        bitmap: s("bitmap"),
        bitmap_mode: s("bitmap-mode"),
        compress: b("compress").unwrap_or(false),
        on_source_error: s("on-source-error"),
        on_target_error: s("on-target-error"),
        auto_finalize: b("auto-finalize"),
        auto_dismiss: b("auto-dismiss"),
        filter_node_name: s("filter-node-name"),
        discard_source: b("discard-source").unwrap_or(false),
        perf: backup_perf(a.get("x-perf")),
    }
}

/// `x-perf`'s members, as the schema let them through.
fn backup_perf(p: Option<&Value>) -> strata_jobs::BackupPerf {
    let Some(p) = p else {
        return strata_jobs::BackupPerf::default();
    };
    strata_jobs::BackupPerf {
        use_copy_range: p.get("use-copy-range").and_then(Value::as_bool),
        max_workers: p.get("max-workers").and_then(Value::as_i64),
        max_chunk: p.get("max-chunk").and_then(Value::as_i64),
        min_cluster_size: p.get("min-cluster-size").and_then(Value::as_u64),
    }
}

/// `drive-backup`'s arguments.
pub(crate) fn drive_backup_args(a: &Value) -> strata_jobs::DriveBackupArgs {
    let s = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
    strata_jobs::DriveBackupArgs {
        common: backup_args(a),
        format: s("format"),
        mode: s("mode"),
    }
}

fn mirror_args(a: &Value) -> MirrorArgs {
    let s = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
    let b = |k: &str| a.get(k).and_then(Value::as_bool);
    MirrorArgs {
        job_id: s("job-id"),
        device: s("device").unwrap_or_default(),
        target: s("target").unwrap_or_default(),
        replaces: s("replaces"),
        sync: s("sync").unwrap_or_default(),
        speed: a.get("speed").and_then(Value::as_i64),
        granularity: a.get("granularity").and_then(Value::as_u64),
        buf_size: a.get("buf-size").and_then(Value::as_i64),
        on_source_error: s("on-source-error"),
        on_target_error: s("on-target-error"),
        filter_node_name: s("filter-node-name"),
        copy_mode: s("copy-mode"),
        auto_finalize: b("auto-finalize"),
        auto_dismiss: b("auto-dismiss"),
    }
}

/// A refused job command as QMP answers it.
fn refused(r: Refused) -> QmpError {
    match r {
        Refused::Generic(m) => QmpError::generic(m),
        Refused::DeviceNotFound(m) => QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: m,
        },
    }
}

/// A job of the `job-*` commands (QEMU: find_job_locked).
fn job(d: &Daemon, id: &str) -> Result<Arc<Job>, QmpError> {
    d.jobs
        .find(id)
        .ok_or_else(|| QmpError::generic("Job not found"))
}

/// A job of the `block-job-*` commands (QEMU: find_block_job_locked).
fn block_job(d: &Daemon, id: &str) -> Result<Arc<Job>, QmpError> {
    d.jobs
        .find(id)
        .filter(|j| j.job_type().is_block_job())
        .ok_or_else(|| QmpError {
            class: ErrorClass::DeviceNotActive,
            desc: format!("Block job '{id}' not found"),
        })
}

/// The verbs a job command can carry.
#[derive(Clone, Copy)]
enum Verb {
    Pause,
    Resume,
    Cancel { force: bool },
    Complete,
    Finalize,
    Dismiss,
}

/// Applies `verb` to `job`; a verb that wakes the job lets it run to its
/// next wait first, so its events precede the answer, as in QEMU.
async fn apply(job: Arc<Job>, verb: Verb) -> Result<Value, QmpError> {
    match verb {
        Verb::Pause => {
            if let Some(since) = job.user_pause()? {
                job.settle(since).await;
            }
        }
        Verb::Resume => {
            if let Some(since) = job.user_resume()? {
                job.settle(since).await;
            }
        }
        Verb::Cancel { force } => job.user_cancel(force).await?,
        Verb::Complete => job.complete()?,
        Verb::Finalize => job.finalize().await?,
        Verb::Dismiss => job.dismiss().await?,
    }
    Ok(json!({}))
}

fn arg<'a>(a: &'a Value, key: &str) -> &'a str {
    a.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Registers `name`, which finds its job with `find` by the argument `key`
/// and applies `verb`.
fn verb_command(
    qmp: &mut Qmp,
    daemon: &Arc<Daemon>,
    name: &str,
    args: &str,
    key: &'static str,
    find: fn(&Daemon, &str) -> Result<Arc<Job>, QmpError>,
    verb: fn(&Value) -> Verb,
) {
    let d = Arc::clone(daemon);
    qmp.add_command(
        name,
        Some(args),
        Arc::new(move |a| {
            let found = find(&d, arg(&a, key));
            let verb = verb(&a);
            Box::pin(async move { apply(found?, verb).await })
        }),
    );
}

pub(crate) fn register(qmp: &mut Qmp, daemon: &Arc<Daemon>) {
    daemon_command(
        qmp,
        daemon,
        "block-stream",
        "q_obj_block-stream_arg",
        |d, a| async move {
            let s = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
            let b = |k: &str| a.get(k).and_then(Value::as_bool);
            let args = StreamArgs {
                job_id: s("job-id"),
                device: s("device").unwrap_or_default(),
                base: s("base"),
                base_node: s("base-node"),
                backing_file: s("backing-file"),
                backing_mask_protocol: b("backing-mask-protocol").unwrap_or(false),
                bottom: s("bottom"),
                speed: a.get("speed").and_then(Value::as_i64),
                on_error: s("on-error"),
                filter_node_name: s("filter-node-name"),
                auto_finalize: b("auto-finalize"),
                auto_dismiss: b("auto-dismiss"),
            };
            block_stream(&d.jobs, &d.graph, &d.registry, args).await
        },
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "block-commit",
        Some("q_obj_block-commit_arg"),
        Arc::new(move |a| {
            let s = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
            let b = |k: &str| a.get(k).and_then(Value::as_bool);
            let args = CommitArgs {
                job_id: s("job-id"),
                device: s("device").unwrap_or_default(),
                base_node: s("base-node"),
                base: s("base"),
                top_node: s("top-node"),
                top: s("top"),
                backing_file: s("backing-file"),
                backing_mask_protocol: b("backing-mask-protocol").unwrap_or(false),
                speed: a.get("speed").and_then(Value::as_i64),
                on_error: s("on-error"),
                filter_node_name: s("filter-node-name"),
                auto_finalize: b("auto-finalize"),
                auto_dismiss: b("auto-dismiss"),
            };
            let d = Arc::clone(&d);
            Box::pin(async move {
                block_commit(&d.jobs, &d.graph, args)
                    .await
                    .map_err(refused)?;
                Ok(json!({}))
            })
        }),
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "drive-mirror",
        Some("DriveMirror"),
        Arc::new(move |a| {
            let s = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
            let args = DriveMirrorArgs {
                common: mirror_args(&a),
                format: s("format"),
                node_name: s("node-name"),
                mode: s("mode"),
                unmap: a.get("unmap").and_then(Value::as_bool),
            };
            let d = Arc::clone(&d);
            Box::pin(async move {
                drive_mirror(&d.jobs, &d.graph, &d.registry, args)
                    .await
                    .map_err(refused)?;
                Ok(json!({}))
            })
        }),
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "blockdev-mirror",
        Some("q_obj_blockdev-mirror_arg"),
        Arc::new(move |a| {
            let args = mirror_args(&a);
            let d = Arc::clone(&d);
            Box::pin(async move {
                blockdev_mirror(&d.jobs, &d.graph, args)
                    .await
                    .map_err(refused)?;
                Ok(json!({}))
            })
        }),
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "blockdev-backup",
        Some("BlockdevBackup"),
        Arc::new(move |a| {
            let d = Arc::clone(&d);
            Box::pin(async move {
                blockdev_backup(&d.jobs, &d.graph, backup_args(&a))
                    .await
                    .map_err(QmpError::generic)?;
                Ok(json!({}))
            })
        }),
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "drive-backup",
        Some("DriveBackup"),
        Arc::new(move |a| {
            let d = Arc::clone(&d);
            Box::pin(async move {
                strata_jobs::drive_backup(&d.jobs, &d.graph, &d.registry, drive_backup_args(&a))
                    .await
                    .map_err(QmpError::generic)?;
                Ok(json!({}))
            })
        }),
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "query-jobs",
        None,
        Arc::new(move |_| {
            let v = d.jobs.query_jobs();
            Box::pin(async move { Ok(v) })
        }),
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "query-block-jobs",
        None,
        Arc::new(move |_| {
            let v = d.jobs.query_block_jobs();
            Box::pin(async move { Ok(v) })
        }),
    );
    let id = "q_obj_job-id_arg";
    verb_command(qmp, daemon, "job-pause", id, "id", job, |_| Verb::Pause);
    verb_command(qmp, daemon, "job-resume", id, "id", job, |_| Verb::Resume);
    verb_command(qmp, daemon, "job-cancel", id, "id", job, |_| Verb::Cancel {
        force: true,
    });
    verb_command(qmp, daemon, "job-complete", id, "id", job, |_| {
        Verb::Complete
    });
    verb_command(qmp, daemon, "job-finalize", id, "id", job, |_| {
        Verb::Finalize
    });
    verb_command(qmp, daemon, "job-dismiss", id, "id", job, |_| Verb::Dismiss);
    let dev = "q_obj_block-job-device_arg";
    verb_command(
        qmp,
        daemon,
        "block-job-pause",
        dev,
        "device",
        block_job,
        |_| Verb::Pause,
    );
    verb_command(
        qmp,
        daemon,
        "block-job-resume",
        dev,
        "device",
        block_job,
        |_| Verb::Resume,
    );
    verb_command(
        qmp,
        daemon,
        "block-job-complete",
        dev,
        "device",
        block_job,
        |_| Verb::Complete,
    );
    verb_command(
        qmp,
        daemon,
        "block-job-finalize",
        id,
        "id",
        block_job,
        |_| Verb::Finalize,
    );
    verb_command(
        qmp,
        daemon,
        "block-job-dismiss",
        id,
        "id",
        block_job,
        |_| Verb::Dismiss,
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "block-job-cancel",
        Some("q_obj_block-job-cancel_arg"),
        Arc::new(move |a| {
            let device = arg(&a, "device").to_string();
            let force = a.get("force").and_then(Value::as_bool).unwrap_or(false);
            let found = block_job(&d, &device);
            Box::pin(async move {
                let job = found?;
                // A paused job is cancelled only by force (QEMU:
                // qmp_block_job_cancel).
                if job.user_paused() && !force {
                    return Err(QmpError::generic(format!(
                        "The block job for device '{device}' is currently paused"
                    )));
                }
                apply(job, Verb::Cancel { force }).await
            })
        }),
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "block-job-change",
        Some("BlockJobChangeOptions"),
        Arc::new(move |a| {
            let found = block_job(&d, arg(&a, "id"));
            Box::pin(async move {
                found?.change(&a)?;
                Ok(json!({}))
            })
        }),
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "block-job-set-speed",
        Some("q_obj_block-job-set-speed_arg"),
        Arc::new(move |a| {
            let found = block_job(&d, arg(&a, "device"));
            let speed = a.get("speed").and_then(Value::as_i64).unwrap_or(0);
            Box::pin(async move {
                let job = found?;
                if let Some(since) = job.set_speed(speed)? {
                    job.settle(since).await;
                }
                Ok(json!({}))
            })
        }),
    );
}
