//! The stream job (QEMU: qmp_block_stream, block/stream.c): copies into an
//! image what it reads from the images below it, down to a base, then
//! makes the base its backing file, so the images between can go.
//!
//! A copy-on-read filter goes over the image while the job runs: the job
//! reads through it, and so do the image's other users, so whatever anyone
//! reads is copied up once. The filter's `bottom` keeps data of the base and
//! below where it is. The image, the filter and every image between are
//! held by the job (their permissions and op blockers) until it is
//! dismissed.

use crate::chunks::{copy_chunks, Failed};
use crate::holds::Holds;
use crate::job::{ErrorAction, Job, JobDriver, JobError, JobOptions, OnError};
use crate::list::JobList;
use crate::node_named;
use crate::state::JobType;
use async_trait::async_trait;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use strata_block::driver::Perm;
use strata_block::report::error_report;
use strata_block::{
    drained_async, replace_node, Backend, BlockOp, FrozenChain, Graph, IoBuf, Node, OpenCtx,
    OpenFlags, Opts, Registry,
};

/// The most one step of the job looks at and copies (QEMU: STREAM_CHUNK).
const STREAM_CHUNK: u64 = 512 << 10;

/// `block-stream`'s arguments, checked against the schema.
#[derive(Debug, Default)]
pub struct StreamArgs {
    pub job_id: Option<String>,
    pub device: String,
    pub base: Option<String>,
    pub base_node: Option<String>,
    pub backing_file: Option<String>,
    pub backing_mask_protocol: bool,
    pub bottom: Option<String>,
    pub speed: Option<i64>,
    pub on_error: Option<String>,
    pub filter_node_name: Option<String>,
    pub auto_finalize: Option<bool>,
    pub auto_dismiss: Option<bool>,
}

