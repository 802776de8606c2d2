//! `quorum`: a node over several copies of one disk (`children.0`,
//! `children.1`, …) that writes to all and believes a read only when enough
//! copies agree (QEMU: block/quorum.c).
//!
//! Reads (`read-pattern=quorum`) go to every child; the versions they return
//! are counted, and the one with the most votes wins if it has at least
//! `vote-threshold`; otherwise the read fails with EIO. With
//! `rewrite-corrupted=on` children that returned another version get the
//! winner written back. `read-pattern=fifo` reads the first child that
//! succeeds. Writes, zero writes and flushes succeed when at least
//! `vote-threshold` children succeed; otherwise the most common error wins.
//! `blkverify=on` (two children, threshold 2) ends the process on any
//! difference, as the blkverify driver does.

use async_trait::async_trait;
use futures::future::join_all;
use serde_json::Value;
use std::sync::Arc;
use strata_block::options::{take_bool, take_str};
use strata_block::{
    BlockStatus, Child, ChildRole, Driver, DriverClass, Error, IoBuf, Limits, Node, OpenCtx, Opts,
    Perm, Result, WriteFlags,
};

/// The `quorum` driver class.
pub struct QuorumClass;

struct QuorumDriver {
    children: Vec<Arc<Node>>,
    threshold: usize,
    fifo: bool,
    blkverify: bool,
    rewrite_corrupted: bool,
}

/// The value with the most votes (QEMU: quorum_get_vote_winner). Versions
/// are listed newest first, and the first with a strictly larger count
/// wins, so of equal counts the version seen last wins, as in QEMU.
/// Returns the index (into `keys`) of a voter of the winning version, and
/// the winner's count.
fn vote_winner<T: PartialEq>(keys: &[T]) -> Option<(usize, usize)> {
    // (first voter, count) per version, in order of first appearance.
    let mut versions: Vec<(usize, usize)> = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match versions.iter_mut().find(|(first, _)| keys[*first] == *k) {
            Some(v) => v.1 += 1,
            None => versions.push((i, 1)),
        }
    }
    let mut winner = None;
    let mut max = 0;
    for &(first, count) in versions.iter().rev() {
        if count > max {
            max = count;
            winner = Some((first, count));
        }
    }
    winner
}

impl QuorumDriver {
    /// The error most children failed with (QEMU: quorum_vote_error).
    fn vote_error<T>(results: &[Result<T>]) -> Error {
        let codes: Vec<i32> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.code()))
            .collect();
        match vote_winner(&codes) {
            Some((i, _)) => Error::errno(codes[i]),
            None => Error::errno(libc::EIO),
        }
    }

    /// Fails unless at least the threshold of children succeeded.
    fn check_successes<T>(&self, results: &[Result<T>]) -> Result<()> {
        let ok = results.iter().filter(|r| r.is_ok()).count();
        if ok < self.threshold {
            return Err(Self::vote_error(results));
        }
        Ok(())
    }

    async fn read_fifo(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len();
        let mut buf = Some(buf);
        let mut last = Error::errno(libc::EIO);
        for child in &self.children {
            // A failed read consumed the buffer; the next child gets a new one.
            let b = buf.take().unwrap_or_else(|| IoBuf::zeroed(len));
            match child.read(offset, b).await {
                Ok(b) => return Ok(b),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn read_quorum(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len();
        let results = join_all(
            self.children
                .iter()
                .map(|c| c.read(offset, IoBuf::zeroed(len))),
        )
        .await;
        self.check_successes(&results)?;
        let bufs: Vec<Option<&IoBuf>> = results.iter().map(|r| r.as_ref().ok()).collect();
        let ok: Vec<(usize, &IoBuf)> = bufs
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b)))
            .collect();
        let first = ok[0].1;
        let mut agree = true;
        for &(_, other) in &ok[1..] {
            if self.blkverify {
                if let Some(i) = first
                    .as_slice()
                    .iter()
                    .zip(other.as_slice())
                    .position(|(a, b)| a != b)
                {
                    strata_block::stderr_line!(
                        "quorum: offset={offset} bytes={len} contents mismatch at offset {}",
                        offset + i as u64
                    );
                    strata_block::report::exit(1);
                }
            } else if first.as_slice() != other.as_slice() {
                agree = false;
                break;
            }
        }
        if agree {
            buf.as_mut_slice().copy_from_slice(first.as_slice());
            return Ok(buf);
        }
        let contents: Vec<&[u8]> = ok.iter().map(|(_, b)| b.as_slice()).collect();
        let Some((w, count)) = vote_winner(&contents) else {
            return Err(Error::errno(libc::EIO));
        };
        if count < self.threshold {
            return Err(Error::errno(libc::EIO));
        }
        let winner = contents[w];
        buf.as_mut_slice().copy_from_slice(winner);
        if self.rewrite_corrupted {
            // A correction attempt only: its errors are ignored.
            let bad: Vec<usize> = ok
                .iter()
                .filter(|(_, b)| b.as_slice() != winner)
                .map(|(i, _)| *i)
                .collect();
            join_all(bad.iter().map(|&i| {
                self.children[i].write(offset, IoBuf::from_slice(winner), WriteFlags::default())
            }))
            .await;
        }
        Ok(buf)
    }
}

