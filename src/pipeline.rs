//! The pipeline: a source feeds a bounded channel, a pool of workers drains it, one reporter
//! takes every outcome.
//!
//! Invariants: the job channel holds at most `2 × jobs` messages of at most `BATCH_FILES` jobs,
//! so memory is bounded whatever the tree size; when the source ends (or a shutdown is
//! requested) it sends exactly one `Msg::Shutdown` per worker, and a worker returns on its
//! sentinel, so the pool drains without a shared "done" flag; every job produces exactly one
//! `Outcome`, so counts always add up.
//!
//! Jobs and outcomes travel in small batches: with one message per file, channel hand-offs
//! (futex wake-ups and crossbeam's yielding back-off) cost more CPU than hashing 16 KiB files.
//! A batch is capped in files and bytes, and a large file travels alone, so workers stay
//! evenly loaded to the end of the run.

use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::cli::OpKind;
use crate::config::Config;
use crate::error::{FileError, Kind};
use crate::input::{InputFile, OpenError};
use crate::ops::gzip::GzipOp;
use crate::ops::sha256::Sha256Op;
use crate::ops::{Done, Op};
use crate::report::{self, Summary};
use crate::signals::Shutdown;
use crate::walk;

/// One file to process.
#[derive(Debug, Clone)]
pub struct Job {
    /// Absolute path (the canonical root joined with `rel`).
    pub abs: PathBuf,
    /// Path relative to the root: what the manifest and logs show.
    pub rel: PathBuf,
}

/// Most jobs in one message.
pub const BATCH_FILES: usize = 64;
/// Most input bytes in one message; a larger file is sent on its own.
pub const BATCH_BYTES: u64 = 4 << 20;

/// What travels from a source to the workers.
#[derive(Debug)]
pub enum Msg {
    /// Process these files, in order.
    Jobs(Vec<Job>),
    /// Sentinel: the receiving worker stops. Exactly one is sent per worker.
    Shutdown,
}

/// How one file ended.
#[derive(Debug)]
pub enum Outcome {
    /// Processed and published.
    Done {
        /// The file, relative to the root.
        rel: PathBuf,
        /// What was produced.
        done: Done,
    },
    /// Deliberately left alone, with the reason.
    Skipped {
        /// The file, relative to the root.
        rel: PathBuf,
        /// Why.
        reason: FileError,
    },
    /// Could not be processed.
    Failed {
        /// The file, relative to the root.
        rel: PathBuf,
        /// What went wrong.
        error: FileError,
    },
}

/// What the reporter hears.
#[derive(Debug)]
pub enum Event {
    /// A worker started on a file (only sent when progress is shown).
    Started {
        /// Which worker.
        worker: usize,
        /// The file.
        rel: PathBuf,
    },
    /// Files are finished, one way or another.
    Finished(Vec<Outcome>),
}

/// How many times a file that changed while being read is attempted in all.
const ATTEMPTS: u32 = 3;

/// Runs a batch over `cfg.root` and returns the summary once every file is accounted for.
pub fn run_batch(cfg: &Config, shutdown: &Shutdown) -> Result<Summary> {
    match cfg.op {
        OpKind::Gzip => run(cfg, &GzipOp::new(cfg)?, shutdown),
        OpKind::Sha256 => run(cfg, &Sha256Op, shutdown),
    }
}

fn run<O: Op>(cfg: &Config, op: &O, shutdown: &Shutdown) -> Result<Summary> {
    // Twice the workers: enough that no worker waits on the walker, few enough that an
    // interrupt has little queued work to account for.
    let (job_tx, job_rx) = bounded::<Msg>(2 * cfg.jobs);
    let (event_tx, event_rx) = bounded::<Event>(1024);
    let stats = walk::Stats::default();
    let workers = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.jobs)
        .thread_name(|i| format!("filepipe-worker-{i}"))
        .build()
        .context("starting the worker pool")?;
    std::thread::scope(|s| {
        let reporter = std::thread::Builder::new()
            .name("filepipe-reporter".into())
            .spawn_scoped(s, || report::run(cfg, op.name(), event_rx, &stats))
            .context("starting the reporter")?;
        let walker = {
            let events = event_tx.clone();
            let stats = &stats;
            std::thread::Builder::new()
                .name("filepipe-walker".into())
                .spawn_scoped(s, move || {
                    let walked = panic::catch_unwind(AssertUnwindSafe(|| {
                        walk::walk(cfg, &job_tx, &events, stats, shutdown)
                    }));
                    // Sentinels go out even if the walk panicked, or the workers would wait
                    // forever. Sending cannot fail: workers hold the receiver until their own.
                    for _ in 0..cfg.jobs {
                        let _ = job_tx.send(Msg::Shutdown);
                    }
                    if let Err(p) = walked {
                        panic::resume_unwind(p);
                    }
                })
                .context("starting the walker")?
        };
        // One long-lived loop per pool thread, each stopping at its own sentinel.
        workers.broadcast(|ctx| worker_loop(ctx.index(), cfg, op, &job_rx, &event_tx, shutdown));
        drop(event_tx);
        let walked = walker.join();
        let summary = reporter.join();
        if walked.is_err() {
            anyhow::bail!("the walker thread panicked");
        }
        summary.map_err(|_| anyhow::anyhow!("the reporter thread panicked"))?
    })
}

