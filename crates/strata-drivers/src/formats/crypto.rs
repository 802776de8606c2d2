//! What the encrypted formats (qcow2, luks) share: their `encrypt.*` /
//! LUKS options, the secret lookup, and reading and writing a LUKS header
//! region through a node (QEMU: block/crypto.c's helpers).

use std::sync::Arc;
use strata_block::options::{take_str, take_u64, OptSpec, OptType, Opts};
use strata_block::{Error, IoBuf, Node, Result, WriteFlags};
use strata_crypto::luks::{CreateOptions, Luks, HEADER_LEN, NUM_SLOTS};
use strata_crypto::luks_amend::AmendOptions;
use strata_crypto::{secret, BlockCrypto, CipherAlg, CipherMode, HashAlg, IvGenAlg};

/// A crypto error as a block error (EINVAL with QEMU's message).
pub(crate) fn crypto_err(e: strata_crypto::Error) -> Error {
    Error::invalid(e.0)
}

/// Takes `prefix` + `key` from the options, flat (`encrypt.key-secret`) or
/// nested (`"encrypt": {"key-secret": ...}`).
pub(crate) fn take_prefixed(opts: &mut Opts, prefix: &str, key: &str) -> Result<Option<String>> {
    if let Some(v) = take_str(opts, &format!("{prefix}{key}"))? {
        return Ok(Some(v));
    }
    let Some(group) = prefix.strip_suffix('.') else {
        return Ok(None);
    };
    match opts.get_mut(group) {
        Some(serde_json::Value::Object(sub)) => {
            let v = take_str(sub, key)?;
            if sub.is_empty() {
                opts.remove(group);
            }
            Ok(v)
        }
        _ => Ok(None),
    }
}

/// The password a `key-secret` names; QEMU's error when none is named.
pub(crate) fn password(key_secret: Option<&str>, prefix: &str) -> Result<Vec<u8>> {
    let id = key_secret.ok_or_else(|| {
        Error::invalid(format!(
            "Parameter '{prefix}key-secret' is required for cipher"
        ))
    })?;
    Ok(secret::lookup_utf8(id).map_err(crypto_err)?.into_bytes())
}

/// The LUKS creation options of a standalone `luks` image, in QEMU's order.
pub(crate) const LUKS_CREATE_OPTIONS: &[OptSpec] = &[
    OptSpec {
        name: "size",
        ty: OptType::Size,
        help: "Virtual disk size",
        default: None,
    },
    OptSpec {
        name: "key-secret",
        ty: OptType::Str,
        help: "ID of the secret that provides the keyslot passphrase",
        default: None,
    },
    OptSpec {
        name: "cipher-alg",
        ty: OptType::Str,
        help: "Name of encryption cipher algorithm",
        default: None,
    },
    OptSpec {
        name: "cipher-mode",
        ty: OptType::Str,
        help: "Name of encryption cipher mode",
        default: None,
    },
    OptSpec {
        name: "ivgen-alg",
        ty: OptType::Str,
        help: "Name of IV generator algorithm",
        default: None,
    },
    OptSpec {
        name: "ivgen-hash-alg",
        ty: OptType::Str,
        help: "Name of IV generator hash algorithm",
        default: None,
    },
    OptSpec {
        name: "hash-alg",
        ty: OptType::Str,
        help: "Name of encryption hash algorithm",
        default: None,
    },
    OptSpec {
        name: "iter-time",
        ty: OptType::Number,
        help: "Time to spend in PBKDF in milliseconds",
        default: None,
    },
    OptSpec {
        name: "detached-header",
        ty: OptType::Bool,
        help: "Create a detached LUKS header",
        default: None,
    },
];

/// The options amend takes for a standalone `luks` image (QEMU's
/// block_crypto_amend_opts_luks).
pub(crate) const LUKS_AMEND_OPTIONS: &[OptSpec] = &[
    OptSpec {
        name: "state",
        ty: OptType::Str,
        help: "Select new state of affected keyslots (active/inactive)",
        default: None,
    },
    OptSpec {
        name: "keyslot",
        ty: OptType::Number,
        help: "Select a single keyslot to modify explicitly",
        default: None,
    },
    OptSpec {
        name: "old-secret",
        ty: OptType::Str,
        help: "Select all keyslots that match this password",
        default: None,
    },
    OptSpec {
        name: "new-secret",
        ty: OptType::Str,
        help: "New secret to set in the matching keyslots. Empty string to erase",
        default: None,
    },
    OptSpec {
        name: "iter-time",
        ty: OptType::Number,
        help: "Time to spend in PBKDF in milliseconds",
        default: None,
    },
];

