//! Crash-point tests. A workload runs on a qcow2 image whose file sits
//! under `blklogwrites`, with many requests in flight and flushes between
//! batches; the log then holds every write and flush that reached the
//! file. Each cut replays the log from the image as it was before the
//! workload: every entry up to the last flush before the cut, then a random
//! subset of the entries between that flush and the cut, in a random order,
//! some torn at a sector boundary. Every cut must pass `qemu-img check`
//! (leaks allowed; `-r all` on a lazy-refcounts image, which must then
//! succeed), read the same through QEMU and Strata, and hold every write
//! completed before the last flush of the guest: each guest sector reads as
//! it was then, or as a later request left it.
//!
//! CI runs a fixed seed and a bounded number of cuts per workload. A soak:
//! `STRATA_CRASH_SEED=N STRATA_CRASH_SECS=S cargo test --release -p
//! strata-drivers --test crash_points soak -- --ignored --nocapture`
//! (or `scripts/crash-soak`).

mod common;
mod crash_cuts;

use crash_cuts::{check_cut, path, tag, FlushPoint, Recording, Rng, Version, SECTOR, SIZE};
use std::sync::Arc;
use strata_block::options::Opts;
use strata_block::{EventLoop, IoBuf, Node, OpenCtx, OpenFlags, WriteFlags};
use strata_drivers::filters::blklogwrites::parse_log;

/// One guest request (offsets and lengths in sectors).
#[derive(Clone, Copy, Debug)]
enum Req {
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
struct Workload {
    name: &'static str,
    cluster_size: u64,
    extended_l2: bool,
    lazy_refcounts: bool,
    /// The image is an overlay over a backing file full of data.
    backing: bool,
    /// Weights of write, zero write, discard and compressed write.
    mix: [u64; 4],
    /// What else happens between batches.
    extra: Extra,
}

/// Metadata operations a workload runs between its batches, alone (QEMU
/// drains the node for each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extra {
    None,
    /// Internal snapshots created, applied and deleted.
    Snapshots,
    /// `amend -o refcount_bits=N`: the refcount structures rewritten.
    RefcountWidth,
    /// The guest disk shrunk and grown.
    Resize,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "allocation",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [1, 0, 0, 0],
    },
    Workload {
        name: "small-clusters",
        cluster_size: 512,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [6, 1, 1, 0],
    },
    Workload {
        name: "backing-cow",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: true,
        extra: Extra::None,
        mix: [6, 2, 1, 0],
    },
    Workload {
        name: "zero-discard",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [3, 3, 3, 0],
    },
    Workload {
        name: "compressed",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [3, 1, 1, 3],
    },
    Workload {
        name: "subclusters",
        cluster_size: 65536,
        extended_l2: true,
        lazy_refcounts: false,
        backing: true,
        extra: Extra::None,
        mix: [6, 3, 1, 0],
    },
    Workload {
        name: "lazy-refcounts",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: true,
        backing: false,
        extra: Extra::None,
        mix: [6, 2, 2, 0],
    },
    Workload {
        name: "snapshots",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::Snapshots,
        mix: [6, 2, 1, 0],
    },
    Workload {
        name: "refcount-width",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::RefcountWidth,
        mix: [6, 2, 1, 0],
    },
    Workload {
        name: "resize",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::Resize,
        mix: [6, 2, 1, 0],
    },
];

