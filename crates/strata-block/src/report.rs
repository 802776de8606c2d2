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

/// Prints `PROG: msg` to stderr.
pub fn error_report(msg: impl std::fmt::Display) {
    eprintln!("{}: {}", prog_name(), msg);
}

/// Prints `PROG: warning: msg` to stderr.
pub fn warn_report(msg: impl std::fmt::Display) {
    eprintln!("{}: warning: {}", prog_name(), msg);
}

/// C's `%#x`: `0x1f`, but plain `0` for zero (Rust's `{:#x}` prints `0x0`).
pub fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
