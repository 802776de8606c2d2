//! Making qcow images as QEMU's qcow_co_create does: the header, the
//! backing file's name, and a zeroed L1 table in whole sectors. 4 KiB
//! clusters and 512-entry tables, or with a backing file 512-byte
//! clusters (so no write ever copies from it) and 4096-entry tables.

use super::{Geometry, CRYPT_AES, CRYPT_NONE, HEADER_LEN, MAGIC, SECTOR, VERSION};
use crate::formats::crypto::{password, take_prefixed};
use std::sync::Arc;
use strata_block::options::{take_bool, take_size, take_str, OptSpec, OptType, Opts};
use strata_block::{Backend, Error, IoBuf, Node, OpenCtx, Result, WriteFlags};

/// The creation options, in QEMU's order (`Formatting` shows them so).
pub(super) const CREATE_OPTIONS: &[OptSpec] = &[
    crate::protocols::file::CREATE_OPTIONS[0],
    OptSpec {
        name: "backing_file",
        ty: OptType::Str,
        help: "File name of a base image",
        default: None,
    },
    OptSpec {
        name: "backing_fmt",
        ty: OptType::Str,
        help: "Format of the backing image",
        default: None,
    },
    OptSpec {
        name: "encryption",
        ty: OptType::Bool,
        help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
        default: None,
    },
    OptSpec {
        name: "encrypt.format",
        ty: OptType::Str,
        help: "Encrypt the image, format choices: 'aes'",
        default: None,
    },
    OptSpec {
        name: "encrypt.key-secret",
        ty: OptType::Str,
        help: "ID of the secret that provides the AES encryption key",
        default: None,
    },
];

/// What a new image is.
struct NewImage {
    size: u64,
    backing: Option<String>,
    /// The secret that keys the image, for an encrypted one.
    key_secret: Option<Option<String>>,
}

impl NewImage {
    fn geometry(&self) -> Geometry {
        match self.backing {
            Some(_) => Geometry {
                cluster_bits: 9,
                l2_bits: 12,
            },
            None => Geometry {
                cluster_bits: 12,
                l2_bits: 9,
            },
        }
    }

