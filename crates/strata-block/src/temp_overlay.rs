//! The temporary overlay of `-s` / `snapshot=on` (QEMU:
//! bdrv_append_temp_snapshot): the image is opened read-only and a new qcow2
//! image on top of it takes every write. The overlay's file is unlinked as
//! soon as it is open, so nothing is left behind, even after a kill.

use crate::error::{Error, Result};
use crate::node::Node;
use crate::open::OpenCtx;
use crate::options::Opts;
use serde_json::Value;
use std::sync::Arc;

impl OpenCtx {
    /// Opens `filename`/`opts` read-only and returns a temporary qcow2
    /// overlay on it.
    pub(crate) async fn open_with_temp_overlay(
        mut self,
        filename: Option<String>,
        opts: Opts,
    ) -> Result<Arc<Node>> {
        self.flags.snapshot = false;
        let mut below = self.clone();
        below.flags.read_only = true;
        below.flags.copy_on_read = false;
        let mut opts = opts;
        opts.remove("read-only");
        let base = below.open_image(filename.as_deref(), None, opts).await?;

        let path = temp_path()?;
        let qcow2 = self.registry.format("qcow2")?;
        let mut create = Opts::new();
        create.insert("size".into(), Value::from(base.length()));
        create.insert("backing_file".into(), Value::from(base.filename()));
        create.insert("backing_fmt".into(), Value::from(base.format_name()));
        let r = qcow2.create(&self, &path, create).await;
        let node = match r {
            Ok(()) => {
                let mut top = self.clone();
                top.flags.read_only = false;
                top.set_backing_node(Arc::clone(&base));
                let mut o = Opts::new();
                o.insert("driver".into(), Value::from("qcow2"));
                let mut file = Opts::new();
                file.insert("driver".into(), Value::from("file"));
                file.insert("filename".into(), Value::from(path.clone()));
                o.insert("file".into(), Value::Object(file));
                top.open_image(None, None, o).await
            }
            Err(e) => Err(e),
        };
        // Unlinked whether or not the open worked: the open file lives on
        // until the node closes, and the name is gone at once.
        let _ = std::fs::remove_file(&path);
        node.map_err(|e| e.context("Could not create temporary overlay"))
    }
}

/// A fresh file name in $TMPDIR (else /var/tmp), as QEMU's
/// get_tmp_filename picks one.
fn temp_path() -> Result<String> {
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into());
    let template = format!("{dir}/vl.XXXXXX");
    let mut buf = template.into_bytes();
    buf.push(0);
    // SAFETY: buf is a NUL-terminated template mkstemp fills in place.
    let fd = unsafe { libc::mkstemp(buf.as_mut_ptr().cast()) };
    if fd < 0 {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return Err(Error::msg(
            errno,
            format!(
                "Could not get temporary filename: {}",
                crate::error::strerror(errno)
            ),
        ));
    }
    // SAFETY: fd was just returned by mkstemp and is ours to close.
    unsafe { libc::close(fd) };
    buf.pop();
    String::from_utf8(buf).map_err(|_| Error::invalid("Could not get temporary filename"))
}
