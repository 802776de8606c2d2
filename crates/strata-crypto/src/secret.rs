//! Secrets (QEMU: crypto/secret.c): `--object secret,id=ID,data=...` or
//! `file=...`, optionally `format=base64`, kept by id for the process, as
//! QEMU's object tree keeps them, and looked up by the formats that need one.

use crate::{Error, Result};
use base64::Engine;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

fn store() -> &'static Mutex<HashMap<String, Vec<u8>>> {
    static STORE: OnceLock<Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    STORE.get_or_init(Default::default)
}

/// Defines a secret from an object's properties (`id`, `data` or `file`,
/// `format`); `keyid`/`iv` (secrets encrypted by another) are refused.
pub fn define(props: &[(String, String)]) -> Result<()> {
    let get = |k: &str| props.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let id = get("id").ok_or_else(|| Error::new("Parameter 'id' is missing"))?;
    if get("keyid").is_some() || get("iv").is_some() {
        return Err(Error::new("Encrypted secrets are not supported by Strata"));
    }
    let raw = match (get("data"), get("file")) {
        (Some(_), Some(_)) => return Err(Error::new("'data' and 'file' are mutually exclusive")),
        (Some(d), None) => d.as_bytes().to_vec(),
        (None, Some(f)) => std::fs::read(f).map_err(|e| {
            Error::new(format!(
                "Unable to read {f}: {}",
                e.to_string().split(" (os error").next().unwrap_or_default()
            ))
        })?,
        (None, None) => return Err(Error::new("Either 'file' or 'data' must be provided")),
    };
    let value = match get("format").unwrap_or("raw") {
        "raw" => raw,
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(raw.trim_ascii())
            .map_err(|e| Error::new(format!("Unable to decode base64 data: {e}")))?,
        other => {
            return Err(Error::new(format!(
                "Parameter 'format' does not accept value '{other}'"
            )))
        }
    };
    let mut s = store().lock().unwrap_or_else(|p| p.into_inner());
    if s.contains_key(id) {
        return Err(Error::new(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    s.insert(id.to_string(), value);
    Ok(())
}

/// Removes a secret (QMP object-del); false if there was none.
pub fn remove(id: &str) -> bool {
    store()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(id)
        .is_some()
}

/// The secret's bytes (QEMU: qcrypto_secret_lookup).
pub fn lookup(id: &str) -> Result<Vec<u8>> {
    let s = store().lock().unwrap_or_else(|p| p.into_inner());
    let v = s
        .get(id)
        .ok_or_else(|| Error::new(format!("No secret with id '{id}'")))?;
    if v.is_empty() {
        return Err(Error::new(format!("Secret with id '{id}' has no data")));
    }
    Ok(v.clone())
}

/// The secret as a password (QEMU: qcrypto_secret_lookup_as_utf8).
pub fn lookup_utf8(id: &str) -> Result<String> {
    String::from_utf8(lookup(id)?)
        .map_err(|_| Error::new(format!("Data from secret {id} is not valid UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn raw_and_base64_secrets_are_found_by_id() {
        define(&props(&[("id", "t-raw"), ("data", "hunter2")])).unwrap();
        define(&props(&[
            ("id", "t-b64"),
            ("data", "aHVudGVyMg=="),
            ("format", "base64"),
        ]))
        .unwrap();
        assert_eq!(lookup_utf8("t-raw").unwrap(), "hunter2");
        assert_eq!(lookup_utf8("t-b64").unwrap(), "hunter2");
        assert_eq!(
            lookup("t-none").unwrap_err().0,
            "No secret with id 't-none'"
        );
        assert!(define(&props(&[("id", "t-raw"), ("data", "x")])).is_err());
        assert!(define(&props(&[("id", "t-nodata")])).is_err());
    }
}