/// Starts a stream job, with QEMU's checks in QEMU's order.
pub async fn block_stream(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    registry: &Arc<Registry>,
    a: StreamArgs,
) -> Result<(), String> {
    if a.base.is_some() && a.base_node.is_some() {
        return Err("'base' and 'base-node' cannot be specified at the same time".into());
    }
    if a.base.is_some() && a.bottom.is_some() {
        return Err("'base' and 'bottom' cannot be specified at the same time".into());
    }
    if a.bottom.is_some() && a.base_node.is_some() {
        return Err("'bottom' and 'base-node' cannot be specified at the same time".into());
    }
    let on_error = match a.on_error.as_deref() {
        None => OnError::Report,
        Some(s) => OnError::parse(s).ok_or_else(|| format!("Invalid on-error value '{s}'"))?,
    };
    let bs = graph.lookup(&a.device).map_err(|e| e.to_string())?;
    let mut base = None;
    if let Some(name) = &a.base {
        base = Some(
            bs.find_backing_image(name)
                .ok_or_else(|| format!("Can't find '{name}' in the backing chain"))?,
        );
    }
    if let Some(name) = &a.base_node {
        let b = node_named(graph, name)?;
        if Arc::ptr_eq(&b, &bs) || !bs.chain_contains(&b) {
            return Err(format!(
                "Node '{name}' is not a backing image of '{}'",
                a.device
            ));
        }
        base = Some(b);
    }
    let mut bottom = None;
    if let Some(name) = &a.bottom {
        let b = node_named(graph, name)?;
        if b.driver().is_filter() {
            return Err(format!(
                "Node '{name}' is a filter, use a non-filter node as 'bottom'"
            ));
        }
        if !bs.chain_contains(&b) {
            return Err(format!(
                "Node '{name}' is not in a chain starting from '{}'",
                a.device
            ));
        }
        bottom = Some(b);
    }
    // Nothing between the image and the base may be busy with another job.
    let end = match &bottom {
        Some(b) => b.filter_or_cow(),
        None => base.clone(),
    };
    let mut iter = Some(Arc::clone(&bs));
    while let Some(n) = iter {
        if end.as_ref().is_some_and(|e| Arc::ptr_eq(e, &n)) {
            break;
        }
        n.check_op(BlockOp::Stream).map_err(|e| e.to_string())?;
        iter = n.filter_or_cow();
    }
    if base.is_none() && a.backing_file.is_some() {
        return Err("backing file specified, but streaming the entire chain".into());
    }
    // The job works on the image under any filters over it; a filter
    // between it and the base would hide the data below it from the copy.
    let bs = bs.skip_filters();
    let mut iter = bs.filter_or_cow();
    while let Some(n) = iter {
        if end.as_ref().is_some_and(|e| Arc::ptr_eq(e, &n)) {
            break;
        }
        if n.driver().is_filter() {
            return Err(format!(
                "Cannot stream through the filter node '{}'",
                n.name()
            ));
        }
        iter = n.filter_or_cow();
    }
    // QEMU: stream_start.
    let (base_overlay, above_base) = match bottom {
        Some(b) => (Arc::clone(&b), b),
        None => {
            let overlay = bs.find_overlay(base.as_ref()).ok_or_else(|| {
                let base_name = base.as_ref().map_or("", |b| b.name());
                format!(
                    "'{base_name}' is not in the backing chain of '{}'",
                    bs.name()
                )
            })?;
            // Between the overlay and the base there can only be filters.
            let mut above = Arc::clone(&overlay);
            let is_base = |n: &Option<Arc<Node>>| match (n, &base) {
                (Some(n), Some(b)) => Arc::ptr_eq(n, b),
                (None, None) => true,
                _ => false,
            };
            if !is_base(&above.backing()) {
                if let Some(b) = above.backing() {
                    above = b;
                    while !is_base(&above.primary_child()) {
                        match above.primary_child() {
                            Some(c) => above = c,
                            None => break,
                        }
                    }
                }
            }
            (overlay, above)
        }
    };
    // The image is written to: made writable for the job if it is not.
    let bs_read_only = bs.is_read_only();
    if bs_read_only {
        bs.reopen_read_only(false)
            .await
            .map_err(|e| e.to_string())?;
    }
    let filter = match insert_filter(
        graph,
        registry,
        &bs,
        &base_overlay,
        a.filter_node_name.as_deref(),
    )
    .await
    {
        Ok(f) => f,
        Err(e) => {
            if bs_read_only {
                let _ = bs.reopen_read_only(true).await;
            }
            return Err(e);
        }
    };
    let id = a.job_id.clone().unwrap_or_default();
    let desc = format!("stream job '{id}'");
    // The filter holds the chain down to the lowest image copied in place
    // (QEMU: the copy-on-read filter's bottom freeze).
    let frozen = filter.freeze_chain(Some(&base_overlay));
    let stream = Arc::new(StreamState {
        blk: Mutex::new(None),
        filter: Mutex::new(Some(Arc::clone(&filter))),
        frozen: Mutex::new(Some(frozen)),
        target: Arc::clone(&bs),
        base_overlay,
        above_base: Arc::clone(&above_base),
        backing_file: a.backing_file.clone(),
        mask_protocol: a.backing_mask_protocol,
        on_error,
        bs_read_only,
        holds: Holds::new("stream"),
    });
    let opts = JobOptions {
        auto_finalize: a.auto_finalize.unwrap_or(true),
        auto_dismiss: a.auto_dismiss.unwrap_or(true),
        speed: 0,
    };
    let job = match list.create(&id, Box::new(Stream(Arc::clone(&stream))), bs.home(), opts) {
        Ok(job) => job,
        Err(e) => {
            stream.teardown().await;
            return Err(e);
        }
    };
    // From here on a failure shows the job created and gone (QEMU:
    // job_early_fail), its holds given back by its clean and free.
    let held = job
        .set_speed(a.speed.unwrap_or(0))
        .and_then(|_| stream.take_holds(&filter, &bs, &above_base, &desc));
    if let Err(e) = held {
        job.early_fail().await;
        return Err(e);
    }
    list.start(&job);
    job.settle(0).await;
    Ok(())
}

