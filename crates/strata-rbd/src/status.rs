//! Block status from `rbd_diff_iterate2` (QEMU: qemu_rbd_co_block_status):
//! whole objects, from the object map, so an image keeps its holes through
//! `map`, `convert` and NBD's `base:allocation`. Without a valid fast-diff
//! map, everything is data, as in QEMU.
//!
//! librbd before 1.17 (Ceph 16 has 1.16) reports wrong offsets when asked
//! from an offset inside an object, so the walk starts at the object's
//! start; QEMU works around the same bug the same way, and gives up on
//! images with striping or a parent, where that is not enough.
//!
//! On an encrypted image, librbd without the fix for Ceph tracker 66570
//! (2024; Ceph 16 here lacks it) gives the whole-object walk's offsets
//! without the header's shift, so
//! QEMU's block status there is off by the header, and a convert skips
//! data. The walk that lists each object's extents is right in every
//! version: encrypted images use that one, from the exact offset.

use crate::ffi::{
    Image, ImageInfo, Lib, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_STRIPINGV2,
    RBD_FLAG_FAST_DIFF_INVALID,
};
use std::ffi::{c_int, c_void};

/// The walk's state (QEMU: RBDDiffIterateReq).
struct Walk {
    offs: u64,
    bytes: u64,
    exists: bool,
}

/// Stops the walk early (any value librbd does not use).
const STOP: c_int = -9000;

unsafe extern "C" fn extent(offs: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the Walk of the running rbd_diff_iterate2 call.
    let w = unsafe { &mut *(arg as *mut Walk) };
    // A hole is left out, as unallocated.
    if exists == 0 {
        return 0;
    }
    if !w.exists && offs > w.offs {
        // From a hole to the first data: the hole's length.
        w.bytes = offs - w.offs;
        return STOP;
    }
    if w.exists && offs > w.offs + w.bytes {
        // Data, then a hole jumped over: the data's length.
        return STOP;
    }
    w.bytes += len as u64;
    w.exists = true;
    0
}

/// Whether `[offset, offset + bytes)` starts with data (true) or a hole
/// (false), and for how long; None when the image cannot say.
pub fn query(
    lib: &Lib,
    image: Image,
    offset: u64,
    bytes: u64,
    encrypted: bool,
) -> Option<(bool, u64)> {
    let (mut features, mut flags) = (0u64, 0u64);
    // SAFETY: the image is open; the out pointers are valid.
    if unsafe { (lib.rbd_get_features)(image, &mut features) } < 0
        || unsafe { (lib.rbd_get_flags)(image, &mut flags) } < 0
        || features & RBD_FEATURE_STRIPINGV2 != 0
    {
        return None;
    }
    let fast_diff =
        features & RBD_FEATURE_FAST_DIFF != 0 && flags & RBD_FLAG_FAST_DIFF_INVALID == 0;
    if !fast_diff && !encrypted {
        return None;
    }
    // SAFETY: NULL buffers of length 0 ask only whether there is a parent.
    let parent = unsafe {
        (lib.rbd_get_parent_info)(
            image,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
            0,
        )
    };
    if parent != -libc::ENOENT {
        return None;
    }
    // SAFETY: an all-zero rbd_image_info_t is valid; rbd_stat fills it in.
    let mut info: ImageInfo = unsafe { std::mem::zeroed() };
    if unsafe { (lib.rbd_stat)(image, &mut info, std::mem::size_of::<ImageInfo>()) } < 0
        || !info.obj_size.is_power_of_two()
    {
        return None;
    }
    // The whole-object walk must start at an object's start.
    let head = if encrypted {
        0
    } else {
        offset & (info.obj_size - 1)
    };
    let mut w = Walk {
        offs: offset - head,
        bytes: 0,
        exists: false,
    };
    let len = bytes + head;
    // SAFETY: `w` outlives the call, which runs the callback on this thread.
    let r = unsafe {
        (lib.rbd_diff_iterate2)(
            image,
            std::ptr::null(),
            w.offs,
            len,
            1,
            u8::from(!encrypted),
            extent,
            &mut w as *mut Walk as *mut c_void,
        )
    };
    if r < 0 && r != STOP {
        return None;
    }
    if !w.exists && r == 0 {
        // No extent at all: the whole range is a hole.
        w.bytes = len;
    }
    // An object straddling the end of the range counts whole; the caller
    // clamps.
    (w.bytes > head).then(|| (w.exists, w.bytes - head))
}
