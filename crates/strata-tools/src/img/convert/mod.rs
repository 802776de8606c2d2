//! `qemu-img convert`: copies one image, or several concatenated, into a
//! new image (created with the output format) or, with `-n`, into an
//! existing one. Options, checks, messages and exit codes follow qemu-img;
//! the copy itself is in `copy.rs`.

mod bitmaps;
mod copy;

use super::create::{merged_options, opts_of, print_help, set_option, SetOpt};
use super::{cvtnum_full, getopt, long, opt, Ctx};
use crate::progress::Progress;
use copy::{Convert, Source};
use std::cell::RefCell;
use std::sync::Arc;
use strata_block::options::parse_keyval;
use strata_block::report::error_report;
use strata_block::snapshot::SnapshotSel;
use strata_block::{Backend, CacheMode, ChildRole, DriverClass, Node, OpenCtx, OpenFlags, Perm};

/// QEMU's table, in its order (ambiguous abbreviations list candidates in it).
const OPTS: &[super::Opt] = &[
    opt('h', Some("help"), false),
    opt('q', Some("quiet"), false),
    long("object", true),
    long("image-opts", false),
    long("source-image-opts", false),
    opt('f', Some("source-format"), true),
    opt('T', Some("source-cache"), true),
    opt('l', Some("snapshot"), true),
    opt('S', Some("sparse-size"), true),
    opt('O', Some("output-format"), true),
    opt('o', Some("options"), true),
    opt('t', Some("output-cache"), true),
    opt('B', Some("backing"), true),
    opt('F', Some("backing-format"), true),
    opt('U', Some("force-share"), false),
    long("target-image-opts", false),
    long("salvage", false),
    long("target-is-zero", false),
    long("bitmaps", false),
    long("skip-broken-bitmaps", false),
    // Strata's own: `--progress=json` for pipelines (qemu-img has only -p;
    // the help stays qemu-img's, byte for byte, and the README names it).
    long("progress", true),
    opt('r', Some("rate"), true),
    opt('m', Some("parallel"), true),
    opt('W', Some("oob-writes"), false),
    opt('C', Some("copy-range-offloading"), false),
    opt('c', None, false),
    opt('p', None, false),
    opt('n', None, false),
];

const HELP: &str = "Usage:
Copy one image to another with optional format conversion.  Usage:

  qemu-img convert [-f SRC_FMT|--image-opts] [-T SRC_CACHE] [--bitmaps [--skip-broken-bitmaps]]
        [-o TGT_OPTS|--target-image-opts] [-t TGT_CACHE] [-n]
        [-B BACKING_FILENAME [-F BACKING_FMT]]
        SRC_FILENAME [SRC_FILENAME2 [...]] TGT_FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -p, --progress
     show operation progress
  -f, --source-format SRC_FMT
     specify SRC_FILENAME source image format explicitly
  --source-image-opts
     indicates that SRC_FILENAME is a complete image specification
     instead of a file name (incompatible with --source-format)
  -l, --source-snapshot SNAPSHOT_PARAMS
     specify source snapshot parameters
  -T, --source-cache SRC_CACHE
     source image(s) cache mode (writeback)
  -O, --target-format TGT_FMT
     specify TGT_FILENAME image format (default is raw)
  --target-image-opts
     indicates that TGT_FILENAME is a complete image specification
     instead of a file name (incompatible with --output-format)
  -o, --target-options TGT_OPTS
     TARGET_FMT-specific options
  -c, --compress
     create compressed output image (qcow and qcow2 format only)
  -t, --target-cache TGT_CACHE
     cache mode when opening output image (unsafe)
  -B, --backing BACKING_FILENAME
     create output to be a CoW on top of BACKING_FILENAME
  -F, --backing-format BACKING_FMT
     specify BACKING_FILENAME image format explicitly
  -n, --no-create
     omit target volume creation (eg on rbd)
  --target-is-zero
  -S, --sparse-size SPARSE_SIZE
     XXX todo
  --bitmaps
     also copy any persistent bitmaps present in source
  --skip-broken-bitmaps
     skip (do not error out) any broken bitmaps
  -U, --force-share
     open images in shared mode for concurrent access
  -r, --rate RATE
     I/O rate limit
  -m, --parallel NUM_COROUTINES
     specify parallelism (default 8)
  -C, --copy-range-offloading
     use copy_range offloading
  --salvage
     XXX todo
  -W, --oob-writes
     enable out-of-order writes to improve performance
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  SRC_FILENAME
     source image file name (or specification with --image-opts)
  TGT_FILENAME
     target (output) image file name
