//! Opening nodes (QEMU: bdrv_open): the driver registry, format probing, the
//! protocol node under a format, backing files with relative names, and the
//! options every node takes (read-only, cache, aio, locking).

use crate::driver::{ChildRole, DriverClass, Perm};
use crate::engine::Aio;
use crate::error::{Error, Result};
use crate::node::{CacheMode, DetectZeroes, Node, NodeOptions};
use crate::options::{take_bool, take_dict, take_str, Opts};
use serde_json::Value;
use std::sync::Arc;

/// The drivers the tools know, registered at start-up.
#[derive(Clone, Default)]
pub struct Registry {
    classes: Vec<Arc<dyn DriverClass>>,
}

impl Registry {
    /// Adds a driver.
    pub fn register(&mut self, class: Arc<dyn DriverClass>) {
        // A class of the same name and protocol prefix gives way, in its
        // place (nbd is one name with three prefixes: nbd, nbd+tcp, nbd+unix).
        let same = |c: &Arc<dyn DriverClass>| {
            c.name() == class.name() && c.protocol_name() == class.protocol_name()
        };
        match self.classes.iter().position(same) {
            Some(i) => self.classes[i] = class,
            None => self.classes.push(class),
        }
    }
    /// The driver called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn DriverClass>> {
        self.classes.iter().find(|c| c.name() == name).cloned()
    }
    /// Every registered driver.
    pub fn all(&self) -> &[Arc<dyn DriverClass>] {
        &self.classes
    }
    /// The driver called `name`, or QEMU's error for an unknown format.
    pub fn format(&self, name: &str) -> Result<Arc<dyn DriverClass>> {
        self.get(name)
            .ok_or_else(|| Error::invalid(format!("Unknown driver '{name}'")))
    }
}

/// Flags of an open, inherited by the children (QEMU: BDRV_O_*).
#[derive(Clone, Debug)]
pub struct OpenFlags {
    /// Open read-only.
    pub read_only: bool,
    /// Share every permission and take none but reading (`-U`).
    pub force_share: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// I/O engine for file nodes.
    pub aio: Aio,
    /// Do not open backing files (`-u`, `info` of a broken chain).
    pub no_backing: bool,
    /// Skip image locking entirely (`locking=off`).
    pub locking: bool,
    /// The user reads no data (qemu-img info): no consistent-read permission.
    pub no_io: bool,
    /// The user will change the size (qemu-img resize, bench -w, check -r).
    pub resize: bool,
    /// Opened to be checked: formats open what they can and leave the
    /// complaints to their check (QEMU: BDRV_O_CHECK).
    pub check: bool,
    /// Discard requests are passed on (`discard=unmap`, BDRV_O_UNMAP).
    pub unmap: bool,
    /// The top node copies backing data up on reads (`-C`).
    pub copy_on_read: bool,
    /// Writes go to a temporary overlay that vanishes with the process
    /// (`-s`, `snapshot=on`).
    pub snapshot: bool,
    /// Opened inactive (`active=off`): nothing is written and no lock taken
    /// until activation (QEMU: BDRV_O_INACTIVE).
    pub inactive: bool,
    /// The open stands for QEMU's reopen of a chain already open (commit
    /// making its base writable): a guessed raw image is not warned about
    /// again, as QEMU's reopen opens nothing.
    pub reopen: bool,
}

impl Default for OpenFlags {
    fn default() -> Self {
        OpenFlags {
            read_only: false,
            force_share: false,
            cache: CacheMode::default(),
            aio: Aio::IoUring,
            no_backing: false,
            locking: true,
            no_io: false,
            resize: false,
            check: false,
            unmap: true,
            copy_on_read: false,
            snapshot: false,
            inactive: false,
            reopen: false,
        }
    }
}

