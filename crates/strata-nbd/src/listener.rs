//! Where a server listens: a TCP address or a Unix socket, bound with
//! QEMU's messages; connections served by a [`Server`] each in a task of
//! their own, at most `max_connections` at once (0: no limit), until the
//! listener is stopped.

use crate::client::Addr;
use crate::server::Server;
use std::sync::Arc;
use tokio::sync::watch;

/// A bound socket.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, String),
}

/// An accepted connection.
pub enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Listener {
    /// Binds `addr`; a Unix socket file left by an earlier server is
    /// replaced, as QEMU replaces it.
    pub async fn bind(addr: &Addr) -> Result<Listener, String> {
        let failed = |e: std::io::Error| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            format!(
                "Failed to bind socket to {addr}: {}",
                strata_block::error::strerror(errno)
            )
        };
        match addr {
            Addr::Unix(path) => {
                let _ = std::fs::remove_file(path);
                bind_unix(path)
                    .map(|l| Listener::Unix(l, path.clone()))
                    .map_err(failed)
            }
            Addr::Tcp { host, port } => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| format!("address resolution failed for {host}:{port}"))?;
                tokio::net::TcpListener::bind((host.as_str(), port))
                    .await
                    .map(Listener::Tcp)
                    .map_err(failed)
            }
        }
    }

    pub async fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                // Replies are small and latency matters more than packets.
                let _ = s.set_nodelay(true);
                Ok(Conn::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Conn::Unix(l.accept().await?.0)),
        }
    }

    /// The socket file to remove when done, for a Unix socket.
    pub fn path(&self) -> Option<&str> {
        match self {
            Listener::Tcp(_) => None,
            Listener::Unix(_, p) => Some(p),
        }
    }
}

impl Server {
    /// Serves one accepted connection to its end.
    pub async fn serve_conn(self: &Arc<Self>, conn: Conn) -> std::io::Result<()> {
        match conn {
            Conn::Tcp(s) => self.serve(s).await,
            Conn::Unix(s) => self.serve(s).await,
        }
    }
}

/// A running accept loop; dropping or stopping it closes the listener.
pub struct Serving {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Accepts connections on `listener` for `server` in a task of its own:
    /// at most `max_connections` served at once (0: no limit); the others
    /// wait in the backlog.
    pub fn start(server: Arc<Server>, listener: Listener, max_connections: usize) -> Serving {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let (count, mut counted) = watch::channel(0usize);
            let count = Arc::new(count);
            loop {
                if max_connections > 0 {
                    tokio::select! {
                        r = counted.wait_for(|n| *n < max_connections) => if r.is_err() { break },
                        _ = stopped.changed() => break,
                    }
                }
                let conn = tokio::select! {
                    c = listener.accept() => c,
                    _ = stopped.changed() => break,
                };
                let Ok(conn) = conn else { continue };
                count.send_modify(|n| *n += 1);
                let (server, count) = (Arc::clone(&server), Arc::clone(&count));
                tokio::spawn(async move {
                    if let Err(e) = server.serve_conn(conn).await {
                        tracing::debug!("nbd: client: {e}");
                    }
                    count.send_modify(|n| *n -= 1);
                });
            }
            if let Some(p) = listener.path() {
                let _ = std::fs::remove_file(p);
            }
        });
        Serving { stop, task }
    }

    /// Stops accepting and waits until the listener is closed.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Binds a listening Unix socket at `path` (which the caller has cleared)
/// so that the file appears only once connections are accepted: bound and
/// listening under a temporary name beside it, then renamed. A client that
/// waits for the file then never meets a refused connect, which a plain
/// bind-then-listen (QEMU's) allows for a moment. Where the temporary name
/// does not fit or the rename fails, a plain bind, with its errors.
pub fn bind_unix(path: &str) -> std::io::Result<tokio::net::UnixListener> {
    let p = std::path::Path::new(path);
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = name.map(|n| p.with_file_name(format!(".{n}.{}.tmp", std::process::id())));
    // sun_path holds 107 bytes and a NUL.
    if let Some(tmp) = tmp.filter(|t| t.as_os_str().len() < 108) {
        let _ = std::fs::remove_file(&tmp);
        if let Ok(l) = std::os::unix::net::UnixListener::bind(&tmp) {
            if std::fs::rename(&tmp, p).is_ok() {
                l.set_nonblocking(true)?;
                return tokio::net::UnixListener::from_std(l);
            }
            let _ = std::fs::remove_file(&tmp);
        }
    }
    tokio::net::UnixListener::bind(path)
}
