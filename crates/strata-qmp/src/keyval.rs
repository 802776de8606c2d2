//! QEMU's `key=value,a.b=c` syntax of command-line options that are
//! QAPI types (util/keyval.c): dotted keys nest, numeric fragments make
//! lists, `,,` is a literal comma, an implied key names a first bare value,
//! a repeated key replaces the earlier value. Values stay strings; the
//! visitor types them against the schema.

use serde_json::{Map, Value};

/// Length of a QAPI name at the start of `s` (QEMU: parse_qapi_name), 0 if none.
fn qapi_name_len(s: &[u8]) -> usize {
    let mut p = 0;
    if s.first() == Some(&b'_') {
        // A downstream extension: __RFQDN_name.
        if s.get(1) != Some(&b'_') {
            return 0;
        }
        p = 2;
        while p < s.len() && (s[p].is_ascii_alphanumeric() || s[p] == b'-' || s[p] == b'.') {
            p += 1;
        }
        if s.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    if !s.get(p).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    p += 1;
    while p < s.len() && (s[p].is_ascii_alphanumeric() || s[p] == b'-' || s[p] == b'_') {
        p += 1;
    }
    p
}

/// The number a key fragment starts with, and its length, if it is an index.
fn index_of(s: &[u8]) -> Option<(usize, usize)> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    let text = std::str::from_utf8(&s[..n]).ok()?;
    let v = text
        .parse::<u64>()
        .map_or(i32::MAX as usize, |v| v.min(i32::MAX as u64) as usize);
    Some((v, n))
}

fn is_index(key: &str) -> bool {
    index_of(key.as_bytes()).is_some_and(|(_, n)| n == key.len())
}

/// Help asked for with `help` or `?` at the start of an item.
fn help_len(s: &[u8]) -> usize {
    if s.first() == Some(&b'?') {
        1
    } else if s.starts_with(b"help") {
        4
    } else {
        0
    }
}

/// Puts a value (`Some`) or a dictionary (`None`) under `key` of `cur`,
/// failing when the key was used the other way before.
fn put<'a>(
    cur: &'a mut Map<String, Value>,
    key: &str,
    value: Option<String>,
    prefix: &str,
) -> Result<&'a mut Value, String> {
    if let Some(old) = cur.get(key) {
        if old.is_string() != value.is_some() {
            return Err(format!("Parameters '{prefix}.*' used inconsistently"));
        }
    }
    let slot = match value {
        Some(v) => {
            cur.insert(key.to_string(), Value::String(v));
            cur.get_mut(key)
        }
        None => Some(
            cur.entry(key.to_string())
                .or_insert_with(|| Value::Object(Map::new())),
        ),
    };
    slot.ok_or_else(|| "internal error".to_string())
}

/// Parses one `key=value` item starting at `s`; returns the rest.
fn parse_one<'s>(
    root: &mut Map<String, Value>,
    s: &'s str,
    implied: Option<&str>,
    help: &mut bool,
) -> Result<&'s str, String> {
    let b = s.as_bytes();
    let len = b
        .iter()
        .position(|&c| c == b'=' || c == b',')
        .unwrap_or(b.len());
    let mut key: &str = s;
    let mut key_len = len;
    let mut implied_value = None;
    if len > 0 && b.get(len) != Some(&b'=') {
        if help_len(b) == len {
            *help = true;
            let rest = &s[len..];
            return Ok(rest.strip_prefix(',').unwrap_or(rest));
        }
        if let Some(k) = implied {
            key = k;
            key_len = k.len();
            implied_value = Some(&s[..len]);
        }
    }
    let kb = &key.as_bytes()[..key_len];
    // Walk the dotted fragments, creating dictionaries on the way.
    let mut cur = root;
    let mut pos = 0;
    let mut last;
    loop {
        let frag = &kb[pos..];
        let n = match index_of(frag) {
            Some((_, n)) if pos != 0 => n,
            _ => qapi_name_len(frag),
        };
        if n == 0 || (pos + n < key_len && kb[pos + n] != b'.') {
            return Err(format!("Invalid parameter '{}'", &key[..key_len]));
        }
        if n >= 128 {
            let fragment = if pos != 0 || pos + n != key_len {
                " fragment"
            } else {
                ""
            };
            return Err(format!(
                "Parameter{fragment} '{}' is too long",
                &key[pos..pos + n]
            ));
        }
        last = key[pos..pos + n].to_string();
        pos += n;
        if pos >= key_len || kb[pos] != b'.' {
            break;
        }
        let prefix = &key[..pos];
        let next = put(cur, &last, None, prefix)?;
        cur = match next {
            Value::Object(m) => m,
            _ => return Err("internal error".into()),
        };
        pos += 1;
    }
    let (value, rest) = match implied_value {
        Some(v) => {
            let rest = &s[len..];
            (v.to_string(), rest.strip_prefix(',').unwrap_or(rest))
        }
        None => {
            if b.get(pos) != Some(&b'=') {
                return Err(format!("Expected '=' after parameter '{}'", &key[..pos]));
            }
            let mut v = String::new();
            let mut rest = &s[pos + 1..];
            loop {
                let mut chars = rest.chars();
                match chars.next() {
                    None => break,
                    Some(',') => {
                        if chars.as_str().starts_with(',') {
                            v.push(',');
                            rest = &chars.as_str()[1..];
                        } else {
                            rest = chars.as_str();
                            break;
                        }
                    }
                    Some(c) => {
                        v.push(c);
                        rest = chars.as_str();
                    }
                }
            }
            (v, rest)
        }
    };
    put(cur, &last, Some(value), &key[..key_len])?;
    Ok(rest)
}

