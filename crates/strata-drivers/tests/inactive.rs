//! The migration hand-off: Strata holds a qcow2 image inactive (no locks,
//! no writes) while QEMU's tools change it, then activates it and must see
//! exactly what they left: new clusters, a new size, or an image it cannot
//! use, which is an error that leaves the node inactive.

mod common;

use std::sync::Arc;
use strata_block::options::{nest, Opts};
use strata_block::{EventLoop, IoBuf, Node, OpenCtx, OpenFlags, WriteFlags};

const MIB: u64 = 1 << 20;

async fn open(opts: &[(&str, &str)]) -> Arc<Node> {
    let pairs: Vec<(String, String)> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let o: Opts = nest(&pairs).unwrap();
    OpenCtx::new(strata_drivers::registry(), OpenFlags::default())
        .open_image(None, None, o)
        .await
        .unwrap()
}

async fn read_byte(node: &Node, offset: u64) -> u8 {
    let r = node.read(offset, IoBuf::zeroed(4096)).await.unwrap();
    let b = r.as_slice()[0];
    assert!(
        r.as_slice().iter().all(|&x| x == b),
        "mixed data at {offset}"
    );
    b
}

fn qemu(tool: &str, args: &[&str]) -> Option<String> {
    let t = common::qemu_tool(tool)?;
    let (code, out) = common::run(&t, args);
    assert_eq!(code, 0, "{tool} {args:?}: {out}");
    Some(out)
}

fn tempdir(name: &str) -> String {
    let d = std::env::temp_dir().join(format!("strata-inactive-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}

#[test]
fn activation_reads_what_qemu_wrote_while_the_node_was_inactive() {
    let dir = tempdir("handoff");
    let img = format!("{dir}/t.qcow2");
    if qemu("qemu-img", &["create", "-q", "-f", "qcow2", &img, "1M"]).is_none() {
        return;
    }
    qemu("qemu-io", &["-c", "write -P 1 0 64k", &img]);
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        let node = open(&[
            ("driver", "qcow2"),
            ("file.driver", "file"),
            ("file.filename", &img),
            ("active", "off"),
        ])
        .await;
        assert!(!node.is_active());
        assert_eq!(read_byte(&node, 0).await, 1);
        // An inactive node writes nothing.
        let e = node
            .write(0, IoBuf::filled(4096, 9), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), libc::EPERM);

        // It holds no lock either: QEMU's tools change the image under it,
        // allocating new clusters (new L2 table, refcounts) and growing it.
        qemu(
            "qemu-io",
            &["-c", "write -P 2 0 64k", "-c", "write -P 3 512k 64k", &img],
        );
        qemu("qemu-img", &["resize", "-q", &img, "2M"]);

        node.activate().await.unwrap();
        assert!(node.is_active());
        assert_eq!(node.length(), 2 * MIB);
        assert_eq!(read_byte(&node, 0).await, 2);
        assert_eq!(read_byte(&node, 512 * 1024).await, 3);
        assert_eq!(read_byte(&node, MIB + 4096).await, 0);
        // Now it owns the image: it writes, and QEMU is locked out.
        node.write(MIB, IoBuf::filled(65536, 4), WriteFlags::default())
            .await
            .unwrap();
        let t = common::qemu_tool("qemu-io").unwrap();
        let (code, out) = common::run(&t, &["-c", "write 0 4k", &img]);
        assert_ne!(code, 0, "qemu-io wrote to an image Strata owns: {out}");

        // And hands it back: caches written, locks released.
        node.inactivate().await.unwrap();
        qemu(
            "qemu-io",
            &["-c", "read -P 4 1M 64k", "-c", "read -P 2 0 64k", &img],
        );
        qemu("qemu-io", &["-c", "write -P 5 1M 4k", &img]);
        node.activate().await.unwrap();
        assert_eq!(read_byte(&node, MIB).await, 5);
        node.close().await.unwrap();
    });
    let out = qemu("qemu-img", &["check", &img]).unwrap();
    assert!(out.contains("No errors were found"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_image_made_unusable_meanwhile_fails_activation_and_stays_inactive() {
    let dir = tempdir("broken");
    let img = format!("{dir}/t.qcow2");
    if qemu("qemu-img", &["create", "-q", "-f", "qcow2", &img, "1M"]).is_none() {
        return;
    }
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        let node = open(&[
            ("driver", "qcow2"),
            ("file.filename", &img),
            ("active", "off"),
        ])
        .await;
        // Someone overwrites the header's cluster bits with nonsense.
        qemu("qemu-io", &["-f", "raw", "-c", "write -P 0x7f 20 4", &img]);
        let e = node.activate().await.unwrap_err();
        assert!(
            e.to_string().starts_with("Could not reopen qcow2 layer: "),
            "{e}"
        );
        assert!(!node.is_active());
        let e = node
            .write(0, IoBuf::filled(4096, 9), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), libc::EPERM);
        node.close().await.unwrap();
    });
    let _ = std::fs::remove_dir_all(&dir);
}
