//! `qemu-img map`: the image's extents and where their data lives, merged
//! as qemu-img merges them.

use super::{getopt, parse_output, usage_error, Ctx};
use super::{long, opt};
use crate::common;
use std::sync::Arc;
use strata_block::options::parse_size;
use strata_block::report::error_report;
use strata_block::{Node, OpenFlags, Result};

const OPTS: &[super::Opt] = &[
    opt('f', Some("format"), true),
    opt('h', Some("help"), false),
    opt('U', Some("force-share"), false),
    long("output", true),
    opt('s', Some("start-offset"), true),
    opt('l', Some("max-length"), true),
    long("image-opts", false),
    long("object", true),
];

/// One extent as qemu-img map describes it.
#[derive(Clone, Debug, Default)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: usize,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
    filename: Option<String>,
}

/// The first layer down the chain that says data or zero decides (QEMU's
/// get_block_status of qemu-img.c).
async fn get_block_status(top: &Arc<Node>, offset: u64, len: u64) -> Result<MapEntry> {
    let mut node = Arc::clone(top);
    let mut depth = 0;
    let mut len = len;
    let st = loop {
        node = node.skip_filters();
        let st = node.block_status(offset, len).await?;
        len = st.len;
        if st.data || st.zero {
            break st;
        }
        match node.backing() {
            Some(b) => {
                node = b;
                depth += 1;
            }
            None => break st,
        }
    };
    // Where no layer says data or zero, QEMU reports nothing (ret = 0).
    let offset_valid = st.host.is_some() && !st.compressed && (st.data || st.zero);
    Ok(MapEntry {
        start: offset,
        length: st.len,
        depth,
        present: st.allocated,
        zero: st.zero,
        data: st.data,
        compressed: st.compressed,
        offset: if offset_valid {
            st.host.as_ref().map(|h| h.1)
        } else {
            None
        },
        filename: if offset_valid {
            st.host.as_ref().map(|h| h.0.filename().to_string())
        } else {
            None
        },
    })
}

fn mergeable(a: &MapEntry, b: &MapEntry) -> bool {
    a.length != 0
        && a.zero == b.zero
        && a.data == b.data
        && a.compressed == b.compressed
        && a.depth == b.depth
        && a.present == b.present
        && a.filename == b.filename
        && a.offset.is_some() == b.offset.is_some()
        && a.offset.is_none_or(|o| Some(o + a.length) == b.offset)
}

/// Prints one entry; in human form returns false for data it cannot show.
fn dump(json: bool, e: &MapEntry, next: Option<&mut MapEntry>) -> bool {
    if json {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        );
        if let Some(o) = e.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        if next.is_some() {
            s.push_str(",\n");
        }
        crate::out!("{s}");
        return true;
    }
    if e.data && e.offset.is_none() {
        error_report("File contains external, encrypted or compressed clusters.");
        return false;
    }
    if e.data && !e.zero {
        crate::outln!(
            "{:<16}{:<16}{:<16}{}",
            hex(e.start),
            hex(e.length),
            hex(e.offset.unwrap_or(0)),
            e.filename.as_deref().unwrap_or("")
        );
    }
    // Human output does not tell zero from unallocated: merge them.
    if let Some(n) = next {
        if !n.data || n.zero {
            n.data = false;
            n.zero = true;
        }
    }
    true
}

use strata_block::report::c_hex as hex;

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("map", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let (mut fmt, mut json, mut force_share, mut image_opts) = (None, false, false, false);
    let (mut start, mut max_len) = (0u64, None::<u64>);
    for (i, v) in p.opts {
        let v = v.unwrap_or_default();
        match i {
            0 => fmt = Some(v),
            1 => {
                crate::outln!("Usage: {} map [-f FMT | --image-opts] [--output human|json] [-s OFFSET] [-l LENGTH] [-U] FILE", common::argv0());
                return 0;
            }
            2 => force_share = true,
            3 => match parse_output("map", &v) {
                Ok(j) => json = j,
                Err(code) => return code,
            },
            4 => match parse_size(&v, 1) {
                Ok(n) => start = n,
                Err(_) => {
                    error_report("Invalid start offset specified! You may use k, M, G, T, P or E suffixes for ");
                    return 1;
                }
            },
            5 => {
                match parse_size(&v, 1) {
                    Ok(n) => max_len = Some(n),
                    Err(_) => {
                        error_report("Invalid length specified! You may use k, M, G, T, P or E suffixes for ");
                        return 1;
                    }
                }
            }
            6 => image_opts = true,
            _ => {}
        }
    }
    if p.operands.len() != 1 {
        return usage_error("map", "Expecting one image file name");
    }
    let name = &p.operands[0];
    let flags = OpenFlags {
        read_only: true,
        force_share,
        ..OpenFlags::default()
    };
    let node = match ctx.open(name, fmt.as_deref(), image_opts, flags, 1) {
        Ok(n) => n,
        Err(code) => return code,
    };
    let ok = ctx.ev.block_on(async {
        if json {
            crate::out!("[");
        } else {
            crate::outln!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        }
        let mut length = node.length();
        if let Some(m) = max_len {
            length = length.min(start.saturating_add(m));
        }
        let mut curr = MapEntry {
            start,
            ..MapEntry::default()
        };
        while curr.start + curr.length < length {
            let off = curr.start + curr.length;
            let mut next = match get_block_status(&node, off, length - off).await {
                Ok(e) => e,
                Err(e) => {
                    error_report(format!(
                        "Could not read file metadata: {}",
                        strata_block::error::strerror(e.code())
                    ));
                    return false;
                }
            };
            if mergeable(&curr, &next) {
                curr.length += next.length;
                continue;
            }
            if curr.length > 0 && !dump(json, &curr, Some(&mut next)) {
                return false;
            }
            curr = next;
        }
        let ok = dump(json, &curr, None);
        if json {
            crate::outln!("]");
        }
        ok
    });
    let _ = ctx.ev.block_on(node.close());
    if ok {
        0
    } else {
        1
    }
}
