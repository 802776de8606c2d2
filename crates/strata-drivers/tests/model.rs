//! Property test: random writes, zero writes, discards and reads over backing
//! chains of one to three qcow2 images, against a plain in-memory model. At
//! the end the contents must equal the model, `qemu-img check` must find
//! nothing wrong and `qemu-img compare` must agree with a raw copy of the model.

mod common;

use proptest::prelude::*;
use strata_block::{EventLoop, IoBuf, WriteFlags};

#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u64,
        len: u64,
        pattern: u8,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        cluster: u64,
        n: u64,
    },
    Read {
        off: u64,
        len: u64,
    },
    /// Start a new overlay on top of the current image.
    Overlay,
}

const SIZE: u64 = 2 << 20;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SIZE, 1..200_000u64, any::<u8>()).prop_map(|(off, len, pattern)| Op::Write { off, len: len.min(SIZE - off), pattern }),
        2 => (0..SIZE, 1..300_000u64, any::<bool>()).prop_map(|(off, len, unmap)| Op::Zero { off, len: len.min(SIZE - off), unmap }),
        1 => (0..64u64, 1..8u64).prop_map(|(cluster, n)| Op::Discard { cluster, n }),
        3 => (0..SIZE, 1..300_000u64).prop_map(|(off, len)| Op::Read { off, len: len.min(SIZE - off) }),
        1 => Just(Op::Overlay),
    ]
}

fn run_case(cluster_bits: u32, refcount_bits: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let Some(qemu_img) = common::qemu_tool("qemu-img") else {
        return Ok(());
    };
    let dir = tempfile::tempdir().unwrap();
    let cs = 1u64 << cluster_bits;
    let ev = EventLoop::new().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut layers = 0;
    let path = |i: usize| {
        dir.path()
            .join(format!("l{i}.qcow2"))
            .to_string_lossy()
            .into_owned()
    };
    let cluster_size = cs.to_string();
    let refcount = refcount_bits.to_string();
    let size = SIZE.to_string();
    ev.block_on(common::create(
        &path(0),
        "qcow2",
        &[
            ("size", &size),
            ("cluster_size", &cluster_size),
            ("refcount_bits", &refcount),
        ],
    ));
    let mut node = ev.block_on(common::open(&path(0), Some("qcow2")));
    for op in ops {
        match op {
            Op::Write { off, len, pattern } => {
                let buf = IoBuf::filled(len as usize, pattern);
                ev.block_on(node.write(off, buf, WriteFlags::default()))
                    .unwrap();
                model[off as usize..(off + len) as usize].fill(pattern);
            }
            Op::Zero { off, len, unmap } => {
                let flags = WriteFlags {
                    may_unmap: unmap,
                    ..WriteFlags::default()
                };
                ev.block_on(node.write_zeroes(off, len, flags)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { cluster, n } => {
                // Whole clusters of a v3 image read as zeroes after a discard.
                let off = (cluster * cs).min(SIZE);
                let len = (n * cs).min(SIZE - off);
                ev.block_on(node.discard(off, len)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { off, len } => {
                let got = ev
                    .block_on(node.read(off, IoBuf::zeroed(len as usize)))
                    .unwrap();
                prop_assert!(
                    got.as_slice() == &model[off as usize..(off + len) as usize],
                    "read at {off}+{len} differs"
                );
            }
            Op::Overlay => {
                if layers == 2 {
                    continue;
                }
                ev.block_on(node.close()).unwrap();
                drop(node);
                layers += 1;
                let base = format!("l{}.qcow2", layers - 1);
                ev.block_on(common::create(
                    &path(layers),
                    "qcow2",
                    &[
                        ("size", &size),
                        ("cluster_size", &cluster_size),
                        ("refcount_bits", &refcount),
                        ("backing_file", &base),
                        ("backing_fmt", "qcow2"),
                    ],
                ));
                node = ev.block_on(common::open(&path(layers), Some("qcow2")));
            }
        }
    }
    let all = ev
        .block_on(node.read(0, IoBuf::zeroed(SIZE as usize)))
        .unwrap();
    prop_assert!(
        all.as_slice() == &model[..],
        "final contents differ from the model"
    );
    ev.block_on(node.close()).unwrap();
    drop(node);
    for i in 0..=layers {
        let (code, out) = common::run(&qemu_img, &["check", &path(i)]);
        prop_assert_eq!(code, 0, "qemu-img check of layer {}: {}", i, out);
    }
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    let (code, out) = common::run(
        &qemu_img,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &raw.to_string_lossy(),
            &path(layers),
        ],
    );
    prop_assert_eq!(code, 0, "qemu-img compare: {}", out);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn random_ops_match_the_model(
        cluster_bits in prop_oneof![Just(9u32), Just(12), Just(16)],
        refcount_bits in prop_oneof![Just(1u32), Just(2), Just(16), Just(64)],
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run_case(cluster_bits, refcount_bits, ops)?;
    }
}

/// Found by the property test: a write that needs the refcount table to
/// grow on an image with 512-byte clusters and 64-bit refcounts.
#[test]
fn refcount_table_growth_small_clusters() {
    run_case(
        9,
        64,
        vec![Op::Write {
            off: 0,
            len: 32257,
            pattern: 0,
        }],
    )
    .unwrap();
}

/// The refcount table grows several times (512-byte clusters, 64-bit
/// refcounts: one table cluster covers 2 MiB of host file).
#[test]
fn refcount_table_grows_repeatedly() {
    let Some(qemu_img) = common::qemu_tool("qemu-img") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.qcow2").to_string_lossy().into_owned();
    let ev = EventLoop::new().unwrap();
    ev.block_on(common::create(
        &path,
        "qcow2",
        &[
            ("size", "16777216"),
            ("cluster_size", "512"),
            ("refcount_bits", "64"),
        ],
    ));
    let node = ev.block_on(common::open(&path, Some("qcow2")));
    for i in 0..6u64 {
        let buf = IoBuf::filled(1 << 20, i as u8 + 1);
        ev.block_on(node.write(i << 20, buf, WriteFlags::default()))
            .unwrap();
    }
    ev.block_on(node.close()).unwrap();
    let (code, out) = common::run(&qemu_img, &["check", &path]);
    assert_eq!(code, 0, "{out}");
    let qemu_io = common::qemu_tool("qemu-io").unwrap();
    let (code, out) = common::run(
        &qemu_io,
        &["-c", "read -P 6 5M 1M", "-c", "read -P 1 0 1M", &path],
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("fail"), "{out}");
}
