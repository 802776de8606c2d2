//! Backing chains as qemu-img walks them: the next image down, an image
//! found by the name a user gives, the names an image stores, emptying
//! a layer after a commit; and amending an image's options in place.

use crate::error::{err, Error, Result};
use crate::node::Node;
use std::sync::Arc;

impl Node {
    /// The next image down the backing chain, past any filters (QEMU:
    /// bdrv_backing_chain_next).
    pub fn backing_chain_next(self: &Arc<Self>) -> Option<Arc<Node>> {
        self.skip_filters().backing().map(|b| b.skip_filters())
    }

    /// The node below this one whose data it shows: a filter's child, a
    /// format's backing file (QEMU: bdrv_filter_or_cow_bs).
    pub fn filter_or_cow(&self) -> Option<Arc<Node>> {
        if self.driver().is_filter() {
            self.primary_child()
        } else {
            self.backing()
        }
    }

    /// The node whose driver answers QEMU's get_info for this one: a filter
    /// without an answer of its own gives its child's (QEMU:
    /// bdrv_co_get_info); None when nothing answers.
    pub fn info_node(self: &Arc<Self>) -> Option<Arc<Node>> {
        let d = self.driver();
        if d.has_info() {
            Some(Arc::clone(self))
        } else if d.is_filter() {
            self.primary_child()?.info_node()
        } else {
            None
        }
    }

    /// The image right above `base` in this node's chain, past filters
    /// (QEMU: bdrv_find_overlay); with `base` None, the last image of the
    /// chain. None when `base` is not in the chain.
    pub fn find_overlay(self: &Arc<Self>, base: Option<&Arc<Node>>) -> Option<Arc<Node>> {
        let base = base.map(|b| b.skip_filters());
        let mut cur = self.skip_filters();
        loop {
            let next = cur.backing_chain_next();
            match (&next, &base) {
                (None, None) => return Some(cur),
                (Some(n), Some(b)) if Arc::ptr_eq(n, b) => return Some(cur),
                (None, Some(_)) => return None,
                _ => {}
            }
            cur = next?;
        }
    }

    /// Whether `other` is this node or below it through filters and backing
    /// files (QEMU: bdrv_chain_contains).
    pub fn chain_contains(self: &Arc<Self>, other: &Arc<Node>) -> bool {
        let mut cur = Some(Arc::clone(self));
        while let Some(n) = cur {
            if Arc::ptr_eq(&n, other) {
                return true;
            }
            cur = n.filter_or_cow();
        }
        false
    }

    /// The image of this node's backing chain that `name` names (QEMU:
    /// bdrv_find_backing_image): a name as some layer stores it, resolved
    /// against that layer's directory and compared as canonical paths; with
    /// a protocol, compared as written or fully resolved. A layer whose
    /// backing file was given by options compares with the child's own name.
    pub fn find_backing_image(self: &Arc<Self>, name: &str) -> Option<Arc<Node>> {
        let is_protocol = crate::open::has_protocol(name);
        let mut cur = self.skip_filters();
        while let Some(below) = cur.backing() {
            let below_img = below.skip_filters();
            let stored = cur.driver().backing_file().map(|(n, _)| n);
            let found = match stored {
                None => name == below.filename(),
                Some(stored) if is_protocol || crate::open::has_protocol(&stored) => {
                    name == stored
                        || cur
                            .full_backing_filename(&stored)
                            .is_ok_and(|full| full == name)
                }
                Some(stored) => {
                    let wanted = cur.full_backing_filename(name).ok().and_then(canonical);
                    let have = cur.full_backing_filename(&stored).ok().and_then(canonical);
                    wanted.is_some() && wanted == have
                }
            };
            if found {
                return Some(below_img);
            }
            cur = below_img;
        }
        None
    }

    /// Stores `file` (and its format) as this image's backing file name
    /// (QEMU: bdrv_change_backing_file); `require` asks for a format with
    /// any name. EINVAL for a format without a file or a name without a
    /// required format; ENOTSUP where the format stores no names.
    pub async fn change_backing_file(
        self: &Arc<Self>,
        file: Option<&str>,
        format: Option<&str>,
        require: bool,
    ) -> Result<()> {
        if format.is_some() && file.is_none() {
            return err(libc::EINVAL);
        }
        if require && file.is_some() && format.is_none() {
            return err(libc::EINVAL);
        }
        if self.is_read_only() {
            return err(libc::EPERM);
        }
        self.driver().change_backing_file(file, format).await?;
        // The name stored is the one the image would open by itself now.
        self.naming().set_auto_backing(file.unwrap_or_default());
        self.refresh_identity();
        Ok(())
    }

    /// The format an overlay records for this node as its backing file
    /// (QEMU: bdrv_backing_update_filename): with `mask_protocol`, a
    /// protocol node is recorded as raw.
    pub fn format_for_overlay(&self, mask_protocol: bool) -> &str {
        if mask_protocol && self.identity().protocol {
            "raw"
        } else {
            self.format_name()
        }
    }

    /// Stores `file` as this image's backing file name, reopening the image
    /// read-write for that while if it is read-only (QEMU:
    /// bdrv_backing_update_filename).
    pub async fn update_backing_name(
        self: &Arc<Self>,
        file: Option<&str>,
        format: Option<&str>,
    ) -> Result<()> {
        let read_only = self.is_read_only();
        if read_only {
            self.reopen_read_only(false).await?;
        }
        let r = self
            .change_backing_file(file, format, false)
            .await
            .map_err(|e| {
                let why = crate::error::strerror(e.code());
                Error::msg(
                    e.code(),
                    format!("Could not update backing file link: {why}"),
                )
            });
        if read_only {
            let _ = self.reopen_read_only(true).await;
        }
        r
    }

    /// Empties this layer (QEMU: bdrv_make_empty): what it held is gone and
    /// the backing chain shows through. ENOTSUP where the format cannot. It
    /// runs drained: the format may rebuild its metadata from scratch.
    pub async fn make_empty(self: &Arc<Self>) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::errno(libc::EPERM));
        }
        crate::node::drained_async(&[Arc::clone(self)], || self.driver().make_empty()).await
    }
}

impl Node {
    /// Changes the image's options in place (QEMU: bdrv_amend_options),
    /// drained: a format may rewrite every table.
    pub async fn amend(
        self: &Arc<Self>,
        opts: crate::options::Opts,
        force: bool,
        status: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        if self.is_read_only() {
            return err(libc::EPERM);
        }
        crate::node::drained_async(&[Arc::clone(self)], || {
            self.driver().amend(opts, force, status)
        })
        .await
    }
}

fn canonical(path: String) -> Option<String> {
    std::fs::canonicalize(path)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}