";

/// Most requests in flight (QEMU: MAX_COROUTINES).
const MAX_COROUTINES: u64 = 16;
/// Largest copy buffer, in sectors (QEMU: MAX_BUF_SECTORS, 16 MiB).
const MAX_BUF_SECTORS: u64 = 32768;
/// Default copy buffer, in sectors (QEMU: IO_BUF_SIZE, 2 MiB).
const IO_BUF_SECTORS: u64 = 4096;
const SECTOR: u64 = 512;

/// The command line, as qemu-img's option loop leaves it.
struct Args {
    fmt: Option<String>,
    out_fmt: Option<String>,
    out_baseimg: Option<String>,
    backing_fmt: Option<String>,
    options: Option<String>,
    /// `-l`: a snapshot by id or name, or `snapshot.id=...,snapshot.name=...`.
    snapshot: Option<SnapshotSel>,
    min_sparse: u64,
    explicit_min_sparse: bool,
    progress: bool,
    /// `--progress=json`: bytes as JSON lines on stderr.
    progress_json: bool,
    cache: String,
    src_cache: String,
    quiet: bool,
    skip_create: bool,
    num_coroutines: usize,
    wr_in_order: bool,
    force_share: bool,
    rate_limit: u64,
    image_opts: bool,
    tgt_image_opts: bool,
    salvage: bool,
    target_is_zero: bool,
    bitmaps: bool,
    skip_broken: bool,
    compressed: bool,
    copy_range: bool,
}

/// QEMU's accumulate_options: a checked `-o` list joined to those before.
pub(super) fn accumulate_options(acc: &mut Option<String>, v: String) -> Result<(), i32> {
    if !valid_option_list(&v) {
        error_report(format!("Invalid option list: {v}"));
        return Err(1);
    }
    *acc = Some(match acc.take() {
        Some(o) => format!("{o},{v}"),
        None => v,
    });
    Ok(())
}

/// QEMU's is_valid_option_list: not empty, no leading comma, and trailing
/// commas only in escaped pairs.
fn valid_option_list(s: &str) -> bool {
    if s.is_empty() || s.starts_with(',') {
        return false;
    }
    let trailing = s.len() - s.trim_end_matches(',').len();
    trailing.is_multiple_of(2)
}

