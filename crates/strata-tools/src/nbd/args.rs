//! qemu-nbd's command line: its options, defaults and messages.

use crate::common;
use crate::getopt::{self, Item, LongOpt};
use crate::io::OpenRequest;
use strata_block::report::{error_report, prog_name};

const OBJECT: char = '\u{100}';
const IMAGE_OPTS: char = '\u{101}';
const CACHE: char = '\u{102}';
const AIO: char = '\u{103}';
const DISCARD: char = '\u{104}';
const DETECT_ZEROES: char = '\u{105}';
const FORK: char = '\u{106}';
const PID_FILE: char = '\u{107}';
const HANDSHAKE_LIMIT: char = '\u{108}';
const TLS: char = '\u{109}';

const SHORT: &str = "cd:b:o:p:rsnc:dvk:e:f:tl:x:T:D:AB:LhV";

const fn opt(name: &'static str, has_arg: bool, val: char) -> LongOpt {
    LongOpt { name, has_arg, val }
}

const LONG: &[LongOpt] = &[
    opt("help", false, 'h'),
    opt("version", false, 'V'),
    opt("bind", true, 'b'),
    opt("port", true, 'p'),
    opt("socket", true, 'k'),
    opt("offset", true, 'o'),
    opt("read-only", false, 'r'),
    opt("allocation-depth", false, 'A'),
    opt("bitmap", true, 'B'),
    opt("connect", true, 'c'),
    opt("disconnect", false, 'd'),
    opt("list", false, 'L'),
    opt("snapshot", false, 's'),
    opt("load-snapshot", true, 'l'),
    opt("nocache", false, 'n'),
    opt("cache", true, CACHE),
    opt("aio", true, AIO),
    opt("discard", true, DISCARD),
    opt("detect-zeroes", true, DETECT_ZEROES),
    opt("shared", true, 'e'),
    opt("format", true, 'f'),
    opt("persistent", false, 't'),
    opt("verbose", false, 'v'),
    opt("object", true, OBJECT),
    opt("export-name", true, 'x'),
    opt("description", true, 'D'),
    opt("tls-creds", true, TLS),
    opt("tls-authz", true, TLS),
    opt("tls-hostname", true, TLS),
    opt("image-opts", false, IMAGE_OPTS),
    opt("trace", true, 'T'),
    opt("fork", false, FORK),
    opt("pid-file", true, PID_FILE),
    opt("handshake-limit", true, HANDSHAKE_LIMIT),
];

/// What the command line asks for.
pub struct Args {
    pub image: String,
    pub image_opts: bool,
    pub open: OpenRequest,
    pub bind: String,
    pub port: u16,
    pub socket: Option<String>,
    pub export_name: String,
    pub description: Option<String>,
    pub shared: usize,
    pub persistent: bool,
    pub verbose: bool,
    pub allocation_depth: bool,
    pub bitmaps: Vec<String>,
    pub fork: bool,
    pub pid_file: Option<String>,
    pub handshake_limit: u64,
    pub detect_zeroes: Option<String>,
    /// `-L`: list another server's exports instead of serving.
    pub list: bool,
    /// `-o`: the export starts this far into the image (a raw node over it).
    pub offset: u64,
    /// `-l`: an internal snapshot served (read-only) instead of the disk.
    pub snapshot: Option<strata_block::snapshot::SnapshotSel>,
}

fn usage_hint() {
    strata_block::stderr_line!("Try `{} --help' for more information.", common::argv0());
}

