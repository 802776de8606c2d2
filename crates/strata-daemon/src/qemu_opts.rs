//! QEMU's older option syntax, QemuOpts (util/qemu-option.c), which
//! `--chardev` still uses: `backend,key=value`, an implied first key,
//! `,,` for a comma, bare `flag` / `noflag` booleans (deprecated, with a
//! warning), `id=` taken out, and every key checked against a list.

/// The type of an option's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Number,
    Size,
}

/// Options parsed from one string.
#[derive(Clone, Debug, Default)]
pub struct QemuOpts {
    /// The `id=` value.
    pub id: Option<String>,
    /// The other options in order, booleans already as `on`/`off`.
    pub opts: Vec<(String, String)>,
    /// Warnings to print (short-form booleans).
    pub warnings: Vec<String>,
}

impl QemuOpts {
    /// The last value given for `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean option (already checked), or `default`.
    pub fn get_bool(&self, name: &str, default: bool) -> bool {
        self.get(name)
            .map_or(default, |v| parse_bool(v) == Some(true))
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// A value up to the next single comma, `,,` standing for a comma.
fn value_at(s: &str) -> (String, &str) {
    let mut v = String::new();
    let mut rest = s;
    loop {
        let mut chars = rest.chars();
        match chars.next() {
            None => return (v, ""),
            Some(',') if chars.as_str().starts_with(',') => {
                v.push(',');
                rest = &chars.as_str()[1..];
            }
            Some(',') => return (v, rest),
            Some(c) => {
                v.push(c);
                rest = chars.as_str();
            }
        }
    }
}

/// One item: its name, its value, whether it was a bare flag (and the
/// `no` prefix it had), and the rest of the string.
fn name_value<'s>(
    s: &'s str,
    first: Option<&str>,
) -> (String, String, Option<&'static str>, &'s str) {
    let len = s.find(['=', ',']).unwrap_or(s.len());
    let (name, value, flag, rest) = if s.as_bytes().get(len) != Some(&b'=') {
        match first {
            Some(f) => {
                let (v, rest) = value_at(s);
                (f.to_string(), v, None, rest)
            }
            None => {
                let (n, rest) = (s[..len].to_string(), &s[len..]);
                match n.strip_prefix("no") {
                    Some(stripped) => (stripped.to_string(), "off".to_string(), Some("no"), rest),
                    None => (n, "on".to_string(), Some(""), rest),
                }
            }
        }
    } else {
        let (v, rest) = value_at(&s[len + 1..]);
        (s[..len].to_string(), v, None, rest)
    };
    (name, value, flag, rest.strip_prefix(',').unwrap_or(rest))
}

fn is_help(name: &str) -> bool {
    name == "help" || name == "?"
}

/// Parses `params` against the keys `known` (name and kind); `implied`
/// names a bare first value. `Err` is QEMU's message; a hint may follow on
/// a second line.
pub fn parse(params: &str, implied: &str, known: &[(&str, Kind)]) -> Result<QemuOpts, String> {
    let mut out = QemuOpts::default();
    // The id is looked for first, anywhere in the string.
    let mut rest = params;
    while !rest.is_empty() {
        let (n, v, _, r) = name_value(rest, None);
        rest = r;
        if n == "id" {
            out.id = Some(v);
            break;
        }
    }
    if let Some(id) = &out.id {
        if !strata_block::graph::id_wellformed(id) {
            return Err("Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.".into());
        }
    }
    let mut rest = params;
    let mut first = Some(implied);
    while !rest.is_empty() {
        let (name, value, flag, r) = name_value(rest, first);
        rest = r;
        first = None;
        if let Some(prefix) = flag {
            if !is_help(&name) {
                let hint = if name == "delay" {
                    format!("nodelay={}", if prefix.is_empty() { "off" } else { "on" })
                } else {
                    format!("{name}={value}")
                };
                out.warnings.push(format!(
                    "short-form boolean option '{prefix}{name}' deprecated\nPlease use {hint} instead"
                ));
            }
        }
        if name == "id" {
            continue;
        }
        let Some((_, kind)) = known.iter().find(|(k, _)| *k == name) else {
            return Err(format!("Invalid parameter '{name}'"));
        };
        match kind {
            Kind::Bool if parse_bool(&value).is_none() => {
                return Err(format!("Parameter '{name}' expects 'on' or 'off'"))
            }
            Kind::Number if value.parse::<u64>().is_err() => {
                return Err(format!("Parameter '{name}' expects a number"))
            }
            Kind::Size if strata_block::options::parse_size(&value, 1).is_err() => {
                return Err(format!(
                    "Parameter '{name}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
                ))
            }
            _ => {}
        }
        out.opts.push((name, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[(&str, Kind)] = &[
        ("backend", Kind::Str),
        ("path", Kind::Str),
        ("server", Kind::Bool),
        ("wait", Kind::Bool),
    ];

    #[test]
    fn implied_backend_id_flags_and_commas() {
        let o = parse("socket,id=c0,path=/a,,b,server,nowait", "backend", KNOWN).unwrap();
        assert_eq!(o.id.as_deref(), Some("c0"));
        assert_eq!(o.get("backend"), Some("socket"));
        assert_eq!(o.get("path"), Some("/a,b"));
        assert!(o.get_bool("server", false));
        assert!(!o.get_bool("wait", true));
        assert_eq!(
            o.warnings,
            [
                "short-form boolean option 'server' deprecated\nPlease use server=on instead",
                "short-form boolean option 'nowait' deprecated\nPlease use wait=off instead"
            ]
        );
    }

    #[test]
    fn qemu_error_words() {
        assert_eq!(
            parse("socket,bogus=1", "backend", KNOWN).unwrap_err(),
            "Invalid parameter 'bogus'"
        );
        assert_eq!(
            parse("socket,wait=maybe", "backend", KNOWN).unwrap_err(),
            "Parameter 'wait' expects 'on' or 'off'"
        );
        assert!(parse("socket,id=1c", "backend", KNOWN)
            .unwrap_err()
            .starts_with("Parameter 'id' expects an identifier\n"));
    }
}
