//! The concurrency model test: many requests in flight at once on one qcow2
//! image — writes (some unaligned), zero writes, discards, compressed
//! writes, reads, truncates, and persistent bitmaps added and removed —
//! with random delays injected below the
//! format by a test-only `delay` filter, against a plain in-memory model.
//!
//! Writers in flight may overlap (a hot area makes them): the bytes two
//! writers race for may land in either order, so the model marks them
//! unknown until a writer nobody overlapped writes them again. A read never
//! overlaps a writer, so every read must equal the model exactly; at the end
//! the whole disk must, and `qemu-img check` must find nothing wrong with
//! any layer. Requests also share clusters, L2 tables and refcount blocks,
//! which is where a format loses data.
//!
//! CI runs fixed seeds for a bounded number of operations. A soak runs
//! from one command, with a seed and a duration:
//!
//!     STRATA_MODEL_SEED=7 STRATA_MODEL_SECS=1800 \
//!         cargo test --release -p strata-drivers --test concurrency -- --nocapture
//!
//! (`scripts/soak-concurrency SEED SECONDS` does the same.)

#[path = "concurrency_parts/bitmaps.rs"]
mod bitmaps;
mod common;

use bitmaps::BitmapModel;

use async_trait::async_trait;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_block::options::Opts;
use strata_block::{
    BlockStatus, Child, ChildRole, Driver, DriverClass, Error, EventLoop, IoBuf, Limits, Node,
    OpenCtx, OpenFlags, Perm, Preallocation, Result, WriteFlags,
};

/// A small, seedable generator (xorshift64*): the test must replay exactly.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The test-only filter: each request waits a random while before it goes
/// down, so requests reach the file in a different order than they left.
struct DelayClass {
    seed: AtomicU64,
}

struct DelayDriver {
    file: Arc<Node>,
    state: AtomicU64,
}

impl DelayDriver {
    async fn jitter(&self) {
        let r = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                let mut g = Rng(s);
                g.next();
                Some(g.0)
            })
            .unwrap_or(1);
        match Rng(r).next() % 100 {
            0..=44 => {}
            45..=94 => {
                for _ in 0..1 + r % 8 {
                    tokio::task::yield_now().await;
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(1 + r % 3)).await,
        }
    }
}

#[async_trait]
impl Driver for DelayDriver {
    fn format_name(&self) -> &'static str {
        "delay"
    }
    fn length(&self) -> u64 {
        self.file.driver().length()
    }
    fn children(&self) -> Vec<Child> {
        vec![Child::new(ChildRole::File, &self.file)]
    }
    fn limits(&self) -> Limits {
        self.file.limits()
    }
    fn growable(&self) -> bool {
        self.file.driver().growable()
    }
    fn is_filter(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.jitter().await;
        self.file.read(offset, buf).await
    }
    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.jitter().await;
        self.file.write(offset, buf, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.jitter().await;
        self.file.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.jitter().await;
        self.file.discard(offset, len).await
    }
    async fn flush(&self) -> Result<()> {
        self.jitter().await;
        self.file.flush().await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            raw: true,
            ..BlockStatus::data_at(len, Arc::clone(&self.file), offset)
        })
    }
    async fn truncate(&self, size: u64, exact: bool, prealloc: Preallocation) -> Result<()> {
        self.jitter().await;
        self.file.truncate(size, exact, prealloc).await
    }
    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.file.driver().allocated_size().await
    }
    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.file.set_perm(perm, shared)
    }
    async fn close(&self) -> Result<()> {
        self.file.close().await
    }
}

#[async_trait]
impl DriverClass for DelayClass {
    fn name(&self) -> &'static str {
        "delay"
    }
    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported("delay: no image creation"))
    }
    async fn open(&self, ctx: &OpenCtx, _opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        let seed = self.seed.fetch_add(1, Ordering::AcqRel);
        Ok(Box::new(DelayDriver {
            file,
            state: AtomicU64::new(Rng::new(seed).next() | 1),
        }))
    }
}

const SIZE: u64 = 4 << 20;
const SECTOR: u64 = 512;
/// Where half of the requests go.
const HOT: u64 = 256 << 10;
const WORKERS: usize = 8;

