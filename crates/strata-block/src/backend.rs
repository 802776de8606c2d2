//! The user handle (QEMU: BlockBackend): what a tool, an export or a job
//! holds on a node, with the permissions it takes and shares, and the only
//! way to do I/O from above the graph. Its root can be swapped under it
//! (`replace_node`): a request waits at the drained gate and then goes to
//! whichever node is the root once the swap is done.

use crate::buf::IoBuf;
use crate::driver::{Perm, Preallocation, WriteFlags};
use crate::error::{err, Result};
use crate::node::Node;
use crate::perm::User;
use crate::status::BlockStatus;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

/// A user of a node (QEMU: BlockBackend).
pub struct Backend {
    link: Arc<BackendLink>,
    closed: std::sync::atomic::AtomicBool,
}

/// What a node knows of a backend on it: enough to name it in permission
/// errors and to move it to another node.
pub(crate) struct BackendLink {
    desc: String,
    /// For a job's hold on a node, the name of the hold (QEMU: the job's
    /// child, `main node`, `base`); None for a user of the disk.
    job_role: Option<String>,
    perm: Perm,
    shared: Perm,
    root: RwLock<Arc<Node>>,
}

impl BackendLink {
    pub(crate) fn user(&self) -> User {
        User {
            desc: self.desc.clone(),
            role: self.job_role.clone().unwrap_or_else(|| "root".into()),
            perm: self.perm,
            shared: self.shared,
        }
    }
    /// A job's hold rather than a user of the disk.
    pub(crate) fn is_job(&self) -> bool {
        self.job_role.is_some()
    }
    pub(crate) fn root(&self) -> Arc<Node> {
        Arc::clone(&self.root.read().unwrap_or_else(|p| p.into_inner()))
    }
    pub(crate) fn set_root(&self, node: Arc<Node>) {
        *self.root.write().unwrap_or_else(|p| p.into_inner()) = node;
    }
}

impl Backend {
    /// Starts using `node`, taking `perm` and sharing `shared` (QEMU:
    /// blk_new + blk_insert_bs). `desc` names the user in permission errors
    /// as QEMU does: `block device 'ID'`, or `an unnamed block device`.
    /// Fails, with nothing changed, when another user does not share what
    /// this one takes or takes what it does not share.
    pub fn new(node: &Arc<Node>, desc: &str, perm: Perm, shared: Perm) -> Result<Backend> {
        Backend::with_role(node, desc, None, perm, shared)
    }

    /// A block job's hold on `node`, named `role` (QEMU:
    /// block_job_add_bdrv): a node so held is no root of the graph.
    pub fn job_hold(
        node: &Arc<Node>,
        desc: &str,
        role: &str,
        perm: Perm,
        shared: Perm,
    ) -> Result<Backend> {
        Backend::with_role(node, desc, Some(role.to_string()), perm, shared)
    }

    fn with_role(
        node: &Arc<Node>,
        desc: &str,
        job_role: Option<String>,
        perm: Perm,
        shared: Perm,
    ) -> Result<Backend> {
        let link = Arc::new(BackendLink {
            desc: desc.to_string(),
            job_role,
            perm,
            shared,
            root: RwLock::new(Arc::clone(node)),
        });
        crate::perm::check_new_user(node, link.user())?;
        node.add_ref();
        node.add_backend(&link);
        Ok(Backend {
            link,
            closed: Default::default(),
        })
    }

    /// The node this backend uses now.
    pub fn node(&self) -> Arc<Node> {
        self.link.root()
    }

    /// What this backend takes.
    pub fn perm(&self) -> Perm {
        self.link.perm
    }

    /// The root for a new request: after any drained section that holds
    /// the root back, the root as it is then (it may have been replaced).
    async fn root_for_request(&self) -> Arc<Node> {
        loop {
            if let Some(n) = self.root_if_open() {
                return n;
            }
            self.link.root().pass_user_gate().await;
        }
    }

    /// The root, if no drained section holds requests back. A swap happens
    /// only behind a closed gate, so with the gate open this is the root
    /// the request will run on (it registers before it first yields).
    fn root_if_open(&self) -> Option<Arc<Node>> {
        let n = self.link.root();
        (!n.user_gate_closed()).then_some(n)
    }

    fn need(&self, p: Perm) -> Result<()> {
        if self.link.perm.contains(p) {
            Ok(())
        } else {
            err(libc::EPERM)
        }
    }

