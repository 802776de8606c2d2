//! `qemu-img amend`: change an image's format options in place (qcow2:
//! version, lazy refcounts, size, data file), as qemu-img does.

use super::convert::accumulate_options;
use super::create::{has_help_option, opts_of, print_help, set_option, SetOpt};
use super::{getopt, long, opt, usage_error, Ctx};
use crate::common;
use crate::progress::Progress;
use std::sync::Mutex;
use strata_block::options::parse_keyval;
use strata_block::report::error_report;
use strata_block::{CacheMode, DriverClass, OpenFlags};

const OPTS: &[super::Opt] = &[
    opt('h', Some("help"), false),
    opt('o', None, true),
    opt('f', None, true),
    opt('t', None, true),
    opt('p', None, false),
    opt('q', None, false),
    long("object", true),
    long("image-opts", false),
    long("force", false),
    // Strata's own, as convert's: `--progress=json` for pipelines.
    long("progress", true),
];

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("amend", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let (mut options, mut fmt, mut cache) = (None, None, None);
    let (mut progress, mut quiet, mut image_opts, mut force) = (false, false, false, false);
    let mut json = false;
    for (i, v) in p.opts {
        match i {
            0 => {
                crate::outln!("Usage: {} amend [--object OBJDEF] [--image-opts] [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTIONS FILENAME", common::argv0());
                return 0;
            }
            1 => {
                if let Err(code) = accumulate_options(&mut options, v.unwrap_or_default()) {
                    return code;
                }
            }
            2 => fmt = v,
            3 => cache = v,
            4 => progress = true,
            5 => quiet = true,
            7 => image_opts = true,
            8 => force = true,
            9 => {
                progress = true;
                match crate::progress::parse_format(v.as_deref().unwrap_or("")) {
                    Ok(j) => json = j,
                    Err(code) => return code,
                }
            }
            _ => {}
        }
    }
    let Some(options) = options else {
        return usage_error("amend", "Must specify options (-o)");
    };
    if quiet {
        progress = false;
    }
    let progress = Mutex::new(Progress::for_flags(progress, json, 1.0));
    let code = amend(
        &ctx,
        &p.operands,
        &options,
        fmt.as_deref(),
        cache.as_deref(),
        image_opts,
        force,
        &progress,
    );
    progress.lock().unwrap_or_else(|e| e.into_inner()).end();
    code
}

/// `-o help`: the format's amend options.
fn option_help(ctx: &Ctx, fmt: &str) -> i32 {
    let Some(class) = ctx.reg.get(fmt) else {
        error_report(format!("Unknown file format '{fmt}'"));
        return 1;
    };
    match class.amend_options() {
        Some(specs) => {
            print_help(&format!("Amend options for '{fmt}':"), specs, false);
            0
        }
        None => {
            error_report(format!(
                "Format driver '{fmt}' does not support option amendment"
            ));
            1
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn amend(
    ctx: &Ctx,
    operands: &[String],
    options: &str,
    fmt: Option<&str>,
    cache: Option<&str>,
    image_opts: bool,
    force: bool,
    progress: &Mutex<Progress>,
) -> i32 {
    if let (Some(f), true) = (fmt, has_help_option(options)) {
        return option_help(ctx, f);
    }
    if operands.len() != 1 {
        error_report("Expecting one image file name");
        return 1;
    }
    let cache = cache.unwrap_or("writeback");
    let Ok(cache) = CacheMode::parse(cache) else {
        error_report(format!("Invalid cache option: {cache}"));
        return 1;
    };
    let flags = OpenFlags {
        cache,
        ..OpenFlags::default()
    };
    let Ok(node) = ctx.open(&operands[0], fmt, image_opts, flags, 1) else {
        return 1;
    };
    let image = node.skip_filters();
    let fmt = image.format_name();
    let ok = ctx.ev.block_on(async {
        let ok = if has_help_option(options) {
            option_help(ctx, fmt) == 0
        } else {
            match ctx.reg.get(fmt) {
                Some(class) => amend_node(&*class, &image, options, force, progress).await,
                None => false,
            }
        };
        let closed = node.close().await;
        if let Err(e) = &closed {
            error_report(e.to_string());
        }
        ok && closed.is_ok()
    });
    if ok {
        0
    } else {
        1
    }
}

async fn amend_node(
    class: &dyn DriverClass,
    image: &std::sync::Arc<strata_block::Node>,
    options: &str,
    force: bool,
    progress: &Mutex<Progress>,
) -> bool {
    let fmt = class.name();
    let Some(specs) = class.amend_options() else {
        error_report(format!(
            "Format driver '{fmt}' does not support option amendment"
        ));
        return false;
    };
    let mut set: Vec<SetOpt> = Vec::new();
    let parsed = parse_keyval(options, None)
        .map_err(|e| e.to_string())
        .and_then(|pairs| {
            pairs
                .iter()
                .try_for_each(|(k, v)| set_option(&mut set, specs, k, v))
                .map(|_| pairs)
        });
    let pairs = match parsed {
        Ok(p) => p,
        Err(msg) => {
            // A creation option gets a hint: amend cannot change it.
            let mut all: Vec<_> = specs.to_vec();
            all.extend(class.create_options().iter().copied());
            let mut scratch = Vec::new();
            let only_create = parse_keyval(options, None).is_ok_and(|pairs| {
                pairs
                    .iter()
                    .all(|(k, v)| set_option(&mut scratch, &all, k, v).is_ok())
            });
            if only_create {
                error_report(format!(
                    "{msg}\nThis option is only supported for image creation"
                ));
            } else {
                error_report(msg);
            }
            return false;
        }
    };
    drop(pairs);
    let status = |done: u64, total: u64| {
        if total > 0 {
            progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .report(done, total);
        }
    };
    status(0, 1);
    let r = image.amend(opts_of(&set), force, &status).await;
    match r {
        Ok(()) => {
            status(1, 1);
            true
        }
        Err(e) => {
            error_report(e.to_string());
            false
        }
    }
}
