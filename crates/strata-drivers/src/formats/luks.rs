//! The `luks` format (QEMU: block/crypto.c): a LUKS1 header and its key
//! material, then the payload, every 512-byte sector of it encrypted with
//! the master key and an IV from its sector number within the payload. A
//! detached header (`header`, `detached-header=on`) lives in a node of its
//! own, and the payload then starts at the file's first byte.

use super::crypto::{
    amend_luks, crypto_err, open_luks, password, take_luks_amend, take_luks_create,
};
use async_trait::async_trait;
use std::sync::Arc;
use strata_block::driver::{FormatSpecific, Preallocation};
use strata_block::options::{take_bool, take_size, take_str, OptSpec, Opts};
use strata_block::{
    BlockStatus, Child, ChildRole, Driver, DriverClass, Error, IoBuf, Node, OpenCtx, Result,
    WriteFlags,
};
use strata_crypto::luks::{Luks, SECTOR_SIZE};
use strata_crypto::BlockCrypto;

/// The `luks` driver class.
pub struct LuksClass;

/// An open LUKS image.
pub struct LuksDriver {
    file: Arc<Node>,
    /// The detached header's node, if the header is not in `file`.
    header: Option<Arc<Node>>,
    crypto: BlockCrypto,
    /// Where the payload starts in the file.
    payload: u64,
}

#[async_trait]
impl Driver for LuksDriver {
    fn format_name(&self) -> &'static str {
        "luks"
    }

    fn length(&self) -> u64 {
        self.file.length().saturating_sub(self.payload)
    }

    /// The header first: QEMU lists the child attached last first.
    fn children(&self) -> Vec<Child> {
        let file = Child {
            role: ChildRole::File,
            node: Arc::clone(&self.file),
        };
        match &self.header {
            Some(h) => vec![
                Child {
                    role: ChildRole::Header,
                    node: Arc::clone(h),
                },
                file,
            ],
            None => vec![file],
        }
    }

    /// Whole sectors only: each is encrypted on its own.
    fn limits(&self) -> strata_block::Limits {
        let mut l = self.file.limits();
        l.request_alignment = l.request_alignment.max(SECTOR_SIZE as u32);
        l
    }

    fn encrypted(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let mut buf = self.file.read(self.payload + offset, buf).await?;
        self.crypto
            .decrypt(offset, buf.as_mut_slice())
            .map_err(crypto_err)?;
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        // The caller keeps its plaintext: the cipher text is a copy.
        let mut enc = IoBuf::from_slice(buf.as_slice());
        self.crypto
            .encrypt(offset, enc.as_mut_slice())
            .map_err(crypto_err)?;
        self.file.write(self.payload + offset, enc, flags).await?;
        Ok(buf)
    }

    async fn flush(&self) -> Result<()> {
        self.file.flush().await
    }

    /// Everything is data; where it sits is not the guest's bytes.
    async fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::data(len))
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Preallocation) -> Result<()> {
        let end = size
            .checked_add(self.payload)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| Error::invalid("The requested file size is too large"))?;
        self.file.truncate(end, exact, prealloc).await
    }

    /// The payload's blocks and a detached header's.
    async fn allocated_size(&self) -> Result<Option<u64>> {
        let file = self.file.driver().allocated_size().await?;
        match &self.header {
            Some(h) => Ok(file
                .zip(h.driver().allocated_size().await?)
                .map(|(a, b)| a + b)),
            None => Ok(file),
        }
    }

    fn format_specific(&self) -> Option<FormatSpecific> {
        let mut info = self.crypto.info();
        info.remove("format");
        Some(serde_json::json!({ "type": "luks", "data": info }))
    }

    /// Key slots added or erased (QEMU: block_crypto_amend_options_luks).
    async fn amend(
        &self,
        mut opts: Opts,
        force: bool,
        _status: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        let o = take_luks_amend(&mut opts, "")?;
        let meta = self.header.as_ref().unwrap_or(&self.file);
        let limit = match &self.header {
            Some(h) => h.length(),
            None => self.payload,
        };
        amend_luks(meta, 0, limit, &self.crypto, &o, force).await
    }

    fn can_blockdev_amend(&self) -> bool {
        true
    }

    /// QCryptoBlockAmendOptionsLUKS: the key slot options, named as in
    /// `amend` (QEMU: block_crypto_co_amend_luks).
    async fn blockdev_amend(&self, opts: Opts, force: bool) -> Result<()> {
        self.amend(opts, force, &|_, _| {}).await
    }

    async fn close(&self) -> Result<()> {
        let r = self.file.close().await;
        match &self.header {
            Some(h) => r.and(h.close().await),
            None => r,
        }
    }
}

