//! The reporter: the one thread that owns the progress display, the per-file records, the
//! counts and the sink.
//!
//! Invariants: every `Outcome` is counted exactly once as done, skipped or failed, so the totals
//! always add up to the files the source found; nothing else writes progress or records, so
//! lines never tear; the sink sees every outcome before it is counted, and a listening source
//! hears of a file only once the sink has flushed its outcome.

pub(crate) mod metrics;
mod progress;
mod summary;

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::config::Config;
use crate::error::{FileError, Kind};
use crate::logging::FAILURES;
use crate::signals::Shutdown;
use crate::sink::{Disposition, Sink};
use crate::travel::{Event, Outcome, Recorded, Stamp, Stats};

use progress::Progress;
pub(crate) use summary::{Stopped, Summary};

/// The shortest time between two flushes of the sink (state commits in watch mode), and so the
/// longest an outcome waits for one.
const FLUSH_WITHIN: Duration = Duration::from_millis(50);

/// The files the sink took since its last good flush: how many a failed flush may have left
/// unrecorded (`Summary::unrecorded`). Files, not attempts: watch mode tries a file again,
/// within one flush too, and a cluster worker takes a job delivered again, so they keep their
/// names (hashed with foldhash, not SipHash); a batch has one outcome per file, and counts
/// them (keeping every name cost an unchanged rerun of 50,000 files a tenth of its reporter's
/// time).
enum SinceFlush {
    Counted(u64),
    Named(HashSet<PathBuf, foldhash::fast::RandomState>),
}

impl SinceFlush {
    fn new(cfg: &Config) -> Self {
        // A cluster worker's pipeline lives on too, and takes a job again when it is delivered
        // again (found by a review).
        if cfg.watch.is_some() || cfg.coordinated {
            SinceFlush::Named(HashSet::default())
        } else {
            SinceFlush::Counted(0)
        }
    }

    fn add(&mut self, rel: &Path) {
        match self {
            SinceFlush::Counted(n) => *n += 1,
            SinceFlush::Named(set) => {
                set.insert(rel.to_path_buf());
            }
        }
    }

    fn clear(&mut self) {
        match self {
            SinceFlush::Counted(n) => *n = 0,
            SinceFlush::Named(set) => set.clear(),
        }
    }

    fn len(&self) -> u64 {
        match self {
            SinceFlush::Counted(n) => *n,
            SinceFlush::Named(set) => set.len() as u64,
        }
    }
}

/// How the source's thread ended: raised by it before it lets go of its sender of events.
#[derive(Debug, Default)]
pub(crate) struct SourceEnd {
    /// It failed (or panicked): what it sent is not the whole tree.
    pub(crate) failed: AtomicBool,
    /// It stopped because the run was asked to (a signal, a sink's failure), maybe before it
    /// had sent every file.
    pub(crate) cut: AtomicBool,
}

