//! The copy of `qemu-img convert` (QEMU: convert_do_copy and its helpers):
//! the sources, concatenated, are walked by block status; ranges the
//! target's backing file supplies are skipped, zero ranges become zero
//! writes (or nothing on a target that reads as zeroes), data is read and
//! written with runs of zero sectors left out. Several workers copy at once,
//! each on its own chunk; unless out-of-order writes are allowed, the
//! writes go out in the order of the chunks.

use super::SECTOR;
use crate::progress::Progress;
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use strata_block::buf::is_zero;
use strata_block::error::strerror;
use strata_block::report::{error_report, warn_report};
use strata_block::{Backend, IoBuf, Node, Result, WriteFlags};
use strata_drivers::filters::throttle::ThrottleGroup;
use tokio::sync::{Mutex, Notify};

/// Longest block-status request, in sectors (QEMU: BDRV_REQUEST_MAX_SECTORS).
const REQUEST_MAX_SECTORS: u64 = (i32::MAX as u64) >> 9;

/// What a chunk of the sources holds, for the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Read it and write what is not zero.
    Data,
    /// Reads as zeroes.
    Zero,
    /// Left unallocated: the target's backing file supplies it.
    BackingFile,
}

/// One source image.
pub struct Source {
    pub node: Arc<Node>,
    /// The handle reads go through.
    pub blk: Arc<Backend>,
    /// Length in sectors.
    pub sectors: u64,
    /// Block-status answers are cut to multiples of this (sectors): the
    /// source's request alignment or cluster size.
    pub alignment: u64,
}

/// What one write did at its first poll (see `Convert::write`).
#[derive(Default)]
struct Issued {
    /// Every piece went to the target, each on clusters of its own.
    together: Cell<bool>,
    /// Then, if nothing but data needed writing: the bytes of data.
    data_bytes: Cell<Option<u64>>,
}

/// A convert job, as img_convert sets it up.
pub struct Convert {
    pub src: Vec<Source>,
    pub total_sectors: u64,
    /// The handle writes go through.
    pub target: Arc<Backend>,
    /// The target reads as zeroes already: zero ranges need no writes.
    pub has_zero_init: bool,
    pub target_has_backing: bool,
    /// Length of the new target's backing file; beyond it zeroes need no writes.
    pub target_backing_sectors: Option<u64>,
    pub wr_in_order: bool,
    /// `-C`: data goes over as it is, without looking for zeroes.
    pub copy_range: bool,
    /// `-c`: data clusters are written compressed (chunks are whole
    /// clusters of the target).
    pub compressed: bool,
    pub salvage: bool,
    pub quiet: bool,
    /// Runs of zero sectors at least this long are not written (0: write all).
    pub min_sparse: u64,
    /// Writes are cut at multiples of this (sectors), a power of two.
    pub alignment: u64,
    /// The target's cluster size in sectors (1 without clusters): writes
    /// that start and end on these share no cluster with another write.
    pub target_cluster_sectors: u64,
    /// The target's format node, which says how many bytes of writes it
    /// has placed (`Driver::bytes_planned`).
    pub target_format: Arc<strata_block::Node>,
    /// Largest data chunk, in sectors.
    pub buf_sectors: u64,
    pub num_coroutines: usize,
    /// `-r`: the limit on the target's writes.
    pub throttle: Option<ThrottleGroup>,
}

/// Where the walk over the sources is (QEMU: sector_num, status,
/// sector_next_status); one worker at a time moves it.
struct Walk {
    sector_num: u64,
    status: Status,
    sector_next_status: u64,
}

/// What the workers share.
struct Shared<'a> {
    walk: Mutex<Walk>,
    failed: Cell<bool>,
    /// End of the last chunk written, for in-order writes.
    wr_offs: Cell<u64>,
    written: Notify,
    allocated_sectors: u64,
    allocated_done: Cell<u64>,
    progress: &'a RefCell<Progress>,
}

impl Shared<'_> {
    fn fail(&self) {
        self.failed.set(true);
        self.written.notify_waiters();
    }
}

