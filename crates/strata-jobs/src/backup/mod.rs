//! The backup job (QEMU: qmp_blockdev_backup, block/backup.c): copies the
//! disk as it is when the job starts into a target while the guest keeps
//! writing. A copy-before-write filter goes over the source ([`cbw`]): a
//! guest write first copies the old data of its clusters to the target.
//! The job copies the rest ([`copy`] makes sure each cluster goes once).
//!
//! Sync modes: `full` copies everything, `top` what the source's top image
//! holds, `none` nothing (only what the guest overwrites: image fleecing),
//! `bitmap` what a dirty bitmap marks (`incremental`: the same with
//! `bitmap-mode=on-success`). While the job runs the bitmap is frozen and a
//! successor records new writes; at the end it keeps only the new writes
//! (`on-success` on success, `always`), or takes them on top of what it
//! had (`never`, or a failure).

mod cbw;
mod copy;
mod drive;
pub mod fleecing;

pub use drive::{drive_backup, drive_backup_prepare, DriveBackupArgs};

use crate::filter_node::insert_filter;
use crate::holds::Holds;
use crate::job::{ErrorAction, Job, JobDriver, JobError, JobOptions, OnError};
use crate::list::JobList;
use crate::state::JobType;
use async_trait::async_trait;
use cbw::{CopyBeforeWrite, OnCbwError};
use copy::{BlockCopy, CopyOpts};
use std::sync::{Arc, Weak};
use strata_block::driver::Perm;
use strata_block::{BlockOp, DirtyBitmap, Graph, Node};

/// Copies the job runs at once unless `x-perf` says otherwise (QEMU runs
/// up to 64 block-copy tasks; 16 of 1 MiB keep this machine's disk busy).
const WORKERS: usize = 16;

/// One copy of the job's loop (QEMU: the default max-chunk, one buffer).
const CHUNK: u64 = 1 << 20;

/// `blockdev-backup`'s arguments, checked against the schema.
#[derive(Debug, Default)]
pub struct BackupArgs {
    pub job_id: Option<String>,
    pub device: String,
    pub target: String,
    pub sync: String,
    pub speed: Option<i64>,
    pub bitmap: Option<String>,
    pub bitmap_mode: Option<String>,
    pub compress: bool,
    pub on_source_error: Option<String>,
    pub on_target_error: Option<String>,
    pub auto_finalize: Option<bool>,
    pub auto_dismiss: Option<bool>,
    pub filter_node_name: Option<String>,
    /// Copied ranges are discarded from the source (a fleecing image's
    /// space given back as the backup goes).
    pub discard_source: bool,
    pub perf: BackupPerf,
}

/// QEMU's BackupPerf (`x-perf`): how the job copies, never what.
/// `use-copy-range` is taken and changes nothing: Strata's core has no
/// copy offload, so every copy goes through a buffer, as QEMU's does when
/// its copy_range fails.
#[derive(Debug, Default, Clone)]
pub struct BackupPerf {
    pub use_copy_range: Option<bool>,
    pub max_workers: Option<i64>,
    pub max_chunk: Option<i64>,
    pub min_cluster_size: Option<u64>,
}

impl BackupPerf {
    /// QEMU's range checks, done right after the op blockers
    /// (backup_job_create).
    fn check(&self) -> Result<(), String> {
        if self
            .max_workers
            .is_some_and(|w| !(1..=i32::MAX as i64).contains(&w))
        {
            return Err(format!("max-workers must be between 1 and {}", i32::MAX));
        }
        if self.max_chunk.is_some_and(|c| c < 0) {
            return Err("max-chunk must be zero (which means no limit) or positive".into());
        }
        Ok(())
    }

    fn workers(&self) -> usize {
        self.max_workers.map_or(WORKERS, |w| w as usize)
    }

