//! Sector ciphers (QEMU: crypto/cipher.c, crypto/ivgen*.c and the sector
//! loop of crypto/block.c): AES in ECB, CBC or XTS mode, with the IV of
//! each 512-byte sector made by the plain, plain64 or ESSIV generator.

use crate::hash::HashAlg;
use crate::{Error, Result};
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256};

/// A cipher algorithm by QEMU's QCryptoCipherAlgo name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherAlg {
    Aes128,
    Aes192,
    Aes256,
}

impl CipherAlg {
    pub fn from_name(name: &str) -> Option<CipherAlg> {
        Some(match name {
            "aes-128" => CipherAlg::Aes128,
            "aes-192" => CipherAlg::Aes192,
            "aes-256" => CipherAlg::Aes256,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// Key bytes of one cipher (XTS takes two keys).
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    /// The AES variant whose key is `len` bytes.
    pub fn aes_with_key_len(len: usize) -> Option<CipherAlg> {
        [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256]
            .into_iter()
            .find(|a| a.key_len() == len)
    }
}

/// A block cipher mode by QEMU's QCryptoCipherMode name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherMode {
    Ecb,
    Cbc,
    Xts,
}

impl CipherMode {
    pub fn from_name(name: &str) -> Option<CipherMode> {
        Some(match name {
            "ecb" => CipherMode::Ecb,
            "cbc" => CipherMode::Cbc,
            "xts" => CipherMode::Xts,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
        }
    }
}

/// An IV generator by QEMU's QCryptoIVGenAlgo name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The sector number, 32 bits little-endian.
    Plain,
    /// The sector number, 64 bits little-endian.
    Plain64,
    /// The plain64 IV encrypted with a key hashed from the master key.
    Essiv,
}

impl IvGenAlg {
    pub fn from_name(name: &str) -> Option<IvGenAlg> {
        Some(match name {
            "plain" => IvGenAlg::Plain,
            "plain64" => IvGenAlg::Plain64,
            "essiv" => IvGenAlg::Essiv,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }
}

/// One keyed AES instance.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        let bad = |_| Error::new(format!("Invalid key length {}", key.len()));
        Ok(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).map_err(bad)?),
            24 => Aes::A192(Aes192::new_from_slice(key).map_err(bad)?),
            32 => Aes::A256(Aes256::new_from_slice(key).map_err(bad)?),
            n => return Err(Error::new(format!("Invalid key length {n}"))),
        })
    }

    fn encrypt(&self, blocks: &mut [Array<u8, aes::cipher::consts::U16>]) {
        match self {
            Aes::A128(c) => c.encrypt_blocks(blocks),
            Aes::A192(c) => c.encrypt_blocks(blocks),
            Aes::A256(c) => c.encrypt_blocks(blocks),
        }
    }

    fn decrypt(&self, blocks: &mut [Array<u8, aes::cipher::consts::U16>]) {
        match self {
            Aes::A128(c) => c.decrypt_blocks(blocks),
            Aes::A192(c) => c.decrypt_blocks(blocks),
            Aes::A256(c) => c.decrypt_blocks(blocks),
        }
    }
}

/// XTS (IEEE P1619) for sectors of whole blocks, so without ciphertext
/// stealing. Each run of blocks goes to AES in one call, where AES-NI and
/// VAES pipeline them; the xts-mode crate encrypted one block per call,
/// three times slower here.
struct Xts {
    data: Aes,
    tweak: Aes,
}

/// Blocks enciphered per call: 16 KiB of tweaks on the stack.
const XTS_RUN: usize = 1024;

impl Xts {
    /// Runs `cipher` (the data key's encrypt or decrypt) over the sectors
    /// of `buf`, each block whitened before and after with its tweak.
    fn crypt(
        &self,
        sector_size: usize,
        mut ivs: impl Iterator<Item = Block>,
        buf: &mut [u8],
        encrypt: bool,
    ) {
        let per_sector = sector_size / 16;
        let mut tweaks = [0u128; XTS_RUN];
        // Whole sectors per run; a sector larger than a run is cut in runs.
        let run_blocks = (XTS_RUN / per_sector).max(1) * per_sector.min(XTS_RUN);
        let mut t = 0u128;
        for (b, run) in as_blocks(buf).chunks_mut(run_blocks).enumerate() {
            for (i, tw) in tweaks[..run.len()].iter_mut().enumerate() {
                if (b * run_blocks + i).is_multiple_of(per_sector) {
                    let mut iv = ivs.next().unwrap_or_default();
                    self.tweak.encrypt(std::slice::from_mut(&mut iv));
                    t = u128::from_le_bytes(iv.into());
                } else {
                    // Multiplication by x in GF(2^128), little-endian.
                    t = (t << 1) ^ ((t >> 127) * 0x87);
                }
                *tw = t;
            }
            whiten(run, &tweaks);
            match encrypt {
                true => self.data.encrypt(run),
                false => self.data.decrypt(run),
            }
            whiten(run, &tweaks);
        }
    }
}

