//! `blkdebug`: a filter that fails chosen requests and holds others, driven
//! by the debug events the format above announces ("the next I/O loads an
//! L2 table"). It is how tests prove that every error path of a format
//! leaves the image intact.
//!
//! Rules come from an ini file (`blkdebug:RULES:IMAGE`) or options
//! (`inject-error.0.event=l2_load`). An event arms the inject-error rules
//! that match it and the current state; the next request of a matching kind
//! fails with the rule's errno. Set-state rules move the state machine;
//! breakpoints suspend the request that reaches an event until `resume`.

use super::rules::{self, IoType, Rule, RuleAction, RuleSpec};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use strata_block::debug::DebugHooks;
use strata_block::options::{take_size, take_str};
use strata_block::ChildCell;
use strata_block::{
    BlockStatus, Child, ChildRole, DebugEvent, Driver, DriverClass, Error, IoBuf, Limits, OpenCtx,
    Opts, Perm, Result, WriteFlags,
};
use tokio::sync::oneshot;

/// The `blkdebug` driver class.
pub struct BlkdebugClass;

struct State {
    /// The state machine's state; rules with state 0 match any.
    state: i64,
    /// Rules per event, newest first (QEMU inserts at the head).
    rules: HashMap<DebugEvent, Vec<Rule>>,
    /// The armed inject-error rules, in the order they were defined.
    active: Vec<Rule>,
    /// Suspended requests, newest first.
    suspended: Vec<(String, oneshot::Sender<()>)>,
    /// Writes seen, and writes covered by the last successful flush: a flush
    /// with nothing new to flush does not reach the rules (as in QEMU's
    /// generic layer, whose flush skips clean nodes).
    write_gen: u64,
    flushed_gen: u64,
}

struct BlkdebugDriver {
    image: ChildCell,
    state: Mutex<State>,
    limits: Limits,
}

impl BlkdebugDriver {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails the request when an armed rule matches it (QEMU: rule_check).
    async fn rule_check(&self, offset: u64, bytes: u64, io: IoType) -> Result<()> {
        let (errno, immediately) = {
            let mut st = self.lock();
            let hit = st.active.iter().position(|r| match &r.action {
                RuleAction::Inject(i) => {
                    i.iotypes & io.bit() != 0
                        && i.offset
                            .is_none_or(|o| bytes != 0 && offset <= o && o < offset + bytes)
                }
                _ => false,
            });
            let Some(i) = hit else { return Ok(()) };
            let rule = st.active[i].clone();
            let RuleAction::Inject(inj) = &rule.action else {
                return Ok(());
            };
            if inj.errno == 0 {
                return Ok(());
            }
            if inj.once {
                st.active.remove(i);
                if let Some(list) = st.rules.get_mut(&rule.event) {
                    list.retain(|r| r.id != rule.id);
                }
            }
            (inj.errno, inj.immediately)
        };
        if !immediately {
            // The error comes back from a later turn of the event loop.
            tokio::task::yield_now().await;
        }
        Err(Error::errno(errno))
    }

    fn wrote(&self) {
        self.lock().write_gen += 1;
    }
}

