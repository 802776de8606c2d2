//! `qemu-img rebase`: give an image another backing file. Safe mode first
//! copies into the image every range where the old and the new backing
//! files differ and the image itself holds nothing, so that what the guest
//! sees never changes, not even after a crash half way; `-u` only rewrites
//! the stored name.

use super::{getopt, long, opt, usage_error, Ctx};
use crate::common;
use crate::progress::Progress;
use std::sync::Arc;
use strata_block::report::error_report;
use strata_block::{Backend, CacheMode, IoBuf, Node, OpenCtx, OpenFlags, Opts, Perm, WriteFlags};

const OPTS: &[super::Opt] = &[
    opt('h', Some("help"), false),
    opt('f', None, true),
    opt('F', None, true),
    opt('b', None, true),
    opt('u', None, false),
    opt('p', None, false),
    opt('t', None, true),
    opt('T', None, true),
    opt('q', None, false),
    opt('U', Some("force-share"), false),
    opt('c', Some("compress"), false),
    long("object", true),
    long("image-opts", false),
    // Strata's own, as convert's: `--progress=json` for pipelines.
    long("progress", true),
];

/// How much of the image one step compares (QEMU's IO_BUF_SIZE).
const IO_BUF_SIZE: u64 = 2 << 20;

#[derive(Default)]
struct Args {
    fmt: Option<String>,
    base_fmt: Option<String>,
    base: Option<String>,
    unsafe_mode: bool,
    progress: bool,
    /// `--progress=json`: bytes as JSON lines on stderr.
    progress_json: bool,
    cache: Option<String>,
    src_cache: Option<String>,
    quiet: bool,
    force_share: bool,
    compress: bool,
    image_opts: bool,
}

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("rebase", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut a = Args::default();
    for (i, v) in p.opts {
        match i {
            0 => {
                crate::outln!("Usage: {} rebase [--object OBJDEF] [--image-opts] [-U] [-q] [-f FMT] [-t CACHE] [-T SRC_CACHE] [-p] [-u] [-c] -b BACKING_FILE [-F BACKING_FMT] FILENAME", common::argv0());
                return 0;
            }
            1 => a.fmt = v,
            2 => a.base_fmt = v,
            3 => a.base = v,
            4 => a.unsafe_mode = true,
            5 => a.progress = true,
            6 => a.cache = v,
            7 => a.src_cache = v,
            8 => a.quiet = true,
            9 => a.force_share = true,
            10 => a.compress = true,
            12 => a.image_opts = true,
            13 => {
                a.progress = true;
                match crate::progress::parse_format(v.as_deref().unwrap_or("")) {
                    Ok(json) => a.progress_json = json,
                    Err(code) => return code,
                }
            }
            _ => {}
        }
    }
    if a.quiet {
        a.progress = false;
    }
    if p.operands.len() != 1 {
        return usage_error("rebase", "Expecting one image file name");
    }
    if !a.unsafe_mode && a.base.is_none() {
        return usage_error(
            "rebase",
            "Must specify backing file (-b) or use unsafe mode (-u)",
        );
    }
    let mut progress = Progress::for_flags(a.progress, a.progress_json, 2.0);
    progress.print(0.0, 100);
    let ok = rebase(&ctx, &a, &p.operands[0], &mut progress);
    progress.print(100.0, 0);
    progress.end();
    if ok {
        0
    } else {
        1
    }
}

