//! The filter drivers (copy-on-read, throttle, blkverify, blklogwrites,
//! quorum) through
//! strata-io, against qemu-io where QEMU's behaviour is the reference, and
//! on their own where the effect is what counts (data copied up, time
//! spent throttled, a corrupted copy repaired).

mod io_support;
use io_support::{have_oracle, same, same_files};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const STRATA_IO: &str = env!("CARGO_BIN_EXE_strata-io");

/// A base with 128 KiB of 0x5a and an empty overlay on it.
const OVERLAY: &str = "qemu-img create -f qcow2 base.qcow2 1M && \
    qemu-io -f qcow2 -c 'write -P 0x5a 0 128k' base.qcow2 && \
    qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2";

/// Runs strata-io in `dir`; panics unless it succeeds.
fn strata_io(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(STRATA_IO)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run strata-io");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "strata-io {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn sh(dir: &Path, script: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run setup");
    assert!(st.status.success(), "setup failed: {script}");
}

#[test]
fn copy_on_read_filter_matches_qemu() {
    if !have_oracle() {
        return;
    }
    let cor = "driver=copy-on-read,file.driver=qcow2,file.file.filename=top.qcow2";
    same(
        OVERLAY,
        &[
            "--image-opts",
            cor,
            "-c",
            "read -P 0x5a 1000 70000",
            "-c",
            "write -P 1 0 512",
            "-c",
            "map",
        ],
        None,
    );
    let open = format!("open -o {cor}");
    same(
        OVERLAY,
        &["-c", &open, "-c", "read -P 0x5a 100 100k", "-c", "map"],
        None,
    );
    // Data below `bottom` is read but not copied.
    let chain = format!(
        "{OVERLAY} && qemu-img create -f qcow2 -b top.qcow2 -F qcow2 t2.qcow2 && \
         qemu-io -f qcow2 -c 'write -P 0x33 64k 4k' top.qcow2"
    );
    same(
        &chain,
        &[
            "--image-opts",
            "driver=copy-on-read,bottom=mid,file.driver=qcow2,file.file.filename=t2.qcow2,file.backing.node-name=mid",
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "read -P 0x33 64k 4k",
            "-c",
            "map",
        ],
        None,
    );
    for bad in [
        "driver=copy-on-read",
        "driver=copy-on-read,bottom=nosuch,file.driver=qcow2,file.file.filename=top.qcow2",
        "driver=copy-on-read,foo=1,file.driver=qcow2,file.file.filename=top.qcow2",
    ] {
        same(OVERLAY, &["--image-opts", bad, "-c", "read 0 1"], None);
    }
    same(
        OVERLAY,
        &["-r", "--image-opts", cor, "-c", "read 0 1"],
        None,
    );
}

#[test]
fn copy_on_read_filter_fills_the_overlay() {
    if !have_oracle() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    sh(dir.path(), OVERLAY);
    strata_io(
        dir.path(),
        &[
            "--image-opts",
            "driver=copy-on-read,file.driver=qcow2,file.file.filename=top.qcow2",
            "-c",
            "read -P 0x5a 0 64k",
        ],
    );
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "top.qcow2"])
        .current_dir(dir.path())
        .output()
        .expect("qemu-img map");
    let map = String::from_utf8_lossy(&map.stdout);
    let first = map.lines().next().unwrap_or_default();
    assert!(
        first.contains("\"start\": 0, \"length\": 65536, \"depth\": 0")
            && first.contains("\"data\": true"),
        "the read was not copied into the overlay: {map}"
    );
    // The base's data is not copied where nothing read it.
    assert!(
        map.contains("\"start\": 65536, \"length\": 65536, \"depth\": 1"),
        "{map}"
    );
}

