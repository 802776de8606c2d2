//! Reopening open nodes with a new set of options, all or nothing (QEMU:
//! qmp_blockdev_reopen, bdrv_reopen_multiple, bdrv_reopen_prepare).
//!
//! Each node given is queued with the children that are its own (opened
//! with it, held by it alone), which take their options from the parent's
//! (`file: {...}`), or keep theirs when the parent names them. Every entry
//! is checked before anything changes, in QEMU's order, so the first error
//! is QEMU's: the options every node takes, the options that may not be left
//! out, the backing file, the file, then every other option, which must keep
//! its value. Then, with the nodes drained, the children change (each swap
//! checked for permissions), files switch O_DIRECT on or off, the nodes
//! switch between read-only and read-write, and the options every node
//! takes get their new values; a failure undoes what was done, newest
//! first.

use crate::driver::ChildRole;
use crate::error::{Error, Result};
use crate::filename::own_options;
use crate::graph::Graph;
use crate::node::{
    check_detect_zeroes, drained_async_adopting, parse_discard, replace_child_edge, DetectZeroes,
    Node,
};
use crate::options::{take_bool, Opts};
use serde_json::Value;
use std::sync::Arc;

/// The options every node takes, which the reopen itself handles: they may
/// be left out (QEMU: bdrv_reset_options_allowed's common options).
const COMMON: &[&str] = &[
    "node-name",
    "discard",
    "cache.direct",
    "cache.no-flush",
    "read-only",
    "auto-read-only",
    "detect-zeroes",
];

/// A node and the options it is reopened with (QEMU: BlockReopenQueueEntry).
struct Queued {
    node: Arc<Node>,
    opts: Opts,
    /// What the parent passes down when the options do not say: read-only,
    /// cache.direct, cache.no-flush (QEMU: inherit_options).
    inherited: Option<(bool, bool, bool)>,
    /// The node keeps its options (named as it is by its parent): leaving
    /// its backing file out is no error then.
    keep_old: bool,
}

/// What a child edge becomes.
enum NewChild {
    Keep,
    To(Option<Arc<Node>>),
}

/// One node's reopen, checked (QEMU: BDRVReopenState).
struct Prepared {
    node: Arc<Node>,
    own: Opts,
    read_only: bool,
    unmap: bool,
    detect_zeroes: DetectZeroes,
    no_flush: bool,
    direct: bool,
    /// The driver's own options (`reopen_takes`), new and as they were.
    driver_opts: Opts,
    old_driver_opts: Opts,
    backing: NewChild,
    file: NewChild,
}

/// Reopens each node named by the `node-name` of an entry of `list` with
/// the entry's options (already checked against `BlockdevOptions`).
pub async fn reopen_multiple(graph: &Graph, list: Vec<Opts>) -> Result<()> {
    let mut queue = Vec::new();
    for opts in list {
        let Some(name) = opts.get("node-name").and_then(Value::as_str) else {
            return Err(Error::invalid("node-name not specified"));
        };
        let node = graph.find_node(name)?;
        enqueue(&mut queue, node, opts, None, false);
    }
    let mut prepared = Vec::new();
    for q in queue {
        prepared.push(prepare(graph, q)?);
    }
    commit(prepared).await
}

/// The option at a dotted key, nested as the options are (`children.0`
/// is `children` then `0`).
fn child_value<'a>(opts: &'a Opts, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut v = opts.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

/// A child that belongs to its parent alone: its options come from the
/// parent's (QEMU: inherits_from).
fn is_own(child: &Node) -> bool {
    child.ref_count() == 1
}