/// A worker: takes jobs until its sentinel, sends one outcome per job.
fn worker_loop<O: Op>(
    index: usize,
    cfg: &Config,
    op: &O,
    jobs: &Receiver<Msg>,
    events: &Sender<Event>,
    shutdown: &Shutdown,
) {
    let mut scratch = op.scratch();
    while let Ok(Msg::Jobs(batch)) = jobs.recv() {
        let mut outcomes = Vec::with_capacity(batch.len());
        for job in batch {
            outcomes.push(run_job(index, cfg, op, job, events, shutdown, &mut scratch));
        }
        if events.send(Event::Finished(outcomes)).is_err() {
            return;
        }
    }
}

fn run_job<O: Op>(
    index: usize,
    cfg: &Config,
    op: &O,
    job: Job,
    events: &Sender<Event>,
    shutdown: &Shutdown,
    scratch: &mut O::Scratch,
) -> Outcome {
    {
        if shutdown.requested() {
            // Queued but not started: account for it, but do not start new work.
            Outcome::Skipped {
                rel: job.rel,
                reason: FileError::new(Kind::Interrupted, "not started: shutting down"),
            }
        } else {
            if cfg.progress {
                let _ = events.send(Event::Started {
                    worker: index,
                    rel: job.rel.clone(),
                });
            }
            // A bug in an op must cost one file, not the run.
            panic::catch_unwind(AssertUnwindSafe(|| process(cfg, op, &job, scratch)))
                .unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Outcome::Failed {
                        rel: job.rel.clone(),
                        error: FileError::new(Kind::Internal, format!("panic: {msg}")),
                    }
                })
        }
    }
}

/// The per-file protocol: open safely, check, read, verify the input did not change, publish.
pub fn process<O: Op>(cfg: &Config, op: &O, job: &Job, scratch: &mut O::Scratch) -> Outcome {
    let rel = job.rel.clone();
    let failed = |error| Outcome::Failed {
        rel: job.rel.clone(),
        error,
    };
    let mut input = match InputFile::open(&job.abs, cfg.follow_symlinks) {
        Ok(f) => f,
        Err(OpenError::NotRegular(what)) => {
            let kind = if what == "symlink" {
                Kind::Symlink
            } else {
                Kind::SpecialFile
            };
            return Outcome::Skipped {
                rel,
                reason: FileError::new(kind, format!("not a regular file ({what})")),
            };
        }
        Err(OpenError::Failed(e)) => return failed(e),
    };
    match op.check(job, &input, scratch) {
        Ok(None) => {}
        Ok(Some(reason)) => return Outcome::Skipped { rel, reason },
        Err(e) => return failed(e),
    }
    let mut attempt = 1;
    loop {
        let pending = match op.read(job, &mut input, scratch) {
            Ok(p) => p,
            Err(e) => return failed(e),
        };
        match input.finish() {
            Ok(()) => {
                return match op.publish(job, &input, pending, scratch) {
                    Ok(done) => Outcome::Done { rel, done },
                    Err(e) => failed(e),
                }
            }
            Err(mut e) if attempt >= ATTEMPTS => {
                e.message = format!("{} (gave up after {ATTEMPTS} attempts)", e.message);
                return failed(e);
            }
            Err(_) => {
                drop(pending);
                // Give a writer that is mid-way a moment to finish before looking again.
                std::thread::sleep(Duration::from_millis(100 << attempt));
                attempt += 1;
                if let Err(e) = input.restart() {
                    return failed(e);
                }
            }
        }
    }
}
