//! `transaction` (QEMU: qmp_transaction): several actions, all or none.
//! Each action checks and does its change in turn, leaving a [`Pending`]
//! that says how to finish it and how to undo it; when one fails, those
//! before it are undone, newest first, else all are finished, newest
//! first, as QEMU's tran_commit and tran_abort walk their list.

use crate::blockdev::Daemon;
use crate::snapshots::{External, Internal};
use serde_json::Value;
use std::sync::Arc;
use strata_block::{DirtyBitmap, HBitmap, Node};
use strata_jobs::JobTxn;
use strata_qmp::Qmp;

/// What an action that went through leaves for the end of its transaction
/// (QEMU: the state of a TransactionActionDrv).
pub(crate) enum Pending {
    External(External),
    Internal(Internal),
    /// A bitmap that was added: released on abort.
    BitmapAdded(Arc<Node>, Arc<DirtyBitmap>),
    /// A bitmap that was cleared or merged into, with its bits before.
    BitmapBits(Arc<DirtyBitmap>, Option<HBitmap>),
    /// A bitmap enabled or disabled, and whether it was enabled before.
    BitmapEnabled(Arc<Node>, Arc<DirtyBitmap>, bool),
    /// A bitmap out of the image and busy, released on commit; on abort it
    /// is stored again at close if it was persistent (QEMU: skip_store).
    BitmapRemoved(Arc<Node>, Arc<DirtyBitmap>, bool),
    /// A backup job created, started on commit, cancelled on abort (QEMU:
    /// blockdev_backup_commit, _abort).
    Backup(Arc<strata_jobs::JobList>, Arc<strata_jobs::Job>),
}

impl Pending {
    async fn commit(mut self) {
        match &mut self {
            Pending::External(s) => s.commit().await,
            Pending::BitmapRemoved(n, b, _) => {
                b.set_busy(false);
                n.bitmaps().release(b);
            }
            Pending::Backup(list, job) => {
                list.start(job);
                job.settle(0).await;
            }
            _ => {}
        }
        self.clean().await;
    }

    async fn abort(mut self) {
        match &mut self {
            Pending::External(s) => s.abort().await,
            Pending::Internal(s) => s.abort().await,
            Pending::BitmapAdded(n, b) => n.bitmaps().release(b),
            Pending::BitmapBits(b, before) => {
                if let Some(bits) = before.take() {
                    b.restore(bits);
                }
            }
            Pending::BitmapEnabled(n, b, was) => {
                let _ = n.bitmaps().set_enabled(b, *was);
            }
            Pending::BitmapRemoved(_, b, persistent) => {
                b.set_persistent(*persistent);
                b.set_busy(false);
            }
            Pending::Backup(_, job) => {
                let _ = job.user_cancel(true).await;
            }
        }
        self.clean().await;
    }

    /// What goes either way: drains end, references are dropped.
    async fn clean(&mut self) {
        match self {
            Pending::External(s) => s.clean().await,
            Pending::Internal(s) => s.clean(),
            _ => {}
        }
    }
}

/// The actions done so far in one transaction.
#[derive(Default)]
pub(crate) struct Tran(Vec<Pending>);

impl Tran {
    /// Records an action's state before its checks, so that it is cleaned
    /// up whether they pass or not; returns where it is.
    pub(crate) fn add(&mut self, p: Pending) -> usize {
        self.0.push(p);
        self.0.len() - 1
    }

    pub(crate) fn get(&mut self, at: usize) -> &mut Pending {
        &mut self.0[at]
    }

    async fn commit(self) {
        for p in self.0.into_iter().rev() {
            p.commit().await;
        }
    }

    async fn abort(self) {
        for p in self.0.into_iter().rev() {
            p.abort().await;
        }
    }
}

/// Does one action's first phase; a backup joins `group` if there is one.
async fn action(
    d: &Daemon,
    kind: &str,
    data: &Value,
    tran: &mut Tran,
    group: Option<&Arc<JobTxn>>,
) -> Result<(), String> {
    match kind {
        "abort" => Err("Transaction aborted using Abort action".into()),
        "blockdev-snapshot" => d.external_snapshot(false, data, tran).await,
        "blockdev-snapshot-sync" => d.external_snapshot(true, data, tran).await,
        "blockdev-snapshot-internal-sync" => d.internal_snapshot(data, tran).await,
        "blockdev-backup" => {
            let args = crate::jobs::backup_args(data);
            let job = strata_jobs::backup_prepare(&d.jobs, &d.graph, args).await?;
            group.inspect(|g| g.join(&job));
            tran.add(Pending::Backup(Arc::clone(&d.jobs), job));
            Ok(())
        }
        "drive-backup" => {
            let args = crate::jobs::drive_backup_args(data);
            let job =
                strata_jobs::drive_backup_prepare(&d.jobs, &d.graph, &d.registry, args).await?;
            group.inspect(|g| g.join(&job));
            tran.add(Pending::Backup(Arc::clone(&d.jobs), job));
            Ok(())
        }
        _ => crate::bitmaps::action(d, kind, data, tran).await,
    }
}

