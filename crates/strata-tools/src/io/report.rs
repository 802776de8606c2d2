//! What a data command prints when it is done: the `read N/N bytes at
//! offset O` line with its statistics line (or `-C`'s one parsable line),
//! and `-v`'s hex dump.

use crate::common::cvtstr;
use crate::{out, outln};
use std::time::Duration;

/// QEMU's timestr: `00.57 sec` under a second of whole seconds, else
/// `h:mm:ss.ss`; `verbose` (for -C) always uses the long form.
fn timestr(t: Duration, verbose: bool) -> String {
    let secs = t.as_secs();
    let frac = t.subsec_nanos() as f64 / 1e9;
    if verbose || secs != 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs % 3600) / 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{frac:05.2} sec")
    }
}

/// value per second of `t`; a zero duration is one nanosecond, so a rate
/// is never NaN (which the iotests' filter would not accept).
fn per_sec(value: f64, t: Duration) -> f64 {
    let secs = t.as_secs_f64().max(1e-9);
    value / secs
}

/// Prints the result of one request (QEMU: print_report).
pub fn print_report(
    op: &str,
    t: Duration,
    offset: i64,
    count: i64,
    total: i64,
    cnt: i32,
    machine: bool,
) {
    let ts = timestr(t, machine);
    if machine {
        outln!(
            "{total},{cnt},{ts},{:.3},{:.3}",
            per_sec(total as f64, t),
            per_sec(cnt as f64, t)
        );
        return;
    }
    outln!("{op} {total}/{count} bytes at offset {offset}");
    outln!(
        "{}, {cnt} ops; {ts} ({}/sec and {:.4} ops/sec)",
        cvtstr(total as f64),
        cvtstr(per_sec(total as f64, t)),
        per_sec(cnt as f64, t)
    );
}

/// `-v`: 16 bytes a line, offsets absolute, letters and digits shown as
/// themselves and everything else as '.'; a short last line is not padded.
pub fn dump_buffer(data: &[u8], offset: i64) {
    for (i, line) in data.chunks(16).enumerate() {
        out!("{:08x}:  ", offset as u64 + (i as u64) * 16);
        for b in line {
            out!("{b:02x} ");
        }
        out!(" ");
        let text: String = line
            .iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        outln!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(timestr(Duration::from_millis(570), false), "00.57 sec");
        assert_eq!(timestr(Duration::from_millis(538_440), false), "0:08:58.44");
        assert_eq!(timestr(Duration::from_millis(10), true), "0:00:00.01");
    }

    #[test]
    fn small_values_cut_at_the_first_zeros() {
        assert_eq!(cvtstr(42.0), "42 bytes");
        assert_eq!(cvtstr(366.523637), "366.523637 bytes");
        assert_eq!(cvtstr(100.0004), "100 bytes");
        assert_eq!(cvtstr(2560.0), "2.500 KiB");
    }
}
