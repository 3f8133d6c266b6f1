//! `demo barrier`: threads with phase-1 work of different lengths meet at a
//! `std::sync::Barrier` before phase 2. Invariant, checked by a shared event counter rather
//! than clocks: every "finished phase 1" event comes before every "started phase 2" event.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use super::report;

/// Sizes for `demo barrier`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Threads meeting at the barrier
    #[arg(long, default_value_t = 4, value_parser = super::positive)]
    pub(crate) threads: usize,
    /// Phase-1 work of thread i is (i+1) x this many milliseconds
    #[arg(long, default_value_t = 100)]
    pub(crate) work_ms: u64,
}

/// One thread's passage through the barrier.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Passage {
    /// Thread index.
    pub(crate) thread: usize,
    /// When it finished phase 1, from the start.
    pub(crate) arrived: Duration,
    /// How long it then waited at the barrier.
    pub(crate) waited: Duration,
    /// Position in the global event order when it finished phase 1.
    pub(crate) arrived_seq: usize,
    /// Position in the global event order when it started phase 2.
    pub(crate) left_seq: usize,
    /// The one thread the barrier chose as leader.
    pub(crate) leader: bool,
}

/// Runs `threads` threads through a two-phase computation separated by a barrier.
pub(crate) fn run(threads: usize, work: Duration) -> Vec<Passage> {
    let start = Instant::now();
    let barrier = Barrier::new(threads);
    let seq = AtomicUsize::new(0);
    let mut passages: Vec<Passage> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, seq) = (&barrier, &seq);
                s.spawn(move || {
                    thread::sleep(work * (t as u32 + 1));
                    let arrived = start.elapsed();
                    let arrived_seq = seq.fetch_add(1, Ordering::SeqCst);
                    let leader = barrier.wait().is_leader();
                    let left_seq = seq.fetch_add(1, Ordering::SeqCst);
                    Passage {
                        thread: t,
                        arrived,
                        waited: start.elapsed().saturating_sub(arrived),
                        arrived_seq,
                        left_seq,
                        leader,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    passages.sort_by_key(|p| p.arrived_seq);
    passages
}

/// Whether nobody started phase 2 before everybody had finished phase 1.
pub(crate) fn barrier_held(passages: &[Passage]) -> bool {
    let last_arrival = passages.iter().map(|p| p.arrived_seq).max();
    let first_departure = passages.iter().map(|p| p.left_seq).min();
    match (last_arrival, first_departure) {
        (Some(a), Some(d)) => a < d,
        _ => true,
    }
}

/// Runs the demo and prints each thread's arrival and wait.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    report::header("barrier");
    report::info(format!(
        "{} threads; phase 1 takes thread i (i+1) x {} ms",
        args.threads, args.work_ms
    ));
    let start = Instant::now();
    let passages = run(args.threads, Duration::from_millis(args.work_ms));
    for p in &passages {
        report::event(
            p.arrived,
            format!(
                "thread-{} finished phase 1, waited {} at the barrier{}",
                p.thread,
                report::fmt_duration(p.waited),
                if p.leader { " (leader)" } else { "" }
            ),
        );
    }
    report::timing(
        "both phases",
        start.elapsed(),
        "phase 2 starts when the slowest thread arrives",
    );
    report::note(
        "fast threads block in Barrier::wait until the last one arrives, then all go on \
         together; exactly one gets is_leader() to do once-per-phase work such as merging results.",
    );
    let mut checks = report::Checks::default();
    checks.check(
        "no thread started phase 2 before all finished phase 1",
        barrier_held(&passages),
    );
    checks.check(
        "exactly one leader",
        passages.iter().filter(|p| p.leader).count() == 1,
    );
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_arrive_before_any_leaves_and_one_leads() {
        for threads in [1, 3, 6] {
            let passages = run(threads, Duration::from_millis(1));
            assert_eq!(passages.len(), threads);
            assert!(barrier_held(&passages), "{passages:?}");
            assert_eq!(passages.iter().filter(|p| p.leader).count(), 1);
        }
    }
}
