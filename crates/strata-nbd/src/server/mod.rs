//! The NBD server: exports by name, and one connection from handshake to
//! disconnect (QEMU: nbd/server.c). Listening, connection limits and
//! daemon life belong to the tools.

mod commands;
pub mod export;
mod handshake;
mod reply;
mod transmission;

use export::Export;
use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// The exports one server offers.
pub struct Server {
    exports: RwLock<Vec<Arc<Export>>>,
    /// A client that has not finished its handshake by then is dropped
    /// (`--handshake-limit`; zero: no limit).
    handshake_limit: Duration,
}

impl Server {
    pub fn new(handshake_limit: Duration) -> Arc<Server> {
        Arc::new(Server {
            exports: RwLock::new(Vec::new()),
            handshake_limit,
        })
    }

    /// Adds an export; false if one of that name exists.
    pub fn add(&self, export: Arc<Export>) -> bool {
        let mut v = self.exports.write().unwrap_or_else(|p| p.into_inner());
        if v.iter().any(|e| e.name == export.name) {
            return false;
        }
        v.push(export);
        true
    }

    /// Removes the export `name`, if there is one.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut v = self.exports.write().unwrap_or_else(|p| p.into_inner());
        let i = v.iter().position(|e| e.name == name)?;
        Some(v.remove(i))
    }

    /// The export called `name`.
    pub fn export(&self, name: &str) -> Option<Arc<Export>> {
        let v = self.exports.read().unwrap_or_else(|p| p.into_inner());
        v.iter().find(|e| e.name == name).cloned()
    }

    /// Every export, in the order they were added (as LIST shows them).
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Serves one connection to its end. Errors are the client's (a broken
    /// protocol, a closed socket): the caller logs them and goes on.
    pub async fn serve<S>(self: &Arc<Self>, stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut r, mut w) = tokio::io::split(stream);
        let shake = handshake::negotiate(&mut r, &mut w, self);
        let n = if self.handshake_limit.is_zero() {
            shake.await?
        } else {
            match tokio::time::timeout(self.handshake_limit, shake).await {
                Ok(n) => n?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "handshake not finished in time",
                    ))
                }
            }
        };
        match n {
            Some(n) => {
                let export = Arc::clone(&n.export);
                export.state.serve(transmission::transmit(r, w, n)).await
            }
            None => Ok(()),
        }
    }
}
