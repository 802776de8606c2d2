//! Pieces every data command shares: the request size limit, the length
//! lists of the vectored commands, pattern verification and the wording
//! of a failed request.

use crate::io::numbers::{cvtnum, print_cvtnum_err};
use crate::outln;
use strata_block::error::strerror;
use strata_block::Error;

/// The largest request QEMU accepts (BDRV_REQUEST_MAX_BYTES: INT_MAX
/// rounded down to a sector).
pub const MAX_BYTES: i64 = 2147483136;

/// Reads the lengths of `readv`/`writev`/`aio_*` (QEMU: create_iovec) and
/// returns their sum; prints why on failure.
pub fn total_length(args: &[String]) -> Option<i64> {
    let mut count: i64 = 0;
    for arg in args {
        let len = match cvtnum(arg) {
            Ok(l) => l,
            Err(e) => {
                print_cvtnum_err(e, arg);
                return None;
            }
        };
        if len > MAX_BYTES {
            outln!("Argument '{arg}' exceeds maximum size {MAX_BYTES}");
            return None;
        }
        if count > MAX_BYTES - len {
            outln!("The total number of bytes exceed the maximum size {MAX_BYTES}");
            return None;
        }
        count += len;
    }
    Some(count)
}

/// True when every byte of `data` is `pattern`.
pub fn matches_pattern(data: &[u8], pattern: u8) -> bool {
    data.iter().all(|&b| b == pattern)
}

/// Prints `<what> failed: <strerror>` (stdout, as qemu-io does) and returns
/// the negative errno.
pub fn failed(what: &str, e: &Error) -> i32 {
    outln!("{what} failed: {}", strerror(e.code()));
    -e.code()
}