/// Receives events until every sender is gone, then finishes the sink and returns the counts.
/// `recorded`, if given, hears of each file once the sink has flushed its outcome.
/// Where `source` failed, its outcomes are not the whole tree: the sink is then abandoned, not
/// finished (`Sink::abandon`); so too where a sink's failure stopped the run short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    cfg: &Config,
    op: &'static str,
    events: Receiver<Event>,
    stats: &Stats,
    sink: &mut dyn Sink,
    recorded: Option<Sender<Vec<Recorded>>>,
    shutdown: &Shutdown,
    source: &SourceEnd,
) -> Result<Summary> {
    let started = Instant::now();
    let mut progress = Progress::new(cfg);
    let meter = metrics::Meter::new(cfg, op);
    let mut summary = Summary {
        op,
        ..Summary::default()
    };
    // The first sink failure (a manifest or state write): from then on the run is being shut
    // down, but events are still drained, so no worker or sentinel ever blocks on a full
    // channel and every outcome is still counted.
    let mut failure: Option<anyhow::Error> = None;
    // Whether `failure` is set, for the end (`guard` holds `failure` until then).
    let failed = std::cell::Cell::new(false);
    let mut guard = |r: Result<()>| {
        if let Err(e) = r {
            if failure.is_none() {
                failed.set(true);
                tracing::error!("stopping: {e:#}");
                shutdown.request(0);
                failure = Some(e);
            }
        }
    };
    // Outcomes wait for a flush (a state commit) at most FLUSH_WITHIN after the last one: a
    // lone file after a quiet spell is committed at once, a stream or a burst 20 times a
    // second. Each commit rewrites every state page it touched, and a burst's rows land all
    // over the table: committing per worker batch wrote about one page per row.
    let mut last_flush: Option<Instant> = None;
    // Outcomes recorded by the sink and not yet flushed, for a listening source.
    let mut unreported: Vec<Recorded> = Vec::new();
    let mut unflushed = false;
    // Outcomes the sink took since its last good flush, and whether a flush failed: once one
    // has, nothing after it is known recorded (a failed commit may have rolled back; see
    // `Summary::unrecorded`).
    let mut flushes = Flushes {
        since: SinceFlush::new(cfg),
        failed: false,
        held: false,
    };
    let flush_due = |last: Option<Instant>| last.is_none_or(|t| t.elapsed() >= FLUSH_WITHIN);
    let idle_flush = sink.flush_when_idle();
    loop {
        let wait = match (unflushed, last_flush) {
            (true, Some(t)) => FLUSH_WITHIN.saturating_sub(t.elapsed()),
            _ => Duration::from_millis(200),
        };
        let event = match events.recv_timeout(wait) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => {
                if unflushed {
                    let r = flush(cfg, sink, &mut unreported, recorded.as_ref());
                    flushes.after(&r, sink.still_held());
                    guard(r);
                    last_flush = Some(Instant::now());
                    unflushed = false;
                }
                progress.refresh(stats, &summary);
                meter.gauges(stats);
                guard(sink.tick());
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match event {
            Event::Started { worker, rel } => {
                if let Some(bar) = progress.workers.get(worker) {
                    bar.set_message(crate::logging::shown(&rel.to_string_lossy()));
                }
            }
            Event::Finished(outcomes) => {
                for outcome in outcomes {
                    let disposition = sink.outcome(&outcome);
                    // Only what the sink took is ever reported recorded: a failed write (which
                    // stops the run) must not let a source forget or acknowledge the file.
                    let taken = disposition.is_ok();
                    let disposition = disposition.unwrap_or_else(|e| {
                        guard(Err(e));
                        Disposition::Final
                    });
                    if taken && recorded.is_some() {
                        unreported.push(Recorded {
                            rel: outcome.rel().to_path_buf(),
                            retry_after: match disposition {
                                Disposition::Retry(after) => Some(after),
                                Disposition::Final => None,
                            },
                            output_blocked: matches!(
                                &outcome,
                                Outcome::Failed { error, .. } if error.kind == Kind::OutputExists
                            ),
                        });
                    }
                    // Files, not attempts: a file tried again within a flush is one file.
                    if !matches!(&outcome, Outcome::Skipped { reason, .. } if reason.kind == Kind::Interrupted)
                    {
                        flushes.since.add(outcome.rel());
                    }
                    // A file blocked at its output name: which version it is (one lstat, for
                    // such files only).
                    let stamp = (blocks(&outcome) || summary.blocked.contains_key(outcome.rel()))
                        .then(|| Stamp::of(&cfg.root.join(outcome.rel())))
                        .flatten();
                    // One still blocked, tried again (at a poll), has ended so already:
                    // counted once, here as in the summary.
                    if !summary.blocked_again(&outcome, stamp) {
                        meter.outcome(&outcome, &disposition);
                    }
                    summary.count(outcome, disposition, stamp, &mut progress);
                }
                unflushed = true;
                stats.done.store(summary.done, Ordering::Relaxed);
                stats.skipped.store(summary.skipped, Ordering::Relaxed);
                stats.failed.store(summary.failed, Ordering::Relaxed);
                progress.refresh(stats, &summary);
                meter.gauges(stats);
            }
            Event::Unchanged(files) => {
                let taken = sink.unchanged(&files);
                if taken.is_ok() && recorded.is_some() {
                    unreported.extend(files.iter().map(|(name, _)| Recorded {
                        rel: PathBuf::from(std::ffi::OsStr::from_bytes(name)),
                        retry_after: None,
                        output_blocked: false,
                    }));
                }
                guard(taken);
                // Not added to `flushes.since`: their rows are left as they are, and a failed
                // flush loses nothing of theirs (they were counted as unrecorded: found by a
                // review).
                meter.unchanged(files.len());
                summary.count_unchanged(files.len() as u64, &mut progress);
                unflushed = true;
                stats.done.store(summary.done, Ordering::Relaxed);
                progress.refresh(stats, &summary);
            }
            Event::Unlisted(rels) => {
                guard(sink.unlisted(&rels));
                // No longer files: none of them waits for another attempt (a directory read
                // at last, whose failure to be read was one), nor ends failed at the end.
                if !summary.waiting.is_empty() {
                    for rel in &rels {
                        summary.waiting.remove(rel);
                    }
                }
                unflushed = true;
            }
            Event::Removed(rel) => {
                guard(sink.removed(&rel));
                // A file waiting to be tried again that is deleted ends nowhere: not a failure.
                if !summary.waiting.is_empty() {
                    summary.waiting.retain(|p, _| !p.starts_with(&rel));
                }
                // One blocked at its output name ended failed: a file made at the name later
                // is another, counted on its own.
                if !summary.blocked.is_empty() {
                    summary.blocked.retain(|p, _| !p.starts_with(&rel));
                }
                unflushed = true;
            }
        }
        if unflushed && (flush_due(last_flush) || idle_flush && idle(stats)) {
            let r = flush(cfg, sink, &mut unreported, recorded.as_ref());
            flushes.after(&r, sink.still_held());
            guard(r);
            last_flush = Some(Instant::now());
            unflushed = false;
        }
        // Also while events keep coming: a steady stream must not starve periodic work.
        guard(sink.tick());
    }
    for b in progress.workers.drain(..) {
        b.finish_and_clear();
    }
    progress.overall.finish_and_clear();
    // Read once every sender is gone, the source's among them: it raised the flag before.
    // The last outcomes recorded first, on their own: a failure of what comes after (a
    // batch's manifest) says nothing of the record. (`finish` and `abandon` begin with a flush,
    // then find nothing to do.)
    if unflushed {
        let r = flush(cfg, sink, &mut unreported, recorded.as_ref());
        flushes.after(&r, sink.still_held());
        guard(r);
    }
    // A run stopped short by a sink's failure (a state that cannot be written: a full disk)
    // saw part of the tree, as one whose source failed did: a batch's manifest written from it
    // would replace a whole one with a short one (found by review r57), so neither publishes
    // one. Short: its source cut off, or a file left unprocessed; a failure once every file had
    // its outcome (the last commit) leaves a whole manifest to write. (A signal's stop is the
    // user's, and writes the manifest for what was done: README.)
    let short = source.cut.load(Ordering::SeqCst)
        || summary
            .skipped_by_reason
            .contains_key(Kind::Interrupted.as_str());
    if source.failed.load(Ordering::SeqCst) || failed.get() && short {
        guard(sink.abandon());
    } else {
        guard(sink.finish());
    }
    let secs = started.elapsed().as_secs_f64();
    summary.seconds = secs;
    summary.bytes_per_second = summary.bytes_in as f64 / secs.max(1e-9);
    if cfg.op.compresses() && summary.bytes_in > 0 {
        summary.ratio = Some(summary.bytes_out as f64 / summary.bytes_in as f64);
    }
    summary.stale_temps_removed = stats.stale_temps_removed.load(Ordering::Relaxed);
    // Files still waiting for another attempt end as their last attempt did.
    for (rel, kind) in std::mem::take(&mut summary.waiting) {
        // Blocked at its output name before, then taken again: it ends as this attempt did,
        // once (it counted twice: found by a review).
        if !summary.blocked.is_empty() && summary.blocked.remove(&rel).is_some() {
            summary.uncount_blocked();
        }
        summary.files += 1;
        summary.failed += 1;
        *summary.failed_by_reason.entry(kind).or_default() += 1;
    }
    if let Some(error) = failure {
        let error = if short && cfg.watch.is_none() {
            match no_manifest(cfg) {
                Some(said) => error.context(said),
                None => error,
            }
        } else {
            error
        };
        summary.error = Some(format!("{error:#}"));
        if flushes.failed || flushes.held {
            summary.unrecorded = flushes.since.len();
        }
        return Err(Stopped {
            error,
            summary: Box::new(summary),
            cfg: None,
        }
        .into());
    }
    Ok(summary)
}

/// What a batch that publishes no manifest from part of its tree (`Sink::abandon`) says of
/// it: the manifests already at the paths are left as they were, and none is printed to
/// stdout; `None` for a run without a manifest (no hash).
pub(crate) fn no_manifest(cfg: &Config) -> Option<String> {
    if cfg.spec.hashes().is_empty() {
        return None;
    }
    let there: Vec<String> = (cfg.spec.hashes().iter())
        .filter_map(|&algo| cfg.manifest_for(algo))
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| p.display().to_string())
        .collect();
    Some(match (&cfg.manifest, there.as_slice()) {
        (None, _) => "no manifest printed".to_string(),
        (Some(_), []) => "no manifest written".to_string(),
        (Some(_), [one]) => format!("no manifest written ({one} left as it was)"),
        (Some(_), there) => format!(
            "no manifest written ({} left as they were)",
            there.join(", ")
        ),
    })
}

