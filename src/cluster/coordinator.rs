//! The coordinator: `filepipe batch DIR --queue URL` and `filepipe watch DIR --queue URL`. It
//! runs the mode's own source (the walk, or the watcher) and sink (the manifest, or the state),
//! but publishes the jobs to the queue (batches as the local channel has them, one message
//! each, under a message id so that a publish retried after an error is stored once), and
//! feeds the outcomes the workers publish to the same reporter and sink as a local run: same
//! progress, summary, failure log and exit codes. Each file's first outcome counts, later ones
//! (a job delivered again after a worker died) are dropped; in watch mode an outcome counts
//! only for the version of the file it was published for (`of_version`). A batch ends once
//! every file it published has an outcome; a watch runs until a signal. Jobs that leave the
//! jobs stream without an outcome (terminated by a worker from before their version) are
//! published again (`LostJobs`, on a thread of its own, paced), so that an up-to-date worker can
//! take them; a job whose outcome came but does not read (a newer worker's) is not: its file
//! counts failed (`unreadable-outcome`). Jobs go binary (version 4) until any are lost, then
//! as JSON for the rest of the run, which workers from before version 4 read; outcomes are
//! read in either format.
//!
//! A first signal stops the source and the publishing, tells the workers to drop the run's
//! jobs no worker has taken yet, and waits for the outcomes of those in flight; a batch
//! reports files without one skipped (interrupted), a watch leaves them to its next start. A
//! second signal stops waiting.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::consumer;
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::cli::OpKind;
use crate::cluster::resume::RunFile;
use crate::cluster::wire::{
    self, Format, JobBatch, JobBatchOut, OutcomeBatch, WireFile, WirePath, WireStamp,
};
use crate::cluster::wire4;
use crate::cluster::{
    cancel_subject, connect, jobs_subject, outcomes_subject, take, workers_consumer, Conn, Queue,
    Unreachable, ACK_WAIT, JOBS_STREAM, OUTCOMES_STREAM,
};
use crate::config::{Config, MoveNames};
use crate::digest::HashAlgo;
use crate::error::{FileError, Kind};
use crate::report::{self, Summary};
use crate::signals::{self, Shutdown};
use crate::sink::manifest::ManifestSink;
use crate::sink::state::StateSink;
use crate::sink::Sink;
use crate::source::walk::Walk;
use crate::source::watch::Watch;
use crate::source::{Outlet, Source};
use crate::state::State;
use crate::travel::{BatchFill, Event, Msg, Outcome, Recorded, Stamp, Stats};

/// After a first signal, how long the coordinator waits with no outcome arriving and no job in
/// flight before it stops waiting.
const QUIET: Duration = Duration::from_secs(3);

/// How long without a single outcome, jobs outstanding, before the coordinator says why.
const STALLED: Duration = Duration::from_secs(30);

/// What the publisher and the outcome reader share.
#[derive(Default)]
struct Ledger {
    /// Files published whose outcome is awaited, with what each one's job said (`Awaited`:
    /// in watch mode, the stamp it settled with). A file leaves at its first outcome: later ones (a job
    /// delivered again after a worker died) find it gone and are dropped, and watch mode may
    /// publish it again once it changes.
    expected: Mutex<Awaiting>,
    /// The last of the publisher's batches whose job messages the server has all confirmed
    /// stored (they are confirmed in order): a file of a later batch may not be in the jobs
    /// stream yet, so its absence there says nothing.
    stored: AtomicU64,
    /// How many (files) were published.
    published: AtomicU64,
    /// The source and the publishing are over.
    walked: AtomicBool,
    /// The hashes the run computes, in `--op`'s order: what a done outcome's digests must be
    /// (exactly one of each), and the order its digests are handed on in (the manifests').
    hashes: Vec<HashAlgo>,
    /// The version of the run's job messages in JSON: above `wire::VERSION`, workers from
    /// before it refuse them without an outcome. They go as version 4 (binary) unless `json`.
    version: u32,
    /// Jobs of the run were lost (refused without an outcome, as a worker from before version
    /// 4 refuses binary ones): from then on, the run's jobs go as JSON (`version`), which
    /// every worker that knows `version` reads.
    json: AtomicBool,
    /// Awaited files an outcome came for that did not read, with what they count once their
    /// job has left the queue (failed, `unreadable-outcome`): never published again, since a
    /// worker stored that outcome before it acknowledged the job.
    unread: Mutex<HashMap<PathBuf, Outcome>>,
}

/// The files awaited. Hashed with foldhash, seeded at random per map, not SipHash: every file
/// of the run is hashed into it once and out of it once, and SipHash over a path cost about a
/// tenth of the coordinator's own work per file. Its keys are the coordinator's own (its walk's
/// or its watch's), never a message's: an outcome only looks a path up, which cannot grow it.
type Awaiting = HashMap<PathBuf, Awaited, foldhash::fast::RandomState>;

/// A file published, its outcome awaited: what its job said, to publish it again if the job is
/// lost.
#[derive(Debug, Clone, Copy)]
struct Awaited {
    /// Watch mode: how the file settled (an outcome counts for that version only).
    expect: Option<Stamp>,
    /// Watch mode: its existing output is filepipe's, and may be replaced.
    replace: bool,
    /// The publisher's batch it went out in (0: before this coordinator started, by the
    /// killed one whose run it resumes).
    batch: u64,
}

impl Awaited {
    /// A file of a resumed run's job still in the queue: a batch's (no stamp, no replace),
    /// stored.
    const QUEUED: Awaited = Awaited {
        expect: None,
        replace: false,
        batch: 0,
    };
}

/// What every job message of a run says but its files.
struct Head<'a> {
    cfg: &'a Config,
    run: &'a str,
    /// The root's name, as the workers map it.
    root: &'a str,
    /// The output root's name, if the outputs go to one.
    out: Option<&'a str>,
    /// The names of the directories inputs are moved to (`--move-source`, `--move-failed`),
    /// as the workers map them (`--move-root NAME=PATH`).
    move_source: Option<String>,
    move_failed: Option<String>,
    op: OpKind,
    ops: Vec<OpKind>,
    /// A compressor alone: its outputs' suffix, for the files it skips by name
    /// (`compress::skipped_by_name`), said by the coordinator without a job.
    skips_by_name: Option<&'static str>,
}

impl<'a> Head<'a> {
    fn new(cfg: &'a Config, run: &'a str, names: &'a Names) -> Self {
        let (op, ops) = JobBatch::ops_of(&cfg.spec);
        Head {
            cfg,
            run,
            root: &names.root,
            out: names.out.as_deref(),
            move_source: names.moves.source.clone(),
            move_failed: names.moves.failed.clone(),
            op,
            ops,
            skips_by_name: cfg
                .spec
                .compressor()
                .filter(|_| !cfg.spec.is_multi())
                .and_then(OpKind::suffix),
        }
    }

    /// Why a compressor alone skips `rel` by its name, if it does: what a worker would say of
    /// it, said here instead of sending the job (a rerun over outputs next to their inputs
    /// finds as many outputs as inputs).
    fn skipped_by_name(&self, rel: &Path) -> Option<FileError> {
        let suffix = self.skips_by_name?;
        crate::ops::compress::skipped_by_name(rel, suffix, self.cfg.out.is_some(), self.cfg.force)
    }

    /// The subject the run's jobs go to.
    fn subject(&self) -> String {
        jobs_subject(self.root, self.run)
    }

    /// The first job message of `files` in `format`: as many as fit (JSON escapes long names
    /// to six bytes a character), and its payload.
    fn message(&self, files: &[WireFile], format: Format) -> Result<(usize, Vec<u8>)> {
        Ok(match format {
            Format::Json => wire::fitting(files, usize::MAX, |part| {
                serde_json::to_vec(&self.job(part))
            })?,
            Format::Binary => wire::fitting(files, usize::MAX, |part| {
                wire4::encode_jobs(&self.job(part))
            })
            .map_err(|e| anyhow!("writing a job message: {e}"))?,
        })
    }