fn rebase(ctx: &Ctx, a: &Args, filename: &str, progress: &mut Progress) -> bool {
    let cache = a.cache.as_deref().unwrap_or("writeback");
    let Ok(cache) = CacheMode::parse(cache) else {
        error_report(format!("Invalid cache option: {cache}"));
        return false;
    };
    let src_cache = a.src_cache.as_deref().unwrap_or("writeback");
    let Ok(src_cache) = CacheMode::parse(src_cache) else {
        error_report(format!("Invalid source cache option: {src_cache}"));
        return false;
    };
    // The old backing file is left unopened in unsafe mode, so that a
    // renamed or moved one can be named again.
    let flags = OpenFlags {
        cache,
        no_backing: a.unsafe_mode,
        ..OpenFlags::default()
    };
    let Ok(node) = ctx.open(filename, a.fmt.as_deref(), a.image_opts, flags, 1) else {
        return false;
    };
    let ok = ctx.ev.block_on(async {
        let ok = rebase_open(ctx, a, &node, src_cache, progress).await;
        let closed = node.close().await;
        if let Err(e) = &closed {
            error_report(e.to_string());
        }
        ok && closed.is_ok()
    });
    ok
}

async fn rebase_open(
    ctx: &Ctx,
    a: &Args,
    node: &Arc<Node>,
    src_cache: CacheMode,
    progress: &mut Progress,
) -> bool {
    let image = node.skip_filters();
    if a.compress && !super::qemu_can_compress(image.format_name()) {
        error_report("Compression not supported for this file format");
        return false;
    }
    if let Some(f) = &a.base_fmt {
        if ctx.reg.get(f).is_none() {
            error_report(format!("Invalid format name: '{f}'"));
            return false;
        }
    }
    if !a.unsafe_mode {
        let base = a.base.as_deref().unwrap_or("");
        if !copy_differences(ctx, a, node, &image, base, src_cache, progress).await {
            return false;
        }
    }
    // Every range where the two backing files differ is in the image now,
    // so switching the name changes nothing the guest sees.
    let r = match a.base.as_deref() {
        Some(b) if !b.is_empty() => {
            image
                .change_backing_file(Some(b), a.base_fmt.as_deref(), true)
                .await
        }
        _ => image.change_backing_file(None, None, false).await,
    };
    let shown = a.base.as_deref().unwrap_or("(null)");
    match r {
        Ok(()) => true,
        Err(e) => {
            let why = match e.code() {
                libc::ENOSPC => "No space left in the file header".to_string(),
                libc::EINVAL if a.base.is_some() && a.base_fmt.is_none() => {
                    "backing format must be specified".to_string()
                }
                c => strata_block::error::strerror(c),
            };
            error_report(format!(
                "Could not change the backing file to '{shown}': {why}"
            ));
            false
        }
    }
}

/// A reader of one backing file, and how long it is.
struct Side {
    blk: Option<Backend>,
    size: u64,
    opened: Option<Arc<Node>>,
}

impl Side {
    fn none() -> Side {
        Side {
            blk: None,
            size: 0,
            opened: None,
        }
    }

    fn on(node: &Arc<Node>) -> strata_block::Result<Side> {
        let blk = Backend::new(node, DEVICE, Perm::CONSISTENT_READ, Perm::ALL)?;
        Ok(Side {
            size: node.length(),
            blk: Some(blk),
            opened: None,
        })
    }

    /// Reads `n` bytes at `offset`, zeroes past the end of the file.
    async fn read(&self, offset: u64, n: u64) -> strata_block::Result<IoBuf> {
        let have = n.min(self.size.saturating_sub(offset));
        let buf = IoBuf::zeroed(n as usize);
        match (&self.blk, have > 0) {
            (Some(blk), true) => {
                // Read into the head of the buffer itself; the tail stays zero.
                let (head, tail) = buf.split_at(have as usize);
                let head = blk.read(offset, head).await?;
                Ok(IoBuf::join_all(vec![head, tail]))
            }
            _ => Ok(buf),
        }
    }

    async fn close(self) {
        if let Some(b) = self.blk {
            let _ = b.close().await;
        }
        if let Some(n) = self.opened {
            let _ = n.close().await;
        }
    }
}

const DEVICE: &str = "an unnamed block device";