#[derive(Clone, Copy, Debug)]
struct Config {
    cluster_bits: u32,
    backing: bool,
    /// Lazy refcounts on the image under test: refcount blocks lag behind
    /// the L2 tables while the image is marked dirty.
    lazy: bool,
    /// LUKS encryption on the image under test: requests are whole sectors
    /// below the core, which reads, changes and writes back the rest.
    encrypted: bool,
    /// Persistent dirty bitmaps added and removed among the requests.
    bitmaps: bool,
    /// Extended L2 entries: writes complete and zero single subclusters.
    extended_l2: bool,
    seed: u64,
}

/// The secret encrypted configurations use.
const SECRET: &str = "model-sec";

/// A modifying request in flight: its range, and whether another one
/// overlapped it while it ran (then the bytes they share may end up with
/// either's data).
struct Flight {
    id: u64,
    off: u64,
    end: u64,
    modifies: bool,
    contested: bool,
}

/// What the workers share: the model, the requests in flight, and the
/// first difference found. Bytes two overlapping writers raced for are
/// `unknown` until a writer nobody overlapped writes them again.
struct State {
    model: Vec<u8>,
    unknown: Vec<bool>,
    flights: Vec<Flight>,
    next_id: u64,
    truncating: bool,
    ops: u64,
    overlaps: u64,
    failure: Option<String>,
    /// The bitmaps the node should have, in configurations with bitmaps.
    bitmaps: Option<BitmapModel>,
}

impl State {
    /// Starts a request over `[off, off+len)`, or None if it must not start
    /// now: a read never overlaps a writer (its result must be exact), and
    /// nothing starts during a truncate. Overlapping writers may run together.
    fn start(&mut self, off: u64, len: u64, modifies: bool) -> Option<u64> {
        let end = off + len;
        let overlap = |f: &Flight| f.off < end && off < f.end;
        if self.truncating
            || self
                .flights
                .iter()
                .any(|f| overlap(f) && (!modifies || !f.modifies))
        {
            return None;
        }
        let mut contested = false;
        for f in self.flights.iter_mut().filter(|f| overlap(f)) {
            f.contested = true;
            contested = true;
            let (a, b) = (f.off.max(off) as usize, f.end.min(end) as usize);
            self.unknown[a..b].fill(true);
        }
        self.overlaps += contested as u64;
        let id = self.next_id;
        self.next_id += 1;
        self.flights.push(Flight {
            id,
            off,
            end,
            modifies,
            contested,
        });
        Some(id)
    }

    /// Ends request `id`; a writer's bytes take `value` (by offset) where
    /// they are known, and become known again if nobody overlapped it.
    /// Ends a write that may have changed any of its bytes: a compressed
    /// write refused at a later cluster after its first ones landed.
    fn finish_unknown(&mut self, id: u64) {
        let f = self.land(id);
        self.unknown[f.off as usize..f.end as usize].fill(true);
    }

    /// Takes request `id` out of flight and counts it.
    fn land(&mut self, id: u64) -> Flight {
        let i = self
            .flights
            .iter()
            .position(|f| f.id == id)
            .expect("in flight");
        self.ops += 1;
        self.flights.swap_remove(i)
    }

    fn finish(&mut self, id: u64, value: Option<&dyn Fn(u64) -> u8>) {
        let f = self.land(id);
        let Some(value) = value else {
            return;
        };
        for b in f.off..f.end {
            if !f.contested {
                self.unknown[b as usize] = false;
            }
            if !self.unknown[b as usize] {
                self.model[b as usize] = value(b);
            }
        }
    }

    /// The first byte of `got` (read at `off`) that differs from a known
    /// byte of the model.
    fn differs(&self, off: u64, got: &[u8]) -> Option<(u64, u8, u8)> {
        (0..got.len())
            .find(|&i| {
                let b = off as usize + i;
                !self.unknown[b] && got[i] != self.model[b]
            })
            .map(|i| (off + i as u64, got[i], self.model[off as usize + i]))
    }

    fn fail(&mut self, msg: String) {
        self.failure.get_or_insert(msg);
    }
}

