//! The one image qemu-io works on and how it was opened (QEMU: the global
//! BlockBackend of qemu-io.c and its openfile()).

use std::sync::Arc;
use strata_block::engine::Aio;
use strata_block::options::Opts;
use strata_block::report::error_report;
use strata_block::{Backend, CacheMode, Node, OpenCtx, OpenFlags, Perm, Registry};

/// How to open an image: the flags of the command line or of `open`.
#[derive(Clone, Debug)]
pub struct OpenRequest {
    /// File name; None when the options name the image (`--image-opts`).
    pub name: Option<String>,
    /// Driver options (`-o`, `--image-opts`, `driver` from `-f`).
    pub opts: Opts,
    /// `-r`.
    pub read_only: bool,
    /// `-U`.
    pub force_share: bool,
    /// Cache mode; `writeback` is the guest write cache (QEMU's !writethrough).
    pub cache: CacheMode,
    /// io_uring (the default; `-i threads` turns it off).
    pub io_uring: bool,
    /// `-k` / `-i native`: Linux AIO, which needs O_DIRECT.
    pub native_aio: bool,
    /// `-s`: writes go to a temporary overlay.
    pub snapshot: bool,
    /// `-C`: reads copy backing data into the image.
    pub copy_on_read: bool,
    /// Discard requests reach the image (`-d unmap`, the default).
    pub unmap: bool,
}

impl Default for OpenRequest {
    /// qemu-io's defaults: read-write, cache=writethrough, discard=unmap; but
    /// aio=io_uring, Strata's default engine (same results, faster).
    fn default() -> Self {
        OpenRequest {
            name: None,
            opts: Opts::new(),
            read_only: false,
            force_share: false,
            cache: CacheMode {
                direct: false,
                writeback: false,
                no_flush: false,
            },
            io_uring: true,
            native_aio: false,
            snapshot: false,
            copy_on_read: false,
            unmap: true,
        }
    }
}

impl OpenRequest {
    /// Applies a cache mode name (`-t`); false if the name is unknown.
    pub fn set_cache(&mut self, mode: &str) -> bool {
        match CacheMode::parse(mode) {
            Ok(c) => {
                self.cache = c;
                true
            }
            Err(_) => false,
        }
    }

    /// `-n`: O_DIRECT with the write cache on, like `-t none`.
    pub fn set_nocache(&mut self) {
        self.cache.direct = true;
        self.cache.writeback = true;
    }

    /// Applies an aio mode name (`-i`); false if the name is unknown.
    pub fn set_aio(&mut self, mode: &str) -> bool {
        match mode {
            "threads" => self.io_uring = false,
            "native" => self.native_aio = true,
            "io_uring" => self.io_uring = true,
            _ => return false,
        }
        true
    }

    /// Applies a discard mode name (`-d`); false if the name is unknown.
    pub fn set_discard(&mut self, mode: &str) -> bool {
        match mode {
            "off" | "ignore" => self.unmap = false,
            "on" | "unmap" => self.unmap = true,
            _ => return false,
        }
        true
    }
}

/// The state of a qemu-io run.
pub struct Session {
    /// The drivers.
    pub registry: Arc<Registry>,
    /// The open image, if any.
    pub node: Option<Arc<Node>>,
    /// The user handle all I/O goes through (QEMU: qemu-io's BlockBackend).
    pub blk: Option<Arc<Backend>>,
    /// How `node` was opened, for `reopen`.
    pub opened: Option<OpenRequest>,
    /// `--image-opts` was given: `open` takes an option string.
    pub image_opts: bool,
    /// `quit` was run.
    pub quit: bool,
    /// aio requests still running (QEMU: in flight on the BlockBackend).
    in_flight: Vec<tokio::task::JoinHandle<()>>,
}

impl Session {
    /// A session with no image open.
    pub fn new(registry: Arc<Registry>, image_opts: bool) -> Session {
        Session {
            registry,
            node: None,
            blk: None,
            opened: None,
            image_opts,
            quit: false,
            in_flight: Vec::new(),
        }
    }

