//! librados and librbd, loaded at run time (QEMU's rbd driver is an
//! optional module too): Strata builds and runs everywhere, and only
//! opening an `rbd` image on a machine without the libraries fails. Only
//! the C functions the driver calls are looked up, once per process; the
//! libraries are never unloaded, so a completion that librbd calls late
//! always finds its code.

use libloading::Library;
use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

pub type Rados = *mut c_void;
pub type IoCtx = *mut c_void;
pub type Image = *mut c_void;
pub type Completion = *mut c_void;
pub type ImageOptions = *mut c_void;
pub type Callback = unsafe extern "C" fn(Completion, *mut c_void);
pub type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// librbd's rbd_image_info_t.
#[repr(C)]
pub struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// librbd's image options (enum of RBD_IMAGE_OPTION_*).
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;
pub const RBD_IMAGE_OPTION_DATA_POOL: c_int = 10;

/// librbd's encryption formats and algorithms (rbd_encryption_format_t,
/// rbd_encryption_algorithm_t).
pub const RBD_ENCRYPTION_FORMAT_LUKS1: c_int = 0;
pub const RBD_ENCRYPTION_FORMAT_LUKS2: c_int = 1;
pub const RBD_ENCRYPTION_ALGORITHM_AES128: c_int = 0;
pub const RBD_ENCRYPTION_ALGORITHM_AES256: c_int = 1;

/// rbd_encryption_luks1_format_options_t, and its LUKS2 twin, which has
/// the same fields.
#[repr(C)]
pub struct LuksOptions {
    pub alg: c_int,
    pub passphrase: *const c_char,
    pub passphrase_size: usize,
}

pub type EncryptionFn = unsafe extern "C" fn(Image, c_int, *mut c_void, usize) -> c_int;

/// Image features and flags that block status depends on (librbd.h).
pub const RBD_FEATURE_STRIPINGV2: u64 = 1 << 1;
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const RBD_FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// The C functions, with librbd's and librados's signatures (librbd.h,
/// librados.h of Ceph 16).
pub struct Lib {
    pub rados_create: unsafe extern "C" fn(*mut Rados, *const c_char) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(Rados, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(Rados) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(Rados),
    pub rados_ioctx_create: unsafe extern "C" fn(Rados, *const c_char, *mut IoCtx) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(IoCtx),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(IoCtx, *const c_char),
    pub rados_pool_reverse_lookup: unsafe extern "C" fn(Rados, i64, *mut c_char, usize) -> c_int,
    #[allow(clippy::type_complexity)]
    pub rados_mon_command: unsafe extern "C" fn(
        Rados,
        *const *const c_char,
        usize,
        *const c_char,
        usize,
        *mut *mut c_char,
        *mut usize,
        *mut *mut c_char,
        *mut usize,
    ) -> c_int,
    pub rados_buffer_free: unsafe extern "C" fn(*mut c_char),
    pub rbd_image_options_create: unsafe extern "C" fn(*mut ImageOptions),
    pub rbd_image_options_destroy: unsafe extern "C" fn(ImageOptions),
    pub rbd_image_options_set_string:
        unsafe extern "C" fn(ImageOptions, c_int, *const c_char) -> c_int,
    pub rbd_image_options_set_uint64: unsafe extern "C" fn(ImageOptions, c_int, u64) -> c_int,
    pub rbd_create4: unsafe extern "C" fn(IoCtx, *const c_char, u64, ImageOptions) -> c_int,
    pub rbd_get_data_pool_id: unsafe extern "C" fn(Image) -> i64,
    pub rbd_namespace_exists: unsafe extern "C" fn(IoCtx, *const c_char, *mut bool) -> c_int,
    pub rbd_open: unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_remove: unsafe extern "C" fn(IoCtx, *const c_char) -> c_int,
    pub rbd_read: unsafe extern "C" fn(Image, u64, usize, *mut c_char) -> isize,
    /// Ceph 16 and later; QEMU leaves encryption out of older builds.
    pub rbd_encryption_format: Option<EncryptionFn>,
    pub rbd_encryption_load: Option<EncryptionFn>,
    pub rbd_get_size: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(Image, u64) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Callback, *mut Completion) -> c_int,
    pub rbd_aio_read: unsafe extern "C" fn(Image, u64, usize, *mut c_char, Completion) -> c_int,
    pub rbd_aio_write: unsafe extern "C" fn(Image, u64, usize, *const c_char, Completion) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(Image, u64, u64, Completion) -> c_int,
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(Image, u64, usize, Completion, c_int, c_int) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(Image, Completion) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(Completion) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(Completion),
    pub rbd_get_features: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_get_flags: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_stat: unsafe extern "C" fn(Image, *mut ImageInfo, usize) -> c_int,
    pub rbd_get_parent_info: unsafe extern "C" fn(
        Image,
        *mut c_char,
        usize,
        *mut c_char,
        usize,
        *mut c_char,
        usize,
    ) -> c_int,
    pub rbd_diff_iterate2: unsafe extern "C" fn(
        Image,
        *const c_char,
        u64,
        u64,
        u8,
        u8,
        DiffCallback,
        *mut c_void,
    ) -> c_int,
    /// Keeps the libraries mapped for the life of the process.
    _libs: (Library, Library),
}

