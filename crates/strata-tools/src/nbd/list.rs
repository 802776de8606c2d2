//! `qemu-nbd -L`: another server's exports, printed as qemu-nbd prints them.

use super::args::Args;
use strata_block::report::error_report;
use strata_nbd::client::{list_exports, Listed};
use strata_nbd::proto::FLAG_HAS_FLAGS;

/// The names qemu-nbd gives the transmission flags, by bit.
const FLAG_NAMES: [Option<&str>; 13] = [
    None,
    Some("readonly"),
    Some("flush"),
    Some("fua"),
    Some("rotational"),
    Some("trim"),
    Some("zeroes"),
    Some("df"),
    Some("multi"),
    Some("resize"),
    Some("cache"),
    Some("fast-zero"),
    Some("block-status-payload"),
];

/// Lists the exports of the server `a` names; returns the exit code.
pub async fn run(a: &Args) -> i32 {
    match list_exports(&super::address(a)).await {
        Ok(list) => {
            crate::outln!("{}", render(&list).trim_end_matches('\n'));
            crate::stdout::flush();
            0
        }
        Err(e) => {
            error_report(e.message().map_or_else(|| e.to_string(), str::to_string));
            1
        }
    }
}

fn render(list: &[Listed]) -> String {
    let mut o = format!("exports available: {}\n", list.len());
    for e in list {
        o += &format!(" export: '{}'\n", e.name);
        if !e.description.is_empty() {
            o += &format!("  description: {}\n", e.description);
        }
        let i = &e.info;
        if i.flags & FLAG_HAS_FLAGS != 0 {
            o += &format!("  size:  {}\n", i.size);
            o += &format!("  flags: 0x{:x} (", i.flags);
            for (bit, name) in FLAG_NAMES.iter().enumerate() {
                if let Some(n) = name.filter(|_| i.flags & (1 << bit) != 0) {
                    o += &format!(" {n}");
                }
            }
            o += " )\n";
        }
        if i.min_block != 0 {
            o += &format!("  min block: {}\n", i.min_block);
            o += &format!("  opt block: {}\n", i.opt_block);
            o += &format!("  max block: {}\n", i.max_block);
        }
        let size = if i.extended { "64-bit" } else { "32-bit" };
        o += &format!("  transaction size: {size}\n");
        if !e.contexts.is_empty() {
            o += &format!("  available meta contexts: {}\n", e.contexts.len());
            for c in &e.contexts {
                o += &format!("   {c}\n");
            }
        }
    }
    o
}
