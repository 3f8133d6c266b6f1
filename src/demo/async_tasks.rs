//! `demo async`: the seed's `asyncio_demo` — many simulated I/O waits as tasks on a
//! single-threaded tokio runtime, a semaphore letting at most `concurrency` wait at once.
//! Invariant: the running count, raised only while a permit is held, never passes the limit.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::report;

/// Sizes for `demo async` (defaults: the seed's 25 tasks x 50 ms, concurrency 8).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Number of async tasks
    #[arg(long, default_value_t = 25)]
    pub(crate) tasks: usize,
    /// Simulated wait of each task, in milliseconds
    #[arg(long, default_value_t = 50)]
    pub(crate) delay_ms: u64,
    /// Semaphore permits: most tasks allowed to wait at once
    #[arg(long, default_value_t = 8, value_parser = super::positive)]
    pub(crate) concurrency: usize,
}

/// What the bounded run did.
#[derive(Debug, Clone)]
pub(crate) struct AsyncRun {
    /// Wall time.
    pub(crate) elapsed: Duration,
    /// Task ids in completion order.
    pub(crate) completed: Vec<usize>,
    /// Most tasks seen inside the semaphore at once.
    pub(crate) peak_running: usize,
}

/// Runs `tasks` waits of `delay` with at most `concurrency` in flight, on one OS thread.
pub(crate) fn run_bounded(
    tasks: usize,
    delay: Duration,
    concurrency: usize,
) -> anyhow::Result<AsyncRun> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let start = Instant::now();
        let sem = Arc::new(Semaphore::new(concurrency));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut set = JoinSet::new();
        for id in 0..tasks {
            let (sem, running, peak) = (sem.clone(), running.clone(), peak.clone());
            set.spawn(async move {
                // Held until the end of the task, so the wait below counts against the limit.
                let _permit = sem.acquire_owned().await?;
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                running.fetch_sub(1, Ordering::SeqCst);
                anyhow::Ok(id)
            });
        }
        let mut completed = Vec::with_capacity(tasks);
        while let Some(joined) = set.join_next().await {
            completed.push(joined.context("async task panicked")??);
        }
        Ok(AsyncRun {
            elapsed: start.elapsed(),
            completed,
            peak_running: peak.load(Ordering::SeqCst),
        })
    })
}

/// Runs the demo and prints the bound and the timing.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    let delay = Duration::from_millis(args.delay_ms);
    report::header("async");
    report::info(format!(
        "{} tasks waiting {} ms each, semaphore of {} permits, one OS thread",
        args.tasks, args.delay_ms, args.concurrency
    ));
    let run = run_bounded(args.tasks, delay, args.concurrency)?;
    let rounds = args.tasks.div_ceil(args.concurrency) as u32;
    report::timing(
        &format!("async, concurrency {}", args.concurrency),
        run.elapsed,
        format!(
            "ideal {} ({} rounds); one at a time would be {}",
            report::fmt_duration(delay * rounds),
            rounds,
            report::fmt_duration(delay * args.tasks as u32)
        ),
    );
    report::info(format!(
        "peak tasks inside the semaphore: {} (limit {})",
        run.peak_running, args.concurrency
    ));
    report::note(
        "each .await hands the thread back to the runtime, so thousands of waiting tasks cost a \
         few hundred bytes each instead of a thread each; the semaphore is the back-pressure that \
         keeps a server from being flooded.",
    );
    let mut checks = report::Checks::default();
    checks.check(
        format!("never more than {} running at once", args.concurrency),
        run.peak_running <= args.concurrency,
    );
    checks.check("every task completed", run.completed.len() == args.tasks);
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semaphore_bounds_concurrency_and_every_task_finishes() {
        let run = run_bounded(30, Duration::from_millis(2), 4).expect("run");
        assert!(run.peak_running <= 4, "peak {}", run.peak_running);
        // All tasks are spawned before any timer can fire on this single thread, so the
        // permits are all taken in the first round: the bound is reached, not just respected.
        assert_eq!(run.peak_running, 4);
        let mut ids = run.completed.clone();
        ids.sort_unstable();
        assert_eq!(ids, (0..30).collect::<Vec<_>>());
    }
}
