//! The daemon's QMP commands, each bound to the [`Daemon`] it acts on.

use crate::blockdev::Daemon;
use crate::{bitmaps, graph_ops, queries, schema};
use serde_json::{json, Value};
use std::sync::Arc;
use strata_qmp::{Qmp, QmpError};
use tokio::sync::Notify;

/// What query-version and the greeting say: the QEMU release replaced.
fn version_info() -> Value {
    // Built in QEMU's order, which its dictionaries print by.
    json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "Strata 0.1.0"})
}

/// A QMP error from a message whose further lines are a hint: QMP answers
/// carry no hints (QEMU prints them only on the command line).
fn without_hint(msg: String) -> QmpError {
    QmpError::generic(msg.lines().next().unwrap_or_default())
}

/// Adds the command `name`, with arguments of type `args`, that runs `f`
/// on the daemon; its error text becomes a GenericError.
pub(crate) fn daemon_command<F, Fut>(
    qmp: &mut Qmp,
    daemon: &Arc<Daemon>,
    name: &str,
    args: &str,
    f: F,
) where
    F: Fn(Arc<Daemon>, Value) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let d = Arc::clone(daemon);
    qmp.add_command(
        name,
        Some(args),
        Arc::new(move |a| {
            let fut = f(Arc::clone(&d), a);
            Box::pin(async move {
                fut.await.map_err(QmpError::generic)?;
                Ok(json!({}))
            })
        }),
    );
}

/// Every command of the daemon's monitor; `quit` is notified by `quit`.
pub(crate) fn commands(daemon: &Arc<Daemon>, quit: &Arc<Notify>) -> Qmp {
    let mut qmp = Qmp::new(version_info(), schema::schema(&daemon.registry));
    let jobs = Arc::clone(&daemon.jobs);
    qmp.set_gate(Arc::new(move || {
        let jobs = Arc::clone(&jobs);
        Box::pin(async move { jobs.quiesce().await })
    }));
    daemon_command(
        &mut qmp,
        daemon,
        "block_resize",
        "q_obj_block_resize_arg",
        |d, args| async move {
            let device = args.get("device").and_then(Value::as_str);
            let node = args.get("node-name").and_then(Value::as_str);
            let size = args["size"].as_i64().unwrap_or(-1);
            d.block_resize(device, node, size).await
        },
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "blockdev-add",
        Some("BlockdevOptions"),
        Arc::new(move |args| {
            let d = Arc::clone(&d);
            Box::pin(async move {
                d.blockdev_add(args).await.map_err(without_hint)?;
                Ok(json!({}))
            })
        }),
    );
    daemon_command(
        &mut qmp,
        daemon,
        "blockdev-reopen",
        "q_obj_blockdev-reopen_arg",
        |d, args| async move { d.blockdev_reopen(args["options"].clone()).await },
    );
    daemon_command(
        &mut qmp,
        daemon,
        "blockdev-del",
        "q_obj_blockdev-del_arg",
        |d, args| async move {
            d.blockdev_del(args["node-name"].as_str().unwrap_or_default())
                .await
        },
    );
    graph_ops::register(&mut qmp, daemon);
    export_commands(&mut qmp, daemon);
    queries::register(&mut qmp, daemon);
    bitmaps::register(&mut qmp, daemon);
    crate::snapshots::register(&mut qmp, daemon);
    crate::transaction::register(&mut qmp, daemon);
    crate::jobs::register(&mut qmp, daemon);
    crate::create::register(&mut qmp, daemon);
    qmp.add_control_commands();
    let q = Arc::clone(quit);
    let d = Arc::clone(daemon);
    qmp.add_command(
        "quit",
        None,
        Arc::new(move |_| {
            let (q, d) = (Arc::clone(&q), Arc::clone(&d));
            Box::pin(async move {
                // Exports end before the answer, as in QEMU: their
                // BLOCK_EXPORT_DELETED events come first.
                d.exports.close_all(&d).await;
                q.notify_one();
                Ok(json!({}))
            })
        }),
    );
    qmp
}

/// The NBD server and block export commands (QEMU: blockdev-nbd.c,
/// block/export/export.c).
fn export_commands(qmp: &mut Qmp, daemon: &Arc<Daemon>) {
    daemon_command(
        qmp,
        daemon,
        "nbd-server-start",
        "q_obj_nbd-server-start_arg",
        |d, a| async move { d.exports.nbd_server_start(&a).await },
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "nbd-server-stop",
        None,
        Arc::new(move |_| {
            let d = Arc::clone(&d);
            Box::pin(async move {
                d.exports
                    .nbd_server_stop(&d)
                    .await
                    .map_err(QmpError::generic)?;
                Ok(json!({}))
            })
        }),
    );
    daemon_command(
        qmp,
        daemon,
        "block-export-add",
        "BlockExportOptions",
        |d, a| async move { d.exports.add(&d, &a).await },
    );
    daemon_command(
        qmp,
        daemon,
        "block-export-del",
        "q_obj_block-export-del_arg",
        |d, a| async move { d.exports.del(&d, &a).await },
    );
    daemon_command(
        qmp,
        daemon,
        "nbd-server-add",
        "NbdServerAddOptions",
        |d, a| async move { d.exports.nbd_server_add(&d, &a).await },
    );
    daemon_command(
        qmp,
        daemon,
        "nbd-server-remove",
        "q_obj_nbd-server-remove_arg",
        |d, a| async move { d.exports.del(&d, &a).await },
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "query-block-exports",
        None,
        Arc::new(move |_| {
            let list = d.exports.query();
            Box::pin(async move { Ok(list) })
        }),
    );
}
