//! Drained sections (QEMU: bdrv_drained_begin/end): new requests wait at
//! a gate while the ones in flight finish, so the graph can change under
//! no request; moving nodes between event loops is done drained.

use super::Node;
use crate::event_loop::LoopHandle;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Node {
    /// Moves this node, and every node connected to it, to `to` (None: the
    /// main loop), drained (QEMU: bdrv_try_change_aio_context): requests in
    /// flight finish first, and new ones wait until the move is done.
    pub async fn move_to(self: &Arc<Self>, to: Option<LoopHandle>) {
        let nodes = self.component();
        drained(&nodes, || {
            for n in &nodes {
                *n.home.lock().unwrap_or_else(|p| p.into_inner()) = to.clone();
            }
        })
        .await
    }

    /// Waits while a drained section holds new requests back.
    pub(crate) async fn pass_gate(&self) {
        // Open (the usual case): no waiting state in the request's future.
        if self.gate.load(Ordering::Acquire) > 0 {
            Box::pin(self.wait_gates(false)).await
        }
    }

    /// Waits, for a request from a user handle, while a drained section
    /// holds this node's users back (its own gate, or the user gate of a
    /// node that also has parents).
    pub(crate) async fn pass_user_gate(&self) {
        self.wait_gates(true).await
    }

    /// True while a drained section holds this node's user handles back.
    pub(crate) fn user_gate_closed(&self) -> bool {
        self.gate.load(Ordering::Acquire) > 0 || self.user_gate.load(Ordering::Acquire) > 0
    }

    async fn wait_gates(&self, user: bool) {
        let closed = || {
            self.gate.load(Ordering::Acquire) > 0
                || (user && self.user_gate.load(Ordering::Acquire) > 0)
        };
        while closed() {
            let open = self.gate_open.notified();
            tokio::pin!(open);
            open.as_mut().enable();
            if !closed() {
                return;
            }
            open.await;
        }
    }
}

/// Runs `f` with `nodes` drained (QEMU: bdrv_drained_begin/end): new
/// requests from the users of the topmost nodes wait, and every request in
/// flight finishes, before `f` runs. Requests that in-flight ones make to
/// children are not held, so a drain never waits for itself.
pub async fn drained<R>(nodes: &[Arc<Node>], f: impl FnOnce() -> R) -> R {
    drained_async(nodes, || async move { f() }).await
}

/// [`drained`] for work that itself does I/O below the drained nodes
/// (writing caches back): `f`'s future runs inside the section.
pub async fn drained_async<R, F: std::future::Future<Output = R>>(
    nodes: &[Arc<Node>],
    f: impl FnOnce() -> F,
) -> R {
    let _section = drain_begin(nodes).await;
    f().await
}

/// [`drained_async`] for work that gives the nodes `adopting` a parent (a
/// new child edge) and then does I/O through it: see
/// [`drain_begin_adopting`].
pub async fn drained_async_adopting<R, F: std::future::Future<Output = R>>(
    nodes: &[Arc<Node>],
    adopting: &[Arc<Node>],
    f: impl FnOnce() -> F,
) -> R {
    let _section = drain_begin_adopting(nodes, adopting).await;
    f().await
}

/// A drained section that lasts until this is dropped (QEMU: a
/// bdrv_drained_begin whose end comes later, as a mirror job holds its
/// source drained from its last check until the graph has changed).
pub struct DrainGuard {
    tops: Vec<Arc<Node>>,
    used: Vec<Arc<Node>>,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        for n in &self.tops {
            n.gate.fetch_sub(1, Ordering::AcqRel);
            n.gate_open.notify_waiters();
        }
        for n in &self.used {
            n.user_gate.fetch_sub(1, Ordering::AcqRel);
            n.gate_open.notify_waiters();
        }
    }
}

/// Begins a drained section over `nodes` (see [`drained`]); it ends when
/// the guard goes, also if the caller is dropped mid-drain.
pub async fn drain_begin(nodes: &[Arc<Node>]) -> DrainGuard {
    drain_begin_adopting(nodes, &[]).await
}

/// As [`drain_begin`], for a section in which the nodes `adopting` get a
/// parent (a reopen's new `file`, or the old one back on an undo): they
/// hold back only their users, as nodes with parents do, so that the new
/// parent's requests (its image read again from the new file) go on.
pub async fn drain_begin_adopting(nodes: &[Arc<Node>], adopting: &[Arc<Node>]) -> DrainGuard {
    let has_parent =
        |n: &Arc<Node>| !n.lock_parents().is_empty() || adopting.iter().any(|a| Arc::ptr_eq(a, n));
    let tops: Vec<Arc<Node>> = nodes.iter().filter(|n| !has_parent(n)).cloned().collect();
    // User handles on nodes that also have parents wait at their own gate:
    // the parents' requests to such a node must go on, or the drain would
    // wait for itself.
    let used: Vec<Arc<Node>> = nodes.iter().filter(|n| has_parent(n)).cloned().collect();
    for n in &used {
        n.user_gate.fetch_add(1, Ordering::AcqRel);
    }
    for n in &tops {
        n.gate.fetch_add(1, Ordering::AcqRel);
    }
    let guard = DrainGuard { tops, used };
    for n in nodes {
        n.tracker.wait_idle().await;
    }
    guard
}
