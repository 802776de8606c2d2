//! The daemon's NBD server and block exports (QEMU: blockdev-nbd.c and
//! block/export/export.c): `--nbd-server` / `nbd-server-start` and
//! `-stop`, `--export` / `block-export-add` of type `nbd` and `fuse`,
//! `block-export-del`, `nbd-server-add` and `-remove`,
//! `query-block-exports`, and the `BLOCK_EXPORT_DELETED` event. An export
//! holds its node through a user handle; the node cannot be deleted while
//! it is exported.

use crate::blockdev::Daemon;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use strata_block::{Backend, Node};
use strata_fuse::{AllowOther, FuseExport, FuseOptions};
use strata_nbd::client::Addr;
use strata_nbd::listener::{Listener, Serving};
use strata_nbd::{BitmapRef, Export, Server};

/// QEMU's defaults for `max-connections` and `handshake-max-seconds`.
const DEFAULT_MAX_CONNECTIONS: u64 = 100;
const DEFAULT_HANDSHAKE_SECS: u64 = 10;

/// The running NBD server.
struct NbdServer {
    server: Arc<Server>,
    serving: Serving,
    /// `max-connections` (0: no limit).
    max_connections: u64,
}

/// What an export serves its node through.
enum Kind {
    Nbd(Arc<Export>),
    Fuse(Arc<FuseExport>),
}

/// One block export.
struct Entry {
    id: String,
    kind: Kind,
}

impl Entry {
    /// The node the export serves now: a swap (a snapshot, a mirror's
    /// pivot) moves its handle to another node.
    fn root(&self) -> Arc<Node> {
        match &self.kind {
            Kind::Nbd(export) => export.blk.node(),
            Kind::Fuse(export) => export.backend().node(),
        }
    }

    fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Nbd(_) => "nbd",
            Kind::Fuse(_) => "fuse",
        }
    }
}

/// The NBD server, if started, and every export, newest first (the order
/// QEMU lists them in).
#[derive(Default)]
pub struct Exports {
    nbd: tokio::sync::Mutex<Option<NbdServer>>,
    list: Mutex<Vec<Entry>>,
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// A socket address in QAPI's flat form (`SocketAddress`: `type`, then
/// the members) or its legacy form (`{"type", "data": {...}}`).
pub fn socket_addr(v: &Value) -> Result<Addr, String> {
    let flat = match v.get("data") {
        Some(d) => {
            let mut d = d.clone();
            if let (Some(m), Some(t)) = (d.as_object_mut(), v.get("type")) {
                m.insert("type".into(), t.clone());
            }
            d
        }
        None => v.clone(),
    };
    match str_of(&flat, "type") {
        Some("unix") => Ok(Addr::Unix(str_of(&flat, "path").unwrap_or_default().into())),
        Some("inet") => Ok(Addr::Tcp {
            host: str_of(&flat, "host").unwrap_or_default().into(),
            port: str_of(&flat, "port").unwrap_or_default().into(),
        }),
        Some(t) => Err(format!(
            "Socket address type '{t}' is not supported by Strata"
        )),
        None => Err("Parameter 'type' is missing".into()),
    }
}

impl Exports {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `nbd-server-start` and `--nbd-server` (arguments checked against
    /// the schema; `addr` in either form).
    pub async fn nbd_server_start(&self, args: &Value) -> Result<(), String> {
        let mut nbd = self.nbd.lock().await;
        if nbd.is_some() {
            return Err("NBD server already running".into());
        }
        if args.get("tls-creds").is_some() || args.get("tls-authz").is_some() {
            return Err("TLS is not supported by Strata yet".into());
        }
        let addr = socket_addr(&args["addr"])?;
        let max = args
            .get("max-connections")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let secs = args
            .get("handshake-max-seconds")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_HANDSHAKE_SECS);
        let listener = Listener::bind(&addr).await?;
        let server = Server::new(Duration::from_secs(secs));
        let serving = Serving::start(Arc::clone(&server), listener, max as usize);
        *nbd = Some(NbdServer {
            server,
            serving,
            max_connections: max,
        });
        Ok(())
    }

    /// `nbd-server-stop`: every NBD export goes, then the listener.
    pub async fn nbd_server_stop(&self, daemon: &Daemon) -> Result<(), String> {
        let mut nbd = self.nbd.lock().await;
        let Some(running) = nbd.take() else {
            return Err("NBD server not running".into());
        };
        let ids: Vec<String> = self
            .list()
            .iter()
            .filter(|e| matches!(e.kind, Kind::Nbd(_)))
            .map(|e| e.id.clone())
            .collect();
        for id in ids {
            self.remove(daemon, Some(&running.server), &id).await;
        }
        running.serving.stop().await;
        Ok(())
    }