    /// A job message of `files`, to be written.
    fn job<'b>(&'b self, files: &'b [WireFile]) -> JobBatchOut<'b> {
        let cfg = self.cfg;
        JobBatchOut {
            v: JobBatch::version(asks(cfg, self.out)),
            out: self.out,
            move_source: self.move_source.as_deref(),
            move_failed: self.move_failed.as_deref(),
            remove_source: cfg.remove_source,
            run: self.run,
            root: self.root,
            op: self.op,
            ops: &self.ops,
            level: cfg.level,
            force: cfg.force,
            files,
            follow_symlinks: cfg.follow_symlinks,
            max_size: cfg.max_size,
        }
    }
}

/// What a run's job messages ask beyond op and level (`JobBatch::version`).
fn asks(cfg: &Config, out: Option<&str>) -> wire::Asks {
    wire::Asks {
        out: out.is_some() || cfg.remove_source,
        multi: cfg.spec.is_multi(),
        moves: cfg.move_source.is_some() || cfg.move_failed.is_some(),
        follow: cfg.follow_symlinks,
        limit: cfg.max_size.is_some(),
    }
}

/// A run id: unique, and a plain name (a subject token).
fn run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{secs:x}-{:08x}", h.finish() as u32)
}

/// The names the workers know a run's directories by, checked (`check`).
struct Names {
    root: String,
    /// The output root's, if the outputs go to one.
    out: Option<String>,
    /// The move directories', for those the run has.
    moves: MoveNames,
}

/// What a coordinator cannot do yet, or not with these names: a usage error. Returns the
/// names of the run's directories: `root`, the output root's (`out`, or `--out`'s own name)
/// and the move directories' (`moves`, or each one's own name).
fn check(cfg: &Config, (root, out): (&str, Option<&str>), moves: &MoveNames) -> Result<Names> {
    if !wire::valid_name(root) {
        return Err(Unreachable(anyhow!(
            "--root-name {root:?}: a root's name is 1 to 64 of A-Z a-z 0-9 _ - (the workers map it with --root NAME=PATH)"
        ))
        .into());
    }
    let out = match &cfg.out {
        None => None,
        Some(dir) => match crate::config::out_root_name(dir, out, root) {
            Ok(name) => Some(name),
            Err(name) => return Err(Unreachable(anyhow!(
                "the output root's name {name:?} is not 1 to 64 of A-Z a-z 0-9 _ - other than the input root's: give one with --out-root-name NAME (the workers map it with --out-root NAME=PATH)"
            ))
            .into()),
        },
    };
    // The workers know a move directory by a name (`--move-root NAME=PATH`): one that is no
    // plain name, or the name of another root of the run, could not be told apart.
    let taken: Vec<&str> = std::iter::once(root).chain(out.as_deref()).collect();
    let dirs = (
        cfg.move_source.as_deref().map(|a| a.root.as_path()),
        cfg.move_failed.as_deref().map(|a| a.root.as_path()),
    );
    let moves = crate::config::move_root_names(dirs, moves, &taken).map_err(|(which, name)| {
        let dir = if which == "source" { &cfg.move_source } else { &cfg.move_failed };
        let dir = dir.as_deref().map_or_else(String::new, |a| a.root.display().to_string());
        Unreachable(anyhow!(
            "--move-{which} {dir}: the name the workers know it by, {name:?}, must be 1 to 64 of A-Z a-z 0-9 _ - and differ from the input root's, the output root's and the other move directory's: give one with --move-{which}-name NAME (the workers map it with --move-root NAME=PATH)"
        ))
    })?;
    Ok(Names {
        root: root.to_owned(),
        out,
        moves,
    })
}

/// Runs a batch over `cfg.root` through the queue; `root` is the name the workers map it by.
/// The same command run again after its coordinator was killed resumes that run (see
/// `resume`).
pub(crate) fn run(
    cfg: &Config,
    queue: &Queue,
    names: (&str, Option<&str>),
    moves: &MoveNames,
    shutdown: &Shutdown,
) -> Result<Summary> {
    let names = check(cfg, names, moves)?;
    // Without a state directory to keep it in (a user with no writable home), the batch runs,
    // only not resumably.
    let runfile = match RunFile::open(
        crate::state::default_dir(),
        cfg,
        &queue.url,
        &names.root,
        names.out.as_deref(),
    ) {
        Ok(f) => Some(f),
        Err(e) if format!("{e:#}").contains("another coordinator") => {
            return Err(Unreachable(e).into())
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no run file: this batch cannot be resumed if its coordinator is killed");
            None
        }
    };
    let stats = Stats::default();
    let mut source = Walk::for_queue(cfg, shutdown);
    let mut sink = ManifestSink::new(cfg);
    coordinate(
        cfg,
        queue,
        &names,
        shutdown,
        (&mut source, &mut sink),
        &stats,
        runfile,
    )
}

/// Watches `cfg.root` and has the workers process what settles, until a signal: watch mode's
/// source, state and sink, with the queue in place of the local workers. `stats` as for
/// `run::watch`.
pub(crate) fn watch(
    cfg: &Config,
    queue: &Queue,
    names: (&str, Option<&str>),
    moves: &MoveNames,
    shutdown: &Shutdown,
    stats: &Stats,
) -> Result<Summary> {
    let names = check(cfg, names, moves)?;
    let settings = cfg.watch.as_ref().context("watch settings missing")?;
    // The state's rows are filed per result, as a local watch's are. (Jobs reach the workers
    // whole: a file lacking one result has them all computed again.)
    // Two connections, as in `run::watch`: the sink writes, the watcher reads.
    let state = State::open(&settings.state_dir, &cfg.root, &cfg.spec)?;
    let reader = State::reader(&settings.state_dir, &cfg.root, &cfg.spec)?;
    let mut source = Watch::new(cfg, reader, shutdown)?;
    let mut sink = StateSink::new(cfg, state);
    // No run file: a watch resumes from its state, its scan finding what is not recorded.
    coordinate(
        cfg,
        queue,
        &names,
        shutdown,
        (&mut source, &mut sink),
        stats,
        None,
    )
}

