//! qemu-io's command table and the dispatch every command line goes
//! through (QEMU: qemuio_command): split on spaces, look up the name or its
//! alias, check that an image is open and the argument count, take the
//! write permission the command needs, run it.
//!
//! Commands return 0 or a negative errno, as in QEMU; any negative result
//! makes qemu-io exit with 1.

mod aio;
mod alloc;
mod debug;
mod discard;
mod help;
mod image;
mod read;
mod request;
mod session;
mod write;

use super::session::Session;
use crate::getopt::{self, Item, Parsed};
use crate::{out, outln};
use std::sync::Arc;
use strata_block::report::error_report;
use strata_block::{Backend, Node};

/// What a command needs from the image before it runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// Runs without an image (help, quit).
    Nothing,
    /// Runs with or without an image (open, sleep, sigraise, abort).
    Optional,
    /// An open image.
    Image,
    /// An open image that may be written (write, discard, truncate...).
    Writable,
}

/// Which function runs a command.
#[derive(Clone, Copy)]
enum Run {
    Abort,
    AioFlush,
    AioRead,
    AioWrite,
    Alloc,
    Break,
    Close,
    Discard,
    Flush,
    Help,
    Info,
    Length,
    Map,
    Open,
    Quit,
    Read,
    Readv,
    RemoveBreak,
    Reopen,
    Resume,
    Sigraise,
    Sleep,
    Truncate,
    WaitBreak,
    Write,
    Writev,
    Zone(&'static str),
    ZoneAppend,
}

/// One command of the table (QEMU: cmdinfo_t).
pub struct Command {
    name: &'static str,
    alt: Option<&'static str>,
    args: Option<&'static str>,
    oneline: &'static str,
    help: Option<&'static str>,
    argmin: i32,
    /// -1: no maximum.
    argmax: i32,
    needs: Needs,
    run: Run,
}

const fn cmd(name: &'static str, run: Run, oneline: &'static str) -> Command {
    Command {
        name,
        alt: None,
        args: None,
        oneline,
        help: None,
        argmin: 0,
        argmax: 0,
        needs: Needs::Image,
        run,
    }
}

impl Command {
    const fn alt(mut self, a: &'static str) -> Self {
        self.alt = Some(a);
        self
    }
    const fn args(mut self, a: &'static str, min: i32, max: i32) -> Self {
        self.args = Some(a);
        self.argmin = min;
        self.argmax = max;
        self
    }
    const fn count(mut self, min: i32, max: i32) -> Self {
        self.argmin = min;
        self.argmax = max;
        self
    }
    const fn needs(mut self, n: Needs) -> Self {
        self.needs = n;
        self
    }
    const fn help(mut self, h: &'static str) -> Self {
        self.help = Some(h);
        self
    }

    /// `name args -- oneline`, the usage line a command prints when its
    /// options or operands are wrong.
    pub fn usage(&self) {
        outln!(
            "{} {} -- {}",
            self.name,
            self.args.unwrap_or(""),
            self.oneline
        );
    }

