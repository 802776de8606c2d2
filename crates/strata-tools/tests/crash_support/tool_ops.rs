//! The metadata operations a recording runs between its batches as a
//! user would, through the tools on the json: name of the logged image
//! (`blklogwrites` with `log-append`, so their writes join the log):
//! `strata-img commit`, `rebase`, `check -r all` and `bitmap`, and a
//! strata-io process that dies with lazy refcounts left to repair.

use super::record::{open, Model};
use super::{path, qemu_tool, run, Rng, Version, SECTOR, SIZE};
use std::path::Path;
use std::sync::Arc;
use strata_block::{EventLoop, Node};

const STRATA_IMG: &str = env!("CARGO_BIN_EXE_strata-img");
const STRATA_IO: &str = env!("CARGO_BIN_EXE_strata-io");

/// The test's own opening of the guest's image, closed while a tool has
/// the image and opened again on next use.
pub struct Session {
    pub ev: EventLoop,
    /// What the test opens: the logged image, or the overlay over it.
    guest: String,
    /// The logged image's json: name, for the tools.
    pub logged: String,
    node: Option<Arc<Node>>,
}

impl Session {
    pub fn new(guest: &str, logged: &str) -> Self {
        Session {
            ev: EventLoop::new().unwrap(),
            guest: guest.to_string(),
            logged: logged.to_string(),
            node: None,
        }
    }

    pub fn node(&mut self) -> Arc<Node> {
        if self.node.is_none() {
            self.node = Some(self.ev.block_on(open(&self.guest)));
        }
        Arc::clone(self.node.as_ref().unwrap())
    }

    /// Closes the image (flushed, persistent bitmaps stored), so that a
    /// tool can take it.
    pub fn close(&mut self) {
        if let Some(node) = self.node.take() {
            self.ev
                .block_on(node.close())
                .unwrap_or_else(|e| panic!("close {}: {e}", self.guest));
        }
    }
}

/// What the metadata operations keep between batches.
pub struct State {
    /// Internal snapshots and the guest content each holds.
    pub snapshots: Vec<(String, Vec<Version>)>,
    /// Snapshots and bitmaps made so far, for their names.
    pub made: u32,
    /// Persistent bitmaps in the image.
    bitmaps: Vec<String>,
    /// Under commit: what the backing file's guest reads, sector by sector.
    base_view: Vec<Version>,
    /// Under rebase: the backing files to move between, and the one now.
    backings: [String; 3],
    backing_now: usize,
}

impl State {
    pub fn new(extra: super::record::Extra, dir: &Path, backing: &str, qemu_img: &str) -> Self {
        let other = path(dir, "other.qcow2");
        if extra == super::record::Extra::Rebase {
            // Data unlike the first backing file's over most of the disk,
            // so that a rebase between them has clusters to copy.
            let (code, out) = run(
                qemu_img,
                &["create", "-q", "-f", "qcow2", &other, &SIZE.to_string()],
            );
            assert_eq!(code, 0, "{out}");
            let io = qemu_tool("qemu-io").expect("qemu-io");
            let (code, out) = run(&io, &["-f", "qcow2", "-c", "write -P 0xa5 1M 3M", &other]);
            assert_eq!(code, 0, "{out}");
        }
        State {
            snapshots: Vec::new(),
            made: 0,
            bitmaps: Vec::new(),
            base_view: vec![Version::Initial; (SIZE / SECTOR) as usize],
            backings: [backing.to_string(), other, String::new()],
            backing_now: 0,
        }
    }
}

/// Runs strata-img; it must succeed.
fn strata_img(args: &[&str]) {
    let (code, out) = run(STRATA_IMG, args);
    assert_eq!(code, 0, "strata-img {args:?} exited {code}:\n{out}");
}

/// `strata-img commit` of the overlay into the logged backing file, with
/// or without emptying the overlay (`-d`): the backing file then reads
/// as the guest does, and is flushed.
pub fn commit_op(s: &mut Session, rng: &mut Rng, state: &mut State, m: &mut Model) {
    let overlay = s.guest.clone();
    s.close();
    let mut args = vec!["commit", "-f", "qcow2"];
    if rng.chance(1, 3) {
        args.push("-d");
    }
    args.push(&overlay);
    strata_img(&args);
    // Each run of sectors the commit changed, as one request.
    let changed = |i: usize| state.base_view[i] != m.current[i];
    let mut runs = Vec::new();
    let mut i = 0;
    while i < m.current.len() {
        let (v, c) = (m.current[i], changed(i));
        let mut e = i + 1;
        while e < m.current.len() && m.current[e] == v && changed(e) == c {
            e += 1;
        }
        if c {
            runs.push(((i as u64, e as u64), v));
        }
        i = e;
    }
    m.reqs.extend(runs);
    state.base_view = m.current.clone();
    m.flushed(state.base_view.clone());
}

