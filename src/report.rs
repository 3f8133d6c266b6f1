//! The reporter: the one thread that owns the progress bars, the manifest, the per-file records
//! and the counts.
//!
//! Invariants: every `Outcome` is counted exactly once as done, skipped or failed, so the totals
//! always add up to the files the source found; nothing else writes progress or the manifest,
//! so lines never tear; the manifest is sorted by raw path bytes and written atomically once
//! the workers are finished (including after an interrupt, for the files that were done).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::cli::OpKind;
use crate::config::Config;
use crate::error::FileError;
use crate::logging::FAILURES;
use crate::manifest;
use crate::output::{Dir, TempOutput};
use crate::signals::Shutdown;
use crate::travel::{Event, Outcome, Stats};

/// The shortest time between two flushes of the sink (state commits in watch mode), and so the
/// longest an outcome waits for one.
const FLUSH_WITHIN: Duration = Duration::from_millis(50);

/// The final account of a run.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// The operation.
    pub op: &'static str,
    /// Files accounted for (done + skipped + failed).
    pub files: u64,
    /// Files processed and published.
    pub done: u64,
    /// Files deliberately left alone.
    pub skipped: u64,
    /// Files that could not be processed.
    pub failed: u64,
    /// Skipped files by reason.
    pub skipped_by_reason: BTreeMap<&'static str, u64>,
    /// Failed files by error kind.
    pub failed_by_reason: BTreeMap<&'static str, u64>,
    /// Done files that carry a warning (e.g. a hard-linked input kept).
    pub warnings: u64,
    /// Bytes read from done files.
    pub bytes_in: u64,
    /// Bytes written (gzip).
    pub bytes_out: u64,
    /// bytes_out / bytes_in (gzip).
    pub ratio: Option<f64>,
    /// Wall time of the run.
    pub seconds: f64,
    /// bytes_in per second.
    pub bytes_per_second: f64,
    /// Temp files of crashed earlier runs that were removed.
    pub stale_temps_removed: u64,
    /// The signal that interrupted the run, if any.
    pub interrupted_by: Option<i32>,
    /// Watch mode: failed attempts that were tried again (each file counts once, by how it
    /// ended).
    pub retries: u64,
    /// What stopped the run early (a manifest or state write that failed), if anything.
    pub error: Option<String>,
    /// Files waiting to be tried again, with the reason of their last failure: counted as
    /// failed (for that reason) if the run ends first.
    #[serde(skip)]
    waiting: std::collections::HashMap<std::path::PathBuf, &'static str>,
}

