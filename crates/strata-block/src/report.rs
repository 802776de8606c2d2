//! Messages to the user as QEMU's tools print them: `PROG: message`, PROG
//! being the basename of argv[0], so a symlink named `qemu-img` prints
//! exactly what qemu-img prints.

use std::sync::OnceLock;

static PROG: OnceLock<String> = OnceLock::new();

/// Sets the program name from argv[0]; call once at start-up.
pub fn set_prog_name(argv0: &str) {
    let base = argv0.rsplit('/').next().unwrap_or(argv0).to_string();
    let _ = PROG.set(base);
}

/// The program name, for messages.
pub fn prog_name() -> &'static str {
    PROG.get().map(String::as_str).unwrap_or("strata")
}

static STDOUT_HOOK: OnceLock<fn(std::fmt::Arguments<'_>)> = OnceLock::new();

/// Routes [`print_stdout`] through the tool's own stdout buffer, so block
/// layer messages (blkdebug's) land in order with the tool's output.
pub fn set_stdout_hook(hook: fn(std::fmt::Arguments<'_>)) {
    let _ = STDOUT_HOOK.set(hook);
}

/// Prints to standard output as the tool does (QEMU's printf from drivers).
pub fn print_stdout(args: std::fmt::Arguments<'_>) {
    match STDOUT_HOOK.get() {
        Some(hook) => hook(args),
        None => print!("{args}"),
    }
}

static FLUSH_HOOK: OnceLock<fn()> = OnceLock::new();

/// Sets how the tool's buffered standard output is written out before the
/// process ends from inside the block layer (see [`exit`]).
pub fn set_flush_hook(hook: fn()) {
    let _ = FLUSH_HOOK.set(hook);
}

/// Ends the process from the block layer as QEMU's drivers do with exit()
/// (blkverify, quorum's blkverify mode): standard output is flushed first,
/// as C's exit() flushes stdio.
pub fn exit(code: i32) -> ! {
    if let Some(hook) = FLUSH_HOOK.get() {
        hook();
    }
    std::process::exit(code)
}

/// Writes `args` and a newline to standard error in one write. Standard
/// error is unbuffered, so `eprintln!` makes a write per formatted piece:
/// hundreds for a check of a broken image, and lines that interleave with
/// another writer's. Use it through [`stderr_line!`](crate::stderr_line).
pub fn eprint_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut line = args.to_string();
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `eprintln!` in one write: see [`report::eprint_line`](crate::report::eprint_line).
#[macro_export]
macro_rules! stderr_line {
    ($($arg:tt)*) => {
        $crate::report::eprint_line(format_args!($($arg)*))
    };
}

/// Prints `PROG: msg` to stderr.
pub fn error_report(msg: impl std::fmt::Display) {
    eprint_line(format_args!("{}: {}", prog_name(), msg));
}

/// Prints `PROG: warning: msg` to stderr.
pub fn warn_report(msg: impl std::fmt::Display) {
    eprint_line(format_args!("{}: warning: {}", prog_name(), msg));
}

/// C's `%#x`: `0x1f`, but plain `0` for zero (Rust's `{:#x}` prints `0x0`).
pub fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
