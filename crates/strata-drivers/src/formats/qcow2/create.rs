//! Creating qcow2 images: header, refcount table and first refcount block,
//! then the L1 table sized for the disk, laid out as QEMU lays them out
//! (clusters 0, 1, 2 and 3), so images and offsets match byte for byte.

use super::header::{
    Compression, Header, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE, INCOMPAT_EXTL2,
};
use crate::formats::crypto::{password, take_luks_create, take_prefixed};
use serde_json::Value;
use std::sync::Arc;
use strata_block::driver::Preallocation;
use strata_block::options::{take_bool, take_size, take_str, take_u64, OptSpec, OptType, Opts};
use strata_block::{Error, IoBuf, Node, OpenCtx, Result, WriteFlags};
use strata_crypto::luks::CreateOptions;

/// The creation options, in the order QEMU prints them on the `Formatting` line.
pub const CREATE_OPTIONS: &[OptSpec] = &[
    OptSpec {
        name: "encrypt.format",
        ty: OptType::Str,
        help: "Encrypt the image, format choices: 'aes', 'luks'",
        default: None,
    },
    OptSpec {
        name: "encrypt.key-secret",
        ty: OptType::Str,
        help: "ID of secret providing qcow AES key or LUKS passphrase",
        default: None,
    },
    OptSpec {
        name: "encrypt.cipher-alg",
        ty: OptType::Str,
        help: "Name of encryption cipher algorithm",
        default: None,
    },
    OptSpec {
        name: "encrypt.cipher-mode",
        ty: OptType::Str,
        help: "Name of encryption cipher mode",
        default: None,
    },
    OptSpec {
        name: "encrypt.ivgen-alg",
        ty: OptType::Str,
        help: "Name of IV generator algorithm",
        default: None,
    },
    OptSpec {
        name: "encrypt.ivgen-hash-alg",
        ty: OptType::Str,
        help: "Name of IV generator hash algorithm",
        default: None,
    },
    OptSpec {
        name: "encrypt.hash-alg",
        ty: OptType::Str,
        help: "Name of encryption hash algorithm",
        default: None,
    },
    OptSpec {
        name: "encrypt.iter-time",
        ty: OptType::Number,
        help: "Time to spend in PBKDF in milliseconds",
        default: None,
    },
    OptSpec {
        name: "cluster_size",
        ty: OptType::Size,
        help: "qcow2 cluster size",
        default: Some("65536"),
    },
    OptSpec {
        name: "extended_l2",
        ty: OptType::Bool,
        help: "Extended L2 tables",
        default: Some("off"),
    },
    OptSpec {
        name: "preallocation",
        ty: OptType::Str,
        help: "Preallocation mode (allowed values: off, metadata, falloc, full)",
        default: None,
    },
    OptSpec {
        name: "compression_type",
        ty: OptType::Str,
        help: "Compression method used for image cluster compression",
        default: Some("zlib"),
    },
    OptSpec {
        name: "size",
        ty: OptType::Size,
        help: "Virtual disk size",
        default: None,
    },
    OptSpec {
        name: "compat",
        ty: OptType::Str,
        help: "Compatibility level (v2 [0.10] or v3 [1.1])",
        default: None,
    },
    OptSpec {
        name: "backing_file",
        ty: OptType::Str,
        help: "File name of a base image",
        default: None,
    },
    OptSpec {
        name: "backing_fmt",
        ty: OptType::Str,
        help: "Image format of the base image",
        default: None,
    },
    OptSpec {
        name: "data_file",
        ty: OptType::Str,
        help: "File name of an external data file",
        default: None,
    },
    OptSpec {
        name: "data_file_raw",
        ty: OptType::Bool,
        help: "The external data file must stay valid as a raw image",
        default: None,
    },
    OptSpec {
        name: "encryption",
        ty: OptType::Bool,
        help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
        default: None,
    },
    LAZY_REFCOUNTS_OPT,
    REFCOUNT_BITS_OPT,
];

/// Options that both creation and amend take.
pub const LAZY_REFCOUNTS_OPT: OptSpec = OptSpec {
    name: "lazy_refcounts",
    ty: OptType::Bool,
    help: "Postpone refcount updates",
    default: Some("off"),
};
pub const REFCOUNT_BITS_OPT: OptSpec = OptSpec {
    name: "refcount_bits",
    ty: OptType::Number,
    help: "Width of a reference count entry in bits",
    default: Some("16"),
};

const V3_HINT: &str = "(use version=v3 or greater)";

