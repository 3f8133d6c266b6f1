//! The config file's `[worker]` table: `filepipe worker --config FILE`'s settings, the same as
//! its flags. Read into `config::WorkerSettings` (paths resolved against the file's directory,
//! each root labelled with its line), which `config::WorkerConfig::resolve` checks as it checks
//! the flags, so a file `check-config` accepts is one the worker starts with.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

use anyhow::Result;
use serde::Deserialize;
use toml::Spanned;

use super::config::{queue_of, Located};
use crate::cli::MAX_JOBS;
use crate::config::{RootGiven, WorkerSettings};
use crate::fsio::output::Durability;

/// `[worker]`, as written. Roots are maps of name to path: `[worker.roots]` with
/// `incoming = "/srv/shared/incoming"` lines, or inline, `roots = { incoming = "..." }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WorkerTable {
    /// The queue's URL (a password or token in it only if the file is private).
    queue: Option<Spanned<String>>,
    /// A file holding the queue's URL, so the config file itself can stay readable.
    queue_file: Option<Spanned<PathBuf>>,
    /// A NATS credentials file (.creds).
    creds: Option<PathBuf>,
    /// CA certificates to trust for a tls:// queue.
    tls_ca: Option<PathBuf>,
    /// The input roots: name = mount point here.
    #[serde(default)]
    roots: BTreeMap<String, Spanned<PathBuf>>,
    /// The output roots: name = mount point here.
    #[serde(default)]
    out_roots: BTreeMap<String, Spanned<PathBuf>>,
    /// Worker threads.
    jobs: Option<Spanned<u16>>,
    /// Jobs may have their inputs removed once their outputs are durable.
    #[serde(default)]
    allow_remove_source: bool,
    /// How outputs are flushed before they are reported done.
    durability: Option<Durability>,
    /// One JSON line per failed or skipped file.
    failure_log: Option<PathBuf>,
    /// Where Prometheus metrics are served.
    metrics: Option<std::net::SocketAddr>,
}

impl WorkerTable {
    /// The settings this table gives; `span` is the table's own (for an error about it as a
    /// whole).
    pub(super) fn settings(&self, file: &Located, span: Range<usize>) -> Result<WorkerSettings> {
        if !cfg!(feature = "cluster") {
            let msg = "this filepipe is built without cluster mode (feature cluster)";
            return Err(file.at(span, "worker", msg.into()));
        }
        if let Some(j) = &self.jobs {
            if !(1..=MAX_JOBS).contains(j.get_ref()) {
                let msg = format!("must be 1 to {MAX_JOBS}");
                return Err(file.at(j.span(), "worker.jobs", msg));
            }
        }
        let url = queue_of(
            file,
            self.queue.as_ref(),
            self.queue_file.as_ref(),
            "worker.",
        )?;
        let roots = |map: &BTreeMap<String, Spanned<PathBuf>>, key: &str| -> Vec<RootGiven> {
            map.iter()
                .map(|(name, path)| RootGiven {
                    name: name.clone(),
                    path: file.resolve(path.get_ref()),
                    given: format!(
                        "{}:{}: worker.{key}.{name}",
                        file.path.display(),
                        file.line(path.span())
                    ),
                })
                .collect()
        };
        Ok(WorkerSettings {
            url,
            creds: self.creds.as_deref().map(|p| file.resolve(p)),
            tls_ca: self.tls_ca.as_deref().map(|p| file.resolve(p)),
            roots: roots(&self.roots, "roots"),
            out_roots: roots(&self.out_roots, "out_roots"),
            allow_remove_source: self.allow_remove_source,
            jobs: self.jobs.as_ref().map(|j| *j.get_ref()),
            durability: self.durability,
            failure_log: self.failure_log.as_deref().map(|p| file.resolve(p)),
            metrics: self.metrics,
        })
    }
}