#[async_trait]
impl Driver for QuorumDriver {
    fn has_info(&self) -> bool {
        // QEMU's quorum answers no get_info: no dirty flag in its info.
        false
    }

    fn reopen_supported(&self) -> bool {
        false
    }

    fn format_name(&self) -> &'static str {
        "quorum"
    }

    fn length(&self) -> u64 {
        self.children[0].length()
    }

    fn children(&self) -> Vec<Child> {
        // Newest first, as QEMU lists a node's children.
        self.children
            .iter()
            .enumerate()
            .rev()
            .map(|(i, c)| Child::new(ChildRole::Quorum(i as u32), c))
            .collect()
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        // What the children use, added up (QEMU's default for nodes with
        // several storage children).
        let mut sum = None;
        for c in &self.children {
            if let Some(n) = c.driver().allocated_size().await? {
                sum = Some(sum.unwrap_or(0) + n);
            }
        }
        Ok(sum)
    }

    fn limits(&self) -> Limits {
        let mut l = Limits::default();
        for c in &self.children {
            let cl = c.limits();
            l.memory_alignment = l.memory_alignment.max(cl.memory_alignment);
            if cl.max_transfer != 0 && (l.max_transfer == 0 || cl.max_transfer < l.max_transfer) {
                l.max_transfer = cl.max_transfer;
            }
        }
        l
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        if self.fifo {
            self.read_fifo(offset, buf).await
        } else {
            self.read_quorum(offset, buf).await
        }
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let results = join_all(
            self.children
                .iter()
                .map(|c| c.write(offset, IoBuf::from_slice(buf.as_slice()), flags)),
        )
        .await;
        self.check_successes(&results)?;
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let results = join_all(
            self.children
                .iter()
                .map(|c| c.write_zeroes(offset, len, flags)),
        )
        .await;
        self.check_successes(&results)
    }

    async fn flush(&self) -> Result<()> {
        let mut results = Vec::new();
        for c in &self.children {
            results.push(c.flush().await);
        }
        self.check_successes(&results)
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        // Zero only where every child reads as zero.
        let mut pnum_zero = len;
        let mut pnum_data = 0;
        for c in &self.children {
            match c.block_status_above(None, offset, len).await {
                Err(_) => {
                    pnum_data = len;
                    break;
                }
                Ok((st, _)) if st.zero => pnum_zero = pnum_zero.min(st.len),
                Ok((st, _)) => pnum_data = pnum_data.max(st.len),
            }
        }
        if pnum_data != 0 {
            Ok(BlockStatus::data(pnum_data))
        } else {
            Ok(BlockStatus::zero(pnum_zero))
        }
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        // Children may not be written or resized by others, or they would differ.
        let mut perm = perm;
        if self.rewrite_corrupted {
            perm = perm.with(Perm::WRITE);
        }
        let shared = Perm(shared.0 & (Perm::CONSISTENT_READ.0 | Perm::WRITE_UNCHANGED.0));
        for c in &self.children {
            c.set_perm(perm, shared)?;
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let mut r = Ok(());
        for c in &self.children {
            let e = c.close().await;
            if r.is_ok() {
                r = e;
            }
        }
        r
    }
}

