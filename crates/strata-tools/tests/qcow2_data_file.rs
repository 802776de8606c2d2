//! qcow2 images with an external data file, against QEMU 10.0.2's tools.
//!
//! Most cases run one shell script twice, in two fresh folders: once with
//! `qemu-img`/`qemu-io` being Strata's binaries (symlinks, so messages carry
//! the same program name), once with QEMU's. What they print must match, and
//! so must every file they leave behind, byte for byte. The other cases mix
//! the tools (one writes, the other reads or checks) or look into the files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const QEMU_BIN: &str = "/usr/bin";

/// True when QEMU's tools are there; without them a test is skipped, except
/// on CI, where they are required.
fn have_qemu() -> bool {
    if Path::new(QEMU_BIN).join("qemu-img").exists() && Path::new(QEMU_BIN).join("qemu-io").exists()
    {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "qemu-img and qemu-io are required on CI"
    );
    println!("skipped: QEMU's tools not found");
    false
}

/// A folder holding `qemu-img` and `qemu-io` that are Strata's binaries.
fn strata_bin(dir: &Path) -> PathBuf {
    let bin = dir.join("strata-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, exe) in [
        ("qemu-img", env!("CARGO_BIN_EXE_strata-img")),
        ("qemu-io", env!("CARGO_BIN_EXE_strata-io")),
    ] {
        std::os::unix::fs::symlink(exe, bin.join(name)).unwrap();
    }
    bin
}

/// Runs `script` with `sh` in `dir`, the tools found first in `bin`;
/// returns everything printed (stderr after stdout), timings masked.
fn sh(bin: &Path, dir: &Path, script: &str) -> String {
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("PATH", path)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned()
        + "--- stderr\n"
        + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .map(mask_varying)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A line without what differs between two runs of the same tool: the
/// times and rates of qemu-io's statistics, and disk usage, which depends
/// on how the filesystem allocated two different files.
fn mask_varying(line: &str) -> String {
    if let Some(i) = line.find(" ops; ") {
        if line.ends_with(" ops/sec)") {
            return format!("{} ops; TIMING", &line[..i]);
        }
    }
    for key in ["disk size: ", "\"actual-size\": "] {
        if let Some(i) = line.find(key) {
            return format!("{}{key}USAGE", &line[..i]);
        }
    }
    line.to_string()
}

/// Every regular file in `dir` (not in subfolders), by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// What one run of a script left: its output and its files.
struct Run {
    output: String,
    files: BTreeMap<String, Vec<u8>>,
}

/// Runs `script` with Strata's tools and with QEMU's, each in a fresh folder.
fn both(script: &str) -> (Run, Run) {
    let tmp = tempfile::tempdir().unwrap();
    let bin = strata_bin(tmp.path());
    let mut runs = Vec::new();
    for (name, tools) in [("ours", bin.as_path()), ("qemu", Path::new(QEMU_BIN))] {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let output = sh(tools, &dir, script);
        runs.push(Run {
            output,
            files: files(&dir),
        });
    }
    let qemu = runs.pop().unwrap();
    let ours = runs.pop().unwrap();
    (ours, qemu)
}

/// Strata's tools print what QEMU's print and leave the same bytes behind;
/// returns QEMU's output.
fn same(script: &str) -> String {
    same_run(script).output
}

/// [`same`], returning QEMU's run.
fn same_run(script: &str) -> Run {
    let (ours, qemu) = both(script);
    assert_eq!(ours.output, qemu.output, "output differs for: {script}");
    let names = |r: &Run| r.files.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&qemu), "files differ for: {script}");
    for (name, bytes) in &qemu.files {
        assert!(
            ours.files[name] == *bytes,
            "{name} differs from QEMU's for: {script}"
        );
    }
    qemu
}

