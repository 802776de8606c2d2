//! The seed's redundancy choice (sheepdog's `redundancy` create option) on
//! Ceph: `x` keeps x full copies of an image's data, `x:y` cuts it into x
//! data and y parity strips. Ceph decides redundancy per pool, so the
//! image's header stays in the pool its name gives and its data goes to a
//! data pool of that kind: one the cluster already has, else one made
//! here when this client may, else an error that says how to make it.
//! Nothing is made unless the cluster has x (or x + y) failure domains.

use crate::conn::Pool;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt;
use strata_block::{Error, Result};

/// How an image's data is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redundancy {
    /// Full copies: a replicated pool of this size.
    Copies(u64),
    /// Erasure coding: an erasure-coded pool with k = data, m = parity.
    Erasure { data: u64, parity: u64 },
}

impl fmt::Display for Redundancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Redundancy::Copies(n) => write!(f, "{n}"),
            Redundancy::Erasure { data, parity } => write!(f, "{data}:{parity}"),
        }
    }
}

impl Redundancy {
    /// Parses `x` or `x:y` (sheepdog's syntax).
    pub fn parse(s: &str) -> Result<Redundancy> {
        let bad = |why: &str| Error::invalid(format!("Invalid redundancy mode: '{s}'{why}"));
        let num = |t: &str| t.parse::<u64>().ok().filter(|n| (1..=256).contains(n));
        match s.split_once(':') {
            None => num(s).map(Redundancy::Copies).ok_or_else(|| bad("")),
            Some((d, p)) => match (num(d), num(p)) {
                // Ceph's erasure codes need two data strips at least.
                (Some(1), Some(_)) => Err(bad(" (erasure coding needs at least 2 data strips)")),
                (Some(data), Some(parity)) => Ok(Redundancy::Erasure { data, parity }),
                _ => Err(bad("")),
            },
        }
    }

    /// Failure domains the data is spread over.
    fn domains(&self) -> u64 {
        match *self {
            Redundancy::Copies(n) => n,
            Redundancy::Erasure { data, parity } => data + parity,
        }
    }

    /// The name of the pool (and erasure code profile) Strata makes.
    fn pool_name(&self) -> String {
        match self {
            Redundancy::Copies(n) => format!("strata-copies-{n}"),
            Redundancy::Erasure { data, parity } => format!("strata-ec-{data}-{parity}"),
        }
    }
}

/// A pool as `osd pool ls detail` gives it.
struct PoolInfo {
    name: String,
    /// Type 1 is replicated, 3 erasure-coded.
    erasure: bool,
    size: u64,
    profile: String,
    overwrites: bool,
    crush_rule: u64,
}

fn mon(pool: &Pool, cmd: Value) -> Result<Value> {
    let out = pool
        .mon_command(&cmd)
        .map_err(|(errno, why)| Error::msg(errno, format!("{}: {why}", cmd["prefix"])))?;
    serde_json::from_str(&out).map_err(|_| {
        Error::msg(
            libc::EPROTO,
            format!("{}: unexpected answer from the monitor", cmd["prefix"]),
        )
    })
}

fn pools(pool: &Pool) -> Result<Vec<PoolInfo>> {
    let v = mon(
        pool,
        json!({"prefix": "osd pool ls", "detail": "detail", "format": "json"}),
    )?;
    let u = |p: &Value, k: &str| p[k].as_u64().unwrap_or(0);
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|p| PoolInfo {
            name: p["pool_name"].as_str().unwrap_or_default().to_string(),
            erasure: u(p, "type") == 3,
            size: u(p, "size"),
            profile: p["erasure_code_profile"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            overwrites: p["flags_names"]
                .as_str()
                .is_some_and(|f| f.split(',').any(|f| f == "ec_overwrites")),
            crush_rule: u(p, "crush_rule"),
        })
        .collect())
}

/// An erasure code profile's k and m.
fn profile_km(pool: &Pool, name: &str) -> Option<(u64, u64)> {
    let v = mon(
        pool,
        json!({"prefix": "osd erasure-code-profile get", "name": name, "format": "json"}),
    )
    .ok()?;
    let n = |k: &str| v[k].as_str()?.parse::<u64>().ok();
    Some((n("k")?, n("m")?))
}

/// The redundancy of the pool named `name`; None if it cannot be told.
pub fn of_pool(pool: &Pool, name: &str) -> Option<Redundancy> {
    let list = pools(pool).ok()?;
    let p = list.iter().find(|p| p.name == name)?;
    if p.erasure {
        let (data, parity) = profile_km(pool, &p.profile)?;
        Some(Redundancy::Erasure { data, parity })
    } else {
        Some(Redundancy::Copies(p.size))
    }
}

/// Where a crush rule spreads data: its root, the failure domain's type,
/// the rule's name and how many failure domains the cluster has.
struct Domains {
    root: String,
    kind: String,
    rule: String,
    count: u64,
}

fn failure_domains(pool: &Pool, rule_id: u64) -> Result<Domains> {
    let rules = mon(
        pool,
        json!({"prefix": "osd crush rule dump", "format": "json"}),
    )?;
    let rule = rules
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["rule_id"].as_u64() == Some(rule_id))
        .ok_or_else(|| Error::msg(libc::ENOENT, format!("crush rule {rule_id} not found")))?;
    let steps = rule["steps"].as_array().cloned().unwrap_or_default();
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let root = steps
        .iter()
        .find(|s| s["op"] == "take")
        .map_or_else(|| "default".to_string(), |s| text(&s["item_name"]));
    let kind = steps
        .iter()
        .find(|s| s["op"].as_str().is_some_and(|op| op.starts_with("choose")))
        .map_or_else(|| "osd".to_string(), |s| text(&s["type"]));
    let tree = mon(pool, json!({"prefix": "osd tree", "format": "json"}))?;
    let count = tree["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["type"] == kind.as_str() && n["exists"].as_u64() != Some(0))
        .count() as u64;
    Ok(Domains {
        root,
        kind,
        rule: text(&rule["rule_name"]),
        count,
    })
}

