//! A node's dirty bitmaps as QMP and qemu-img handle them (QEMU:
//! block/monitor/bitmap-qmp-cmds.c): adding and removing bitmaps that may
//! be persistent, that is stored in the image by the format driver, and
//! the loading and storing of those around the node's life.

use super::Node;
use crate::bitmap::DirtyBitmap;
use crate::error::{Error, Result};
use crate::report::error_report;
use std::sync::Arc;

impl Node {
    /// The granularity of a bitmap added without one: the cluster size
    /// within 4 KiB to 64 KiB, else 64 KiB (QEMU:
    /// bdrv_get_default_bitmap_granularity).
    pub fn default_bitmap_granularity(&self) -> u64 {
        match self.driver.cluster_size() {
            Some(c) if c > 0 => c.clamp(4096, 65536),
            _ => 65536,
        }
    }

    /// True when the format can keep bitmaps in the image.
    pub fn supports_persistent_bitmaps(&self) -> bool {
        self.driver.supports_persistent_bitmaps()
    }

    /// block-dirty-bitmap-add: a new bitmap over the whole node, recording
    /// unless `disabled`; a `persistent` one is checked against what the
    /// image can store first and written there on close.
    pub async fn add_bitmap(
        &self,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Result<Arc<DirtyBitmap>> {
        if name.is_empty() {
            return Err(Error::invalid("Bitmap name cannot be empty"));
        }
        let granularity = match granularity {
            Some(g) if g < 512 || !g.is_power_of_two() => {
                return Err(Error::invalid(
                    "Granularity must be power of 2 and at least 512",
                ))
            }
            Some(g) => g,
            None => self.default_bitmap_granularity(),
        };
        if persistent {
            self.driver
                .can_store_new_bitmap(&self.name, name, granularity)
                .await?;
        }
        let b = self
            .bitmaps
            .create(Some(name), granularity, self.length())?;
        if disabled {
            self.bitmaps.set_enabled(&b, false)?;
        }
        b.set_persistent(persistent);
        Ok(b)
    }

    /// block-dirty-bitmap-remove: refused while busy or read-only; a
    /// persistent bitmap leaves the image first.
    pub async fn remove_bitmap(&self, name: &str) -> Result<()> {
        let b = self.detach_bitmap(name).await?;
        self.bitmaps.release(&b);
        Ok(())
    }

    /// The first half of [`Node::remove_bitmap`], for a transaction that
    /// may still put the bitmap back (QEMU: block_dirty_bitmap_remove with
    /// release false): checked, and out of the image, but not yet released.
    pub async fn detach_bitmap(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        let b = self.bitmaps.lookup(name)?;
        b.check(crate::bitmap::Check::Remove)?;
        if b.is_persistent() {
            self.driver.remove_persistent_bitmap(name).await?;
        }
        Ok(b)
    }

    /// Loads the image's persistent bitmaps into the node (at open).
    pub(crate) async fn load_bitmaps(&self) -> Result<()> {
        if !self.is_active() {
            return Ok(());
        }
        self.driver.load_bitmaps(&self.bitmaps).await
    }

    /// Stores the persistent bitmaps in the image; a failure is reported
    /// and the bitmaps are lost, as QEMU's qcow2_inactivate reports it.
    pub(crate) async fn store_bitmaps(&self) {
        if let Err(e) = self.driver.store_bitmaps().await {
            error_report(format!(
                "Lost persistent bitmaps during inactivation of node '{}': {e}",
                self.name
            ));
        }
    }
}