fn usage() {
    crate::outln!(
        "Usage: {0} [OPTIONS] FILE\n  or:  {0} -L [OPTIONS]\n\
QEMU Disk Network Block Device Utility\n\n\
  -h, --help                display this help and exit\n\
  -V, --version             output version information and exit\n\n\
Connection properties:\n\
  -p, --port=PORT           port to listen on (default `10809')\n\
  -b, --bind=IFACE          interface to bind to (default `0.0.0.0')\n\
  -k, --socket=PATH         path to the unix socket\n\
  -e, --shared=NUM          device can be shared by NUM clients (default '1')\n\
  -t, --persistent          don't exit on the last connection\n\
  -v, --verbose             display extra debugging information\n\
  -x, --export-name=NAME    expose export by name (default is empty string)\n\
  -D, --description=TEXT    export a human-readable description\n\
      --handshake-limit=N   limit client's handshake to N seconds (default 10)\n\n\
Exposing part of the image:\n\
  -A, --allocation-depth    expose the allocation depth\n\
  -B, --bitmap=NAME         expose a persistent dirty bitmap\n\n\
General purpose options:\n\
  --object type,id=ID,...   define an object such as 'secret' for providing\n\
                            passwords and/or encryption keys\n\
  --fork                    fork off the server process and exit the parent\n\
                            once the server is running\n\
  --pid-file=PATH           store the server's process ID in the given file\n\n\
Block device options:\n\
  -f, --format=FORMAT       set image format (raw, qcow2, ...)\n\
  -r, --read-only           export read-only\n\
  -s, --snapshot            use FILE as an external snapshot, create a temporary\n\
                            file with backing_file=FILE, redirect the write to\n\
                            the temporary one\n\
  -n, --nocache             disable host cache\n\
      --cache=MODE          set cache mode used to access the disk image, the\n\
                            valid options are: 'none', 'writeback' (default),\n\
                            'writethrough', 'directsync' and 'unsafe'\n\
      --aio=MODE            set AIO mode (native, io_uring or threads)\n\
      --discard=MODE        set discard mode (ignore, unmap)\n\
      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)\n\
      --image-opts          treat FILE as a full set of image options\n\n{1}",
        prog_name(),
        common::QEMU_HELP_BOTTOM
    );
}

