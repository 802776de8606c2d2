//! Numbers on qemu-io command lines: sizes as QEMU's qemu_strtosz reads
//! them (`4k`, `1.5M`, `0x200`, leading blanks allowed), pattern bytes and
//! milliseconds as C's strtol reads them, and the messages for bad ones.

use crate::outln;

/// Why a number was refused (QEMU returns -EINVAL or -ERANGE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumError {
    /// Not a number, or a bad suffix.
    Invalid,
    /// Negative, or too large.
    Range,
}

impl NumError {
    /// The negative errno qemu-io returns for it.
    pub fn errno(self) -> i32 {
        match self {
            NumError::Invalid => -libc::EINVAL,
            NumError::Range => -libc::ERANGE,
        }
    }
}

/// C's isspace in the C locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// strtoull(s, &end, base) for base 8, 10 or 16: the value (wrapped on a
/// leading '-' as C does), where parsing stopped, and whether it overflowed.
/// `None` when no digits were found.
fn strtoull(s: &[u8], base: u32) -> Option<(u64, usize, bool)> {
    let mut i = 0;
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    if base == 16
        && s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        i += 2;
    }
    let start = i;
    let mut val: u64 = 0;
    let mut overflow = false;
    while let Some(d) = s.get(i).and_then(|&c| (c as char).to_digit(base)) {
        match val
            .checked_mul(base as u64)
            .and_then(|v| v.checked_add(d as u64))
        {
            Some(v) => val = v,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return None;
    }
    if overflow {
        return Some((u64::MAX, i, true));
    }
    Some((if neg { val.wrapping_neg() } else { val }, i, false))
}

