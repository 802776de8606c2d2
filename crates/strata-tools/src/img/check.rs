//! `qemu-img check`: the driver's consistency check, its report in
//! qemu-img's words and exit codes (0 clean, 1 failed, 2 corrupt, 3 leaks,
//! 63 unsupported).

use super::{getopt, parse_output, usage_error, Ctx};
use super::{long, opt};
use crate::common;
use crate::qjson;
use serde_json::{Map, Value};
use strata_block::report::error_report;
use strata_block::{CheckResult, OpenFlags, RepairMode};

const OPTS: &[super::Opt] = &[
    opt('f', Some("format"), true),
    opt('h', Some("help"), false),
    opt('r', Some("repair"), true),
    opt('q', Some("quiet"), false),
    opt('U', Some("force-share"), false),
    opt('T', Some("cache"), true),
    long("output", true),
    long("image-opts", false),
    long("object", true),
];

fn human(r: &CheckResult, repaired: Option<&CheckResult>) -> String {
    let mut s = String::new();
    if let Some(fixed) = repaired {
        if fixed.leaks_fixed > 0 || fixed.corruptions_fixed > 0 {
            s.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                fixed.leaks_fixed, fixed.corruptions_fixed
            ));
        }
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!("\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", r.corruptions));
        }
        if r.leaks > 0 {
            s.push_str(&format!("\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", r.leaks));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        ));
    }
    if r.image_end_offset > 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

fn json(r: &CheckResult, fixed: &CheckResult, filename: &str, format: &str) -> String {
    let mut m = Map::new();
    m.insert("filename".into(), filename.into());
    m.insert("format".into(), format.into());
    m.insert("check-errors".into(), r.check_errors.into());
    let mut opt = |k: &str, v: u64| {
        if v != 0 {
            m.insert(k.into(), v.into());
        }
    };
    opt("image-end-offset", r.image_end_offset);
    opt("corruptions", r.corruptions);
    opt("leaks", r.leaks);
    opt("corruptions-fixed", fixed.corruptions_fixed);
    opt("leaks-fixed", fixed.leaks_fixed);
    opt("total-clusters", r.total_clusters);
    opt("allocated-clusters", r.allocated_clusters);
    opt("fragmented-clusters", r.fragmented_clusters);
    opt("compressed-clusters", r.compressed_clusters);
    qjson::to_string(&Value::Object(m))
}

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("check", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let (mut fmt, mut out_json, mut quiet, mut force_share, mut image_opts) =
        (None, false, false, false, false);
    let mut repair = RepairMode::default();
    let mut cache = None;
    for (i, v) in p.opts {
        let v = v.unwrap_or_default();
        match i {
            0 => fmt = Some(v),
            1 => {
                crate::outln!("Usage: {} check [-f FMT | --image-opts] [-r leaks|all] [-q] [-U] [--output human|json] FILE", common::argv0());
                return 0;
            }
            2 => match v.as_str() {
                "leaks" => {
                    repair = RepairMode {
                        leaks: true,
                        errors: false,
                    }
                }
                "all" => {
                    repair = RepairMode {
                        leaks: true,
                        errors: true,
                    }
                }
                _ => {
                    return usage_error(
                        "check",
                        format!("--repair (-r) expects 'leaks' or 'all' not '{v}'"),
                    )
                }
            },
            3 => quiet = true,
            4 => force_share = true,
            5 => cache = Some(v),
            6 => match parse_output("check", &v) {
                Ok(j) => out_json = j,
                Err(code) => return code,
            },
            7 => image_opts = true,
            _ => {}
        }
    }
    if p.operands.len() != 1 {
        return usage_error("check", "Expecting one image file name");
    }
    let name = &p.operands[0];
    let fixing = repair.leaks || repair.errors;
    let mut flags = OpenFlags {
        read_only: !fixing,
        force_share,
        resize: fixing,
        no_backing: true,
        check: true,
        ..OpenFlags::default()
    };
    if let Some(c) = cache {
        match strata_block::CacheMode::parse(&c) {
            Ok(m) => flags.cache = m,
            Err(_) => {
                error_report(format!("Invalid source cache option: {c}"));
                return 1;
            }
        }
    }
    let node = match ctx.open(name, fmt.as_deref(), image_opts, flags, 1) {
        Ok(n) => n,
        Err(code) => return code,
    };
    let format = node.format_name();
    let first = ctx.ev.block_on(node.driver().check(repair));
    let (result, fixed) = match first {
        Err(e) if e.code() == libc::ENOTSUP => {
            let _ = ctx.ev.block_on(node.close());
            error_report("This image format does not support checks");
            return 63;
        }
        Err(e) => {
            let _ = ctx.ev.block_on(node.close());
            error_report(format!(
                "Check failed: {}",
                strata_block::error::strerror(e.code())
            ));
            return 1;
        }
        Ok(r) if fixing && (r.leaks_fixed > 0 || r.corruptions_fixed > 0) => {
            // Check again what the repair left, as qemu-img does.
            match ctx.ev.block_on(node.driver().check(RepairMode::default())) {
                Ok(again) => (again, r),
                Err(e) => {
                    error_report(format!(
                        "Check failed: {}",
                        strata_block::error::strerror(e.code())
                    ));
                    return 1;
                }
            }
        }
        Ok(r) => (r.clone(), r),
    };
    let _ = ctx.ev.block_on(node.close());
    if !quiet {
        if out_json {
            crate::outln!("{}", json(&result, &fixed, name, format));
        } else {
            crate::out!("{}", human(&result, Some(&fixed)));
        }
    }
    if result.check_errors > 0 {
        1
    } else if result.corruptions > 0 {
        2
    } else if result.leaks > 0 {
        3
    } else {
        0
    }
}
