//! Where an NBD export is, in QEMU's three spellings: the URI forms
//! (`nbd://host:port/export`, `nbd+tcp://…`, `nbd+unix:///export?socket=PATH`),
//! the legacy `nbd:host:port[:exportname=NAME]` and
//! `nbd:unix:PATH[:exportname=NAME]`, and the options
//! (`server.type=inet|unix`, `server.host`, `server.port`, `server.path`,
//! `export`, and the legacy `host`, `port`, `path`); and back to the one
//! file name QEMU shows for a node.

use serde_json::{Map, Value};
use strata_block::options::{take_dict, take_str};
use strata_block::{Error, Opts, Result};
use strata_nbd::client::Addr;

/// The port of a URI without one.
pub const DEFAULT_PORT: &str = "10809";

fn invalid_url() -> Error {
    Error::invalid("No valid URL specified")
}

/// `%XX` escapes undone, as QEMU's URI parser does for the path and query.
fn unescape(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).map_err(|_| invalid_url())?;
            let v = u8::from_str_radix(hex, 16).map_err(|_| invalid_url())?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| invalid_url())
}

fn server(kind: &str, pairs: &[(&str, String)]) -> Value {
    let mut m = Map::new();
    m.insert("type".into(), kind.into());
    for (k, v) in pairs {
        m.insert((*k).into(), v.clone().into());
    }
    Value::Object(m)
}

/// Parses a URI of scheme `nbd`, `nbd+tcp` or `nbd+unix` into options.
fn parse_uri(filename: &str, opts: &mut Opts) -> Result<()> {
    let (scheme, rest) = filename.split_once("://").ok_or_else(invalid_url)?;
    let unix = match scheme {
        "nbd" | "nbd+tcp" => false,
        "nbd+unix" => true,
        _ => return Err(invalid_url()),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let export = unescape(path.strip_prefix('/').unwrap_or(path))?;
    if !export.is_empty() {
        opts.insert("export".into(), export.into());
    }
    if unix {
        // A Unix socket: no host, one distinct parameter, `socket` (a
        // repeated one collapses, the last wins).
        if !authority.is_empty() {
            return Err(invalid_url());
        }
        let mut path = None;
        for pair in query.ok_or_else(invalid_url)?.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if unescape(k)? != "socket" {
                return Err(invalid_url());
            }
            path = Some(unescape(v)?);
        }
        let path = path.ok_or_else(invalid_url)?;
        opts.insert("server".into(), server("unix", &[("path", path)]));
        return Ok(());
    }
    if query.is_some_and(|q| !q.is_empty()) || authority.is_empty() {
        return Err(invalid_url());
    }
    let (host, port) = split_host_port(authority)?;
    if host.is_empty() {
        return Err(invalid_url());
    }
    // No port, or port 0, is the default one.
    let port = match port.map(|p| p.parse::<u16>()) {
        Some(Err(_)) => return Err(invalid_url()),
        Some(Ok(0)) | None => DEFAULT_PORT.to_string(),
        Some(Ok(p)) => p.to_string(),
    };
    opts.insert(
        "server".into(),
        server("inet", &[("host", host.to_string()), ("port", port)]),
    );
    Ok(())
}

/// `host:port`, `[v6]:port` or a host alone.
fn split_host_port(a: &str) -> Result<(&str, Option<&str>)> {
    if let Some(v6) = a.strip_prefix('[') {
        let (host, rest) = v6.split_once(']').ok_or_else(invalid_url)?;
        return match rest.strip_prefix(':') {
            Some(p) => Ok((host, Some(p))),
            None if rest.is_empty() => Ok((host, None)),
            None => Err(invalid_url()),
        };
    }
    Ok(match a.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (a, None),
    })
}