/// Creates a qcow2 image at `filename` from creation options.
pub async fn create(ctx: &OpenCtx, filename: &str, mut opts: Opts) -> Result<()> {
    // Options for the protocol file.
    let mut file_opts = Opts::new();
    for key in ["nocow", "extent_size_hint"] {
        if let Some(v) = opts.remove(key) {
            file_opts.insert(key.into(), v);
        }
    }
    let layout = layout(opts)?;
    let data_file = layout.data_file.clone();
    ctx.create_file(filename, file_opts.clone()).await?;
    // The data file is made after the image (as QEMU does).
    if let Some(d) = &data_file {
        if let Err(e) = ctx.create_file(d, file_opts).await {
            remove_created(filename, None);
            return Err(e);
        }
    }
    let made = format(ctx, Place::Path(filename), layout).await;
    if made.is_err() {
        // A half-made image is no image: both files go (QEMU deletes them).
        remove_created(filename, data_file.as_deref());
    }
    made
}

/// `blockdev-create` of qcow2 (QEMU: qcow2_co_create): the image is
/// written into the open node `file`, its data into `data`, with creation
/// options under qemu-img's names.
pub async fn create_on(
    ctx: &OpenCtx,
    file: &Arc<Node>,
    data: Option<&Arc<Node>>,
    mut opts: Opts,
) -> Result<()> {
    // The header names the data file as its node does (QEMU: filename).
    if let Some(d) = data {
        opts.insert("data_file".into(), d.filename().into());
    }
    format(ctx, Place::Nodes(file, data), layout(opts)?).await
}

/// BlockdevCreateOptionsQcow2 under qemu-img's option names.
pub fn from_qapi(qapi: Opts) -> Opts {
    let mut opts = Opts::new();
    for (k, v) in qapi {
        if k == "encrypt" {
            if let Value::Object(e) = v {
                for (ek, ev) in e {
                    opts.insert(format!("encrypt.{ek}"), ev);
                }
            }
            continue;
        }
        let name = match k.as_str() {
            "version" => "compat".to_string(),
            _ => k.replace('-', "_"),
        };
        opts.insert(name, v);
    }
    opts
}

/// The creation options checked, in QEMU's order, into what to write.
fn layout(mut opts: Opts) -> Result<Layout> {
    let size = take_size(&mut opts, "size")?.unwrap_or(0);
    let version = take_version(&mut opts)?;
    let cluster_size = take_cluster_size(&mut opts)?;
    let refcount_bits = take_refcount_bits(&mut opts, version, V3_HINT)?;
    let lazy = take_bool(&mut opts, "lazy_refcounts")?.unwrap_or(false);
    if version < 3 && lazy {
        return Err(Error::invalid(format!(
            "Lazy refcounts only supported with compatibility level 1.1 and above {V3_HINT}"
        )));
    }
    let extended_l2 = take_bool(&mut opts, "extended_l2")?.unwrap_or(false);
    if extended_l2 {
        if version < 3 {
            return Err(Error::invalid(format!(
                "Extended L2 entries are only supported with compatibility level 1.1 and above {V3_HINT}"
            )));
        }
        if cluster_size < 16384 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
    }
    let compression = match take_str(&mut opts, "compression_type")?.as_deref() {
        None | Some("zlib") => Compression::Zlib,
        Some("zstd") => Compression::Zstd,
        Some(v) => {
            return Err(Error::invalid(format!(
                "Parameter 'compression-type' does not accept value '{v}'"
            )))
        }
    };
    let mut prealloc = match take_str(&mut opts, "preallocation")? {
        None => Preallocation::Off,
        Some(p) => Preallocation::parse(&p).map_err(|_| {
            Error::invalid(format!(
                "Parameter 'preallocation' does not accept value '{p}'"
            ))
        })?,
    };
    let backing_file = take_str(&mut opts, "backing_file")?;
    let backing_fmt = take_str(&mut opts, "backing_fmt")?;
    let data_file = take_str(&mut opts, "data_file")?;
    let data_file_raw = take_bool(&mut opts, "data_file_raw")?.unwrap_or(false);
    if data_file_raw && data_file.is_none() {
        return Err(Error::invalid("data-file-raw requires data-file"));
    }
    if data_file_raw && backing_file.is_some() {
        return Err(Error::invalid(
            "Backing file and data-file-raw cannot be used at the same time",
        ));
    }
    if data_file_raw && prealloc == Preallocation::Off {
        // The raw file must read as the disk through the metadata too:
        // every cluster is mapped 1:1 from the start.
        prealloc = Preallocation::Metadata;
    }
    if data_file.is_some() && version < 3 {
        return Err(Error::invalid(format!(
            "External data files are only supported with compatibility level 1.1 and above {V3_HINT}"
        )));
    }
    if version < 3 && compression != Compression::Zlib {
        return Err(Error::invalid(format!(
            "Non-zlib compression type is only supported with compatibility level 1.1 and above {V3_HINT}"
        )));
    }
    let encryption = take_encryption(&mut opts)?;
    if size % 512 != 0 {
        return Err(Error::invalid("Image size must be a multiple of 512 bytes"));
    }

    strata_block::options::reject_unknown(&opts, "qcow2")?;
    Ok(Layout {
        version,
        cluster_size,
        refcount_bits,
        lazy,
        compression,
        backing_file,
        backing_fmt,
        data_file,
        data_file_raw,
        size,
        prealloc,
        encryption,
        extended_l2,
    })
}

