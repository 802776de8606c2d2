//! `blklogwrites`: passes every request to `file` and records each write,
//! zero write, discard and flush that completed there in a `log` child, in
//! the format of Linux's dm-log-writes (QEMU: block/blklogwrites.c). The
//! log is what crash-point tests replay: any prefix of it, up to a flush
//! and then some of the writes after it, is a state the disk could have
//! been left in.
//!
//! The log: sector 0 holds the superblock; each entry is one sector of
//! header followed, for writes and zero writes, by the written sectors.
//! The superblock's entry count is rewritten (and the log flushed) at each
//! flush and every `log-super-update-interval` entries.

use async_lock::Mutex as AsyncMutex;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use strata_block::options::{take_bool, take_size, take_u64};
use strata_block::{
    BlockStatus, Child, ChildCell, ChildRole, Driver, DriverClass, Error, IoBuf, Limits, Node,
    OpenCtx, Opts, Perm, Preallocation, Result, WriteFlags,
};

/// The log's magic number ("rhswfsj" read little-endian).
pub const LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
/// The only log version there is.
pub const LOG_VERSION: u64 = 1;
/// Entry flags, as dm-log-writes defines them.
pub const LOG_FLUSH: u64 = 1 << 0;
/// A write with forced unit access (never set by QEMU or Strata).
pub const LOG_FUA: u64 = 1 << 1;
/// A discard: the entry has no data sectors.
pub const LOG_DISCARD: u64 = 1 << 2;
/// A mark (a named point; never set by QEMU or Strata).
pub const LOG_MARK: u64 = 1 << 3;
const LOG_FLAG_MASK: u64 = LOG_FLUSH | LOG_FUA | LOG_DISCARD | LOG_MARK;
/// Bytes of the superblock and of an entry header.
const SUPER_LEN: usize = 28;
const ENTRY_LEN: usize = 32;

/// The log's superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogSuper {
    pub magic: u64,
    pub version: u64,
    pub nr_entries: u64,
    pub sector_size: u32,
}

impl LogSuper {
    /// Parses the first bytes of sector 0.
    pub fn parse(b: &[u8]) -> LogSuper {
        LogSuper {
            magic: le64(b, 0),
            version: le64(b, 8),
            nr_entries: le64(b, 16),
            sector_size: u32::from_le_bytes(b[24..28].try_into().unwrap_or_default()),
        }
    }

    /// The magic and version a log must have (QEMU's errors).
    fn check(&self) -> Result<()> {
        if self.magic != LOG_MAGIC {
            return Err(Error::invalid("Invalid log superblock magic"));
        }
        if self.version != LOG_VERSION {
            return Err(Error::invalid(format!(
                "Unsupported log version {}",
                self.version
            )));
        }
        Ok(())
    }

    fn encode(&self, sector_size: usize) -> IoBuf {
        let mut buf = IoBuf::zeroed(sector_size);
        let b = buf.as_mut_slice();
        b[0..8].copy_from_slice(&self.magic.to_le_bytes());
        b[8..16].copy_from_slice(&self.version.to_le_bytes());
        b[16..24].copy_from_slice(&self.nr_entries.to_le_bytes());
        b[24..28].copy_from_slice(&self.sector_size.to_le_bytes());
        buf
    }
}

/// One entry's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// First sector written, in log sectors.
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    pub data_len: u64,
}

impl LogEntry {
    /// Parses an entry header.
    pub fn parse(b: &[u8]) -> LogEntry {
        LogEntry {
            sector: le64(b, 0),
            nr_sectors: le64(b, 8),
            flags: le64(b, 16),
            data_len: le64(b, 24),
        }
    }

    /// Log sectors the entry takes: its header and, unless it is a
    /// discard, its data.
    pub fn log_sectors(&self) -> u64 {
        if self.flags & LOG_DISCARD != 0 {
            1
        } else {
            1 + self.nr_sectors
        }
    }
}

/// One entry of a log read whole: its header and where its data lies in
/// the log (empty for flushes and discards).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub entry: LogEntry,
    pub data: std::ops::Range<usize>,
}

/// Reads a whole log: the superblock and the entries it counts, for replay.
pub fn parse_log(log: &[u8]) -> Result<(LogSuper, Vec<LogRecord>)> {
    if log.len() < SUPER_LEN {
        return Err(Error::invalid("Log shorter than its superblock"));
    }
    let sb = LogSuper::parse(log);
    sb.check()?;
    let ss = u64::from(sb.sector_size);
    if !sector_size_valid(ss) {
        return Err(Error::invalid(format!("Invalid log sector size {ss}")));
    }
    let mut records = Vec::new();
    let mut sector = 1u64;
    for i in 0..sb.nr_entries {
        let at = sector
            .checked_mul(ss)
            .and_then(|a| usize::try_from(a).ok())
            .filter(|a| a + ENTRY_LEN <= log.len())
            .ok_or_else(|| Error::invalid(format!("Log entry {i} lies past the log's end")))?;
        let entry = LogEntry::parse(&log[at..]);
        if entry.flags & !LOG_FLAG_MASK != 0 {
            return Err(Error::invalid(format!(
                "Invalid flags 0x{:x} in log entry {i}",
                entry.flags
            )));
        }
        let data_len = if entry.flags & LOG_DISCARD != 0 {
            Some(0)
        } else {
            entry.nr_sectors.checked_mul(ss)
        }
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| at + ss as usize + n <= log.len())
        .ok_or_else(|| Error::invalid(format!("Data of log entry {i} lies past the log's end")))?;
        let start = at + ss as usize;
        records.push(LogRecord {
            entry,
            data: start..start + data_len,
        });
        sector += entry.log_sectors();
    }
    Ok((sb, records))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// A sector size the log can use (QEMU: blk_log_writes_sector_size_valid).
