//! The `vdi` format against QEMU's tools: strata-img and strata-io print
//! what qemu-img and qemu-io print and leave the same files (but for the
//! two random UUIDs of a new image); a damaged header gets QEMU's words;
//! concurrent writes into one new block, held by blkdebug, keep all data.

mod img_support;
use img_support::{
    both, io_status as io, mutant_rounds, mutants_read_alike, qemu_img, run, sorted_lines,
    strata_as_qemu_img, without_disk_usage, STRATA_IO,
};
use std::path::Path;
use std::process::Command;

/// The header's image and last-snapshot UUIDs, random in every new image.
const UUIDS: std::ops::Range<usize> = 0x188..0x1a8;

/// Offsets where two files differ, other than the UUIDs; and their lengths.
fn differences(a: &Path, b: &Path) -> (Vec<usize>, usize, usize) {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let d = (0..a.len().min(b.len()))
        .filter(|&i| a[i] != b[i] && !UUIDS.contains(&i))
        .collect();
    (d, a.len(), b.len())
}

#[test]
fn images_made_written_and_shown_as_qemu_does() {
    if qemu_img().is_none() {
        return;
    }
    let (q, s) = both(&[
        &["create", "-f", "vdi", "d.vdi", "5M"],
        &["create", "-f", "vdi", "-o", "static=on", "s.vdi", "5243880"],
        &["create", "-f", "vdi", "-o", "help"],
        &[
            "create",
            "-f",
            "vdi",
            "-o",
            "preallocation=metadata",
            "p.vdi",
            "1M",
        ],
        &["create", "-f", "vdi", "big.vdi", "3P"],
        &["create", "-q", "-f", "raw", "src.raw", "9M"],
    ]);
    for f in ["d.vdi", "s.vdi"] {
        let (d, la, lb) = differences(&q.path().join(f), &s.path().join(f));
        assert!(d.is_empty() && la == lb, "{f}: {d:?} {la} {lb}");
    }
    // Writes inside one block, across blocks, at odd offsets; then reads.
    let writes = [
        "write -P 1 1536k 4k",
        "write -P 2 100 3000",
        "write -P 3 4000k 600k",
        "aio_write -P 4 2M 8k",
        "aio_write -P 5 2056k 8k",
        "aio_flush",
        "write -z 64k 64k",
    ];
    let reads = [
        "read -P 2 100 3000",
        "read -P 0 0 100",
        "read -P 3 4000k 600k",
        "read -P 4 2M 8k",
        "read -P 5 2056k 8k",
        "read -P 0 3M 800k",
    ];
    for f in ["d.vdi", "s.vdi"] {
        let args = ["-f", "vdi", f];
        // QEMU finishes the write into the block another one is taking
        // first (it writes the map outside its lock); the order of aio
        // completions is not the point here.
        let want = sorted_lines(io("qemu-io", q.path(), &args, &writes));
        let got = sorted_lines(io(STRATA_IO, s.path(), &args, &writes));
        assert_eq!(got, want, "{f}");
        let (d, la, lb) = differences(&q.path().join(f), &s.path().join(f));
        assert!(
            d.is_empty() && la == lb,
            "{f} after writes: {d:?} {la} {lb}"
        );
        // Each tool reads what the other wrote.
        let want = io("qemu-io", s.path(), &args, &reads);
        let got = io(STRATA_IO, q.path(), &args, &reads);
        assert_eq!(got, want, "{f}");
        assert_eq!(got.1, 0, "{}", got.0);
    }
    let setup = |dir: &Path| {
        let (_, code) = io(
            "qemu-io",
            dir,
            &["-f", "raw", "src.raw"],
            &["write -P 5 0 1M", "write -P 6 3M 2100k", "write -P 7 8M 4k"],
        );
        assert_eq!(code, 0);
    };
    setup(q.path());
    setup(s.path());
    let strata = strata_as_qemu_img(s.path());
    for args in [
        &["info", "d.vdi"][..],
        &["info", "--output=json", "s.vdi"],
        &["map", "--output=json", "d.vdi"],
        &["map", "--output=json", "s.vdi"],
        &["map", "d.vdi"],
        &["check", "d.vdi"],
        &["check", "--output=json", "s.vdi"],
        &["check", "-r", "all", "d.vdi"],
        &["resize", "d.vdi", "8M"],
        &["measure", "-O", "vdi", "--size", "1M"],
        &["convert", "-f", "raw", "-O", "vdi", "src.raw", "c.vdi"],
        &["convert", "-O", "qcow2", "d.vdi", "d.qcow2"],
        &["compare", "-f", "vdi", "-F", "raw", "c.vdi", "src.raw"],
        &["compare", "d.vdi", "d.qcow2"],
        &["info", "--output=json", "c.vdi"],
    ] {
        let want = without_disk_usage(run(Path::new("/usr/bin/qemu-img"), args, q.path()));
        let got = without_disk_usage(run(&strata, args, s.path()));
        assert_eq!(got, want, "qemu-img {args:?}");
    }
    let (d, la, lb) = differences(&q.path().join("c.vdi"), &s.path().join("c.vdi"));
    assert!(d.is_empty() && la == lb, "converted: {d:?} {la} {lb}");
}