/// strtod over a text that has no exponent (QEMU cuts at 'e'/'E' first):
/// blanks, a sign, digits with one '.', as f64; where parsing stopped.
/// `Err(Invalid)` when nothing parses or the text names inf/nan.
fn strtod_fraction(s: &[u8]) -> Result<(f64, usize), NumError> {
    let mut i = 0;
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    let int_start = i;
    while i < s.len() && s[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &s[int_start..i];
    let mut frac_digits: &[u8] = &[];
    if s.get(i) == Some(&b'.') {
        let f = i + 1;
        let mut j = f;
        while j < s.len() && s[j].is_ascii_digit() {
            j += 1;
        }
        if !int_digits.is_empty() || j > f {
            frac_digits = &s[f..j];
            i = j;
        }
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        // inf, nan or no number at all: QEMU's strtod_finite refuses all three.
        return Err(NumError::Invalid);
    }
    let text = format!(
        "{}{}.{}0",
        if neg { "-" } else { "" },
        if int_digits.is_empty() {
            "0"
        } else {
            std::str::from_utf8(int_digits).unwrap_or("0")
        },
        std::str::from_utf8(frac_digits).unwrap_or("")
    );
    let v: f64 = text.parse().map_err(|_| NumError::Invalid)?;
    Ok((v, i))
}

/// The multiplier of a size suffix, binary units.
fn suffix_mul(c: Option<u8>) -> Option<u64> {
    Some(match c?.to_ascii_uppercase() {
        b'B' => 1,
        b'K' => 1 << 10,
        b'M' => 1 << 20,
        b'G' => 1 << 30,
        b'T' => 1 << 40,
        b'P' => 1 << 50,
        b'E' => 1 << 60,
        _ => return None,
    })
}

/// QEMU's qemu_strtosz with no end pointer: the whole text must be used.
pub fn strtosz(text: &str) -> Result<u64, NumError> {
    let s = text.as_bytes();
    let (mut val, mut end, mut err) = match strtoull(s, 10) {
        None => (0, 0, Some(NumError::Invalid)),
        Some((_, e, true)) => return finish(s, e, Err(NumError::Range)),
        Some((v, e, false)) => {
            // strtoull accepted a '-': QEMU refuses negative sizes outright.
            let first = s.iter().position(|&c| !is_space(c)).unwrap_or(0);
            if s.get(first) == Some(&b'-') {
                return finish(s, e, Err(NumError::Range));
            }
            (v, e, None)
        }
    };
    let mut valf: u64 = 0;
    if err.is_none() && val == 0 && matches!(s.get(end), Some(b'x' | b'X')) {
        // Hexadecimal: no fraction and no suffix allowed.
        match strtoull(s, 16) {
            None => return finish(s, 0, Err(NumError::Invalid)),
            Some((_, e, true)) => return finish(s, e, Err(NumError::Range)),
            Some((v, e, false)) => {
                val = v;
                end = e;
            }
        }
        if s.get(end) == Some(&b'.') || suffix_mul(s.get(end).copied()).is_some() {
            return finish(s, 0, Err(NumError::Invalid));
        }
    } else if s.get(end) == Some(&b'.') || (end == 0 && err.is_some() && s.contains(&b'.')) {
        if err.is_none() && !s.get(end + 1).is_some_and(|c| c.is_ascii_digit()) {
            // "1.k": a point without digits after it.
            end += 1;
        } else {
            let tail = &s[end..];
            let cut = tail
                .iter()
                .position(|&c| c == b'e' || c == b'E')
                .unwrap_or(tail.len());
            let (fraction, used) = match strtod_fraction(&tail[..cut]) {
                Ok(r) => r,
                Err(e) => return finish(s, 0, Err(e)),
            };
            end += used;
            err = None;
            if fraction.is_sign_negative() {
                return finish(s, end, Err(NumError::Range));
            }
            if fraction >= 1.0 {
                val = match val.checked_add(1) {
                    Some(v) => v,
                    None => return finish(s, end, Err(NumError::Range)),
                };
            } else {
                valf = (fraction * 18446744073709551616.0) as u64;
                if valf == 0 && fraction > 0.0 {
                    valf = 1;
                }
            }
        }
    }
    if let Some(e) = err {
        return finish(s, end, Err(e));
    }
    let mul = match suffix_mul(s.get(end).copied()) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if mul == 1 {
        if valf != 0 {
            return finish(s, 0, Err(NumError::Invalid));
        }
        return finish(s, end, Ok(val));
    }
    // 64.64 fixed point times the unit, rounding half a byte up.
    let low = valf as u128 * mul as u128;
    let total = val as u128 * mul as u128 + (low >> 64) + ((low as u64) >> 63) as u128;
    if total > u64::MAX as u128 {
        return finish(s, end, Err(NumError::Range));
    }
    finish(s, end, Ok(total as u64))
}

/// QEMU's qemu_strtou64 with base 0 and no end pointer: C's strtoull
/// (`0x` hex, leading `0` octal, blanks and a sign allowed, a '-' wrapping
/// the value), then the whole text must have been used.
pub fn strtou64(text: &str) -> Result<u64, NumError> {
    let s = text.as_bytes();
    let mut i = 0;
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    if matches!(s.get(i), Some(b'+' | b'-')) {
        i += 1;
    }
    let base = match (s.get(i), s.get(i + 1), s.get(i + 2)) {
        (Some(b'0'), Some(b'x' | b'X'), Some(c)) if c.is_ascii_hexdigit() => 16,
        (Some(b'0'), _, _) => 8,
        _ => 10,
    };
    match strtoull(s, base) {
        None => Err(NumError::Invalid),
        Some((_, end, _)) if end < s.len() => Err(NumError::Invalid),
        Some((_, _, true)) => Err(NumError::Range),
        Some((v, _, false)) => Ok(v),
    }
}

/// Without an end pointer, anything left over makes the text invalid.
fn finish(s: &[u8], end: usize, r: Result<u64, NumError>) -> Result<u64, NumError> {
    if end < s.len() {
        return Err(NumError::Invalid);
    }
    r
}

/// qemu-io's cvtnum: a size that fits in an int64.
pub fn cvtnum(text: &str) -> Result<i64, NumError> {
    let v = strtosz(text)?;
    i64::try_from(v).map_err(|_| NumError::Range)
}

/// Prints qemu-io's message for a number it could not read (stdout).
pub fn print_cvtnum_err(e: NumError, arg: &str) {
    match e {
        NumError::Invalid => outln!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
        ),
        NumError::Range => outln!("Parsing error: argument too large -- {arg}"),
    }
}

