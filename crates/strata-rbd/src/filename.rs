//! `rbd:pool[/namespace]/image[@snapshot][:key=value...]`, as QEMU's
//! qemu_rbd_parse_filename reads it: `\` escapes the next character,
//! `conf` and `id` are options of their own, every other pair is a Ceph
//! configuration setting passed on in order.

use serde_json::Value;
use strata_block::{Error, Opts, Result};

/// The key under which the other pairs travel (QEMU's "=keyvalue-pairs").
pub const KEYVALUE_PAIRS: &str = "=keyvalue-pairs";

/// Where `delim` is in `s`, skipping escaped characters (qemu_rbd_strchr).
fn find(s: &str, delim: char) -> Option<usize> {
    let mut it = s.char_indices();
    while let Some((i, c)) = it.next() {
        if c == delim {
            return Some(i);
        }
        if c == '\\' {
            it.next();
        }
    }
    None
}

/// Splits at the first unescaped `delim` (qemu_rbd_next_tok).
fn next_tok(s: &str, delim: char) -> (&str, Option<&str>) {
    match find(s, delim) {
        Some(i) => (&s[..i], Some(&s[i + delim.len_utf8()..])),
        None => (s, None),
    }
}

/// Drops the backslash of each escape (qemu_rbd_unescape).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(n) = it.next() {
                out.push(n);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Fills `opts` from an `rbd:` file name.
pub fn parse(filename: &str, opts: &mut Opts) -> Result<()> {
    let Some(start) = filename.strip_prefix("rbd:") else {
        return Err(Error::invalid("File name must start with 'rbd:'"));
    };
    let (pool, rest) = next_tok(start, '/');
    let Some(rest) = rest else {
        return Err(Error::invalid("Pool name is required"));
    };
    let s = |v: String| Value::String(v);
    opts.insert("pool".into(), s(unescape(pool)));
    let (image, mut rest) = if find(rest, '@').is_some() {
        let (image, after) = next_tok(rest, '@');
        let (snap, after) = next_tok(after.unwrap_or(""), ':');
        opts.insert("snapshot".into(), s(unescape(snap)));
        (image, after)
    } else {
        next_tok(rest, ':')
    };
    let image = match next_tok(image, '/') {
        (ns, Some(image)) => {
            opts.insert("namespace".into(), s(unescape(ns)));
            image
        }
        (image, None) => {
            opts.insert("namespace".into(), s(String::new()));
            image
        }
    };
    opts.insert("image".into(), s(unescape(image)));
    let mut pairs = Vec::new();
    while let Some(p) = rest {
        let (name, after) = next_tok(p, '=');
        let Some(after) = after else {
            return Err(Error::invalid(format!("conf option {name} has no value")));
        };
        let name = unescape(name);
        let (value, after) = next_tok(after, ':');
        let value = unescape(value);
        match name.as_str() {
            "conf" => {
                opts.insert("conf".into(), s(value));
            }
            "id" => {
                opts.insert("user".into(), s(value));
            }
            _ => {
                pairs.push(s(name));
                pairs.push(s(value));
            }
        }
        rest = after;
    }
    if !pairs.is_empty() {
        let json = Value::Array(pairs).to_string();
        opts.insert(KEYVALUE_PAIRS.into(), s(json));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(f: &str) -> String {
        let mut o = Opts::new();
        match parse(f, &mut o) {
            Ok(()) => serde_json::to_string(&o).unwrap(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn file_names_as_qemu_reads_them() {
        assert_eq!(
            parsed("rbd:rbd/disk"),
            r#"{"pool":"rbd","namespace":"","image":"disk"}"#
        );
        assert_eq!(
            parsed("rbd:p/ns/disk@snap:conf=/etc/c.conf:id=admin:mon_host=1.2.3.4\\:6789"),
            r#"{"pool":"p","snapshot":"snap","namespace":"ns","image":"disk","conf":"/etc/c.conf","user":"admin","=keyvalue-pairs":"[\"mon_host\",\"1.2.3.4:6789\"]"}"#
        );
        assert_eq!(
            parsed("rbd:p/a\\/b"),
            r#"{"pool":"p","namespace":"","image":"a/b"}"#
        );
        assert_eq!(parsed("rbd:pool"), "Pool name is required");
        assert_eq!(parsed("nbd:x"), "File name must start with 'rbd:'");
        assert_eq!(
            parsed("rbd:p/i:novalue"),
            "conf option novalue has no value"
        );
    }
}
