//! The anti-forensic splitter of LUKS (QEMU: crypto/afsplit.c): a key is
//! spread over `stripes` blocks so that losing any one of them loses it.

use crate::hash::HashAlg;
use crate::Result;

/// Diffuses `block` in place: each digest-sized piece is replaced by the
/// hash of its index (big-endian) and itself.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    for (i, piece) in block.chunks_mut(dl).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&d[..n]);
    }
}

fn xor_into(dst: &mut [u8], a: &[u8]) {
    for (d, x) in dst.iter_mut().zip(a) {
        *d ^= x;
    }
}

/// Splits `key` into `stripes` blocks of its length, the first
/// `stripes - 1` random.
pub(crate) fn encode(hash: HashAlg, key: &[u8], stripes: u32) -> Result<Vec<u8>> {
    let n = key.len();
    let mut out = vec![0u8; n * stripes as usize];
    let mut block = vec![0u8; n];
    let (random, last) = out.split_at_mut(n * (stripes as usize - 1));
    crate::random_bytes(random)?;
    for stripe in random.chunks(n) {
        xor_into(&mut block, stripe);
        diffuse(hash, &mut block);
    }
    last.copy_from_slice(key);
    xor_into(last, &block);
    Ok(out)
}

/// Joins split material back into the key of `key_len` bytes.
pub(crate) fn decode(hash: HashAlg, split: &[u8], key_len: usize, stripes: u32) -> Vec<u8> {
    let mut block = vec![0u8; key_len];
    let body = key_len * (stripes as usize - 1);
    for stripe in split[..body].chunks(key_len) {
        xor_into(&mut block, stripe);
        diffuse(hash, &mut block);
    }
    xor_into(&mut block, &split[body..body + key_len]);
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_key_joins_back() {
        let key: Vec<u8> = (0..64).collect();
        let split = encode(HashAlg::Sha256, &key, 4000).unwrap();
        assert_eq!(split.len(), 64 * 4000);
        assert_eq!(decode(HashAlg::Sha256, &split, 64, 4000), key);
        let mut bad = split.clone();
        bad[5] ^= 1;
        assert_ne!(decode(HashAlg::Sha256, &bad, 64, 4000), key);
    }
}