/// Runs `writes` writes of `chunk` bytes through throttle nodes of one group
/// limited to `bps` bytes per second; `children` nodes share the group
/// (under a quorum, which writes to all of them at once). Returns the time
/// it took.
fn throttled_writes(bps: u64, children: usize, writes: usize, chunk: u64) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = writes as u64 * chunk;
    for i in 0..children {
        let f = std::fs::File::create(dir.path().join(format!("t{i}.raw"))).expect("create");
        f.set_len(size).expect("set_len");
    }
    let object = format!("throttle-group,id=tg0,x-bps-total={bps}");
    let image = if children == 1 {
        "driver=throttle,throttle-group=tg0,file.driver=file,file.filename=t0.raw".to_string()
    } else {
        let mut s = format!("driver=quorum,vote-threshold={children}");
        for i in 0..children {
            s += &format!(
                ",children.{i}.driver=throttle,children.{i}.throttle-group=tg0,\
                 children.{i}.file.driver=file,children.{i}.file.filename=t{i}.raw"
            );
        }
        s
    };
    let cmds: Vec<String> = (0..writes)
        .map(|i| format!("write -P 7 {} {chunk}", i as u64 * chunk))
        .collect();
    let mut args = vec!["--object", &object, "--image-opts", &image];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    let start = Instant::now();
    let out = strata_io(dir.path(), &args);
    let took = start.elapsed();
    assert_eq!(out.matches("wrote ").count(), writes, "{out}");
    took
}

#[test]
fn throttle_holds_writes_to_the_group_rate() {
    const MIB: u64 = 1 << 20;
    // 4 MiB at 4 MiB/s: a write starts when the bucket is down to a tenth
    // of a second's worth (0.4 MiB) and is then counted in it, so after the
    // first, the rest wait (4 - 1 - 0.4) MiB / 4 MiB/s = 0.65 s in all
    // (qemu-io takes the same).
    let one = throttled_writes(4 * MIB, 1, 4, MIB);
    assert!(one >= Duration::from_millis(600), "took only {one:?}");
    // Two nodes of the group share its budget: 8 MiB in all, 1.65 s; with
    // a budget each they would be done in 0.65 s.
    let two = throttled_writes(4 * MIB, 2, 4, MIB);
    assert!(two >= Duration::from_millis(1500), "took only {two:?}");
    // A group with room to spare does not hold the same writes back.
    throttled_writes(1 << 40, 2, 4, MIB);
}

#[test]
fn throttle_options_match_qemu() {
    if !have_oracle() {
        return;
    }
    let setup = "qemu-img create -f raw a.raw 4M";
    let node = "driver=throttle,throttle-group=tg0,file.driver=file,file.filename=a.raw";
    same(setup, &["--image-opts", node, "-c", "read 0 512"], None);
    same(
        setup,
        &[
            "--image-opts",
            "driver=throttle,file.filename=a.raw",
            "-c",
            "read 0 512",
        ],
        None,
    );
    for object in [
        "throttle-group,id=tg0,x-bps-total=1048576",
        "throttle-group,id=tg0,limits.iops-total=1000,limits.iops-total-max=2000",
    ] {
        same(
            setup,
            &[
                "--object",
                object,
                "--image-opts",
                node,
                "-c",
                "write -P 3 0 64k",
                "-c",
                "read -P 3 0 64k",
                "-c",
                "map",
            ],
            None,
        );
    }
    let with_limits = format!("{node},limits.bps-total=1");
    same(
        setup,
        &[
            "--object",
            "throttle-group,id=tg0",
            "--image-opts",
            &with_limits,
            "-c",
            "read 0 1",
        ],
        None,
    );
    for object in [
        "throttle-group",
        "throttle-group,id=0tg",
        "throttle-group,id=tg0,x-bps-total=-1",
        "throttle-group,id=tg0,x-bps-total=abc",
        "throttle-group,id=tg0,x-bps-total=1,x-bps-read=1",
        "throttle-group,id=tg0,x-bps-total-max=10",
        "throttle-group,id=tg0,x-bps-total=100,x-bps-total-max=50",
        "throttle-group,id=tg0,x-bps-total-max-length=0",
        "throttle-group,id=tg0,x-bps-total-max-length=4294967296",
        "throttle-group,id=tg0,x-iops-size=10",
        "throttle-group,id=tg0,foo=1",
        "throttle-group,id=tg0,limits.foo=1",
        "throttle-group,id=tg0,limits.bps-total=abc",
        "throttle-group,id=tg0,limits.bps-total=-5",
        "throttle-group,id=tg0,limits.bps-total-max-length=4294967296",
    ] {
        same(
            setup,
            &["--object", object, "-c", "read 0 1", "-f", "raw", "a.raw"],
            None,
        );
    }
    same(
        setup,
        &[
            "--object",
            "throttle-group,id=tg0",
            "--object",
            "throttle-group,id=tg0",
            "-f",
            "raw",
            "a.raw",
        ],
        None,
    );
}

