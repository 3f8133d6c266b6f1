//! The progress display: one overall bar (or, watching, a status spinner) and one line per
//! worker, drawn on stderr only when asked for.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::config::Config;
use crate::report::summary::Summary;
use crate::travel::Stats;

/// Progress display: one overall bar and one line per worker, or nothing.
pub(super) struct Progress {
    pub(super) multi: MultiProgress,
    pub(super) overall: ProgressBar,
    pub(super) workers: Vec<ProgressBar>,
    /// Files counted: the bar is moved to it at each `refresh` (once per batch of outcomes),
    /// not per file, since each move of an indicatif bar reads the clock and takes a lock
    /// (a tenth of the reporter's time in an unchanged rerun of 50,000 files).
    pub(super) files_done: u64,
    pub(super) bytes_done: u64,
    started: Instant,
    watching: bool,
}

impl Progress {
    pub(super) fn new(cfg: &Config) -> Self {
        let multi = MultiProgress::with_draw_target(if cfg.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let overall = multi.add(ProgressBar::new(0));
        if cfg.watch.is_some() {
            overall.set_style(
                ProgressStyle::with_template("{spinner} watching: {msg}").expect("valid template"),
            );
            overall.enable_steady_tick(Duration::from_millis(200));
        } else {
            overall.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} files {msg} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
        }
        let workers = if cfg.progress {
            (0..cfg.jobs)
                .map(|_| {
                    let b = multi.add(ProgressBar::new_spinner());
                    b.set_style(ProgressStyle::with_template("  {msg}").expect("valid template"));
                    b
                })
                .collect()
        } else {
            Vec::new()
        };
        Progress {
            multi,
            overall,
            workers,
            files_done: 0,
            bytes_done: 0,
            started: Instant::now(),
            watching: cfg.watch.is_some(),
        }
    }

    pub(super) fn refresh(&self, stats: &Stats, summary: &Summary) {
        self.overall.set_position(self.files_done);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        if self.watching {
            self.overall.set_message(format!(
                "queued {}, in flight {}, done {}, skipped {}, failed {}, {:.1} files/s",
                stats.queued.load(Ordering::Relaxed),
                stats.in_flight.load(Ordering::Relaxed),
                summary.done,
                summary.skipped,
                summary.failed,
                summary.files as f64 / secs
            ));
            return;
        }
        let total = stats.files.load(Ordering::Relaxed) + stats.reported.load(Ordering::Relaxed);
        self.overall.set_length(total);
        self.overall.set_message(format!(
            "{}/{} {}/s",
            HumanBytes(self.bytes_done),
            HumanBytes(stats.bytes.load(Ordering::Relaxed)),
            HumanBytes((self.bytes_done as f64 / secs) as u64)
        ));
    }
}