/// The legacy form `nbd:HOST:PORT[:exportname=NAME]` or
/// `nbd:unix:PATH[:exportname=NAME]`.
fn parse_legacy(filename: &str, opts: &mut Opts) -> Result<()> {
    let addr = match filename.find(":exportname=") {
        // Nothing after it: QEMU takes no address at all.
        Some(i) if i + ":exportname=".len() == filename.len() => return Ok(()),
        Some(i) => {
            let export = &filename[i + ":exportname=".len()..];
            opts.insert("export".into(), export.into());
            &filename[..i]
        }
        None => filename,
    };
    let Some(rest) = addr.strip_prefix("nbd:") else {
        return Err(Error::invalid(
            "File name string for NBD must start with 'nbd:'",
        ));
    };
    if rest.is_empty() {
        return Ok(());
    }
    if let Some(path) = rest.strip_prefix("unix:") {
        opts.insert(
            "server".into(),
            server("unix", &[("path", path.to_string())]),
        );
        return Ok(());
    }
    // `,ipv4`, `,to=` and the like are parsed by QEMU and then dropped.
    let core = rest.split(',').next().unwrap_or(rest);
    let (host, port) = if core.starts_with('[') {
        match split_host_port(core) {
            Ok((h, Some(p))) => (h, p),
            _ => {
                return Err(Error::invalid(format!(
                    "error parsing IPv6 address '{rest}'"
                )))
            }
        }
    } else {
        match core.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => return Err(Error::invalid(format!("error parsing address '{rest}'"))),
        }
    };
    opts.insert(
        "server".into(),
        server(
            "inet",
            &[("host", host.to_string()), ("port", port.to_string())],
        ),
    );
    Ok(())
}

/// A file name of the nbd protocols into options (QEMU: nbd_parse_filename).
pub fn parse_filename(filename: &str, opts: &mut Opts) -> Result<()> {
    for k in ["host", "port", "path", "export", "server"] {
        if let Some(v) = opts.get(k) {
            let key = match v {
                Value::Object(m) => format!("server.{}", m.keys().next().map_or("", |k| k)),
                _ => k.to_string(),
            };
            return Err(Error::invalid(format!(
                "Option '{key}' cannot be used with a file name"
            )));
        }
    }
    if filename.contains("://") {
        parse_uri(filename, opts)
    } else {
        parse_legacy(filename, opts)
    }
}

fn missing() -> Error {
    Error::invalid("NBD server address missing")
}

/// The server address and export from the options (removed from `opts`).
pub fn take_address(opts: &mut Opts) -> Result<(Addr, String)> {
    let legacy_path = take_str(opts, "path")?;
    let legacy_host = take_str(opts, "host")?;
    let legacy_port = take_str(opts, "port")?;
    let server = take_dict(opts, "server")?;
    let export = take_str(opts, "export")?.unwrap_or_default();
    let legacy = legacy_path.is_some() || legacy_host.is_some() || legacy_port.is_some();
    if legacy && server.is_some() {
        return Err(Error::invalid(
            "Cannot use 'server' and path/host/port at the same time",
        ));
    }
    if legacy {
        if legacy_path.is_some() && legacy_host.is_some() {
            return Err(Error::invalid(
                "path and host may not be used at the same time",
            ));
        }
        if legacy_path.is_some() && legacy_port.is_some() {
            return Err(Error::invalid("port may not be used without host"));
        }
        // A port alone is ignored, as QEMU ignores it.
        let addr = match (legacy_path, legacy_host) {
            (Some(p), _) => Some(Addr::Unix(p)),
            (None, Some(host)) => Some(Addr::Tcp {
                host,
                port: legacy_port.unwrap_or_else(|| DEFAULT_PORT.into()),
            }),
            (None, None) => None,
        };
        return addr.map(|a| (a, export)).ok_or_else(missing);
    }
    let Some(mut s) = server else {
        return Err(missing());
    };
    let kind =
        take_str(&mut s, "type")?.ok_or_else(|| Error::invalid("Parameter 'type' is missing"))?;
    let addr = match kind.as_str() {
        "unix" => {
            let path = take_str(&mut s, "path")?
                .ok_or_else(|| Error::invalid("Parameter 'path' is missing"))?;
            let _ = take_str(&mut s, "abstract")?;
            let _ = take_str(&mut s, "tight")?;
            Addr::Unix(path)
        }
        "inet" => {
            let host = take_str(&mut s, "host")?
                .ok_or_else(|| Error::invalid("Parameter 'host' is missing"))?;
            let port = take_str(&mut s, "port")?
                .ok_or_else(|| Error::invalid("Parameter 'port' is missing"))?;
            for k in ["numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp"] {
                let _ = take_str(&mut s, k)?;
            }
            Addr::Tcp { host, port }
        }
        other => {
            return Err(Error::invalid(format!(
                "Parameter 'server.type' does not accept value '{other}'"
            )))
        }
    };
    if let Some(k) = s.keys().next() {
        return Err(Error::invalid(format!("Invalid parameter 'server.{k}'")));
    }
    Ok((addr, export))
}