impl OpenFlags {
    /// Permissions the user of the top node takes, and shares: what it
    /// needs, sharing everything (QEMU: blk_new_open). Formats restrict
    /// further for their own file (see [`DriverClass::child_perms`]).
    pub fn user_perms(&self) -> (Perm, Perm) {
        let mut perm = Perm::NONE;
        if !self.no_io {
            perm = perm.with(Perm::CONSISTENT_READ);
        }
        if !self.read_only {
            perm = perm.with(Perm::WRITE);
        }
        if self.resize {
            perm = perm.with(Perm::RESIZE);
        }
        (perm, Perm::ALL)
    }
}

/// What an open needs: the registry, the flags, and the chain being opened
/// (for loop detection).
#[derive(Clone)]
pub struct OpenCtx {
    /// The drivers.
    pub registry: Arc<Registry>,
    /// The graph new nodes join, and where references by name are looked up.
    pub graph: Arc<crate::graph::Graph>,
    /// Flags of this open.
    pub flags: OpenFlags,
    /// File names of the images above this one, outermost first.
    chain: Vec<String>,
    /// The protocol node under the format being opened.
    file: Option<Arc<Node>>,
    /// Set while opening a format's file: the format applies permissions later.
    file_perms: Option<(Perm, Perm)>,
    /// What the node being opened takes and shares, for the children it
    /// opens by itself (a qcow2 data file).
    node_perms: Option<(Perm, Perm)>,
    /// The format being opened was guessed by probing.
    probed: bool,
    /// The node being opened is not probed: its driver is a protocol, named
    /// or chosen by the file name's prefix (QEMU: BDRV_O_PROTOCOL).
    protocol: bool,
    /// An open node to use as the backing file instead of the one the image
    /// names (the temporary overlay of `-s` sits on the image this way).
    backing_node: Option<Arc<Node>>,
}

/// Largest number of bytes format probing reads.
const PROBE_BYTES: usize = 2048;

/// Deepest backing chain we open (QEMU has no limit; this stops runaway chains).
const MAX_CHAIN_DEPTH: usize = 1000;

impl OpenCtx {
    /// A context for a top-level open.
    pub fn new(registry: Arc<Registry>, flags: OpenFlags) -> OpenCtx {
        Self::with_graph(registry, flags, crate::graph::Graph::new())
    }

    /// A context whose nodes join `graph` (a daemon's one graph).
    pub fn with_graph(
        registry: Arc<Registry>,
        flags: OpenFlags,
        graph: Arc<crate::graph::Graph>,
    ) -> OpenCtx {
        OpenCtx {
            registry,
            graph,
            flags,
            chain: Vec::new(),
            file: None,
            file_perms: None,
            node_perms: None,
            probed: false,
            protocol: false,
            backing_node: None,
        }
    }

    /// Opens an image: `filename` (or `json:{...}`), an optional format, and
    /// options (`--image-opts`, `-o`). Probes the format when none is given.
    pub async fn open_image(
        &self,
        filename: Option<&str>,
        format: Option<&str>,
        mut opts: Opts,
    ) -> Result<Arc<Node>> {
        if let Some(f) = format {
            if let Some(Value::String(d)) = opts.get("driver") {
                if d != f {
                    return Err(Error::invalid(format!(
                        "Cannot use '{f}' as the format, the driver is already '{d}'"
                    )));
                }
            }
            opts.insert("driver".into(), Value::String(f.to_string()));
        }
        self.open_node(filename, opts).await
    }

    /// Opens the child `key` of a node being opened (QEMU: bdrv_open_child):
    /// its options are `key.*` of `opts`, its file name `filename` when the
    /// parent parsed one. Whether it is probed follows QEMU's inheritance:
    /// children of formats (but backing files) and filtered children of
    /// protocols are not; pure data children of filters are. None when
    /// nothing names the child.
    pub async fn open_child(
        &self,
        opts: &mut Opts,
        key: &str,
        filename: Option<&str>,
        role: ChildRole,
        parent_is_format: bool,
    ) -> Result<Option<Arc<Node>>> {
        let child_opts = take_dict(opts, key)?;
        if child_opts.is_none() && filename.is_none() {
            return Ok(None);
        }
        let mut ctx = self.clone();
        ctx.file = None;
        ctx.file_perms = None;
        ctx.node_perms = None;
        ctx.probed = false;
        ctx.unmap_children();
        if !parent_is_format && role.is_pure_data() {
            ctx.protocol = false;
        }
        if parent_is_format && role != ChildRole::Backing {
            ctx.protocol = true;
        }
        let child_opts = child_opts.unwrap_or_default();
        Box::pin(ctx.open_node(filename, child_opts))
            .await
            .map(Some)
    }

