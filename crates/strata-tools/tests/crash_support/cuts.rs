//! How a recorded workload's log is cut and a cut checked, for
//! crash_points.rs: the replay (everything to the last flush, then a
//! random, reordered, partly torn subset) and what a cut must hold.

use super::{check, path, run, tag, Recording, Rng, Version, SECTOR, SIZE};
use std::collections::HashMap;
use strata_block::options::Opts;
use strata_block::{EventLoop, IoBuf, OpenCtx, OpenFlags};
use strata_drivers::filters::blklogwrites::{LogRecord, LOG_DISCARD, LOG_FLUSH};

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
    let pending: Vec<&LogRecord> = rec.records[stable..cut].iter().collect();
    // Header rewrites are torn too: Strata plans them so that a torn one
    // still leaves the old header or the new one (header_write.rs).
    for (r, keep) in rng.crash_subset(&pending) {
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

/// Checks one cut; an error says what is wrong with it.
pub fn check_cut(rec: &Recording, cut: usize, rng: &mut Rng, qemu_img: &str) -> Result<(), String> {
    let (img, guest_flushes) = replay(rec, cut, rng);
    let file = path(rec.dir.path(), &format!("cut.{}", rec.format));
    std::fs::write(&file, &img).unwrap();
    // STRATA_CRASH_KEEP=DIR keeps a failing cut there, to look at.
    if let Err(e) = check::check_crashed(qemu_img, &file, rec.format) {
        if let Some(dir) = std::env::var_os("STRATA_CRASH_KEEP") {
            let name = format!("cut.{}", rec.format);
            let _ = std::fs::write(std::path::Path::new(&dir).join(name), &img);
        }
        return Err(e);
    }
    let raw = path(rec.dir.path(), "cut.raw");
    let (code, out) = run(
        qemu_img,
        &["convert", "-U", "-f", rec.format, "-O", "raw", &file, &raw],
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
            .open_image(Some(&file), Some(rec.format), Opts::new())
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
                Version::Pattern(p) => vec![p; SECTOR as usize],
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
