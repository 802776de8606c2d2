//! `qemu-img create`: option handling as bdrv_img_create does it, the
//! `Formatting ...` line, then the driver's create.

use super::{getopt, usage_error, Ctx};
use super::{long, opt};
use std::sync::Arc;
pub(super) use strata_block::create_opts::{
    merged_options, opts_of, print_opts, set_option, SetOpt,
};
use strata_block::options::{parse_keyval, parse_size, OptSpec, OptType, Opts};
use strata_block::report::error_report;
use strata_block::{Error, OpenCtx, OpenFlags, Registry};

const OPTS: &[super::Opt] = &[
    opt('F', None, true),
    opt('b', None, true),
    opt('f', None, true),
    opt('o', None, true),
    opt('q', None, false),
    opt('u', None, false),
    opt('h', Some("help"), false),
    long("object", true),
];

/// QEMU's has_help_option: an option list that asks for `help` or `?`.
pub(super) fn has_help_option(list: &str) -> bool {
    parse_keyval(list, None)
        .unwrap_or_default()
        .iter()
        .any(|(k, _)| k == "help" || k == "?")
}

fn type_name(t: OptType) -> &'static str {
    match t {
        OptType::Bool => "bool (on/off)",
        OptType::Number => "num",
        OptType::Size => "size",
        OptType::Str => "str",
    }
}

/// Prints `-o help`: sorted lines `  name=<type>` padded to 24, ` - help`.
pub fn print_help(caption: &str, specs: &[OptSpec], trailer: bool) {
    crate::outln!("{caption}");
    let mut lines: Vec<String> = specs
        .iter()
        .map(|o| {
            format!(
                "  {:<22} - {}",
                format!("{}=<{}>", o.name, type_name(o.ty)),
                o.help
            )
        })
        .collect();
    lines.sort();
    for l in lines {
        crate::outln!("{l}");
    }
    if trailer {
        crate::outln!();
        crate::outln!("The protocol level may support further options.");
        crate::outln!("Specify the target filename to include those options.");
    }
}

