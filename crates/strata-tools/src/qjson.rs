//! JSON as QEMU's tools print it: QEMU's pretty writer (4-space indent, a
//! newline inside empty containers) over QDict order, so `--output=json`
//! is byte-identical to qemu-img's.
//!
//! A QDict keeps its keys in a 512-bucket hash table keyed by tdb_hash; it
//! iterates buckets in order and, inside a bucket, newest key first. Objects
//! here are given in insertion order and printed in that iteration order.

use serde_json::Value;

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

/// QEMU's human dump of a QAPI object (block/qapi.c dump_qobject), as
/// `info` prints format-specific data: `key: value` with dashes in keys
/// shown as spaces, nested containers four spaces deeper, list items as
/// `[i]:`, keys in QDict order. `indent` is the level of the outermost keys.
pub fn human_dump(v: &Value, indent: usize) -> String {
    let mut out = String::new();
    dump_into(&mut out, v, indent);
    out
}

fn dump_into(out: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent * 4);
    let entry = |out: &mut String, label: &str, val: &Value| {
        if matches!(val, Value::Object(_) | Value::Array(_)) {
            out.push_str(&format!("{pad}{label}:\n"));
            dump_into(out, val, indent + 1);
        } else {
            out.push_str(&format!("{pad}{label}: "));
            dump_into(out, val, indent + 1);
            out.push('\n');
        }
    };
    match v {
        Value::Object(m) => {
            for k in qdict_order(m.keys()) {
                entry(out, &k.replace('-', " "), &m[k]);
            }
        }
        Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                entry(out, &format!("[{i}]"), val);
            }
        }
        Value::String(s) => out.push_str(s),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::Null => out.push_str("null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn check_keys_in_qemu_order() {
        let v = json!({
            "filename": "a", "format": "qcow2", "check-errors": 0,
            "image-end-offset": 1, "total-clusters": 2
        });
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let order: Vec<&str> = qdict_order(keys.into_iter())
            .into_iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "image-end-offset",
                "total-clusters",
                "check-errors",
                "filename",
                "format"
            ]
        );
    }

    #[test]
    fn human_dump_of_qcow2_data() {
        let v = json!({"compat": "1.1", "lazy-refcounts": false, "refcount-bits": 16,
                       "bitmaps": [{"name": "b", "flags": ["auto"]}]});
        assert_eq!(
            human_dump(&v, 1),
            "    compat: 1.1\n    lazy refcounts: false\n    bitmaps:\n        [0]:\n            \
             flags:\n                [0]: auto\n            name: b\n    refcount bits: 16\n"
        );
    }

    #[test]
    fn empty_containers_have_a_newline() {
        assert_eq!(to_string(&json!({"a": {}})), "{\n    \"a\": {\n    }\n}");
    }
}