#[async_trait]
impl Driver for BlkdebugDriver {
    fn format_name(&self) -> &'static str {
        "blkdebug"
    }

    fn length(&self) -> u64 {
        self.image.get().length()
    }

    fn children(&self) -> Vec<Child> {
        vec![Child::new(ChildRole::Image, &self.image.get())]
    }

    fn child_cell(&self, role: ChildRole) -> Option<&ChildCell> {
        (role == ChildRole::Image).then_some(&self.image)
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn growable(&self) -> bool {
        self.image.get().driver().growable()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.rule_check(offset, buf.len() as u64, IoType::Read)
            .await?;
        self.image.get().read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let r = match self
            .rule_check(offset, buf.len() as u64, IoType::Write)
            .await
        {
            Ok(()) => self.image.get().write(offset, buf, flags).await,
            Err(e) => Err(e),
        };
        self.wrote();
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let align = (self.limits.request_alignment as u64)
            .max(self.limits.write_zeroes_alignment as u64)
            .max(1);
        if len < align {
            // Too small for the image's zero writes: the core writes zeroes.
            return Err(Error::errno(libc::ENOTSUP));
        }
        let r = match self.rule_check(offset, len, IoType::WriteZeroes).await {
            Ok(()) => self.image.get().write_zeroes(offset, len, flags).await,
            Err(e) => Err(e),
        };
        self.wrote();
        r
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if len < self.limits.request_alignment.max(1) as u64 {
            return Err(Error::errno(libc::ENOTSUP));
        }
        let r = match self.rule_check(offset, len, IoType::Discard).await {
            Ok(()) => self.image.get().discard(offset, len).await,
            Err(e) => Err(e),
        };
        self.wrote();
        r
    }

    async fn flush(&self) -> Result<()> {
        let gen = {
            let st = self.lock();
            if st.write_gen == st.flushed_gen {
                return Ok(());
            }
            st.write_gen
        };
        self.rule_check(0, 0, IoType::Flush).await?;
        self.image.get().flush().await?;
        let mut st = self.lock();
        st.flushed_gen = st.flushed_gen.max(gen);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.rule_check(offset, len, IoType::BlockStatus).await?;
        Ok(BlockStatus {
            raw: true,
            ..BlockStatus::data_at(len, self.image.get(), offset)
        })
    }

    async fn truncate(
        &self,
        size: u64,
        exact: bool,
        prealloc: strata_block::Preallocation,
    ) -> Result<()> {
        self.image.get().truncate(size, exact, prealloc).await
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.image.get().set_perm(perm, shared)
    }

    async fn debug_event(&self, event: DebugEvent) {
        let mut waits = Vec::new();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            let now = st.state;
            let mut new_state = now;
            let mut armed = false;
            let rules = st.rules.get(&event).cloned().unwrap_or_default();
            for rule in rules {
                if rule.state != 0 && rule.state != now {
                    continue;
                }
                match &rule.action {
                    RuleAction::Inject(_) => {
                        // The first matching rule replaces the armed set.
                        if !armed {
                            st.active.clear();
                            armed = true;
                        }
                        st.active.insert(0, rule.clone());
                    }
                    RuleAction::SetState(n) => new_state = *n,
                    RuleAction::Suspend(tag) => {
                        // A breakpoint fires once.
                        if let Some(list) = st.rules.get_mut(&event) {
                            list.retain(|r| r.id != rule.id);
                        }
                        let (tx, rx) = oneshot::channel();
                        st.suspended.insert(0, (tag.clone(), tx));
                        strata_block::report::print_stdout(format_args!(
                            "blkdebug: Suspended request '{tag}'\n"
                        ));
                        waits.push(rx);
                    }
                }
            }
            st.state = new_state;
        }
        for rx in waits {
            // A dropped sender (the node closed) resumes too.
            let _ = rx.await;
        }
    }

    fn debug_hooks(&self) -> Option<&dyn DebugHooks> {
        Some(self)
    }

    async fn close(&self) -> Result<()> {
        // Held requests go on so the close can drain them.
        for (_, tx) in std::mem::take(&mut self.lock().suspended) {
            let _ = tx.send(());
        }
        self.image.get().close().await
    }
}

impl DebugHooks for BlkdebugDriver {
    fn breakpoint(&self, event: &str, tag: &str) -> Result<()> {
        let ev = DebugEvent::from_name(event).ok_or_else(|| Error::errno(libc::ENOENT))?;
        let rule = Rule::new(ev, 0, RuleAction::Suspend(tag.to_string()));
        self.lock().rules.entry(ev).or_default().insert(0, rule);
        Ok(())
    }

    fn remove_breakpoint(&self, tag: &str) -> Result<()> {
        let mut found = false;
        {
            let mut st = self.lock();
            for list in st.rules.values_mut() {
                let before = list.len();
                list.retain(|r| !matches!(&r.action, RuleAction::Suspend(t) if t == tag));
                found |= list.len() != before;
            }
        }
        while self.resume(tag).is_ok() {
            found = true;
        }
        if found {
            Ok(())
        } else {
            Err(Error::errno(libc::ENOENT))
        }
    }

    fn resume(&self, tag: &str) -> Result<()> {
        let tx = {
            let mut st = self.lock();
            let i = st
                .suspended
                .iter()
                .position(|(t, _)| t == tag)
                .ok_or_else(|| Error::errno(libc::ENOENT))?;
            st.suspended.remove(i).1
        };
        strata_block::report::print_stdout(format_args!("blkdebug: Resuming request '{tag}'\n"));
        let _ = tx.send(());
        Ok(())
    }

    fn is_suspended(&self, tag: &str) -> bool {
        self.lock().suspended.iter().any(|(t, _)| t == tag)
    }
}

/// Checks one limit option against the alignment (QEMU's words).
fn check_limit(name: &str, value: u64, multiple_of: u64) -> Result<()> {
    if value != 0 && (value >= i32::MAX as u64 || !value.is_multiple_of(multiple_of.max(1))) {
        return Err(Error::invalid(format!(
            "Cannot meet constraints with {name} {value}"
        )));
    }
    Ok(())
}

