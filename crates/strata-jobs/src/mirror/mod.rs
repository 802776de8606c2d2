//! The mirror job (QEMU: qmp_blockdev_mirror, blockdev_mirror_common and
//! block/mirror.c), and the active commit that runs on it
//! (commit_active_start): copies a disk to a target while the guest keeps
//! writing to it, reports READY once the two are in sync, and on
//! `job-complete` puts the target in the source's place under every user.
//!
//! A mirror_top node goes over the source (`top.rs`); guest writes through
//! it mark the job's dirty bitmap, or in write-blocking mode reach the
//! target before they complete. The copy loop (`run.rs`) walks the bitmap
//! with up to 16 copies in flight (`ops.rs`). From its last check until the
//! graph has changed, the job keeps the source drained, so no write can
//! fall between "in sync" and the switch.

mod drive;
mod ops;
mod run;
mod top;

pub use drive::{drive_mirror, DriveMirrorArgs};

use crate::filter_node::insert_filter;
use crate::holds::Holds;
use crate::job::{Job, JobDriver, JobError, JobOptions, OnError};
use crate::list::JobList;
use crate::state::JobType;
use crate::Refused;
use async_trait::async_trait;
pub(crate) use ops::BACKGROUND;
use ops::{copy_mode_name, Ops, WRITE_BLOCKING};
use serde_json::{Map, Value};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use strata_block::driver::{ChildCell, ChildRole, Perm};
use strata_block::report::error_report;
use strata_block::{replace_node, Backend, BlockOp, Blocker, DrainGuard, FrozenChain, Graph, Node};
use top::{MirrorTop, TopLink};

/// The default copy buffer (QEMU: DEFAULT_MIRROR_BUF_SIZE).
const DEFAULT_BUF_SIZE: u64 = ops::MAX_IN_FLIGHT as u64 * ops::MAX_IO_BYTES;

/// `blockdev-mirror`'s arguments, checked against the schema.
#[derive(Debug, Default)]
pub struct MirrorArgs {
    pub job_id: Option<String>,
    pub device: String,
    pub target: String,
    pub replaces: Option<String>,
    pub sync: String,
    pub speed: Option<i64>,
    pub granularity: Option<u64>,
    pub buf_size: Option<i64>,
    pub on_source_error: Option<String>,
    pub on_target_error: Option<String>,
    pub filter_node_name: Option<String>,
    pub copy_mode: Option<String>,
    pub auto_finalize: Option<bool>,
    pub auto_dismiss: Option<bool>,
}

fn on_error(v: Option<&str>) -> Result<OnError, String> {
    match v {
        None => Ok(OnError::Report),
        Some(s) => OnError::parse(s).ok_or_else(|| format!("Invalid on-error value '{s}'")),
    }
}

/// The device's node, which must be a root (QEMU: qmp_get_root_bs).
fn root_bs(graph: &Graph, name: &str) -> Result<Arc<Node>, String> {
    let bs = graph.lookup(name).map_err(|e| e.to_string())?;
    if !bs.is_root() {
        return Err("Need a root block node".into());
    }
    Ok(bs)
}

/// Whether replacing `to` by a node mirrored from `bs` keeps what every
/// reader sees (QEMU: bdrv_recurse_can_replace): `to` is `bs`, or below it
/// through filters, or a child of a quorum there.
fn can_replace(bs: &Arc<Node>, to: &Arc<Node>) -> bool {
    let mut n = Arc::clone(bs);
    loop {
        if Arc::ptr_eq(&n, to) {
            return true;
        }
        if n.format_name() == "quorum" {
            return n
                .children()
                .iter()
                .any(|c| matches!(c.role, ChildRole::Quorum(_)) && Arc::ptr_eq(&c.node, to));
        }
        if !n.driver().is_filter() {
            return false;
        }
        match n.primary_child() {
            Some(c) => n = c,
            None => return false,
        }
    }
}

