//! The metadata cache options (QEMU: read_cache_sizes): `cache-size`,
//! `l2-cache-size`, `refcount-cache-size`, `l2-cache-entry-size`, checked
//! as QEMU checks them, and the cache sizes they give.

use strata_block::options::{take_size, Opts};
use strata_block::{Error, Result};

/// How many bytes each metadata cache may hold.
#[derive(Clone, Copy, Debug)]
pub struct CacheSizes {
    pub l2_bytes: u64,
    pub refcount_bytes: u64,
}

/// QEMU's default upper bound of the L2 cache.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

impl CacheSizes {
    /// Sizes for a disk of `disk_size` bytes in clusters of `cs` bytes
    /// with L2 entries of `l2e` bytes, from the options (removed from `opts`).
    pub fn take(opts: &mut Opts, cs: u64, l2e: u64, disk_size: u64) -> Result<CacheSizes> {
        let combined = take_size(opts, "cache-size")?;
        let l2_set = take_size(opts, "l2-cache-size")?;
        let rc_set = take_size(opts, "refcount-cache-size")?;
        let entry = take_size(opts, "l2-cache-entry-size")?.unwrap_or(cs);
        // Enough L2 tables to map the whole disk, in whole clusters.
        let max_l2 = (disk_size.div_ceil(cs) * l2e).div_ceil(cs) * cs;
        let mut l2 = max_l2.min(l2_set.unwrap_or(DEFAULT_L2_CACHE_MAX));
        let mut rc = rc_set.unwrap_or(0);
        if let Some(c) = combined {
            if l2_set.is_some() && rc_set.is_some() {
                return Err(Error::invalid(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
                ));
            } else if l2_set.is_some_and(|l| l > c) {
                return Err(Error::invalid("l2-cache-size may not exceed cache-size"));
            } else if rc > c {
                return Err(Error::invalid(
                    "refcount-cache-size may not exceed cache-size",
                ));
            }
            if l2_set.is_some() {
                rc = c - l2;
            } else if rc_set.is_some() {
                l2 = c - rc;
            } else {
                // The L2 cache first, up to what the disk needs.
                l2 = max_l2.min(c);
                rc = c - l2;
            }
        } else if rc_set.is_none() {
            rc = 4 * cs;
        }
        if !(512..=cs).contains(&entry) || !entry.is_power_of_two() {
            return Err(Error::invalid(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
            )));
        }
        // QEMU's floors: two L2 tables, four refcount blocks.
        Ok(CacheSizes {
            l2_bytes: l2.max(2 * cs),
            refcount_bytes: rc.max(4 * cs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(pairs: &[(&str, &str)]) -> Result<CacheSizes> {
        let mut o = Opts::new();
        for (k, v) in pairs {
            o.insert(k.to_string(), v.to_string().into());
        }
        CacheSizes::take(&mut o, 65536, 8, 64 << 30)
    }

    #[test]
    fn conflicts_are_refused_as_qemu_words_them() {
        let all = [
            ("cache-size", "1.25M"),
            ("l2-cache-size", "1M"),
            ("refcount-cache-size", "0.25M"),
        ];
        assert!(sizes(&all).unwrap_err().to_string().contains("same time"));
        let l2 = [("cache-size", "1M"), ("l2-cache-size", "2M")];
        assert!(sizes(&l2)
            .unwrap_err()
            .to_string()
            .contains("may not exceed"));
        let bad_entry = [("l2-cache-entry-size", "4242")];
        assert!(sizes(&bad_entry).is_err());
    }

    #[test]
    fn one_size_set_derives_the_other() {
        let s = sizes(&[("cache-size", "2M"), ("l2-cache-size", "1M")]).unwrap();
        assert_eq!((s.l2_bytes, s.refcount_bytes), (1 << 20, 1 << 20));
        let s = sizes(&[("cache-size", "0")]).unwrap();
        assert_eq!((s.l2_bytes, s.refcount_bytes), (2 * 65536, 4 * 65536));
    }
}
