//! The command line, end to end: parse, configure, run, map the result to an exit code.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::{exit, logging, service, signals, state, status, verify};

/// Runs the command the arguments name and says how it ended.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbosity = if cli.quiet {
        -1
    } else {
        cli.verbose.min(3) as i8
    };
    match cli.command {
        Command::Batch(args) => {
            // `--queue` alone: the URL from FILEPIPE_QUEUE; a usage error if it is not set.
            #[cfg(feature = "cluster")]
            let url = match crate::config::queue_url(args.queue.as_ref()) {
                Ok(url) => url,
                Err(e) => return fail(exit::USAGE, &e),
            };
            #[cfg(feature = "cluster")]
            let queue = url.map(|url| {
                let c = &args.coordinator;
                let name = c.root_name.clone().unwrap_or_else(|| {
                    crate::config::default_root_name(&args.dir.canonicalize().unwrap_or_default())
                });
                let queue = crate::cluster::Queue {
                    url,
                    creds: c.creds.clone(),
                    tls_ca: c.tls_ca.clone(),
                };
                (
                    queue,
                    name,
                    c.out_root_name.clone(),
                    crate::config::MoveNames::given(c),
                )
            });
            #[cfg(not(feature = "cluster"))]
            let queue = None;
            run_batch(Config::from_batch(&args, cli.quiet), queue, verbosity)
        }
        Command::Watch(args) => run_watch(&args, cli.quiet, verbosity),
        Command::CheckConfig(args) => match service::check(&args.file) {
            Ok(checked) => {
                let mut line = format!("{}: ok", args.file.display());
                if checked.pipelines > 0 {
                    line += &format!(", {} pipelines", checked.pipelines);
                }
                if let Some(w) = &checked.worker {
                    let mut roots: Vec<&str> = w.roots.keys().map(String::as_str).collect();
                    roots.sort_unstable();
                    line += &format!(", a worker for roots {}", roots.join(" "));
                    if w.url.is_empty() {
                        line += " (queue from --queue or FILEPIPE_QUEUE)";
                    }
                }
                line.push('\n');
                written(
                    std::io::stdout().lock().write_all(line.as_bytes()),
                    exit::SUCCESS,
                )
            }
            Err(e) => fail(exit::USAGE, &e),
        },
        #[cfg(feature = "cluster")]
        Command::Status(crate::cli::StatusArgs {
            queue: Some(url),
            creds,
            tls_ca,
            ..
        }) => {
            let url = match crate::config::queue_url(Some(&url)) {
                Ok(url) => url.unwrap_or_default(),
                Err(e) => return fail(exit::USAGE, &e),
            };
            let queue = crate::cluster::Queue { url, creds, tls_ca };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match crate::cluster::status(&queue, &mut out) {
                Ok(()) => written(out.flush(), exit::SUCCESS),
                Err(e) => fail(exit::USAGE, &e),
            }
        }
        #[cfg(feature = "cluster")]
        Command::Worker(args) => run_worker(&args, verbosity),
        Command::Completions(args) => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            crate::docs::completions(args.shell, &mut out);
            written(out.flush(), exit::SUCCESS)
        }
        Command::Man => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let wrote = crate::docs::man(&mut out).and_then(|()| out.flush());
            written(wrote, exit::SUCCESS)
        }
        Command::Status(args) => {
            let dir = args.state.unwrap_or_else(state::default_dir);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match status::print(&dir, args.failed, &mut out) {
                Ok(()) => written(out.flush(), exit::SUCCESS),
                // What could not be written: a reader gone (`| head`) is no error.
                Err(e) if e.downcast_ref::<status::Writing>().is_some() => {
                    match e.root_cause().downcast_ref::<std::io::Error>() {
                        Some(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
                            ExitCode::from(exit::SUCCESS)
                        }
                        _ => fail(exit::FAILURES, &e),
                    }
                }
                // A state missing, unreadable or not filepipe's: nothing to show, whatever the
                // reason (a state this user may not read said 1, a missing one 2: found by a
                // review).
                Err(e) => fail(exit::USAGE, &e),
            }
        }
        Command::Verify(args) => {
            if let Err(e) = logging::init(verbosity, None) {
                return fail(exit::USAGE, &e);
            }
            let jobs = args
                .jobs
                .map_or_else(crate::config::default_jobs, usize::from);
            let opts = verify::Options {
                target: args.target,
                jobs,
                algo: args.algo,
                root: args.root,
                exclude: args.exclude,
                state: args.state,
                json: args.json,
                quiet: cli.quiet,
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match verify::run(&opts, &mut out) {
                Err(e @ verify::Error::Setup(_)) => fail(exit::USAGE, &e.into()),
                Err(e @ verify::Error::Output(_)) => fail(exit::FAILURES, &e.into()),
                Ok(r) => ExitCode::from(r.exit_code()),
            }
        }
        #[cfg(feature = "demos")]
        Command::Demo(args) => match crate::demo::run(&args, cli.quiet) {
            Ok(code) => code,
            Err(e) => fail(exit::FAILURES, &e),
        },
    }
}