/// The coordinator: `source`'s jobs out to the queue, the workers' outcomes in to `sink`.
/// With a `runfile` naming a run a killed coordinator left, that run is resumed: its outcomes
/// so far are read again from the start, and only files without one are published.
fn coordinate(
    cfg: &Config,
    queue: &Queue,
    names: &Names,
    shutdown: &Shutdown,
    (source, sink): (&mut dyn Source, &mut (dyn Sink + Send)),
    stats: &Stats,
    mut runfile: Option<RunFile>,
) -> Result<Summary> {
    let (root, out) = (names.root.as_str(), names.out.as_deref());
    let conn = connect(queue, "filepipe-coordinator")?;
    // A run that was cancelled is over: its workers drop its jobs, so it cannot be resumed.
    let resumed = match runfile.as_ref().and_then(RunFile::previous) {
        Some(prev) if !cancelled(&conn, prev).map_err(Unreachable)? => Some(prev.to_owned()),
        _ => None,
    };
    let run = resumed.clone().unwrap_or_else(run_id);
    if let Some(f) = runfile.as_mut() {
        f.record(&run).map_err(Unreachable)?;
    }
    // The root's consumer, so that its jobs wait for workers even if none has started yet.
    // Publishing the run's jobs: refused now rather than at the first job. (Not its
    // cancellation: workers hear that subject live, and would take the probe for one.)
    conn.start(crate::cluster::may_publish(
        &conn,
        &jobs_subject(root, &run),
    ))
    .map_err(Unreachable)?;
    let workers = conn
        .start(workers_consumer(&conn.js, root))
        .context("creating the workers' consumer")
        .map_err(Unreachable)?;
    let outcomes = conn
        .start(async {
            if resumed.is_some() {
                // Read from the start again: the killed coordinator acknowledged outcomes it
                // never wrote to its manifest.
                let stream = conn.js.get_stream(OUTCOMES_STREAM).await?;
                let name = format!("coordinator-{run}");
                if let Err(e) = stream.delete_consumer(&name).await {
                    tracing::debug!(error = %e, "no outcome consumer of the run left");
                }
            }
            outcome_consumer(&conn, &run).await
        })
        .context("reading the outcome stream")
        .map_err(Unreachable)?;
    match &resumed {
        Some(_) => {
            tracing::warn!(%run, root, queue = %queue.shown(), "resuming the run a killed coordinator of this batch left")
        }
        None => tracing::info!(%run, root, queue = %queue.shown(), "coordinating"),
    }
    let ledger = Ledger {
        hashes: cfg.spec.hashes().to_vec(),
        version: JobBatch::version(asks(cfg, out)),
        ..Ledger::default()
    };
    let watching = source.listens();
    let (job_tx, job_rx) = bounded::<Msg>(4);
    let (event_tx, event_rx) = bounded::<Event>(1024);
    // Recorded outcomes go back to a source that listens (the watcher), once the sink has
    // flushed them, as in a local pipeline.
    let (recorded_tx, recorded_rx) = if watching {
        let (tx, rx) = crossbeam_channel::unbounded::<Vec<Recorded>>();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let head = Head::new(cfg, &run, names);
    // Set once the resumed run's outcomes are read, before the source starts.
    let accounted = std::sync::OnceLock::new();
    // Raised when the source fails: the reporter then abandons the sink (`Sink::abandon`).
    let source_end = &report::SourceEnd::default();
    std::thread::scope(|s| {
        let reporter = std::thread::Builder::new()
            .name("filepipe-reporter".into())
            .spawn_scoped(s, || {
                report::run(
                    cfg,
                    cfg.spec.canonical(),
                    event_rx,
                    stats,
                    sink,
                    recorded_tx,
                    shutdown,
                    source_end,
                )
            })
            .context("starting the reporter")?;
        // Resuming: the run's outcomes so far count first, and their files are not sent again;
        // nor are those of the run's jobs still in the queue, whose outcomes are awaited.
        if resumed.is_some() {
            let (mut skip, seen) = replay(&conn, &outcomes, &run, cfg, &ledger.hashes, &event_tx)?;
            let queued = queued(&conn, root, &run, None)?;
            let mut expected = ledger
                .expected
                .lock()
                .map_err(|_| anyhow!("the ledger is poisoned"))?;
            let mut waiting = 0u64;
            for rel in queued {
                // A file with an outcome already (its message is held until the worker has
                // finished the rest): no other comes unless the message is delivered again,
                // so it is not awaited; if that outcome did not count, it is published again.
                if !seen.contains(&rel) && skip.insert(rel.clone()) {
                    expected.insert(rel, Awaited::QUEUED);
                    waiting += 1;
                }
            }
            drop(expected);
            tracing::info!(
                files = waiting,
                "jobs of the run still queued: awaited, not published again"
            );
            let _ = accounted.set(skip);
        }
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
                    let ran = source.run(out);
                    if ran.is_ok() && shutdown.requested() {
                        source_end.cut.store(true, Ordering::SeqCst);
                    }
                    if ran.is_err() {
                        source_end.failed.store(true, Ordering::SeqCst);
                        // A watched root deleted or moved: the coordinator stops as after a
                        // signal (its jobs cancelled, those in flight waited for), then fails.
                        shutdown.request(0);
                    }
                    ran
                })
                .context("starting the source")?
        };
        let publisher = {
            let events = event_tx.clone();
            let (head, conn, job_rx, ledger, accounted) =
                (&head, &conn, &job_rx, &ledger, &accounted);
            std::thread::Builder::new()
                .name("filepipe-publish".into())
                .spawn_scoped(s, move || {
                    let none = HashSet::new();
                    let accounted = accounted.get().unwrap_or(&none);
                    let r = publish(head, conn, (job_rx, &events), ledger, accounted, shutdown);
                    ledger.walked.store(true, Ordering::Release);
                    r
                })
                .context("starting the publisher")?
        };
        let gathered = gather(
            &conn,
            &outcomes,
            &workers,
            &head,
            &ledger,
            &event_tx,
            shutdown,
            watching.then_some(cfg.root.as_path()),
        );
        // Whatever stopped the gathering, the walk and the publisher stop too.
        if gathered.is_err() {
            shutdown.request(0);
        }
        drop(event_tx);
        let published = publisher
            .join()
            .map_err(|_| anyhow!("the publisher panicked"))?;
        let walked = walker.join().map_err(|_| anyhow!("the source panicked"))?;
        let summary = reporter
            .join()
            .map_err(|_| anyhow!("the reporter panicked"))??;
        gathered?;
        published?;
        walked?;
        // Every file accounted for (or the run cancelled): nothing left to resume.
        if let Some(f) = runfile.take() {
            f.finish();
        }
        Ok(summary)
    })
}

/// The run's durable consumer of its outcomes (created, or found as it is).
async fn outcome_consumer(conn: &Conn, run: &str) -> Result<consumer::PullConsumer> {
    let stream = conn.js.get_stream(OUTCOMES_STREAM).await?;
    // Durable, so that it outlives a restart of the server; removed by the server an hour
    // after the coordinator stops reading.
    Ok(stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(format!("coordinator-{run}")),
            filter_subject: outcomes_subject(run),
            // Acknowledged once handed to the reporter: a batch lost on the way (a read cut
            // short) is delivered again, and its files counted once.
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(10),
            deliver_policy: consumer::DeliverPolicy::All,
            inactive_threshold: Duration::from_secs(3600),
            ..Default::default()
        })
        .await?)
}