/// Where a new image goes: a file by name (qemu-img create), or open
/// nodes (blockdev-create), its own and its data file's.
enum Place<'a> {
    Path(&'a str),
    Nodes(&'a Arc<Node>, Option<&'a Arc<Node>>),
}

/// How a new image is encrypted: qcow's AES (with its password) or LUKS.
enum Encryption {
    Aes,
    Luks(CreateOptions, Vec<u8>),
}

/// The `encryption` and `encrypt.*` options (QEMU's qcow2_co_create_opts
/// renames and the QAPI checks), with the secret looked up before anything
/// is created.
fn take_encryption(opts: &mut Opts) -> Result<Option<Encryption>> {
    let legacy = take_bool(opts, "encryption")?;
    let mut format = take_prefixed(opts, "encrypt.", "format")?;
    if legacy.is_some() && format.is_some() {
        return Err(Error::invalid(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time",
        ));
    }
    if legacy == Some(true) {
        format = Some("aes".into());
    }
    let key_secret = take_prefixed(opts, "encrypt.", "key-secret")?;
    let Some(format) = format else {
        if key_secret.is_some() || opts.keys().any(|k| k.starts_with("encrypt.")) {
            return Err(Error::invalid("Parameter 'encrypt.format' is missing"));
        }
        return Ok(None);
    };
    match format.as_str() {
        "aes" => {
            if let Some(k) = opts.keys().find(|k| k.starts_with("encrypt.")) {
                return Err(Error::invalid(format!("Parameter '{k}' is unexpected")));
            }
            password(key_secret.as_deref(), "encrypt.")?;
            Ok(Some(Encryption::Aes))
        }
        "luks" => {
            let luks = take_luks_create(opts, "encrypt.")?;
            let pw = password(key_secret.as_deref(), "encrypt.")?;
            Ok(Some(Encryption::Luks(luks, pw)))
        }
        f => Err(Error::invalid(format!(
            "Parameter 'encrypt.format' does not accept value '{f}'"
        ))),
    }
}

/// The `compat` option: the header version.
pub(super) fn take_version(opts: &mut Opts) -> Result<u32> {
    match take_str(opts, "compat")?.as_deref() {
        None | Some("1.1") | Some("v3") => Ok(3),
        Some("0.10") | Some("v2") => Ok(2),
        Some(v) => Err(Error::invalid(format!(
            "Parameter 'version' does not accept value '{v}'"
        ))),
    }
}