/// Length of the run of sectors at the start of `buf` that are all zero or
/// all data, with the boundary moved to `alignment` where a cut would
/// otherwise make the target read-modify-write (QEMU: is_allocated_sectors).
fn is_allocated_sectors(buf: &[u8], n: u64, sector_num: u64, alignment: u64) -> (bool, u64) {
    if n == 0 {
        return (false, 0);
    }
    let sector = |i: u64| &buf[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
    let mut zero = is_zero(sector(0));
    let mut i = 1;
    while i < n && is_zero(sector(i)) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, i);
    }
    let tail = (sector_num + i) & (alignment - 1);
    if tail != 0 {
        // Data follows: a short zero run would be rewritten by its RMW anyway.
        if zero && i <= tail {
            zero = false;
        }
        if !zero {
            i = (i + alignment - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!zero, i)
}

/// Like [`is_allocated_sectors`], but data runs swallow zero runs shorter
/// than `min` (QEMU: is_allocated_sectors_min); a leading zero run is
/// reported whatever its length, as QEMU does.
fn is_allocated_sectors_min(
    buf: &[u8],
    n: u64,
    min: u64,
    sector_num: u64,
    alignment: u64,
) -> (bool, u64) {
    let min = min.min(n);
    let (data, first) = is_allocated_sectors(buf, n, sector_num, alignment);
    if !data {
        return (false, first);
    }
    let (mut used, mut checked) = (first, first);
    while checked < n {
        let at = (checked * SECTOR) as usize;
        let (data, run) =
            is_allocated_sectors(&buf[at..], n - checked, sector_num + checked, alignment);
        checked += run;
        if data {
            used = checked;
        } else if run >= min {
            break;
        }
    }
    (true, used)
}

impl Convert {
    /// The source holding `sector_num` and the sector where it starts.
    fn select_part(&self, sector_num: u64) -> (usize, u64) {
        let mut start = 0;
        for (i, s) in self.src.iter().enumerate() {
            if sector_num - start < s.sectors {
                return (i, start);
            }
            start += s.sectors;
        }
        (
            self.src.len() - 1,
            start - self.src[self.src.len() - 1].sectors,
        )
    }

    /// How many sectors from `sector_num` to handle as one request, and
    /// their status in `walk` (QEMU: convert_iteration_sectors); an error
    /// is reported here.
    async fn iteration_sectors(
        &self,
        walk: &mut Walk,
        sector_num: u64,
    ) -> std::result::Result<u64, ()> {
        let (cur, cur_start) = self.select_part(sector_num);
        let mut n = (self.total_sectors - sector_num).min(REQUEST_MAX_SECTORS);
        let mut post_backing_zero = false;
        if let Some(tbs) = self.target_backing_sectors {
            if sector_num >= tbs {
                post_backing_zero = true;
            } else if sector_num + n > tbs {
                // From there on zeroes are handled differently.
                n = tbs - sector_num;
            }
        }
        if walk.sector_next_status <= sector_num {
            let src = &self.src[cur];
            let offset = (sector_num - cur_start) * SECTOR;
            let base = if self.target_has_backing {
                src.node.skip_filters().backing()
            } else {
                None
            };
            let (count, zero, data) = loop {
                match src
                    .node
                    .block_status_above(base.as_ref(), offset, n * SECTOR)
                    .await
                {
                    Ok((st, _)) => break (st.len, st.zero, st.data),
                    Err(e) if self.salvage => {
                        if n == 1 {
                            if !self.quiet {
                                warn_report(format!(
                                    "error while reading block status at offset {offset}: {}",
                                    strerror(e.code())
                                ));
                            }
                            // Just try to read the data then.
                            break (SECTOR, false, true);
                        }
                        n = n.div_ceil(4);
                    }
                    Err(e) => {
                        error_report(format!(
                            "error while reading block status at offset {offset}: {}",
                            strerror(e.code())
                        ));
                        return Err(());
                    }
                }
            };
            n = count.div_ceil(SECTOR);
            // Keep the next status query aligned to the source's clusters.
            let tail = (sector_num - cur_start + n) % src.alignment;
            if n > tail {
                n -= tail;
            }
            walk.status = if zero {
                if post_backing_zero {
                    Status::BackingFile
                } else {
                    Status::Zero
                }
            } else if data || !self.target_has_backing {
                Status::Data
            } else {
                Status::BackingFile
            };
            walk.sector_next_status = sector_num + n;
        }
        n = n.min(walk.sector_next_status - sector_num);
        if walk.status == Status::Data {
            n = n.min(self.buf_sectors);
        }
        // Compressed output is written in whole clusters: a shorter area
        // counts as data, as in QEMU.
        if self.compressed {
            let cluster = self.target_cluster_sectors;
            if n < cluster {
                n = cluster.min(self.total_sectors - sector_num);
                walk.status = Status::Data;
            } else {
                n = n / cluster * cluster;
            }
        }
        Ok(n)
    }

    /// Reads `nb` sectors from `sector_num` of the concatenated sources
    /// into `buf` (QEMU: convert_co_read); in salvage mode unreadable
    /// sectors read as zeroes.
    async fn read(&self, mut sector_num: u64, mut nb: u64, buf: IoBuf) -> Result<IoBuf> {
        let mut done = Vec::new();
        let mut rest = buf;
        let mut single_read_until = 0;
        while nb > 0 {
            let (cur, cur_start) = self.select_part(sector_num);
            let src = &self.src[cur];
            let offset = (sector_num - cur_start) * SECTOR;
            let mut n = nb.min(src.sectors - (sector_num - cur_start));
            if single_read_until > offset {
                n = 1;
            }
            let (piece, tail) = rest.split_at((n * SECTOR) as usize);
            match src.blk.read(offset, piece).await {
                Ok(p) => done.push(p),
                Err(e) if self.salvage => {
                    if n > 1 {
                        // Again, sector by sector.
                        single_read_until = offset + n * SECTOR;
                        rest = IoBuf::join_all(vec![IoBuf::zeroed((n * SECTOR) as usize), tail]);
                        continue;
                    }
                    if !self.quiet {
                        warn_report(format!(
                            "error while reading offset {offset}: {}",
                            strerror(e.code())
                        ));
                    }
                    done.push(IoBuf::zeroed(SECTOR as usize));
                }
                Err(e) => return Err(e),
            }
            rest = tail;
            sector_num += n;
            nb -= n;
        }
        done.push(rest);
        Ok(IoBuf::join_all(done))
    }

    /// Holds a write of `bytes` back to the rate limit.
    async fn throttle(&self, bytes: u64) {
        if let Some(t) = &self.throttle {
            t.throttle_write(bytes).await;
        }
    }

    async fn write_zeroes(&self, sector_num: u64, n: u64) -> Result<()> {
        self.throttle(n * SECTOR).await;
        let flags = WriteFlags {
            may_unmap: true,
            ..WriteFlags::default()
        };
        self.target
            .write_zeroes(sector_num * SECTOR, n * SECTOR, flags)
            .await
    }

    /// Writes whole clusters of data compressed, as qemu-img writes each
    /// (QEMU: convert_co_write): a zero cluster is no data (unless `-S 0`),
    /// left alone where the target reads as zeroes and written as zeroes
    /// elsewhere; each run of other clusters is one compressed write, whose
    /// clusters the target compresses at once and places in guest order.
    async fn write_compressed(&self, sector_num: u64, nb: u64, buf: IoBuf) -> Result<IoBuf> {
        let cluster = self.target_cluster_sectors;
        let bytes = buf.as_slice();
        let zero_at = |at: u64| {
            let start = ((at - sector_num) * SECTOR) as usize;
            let end = ((at + cluster).min(sector_num + nb) - sector_num) * SECTOR;
            self.min_sparse != 0 && is_zero(&bytes[start..end as usize])
        };
        let mut runs: Vec<(bool, u64, u64)> = Vec::new();
        let mut at = sector_num;
        while at < sector_num + nb {
            let n = cluster.min(sector_num + nb - at);
            let zero = zero_at(at);
            match runs.last_mut() {
                Some(run) if run.0 == zero => run.2 += n,
                _ => runs.push((zero, at, n)),
            }
            at += n;
        }
        let mut done = Vec::with_capacity(runs.len() + 1);
        let mut rest = buf;
        for (zero, at, n) in runs {
            let (piece, tail) = rest.split_at((n * SECTOR) as usize);
            rest = tail;
            if zero {
                if !self.has_zero_init {
                    self.write_zeroes(at, n).await?;
                }
                done.push(piece);
            } else {
                self.throttle(n * SECTOR).await;
                done.push(self.target.write_compressed(at * SECTOR, piece).await?);
            }
        }
        done.push(rest);
        Ok(IoBuf::join_all(done))
    }

    /// True when `sector` starts a target cluster (or is the end of the disk).
    fn on_cluster(&self, sector: u64) -> bool {
        sector.is_multiple_of(self.target_cluster_sectors) || sector >= self.total_sectors
    }

    /// Writes one chunk to the target as its status says (QEMU:
    /// convert_co_write); gives the data buffer back. `issued` says, at
    /// the first poll, whether every piece went to the target at once, each
    /// on clusters of its own (the target then allocates in order), and how
    /// many bytes of data they hold.
    async fn write(
        &self,
        sector_num: u64,
        nb: u64,
        buf: Option<IoBuf>,
        status: Status,
        issued: &Issued,
    ) -> Result<Option<IoBuf>> {
        let buf = match (status, buf) {
            (Status::Data, Some(buf)) => buf,
            (Status::BackingFile, buf) => return Ok(buf),
            (_, buf) => {
                if !self.has_zero_init {
                    self.write_zeroes(sector_num, nb).await?;
                }
                return Ok(buf);
            }
        };
        if self.compressed {
            return self.write_compressed(sector_num, nb, buf).await.map(Some);
        }
        // Where pieces start and end on clusters of their own, every piece
        // is issued at the first poll, in order: the target allocates them
        // in order, and their I/O runs together. Otherwise one after the
        // other, as qemu-img: a piece sharing a cluster with the one before
        // waits for its allocation, and the next must not overtake it.
        let mut plan = Vec::new();
        let mut left = nb;
        let mut at = sector_num;
        let mut scan = buf.as_slice();
        while left > 0 {
            // With -S 0 (or a copy offload) everything is written as it is.
            let (data, n) = if self.min_sparse == 0 || self.copy_range {
                (true, left)
            } else {
                is_allocated_sectors_min(scan, left, self.min_sparse, at, self.alignment)
            };
            plan.push((data, at, n));
            scan = &scan[(n * SECTOR) as usize..];
            at += n;
            left -= n;
        }
        let together = plan
            .iter()
            .all(|&(_, at, n)| self.on_cluster(at) && self.on_cluster(at + n));
        issued.together.set(together);
        // Only data pieces are placed by the format; a zero write must be
        // needless (the target reads as zeroes) for the count to tell all.
        if together && (self.has_zero_init || plan.iter().all(|p| p.0)) {
            let bytes = plan.iter().filter(|p| p.0).map(|p| p.2 * SECTOR).sum();
            issued.data_bytes.set(Some(bytes));
        }
        let mut pieces = Vec::with_capacity(plan.len());
        let mut rest = buf;
        for (data, at, n) in plan {
            let (piece, tail) = rest.split_at((n * SECTOR) as usize);
            rest = tail;
            pieces.push(async move {
                if data {
                    self.throttle(n * SECTOR).await;
                    self.target
                        .write(at * SECTOR, piece, WriteFlags::default())
                        .await
                } else {
                    if !self.has_zero_init {
                        self.write_zeroes(at, n).await?;
                    }
                    Ok(piece)
                }
            });
        }
        let mut done = Vec::with_capacity(pieces.len() + 1);
        if together {
            for r in futures::future::join_all(pieces).await {
                done.push(r?);
            }
        } else {
            for p in pieces {
                done.push(p.await?);
            }
        }
        done.push(rest);
        Ok(Some(IoBuf::join_all(done)))
    }

    /// One worker (QEMU: convert_co_do_copy): takes the next chunk, reads
    /// it, waits for its turn if writes go in order, writes it.
    async fn worker(&self, sh: &Shared<'_>) {
        let buf_bytes = (self.buf_sectors * SECTOR) as usize;
        let mut spare: Option<IoBuf> = None;
        loop {
            let (sector_num, n, status) = {
                let mut walk = sh.walk.lock().await;
                if sh.failed.get() || walk.sector_num >= self.total_sectors {
                    break;
                }
                let sector_num = walk.sector_num;
                let Ok(mut n) = self.iteration_sectors(&mut walk, sector_num).await else {
                    sh.fail();
                    break;
                };
                let status = walk.status;
                if self.min_sparse == 0 && status == Status::Zero {
                    n = n.min(self.buf_sectors);
                }
                // Others may go on beyond this chunk while it is copied.
                walk.sector_num += n;
                (sector_num, n, status)
            };
            if status == Status::Data || (self.min_sparse == 0 && status == Status::Zero) {
                // A compressed chunk counts cluster by cluster, as qemu-img's
                // one-cluster chunks do, so the progress lines are the same.
                let step = if self.compressed {
                    self.target_cluster_sectors
                } else {
                    n
                };
                let mut left = n;
                while left > 0 {
                    let s = step.min(left);
                    sh.allocated_done.set(sh.allocated_done.get() + s);
                    sh.progress.borrow_mut().report(
                        sh.allocated_done.get() * SECTOR,
                        sh.allocated_sectors * SECTOR,
                    );
                    left -= s;
                }
            }
            let mut status = status;
            let mut data = None;
            let mut tail = None;
            if status == Status::Data || (self.min_sparse == 0 && status == Status::Zero) {
                let whole = spare.take().unwrap_or_else(|| IoBuf::zeroed(buf_bytes));
                let (head, rest) = whole.split_at((n * SECTOR) as usize);
                tail = Some(rest);
                if status == Status::Data {
                    match self.read(sector_num, n, head).await {
                        Ok(b) => data = Some(b),
                        Err(e) => {
                            error_report(format!(
                                "error while reading at byte {}: {}",
                                sector_num * SECTOR,
                                strerror(e.code())
                            ));
                            sh.fail();
                        }
                    }
                } else {
                    // -S 0: zeroes are written as data, allocating the target.
                    let mut head = head;
                    head.as_mut_slice().fill(0);
                    data = Some(head);
                    status = Status::Data;
                }
            }
            if self.wr_in_order {
                loop {
                    let turn = sh.written.notified();
                    if sh.wr_offs.get() == sector_num || sh.failed.get() {
                        break;
                    }
                    turn.await;
                }
            }
            // On a raw target writes go in order of submission (QEMU waits
            // for each to complete): once this one is issued the next chunk
            // may go, so the target always has a write queued. A format
            // keeps QEMU's rule: its allocation may wait inside the write
            // (its metadata lock, an L2 table boundary), and a later chunk
            // overtaking it would make the layout differ from qemu-img's.
            // A rate limit keeps QEMU's rule too.
            // A format that allocates may let the next chunk go once this
            // one's clusters are placed, which it says by the bytes it has
            // placed: then the next cannot be placed before it, and the
            // layout is qemu-img's.
            let early_turn = self.wr_in_order && self.throttle.is_none();
            let planned = || self.target_format.driver().bytes_planned();
            let mut passed = false;
            if !sh.failed.get() {
                let issued = Issued::default();
                let placed_before = planned();
                let mut w = std::pin::pin!(self.write(sector_num, n, data.take(), status, &issued));
                let first = futures::poll!(w.as_mut());
                let placed = match (placed_before, planned(), issued.data_bytes.get()) {
                    (Some(a), Some(b), Some(bytes)) => b - a >= bytes,
                    (None, _, _) => issued.together.get() && self.target_cluster_sectors == 1,
                    _ => false,
                };
                if early_turn && (placed || first.is_ready()) {
                    sh.wr_offs.set(sector_num + n);
                    sh.written.notify_waiters();
                    passed = true;
                }
                let r = match first {
                    std::task::Poll::Ready(r) => r,
                    std::task::Poll::Pending => w.await,
                };
                match r {
                    Ok(b) => data = b,
                    Err(e) => {
                        error_report(format!(
                            "error while writing at byte {}: {}",
                            sector_num * SECTOR,
                            strerror(e.code())
                        ));
                        sh.fail();
                        data = None;
                    }
                }
            }
            if self.wr_in_order && !passed {
                sh.wr_offs.set(sector_num + n);
                sh.written.notify_waiters();
            }
            // The buffer is whole again when nothing kept a part of it.
            if let (Some(d), Some(t)) = (data, tail) {
                if let Ok(b) = d.join(t) {
                    if b.len() == buf_bytes {
                        spare = Some(b);
                    }
                }
            }
        }
    }

    /// Runs the copy (QEMU: convert_do_copy); false after an error was reported.
    pub async fn run(&self, progress: &RefCell<Progress>) -> bool {
        // First pass: how much will be copied, for the progress report.
        let mut walk = Walk {
            sector_num: 0,
            status: Status::Data,
            sector_next_status: 0,
        };
        let mut allocated_sectors = 0;
        let mut sector_num = 0;
        while sector_num < self.total_sectors {
            let Ok(n) = self.iteration_sectors(&mut walk, sector_num).await else {
                return false;
            };
            if walk.status == Status::Data || (self.min_sparse == 0 && walk.status == Status::Zero)
            {
                allocated_sectors += n;
            }
            sector_num += n;
        }
        walk.sector_next_status = 0;
        let sh = Shared {
            walk: Mutex::new(walk),
            failed: Cell::new(false),
            wr_offs: Cell::new(0),
            written: Notify::new(),
            allocated_sectors,
            allocated_done: Cell::new(0),
            progress,
        };
        let json = progress.borrow().is_json();
        let total = allocated_sectors * SECTOR;
        if json {
            progress.borrow_mut().report(0, total);
        }
        let workers = (0..self.num_coroutines).map(|_| self.worker(&sh));
        futures::future::join_all(workers).await;
        if json && !sh.failed.get() {
            // Nothing to copy still ends with everything done.
            progress.borrow_mut().report(total, total);
        }
        !sh.failed.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sectors(pattern: &[bool]) -> Vec<u8> {
        pattern
            .iter()
            .flat_map(|&d| vec![u8::from(d); SECTOR as usize])
            .collect()
    }

    #[test]
    fn zero_runs_as_qemu_cuts_them() {
        // data, then zeroes: the data run ends at the alignment.
        let b = sectors(&[true, false, false, false, false, false, false, false, false]);
        assert_eq!(is_allocated_sectors(&b, 9, 0, 8), (true, 8));
        // all zero
        let z = sectors(&[false; 4]);
        assert_eq!(is_allocated_sectors(&z, 4, 0, 8), (false, 4));
        // zeroes, then data past the alignment: zeroes up to the boundary.
        let mut p = vec![false; 10];
        p[9] = true;
        let b = sectors(&p);
        assert_eq!(is_allocated_sectors(&b, 10, 0, 8), (false, 8));
        // short zero run before data within one aligned block: all data.
        let b = sectors(&[false, false, true, true]);
        assert_eq!(is_allocated_sectors(&b, 4, 0, 8), (true, 4));
    }

    #[test]
    fn short_zero_runs_inside_data_are_written() {
        let mut p = vec![true; 4];
        p.extend([false; 8]);
        p.extend([true; 4]);
        p.extend([false; 16]);
        let b = sectors(&p);
        // With alignment 1: 8 zero sectors are not a hole when min is 16.
        assert_eq!(is_allocated_sectors_min(&b, 32, 16, 0, 1), (true, 16));
        // min 8: the first zero run is a hole already.
        assert_eq!(is_allocated_sectors_min(&b, 32, 8, 0, 1), (true, 4));
    }
}