/// Publishes the source's batches as job messages until it ends (or a signal), but for the
/// files `accounted` for already (a resumed run's).
fn publish(
    head: &Head,
    conn: &Conn,
    (jobs, events): (&Receiver<Msg>, &Sender<Event>),
    ledger: &Ledger,
    accounted: &HashSet<PathBuf>,
    shutdown: &Shutdown,
) -> Result<()> {
    let subject = head.subject();
    // Message ids are this coordinator's own: a resumed run's numbering starts again, and
    // must not be taken for the killed coordinator's messages (the server would drop them
    // as duplicates for two minutes).
    let epoch = run_id();
    let mut seq = 0u64;
    // The source's batches, numbered from 1 (0 is a resumed run's queued files).
    let mut batches = 0u64;
    // Messages published and not yet confirmed stored: up to WINDOW at once, so a run does
    // not pay a round trip per message; each is confirmed in order.
    let mut unconfirmed: VecDeque<Pending> = VecDeque::new();
    loop {
        let msg = match jobs.recv_timeout(CONFIRM_WITHIN) {
            Ok(msg) => msg,
            // A pause (a watch between files): what was sent is confirmed now, so a publish
            // that failed is retried now, not when the window next fills.
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                while let Some(p) = unconfirmed.pop_front() {
                    confirm(conn, &subject, p, ledger, shutdown)?;
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        let Msg::Jobs(mut batch) = msg else { continue };
        if !accounted.is_empty() {
            batch.retain(|j| !accounted.contains(&j.rel));
            if batch.is_empty() {
                continue;
            }
        }
        if shutdown.requested() {
            // Drained, not published: the walk stops at the signal too.
            continue;
        }
        // Files skipped by their names alone: reported here, as a worker would, unpublished.
        let mut skipped = Vec::new();
        batch.retain(|j| match head.skipped_by_name(&j.rel) {
            Some(reason) => {
                skipped.push(Outcome::Skipped {
                    rel: j.rel.clone(),
                    reason,
                });
                false
            }
            None => true,
        });
        if !skipped.is_empty() && events.send(Event::Finished(skipped)).is_err() {
            break;
        }
        if batch.is_empty() {
            continue;
        }
        batches += 1;
        // Sizes are not sent: the source already put each large file in a message of its own.
        let files: Vec<WireFile> = batch
            .iter()
            .map(|j| WireFile {
                rel: WirePath::of(&j.rel),
                size: 0,
                stamp: j.expect.as_ref().map(WireStamp::of),
                replace: j.replace,
            })
            .collect();
        // Awaited before it is published (an outcome may come back at once); the jobs' paths
        // move into the ledger, not copied.
        if let Ok(mut expected) = ledger.expected.lock() {
            expected.extend(batch.into_iter().map(|j| {
                let awaited = Awaited {
                    expect: j.expect,
                    replace: j.replace,
                    batch: batches,
                };
                (j.rel, awaited)
            }));
        }
        // One message, or several where long names would make it too large to be stored.
        let mut rest = &files[..];
        let format = if ledger.json.load(Ordering::Acquire) {
            Format::Json
        } else {
            Format::Binary
        };
        while !rest.is_empty() {
            let (n, payload) = head.message(rest, format)?;
            seq += 1;
            rest = &rest[n..];
            let mut p = Pending {
                id: format!("{}.{epoch}.{seq}", head.run),
                payload: payload.into(),
                files: n,
                completes: rest.is_empty().then_some(batches),
                ack: None,
            };
            p.ack = conn.rt.block_on(p.send(conn, &subject)).ok();
            unconfirmed.push_back(p);
        }
        while unconfirmed.len() > WINDOW {
            if let Some(p) = unconfirmed.pop_front() {
                // An error only while stopping: the files of the messages behind it stay
                // awaited too, and are reported interrupted unless an outcome comes.
                confirm(conn, &subject, p, ledger, shutdown)?;
            }
        }
    }
    while let Some(p) = unconfirmed.pop_front() {
        confirm(conn, &subject, p, ledger, shutdown)?;
    }
    let files = ledger.published.load(Ordering::Acquire);
    tracing::info!(files, "jobs published");
    Ok(())
}

/// Job messages published at once, their stores not yet confirmed.
const WINDOW: usize = 64;

/// How long the source may pause before the messages sent are confirmed anyway.
const CONFIRM_WITHIN: Duration = Duration::from_millis(200);

/// A job message on its way.
struct Pending {
    /// Its message id: a retry is stored once.
    id: String,
    payload: bytes::Bytes,
    /// How many files it holds.
    files: usize,
    /// The last message of the source's batch of this number: once it is stored, the whole
    /// batch is.
    completes: Option<u64>,
    /// The server's confirmation to come (`None`: the publish itself failed).
    ack: Option<async_nats::jetstream::context::PublishAckFuture>,
}

impl Pending {
    async fn send(
        &self,
        conn: &Conn,
        subject: &str,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", self.id.as_str());
        Ok(conn
            .js
            .publish_with_headers(subject.to_owned(), headers, self.payload.clone())
            .await?)
    }
}

/// Waits for `p` to be stored, publishing it again (same id) while the server fails to say
/// so; then its files count as published.
fn confirm(
    conn: &Conn,
    subject: &str,
    mut p: Pending,
    ledger: &Ledger,
    shutdown: &Shutdown,
) -> Result<()> {
    let mut pause = Duration::from_millis(100);
    loop {
        let stored = match p.ack.take() {
            Some(ack) => conn
                .rt
                .block_on(async { ack.await })
                .map_err(anyhow::Error::from),
            None => Err(anyhow!("not sent")),
        };
        match stored {
            Ok(_) => break,
            Err(e) if !shutdown.requested() => {
                tracing::warn!(error = %format!("{e:#}"), "publishing jobs failed; retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
                // A server that lost its store (or a new one in its place) has no streams.
                if let Err(e) = conn.rt.block_on(conn.setup()) {
                    tracing::debug!(error = %format!("{e:#}"), "setting up the streams again failed");
                }
                p.ack = conn.rt.block_on(p.send(conn, subject)).ok();
            }
            Err(e) => {
                // Stopping: this message may not be stored. Its files stay awaited, and are
                // reported interrupted unless an outcome comes.
                return Err(e).context("publishing jobs");
            }
        }
    }
    ledger
        .published
        .fetch_add(p.files as u64, Ordering::Release);
    if let Some(batch) = p.completes {
        ledger.stored.fetch_max(batch, Ordering::Release);
    }
    Ok(())
}

/// Reads outcomes and hands each file's first one to the reporter, until every published file
/// has one (or, after a signal, until the jobs in flight are done). `watched`: the root, when
/// the source is the watcher, which runs until a signal.
#[allow(clippy::too_many_arguments)]
fn gather(
    conn: &Conn,
    outcomes: &consumer::PullConsumer,
    workers: &consumer::PullConsumer,
    head: &Head,
    ledger: &Ledger,
    events: &Sender<Event>,
    shutdown: &Shutdown,
    watched: Option<&Path>,
) -> Result<()> {
    // The look for lost jobs on a thread of its own: it costs a request per queued job
    // message, and must hold off neither the outcomes nor a signal. It stops at a signal, or
    // once the gathering is over, between two requests.
    let over = AtomicBool::new(false);
    std::thread::scope(|s| {
        let looker = std::thread::Builder::new()
            .name("filepipe-lost".into())
            .spawn_scoped(s, || {
                let stop = || over.load(Ordering::Acquire) || shutdown.requested();
                let mut lost = LostJobs::new();
                let mut last_consumer_look = Instant::now();
                let mut tampered_said = false;
                while !stop() {
                    let outstanding = ledger.expected.lock().map_or(0, |e| e.len());
                    if outstanding > 0 {
                        lost.tend(conn, outcomes, (head, ledger, events), &stop);
                        if last_consumer_look.elapsed() >= CONSUMER_LOOK {
                            remake_workers_consumer(conn, head.root, &mut tampered_said);
                            last_consumer_look = Instant::now();
                        }
                    }
                    // Woken at the end of the gathering: a run must not end up to a tenth
                    // of a second after its last outcome (every short run's end did).
                    std::thread::park_timeout(Duration::from_millis(100));
                }
            });
        if let Err(e) = &looker {
            tracing::warn!(error = %e, "cannot start looking for jobs lost from the queue: they are not published again");
        }
        let gathered = gather_outcomes(
            conn, outcomes, workers, head, ledger, events, shutdown, watched,
        );
        over.store(true, Ordering::Release);
        if let Ok(looker) = &looker {
            looker.thread().unpark();
        }
        gathered
    })
}

/// How often a coordinator awaiting outcomes makes sure its root's workers' consumer is there.
const CONSUMER_LOOK: Duration = Duration::from_secs(5);

/// Makes the workers' consumer of `root` again if it is gone (deleted by hand, or with a
/// server that lost its store): workers whose user may not make it wait for a coordinator
/// to, and before, one that had made it at its start never did again, so its run waited for
/// ever (the jobs stay in the work-queue stream meanwhile). One request when it is there.
/// One there but not as filepipe makes it (deleted and made again with other settings) is
/// said once (`said`): the workers take nothing from it, and the run waits for it to be put
/// right (found by a review: the run waited, its log silent).
fn remake_workers_consumer(conn: &Conn, root: &str, said: &mut bool) {
    let found = conn.rt.block_on(async {
        let stream = conn.js.get_stream(JOBS_STREAM).await?;
        anyhow::Ok(stream.consumer_info(crate::cluster::workers(root)).await)
    });
    match found {
        Ok(Ok(info)) => {
            match crate::cluster::check_workers_consumer(root, &info) {
                Err(t) if !*said => {
                    tracing::warn!(root, "{t}: the run's jobs wait until it is");
                    *said = true;
                }
                Err(_) => {}
                Ok(()) => *said = false,
            }
            return;
        }
        Ok(Err(e)) if crate::cluster::consumer_not_found(&e) => {}
        // The server not reachable now: the outcomes' reader says so.
        _ => return,
    }
    match conn.start(workers_consumer(&conn.js, root)) {
        Ok(_) => tracing::warn!(
            root,
            "the workers' consumer of this root was gone: made again, its jobs are taken again"
        ),
        Err(e) => tracing::warn!(
            root,
            error = %format!("{e:#}"),
            "the workers' consumer of this root is gone and could not be made again"
        ),
    }
}

/// `gather`'s reading of the outcomes, on the calling thread.
#[allow(clippy::too_many_arguments)]
fn gather_outcomes(
    conn: &Conn,
    outcomes: &consumer::PullConsumer,
    workers: &consumer::PullConsumer,
    head: &Head,
    ledger: &Ledger,
    events: &Sender<Event>,
    shutdown: &Shutdown,
    watched: Option<&Path>,
) -> Result<()> {
    let run = head.run;
    let watching = watched.is_some();
    let mut outcomes = outcomes.clone();
    let mut last_outcome = Instant::now();
    let mut last_warning = Instant::now();
    let mut cancelled_at: Option<Instant> = None;
    let mut said_unreadable = false;
    loop {
        let walked = ledger.walked.load(Ordering::Acquire);
        // Every file sent (or about to be) has its outcome: the files of a message whose store
        // was never confirmed (a signal stopped the publishing) are awaited too, and reported
        // interrupted below unless an outcome comes.
        let outstanding = ledger.expected.lock().map_or(usize::MAX, |e| e.len());
        if walked && outstanding == 0 {
            return Ok(());
        }
        if shutdown.requested() && walked {
            if cancelled_at.is_none() {
                cancelled_at = Some(Instant::now());
                // Workers drop the run's jobs they have not started (removing them from the
                // stream by subject would upset the consumer on a 2.9 server: nats-server
                // issue 5075). Stored, so a worker that was not listening finds it too.
                let said = conn.rt.block_on(async {
                    let ack = conn
                        .js
                        .publish_with_headers(
                            cancel_subject(run),
                            crate::cluster::cancellation_headers(run),
                            "".into(),
                        )
                        .await?;
                    ack.await.map_err(anyhow::Error::from)
                });
                match said {
                    Ok(_) => tracing::info!(
                        "interrupted: workers told to drop the run's jobs not yet started"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "telling the workers the run is cancelled failed: they will do its jobs")
                    }
                }
            }
            // Done waiting once outcomes have stopped and no job of this root is in flight, or
            // after an ack wait at most (other runs' jobs count as in flight too).
            let waited = cancelled_at.is_some_and(|t| t.elapsed() >= ACK_WAIT + QUIET);
            let idle =
                last_outcome.elapsed() >= QUIET && in_flight(conn, workers).is_ok_and(|n| n == 0);
            if idle || waited || signals::aborted() {
                return interrupted(ledger, events, watching);
            }
        }
        let msgs = conn
            .rt
            .block_on(take(&outcomes, 256, Duration::from_millis(250)));
        let msgs = match msgs {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading outcomes failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
                // A server that lost its store has neither the stream nor the consumer: made
                // again (the workers' outcomes published meanwhile are stored once it is).
                let again = conn.rt.block_on(async {
                    conn.setup().await?;
                    outcome_consumer(conn, run).await
                });
                if let Ok(c) = again {
                    outcomes = c;
                }
                continue;
            }
        };
        let mut firsts = Vec::new();
        for m in &msgs {
            let Some(batch) = outcomes_of(m, run) else {
                continue;
            };
            let mut expected = ledger
                .expected
                .lock()
                .map_err(|_| anyhow!("the ledger is poisoned"))?;
            for w in &batch.outcomes {
                let outcome = match w.outcome(&ledger.hashes) {
                    Ok(o) => o,
                    Err(e) => {
                        // A failure of a kind this release has no name for, all else read: a
                        // newer worker's. It did the job and stored this before acknowledging
                        // it: no other outcome comes, and publishing it again would only have
                        // it done again. Counted failed, so the run ends with every file
                        // accounted for.
                        let newer = w.kind.as_deref().is_some_and(|k| Kind::parse(k).is_none());
                        match unreadable(w, &e) {
                            Some(o) if newer => {
                                if !said_unreadable {
                                    said_unreadable = true;
                                    tracing::warn!(worker = %batch.worker, error = %e, "an outcome from a newer worker could not be read: upgrade the coordinator (its file counts failed, unreadable-outcome, and is not published again)");
                                }
                                o
                            }
                            // Anything else (digests that are not the run's...) is ignored: its
                            // job, still queued, is done by another worker. Remembered, so that
                            // once the job has left the queue the file counts failed rather
                            // than being published again (`LostJobs::publish_again`).
                            o => {
                                if let Some(o) = o.filter(|o| expected.contains_key(o.rel())) {
                                    if let Ok(mut unread) = ledger.unread.lock() {
                                        unread.insert(o.rel().to_path_buf(), o);
                                    }
                                }
                                if w.rel.rel().is_err() {
                                    // This run publishes plain relative paths only: the job
                                    // was put on the run's subject by another hand.
                                    tracing::warn!(worker = %batch.worker, error = %e, "an outcome for a path no job of this run names (a job message from another client, refused by the worker): ignored");
                                } else {
                                    tracing::warn!(worker = %batch.worker, error = %e, "an outcome that does not read: ignored");
                                }
                                continue;
                            }
                        }
                    }
                };
                // Only files this run published, each once: the first outcome counts.
                if let Some(settled) = expected.remove(outcome.rel()) {
                    // An outcome that did not read, before, counts no more (a watched file
                    // published again must not inherit it).
                    if let Ok(mut unread) = ledger.unread.lock() {
                        // Nearly always empty: no path hashed per file for nothing.
                        if !unread.is_empty() {
                            unread.remove(outcome.rel());
                        }
                    }
                    firsts.push(match (settled.expect, watched) {
                        (Some(stamp), Some(root)) => of_version(outcome, &stamp, w.read, root),
                        _ => outcome,
                    });
                }
            }
        }
        let firsts_sent = !firsts.is_empty();
        if firsts_sent {
            last_outcome = Instant::now();
            events
                .send(Event::Finished(firsts))
                .map_err(|_| anyhow!("the reporter has stopped"))?;
        }
        // Handed on: not to be delivered again (an ack lost only costs a duplicate, dropped).
        ack_all(conn, &msgs);
        if !firsts_sent
            && last_outcome.elapsed() >= STALLED
            && last_warning.elapsed() >= STALLED
            && outstanding > 0
        {
            last_warning = Instant::now();
            let info = consumer_info(conn, workers).ok();
            let waiting = info.as_ref().map_or(0, |i| i.num_waiting);
            // Delivered and not yet acknowledged: a worker still at them, one that gave them
            // back to be offered again later (the server counts those too), or one that
            // stopped without a word, whose jobs come back after the ack wait. Said before any
            // blame on old workers, which would be wrong then.
            let held = info.as_ref().map_or(0, |i| i.num_ack_pending);
            // Held first: a worker resting what its jobs name leaves no request waiting, and
            // was told to be started (found by a review).
            if held > 0 {
                tracing::warn!(
                    outstanding,
                    workers_waiting = waiting,
                    held,
                    "no outcome for {STALLED:?}: {held} job messages are held by workers, or given back by one that could not do them and waiting to be offered again (its log says why; each wait is longer, up to 40 s), or held by a worker that stopped without acknowledging them (delivered again once the ack wait is over)"
                );
            } else if waiting == 0 {
                tracing::warn!(
                    outstanding,
                    "no outcome for {STALLED:?} and no worker is asking for jobs: start `filepipe worker --queue ... --root NAME=PATH`"
                );
            } else if (ledger.version > wire::VERSION || !ledger.json.load(Ordering::Acquire))
                // Not at the first warning: jobs a killed worker held come back once the ack
                // wait (30 s too) is over, and between that and their delivery again, none is
                // held and a worker waits, as when old workers refuse them (seen in a test on
                // a loaded machine: old workers blamed for a kill).
                && last_outcome.elapsed() >= STALLED * 2
            {
                tracing::warn!(
                    outstanding,
                    workers_waiting = waiting,
                    jobs_version = ledger.version,
                    "no outcome for {STALLED:?}: workers from before job messages of this version (4: binary, which every run sends first; 2: --out or --remove-source; 3: several results; 5: --move-source or --move-failed) refuse them without an outcome (their jobs are published again, as JSON, until a worker that reads them takes them); upgrade the workers"
                );
            } else {
                tracing::warn!(
                    outstanding,
                    workers_waiting = waiting,
                    "no outcome for {STALLED:?}"
                );
            }
        }
    }
}

/// The outcome standing for `w`, an outcome that did not read (`error`) but names its file:
/// failed, `unreadable-outcome`, with what it said. `None` if not even its file reads (a
/// hostile or broken message: nothing to account for).
fn unreadable(w: &wire::WireOutcome, error: &str) -> Option<Outcome> {
    let rel = w.rel.rel().ok()?;
    let said = w.message.as_deref().unwrap_or("");
    let mut message = format!(
        "the worker's outcome does not read ({error}): a newer worker's (upgrade the coordinator), or a broken one's"
    );
    if !said.is_empty() {
        message.push_str(&format!(
            ": the worker said {}",
            wire::in_part(&format!("{said:?}"))
        ));
    }
    Some(Outcome::Failed {
        rel,
        error: FileError::new(Kind::UnreadableOutcome, message),
    })
}

/// How often the coordinator looks for jobs of its run gone from the jobs stream without an
/// outcome, while it awaits outcomes.
const LOOK_FOR_LOST: Duration = STALLED;

/// A look for lost jobs reads the jobs stream in bursts this long, each followed by a pause
/// nine times as long.
const LOOK_PACE: Duration = Duration::from_millis(50);

/// Jobs of the run found gone from the jobs stream, their files still without an outcome.
struct Lost {
    /// The files, each with the publisher's batch it was awaited from (a watched file
    /// published again since is in a newer message, not lost).
    files: HashMap<PathBuf, u64>,
    /// The sequence of the run's last outcome message in the outcome stream once they were
    /// found gone (`None`: there was none): every outcome of theirs is at or before it.
    through: Option<u64>,
}

/// Finds the run's jobs that left the jobs stream without an outcome, and publishes them
/// again. A worker from before a job message's version cannot read it and terminates it,
/// which removes it from the work-queue stream for good: no other worker is ever given it,
/// and the coordinator would wait for ever. In two steps, so that a job finished just before
/// the look is not taken for lost: a worker stores a job's outcomes before it acknowledges
/// the job, so a job gone from the stream has its outcomes stored already, and once every
/// outcome stored by the look has been read, a file still awaited has none coming. A worker
/// from before that takes the job again refuses it again, and the next look finds it gone
/// again: it is published again each look until an up-to-date worker takes it.
struct LostJobs {
    /// When the last look ended: the next one comes `LOOK_FOR_LOST` after. A look costs a
    /// round trip per job message of the run, paced (`LOOK_PACE`) to a tenth of its time, the
    /// first one too, on a thread of its own (`gather`): a large batch's looks are long, but
    /// never hold the outcomes nor a signal.
    last_look: Instant,
    /// Found gone, awaiting the outcomes stored by then.
    found: Option<Lost>,
    /// This coordinator's own, for the message ids (as the publisher's `epoch`).
    epoch: String,
    /// Rounds of publishing again: each has message ids of its own, which the stream's
    /// duplicate window (two minutes) does not drop as the earlier round's.
    rounds: u64,
}

impl LostJobs {
    fn new() -> LostJobs {
        LostJobs {
            last_look: Instant::now(),
            found: None,
            epoch: run_id(),
            rounds: 0,
        }
    }

    /// One step: look, when it is time; or publish again what was found, once the outcomes
    /// stored by then are read. A failure waits for the next look.
    fn tend(
        &mut self,
        conn: &Conn,
        outcomes: &consumer::PullConsumer,
        (head, ledger, events): (&Head, &Ledger, &Sender<Event>),
        stop: &dyn Fn() -> bool,
    ) {
        match self.found.take() {
            None if self.last_look.elapsed() >= LOOK_FOR_LOST => {
                match look_for_lost(conn, head, ledger, stop) {
                    Ok(found) => self.found = found,
                    Err(_) if stop() => {}
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "cannot look for jobs lost from the queue; looking again later")
                    }
                }
                self.last_look = Instant::now();
            }
            None => {}
            Some(lost) => match read_through(conn, outcomes, lost.through) {
                Ok(true) => self.publish_again(conn, head, ledger, events, lost),
                Ok(false) => self.found = Some(lost),
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "cannot read the outcome consumer's state");
                    self.found = Some(lost);
                }
            },
        }
    }

    /// Publishes again the jobs of the `lost` files still awaited from the same message.
    /// Those whose outcome came but did not read count failed instead (`Ledger::unread`).
    fn publish_again(
        &mut self,
        conn: &Conn,
        head: &Head,
        ledger: &Ledger,
        events: &Sender<Event>,
        lost: Lost,
    ) {
        let (Ok(mut expected), Ok(mut unread)) = (ledger.expected.lock(), ledger.unread.lock())
        else {
            return;
        };
        let mut again: Vec<(PathBuf, Awaited)> = Vec::new();
        let mut failed = Vec::new();
        for (rel, batch) in lost.files {
            let Some(awaited) = expected.get(&rel).filter(|a| a.batch == batch).copied() else {
                continue;
            };
            match unread.remove(&rel) {
                Some(o) => {
                    expected.remove(&rel);
                    failed.push(o);
                }
                None => again.push((rel, awaited)),
            }
        }
        drop((expected, unread));
        if !failed.is_empty() {
            tracing::warn!(
                files = failed.len(),
                "jobs of the run left the queue after an outcome that does not read: not published again, counted failed (unreadable-outcome)"
            );
            if events.send(Event::Finished(failed)).is_err() {
                return;
            }
        }
        if again.is_empty() {
            return;
        }
        again.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.rounds += 1;
        // In batches as the sources fill them, a large file alone: the sizes are the
        // settled ones in watch mode, else looked at now (a file gone counts 0, and its
        // worker says it vanished).
        let mut batches: Vec<Vec<WireFile>> = Vec::new();
        let mut fill = BatchFill::default();
        for (rel, awaited) in &again {
            let size = match awaited.expect {
                Some(stamp) => stamp.size,
                None => std::fs::symlink_metadata(head.cfg.root.join(rel)).map_or(0, |m| m.len()),
            };
            if batches.is_empty() || !fill.takes(size) {
                batches.push(Vec::new());
                fill = BatchFill::default();
            }
            fill.add(size);
            if let Some(files) = batches.last_mut() {
                files.push(WireFile {
                    rel: WirePath::of(rel),
                    size: 0,
                    stamp: awaited.expect.as_ref().map(WireStamp::of),
                    replace: awaited.replace,
                });
            }
        }
        let subject = head.subject();
        // As JSON, which a worker from before version 4 (binary) reads, as the run's later
        // jobs go too: a lost job may be one such a worker refused.
        let was_binary = !ledger.json.swap(true, Ordering::AcqRel);
        let (mut files, mut messages) = (0usize, 0u64);
        let sent = batches.iter().try_for_each(|batch| {
            let mut rest = &batch[..];
            while !rest.is_empty() {
                let (n, payload) = head.message(rest, Format::Json)?;
                messages += 1;
                let id = format!(
                    "{}.{}.again{}.{messages}",
                    head.run, self.epoch, self.rounds
                );
                conn.rt.block_on(async {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    let ack = conn
                        .js
                        .publish_with_headers(subject.clone(), headers, payload.into())
                        .await?;
                    ack.await.map_err(anyhow::Error::from)
                })?;
                files += n;
                rest = &rest[n..];
            }
            anyhow::Ok(())
        });
        let version = ledger.version;
        if files > 0 {
            if was_binary {
                tracing::warn!(
                    files,
                    messages,
                    jobs_version = version,
                    round = self.rounds,
                    "jobs of the run left the queue without an outcome: a worker that does not know job version 4 refused them; republished as JSON (version {version}), as the run's jobs are from now on (a worker from before version 4 reads them; one from before version {version} refuses them again, and they are republished again, until an up-to-date worker takes them: upgrade the workers)"
                );
            } else if version > wire::VERSION {
                tracing::warn!(
                    files,
                    messages,
                    jobs_version = version,
                    round = self.rounds,
                    "jobs of the run left the queue without an outcome: a worker that does not know job version {version} refused them; republished (a worker from before refuses them again, and they are republished again, until an up-to-date worker takes them: upgrade the workers)"
                );
            } else {
                tracing::warn!(
                    files,
                    messages,
                    jobs_version = version,
                    round = self.rounds,
                    "jobs of the run left the queue without an outcome: a worker that cannot read them refused them, or the jobs stream lost them; republished"
                );
            }
        }
        if let Err(e) = sent {
            tracing::warn!(
                error = %format!("{e:#}"),
                files = again.len() - files,
                "republishing jobs lost from the queue failed; the next look finds them again"
            );
        }
    }
}

