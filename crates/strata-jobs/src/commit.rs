//! The commit job (QEMU: qmp_block_commit, block/commit.c): copies what the
//! images from `top` down to just above `base` hold into `base`, then makes
//! `base` the backing file of the image over `top`, so the images between
//! can go.
//!
//! A commit_top node goes over `top` while the job runs: the image above
//! reads through it, and the job holds every image between (no one else
//! may read them as a disk: their content stops meaning anything once
//! `base` starts changing). The base is made writable for the job if it
//! was opened read-only, and read-only again after.

use crate::chunks::{copy_chunks, Failed};
use crate::commit_top;
use crate::holds::Holds;
use crate::job::{ErrorAction, Job, JobDriver, JobError, JobOptions, OnError};
use crate::list::JobList;
use crate::node_named;
use crate::state::JobType;
use crate::Refused;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use strata_block::driver::{Perm, Preallocation};
use strata_block::{
    drop_intermediate, replace_node, Backend, BlockOp, FrozenChain, Graph, IoBuf, Node, WriteFlags,
};

/// The most one step of the job looks at and copies (QEMU:
/// COMMIT_BUFFER_SIZE).
const COMMIT_CHUNK: u64 = 512 << 10;

/// `block-commit`'s arguments, checked against the schema.
#[derive(Debug, Default)]
pub struct CommitArgs {
    pub job_id: Option<String>,
    pub device: String,
    pub base_node: Option<String>,
    pub base: Option<String>,
    pub top_node: Option<String>,
    pub top: Option<String>,
    pub backing_file: Option<String>,
    pub backing_mask_protocol: bool,
    pub speed: Option<i64>,
    pub on_error: Option<String>,
    pub filter_node_name: Option<String>,
    pub auto_finalize: Option<bool>,
    pub auto_dismiss: Option<bool>,
}

/// The device's node, which must be a root (QEMU: qmp_get_root_bs); the
/// error class tells a missing device from a wrong one.
fn root_node(graph: &Graph, device: &str) -> Result<Arc<Node>, Refused> {
    let Some(bs) = graph.find(device) else {
        return Err(Refused::DeviceNotFound(format!(
            "Device '{device}' not found"
        )));
    };
    if !bs.is_root() {
        return Err(Refused::Generic("Need a root block node".into()));
    }
    Ok(bs)
}

/// Starts a commit job, with QEMU's checks in QEMU's order.
pub async fn block_commit(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    a: CommitArgs,
) -> Result<(), Refused> {
    let on_error = match a.on_error.as_deref() {
        None => OnError::Report,
        Some(s) => OnError::parse(s).ok_or_else(|| format!("Invalid on-error value '{s}'"))?,
    };
    // libvirt probes for DeviceNotFound: the device is looked up first.
    let bs = root_node(graph, &a.device)?;
    bs.check_op(BlockOp::CommitSource)
        .map_err(|e| e.to_string())?;
    let top = match (&a.top_node, &a.top) {
        (Some(_), Some(_)) => return Err("'top-node' and 'top' are mutually exclusive".into()),
        (Some(name), None) => {
            let t = node_named(graph, name)?;
            if !bs.chain_contains(&t) {
                return Err(format!("'{name}' is not in this backing file chain").into());
            }
            Some(t)
        }
        (None, Some(name)) if bs.filename() != *name => bs.find_backing_image(name),
        _ => Some(Arc::clone(&bs)),
    };
    let Some(top) = top else {
        let name = a.top.as_deref().unwrap_or("NULL");
        return Err(format!("Top image file {name} not found").into());
    };
    let base = match (&a.base_node, &a.base) {
        (Some(_), Some(_)) => return Err("'base-node' and 'base' are mutually exclusive".into()),
        (Some(name), None) => {
            let b = node_named(graph, name)?;
            if !top.chain_contains(&b) {
                return Err(format!("'{name}' is not in this backing file chain").into());
            }
            b
        }
        (None, Some(name)) => top
            .find_backing_image(name)
            .ok_or_else(|| format!("Can't find '{name}' in the backing chain"))?,
        // The bottom of the chain (QEMU: bdrv_find_base).
        (None, None) => top.find_overlay(None).ok_or("There is no backimg image")?,
    };
    // Every image from the top down to the base is written or dropped.
    let stop = base.filter_or_cow();
    let mut iter = Some(Arc::clone(&top));
    while let Some(n) = iter {
        if stop.as_ref().is_some_and(|s| Arc::ptr_eq(s, &n)) {
            break;
        }
        n.check_op(BlockOp::CommitTarget)
            .map_err(|e| e.to_string())?;
        iter = n.filter_or_cow();
    }
    if Arc::ptr_eq(&top, &base) {
        return Err("cannot commit an image into itself".into());
    }
    // Committing the image a guest writes to needs the mirror's active
    // commit (QEMU: commit_active_start).
    let active = Arc::ptr_eq(&top.skip_filters(), &bs.skip_filters());
    if active || strata_block::perm::has_writer(&top) {
        if a.backing_file.is_some() {
            return Err(if active {
                "'backing-file' specified, but 'top' is the active layer"
            } else {
                "'backing-file' specified, but 'top' has a writer on it"
            }
            .into());
        }
        return commit_active_start(list, graph, a, top, base, on_error).await;
    }
    let overlay = bs
        .find_overlay(Some(&top))
        .ok_or("Could not find the image above 'top'")?;
    overlay
        .check_op(BlockOp::CommitTarget)
        .map_err(|e| e.to_string())?;
    commit_start(list, graph, a, bs, top, base, on_error).await
}

