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
//! evenly loaded to the end of the run.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError};

use crate::cli::OpKind;
use crate::config::Config;
use crate::error::{FileError, Kind};
use crate::input::{self, InputFile, NotRegular, OpenError};
use crate::ops::gzip::GzipOp;
use crate::ops::sha256::Sha256Op;
use crate::ops::Op;
use crate::report::{self, ManifestSink, Sink, Summary};
use crate::signals::{self, Shutdown};
use crate::state::Stamp;
use crate::travel::{Done, Event, Job, Msg, Outcome, Stats};
use crate::walk;

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
    let want = OTHER_FDS + per_slot * most as u64;
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
    (soft.saturating_sub(OTHER_FDS) / per_slot).clamp(1, most as u64) as usize
}

/// How long a publisher waits for more results to join its group while the workers have jobs
/// queued: a group's flushes cost about the same for one file as for 256, so under load a group
/// is worth filling (without waiting, groups hold what the workers finish during one flush, a
/// few files). With nothing queued (a watch daemon between files, the end of a batch) it never
/// waits, so a lone file is published at once.
const GROUP_LINGER: Duration = Duration::from_millis(32);

/// Publisher threads for ops with `DEFER_PUBLISH`. Two: while one waits for the disk, the
/// other gathers what the workers finished meanwhile into the next group. More would split
/// the ready results into smaller groups, each paying its own commits.
const PUBLISHERS: usize = 2;

/// How many times a file that changed while being read is attempted in all.
const ATTEMPTS: u32 = 3;

/// A source of jobs: the batch walker or the watcher. It sends jobs (and outcomes of what it
/// skips itself) until it is exhausted or a shutdown is requested; the pipeline then sends the
/// sentinels. An error ends the run after the drain.
pub type Source<'a> = dyn Fn(&Sender<Msg>, &Sender<Event>, &Stats) -> Result<()> + Sync + 'a;

/// Runs a batch over `cfg.root` and returns the summary once every file is accounted for.
pub fn run_batch(cfg: &Config, shutdown: &Shutdown) -> Result<Summary> {
    let walker = |jobs: &Sender<Msg>, events: &Sender<Event>, stats: &Stats| {
        walk::walk(cfg, jobs, events, stats, shutdown);
        Ok(())
    };
    let stats = Stats::default();
    run_op(cfg, shutdown, &walker, &mut ManifestSink::new(cfg), &stats)
}

