//! The systemd watchdog: WATCHDOG=1 is sent only while every watcher loop turns and, wherever
//! work is in flight, bytes are being read or files finished; and the sd_notify messages the
//! supervisor sends.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use sd_notify::NotifyState;

use crate::fsio::input::BYTES_READ;
use crate::travel::Stats;

/// Sends `states` to systemd, if it listens; a failure is only worth a debug line.
pub(crate) fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// A running pipeline as the watchdog sees it: an id no other pipeline of this process has
/// had (a restarted one gets a new one), and its counters.
pub(crate) type Watched = (u64, Arc<Stats>);

/// Liveness as the watchdog sees it between two pings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Liveness {
    /// Each ready pipeline's watcher loop count, by the pipeline's id (`Watched`).
    pub(crate) loops: Vec<(u64, u64)>,
    /// Files in flight, all pipelines.
    pub(crate) in_flight: u64,
    /// Bytes read plus outcomes counted, all pipelines.
    pub(crate) progress: u64,
}

impl Liveness {
    fn sample(watched: &[Watched]) -> Liveness {
        let ready: Vec<&Watched> = watched
            .iter()
            .filter(|(_, s)| s.ready.load(Ordering::Relaxed))
            .collect();
        let stats = || watched.iter().map(|(_, s)| s);
        let outcomes: u64 = stats()
            .map(|s| {
                s.done.load(Ordering::Relaxed)
                    + s.skipped.load(Ordering::Relaxed)
                    + s.failed.load(Ordering::Relaxed)
            })
            .sum();
        Liveness {
            loops: ready
                .iter()
                .map(|(id, s)| (*id, s.loop_ticks.load(Ordering::Relaxed)))
                .collect(),
            in_flight: stats().map(|s| s.in_flight.load(Ordering::Relaxed)).sum(),
            progress: BYTES_READ.load(Ordering::Relaxed) + outcomes,
        }
    }

    /// True if, from `before` to `self`, every watcher loop turned and, if work was in flight,
    /// something moved. A wedged worker pool (or a hung fsync) fails the second test. Loops
    /// are paired by pipeline: one that was not there (or not ready) before, such as one a
    /// reload started, has not had the time to turn and counts as turning (paired by
    /// position, a restarted pipeline's low count withheld a ping at every reload).
    pub(crate) fn healthy_since(&self, before: &Liveness) -> bool {
        let loops_turned = self.loops.iter().all(|(id, now)| {
            before
                .loops
                .iter()
                .find(|(was, _)| was == id)
                .is_none_or(|(_, then)| now > then)
        });
        let busy = self.in_flight > 0 && before.in_flight > 0;
        loops_turned && (!busy || self.progress > before.progress)
    }
}

/// Pings WATCHDOG=1 every `interval / 2` while the pipelines are healthy.
pub(crate) fn spawn_watchdog(interval: Duration, watched: Arc<Mutex<Vec<Watched>>>) -> Result<()> {
    std::thread::Builder::new()
        .name("filepipe-watchdog".into())
        .spawn(move || {
            let sample = || {
                watched
                    .lock()
                    .map(|w| Liveness::sample(&w))
                    .unwrap_or_default()
            };
            let mut before = sample();
            loop {
                std::thread::sleep(interval / 2);
                let now = sample();
                if now.healthy_since(&before) {
                    notify(&[NotifyState::Watchdog]);
                } else {
                    tracing::error!("no progress: withholding the watchdog ping");
                }
                before = now;
            }
        })
        .context("starting the watchdog thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_health() {
        let idle = Liveness {
            loops: vec![(1, 5)],
            in_flight: 0,
            progress: 100,
        };
        let idle_later = Liveness {
            loops: vec![(1, 9)],
            in_flight: 0,
            progress: 100,
        };
        assert!(
            idle_later.healthy_since(&idle),
            "idle and looping is healthy"
        );
        let stuck_loop = Liveness {
            loops: vec![(1, 5)],
            ..idle_later.clone()
        };
        assert!(
            !stuck_loop.healthy_since(&idle),
            "a watcher loop that stopped is not"
        );
        let busy = Liveness {
            loops: vec![(1, 5)],
            in_flight: 2,
            progress: 100,
        };
        let wedged = Liveness {
            loops: vec![(1, 9)],
            in_flight: 2,
            progress: 100,
        };
        assert!(
            !wedged.healthy_since(&busy),
            "work in flight and nothing moving is wedged"
        );
        let working = Liveness {
            loops: vec![(1, 9)],
            in_flight: 2,
            progress: 4196,
        };
        assert!(working.healthy_since(&busy));
        let restarted = Liveness {
            loops: vec![(2, 1)],
            ..idle_later.clone()
        };
        assert!(
            restarted.healthy_since(&idle_later),
            "a pipeline a reload started has had no time to turn"
        );
        let one_stuck = Liveness {
            loops: vec![(1, 9), (2, 1)],
            ..idle_later.clone()
        };
        assert!(
            !one_stuck.healthy_since(&idle_later),
            "another one is stuck"
        );
    }
}
