//! `qemu-img commit`: write what an image holds above a base image of its
//! backing chain into that base, then (without `-d` or `-b`) empty the image.
//!
//! QEMU runs this as an active-commit block job; with nobody else writing,
//! its effect is the copy done here: every range allocated above the base
//! is written into the base (zeroes as zero writes), the base grown first
//! if it is shorter, and flushed before the image is emptied, so a crash at
//! any point leaves the chain reading as before.

use super::{cvtnum_full, getopt, long, opt, usage_error, Ctx};
use crate::common;
use crate::progress::Progress;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_block::report::error_report;
use strata_block::{
    Backend, CacheMode, ChildRole, IoBuf, Node, OpenFlags, Opts, Perm, Preallocation, WriteFlags,
};

const OPTS: &[super::Opt] = &[
    opt('f', None, true),
    opt('h', Some("help"), false),
    opt('t', None, true),
    opt('b', None, true),
    opt('d', None, false),
    opt('p', None, false),
    opt('q', None, false),
    opt('r', None, true),
    long("object", true),
    long("image-opts", false),
    // Strata's own, as convert's: `--progress=json` for pipelines.
    long("progress", true),
];

/// Largest piece copied at once (QEMU's mirror default buffer is 16 MiB,
/// cut into granularity-sized requests; 1 MiB keeps memory small).
const CHUNK: u64 = 1 << 20;
const DEVICE: &str = "an unnamed block device";

