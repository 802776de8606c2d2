//! The `vpc` (VHD) format against QEMU's tools: strata-img and strata-io
//! print what qemu-img and qemu-io print and leave the same files (but for
//! the footer's time stamp, UUID and checksum); a damaged footer or header
//! gets QEMU's words; concurrent writes into one new block, held by
//! blkdebug, keep all data.

mod img_support;
use img_support::{
    both, io_status as io, mutant_rounds, mutants_read_alike, qemu_img, run, sorted_lines,
    strata_as_qemu_img, without_disk_usage, STRATA_IO,
};
use std::path::Path;
use std::process::Command;

const QEMU_IMG: &str = "/usr/bin/qemu-img";

/// Bytes of a footer that differ between any two new images: the time
/// stamp, the checksum and the UUID.
fn random_in_footer(i: usize) -> bool {
    (24..28).contains(&i) || (64..84).contains(&i)
}

/// Offsets where two VHD files differ, other than in the footers at the
/// start and at the end; and their lengths.
fn differences(a: &Path, b: &Path) -> (Vec<usize>, usize, usize) {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let last = a.len().saturating_sub(512);
    let d = (0..a.len().min(b.len()))
        .filter(|&i| a[i] != b[i])
        .filter(|&i| !(random_in_footer(i) || i >= last && random_in_footer(i - last)))
        .collect();
    (d, a.len(), b.len())
}

fn same_files(q: &Path, s: &Path, f: &str) {
    let (d, la, lb) = differences(&q.join(f), &s.join(f));
    assert!(d.is_empty() && la == lb, "{f}: {d:?} {la} {lb}");
}

#[test]
fn images_made_written_and_shown_as_qemu_does() {
    if qemu_img().is_none() {
        return;
    }
    let (q, s) = both(&[
        &["create", "-f", "vpc", "d.vpc", "10M"],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            "f.vpc",
            "10M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            "g.vpc",
            "10000001",
        ],
        &["create", "-f", "vpc", "-o", "help"],
        &["create", "-f", "vpc", "z.vpc", "0"],
        // Refused after the file is made, as QEMU does.
        &["create", "-f", "vpc", "-o", "subformat=foo", "b.vpc", "1M"],
        &["create", "-f", "vpc", "h.vpc", "3000G"],
        &["create", "-q", "-f", "raw", "src.raw", "9M"],
    ]);
    for f in ["d.vpc", "f.vpc", "g.vpc", "z.vpc", "b.vpc", "h.vpc"] {
        same_files(q.path(), s.path(), f);
    }
    // Writes inside one block, across blocks, at odd offsets, two racing
    // into one new block; then reads.
    let writes = [
        "write -P 1 1536k 4k",
        "write -P 2 100 3000",
        "write -P 3 4000k 600k",
        "aio_write -P 4 6M 8k",
        "aio_write -P 5 6152k 8k",
        "aio_flush",
        "write -z 64k 64k",
    ];
    let reads = [
        "read -P 2 100 3000",
        "read -P 0 0 100",
        "read -P 3 4000k 600k",
        "read -P 4 6M 8k",
        "read -P 5 6152k 8k",
        "read -P 0 8M 800k",
    ];
    for f in ["d.vpc", "f.vpc"] {
        let args = ["-f", "vpc", f];
        let want = sorted_lines(io("qemu-io", q.path(), &args, &writes));
        let got = sorted_lines(io(STRATA_IO, s.path(), &args, &writes));
        assert_eq!(got, want, "{f}");
        same_files(q.path(), s.path(), f);
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
        &["info", "d.vpc"][..],
        &["info", "--output=json", "-f", "vpc", "f.vpc"],
        &["info", "f.vpc"],
        &["info", "g.vpc"],
        &["info", "z.vpc"],
        &["map", "--output=json", "d.vpc"],
        &["map", "--output=json", "-f", "vpc", "f.vpc"],
        &["map", "d.vpc"],
        &["check", "d.vpc"],
        &["resize", "d.vpc", "20M"],
        &["measure", "-O", "vpc", "--size", "1M"],
        &["convert", "-f", "raw", "-O", "vpc", "src.raw", "c.vpc"],
        &[
            "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", "src.raw", "cf.vpc",
        ],
        &["convert", "-O", "qcow2", "d.vpc", "d.qcow2"],
        &["compare", "-f", "vpc", "-F", "raw", "c.vpc", "src.raw"],
        &["compare", "-f", "vpc", "-F", "raw", "cf.vpc", "src.raw"],
        &["compare", "d.vpc", "d.qcow2"],
        &["info", "--output=json", "c.vpc"],
        &[
            "info",
            "json:{\"driver\": \"vpc\", \"force_size_calc\": \"x\", \"file\": {\"driver\": \"file\", \"filename\": \"d.vpc\"}}",
        ],
    ] {
        let want = without_disk_usage(run(Path::new(QEMU_IMG), args, q.path()));
        let got = without_disk_usage(run(&strata, args, s.path()));
        assert_eq!(got, want, "qemu-img {args:?}");
    }
    same_files(q.path(), s.path(), "c.vpc");
    same_files(q.path(), s.path(), "cf.vpc");
}

