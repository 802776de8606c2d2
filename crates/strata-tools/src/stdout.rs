//! Standard output buffered as C's stdio buffers it: by line on a terminal,
//! in blocks otherwise. QEMU's tools print errors unbuffered to stderr, so in
//! a pipe (as in QEMU's iotests, which merge both) errors come out before the
//! normal output they follow in the program; matching that needs the same buffering.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};

/// glibc's buffer size for pipes and files.
const BLOCK: usize = 4096;

struct Out {
    buf: Vec<u8>,
    line_buffered: bool,
}

fn out() -> &'static Mutex<Out> {
    static OUT: OnceLock<Mutex<Out>> = OnceLock::new();
    OUT.get_or_init(|| {
        Mutex::new(Out {
            buf: Vec::with_capacity(BLOCK),
            line_buffered: std::io::stdout().is_terminal(),
        })
    })
}

/// Appends formatted text to standard output's buffer.
pub fn write_fmt(args: std::fmt::Arguments) {
    let mut o = out().lock().unwrap_or_else(|p| p.into_inner());
    let _ = o.buf.write_fmt(args);
    let flush_now = if o.line_buffered {
        o.buf.contains(&b'\n')
    } else {
        o.buf.len() >= BLOCK
    };
    if flush_now {
        let data = std::mem::take(&mut o.buf);
        let mut so = std::io::stdout().lock();
        let _ = so.write_all(&data);
        let _ = so.flush();
    }
}

/// Writes out what is buffered (at exit, and before waiting for input).
pub fn flush() {
    let mut o = out().lock().unwrap_or_else(|p| p.into_inner());
    let data = std::mem::take(&mut o.buf);
    let mut so = std::io::stdout().lock();
    let _ = so.write_all(&data);
    let _ = so.flush();
}

/// `print!` through the stdio-like buffer.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdout::write_fmt(format_args!($($arg)*)) };
}

/// `println!` through the stdio-like buffer.
#[macro_export]
macro_rules! outln {
    () => { $crate::stdout::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::stdout::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}