/// The file name QEMU shows for a node (nbd_refresh_filename): a URI for
/// a plain address, empty (so `json:{…}`) otherwise.
pub fn exact_filename(full: &Opts) -> String {
    let get = |k: &str| full.get(k).and_then(Value::as_str);
    let export = get("export");
    let plain = full.keys().all(|k| {
        matches!(
            k.as_str(),
            "driver"
                | "filename"
                | "export"
                | "server.type"
                | "server.path"
                | "server.host"
                | "server.port"
        )
    });
    if !plain {
        return String::new();
    }
    match (
        get("server.type"),
        get("server.path"),
        get("server.host"),
        get("server.port"),
    ) {
        (Some("unix"), Some(path), _, _) => match export {
            Some(e) => format!("nbd+unix:///{e}?socket={path}"),
            None => format!("nbd+unix://?socket={path}"),
        },
        (Some("inet"), _, Some(host), Some(port)) => match export {
            Some(e) => format!("nbd://{host}:{port}/{e}"),
            None => format!("nbd://{host}:{port}"),
        },
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(f: &str) -> Result<Opts> {
        let mut o = Opts::new();
        parse_filename(f, &mut o)?;
        Ok(o)
    }

    fn addr(f: &str) -> (Addr, String) {
        take_address(&mut parsed(f).unwrap()).unwrap()
    }

    #[test]
    fn uris_and_legacy_names_give_addresses() {
        let tcp = |h: &str, p: &str| Addr::Tcp {
            host: h.into(),
            port: p.into(),
        };
        assert_eq!(
            addr("nbd://localhost"),
            (tcp("localhost", "10809"), "".into())
        );
        assert_eq!(addr("nbd+tcp://h:1/a%20b"), (tcp("h", "1"), "a b".into()));
        assert_eq!(addr("nbd://[::1]:7/x/y"), (tcp("::1", "7"), "x/y".into()));
        assert_eq!(
            addr("nbd+unix:///e?socket=/tmp/s"),
            (Addr::Unix("/tmp/s".into()), "e".into())
        );
        assert_eq!(addr("nbd:h:99"), (tcp("h", "99"), "".into()));
        assert_eq!(
            addr("nbd:unix:/s:exportname=e"),
            (Addr::Unix("/s".into()), "e".into())
        );
    }

    #[test]
    fn bad_uris_are_refused_as_qemu_refuses_them() {
        for f in [
            "nbd+unix:///e",
            "nbd+unix:///e?socket=/s&x=1",
            "nbd://h:1/?a=b",
            "nbd://h:notaport",
            "nbd+ssh://h",
        ] {
            let e = parsed(f).unwrap_err();
            assert_eq!(e.message(), Some("No valid URL specified"), "{f}");
        }
    }

    #[test]
    fn the_shown_name_is_the_uri() {
        let mut full = Opts::new();
        full.insert("driver".into(), "nbd".into());
        full.insert("server.type".into(), "unix".into());
        full.insert("server.path".into(), "/s".into());
        assert_eq!(exact_filename(&full), "nbd+unix://?socket=/s");
        full.insert("export".into(), "e".into());
        assert_eq!(exact_filename(&full), "nbd+unix:///e?socket=/s");
        full.insert("tls-creds".into(), "t".into());
        assert_eq!(exact_filename(&full), "");
    }
}