/// Runs one tool in `dir` and returns (stdout, stderr, success).
fn tool(bin: &Path, dir: &Path, name: &str, args: &[&str]) -> (String, String, bool) {
    let out = Command::new(bin.join(name))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// `qemu-img check` of QEMU says the image is clean.
fn qemu_check_clean(dir: &Path, image: &str) {
    let (out, err, ok) = tool(Path::new(QEMU_BIN), dir, "qemu-img", &["check", image]);
    assert!(ok, "qemu-img check {image}: {out}{err}");
    assert!(out.contains("No errors were found on the image."), "{out}");
}

const CREATE_OPTIONS: &[&str] = &[
    "data_file=t.data",
    "data_file=t.data,data_file_raw=on",
    "data_file=t.data,data_file_raw=off",
    "data_file=t.data,preallocation=metadata",
    "data_file=t.data,preallocation=falloc",
    "data_file=t.data,preallocation=full",
    "data_file=t.data,data_file_raw=on,preallocation=full",
    "data_file=t.data,cluster_size=4096,refcount_bits=8",
    "data_file=t.data,data_file_raw=on,cluster_size=512",
    "data_file=t.data,lazy_refcounts=on,compression_type=zstd",
];

#[test]
fn create_writes_what_qemu_img_writes() {
    if !have_qemu() {
        return;
    }
    for o in CREATE_OPTIONS {
        let out = same(&format!(
            "qemu-img create -f qcow2 -o {o} t.qcow2 3M && qemu-img check t.qcow2 && \
             qemu-img info t.qcow2 && qemu-img info --output=json t.qcow2"
        ));
        assert!(out.contains("data_file=t.data"), "{out}");
    }
    // With a backing file, the data file name comes after the backing options.
    same(
        "qemu-img create -f qcow2 base.qcow2 1M && \
         qemu-img create -f qcow2 -o data_file=t.data -b base.qcow2 -F qcow2 t.qcow2 && \
         qemu-img info t.qcow2",
    );
}

#[test]
fn create_refuses_what_qemu_img_refuses() {
    if !have_qemu() {
        return;
    }
    for o in [
        "data_file_raw=on",
        "data_file=t.data,compat=0.10",
        "data_file=t.data,data_file_raw=on,backing_file=base.qcow2,backing_fmt=qcow2",
        "data_file=",
        "data_file=no/such/folder/t.data",
    ] {
        let run = same_run(&format!(
            "qemu-img create -f qcow2 base.qcow2 1M >/dev/null && \
             qemu-img create -f qcow2 -o {o} t.qcow2 1M; echo rc=$?"
        ));
        assert!(run.output.contains("rc=1"), "{}", run.output);
        // Nothing of the failed image is left behind.
        let names: Vec<&String> = run.files.keys().collect();
        assert_eq!(names, ["base.qcow2"], "{o}");
    }
}

#[test]
fn guest_data_lands_in_the_data_file_at_its_guest_offset() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bin = strata_bin(tmp.path());
    let dir = tmp.path();
    let (_, err, ok) = tool(
        &bin,
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=t.data",
            "t.qcow2",
            "4M",
        ],
    );
    assert!(ok, "{err}");
    let before = std::fs::read(dir.join("t.qcow2")).unwrap().len();
    let (out, err, ok) = tool(
        &bin,
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 0x5a 1M 192k",
            "-c",
            "write -P 0xa5 100 50",
            "t.qcow2",
        ],
    );
    assert!(ok, "{out}{err}");
    let image = std::fs::read(dir.join("t.qcow2")).unwrap();
    let data = std::fs::read(dir.join("t.data")).unwrap();
    // The image file gained one L2 table and no data.
    assert_eq!(image.len(), before.div_ceil(65536) * 65536 + 65536);
    assert!(!image.windows(512).any(|w| w.iter().all(|&b| b == 0x5a)));
    assert_eq!(data.len(), 4 << 20);
    assert!(data[1 << 20..(1 << 20) + (192 << 10)]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(data[100..150].iter().all(|&b| b == 0xa5));
    // Copy-on-write filled the rest of the first cluster with zeroes.
    assert!(data[..100].iter().chain(&data[150..65536]).all(|&b| b == 0));
    qemu_check_clean(dir, "t.qcow2");
    let (out, err, ok) = tool(
        Path::new(QEMU_BIN),
        dir,
        "qemu-io",
        &[
            "-c",
            "read -P 0x5a 1M 192k",
            "-c",
            "read -P 0xa5 100 50",
            "-c",
            "read -P 0 150 1000",
            "t.qcow2",
        ],
    );
    assert!(
        ok && !out.contains("fail") && !err.contains("fail"),
        "{out}{err}"
    );
}