    /// QEMU's bdrv_open_inherit: picks the driver (given, by protocol prefix,
    /// or by probing), opens a `file` child for drivers that are not
    /// protocols, then the node itself.
    async fn open_node(&self, filename: Option<&str>, mut opts: Opts) -> Result<Arc<Node>> {
        if let Some(Value::String(r)) = opts.get("node-ref") {
            if filename.is_some() || opts.len() > 1 {
                return Err(Error::invalid(
                    "Cannot reference an existing block device with additional options or a new filename",
                ));
            }
            return self.reference(r);
        }
        let mut filename = filename.map(str::to_string);
        if let Some(json) = filename.as_deref().and_then(|f| f.strip_prefix("json:")) {
            // Options given directly win over those in the file name.
            for (k, v) in crate::options::parse_json(json)? {
                opts.entry(k).or_insert(v);
            }
            filename = None;
        }
        let mut ctx = self.clone();
        let own = crate::filename::own_options(&opts, None);
        if take_bool(&mut opts, "snapshot")?.unwrap_or(false) {
            ctx.flags.snapshot = true;
        }
        if ctx.flags.snapshot {
            return Box::pin(ctx.open_with_temp_overlay(filename, opts)).await;
        }
        if let Some(ro) = take_bool(&mut opts, "read-only")? {
            ctx.flags.read_only = ro;
        }
        ctx.apply_cache_opts(&mut opts)?;
        let node_opts = ctx.take_node_options(&mut opts)?;
        // Children of an inactive node are inactive too.
        ctx.flags.inactive = node_opts.inactive;
        // What follows opens children, which inherit none of these.
        ctx.unmap_children();
        let driver = take_str(&mut opts, "driver")?;
        let node_name = take_str(&mut opts, "node-name")?;
        // An empty name asks for an automatic one only when not given at all.
        if node_name.as_deref() == Some("") {
            return Err(Error::invalid("Invalid node-name: ''"));
        }
        let node_name = node_name.unwrap_or_default();
        ctx.graph.check_new_name(&node_name)?;
        let class = match &driver {
            Some(d) => Some(ctx.registry.format(d)?),
            None => None,
        };
        // An explicit driver decides; otherwise the parent's say.
        let protocol = class.as_ref().map_or(ctx.protocol, |c| c.is_protocol());
        if protocol {
            return ctx
                .open_protocol(class, filename, opts, &node_name, node_opts)
                .await;
        }

        // Not a protocol: a format or filter on a `file` child.
        let file_opts = take_dict(&mut opts, "file")?;
        if filename.is_none() && file_opts.is_none() {
            filename = take_str(&mut opts, "filename")?;
        }
        // The file is opened without locks; the format decides them below.
        let mut fctx = ctx.clone();
        fctx.file_perms = Some((Perm::NONE, Perm::ALL));
        fctx.file = None;
        fctx.protocol = true;
        let file_node = match (file_opts, &filename) {
            (Some(fo), f) => Some(Box::pin(fctx.open_node(f.as_deref(), fo)).await?),
            (None, Some(f)) => Some(Box::pin(fctx.open_node(Some(f), Opts::new())).await?),
            (None, None) => None,
        };
        let display_name = filename
            .clone()
            .or_else(|| file_node.as_ref().map(|f| f.filename().to_string()))
            .unwrap_or_default();
        let probed = class.is_none();
        let class = match (class, &file_node) {
            (Some(c), _) => Ok(c),
            (None, Some(f)) => ctx.probe(f, &display_name).await,
            (None, None) => Err(Error::invalid("Must specify either driver or file")),
        };
        let class = match class {
            Ok(c) if ctx.chain.len() <= MAX_CHAIN_DEPTH => c,
            Ok(_) => {
                release(file_node).await;
                return Err(Error::invalid("Backing chain is too deep"));
            }
            Err(e) => {
                release(file_node).await;
                return Err(e);
            }
        };
        ctx.chain.push(display_name.clone());
        let (perm, shared) = ctx.file_perms.unwrap_or_else(|| ctx.flags.user_perms());
        if let Some(f) = &file_node {
            // Now that the format is known, the file gets the permissions the
            // format needs on it.
            let (fperm, fshared) = class.child_perms(perm, shared, &ctx.flags);
            if let Err(e) = f.set_perm(fperm, fshared) {
                release(file_node).await;
                return Err(e);
            }
        }
        let mut open_ctx = ctx.clone();
        open_ctx.file = file_node.clone();
        open_ctx.file_perms = None;
        open_ctx.node_perms = Some((perm, shared));
        open_ctx.probed = probed;
        open_ctx.protocol = false;
        let backing = if ctx.flags.no_io {
            crate::filename::BackingSource::NoIo
        } else if opts.get("backing").is_some_and(|b| !only_tunes(b)) || ctx.backing_node.is_some()
        {
            crate::filename::BackingSource::Explicit
        } else {
            crate::filename::BackingSource::Implicit
        };
        let ticket = ctx.graph.ticket();
        let drv = match class.open(&open_ctx, &mut opts).await {
            Ok(d) => d,
            Err(e) => {
                release(file_node).await;
                return Err(e);
            }
        };
        if let Err(e) = crate::options::reject_unknown(&opts, class.name()) {
            // The driver holds its children now; closing it lets them go.
            let _ = drv.close().await;
            return Err(e);
        }
        let naming = crate::filename::Naming::opened(class, &*drv, own, &display_name, backing);
        let node = Node::new(&node_name, naming, drv, node_opts);
        ctx.graph.add_at(&node, ticket);
        if let Err(e) = node.load_bitmaps().await {
            let _ = node.close().await;
            return Err(e);
        }
        Ok(node)
    }

