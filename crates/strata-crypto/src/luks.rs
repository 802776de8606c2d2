//! LUKS1 (QEMU: crypto/block-luks.c): the 592-byte header, its eight key
//! slots, the checks QEMU makes on them, unlocking the master key with a
//! password, and making a new header.
//!
//! The header region (header, then each slot's key material) is read and
//! written by the caller: `unlock` takes it as bytes, and every change
//! comes back as the writes to make, relative to the region's start.

use crate::afsplit;
use crate::cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher};
use crate::hash::HashAlg;
use crate::{random_bytes, Error, Result};
use serde_json::{json, Map, Value};

/// LUKS works on 512-byte sectors, for its key material and its payload.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the header with its slot headers.
pub const HEADER_LEN: usize = 592;
const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
pub const NUM_SLOTS: usize = 8;
const STRIPES: u32 = 4000;
const SALT_LEN: usize = 32;
const DIGEST_LEN: usize = 20;
const MIN_ITERS: u64 = 1000;
/// Key material starts after this many bytes.
const KEY_SLOT_OFFSET: u64 = 4096;
const SLOT_ENABLED: u32 = 0x00AC71F3;
const SLOT_DISABLED: u32 = 0x0000DEAD;
/// How often an erased slot's material is overwritten with random bytes.
const ERASE_ITERATIONS: usize = 40;
/// PBKDF time when none is asked for (ms).
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;

/// One key slot's header.
#[derive(Clone, Debug, Default)]
pub struct KeySlot {
    pub active: u32,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    pub key_offset_sector: u32,
    pub stripes: u32,
}

impl KeySlot {
    pub fn is_active(&self) -> bool {
        self.active == SLOT_ENABLED
    }
}

/// The header as stored (big-endian fields, NUL-padded strings).
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u16,
    pub cipher_name: [u8; 32],
    pub cipher_mode: [u8; 32],
    pub hash_spec: [u8; 32],
    pub payload_offset_sector: u32,
    pub master_key_len: u32,
    pub master_key_digest: [u8; DIGEST_LEN],
    pub master_key_salt: [u8; SALT_LEN],
    pub master_key_iterations: u32,
    pub uuid: [u8; 40],
    pub slots: [KeySlot; NUM_SLOTS],
    magic: [u8; 6],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// A NUL-terminated field as text (up to the NUL).
fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn set_cstr(field: &mut [u8], s: &str) {
    field.fill(0);
    field[..s.len()].copy_from_slice(s.as_bytes());
}