/// The data pool for an image whose header goes to `meta`: None when
/// `meta` itself keeps data as asked.
pub fn data_pool(pool: &Pool, meta: &str, want: Redundancy) -> Result<Option<String>> {
    let list = pools(pool)?;
    let Some(home) = list.iter().find(|p| p.name == meta) else {
        return Err(Error::msg(libc::ENOENT, format!("pool {meta} not found")));
    };
    let domains = failure_domains(pool, home.crush_rule)?;
    if want.domains() > domains.count {
        return Err(Error::invalid(format!(
            "Redundancy {want} needs {} failure domains ({} in crush root {}), \
             but the cluster has {}",
            want.domains(),
            domains.kind,
            domains.root,
            domains.count
        )));
    }
    let mut profiles: HashMap<String, Option<(u64, u64)>> = HashMap::new();
    let mut fits = |p: &PoolInfo| match want {
        Redundancy::Copies(n) => !p.erasure && p.size == n,
        Redundancy::Erasure { data, parity } => {
            p.erasure
                && p.overwrites
                && *profiles
                    .entry(p.profile.clone())
                    .or_insert_with(|| profile_km(pool, &p.profile))
                    == Some((data, parity))
        }
    };
    if fits(home) {
        return Ok(None);
    }
    let mut candidates = list.iter().filter(|p| p.name != meta);
    if let Some(p) = candidates.find(|p| fits(p)) {
        return Ok(Some(p.name.clone()));
    }
    let name = want.pool_name();
    if list.iter().any(|p| p.name == name) {
        return Err(Error::msg(
            libc::EEXIST,
            format!("Pool {name} exists, but does not keep data with redundancy {want}"),
        ));
    }
    make_pool(pool, &name, want, &domains)?;
    Ok(Some(name))
}

/// Makes the data pool, or says how an administrator can.
fn make_pool(pool: &Pool, name: &str, want: Redundancy, d: &Domains) -> Result<()> {
    let (steps, how): (Vec<Value>, Vec<String>) = match want {
        Redundancy::Copies(n) => (
            vec![
                json!({"prefix": "osd pool create", "pool": name, "pool_type": "replicated",
                       "rule": d.rule, "size": n}),
            ],
            vec![format!(
                "ceph osd pool create {name} replicated {} --size {n}",
                d.rule
            )],
        ),
        Redundancy::Erasure { data, parity } => (
            vec![
                json!({"prefix": "osd erasure-code-profile set", "name": name,
                       "profile": [format!("k={data}"), format!("m={parity}"),
                                   format!("crush-failure-domain={}", d.kind),
                                   format!("crush-root={}", d.root)]}),
                json!({"prefix": "osd pool create", "pool": name, "pool_type": "erasure",
                       "erasure_code_profile": name}),
                json!({"prefix": "osd pool set", "pool": name, "var": "allow_ec_overwrites",
                       "val": "true"}),
            ],
            vec![
                format!(
                    "ceph osd erasure-code-profile set {name} k={data} m={parity} \
                     crush-failure-domain={} crush-root={}",
                    d.kind, d.root
                ),
                format!("ceph osd pool create {name} erasure {name}"),
                format!("ceph osd pool set {name} allow_ec_overwrites true"),
            ],
        ),
    };
    let steps = steps
        .into_iter()
        .chain([json!({"prefix": "osd pool application enable", "pool": name, "app": "rbd"})]);
    let how = how
        .into_iter()
        .chain([format!("ceph osd pool application enable {name} rbd")])
        .collect::<Vec<_>>()
        .join(" && ");
    let mut made = false;
    for step in steps {
        let is_create = step["prefix"] == "osd pool create";
        if let Err((errno, why)) = pool.mon_command(&step) {
            if made {
                // Nothing half-made stays behind (if the cluster lets us).
                let _ = pool.mon_command(&json!({"prefix": "osd pool delete", "pool": name,
                    "pool2": name, "yes_i_really_really_mean_it": true}));
            }
            return Err(Error::msg(
                errno,
                format!(
                    "Could not create pool {name} for redundancy {want}: {why}; \
                     an administrator can create it with: {how}"
                ),
            ));
        }
        made |= is_create;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seeds_syntax() {
        assert_eq!(Redundancy::parse("3").unwrap(), Redundancy::Copies(3));
        assert_eq!(
            Redundancy::parse("4:2").unwrap(),
            Redundancy::Erasure { data: 4, parity: 2 }
        );
        for bad in ["", "0", "x", "2:", ":1", "2:0", "2:1:1", "-1", "1000"] {
            let e = Redundancy::parse(bad).unwrap_err().to_string();
            assert_eq!(e, format!("Invalid redundancy mode: '{bad}'"), "{bad}");
        }
        let e = Redundancy::parse("1:1").unwrap_err().to_string();
        assert!(e.contains("at least 2 data strips"), "{e}");
        assert_eq!(Redundancy::parse("2:1").unwrap().to_string(), "2:1");
        assert_eq!(
            Redundancy::parse("2:1").unwrap().pool_name(),
            "strata-ec-2-1"
        );
    }
}