/// Reads the options in order, as qemu-img's loop does; `Err` is the exit code.
fn parse_args(ctx: &Ctx) -> Result<(Args, Vec<String>), i32> {
    let p = getopt("convert", &ctx.args, OPTS)?;
    let mut a = Args {
        fmt: None,
        out_fmt: None,
        out_baseimg: None,
        backing_fmt: None,
        options: None,
        snapshot: None,
        // At least 4k of zeroes make a hole.
        min_sparse: 8,
        explicit_min_sparse: false,
        progress: false,
        progress_json: false,
        cache: "unsafe".into(),
        src_cache: "writeback".into(),
        quiet: false,
        skip_create: false,
        num_coroutines: 8,
        wr_in_order: true,
        force_share: false,
        rate_limit: 0,
        image_opts: false,
        tgt_image_opts: false,
        salvage: false,
        target_is_zero: false,
        bitmaps: false,
        skip_broken: false,
        compressed: false,
        copy_range: false,
    };
    for (i, v) in p.opts {
        let v = v.unwrap_or_default();
        match (OPTS[i].short, OPTS[i].long) {
            (Some('h'), _) => {
                crate::out!("{HELP}");
                crate::outln!();
                return Err(0);
            }
            (Some('q'), _) => a.quiet = true,
            (Some('f'), _) => a.fmt = Some(v),
            (Some('T'), _) => a.src_cache = v,
            (Some('l'), _) => match SnapshotSel::parse(&v) {
                Ok(sel) => a.snapshot = Some(sel),
                Err(msg) => {
                    error_report(msg);
                    error_report(format!("Failed in parsing snapshot param '{v}'"));
                    return Err(1);
                }
            },
            (Some('S'), _) => {
                let sval = cvtnum_full("buffer size for sparse output", &v, true, 0, i64::MAX)?;
                if sval % SECTOR != 0 || sval / SECTOR > MAX_BUF_SECTORS {
                    error_report(format!(
                        "Invalid buffer size for sparse output specified. Valid sizes are multiples of {SECTOR} up to {}. Select 0 to disable sparse detection (fully allocates output).",
                        MAX_BUF_SECTORS * SECTOR
                    ));
                    return Err(1);
                }
                a.min_sparse = sval / SECTOR;
                a.explicit_min_sparse = true;
            }
            (Some('O'), _) => a.out_fmt = Some(v),
            (Some('o'), _) => accumulate_options(&mut a.options, v)?,
            (Some('t'), _) => a.cache = v,
            (Some('B'), _) => a.out_baseimg = Some(v),
            (Some('F'), _) => a.backing_fmt = Some(v),
            (Some('U'), _) => a.force_share = true,
            (Some('r'), _) => a.rate_limit = cvtnum_full("rate limit", &v, true, 0, i64::MAX)?,
            (Some('m'), _) => {
                a.num_coroutines =
                    cvtnum_full("number of coroutines", &v, false, 1, MAX_COROUTINES as i64)?
                        as usize
            }
            (Some('W'), _) => a.wr_in_order = false,
            (Some('C'), _) => a.copy_range = true,
            (Some('c'), _) => a.compressed = true,
            (Some('p'), _) => a.progress = true,
            (Some('n'), _) => a.skip_create = true,
            (_, Some("image-opts" | "source-image-opts")) => a.image_opts = true,
            (_, Some("target-image-opts")) => a.tgt_image_opts = true,
            (_, Some("salvage")) => a.salvage = true,
            // The user vouching for a blank target is as good as a format
            // that reads as zeroes when new.
            (_, Some("target-is-zero")) => a.target_is_zero = true,
            (_, Some("bitmaps")) => a.bitmaps = true,
            (_, Some("skip-broken-bitmaps")) => a.skip_broken = true,
            (_, Some("progress")) => {
                a.progress = true;
                a.progress_json = crate::progress::parse_format(&v)?;
            }
            _ => {}
        }
    }
    Ok((a, p.operands))
}

/// QEMU's bdrv_has_zero_init: does a new image of this node read as zeroes?
/// The driver says (a regular file and most qcow2 images do); raw and
/// filters ask their file.
fn reads_zero_when_new(node: &Arc<Node>) -> bool {
    match node.format_name() {
        "raw" => node
            .child(ChildRole::File)
            .is_some_and(|f| reads_zero_when_new(&f)),
        _ if node.driver().is_filter() => node
            .primary_child()
            .is_some_and(|c| reads_zero_when_new(&c)),
        _ => node.driver().has_zero_init(),
    }
}

/// The protocol driver that creates `filename` (QEMU: bdrv_find_protocol).
fn find_protocol(ctx: &Ctx, filename: &str) -> Result<Arc<dyn DriverClass>, String> {
    if strata_block::open::has_protocol(filename) {
        let prefix = &filename[..filename.find(':').unwrap_or(0)];
        return ctx
            .reg
            .all()
            .iter()
            .find(|c| c.protocol_name() == Some(prefix))
            .cloned()
            .ok_or_else(|| format!("Unknown protocol '{prefix}'"));
    }
    ctx.reg
        .get("file")
        .ok_or_else(|| "Unknown protocol 'file'".to_string())
}