#[derive(Debug)]
enum Op {
    Write { off: u64, len: u64, pattern: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Compressed { off: u64, len: u64, pattern: u8 },
    Read { off: u64, len: u64 },
    Truncate { to: u64 },
}

fn pick(rng: &mut Rng, cs: u64) -> Op {
    let span = |rng: &mut Rng| {
        // Mostly sector-aligned, sometimes any byte (read-modify-write);
        // half of the requests crowd into a hot area, to meet each other.
        let unit = if rng.below(4) == 0 { 1 } else { SECTOR };
        let area = if rng.below(2) == 0 { HOT } else { SIZE };
        let off = rng.below(area / unit) * unit;
        let len = (1 + rng.below((3 * cs).max(8192) / unit)) * unit;
        (off, len.min(SIZE - off))
    };
    let clusters = |rng: &mut Rng| {
        let area = if rng.below(2) == 0 { HOT.max(cs) } else { SIZE };
        let off = rng.below(area / cs) * cs;
        let n = 1 + rng.below(3);
        (off, (n * cs).min(SIZE - off))
    };
    match rng.below(100) {
        0..=39 => {
            let (off, len) = span(rng);
            Op::Write {
                off,
                len,
                pattern: 1 + rng.below(255) as u8,
            }
        }
        40..=51 => {
            let (off, len) = span(rng);
            Op::Zero {
                off,
                len,
                unmap: rng.below(2) == 0,
            }
        }
        52..=59 => {
            let (off, len) = clusters(rng);
            Op::Discard { off, len }
        }
        // Up to three clusters: compressed together, placed in order.
        60..=65 => {
            let (off, len) = clusters(rng);
            Op::Compressed {
                off,
                len,
                pattern: rng.below(256) as u8,
            }
        }
        66..=98 => {
            let (off, len) = span(rng);
            Op::Read { off, len }
        }
        _ => Op::Truncate {
            to: (1 + rng.below(SIZE / cs - 1)) * cs,
        },
    }
}

/// Compressible, but not one byte repeated: a pattern with a counter.
fn compressible(len: usize, pattern: u8) -> IoBuf {
    let mut b = IoBuf::zeroed(len);
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = pattern.wrapping_add((i / 97) as u8);
    }
    b
}

async fn worker(node: &Arc<Node>, st: &RefCell<State>, cs: u64, seed: u64, budget: u64) {
    let mut rng = Rng::new(seed);
    loop {
        if st.borrow().ops >= budget || st.borrow().failure.is_some() {
            return;
        }
        if st.borrow().bitmaps.is_some() && rng.below(100) == 0 {
            if let Err(e) = bitmap_op(node, st, &mut rng).await {
                st.borrow_mut().fail(e);
            }
            continue;
        }
        let op = pick(&mut rng, cs);
        if let Op::Truncate { to } = op {
            // Alone: every other request finishes first, none starts.
            if st.borrow().truncating {
                tokio::task::yield_now().await;
                continue;
            }
            st.borrow_mut().truncating = true;
            while !st.borrow().flights.is_empty() {
                tokio::task::yield_now().await;
            }
            let r = async {
                node.truncate(to, true, Preallocation::Off).await?;
                node.truncate(SIZE, true, Preallocation::Off).await
            }
            .await;
            let mut s = st.borrow_mut();
            match r {
                Ok(()) => {
                    s.model[to as usize..].fill(0);
                    if let Some(b) = s.bitmaps.as_mut() {
                        b.truncated(to);
                    }
                }
                Err(e) => s.fail(format!("truncate to {to}: {e}")),
            }
            s.truncating = false;
            s.ops += 1;
            continue;
        }
        let (off, len, modifies) = match op {
            Op::Write { off, len, .. } | Op::Zero { off, len, .. } | Op::Discard { off, len } => {
                (off, len, true)
            }
            Op::Compressed { off, len, .. } => (off, len, true),
            Op::Read { off, len } => (off, len, false),
            Op::Truncate { .. } => unreachable!("handled above"),
        };
        let Some(id) = st.borrow_mut().start(off, len, modifies) else {
            tokio::task::yield_now().await;
            continue;
        };
        // The bitmaps that exist as a write starts must record it; a
        // compressed write may be refused, and then records nothing.
        let recorded = !matches!(op, Op::Compressed { .. });
        let bitmap_names = match st.borrow_mut().bitmaps.as_mut() {
            Some(b) if modifies => {
                b.started(off, len);
                b.names()
            }
            _ => Vec::new(),
        };
        let result: std::result::Result<(), String> = match op {
            Op::Write { off, len, pattern } => {
                let buf = IoBuf::filled(len as usize, pattern);
                match node.write(off, buf, WriteFlags::default()).await {
                    Ok(_) => {
                        st.borrow_mut().finish(id, Some(&|_| pattern));
                        Ok(())
                    }
                    Err(e) => Err(format!("write {off}+{len}: {e}")),
                }
            }
            Op::Zero { off, len, unmap } => {
                let flags = WriteFlags {
                    may_unmap: unmap,
                    ..WriteFlags::default()
                };
                match node.write_zeroes(off, len, flags).await {
                    Ok(()) => {
                        st.borrow_mut().finish(id, Some(&|_| 0));
                        Ok(())
                    }
                    Err(e) => Err(format!("write_zeroes {off}+{len}: {e}")),
                }
            }
            // Whole clusters of a v3 image read as zeroes after a discard.
            Op::Discard { off, len } => match node.discard(off, len).await {
                Ok(()) => {
                    st.borrow_mut().finish(id, Some(&|_| 0));
                    Ok(())
                }
                Err(e) => Err(format!("discard {off}+{len}: {e}")),
            },
            Op::Compressed { off, len, pattern } => {
                let buf = compressible(len as usize, pattern);
                let data = buf.as_slice().to_vec();
                match node.write_compressed(off, buf).await {
                    Ok(_) => {
                        st.borrow_mut()
                            .finish(id, Some(&|b| data[(b - off) as usize]));
                        Ok(())
                    }
                    // Only an unallocated cluster takes compressed data,
                    // and an encrypted image none. A refused cluster changes
                    // nothing, but the clusters before it are written.
                    Err(e) if e.code() == libc::EIO || e.code() == libc::ENOTSUP => {
                        if len > cs {
                            st.borrow_mut().finish_unknown(id);
                        } else {
                            st.borrow_mut().finish(id, None);
                        }
                        Ok(())
                    }
                    Err(e) => Err(format!("compressed write {off}: {e}")),
                }
            }
            Op::Read { off, len } => match node.read(off, IoBuf::zeroed(len as usize)).await {
                Ok(got) => {
                    let mut s = st.borrow_mut();
                    let d = s.differs(off, got.as_slice());
                    s.finish(id, None);
                    match d {
                        None => Ok(()),
                        Some((at, g, w)) => Err(format!(
                            "read {off}+{len}: byte {at} is {g:#x}, the model says {w:#x}"
                        )),
                    }
                }
                Err(e) => Err(format!("read {off}+{len}: {e}")),
            },
            Op::Truncate { .. } => unreachable!("handled above"),
        };
        match result {
            Err(e) => {
                let mut s = st.borrow_mut();
                let n = s.ops;
                s.fail(format!("{e} (after {n} operations)"));
            }
            Ok(()) if recorded => {
                if let Some(b) = st.borrow_mut().bitmaps.as_mut() {
                    b.written(&bitmap_names, off, len);
                }
            }
            Ok(()) => {}
        }
    }
}

