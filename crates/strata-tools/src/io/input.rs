//! Where commands come from: the `-c` strings in order, or else stdin
//! line by line with the `<prog>> ` prompt printed (and flushed) before
//! each line, as qemu-io's command_loop does.

use super::commands::run_line;
use super::session::Session;
use crate::{out, stdout as out_buf};
use std::io::{BufRead, IsTerminal, Read};
use strata_block::report::prog_name;
use strata_block::EventLoop;

/// The longest line C's fgets hands over at once in qemu-io (its buffer
/// is 1024 bytes with the terminating NUL); longer lines arrive in pieces.
const MAX_LINE: usize = 1023;

/// Reads one line like fgets: up to and including '\n', at most
/// MAX_LINE bytes; None at end of input.
fn fetch_line(input: &mut impl BufRead) -> Option<String> {
    let mut line = Vec::new();
    let mut limited = input.take(MAX_LINE as u64);
    match limited.read_until(b'\n', &mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            // A C string ends at the first NUL byte.
            if let Some(nul) = line.iter().position(|&b| b == 0) {
                line.truncate(nul);
            }
            Some(String::from_utf8_lossy(&line).into_owned())
        }
    }
}

/// Runs every command; returns the last error (negative errno) or 0.
pub fn command_loop(el: &EventLoop, session: &mut Session, commands: &[String]) -> i32 {
    let mut last_error = 0;
    if !commands.is_empty() {
        for c in commands {
            if session.quit {
                break;
            }
            let ret = el.block_on(run_line(session, c));
            if ret < 0 {
                last_error = ret;
            }
        }
        return last_error;
    }
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let mut input = stdin.lock();
    while !session.quit {
        out!("{}> ", prog_name());
        out_buf::flush();
        let Some(line) = fetch_line(&mut input) else {
            if tty {
                // QEMU's readline ends the prompt line at end of input.
                out!("\n");
            }
            break;
        };
        let ret = el.block_on(run_line(session, &line));
        if ret < 0 {
            last_error = ret;
        }
    }
    last_error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_like_fgets() {
        let long = "x".repeat(1500);
        let text = format!("length\n\nread 0 1\0junk\n{long}\nlast");
        let mut input = std::io::Cursor::new(text.into_bytes());
        assert_eq!(fetch_line(&mut input).as_deref(), Some("length"));
        assert_eq!(fetch_line(&mut input).as_deref(), Some(""));
        assert_eq!(fetch_line(&mut input).as_deref(), Some("read 0 1"));
        assert_eq!(fetch_line(&mut input).map(|l| l.len()), Some(1023));
        assert_eq!(fetch_line(&mut input).map(|l| l.len()), Some(477));
        assert_eq!(fetch_line(&mut input).as_deref(), Some("last"));
        assert_eq!(fetch_line(&mut input), None);
    }
}