/// Whether every file sent to the workers has its outcome counted: the pipeline has nothing
/// in hand. (A file to be tried again is not counted: the pipeline is taken as busy then, and
/// the flush waits for `FLUSH_WITHIN` as before.)
fn idle(stats: &Stats) -> bool {
    let sent = stats.files.load(Ordering::Relaxed) + stats.reported.load(Ordering::Relaxed);
    let counted = stats.done.load(Ordering::Relaxed)
        + stats.skipped.load(Ordering::Relaxed)
        + stats.failed.load(Ordering::Relaxed);
    counted >= sent
}

impl Summary {
    /// Takes back the count of a file that failed `output-exists` (see `blocked`).
    fn uncount_blocked(&mut self) {
        self.files -= 1;
        self.failed -= 1;
        let reason = Kind::OutputExists.as_str();
        if let Some(n) = self.failed_by_reason.get_mut(reason) {
            *n -= 1;
            if *n == 0 {
                self.failed_by_reason.remove(reason);
            }
        }
    }
}

/// Whether `outcome` is a failure for an output name taken by another's file.
fn blocks(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Failed { error, .. } if error.kind == Kind::OutputExists)
}

/// What the flushes so far leave unrecorded (see `Summary::unrecorded`).
struct Flushes {
    /// Outcomes the sink took since its last good flush.
    since: SinceFlush,
    /// A flush failed that may have lost what it held (a transaction SQLite rolled back):
    /// nothing after it is known recorded.
    failed: bool,
    /// The last flush failed with all it did not make durable held for the next one.
    held: bool,
}

