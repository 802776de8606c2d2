//! Adaptive polling of an event loop (QEMU: aio_poll's `poll-max-ns`,
//! `poll-grow`, `poll-shrink`). After a client's request arrives, the loop
//! keeps looking at its sockets and ring for a short window instead of
//! sleeping: on a virtual machine, waking a halted vCPU costs about as much
//! as the gap between two requests of a queue-depth-1 client. The window
//! grows while requests keep arriving within the limit and collapses when
//! they stop, so an idle or lightly used loop does not spin.
//!
//! QEMU polls only handlers with a poll callback (virtqueues, its AIO
//! rings), never an NBD socket; Strata's servers note each request
//! ([`note_request`]) and the loop polls everything it waits on.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The window a loop starts growing from (QEMU's first step, 4 µs).
const FIRST_WINDOW_NS: u64 = 4_000;

/// How a loop polls: `max_ns` 0 turns polling off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollParams {
    /// Longest window, in nanoseconds.
    pub max_ns: u64,
    /// Factor the window grows by (0: QEMU's default, 2).
    pub grow: u64,
    /// Divisor the window shrinks by (0: straight back to nothing).
    pub shrink: u64,
}

impl Default for PollParams {
    /// 128 µs: a depth-1 NBD round trip here takes 40–60 µs, beyond QEMU's
    /// 32 µs, whose polling never had a socket to catch.
    fn default() -> Self {
        PollParams {
            max_ns: 128_000,
            grow: 0,
            shrink: 0,
        }
    }
}

struct State {
    params: PollParams,
    /// The current window.
    window_ns: u64,
    /// When the last request arrived.
    last: Option<Instant>,
}

/// One loop's poller: its requests' arrival times and the task that spins.
pub struct Poller {
    state: Mutex<State>,
    wake: Notify,
}

impl Poller {
    pub fn new(params: PollParams) -> Arc<Poller> {
        Arc::new(Poller {
            state: Mutex::new(State {
                params,
                window_ns: 0,
                last: None,
            }),
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain numbers: consistent whatever panicked while holding it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn params(&self) -> PollParams {
        self.lock().params
    }

    pub fn set_params(&self, params: PollParams) {
        let mut s = self.lock();
        s.params = params;
        s.window_ns = s.window_ns.min(params.max_ns);
    }

    /// The current window (for tests and statistics).
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.lock().window_ns)
    }

    /// A request arrived: the window adapts to the gap since the last one
    /// (QEMU: adjust_polling_time) and the loop polls for that long.
    pub fn request(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        if let Some(last) = s.last {
            let gap = now.duration_since(last).as_nanos() as u64;
            s.window_ns = adjust(s.window_ns, gap, s.params);
        }
        s.last = Some(now);
        let spin = s.window_ns > 0;
        drop(s);
        if spin {
            self.wake.notify_one();
        }
    }

    /// Until its loop stops: yields (which makes the loop look at its
    /// sockets and ring without sleeping) while inside the window after the
    /// last request, and sleeps otherwise.
    pub async fn run(self: Arc<Self>) {
        loop {
            let until = {
                let s = self.lock();
                s.last.map(|l| l + Duration::from_nanos(s.window_ns))
            };
            match until {
                Some(t) if Instant::now() < t => tokio::task::yield_now().await,
                _ => self.wake.notified().await,
            }
        }
    }
}

/// The next window after a gap of `gap` ns between requests: unchanged when
/// polling caught the request, grown when polling longer would have,
/// shrunk when the gap is beyond the limit.
fn adjust(window: u64, gap: u64, p: PollParams) -> u64 {
    if gap <= window {
        window
    } else if gap > p.max_ns {
        match p.shrink {
            0 => 0,
            d => window / d,
        }
    } else {
        let grown = match (window, p.grow) {
            (0, _) => FIRST_WINDOW_NS,
            (w, 0) => w.saturating_mul(2),
            (w, g) => w.saturating_mul(g),
        };
        grown.min(p.max_ns)
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Poller>>> = const { RefCell::new(None) };
}

/// Makes `p` the poller of the loop on this thread until the guard drops.
pub fn enter(p: &Arc<Poller>) -> PollerGuard {
    let prev = CURRENT.with(|c| c.borrow_mut().replace(Arc::clone(p)));
    PollerGuard { prev }
}

pub struct PollerGuard {
    prev: Option<Arc<Poller>>,
}

impl Drop for PollerGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = self.prev.take());
    }
}

/// A client's request arrived on this thread's loop (a no-op off a loop).
pub fn note_request() {
    CURRENT.with(|c| {
        if let Some(p) = &*c.borrow() {
            p.request();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PollParams = PollParams {
        max_ns: 100_000,
        grow: 0,
        shrink: 0,
    };

    #[test]
    fn window_grows_to_the_limit_while_requests_come_within_it() {
        let mut w = 0;
        let mut seen = vec![];
        for _ in 0..8 {
            w = adjust(w, 60_000, P);
            seen.push(w);
        }
        assert_eq!(
            seen,
            [4_000, 8_000, 16_000, 32_000, 64_000, 64_000, 64_000, 64_000]
        );
        assert_eq!(adjust(64_000, 90_000, P), 100_000);
    }

    #[test]
    fn window_collapses_when_requests_stop() {
        assert_eq!(adjust(64_000, 1_000_000, P), 0);
        let halve = PollParams { shrink: 2, ..P };
        assert_eq!(adjust(64_000, 1_000_000, halve), 32_000);
        let off = PollParams { max_ns: 0, ..P };
        assert_eq!(adjust(0, 10, off), 0);
    }

    #[test]
    fn a_custom_growth_factor_is_used() {
        let p = PollParams { grow: 4, ..P };
        assert_eq!(adjust(4_000, 50_000, p), 16_000);
    }
}
