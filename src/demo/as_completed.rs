//! `demo as-completed`: the seed's `as_completed` — tasks submitted in one order finish in
//! another, and a tokio `JoinSet` hands each result back the moment it is ready.
//! Invariant: results come back in the order the tasks finished (their finish tickets).

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;

use super::report;

/// Sizes for `demo as-completed`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Tasks to submit
    #[arg(long, default_value_t = 6)]
    pub(crate) tasks: usize,
    /// Delays are shuffled multiples of this, in milliseconds
    #[arg(long, default_value_t = 60)]
    pub(crate) step_ms: u64,
}

/// One finished task as `join_next` returned it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    /// Submission index.
    pub(crate) id: usize,
    /// How long the task waited.
    pub(crate) delay: Duration,
    /// When its result was collected, from the start.
    pub(crate) at: Duration,
    /// 0 for the first task to finish, 1 for the next, ...
    pub(crate) ticket: usize,
}

/// Delay of each task: distinct multiples of `step`, in a fixed shuffled order so the
/// finishing order visibly differs from the submission order.
pub(crate) fn delays(tasks: usize, step: Duration) -> Vec<Duration> {
    // Rank ids by a multiplicative hash: a deterministic shuffle without a rand dependency.
    let mut by_hash: Vec<usize> = (0..tasks).collect();
    by_hash.sort_by_key(|&i| (i as u64).wrapping_mul(2_654_435_761) % (1 << 32));
    let mut delays = vec![Duration::ZERO; tasks];
    for (rank, &id) in by_hash.iter().enumerate() {
        delays[id] = step * (rank as u32 + 1);
    }
    delays
}

/// Submits one task per delay, in index order, and collects results as they complete.
pub(crate) fn run(delays: &[Duration]) -> anyhow::Result<Vec<Completion>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let start = Instant::now();
        let finished = Arc::new(AtomicUsize::new(0));
        let mut set = JoinSet::new();
        for (id, &delay) in delays.iter().enumerate() {
            let finished = finished.clone();
            set.spawn(async move {
                tokio::time::sleep(delay).await;
                (id, delay, finished.fetch_add(1, Ordering::SeqCst))
            });
        }
        let mut done = Vec::with_capacity(delays.len());
        while let Some(joined) = set.join_next().await {
            let (id, delay, ticket) = joined.context("task panicked")?;
            done.push(Completion {
                id,
                delay,
                at: start.elapsed(),
                ticket,
            });
        }
        Ok(done)
    })
}

/// Runs the demo and prints submission and completion order.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    report::header("as-completed");
    let delays = delays(args.tasks, Duration::from_millis(args.step_ms));
    let start = Instant::now();
    report::info(format!(
        "submitted in order 0..{} with delays {:?} ms",
        args.tasks,
        delays.iter().map(Duration::as_millis).collect::<Vec<_>>()
    ));
    let done = run(&delays)?;
    for c in &done {
        report::event(
            c.at,
            format!("task {} done (waited {} ms)", c.id, c.delay.as_millis()),
        );
    }
    let order: Vec<usize> = done.iter().map(|c| c.id).collect();
    report::timing(
        "all tasks",
        start.elapsed(),
        format!("completion order {order:?}"),
    );
    report::note(
        "join_next() yields whichever task finishes next, so fast results are handled while slow \
         ones still run — the total time is the longest delay, not the sum.",
    );
    let mut checks = report::Checks::default();
    checks.check(
        "results collected in finishing order",
        done.iter().enumerate().all(|(i, c)| c.ticket == i),
    );
    let mut ids = order.clone();
    ids.sort_unstable();
    checks.check(
        "every submitted task came back once",
        ids == (0..args.tasks).collect::<Vec<_>>(),
    );
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_a_shuffle_of_distinct_multiples() {
        let d = delays(6, Duration::from_millis(10));
        let mut sorted = d.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (1..=6)
                .map(|k| Duration::from_millis(10 * k))
                .collect::<Vec<_>>()
        );
        assert_ne!(
            d, sorted,
            "the demo needs an order other than submission order"
        );
    }

    #[test]
    fn results_come_back_in_finishing_order_and_none_is_lost() {
        let done = run(&delays(8, Duration::from_millis(3))).expect("run");
        assert!(done.iter().enumerate().all(|(i, c)| c.ticket == i));
        let mut ids: Vec<usize> = done.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..8).collect::<Vec<_>>());
    }
}
