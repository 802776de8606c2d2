//! Commands that open, close and reopen the image, and `quit`.

use super::Ctx;
use crate::getopt::Item;
use crate::io::session::OpenRequest;
use crate::outln;
use strata_block::options::{nest, parse_keyval, Opts};
use strata_block::report::error_report;

/// Collects `-o` option strings; later keys win, as QEMU merges them.
#[derive(Default)]
struct OptList(Vec<(String, String)>);

impl OptList {
    /// Adds the pairs of one `key=value,...` string.
    fn add(&mut self, s: &str) -> Result<(), ()> {
        match parse_keyval(s, None) {
            Ok(pairs) => {
                for (k, v) in pairs {
                    self.0.retain(|(key, _)| *key != k);
                    self.0.push((k, v));
                }
                Ok(())
            }
            Err(e) => {
                error_report(&e);
                Err(())
            }
        }
    }

    /// The nested dictionary of everything added.
    fn build(&self) -> Result<Opts, ()> {
        nest(&self.0).map_err(|e| error_report(&e))
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }
}

/// `open [-rsCnkU] [-t cache] [-d discard] [-o options] [path]`.
pub async fn open(ctx: &mut Ctx<'_>) -> i32 {
    let parsed = ctx.getopt("snCro:ki:t:d:U");
    let mut req = OpenRequest::default();
    let mut opts = OptList::default();
    for item in &parsed.items {
        match item {
            Item::Opt('s', _) => req.snapshot = true,
            Item::Opt('n', _) => req.set_nocache(),
            Item::Opt('C', _) => req.copy_on_read = true,
            Item::Opt('r', _) => req.read_only = true,
            Item::Opt('k', _) => req.native_aio = true,
            Item::Opt('t', Some(m)) => {
                if !req.set_cache(m) {
                    error_report(format!("Invalid cache option: {m}"));
                    return -libc::EINVAL;
                }
            }
            Item::Opt('d', Some(m)) => {
                if !req.set_discard(m) {
                    error_report(format!("Invalid discard option: {m}"));
                    return -libc::EINVAL;
                }
            }
            Item::Opt('i', Some(m)) => {
                if !req.set_aio(m) {
                    error_report(format!("Invalid aio option: {m}"));
                    return -libc::EINVAL;
                }
            }
            Item::Opt('o', Some(o)) => {
                if ctx.session.image_opts {
                    outln!("--image-opts and 'open -o' are mutually exclusive");
                    return -libc::EINVAL;
                }
                if opts.add(o).is_err() {
                    return -libc::EINVAL;
                }
            }
            Item::Opt('U', _) => req.force_share = true,
            Item::Opt(_, _) => {}
            Item::Bad(_) => return ctx.bad_option(item),
        }
    }
    let mut operands = parsed.operands.as_slice();
    if ctx.session.image_opts && operands.len() == 1 {
        if opts.add(&operands[0]).is_err() {
            return -libc::EINVAL;
        }
        operands = &[];
    }
    req.opts = match opts.build() {
        Ok(o) => o,
        Err(()) => return -libc::EINVAL,
    };
    req.name = match operands {
        [name] => Some(name.clone()),
        [] => None,
        _ => return ctx.usage(),
    };
    match ctx.session.open(req).await {
        Ok(()) => 0,
        Err(()) => -libc::EINVAL,
    }
}

/// `close`.
pub async fn close(ctx: &mut Ctx<'_>) -> i32 {
    ctx.session.close().await;
    0
}

/// `quit`.
pub fn quit(ctx: &mut Ctx<'_>) -> i32 {
    ctx.session.quit = true;
    0
}

/// `reopen [(-r|-w)] [-c cache] [-o options]`: the same image with other
/// flags. The node is closed and opened again (the core has no in-place
/// reopen); if the new open fails, the old flags are restored.
pub async fn reopen(ctx: &mut Ctx<'_>) -> i32 {
    let parsed = ctx.getopt("c:o:rw");
    let Some(old) = ctx.session.opened.clone() else {
        strata_block::stderr_line!("no file open, try 'help open'");
        return -libc::EINVAL;
    };
    let mut req = old.clone();
    let mut opts = OptList::default();
    let (mut rw_given, mut cache_given) = (false, false);
    for item in &parsed.items {
        match item {
            Item::Opt('c', Some(m)) => {
                if !req.set_cache(m) {
                    error_report(format!("Invalid cache option: {m}"));
                    return -libc::EINVAL;
                }
                cache_given = true;
            }
            Item::Opt('o', Some(o)) => {
                if opts.add(o).is_err() {
                    return -libc::EINVAL;
                }
            }
            Item::Opt(c @ ('r' | 'w'), _) => {
                if rw_given {
                    error_report("Only one -r/-w option may be given");
                    return -libc::EINVAL;
                }
                req.read_only = *c == 'r';
                rw_given = true;
            }
            Item::Opt(_, _) => {}
            Item::Bad(_) => return ctx.bad_option(item),
        }
    }
    if !parsed.operands.is_empty() {
        return ctx.usage();
    }
    if opts.has("read-only") && rw_given {
        error_report("Cannot set both -r/-w and 'read-only'");
        return -libc::EINVAL;
    }
    if (opts.has("cache.direct") || opts.has("cache.no-flush")) && cache_given {
        error_report("Cannot set both -c and the cache options");
        return -libc::EINVAL;
    }
    let new_opts = match opts.build() {
        Ok(o) => o,
        Err(()) => return -libc::EINVAL,
    };
    // New options win key by key; old ones they do not name stay.
    merge_options(&mut req.opts, &new_opts);
    match ctx.session.reopen(req, &new_opts).await {
        Ok(()) => 0,
        Err(msg) => {
            error_report(msg);
            -libc::EINVAL
        }
    }
}

/// Merges `new` into `old` recursively (QEMU keeps old options per flat key).
fn merge_options(old: &mut strata_block::Opts, new: &strata_block::Opts) {
    for (k, v) in new {
        match (old.get_mut(k), v) {
            (Some(serde_json::Value::Object(o)), serde_json::Value::Object(n)) => {
                merge_options(o, n)
            }
            _ => {
                old.insert(k.clone(), v.clone());
            }
        }
    }
}