    /// `block-export-add` and `--export` (arguments checked against the
    /// schema).
    pub async fn add(&self, daemon: &Daemon, args: &Value) -> Result<(), String> {
        let nbd = self.nbd.lock().await;
        let id = str_of(args, "id").unwrap_or_default().to_string();
        if id.is_empty() || id.starts_with(|c: char| !c.is_ascii_alphabetic()) {
            return Err("Invalid block export id".into());
        }
        if self.list().iter().any(|e| e.id == id) {
            return Err(format!("Block export id '{id}' is already in use"));
        }
        let fuse = match str_of(args, "type") {
            Some("nbd") => false,
            Some("fuse") => true,
            _ => return Err("No driver found for the requested export type".into()),
        };
        let node_name = str_of(args, "node-name").unwrap_or_default();
        let node = daemon
            .graph
            .find(node_name)
            .ok_or_else(|| format!("Cannot find device='' nor node-name='{node_name}'"))?;
        let writable = args
            .get("writable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if writable && node.is_read_only() {
            return Err("Cannot export read-only node as writable".into());
        }
        // The export's requests run where its node lives: the node (with
        // every node connected to it) moves to the I/O thread, drained. A
        // move cannot be refused here, so fixed-iothread changes nothing.
        if let Some(t) = str_of(args, "iothread") {
            let to = daemon
                .iothreads()
                .iter()
                .find(|x| x.id() == t)
                .map(|x| x.handle().clone())
                .ok_or_else(|| format!("iothread \"{t}\" not found"))?;
            node.move_to(Some(to)).await;
        }
        if fuse {
            return self.add_fuse(id, node, writable, args);
        }
        let Some(running) = nbd.as_ref() else {
            return Err("NBD server not running".into());
        };
        let name = str_of(args, "name").unwrap_or(node_name).to_string();
        if name.len() > strata_nbd::proto::MAX_STRING {
            return Err(format!("export name '{name}' too long"));
        }
        let description = str_of(args, "description").map(str::to_string);
        if description
            .as_ref()
            .is_some_and(|d| d.len() > strata_nbd::proto::MAX_STRING)
        {
            return Err(format!(
                "description '{}' too long",
                description.as_deref().unwrap_or_default()
            ));
        }
        if running.server.export(&name).is_some() {
            return Err(format!("NBD server already has export named '{name}'"));
        }
        let (perm, shared) = strata_nbd::export_perms(writable);
        // An export is an unnamed block device to QEMU's permission errors.
        let blk = Backend::new(&node, "an unnamed block device", perm, shared)
            .map_err(|e| e.to_string())?;
        let refs: Vec<BitmapRef<'_>> = args
            .get("bitmaps")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|b| match b.as_str() {
                Some(name) => BitmapRef::Local(name),
                None => BitmapRef::External {
                    node: str_of(b, "node").unwrap_or_default(),
                    name: str_of(b, "name").unwrap_or_default(),
                },
            })
            .collect();
        let found = strata_nbd::export_bitmaps(&node, &refs, !writable, |n, b| {
            crate::bitmaps::lookup(daemon, n, b).map(|(_, bm)| bm)
        });
        let bitmaps = match found {
            Ok(b) => b,
            Err(e) => {
                let _ = blk.close().await;
                return Err(e);
            }
        };
        let export = Arc::new(Export {
            name,
            description,
            blk: Arc::new(blk),
            writable,
            // As QEMU: whenever several connections may come, writable or
            // not; they share one user handle, so a flush on one covers
            // the writes completed on all.
            multi_conn: running.max_connections != 1,
            bitmaps,
            allocation_depth: args
                .get("allocation-depth")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            state: Default::default(),
        });
        running.server.add(Arc::clone(&export));
        self.list().insert(
            0,
            Entry {
                id,
                kind: Kind::Nbd(export),
            },
        );
        Ok(())
    }

