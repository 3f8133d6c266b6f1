//! `demo threads`: the seed's `threading_demo` — I/O-bound tasks (simulated by sleeping)
//! run sequentially, then on a fixed pool of OS threads fed from a shared task counter.
//! Invariant: every task id is run exactly once and at most `workers` run at any moment.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::report;

/// Sizes for `demo threads` (defaults: the seed's 12 tasks x 0.2 s on 4 threads).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Number of simulated I/O tasks
    #[arg(long, default_value_t = 12)]
    pub(crate) tasks: usize,
    /// Simulated wait of each task, in milliseconds
    #[arg(long, default_value_t = 200)]
    pub(crate) delay_ms: u64,
    /// Threads in the pool
    #[arg(long, default_value_t = 4, value_parser = super::positive)]
    pub(crate) workers: usize,
}

/// What the pooled run did.
#[derive(Debug, Clone)]
pub(crate) struct PoolRun {
    /// Wall time of the whole pooled run.
    pub(crate) elapsed: Duration,
    /// Task ids in the order they finished (the seed's `as_completed` loop).
    pub(crate) completed: Vec<usize>,
    /// Most tasks seen waiting at the same time.
    pub(crate) peak_busy: usize,
}

/// Stands in for an HTTP request or a disk read: the thread just waits.
fn fetch_io_simulated(id: usize, delay: Duration) -> usize {
    thread::sleep(delay);
    id
}

/// Runs the tasks one after another; returns the wall time.
pub(crate) fn run_sequential(tasks: usize, delay: Duration) -> Duration {
    let start = Instant::now();
    for id in 0..tasks {
        fetch_io_simulated(id, delay);
    }
    start.elapsed()
}

/// Runs the tasks on `workers` threads that each take the next id from a shared counter
/// (Rust's `ThreadPoolExecutor`): waiting threads overlap, so the time divides by `workers`.
pub(crate) fn run_pool(tasks: usize, delay: Duration, workers: usize) -> PoolRun {
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let busy = AtomicUsize::new(0);
    let peak = AtomicUsize::new(0);
    let (done_tx, done_rx) = mpsc::channel();
    thread::scope(|s| {
        for _ in 0..workers.min(tasks) {
            let done_tx = done_tx.clone();
            let (next, busy, peak) = (&next, &busy, &peak);
            s.spawn(move || loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= tasks {
                    break;
                }
                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let id = fetch_io_simulated(id, delay);
                busy.fetch_sub(1, Ordering::SeqCst);
                // The receiver outlives the scope, so this send cannot fail.
                let _ = done_tx.send(id);
            });
        }
    });
    drop(done_tx);
    PoolRun {
        elapsed: start.elapsed(),
        completed: done_rx.iter().collect(),
        peak_busy: peak.into_inner(),
    }
}

/// Runs both and prints the comparison.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    let delay = Duration::from_millis(args.delay_ms);
    report::header("threads");
    report::info(format!(
        "{} tasks, each waiting {} ms; pool of {} threads",
        args.tasks, args.delay_ms, args.workers
    ));
    let sequential = run_sequential(args.tasks, delay);
    report::timing("sequential", sequential, "one wait after another");
    let pool = run_pool(args.tasks, delay, args.workers);
    report::timing(
        &format!("thread pool ({} threads)", args.workers),
        pool.elapsed,
        format!("speed-up {:.1}x", report::speedup(sequential, pool.elapsed)),
    );
    report::info(format!("completion order: {:?}", pool.completed));
    report::note(
        "a sleeping (or I/O-waiting) thread uses no CPU, so waits overlap: time ~ tasks/threads x delay. \
         Python gets this too, because the GIL is released while waiting.",
    );
    let mut checks = report::Checks::default();
    let mut ids = pool.completed.clone();
    ids.sort_unstable();
    checks.check(
        "every task ran exactly once",
        ids == (0..args.tasks).collect::<Vec<_>>(),
    );
    checks.check(
        format!(
            "at most {} tasks waited at once (peak {})",
            args.workers, pool.peak_busy
        ),
        pool.peak_busy <= args.workers,
    );
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_runs_every_task_once_within_the_worker_bound() {
        let run = run_pool(20, Duration::from_millis(2), 3);
        let mut ids = run.completed.clone();
        ids.sort_unstable();
        assert_eq!(ids, (0..20).collect::<Vec<_>>());
        assert!(
            run.peak_busy >= 1 && run.peak_busy <= 3,
            "{}",
            run.peak_busy
        );
    }

    #[test]
    fn more_workers_than_tasks_is_fine() {
        let run = run_pool(2, Duration::ZERO, 8);
        assert_eq!(run.completed.len(), 2);
        assert!(run.peak_busy <= 2);
    }
}
