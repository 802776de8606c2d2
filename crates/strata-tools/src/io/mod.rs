//! `strata-io`, the drop-in for qemu-io: opens one image and runs I/O
//! commands on it from `-c` strings or stdin, printing exactly what
//! qemu-io prints, so scripts and QEMU's iotests cannot tell the two apart.

mod args;
mod commands;
mod input;
pub(crate) mod numbers;
mod report;
mod session;

use session::Session;
pub(crate) use session::{open_node_in, OpenRequest};
use strata_block::report::error_report;
use strata_block::EventLoop;

/// Entry point of `strata-io`; returns the exit code.
pub fn main() -> i32 {
    let registry = crate::common::init();
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let code = run(registry, &argv);
    crate::stdout::flush();
    code
}

/// Runs strata-io on `argv` (argv[0] first) with `registry`; returns the exit code.
pub fn run(registry: std::sync::Arc<strata_block::Registry>, argv: &[String]) -> i32 {
    let args = match args::parse(argv) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let el = match EventLoop::new() {
        Ok(el) => el,
        Err(e) => {
            error_report(format!("cannot start the event loop: {e}"));
            return 1;
        }
    };
    let mut session = Session::new(registry, args.image_opts);
    if let Some(image) = &args.image {
        let mut req = args.open.clone();
        if args.image_opts {
            match crate::common::image_opts(image) {
                Ok(o) => req.opts = o,
                Err(e) => {
                    error_report(&e);
                    return 1;
                }
            }
        } else {
            req.name = Some(image.clone());
        }
        if el.block_on(session.open(req)).is_err() {
            return 1;
        }
    }
    let ret = input::command_loop(&el, &mut session, &args.commands);
    // Closing waits for the aio requests still running, then writes back caches.
    el.block_on(session.close());
    if ret < 0 {
        1
    } else {
        0
    }
}