    /// Opens the image of `req` (QEMU: openfile); prints what went wrong.
    pub async fn open(&mut self, req: OpenRequest) -> Result<(), ()> {
        if self.node.is_some() {
            error_report("file open already, try 'help close'");
            return Err(());
        }
        let mut req = req;
        if req.force_share {
            match req.opts.get("force-share") {
                Some(serde_json::Value::String(v)) if v != "on" => {
                    error_report("-U conflicts with image options");
                    return Err(());
                }
                _ => {}
            }
        }
        match self.open_node(&mut req).await {
            Ok(node) => {
                self.attach(node, req);
                Ok(())
            }
            Err(msg) => {
                match &req.name {
                    Some(n) => error_report(format!("can't open device {n}: {msg}")),
                    None => error_report(format!("can't open: {msg}")),
                }
                Err(())
            }
        }
    }

    async fn open_node(&self, req: &mut OpenRequest) -> Result<Arc<Node>, String> {
        open_node(&self.registry, req).await
    }

    /// Opens the current image again with the flags of `req`. Only the write
    /// cache changes in place; anything else closes and reopens the node
    /// (an image lock cannot be held twice), going back to the old flags if
    /// the new ones fail. The error is the message to report.
    pub async fn reopen(&mut self, req: OpenRequest, new_opts: &Opts) -> Result<(), String> {
        self.drain().await;
        let (Some(node), Some(old)) = (&self.node, self.opened.clone()) else {
            return Err("no file open".into());
        };
        check_generic_options(new_opts)?;
        check_unchanged(node, new_opts)?;
        let same_node = req.read_only == old.read_only
            && req.cache.direct == old.cache.direct
            && req.cache.no_flush == old.cache.no_flush
            && req.opts == old.opts;
        if same_node {
            node.set_writeback(req.cache.writeback);
            self.opened = Some(req);
            return Ok(());
        }
        // The last reference must go before the image is opened again: the
        // file and its lock are released when the node is dropped.
        self.close().await;
        let mut req = req;
        match self.open_node(&mut req).await {
            Ok(n) => {
                self.attach(n, req);
                Ok(())
            }
            Err(msg) => {
                let mut old = old;
                if let Ok(n) = self.open_node(&mut old).await {
                    self.attach(n, old);
                }
                Err(msg)
            }
        }
    }

    /// Makes `node` the session's image, used through a user handle that
    /// takes what qemu-io's takes (read, and write and resize unless
    /// read-only) and shares everything (image locks are the file's).
    fn attach(&mut self, node: Arc<Node>, req: OpenRequest) {
        // The write cache is a property of the user of the image, not
        // of the nodes below it (QEMU: blk_set_enable_write_cache).
        node.set_writeback(req.cache.writeback);
        let mut perm = Perm::CONSISTENT_READ;
        if !node.is_read_only() {
            perm = perm.with(Perm::WRITE).with(Perm::RESIZE);
        }
        // The only user of a node it just opened: nothing can conflict.
        self.blk = Backend::new(&node, "an unnamed block device", perm, Perm::ALL)
            .ok()
            .map(Arc::new);
        self.node = Some(node);
        self.opened = Some(req);
    }

    /// Starts an aio request. It runs whenever the event loop gets to run
    /// (during a later command's I/O, `aio_flush`, `sleep` or the drain at
    /// exit), and reports when it completes, as in qemu-io.
    pub fn spawn(&mut self, request: impl std::future::Future<Output = ()> + Send + 'static) {
        self.in_flight.retain(|h| !h.is_finished());
        self.in_flight.push(tokio::spawn(request));
    }

    /// Waits for every aio request (QEMU: blk_drain_all).
    pub async fn drain(&mut self) {
        for h in std::mem::take(&mut self.in_flight) {
            // A request that panicked has nothing left to report.
            let _ = h.await;
        }
    }

    /// Closes the image after its requests, writing back what is cached
    /// (QEMU: blk_unref).
    pub async fn close(&mut self) {
        self.drain().await;
        self.opened = None;
        if let Some(blk) = self.blk.take() {
            let _ = blk.close().await;
        }
        if let Some(node) = self.node.take() {
            // As in QEMU, a failure to write back at close is not reported.
            let _ = node.close().await;
        }
    }