impl Flushes {
    /// Accounts for a flush's result `r`: a good one leaves no outcome unrecorded, unless one
    /// failed before it and may have lost what it held. One that failed with everything it did
    /// not make durable `still_held` (a transaction left open) lost nothing yet: a good one
    /// after it records that too (a watch stopped by a full state disk said 1,936 files
    /// unrecorded of which 208 were in the state: found by CI).
    fn after(&mut self, r: &Result<()>, still_held: bool) {
        match r {
            Err(_) if still_held => self.held = true,
            Err(_) => self.failed = true,
            Ok(()) => {
                self.held = false;
                if !self.failed {
                    self.since.clear();
                }
            }
        }
    }
}

/// Flushes the sink and then, if it succeeded, tells a listening source which files it
/// recorded: one message per flush, so a burst does not wake the source per file.
fn flush(
    cfg: &Config,
    sink: &mut dyn Sink,
    unreported: &mut Vec<Recorded>,
    recorded: Option<&Sender<Vec<Recorded>>>,
) -> Result<()> {
    sink.flush()?;
    if cfg.watch.is_some() {
        // Watch mode's sink is the state: its flush is a commit.
        metrics::committed(cfg);
    }
    if let Some(tx) = recorded {
        if !unreported.is_empty() {
            // The source may have stopped (a shutdown): then nobody needs to hear.
            let _ = tx.send(std::mem::take(unreported));
        }
    }
    Ok(())
}

impl Summary {
    /// Whether `outcome` is a file counted failed `output-exists` failing so again, the same
    /// version (`stamp`, its stamp now): counted once (`blocked`).
    fn blocked_again(&self, outcome: &Outcome, stamp: Option<Stamp>) -> bool {
        blocks(outcome)
            && !self.blocked.is_empty()
            && self.blocked.get(outcome.rel()) == Some(&stamp)
    }

    /// Accounts for `n` files done from the state, unread (`Event::Unchanged`): as many
    /// `Outcome::Done`s would be, that have nothing to log.
    fn count_unchanged(&mut self, n: u64, progress: &mut Progress) {
        self.files += n;
        self.done += n;
        self.unchanged += n;
        progress.files_done += n;
    }

