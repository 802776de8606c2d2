//! QEMU's QObject input visitor (qapi/qobject-input-visitor.c) over a
//! [`Schema`]: checks a JSON value against a type and returns it typed,
//! with QEMU's error texts and its way of naming the offending parameter
//! (`file.filename`, `enable[0]`, or `children.0` for keyval input).
//!
//! Two modes, as in QEMU: QMP input is typed JSON; keyval input (from
//! `key=value` options) has only strings, which are converted by type.

use crate::ghash::GHashSet;
use crate::schema::{Member, Schema, TypeDef};
use serde_json::{Map, Number, Value};

/// A container being visited, and the name it has in its parent.
struct Frame {
    name: Option<String>,
    kind: Container,
}

enum Container {
    /// An object and its keys not visited yet, laid out as QEMU keeps them.
    Dict {
        map: Map<String, Value>,
        unvisited: GHashSet,
    },
    /// A list, the next element and the index of the last one taken.
    List {
        items: Vec<Value>,
        next: usize,
        index: i64,
    },
}

/// Checks `value` against the type called `ty` and returns it typed.
/// `keyval` selects keyval input (string scalars).
pub fn visit(schema: &Schema, ty: &str, value: Value, keyval: bool) -> Result<Value, String> {
    let mut v = Visitor {
        schema,
        keyval,
        root: Some(value),
        stack: Vec::new(),
    };
    v.visit(ty, None)
}

struct Visitor<'s> {
    schema: &'s Schema,
    keyval: bool,
    root: Option<Value>,
    stack: Vec<Frame>,
}

fn missing(full: &str) -> String {
    format!("Parameter '{full}' is missing")
}

fn bad_type(full: &str, expected: &str) -> String {
    format!("Invalid parameter type for '{full}', expected: {expected}")
}

/// C's strtoll/strtoull with base 0, all of the text taken (QEMU:
/// qemu_strtoi64/qemu_strtou64): hexadecimal after `0x`, octal after `0`.
fn c_integer(s: &str) -> Option<(bool, u128)> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if (t.starts_with("0x") || t.starts_with("0X"))
        && t[2..].starts_with(|c: char| c.is_ascii_hexdigit())
    {
        (16, &t[2..])
    } else if t.starts_with('0') && t.len() > 1 {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u128 = 0;
    for c in digits.chars() {
        v = v
            .checked_mul(radix)?
            .checked_add(c.to_digit(radix as u32)? as u128)?;
        if v > u64::MAX as u128 + 1 {
            return None;
        }
    }
    Some((neg, v))
}

/// qemu_strtod_finite: the whole text a finite number.
fn c_double(s: &str) -> Option<f64> {
    let t = s.trim_start();
    let lower = t.to_ascii_lowercase();
    if lower.contains("inf") || lower.contains("nan") {
        return None;
    }
    t.parse::<f64>().ok().filter(|d| d.is_finite())
}

fn int_range(ty: &str) -> Option<(i64, i64, &'static str)> {
    Some(match ty {
        "int8" => (i8::MIN as i64, i8::MAX as i64, "int8_t"),
        "int16" => (i16::MIN as i64, i16::MAX as i64, "int16_t"),
        "int32" => (i32::MIN as i64, i32::MAX as i64, "int32_t"),
        _ => return None,
    })
}

fn uint_max(ty: &str) -> Option<(u64, &'static str)> {
    Some(match ty {
        "uint8" => (u8::MAX as u64, "uint8_t"),
        "uint16" => (u16::MAX as u64, "uint16_t"),
        "uint32" => (u32::MAX as u64, "uint32_t"),
        _ => return None,
    })
}