    /// Discard requests reach the image.
    pub fn unmap(&self) -> bool {
        self.opened.as_ref().is_none_or(|r| r.unmap)
    }
}

/// The options every node takes, parsed before anything else so that a
/// bad value is named by its full key (QEMU: bdrv_runtime_opts).
fn check_generic_options(opts: &Opts) -> Result<(), String> {
    for key in ["read-only", "auto-read-only", "force-share", "active"] {
        check_bool(opts.get(key), key)?;
    }
    if let Some(serde_json::Value::Object(cache)) = opts.get("cache") {
        for key in ["direct", "no-flush"] {
            check_bool(cache.get(key), &format!("cache.{key}"))?;
        }
    }
    Ok(())
}

fn check_bool(v: Option<&serde_json::Value>, key: &str) -> Result<(), String> {
    match v {
        None | Some(serde_json::Value::Bool(_)) => Ok(()),
        Some(serde_json::Value::String(s))
            if matches!(
                s.as_str(),
                "on" | "off" | "yes" | "no" | "true" | "false" | "y" | "n"
            ) =>
        {
            Ok(())
        }
        Some(_) => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// A reopen may change how a node is used, never which node it is: its
/// name and driver stay (QEMU: bdrv_reopen_prepare). `opts` are the new
/// options in nested form; children are checked under their edge names.
fn check_unchanged(node: &Arc<Node>, opts: &Opts) -> Result<(), String> {
    if let Some(v) = opts.get("node-name") {
        // An automatic name was never an option, so any new one differs.
        let explicit = !node.name().starts_with('#');
        if !(explicit && v.as_str() == Some(node.name())) {
            return Err("Cannot change the option 'node-name'".into());
        }
    }
    if let Some(v) = opts.get("driver") {
        if v.as_str() != Some(node.format_name()) {
            return Err("Cannot change the option 'driver'".into());
        }
    }
    for child in node.children() {
        match opts.get(&child.role.name()) {
            Some(serde_json::Value::Object(o)) => check_unchanged(&child.node, o)?,
            Some(serde_json::Value::String(s)) if s == child.node.name() => {}
            Some(_) => return Err(format!("Cannot change the option '{}'", child.role.name())),
            None => {}
        }
    }
    Ok(())
}

/// Opens the node `req` describes, as qemu-io's and qemu-nbd's openers do
/// (QEMU: blk_new_open with their flags); `Err` is the message.
pub(crate) async fn open_node(
    registry: &Arc<Registry>,
    req: &OpenRequest,
) -> Result<Arc<Node>, String> {
    open_node_in(registry, req, strata_block::Graph::new()).await
}

/// [`open_node`] into `graph`, so that later opens can name its nodes.
pub(crate) async fn open_node_in(
    registry: &Arc<Registry>,
    req: &OpenRequest,
    graph: Arc<strata_block::Graph>,
) -> Result<Arc<Node>, String> {
    let mut opts = req.opts.clone();
    let mut force_share = req.force_share;
    if let Some(v) = opts.remove("force-share") {
        force_share = v == "on" || v == true;
    }
    if let Some(serde_json::Value::String(d)) = opts.get("driver") {
        // QEMU names an unknown driver before it looks at the file.
        if registry.get(d).is_none() {
            return Err(format!("Unknown driver '{d}'"));
        }
    }
    if force_share && !req.read_only {
        return Err("force-share=on can only be used with read-only images".into());
    }
    if req.native_aio && !req.cache.direct {
        return Err(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
                .into(),
        );
    }
    let flags = OpenFlags {
        read_only: req.read_only,
        force_share,
        cache: CacheMode {
            writeback: true,
            ..req.cache
        },
        aio: if req.io_uring || req.native_aio {
            Aio::IoUring
        } else {
            Aio::Threads
        },
        unmap: req.unmap,
        copy_on_read: req.copy_on_read,
        snapshot: req.snapshot,
        ..OpenFlags::default()
    };
    let ctx = OpenCtx::with_graph(Arc::clone(registry), flags, graph);
    ctx.open_image(req.name.as_deref(), None, opts)
        .await
        .map_err(|e| e.to_string())
}
