//! The order in which QEMU's input visitor finds the members nobody asked
//! for: it keeps a dictionary's unvisited keys in a GLib hash table
//! (g_str_hash, open addressing with quadratic probing, in-place resize)
//! and reports the first one its iterator meets. With several unexpected
//! members, which one "Parameter 'x' is unexpected" names depends on
//! exactly that layout, so it is rebuilt here.

/// GLib's moduli per table size (`prime_mod`), for 1 << shift buckets.
const PRIME_MOD: [u32; 32] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
    262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
    268435399, 536870909, 1073741789, 2147483647,
];
const MIN_SHIFT: u32 = 3;
const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;

/// GLib's g_str_hash (djb2 over signed chars); 0 and 1 mark free slots,
/// so such hashes become 2.
fn str_hash(s: &str) -> u32 {
    let h = s.bytes().fold(5381u32, |h, b| {
        h.wrapping_mul(33).wrapping_add(b as i8 as i32 as u32)
    });
    h.max(2)
}

fn closest_shift(mut n: usize) -> u32 {
    let mut i = 0;
    while n != 0 {
        n >>= 1;
        i += 1;
    }
    i
}

/// A set of strings laid out as a GHashTable lays them out.
pub struct GHashSet {
    hashes: Vec<u32>,
    keys: Vec<Option<String>>,
    modulus: u32,
    size: usize,
    nnodes: usize,
    noccupied: usize,
}

impl GHashSet {
    /// An empty table of 8 buckets.
    pub fn new() -> GHashSet {
        let mut t = GHashSet {
            hashes: Vec::new(),
            keys: Vec::new(),
            modulus: 0,
            size: 0,
            nnodes: 0,
            noccupied: 0,
        };
        t.set_shift(MIN_SHIFT);
        t
    }

    /// Sets the bucket count; the arrays only grow here (a shrink cuts
    /// them after the entries have moved).
    fn set_shift(&mut self, shift: u32) {
        self.modulus = PRIME_MOD[shift as usize];
        self.size = 1usize << shift;
        if self.hashes.len() < self.size {
            self.hashes.resize(self.size, UNUSED);
            self.keys.resize(self.size, None);
        }
    }

    fn size(&self) -> usize {
        self.size
    }

    fn to_index(&self, hash: u32) -> usize {
        (hash.wrapping_mul(11) % self.modulus) as usize
    }

    /// The slot holding `key`, or where it would go (the first tombstone
    /// on its probe sequence, else the free slot that ends it).
    fn lookup(&self, key: &str) -> (usize, bool) {
        let h = str_hash(key);
        let mask = self.size() - 1;
        let mut i = self.to_index(h);
        let mut step = 0;
        let mut tombstone = None;
        while self.hashes[i] != UNUSED {
            if self.hashes[i] == h && self.keys[i].as_deref() == Some(key) {
                return (i, true);
            }
            if self.hashes[i] == TOMBSTONE && tombstone.is_none() {
                tombstone = Some(i);
            }
            step += 1;
            i = (i + step) & mask;
        }
        (tombstone.unwrap_or(i), false)
    }

    /// Adds `key` (nothing if present).
    pub fn insert(&mut self, key: &str) {
        let (i, found) = self.lookup(key);
        if found {
            return;
        }
        let old = self.hashes[i];
        self.hashes[i] = str_hash(key);
        self.keys[i] = Some(key.to_string());
        self.nnodes += 1;
        if old == UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    /// Removes `key` if present.
    pub fn remove(&mut self, key: &str) {
        let (i, found) = self.lookup(key);
        if !found {
            return;
        }
        self.hashes[i] = TOMBSTONE;
        self.keys[i] = None;
        self.nnodes -= 1;
        self.maybe_resize();
    }

    /// The first key in bucket order, as an iterator meets it.
    pub fn first(&self) -> Option<&str> {
        (0..self.size())
            .find(|&i| self.hashes[i] >= 2)
            .and_then(|i| self.keys[i].as_deref())
    }

    fn maybe_resize(&mut self) {
        let size = self.size();
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT)
            || size <= self.noccupied + self.noccupied / 16
        {
            self.resize();
        }
    }

    /// GLib's in-place resize: entries are moved in slot order, each one
    /// evicting a not yet moved entry from its new slot, which moves next.
    fn resize(&mut self) {
        let old = self.size();
        let shift = closest_shift((self.nnodes as f64 * 1.333) as usize).max(MIN_SHIFT);
        self.set_shift(shift);
        let size = self.size();
        let mask = size - 1;
        let mut placed = vec![false; size.max(old)];
        for i in 0..old {
            let h = self.hashes[i];
            if h < 2 {
                self.hashes[i] = UNUSED;
                continue;
            }
            if placed[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut key = self.keys[i].take();
            let mut hash = h;
            loop {
                let mut at = self.to_index(hash);
                let mut step = 0;
                while placed[at] {
                    step += 1;
                    at = (at + step) & mask;
                }
                placed[at] = true;
                let replaced = self.hashes[at];
                self.hashes[at] = hash;
                let evicted = std::mem::replace(&mut self.keys[at], key);
                if replaced < 2 {
                    break;
                }
                hash = replaced;
                key = evicted;
            }
        }
        self.hashes.truncate(size);
        self.keys.truncate(size);
        self.noccupied = self.nnodes;
    }
}

impl Default for GHashSet {
    fn default() -> Self {
        GHashSet::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layouts checked against qemu-storage-daemon's answers: the key its
    /// "Parameter 'x' is unexpected" named, after QDict-ordered insertion
    /// and removal of the visited members.
    fn first_left(keys: &[&str], visited: &[&str]) -> String {
        let owned: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let mut t = GHashSet::new();
        for k in strata_block::qjson::qdict_order(owned.iter()) {
            t.insert(k);
        }
        for v in visited {
            t.remove(v);
        }
        t.first().unwrap_or_default().to_string()
    }

    #[test]
    fn small_and_resized_tables() {
        assert_eq!(str_hash(""), 5381);
        let mut t = GHashSet::new();
        for i in 0..100 {
            t.insert(&format!("k{i}"));
        }
        for i in 0..95 {
            t.remove(&format!("k{i}"));
        }
        let mut left: Vec<String> = Vec::new();
        while let Some(k) = t.first().map(str::to_string) {
            t.remove(&k);
            left.push(k);
        }
        left.sort();
        assert_eq!(left, ["k95", "k96", "k97", "k98", "k99"]);
        assert_eq!(
            first_left(&["k331", "node-name", "k970", "k154"], &["node-name"]),
            "k970"
        );
        let keys = [
            "k840",
            "k374",
            "k96",
            "k59",
            "k931",
            "k596",
            "k519",
            "k74",
            "node-name",
            "k548",
        ];
        assert_eq!(first_left(&keys, &["node-name"]), "k374");
    }
}