/// The `cluster_size` option, checked.
pub(super) fn take_cluster_size(opts: &mut Opts) -> Result<u64> {
    let cluster_size = take_size(opts, "cluster_size")?.unwrap_or(65536);
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(Error::invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    Ok(cluster_size)
}

/// The `refcount_bits` option, checked against the version (`hint` says
/// how to ask for v3: create and measure word it differently).
pub(super) fn take_refcount_bits(opts: &mut Opts, version: u32, hint: &str) -> Result<u64> {
    let refcount_bits = take_u64(opts, "refcount_bits")?.unwrap_or(16);
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(Error::invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(Error::invalid(format!(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above {hint}"
        )));
    }
    Ok(refcount_bits)
}

/// Removes the files a failed create made; errors are ignored, as the
/// create's own error is the one to report.
fn remove_created(filename: &str, data_file: Option<&str>) {
    let _ = std::fs::remove_file(filename);
    if let Some(d) = data_file {
        let _ = std::fs::remove_file(d);
    }
}

/// What a validated create asks for.
struct Layout {
    version: u32,
    cluster_size: u64,
    refcount_bits: u64,
    lazy: bool,
    compression: Compression,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: bool,
    size: u64,
    prealloc: Preallocation,
    encryption: Option<Encryption>,
    extended_l2: bool,
}

/// Writes the first clusters of a new image into its empty file, then
/// opens it and grows it to its size.
async fn format(ctx: &OpenCtx, place: Place<'_>, l: Layout) -> Result<()> {
    let Layout {
        version,
        cluster_size,
        refcount_bits,
        lazy,
        compression,
        backing_file,
        backing_fmt,
        data_file,
        data_file_raw,
        size,
        prealloc,
        encryption,
        extended_l2,
    } = l;
    let cs = cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let refcount_order = refcount_bits.trailing_zeros();
    let mut header = Header {
        version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if compression == Compression::Zstd {
            INCOMPAT_COMPRESSION
        } else {
            0
        } | if data_file.is_some() {
            INCOMPAT_DATA_FILE
        } else {
            0
        } | if extended_l2 { INCOMPAT_EXTL2 } else { 0 },
        compatible_features: if lazy { COMPAT_LAZY_REFCOUNTS } else { 0 },
        autoclear_features: if data_file_raw {
            AUTOCLEAR_DATA_FILE_RAW
        } else {
            0
        },
        refcount_order,
        header_length: if version >= 3 { 112 } else { 72 },
        compression,
        extra_fields: vec![0; 7],
        extensions: Vec::new(),
        backing_file,
        backing_format: backing_fmt,
        data_file: data_file.clone(),
        feature_table: Vec::new(),
        crypto_header: None,
        bitmaps: None,
        stale_bitmaps: false,
    };
    if version < 3 {
        header.extra_fields.clear();
    }
    let hdr = header.serialize(cs as usize)?;
    let mut first = vec![0u8; 3 * cs as usize];
    first[..cs as usize].copy_from_slice(&hdr);
    // Refcount table: one entry, the block at cluster 2.
    first[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    // Refcount block: clusters 0, 1 and 2 are in use.
    let rb = &mut first[2 * cs as usize..];
    for i in 0..3u64 {
        let bit = i << refcount_order;
        super::refcount::put_refcount(rb, (bit / 8) as usize, bit, refcount_order, 1);
    }
    let mut flags = ctx.flags.clone();
    flags.read_only = false;
    flags.no_backing = true;
    let mut qo = Opts::new();
    qo.insert("driver".into(), "qcow2".into());
    let octx = match place {
        Place::Path(filename) => {
            let octx = OpenCtx::new(Arc::clone(&ctx.registry), flags);
            let file = octx.open_file(filename).await?;
            file.write(0, IoBuf::from_slice(&first), WriteFlags::default())
                .await?;
            file.flush().await?;
            drop(file);
            qo.insert("filename".into(), filename.into());
            if let Some(d) = &data_file {
                qo.insert(
                    "data-file".into(),
                    serde_json::json!({ "driver": "file", "filename": d }),
                );
            }
            octx
        }
        Place::Nodes(file, data) => {
            let blk = crate::formats::creating_user(file)?;
            let w = blk
                .write(0, IoBuf::from_slice(&first), WriteFlags::default())
                .await;
            let w = match w {
                Ok(_) => blk.flush().await,
                Err(e) => Err(e),
            };
            blk.close().await?;
            w?;
            qo.insert("file".into(), file.name().into());
            if let Some(d) = data {
                qo.insert("data-file".into(), d.name().into());
            }
            OpenCtx::with_graph(Arc::clone(&ctx.registry), flags, Arc::clone(&ctx.graph))
        }
    };
    // Open it as qcow2 and grow it to its size: that makes the L1 table.
    let node = octx.open_image(None, None, qo).await?;
    if size > 0 {
        // Not exact, as QEMU's create: the file may already be longer.
        node.truncate(size, false, prealloc)
            .await
            .map_err(|e| e.context("Could not resize image"))?;
    }
    // Encryption last, as QEMU sets it up: the LUKS header follows the
    // tables the size made.
    if let Some(enc) = &encryption {
        let q = node
            .driver()
            .as_any()
            .and_then(|d| d.downcast_ref::<super::Qcow2Driver>())
            .ok_or_else(|| Error::invalid("Crypto format not supported in qcow2"))?;
        match enc {
            Encryption::Aes => q.set_up_encryption(None).await?,
            Encryption::Luks(o, pw) => q.set_up_encryption(Some((o, pw))).await?,
        }
    }
    node.flush().await?;
    node.close().await?;
    Ok(())
}
