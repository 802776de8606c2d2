//! The `redundancy` create option: `x:y` puts the data on an
//! erasure-coded pool with k = x, m = y and overwrites allowed, `x` on a
//! replicated pool of size x; an existing pool of that kind is used, one
//! is made when the client may, and the error otherwise says how. Too
//! much redundancy for the cluster makes nothing.

use crate::cluster::{fails, ok, path, Cluster, STRATA_IMG, STRATA_IO};
use std::path::Path;
use std::process::Command;

fn create(cl: &Cluster, image: &str, redundancy: &str) -> Command {
    let mut c = Command::new(STRATA_IMG);
    c.args([
        "create",
        "-f",
        "raw",
        "-o",
        &format!("redundancy={redundancy}"),
        &cl.name(image),
        "16M",
    ]);
    c
}

fn pools(cl: &Cluster) -> Vec<String> {
    cl.ceph(&["osd", "pool", "ls"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// The image's data pool, as `rbd info` says; None for the image's own.
fn data_pool(cl: &Cluster, image: &str) -> Option<String> {
    let info = cl.rbd(&["info", &format!("rbd/{image}")]);
    info.lines()
        .find_map(|l| l.trim().strip_prefix("data_pool: "))
        .map(str::to_string)
}

/// Writes through strata-io, reads back through Ceph's export.
fn io_reads_back(cl: &Cluster, image: &str, dir: &Path) {
    ok(Command::new(STRATA_IO).args([
        "-f",
        "raw",
        "-c",
        "write -P 0x3c 1M 3M",
        "-c",
        "write -P 0x4d 9M 4k",
        "-c",
        "read -P 0x3c 1M 3M",
        &cl.name(image),
    ]));
    let out = dir.join(format!("{image}.raw"));
    cl.rbd(&["export", &format!("rbd/{image}"), &path(&out)]);
    crate::cluster::qemu_io_ok(
        "raw",
        &out,
        &[
            "read -P 0 0 1M",
            "read -P 0x3c 1M 3M",
            "read -P 0 4M 5M",
            "read -P 0x4d 9M 4k",
        ],
    );
}

pub fn data_goes_where_redundancy_says(cl: &Cluster, dir: &Path) {
    // Too much redundancy for three OSDs: an error, and nothing made.
    let before = pools(cl);
    for (r, want) in [
        (
            "4",
            "Redundancy 4 needs 4 failure domains (osd in crush root default), but the cluster has 3",
        ),
        (
            "3:1",
            "Redundancy 3:1 needs 4 failure domains (osd in crush root default), but the cluster has 3",
        ),
        ("2:x", "Invalid redundancy mode: '2:x'"),
        ("1:1", "Invalid redundancy mode: '1:1'"),
    ] {
        let out = fails(&mut create(cl, "toomuch", r));
        assert!(out.contains(want), "{r}: {out}");
    }
    assert_eq!(pools(cl), before);
    assert!(!cl.rbd(&["ls", "rbd"]).contains("toomuch"));

    // A pool with Strata's name but another kind is never changed.
    cl.ceph(&["osd", "pool", "create", "strata-ec-2-1", "8", "8"]);
    let out = fails(&mut create(cl, "ec", "2:1"));
    assert!(
        out.contains("Pool strata-ec-2-1 exists, but does not keep data with redundancy 2:1"),
        "{out}"
    );
    let size = cl.ceph(&["osd", "pool", "get", "strata-ec-2-1", "size"]);
    assert_eq!(size.trim(), "size: 1");
    cl.ceph(&[
        "osd",
        "pool",
        "delete",
        "strata-ec-2-1",
        "strata-ec-2-1",
        "--yes-i-really-really-mean-it",
    ]);

    // 2:1: an erasure-coded pool with k=2, m=1 and overwrites allowed.
    ok(&mut create(cl, "ec", "2:1"));
    assert_eq!(data_pool(cl, "ec").as_deref(), Some("strata-ec-2-1"));
    let profile = cl.ceph(&["osd", "erasure-code-profile", "get", "strata-ec-2-1"]);
    assert!(
        profile.contains("k=2") && profile.contains("m=1"),
        "{profile}"
    );
    let flags = cl.ceph(&["osd", "pool", "get", "strata-ec-2-1", "allow_ec_overwrites"]);
    assert!(flags.contains("true"), "{flags}");
    io_reads_back(cl, "ec", dir);
    // info says where the data is, and how it is kept.
    let info = ok(Command::new(STRATA_IMG).args(["info", &cl.name("ec")]));
    assert!(info.contains("data pool: strata-ec-2-1"), "{info}");
    assert!(info.contains("redundancy: 2:1"), "{info}");

    // The same again uses that pool.
    let with_ec = pools(cl);
    ok(&mut create(cl, "ec2", "2:1"));
    assert_eq!(pools(cl), with_ec);
    assert_eq!(data_pool(cl, "ec2").as_deref(), Some("strata-ec-2-1"));

    // 3: a replicated pool of size 3.
    ok(&mut create(cl, "three", "3"));
    assert_eq!(data_pool(cl, "three").as_deref(), Some("strata-copies-3"));
    let size = cl.ceph(&["osd", "pool", "get", "strata-copies-3", "size"]);
    assert_eq!(size.trim(), "size: 3");
    io_reads_back(cl, "three", dir);

    // 1: the image's own pool has size 1, so the data stays there.
    ok(&mut create(cl, "one", "1"));
    assert_eq!(data_pool(cl, "one"), None);
    let info = ok(Command::new(STRATA_IMG).args(["info", "--output=json", &cl.name("one")]));
    assert!(info.contains(r#""data-pool": "rbd""#), "{info}");
    assert!(info.contains(r#""redundancy": "1""#), "{info}");

    // A cluster that refuses a new pool (here: too many placement groups
    // per OSD): the error says how to make it, and the way it gives works.
    cl.ceph(&["config", "set", "mon", "mon_max_pg_per_osd", "1"]);
    let out = fails(&mut create(cl, "two", "2"));
    cl.ceph(&["config", "rm", "mon", "mon_max_pg_per_osd"]);
    assert!(
        out.contains("Could not create pool strata-copies-2 for redundancy 2: "),
        "{out}"
    );
    assert!(!pools(cl).contains(&"strata-copies-2".to_string()));
    assert!(!cl.rbd(&["ls", "rbd"]).contains("two"));
    let how = out
        .split("an administrator can create it with: ")
        .nth(1)
        .unwrap_or_else(|| panic!("{out}"))
        .trim();
    for step in how.split(" && ") {
        let words: Vec<&str> = step.split_whitespace().collect();
        assert_eq!(words[0], "ceph", "{how}");
        cl.ceph(&words[1..]);
    }
    let made = pools(cl);
    ok(&mut create(cl, "two", "2"));
    assert_eq!(pools(cl), made);
    assert_eq!(data_pool(cl, "two").as_deref(), Some("strata-copies-2"));
}