/// What a batch is coordinated through, in cluster mode: the queue and the root's name.
#[cfg(feature = "cluster")]
type Coordinated = Option<(
    crate::cluster::Queue,
    String,
    Option<String>,
    crate::config::MoveNames,
)>;
#[cfg(not(feature = "cluster"))]
type Coordinated = Option<std::convert::Infallible>;

/// A one-shot batch over one tree, here or (`queue`) through a cluster's queue.
fn run_batch(cfg: anyhow::Result<Config>, queue: Coordinated, verbosity: i8) -> ExitCode {
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
    let ran = match queue {
        #[cfg(feature = "cluster")]
        Some((queue, root, out, moves)) => {
            crate::cluster::coordinate(&cfg, &queue, (&root, out.as_deref()), &moves, &shutdown)
        }
        #[cfg(not(feature = "cluster"))]
        Some(never) => match never {},
        None => crate::run::batch(&cfg, &shutdown),
    };
    let mut summary = match ran {
        Ok(s) => s,
        #[cfg(feature = "cluster")]
        Err(e) if e.downcast_ref::<crate::cluster::Unreachable>().is_some() => {
            return fail(exit::USAGE, &e);
        }
        Err(e) => {
            // Stopped by a failed manifest write: the account of the files is still given.
            if let Some(stopped) = e.downcast_ref::<crate::report::Stopped>() {
                let _ = stopped.summary.print(&cfg);
            }
            return fail(exit::FAILURES, &e);
        }
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

/// `watch DIR` (one pipeline from the command line) or `watch --config FILE` (one per
/// `[[watch]]` table): both under the service supervisor, so both speak sd_notify.
fn run_watch(args: &crate::cli::WatchArgs, quiet: bool, verbosity: i8) -> ExitCode {
    let loaded = match args.config.as_deref() {
        Some(path) => service::Overrides::from_args(args)
            .and_then(|o| service::load(path, &o, quiet, true).map(|s| (o, s))),
        None => Config::from_watch(args, quiet).map(|cfg| {
            let failure_log = cfg.failure_log.clone();
            let svc = service::Service {
                pipelines: vec![cfg],
                failure_log,
                metrics: args.metrics,
            };
            (service::Overrides::default(), svc)
        }),
    };
    let (overrides, svc) = match loaded {
        Ok(x) => x,
        Err(e) => return fail(exit::USAGE, &e),
    };
    if let Err(e) = logging::init(verbosity, svc.failure_log.as_deref()) {
        return fail(exit::USAGE, &e);
    }
    if let Some(addr) = svc.metrics {
        if let Err(e) = crate::report::metrics::serve(addr) {
            return fail(exit::USAGE, &e);
        }
    }
    let shutdown = match signals::install() {
        Ok(s) => s,
        Err(e) => return fail(exit::FAILURES, &e),
    };
    match service::run(args.config.as_deref(), &overrides, svc, &shutdown, quiet) {
        Ok(summaries) => {
            for (cfg, summary) in summaries {
                if let Err(e) = summary.print(&cfg) {
                    if e.kind() != std::io::ErrorKind::BrokenPipe {
                        return fail(exit::FAILURES, &e.into());
                    }
                }
            }
            // A signal is how a daemon is meant to stop: a clean drain is success.
            ExitCode::from(exit::SUCCESS)
        }
        // A queue that cannot be reached or set up at start (watch --queue): a usage error,
        // which the units do not restart on (RestartPreventExitStatus=2).
        #[cfg(feature = "cluster")]
        Err(e)
            if e.chain()
                .any(|c| c.downcast_ref::<crate::cluster::Unreachable>().is_some()) =>
        {
            fail(exit::USAGE, &e)
        }
        Err(e) => {
            // Stopped by a failed state or manifest write: the account of what was done is
            // still given, as `batch` gives it.
            if let Some(stopped) = e.downcast_ref::<crate::report::Stopped>() {
                if let Some(cfg) = &stopped.cfg {
                    let _ = stopped.summary.print(cfg);
                }
            }
            fail(exit::FAILURES, &e)
        }
    }
}

/// `code`, unless writing the output failed: a closed pipe (`| head`) is the reader's choice,
/// any other failure (a full disk) means nobody saw the result.
fn written(result: std::io::Result<()>, code: u8) -> ExitCode {
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => fail(
            exit::FAILURES,
            &anyhow::Error::new(e).context("writing to stdout"),
        ),
        _ => ExitCode::from(code),
    }
}

fn fail(code: u8, e: &anyhow::Error) -> ExitCode {
    crate::logging::say!("filepipe: error: {}", crate::error::chain(e));
    if crate::state::damaged(e) {
        crate::logging::say!(
            "filepipe: the state database is damaged; filepipe leaves it as it is (it may hold \
             the only record of what was done): move filepipe.sqlite (and any \
             filepipe.sqlite-wal, -shm) aside, or give another --state, and the next run reads \
             every file again"
        );
    }
    ExitCode::from(code)
}

/// `filepipe worker`: until SIGINT/SIGTERM.
#[cfg(feature = "cluster")]
fn run_worker(args: &crate::cli::WorkerArgs, verbosity: i8) -> ExitCode {
    use crate::config::{WorkerConfig, WorkerSettings};
    // The file's settings, with the flags (and FILEPIPE_QUEUE) over them.
    let mut url_overridden = false;
    let settings = WorkerSettings::from_args(args).and_then(|flags| match &args.config {
        Some(path) => {
            let file = service::load_worker(path)?;
            url_overridden = file.url.is_some() && flags.url.is_some();
            Ok(file.overridden_by(flags))
        }
        None => Ok(flags),
    });
    let cfg = match settings.and_then(|s| WorkerConfig::resolve(s, true)) {
        Ok(cfg) => cfg,
        Err(e) => return fail(exit::USAGE, &e),
    };
    // A worker is a service: what it does (connected, each pipeline) is said at info by
    // default. -q still means errors only (found by review r55: it was ignored).
    let verbosity = if verbosity < 0 {
        verbosity
    } else {
        verbosity.max(1)
    };
    if let Err(e) = logging::init(verbosity, cfg.failure_log.as_deref()) {
        return fail(exit::USAGE, &e);
    }
    if url_overridden {
        // Said, because an exported FILEPIPE_QUEUE is easy to forget in a shell.
        tracing::warn!(
            queue = %crate::secret::shown_url(&cfg.url),
            "the queue's URL from --queue or FILEPIPE_QUEUE overrides the config file's"
        );
    }
    if let Some(addr) = cfg.metrics {
        if let Err(e) = crate::report::metrics::serve(addr) {
            return fail(exit::USAGE, &e);
        }
    }
    let shutdown = match signals::install() {
        Ok(s) => s,
        Err(e) => return fail(exit::FAILURES, &e),
    };
    match crate::cluster::work(&cfg, &shutdown) {
        // A signal is how a worker is meant to stop.
        Ok(()) => ExitCode::from(exit::SUCCESS),
        Err(e) if e.downcast_ref::<crate::cluster::Unreachable>().is_some() => {
            fail(exit::USAGE, &e)
        }
        Err(e) => fail(exit::FAILURES, &e),
    }
}
