//! `qemu-img snapshot`: list (-l), create (-c), apply (-a) and delete (-d)
//! the internal snapshots of an image.

use super::{getopt, long, opt, usage_error, Ctx};
use crate::common;
use strata_block::driver::SnapshotInfo;
use strata_block::report::error_report;
use strata_block::{snapshot, OpenFlags};

// The long forms take their argument, as the help says (qemu-img 10.0.2
// declares them without one and crashes on `--create FILE`).
const OPTS: &[super::Opt] = &[
    opt('l', Some("list"), false),
    opt('a', Some("apply"), true),
    opt('c', Some("create"), true),
    opt('d', Some("delete"), true),
    opt('h', Some("help"), false),
    opt('q', Some("quiet"), false),
    opt('U', Some("force-share"), false),
    long("object", true),
    long("image-opts", false),
    opt('f', Some("format"), true),
];

#[derive(Clone, Copy, PartialEq)]
enum Action {
    List,
    Apply,
    Create,
    Delete,
}

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("snapshot", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let (mut action, mut name) = (None, String::new());
    let (mut force_share, mut image_opts, mut fmt) = (false, false, None);
    for (i, v) in p.opts {
        let a = match i {
            0 => Some(Action::List),
            1 => Some(Action::Apply),
            2 => Some(Action::Create),
            3 => Some(Action::Delete),
            4 => {
                crate::outln!(
                    "Usage: {} snapshot [--object OBJDEF] [--image-opts] [-U] [-q] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE",
                    common::argv0()
                );
                return 0;
            }
            // -q: qemu-img snapshot prints nothing to quieten.
            5 => None,
            6 => {
                force_share = true;
                None
            }
            8 => {
                image_opts = true;
                None
            }
            9 => {
                fmt = v.clone();
                None
            }
            _ => None,
        };
        if let Some(a) = a {
            if action.is_some() {
                return usage_error("snapshot", "Cannot mix '-l', '-a', '-c', '-d'");
            }
            action = Some(a);
            name = v.unwrap_or_default();
        }
    }
    if p.operands.len() != 1 {
        return usage_error("snapshot", "Expecting one image file name");
    }
    let flags = OpenFlags {
        // Listing needs no write access; everything else changes the image.
        read_only: action == Some(Action::List),
        force_share,
        ..OpenFlags::default()
    };
    let node = match ctx.open(&p.operands[0], fmt.as_deref(), image_opts, flags, 1) {
        Ok(n) => n,
        Err(code) => return code,
    };
    let ok = ctx.ev.block_on(async {
        let ok = match action {
            // No action lists, as qemu-img does.
            Some(Action::List) | None => {
                let snaps = snapshot::list(&node).await.unwrap_or_default();
                if !snaps.is_empty() {
                    let list: Vec<_> = snaps
                        .iter()
                        .map(strata_block::info::snapshot_json)
                        .collect();
                    let mut out = String::new();
                    super::info::snapshot_list(&list, "", &mut out);
                    crate::out!("{out}");
                }
                true
            }
            Some(Action::Create) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                // qemu-img records microseconds (g_get_real_time).
                let sn = SnapshotInfo {
                    id: String::new(),
                    name: name.clone(),
                    vm_state_size: 0,
                    date_sec: now.as_secs(),
                    date_nsec: now.subsec_micros() as u64 * 1000,
                    vm_clock_nsec: 0,
                    icount: Some(0),
                };
                snapshot::create(&node, &sn)
                    .await
                    .map_err(|e| {
                        error_report(format!(
                            "Could not create snapshot '{name}': {}",
                            strata_block::error::strerror(e.code())
                        ))
                    })
                    .is_ok()
            }
            Some(Action::Apply) => snapshot::goto(&node, &name)
                .await
                .map_err(|e| error_report(format!("Could not apply snapshot '{name}': {e}")))
                .is_ok(),
            Some(Action::Delete) => match snapshot::find(&node, &name).await {
                Ok(Some(sn)) => snapshot::delete(&node, Some(&sn.id), Some(&sn.name))
                    .await
                    .map_err(|e| error_report(format!("Could not delete snapshot '{name}': {e}")))
                    .is_ok(),
                _ => {
                    error_report(format!(
                        "Could not delete snapshot '{name}': snapshot not found"
                    ));
                    false
                }
            },
        };
        let closed = node.close().await;
        if let Err(e) = &closed {
            error_report(e.to_string());
        }
        ok && closed.is_ok()
    });
    if ok {
        0
    } else {
        1
    }
}
