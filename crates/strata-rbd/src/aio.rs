//! One librbd asynchronous request as a future. librbd calls the
//! completion on one of its own threads; the callback hands the result
//! through a oneshot channel to the task on the node's event loop, so no
//! thread is parked per request. The request's buffer lives in the
//! callback's state until librbd is done with it: a caller that gives up
//! (its future dropped) never frees memory librbd still writes into.

use crate::ffi::{Completion, Lib};
use std::ffi::{c_int, c_void};
use strata_block::{Error, IoBuf, Result};
use tokio::sync::oneshot;

/// What the callback owns until it runs.
struct Pending {
    lib: &'static Lib,
    buf: Option<IoBuf>,
    done: oneshot::Sender<(isize, Option<IoBuf>)>,
}

/// librbd's completion callback.
unsafe extern "C" fn complete(c: Completion, arg: *mut c_void) {
    // SAFETY: `arg` is the Box that `submit` leaked for this completion,
    // and librbd calls this once per completion.
    let p = unsafe { Box::from_raw(arg as *mut Pending) };
    // SAFETY: `c` is this request's completion, released only here.
    let r = unsafe { (p.lib.rbd_aio_get_return_value)(c) };
    unsafe { (p.lib.rbd_aio_release)(c) };
    // The caller may have gone; the buffer is freed here then.
    let _ = p.done.send((r, p.buf));
}

/// A request on its way: awaited, librbd's return value and the buffer.
pub struct Waiter(oneshot::Receiver<(isize, Option<IoBuf>)>);

impl Waiter {
    pub async fn done(self) -> Result<(isize, Option<IoBuf>)> {
        self.0.await.map_err(|_| Error::errno(libc::EIO))
    }
}

/// Starts a request with `start(completion, buffer pointer)`; nothing of
/// it stays on the caller's stack but the [`Waiter`].
pub fn submit(
    lib: &'static Lib,
    buf: Option<IoBuf>,
    start: impl FnOnce(Completion, *mut u8) -> c_int,
) -> Result<Waiter> {
    let (done, rx) = oneshot::channel();
    let mut pending = Box::new(Pending { lib, buf, done });
    let ptr = pending
        .buf
        .as_mut()
        .map_or(std::ptr::null_mut(), IoBuf::as_mut_ptr);
    let arg = Box::into_raw(pending) as *mut c_void;
    let mut c: Completion = std::ptr::null_mut();
    // SAFETY: `arg` outlives the completion: the callback takes it back.
    let r = unsafe { (lib.rbd_aio_create_completion)(arg, complete, &mut c) };
    if r < 0 {
        // SAFETY: no completion exists, so nothing else has `arg`.
        drop(unsafe { Box::from_raw(arg as *mut Pending) });
        return Err(Error::errno(-r));
    }
    let r = start(c, ptr);
    if r < 0 {
        // Not queued: the callback never runs.
        // SAFETY: as above, and `c` was never handed to librbd.
        unsafe { (lib.rbd_aio_release)(c) };
        drop(unsafe { Box::from_raw(arg as *mut Pending) });
        return Err(Error::errno(-r));
    }
    Ok(Waiter(rx))
}

/// A request's result as the block layer wants it: a negative value is
/// an errno.
pub fn check(r: isize) -> Result<()> {
    if r < 0 {
        return Err(Error::errno(-r as i32));
    }
    Ok(())
}
