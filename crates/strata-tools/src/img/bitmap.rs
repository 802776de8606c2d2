//! `qemu-img bitmap`: add, remove, clear, enable, disable and merge the
//! persistent dirty bitmaps of an image, in command-line order, as the
//! QMP commands of the same names do on a running node.

use super::{cvtnum_full, getopt, long, opt, Ctx};
use crate::common;
use std::sync::Arc;
use strata_block::report::error_report;
use strata_block::{Node, OpenFlags, Result};

const OPTS: &[super::Opt] = &[
    opt('h', Some("help"), false),
    long("object", true),
    long("image-opts", false),
    long("add", false),
    long("remove", false),
    long("clear", false),
    long("enable", false),
    long("disable", false),
    long("merge", true),
    opt('g', Some("granularity"), true),
    opt('b', Some("source-file"), true),
    opt('f', None, true),
    opt('F', Some("source-format"), true),
];

/// One action, applied in the order given.
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    /// Merge the named bitmap (of the source file, or of the image).
    Merge(String),
}

impl Action {
    fn verb(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("bitmap", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut actions = Vec::new();
    let (mut image_opts, mut fmt, mut src_fmt, mut src_file) = (false, None, None, None);
    let mut granularity = 0;
    for (i, v) in p.opts {
        match i {
            0 => {
                crate::outln!(
                    "Usage: {} bitmap [--object OBJDEF] [--image-opts] [-f FMT] {{--add [-g SIZE] | --remove | --clear | --enable | --disable | --merge SOURCE [-b SRC_FILE [-F SRC_FMT]]}}... FILE BITMAP",
                    common::argv0()
                );
                return 0;
            }
            2 => image_opts = true,
            3 => actions.push(Action::Add),
            4 => actions.push(Action::Remove),
            5 => actions.push(Action::Clear),
            6 => actions.push(Action::Enable),
            7 => actions.push(Action::Disable),
            8 => actions.push(Action::Merge(v.unwrap_or_default())),
            9 => {
                granularity =
                    match cvtnum_full("granularity", v.as_deref().unwrap_or(""), true, 0, i64::MAX)
                    {
                        Ok(g) => g,
                        Err(code) => return code,
                    }
            }
            10 => src_file = v,
            11 => fmt = v,
            12 => src_fmt = v,
            _ => {}
        }
    }
    // qemu-img's checks, in its order; each exits 1.
    let add = actions.iter().any(|a| matches!(a, Action::Add));
    let merge = actions.iter().any(|a| matches!(a, Action::Merge(_)));
    let refusal = if actions.is_empty() {
        Some("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    } else if granularity != 0 && !add {
        Some("granularity only supported with --add")
    } else if src_fmt.is_some() && src_file.is_none() {
        Some("-F only supported with -b")
    } else if src_file.is_some() && !merge {
        Some("Merge bitmap source file only supported with --merge")
    } else if p.operands.len() != 2 {
        Some("Expecting filename and bitmap name")
    } else {
        None
    };
    if let Some(msg) = refusal {
        error_report(msg);
        return 1;
    }
    let (filename, bitmap) = (&p.operands[0], &p.operands[1]);
    // The image's contents do not matter: no backing chain is opened.
    let flags = OpenFlags {
        no_backing: true,
        ..OpenFlags::default()
    };
    let Ok(node) = ctx.open(filename, fmt.as_deref(), image_opts, flags.clone(), 1) else {
        return 1;
    };
    let src = match &src_file {
        Some(f) => {
            let ro = OpenFlags {
                read_only: true,
                ..flags
            };
            match ctx.open(f, src_fmt.as_deref(), false, ro, 1) {
                Ok(n) => Some(n),
                Err(_) => {
                    ctx.ev.block_on(async { node.close().await.ok() });
                    return 1;
                }
            }
        }
        None => None,
    };
    // QMP's granularity is a uint32: qemu-img passes its number cut to it.
    let granularity = (granularity != 0).then_some(granularity as u32 as u64);
    ctx.ev.block_on(async {
        let mut code = 0;
        for a in &actions {
            let source = src.as_ref().unwrap_or(&node);
            if let Err(e) = apply(&node, source, bitmap, a, granularity).await {
                error_report(format!(
                    "Operation {} on bitmap {bitmap} failed: {e}",
                    a.verb()
                ));
                code = 1;
                break;
            }
        }
        if let Some(s) = src {
            let _ = s.close().await;
        }
        if let Err(e) = node.close().await {
            error_report(format!("Error while closing the image: {e}"));
            code = 1;
        }
        code
    })
}

/// One action on bitmap `name` of `node`, as the QMP command does it.
async fn apply(
    node: &Arc<Node>,
    source: &Arc<Node>,
    name: &str,
    action: &Action,
    granularity: Option<u64>,
) -> Result<()> {
    let bms = node.bitmaps();
    match action {
        Action::Add => node
            .add_bitmap(name, granularity, true, false)
            .await
            .map(drop),
        Action::Remove => node.remove_bitmap(name).await,
        Action::Clear => bms.clear(&*bms.lookup(name)?),
        Action::Enable => bms.set_enabled(&*bms.lookup(name)?, true),
        Action::Disable => bms.set_enabled(&*bms.lookup(name)?, false),
        Action::Merge(from) => {
            let target = bms.lookup(name)?;
            let src = source.bitmaps().lookup(from)?;
            bms.merge(&target, &[src])
        }
    }
}