/// Runs the pipeline with `cfg`'s operation between `source` and `sink`.
pub fn run_op(
    cfg: &Config,
    shutdown: &Shutdown,
    source: &Source<'_>,
    sink: &mut (dyn Sink + Send),
    stats: &Stats,
) -> Result<Summary> {
    match cfg.op {
        OpKind::Gzip => run(cfg, &GzipOp::new(cfg)?, shutdown, source, sink, stats),
        OpKind::Sha256 => run(cfg, &Sha256Op, shutdown, source, sink, stats),
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

fn run<O: Op>(
    cfg: &Config,
    op: &O,
    shutdown: &Shutdown,
    source: &Source<'_>,
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
    std::thread::scope(|s| {
        let reporter = std::thread::Builder::new()
            .name("filepipe-reporter".into())
            .spawn_scoped(s, || {
                report::run(cfg, op.name(), event_rx, stats, sink, shutdown)
            })
            .context("starting the reporter")?;
        let walker = {
            let events = event_tx.clone();
            std::thread::Builder::new()
                .name("filepipe-source".into())
                .spawn_scoped(s, move || {
                    let walked =
                        panic::catch_unwind(AssertUnwindSafe(|| source(&job_tx, &events, stats)));
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
            unstarted,
        };
        // One long-lived loop per pool thread, each stopping at its own sentinel.
        workers.broadcast(|ctx| worker_loop(ctx.index(), cfg, op, &job_rx, &stage, shutdown));
        // Every worker is done: publishers drain what is left, then see the channel close.
        drop(ready_tx);
        let published = publishers.into_iter().map(|p| p.join()).all(|r| r.is_ok());
        drop(event_tx);
        let walked = walker.join();
        let summary = reporter.join();
        let (Ok(walked), true) = (walked, published) else {
            anyhow::bail!("the source or a publisher thread panicked");
        };
        let summary = summary.map_err(|_| anyhow::anyhow!("the reporter thread panicked"))??;
        walked?;
        Ok(summary)
    })
}

/// Where a worker's verified results go.
struct Stage<'a, P> {
    /// Publisher threads (ops whose publish waits on the disk), or `None` to publish inline.
    publishers: Option<&'a Sender<Ready<P>>>,
    events: &'a Sender<Event>,
    /// Jobs taken from the channel and not yet started.
    unstarted: &'a AtomicUsize,
}

/// A worker: takes jobs until its sentinel, sends one outcome per job (or hands the job to a
/// publisher, which sends it).
fn worker_loop<O: Op>(
    index: usize,
    cfg: &Config,
    op: &O,
    jobs: &Receiver<Msg>,
    stage: &Stage<'_, O::Pending>,
    shutdown: &Shutdown,
) {
    let mut scratch = op.scratch();
    // Inputs are opened beneath the root; by full path only if the root cannot be opened now
    // (the walk found it a moment ago).
    let root = input::Root::new(&cfg.root)
        .map_err(|e| tracing::warn!("opening the root: {e}; inputs are opened by full path"))
        .ok();
    let me = Worker {
        index,
        root: root.as_ref(),
    };
    while let Ok(Msg::Jobs(batch)) = jobs.recv() {
        let mut outcomes = Vec::with_capacity(batch.len());
        stage.unstarted.fetch_add(batch.len(), Ordering::Relaxed);
        for job in batch {
            stage.unstarted.fetch_sub(1, Ordering::Relaxed);
            if let Some(outcome) = run_job(cfg, op, me, job, stage, shutdown, &mut scratch) {
                outcomes.push(outcome);
            }
        }
        if !outcomes.is_empty() && stage.events.send(Event::Finished(outcomes)).is_err() {
            return;
        }
    }
}

/// A worker, as a job sees it.
#[derive(Clone, Copy)]
struct Worker<'a> {
    /// Its index, for its progress line.
    index: usize,
    /// The input root, for `InputFile::open_beneath`.
    root: Option<&'a input::Root>,
}

/// Runs one job; `None` when it was handed to a publisher, which reports it.
fn run_job<O: Op>(
    cfg: &Config,
    op: &O,
    me: Worker<'_>,
    job: Job,
    stage: &Stage<'_, O::Pending>,
    shutdown: &Shutdown,
    scratch: &mut O::Scratch,
) -> Option<Outcome> {
    if shutdown.requested() {
        // Queued but not started: account for it, but do not start new work.
        return Some(Outcome::Skipped {
            rel: job.rel,
            reason: FileError::new(Kind::Interrupted, "not started: shutting down"),
        });
    }
    if cfg.progress {
        let _ = stage.events.send(Event::Started {
            worker: me.index,
            rel: job.rel.clone(),
        });
    }
    let rel = job.rel.clone();
    // A bug in an op must cost one file, not the run.
    let prepared = guarded(&rel, || prepare(cfg, op, job, me.root, scratch));
    match (prepared, stage.publishers) {
        (Err(outcome), _) => Some(outcome),
        (Ok(ready), None) => Some(publish_guarded(op, ready)),
        (Ok(ready), Some(tx)) => match tx.send(ready) {
            Ok(()) => None,
            Err(_) => Some(Outcome::Failed {
                rel,
                error: FileError::new(Kind::Internal, "the publisher threads are gone"),
            }),
        },
    }
}

/// Runs `f`, turning a panic into a failed outcome for `rel`.
fn guarded<T>(rel: &Path, f: impl FnOnce() -> Result<T, Outcome>) -> Result<T, Outcome> {
    panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(Outcome::Failed {
            rel: rel.to_path_buf(),
            error: FileError::panicked(p.as_ref()),
        })
    })
}

