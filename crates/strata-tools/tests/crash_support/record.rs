//! Recording a workload: the image made, requests run on it in batches
//! through `blklogwrites` with metadata operations between them, and what
//! the guest had at each flush, for the cuts.

use super::tool_ops::{self, Session};
use super::{path, qemu_tool, run, tag, FlushPoint, Recording, Rng, Version, SECTOR, SIZE};
use std::sync::Arc;
use strata_block::options::Opts;
use strata_block::{IoBuf, Node, OpenCtx, OpenFlags, WriteFlags};
use strata_drivers::filters::blklogwrites::parse_log;

/// One guest request (offsets and lengths in sectors).
#[derive(Clone, Copy, Debug)]
pub enum Req {
    Write { at: u64, n: u64 },
    Zero { at: u64, n: u64, unmap: bool },
    Discard { at: u64, n: u64 },
    Compressed { at: u64, n: u64 },
}

impl Req {
    fn range(&self) -> (u64, u64) {
        match *self {
            Req::Write { at, n }
            | Req::Zero { at, n, .. }
            | Req::Discard { at, n }
            | Req::Compressed { at, n } => (at, at + n),
        }
    }
}

/// A kind of workload: how the image is made and which requests it gets.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub name: &'static str,
    /// The image format: qcow2, or a format whose only metadata change is
    /// a block's allocation (vpc, vdi).
    pub format: &'static str,
    pub cluster_size: u64,
    pub extended_l2: bool,
    pub lazy_refcounts: bool,
    /// The image is an overlay over a backing file full of data.
    pub backing: bool,
    /// Weights of write, zero write, discard and compressed write.
    pub mix: [u64; 4],
    /// What else happens between batches.
    pub extra: Extra,
}

/// Metadata operations a workload runs between its batches, alone (QEMU
/// drains the node for each, and a tool needs the image to itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extra {
    None,
    /// Internal snapshots created, applied and deleted.
    Snapshots,
    /// `amend`: refcount width, compat 0.10 and 1.1, lazy refcounts.
    Amend,
    /// The guest disk shrunk and grown.
    Resize,
    /// Persistent dirty bitmaps added, removed, stored at close, loaded
    /// at open, and changed by `strata-img bitmap`.
    Bitmaps,
    /// A strata-io process writes and dies with refcounts left behind
    /// (lazy refcounts); `strata-img check -r all` or the next open
    /// repairs them.
    Repair,
    /// `strata-img commit` of the overlay into its backing file, which is
    /// the image the log is written under.
    Commit,
    /// `strata-img rebase` (safe) between two backing files and none.
    Rebase,
}

/// The image the log records, as a json: file name: the format over
/// blklogwrites, appending to the log so that every opener (the test, a
/// tool) adds to one record.
pub fn logged_json(format: &str, image: &str, log: &str) -> String {
    let json = serde_json::json!({
        "driver": format,
        "file": {
            "driver": "blklogwrites",
            "file": {"driver": "file", "filename": image},
            "log": {"driver": "file", "filename": log},
            "log-append": true,
        },
    });
    format!("json:{json}")
}

pub async fn open(filename: &str) -> Arc<Node> {
    let ctx = OpenCtx::new(strata_drivers::registry(), OpenFlags::default());
    ctx.open_image(Some(filename), None, Opts::new())
        .await
        .unwrap_or_else(|e| panic!("open {filename}: {e}"))
}