#[test]
fn each_tool_reads_what_the_other_wrote() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ours = strata_bin(tmp.path());
    let qemu = Path::new(QEMU_BIN);
    for (writer, reader) in [(ours.as_path(), qemu), (qemu, ours.as_path())] {
        for opts in ["data_file=t.data", "data_file=t.data,data_file_raw=on"] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let (_, err, ok) = tool(
                writer,
                d,
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", "8M"],
            );
            assert!(ok, "{err}");
            let (out, err, ok) = tool(
                writer,
                d,
                "qemu-io",
                &[
                    "-c",
                    "write -P 0x11 0 100k",
                    "-c",
                    "write -P 0x22 1000000 3333",
                    "-c",
                    "write -z 2M 1M",
                    "-c",
                    "discard 4M 1M",
                    "t.qcow2",
                ],
            );
            assert!(ok, "{out}{err}");
            let (out, err, _) = tool(
                reader,
                d,
                "qemu-io",
                &[
                    "-c",
                    "read -P 0x11 0 100k",
                    "-c",
                    "read -P 0 100k 897600",
                    "-c",
                    "read -P 0x22 1000000 3333",
                    "-c",
                    "read -P 0 2M 6M",
                    "t.qcow2",
                ],
            );
            assert!(
                !out.contains("fail") && !out.contains("ismatch") && err.is_empty(),
                "{opts}: {out}{err}"
            );
            for checker in [ours.as_path(), qemu] {
                let (out, err, ok) = tool(checker, d, "qemu-img", &["check", "t.qcow2"]);
                assert!(ok && out.contains("No errors"), "{opts}: {out}{err}");
            }
        }
    }
}

#[test]
fn io_leaves_the_images_qemu_io_leaves() {
    if !have_qemu() {
        return;
    }
    // iotest 244's layout: unallocated, written, discarded, zeroed over
    // discarded, zeroed over data, zeroed over nothing.
    let io = "qemu-io -c 'write -P 0x11 1M 4M' -c 'discard 2M 2M' -c 'write -z 3M 3M' t.qcow2";
    let show = "qemu-img check t.qcow2; qemu-img map t.qcow2; qemu-img map --output=json t.qcow2";
    let out = same(&format!(
        "qemu-img create -f qcow2 -o data_file=t.data t.qcow2 64M && {io} && {show} && \
         qemu-io -f raw -c 'read -P 0x11 4M 1M' t.data"
    ));
    // A zero cluster that keeps its cluster leaves stale data in the data file.
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 4194304"),
        "{out}"
    );
    let out = same(&format!(
        "qemu-img create -f qcow2 -o data_file=t.data,data_file_raw=on t.qcow2 64M && {io} && \
         {show} && qemu-io -f raw -c 'read -P 0x11 1M 1M' -c 'read -P 0 3M 3M' t.data && \
         qemu-img compare -f raw t.data t.qcow2"
    ));
    // With data_file_raw, zeroes reach the data file: it reads as the disk.
    assert!(out.contains("Images are identical."), "{out}");
    // Partial clusters, copy-on-write from a backing file, in-place rewrites.
    same(
        "qemu-img create -f qcow2 b.qcow2 4M >/dev/null && \
         qemu-io -c 'write -P 0xaa 0 4M' b.qcow2 >/dev/null && \
         qemu-img create -f qcow2 -o data_file=t.data -b b.qcow2 -F qcow2 t.qcow2 >/dev/null && \
         qemu-io -c 'write -P 0x11 1000 3000' -c 'write -P 0x22 130000 70000' \
             -c 'write -z 1M 64k' -c 'write -z -u 2M 64k' -c 'discard 3M 64k' \
             -c 'write -P 0x33 0 512' t.qcow2 && \
         qemu-img check t.qcow2 && qemu-img map --output=json t.qcow2 && \
         qemu-io -c 'read -P 0x33 0 512' -c 'read -P 0xaa 512 488' -c 'read -P 0x11 1000 3000' \
             -c 'read -P 0x22 130000 70000' -c 'read -P 0 1M 64k' -c 'read -P 0xaa 3200k 64k' \
             t.qcow2",
    );
}

