//! `demo semaphore`: threads sharing a resource that only `permits` may use at once (a small
//! connection pool, say). std has no semaphore, so this builds the textbook one from a
//! `Mutex<usize>` and a `Condvar`; a permit is an RAII guard, so it is always given back.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::report;

/// Sizes for `demo semaphore`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Threads that want the resource
    #[arg(long, default_value_t = 6, value_parser = super::positive)]
    pub(crate) workers: usize,
    /// How many may use it at once
    #[arg(long, default_value_t = 2, value_parser = super::positive)]
    pub(crate) permits: usize,
    /// How long each worker holds it, in milliseconds
    #[arg(long, default_value_t = 100)]
    pub(crate) hold_ms: u64,
}

/// A counting semaphore: `acquire` blocks while no permit is free.
#[derive(Debug)]
pub(crate) struct Semaphore {
    available: Mutex<usize>,
    freed: Condvar,
}

/// A held permit; dropping it gives it back and wakes one waiter.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    sem: &'a Semaphore,
}

impl Semaphore {
    /// A semaphore with `permits` free permits.
    pub(crate) fn new(permits: usize) -> Self {
        Self {
            available: Mutex::new(permits),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        // The count stays consistent even if a holder panicked, so poisoning is ignored.
        self.available
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a free permit and takes it.
    pub(crate) fn acquire(&self) -> Permit<'_> {
        let mut available = self.lock();
        // A loop, not an `if`: wake-ups can be spurious, or another thread may get there first.
        while *available == 0 {
            available = self
                .freed
                .wait(available)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *available -= 1;
        Permit { sem: self }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.sem.lock() += 1;
        self.sem.freed.notify_one();
    }
}

/// One worker's turn with the resource.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Turn {
    /// Worker index.
    pub(crate) worker: usize,
    /// When it got the permit, from the start.
    pub(crate) got: Duration,
    /// When it gave it back.
    pub(crate) released: Duration,
    /// Workers using the resource right after it got in (itself included).
    pub(crate) in_use: usize,
}

/// What the run did.
#[derive(Debug, Clone)]
pub(crate) struct SemRun {
    /// Every worker's turn, in the order they got the permit.
    pub(crate) turns: Vec<Turn>,
    /// Most workers seen using the resource at once.
    pub(crate) peak: usize,
    /// Wall time.
    pub(crate) elapsed: Duration,
}

/// Runs `workers` threads that each use the resource for `hold` under the semaphore.
pub(crate) fn run(workers: usize, permits: usize, hold: Duration) -> SemRun {
    let start = Instant::now();
    let sem = Semaphore::new(permits);
    // Counted only while a permit is held, so it measures what the semaphore allowed.
    let using = AtomicUsize::new(0);
    let peak = AtomicUsize::new(0);
    let turns = Mutex::new(Vec::with_capacity(workers));
    thread::scope(|s| {
        for worker in 0..workers {
            let (sem, using, peak, turns) = (&sem, &using, &peak, &turns);
            s.spawn(move || {
                let permit = sem.acquire();
                let in_use = using.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(in_use, Ordering::SeqCst);
                let got = start.elapsed();
                thread::sleep(hold);
                using.fetch_sub(1, Ordering::SeqCst);
                let released = start.elapsed();
                drop(permit);
                turns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Turn {
                        worker,
                        got,
                        released,
                        in_use,
                    });
            });
        }
    });
    let mut turns = turns.into_inner().unwrap_or_else(PoisonError::into_inner);
    turns.sort_by_key(|t| t.got);
    SemRun {
        turns,
        peak: peak.into_inner(),
        elapsed: start.elapsed(),
    }
}

/// Runs the demo and prints who held the resource when.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    report::header("semaphore");
    report::info(format!(
        "{} workers, {} permits, each holds the resource {} ms",
        args.workers, args.permits, args.hold_ms
    ));
    let run = run(
        args.workers,
        args.permits,
        Duration::from_millis(args.hold_ms),
    );
    for t in &run.turns {
        report::event(
            t.got,
            format!(
                "worker-{} got a permit ({}/{} in use), released it at {}",
                t.worker,
                t.in_use,
                args.permits,
                report::fmt_duration(t.released)
            ),
        );
    }
    report::timing(
        "all workers served",
        run.elapsed,
        format!(
            "{} rounds of {} ms",
            args.workers.div_ceil(args.permits),
            args.hold_ms
        ),
    );
    report::note(
        "a semaphore is a counter of free slots: acquire waits on the Condvar until one is free; \
         the RAII permit gives the slot back on drop, even on an early return or panic.",
    );
    let mut checks = report::Checks::default();
    checks.check(
        format!(
            "peak concurrent users {} never exceeded the {} permits",
            run.peak, args.permits
        ),
        run.peak <= args.permits,
    );
    checks.check("every worker got a turn", run.turns.len() == args.workers);
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_never_exceeds_permits() {
        for (workers, permits) in [(8, 3), (5, 1), (2, 4)] {
            let run = run(workers, permits, Duration::from_millis(3));
            assert!(
                run.peak <= permits,
                "{workers}/{permits}: peak {}",
                run.peak
            );
            assert!(run.peak >= 1);
            assert_eq!(run.turns.len(), workers);
        }
    }

    #[test]
    fn permit_is_returned_on_drop() {
        let sem = Semaphore::new(1);
        drop(sem.acquire());
        // Would block forever if the first permit had not come back.
        let _again = sem.acquire();
        assert_eq!(*sem.lock(), 0);
    }
}