/// The default bitmap granularity for a target (QEMU:
/// bdrv_get_default_bitmap_granularity): its cluster size within
/// [4 KiB, 64 KiB], else 64 KiB.
fn default_granularity(target: &Node) -> u64 {
    match target.driver().cluster_size() {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

/// How the target gets its backing file at the end (QEMU:
/// BlockMirrorBackingMode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackingMode {
    /// blockdev-mirror: the target's backing is the user's business.
    Leave,
    /// drive-mirror made the target: it gets the source's backing node.
    Source,
    /// drive-mirror onto an existing image: it opens the backing file its
    /// header names.
    Open,
}

/// What the two mirror commands set differently.
pub(crate) struct Extra {
    pub(crate) backing_mode: BackingMode,
    pub(crate) zero_target: bool,
    pub(crate) unmap: bool,
    /// To open an existing target's backing file.
    pub(crate) registry: Option<Arc<strata_block::Registry>>,
}

/// `blockdev-mirror`, with QEMU's checks in QEMU's order.
pub async fn blockdev_mirror(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    a: MirrorArgs,
) -> Result<(), Refused> {
    let bs = root_bs(graph, &a.device)?;
    let target = graph.lookup(&a.target).map_err(|e| e.to_string())?;
    let extra = Extra {
        backing_mode: BackingMode::Leave,
        zero_target: a.sync == "full",
        unmap: true,
        registry: None,
    };
    mirror_common(list, graph, a, bs, target, extra).await
}

/// The checks both mirror commands make, then the job (QEMU:
/// blockdev_mirror_common and mirror_start).
pub(crate) async fn mirror_common(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    a: MirrorArgs,
    bs: Arc<Node>,
    target: Arc<Node>,
    extra: Extra,
) -> Result<(), Refused> {
    let mut sync = a.sync.as_str();
    let on_source_error = on_error(a.on_source_error.as_deref())?;
    let on_target_error = on_error(a.on_target_error.as_deref())?;
    let granularity = a.granularity.unwrap_or(0);
    if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
        return Err("Parameter 'granularity' expects a value in range [512B, 64MB]".into());
    }
    if !granularity.is_power_of_two() && granularity != 0 {
        return Err("Parameter 'granularity' expects a power of 2".into());
    }
    bs.check_op(BlockOp::MirrorSource)
        .map_err(|e| e.to_string())?;
    target
        .check_op(BlockOp::MirrorTarget)
        .map_err(|e| e.to_string())?;
    if bs.backing_chain_next().is_none() && sync == "top" {
        sync = "full";
    }
    if let Some(name) = &a.replaces {
        let to = graph
            .find(name)
            .ok_or_else(|| format!("Failed to find node with node-name='{name}'"))?;
        to.check_op(BlockOp::Replace).map_err(|e| e.to_string())?;
        if !can_replace(&bs, &to) {
            return Err(format!(
                "Cannot replace '{name}' by a node mirrored from '{}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data",
                bs.name()
            )
            .into());
        }
        if bs.length() != to.length() {
            return Err("cannot replace image with a mirror image of different size".into());
        }
    }
    if matches!(sync, "incremental" | "bitmap") {
        return Err(format!("Sync mode '{sync}' not supported").into());
    }
    let copy_mode = match a.copy_mode.as_deref() {
        Some("write-blocking") => WRITE_BLOCKING,
        _ => BACKGROUND,
    };
    let base = (sync == "top").then(|| bs.backing_chain_next()).flatten();
    let start = Start {
        job_id: a.job_id.clone().unwrap_or_default(),
        kind: JobType::Mirror,
        bs,
        target,
        replaces: a.replaces.clone(),
        speed: a.speed.unwrap_or(0),
        granularity,
        buf_size: a.buf_size.unwrap_or(0),
        zero_target: extra.zero_target,
        on_source_error,
        on_target_error,
        unmap: extra.unmap,
        none_mode: sync == "none",
        backing_mode: extra.backing_mode,
        registry: extra.registry,
        base,
        filter_node_name: a.filter_node_name.clone(),
        copy_mode,
        base_ro: false,
        opts: JobOptions {
            auto_finalize: a.auto_finalize.unwrap_or(true),
            auto_dismiss: a.auto_dismiss.unwrap_or(true),
            speed: 0,
        },
    };
    mirror_start_job(list, graph, start).await
}

