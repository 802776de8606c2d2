//! `qemu-img dd`: copies an image, or a part of it, into a new one block by
//! block, as dd(1) does, with qemu-img's operands (`if`, `of`, `bs`, `count`,
//! `skip`) and its sizing: `count` limits the input from its start, `skip`
//! then moves the start, and every block is written, zeroes included.

use super::convert::creating_protocol;
use super::create::{merged_options, opts_of, set_option, SetOpt};
use super::{cvtnum_full, getopt, long, opt, Ctx};
use strata_block::report::error_report;
use strata_block::{Backend, IoBuf, OpenCtx, OpenFlags, Perm, WriteFlags};

/// How qemu-img's BlockBackends name themselves in permission errors.
const DEVICE: &str = "an unnamed block device";

const OPTS: &[super::Opt] = &[
    opt('h', Some("help"), false),
    opt('f', Some("format"), true),
    opt('O', Some("output-format"), true),
    opt('U', Some("force-share"), false),
    long("object", true),
    long("image-opts", false),
];

const HELP: &str = "Usage:
Copy input to output with optional format conversion.  Usage:

  qemu-img dd [-f FMT|--image-opts] [-O OUTPUT_FMT] [-U]
        [bs=BLOCK_SIZE] [count=BLOCKS] if=INPUT of=OUTPUT

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify format for INPUT explicitly
  --image-opts
     indicates that INPUT is a complete image specification
     instead of a file name (incompatible with --format)
  -O, --output-format OUTPUT_FMT
     format of the OUTPUT (default raw)
  -U, --force-share
     open images in shared mode for concurrent access
  bs=BLOCK_SIZE[kKMGTP]
     size of I/O block (default 512)
  count=COUNT
     number of blocks to convert (default whole INPUT)
  if=INPUT
     input file name (or image specification with --image-opts)
  of=OUTPUT
     output file name to create

";

/// The operands, as qemu-img's DdIo/DdInfo hold them.
struct Operands {
    input: Option<String>,
    output: Option<String>,
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
}

/// Parses `key=value` operands in order; the first bad one ends it.
fn parse_operands(args: &[String]) -> Result<Operands, i32> {
    let mut o = Operands {
        input: None,
        output: None,
        bs: 512,
        count: None,
        skip: None,
    };
    for a in args {
        let Some((key, value)) = a.split_once('=') else {
            error_report(format!("unrecognized operand {a}"));
            return Err(1);
        };
        match key {
            "bs" => o.bs = cvtnum_full("bs", value, true, 1, i32::MAX as i64)?,
            "count" => o.count = Some(cvtnum_full("count", value, false, 0, i64::MAX)?),
            "if" => o.input = Some(value.to_string()),
            "of" => o.output = Some(value.to_string()),
            "skip" => o.skip = Some(cvtnum_full("skip", value, false, 0, i64::MAX)?),
            _ => {
                error_report(format!("unrecognized operand {key}"));
                return Err(1);
            }
        }
    }
    Ok(o)
}

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("dd", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let (mut fmt, mut out_fmt, mut force_share, mut image_opts) =
        (None, "raw".to_string(), false, false);
    for (i, v) in p.opts {
        match i {
            0 => {
                crate::out!("{HELP}");
                return 0;
            }
            1 => fmt = v,
            2 => out_fmt = v.unwrap_or_default(),
            3 => force_share = true,
            5 => image_opts = true,
            _ => {}
        }
    }
    let o = match parse_operands(&p.operands) {
        Ok(o) => o,
        Err(code) => return code,
    };
    let (Some(input), Some(output)) = (o.input.as_deref(), o.output.as_deref()) else {
        error_report("Must specify both input and output files");
        return 1;
    };
    let flags = OpenFlags {
        read_only: true,
        force_share,
        ..OpenFlags::default()
    };
    let Ok(src) = ctx.open(input, fmt.as_deref(), image_opts, flags, 1) else {
        return 1;
    };
    let code = dd(&ctx, &o, &src, input, output, &out_fmt);
    let _ = ctx.ev.block_on(src.close());
    code
}