/// Picks the requests of one batch: none overlaps another of the batch,
/// so whatever order they complete in, each sector has one known value.
fn batch(rng: &mut Rng, w: &Workload, sectors: u64, compressed_ok: &mut [bool]) -> Vec<Req> {
    let cs = w.cluster_size / SECTOR;
    let mut taken: Vec<(u64, u64)> = Vec::new();
    let mut reqs = Vec::new();
    let total: u64 = w.mix.iter().sum();
    for _ in 0..1 + rng.below(16) {
        let mut pick = rng.below(total);
        let kind = w.mix.iter().position(|&m| {
            if pick < m {
                true
            } else {
                pick -= m;
                false
            }
        });
        let req = match kind {
            Some(0) => {
                let at = rng.below(sectors);
                let longest = if rng.chance(1, 4) { 512 } else { 64 };
                let n = (1 + rng.below(longest)).min(sectors - at);
                Req::Write { at, n }
            }
            Some(1) => {
                let at = rng.below(sectors);
                let n = (1 + rng.below(384)).min(sectors - at);
                Req::Zero {
                    at,
                    n,
                    unmap: rng.chance(1, 2),
                }
            }
            Some(2) => {
                // Whole clusters: qcow2 ignores discards of parts of one.
                let clusters = sectors / cs;
                let c = rng.below(clusters);
                let n = (1 + rng.below(4)).min(clusters - c);
                Req::Discard {
                    at: c * cs,
                    n: n * cs,
                }
            }
            _ => {
                // Compressed clusters go where nothing was written yet.
                let c = rng.below(sectors / cs);
                if !compressed_ok[c as usize] {
                    continue;
                }
                Req::Compressed { at: c * cs, n: cs }
            }
        };
        let (a, b) = req.range();
        if taken.iter().any(|&(x, y)| a < y && x < b) {
            continue;
        }
        taken.push((a, b));
        if let Req::Compressed { at, .. } = req {
            compressed_ok[(at / cs) as usize] = false;
        } else {
            let (c0, c1) = (a / cs, b.div_ceil(cs));
            compressed_ok[c0 as usize..c1 as usize].fill(false);
        }
        reqs.push(req);
    }
    reqs
}

/// Runs one request; its data is the request's tags.
async fn run_req(node: &Node, req: Req, op: u32) {
    let data = |at: u64, n: u64| {
        let mut buf = IoBuf::zeroed((n * SECTOR) as usize);
        for (i, chunk) in buf.as_mut_slice().chunks_mut(SECTOR as usize).enumerate() {
            chunk.copy_from_slice(&tag(op, at + i as u64));
        }
        buf
    };
    let r = match req {
        Req::Write { at, n } => node
            .write(at * SECTOR, data(at, n), WriteFlags::default())
            .await
            .map(drop),
        Req::Zero { at, n, unmap } => {
            let flags = WriteFlags {
                may_unmap: unmap,
                ..WriteFlags::default()
            };
            node.write_zeroes(at * SECTOR, n * SECTOR, flags).await
        }
        Req::Discard { at, n } => node.discard(at * SECTOR, n * SECTOR).await,
        Req::Compressed { at, n } => node
            .write_compressed(at * SECTOR, data(at, n))
            .await
            .map(drop),
    };
    r.unwrap_or_else(|e| panic!("{req:?} failed: {e}"));
}

/// The entry count in the log's superblock (none before the first flush
/// that had something to log).
pub fn log_entries(log: &str) -> u64 {
    // The count alone: the log grows with every write, and this runs at
    // every flush.
    let f = std::fs::File::open(log).unwrap();
    let mut n = [0u8; 8];
    match std::os::unix::fs::FileExt::read_exact_at(&f, &mut n, 16) {
        Ok(()) => u64::from_le_bytes(n),
        Err(_) => 0,
    }
}

/// What the recording knows of the image under the log while the
/// workload runs.
pub struct Model {
    /// What the guest reads now, sector by sector.
    pub current: Vec<Version>,
    /// Every change to the logged image, in order.
    pub reqs: Vec<((u64, u64), Version)>,
    pub flushes: Vec<FlushPoint>,
    /// The guest size now, in sectors, and every size set.
    pub size: u64,
    pub resizes: Vec<u64>,
    pub log: String,
}

impl Model {
    /// Records a flush of the logged image, holding `durable`.
    pub fn flushed(&mut self, durable: Vec<Version>) {
        self.flushes.push(FlushPoint {
            nr_entries: log_entries(&self.log),
            reqs_done: self.reqs.len(),
            durable,
            size: self.size,
            resizes_done: self.resizes.len(),
        });
    }

    /// Sets sectors `a..e` to `v`, a change the logged image sees.
    pub fn set(&mut self, a: u64, e: u64, v: Version) {
        self.current[a as usize..e as usize].fill(v);
        self.reqs.push(((a, e), v));
    }
}

