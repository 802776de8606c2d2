//! Commands for testing the tool itself and the block layer's debug hooks:
//! `sleep`, `sigraise`, `abort`, the blkdebug breakpoint commands and the
//! zoned-device commands (Strata has no zoned devices, so those answer as
//! QEMU does for an image without them).

use super::request::total_length;
use super::Ctx;
use crate::io::numbers::{cvtnum_or_report, strtol0};
use crate::{outln, stdout as out_buf};
use std::time::Duration;

/// `abort`: crash on purpose. Like abort(3), buffered output is lost.
pub fn abort() -> i32 {
    std::process::abort()
}

/// Reports a failed breakpoint command as qemu-io does.
fn report(what: &str, r: strata_block::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            outln!("{what}: {}", strata_block::error::strerror(e.code()));
            -e.code()
        }
    }
}

/// `break event tag`: suspend the next request that reaches `event`.
pub fn set_break(ctx: &mut Ctx<'_>) -> i32 {
    let node = match ctx.node() {
        Ok(n) => n,
        Err(e) => return e,
    };
    let (event, tag) = (&ctx.argv[1], &ctx.argv[2]);
    report(
        "Could not set breakpoint",
        node.with_debug_hooks(|h| h.breakpoint(event, tag)),
    )
}

/// `remove_break tag`: drop the breakpoint and resume what it holds.
pub fn remove_break(ctx: &mut Ctx<'_>) -> i32 {
    let node = match ctx.node() {
        Ok(n) => n,
        Err(e) => return e,
    };
    let tag = &ctx.argv[1];
    report(
        &format!("Could not remove breakpoint {tag}"),
        node.with_debug_hooks(|h| h.remove_breakpoint(tag)),
    )
}

/// `resume tag`: let the suspended request go on.
pub fn resume(ctx: &mut Ctx<'_>) -> i32 {
    let node = match ctx.node() {
        Ok(n) => n,
        Err(e) => return e,
    };
    let tag = &ctx.argv[1];
    report(
        "Could not resume request",
        node.with_debug_hooks(|h| h.resume(tag)),
    )
}

/// `wait_break tag`: run the event loop until a request is suspended as
/// `tag`. Without a blkdebug node QEMU would wait forever; returning at
/// once is the useful reading of that.
pub async fn wait_break(ctx: &mut Ctx<'_>) -> i32 {
    let node = match ctx.node() {
        Ok(n) => n,
        Err(e) => return e,
    };
    let tag = &ctx.argv[1];
    if node.debug_node().is_none() {
        return 0;
    }
    // Polled on a timer, so the loop parks and completions are reaped.
    while !node
        .with_debug_hooks(|h| Ok(h.is_suspended(tag)))
        .unwrap_or(true)
    {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    0
}

/// `sleep ms`.
pub async fn sleep(ctx: &mut Ctx<'_>) -> i32 {
    let arg = &ctx.argv[1];
    match strtol0(arg) {
        (ms, true) if ms >= 0 => {
            tokio::time::sleep(Duration::from_millis(ms as u64)).await;
            0
        }
        _ => {
            outln!("{arg} is not a valid number");
            -libc::EINVAL
        }
    }
}

/// The largest signal number plus one (glibc's NSIG).
const NSIG: i64 = 65;

/// `sigraise signal`.
pub fn sigraise(ctx: &mut Ctx<'_>) -> i32 {
    let arg = &ctx.argv[1];
    let sig = match cvtnum_or_report(arg) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if sig > NSIG {
        outln!("signal argument '{arg}' is too large to be a valid signal");
        return -libc::EINVAL;
    }
    // raise() does not flush stdio; QEMU flushes first so nothing is lost.
    out_buf::flush();
    // SAFETY: raise has no memory-safety preconditions; the signal number
    // is checked to be in range above.
    unsafe { libc::raise(sig as libc::c_int) };
    0
}

/// `zone_report`, `zone_open`, `zone_close`, `zone_finish`, `zone_reset`.
pub fn zone(ctx: &mut Ctx<'_>, op: &str) -> i32 {
    for arg in &ctx.argv[1..3] {
        if let Err(e) = cvtnum_or_report(arg) {
            return e;
        }
    }
    if op == "report" {
        if let Ok(n) = crate::io::numbers::cvtnum(&ctx.argv[2]) {
            if n > u32::MAX as i64 {
                outln!("Number of zones must be less than 2^32");
                return -libc::ERANGE;
            }
        }
    }
    outln!("zone {op} failed: Operation not supported");
    -libc::ENOTSUP
}

/// `zone_append [-p] offset len [len..]`.
pub fn zone_append(ctx: &mut Ctx<'_>) -> i32 {
    // QEMU takes at most one option, -p, and only in front.
    let rest = match ctx.argv.get(1).map(String::as_str) {
        Some("-p") => &ctx.argv[2..],
        _ => &ctx.argv[1..],
    };
    let Some((off, lens)) = rest.split_first() else {
        return -libc::EINVAL;
    };
    if let Err(e) = cvtnum_or_report(off) {
        return e;
    }
    if total_length(lens).is_none() {
        return -libc::EINVAL;
    }
    outln!("zone append failed: Operation not supported");
    -libc::ENOTSUP
}
