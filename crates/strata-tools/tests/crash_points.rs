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
//! strata-tools --test crash_points soak -- --ignored --nocapture`
//! (or `scripts/crash-soak`).

mod crash_support;

use crash_support::cuts::check_cut;
use crash_support::record::{record, Extra, Workload};
use crash_support::{env_u64, qemu_tool, Rng};
use strata_drivers::filters::blklogwrites::LOG_FLUSH;

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "allocation",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [1, 0, 0, 0],
    },
    Workload {
        name: "small-clusters",
        format: "qcow2",
        cluster_size: 512,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [6, 1, 1, 0],
    },
    Workload {
        name: "backing-cow",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: true,
        extra: Extra::None,
        mix: [6, 2, 1, 0],
    },
    Workload {
        name: "zero-discard",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [3, 3, 3, 0],
    },
    Workload {
        name: "compressed",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [3, 1, 1, 3],
    },
    Workload {
        name: "subclusters",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: true,
        lazy_refcounts: false,
        backing: true,
        extra: Extra::None,
        mix: [6, 3, 1, 0],
    },
    Workload {
        name: "lazy-refcounts",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: true,
        backing: false,
        extra: Extra::None,
        mix: [6, 2, 2, 0],
    },
    Workload {
        name: "snapshots",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::Snapshots,
        mix: [6, 2, 1, 0],
    },
    Workload {
        name: "amend",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::Amend,
        mix: [6, 2, 1, 0],
    },
    Workload {
        name: "resize",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::Resize,
        mix: [6, 2, 1, 0],
    },
    Workload {
        name: "bitmaps",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::Bitmaps,
        mix: [6, 2, 1, 0],
    },
    Workload {
        name: "repair",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: true,
        backing: false,
        extra: Extra::Repair,
        mix: [6, 2, 1, 0],
    },
    Workload {
        name: "commit",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: true,
        extra: Extra::Commit,
        mix: [6, 2, 1, 0],
    },
    Workload {
        name: "rebase",
        format: "qcow2",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: true,
        extra: Extra::Rebase,
        mix: [6, 2, 1, 0],
    },
    // A block's allocation is all the metadata vpc and vdi change: data,
    // then the file's length or the header's count, flushed, then the
    // table's entry. They have no discard and no compression.
    Workload {
        name: "vpc",
        format: "vpc",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [6, 2, 0, 0],
    },
    Workload {
        name: "vdi",
        format: "vdi",
        cluster_size: 65536,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [6, 2, 0, 0],
    },
    // qcow: a cluster (compressed or not) and a new L2 table written,
    // flushed, then the one L1 or L2 entry.
    Workload {
        name: "qcow",
        format: "qcow",
        cluster_size: 4096,
        extended_l2: false,
        lazy_refcounts: false,
        backing: false,
        extra: Extra::None,
        mix: [6, 2, 0, 1],
    },
];

/// Records a workload and checks `cuts` cut points of its log, the last
/// entry always among them.
fn crash_points(w: Workload, seed: u64, batches: usize, cuts: usize) -> usize {
    let Some(qemu_img) = qemu_tool("qemu-img") else {
        return 0;
    };
    let rec = record(w, seed, batches, &qemu_img);
    let mut rng = Rng(seed ^ 0x5eed);
    let n = rec.records.len();
    assert!(n > 0, "{}: nothing was logged", w.name);
    // Half the cuts fall just before a flush, where the most writes are
    // in doubt at once; the rest anywhere.
    let before_flush: Vec<usize> = (0..n)
        .filter(|&i| rec.records[i].entry.flags & LOG_FLUSH != 0 && i > 0)
        .collect();
    for i in 0..cuts {
        let cut = if i == 0 {
            n
        } else if i % 2 == 1 && !before_flush.is_empty() {
            before_flush[rng.below(before_flush.len() as u64) as usize]
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
fn crash_points_vpc() {
    crash_points(workload("vpc"), 1, 12, 100);
}

#[test]
fn crash_points_qcow() {
    crash_points(workload("qcow"), 1, 12, 100);
}

#[test]
fn crash_points_vdi() {
    crash_points(workload("vdi"), 1, 12, 100);
}

#[test]
fn crash_points_allocation() {
    crash_points(workload("allocation"), 1, 12, 100);
}

#[test]
fn crash_points_small_clusters() {
    crash_points(workload("small-clusters"), 2, 12, 100);
}

#[test]
fn crash_points_backing_cow() {
    crash_points(workload("backing-cow"), 3, 12, 100);
}

#[test]
fn crash_points_zero_discard() {
    crash_points(workload("zero-discard"), 4, 12, 100);
}

#[test]
fn crash_points_compressed() {
    crash_points(workload("compressed"), 5, 12, 100);
}

#[test]
fn crash_points_subclusters() {
    crash_points(workload("subclusters"), 6, 12, 100);
}

#[test]
fn crash_points_lazy_refcounts() {
    crash_points(workload("lazy-refcounts"), 7, 12, 100);
}

#[test]
fn crash_points_snapshots() {
    crash_points(workload("snapshots"), 8, 16, 100);
}

#[test]
fn crash_points_amend() {
    crash_points(workload("amend"), 9, 16, 100);
}

#[test]
fn crash_points_resize() {
    crash_points(workload("resize"), 10, 16, 100);
}

#[test]
fn crash_points_bitmaps() {
    crash_points(workload("bitmaps"), 11, 16, 100);
}

#[test]
fn crash_points_repair() {
    crash_points(workload("repair"), 12, 16, 100);
}

#[test]
fn crash_points_commit() {
    crash_points(workload("commit"), 13, 16, 100);
}

#[test]
fn crash_points_rebase() {
    crash_points(workload("rebase"), 14, 16, 100);
}

/// The long run: every workload (or those STRATA_CRASH_ONLY names) in turn with seeds from STRATA_CRASH_SEED
/// for STRATA_CRASH_SECS seconds; prints the cuts tried.
#[test]
#[ignore]
fn soak() {
    let seed = env_u64("STRATA_CRASH_SEED", 1);
    let secs = env_u64("STRATA_CRASH_SECS", 60);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    // STRATA_CRASH_ONLY=name,name: those workloads alone.
    let only = std::env::var("STRATA_CRASH_ONLY").unwrap_or_default();
    let chosen: Vec<Workload> = WORKLOADS
        .iter()
        .filter(|w| only.is_empty() || only.split(',').any(|n| n == w.name))
        .copied()
        .collect();
    assert!(!chosen.is_empty(), "no workload is named {only}");
    let (mut cuts, mut runs) = (0, 0);
    let mut s = seed;
    while std::time::Instant::now() < end {
        for &w in &chosen {
            cuts += crash_points(w, s, 24, 50);
            runs += 1;
        }
        s += 1;
    }
    println!("crash soak: seeds {seed}..{s}, {runs} workloads recorded, {cuts} cut points, none lost data");
}