/// Commits an image that has a writer, the disk's active layer as a rule
/// (QEMU: commit_active_start): a mirror from `top` into `base` that
/// reports READY and, on `job-complete`, puts `base` in `top`'s place.
async fn commit_active_start(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    a: CommitArgs,
    top: Arc<Node>,
    base: Arc<Node>,
    on_error: OnError,
) -> Result<(), Refused> {
    let base_ro = base.is_read_only();
    if base_ro {
        base.reopen_read_only(false)
            .await
            .map_err(|e| e.to_string())?;
    }
    let start = crate::mirror::Start {
        job_id: a.job_id.clone().unwrap_or_default(),
        kind: JobType::Commit,
        bs: top,
        target: Arc::clone(&base),
        replaces: None,
        speed: a.speed.unwrap_or(0),
        granularity: 0,
        buf_size: 0,
        zero_target: false,
        on_source_error: on_error,
        on_target_error: on_error,
        unmap: true,
        none_mode: false,
        base: Some(Arc::clone(&base)),
        filter_node_name: a.filter_node_name.clone(),
        copy_mode: crate::mirror::BACKGROUND,
        base_ro,
        backing_mode: crate::mirror::BackingMode::Leave,
        registry: None,
        opts: JobOptions {
            auto_finalize: a.auto_finalize.unwrap_or(true),
            auto_dismiss: a.auto_dismiss.unwrap_or(true),
            speed: 0,
        },
    };
    let r = crate::mirror::mirror_start_job(list, graph, start).await;
    if r.is_err() && base_ro {
        let _ = base.reopen_read_only(true).await;
    }
    r
}