/// Queues `node` with `opts`, then its own children (QEMU:
/// bdrv_reopen_queue_child): a child given as options takes them, a child
/// named as it is keeps its own, and so do those below it (`keep_old`);
/// any other child left out is reopened with none. A node queued already
/// keeps its place, and what it was given before fills in what `opts`
/// leaves out.
fn enqueue(
    queue: &mut Vec<Queued>,
    node: Arc<Node>,
    opts: Opts,
    inherited: Option<(bool, bool, bool)>,
    keep_old: bool,
) {
    let at = queue.iter().position(|q| Arc::ptr_eq(&q.node, &node));
    let opts = match at {
        Some(i) => joined(opts, &queue[i].opts),
        None => opts,
    };
    let flag = |k: &str, dflt: bool| {
        child_value(&opts, k)
            .and_then(Value::as_bool)
            .unwrap_or(dflt)
    };
    let parent = inherited.unwrap_or_default();
    let passed = (
        flag("read-only", parent.0),
        flag("cache.direct", parent.1),
        flag("cache.no-flush", parent.2),
    );
    let mut children = Vec::new();
    for c in node.children() {
        if !is_own(&c.node) {
            continue;
        }
        // What it was given stays, read-only included when it was given.
        let old = || c.node.naming().own_options().unwrap_or_default();
        let (child_opts, keep) = match child_value(&opts, &c.role.name()) {
            Some(Value::Object(o)) => (o.clone(), false),
            Some(Value::String(s)) if s == c.node.name() => (old(), true),
            Some(_) => continue,
            None if keep_old => (old(), true),
            None => (Opts::new(), false),
        };
        // Backing files are read-only unless their options say otherwise.
        let pass = match c.role {
            ChildRole::Backing => (true, passed.1, passed.2),
            _ => passed,
        };
        children.push((Arc::clone(&c.node), child_opts, pass, keep));
    }
    let entry = Queued {
        node,
        opts,
        inherited,
        keep_old,
    };
    match at {
        Some(i) => queue[i] = entry,
        None => queue.push(entry),
    }
    for (child, o, pass, keep) in children {
        enqueue(queue, child, o, Some(pass), keep);
    }
}

/// `new` with what `old` has and `new` leaves out, key by key down the
/// nested options (QEMU: bdrv_join_options on the flattened dictionaries).
fn joined(mut new: Opts, old: &Opts) -> Opts {
    for (k, v) in old {
        match (new.get_mut(k), v) {
            (None, _) => {
                new.insert(k.clone(), v.clone());
            }
            (Some(Value::Object(n)), Value::Object(o)) => {
                *n = joined(std::mem::take(n), o);
            }
            _ => {}
        }
    }
    new
}