/// `publish`, with a panic costing only this file.
fn publish_guarded<O: Op>(op: &O, ready: Ready<O::Pending>) -> Outcome {
    if signals::aborted() {
        return abandon(vec![ready]).remove(0);
    }
    let rel = ready.job.rel.clone();
    guarded(&rel, || Ok(publish(op, ready))).unwrap_or_else(|failed| failed)
}

/// A publisher: makes verified results durable and visible until the workers are all gone.
/// `backlog` tells whether the workers have jobs queued.
fn publisher_loop<O: Op>(
    op: &O,
    ready: &Receiver<Ready<O::Pending>>,
    events: &Sender<Event>,
    group_max: usize,
    backlog: &dyn Fn() -> bool,
) {
    while let Ok(first) = ready.recv() {
        // Whatever else is ready joins; while more work is queued, what is finished within
        // GROUP_LINGER joins too (see there). A lone file is published at once.
        let mut group = vec![first];
        let deadline = Instant::now() + GROUP_LINGER;
        while group.len() < group_max {
            match ready.try_recv() {
                Ok(r) => group.push(r),
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if !backlog() || signals::aborted() => break,
                Err(TryRecvError::Empty) => match ready.recv_deadline(deadline) {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                },
            }
        }
        if events
            .send(Event::Finished(publish_group_guarded(op, group)))
            .is_err()
        {
            return;
        }
    }
}

/// A group's files, abandoned unpublished after a second signal: their temps go as their
/// pending results drop.
fn abandon<P>(group: Vec<Ready<P>>) -> Vec<Outcome> {
    group
        .into_iter()
        .map(|r| Outcome::Skipped {
            rel: r.job.rel,
            reason: FileError::new(
                Kind::Interrupted,
                "not published: stopped by a second signal",
            ),
        })
        .collect()
}

/// `publish_group`, with a panic failing the group's files but not the run. An op's own steps
/// for one file are guarded per file (`FileError::guard`); this is for a panic in a step the
/// group shares. Some files may have been published by then: reporting them failed errs on the
/// side of redoing them.
fn publish_group_guarded<O: Op>(op: &O, group: Vec<Ready<O::Pending>>) -> Vec<Outcome> {
    if signals::aborted() {
        return abandon(group);
    }
    let rels: Vec<PathBuf> = group.iter().map(|r| r.job.rel.clone()).collect();
    panic::catch_unwind(AssertUnwindSafe(|| publish_group(op, group))).unwrap_or_else(|p| {
        let error = FileError::panicked(p.as_ref());
        rels.into_iter()
            .map(|rel| Outcome::Failed {
                rel,
                error: error.clone(),
            })
            .collect()
    })
}

/// A verified result waiting to be published: the input has been read whole and unchanged.
pub struct Ready<P> {
    /// The file.
    pub job: Job,
    /// The open input (its stat gives the output's attributes).
    pub input: InputFile,
    /// The op's pending result.
    pub pending: P,
}

/// Publishes a verified result and says how the file ended.
pub fn publish<O: Op>(op: &O, ready: Ready<O::Pending>) -> Outcome {
    let Ready {
        job,
        input,
        pending,
    } = ready;
    let result = op.publish(&job, &input, pending);
    outcome(job, &input, result)
}

/// Publishes verified results as one group and says how each file ended, in order.
pub fn publish_group<O: Op>(op: &O, group: Vec<Ready<O::Pending>>) -> Vec<Outcome> {
    let (heads, pendings): (Vec<_>, Vec<_>) = group
        .into_iter()
        .map(|r| ((r.job, r.input), r.pending))
        .unzip();
    let items = heads
        .iter()
        .zip(pendings)
        .map(|((job, input), pending)| (job, input, pending))
        .collect();
    let mut results = op.publish_group(items).into_iter();
    heads
        .into_iter()
        .map(|(job, input)| {
            let result = results.next().unwrap_or_else(|| {
                Err(FileError::new(
                    Kind::Internal,
                    "the op lost a file of its group",
                ))
            });
            outcome(job, &input, result)
        })
        .collect()
}

