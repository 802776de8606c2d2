//! `check -r all` against qemu-img's on images damaged by hand, the kinds
//! of damage QEMU's iotests 060 and 108 build (they need a full QEMU, so
//! they cannot run here), written anew: refcounts too low or too high,
//! refcount blocks lost or misplaced, COPIED flags wrong either way, two
//! references to one cluster, metadata overlapping metadata. Each damaged
//! image is repaired by both tools; both must report the same and leave
//! an image that qemu-img checks clean, with the same guest data.

use std::path::Path;
use std::process::Command;

mod img_support;

use img_support::{qemu_img, run, strata_as_qemu_img};

const CLUSTER: u64 = 4096;

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

fn put16(b: &mut [u8], at: u64, v: u16) {
    b[at as usize..at as usize + 2].copy_from_slice(&v.to_be_bytes());
}

/// Where the metadata of the test image lies.
struct Layout {
    l1: u64,
    reftable: u64,
    /// The first refcount block.
    refblock: u64,
    /// The L2 table of guest cluster 0.
    l2: u64,
}

impl Layout {
    fn of(b: &[u8]) -> Layout {
        let l1 = be64(b, 40);
        let reftable = be64(b, 48);
        Layout {
            l1,
            reftable,
            refblock: be64(b, reftable),
            l2: be64(b, l1) & 0x00ff_ffff_ffff_fe00,
        }
    }
    /// The host offset of guest cluster `i`'s data.
    fn data(&self, b: &[u8], i: u64) -> u64 {
        be64(b, self.l2 + 8 * i) & 0x00ff_ffff_ffff_fe00
    }
}

const COPIED: u64 = 1 << 63;

/// What Strata's repair must give, beside qemu-img's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The same output, byte for byte, and the same exit code.
    Same,
    /// A result qemu-img checks no worse than qemu-img's own repair (where
    /// the texts differ: see docs/reliability.md).
    NoWorse,
    /// A result qemu-img checks clean, where qemu-img's own repair leaves
    /// corruption.
    Better,
}