/// Everything mirror_start_job takes.
pub(crate) struct Start {
    pub(crate) job_id: String,
    pub(crate) kind: JobType,
    pub(crate) bs: Arc<Node>,
    pub(crate) target: Arc<Node>,
    pub(crate) replaces: Option<String>,
    pub(crate) speed: i64,
    pub(crate) granularity: u64,
    pub(crate) buf_size: i64,
    pub(crate) zero_target: bool,
    pub(crate) on_source_error: OnError,
    pub(crate) on_target_error: OnError,
    pub(crate) unmap: bool,
    pub(crate) none_mode: bool,
    pub(crate) base: Option<Arc<Node>>,
    pub(crate) filter_node_name: Option<String>,
    pub(crate) copy_mode: u8,
    /// Active commit into a base that was read-only: made so again if the
    /// job fails.
    pub(crate) base_ro: bool,
    pub(crate) opts: JobOptions,
    pub(crate) backing_mode: BackingMode,
    pub(crate) registry: Option<Arc<strata_block::Registry>>,
}

/// Starts a mirror or active commit job (QEMU: mirror_start_job).
pub(crate) async fn mirror_start_job(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    s: Start,
) -> Result<(), Refused> {
    let granularity = if s.granularity == 0 {
        default_granularity(&s.target)
    } else {
        s.granularity
    };
    if s.buf_size < 0 {
        return Err("Invalid parameter 'buf-size'".into());
    }
    let buf_size = if s.buf_size == 0 {
        DEFAULT_BUF_SIZE
    } else {
        s.buf_size as u64
    };
    if Arc::ptr_eq(&s.bs.skip_filters(), &s.target.skip_filters()) {
        return Err("Can't mirror node into itself".into());
    }
    let is_commit = s.bs.chain_contains(&s.target);
    let link = TopLink::new(is_commit);
    let driver = Box::new(MirrorTop {
        source: ChildCell::new(Arc::clone(&s.bs)),
        link: Arc::clone(&link),
    });
    let top = insert_filter(graph, &s.bs, s.filter_node_name.as_deref(), driver, false).await?;
    let state = Arc::new(MirrorState {
        kind: s.kind,
        graph: Arc::clone(graph),
        link: Arc::clone(&link),
        top: Arc::clone(&top),
        target_node: Arc::clone(&s.target),
        target: Mutex::new(None),
        ops: Mutex::new(None),
        holds: Holds::new(s.kind.as_str()),
        replaces: s.replaces.clone(),
        to_replace: Mutex::new(None),
        replace_blocker: Blocker::new("block device is in use by block-job-complete"),
        should_complete: Default::default(),
        prepared: Default::default(),
        drain: Mutex::new(None),
        frozen: Mutex::new(None),
        none_mode: s.none_mode,
        backing_mode: s.backing_mode,
        registry: s.registry.clone(),
        zero_target: s.zero_target,
        base: s.base.clone(),
        base_ro: s.base_ro,
        granularity,
        buf_size: buf_size.next_multiple_of(granularity),
        unmap: s.unmap,
        copy_mode: s.copy_mode,
        on_source_error: s.on_source_error,
        on_target_error: s.on_target_error,
    });
    let job = match list.create(
        &s.job_id,
        Box::new(Mirror(Arc::clone(&state))),
        s.bs.home(),
        s.opts,
    ) {
        Ok(j) => j,
        Err(e) => {
            state.remove_top().await;
            return Err(e.into());
        }
    };
    let desc = format!("{} job '{}'", s.kind.as_str(), job.id());
    let started = match job.set_speed(s.speed) {
        Ok(_) => state.take_holds(&desc, &s, is_commit).await,
        Err(e) => Err(e),
    };
    if let Err(e) = started {
        state.undo_start().await;
        job.early_fail().await;
        return Err(e.into());
    }
    state.make_ops(&job, s.bs.length());
    list.start(&job);
    job.settle(0).await;
    Ok(())
}

/// The mirror job's driver: its state, shared with the command.
struct Mirror(Arc<MirrorState>);

