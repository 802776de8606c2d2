//! How a node names itself (QEMU: bdrv_refresh_filename). A node opened
//! from a plain file name keeps it; a node whose options matter beyond its
//! file name (blkdebug rules, a raw offset, quorum) is named `json:{...}`
//! with the options that would open it again, as QEMU prints them. Parents
//! build their names from their children's, and work them out again when
//! the graph changes under them (a snapshot's overlay goes from
//! `json:{"backing": null, ...}` to its file name once it has its backing
//! file).

use crate::driver::{ChildRole, Driver, DriverClass};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::options::Opts;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};

/// Option keys that hold children, never part of a node's own options.
const CHILD_KEYS: &[&str] = &[
    "file",
    "backing",
    "image",
    "test",
    "raw",
    "data-file",
    "children",
    "header",
    "log",
];

/// What a node is called, and what its parents need to name themselves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identity {
    /// A plain name that opens the same node again, or empty.
    pub exact: String,
    /// The options that open the same node again (QEMU: full_open_options).
    pub full: Opts,
    /// The node's driver is a protocol (its plain name can stand for a
    /// format above it).
    pub protocol: bool,
}

impl Identity {
    /// The name to show: the plain one, else `json:` and the options.
    pub fn filename(&self) -> String {
        if self.exact.is_empty() {
            format!(
                "json:{}",
                crate::qjson::to_compact_string(&Value::Object(self.full.clone()))
            )
        } else {
            self.exact.clone()
        }
    }
}

/// Keys in [`CHILD_KEYS`] that are plain options of one driver: rbd's
/// `image` is the image's name, not a child.
const NOT_CHILDREN: &[(&str, &str)] = &[("rbd", "image")];

/// A node's own options, flattened to dotted keys (`set-state.0.event`),
/// without its children's; `driver` is the node's driver, when known
/// apart from `opts`.
pub fn own_options(opts: &Opts, driver: Option<&str>) -> Opts {
    let driver = driver.or_else(|| opts.get("driver").and_then(Value::as_str));
    let mut out = Map::new();
    for (k, v) in opts {
        let plain = NOT_CHILDREN.contains(&(driver.unwrap_or_default(), k.as_str()));
        if CHILD_KEYS.contains(&k.as_str()) && !plain {
            continue;
        }
        flatten_into(&mut out, k, v);
    }
    out
}

fn flatten_into(out: &mut Opts, key: &str, v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten_into(out, &format!("{key}.{k}"), v);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten_into(out, &format!("{key}.{i}"), v);
            }
        }
        v => {
            out.insert(key.to_string(), v.clone());
        }
    }
}

/// Where a node's backing file came from, for telling whether the user
/// overrode the one its image names (QEMU: auto_backing_file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingSource {
    /// Opened from the image's own header, with no options.
    Implicit,
    /// Named by reference or options, or suppressed (`backing: null`).
    Explicit,
    /// The user reads no data (qemu-img info): the backing file changes
    /// nothing, so it never counts as overridden.
    NoIo,
}

/// How a node works its name out again whenever its children change (QEMU
/// refreshes names at every query: bdrv_refresh_filename).
pub enum Naming {
    /// As it was opened.
    Opened {
        class: Arc<dyn DriverClass>,
        /// Its own options as given (see [`own_options`]); a reopen
        /// replaces them (QEMU: bs->options).
        own: Mutex<Opts>,
        /// The file name it was opened by.
        exact: String,
        /// The backing file name the image would open by itself, which a
        /// backing file of another name overrides (QEMU:
        /// auto_backing_file); None when no data is read, so that nothing
        /// counts as overridden.
        auto_backing: Mutex<Option<String>>,
    },
    /// A job's filter, named as the node below it (QEMU:
    /// bdrv_mirror_top_refresh_filename).
    AsChild,
}

impl Naming {
    /// The naming of a node just opened by `class` with `own` options from
    /// the file name `exact`; `backing` says how its backing file came.
    pub fn opened(
        class: Arc<dyn DriverClass>,
        driver: &dyn Driver,
        own: Opts,
        exact: &str,
        backing: BackingSource,
    ) -> Naming {
        let header = driver.backing_file().map(|(n, _)| n).unwrap_or_default();
        let child = driver
            .children()
            .into_iter()
            .find(|c| c.role == ChildRole::Backing);
        let auto_backing = match (backing, child) {
            (BackingSource::NoIo, _) => None,
            // The image's own backing file, by the name it opened under.
            (BackingSource::Implicit, Some(c)) => Some(c.node.filename()),
            _ => Some(header),
        };
        Naming::Opened {
            class,
            own: Mutex::new(own),
            exact: exact.to_string(),
            auto_backing: Mutex::new(auto_backing),
        }
    }

    /// Records the backing file name the image stores now (QEMU:
    /// bdrv_change_backing_file sets auto_backing_file).
    pub fn set_auto_backing(&self, name: &str) {
        if let Naming::Opened { auto_backing, .. } = self {
            let mut a = auto_backing.lock().unwrap_or_else(|p| p.into_inner());
            if a.is_some() {
                *a = Some(name.to_string());
            }
        }
    }

    /// The node's own options (see [`own_options`]); None for a job's
    /// filter, which has none.
    pub fn own_options(&self) -> Option<Opts> {
        match self {
            Naming::Opened { own, .. } => {
                Some(own.lock().unwrap_or_else(|p| p.into_inner()).clone())
            }
            Naming::AsChild => None,
        }
    }