#[test]
fn opening_finds_the_data_file_as_qemu_does() {
    if !have_qemu() {
        return;
    }
    // iotest 244's open cases. The header's name is opened from the current
    // folder, not the image's; `info` never opens the data file.
    let out = same(
        "qemu-img create -f qcow2 -o data_file=t.data t.qcow2 64M >/dev/null; \
         qemu-io -c 'open t.qcow2' -c 'read -P 0 0 64k'; \
         qemu-io -c 'open -odata-file.filename=t.data t.qcow2' -c 'read -P 0 0 64k'; \
         qemu-io -c 'open -odata-file.filename=inexistent t.qcow2' -c 'read -P 0 0 64k'; \
         qemu-io --image-opts -c 'read -P 0 0 64k' \
             'driver=qcow2,file.filename=t.qcow2,data-file.driver=raw,data-file.file.filename=t.data'; \
         mkdir sub && cd sub && qemu-io -c 'read 0 512' ../t.qcow2; qemu-img info ../t.qcow2; cd ..; \
         /usr/bin/qemu-img amend -o data_file= t.qcow2; \
         qemu-io -c 'open t.qcow2' -c 'read -P 0 0 64k'; \
         qemu-io -c 'open -odata-file.filename=t.data t.qcow2' -c 'read -P 0 0 64k'; \
         qemu-img info t.qcow2; qemu-img info --output=json t.qcow2; \
         qemu-img create -f qcow2 t.qcow2 64M >/dev/null; \
         qemu-io -c 'open -odata-file.filename=t.data t.qcow2' -c 'read -P 0 0 64k'; \
         qemu-img create -f qcow2 r.qcow2 1M >/dev/null; \
         printf '\\002' | dd of=r.qcow2 bs=1 seek=95 conv=notrunc 2>/dev/null; \
         qemu-io -c 'read 0 512' r.qcow2",
    );
    for msg in [
        "Could not open 'inexistent': No such file or directory",
        "Could not open 't.data': No such file or directory",
        "'data-file' is required for this image",
        "'data-file' can only be set for images with an external data file",
        "data-file-raw requires a data file",
    ] {
        assert!(out.contains(msg), "no '{msg}' in {out}");
    }
}

#[test]
fn info_and_map_print_what_qemu_img_prints() {
    if !have_qemu() {
        return;
    }
    same(
        "qemu-img create -f qcow2 -o data_file=t.data,data_file_raw=on t.qcow2 1M >/dev/null && \
         qemu-io -c 'write -P 1 0 64k' t.qcow2 >/dev/null && \
         qemu-img info t.qcow2 && qemu-img info --output=json t.qcow2 && \
         qemu-img map t.qcow2 && qemu-img map --output=json t.qcow2 && \
         qemu-img check --output=json t.qcow2 && \
         qemu-io -c info -c map t.qcow2 && \
         qemu-img map --output=json \
           'json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"t.qcow2\"},\
\"data-file\":{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"t.data\"}}}' && \
         rm t.data && qemu-img info t.qcow2",
    );
}

