//! The final account of a run: counts by outcome and reason, bytes, time; printed as a human
//! line or as JSON.

use std::collections::BTreeMap;
use std::io::{self, Write};

use indicatif::HumanBytes;
use serde::Serialize;

use crate::config::Config;

/// The final account of a run.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Summary {
    /// The operation.
    pub(crate) op: &'static str,
    /// Files accounted for (done + skipped + failed).
    pub(crate) files: u64,
    /// Files processed and published.
    pub(crate) done: u64,
    /// Incremental batch: of the done files, those not read because the state recorded them
    /// done with the stamp they have (their results are that earlier run's).
    pub(crate) unchanged: u64,
    /// Files deliberately left alone.
    pub(crate) skipped: u64,
    /// Files that could not be processed.
    pub(crate) failed: u64,
    /// Skipped files by reason.
    pub(crate) skipped_by_reason: BTreeMap<&'static str, u64>,
    /// Failed files by error kind.
    pub(crate) failed_by_reason: BTreeMap<&'static str, u64>,
    /// Done files that carry a warning (e.g. a hard-linked input kept).
    pub(crate) warnings: u64,
    /// Bytes read from done files.
    pub(crate) bytes_in: u64,
    /// Bytes written (gzip).
    pub(crate) bytes_out: u64,
    /// bytes_out / bytes_in (gzip).
    pub(crate) ratio: Option<f64>,
    /// Wall time of the run.
    pub(crate) seconds: f64,
    /// bytes_in per second.
    pub(crate) bytes_per_second: f64,
    /// Temp files of crashed earlier runs that were removed.
    pub(crate) stale_temps_removed: u64,
    /// The signal that interrupted the run, if any.
    pub(crate) interrupted_by: Option<i32>,
    /// Watch mode: failed attempts that were tried again (each file counts once, by how it
    /// ended).
    pub(crate) retries: u64,
    /// What stopped the run early (a manifest or state write that failed), if anything.
    pub(crate) error: Option<String>,
    /// Of the files counted above, those whose outcome the sink may not have recorded: the
    /// files with outcomes since its last good flush, when a flush (a state commit, a cluster
    /// worker's outcome publish, whose log says it) failed and stopped the run. Their outputs are as counted; the state (or the
    /// coordinator) does not know it, so they are taken again at the next start, where a
    /// file done is found done. (Counted done here and missing from the state and the
    /// manifest, with nothing said, they looked lost: found by a review.)
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) unrecorded: u64,
    /// Files waiting to be tried again, with the reason of their last failure: counted as
    /// failed (for that reason) if the run ends first.
    #[serde(skip)]
    pub(super) waiting: std::collections::HashMap<std::path::PathBuf, &'static str>,
    /// Files counted failed `output-exists` (watch mode takes one again when its output name
    /// is freed, and `--poll` at each rescan), with the stamp each had then: the same version
    /// is counted by how it ends, once. (Counted again each time, a file blocked then done was
    /// both failed and done, and a polled one failed up to five times: found by a review.) A
    /// version changed since is another, counted on its own.
    #[serde(skip)]
    pub(super) blocked: std::collections::HashMap<std::path::PathBuf, Option<crate::travel::Stamp>>,
}

impl Summary {
    /// Prints the summary: JSON on stdout with `--json` (stderr if a batch manifest is on stdout),
    /// else a human line on stderr unless quiet.
    pub(crate) fn print(&self, cfg: &Config) -> io::Result<()> {
        if cfg.json {
            let json = serde_json::to_string(self).map_err(io::Error::other)?;
            // A batch hash without --manifest prints the manifest on stdout.
            if !cfg.spec.hashes().is_empty() && cfg.manifest.is_none() && cfg.watch.is_none() {
                crate::logging::say!("{json}");
            } else {
                writeln!(io::stdout().lock(), "{json}")?;
            }
            return Ok(());
        }
        if cfg.quiet {
            return Ok(());
        }
        let unchanged = if cfg.incremental.is_some() {
            format!(" ({} unchanged)", self.unchanged)
        } else {
            String::new()
        };
        let mut line = format!(
            "filepipe {}: {} files: {} done{unchanged}, {} skipped, {} failed",
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
        crate::logging::say!("{line}");
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
        crate::logging::say!("{line}");
        if self.unrecorded > 0 {
            crate::logging::say!(
                "  {} of these files are not recorded (the run stopped on the error above): \
                 they are taken again at the next run",
                self.unrecorded
            );
        }
        if let Some(sig) = self.interrupted_by {
            crate::logging::say!(
                "  interrupted by signal {sig}: results cover the files done before it"
            );
        }
        Ok(())
    }
}

/// `serde`'s test for a count left out of the JSON when it is nothing to say.
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A run stopped by a failed manifest or state write: the error, and the account of what was
/// done before it, which is still printed.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub(crate) struct Stopped {
    /// What failed.
    pub(crate) error: anyhow::Error,
    /// The summary up to then (its `error` says the same).
    pub(crate) summary: Box<Summary>,
    /// The run's configuration, which the summary is printed by, where the caller that prints
    /// it has no other (a watch's pipeline, under the service's supervisor).
    pub(crate) cfg: Option<std::sync::Arc<Config>>,
}