async fn open_logged(image: &str, log: &str) -> Arc<Node> {
    let json = serde_json::json!({
        "driver": "qcow2",
        "file": {
            "driver": "blklogwrites",
            "file": {"driver": "file", "filename": image},
            "log": {"driver": "file", "filename": log},
        },
    });
    let ctx = OpenCtx::new(strata_drivers::registry(), OpenFlags::default());
    ctx.open_image(Some(&format!("json:{json}")), None, Opts::new())
        .await
        .expect("open the image over blklogwrites")
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
fn log_entries(log: &str) -> u64 {
    let b = std::fs::read(log).unwrap();
    b.get(16..24)
        .map_or(0, |n| u64::from_le_bytes(n.try_into().unwrap()))
}

/// Makes the image, runs `batches` batches of requests on it through
/// blklogwrites and returns what the cuts need.
fn record(w: Workload, seed: u64, batches: usize, qemu_img: &str) -> Recording {
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let image = path(dir.path(), "image.qcow2");
    let log = path(dir.path(), "log");
    let ev = EventLoop::new().unwrap();
    let size = SIZE.to_string();
    let mut opts = vec!["create", "-q", "-f", "qcow2"];
    let o = format!(
        "cluster_size={},extended_l2={},lazy_refcounts={}",
        w.cluster_size,
        if w.extended_l2 { "on" } else { "off" },
        if w.lazy_refcounts { "on" } else { "off" },
    );
    opts.extend(["-o", &o]);
    let mut initial = vec![0u8; SIZE as usize];
    if w.backing {
        let backing = path(dir.path(), "backing.qcow2");
        let (code, out) = common::run(qemu_img, &["create", "-q", "-f", "qcow2", &backing, &size]);
        assert_eq!(code, 0, "{out}");
        let io = common::qemu_tool("qemu-io").expect("qemu-io");
        let (code, out) = common::run(&io, &["-f", "qcow2", "-c", "write -P 0x5a 0 3M", &backing]);
        assert_eq!(code, 0, "{out}");
        initial[..3 << 20].fill(0x5a);
        opts.extend(["-b", "backing.qcow2", "-F", "qcow2"]);
    }
    opts.extend([image.as_str(), size.as_str()]);
    let (code, out) = common::run(qemu_img, &opts);
    assert_eq!(code, 0, "{out}");
    std::fs::write(&log, b"").unwrap();
    let base = std::fs::read(&image).unwrap();

    let node = ev.block_on(open_logged(&image, &log));
    let cs = (w.cluster_size / SECTOR) as usize;
    let mut compressed_ok = vec![!w.backing; (SIZE / SECTOR) as usize / cs];
    let mut current = vec![Version::Initial; (SIZE / SECTOR) as usize];
    let mut reqs = Vec::new();
    let mut flushes = Vec::new();
    let mut snaps: Vec<(String, Vec<Version>)> = Vec::new();
    let mut made = 0;
    let mut size = SIZE / SECTOR;
    let mut resizes = Vec::new();
    for _ in 0..batches {
        if w.extra != Extra::None && rng.chance(1, 3) {
            match w.extra {
                Extra::Snapshots => snapshot_op(
                    &ev,
                    &node,
                    &mut rng,
                    &mut snaps,
                    &mut made,
                    &mut current,
                    &mut reqs,
                ),
                Extra::RefcountWidth => {
                    let bits = 1u64 << rng.below(7);
                    let mut o = Opts::new();
                    o.insert("refcount_bits".into(), bits.to_string().into());
                    ev.block_on(node.driver().amend(o, false, &|_, _| {}))
                        .unwrap_or_else(|e| panic!("amend refcount_bits={bits}: {e}"));
                }
                Extra::Resize => {
                    let cs = w.cluster_size / SECTOR;
                    let new = (1 + rng.below(SIZE / w.cluster_size)) * cs;
                    ev.block_on(node.truncate(
                        new * SECTOR,
                        false,
                        strata_block::Preallocation::Off,
                    ))
                    .unwrap_or_else(|e| panic!("resize to {new} sectors: {e}"));
                    if new < size {
                        // Cut off, and zeroes if it grows back.
                        current[new as usize..size as usize].fill(Version::Zero);
                        reqs.push(((new, size), Version::Zero));
                    }
                    size = new;
                    resizes.push(size);
                }
                Extra::None => {}
            }
            continue;
        }
        let b = batch(&mut rng, &w, size, &mut compressed_ok);
        let first = reqs.len() as u32;
        ev.block_on(futures::future::join_all(
            b.iter()
                .enumerate()
                .map(|(i, &r)| run_req(&node, r, first + i as u32)),
        ));
        for (i, r) in b.iter().enumerate() {
            let v = match r {
                Req::Write { .. } | Req::Compressed { .. } => Version::Op(first + i as u32),
                Req::Zero { .. } | Req::Discard { .. } => Version::Zero,
            };
            let (a, e) = r.range();
            current[a as usize..e as usize].fill(v);
            reqs.push(((a, e), v));
        }
        if rng.chance(1, 2) {
            ev.block_on(node.flush()).unwrap();
            flushes.push(FlushPoint {
                nr_entries: log_entries(&log),
                reqs_done: reqs.len(),
                durable: current.clone(),
                size,
                resizes_done: resizes.len(),
            });
        }
    }
    // A lazy-refcounts image is cut before its clean close too, as a
    // killed process leaves it: the close is part of the log like the rest.
    ev.block_on(node.close()).unwrap();
    drop(node);
    let log_bytes = std::fs::read(&log).unwrap();
    let (_, records) = parse_log(&log_bytes).expect("the log parses");
    Recording {
        dir,
        lazy_refcounts: w.lazy_refcounts,
        base,
        log: log_bytes,
        records,
        initial,
        reqs,
        resizes,
        flushes,
    }
}

/// Creates, applies or deletes an internal snapshot, alone, as QEMU does
/// them with the node drained. Applying one may leave every sector as the
/// snapshot has it.
fn snapshot_op(
    ev: &EventLoop,
    node: &Arc<Node>,
    rng: &mut Rng,
    snaps: &mut Vec<(String, Vec<Version>)>,
    made: &mut u32,
    current: &mut [Version],
    reqs: &mut Vec<((u64, u64), Version)>,
) {
    use strata_block::snapshot;
    match rng.below(3) {
        0 if !snaps.is_empty() => {
            let i = rng.below(snaps.len() as u64) as usize;
            let (name, content) = &snaps[i];
            ev.block_on(snapshot::goto(node, name))
                .unwrap_or_else(|e| panic!("apply {name}: {e}"));
            for (s, &v) in content.iter().enumerate() {
                reqs.push(((s as u64, s as u64 + 1), v));
            }
            current.copy_from_slice(content);
        }
        1 if !snaps.is_empty() => {
            let i = rng.below(snaps.len() as u64) as usize;
            let (name, _) = snaps.remove(i);
            ev.block_on(snapshot::delete(node, None, Some(&name)))
                .unwrap_or_else(|e| panic!("delete {name}: {e}"));
        }
        _ => {
            *made += 1;
            let name = format!("s{made}");
            let sn = strata_block::driver::SnapshotInfo {
                name: name.clone(),
                ..Default::default()
            };
            ev.block_on(snapshot::create(node, &sn))
                .unwrap_or_else(|e| panic!("create {name}: {e}"));
            snaps.push((name, current.to_vec()));
        }
    }
}

/// Records a workload and checks `cuts` cut points of its log, the last
/// entry always among them.
fn crash_points(w: Workload, seed: u64, batches: usize, cuts: usize) -> usize {
    let Some(qemu_img) = common::qemu_tool("qemu-img") else {
        return 0;
    };
    let rec = record(w, seed, batches, &qemu_img);
    let mut rng = Rng(seed ^ 0x5eed);
    let n = rec.records.len();
    assert!(n > 0, "{}: nothing was logged", w.name);
    for i in 0..cuts {
        let cut = if i == 0 {
            n
        } else {
            1 + rng.below(n as u64) as usize
        };
        if let Err(e) = check_cut(&rec, cut, &mut rng, &qemu_img) {
            panic!("{} (seed {seed}): cut at entry {cut} of {n}: {e}", w.name);
        }
    }
    cuts
}

fn workload(name: &str) -> Workload {
    *WORKLOADS.iter().find(|w| w.name == name).unwrap()
}

#[test]
fn crash_points_allocation() {
    crash_points(workload("allocation"), 1, 12, 40);
}

#[test]
fn crash_points_small_clusters() {
    crash_points(workload("small-clusters"), 2, 12, 40);
}

#[test]
fn crash_points_backing_cow() {
    crash_points(workload("backing-cow"), 3, 12, 40);
}

#[test]
fn crash_points_zero_discard() {
    crash_points(workload("zero-discard"), 4, 12, 40);
}

#[test]
fn crash_points_compressed() {
    crash_points(workload("compressed"), 5, 12, 40);
}

#[test]
fn crash_points_subclusters() {
    crash_points(workload("subclusters"), 6, 12, 40);
}

#[test]
fn crash_points_lazy_refcounts() {
    crash_points(workload("lazy-refcounts"), 7, 12, 40);
}

#[test]
fn crash_points_snapshots() {
    crash_points(workload("snapshots"), 8, 16, 40);
}

#[test]
fn crash_points_refcount_width() {
    crash_points(workload("refcount-width"), 9, 16, 40);
}

#[test]
fn crash_points_resize() {
    crash_points(workload("resize"), 10, 16, 40);
}

/// The long run: every workload in turn with seeds from STRATA_CRASH_SEED
/// for STRATA_CRASH_SECS seconds; prints the cuts tried.
#[test]
#[ignore]
fn soak() {
    let seed: u64 = std::env::var("STRATA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let secs: u64 = std::env::var("STRATA_CRASH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let (mut cuts, mut runs) = (0, 0);
    let mut s = seed;
    while std::time::Instant::now() < end {
        for &w in WORKLOADS {
            cuts += crash_points(w, s, 24, 50);
            runs += 1;
        }
        s += 1;
    }
    println!("crash soak: seeds {seed}..{s}, {runs} workloads recorded, {cuts} cut points, none lost data");
}
