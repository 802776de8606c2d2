//! The crash-point harness of crash_points.rs: a workload recorded through
//! `blklogwrites` (record.rs, with the metadata operations that run as
//! tools in tool_ops.rs), its log cut and each cut checked (cuts.rs), and
//! the check a crashed image must pass (check.rs), which the kill tests
//! share.

#![allow(dead_code)]

pub mod check;
pub mod cuts;
pub mod kill;
pub mod record;
pub mod recorder;
pub mod tool_ops;

use std::path::Path;
use std::process::Command;
use strata_drivers::filters::blklogwrites::LogRecord;

/// The oracle, if installed; CI must have it.
pub fn qemu_tool(name: &str) -> Option<String> {
    let path = format!("/usr/bin/{name}");
    if Path::new(&path).exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{name} is required under CI"
    );
    eprintln!("skipped: {name} not found");
    None
}

/// A soak's setting: the number in environment variable `key`, or `default`.
pub fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Runs a command; its exit code (-1 for a signal) and stdout + stderr.
pub fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

pub const SECTOR: u64 = 512;
/// The guest disk's size at creation.
pub const SIZE: u64 = 4 << 20;

/// splitmix64: the tests' only randomness, reproducible from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// What a crash may keep of the entries after the last flush: a random
    /// half, in a random order, a quarter of them torn (the bits of the
    /// sectors each keeps).
    pub fn crash_subset<T: Copy>(&mut self, entries: &[T]) -> Vec<(T, Option<u64>)> {
        let mut kept: Vec<T> = entries
            .iter()
            .copied()
            .filter(|_| self.chance(1, 2))
            .collect();
        for i in (1..kept.len()).rev() {
            kept.swap(i, self.below(i as u64 + 1) as usize);
        }
        kept.into_iter()
            .map(|e| (e, self.chance(1, 4).then(|| self.next())))
            .collect()
    }
}

/// What a guest sector holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// What it held before the workload (zeroes, or the backing file's data).
    Initial,
    Zero,
    /// The data of request `k`.
    Op(u32),
    /// Every byte this value: written by a strata-io process, not the test.
    Pattern(u8),
}

/// The data request `op` writes to guest sector `sector`: both numbers,
/// over and over, so data in the wrong place or from the wrong request shows.
pub fn tag(op: u32, sector: u64) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    for chunk in b.chunks_mut(8) {
        chunk[..4].copy_from_slice(&op.to_le_bytes());
        chunk[4..].copy_from_slice(&(sector as u32).to_le_bytes());
    }
    b
}

/// A guest flush: how many log entries there were once it returned, and
/// what the guest had by then.
pub struct FlushPoint {
    pub nr_entries: u64,
    pub reqs_done: usize,
    pub durable: Vec<Version>,
    /// The guest size then, in sectors, and how many resizes came before.
    pub size: u64,
    pub resizes_done: usize,
}

/// A recorded workload, ready to be cut.
pub struct Recording {
    pub dir: tempfile::TempDir,
    pub format: &'static str,
    /// The image the log was written under (the backing file for commit).
    pub image: String,
    /// The image file before the workload.
    pub base: Vec<u8>,
    pub log: Vec<u8>,
    pub records: Vec<LogRecord>,
    /// Guest content before the workload.
    pub initial: Vec<u8>,
    /// Every request in the order of the batches, and what it left.
    pub reqs: Vec<((u64, u64), Version)>,
    /// Every guest size the workload set (sectors), in order.
    pub resizes: Vec<u64>,
    pub flushes: Vec<FlushPoint>,
}

pub fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}
