//! A connection to a cluster and an open image (QEMU: qemu_rbd_connect and
//! rbd_open). Dropped, it closes the image, the pool's I/O context and the
//! cluster handle in that order.

use crate::ffi::{lib, Image, IoCtx, Lib, Rados};
use base64::Engine;
use std::ffi::CString;
use strata_block::{Error, Result};

/// The options that say where the image is and how to reach the cluster.
#[derive(Clone, Debug, Default)]
pub struct Location {
    pub pool: String,
    pub namespace: String,
    pub image: String,
    pub snapshot: Option<String>,
    pub conf: Option<String>,
    pub user: Option<String>,
    /// `mon_host` from the `server` list, `host:port;host:port`.
    pub mon_host: Option<String>,
    /// Ceph settings from the file name, in order.
    pub pairs: Vec<(String, String)>,
    /// The id of the secret that holds the user's key.
    pub key_secret: Option<String>,
    /// `auth_client_required`, modes joined by `;`.
    pub auth_client_required: Option<String>,
}

/// Seconds to wait for the cluster's monitors when connecting, and for an
/// answer to a monitor command.
const MON_TIMEOUT: &str = "30";

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid(format!("'{s}' contains a NUL byte")))
}

/// QEMU's error_setg_errno: the words, then the errno's.
pub(crate) fn errno_msg(r: i32, what: impl std::fmt::Display) -> Error {
    Error::msg(-r, format!("{what}: {}", strata_block::error::strerror(-r)))
}

/// The cluster handle and the pool's I/O context.
pub struct Pool {
    pub lib: &'static Lib,
    cluster: Rados,
    pub ioctx: IoCtx,
}

// SAFETY: librados handles may be used from any thread.
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

