//! `alloc` and `map`: which ranges the top image itself holds (QEMU:
//! bdrv_is_allocated, which never looks into the backing file; zero
//! clusters count as allocated).

use super::Ctx;
use crate::common::cvtstr;
use crate::io::numbers::cvtnum_or_report;
use crate::outln;
use std::sync::Arc;
use strata_block::error::strerror;
use strata_block::report::error_report;
use strata_block::{Node, Result};

/// Whether the range at `offset` is allocated in `node`, and for how many
/// bytes (at most `bytes`); 0 bytes at and beyond the end.
async fn is_allocated(node: &Arc<Node>, offset: u64, bytes: u64) -> Result<(bool, u64)> {
    if bytes == 0 || offset >= node.length() {
        return Ok((false, 0));
    }
    let st = node.block_status(offset, bytes).await?;
    Ok((st.allocated, st.len))
}

/// `alloc offset [count]`.
pub async fn alloc(ctx: &mut Ctx<'_>) -> i32 {
    let start = match cvtnum_or_report(&ctx.argv[1]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut count = match ctx.argv.get(2) {
        Some(a) => match cvtnum_or_report(a) {
            Ok(v) => v as u64,
            Err(e) => return e,
        },
        None => 512,
    };
    let node = match ctx.node() {
        Ok(n) => n,
        Err(e) => return e,
    };
    let mut offset = start as u64;
    let mut remaining = count;
    let mut allocated = 0;
    while remaining > 0 {
        let (here, num) = match is_allocated(&node, offset, remaining).await {
            Ok(r) => r,
            Err(e) => {
                outln!("is_allocated failed: {}", strerror(e.code()));
                return -e.code();
            }
        };
        offset += num;
        remaining -= num;
        if here {
            allocated += num;
        }
        if num == 0 {
            // The end of the image: count only what exists.
            count -= remaining;
            remaining = 0;
        }
    }
    outln!(
        "{allocated}/{count} bytes allocated at offset {}",
        cvtstr(start as f64)
    );
    0
}

/// The longest run from `offset` that is allocated, or not, throughout
/// (QEMU: map_is_allocated).
async fn run_at(node: &Arc<Node>, offset: u64, bytes: u64) -> Result<(bool, u64)> {
    let (first, mut total) = is_allocated(node, offset, bytes).await?;
    let (mut off, mut left, mut num) = (offset, bytes, total);
    while left > 0 {
        off += num;
        left -= num;
        match is_allocated(node, off, left).await {
            Ok((here, n)) if here == first && n > 0 => {
                total += n;
                num = n;
            }
            _ => break,
        }
    }
    Ok((first, total))
}

/// `map`: every run of the image, allocated or not.
pub async fn map(ctx: &mut Ctx<'_>) -> i32 {
    let node = match ctx.node() {
        Ok(n) => n,
        Err(e) => return e,
    };
    let mut offset = 0;
    let mut bytes = node.length();
    while bytes > 0 {
        let (here, num) = match run_at(&node, offset, bytes).await {
            Ok(r) => r,
            Err(e) => {
                error_report(format!(
                    "Failed to get allocation status: {}",
                    strerror(e.code())
                ));
                return -e.code();
            }
        };
        if num == 0 {
            error_report("Unexpected end of image");
            return -libc::EIO;
        }
        let what = if here {
            "    allocated"
        } else {
            "not allocated"
        };
        outln!(
            "{} (0x{num:x}) bytes {what} at offset {} (0x{offset:x})",
            cvtstr(num as f64),
            cvtstr(offset as f64)
        );
        offset += num;
        bytes -= num;
    }
    0
}
