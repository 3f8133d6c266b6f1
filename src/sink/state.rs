//! Watch mode's sink: each outcome recorded in the SQLite state (committed at each flush), and
//! the manifest (a hash with `--manifest`) rewritten from the state when outcomes pause.
//!
//! Invariants: a file the source hears of as recorded is in a committed transaction; a
//! transient failure is recorded with its attempt count and handed back for a retry, with a
//! growing delay, until its attempts run out; a skipped or failed file is recorded with its
//! stamp, so a rescan leaves it alone until it changes. The manifest is derived from the
//! state: a rewrite that fails is logged (once per distinct error) and tried again later, and
//! never stops the run; a state write that fails does.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::config::Config;
use crate::error::Kind;
use crate::sink::{manifest, output_of, Disposition, Sink};
use crate::state::{self, State};
use crate::travel::{Outcome, Stamp};

/// Whether the sink keeps a manifest: a hash with `--manifest`.
fn keeps_manifest(cfg: &Config) -> bool {
    cfg.manifest.is_some() && !cfg.spec.hashes().is_empty()
}

/// Records outcomes in the state and keeps the manifest current.
pub(crate) struct StateSink<'a> {
    cfg: &'a Config,
    state: State,
    /// When the manifest first differed from the state since it was last written.
    dirty_since: Option<Instant>,
    manifest_written: Option<Instant>,
    /// How long the last rewrite took (it grows with the state, not with the change).
    manifest_cost: Duration,
    last_outcome: Option<Instant>,
    /// The manifest rewrite failing since, if it is: retried with a growing pause.
    manifest_failing: Option<ManifestFailing>,
}

/// A manifest that cannot be rewritten (a name taken by a directory, a full disk): what was
/// last logged, and when to try again.
struct ManifestFailing {
    /// The error last logged (`{:#}`): the same error again is not logged again.
    error: String,
    /// Failed rewrites in a row.
    attempts: u32,
    /// The next rewrite is not tried before this.
    retry_at: Instant,
}