/// A running mirror (QEMU: MirrorBlockJob).
pub(crate) struct MirrorState {
    kind: JobType,
    graph: Arc<Graph>,
    link: Arc<TopLink>,
    top: Arc<Node>,
    target_node: Arc<Node>,
    /// The job's writes to the target, until the job ends.
    target: Mutex<Option<Arc<Backend>>>,
    ops: Mutex<Option<Arc<Ops>>>,
    holds: Holds,
    replaces: Option<String>,
    to_replace: Mutex<Option<Arc<Node>>>,
    replace_blocker: Arc<Blocker>,
    should_complete: std::sync::atomic::AtomicBool,
    prepared: std::sync::atomic::AtomicBool,
    /// The source kept drained from the last check to the graph change.
    drain: Mutex<Option<DrainGuard>>,
    /// An active commit's links from its filter down to the base, held in
    /// place until the job ends (QEMU: mirror_start_job's freeze).
    frozen: Mutex<Option<FrozenChain>>,
    none_mode: bool,
    backing_mode: BackingMode,
    registry: Option<Arc<strata_block::Registry>>,
    zero_target: bool,
    base: Option<Arc<Node>>,
    base_ro: bool,
    granularity: u64,
    buf_size: u64,
    unmap: bool,
    copy_mode: u8,
    on_source_error: OnError,
    on_target_error: OnError,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MirrorState {
    /// The job's holds and its handle on the target, in QEMU's order.
    async fn take_holds(&self, desc: &str, s: &Start, is_commit: bool) -> Result<(), String> {
        let (bs, target) = (&s.bs, &s.target);
        // The source may not be resized while the job runs.
        let rw = Perm::CONSISTENT_READ
            .with(Perm::WRITE_UNCHANGED)
            .with(Perm::WRITE);
        self.holds
            .hold(&self.top, desc, "main node", Perm::CONSISTENT_READ, rw)?;
        let mut tperm = Perm::WRITE;
        let mut tshared = Perm::WRITE_UNCHANGED;
        if is_commit {
            if target.length() < bs.length() {
                tperm = tperm.with(Perm::RESIZE);
            }
            tshared = tshared.with(Perm::CONSISTENT_READ).with(Perm::WRITE);
        } else if bs.chain_contains(&target.skip_filters()) {
            return Err(
                "Cannot mirror to a filter on top of a node in the source's backing chain".into(),
            );
        }
        let blk = Backend::new(target, desc, tperm, tshared).map_err(|e| e.to_string())?;
        *lock(&self.target) = Some(Arc::new(blk));
        self.holds.hold(bs, desc, "source", Perm::NONE, rw)?;
        self.holds
            .hold(target, desc, "target", Perm::NONE, Perm::ALL)?;
        if is_commit {
            *lock(&self.frozen) = Some(self.top.freeze_chain(Some(target)));
            // Every image between disappears at the end: no job may use them.
            let filtered_target = bs.find_overlay(Some(target)).and_then(|o| o.backing());
            let mut shared = Perm::WRITE_UNCHANGED.with(Perm::WRITE);
            let mut iter = bs.filter_or_cow();
            while let Some(n) = iter {
                if Arc::ptr_eq(&n, target) {
                    break;
                }
                if filtered_target.as_ref().is_some_and(|f| Arc::ptr_eq(f, &n)) {
                    shared = shared.with(Perm::CONSISTENT_READ);
                }
                self.holds
                    .hold(&n, desc, "intermediate node", Perm::NONE, shared)?;
                iter = n.filter_or_cow();
            }
        }
        Ok(())
    }

    /// Undoes what a job that never started took.
    async fn undo_start(&self) {
        let blk = lock(&self.target).take();
        if let Some(b) = blk {
            let _ = b.close().await;
        }
        self.holds.release().await;
        self.remove_top().await;
    }

    /// Takes the mirror_top node out: its users use the source again.
    async fn remove_top(&self) {
        drop(lock(&self.frozen).take());
        self.link.set_ops(None);
        self.link.stop.store(true, Ordering::Release);
        if let Some(below) = self.top.backing() {
            if let Err(e) = replace_node(&self.top, &below).await {
                error_report(format!("Failed to remove the mirror filter: {e}"));
            }
        }
        let _ = self.top.close().await;
    }

    /// Gives a drive-mirror target its backing file (QEMU: the backing
    /// modes of mirror_exit_common).
    /// On failure, the errno the job fails with and the message reported.
    async fn attach_target_backing(&self, src: Option<&Arc<Node>>) -> Result<(), (i32, String)> {
        let target = self.target_node.skip_filters();
        match self.backing_mode {
            BackingMode::Leave => Ok(()),
            BackingMode::Source => {
                let want = if self.none_mode {
                    src.cloned()
                } else {
                    self.base.clone()
                };
                let same = match (target.backing(), &want) {
                    (Some(a), Some(b)) => Arc::ptr_eq(&a, b),
                    (None, None) => true,
                    _ => false,
                };
                if same {
                    return Ok(());
                }
                target
                    .set_backing(want)
                    .await
                    .map_err(|e| (libc::EPERM, e.to_string()))
            }
            BackingMode::Open => {
                let (Some((name, fmt)), Some(reg)) =
                    (target.driver().backing_file(), &self.registry)
                else {
                    return Ok(());
                };
                let ctx = strata_block::OpenCtx::with_graph(
                    Arc::clone(reg),
                    strata_block::OpenFlags::default(),
                    Arc::clone(&self.graph),
                );
                // QEMU: bdrv_open_backing_file, which fails with EINVAL.
                let failed = |e: strata_block::Error| {
                    (libc::EINVAL, format!("Could not open backing file: {e}"))
                };
                let node = ctx
                    .open_backing(
                        &target,
                        Some(&name),
                        fmt.as_deref(),
                        strata_block::Opts::new(),
                    )
                    .await
                    .map_err(failed)?;
                let r = target.set_backing(Some(Arc::clone(&node))).await;
                // The target holds it now.
                let _ = node.close().await;
                r.map_err(failed)
            }
        }
    }

    fn ops(&self) -> Option<Arc<Ops>> {
        lock(&self.ops).clone()
    }

    /// The copy state, shared with the mirror_top node from here on, so
    /// that no guest write goes unrecorded (QEMU sets it only once the
    /// bitmap is initialised, so a write to a range already scanned can
    /// be missed until then).
    fn make_ops(&self, job: &Arc<Job>, len: u64) {
        let Some(target) = lock(&self.target).clone() else {
            return;
        };
        let tnode = target.node();
        let cluster = tnode.driver().cluster_size().unwrap_or(512).max(512);
        // A target with a backing file name but none open cannot copy a
        // partial cluster on write: copies round out to its clusters.
        let no_cow = tnode.driver().backing_file().is_some() && tnode.backing().is_none();
        let cow_cluster = (no_cow && self.granularity < cluster).then_some(cluster);
        let buf_size = match cow_cluster {
            Some(c) => self.buf_size.max(c),
            None => self.buf_size,
        };
        let ops = Ops::new(
            ops::OpsConfig {
                granularity: self.granularity,
                buf_size,
                len,
                target,
                top: Arc::downgrade(&self.top),
                unmap: self.unmap,
                cow_cluster,
                copy_mode: self.copy_mode,
                on_source_error: self.on_source_error,
                on_target_error: self.on_target_error,
            },
            job,
        );
        *lock(&self.ops) = Some(Arc::clone(&ops));
        self.link.set_ops(Some(ops));
    }

    /// Handles both prepare and abort (QEMU: mirror_exit_common).
    async fn exit_common(&self, job: &Arc<Job>, abort: bool) -> Result<(), JobError> {
        if self.prepared.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        drop(lock(&self.frozen).take());
        let mut ret = Ok(());
        let drained = lock(&self.drain).is_some();
        if !drained {
            let guard = strata_block::drain_begin(std::slice::from_ref(&self.top)).await;
            *lock(&self.drain) = Some(guard);
        }
        // The job's writer on the target goes before the target takes the
        // source's place, where it may not be allowed.
        let blk = lock(&self.target).take();
        if let Some(b) = blk {
            let _ = b.close().await;
        }
        self.link.set_ops(None);
        self.link.stop.store(true, Ordering::Release);
        let src = self.top.backing();
        if !abort {
            if let Err((errno, e)) = self.attach_target_backing(src.as_ref()).await {
                error_report(e);
                ret = Err(JobError::errno(errno));
            }
        }
        if !abort && self.should_complete.load(Ordering::Acquire) {
            let to_replace = lock(&self.to_replace).clone().or_else(|| src.clone());
            if let Some(to_replace) = to_replace {
                let target = &self.target_node;
                let ro = to_replace.is_read_only();
                if ro != target.is_read_only() {
                    let _ = target.reopen_read_only(ro).await;
                }
                let r = if can_replace(src.as_ref().unwrap_or(&to_replace), &to_replace) {
                    replace_node(&to_replace, target)
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    Err(format!(
                        "Can no longer replace '{}' by '{}', because it can no longer be guaranteed that doing so would not lead to an abrupt change of visible data",
                        to_replace.name(),
                        target.name()
                    ))
                };
                if let Err(e) = r {
                    error_report(e);
                    ret = Err(JobError::errno(libc::EPERM));
                }
            }
        }
        let to_replace = lock(&self.to_replace).take();
        if let Some(n) = to_replace {
            n.blockers().unblock_all(&self.replace_blocker);
            let _ = n.close().await;
        }
        self.holds.release().await;
        if let Some(below) = self.top.backing() {
            if let Err(e) = replace_node(&self.top, &below).await {
                error_report(format!("Failed to remove the mirror filter: {e}"));
            }
        }
        if abort && self.base_ro && !self.target_node.is_read_only() {
            let _ = self.target_node.reopen_read_only(true).await;
        }
        let guard = lock(&self.drain).take();
        drop(guard);
        let _ = self.top.close().await;
        let _ = job;
        ret
    }
}

#[async_trait]
impl JobDriver for Mirror {
    fn job_type(&self) -> JobType {
        self.0.kind
    }