    /// A child given as the name of an open node (QEMU: the reference of
    /// bdrv_open_inherit): the parent shares it, taking a reference.
    pub fn reference(&self, name: &str) -> Result<Arc<Node>> {
        let node = self.graph.lookup(name)?;
        node.add_ref();
        Ok(node)
    }

    /// A node named, or defined by its options (QEMU:
    /// bdrv_co_open_blockdev_ref), with a reference taken: `close` lets go.
    pub async fn open_blockdev_ref(&self, r: Value) -> Result<Arc<Node>> {
        match r {
            Value::String(name) => self.reference(&name),
            Value::Object(o) => self.open_image(None, None, o).await,
            _ => Err(Error::invalid("Invalid block device reference")),
        }
    }

    /// The options every node takes (QEMU: bdrv_open_common): read-only and
    /// cache are already applied to the flags.
    fn take_node_options(&self, opts: &mut Opts) -> Result<NodeOptions> {
        let unmap = match take_str(opts, "discard")? {
            None => self.flags.unmap,
            Some(d) => crate::node::parse_discard(&d)?,
        };
        let detect_zeroes = match take_str(opts, "detect-zeroes")? {
            None => DetectZeroes::Off,
            Some(v) => DetectZeroes::parse(&v)
                .map_err(|_| Error::invalid(format!("invalid parameter value: {v}")))?,
        };
        crate::node::check_detect_zeroes(detect_zeroes, unmap)?;
        // Accepted on every node; Strata never needs them to decide anything
        // (auto-read-only: a read-write open that fails is not retried).
        let _ = take_bool(opts, "auto-read-only")?;
        let inactive = match take_bool(opts, "active")? {
            Some(active) => !active,
            None => self.flags.inactive,
        };
        let _ = take_bool(opts, "force-share")?;
        let copy_on_read = take_bool(opts, "copy-on-read")?.unwrap_or(self.flags.copy_on_read);
        if copy_on_read && self.flags.read_only {
            return Err(Error::invalid("Can't use copy-on-read on read-only device"));
        }
        Ok(NodeOptions {
            read_only: self.flags.read_only,
            cache: self.flags.cache,
            unmap,
            detect_zeroes,
            copy_on_read,
            inactive,
        })
    }