    /// Writes the image through `blk`: the header and name, then the L1
    /// sectors; the bytes between stay as they were, as in QEMU.
    async fn write_to(&self, blk: &Backend) -> Result<()> {
        let name = self.backing.as_deref().unwrap_or("");
        let header_len = (HEADER_LEN + name.len()).next_multiple_of(8) as u64;
        let geo = self.geometry();
        let Some(l1_entries) = geo.l1_entries(self.size) else {
            return Err(Error::errno(libc::EFBIG));
        };
        let mut h = vec![0u8; HEADER_LEN + name.len()];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&VERSION.to_be_bytes());
        if self.backing.is_some() {
            h[8..16].copy_from_slice(&(HEADER_LEN as u64).to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        h[24..32].copy_from_slice(&self.size.to_be_bytes());
        h[32] = geo.cluster_bits as u8;
        h[33] = geo.l2_bits as u8;
        let crypt = match self.key_secret {
            Some(_) => CRYPT_AES,
            None => CRYPT_NONE,
        };
        h[36..40].copy_from_slice(&crypt.to_be_bytes());
        h[40..48].copy_from_slice(&header_len.to_be_bytes());
        h[HEADER_LEN..].copy_from_slice(name.as_bytes());
        blk.write(0, IoBuf::from_slice(&h), WriteFlags::default())
            .await?;
        let l1_len = (l1_entries * 8).next_multiple_of(SECTOR);
        let mut done = 0;
        while done < l1_len {
            let n = (l1_len - done).min(1 << 20);
            let zeroes = IoBuf::zeroed(n as usize);
            blk.write(header_len + done, zeroes, WriteFlags::default())
                .await?;
            done += n;
        }
        Ok(())
    }
}

/// Writes a new image into the open node `node`: the node's permissions
/// first, then the secret, then the image (QEMU: qcow_co_create).
async fn format_on(node: &Arc<Node>, img: &NewImage) -> Result<()> {
    let blk = super::super::creating_user(node)?;
    let r = async {
        if let Some(secret) = &img.key_secret {
            password(secret.as_deref(), "encrypt.")?;
        }
        img.write_to(&blk).await
    }
    .await;
    let c = blk.close().await;
    r.and(c)
}

/// The checks QEMU makes before it opens the file: a size, an encryption
/// format it knows (`qcow`, which qemu-img calls `aes`).
fn new_image(
    size: u64,
    backing: Option<String>,
    encrypt: Option<String>,
    key_secret: Option<String>,
) -> Result<NewImage> {
    if size == 0 {
        return Err(Error::invalid(
            "Image size is too small, cannot be zero length",
        ));
    }
    if encrypt.as_deref().is_some_and(|f| f != "qcow") {
        return Err(Error::invalid("Unsupported encryption format"));
    }
    Ok(NewImage {
        size,
        // QEMU's special name for a vvfat backing: no name is stored.
        backing: backing.filter(|b| b != "fat:"),
        key_secret: encrypt.map(|_| key_secret),
    })
}

/// `qemu-img create -f qcow`: options renamed and checked as QEMU's
/// qcow_co_create_opts does, the file made, then the image.
pub(super) async fn create(ctx: &OpenCtx, filename: &str, mut opts: Opts) -> Result<()> {
    let size = take_size(&mut opts, "size")?.unwrap_or(0);
    let backing = take_str(&mut opts, "backing_file")?;
    if let Some(f) = take_str(&mut opts, "backing_fmt")? {
        if ctx.registry.get(&f).is_none() {
            return Err(Error::invalid(format!("unrecognized backing format '{f}'")));
        }
    }
    // `encryption=on` means the qcow format; `off` is as if not given.
    let legacy = take_bool(&mut opts, "encryption")?.filter(|&on| on);
    let format = take_prefixed(&mut opts, "encrypt.", "format")?;
    let key_secret = take_prefixed(&mut opts, "encrypt.", "key-secret")?;
    if legacy.is_some() && format.is_some() {
        return Err(Error::invalid(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time",
        ));
    }
    let format = match (legacy, format.as_deref()) {
        (Some(_), _) | (None, Some("aes")) => Some("qcow".to_string()),
        _ => format,
    };
    let file = super::super::create_and_open_file(ctx, filename, opts).await?;
    let r = async {
        let format = match (format, &key_secret) {
            (None, Some(_)) => return Err(Error::invalid("Parameter 'encrypt.format' is missing")),
            // QEMU's visitor of the flattened options names no prefix.
            (Some(f), _) if f != "qcow" && f != "luks" => {
                return Err(Error::invalid(format!(
                    "Parameter 'format' does not accept value '{f}'"
                )))
            }
            (f, _) => f,
        };
        let img = new_image(size.next_multiple_of(SECTOR), backing, format, key_secret)?;
        format_on(&file, &img).await
    }
    .await;
    super::super::finish_created(file, r).await
}

/// The BlockdevCreateOptionsQcow of a `blockdev-create`, checked as far
/// as QEMU checks them before its first I/O.
fn qapi_image(opts: &mut Opts) -> Result<NewImage> {
    let size = take_size(opts, "size")?.unwrap_or(0);
    let backing = take_str(opts, "backing-file")?;
    let format = take_prefixed(opts, "encrypt.", "format")?;
    let key_secret = take_prefixed(opts, "encrypt.", "key-secret")?;
    new_image(size, backing, format, key_secret)
}

/// What fails before QEMU's job yields, and so before its answer.
pub(super) fn blockdev_create_check(opts: &Opts) -> Result<()> {
    qapi_image(&mut opts.clone()).map(|_| ())
}

/// BlockdevCreateOptionsQcow: `file`, `size`, `backing-file`, `encrypt`.
pub(super) async fn blockdev_create(ctx: &OpenCtx, mut opts: Opts) -> Result<()> {
    let img = qapi_image(&mut opts)?;
    let file = ctx
        .open_blockdev_ref(opts.remove("file").unwrap_or_default())
        .await?;
    let r = format_on(&file, &img).await;
    let _ = file.close().await;
    r
}