/// A raw reference, a qcow2 with the same data, and a qcow2 that differs at
/// byte 5000.
const VERIFY: &str = "qemu-img create -f raw r.raw 1M && \
    qemu-img create -f qcow2 t.qcow2 1M && qemu-img create -f qcow2 d.qcow2 1M && \
    qemu-io -f raw -c 'write -P 7 0 64k' r.raw && \
    qemu-io -f qcow2 -c 'write -P 7 0 64k' t.qcow2 && \
    qemu-io -f qcow2 -c 'write -P 7 0 64k' -c 'write -P 9 5000 10' d.qcow2";

#[test]
fn blkverify_matches_qemu() {
    if !have_oracle() {
        return;
    }
    same(
        VERIFY,
        &[
            "-c",
            "read -P 7 0 64k",
            "-c",
            "read 0 1M",
            "-c",
            "write -P 3 1k 2k",
            "-c",
            "read -P 3 1k 2k",
            "-c",
            "map",
            "blkverify:r.raw:t.qcow2",
        ],
        None,
    );
    // A difference ends the process with QEMU's report.
    same(
        VERIFY,
        &["-c", "read 0 1M", "blkverify:r.raw:d.qcow2"],
        None,
    );
    same(
        VERIFY,
        &[
            "-c",
            "read 0 4k",
            "-c",
            "read 4k 4k",
            "-c",
            "read 8k 4k",
            "blkverify:r.raw:d.qcow2",
        ],
        None,
    );
    for image in [
        "driver=blkverify,raw.filename=r.raw,test.file.filename=t.qcow2",
        "driver=blkverify,x-raw=r.raw,x-image=t.qcow2",
        "driver=blkverify,test.file.filename=t.qcow2",
        "driver=blkverify,raw.filename=r.raw",
    ] {
        same(VERIFY, &["--image-opts", image, "-c", "read 0 64k"], None);
    }
    for name in ["blkverify:r.raw", "blkverify:r.raw:nosuch"] {
        same(VERIFY, &["-c", "read 0 1", name], None);
    }
}

/// A raw image, an empty log, and a log of four entries in 4 KiB sectors.
const LOGGED: &str = "qemu-img create -f raw img.raw 1M && : > log && : > log4k && \
    qemu-io --image-opts -c 'write -P 4 0 8k' -c 'write -z 64k 4k' -c 'flush' \
    driver=raw,file.driver=blklogwrites,file.file.filename=img.raw,\
file.log.filename=log4k,file.log-sector-size=4096";

/// The log blklogwrites keeps is QEMU's, byte for byte: writes, zero
/// writes, discards, flushes (only after a write), the superblock update
/// interval, appending to a log in another sector size, and QEMU's errors.
#[test]
fn blklogwrites_logs_as_qemu_does() {
    if !have_oracle() {
        return;
    }
    let log = |extra: &str| {
        format!("driver=raw,file.driver=blklogwrites,file.file.filename=img.raw,file.log.filename=log{extra}")
    };
    let plain = log("");
    let workload = [
        "write -P 1 0 4k",
        "write -z 8k 12k",
        "flush",
        "flush",
        "write -P 2 1000 100",
        // Sequential: requests in flight complete, and are logged, in no
        // fixed order.
        "write -P 3 128k 64k",
        "write -P 5 512k 4k",
        "flush",
        "discard 64k 64k",
        "read -P 2 1000 100",
    ];
    let mut args = vec!["--image-opts"];
    for c in &workload {
        args.extend(["-c", c]);
    }
    for opts in [
        plain.clone(),
        log(",file.log-super-update-interval=2"),
        log(",file.log-sector-size=4096"),
    ] {
        let mut a = args.clone();
        a.push(&opts);
        same_files(LOGGED, &a, None, &["log", "img.raw"]);
    }
    // Appending finds the end of a log, whatever its sector size.
    for name in ["log", "log4k"] {
        let opts = format!(
            "driver=raw,file.driver=blklogwrites,file.file.filename=img.raw,file.log.filename={name},file.log-append=on"
        );
        let mut a = args.clone();
        a.push(&opts);
        same_files(LOGGED, &a, None, &["log", "log4k"]);
    }
    // Bad options and a log that is not one.
    for opts in [
        log(",file.log-sector-size=1000"),
        log(",file.log-sector-size=16"),
        log(",file.log-super-update-interval=0"),
        log(",file.log-append=on,file.log-sector-size=512"),
        "driver=raw,file.driver=blklogwrites,file.file.filename=img.raw,file.log.filename=img.raw,file.log-append=on".into(),
        "driver=raw,file.driver=blklogwrites,file.file.filename=img.raw".into(),
    ] {
        same(LOGGED, &["--image-opts", "-c", "read 0 4k", &opts], None);
    }
}

