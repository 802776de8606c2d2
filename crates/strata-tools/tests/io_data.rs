//! strata-io against qemu-io: reads, writes, vectored and aio requests,
//! patterns, dumps and report formats.

mod io_support;
use io_support::{commands, have_oracle};

#[test]
fn read_and_write_reports() {
    if !have_oracle() {
        return;
    }
    commands(
        "qcow2",
        "io.qcow2",
        &["write 0 64k", "write -P 0xab 512 1k"],
    );
    commands(
        "qcow2",
        "io.qcow2",
        &["write -q -P 0xab 512 1k", "write -C 1k 1k"],
    );
    commands(
        "qcow2",
        "io.qcow2",
        &["read -C 0 1k", "read 0 0", "write 0 0"],
    );
    commands(
        "raw",
        "p.raw",
        &["write -pP 0xab 66 42", "read -pP 0xab 66 42"],
    );
    commands(
        "raw",
        "p.raw",
        &["write -z 4k 8k", "write -z -u 0 1", "write -f 0 1"],
    );
}

#[test]
fn dumps_and_patterns() {
    if !have_oracle() {
        return;
    }
    commands("qcow2", "io.qcow2", &["read -v 500 40", "read -v 1 17"]);
    commands(
        "qcow2",
        "io.qcow2",
        &["read -P 0xab 0 1k", "read -P 0 128k 1k"],
    );
    commands("qcow2", "io.qcow2", &["read -P 0xab -s 512 -l 1024 0 2k"]);
    commands("qcow2", "io.qcow2", &["read -P 0xab -s 2048 -l 1024 0 2k"]);
    commands("qcow2", "io.qcow2", &["read -s 512 0 2k"]);
    for p in [
        "-1", "300", "12m", "4k", "route66", "0x100", "0xff", "255", "010", "08",
    ] {
        commands("qcow2", "io.qcow2", &[&format!("write -P {p} 0 512")]);
    }
}

#[test]
fn vectored_and_aio() {
    if !have_oracle() {
        return;
    }
    commands(
        "qcow2",
        "io.qcow2",
        &["readv -P 0xab 512 512 512", "readv -v 510 4 4"],
    );
    commands("qcow2", "io.qcow2", &["writev -P 0x11 64k 1k 2k 512"]);
    // A tab inside an argument stays in it and is skipped by the size parser.
    commands(
        "qcow2",
        "io.qcow2",
        &["writev -P 0x12 64k 1k \t1k", "readv -P 0x12 64k \t2k"],
    );
    // Between two aio requests without a flush, QEMU's completion order varies.
    commands(
        "qcow2",
        "io.qcow2",
        &[
            "aio_write -P 0x22 128k 4k",
            "aio_flush",
            "aio_read -P 0x22 128k 4k",
            "aio_flush",
        ],
    );
    commands(
        "qcow2",
        "io.qcow2",
        &["aio_read -P 0x99 0 4k", "aio_flush", "aio_read -v 0 20"],
    );
    commands("qcow2", "io.qcow2", &["aio_write -C -P 0x22 128k 4k"]);
}
