//! The QAPI types of the daemon's commands and options (QEMU:
//! qapi/block-core.json, qapi/control.json): `BlockdevOptions` with a
//! branch for each driver Strata has, `MonitorOptions`, and the arguments
//! of `blockdev-del` and `block_resize`.
//!
//! The `driver` enumeration lists only the drivers of the registry, so a
//! driver Strata lacks is refused as a QEMU built without it refuses it.

use strata_block::Registry;
use strata_qmp::Schema;

/// The branch type of each driver QEMU's schema knows and Strata has.
const DRIVER_BRANCHES: &[(&str, &str)] = &[
    ("blkdebug", "BlockdevOptionsBlkdebug"),
    ("blklogwrites", "BlockdevOptionsBlklogwrites"),
    ("blkverify", "BlockdevOptionsBlkverify"),
    ("compress", "BlockdevOptionsGenericFormat"),
    ("copy-before-write", "BlockdevOptionsCbw"),
    ("copy-on-read", "BlockdevOptionsCor"),
    ("file", "BlockdevOptionsFile"),
    ("nbd", "BlockdevOptionsNbd"),
    ("host_cdrom", "BlockdevOptionsFile"),
    ("host_device", "BlockdevOptionsFile"),
    ("luks", "BlockdevOptionsLUKS"),
    ("null-aio", "BlockdevOptionsNull"),
    ("null-co", "BlockdevOptionsNull"),
    ("qcow", "BlockdevOptionsQcow"),
    ("qcow2", "BlockdevOptionsQcow2"),
    ("quorum", "BlockdevOptionsQuorum"),
    ("raw", "BlockdevOptionsRaw"),
    ("rbd", "BlockdevOptionsRbd"),
    ("snapshot-access", "BlockdevOptionsGenericFormat"),
    ("throttle", "BlockdevOptionsThrottle"),
    ("vdi", "BlockdevOptionsGenericFormat"),
    ("vpc", "BlockdevOptionsGenericFormat"),
];

/// Drivers of `registry` that blockdev-add cannot name (a driver added to
/// the registry needs its branch here).
pub fn drivers_without_schema(registry: &Registry) -> Vec<&'static str> {
    registry
        .all()
        .iter()
        .map(|c| c.name())
        .filter(|n| !DRIVER_BRANCHES.iter().any(|(d, _)| d == n))
        .collect()
}

const BLKDEBUG_EVENTS: &[&str] = &[
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
];

