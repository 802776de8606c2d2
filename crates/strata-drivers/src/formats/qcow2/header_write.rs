//! Rewriting cluster 0 so that a torn write cannot leave a header that is
//! neither the old one nor the new one.
//!
//! QEMU (qcow2_update_header) rewrites the header, its extensions and the
//! backing file name in one write of the whole cluster. A device that
//! writes only some of its 512-byte sectors before power is lost can pair
//! the old name's length (sector 0) with the new name (a later sector),
//! and the image then names a backing file that never existed.
//!
//! Here the rewrite is planned as steps, each a set of sectors written and
//! then flushed, and a plan is used only if every crash state along it
//! (the state before a step, with any subset of the step's sectors
//! written) parses as the old header or the new one. The plans tried:
//! the sectors after the first, then the first; the first, then the rest;
//! and, when the new extensions or name land where the old header looks,
//! a way through headers that fit in sector 0 alone (`via_sector_zero`).
//! The file ends byte for byte as QEMU's one write leaves it. If no plan
//! is safe, the cluster is written at once, as QEMU does.

use super::header::Header;
use std::sync::Arc;
use strata_block::{IoBuf, Node, Result, WriteFlags};

/// The unit a device may tear a write at.
const SECTOR: usize = 512;

/// More sectors than this changing in one step are not enumerated (2^n
/// states); such a step counts as unsafe.
const MAX_TORN_SECTORS: usize = 10;

/// Sectors to write from one state, then a flush.
#[derive(PartialEq)]
pub(super) struct Step {
    pub writes: Vec<(usize, Vec<u8>)>,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let spans: Vec<String> = self
            .writes
            .iter()
            .map(|(off, b)| format!("{off}+{}", b.len()))
            .collect();
        write!(f, "write {}, flush", spans.join(" "))
    }
}

/// Rewrites cluster 0 from `old` (what the file holds now) to `new`,
/// flushing after every step; `new` is on disk when this returns.
pub(super) async fn write_cluster0(file: &Arc<Node>, old: &[u8], new: &[u8]) -> Result<()> {
    for step in plan(old, new) {
        for (offset, bytes) in step.writes {
            file.write(
                offset as u64,
                IoBuf::from_slice(&bytes),
                WriteFlags::default(),
            )
            .await?;
        }
        file.flush().await?;
    }
    Ok(())
}

/// Reads cluster 0 as it is on disk, zero-padded to `cluster_size` when
/// the file is shorter.
pub(super) async fn read_cluster0(file: &Arc<Node>, cluster_size: usize) -> Result<Vec<u8>> {
    let len = (file.length() as usize).min(cluster_size);
    let mut bytes = file.read(0, IoBuf::zeroed(len)).await?.as_slice().to_vec();
    bytes.resize(cluster_size, 0);
    Ok(bytes)
}

/// The steps that take cluster 0 from `old` to `new` (equal lengths).
pub(super) fn plan(old: &[u8], new: &[u8]) -> Vec<Step> {
    let once = || {
        vec![Step {
            writes: vec![(0, new.to_vec())],
        }]
    };
    let (Some(a), Some(b)) = (meaning(old), meaning(new)) else {
        return once();
    };
    let accept = [a, b];
    if let Some(steps) = hops(&[old.to_vec(), new.to_vec()], &accept) {
        return steps;
    }
    via_sector_zero(old, new)
        .and_then(|states| hops(&states, &accept))
        .unwrap_or_else(once)
}

/// What a header says, leaving out where the backing file name sits (the
/// name itself counts) and the feature name table, which only names bits
/// for messages and is written anew with every header.
fn meaning(buf: &[u8]) -> Option<Header> {
    let mut h = Header::parse(buf).ok()?;
    h.backing_file_offset = 0;
    h.feature_table.clear();
    Some(h)
}

/// Steps through `states` in order, each hop either the later sectors
/// first or sector 0 first, whichever keeps every crash state accepted.
fn hops(states: &[Vec<u8>], accept: &[Header]) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    for pair in states.windows(2) {
        let (from, to) = (&pair[0], &pair[1]);
        let changed: Vec<usize> = (0..from.len().div_ceil(SECTOR))
            .filter(|&s| sector(from, s) != sector(to, s))
            .collect();
        let (first, rest): (Vec<usize>, Vec<usize>) = changed.iter().partition(|&&s| s == 0);
        let orders = [[rest.clone(), first.clone()], [first, rest]];
        let order = orders.into_iter().find(|groups| {
            let mut at = from.clone();
            groups.iter().all(|g| {
                let ok = survives(&at, to, g, accept);
                apply(&mut at, to, g);
                ok
            })
        })?;
        steps.extend(order.iter().filter(|g| !g.is_empty()).map(|g| Step {
            writes: runs(to, g),
        }));
    }
    Some(steps)
}

