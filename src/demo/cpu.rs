//! `demo cpu`: the seed's CPU-bound sum of squares run sequentially, on a rayon pool, and
//! on worker processes (filepipe re-executing itself as `demo cpu-worker`, one size per
//! line in over stdin, one sum per line out over stdout). All three must agree exactly.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rayon::prelude::*;

use super::report;

/// About a second of sequential work in a release build; a debug build's loop is some
/// twenty times slower, so it gets a smaller default to still finish in seconds.
const DEFAULT_SCALE: u64 = if cfg!(debug_assertions) { 20 } else { 400 };

/// Sizes for `demo cpu` (defaults: the seed's 500k, 600k, 700k, 800k on 4 workers).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Number of work items
    #[arg(long, default_value_t = 4, value_parser = super::positive)]
    pub(crate) tasks: usize,
    /// Size of the first item (sum of squares of 0..n)
    #[arg(long, default_value_t = 500_000)]
    pub(crate) base: u64,
    /// How much each further item grows
    #[arg(long, default_value_t = 100_000)]
    pub(crate) step: u64,
    /// Multiplies every size: compiled Rust does the seed's sizes in about a millisecond,
    /// too little to time, so the default scales them up (less in an unoptimised build)
    #[arg(long, default_value_t = DEFAULT_SCALE, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) scale: u64,
    /// Threads in the rayon pool and worker processes
    #[arg(long, default_value_t = 4, value_parser = super::positive)]
    pub(crate) workers: usize,
}

impl Args {
    /// The sizes of the work items.
    pub(crate) fn items(&self) -> Vec<u64> {
        (0..self.tasks as u64)
            .map(|i| (self.base + i * self.step) * self.scale)
            .collect()
    }
}

/// Sum of `i * i` for `i` in `0..n`, exact (the seed's `cpu_bound`).
pub(crate) fn sum_of_squares(n: u64) -> u128 {
    let mut total: u128 = 0;
    for i in 0..n {
        // black_box keeps LLVM from replacing the loop with the closed form, which would
        // leave nothing CPU-bound to demonstrate.
        let i = u128::from(std::hint::black_box(i));
        total += i * i;
    }
    total
}

/// The closed form `(n-1) n (2n-1) / 6`, to check the loops against.
pub(crate) fn expected_sum(n: u64) -> u128 {
    let n = u128::from(n);
    if n == 0 {
        return 0;
    }
    (n - 1) * n * (2 * n - 1) / 6
}

/// Results of one way of running the items, in item order.
#[derive(Debug, Clone)]
pub(crate) struct Timed {
    /// Wall time.
    pub(crate) elapsed: Duration,
    /// `sum_of_squares(items[i])` at index `i`.
    pub(crate) sums: Vec<u128>,
}

/// One worker process of the process run.
#[derive(Debug, Clone)]
pub(crate) struct WorkerReport {
    /// The child's process id.
    pub(crate) pid: u32,
    /// Indices of the items it computed, in the order it got them.
    pub(crate) items: Vec<usize>,
    /// The sum it answered for each of those items.
    pub(crate) sums: Vec<u128>,
}

/// Results of the process run.
#[derive(Debug, Clone)]
pub(crate) struct ProcessRun {
    /// Timing and sums, as for the other runs.
    pub(crate) timed: Timed,
    /// What each worker process did.
    pub(crate) workers: Vec<WorkerReport>,
}

/// Runs the items one after another on this thread.
pub(crate) fn run_sequential(items: &[u64]) -> Timed {
    let start = Instant::now();
    let sums = items.iter().map(|&n| sum_of_squares(n)).collect();
    Timed {
        elapsed: start.elapsed(),
        sums,
    }
}

/// Runs the items on a rayon pool of `workers` threads.
pub(crate) fn run_rayon(items: &[u64], workers: usize) -> anyhow::Result<Timed> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .context("building the rayon pool")?;
    let start = Instant::now();
    let sums = pool.install(|| items.par_iter().map(|&n| sum_of_squares(n)).collect());
    Ok(Timed {
        elapsed: start.elapsed(),
        sums,
    })
}

/// Runs the items on `workers` child processes of `exe` (which must be filepipe), each
/// fed the next item as soon as it answers the previous one, like a process pool.
pub(crate) fn run_processes(
    exe: &Path,
    items: &[u64],
    workers: usize,
) -> anyhow::Result<ProcessRun> {
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let outcomes: Vec<anyhow::Result<WorkerReport>> = thread::scope(|s| {
        let handles: Vec<_> = (0..workers.min(items.len()))
            .map(|_| s.spawn(|| drive_worker(exe, items, &next)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("worker thread panicked")))
            })
            .collect()
    });
    let mut sums = vec![None; items.len()];
    let mut reports = Vec::new();
    for outcome in outcomes {
        let report = outcome?;
        for (&i, &sum) in report.items.iter().zip(&report.sums) {
            sums[i] = Some(sum);
        }
        reports.push(report);
    }
    let sums = sums
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.with_context(|| format!("no worker answered item {i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(ProcessRun {
        timed: Timed {
            elapsed: start.elapsed(),
            sums,
        },
        workers: reports,
    })
}

