//! `blockdev-create` and `x-blockdev-amend` (QEMU: block/create.c,
//! block/amend.c and their options in qapi/block-core.json): images made
//! and changed over QMP, each by a job.

use crate::blockdev::Daemon;
use serde_json::Value;
use std::sync::Arc;
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
            // The files are the graph's nodes, opened as blockdev-add opens.
            strata_jobs::blockdev_create(&d.jobs, d.blockdev_ctx(), &id, options)
        },
    );
    crate::commands::daemon_command(
        qmp,
        daemon,
        "x-blockdev-amend",
        "q_obj_x-blockdev-amend_arg",
        |d, a| async move {
            let id = a["job-id"].as_str().unwrap_or_default();
            let node = a["node-name"].as_str().unwrap_or_default();
            let Value::Object(options) = a["options"].clone() else {
                return Err("Parameter 'options' is missing".into());
            };
            let force = a["force"].as_bool().unwrap_or(false);
            strata_jobs::x_blockdev_amend(&d.jobs, &d.graph, id, node, options, force).await
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
        )
        .enumeration("QCryptoBlockLUKSKeyslotState", &["active", "inactive"])
        .object(
            "QCryptoBlockAmendOptionsLUKS",
            &[
                ("state", "QCryptoBlockLUKSKeyslotState"),
                ("*new-secret", "str"),
                ("*old-secret", "str"),
                ("*keyslot", "int"),
                ("*iter-time", "int"),
                ("*secret", "str"),
            ],
        )
        .union(
            "QCryptoBlockAmendOptions",
            &[("format", "QCryptoBlockFormat")],
            "format",
            &[("luks", "QCryptoBlockAmendOptionsLUKS")],
        )
        .object(
            "BlockdevAmendOptionsQcow2",
            &[("*encrypt", "QCryptoBlockAmendOptions")],
        )
        .union(
            "BlockdevAmendOptions",
            &[("driver", "BlockdevDriver")],
            "driver",
            &[
                ("luks", "QCryptoBlockAmendOptionsLUKS"),
                ("qcow2", "BlockdevAmendOptionsQcow2"),
            ],
        )
        .object(
            "q_obj_x-blockdev-amend_arg",
            &[
                ("job-id", "str"),
                ("node-name", "str"),
                ("options", "BlockdevAmendOptions"),
                ("*force", "bool"),
            ],
        );
}
