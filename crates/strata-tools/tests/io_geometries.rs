//! Images qemu-img and qemu-io make, of every cluster size and refcount
//! width, compat 0.10 and 1.1, with zero clusters and zlib or zstd
//! compressed clusters, read right through strata-io: the patterns verify,
//! and strata-io's `map` prints what qemu-io's prints.

use std::path::Path;
use std::process::Command;

const QEMU_IMG: &str = "/usr/bin/qemu-img";
const QEMU_IO: &str = "/usr/bin/qemu-io";

fn have_qemu() -> bool {
    if Path::new(QEMU_IO).exists() && Path::new(QEMU_IMG).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "qemu-img and qemu-io are required on CI"
    );
    println!("skipped: qemu-io not found");
    false
}

fn io(prog: &str, img: &Path, cmds: &[String]) -> (i32, String) {
    let mut c = Command::new(prog);
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(img).output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn every_geometry_reads_right_through_strata_io() {
    if !have_qemu() {
        return;
    }
    let strata_io = env!("CARGO_BIN_EXE_strata-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.qcow2");
    let mut cases = Vec::new();
    for cluster in [512u64, 4096, 65536, 2 << 20] {
        for refcount in [1u32, 2, 4, 8, 16, 32, 64] {
            cases.push((cluster, refcount, "1.1", "zlib"));
        }
        cases.push((cluster, 16, "0.10", "zlib"));
        cases.push((cluster, 16, "1.1", "zstd"));
    }
    for (cluster, refcount, compat, compression) in cases {
        let _ = std::fs::remove_file(&img);
        let mut opts = format!("cluster_size={cluster},refcount_bits={refcount},compat={compat}");
        if compression == "zstd" {
            opts.push_str(",compression_type=zstd");
        }
        let size = (cluster * 16).max(1 << 20).to_string();
        let st = Command::new(QEMU_IMG)
            .args(["create", "-q", "-f", "qcow2", "-o", &opts])
            .arg(&img)
            .arg(&size)
            .status()
            .unwrap();
        assert!(st.success(), "{opts}");
        let c = cluster;
        let fill = vec![
            format!("write -P 0x11 0 {}", 3 * c),
            format!("write -P 0x22 {} 777", 5 * c + 100),
            format!("write -z {c} {c}"),
            format!("write -c -P 0x44 {} {}", 8 * c, c),
            format!("write -c -P 0x55 {} {}", 9 * c, c),
        ];
        let (code, out) = io(QEMU_IO, &img, &fill);
        assert_eq!(code, 0, "{opts}: {out}");
        let reads = vec![
            format!("read -P 0x11 0 {c}"),
            format!("read -P 0 {c} {c}"),
            format!("read -P 0x11 {} {c}", 2 * c),
            format!("read -P 0x22 {} 777", 5 * c + 100),
            format!("read -P 0 {} 100", 5 * c),
            format!("read -P 0x44 {} {c}", 8 * c),
            format!("read -P 0x55 {} {c}", 9 * c),
            format!("read -P 0 {} {c}", 12 * c),
        ];
        let (code, out) = io(strata_io, &img, &reads);
        assert_eq!(code, 0, "{opts}: {out}");
        assert!(!out.contains("failed"), "{opts}: {out}");
        let (_, ours) = io(strata_io, &img, &["map".to_string()]);
        let (_, theirs) = io(QEMU_IO, &img, &["map".to_string()]);
        assert_eq!(ours, theirs, "map of {opts}");
    }
}