/// Adds a persistent bitmap, or removes one, with requests in flight.
async fn bitmap_op(
    node: &Arc<Node>,
    st: &RefCell<State>,
    rng: &mut Rng,
) -> std::result::Result<(), String> {
    let (remove, name) = {
        let mut s = st.borrow_mut();
        let b = s.bitmaps.as_mut().expect("a bitmaps configuration");
        let names = b.names();
        if !names.is_empty() && (names.len() >= 4 || rng.below(2) == 0) {
            (true, names[rng.below(names.len() as u64) as usize].clone())
        } else {
            (false, b.next_name())
        }
    };
    if remove {
        node.remove_bitmap(&name)
            .await
            .map_err(|e| format!("remove bitmap {name}: {e}"))?;
        st.borrow_mut().bitmaps.as_mut().unwrap().removed(&name);
    } else {
        node.add_bitmap(&name, Some(bitmaps::GRANULE), true, false)
            .await
            .map_err(|e| format!("add bitmap {name}: {e}"))?;
        let mut s = st.borrow_mut();
        let in_flight: Vec<(u64, u64)> = s
            .flights
            .iter()
            .filter(|f| f.modifies)
            .map(|f| (f.off, f.end))
            .collect();
        s.bitmaps.as_mut().unwrap().added(name, &in_flight);
    }
    st.borrow_mut().ops += 1;
    Ok(())
}

async fn open_delayed(path: &str, seed: u64, encrypted: bool) -> Arc<Node> {
    let mut reg = (*strata_drivers::registry()).clone();
    reg.register(Arc::new(DelayClass {
        seed: AtomicU64::new(seed),
    }));
    let ctx = OpenCtx::new(Arc::new(reg), OpenFlags::default());
    let mut pairs = vec![
        ("driver", "qcow2"),
        ("discard", "unmap"),
        ("file.driver", "delay"),
        ("file.file.driver", "file"),
        ("file.file.filename", path),
    ];
    if encrypted {
        pairs.push(("encrypt.key-secret", SECRET));
    }
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let opts = strata_block::options::nest(&pairs).unwrap();
    ctx.open_image(None, None, opts).await.unwrap()
}