/// Runs the actions, all or none (QEMU: qmp_transaction); the jobs they
/// start complete as one `group` if there is one.
async fn run_grouped(
    d: &Daemon,
    actions: &[(String, Value)],
    group: Option<&Arc<JobTxn>>,
) -> Result<(), String> {
    let mut tran = Tran::default();
    for (kind, data) in actions {
        if let Err(e) = action(d, kind, data, &mut tran, group).await {
            tran.abort().await;
            return Err(e);
        }
    }
    tran.commit().await;
    Ok(())
}

/// A command that is also a transaction action, run as a transaction of
/// one, as QEMU runs it (blockdev_do_action).
pub(crate) async fn run_one(d: &Daemon, kind: &str, data: &Value) -> Result<(), String> {
    run_grouped(d, &[(kind.to_string(), data.clone())], None).await
}

/// The `transaction` command: `actions` of `{type, data}`, and
/// `completion-mode`, which only backup jobs take.
async fn transaction(d: &Daemon, a: &Value) -> Result<(), String> {
    let actions: Vec<(String, Value)> = a["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            let kind = x["type"].as_str().unwrap_or_default().to_string();
            (kind, x["data"].clone())
        })
        .collect();
    let mode = a["properties"]["completion-mode"]
        .as_str()
        .unwrap_or("individual");
    let mut group = None;
    if mode != "individual" {
        // Only backups complete as a group.
        if let Some((kind, _)) = actions
            .iter()
            .find(|(k, _)| k != "blockdev-backup" && k != "drive-backup")
        {
            return Err(format!(
                "Action '{kind}' does not support transaction property completion-mode = {mode}"
            ));
        }
        group = Some(JobTxn::new());
    }
    run_grouped(d, &actions, group.as_ref()).await
}

/// Adds `transaction` to `qmp`.
pub(crate) fn register(qmp: &mut Qmp, daemon: &Arc<Daemon>) {
    crate::commands::daemon_command(
        qmp,
        daemon,
        "transaction",
        "q_obj_transaction_arg",
        |d, a| async move { transaction(&d, &a).await },
    );
}

/// The QAPI types of `transaction` (qapi/transaction.json), with the
/// actions Strata has.
pub(crate) fn schema(s: &mut strata_qmp::Schema) {
    const ACTIONS: &[(&str, &str)] = &[
        ("abort", "AbortWrapper"),
        ("block-dirty-bitmap-add", "BlockDirtyBitmapAddWrapper"),
        ("block-dirty-bitmap-remove", "BlockDirtyBitmapWrapper"),
        ("block-dirty-bitmap-clear", "BlockDirtyBitmapWrapper"),
        ("block-dirty-bitmap-enable", "BlockDirtyBitmapWrapper"),
        ("block-dirty-bitmap-disable", "BlockDirtyBitmapWrapper"),
        ("block-dirty-bitmap-merge", "BlockDirtyBitmapMergeWrapper"),
        ("blockdev-backup", "BlockdevBackupWrapper"),
        ("drive-backup", "DriveBackupWrapper"),
        ("blockdev-snapshot", "BlockdevSnapshotWrapper"),
        (
            "blockdev-snapshot-internal-sync",
            "BlockdevSnapshotInternalWrapper",
        ),
        ("blockdev-snapshot-sync", "BlockdevSnapshotSyncWrapper"),
    ];
    let kinds: Vec<&str> = ACTIONS.iter().map(|(k, _)| *k).collect();
    s.object("Abort", &[])
        .enumeration("ActionCompletionMode", &["individual", "grouped"])
        .enumeration("TransactionActionKind", &kinds);
    for (wrapper, inner) in [
        ("AbortWrapper", "Abort"),
        ("BlockDirtyBitmapAddWrapper", "BlockDirtyBitmapAdd"),
        ("BlockDirtyBitmapWrapper", "BlockDirtyBitmap"),
        ("BlockDirtyBitmapMergeWrapper", "BlockDirtyBitmapMerge"),
        ("BlockdevBackupWrapper", "BlockdevBackup"),
        ("DriveBackupWrapper", "DriveBackup"),
        ("BlockdevSnapshotWrapper", "BlockdevSnapshot"),
        (
            "BlockdevSnapshotInternalWrapper",
            "BlockdevSnapshotInternal",
        ),
        ("BlockdevSnapshotSyncWrapper", "BlockdevSnapshotSync"),
    ] {
        s.object(wrapper, &[("data", inner)]);
    }
    s.union(
        "TransactionAction",
        &[("type", "TransactionActionKind")],
        "type",
        ACTIONS,
    )
    .object(
        "TransactionProperties",
        &[("*completion-mode", "ActionCompletionMode")],
    )
    .object(
        "q_obj_transaction_arg",
        &[
            ("actions", "[TransactionAction]"),
            ("*properties", "TransactionProperties"),
        ],
    );
}
