//! An incremental batch's sink (`batch --state`): each outcome recorded in the SQLite state, as
//! watch mode's sink records it, and the manifest written as any batch writes it
//! (`ManifestSink`), from this run's outcomes: files read now and files the walk found
//! unchanged alike, so it lists exactly what a full run over the same tree would.
//!
//! Invariants: every outcome is final (a batch does not wait to retry: the next run tries a
//! failed file again); an unchanged file's row is left as it is (nothing was learnt about it);
//! the state is committed at each of the reporter's flushes, so an interrupted run keeps what
//! it did, and only a complete walk removes the rows of files it did not find.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::config::Config;
use crate::error::Kind;
use crate::sink::manifest::ManifestSink;
use crate::sink::{output_of, Disposition, Sink};
use crate::state::{FileStatus, State};
use crate::travel::{Outcome, Stamp, Unchanged};

/// Records outcomes in the state and collects the manifest.
pub(crate) struct IncrementalSink<'a> {
    cfg: &'a Config,
    state: State,
    manifest: ManifestSink<'a>,
}

impl<'a> IncrementalSink<'a> {
    /// A sink recording into `state` (opened for `cfg`'s root and op).
    pub(crate) fn new(cfg: &'a Config, state: State) -> Self {
        IncrementalSink {
            cfg,
            state,
            manifest: ManifestSink::new(cfg),
        }
    }

    /// Whether a file done has its input removed or moved (unless kept, with a note why).
    fn disposes(&self) -> bool {
        self.cfg.remove_source || self.cfg.move_source.is_some()
    }

    /// The stamp `rel` has now, for a file that was not read (skipped or failed): the next
    /// run compares with it only to count attempts, never to skip a file that was not done.
    fn stamp_now(&self, rel: &Path) -> Option<Stamp> {
        Stamp::of(&self.cfg.root.join(rel))
    }

    fn record(&mut self, outcome: &Outcome) -> Result<()> {
        match outcome {
            // Its row already says all there is: rewriting it would cost a write per file of
            // the tree, which is what an incremental run is meant not to spend.
            Outcome::Done { done, .. } if done.unchanged => {}
            // Its input removed or moved out of the tree (`--remove-source`, `--move-source`):
            // gone from the state as from the tree. Its row would name the output filepipe's
            // own, for the next file of that name to replace: with `--remove-source` the only
            // copy of this one (found by review). Watch mode forgets it by the same event.
            Outcome::Done { rel, done } if self.disposes() && done.note.is_none() => {
                self.state.remove_files(std::slice::from_ref(rel))?;
            }
            Outcome::Done { rel, done } => {
                let output = output_of(self.cfg, rel, done);
                self.state.done_results(rel, done, output.as_deref())?;
            }
            // Deleted after the walk saw it: gone from the state as from the tree.
            Outcome::Failed { rel, error: e } | Outcome::Skipped { rel, reason: e }
                if e.kind == Kind::Vanished =>
            {
                self.state.remove_files(std::slice::from_ref(rel))?;
            }
            // Not started because of a shutdown: left as it was, for the next run.
            Outcome::Skipped { reason, .. } if reason.kind == Kind::Interrupted => {}
            // Its output is already in place (an earlier run without --state, or one stopped
            // between the publish and the commit): done, as watch mode's sink records it, so the
            // next run finds it unchanged while that output stays in place.
            Outcome::Skipped { rel, reason } if reason.kind == Kind::UpToDate => {
                if let Some(compressor) = self.cfg.spec.compressor() {
                    let output = self.cfg.op.output_name(rel);
                    let stamp = self.stamp_now(rel);
                    self.state
                        .done(rel, compressor, stamp, output.as_deref(), None)?;
                }
            }
            Outcome::Skipped { rel, reason } => {
                let stamp = self.stamp_now(rel);
                self.state
                    .not_done(rel, FileStatus::Skipped, stamp, reason)?;
            }
            Outcome::Failed { rel, error } => {
                let stamp = self.stamp_now(rel);
                self.state.not_done(rel, FileStatus::Failed, stamp, error)?;
            }
        }
        Ok(())
    }
}

impl Sink for IncrementalSink<'_> {
    /// Listed in the manifest even where its row cannot be written (a full disk): the run
    /// stops then, and where every file still had its outcome the manifest is written whole
    /// (`report::run`); a file left out of it would make it short without a word.
    fn outcome(&mut self, outcome: &Outcome) -> Result<Disposition> {
        let recorded = self.state.begin().and_then(|()| self.record(outcome));
        let listed = self.manifest.outcome(outcome);
        recorded?;
        listed
    }

    /// Their rows already say all there is (see `record`): listed in the manifest only.
    fn unchanged(&mut self, files: &Unchanged) -> Result<()> {
        self.manifest.unchanged(files)
    }

    fn unlisted(&mut self, rels: &[PathBuf]) -> Result<()> {
        self.state.begin()?;
        self.state.remove_files(rels)
    }

    fn still_held(&self) -> bool {
        self.state.holds_all()
    }

    fn flush(&mut self) -> Result<()> {
        if self.state.unsettled() {
            self.state.commit()?;
        }
        Ok(())
    }

    /// The manifest is written even where the last commit fails: every file had its outcome
    /// (`report::run` abandons the sink otherwise), so it is whole; the commit's error is
    /// still the run's.
    fn finish(&mut self) -> Result<()> {
        let flushed = self.flush();
        let written = self.manifest.finish();
        flushed.and(written)
    }
}