/// Runs one configuration; returns the number of operations done and how
/// many of them overlapped another in flight.
fn run(cfg: Config, budget: u64, qemu_img: &str) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let (base, top) = (p("base.qcow2"), p("top.qcow2"));
    let cs = 1u64 << cfg.cluster_bits;
    let size = SIZE.to_string();
    let cluster = cs.to_string();
    let lazy = if cfg.lazy { "on" } else { "off" };
    let extended = if cfg.extended_l2 { "on" } else { "off" };
    let mut encrypt: Vec<(&str, &str)> = Vec::new();
    if cfg.encrypted {
        let _ = strata_crypto::secret::define(&[
            ("id".to_string(), SECRET.to_string()),
            ("data".to_string(), "hunter2".to_string()),
        ]);
        encrypt = vec![
            ("encrypt.format", "luks"),
            ("encrypt.key-secret", SECRET),
            ("encrypt.iter-time", "1"),
        ];
    }
    let ev = EventLoop::new().unwrap();
    let mut rng = Rng::new(cfg.seed ^ 0xbac);
    let mut model = vec![0u8; SIZE as usize];
    ev.block_on(async {
        if cfg.backing {
            common::create(
                &base,
                "qcow2",
                &[("size", &size), ("cluster_size", "65536")],
            )
            .await;
            let b = common::open(&base, Some("qcow2")).await;
            // About half of the base holds data, in runs.
            for _ in 0..24 {
                let off = rng.below(SIZE / 4096) * 4096;
                let len = ((1 + rng.below(64)) * 4096).min(SIZE - off);
                let pattern = 1 + rng.below(255) as u8;
                b.write(
                    off,
                    IoBuf::filled(len as usize, pattern),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
                model[off as usize..(off + len) as usize].fill(pattern);
            }
            b.close().await.unwrap();
            let mut o = vec![
                ("size", size.as_str()),
                ("cluster_size", &cluster),
                ("backing_file", &base),
                ("backing_fmt", "qcow2"),
                ("lazy_refcounts", lazy),
                ("extended_l2", extended),
            ];
            o.extend_from_slice(&encrypt);
            common::create(&top, "qcow2", &o).await;
        } else {
            let mut o = vec![
                ("size", size.as_str()),
                ("cluster_size", &cluster),
                ("lazy_refcounts", lazy),
                ("extended_l2", extended),
            ];
            o.extend_from_slice(&encrypt);
            common::create(&top, "qcow2", &o).await;
        }
    });
    let st = RefCell::new(State {
        model,
        unknown: vec![false; SIZE as usize],
        flights: Vec::new(),
        next_id: 0,
        truncating: false,
        ops: 0,
        overlaps: 0,
        failure: None,
        bitmaps: cfg.bitmaps.then(|| BitmapModel::new(SIZE)),
    });
    let done = ev.block_on(async {
        let node = open_delayed(&top, cfg.seed, cfg.encrypted).await;
        let workers = (0..WORKERS as u64).map(|w| {
            worker(
                &node,
                &st,
                cs,
                cfg.seed.wrapping_mul(31).wrapping_add(w),
                budget,
            )
        });
        let all = futures::future::join_all(workers);
        if tokio::time::timeout(Duration::from_secs(600), all)
            .await
            .is_err()
        {
            st.borrow_mut()
                .fail("requests stopped making progress (deadlock?)".into());
        }
        if st.borrow().failure.is_none() {
            let got = node.read(0, IoBuf::zeroed(SIZE as usize)).await.unwrap();
            let d = st.borrow().differs(0, got.as_slice());
            if let Some((at, g, w)) = d {
                st.borrow_mut().fail(format!(
                    "final contents: byte {at} is {g:#x}, the model says {w:#x}"
                ));
            }
        }
        // Lazy refcounts were in play: allocations marked the image dirty.
        if cfg.lazy && st.borrow().failure.is_none() && !node.skip_filters().driver().is_dirty() {
            st.borrow_mut()
                .fail("lazy refcounts: the image was never marked dirty".into());
        }
        if st.borrow().failure.is_none() {
            let checked = st.borrow().bitmaps.as_ref().map(|b| b.verify(&node));
            if let Some(Err(e)) = checked {
                st.borrow_mut().fail(e);
            }
        }
        let churn = st.borrow().bitmaps.as_ref().map(|b| b.churn());
        if let Some((added, removed)) = churn {
            if added == 0 || removed == 0 {
                st.borrow_mut().fail(format!(
                    "bitmaps: {added} added, {removed} removed; the run needs both"
                ));
            }
        }
        let live = BitmapModel::snapshot(&node);
        node.close().await.unwrap();
        if cfg.bitmaps && st.borrow().failure.is_none() {
            // Stored at close, loaded at open: the same bits.
            let again = common::open(&top, Some("qcow2")).await;
            let loaded = BitmapModel::snapshot(&again);
            again.close().await.unwrap();
            if loaded != live {
                st.borrow_mut().fail(format!(
                    "bitmaps stored and loaded again differ: {loaded:?}, were {live:?}"
                ));
            }
        }
        let s = st.borrow();
        (s.ops, s.overlaps)
    });
    if let Some(f) = st.borrow().failure.clone() {
        panic!("{cfg:?}: {f}");
    }
    for img in [&top, &base] {
        if img == &base && !cfg.backing {
            continue;
        }
        let spec = format!("driver=qcow2,file.filename={img},encrypt.key-secret={SECRET}");
        let secret = format!("secret,id={SECRET},data=hunter2");
        let (code, out) = if cfg.encrypted && img == &top {
            common::run(
                qemu_img,
                &["check", "--object", &secret, "--image-opts", &spec],
            )
        } else {
            common::run(qemu_img, &["check", img])
        };
        assert_eq!(code, 0, "{cfg:?}: qemu-img check {img}: {out}");
    }
    done
}