    /// Accounts for one outcome: counts, progress, the per-file record. A failure the sink
    /// will try again is an attempt, not a file: it is logged, and counted when the file ends.
    fn count(
        &mut self,
        outcome: Outcome,
        disposition: Disposition,
        stamp: Option<Stamp>,
        progress: &mut Progress,
    ) {
        let op = self.op;
        if self.blocked_again(&outcome, stamp) {
            // Still blocked: counted already, logged again (the failure log is a record of
            // attempts). The progress bar counts the attempt, as it counted it sent.
            if let Outcome::Failed { rel, error } = &outcome {
                progress.multi.suspend(|| record("failed", op, rel, error));
            }
            progress.files_done += 1;
            return;
        }
        if let (Disposition::Retry(_), Outcome::Failed { rel, error }) = (&disposition, &outcome) {
            // Blocked before as another version: that one stays counted as it ended.
            if (self.blocked.get(rel)).is_some_and(|was| *was != stamp) {
                self.blocked.remove(rel);
            }
            self.retries += 1;
            let kind = error.kind.as_str();
            // Logged once per reason: a file held open for hours is tried every minute, and
            // the failure log is never truncated.
            if self.waiting.insert(rel.clone(), kind) != Some(kind) {
                progress
                    .multi
                    .suspend(|| record("retrying", op, rel, error));
            }
            return;
        }
        let was = (!self.blocked.is_empty())
            .then(|| self.blocked.remove(outcome.rel()))
            .flatten();
        if was.is_some_and(|was| was == stamp) {
            // Taken again once its output name was freed, the same version: counted by how
            // it ends now. A version changed since is another file's outcome, and the
            // blocked one stays counted as it ended.
            self.uncount_blocked();
        }
        let rel = match &outcome {
            Outcome::Done { rel, .. }
            | Outcome::Skipped { rel, .. }
            | Outcome::Failed { rel, .. } => rel,
        };
        if !self.waiting.is_empty() {
            self.waiting.remove(rel);
        }
        self.files += 1;
        progress.files_done += 1;
        match outcome {
            Outcome::Done { rel, done } => {
                self.done += 1;
                self.unchanged += u64::from(done.unchanged);
                self.bytes_in += done.bytes_in;
                self.bytes_out += done.bytes_out;
                progress.bytes_done += done.bytes_in;
                match &done.note {
                    // Several results from one read: hashed, but its compression was skipped
                    // (already compressed, or its output is up to date), as a compressor alone
                    // would have skipped the file. Not a warning.
                    Some(note) if matches!(note.kind, Kind::AlreadyCompressed | Kind::UpToDate) => {
                        progress.multi.suspend(|| record("hashed", op, &rel, note));
                    }
                    Some(note) => {
                        self.warnings += 1;
                        progress.multi.suspend(|| record("kept", op, &rel, note));
                    }
                    None => {}
                }
            }
            Outcome::Skipped { rel, reason } => {
                self.skipped += 1;
                *self
                    .skipped_by_reason
                    .entry(reason.kind.as_str())
                    .or_default() += 1;
                progress
                    .multi
                    .suspend(|| record("skipped", op, &rel, &reason));
            }
            Outcome::Failed { rel, error } => {
                self.failed += 1;
                if error.kind == Kind::OutputExists {
                    self.blocked.insert(rel.clone(), stamp);
                }
                *self
                    .failed_by_reason
                    .entry(error.kind.as_str())
                    .or_default() += 1;
                progress
                    .multi
                    .suspend(|| record("failed", op, &rel, &error));
            }
        }
    }
}

/// Emits one per-file record: a human line on stderr (by verbosity) and a failure-log line.
pub(crate) fn record(status: &'static str, op: &'static str, rel: &Path, e: &FileError) {
    let bytes = rel.as_os_str().as_bytes();
    let path = rel.to_string_lossy();
    // The lossy form replaces invalid bytes; the hex form lets scripts recover the exact name.
    let path_hex = std::str::from_utf8(bytes)
        .is_err()
        .then(|| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let error = e.kind.as_str();
    let errno = e.errno;
    let path_hex = path_hex.as_deref();
    let run = crate::logging::run_id();
    match status {
        "skipped" | "retrying" | "hashed" => {
            tracing::info!(target: FAILURES, status, path = %path, path_hex, op, error, errno, run, "{}", e.message)
        }
        _ => {
            tracing::warn!(target: FAILURES, status, path = %path, path_hex, op, error, errno, run, "{}", e.message)
        }
    }
}