/// The protocol driver that creates `filename` for an image of `class`,
/// once both can create images (qemu-img's checks, in its order).
pub(super) fn creating_protocol(
    ctx: &Ctx,
    class: &dyn DriverClass,
    filename: &str,
) -> Result<Arc<dyn DriverClass>, String> {
    let proto = find_protocol(ctx, filename)?;
    if class.create_options().is_empty() {
        return Err(format!(
            "Format driver '{}' does not support image creation",
            class.name()
        ));
    }
    if proto.create_options().is_empty() {
        return Err(format!(
            "Protocol driver '{}' does not support image creation",
            proto.name()
        ));
    }
    Ok(proto)
}

/// Closes the nodes, ignoring errors as qemu-img's blk_unref does.
fn close_all(ctx: &Ctx, nodes: &[Arc<Node>]) {
    for n in nodes {
        let _ = ctx.ev.block_on(n.close());
    }
}

pub fn run(ctx: Ctx) -> i32 {
    let (mut a, operands) = match parse_args(&ctx) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if a.out_fmt.is_none() && !a.tgt_image_opts {
        a.out_fmt = Some("raw".into());
    }
    let checks: [(bool, &str); 7] = [
        (
            a.skip_broken && !a.bitmaps,
            "Use of --skip-broken-bitmaps requires --bitmaps",
        ),
        (
            a.compressed && a.copy_range,
            "Cannot enable copy offloading when -c is used",
        ),
        (
            a.explicit_min_sparse && a.copy_range,
            "Cannot enable copy offloading when -S is used",
        ),
        (
            a.copy_range && a.salvage,
            "Cannot use copy offloading in salvaging mode",
        ),
        (
            a.tgt_image_opts && !a.skip_create,
            "--target-image-opts requires use of -n flag",
        ),
        (
            a.skip_create && a.options.is_some(),
            "-o has no effect when skipping image creation",
        ),
        (
            a.target_is_zero && !a.skip_create,
            "--target-is-zero requires use of -n flag",
        ),
    ];
    if let Some((_, msg)) = checks.iter().find(|(bad, _)| *bad) {
        error_report(msg);
        return 1;
    }
    let src_names: Vec<String> = operands[..operands.len().saturating_sub(1)].to_vec();
    let out_filename = if src_names.is_empty() {
        None
    } else {
        operands.last().cloned()
    };
    if let Some(o) = &a.options {
        if super::create::has_help_option(o) {
            return match &a.out_fmt {
                Some(f) => option_help(&ctx, out_filename.as_deref(), f),
                None => {
                    error_report("Option help requires a format be specified");
                    1
                }
            };
        }
    }
    let Some(out_filename) = out_filename else {
        error_report("Must specify image file name");
        return 1;
    };
    let src_cache = match CacheMode::parse(&a.src_cache) {
        Ok(c) => c,
        Err(_) => {
            error_report(format!("Invalid source cache option: {}", a.src_cache));
            return 1;
        }
    };
    if a.quiet {
        a.progress = false;
    }
    let progress = RefCell::new(Progress::for_flags(a.progress, a.progress_json, 1.0));
    progress.borrow_mut().print(0.0, 100);
    let ok = convert(&ctx, &a, &src_names, &out_filename, src_cache, &progress);
    if ok {
        progress.borrow_mut().print(100.0, 0);
    }
    progress.borrow().end();
    if ok {
        0
    } else {
        1
    }
}

/// `-o help`: the output format's creation options (and its protocol's,
/// when a target file name was given).
fn option_help(ctx: &Ctx, filename: Option<&str>, fmt: &str) -> i32 {
    let Some(class) = ctx.reg.get(fmt) else {
        error_report(format!("Unknown file format '{fmt}'"));
        return 1;
    };
    if class.create_options().is_empty() {
        error_report(format!(
            "Format driver '{fmt}' does not support image creation"
        ));
        return 1;
    }
    let Some(filename) = filename else {
        print_help(
            &format!("Supported {fmt} options:"),
            class.create_options(),
            true,
        );
        return 0;
    };
    let proto = match find_protocol(ctx, filename) {
        Ok(p) => p,
        Err(msg) => {
            error_report(msg);
            return 1;
        }
    };
    if proto.create_options().is_empty() {
        error_report(format!(
            "Protocol driver '{}' does not support image creation",
            proto.name()
        ));
        return 1;
    }
    print_help(
        "Supported options:",
        &merged_options(&*class, Some(&*proto)),
        false,
    );
    0
}