impl Header {
    /// Reads the raw header; `check` says whether it makes sense.
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_LEN {
            return Err(Error::new("Volume is not in LUKS format"));
        }
        let arr = |at: usize, n: usize| b[at..at + n].to_vec();
        let mut slots: [KeySlot; NUM_SLOTS] = Default::default();
        for (i, s) in slots.iter_mut().enumerate() {
            let at = 208 + i * 48;
            s.active = be32(b, at);
            s.iterations = be32(b, at + 4);
            s.salt.copy_from_slice(&b[at + 8..at + 40]);
            s.key_offset_sector = be32(b, at + 40);
            s.stripes = be32(b, at + 44);
        }
        Ok(Header {
            magic: arr(0, 6).try_into().unwrap(),
            version: u16::from_be_bytes([b[6], b[7]]),
            cipher_name: arr(8, 32).try_into().unwrap(),
            cipher_mode: arr(40, 32).try_into().unwrap(),
            hash_spec: arr(72, 32).try_into().unwrap(),
            payload_offset_sector: be32(b, 104),
            master_key_len: be32(b, 108),
            master_key_digest: arr(112, 20).try_into().unwrap(),
            master_key_salt: arr(132, 32).try_into().unwrap(),
            master_key_iterations: be32(b, 164),
            uuid: arr(168, 40).try_into().unwrap(),
            slots,
        })
    }

    /// The header as stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN);
        b.extend_from_slice(&self.magic);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.cipher_name);
        b.extend_from_slice(&self.cipher_mode);
        b.extend_from_slice(&self.hash_spec);
        b.extend_from_slice(&self.payload_offset_sector.to_be_bytes());
        b.extend_from_slice(&self.master_key_len.to_be_bytes());
        b.extend_from_slice(&self.master_key_digest);
        b.extend_from_slice(&self.master_key_salt);
        b.extend_from_slice(&self.master_key_iterations.to_be_bytes());
        b.extend_from_slice(&self.uuid);
        for s in &self.slots {
            b.extend_from_slice(&s.active.to_be_bytes());
            b.extend_from_slice(&s.iterations.to_be_bytes());
            b.extend_from_slice(&s.salt);
            b.extend_from_slice(&s.key_offset_sector.to_be_bytes());
            b.extend_from_slice(&s.stripes.to_be_bytes());
        }
        debug_assert_eq!(b.len(), HEADER_LEN);
        b
    }

    /// Sectors of one slot's key material with `stripes`, rounded as
    /// cryptsetup rounds them (to the header's size in sectors).
    fn split_key_sectors(&self, stripes: u32) -> u64 {
        let header_sectors = KEY_SLOT_OFFSET / SECTOR_SIZE;
        let bytes = self.master_key_len as u64 * stripes as u64;
        bytes.div_ceil(SECTOR_SIZE).div_ceil(header_sectors) * header_sectors
    }

    /// QEMU's sanity checks (qcrypto_block_luks_check_header).
    fn check(&self, detached: bool) -> Result<()> {
        let e = |m: String| Err(Error::new(m));
        if self.magic != MAGIC {
            return e("Volume is not in LUKS format".into());
        }
        if self.version != 1 {
            return e(format!("LUKS version {} is not supported", self.version));
        }
        for (f, what) in [
            (&self.cipher_name, "cipher name"),
            (&self.cipher_mode, "cipher mode"),
            (&self.hash_spec, "hash spec"),
        ] {
            if !f.contains(&0) {
                return e(format!("LUKS header {what} is not NUL terminated"));
            }
        }
        let header_sectors = KEY_SLOT_OFFSET / SECTOR_SIZE;
        if !detached && (self.payload_offset_sector as u64) < header_sectors {
            return e("LUKS payload is overlapping with the header".into());
        }
        if self.master_key_iterations == 0 {
            return e("LUKS key iteration count is zero".into());
        }
        for (i, s) in self.slots.iter().enumerate() {
            let start = s.key_offset_sector as u64;
            let len = self.split_key_sectors(s.stripes);
            if s.stripes != STRIPES {
                return e(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    s.stripes as i32
                ));
            }
            if s.active != SLOT_DISABLED && s.active != SLOT_ENABLED {
                return e(format!("Keyslot {i} state (active/disable) is corrupted"));
            }
            if s.active == SLOT_ENABLED && s.iterations == 0 {
                return e(format!("Keyslot {i} iteration count is zero"));
            }
            if start < header_sectors {
                return e(format!("Keyslot {i} is overlapping with the LUKS header"));
            }
            if !detached && start + len > self.payload_offset_sector as u64 {
                return e(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                ));
            }
            for (j, s2) in self.slots.iter().enumerate().skip(i + 1) {
                let start2 = s2.key_offset_sector as u64;
                let len2 = self.split_key_sectors(s2.stripes);
                if start < start2 + len2 && start2 < start + len {
                    return e(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What a header's strings name (QEMU: qcrypto_block_luks_parse_header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub cipher_alg: CipherAlg,
    pub cipher_mode: CipherMode,
    pub ivgen_alg: IvGenAlg,
    pub ivgen_hash: Option<HashAlg>,
    pub ivgen_cipher: CipherAlg,
    pub hash_alg: HashAlg,
}

/// The cipher ESSIV runs: the same family keyed by the hash's digest
/// length, as dm-crypt does (QEMU: qcrypto_block_luks_essiv_cipher).
fn essiv_cipher(cipher: CipherAlg, hash: HashAlg) -> Result<CipherAlg> {
    if hash.digest_len() == cipher.key_len() {
        return Ok(cipher);
    }
    let family = match cipher.family() {
        "aes" => "AES",
        "serpent" => "Serpent",
        "twofish" => "Twofish",
        _ => {
            return Err(Error::new(format!(
                "Cipher {} not supported with essiv",
                cipher.name()
            )))
        }
    };
    CipherAlg::with_key_len(cipher.family(), hash.digest_len()).ok_or_else(|| {
        Error::new(format!(
            "No {family} cipher with key size {} available",
            hash.digest_len()
        ))
    })
}

impl Params {
    fn from_header(h: &Header) -> Result<Params> {
        let spec = cstr(&h.cipher_mode);
        let Some((mode, ivgen)) = spec.split_once('-') else {
            return Err(Error::new(format!(
                "Unexpected cipher mode string format '{spec}'"
            )));
        };
        let (ivgen, ivhash) = match ivgen.split_once(':') {
            Some((g, hname)) => (g, Some(hash_named(hname)?)),
            None => (ivgen, None),
        };
        let cipher_mode = CipherMode::from_name(mode)
            .ok_or_else(|| Error::new(format!("Cipher mode '{mode}' not supported")))?;
        let name = cstr(&h.cipher_name);
        let mut key_bytes = h.master_key_len as usize;
        if cipher_mode == CipherMode::Xts {
            key_bytes /= 2;
        }
        let cipher_alg = CipherAlg::with_key_len(&name, key_bytes).ok_or_else(|| {
            Error::new(format!(
                "Algorithm '{name}' with key size {key_bytes} bytes not supported"
            ))
        })?;
        let hash_alg = hash_named(&cstr(&h.hash_spec))?;
        let ivgen_alg = IvGenAlg::from_name(ivgen)
            .ok_or_else(|| Error::new(format!("IV generator '{ivgen}' not supported")))?;
        let ivgen_cipher = if ivgen_alg == IvGenAlg::Essiv {
            let hash =
                ivhash.ok_or_else(|| Error::new("Missing IV generator hash specification"))?;
            essiv_cipher(cipher_alg, hash)?
        } else {
            cipher_alg
        };
        Ok(Params {
            cipher_alg,
            cipher_mode,
            ivgen_alg,
            ivgen_hash: ivhash,
            ivgen_cipher,
            hash_alg,
        })
    }

    fn key_len(&self) -> usize {
        self.cipher_alg.key_len()
            * if self.cipher_mode == CipherMode::Xts {
                2
            } else {
                1
            }
    }

    /// The payload (or key material) cipher keyed with `key`.
    pub fn cipher(&self, key: &[u8]) -> Result<SectorCipher> {
        SectorCipher::new(
            self.cipher_alg,
            self.cipher_mode,
            key,
            self.ivgen_alg,
            self.ivgen_cipher,
            self.ivgen_hash,
        )
    }
}

fn hash_named(name: &str) -> Result<HashAlg> {
    HashAlg::from_name(name)
        .ok_or_else(|| Error::new(format!("Hash algorithm '{name}' not supported")))
}

/// The creation options (QCryptoBlockCreateOptionsLUKS).
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub cipher_alg: CipherAlg,
    pub cipher_mode: CipherMode,
    pub ivgen_alg: IvGenAlg,
    pub ivgen_hash: Option<HashAlg>,
    pub hash_alg: HashAlg,
    pub iter_time_ms: u64,
    /// No payload after the header (QEMU: detached-header).
    pub detached: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cipher_alg: CipherAlg::Aes256,
            cipher_mode: CipherMode::Xts,
            ivgen_alg: IvGenAlg::Plain64,
            ivgen_hash: None,
            hash_alg: HashAlg::Sha256,
            iter_time_ms: DEFAULT_ITER_TIME_MS,
            detached: false,
        }
    }
}

