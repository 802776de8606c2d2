//! What both tools share: start-up, opening images as QEMU's tools do, and
//! the size formats QEMU prints.

use std::sync::Arc;
use strata_block::options::{nest, parse_json, parse_keyval, Opts};
use strata_block::{Error, Node, OpenCtx, OpenFlags, Registry, Result};

/// Sets the program name for messages from argv[0] and returns the registry.
pub fn init() -> Arc<Registry> {
    let argv0 = std::env::args().next().unwrap_or_else(|| "strata".into());
    strata_block::report::set_prog_name(&argv0);
    strata_block::report::set_stdout_hook(crate::stdout::write_fmt);
    strata_block::report::set_flush_hook(crate::stdout::flush);
    strata_daemon::registry()
}

/// The full argv[0], as QEMU's usage hints print it.
pub fn argv0() -> String {
    std::env::args().next().unwrap_or_else(|| "strata".into())
}

/// The version QEMU's tools print for `-V`; Strata answers as the QEMU
/// release it replaces, because scripts parse it.
pub const QEMU_FULL_VERSION: &str = "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)";

/// The copyright line after the version.
pub const QEMU_COPYRIGHT: &str =
    "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers";

/// The last lines of QEMU's `--help` texts.
pub const QEMU_HELP_BOTTOM: &str =
    "See <https://qemu.org/contribute/report-a-bug> for how to report bugs.\n\
     More information on the QEMU project at <https://qemu.org>.";

/// How an image is named on a command line.
pub struct ImageSpec<'a> {
    /// File name, `json:{...}`, or with `--image-opts` a key=value string.
    pub name: &'a str,
    /// `-f`.
    pub format: Option<&'a str>,
    /// `--image-opts`: `name` is an option string.
    pub image_opts: bool,
}

/// Opens an image the way qemu-img and qemu-io do (QEMU: blk_new_open).
pub async fn open(
    reg: &Arc<Registry>,
    spec: &ImageSpec<'_>,
    flags: OpenFlags,
) -> Result<Arc<Node>> {
    open_with(reg, spec, flags, Opts::new()).await
}

/// [`open`] with options of the tool's own laid over the user's (nested
/// objects merge key by key).
pub async fn open_with(
    reg: &Arc<Registry>,
    spec: &ImageSpec<'_>,
    flags: OpenFlags,
    extra: Opts,
) -> Result<Arc<Node>> {
    let ctx = OpenCtx::new(Arc::clone(reg), flags);
    if spec.image_opts {
        let mut opts = image_opts(spec.name)?;
        merge(&mut opts, extra);
        return ctx.open_image(None, spec.format, opts).await;
    }
    ctx.open_image(Some(spec.name), spec.format, extra).await
}

fn merge(into: &mut Opts, from: Opts) {
    use serde_json::Value;
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Parses an `--image-opts` string (`driver=qcow2,file.filename=x`) or JSON.
pub fn image_opts(s: &str) -> Result<Opts> {
    if let Some(j) = s.strip_prefix("json:") {
        return parse_json(j);
    }
    nest(&parse_keyval(s, None)?)
}

/// Creates the throttle group of `--object throttle-group,...` (the pairs
/// as parsed, `qom-type` among them); `Err` is the message to report.
pub fn throttle_group_object(pairs: &[(String, String)]) -> std::result::Result<(), String> {
    let props: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k != "qom-type")
        .cloned()
        .collect();
    strata_drivers::filters::throttle::add_group_object(&props).map_err(|e| e.to_string())
}

/// qemu-img's `--object`: throttle groups are created; other types are
/// accepted without effect, as before. `Err` is the message to report.
pub fn img_object(def: &str) -> std::result::Result<(), String> {
    let pairs = parse_keyval(def, Some("qom-type")).map_err(|e| e.to_string())?;
    match pairs.iter().find(|(k, _)| k == "qom-type") {
        Some((_, ty)) if ty == "throttle-group" => throttle_group_object(&pairs),
        Some((_, ty)) if ty == "secret" => secret_object(&pairs),
        _ => Ok(()),
    }
}

/// `--object secret,id=ID,data=...|file=...[,format=base64]`: kept for the
/// formats whose `key-secret` names it.
pub fn secret_object(pairs: &[(String, String)]) -> std::result::Result<(), String> {
    strata_crypto::secret::define(pairs).map_err(|e| e.0)
}

/// `Could not open 'x': reason`, the wrapping qemu-img puts around open errors.
pub fn open_error(name: &str, e: &Error) -> String {
    format!("Could not open '{name}': {e}")
}

/// qemu-img's human size (QEMU: size_to_str): `%0.3g` in the unit where the
/// value is below 1000: `1 GiB`, `1.5 KiB`, `0.999 MiB`, `512 B`.
pub fn size_to_str(val: u64) -> String {
    const PREFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val * 1024 / 1000) gives floor(log2) + 1; a unit is ten of those.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let exp = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i64 + 1
    };
    let i = (((exp - 1).max(0)) / 10).min(6) as usize;
    let div = (1u128 << (i * 10)) as f64;
    format!("{} {}B", format_g(val as f64 / div, 3), PREFIXES[i])
}

/// C's `%.*g`: `prec` significant digits, trailing zeros stripped.
pub fn format_g(v: f64, prec: usize) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let exp = v.abs().log10().floor() as i32;
    if exp < -4 || exp >= prec as i32 {
        let s = format!("{:.*e}", prec.saturating_sub(1), v);
        return s;
    }
    let decimals = (prec as i32 - 1 - exp).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// qemu-io's size text (QEMU: cvtstr): `4 KiB`, `2.500 KiB`, `42 bytes`.
pub fn cvtstr(value: f64) -> String {
    let (v, unit) = if value >= (1u64 << 60) as f64 {
        (value / (1u64 << 60) as f64, "EiB")
    } else if value >= (1u64 << 50) as f64 {
        (value / (1u64 << 50) as f64, "PiB")
    } else if value >= (1u64 << 40) as f64 {
        (value / (1u64 << 40) as f64, "TiB")
    } else if value >= (1u64 << 30) as f64 {
        (value / (1u64 << 30) as f64, "GiB")
    } else if value >= (1u64 << 20) as f64 {
        (value / (1u64 << 20) as f64, "MiB")
    } else if value >= (1u64 << 10) as f64 {
        (value / (1u64 << 10) as f64, "KiB")
    } else {
        (value, "bytes")
    };
    // C's %f keeps six decimals below 1 KiB, %.3f above; QEMU then cuts the
    // text at the first ".000" wherever it is (100.000400 bytes → "100 bytes").
    let s = if unit == "bytes" {
        format!("{v:.6}")
    } else {
        format!("{v:.3}")
    };
    match s.find(".000") {
        Some(i) => format!("{} {unit}", &s[..i]),
        None => format!("{s} {unit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_img_prints_them() {
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(196608), "192 KiB");
        assert_eq!(size_to_str(1047552), "0.999 MiB");
        assert_eq!(size_to_str(1048064), "1 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(6442450944), "6 GiB");
        assert_eq!(size_to_str(5000 << 30), "4.88 TiB");
    }

    #[test]
    fn cvtstr_as_qemu_io_prints_it() {
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(2560.0), "2.500 KiB");
        assert_eq!(cvtstr(42.0), "42 bytes");
        assert_eq!(cvtstr(100.0004), "100 bytes");
        assert_eq!(cvtstr(366.523637), "366.523637 bytes");
        assert_eq!(cvtstr(64978.0), "63.455 KiB");
        assert_eq!(cvtstr(134217728.0), "128 MiB");
    }
}