/// Everything after the option checks (QEMU: img_convert from the opening
/// of the sources to `out:`); false after an error was reported, true on
/// success and where qemu-img reports an error yet exits 0.
fn convert(
    ctx: &Ctx,
    a: &Args,
    src_names: &[String],
    out_filename: &str,
    src_cache: CacheMode,
    progress: &RefCell<Progress>,
) -> bool {
    let src_flags = OpenFlags {
        read_only: true,
        force_share: a.force_share,
        cache: src_cache,
        ..OpenFlags::default()
    };
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    let mut sources = Vec::new();
    let mut total_sectors = 0u64;
    for name in src_names {
        let node = match ctx.open(name, a.fmt.as_deref(), a.image_opts, src_flags.clone(), 1) {
            Ok(n) => n,
            Err(_) => {
                close_all(ctx, &nodes);
                return false;
            }
        };
        let sectors = node.length().div_ceil(SECTOR);
        let mut alignment = (node.limits().request_alignment as u64).div_ceil(SECTOR);
        if node.driver().has_info() {
            if let Some(cs) = node.driver().cluster_size() {
                alignment = alignment.max(cs / SECTOR);
            }
        }
        total_sectors += sectors;
        nodes.push(Arc::clone(&node));
        // Read through a user handle, as qemu-img's BlockBackend.
        let blk = match user_handle(&node, Perm::CONSISTENT_READ) {
            Ok(b) => b,
            Err(()) => {
                close_handles(ctx, &sources);
                close_all(ctx, &nodes);
                return false;
            }
        };
        sources.push(Source {
            node,
            blk,
            sectors,
            alignment: alignment.max(1),
        });
    }
    let handles: Vec<Arc<Backend>> = sources.iter().map(|s| Arc::clone(&s.blk)).collect();
    let r = convert_to(ctx, a, sources, total_sectors, out_filename, progress);
    for h in handles {
        let _ = ctx.ev.block_on(h.close());
    }
    close_all(ctx, &nodes);
    r
}

/// A user handle on `node` that takes `perm` and shares everything (image
/// locks are the file's business); reports a permission conflict.
fn user_handle(node: &Arc<Node>, perm: Perm) -> Result<Arc<Backend>, ()> {
    Backend::new(node, "an unnamed block device", perm, Perm::ALL)
        .map(Arc::new)
        .map_err(error_report)
}

fn close_handles(ctx: &Ctx, sources: &[Source]) {
    for s in sources {
        let _ = ctx.ev.block_on(s.blk.close());
    }
}