/// An opened LUKS header (the master key, if unlocked, lives in the
/// `SectorCipher` made from it, not here).
#[derive(Clone, Debug)]
pub struct Luks {
    pub header: Header,
    pub params: Params,
}

/// Writes to make into the header region: (offset, bytes).
pub type Writes = Vec<(u64, Vec<u8>)>;

impl Luks {
    /// Parses and checks a header (its first `HEADER_LEN` bytes).
    pub fn open(bytes: &[u8], detached: bool) -> Result<Luks> {
        let header = Header::parse(bytes)?;
        header.check(detached)?;
        let params = Params::from_header(&header)?;
        Ok(Luks { header, params })
    }

    /// True if `bytes` start with a LUKS1 header (format probing).
    pub fn probe(bytes: &[u8]) -> bool {
        bytes.len() >= 8 && bytes[..6] == MAGIC && bytes[6..8] == [0, 1]
    }

    /// Where the payload starts, in bytes.
    pub fn payload_offset(&self) -> u64 {
        self.header.payload_offset_sector as u64 * SECTOR_SIZE
    }

    /// Where slot `i` keeps its key material (offset into the region,
    /// length), if the slot is active: what `unlock` needs read.
    pub fn material_range(&self, i: usize) -> Option<(u64, usize)> {
        let s = &self.header.slots[i];
        s.is_active().then(|| {
            (
                s.key_offset_sector as u64 * SECTOR_SIZE,
                self.header.master_key_len as usize * s.stripes as usize,
            )
        })
    }

