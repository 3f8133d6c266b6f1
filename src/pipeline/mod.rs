//! The pipeline: a source feeds a bounded channel, a pool of workers drains it, one reporter
//! takes every outcome.
//!
//! Invariants: the job channel holds at most `queue_depth` messages of at most `BATCH_FILES`
//! jobs, so memory is bounded whatever the tree size; when the source ends (or a shutdown is
//! requested) it sends exactly one `Msg::Shutdown` per worker, and a worker returns on its
//! sentinel, so the pool drains without a shared "done" flag; every job produces exactly one
//! `Outcome`, so counts always add up.
//!
//! Ops whose publish waits on the disk (gzip's fsyncs) hand verified results to a few publisher
//! threads, so workers keep the CPUs busy while outputs are made durable. A publisher takes
//! every result that is ready (up to `group_max`) and publishes them as one group, so they share
//! the disk's flushes; each file of a group is reported only once it is durable.
//!
//! Jobs and outcomes travel in small batches: with one message per file, channel hand-offs
//! (futex wake-ups and crossbeam's yielding back-off) cost more CPU than hashing 16 KiB files.
//! A batch is capped in files and bytes, and a large file travels alone, so workers stay
//! evenly loaded to the end of the run; a walk that takes no stamps fills its batches by count,
//! and the worker that opens a large file in one gives up the jobs after it (`intake`).

mod intake;
mod publish;
mod worker;

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use crossbeam_channel::bounded;

use crate::cli::OpKind;
use crate::config::Config;
use crate::ops::compress::CompressOp;
use crate::ops::gzip::Gzip;
use crate::ops::hash::HashOp;
use crate::ops::multi::MultiOp;
use crate::ops::zstd::Zstd;
use crate::ops::Op;
use crate::report::{self, Summary};
use crate::signals::Shutdown;
use crate::sink::Sink;
use crate::source::{Outlet, Source};
use crate::travel::{Event, Msg, Recorded, Stats};

use intake::Intake;
use publish::{publisher_loop, Ready};
use worker::{worker_loop, Stage};

/// Most results a publisher makes durable together in a batch run, where the open-file limit
/// allows (see `group_max`): a group's journal commits cost about the same for 256 files as
/// for one, and on a journaled ext4 groups of 256 took 13% less time than groups of 64 over
/// 8,000 small files.
const GROUP_MAX: usize = 256;

/// The same in watch mode, where one process may run a pipeline per `[[watch]]` table, each
/// with its groups' descriptors: as before groups could grow.
const WATCH_GROUP_MAX: usize = 64;

/// Descriptors left for everything but the groups: the workers' inputs, temps and
/// directories, the walk's directories, the state, the logs.
const OTHER_FDS: u64 = 256;

/// How many pipelines share this process's descriptors (a service's `[[watch]]` tables; one
/// otherwise): each budgets its groups for its share of the limit (`group_max`).
static SHARES: AtomicUsize = AtomicUsize::new(1);

/// Says that `n` pipelines will run side by side from now on (the service, at start and at
/// each reload): the ones started next budget their groups for a share each. Each pipeline
/// budgeted for the whole limit, so several under load ran out of descriptors: thousands
/// of EMFILE retries, and a file still failing after its retries failed for good (found by a
/// review).
pub(crate) fn share_descriptors(n: usize) {
    SHARES.store(n.max(1), Ordering::Relaxed);
}

/// How many results a group may hold in this run. Each holds up to three descriptors (its
/// input, its temp, and its output directory when that differs from its neighbours') from the
/// ready channel, which holds a group's worth, until its publisher is done, and each of the
/// two publishers holds a group: three groups must fit under the open-file limit. Its soft
/// value is raised towards the hard one if need be (as most tools that open many files do; it
/// only concerns this process). At the usual soft limit of 1024, where that cannot be raised,
/// groups hold up to 85.
fn group_max(cfg: &Config) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let most = if cfg.watch.is_some() {
        WATCH_GROUP_MAX
    } else {
        GROUP_MAX
    };
    let per_slot = 3 * (PUBLISHERS as u64 + 1);
    let shares = SHARES.load(Ordering::Relaxed) as u64;
    let want = (OTHER_FDS + per_slot * most as u64) * shares;
    let lim = getrlimit(Resource::Nofile);
    let mut soft = lim.current.unwrap_or(u64::MAX);
    if soft < want {
        let raised = lim.maximum.map_or(want, |hard| hard.min(want));
        let new = Rlimit {
            current: Some(raised),
            maximum: lim.maximum,
        };
        if raised > soft && setrlimit(Resource::Nofile, new).is_ok() {
            soft = raised;
        }
    }
    ((soft / shares).saturating_sub(OTHER_FDS) / per_slot).clamp(1, most as u64) as usize
}