    async fn run(&self, job: &Arc<Job>) -> Result<(), JobError> {
        run::mirror_run(&self.0, job).await
    }

    async fn prepare(&self, job: &Arc<Job>) -> Result<(), JobError> {
        self.0.exit_common(job, false).await
    }

    async fn abort(&self, job: &Arc<Job>) {
        let _ = self.0.exit_common(job, true).await;
    }

    async fn pause(&self, _job: &Arc<Job>) {
        if let Some(o) = self.0.ops() {
            o.wait_for_all_io().await;
        }
    }

    fn complete(&self, job: &Arc<Job>) -> Option<Result<(), String>> {
        Some(self.0.complete(job))
    }

    fn cancel_waits(&self) -> bool {
        false
    }

    fn cancel(&self, job: &Arc<Job>, force: bool) -> bool {
        // Before READY every cancel forces (QEMU: mirror_cancel).
        force || !job.status().is_ready()
    }

    fn change(&self, _job: &Arc<Job>, args: &Value) -> Option<Result<(), String>> {
        if self.0.kind != JobType::Mirror {
            return None;
        }
        Some(self.0.change(args))
    }

    fn query(&self, info: &mut Map<String, Value>) {
        if self.0.kind == JobType::Mirror {
            let synced = self
                .0
                .ops()
                .is_some_and(|o| o.actively_synced.load(Ordering::Acquire));
            info.insert("actively-synced".into(), synced.into());
        }
    }