    /// Tries slot `i` with `password` on its key `material`; the master
    /// key if it opens it.
    fn try_slot(&self, i: usize, password: &[u8], material: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some((_, split_len)) = self.material_range(i) else {
            return Ok(None);
        };
        let slot = &self.header.slots[i];
        if material.len() != split_len {
            return Err(Error::new("Request for data outside of extension header"));
        }
        let key_len = self.header.master_key_len as usize;
        let mut slot_key = vec![0u8; key_len];
        self.params
            .hash_alg
            .pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
        let mut split = material.to_vec();
        self.params
            .cipher(&slot_key)?
            .decrypt(SECTOR_SIZE as usize, 0, &mut split);
        let key = afsplit::decode(self.params.hash_alg, &split, key_len, slot.stripes);
        Ok(self.verify(&key).then_some(key))
    }

    /// True if `key` is the master key the header's digest describes.
    fn verify(&self, key: &[u8]) -> bool {
        let mut digest = [0u8; DIGEST_LEN];
        self.params.hash_alg.pbkdf2(
            key,
            &self.header.master_key_salt,
            self.header.master_key_iterations,
            &mut digest,
        );
        digest == self.header.master_key_digest
    }

    /// The master key, from the first slot `password` opens; `materials[i]`
    /// holds slot i's key material as `material_range` placed it.
    pub fn unlock(&self, password: &[u8], materials: &[Vec<u8>]) -> Result<Vec<u8>> {
        for (i, m) in materials.iter().enumerate().take(NUM_SLOTS) {
            if let Some(k) = self.try_slot(i, password, m)? {
                return Ok(k);
            }
        }
        Err(Error::new("Invalid password, cannot unlock any keyslot"))
    }

