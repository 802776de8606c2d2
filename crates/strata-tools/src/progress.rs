//! qemu-img's progress line (QEMU: util/qemu-progress.c): `    (xx.xx/100%)`
//! and a carriage return on stdout, printed when the value moved by more
//! than the minimum step, at 0 and at 100; a newline at the end.

/// The state of one progress report.
pub struct Progress {
    enabled: bool,
    current: f32,
    last_print: f32,
    min_skip: f32,
}

impl Progress {
    /// A report shown when `enabled`, printed only after steps of more
    /// than `min_skip` percent.
    pub fn new(enabled: bool, min_skip: f32) -> Progress {
        Progress {
            enabled,
            current: 0.0,
            last_print: 0.0,
            min_skip,
        }
    }

    /// Reports progress: with `max` 0, `delta` is the percentage done;
    /// otherwise `delta` percent of a part worth `max` percent was done.
    pub fn print(&mut self, delta: f32, max: i32) {
        let mut current = if max == 0 {
            delta
        } else {
            self.current + delta / 100.0 * max as f32
        };
        if current > 100.0 {
            current = 100.0;
        }
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 100.0
            || current == 0.0
        {
            self.last_print = current;
            if self.enabled {
                crate::out!("    ({:.2}/100%)\r", current as f64);
                crate::stdout::flush();
            }
        }
    }

    /// Ends the report: the newline after the last line.
    pub fn end(&self) {
        if self.enabled {
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