#[async_trait]
impl DriverClass for BlkdebugClass {
    fn name(&self) -> &'static str {
        "blkdebug"
    }

    fn protocol_name(&self) -> Option<&'static str> {
        Some("blkdebug")
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &[
            "config",
            "inject-error.",
            "set-state.",
            "align",
            "max-transfer",
            "opt-write-zero",
            "max-write-zero",
            "opt-discard",
            "max-discard",
        ]
    }

    fn exact_filename(
        &self,
        full: &Opts,
        children: &[(ChildRole, strata_block::filename::Identity)],
    ) -> Option<String> {
        // `blkdebug:RULES:IMAGE` when nothing but the rules file is set.
        let image = children
            .iter()
            .find(|(r, _)| *r == ChildRole::Image)
            .map(|(_, c)| c.exact.as_str())
            .unwrap_or("");
        let plain = full
            .keys()
            .all(|k| matches!(k.as_str(), "config" | "image" | "x-image" | "driver"));
        Some(if plain && !image.is_empty() {
            let config = full.get("config").and_then(|v| v.as_str()).unwrap_or("");
            format!("blkdebug:{config}:{image}")
        } else {
            String::new()
        })
    }

    fn parse_filename(&self, filename: &str, opts: &mut Opts) -> Result<()> {
        let Some(rest) = filename.strip_prefix("blkdebug:") else {
            opts.insert("x-image".into(), filename.into());
            return Ok(());
        };
        let (config, image) = rest
            .split_once(':')
            .ok_or_else(|| Error::invalid("blkdebug requires both config file and image path"))?;
        if !config.is_empty() {
            opts.insert("config".into(), config.into());
        }
        opts.insert("x-image".into(), image.into());
        Ok(())
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(
            "Driver 'blkdebug' does not support image creation",
        ))
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let config = take_str(opts, "config")?;
        let image_name = take_str(opts, "x-image")?;
        let align = take_size(opts, "align")?.unwrap_or(0);
        let max_transfer = take_size(opts, "max-transfer")?.unwrap_or(0);
        let opt_write_zero = take_size(opts, "opt-write-zero")?.unwrap_or(0);
        let max_write_zero = take_size(opts, "max-write-zero")?.unwrap_or(0);
        let opt_discard = take_size(opts, "opt-discard")?.unwrap_or(0);
        let max_discard = take_size(opts, "max-discard")?.unwrap_or(0);
        let _ = opts.remove("take-child-perms");
        let _ = opts.remove("unshare-child-perms");

        let mut specs: Vec<RuleSpec> = Vec::new();
        if let Some(path) = &config {
            specs.extend(rules::read_config(path)?);
        }
        specs.extend(rules::from_options(opts)?);
        let mut rules_by_event: HashMap<DebugEvent, Vec<Rule>> = HashMap::new();
        // Inject-error rules first, then set-state ones, each at the head.
        for spec in specs
            .iter()
            .filter(|s| s.is_inject())
            .chain(specs.iter().filter(|s| !s.is_inject()))
        {
            let rule = spec.to_rule()?;
            rules_by_event
                .entry(rule.event)
                .or_default()
                .insert(0, rule);
        }

        let image = ctx
            .open_child(
                opts,
                "image",
                image_name.as_deref(),
                ChildRole::Image,
                false,
            )
            .await?
            .ok_or_else(|| Error::invalid("A block device must be specified for \"image\""))?;

        let child = image.limits();
        if align != 0 && (align >= i32::MAX as u64 || !align.is_power_of_two()) {
            return Err(Error::invalid(format!(
                "Cannot meet constraints with align {align}"
            )));
        }
        let align_eff = align.max(child.request_alignment as u64).max(1);
        check_limit("max-transfer", max_transfer, align_eff)?;
        check_limit("opt-write-zero", opt_write_zero, align_eff)?;
        check_limit(
            "max-write-zero",
            max_write_zero,
            opt_write_zero.max(align_eff),
        )?;
        check_limit("opt-discard", opt_discard, align_eff)?;
        check_limit("max-discard", max_discard, opt_discard.max(align_eff))?;
        let limits = Limits {
            request_alignment: if align != 0 { align as u32 } else { 1 },
            memory_alignment: child.memory_alignment,
            max_transfer: if max_transfer != 0 {
                max_transfer
            } else {
                child.max_transfer
            },
            discard_alignment: if opt_discard != 0 {
                opt_discard as u32
            } else {
                child.discard_alignment
            },
            max_discard,
            write_zeroes_alignment: opt_write_zero as u32,
            max_write_zeroes: max_write_zero,
        };
        let drv = BlkdebugDriver {
            image: ChildCell::new(image),
            state: Mutex::new(State {
                state: 1,
                rules: rules_by_event,
                active: Vec::new(),
                suspended: Vec::new(),
                write_gen: 0,
                flushed_gen: 0,
            }),
            limits,
        };
        drv.debug_event(DebugEvent::None).await;
        Ok(Box::new(drv))
    }
}
