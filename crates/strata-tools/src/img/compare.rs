//! `qemu-img compare`: do two images read the same? Walks block status of
//! both chains so unallocated and zero ranges cost nothing; exit 0 same,
//! 1 different, 2 open error, 3 metadata error, 4 read error.

use super::{getopt, usage_error, Ctx};
use super::{long, opt};
use crate::common;
use std::sync::Arc;
use strata_block::report::error_report;
use strata_block::{Backend, IoBuf, Node, OpenFlags, Perm};

const OPTS: &[super::Opt] = &[
    opt('f', None, true),
    opt('F', None, true),
    opt('h', Some("help"), false),
    opt('q', None, false),
    opt('s', None, false),
    opt('T', None, true),
    opt('p', None, false),
    opt('U', Some("force-share"), false),
    long("image-opts", false),
    long("object", true),
];

/// Largest chunk compared in one read.
const IO_BUF_SIZE: u64 = 2 << 20;
const SECTOR: usize = 512;

/// Why a comparison stopped early.
enum Stop {
    Differ(String),
    Error(i32, String),
}

/// Offset of the first 512-byte sector that differs, if any.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|i| i * SECTOR)
}

/// Offset of the first 512-byte sector that is not all zero, if any.
fn first_nonzero(a: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .position(|c| !strata_block::buf::is_zero(c))
        .map(|i| i * SECTOR)
}

async fn read(blk: &Backend, off: u64, len: u64, name: &str) -> Result<IoBuf, Stop> {
    blk.read(off, IoBuf::zeroed(len as usize))
        .await
        .map_err(|e| {
            Stop::Error(
                4,
                format!(
                    "Error while reading offset {off} of {name}: {}",
                    strata_block::error::strerror(e.code())
                ),
            )
        })
}

async fn status(
    blk: &Backend,
    off: u64,
    len: u64,
    name: &str,
) -> Result<strata_block::BlockStatus, Stop> {
    // Block status is asked of the node, as QEMU asks blk_bs(blk).
    blk.node()
        .block_status_above(None, off, len)
        .await
        .map(|(s, _)| s)
        .map_err(|e| {
            Stop::Error(
                3,
                format!(
                    "Sector allocation test failed for {name}: {}",
                    strata_block::error::strerror(e.code())
                ),
            )
        })
}

/// Checks that `[off, off+len)` of `node` reads as zeroes.
async fn check_empty(blk: &Backend, off: u64, len: u64, name: &str) -> Result<(), Stop> {
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(IO_BUF_SIZE);
        let buf = read(blk, pos, n, name).await?;
        if let Some(i) = first_nonzero(buf.as_slice()) {
            return Err(Stop::Differ(format!(
                "Content mismatch at offset {}!",
                pos + i as u64
            )));
        }
        pos += n;
    }
    Ok(())
}

