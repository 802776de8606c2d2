//! What an image a crash or a kill left must pass: `qemu-img check` finds
//! no corruption (leaks allowed), with one exception a crash inside a
//! snapshot operation may leave, which QEMU's own order leaves too.

use super::run;

/// Checks the image `file` (qcow2) as a crash left it: exit 0 or 3
/// (leaks only). Refcounts may be wrong only while the image is marked
/// dirty (lazy refcounts), which tells every opener to rebuild them: then
/// `strata-img check -r all`, what Strata's next open does, must succeed
/// and leave an image qemu-img finds nothing wrong with. (QEMU's `-r all`
/// cannot repair one thing such a crash leaves in QEMU's images as in
/// Strata's: a data cluster past the end of the file, its L2 entry
/// written, the write that would have grown the file lost.)
pub fn check_crashed(qemu_img: &str, file: &str, format: &str) -> Result<(), String> {
    if format != "qcow2" {
        return check_other(qemu_img, file, format);
    }
    if is_dirty(file) {
        let strata_img = env!("CARGO_BIN_EXE_strata-img");
        let (code, out) = run(strata_img, &["check", "-r", "all", "-f", "qcow2", file]);
        if code != 0 {
            return Err(format!("strata-img check -r all exited {code}:\n{out}"));
        }
    }
    let (code, out) = run(qemu_img, &["check", "-f", "qcow2", file]);
    match code {
        0 | 3 => Ok(()),
        2 => benign_flag_errors(qemu_img, file).map_err(|e| format!("{e}\nbefore repair:\n{out}")),
        _ => Err(format!("qemu-img check exited {code}:\n{out}")),
    }
}

/// Checks a vdi, vpc or qcow image a crash left: vpc and qcow have no
/// check (qemu-img says so, exit 63; the reads are their test); vdi's may find one thing, a
/// header that counts more blocks than its map uses, which is a leak
/// (the count is flushed before the map). A map that uses more blocks
/// than the count would make QEMU hand a used block out again: an error.
fn check_other(qemu_img: &str, file: &str, format: &str) -> Result<(), String> {
    let (code, out) = run(qemu_img, &["check", "-f", format, file]);
    let leak_only = |l: &str| {
        let Some(rest) = l.strip_prefix("ERROR: allocated blocks mismatch, is ") else {
            return false;
        };
        let n: Vec<u64> = rest
            .split(", should be ")
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        n.len() == 2 && n[0] < n[1]
    };
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("ERROR")).collect();
    match (format, code) {
        ("vpc" | "qcow", 63) | (_, 0) => Ok(()),
        ("vdi", 2) if !errors.is_empty() && errors.iter().all(|l| leak_only(l)) => Ok(()),
        _ => Err(format!("qemu-img check exited {code}:\n{out}")),
    }
}

/// The dirty bit of a version 3 qcow2 header (incompatible features,
/// bit 0).
fn is_dirty(file: &str) -> bool {
    let mut h = [0u8; 80];
    let Ok(f) = std::fs::File::open(file) else {
        return false;
    };
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut h, 0).is_ok()
        && u32::from_be_bytes(h[4..8].try_into().unwrap()) >= 3
        && h[79] & 1 != 0
}

/// Accepts the one kind of error a crash inside a snapshot operation may
/// leave: COPIED flags that disagree with refcounts that are only too
/// high (leaks), or flags missing on clusters with one reference. The
/// first goes once the leaks are repaired; the second makes the next
/// write copy the cluster, never write it in place. A COPIED flag on a
/// cluster that really has two references (a snapshot's data written in
/// place) stays an error. What is accepted must then repair with `-r all`.
/// Works on a copy: `file` stays as it was.
fn benign_flag_errors(qemu_img: &str, file: &str) -> Result<(), String> {
    let copy = format!("{file}.repaired");
    std::fs::copy(file, &copy).unwrap();
    run(qemu_img, &["check", "-r", "leaks", "-f", "qcow2", &copy]);
    let (code, out) = run(qemu_img, &["check", "-f", "qcow2", &copy]);
    let only_missing_flags = out
        .lines()
        .filter(|l| l.starts_with("ERROR"))
        .all(|l| l.starts_with("ERROR OFLAG_COPIED") && l.ends_with(" refcount=1"));
    if code != 0 && !(code == 2 && only_missing_flags) {
        return Err(format!(
            "qemu-img check after -r leaks exited {code}:\n{out}"
        ));
    }
    let (code, out) = run(qemu_img, &["check", "-r", "all", "-f", "qcow2", &copy]);
    std::fs::remove_file(&copy).ok();
    if code != 0 {
        return Err(format!("qemu-img check -r all exited {code}:\n{out}"));
    }
    Ok(())
}