    /// Length of the disk in bytes.
    pub fn length(&self) -> u64 {
        self.link.root().length()
    }

    /// Runs one request that changes the disk to its end, whether or not
    /// the caller still waits for it: a request's tracking and in-flight guards go when its I/O is
    /// done, never because a caller gave up on it. It starts at once, in
    /// the caller's task (no extra hop); only if the caller drops it half
    /// way does the rest go on as a task of its own.
    async fn complete<T, F>(&self, req: impl FnOnce(Arc<Node>) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let node = match self.root_if_open() {
            Some(n) => n,
            None => self.root_for_request().await,
        };
        RunToEnd {
            fut: Some(Box::pin(req(Arc::clone(&node)))),
            node,
        }
        .await
    }

    /// Reads `buf.len()` bytes at `offset`. A read the caller drops half
    /// way may end early: what it still has in flight only fills a buffer
    /// the engine keeps until completion, so nothing needs to run on.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let node = match self.root_if_open() {
            Some(n) => n,
            None => self.root_for_request().await,
        };
        node.read(offset, buf).await
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.need(Perm::WRITE)?;
        self.complete(|n| async move { n.write(offset, buf, flags).await })
            .await
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.need(Perm::WRITE)?;
        self.complete(|n| async move { n.write_zeroes(offset, len, flags).await })
            .await
    }

    /// Discards `len` bytes at `offset`.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.need(Perm::WRITE)?;
        self.complete(|n| async move { n.discard(offset, len).await })
            .await
    }

    /// Writes whole clusters compressed.
    pub async fn write_compressed(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.need(Perm::WRITE)?;
        self.complete(|n| async move { n.write_compressed(offset, buf).await })
            .await
    }

    /// Saves VM state at `pos` (QEMU: blk_save_vmstate).
    pub async fn save_vmstate(&self, pos: u64, buf: IoBuf) -> Result<IoBuf> {
        self.need(Perm::WRITE)?;
        self.complete(|n| async move { n.save_vmstate(pos, buf).await })
            .await
    }

    /// Loads VM state at `pos` (QEMU: blk_load_vmstate).
    pub async fn load_vmstate(&self, pos: u64, buf: IoBuf) -> Result<IoBuf> {
        self.root_for_request().await.load_vmstate(pos, buf).await
    }

    /// Makes completed writes stable.
    pub async fn flush(&self) -> Result<()> {
        self.complete(|n| async move { n.flush().await }).await
    }

    /// Changes the disk's length.
    pub async fn truncate(&self, size: u64, exact: bool, prealloc: Preallocation) -> Result<()> {
        self.need(Perm::RESIZE)?;
        self.complete(|n| async move { n.truncate(size, exact, prealloc).await })
            .await
    }

    /// What is at `offset`: at most `len` bytes of one kind.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.root_for_request()
            .await
            .block_status(offset, len)
            .await
    }

    /// What is at `offset` through the whole backing chain, with the depth
    /// of the layer that answers (QEMU: blk_co_block_status_above to the
    /// bottom; 0 is the root).
    pub async fn block_status_above(&self, offset: u64, len: u64) -> Result<(BlockStatus, usize)> {
        self.root_for_request()
            .await
            .block_status_above(None, offset, len)
            .await
    }

    /// Stops using the node: its permissions are released and its
    /// reference dropped (the node closes if this was its last user).
    pub async fn close(&self) -> Result<()> {
        if self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Ok(());
        }
        let node = self.link.root();
        node.remove_backend(&self.link);
        node.close().await
    }
}

/// A request future that, dropped before its end, finishes on its own.
struct RunToEnd<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    fut: Option<Pin<Box<F>>>,
    /// Where the rest runs if the caller gives up (its home loop).
    node: Arc<Node>,
}

impl<F: Future + Send + 'static> Future for RunToEnd<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(fut) = self.fut.as_mut() else {
            return Poll::Pending;
        };
        let out = fut.as_mut().poll(cx);
        if out.is_ready() {
            self.fut = None;
        }
        out
    }
}

impl<F: Future + Send + 'static> Drop for RunToEnd<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else {
            return;
        };
        let rest = async move {
            let _ = fut.await;
        };
        match &self.node.home() {
            Some(h) => drop(h.spawn(rest)),
            None => {
                // Outside any runtime nothing can run it: it is cancelled.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    drop(rt.spawn(rest));
                }
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // A backend dropped without close still gives its permissions back.
        self.link.root().remove_backend(&self.link);
    }
}
