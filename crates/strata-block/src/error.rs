//! The one error type of the block layer: an errno (what QEMU's tools report as
//! `strerror`) and, where there is more to say, a message that says what and where.

use std::fmt;
use std::io;

/// Result of every block-layer operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error of the block layer.
///
/// `errno` is what a caller that only knows numbers sees (qemu-io prints
/// `read failed: Input/output error` from it); `msg` is the full sentence for
/// callers that print one (`Could not open 'x': No such file or directory`).
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    errno: i32,
    msg: Option<String>,
}

impl Error {
    /// An error that is only an errno.
    pub fn errno(errno: i32) -> Self {
        Error { errno, msg: None }
    }

    /// An error with a message; `errno` is what callers that want a number get.
    pub fn msg(errno: i32, msg: impl Into<String>) -> Self {
        Error {
            errno,
            msg: Some(msg.into()),
        }
    }

    /// Invalid argument with a message (the most common error of option parsing).
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::msg(libc::EINVAL, msg)
    }

    /// Operation not supported, with a message.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::msg(libc::ENOTSUP, msg)
    }

    /// Corrupt metadata found in an image: what and where.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::msg(libc::EIO, msg)
    }

    /// The errno of this error (positive).
    pub fn code(&self) -> i32 {
        self.errno
    }

    /// The message, if this error has one beyond its errno.
    pub fn message(&self) -> Option<&str> {
        self.msg.as_deref()
    }

    /// The same error with `prefix: ` put before its text.
    pub fn context(self, prefix: impl fmt::Display) -> Self {
        let text = format!("{prefix}: {self}");
        Error {
            errno: self.errno,
            msg: Some(text),
        }
    }
}

/// The C library's text for an errno, without Rust's ` (os error N)` tail.
pub fn strerror(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.msg {
            Some(m) => f.write_str(m),
            None => f.write_str(&strerror(self.errno)),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({}: {})", self.errno, self)
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(n) => Error::errno(n),
            None => Error::msg(libc::EIO, e.to_string()),
        }
    }
}

/// Shorthand for building an `Err` from an errno.
pub fn err<T>(errno: i32) -> Result<T> {
    Err(Error::errno(errno))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_has_no_rust_tail() {
        assert_eq!(strerror(libc::EIO), "Input/output error");
        assert_eq!(
            Error::errno(libc::ENOENT).to_string(),
            "No such file or directory"
        );
    }

    #[test]
    fn context_keeps_errno() {
        let e = Error::errno(libc::ENOENT).context("Could not open 'x'");
        assert_eq!(e.code(), libc::ENOENT);
        assert_eq!(
            e.to_string(),
            "Could not open 'x': No such file or directory"
        );
    }
}
