//! Sinks: where outcomes are recorded beyond the counts. Batch mode's is the manifest
//! (`manifest`), or with `--state` the manifest and the SQLite state (`incremental`); watch
//! mode's the SQLite state with its manifest (`state`); a cluster coordinator's would be the
//! queue's outcome stream.
//!
//! The reporter thread is a sink's only caller. It hands each outcome to `outcome`, which says
//! whether the file ends there, then calls `flush` once per batch of outcomes (or at most every
//! few tens of milliseconds under load). Only once `flush` has returned does the reporter tell
//! the source (if it listens, see `source::Source::listens`) that those files are recorded: a
//! watcher then never forgets a file a crash would make the state forget, and a queue source
//! acknowledges a job only once its outcome is durable wherever the sink keeps it. A sink may
//! be remote and slow: the reporter keeps counting and draining while it works, and an error
//! from any call stops the run (after the drain), with the summary of what was done.

pub(crate) mod incremental;
pub(crate) mod manifest;
#[cfg(feature = "cluster")]
pub(crate) mod queue;
pub(crate) mod state;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::config::Config;
use crate::error::Kind;
use crate::travel::{Done, Outcome, Unchanged};

/// Whether an outcome ends its file, or is an attempt that will be made again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// The file ends so.
    Final,
    /// A transient failure: the source tries the file again after this long.
    Retry(Duration),
}

/// What the reporter does with outcomes beyond counting them. Called only from the reporter
/// thread, in this order: `outcome`, `removed` and `unlisted` any number of times, `flush` after each
/// batch of them, `tick` a few times a second, then once at the end `finish` (or `abandon`, if
/// the source failed).
pub(crate) trait Sink {
    /// Records one outcome (before it is counted); says whether it ends its file.
    fn outcome(&mut self, outcome: &Outcome) -> Result<Disposition>;
    /// Records files an incremental batch found unchanged, done from the state: as many
    /// `Outcome::Done`s, unread (`Done::unchanged`), each with the state's digests. A sink
    /// that keeps them some cheaper way says so.
    fn unchanged(&mut self, files: &Unchanged) -> Result<()> {
        for (name, digests) in files.iter() {
            let done = Done {
                digests: digests.to_vec(),
                unchanged: true,
                ..Done::default()
            };
            let rel = PathBuf::from(std::ffi::OsStr::from_bytes(name));
            self.outcome(&Outcome::Done {
                rel,
                done: Box::new(done),
            })?;
        }
        Ok(())
    }
    /// A file, or a directory and everything under it, was deleted or moved out of the tree
    /// (watch mode).
    fn removed(&mut self, _rel: &Path) -> Result<()> {
        Ok(())
    }
    /// An incremental batch's complete walk did not find these files, which the state knows:
    /// exactly these paths (one may be a directory now, whose files are recorded meanwhile).
    fn unlisted(&mut self, _rels: &[PathBuf]) -> Result<()> {
        Ok(())
    }
    /// Makes what was recorded since the last flush durable: once this returns, the source
    /// hears of those files as recorded.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// After a failed `flush`: whether what it did not make durable is still held for the
    /// next one (a state's transaction still open, its rows kept), so that a later good flush
    /// records it after all. `false`: it may be lost (a transaction SQLite rolled back).
    fn still_held(&self) -> bool {
        false
    }
    /// Whether a flush costs so little (a publish, not a commit) that outcomes go out as soon
    /// as the pipeline has nothing left in hand, not up to `FLUSH_WITHIN` later.
    fn flush_when_idle(&self) -> bool {
        false
    }
    /// Called a few times a second, busy or idle: periodic work (a manifest rewrite).
    fn tick(&mut self) -> Result<()> {
        Ok(())
    }
    /// Every source and worker is done: last writes.
    fn finish(&mut self) -> Result<()>;
    /// Every worker is done, but the source failed (an incremental batch's state that cannot
    /// be read, a walk that panicked): what it sent is only part of the tree. Makes durable
    /// what was recorded, and publishes nothing that stands for the whole tree: a batch's
    /// manifest written from part of it would replace a good one with a short one (found by
    /// review), so the last one is left as it was.
    fn abandon(&mut self) -> Result<()> {
        self.flush()
    }
}

/// The output a done file's compressor left that the state records as filepipe's: its name
/// (relative, as `cli::OpKind::output_name` gives it), or `None` when the compressor left the
/// file alone (already compressed: only hashed) or there is none.
pub(crate) fn output_of(cfg: &Config, rel: &Path, done: &Done) -> Option<PathBuf> {
    let hashed_only = done
        .note
        .as_ref()
        .is_some_and(|n| n.kind == Kind::AlreadyCompressed);
    cfg.op.output_name(rel).filter(|_| !hashed_only)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{Digest, HashAlgo};

    /// A sink that keeps what it is given, as outcomes.
    #[derive(Default)]
    struct Kept(Vec<(PathBuf, Vec<Digest>, bool)>);

    impl Sink for Kept {
        fn outcome(&mut self, outcome: &Outcome) -> Result<Disposition> {
            if let Outcome::Done { rel, done } = outcome {
                self.0
                    .push((rel.clone(), done.digests.clone(), done.unchanged));
            }
            Ok(Disposition::Final)
        }

        fn finish(&mut self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_sink_without_its_own_way_gets_unchanged_files_as_outcomes_done_unread() {
        let d = Digest::new(HashAlgo::Sha256, &[7; 32]).unwrap();
        let mut files = Unchanged::default();
        files.push(Path::new("x/y"), &[d]);
        files.push(Path::new("z"), &[]);
        let mut sink = Kept::default();
        sink.unchanged(&files).unwrap();
        assert_eq!(
            sink.0,
            [
                (PathBuf::from("x/y"), vec![d], true),
                (PathBuf::from("z"), vec![], true)
            ]
        );
    }
}