/// Makes the image, runs `batches` batches of requests on it through
/// blklogwrites and returns what the cuts need.
pub fn record(w: Workload, seed: u64, batches: usize, qemu_img: &str) -> Recording {
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let image = path(dir.path(), &format!("image.{}", w.format));
    let backing = path(dir.path(), "backing.qcow2");
    let log = path(dir.path(), "log");
    let size = SIZE.to_string();
    let mut initial = vec![0u8; SIZE as usize];
    if w.backing {
        let (code, out) = run(qemu_img, &["create", "-q", "-f", "qcow2", &backing, &size]);
        assert_eq!(code, 0, "{out}");
        let io = qemu_tool("qemu-io").expect("qemu-io");
        let (code, out) = run(&io, &["-f", "qcow2", "-c", "write -P 0x5a 0 3M", &backing]);
        assert_eq!(code, 0, "{out}");
        initial[..3 << 20].fill(0x5a);
    }
    // Commit writes into the backing file: that is the image to log.
    let logged = if w.extra == Extra::Commit {
        &backing
    } else {
        &image
    };
    let logged_name = logged_json(w.format, logged, &log);
    let o = format!(
        "cluster_size={},extended_l2={},lazy_refcounts={}",
        w.cluster_size,
        if w.extended_l2 { "on" } else { "off" },
        if w.lazy_refcounts { "on" } else { "off" },
    );
    let mut opts = match w.format {
        "qcow2" => vec!["create", "-q", "-f", "qcow2", "-o", &o],
        // The size as given, not grown to a geometry.
        "vpc" => vec!["create", "-q", "-f", "vpc", "-o", "force_size=on"],
        other => vec!["create", "-q", "-f", other],
    };
    if w.extra == Extra::Commit {
        opts.extend(["-u", "-b", &logged_name, "-F", "qcow2"]);
    } else if w.backing {
        opts.extend(["-b", &backing, "-F", "qcow2"]);
    }
    opts.extend([image.as_str(), size.as_str()]);
    let (code, out) = run(qemu_img, &opts);
    assert_eq!(code, 0, "{out}");
    std::fs::write(&log, b"").unwrap();
    let base = std::fs::read(logged).unwrap();

    let guest_name = if w.extra == Extra::Commit {
        image.clone()
    } else {
        logged_name.clone()
    };
    let mut s = Session::new(&guest_name, &logged_name);
    let cs = (w.cluster_size / SECTOR) as usize;
    let sectors = (SIZE / SECTOR) as usize;
    let mut compressed_ok = vec![!w.backing; sectors / cs];
    let mut m = Model {
        current: vec![Version::Initial; sectors],
        reqs: Vec::new(),
        flushes: Vec::new(),
        size: SIZE / SECTOR,
        resizes: Vec::new(),
        log: log.clone(),
    };
    // The guest writes to the logged image, except under commit, where
    // the logged backing file changes only when the overlay is committed.
    let guest_logged = w.extra != Extra::Commit;
    let mut state = tool_ops::State::new(w.extra, dir.path(), &backing, qemu_img);
    let mut ops = 0u32;
    for _ in 0..batches {
        if w.extra != Extra::None && rng.chance(1, 3) {
            match w.extra {
                Extra::Snapshots => snapshot_op(&mut s, &mut rng, &mut state, &mut m),
                Extra::Amend => amend_op(&mut s, &mut rng),
                Extra::Resize => resize_op(&mut s, &mut rng, &w, &mut m),
                Extra::Bitmaps => tool_ops::bitmap_op(&mut s, &mut rng, &mut state),
                Extra::Repair => tool_ops::repair_op(&mut s, &mut rng, &mut m),
                Extra::Commit => tool_ops::commit_op(&mut s, &mut rng, &mut state, &mut m),
                Extra::Rebase => tool_ops::rebase_op(&mut s, &mut rng, &mut state, &mut m),
                Extra::None => {}
            }
            continue;
        }
        let b = batch(&mut rng, &w, m.size, &mut compressed_ok);
        let node = s.node();
        s.ev.block_on(futures::future::join_all(
            b.iter()
                .enumerate()
                .map(|(i, &r)| run_req(&node, r, ops + i as u32)),
        ));
        for (i, r) in b.iter().enumerate() {
            let v = match r {
                Req::Write { .. } | Req::Compressed { .. } => Version::Op(ops + i as u32),
                Req::Zero { .. } | Req::Discard { .. } => Version::Zero,
            };
            let (a, e) = r.range();
            if guest_logged {
                m.set(a, e, v);
            } else {
                m.current[a as usize..e as usize].fill(v);
            }
        }
        ops += b.len() as u32;
        if rng.chance(1, 2) {
            s.ev.block_on(node.flush()).unwrap();
            if guest_logged {
                m.flushed(m.current.clone());
            }
        }
    }
    // A lazy-refcounts image is cut before its clean close too, as a
    // killed process leaves it: the close is part of the log like the rest.
    s.close();
    let log_bytes = std::fs::read(&log).unwrap();
    let (_, records) = parse_log(&log_bytes).expect("the log parses");
    Recording {
        format: w.format,
        image: logged.clone(),
        dir,
        base,
        log: log_bytes,
        records,
        initial,
        reqs: m.reqs,
        resizes: m.resizes,
        flushes: m.flushes,
    }
}

