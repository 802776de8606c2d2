//! `aio_read`, `aio_write` (and `aio_flush`, which has nothing to wait
//! for): the asynchronous variants of readv and writev.
//!
//! A request runs in the background and prints its report when it
//! completes: while a later command does I/O, at `aio_flush`, during
//! `sleep`, or at the drain before exit, which is when qemu-io's main loop
//! gets to completions too. As in QEMU, the command itself succeeds once
//! its arguments are good: I/O errors and pattern mismatches are only
//! reported.

use super::request::{matches_pattern, total_length};
use super::Ctx;
use crate::getopt::Item;
use crate::io::numbers::{cvtnum_or_report, parse_pattern};
use crate::io::report::{dump_buffer, print_report};
use crate::outln;
use std::time::Instant;
use strata_block::error::strerror;
use strata_block::{IoBuf, WriteFlags};

/// `aio_read [-Ciqrv] [-P pattern] off len [len..]`.
pub async fn aio_read(ctx: &mut Ctx<'_>) -> i32 {
    let parsed = ctx.getopt("CiP:qrv");
    let (mut machine, mut quiet, mut dump, mut pattern) = (false, false, false, None);
    for item in &parsed.items {
        match item {
            Item::Opt('C', _) => machine = true,
            Item::Opt('P', Some(a)) => match parse_pattern(a) {
                Some(p) => pattern = Some(p),
                None => return -libc::EINVAL,
            },
            Item::Opt('i', _) => {
                outln!("injecting invalid read request");
                return 0;
            }
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
    ctx.session.spawn(async move {
        let r = blk.read(offset as u64, IoBuf::zeroed(count as usize)).await;
        let elapsed = t1.elapsed();
        let buf = match r {
            Ok(b) => b,
            Err(e) => {
                // QEMU's completion callback says "readv" here, not "aio_read".
                outln!("readv failed: {}", strerror(e.code()));
                return;
            }
        };
        if let Some(p) = pattern {
            if !matches_pattern(buf.as_slice(), p) {
                outln!("Pattern verification failed at offset {offset}, {count} bytes");
            }
        }
        if quiet {
            return;
        }
        if dump {
            dump_buffer(buf.as_slice(), offset);
        }
        print_report("read", elapsed, offset, count, count, 1, machine);
    });
    0
}

/// `aio_write [-Cfiqruz] [-P pattern] off len [len..]`.
pub async fn aio_write(ctx: &mut Ctx<'_>) -> i32 {
    let parsed = ctx.getopt("CfiP:qruz");
    let (mut machine, mut quiet, mut zeroes, mut registered) = (false, false, false, false);
    let mut flags = WriteFlags::default();
    let mut pattern = 0xcd;
    for item in &parsed.items {
        match item {
            Item::Opt('C', _) => machine = true,
            Item::Opt('f', _) => flags.fua = true,
            Item::Opt('q', _) => quiet = true,
            Item::Opt('r', _) => registered = true,
            Item::Opt('u', _) => flags.may_unmap = true,
            Item::Opt('P', Some(a)) => match parse_pattern(a) {
                Some(p) => pattern = p,
                None => return -libc::EINVAL,
            },
            Item::Opt('i', _) => {
                outln!("injecting invalid write request");
                return 0;
            }
            Item::Opt('z', _) => zeroes = true,
            Item::Opt(_, _) => {}
            Item::Bad(_) => return ctx.bad_option(item),
        }
    }
    let Some((off_arg, lens)) = parsed.operands.split_first() else {
        return ctx.usage();
    };
    if lens.is_empty() {
        return ctx.usage();
    }
    // QEMU never refuses -z with -P here (its check looks at a flag that
    // -P does not set), so neither do we.
    if zeroes && lens.len() != 1 {
        outln!("-z supports only a single length parameter");
        return -libc::EINVAL;
    }
    if flags.may_unmap && !zeroes {
        outln!("-u requires -z to be specified");
        return -libc::EINVAL;
    }
    if zeroes && registered {
        outln!("cannot combine zero write with registered I/O buffer");
        return -libc::EINVAL;
    }
    let offset = match cvtnum_or_report(off_arg) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let count = if zeroes {
        match cvtnum_or_report(&lens[0]) {
            Ok(v) => v,
            Err(e) => return e,
        }
    } else {
        match total_length(lens) {
            Some(c) => c,
            None => return -libc::EINVAL,
        }
    };
    let blk = match ctx.blk() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let t1 = Instant::now();
    ctx.session.spawn(async move {
        let r = if zeroes {
            blk.write_zeroes(offset as u64, count as u64, flags).await
        } else {
            let buf = IoBuf::filled(count as usize, pattern);
            blk.write(offset as u64, buf, flags).await.map(drop)
        };
        let elapsed = t1.elapsed();
        if let Err(e) = r {
            outln!("aio_write failed: {}", strerror(e.code()));
            return;
        }
        if !quiet {
            print_report("wrote", elapsed, offset, count, count, 1, machine);
        }
    });
    0
}
