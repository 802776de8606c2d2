//! `throttle`: a filter that holds requests back so that the nodes of one
//! throttle group together stay within the group's limits (QEMU:
//! block/throttle.c, block/throttle-groups.c, util/throttle.c).
//!
//! A group is made with `--object throttle-group,id=NAME,...` and lives in a
//! process-wide registry; every throttle node naming it shares its buckets.
//! Each limit is a leaky bucket: a request may start while the bucket is
//! below its size (a tenth of a second's worth, or the burst allowance), is
//! counted into it when it starts, and the bucket drains at the configured
//! rate. Requests of one direction start in arrival order.

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use strata_block::options::take_str;
use strata_block::ChildCell;
use strata_block::{
    BlockStatus, Child, ChildRole, Driver, DriverClass, Error, IoBuf, Limits, OpenCtx, Opts, Perm,
    Preallocation, Result, WriteFlags,
};

/// The largest rate a bucket takes (QEMU: THROTTLE_VALUE_MAX).
const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// The buckets, in QEMU's order (BucketType).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bucket {
    BpsTotal = 0,
    BpsRead = 1,
    BpsWrite = 2,
    OpsTotal = 3,
    OpsRead = 4,
    OpsWrite = 5,
}

const BUCKETS: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq)]
struct LeakyBucket {
    /// Average rate per second.
    avg: u64,
    /// Burst rate per second.
    max: u64,
    /// How many seconds a burst may last.
    burst_length: u64,
    /// Units in the bucket now.
    level: f64,
    /// Units in the burst bucket now.
    burst_level: f64,
}

impl Default for LeakyBucket {
    fn default() -> Self {
        LeakyBucket {
            avg: 0,
            max: 0,
            burst_length: 1,
            level: 0.0,
            burst_level: 0.0,
        }
    }
}

impl LeakyBucket {
    fn leak(&mut self, secs: f64) {
        self.level = (self.level - self.avg as f64 * secs).max(0.0);
        if self.burst_length > 1 {
            self.burst_level = (self.burst_level - self.max as f64 * secs).max(0.0);
        }
    }

    /// How long a request must wait before it may start.
    fn wait(&self) -> f64 {
        if self.avg == 0 {
            return 0.0;
        }
        let (size, burst_size) = if self.max == 0 {
            // Short bursts are allowed even without a burst limit.
            (self.avg as f64 / 10.0, 0.0)
        } else {
            (
                self.max as f64 * self.burst_length as f64,
                self.max as f64 / 10.0,
            )
        };
        let extra = self.level - size;
        if extra > 0.0 {
            return extra / self.avg as f64;
        }
        if self.burst_length > 1 {
            let extra = self.burst_level - burst_size;
            if extra > 0.0 {
                return extra / self.max as f64;
            }
        }
        0.0
    }
}

/// A throttle configuration (QEMU: ThrottleConfig).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ThrottleConfig {
    buckets: [LeakyBucket; BUCKETS],
    op_size: u64,
}