/// Checks one entry in QEMU's order and works out what it changes.
fn prepare(graph: &Graph, q: Queued) -> Result<Prepared> {
    let node = q.node;
    let old = node.naming().own_options().unwrap_or_default();
    let mut opts = q.opts;
    let backing_v = opts.remove("backing");
    let file_v = opts.remove("file");
    // Children of other roles may only be named as they are.
    for c in node.children() {
        if matches!(c.role, ChildRole::Backing | ChildRole::File) {
            continue;
        }
        match opts.remove(&c.role.name()) {
            None => {}
            Some(Value::String(s)) if s == c.node.name() => {}
            Some(Value::Object(_)) if is_own(&c.node) => {}
            Some(_) => {
                return Err(Error::invalid(format!(
                    "Cannot change the option '{}'",
                    c.role.name()
                )))
            }
        }
    }
    let given = own_options(&opts, None);
    let mut new = given.clone();
    let (ro_dflt, direct_dflt, no_flush_dflt) = q.inherited.unwrap_or_default();
    let read_only = take_bool(&mut new, "read-only")?.unwrap_or(ro_dflt);
    let _ = new.remove("auto-read-only");
    let unmap = match new.remove("discard") {
        None => node.unmap(),
        Some(v) => parse_discard(v.as_str().unwrap_or_default())?,
    };
    let detect_zeroes = match new.remove("detect-zeroes") {
        None => DetectZeroes::Off,
        Some(v) => DetectZeroes::parse(v.as_str().unwrap_or_default())?,
    };
    check_detect_zeroes(detect_zeroes, unmap)?;
    let direct = take_bool(&mut new, "cache.direct")?.unwrap_or(direct_dflt);
    let no_flush = take_bool(&mut new, "cache.no-flush")?.unwrap_or(no_flush_dflt);
    if let Some(n) = new.remove("node-name") {
        if n.as_str() != Some(node.name()) {
            return Err(cannot_change("node-name"));
        }
    }
    if !node.is_active() {
        return Err(Error::invalid(format!(
            "Node '{}' is inactive: it cannot be reopened",
            node.name()
        )));
    }
    if !node.driver().reopen_supported() {
        return Err(Error::invalid(format!(
            "Block format '{}' used by node '{}' does not support reopening files",
            node.format_name(),
            node.name()
        )));
    }
    // Options set before may be left out only where they can go back to
    // their defaults.
    let takes = node.driver().reopen_takes();
    let taken = |k: &str| {
        takes
            .iter()
            .any(|t| k == *t || k.starts_with(&format!("{t}.")))
    };
    for k in old.keys() {
        if !given.contains_key(k) && !COMMON.contains(&k.as_str()) && !taken(k) {
            return Err(Error::invalid(format!(
                "Option '{k}' cannot be reset to its default value"
            )));
        }
    }
    let driver_only = |o: &Opts| -> Opts {
        o.iter()
            .filter(|(k, _)| taken(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let driver_opts = driver_only(&new);
    node.driver().reopen_check(&driver_opts)?;
    new.retain(|k, _| !taken(k));
    let drv = node.driver();
    if drv.supports_backing()
        && !q.keep_old
        && backing_v.is_none()
        && (node.backing().is_some() || drv.backing_file().is_some())
    {
        return Err(Error::invalid(format!(
            "backing is missing for '{}'",
            node.name()
        )));
    }
    let backing = new_child(graph, &node, ChildRole::Backing, backing_v)?;
    let file = new_child(graph, &node, ChildRole::File, file_v)?;
    // Everything else must stay as it is.
    for (k, v) in &new {
        if old.get(k) != Some(v) {
            return Err(cannot_change(k));
        }
    }
    Ok(Prepared {
        node,
        own: given,
        read_only,
        unmap,
        detect_zeroes,
        no_flush,
        direct,
        driver_opts,
        old_driver_opts: driver_only(&old),
        backing,
        file,
    })
}

fn cannot_change(k: &str) -> Error {
    Error::invalid(format!("Cannot change the option '{k}'"))
}

/// What the `backing` or `file` option makes of that child (QEMU:
/// bdrv_reopen_parse_file_or_backing): options or the current child keep
/// it, another node's name replaces it, null drops a backing file.
fn new_child(
    graph: &Graph,
    node: &Arc<Node>,
    role: ChildRole,
    v: Option<Value>,
) -> Result<NewChild> {
    let old = node.child(role);
    let new = match v {
        None => return Ok(NewChild::Keep),
        Some(Value::Object(o)) => {
            return match &old {
                Some(c) if is_own(c) => Ok(NewChild::Keep),
                // Options for a child that is not the node's own.
                _ => Err(cannot_change(&match o.keys().next() {
                    Some(k) => format!("{}.{k}", role.name()),
                    None => role.name(),
                })),
            };
        }
        Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let n = graph.find(&s).ok_or_else(|| {
                Error::invalid(format!("Cannot find device='' nor node-name='{s}'"))
            })?;
            if n.reaches(node) {
                return Err(Error::invalid(format!(
                    "Making '{s}' a {} child of '{}' would create a cycle",
                    role.name(),
                    node.name()
                )));
            }
            Some(n)
        }
        Some(_) => return Err(cannot_change(&role.name())),
    };
    let same = match (&old, &new) {
        (Some(o), Some(n)) => Arc::ptr_eq(o, n),
        (None, None) => true,
        _ => false,
    };
    if same {
        return Ok(NewChild::Keep);
    }
    if old
        .as_ref()
        .is_some_and(|o| o.naming().own_options().is_none())
    {
        return Err(Error::invalid(format!(
            "Cannot replace implicit {} child of {}",
            role.name(),
            node.name()
        )));
    }
    if role == ChildRole::File && new.is_none() {
        return Err(cannot_change("file"));
    }
    node.check_unfrozen(role)?;
    Ok(NewChild::To(new))
}

/// A change made, and how to undo it.
enum Done {
    Backing(Arc<Node>, Option<Arc<Node>>),
    File(Arc<Node>, Arc<Node>, Arc<Node>),
    Mode(Arc<Node>, bool),
    Direct(Arc<Node>, bool),
    /// The driver's options as they were.
    Options(Arc<Node>, Opts),
}

/// Makes every change, drained, undoing them all when one fails.
async fn commit(prepared: Vec<Prepared>) -> Result<()> {
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    for p in &prepared {
        let mut more = p.node.component();
        for c in [&p.backing, &p.file] {
            if let NewChild::To(Some(n)) = c {
                more.extend(n.component());
            }
        }
        for n in more {
            if !nodes.iter().any(|m| Arc::ptr_eq(m, &n)) {
                nodes.push(n);
            }
        }
    }
    // Persistent bitmaps are stored while the image is still writable.
    for p in &prepared {
        if p.read_only && !p.node.is_read_only() {
            p.node.store_bitmaps().await;
        }
    }
    let mut done: Vec<Done> = Vec::new();
    // A qcow2 image is read again from its new file (or its old one, on an
    // undo) inside the section.
    let mut files = Vec::new();
    for p in &prepared {
        if let (NewChild::To(Some(n)), Some(old)) = (&p.file, p.node.child(ChildRole::File)) {
            files.extend([Arc::clone(n), old]);
        }
    }
    let r = drained_async_adopting(&nodes, &files, || apply(&prepared, &mut done)).await;
    if let Err(e) = r {
        drained_async_adopting(&nodes, &files, || undo(&mut done)).await;
        return Err(e);
    }
    for d in done {
        // The references held for an undo go; an old child no one else
        // uses closes here.
        match d {
            Done::Backing(_, Some(old)) | Done::File(_, old, _) => {
                let _ = old.close().await;
            }
            _ => {}
        }
    }
    for p in prepared {
        p.node
            .set_common_options(p.unmap, p.detect_zeroes, p.no_flush);
        p.node.naming().set_own_options(p.own);
        p.node.refresh_identity();
    }
    Ok(())
}

async fn apply(prepared: &[Prepared], done: &mut Vec<Done>) -> Result<()> {
    for p in prepared {
        if let NewChild::To(new) = &p.backing {
            let old = p.node.backing();
            if let Some(o) = &old {
                o.add_ref();
            }
            done.push(Done::Backing(Arc::clone(&p.node), old));
            p.node.set_backing(new.clone()).await?;
            crate::perm::check_attached(&p.node)?;
        }
        if let NewChild::To(Some(new)) = &p.file {
            let Some(old) = p.node.child(ChildRole::File) else {
                continue;
            };
            crate::perm::check_moved(&old, new, &[(Arc::clone(&p.node), ChildRole::File)], false)?;
            // What the driver caches of its image goes to the old file, and
            // is read again from the new one.
            p.node.driver().release_file().await?;
            old.add_ref();
            if let Err(e) = replace_child_edge(&p.node, ChildRole::File, &old, new).await {
                let _ = old.close().await;
                let _ = p.node.driver().reload_file().await;
                return Err(e);
            }
            done.push(Done::File(Arc::clone(&p.node), old, Arc::clone(new)));
            p.node.driver().reload_file().await?;
        }
    }
    // O_DIRECT on or off, each file in place.
    for p in prepared
        .iter()
        .filter(|p| p.direct != p.node.cache_mode().0)
    {
        p.node.switch_direct(p.direct).await?;
        done.push(Done::Direct(Arc::clone(&p.node), p.direct));
    }
    // Parents go read-only before their children (so the first node
    // refused is the topmost, as in QEMU), and children go read-write
    // before their parents.
    let order = parents_first(prepared);
    for p in order
        .iter()
        .filter(|p| p.read_only && !p.node.is_read_only())
    {
        if crate::perm::has_writer(&p.node) {
            return Err(Error::invalid(format!(
                "Read-only block node '{}' cannot support read-write users",
                p.node.name()
            )));
        }
        p.node.switch_mode(true).await?;
        done.push(Done::Mode(Arc::clone(&p.node), true));
    }
    for p in order
        .iter()
        .rev()
        .filter(|p| !p.read_only && p.node.is_read_only())
    {
        p.node.switch_mode(false).await?;
        done.push(Done::Mode(Arc::clone(&p.node), false));
    }
    // The driver's own options last, for the mode the node now has.
    for p in prepared {
        p.node.driver().reopen_options(&p.driver_opts).await?;
        p.node.refresh_limits();
        done.push(Done::Options(
            Arc::clone(&p.node),
            p.old_driver_opts.clone(),
        ));
    }
    Ok(())
}

/// The entries with every node before the nodes below it, otherwise in
/// the queue's order (QEMU: bdrv_topological_dfs).
fn parents_first(prepared: &[Prepared]) -> Vec<&Prepared> {
    let mut left: Vec<&Prepared> = prepared.iter().collect();
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        // One no other entry left is above; there is one, as the graph has
        // no cycles.
        let i = (0..left.len())
            .find(|&i| {
                !left.iter().enumerate().any(|(j, q)| {
                    j != i && !Arc::ptr_eq(&q.node, &left[i].node) && q.node.reaches(&left[i].node)
                })
            })
            .unwrap_or(0);
        out.push(left.remove(i));
    }
    out
}

async fn undo(done: &mut Vec<Done>) {
    while let Some(d) = done.pop() {
        match d {
            Done::Mode(n, ro) => {
                let _ = n.switch_mode(!ro).await;
            }
            Done::Direct(n, direct) => {
                let _ = n.switch_direct(!direct).await;
            }
            Done::Options(n, old) => {
                let _ = n.driver().reopen_options(&old).await;
                n.refresh_limits();
            }
            Done::Backing(n, old) => {
                let _ = n.set_backing(old.clone()).await;
                if let Some(o) = old {
                    let _ = o.close().await;
                }
            }
            Done::File(n, old, new) => {
                let _ = n.driver().release_file().await;
                let _ = replace_child_edge(&n, ChildRole::File, &new, &old).await;
                let _ = n.driver().reload_file().await;
                let _ = old.close().await;
            }
        }
    }
}
