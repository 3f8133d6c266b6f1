//! The `filepipe` binary: parse, configure, run, map the result to an exit code.

use std::process::ExitCode;

use clap::Parser;

use filepipe::cli::{Cli, Command};
use filepipe::config::Config;
use filepipe::{exit, logging, pipeline, signals, verify};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbosity = if cli.quiet {
        -1
    } else {
        cli.verbose.min(3) as i8
    };
    match cli.command {
        Command::Batch(args) => {
            let cfg = match Config::from_batch(&args, cli.quiet) {
                Ok(cfg) => cfg,
                Err(e) => return fail(exit::USAGE, &e),
            };
            if let Err(e) = logging::init(verbosity, cfg.failure_log.as_deref()) {
                return fail(exit::USAGE, &e);
            }
            let shutdown = match signals::install() {
                Ok(s) => s,
                Err(e) => return fail(exit::FAILURES, &e),
            };
            let mut summary = match pipeline::run_batch(&cfg, &shutdown) {
                Ok(s) => s,
                Err(e) => return fail(exit::FAILURES, &e),
            };
            summary.interrupted_by = shutdown.signal();
            if let Err(e) = summary.print(&cfg) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return fail(exit::FAILURES, &e.into());
                }
            }
            match shutdown.signal() {
                Some(sig) => exit::interrupted(sig),
                None if summary.failed > 0 => ExitCode::from(exit::FAILURES),
                None => ExitCode::from(exit::SUCCESS),
            }
        }
        Command::Verify(args) => {
            if let Err(e) = logging::init(verbosity, None) {
                return fail(exit::USAGE, &e);
            }
            let jobs = args.jobs.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                usize::from,
            );
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let report = verify::run(&args.target, jobs, cli.quiet, &mut out);
            let flushed = std::io::Write::flush(&mut out);
            match (report, flushed) {
                (Err(e), _) => fail(exit::USAGE, &e),
                (Ok(r), _) if r.success() => ExitCode::from(exit::SUCCESS),
                (Ok(_), _) => ExitCode::from(exit::FAILURES),
            }
        }
        #[cfg(feature = "demos")]
        Command::Demo(args) => match filepipe::demo::run(&args) {
            Ok(code) => code,
            Err(e) => fail(exit::FAILURES, &e),
        },
    }
}

fn fail(code: u8, e: &anyhow::Error) -> ExitCode {
    eprintln!("filepipe: error: {e:#}");
    ExitCode::from(code)
}
