//! blkdebug's rules: read from its ini-style rules file or from options,
//! and checked with QEMU's words for what is wrong.

use serde_json::Value;
use strata_block::{DebugEvent, Error, Opts, Result};

/// The kinds of I/O an inject-error rule can fail (QAPI BlkdebugIOType).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl IoType {
    const NAMES: [&'static str; 6] = [
        "read",
        "write",
        "write-zeroes",
        "discard",
        "flush",
        "block-status",
    ];
    /// The bit of this type in a rule's mask.
    pub fn bit(self) -> u8 {
        1 << self as u8
    }
    /// Every type but block-status: a rule without `iotype` fails these.
    const DEFAULT_MASK: u8 = 0b01_1111;
}

/// An inject-error rule's action.
#[derive(Clone, Debug)]
pub struct Inject {
    pub errno: i32,
    pub once: bool,
    pub immediately: bool,
    /// Fails only requests covering this byte (`sector` × 512).
    pub offset: Option<u64>,
    pub iotypes: u8,
}

/// What a rule does when its event fires in its state.
#[derive(Clone, Debug)]
pub enum RuleAction {
    /// Arms an error for the next matching request.
    Inject(Inject),
    /// Moves the state machine to this state.
    SetState(i64),
    /// Holds the request until `resume TAG` (a breakpoint).
    Suspend(String),
}

/// One rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub id: u64,
    pub event: DebugEvent,
    /// The state in which the rule applies; 0 for any.
    pub state: i64,
    pub action: RuleAction,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Rule {
    /// A rule with a fresh identity (removal of `once` rules goes by it).
    pub fn new(event: DebugEvent, state: i64, action: RuleAction) -> Rule {
        Rule {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            event,
            state,
            action,
        }
    }
}

/// A rule as written, before its values are checked.
#[derive(Clone, Debug)]
pub struct RuleSpec {
    group: &'static str,
    keys: Vec<(String, String)>,
}

const INJECT_KEYS: &[&str] = &[
    "event",
    "state",
    "iotype",
    "errno",
    "sector",
    "once",
    "immediately",
];
const SET_STATE_KEYS: &[&str] = &["event", "state", "new_state"];

fn group_keys(group: &str) -> Option<(&'static str, &'static [&'static str])> {
    match group {
        "inject-error" => Some(("inject-error", INJECT_KEYS)),
        "set-state" => Some(("set-state", SET_STATE_KEYS)),
        _ => None,
    }
}

impl RuleSpec {
    /// True for inject-error rules.
    pub fn is_inject(&self) -> bool {
        self.group == "inject-error"
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.keys
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn number(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_number(v)
                .ok_or_else(|| Error::invalid(format!("Parameter '{key}' expects a number"))),
        }
    }

    fn boolean(&self, key: &str) -> Result<bool> {
        match self.get(key) {
            None => Ok(false),
            Some("on" | "yes" | "true" | "y") => Ok(true),
            Some("off" | "no" | "false" | "n") => Ok(false),
            Some(_) => Err(Error::invalid(format!(
                "Parameter '{key}' expects 'on' or 'off'"
            ))),
        }
    }

    /// Checks the values and makes the rule (QEMU: add_rule).
    pub fn to_rule(&self) -> Result<Rule> {
        let event = self
            .get("event")
            .ok_or_else(|| Error::invalid("Missing event name for rule"))?;
        let event = DebugEvent::from_name(event)
            .ok_or_else(|| Error::invalid(format!("invalid parameter value: {event}")))?;
        let state = self.number("state", 0)?;
        let action = if self.is_inject() {
            let iotypes = match self.get("iotype") {
                None => IoType::DEFAULT_MASK,
                Some(t) => {
                    let i = IoType::NAMES
                        .iter()
                        .position(|n| *n == t)
                        .ok_or_else(|| Error::invalid(format!("invalid parameter value: {t}")))?;
                    1 << i
                }
            };
            let sector = self.number("sector", -1)?;
            RuleAction::Inject(Inject {
                errno: self.number("errno", libc::EIO as i64)? as i32,
                once: self.boolean("once")?,
                immediately: self.boolean("immediately")?,
                offset: (sector >= 0).then(|| (sector as u64).saturating_mul(512)),
                iotypes,
            })
        } else {
            RuleAction::SetState(self.number("new_state", 0)?)
        };
        Ok(Rule::new(event, state, action))
    }
}

/// QEMU's number options: decimal, or hex with 0x, optionally negative.
fn parse_number(v: &str) -> Option<i64> {
    let (neg, digits) = match v.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(h) => i64::from_str_radix(h, 16).ok()?,
        None => digits.parse::<i64>().ok()?,
    };
    Some(if neg { -n } else { n })
}

