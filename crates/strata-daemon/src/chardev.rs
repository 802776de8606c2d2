//! Character devices of `--chardev` that a monitor can talk over (QEMU:
//! chardev/char.c, char-socket.c, char-stdio.c): a UNIX socket server
//! (several clients at once), a UNIX socket client, and stdio.

use crate::qemu_opts::{self, Kind, QemuOpts};
use tokio::net::{UnixListener, UnixStream};

/// Every key QEMU's `--chardev` takes, whatever the backend.
const KEYS: &[(&str, Kind)] = &[
    ("backend", Kind::Str),
    ("path", Kind::Str),
    ("input-path", Kind::Str),
    ("host", Kind::Str),
    ("port", Kind::Str),
    ("fd", Kind::Str),
    ("localaddr", Kind::Str),
    ("localport", Kind::Str),
    ("to", Kind::Number),
    ("ipv4", Kind::Bool),
    ("ipv6", Kind::Bool),
    ("wait", Kind::Bool),
    ("server", Kind::Bool),
    ("delay", Kind::Bool),
    ("nodelay", Kind::Bool),
    ("reconnect", Kind::Number),
    ("reconnect-ms", Kind::Number),
    ("telnet", Kind::Bool),
    ("tn3270", Kind::Bool),
    ("tls-creds", Kind::Str),
    ("tls-authz", Kind::Str),
    ("websocket", Kind::Bool),
    ("width", Kind::Number),
    ("height", Kind::Number),
    ("cols", Kind::Number),
    ("rows", Kind::Number),
    ("mux", Kind::Bool),
    ("signal", Kind::Bool),
    ("name", Kind::Str),
    ("debug", Kind::Number),
    ("size", Kind::Size),
    ("chardev", Kind::Str),
    ("chardevs.0", Kind::Str),
    ("chardevs.1", Kind::Str),
    ("chardevs.2", Kind::Str),
    ("chardevs.3", Kind::Str),
    ("append", Kind::Bool),
    ("logfile", Kind::Str),
    ("logappend", Kind::Bool),
    ("mouse", Kind::Bool),
    ("clipboard", Kind::Bool),
    ("tight", Kind::Bool),
    ("abstract", Kind::Bool),
];

/// The backends Strata has.
const BACKENDS: &[&str] = &["stdio", "socket"];

/// Keys a backend uses; any other key QEMU knows is refused rather than
/// silently ignored when it would change what the device does.
/// (`delay`/`nodelay` set TCP_NODELAY, which a UNIX socket does not have.)
const SOCKET_KEYS: &[&str] = &[
    "backend", "path", "server", "wait", "tight", "delay", "nodelay",
];
const STDIO_KEYS: &[&str] = &["backend", "signal"];

/// Where a chardev's connections come from.
pub enum Backend {
    /// A listening UNIX socket; `first` is the connection `wait=on`
    /// waited for. The socket file is removed when the daemon ends.
    Server {
        path: String,
        listener: UnixListener,
        first: Option<UnixStream>,
    },
    /// A connection made to a UNIX socket server.
    Client(Option<UnixStream>),
    /// Standard input and output.
    Stdio,
}

/// A character device.
pub struct Chardev {
    /// Its id.
    pub id: String,
    /// Its connections.
    pub backend: Backend,
}

/// The result of `--chardev`: a device, or the backend list (`help`).
pub enum Created {
    Device(Chardev),
    Help(String),
}

/// Parses a `--chardev` argument and opens the device. Warnings go to
/// `warn`, notes (waiting for a client) to `info`.
pub async fn create(
    arg: &str,
    existing: &[&Chardev],
    daemonized: bool,
    warn: &mut dyn FnMut(&str),
    info: &mut dyn FnMut(&str),
) -> Result<Created, String> {
    let opts: QemuOpts = qemu_opts::parse(arg, "backend", KEYS)?;
    for w in &opts.warnings {
        warn(w);
    }
    let backend = opts.get("backend");
    if backend.is_some_and(|b| b == "help" || b == "?") {
        let mut list = String::from("Available chardev backend types: \n");
        for b in BACKENDS {
            list.push_str(&format!("  {b}\n"));
        }
        return Ok(Created::Help(list));
    }
    let Some(id) = opts.id.clone() else {
        return Err("chardev: no id specified".into());
    };
    let Some(backend) = backend else {
        return Err(format!("chardev: \"{id}\" missing backend"));
    };
    if !BACKENDS.contains(&backend) {
        return Err(format!("'{backend}' is not a valid char driver name"));
    }
    let allowed = if backend == "socket" {
        SOCKET_KEYS
    } else {
        STDIO_KEYS
    };
    if backend == "socket" {
        let given = ["path", "fd", "host"]
            .iter()
            .filter(|k| opts.get(k).is_some())
            .count();
        if given > 1 {
            return Err("None or one of 'path', 'fd' or 'host' option required.".into());
        }
        if opts.get("host").is_some() && opts.get("port").is_none() {
            return Err("chardev: socket: no port given".into());
        }
    }
    if let Some((k, _)) = opts
        .opts
        .iter()
        .find(|(k, _)| !allowed.contains(&k.as_str()))
    {
        return Err(format!(
            "chardev: {backend}: '{k}' is not supported by strata-daemon"
        ));
    }
    if existing.iter().any(|c| c.id == id) {
        return Err("duplicate yank instance".into());
    }
    let backend = match backend {
        "stdio" => {
            if daemonized {
                return Err("cannot use stdio with -daemonize".into());
            }
            if existing.iter().any(|c| matches!(c.backend, Backend::Stdio)) {
                return Err("cannot use stdio by multiple character devices".into());
            }
            Backend::Stdio
        }
        _ => {
            let Some(path) = opts.get("path").map(str::to_string) else {
                return Err("chardev: socket: a 'path' is required (TCP and fd sockets are not supported by strata-daemon)".into());
            };
            if opts.get_bool("server", false) {
                let listener = listen(&path)?;
                let mut first = None;
                if opts.get_bool("wait", true) {
                    info(&format!(
                        "QEMU waiting for connection on: disconnected:unix:{path},server=on"
                    ));
                    first = Some(
                        listener
                            .accept()
                            .await
                            .map_err(|e| format!("Failed to accept a connection on {path}: {e}"))?
                            .0,
                    );
                }
                Backend::Server {
                    path,
                    listener,
                    first,
                }
            } else {
                let s = UnixStream::connect(&path).await.map_err(|e| {
                    format!(
                        "Failed to connect to '{path}': {}",
                        strata_block::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
                    )
                })?;
                Backend::Client(Some(s))
            }
        }
    };
    Ok(Created::Device(Chardev { id, backend }))
}

/// Binds a listening socket at `path`, replacing a stale socket file as
/// QEMU does.
fn listen(path: &str) -> Result<UnixListener, String> {
    let errno =
        |e: &std::io::Error| strata_block::error::strerror(e.raw_os_error().unwrap_or(libc::EIO));
    if path.len() >= 108 {
        return Err(format!("UNIX socket path '{path}' is too long"));
    }
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(format!("Failed to unlink socket {path}: {}", errno(&e)));
        }
    }
    strata_nbd::listener::bind_unix(path)
        .map_err(|e| format!("Failed to bind socket to {path}: {}", errno(&e)))
}