/// Whether writing `sectors` of `to` over `at`, any subset of them landing,
/// always leaves an accepted header.
fn survives(at: &[u8], to: &[u8], sectors: &[usize], accept: &[Header]) -> bool {
    if sectors.len() > MAX_TORN_SECTORS {
        return false;
    }
    (0u32..1 << sectors.len()).all(|mask| {
        let mut buf = at.to_vec();
        let landed: Vec<usize> = (0..sectors.len())
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| sectors[i])
            .collect();
        apply(&mut buf, to, &landed);
        meaning(&buf).is_some_and(|h| accept.contains(&h))
    })
}

fn sector(buf: &[u8], s: usize) -> &[u8] {
    &buf[s * SECTOR..((s + 1) * SECTOR).min(buf.len())]
}

fn apply(buf: &mut [u8], from: &[u8], sectors: &[usize]) {
    for &s in sectors {
        let r = s * SECTOR..((s + 1) * SECTOR).min(buf.len());
        buf[r.clone()].copy_from_slice(&from[r]);
    }
}

/// The writes for `sectors` of `buf`, neighbours joined.
fn runs(buf: &[u8], sectors: &[usize]) -> Vec<(usize, Vec<u8>)> {
    let mut out: Vec<(usize, Vec<u8>)> = Vec::new();
    for &s in sectors {
        let bytes = sector(buf, s);
        match out.last_mut() {
            Some((off, run)) if *off + run.len() == s * SECTOR => run.extend_from_slice(bytes),
            _ => out.push((s * SECTOR, bytes.to_vec())),
        }
    }
    out
}

/// The way through headers that fit in sector 0: `old`; the old header
/// without its feature name table, its backing file name moved to spare
/// room past everything either header uses; the new header so, its name
/// in other spare room; the new header as it will be, spare room still
/// holding both names; `new`. Each hop then changes one side of sector 0
/// only where the other side does not look. None without room.
fn via_sector_zero(old: &[u8], new: &[u8]) -> Option<Vec<Vec<u8>>> {
    let (ho, hn) = (Header::parse(old).ok()?, Header::parse(new).ok()?);
    let used = |b: &[u8]| b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    // Past the last byte either uses: its extension's padding, then the
    // end-of-extensions marker, which is all zeros.
    let old_spare = used(old).max(used(new)).next_multiple_of(8) + 8;
    let new_spare = old_spare + (ho.backing_file_size as usize).next_multiple_of(8);
    if new_spare + hn.backing_file_size as usize > new.len() {
        return None;
    }
    let old_parked = parked(&ho, old, old_spare)?;
    let new_parked = parked(&hn, &old_parked, new_spare)?;
    let mut placed = new.to_vec();
    placed[old_spare..].copy_from_slice(&new_parked[old_spare..]);
    Some(vec![
        old.to_vec(),
        old_parked,
        new_parked,
        placed,
        new.to_vec(),
    ])
}

