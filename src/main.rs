//! The `filepipe` binary: parse, configure, run, map the result to an exit code.

use std::process::ExitCode;

use clap::Parser;

use filepipe::cli::{Cli, Command};
use filepipe::config::Config;
use filepipe::{exit, logging, pipeline, service, signals, state, status, verify, watch};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbosity = if cli.quiet {
        -1
    } else {
        cli.verbose.min(3) as i8
    };
    match cli.command {
        Command::Batch(args) => run(Config::from_batch(&args, cli.quiet), verbosity, false),
        Command::Watch(args) if args.config.is_some() => run_service(&args, cli.quiet, verbosity),
        Command::Watch(args) => run(Config::from_watch(&args, cli.quiet), verbosity, true),
        Command::CheckConfig(args) => {
            match service::load(&args.file, &service::Overrides::default(), true, false) {
                Ok(s) => {
                    println!(
                        "{}: ok, {} pipelines",
                        args.file.display(),
                        s.pipelines.len()
                    );
                    ExitCode::from(exit::SUCCESS)
                }
                Err(e) => fail(exit::USAGE, &e),
            }
        }
        Command::Status(args) => {
            let dir = args.state.unwrap_or_else(state::default_dir);
            match status::print(&dir, args.failed, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::from(exit::SUCCESS),
                Err(e) => fail(exit::USAGE, &e),
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

/// Batch and watch: the same pipeline, a different source and lifetime.
fn run(cfg: anyhow::Result<Config>, verbosity: i8, watching: bool) -> ExitCode {
    let cfg = match cfg {
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
    let result = if watching {
        watch::run(&cfg, &shutdown, &filepipe::walk::Stats::default())
    } else {
        pipeline::run_batch(&cfg, &shutdown)
    };
    let mut summary = match result {
        Ok(s) => s,
        Err(e) => return fail(exit::FAILURES, &e),
    };
    if !watching {
        summary.interrupted_by = shutdown.signal();
    }
    if let Err(e) = summary.print(&cfg) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return fail(exit::FAILURES, &e.into());
        }
    }
    match shutdown.signal() {
        // A daemon asked to stop that drained cleanly has done its job.
        Some(_) if watching => ExitCode::from(exit::SUCCESS),
        Some(sig) => exit::interrupted(sig),
        None if summary.failed > 0 => ExitCode::from(exit::FAILURES),
        None => ExitCode::from(exit::SUCCESS),
    }
}

/// `watch --config`: several pipelines under the service supervisor.
fn run_service(args: &filepipe::cli::WatchArgs, quiet: bool, verbosity: i8) -> ExitCode {
    let Some(path) = args.config.as_deref() else {
        return ExitCode::from(exit::USAGE);
    };
    let loaded = service::Overrides::from_args(args)
        .and_then(|o| service::load(path, &o, quiet, true).map(|s| (o, s)));
    let (overrides, svc) = match loaded {
        Ok(x) => x,
        Err(e) => return fail(exit::USAGE, &e),
    };
    if let Err(e) = logging::init(verbosity, svc.failure_log.as_deref()) {
        return fail(exit::USAGE, &e);
    }
    let shutdown = match signals::install() {
        Ok(s) => s,
        Err(e) => return fail(exit::FAILURES, &e),
    };
    match service::run(path, &overrides, svc, &shutdown, quiet) {
        Ok(summaries) => {
            // A signal is how a daemon is meant to stop: no "interrupted" note in the journal.
            for (cfg, summary) in summaries {
                let _ = summary.print(&cfg);
            }
            ExitCode::from(exit::SUCCESS)
        }
        Err(e) => fail(exit::FAILURES, &e),
    }
}

fn fail(code: u8, e: &anyhow::Error) -> ExitCode {
    eprintln!("filepipe: error: {e:#}");
    ExitCode::from(code)
}