    /// The line `help` prints: like the usage line, but without an args
    /// part for commands that take none.
    fn help_line(&self, name: &str) {
        match self.args {
            Some(a) => out!("{name} {a} "),
            None => out!("{name} "),
        }
        outln!("-- {}", self.oneline);
    }
}

/// Every command, sorted by name as QEMU sorts its table.
static COMMANDS: &[Command] = &[
    cmd(
        "abort",
        Run::Abort,
        "simulate a program crash using abort(3)",
    )
    .needs(Needs::Optional),
    cmd(
        "aio_flush",
        Run::AioFlush,
        "completes all outstanding aio requests",
    ),
    cmd(
        "aio_read",
        Run::AioRead,
        "asynchronously reads a number of bytes",
    )
    .args("[-Ciqrv] [-P pattern] off len [len..]", 2, -1)
    .help(help::AIO_READ),
    cmd(
        "aio_write",
        Run::AioWrite,
        "asynchronously writes a number of bytes",
    )
    .args("[-Cfiqruz] [-P pattern] off len [len..]", 2, -1)
    .needs(Needs::Writable)
    .help(help::AIO_WRITE),
    cmd(
        "alloc",
        Run::Alloc,
        "checks if offset is allocated in the file",
    )
    .alt("a")
    .args("offset [count]", 1, 2),
    cmd(
        "break",
        Run::Break,
        "sets a breakpoint on event and tags the stopped request as tag",
    )
    .args("event tag", 2, 2),
    cmd("close", Run::Close, "close the current open file").alt("c"),
    cmd(
        "discard",
        Run::Discard,
        "discards a number of bytes at a specified offset",
    )
    .alt("d")
    .args("[-Cq] off len", 2, -1)
    .needs(Needs::Writable)
    .help(help::DISCARD),
    cmd("flush", Run::Flush, "flush all in-core file state to disk").alt("f"),
    cmd("help", Run::Help, "help for one or all commands")
        .alt("?")
        .args("[command]", 0, 1)
        .needs(Needs::Nothing),
    cmd(
        "info",
        Run::Info,
        "prints information about the current file",
    )
    .alt("i"),
    cmd("length", Run::Length, "gets the length of the current file").alt("l"),
    cmd("map", Run::Map, "prints the allocated areas of a file").args("", 0, 0),
    cmd("open", Run::Open, "open the file specified by path")
        .alt("o")
        .args(
            "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
            1,
            -1,
        )
        .needs(Needs::Optional)
        .help(help::OPEN),
    cmd("quit", Run::Quit, "exit the program")
        .alt("q")
        .count(-1, -1)
        .needs(Needs::Nothing),
    cmd(
        "read",
        Run::Read,
        "reads a number of bytes at a specified offset",
    )
    .alt("r")
    .args("[-abCqrv] [-P pattern [-s off] [-l len]] off len", 2, -1)
    .help(help::READ),
    cmd(
        "readv",
        Run::Readv,
        "reads a number of bytes at a specified offset",
    )
    .args("[-Cqrv] [-P pattern] off len [len..]", 2, -1)
    .help(help::READV),
    cmd(
        "remove_break",
        Run::RemoveBreak,
        "remove a breakpoint by tag",
    )
    .args("tag", 1, 1),
    cmd("reopen", Run::Reopen, "reopens an image with new options")
        .args("[(-r|-w)] [-c cache] [-o options]", 0, -1)
        .help(help::REOPEN),
    cmd("resume", Run::Resume, "resumes the request tagged as tag").args("tag", 1, 1),
    cmd("sigraise", Run::Sigraise, "raises a signal")
        .args("signal", 1, 1)
        .needs(Needs::Optional)
        .help(help::SIGRAISE),
    cmd(
        "sleep",
        Run::Sleep,
        "waits for the given value in milliseconds",
    )
    .count(1, 1)
    .needs(Needs::Optional),
    cmd(
        "truncate",
        Run::Truncate,
        "truncates the current file at the given offset",
    )
    .alt("t")
    .args("[-m prealloc_mode] off", 1, 3)
    .needs(Needs::Writable),
    cmd(
        "wait_break",
        Run::WaitBreak,
        "waits for the suspension of a request",
    )
    .args("tag", 1, 1),
    cmd(
        "write",
        Run::Write,
        "writes a number of bytes at a specified offset",
    )
    .alt("w")
    .args("[-bcCfnqruz] [-P pattern | -s source_file] off len", 2, -1)
    .needs(Needs::Writable)
    .help(help::WRITE),
    cmd(
        "writev",
        Run::Writev,
        "writes a number of bytes at a specified offset",
    )
    .args("[-Cfqr] [-P pattern] off len [len..]", 2, -1)
    .needs(Needs::Writable)
    .help(help::WRITEV),
    cmd(
        "zone_append",
        Run::ZoneAppend,
        "append write a number of bytes at a specified offset",
    )
    .alt("zap")
    .args("offset len [len..]", 3, 4),
    cmd(
        "zone_close",
        Run::Zone("close"),
        "close a range of zones in zone block device",
    )
    .alt("zc")
    .args("offset len", 2, 2),
    cmd(
        "zone_finish",
        Run::Zone("finish"),
        "finish a range of zones in zone block device",
    )
    .alt("zf")
    .args("offset len", 2, 2),
    cmd(
        "zone_open",
        Run::Zone("open"),
        "explicit open a range of zones in zone block device",
    )
    .alt("zo")
    .args("offset len", 2, 2),
    cmd(
        "zone_report",
        Run::Zone("report"),
        "report zone information",
    )
    .alt("zrp")
    .args("offset number", 2, 2),
    cmd(
        "zone_reset",
        Run::Zone("reset"),
        "reset a zone write pointer in zone block device",
    )
    .alt("zrs")
    .args("offset len", 2, 2),
];

/// The command called `name` (or aliased so).
fn find(name: &str) -> Option<&'static Command> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.alt == Some(name))
}

/// What a command function gets: the session and its arguments (argv[0]
/// is the command name as typed).
pub struct Ctx<'a> {
    session: &'a mut Session,
    argv: &'a [String],
    cmd: &'static Command,
}