    /// Opens a protocol node (QEMU: bdrv_fill_options, then the driver's
    /// file_open): the driver named, or the one the file name's prefix
    /// selects, parses the file name into its options.
    async fn open_protocol(
        mut self,
        class: Option<Arc<dyn DriverClass>>,
        filename: Option<String>,
        mut opts: Opts,
        node_name: &str,
        node_opts: NodeOptions,
    ) -> Result<Arc<Node>> {
        if filename.is_some() && opts.contains_key("filename") {
            return Err(Error::invalid(
                "Can't specify 'file' and 'filename' options at the same time",
            ));
        }
        let class = match (class, &filename, opts.get("filename")) {
            (Some(c), _, _) => c,
            (None, Some(f), _) => self.find_protocol(f, true)?,
            // A `filename` option is never parsed for a prefix.
            (None, None, Some(Value::String(f))) => self.find_protocol(f, false)?,
            _ => return Err(Error::invalid("Must specify either driver or file")),
        };
        if let Some(f) = &filename {
            class.parse_filename(f, &mut opts)?;
        }
        let own = crate::filename::own_options(&opts, Some(class.name()));
        // The plain name is the `filename` option as the driver parsed it.
        let exact = match opts.get("filename") {
            Some(Value::String(f)) => f.clone(),
            _ => String::new(),
        };
        let mut own = own;
        own.insert("driver".into(), class.name().into());
        self.protocol = true;
        // Named before its driver opens the children it has (blkdebug's
        // image), as QEMU names it in bdrv_open_common.
        let ticket = self.graph.ticket();
        let drv = class.open(&self, &mut opts).await?;
        if let Err(e) = crate::options::reject_unknown(&opts, class.name()) {
            let _ = drv.close().await;
            return Err(e);
        }
        let naming = crate::filename::Naming::opened(
            class,
            &*drv,
            own,
            &exact,
            crate::filename::BackingSource::Implicit,
        );
        let node = Node::new(node_name, naming, drv, node_opts);
        self.graph.add_at(&node, ticket);
        Ok(node)
    }

    /// Opens the protocol node a file name names, its prefix choosing the
    /// driver (`nbd://…`, a plain path for `file`): where a format creates
    /// or writes its image (QEMU: bdrv_open with BDRV_O_PROTOCOL).
    pub async fn open_file(&self, filename: &str) -> Result<Arc<Node>> {
        let mut ctx = self.clone();
        ctx.protocol = true;
        ctx.open_node(Some(filename), Opts::new()).await
    }

    /// Creates the file of an image being created with the protocol its
    /// name selects (QEMU: bdrv_co_create_file).
    pub async fn create_file(&self, filename: &str, opts: Opts) -> Result<()> {
        let class = self.find_protocol(filename, true)?;
        class.create(self, filename, opts).await
    }

    /// The protocol driver a file name selects (QEMU: bdrv_find_protocol):
    /// `name:rest` where `name` comes before any `/` selects the driver with
    /// that protocol name; anything else is a plain file.
    pub fn find_protocol(
        &self,
        filename: &str,
        allow_prefix: bool,
    ) -> Result<Arc<dyn DriverClass>> {
        // Devices first, so that device names with colons still open.
        if let Some(name) = host_device_driver(filename) {
            if let Some(c) = self.registry.get(name) {
                return Ok(c);
            }
        }
        let head_end = filename.find([':', '/']).unwrap_or(filename.len());
        if !allow_prefix || filename.as_bytes().get(head_end) != Some(&b':') {
            return self.registry.format("file");
        }
        let proto = &filename[..head_end];
        self.registry
            .all()
            .iter()
            .find(|c| c.protocol_name() == Some(proto))
            .cloned()
            .ok_or_else(|| Error::invalid(format!("Unknown protocol '{proto}'")))
    }

