//! `qemu-img bench`: a fixed number of reads or writes at a given depth,
//! timed; the workload and flags are qemu-img's, so the two compare directly.

use super::{getopt, Ctx};
use super::{long, opt};
use crate::common;
use futures::stream::{FuturesUnordered, StreamExt};
use std::sync::Arc;
use std::time::Instant;
use strata_block::options::parse_size;
use strata_block::report::error_report;
use strata_block::{Backend, CacheMode, IoBuf, Node, OpenFlags, Perm, WriteFlags};

const OPTS: &[super::Opt] = &[
    opt('h', Some("help"), false),
    opt('c', Some("count"), true),
    opt('d', Some("depth"), true),
    opt('f', Some("format"), true),
    opt('i', Some("aio"), true),
    opt('n', Some("native"), false),
    opt('o', Some("offset"), true),
    opt('q', Some("quiet"), false),
    opt('s', Some("buffer-size"), true),
    opt('S', Some("step-size"), true),
    opt('t', Some("cache"), true),
    opt('w', Some("write"), false),
    opt('U', Some("force-share"), false),
    long("flush-interval", true),
    long("no-drain", false),
    long("pattern", true),
    long("image-opts", false),
    long("object", true),
];

/// The workload.
#[derive(Clone)]
struct Bench {
    count: u64,
    depth: usize,
    offset: u64,
    bufsize: usize,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain_on_flush: bool,
}

fn parse_count(what: &str, v: &str, max: u64) -> Result<u64, i32> {
    match v.parse::<u64>() {
        Ok(n) if n >= 1 && n <= max => Ok(n),
        Ok(_) => {
            error_report(format!(
                "Invalid {what} specified. Must be between 1 and {max}."
            ));
            Err(1)
        }
        Err(_) => {
            error_report(format!("Invalid {what} specified: '{v}'."));
            Err(1)
        }
    }
}

fn parse_bytes(what: &str, v: &str) -> Result<u64, i32> {
    parse_size(v, 1).map_err(|_| {
        error_report(format!("Invalid {what} specified"));
        1
    })
}

/// Runs the workload on `node`, through a user handle as qemu-img's
/// BlockBackend: `depth` requests in flight until `count` are done.
async fn run_bench(node: &Arc<Node>, b: &Bench) -> strata_block::Result<()> {
    let mut perm = Perm::CONSISTENT_READ;
    if b.write {
        perm = perm.with(Perm::WRITE);
    }
    let blk = Arc::new(Backend::new(
        node,
        "an unnamed block device",
        perm,
        Perm::ALL,
    )?);
    let r = bench_through(&blk, b).await;
    blk.close().await?;
    r
}