impl Visitor<'_> {
    /// The parameter's full name as QEMU's error messages spell it.
    fn full_name(&self, name: Option<&str>) -> String {
        let mut out = String::new();
        let mut name = name.map(str::to_string);
        for f in self.stack.iter().rev() {
            match &f.kind {
                Container::Dict { .. } => {
                    out.insert_str(0, name.as_deref().unwrap_or("<anonymous>"));
                    out.insert(0, '.');
                }
                Container::List { index, .. } => {
                    let i = *index as u32;
                    let part = if self.keyval {
                        format!(".{i}")
                    } else {
                        format!("[{i}]")
                    };
                    out.insert_str(0, &part);
                }
            }
            name = f.name.clone();
        }
        if let Some(n) = name {
            out.insert_str(0, &n);
        } else if out.starts_with('.') {
            out.remove(0);
        } else if out.is_empty() {
            return "<anonymous>".into();
        }
        out
    }

    /// The next value: the member `name` of the current object, the next
    /// element of the current list, or the root.
    fn get(&mut self, name: Option<&str>, consume: bool) -> Option<Value> {
        let Some(top) = self.stack.last_mut() else {
            return self.root.clone();
        };
        match &mut top.kind {
            Container::Dict { map, unvisited } => {
                let key = name.unwrap_or_default();
                let v = map.get(key).cloned();
                if consume && v.is_some() {
                    unvisited.remove(key);
                }
                v
            }
            Container::List { items, next, index } => {
                let v = items.get(*next).cloned();
                if consume {
                    if v.is_some() {
                        *next += 1;
                    }
                    *index += 1;
                }
                v
            }
        }
    }

    fn get_required(&mut self, name: Option<&str>, consume: bool) -> Result<Value, String> {
        match self.get(name, consume) {
            Some(v) => Ok(v),
            None => Err(missing(&self.full_name(name))),
        }
    }

    /// A scalar of keyval input: must be a string.
    fn get_keyval(&mut self, name: Option<&str>) -> Result<String, String> {
        match self.get_required(name, true)? {
            Value::String(s) => Ok(s),
            Value::Object(_) | Value::Array(_) => Err(format!(
                "Parameters '{}.*' are unexpected",
                self.full_name(name)
            )),
            _ => Err(format!(
                "Internal error: parameter {} invalid",
                self.full_name(name)
            )),
        }
    }

    fn visit(&mut self, ty: &str, name: Option<&str>) -> Result<Value, String> {
        if let Some(elem) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            return self.list(elem, name);
        }
        match self.schema.get(ty).cloned() {
            Some(TypeDef::Enum(values)) => self.enumeration(&values, name),
            Some(TypeDef::Object { .. }) => self.object(ty, name),
            Some(TypeDef::Alternate(types)) => self.alternate(ty, &types, name),
            None => self.scalar(ty, name),
        }
    }

    fn object(&mut self, ty: &str, name: Option<&str>) -> Result<Value, String> {
        let v = self.get_required(name, true)?;
        let Value::Object(map) = v else {
            return Err(bad_type(&self.full_name(name), "object"));
        };
        // Keys go into the table in the order QEMU's dictionary lists them.
        let mut unvisited = GHashSet::new();
        for k in strata_block::qjson::qdict_order(map.keys()) {
            unvisited.insert(k);
        }
        self.stack.push(Frame {
            name: name.map(str::to_string),
            kind: Container::Dict { map, unvisited },
        });
        let mut out = Map::new();
        self.members(ty, &mut out)?;
        self.check_struct()?;
        self.stack.pop();
        Ok(Value::Object(out))
    }

    /// The members of object type `ty` (a union's base, then its branch).
    fn members(&mut self, ty: &str, out: &mut Map<String, Value>) -> Result<(), String> {
        let Some(TypeDef::Object { members, branches }) = self.schema.get(ty).cloned() else {
            return Err(format!("internal error: '{ty}' is not an object type"));
        };
        self.member_list(&members, out)?;
        if let Some(b) = branches {
            let tag = out.get(&b.tag).and_then(Value::as_str).unwrap_or_default();
            if let Some((_, variant)) = b.variants.iter().find(|(v, _)| v == tag) {
                let variant = variant.clone();
                self.members(&variant, out)?;
            }
        }
        Ok(())
    }

    fn member_list(
        &mut self,
        members: &[Member],
        out: &mut Map<String, Value>,
    ) -> Result<(), String> {
        for m in members {
            if m.optional && self.get(Some(&m.name), false).is_none() {
                continue;
            }
            let v = self.visit(&m.ty, Some(&m.name))?;
            out.insert(m.name.clone(), v);
        }
        Ok(())
    }

    fn check_struct(&self) -> Result<(), String> {
        if let Some(Frame {
            kind: Container::Dict { unvisited, .. },
            ..
        }) = self.stack.last()
        {
            if let Some(k) = unvisited.first() {
                return Err(format!(
                    "Parameter '{}' is unexpected",
                    self.full_name(Some(k))
                ));
            }
        }
        Ok(())
    }

    fn list(&mut self, elem: &str, name: Option<&str>) -> Result<Value, String> {
        let v = self.get_required(name, true)?;
        let Value::Array(items) = v else {
            return Err(bad_type(&self.full_name(name), "array"));
        };
        let n = items.len();
        self.stack.push(Frame {
            name: name.map(str::to_string),
            kind: Container::List {
                items,
                next: 0,
                index: -1,
            },
        });
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.visit(elem, None)?);
        }
        self.stack.pop();
        Ok(Value::Array(out))
    }

    fn enumeration(&mut self, values: &[String], name: Option<&str>) -> Result<Value, String> {
        let s = self.string(name)?;
        if values.contains(&s) {
            return Ok(Value::String(s));
        }
        Err(format!(
            "Parameter '{}' does not accept value '{s}'",
            name.unwrap_or("null")
        ))
    }

    fn alternate(
        &mut self,
        ty: &str,
        types: &[String],
        name: Option<&str>,
    ) -> Result<Value, String> {
        let v = self.get_required(name, false)?;
        for t in types {
            let fits = match (&v, self.schema.get(t)) {
                (Value::Object(_), Some(TypeDef::Object { .. })) => true,
                (Value::String(_), Some(TypeDef::Enum(_))) => true,
                (Value::String(_), None) => t == "str",
                (Value::Bool(_), None) => t == "bool",
                (Value::Null, None) => t == "null",
                (Value::Number(_), None) => {
                    t == "number" || t == "size" || t.starts_with("int") || t.starts_with("uint")
                }
                (Value::Array(_), _) => t.starts_with('['),
                _ => false,
            };
            if fits {
                return self.visit(t, name);
            }
        }
        Err(bad_type(name.unwrap_or("null"), ty))
    }

    fn string(&mut self, name: Option<&str>) -> Result<String, String> {
        if self.keyval {
            return self.get_keyval(name);
        }
        match self.get_required(name, true)? {
            Value::String(s) => Ok(s),
            _ => Err(bad_type(&self.full_name(name), "string")),
        }
    }

    fn int64(&mut self, name: Option<&str>) -> Result<i64, String> {
        if self.keyval {
            let s = self.get_keyval(name)?;
            return match c_integer(&s) {
                Some((false, v)) if v <= i64::MAX as u128 => Ok(v as i64),
                Some((true, v)) if v <= i64::MAX as u128 + 1 => {
                    Ok((v as i128).wrapping_neg() as i64)
                }
                _ => Err(format!(
                    "Parameter '{}' expects integer",
                    self.full_name(name)
                )),
            };
        }
        let v = self.get_required(name, true)?;
        v.as_i64()
            .ok_or_else(|| bad_type(&self.full_name(name), "integer"))
    }

    fn uint64(&mut self, name: Option<&str>) -> Result<u64, String> {
        if self.keyval {
            let s = self.get_keyval(name)?;
            // strtoull takes a sign and wraps negative numbers.
            return match c_integer(&s) {
                Some((neg, v)) if v <= u64::MAX as u128 => Ok(if neg {
                    (v as u64).wrapping_neg()
                } else {
                    v as u64
                }),
                _ => Err(format!(
                    "Parameter '{}' expects integer",
                    self.full_name(name)
                )),
            };
        }
        let v = self.get_required(name, true)?;
        match (v.as_u64(), v.as_i64()) {
            (Some(u), _) => Ok(u),
            // Negative numbers are taken as they are, for compatibility.
            (None, Some(i)) => Ok(i as u64),
            _ => Err(format!(
                "Parameter '{}' expects uint64",
                self.full_name(name)
            )),
        }
    }

    fn scalar(&mut self, ty: &str, name: Option<&str>) -> Result<Value, String> {
        let raw = name.unwrap_or("null");
        match ty {
            "str" => self.string(name).map(Value::String),
            "int" | "int64" => self.int64(name).map(Value::from),
            "int8" | "int16" | "int32" => {
                let v = self.int64(name)?;
                let (min, max, cname) = int_range(ty).unwrap_or((i64::MIN, i64::MAX, ""));
                if v < min || v > max {
                    return Err(format!("Parameter '{raw}' expects {cname}"));
                }
                Ok(Value::from(v))
            }
            "uint64" => self.uint64(name).map(Value::from),
            "uint8" | "uint16" | "uint32" => {
                let v = self.uint64(name)?;
                let (max, cname) = uint_max(ty).unwrap_or((u64::MAX, ""));
                if v > max {
                    return Err(format!("Parameter '{raw}' expects {cname}"));
                }
                Ok(Value::from(v))
            }
            "size" if self.keyval => {
                let s = self.get_keyval(name)?;
                strata_block::options::parse_size(&s, 1)
                    .map(Value::from)
                    .map_err(|_| format!("Parameter '{}' expects size", self.full_name(name)))
            }
            "size" => self.uint64(name).map(Value::from),
            "bool" if self.keyval => {
                let s = self.get_keyval(name)?;
                match s.as_str() {
                    "on" | "yes" | "true" | "y" => Ok(Value::Bool(true)),
                    "off" | "no" | "false" | "n" => Ok(Value::Bool(false)),
                    _ => Err(format!(
                        "Parameter '{}' expects 'on' or 'off'",
                        self.full_name(name)
                    )),
                }
            }
            "bool" => match self.get_required(name, true)? {
                Value::Bool(b) => Ok(Value::Bool(b)),
                _ => Err(bad_type(&self.full_name(name), "boolean")),
            },
            "number" if self.keyval => {
                let s = self.get_keyval(name)?;
                c_double(&s)
                    .and_then(Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(|| bad_type(&self.full_name(name), "number"))
            }
            "number" => {
                match self.get_required(name, true)? {
                    Value::Number(n) => Ok(Number::from_f64(n.as_f64().unwrap_or(0.0))
                        .map_or(Value::Null, Value::Number)),
                    _ => Err(bad_type(&self.full_name(name), "number")),
                }
            }
            "any" => self.get_required(name, true),
            "null" => match self.get_required(name, true)? {
                Value::Null => Ok(Value::Null),
                _ => Err(bad_type(&self.full_name(name), "null")),
            },
            other => Err(format!("internal error: unknown type '{other}'")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        let mut s = Schema::new();
        s.enumeration("Cap", &["oob"])
            .object("Caps", &[("*enable", "[Cap]")])
            .enumeration("Drv", &["file", "qcow2"])
            .object("File", &[("filename", "str"), ("*size", "size")])
            .object(
                "Qcow2",
                &[("file", "Ref"), ("*backing", "RefOrNull"), ("*l2", "int")],
            )
            .union(
                "Opts",
                &[
                    ("driver", "Drv"),
                    ("*node-name", "str"),
                    ("*read-only", "bool"),
                ],
                "driver",
                &[("file", "File"), ("qcow2", "Qcow2")],
            )
            .alternate("Ref", &["Opts", "str"])
            .alternate("RefOrNull", &["Opts", "str", "null"])
            .object(
                "Resize",
                &[
                    ("*node-name", "str"),
                    ("size", "int"),
                    ("*n", "uint8"),
                    ("*l", "[int]"),
                ],
            );
        assert!(s.undefined().is_empty());
        s
    }

    #[test]
    fn qmp_errors_name_parameters_as_qemu() {
        let s = schema();
        let e = |ty: &str, v: Value| visit(&s, ty, v, false).unwrap_err();
        assert_eq!(
            e("Caps", json!({"enable": ["foo"]})),
            "Parameter 'null' does not accept value 'foo'"
        );
        assert_eq!(
            e("Caps", json!({"enable": "oob"})),
            "Invalid parameter type for 'enable', expected: array"
        );
        assert_eq!(
            e("Caps", json!({"enable": [1]})),
            "Invalid parameter type for 'enable[0]', expected: string"
        );
        assert_eq!(e("Caps", json!({"x": 1})), "Parameter 'x' is unexpected");
        assert_eq!(e("Opts", json!({})), "Parameter 'driver' is missing");
        assert_eq!(
            e("Opts", json!({"driver": "vmdk"})),
            "Parameter 'driver' does not accept value 'vmdk'"
        );
        assert_eq!(
            e(
                "Opts",
                json!({"driver": "qcow2", "file": {"driver": "file"}})
            ),
            "Parameter 'file.filename' is missing"
        );
        assert_eq!(
            e(
                "Opts",
                json!({"driver": "qcow2", "file": {"driver": "file", "filename": "a", "x": 1}})
            ),
            "Parameter 'file.x' is unexpected"
        );
        assert_eq!(
            e("Opts", json!({"driver": "qcow2", "file": 1})),
            "Invalid parameter type for 'file', expected: Ref"
        );
        assert_eq!(
            e(
                "Opts",
                json!({"driver": "file", "filename": "a", "read-only": "on"})
            ),
            "Invalid parameter type for 'read-only', expected: boolean"
        );
        assert_eq!(
            e("Resize", json!({"size": 1.5})),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            e("Resize", json!({"size": 9223372036854775808u64})),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            e("Resize", json!({"size": 1, "n": 256})),
            "Parameter 'n' expects uint8_t"
        );
        assert_eq!(
            e("Resize", json!({"size": 1, "l": [1, "x"]})),
            "Invalid parameter type for 'l[1]', expected: integer"
        );
        assert_eq!(
            e("Resize", json!(1)),
            "Invalid parameter type for '<anonymous>', expected: object"
        );
    }

    #[test]
    fn qmp_values_come_back_typed() {
        let s = schema();
        let v = visit(
            &s,
            "Opts",
            json!({"driver": "qcow2", "node-name": "top", "file": "f", "backing": null}),
            false,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"driver": "qcow2", "node-name": "top", "file": "f", "backing": null})
        );
    }

    #[test]
    fn keyval_strings_are_converted_by_type() {
        let s = schema();
        let kv = |t: &str| Value::Object(crate::keyval::parse(t, Some("driver")).unwrap());
        let v = visit(&s, "Opts", kv("file,filename=a,size=1M,read-only=on"), true).unwrap();
        assert_eq!(
            v,
            json!({"driver": "file", "read-only": true, "filename": "a", "size": 1048576})
        );
        let e = |t: &str| visit(&s, "Opts", kv(t), true).unwrap_err();
        assert_eq!(
            e("file,filename=a,read-only=maybe"),
            "Parameter 'read-only' expects 'on' or 'off'"
        );
        assert_eq!(e("file,filename=a,size=x"), "Parameter 'size' expects size");
        assert_eq!(
            e("file,filename.a=1"),
            "Parameters 'filename.*' are unexpected"
        );
        assert_eq!(e("qcow2,file=f,l2=0x"), "Parameter 'l2' expects integer");
        let v = visit(&s, "Opts", kv("qcow2,file=f,l2=0x10"), true).unwrap();
        assert_eq!(v["l2"], 16);
        let r = Value::Object(crate::keyval::parse("size=1,l.0=1,l.1=x", None).unwrap());
        assert_eq!(
            visit(&s, "Resize", r, true).unwrap_err(),
            "Parameter 'l.1' expects integer"
        );
    }
}