/// Three copies of 64 KiB of 0x11; the second has 0x22 in its first 4 KiB.
const COPIES: &str = "for i in 0 1 2; do qemu-img create -f raw q$i.raw 1M && \
    qemu-io -f raw -c 'write -P 0x11 0 64k' q$i.raw || exit 1; done && \
    qemu-io -f raw -c 'write -P 0x22 0 4k' q1.raw";

fn quorum(extra: &str) -> String {
    let mut s = format!("driver=quorum{extra}");
    for i in 0..3 {
        s += &format!(",children.{i}.driver=raw,children.{i}.file.filename=q{i}.raw");
    }
    s
}

#[test]
fn quorum_matches_qemu() {
    if !have_oracle() {
        return;
    }
    let io = [
        "-c",
        "read -P 0x11 0 4k",
        "-c",
        "read -P 0x11 4k 60k",
        "-c",
        "write -P 0x44 8k 4k",
        "-c",
        "read -P 0x44 8k 4k",
        "-c",
        "map",
    ];
    for extra in [
        ",vote-threshold=2",
        ",vote-threshold=3",
        ",vote-threshold=1,read-pattern=fifo",
        "",
        ",vote-threshold=0",
        ",vote-threshold=-1",
        ",vote-threshold=abc",
        ",vote-threshold=4",
        ",vote-threshold=2,read-pattern=x",
        ",vote-threshold=2,blkverify=on",
        ",vote-threshold=2,rewrite-corrupted=on,blkverify=on",
        ",vote-threshold=2,read-pattern=fifo,blkverify=on",
        ",vote-threshold=2,foo=1",
    ] {
        let image = quorum(extra);
        let mut args = vec!["--image-opts", image.as_str()];
        args.extend(io);
        same(COPIES, &args, None);
    }
    for image in [
        "driver=quorum,vote-threshold=1",
        "driver=quorum,vote-threshold=1,children.0.file.filename=q0.raw,children.2.file.filename=q2.raw",
        // Probed children, with QEMU's warnings.
        "driver=quorum,vote-threshold=2,children.0.file.filename=q0.raw,children.1.file.filename=q1.raw,children.2.file.filename=q2.raw",
    ] {
        same(COPIES, &["--image-opts", image, "-c", "read 0 4k"], None);
    }
    // Children of different lengths.
    let sizes = format!("{COPIES} && qemu-img create -f raw big.raw 2M");
    same(
        &sizes,
        &[
            "--image-opts",
            "driver=quorum,vote-threshold=1,children.0.driver=raw,children.0.file.filename=q0.raw,children.1.driver=raw,children.1.file.filename=big.raw",
            "-c",
            "read 0 1",
        ],
        None,
    );
    // blkverify mode ends the process on a difference.
    same(
        COPIES,
        &[
            "--image-opts",
            "driver=quorum,vote-threshold=2,blkverify=on,children.0.driver=raw,children.0.file.filename=q0.raw,children.1.driver=raw,children.1.file.filename=q1.raw",
            "-c",
            "read 4k 4k",
            "-c",
            "read 0 8k",
        ],
        None,
    );
    // Children as a JSON array.
    same(
        COPIES,
        &[
            "-c",
            "read -P 0x11 0 4k",
            "-c",
            "map",
            r#"json:{"driver":"quorum","vote-threshold":2,"children":[{"driver":"raw","file":{"driver":"file","filename":"q0.raw"}},{"driver":"raw","file":{"driver":"file","filename":"q1.raw"}},{"driver":"raw","file":{"driver":"file","filename":"q2.raw"}}]}"#,
        ],
        None,
    );
}

