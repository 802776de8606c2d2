//! The `rbd` protocol driver (QEMU: block/rbd.c): images on a Ceph
//! cluster, read and written through librbd's asynchronous API, which is
//! loaded at run time ([`ffi`]). A request's completion comes back on the
//! node's event loop ([`aio`]); many requests are in flight at once.

mod aio;
mod conn;
mod create;
mod encryption;
mod ffi;
pub mod filename;
mod redundancy;
mod status;

use async_trait::async_trait;
use conn::{Location, OpenImage, Pool};
use encryption::Load;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use strata_block::driver::FormatSpecific;
use strata_block::options::{take_str, OptSpec};
use strata_block::{
    BlockStatus, Driver, DriverClass, Error, IoBuf, Limits, OpenCtx, Opts, Preallocation, Result,
    WriteFlags,
};

/// The `rbd` driver class.
pub struct RbdClass;

/// Reads the location options (QEMU: BlockdevOptionsRbd) out of `opts`.
pub(crate) fn take_location(opts: &mut Opts) -> Result<Location> {
    let _ = opts.remove("filename");
    let pool =
        take_str(opts, "pool")?.ok_or_else(|| Error::invalid("Parameter 'pool' is missing"))?;
    let image =
        take_str(opts, "image")?.ok_or_else(|| Error::invalid("Parameter 'image' is missing"))?;
    let namespace = take_str(opts, "namespace")?.unwrap_or_default();
    let snapshot = take_str(opts, "snapshot")?;
    let conf = take_str(opts, "conf")?;
    let user = take_str(opts, "user")?;
    let mut pairs = Vec::new();
    if let Some(json) = take_str(opts, filename::KEYVALUE_PAIRS)? {
        let list: Vec<String> =
            serde_json::from_str(&json).map_err(|_| Error::invalid("malformed key-value pairs"))?;
        for kv in list.chunks(2) {
            if let [k, v] = kv {
                pairs.push((k.clone(), v.clone()));
            }
        }
    }
    let mon_host = match opts.remove("server") {
        None => None,
        Some(Value::Array(servers)) => {
            let mut hosts = Vec::new();
            for s in servers {
                let host = s.get("host").and_then(Value::as_str);
                let port = s.get("port").and_then(|p| {
                    p.as_str()
                        .map(str::to_string)
                        .or_else(|| p.as_u64().map(|n| n.to_string()))
                });
                let (Some(host), Some(port)) = (host, port) else {
                    return Err(Error::invalid(
                        "Parameter 'server' expects a list of host and port",
                    ));
                };
                hosts.push(if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                });
            }
            (!hosts.is_empty()).then(|| hosts.join(";"))
        }
        Some(_) => return Err(Error::invalid("Parameter 'server' expects a list")),
    };
    let mut key_secret = take_str(opts, "key-secret")?;
    if let Some(legacy) = take_str(opts, "password-secret")? {
        if key_secret.is_some() {
            return Err(Error::invalid(
                "Legacy 'password-secret' clashes with 'key-secret'",
            ));
        }
        key_secret = Some(legacy);
    }
    let auth_client_required = match opts.remove("auth-client-required") {
        None => None,
        Some(v) => {
            let modes = match v {
                Value::Array(list) => list,
                one => vec![one],
            };
            let mut names = Vec::new();
            for (i, m) in modes.iter().enumerate() {
                match m.as_str() {
                    Some(n @ ("cephx" | "none")) => names.push(n),
                    _ => {
                        return Err(Error::invalid(format!(
                            "Parameter 'auth-client-required[{i}]' does not accept value '{}'",
                            m.as_str().map_or_else(|| m.to_string(), str::to_string)
                        )))
                    }
                }
            }
            Some(names.join(";"))
        }
    };
    Ok(Location {
        pool,
        namespace,
        image,
        snapshot,
        conf,
        user,
        mon_host,
        pairs,
        key_secret,
        auth_client_required,
    })
}