impl Ctx<'_> {
    /// Parses the options of the command with getopt; the error items carry
    /// glibc's message, which [`Ctx::bad_option`] prints.
    fn getopt(&self, short: &str) -> Parsed {
        getopt::parse(&self.argv[0], &self.argv[1..], short, &[])
    }

    /// glibc's complaint for an unknown option, then the usage line.
    fn bad_option(&self, item: &Item) -> i32 {
        if let Item::Bad(msg) = item {
            strata_block::stderr_line!("{msg}");
        }
        self.cmd.usage();
        -libc::EINVAL
    }

    /// The open image; the table makes sure there is one for the commands
    /// that ask, so the error is only a safety net.
    fn node(&self) -> Result<Arc<Node>, i32> {
        self.session.node.clone().ok_or_else(|| {
            strata_block::stderr_line!("no file open, try 'help open'");
            -libc::EINVAL
        })
    }

    /// The user handle of the open image, for the commands that do I/O.
    fn blk(&self) -> Result<Arc<Backend>, i32> {
        self.session.blk.clone().ok_or_else(|| {
            strata_block::stderr_line!("no file open, try 'help open'");
            -libc::EINVAL
        })
    }

    /// The usage line, for a wrong number of operands.
    fn usage(&self) -> i32 {
        self.cmd.usage();
        -libc::EINVAL
    }

    /// The operands of the vectored commands (`readv`, `writev`, `aio_*`):
    /// an offset and one or more lengths; their offset and total length,
    /// or the code to return after saying what is wrong.
    fn vector_request(&self, operands: &[String]) -> Result<(i64, i64), i32> {
        let Some((off_arg, lens)) = operands.split_first() else {
            return Err(self.usage());
        };
        if lens.is_empty() {
            return Err(self.usage());
        }
        let offset = crate::io::numbers::cvtnum_or_report(off_arg)?;
        let count = request::total_length(lens).ok_or(-libc::EINVAL)?;
        Ok((offset, count))
    }
}

/// Runs one command line (QEMU: qemuio_command); 0 or a negative errno.
pub async fn run_line(session: &mut Session, line: &str) -> i32 {
    // Split on single spaces only: tabs stay inside arguments (iotest 003).
    let argv: Vec<String> = line
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    let Some(name) = argv.first() else { return 0 };
    let Some(cmd) = find(name) else {
        strata_block::stderr_line!("command \"{name}\" not found");
        return -libc::EINVAL;
    };
    let have_image = session.node.is_some();
    if matches!(cmd.needs, Needs::Image | Needs::Writable) && !have_image {
        strata_block::stderr_line!("no file open, try 'help open'");
        return -libc::EINVAL;
    }
    let n = argv.len() as i32 - 1;
    if n < cmd.argmin || (cmd.argmax != -1 && n > cmd.argmax) {
        if cmd.argmax == -1 {
            strata_block::stderr_line!(
                "bad argument count {n} to {name}, expected at least {} arguments",
                cmd.argmin
            );
        } else if cmd.argmin == cmd.argmax {
            strata_block::stderr_line!(
                "bad argument count {n} to {name}, expected {} arguments",
                cmd.argmin
            );
        } else {
            strata_block::stderr_line!(
                "bad argument count {n} to {name}, expected between {} and {} arguments",
                cmd.argmin,
                cmd.argmax
            );
        }
        return -libc::EINVAL;
    }
    if cmd.needs == Needs::Writable && session.node.as_ref().is_some_and(|n| n.is_read_only()) {
        error_report("Block node is read-only");
        return -libc::EPERM;
    }
    let mut ctx = Ctx {
        session,
        argv: &argv,
        cmd,
    };
    dispatch(&mut ctx).await
}

async fn dispatch(ctx: &mut Ctx<'_>) -> i32 {
    match ctx.cmd.run {
        Run::Abort => debug::abort(),
        Run::AioFlush => {
            ctx.session.drain().await;
            0
        }
        Run::AioRead => aio::aio_read(ctx).await,
        Run::AioWrite => aio::aio_write(ctx).await,
        Run::Alloc => alloc::alloc(ctx).await,
        Run::Break => debug::set_break(ctx),
        Run::Close => session::close(ctx).await,
        Run::Discard => discard::discard(ctx).await,
        Run::Flush => image::flush(ctx).await,
        Run::Help => help::help(ctx),
        Run::Info => image::info(ctx),
        Run::Length => image::length(ctx),
        Run::Map => alloc::map(ctx).await,
        Run::Open => session::open(ctx).await,
        Run::Quit => session::quit(ctx),
        Run::Read => read::read(ctx).await,
        Run::Readv => read::readv(ctx).await,
        Run::RemoveBreak => debug::remove_break(ctx),
        Run::Reopen => session::reopen(ctx).await,
        Run::Resume => debug::resume(ctx),
        Run::Sigraise => debug::sigraise(ctx),
        Run::Sleep => debug::sleep(ctx).await,
        Run::Truncate => image::truncate(ctx).await,
        Run::WaitBreak => debug::wait_break(ctx).await,
        Run::Write => write::write(ctx).await,
        Run::Writev => write::writev(ctx).await,
        Run::Zone(op) => debug::zone(ctx, op),
        Run::ZoneAppend => debug::zone_append(ctx),
    }
}