/// Reads a rules file: `[inject-error]` / `[set-state]` sections of
/// `key = "value"` lines; `#` starts a comment line.
pub fn read_config(path: &str) -> Result<Vec<RuleSpec>> {
    let text = std::fs::read(path).map_err(|e| {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        Error::msg(
            errno,
            format!(
                "Could not read blkdebug config file: {}",
                strata_block::error::strerror(errno)
            ),
        )
    })?;
    let text = String::from_utf8_lossy(&text);
    let mut out: Vec<RuleSpec> = Vec::new();
    let mut current: Option<RuleSpec> = None;
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .split(|c: char| c == ']' || c.is_whitespace())
                .next()
                .unwrap_or("");
            if let Some(done) = current.take() {
                out.push(done);
            }
            let (group, _) = group_keys(name)
                .ok_or_else(|| Error::invalid(format!("There is no option group '{name}'")))?;
            current = Some(RuleSpec {
                group,
                keys: Vec::new(),
            });
            continue;
        }
        let (key, value) = parse_assignment(line).ok_or_else(|| Error::invalid("parse error"))?;
        let spec = current
            .as_mut()
            .ok_or_else(|| Error::invalid("no group defined"))?;
        let (_, allowed) = group_keys(spec.group).unwrap_or(("", &[]));
        if !allowed.contains(&key.as_str()) {
            return Err(Error::invalid(format!("Invalid parameter '{key}'")));
        }
        spec.keys.push((key, value));
    }
    out.extend(current);
    Ok(out)
}

/// ` key = "value"`, spaces optional around `=` (QEMU's sscanf pattern).
fn parse_assignment(line: &str) -> Option<(String, String)> {
    let line = line.trim_start();
    let key_end = line.find(char::is_whitespace).unwrap_or(line.len());
    let (key, rest) = line.split_at(key_end);
    let (key, rest) = match key.split_once('=') {
        // `key="v"` has no space: sscanf's %s takes it all and fails.
        Some(_) => return None,
        None => (key, rest),
    };
    let rest = rest.trim_start().strip_prefix('=')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find('"')?;
    if key.is_empty() || key.len() > 63 {
        return None;
    }
    Some((key.to_string(), rest[..end].to_string()))
}

/// Rules given as options: `inject-error.event=...` (one rule),
/// `inject-error.0.event=...` (a list), or JSON arrays.
pub fn from_options(opts: &mut Opts) -> Result<Vec<RuleSpec>> {
    let mut out = Vec::new();
    for group in ["inject-error", "set-state"] {
        let Some(v) = opts.remove(group) else {
            continue;
        };
        let (group, allowed) = group_keys(group).unwrap_or(("", &[]));
        let items: Vec<Value> = match v {
            Value::Array(a) => a,
            Value::Object(m) if m.keys().all(|k| k.parse::<usize>().is_ok()) => {
                let mut items = Vec::new();
                for i in 0..m.len() {
                    match m.get(&i.to_string()) {
                        Some(v) => items.push(v.clone()),
                        None => {
                            let k = m.keys().next().cloned().unwrap_or_default();
                            return Err(Error::invalid(format!(
                                "Unused option '{k}' for [{group}]"
                            )));
                        }
                    }
                }
                items
            }
            obj @ Value::Object(_) => vec![obj],
            _ => {
                return Err(Error::invalid(format!(
                    "Invalid parameter type for '{group}', expected: array"
                )))
            }
        };
        for (i, item) in items.into_iter().enumerate() {
            let Value::Object(m) = item else {
                return Err(Error::invalid(format!(
                    "[{group}] section (index {i}) does not consist of keys"
                )));
            };
            let mut keys = Vec::new();
            for (k, v) in m {
                if !allowed.contains(&k.as_str()) {
                    return Err(Error::invalid(format!(
                        "[{group}] section doesn't support the option '{k}'"
                    )));
                }
                let v = match v {
                    Value::String(s) => s,
                    Value::Bool(b) => if b { "on" } else { "off" }.to_string(),
                    other => other.to_string(),
                };
                keys.push((k, v));
            }
            out.push(RuleSpec { group, keys });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_as_qemu_scans_them() {
        assert_eq!(
            parse_assignment("once =\"on\""),
            Some(("once".into(), "on".into()))
        );
        assert_eq!(
            parse_assignment("  event = \"l2_load\""),
            Some(("event".into(), "l2_load".into()))
        );
        assert_eq!(parse_assignment("x = \"\""), Some(("x".into(), "".into())));
        assert_eq!(parse_assignment("once=\"on\""), None);
        assert_eq!(parse_assignment("once = on"), None);
    }

    #[test]
    fn rule_values() {
        let spec = RuleSpec {
            group: "inject-error",
            keys: vec![
                ("event".into(), "l1_update".into()),
                ("errno".into(), "28".into()),
                ("sector".into(), "0x10".into()),
            ],
        };
        let r = spec.to_rule().unwrap();
        let RuleAction::Inject(i) = r.action else {
            panic!("not an inject rule")
        };
        assert_eq!((i.errno, i.offset), (28, Some(0x10 * 512)));
        let bad = RuleSpec {
            group: "inject-error",
            keys: vec![("event".into(), "nope".into())],
        };
        assert_eq!(
            bad.to_rule().unwrap_err().to_string(),
            "invalid parameter value: nope"
        );
    }
}
