//! Encrypted qcow2 (QEMU: the crypto parts of qcow2.c): the `encrypt.*`
//! options at open, the LUKS header in its own clusters (or qcow's legacy
//! AES, keyed by the password), and guest data encrypted on its way to the
//! data file. LUKS takes the IV of a sector from its host offset, AES from
//! its guest offset.

use super::header::{Header, CRYPT_AES, CRYPT_LUKS, CRYPT_NONE};
use super::Qcow2Driver;
use crate::formats::crypto::{crypto_err, open_luks, password, take_prefixed, write_region};
use std::sync::Arc;
use strata_block::options::Opts;
use strata_block::{Error, IoBuf, Node, OpenCtx, Result, WriteFlags};
use strata_crypto::luks::{CreateOptions, Luks};
use strata_crypto::BlockCrypto;

/// What `encrypt.format` calls each method.
fn method_name(m: u32) -> &'static str {
    if m == CRYPT_AES {
        "aes"
    } else {
        "luks"
    }
}

/// Opens the image's encryption from its header and the `encrypt.*`
/// options; unlocked unless the node is opened without I/O.
pub(super) async fn open(
    ctx: &OpenCtx,
    file: &Arc<Node>,
    hdr: &Header,
    opts: &mut Opts,
) -> Result<Option<BlockCrypto>> {
    let format = take_prefixed(opts, "encrypt.", "format")?;
    let key_secret = take_prefixed(opts, "encrypt.", "key-secret")?;
    let method = hdr.crypt_method;
    match (method, format.as_deref()) {
        (CRYPT_NONE, Some(f)) => {
            return Err(Error::invalid(format!(
                "No encryption in image header, but options specified format '{f}'"
            )))
        }
        (CRYPT_NONE, None) => return Ok(None),
        (m, Some(f)) if f != method_name(m) => {
            return Err(Error::invalid(format!(
                "Header reported '{}' encryption format but options specify '{f}'",
                method_name(m)
            )))
        }
        _ => {}
    }
    let pw = match ctx.flags.no_io {
        true => None,
        false => Some(password(key_secret.as_deref(), "encrypt.")?),
    };
    if method == CRYPT_AES {
        return BlockCrypto::qcow(pw.as_deref())
            .map(Some)
            .map_err(crypto_err);
    }
    let Some((offset, length)) = hdr.crypto_header else {
        return Err(Error::invalid("Missing CRYPTO header for crypt method 2"));
    };
    let c = open_luks(file, offset, length, pw.as_deref(), false).await?;
    Ok(Some(c.with_secret(key_secret)))
}

impl Qcow2Driver {
    /// The offset whose sector numbers give the IVs of data at `host`
    /// (guest offset `guest`).
    fn iv_offset(c: &BlockCrypto, host: u64, guest: u64) -> u64 {
        if c.is_luks() {
            host
        } else {
            guest
        }
    }

    /// Reads guest data from the data file at `host`, decrypted.
    pub(super) async fn read_data(&self, host: u64, guest: u64, buf: IoBuf) -> Result<IoBuf> {
        let mut buf = self.data()?.read(host, buf).await?;
        if let Some(c) = &self.crypto {
            c.decrypt(Self::iv_offset(c, host, guest), buf.as_mut_slice())
                .map_err(crypto_err)?;
        }
        Ok(buf)
    }

    /// Writes guest data to the data file at `host`, encrypted into a copy
    /// (the caller's buffer comes back as it was).
    pub(super) async fn write_data(&self, host: u64, guest: u64, buf: IoBuf) -> Result<IoBuf> {
        let data = self.data()?;
        let Some(c) = &self.crypto else {
            return data.write(host, buf, WriteFlags::default()).await;
        };
        let mut enc = IoBuf::from_slice(buf.as_slice());
        c.encrypt(Self::iv_offset(c, host, guest), enc.as_mut_slice())
            .map_err(crypto_err)?;
        data.write(host, enc, WriteFlags::default()).await?;
        Ok(buf)
    }

    /// Encrypts a new image (QEMU: qcow2_set_up_encryption): for LUKS the
    /// header goes into newly allocated clusters, zeroed first; then the
    /// qcow2 header names the method (and where the LUKS header is).
    pub(super) async fn set_up_encryption(
        &self,
        luks: Option<(&CreateOptions, &[u8])>,
    ) -> Result<()> {
        let mut m = self.meta.lock().await;
        let (method, at) = match luks {
            None => (CRYPT_AES, None),
            Some((opts, pw)) => {
                let (_, _, region) = Luks::create(opts, pw).map_err(crypto_err)?;
                let len = region.len() as u64;
                let cs = self.geo.cluster_size;
                let n = len.div_ceil(cs);
                let off = m.alloc_clusters(&self.file.get(), n).await.map_err(|e| {
                    e.context(format!(
                        "Cannot allocate cluster for LUKS header size {len}"
                    ))
                })?;
                m.check_metadata_write(&self.file.get(), off, n * cs)
                    .await?;
                // The whole clusters are zeroed so that no byte is left to chance.
                let mut bytes = region;
                bytes.resize((n * cs) as usize, 0);
                write_region(&self.file.get(), off, vec![(0, bytes)]).await?;
                (CRYPT_LUKS, Some((off, len)))
            }
        };
        m.header.crypt_method = method;
        m.header.crypto_header = at;
        self.write_header(&mut m)
            .await
            .map_err(|e| e.context("Could not write encryption header"))
    }
}
