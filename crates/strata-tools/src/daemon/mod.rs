//! `strata-daemon`, the drop-in for `qemu-storage-daemon`: a block graph
//! built from `--blockdev` options and QMP commands, served over QMP
//! monitors on `--chardev` sockets or stdio, until `quit` or a signal,
//! when every node is closed and written back.

pub mod blockdev;
mod chardev;
pub(crate) mod daemonize;
mod exports;
mod graph_ops;
pub(crate) mod pidfile;
mod qemu_opts;
mod resize;
pub mod schema;

use crate::getopt::{self, Item, LongOpt, OPERAND};
use blockdev::Daemon;
use chardev::{Backend, Chardev, Created};
use serde_json::{json, Value};
use std::sync::Arc;
use strata_block::report::{error_report, prog_name};
use strata_block::EventLoop;
use strata_qmp::{MonitorOptions, Qmp, QmpError};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

const LONG: &[LongOpt] = &[
    LongOpt {
        name: "blockdev",
        has_arg: true,
        val: 'B',
    },
    LongOpt {
        name: "chardev",
        has_arg: true,
        val: 'C',
    },
    LongOpt {
        name: "daemonize",
        has_arg: false,
        val: 'D',
    },
    LongOpt {
        name: "export",
        has_arg: true,
        val: 'E',
    },
    LongOpt {
        name: "help",
        has_arg: false,
        val: 'h',
    },
    LongOpt {
        name: "monitor",
        has_arg: true,
        val: 'M',
    },
    LongOpt {
        name: "nbd-server",
        has_arg: true,
        val: 'N',
    },
    LongOpt {
        name: "object",
        has_arg: true,
        val: 'O',
    },
    LongOpt {
        name: "pidfile",
        has_arg: true,
        val: 'P',
    },
    LongOpt {
        name: "version",
        has_arg: false,
        val: 'V',
    },
];

fn help() {
    println!(
        "Usage: {} [options]
QEMU storage daemon (Strata)

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
  --chardev stdio,id=<id>
                         configure a character device backend

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --pidfile <path>       write process ID to a file after startup

{}",
        prog_name(),
        crate::common::QEMU_HELP_BOTTOM
    );
}

/// What query-version and the greeting say: the QEMU release replaced.
fn version_info() -> Value {
    // Built in QEMU's order, which its dictionaries print by.
    json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "Strata 0.1.0"})
}

/// Reports `msg` for the option given by `loc` as QEMU does
/// (`PROG: --blockdev ARG: msg`).
fn report_at(loc: &str, kind: &str, msg: &str) {
    eprintln!("{}: {loc}: {kind}{msg}", prog_name());
}

/// A chardev and the monitor on it, if any.
struct Device {
    dev: Chardev,
    monitor: Option<MonitorOptions>,
}

/// Entry point of `strata-daemon`; returns only on errors before start-up
/// or after shutdown, with the exit code.
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    strata_block::report::set_prog_name(
        args.first().map(String::as_str).unwrap_or("strata-daemon"),
    );
    // glibc names the program by argv[0] as given.
    let parsed = getopt::parse(
        args.first().map(String::as_str).unwrap_or_default(),
        &args[1..],
        "-hV",
        LONG,
    );
    // First pass: what must happen before anything starts.
    let mut daemonize = false;
    let mut pidfile = None;
    for item in &parsed.items {
        match item {
            Item::Bad(msg) => {
                eprintln!("{msg}");
                return 1;
            }
            Item::Opt('h', _) => {
                help();
                return 0;
            }
            Item::Opt('V', _) => {
                println!("qemu-storage-daemon version 10.0.2 (Strata 0.1.0)");
                println!("{}", crate::common::QEMU_COPYRIGHT);
                return 0;
            }
            Item::Opt('D', _) => daemonize = true,
            Item::Opt('P', Some(p)) => pidfile = Some(p.clone()),
            _ => {}
        }
    }
    let daemonized = daemonize.then(daemonize::daemonize);
    let ev = match EventLoop::new() {
        Ok(ev) => ev,
        Err(e) => {
            error_report(format!("Could not start the event loop: {e}"));
            return 1;
        }
    };
    let code = ev.block_on(run(args, parsed, pidfile, daemonized));
    // Ends here, without waiting for a blocked read of standard input.
    std::process::exit(code)
}

/// A QMP error from a message whose further lines are a hint: QMP answers
/// carry no hints (QEMU prints them only on the command line).
fn without_hint(msg: String) -> QmpError {
    QmpError::generic(msg.lines().next().unwrap_or_default())
}

/// Adds the command `name`, with arguments of type `args`, that runs `f`
/// on the daemon; its error text becomes a GenericError.
fn daemon_command<F, Fut>(qmp: &mut Qmp, daemon: &Arc<Daemon>, name: &str, args: &str, f: F)
where
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

fn commands(daemon: &Arc<Daemon>, quit: &Arc<Notify>) -> Qmp {
    let mut qmp = Qmp::new(version_info(), schema::schema(&daemon.registry));
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
        "blockdev-del",
        "q_obj_blockdev-del_arg",
        |d, args| async move {
            d.blockdev_del(args["node-name"].as_str().unwrap_or_default())
                .await
        },
    );
    graph_ops::register(&mut qmp, daemon);
    export_commands(&mut qmp, daemon);
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

