//! QMP monitors on character devices (QEMU: monitor/qmp.c with
//! chardev/): `--chardev` and `--monitor` pair up, then every connection
//! to a monitor's socket gets its own QMP session.

use crate::chardev::{self, Backend, Chardev, Created};
use crate::report_at;
use serde_json::Value;
use std::sync::Arc;
use strata_qmp::{MonitorOptions, Qmp};

/// A chardev and the monitor on it, if any.
pub(crate) struct Device {
    dev: Chardev,
    monitor: Option<MonitorOptions>,
}

/// `Ok(None)`: help was printed.
pub(crate) async fn add_chardev(
    arg: &str,
    loc: &str,
    devices: &[Device],
    daemonized: bool,
) -> Result<Option<Device>, String> {
    let existing: Vec<&Chardev> = devices.iter().map(|d| &d.dev).collect();
    let mut warn = |m: &str| report_at(loc, "warning: ", m);
    let mut info = |m: &str| report_at(loc, "info: ", m);
    match chardev::create(arg, &existing, daemonized, &mut warn, &mut info).await? {
        Created::Device(dev) => Ok(Some(Device { dev, monitor: None })),
        Created::Help(text) => {
            print!("{text}");
            Ok(None)
        }
    }
}

pub(crate) fn add_monitor(qmp: &Qmp, arg: &str, devices: &mut [Device]) -> Result<(), String> {
    let value = Value::Object(strata_qmp::keyval::parse(arg, Some("chardev"))?);
    let opts = strata_qmp::visit::visit(qmp.schema(), "MonitorOptions", value, true)?;
    let name = opts["chardev"].as_str().unwrap_or_default();
    let Some(dev) = devices.iter_mut().find(|d| d.dev.id == name) else {
        return Err(format!("chardev \"{name}\" not found"));
    };
    if opts.get("mode").and_then(Value::as_str) == Some("readline") {
        return Err("Only QMP is supported".into());
    }
    if dev.monitor.is_some() {
        return Err(format!("chardev '{name}' is already in use"));
    }
    let pretty = opts.get("pretty").and_then(Value::as_bool).unwrap_or(false);
    dev.monitor = Some(MonitorOptions { pretty });
    Ok(())
}

/// Starts serving every chardev; returns the socket files to remove at the end.
pub(crate) fn serve(qmp: &Arc<Qmp>, devices: &mut [Device]) -> Vec<String> {
    let mut paths = Vec::new();
    for d in devices.iter_mut() {
        let monitor = d.monitor;
        let backend = std::mem::replace(&mut d.dev.backend, Backend::Client(None));
        match backend {
            Backend::Server {
                path,
                listener,
                first,
            } => {
                paths.push(path);
                if let Some(s) = first {
                    connection(qmp, s, monitor);
                }
                let qmp = Arc::clone(qmp);
                tokio::spawn(async move {
                    // Every client is served at once, each in its own session.
                    while let Ok((s, _)) = listener.accept().await {
                        connection(&qmp, s, monitor);
                    }
                });
            }
            Backend::Client(Some(s)) => connection(qmp, s, monitor),
            Backend::Client(None) => {}
            Backend::Stdio => {
                if let Some(opts) = monitor {
                    let qmp = Arc::clone(qmp);
                    tokio::spawn(qmp.serve(tokio::io::stdin(), tokio::io::stdout(), opts));
                }
            }
        }
    }
    paths
}

fn connection(qmp: &Arc<Qmp>, s: tokio::net::UnixStream, monitor: Option<MonitorOptions>) {
    let (r, w) = s.into_split();
    match monitor {
        Some(opts) => {
            tokio::spawn(Arc::clone(qmp).serve(r, w, opts));
        }
        None => {
            // A chardev without a monitor takes connections and ignores them.
            tokio::spawn(async move {
                let mut r = r;
                let mut buf = [0u8; 4096];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut r, &mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                drop(w);
            });
        }
    }
}

/// Removes the socket files of the server chardevs.
pub(crate) fn remove_sockets(devices: Vec<Device>) {
    for d in devices {
        if let Backend::Server { path, .. } = &d.dev.backend {
            let _ = std::fs::remove_file(path);
        }
    }
}
