//! What the kill tests share: the checks an image must pass after the
//! tool that had it open was killed.

use super::check::check_crashed;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub const QEMU_IMG: &str = "/usr/bin/qemu-img";

/// Runs qemu-img in `dir`; its exit code and stdout + stderr.
pub fn qemu_img(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(QEMU_IMG)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run qemu-img");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Checks `image` after a kill: no corruption, leaks allowed, or the
/// missing COPIED flags a crash in a snapshot operation leaves (see
/// crash_support/check.rs). Retries while the dead process's lock is
/// still held; returns how long that was.
pub fn check_after_kill(dir: &Path, image: &str) -> Duration {
    // Killed before it made the image (convert's target): nothing to check.
    if !dir.join(image).exists() {
        return Duration::ZERO;
    }
    let start = Instant::now();
    loop {
        let attempt = Instant::now();
        let (_, out) = qemu_img(dir, &["check", image]);
        if out.contains("lock") && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let file = dir.join(image).to_string_lossy().into_owned();
        if let Err(e) = check_crashed(QEMU_IMG, &file, "qcow2") {
            panic!("{image} after a kill: {e}");
        }
        return attempt - start;
    }
}

/// The guest data of `image`, as QEMU reads it.
pub fn guest_data(dir: &Path, image: &str) -> Vec<u8> {
    let raw = dir.join("guest.raw");
    let (code, out) = qemu_img(
        dir,
        &["convert", "-U", "-O", "raw", image, &raw.to_string_lossy()],
    );
    assert_eq!(code, 0, "{out}");
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    data
}