impl Pool {
    /// Connects to the cluster and opens the pool (QEMU: qemu_rbd_connect).
    pub fn connect(loc: &Location, cache: bool) -> Result<Pool> {
        let lib = lib().map_err(|e| Error::msg(libc::ENOTSUP, e))?;
        let user = loc.user.as_deref().map(cstr).transpose()?;
        let mut cluster: Rados = std::ptr::null_mut();
        // SAFETY: the out pointer is valid; the id may be NULL.
        let r = unsafe {
            (lib.rados_create)(
                &mut cluster,
                user.as_ref().map_or(std::ptr::null(), |u| u.as_ptr()),
            )
        };
        if r < 0 {
            return Err(errno_msg(r, "error initializing"));
        }
        // From here on, dropping `pool` shuts the cluster handle down.
        let mut pool = Pool {
            lib,
            cluster,
            ioctx: std::ptr::null_mut(),
        };
        // A cluster that is down is an error after this long, not five
        // minutes (librados's default, and QEMU's). Set first, so that a
        // configuration file or a key=value pair still decides.
        pool.set("client_mount_timeout", MON_TIMEOUT);
        // The same bound for monitor commands (the redundancy choice's),
        // which librados would otherwise wait on for ever.
        pool.set("rados_mon_op_timeout", MON_TIMEOUT);
        let conf = loc.conf.as_deref().map(cstr).transpose()?;
        // SAFETY: the handle is live; NULL reads the default places.
        let r = unsafe {
            (lib.rados_conf_read_file)(
                cluster,
                conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        // The default places are tried, but may well be missing.
        if let (Some(c), true) = (&loc.conf, r < 0) {
            return Err(errno_msg(r, format!("error reading conf file {c}")));
        }
        for (k, v) in &loc.pairs {
            let r = pool.set(k, v);
            if r < 0 {
                return Err(Error::msg(
                    libc::EINVAL,
                    format!(
                        "invalid conf option {k}: {}",
                        strata_block::error::strerror(-r)
                    ),
                ));
            }
        }
        if let Some(m) = &loc.mon_host {
            let r = pool.set("mon_host", m);
            if r < 0 {
                return Err(Error::errno(-r));
            }
        }
        if let Some(id) = &loc.key_secret {
            // Ceph wants the key as base64 (QEMU: qcrypto_secret_lookup_as_base64).
            let key = strata_crypto::secret::lookup(id)
                .map_err(|e| Error::msg(libc::EIO, e.to_string()))?;
            let r = pool.set(
                "key",
                &base64::engine::general_purpose::STANDARD.encode(key),
            );
            if r < 0 {
                return Err(errno_msg(r, "Could not set 'key'"));
            }
        }
        if let Some(acr) = &loc.auth_client_required {
            let r = pool.set("auth_client_required", acr);
            if r < 0 {
                return Err(errno_msg(r, "Could not set 'auth_client_required'"));
            }
        }
        // Only fails when librbd lacks the option; no cache then.
        pool.set("rbd_cache", if cache { "true" } else { "false" });
        // SAFETY: the handle is live and configured.
        let r = unsafe { (lib.rados_connect)(cluster) };
        if r < 0 {
            return Err(errno_msg(r, "error connecting"));
        }
        let name = cstr(&loc.pool)?;
        // SAFETY: the handle is connected; the out pointer is valid.
        let r = unsafe { (lib.rados_ioctx_create)(cluster, name.as_ptr(), &mut pool.ioctx) };
        if r < 0 {
            pool.ioctx = std::ptr::null_mut();
            return Err(errno_msg(r, format!("error opening pool {}", loc.pool)));
        }
        // An empty namespace is the pool's default one.
        let ns = cstr(&loc.namespace)?;
        if !loc.namespace.is_empty() {
            let mut exists = false;
            // SAFETY: the context is live; the out pointer is valid.
            let r = unsafe { (lib.rbd_namespace_exists)(pool.ioctx, ns.as_ptr(), &mut exists) };
            if r < 0 {
                return Err(errno_msg(r, "error checking namespace"));
            }
            if !exists {
                return Err(Error::msg(
                    libc::ENOENT,
                    format!("namespace '{}' does not exist", loc.namespace),
                ));
            }
        }
        // SAFETY: the context is live.
        unsafe { (lib.rados_ioctx_set_namespace)(pool.ioctx, ns.as_ptr()) };
        Ok(pool)
    }

    /// Sends a command to the monitors (QEMU's driver never does; the
    /// redundancy choice needs pools). On success, the command's output;
    /// on failure, the errno and the monitor's own words.
    pub fn mon_command(
        &self,
        cmd: &serde_json::Value,
    ) -> std::result::Result<String, (i32, String)> {
        let cmd = CString::new(cmd.to_string()).map_err(|_| (libc::EINVAL, String::new()))?;
        let cmds = [cmd.as_ptr()];
        let (mut out, mut out_len) = (std::ptr::null_mut(), 0usize);
        let (mut status, mut status_len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: the handle is connected; the command outlives the call;
        // librados allocates both answers, freed below.
        let r = unsafe {
            (self.lib.rados_mon_command)(
                self.cluster,
                cmds.as_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        let take = |p: *mut std::ffi::c_char, len: usize| {
            if p.is_null() {
                return String::new();
            }
            // SAFETY: librados returned `len` bytes at `p`, ours to free.
            let s = String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(p.cast(), len) })
                .into_owned();
            unsafe { (self.lib.rados_buffer_free)(p) };
            s
        };
        let (out, status) = (take(out, out_len), take(status, status_len));
        if r < 0 {
            let why = if status.trim().is_empty() {
                strata_block::error::strerror(-r).to_string()
            } else {
                status.trim().to_string()
            };
            return Err((-r, why));
        }
        Ok(out)
    }

    /// The name of the pool with id `id`.
    pub fn pool_name(&self, id: i64) -> Option<String> {
        let mut buf = [0u8; 256];
        // SAFETY: the handle is connected; the buffer's length is given.
        let r = unsafe {
            (self.lib.rados_pool_reverse_lookup)(
                self.cluster,
                id,
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if r < 0 {
            return None;
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Some(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    fn set(&self, key: &str, value: &str) -> i32 {
        let (Ok(k), Ok(v)) = (CString::new(key), CString::new(value)) else {
            return -libc::EINVAL;
        };
        // SAFETY: the handle is live; both strings outlive the call.
        unsafe { (self.lib.rados_conf_set)(self.cluster, k.as_ptr(), v.as_ptr()) }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: each handle is live and dropped once, context first.
        unsafe {
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            (self.lib.rados_shutdown)(self.cluster);
        }
    }
}

/// An open image, with the pool it lives in.
pub struct OpenImage {
    pub image: Image,
    pub pool: Pool,
}

// SAFETY: librbd images may be used from any thread.
unsafe impl Send for OpenImage {}
unsafe impl Sync for OpenImage {}

impl OpenImage {
    /// Opens the image; read-only for a snapshot or when asked.
    pub fn open(pool: Pool, loc: &Location, read_only: bool) -> Result<OpenImage> {
        let name = cstr(&loc.image)?;
        let snap = loc.snapshot.as_deref().map(cstr).transpose()?;
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut image: Image = std::ptr::null_mut();
        let f = if read_only || loc.snapshot.is_some() {
            pool.lib.rbd_open_read_only
        } else {
            pool.lib.rbd_open
        };
        // SAFETY: the context is live; the strings outlive the call.
        let r = unsafe { f(pool.ioctx, name.as_ptr(), &mut image, snap_ptr) };
        if r < 0 {
            return Err(errno_msg(
                r,
                format!("error reading header from {}", loc.image),
            ));
        }
        Ok(OpenImage { image, pool })
    }

    /// The name of the pool that holds the image's data.
    pub fn data_pool(&self) -> Option<String> {
        // SAFETY: the image is open.
        let id = unsafe { (self.pool.lib.rbd_get_data_pool_id)(self.image) };
        (id >= 0).then(|| self.pool.pool_name(id)).flatten()
    }

    pub fn size(&self) -> Result<u64> {
        let mut size = 0;
        // SAFETY: the image is open; the out pointer is valid.
        let r = unsafe { (self.pool.lib.rbd_get_size)(self.image, &mut size) };
        if r < 0 {
            return Err(errno_msg(r, "error getting image size"));
        }
        Ok(size)
    }
}

impl Drop for OpenImage {
    fn drop(&mut self) {
        // SAFETY: the image is open and closed once, before its pool.
        unsafe { (self.pool.lib.rbd_close)(self.image) };
    }
}