/// Spawns one worker process and feeds it items until none are left.
fn drive_worker(exe: &Path, items: &[u64], next: &AtomicUsize) -> anyhow::Result<WorkerReport> {
    let mut child = Command::new(exe)
        .args(["demo", "cpu-worker"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning worker process {}", exe.display()))?;
    let pid = child.id();
    let mut feed = || -> anyhow::Result<Vec<(usize, u128)>> {
        let mut to_child = child.stdin.take().context("worker stdin")?;
        let mut from_child = BufReader::new(child.stdout.take().context("worker stdout")?);
        let mut done = Vec::new();
        let mut line = String::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&n) = items.get(i) else { break };
            writeln!(to_child, "{n}").context("sending an item to the worker")?;
            to_child.flush().context("sending an item to the worker")?;
            line.clear();
            if from_child
                .read_line(&mut line)
                .context("reading the worker's answer")?
                == 0
            {
                bail!("worker {pid} exited before answering");
            }
            let sum = line
                .trim()
                .parse()
                .with_context(|| format!("worker {pid} answered {line:?}"))?;
            done.push((i, sum));
        }
        // Closing stdin is the worker's signal to exit.
        drop(to_child);
        Ok(done)
    };
    let fed = feed();
    if fed.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for the worker process")?;
    let done = fed?;
    ensure!(status.success(), "worker {pid} failed: {status}");
    Ok(WorkerReport {
        pid,
        items: done.iter().map(|&(i, _)| i).collect(),
        sums: done.iter().map(|&(_, sum)| sum).collect(),
    })
}

/// The worker's side of the pipe protocol: one size per input line, one sum per output
/// line, until end of input.
pub(crate) fn worker_loop(input: impl BufRead, mut output: impl Write) -> anyhow::Result<()> {
    for line in input.lines() {
        let line = line.context("reading an item from the parent")?;
        let n: u64 = line
            .trim()
            .parse()
            .with_context(|| format!("bad item {line:?}"))?;
        writeln!(output, "{}", sum_of_squares(n)).context("answering the parent")?;
        // The parent waits for each answer before sending more, so never sit on one.
        output.flush().context("answering the parent")?;
    }
    Ok(())
}

/// Entry point of the hidden `demo cpu-worker` subcommand.
pub(crate) fn worker_main() -> anyhow::Result<ExitCode> {
    worker_loop(std::io::stdin().lock(), std::io::stdout().lock())?;
    Ok(ExitCode::SUCCESS)
}

/// Runs all three and prints times and speed-ups.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    let items = args.items();
    let exe = std::env::current_exe().context("locating the filepipe executable")?;
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    report::header("cpu");
    report::info(format!(
        "{} items, n = {:?} (the seed's sizes x {}); {} workers; {} cores here",
        items.len(),
        items,
        args.scale,
        args.workers,
        cores
    ));
    let seq = run_sequential(&items);
    report::timing("sequential", seq.elapsed, "one core");
    let par = run_rayon(&items, args.workers)?;
    report::timing(
        &format!("rayon pool ({} threads)", args.workers),
        par.elapsed,
        format!("speed-up {:.2}x", report::speedup(seq.elapsed, par.elapsed)),
    );
    let procs = run_processes(&exe, &items, args.workers)?;
    report::timing(
        &format!("{} worker processes", procs.workers.len()),
        procs.timed.elapsed,
        format!(
            "speed-up {:.2}x",
            report::speedup(seq.elapsed, procs.timed.elapsed)
        ),
    );
    for w in &procs.workers {
        report::info(format!(
            "worker process {} computed items {:?}",
            w.pid, w.items
        ));
    }
    report::note(
        "Rust has no GIL: threads run compiled code on every core at once, so a rayon pool gets the \
         speed-up Python needs multiprocessing for, without spawning processes or copying data \
         through pipes.",
    );
    report::note(format!(
        "speed-up is capped by the {cores} cores here; processes pay spawn and pipe costs and are worth \
         it for isolation (a crashing worker cannot take the others down), not for speed."
    ));
    let expected: Vec<u128> = items.iter().map(|&n| expected_sum(n)).collect();
    let mut checks = report::Checks::default();
    checks.check(
        "sequential, rayon and process sums all equal (n-1)n(2n-1)/6",
        seq.sums == expected && par.sums == expected && procs.timed.sums == expected,
    );
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_matches_closed_form() {
        for n in [0, 1, 2, 3, 10, 1000, 12_345] {
            assert_eq!(sum_of_squares(n), expected_sum(n), "n = {n}");
        }
    }

    #[test]
    fn seed_sizes_by_default() {
        let args = Args {
            tasks: 4,
            base: 500_000,
            step: 100_000,
            scale: 1,
            workers: 4,
        };
        assert_eq!(args.items(), vec![500_000, 600_000, 700_000, 800_000]);
    }

    #[test]
    fn rayon_and_sequential_agree() {
        let items = [1_000, 20_000, 5, 0];
        let seq = run_sequential(&items);
        let par = run_rayon(&items, 3).expect("rayon pool");
        assert_eq!(seq.sums, par.sums);
        assert_eq!(seq.sums[1], expected_sum(20_000));
    }

    #[test]
    fn worker_protocol_answers_one_line_per_item() {
        let mut out = Vec::new();
        worker_loop(&b"3\n10\n"[..], &mut out).expect("worker loop");
        assert_eq!(String::from_utf8(out).expect("utf8"), "5\n285\n");
        assert!(worker_loop(&b"x\n"[..], Vec::new()).is_err());
    }
}