type Damage = (&'static str, Expect, fn(&mut Vec<u8>));

/// How bad `qemu-img check`'s exit code says an image is: clean, leaks,
/// corruptions, not checkable.
fn badness(code: i32) -> u8 {
    match code {
        0 => 0,
        3 => 1,
        2 => 2,
        _ => 3,
    }
}

/// The damages, each a change of the image's bytes.
fn damages() -> Vec<Damage> {
    use Expect::*;
    vec![
        ("data cluster refcount zero", Same, |b| {
            let l = Layout::of(b);
            let c = l.data(b, 3) / CLUSTER;
            put16(b, l.refblock + 2 * c, 0);
        }),
        ("data cluster refcount too high (leak)", Same, |b| {
            let l = Layout::of(b);
            let c = l.data(b, 5) / CLUSTER;
            put16(b, l.refblock + 2 * c, 3);
        }),
        ("unused cluster with a refcount (leak)", Same, |b| {
            let l = Layout::of(b);
            let end = b.len() as u64 / CLUSTER;
            put16(b, l.refblock + 2 * (end + 2), 1);
        }),
        ("refcount table entry zeroed", Same, |b| {
            let l = Layout::of(b);
            put64(b, l.reftable, 0);
        }),
        ("refcount table entry unaligned", Better, |b| {
            let l = Layout::of(b);
            put64(b, l.reftable, l.refblock + 512);
        }),
        ("refcount table entry past the end", NoWorse, |b| {
            let l = Layout::of(b);
            put64(b, l.reftable, 1 << 40);
        }),
        ("refcount block on the L2 table", NoWorse, |b| {
            let l = Layout::of(b);
            put64(b, l.reftable, l.l2);
        }),
        ("L2 COPIED flag missing", Same, |b| {
            let l = Layout::of(b);
            let e = be64(b, l.l2 + 8 * 7);
            put64(b, l.l2 + 8 * 7, e & !COPIED);
        }),
        ("L2 COPIED flag on a shared cluster", Same, |b| {
            let l = Layout::of(b);
            let e = be64(b, l.l2 + 8 * 9);
            put64(b, l.l2 + 8 * 9, e | COPIED);
        }),
        ("L1 COPIED flag missing", Same, |b| {
            let l = Layout::of(b);
            let e = be64(b, l.l1);
            put64(b, l.l1, e & !COPIED);
        }),
        ("two guest clusters on one host cluster", Same, |b| {
            let l = Layout::of(b);
            let e = be64(b, l.l2 + 8);
            put64(b, l.l2 + 8 * 2, e);
        }),
        ("L2 entry unaligned", Same, |b| {
            let l = Layout::of(b);
            let e = be64(b, l.l2 + 8 * 4);
            put64(b, l.l2 + 8 * 4, e + 512);
        }),
        ("L2 entry on the refcount table", Same, |b| {
            let l = Layout::of(b);
            put64(b, l.l2 + 8 * 6, COPIED | l.reftable);
        }),
        // What a crash leaves when an L2 entry was written but the data
        // write that would have grown the file was lost.
        ("data cluster past the end of the file", Better, |b| {
            let l = Layout::of(b);
            let past = b.len() as u64 + 3 * CLUSTER;
            put64(b, l.l2 + 8 * 3, COPIED | past);
        }),
        ("L1 entry on the refcount block", Better, |b| {
            let l = Layout::of(b);
            put64(b, l.l1, COPIED | l.refblock);
        }),
    ]
}

#[test]
fn check_repairs_every_damage_as_qemu_img_does() {
    let Some(qi) = qemu_img() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ours = strata_as_qemu_img(dir);
    let theirs = Path::new(qi);
    let sh = |script: &str| {
        let st = Command::new("sh")
            .args(["-c", script])
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
    };
    // 16 data clusters, then a snapshot, then guest clusters 0-7 rewritten:
    // 8-15 are shared with the snapshot (refcount 2), 0-7 are not.
    sh(
        "qemu-img create -q -f qcow2 -o cluster_size=4096 pristine.qcow2 1M && \
        qemu-io -f qcow2 -c 'write -P 1 0 64k' pristine.qcow2 >/dev/null && \
        qemu-img snapshot -c s1 pristine.qcow2 && \
        qemu-io -f qcow2 -c 'write -P 2 0 32k' pristine.qcow2 >/dev/null",
    );
    let pristine = std::fs::read(dir.join("pristine.qcow2")).unwrap();
    let mut failures = Vec::new();
    for (name, expect, damage) in damages() {
        let mut b = pristine.clone();
        damage(&mut b);
        std::fs::write(dir.join("a.qcow2"), &b).unwrap();
        std::fs::write(dir.join("b.qcow2"), &b).unwrap();
        let q = run(theirs, &["check", "-r", "all", "a.qcow2"], dir);
        let s = run(&ours, &["check", "-r", "all", "b.qcow2"], dir);
        if expect == Expect::Same && q != s {
            failures.push(format!(
                "{name}: check -r all differs\n--- qemu-img ({}):\n{}{}\n--- strata-img ({}):\n{}{}",
                q.2, q.0, q.1, s.2, s.0, s.1
            ));
            continue;
        }
        // What qemu-img thinks of both results, and of their guest data.
        let qa = run(theirs, &["check", "a.qcow2"], dir);
        let qb = run(theirs, &["check", "b.qcow2"], dir);
        if badness(qb.2) > badness(qa.2) {
            failures.push(format!(
                "{name}: after repair qemu-img check exits {} on qemu-img's result, {} on Strata's:\n{}{}",
                qa.2, qb.2, qb.0, qb.1
            ));
            continue;
        }
        if expect == Expect::Better && (qa.2 == 0 || qb.2 != 0) {
            failures.push(format!(
                "{name}: after repair qemu-img check exits {} on qemu-img's result, {} on Strata's (expected worse, clean):\n{}{}",
                qa.2, qb.2, qb.0, qb.1
            ));
            continue;
        }
        if qa.2 == 0 && qb.2 == 0 {
            let c = run(theirs, &["compare", "a.qcow2", "b.qcow2"], dir);
            if c.2 != 0 {
                failures.push(format!("{name}: repaired images differ: {}{}", c.0, c.1));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
