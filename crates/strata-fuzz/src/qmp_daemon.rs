//! The `qmp_daemon` target: QMP commands through strata-daemon's
//! dispatcher, a session of its own per input (greeting, capabilities,
//! commands, then every export ended and every node closed), with two
//! images to open: `disk.raw` and `disk.qcow2`.
//!
//! The input is a stream of JSON messages. Each is made harmless before it
//! is sent, so that the fuzzer explores commands, not this machine: file
//! names land in the scratch directory, hosts are the loopback address,
//! and messages naming file descriptors, FUSE mounts or preallocation
//! (which writes as much as a size says) are left out.

use crate::with_scratch;
use serde_json::{Map, Value};
use std::path::Path;
use std::time::Duration;

/// Keys whose string values are file names.
const PATH_KEYS: &[&str] = &["filename", "path", "logfile", "config", "mountpoint"];

/// At most this many messages of an input are sent.
const MAX_MESSAGES: usize = 64;

/// How long a session may take once the client has said everything.
const SESSION_LIMIT: Duration = Duration::from_secs(5);

pub fn qmp_daemon(data: &[u8]) {
    with_scratch(|ev, dir| {
        clear(dir);
        ev.block_on(images(dir));
        let mut stream = strata_qmp::json::JsonStream::default();
        let mut said = Vec::new();
        for msg in stream.feed(data).into_iter().flatten().take(MAX_MESSAGES) {
            if let Some(msg) = harmless(msg, dir) {
                said.extend_from_slice(msg.to_string().as_bytes());
                said.push(b'\n');
            }
        }
        ev.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (client, served) = tokio::io::duplex(1 << 16);
            let (r, w) = tokio::io::split(served);
            let server = strata_daemon::serve_connection(strata_daemon::registry(), r, w);
            let client_side = async move {
                let (mut r, mut w) = tokio::io::split(client);
                let writer = async {
                    let _ = w.write_all(&said).await;
                    let _ = w.shutdown().await;
                };
                let mut sink = Vec::new();
                let reader = async {
                    let _ = r.read_to_end(&mut sink).await;
                };
                futures::join!(writer, reader);
                // For whoever writes seeds: what the daemon answered.
                if std::env::var_os("STRATA_FUZZ_ECHO").is_some() {
                    eprintln!("{}", String::from_utf8_lossy(&sink));
                }
            };
            let both = async { futures::join!(server, client_side) };
            if tokio::time::timeout(SESSION_LIMIT, both).await.is_err() {
                panic!("the QMP session did not end within {SESSION_LIMIT:?} of its input");
            }
        });
    });
}

/// `msg` with its file names moved into `dir` and its hosts made the
/// loopback address; None if it names what must not be touched.
fn harmless(msg: Value, dir: &Path) -> Option<Value> {
    match msg {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                if k == "fd" || k == "fdname" || k == "preallocation" {
                    return None;
                }
                let v = match v {
                    Value::String(s) if s == "fuse" || s == "fd" => return None,
                    Value::String(s) if PATH_KEYS.contains(&k.as_str()) => {
                        Value::String(in_dir(&s, dir))
                    }
                    Value::String(_) if k == "host" => Value::String("127.0.0.1".into()),
                    v => harmless(v, dir)?,
                };
                out.insert(k, v);
            }
            Some(Value::Object(out))
        }
        Value::Array(a) => a
            .into_iter()
            .map(|v| harmless(v, dir))
            .collect::<Option<Vec<_>>>()
            .map(Value::Array),
        v => Some(v),
    }
}

/// A file name inside `dir` made from `name`: its characters other than
/// letters, digits, `.`, `_` and `-` become `_`, so it has no directories.
fn in_dir(name: &str, dir: &Path) -> String {
    let flat: String = name
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let flat = match flat.as_str() {
        "" | "." | ".." => "f".to_string(),
        _ => flat,
    };
    dir.join(flat).to_string_lossy().into_owned()
}

/// The images a session finds: `disk.raw` and `disk.qcow2`, 1 MiB each;
/// the qcow2 image is made once, then copied.
async fn images(dir: &Path) {
    thread_local! {
        static QCOW2: std::cell::OnceCell<Vec<u8>> = const { std::cell::OnceCell::new() };
    }
    std::fs::File::create(dir.join("disk.raw"))
        .and_then(|f| f.set_len(1 << 20))
        .expect("create disk.raw");
    let path = dir.join("disk.qcow2");
    if let Some(bytes) = QCOW2.with(|c| c.get().cloned()) {
        std::fs::write(&path, bytes).expect("write disk.qcow2");
        return;
    }
    crate::create_scratch_qcow2(&path.to_string_lossy()).await;
    let bytes = std::fs::read(&path).expect("read disk.qcow2");
    QCOW2.with(|c| {
        let _ = c.set(bytes);
    });
}

/// Empties the scratch directory: every session starts from nothing.
fn clear(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn file_names_stay_in_the_scratch_directory() {
        let dir = Path::new("/scratch");
        let msg = json!({"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "n",
            "file": {"driver": "file", "filename": "/etc/../passwd"}}});
        let out = harmless(msg, dir).unwrap();
        assert_eq!(
            out["arguments"]["file"]["filename"],
            "/scratch/_etc_.._passwd"
        );
        let addr = json!({"addr": {"type": "inet", "host": "example.com", "port": "10809"}});
        assert_eq!(harmless(addr, dir).unwrap()["addr"]["host"], "127.0.0.1");
        for refused in [
            json!({"arguments": {"addr": {"type": "fd", "str": "3"}}}),
            json!({"arguments": {"type": "fuse"}}),
            json!({"arguments": {"options": {"preallocation": "full"}}}),
        ] {
            assert_eq!(harmless(refused, dir), None);
        }
    }
}