/// A dir of its own with a 3 MiB VDI image `x.vdi` made by qemu-img.
fn fresh() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vdi", "x.vdi", "3M"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    dir
}

/// A VDI header damaged at `at` with `bytes`, in a fresh dir of its own.
fn damaged(at: usize, bytes: &[u8]) -> tempfile::TempDir {
    let dir = fresh();
    let p = dir.path().join("x.vdi");
    let mut img = std::fs::read(&p).unwrap();
    img[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(&p, img).unwrap();
    dir
}

#[test]
fn damaged_headers_are_refused_in_qemus_words() {
    if qemu_img().is_none() {
        return;
    }
    let cases: &[(usize, &[u8])] = &[
        (0x44, &[2, 0, 1, 0]),                 // version 1.2
        (0x154, &[0x10, 2, 0, 0]),             // unaligned block map
        (0x158, &[0x10, 4, 0, 0]),             // unaligned data
        (0x168, &[0, 4, 0, 0]),                // 1024-byte sectors
        (0x178, &[0, 0, 0x20, 0]),             // 2 MiB blocks
        (0x170, &[0, 0, 0x40, 0, 0, 0, 0, 0]), // 4 MiB in 3 blocks
        (0x170, &[0, 0, 0, 0, 0, 0, 0, 1]),    // past VDI's largest
        (0x1a8, &[1]),                         // a link UUID
        (0x1b8, &[1]),                         // a parent UUID
        (0x180, &[0, 0, 0, 0x40]),             // too many blocks
    ];
    for (at, bytes) in cases {
        let dir = damaged(*at, bytes);
        let strata = strata_as_qemu_img(dir.path());
        let args = ["info", "-f", "vdi", "x.vdi"];
        let want = run(Path::new("/usr/bin/qemu-img"), &args, dir.path());
        let got = run(&strata, &args, dir.path());
        assert_eq!(got, want, "damage at {at:#x}");
        assert_eq!(got.2, 1, "{got:?}");
    }
    // A block map said to be larger than the file: QEMU reads zeroes past
    // the end (every block "at index 0"); Strata refuses, and allocates
    // nothing the header asks for.
    let dir = damaged(0x180, &[0, 0, 0, 0x1f]);
    let (text, code) = io(
        STRATA_IO,
        dir.path(),
        &["-f", "vdi", "x.vdi"],
        &["read 0 4k"],
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("lies past the end of the file"), "{text}");
}

/// A header whose count of allocated blocks is too low (a crash between
/// the map and the header, or a hostile image) makes QEMU hand out a block
/// that is in use; Strata allocates past every block the map points at.
#[test]
fn an_undercounted_header_never_makes_two_blocks_share_data() {
    if qemu_img().is_none() {
        return;
    }
    let dir = fresh();
    let args = ["-f", "vdi", "x.vdi"];
    let (t, c) = io("qemu-io", dir.path(), &args, &["write -P 0xa 0 1M"]);
    assert_eq!(c, 0, "{t}");
    let p = dir.path().join("x.vdi");
    let mut img = std::fs::read(&p).unwrap();
    img[0x184..0x188].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&p, img).unwrap();
    let (t, c) = io(
        STRATA_IO,
        dir.path(),
        &args,
        &[
            "write -P 0xb 1M 1M",
            "read -P 0xa 0 1M",
            "read -P 0xb 1M 1M",
        ],
    );
    assert_eq!(c, 0, "{t}");
    assert!(!t.contains("verification failed"), "{t}");
    let (t, c) = io("qemu-io", dir.path(), &args, &["read -P 0xa 0 1M"]);
    assert!(c == 0 && !t.contains("verification failed"), "{t}");
}