    /// The slots `password` opens (for erasing by old secret).
    pub fn slots_opened_by(&self, password: &[u8], materials: &[Vec<u8>]) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for (i, m) in materials.iter().enumerate().take(NUM_SLOTS) {
            if self.try_slot(i, password, m)?.is_some() {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// The materials `unlock` takes, cut out of a whole region.
    pub fn materials_in(&self, region: &[u8]) -> Vec<Vec<u8>> {
        (0..NUM_SLOTS)
            .map(|i| match self.material_range(i) {
                Some((at, n)) => region
                    .get(at as usize..at as usize + n)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default(),
                None => Vec::new(),
            })
            .collect()
    }

    /// Makes a header with slot 0 opened by `password`: the header and its
    /// master key, and the whole region's bytes (zeroes where no slot is).
    pub fn create(opts: &CreateOptions, password: &[u8]) -> Result<(Luks, Vec<u8>, Vec<u8>)> {
        let ivgen_hash = match (opts.ivgen_alg, opts.ivgen_hash) {
            (IvGenAlg::Essiv, None) => Some(HashAlg::Sha256),
            (_, h) => h,
        };
        let ivgen_cipher = match (opts.ivgen_alg, ivgen_hash) {
            (IvGenAlg::Essiv, Some(h)) => essiv_cipher(opts.cipher_alg, h)?,
            _ => opts.cipher_alg,
        };
        let params = Params {
            cipher_alg: opts.cipher_alg,
            cipher_mode: opts.cipher_mode,
            ivgen_alg: opts.ivgen_alg,
            ivgen_hash,
            ivgen_cipher,
            hash_alg: opts.hash_alg,
        };
        let mode_spec = match ivgen_hash {
            Some(h) => format!(
                "{}-{}:{}",
                opts.cipher_mode.name(),
                opts.ivgen_alg.name(),
                h.name()
            ),
            None => format!("{}-{}", opts.cipher_mode.name(), opts.ivgen_alg.name()),
        };
        if mode_spec.len() >= 32 {
            return Err(Error::new(format!(
                "Cipher mode '{mode_spec}' is too long for LUKS header"
            )));
        }
        let key_len = params.key_len();
        let mut header = Header {
            magic: MAGIC,
            version: 1,
            cipher_name: [0; 32],
            cipher_mode: [0; 32],
            hash_spec: [0; 32],
            payload_offset_sector: 0,
            master_key_len: key_len as u32,
            master_key_digest: [0; DIGEST_LEN],
            master_key_salt: [0; SALT_LEN],
            master_key_iterations: 0,
            uuid: [0; 40],
            slots: Default::default(),
        };
        set_cstr(&mut header.cipher_name, opts.cipher_alg.family());
        set_cstr(&mut header.cipher_mode, &mode_spec);
        set_cstr(&mut header.hash_spec, opts.hash_alg.name());
        set_cstr(&mut header.uuid, &uuid_v4()?);
        random_bytes(&mut header.master_key_salt)?;
        let mut master = vec![0u8; key_len];
        random_bytes(&mut master)?;
        // About an eighth of the iteration time on the digest, as cryptsetup.
        let per_sec =
            opts.hash_alg
                .pbkdf2_iters_per_second(&master, &header.master_key_salt, DIGEST_LEN)?;
        let iters = scaled_iters(per_sec, opts.iter_time_ms)? / 8;
        header.master_key_iterations = iters.max(MIN_ITERS) as u32;
        opts.hash_alg.pbkdf2(
            &master,
            &header.master_key_salt,
            header.master_key_iterations,
            &mut header.master_key_digest,
        );
        let header_sectors = KEY_SLOT_OFFSET / SECTOR_SIZE;
        let split = header.split_key_sectors(STRIPES);
        for (i, s) in header.slots.iter_mut().enumerate() {
            s.active = SLOT_DISABLED;
            s.key_offset_sector = (header_sectors + i as u64 * split) as u32;
            s.stripes = STRIPES;
        }
        let region_sectors = header_sectors + NUM_SLOTS as u64 * split;
        header.payload_offset_sector = if opts.detached {
            0
        } else {
            region_sectors as u32
        };
        let mut luks = Luks { header, params };
        let mut region = vec![0u8; (region_sectors * SECTOR_SIZE) as usize];
        for (off, bytes) in luks.store_key(0, password, &master, opts.iter_time_ms)? {
            region[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
        }
        Ok((luks, master, region))
    }

    /// Puts `master` into slot `i` under `password` (QEMU:
    /// qcrypto_block_luks_store_key): the key material, then the header.
    pub fn store_key(
        &mut self,
        i: usize,
        password: &[u8],
        master: &[u8],
        iter_time_ms: u64,
    ) -> Result<Writes> {
        let key_len = self.header.master_key_len as usize;
        let hash = self.params.hash_alg;
        let slot = &mut self.header.slots[i];
        random_bytes(&mut slot.salt)?;
        let per_sec = hash.pbkdf2_iters_per_second(password, &slot.salt, key_len)?;
        slot.iterations = scaled_iters(per_sec, iter_time_ms)?.max(MIN_ITERS) as u32;
        let mut slot_key = vec![0u8; key_len];
        hash.pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
        let mut split = afsplit::encode(hash, master, slot.stripes)?;
        let at = slot.key_offset_sector as u64 * SECTOR_SIZE;
        self.params
            .cipher(&slot_key)?
            .encrypt(SECTOR_SIZE as usize, 0, &mut split);
        self.header.slots[i].active = SLOT_ENABLED;
        Ok(vec![(at, split), (0, self.header.to_bytes())])
    }

    /// Disables slot `i` and overwrites its material (QEMU:
    /// qcrypto_block_luks_erase_key): the header, then random bytes.
    pub fn erase_key(&mut self, i: usize) -> Result<Writes> {
        let slot = &mut self.header.slots[i];
        slot.salt = [0; SALT_LEN];
        slot.iterations = 0;
        slot.active = SLOT_DISABLED;
        let at = slot.key_offset_sector as u64 * SECTOR_SIZE;
        let len = self.header.master_key_len as usize * slot.stripes as usize;
        let mut writes = vec![(0, self.header.to_bytes())];
        for _ in 0..ERASE_ITERATIONS {
            let mut garbage = vec![0u8; len];
            random_bytes(&mut garbage)?;
            writes.push((at, garbage));
        }
        Ok(writes)
    }

    /// Number of active slots.
    pub fn active_slots(&self) -> usize {
        self.header.slots.iter().filter(|s| s.is_active()).count()
    }

    /// The first inactive slot.
    pub fn free_slot(&self) -> Option<usize> {
        self.header.slots.iter().position(|s| !s.is_active())
    }

    /// QCryptoBlockInfoLUKS, keys in schema order.
    pub fn info(&self) -> Map<String, Value> {
        let p = &self.params;
        let mut m = Map::new();
        m.insert("cipher-alg".into(), p.cipher_alg.name().into());
        m.insert("cipher-mode".into(), p.cipher_mode.name().into());
        m.insert("ivgen-alg".into(), p.ivgen_alg.name().into());
        if p.ivgen_alg == IvGenAlg::Essiv {
            if let Some(h) = p.ivgen_hash {
                m.insert("ivgen-hash-alg".into(), h.name().into());
            }
        }
        m.insert("hash-alg".into(), p.hash_alg.name().into());
        m.insert(
            "detached-header".into(),
            (self.payload_offset() == 0).into(),
        );
        m.insert("payload-offset".into(), self.payload_offset().into());
        m.insert(
            "master-key-iters".into(),
            self.header.master_key_iterations.into(),
        );
        m.insert("uuid".into(), cstr(&self.header.uuid).into());
        let slots: Vec<Value> = self
            .header
            .slots
            .iter()
            .map(|s| {
                let key_offset = s.key_offset_sector as u64 * SECTOR_SIZE;
                if s.is_active() {
                    json!({"active": true, "iters": s.iterations, "stripes": s.stripes,
                           "key-offset": key_offset})
                } else {
                    json!({"active": false, "key-offset": key_offset})
                }
            })
            .collect();
        m.insert("slots".into(), slots.into());
        m
    }
}

/// Iterations for `iter_time_ms` at `per_sec` (QEMU's range checks).
fn scaled_iters(per_sec: u64, iter_time_ms: u64) -> Result<u64> {
    let iters = per_sec
        .checked_mul(iter_time_ms)
        .ok_or_else(|| Error::new(format!("PBKDF iterations {per_sec} too large to scale")))?
        / 1000;
    if iters > u32::MAX as u64 {
        return Err(Error::new(format!(
            "PBKDF iterations {iters} larger than {}",
            u32::MAX
        )));
    }
    Ok(iters)
}

/// A random (version 4) UUID in its text form.
fn uuid_v4() -> Result<String> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_header_has_qemus_layout_and_unlocks() {
        let opts = CreateOptions {
            iter_time_ms: 10,
            ..Default::default()
        };
        let (luks, master, region) = Luks::create(&opts, b"hunter0").unwrap();
        assert_eq!(region.len(), 2068480);
        assert_eq!(luks.payload_offset(), 2068480);
        assert_eq!(luks.header.slots[1].key_offset_sector as u64 * 512, 262144);
        let reopened = Luks::open(&region, false).unwrap();
        assert_eq!(reopened.params, luks.params);
        let materials = reopened.materials_in(&region);
        assert_eq!(reopened.unlock(b"hunter0", &materials).unwrap(), master);
        assert_eq!(
            reopened.unlock(b"hunter1", &materials).unwrap_err().0,
            "Invalid password, cannot unlock any keyslot"
        );
        assert_eq!(cstr(&reopened.header.cipher_mode), "xts-plain64");
    }

    #[test]
    fn bad_headers_get_qemus_errors() {
        let opts = CreateOptions {
            iter_time_ms: 1,
            ..Default::default()
        };
        let (_, _, region) = Luks::create(&opts, b"x").unwrap();
        let mut bad = region[..HEADER_LEN].to_vec();
        bad[208 + 44..208 + 48].copy_from_slice(&12u32.to_be_bytes());
        assert_eq!(
            Luks::open(&bad, false).unwrap_err().0,
            "Keyslot 0 is corrupted (stripes 12 != 4000)"
        );
        let mut bad = region[..HEADER_LEN].to_vec();
        bad[0] = b'X';
        assert_eq!(
            Luks::open(&bad, false).unwrap_err().0,
            "Volume is not in LUKS format"
        );
    }
}
