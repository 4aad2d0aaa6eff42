//! Polling-only mode, the way Neon's autoscaler decides: the guest samples
//! often (every 100 ms there), the samples are averaged over a short window
//! (500 ms), and the scaling loop looks at that average only once per loop
//! interval (5 s); pressure events are ignored. It exists to measure what the
//! event-driven design buys (`cargo xtask bench e2e`), not for production.
//!
//! Pure: the VM loop passes the clock in (ms since it started) and feeds the
//! core the averages this returns.

use crate::core::policy::Usage;
use std::collections::VecDeque;

pub use vmscale_contract::policy::Polling;

/// Collects samples between ticks and averages the last window at each tick.
#[derive(Debug, Clone)]
pub struct Poller {
    cfg: Polling,
    samples: VecDeque<(u64, Usage)>,
    next_tick_ms: u64,
}

/// One tick's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tick {
    /// The average of the window, `None` when no sample arrived in it.
    pub usage: Option<Usage>,
    /// How many samples the average holds.
    pub samples: usize,
}

impl Poller {
    /// The first tick comes one loop interval after `now`.
    pub fn new(cfg: Polling, now: u64) -> Poller {
        let cfg = Polling {
            loop_interval_ms: cfg.loop_interval_ms.max(1),
            sample_average_ms: cfg.sample_average_ms.max(1),
        };
        Poller { cfg, samples: VecDeque::new(), next_tick_ms: now.saturating_add(cfg.loop_interval_ms) }
    }

    pub fn next_tick_ms(&self) -> u64 {
        self.next_tick_ms
    }

    pub fn sample(&mut self, now: u64, usage: Usage) {
        self.samples.push_back((now, usage));
        // Only the window before the coming tick can matter: keeping no more
        // holds memory to one window's samples.
        let keep_from = self.next_tick_ms.saturating_sub(self.cfg.sample_average_ms);
        while self.samples.front().is_some_and(|(at, _)| *at < keep_from) {
            self.samples.pop_front();
        }
    }

    /// `Some` when a tick is due at `now`: the mean of the samples that
    /// arrived in the window `(now - sample_average_ms, now]`. The next tick
    /// is one interval after the one due (skipping any missed while the loop
    /// was busy), so the cadence does not drift.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    pub fn tick(&mut self, now: u64) -> Option<Tick> {
        if now < self.next_tick_ms {
            return None;
        }
        let missed = (now - self.next_tick_ms) / self.cfg.loop_interval_ms;
        self.next_tick_ms += (missed + 1) * self.cfg.loop_interval_ms;
        let from = now.saturating_sub(self.cfg.sample_average_ms);
        let window: Vec<Usage> =
            self.samples.iter().filter(|(at, _)| *at > from && *at <= now).map(|(_, u)| *u).collect();
        self.samples.clear();
        let n = window.len();
        if n == 0 {
            return Some(Tick { usage: None, samples: 0 });
        }
        let load = window.iter().map(|u| u.load_avg_1).sum::<f64>() / n as f64;
        let mem = window.iter().map(|u| u128::from(u.memory_used_bytes)).sum::<u128>() / n as u128;
        let usage = Usage { load_avg_1: load, memory_used_bytes: u64::try_from(mem).unwrap_or(u64::MAX) };
        Some(Tick { usage: Some(usage), samples: n })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(mib: u64) -> Usage {
        Usage { load_avg_1: mib as f64 / 100.0, memory_used_bytes: mib << 20 }
    }

    #[test]
    fn averages_the_last_window_once_per_interval() {
        let mut p = Poller::new(Polling::default(), 0);
        assert_eq!(p.next_tick_ms(), 5000);
        // Samples every 100 ms, rising by 1 MiB each.
        for i in 1..=49 {
            p.sample(i * 100, u(i));
            assert_eq!(p.tick(i * 100), None, "no decision between ticks");
        }
        p.sample(5000, u(50));
        let t = p.tick(5000).unwrap();
        // (4500, 5000]: samples 46..=50.
        assert_eq!(t.samples, 5);
        assert_eq!(t.usage.unwrap().memory_used_bytes, 48 << 20);
        assert!((t.usage.unwrap().load_avg_1 - 0.48).abs() < 1e-9);
        assert_eq!(p.next_tick_ms(), 10_000);
        // A spike right after a tick waits for the next one.
        p.sample(5100, u(4000));
        assert_eq!(p.tick(5100), None);
        assert_eq!(p.tick(9999), None);
        // ...and is outside that one's window.
        p.sample(9900, u(60));
        let t = p.tick(10_000).unwrap();
        assert_eq!((t.samples, t.usage.unwrap().memory_used_bytes), (1, 60 << 20));
    }

    #[test]
    fn a_silent_window_and_a_late_loop() {
        let cfg = Polling { loop_interval_ms: 1000, sample_average_ms: 300 };
        let mut p = Poller::new(cfg, 500);
        p.sample(600, u(1)); // long before the window
        assert_eq!(p.tick(1500), Some(Tick { usage: None, samples: 0 }));
        // The loop was busy for 2.3 intervals: one tick, cadence kept.
        p.sample(3700, u(7));
        assert_eq!(p.tick(3800).unwrap().samples, 1);
        assert_eq!(p.next_tick_ms(), 4500);
    }

    #[test]
    fn bounded_and_validated() {
        let mut p = Poller::new(Polling::default(), 0);
        for ms in 0..5000 {
            p.sample(ms, u(1));
        }
        assert_eq!(p.samples.len(), 500, "one window's samples");
        assert!(Polling::default().validate(10_000).is_ok());
        assert!(Polling { loop_interval_ms: 0, ..Polling::default() }.validate(10_000).is_err());
        assert!(Polling::default().validate(4000).unwrap_err().contains("sample_max_age_ms"));
    }
}
