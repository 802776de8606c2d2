//! `qemu-img measure`: how large a new image of a format would be, for a
//! size (`--size`) or for what an existing image holds, in qemu-img's two
//! outputs.

use super::convert::accumulate_options;
use super::create::{merged_options, opts_of, set_option, SetOpt};
use super::{cvtnum_full, getopt, long, opt, parse_output, Ctx};
use strata_block::options::parse_keyval;
use strata_block::report::error_report;
use strata_block::snapshot::SnapshotSel;
use strata_block::{Measure, Node, OpenFlags};

const OPTS: &[super::Opt] = &[
    opt('h', Some("help"), false),
    opt('f', Some("format"), true),
    opt('O', Some("target-format"), true),
    opt('o', Some("options"), true),
    opt('l', Some("snapshot"), true),
    opt('U', Some("force-share"), false),
    long("object", true),
    long("image-opts", false),
    long("output", true),
    long("size", true),
];

// qemu-img's text, typos and the -s it does not take included.
const HELP: &str = "Usage:
Calculate file size requred for a new image.  Usage:

  qemu-img measure [-f FMT|--image-opts] [-o OPTIONS] [-O OUTPUT_FMT]
       [--output OFMT] [--object OBJDEF] [-l SNAPSHOT_PARAM]
       (--size SIZE | FILENAME)

Arguments:
  -h, --help
     print this help and exit
  -O, --target-format FMT
     desired target/output image format (default raw)
  -s, --size SIZE
     measure file size for given image size
  FILENAME
     measure file size required to convert from FILENAME
  -f, --format
     specify format of FILENAME explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -l, --snapshot SNAPSHOT
     use this snapshot in FILENAME as source
  --output human|json
     output format
  -U, --force-share
     open images in shared mode for concurrent access

";

struct Args {
    fmt: Option<String>,
    out_fmt: String,
    options: Option<String>,
    snapshot: Option<SnapshotSel>,
    force_share: bool,
    image_opts: bool,
    json: bool,
    size: Option<u64>,
    filename: Option<String>,
}

fn parse_args(ctx: &Ctx) -> Result<Args, i32> {
    let p = getopt("measure", &ctx.args, OPTS)?;
    let mut a = Args {
        fmt: None,
        out_fmt: "raw".into(),
        options: None,
        snapshot: None,
        force_share: false,
        image_opts: false,
        json: false,
        size: None,
        filename: None,
    };
    for (i, v) in p.opts {
        let v = v.unwrap_or_default();
        match i {
            0 => {
                crate::out!("{HELP}");
                return Err(0);
            }
            1 => a.fmt = Some(v),
            2 => a.out_fmt = v,
            3 => accumulate_options(&mut a.options, v)?,
            4 => match SnapshotSel::parse(&v) {
                Ok(sel) => a.snapshot = Some(sel),
                Err(msg) => {
                    error_report(msg);
                    error_report(format!("Failed in parsing snapshot param '{v}'"));
                    return Err(1);
                }
            },
            5 => a.force_share = true,
            7 => a.image_opts = true,
            8 => a.json = parse_output("measure", &v)?,
            9 => a.size = Some(cvtnum_full("image size", &v, true, 0, i64::MAX)?),
            _ => {}
        }
    }
    if p.operands.len() > 1 {
        error_report("At most one filename argument is allowed.");
        return Err(1);
    }
    a.filename = p.operands.into_iter().next();
    if a.filename.is_none() && (a.image_opts || a.fmt.is_some() || a.snapshot.is_some()) {
        error_report("--image-opts, -f, and -l require a filename argument.");
        return Err(1);
    }
    match (&a.filename, a.size) {
        (Some(_), Some(_)) => {
            error_report("--size N cannot be used together with a filename.");
            Err(1)
        }
        (None, None) => {
            error_report("Either --size N or one filename must be specified.");
            Err(1)
        }
        _ => Ok(a),
    }
}

pub fn run(ctx: Ctx) -> i32 {
    let a = match parse_args(&ctx) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let input = match &a.filename {
        None => None,
        Some(name) => {
            let flags = OpenFlags {
                read_only: true,
                force_share: a.force_share,
                ..OpenFlags::default()
            };
            match ctx.open(name, a.fmt.as_deref(), a.image_opts, flags, 1) {
                Ok(n) => Some(n),
                Err(code) => return code,
            }
        }
    };
    let code = measure(&ctx, &a, input.as_ref());
    if let Some(n) = input {
        let _ = ctx.ev.block_on(n.close());
    }
    code
}

fn measure(ctx: &Ctx, a: &Args, input: Option<&std::sync::Arc<Node>>) -> i32 {
    if let (Some(sel), Some(n)) = (&a.snapshot, input) {
        if let Err(e) = ctx.ev.block_on(sel.load(n)) {
            error_report(format!("Failed to load snapshot: {e}"));
            return 1;
        }
    }
    let fmt = &a.out_fmt;
    let Some(class) = ctx.reg.get(fmt) else {
        error_report(format!("Unknown file format '{fmt}'"));
        return 1;
    };
    if class.create_options().is_empty() {
        error_report(format!(
            "Format driver '{fmt}' does not support image creation"
        ));
        return 1;
    }
    // The format's options and the file protocol's, as qemu-img takes them.
    let specs = merged_options(&*class, ctx.reg.get("file").as_deref());
    let mut set: Vec<SetOpt> = Vec::new();
    if let Some(o) = &a.options {
        let parsed = parse_keyval(o, None)
            .map_err(|e| e.to_string())
            .and_then(|pairs| {
                pairs
                    .iter()
                    .try_for_each(|(k, v)| set_option(&mut set, &specs, k, v))
            });
        if let Err(msg) = parsed {
            error_report(msg);
            error_report(format!("Invalid options for file format '{fmt}'"));
            return 1;
        }
    }
    if let Some(size) = a.size {
        let _ = set_option(&mut set, &specs, "size", &size.to_string());
    }
    match ctx.ev.block_on(class.measure(opts_of(&set), input)) {
        Ok(m) => {
            print(&m, a.json);
            0
        }
        Err(e) => {
            error_report(e);
            1
        }
    }
}

fn print(m: &Measure, json: bool) {
    if json {
        // qemu-img's order (its dictionary's), bitmaps first.
        crate::outln!("{{");
        if let Some(b) = m.bitmaps {
            crate::outln!("    \"bitmaps\": {b},");
        }
        crate::outln!("    \"required\": {},", m.required);
        crate::outln!("    \"fully-allocated\": {}", m.fully_allocated);
        crate::outln!("}}");
    } else {
        crate::outln!("required size: {}", m.required);
        crate::outln!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            crate::outln!("bitmaps size: {b}");
        }
    }
}
