//! GNU getopt_long as QEMU's tools use it: options and operands in any order
//! (permutation), `--` ends options, clustered short options, `-fqcow2` and
//! `-f qcow2`, `--output=json` and `--output json`; errors in glibc's words.

/// One option a command accepts.
#[derive(Clone, Copy, Debug)]
pub struct Opt {
    /// The short letter, if any.
    pub short: Option<char>,
    /// The long name, if any.
    pub long: Option<&'static str>,
    /// True when the option takes an argument.
    pub arg: bool,
}

/// Shorthand for an option with a short letter and maybe a long name.
pub const fn opt(short: char, long: Option<&'static str>, arg: bool) -> Opt {
    Opt {
        short: Some(short),
        long,
        arg,
    }
}

/// Shorthand for a long-only option.
pub const fn long(name: &'static str, arg: bool) -> Opt {
    Opt {
        short: None,
        long: Some(name),
        arg,
    }
}

/// What the parser found: options (by index into the table) with their
/// arguments, in order, and the operands.
#[derive(Debug, Default)]
pub struct Parsed {
    /// (index in the option table, argument).
    pub opts: Vec<(usize, Option<String>)>,
    /// Operands, in order.
    pub operands: Vec<String>,
}

/// Parses `args` (without the program name); `prog` prefixes error
/// messages as glibc prints them (`prog: invalid option -- 'x'`).
pub fn parse(args: &[String], table: &[Opt], prog: &str) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            p.operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = a.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let exact = table.iter().position(|o| o.long == Some(name));
            let idx = match exact {
                Some(x) => x,
                None => {
                    let cands: Vec<usize> = (0..table.len())
                        .filter(|&k| table[k].long.is_some_and(|l| l.starts_with(name)))
                        .collect();
                    match cands.as_slice() {
                        [one] => *one,
                        [] => return Err(format!("{prog}: unrecognized option '--{name}'")),
                        _ => return Err(format!("{prog}: option '--{name}' is ambiguous")),
                    }
                }
            };
            let o = table[idx];
            let full = o.long.unwrap_or(name);
            if o.arg {
                let v = match inline {
                    Some(v) => v,
                    None if i < args.len() => {
                        i += 1;
                        args[i - 1].clone()
                    }
                    None => return Err(format!("{prog}: option '--{full}' requires an argument")),
                };
                p.opts.push((idx, Some(v)));
            } else {
                if inline.is_some() {
                    return Err(format!(
                        "{prog}: option '--{full}' doesn't allow an argument"
                    ));
                }
                p.opts.push((idx, None));
            }
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut k = 0;
            while k < chars.len() {
                let c = chars[k];
                k += 1;
                let Some(idx) = table.iter().position(|o| o.short == Some(c)) else {
                    return Err(format!("{prog}: invalid option -- '{c}'"));
                };
                if table[idx].arg {
                    let rest: String = chars[k..].iter().collect();
                    let v = if !rest.is_empty() {
                        rest
                    } else if i < args.len() {
                        i += 1;
                        args[i - 1].clone()
                    } else {
                        return Err(format!("{prog}: option requires an argument -- '{c}'"));
                    };
                    p.opts.push((idx, Some(v)));
                    break;
                }
                p.opts.push((idx, None));
            }
            continue;
        }
        p.operands.push(a.clone());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    const T: &[Opt] = &[
        opt('f', None, true),
        opt('q', None, false),
        long("output", true),
        opt('U', Some("force-share"), false),
    ];

    #[test]
    fn permutation_and_forms() {
        let p = parse(
            &s(&["img", "-fqcow2", "-q", "--output=json", "-U", "x"]),
            T,
            "p",
        )
        .unwrap();
        assert_eq!(p.operands, ["img", "x"]);
        assert_eq!(p.opts[0], (0, Some("qcow2".into())));
        assert_eq!(p.opts[2], (2, Some("json".into())));
        let p = parse(&s(&["-qf", "raw", "--force", "--", "-q"]), T, "p").unwrap();
        assert_eq!(p.opts.len(), 3);
        assert_eq!(p.operands, ["-q"]);
    }

    #[test]
    fn errors_in_glibc_words() {
        assert_eq!(
            parse(&s(&["-x"]), T, "p").unwrap_err(),
            "p: invalid option -- 'x'"
        );
        assert_eq!(
            parse(&s(&["-f"]), T, "p").unwrap_err(),
            "p: option requires an argument -- 'f'"
        );
        assert_eq!(
            parse(&s(&["--bogus"]), T, "p").unwrap_err(),
            "p: unrecognized option '--bogus'"
        );
    }
}
