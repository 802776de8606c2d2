//! A throwaway Ceph cluster for the tests, and the helpers they share.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const STRATA_IO: &str = env!("CARGO_BIN_EXE_strata-io");
pub const STRATA_IMG: &str = env!("CARGO_BIN_EXE_strata-img");

/// A running cluster, stopped and removed when dropped.
pub struct Cluster {
    dir: PathBuf,
    pub conf: String,
}

impl Cluster {
    /// None where Ceph's daemons are not installed (`.ci/run` installs
    /// them).
    pub fn start(dir: &Path) -> Option<Cluster> {
        if Command::new("ceph-mon").arg("--version").output().is_err() {
            eprintln!("ceph-mon not installed: the rbd tests do not run");
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-cluster");
        let dir = dir.join("ceph");
        let out = Command::new(&script)
            .args(["start", &dir.display().to_string()])
            .output()
            .unwrap();
        let c = Cluster {
            dir,
            conf: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        };
        assert!(out.status.success(), "{}", text(&out));
        c.ceph(&["osd", "pool", "create", "rbd", "8", "8"]);
        c.rbd(&["pool", "init", "rbd"]);
        Some(c)
    }

    /// Runs a `ceph` command, which must succeed. A monitor slowed by a
    /// busy machine may fail to hand the client its command table ("problem
    /// getting command descriptions", seen in CI): that is asked again.
    pub fn ceph(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("ceph");
        cmd.args(["-c", &self.conf]).args(args);
        for _ in 0..10 {
            let out = cmd.output().unwrap();
            if !text(&out).contains("problem getting command descriptions") {
                assert!(out.status.success(), "{cmd:?}: {}", text(&out));
                return text(&out);
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        ok(&mut cmd)
    }

    pub fn rbd(&self, args: &[&str]) -> String {
        ok(Command::new("rbd").args(["-c", &self.conf]).args(args))
    }

    /// Makes a raw image of 1 MiB objects with strata-img.
    pub fn create_raw(&self, image: &str, size: &str) {
        ok(Command::new(STRATA_IMG).args([
            "create",
            "-f",
            "raw",
            "-o",
            "cluster_size=1M",
            &self.name(image),
            size,
        ]));
    }

    /// An `rbd:` file name for `image` in pool `rbd` of this cluster.
    pub fn name(&self, image: &str) -> String {
        format!("rbd:rbd/{image}:conf={}", self.conf)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-cluster");
        let _ = Command::new(script)
            .args(["stop", &self.dir.display().to_string()])
            .output();
    }
}

pub fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// Runs `cmd`, which must succeed; its output.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    text(&out)
}

/// Runs `cmd`, which must fail with exit code 1; its output.
pub fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{cmd:?}: {}", text(&out));
    text(&out)
}

pub fn qemu_io_ok(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-r", "-f", fmt]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = ok(c.arg(img));
    assert!(!out.contains("fail"), "{out}");
}

pub fn path(p: &Path) -> String {
    p.display().to_string()
}

pub fn qemu_img(args: &[&str]) -> String {
    ok(Command::new("qemu-img").args(args))
}

/// The data extents (start, length) of `strata-img map --output=json`.
pub fn data_extents(map: &str) -> Vec<(u64, u64)> {
    serde_json::from_str::<Vec<serde_json::Value>>(map)
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}