    /// Records the options a reopen gave the node.
    pub fn set_own_options(&self, opts: Opts) {
        if let Naming::Opened { own, .. } = self {
            *own.lock().unwrap_or_else(|p| p.into_inner()) = opts;
        }
    }

    /// The node's identity with the children its driver has now.
    pub fn identity(&self, driver: &dyn Driver) -> Identity {
        match self {
            Naming::Opened {
                class,
                own,
                exact,
                auto_backing,
            } => {
                let auto = auto_backing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let own = own.lock().unwrap_or_else(|p| p.into_inner());
                refresh(&**class, driver, &own, exact, auto.as_deref())
            }
            Naming::AsChild => Identity {
                exact: driver
                    .children()
                    .iter()
                    .find(|c| c.role.is_primary())
                    .map(|c| c.node.filename())
                    .unwrap_or_default(),
                ..Identity::default()
            },
        }
    }
}

/// True when the node's backing file is not the one its image would open
/// by itself (QEMU: bdrv_backing_overridden): a backing file of another
/// name than `auto`, or one suppressed.
fn backing_overridden(child: Option<&Arc<Node>>, auto: Option<&str>) -> bool {
    match (auto, child) {
        (None, _) => false,
        (Some(auto), Some(c)) => auto != c.filename(),
        (Some(auto), None) => !auto.is_empty(),
    }
}

/// Works out the identity of a node: `own` are its own options as given
/// (see [`own_options`]), `exact` the file name it was opened by, `auto`
/// the backing file name its image would open by itself.
fn refresh(
    class: &dyn DriverClass,
    driver: &dyn Driver,
    own: &Opts,
    exact: &str,
    auto: Option<&str>,
) -> Identity {
    let mut full = Map::new();
    for key in ["driver", "filename"] {
        if let Some(v) = own.get(key) {
            full.insert(key.to_string(), v.clone());
        }
    }
    let mut generate_json = false;
    for strong in class.strong_options() {
        for (k, v) in own {
            let hit = match strong.strip_suffix('.') {
                Some(prefix) => k.starts_with(prefix) && k[prefix.len()..].starts_with('.'),
                None => k == strong,
            };
            if hit {
                full.insert(k.clone(), v.clone());
                generate_json = true;
            }
        }
    }
    if !full.contains_key("driver") {
        full.insert("driver".into(), class.name().into());
    }
    let children = driver.children();
    let backing_child = children.iter().find(|c| c.role == ChildRole::Backing);
    let overridden = backing_overridden(backing_child.map(|c| &c.node), auto);
    generate_json |= overridden;
    let mut quorum = Vec::new();
    for c in &children {
        match c.role {
            // A backing file named by the image itself is not an option.
            ChildRole::Backing if !overridden => {}
            ChildRole::Quorum(i) => quorum.push((i, Value::Object(c.node.identity().full.clone()))),
            role => {
                full.insert(role.name(), Value::Object(c.node.identity().full.clone()));
            }
        }
    }
    if overridden && backing_child.is_none() {
        // Opening it again must not open the backing file the image names.
        full.insert("backing".into(), Value::Null);
    }
    if !quorum.is_empty() {
        quorum.sort_by_key(|(i, _)| *i);
        let list = quorum.into_iter().map(|(_, v)| v).collect();
        full.insert("children".into(), Value::Array(list));
    }
    let primary = children.iter().find(|c| c.role.is_primary());
    let named: Vec<(ChildRole, Identity)> = children
        .iter()
        .map(|c| (c.role, (*c.node.identity()).clone()))
        .collect();
    let exact = if let Some(custom) = class.exact_filename(&full, &named) {
        custom
    } else if let Some(p) = primary {
        let child = p.node.identity();
        if !child.exact.is_empty() && child.protocol && !driver.is_filter() && !generate_json {
            child.exact.clone()
        } else {
            String::new()
        }
    } else {
        exact.to_string()
    };
    Identity {
        exact,
        full,
        protocol: class.is_protocol(),
    }
}

impl Node {
    /// The directory relative names of this node's backing file are
    /// relative to (QEMU: bdrv_dirname), with its trailing `/`, or empty
    /// for the current directory.
    pub fn dirname(self: &Arc<Self>) -> Result<String> {
        let id = self.identity();
        if !self.driver().has_dirname() {
            return Err(Error::invalid(format!(
                "Cannot generate a base directory for {} nodes",
                self.driver().name_in_messages()
            )));
        }
        match self.primary_child() {
            Some(c) => c.dirname(),
            None if !id.exact.is_empty() => Ok(match id.exact.rfind('/') {
                Some(i) => id.exact[..=i].to_string(),
                None => String::new(),
            }),
            None => Err(Error::invalid(format!(
                "Cannot generate a base directory for {} nodes",
                self.format_name()
            ))),
        }
    }

    /// The backing file name `name` of this image made usable: relative
    /// names are taken relative to the image's directory.
    pub fn full_backing_filename(self: &Arc<Self>, name: &str) -> Result<String> {
        if name.starts_with('/') || crate::open::has_protocol(name) {
            return Ok(name.to_string());
        }
        Ok(format!("{}{name}", self.dirname()?))
    }
}
