//! `strata-daemon`'s command line (qemu-storage-daemon's): `--help`,
//! `--version`, `--daemonize` and `--pidfile` here; every other option is
//! handed in order to the engine in the `strata-daemon` crate.

use crate::getopt::{self, Item, LongOpt, OPERAND};
use crate::process::{daemonize, pidfile};
use strata_block::report::{error_report, prog_name};
use strata_block::EventLoop;
use strata_daemon::{report_at, Applied, DaemonArg, Setup};

const LONG: &[LongOpt] = &[
    LongOpt {
        name: "blockdev",
        has_arg: true,
        val: 'B',
    },
    LongOpt {
        name: "chardev",
        has_arg: true,
        val: 'C',
    },
    LongOpt {
        name: "daemonize",
        has_arg: false,
        val: 'D',
    },
    LongOpt {
        name: "export",
        has_arg: true,
        val: 'E',
    },
    LongOpt {
        name: "help",
        has_arg: false,
        val: 'h',
    },
    LongOpt {
        name: "monitor",
        has_arg: true,
        val: 'M',
    },
    LongOpt {
        name: "nbd-server",
        has_arg: true,
        val: 'N',
    },
    LongOpt {
        name: "object",
        has_arg: true,
        val: 'O',
    },
    LongOpt {
        name: "pidfile",
        has_arg: true,
        val: 'P',
    },
    LongOpt {
        name: "version",
        has_arg: false,
        val: 'V',
    },
];

fn help() {
    println!(
        "Usage: {} [options]
QEMU storage daemon (Strata)

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
  --chardev stdio,id=<id>
                         configure a character device backend

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --pidfile <path>       write process ID to a file after startup

{}",
        prog_name(),
        crate::common::QEMU_HELP_BOTTOM
    );
}

/// Entry point of `strata-daemon`; returns only on errors before start-up
/// or after shutdown, with the exit code.
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    strata_block::report::set_prog_name(
        args.first().map(String::as_str).unwrap_or("strata-daemon"),
    );
    // glibc names the program by argv[0] as given.
    let parsed = getopt::parse(
        args.first().map(String::as_str).unwrap_or_default(),
        &args[1..],
        "-hV",
        LONG,
    );
    // First pass: what must happen before anything starts.
    let mut daemonize = false;
    let mut pidfile = None;
    for item in &parsed.items {
        match item {
            Item::Bad(msg) => {
                strata_block::stderr_line!("{msg}");
                return 1;
            }
            Item::Opt('h', _) => {
                help();
                return 0;
            }
            Item::Opt('V', _) => {
                println!("qemu-storage-daemon version 10.0.2 (Strata 0.1.0)");
                println!("{}", crate::common::QEMU_COPYRIGHT);
                return 0;
            }
            Item::Opt('D', _) => daemonize = true,
            Item::Opt('P', Some(p)) => pidfile = Some(p.clone()),
            _ => {}
        }
    }
    let daemonized = daemonize.then(daemonize::daemonize);
    let ev = match EventLoop::new() {
        Ok(ev) => ev,
        Err(e) => {
            error_report(format!("Could not start the event loop: {e}"));
            return 1;
        }
    };
    let code = ev.block_on(run(args, parsed, pidfile, daemonized));
    // Ends here, without waiting for a blocked read of standard input.
    std::process::exit(code)
}

/// Builds the daemon from the options in order, then serves it.
async fn run(
    args: Vec<String>,
    parsed: getopt::Parsed,
    pidfile: Option<String>,
    daemonized: Option<daemonize::Daemonized>,
) -> i32 {
    let mut setup = match Setup::new(crate::common::init(), daemonized.is_some()) {
        Ok(s) => s,
        Err(e) => {
            error_report(e);
            return 1;
        }
    };
    // Second pass: the options that build the daemon, in order.
    for (item, span) in parsed.items.iter().zip(&parsed.spans) {
        let Item::Opt(c, Some(arg)) = item else {
            continue;
        };
        let arg = match *c {
            OPERAND => DaemonArg::Operand,
            'B' => DaemonArg::Blockdev(arg),
            'C' => DaemonArg::Chardev(arg),
            'M' => DaemonArg::Monitor(arg),
            'O' => DaemonArg::Object(arg),
            'N' => DaemonArg::NbdServer(arg),
            'E' => DaemonArg::Export(arg),
            _ => continue,
        };
        let loc = args[1..][span.clone()].join(" ");
        match setup.apply(arg, &loc).await {
            Ok(Applied::Done) => {}
            Ok(Applied::HelpPrinted) => {
                setup.shutdown().await;
                return 0;
            }
            Err(msg) => {
                report_at(&loc, "", &msg);
                setup.shutdown().await;
                return 1;
            }
        }
    }
    // Written once everything is set up, before any connection is served.
    let _pid = match pidfile.as_deref().map(pidfile::PidFile::write) {
        Some(Err(e)) => {
            error_report(format!("cannot create PID file: {e}"));
            setup.shutdown().await;
            return 1;
        }
        Some(Ok(p)) => Some(p),
        None => None,
    };
    if let Some(d) = daemonized {
        if let Err(e) = d.finish() {
            error_report(e);
            setup.shutdown().await;
            return 1;
        }
    }
    setup.serve().await;
    0
}