/// The files awaited whose job messages are all stored and none of which is in the jobs
/// stream now (`None`: no such file), with the outcome stream's place by then.
fn look_for_lost(
    conn: &Conn,
    head: &Head,
    ledger: &Ledger,
    stop: &dyn Fn() -> bool,
) -> Result<Option<Lost>> {
    // Read before the stream is: a file of a batch stored by now was in the stream before
    // the reading began, and a file found missing left it since.
    let stored = ledger.stored.load(Ordering::Acquire);
    let any = ledger
        .expected
        .lock()
        .map_err(|_| anyhow!("the ledger is poisoned"))?
        .values()
        .any(|a| a.batch <= stored);
    if !any {
        return Ok(None);
    }
    // Said as it begins: a long look is then seen for what it is (and waited on by a test).
    tracing::debug!(
        stored_batches = stored,
        "looking for jobs lost from the queue"
    );
    let queued = queued(conn, head.root, head.run, Some(stop))?;
    // Read after: a job gone from the stream was acknowledged (or terminated) before, and
    // its outcomes were stored before that.
    let through = last_outcome_message(conn, head.run)?;
    let expected = ledger
        .expected
        .lock()
        .map_err(|_| anyhow!("the ledger is poisoned"))?;
    let files: HashMap<PathBuf, u64> = expected
        .iter()
        .filter(|(rel, a)| a.batch <= stored && !queued.contains(*rel))
        .map(|(rel, a)| (rel.clone(), a.batch))
        .collect();
    Ok((!files.is_empty()).then_some(Lost { files, through }))
}