/// The libraries, loaded on first use; the error says what to install.
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Lib, String> {
    let open = |name: &str| {
        // SAFETY: loading runs the libraries' initialisers, which are
        // Ceph's own and have no preconditions.
        unsafe { Library::new(name) }.map_err(|e| {
            format!(
                "Could not load {name} ({e}): the rbd driver needs Ceph's client \
                 libraries (Debian: apt-get install librbd1)"
            )
        })
    };
    let rados = open("librados.so.2")?;
    let rbd = open("librbd.so.1")?;
    macro_rules! sym {
        ($lib:expr, $name:ident) => {
            // SAFETY: the field's type is the C function's signature in
            // Ceph's headers, and the library stays loaded in `_libs`.
            *unsafe { $lib.get(concat!(stringify!($name), "\0").as_bytes()) }
                .map_err(|e| format!("{}: {e}", stringify!($name)))?
        };
    }
    macro_rules! opt_sym {
        ($lib:expr, $name:ident) => {
            // SAFETY: as for `sym!`.
            unsafe { $lib.get(concat!(stringify!($name), "\0").as_bytes()) }
                .ok()
                .map(|f| *f)
        };
    }
    Ok(Lib {
        rados_create: sym!(rados, rados_create),
        rados_conf_read_file: sym!(rados, rados_conf_read_file),
        rados_conf_set: sym!(rados, rados_conf_set),
        rados_connect: sym!(rados, rados_connect),
        rados_shutdown: sym!(rados, rados_shutdown),
        rados_ioctx_create: sym!(rados, rados_ioctx_create),
        rados_ioctx_destroy: sym!(rados, rados_ioctx_destroy),
        rados_ioctx_set_namespace: sym!(rados, rados_ioctx_set_namespace),
        rados_pool_reverse_lookup: sym!(rados, rados_pool_reverse_lookup),
        rados_mon_command: sym!(rados, rados_mon_command),
        rados_buffer_free: sym!(rados, rados_buffer_free),
        rbd_image_options_create: sym!(rbd, rbd_image_options_create),
        rbd_image_options_destroy: sym!(rbd, rbd_image_options_destroy),
        rbd_image_options_set_string: sym!(rbd, rbd_image_options_set_string),
        rbd_image_options_set_uint64: sym!(rbd, rbd_image_options_set_uint64),
        rbd_create4: sym!(rbd, rbd_create4),
        rbd_get_data_pool_id: sym!(rbd, rbd_get_data_pool_id),
        rbd_namespace_exists: sym!(rbd, rbd_namespace_exists),
        rbd_open: sym!(rbd, rbd_open),
        rbd_open_read_only: sym!(rbd, rbd_open_read_only),
        rbd_close: sym!(rbd, rbd_close),
        rbd_remove: sym!(rbd, rbd_remove),
        rbd_read: sym!(rbd, rbd_read),
        rbd_encryption_format: opt_sym!(rbd, rbd_encryption_format),
        rbd_encryption_load: opt_sym!(rbd, rbd_encryption_load),
        rbd_get_size: sym!(rbd, rbd_get_size),
        rbd_resize: sym!(rbd, rbd_resize),
        rbd_aio_create_completion: sym!(rbd, rbd_aio_create_completion),
        rbd_aio_read: sym!(rbd, rbd_aio_read),
        rbd_aio_write: sym!(rbd, rbd_aio_write),
        rbd_aio_discard: sym!(rbd, rbd_aio_discard),
        rbd_aio_write_zeroes: sym!(rbd, rbd_aio_write_zeroes),
        rbd_aio_flush: sym!(rbd, rbd_aio_flush),
        rbd_aio_get_return_value: sym!(rbd, rbd_aio_get_return_value),
        rbd_aio_release: sym!(rbd, rbd_aio_release),
        rbd_get_features: sym!(rbd, rbd_get_features),
        rbd_get_flags: sym!(rbd, rbd_get_flags),
        rbd_stat: sym!(rbd, rbd_stat),
        rbd_get_parent_info: sym!(rbd, rbd_get_parent_info),
        rbd_diff_iterate2: sym!(rbd, rbd_diff_iterate2),
        _libs: (rados, rbd),
    })
}