/// Creates (unless `-n`) and opens the target, then copies.
fn convert_to(
    ctx: &Ctx,
    a: &Args,
    sources: Vec<Source>,
    total_sectors: u64,
    out_filename: &str,
    progress: &RefCell<Progress>,
) -> bool {
    if let Some(sn) = &a.snapshot {
        if matches!(sn, SnapshotSel::IdOrName(_)) && sources.len() > 1 {
            error_report("No support for concatenating multiple snapshot");
            return false;
        }
        if let Err(msg) = ctx.ev.block_on(sn.load(&sources[0].node)) {
            error_report(format!("Failed to load snapshot: {msg}"));
            return false;
        }
    }
    let out_fmt = a.out_fmt.clone();
    let mut create: Option<(Arc<dyn DriverClass>, Vec<SetOpt>)> = None;
    if !a.skip_create {
        let fmt = out_fmt.as_deref().unwrap_or("raw");
        let Some(class) = ctx.reg.get(fmt) else {
            error_report(format!("Unknown file format '{fmt}'"));
            return false;
        };
        let proto = match creating_protocol(ctx, &*class, out_filename) {
            Ok(p) => p,
            Err(msg) => {
                error_report(msg);
                return false;
            }
        };
        let specs = merged_options(&*class, Some(&*proto));
        let mut set: Vec<SetOpt> = Vec::new();
        if let Some(o) = &a.options {
            let pairs = match parse_keyval(o, None) {
                Ok(p) => p,
                Err(e) => {
                    error_report(e);
                    return false;
                }
            };
            for (k, v) in pairs {
                if let Err(msg) = set_option(&mut set, &specs, &k, &v) {
                    error_report(msg);
                    return false;
                }
            }
        }
        let _ = set_option(
            &mut set,
            &specs,
            "size",
            &(total_sectors * SECTOR).to_string(),
        );
        if let Some(b) = &a.out_baseimg {
            if set_option(&mut set, &specs, "backing_file", b).is_err() {
                error_report(format!(
                    "Backing file not supported for file format '{fmt}'"
                ));
                return false;
            }
        }
        if let Some(bf) = &a.backing_fmt {
            if set_option(&mut set, &specs, "backing_fmt", bf).is_err() {
                error_report(format!(
                    "Backing file format not supported for file format '{fmt}'"
                ));
                return false;
            }
        }
        create = Some((class, set));
    }
    let get = |k: &str| {
        create.as_ref().and_then(|(_, set)| {
            set.iter()
                .find(|s| s.spec.name == k)
                .map(|s| s.value.clone())
        })
    };
    let out_baseimg_param = get("backing_file");
    let out_baseimg = out_baseimg_param.clone().or(a.out_baseimg.clone());
    let target_has_backing = out_baseimg.is_some();
    if a.target_is_zero && target_has_backing {
        // qemu-img leaves with the status of the last step that worked: 0.
        error_report("Cannot use --target-is-zero when the destination image has a backing file");
        return true;
    }
    if sources.len() > 1 && out_baseimg.is_some() {
        error_report(
            "Having a backing file for the target makes no sense when concatenating multiple input images",
        );
        return false;
    }
    if out_baseimg_param.is_some() && get("backing_fmt").is_none() {
        error_report("Use of backing file requires explicit backing format");
        return false;
    }
    if a.compressed {
        if let Some((class, _)) = &create {
            if !super::qemu_can_compress(class.name()) {
                error_report("Compression not supported for this file format");
                return false;
            }
        }
        if get("encryption").is_some_and(|v| v == "on") || get("encrypt.format").is_some() {
            error_report("Compression and encryption not supported at the same time");
            return false;
        }
        if get("preallocation").is_some_and(|p| p != "off") {
            error_report("Compression and preallocation not supported at the same time");
            return false;
        }
    }
    if a.bitmaps {
        if sources.len() > 1 {
            error_report("Copying bitmaps only possible with single source");
            return false;
        }
        if !bitmaps::check(&sources[0].node, a.skip_broken) {
            return false;
        }
    }
    // The target is opened with the creation's secrets (qemu-img's
    // img_add_key_secrets): an encrypted target needs its key.
    let mut key_secrets = strata_block::options::Opts::new();
    if let Some((class, set)) = create {
        let fmt = class.name();
        let opts = opts_of(&set);
        for (k, v) in &opts {
            if k.ends_with("key-secret") {
                key_secrets.insert(k.clone(), v.clone());
            }
        }
        let octx = OpenCtx::new(Arc::clone(&ctx.reg), OpenFlags::default());
        if let Err(e) = ctx.ev.block_on(class.create(&octx, out_filename, opts)) {
            error_report(format!("{out_filename}: error while converting {fmt}: {e}"));
            return false;
        }
    }
    let cache = match CacheMode::parse(&a.cache) {
        Ok(c) => c,
        Err(_) => {
            error_report(format!("Invalid cache option: {}", a.cache));
            return false;
        }
    };
    let flags = OpenFlags {
        unmap: a.min_sparse != 0,
        cache,
        // O_DIRECT may need the image grown to the sector size.
        resize: cache.direct,
        ..OpenFlags::default()
    };
    let target = if a.skip_create {
        ctx.open(out_filename, out_fmt.as_deref(), a.tgt_image_opts, flags, 1)
    } else {
        ctx.open_with(out_filename, out_fmt.as_deref(), flags, key_secrets, 1)
    };
    let Ok(target) = target else {
        return false;
    };
    let r = copy_into(
        ctx,
        a,
        sources,
        total_sectors,
        &target,
        target_has_backing,
        progress,
    );
    let _ = ctx.ev.block_on(target.close());
    r
}