struct RbdDriver {
    img: OpenImage,
    length: AtomicU64,
    /// Held while the image grows.
    grow: std::sync::Mutex<()>,
    read_only: bool,
    /// Whether librbd encrypts the image's data (`encrypt` given).
    encrypted: bool,
    /// The pool that holds the image's data, if not the header's.
    data_pool: Option<String>,
    /// The data pool's redundancy, asked of the monitors on first `info`.
    redundancy: OnceLock<Option<String>>,
}

impl RbdDriver {
    fn lib(&self) -> &'static ffi::Lib {
        self.img.pool.lib
    }

    /// Grows the image to `end` if it is shorter (QEMU: qemu_rbd_start_co
    /// resizes before a write past the end). One resize at a time, and
    /// never smaller: two writes past the end both find room.
    fn grow_to(&self, end: u64) -> Result<()> {
        if end <= self.length() {
            return Ok(());
        }
        let _one = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        if end <= self.length() {
            return Ok(());
        }
        // SAFETY: the image is open.
        let r = unsafe { (self.lib().rbd_resize)(self.img.image, end) };
        if r < 0 {
            return Err(Error::errno(-r));
        }
        self.length.store(end, Ordering::Release);
        Ok(())
    }

    /// Starts `op(image, completion, buffer)` and waits for it.
    async fn request(
        &self,
        buf: Option<IoBuf>,
        op: impl FnOnce(&ffi::Lib, ffi::Image, ffi::Completion, *mut u8) -> std::ffi::c_int,
    ) -> Result<(isize, Option<IoBuf>)> {
        // The handle stays out of the future, which must be Send.
        let waiter = {
            let (lib, image) = (self.lib(), self.img.image);
            aio::submit(lib, buf, |c, p| op(lib, image, c, p))?
        };
        waiter.done().await
    }
}

#[async_trait]
impl Driver for RbdDriver {
    fn format_name(&self) -> &'static str {
        "rbd"
    }

    fn length(&self) -> u64 {
        self.length.load(Ordering::Acquire)
    }

    /// QEMU shows the encryption format of a header at the image's start;
    /// Strata adds the pool that holds the data and its redundancy (`x`
    /// copies or `x:y` strips).
    fn format_specific(&self) -> Option<FormatSpecific> {
        let mut data = serde_json::Map::new();
        if let Ok(Some(f)) = encryption::probe(self.lib(), self.img.image) {
            data.insert("encryption-format".into(), f.name().into());
        }
        if let Some(pool) = &self.data_pool {
            data.insert("data-pool".into(), pool.clone().into());
            let r = self
                .redundancy
                .get_or_init(|| redundancy::of_pool(&self.img.pool, pool).map(|r| r.to_string()));
            if let Some(r) = r {
                data.insert("redundancy".into(), r.clone().into());
            }
        }
        Some(json!({"type": "rbd", "data": data}))
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: 1,
            ..Limits::default()
        }
    }

    /// A new image reads as zeroes (QEMU: bdrv_has_zero_init_1), so a
    /// copy onto it leaves zero ranges alone.
    fn has_zero_init(&self) -> bool {
        true
    }

    /// A write past the end grows the image, as QEMU's rbd driver does:
    /// qcow2 on RBD needs it.
    fn growable(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len();
        let (r, buf) = self
            .request(Some(buf), |lib, image, c, p| {
                // SAFETY: the buffer stays in the callback's state until
                // librbd completes the request.
                unsafe { (lib.rbd_aio_read)(image, offset, len, p.cast(), c) }
            })
            .await?;
        let mut buf = buf.expect("the buffer comes back");
        aio::check(r)?;
        // librbd reads short at the end of the image: the rest is zeroes.
        let n = r as usize;
        if n < len {
            buf.as_mut_slice()[n..].fill(0);
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        let len = buf.len();
        self.grow_to(offset + len as u64)?;
        let (r, buf) = self
            .request(Some(buf), |lib, image, c, p| {
                // SAFETY: as for reads.
                unsafe { (lib.rbd_aio_write)(image, offset, len, p.cast_const().cast(), c) }
            })
            .await?;
        aio::check(r)?;
        Ok(buf.expect("the buffer comes back"))
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _flags: WriteFlags) -> Result<()> {
        let Ok(n) = usize::try_from(len) else {
            return Err(Error::errno(libc::EINVAL));
        };
        self.grow_to(offset + len)?;
        let (r, _) = self
            .request(None, |lib, image, c, _| {
                // SAFETY: the image is open; no buffer.
                unsafe { (lib.rbd_aio_write_zeroes)(image, offset, n, c, 0, 0) }
            })
            .await?;
        aio::check(r)
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let (r, _) = self
            .request(None, |lib, image, c, _| {
                // SAFETY: the image is open; no buffer.
                unsafe { (lib.rbd_aio_discard)(image, offset, len, c) }
            })
            .await?;
        aio::check(r)
    }

    async fn flush(&self) -> Result<()> {
        let (r, _) = self
            .request(None, |lib, image, c, _| {
                // SAFETY: the image is open; no buffer.
                unsafe { (lib.rbd_aio_flush)(image, c) }
            })
            .await?;
        aio::check(r)
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let len = len.min(self.length().saturating_sub(offset)).max(1);
        // Synchronous, as in QEMU: librbd answers from its object map.
        let st = match status::query(self.lib(), self.img.image, offset, len, self.encrypted) {
            Some((false, n)) => BlockStatus::zero(n.min(len)),
            Some((true, n)) => BlockStatus::data(n.min(len)),
            None => BlockStatus::data(len),
        };
        Ok(BlockStatus { here: true, ..st })
    }

    async fn truncate(&self, size: u64, _exact: bool, prealloc: Preallocation) -> Result<()> {
        if prealloc != Preallocation::Off {
            return Err(Error::unsupported(format!(
                "Unsupported preallocation mode '{}'",
                prealloc.name()
            )));
        }
        if self.read_only {
            return Err(Error::errno(libc::EACCES));
        }
        let _one = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the image is open.
        let r = unsafe { (self.lib().rbd_resize)(self.img.image, size) };
        if r < 0 {
            return Err(Error::errno(-r).context("Failed to resize file"));
        }
        self.length.store(size, Ordering::Release);
        Ok(())
    }
}

