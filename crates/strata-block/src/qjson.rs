//! QEMU's JSON, both ways. Parsing: the dialect `json:` file names and QMP
//! accept (standard JSON plus single-quoted strings, `{'driver': 'raw'}`),
//! keeping key order, with QEMU's error words ("JSON parse error, premature
//! EOI"). Writing: QEMU's pretty and compact writers over QDict order, so
//! `--output=json` and `json:` file names are byte-identical to QEMU's.
//!
//! A QDict keeps its keys in a 512-bucket hash table keyed by tdb_hash; it
//! iterates buckets in order and, inside a bucket, newest key first. Objects
//! here are given in insertion order and printed in that iteration order.

use serde_json::{Map, Number, Value};

/// Deepest nesting accepted (QEMU: MAX_NESTING).
const MAX_NESTING: usize = 1024;

/// Parses exactly one JSON value from `s`.
pub fn parse(s: &str) -> Result<Value, String> {
    let mut p = Parser {
        s: s.as_bytes(),
        pos: 0,
        depth: 0,
    };
    p.skip_ws();
    if p.pos == p.s.len() {
        return Err("Expecting a JSON value".into());
    }
    let v = p.value()?;
    p.skip_ws();
    if p.pos != p.s.len() {
        return Err("Expecting at most one JSON value".into());
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

fn parse_error(what: &str) -> String {
    format!("JSON parse error, {what}")
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && matches!(self.s[self.pos], b' ' | b'\t' | b'\n' | b'\r') {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Result<u8, String> {
        self.skip_ws();
        self.s
            .get(self.pos)
            .copied()
            .ok_or_else(|| parse_error("premature EOI"))
    }

    fn value(&mut self) -> Result<Value, String> {
        match self.peek()? {
            b'{' => self.nested(Self::object),
            b'[' => self.nested(Self::array),
            b'"' | b'\'' => self.string().map(Value::String),
            b'-' | b'0'..=b'9' => self.number(),
            b'a'..=b'z' => self.keyword(),
            b'}' | b']' | b',' | b':' => Err(parse_error("expecting value")),
            c => Err(parse_error(&format!("stray '{}'", c as char))),
        }
    }

    fn nested(&mut self, f: fn(&mut Self) -> Result<Value, String>) -> Result<Value, String> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err("JSON nesting depth limit exceeded".into());
        }
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn object(&mut self) -> Result<Value, String> {
        self.pos += 1;
        let mut m = Map::new();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Ok(Value::Object(m));
        }
        loop {
            if !matches!(self.peek()?, b'"' | b'\'') {
                return Err(parse_error("key is not a string in object"));
            }
            let k = self.string()?;
            if self.peek()? != b':' {
                return Err(parse_error("missing : in object pair"));
            }
            self.pos += 1;
            let v = self.value()?;
            if m.contains_key(&k) {
                return Err(parse_error("duplicate key"));
            }
            m.insert(k, v);
            match self.peek()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Ok(Value::Object(m));
                }
                _ => return Err(parse_error("expected separator in dict")),
            }
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        self.pos += 1;
        let mut a = Vec::new();
        if self.peek()? == b']' {
            self.pos += 1;
            return Ok(Value::Array(a));
        }
        loop {
            a.push(self.value()?);
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    if self.peek()? == b']' {
                        return Err(parse_error("expecting value"));
                    }
                }
                b']' => {
                    self.pos += 1;
                    return Ok(Value::Array(a));
                }
                _ => return Err(parse_error("expected separator in list")),
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = self.s[self.pos];
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.pos) else {
                return Err(parse_error("premature EOI"));
            };
            self.pos += 1;
            if c == quote {
                break;
            }
            if c != b'\\' {
                out.push(c);
                continue;
            }
            let Some(&e) = self.s.get(self.pos) else {
                return Err(parse_error("premature EOI"));
            };
            self.pos += 1;
            match e {
                b'"' | b'\'' | b'\\' | b'/' => out.push(e),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'u' => {
                    let cp = self.hex4()?;
                    let cp = if (0xd800..0xdc00).contains(&cp)
                        && self.s.get(self.pos..self.pos + 2) == Some(b"\\u")
                    {
                        self.pos += 2;
                        let lo = self.hex4()?;
                        0x10000 + ((cp - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff)
                    } else {
                        cp
                    };
                    let ch = char::from_u32(cp)
                        .ok_or_else(|| parse_error("invalid escape sequence in string"))?;
                    let mut b = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                }
                _ => return Err(parse_error("invalid escape sequence in string")),
            }
        }
        String::from_utf8(out).map_err(|_| parse_error("invalid UTF-8 sequence in string"))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self
            .s
            .get(self.pos..self.pos + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| parse_error("invalid escape sequence in string"))?;
        self.pos += 4;
        Ok(h)
    }

    fn number(&mut self) -> Result<Value, String> {
        let start = self.pos;
        while self.pos < self.s.len()
            && matches!(
                self.s[self.pos],
                b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
            )
        {
            self.pos += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
        if let Ok(i) = text.parse::<i64>() {
            return Ok(Value::Number(i.into()));
        }
        if let Ok(u) = text.parse::<u64>() {
            return Ok(Value::Number(u.into()));
        }
        text.parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| parse_error(&format!("stray '{text}'")))
    }

    fn keyword(&mut self) -> Result<Value, String> {
        let start = self.pos;
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_alphanumeric() {
            self.pos += 1;
        }
        let word = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
        match word {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            "null" => Ok(Value::Null),
            _ => Err(parse_error(&format!("invalid keyword '{word}'"))),
        }
    }
}

