//! The NBD client (QEMU: nbd/client.c and the wire half of block/nbd.c):
//! connects over TCP or a Unix socket, negotiates, and then carries
//! requests, many in flight, on one connection. The `nbd` protocol driver
//! in strata-drivers wraps it.

mod conn;
mod handshake;

pub use conn::{Extent, MAX_IN_FLIGHT};
pub use handshake::{ExportInfo, Listed, Wanted};

use crate::proto::*;
use conn::{Conn, Reader, Reply, Writer};
use strata_block::{Error, IoBuf, Result};

/// A request header; the connection gives it its cookie.
fn req(kind: u16, flags: u16, offset: u64, len: u64) -> Request {
    Request {
        flags,
        kind,
        cookie: 0,
        offset,
        len,
    }
}

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Tcp { host: String, port: String },
    Unix(String),
}

impl std::fmt::Display for Addr {
    /// As QEMU names a socket address in its errors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp { host, port } => write!(f, "{host}:{port}"),
            Addr::Unix(p) => write!(f, "{p}"),
        }
    }
}

/// An open connection to one export.
pub struct Client {
    conn: Conn,
    pub info: ExportInfo,
}

async fn dial(addr: &Addr) -> std::io::Result<(Reader, Writer)> {
    match addr {
        Addr::Tcp { host, port } => {
            let port: u16 = port
                .parse()
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            let s = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            // Requests are small and latency matters more than packets.
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Addr::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p).await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

/// Connects, with QEMU's error if that fails.
async fn open(addr: &Addr) -> Result<(Reader, Writer)> {
    dial(addr).await.map_err(|e| {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        Error::msg(
            errno,
            format!(
                "Failed to connect to '{addr}': {}",
                strata_block::error::strerror(errno)
            ),
        )
    })
}

/// The exports a server offers, each with its sizes, flags and meta
/// contexts (`qemu-nbd -L`).
pub async fn list_exports(addr: &Addr) -> Result<Vec<Listed>> {
    let (mut r, mut w) = open(addr).await?;
    handshake::list(&mut r, &mut w).await
}

impl Client {
    /// Connects to `addr` and negotiates `want`.
    pub async fn connect(addr: &Addr, want: &Wanted<'_>) -> Result<Client> {
        let (mut r, mut w) = open(addr).await?;
        let info = handshake::negotiate(&mut r, &mut w, want).await?;
        let conn = Conn::start(r, w, info.structured, info.extended);
        Ok(Client { conn, info })
    }

    /// Reads `buf.len()` bytes at `offset` (within the export and its
    /// maximum block size: the caller splits).
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        match self
            .conn
            .request(req(CMD_READ, 0, offset, len), None, Some(buf), 0)
            .await?
        {
            Reply::Read(b) => Ok(b),
            _ => Err(Error::errno(libc::EIO)),
        }
    }

    pub async fn write(&self, offset: u64, buf: &IoBuf, fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let len = buf.len() as u64;
        self.conn
            .request(req(CMD_WRITE, flags, offset, len), Some(buf), None, 0)
            .await
            .map(drop)
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: u16) -> Result<()> {
        self.conn
            .request(req(CMD_WRITE_ZEROES, flags, offset, len), None, None, 0)
            .await
            .map(drop)
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.conn
            .request(req(CMD_TRIM, 0, offset, len), None, None, 0)
            .await
            .map(drop)
    }

    pub async fn flush(&self) -> Result<()> {
        self.conn
            .request(req(CMD_FLUSH, 0, 0, 0), None, None, 0)
            .await
            .map(drop)
    }

    pub async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.conn
            .request(req(CMD_CACHE, 0, offset, len), None, None, 0)
            .await
            .map(drop)
    }

    /// The first extent at `offset` of the negotiated meta context.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let Some(id) = self.info.context_id else {
            return Err(Error::errno(libc::ENOTSUP));
        };
        match self
            .conn
            .request(
                req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, len),
                None,
                None,
                id,
            )
            .await?
        {
            Reply::Status(e) => Ok(e),
            _ => Err(Error::errno(libc::EIO)),
        }
    }

    /// Says goodbye to the server.
    pub async fn disconnect(&self) {
        self.conn.disconnect().await
    }
}
