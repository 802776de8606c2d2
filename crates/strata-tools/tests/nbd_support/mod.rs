//! What the NBD tests share: running clients, servers on Unix sockets,
//! and an image with data, zeroes and a hole.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a client program; returns stdout + stderr.
pub fn client(prog: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("60")
        .arg(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e} (is it installed? .ci/run installs it)"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A server process on a Unix socket, killed when dropped.
pub struct Served {
    child: Child,
    pub sock: PathBuf,
}

impl Served {
    /// qemu-nbd or strata-nbd with `args`, listening on `sock`.
    pub fn start(server: &str, sock: &Path, args: &[&str]) -> Served {
        let mut cmd = Command::new(server);
        cmd.args(args).arg("-k").arg(sock);
        Served::spawn(cmd, sock)
    }

    /// strata-daemon serving NBD on `sock`, with `args` (nodes, exports).
    pub fn daemon(sock: &Path, args: &[&str]) -> Served {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata-daemon"));
        cmd.arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", sock.display()))
            .args(args);
        Served::spawn(cmd, sock)
    }

    /// Ends the server as a user would (see the Drop below) and waits.
    pub fn stop(self) {
        drop(self);
    }

    /// The server's resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// nbdkit in the foreground with a plugin and its parameters.
    pub fn nbdkit(sock: &Path, plugin: &[&str]) -> Served {
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-U"]).arg(sock).args(plugin);
        Served::spawn(cmd, sock)
    }

    fn spawn(mut cmd: Command, sock: &Path) -> Served {
        let _ = std::fs::remove_file(sock);
        let child = cmd
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e} (.ci/run installs it)"));
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{cmd:?} did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Served {
            child,
            sock: sock.to_path_buf(),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl Drop for Served {
    /// Ends the server as a user would (SIGTERM), and only kills it if it
    /// has not ended within 10 s: a killed server's image lock can outlive
    /// it by the few milliseconds the kernel takes to tear down its io_uring
    /// (issue "Integrity", 5), and the next step of a test opens the image.
    fn drop(&mut self) {
        // SAFETY: kill has no memory arguments.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A qcow2 image with data, a zero range and a hole, made by qemu-img.
pub fn image(dir: &Path) -> PathBuf {
    let img = dir.join("a.qcow2");
    let p = img.to_str().unwrap();
    client("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"]);
    client(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 1M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 7 8M 64k",
            p,
        ],
    );
    img
}