/// QEMU's hash of a QDict key (the "tdb" hash of qobject/qdict.c).
fn tdb_hash(key: &str) -> u32 {
    let b = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        value = value.wrapping_add((c as u32) << (i * 5 % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The keys of an object in the order a QDict built by inserting them in
/// order iterates them.
pub fn qdict_order<'a>(keys: impl Iterator<Item = &'a String>) -> Vec<&'a String> {
    let mut v: Vec<(u32, usize, &String)> = keys
        .enumerate()
        .map(|(i, k)| (tdb_hash(k) % 512, i, k))
        .collect();
    // Bucket ascending; within a bucket the most recently inserted first.
    v.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    v.into_iter().map(|(_, _, k)| k).collect()
}

/// Pretty-prints `v` as QEMU's JSON writer does (no trailing newline).
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0);
    out
}

/// Prints `v` on one line as QEMU's compact writer does (`json:` file
/// names): `{"k": v, "k2": [1, 2]}`, keys in QDict order.
pub fn to_compact_string(v: &Value) -> String {
    let mut out = String::new();
    write_compact(&mut out, v);
    out
}

fn write_compact(out: &mut String, v: &Value) {
    match v {
        Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_compact(out, item);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, k) in qdict_order(m.keys()).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, k);
                out.push_str(": ");
                write_compact(out, &m[k]);
            }
            out.push('}');
        }
        other => write_value(out, other, 0),
    }
}

fn indent(out: &mut String, depth: usize) {
    out.push('\n');
    for _ in 0..depth {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, v: &Value, depth: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) if n.is_f64() => out.push_str(&format_double(n.as_f64().unwrap_or(0.0))),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_value(out, item, depth + 1);
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, k) in qdict_order(m.keys()).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_string(out, k);
                out.push_str(": ");
                write_value(out, &m[k], depth + 1);
            }
            indent(out, depth);
            out.push('}');
        }
    }
}

/// A double as QEMU's JSON writer prints it: C's `%.17g`.
pub fn format_double(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "nan"
        } else if v > 0.0 {
            "inf"
        } else {
            "-inf"
        }
        .into();
    }
    let strip = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    // The exponent after rounding to 17 significant digits decides the form.
    let sci = format!("{v:.16e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..17).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip(mant), exp.abs())
    } else {
        strip(&format!("{v:.*}", (16 - exp) as usize))
    }
}

/// A JSON string with QEMU's escapes (`\uXXXX` upper-case for controls and non-ASCII).
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_quotes_and_order() {
        let v = parse("{'driver':'raw', \"b\": [1, -2, 3.5, true, null], 'a': 'it\\'s'}").unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["driver", "b", "a"]);
        assert_eq!(v["a"], "it's");
        assert_eq!(v["b"][1], -2);
    }

    #[test]
    fn doubles_as_printf_17g() {
        assert_eq!(format_double(1.5), "1.5");
        assert_eq!(format_double(0.1), "0.10000000000000001");
        assert_eq!(format_double(1e100), "1e+100");
        assert_eq!(format_double(-2.5e-7), "-2.4999999999999999e-07");
        assert_eq!(format_double(100.0), "100");
        assert_eq!(to_compact_string(&parse("[2.0]").unwrap()), "[2]");
    }

    #[test]
    fn qemu_error_words() {
        assert_eq!(parse("{").unwrap_err(), "JSON parse error, premature EOI");
        assert_eq!(parse("").unwrap_err(), "Expecting a JSON value");
        assert_eq!(
            parse("{\"a\":}").unwrap_err(),
            "JSON parse error, expecting value"
        );
        assert_eq!(
            parse("{\"a\" 1}").unwrap_err(),
            "JSON parse error, missing : in object pair"
        );
        assert_eq!(
            parse("{\"x\":1} junk").unwrap_err(),
            "Expecting at most one JSON value"
        );
        assert_eq!(
            parse("{1:2}").unwrap_err(),
            "JSON parse error, key is not a string in object"
        );
    }
}