#[test]
fn quorum_votes_and_repairs() {
    if !have_oracle() {
        return;
    }
    // The majority wins; only with rewrite-corrupted is the odd copy repaired.
    for extra in [
        ",vote-threshold=2",
        ",vote-threshold=2,rewrite-corrupted=on",
    ] {
        let open = format!("open -o {}", quorum(extra));
        same(
            COPIES,
            &[
                "-c",
                &open,
                "-c",
                "read -P 0x11 0 4k",
                "-c",
                "close",
                "-c",
                "open -o driver=raw,file.filename=q1.raw",
                "-c",
                "read -P 0x11 0 4k",
            ],
            None,
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    sh(dir.path(), COPIES);
    let image = quorum(",vote-threshold=2,rewrite-corrupted=on");
    strata_io(
        dir.path(),
        &["--image-opts", &image, "-c", "read -P 0x11 0 64k"],
    );
    strata_io(
        dir.path(),
        &["-f", "raw", "-c", "read -P 0x11 0 64k", "q1.raw"],
    );
    // Children that fail count against the threshold; the commonest error wins.
    let failing = format!(
        "{COPIES} && printf '[inject-error]\\nevent = \"none\"\\nerrno = \"5\"\\n' > eio.conf && \
         printf '[inject-error]\\nevent = \"none\"\\nerrno = \"28\"\\n' > enospc.conf"
    );
    let child = |i: usize, conf: Option<&str>| match conf {
        Some(c) => format!(
            ",children.{i}.driver=raw,children.{i}.file.driver=blkdebug,\
             children.{i}.file.config={c},children.{i}.file.image.filename=q{i}.raw"
        ),
        None => format!(",children.{i}.driver=raw,children.{i}.file.filename=q{i}.raw"),
    };
    for (extra, c1) in [
        ("vote-threshold=1,read-pattern=fifo", None),
        ("vote-threshold=2", None),
        ("vote-threshold=1", None),
        ("vote-threshold=3", None),
        ("vote-threshold=2", Some("enospc.conf")),
    ] {
        let image = format!(
            "driver=quorum,{extra}{}{}{}",
            child(0, Some("eio.conf")),
            child(1, c1),
            child(2, None)
        );
        same(
            &failing,
            &[
                "--image-opts",
                &image,
                "-c",
                "read -P 0x11 0 4k",
                "-c",
                "read -P 0x11 4k 4k",
                "-c",
                "write 0 4k",
                "-c",
                "flush",
            ],
            None,
        );
    }
}

/// Runs qemu-img and strata-img (as `qemu-img`) with `args` on fresh copies
/// of `setup`; both must print the same and end the same.
fn same_img(setup: &str, args: &[&str]) {
    use std::os::unix::process::CommandExt;
    let run = |bin: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        sh(dir.path(), setup);
        let out = Command::new(bin)
            .arg0("qemu-img")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run qemu-img");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.code(),
        )
    };
    assert_eq!(
        run(env!("CARGO_BIN_EXE_strata-img")),
        run("/usr/bin/qemu-img"),
        "strata-img differs from qemu-img for {args:?}"
    );
}

#[test]
fn filters_through_qemu_img() {
    if !have_oracle() {
        return;
    }
    let setup = "qemu-img create -f raw a.raw 1M && qemu-img create -f qcow2 c.qcow2 1M && \
                 qemu-io -f raw -c 'write -P 1 0 64k' a.raw";
    same_img(setup, &["info", "blkverify:a.raw:a.raw"]);
    same_img(setup, &["map", "blkverify:a.raw:a.raw"]);
    same_img(
        setup,
        &[
            "map",
            "--output=json",
            "--image-opts",
            "driver=quorum,vote-threshold=2,children.0.driver=raw,children.0.file.filename=a.raw,children.1.driver=raw,children.1.file.filename=a.raw",
        ],
    );
    same_img(
        setup,
        &[
            "map",
            "--object",
            "throttle-group,id=tg0,x-bps-total=1000000",
            "--image-opts",
            "driver=throttle,throttle-group=tg0,file.driver=qcow2,file.file.filename=c.qcow2",
        ],
    );
    for object in [
        "throttle-group,id=tg0,x-bps-total=-1",
        "throttle-group,id=tg0,x-iops-size=1",
    ] {
        same_img(setup, &["info", "--object", object, "a.raw"]);
    }
    same_img(
        setup,
        &[
            "info",
            "--object",
            "throttle-group,id=t",
            "--object",
            "throttle-group,id=t",
            "a.raw",
        ],
    );
}