/// The number of children `children.0` … `children.N-1` (QEMU:
/// qdict_array_entries): every key must be an index below the count.
fn children_entries(children: &Opts) -> Result<usize> {
    let mut n = 0;
    while children.contains_key(&n.to_string()) {
        n += 1;
    }
    if children.len() != n {
        return Err(Error::invalid("Option children is not a valid array"));
    }
    Ok(n)
}

/// Parses a QEMU_OPT_NUMBER as qemu_strtou64 does, negative values wrapping.
fn parse_number(key: &str, v: &str) -> Result<u64> {
    let bad = || Error::invalid(format!("Parameter '{key}' expects a number"));
    let (neg, digits) = match v.trim_start().strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v.trim_start()),
    };
    let n = if let Some(h) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(h, 16).map_err(|_| bad())?
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8).map_err(|_| bad())?
    } else {
        digits.parse::<u64>().map_err(|_| bad())?
    };
    Ok(if neg { n.wrapping_neg() } else { n })
}

#[async_trait]
impl DriverClass for QuorumClass {
    fn name(&self) -> &'static str {
        "quorum"
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &[
            "vote-threshold",
            "blkverify",
            "rewrite-corrupted",
            "read-pattern",
        ]
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(
            "Driver 'quorum' does not support image creation",
        ))
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let mut children = match opts.remove("children") {
            None | Some(Value::Null) => Opts::new(),
            Some(Value::Object(m)) => m,
            Some(Value::Array(a)) => a
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            Some(_) => return Err(Error::invalid("Option children is not a valid array")),
        };
        let n = children_entries(&children)?;
        if n < 1 {
            return Err(Error::invalid(
                "Number of provided children must be 1 or more",
            ));
        }
        let threshold = match take_str(opts, "vote-threshold")? {
            None => 0,
            Some(v) => parse_number("vote-threshold", &v)? as i32,
        };
        let blkverify_opt = take_bool(opts, "blkverify")?;
        let rewrite = take_bool(opts, "rewrite-corrupted")?;
        let pattern = take_str(opts, "read-pattern")?;
        if threshold < 1 {
            return Err(Error::invalid(
                "Parameter 'vote-threshold' expects a value >= 1",
            ));
        }
        let threshold = threshold as usize;
        if threshold > n {
            return Err(Error::invalid("threshold may not exceed children count"));
        }
        let fifo = match pattern.as_deref() {
            None | Some("quorum") => false,
            Some("fifo") => true,
            Some(_) => return Err(Error::invalid("Please set read-pattern as fifo or quorum")),
        };
        let (mut blkverify, mut rewrite_corrupted) = (false, false);
        if !fifo {
            blkverify = blkverify_opt.unwrap_or(false);
            if blkverify && (n != 2 || threshold != 2) {
                return Err(Error::invalid(
                    "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
                ));
            }
            rewrite_corrupted = rewrite.unwrap_or(false);
            if rewrite_corrupted && blkverify {
                return Err(Error::invalid(
                    "rewrite-corrupted=on cannot be used with blkverify=on",
                ));
            }
        }
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let key = format!("children.{i}");
            let mut one = Opts::new();
            if let Some(v) = children.remove(&i.to_string()) {
                one.insert(key.clone(), v);
            }
            let node = ctx
                .open_child(&mut one, &key, None, ChildRole::Quorum(i as u32), false)
                .await?
                .ok_or_else(|| {
                    Error::invalid(format!("A block device must be specified for \"{key}\""))
                })?;
            nodes.push(node);
        }
        // All children must have one length (QEMU: quorum_co_getlength).
        if nodes.iter().any(|c| c.length() != nodes[0].length()) {
            return Err(Error::errno(libc::EIO).context("Could not refresh total sector count"));
        }
        Ok(Box::new(QuorumDriver {
            children: nodes,
            threshold,
            fifo,
            blkverify,
            rewrite_corrupted,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn winner_of_a_tie_is_the_version_seen_last() {
        assert_eq!(vote_winner(&[1, 2, 1]), Some((0, 2)));
        assert_eq!(vote_winner(&[1, 2]), Some((1, 1)));
        assert_eq!(vote_winner(&[1, 2, 2, 1]), Some((1, 2)));
        assert_eq!(vote_winner::<i32>(&[]), None);
    }
}
