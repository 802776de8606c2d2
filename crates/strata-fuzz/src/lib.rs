//! Fuzz targets: each takes bytes from outside and must return, whatever
//! they are, without a panic, a hang or memory in proportion to a number
//! the input names. cargo-fuzz runs them (`fuzz/`, nightly); the test
//! `tests/corpus.rs` replays the corpus in `fuzz/corpus/TARGET/` on stable,
//! so every input that once found a bug keeps being tried.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use strata_block::options::Opts;
use strata_block::{EventLoop, IoBuf, Node, OpenCtx, OpenFlags, RepairMode, WriteFlags};

/// A fuzz target: takes any bytes.
pub type Target = fn(&[u8]);

/// The targets by name, as cargo-fuzz and the corpus directories name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("qcow2_image", qcow2_image),
    ("options", options),
    ("qmp", qmp),
    ("nbd_server", nbd_server),
    ("nbd_client", nbd_client),
    ("io_commands", io_commands),
    ("qmp_daemon", qmp_daemon),
];

mod qmp_daemon;
pub use qmp_daemon::qmp_daemon;

/// Per-thread scratch space: an event loop and a directory, made once.
struct Scratch {
    ev: EventLoop,
    dir: tempfile::TempDir,
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

fn with_scratch<T>(f: impl FnOnce(&EventLoop, &PathBuf) -> T) -> T {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.get_or_insert_with(|| Scratch {
            ev: EventLoop::new().expect("an event loop"),
            dir: tempfile::tempdir().expect("a scratch directory"),
        });
        f(&s.ev, &s.dir.path().to_path_buf())
    })
}

async fn open(path: &str, read_only: bool) -> strata_block::Result<Arc<Node>> {
    let ctx = OpenCtx::new(
        strata_drivers::registry(),
        OpenFlags {
            read_only,
            force_share: read_only,
            // A backing file name from the input must not reach other files.
            no_backing: true,
            ..OpenFlags::default()
        },
    );
    ctx.open_image(Some(path), Some("qcow2"), Opts::new()).await
}

/// Creates the 1 MiB qcow2 image a target starts from at `path`.
async fn create_scratch_qcow2(path: &str) {
    let reg = strata_drivers::registry();
    let ctx = OpenCtx::new(Arc::clone(&reg), OpenFlags::default());
    let mut o = Opts::new();
    o.insert("size".into(), "1M".into());
    reg.format("qcow2")
        .expect("the qcow2 driver")
        .create(&ctx, path, o)
        .await
        .expect("create the scratch image");
}

/// A qcow2 image, mutated: opened read-only and walked (block status,
/// reads, snapshots, info, check), then opened writable and written.
pub fn qcow2_image(data: &[u8]) {
    with_scratch(|ev, dir| {
        let path = dir.join("image.qcow2");
        std::fs::write(&path, data).expect("write the scratch image");
        let path = path.to_string_lossy().into_owned();
        ev.block_on(async {
            if let Ok(node) = open(&path, true).await {
                let len = node.length();
                let mut at = 0;
                // Bounded: a corrupt image may claim any size.
                for _ in 0..64 {
                    if at >= len {
                        break;
                    }
                    match node.block_status(at, len - at).await {
                        Ok(st) if st.len > 0 => {
                            let n = st.len.min(65536).min(len - at);
                            let _ = node.read(at, IoBuf::zeroed(n as usize)).await;
                            at += st.len;
                        }
                        _ => break,
                    }
                }
                let _ = node.driver().snapshots().await;
                let _ = node.driver().format_specific();
                let _ = node.driver().check(RepairMode::default()).await;
                let _ = node.close().await;
            }
            if let Ok(node) = open(&path, false).await {
                let len = node.length();
                for at in [0, len / 2, len.saturating_sub(4096)] {
                    let n = 4096.min(len - at.min(len)) as usize;
                    if n > 0 {
                        let buf = IoBuf::filled(n, 0x5a);
                        let _ = node.write(at, buf, WriteFlags::default()).await;
                    }
                }
                let _ = node.flush().await;
                let _ = node.close().await;
            }
        });
    });
}

/// Option strings as users type them: keyval lists (`-o`, `--image-opts`),
/// JSON (`json:` file names), and the values of the common options.
pub fn options(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = strata_block::options::parse_keyval(s, Some("file"));
    let _ = strata_block::qjson::parse(s);
    let _ = strata_tools::common::image_opts(s);
    let _ = strata_block::CacheMode::parse(s);
    let _ = strata_block::engine::Aio::parse(s);
    let _ = strata_block::Preallocation::parse(s);
    let _ = strata_block::snapshot::SnapshotSel::parse(s);
}

/// Bytes on a QMP connection: the JSON stream, then each message checked
/// against the daemon's schema as a command's arguments would be.
pub fn qmp(data: &[u8]) {
    thread_local! {
        static SCHEMA: strata_qmp::Schema = strata_daemon::schema::schema(&strata_daemon::registry());
    }
    let mut stream = strata_qmp::json::JsonStream::default();
    for msg in stream.feed(data).into_iter().flatten() {
        SCHEMA.with(|schema| {
            for ty in ["BlockdevOptions", "BlockExportOptions"] {
                let _ = strata_qmp::visit::visit(schema, ty, msg.clone(), false);
                let _ = strata_qmp::visit::visit(schema, ty, msg.clone(), true);
            }
        });
    }
}

