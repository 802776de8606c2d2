//! Replies as bytes: simple replies, structured chunks and their extended
//! form, whichever the handshake settled.

use crate::proto::*;
use strata_block::IoBuf;

/// One reply or chunk: its header (with any small payload) and the data
/// of a read, written after it without a copy.
pub struct Chunk {
    pub head: Vec<u8>,
    pub data: Option<IoBuf>,
}

/// How replies look on this connection.
#[derive(Clone, Copy)]
pub struct Form {
    pub structured: bool,
    pub extended: bool,
}

impl Form {
    /// A simple reply (without structured replies only).
    pub fn simple(&self, error: u32, cookie: u64, data: Option<IoBuf>) -> Chunk {
        let mut head = Vec::with_capacity(16);
        head.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        head.extend_from_slice(&error.to_be_bytes());
        head.extend_from_slice(&cookie.to_be_bytes());
        Chunk { head, data }
    }

    /// A structured chunk whose payload is `payload` then `data`.
    pub fn chunk(
        &self,
        flags: u16,
        kind: u16,
        req: &Request,
        payload: &[u8],
        data: Option<IoBuf>,
    ) -> Chunk {
        let total = payload.len() + data.as_ref().map_or(0, |d| d.len());
        let mut head = Vec::with_capacity(32 + payload.len());
        if self.extended {
            head.extend_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
            head.extend_from_slice(&flags.to_be_bytes());
            head.extend_from_slice(&kind.to_be_bytes());
            head.extend_from_slice(&req.cookie.to_be_bytes());
            head.extend_from_slice(&req.offset.to_be_bytes());
            head.extend_from_slice(&(total as u64).to_be_bytes());
        } else {
            head.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            head.extend_from_slice(&flags.to_be_bytes());
            head.extend_from_slice(&kind.to_be_bytes());
            head.extend_from_slice(&req.cookie.to_be_bytes());
            head.extend_from_slice(&(total as u32).to_be_bytes());
        }
        head.extend_from_slice(payload);
        Chunk { head, data }
    }

    /// Success without data: a simple reply, or a final NONE chunk.
    pub fn done(&self, req: &Request) -> Chunk {
        if self.structured {
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req, &[], None)
        } else {
            self.simple(0, req.cookie, None)
        }
    }

    /// A failed request: a simple reply with the error, or a final error
    /// chunk with a message.
    pub fn error(&self, req: &Request, error: u32, msg: &str) -> Chunk {
        if !self.structured {
            return self.simple(error, req.cookie, None);
        }
        let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
        let mut p = Vec::with_capacity(6 + msg.len());
        p.extend_from_slice(&error.to_be_bytes());
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg);
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, req, &p, None)
    }
}
