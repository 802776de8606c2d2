//! Disk encryption as QEMU's crypto/ layer has it: secrets (`--object
//! secret`), the sector ciphers with their IV generators, PBKDF2 and the
//! anti-forensic splitter, LUKS1 headers and key slots, and qcow's legacy AES.
//!
//! Nothing here does I/O: a format reads the header region, hands it over,
//! and writes back the bytes it is given. `BlockCrypto` is what stays open:
//! it encrypts and decrypts whole sectors of a request.

mod afsplit;
mod block;
mod cipher;
mod hash;
pub mod luks;
pub mod luks_amend;
pub mod secret;

pub use block::BlockCrypto;
pub use cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher};
pub use hash::HashAlg;

/// A crypto failure, with QEMU's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

impl Error {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Fills `buf` from the kernel's random source.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::new(format!("Unable to read random bytes: {e}")))
}
