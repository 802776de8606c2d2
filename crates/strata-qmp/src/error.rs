//! QMP errors: a class and a human description, sent as
//! `{"error": {"class": ..., "desc": ...}}` (qapi/error.json).

use serde_json::{json, Value};
use std::fmt;

/// The error classes QMP clients can tell apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Everything but the cases below.
    GenericError,
    /// The command does not exist, or is not available now.
    CommandNotFound,
    /// A device has no active medium or similar.
    DeviceNotActive,
    /// A device was not found.
    DeviceNotFound,
    /// KVM lacks a capability.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// An error a command or the protocol reports to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    /// Its class.
    pub class: ErrorClass,
    /// Its description.
    pub desc: String,
}

impl QmpError {
    /// A GenericError.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        let mut desc = desc.into();
        // The image-lock hint is QEMU's error_append_hint, which the
        // command line prints and QMP never sends.
        if let Some(i) = desc.find("\nIs another process using the image [") {
            desc.truncate(i);
        }
        QmpError {
            class: ErrorClass::GenericError,
            desc,
        }
    }

    /// A CommandNotFound error.
    pub fn command_not_found(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }

    /// The `error` member of a response.
    pub fn to_value(&self) -> Value {
        json!({"class": self.class.name(), "desc": self.desc})
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}

impl From<String> for QmpError {
    fn from(desc: String) -> Self {
        QmpError::generic(desc)
    }
}