/// Creates, applies or deletes an internal snapshot, alone, as QEMU does
/// them with the node drained. Applying one may leave every sector as the
/// snapshot has it.
fn snapshot_op(s: &mut Session, rng: &mut Rng, state: &mut tool_ops::State, m: &mut Model) {
    use strata_block::snapshot;
    let node = s.node();
    let snaps = &mut state.snapshots;
    match rng.below(3) {
        0 if !snaps.is_empty() => {
            let i = rng.below(snaps.len() as u64) as usize;
            let (name, content) = &snaps[i];
            s.ev.block_on(snapshot::goto(&node, name))
                .unwrap_or_else(|e| panic!("apply {name}: {e}"));
            for (i, &v) in content.iter().enumerate() {
                m.set(i as u64, i as u64 + 1, v);
            }
        }
        1 if !snaps.is_empty() => {
            let i = rng.below(snaps.len() as u64) as usize;
            let (name, _) = snaps.remove(i);
            s.ev.block_on(snapshot::delete(&node, None, Some(&name)))
                .unwrap_or_else(|e| panic!("delete {name}: {e}"));
        }
        _ => {
            state.made += 1;
            let name = format!("s{}", state.made);
            let sn = strata_block::driver::SnapshotInfo {
                name: name.clone(),
                ..Default::default()
            };
            s.ev.block_on(snapshot::create(&node, &sn))
                .unwrap_or_else(|e| panic!("create {name}: {e}"));
            snaps.push((name, m.current.clone()));
        }
    }
}

/// `amend` of the open image: a refcount width, compat 0.10 or 1.1, or
/// lazy refcounts on or off, with what each needs (0.10 has 16-bit
/// refcounts and no lazy refcounts).
fn amend_op(s: &mut Session, rng: &mut Rng) {
    let mut o = Opts::new();
    let mut set = |k: &str, v: &str| o.insert(k.into(), v.to_string().into());
    match rng.below(4) {
        0 => {
            let bits = 1u64 << rng.below(7);
            set("refcount_bits", &bits.to_string());
            if bits != 16 {
                set("compat", "1.1");
            }
        }
        1 => {
            set("compat", "0.10");
            set("refcount_bits", "16");
            set("lazy_refcounts", "off");
        }
        2 => {
            set("compat", "1.1");
        }
        _ => {
            let on = rng.chance(1, 2);
            set("lazy_refcounts", if on { "on" } else { "off" });
            set("compat", "1.1");
        }
    }
    let what = format!("{o:?}");
    let node = s.node();
    s.ev.block_on(node.driver().amend(o, false, &|_, _| {}))
        .unwrap_or_else(|e| panic!("amend {what}: {e}"));
}

/// Shrinks or grows the guest disk by whole clusters.
fn resize_op(s: &mut Session, rng: &mut Rng, w: &Workload, m: &mut Model) {
    let cs = w.cluster_size / SECTOR;
    let new = (1 + rng.below(SIZE / w.cluster_size)) * cs;
    let node = s.node();
    s.ev.block_on(node.truncate(new * SECTOR, false, strata_block::Preallocation::Off))
        .unwrap_or_else(|e| panic!("resize to {new} sectors: {e}"));
    let old = m.size;
    m.size = new;
    m.resizes.push(new);
    if new < old {
        // Cut off, and zeroes if it grows back.
        m.set(new, old, Version::Zero);
    }
}