/// `under` with sector 0 holding `h` without its feature name table, and
/// `h`'s backing file name at `at`.
fn parked(h: &Header, under: &[u8], at: usize) -> Option<Vec<u8>> {
    let mut h = h.clone();
    let name = h.backing_file.take();
    let compact = h.serialize_with(under.len(), false).ok()?;
    let mut b = under.to_vec();
    let s0 = SECTOR.min(b.len());
    b[..s0].copy_from_slice(&compact[..s0]);
    if let Some(name) = name {
        b[at..at + name.len()].copy_from_slice(name.as_bytes());
        b[8..16].copy_from_slice(&(at as u64).to_be_bytes());
        b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header with 64 KiB clusters and a backing file, as serialized.
    fn header(backing: Option<&str>, format: Option<&str>) -> Vec<u8> {
        header_in(65536, backing, format, None)
    }

    /// A v3 header; `bitmaps`: where a bitmap directory is, if any.
    fn header_in(
        cs: usize,
        backing: Option<&str>,
        format: Option<&str>,
        bitmaps: Option<u64>,
    ) -> Vec<u8> {
        let mut b = vec![0u8; cs];
        b[..4].copy_from_slice(b"QFI\xfb");
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&cs.trailing_zeros().to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        let mut h = Header::parse(&b).expect("a bare header parses");
        h.backing_file = backing.map(str::to_string);
        h.backing_format = format.map(str::to_string);
        if let Some(dir_offset) = bitmaps {
            h.autoclear_features |= super::super::header::AUTOCLEAR_BITMAPS;
            h.bitmaps = Some(super::super::header::BitmapsExt {
                nb_bitmaps: 1,
                dir_size: 40,
                dir_offset,
            });
        }
        h.serialize(cs).expect("the header fits")
    }

    /// Every crash state of every step, each step's sectors landing in
    /// any subset, parses as the old header or the new one.
    fn assert_safe(old: &[u8], new: &[u8]) -> usize {
        let steps = plan(old, new);
        let accept = [meaning(old).unwrap(), meaning(new).unwrap()];
        let mut at = old.to_vec();
        for step in &steps {
            let sectors: Vec<usize> = step
                .writes
                .iter()
                .flat_map(|(off, b)| off / SECTOR..(off + b.len()).div_ceil(SECTOR))
                .collect();
            let mut to = at.clone();
            for (off, b) in &step.writes {
                to[*off..off + b.len()].copy_from_slice(b);
            }
            assert!(survives(&at, &to, &sectors, &accept), "{steps:?}");
            at = to;
        }
        assert_eq!(at, new, "the plan ends on the new cluster");
        steps.len()
    }

    #[test]
    fn a_new_name_where_the_old_one_was_goes_through_sector_zero() {
        let old = header(Some("/images/base.qcow2"), Some("qcow2"));
        let new = header(Some("/images/other-base.qcow2"), Some("qcow2"));
        // One write of the cluster is not safe: sector 0 and the name's
        // sector may land apart.
        let once = [Step {
            writes: vec![(0, new.clone())],
        }];
        let all: Vec<usize> = (0..128).collect();
        let changed: Vec<usize> = all
            .into_iter()
            .filter(|&s| sector(&old, s) != sector(&new, s))
            .collect();
        let accept = [meaning(&old).unwrap(), meaning(&new).unwrap()];
        assert!(!survives(&old, &new, &changed, &accept), "{once:?}");
        assert_eq!(assert_safe(&old, &new), 7);
    }

    #[test]
    fn header_fields_alone_are_one_sector() {
        let old = header(Some("base.qcow2"), Some("qcow2"));
        let mut h = Header::parse(&old).unwrap();
        h.size *= 2;
        let new = h.serialize(65536).unwrap();
        assert_eq!(assert_safe(&old, &new), 1);
        assert_eq!(plan(&old, &new)[0].writes[0].0, 0);
    }

    #[test]
    fn backing_file_added_removed_and_format_changed() {
        let none = header(None, None);
        let a = header(Some("a.qcow2"), Some("qcow2"));
        let b = header(Some("a-much-longer-name-for-b.raw"), Some("raw"));
        for (i, (old, new)) in [(&none, &a), (&a, &none), (&a, &b), (&b, &a)]
            .into_iter()
            .enumerate()
        {
            let steps = assert_safe(old, new);
            assert!(steps <= 7, "case {i}: {:?}", plan(old, new));
        }
    }

    /// Every change of backing file name, format and bitmap directory
    /// between a few of each, in both cluster sizes QEMU lays out
    /// differently (the feature table is left out at 4 KiB), has a safe plan.
    #[test]
    fn every_backing_change_has_a_safe_plan() {
        let long = "n".repeat(1000);
        let names = [
            None,
            Some("a"),
            Some("base.img"),
            Some("x".repeat(200).leak() as &str),
            Some(long.as_str()),
        ];
        let formats = [None, Some("raw"), Some("qcow2"), Some("a-longer-format")];
        let bitmaps = [None, Some(0x30000), Some(0x50000)];
        for cs in [4096, 65536] {
            let mut headers = Vec::new();
            let mut what = Vec::new();
            for n in names {
                for f in formats {
                    for b in bitmaps {
                        headers.push(header_in(cs, n, f, b));
                        what.push((n.map(str::len), f, b));
                    }
                }
            }
            let mut unsafe_pairs = Vec::new();
            for (i, old) in headers.iter().enumerate() {
                for (j, new) in headers.iter().enumerate() {
                    let steps = plan(old, new);
                    if steps.len() == 1 && steps[0].writes[0].1.len() == cs {
                        unsafe_pairs.push((what[i], what[j]));
                        continue;
                    }
                    assert_safe(old, new);
                }
            }
            assert!(
                unsafe_pairs.is_empty(),
                "{cs}: (name, format) pairs without a safe plan: {unsafe_pairs:?}"
            );
        }
    }

    #[test]
    fn an_unparsable_old_header_is_overwritten_at_once() {
        let new = header(Some("a.qcow2"), Some("qcow2"));
        let old = vec![0u8; new.len()];
        assert_eq!(plan(&old, &new).len(), 1);
    }
}