/// A dir of its own with a 10 MiB dynamic VHD `x.vpc` made by qemu-img.
fn fresh() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new(QEMU_IMG)
        .args(["create", "-q", "-f", "vpc", "x.vpc", "10M"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    dir
}

/// The footer's checksum: the one's complement of its byte sum.
fn footer_checksum(f: &[u8]) -> u32 {
    let sum = f
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(b as u32));
    !sum
}

/// `x.vpc` damaged at `at` with `bytes`, in a fresh dir of its own; with
/// `resum` the first footer gets a checksum that fits again.
fn damaged(at: usize, bytes: &[u8], resum: bool) -> tempfile::TempDir {
    let dir = fresh();
    let p = dir.path().join("x.vpc");
    let mut img = std::fs::read(&p).unwrap();
    img[at..at + bytes.len()].copy_from_slice(bytes);
    if resum {
        let sum = footer_checksum(&img[..512]);
        img[64..68].copy_from_slice(&sum.to_be_bytes());
    }
    std::fs::write(&p, img).unwrap();
    dir
}

/// `x.vpc` as Hyper-V would have made it, `size` bytes by its footer.
fn hyper_v(size: u64) -> tempfile::TempDir {
    let dir = fresh();
    let p = dir.path().join("x.vpc");
    let mut img = std::fs::read(&p).unwrap();
    img[28..32].copy_from_slice(b"win ");
    img[48..56].copy_from_slice(&size.to_be_bytes());
    let sum = footer_checksum(&img[..512]);
    img[64..68].copy_from_slice(&sum.to_be_bytes());
    std::fs::write(&p, img).unwrap();
    dir
}

/// Both tools' `info` of `x.vpc` in `dir` (with the extra arguments
/// before the name), QEMU's output required.
fn same_info(dir: &Path, args: &[&str], what: &str) -> (String, String, i32) {
    let strata = strata_as_qemu_img(dir);
    let mut a = vec!["info"];
    a.extend_from_slice(args);
    let want = run(Path::new(QEMU_IMG), &a, dir);
    let got = run(&strata, &a, dir);
    assert_eq!(got, want, "{what}");
    got
}

