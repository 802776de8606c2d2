//! `read` and `readv`: read a range, optionally check it against a
//! pattern byte and dump it, then report.

use super::request::{failed, matches_pattern, MAX_BYTES};
use super::Ctx;
use crate::getopt::Item;
use crate::io::numbers::{cvtnum_or_report, parse_pattern};
use crate::io::report::{dump_buffer, print_report};
use crate::outln;
use std::time::Instant;
use strata_block::IoBuf;

/// `read [-abCqrv] [-P pattern [-s off] [-l len]] off len`.
pub async fn read(ctx: &mut Ctx<'_>) -> i32 {
    let parsed = ctx.getopt("bCl:pP:qrs:v");
    let (mut vmstate, mut machine, mut quiet, mut dump) = (false, false, false, false);
    let (mut registered, mut pattern) = (false, None);
    let (mut pattern_offset, mut pattern_count): (i64, Option<i64>) = (0, None);
    let mut offset_given = false;
    for item in &parsed.items {
        match item {
            Item::Opt('b', _) => vmstate = true,
            Item::Opt('C', _) => machine = true,
            Item::Opt('l', Some(a)) => match cvtnum_or_report(a) {
                Ok(v) => pattern_count = Some(v),
                Err(e) => return e,
            },
            Item::Opt('P', Some(a)) => match parse_pattern(a) {
                Some(p) => pattern = Some(p),
                None => return -libc::EINVAL,
            },
            Item::Opt('q', _) => quiet = true,
            Item::Opt('r', _) => registered = true,
            Item::Opt('s', Some(a)) => match cvtnum_or_report(a) {
                Ok(v) => {
                    pattern_offset = v;
                    offset_given = true;
                }
                Err(e) => return e,
            },
            Item::Opt('v', _) => dump = true,
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
    let count = match cvtnum_or_report(len_arg) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if count > MAX_BYTES {
        outln!("length cannot exceed {MAX_BYTES}, given {len_arg}");
        return -libc::EINVAL;
    }
    if pattern.is_none() && (pattern_count.is_some() || offset_given) {
        return ctx.usage();
    }
    let pattern_count = pattern_count.unwrap_or(count - pattern_offset);
    if pattern_count < 0 || pattern_count as i128 + pattern_offset as i128 > count as i128 {
        outln!("pattern verification range exceeds end of read data");
        return -libc::EINVAL;
    }
    if vmstate {
        if offset % 512 != 0 {
            outln!("{offset} is not a sector-aligned value for 'offset'");
            return -libc::EINVAL;
        }
        if count % 512 != 0 {
            outln!("{count} is not a sector-aligned value for 'count'");
            return -libc::EINVAL;
        }
        if registered {
            outln!("I/O buffer registration is not supported when reading from vmstate");
            return -libc::EINVAL;
        }
    }
    let blk = match ctx.blk() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let t1 = Instant::now();
    let buf = IoBuf::zeroed(count as usize);
    let r = if vmstate {
        blk.load_vmstate(offset as u64, buf).await
    } else {
        blk.read(offset as u64, buf).await
    };
    let elapsed = t1.elapsed();
    let buf = match r {
        Ok(b) => b,
        Err(e) => return failed("read", &e),
    };
    let mut ret = 0;
    if let Some(p) = pattern {
        let start = pattern_offset as usize;
        let range = &buf.as_slice()[start..start + pattern_count as usize];
        if !matches_pattern(range, p) {
            outln!(
                "Pattern verification failed at offset {}, {pattern_count} bytes",
                offset + pattern_offset
            );
            ret = -libc::EINVAL;
        }
    }
    if quiet {
        return ret;
    }
    if dump {
        dump_buffer(buf.as_slice(), offset);
    }
    print_report("read", elapsed, offset, count, count, 1, machine);
    ret
}

/// `readv [-Cqrv] [-P pattern] off len [len..]`.
pub async fn readv(ctx: &mut Ctx<'_>) -> i32 {
    let parsed = ctx.getopt("CP:qrv");
    let (mut machine, mut quiet, mut dump, mut pattern) = (false, false, false, None);
    for item in &parsed.items {
        match item {
            Item::Opt('C', _) => machine = true,
            Item::Opt('P', Some(a)) => match parse_pattern(a) {
                Some(p) => pattern = Some(p),
                None => return -libc::EINVAL,
            },
            Item::Opt('q', _) => quiet = true,
            Item::Opt('v', _) => dump = true,
            Item::Opt(_, _) => {}
            Item::Bad(_) => return ctx.bad_option(item),
        }
    }
    let (offset, count) = match ctx.vector_request(&parsed.operands) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let blk = match ctx.blk() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let t1 = Instant::now();
    let r = blk.read(offset as u64, IoBuf::zeroed(count as usize)).await;
    let elapsed = t1.elapsed();
    let buf = match r {
        Ok(b) => b,
        Err(e) => return failed("readv", &e),
    };
    let mut ret = 0;
    if let Some(p) = pattern {
        if !matches_pattern(buf.as_slice(), p) {
            outln!("Pattern verification failed at offset {offset}, {count} bytes");
            ret = -libc::EINVAL;
        }
    }
    if quiet {
        return ret;
    }
    if dump {
        dump_buffer(buf.as_slice(), offset);
    }
    print_report("read", elapsed, offset, count, count, 1, machine);
    ret
}