/// The schema of the daemon's commands and options, for the drivers of `registry`.
pub fn schema(registry: &Registry) -> Schema {
    let mut s = Schema::new();
    let drivers: Vec<(&str, &str)> = DRIVER_BRANCHES
        .iter()
        .copied()
        .filter(|(d, _)| registry.get(d).is_some())
        .collect();
    let names: Vec<&str> = drivers.iter().map(|(d, _)| *d).collect();
    s.enumeration("BlockdevDriver", &names)
        .enumeration("BlockdevDiscardOptions", &["ignore", "unmap"])
        .enumeration("BlockdevDetectZeroesOptions", &["off", "on", "unmap"])
        .enumeration("BlockdevAioOptions", &["threads", "native", "io_uring"])
        .enumeration("OnOffAuto", &["auto", "on", "off"])
        .object(
            "BlockdevCacheOptions",
            &[("*direct", "bool"), ("*no-flush", "bool")],
        )
        .union(
            "BlockdevOptions",
            &[
                ("driver", "BlockdevDriver"),
                ("*node-name", "str"),
                ("*discard", "BlockdevDiscardOptions"),
                ("*cache", "BlockdevCacheOptions"),
                ("*active", "bool"),
                ("*read-only", "bool"),
                ("*auto-read-only", "bool"),
                ("*force-share", "bool"),
                ("*detect-zeroes", "BlockdevDetectZeroesOptions"),
            ],
            "driver",
            &drivers,
        )
        .alternate("BlockdevRef", &["BlockdevOptions", "str"])
        .alternate("BlockdevRefOrNull", &["BlockdevOptions", "str", "null"])
        .object(
            "BlockdevOptionsFile",
            &[
                ("filename", "str"),
                ("*pr-manager", "str"),
                ("*locking", "OnOffAuto"),
                ("*aio", "BlockdevAioOptions"),
                ("*aio-max-batch", "int"),
                ("*drop-cache", "bool"),
                ("*x-check-cache-dropped", "bool"),
            ],
        )
        .object(
            "BlockdevOptionsNull",
            &[
                ("*size", "int"),
                ("*latency-ns", "uint64"),
                ("*read-zeroes", "bool"),
            ],
        )
        .enumeration("RbdAuthMode", &["cephx", "none"])
        .object("InetSocketAddressBase", &[("host", "str"), ("port", "str")])
        .enumeration("RbdImageEncryptionFormat", &["luks", "luks2", "luks-any"])
        .object("RbdEncryptionOptionsLUKSBase", &[("key-secret", "str")])
        .union(
            "RbdEncryptionOptions",
            &[
                ("format", "RbdImageEncryptionFormat"),
                ("*parent", "RbdEncryptionOptions"),
            ],
            "format",
            &[
                ("luks", "RbdEncryptionOptionsLUKSBase"),
                ("luks2", "RbdEncryptionOptionsLUKSBase"),
                ("luks-any", "RbdEncryptionOptionsLUKSBase"),
            ],
        )
        .object(
            "BlockdevOptionsRbd",
            &[
                ("pool", "str"),
                ("*namespace", "str"),
                ("image", "str"),
                ("*conf", "str"),
                ("*snapshot", "str"),
                ("*encrypt", "RbdEncryptionOptions"),
                ("*user", "str"),
                ("*auth-client-required", "[RbdAuthMode]"),
                ("*key-secret", "str"),
                ("*server", "[InetSocketAddressBase]"),
            ],
        )
        .object("BlockdevOptionsGenericFormat", &[("file", "BlockdevRef")])
        .object(
            "BlockdevOptionsLUKS",
            &[
                ("file", "BlockdevRef"),
                ("*key-secret", "str"),
                ("*header", "BlockdevRef"),
            ],
        )
        .object(
            "BlockdevOptionsRaw",
            &[
                ("file", "BlockdevRef"),
                ("*offset", "int"),
                ("*size", "int"),
            ],
        )
        .enumeration("OnCbwError", &["break-guest-write", "break-snapshot"])
        .object(
            "BlockdevOptionsCbw",
            &[
                ("file", "BlockdevRef"),
                ("target", "BlockdevRef"),
                ("*bitmap", "BlockDirtyBitmap"),
                ("*on-cbw-error", "OnCbwError"),
                ("*cbw-timeout", "uint32"),
                ("*min-cluster-size", "size"),
            ],
        )
        .object(
            "BlockdevOptionsCor",
            &[("file", "BlockdevRef"), ("*bottom", "str")],
        )
        .object(
            "BlockdevOptionsThrottle",
            &[("throttle-group", "str"), ("file", "BlockdevRef")],
        )
        .object(
            "BlockdevOptionsBlkverify",
            &[("test", "BlockdevRef"), ("raw", "BlockdevRef")],
        )
        .object(
            "BlockdevOptionsBlklogwrites",
            &[
                ("file", "BlockdevRef"),
                ("log", "BlockdevRef"),
                ("*log-sector-size", "uint32"),
                ("*log-append", "bool"),
                ("*log-super-update-interval", "uint64"),
            ],
        )
        .enumeration("QuorumReadPattern", &["quorum", "fifo"])
        .object(
            "BlockdevOptionsQuorum",
            &[
                ("*blkverify", "bool"),
                ("children", "[BlockdevRef]"),
                ("vote-threshold", "int"),
                ("*rewrite-corrupted", "bool"),
                ("*read-pattern", "QuorumReadPattern"),
            ],
        )
        .enumeration(
            "Qcow2OverlapCheckMode",
            &["none", "constant", "cached", "all"],
        )
        .object(
            "Qcow2OverlapCheckFlags",
            &[
                ("*template", "Qcow2OverlapCheckMode"),
                ("*main-header", "bool"),
                ("*active-l1", "bool"),
                ("*active-l2", "bool"),
                ("*refcount-table", "bool"),
                ("*refcount-block", "bool"),
                ("*snapshot-table", "bool"),
                ("*inactive-l1", "bool"),
                ("*inactive-l2", "bool"),
                ("*bitmap-directory", "bool"),
            ],
        )
        .alternate(
            "Qcow2OverlapChecks",
            &["Qcow2OverlapCheckFlags", "Qcow2OverlapCheckMode"],
        )
        .enumeration("BlockdevQcow2EncryptionFormat", &["aes", "luks"])
        .object("QCryptoBlockOptionsQCow", &[("*key-secret", "str")])
        .object("QCryptoBlockOptionsLUKS", &[("*key-secret", "str")])
        .union(
            "BlockdevQcow2Encryption",
            &[("format", "BlockdevQcow2EncryptionFormat")],
            "format",
            &[
                ("aes", "QCryptoBlockOptionsQCow"),
                ("luks", "QCryptoBlockOptionsLUKS"),
            ],
        )
        .enumeration("BlockdevQcowEncryptionFormat", &["aes"])
        .union(
            "BlockdevQcowEncryption",
            &[("format", "BlockdevQcowEncryptionFormat")],
            "format",
            &[("aes", "QCryptoBlockOptionsQCow")],
        )
        .object(
            "BlockdevOptionsQcow",
            &[
                ("file", "BlockdevRef"),
                ("*backing", "BlockdevRefOrNull"),
                ("*encrypt", "BlockdevQcowEncryption"),
            ],
        )
        .object(
            "BlockdevOptionsQcow2",
            &[
                ("file", "BlockdevRef"),
                ("*backing", "BlockdevRefOrNull"),
                ("*lazy-refcounts", "bool"),
                ("*pass-discard-request", "bool"),
                ("*pass-discard-snapshot", "bool"),
                ("*pass-discard-other", "bool"),
                ("*discard-no-unref", "bool"),
                ("*overlap-check", "Qcow2OverlapChecks"),
                ("*cache-size", "int"),
                ("*l2-cache-size", "int"),
                ("*l2-cache-entry-size", "int"),
                ("*refcount-cache-size", "int"),
                ("*cache-clean-interval", "int"),
                ("*encrypt", "BlockdevQcow2Encryption"),
                ("*data-file", "BlockdevRef"),
            ],
        )
        .enumeration("BlkdebugEvent", BLKDEBUG_EVENTS)
        .enumeration(
            "BlkdebugIOType",
            &[
                "read",
                "write",
                "write-zeroes",
                "discard",
                "flush",
                "block-status",
            ],
        )
        .enumeration(
            "BlockPermission",
            &["consistent-read", "write", "write-unchanged", "resize"],
        )
        .object(
            "BlkdebugInjectErrorOptions",
            &[
                ("event", "BlkdebugEvent"),
                ("*state", "int"),
                ("*iotype", "BlkdebugIOType"),
                ("*errno", "int"),
                ("*sector", "int"),
                ("*once", "bool"),
                ("*immediately", "bool"),
            ],
        )
        .object(
            "BlkdebugSetStateOptions",
            &[
                ("event", "BlkdebugEvent"),
                ("*state", "int"),
                ("new_state", "int"),
            ],
        )
        .object(
            "BlockdevOptionsBlkdebug",
            &[
                ("image", "BlockdevRef"),
                ("*config", "str"),
                ("*align", "int"),
                ("*max-transfer", "int32"),
                ("*opt-write-zero", "int32"),
                ("*max-write-zero", "int32"),
                ("*opt-discard", "int32"),
                ("*max-discard", "int32"),
                ("*inject-error", "[BlkdebugInjectErrorOptions]"),
                ("*set-state", "[BlkdebugSetStateOptions]"),
                ("*take-child-perms", "[BlockPermission]"),
                ("*unshare-child-perms", "[BlockPermission]"),
            ],
        )
        .enumeration("MonitorMode", &["readline", "control"])
        .object(
            "MonitorOptions",
            &[
                ("*id", "str"),
                ("*mode", "MonitorMode"),
                ("*pretty", "bool"),
                ("chardev", "str"),
            ],
        )
        .object("q_obj_blockdev-del_arg", &[("node-name", "str")])
        .object(
            "q_obj_blockdev-reopen_arg",
            &[("options", "[BlockdevOptions]")],
        )
        .object(
            "q_obj_blockdev-set-active_arg",
            &[("*node-name", "str"), ("active", "bool")],
        )
        .object("BlockdevSnapshot", &[("node", "str"), ("overlay", "str")])
        .enumeration("NewImageMode", &["existing", "absolute-paths"])
        .object(
            "BlockdevSnapshotSync",
            &[
                ("*device", "str"),
                ("*node-name", "str"),
                ("snapshot-file", "str"),
                ("*snapshot-node-name", "str"),
                ("*format", "str"),
                ("*mode", "NewImageMode"),
            ],
        )
        .alternate("StrOrNull", &["str", "null"])
        .object(
            "q_obj_x-blockdev-set-iothread_arg",
            &[
                ("node-name", "str"),
                ("iothread", "StrOrNull"),
                ("*force", "bool"),
            ],
        )
        // Only the object types Strata has, with the properties it uses.
        .enumeration("ObjectType", &["iothread", "secret"])
        .enumeration("QCryptoSecretFormat", &["raw", "base64"])
        .object(
            "SecretProperties",
            &[
                ("*format", "QCryptoSecretFormat"),
                ("*keyid", "str"),
                ("*iv", "str"),
                ("*data", "str"),
                ("*file", "str"),
            ],
        )
        .object(
            "IothreadProperties",
            &[
                ("*poll-max-ns", "int"),
                ("*poll-grow", "int"),
                ("*poll-shrink", "int"),
            ],
        )
        .union(
            "ObjectOptions",
            &[("qom-type", "ObjectType"), ("id", "str")],
            "qom-type",
            &[
                ("iothread", "IothreadProperties"),
                ("secret", "SecretProperties"),
            ],
        )
        .object("q_obj_object-del_arg", &[("id", "str")])
        .object(
            "q_obj_block_resize_arg",
            &[("*device", "str"), ("*node-name", "str"), ("size", "int")],
        )
        .object("q_obj_query-named-block-nodes_arg", &[("*flat", "bool")])
        .object("q_obj_query-blockstats_arg", &[("*query-nodes", "bool")])
        .object(
            "q_obj_block-set-write-threshold_arg",
            &[("node-name", "str"), ("write-threshold", "uint64")],
        )
        .object(
            "BlockDirtyBitmapAdd",
            &[
                ("node", "str"),
                ("name", "str"),
                ("*granularity", "uint32"),
                ("*persistent", "bool"),
                ("*disabled", "bool"),
            ],
        )
        .object(
            "BlockDirtyBitmapMerge",
            &[
                ("node", "str"),
                ("target", "str"),
                ("bitmaps", "[BlockDirtyBitmapOrStr]"),
            ],
        );
    exports(&mut s);
    crate::jobs::schema(&mut s);
    crate::create::schema(&mut s);
    crate::snapshots::schema(&mut s);
    crate::transaction::schema(&mut s);
    s
}

