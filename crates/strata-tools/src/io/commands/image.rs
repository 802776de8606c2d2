//! Commands about the image as a whole: `length`, `info`, `truncate`, `flush`.

use super::Ctx;
use crate::common::cvtstr;
use crate::getopt::Item;
use crate::io::numbers::{cvtnum, print_cvtnum_err};
use crate::qjson::human_dump;
use crate::{out, outln};
use serde_json::Value;
use strata_block::report::error_report;
use strata_block::{Node, Preallocation};

/// `length`.
pub fn length(ctx: &mut Ctx<'_>) -> i32 {
    match ctx.node() {
        Ok(node) => {
            outln!("{}", cvtstr(node.length() as f64));
            0
        }
        Err(e) => e,
    }
}

/// `flush`; a failure is only the exit code, as in QEMU.
pub async fn flush(ctx: &mut Ctx<'_>) -> i32 {
    let blk = match ctx.blk() {
        Ok(b) => b,
        Err(e) => return e,
    };
    match blk.flush().await {
        Ok(()) => 0,
        Err(e) => -e.code(),
    }
}

/// `truncate [-m prealloc_mode] off`.
pub async fn truncate(ctx: &mut Ctx<'_>) -> i32 {
    let parsed = ctx.getopt("m:");
    let mut prealloc = Preallocation::Off;
    for item in &parsed.items {
        match item {
            Item::Opt('m', Some(mode)) => match mode.as_str() {
                "off" => prealloc = Preallocation::Off,
                "metadata" => prealloc = Preallocation::Metadata,
                "falloc" => prealloc = Preallocation::Falloc,
                "full" => prealloc = Preallocation::Full,
                _ => {
                    error_report(format!("Invalid preallocation mode '{mode}'"));
                    return -libc::EINVAL;
                }
            },
            Item::Opt(_, _) => {}
            Item::Bad(_) => return ctx.bad_option(item),
        }
    }
    let size = match parsed.operands.first().map(|a| cvtnum(a)) {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            print_cvtnum_err(e, &permuted_argv1(ctx.argv, &parsed.operands));
            return e.errno();
        }
        None => {
            let e = crate::io::numbers::NumError::Invalid;
            print_cvtnum_err(e, &permuted_argv1(ctx.argv, &parsed.operands));
            return e.errno();
        }
    };
    let blk = match ctx.blk() {
        Ok(b) => b,
        Err(e) => return e,
    };
    // Not exact, as qemu-io's truncate.
    match blk.truncate(size as u64, false, prealloc).await {
        Ok(()) => 0,
        Err(e) => {
            error_report(&e);
            -e.code()
        }
    }
}

/// QEMU names `argv[1]` in truncate's parse error, after glibc has moved
/// the options in front of the operands: the first option if there is one.
fn permuted_argv1(argv: &[String], operands: &[String]) -> String {
    argv[1..]
        .iter()
        .find(|a| a.len() > 1 && a.starts_with('-'))
        .or(operands.first())
        .cloned()
        .unwrap_or_default()
}

/// Where a qcow2 image keeps VM state: just after the guest range the L1
/// table can map, rounded to what one L1 entry covers (QEMU: qcow2_vm_state_offset).
fn qcow2_vm_state_offset(node: &Node, cluster_size: u64, extended_l2: bool) -> u64 {
    let entry = if extended_l2 { 16 } else { 8 };
    let per_l1 = cluster_size.saturating_mul(cluster_size / entry).max(1);
    node.length().div_ceil(per_l1).saturating_mul(per_l1)
}

/// `info`: format, cluster size, VM state offset, format-specific facts.
pub fn info(ctx: &mut Ctx<'_>) -> i32 {
    let node = match ctx.node() {
        Ok(n) => n,
        Err(e) => return e,
    };
    let format = node.format_name();
    outln!("format name: {format}");
    let is_protocol = ctx
        .session
        .registry
        .get(format)
        .is_some_and(|c| c.is_protocol());
    if is_protocol {
        // QEMU prints the protocol name as well, which for protocols is the same.
        outln!("format name: {format}");
    }
    let driver = node.driver();
    if !driver.has_info() {
        // QEMU's bdrv_get_info fails quietly for drivers without one.
        return -libc::ENOTSUP;
    }
    let specific = driver.format_specific();
    let data = specific.as_ref().and_then(|s| s.get("data"));
    let cluster_size = driver.cluster_size().unwrap_or(0);
    let vm_state = if format == "qcow2" && cluster_size > 0 {
        let ext_l2 = data
            .and_then(|d| d.get("extended-l2"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        qcow2_vm_state_offset(&node, cluster_size, ext_l2)
    } else {
        0
    };
    outln!("cluster size: {}", cvtstr(cluster_size as f64));
    outln!("vm state offset: {}", cvtstr(vm_state as f64));
    if let Some(d) = data.filter(|d| !is_empty_dump(d)) {
        out!("Format specific information:\n{}", human_dump(d, 1));
    }
    0
}

/// True when dumping `v` prints nothing (an empty dict or list).
fn is_empty_dump(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}
