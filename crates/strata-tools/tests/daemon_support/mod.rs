//! What the daemon tests share: strata-daemon and qemu-storage-daemon
//! side by side under the same name, a QMP client, and conversations whose
//! answers must be the same bytes (paths, package and event times aside).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const QSD: &str = "/usr/bin/qemu-storage-daemon";

/// The oracle, or None (test skipped) where it is missing; under CI a
/// missing oracle is a failure.
pub fn qsd() -> Option<PathBuf> {
    if Path::new(QSD).exists() {
        return Some(PathBuf::from(QSD));
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{QSD} is required under CI"
    );
    eprintln!("skipped: qemu-storage-daemon not found");
    None
}

/// strata-daemon linked as `qemu-storage-daemon` in `dir/bin`.
pub fn strata(dir: &Path) -> PathBuf {
    let link = dir.join("bin/qemu-storage-daemon");
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_strata-daemon"), &link).unwrap();
    link
}

/// A scratch folder per implementation, so paths differ only by it.
pub struct Side {
    pub prog: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Side {
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    /// Replaces this side's folder by `$DIR` and the version's package by `PKG`.
    pub fn normalize(&self, s: &str) -> String {
        let mut s = s.replace(&self.dir.path().display().to_string(), "$DIR");
        // An event's time is its own.
        if let Some(i) = s.find("\"timestamp\": {") {
            if let Some(j) = s[i..].find('}') {
                s.replace_range(i..i + j + 1, "\"timestamp\": T");
            }
        }
        for pkg in ["Strata 0.1.0", "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"] {
            s = s.replace(pkg, "PKG");
        }
        // So are a snapshot's times, and the numbers of unnamed nodes.
        for key in [
            "\"date-sec\": ",
            "\"date-nsec\": ",
            "\"vm-clock-sec\": ",
            "\"vm-clock-nsec\": ",
            "\"actual-size\": ",
            "#block",
        ] {
            s = without_digits_after(&s, key);
        }
        s
    }
    pub fn qemu_img(&self, args: &[&str]) -> (String, i32) {
        let out = Command::new("qemu-img")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (self.normalize(&text), out.status.code().unwrap_or(-1))
    }
}

/// `s` with the digits that follow each `key` taken out.
fn without_digits_after(s: &str, key: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(key) {
        out.push_str(&rest[..i + key.len()]);
        rest = rest[i + key.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// The two sides, or None when the oracle is missing.
pub fn sides() -> Option<(Side, Side)> {
    let q = qsd()?;
    let s = tempfile::tempdir().unwrap();
    let prog = strata(s.path());
    let qd = tempfile::tempdir().unwrap();
    let qlink = qd.path().join("bin/qemu-storage-daemon");
    std::fs::create_dir_all(qlink.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(q, &qlink).unwrap();
    Some((
        Side { prog, dir: s },
        Side {
            prog: qlink,
            dir: qd,
        },
    ))
}

/// A running daemon with a QMP socket `qmp.sock` in its folder.
pub struct Running {
    pub child: Child,
}

impl Running {
    pub fn start(side: &Side, extra: &[String]) -> (Running, Client) {
        let sock = side.path("qmp.sock");
        let mut args = vec![
            "--chardev".to_string(),
            format!("socket,path={sock},server=on,wait=off,id=qmp0"),
            "--monitor".into(),
            "qmp0".into(),
        ];
        args.extend(extra.iter().cloned());
        let child = Command::new(&side.prog)
            .args(&args)
            .current_dir(side.dir.path())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (Running { child }, Client::connect(&sock))
    }

    /// Waits for the daemon to end; its exit code and stderr.
    pub fn wait(mut self) -> (i32, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err)
                    .unwrap();
                return (st.code().unwrap_or(-1), err);
            }
            assert!(Instant::now() < deadline, "daemon did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory arguments.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP client over a UNIX socket.
pub struct Client {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
}

impl Client {
    pub fn connect(sock: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no socket {sock}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            rd: BufReader::new(s.try_clone().unwrap()),
            wr: s,
        }
    }

    /// One line as sent, CR LF included.
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.rd.read_line(&mut l).expect("no answer");
        l
    }

    pub fn send(&mut self, s: &str) {
        self.wr.write_all(s.as_bytes()).unwrap();
    }

    /// True if an answer has arrived and is not read yet (never waits).
    pub fn pending(&mut self) -> bool {
        if !self.rd.buffer().is_empty() {
            return true;
        }
        let mut b = 0u8;
        // SAFETY: one byte into `b`, which outlives the call.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.wr),
                (&mut b as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n > 0
    }

    pub fn ask(&mut self, s: &str) -> String {
        self.send(s);
        self.line()
    }
}

/// A step of a conversation: what to send and how many lines come back.
pub type Step<'a> = (&'a str, usize);

/// Runs a conversation on a fresh daemon of `side` started with `extra`:
/// the greeting and every line received, normalized; then `quit`'s answer,
/// the exit code and stderr.
pub fn converse(side: &Side, extra: &[String], steps: &[Step]) -> Vec<String> {
    let (d, mut c) = Running::start(side, extra);
    let greeting = c.line();
    let mut out = vec![side.normalize(&greeting)];
    // qemu-storage-daemon, on a loaded machine, has once greeted a client
    // twice (its monitor's handlers are set up in another thread than the
    // one that accepts); Strata must not, so only the oracle is forgiven.
    let oracle = std::fs::read_link(&side.prog).is_ok_and(|p| p == Path::new(QSD));
    let mut first = true;
    for (send, n) in steps {
        let send = send.replace("$DIR", &side.dir.path().display().to_string());
        c.send(&send);
        for _ in 0..*n {
            let mut line = c.line();
            if std::mem::take(&mut first) && oracle && line == greeting {
                line = c.line();
            }
            out.push(side.normalize(&line));
        }
    }
    out.push(c.ask(r#"{"execute": "quit"}"#));
    let (code, err) = d.wait();
    out.push(format!("exit {code}"));
    out.push(side.normalize(&err));
    out
}

pub fn same(steps: &[Step], extra: &[&str], setup: impl Fn(&Side)) -> Option<(Side, Side)> {
    let (s, q) = sides()?;
    setup(&s);
    setup(&q);
    let fix = |side: &Side| -> Vec<String> {
        extra
            .iter()
            .map(|a| a.replace("$DIR", &side.dir.path().display().to_string()))
            .collect()
    };
    let got = converse(&s, &fix(&s), steps);
    let want = converse(&q, &fix(&q), steps);
    assert_same_lines(&got, &want);
    Some((s, q))
}

/// Strata's lines against the oracle's, the first difference named by its
/// line, then the counts.
pub fn assert_same_lines(got: &[String], want: &[String]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g == w {
            continue;
        }
        // Long answers are shown around where they part.
        let at = g.bytes().zip(w.bytes()).take_while(|(a, b)| a == b).count();
        let around = |t: &str| {
            let from = t.floor_char_boundary(at.saturating_sub(150));
            let to = t.floor_char_boundary((at + 150).min(t.len()));
            t[from..to].to_string()
        };
        let shown: Vec<String> = got.iter().map(|l| l.chars().take(300).collect()).collect();
        panic!(
            "line {i} differs at byte {at}\n strata: ...{}...\n   qemu: ...{}...\n{}",
            around(g),
            around(w),
            shown.join("\n")
        );
    }
    assert_eq!(got.len(), want.len());
}
