//! strata-io against qemu-io: bad arguments, failed requests and open
//! errors, with their exact texts, streams and exit codes.

mod io_support;
use io_support::{commands, have_oracle, same, IMAGES};

#[test]
fn requests_beyond_the_end() {
    if !have_oracle() {
        return;
    }
    for (fmt, img) in [("raw", "p.raw"), ("qcow2", "io.qcow2")] {
        for cmd in [
            "read 1M 512",
            "read 1023k 2k",
            "write 1M 512",
            "write -z 1M 512",
            "readv 1M 512",
            "writev 1M 512",
            "aio_read 1M 512",
            "aio_write 1M 512",
            "discard 1M 512",
        ] {
            commands(fmt, img, &[cmd]);
        }
    }
}

#[test]
fn bad_arguments() {
    if !have_oracle() {
        return;
    }
    for cmd in [
        "read -1 512",
        "read abc 512",
        "read 0 1x",
        "read 0 99999999999999999999",
        "read 0 3G",
        "read 0",
        "read",
        "read 0 512 512",
        "read -X 0 512",
        "read -P",
        "write -P 1 -z 0 512",
        "write -u 0 512",
        "readv 0",
        "writev -z 0 512",
        "length extra",
        "alloc",
        "sleep",
        "help read write",
        "help bogus",
        "bogus",
        "r -X 0 1",
        "truncate abc",
        "truncate -m bogus 3M",
        "read 0x10 1.5k",
        "read .5k 1.k",
        "read 1e2 1",
        "read 1.5 1",
        "sleep x",
        "write -s nonexist 0 512",
        "aio_write -u 0 1",
        "readv 0 3G",
        "readv 0 2G 2G",
    ] {
        commands("raw", "p.raw", &[cmd]);
    }
    // stdout is block-buffered: the error on stderr comes first when merged.
    commands("raw", "p.raw", &["length", "bogus", "length"]);
}

fn case(args: &[&str]) {
    same(IMAGES, args, None);
}

#[test]
fn command_line() {
    if !have_oracle() {
        return;
    }
    let cases: &[&[&str]] = &[
        &["-h"],
        &["-V"],
        &["-c", "help"],
        &["-c", "help read"],
        &["-c", "help open"],
        &["-c", "read 0 512", "-f", "raw", "p.raw", "extra"],
        &["-f", "raw", "-o", "x", "p.raw"],
        &["--cache", "bogus", "p.raw"],
        &["--aio", "bogus", "p.raw"],
        &["-d", "bogus", "p.raw"],
        &["--aio", "native", "-f", "raw", "-c", "read 0 512", "p.raw"],
        &["--image-opts", "-f", "raw", "p.raw"],
        &["--c", "length", "p.raw"],
        &["--foo", "p.raw"],
        &["--cmd"],
        &["--help=x"],
        &["-f", "raw", "p.raw", "-c", "length", "--read"],
        &["-f", "raw", "-U", "-c", "read 0 1", "p.raw"],
        &["-f", "raw", "-U", "-r", "-c", "read 0 1", "p.raw"],
        &[
            "--image-opts",
            "-c",
            "length",
            "driver=raw,file.filename=p.raw",
        ],
    ];
    for args in cases {
        case(args);
    }
}

#[test]
fn opening_and_closing() {
    if !have_oracle() {
        return;
    }
    let cases: &[&[&str]] = &[
        &["-c", "length"],
        &["-c", "open -r -o driver=raw p.raw", "-c", "write 0 512"],
        &[
            "-c",
            "open -o driver=raw p.raw",
            "-c",
            "open -o driver=raw p.raw",
        ],
        &["-c", "open nonexist"],
        &["-c", "open"],
        &["-c", "close"],
        &[
            "-c",
            "open -o driver=qcow2 io.qcow2",
            "-c",
            "length",
            "-c",
            "close",
            "-c",
            "length",
        ],
        &[
            "-c",
            "o -o driver=raw p.raw",
            "-c",
            "c",
            "-c",
            "q",
            "-c",
            "length",
        ],
        &["-c", "read 0 512", "nonexist.raw"],
        &["-f", "qcow2", "-c", "read 0 512", "p.raw"],
        &["-f", "bogus", "-c", "read 0 512", "p.raw"],
        &["-c", "open -o driver=file p.raw", "-c", "info"],
    ];
    for args in cases {
        case(args);
    }
    commands(
        "raw",
        "p.raw",
        &["write 0 512", "discard 0 1", "truncate 2M"].map(|c| c),
    );
    let ro: &[&str] = &[
        "-f",
        "raw",
        "-r",
        "-c",
        "write 0 512",
        "-c",
        "discard 0 1",
        "p.raw",
    ];
    case(ro);
    commands(
        "raw",
        "p.raw",
        &["reopen -r", "write 0 512", "reopen -w", "write 0 512"],
    );
}