/// The outcome of a publish.
fn outcome(job: Job, input: &InputFile, result: Result<Done, FileError>) -> Outcome {
    match result {
        Ok(mut done) => {
            done.stamp = Some(Stamp::from_stat(&input.stat));
            Outcome::Done {
                rel: job.rel,
                done: Box::new(done),
            }
        }
        Err(e) => not_done(job.rel, e),
    }
}

/// How a file that was not done ended: skipped when nothing was wrong with it (found up to
/// date only at the publish, as when an identical output appeared meanwhile; or abandoned by a
/// second signal, to be done by the next run), failed otherwise.
fn not_done(rel: PathBuf, e: FileError) -> Outcome {
    match e.kind {
        Kind::UpToDate | Kind::Interrupted => Outcome::Skipped { rel, reason: e },
        _ => Outcome::Failed { rel, error: e },
    }
}

/// Opens safely (beneath `root`, see `input::Root`), checks, reads, and verifies the input
/// did not change while read (retrying if it did). `Err` is a final outcome (skipped or
/// failed); `Ok` is ready to publish.
pub fn prepare<O: Op>(
    cfg: &Config,
    op: &O,
    job: Job,
    root: Option<&input::Root>,
    scratch: &mut O::Scratch,
) -> Result<Ready<O::Pending>, Outcome> {
    let failed = |job: Job, error| not_done(job.rel, error);
    let opened = InputFile::open_beneath(root, &job.rel, &job.abs, cfg.follow_symlinks);
    let mut input = match opened {
        Ok(f) => f,
        Err(OpenError::NotRegular(what)) => {
            let reason = match what {
                NotRegular::Symlink => {
                    FileError::new(Kind::Symlink, "not a regular file (symlink)")
                }
                NotRegular::SymlinkOnPath => {
                    FileError::new(Kind::Symlink, format!("{what}; not followed"))
                }
                NotRegular::Special(_) => {
                    FileError::new(Kind::SpecialFile, format!("not a regular file ({what})"))
                }
            };
            return Err(Outcome::Skipped {
                rel: job.rel,
                reason,
            });
        }
        // Watch mode: deleted after it settled, which is no failure (its removal event says
        // the same).
        Err(OpenError::Failed(e)) if e.kind == Kind::Vanished && job.expect.is_some() => {
            return Err(Outcome::Skipped {
                rel: job.rel,
                reason: FileError::new(Kind::Vanished, "deleted before it was processed"),
            });
        }
        Err(OpenError::Failed(e)) => return Err(failed(job, e)),
    };
    if job
        .expect
        .is_some_and(|e| e != Stamp::from_stat(&input.stat))
    {
        let e = FileError::new(
            Kind::Changed,
            "changed after it settled, with no event telling of it (a write through mmap?)",
        );
        return Err(failed(job, e));
    }
    // Watch mode takes files that may still be written without an event to say so (through a
    // shared mapping): one still open for writing when its read ends is not taken. (A writer
    // that had it open while it was read and closed it since is heard of by its close event,
    // which has the file looked at again.) One probe, not one before and one after: each
    // costs a lease taken and dropped, 0.13 s of a 100,000-file burst.
    let watched = job.expect.is_some();
    match op.check(&job, &input, scratch) {
        Ok(None) => {}
        Ok(Some(reason)) => {
            return Err(Outcome::Skipped {
                rel: job.rel,
                reason,
            })
        }
        Err(e) => return Err(failed(job, e)),
    }
    let mut attempt = 1;
    loop {
        let pending = match op.read(&job, &mut input, scratch) {
            Ok(p) => p,
            Err(e) => return Err(failed(job, e)),
        };
        match input.finish() {
            Ok(()) if watched && open_for_writing(&input, &job.rel) => {
                return Err(failed(job, still_open()))
            }
            Ok(()) => {
                return Ok(Ready {
                    job,
                    input,
                    pending,
                })
            }
            Err(mut e) if attempt >= ATTEMPTS => {
                e.message = format!("{} (gave up after {ATTEMPTS} attempts)", e.message);
                return Err(failed(job, e));
            }
            Err(_) => {
                drop(pending);
                // Give a writer that is mid-way a moment to finish before looking again.
                std::thread::sleep(Duration::from_millis(100 << attempt));
                attempt += 1;
                if let Err(e) = input.restart() {
                    return Err(failed(job, e));
                }
            }
        }
    }
}