impl ThrottleConfig {
    /// Checks the configuration as QEMU's throttle_is_valid does.
    fn validate(&self) -> Result<()> {
        let b = &self.buckets;
        let total_and_rw = |t: Bucket, r: Bucket, w: Bucket, f: fn(&LeakyBucket) -> u64| {
            f(&b[t as usize]) != 0 && (f(&b[r as usize]) != 0 || f(&b[w as usize]) != 0)
        };
        let avg = |x: &LeakyBucket| x.avg;
        let max = |x: &LeakyBucket| x.max;
        if total_and_rw(Bucket::BpsTotal, Bucket::BpsRead, Bucket::BpsWrite, avg)
            || total_and_rw(Bucket::OpsTotal, Bucket::OpsRead, Bucket::OpsWrite, avg)
            || total_and_rw(Bucket::BpsTotal, Bucket::BpsRead, Bucket::BpsWrite, max)
            || total_and_rw(Bucket::OpsTotal, Bucket::OpsRead, Bucket::OpsWrite, max)
        {
            return Err(Error::invalid(
                "bps/iops/max total values and read/write values cannot be used at the same time",
            ));
        }
        if self.op_size != 0
            && b[Bucket::OpsTotal as usize].avg == 0
            && b[Bucket::OpsRead as usize].avg == 0
            && b[Bucket::OpsWrite as usize].avg == 0
        {
            return Err(Error::invalid("iops size requires an iops value to be set"));
        }
        for bkt in b {
            if bkt.avg > VALUE_MAX || bkt.max > VALUE_MAX {
                return Err(Error::invalid(format!(
                    "bps/iops/max values must be within [0, {VALUE_MAX}]"
                )));
            }
            if bkt.burst_length == 0 {
                return Err(Error::invalid("the burst length cannot be 0"));
            }
            if bkt.burst_length > 1 && bkt.max == 0 {
                return Err(Error::invalid("burst length set without burst rate"));
            }
            if bkt.max != 0 && bkt.burst_length > VALUE_MAX / bkt.max {
                return Err(Error::invalid("burst length too high for this burst rate"));
            }
            if bkt.max != 0 && bkt.avg == 0 {
                return Err(Error::invalid(
                    "bps_max/iops_max require corresponding bps/iops values",
                ));
            }
            if bkt.max != 0 && bkt.max < bkt.avg {
                return Err(Error::invalid(
                    "bps_max/iops_max cannot be lower than bps/iops",
                ));
            }
        }
        Ok(())
    }
}

/// Which field of a bucket a property sets.
#[derive(Clone, Copy)]
enum Field {
    Avg,
    Max,
    BurstLength,
}

/// The ThrottleLimits members in QAPI order, with the bucket and field
/// each sets; `None` is iops-size.
const LIMITS: [(&str, Option<(Bucket, Field)>); 19] = [
    ("iops-total", Some((Bucket::OpsTotal, Field::Avg))),
    ("iops-total-max", Some((Bucket::OpsTotal, Field::Max))),
    (
        "iops-total-max-length",
        Some((Bucket::OpsTotal, Field::BurstLength)),
    ),
    ("iops-read", Some((Bucket::OpsRead, Field::Avg))),
    ("iops-read-max", Some((Bucket::OpsRead, Field::Max))),
    (
        "iops-read-max-length",
        Some((Bucket::OpsRead, Field::BurstLength)),
    ),
    ("iops-write", Some((Bucket::OpsWrite, Field::Avg))),
    ("iops-write-max", Some((Bucket::OpsWrite, Field::Max))),
    (
        "iops-write-max-length",
        Some((Bucket::OpsWrite, Field::BurstLength)),
    ),
    ("bps-total", Some((Bucket::BpsTotal, Field::Avg))),
    ("bps-total-max", Some((Bucket::BpsTotal, Field::Max))),
    (
        "bps-total-max-length",
        Some((Bucket::BpsTotal, Field::BurstLength)),
    ),
    ("bps-read", Some((Bucket::BpsRead, Field::Avg))),
    ("bps-read-max", Some((Bucket::BpsRead, Field::Max))),
    (
        "bps-read-max-length",
        Some((Bucket::BpsRead, Field::BurstLength)),
    ),
    ("bps-write", Some((Bucket::BpsWrite, Field::Avg))),
    ("bps-write-max", Some((Bucket::BpsWrite, Field::Max))),
    (
        "bps-write-max-length",
        Some((Bucket::BpsWrite, Field::BurstLength)),
    ),
    ("iops-size", None),
];

/// Request direction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read = 0,
    Write = 1,
}

struct State {
    cfg: ThrottleConfig,
    previous_leak: Instant,
}

impl State {
    fn leak(&mut self, now: Instant) {
        let secs = now
            .saturating_duration_since(self.previous_leak)
            .as_secs_f64();
        self.previous_leak = now;
        if secs > 0.0 {
            for b in &mut self.cfg.buckets {
                b.leak(secs);
            }
        }
    }