/// Safe mode: writes into the image what its unallocated ranges would
/// otherwise stop showing (QEMU: img_rebase's compare loop).
async fn copy_differences(
    ctx: &Ctx,
    a: &Args,
    node: &Arc<Node>,
    image: &Arc<Node>,
    base: &str,
    src_cache: CacheMode,
    progress: &mut Progress,
) -> bool {
    let old_node = image.backing();
    let old = match &old_node {
        Some(b) => match Side::on(b) {
            Ok(s) => s,
            Err(e) => {
                error_report(format!(
                    "Could not reuse old backing file '{}': {e}",
                    b.filename()
                ));
                return false;
            }
        },
        None => Side::none(),
    };
    let mut prefix_chain = None;
    let new = if base.is_empty() {
        Side::none()
    } else {
        let real = match node.full_backing_filename(base) {
            Ok(r) => r,
            Err(e) => {
                error_report(format!("Could not resolve backing filename: {e}"));
                old.close().await;
                return false;
            }
        };
        // Rebasing onto an image further down the chain: only what lies
        // between can differ.
        prefix_chain = node.find_backing_image(&real);
        let side = match &prefix_chain {
            Some(p) => {
                Side::on(p).map_err(|e| format!("Could not reuse backing file '{base}': {e}"))
            }
            None => open_new_backing(ctx, a, &real, src_cache)
                .await
                .map_err(|e| format!("Could not open new backing file '{base}': {e}")),
        };
        match side {
            Ok(s) => s,
            Err(msg) => {
                error_report(msg);
                old.close().await;
                return false;
            }
        }
    };
    let blk = match Backend::new(
        node,
        DEVICE,
        Perm::CONSISTENT_READ.with(Perm::WRITE),
        Perm::ALL,
    ) {
        Ok(b) => b,
        Err(e) => {
            error_report(e.to_string());
            old.close().await;
            new.close().await;
            return false;
        }
    };
    let r = compare_loop(
        a,
        &blk,
        image,
        old_node.as_ref(),
        prefix_chain.as_ref(),
        &old,
        &new,
        progress,
    )
    .await;
    let flushed = blk.flush().await;
    let _ = blk.close().await;
    old.close().await;
    new.close().await;
    match (r, flushed) {
        (Err(msg), _) => {
            error_report(msg);
            false
        }
        (Ok(()), Err(e)) => {
            error_report(format!("Error while writing to COW image: {e}"));
            false
        }
        (Ok(()), Ok(())) => true,
    }
}