/// The sequence of `run`'s last outcome message in the outcome stream, if it has one.
fn last_outcome_message(conn: &Conn, run: &str) -> Result<Option<u64>> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    conn.rt.block_on(async {
        let stream = conn.js.get_stream(OUTCOMES_STREAM).await?;
        match stream
            .get_last_raw_message_by_subject(&outcomes_subject(run))
            .await
        {
            Ok(m) => Ok(Some(m.sequence)),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(anyhow!("looking up the run's last outcome: {e}")),
        }
    })
}

/// Whether every outcome message of the run up to `through` has been read and handed on
/// (acknowledged once handed to the reporter), or every one there is has.
fn read_through(
    conn: &Conn,
    outcomes: &consumer::PullConsumer,
    through: Option<u64>,
) -> Result<bool> {
    let info = consumer_info(conn, outcomes)?;
    let past = through.is_none_or(|seq| info.ack_floor.stream_sequence >= seq);
    Ok(past || info.num_pending == 0 && info.num_ack_pending == 0)
}

/// Reads a resumed run's outcomes so far, from its first, to the reporter (each file's first
/// outcome that still holds; digests read as `hashes`'), and returns the files they account
/// for, and every file that has an outcome at all.
fn replay(
    conn: &Conn,
    outcomes: &consumer::PullConsumer,
    run: &str,
    cfg: &Config,
    hashes: &[HashAlgo],
    events: &Sender<Event>,
) -> Result<(HashSet<PathBuf>, HashSet<PathBuf>)> {
    let mut accounted = HashSet::new();
    let mut seen = HashSet::new();
    loop {
        let msgs = conn
            .rt
            .block_on(take(outcomes, 256, Duration::from_millis(500)))?;
        if msgs.is_empty() {
            let mut c = outcomes.clone();
            let pending = conn
                .rt
                .block_on(async { anyhow::Ok(c.info().await?.num_pending) })?;
            if pending == 0 {
                break;
            }
            continue;
        }
        let mut firsts = Vec::new();
        for m in &msgs {
            let Some(batch) = outcomes_of(m, run) else {
                continue;
            };
            for w in &batch.outcomes {
                let Ok(o) = w.outcome(hashes) else { continue };
                seen.insert(o.rel().to_path_buf());
                // Counted only if done and the file is still the version the worker read: a
                // file changed or deleted while the coordinator was down is published again
                // (or, gone, not listed), and a failure is tried again. With --remove-source
                // (or --move-source) a done file's input is gone because the worker removed
                // (or moved) it.
                // A failure whose input --move-failed took out of the tree cannot be tried
                // again: it stands, counted as the run without the kill counts it.
                let now = Stamp::of(&cfg.root.join(o.rel()));
                let still = match (&o, now) {
                    (Outcome::Done { .. }, Some(now)) => w.read == Some(WireStamp::of(&now)),
                    (Outcome::Done { .. }, None) => cfg.remove_source || cfg.move_source.is_some(),
                    (Outcome::Failed { .. }, None) => cfg.move_failed.is_some(),
                    _ => false,
                };
                if still && accounted.insert(o.rel().to_path_buf()) {
                    firsts.push(o);
                }
            }
        }
        if !firsts.is_empty() {
            events
                .send(Event::Finished(firsts))
                .map_err(|_| anyhow!("the reporter has stopped"))?;
        }
        ack_all(conn, &msgs);
    }
    tracing::info!(
        files = accounted.len(),
        "outcomes of the run so far read again"
    );
    Ok((accounted, seen))
}