/// Puts a copy-on-read filter over `bs` in the graph (QEMU:
/// bdrv_insert_node): every user of `bs` reads through it from now on.
async fn insert_filter(
    graph: &Arc<Graph>,
    registry: &Arc<Registry>,
    bs: &Arc<Node>,
    base_overlay: &Arc<Node>,
    node_name: Option<&str>,
) -> Result<Arc<Node>, String> {
    let mut opts = Opts::new();
    opts.insert("driver".into(), "copy-on-read".into());
    opts.insert("file".into(), bs.name().into());
    opts.insert("bottom".into(), base_overlay.name().into());
    if let Some(n) = node_name {
        opts.insert("node-name".into(), n.into());
    }
    opts.insert("read-only".into(), Value::Bool(false));
    let ctx = OpenCtx::with_graph(
        Arc::clone(registry),
        OpenFlags::default(),
        Arc::clone(graph),
    );
    let filter = ctx
        .open_image(None, None, opts)
        .await
        .map_err(|e| format!("Could not create node: {e}"))?;
    let placed = match strata_block::perm::check_attached(&filter) {
        Ok(()) => replace_node(bs, &filter).await,
        Err(e) => Err(e),
    };
    if let Err(e) = placed {
        let _ = filter.close().await;
        return Err(e.to_string());
    }
    Ok(filter)
}

/// The stream job's driver: its state, shared with the command that sets
/// it up.
struct Stream(Arc<StreamState>);

/// A running stream job (QEMU: StreamBlockJob).
struct StreamState {
    /// The job's reads, through the filter, so they copy (QEMU: s->blk).
    blk: Mutex<Option<Arc<Backend>>>,
    /// The copy-on-read filter while it is in the graph.
    filter: Mutex<Option<Arc<Node>>>,
    /// The links the filter holds in place, while it is in the graph.
    frozen: Mutex<Option<FrozenChain>>,
    /// The image streamed into.
    target: Arc<Node>,
    /// The lowest image whose data is copied (QEMU: base_overlay).
    base_overlay: Arc<Node>,
    /// The node right above the base (QEMU: above_base).
    above_base: Arc<Node>,
    backing_file: Option<String>,
    mask_protocol: bool,
    on_error: OnError,
    /// The image was reopened read-write for the job: read-only again after.
    bs_read_only: bool,
    /// The job's holds on nodes, until the job is dismissed.
    holds: Holds,
}

impl StreamState {
    /// Takes the job's handles, as QEMU's stream_start does: the filter
    /// (main node), a reading handle on it, the image (no writes of others
    /// to it are refused, only resizing) and every node down to the base
    /// (no writes, no resizing: the job reads each block of them once).
    fn take_holds(
        &self,
        filter: &Arc<Node>,
        bs: &Arc<Node>,
        above_base: &Arc<Node>,
        desc: &str,
    ) -> Result<(), String> {
        let basic = Perm::CONSISTENT_READ.with(Perm::WRITE_UNCHANGED);
        self.holds
            .hold(filter, desc, "main node", Perm::NONE, Perm::ALL)?;
        let blk = Backend::new(filter, desc, Perm::CONSISTENT_READ, basic.with(Perm::WRITE))
            .map_err(|e| e.to_string())?;
        *self.blk.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(blk));
        self.holds
            .hold(bs, desc, "active node", Perm::NONE, basic.with(Perm::WRITE))?;
        let base = above_base.filter_or_cow();
        let mut iter = bs.filter_or_cow();
        while let Some(n) = iter {
            if base.as_ref().is_some_and(|b| Arc::ptr_eq(b, &n)) {
                break;
            }
            self.holds
                .hold(&n, desc, "intermediate node", Perm::NONE, basic)?;
            iter = n.filter_or_cow();
        }
        Ok(())
    }

    /// Takes the filter out: its users read the image again (QEMU:
    /// bdrv_cor_filter_drop).
    async fn drop_filter(&self) {
        drop(self.frozen.lock().unwrap_or_else(|e| e.into_inner()).take());
        let filter = self.filter.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = filter {
            if let Err(e) = f.drop_filter().await {
                error_report(format!("Failed to drop the copy-on-read filter: {e}"));
            }
            let _ = f.close().await;
        }
    }

    /// Undoes a job that never started.
    async fn teardown(&self) {
        self.clean().await;
        self.holds.release().await;
    }

    /// One step: how much from `offset` (at most `want` bytes) the job
    /// looks at, and whether it must copy it (QEMU: the body of stream_run).
    async fn step(
        &self,
        top: &Arc<Node>,
        below_base: Option<&Arc<Node>>,
        offset: u64,
        want: u64,
        len: u64,
    ) -> strata_block::Result<(u64, bool)> {
        let st = top.block_status(offset, want).await?;
        if st.allocated {
            return Ok((st.len, false));
        }
        let Some(cow) = top.backing() else {
            return Ok((st.len, false));
        };
        let (above, _) = cow.block_status_above(below_base, offset, st.len).await?;
        if above.len == 0 {
            // The backing files end here.
            return Ok((len - offset, false));
        }
        Ok((above.len, above.allocated))
    }
}