    fn wait(&self, dir: Dir) -> f64 {
        let to_check = match dir {
            Dir::Read => [
                Bucket::BpsTotal,
                Bucket::OpsTotal,
                Bucket::BpsRead,
                Bucket::OpsRead,
            ],
            Dir::Write => [
                Bucket::BpsTotal,
                Bucket::OpsTotal,
                Bucket::BpsWrite,
                Bucket::OpsWrite,
            ],
        };
        to_check
            .iter()
            .map(|b| self.cfg.buckets[*b as usize].wait())
            .fold(0.0, f64::max)
    }

    fn account(&mut self, dir: Dir, size: u64) {
        let units = if self.cfg.op_size != 0 && size > self.cfg.op_size {
            size as f64 / self.cfg.op_size as f64
        } else {
            1.0
        };
        let (bps, ops) = match dir {
            Dir::Read => (
                [Bucket::BpsTotal, Bucket::BpsRead],
                [Bucket::OpsTotal, Bucket::OpsRead],
            ),
            Dir::Write => (
                [Bucket::BpsTotal, Bucket::BpsWrite],
                [Bucket::OpsTotal, Bucket::OpsWrite],
            ),
        };
        for (b, amount) in bps
            .iter()
            .map(|b| (b, size as f64))
            .chain(ops.iter().map(|b| (b, units)))
        {
            let bkt = &mut self.cfg.buckets[*b as usize];
            bkt.level += amount;
            if bkt.burst_length > 1 {
                bkt.burst_level += amount;
            }
        }
    }
}

/// A throttle group: limits shared by every node that names it.
pub struct ThrottleGroup {
    state: Mutex<State>,
    /// Requests of one direction take their turn in arrival order.
    turns: [tokio::sync::Mutex<()>; 2],
}

impl ThrottleGroup {
    fn new(cfg: ThrottleConfig) -> ThrottleGroup {
        ThrottleGroup {
            state: Mutex::new(State {
                cfg,
                previous_leak: Instant::now(),
            }),
            turns: [tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())],
        }
    }

    /// A group of its own that holds writes to `bps` bytes a second on
    /// average, nothing else (qemu-img convert's `-r`).
    pub fn write_limit(bps: u64) -> ThrottleGroup {
        let mut cfg = ThrottleConfig::default();
        cfg.buckets[Bucket::BpsWrite as usize].avg = bps;
        ThrottleGroup::new(cfg)
    }

    /// Waits until a write of `bytes` may start, and counts it.
    pub async fn throttle_write(&self, bytes: u64) {
        self.intercept(Dir::Write, bytes).await
    }

    /// Waits until a request of `bytes` in `dir` may start, and counts it
    /// (QEMU: throttle_group_co_io_limits_intercept).
    async fn intercept(&self, dir: Dir, bytes: u64) {
        let _turn = self.turns[dir as usize].lock().await;
        loop {
            let wait = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.leak(Instant::now());
                let wait = st.wait(dir);
                if wait <= 0.0 {
                    st.account(dir, bytes);
                    return;
                }
                wait
            };
            // At least a millisecond, so rounding cannot spin.
            tokio::time::sleep(Duration::from_secs_f64(wait).max(Duration::from_millis(1))).await;
        }
    }
}

static GROUPS: LazyLock<Mutex<HashMap<String, Arc<ThrottleGroup>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn groups() -> std::sync::MutexGuard<'static, HashMap<String, Arc<ThrottleGroup>>> {
    GROUPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The group called `name`.
fn group(name: &str) -> Option<Arc<ThrottleGroup>> {
    groups().get(name).cloned()
}

