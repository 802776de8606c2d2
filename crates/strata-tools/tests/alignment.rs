//! O_DIRECT on a device with 4096-byte logical sectors (a loop device set
//! up with `losetup --sector-size 4096`): the file driver must find that
//! requests need 4 KiB alignment, and the core must turn 512-byte and odd
//! requests into aligned read-modify-writes. The kernel refuses anything
//! else with EINVAL, so every step here fails without that.
//!
//! Needs root and loop devices; where /dev/loop-control exists, it must run.

use std::path::PathBuf;
use std::process::Command;

struct Loop {
    dev: String,
    backing: PathBuf,
}

impl Loop {
    fn new(size: u64) -> Option<Loop> {
        // A machine without loop device support cannot run this at all; one
        // that has it must (losetup failing there is a failure).
        if !std::path::Path::new("/dev/loop-control").exists() {
            println!("skipped: this machine has no loop devices (/dev/loop-control)");
            return None;
        }
        let backing = std::env::temp_dir().join(format!("strata-loop-{}.img", std::process::id()));
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(size))
            .unwrap();
        let out = Command::new("losetup")
            .args(["--sector-size", "4096", "--show", "-f"])
            .arg(&backing)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Loop {
                dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
                backing,
            }),
            other => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "losetup is required on CI: {other:?}"
                );
                println!("skipped: cannot set up a loop device ({other:?})");
                let _ = std::fs::remove_file(&backing);
                None
            }
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{prog} {args:?} failed:\n{text}");
    text
}

fn strata_io() -> &'static str {
    env!("CARGO_BIN_EXE_strata-io")
}

#[test]
fn unaligned_requests_on_a_4k_sector_device_with_o_direct() {
    let Some(lo) = Loop::new(16 << 20) else {
        return;
    };
    let dev = lo.dev.as_str();
    // raw: sub-sector writes at odd places, checked by QEMU.
    let out = run(
        strata_io(),
        &[
            "-t",
            "none",
            "-f",
            "raw",
            "-c",
            "write -P 0x11 512 512",
            "-c",
            "write -P 0x22 1000 3000",
            "-c",
            "write -P 0x33 8191 2",
            "-c",
            "write -z 20000 100",
            dev,
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let out = run(
        "/usr/bin/qemu-io",
        &[
            "-t",
            "none",
            "-f",
            "raw",
            "-c",
            "read -P 0 0 512",
            "-c",
            "read -P 0x11 512 488",
            "-c",
            "read -P 0x22 1000 3000",
            "-c",
            "read -P 0 4000 4191",
            "-c",
            "read -P 0x33 8191 2",
            "-c",
            "read -P 0 20000 100",
            dev,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // qcow2 on the device: metadata updates of 8 bytes (L1 entries,
    // refcounts) are read-modify-writes of whole sectors too.
    run("/usr/bin/qemu-img", &["create", "-f", "qcow2", dev, "8M"]);
    let out = run(
        strata_io(),
        &[
            "-t",
            "none",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 1000 70000",
            "-c",
            "read -P 0x44 1000 70000",
            "-c",
            "discard 0 64k",
            dev,
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let out = run("/usr/bin/qemu-img", &["check", "-f", "qcow2", dev]);
    assert!(out.contains("No errors were found"), "{out}");
    let out = run(
        "/usr/bin/qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x44 65536 5464", dev],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}