/// Whether another process has `input` open for writing, as far as the kernel says; the first
/// time it will not say, the operator hears why once.
fn open_for_writing(input: &InputFile, rel: &Path) -> bool {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match input.open_for_writing() {
        Some(open) => open,
        None => {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    path = %rel.display(),
                    "cannot tell whether files are still open for writing (filepipe is not \
                     their owner and lacks CAP_LEASE, or the file system has no leases): a \
                     writer that keeps writing through a shared mapping after its close may go \
                     unseen (see README, 'What is guaranteed')"
                );
            }
            false
        }
    }
}

/// Why a watched file that another process still has open for writing is not taken (yet).
fn still_open() -> FileError {
    FileError::new(
        Kind::InUse,
        "still open for writing by another process (a shared writable mapping keeps it so after \
         its descriptor is closed): not taken yet",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::travel::{BatchFill, BATCH_BYTES};

    #[test]
    fn batches_hold_64_files_or_4_mib_and_a_large_file_alone() {
        let fill = |sizes: &[u64]| {
            let mut f = BatchFill::default();
            for &size in sizes {
                assert!(f.takes(size), "{size} into {f:?}");
                f.add(size);
            }
            f
        };
        let small = fill(&[1000; 63]);
        assert!(!small.full() && small.takes(1000));
        assert!(fill(&[1000; 64]).full());
        // Bytes: four 1 MiB files fill it.
        let mb = 1 << 20;
        assert!(!fill(&[mb; 3]).full() && fill(&[mb; 4]).full());
        // A file of 4 MiB or more: only into an empty batch, which it then fills.
        assert!(!small.takes(BATCH_BYTES) && small.takes(BATCH_BYTES - 1));
        assert!(fill(&[BATCH_BYTES * 10]).full());
        assert!(BatchFill::alone(BATCH_BYTES) && !BatchFill::alone(BATCH_BYTES - 1));
    }
    use crate::cli::{Cli, Command};
    use crate::ops::sha256::Sha256Op;
    use clap::Parser as _;

    fn config(root: &Path) -> Config {
        let args = [
            "filepipe",
            "batch",
            root.to_str().unwrap(),
            "--op",
            "sha256",
        ];
        match Cli::parse_from(args).command {
            Command::Batch(a) => Config::from_batch(&a, true).unwrap(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_directory_swapped_for_a_link_after_the_walk_is_not_read_through() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(root.join("d/f"), b"listed in the tree").unwrap();
        std::fs::write(outside.join("f"), b"outside the tree").unwrap();
        let cfg = config(&root);
        let job = || Job {
            abs: cfg.root.join("d/f"),
            rel: PathBuf::from("d/f"),
            replace: false,
            expect: None,
        };
        let mut scratch = Sha256Op.scratch();
        let roots = || {
            let root = input::Root::new(&cfg.root).unwrap();
            [root, input::Root::new(&cfg.root).unwrap().without_openat2()]
        };
        for root in roots() {
            assert!(prepare(&cfg, &Sha256Op, job(), Some(&root), &mut scratch).is_ok());
        }
        // Listed, queued, and then the directory's name leads outside the tree.
        std::fs::rename(root.join("d"), root.join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        for root in roots() {
            match prepare(&cfg, &Sha256Op, job(), Some(&root), &mut scratch) {
                Err(Outcome::Skipped { rel, reason }) => {
                    assert_eq!(rel, Path::new("d/f"));
                    assert_eq!(reason.kind, Kind::Symlink);
                    assert!(reason.message.contains("on its path"), "{}", reason.message);
                }
                Err(other) => panic!("unexpected {other:?} ({root:?})"),
                Ok(_) => panic!("read the file outside the tree ({root:?})"),
            }
        }
    }
}
