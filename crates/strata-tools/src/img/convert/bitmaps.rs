//! `convert --bitmaps`: the source's persistent bitmaps copied into the
//! target (qemu-img's convert_check_bitmaps and convert_copy_bitmaps).

use std::sync::Arc;
use strata_block::report::{error_report, warn_report};
use strata_block::Node;

/// Can the bitmaps be copied? Refuses a source without bitmap support, and
/// an inconsistent bitmap unless `skip_broken`.
pub fn check(src: &Arc<Node>, skip_broken: bool) -> bool {
    if !src.supports_persistent_bitmaps() {
        error_report("Source lacks bitmap support");
        return false;
    }
    for b in src.bitmaps().list() {
        if b.is_persistent() && !skip_broken && b.is_inconsistent() {
            error_report(format!(
                "Cannot copy inconsistent bitmap '{}'",
                b.name().unwrap_or_default()
            ));
            strata_block::stderr_line!(
                "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it"
            );
            return false;
        }
    }
    true
}

/// Adds each persistent bitmap of `src` to `dst` (same granularity and
/// state) and merges its bits in; the target stores them when it closes.
pub async fn copy(src: &Arc<Node>, dst: &Arc<Node>, skip_broken: bool) -> bool {
    for b in src.bitmaps().list() {
        if !b.is_persistent() {
            continue;
        }
        let name = b.name().unwrap_or_default();
        if skip_broken && b.is_inconsistent() {
            warn_report(format!("Skipping inconsistent bitmap '{name}'"));
            continue;
        }
        let new = match dst
            .add_bitmap(name, Some(b.granularity()), true, !b.is_enabled())
            .await
        {
            Ok(n) => n,
            Err(e) => {
                error_report(format!("Failed to create bitmap {name}: {e}"));
                return false;
            }
        };
        if let Err(e) = dst.bitmaps().merge(&new, &[Arc::clone(&b)]) {
            error_report(format!("Failed to populate bitmap {name}: {e}"));
            let _ = dst.remove_bitmap(name).await;
            return false;
        }
    }
    true
}