/// A client's bytes to the NBD server (handshake, then requests) on a
/// writable 1 MiB export; the server must answer and end the connection
/// when the bytes do, within a second.
pub fn nbd_server(data: &[u8]) {
    with_scratch(|ev, dir| {
        let path = dir.join("export.raw");
        let file = std::fs::File::create(&path).expect("create the export");
        file.set_len(1 << 20).expect("size the export");
        let path = path.to_string_lossy().into_owned();
        ev.block_on(async {
            let ctx = OpenCtx::new(strata_drivers::registry(), OpenFlags::default());
            let node = ctx
                .open_image(Some(&path), Some("raw"), Opts::new())
                .await
                .expect("open the export");
            let (perm, shared) = strata_nbd::export_perms(true);
            let blk = strata_block::Backend::new(&node, "an unnamed block device", perm, shared)
                .expect("a handle on the export");
            let server = strata_nbd::Server::new(Duration::from_millis(200));
            server.add(Arc::new(strata_nbd::Export {
                name: String::new(),
                description: None,
                blk: Arc::new(blk),
                writable: true,
                multi_conn: true,
                bitmaps: Vec::new(),
                allocation_depth: true,
                state: Default::default(),
            }));
            let (client, served) = tokio::io::duplex(1 << 16);
            let client_side = async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (mut r, mut w) = tokio::io::split(client);
                let writer = async {
                    let _ = w.write_all(data).await;
                    let _ = w.shutdown().await;
                };
                let mut sink = Vec::new();
                let reader = async {
                    let _ = r.read_to_end(&mut sink).await;
                };
                futures::join!(writer, reader);
            };
            let both = async { futures::join!(server.serve(served), client_side) };
            if tokio::time::timeout(Duration::from_secs(1), both)
                .await
                .is_err()
            {
                panic!("the NBD server did not end the connection within a second");
            }
            drop(server);
            let _ = node.close().await;
        });
    });
}

/// A hostile NBD server: the input is every byte it sends, from the
/// handshake on, to the `nbd` driver, which opens the export and then
/// reads, writes, zeroes, trims, flushes and asks block status, as
/// [`nbd_client_requests`] does. The client must give up, not hang or
/// allocate what the server claims, within a second once the server
/// has nothing more to say.
pub fn nbd_client(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    with_scratch(|ev, dir| {
        let sock = dir.join("server.sock");
        let _ = std::fs::remove_file(&sock);
        ev.block_on(async {
            let listener = tokio::net::UnixListener::bind(&sock).expect("bind the server socket");
            // Every connection (the driver may make more than one) gets
            // the same bytes; what the client sends is read and dropped.
            let server = async {
                while let Ok((s, _)) = listener.accept().await {
                    let (mut r, mut w) = s.into_split();
                    let say = async {
                        let _ = w.write_all(data).await;
                        let _ = w.shutdown().await;
                    };
                    let drain = async {
                        let mut sink = [0u8; 4096];
                        while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
                    };
                    futures::join!(say, drain);
                }
            };
            let sock = sock.to_string_lossy();
            let client = nbd_client_requests(&sock);
            tokio::select! {
                _ = server => unreachable!("the listener never fails"),
                done = tokio::time::timeout(Duration::from_secs(1), client) => {
                    assert!(done.is_ok(), "the NBD client did not give up within a second");
                }
            }
        });
    });
}

/// What the NBD client fuzz target asks of a server at `socket`: open the
/// export through the `nbd` driver, then one of each request. Its errors
/// are the point, so they are dropped. Also what `examples/nbd_client_seed`
/// runs against qemu-nbd to record the target's seeds.
pub async fn nbd_client_requests(socket: &str) {
    let json = serde_json::json!({
        "driver": "nbd",
        "server": {"type": "unix", "path": socket},
    });
    let ctx = OpenCtx::new(strata_drivers::registry(), OpenFlags::default());
    let Ok(node) = ctx
        .open_image(Some(&format!("json:{json}")), None, Opts::new())
        .await
    else {
        return;
    };
    let len = node.length();
    let n = len.min(65536);
    let _ = node.read(0, IoBuf::zeroed(n as usize)).await;
    let _ = node.block_status(0, len).await;
    let _ = node
        .write(0, IoBuf::filled(n as usize, 0x5a), WriteFlags::default())
        .await;
    let _ = node.write_zeroes(0, n, WriteFlags::default()).await;
    let _ = node.discard(0, n).await;
    let _ = node.flush().await;
    let tail = len.min(512);
    let _ = node.read(len - tail, IoBuf::zeroed(tail as usize)).await;
    let _ = node.close().await;
}

/// A strata-io command script (one command a line) on a small qcow2 image.
/// Commands that stop the process, wait on purpose or open other files
/// are left out, and so are sizes of a gigabyte or more: qemu-io, and so
/// strata-io, allocates what a command asks for.
pub fn io_commands(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let commands: Vec<&str> = s.lines().take(16).collect();
    let refused = ["abort", "sigraise", "sleep", "open", "wait_break", "break"];
    let huge = |t: &str| {
        let b = t.as_bytes();
        b.len() >= 2 && b[b.len() - 2].is_ascii_digit() && b"gGtTpPeE".contains(&b[b.len() - 1])
    };
    for c in &commands {
        let mut words = c.split_whitespace();
        let first = words.next().unwrap_or("");
        if refused.iter().any(|r| first.starts_with(r)) || c.split_whitespace().any(huge) {
            return;
        }
    }
    with_scratch(|ev, dir| {
        let image = dir.join("io.qcow2");
        let path = image.to_string_lossy().into_owned();
        ev.block_on(create_scratch_qcow2(&path));
        let mut argv = vec!["qemu-io".to_string(), "-f".into(), "qcow2".into()];
        for c in commands {
            argv.extend(["-c".into(), c.to_string()]);
        }
        argv.push(path);
        strata_tools::io::run(strata_drivers::registry(), &argv);
    });
}