/// Socket addresses, the NBD driver's options, the NBD server and block
/// exports (qapi/sockets.json, block-core.json, block-export.json).
fn exports(s: &mut Schema) {
    s.enumeration("SocketAddressType", &["inet", "unix"])
        .object(
            "InetSocketAddress",
            &[
                ("host", "str"),
                ("port", "str"),
                ("*numeric", "bool"),
                ("*to", "uint16"),
                ("*ipv4", "bool"),
                ("*ipv6", "bool"),
                ("*keep-alive", "bool"),
                ("*mptcp", "bool"),
            ],
        )
        .object(
            "UnixSocketAddress",
            &[("path", "str"), ("*abstract", "bool"), ("*tight", "bool")],
        )
        .union(
            "SocketAddress",
            &[("type", "SocketAddressType")],
            "type",
            &[("inet", "InetSocketAddress"), ("unix", "UnixSocketAddress")],
        )
        .object("InetSocketAddressWrapper", &[("data", "InetSocketAddress")])
        .object("UnixSocketAddressWrapper", &[("data", "UnixSocketAddress")])
        .union(
            "SocketAddressLegacy",
            &[("type", "SocketAddressType")],
            "type",
            &[
                ("inet", "InetSocketAddressWrapper"),
                ("unix", "UnixSocketAddressWrapper"),
            ],
        )
        .object(
            "BlockdevOptionsNbd",
            &[
                ("server", "SocketAddress"),
                ("*export", "str"),
                ("*tls-creds", "str"),
                ("*tls-hostname", "str"),
                ("*x-dirty-bitmap", "str"),
                ("*reconnect-delay", "uint32"),
                ("*open-timeout", "uint32"),
            ],
        )
        .object(
            "NbdServerOptions",
            &[
                ("*handshake-max-seconds", "uint32"),
                ("*tls-creds", "str"),
                ("*tls-authz", "str"),
                ("*max-connections", "uint32"),
                ("addr", "SocketAddress"),
            ],
        )
        .object(
            "q_obj_nbd-server-start_arg",
            &[
                ("addr", "SocketAddressLegacy"),
                ("*tls-creds", "str"),
                ("*tls-authz", "str"),
                ("*max-connections", "uint32"),
                ("*handshake-max-seconds", "uint32"),
            ],
        )
        .object("BlockDirtyBitmap", &[("node", "str"), ("name", "str")])
        .alternate("BlockDirtyBitmapOrStr", &["str", "BlockDirtyBitmap"])
        .object(
            "BlockExportOptionsNbd",
            &[
                ("*name", "str"),
                ("*description", "str"),
                ("*bitmaps", "[BlockDirtyBitmapOrStr]"),
                ("*allocation-depth", "bool"),
            ],
        )
        .enumeration("FuseExportAllowOther", &["off", "on", "auto"])
        .object(
            "BlockExportOptionsFuse",
            &[
                ("mountpoint", "str"),
                ("*growable", "bool"),
                ("*allow-other", "FuseExportAllowOther"),
            ],
        )
        // Only the export types Strata has (QEMU's list depends on its build too).
        .enumeration("BlockExportType", &["nbd", "fuse"])
        .union(
            "BlockExportOptions",
            &[
                ("type", "BlockExportType"),
                ("id", "str"),
                ("*fixed-iothread", "bool"),
                ("*iothread", "str"),
                ("node-name", "str"),
                ("*writable", "bool"),
                ("*writethrough", "bool"),
                ("*allow-inactive", "bool"),
            ],
            "type",
            &[
                ("nbd", "BlockExportOptionsNbd"),
                ("fuse", "BlockExportOptionsFuse"),
            ],
        )
        .enumeration("BlockExportRemoveMode", &["safe", "hard"])
        .object(
            "q_obj_block-export-del_arg",
            &[("id", "str"), ("*mode", "BlockExportRemoveMode")],
        )
        .object(
            "NbdServerAddOptions",
            &[
                ("device", "str"),
                ("*name", "str"),
                ("*description", "str"),
                ("*writable", "bool"),
                ("*bitmap", "str"),
            ],
        )
        .object(
            "q_obj_nbd-server-remove_arg",
            &[("name", "str"), ("*mode", "BlockExportRemoveMode")],
        );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_driver_can_be_added_and_every_type_is_declared() {
        let reg = crate::registry();
        assert_eq!(drivers_without_schema(&reg), Vec::<&str>::new());
        assert_eq!(schema(&reg).undefined(), Vec::<String>::new());
    }
}
