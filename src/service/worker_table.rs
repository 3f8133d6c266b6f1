//! The config file's `[worker]` table: `filepipe worker --config FILE`'s settings, the same as
//! its flags. Read into `config::WorkerSettings` (paths resolved against the file's directory,
//! each root labelled with its line), which `config::WorkerConfig::resolve` checks as it checks
//! the flags, so a file `check-config` accepts is one the worker starts with. A file with this
//! table may be changed by its owner only, and no path in it may be empty.

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
    creds: Option<Spanned<PathBuf>>,
    /// CA certificates to trust for a tls:// queue.
    tls_ca: Option<Spanned<PathBuf>>,
    /// The input roots: name = mount point here.
    #[serde(default)]
    roots: BTreeMap<String, Spanned<PathBuf>>,
    /// The output roots: name = mount point here.
    #[serde(default)]
    out_roots: BTreeMap<String, Spanned<PathBuf>>,
    /// The directories inputs may be moved to (a coordinator's --move-source, --move-failed):
    /// name = mount point here.
    #[serde(default)]
    move_roots: BTreeMap<String, Spanned<PathBuf>>,
    /// Worker threads.
    jobs: Option<Spanned<u16>>,
    /// Jobs may have their inputs removed once their outputs are durable.
    #[serde(default)]
    allow_remove_source: bool,
    /// How outputs are flushed before they are reported done.
    durability: Option<Durability>,
    /// One JSON line per failed or skipped file.
    failure_log: Option<Spanned<PathBuf>>,
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
        // An empty path resolves to the file's own directory (/etc/filepipe, the file and its
        // password in it): never what was meant.
        let files = [
            ("queue_file", self.queue_file.as_ref()),
            ("creds", self.creds.as_ref()),
            ("tls_ca", self.tls_ca.as_ref()),
            ("failure_log", self.failure_log.as_ref()),
        ];
        let roots = self.roots.iter().map(|(n, p)| (format!("roots.{n}"), p));
        let out_roots = self
            .out_roots
            .iter()
            .map(|(n, p)| (format!("out_roots.{n}"), p));
        let move_roots = self
            .move_roots
            .iter()
            .map(|(n, p)| (format!("move_roots.{n}"), p));
        let named = files
            .into_iter()
            .filter_map(|(k, p)| p.map(|p| (k.to_string(), p)))
            .chain(roots)
            .chain(out_roots)
            .chain(move_roots);
        for (key, path) in named {
            if path.get_ref().as_os_str().is_empty() {
                let msg = "an empty path: give the file or directory".to_string();
                return Err(file.at(path.span(), &format!("worker.{key}"), msg));
            }
        }
        let url = queue_of(
            file,
            self.queue.as_ref(),
            self.queue_file.as_ref(),
            "worker.",
        )?;
        let roots = |map: &BTreeMap<String, Spanned<PathBuf>>, key: &str| {
            map.iter()
                .map(|(name, path)| {
                    let at = |msg: &str| {
                        file.at(path.span(), &format!("worker.{key}.{name}"), msg.into())
                    };
                    // `queue = "nats://..."` written below the [worker.roots] header is a root
                    // named queue: said so, without the URL (and its password).
                    if path.get_ref().to_string_lossy().contains("://") {
                        return Err(at(
                            "a URL, not a directory: is a key of [worker] (queue?) written below \
                             this table's header? Move it above the first [worker.*] header",
                        ));
                    }
                    Ok(RootGiven {
                        name: name.clone(),
                        path: file.resolve(path.get_ref()),
                        given: format!(
                            "{}:{}: worker.{key}.{name}",
                            file.path.display(),
                            file.line(path.span())
                        ),
                    })
                })
                .collect::<Result<Vec<RootGiven>>>()
        };
        let settings = WorkerSettings {
            url,
            creds: self.creds.as_ref().map(|p| file.resolve(p.get_ref())),
            tls_ca: self.tls_ca.as_ref().map(|p| file.resolve(p.get_ref())),
            roots: roots(&self.roots, "roots")?,
            out_roots: roots(&self.out_roots, "out_roots")?,
            move_roots: roots(&self.move_roots, "move_roots")?,
            allow_remove_source: self.allow_remove_source,
            jobs: self.jobs.as_ref().map(|j| *j.get_ref()),
            durability: self.durability,
            failure_log: self.failure_log.as_ref().map(|p| file.resolve(p.get_ref())),
            metrics: self.metrics,
        };
        // The file says where the jobs come from and which directories they may read and
        // write: like ssh's StrictModes, no one but its owner (root, or the user the worker
        // runs as) may change it, nor replace it (the directories above it). After the password rule, so a file both readable and
        // writable by others is told first of the password it shows.
        file.access
            .check_not_writable(file.path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.path.display()))?;
        Ok(settings)
    }
}
