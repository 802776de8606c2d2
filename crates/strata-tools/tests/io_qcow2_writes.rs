//! qcow2 writes that take a path of their own: compressed clusters
//! (`write -c`) and VM state (`write -b`). The same commands through
//! strata-io and qemu-io must leave byte-identical images.

use std::path::Path;
use std::process::Command;

const QEMU_IO: &str = "/usr/bin/qemu-io";
const QEMU_IMG: &str = "/usr/bin/qemu-img";

fn have_qemu() -> bool {
    if Path::new(QEMU_IO).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "qemu-io is required on CI"
    );
    println!("skipped: qemu-io not found");
    false
}

/// Makes an image, runs `cmds` on it with `tool`, returns the image bytes.
fn image_after(tool: &str, create: &[&str], cmds: &[&str], tag: &str) -> Vec<u8> {
    let img = std::env::temp_dir().join(format!("strata-qw-{}-{tag}.qcow2", std::process::id()));
    let _ = std::fs::remove_file(&img);
    let st = Command::new(QEMU_IMG)
        .args(["create", "-q", "-f", "qcow2"])
        .args(create)
        .arg(&img)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    let mut c = Command::new(tool);
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(&img).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("failed"), "{tool}: {text}");
    let check = Command::new(QEMU_IMG)
        .arg("check")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let bytes = std::fs::read(&img).unwrap();
    std::fs::remove_file(&img).unwrap();
    bytes
}

fn same_image(create: &[&str], cmds: &[&str], tag: &str) {
    if !have_qemu() {
        return;
    }
    let ours = image_after(
        env!("CARGO_BIN_EXE_strata-io"),
        create,
        cmds,
        &format!("{tag}-s"),
    );
    let theirs = image_after(QEMU_IO, create, cmds, &format!("{tag}-q"));
    assert!(ours == theirs, "{tag}: images differ from QEMU's");
}

#[test]
fn compressed_clusters_pack_like_qemu() {
    // Several compressed clusters share host clusters; an ordinary write
    // copies one of them up. One cluster per write: QEMU compresses the
    // clusters of a longer write in parallel, and its layout then varies
    // from run to run.
    let cmds = [
        "write -c -P 7 0 64k",
        "write -c -P 8 64k 64k",
        "write -c -P 9 128k 64k",
        "write -c -P 10 192k 64k",
        "write -P 1 4k 4k",
        "read -P 9 128k 64k",
    ];
    same_image(&[], &cmds, "zlib");
    // zstd's stream depends on the library's version, and zlib-rs picks
    // other blocks than zlib for some small inputs: there, qemu-img check
    // and the pattern read stand for the comparison.
    if have_qemu() {
        let strata = env!("CARGO_BIN_EXE_strata-io");
        image_after(strata, &["-o", "compression_type=zstd"], &cmds, "zstd");
        let small = [
            "write -c -P 7 0 4k",
            "write -c -P 8 4k 4k",
            "write -c -P 9 8k 4k",
            "write -P 1 1k 1k",
            "read -P 9 8k 4k",
            "read -P 7 0 1k",
        ];
        image_after(strata, &["-o", "cluster_size=4096"], &small, "small");
    }
}

#[test]
fn vm_state_lives_after_the_disk_like_qemu() {
    same_image(
        &["-o", "cluster_size=1024"],
        &[
            "write -b -P 7 0 64k",
            "read -b -P 7 0 64k",
            "write -P 3 0 4k",
        ],
        "vmstate",
    );
}