/// Writes into one block that has none yet, and into a second: the first
/// is held by blkdebug after taking its block, before writing it. The
/// others wait for it, find the block taken and write into it; nothing is
/// lost, the image checks clean, and QEMU reads every pattern.
#[test]
fn writes_racing_into_a_new_block_share_it() {
    if qemu_img().is_none() {
        return;
    }
    let dir = fresh();
    let (t, c) = io(
        STRATA_IO,
        dir.path(),
        &[],
        &[
            "open -o driver=vdi blkdebug::x.vdi",
            "break cluster_alloc A",
            "aio_write -P 0xa 0 4k",
            "wait_break A",
            "aio_write -P 0xb 512k 4k",
            "aio_write -P 0xc 1M 4k",
            "aio_write -P 0xd 8k 4k",
            "resume A",
            "aio_flush",
            "read -P 0xa 0 4k",
            "read -P 0xb 512k 4k",
            "read -P 0xc 1M 4k",
            "read -P 0xd 8k 4k",
            "read -P 0 4k 4k",
        ],
    );
    assert!(c == 0 && !t.contains("verification failed"), "{t}");
    let out = Command::new("qemu-img")
        .args(["check", "x.vdi"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (t, c) = io(
        "qemu-io",
        dir.path(),
        &["-f", "vdi", "x.vdi"],
        &[
            "read -P 0xa 0 4k",
            "read -P 0xb 512k 4k",
            "read -P 0xc 1M 4k",
            "read -P 0xd 8k 4k",
        ],
    );
    assert!(c == 0 && !t.contains("verification failed"), "{t}");
    // Two blocks, the first written first.
    let len = std::fs::metadata(dir.path().join("x.vdi")).unwrap().len();
    assert_eq!(len, 1024 + 2 * 1048576);
}

/// A map entry past the map's own length (damage `check` reports) does
/// not send new blocks after it: the file grows by the block written.
#[test]
fn a_damaged_entry_does_not_move_new_blocks_past_it() {
    if qemu_img().is_none() {
        return;
    }
    let dir = damaged(0x200, &0xffff_fff0u32.to_le_bytes());
    let (t, c) = io(
        STRATA_IO,
        dir.path(),
        &["-f", "vdi", "x.vdi"],
        &["write -P 0xb 1M 64k", "read -P 0xb 1M 64k"],
    );
    assert!(c == 0 && !t.contains("verification failed"), "{t}");
    let len = std::fs::metadata(dir.path().join("x.vdi")).unwrap().len();
    assert_eq!(len, 1024 + 1048576);
}

/// Headers and block maps changed at random: Strata refuses what QEMU
/// refuses, in its words, and reads the rest as QEMU reads it, except
/// where Strata is stricter on purpose (a map past the file's end).
#[test]
fn mutated_images_are_refused_or_read_as_qemu_reads_them() {
    if qemu_img().is_none() {
        return;
    }
    let dir = fresh();
    let (t, c) = io(
        "qemu-io",
        dir.path(),
        &["-f", "vdi", "x.vdi"],
        &["write -P 1 0 64k", "write -P 2 2M 512k"],
    );
    assert_eq!(c, 0, "{t}");
    let (rounds, seed) = mutant_rounds();
    let fix = |_: &mut [u8], _: u64| {};
    let image = ("vdi", "x.vdi");
    let read = mutants_read_alike(
        dir.path(),
        image,
        1024,
        (rounds, seed),
        fix,
        &["lies past the end of the file"],
    );
    eprintln!("{read} of {rounds} mutants read");
    assert!(read > rounds / 10, "only {read} mutants were read");
}