/// Processes the options in order, serves the monitors, and shuts down.
async fn run(
    args: Vec<String>,
    parsed: getopt::Parsed,
    pidfile: Option<String>,
    daemonized: Option<daemonize::Daemonized>,
) -> i32 {
    let mut signals = Vec::new();
    for kind in [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ] {
        match signal(kind) {
            Ok(s) => signals.push(s),
            Err(e) => {
                error_report(format!("Could not handle signals: {e}"));
                return 1;
            }
        }
    }
    let daemon = Arc::new(Daemon::new(crate::common::init()));
    let quit = Arc::new(Notify::new());
    let qmp = commands(&daemon, &quit);
    if let Some(missing) = qmp.undefined_types().first() {
        error_report(format!("internal error: undefined QAPI type '{missing}'"));
        return 1;
    }
    let qmp = Arc::new(qmp);
    daemon.set_monitor(&qmp);
    let mut devices: Vec<Device> = Vec::new();
    // Second pass: the options that build the daemon, in order.
    for (item, span) in parsed.items.iter().zip(&parsed.spans) {
        let Item::Opt(c, Some(arg)) = item else {
            continue;
        };
        let loc = args[1..][span.clone()].join(" ");
        let r = match *c {
            OPERAND => Err("Unexpected argument".to_string()),
            'B' => add_blockdev(&daemon, &qmp, arg).await,
            'C' => match add_chardev(arg, &loc, &devices, daemonized.is_some()).await {
                Ok(Some(dev)) => {
                    devices.push(Device { dev, monitor: None });
                    Ok(())
                }
                Ok(None) => {
                    shutdown(&daemon, &qmp, devices).await;
                    return 0;
                }
                Err(e) => Err(e),
            },
            'M' => add_monitor(&qmp, arg, &mut devices),
            'O' => add_object(&daemon, &qmp, arg),
            'N' => match options(&qmp, arg, None, "NbdServerOptions") {
                Ok(o) => daemon.exports.nbd_server_start(&o).await,
                Err(e) => Err(e),
            },
            'E' => match options(&qmp, arg, Some("type"), "BlockExportOptions") {
                Ok(o) => daemon.exports.add(&daemon, &o).await,
                Err(e) => Err(e),
            },
            _ => Ok(()),
        };
        if let Err(msg) = r {
            report_at(&loc, "", &msg);
            shutdown(&daemon, &qmp, devices).await;
            return 1;
        }
    }
    // Written once everything is set up, before any connection is served.
    let _pid = match pidfile.as_deref().map(pidfile::PidFile::write) {
        Some(Err(e)) => {
            error_report(format!("cannot create PID file: {e}"));
            shutdown(&daemon, &qmp, devices).await;
            return 1;
        }
        Some(Ok(p)) => Some(p),
        None => None,
    };
    if let Some(d) = daemonized {
        if let Err(e) = d.finish() {
            error_report(e);
            shutdown(&daemon, &qmp, devices).await;
            return 1;
        }
    }
    let paths = serve(&qmp, &mut devices);
    let mut waits: Vec<_> = signals.iter_mut().map(|s| Box::pin(s.recv())).collect();
    tokio::select! {
        _ = quit.notified() => {}
        _ = futures::future::select_all(waits.iter_mut()) => {}
    }
    drop(waits);
    shutdown(&daemon, &qmp, devices).await;
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
    0
}

/// Closes every node, then lets the last answers out.
async fn shutdown(daemon: &Daemon, qmp: &Qmp, devices: Vec<Device>) {
    // A command still running finishes first; none starts after it.
    let _stopped = qmp.stop().await;
    daemon.close_all().await;
    qmp.flush().await;
    for d in devices {
        if let Backend::Server { path, .. } = &d.dev.backend {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn add_blockdev(daemon: &Daemon, qmp: &Qmp, arg: &str) -> Result<(), String> {
    // QEMU: qobject_input_visitor_new_str with the implied key "driver".
    let (value, keyval) = if arg.starts_with('{') {
        (strata_block::qjson::parse(arg)?, false)
    } else {
        (
            Value::Object(strata_qmp::keyval::parse(arg, Some("driver"))?),
            true,
        )
    };
    let opts = strata_qmp::visit::visit(qmp.schema(), "BlockdevOptions", value, keyval)?;
    daemon.blockdev_add(opts).await
}

/// An option's argument in keyval form or JSON, checked against `ty`.
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

/// `--object qom-type,id=ID,...`, in keyval form or JSON.
fn add_object(daemon: &Daemon, qmp: &Qmp, arg: &str) -> Result<(), String> {
    let (value, keyval) = if arg.starts_with('{') {
        (strata_block::qjson::parse(arg)?, false)
    } else {
        (
            Value::Object(strata_qmp::keyval::parse(arg, Some("qom-type"))?),
            true,
        )
    };
    let opts = strata_qmp::visit::visit(qmp.schema(), "ObjectOptions", value, keyval)?;
    daemon.add_iothread(opts["id"].as_str().unwrap_or_default())
}

/// `Ok(None)`: help was printed.
async fn add_chardev(
    arg: &str,
    loc: &str,
    devices: &[Device],
    daemonized: bool,
) -> Result<Option<Chardev>, String> {
    let existing: Vec<&Chardev> = devices.iter().map(|d| &d.dev).collect();
    let mut warn = |m: &str| report_at(loc, "warning: ", m);
    let mut info = |m: &str| report_at(loc, "info: ", m);
    match chardev::create(arg, &existing, daemonized, &mut warn, &mut info).await? {
        Created::Device(c) => Ok(Some(c)),
        Created::Help(text) => {
            print!("{text}");
            Ok(None)
        }
    }
}

fn add_monitor(qmp: &Qmp, arg: &str, devices: &mut [Device]) -> Result<(), String> {
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
fn serve(qmp: &Arc<Qmp>, devices: &mut [Device]) -> Vec<String> {
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