    /// Makes the image being opened use `node` as its backing file.
    pub(crate) fn set_backing_node(&mut self, node: Arc<Node>) {
        self.backing_node = Some(node);
    }

    /// Children inherit neither copy-on-read nor a discard mode (QEMU:
    /// bdrv_inherited_options).
    fn unmap_children(&mut self) {
        self.flags.unmap = true;
        self.flags.copy_on_read = false;
        self.flags.snapshot = false;
    }

    /// Reads the start of `file` and asks every format how sure it is.
    async fn probe(&self, file: &Arc<Node>, filename: &str) -> Result<Arc<dyn DriverClass>> {
        let n = (file.length() as usize).min(PROBE_BYTES);
        let head = file
            .read(0, crate::IoBuf::zeroed(n))
            .await
            .map_err(|e| e.context("Could not read image for determining its format"))?;
        let mut best: Option<(u32, Arc<dyn DriverClass>)> = None;
        for c in self.registry.all() {
            if c.is_protocol() {
                continue;
            }
            let score = c.probe(head.as_slice(), filename);
            if score > 0 && best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, Arc::clone(c)));
            }
        }
        match best {
            Some((_, c)) => {
                // Only a writer can damage a guessed raw image's first block.
                if c.name() == "raw" && !self.flags.read_only && !self.flags.reopen {
                    // QEMU prints this one without the program name.
                    crate::stderr_line!(
                        "WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
                    );
                }
                Ok(c)
            }
            None => Err(Error::invalid("Could not determine image format")),
        }
    }

    /// The protocol node under the format being opened (for format drivers).
    pub fn file(&self) -> Result<Arc<Node>> {
        self.file
            .clone()
            .ok_or_else(|| Error::invalid("A block device must be specified for \"file\""))
    }

    /// What the node being opened takes and shares (what its user asked
    /// for): the base of the permissions it takes on children it opens itself.
    pub fn node_perms(&self) -> (Perm, Perm) {
        self.node_perms.unwrap_or_else(|| self.flags.user_perms())
    }

    /// True when the format being opened was guessed by probing (raw then
    /// guards its first sector, see the raw driver).
    pub fn probed(&self) -> bool {
        self.probed
    }

    /// Formats that recognise `header` as theirs (protocols and raw aside).
    pub fn probe_formats(registry: &Registry, header: &[u8]) -> bool {
        registry
            .all()
            .iter()
            .any(|c| !c.is_protocol() && c.name() != "raw" && c.probe(header, "") > 1)
    }

    fn apply_cache_opts(&mut self, opts: &mut Opts) -> Result<()> {
        if let Some(Value::Object(mut cache)) = opts.remove("cache") {
            // Errors name the key as the user wrote it.
            let full = |e: Error, k: &str| {
                Error::invalid(
                    e.to_string()
                        .replace(&format!("'{k}'"), &format!("'cache.{k}'")),
                )
            };
            if let Some(d) = take_bool(&mut cache, "direct").map_err(|e| full(e, "direct"))? {
                self.flags.cache.direct = d;
            }
            if let Some(n) = take_bool(&mut cache, "no-flush").map_err(|e| full(e, "no-flush"))? {
                self.flags.cache.no_flush = n;
            }
            if let Some(k) = cache.keys().next() {
                return Err(Error::invalid(format!("Invalid parameter 'cache.{k}'")));
            }
        }
        if let Some(a) = take_str(opts, "aio")? {
            // Linux AIO only works on O_DIRECT files (QEMU's file-posix check).
            if a == "native" && !self.flags.cache.direct {
                return Err(Error::invalid(
                    "aio=native was specified, but it requires cache.direct=on, which was not specified.",
                ));
            }
            self.flags.aio = Aio::parse(&a)?;
        }
        Ok(())
    }

    /// Opens the backing file `name` of the image stored in `parent` (relative
    /// names are relative to its directory), read-only, with format `format`
    /// or probed. Refuses a chain that loops. Options that name the backing
    /// file's own file (`file.filename`) replace the name, as in QEMU's
    /// bdrv_open_backing_file; without a name the options say it all.
    pub async fn open_backing(
        &self,
        parent: &Arc<Node>,
        name: Option<&str>,
        format: Option<&str>,
        opts: Opts,
    ) -> Result<Arc<Node>> {
        if let Some(node) = &self.backing_node {
            return Ok(Arc::clone(node));
        }
        let named_file =
            matches!(opts.get("file"), Some(Value::Object(f)) if f.contains_key("filename"));
        let path = match name {
            Some(n) if !named_file => Some((n, parent.full_backing_filename(n)?)),
            _ => None,
        };
        if let Some((name, path)) = &path {
            let canon = canonical(path);
            if self.chain.iter().any(|p| canonical(p) == canon) {
                return Err(Error::invalid(format!(
                    "Backing file '{name}' of '{}' creates a loop",
                    parent.filename()
                )));
            }
        }
        // A backing file is only read: consistent read, everything shared.
        let mut ctx = self.clone();
        ctx.flags.read_only = true;
        ctx.flags.resize = false;
        ctx.file = None;
        ctx.file_perms = None;
        ctx.node_perms = None;
        ctx.protocol = false;
        ctx.unmap_children();
        // A driver the user names for the backing file beats the header's.
        let format = if opts.contains_key("driver") {
            None
        } else {
            format
        };
        let path = path.map(|(_, p)| p);
        Box::pin(ctx.open_image(path.as_deref(), format, opts)).await
    }
}

