//! `blockdev-create` (QEMU: block/create.c and the BlockdevCreateOptions
//! of qapi/block-core.json): images made over QMP, by a job.

use crate::blockdev::Daemon;
use serde_json::Value;
use std::sync::Arc;
use strata_block::{OpenCtx, OpenFlags};
use strata_qmp::schema::Schema;
use strata_qmp::Qmp;

/// Adds `blockdev-create` to `qmp`.
pub(crate) fn register(qmp: &mut Qmp, daemon: &Arc<Daemon>) {
    crate::commands::daemon_command(
        qmp,
        daemon,
        "blockdev-create",
        "q_obj_blockdev-create_arg",
        |d, a| async move {
            let id = a["job-id"].as_str().unwrap_or_default().to_string();
            let Value::Object(options) = a["options"].clone() else {
                return Err("Parameter 'options' is missing".into());
            };
            // The files are the graph's nodes, written as the daemon opens
            // them (blockdev-add's flags).
            let flags = OpenFlags {
                unmap: false,
                ..OpenFlags::default()
            };
            let ctx = OpenCtx::with_graph(Arc::clone(&d.registry), flags, Arc::clone(&d.graph));
            strata_jobs::blockdev_create(&d.jobs, ctx, &id, options)
        },
    );
}

/// The QAPI types of `blockdev-create`, with the drivers that create;
/// every other driver has an empty branch, as in QEMU.
pub(crate) fn schema(s: &mut Schema) {
    s.enumeration("PreallocMode", &["off", "metadata", "falloc", "full"])
        .enumeration("BlockdevQcow2Version", &["v2", "v3"])
        .enumeration("Qcow2CompressionType", &["zlib", "zstd"])
        .enumeration("QCryptoBlockFormat", &["qcow", "luks"])
        .object(
            "BlockdevCreateOptionsFile",
            &[
                ("filename", "str"),
                ("size", "size"),
                ("*preallocation", "PreallocMode"),
                ("*nocow", "bool"),
                ("*extent-size-hint", "size"),
            ],
        )
        .object(
            "QCryptoBlockCreateOptionsLUKS",
            &[
                ("*key-secret", "str"),
                ("*cipher-alg", "str"),
                ("*cipher-mode", "str"),
                ("*ivgen-alg", "str"),
                ("*ivgen-hash-alg", "str"),
                ("*hash-alg", "str"),
                ("*iter-time", "int"),
                ("*detached-header", "bool"),
            ],
        )
        .union(
            "QCryptoBlockCreateOptions",
            &[("format", "QCryptoBlockFormat")],
            "format",
            &[
                ("qcow", "QCryptoBlockOptionsQCow"),
                ("luks", "QCryptoBlockCreateOptionsLUKS"),
            ],
        )
        .object(
            "BlockdevCreateOptionsQcow2",
            &[
                ("file", "BlockdevRef"),
                ("*data-file", "BlockdevRef"),
                ("*data-file-raw", "bool"),
                ("*extended-l2", "bool"),
                ("size", "size"),
                ("*version", "BlockdevQcow2Version"),
                ("*backing-file", "str"),
                ("*backing-fmt", "BlockdevDriver"),
                ("*encrypt", "QCryptoBlockCreateOptions"),
                ("*cluster-size", "size"),
                ("*preallocation", "PreallocMode"),
                ("*lazy-refcounts", "bool"),
                ("*refcount-bits", "int"),
                ("*compression-type", "Qcow2CompressionType"),
            ],
        )
        .union(
            "BlockdevCreateOptions",
            &[("driver", "BlockdevDriver")],
            "driver",
            &[
                ("file", "BlockdevCreateOptionsFile"),
                ("qcow2", "BlockdevCreateOptionsQcow2"),
            ],
        )
        .object(
            "q_obj_blockdev-create_arg",
            &[("job-id", "str"), ("options", "BlockdevCreateOptions")],
        );
}
