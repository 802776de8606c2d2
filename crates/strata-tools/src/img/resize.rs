//! `qemu-img resize`: grow (or, with --shrink, shrink) an image.

use super::{getopt, usage_error, Ctx};
use super::{long, opt};
use crate::common;
use strata_block::options::parse_size;
use strata_block::report::{error_report, warn_report};
use strata_block::{Backend, OpenFlags, Perm, Preallocation};

const OPTS: &[super::Opt] = &[
    opt('f', Some("format"), true),
    opt('h', Some("help"), false),
    opt('q', None, false),
    long("object", true),
    long("image-opts", false),
    long("preallocation", true),
    long("shrink", false),
];

pub fn run(ctx: Ctx) -> i32 {
    // A size like -1G looks like an option: take the last argument first.
    let mut args = ctx.args.clone();
    let size_arg = match args.last() {
        Some(s)
            if s.starts_with('-')
                && s.len() > 1
                && s[1..].starts_with(|c: char| c.is_ascii_digit()) =>
        {
            args.pop()
        }
        _ => None,
    };
    let p = match getopt("resize", &args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let (mut fmt, mut quiet, mut image_opts, mut shrink) = (None, false, false, false);
    let mut prealloc = Preallocation::Off;
    for (i, v) in p.opts {
        let v = v.unwrap_or_default();
        match i {
            0 => fmt = Some(v),
            1 => {
                crate::outln!("Usage: {} resize [-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink] [-q] FILE [+|-]SIZE", common::argv0());
                return 0;
            }
            2 => quiet = true,
            4 => image_opts = true,
            5 => match Preallocation::parse(&v) {
                Ok(pa) => prealloc = pa,
                Err(_) => {
                    error_report(format!("Invalid preallocation mode '{v}'"));
                    return 1;
                }
            },
            6 => shrink = true,
            _ => {}
        }
    }
    let mut operands = p.operands.clone();
    if let Some(s) = size_arg {
        operands.push(s);
    }
    if operands.len() != 2 {
        return usage_error("resize", "Expecting image file name and size");
    }
    let (name, size_s) = (&operands[0], &operands[1]);
    let (rel, digits) = match size_s.chars().next() {
        Some('+') => (1i8, &size_s[1..]),
        Some('-') => (-1, &size_s[1..]),
        _ => (0, &size_s[..]),
    };
    let n = match parse_size(digits, 1) {
        Ok(n) => n,
        Err(_) => {
            error_report("Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.");
            return 1;
        }
    };
    let flags = OpenFlags {
        resize: true,
        ..OpenFlags::default()
    };
    let node = match ctx.open(name, fmt.as_deref(), image_opts, flags, 1) {
        Ok(n) => n,
        Err(code) => return code,
    };
    // The checks and their order are qemu-img's.
    let cur = node.length();
    let total = match rel {
        0 => n as i128,
        r => cur as i128 + n as i128 * r as i128,
    };
    let code = if total <= 0 || total > i64::MAX as i128 {
        error_report("New image size must be positive");
        1
    } else if total <= cur as i128 && prealloc != Preallocation::Off {
        error_report("Preallocation can only be used for growing images");
        1
    } else if total < cur as i128 && !shrink {
        error_report("Use the --shrink option to perform a shrink operation.");
        warn_report("Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
        1
    } else {
        // As qemu-img, through a user handle that takes resize.
        let resized = ctx.ev.block_on(async {
            let perm = Perm::CONSISTENT_READ.with(Perm::WRITE).with(Perm::RESIZE);
            let blk = Backend::new(&node, "an unnamed block device", perm, Perm::ALL)?;
            // Exact: the image is to be this long (QEMU's img_resize).
            let r = blk.truncate(total as u64, true, prealloc).await;
            blk.close().await?;
            r
        });
        match resized {
            Ok(()) => {
                if !quiet {
                    crate::outln!("Image resized.");
                }
                0
            }
            Err(e) => {
                error_report(e);
                1
            }
        }
    };
    if let Err(e) = ctx.ev.block_on(node.close()) {
        error_report(e);
        return 1;
    }
    code
}