/// QEMU's check of an object id (id_wellformed): a letter, then letters,
/// digits, '-', '.', '_'.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Parses an integer property as QEMU's keyval visitor does (decimal, hex
/// or octal, with a sign).
fn parse_int(key: &str, v: &str) -> Result<i64> {
    let (neg, digits) = match v.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v.strip_prefix('+').unwrap_or(v)),
    };
    let parsed = if let Some(h) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(h, 16).ok()
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8).ok()
    } else {
        digits.parse::<u64>().ok()
    };
    let bad = || Error::invalid(format!("Parameter '{key}' expects integer"));
    let n = parsed.ok_or_else(bad)?;
    if neg {
        if n > i64::MAX as u64 + 1 {
            return Err(bad());
        }
        Ok((n as i64).wrapping_neg())
    } else {
        i64::try_from(n).map_err(|_| bad())
    }
}

fn set_field(cfg: &mut ThrottleConfig, target: Option<(Bucket, Field)>, value: u64) {
    match target {
        None => cfg.op_size = value,
        Some((b, Field::Avg)) => cfg.buckets[b as usize].avg = value,
        Some((b, Field::Max)) => cfg.buckets[b as usize].max = value,
        Some((b, Field::BurstLength)) => cfg.buckets[b as usize].burst_length = value,
    }
}

