//! GNU getopt_long as glibc does it, for the command line and for every
//! qemu-io command: clustered short options (`-pP 0xa`), options after
//! operands (argument permutation), `--` ends the options, long options
//! with `=value` or a separate value, and unique prefixes (`--read`).
//!
//! Items come back in command-line order and an error is one item among
//! them, so a caller that stops at its first failing option prints exactly
//! what the C tool prints (it never reaches later bad options either).

/// A long option: its name, whether it takes an argument, and the short
/// option (or private code) it stands for.
#[derive(Clone, Copy, Debug)]
pub struct LongOpt {
    /// Name without the leading `--`.
    pub name: &'static str,
    /// Takes a required argument.
    pub has_arg: bool,
    /// What the option reports as, like getopt_long's `val`.
    pub val: char,
}

/// One result of parsing, in command-line order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// An option (short, or the `val` of a long one) and its argument.
    Opt(char, Option<String>),
    /// glibc's complaint about a bad option, already worded
    /// (`prog: invalid option -- 'X'`); getopt returned '?'.
    Bad(String),
}

/// The options found and the operands, in their original order.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    /// Options and errors in the order they appeared.
    pub items: Vec<Item>,
    /// For each item, the arguments it came from (indexes into `args`), as
    /// QEMU names an option in its error messages.
    pub spans: Vec<std::ops::Range<usize>>,
    /// Non-option arguments, in order.
    pub operands: Vec<String>,
}

/// What getopt returns for an operand when `short` starts with `-`
/// (glibc's RETURN_IN_ORDER: the value 1, the operand as its argument).
pub const OPERAND: char = '\u{1}';

/// Parses `args` (without argv[0]); `prog` names the program in errors.
/// `short` is a getopt option string (`"c:f:r"`: a colon marks an argument);
/// a leading `-` returns operands in order as [`OPERAND`] items.
pub fn parse(prog: &str, args: &[String], short: &str, long: &[LongOpt]) -> Parsed {
    let mut out = Parsed::default();
    let in_order = short.starts_with('-');
    let mut i = 0;
    while i < args.len() {
        let start = i;
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            out.operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = arg.strip_prefix("--") {
            out.items.push(long_opt(prog, body, args, &mut i, long));
        } else if arg.len() > 1 && arg.starts_with('-') {
            short_cluster(prog, &arg[1..], args, &mut i, short, &mut out.items);
        } else if in_order {
            out.items.push(Item::Opt(OPERAND, Some(arg.clone())));
        } else {
            out.operands.push(arg.clone());
        }
        out.spans.resize(out.items.len(), start..i);
    }
    out
}

/// Whether `c` is an option of `short`, and whether it takes an argument.
fn short_spec(short: &str, c: char) -> Option<bool> {
    if c == ':' || c == '-' {
        return None;
    }
    let pos = short.find(c)?;
    Some(short[pos + c.len_utf8()..].starts_with(':'))
}

fn short_cluster(
    prog: &str,
    cluster: &str,
    args: &[String],
    i: &mut usize,
    short: &str,
    items: &mut Vec<Item>,
) {
    for (pos, c) in cluster.char_indices() {
        match short_spec(short, c) {
            None => items.push(Item::Bad(format!("{prog}: invalid option -- '{c}'"))),
            Some(false) => items.push(Item::Opt(c, None)),
            Some(true) => {
                let rest = &cluster[pos + c.len_utf8()..];
                if !rest.is_empty() {
                    items.push(Item::Opt(c, Some(rest.to_string())));
                } else if let Some(next) = args.get(*i) {
                    *i += 1;
                    items.push(Item::Opt(c, Some(next.clone())));
                } else {
                    items.push(Item::Bad(format!(
                        "{prog}: option requires an argument -- '{c}'"
                    )));
                }
                return;
            }
        }
    }
}