#[async_trait]
impl DriverClass for LuksClass {
    fn name(&self) -> &'static str {
        "luks"
    }

    fn probe(&self, header: &[u8], _filename: &str) -> u32 {
        if Luks::probe(header) {
            100
        } else {
            0
        }
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &["key-secret"]
    }

    fn create_options(&self) -> &'static [OptSpec] {
        super::crypto::LUKS_CREATE_OPTIONS
    }

    fn amend_options(&self) -> Option<&'static [OptSpec]> {
        Some(super::crypto::LUKS_AMEND_OPTIONS)
    }

    /// The header region, then the payload grown to `size`; with
    /// `detached-header`, a header alone that says its payload is elsewhere
    /// (at offset 0 of whatever file it is opened with), as QEMU's
    /// block_crypto_co_create_generic makes it.
    async fn create(&self, ctx: &OpenCtx, filename: &str, mut opts: Opts) -> Result<()> {
        let size = take_size(&mut opts, "size")?.unwrap_or(0);
        let key_secret = take_str(&mut opts, "key-secret")?;
        let mut luks_opts = take_luks_create(&mut opts, "")?;
        luks_opts.detached = take_bool(&mut opts, "detached-header")?.unwrap_or(false);
        let prealloc = match take_str(&mut opts, "preallocation")?.as_deref() {
            None | Some("off") => Preallocation::Off,
            Some("metadata") => Preallocation::Metadata,
            Some("falloc") => Preallocation::Falloc,
            Some("full") => Preallocation::Full,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "Parameter 'preallocation' does not accept value '{v}'"
                )))
            }
        };
        // No file is made for a secret that is not there.
        password(key_secret.as_deref(), "")?;
        let file = super::create_and_open_file(ctx, filename, opts).await?;
        let size = if luks_opts.detached { 0 } else { size };
        let r = format_on(&file, size, &luks_opts, key_secret.as_deref(), prealloc).await;
        super::finish_created(file, r).await
    }

    fn can_blockdev_create(&self) -> bool {
        true
    }

    /// Somewhere to write, and preallocation only where there is a payload.
    fn blockdev_create_check(&self, opts: &Opts) -> Result<()> {
        let (file, header) = (opts.get("file"), opts.get("header"));
        if header.is_none() && file.is_none() {
            return Err(Error::invalid(
                "Either the parameter 'header' or 'file' must be specified",
            ));
        }
        let prealloc = opts.get("preallocation").and_then(|p| p.as_str());
        if prealloc.is_some_and(|p| p != "off") && file.is_none() {
            return Err(Error::invalid(
                "Parameter 'preallocation' requires 'file' to be specified for formatting LUKS disk",
            ));
        }
        Ok(())
    }

    /// BlockdevCreateOptionsLUKS (QEMU: block_crypto_co_create_luks): the
    /// header into `file`, or into `header` alone (detached), the payload
    /// node then only grown to `size`.
    async fn blockdev_create(&self, ctx: &OpenCtx, mut opts: Opts) -> Result<()> {
        self.blockdev_create_check(&opts)?;
        let file = opts.remove("file");
        let header = opts.remove("header");
        let size = take_size(&mut opts, "size")?.unwrap_or(0);
        let prealloc = match take_str(&mut opts, "preallocation")? {
            Some(p) => Preallocation::parse(&p)?,
            None => Preallocation::Off,
        };
        let key_secret = take_str(&mut opts, "key-secret")?;
        let mut luks_opts = take_luks_create(&mut opts, "")?;
        luks_opts.detached = header.is_some();
        let Some(header) = header else {
            let file = ctx.open_blockdev_ref(file.unwrap_or_default()).await?;
            let r = format_on(&file, size, &luks_opts, key_secret.as_deref(), prealloc).await;
            let _ = file.close().await;
            return r;
        };
        let hdr = ctx.open_blockdev_ref(header).await?;
        let r = format_on(
            &hdr,
            0,
            &luks_opts,
            key_secret.as_deref(),
            Preallocation::Off,
        )
        .await;
        let _ = hdr.close().await;
        r?;
        let Some(file) = file else {
            return Ok(());
        };
        let file = ctx.open_blockdev_ref(file).await?;
        let r = match super::creating_user(&file) {
            Ok(blk) => {
                let r = blk.truncate(size, true, prealloc).await;
                let _ = blk.close().await;
                r.map_err(too_large)
            }
            Err(e) => Err(e),
        };
        let _ = file.close().await;
        r
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        let key_secret = take_str(opts, "key-secret")?;
        let header = ctx
            .open_child(opts, "header", None, ChildRole::Header, true)
            .await?;
        let meta = header.as_ref().unwrap_or(&file);
        let pw = match ctx.flags.no_io {
            true => None,
            false => Some(password(key_secret.as_deref(), "")?),
        };
        let crypto = open_luks(meta, 0, meta.length(), pw.as_deref(), header.is_some())
            .await?
            .with_secret(key_secret);
        let payload = crypto
            .luks_header()
            .map(|l| l.payload_offset())
            .unwrap_or_default();
        if payload > file.length() {
            return Err(Error::invalid(format!(
                "LUKS payload at {payload} lies past the end of the file"
            )));
        }
        Ok(Box::new(LuksDriver {
            file,
            header,
            crypto,
            payload,
        }))
    }
}

/// QEMU's message for a size past what a file can hold.
fn too_large(e: Error) -> Error {
    match e.code() {
        libc::EFBIG => Error::invalid("The requested file size is too large"),
        _ => e,
    }
}

/// Formats the open node `node` as LUKS: grown to the header plus `size`
/// (QEMU: block_crypto_create_init_func, `metadata` meaning nothing here),
/// then the header region written at its start.
async fn format_on(
    node: &Arc<Node>,
    size: u64,
    luks_opts: &strata_crypto::luks::CreateOptions,
    key_secret: Option<&str>,
    prealloc: Preallocation,
) -> Result<()> {
    let blk = super::creating_user(node)?;
    let r = async {
        let pw = password(key_secret, "")?;
        let (_, _, region) = Luks::create(luks_opts, &pw).map_err(crypto_err)?;
        let end = (region.len() as u64)
            .checked_add(size)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| Error::invalid("The requested file size is too large"))?;
        let prealloc = match prealloc {
            Preallocation::Metadata => Preallocation::Off,
            p => p,
        };
        blk.truncate(end, false, prealloc)
            .await
            .map_err(too_large)?;
        blk.write(0, IoBuf::from_slice(&region), WriteFlags::default())
            .await
            .map_err(|e| e.context("Could not write encryption header"))?;
        Ok(())
    }
    .await;
    let c = blk.close().await;
    r.and(c)
}