fn sector_size_valid(size: u64) -> bool {
    size.is_power_of_two() && size >= ENTRY_LEN as u64 && size < 1 << 24
}

/// The `blklogwrites` driver class.
pub struct BlkLogWritesClass;

/// Where the next entry goes; taken in one step per entry, so entries
/// written concurrently never overlap.
struct Cursor {
    sector: u64,
    nr_entries: u64,
}

struct BlkLogWritesDriver {
    file: ChildCell,
    log: Arc<Node>,
    sector_size: u64,
    update_interval: u64,
    cursor: Mutex<Cursor>,
    /// Serializes superblock updates; holds the count last written.
    super_written: AsyncMutex<u64>,
    /// Something was logged since the last flush entry.
    dirty: AtomicBool,
}

impl BlkLogWritesDriver {
    /// Appends an entry for a request that completed on `file`: its header
    /// and `data` (a write), or `zero_len` zeroed bytes (a zero write).
    async fn log(
        &self,
        offset: u64,
        len: u64,
        flags: u64,
        data: Option<&[u8]>,
        zero_len: u64,
    ) -> Result<()> {
        let ss = self.sector_size;
        let data_len = data.map_or(0, |d| d.len() as u64);
        let (at, seq) = {
            let mut c = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
            let at = c.sector * ss;
            c.sector += 1 + data_len.div_ceil(ss) + zero_len.div_ceil(ss);
            c.nr_entries += 1;
            (at, c.nr_entries)
        };
        let header = LogEntry {
            sector: offset / ss,
            nr_sectors: len / ss,
            flags,
            data_len: 0,
        };
        let mut buf = IoBuf::zeroed((ss + data_len.div_ceil(ss) * ss) as usize);
        let b = buf.as_mut_slice();
        b[0..8].copy_from_slice(&header.sector.to_le_bytes());
        b[8..16].copy_from_slice(&header.nr_sectors.to_le_bytes());
        b[16..24].copy_from_slice(&header.flags.to_le_bytes());
        b[24..32].copy_from_slice(&header.data_len.to_le_bytes());
        if let Some(d) = data {
            b[ss as usize..ss as usize + d.len()].copy_from_slice(d);
        }
        self.log.write(at, buf, WriteFlags::default()).await?;
        if zero_len > 0 {
            self.log
                .write_zeroes(at + ss, zero_len, WriteFlags::default())
                .await?;
        }
        if flags & LOG_FLUSH != 0 || seq.is_multiple_of(self.update_interval) {
            self.update_super(seq).await?;
        }
        Ok(())
    }

    /// Writes the superblock with the entry count now and flushes the log,
    /// unless an update that came later already covered entry `seq`.
    async fn update_super(&self, seq: u64) -> Result<()> {
        let mut written = self.super_written.lock().await;
        if *written >= seq {
            return Ok(());
        }
        let nr_entries = self
            .cursor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nr_entries;
        let sb = LogSuper {
            magic: LOG_MAGIC,
            version: LOG_VERSION,
            nr_entries,
            sector_size: self.sector_size as u32,
        };
        let buf = sb.encode(self.sector_size as usize);
        self.log.write(0, buf, WriteFlags::default()).await?;
        self.log.flush().await?;
        *written = nr_entries;
        Ok(())
    }
}

#[async_trait]
impl Driver for BlkLogWritesDriver {
    fn reopen_supported(&self) -> bool {
        false
    }