#[derive(Default)]
struct Args {
    fmt: Option<String>,
    cache: Option<String>,
    base: Option<String>,
    drop: bool,
    progress: bool,
    /// `--progress=json`: bytes as JSON lines on stderr.
    progress_json: bool,
    quiet: bool,
    rate: u64,
    image_opts: bool,
}

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("commit", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut a = Args::default();
    for (i, v) in p.opts {
        match i {
            0 => a.fmt = v,
            1 => {
                crate::outln!("Usage: {} commit [--object OBJDEF] [--image-opts] [-q] [-f FMT] [-t CACHE] [-b BASE] [-r RATE_LIMIT] [-d] [-p] FILENAME", common::argv0());
                return 0;
            }
            2 => a.cache = v,
            3 => {
                a.base = v;
                // -b implies -d: the image above a deeper base keeps its data.
                a.drop = true;
            }
            4 => a.drop = true,
            5 => a.progress = true,
            6 => a.quiet = true,
            7 => match cvtnum_full("rate limit", v.as_deref().unwrap_or(""), true, 0, i64::MAX) {
                Ok(r) => a.rate = r,
                Err(code) => return code,
            },
            9 => a.image_opts = true,
            10 => {
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
        return usage_error("commit", "Expecting one image file name");
    }
    let filename = &p.operands[0];
    let cache = a.cache.as_deref().unwrap_or("writeback");
    let Ok(cache) = CacheMode::parse(cache) else {
        error_report(format!("Invalid cache option: {cache}"));
        return 1;
    };
    let flags = OpenFlags {
        cache,
        unmap: true,
        ..OpenFlags::default()
    };
    let Ok(node) = ctx.open(filename, a.fmt.as_deref(), a.image_opts, flags.clone(), 1) else {
        return 1;
    };
    let mut progress = Progress::for_flags(a.progress, a.progress_json, 1.0);
    progress.print(0.0, 100);
    let ok = ctx.ev.block_on(async {
        // The base must be writable: open the chain again with it so (QEMU
        // reopens the base read-write for the job).
        let path = match find_base(&node, a.base.as_deref(), filename) {
            Ok(path) => path,
            Err(msg) => {
                error_report(msg);
                let _ = node.close().await;
                return false;
            }
        };
        let _ = node.close().await;
        let spec = common::ImageSpec {
            name: filename,
            format: a.fmt.as_deref(),
            image_opts: a.image_opts,
        };
        // The same chain again: the path found above leads to the base.
        let again = OpenFlags {
            reopen: true,
            ..flags
        };
        let node = match common::open_with(&ctx.reg, &spec, again, writable_at(&path)).await {
            Ok(n) => n,
            Err(e) => {
                error_report(common::open_error(filename, &e));
                return false;
            }
        };
        let base = walk(&node, &path);
        let mut ok = match commit(&a, &node, &base, &mut progress).await {
            Ok(()) => true,
            Err(e) => {
                error_report(format!(
                    "Block job failed: {}",
                    strata_block::error::strerror(e.code())
                ));
                false
            }
        };
        if ok && !a.drop {
            match node.make_empty().await {
                Ok(()) => {}
                Err(e) if e.code() == libc::ENOTSUP => {}
                Err(e) => {
                    error_report(format!(
                        "Failed to empty {}: {}",
                        node.filename(),
                        strata_block::error::strerror(e.code())
                    ));
                    ok = false;
                }
            }
        }
        if let Err(e) = node.close().await {
            if ok {
                error_report(format!("Error while closing the image: {e}"));
            }
            ok = false;
        }
        ok
    });
    progress.end();
    if !ok {
        return 1;
    }
    if !a.quiet {
        crate::outln!("Image committed.");
    }
    0
}

/// The edges from `node` down to the base: `-b` names it, else it is the
/// image's own backing file (qemu-img's default; QMP's is the bottom).
fn find_base(
    node: &Arc<Node>,
    name: Option<&str>,
    filename: &str,
) -> Result<Vec<ChildRole>, String> {
    let base = match name {
        Some(b) => node
            .find_backing_image(b)
            .ok_or_else(|| format!("Did not find '{b}' in the backing chain of '{filename}'"))?,
        None => node
            .backing_chain_next()
            .ok_or_else(|| "Image does not have a backing file".to_string())?,
    };
    let mut path = Vec::new();
    let mut cur = Arc::clone(node);
    while !Arc::ptr_eq(&cur, &base) {
        let next = if cur.driver().is_filter() {
            cur.children().into_iter().find(|c| c.role.is_primary())
        } else {
            cur.children()
                .into_iter()
                .find(|c| c.role == ChildRole::Backing)
        };
        let Some(next) = next else {
            return Err(format!(
                "Did not find the base in the backing chain of '{filename}'"
            ));
        };
        path.push(next.role);
        cur = next.node;
    }
    Ok(path)
}

/// The node at the end of `path` from `node`.
fn walk(node: &Arc<Node>, path: &[ChildRole]) -> Arc<Node> {
    let mut cur = Arc::clone(node);
    for role in path {
        if let Some(c) = cur.child(*role) {
            cur = c;
        }
    }
    cur
}

/// Options that open the node at the end of `path` read-write.
fn writable_at(path: &[ChildRole]) -> Opts {
    let mut inner = Map::new();
    inner.insert("read-only".into(), Value::Bool(false));
    for role in path.iter().rev() {
        let mut outer = Map::new();
        outer.insert(role.name(), Value::Object(inner));
        inner = outer;
    }
    inner
}

/// Copies everything allocated above `base` into it (QEMU: the commit
/// job's mirror, run to completion).
async fn commit(
    a: &Args,
    node: &Arc<Node>,
    base: &Arc<Node>,
    progress: &mut Progress,
) -> strata_block::Result<()> {
    let src = Backend::new(node, DEVICE, Perm::CONSISTENT_READ, Perm::ALL)?;
    let dst = match Backend::new(
        base,
        DEVICE,
        Perm::CONSISTENT_READ.with(Perm::WRITE).with(Perm::RESIZE),
        Perm::ALL,
    ) {
        Ok(d) => d,
        Err(e) => {
            let _ = src.close().await;
            return Err(e);
        }
    };
    let r = copy_down(a, node, base, &src, &dst, progress).await;
    let _ = src.close().await;
    let closed = dst.close().await;
    r.and(closed)
}

async fn copy_down(
    a: &Args,
    node: &Arc<Node>,
    base: &Arc<Node>,
    src: &Backend,
    dst: &Backend,
    progress: &mut Progress,
) -> strata_block::Result<()> {
    let len = src.length();
    if dst.length() < len {
        dst.truncate(len, false, Preallocation::Off).await?;
    }
    let total = allocated_above(node, base, len).await?;
    let started = Instant::now();
    let mut done = 0u64;
    progress.bytes(0, total);
    let mut offset = 0;
    while offset < len {
        let (st, _) = node
            .block_status_above(Some(base), offset, CHUNK.min(len - offset))
            .await?;
        let n = st.len.max(1);
        if st.allocated {
            if st.zero {
                let flags = WriteFlags {
                    may_unmap: true,
                    ..WriteFlags::default()
                };
                dst.write_zeroes(offset, n, flags).await?;
            } else {
                let buf = src.read(offset, IoBuf::zeroed(n as usize)).await?;
                dst.write(offset, buf, WriteFlags::default()).await?;
            }
            done += n;
            if total > 0 {
                progress.report(done, total);
            }
            if a.rate > 0 {
                // The -r limit in bytes per second, as a job's speed.
                let due = Duration::from_secs_f64(done as f64 / a.rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        offset += n;
    }
    dst.flush().await?;
    progress.print(100.0, 0);
    progress.bytes(total, total);
    Ok(())
}

/// Bytes allocated above `base`: the job's total, for progress.
async fn allocated_above(
    node: &Arc<Node>,
    base: &Arc<Node>,
    len: u64,
) -> strata_block::Result<u64> {
    let mut total = 0;
    let mut offset = 0;
    while offset < len {
        let (st, _) = node
            .block_status_above(Some(base), offset, len - offset)
            .await?;
        let n = st.len.max(1);
        if st.allocated {
            total += n;
        }
        offset += n;
    }
    Ok(total)
}
