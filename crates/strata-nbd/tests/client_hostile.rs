//! The client against a hostile server: each broken reply fails the
//! request with EIO, every later request too, nothing hangs, nothing is
//! allocated from a length on the wire, nothing panics.

use std::time::Duration;
use strata_block::IoBuf;
use strata_nbd::client::{Addr, Client, Wanted};
use strata_nbd::proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The server's half of a handshake: structured replies yes, extended
/// headers no, `base:allocation` as context 5, a 1 MiB export.
async fn shake(s: &mut UnixStream) {
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await.unwrap();
    let _cflags = s.read_u32().await.unwrap();
    loop {
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        let opt = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.unwrap();
        let reply = |kind: u32, payload: &[u8]| {
            let mut b = Vec::new();
            b.extend_from_slice(&REP_MAGIC.to_be_bytes());
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            b.extend_from_slice(payload);
            b
        };
        match opt {
            OPT_EXTENDED_HEADERS => s.write_all(&reply(REP_ERR_UNSUP, &[])).await.unwrap(),
            OPT_STRUCTURED_REPLY => s.write_all(&reply(REP_ACK, &[])).await.unwrap(),
            OPT_SET_META_CONTEXT => {
                let mut p = 5u32.to_be_bytes().to_vec();
                p.extend_from_slice(b"base:allocation");
                s.write_all(&reply(REP_META_CONTEXT, &p)).await.unwrap();
                s.write_all(&reply(REP_ACK, &[])).await.unwrap();
            }
            OPT_GO => {
                let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&(1u64 << 20).to_be_bytes());
                p.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).to_be_bytes());
                s.write_all(&reply(REP_INFO, &p)).await.unwrap();
                s.write_all(&reply(REP_ACK, &[])).await.unwrap();
                return;
            }
            o => panic!("unexpected option {o}"),
        }
    }
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8], claimed: Option<u32>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    let len = claimed.unwrap_or(payload.len() as u32);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn data_at(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

/// The replies a hostile server sends to a 4 KiB read at 0 with `cookie`.
fn hostile(case: usize, cookie: u64) -> Vec<u8> {
    let done = REPLY_FLAG_DONE;
    match case {
        // Garbage instead of a reply.
        0 => b"this is not an NBD reply at all".to_vec(),
        // A reply to a request nobody made.
        1 => chunk(done, REPLY_TYPE_NONE, cookie + 7, &[], None),
        // Data past the end of the request.
        2 => chunk(
            done,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data_at(8192, &[1; 16]),
            None,
        ),
        // A chunk that claims 4 GiB of data.
        3 => chunk(
            done,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data_at(0, &[1; 16]),
            Some(u32::MAX),
        ),
        // Done before the request was covered.
        4 => chunk(
            done,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data_at(0, &[1; 512]),
            None,
        ),
        // A simple reply where chunks are due.
        5 => {
            let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&0u32.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
            b.extend_from_slice(&[0; 4096]);
            b
        }
        // An error chunk whose message is longer than the chunk.
        6 => {
            let mut p = EIO.to_be_bytes().to_vec();
            p.extend_from_slice(&60000u16.to_be_bytes());
            p.extend_from_slice(b"short");
            chunk(done, REPLY_TYPE_ERROR, cookie, &p, None)
        }
        // Half a header, then the connection closes.
        7 => STRUCTURED_REPLY_MAGIC.to_be_bytes()[..3].to_vec(),
        // A chunk type nobody knows.
        _ => chunk(done, 77, cookie, &[], None),
    }
}

const CASES: usize = 9;

#[tokio::test(flavor = "current_thread")]
async fn broken_replies_fail_the_request_and_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = tokio::spawn(async move {
        for case in 0..CASES {
            let (mut s, _) = listener.accept().await.unwrap();
            shake(&mut s).await;
            let mut head = [0u8; Request::SIZE];
            s.read_exact(&mut head).await.unwrap();
            let req = Request::decode(&head, false).unwrap();
            assert_eq!(req.kind, CMD_READ);
            s.write_all(&hostile(case, req.cookie)).await.unwrap();
            if case == 7 {
                drop(s);
            } else {
                // Keep the socket open: the client must not wait for more.
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                });
            }
        }
    });
    let addr = Addr::Unix(sock.to_str().unwrap().into());
    let want = Wanted {
        export: "",
        structured: true,
        context: Some("base:allocation"),
    };
    for case in 0..CASES {
        let c = Client::connect(&addr, &want).await.unwrap();
        assert_eq!(c.info.size, 1 << 20);
        assert_eq!(c.info.context_id, Some(5));
        let r = tokio::time::timeout(Duration::from_secs(10), c.read(0, IoBuf::zeroed(4096)))
            .await
            .unwrap_or_else(|_| panic!("case {case}: the client hangs"));
        let e = r.err().unwrap_or_else(|| panic!("case {case}: accepted"));
        assert_eq!(e.code(), libc::EIO, "case {case}");
        // The connection is done for: later requests fail at once.
        let again = tokio::time::timeout(Duration::from_secs(10), c.flush())
            .await
            .unwrap_or_else(|_| panic!("case {case}: a later request hangs"));
        assert!(again.is_err(), "case {case}");
        c.disconnect().await;
    }
    server.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_refused_export_says_what_the_server_said() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("r.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut hello = Vec::new();
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
        s.write_all(&hello).await.unwrap();
        let _ = s.read_u32().await.unwrap();
        loop {
            let _magic = s.read_u64().await.unwrap();
            let opt = s.read_u32().await.unwrap();
            let len = s.read_u32().await.unwrap();
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await.unwrap();
            let (kind, msg): (u32, &[u8]) = match opt {
                OPT_GO => (REP_ERR_UNKNOWN, b"no such disk here"),
                _ => (REP_ERR_UNSUP, b""),
            };
            let mut b = REP_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            b.extend_from_slice(msg);
            s.write_all(&b).await.unwrap();
            if opt == OPT_GO {
                return;
            }
        }
    });
    let addr = Addr::Unix(sock.to_str().unwrap().into());
    let want = Wanted {
        export: "d",
        structured: true,
        context: Some("base:allocation"),
    };
    let e = Client::connect(&addr, &want).await.err().unwrap();
    assert_eq!(
        e.message(),
        Some("Requested export not available\nserver reported: no such disk here")
    );
    server.await.unwrap();
}
