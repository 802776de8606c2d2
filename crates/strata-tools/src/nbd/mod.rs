//! `strata-nbd`, the drop-in for qemu-nbd: serves one image over NBD on a
//! TCP port or a Unix socket, with qemu-nbd's options, defaults and exit
//! (after the last client unless `-t`).

mod args;
mod list;

use crate::process::daemonize::daemonize;
use crate::process::pidfile::PidFile;
use std::sync::Arc;
use std::time::Duration;
use strata_block::report::error_report;
use strata_block::{Backend, EventLoop};
use strata_nbd::client::Addr;
use strata_nbd::listener::Listener;
use strata_nbd::{Export, Server};

/// Entry point of `strata-nbd`; returns the exit code.
pub fn main() -> i32 {
    let registry = crate::common::init();
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let a = match args::parse(&argv) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if a.list {
        return match EventLoop::new() {
            Ok(el) => el.block_on(list::run(&a)),
            Err(e) => {
                error_report(format!("cannot start the event loop: {e}"));
                1
            }
        };
    }
    // Forking must happen before any thread exists (the event loop's).
    let daemon = a.fork.then(daemonize);
    let el = match EventLoop::new() {
        Ok(el) => el,
        Err(e) => {
            error_report(format!("cannot start the event loop: {e}"));
            return 1;
        }
    };
    let mut req = a.open.clone();
    if a.image_opts {
        match crate::common::image_opts(&a.image) {
            Ok(o) => req.opts = o,
            Err(e) => {
                error_report(&e);
                return 1;
            }
        }
    } else {
        req.name = Some(a.image.clone());
    }
    if let Some(dz) = &a.detect_zeroes {
        if dz == "unmap" && !req.unmap {
            error_report("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
            return 1;
        }
        req.opts.insert(
            "detect-zeroes".into(),
            serde_json::Value::String(dz.clone()),
        );
    }
    let graph = strata_block::Graph::new();
    let node = match el.block_on(crate::io::open_node_in(&registry, &req, Arc::clone(&graph))) {
        Ok(n) => n,
        Err(msg) => {
            error_report(format!("Failed to blk_new_open '{}': {msg}", a.image));
            return 1;
        }
    };
    // -o: a raw node starting that far into the image is served instead
    // (as qemu-nbd builds it); it holds the image node as its file.
    let node = if a.offset == 0 {
        node
    } else {
        let mut opts = serde_json::Map::new();
        opts.insert("driver".into(), "raw".into());
        opts.insert("file".into(), node.name().into());
        opts.insert("offset".into(), a.offset.into());
        let flags = strata_block::OpenFlags {
            read_only: node.is_read_only(),
            ..Default::default()
        };
        let ctx = strata_block::OpenCtx::with_graph(Arc::clone(&registry), flags, graph);
        let raw = el.block_on(async {
            let r = ctx.open_image(None, None, opts).await;
            // The raw node holds its own reference now.
            let _ = node.close().await;
            r
        });
        match raw {
            Ok(r) => r,
            Err(e) => {
                error_report(e.to_string());
                return 1;
            }
        }
    };
    // -l: on the node served, so with -o it is the raw node (as in qemu-nbd).
    if let Some(sel) = &a.snapshot {
        if let Err(e) = el.block_on(sel.load(&node)) {
            error_report(format!("Failed to load snapshot: {e}"));
            return 1;
        }
    }
    node.set_writeback(req.cache.writeback);
    let writable = !node.is_read_only();
    let (perm, shared) = strata_nbd::export_perms(writable);
    let blk = match Backend::new(&node, "an unnamed block device", perm, shared) {
        Ok(b) => Arc::new(b),
        Err(e) => {
            error_report(e.to_string());
            return 1;
        }
    };
    let refs: Vec<_> = a
        .bitmaps
        .iter()
        .map(|b| strata_nbd::BitmapRef::Local(b))
        .collect();
    // qemu-nbd names bitmaps only by name.
    let bitmaps =
        match strata_nbd::export_bitmaps(&node, &refs, !writable, |_, _| Err(String::new())) {
            Ok(b) => b,
            Err(msg) => {
                error_report(msg);
                return 1;
            }
        };
    let export = Arc::new(Export {
        name: a.export_name.clone(),
        description: a.description.clone(),
        blk: Arc::clone(&blk),
        writable,
        // As qemu-nbd: whenever -e lets several clients in (0: any number);
        // they share one user handle, so one flush covers them all.
        multi_conn: a.shared != 1,
        bitmaps,
        allocation_depth: a.allocation_depth,
        state: Default::default(),
    });
    let server = Server::new(Duration::from_secs(a.handshake_limit));
    server.add(export);
    let a_image = a.image.clone();
    let code = el.block_on_task({
        let a = Arc::new(a);
        async move { listen(server, a, daemon).await }
    });
    // The handle's reference, then the opener's: the image is written
    // back and closed, so writes a client never flushed are kept too.
    el.block_on(async {
        let _ = blk.close().await;
        if let Err(e) = node.close().await {
            error_report(format!("Failed to close '{}': {e}", a_image));
        }
    });
    code
}

/// Binds, reports the start-up, and serves clients until the last one
/// leaves (unless persistent).
async fn listen(
    server: Arc<Server>,
    a: Arc<args::Args>,
    daemon: Option<crate::process::daemonize::Daemonized>,
) -> i32 {
    let listener = match Listener::bind(&address(&a)).await {
        Ok(l) => l,
        Err(msg) => {
            error_report(msg);
            return 1;
        }
    };
    let _pid = match &a.pid_file {
        Some(p) => match PidFile::write(p) {
            Ok(f) => Some(f),
            Err(msg) => {
                error_report(msg);
                return 1;
            }
        },
        None => None,
    };
    if let Some(d) = daemon {
        if let Err(msg) = d.finish() {
            error_report(msg);
            return 1;
        }
    }
    // Clients connected now; a watch never misses the last one leaving.
    let (tx, mut rx) = tokio::sync::watch::channel(0usize);
    let tx = Arc::new(tx);
    let mut served = false;
    let mut term = Box::pin(terminated());
    loop {
        // At most `shared` clients at once: the others wait in the backlog.
        if rx.wait_for(|n| *n < a.shared).await.is_err() {
            break;
        }
        if served && !a.persistent && *rx.borrow_and_update() == 0 {
            break;
        }
        let accepted = tokio::select! {
            c = listener.accept() => c,
            _ = rx.changed(), if served && !a.persistent => continue,
            // SIGTERM, SIGINT, SIGHUP: stop serving and clean up, as qemu-nbd.
            _ = &mut term => break,
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                error_report(format!("Failed to accept a connection: {e}"));
                continue;
            }
        };
        served = true;
        tx.send_modify(|n| *n += 1);
        let (server, tx, verbose) = (Arc::clone(&server), Arc::clone(&tx), a.verbose);
        tokio::spawn(async move {
            let r = server.serve_conn(conn).await;
            if let Err(e) = r {
                if verbose {
                    strata_block::stderr_line!(
                        "{}: client: {e}",
                        strata_block::report::prog_name()
                    );
                }
            }
            tx.send_modify(|n| *n -= 1);
        });
    }
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    0
}

/// Resolves when the process is asked to terminate.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let kinds = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ];
    let mut sigs: Vec<_> = kinds.into_iter().filter_map(|k| signal(k).ok()).collect();
    if sigs.is_empty() {
        return std::future::pending().await;
    }
    let waits = sigs.iter_mut().map(|s| Box::pin(s.recv()));
    futures::future::select_all(waits).await;
}

/// The address `-k` or `-b`/`-p` name.
fn address(a: &args::Args) -> Addr {
    match &a.socket {
        Some(p) => Addr::Unix(p.clone()),
        None => Addr::Tcp {
            host: a.bind.clone(),
            port: a.port.to_string(),
        },
    }
}
