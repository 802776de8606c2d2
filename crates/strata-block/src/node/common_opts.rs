//! The options every node takes, whatever its driver (QEMU: the common
//! runtime options of bdrv_open_common): cache mode, zero detection.

use crate::error::{Error, Result};

/// Cache mode of a node tree (`-t` / `cache=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheMode {
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// The guest-visible write cache is on: writes need not be stable until a flush.
    pub writeback: bool,
    /// Flushes are ignored.
    pub no_flush: bool,
}

impl CacheMode {
    /// The default: writeback through the host page cache.
    pub const WRITEBACK: CacheMode = CacheMode {
        direct: false,
        writeback: true,
        no_flush: false,
    };

    /// Parses a cache mode name as QEMU's tools accept it.
    pub fn parse(s: &str) -> Result<CacheMode> {
        let (direct, writeback, no_flush) = match s {
            "writeback" => (false, true, false),
            "none" | "off" => (true, true, false),
            "writethrough" => (false, false, false),
            "directsync" => (true, false, false),
            "unsafe" => (false, true, true),
            _ => return Err(Error::invalid(format!("Invalid cache option: {s}"))),
        };
        Ok(CacheMode {
            direct,
            writeback,
            no_flush,
        })
    }
}

impl Default for CacheMode {
    fn default() -> Self {
        CacheMode::WRITEBACK
    }
}

/// What a node does with writes of buffers that are all zeroes
/// (`detect-zeroes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum DetectZeroes {
    /// Write them as they are.
    #[default]
    Off = 0,
    /// Turn them into write-zeroes requests.
    On = 1,
    /// Turn them into write-zeroes requests that may deallocate, when the
    /// node passes discards on.
    Unmap = 2,
}

impl DetectZeroes {
    /// The value as QEMU spells it (BlockdevDetectZeroesOptions).
    pub fn name(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }

    pub(crate) fn from_u8(v: u8) -> DetectZeroes {
        match v {
            1 => DetectZeroes::On,
            2 => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        }
    }

    /// Parses the option value as QEMU spells it.
    pub fn parse(s: &str) -> Result<DetectZeroes> {
        match s {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            _ => Err(Error::invalid(format!(
                "Parameter 'detect-zeroes' does not accept value '{s}'"
            ))),
        }
    }
}

/// Parses `discard` (QEMU: bdrv_parse_discard_flags): true passes
/// discards on.
pub fn parse_discard(s: &str) -> Result<bool> {
    match s {
        "ignore" | "off" => Ok(false),
        "unmap" | "on" => Ok(true),
        _ => Err(Error::invalid("Invalid discard option")),
    }
}

/// `detect-zeroes=unmap` needs discards passed on (QEMU:
/// bdrv_parse_detect_zeroes).
pub fn check_detect_zeroes(dz: DetectZeroes, unmap: bool) -> Result<()> {
    if dz == DetectZeroes::Unmap && !unmap {
        return Err(Error::invalid(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ));
    }
    Ok(())
}

/// The options every node takes, whatever its driver (QEMU: the common
/// runtime options of bdrv_open_common).
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeOptions {
    /// Writes are refused.
    pub read_only: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// Discard requests are passed on (`discard=unmap`); else they succeed
    /// doing nothing.
    pub unmap: bool,
    /// Zero-buffer detection on writes.
    pub detect_zeroes: DetectZeroes,
    /// Reads copy what they find in the backing chain into this node.
    pub copy_on_read: bool,
    /// Opened inactive (`active=off`): another process owns the image until
    /// the node is activated.
    pub inactive: bool,
}