/// The checks on the open target, then the copy.
fn copy_into(
    ctx: &Ctx,
    a: &Args,
    sources: Vec<Source>,
    total_sectors: u64,
    target: &Arc<Node>,
    target_has_backing: bool,
    progress: &RefCell<Progress>,
) -> bool {
    let fmt = target.format_name();
    if a.bitmaps && !target.supports_persistent_bitmaps() {
        error_report(format!("Format driver '{fmt}' does not support bitmaps"));
        return false;
    }
    let bitmap_source = Arc::clone(&sources[0].node);
    if a.compressed && !super::qemu_can_compress(fmt) {
        error_report("Compression not supported for this file format");
        return false;
    }
    let limits = target.limits();
    let buf_sectors = match target.driver().cluster_size() {
        // Compressed output goes in whole clusters, as many as fill the
        // usual buffer: the target compresses a write's clusters on every
        // core, where one cluster a write (qemu-img) keeps to one.
        Some(cs) if a.compressed => {
            let cluster = (cs / SECTOR).max(1);
            cluster * (IO_BUF_SECTORS / cluster).max(1)
        }
        _ => (limits.discard_alignment as u64 / SECTOR).clamp(IO_BUF_SECTORS, MAX_BUF_SECTORS),
    };
    // Writes aligned to the target's requests avoid read-modify-write.
    let pow2floor = |n: u64| if n == 0 { 0 } else { 1 << n.ilog2() };
    let alignment = pow2floor(a.min_sparse)
        .max((limits.request_alignment as u64).div_ceil(SECTOR))
        .max(1);
    if a.skip_create && target.length() / SECTOR < total_sectors {
        error_report("output file is smaller than input file");
        return false;
    }
    let target_backing_sectors = if target_has_backing && !a.skip_create {
        target
            .skip_filters()
            .backing()
            .map(|b| b.length().div_ceil(SECTOR))
    } else {
        None
    };
    let mut has_zero_init = a.target_is_zero;
    if !has_zero_init && !a.skip_create && a.min_sparse != 0 && !target_has_backing {
        has_zero_init = reads_zero_when_new(target);
    }
    let throttle = (a.rate_limit != 0)
        .then(|| strata_drivers::filters::throttle::ThrottleGroup::write_limit(a.rate_limit));
    let perm = Perm::CONSISTENT_READ.with(Perm::WRITE);
    let Ok(target_blk) = user_handle(target, perm) else {
        return false;
    };
    let job = Convert {
        src: sources,
        total_sectors,
        target: Arc::clone(&target_blk),
        has_zero_init,
        target_has_backing,
        target_backing_sectors,
        wr_in_order: a.wr_in_order,
        copy_range: a.copy_range,
        compressed: a.compressed,
        salvage: a.salvage,
        quiet: a.quiet,
        min_sparse: a.min_sparse,
        alignment,
        target_cluster_sectors: target
            .skip_filters()
            .driver()
            .cluster_size()
            .map_or(1, |cs| (cs / SECTOR).max(1)),
        target_format: target.skip_filters(),
        buf_sectors,
        num_coroutines: a.num_coroutines,
        throttle,
    };
    let ok = ctx.ev.block_on(job.run(progress));
    let ok = ok && (!a.compressed || end_compressed(ctx, &target_blk));
    let ok = ok
        && (!a.bitmaps
            || ctx
                .ev
                .block_on(bitmaps::copy(&bitmap_source, target, a.skip_broken)));
    let _ = ctx.ev.block_on(target_blk.close());
    ok
}

/// QEMU ends compressed output with an empty compressed write.
fn end_compressed(ctx: &Ctx, target: &Backend) -> bool {
    let r = ctx
        .ev
        .block_on(target.write_compressed(0, strata_block::IoBuf::zeroed(0)));
    if let Err(e) = r {
        error_report(format!("error while closing the image: {e}"));
        return false;
    }
    true
}
