//! `qemu-img info`: what a node is, human or JSON, optionally for the whole
//! backing chain; children (the file node) nested as QEMU nests them.

use super::{getopt, parse_output, usage_error, Ctx};
use super::{long, opt};
use crate::common::{self, size_to_str};
use crate::qjson;
use serde_json::Value;
use strata_block::open::path_combine;
use strata_block::report::error_report;
use strata_block::OpenFlags;

const OPTS: &[super::Opt] = &[
    opt('f', Some("format"), true),
    opt('h', Some("help"), false),
    opt('U', Some("force-share"), false),
    opt('b', Some("backing-chain"), false),
    long("output", true),
    long("image-opts", false),
    long("object", true),
    long("limits", false),
];

/// `YYYY-MM-DD HH:MM:SS` in local time, as the snapshot list shows dates.
fn local_date(secs: u64) -> String {
    let t = secs as libc::time_t;
    // SAFETY: an all-zero tm is valid; localtime_r fills it from `t`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    unsafe { libc::localtime_r(&t, &mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// One line of the snapshot list (QEMU: bdrv_snapshot_dump).
fn snapshot_line(cols: [&str; 6]) -> String {
    // printf's widths count bytes, not characters (tags may be UTF-8).
    let pad = |s: &str, w: usize, left: bool| {
        let fill = " ".repeat(w.saturating_sub(s.len()));
        if left {
            format!("{s}{fill}")
        } else {
            format!("{fill}{s}")
        }
    };
    format!(
        "{} {} {} {} {} {}",
        pad(cols[0], 7, true),
        pad(cols[1], 16, true),
        pad(cols[2], 8, false),
        pad(cols[3], 19, false),
        pad(cols[4], 15, false),
        pad(cols[5], 10, false)
    )
}

/// The human form of a node's info, children indented under it.
pub fn human(info: &Value, out: &mut String, depth: usize, top: bool) {
    human_at(info, out, depth, top, "/");
}

/// [`human`] for the node at `path` (`/`, `/file/`, `/file/test/`): nodes
/// without children below the top are shown as protocols (QEMU:
/// dump_human_image_info).
fn human_at(info: &Value, out: &mut String, depth: usize, top: bool, path: &str) {
    let ind = "    ".repeat(depth);
    let leaf = info
        .get("children")
        .and_then(Value::as_array)
        .is_none_or(|c| c.is_empty());
    let top = top || !leaf;
    let get = |k: &str| info.get(k);
    let s = |k: &str| {
        get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let n = |k: &str| get(k).and_then(Value::as_u64);
    let (l_name, l_fmt, l_size) = if top {
        ("image", "file format", "virtual size")
    } else {
        ("filename", "protocol type", "file length")
    };
    out.push_str(&format!("{ind}{l_name}: {}\n", s("filename")));
    out.push_str(&format!("{ind}{l_fmt}: {}\n", s("format")));
    let vs = n("virtual-size").unwrap_or(0);
    out.push_str(&format!(
        "{ind}{l_size}: {} ({vs} bytes)\n",
        size_to_str(vs)
    ));
    match n("actual-size") {
        Some(a) => out.push_str(&format!("{ind}disk size: {}\n", size_to_str(a))),
        None => out.push_str(&format!("{ind}disk size: unavailable\n")),
    }
    if get("encrypted").and_then(Value::as_bool) == Some(true) {
        out.push_str(&format!("{ind}encrypted: yes\n"));
    }
    if let Some(cs) = n("cluster-size") {
        out.push_str(&format!("{ind}cluster_size: {cs}\n"));
    }
    if get("dirty-flag").and_then(Value::as_bool) == Some(true) {
        out.push_str(&format!("{ind}cleanly shut down: no\n"));
    }
    if let Some(bf) = get("backing-filename").and_then(Value::as_str) {
        let full = s("full-backing-filename");
        if full.is_empty() {
            out.push_str(&format!(
                "{ind}backing file: {bf} (cannot determine actual path)\n"
            ));
        } else if full != bf {
            out.push_str(&format!("{ind}backing file: {bf} (actual path: {full})\n"));
        } else {
            out.push_str(&format!("{ind}backing file: {bf}\n"));
        }
        if let Some(f) = get("backing-filename-format").and_then(Value::as_str) {
            out.push_str(&format!("{ind}backing file format: {f}\n"));
        }
    }
    if let Some(snaps) = get("snapshots").and_then(Value::as_array) {
        snapshot_list(snaps, &ind, out);
    }
    if let Some(data) = get("format-specific").and_then(|f| f.get("data")) {
        if data.as_object().is_some_and(|m| !m.is_empty()) {
            out.push_str(&format!("{ind}Format specific information:\n"));
            dump_dict(data, out, depth + 1);
        }
    }
    if let Some(children) = get("children").and_then(Value::as_array) {
        for c in children {
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            out.push_str(&format!("{ind}Child node '{path}{name}':\n"));
            if let Some(i) = c.get("info") {
                human_at(i, out, depth + 1, false, &format!("{path}{name}/"));
            }
        }
    }
}

/// QEMU's human dump of a dictionary (keys in QDict order, `-` shown as space).
pub fn dump_dict(v: &Value, out: &mut String, depth: usize) {
    let ind = "    ".repeat(depth);
    let Some(m) = v.as_object() else { return };
    for k in qjson::qdict_order(m.keys()) {
        let name = k.replace('-', " ");
        match &m[k] {
            Value::Object(o) if o.is_empty() => {}
            c @ (Value::Object(_) | Value::Array(_)) => {
                out.push_str(&format!("{ind}{name}:\n"));
                dump_composite(c, out, depth + 1);
            }
            scalar => out.push_str(&format!("{ind}{name}: {}\n", scalar_text(scalar))),
        }
    }
}

fn dump_composite(v: &Value, out: &mut String, depth: usize) {
    match v {
        Value::Object(_) => dump_dict(v, out, depth),
        Value::Array(a) => {
            let ind = "    ".repeat(depth);
            for (i, item) in a.iter().enumerate() {
                match item {
                    Value::Object(_) | Value::Array(_) => {
                        out.push_str(&format!("{ind}[{i}]:\n"));
                        dump_composite(item, out, depth + 1);
                    }
                    s => out.push_str(&format!("{ind}[{i}]: {}\n", scalar_text(s))),
                }
            }
        }
        _ => {}
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("info", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let (mut fmt, mut json, mut chain, mut force_share, mut image_opts) =
        (None, false, false, false, false);
    for (i, v) in p.opts {
        match i {
            0 => fmt = v,
            1 => {
                crate::outln!("Usage: {} info [-f FMT | --image-opts] [--backing-chain] [-U] [--output human|json] FILE", common::argv0());
                return 0;
            }
            2 => force_share = true,
            3 => chain = true,
            4 => match parse_output("info", &v.unwrap_or_default()) {
                Ok(j) => json = j,
                Err(code) => return code,
            },
            5 => image_opts = true,
            _ => {}
        }
    }
    if p.operands.len() != 1 {
        return usage_error("info", "Expecting one image file name");
    }
    let name = p.operands[0].clone();
    let flags = OpenFlags {
        read_only: true,
        force_share,
        no_io: true,
        no_backing: true,
        ..OpenFlags::default()
    };
    let mut infos = Vec::new();
    let mut next = Some((name.clone(), fmt.clone(), image_opts));
    let mut seen: Vec<String> = Vec::new();
    while let Some((file, f, io)) = next.take() {
        let canon = std::fs::canonicalize(&file)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| file.clone());
        if seen.contains(&canon) {
            error_report(format!("Backing file '{file}' creates an infinite loop."));
            return 1;
        }
        seen.push(canon);
        let node = match ctx.open(&file, f.as_deref(), io, flags.clone(), 1) {
            Ok(n) => n,
            Err(code) => return code,
        };
        let info = ctx.ev.block_on(strata_block::info::block_graph_info(&node));
        if chain {
            if let Some((bf, bfmt)) = node.driver().backing_file() {
                let full = node
                    .full_backing_filename(&bf)
                    .unwrap_or_else(|_| path_combine(&node.filename(), &bf));
                next = Some((full, bfmt, false));
            }
        }
        let _ = ctx.ev.block_on(node.close());
        infos.push(info);
    }
    if json {
        let v = if chain {
            Value::Array(infos)
        } else {
            infos.remove(0)
        };
        crate::outln!("{}", qjson::to_string(&v));
    } else {
        let mut out = String::new();
        for (i, info) in infos.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            human(info, &mut out, 0, true);
        }
        crate::out!("{out}");
    }
    0
}

/// The snapshot list as `info` and `snapshot -l` print it (QEMU:
/// bdrv_snapshot_dump), each line indented by `ind`.
pub fn snapshot_list(snaps: &[Value], ind: &str, out: &mut String) {
    out.push_str(&format!("{ind}Snapshot list:\n"));
    out.push_str(&format!(
        "{ind}{}\n",
        snapshot_line(["ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"])
    ));
    for sn in snaps {
        let f = |k: &str| sn.get(k).and_then(Value::as_u64).unwrap_or(0);
        let secs = f("vm-clock-sec");
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            f("vm-clock-nsec") / 1_000_000
        );
        let icount = sn
            .get("icount")
            .and_then(Value::as_u64)
            .map_or("--".to_string(), |v| v.to_string());
        let text = |k: &str| {
            sn.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (id, name) = (text("id"), text("name"));
        let line = snapshot_line([
            &id,
            &name,
            &size_to_str(f("vm-state-size")),
            &local_date(f("date-sec")),
            &clock,
            &icount,
        ]);
        out.push_str(&format!("{ind}{line}\n"));
    }
}
