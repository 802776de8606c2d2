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
            strata_jobs::blockdev_create(&d.jobs, d.blockdev_ctx(), &id, options).await
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

/// QCryptoBlockCreateOptionsLUKS, its base's `key-secret` first: the
/// LUKS fields of qcow2's `encrypt` and of a `luks` image.
const LUKS_CREATE: &[(&str, &str)] = &[
    ("*key-secret", "str"),
    ("*cipher-alg", "QCryptoCipherAlgo"),
    ("*cipher-mode", "QCryptoCipherMode"),
    ("*ivgen-alg", "QCryptoIVGenAlgo"),
    ("*ivgen-hash-alg", "QCryptoHashAlgo"),
    ("*hash-alg", "QCryptoHashAlgo"),
    ("*iter-time", "int"),
];

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
        .enumeration(
            "QCryptoCipherAlgo",
            &[
                "aes-128",
                "aes-192",
                "aes-256",
                "des",
                "3des",
                "cast5-128",
                "serpent-128",
                "serpent-192",
                "serpent-256",
                "twofish-128",
                "twofish-192",
                "twofish-256",
                "sm4",
            ],
        )
        .enumeration("QCryptoCipherMode", &["ecb", "cbc", "xts", "ctr"])
        .enumeration("QCryptoIVGenAlgo", &["plain", "plain64", "essiv"])
        .enumeration(
            "QCryptoHashAlgo",
            &[
                "md5",
                "sha1",
                "sha224",
                "sha256",
                "sha384",
                "sha512",
                "ripemd160",
                "sm3",
            ],
        )
        .object("QCryptoBlockCreateOptionsLUKS", LUKS_CREATE)
        .object(
            "RbdEncryptionCreateOptionsLUKSBase",
            &[("key-secret", "str"), ("*cipher-alg", "QCryptoCipherAlgo")],
        )
        .union(
            "RbdEncryptionCreateOptions",
            &[("format", "RbdImageEncryptionFormat")],
            "format",
            &[
                ("luks", "RbdEncryptionCreateOptionsLUKSBase"),
                ("luks2", "RbdEncryptionCreateOptionsLUKSBase"),
            ],
        )
        // Strata adds `redundancy` (`x` copies or `x:y` strips).
        .object(
            "BlockdevCreateOptionsRbd",
            &[
                ("location", "BlockdevOptionsRbd"),
                ("size", "size"),
                ("*cluster-size", "size"),
                ("*encrypt", "RbdEncryptionCreateOptions"),
                ("*redundancy", "str"),
            ],
        )
        .object(
            "BlockdevCreateOptionsLUKS",
            &[
                LUKS_CREATE,
                &[
                    ("*file", "BlockdevRef"),
                    ("*header", "BlockdevRef"),
                    ("size", "size"),
                    ("*preallocation", "PreallocMode"),
                ],
            ]
            .concat(),
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
            "BlockdevCreateOptionsQcow",
            &[
                ("file", "BlockdevRef"),
                ("size", "size"),
                ("*backing-file", "str"),
                ("*encrypt", "QCryptoBlockCreateOptions"),
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
                ("luks", "BlockdevCreateOptionsLUKS"),
                ("qcow", "BlockdevCreateOptionsQcow"),
                ("qcow2", "BlockdevCreateOptionsQcow2"),
                ("rbd", "BlockdevCreateOptionsRbd"),
                ("vdi", "BlockdevCreateOptionsVdi"),
                ("vpc", "BlockdevCreateOptionsVpc"),
            ],
        )
        .object(
            "BlockdevCreateOptionsVdi",
            &[
                ("file", "BlockdevRef"),
                ("size", "size"),
                ("*preallocation", "PreallocMode"),
            ],
        )
        .enumeration("BlockdevVpcSubformat", &["dynamic", "fixed"])
        .object(
            "BlockdevCreateOptionsVpc",
            &[
                ("file", "BlockdevRef"),
                ("size", "size"),
                ("*subformat", "BlockdevVpcSubformat"),
                ("*force-size", "bool"),
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
