//! Options: QEMU's `key=value,key2=value2` strings, dotted keys, JSON, and
//! typed accessors shared by `create -o`, `--image-opts`, `-o help` and
//! `blockdev-add`. Values from a command line are strings, values from JSON
//! are typed; the accessors take both, as QEMU's keyval visitor does.

use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// A nested option dictionary (QEMU: QDict).
pub type Opts = Map<String, Value>;

/// Splits `a=1,b=x,,y` into pairs, `,,` standing for a literal comma. A bare
/// key without `=` takes the `implied` key name when given (`-o help`, or the
/// file name of `-drive`), else it becomes `key=on`.
pub fn parse_keyval(s: &str, implied: Option<&str>) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for (i, p) in parts.into_iter().enumerate() {
        if p.is_empty() {
            continue;
        }
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None if i == 0 && implied.is_some() => {
                out.push((implied.unwrap_or_default().to_string(), p))
            }
            None => out.push((p, "on".to_string())),
        }
    }
    Ok(out)
}

/// Builds a nested dictionary from dotted keys (`file.filename=x` →
/// `{"file": {"filename": "x"}}`).
pub fn nest(pairs: &[(String, String)]) -> Result<Opts> {
    let mut root = Map::new();
    for (k, v) in pairs {
        let mut cur = &mut root;
        let mut segs = k.split('.').peekable();
        while let Some(seg) = segs.next() {
            if segs.peek().is_none() {
                if cur.contains_key(seg) {
                    return Err(Error::invalid(format!(
                        "Parameter '{k}' is set more than once"
                    )));
                }
                cur.insert(seg.to_string(), Value::String(v.clone()));
            } else {
                let e = cur
                    .entry(seg.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                cur = match e {
                    Value::Object(m) => m,
                    _ => {
                        return Err(Error::invalid(format!(
                            "Parameter '{k}' conflicts with another option"
                        )))
                    }
                };
            }
        }
    }
    Ok(root)
}

/// Parses `json:{...}` file names and `--image-opts` JSON strings into
/// options, with QEMU's JSON dialect and error words.
pub fn parse_json(s: &str) -> Result<Opts> {
    match crate::qjson::parse(s) {
        Ok(Value::Object(m)) => Ok(flatten_dotted_keys(m)),
        Ok(_) => Err(Error::invalid("Invalid JSON object given")),
        Err(e) => Err(Error::invalid(format!(
            "Could not parse the JSON options: {e}"
        ))),
    }
}

/// JSON may spell nested options as dotted keys too; nest them.
fn flatten_dotted_keys(m: Opts) -> Opts {
    let mut out = Map::new();
    for (k, v) in m {
        let v = match v {
            Value::Object(inner) => Value::Object(flatten_dotted_keys(inner)),
            other => other,
        };
        if let Some((head, rest)) = k.split_once('.') {
            let e = out
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(sub) = e {
                let mut tmp = Map::new();
                tmp.insert(rest.to_string(), v);
                for (k2, v2) in flatten_dotted_keys(tmp) {
                    sub.insert(k2, v2);
                }
            }
        } else {
            out.insert(k, v);
        }
    }
    out
}

/// Removes and returns a string option.
pub fn take_str(o: &mut Opts, key: &str) -> Result<Option<String>> {
    match o.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(_) => Err(Error::invalid(format!(
            "Invalid parameter type for '{key}', expected: string"
        ))),
    }
}

/// Removes and returns a boolean option (`on`/`off`/`true`/`false`).
pub fn take_bool(o: &mut Opts, key: &str) -> Result<Option<bool>> {
    match o.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::String(s)) => match s.as_str() {
            "on" | "yes" | "true" | "y" => Ok(Some(true)),
            "off" | "no" | "false" | "n" => Ok(Some(false)),
            _ => Err(Error::invalid(format!(
                "Parameter '{key}' expects 'on' or 'off'"
            ))),
        },
        Some(_) => Err(Error::invalid(format!(
            "Invalid parameter type for '{key}', expected: boolean"
        ))),
    }
}

/// Removes and returns a size option (suffixes allowed).
pub fn take_size(o: &mut Opts, key: &str) -> Result<Option<u64>> {
    match o.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| Error::invalid(format!("Parameter '{key}' expects a non-negative number below 2^64"))),
        Some(Value::String(s)) => parse_size(&s, 1).map(Some).map_err(|_| {
            Error::invalid(format!(
                "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
            ))
        }),
        Some(_) => Err(Error::invalid(format!("Invalid parameter type for '{key}', expected: size"))),
    }
}

