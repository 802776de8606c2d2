//! What the job race tests share: qcow2 images made and opened by
//! options, a check of what a disk holds, and a wait for a condition
//! (a breakpoint hit, a job gone).
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;
use strata_block::options::{nest, Opts};
use strata_block::{Backend, IoBuf, Node, OpenCtx, OpenFlags};

pub const MIB: u64 = 1 << 20;

/// Creates a qcow2 image at `path` with these create options.
pub async fn create(path: &str, opts: &[(&str, &str)]) {
    let reg = strata_drivers::registry();
    let ctx = OpenCtx::new(Arc::clone(&reg), OpenFlags::default());
    let mut o = Opts::new();
    for (k, v) in opts {
        o.insert(k.to_string(), v.to_string().into());
    }
    reg.format("qcow2")
        .unwrap()
        .create(&ctx, path, o)
        .await
        .unwrap();
}

/// Opens a node from dotted options.
pub async fn open(ctx: &OpenCtx, opts: &[(&str, &str)]) -> Arc<Node> {
    let pairs: Vec<(String, String)> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let o: Opts = nest(&pairs).unwrap();
    ctx.open_image(None, None, o).await.unwrap()
}

/// Asserts that `len` bytes at `off` all hold `byte`.
pub async fn holds(b: &Backend, off: u64, len: usize, byte: u8) {
    let got = b.read(off, IoBuf::zeroed(len)).await.unwrap();
    let bad = got.as_slice().iter().position(|&x| x != byte);
    assert!(
        bad.is_none(),
        "at {off}+{bad:?}: {:#x}, not {byte:#x}",
        got.as_slice()[bad.unwrap_or(0)]
    );
}

/// A job list that keeps its events, each as `EVENT {data}`.
pub fn recording_list() -> (Arc<strata_jobs::JobList>, Arc<Mutex<Vec<String>>>) {
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::clone(&events);
    let list = strata_jobs::JobList::new(Arc::new(move |e: &str, d: serde_json::Value| {
        seen.lock().unwrap().push(format!("{e} {d}"));
    }));
    (list, events)
}

/// Waits until a request of `node` stops at the blkdebug breakpoint `tag`.
pub async fn until_suspended(what: &str, node: &Arc<Node>, tag: &str) {
    until(what, || {
        node.with_debug_hooks(|h| Ok(h.is_suspended(tag))).unwrap()
    })
    .await;
}

/// Polls until `cond` holds (a breakpoint is hit, a job is gone).
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The raw disks of a backup race, in `ctx`: the source `src` (over
/// blkdebug, so a test can hold its reads) and the target `tgt`.
pub async fn source_and_target(ctx: &OpenCtx, src: &str, tgt: &str) -> (Arc<Node>, Arc<Node>) {
    let source = open(
        ctx,
        &[
            ("driver", "raw"),
            ("node-name", "src"),
            ("file.driver", "blkdebug"),
            ("file.image.driver", "file"),
            ("file.image.filename", src),
        ],
    )
    .await;
    let target = open(
        ctx,
        &[
            ("driver", "raw"),
            ("node-name", "tgt"),
            ("file.driver", "file"),
            ("file.filename", tgt),
        ],
    )
    .await;
    (source, target)
}