/// QEMU: commit_start.
async fn commit_start(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    a: CommitArgs,
    bs: Arc<Node>,
    top: Arc<Node>,
    base: Arc<Node>,
    on_error: OnError,
) -> Result<(), Refused> {
    if Arc::ptr_eq(&top.skip_filters(), &base.skip_filters()) {
        return Err("Invalid files for merge: top and base are the same".into());
    }
    let id = a.job_id.clone().unwrap_or_default();
    let state = Arc::new(CommitState {
        commit_top: Mutex::new(None),
        frozen: Mutex::new(None),
        top: Mutex::new(None),
        base_blk: Mutex::new(None),
        base: Arc::clone(&base),
        base_overlay: Mutex::new(None),
        base_read_only: AtomicBool::new(false),
        backing_file: a.backing_file.clone(),
        mask_protocol: a.backing_mask_protocol,
        on_error,
        holds: Holds::new("commit"),
    });
    let opts = JobOptions {
        auto_finalize: a.auto_finalize.unwrap_or(true),
        auto_dismiss: a.auto_dismiss.unwrap_or(true),
        speed: 0,
    };
    let job = list.create(&id, Box::new(Commit(Arc::clone(&state))), bs.home(), opts)?;
    let desc = format!("commit job '{}'", job.id());
    // From here on a failure shows the job created and gone (QEMU:
    // job_early_fail), with everything it took given back.
    let started = match job.set_speed(a.speed.unwrap_or(0)) {
        Ok(_) => {
            state
                .take_holds(graph, &bs, &top, &desc, a.filter_node_name.as_deref())
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = started {
        state.undo_start().await;
        job.early_fail().await;
        return Err(e.into());
    }
    list.start(&job);
    job.settle(0).await;
    Ok(())
}

/// The commit job's driver: its state, shared with the command that sets
/// it up.
struct Commit(Arc<CommitState>);

/// A running commit job (QEMU: CommitBlockJob).
struct CommitState {
    /// The filter over `top` while it is in the graph.
    commit_top: Mutex<Option<Arc<Node>>>,
    /// The links from the filter down to the base, held in place.
    frozen: Mutex<Option<FrozenChain>>,
    /// The job's reads (QEMU: s->top).
    top: Mutex<Option<Arc<Backend>>>,
    /// The job's writes (QEMU: s->base), until prepare.
    base_blk: Mutex<Option<Arc<Backend>>>,
    base: Arc<Node>,
    /// The lowest image whose data is copied.
    base_overlay: Mutex<Option<Arc<Node>>>,
    /// The base was opened read-only and is reopened so for the job.
    base_read_only: AtomicBool,
    backing_file: Option<String>,
    mask_protocol: bool,
    on_error: OnError,
    holds: Holds,
}

fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    m.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn get<T: Clone>(m: &Mutex<Option<T>>) -> Option<T> {
    m.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn put<T>(m: &Mutex<Option<T>>, v: T) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
}

impl CommitState {
    /// What QEMU's commit_start takes after creating the job, in its order:
    /// the base writable, the commit_top node, holds on every image from
    /// the top down to the base, then the job's own handles.
    async fn take_holds(
        &self,
        graph: &Arc<Graph>,
        bs: &Arc<Node>,
        top: &Arc<Node>,
        desc: &str,
        filter_name: Option<&str>,
    ) -> Result<(), String> {
        let base = &self.base;
        let grow = base.length() < top.length();
        let mut base_perm = Perm::CONSISTENT_READ.with(Perm::WRITE);
        if grow {
            base_perm = base_perm.with(Perm::RESIZE);
        }
        self.holds
            .hold(bs, desc, "main node", Perm::NONE, Perm::ALL)?;
        if base.is_read_only() {
            base.reopen_read_only(false)
                .await
                .map_err(|e| e.to_string())?;
            self.base_read_only.store(true, Ordering::Release);
        }
        let filter = commit_top::insert(graph, top, filter_name).await?;
        // The links down to the base stay until the job ends (QEMU:
        // commit_start's freeze).
        put(&self.frozen, filter.freeze_chain(Some(base)));
        put(&self.commit_top, filter);
        let overlay = top
            .find_overlay(Some(base))
            .ok_or("no image above the base")?;
        let filtered_base = overlay.backing();
        put(&self.base_overlay, overlay);
        // Writes to the base go through the images between.
        let mut shared = Perm::WRITE_UNCHANGED.with(Perm::WRITE);
        let mut iter = Some(Arc::clone(top));
        while let Some(n) = iter {
            if Arc::ptr_eq(&n, base) {
                break;
            }
            // From here down there are only filters over the base: they
            // may be read.
            if filtered_base.as_ref().is_some_and(|f| Arc::ptr_eq(f, &n)) {
                shared = shared.with(Perm::CONSISTENT_READ);
            }
            self.holds
                .hold(&n, desc, "intermediate node", Perm::NONE, shared)?;
            iter = n.filter_or_cow();
        }
        self.holds.hold(base, desc, "base", Perm::NONE, Perm::ALL)?;
        let base_shared = Perm::CONSISTENT_READ.with(Perm::WRITE_UNCHANGED);
        let blk = Backend::new(base, desc, base_perm, base_shared).map_err(|e| e.to_string())?;
        put(&self.base_blk, Arc::new(blk));
        let blk = Backend::new(top, desc, Perm::NONE, Perm::ALL).map_err(|e| e.to_string())?;
        put(&self.top, Arc::new(blk));
        Ok(())
    }

    /// Undoes what `take_holds` did of a job that never started.
    async fn undo_start(&self) {
        if let Some(b) = take(&self.base_blk) {
            let _ = b.close().await;
        }
        if let Some(b) = take(&self.top) {
            let _ = b.close().await;
        }
        self.holds.release().await;
        self.remove_filter().await;
        self.restore_base_mode().await;
    }

    /// Takes the commit_top node out, if it is still in the graph: the
    /// image above reads `top` again (QEMU: commit_abort's replace).
    async fn remove_filter(&self) {
        drop(take(&self.frozen));
        if let Some(f) = take(&self.commit_top) {
            if let Some(top) = f.backing() {
                if let Err(e) = replace_node(&f, &top).await {
                    strata_block::report::error_report(format!(
                        "Failed to remove the commit filter: {e}"
                    ));
                }
            }
            let _ = f.close().await;
        }
    }

    async fn restore_base_mode(&self) {
        if self.base_read_only.swap(false, Ordering::AcqRel) {
            let _ = self.base.reopen_read_only(true).await;
        }
    }

    async fn run(&self, job: &Arc<Job>) -> Result<(), JobError> {
        let (Some(top), Some(base)) = (get(&self.top), get(&self.base_blk)) else {
            return Ok(());
        };
        let Some(overlay) = get(&self.base_overlay) else {
            return Ok(());
        };
        let below = overlay.filter_or_cow();
        let len = top.length();
        job.progress_set_remaining(len);
        if base.length() < len {
            base.truncate(len, false, Preallocation::Off).await?;
        }
        let top_node = top.node();
        let on_error = self.on_error;
        copy_chunks(
            job,
            len,
            COMMIT_CHUNK,
            |offset, want| {
                let (top_node, below) = (&top_node, below.as_ref());
                Box::pin(async move {
                    let (st, _) = top_node.block_status_above(below, offset, want).await?;
                    Ok((st.len, st.allocated))
                })
            },
            |offset, n| {
                let (top, base) = (&top, &base);
                Box::pin(async move {
                    let buf = top
                        .read(offset, IoBuf::zeroed(n as usize))
                        .await
                        .map_err(|e| (true, e))?;
                    base.write(offset, buf, WriteFlags::default())
                        .await
                        .map_err(|e| (false, e))?;
                    Ok(())
                })
            },
            |is_read, e| match job.error_action(on_error, is_read, e.code()) {
                ErrorAction::Report => Failed::Fail(e.into()),
                // Tried again (QEMU does the same for ignore).
                _ => Failed::Retry,
            },
        )
        .await
    }

    async fn prepare(&self) -> Result<(), JobError> {
        // The job's writer on the base goes first: the image above may
        // refuse to share writes to its backing file.
        if let Some(b) = take(&self.base_blk) {
            let _ = b.close().await;
        }
        let Some(filter) = get(&self.commit_top) else {
            return Err(JobError::errno(libc::EIO));
        };
        drop(take(&self.frozen));
        drop_intermediate(
            &filter,
            &self.base,
            self.backing_file.as_deref(),
            self.mask_protocol,
        )
        .await
        .map_err(JobError::from)?;
        // Out of the graph: the closing below lets it go.
        if let Some(f) = take(&self.commit_top) {
            let _ = f.close().await;
        }
        Ok(())
    }

    async fn abort(&self) {
        if let Some(b) = take(&self.base_blk) {
            let _ = b.close().await;
        }
        // The images between are the chain's again before the filter goes.
        self.holds.release().await;
        self.remove_filter().await;
    }

    async fn clean(&self) {
        self.restore_base_mode().await;
        if let Some(b) = take(&self.top) {
            let _ = b.close().await;
        }
    }
}

#[async_trait]
impl JobDriver for Commit {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }

    async fn run(&self, job: &Arc<Job>) -> Result<(), JobError> {
        self.0.run(job).await
    }

    async fn prepare(&self, _job: &Arc<Job>) -> Result<(), JobError> {
        self.0.prepare().await
    }

    async fn abort(&self, _job: &Arc<Job>) {
        self.0.abort().await;
    }

    async fn clean(&self, _job: &Arc<Job>) {
        self.0.clean().await;
    }

    async fn free(&self) {
        self.0.holds.release().await;
    }
}