    /// The most one copy of the job's loop takes (QEMU:
    /// block_copy_chunk_size, capped by max-chunk when it is not 0).
    fn chunk(&self, cluster: u64) -> u64 {
        let chunk = CHUNK.max(cluster);
        match self.max_chunk {
            Some(c) if c > 0 => chunk.min(c as u64),
            _ => chunk,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sync {
    Full,
    Top,
    None,
    Bitmap,
}

/// When the sync bitmap gives up the bits it had (QEMU: BitmapSyncMode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BitmapMode {
    OnSuccess,
    Never,
    Always,
}

fn on_error(v: Option<&str>) -> Result<OnError, String> {
    match v {
        None => Ok(OnError::Report),
        Some(s) => OnError::parse(s).ok_or_else(|| format!("Invalid on-error value '{s}'")),
    }
}

/// Starts a backup job (QEMU: qmp_blockdev_backup).
pub async fn blockdev_backup(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    a: BackupArgs,
) -> Result<(), String> {
    let job = backup_prepare(list, graph, a).await?;
    list.start(&job);
    job.settle(0).await;
    Ok(())
}

/// Creates a backup job, with its filter in place, without starting it:
/// QEMU's checks in QEMU's order (blockdev_backup_action,
/// do_backup_common, backup_job_create). A transaction starts it when all
/// its actions went through, and cancels it otherwise.
pub async fn backup_prepare(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    a: BackupArgs,
) -> Result<Arc<Job>, String> {
    let bs = graph.lookup(&a.device).map_err(|e| e.to_string())?;
    let target = graph.lookup(&a.target).map_err(|e| e.to_string())?;
    prepare_on(list, graph, a, bs, target).await
}

/// The checks and set-up both backup commands share, once the target is
/// a node (QEMU: do_backup_common, backup_job_create).
async fn prepare_on(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    a: BackupArgs,
    bs: Arc<Node>,
    target: Arc<Node>,
) -> Result<Arc<Job>, String> {
    let drained = strata_block::drain_begin(std::slice::from_ref(&bs)).await;
    let mut sync = match a.sync.as_str() {
        "full" => Sync::Full,
        "top" => Sync::Top,
        "none" => Sync::None,
        _ => Sync::Bitmap,
    };
    if matches!(a.sync.as_str(), "bitmap" | "incremental") && a.bitmap.is_none() {
        return Err(format!(
            "must provide a valid bitmap name for '{}' sync mode",
            a.sync
        ));
    }
    let mut mode = match a.bitmap_mode.as_deref() {
        None => None,
        Some("on-success") => Some(BitmapMode::OnSuccess),
        Some("never") => Some(BitmapMode::Never),
        Some(_) => Some(BitmapMode::Always),
    };
    if a.sync == "incremental" {
        if mode.is_some_and(|m| m != BitmapMode::OnSuccess) {
            return Err(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'".into(),
            );
        }
        mode = Some(BitmapMode::OnSuccess);
        sync = Sync::Bitmap;
    }
    let shown_sync = if a.sync == "incremental" {
        "bitmap"
    } else {
        a.sync.as_str()
    };
    let mut sync_bitmap = None;
    if let Some(name) = &a.bitmap {
        let b = bs
            .bitmaps()
            .find(name)
            .ok_or_else(|| format!("Bitmap '{name}' could not be found"))?;
        let Some(m) = mode else {
            return Err("Bitmap sync mode must be given when providing a bitmap".into());
        };
        b.check(strata_block::bitmap::Check::AllowReadOnly)
            .map_err(|e| e.to_string())?;
        if sync == Sync::None {
            return Err("sync mode 'none' does not produce meaningful bitmap outputs".into());
        }
        if m == BitmapMode::Never && sync != Sync::Bitmap {
            let m = a.bitmap_mode.as_deref().unwrap_or_default();
            return Err(format!(
                "Bitmap sync mode '{m}' has no meaningful effect when combined with sync mode '{shown_sync}'"
            ));
        }
        sync_bitmap = Some(b);
    }
    if a.bitmap.is_none() && mode.is_some() {
        return Err("Cannot specify bitmap sync mode without a bitmap".into());
    }
    let on_source_error = on_error(a.on_source_error.as_deref())?;
    let on_target_error = on_error(a.on_target_error.as_deref())?;
    // QEMU: backup_job_create.
    if Arc::ptr_eq(&bs, &target) {
        return Err("Source and target cannot be the same".into());
    }
    if a.compress && !target.skip_filters().driver().can_compress() {
        return Err("Compression is not supported for this drive ".into());
    }
    bs.check_op(BlockOp::BackupSource)
        .map_err(|e| e.to_string())?;
    target
        .check_op(BlockOp::BackupTarget)
        .map_err(|e| e.to_string())?;
    a.perf.check()?;
    let mode = mode.unwrap_or(BitmapMode::Never);
    let successor = match &sync_bitmap {
        Some(b) => {
            if mode != BitmapMode::Never {
                b.check(strata_block::bitmap::Check::Default)
                    .map_err(|e| e.to_string())?;
            }
            Some(
                bs.bitmaps()
                    .create_successor(b)
                    .map_err(|e| e.to_string())?,
            )
        }
        None => None,
    };
    let frozen = match (&sync_bitmap, &successor) {
        (Some(b), Some(s)) => Some((Arc::clone(b), Arc::clone(s))),
        _ => None,
    };
    let reclaim = |frozen: &Option<(Arc<DirtyBitmap>, Arc<DirtyBitmap>)>| {
        if let Some((b, s)) = frozen {
            bs.bitmaps().reclaim(b, s);
        }
    };
    if target.length() != bs.length() {
        reclaim(&frozen);
        return Err("Source and target image have different sizes".into());
    }
    let id = a.job_id.clone().unwrap_or_default();
    let desc = format!("backup job '{id}'");
    let started = start(graph, &bs, &target, &a).await;
    let (cbw_node, copy) = match started {
        Ok(x) => x,
        Err(e) => {
            reclaim(&frozen);
            return Err(e);
        }
    };
    let state = Arc::new(BackupState {
        cbw: cbw_node,
        copy: Arc::clone(&copy),
        source: Arc::clone(&bs),
        perf: a.perf.clone(),
        sync,
        frozen,
        mode,
        on_source_error,
        on_target_error,
        holds: Holds::new("backup"),
    });
    let opts = JobOptions {
        auto_finalize: a.auto_finalize.unwrap_or(true),
        auto_dismiss: a.auto_dismiss.unwrap_or(true),
        speed: 0,
    };
    let job = match list.create(&id, Box::new(Backup(Arc::clone(&state))), bs.home(), opts) {
        Ok(j) => j,
        Err(e) => {
            state.abort();
            state.clean().await;
            return Err(e);
        }
    };
    let weak: Weak<Job> = Arc::downgrade(&job);
    copy.set_progress(Box::new(move |n| {
        if let Some(j) = weak.upgrade() {
            j.progress_update(n);
        }
    }));
    let held = job
        .set_speed(a.speed.unwrap_or(0))
        .and_then(|_| state.take_holds(&target, &desc));
    if let Err(e) = held {
        job.early_fail().await;
        return Err(e);
    }
    // The filter is in place: the guest's writes may go on, and so may
    // the job's reads below it.
    drop(drained);
    Ok(job)
}

/// Puts the copy-before-write filter over the source, with the copy
/// state it shares with the job (QEMU: bdrv_cbw_append).
async fn start(
    graph: &Arc<Graph>,
    bs: &Arc<Node>,
    target: &Arc<Node>,
    a: &BackupArgs,
) -> Result<(Arc<Node>, Arc<BlockCopy>), String> {
    let min_cluster = a.perf.min_cluster_size.unwrap_or(0);
    if min_cluster > i64::MAX as u64 {
        return Err(format!(
            "min-cluster-size too large: {min_cluster} > {}",
            i64::MAX
        ));
    }
    if let Some(n) = &a.filter_node_name {
        graph
            .check_new_name(n)
            .map_err(|e| format!("Could not create node: {e}"))?;
    }
    // Whole clusters of the target, at least 64 KiB.
    let cluster = fleecing::copy_cluster(target, min_cluster)
        .map_err(|e| format!("Could not create node: Cannot create block-copy-state: {e}"))?;
    if let Some(c) = a.perf.max_chunk.filter(|&c| c > 0 && (c as u64) < cluster) {
        return Err(format!(
            "Required max-chunk ({c}) is less than backup cluster size ({cluster})"
        ));
    }
    // The filter's target edge is a reference on the target.
    target.add_ref();
    let opts = CopyOpts {
        compress: a.compress,
        discard_source: a.discard_source,
    };
    let copy = BlockCopy::new(bs, Arc::clone(target), cluster, opts);
    let driver = copy.and_then(|copy| {
        CopyBeforeWrite::new(
            Arc::clone(bs),
            Arc::clone(target),
            Arc::clone(&copy),
            OnCbwError::BreakGuestWrite,
            None,
        )
        .map(|d| (copy, d))
        .map_err(|e| e.to_string())
    });
    let (copy, driver) = match driver {
        Ok(x) => x,
        Err(e) => {
            let _ = target.close().await;
            return Err(e);
        }
    };
    // insert_filter takes its own reference on the source for the edge.
    let node = insert_filter(
        graph,
        bs,
        a.filter_node_name.as_deref(),
        Box::new(driver),
        false,
    )
    .await?;
    if let Some(d) = cbw_driver(&node) {
        d.adopt_bitmaps(node.bitmaps());
    }
    Ok((node, copy))
}

fn cbw_driver(node: &Node) -> Option<&CopyBeforeWrite> {
    node.driver()
        .as_any()
        .and_then(|a| a.downcast_ref::<CopyBeforeWrite>())
}

/// The backup job's driver: its state, shared with the command.
struct Backup(Arc<BackupState>);

/// A running backup (QEMU: BackupBlockJob).
struct BackupState {
    cbw: Arc<Node>,
    copy: Arc<BlockCopy>,
    source: Arc<Node>,
    perf: BackupPerf,
    sync: Sync,
    /// The sync bitmap and the successor recording while the job runs.
    frozen: Option<(Arc<DirtyBitmap>, Arc<DirtyBitmap>)>,
    mode: BitmapMode,
    on_source_error: OnError,
    on_target_error: OnError,
    holds: Holds,
}

impl BackupState {
    /// The job's holds: the filter (main node) and the target, as QEMU's
    /// block_job_create and block_job_add_bdrv take them.
    fn take_holds(&self, target: &Arc<Node>, desc: &str) -> Result<(), String> {
        self.holds
            .hold(&self.cbw, desc, "main node", Perm::NONE, Perm::ALL)?;
        self.holds
            .hold(target, desc, "target", Perm::NONE, Perm::ALL)
    }

    /// The bits the copy starts from (QEMU: backup_init_bcs_bitmap).
    fn init_bitmap(&self, job: &Arc<Job>) {
        if let (Sync::Bitmap, Some((b, _))) = (self.sync, &self.frozen) {
            self.copy.start_from(b);
        } else if self.sync == Sync::Top {
            self.copy.set_skip_unallocated(true);
        }
        job.progress_set_remaining(self.copy.dirty().count());
    }

    /// Gives the sync bitmap back as the mode and the outcome say (QEMU:
    /// backup_cleanup_sync_bitmap).
    fn settle_bitmap(&self, ok: bool) {
        let Some((b, s)) = &self.frozen else {
            return;
        };
        let sync = (ok || self.mode == BitmapMode::Always) && self.mode != BitmapMode::Never;
        let bitmaps = self.source.bitmaps();
        if sync {
            bitmaps.abdicate(b, s);
        } else {
            bitmaps.reclaim(b, s);
        }
        if !ok && self.mode == BitmapMode::Always {
            // What was not copied is still to be backed up next time.
            for (off, len) in self.copy.dirty().dirty_ranges() {
                b.set(off, len);
            }
        }
    }

    fn abort(&self) {
        self.settle_bitmap(false);
    }

    /// Takes the filter out and lets go of the copy state (QEMU:
    /// backup_clean, bdrv_cbw_drop).
    async fn clean(&self) {
        if let Some(d) = cbw_driver(&self.cbw) {
            *d.copy.lock().unwrap_or_else(|e| e.into_inner()) = None;
            d.stopped.store(true, std::sync::atomic::Ordering::Release);
        }
        if let Err(e) = self.cbw.drop_filter().await {
            strata_block::report::error_report(format!(
                "Failed to drop the copy-before-write filter: {e}"
            ));
        }
        let _ = self.cbw.close().await;
    }

    /// Copies what is left, in batches that all end before the next pause
    /// point, so a paused job holds no cluster a guest write waits for;
    /// a last pass waits for the filter's copies in flight and takes what
    /// failed again (QEMU: backup_loop).
    async fn copy_all(&self, job: &Arc<Job>) -> Result<(), JobError> {
        let len = self.source.length();
        let end = len.next_multiple_of(self.copy.cluster_size());
        let mut pos = 0;
        loop {
            job.ratelimit_sleep().await;
            if job.is_cancelled() {
                return Ok(());
            }
            let mut batch = Vec::new();
            let chunk = self.perf.chunk(self.copy.cluster_size());
            while batch.len() < self.perf.workers() && !job.ratelimit_exceeded() {
                let Some((s, l)) = self.copy.dirty().next_dirty_area(pos, end, chunk) else {
                    pos = end;
                    break;
                };
                pos = s + l;
                batch.push((s, l));
                job.ratelimit_processed(l);
            }
            let copies = batch.iter().map(|&(s, l)| self.copy.copy(s, l));
            let results = futures::future::join_all(copies).await;
            let failed = results.into_iter().find_map(Result::err);
            let failed = match failed {
                None if pos >= end => self.copy.copy(0, end).await.err(),
                other => other,
            };
            match failed {
                None if pos >= end => return Ok(()),
                None => {}
                Some(e) => {
                    let policy = if e.is_read {
                        self.on_source_error
                    } else {
                        self.on_target_error
                    };
                    match job.error_action(policy, e.is_read, e.error.code()) {
                        ErrorAction::Report => return Err(JobError::from(e.error)),
                        // Stop has paused the job; either way the copy
                        // starts over, taking what failed again.
                        _ => pos = 0,
                    }
                }
            }
        }
    }

    async fn run(&self, job: &Arc<Job>) -> Result<(), JobError> {
        self.init_bitmap(job);
        if self.sync == Sync::Top {
            let len = self.source.length();
            let mut offset = 0;
            while offset < len {
                if job.is_cancelled() {
                    return Err(JobError::errno(libc::ECANCELED));
                }
                job.pause_point().await;
                if job.is_cancelled() {
                    return Err(JobError::errno(libc::ECANCELED));
                }
                offset += self.copy.reset_unallocated(offset).await?;
                job.progress_set_remaining(self.copy.dirty().count());
            }
            self.copy.set_skip_unallocated(false);
        }
        if self.sync == Sync::None {
            // The filter copies what the guest overwrites, until a cancel.
            while !job.is_cancelled() {
                job.wait_entered().await;
            }
            return Ok(());
        }
        self.copy_all(job).await?;
        if job.is_cancelled() {
            return Ok(());
        }
        self.flush_target(job).await
    }

    /// A backup that reports its end is on disk. QEMU's is not until the
    /// target is closed, and a crash before that loses the copy that
    /// BLOCK_JOB_COMPLETED announced. A failed flush is a target error.
    async fn flush_target(&self, job: &Arc<Job>) -> Result<(), JobError> {
        loop {
            // By node: the job's own handle may wait at a drained section's gate.
            let Err(e) = self.copy.target().flush().await else {
                return Ok(());
            };
            match job.error_action(self.on_target_error, false, e.code()) {
                ErrorAction::Report => return Err(JobError::from(e)),
                ErrorAction::Ignore => return Ok(()),
                // Paused; tried again once resumed, unless cancelled.
                _ => {
                    job.pause_point().await;
                    if job.is_cancelled() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[async_trait]
impl JobDriver for Backup {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    async fn run(&self, job: &Arc<Job>) -> Result<(), JobError> {
        self.0.run(job).await
    }

    async fn commit(&self, _job: &Arc<Job>) {
        self.0.settle_bitmap(true);
    }

    async fn abort(&self, _job: &Arc<Job>) {
        self.0.abort();
    }

    async fn clean(&self, _job: &Arc<Job>) {
        self.0.holds.release().await;
        self.0.clean().await;
    }
}
