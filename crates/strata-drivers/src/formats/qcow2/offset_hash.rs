//! Hashing for maps keyed by host offsets or cluster indexes: the keys are
//! the driver's own, so one multiply spreads them well enough, where
//! SipHash's defence against chosen keys costs more than the rest of a
//! lookup on the request path.

use std::hash::{BuildHasherDefault, Hasher};

/// The hasher state.
#[derive(Default)]
pub struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits, which the table uses, mix all of n.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// `HashMap<u64, _, OffsetHash>` for offset-keyed maps.
pub type OffsetHash = BuildHasherDefault<OffsetHasher>;