impl Summary {
    /// Prints the summary: JSON on stdout with `--json` (stderr if a batch manifest is on stdout),
    /// else a human line on stderr unless quiet.
    pub fn print(&self, cfg: &Config) -> io::Result<()> {
        if cfg.json {
            let json = serde_json::to_string(self).map_err(io::Error::other)?;
            // Batch sha256 without --manifest prints the manifest on stdout.
            if cfg.op == OpKind::Sha256 && cfg.manifest.is_none() && cfg.watch.is_none() {
                eprintln!("{json}");
            } else {
                writeln!(io::stdout().lock(), "{json}")?;
            }
            return Ok(());
        }
        if cfg.quiet {
            return Ok(());
        }
        let mut line = format!(
            "filepipe {}: {} files: {} done, {} skipped, {} failed",
            self.op, self.files, self.done, self.skipped, self.failed
        );
        let reasons = |m: &BTreeMap<&str, u64>| {
            m.iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.skipped > 0 {
            line += &format!(" (skipped: {})", reasons(&self.skipped_by_reason));
        }
        if self.failed > 0 {
            line += &format!(" (failed: {})", reasons(&self.failed_by_reason));
        }
        eprintln!("{line}");
        let mut line = format!("  read {}", HumanBytes(self.bytes_in));
        if let Some(r) = self.ratio {
            line += &format!(", wrote {} (ratio {r:.3})", HumanBytes(self.bytes_out));
        }
        line += &format!(
            " in {:.2} s, {}/s",
            self.seconds,
            HumanBytes(self.bytes_per_second as u64)
        );
        if self.stale_temps_removed > 0 {
            line += &format!("; removed {} stale temp files", self.stale_temps_removed);
        }
        eprintln!("{line}");
        if let Some(sig) = self.interrupted_by {
            eprintln!("  interrupted by signal {sig}: results cover the files done before it");
        }
        Ok(())
    }
}

impl Summary {
    /// Accounts for one outcome: counts, progress, the per-file record. A failure the sink
    /// will try again is an attempt, not a file: it is logged, and counted when the file ends.
    fn count(&mut self, outcome: Outcome, disposition: Disposition, progress: &mut Progress) {
        let op = self.op;
        if let (Disposition::Retry, Outcome::Failed { rel, error }) = (&disposition, &outcome) {
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
        let rel = match &outcome {
            Outcome::Done { rel, .. }
            | Outcome::Skipped { rel, .. }
            | Outcome::Failed { rel, .. } => rel,
        };
        if !self.waiting.is_empty() {
            self.waiting.remove(rel);
        }
        self.files += 1;
        progress.overall.inc(1);
        match outcome {
            Outcome::Done { rel, done } => {
                self.done += 1;
                self.bytes_in += done.bytes_in;
                self.bytes_out += done.bytes_out;
                progress.bytes_done += done.bytes_in;
                if let Some(note) = &done.note {
                    self.warnings += 1;
                    progress.multi.suspend(|| record("kept", op, &rel, note));
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

/// Progress display: one overall bar and one line per worker, or nothing.
struct Progress {
    multi: MultiProgress,
    overall: ProgressBar,
    workers: Vec<ProgressBar>,
    bytes_done: u64,
    started: Instant,
    watching: bool,
}

impl Progress {
    fn new(cfg: &Config) -> Self {
        let multi = MultiProgress::with_draw_target(if cfg.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let overall = multi.add(ProgressBar::new(0));
        if cfg.watch.is_some() {
            overall.set_style(
                ProgressStyle::with_template("{spinner} watching: {msg}").expect("valid template"),
            );
            overall.enable_steady_tick(Duration::from_millis(200));
        } else {
            overall.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} files {msg} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
        }
        let workers = if cfg.progress {
            (0..cfg.jobs)
                .map(|_| {
                    let b = multi.add(ProgressBar::new_spinner());
                    b.set_style(ProgressStyle::with_template("  {msg}").expect("valid template"));
                    b
                })
                .collect()
        } else {
            Vec::new()
        };
        Progress {
            multi,
            overall,
            workers,
            bytes_done: 0,
            started: Instant::now(),
            watching: cfg.watch.is_some(),
        }
    }

    fn refresh(&self, stats: &Stats, summary: &Summary) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        if self.watching {
            self.overall.set_message(format!(
                "queued {}, in flight {}, done {}, skipped {}, failed {}, {:.1} files/s",
                stats.queued.load(Ordering::Relaxed),
                stats.in_flight.load(Ordering::Relaxed),
                summary.done,
                summary.skipped,
                summary.failed,
                summary.files as f64 / secs
            ));
            return;
        }
        let total = stats.files.load(Ordering::Relaxed) + stats.reported.load(Ordering::Relaxed);
        self.overall.set_length(total);
        self.overall.set_message(format!(
            "{}/{} {}/s",
            HumanBytes(self.bytes_done),
            HumanBytes(stats.bytes.load(Ordering::Relaxed)),
            HumanBytes((self.bytes_done as f64 / secs) as u64)
        ));
    }
}

/// Receives events until every sender is gone, then writes the manifest and returns the counts.
pub fn run(
    cfg: &Config,
    op: &'static str,
    events: Receiver<Event>,
    stats: &Stats,
    sink: &mut dyn Sink,
    shutdown: &Shutdown,
) -> Result<Summary> {
    let started = Instant::now();
    let mut progress = Progress::new(cfg);
    let mut summary = Summary {
        op,
        ..Summary::default()
    };
    // The first sink failure (a manifest or state write): from then on the run is being shut
    // down, but events are still drained, so no worker or sentinel ever blocks on a full
    // channel and every outcome is still counted.
    let mut failure: Option<anyhow::Error> = None;
    let mut guard = |r: Result<()>| {
        if let Err(e) = r {
            if failure.is_none() {
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
    let mut unflushed = false;
    let flush_due = |last: Option<Instant>| last.is_none_or(|t| t.elapsed() >= FLUSH_WITHIN);
    loop {
        let wait = match (unflushed, last_flush) {
            (true, Some(t)) => FLUSH_WITHIN.saturating_sub(t.elapsed()),
            _ => Duration::from_millis(200),
        };
        let event = match events.recv_timeout(wait) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => {
                if unflushed {
                    guard(sink.flush());
                    last_flush = Some(Instant::now());
                    unflushed = false;
                }
                progress.refresh(stats, &summary);
                guard(sink.tick());
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match event {
            Event::Started { worker, rel } => {
                if let Some(bar) = progress.workers.get(worker) {
                    bar.set_message(rel.display().to_string());
                }
            }
            Event::Finished(outcomes) => {
                for outcome in outcomes {
                    let disposition = sink.outcome(&outcome);
                    let disposition = disposition.unwrap_or_else(|e| {
                        guard(Err(e));
                        Disposition::Final
                    });
                    summary.count(outcome, disposition, &mut progress);
                }
                unflushed = true;
                stats.done.store(summary.done, Ordering::Relaxed);
                stats.skipped.store(summary.skipped, Ordering::Relaxed);
                stats.failed.store(summary.failed, Ordering::Relaxed);
                progress.refresh(stats, &summary);
            }
            Event::Removed(rel) => {
                guard(sink.removed(&rel));
                // A file waiting to be tried again that is deleted ends nowhere: not a failure.
                if !summary.waiting.is_empty() {
                    summary.waiting.retain(|p, _| !p.starts_with(&rel));
                }
                unflushed = true;
            }
        }
        if unflushed && flush_due(last_flush) {
            guard(sink.flush());
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
    guard(sink.finish());
    let secs = started.elapsed().as_secs_f64();
    summary.seconds = secs;
    summary.bytes_per_second = summary.bytes_in as f64 / secs.max(1e-9);
    if cfg.op == OpKind::Gzip && summary.bytes_in > 0 {
        summary.ratio = Some(summary.bytes_out as f64 / summary.bytes_in as f64);
    }
    summary.stale_temps_removed = stats.stale_temps_removed.load(Ordering::Relaxed);
    // Files still waiting for another attempt end as their last attempt did.
    for (_, kind) in std::mem::take(&mut summary.waiting) {
        summary.files += 1;
        summary.failed += 1;
        *summary.failed_by_reason.entry(kind).or_default() += 1;
    }
    if let Some(error) = failure {
        summary.error = Some(format!("{error:#}"));
        return Err(Stopped {
            error,
            summary: Box::new(summary),
        }
        .into());
    }
    Ok(summary)
}

/// A run stopped by a failed manifest or state write: the error, and the account of what was
/// done before it, which is still printed.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub struct Stopped {
    /// What failed.
    pub error: anyhow::Error,
    /// The summary up to then (its `error` says the same).
    pub summary: Box<Summary>,
}

/// Whether an outcome ends its file, or is an attempt that will be made again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The file ends so.
    Final,
    /// A transient failure: the file will be tried again.
    Retry,
}

/// What the reporter does with outcomes beyond counting them: the batch manifest, or watch
/// mode's durable state. Called only from the reporter thread.
pub trait Sink {
    /// One outcome, before it is counted; says whether it ends its file.
    fn outcome(&mut self, outcome: &Outcome) -> Result<Disposition>;
    /// A file was deleted or moved out of the tree (watch mode).
    fn removed(&mut self, _rel: &Path) -> Result<()> {
        Ok(())
    }
    /// The end of one message's outcomes: a good moment to commit.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called when idle, a few times a second.
    fn tick(&mut self) -> Result<()> {
        Ok(())
    }
    /// Every source and worker is done.
    fn finish(&mut self) -> Result<()>;
}

/// Batch mode: collect (path, digest) pairs, write the sorted manifest at the end.
pub struct ManifestSink<'a> {
    cfg: &'a Config,
    digests: Vec<(Box<Path>, [u8; 32])>,
}

impl<'a> ManifestSink<'a> {
    /// A sink writing `cfg`'s manifest (sha256) or nothing (gzip).
    pub fn new(cfg: &'a Config) -> Self {
        ManifestSink {
            cfg,
            digests: Vec::new(),
        }
    }
}

impl Sink for ManifestSink<'_> {
    fn outcome(&mut self, outcome: &Outcome) -> Result<Disposition> {
        if let Outcome::Done { rel, done } = outcome {
            if let Some(d) = done.digest {
                self.digests.push((rel.clone().into_boxed_path(), d));
            }
        }
        Ok(Disposition::Final)
    }

    fn finish(&mut self) -> Result<()> {
        if self.cfg.op != OpKind::Sha256 {
            return Ok(());
        }
        self.digests
            .sort_unstable_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
        let lines = self
            .digests
            .iter()
            .map(|(rel, d)| (rel.as_os_str().as_bytes(), d));
        write_manifest(self.cfg, lines)
    }
}

/// Emits one per-file record: a human line on stderr (by verbosity) and a failure-log line.
fn record(status: &'static str, op: &'static str, rel: &Path, e: &FileError) {
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
        "skipped" | "retrying" => {
            tracing::info!(target: FAILURES, status, path = %path, path_hex, op, error, errno, run, "{}", e.message)
        }
        _ => {
            tracing::warn!(target: FAILURES, status, path = %path, path_hex, op, error, errno, run, "{}", e.message)
        }
    }
}

/// Writes manifest lines, already sorted, to the manifest file (atomically) or stdout.
pub fn write_manifest<'d>(
    cfg: &Config,
    lines: impl Iterator<Item = (&'d [u8], &'d [u8; 32])> + Clone,
) -> Result<()> {
    let write_all = |w: &mut dyn Write| -> io::Result<()> {
        let mut w = BufWriter::with_capacity(256 * 1024, w);
        for (rel, d) in lines.clone() {
            manifest::write_line(&mut w, d, rel)?;
        }
        w.flush()
    };
    let Some(path) = &cfg.manifest else {
        return match write_all(&mut io::stdout().lock()) {
            // A closed pipe (`| head`) is the reader's choice, not our failure.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context("writing the manifest to stdout"),
        };
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    let fd = rustix::fs::open(
        parent,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .with_context(|| {
        format!(
            "writing the manifest {}: cannot open its directory {}",
            path.display(),
            parent.display()
        )
    })?;
    let dir = Arc::new(Dir::new(fd, parent.to_path_buf()));
    let mut temp = TempOutput::create(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    write_all(temp.file()).with_context(|| format!("writing {}", path.display()))?;
    // A manifest is meant to be read by others: the usual 0644, less what the umask removes.
    let mode = 0o644 & !umask();
    let attrs = None;
    rustix::fs::fchmod(&*temp.file(), rustix::fs::Mode::from_raw_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    let name: &OsStr = path.file_name().unwrap_or(OsStr::new("SHA256SUMS"));
    temp.publish(name, attrs, true, cfg.durability)
        .map_err(|e| anyhow::anyhow!("publishing {}: {e}", path.display()))
}

/// The process umask, read from /proc: calling umask(2) to read it would change it, for an
/// instant, under the workers' feet.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}