async fn compare(
    a: &Backend,
    b: &Backend,
    names: (&str, &str),
    strict: bool,
    quiet: bool,
) -> Result<(), Stop> {
    let (s1, s2) = (a.length(), b.length());
    if strict && s1 != s2 {
        return Err(Stop::Differ("Strict mode: Image size mismatch!".into()));
    }
    let total = s1.min(s2);
    let mut off = 0;
    while off < total {
        let st1 = status(a, off, s1 - off, names.0).await?;
        let st2 = status(b, off, s2 - off, names.1).await?;
        if strict && (st1.data, st1.zero, st1.allocated) != (st2.data, st2.zero, st2.allocated) {
            return Err(Stop::Differ(format!(
                "Strict mode: Offset {off} block status mismatch!"
            )));
        }
        let n = st1.len.min(st2.len).min(total - off);
        if st1.zero && st2.zero {
            off += n;
            continue;
        }
        if st1.allocated == st2.allocated && !st1.allocated {
            off += n;
            continue;
        }
        let n = n.min(IO_BUF_SIZE);
        if st1.allocated == st2.allocated {
            let b1 = read(a, off, n, names.0).await?;
            let b2 = read(b, off, n, names.1).await?;
            if let Some(i) = first_difference(b1.as_slice(), b2.as_slice()) {
                return Err(Stop::Differ(format!(
                    "Content mismatch at offset {}!",
                    off + i as u64
                )));
            }
        } else if st1.allocated {
            check_empty(a, off, n, names.0).await?;
        } else {
            check_empty(b, off, n, names.1).await?;
        }
        off += n;
    }
    if s1 != s2 {
        if !quiet {
            crate::outln!("Warning: Image size mismatch!");
        }
        let (longer, name, len) = if s1 > s2 {
            (a, names.0, s1)
        } else {
            (b, names.1, s2)
        };
        let mut off = total;
        while off < len {
            let st = status(longer, off, len - off, name).await?;
            let n = st.len.min(len - off);
            if st.allocated && !st.zero {
                check_empty(longer, off, n.min(IO_BUF_SIZE), name).await?;
                off += n.min(IO_BUF_SIZE);
            } else {
                off += n;
            }
        }
    }
    Ok(())
}

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("compare", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let (mut f1, mut f2, mut quiet, mut strict, mut force_share, mut image_opts) =
        (None, None, false, false, false, false);
    let mut cache = strata_block::CacheMode::default();
    for (i, v) in p.opts {
        let v = v.unwrap_or_default();
        match i {
            0 => f1 = Some(v),
            1 => f2 = Some(v),
            2 => {
                crate::outln!(
                    "Usage: {} compare [-f FMT] [-F FMT] [-q] [-s] [-U] FILE1 FILE2",
                    common::argv0()
                );
                return 0;
            }
            3 => quiet = true,
            4 => strict = true,
            5 => match strata_block::CacheMode::parse(&v) {
                Ok(c) => cache = c,
                Err(_) => {
                    error_report(format!("Invalid source cache option: {v}"));
                    return 2;
                }
            },
            7 => force_share = true,
            8 => image_opts = true,
            _ => {}
        }
    }
    if p.operands.len() != 2 {
        return usage_error("compare", "Expecting two image file names");
    }
    let (n1, n2) = (&p.operands[0], &p.operands[1]);
    // Without -F the second image's format is probed: -f names only the
    // first (as qemu-img's compare).
    let flags = OpenFlags {
        read_only: true,
        force_share,
        cache,
        ..OpenFlags::default()
    };
    let open = |name: &str, fmt: Option<&str>| ctx.open(name, fmt, image_opts, flags.clone(), 2);
    let a = match open(n1, f1.as_deref()) {
        Ok(n) => n,
        Err(c) => return c,
    };
    let b = match open(n2, f2.as_deref()) {
        Ok(n) => n,
        Err(c) => return c,
    };
    // Read through user handles, as qemu-img's BlockBackends.
    let r = ctx.ev.block_on(async {
        let read_only = |n: &Arc<Node>| {
            Backend::new(
                n,
                "an unnamed block device",
                Perm::CONSISTENT_READ,
                Perm::ALL,
            )
        };
        let (ba, bb) = match (read_only(&a), read_only(&b)) {
            (Ok(ba), Ok(bb)) => (ba, bb),
            (Err(e), _) | (_, Err(e)) => return Err(Stop::Error(2, e.to_string())),
        };
        let r = compare(&ba, &bb, (n1, n2), strict, quiet).await;
        let _ = ba.close().await;
        let _ = bb.close().await;
        r
    });
    let _ = ctx.ev.block_on(a.close());
    let _ = ctx.ev.block_on(b.close());
    match r {
        Ok(()) => {
            if !quiet {
                crate::outln!("Images are identical.");
            }
            0
        }
        Err(Stop::Differ(msg)) => {
            if !quiet {
                crate::outln!("{msg}");
            }
            1
        }
        Err(Stop::Error(code, msg)) => {
            error_report(msg);
            code
        }
    }
}