#[test]
fn damaged_images_are_refused_in_qemus_words() {
    if qemu_img().is_none() {
        return;
    }
    // (where, bytes, fix the checksum, what)
    let cases: &[(usize, &[u8], bool, &str)] = &[
        (100, &[1], false, "checksum"),
        (0, b"conectiy", false, "no cookie at either end"),
        (16, &[0xff; 8], true, "header past any read"),
        (16, &[0, 0, 0, 0, 0, 1, 0, 0], true, "header past the end"),
        (512, b"cxsparsf", false, "header magic"),
        (512 + 32, &[0, 0x20, 0, 1], false, "block size"),
        (512 + 28, &[0, 0, 0, 2], false, "table too small"),
        (512 + 28, &[0x80, 0, 0, 0], false, "negative entries"),
        (
            512 + 28,
            &[0x20, 0, 0, 0],
            false,
            "entries past int's quarter",
        ),
        (
            512 + 28,
            &[0x1f, 0xff, 0xff, 0xff],
            false,
            "table past the end",
        ),
        (
            512 + 16,
            &[0, 0, 0, 0, 0, 0, 0x40, 0],
            false,
            "table offset",
        ),
        (1536, &[0, 0, 0x10, 0], false, "an entry past the end"),
    ];
    for (at, bytes, resum, what) in cases {
        let dir = damaged(*at, bytes, *resum);
        let got = same_info(dir.path(), &["-f", "vpc", "x.vpc"], what);
        assert_eq!(got.2, 1, "{what}: {got:?}");
    }
    // Hyper-V's creator: the size is the footer's, past 2040 GiB here.
    let dir = hyper_v(3000 << 30);
    let got = same_info(dir.path(), &["x.vpc"], "past 2040 GiB");
    assert_eq!(got.2, 1, "{got:?}");
    // 4 MiB in its footer, 10 MiB by its geometry, when asked for.
    let dir = hyper_v(4 << 20);
    let got = same_info(dir.path(), &["x.vpc"], "footer size");
    assert!(got.0.contains("virtual size: 4 MiB"), "{got:?}");
    let chs = "json:{\"driver\": \"vpc\", \"force_size_calc\": \"chs\", \"file\": {\"driver\": \"file\", \"filename\": \"x.vpc\"}}";
    let got = same_info(dir.path(), &[chs], "chs");
    assert!(got.0.contains("virtual size: 10 MiB"), "{got:?}");
    // Too short to hold a footer.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.vpc"), [0u8; 100]).unwrap();
    same_info(dir.path(), &["-f", "vpc", "x.vpc"], "short file");
}

/// Writes into one block that has none yet, and into a second: the first
/// is held by blkdebug after taking its block, before writing it. The
/// others wait for it, find the block taken and write into it; nothing is
/// lost, and QEMU reads every pattern.
#[test]
fn writes_racing_into_a_new_block_share_it() {
    if qemu_img().is_none() {
        return;
    }
    let dir = fresh();
    let patterns = [
        "read -P 0xa 0 4k",
        "read -P 0xb 1M 4k",
        "read -P 0xc 2M 4k",
        "read -P 0xd 8k 4k",
        "read -P 0 4k 4k",
        "read -P 0 4M 1M",
    ];
    let mut cmds = vec![
        "open -o driver=vpc blkdebug::x.vpc",
        "break cluster_alloc A",
        "aio_write -P 0xa 0 4k",
        "wait_break A",
        "aio_write -P 0xb 1M 4k",
        "aio_write -P 0xc 2M 4k",
        "aio_write -P 0xd 8k 4k",
        "resume A",
        "aio_flush",
    ];
    cmds.extend(patterns);
    let (t, c) = io(STRATA_IO, dir.path(), &[], &cmds);
    assert!(c == 0 && !t.contains("verification failed"), "{t}");
    let (t, c) = io("qemu-io", dir.path(), &["-f", "vpc", "x.vpc"], &patterns);
    assert!(c == 0 && !t.contains("verification failed"), "{t}");
    // Two blocks, each a bitmap sector and 2 MiB, between the table and
    // the footer.
    let len = std::fs::metadata(dir.path().join("x.vpc")).unwrap().len();
    assert_eq!(len, 2048 + 2 * (512 + 2097152) + 512);
}