#[test]
fn compressed_writes_are_refused() {
    if !have_qemu() {
        return;
    }
    let out = same(
        "qemu-img create -f qcow2 src.qcow2 4M >/dev/null && \
         qemu-io -c 'write -P 0x11 0 1M' src.qcow2 >/dev/null && \
         qemu-img convert -O qcow2 -c -o data_file=t.data src.qcow2 t.qcow2; echo rc=$?; \
         qemu-img convert -O qcow2 -o data_file=t.data src.qcow2 t.qcow2 && \
         qemu-img compare src.qcow2 t.qcow2 && \
         qemu-io -c 'write -c -P 0x22 0 64k' t.qcow2; qemu-img check t.qcow2",
    );
    assert!(
        out.contains("write failed: Operation not supported"),
        "{out}"
    );
}

#[test]
fn a_failed_data_write_frees_nothing() {
    if !have_qemu() {
        return;
    }
    // iotest 289: the data write fails after the L2 table is in place.
    let out = same(
        "printf '[inject-error]\\nevent = \"write_aio\"\\nerrno = \"5\"\\nonce = \"on\"\\n' > b.conf && \
         qemu-img create -f qcow2 -o data_file=t.data t.qcow2 64k >/dev/null && \
         qemu-io -c 'write 0 64k' \"json:{'driver': 'qcow2', \
             'file': {'driver': 'file', 'filename': 't.qcow2'}, \
             'data-file': {'driver': 'raw', 'file': {'driver': 'blkdebug', \
                 'config': 'b.conf', 'image': {'driver': 'file', 'filename': 't.data'}}}}\"; \
         qemu-img check t.qcow2 && /usr/bin/qemu-img check t.qcow2",
    );
    assert!(out.contains("write failed: Input/output error"), "{out}");
    assert!(!out.contains("Leaked") && !out.contains("ERROR"), "{out}");
}

#[test]
fn flush_reaches_the_data_file() {
    if !have_qemu() {
        return;
    }
    let out = same(
        "qemu-img create -f qcow2 -o data_file=t.data t.qcow2 1M >/dev/null; \
         qemu-io -t writeback -c 'write 0 512' -c flush \"json:{'driver': 'qcow2', \
             'file': {'driver': 'file', 'filename': 't.qcow2'}, \
             'data-file': {'driver': 'blkdebug', \
                 'inject-error': [{'event': 'none', 'iotype': 'flush'}], \
                 'image': {'driver': 'file', 'filename': 't.data'}}}\"; echo rc=$?",
    );
    assert!(out.contains("rc=1"), "{out}");
}

#[test]
fn resize_takes_the_data_file_along() {
    if !have_qemu() {
        return;
    }
    same(
        "qemu-img create -f qcow2 -o data_file=t.data t.qcow2 1M >/dev/null && \
         qemu-io -c 'write -P 7 0 1M' t.qcow2 >/dev/null && \
         qemu-img resize t.qcow2 3M && qemu-img resize --shrink t.qcow2 512k && \
         qemu-img resize --preallocation=falloc t.qcow2 2M && \
         qemu-img check t.qcow2 && qemu-img map --output=json t.qcow2",
    );
    // Growing a data_file_raw image maps the new area 1:1 at once, so data
    // already in the data file shows through (iotest 244).
    same(
        "qemu-img create -f qcow2 -o data_file=t.data,data_file_raw=on t.qcow2 1M >/dev/null && \
         truncate -s 2M t.data && qemu-io -f raw -c 'write -P 84 1M 1M' t.data >/dev/null && \
         qemu-img resize t.qcow2 2M && qemu-io -c 'read -P 84 1M 1M' t.qcow2 && \
         qemu-img compare -f raw t.data t.qcow2 && qemu-img check t.qcow2",
    );
}