/// Parses the command line; `Err` is the exit code (after the message).
pub fn parse(argv: &[String]) -> Result<Args, i32> {
    let parsed = getopt::parse(prog_name(), &argv[1..], SHORT, LONG);
    // qemu-nbd's defaults: cache=writeback, discard=ignore.
    let open = OpenRequest {
        cache: strata_block::CacheMode::parse("writeback").map_err(|_| 1)?,
        unmap: false,
        ..Default::default()
    };
    let mut a = Args {
        image: String::new(),
        image_opts: false,
        open,
        bind: "0.0.0.0".into(),
        port: 10809,
        socket: None,
        export_name: String::new(),
        description: None,
        shared: 1,
        persistent: false,
        verbose: false,
        allocation_depth: false,
        bitmaps: Vec::new(),
        fork: false,
        pid_file: None,
        handshake_limit: 10,
        detect_zeroes: None,
        list: false,
        snapshot: None,
        offset: 0,
    };
    let mut format = None;
    let mut port_given = false;
    // Options that make no sense with -L (qemu-nbd's per-device settings).
    let mut per_device = false;
    for item in parsed.items {
        if let Item::Opt('x' | 'D' | 'f' | 'B' | 'A' | CACHE | AIO | DISCARD | 'n', _) = item {
            per_device = true;
        }
        match item {
            Item::Opt('h', _) => {
                usage();
                return Err(0);
            }
            Item::Opt('V', _) => {
                crate::outln!("{} {}", prog_name(), common::QEMU_FULL_VERSION);
                crate::outln!("Written by Anthony Liguori.\n");
                crate::outln!("{}", common::QEMU_COPYRIGHT);
                crate::outln!("This is free software; see the source for copying conditions.  There is NO\nwarranty; not even for MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.");
                return Err(0);
            }
            Item::Opt('b', Some(v)) => a.bind = v,
            Item::Opt('p', Some(v)) => match v.parse::<u16>() {
                Ok(p) => {
                    a.port = p;
                    port_given = true;
                }
                Err(_) => {
                    error_report(format!("Invalid port '{v}'"));
                    return Err(1);
                }
            },
            Item::Opt('k', Some(v)) => {
                if v.len() >= 108 {
                    error_report(format!(
                        "socket path too long ({}), maximum is 107",
                        v.len()
                    ));
                    return Err(1);
                }
                a.socket = Some(v);
            }
            Item::Opt('r', _) => a.open.read_only = true,
            Item::Opt('s', _) => a.open.snapshot = true,
            Item::Opt('n', _) => a.open.set_nocache(),
            Item::Opt(CACHE, Some(v)) => {
                if !a.open.set_cache(&v) {
                    error_report(format!("Invalid cache mode '{v}'"));
                    return Err(1);
                }
            }
            Item::Opt(AIO, Some(v)) => {
                if !a.open.set_aio(&v) {
                    error_report(format!("Invalid aio mode '{v}'"));
                    return Err(1);
                }
            }
            Item::Opt(DISCARD, Some(v)) => {
                if !a.open.set_discard(&v) {
                    error_report("Invalid discard mode `%s'".replace("%s", &v));
                    return Err(1);
                }
            }
            Item::Opt(DETECT_ZEROES, Some(v)) => {
                if !matches!(v.as_str(), "off" | "on" | "unmap") {
                    error_report(format!(
                        "Parameter 'detect-zeroes' does not accept value '{v}'"
                    ));
                    return Err(1);
                }
                a.detect_zeroes = Some(v);
            }
            Item::Opt('e', Some(v)) => match v.parse::<usize>() {
                Ok(n) if n >= 1 => a.shared = n,
                _ => {
                    error_report(format!("Invalid shared device number '{v}'"));
                    return Err(1);
                }
            },
            Item::Opt('f', Some(v)) => format = Some(v),
            Item::Opt('t', _) => a.persistent = true,
            Item::Opt('v', _) => a.verbose = true,
            Item::Opt('x', Some(v)) => {
                if v.len() > 4096 {
                    error_report("export name too long");
                    return Err(1);
                }
                a.export_name = v;
            }
            Item::Opt('D', Some(v)) => {
                if v.len() > 4096 {
                    error_report("description too long");
                    return Err(1);
                }
                a.description = Some(v);
            }
            Item::Opt('A', _) => a.allocation_depth = true,
            Item::Opt('B', Some(v)) => a.bitmaps.push(v),
            Item::Opt(FORK, _) => a.fork = true,
            Item::Opt(PID_FILE, Some(v)) => a.pid_file = Some(v),
            Item::Opt(HANDSHAKE_LIMIT, Some(v)) => match v.parse::<u64>() {
                Ok(n) => a.handshake_limit = n,
                Err(_) => {
                    error_report(format!("Invalid handshake limit '{v}'"));
                    return Err(1);
                }
            },
            Item::Opt(IMAGE_OPTS, _) => a.image_opts = true,
            Item::Opt(OBJECT, Some(def)) => {
                if let Err(msg) = common::img_object(&def) {
                    error_report(msg);
                    return Err(1);
                }
            }
            // No trace events in Strata; accepted for scripts.
            Item::Opt('T', _) => {}
            Item::Opt('L', _) => a.list = true,
            Item::Opt('o', Some(v)) => match crate::io::numbers::strtou64(&v) {
                Ok(o) => a.offset = o,
                Err(_) => {
                    error_report(format!("Invalid offset '{v}'"));
                    return Err(1);
                }
            },
            Item::Opt('l', Some(v)) => {
                use strata_block::snapshot::SnapshotSel;
                match SnapshotSel::parse(&v) {
                    Ok(sel) => {
                        // QEMU counts only the plain form as a per-device setting.
                        per_device |= matches!(sel, SnapshotSel::IdOrName(_));
                        a.snapshot = Some(sel);
                    }
                    Err(e) => {
                        error_report(e);
                        error_report(format!("Failed in parsing snapshot param `{v}'"));
                        return Err(1);
                    }
                }
                // A snapshot is served read-only.
                a.open.read_only = true;
            }
            Item::Opt(c @ ('c' | 'd'), _) | Item::Opt(c @ TLS, _) => {
                let what = match c {
                    'c' | 'd' => "the kernel NBD client (-c, -d)",
                    _ => "TLS",
                };
                error_report(format!("{what} is not supported yet"));
                return Err(1);
            }
            Item::Opt(_, _) => {}
            Item::Bad(msg) => {
                strata_block::stderr_line!("{msg}");
                usage_hint();
                return Err(1);
            }
        }
    }
    if a.socket.is_some() && port_given {
        error_report("-p is incompatible with -k");
        return Err(1);
    }
    if a.offset != 0 {
        per_device = true;
    }
    if a.list {
        if !parsed.operands.is_empty() {
            error_report("List mode is incompatible with a file name");
            return Err(1);
        }
        if per_device {
            error_report("List mode is incompatible with per-device settings");
            return Err(1);
        }
        if a.fork {
            error_report("List mode is incompatible with forking");
            return Err(1);
        }
        return Ok(a);
    }
    let mut operands = parsed.operands.into_iter();
    let (Some(image), None) = (operands.next(), operands.next()) else {
        error_report("Invalid number of arguments");
        usage_hint();
        return Err(1);
    };
    if format.is_some() && a.image_opts {
        error_report("--image-opts and --format are mutually exclusive");
        return Err(1);
    }
    if let Some(f) = format {
        a.open
            .opts
            .insert("driver".into(), serde_json::Value::String(f));
    }
    a.image = image;
    Ok(a)
}