    async fn free(&self) {
        self.0.holds.release().await;
    }
}

impl MirrorState {
    /// `job-complete` (QEMU: mirror_complete).
    fn complete(&self, job: &Arc<Job>) -> Result<(), String> {
        if !job.status().is_ready() {
            return Err(format!(
                "The active block job '{}' cannot be completed",
                job.id()
            ));
        }
        if self.should_complete.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(name) = &self.replaces {
            let graph_node = self
                .graph
                .find(name)
                .ok_or_else(|| format!("Node name '{name}' not found"))?;
            graph_node.blockers().block_all(&self.replace_blocker);
            graph_node.add_ref();
            *lock(&self.to_replace) = Some(graph_node);
        }
        self.should_complete.store(true, Ordering::Release);
        job.enter_unless_paused();
        Ok(())
    }

    /// `block-job-change` (QEMU: mirror_change): only background to
    /// write-blocking.
    fn change(&self, args: &Value) -> Result<(), String> {
        let want = match args.get("copy-mode").and_then(Value::as_str) {
            Some("write-blocking") => WRITE_BLOCKING,
            _ => BACKGROUND,
        };
        let Some(ops) = self.ops() else {
            return Ok(());
        };
        let current = ops.copy_mode.load(Ordering::Acquire);
        if current == want {
            return Ok(());
        }
        if want != WRITE_BLOCKING {
            return Err(format!(
                "Change to copy mode '{}' is not implemented",
                copy_mode_name(want)
            ));
        }
        ops.copy_mode
            .compare_exchange(BACKGROUND, want, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(|cur| {
                format!(
                    "Expected current copy mode 'background', got '{}'",
                    copy_mode_name(cur)
                )
            })
    }
}