/// Takes the LUKS creation options under `prefix` (`encrypt.` in qcow2).
pub(crate) fn take_luks_create(opts: &mut Opts, prefix: &str) -> Result<CreateOptions> {
    fn named<T>(
        opts: &mut Opts,
        prefix: &str,
        key: &str,
        parse: fn(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        match take_prefixed(opts, prefix, key)? {
            None => Ok(None),
            Some(v) => parse(&v).map(Some).ok_or_else(|| {
                Error::invalid(format!(
                    "Parameter '{prefix}{key}' does not accept value '{v}'"
                ))
            }),
        }
    }
    let mut o = CreateOptions::default();
    if let Some(v) = take_prefixed(opts, prefix, "cipher-alg")? {
        o.cipher_alg = match CipherAlg::from_name(&v) {
            Some(a) => a,
            // QAPI knows these, QEMU's LUKS cipher maps do not.
            None if ["des", "3des", "sm4"].contains(&v.as_str()) => {
                return Err(Error::invalid(format!("Algorithm '{v}' not supported")))
            }
            None => {
                return Err(Error::invalid(format!(
                    "Parameter '{prefix}cipher-alg' does not accept value '{v}'"
                )))
            }
        };
    }
    if let Some(m) = named(opts, prefix, "cipher-mode", CipherMode::from_name)? {
        o.cipher_mode = m;
    }
    if let Some(g) = named(opts, prefix, "ivgen-alg", IvGenAlg::from_name)? {
        o.ivgen_alg = g;
    }
    o.ivgen_hash = named(opts, prefix, "ivgen-hash-alg", HashAlg::from_name)?;
    if let Some(h) = named(opts, prefix, "hash-alg", HashAlg::from_name)? {
        o.hash_alg = h;
    }
    let iter_key = format!("{prefix}iter-time");
    if let Some(t) = take_u64(opts, &iter_key)? {
        o.iter_time_ms = t;
    }
    Ok(o)
}

/// Reads `len` bytes at `off` of the header region at `base`, which spans
/// at most `limit` bytes (QEMU: qcow2_crypto_hdr_read_func).
async fn read_region(
    file: &Arc<Node>,
    base: u64,
    limit: u64,
    off: u64,
    len: usize,
) -> Result<IoBuf> {
    if off + len as u64 > limit {
        return Err(Error::invalid(
            "Request for data outside of extension header",
        ));
    }
    file.read(base + off, IoBuf::zeroed(len))
        .await
        .map_err(|e| e.context("Could not read encryption header"))
}

/// Opens the LUKS header `base` bytes into `file`, whose region may span
/// at most `limit` bytes; unlocks it with `password` unless there is none
/// (opened for metadata only).
pub(crate) async fn open_luks(
    file: &Arc<Node>,
    base: u64,
    limit: u64,
    password: Option<&[u8]>,
    detached: bool,
) -> Result<BlockCrypto> {
    let hdr = read_region(file, base, limit, 0, HEADER_LEN).await?;
    let luks = Luks::open(hdr.as_slice(), detached).map_err(crypto_err)?;
    let Some(password) = password else {
        return BlockCrypto::luks(luks, None).map_err(crypto_err);
    };
    let materials = read_materials(file, base, limit, &luks).await?;
    // Key derivation takes its iter-time (2 s by default) per slot tried:
    // off the event loop, which serves every other node and monitor.
    let (password, header) = (password.to_vec(), luks.clone());
    let master = strata_block::engine::off_loop(move || header.unlock(&password, &materials))
        .await?
        .map_err(crypto_err)?;
    BlockCrypto::luks(luks, Some(&master)).map_err(crypto_err)
}

/// Reads the key material of every active slot.
async fn read_materials(
    file: &Arc<Node>,
    base: u64,
    limit: u64,
    luks: &Luks,
) -> Result<Vec<Vec<u8>>> {
    let mut materials = Vec::with_capacity(NUM_SLOTS);
    for i in 0..NUM_SLOTS {
        materials.push(match luks.material_range(i) {
            Some((off, len)) => read_region(file, base, limit, off, len)
                .await?
                .as_slice()
                .to_vec(),
            None => Vec::new(),
        });
    }
    Ok(materials)
}

/// The key slot options of amend under `prefix`
/// (QCryptoBlockAmendOptionsLUKS).
pub(crate) fn take_luks_amend(opts: &mut Opts, prefix: &str) -> Result<AmendOptions> {
    let active = match take_prefixed(opts, prefix, "state")?.as_deref() {
        Some("active") => true,
        Some("inactive") => false,
        Some(v) => {
            return Err(Error::invalid(format!(
                "Parameter '{prefix}state' does not accept value '{v}'"
            )))
        }
        None => {
            return Err(Error::invalid(format!(
                "Parameter '{prefix}state' is missing"
            )))
        }
    };
    Ok(AmendOptions {
        active,
        new_secret: take_prefixed(opts, prefix, "new-secret")?,
        old_secret: take_prefixed(opts, prefix, "old-secret")?,
        keyslot: take_u64(opts, &format!("{prefix}keyslot"))?.map(|k| k as i64),
        iter_time_ms: take_u64(opts, &format!("{prefix}iter-time"))?,
        secret: take_prefixed(opts, prefix, "secret")?,
    })
}

/// Changes the key slots of the LUKS header at `base` (region of at most
/// `limit` bytes) as `o` asks; the open image keeps its master key.
pub(crate) async fn amend_luks(
    file: &Arc<Node>,
    base: u64,
    limit: u64,
    crypto: &BlockCrypto,
    o: &AmendOptions,
    force: bool,
) -> Result<()> {
    let mut luks = crypto
        .luks_header()
        .ok_or_else(|| Error::unsupported("Only LUKS encryption options can be amended"))?;
    let materials = read_materials(file, base, limit, &luks).await?;
    let writes = luks
        .amend(o, force, crypto.secret(), &materials)
        .map_err(crypto_err)?;
    write_region(file, base, writes).await?;
    file.flush().await?;
    crypto.set_luks_header(luks);
    Ok(())
}

/// Writes LUKS header changes (`writes` relative to the region) at `base`.
pub(crate) async fn write_region(
    file: &Arc<Node>,
    base: u64,
    writes: Vec<(u64, Vec<u8>)>,
) -> Result<()> {
    for (off, bytes) in writes {
        file.write(base + off, IoBuf::from_slice(&bytes), WriteFlags::default())
            .await
            .map_err(|e| e.context("Could not write encryption header"))?;
    }
    Ok(())
}