/// XORs each block with its tweak.
fn whiten(blocks: &mut [Block], tweaks: &[u128]) {
    for (b, t) in blocks.iter_mut().zip(tweaks) {
        let x = u128::from_le_bytes((*b).into()) ^ t;
        *b = x.to_le_bytes().into();
    }
}

/// The keyed mode.
enum Mode {
    Ecb(Aes),
    Cbc(Aes),
    Xts(Box<Xts>),
}

/// The keyed IV generator.
enum IvGen {
    Plain,
    Plain64,
    Essiv(Box<Aes>),
}

/// Encrypts and decrypts runs of sectors with one key.
pub struct SectorCipher {
    mode: Mode,
    ivgen: IvGen,
}

type Block = Array<u8, aes::cipher::consts::U16>;

fn as_blocks(buf: &mut [u8]) -> &mut [Block] {
    let (blocks, rest) = Block::slice_as_chunks_mut(buf);
    debug_assert!(rest.is_empty(), "sectors are whole cipher blocks");
    blocks
}

impl SectorCipher {
    /// Keys `alg` in `mode` with `key` (both halves for XTS); `ivgen_hash`
    /// and `ivgen_cipher` make the ESSIV key (QEMU: qcrypto_ivgen_new).
    pub fn new(
        alg: CipherAlg,
        mode: CipherMode,
        key: &[u8],
        ivgen: IvGenAlg,
        ivgen_cipher: CipherAlg,
        ivgen_hash: Option<HashAlg>,
    ) -> Result<SectorCipher> {
        let want = alg.key_len() * if mode == CipherMode::Xts { 2 } else { 1 };
        if key.len() != want {
            return Err(Error::new(format!(
                "Cipher key length {} should be {want}",
                key.len()
            )));
        }
        let mode = match mode {
            CipherMode::Ecb => Mode::Ecb(Aes::new(key)?),
            CipherMode::Cbc => Mode::Cbc(Aes::new(key)?),
            CipherMode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                Mode::Xts(Box::new(Xts {
                    data: Aes::new(k1)?,
                    tweak: Aes::new(k2)?,
                }))
            }
        };
        let ivgen = match ivgen {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let hash = ivgen_hash
                    .ok_or_else(|| Error::new("Missing IV generator hash specification"))?;
                let salt = hash.digest(&[key]);
                // The salt is cut to the ESSIV cipher's key length.
                let n = ivgen_cipher.key_len().min(salt.len());
                IvGen::Essiv(Box::new(Aes::new(&salt[..n])?))
            }
        };
        Ok(SectorCipher { mode, ivgen })
    }

    /// The IV (XTS: tweak) of `sector`.
    fn iv(&self, sector: u64) -> Block {
        let mut iv = Block::default();
        match &self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt(std::slice::from_mut(&mut iv));
            }
        }
        iv
    }

    /// The IVs of the sectors from `first`.
    fn ivs(&self, first: u64) -> impl Iterator<Item = Block> + '_ {
        (first..).map(|s| self.iv(s))
    }

    /// Encrypts `buf` (whole sectors of `sector_size`) in place; its first
    /// sector is number `first_sector`.
    pub fn encrypt(&self, sector_size: usize, first_sector: u64, buf: &mut [u8]) {
        let c = match &self.mode {
            Mode::Xts(x) => return x.crypt(sector_size, self.ivs(first_sector), buf, true),
            // ECB has no IV: every block at once.
            Mode::Ecb(c) => return c.encrypt(as_blocks(buf)),
            Mode::Cbc(c) => c,
        };
        for (sector, iv) in buf.chunks_mut(sector_size).zip(self.ivs(first_sector)) {
            let mut prev = iv;
            for b in as_blocks(sector) {
                for (x, p) in b.iter_mut().zip(prev.iter()) {
                    *x ^= p;
                }
                c.encrypt(std::slice::from_mut(b));
                prev = *b;
            }
        }
    }

    /// Decrypts `buf` in place, as `encrypt` made it.
    pub fn decrypt(&self, sector_size: usize, first_sector: u64, buf: &mut [u8]) {
        let c = match &self.mode {
            Mode::Xts(x) => return x.crypt(sector_size, self.ivs(first_sector), buf, false),
            Mode::Ecb(c) => return c.decrypt(as_blocks(buf)),
            Mode::Cbc(c) => c,
        };
        for (sector, iv) in buf.chunks_mut(sector_size).zip(self.ivs(first_sector)) {
            let blocks = as_blocks(sector);
            let cipher_text: Vec<Block> = blocks.to_vec();
            c.decrypt(blocks);
            for (j, b) in blocks.iter_mut().enumerate() {
                let prev = if j == 0 { &iv } else { &cipher_text[j - 1] };
                for (x, p) in b.iter_mut().zip(prev.iter()) {
                    *x ^= p;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_round_trips_and_changes_the_data() {
        for (alg, mode, ivgen) in [
            (CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Plain64),
            (CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64),
            (CipherAlg::Aes192, CipherMode::Xts, IvGenAlg::Plain),
            (CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv),
            (CipherAlg::Aes256, CipherMode::Ecb, IvGenAlg::Plain64),
        ] {
            let n = alg.key_len() * if mode == CipherMode::Xts { 2 } else { 1 };
            let key: Vec<u8> = (0..n as u8).collect();
            let c = SectorCipher::new(
                alg,
                mode,
                &key,
                ivgen,
                CipherAlg::Aes256,
                Some(HashAlg::Sha256),
            )
            .unwrap();
            let plain: Vec<u8> = (0..2048).map(|i| (i * 7) as u8).collect();
            let mut buf = plain.clone();
            c.encrypt(512, 9, &mut buf);
            assert_ne!(buf, plain);
            // Each sector's IV differs, so equal sectors encrypt differently
            // (except in ECB).
            c.decrypt(512, 9, &mut buf);
            assert_eq!(buf, plain, "{alg:?} {mode:?} {ivgen:?}");
        }
    }

    proptest::proptest! {
        /// The batched XTS gives what the xts-mode crate gives, sector by
        /// sector, for every AES size, sector size and first sector.
        #[test]
        fn xts_matches_the_reference_crate(
            key in proptest::collection::vec(proptest::num::u8::ANY, 64),
            size in 0usize..3,
            shift in 4u32..17,
            sectors in 1usize..6,
            first in proptest::num::u64::ANY,
            seed in proptest::num::u8::ANY,
        ) {
            let alg = [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256][size];
            let key = &key[..2 * alg.key_len()];
            let sector_size = 1usize << shift;
            let first = first % (u64::MAX - 8);
            let c = SectorCipher::new(alg, CipherMode::Xts, key, IvGenAlg::Plain64, alg, None)
                .unwrap();
            let plain: Vec<u8> = (0..sector_size * sectors)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect();
            let mut ours = plain.clone();
            c.encrypt(sector_size, first, &mut ours);
            let (k1, k2) = key.split_at(alg.key_len());
            let mut theirs = plain.clone();
            reference_xts(alg, k1, k2, sector_size, first, &mut theirs, true);
            proptest::prop_assert_eq!(&ours, &theirs);
            c.decrypt(sector_size, first, &mut ours);
            proptest::prop_assert_eq!(&ours, &plain);
            reference_xts(alg, k1, k2, sector_size, first, &mut theirs, false);
            proptest::prop_assert_eq!(theirs, plain);
        }
    }

    /// The xts-mode crate over `buf`, sector by sector, plain64 tweaks.
    fn reference_xts(
        alg: CipherAlg,
        k1: &[u8],
        k2: &[u8],
        sector_size: usize,
        first: u64,
        buf: &mut [u8],
        encrypt: bool,
    ) {
        macro_rules! run {
            ($c:ty) => {{
                let x = xts_mode::Xts128::new(
                    <$c>::new_from_slice(k1).unwrap(),
                    <$c>::new_from_slice(k2).unwrap(),
                );
                for (i, sector) in buf.chunks_mut(sector_size).enumerate() {
                    let mut iv = Block::default();
                    iv[..8].copy_from_slice(&(first + i as u64).to_le_bytes());
                    match encrypt {
                        true => x.encrypt_sector(sector, iv),
                        false => x.decrypt_sector(sector, iv),
                    }
                }
            }};
        }
        match alg {
            CipherAlg::Aes128 => run!(Aes128),
            CipherAlg::Aes192 => run!(Aes192),
            CipherAlg::Aes256 => run!(Aes256),
        }
    }

    #[test]
    fn xts_plain64_matches_ieee_1619_vector_2() {
        // IEEE P1619 XTS-AES-128 vector 2: key1 = 11.., key2 = 22..,
        // data unit 0x3333333333, plaintext 44...
        let mut key = vec![0x11u8; 16];
        key.extend([0x22u8; 16]);
        let c = SectorCipher::new(
            CipherAlg::Aes128,
            CipherMode::Xts,
            &key,
            IvGenAlg::Plain64,
            CipherAlg::Aes128,
            None,
        )
        .unwrap();
        let mut buf = vec![0x44u8; 32];
        c.encrypt(32, 0x3333333333, &mut buf);
        assert_eq!(
            buf,
            [
                0xc4, 0x54, 0x18, 0x5e, 0x6a, 0x16, 0x93, 0x6e, 0x39, 0x33, 0x40, 0x38, 0xac, 0xef,
                0x83, 0x8b, 0xfb, 0x18, 0x6f, 0xff, 0x74, 0x80, 0xad, 0xc4, 0x28, 0x93, 0x82, 0xec,
                0xd6, 0xd3, 0x94, 0xf0
            ]
        );
    }
}
