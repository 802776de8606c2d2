//! Whatever a client sends, the monitor answers and never panics: random
//! bytes through the JSON stream, random values through the argument
//! checks, random option strings through the keyval parser.

use proptest::prelude::*;
use serde_json::{json, Value};
use strata_qmp::json::JsonStream;
use strata_qmp::Schema;

fn schema() -> Schema {
    let mut s = Schema::new();
    s.enumeration("Drv", &["file", "qcow2"])
        .object(
            "File",
            &[("filename", "str"), ("*size", "size"), ("*n", "uint8")],
        )
        .object(
            "Qcow2",
            &[("file", "Ref"), ("*backing", "RefOrNull"), ("*l", "[int]")],
        )
        .union(
            "Opts",
            &[("driver", "Drv"), ("*ro", "bool"), ("*x", "number")],
            "driver",
            &[("file", "File"), ("qcow2", "Qcow2")],
        )
        .alternate("Ref", &["Opts", "str"])
        .alternate("RefOrNull", &["Opts", "str", "null"]);
    s
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(|f| json!(f)),
        prop_oneof![
            Just("file"),
            Just("qcow2"),
            Just("x"),
            Just("1M"),
            Just("on")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("driver"),
                        Just("file"),
                        Just("filename"),
                        Just("backing"),
                        Just("size"),
                        Just("n"),
                        Just("l"),
                        Just("ro"),
                        Just("x"),
                        Just("zz")
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

proptest! {
    #[test]
    fn any_bytes_give_messages_or_errors(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut s = JsonStream::default();
        for chunk in bytes.chunks(7) {
            for m in s.feed(chunk) {
                if let Err(e) = m {
                    prop_assert!(e.starts_with("JSON "));
                }
            }
        }
    }

    #[test]
    fn any_value_is_checked_without_panic(v in json_value(), keyval in any::<bool>()) {
        let s = schema();
        let _ = strata_qmp::visit::visit(&s, "Opts", v, keyval);
    }

    #[test]
    fn any_option_string_is_parsed_without_panic(text in "[a-z0-9.,=?é-]{0,40}") {
        if let Ok(m) = strata_qmp::keyval::parse(&text, Some("driver")) {
            let _ = strata_qmp::visit::visit(&schema(), "Opts", Value::Object(m), true);
        }
    }
}