/// `strata-img rebase` (safe) of the logged overlay onto another backing
/// file or none: the guest reads the same, from wherever.
pub fn rebase_op(s: &mut Session, rng: &mut Rng, state: &mut State, m: &mut Model) {
    s.close();
    let to = (state.backing_now + 1 + rng.below(2) as usize) % 3;
    let target = state.backings[to].clone();
    let mut args = vec!["rebase", "-b", &target];
    if !target.is_empty() {
        args.extend(["-F", "qcow2"]);
    }
    args.push(&s.logged);
    strata_img(&args);
    state.backing_now = to;
    m.flushed(m.current.clone());
}

/// A strata-io process writes patterns to the lazy-refcounts image,
/// flushes (mostly) and aborts, leaving the image dirty with refcounts
/// not written; then `strata-img check -r all` repairs it, or the test's
/// next open does.
pub fn repair_op(s: &mut Session, rng: &mut Rng, m: &mut Model) {
    s.close();
    let mut args = Vec::new();
    for _ in 0..1 + rng.below(6) {
        let p = 0x60 + (m.reqs.len() % 0x40) as u8;
        let at = rng.below(m.size);
        let n = (1 + rng.below(256)).min(m.size - at);
        args.push(format!("write -P {p} {} {}", at * SECTOR, n * SECTOR));
        m.set(at, at + n, Version::Pattern(p));
    }
    let flush = rng.chance(3, 4);
    if flush {
        args.push("flush".into());
    }
    args.push("abort".into());
    let mut argv: Vec<&str> = args.iter().flat_map(|c| ["-c", c.as_str()]).collect();
    argv.push(&s.logged);
    let (code, out) = run(STRATA_IO, &argv);
    assert!(
        code == -1 && !out.contains("failed"),
        "strata-io {argv:?} should have aborted, exited {code}:\n{out}"
    );
    if flush {
        m.flushed(m.current.clone());
    }
    if rng.chance(1, 2) {
        strata_img(&["check", "-r", "all", &s.logged]);
        m.flushed(m.current.clone());
    }
}

/// Persistent bitmaps: added or removed by the test, the image closed
/// (stored) and opened again (loaded, marked in use), or changed by
/// `strata-img bitmap` on the closed image.
pub fn bitmap_op(s: &mut Session, rng: &mut Rng, state: &mut State) {
    let pick = |rng: &mut Rng, b: &[String]| b[rng.below(b.len() as u64) as usize].clone();
    match rng.below(5) {
        1 if !state.bitmaps.is_empty() => {
            let name = pick(rng, &state.bitmaps);
            let node = s.node();
            s.ev.block_on(node.remove_bitmap(&name))
                .unwrap_or_else(|e| panic!("remove bitmap {name}: {e}"));
            state.bitmaps.retain(|b| *b != name);
        }
        2 => s.close(),
        3 if !state.bitmaps.is_empty() => {
            s.close();
            let name = pick(rng, &state.bitmaps);
            let source = pick(rng, &state.bitmaps);
            let mut args = vec!["bitmap"];
            match rng.below(4) {
                0 => args.push("--clear"),
                1 => args.push("--disable"),
                2 => args.push("--enable"),
                _ => args.extend(["--merge", &source]),
            }
            args.extend([s.logged.as_str(), &name]);
            strata_img(&args);
        }
        4 if !state.bitmaps.is_empty() => {
            s.close();
            let name = pick(rng, &state.bitmaps);
            strata_img(&["bitmap", "--remove", &s.logged, &name]);
            state.bitmaps.retain(|b| *b != name);
        }
        _ => {
            state.made += 1;
            let name = format!("b{}", state.made);
            let granularity = 512u64 << rng.below(8);
            let disabled = rng.chance(1, 4);
            if rng.chance(1, 2) {
                let node = s.node();
                s.ev.block_on(node.add_bitmap(&name, Some(granularity), true, disabled))
                    .unwrap_or_else(|e| panic!("add bitmap {name}: {e}"));
            } else {
                s.close();
                let g = granularity.to_string();
                let mut args = vec!["bitmap", "--add", "-g", &g];
                if disabled {
                    args.push("--disable");
                }
                args.extend([s.logged.as_str(), &name]);
                strata_img(&args);
            }
            state.bitmaps.push(name);
        }
    }
}