/// Publisher threads for ops with `DEFER_PUBLISH`. Two: while one waits for the disk, the
/// other gathers what the workers finished meanwhile into the next group. More would split
/// the ready results into smaller groups, each paying its own commits.
const PUBLISHERS: usize = 2;

/// Runs `cfg`'s operation on every job `source` sends, recording the outcomes in `sink`, until
/// the source is done and every job is accounted for; returns the summary. `stats` is shared
/// with whoever reports on a long-running pipeline (the service supervisor).
pub(crate) fn run(
    cfg: &Config,
    shutdown: &Shutdown,
    source: &mut dyn Source,
    sink: &mut (dyn Sink + Send),
    stats: &Stats,
) -> Result<Summary> {
    let spec = &cfg.spec;
    let (hashes, name) = (spec.hashes(), spec.canonical());
    match spec.compressor() {
        Some(OpKind::Gzip) if hashes.is_empty() => {
            let op = CompressOp::<Gzip>::new(cfg)?;
            run_with(cfg, &op, shutdown, source, sink, stats)
        }
        Some(OpKind::Zstd) if hashes.is_empty() => {
            let op = CompressOp::<Zstd>::new(cfg)?;
            run_with(cfg, &op, shutdown, source, sink, stats)
        }
        Some(OpKind::Gzip) => {
            let op = MultiOp::new(CompressOp::<Gzip>::new(cfg)?, hashes, name);
            run_with(cfg, &op, shutdown, source, sink, stats)
        }
        Some(OpKind::Zstd) => {
            let op = MultiOp::new(CompressOp::<Zstd>::new(cfg)?, hashes, name);
            run_with(cfg, &op, shutdown, source, sink, stats)
        }
        Some(other) => anyhow::bail!("{} is not a compressor", other.as_str()),
        None => {
            let op =
                HashOp::several(hashes, name, cfg.jobs).context("starting the hash threads")?;
            run_with(cfg, &op, shutdown, source, sink, stats)
        }
    }
}

/// What a batch whose walk failed says of its manifest: none is written from part of the
/// tree (`Sink::abandon`).
fn with_what_was_left(cfg: &Config, e: anyhow::Error) -> anyhow::Error {
    match report::no_manifest(cfg) {
        None => e.context("the run stopped before it saw the whole tree"),
        Some(said) => e.context(format!(
            "the run stopped before it saw the whole tree: {said}"
        )),
    }
}

/// How many messages the job channel holds.
fn queue_depth(cfg: &Config) -> usize {
    if cfg.watch.is_some() {
        // The watcher also tends to events and commits, and when the workers and the reporter
        // hold every core it can wait a scheduler slice or two for one: 16 batches per worker
        // (about 10 ms of small files; batches hold at most BATCH_BYTES or one larger file)
        // keep the workers fed meanwhile. With 2, the workers waited for jobs 30% of a
        // 100,000-file burst on two cores; with 16, 3%.
        16 * cfg.jobs
    } else {
        // Twice the workers: enough that no worker waits on the walker, few enough that an
        // interrupt has little queued work to account for.
        2 * cfg.jobs
    }
}