fn long_opt(prog: &str, body: &str, args: &[String], i: &mut usize, long: &[LongOpt]) -> Item {
    let (name, value) = match body.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (body, None),
    };
    let opt = match long.iter().find(|o| o.name == name) {
        Some(o) => *o,
        None => {
            let matches: Vec<&LongOpt> = long.iter().filter(|o| o.name.starts_with(name)).collect();
            match matches.as_slice() {
                // glibc quotes the option as given, `=value` included.
                [] => return Item::Bad(format!("{prog}: unrecognized option '--{body}'")),
                [one] => **one,
                many => {
                    let list: String = many.iter().map(|o| format!(" '--{}'", o.name)).collect();
                    return Item::Bad(format!(
                        "{prog}: option '--{body}' is ambiguous; possibilities:{list}"
                    ));
                }
            }
        }
    };
    match (opt.has_arg, value) {
        (false, Some(_)) => Item::Bad(format!(
            "{prog}: option '--{}' doesn't allow an argument",
            opt.name
        )),
        (false, None) => Item::Opt(opt.val, None),
        (true, Some(v)) => Item::Opt(opt.val, Some(v)),
        (true, None) => match args.get(*i) {
            Some(next) => {
                *i += 1;
                Item::Opt(opt.val, Some(next.clone()))
            }
            None => Item::Bad(format!(
                "{prog}: option '--{}' requires an argument",
                opt.name
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn clusters_and_permutation() {
        let p = parse(
            "read",
            &v(&["0", "-pP", "0xa", "512", "-v"]),
            "bCl:pP:qrs:v",
            &[],
        );
        assert_eq!(
            p.items,
            vec![
                Item::Opt('p', None),
                Item::Opt('P', Some("0xa".into())),
                Item::Opt('v', None)
            ]
        );
        assert_eq!(p.operands, v(&["0", "512"]));
    }

    #[test]
    fn errors_are_worded_like_glibc() {
        let p = parse("read", &v(&["-X", "-P"]), "P:", &[]);
        assert_eq!(
            p.items,
            vec![
                Item::Bad("read: invalid option -- 'X'".into()),
                Item::Bad("read: option requires an argument -- 'P'".into())
            ]
        );
    }

    #[test]
    fn long_prefixes() {
        let long = [
            LongOpt {
                name: "cmd",
                has_arg: true,
                val: 'c',
            },
            LongOpt {
                name: "copy-on-read",
                has_arg: false,
                val: 'C',
            },
            LongOpt {
                name: "cache",
                has_arg: true,
                val: 't',
            },
            LongOpt {
                name: "read-only",
                has_arg: false,
                val: 'r',
            },
        ];
        let p = parse(
            "q",
            &v(&["--read", "--cache=none", "--cmd", "x", "--c"]),
            "",
            &long,
        );
        assert_eq!(
            p.items,
            vec![
                Item::Opt('r', None),
                Item::Opt('t', Some("none".into())),
                Item::Opt('c', Some("x".into())),
                Item::Bad(
                    "q: option '--c' is ambiguous; possibilities: '--cmd' '--copy-on-read' '--cache'"
                        .into()
                )
            ]
        );
    }

    #[test]
    fn operands_in_order_with_spans() {
        let long = [LongOpt {
            name: "blockdev",
            has_arg: true,
            val: 'b',
        }];
        let p = parse(
            "q",
            &v(&["--blockdev", "x", "pos", "--blockdev=y"]),
            "-h",
            &long,
        );
        assert_eq!(
            p.items,
            vec![
                Item::Opt('b', Some("x".into())),
                Item::Opt(OPERAND, Some("pos".into())),
                Item::Opt('b', Some("y".into()))
            ]
        );
        assert_eq!(p.spans, vec![0..2, 2..3, 3..4]);
    }

    #[test]
    fn double_dash_ends_options() {
        let p = parse("read", &v(&["--", "-1", "2"]), "v", &[]);
        assert!(p.items.is_empty());
        assert_eq!(p.operands, v(&["-1", "2"]));
    }
}
