//! JSON as QEMU's tools print it: the writers live in strata-block
//! (`strata_block::qjson`); this adds the human dump of `info`.

use serde_json::Value;

pub use strata_block::qjson::{qdict_order, to_string};

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
