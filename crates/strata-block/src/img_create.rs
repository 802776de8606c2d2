//! Creating an image for a command of the running block layer (QEMU:
//! bdrv_img_create as drive-mirror and blockdev-snapshot-sync call it):
//! the format's and protocol's options, the backing file checked, the
//! `Formatting ...` line on standard output, then the driver's create.

use crate::create_opts::{merged_options, opts_of, print_opts, set_option, SetOpt};
use crate::error::{Error, Result};
use crate::open::{path_combine, OpenCtx, OpenFlags, Registry};
use crate::options::Opts;
use std::io::Write;
use std::sync::Arc;

/// What to create.
pub struct ImgCreate<'a> {
    pub filename: &'a str,
    pub format: &'a str,
    /// The backing file name to store, and its format.
    pub backing: Option<&'a str>,
    pub backing_format: Option<&'a str>,
    pub size: u64,
    /// Do not open the backing file to check it (BDRV_O_NO_BACKING).
    pub no_backing: bool,
    /// No `Formatting` line.
    pub quiet: bool,
}

/// QEMU: bdrv_img_create, with the size always given.
pub async fn img_create(reg: &Arc<Registry>, c: ImgCreate<'_>) -> Result<()> {
    let fmt = c.format;
    let Some(class) = reg.get(fmt) else {
        return Err(Error::invalid(format!("Unknown file format '{fmt}'")));
    };
    let proto = reg.get("file");
    let specs = merged_options(&*class, proto.as_deref());
    let mut set: Vec<SetOpt> = Vec::new();
    set_option(&mut set, &specs, "size", &c.size.to_string()).map_err(Error::invalid)?;
    if let Some(b) = c.backing {
        set_option(&mut set, &specs, "backing_file", b).map_err(|_| {
            Error::invalid(format!(
                "Backing file not supported for file format '{fmt}'"
            ))
        })?;
        if b == c.filename {
            return Err(Error::invalid(
                "Error: Trying to create an image with the same filename as the backing file",
            ));
        }
        if b.is_empty() {
            return Err(Error::invalid(
                "Expected backing file name, got empty string",
            ));
        }
    }
    if let Some(bf) = c.backing_format {
        set_option(&mut set, &specs, "backing_fmt", bf).map_err(|_| {
            Error::invalid(format!(
                "Backing file format not supported for file format '{fmt}'"
            ))
        })?;
    }
    if let Some(b) = c.backing {
        if !c.no_backing {
            // Opened without I/O, so an encrypted one needs no secret.
            let flags = OpenFlags {
                read_only: true,
                force_share: true,
                no_io: true,
                no_backing: true,
                ..OpenFlags::default()
            };
            let octx = OpenCtx::new(Arc::clone(reg), flags);
            let path = path_combine(c.filename, b);
            let node = octx
                .open_image(Some(&path), c.backing_format, Opts::new())
                .await
                .map_err(|e| Error::invalid(format!("{e}\nCould not open backing image.")))?;
            let detected = node.format_name().to_string();
            let _ = node.close().await;
            if c.backing_format.is_none() {
                return Err(Error::invalid(format!(
                    "Backing file specified without backing format\nDetected format of {detected}."
                )));
            }
        } else if c.backing_format.is_none() {
            return Err(Error::invalid(
                "Backing file specified without backing format",
            ));
        }
    }
    if !c.quiet {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "Formatting '{}', fmt={fmt} {}",
            c.filename,
            print_opts(&specs, &set)
        );
        let _ = out.flush();
    }
    let mut opts = opts_of(&set);
    opts.insert("size".into(), (c.size.div_ceil(512) * 512).into());
    let octx = OpenCtx::new(Arc::clone(reg), OpenFlags::default());
    match class.create(&octx, c.filename, opts).await {
        Err(e) if e.code() == libc::EFBIG => {
            let hint = if specs.iter().any(|o| o.name == "cluster_size") {
                " (try using a larger cluster size)"
            } else {
                ""
            };
            Err(Error::invalid(format!(
                "The image size is too large for file format '{fmt}'{hint}"
            )))
        }
        r => r,
    }
}