/// True when backing options only tune how the image's own backing file is
/// opened (`backing.read-only=off` for a commit) and name no other one.
fn only_tunes(backing: &Value) -> bool {
    const TUNING: &[&str] = &[
        "read-only",
        "auto-read-only",
        "cache",
        "force-share",
        "discard",
    ];
    matches!(backing, Value::Object(m) if m.keys().all(|k| TUNING.contains(&k.as_str())))
}

/// Gives back the file node of an open that failed: it was opened, or
/// referenced, for the node that will not exist (QEMU: bdrv_unref_child on
/// the error path), so a node shared by name is no longer held.
async fn release(file: Option<Arc<Node>>) {
    if let Some(f) = file {
        let _ = f.close().await;
    }
}

/// The device driver for a file name that is a block or character device
/// (QEMU: find_hdev_driver).
fn host_device_driver(filename: &str) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let ft = std::fs::metadata(filename).ok()?.file_type();
    if !(ft.is_block_device() || ft.is_char_device()) {
        return None;
    }
    if filename.starts_with("/dev/cdrom") || filename.starts_with("/dev/sr") {
        return Some("host_cdrom");
    }
    Some("host_device")
}

fn canonical(p: &str) -> String {
    std::fs::canonicalize(p)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| p.to_string())
}

/// True when `name` starts with a protocol prefix (`nbd:`, `blkdebug:`)
/// before any `/` (QEMU: path_has_protocol).
pub fn has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes()[i] == b':')
}

/// Resolves `name` relative to the directory of `base` (QEMU: path_combine):
/// absolute names and names with a protocol prefix (`rbd:`, `nbd://`,
/// `json:`) stay as they are (QEMU: bdrv_get_full_backing_filename_from_filename).
pub fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') || has_protocol(name) {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine() {
        assert_eq!(
            path_combine("/a/b/top.qcow2", "base.qcow2"),
            "/a/b/base.qcow2"
        );
        assert_eq!(path_combine("top.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(path_combine("d/top", "/abs"), "/abs");
        assert_eq!(path_combine("d/top", "../x"), "d/../x");
        assert_eq!(path_combine("d/top", "rbd:p/i:conf=/c"), "rbd:p/i:conf=/c");
        assert_eq!(path_combine("d/top", "nbd+unix:///e"), "nbd+unix:///e");
    }
}
