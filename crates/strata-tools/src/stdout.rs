//! Standard output buffered the way C's stdio buffers it, because the
//! order of qemu-io's stdout and stderr in one merged stream depends on it:
//! fully buffered (in blocks) when stdout is not a terminal, line buffered
//! when it is; stderr is never buffered. With `-c` commands, an error on
//! stderr therefore shows up before every report line still in the buffer.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

/// glibc's buffer size for pipes and ordinary files (st_blksize).
const BLOCK: usize = 4096;

struct Buffer {
    data: Vec<u8>,
    /// None until the first write decides (isatty is asked once).
    tty: Option<bool>,
}

static STDOUT: Mutex<Buffer> = Mutex::new(Buffer {
    data: Vec::new(),
    tty: None,
});

fn write_through(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    // A closed pipe is not our problem (qemu-io ignores SIGPIPE and EPIPE too).
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// Appends formatted text to the buffer, writing out what stdio would.
pub fn write_fmt(args: std::fmt::Arguments<'_>) {
    let Ok(mut b) = STDOUT.lock() else { return };
    let text = args.to_string();
    b.data.extend_from_slice(text.as_bytes());
    let tty = *b.tty.get_or_insert_with(|| std::io::stdout().is_terminal());
    if tty {
        if text.contains('\n') {
            write_through(&b.data);
            b.data.clear();
        }
    } else if b.data.len() >= BLOCK {
        let n = b.data.len() / BLOCK * BLOCK;
        write_through(&b.data[..n]);
        b.data.drain(..n);
    }
}

/// fflush(stdout).
pub fn flush() {
    let Ok(mut b) = STDOUT.lock() else { return };
    if !b.data.is_empty() {
        write_through(&b.data);
        b.data.clear();
    }
}

/// printf to the buffered stdout.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::stdout::write_fmt(format_args!($($t)*)) };
}

/// printf with a newline to the buffered stdout.
#[macro_export]
macro_rules! outln {
    () => { $crate::stdout::write_fmt(format_args!("\n")) };
    ($($t:tt)*) => {{
        $crate::stdout::write_fmt(format_args!($($t)*));
        $crate::stdout::write_fmt(format_args!("\n"));
    }};
}