async fn bench_through(blk: &Arc<Backend>, b: &Bench) -> strata_block::Result<()> {
    let size = blk.length();
    let mut offset = b.offset;
    let mut issued = 0u64;
    let mut done = 0u64;
    let mut inflight = FuturesUnordered::new();
    let mut buffers: Vec<IoBuf> = (0..b.depth)
        .map(|_| IoBuf::filled(b.bufsize, b.pattern))
        .collect();
    let mut since_flush = 0u64;
    while done < b.count {
        while inflight.len() < b.depth && issued < b.count {
            if b.flush_interval > 0 && since_flush >= b.flush_interval {
                if b.drain_on_flush && !inflight.is_empty() {
                    break;
                }
                blk.flush().await?;
                since_flush = 0;
            }
            let buf = buffers
                .pop()
                .unwrap_or_else(|| IoBuf::filled(b.bufsize, b.pattern));
            let off = offset;
            let n = Arc::clone(blk);
            let write = b.write;
            inflight.push(async move {
                if write {
                    n.write(off, buf, WriteFlags::default()).await
                } else {
                    n.read(off, buf).await
                }
            });
            issued += 1;
            since_flush += 1;
            offset += b.step;
            offset = if size == 0 { 0 } else { offset % size };
        }
        match inflight.next().await {
            Some(r) => {
                buffers.push(r?);
                done += 1;
            }
            None => break,
        }
    }
    Ok(())
}

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("bench", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut b = Bench {
        count: 75000,
        depth: 64,
        offset: 0,
        bufsize: 4096,
        step: 0,
        write: false,
        pattern: 0,
        flush_interval: 0,
        drain_on_flush: true,
    };
    let (mut fmt, mut image_opts, mut force_share) = (None, false, false);
    let mut flags = OpenFlags {
        // io_uring is Strata's default engine (qemu-img bench's is threads).
        aio: strata_block::engine::Aio::IoUring,
        ..OpenFlags::default()
    };
    let mut native = false;
    for (i, v) in p.opts {
        let v = v.unwrap_or_default();
        let r = match i {
            0 => {
                crate::outln!("Usage: {} bench [-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH] [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n] [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]] FILE", common::argv0());
                return 0;
            }
            1 => parse_count("request count", &v, i32::MAX as u64).map(|n| b.count = n),
            2 => parse_count("queue depth", &v, 4096).map(|n| b.depth = n as usize),
            3 => {
                fmt = Some(v);
                Ok(())
            }
            4 => match strata_block::engine::Aio::parse(&v) {
                Ok(a) => {
                    flags.aio = a;
                    Ok(())
                }
                Err(_) => {
                    error_report("Invalid aio option provided");
                    Err(1)
                }
            },
            5 => {
                native = true;
                Ok(())
            }
            6 => parse_bytes("offset", &v).map(|n| b.offset = n),
            8 => parse_bytes("buffer size", &v).map(|n| b.bufsize = n as usize),
            9 => parse_bytes("step_size", &v).map(|n| b.step = n),
            10 => match CacheMode::parse(&v) {
                Ok(c) => {
                    flags.cache = c;
                    Ok(())
                }
                Err(_) => {
                    error_report("Invalid cache mode");
                    Err(1)
                }
            },
            11 => {
                b.write = true;
                Ok(())
            }
            12 => {
                force_share = true;
                Ok(())
            }
            13 => parse_count("flush interval", &v, i32::MAX as u64).map(|n| b.flush_interval = n),
            14 => {
                b.drain_on_flush = false;
                Ok(())
            }
            15 => match v.parse::<u8>() {
                Ok(n) => {
                    b.pattern = n;
                    Ok(())
                }
                Err(_) => {
                    error_report("Invalid pattern byte specified");
                    Err(1)
                }
            },
            16 => {
                image_opts = true;
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(code) = r {
            return code;
        }
    }
    if native && !flags.cache.direct {
        let name = p.operands.first().cloned().unwrap_or_default();
        error_report(format!("Could not open '{name}': aio=native was specified, but it requires cache.direct=on, which was not specified."));
        return 1;
    }
    if b.flush_interval > 0 && !b.write {
        error_report("--flush-interval is only available in write tests");
        return 1;
    }
    if b.flush_interval > 0 && b.flush_interval < b.depth as u64 {
        error_report("Flush interval can't be smaller than depth");
        return 1;
    }
    if p.operands.len() != 1 {
        return super::usage_error("bench", "Expecting one image file name");
    }
    if b.step == 0 {
        b.step = b.bufsize as u64;
    }
    let name = &p.operands[0];
    flags.read_only = !b.write;
    flags.force_share = force_share;
    let node = match ctx.open(name, fmt.as_deref(), image_opts, flags, 1) {
        Ok(n) => n,
        Err(code) => return code,
    };
    crate::outln!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        b.count,
        if b.write { "write" } else { "read" },
        b.bufsize,
        b.depth,
        b.offset,
        b.step
    );
    if b.flush_interval > 0 {
        crate::outln!("Sending flush every {} requests", b.flush_interval);
    }
    let t0 = Instant::now();
    let r = {
        let (node, b) = (Arc::clone(&node), b.clone());
        ctx.ev
            .block_on_task(async move { run_bench(&node, &b).await })
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let _ = ctx.ev.block_on(node.close());
    match r {
        Ok(()) => {
            crate::outln!("Run completed in {elapsed:.3} seconds.");
            0
        }
        Err(e) => {
            error_report(format!(
                "Failed request: {}",
                strata_block::error::strerror(e.code())
            ));
            1
        }
    }
}