pub fn run(ctx: Ctx) -> i32 {
    let p = match getopt("create", &ctx.args, OPTS) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let (mut fmt, mut base, mut base_fmt, mut optstr, mut quiet, mut unsafe_backing) = (
        "raw".to_string(),
        None::<String>,
        None::<String>,
        Vec::<String>::new(),
        false,
        false,
    );
    for (i, v) in p.opts {
        let v = v.unwrap_or_default();
        match i {
            0 => base_fmt = Some(v),
            1 => base = Some(v),
            2 => fmt = v,
            3 => optstr.push(v),
            4 => quiet = true,
            5 => unsafe_backing = true,
            6 => {
                crate::outln!("Usage: {} create [-f FMT] [-o OPTS] [-b BACKING_FILE [-F BACKING_FMT]] [-u] FILENAME [SIZE]", crate::common::argv0());
                return 0;
            }
            _ => {}
        }
    }
    let reg = Arc::clone(&ctx.reg);
    let Some(class) = reg.get(&fmt) else {
        let name = p.operands.first().cloned().unwrap_or_default();
        error_report(format!("{name}: Unknown file format '{fmt}'"));
        return 1;
    };
    // The protocol the file name asks for adds its own options (QEMU:
    // bdrv_img_create appends the protocol's create options).
    let proto = match p.operands.first() {
        // An unknown protocol is create's own error to give, later.
        Some(f) => OpenCtx::new(Arc::clone(&reg), OpenFlags::default())
            .find_protocol(f, true)
            .ok()
            .or_else(|| reg.get("file")),
        None => reg.get("file"),
    };
    let want_help = optstr.iter().any(|o| has_help_option(o));
    if want_help {
        if p.operands.is_empty() {
            print_help(
                &format!("Supported {fmt} options:"),
                class.create_options(),
                true,
            );
        } else {
            print_help(
                "Supported options:",
                &merged_options(&*class, proto.as_deref()),
                false,
            );
        }
        return 0;
    }
    let Some(filename) = p.operands.first().cloned() else {
        return usage_error("create", "Expecting image file name");
    };
    let mut size_arg = None;
    if let Some(s) = p.operands.get(1) {
        match parse_size(s, 1) {
            Ok(v) if v <= i64::MAX as u64 => size_arg = Some(v),
            Ok(_) => {
                error_report(
                    "Invalid image size specified. Must be between 0 and 9223372036854775807.",
                );
                return 1;
            }
            Err(_) => {
                error_report(format!("Invalid image size specified: '{s}'."));
                return 1;
            }
        }
    }
    if let Some(extra) = p.operands.get(2) {
        return usage_error("create", format!("Unexpected argument: {extra}"));
    }
    let fail = |msg: String| {
        error_report(format!("{filename}: {msg}"));
        1
    };
    let specs = merged_options(&*class, proto.as_deref());
    let mut set: Vec<SetOpt> = Vec::new();
    if let Some(sz) = size_arg {
        let _ = set_option(&mut set, &specs, "size", &sz.to_string());
    }
    let mut size_in_o = false;
    for o in &optstr {
        let pairs = match parse_keyval(o, None) {
            Ok(p) => p,
            Err(e) => return fail(e.to_string()),
        };
        for (k, v) in pairs {
            if k == "size" {
                if size_arg.is_some() {
                    return fail("The image size must be specified only once".into());
                }
                size_in_o = true;
            }
            if let Err(msg) = set_option(&mut set, &specs, &k, &v) {
                return fail(msg);
            }
        }
    }
    let _ = size_in_o;
    if let Some(b) = &base {
        if !class.supports_backing() {
            return fail(format!(
                "Backing file not supported for file format '{fmt}'"
            ));
        }
        if let Err(msg) = set_option(&mut set, &specs, "backing_file", b) {
            return fail(msg);
        }
    }
    if let Some(bf) = &base_fmt {
        if let Err(msg) = set_option(&mut set, &specs, "backing_fmt", bf) {
            return fail(msg);
        }
    }
    let get = |set: &Vec<SetOpt>, k: &str| {
        set.iter()
            .find(|s| s.spec.name == k)
            .map(|s| s.value.clone())
    };
    let backing = get(&set, "backing_file");
    if let Some(b) = &backing {
        if b.is_empty() {
            return fail("Expected backing file name, got empty string".into());
        }
        if *b == filename {
            return fail(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            );
        }
        let bfmt = get(&set, "backing_fmt");
        let have_size = get(&set, "size").is_some();
        if !unsafe_backing || !have_size {
            match ctx
                .ev
                .block_on(probe_backing(&reg, &filename, b, bfmt.as_deref()))
            {
                Ok((detected, bsize)) => {
                    if bfmt.is_none() {
                        return fail(format!(
                            "Backing file specified without backing format\nDetected format of {detected}."
                        ));
                    }
                    if !have_size {
                        let _ = set_option(&mut set, &specs, "size", &bsize.to_string());
                    }
                }
                Err(e) if unsafe_backing => {
                    let _ = e;
                    return fail("Image creation needs a size parameter".into());
                }
                Err(e) => return fail(format!("{e}\nCould not open backing image.")),
            }
        } else if bfmt.is_none() {
            return fail("Backing file specified without backing format".into());
        }
    }
    if get(&set, "size").is_none() {
        // A detached LUKS header needs none; QEMU shows it as -1.
        let detached = get(&set, "detached-header").as_deref() == Some("on");
        match specs.iter().find(|s| s.name == "size") {
            Some(spec) if fmt == "luks" && detached => set.push(SetOpt {
                spec: *spec,
                typed: "-1".into(),
                value: "-1".into(),
            }),
            _ => return fail("Image creation needs a size parameter".into()),
        }
    }
    if !quiet {
        crate::outln!(
            "Formatting '{filename}', fmt={fmt} {}",
            print_opts(&specs, &set)
        );
        crate::stdout::flush();
    }
    if get(&set, "backing_fmt").is_some() && backing.is_none() {
        return fail("Backing format cannot be used without backing file".into());
    }
    // A detached LUKS header's -1 is only shown: the driver gets no size.
    set.retain(|s| !(s.spec.name == "size" && s.value == "-1"));
    let mut opts = opts_of(&set);
    // Sizes are rounded up to whole sectors, as QEMU does.
    if let Some(sz) = get(&set, "size").and_then(|s| s.parse::<u64>().ok()) {
        opts.insert("size".into(), (sz.div_ceil(512) * 512).into());
    }
    let octx = OpenCtx::new(Arc::clone(&reg), OpenFlags::default());
    match ctx.ev.block_on(class.create(&octx, &filename, opts)) {
        Ok(()) => 0,
        // Too big for the format's tables: qemu-img says so, and suggests
        // larger clusters where the format has them.
        Err(e) if e.code() == libc::EFBIG => {
            let hint = if specs.iter().any(|o| o.name == "cluster_size") {
                " (try using a larger cluster size)"
            } else {
                ""
            };
            fail(format!(
                "The image size is too large for file format '{fmt}'{hint}"
            ))
        }
        Err(e) => fail(e.to_string()),
    }
}

/// Opens the backing file as create sees it (relative to the new image,
/// shared, no I/O): its format and size.
async fn probe_backing(
    reg: &Arc<Registry>,
    image: &str,
    backing: &str,
    fmt: Option<&str>,
) -> Result<(String, u64), Error> {
    let flags = OpenFlags {
        read_only: true,
        force_share: true,
        no_io: true,
        no_backing: true,
        ..OpenFlags::default()
    };
    let path = strata_block::open::path_combine(image, backing);
    let ctx = OpenCtx::new(Arc::clone(reg), flags);
    let node = ctx.open_image(Some(&path), fmt, Opts::new()).await?;
    let r = (node.format_name().to_string(), node.length());
    let _ = node.close().await;
    Ok(r)
}