fn run_with<O: Op>(
    cfg: &Config,
    op: &O,
    shutdown: &Shutdown,
    source: &mut dyn Source,
    sink: &mut (dyn Sink + Send),
    stats: &Stats,
) -> Result<Summary> {
    let (job_tx, job_rx) = bounded::<Msg>(queue_depth(cfg));
    let (event_tx, event_rx) = bounded::<Event>(1024);
    let workers = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.jobs)
        .thread_name(|i| format!("filepipe-worker-{i}"))
        .build()
        .with_context(|| {
            format!(
                "starting {} worker threads (lower --jobs, or raise the limit on processes: \
                 ulimit -u)",
                cfg.jobs
            )
        })?;
    // Jobs the workers have taken from the channel (in batches) and not yet started: with the
    // channel's, the work still to come, which publishers wait for (see GROUP_LINGER).
    let unstarted = &AtomicUsize::new(0);
    // Recorded outcomes go back to a source that listens, once the sink has flushed them.
    let (recorded_tx, recorded_rx) = if source.listens() {
        let (tx, rx) = crossbeam_channel::unbounded::<Vec<Recorded>>();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    // Raised by the source's thread when the source fails (or panics), or stops on a request,
    // before its sender of events goes: the reporter, which finishes the sink only once every
    // sender is gone, then abandons it instead where the run saw part of the tree (a failure;
    // a sink's failure that cut it short), so that part never stands for the whole of it.
    let source_end = &report::SourceEnd::default();
    // A batch's walk: its failure is told with the account of what was done, and of the
    // manifest. (A watcher's or a queue's error goes up as it is: callers match on it.)
    let walks_tree = cfg.watch.is_none() && !source.listens();
    std::thread::scope(|s| {
        let reporter = std::thread::Builder::new()
            .name("filepipe-reporter".into())
            .spawn_scoped(s, || {
                report::run(
                    cfg,
                    op.name(),
                    event_rx,
                    stats,
                    sink,
                    recorded_tx,
                    shutdown,
                    source_end,
                )
            })
            .context("starting the reporter")?;
        let walker = {
            let events = event_tx.clone();
            std::thread::Builder::new()
                .name("filepipe-source".into())
                .spawn_scoped(s, move || {
                    let out = Outlet {
                        jobs: &job_tx,
                        events: &events,
                        stats,
                        recorded: recorded_rx,
                    };
                    let walked = panic::catch_unwind(AssertUnwindSafe(|| source.run(out)));
                    if !matches!(walked, Ok(Ok(()))) {
                        source_end.failed.store(true, Ordering::SeqCst);
                    } else if shutdown.requested() {
                        // Stopped, maybe before the end of the tree (or just after it: taken
                        // for short, which only costs a manifest left as it was).
                        source_end.cut.store(true, Ordering::SeqCst);
                    }
                    // Sentinels go out even if the walk panicked, or the workers would wait
                    // forever. Sending cannot fail: workers hold the receiver until their own.
                    for _ in 0..cfg.jobs {
                        let _ = job_tx.send(Msg::Shutdown);
                    }
                    walked.unwrap_or_else(|p| panic::resume_unwind(p))
                })
                .context("starting the source")?
        };
        // Publishers block in fsync, not on the CPU, and workers must not wait for them: the
        // channel holds a full group, what workers finish during one group's commits.
        let group_max = group_max(cfg);
        let (ready_tx, ready_rx) = bounded::<Ready<O::Pending>>(group_max);
        let publishers = if O::DEFER_PUBLISH {
            (0..PUBLISHERS)
                .map(|i| {
                    let (ready_rx, events) = (ready_rx.clone(), event_tx.clone());
                    let backlog = || !job_rx.is_empty() || unstarted.load(Ordering::Relaxed) > 0;
                    std::thread::Builder::new()
                        .name(format!("filepipe-publish-{i}"))
                        .spawn_scoped(s, move || {
                            publisher_loop(op, &ready_rx, &events, group_max, &backlog)
                        })
                        .context("starting a publisher")
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        drop(ready_rx);
        let stage = Stage {
            publishers: O::DEFER_PUBLISH.then_some(&ready_tx),
            events: &event_tx,
        };
        let intake = Intake::new(&job_rx, unstarted, cfg.jobs);
        // One long-lived loop per pool thread, each stopping after its own sentinel.
        workers.broadcast(|ctx| worker_loop(ctx.index(), cfg, op, &intake, &stage, shutdown));
        // Every worker is done: publishers drain what is left, then see the channel close.
        drop(ready_tx);
        let published = publishers.into_iter().map(|p| p.join()).all(|r| r.is_ok());
        drop(event_tx);
        let walked = walker.join();
        let summary = reporter.join();
        let (Ok(walked), true) = (walked, published) else {
            anyhow::bail!("the source or a publisher thread panicked");
        };
        let summary = summary.map_err(|_| anyhow::anyhow!("the reporter thread panicked"))?;
        match (walked, summary) {
            (Ok(()), summary) => summary,
            (Err(e), _) if !walks_tree => Err(e),
            // The account of what was done is still given, with what stopped the run.
            (Err(e), Ok(mut summary)) => {
                let e = with_what_was_left(cfg, e);
                summary.error = Some(format!("{e:#}"));
                Err(report::Stopped {
                    error: e,
                    summary: Box::new(summary),
                    cfg: None,
                }
                .into())
            }
            // The sink failed too (logged as it did): the source's error is the cause.
            (Err(e), Err(_)) => Err(with_what_was_left(cfg, e)),
        }
    })
}