#[async_trait]
impl JobDriver for Stream {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    async fn run(&self, job: &Arc<Job>) -> Result<(), JobError> {
        self.0.run(job).await
    }

    async fn prepare(&self, _job: &Arc<Job>) -> Result<(), JobError> {
        self.0.prepare().await
    }

    async fn clean(&self, _job: &Arc<Job>) {
        self.0.clean().await;
    }

    async fn free(&self) {
        self.0.holds.release().await;
    }
}

impl StreamState {
    async fn run(&self, job: &Arc<Job>) -> Result<(), JobError> {
        let top = self.target.skip_filters();
        if Arc::ptr_eq(&top, &self.base_overlay) {
            // Nothing to stream.
            return Ok(());
        }
        let Some(blk) = self.blk.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let len = self.target.length();
        job.progress_set_remaining(len);
        let below_base = self.base_overlay.filter_or_cow();
        let on_error = self.on_error;
        // An ignored error still keeps the backing file: it is returned.
        copy_chunks(
            job,
            len,
            STREAM_CHUNK,
            |offset, want| Box::pin(self.step(&top, below_base.as_ref(), offset, want, len)),
            |offset, n| {
                let blk = &blk;
                Box::pin(async move {
                    // Read through the filter: what is read is copied up.
                    blk.read(offset, IoBuf::zeroed(n as usize))
                        .await
                        .map(|_| ())
                        .map_err(|e| (true, e))
                })
            },
            |is_read, e| match job.error_action(on_error, is_read, e.code()) {
                ErrorAction::Stop => Failed::Retry,
                ErrorAction::Report => Failed::Fail(e.into()),
                ErrorAction::Ignore => Failed::Skip(e.into()),
            },
        )
        .await
    }

    async fn prepare(&self) -> Result<(), JobError> {
        let top = self.target.skip_filters();
        let cow = top.backing();
        // The filter holds the chain: it goes first.
        self.drop_filter().await;
        let Some(_) = cow else {
            return Ok(());
        };
        let base = self.above_base.filter_or_cow();
        let named = base.as_ref().map(|b| {
            let b = b.skip_filters();
            let id = self
                .backing_file
                .clone()
                .unwrap_or_else(|| b.filename().to_string());
            (id, b.format_for_overlay(self.mask_protocol).to_string())
        });
        let nodes = top.component();
        let set = drained_async(&nodes, || top.set_backing(base.clone())).await;
        let changed = match &named {
            Some((id, fmt)) => top.change_backing_file(Some(id), Some(fmt), false).await,
            None => top.change_backing_file(None, None, false).await,
        };
        if let Err(e) = set {
            error_report(e.to_string());
            return Err(JobError::errno(libc::EPERM));
        }
        changed.map_err(JobError::from)
    }

    async fn clean(&self) {
        self.drop_filter().await;
        let blk = self.blk.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(b) = blk {
            let _ = b.close().await;
        }
        if self.bs_read_only {
            // Its write permissions are gone with the handle above.
            let _ = self.target.reopen_read_only(true).await;
        }
    }
}
