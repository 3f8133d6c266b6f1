//! `demo race`: a lost-update race next to its two fixes. The racy counter does a separate
//! atomic load and store (safe Rust, not a data race, yet not one indivisible step), so
//! increments can be lost; the `Mutex` and `fetch_add` counters are always exact.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use super::report;

/// Sizes for `demo race`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Threads incrementing the same counter
    #[arg(long, default_value_t = 4, value_parser = super::positive)]
    pub(crate) threads: usize,
    /// Increments per thread
    #[arg(long, default_value_t = 200_000)]
    pub(crate) increments: u64,
}

/// One counter's outcome.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Count {
    /// Final value of the counter.
    pub(crate) value: u64,
    /// Wall time of all threads' increments.
    pub(crate) elapsed: Duration,
}

/// The three counters after `threads x increments` increments each.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RaceRun {
    /// What every counter should read.
    pub(crate) expected: u64,
    /// Load-then-store counter: may be short.
    pub(crate) racy: Count,
    /// `Mutex<u64>` counter: exact.
    pub(crate) mutex: Count,
    /// `AtomicU64::fetch_add` counter: exact.
    pub(crate) atomic: Count,
}

/// Runs `body` on `threads` threads at once and times it.
fn timed_on_threads(threads: usize, body: impl Fn() + Sync) -> Duration {
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(&body);
        }
    });
    start.elapsed()
}

/// Increments three counters from `threads` threads, `increments` times each.
pub(crate) fn run(threads: usize, increments: u64) -> RaceRun {
    let racy = AtomicU64::new(0);
    let racy_time = timed_on_threads(threads, || {
        for _ in 0..increments {
            // Read, then write back one more: another thread's increment landing between the
            // two is overwritten. `+=` on a plain shared integer would be this bug and UB.
            let v = racy.load(Ordering::Relaxed);
            racy.store(v + 1, Ordering::Relaxed);
        }
    });

    let mutex = Mutex::new(0u64);
    let mutex_time = timed_on_threads(threads, || {
        for _ in 0..increments {
            // A poisoned lock only means another incrementer panicked; the count is still
            // a plain integer, so carry on with it.
            *mutex.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        }
    });

    let atomic = AtomicU64::new(0);
    let atomic_time = timed_on_threads(threads, || {
        for _ in 0..increments {
            atomic.fetch_add(1, Ordering::Relaxed);
        }
    });

    RaceRun {
        expected: threads as u64 * increments,
        racy: Count {
            value: racy.into_inner(),
            elapsed: racy_time,
        },
        mutex: Count {
            value: mutex.into_inner().unwrap_or_else(|e| e.into_inner()),
            elapsed: mutex_time,
        },
        atomic: Count {
            value: atomic.into_inner(),
            elapsed: atomic_time,
        },
    }
}

/// Runs the demo and prints the three counts.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    report::header("race");
    report::info(format!(
        "{} threads x {} increments = {} expected",
        args.threads,
        args.increments,
        args.threads as u64 * args.increments
    ));
    let run = run(args.threads, args.increments);
    let lost = run.expected - run.racy.value;
    report::timing(
        "load + store (racy)",
        run.racy.elapsed,
        format!("count {} — lost {lost} updates", run.racy.value),
    );
    report::timing(
        "Mutex<u64>",
        run.mutex.elapsed,
        format!("count {}", run.mutex.value),
    );
    report::timing(
        "AtomicU64::fetch_add",
        run.atomic.elapsed,
        format!("count {}", run.atomic.value),
    );
    if lost == 0 {
        report::note(
            "the racy counter happened to lose nothing this run: the race is still there, the \
             threads just did not interleave inside a load/store pair (try more --increments).",
        );
    } else {
        report::note(
            "the racy counter lost updates: two threads read the same value and both wrote back \
             value+1. How many varies from run to run — that is what a race is.",
        );
    }
    report::note(
        "Rust will not compile `count += 1` on a shared plain integer (that data race is undefined \
         behaviour); it lets you write the load/store version because each step is atomic — only \
         the logic is wrong. The Mutex makes the read-modify-write exclusive; fetch_add makes it \
         one indivisible instruction, which is why it is also the fastest.",
    );
    let mut checks = report::Checks::default();
    checks.check("Mutex count is exact", run.mutex.value == run.expected);
    checks.check("atomic count is exact", run.atomic.value == run.expected);
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutex_and_atomic_counts_are_exact() {
        let run = run(4, 50_000);
        assert_eq!(run.expected, 200_000);
        assert_eq!(run.mutex.value, 200_000);
        assert_eq!(run.atomic.value, 200_000);
        // The racy count is only bounded, never asserted exact: losing updates is allowed
        // (each store writes a loaded value plus one, so it can never overshoot).
        assert!(run.racy.value <= 200_000);
    }
}
