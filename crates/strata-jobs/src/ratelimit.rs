//! A job's speed limit (QEMU: ratelimit.h): time is cut in slices of
//! [`SLICE`]; each slice may carry `speed × slice` bytes, and a job that
//! went past its quota waits until the slices it used up have passed.

use std::time::{Duration, Instant};

/// A block job's time slice (QEMU: BLOCK_JOB_SLICE_TIME, 100 ms).
pub const SLICE: Duration = Duration::from_millis(100);

/// The accounting of one job's speed limit.
#[derive(Debug)]
pub struct RateLimit {
    slice_start: Instant,
    slice_end: Instant,
    /// Bytes one slice may carry; 0 means no limit.
    slice_quota: u64,
    dispatched: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        let now = Instant::now();
        RateLimit {
            slice_start: now,
            slice_end: now,
            slice_quota: 0,
            dispatched: 0,
        }
    }
}

impl RateLimit {
    /// Sets the limit to `speed` bytes a second (0: none).
    pub fn set_speed(&mut self, speed: u64) {
        self.slice_quota = if speed == 0 {
            0
        } else {
            ((speed as f64 * SLICE.as_nanos() as f64 / 1e9) as u64).max(1)
        };
    }

    /// Counts `n` bytes done at `now` and says how long to wait before the
    /// next piece (QEMU: ratelimit_calculate_delay).
    pub fn delay(&mut self, n: u64, now: Instant) -> Duration {
        if self.slice_quota == 0 {
            return Duration::ZERO;
        }
        if self.slice_end < now {
            // The last (perhaps stretched) slice is over: a new one begins.
            self.slice_start = now;
            self.slice_end = now + SLICE;
            self.dispatched = 0;
        }
        self.dispatched += n;
        if self.dispatched < self.slice_quota {
            return Duration::ZERO;
        }
        // Over the quota: wait out the slices it used, then start afresh.
        let slices = self.dispatched as f64 / self.slice_quota as f64;
        self.slice_end = self.slice_start + SLICE.mul_f64(slices);
        self.slice_end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_never_waits() {
        let mut r = RateLimit::default();
        assert_eq!(r.delay(1 << 30, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn a_slice_past_its_quota_waits_for_what_it_used() {
        let mut r = RateLimit::default();
        r.set_speed(1 << 20); // 1 MiB/s: about 104857 bytes a slice
        let t0 = Instant::now();
        assert_eq!(r.delay(0, t0), Duration::ZERO);
        assert_eq!(r.delay(50_000, t0), Duration::ZERO);
        // Three slices' worth in all: the wait reaches the third's end.
        let d = r.delay(3 * 104_857 - 50_000, t0);
        assert!(
            d > Duration::from_millis(290) && d <= Duration::from_millis(300),
            "{d:?}"
        );
        // The next call within that time only waits for the rest.
        let d2 = r.delay(0, t0 + Duration::from_millis(100));
        assert!(d2 > Duration::from_millis(190) && d2 <= Duration::from_millis(200));
    }

    #[test]
    fn a_tiny_speed_still_allows_a_byte_a_slice() {
        let mut r = RateLimit::default();
        r.set_speed(1);
        let t0 = Instant::now();
        r.delay(0, t0);
        let d = r.delay(65536, t0);
        assert!(d >= SLICE * 65000, "{d:?}");
    }
}