/// The files of `run`'s job messages still in the jobs stream: those a killed coordinator
/// published that no worker has finished (a message leaves a work-queue stream once a worker
/// acknowledges it, after publishing its outcomes; a worker gives up on one after
/// `MAX_DELIVER` deliveries with a failed outcome). Read after the replay, so a job finished in
/// between is either in the outcomes to come or published again, counted once either way.
/// With `look` (a look for lost jobs, not a resumed run's start): paced, so that the requests
/// take at most a tenth of the time (`LOOK_PACE`), and ended early (an error) once `look`
/// says stop.
fn queued(
    conn: &Conn,
    root: &str,
    run: &str,
    look: Option<&dyn Fn() -> bool>,
) -> Result<HashSet<PathBuf>> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let subject = jobs_subject(root, run);
    let files = conn.rt.block_on(async {
        let stream = conn.js.get_stream(JOBS_STREAM).await?;
        let mut files = HashSet::new();
        let mut next = 0u64;
        let stopped = || look.is_some_and(|stop| stop());
        let mut burst = Instant::now();
        loop {
            if stopped() {
                return Err(anyhow!("listing the run's queued jobs: stopped"));
            }
            if look.is_some() && burst.elapsed() >= LOOK_PACE {
                // A pause nine times the burst: the server serves outcomes and publishes first.
                let until = Instant::now() + 9 * burst.elapsed();
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    if stopped() {
                        return Err(anyhow!("listing the run's queued jobs: stopped"));
                    }
                    tokio::time::sleep(left.min(LOOK_PACE)).await;
                }
                burst = Instant::now();
            }
            let m = match stream
                .get_first_raw_message_by_subject(&subject, next)
                .await
            {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), RawMessageErrorKind::NoMessageFound) => break,
                Err(e) => return Err(anyhow!("listing the run's queued jobs: {e}")),
            };
            next = m.sequence + 1;
            match JobBatch::parse(&m.payload) {
                // The subject's run and root (a worker refuses a message whose body names
                // another root, with no outcome to wait for).
                Ok(batch) if batch.run == run && batch.root == root => {
                    files.extend(batch.files.iter().map(|f| f.rel.lossy()));
                }
                // Not ours to wait for: a worker fails it, nobody publishes an outcome of it.
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "a queued job message that does not read: ignored")
                }
            }
        }
        anyhow::Ok(files)
    })?;
    Ok(files)
}