#[async_trait]
impl DriverClass for RbdClass {
    fn name(&self) -> &'static str {
        "rbd"
    }

    fn protocol_name(&self) -> Option<&'static str> {
        Some("rbd")
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &[
            "pool",
            "namespace",
            "image",
            "conf",
            "snapshot",
            "user",
            "server.",
            "password-secret",
        ]
    }

    fn parse_filename(&self, filename: &str, opts: &mut Opts) -> Result<()> {
        filename::parse(filename, opts)
    }

    fn create_options(&self) -> &'static [OptSpec] {
        create::CREATE_OPTIONS
    }

    async fn create(&self, _ctx: &OpenCtx, filename: &str, opts: Opts) -> Result<()> {
        create::Spec::from_filename(filename, opts)?.make()
    }

    fn can_blockdev_create(&self) -> bool {
        true
    }

    async fn blockdev_create(&self, _ctx: &OpenCtx, opts: Opts) -> Result<()> {
        create::Spec::from_qapi(opts)?.make()
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let loc = take_location(opts)?;
        let encrypt = Load::take(opts)?;
        let cache = !ctx.flags.cache.direct;
        let pool = Pool::connect(&loc, cache)?;
        let read_only = ctx.flags.read_only;
        let img = OpenImage::open(pool, &loc, read_only)?;
        if let Some(enc) = &encrypt {
            enc.apply(img.pool.lib, img.image)?;
        }
        // After the encryption is loaded, the size is the guest's.
        let length = img.size()?;
        let data_pool = img.data_pool();
        Ok(Box::new(RbdDriver {
            img,
            length: AtomicU64::new(length),
            grow: std::sync::Mutex::new(()),
            read_only: read_only || loc.snapshot.is_some(),
            encrypted: encrypt.is_some(),
            data_pool,
            redundancy: OnceLock::new(),
        }))
    }
}