/// Removes and returns an unsigned number option (no suffixes).
pub fn take_u64(o: &mut Opts, key: &str) -> Result<Option<u64>> {
    match o.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| Error::invalid(format!("Parameter '{key}' expects a number"))),
        // As qemu_strtou64, a minus sign wraps: "-1" is 2^64 - 1.
        Some(Value::String(s)) => match s.strip_prefix('-') {
            Some(n) => n.parse::<u64>().map(|v| Some(v.wrapping_neg())),
            None => s.parse::<u64>().map(Some),
        }
        .map_err(|_| Error::invalid(format!("Parameter '{key}' expects a number"))),
        Some(_) => Err(Error::invalid(format!(
            "Invalid parameter type for '{key}', expected: number"
        ))),
    }
}

/// Removes and returns a nested dictionary option.
pub fn take_dict(o: &mut Opts, key: &str) -> Result<Option<Opts>> {
    match o.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(Value::String(s)) => {
            // A reference to an existing node by name; kept as a marker entry.
            let mut m = Map::new();
            m.insert("node-ref".to_string(), Value::String(s));
            Ok(Some(m))
        }
        Some(_) => Err(Error::invalid(format!(
            "Invalid parameter type for '{key}', expected: object"
        ))),
    }
}

/// Fails with QEMU's error when options are left that no one took.
pub fn reject_unknown(o: &Opts, driver: &str) -> Result<()> {
    // QEMU's options are flat: a nested leftover is named by its dotted key.
    let Some((k, mut v)) = o.iter().next() else {
        return Ok(());
    };
    let mut key = k.clone();
    while let Some((k, inner)) = v.as_object().and_then(|m| m.iter().next()) {
        key = format!("{key}.{k}");
        v = inner;
    }
    Err(Error::invalid(format!(
        "Block format '{driver}' does not support the option '{key}'"
    )))
}

/// Parses a size like qemu's `qemu_strtosz`: a number (fractions allowed with
/// a suffix) and an optional suffix B/K/M/G/T/P/E (binary multiples);
/// `default_unit` applies without a suffix.
pub fn parse_size(s: &str, default_unit: u64) -> Result<u64> {
    let bad = || Error::invalid(format!("invalid size '{s}'"));
    let s = s.trim();
    // Hexadecimal, as QEMU's do_strtosz takes it: no fraction, no suffix.
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let unit: u64 = match suffix {
        "" => default_unit,
        "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Err(bad()),
    };
    if let Some((int, frac)) = num.split_once('.') {
        if suffix.is_empty() && default_unit == 1 {
            return Err(bad());
        }
        let int: u64 = int.parse().map_err(|_| bad())?;
        let frac_v: f64 = format!("0.{frac}").parse().map_err(|_| bad())?;
        let whole = int.checked_mul(unit).ok_or_else(bad)?;
        return whole
            .checked_add((frac_v * unit as f64) as u64)
            .ok_or_else(bad);
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(unit).ok_or_else(bad)
}

/// The type of a creation option, for `-o help`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptType {
    /// on/off
    Bool,
    /// a number
    Number,
    /// a size with optional suffix
    Size,
    /// free text
    Str,
}

/// One option a driver accepts at creation (`qemu-img create -o`).
#[derive(Clone, Copy, Debug)]
pub struct OptSpec {
    /// The key.
    pub name: &'static str,
    /// Its type.
    pub ty: OptType,
    /// One line of help, shown by `-o help`.
    pub help: &'static str,
    /// The default shown by `-o help`, if any.
    pub default: Option<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyval_commas_and_implied() {
        let p = parse_keyval("a=1,b=x,,y,flag", None).unwrap();
        assert_eq!(p[1], ("b".into(), "x,y".into()));
        assert_eq!(p[2], ("flag".into(), "on".into()));
        let p = parse_keyval("help", Some("help")).unwrap();
        assert_eq!(p[0].0, "help");
    }

    #[test]
    fn nesting() {
        let p = parse_keyval("driver=qcow2,file.filename=x.img", None).unwrap();
        let o = nest(&p).unwrap();
        assert_eq!(o["file"]["filename"], "x.img");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64k", 1).unwrap(), 65536);
        assert_eq!(parse_size("1.5G", 1).unwrap(), 3 << 29);
        assert_eq!(parse_size("512", 1).unwrap(), 512);
        assert!(parse_size("12x", 1).is_err());
        assert!(parse_size("99999999999999999999E", 1).is_err());
    }

    #[test]
    fn json_dotted() {
        let o = parse_json(r#"{"driver":"qcow2","file.filename":"a"}"#).unwrap();
        assert_eq!(o["file"]["filename"], "a");
    }
}