/// An outcome message of `run`, read; `None` (said, if it does not read) for anything else.
fn outcomes_of(m: &async_nats::jetstream::Message, run: &str) -> Option<OutcomeBatch> {
    let batch = match OutcomeBatch::parse(&m.payload) {
        Ok(b) => b,
        Err(error) => {
            tracing::warn!(%error, "an outcome message that does not read: ignored");
            return None;
        }
    };
    (batch.readable() && batch.run == run).then_some(batch)
}

/// Acknowledges outcome messages handed to the reporter (an ack lost only costs a duplicate,
/// which is dropped).
fn ack_all(conn: &Conn, msgs: &[async_nats::jetstream::Message]) {
    conn.rt.block_on(async {
        for m in msgs {
            let _ = m.ack().await;
        }
    });
}

/// Whether `run` was cancelled by its coordinator (its cancellation is stored).
fn cancelled(conn: &Conn, run: &str) -> Result<bool> {
    conn.rt
        .block_on(crate::cluster::stored_cancellation(&conn.js, run))
}

/// A watched file's outcome, checked against the version of the file it was published for
/// (`settled`, the coordinator's stamp). A worker's outcome counts for that version only if
/// it read the same size and mtime: else the file changed in between (or the outcome is a
/// late one, of a job for an earlier version), and the file is looked at again, as a local
/// watch does with a file changed after it settled. Recorded with the coordinator's own stamp,
/// which its next scan compares with: the worker's inode and ctime may differ on another
/// host's mount. A file deleted before a worker got to it is no failure, as in a local watch.
fn of_version(outcome: Outcome, settled: &Stamp, read: Option<WireStamp>, root: &Path) -> Outcome {
    match outcome {
        Outcome::Done { rel, mut done } => {
            if read == Some(WireStamp::of(settled)) {
                done.stamp = Some(*settled);
                Outcome::Done { rel, done }
            } else {
                Outcome::Failed {
                    rel,
                    error: FileError::new(
                        Kind::Changed,
                        "changed between settling here and its read by a worker",
                    ),
                }
            }
        }
        // Not found by the worker: deleted, if this host finds it gone too; else a view of the
        // tree that differs between hosts (a mount lagging behind), tried again later.
        Outcome::Failed { rel, error } | Outcome::Skipped { rel, reason: error }
            if error.kind == Kind::Vanished =>
        {
            if Stamp::of(&root.join(&rel)).is_none() {
                Outcome::Skipped {
                    rel,
                    reason: FileError::new(Kind::Vanished, "deleted before it was processed"),
                }
            } else {
                Outcome::Failed {
                    rel,
                    error: FileError::new(
                        Kind::Changed,
                        "a worker did not find it, but it is here: tried again",
                    ),
                }
            }
        }
        other => other,
    }
}

/// The files published and without an outcome, once the coordinator stops waiting. A batch
/// reports them as not processed. A watch leaves them out of its state, so that its next
/// start finds them again, and says how many.
fn interrupted(ledger: &Ledger, events: &Sender<Event>, watching: bool) -> Result<()> {
    let expected = ledger
        .expected
        .lock()
        .map_err(|_| anyhow!("the ledger is poisoned"))?;
    if watching {
        if !expected.is_empty() {
            tracing::info!(
                files = expected.len(),
                "stopping with files no worker finished: the next start takes them again"
            );
        }
        return Ok(());
    }
    let left: Vec<Outcome> = expected
        .keys()
        .map(|rel| Outcome::Skipped {
            rel: rel.clone(),
            reason: FileError::new(
                Kind::Interrupted,
                "not processed: the run was interrupted before a worker finished it",
            ),
        })
        .collect();
    if !left.is_empty() {
        events
            .send(Event::Finished(left))
            .map_err(|_| anyhow!("the reporter has stopped"))?;
    }
    Ok(())
}

/// Jobs of this root delivered to workers and not yet acknowledged (all runs').
fn in_flight(conn: &Conn, workers: &consumer::PullConsumer) -> Result<usize> {
    Ok(consumer_info(conn, workers)?.num_ack_pending)
}

/// Workers of this root asking for jobs right now.
fn consumer_info(conn: &Conn, workers: &consumer::PullConsumer) -> Result<consumer::Info> {
    let mut c = workers.clone();
    conn.rt
        .block_on(async { anyhow::Ok(c.info().await?.clone()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::travel::Done;

    fn stamp(size: u64) -> Stamp {
        Stamp {
            size,
            mtime_ns: 7,
            ctime_ns: 8,
            inode: 9,
        }
    }

    fn done(rel: &str) -> Outcome {
        Outcome::Done {
            rel: rel.into(),
            done: Box::new(Done {
                bytes_in: 1,
                bytes_out: 0,
                digests: Vec::new(),
                note: None,
                stamp: None,
                unchanged: false,
                only: None,
            }),
        }
    }

    #[test]
    fn a_watched_file_s_outcome_counts_only_for_the_version_it_was_published_for() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let settled = stamp(10);
        // Read as it settled: done, with the coordinator's own stamp (inode and ctime too).
        let same = Some(WireStamp::of(&stamp(10)));
        match of_version(done("a"), &settled, same, root) {
            Outcome::Done { done, .. } => assert_eq!(done.stamp, Some(settled)),
            other => panic!("{other:?}"),
        }
        // Read at another size (changed since, or a late outcome of an earlier job), or
        // with no stamp said: looked at again.
        for read in [Some(WireStamp::of(&stamp(11))), None] {
            match of_version(done("a"), &settled, read, root) {
                Outcome::Failed { error, .. } => assert_eq!(error.kind, Kind::Changed),
                other => panic!("{other:?}"),
            }
        }
        // Not found by a worker: deleted, if it is gone here too; else tried again.
        let vanished = || Outcome::Failed {
            rel: "a".into(),
            error: FileError::new(Kind::Vanished, "gone"),
        };
        assert!(matches!(
            of_version(vanished(), &settled, None, root),
            Outcome::Skipped { reason, .. } if reason.kind == Kind::Vanished
        ));
        std::fs::write(root.join("a"), b"here").unwrap();
        assert!(matches!(
            of_version(vanished(), &settled, None, root),
            Outcome::Failed { error, .. } if error.kind == Kind::Changed
        ));
    }
}