    fn format_name(&self) -> &'static str {
        "blklogwrites"
    }

    fn length(&self) -> u64 {
        self.file.get().length()
    }

    fn children(&self) -> Vec<Child> {
        // Newest first, as QEMU lists a node's children.
        vec![
            Child::new(ChildRole::Log, &self.log),
            Child::new(ChildRole::File, &self.file.get()),
        ]
    }

    fn child_cell(&self, role: ChildRole) -> Option<&ChildCell> {
        (role == ChildRole::File).then_some(&self.file)
    }

    fn limits(&self) -> Limits {
        let child = self.file.get().limits();
        Limits {
            request_alignment: self.sector_size as u32,
            ..child
        }
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn growable(&self) -> bool {
        self.file.get().driver().growable()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.file.get().driver().cluster_size()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.file.get().read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let file = self.file.get().write(offset, buf, flags).await;
        self.dirty.store(true, Ordering::Release);
        let data = match &file {
            Ok(b) => b.as_slice(),
            Err(_) => &[],
        };
        // Logged even when the file failed, as QEMU logs it (with zeroes:
        // the buffer went down with the failed request).
        let zero_pad = if file.is_ok() { 0 } else { len };
        self.log(offset, len, 0, Some(data), zero_pad).await?;
        file
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let file = self.file.get().write_zeroes(offset, len, flags).await;
        self.dirty.store(true, Ordering::Release);
        self.log(offset, len, 0, None, len).await?;
        file
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let file = self.file.get().discard(offset, len).await;
        self.dirty.store(true, Ordering::Release);
        self.log(offset, len, LOG_DISCARD, None, 0).await?;
        file
    }

    async fn flush(&self) -> Result<()> {
        // With nothing written since the last flush QEMU flushes the
        // children only, and logs nothing.
        if !self.dirty.swap(false, Ordering::AcqRel) {
            self.file.get().flush().await?;
            return self.log.flush().await;
        }
        let file = self.file.get().flush().await;
        self.log(0, 0, LOG_FLUSH, None, 0).await?;
        file
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            raw: true,
            ..BlockStatus::data_at(len, self.file.get(), offset)
        })
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Preallocation) -> Result<()> {
        // Not logged, as in QEMU: a filter's resize goes to its file.
        self.file.get().truncate(size, exact, prealloc).await
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.file.get().driver().allocated_size().await
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.file.get().set_perm(perm, shared)
    }

    async fn close(&self) -> Result<()> {
        // QEMU flushes every node it closes: a write since the last flush
        // ends the log with a flush entry.
        let flushed = self.flush().await;
        let f = flushed.and(self.file.get().close().await);
        let l = self.log.close().await;
        f.and(l)
    }
}

/// Where an existing log ends: the sector after its last entry (QEMU:
/// blk_log_writes_find_cur_log_sector).
async fn find_end(log: &Node, sector_size: u64, nr_entries: u64) -> Result<u64> {
    let mut sector = 1;
    for i in 0..nr_entries {
        let buf = log
            .read(sector * sector_size, IoBuf::zeroed(sector_size as usize))
            .await
            .map_err(|e| e.context(format!("Failed to read log entry {i}")))?;
        let e = LogEntry::parse(buf.as_slice());
        if e.flags & !LOG_FLAG_MASK != 0 {
            return Err(Error::invalid(format!(
                "Invalid flags 0x{:x} in log entry {i}",
                e.flags
            )));
        }
        sector += e.log_sectors();
    }
    Ok(sector)
}

#[async_trait]
impl DriverClass for BlkLogWritesClass {
    fn name(&self) -> &'static str {
        "blklogwrites"
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &["log-append", "log-sector-size"]
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(
            "Driver 'blklogwrites' does not support image creation",
        ))
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        // Metadata of the filter: opened as a protocol, never probed.
        let log = ctx
            .open_child(opts, "log", None, ChildRole::Log, true)
            .await?
            .ok_or_else(|| Error::invalid("A block device must be specified for \"log\""))?;
        let append = take_bool(opts, "log-append")?.unwrap_or(false);
        let size_opt = take_size(opts, "log-sector-size")?;
        let interval = take_u64(opts, "log-super-update-interval")?.unwrap_or(4096);
        let (sector_size, cursor) = if append {
            if size_opt.is_some() {
                return Err(Error::invalid(
                    "log-append and log-sector-size are mutually exclusive",
                ));
            }
            let sb = if log.length() == 0 {
                LogSuper {
                    magic: LOG_MAGIC,
                    version: LOG_VERSION,
                    nr_entries: 0,
                    sector_size: 512,
                }
            } else {
                let b = log
                    .read(0, IoBuf::zeroed(SUPER_LEN))
                    .await
                    .map_err(|e| e.context("Could not read log superblock"))?;
                LogSuper::parse(b.as_slice())
            };
            sb.check()?;
            let ss = u64::from(sb.sector_size);
            let mut cursor = Cursor {
                sector: 1,
                nr_entries: 0,
            };
            if sector_size_valid(ss) {
                cursor.sector = find_end(&log, ss, sb.nr_entries).await?;
                cursor.nr_entries = sb.nr_entries;
            }
            (ss, cursor)
        } else {
            let cursor = Cursor {
                sector: 1,
                nr_entries: 0,
            };
            (size_opt.unwrap_or(512), cursor)
        };
        if !sector_size_valid(sector_size) {
            return Err(Error::invalid(format!(
                "Invalid log sector size {sector_size}"
            )));
        }
        if interval == 0 {
            return Err(Error::invalid(format!(
                "Invalid log superblock update interval {interval}"
            )));
        }
        let written = cursor.nr_entries;
        Ok(Box::new(BlkLogWritesDriver {
            file: ChildCell::new(file),
            log,
            sector_size,
            update_interval: interval,
            cursor: Mutex::new(cursor),
            super_written: AsyncMutex::new(written),
            dirty: AtomicBool::new(false),
        }))
    }
}
