//! Helpers for the drivers' integration tests: opening and creating images
//! through the registry, and finding QEMU's tools.

#![allow(dead_code)]

use std::process::Command;
use std::sync::Arc;
use strata_block::options::Opts;
use strata_block::{Node, OpenCtx, OpenFlags};

/// The path of a QEMU tool, or None where it is missing: then a test says it
/// was skipped, unless it runs under CI, where a missing tool is a failure.
pub fn qemu_tool(name: &str) -> Option<String> {
    let path = format!("/usr/bin/{name}");
    if std::path::Path::new(&path).exists() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{name} is required under CI but was not found");
    }
    eprintln!("skipped: {name} not found");
    None
}

/// Runs a command, returning (exit code, stdout + stderr).
pub fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("failed to run command");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Creates an image through Strata's drivers.
pub async fn create(path: &str, fmt: &str, opts: &[(&str, &str)]) {
    let reg = strata_drivers::registry();
    let ctx = OpenCtx::new(Arc::clone(&reg), OpenFlags::default());
    let mut o = Opts::new();
    for (k, v) in opts {
        o.insert(k.to_string(), v.to_string().into());
    }
    reg.format(fmt)
        .unwrap()
        .create(&ctx, path, o)
        .await
        .unwrap();
}

/// Opens an image read-write through Strata's drivers.
pub async fn open(path: &str, fmt: Option<&str>) -> Arc<Node> {
    let reg = strata_drivers::registry();
    let ctx = OpenCtx::new(
        reg,
        OpenFlags {
            aio: strata_block::engine::Aio::Threads,
            ..OpenFlags::default()
        },
    );
    ctx.open_image(Some(path), fmt, Opts::new()).await.unwrap()
}
