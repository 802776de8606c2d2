//! The engine of `strata-daemon`, the drop-in for `qemu-storage-daemon`: a
//! block graph built from `--blockdev` options and QMP commands, served over
//! QMP monitors on `--chardev` sockets or stdio and exported over NBD, until
//! `quit` or a signal, when every export ends and every node is closed and
//! written back. The binary is a thin front end: it parses the command line
//! and hands each option to a [`Setup`] in order.

mod bitmaps;
mod blockdev;
mod chardev;
mod commands;
mod create;
mod exports;
mod graph_ops;
mod jobs;
mod monitors;
mod qemu_opts;
mod queries;
mod resize;
pub mod schema;
mod snapshots;
mod transaction;

pub use blockdev::Daemon;

use monitors::Device;
use serde_json::Value;
use std::sync::Arc;
use strata_block::Registry;
use strata_qmp::Qmp;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::Notify;

/// Every driver: the protocols, formats and filters of strata-drivers, and
/// the filters the jobs bring (copy-before-write, snapshot-access). QEMU's
/// tools all have every driver, so every Strata tool uses this registry.
pub fn registry() -> Arc<Registry> {
    registry_with(Vec::new())
}

/// The daemon's registry with more driver classes: an embedder's own, or
/// a test's recording filter.
pub fn registry_with(mut extra: Vec<Arc<dyn strata_block::DriverClass>>) -> Arc<Registry> {
    let mut classes = strata_jobs::backup::fleecing::driver_classes();
    classes.append(&mut extra);
    strata_drivers::registry_with(classes)
}

/// One option of the command line that builds the daemon, in the order
/// given; the argument is the option's value.
pub enum DaemonArg<'a> {
    Blockdev(&'a str),
    Chardev(&'a str),
    Monitor(&'a str),
    Object(&'a str),
    NbdServer(&'a str),
    Export(&'a str),
    /// A word that is no option.
    Operand,
}

/// What applying an option led to.
pub enum Applied {
    Done,
    /// `--chardev help` printed its text: the daemon ends with success.
    HelpPrinted,
}

/// A daemon being built from its options, then served.
pub struct Setup {
    daemon: Arc<Daemon>,
    qmp: Arc<Qmp>,
    quit: Arc<Notify>,
    devices: Vec<Device>,
    signals: Vec<Signal>,
    daemonized: bool,
}

/// One monitor connection to a daemon of its own, from the greeting until
/// the client goes, then every export ended and every node closed: the
/// daemon's dispatcher without signals or sockets of its own (the
/// `qmp_daemon` fuzz target drives it).
pub async fn serve_connection<R, W>(registry: Arc<Registry>, reader: R, writer: W)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let daemon = Arc::new(Daemon::new(registry));
    let quit = Arc::new(Notify::new());
    let qmp = Arc::new(commands::commands(&daemon, &quit));
    daemon.set_monitor(&qmp);
    Arc::clone(&qmp)
        .serve(reader, writer, strata_qmp::MonitorOptions::default())
        .await;
    let _stopped = qmp.stop().await;
    daemon.close_all().await;
    qmp.flush().await;
}

/// Reports `msg` for the option given by `loc` as QEMU does
/// (`PROG: --blockdev ARG: msg`).
pub fn report_at(loc: &str, kind: &str, msg: &str) {
    strata_block::stderr_line!("{}: {loc}: {kind}{msg}", strata_block::report::prog_name());
}

impl Setup {
    /// An empty daemon with its monitor commands, handling SIGTERM, SIGINT
    /// and SIGHUP from now on. `daemonized`: standard input and output are
    /// gone, so a stdio chardev is refused.
    pub fn new(registry: Arc<Registry>, daemonized: bool) -> Result<Setup, String> {
        let mut signals = Vec::new();
        for kind in [
            SignalKind::terminate(),
            SignalKind::interrupt(),
            SignalKind::hangup(),
        ] {
            signals.push(signal(kind).map_err(|e| format!("Could not handle signals: {e}"))?);
        }
        let daemon = Arc::new(Daemon::new(registry));
        let quit = Arc::new(Notify::new());
        let qmp = commands::commands(&daemon, &quit);
        if let Some(missing) = qmp.undefined_types().first() {
            return Err(format!("internal error: undefined QAPI type '{missing}'"));
        }
        let qmp = Arc::new(qmp);
        daemon.set_monitor(&qmp);
        Ok(Setup {
            daemon,
            qmp,
            quit,
            devices: Vec::new(),
            signals,
            daemonized,
        })
    }

    /// Applies one option; `loc` names it in warnings.
    pub async fn apply(&mut self, arg: DaemonArg<'_>, loc: &str) -> Result<Applied, String> {
        let (daemon, qmp) = (&self.daemon, &self.qmp);
        match arg {
            DaemonArg::Operand => return Err("Unexpected argument".to_string()),
            DaemonArg::Blockdev(a) => {
                let opts = options(qmp, a, Some("driver"), "BlockdevOptions")?;
                daemon.blockdev_add(opts).await?
            }
            DaemonArg::Chardev(a) => {
                match monitors::add_chardev(a, loc, &self.devices, self.daemonized).await? {
                    Some(dev) => self.devices.push(dev),
                    None => return Ok(Applied::HelpPrinted),
                }
            }
            DaemonArg::Monitor(a) => monitors::add_monitor(qmp, a, &mut self.devices)?,
            DaemonArg::Object(a) => {
                let opts = options(qmp, a, Some("qom-type"), "ObjectOptions")?;
                daemon.add_object(&opts)?
            }
            DaemonArg::NbdServer(a) => {
                let opts = options(qmp, a, None, "NbdServerOptions")?;
                daemon.exports.nbd_server_start(&opts).await?
            }
            DaemonArg::Export(a) => {
                let opts = options(qmp, a, Some("type"), "BlockExportOptions")?;
                daemon.exports.add(daemon, &opts).await?
            }
        }
        Ok(Applied::Done)
    }

    /// Serves every monitor until `quit` or a signal, then shuts down.
    pub async fn serve(mut self) {
        let paths = monitors::serve(&self.qmp, &mut self.devices);
        let mut waits: Vec<_> = self
            .signals
            .iter_mut()
            .map(|s| Box::pin(s.recv()))
            .collect();
        tokio::select! {
            _ = self.quit.notified() => {}
            _ = futures::future::select_all(waits.iter_mut()) => {}
        }
        drop(waits);
        // No SHUTDOWN event: qemu-storage-daemon's schema has none (QEMU's
        // system emulator sends one), and QEMU's iotests (qsd-jobs) expect
        // nothing after `quit`'s answer but the exports' ends.
        self.shutdown().await;
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Ends every export, closes every node, then lets the last answers out.
    pub async fn shutdown(self) {
        // A command still running finishes first; none starts after it.
        let _stopped = self.qmp.stop().await;
        self.daemon.close_all().await;
        self.qmp.flush().await;
        monitors::remove_sockets(self.devices);
    }
}

/// An option's argument in keyval form (with `implied` as the key of a
/// leading bare value) or JSON, checked against the QAPI type `ty`.
fn options(qmp: &Qmp, arg: &str, implied: Option<&str>, ty: &str) -> Result<Value, String> {
    let (value, keyval) = if arg.starts_with('{') {
        (strata_block::qjson::parse(arg)?, false)
    } else {
        (
            Value::Object(strata_qmp::keyval::parse(arg, implied)?),
            true,
        )
    };
    strata_qmp::visit::visit(qmp.schema(), ty, value, keyval)
}
