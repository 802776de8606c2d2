//! qemu-img's subcommands, one file each.

mod amend;
mod bench;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod dd;
mod info;
mod map;
mod measure;
mod rebase;
mod resize;
mod snapshot;

use crate::common;
use std::sync::Arc;
use strata_block::report::error_report;
use strata_block::{EventLoop, Registry};

/// What a subcommand gets: the registry, the event loop and its arguments.
pub struct Ctx {
    pub reg: Arc<Registry>,
    pub ev: EventLoop,
    pub args: Vec<String>,
}

impl Ctx {
    /// Opens an image as qemu-img does; on failure reports
    /// `Could not open 'NAME': reason` and gives `code` to exit with.
    pub fn open(
        &self,
        name: &str,
        format: Option<&str>,
        image_opts: bool,
        flags: strata_block::OpenFlags,
        code: i32,
    ) -> Result<std::sync::Arc<strata_block::Node>, i32> {
        // qemu-img's img_open checks these two before anything is opened.
        if image_opts && format.is_some() {
            error_report("--image-opts and --format are mutually exclusive");
            return Err(code);
        }
        if flags.force_share && !flags.read_only {
            error_report(format!(
                "Could not open '{name}': force-share=on can only be used with read-only images"
            ));
            return Err(code);
        }
        let spec = common::ImageSpec {
            name,
            format,
            image_opts,
        };
        self.ev
            .block_on(common::open(&self.reg, &spec, flags))
            .map_err(|e| {
                error_report(common::open_error(name, &e));
                code
            })
    }

    /// [`Ctx::open`] of a file name with options of the tool's own.
    pub fn open_with(
        &self,
        name: &str,
        format: Option<&str>,
        flags: strata_block::OpenFlags,
        extra: strata_block::options::Opts,
        code: i32,
    ) -> Result<std::sync::Arc<strata_block::Node>, i32> {
        let spec = common::ImageSpec {
            name,
            format,
            image_opts: false,
        };
        self.ev
            .block_on(common::open_with(&self.reg, &spec, flags, extra))
            .map_err(|e| {
                error_report(common::open_error(name, &e));
                code
            })
    }
}

/// `qemu-img <cmd>` as getopt names it in messages (`qemu-img create`).
fn prog_for(cmd: &str) -> String {
    format!("{} {cmd}", common::argv0())
}

/// Prints `Try '<argv0> <cmd> --help' for more info` after a usage error; exit 1.
pub fn try_help(cmd: &str) -> i32 {
    strata_block::stderr_line!("Try '{} {cmd} --help' for more info", common::argv0());
    1
}

/// Reports a usage error `msg` and the hint; exit 1.
pub fn usage_error(cmd: &str, msg: impl std::fmt::Display) -> i32 {
    error_report(msg);
    try_help(cmd)
}

const VERSION: &str = "version 10.0.2 (Strata 0.1.0)";

/// Entry point of `strata-img`; returns the exit code.
pub fn main() -> i32 {
    let code = dispatch();
    crate::stdout::flush();
    code
}

fn dispatch() -> i32 {
    let reg = common::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first().cloned() else {
        error_report("Not enough arguments");
        strata_block::stderr_line!("Try '{} --help' for more info", common::argv0());
        return 1;
    };
    match cmd.as_str() {
        "-h" | "--help" => {
            crate::outln!(
                "usage: {} [standard options] command [command options]",
                strata_block::report::prog_name()
            );
            crate::outln!(
                "Strata's drop-in for qemu-img: create, info, map, check, compare, convert, resize, snapshot, bench."
            );
            return 0;
        }
        "-V" | "--version" => {
            crate::outln!("qemu-img {VERSION}");
            crate::outln!(
                "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers"
            );
            return 0;
        }
        _ => {}
    }
    let ev = match EventLoop::new() {
        Ok(ev) => ev,
        Err(e) => {
            error_report(format!("Could not start the event loop: {e}"));
            return 1;
        }
    };
    let ctx = Ctx {
        reg,
        ev,
        args: args[1..].to_vec(),
    };
    match cmd.as_str() {
        "create" => create::run(ctx),
        "info" => info::run(ctx),
        "map" => map::run(ctx),
        "check" => check::run(ctx),
        "compare" => compare::run(ctx),
        "convert" => convert::run(ctx),
        "resize" => resize::run(ctx),
        "bench" => bench::run(ctx),
        "snapshot" => snapshot::run(ctx),
        "dd" => dd::run(ctx),
        "measure" => measure::run(ctx),
        "rebase" => rebase::run(ctx),
        "commit" => commit::run(ctx),
        "amend" => amend::run(ctx),
        "bitmap" => bitmap::run(ctx),
        other => {
            error_report(format!("Command not found: {other}"));
            strata_block::stderr_line!("Try '{} --help' for more info", common::argv0());
            1
        }
    }
}

