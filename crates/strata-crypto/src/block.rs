//! An image's encryption once open (QEMU: QCryptoBlock): which scheme, and
//! the cipher for its payload sectors when the image was opened for I/O.

use crate::cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher};
use crate::luks::{Luks, SECTOR_SIZE};
use crate::{Error, Result};
use serde_json::{Map, Value};

/// Encryption works on whole sectors: anything else is a caller's bug,
/// refused rather than half encrypted.
fn whole_sectors(offset: u64, len: usize) -> Result<()> {
    if offset.is_multiple_of(SECTOR_SIZE) && (len as u64).is_multiple_of(SECTOR_SIZE) {
        Ok(())
    } else {
        Err(Error::new(format!(
            "Encryption needs whole {SECTOR_SIZE}-byte sectors, not {len} bytes at {offset}"
        )))
    }
}

enum Scheme {
    /// qcow's legacy AES-128-CBC, keyed by the password itself.
    Qcow,
    /// Behind a lock: amending key slots changes it while the image is open.
    Luks(Box<std::sync::Mutex<Luks>>),
}

/// An open encryption layer: encrypts and decrypts whole 512-byte sectors
/// of an image's payload.
pub struct BlockCrypto {
    scheme: Scheme,
    /// None when opened without I/O (`info` needs no key).
    cipher: Option<SectorCipher>,
    /// The secret the image was opened with (amend unlocks with it).
    secret: Option<String>,
}

impl BlockCrypto {
    /// qcow's AES: the key is the password's first 16 bytes, zero-padded
    /// (QEMU: qcrypto_block_qcow_init). No password: metadata only.
    pub fn qcow(password: Option<&[u8]>) -> Result<BlockCrypto> {
        let cipher = match password {
            Some(p) => {
                let mut key = [0u8; 16];
                let n = p.len().min(16);
                key[..n].copy_from_slice(&p[..n]);
                Some(SectorCipher::new(
                    CipherAlg::Aes128,
                    CipherMode::Cbc,
                    &key,
                    IvGenAlg::Plain64,
                    CipherAlg::Aes128,
                    None,
                )?)
            }
            None => None,
        };
        Ok(BlockCrypto {
            scheme: Scheme::Qcow,
            cipher,
            secret: None,
        })
    }

    /// LUKS with its master key (none: metadata only).
    pub fn luks(luks: Luks, master: Option<&[u8]>) -> Result<BlockCrypto> {
        let cipher = master.map(|k| luks.params.cipher(k)).transpose()?;
        Ok(BlockCrypto {
            scheme: Scheme::Luks(Box::new(std::sync::Mutex::new(luks))),
            cipher,
            secret: None,
        })
    }

    /// Requests must be whole sectors of this size.
    pub fn sector_size(&self) -> u64 {
        SECTOR_SIZE
    }

    /// True for LUKS, false for qcow's AES.
    pub fn is_luks(&self) -> bool {
        matches!(self.scheme, Scheme::Luks(_))
    }

    /// Remembers the secret the image was opened with.
    pub fn with_secret(mut self, id: Option<String>) -> BlockCrypto {
        self.secret = id;
        self
    }

    /// The secret the image was opened with.
    pub fn secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }

    /// A copy of the LUKS header, if that is the scheme.
    pub fn luks_header(&self) -> Option<Luks> {
        match &self.scheme {
            Scheme::Luks(l) => Some(l.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            Scheme::Qcow => None,
        }
    }

    /// Replaces the LUKS header after its key slots were changed on disk.
    pub fn set_luks_header(&self, new: Luks) {
        if let Scheme::Luks(l) = &self.scheme {
            *l.lock().unwrap_or_else(|p| p.into_inner()) = new;
        }
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher
            .as_ref()
            .ok_or_else(|| Error::new("The image was opened without its key"))
    }

    /// Encrypts `buf` in place; `offset` (a sector multiple) picks the IVs.
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        whole_sectors(offset, buf.len())?;
        self.cipher()?
            .encrypt(SECTOR_SIZE as usize, offset / SECTOR_SIZE, buf);
        Ok(())
    }

    /// Decrypts `buf` in place.
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        whole_sectors(offset, buf.len())?;
        self.cipher()?
            .decrypt(SECTOR_SIZE as usize, offset / SECTOR_SIZE, buf);
        Ok(())
    }

    /// QCryptoBlockInfo: `format` (`qcow` or `luks`) and the LUKS details.
    pub fn info(&self) -> Map<String, Value> {
        match &self.scheme {
            Scheme::Qcow => {
                let mut m = Map::new();
                m.insert("format".into(), "qcow".into());
                m
            }
            Scheme::Luks(l) => {
                let mut m = Map::new();
                m.insert("format".into(), "luks".into());
                m.extend(l.lock().unwrap_or_else(|p| p.into_inner()).info());
                m
            }
        }
    }
}
