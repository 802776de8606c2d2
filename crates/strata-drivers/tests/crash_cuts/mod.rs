//! How a recorded workload's log is cut and a cut checked, for
//! crash_points.rs: the replay (everything to the last flush, then a
//! random, reordered, partly torn subset) and what a cut must hold.

use super::common;
use std::collections::HashMap;
use std::path::Path;
use strata_block::options::Opts;
use strata_block::{EventLoop, IoBuf, OpenCtx, OpenFlags};
use strata_drivers::filters::blklogwrites::{LogRecord, LOG_DISCARD, LOG_FLUSH};

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
}

/// What a guest sector holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// What it held before the workload (zeroes, or the backing file's data).
    Initial,
    Zero,
    /// The data of request `k`.
    Op(u32),
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
    /// The image has lazy refcounts: cuts are checked with `-r all`.
    pub lazy_refcounts: bool,
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

/// The image file a crash at log entry `cut` may leave, and how many
/// guest flushes it must hold.
pub fn replay(rec: &Recording, cut: usize, rng: &mut Rng) -> (Vec<u8>, usize) {
    let mut img = rec.base.clone();
    let last_flush = rec.records[..cut]
        .iter()
        .rposition(|r| r.entry.flags & LOG_FLUSH != 0);
    let stable = last_flush.map_or(0, |f| f + 1);
    for r in &rec.records[..stable] {
        apply(&mut img, rec, r, None);
    }
    let mut pending: Vec<&LogRecord> = rec.records[stable..cut]
        .iter()
        .filter(|_| rng.chance(1, 2))
        .collect();
    for i in (1..pending.len()).rev() {
        pending.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for r in pending {
        let keep = rng.chance(1, 4).then(|| rng.next());
        apply(&mut img, rec, r, keep);
    }
    let guest_flushes = rec
        .flushes
        .iter()
        .take_while(|f| f.nr_entries <= stable as u64)
        .count();
    (img, guest_flushes)
}

/// Applies one log entry to the image file; `torn` (a bit pattern) keeps
/// only some of a write's sectors.
pub fn apply(img: &mut Vec<u8>, rec: &Recording, r: &LogRecord, torn: Option<u64>) {
    let e = &r.entry;
    let start = (e.sector * SECTOR) as usize;
    let len = (e.nr_sectors * SECTOR) as usize;
    if e.flags & LOG_FLUSH != 0 {
        return;
    }
    if e.flags & LOG_DISCARD != 0 {
        // A punched hole reads as zeroes; it never makes the file longer.
        let end = (start + len).min(img.len());
        if start < end {
            img[start..end].fill(0);
        }
        return;
    }
    if img.len() < start + len {
        img.resize(start + len, 0);
    }
    let data = &rec.log[r.data.clone()];
    for (i, s) in data.chunks(SECTOR as usize).enumerate() {
        if torn.is_some_and(|bits| bits >> (i % 64) & 1 == 0) {
            continue;
        }
        let at = start + i * SECTOR as usize;
        img[at..at + s.len()].copy_from_slice(s);
    }
}

/// Accepts the one kind of error a crash inside a snapshot operation may
/// leave: COPIED flags that disagree with refcounts that are only too
/// high (leaks), or flags missing on clusters with one reference. The
/// first goes once the leaks are repaired; the second makes the next
/// write copy the cluster, never write it in place. A COPIED flag on a
/// cluster that really has two references (a snapshot's data written in
/// place) stays an error. What is accepted must then repair with `-r all`.
pub fn benign_flag_errors(rec: &Recording, img: &[u8], qemu_img: &str) -> Result<(), String> {
    let copy = path(rec.dir.path(), "cut-repaired.qcow2");
    std::fs::write(&copy, img).unwrap();
    common::run(qemu_img, &["check", "-r", "leaks", "-f", "qcow2", &copy]);
    let (code, out) = common::run(qemu_img, &["check", "-f", "qcow2", &copy]);
    let only_missing_flags = out
        .lines()
        .filter(|l| l.starts_with("ERROR"))
        .all(|l| l.starts_with("ERROR OFLAG_COPIED") && l.ends_with(" refcount=1"));
    if code != 0 && !(code == 2 && only_missing_flags) {
        return Err(format!(
            "qemu-img check after -r leaks exited {code}:\n{out}"
        ));
    }
    let (code, out) = common::run(qemu_img, &["check", "-r", "all", "-f", "qcow2", &copy]);
    if code != 0 {
        return Err(format!("qemu-img check -r all exited {code}:\n{out}"));
    }
    Ok(())
}

/// Checks one cut; an error says what is wrong with it.
pub fn check_cut(rec: &Recording, cut: usize, rng: &mut Rng, qemu_img: &str) -> Result<(), String> {
    let (img, guest_flushes) = replay(rec, cut, rng);
    let file = path(rec.dir.path(), "cut.qcow2");
    std::fs::write(&file, &img).unwrap();
    let mut args = vec!["check", "-f", "qcow2"];
    if rec.lazy_refcounts {
        args.extend(["-r", "all"]);
    }
    args.push(&file);
    let (code, out) = common::run(qemu_img, &args);
    // 3: leaks only, which a crash may leave.
    if code == 2 {
        benign_flag_errors(rec, &img, qemu_img)
            .map_err(|e| format!("{e}\nbefore repair:\n{out}"))?;
    } else if code != 0 && code != 3 {
        return Err(format!("qemu-img check exited {code}:\n{out}"));
    }
    let raw = path(rec.dir.path(), "cut.raw");
    let (code, out) = common::run(
        qemu_img,
        &["convert", "-U", "-f", "qcow2", "-O", "raw", &file, &raw],
    );
    if code != 0 {
        return Err(format!("qemu-img convert exited {code}:\n{out}"));
    }
    let qemu_read = std::fs::read(&raw).unwrap();
    let len = qemu_read.len() as u64;
    // The size at the guest's last flush, or one set after it.
    let (size, resizes_done) = match guest_flushes {
        0 => (SIZE / SECTOR, 0),
        g => (rec.flushes[g - 1].size, rec.flushes[g - 1].resizes_done),
    };
    if len != size * SECTOR && !rec.resizes[resizes_done..].contains(&(len / SECTOR)) {
        return Err(format!("the guest size is {len} bytes"));
    }
    let ev = EventLoop::new().unwrap();
    let strata_read = ev.block_on(async {
        let ctx = OpenCtx::new(
            strata_drivers::registry(),
            OpenFlags {
                read_only: true,
                force_share: true,
                ..OpenFlags::default()
            },
        );
        let node = ctx
            .open_image(Some(&file), Some("qcow2"), Opts::new())
            .await
            .map_err(|e| format!("Strata cannot open the cut: {e}"))?;
        let r = node.read(0, IoBuf::zeroed(len as usize)).await;
        node.close().await.ok();
        r.map_err(|e| format!("Strata cannot read the cut: {e}"))
    })?;
    if let Some(i) = (0..len as usize).find(|&i| qemu_read[i] != strata_read.as_slice()[i]) {
        return Err(format!("QEMU and Strata read the cut differently at {i}"));
    }
    // What each sector may hold: what it had at the guest's last flush,
    // or what any request after that flush left in it.
    let (durable, after) = match guest_flushes {
        0 => (None, 0),
        g => (
            Some(&rec.flushes[g - 1].durable),
            rec.flushes[g - 1].reqs_done,
        ),
    };
    let mut later: HashMap<u64, Vec<Version>> = HashMap::new();
    for &((a, e), v) in &rec.reqs[after..] {
        for s in a..e {
            later.entry(s).or_default().push(v);
        }
    }
    for s in 0..len / SECTOR {
        let got = &qemu_read[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
        let bytes = |v: Version| -> Vec<u8> {
            match v {
                Version::Initial => {
                    rec.initial[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize].to_vec()
                }
                Version::Zero => vec![0; SECTOR as usize],
                Version::Op(k) => tag(k, s).to_vec(),
            }
        };
        let was = durable.map_or(Version::Initial, |d| d[s as usize]);
        let ok = bytes(was) == got
            || later
                .get(&s)
                .is_some_and(|vs| vs.iter().any(|&v| bytes(v) == got));
        if !ok {
            return Err(format!(
                "guest sector {s} lost its data: it held {was:?} at the guest's flush {guest_flushes}"
            ));
        }
    }
    Ok(())
}
