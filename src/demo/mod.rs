//! `filepipe demo <name>`: runnable lessons in the concurrency patterns of the Python seeds,
//! each done the idiomatic Rust way. Each demo returns a result struct from a plain function
//! (what tests check) and prints it via [`report`]; none touches the file pipeline.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

pub(crate) mod as_completed;
pub(crate) mod async_tasks;
pub(crate) mod barrier;
pub(crate) mod cpu;
pub(crate) mod fizzbuzz;
pub(crate) mod producer_consumer;
pub(crate) mod race;
pub(crate) mod report;
pub(crate) mod scraper;
pub(crate) mod semaphore;
pub(crate) mod shared_memory;
pub(crate) mod threads;

/// Arguments of `filepipe demo`: `--list`, or one demo with its size flags.
#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// Print one line per demo: its name and what it shows
    #[arg(long)]
    pub(crate) list: bool,

    /// The demo to run (see --list)
    #[command(subcommand)]
    pub(crate) demo: Option<DemoCommand>,
}

/// One variant per demo; the doc line of each is what `--list` prints.
#[derive(Subcommand, Debug)]
pub(crate) enum DemoCommand {
    /// I/O-bound tasks (simulated waits) on a thread pool versus sequentially
    Threads(threads::Args),
    /// CPU-bound sum of squares: sequential vs rayon threads vs worker processes over pipes
    Cpu(cpu::Args),
    /// Many I/O-bound tasks on an async runtime, a semaphore bounding how many run at once
    Async(async_tasks::Args),
    /// Producers and consumers over a bounded queue, shut down with one sentinel per consumer
    ProducerConsumer(producer_consumer::Args),
    /// Concurrent web scraper: concurrency limit, token-bucket rate limit, retries, JSON lines
    Scraper(scraper::Args),
    /// A child process adds 10 to each f64 in a shared memory block; then threads with atomics
    SharedMemory(shared_memory::Args),
    /// Lost updates from an unsynchronised read-modify-write vs a Mutex vs an atomic counter
    Race(race::Args),
    /// A counting semaphore limiting how many threads use a resource at once
    Semaphore(semaphore::Args),
    /// A barrier: no thread starts phase 2 until every thread has finished phase 1
    Barrier(barrier::Args),
    /// FizzBuzz across four threads taking turns through a Mutex and a Condvar
    Fizzbuzz(fizzbuzz::Args),
    /// Futures completing out of submission order, collected as they complete
    AsCompleted(as_completed::Args),

    /// Worker process for `demo cpu`: reads sizes on stdin, writes sums on stdout
    #[command(hide = true)]
    CpuWorker,
    /// Child process for `demo shared-memory`: adds a value to each f64 in a named block
    #[command(hide = true)]
    ShmChild(shared_memory::ChildArgs),
}

/// Runs the demo named in `args`, or prints the list. The exit code is failure when a
/// demo's own check of its claim did not hold. `quiet` (`-q`) keeps a demo's report off
/// stdout, a failed check excepted (on stderr); `--list`, asked for, is printed all the same.
pub(crate) fn run(args: &DemoArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    report::set_quiet(quiet);
    let Some(demo) = args.demo.as_ref().filter(|_| !args.list) else {
        // What `--list` prints is for scripts too: a write that fails is an error (exit 1),
        // as for every other printer; a reader gone (`| head`) is not.
        return match print_list(!args.list) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(anyhow::Error::new(e).context("writing to stdout"))
            }
            _ => Ok(ExitCode::SUCCESS),
        };
    };
    match demo {
        DemoCommand::Threads(a) => threads::main(a),
        DemoCommand::Cpu(a) => cpu::main(a),
        DemoCommand::Async(a) => async_tasks::main(a),
        DemoCommand::ProducerConsumer(a) => producer_consumer::main(a),
        DemoCommand::Scraper(a) => scraper::main(a),
        DemoCommand::SharedMemory(a) => shared_memory::main(a),
        DemoCommand::Race(a) => race::main(a),
        DemoCommand::Semaphore(a) => semaphore::main(a),
        DemoCommand::Barrier(a) => barrier::main(a),
        DemoCommand::Fizzbuzz(a) => fizzbuzz::main(a),
        DemoCommand::AsCompleted(a) => as_completed::main(a),
        DemoCommand::CpuWorker => cpu::worker_main(),
        DemoCommand::ShmChild(a) => shared_memory::child_main(a),
    }
}

/// Wraps the subcommands so clap can describe them; used only to read names and docs.
#[derive(Parser)]
#[command(name = "demo")]
struct ListHost {
    #[command(subcommand)]
    _demo: DemoCommand,
}

/// `(name, what it shows)` for every visible demo, in `--list` order. Taken from clap's
/// view of [`DemoCommand`] so the list, `--help` and the headers never disagree.
pub(crate) fn demo_list() -> Vec<(String, String)> {
    ListHost::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| {
            let about = c.get_about().map(|a| a.to_string()).unwrap_or_default();
            (c.get_name().to_string(), about)
        })
        .collect()
}

/// Clap value parser for counts that must be at least 1 (workers, permits, ...).
pub(crate) fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Prints the list of demos, and with `hint` how to run one.
fn print_list(hint: bool) -> std::io::Result<()> {
    use std::io::Write;
    let list = demo_list();
    let width = list.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for (name, about) in list {
        writeln!(out, "{name:<width$}  {about}")?;
    }
    if hint {
        writeln!(out)?;
        writeln!(
            out,
            "Run one with `filepipe demo <name>`; `filepipe demo <name> --help` shows its sizes."
        )?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_names_every_visible_demo_and_hides_workers() {
        let names: Vec<String> = demo_list().into_iter().map(|(n, _)| n).collect();
        for want in [
            "threads",
            "cpu",
            "async",
            "producer-consumer",
            "scraper",
            "shared-memory",
            "race",
            "semaphore",
            "barrier",
            "fizzbuzz",
            "as-completed",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        assert!(!names.iter().any(|n| n == "cpu-worker" || n == "shm-child"));
    }

    #[test]
    fn clap_definition_is_consistent() {
        ListHost::command().debug_assert();
    }
}
