//! Making an RBD image (QEMU: qemu_rbd_do_create), from `qemu-img create`
//! options or from `blockdev-create`'s BlockdevCreateOptionsRbd. Strata
//! adds `redundancy`. Nothing is left half-made: a secret that is missing
//! is found before anything is created, and an image whose encryption
//! header could not be written is removed again.

use crate::conn::{errno_msg, Location, Pool};
use crate::encryption::Create;
use crate::redundancy::{self, Redundancy};
use crate::{ffi, filename, take_location};
use std::ffi::CString;
use strata_block::options::{take_size, take_str, OptSpec, OptType, Opts};
use strata_block::{Error, Result};

/// The create options of `rbd`, QEMU's and then Strata's.
pub const CREATE_OPTIONS: &[OptSpec] = &[
    OptSpec {
        name: "size",
        ty: OptType::Size,
        help: "Virtual disk size",
        default: None,
    },
    OptSpec {
        name: "cluster_size",
        ty: OptType::Size,
        help: "RBD object size",
        default: None,
    },
    OptSpec {
        name: "password-secret",
        ty: OptType::Str,
        help: "ID of secret providing the password",
        default: None,
    },
    OptSpec {
        name: "encrypt.format",
        ty: OptType::Str,
        help: "Encrypt the image, format choices: 'luks', 'luks2'",
        default: None,
    },
    OptSpec {
        name: "encrypt.cipher-alg",
        ty: OptType::Str,
        help: "Name of encryption cipher algorithm (allowed values: aes-128, aes-256)",
        default: None,
    },
    OptSpec {
        name: "encrypt.key-secret",
        ty: OptType::Str,
        help: "ID of secret providing LUKS passphrase",
        default: None,
    },
    OptSpec {
        name: "redundancy",
        ty: OptType::Str,
        help: "Redundancy of the image's data: full copies (x) or erasure coding (x:y)",
        default: None,
    },
];

/// What an image is made from (BlockdevCreateOptionsRbd).
pub struct Spec {
    loc: Location,
    size: u64,
    cluster_size: Option<u64>,
    encrypt: Option<Create>,
    redundancy: Option<Redundancy>,
}

fn take_redundancy(opts: &mut Opts) -> Result<Option<Redundancy>> {
    take_str(opts, "redundancy")?
        .map(|r| Redundancy::parse(&r))
        .transpose()
}

impl Spec {
    /// From `qemu-img create`'s file name and `-o` options.
    pub fn from_filename(filename: &str, mut opts: Opts) -> Result<Spec> {
        // QEMU rounds the size up to whole sectors here, not over QMP.
        let size = take_size(&mut opts, "size")?
            .unwrap_or(0)
            .next_multiple_of(512);
        let cluster_size = take_size(&mut opts, "cluster_size")?.filter(|&c| c != 0);
        let password_secret = take_str(&mut opts, "password-secret")?;
        let redundancy = take_redundancy(&mut opts)?;
        let mut where_ = Opts::new();
        filename::parse(filename, &mut where_)?;
        let mut loc = take_location(&mut where_)?;
        loc.key_secret = loc.key_secret.or(password_secret);
        let encrypt = Create::take(&mut opts)?;
        Ok(Spec {
            loc,
            size,
            cluster_size,
            encrypt,
            redundancy,
        })
    }

    /// From `blockdev-create`'s options (the QMP schema has checked them).
    pub fn from_qapi(mut opts: Opts) -> Result<Spec> {
        let mut location = match opts.remove("location") {
            Some(serde_json::Value::Object(m)) => m,
            _ => return Err(Error::invalid("Parameter 'location' is missing")),
        };
        // QEMU takes the image's `encrypt` from here, not the location's.
        let _ = location.remove("encrypt");
        let loc = take_location(&mut location)?;
        Ok(Spec {
            loc,
            size: take_size(&mut opts, "size")?.unwrap_or(0),
            cluster_size: take_size(&mut opts, "cluster-size")?,
            encrypt: Create::take(&mut opts)?,
            redundancy: take_redundancy(&mut opts)?,
        })
    }

    /// Makes the image, in QEMU's order: the checks, the connection, the
    /// image, then its encryption header.
    pub fn make(self) -> Result<()> {
        let loc = &self.loc;
        if loc.snapshot.is_some() {
            return Err(Error::invalid("Can't use snapshot name for image creation"));
        }
        let mut order = None;
        if let Some(obj) = self.cluster_size {
            if !obj.is_power_of_two() {
                return Err(Error::invalid("obj size needs to be power of 2"));
            }
            if obj < 4096 {
                return Err(Error::invalid("obj size too small"));
            }
            order = Some(u64::from(obj.trailing_zeros()));
        }
        let pool = Pool::connect(loc, false)?;
        let lib = pool.lib;
        if self.encrypt.is_some() && lib.rbd_encryption_format.is_none() {
            return Err(Error::unsupported(
                "RBD library does not support image encryption",
            ));
        }
        let data_pool = match self.redundancy {
            Some(r) => redundancy::data_pool(&pool, &loc.pool, r)?,
            None => None,
        };
        let name = CString::new(loc.image.as_str())
            .map_err(|_| Error::invalid("image name contains a NUL byte"))?;
        let data_pool = data_pool
            .map(CString::new)
            .transpose()
            .map_err(|_| Error::invalid("pool name contains a NUL byte"))?;
        // With encryption, room for the header too, trimmed after format.
        let object_size = 1u64 << order.unwrap_or(22);
        let raw_size = match &self.encrypt {
            Some(_) => self.size + Create::headroom(object_size),
            None => self.size,
        };
        let mut io: ffi::ImageOptions = std::ptr::null_mut();
        // SAFETY: the options are made, filled and destroyed here; the
        // strings outlive the calls; the pool's context is live.
        let r = unsafe {
            (lib.rbd_image_options_create)(&mut io);
            let mut r = 0;
            if let Some(order) = order {
                r = (lib.rbd_image_options_set_uint64)(io, ffi::RBD_IMAGE_OPTION_ORDER, order);
            }
            if let (0, Some(dp)) = (r, &data_pool) {
                r = (lib.rbd_image_options_set_string)(
                    io,
                    ffi::RBD_IMAGE_OPTION_DATA_POOL,
                    dp.as_ptr(),
                );
            }
            if r == 0 {
                r = (lib.rbd_create4)(pool.ioctx, name.as_ptr(), raw_size, io);
            }
            (lib.rbd_image_options_destroy)(io);
            r
        };
        if r < 0 {
            return Err(errno_msg(r, "error rbd create"));
        }
        if let Some(enc) = &self.encrypt {
            if let Err(e) = format(&pool, &name, &loc.image, enc, self.size) {
                // SAFETY: the context is live; the image is closed.
                unsafe { (lib.rbd_remove)(pool.ioctx, name.as_ptr()) };
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Writes the encryption header onto the image just made.
fn format(pool: &Pool, name: &CString, image: &str, enc: &Create, size: u64) -> Result<()> {
    let lib = pool.lib;
    let mut img: ffi::Image = std::ptr::null_mut();
    // SAFETY: the context is live; the name outlives the call.
    let r = unsafe { (lib.rbd_open)(pool.ioctx, name.as_ptr(), &mut img, std::ptr::null()) };
    if r < 0 {
        return Err(errno_msg(
            r,
            format!("error opening image '{image}' for encryption format"),
        ));
    }
    let res = enc.apply(lib, img, size);
    // SAFETY: opened above, closed once.
    unsafe { (lib.rbd_close)(img) };
    res
}
