//! Records a seed for the `nbd_client` fuzz target: what a real server
//! (qemu-nbd, say) sends while the target's client requests run against
//! it through a recording proxy.
//!
//!   nbd_client_seed SERVER-SOCKET OUT-FILE

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, server, out] = &args[..] else {
        eprintln!("usage: nbd_client_seed SERVER-SOCKET OUT-FILE");
        std::process::exit(1);
    };
    let dir = tempfile::tempdir().expect("a scratch directory");
    let proxy = dir.path().join("proxy.sock");
    let ev = strata_block::EventLoop::new().expect("an event loop");
    let said = ev.block_on(async {
        let listener = tokio::net::UnixListener::bind(&proxy).expect("bind the proxy");
        let proxy_side = async {
            // One connection: the client's, passed on and recorded.
            let (c, _) = listener.accept().await.expect("the client connects");
            let s = tokio::net::UnixStream::connect(server)
                .await
                .expect("connect to the server");
            let (mut cr, mut cw) = c.into_split();
            let (mut sr, mut sw) = s.into_split();
            let up = async {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
            };
            let mut said = Vec::new();
            let down = async {
                let mut buf = [0u8; 65536];
                while let Ok(n @ 1..) = sr.read(&mut buf).await {
                    said.extend_from_slice(&buf[..n]);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = cw.shutdown().await;
            };
            futures::join!(up, down);
            said
        };
        let socket = proxy.to_string_lossy();
        let (said, ()) = futures::join!(proxy_side, strata_fuzz::nbd_client_requests(&socket));
        said
    });
    std::fs::write(out, &said).expect("write the seed");
    println!("{out}: {} bytes from the server", said.len());
}
