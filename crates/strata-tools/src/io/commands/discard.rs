//! `discard`: tell the image a range is no longer needed, then report.

use super::request::{failed, MAX_BYTES};
use super::Ctx;
use crate::getopt::Item;
use crate::io::numbers::cvtnum_or_report;
use crate::io::report::print_report;
use crate::outln;
use std::time::Instant;
use strata_block::Error;

/// `discard [-Cq] off len`.
pub async fn discard(ctx: &mut Ctx<'_>) -> i32 {
    let parsed = ctx.getopt("Cq");
    let (mut machine, mut quiet) = (false, false);
    for item in &parsed.items {
        match item {
            Item::Opt('C', _) => machine = true,
            Item::Opt('q', _) => quiet = true,
            Item::Opt(_, _) => {}
            Item::Bad(_) => return ctx.bad_option(item),
        }
    }
    let [off_arg, len_arg] = parsed.operands.as_slice() else {
        return ctx.usage();
    };
    let offset = match cvtnum_or_report(off_arg) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let bytes = match cvtnum_or_report(len_arg) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if bytes > MAX_BYTES {
        outln!("length cannot exceed {MAX_BYTES}, given {len_arg}");
        return -libc::EINVAL;
    }
    let blk = match ctx.blk() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let unmap = ctx.session.unmap();
    let t1 = Instant::now();
    let r = if unmap {
        blk.discard(offset as u64, bytes as u64).await
    } else if (offset as u64).saturating_add(bytes as u64) > blk.length() {
        // discard=ignore still checks the request, like QEMU's block layer.
        Err(Error::errno(libc::EIO))
    } else {
        Ok(())
    };
    let elapsed = t1.elapsed();
    if let Err(e) = r {
        return failed("discard", &e);
    }
    if !quiet {
        print_report("discard", elapsed, offset, bytes, bytes, 1, machine);
    }
    0
}