fn configs(seed: u64) -> Vec<Config> {
    let mut v = Vec::new();
    for (i, cluster_bits) in [9u32, 12, 16].into_iter().enumerate() {
        for backing in [false, true] {
            v.push(Config {
                cluster_bits,
                backing,
                // Half of the configurations, every cluster size among them.
                lazy: (i + backing as usize) % 2 == 1,
                encrypted: false,
                bitmaps: true,
                extended_l2: false,
                seed: seed.wrapping_add(i as u64 * 2 + backing as u64),
            });
        }
    }
    // Subclusters (16 KiB clusters: 512-byte subclusters, the smallest
    // QEMU allows; 64 KiB ones), with and without a backing file.
    for (i, cluster_bits) in [14u32, 16].into_iter().enumerate() {
        for backing in [false, true] {
            v.push(Config {
                cluster_bits,
                backing,
                lazy: false,
                encrypted: false,
                bitmaps: false,
                extended_l2: true,
                seed: seed.wrapping_add(200 + i as u64 * 2 + backing as u64),
            });
        }
    }
    // LUKS, with and without a backing file (copy-on-write of plaintext
    // into encrypted clusters), on small and on default clusters.
    for (i, cluster_bits) in [12u32, 16].into_iter().enumerate() {
        v.push(Config {
            cluster_bits,
            backing: i == 0,
            lazy: false,
            encrypted: true,
            bitmaps: false,
            extended_l2: false,
            seed: seed.wrapping_add(100 + i as u64),
        });
    }
    v
}

#[test]
fn concurrent_requests_match_the_model() {
    let Some(qemu_img) = common::qemu_tool("qemu-img") else {
        return;
    };
    let seed = std::env::var("STRATA_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let soak = std::env::var("STRATA_MODEL_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    match soak {
        None => {
            let mut overlaps = 0;
            for cfg in configs(seed) {
                overlaps += run(cfg, 1500, &qemu_img).1;
            }
            // The races this test exists for need overlapping writers.
            assert!(overlaps > 100, "only {overlaps} overlapping requests");
        }
        Some(secs) => {
            let end = Instant::now() + Duration::from_secs(secs);
            let (mut rounds, mut ops, mut overlaps) = (0u64, 0u64, 0u64);
            while Instant::now() < end {
                for cfg in configs(seed.wrapping_add(rounds * 1000)) {
                    let (o, v) = run(cfg, 5000, &qemu_img);
                    ops += o;
                    overlaps += v;
                }
                rounds += 1;
            }
            println!(
                "soak: seed {seed}, {secs} s, {rounds} rounds, {ops} operations \
                 ({overlaps} overlapping), no failure"
            );
        }
    }
}