/// The pause after the `attempts`-th failed manifest rewrite in a row: 1 s, 2 s, 4 s ... at
/// most a minute. The state keeps every result meanwhile, so nothing is lost by waiting, and
/// a full disk is not hammered.
fn manifest_retry_pause(attempts: u32) -> Duration {
    Duration::from_secs(1 << attempts.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// The manifest is rewritten whole (from the state) once outcomes pause for `MANIFEST_QUIET`,
/// at most every `MANIFEST_INTERVAL`: a burst costs one rewrite at its end instead of one a
/// second in the middle of it, competing with the workers. A steady stream never pauses, so a
/// change waits at most `MANIFEST_STALE`, or ten times the last rewrite's duration if longer:
/// rewriting a manifest of millions of files then takes at most a tenth of the reporter's time.
const MANIFEST_INTERVAL: Duration = Duration::from_secs(1);
/// See `MANIFEST_INTERVAL`.
const MANIFEST_QUIET: Duration = Duration::from_millis(200);
/// See `MANIFEST_INTERVAL`.
const MANIFEST_STALE: Duration = Duration::from_secs(2);

/// Whether a manifest that has differed from the state since `dirty_since` is rewritten at
/// `now` (see `MANIFEST_INTERVAL`): `written` is the last rewrite, `last_outcome` the last
/// change, `cost` how long the last rewrite took.
fn manifest_due(
    now: Instant,
    dirty_since: Instant,
    written: Option<Instant>,
    last_outcome: Option<Instant>,
    cost: Duration,
) -> bool {
    let rested = written.is_none_or(|t| now - t >= MANIFEST_INTERVAL);
    let quiet = last_outcome.is_none_or(|t| now - t >= MANIFEST_QUIET);
    let overdue = now - dirty_since >= MANIFEST_STALE.max(cost * 10);
    rested && (quiet || overdue)
}

impl<'a> StateSink<'a> {
    /// A sink recording into `state` (opened for `cfg`'s root and op).
    pub(crate) fn new(cfg: &'a Config, state: State) -> Self {
        StateSink {
            cfg,
            state,
            // Written at start, so it exists (and is current) before the first change.
            dirty_since: keeps_manifest(cfg).then(Instant::now),
            manifest_written: None,
            manifest_cost: Duration::ZERO,
            last_outcome: None,
            manifest_failing: None,
        }
    }

    /// The manifest no longer matches the state.
    fn changed(&mut self) {
        if keeps_manifest(self.cfg) {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
    }

    /// Rewrites the manifests from the state. Only reading the state can fail here: a manifest
    /// that cannot be written is derived data, logged and tried again later (`manifest_failed`),
    /// while the state, the record, stays right.
    fn write_manifest(&mut self) -> Result<()> {
        if !keeps_manifest(self.cfg) {
            return Ok(());
        }
        let started = Instant::now();
        let cfg = self.cfg;
        let mut manifests = manifest::Manifests::new(cfg);
        for &algo in cfg.spec.hashes() {
            let digests = self.state.digests(algo)?;
            let written = manifests.write(algo, &digests, |(p, d)| {
                selected(cfg, p).then_some((p.as_slice(), d))
            });
            if let Err(e) = written {
                self.manifest_failed(&e);
                return Ok(());
            }
        }
        if let Err(e) = manifests.publish() {
            self.manifest_failed(&e);
            return Ok(());
        }
        if let Some(failing) = self.manifest_failing.take() {
            tracing::warn!(
                attempts = failing.attempts,
                "manifest rewritten again: it lists every file the state records"
            );
        }
        self.dirty_since = None;
        self.manifest_written = Some(Instant::now());
        self.manifest_cost = started.elapsed();
        Ok(())
    }

    /// A manifest rewrite failed with `e`: logged unless it is the error already logged, and
    /// tried again after a pause that grows with each failure in a row.
    fn manifest_failed(&mut self, e: &anyhow::Error) {
        let error = format!("{e:#}");
        let attempts = self.manifest_failing.as_ref().map_or(0, |f| f.attempts) + 1;
        let pause = manifest_retry_pause(attempts);
        if self
            .manifest_failing
            .as_ref()
            .is_none_or(|f| f.error != error)
        {
            tracing::error!(
                "manifest not rewritten: {error}; the state keeps every result, and the \
                 rewrite is tried again (at least every minute) until it succeeds"
            );
        }
        self.manifest_failing = Some(ManifestFailing {
            error,
            attempts,
            retry_at: Instant::now() + pause,
        });
    }
}

/// Whether the file at `rel` (raw bytes, relative to the root) is one the run takes, by its
/// include and exclude globs: included, and neither it nor a directory above it excluded.
/// The state may record files a watch with other globs did (restarted or reloaded with an
/// `--exclude`): no longer selected, they leave the manifest, as they leave an incremental
/// batch's, whose walk does not find them (found by review: listed with digests that went
/// stale, `sha256sum -c` failing on them later).
fn selected(cfg: &Config, rel: &[u8]) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let rel = Path::new(std::ffi::OsStr::from_bytes(rel));
    let filter = &cfg.filter;
    if filter.patterns() == (&[][..], &[][..]) {
        return true;
    }
    filter.included(rel)
        && !rel
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| filter.excluded(a))
}

/// Whether the failed file `rel`, gone from the tree, is under the `--move-failed` directory:
/// moved aside, not deleted. (A move that clashed took a numbered name, but then `rel` itself
/// is there too.)
fn moved_aside(cfg: &Config, rel: &Path) -> bool {
    cfg.move_failed
        .as_ref()
        .is_some_and(|aside| aside.root.join(rel).symlink_metadata().is_ok())
}

/// Whether a file done leaves the tree: `--remove-source`, `--move-source`.
fn disposes(cfg: &Config) -> bool {
    cfg.remove_source || cfg.move_source.is_some()
}

impl Sink for StateSink<'_> {
    fn outcome(&mut self, outcome: &Outcome) -> Result<Disposition> {
        self.state.begin()?;
        self.last_outcome = Some(Instant::now());
        let retry_after = match outcome {
            // Deleted before it could be read: gone, like a deletion seen as an event (a file
            // deleted while in flight is recorded, then removed: the watcher holds its removal
            // back until this outcome is committed).
            Outcome::Failed { rel, error: e } | Outcome::Skipped { rel, reason: e }
                if e.kind == Kind::Vanished =>
            {
                self.state.remove(rel)?;
                self.changed();
                None
            }
            // Its input removed or moved away once its output was made (no note says it was
            // kept): no longer a file of the tree. Its row goes now, not when the watcher
            // hears of the move: a file made at the name meanwhile is another file, whose
            // output name holds this one's output (`output-exists`), not a new version of
            // this one, whose output is filepipe's to replace (found by a review: the moved
            // file's only output was replaced by the newcomer's).
            Outcome::Done { rel, done } if disposes(self.cfg) && done.note.is_none() => {
                self.state.remove(rel)?;
                self.changed();
                None
            }
            Outcome::Done { rel, done } => {
                let output = output_of(self.cfg, rel, done);
                self.state.done_results(rel, done, output.as_deref())?;
                if !done.digests.is_empty() {
                    self.changed();
                }
                None
            }
            // Not started because of a shutdown: left for the next start, nothing to record.
            Outcome::Skipped { reason, .. } if reason.kind == Kind::Interrupted => None,
            // Its output is already in place (a run stopped between the publish and the
            // commit, or an identical output published meanwhile): done, so that a later
            // change of the file replaces that output as filepipe's own.
            Outcome::Skipped { rel, reason } if reason.kind == Kind::UpToDate => {
                if let Some(compressor) = self.cfg.spec.compressor() {
                    let stamp = Stamp::of(&self.cfg.root.join(rel));
                    let output = self.cfg.op.output_name(rel);
                    self.state
                        .done(rel, compressor, stamp, output.as_deref(), None)?;
                }
                None
            }
            Outcome::Skipped { rel, reason } => {
                // With its stamp, so the next scan knows it is settled unless it changes.
                let stamp = Stamp::of(&self.cfg.root.join(rel));
                self.state
                    .not_done(rel, state::FileStatus::Skipped, stamp, reason)?;
                // It may have been done before: its line leaves the manifest.
                self.changed();
                None
            }
            Outcome::Failed { rel, error } => {
                let stamp = Stamp::of(&self.cfg.root.join(rel));
                let attempts = self
                    .state
                    .not_done(rel, state::FileStatus::Failed, stamp, error)?;
                self.changed();
                // A file in use is waited for as long as its writer keeps it open.
                let retry = state::transient(error.kind)
                    && (attempts < state::MAX_ATTEMPTS || error.kind == Kind::InUse);
                // 1 s, 2 s, 4 s ... between attempts, at most about a minute.
                retry.then(|| Duration::from_secs(1 << (attempts - 1).min(6)))
            }
        };
        Ok(retry_after.map_or(Disposition::Final, Disposition::Retry))
    }

    /// Exactly these paths are no longer files (watch mode: one is a directory now, or its
    /// directory a file; see `Watcher::there_again`).
    fn unlisted(&mut self, rels: &[std::path::PathBuf]) -> Result<()> {
        self.state.begin()?;
        self.last_outcome = Some(Instant::now());
        self.state.remove_files(rels)?;
        self.changed();
        Ok(())
    }

    fn removed(&mut self, rel: &Path) -> Result<()> {
        self.state.begin()?;
        // A deletion burst (rm -r) is a burst too: the rewrite waits for its end.
        self.last_outcome = Some(Instant::now());
        // A file that failed for good and was moved aside (`--move-failed`) left the tree by
        // that move, not by a deletion: its failed row stays, for `status --failed`.
        if self.cfg.move_failed.is_some()
            && moved_aside(self.cfg, rel)
            && self.state.status_of(rel)? == Some(state::FileStatus::Failed)
        {
            return Ok(());
        }
        self.state.remove(rel)?;
        self.changed();
        Ok(())
    }

    fn still_held(&self) -> bool {
        self.state.holds_all()
    }

    fn flush(&mut self) -> Result<()> {
        // As SQLite has it: a failed commit may have ended the transaction (a full disk does),
        // and the next outcome begins one (`State::begin`); its done rows are committed with
        // the next, or on their own (`State::unsettled`).
        if self.state.unsettled() {
            self.state.commit()?;
            // Committed to the file the daemon opened: one no longer at its path (the state
            // directory, or the database, deleted or replaced while it ran) takes every record
            // with it, and the next start would do every file since again. Said, and the daemon stops (systemd
            // starts it again, on a new state), rather than go on recording into nothing.
            let dir = self
                .cfg
                .watch
                .as_ref()
                .map_or(Path::new(""), |w| &w.state_dir);
            if !self.state.in_place() {
                anyhow::bail!(
                    "the state database in {} was deleted or replaced while filepipe ran: what \
                     it recorded since it was opened is gone with it; stopping (started again, \
                     it makes a new state, and takes again the files done since)",
                    dir.display()
                );
            }
            // Its lock file gone (a cleaner, a rename): another daemon could take the state
            // directory alongside this one, each doing what the other did.
            let lock = self.cfg.watch.as_ref().and_then(|w| w.lock.as_ref());
            if lock.is_some_and(|l| !l.in_place()) {
                anyhow::bail!(
                    "the lock file of the state directory {} was removed or replaced while \
                     filepipe ran, so another daemon could take the directory too; stopping \
                     (what was recorded is kept: started again, it goes on from there)",
                    dir.display()
                );
            }
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        let Some(dirty_since) = self.dirty_since else {
            return Ok(());
        };
        let now = Instant::now();
        let due = match &self.manifest_failing {
            // Failing: tried again once its pause is over, whatever comes meanwhile.
            Some(failing) => now >= failing.retry_at,
            None => manifest_due(
                now,
                dirty_since,
                self.manifest_written,
                self.last_outcome,
                self.manifest_cost,
            ),
        };
        if due {
            self.write_manifest()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.flush()?;
        if self.dirty_since.is_some() {
            self.write_manifest()?;
            if self.manifest_failing.is_some() {
                tracing::error!(
                    "the manifest is not current at exit: it is rewritten from the state at \
                     the next start"
                );
            }
        }
        Ok(())
    }

    /// Finished as ever: the manifest is derived from the state, the record of every file it
    /// holds, never from this run's outcomes, so a watcher that failed takes nothing from it.
    fn abandon(&mut self) -> Result<()> {
        self.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_manifest_is_tried_again_after_a_pause_that_grows_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|n| manifest_retry_pause(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(manifest_retry_pause(u32::MAX).as_secs(), 60);
    }

    #[test]
    fn the_manifest_waits_for_a_pause_but_never_longer_than_it_may_go_stale() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let cheap = Duration::from_millis(5);
        // A lone change: rewritten once outcomes pause for MANIFEST_QUIET.
        assert!(!manifest_due(ms(100), ms(0), None, Some(ms(0)), cheap));
        assert!(manifest_due(ms(200), ms(0), None, Some(ms(0)), cheap));
        // A steady stream (an outcome every 100 ms) never pauses: rewritten once the change
        // is MANIFEST_STALE old, not before.
        assert!(!manifest_due(ms(1900), ms(0), None, Some(ms(1850)), cheap));
        assert!(manifest_due(ms(2000), ms(0), None, Some(ms(1950)), cheap));
        // Never twice within MANIFEST_INTERVAL, however quiet.
        assert!(!manifest_due(
            ms(2500),
            ms(2100),
            Some(ms(2000)),
            Some(ms(2100)),
            cheap
        ));
        assert!(manifest_due(
            ms(3000),
            ms(2100),
            Some(ms(2000)),
            Some(ms(2100)),
            cheap
        ));
        // A manifest that takes 0.5 s to rewrite goes stale for up to ten times that.
        let dear = Duration::from_millis(500);
        assert!(!manifest_due(
            ms(4900),
            ms(0),
            Some(ms(0)),
            Some(ms(4850)),
            dear
        ));
        assert!(manifest_due(
            ms(5000),
            ms(0),
            Some(ms(0)),
            Some(ms(4950)),
            dear
        ));
    }
}
