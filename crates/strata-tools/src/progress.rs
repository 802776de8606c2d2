//! qemu-img's progress line (QEMU: util/qemu-progress.c): `    (xx.xx/100%)`
//! and a carriage return on stdout, printed when the value moved by more
//! than the minimum step, at 0 and at 100; a newline at the end. Or, for
//! pipelines (`--progress=json`, which qemu-img lacks), one JSON object a
//! line on stderr at the same moments: `{"done": BYTES, "total": BYTES}`.

/// The state of one progress report.
pub struct Progress {
    enabled: bool,
    /// JSON lines of bytes instead of the percentage line.
    json: bool,
    current: f32,
    last_print: f32,
    min_skip: f32,
    /// The last JSON line, so that the same one never goes out twice.
    last_json: Option<(u64, u64)>,
}

/// `done` of `total` in percent; nothing to do is all done.
fn percent(done: u64, total: u64) -> f32 {
    match total {
        0 => 100.0,
        _ => (100.0 * done as f64 / total as f64) as f32,
    }
}

/// Parses the value of `--progress=FORMAT`: true for `json`, false for
/// `human`; anything else is reported and gives the exit code.
pub fn parse_format(v: &str) -> Result<bool, i32> {
    match v {
        "json" => Ok(true),
        "human" => Ok(false),
        _ => {
            strata_block::report::error_report(format!(
                "Invalid progress format '{v}': expected 'human' or 'json'"
            ));
            Err(1)
        }
    }
}

impl Progress {
    /// A report shown when `enabled`, printed only after steps of more
    /// than `min_skip` percent.
    pub fn new(enabled: bool, min_skip: f32) -> Progress {
        Progress {
            enabled,
            json: false,
            current: 0.0,
            last_print: 0.0,
            min_skip,
            last_json: None,
        }
    }

    /// The report a subcommand's flags ask for: JSON lines when `json`,
    /// else the percentage line when `enabled` (`-p` without `-q`).
    pub fn for_flags(enabled: bool, json: bool, min_skip: f32) -> Progress {
        Progress {
            json,
            ..Progress::new(enabled || json, min_skip)
        }
    }

    /// Reports `done` of `total` bytes: the percentage line as qemu-img
    /// prints it, or in JSON mode the bytes themselves.
    pub fn report(&mut self, done: u64, total: u64) {
        match self.json {
            true => self.bytes(done, total),
            false => self.print(percent(done, total), 0),
        }
    }

    /// Reports `done` of `total` bytes in JSON mode only, for a subcommand
    /// whose percentage line counts otherwise (rebase's steps).
    pub fn bytes(&mut self, done: u64, total: u64) {
        if self.json && self.step(percent(done, total)) && self.last_json != Some((done, total)) {
            self.last_json = Some((done, total));
            strata_block::stderr_line!("{{\"done\": {done}, \"total\": {total}}}");
        }
    }

    /// Moves to `current` percent; true when that is worth a line.
    fn step(&mut self, current: f32) -> bool {
        let current = current.min(100.0);
        self.current = current;
        let due = current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 100.0
            || current == 0.0;
        if due {
            self.last_print = current;
        }
        due
    }

    /// Reports progress: with `max` 0, `delta` is the percentage done;
    /// otherwise `delta` percent of a part worth `max` percent was done.
    pub fn print(&mut self, delta: f32, max: i32) {
        if self.json {
            // Only byte counts go out as JSON.
            return;
        }
        let current = if max == 0 {
            delta
        } else {
            self.current + delta / 100.0 * max as f32
        };
        if self.step(current) && self.enabled {
            crate::out!("    ({:.2}/100%)\r", current as f64);
            crate::stdout::flush();
        }
    }

    /// True for JSON lines of bytes.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Ends the report: the newline after the last line.
    pub fn end(&self) {
        if self.enabled && !self.json {
            crate::outln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_as_qemu_counts_them() {
        let mut p = Progress::new(false, 1.0);
        p.print(0.0, 100);
        assert_eq!(p.last_print, 0.0);
        p.print(0.5, 0);
        assert_eq!(p.last_print, 0.0);
        p.print(1.5, 0);
        assert_eq!(p.last_print, 1.5);
        p.print(150.0, 0);
        assert_eq!(p.current, 100.0);
    }
}