/// Turns dictionaries whose keys are all indexes into lists.
fn listify(v: &mut Value, path: &mut Vec<String>) -> Result<(), String> {
    let Value::Object(m) = v else {
        return Ok(());
    };
    let (mut has_index, mut has_member) = (false, false);
    for (k, child) in m.iter_mut() {
        if is_index(k) {
            has_index = true;
        } else {
            has_member = true;
        }
        path.push(k.clone());
        listify(child, path)?;
        path.pop();
    }
    let key: String = path.iter().map(|p| format!("{p}.")).collect();
    if has_index && has_member {
        return Err(format!("Parameters '{key}*' used inconsistently"));
    }
    if !has_index {
        return Ok(());
    }
    let n = m.len();
    let mut elts: Vec<Option<Value>> = vec![None; n];
    let mut max = 0;
    for (k, child) in std::mem::take(m) {
        let i = index_of(k.as_bytes()).map_or(usize::MAX, |(i, _)| i);
        max = max.max(i);
        if i < n {
            elts[i] = Some(child);
        }
    }
    let mut list = Vec::new();
    for (i, e) in elts.into_iter().enumerate().take(max.saturating_add(1)) {
        match e {
            Some(e) => list.push(e),
            None => return Err(format!("Parameter '{key}{i}' missing")),
        }
    }
    if max >= n {
        return Err(format!("Parameter '{key}{n}' missing"));
    }
    *v = Value::Array(list);
    Ok(())
}

/// Parses an option string; `implied` names the key of a bare first value.
/// Asking for help is an error here, as for QEMU's options without help.
pub fn parse(s: &str, implied: Option<&str>) -> Result<Map<String, Value>, String> {
    let mut root = Map::new();
    let mut rest = s;
    let mut implied = implied;
    let mut help = false;
    while !rest.is_empty() {
        rest = parse_one(&mut root, rest, implied, &mut help)?;
        implied = None;
    }
    if help {
        return Err("Help is not available for this option".into());
    }
    let mut v = Value::Object(root);
    listify(&mut v, &mut Vec::new())?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err("internal error".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_keys_lists_and_commas() {
        let m = parse(
            "qcow2,file.driver=file,file.filename=a,,b,l.0=x,l.1=y",
            Some("driver"),
        )
        .unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"driver": "qcow2", "file": {"driver": "file", "filename": "a,b"}, "l": ["x", "y"]})
        );
        // A later value replaces an earlier one.
        assert_eq!(parse("a=1,a=2", None).unwrap()["a"], "2");
    }

    #[test]
    fn qemu_error_words() {
        assert_eq!(
            parse("a", None).unwrap_err(),
            "Expected '=' after parameter 'a'"
        );
        assert_eq!(parse("1a=x", None).unwrap_err(), "Invalid parameter '1a'");
        assert_eq!(
            parse("a=1,a.b=2", None).unwrap_err(),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            parse("l.0=1,l.x=2", None).unwrap_err(),
            "Parameters 'l.*' used inconsistently"
        );
        assert_eq!(parse("l.1=1", None).unwrap_err(), "Parameter 'l.0' missing");
        assert_eq!(
            parse("help", Some("driver")).unwrap_err(),
            "Help is not available for this option"
        );
        assert_eq!(parse("", Some("driver")).unwrap(), Map::new());
    }
}