/// QEMU's block_driver_can_compress, for the formats Strata has: qcow
/// and qcow2 write compressed clusters.
pub fn qemu_can_compress(fmt: &str) -> bool {
    matches!(fmt, "qcow" | "qcow2")
}

/// One option of a subcommand's table: short letter and/or long name, and
/// whether it takes an argument. Subcommands match results by table index.
#[derive(Clone, Copy, Debug)]
pub struct Opt {
    short: Option<char>,
    long: Option<&'static str>,
    arg: bool,
}

/// An option with a short letter and maybe a long name.
pub const fn opt(short: char, long: Option<&'static str>, arg: bool) -> Opt {
    Opt {
        short: Some(short),
        long,
        arg,
    }
}

/// A long-only option.
pub const fn long(name: &'static str, arg: bool) -> Opt {
    Opt {
        short: None,
        long: Some(name),
        arg,
    }
}

/// A subcommand's options (by table index, with argument) and operands.
pub struct Parsed {
    pub opts: Vec<(usize, Option<String>)>,
    pub operands: Vec<String>,
}

/// Parses a subcommand's arguments with glibc's rules; on a bad option
/// prints glibc's complaint and the hint, and gives the exit code.
pub fn getopt(cmd: &str, args: &[String], table: &[Opt]) -> Result<Parsed, i32> {
    use crate::getopt::{Item, LongOpt};
    // Long-only options report as private-use characters, like getopt's `val`.
    let val = |i: usize, o: &Opt| {
        o.short
            .unwrap_or_else(|| char::from_u32(0xE000 + i as u32).unwrap_or('\0'))
    };
    let mut short = String::new();
    for o in table {
        if let Some(c) = o.short {
            short.push(c);
            if o.arg {
                short.push(':');
            }
        }
    }
    let longs: Vec<LongOpt> = table
        .iter()
        .enumerate()
        .filter_map(|(i, o)| {
            o.long.map(|name| LongOpt {
                name,
                has_arg: o.arg,
                val: val(i, o),
            })
        })
        .collect();
    let parsed = crate::getopt::parse(&prog_for(cmd), args, &short, &longs);
    let mut opts = Vec::new();
    for item in parsed.items {
        match item {
            Item::Opt(c, v) => {
                if let Some(i) = table.iter().enumerate().position(|(i, o)| val(i, o) == c) {
                    // Objects are created in command-line order, as QEMU does.
                    if table[i].long == Some("object") {
                        if let Err(msg) = crate::common::img_object(v.as_deref().unwrap_or("")) {
                            error_report(msg);
                            return Err(1);
                        }
                    }
                    opts.push((i, v));
                }
            }
            Item::Bad(msg) => {
                strata_block::stderr_line!("{msg}");
                return Err(try_help(cmd));
            }
        }
    }
    Ok(Parsed {
        opts,
        operands: parsed.operands,
    })
}

/// qemu-img's cvtnum_full: a size (`issize`: suffixes and fractions, as
/// qemu_strtosz) or a plain integer (qemu_strtou64, base 0) between `min`
/// and `max`; on failure reports QEMU's message and gives exit code 1.
pub fn cvtnum_full(name: &str, value: &str, issize: bool, min: i64, max: i64) -> Result<u64, i32> {
    use crate::io::numbers::{strtosz, strtou64, NumError};
    let r = if issize {
        strtosz(value)
    } else {
        strtou64(value)
    };
    match r {
        Err(NumError::Invalid) => {
            error_report(format!("Invalid {name} specified: '{value}'."));
            Err(1)
        }
        Ok(v) if v >= min as u64 && v <= max as u64 => Ok(v),
        _ => {
            error_report(format!(
                "Invalid {name} specified. Must be between {min} and {max}."
            ));
            Err(1)
        }
    }
}

/// The `--output` value: human or json.
pub fn parse_output(cmd: &str, v: &str) -> Result<bool, i32> {
    match v {
        "json" => Ok(true),
        "human" => Ok(false),
        _ => Err(usage_error(
            cmd,
            format!("--output expects 'human' or 'json' not '{v}'"),
        )),
    }
}