/// Creates a group from the properties of `--object throttle-group,...`
/// (without `qom-type`), with QEMU's checks and messages, and registers it.
pub fn add_group_object(props: &[(String, String)]) -> Result<()> {
    let mut props: Vec<(String, String)> = props.to_vec();
    fn take_prop(props: &mut Vec<(String, String)>, key: &str) -> Option<String> {
        let i = props.iter().rposition(|(k, _)| k == key)?;
        let v = props.remove(i).1;
        props.retain(|(k, _)| k != key);
        Some(v)
    }
    let id =
        take_prop(&mut props, "id").ok_or_else(|| Error::invalid("Parameter 'id' is missing"))?;
    if !id_wellformed(&id) {
        return Err(Error::invalid(
            "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
        ));
    }
    // Typed as the QAPI schema orders the members: limits, then the x- ones.
    let mut limits = Vec::new();
    for (name, target) in LIMITS {
        let key = format!("limits.{name}");
        if let Some(v) = take_prop(&mut props, &key) {
            limits.push((name, target, parse_int(&key, &v)?));
        }
    }
    if let Some((k, _)) = props.iter().find(|(k, _)| k.starts_with("limits.")) {
        return Err(Error::invalid(format!("Parameter '{k}' is unexpected")));
    }
    let mut xprops = Vec::new();
    for (name, target) in LIMITS {
        let key = format!("x-{name}");
        if let Some(v) = take_prop(&mut props, &key) {
            xprops.push((key.clone(), target, parse_int(&key, &v)?));
        }
    }
    if let Some((k, _)) = props.first() {
        return Err(Error::invalid(format!("Parameter '{k}' is unexpected")));
    }
    let mut cfg = ThrottleConfig::default();
    for (key, target, value) in xprops {
        if value < 0 {
            return Err(Error::invalid("Property values cannot be negative"));
        }
        if matches!(target, Some((_, Field::BurstLength))) && value > u32::MAX as i64 {
            // QEMU's text, missing space and all.
            return Err(Error::invalid(format!(
                "{key} value must be in therange [0, {}]",
                u32::MAX
            )));
        }
        set_field(&mut cfg, target, value as u64);
    }
    if !limits.is_empty() {
        let mut lcfg = cfg;
        for (name, target, value) in limits {
            if matches!(target, Some((_, Field::BurstLength))) && value as u64 > u32::MAX as u64 {
                return Err(Error::invalid(format!(
                    "{name} value must be in the range [0, {}]",
                    u32::MAX
                )));
            }
            set_field(&mut lcfg, target, value as u64);
        }
        lcfg.validate()?;
        cfg = lcfg;
    }
    let mut all = groups();
    if all.contains_key(&id) {
        return Err(Error::invalid(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    cfg.validate()?;
    all.insert(id, Arc::new(ThrottleGroup::new(cfg)));
    Ok(())
}

/// The `throttle` driver class.
pub struct ThrottleClass;

struct ThrottleDriver {
    file: ChildCell,
    group: Arc<ThrottleGroup>,
}

#[async_trait]
impl Driver for ThrottleDriver {
    fn format_name(&self) -> &'static str {
        "throttle"
    }

    fn length(&self) -> u64 {
        self.file.get().length()
    }

    fn children(&self) -> Vec<Child> {
        vec![Child::new(ChildRole::File, &self.file.get())]
    }

    fn child_cell(&self, role: ChildRole) -> Option<&ChildCell> {
        (role == ChildRole::File).then_some(&self.file)
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: 1,
            ..self.file.get().limits()
        }
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn cluster_size(&self) -> Option<u64> {
        // A filter answers with its child's (QEMU: bdrv_co_get_info).
        self.file.get().driver().cluster_size()
    }

    fn subcluster_size(&self) -> Option<u64> {
        self.file.get().driver().subcluster_size()
    }

    fn growable(&self) -> bool {
        self.file.get().driver().growable()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.group.intercept(Dir::Read, buf.len() as u64).await;
        self.file.get().read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.group.intercept(Dir::Write, buf.len() as u64).await;
        self.file.get().write(offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.group.intercept(Dir::Write, len).await;
        self.file.get().write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.group.intercept(Dir::Write, len).await;
        self.file.get().discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.file.get().flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            raw: true,
            ..BlockStatus::data_at(len, self.file.get(), offset)
        })
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Preallocation) -> Result<()> {
        self.file.get().truncate(size, exact, prealloc).await
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.file.get().driver().allocated_size().await
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.file.get().set_perm(perm, shared)
    }

    async fn close(&self) -> Result<()> {
        self.file.get().close().await
    }
}

#[async_trait]
impl DriverClass for ThrottleClass {
    fn name(&self) -> &'static str {
        "throttle"
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &["throttle-group"]
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(
            "Driver 'throttle' does not support image creation",
        ))
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        let name = take_str(opts, "throttle-group")?
            .ok_or_else(|| Error::invalid("Please specify a throttle group"))?;
        let group = group(&name)
            .ok_or_else(|| Error::invalid(format!("Throttle group '{name}' does not exist")))?;
        Ok(Box::new(ThrottleDriver {
            file: ChildCell::new(file),
            group,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn object_errors() {
        let e = |p: &[(&str, &str)]| add_group_object(&props(p)).unwrap_err().to_string();
        assert_eq!(e(&[]), "Parameter 'id' is missing");
        assert_eq!(
            e(&[("id", "t1"), ("x-bps-total", "-1")]),
            "Property values cannot be negative"
        );
        assert_eq!(
            e(&[("id", "t1"), ("x-bps-total", "1"), ("x-bps-read", "1")]),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            e(&[("id", "t1"), ("limits.bps-total", "abc")]),
            "Parameter 'limits.bps-total' expects integer"
        );
        assert_eq!(
            e(&[("id", "t1"), ("foo", "1")]),
            "Parameter 'foo' is unexpected"
        );
        assert_eq!(
            e(&[("id", "t1"), ("x-iops-size", "10")]),
            "iops size requires an iops value to be set"
        );
        add_group_object(&props(&[("id", "dup"), ("x-bps-total", "10")])).unwrap();
        assert_eq!(
            e(&[("id", "dup")]),
            "attempt to add duplicate property 'dup' to object (type 'container')"
        );
    }

    #[test]
    fn bucket_waits_for_its_level_to_drain() {
        let mut st = State {
            cfg: ThrottleConfig::default(),
            previous_leak: Instant::now(),
        };
        st.cfg.buckets[Bucket::BpsTotal as usize].avg = 1000;
        assert_eq!(st.wait(Dir::Write), 0.0);
        st.account(Dir::Write, 1100);
        // 1100 in a bucket of 100: one second until it is back to 100.
        assert!((st.wait(Dir::Read) - 1.0).abs() < 1e-9);
        st.cfg.buckets[Bucket::BpsTotal as usize].leak(0.5);
        assert!((st.wait(Dir::Write) - 0.5).abs() < 1e-9);
    }
}