/// cvtnum, printing the message on failure; the error is the negative errno.
pub fn cvtnum_or_report(text: &str) -> Result<i64, i32> {
    cvtnum(text).map_err(|e| {
        print_cvtnum_err(e, text);
        e.errno()
    })
}

/// C's strtol(s, &end, 0) as a long: the value (clamped on overflow) and
/// whether the whole text was used.
pub fn strtol0(text: &str) -> (i64, bool) {
    let s = text.as_bytes();
    let mut i = 0;
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    let base = if s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        i += 2;
        16
    } else if s.get(i) == Some(&b'0') {
        8
    } else {
        10
    };
    let start = i;
    let mut val: i128 = 0;
    while let Some(d) = s.get(i).and_then(|&c| (c as char).to_digit(base)) {
        val = (val * base as i128 + d as i128).min(1 << 64);
        i += 1;
    }
    if i == start {
        // No digits: strtol returns 0 and leaves the end at the start.
        return (0, s.is_empty());
    }
    let val = if neg { -val } else { val };
    let clamped = val.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    (clamped, i == s.len())
}

/// A pattern byte for `-P` (QEMU: parse_pattern); prints the complaint.
pub fn parse_pattern(arg: &str) -> Option<u8> {
    match strtol0(arg) {
        (v @ 0..=255, true) => Some(v as u8),
        _ => {
            outln!("{arg} is not a valid pattern byte");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(strtosz("512"), Ok(512));
        assert_eq!(strtosz("4k"), Ok(4096));
        assert_eq!(strtosz("\t8k"), Ok(8192));
        assert_eq!(strtosz("1.5k"), Ok(1536));
        assert_eq!(strtosz("1.k"), Ok(1024));
        assert_eq!(strtosz(".5k"), Ok(512));
        assert_eq!(strtosz("0x200"), Ok(512));
        assert_eq!(strtosz("0x1b"), Ok(27));
        assert_eq!(strtosz("128M"), Ok(128 << 20));
        assert_eq!(strtosz("1b"), Ok(1));
        assert_eq!(strtosz("0x20M"), Err(NumError::Invalid));
        assert_eq!(strtosz("1.5"), Err(NumError::Invalid));
        assert_eq!(strtosz("abc"), Err(NumError::Invalid));
        assert_eq!(strtosz("1x"), Err(NumError::Invalid));
        assert_eq!(strtosz(""), Err(NumError::Invalid));
        assert_eq!(strtosz("-1"), Err(NumError::Range));
        assert_eq!(strtosz("99999999999999999999"), Err(NumError::Range));
        assert_eq!(strtosz("99999999999999999999k"), Err(NumError::Invalid));
        assert_eq!(strtosz("16E"), Err(NumError::Range));
        assert_eq!(cvtnum("8E"), Err(NumError::Range));
        assert_eq!(cvtnum("7E"), Ok(7 << 60));
    }

    #[test]
    fn patterns() {
        assert_eq!(strtol0("0xab"), (0xab, true));
        assert_eq!(strtol0("010"), (8, true));
        assert_eq!(strtol0("-1"), (-1, true));
        assert_eq!(strtol0("12m"), (12, false));
        assert_eq!(strtol0("route66"), (0, false));
        assert_eq!(strtol0("0x"), (0, false));
        assert_eq!(strtou64("0x10"), Ok(16));
        assert_eq!(strtou64(" 010"), Ok(8));
        assert_eq!(strtou64("+3"), Ok(3));
        assert_eq!(strtou64("-1"), Ok(u64::MAX));
        assert_eq!(strtou64("09"), Err(NumError::Invalid));
        assert_eq!(strtou64("5k"), Err(NumError::Invalid));
        assert_eq!(strtou64(""), Err(NumError::Invalid));
        assert_eq!(strtou64("18446744073709551616"), Err(NumError::Range));
    }
}
