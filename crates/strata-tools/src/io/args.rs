//! qemu-io's command line: options in any position (GNU permutation), at
//! most one image, and the same messages and exit codes as qemu-io.c.

use super::session::OpenRequest;
use crate::common;
use crate::getopt::{self, Item, LongOpt};
use crate::out;
use strata_block::options::parse_keyval;
use strata_block::report::{error_report, prog_name};

/// Private codes of the long options without a short form.
const OBJECT: char = '\u{100}';
const IMAGE_OPTS: char = '\u{101}';

const SHORT: &str = "hVc:d:f:rsnCmki:t:T:U";

const LONG: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: false,
        val: 'h',
    },
    LongOpt {
        name: "version",
        has_arg: false,
        val: 'V',
    },
    LongOpt {
        name: "cmd",
        has_arg: true,
        val: 'c',
    },
    LongOpt {
        name: "format",
        has_arg: true,
        val: 'f',
    },
    LongOpt {
        name: "read-only",
        has_arg: false,
        val: 'r',
    },
    LongOpt {
        name: "snapshot",
        has_arg: false,
        val: 's',
    },
    LongOpt {
        name: "nocache",
        has_arg: false,
        val: 'n',
    },
    LongOpt {
        name: "copy-on-read",
        has_arg: false,
        val: 'C',
    },
    LongOpt {
        name: "misalign",
        has_arg: false,
        val: 'm',
    },
    LongOpt {
        name: "native-aio",
        has_arg: false,
        val: 'k',
    },
    LongOpt {
        name: "aio",
        has_arg: true,
        val: 'i',
    },
    LongOpt {
        name: "discard",
        has_arg: true,
        val: 'd',
    },
    LongOpt {
        name: "cache",
        has_arg: true,
        val: 't',
    },
    LongOpt {
        name: "trace",
        has_arg: true,
        val: 'T',
    },
    LongOpt {
        name: "object",
        has_arg: true,
        val: OBJECT,
    },
    LongOpt {
        name: "image-opts",
        has_arg: false,
        val: IMAGE_OPTS,
    },
    LongOpt {
        name: "force-share",
        has_arg: false,
        val: 'U',
    },
];

/// What the command line asks for.
pub struct Args {
    /// `-c` commands, in order; when there are none, stdin is read.
    pub commands: Vec<String>,
    /// `--image-opts`: the image is named by an option string.
    pub image_opts: bool,
    /// How to open the image; `name` is None without one.
    pub open: OpenRequest,
    /// The image operand, as given.
    pub image: Option<String>,
}

/// Prints qemu-io's usage text (stdout).
fn usage() {
    let name = prog_name();
    out!(
        "Usage: {name} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{name} -c help' for information on available commands.

{}
",
        common::QEMU_HELP_BOTTOM
    );
}

/// `--object`: secrets and throttle groups are created; other object
/// types are refused by name.
fn object(def: &str) -> Result<(), String> {
    let pairs = parse_keyval(def, Some("qom-type")).map_err(|e| e.to_string())?;
    let ty = pairs
        .iter()
        .find(|(k, _)| k == "qom-type")
        .map(|(_, v)| v.as_str())
        .ok_or("Parameter 'qom-type' is missing")?;
    match ty {
        "secret" => common::secret_object(&pairs),
        "secret_keyring" => Err(format!("object type '{ty}' is not supported")),
        "throttle-group" => common::throttle_group_object(&pairs),
        // Types QEMU's tools create that Strata has no use for yet.
        "tls-creds-anon" | "tls-creds-psk" | "tls-creds-x509" | "tls-cipher-suites"
        | "authz-simple" | "authz-list" | "authz-listfile" | "authz-pam" => {
            Err(format!("object type '{ty}' is not supported"))
        }
        "iothread" => Err(format!("invalid object type: {ty}")),
        _ => Err(format!("Parameter 'qom-type' does not accept value '{ty}'")),
    }
}

/// Reads the command line; `Err` is the exit code to leave with.
pub fn parse(argv: &[String]) -> Result<Args, i32> {
    let prog = argv.first().map(String::as_str).unwrap_or("qemu-io");
    let parsed = getopt::parse(prog, argv.get(1..).unwrap_or(&[]), SHORT, LONG);
    let mut args = Args {
        commands: Vec::new(),
        image_opts: false,
        open: OpenRequest::default(),
        image: None,
    };
    let mut format = None;
    for item in parsed.items {
        match item {
            Item::Opt('s', _) => args.open.snapshot = true,
            Item::Opt('n', _) => args.open.set_nocache(),
            Item::Opt('C', _) => args.open.copy_on_read = true,
            Item::Opt('d', Some(m)) => {
                if !args.open.set_discard(&m) {
                    error_report(format!("Invalid discard option: {m}"));
                    return Err(1);
                }
            }
            Item::Opt('f', Some(f)) => format = Some(f),
            Item::Opt('c', Some(c)) => args.commands.push(c),
            Item::Opt('r', _) => args.open.read_only = true,
            // Buffers are always aligned; misaligning them tests nothing here.
            Item::Opt('m', _) => {}
            Item::Opt('k', _) => args.open.native_aio = true,
            Item::Opt('i', Some(m)) => {
                if !args.open.set_aio(&m) {
                    error_report(format!("Invalid aio option: {m}"));
                    return Err(1);
                }
            }
            Item::Opt('t', Some(m)) => {
                if !args.open.set_cache(&m) {
                    error_report(format!("Invalid cache option: {m}"));
                    return Err(1);
                }
            }
            // Strata has no trace events; the option is accepted for scripts.
            Item::Opt('T', _) => {}
            Item::Opt('V', _) => {
                crate::outln!("{} version {}", prog_name(), common::QEMU_FULL_VERSION);
                crate::outln!("{}", common::QEMU_COPYRIGHT);
                return Err(0);
            }
            Item::Opt('h', _) => {
                usage();
                return Err(0);
            }
            Item::Opt('U', _) => args.open.force_share = true,
            Item::Opt(OBJECT, Some(def)) => {
                if let Err(msg) = object(&def) {
                    error_report(msg);
                    return Err(1);
                }
            }
            Item::Opt(IMAGE_OPTS, _) => args.image_opts = true,
            Item::Opt(_, _) => {}
            Item::Bad(msg) => {
                strata_block::stderr_line!("{msg}");
                usage();
                return Err(1);
            }
        }
    }
    if parsed.operands.len() > 1 {
        usage();
        return Err(1);
    }
    if format.is_some() && args.image_opts {
        error_report("--image-opts and -f are mutually exclusive");
        return Err(1);
    }
    args.image = parsed.operands.into_iter().next();
    if let Some(f) = format {
        args.open
            .opts
            .insert("driver".into(), serde_json::Value::String(f));
    }
    Ok(args)
}
