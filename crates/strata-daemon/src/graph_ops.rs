//! QMP commands that change how the graph runs rather than what is in it:
//! activation (the migration hand-off), I/O threads and moving nodes between
//! them (QEMU: qmp_blockdev_set_active, iothread objects,
//! qmp_x_blockdev_set_iothread).

use crate::blockdev::Daemon;
use crate::commands::daemon_command;
use serde_json::Value;
use std::sync::Arc;
use strata_block::{graph::id_wellformed, poll::PollParams, IoThread, Node};
use strata_qmp::Qmp;

impl Daemon {
    fn find_node(&self, name: &str) -> Result<Arc<Node>, String> {
        self.graph.find_node(name).map_err(|e| e.to_string())
    }

    /// `blockdev-set-active`: one node (and its children, or the parents'
    /// order for inactivation), or every node when none is named.
    pub async fn set_active(&self, node: Option<&str>, active: bool) -> Result<(), String> {
        let targets = match node {
            Some(name) => vec![self.find_node(name)?],
            // Every node: from the tops, so children follow their parents.
            None => self
                .graph
                .nodes()
                .into_iter()
                .filter(|n| n.parents().is_empty())
                .collect(),
        };
        for n in targets {
            let r = if active {
                n.activate().await
            } else {
                n.inactivate().await
            };
            r.map_err(|e| match node {
                None if !active => format!("Failed to inactivate all nodes: {e}"),
                _ => e.to_string(),
            })?;
        }
        Ok(())
    }

    /// `--object` / `object-add`: an I/O thread or a secret.
    pub fn add_object(&self, opts: &Value) -> Result<(), String> {
        if opts["qom-type"].as_str() != Some("secret") {
            return self.add_iothread(opts);
        }
        let pairs: Vec<(String, String)> = opts
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
            .collect();
        strata_crypto::secret::define(&pairs).map_err(|e| e.0)
    }

    /// `object-del`: a secret goes at once, an I/O thread as below.
    pub async fn del_object(&self, id: &str) -> Result<(), String> {
        if strata_crypto::secret::remove(id) {
            return Ok(());
        }
        self.del_iothread(id).await
    }

    /// `--object iothread,id=ID[,poll-max-ns=,poll-grow=,poll-shrink=]` /
    /// `object-add`: starts an I/O thread.
    pub fn add_iothread(&self, opts: &Value) -> Result<(), String> {
        let id = opts["id"].as_str().unwrap_or_default();
        if !id_wellformed(id) {
            return Err("Parameter 'id' expects an identifier".into());
        }
        let poll = poll_params(opts)?;
        let mut threads = self.iothreads();
        if threads.iter().any(|t| t.id() == id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        let t = IoThread::with_polling(id, poll)
            .map_err(|e| format!("Failed to start iothread {id}: {e}"))?;
        threads.push(t);
        Ok(())
    }

    /// `object-del` of an I/O thread: nodes living on it go back to the
    /// main loop first, so none is left on a stopped thread.
    pub async fn del_iothread(&self, id: &str) -> Result<(), String> {
        let Some(t) = self.take_iothread(id) else {
            return Err(format!("object '{id}' not found"));
        };
        for n in self.graph.nodes() {
            if n.home().is_some_and(|h| h.same(t.handle())) {
                n.move_to(None).await;
            }
        }
        drop(t);
        Ok(())
    }

    fn take_iothread(&self, id: &str) -> Option<IoThread> {
        let mut threads = self.iothreads();
        let at = threads.iter().position(|t| t.id() == id)?;
        Some(threads.remove(at))
    }

    /// `x-blockdev-set-iothread`: moves a node, and every node connected to
    /// it, to an I/O thread (or back to the main loop), drained.
    pub async fn set_iothread(&self, name: &str, iothread: Option<&str>) -> Result<(), String> {
        let n = self.find_node(name)?;
        let to = match iothread {
            None => None,
            Some(id) => Some(
                self.iothreads()
                    .iter()
                    .find(|t| t.id() == id)
                    .map(|t| t.handle().clone())
                    .ok_or_else(|| format!("Cannot find iothread {id}"))?,
            ),
        };
        n.move_to(to).await;
        Ok(())
    }
}

/// Adds the commands of this module to `qmp`.
pub fn register(qmp: &mut Qmp, daemon: &Arc<Daemon>) {
    let arg = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    daemon_command(
        qmp,
        daemon,
        "blockdev-set-active",
        "q_obj_blockdev-set-active_arg",
        move |d, a| async move {
            let active = a["active"].as_bool().unwrap_or(true);
            d.set_active(a.get("node-name").and_then(Value::as_str), active)
                .await
        },
    );
    daemon_command(
        qmp,
        daemon,
        "object-add",
        "ObjectOptions",
        move |d, a| async move { d.add_object(&a) },
    );
    daemon_command(
        qmp,
        daemon,
        "object-del",
        "q_obj_object-del_arg",
        move |d, a| async move { d.del_object(&arg(&a, "id")).await },
    );
    daemon_command(
        qmp,
        daemon,
        "x-blockdev-set-iothread",
        "q_obj_x-blockdev-set-iothread_arg",
        move |d, a| async move {
            d.set_iothread(&arg(&a, "node-name"), a["iothread"].as_str())
                .await
        },
    );
}

/// An iothread's polling properties, refused below zero as QEMU's.
fn poll_params(opts: &Value) -> Result<PollParams, String> {
    let get = |name: &str| -> Result<u64, String> {
        match opts.get(name).and_then(Value::as_i64) {
            None => Ok(0),
            Some(v) => u64::try_from(v)
                .map_err(|_| format!("{name} value must be in range [0, {}]", i64::MAX)),
        }
    };
    let max_ns = match opts.get("poll-max-ns") {
        None => PollParams::default().max_ns,
        Some(_) => get("poll-max-ns")?,
    };
    Ok(PollParams {
        max_ns,
        grow: get("poll-grow")?,
        shrink: get("poll-shrink")?,
    })
}
