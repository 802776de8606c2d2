//! strata-io against qemu-io: length, info, map, alloc, discard, truncate,
//! and commands read from stdin with the prompt.

mod io_support;
use io_support::{commands, have_oracle, same, IMAGES};

#[test]
fn image_commands() {
    if !have_oracle() {
        return;
    }
    commands("qcow2", "io.qcow2", &["info", "length", "map"]);
    commands("raw", "p.raw", &["info", "length", "map"]);
    let writes = [
        "write -P 1 0 128k",
        "write -z 64k 64k",
        "write -z -u 192k 64k",
    ];
    commands(
        "qcow2",
        "io.qcow2",
        &[writes[0], writes[1], writes[2], "write 512k 4k", "map"],
    );
    let allocs = [
        "alloc 0",
        "alloc 0 128k",
        "alloc 64k 128k",
        "alloc 1M",
        "alloc 1023k 4k",
    ];
    commands("qcow2", "io.qcow2", &allocs);
    commands(
        "qcow2",
        "io.qcow2",
        &["discard 0 64k", "discard -C 0 64k", "discard -q 0 1"],
    );
    let ignore = [
        "-f",
        "qcow2",
        "-d",
        "ignore",
        "-c",
        "discard 0 64k",
        "-c",
        "map",
        "io.qcow2",
    ];
    same(IMAGES, &ignore, None);
    commands(
        "qcow2",
        "io.qcow2",
        &["truncate 2M", "length", "truncate 100"],
    );
    commands(
        "raw",
        "p.raw",
        &["truncate 100", "length", "truncate -m full 2M", "length"],
    );
}

#[test]
fn commands_from_stdin() {
    if !have_oracle() {
        return;
    }
    let case = |input: &str, args: &[&str]| same(IMAGES, args, Some(input));
    case("length\ntruncate 2M\nlength\n", &["-f", "raw", "p.raw"]);
    case("length\nlength", &["-f", "raw", "p.raw"]);
    case("", &["-f", "raw", "p.raw"]);
    case("read -P 1 0 512\nlength\n", &["-f", "raw", "p.raw"]);
    case(
        "bogus\n\n   \nlength\nquit\nlength\n",
        &["-f", "raw", "p.raw"],
    );
    case("length\n", &["-f", "raw", "-c", "length", "p.raw"]);
    case("length\n", &[]);
}