async fn open_new_backing(
    ctx: &Ctx,
    a: &Args,
    path: &str,
    cache: CacheMode,
) -> strata_block::Result<Side> {
    let flags = OpenFlags {
        read_only: true,
        force_share: a.force_share,
        cache,
        ..OpenFlags::default()
    };
    let octx = OpenCtx::new(Arc::clone(&ctx.reg), flags);
    let node = octx
        .open_image(Some(path), a.base_fmt.as_deref(), Opts::new())
        .await?;
    match Side::on(&node) {
        Ok(mut s) => {
            s.opened = Some(node);
            Ok(s)
        }
        Err(e) => {
            let _ = node.close().await;
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn compare_loop(
    a: &Args,
    blk: &Backend,
    image: &Arc<Node>,
    old_node: Option<&Arc<Node>>,
    prefix_chain: Option<&Arc<Node>>,
    old: &Side,
    new: &Side,
    progress: &mut Progress,
) -> Result<(), String> {
    let size = blk.length();
    // Writes cover whole subclusters of the image (clusters when they are
    // compressed), so none needs a copy-on-write.
    let d = image.driver();
    let align = match a.compress {
        true => d.cluster_size(),
        false => d.subcluster_size(),
    }
    .unwrap_or(1)
    .max(1);
    let step = if size == 0 {
        0.0
    } else {
        100.0 / (size / size.min(IO_BUF_SIZE)) as f32
    };
    let meta_err = |e: strata_block::Error| {
        format!(
            "error while reading image metadata: {}",
            strata_block::error::strerror(e.code())
        )
    };
    let mut offset = 0u64;
    progress.bytes(0, size);
    while offset < size {
        let mut n = IO_BUF_SIZE.min(size - offset);
        let st = image.block_status(offset, n).await.map_err(meta_err)?;
        n = st.len;
        if st.allocated {
            offset += n;
            continue;
        }
        if let (Some(prefix), Some(old_top)) = (prefix_chain, old_node) {
            // Unchanged between the old backing file and the new one.
            let (st, _) = old_top
                .block_status_above(Some(prefix), offset, n)
                .await
                .map_err(meta_err)?;
            if !st.allocated && st.len > 0 {
                offset += st.len;
                continue;
            }
            // Past the old backing file's end reads as zeroes: keep it so.
            if st.len > 0 {
                n = st.len;
            }
        }
        let start = offset / align * align;
        let mut end = (offset + n).div_ceil(align) * align;
        end = end.min(size);
        let (offset_a, n) = (start, end - start);
        let buf_old = old
            .read(offset_a, n)
            .await
            .map_err(|_| "error while reading from old backing file".to_string())?;
        let buf_new = new
            .read(offset_a, n)
            .await
            .map_err(|_| "error while reading from new backing file".to_string())?;
        let mut old_eof = offset_a >= old.size;
        let mut written = 0u64;
        while written < n {
            let (differ, pnum) = compare_runs(
                &buf_old.as_slice()[written as usize..],
                &buf_new.as_slice()[written as usize..],
                align as usize,
            );
            let pnum = pnum as u64;
            if differ {
                let at = offset_a + written;
                let r = if old_eof {
                    blk.write_zeroes(at, pnum, WriteFlags::default()).await
                } else {
                    let part = IoBuf::from_slice(
                        &buf_old.as_slice()[written as usize..(written + pnum) as usize],
                    );
                    if a.compress {
                        blk.write_compressed(at, part).await.map(|_| ())
                    } else {
                        blk.write(at, part, WriteFlags::default()).await.map(|_| ())
                    }
                };
                r.map_err(|e| {
                    format!(
                        "Error while writing to COW image: {}",
                        strata_block::error::strerror(e.code())
                    )
                })?;
            }
            written += pnum;
            if offset_a + written >= old.size {
                old_eof = true;
            }
        }
        progress.print(step, 100);
        offset = offset_a + n;
        progress.bytes(offset, size);
    }
    progress.bytes(size, size);
    Ok(())
}

/// Whether `a` and `b` differ in their first `chunk` bytes, and how many
/// bytes from the start, in whole chunks, are alike in that respect
/// (QEMU: compare_buffers).
fn compare_runs(a: &[u8], b: &[u8], chunk: usize) -> (bool, usize) {
    let len = a.len().min(b.len());
    let chunk = chunk.max(1);
    let first = chunk.min(len);
    let differ = a[..first] != b[..first];
    let mut i = first;
    while i < len {
        let l = chunk.min(len - i);
        if (a[i..i + l] != b[i..i + l]) != differ {
            break;
        }
        i += l;
    }
    (differ, i)
}

#[cfg(test)]
mod tests {
    use super::compare_runs;

    #[test]
    fn runs_of_like_chunks() {
        let a = [0u8; 12];
        let mut b = [0u8; 12];
        assert_eq!(compare_runs(&a, &b, 4), (false, 12));
        b[5] = 1;
        assert_eq!(compare_runs(&a, &b, 4), (false, 4));
        assert_eq!(compare_runs(&a[4..], &b[4..], 4), (true, 4));
        b[9] = 1;
        assert_eq!(compare_runs(&a[4..], &b[4..], 4), (true, 8));
        // A short tail counts as a chunk of its own.
        assert_eq!(compare_runs(&a[..6], &b[..6], 4), (false, 4));
    }
}