/// Creates the output at its size and copies the blocks.
fn dd(
    ctx: &Ctx,
    o: &Operands,
    src: &std::sync::Arc<strata_block::Node>,
    input: &str,
    output: &str,
    out_fmt: &str,
) -> i32 {
    let Some(class) = ctx.reg.get(out_fmt) else {
        error_report("Unknown file format");
        return 1;
    };
    let proto = match creating_protocol(ctx, &*class, output) {
        Ok(p) => p,
        Err(msg) => {
            error_report(msg);
            return 1;
        }
    };
    let mut size = src.length();
    let bs = o.bs;
    // qemu-img's order: count limits the input from its start, then skip.
    if let Some(count) = o.count {
        if count.checked_mul(bs).is_some_and(|c| c < size) {
            size = count * bs;
        }
    }
    let start = o.skip.map(|s| s.checked_mul(bs).filter(|&b| b <= size));
    let out_size = match start {
        Some(None) => 0,
        Some(Some(b)) => size - b,
        None => size,
    };
    let specs = merged_options(&*class, Some(&*proto));
    let mut set: Vec<SetOpt> = Vec::new();
    let _ = set_option(&mut set, &specs, "size", &out_size.to_string());
    let opts = opts_of(&set);
    let octx = OpenCtx::new(std::sync::Arc::clone(&ctx.reg), OpenFlags::default());
    if let Err(e) = ctx.ev.block_on(class.create(&octx, output, opts)) {
        error_report(format!("{output}: error while creating output image: {e}"));
        return 1;
    }
    let Ok(target) = ctx.open(output, Some(out_fmt), false, OpenFlags::default(), 1) else {
        return 1;
    };
    let mut pos = match start {
        Some(None) => {
            // As dd(1): a warning and an empty output, not a failure.
            error_report(format!("{input}: cannot skip to specified offset"));
            size
        }
        Some(Some(b)) => b,
        None => 0,
    };
    let code = ctx.ev.block_on(async {
        let (r, w) = match (
            Backend::new(src, DEVICE, Perm::CONSISTENT_READ, Perm::ALL),
            Backend::new(
                &target,
                DEVICE,
                Perm::CONSISTENT_READ.with(Perm::WRITE),
                Perm::ALL,
            ),
        ) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                error_report(e);
                return 1;
            }
        };
        let mut out_pos = 0;
        while pos < size {
            let n = bs.min(size - pos);
            let buf = match r.read(pos, IoBuf::zeroed(n as usize)).await {
                Ok(b) => b,
                Err(e) => {
                    error_report(format!(
                        "error while reading from input image file: {}",
                        strata_block::error::strerror(e.code())
                    ));
                    return 1;
                }
            };
            pos += n;
            if let Err(e) = w.write(out_pos, buf, WriteFlags::default()).await {
                error_report(format!(
                    "error while writing to output image file: {}",
                    strata_block::error::strerror(e.code())
                ));
                return 1;
            }
            out_pos += n;
        }
        let _ = (r.close().await, w.close().await);
        0
    });
    let _ = ctx.ev.block_on(target.close());
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(v: &[&str]) -> Result<Operands, i32> {
        parse_operands(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operands_take_sizes_where_qemu_img_does() {
        let o = ops(&["bs=64k", "count=3", "skip=2", "if=a", "of=b"]).unwrap();
        assert_eq!((o.bs, o.count, o.skip), (65536, Some(3), Some(2)));
        assert_eq!(
            (o.input.as_deref(), o.output.as_deref()),
            (Some("a"), Some("b"))
        );
        // count and skip are plain numbers; bs is at least 1.
        assert!(ops(&["count=1k"]).is_err());
        assert!(ops(&["skip=1k"]).is_err());
        assert!(ops(&["bs=0"]).is_err());
        assert!(ops(&["junk"]).is_err());
        assert!(ops(&["foo=1"]).is_err());
    }
}
