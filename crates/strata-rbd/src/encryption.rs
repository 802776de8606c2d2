//! librbd's own encryption (QEMU: qemu_rbd_encryption_format and
//! qemu_rbd_encryption_load): a LUKS1 or LUKS2 header at the start of the
//! image, written and read by librbd, which then encrypts every request.
//! The guest sees the image without its header.

use crate::conn::errno_msg;
use crate::ffi::{self, Image, Lib, LuksOptions};
use serde_json::Value;
use strata_block::options::{take_str, Opts};
use strata_block::{Error, Result};

/// RbdImageEncryptionFormat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Luks,
    Luks2,
    /// Either, whichever the header is (open only).
    LuksAny,
}

impl Format {
    fn parse(s: &str, key: &str) -> Result<Format> {
        match s {
            "luks" => Ok(Format::Luks),
            "luks2" => Ok(Format::Luks2),
            "luks-any" => Ok(Format::LuksAny),
            _ => Err(Error::invalid(format!(
                "Parameter '{key}' does not accept value '{s}'"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Luks => "luks",
            Format::Luks2 => "luks2",
            Format::LuksAny => "luks-any",
        }
    }

    /// The QAPI enum's index, which QEMU prints for a format it lacks.
    fn index(self) -> u32 {
        self as u32
    }
}

/// The header magics QEMU's `info` looks for (a clone formatted apart
/// from its parent starts with RBDL instead of LUKS).
const MAGICS: &[(&[u8; 8], Format)] = &[
    (b"LUKS\xba\xbe\x00\x01", Format::Luks),
    (b"LUKS\xba\xbe\x00\x02", Format::Luks2),
    (b"RBDL\xba\xbe\x00\x01", Format::Luks),
    (b"RBDL\xba\xbe\x00\x02", Format::Luks2),
];

/// The format whose header `image` starts with, as read through `image`
/// (QEMU: qemu_rbd_get_specific_info): with encryption loaded, that is
/// the guest's data, which is not a header.
pub fn probe(lib: &Lib, image: Image) -> Result<Option<Format>> {
    let mut buf = [0u8; 8];
    // SAFETY: the image is open; the buffer holds the 8 bytes asked for.
    let r = unsafe { (lib.rbd_read)(image, 0, buf.len(), buf.as_mut_ptr().cast()) };
    if r < 0 {
        let e = -(r as i32);
        return Err(Error::msg(
            e,
            format!(
                "cannot read image start for probe: {}",
                strata_block::error::strerror(e)
            ),
        ));
    }
    Ok(MAGICS.iter().find(|(m, _)| **m == buf).map(|&(_, f)| f))
}

/// Takes group `name` (`encrypt`) out of `opts`, nested or as dotted keys.
fn take_group(opts: &mut Opts, name: &str) -> Result<Option<Opts>> {
    let mut group = match opts.remove(name) {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            return Err(Error::invalid(format!(
                "Invalid parameter type for '{name}', expected: object"
            )))
        }
    };
    let prefix = format!("{name}.");
    let dotted: Vec<String> = opts
        .keys()
        .filter(|k| k.starts_with(&prefix))
        .cloned()
        .collect();
    for k in dotted {
        let v = opts.remove(&k).unwrap_or_default();
        group
            .get_or_insert_with(Opts::new)
            .insert(k[prefix.len()..].to_string(), v);
    }
    Ok(group)
}

/// The secret `key-secret` names, read now: nothing is made or opened
/// before it is known to exist.
fn take_passphrase(g: &mut Opts, prefix: &str) -> Result<Vec<u8>> {
    let id = take_str(g, "key-secret")?
        .ok_or_else(|| Error::invalid(format!("Parameter '{prefix}key-secret' is missing")))?;
    strata_crypto::secret::lookup(&id).map_err(|e| Error::invalid(e.to_string()))
}

fn reject_rest(g: &Opts, prefix: &str) -> Result<()> {
    match g.keys().next() {
        Some(k) => Err(Error::invalid(format!(
            "Parameter '{prefix}{k}' is unexpected"
        ))),
        None => Ok(()),
    }
}

/// `encrypt` of an image being opened (RbdEncryptionOptions).
pub struct Load {
    format: Format,
    passphrase: Vec<u8>,
}

impl Load {
    /// Takes `encrypt` from the open options; None when absent.
    pub fn take(opts: &mut Opts) -> Result<Option<Load>> {
        let Some(mut g) = take_group(opts, "encrypt")? else {
            return Ok(None);
        };
        let format = take_str(&mut g, "format")?
            .ok_or_else(|| Error::invalid("Parameter 'encrypt.format' is missing"))?;
        let format = Format::parse(&format, "encrypt.format")?;
        if take_group(&mut g, "parent")?.is_some() {
            // Layered encryption needs rbd_encryption_load2 (Ceph 17.2.6);
            // QEMU built against older librbd refuses it the same way.
            return Err(Error::unsupported(
                "RBD library does not support layered encryption",
            ));
        }
        let passphrase = take_passphrase(&mut g, "encrypt.")?;
        reject_rest(&g, "encrypt.")?;
        Ok(Some(Load { format, passphrase }))
    }

    /// Loads the encryption onto the open image: from here on librbd
    /// decrypts what is read and encrypts what is written.
    pub fn apply(&self, lib: &Lib, image: Image) -> Result<()> {
        let load = lib
            .rbd_encryption_load
            .ok_or_else(|| Error::unsupported("RBD library does not support image encryption"))?;
        // librbd 16 has no "either" format: the header says which.
        let format = match self.format {
            Format::LuksAny => probe(lib, image)?.unwrap_or(Format::Luks),
            f => f,
        };
        let mut o = luks_options(ffi::RBD_ENCRYPTION_ALGORITHM_AES256, &self.passphrase);
        // SAFETY: the image is open; the options and the passphrase they
        // point to outlive the call, which copies what it keeps.
        let r = unsafe {
            load(
                image,
                lib_format(format),
                (&mut o as *mut LuksOptions).cast(),
                std::mem::size_of::<LuksOptions>(),
            )
        };
        if r < 0 {
            return Err(errno_msg(r, "encryption load fail"));
        }
        Ok(())
    }
}

/// `encrypt` of an image being made (RbdEncryptionCreateOptions).
pub struct Create {
    format: Format,
    alg: std::ffi::c_int,
    passphrase: Vec<u8>,
}

/// QCryptoCipherAlgo, in QAPI order.
const CIPHER_ALGS: &[&str] = &[
    "aes-128",
    "aes-192",
    "aes-256",
    "des",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
    "sm4",
];

impl Create {
    /// Takes `encrypt` from the create options: `encrypt.format=...` from
    /// `-o`, or an `encrypt` object from `blockdev-create`. QEMU's -o path
    /// names the fields without the group, as its visitor starts there.
    pub fn take(opts: &mut Opts) -> Result<Option<Create>> {
        let Some(mut g) = take_group(opts, "encrypt")? else {
            return Ok(None);
        };
        let format = take_str(&mut g, "format")?
            .ok_or_else(|| Error::invalid("Parameter 'format' is missing"))?;
        let format = Format::parse(&format, "format")?;
        let alg = match take_str(&mut g, "cipher-alg")? {
            None => ffi::RBD_ENCRYPTION_ALGORITHM_AES256,
            Some(a) => match CIPHER_ALGS.iter().position(|n| *n == a) {
                Some(0) => ffi::RBD_ENCRYPTION_ALGORITHM_AES128,
                Some(2) => ffi::RBD_ENCRYPTION_ALGORITHM_AES256,
                Some(i) => {
                    return Err(errno_msg(
                        -libc::ENOTSUP,
                        format!("unknown encryption algorithm: {i}"),
                    ))
                }
                None => {
                    return Err(Error::invalid(format!(
                        "Parameter 'cipher-alg' does not accept value '{a}'"
                    )))
                }
            },
        };
        if format == Format::LuksAny {
            // A union branch QEMU's create options do not have.
            return Err(errno_msg(
                -libc::ENOTSUP,
                format!("unknown image encryption format: {}", format.index()),
            ));
        }
        let passphrase = take_passphrase(&mut g, "")?;
        reject_rest(&g, "")?;
        Ok(Some(Create {
            format,
            alg,
            passphrase,
        }))
    }

    /// Room made for the header before formatting: LUKS2's is 16 MiB in
    /// librbd, LUKS1's one object. QEMU makes none, so an image smaller
    /// than its header cannot be encrypted there.
    pub fn headroom(object_size: u64) -> u64 {
        object_size.max(16 << 20)
    }

    /// Writes the header onto a new image made `headroom` larger than
    /// `want`, then sizes the image so the guest sees `want`.
    pub fn apply(&self, lib: &Lib, image: Image, want: u64) -> Result<()> {
        let format_fn = lib
            .rbd_encryption_format
            .ok_or_else(|| Error::unsupported("RBD library does not support image encryption"))?;
        let size = |what: &str| {
            let mut n = 0u64;
            // SAFETY: the image is open; the out pointer is valid.
            let r = unsafe { (lib.rbd_get_size)(image, &mut n) };
            if r < 0 {
                return Err(errno_msg(r, what));
            }
            Ok(n)
        };
        let resize = |to: u64| {
            // SAFETY: the image is open.
            let r = unsafe { (lib.rbd_resize)(image, to) };
            if r < 0 {
                return Err(errno_msg(r, "cannot resize image after format"));
            }
            Ok(())
        };
        let raw = size("cannot get raw image size")?;
        let mut o = luks_options(self.alg, &self.passphrase);
        // SAFETY: as for loading.
        let r = unsafe {
            format_fn(
                image,
                lib_format(self.format),
                (&mut o as *mut LuksOptions).cast(),
                std::mem::size_of::<LuksOptions>(),
            )
        };
        if r < 0 {
            return Err(errno_msg(r, "encryption format fail"));
        }
        let header = raw - size("cannot get effective image size")?.min(raw);
        // librbd 16 resizes the whole image, header included; should a
        // later one take the guest's size, the second call sets that.
        resize(want + header)?;
        if size("cannot get effective image size")? != want {
            resize(want)?;
        }
        Ok(())
    }
}

fn lib_format(f: Format) -> std::ffi::c_int {
    match f {
        Format::Luks2 => ffi::RBD_ENCRYPTION_FORMAT_LUKS2,
        _ => ffi::RBD_ENCRYPTION_FORMAT_LUKS1,
    }
}

fn luks_options(alg: std::ffi::c_int, passphrase: &[u8]) -> LuksOptions {
    LuksOptions {
        alg,
        passphrase: passphrase.as_ptr().cast(),
        passphrase_size: passphrase.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: Value) -> Opts {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn create_options_flat_or_nested_with_qemus_errors() {
        let err = |v: Value| Create::take(&mut opts(v)).err().unwrap().to_string();
        assert!(Create::take(&mut opts(serde_json::json!({"size": 1})))
            .unwrap()
            .is_none());
        assert_eq!(
            err(serde_json::json!({"encrypt.key-secret": "s"})),
            "Parameter 'format' is missing"
        );
        assert_eq!(
            err(serde_json::json!({"encrypt": {"format": "luks3"}})),
            "Parameter 'format' does not accept value 'luks3'"
        );
        assert_eq!(
            err(serde_json::json!({"encrypt.format": "luks", "encrypt.cipher-alg": "aes-192"})),
            "unknown encryption algorithm: 1: Operation not supported"
        );
        assert_eq!(
            err(serde_json::json!({"encrypt.format": "luks-any", "encrypt.key-secret": "s"})),
            "unknown image encryption format: 2: Operation not supported"
        );
        assert_eq!(
            err(serde_json::json!({"encrypt.format": "luks2"})),
            "Parameter 'key-secret' is missing"
        );
    }

    #[test]
    fn open_options_with_qemus_errors() {
        let err = |v: Value| Load::take(&mut opts(v)).err().unwrap().to_string();
        assert_eq!(
            err(serde_json::json!({"encrypt": {"key-secret": "s"}})),
            "Parameter 'encrypt.format' is missing"
        );
        assert_eq!(
            err(serde_json::json!({"encrypt.format": "luks", "encrypt.parent.format": "luks"})),
            "RBD library does not support layered encryption"
        );
        assert_eq!(
            err(serde_json::json!({"encrypt": {"format": "luks2"}})),
            "Parameter 'encrypt.key-secret' is missing"
        );
    }
}