/// Footers, headers and tables changed at random: Strata refuses what
/// QEMU refuses, in its words, and reads the rest as QEMU reads it. Half
/// the mutants get a footer checksum that fits, to reach past it.
#[test]
fn mutated_images_are_refused_or_read_as_qemu_reads_them() {
    if qemu_img().is_none() {
        return;
    }
    let dir = fresh();
    let (t, c) = io(
        "qemu-io",
        dir.path(),
        &["-f", "vpc", "x.vpc"],
        &["write -P 1 0 64k", "write -P 2 3M 1M", "write -P 3 9M 512k"],
    );
    assert_eq!(c, 0, "{t}");
    // Footer, dynamic header and table.
    let (rounds, seed) = mutant_rounds();
    let fix = |img: &mut [u8], r: u64| {
        if r.is_multiple_of(2) {
            let sum = footer_checksum(&img[..512]);
            img[64..68].copy_from_slice(&sum.to_be_bytes());
        }
    };
    let image = ("vpc", "x.vpc");
    let read = mutants_read_alike(dir.path(), image, 2048, (rounds, seed), fix, &[]);
    eprintln!("{read} of {rounds} mutants read");
    assert!(read > rounds / 10, "only {read} mutants were read");
}

/// A Hyper-V image with 512-byte blocks, which have no bitmap at all (its
/// size rounds to zero sectors): writes across new blocks leave QEMU's
/// file but in one place, and each tool reads the other's. That place is
/// the old footer, inside the first new block: QEMU leaves it there and
/// reads it back as the guest's data; Strata writes zeroes over it.
#[test]
fn blocks_without_bitmaps_are_written_as_qemu_writes_them() {
    if qemu_img().is_none() {
        return;
    }
    let dirs = [hyper_v(65536), hyper_v(65536)];
    for d in &dirs {
        let p = d.path().join("x.vpc");
        let mut img = std::fs::read(&p).unwrap();
        // 128 entries of 512 bytes: the table's one sector.
        img[512 + 28..512 + 32].copy_from_slice(&128u32.to_be_bytes());
        img[512 + 32..512 + 36].copy_from_slice(&512u32.to_be_bytes());
        std::fs::write(&p, img).unwrap();
    }
    let args = ["-f", "vpc", "x.vpc"];
    // One request at a time: QEMU lets another request's blocks in
    // between a request's own (it writes data outside its lock), in an
    // order its scheduling decides.
    let cmds = [
        "write -P 1 1000 3000",
        "write -P 2 8k 2k",
        "write -P 3 12k 1k",
    ];
    let want = io("qemu-io", dirs[0].path(), &args, &cmds);
    let got = io(STRATA_IO, dirs[1].path(), &args, &cmds);
    assert_eq!(got, want);
    assert_eq!(got.1, 0, "{}", got.0);
    // The first new block (disk bytes 512..1024) is the file's 2048..2560:
    // its first 488 bytes were never written.
    let (d, la, lb) = differences(&dirs[0].path().join("x.vpc"), &dirs[1].path().join("x.vpc"));
    assert!(
        la == lb && d.iter().all(|i| (2048..2536).contains(i)),
        "{d:?}"
    );
    let strata_file = std::fs::read(dirs[1].path().join("x.vpc")).unwrap();
    assert!(strata_file[2048..2536].iter().all(|&b| b == 0));
    let reads = [
        "read -P 1 1000 3000",
        "read -P 2 8k 2k",
        "read -P 3 12k 1k",
        "read -P 0 13k 51k",
    ];
    let want = io("qemu-io", dirs[1].path(), &args, &reads);
    let got = io(STRATA_IO, dirs[0].path(), &args, &reads);
    assert_eq!(got, want);
    assert_eq!(got.1, 0, "{}", got.0);
    let (t, c) = io("qemu-io", dirs[1].path(), &args, &["read -P 0 512 488"]);
    assert!(c == 0 && !t.contains("verification failed"), "{t}");
}