#[test]
fn preallocation_fills_partial_clusters_as_qemu_does() {
    if !have_qemu() {
        return;
    }
    // Sizes that end inside a cluster: the rest of a newly mapped cluster is
    // copied on write (zeroes over what the data file held, or the backing
    // file's data), and falloc/full only reserve what the data file gains.
    same(
        "qemu-img create -f qcow2 -o data_file=f.data,preallocation=full f.qcow2 100k && \
         qemu-img create -f qcow2 -o data_file=g.data,preallocation=full g.qcow2 128k && \
         qemu-img create -f qcow2 -o data_file=i.data i.qcow2 100k >/dev/null && \
         qemu-io -f raw -c 'write -P 1 0 100k' i.data >/dev/null && \
         qemu-img resize --preallocation=metadata i.qcow2 150k && \
         qemu-io -f raw -c 'read -P 1 0 64k' -c 'read -P 0 64k 128k' i.data && \
         qemu-img create -f qcow2 -o data_file=u.data,data_file_raw=on u.qcow2 100k && \
         qemu-io -c 'write -P 3 0 100k' -c 'write -z 66000 36400' u.qcow2 && \
         qemu-img resize u.qcow2 300k && qemu-img check u.qcow2 && \
         qemu-img create -f qcow2 b.qcow2 1M >/dev/null && \
         qemu-io -c 'write -P 0xbb 0 1M' b.qcow2 >/dev/null && \
         qemu-img create -f qcow2 -o data_file=k.data -b b.qcow2 -F qcow2 k.qcow2 100k && \
         qemu-img resize --preallocation=falloc k.qcow2 250k && \
         qemu-io -c 'read -P 0xbb 0 100k' -c 'read -P 0 100k 150k' k.qcow2 && \
         qemu-img check k.qcow2 && du -k f.data g.data",
    );
}

#[test]
fn check_counts_fragments_per_l2_table() {
    if !have_qemu() {
        return;
    }
    // With 512-byte clusters an L2 table covers 32 KiB; QEMU counts a
    // fragment only within one table.
    same(
        "qemu-img create -f qcow2 -o data_file=v.data,cluster_size=512 v.qcow2 2M >/dev/null && \
         qemu-io -c 'write -P 5 1000 1M' -c 'write -z -u 4096 100000' \
             -c 'discard 500000 70000' v.qcow2 && qemu-img check v.qcow2",
    );
}

#[test]
fn bad_data_file_mappings_are_corruption() {
    if !have_qemu() {
        return;
    }
    // Cluster 0 pointing elsewhere in the data file, and a compressed entry.
    let out = same(
        "qemu-img create -f qcow2 -o data_file=t.data t.qcow2 1M >/dev/null && \
         qemu-io -c 'write -P 0x11 0 128k' t.qcow2 >/dev/null && cp t.qcow2 c.qcow2 && \
         printf '\\200\\0\\0\\0\\0\\2\\0\\0' | dd of=t.qcow2 bs=1 seek=262144 conv=notrunc 2>/dev/null; \
         printf '\\100\\0\\0\\0\\0\\5\\0\\0' | dd of=c.qcow2 bs=1 seek=262152 conv=notrunc 2>/dev/null; \
         qemu-io -c 'read 0 512' t.qcow2; qemu-img check t.qcow2; \
         qemu-io -c 'read 64k 512' c.qcow2; qemu-img check c.qcow2; qemu-img check -r all c.qcow2",
    );
    assert!(out.contains("does not match guest cluster offset"), "{out}");
    assert!(
        out.contains("ERROR compressed cluster 1 with data file"),
        "{out}"
    );
}

#[test]
fn locks_cover_the_data_file() {
    if !have_qemu() {
        return;
    }
    // While one process has the image open, nobody may resize its data file.
    let out = same(
        "qemu-img create -f qcow2 -o data_file=t.data t.qcow2 1M >/dev/null; \
         (qemu-io -c 'sleep 1500' t.qcow2 &); sleep 0.5; \
         qemu-img resize -f raw t.data 2M; qemu-io -f raw -c 'write 0 512' t.data; sleep 1.5",
    );
    assert!(out.contains("Failed to get \"resize\" lock"), "{out}");
}