    /// The rest of `block-export-add` for a FUSE export: mount it.
    fn add_fuse(
        &self,
        id: String,
        node: Arc<Node>,
        writable: bool,
        args: &Value,
    ) -> Result<(), String> {
        let growable = args
            .get("growable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let opts = FuseOptions {
            mountpoint: str_of(args, "mountpoint").unwrap_or_default().to_string(),
            writable,
            growable,
            allow_other: match str_of(args, "allow-other") {
                Some("on") => AllowOther::On,
                Some("off") => AllowOther::Off,
                _ => AllowOther::Auto,
            },
        };
        let (perm, shared) = FuseExport::perms(writable, growable);
        let blk = Arc::new(
            Backend::new(&node, "an unnamed block device", perm, shared)
                .map_err(|e| e.to_string())?,
        );
        let export = match FuseExport::start(opts, Arc::clone(&blk)) {
            Ok(e) => e,
            Err(e) => {
                // The handle goes with the export that failed.
                let blk = Arc::clone(&blk);
                tokio::spawn(async move { blk.close().await });
                return Err(e);
            }
        };
        self.list().insert(
            0,
            Entry {
                id,
                kind: Kind::Fuse(export),
            },
        );
        Ok(())
    }

    /// `nbd-server-add`: an export whose id is its name, the device's
    /// name by default; a read-only node is exported read-only.
    pub async fn nbd_server_add(&self, daemon: &Daemon, args: &Value) -> Result<(), String> {
        let device = str_of(args, "device").unwrap_or_default();
        let node = daemon
            .graph
            .find(device)
            .ok_or_else(|| format!("Cannot find device='{device}' nor node-name='{device}'"))?;
        let name = str_of(args, "name").unwrap_or(device);
        let mut opts = json!({
            "type": "nbd",
            "id": name,
            "node-name": node.name(),
            "name": name,
        });
        for key in ["description", "allocation-depth"] {
            if let Some(v) = args.get(key) {
                opts[key] = v.clone();
            }
        }
        let writable = args
            .get("writable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        opts["writable"] = Value::Bool(writable && !node.is_read_only());
        if let Some(b) = args.get("bitmap") {
            opts["bitmaps"] = json!([b]);
        }
        self.add(daemon, &opts).await
    }

    /// `block-export-del` (and `nbd-server-remove`, which names only NBD
    /// exports): in `safe` mode only an export nobody is connected to.
    pub async fn del(&self, daemon: &Daemon, args: &Value) -> Result<(), String> {
        let nbd = self.nbd.lock().await;
        let id = str_of(args, "id")
            .or_else(|| str_of(args, "name"))
            .unwrap_or_default();
        // Connections to an NBD export hold it; a FUSE export is only held
        // while a request runs.
        let Some(clients) = self
            .list()
            .iter()
            .find(|e| e.id == id)
            .map(|e| match &e.kind {
                Kind::Nbd(x) => x.state.clients(),
                Kind::Fuse(_) => 0,
            })
        else {
            return Err(format!("Export '{id}' is not found"));
        };
        let hard = str_of(args, "mode") == Some("hard");
        if !hard && clients > 0 {
            return Err(format!("export '{id}' still in use"));
        }
        self.remove(daemon, nbd.as_ref().map(|r| &*r.server), id)
            .await;
        Ok(())
    }

    /// Takes an export out of its server (or off its mount point), ends
    /// its connections, lets its node go and says so
    /// (`BLOCK_EXPORT_DELETED`).
    async fn remove(&self, daemon: &Daemon, server: Option<&Server>, id: &str) {
        let entry = {
            let mut l = self.list();
            let Some(i) = l.iter().position(|e| e.id == id) else {
                return;
            };
            l.remove(i)
        };
        match &entry.kind {
            Kind::Nbd(export) => {
                if let Some(server) = server {
                    server.remove(&export.name);
                }
                export.state.close().await;
                let _ = export.blk.close().await;
            }
            Kind::Fuse(export) => {
                export.close().await;
                let _ = export.backend().close().await;
            }
        }
        daemon.emit("BLOCK_EXPORT_DELETED", Some(json!({ "id": id })));
    }

    /// `query-block-exports`.
    pub fn query(&self) -> Value {
        Value::Array(
            self.list()
                .iter()
                .map(|e| {
                    json!({
                        "node-name": e.root().name(),
                        "shutting-down": false,
                        "type": e.type_name(),
                        "id": e.id,
                    })
                })
                .collect(),
        )
    }

    /// True while some export holds `node` (it cannot be deleted then).
    pub fn exports_node(&self, node: &Arc<Node>) -> bool {
        self.list().iter().any(|e| Arc::ptr_eq(&e.root(), node))
    }

    /// At shutdown: every export ends, then the server.
    pub async fn close_all(&self, daemon: &Daemon) {
        let _ = self.nbd_server_stop(daemon).await;
        let ids: Vec<String> = self.list().iter().map(|e| e.id.clone()).collect();
        for id in ids {
            self.remove(daemon, None, &id).await;
        }
    }
}
