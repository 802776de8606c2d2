//! `write` and `writev`: write a pattern, zeroes or a file's bytes to a
//! range, then report.

use super::request::{failed, MAX_BYTES};
use super::Ctx;
use crate::getopt::Item;
use crate::io::numbers::{cvtnum_or_report, parse_pattern};
use crate::io::report::print_report;
use crate::outln;
use std::io::Read;
use std::time::Instant;
use strata_block::error::strerror;
use strata_block::{IoBuf, WriteFlags};

/// The byte qemu-io writes when no pattern is given.
const DEFAULT_PATTERN: u8 = 0xcd;

/// `write [-bcCfnqruz] [-P pattern | -s source_file] off len`.
pub async fn write(ctx: &mut Ctx<'_>) -> i32 {
    let parsed = ctx.getopt("bcCfnpP:qrs:uz");
    let (mut vmstate, mut compressed, mut machine, mut quiet) = (false, false, false, false);
    let (mut zeroes, mut registered) = (false, false);
    let mut flags = WriteFlags::default();
    let (mut pattern, mut source): (Option<u8>, Option<&str>) = (None, None);
    for item in &parsed.items {
        match item {
            Item::Opt('b', _) => vmstate = true,
            Item::Opt('c', _) => compressed = true,
            Item::Opt('C', _) => machine = true,
            Item::Opt('f', _) => flags.fua = true,
            Item::Opt('n', _) => flags.no_fallback = true,
            Item::Opt('P', Some(a)) => match parse_pattern(a) {
                Some(p) => pattern = Some(p),
                None => return -libc::EINVAL,
            },
            Item::Opt('q', _) => quiet = true,
            Item::Opt('r', _) => registered = true,
            Item::Opt('s', Some(f)) => source = Some(f),
            Item::Opt('u', _) => flags.may_unmap = true,
            Item::Opt('z', _) => zeroes = true,
            Item::Opt(_, _) => {}
            Item::Bad(_) => return ctx.bad_option(item),
        }
    }
    let [off_arg, len_arg] = parsed.operands.as_slice() else {
        return ctx.usage();
    };
    let refusal = if vmstate && zeroes {
        Some("-b and -z cannot be specified at the same time")
    } else if flags.fua && (vmstate || compressed) {
        Some("-f and -b or -c cannot be specified at the same time")
    } else if flags.no_fallback && !zeroes {
        Some("-n requires -z to be specified")
    } else if flags.may_unmap && !zeroes {
        Some("-u requires -z to be specified")
    } else if zeroes as u8 + pattern.is_some() as u8 + source.is_some() as u8 > 1 {
        Some("Only one of -z, -P, and -s can be specified at the same time")
    } else {
        None
    };
    if let Some(msg) = refusal {
        outln!("{msg}");
        return -libc::EINVAL;
    }
    let offset = match cvtnum_or_report(off_arg) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let count = match cvtnum_or_report(len_arg) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if count > MAX_BYTES && !flags.no_fallback {
        outln!("length cannot exceed {MAX_BYTES} without -n, given {len_arg}");
        return -libc::EINVAL;
    }
    if vmstate || compressed {
        if offset % 512 != 0 {
            outln!("{offset} is not a sector-aligned value for 'offset'");
            return -libc::EINVAL;
        }
        if count % 512 != 0 {
            outln!("{count} is not a sector-aligned value for 'count'");
            return -libc::EINVAL;
        }
    }
    let data = if zeroes {
        if registered {
            outln!("cannot combine zero write with registered I/O buffer");
            return -libc::EINVAL;
        }
        None
    } else if let Some(path) = source {
        match buffer_from_file(path, count as usize) {
            Some(b) => Some(b),
            None => return -libc::EINVAL,
        }
    } else {
        Some(IoBuf::filled(
            count as usize,
            pattern.unwrap_or(DEFAULT_PATTERN),
        ))
    };
    let blk = match ctx.blk() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let t1 = Instant::now();
    let r = match data {
        Some(buf) if compressed => blk.write_compressed(offset as u64, buf).await.map(drop),
        Some(buf) if vmstate => blk.save_vmstate(offset as u64, buf).await.map(drop),
        None => blk.write_zeroes(offset as u64, count as u64, flags).await,
        Some(buf) => blk.write(offset as u64, buf, flags).await.map(drop),
    };
    let elapsed = t1.elapsed();
    if let Err(e) = r {
        return failed("write", &e);
    }
    if !quiet {
        print_report("wrote", elapsed, offset, count, count, 1, machine);
    }
    0
}

/// A buffer filled with the bytes of `path`, repeated until `len`
/// (QEMU: qemu_io_alloc_from_file); complaints go to stderr.
fn buffer_from_file(path: &str, len: usize) -> Option<IoBuf> {
    let mut buf = IoBuf::zeroed(len);
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            strata_block::stderr_line!(
                "{path}: {}",
                strerror(e.raw_os_error().unwrap_or(libc::EIO))
            );
            return None;
        }
    };
    let data = buf.as_mut_slice();
    let mut got = 0;
    while got < len {
        match file.read(&mut data[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                strata_block::stderr_line!(
                    "{path}: {}",
                    strerror(e.raw_os_error().unwrap_or(libc::EIO))
                );
                return None;
            }
        }
    }
    if got == 0 {
        strata_block::stderr_line!("{path}: file is empty");
        return None;
    }
    let mut filled = got;
    while filled < len {
        let n = got.min(len - filled);
        data.copy_within(0..n, filled);
        filled += n;
    }
    Some(buf)
}

/// `writev [-Cfqr] [-P pattern] off len [len..]`.
pub async fn writev(ctx: &mut Ctx<'_>) -> i32 {
    let parsed = ctx.getopt("CfP:qr");
    let (mut machine, mut quiet, mut pattern) = (false, false, DEFAULT_PATTERN);
    let mut flags = WriteFlags::default();
    for item in &parsed.items {
        match item {
            Item::Opt('C', _) => machine = true,
            Item::Opt('f', _) => flags.fua = true,
            Item::Opt('q', _) => quiet = true,
            Item::Opt('P', Some(a)) => match parse_pattern(a) {
                Some(p) => pattern = p,
                None => return -libc::EINVAL,
            },
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
    let buf = IoBuf::filled(count as usize, pattern);
    let t1 = Instant::now();
    let r = blk.write(offset as u64, buf, flags).await;
    let elapsed = t1.elapsed();
    if let Err(e) = r {
        return failed("writev", &e);
    }
    if !quiet {
        print_report("wrote", elapsed, offset, count, count, 1, machine);
    }
    0
}
