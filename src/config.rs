//! The resolved configuration: parsed once from the CLI, then passed around as `&Config`.
//!
//! Everything that can be wrong with the invocation as a whole (missing directory, a flag that
//! makes no sense for the operation, a bad glob) is rejected here, before any file is touched,
//! so that the pipeline only ever meets per-file errors.

use std::ffi::OsStr;
use std::fs;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use crate::cli::{BatchArgs, OpKind, OpSpec, PipelineArgs, WatchArgs};
use crate::digest::HashAlgo;
use crate::fsio::aside::{self, Aside};
use crate::fsio::output::{Dir, Durability};
use crate::fsio::own::{self, OwnIds, OwnPaths};
use crate::fsio::rootdirs::NewDir;

/// Everything a batch run needs to know, resolved and validated.
#[derive(Debug)]
pub(crate) struct Config {
    /// The input root, canonicalized: every walked path starts with it.
    pub(crate) root: PathBuf,
    /// The input root as the user named it, made absolute (not canonical: through a symlink,
    /// say), for absolute links into the tree that spell it so (`input::Root::named`).
    pub(crate) root_named: PathBuf,
    /// The operation applied to each file: the compressor when there is one, else the (first)
    /// hash. What decides outputs, `--level` and the rest for every op as it always did.
    pub(crate) op: OpKind,
    /// Everything `--op` asks for: with several results (`sha256,zstd`), the hashes computed
    /// from the same read as `op`'s output.
    pub(crate) spec: OpSpec,
    /// Number of worker threads (and of Shutdown sentinels).
    pub(crate) jobs: usize,
    /// gzip, zstd: the output root (canonicalized, created if missing); `None` = next to inputs.
    pub(crate) out: Option<PathBuf>,
    /// A hash: where the manifest goes (the first hash's, see `manifest_for`); `None` =
    /// stdout.
    pub(crate) manifest: Option<PathBuf>,
    /// The directory the manifests go in (all of them: `FILE.<hash>` sits beside `FILE`),
    /// opened once at the start: they are written beneath this descriptor, never by its path
    /// again, so a directory renamed away and replaced by a symlink meanwhile does not lead
    /// the write elsewhere (found by a review: a manifest replaced a file outside the roots).
    pub(crate) manifest_dir: Option<Arc<Dir>>,
    /// Where failed/skipped records go as JSON lines.
    pub(crate) failure_log: Option<PathBuf>,
    /// Compression level, checked against the op's range (gzip 1-9, zstd 1-19).
    pub(crate) level: u32,
    /// Include/exclude globs.
    pub(crate) filter: Filter,
    /// Follow symlinks that stay inside the root.
    pub(crate) follow_symlinks: bool,
    /// Redo up-to-date outputs and replace different ones.
    pub(crate) force: bool,
    /// Delete inputs after their output is synced and verified.
    pub(crate) remove_source: bool,
    /// gzip, zstd: move inputs under this directory (canonical, outside the root) after their
    /// output is synced and verified, as `remove_source` would delete them.
    /// Opened once at start (see `Aside`).
    pub(crate) move_source: Option<Arc<Aside>>,
    /// Move inputs that failed for good under this directory (canonical, outside the root,
    /// opened once at start).
    pub(crate) move_failed: Option<Arc<Aside>>,
    /// How outputs (and the manifest) are flushed before they count as published.
    pub(crate) durability: Durability,
    /// `--max-size`: larger files are skipped unread.
    pub(crate) max_size: Option<u64>,
    /// Print the summary as JSON.
    pub(crate) json: bool,
    /// No progress and no human summary.
    pub(crate) quiet: bool,
    /// Show progress bars (stderr is a terminal and not quiet).
    pub(crate) progress: bool,
    /// Paths inside the root that filepipe writes itself and must never read as inputs.
    pub(crate) own_files: Vec<PathBuf>,
    /// filepipe's own directories and files by identity, whatever path leads to them (see
    /// `own_ids`).
    pub(crate) own_ids: std::sync::OnceLock<OwnIds>,
    /// A service's pipeline: every pipeline's own directories and files, which each leaves
    /// out too (`None` outside a service).
    pub(crate) service_own: Option<Arc<own::Shared>>,
    /// Inputs must be opened beneath the root or not at all (cluster workers, whose job paths
    /// come from a queue): never by full path when the root cannot be opened.
    pub(crate) confined: bool,
    /// Each output directory is swept of this host's dead temps the first time it is written
    /// into (cluster workers, which walk no tree: see `output::Sweeper`).
    pub(crate) sweep_out_dirs: bool,
    /// Outcomes go to a coordinator over the queue (cluster workers), which may record them in
    /// a state (watch mode, `--state`): the worker cannot tell, so it treats an output found up
    /// to date as a run with a state does (flushed before it is reported).
    pub(crate) coordinated: bool,
    /// Watch mode settings; `None` for a one-shot batch.
    pub(crate) watch: Option<WatchSettings>,
    /// Batch mode with `--state`: the state that spares unchanged files a read; `None`
    /// otherwise (and always in watch mode, whose state is in `watch`).
    pub(crate) incremental: Option<Incremental>,
}

/// An incremental batch's state (`batch --state DIR`).
#[derive(Debug)]
pub(crate) struct Incremental {
    /// Where the SQLite state lives (canonical).
    pub(crate) state_dir: PathBuf,
    /// `--rehash`: every file is read; the stamps are recorded afresh.
    pub(crate) rehash: bool,
    /// The state directory, held for this process: a watch daemon or another batch on the
    /// same state would record over this run's rows.
    #[expect(dead_code, reason = "held, never read: dropping it releases the lock")]
    pub(crate) lock: std::sync::Arc<crate::state::DirLock>,
}

/// The settle time when none is given.
pub(crate) const DEFAULT_SETTLE_MS: u64 = 300;

/// What only watch mode needs.
#[derive(Debug, Clone)]
pub(crate) struct WatchSettings {
    /// How long a closed file's size and mtime must stay unchanged before it is taken.
    pub(crate) settle: Duration,
    /// Rescan the whole tree this often, for writers no event reports (`--poll`).
    pub(crate) poll: Option<Duration>,
    /// Cluster mode: settled files go to this queue's workers, not to local ones.
    pub(crate) queue: Option<QueueTarget>,
    /// Where the SQLite state lives.
    pub(crate) state_dir: PathBuf,
    /// The state directory, held for this process (`None` when only validating a config):
    /// dropping it releases the lock.
    pub(crate) lock: Option<std::sync::Arc<crate::state::DirLock>>,
}

/// The name a coordinator's root goes by when none is given: its directory's own name.
pub(crate) fn default_root_name(root: &Path) -> String {
    root.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether `name` may name a root in cluster mode: 1 to 64 of `A-Z a-z 0-9 _ -` (a NATS
/// subject token; `cluster::wire` checks job messages by the same rule).
pub(crate) fn valid_root_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Cluster mode: the name the workers know the output root `out` by (`given`, or its own
/// name), or `Err` with that name if it may not be one: not a valid root name, or the input
/// root's (`root`). The coordinator checks it at start, `check-config` when the file loads.
pub(crate) fn out_root_name(out: &Path, given: Option<&str>, root: &str) -> Result<String, String> {
    let name = given.map_or_else(|| default_root_name(out), str::to_owned);
    if valid_root_name(&name) && name != root {
        Ok(name)
    } else {
        Err(name)
    }
}

/// Cluster mode: the names the workers know a coordinator's move directories by, as given
/// (`--move-source-name`, `--move-failed-name`; `None`: each directory's own name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) struct MoveNames {
    /// `--move-source`'s.
    pub(crate) source: Option<String>,
    /// `--move-failed`'s.
    pub(crate) failed: Option<String>,
}

#[cfg(feature = "cluster")]
impl MoveNames {
    /// The names a coordinator's flags give.
    pub(crate) fn given(args: &crate::cli::CoordinatorArgs) -> MoveNames {
        MoveNames {
            source: args.move_source_name.clone(),
            failed: args.move_failed_name.clone(),
        }
    }
}

/// Cluster mode: the names the workers know the move directories `source` and `failed` by
/// (`given`, or each one's own name), each one distinct from `taken` (the input and output
/// roots' names) and from the other. `Err` names the setting at fault (`source`, `failed`)
/// and the name refused. The coordinator checks them at start, `check-config` when the file
/// loads.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) fn move_root_names(
    (source, failed): (Option<&Path>, Option<&Path>),
    given: &MoveNames,
    taken: &[&str],
) -> Result<MoveNames, (&'static str, String)> {
    let mut names: Vec<String> = taken.iter().map(|&n| n.to_owned()).collect();
    let mut named = |which: &'static str, dir: Option<&Path>, given: &Option<String>| {
        let Some(dir) = dir else { return Ok(None) };
        let name = given.clone().unwrap_or_else(|| default_root_name(dir));
        if !valid_root_name(&name) || names.contains(&name) {
            return Err((which, name));
        }
        names.push(name.clone());
        Ok(Some(name))
    };
    Ok(MoveNames {
        source: named("source", source, &given.source)?,
        failed: named("failed", failed, &given.failed)?,
    })
}

/// Cluster mode: the queue a coordinator publishes its jobs to, and the name its workers know
/// its root by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) struct QueueTarget {
    /// The NATS URL.
    pub(crate) url: String,
    /// A NATS credentials file.
    pub(crate) creds: Option<PathBuf>,
    /// CA certificates to trust for TLS.
    pub(crate) tls_ca: Option<PathBuf>,
    /// The root's name (`--root-name`).
    pub(crate) root_name: String,
    /// The output root's name (`--out-root-name`; `None`: `--out`'s own name).
    pub(crate) out_root_name: Option<String>,
    /// The move directories' names, as given.
    pub(crate) move_names: MoveNames,
}

/// The environment variable a queue's URL comes from when `--queue` is given without one (a
/// coordinator, `status`) or not at all (a worker): the environment of a process is readable by
/// its user and root only, where its command line is every user's (`ps`, /proc/PID/cmdline).
pub(crate) const QUEUE_ENV: &str = "FILEPIPE_QUEUE";

/// A coordinator's or `status`'s `--queue`: absent (`None`: a local run, whatever the
/// environment holds), with a URL, or alone, which takes the URL from `FILEPIPE_QUEUE`. The
/// variable alone never turns a batch into a cluster run: one exported for a worker in the
/// same shell must not send a local batch's files to another host.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) fn queue_url(given: Option<&Option<String>>) -> Result<Option<String>> {
    match given {
        None => Ok(None),
        Some(Some(url)) => Ok(Some(url.clone())),
        Some(None) => match std::env::var(QUEUE_ENV) {
            Ok(url) if !url.trim().is_empty() => Ok(Some(url.trim().to_owned())),
            Ok(_) | Err(std::env::VarError::NotPresent) => bail!(
                "--queue without a URL takes it from {QUEUE_ENV}, which is not set (or empty): \
                 export {QUEUE_ENV}=nats://HOST:4222, or give --queue URL"
            ),
            Err(std::env::VarError::NotUnicode(_)) => bail!("{QUEUE_ENV} is not UTF-8"),
        },
    }
}

/// A root a worker is told to map, before it is checked: its name, where it is mounted here,
/// and how an error names it (`--root a=/x`, or `FILE:LINE: worker.roots.a`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RootGiven {
    /// The name jobs know it by.
    pub(crate) name: String,
    /// Its mount point on this host (relative paths already resolved where they were given).
    pub(crate) path: PathBuf,
    /// Where it was given, for errors.
    pub(crate) given: String,
}

impl RootGiven {
    /// A `--root` or `--out-root` flag's `NAME=PATH`.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn from_flag(flag: &str, arg: &str) -> Result<RootGiven> {
        let Some((name, path)) = arg.split_once('=') else {
            bail!("{flag} {arg}: expected NAME=PATH");
        };
        Ok(RootGiven {
            name: name.to_owned(),
            path: PathBuf::from(path),
            given: format!("{flag} {arg}"),
        })
    }
}

/// A worker's settings as given, by its flags, by its config file's `[worker]` table, or by
/// both merged (`overridden_by`); `WorkerConfig::resolve` checks them.
#[derive(Debug, Default, Clone)]
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) struct WorkerSettings {
    /// The queue's URL (`None`: not given here).
    pub(crate) url: Option<String>,
    /// A NATS credentials file.
    pub(crate) creds: Option<PathBuf>,
    /// CA certificates to trust for TLS.
    pub(crate) tls_ca: Option<PathBuf>,
    /// The input roots, in the order given.
    pub(crate) roots: Vec<RootGiven>,
    /// The output roots, in the order given.
    pub(crate) out_roots: Vec<RootGiven>,
    /// The directories inputs may be moved to, in the order given.
    pub(crate) move_roots: Vec<RootGiven>,
    /// Jobs may ask for their inputs to be removed.
    pub(crate) allow_remove_source: bool,
    /// Worker threads.
    pub(crate) jobs: Option<u16>,
    /// How outputs are flushed.
    pub(crate) durability: Option<Durability>,
    /// Where failed and skipped files are logged, as JSON lines.
    pub(crate) failure_log: Option<PathBuf>,
    /// Where Prometheus metrics are served.
    pub(crate) metrics: Option<std::net::SocketAddr>,
}

impl WorkerSettings {
    /// `self` (the config file's) with `flags` (the command line's) over it, as `watch
    /// --config` and nats-server take flags over their files: each setting the command line
    /// gives replaces the file's; a root is replaced by name (`--root logs=/mnt/logs` moves the
    /// file's `logs`, and adds it if the file has none), the others stay.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn overridden_by(self, flags: WorkerSettings) -> WorkerSettings {
        let merge = |file: Vec<RootGiven>, flags: Vec<RootGiven>| {
            let mut roots: Vec<RootGiven> = file
                .into_iter()
                .filter(|r| !flags.iter().any(|f| f.name == r.name))
                .collect();
            roots.extend(flags);
            roots
        };
        WorkerSettings {
            url: flags.url.or(self.url),
            creds: flags.creds.or(self.creds),
            tls_ca: flags.tls_ca.or(self.tls_ca),
            roots: merge(self.roots, flags.roots),
            out_roots: merge(self.out_roots, flags.out_roots),
            move_roots: merge(self.move_roots, flags.move_roots),
            allow_remove_source: flags.allow_remove_source || self.allow_remove_source,
            jobs: flags.jobs.or(self.jobs),
            durability: flags.durability.or(self.durability),
            failure_log: flags.failure_log.or(self.failure_log),
            metrics: flags.metrics.or(self.metrics),
        }
    }
}

#[cfg(feature = "cluster")]
impl WorkerSettings {
    /// What `filepipe worker`'s flags give (`--queue` or `FILEPIPE_QUEUE`, clap reads both).
    pub(crate) fn from_args(args: &crate::cli::WorkerArgs) -> Result<WorkerSettings> {
        let flags = |flag: &str, given: &[String]| -> Result<Vec<RootGiven>> {
            given
                .iter()
                .map(|a| RootGiven::from_flag(flag, a))
                .collect()
        };
        Ok(WorkerSettings {
            // An empty FILEPIPE_QUEUE (an env file's `FILEPIPE_QUEUE=`) sets no URL, as a
            // coordinator's `--queue` takes it: the config file's stays.
            url: args.queue.clone().filter(|u| !u.trim().is_empty()),
            creds: args.creds.clone(),
            tls_ca: args.tls_ca.clone(),
            roots: flags("--root", &args.roots)?,
            out_roots: flags("--out-root", &args.out_roots)?,
            move_roots: flags("--move-root", &args.move_roots)?,
            allow_remove_source: args.allow_remove_source,
            jobs: args.jobs,
            durability: args.durability,
            failure_log: args.failure_log.clone(),
            metrics: args.metrics,
        })
    }
}

/// A cluster worker's configuration, resolved and checked: what `filepipe worker` runs on,
/// from its flags, its `--config` file's `[worker]` table, or both.
#[derive(Debug)]
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) struct WorkerConfig {
    /// The queue's URL (it may hold a password: show it only through
    /// `secret::shown_url`). Empty when only checking a config file whose worker
    /// takes its URL from the command line or the environment.
    pub(crate) url: String,
    /// A NATS credentials file (.creds).
    pub(crate) creds: Option<PathBuf>,
    /// CA certificates to trust for a tls:// queue, in place of the system's (only these are
    /// trusted).
    pub(crate) tls_ca: Option<PathBuf>,
    /// The input roots jobs may name, each an existing directory (canonical).
    pub(crate) roots: std::collections::HashMap<String, PathBuf>,
    /// The output roots jobs may name: written to only, apart from every input root.
    pub(crate) out_roots: std::collections::HashMap<String, PathBuf>,
    /// The directories jobs may have their inputs moved to: apart from every input and
    /// output root.
    pub(crate) move_roots: std::collections::HashMap<String, PathBuf>,
    /// Jobs may have their inputs removed once their outputs are durable.
    pub(crate) allow_remove_source: bool,
    /// Worker threads.
    pub(crate) jobs: usize,
    /// How outputs are flushed before they are reported done.
    pub(crate) durability: Durability,
    /// One JSON line per failed or skipped file.
    pub(crate) failure_log: Option<PathBuf>,
    /// Where Prometheus metrics are served.
    pub(crate) metrics: Option<std::net::SocketAddr>,
}

/// How a worker's root `path` overlaps another, `root`, by their resolved paths: the same
/// directory, enclosing it, or inside it (what a bind mount hides is checked by identity when
/// the worker opens its move roots).
fn overlap_by_path(path: &Path, root: &Path) -> Option<&'static str> {
    if path == root {
        Some("is")
    } else if root.starts_with(path) {
        Some("encloses")
    } else if path.starts_with(root) {
        Some("is inside")
    } else {
        None
    }
}

impl WorkerConfig {
    /// Checks `s` as the worker does at start: at least one root; each root's name a valid
    /// one and its path an existing directory; output roots apart from every input root (a
    /// job message is untrusted: it may pick any output root, never to write among inputs).
    /// With `need_url`, a URL must have been given (`check-config` leaves it to the command
    /// line or the environment).
    pub(crate) fn resolve(s: WorkerSettings, need_url: bool) -> Result<WorkerConfig> {
        let url = match &s.url {
            Some(url) if !url.trim().is_empty() => url.trim().to_owned(),
            _ if need_url => bail!(
                "no queue: give --queue URL, set {QUEUE_ENV}, or set queue or queue_file in \
                 the config file's [worker] table"
            ),
            _ => String::new(),
        };
        if s.roots.is_empty() {
            bail!(
                "no root to take jobs for: give --root NAME=PATH, or NAME = \"PATH\" in the \
                 config file's [worker.roots]"
            );
        }
        let roots = map_roots(&s.roots)?;
        let out_roots = map_roots(&s.out_roots)?;
        let move_roots = map_roots(&s.move_roots)?;
        // A move root is checked as an output root is, against the output roots too: moved
        // inputs would be mixed with outputs, or taken as inputs again.
        let inputs_and_outputs: Vec<(&RootGiven, &PathBuf)> = s
            .roots
            .iter()
            .map(|r| (r, &roots[&r.name]))
            .chain(s.out_roots.iter().map(|r| (r, &out_roots[&r.name])))
            .collect();
        for moved in &s.move_roots {
            let path = &move_roots[&moved.name];
            for (other, root) in &inputs_and_outputs {
                let how = if other.name == moved.name {
                    "has the name of"
                } else if let Some(how) = overlap_by_path(path, root) {
                    how
                } else {
                    continue;
                };
                bail!(
                    "{}: {} {how} the root {} ({}): a move root must be apart from every input \
                     and output root, and named apart",
                    moved.given,
                    path.display(),
                    root.display(),
                    other.given
                );
            }
        }
        // Two move roots apart too: a job may pair any two, mixing done and failed inputs.
        for (i, a) in s.move_roots.iter().enumerate() {
            for b in &s.move_roots[i + 1..] {
                let (pa, pb) = (&move_roots[&a.name], &move_roots[&b.name]);
                if overlap_by_path(pa, pb).is_some() {
                    bail!(
                        "{} and {}: move roots must be apart, or done and failed inputs could \
                         be mixed",
                        a.given,
                        b.given
                    );
                }
            }
        }
        // Two output roots apart too: jobs of two coordinators, `sub/x` to one and `x` to
        // the other nested in it, would write the same output (found by a review).
        for (i, a) in s.out_roots.iter().enumerate() {
            for b in &s.out_roots[i + 1..] {
                let (pa, pb) = (&out_roots[&a.name], &out_roots[&b.name]);
                if let Some(how) = overlap_by_path(pa, pb) {
                    bail!(
                        "{}: {} {how} the output root {} ({}): output roots must be apart, or \
                         two runs could write the same output",
                        a.given,
                        pa.display(),
                        pb.display(),
                        b.given
                    );
                }
            }
        }
        for out in &s.out_roots {
            let path = &out_roots[&out.name];
            if let Some(input) = s.roots.iter().find(|r| r.name == out.name) {
                bail!(
                    "{}: {:?} is also an input root's name ({})",
                    out.given,
                    out.name,
                    input.given
                );
            }
            for input in &s.roots {
                let root = &roots[&input.name];
                let Some(how) = overlap_by_path(path, root) else {
                    continue;
                };
                bail!(
                    "{}: {} {how} the input root {} ({}): outputs would be written among the \
                     inputs; an output root must be apart from every input root",
                    out.given,
                    path.display(),
                    root.display(),
                    input.given
                );
            }
        }
        check_worker_files(&s)?;
        Ok(WorkerConfig {
            url,
            creds: s.creds,
            tls_ca: s.tls_ca,
            roots,
            out_roots,
            move_roots,
            allow_remove_source: s.allow_remove_source,
            jobs: s.jobs.map_or_else(default_jobs, usize::from),
            durability: s.durability.unwrap_or_default(),
            failure_log: s.failure_log,
            metrics: s.metrics,
        })
    }
}

/// The files a worker opens at start, checked without creating or changing any: the failure
/// log can be appended to (or made in an existing directory it may write), the CA file is a
/// regular file only root or the worker's user may change or replace (it says whom to trust),
/// the credentials file is one only its owner may read and change (it holds an nkey seed).
/// Here, in `resolve`, so `check-config` refuses what the worker would.
fn check_worker_files(s: &WorkerSettings) -> Result<()> {
    if let Some(log) = &s.failure_log {
        let ctx = || format!("cannot open failure log {}", log.display());
        // Opened for appending without O_CREAT, as the worker will open it: nothing is
        // written or made.
        match crate::logging::open_failure_log(log, false).with_context(ctx)? {
            Some(_) => {}
            None => {
                let abs = absolute_file(log).with_context(ctx)?;
                let dir = abs.parent().unwrap_or(Path::new("/"));
                rustix::fs::access(dir, rustix::fs::Access::WRITE_OK)
                    .map_err(std::io::Error::from)
                    .with_context(|| {
                        format!(
                            "cannot create failure log {} in {}",
                            log.display(),
                            dir.display()
                        )
                    })?;
            }
        }
    }
    if let Some(ca) = &s.tls_ca {
        crate::secret::open_checked(ca, crate::secret::FileRule::Trust)
            .map_err(|e| anyhow::anyhow!("the CA certificates: {e}"))?;
    }
    if let Some(creds) = &s.creds {
        let rule = crate::secret::FileRule::Secret(crate::secret::CREDS_SECRET);
        crate::secret::open_checked(creds, rule)
            .map_err(|e| anyhow::anyhow!("the credentials: {e}"))?;
    }
    Ok(())
}

/// The roots given, by name, each path an existing directory (canonical).
fn map_roots(given: &[RootGiven]) -> Result<std::collections::HashMap<String, PathBuf>> {
    let mut roots = std::collections::HashMap::new();
    for r in given {
        if !valid_root_name(&r.name) {
            bail!("{}: a root's name is 1 to 64 of A-Z a-z 0-9 _ -", r.given);
        }
        if r.path.as_os_str().is_empty() {
            bail!("{}: an empty path: give the directory", r.given);
        }
        // Shown redacted: a path is where a misplaced queue URL would end up.
        let shown = |p: &Path| crate::secret::redact(&p.display().to_string());
        let path = crate::fsio::canonical::resolve(&r.path)
            .with_context(|| format!("{}: {} is not reachable", r.given, shown(&r.path)))?;
        if !path.is_dir() {
            bail!("{}: {} is not a directory", r.given, shown(&path));
        }
        if roots.insert(r.name.clone(), path).is_some() {
            bail!("{}: the root {} is given twice", r.given, r.name);
        }
    }
    Ok(roots)
}

impl Config {
    /// Resolves and validates the `batch` arguments.
    pub(crate) fn from_batch(args: &BatchArgs, quiet: bool) -> Result<Config> {
        // Every check by identity compares with the mount table as it was read once.
        aside::with_mount_table(|| Config::from_batch_checked(args, quiet))
    }

    fn from_batch_checked(args: &BatchArgs, quiet: bool) -> Result<Config> {
        let compress_only = [
            ("--force", args.force),
            ("--remove-source", args.remove_source),
        ];
        if !args.op.compresses() {
            if let Some((flag, _)) = compress_only.iter().find(|(_, set)| *set) {
                bail!("{flag} only applies to --op gzip or zstd");
            }
        }
        if args.remove_source && args.op.is_multi() {
            // An input may only go once everything made from it is durable: its output, and its
            // line in the manifest, which batch mode writes at the end of the run.
            bail!(
                "--remove-source does not combine with several results (--op {}): the input \
                 would go before its manifest line is written; compress with --remove-source \
                 in a run of its own",
                args.op
            );
        }
        if args.op.hashes().len() > 1 && args.common.manifest.is_none() {
            bail!(
                "--op {} computes several hashes: give --manifest FILE (the first hash's \
                 manifest; the others go to FILE.<hash>), stdout holds only one",
                args.op
            );
        }
        if args.remove_source && args.common.durability == Some(Durability::None) {
            // Deleting an input whose output may be in memory only: a machine crash could
            // lose both.
            bail!("--remove-source needs durable outputs: not with --durability none");
        }
        #[cfg(feature = "cluster")]
        if args.state.is_some() && args.queue.is_some() {
            // The coordinator's journal on the queue is what lets a cluster run resume; a
            // local state would have to be reconciled with it, which nothing does yet.
            bail!(
                "--state does not combine with --queue: an incremental run reads the files \
                 here; run it without --queue"
            );
        }
        if let Some(dir) = args.state.as_ref().filter(|_| makes_dirs(&args.common)) {
            // The state's checks against `--out` and the move directories, before any of them
            // is made: a refused run leaves no directory behind (found by a review:
            // `--out st/o --state st` made `st/o`, then refused it).
            let dry = Config::from_common(&args.dir, &args.op, &args.common, quiet, false)?;
            state_before_making(&dry, dir)?;
            check_dirs_apart(&dry, &absolute(dir))?;
        }
        let mut cfg = Config::from_common(&args.dir, &args.op, &args.common, quiet, true)?;
        for &algo in cfg.spec.hashes() {
            if let Some(m) = cfg.manifest_for(algo) {
                check_manifest_name(&m)?;
            }
        }
        cfg.follow_symlinks = args.follow_symlinks;
        cfg.force = args.force;
        cfg.remove_source = args.remove_source;
        // A coordinator's run files (`cluster::resume`) are its own, under the default state
        // directory: never inputs of a tree that holds it (`batch ~ --queue ...`).
        #[cfg(feature = "cluster")]
        if args.queue.is_some() {
            let dir = crate::state::default_dir();
            let dir = fs::canonicalize(&dir).unwrap_or_else(|_| absolute(&dir));
            cfg.own_files.push(dir.join("coordinator"));
        }
        if let Some(dir) = &args.state {
            state_before_making(&cfg, dir)?;
            let to_be = absolute(dir);
            check_dirs_apart(&cfg, &to_be)?;
            check_state_to_be(dir, &to_be)?;
            // Open to no one the tree is closed to: it names every file and its digest.
            NewDir::state_for([cfg.root.as_path()])
                .create_all(&to_be, false)
                .with_context(|| format!("cannot create state directory {}", dir.display()))?;
            let state_dir = crate::fsio::canonical::resolve(&to_be)
                .with_context(|| format!("cannot open state directory {}", dir.display()))?;
            check_state(&cfg.root, dir, &state_dir)?;
            check_own_files_apart(&cfg.own_files, &state_dir)?;
            check_dirs_apart(&cfg, &state_dir)?;
            check_state_kept(dir, &state_dir)?;
            let lock = crate::state::lock_dir(&state_dir)?;
            // A state directory inside the tree is filepipe's, never an input.
            cfg.own_files.push(state_dir.clone());
            cfg.incremental = Some(Incremental {
                state_dir,
                rehash: args.rehash,
                lock,
            });
        }
        Ok(cfg)
    }

    /// Resolves the options batch and watch share, for the tree `dir` and operation `op`.
    /// With `create`, a missing `--out` directory is made; without, nothing is written.
    pub(crate) fn from_common(
        dir: &Path,
        spec: &OpSpec,
        args: &PipelineArgs,
        quiet: bool,
        create: bool,
    ) -> Result<Config> {
        let root = crate::fsio::canonical::resolve(dir)
            .with_context(|| format!("cannot open input directory {}", dir.display()))?;
        if !root.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        // What `--out` and the move directories are made as, where they are missing: never
        // more open than the tree (the directories beneath mirror theirs, `output::mirrored`).
        let new_dir = create
            .then(|| NewDir::like_input_at(&root))
            .transpose()
            .with_context(|| format!("cannot examine input directory {}", root.display()))?;
        let op = spec.primary();
        if !spec.compresses() && args.out.is_some() {
            bail!("--out only applies to --op gzip or zstd");
        } else if spec.hashes().is_empty() && args.manifest.is_some() {
            bail!("--manifest only applies to the hashing ops (sha256, sha512, blake3)");
        }
        // The range depends on the op (gzip 1-9, zstd 1-19): clap only knows the widest.
        let level = op
            .level(args.level)
            .map_err(|e| anyhow::anyhow!("--level {e}"))?;
        // Checked before anything is created (--out included): a refusal leaves no directory.
        let out_given = args.out.as_deref().map(absolute);
        for (given, flag) in [
            (&args.move_source, "--move-source"),
            (&args.move_failed, "--move-failed"),
        ] {
            if let Some(given) = given {
                check_aside(&root, out_given.as_deref(), flag, given, &absolute(given))?;
            }
        }
        // Inputs done and inputs failed in one place could no longer be told apart.
        if let (Some(done), Some(failed)) = (&args.move_source, &args.move_failed) {
            let (d, f) = (absolute(done), absolute(failed));
            if d.starts_with(&f) || f.starts_with(&d) {
                bail!(
                    "--move-failed {} and --move-source {} overlap: failed inputs would be mixed \
                     with processed ones; choose two separate directories",
                    failed.display(),
                    done.display()
                );
            }
        }
        let out = match &args.out {
            Some(out) => {
                // Checked before anything is created: a refused --out leaves no directory.
                check_out(&root, out, &absolute(out))?;
                if let Some(new_dir) = new_dir {
                    refuse_inside_before_making(
                        &root,
                        out,
                        "--out",
                        "outputs would be mixed with the inputs",
                    )?;
                    // Made at the path the checks judged: a `..` after a name not made yet
                    // climbs from that name, not from a directory made for it (found by a
                    // review: `--out A/junk/../../o` made `A/junk` in the tree).
                    let to_be = absolute(out);
                    new_dir.create_all(&to_be, false).with_context(|| {
                        format!("cannot create output directory {}", out.display())
                    })?;
                    let made = crate::fsio::canonical::resolve(&to_be).with_context(|| {
                        format!("cannot open output directory {}", out.display())
                    })?;
                    // Again, resolved now that it exists (a symlink may have appeared).
                    check_out(&root, out, &made)?;
                    // What the paths do not show: a bind mount of (or into) the tree, or a
                    // FUSE view of it (found by a review: outputs written among the inputs,
                    // and with --force over them).
                    // (`O_PATH`: a directory one may write and pass through, not read, is
                    // compared too; found by a review.)
                    let flags = rustix::fs::OFlags::PATH
                        | rustix::fs::OFlags::DIRECTORY
                        | rustix::fs::OFlags::CLOEXEC;
                    let how = rustix::fs::open(&made, flags, rustix::fs::Mode::empty())
                        .map_err(std::io::Error::from)
                        .and_then(|fd| aside::overlap_at(&root, &fd, &made))
                        .with_context(|| {
                            format!("cannot examine output directory {}", made.display())
                        })?;
                    if let Some(how) = how {
                        bail!(
                            "--out {} {how} input directory {} (by a bind mount, a FUSE view \
                             or a hard-linked directory): outputs would be mixed with the \
                             inputs; choose a directory outside it, or leave --out out to \
                             write each output next to its input",
                            out.display(),
                            root.display()
                        );
                    }
                    Some(made)
                } else {
                    Some(absolute(out))
                }
            }
            None => None,
        };
        if args.move_source.is_some() {
            // A manifest lists each file by its path in the tree: `sha256sum -c` run from the
            // root would no longer find a file moved away.
            if !spec.compresses() {
                bail!(
                    "--move-source only applies to --op gzip or zstd: a manifest names each file \
                     by its path in the tree, which a move would break (move the files once the \
                     manifest is written)"
                );
            }
            // With several results, the hashes' manifests would name files moved away.
            if !spec.hashes().is_empty() {
                bail!(
                    "--move-source does not combine with several results (--op {spec}): their \
                     manifests name each file by its path in the tree, which a move would \
                     break; compress with --move-source in a run of its own, or move the files \
                     once the manifests are written"
                );
            }
            if args.durability == Some(Durability::None) {
                // Moving an input whose output may be in memory only: a machine crash could
                // leave the output empty and the input gone from the tree.
                bail!("--move-source needs durable outputs: not with --durability none");
            }
        }
        let move_dir = |given: &Option<PathBuf>, flag: &str| -> Result<Option<Arc<Aside>>> {
            let Some(given) = given else { return Ok(None) };
            // Checked again once it exists (a symlink may have appeared).
            let Some(new_dir) = new_dir else {
                return Ok(Some(Arc::new(Aside::unopened(&absolute(given)))));
            };
            refuse_inside_before_making(&root, given, flag, "moved files would be seen again")?;
            // At the path the checks judged (as `--out`).
            let to_be = absolute(given);
            // Each directory made synced into its parent: a move directory made at start must
            // still be there after a power cut that keeps what was moved into it.
            new_dir
                .create_all(&to_be, true)
                .with_context(|| format!("cannot create {flag} directory {}", given.display()))?;
            let made = crate::fsio::canonical::resolve(&to_be)
                .with_context(|| format!("cannot open {flag} directory {}", given.display()))?;
            check_aside(&root, out.as_deref(), flag, given, &made)?;
            // Opened once, here: every move goes beneath this descriptor.
            let aside = Aside::open(&made)
                .with_context(|| format!("cannot open {flag} directory {}", made.display()))?;
            // What the paths do not show: a bind mount of (or into) the tree.
            for (tree, what) in [
                (Some(&root), "input directory"),
                (out.as_ref(), "--out directory"),
            ] {
                let Some(tree) = tree else { continue };
                let how = aside::overlap(tree, &aside).with_context(|| {
                    format!("cannot examine {flag} directory {}", made.display())
                })?;
                if let Some(how) = how {
                    bail!(
                        "{flag} {} {how} {what} {} (by a bind mount, a FUSE view or a \
                         hard-linked directory): moved files would be seen again or mixed with \
                         outputs; choose a directory outside it",
                        given.display(),
                        tree.display()
                    );
                }
            }
            Ok(Some(Arc::new(aside)))
        };
        let move_source = move_dir(&args.move_source, "--move-source")?;
        let move_failed = move_dir(&args.move_failed, "--move-failed")?;
        // The same, by identity: one a bind mount of (or into) the other.
        if let (Some(done), Some(failed)) = (&move_source, &move_failed) {
            let how = aside::overlap(&done.root, failed).with_context(|| {
                format!(
                    "cannot examine --move-failed directory {}",
                    failed.root.display()
                )
            })?;
            if let Some(how) = how {
                bail!(
                    "--move-failed {} {how} --move-source directory {} (by a bind mount, a \
                     FUSE view or a hard-linked directory): failed inputs would be mixed with \
                     processed ones; choose two separate directories",
                    failed.root.display(),
                    done.root.display()
                );
            }
        }
        if args.manifest.as_deref() == Some(Path::new("-")) {
            // sha256sum's and tar's users read `-` as stdout; filepipe wrote a file named `-`.
            bail!(
                "--manifest -: a batch prints its manifest on stdout when --manifest is left out; \
                 to write a file named -, give ./-"
            );
        }
        let manifest = args.manifest.as_deref().map(absolute_file).transpose()?;
        let manifests: Vec<PathBuf> = spec
            .hashes()
            .iter()
            .filter_map(|&algo| manifest_path(manifest.as_deref(), spec, algo))
            .collect();
        let manifest_dir = match manifests.first() {
            Some(m) => Some(Arc::new(open_manifest_dir(m)?)),
            None => None,
        };
        for (i, m) in manifests.iter().enumerate() {
            // A manifest replaces only a manifest, never a file of the user's that bears its
            // name: an input of the tree, a release's own notes, the state's database (found
            // by a review: `--manifest t/a` replaced the input `t/a`).
            check_existing_manifest(m, spec.hashes()[i], i == 0)?;
        }
        let failure_log = args.failure_log.as_deref().map(absolute_file).transpose()?;
        if let Some(log) = &failure_log {
            if manifests.contains(log) {
                bail!(
                    "--failure-log {} is also a manifest's name: the manifest would replace it",
                    log.display()
                );
            }
        }
        let own_files = manifests.iter().chain(&failure_log).cloned().collect();
        let jobs = match args.jobs {
            Some(n) => usize::from(n),
            None => default_jobs(),
        };
        Ok(Config {
            root_named: std::path::absolute(dir).unwrap_or_else(|_| root.clone()),
            root,
            op,
            spec: spec.clone(),
            jobs,
            out,
            manifest,
            manifest_dir,
            failure_log,
            level,
            filter: Filter::new(&args.include, &args.exclude)?,
            follow_symlinks: false,
            force: false,
            remove_source: false,
            move_source,
            move_failed,
            durability: args.durability.unwrap_or_default(),
            max_size: args.max_size,
            json: args.json,
            quiet,
            progress: !quiet && std::io::stderr().is_terminal(),
            own_files,
            own_ids: Default::default(),
            service_own: None,
            confined: false,
            sweep_out_dirs: false,
            coordinated: false,
            watch: None,
            incremental: None,
        })
    }

    /// Resolves and validates the `watch` arguments for one tree (not `--config`).
    pub(crate) fn from_watch(args: &WatchArgs, quiet: bool) -> Result<Config> {
        // Every check by identity compares with the mount table as it was read once.
        aside::with_mount_table(|| Config::from_watch_checked(args, quiet))
    }

    fn from_watch_checked(args: &WatchArgs, quiet: bool) -> Result<Config> {
        let (Some(dir), Some(op)) = (&args.dir, &args.op) else {
            bail!("watch needs DIR and --op, or --config FILE");
        };
        // Before anything is created: `--queue` alone with no URL in the environment.
        #[cfg(feature = "cluster")]
        let url = queue_url(args.queue.as_ref())?;
        let state_dir = args.state.clone().unwrap_or_else(crate::state::default_dir);
        // Before `--out`, the move directories and the state directory are made, the state
        // locked (`watching` checks the rest): a refused run leaves none of them behind.
        if makes_dirs(&args.common) {
            let dry = Config::from_common(dir, op, &args.common, quiet, false)?;
            state_before_making(&dry, &state_dir)?;
            check_dirs_apart(&dry, &absolute(&state_dir))?;
        }
        let cfg = Config::from_common(dir, op, &args.common, quiet, true)?;
        // Again with `--out` and the move directories made, before the state directory is
        // made and locked (`watching` checks the rest).
        check_dirs_apart(&cfg, &absolute(&state_dir))?;
        let settle = Duration::from_millis(args.settle.unwrap_or(DEFAULT_SETTLE_MS));
        // Open to no one the tree is closed to: it names every file and its digest.
        let new_state = NewDir::state_for([cfg.root.as_path()]);
        #[allow(unused_mut)]
        let mut cfg = cfg.watching(
            state_dir,
            settle,
            args.poll.map(Duration::from_secs),
            Some(new_state),
        )?;
        if let Some(w) = &cfg.watch {
            // (The service checks this itself, naming the config's line and key.)
            check_dirs_apart(&cfg, &w.state_dir)?;
        }
        #[cfg(feature = "cluster")]
        if let (Some(url), Some(w)) = (url, cfg.watch.as_mut()) {
            let c = &args.coordinator;
            let root_name = c
                .root_name
                .clone()
                .unwrap_or_else(|| default_root_name(&cfg.root));
            if !valid_root_name(&root_name) {
                bail!(
                    "the root's name {root_name:?} is not 1 to 64 of A-Z a-z 0-9 _ - : give one \
                     with --root-name NAME (the workers map it with --root NAME=PATH)"
                );
            }
            w.queue = Some(QueueTarget {
                url,
                creds: c.creds.clone(),
                tls_ca: c.tls_ca.clone(),
                root_name,
                out_root_name: c.out_root_name.clone(),
                move_names: MoveNames::given(c),
            });
        }
        Ok(cfg)
    }

    /// Turns a resolved config into a watch config with its state directory, settle time and
    /// rescan interval. With `make`, the state directory is made as it says if missing
    /// (`NewDir::state_for` the roots it serves) and locked; without, nothing is written.
    pub(crate) fn watching(
        mut self,
        state_dir: PathBuf,
        settle: Duration,
        poll: Option<Duration>,
        make: Option<NewDir>,
    ) -> Result<Config> {
        state_before_making(&self, &state_dir)?;
        let (state_dir, lock) = if let Some(new_dir) = make {
            let to_be = absolute(&state_dir);
            check_state_to_be(&state_dir, &to_be)?;
            new_dir.create_all(&to_be, false).with_context(|| {
                format!("cannot create state directory {}", state_dir.display())
            })?;
            let dir = crate::fsio::canonical::resolve(&to_be)?;
            check_state(&self.root, &state_dir, &dir)?;
            check_own_files_apart(&self.own_files, &dir)?;
            check_state_kept(&state_dir, &dir)?;
            let lock = crate::state::lock_dir(&dir)?;
            (dir, Some(lock))
        } else {
            let dir = absolute(&state_dir);
            check_state(&self.root, &state_dir, &dir)?;
            check_own_files_apart(&self.own_files, &dir)?;
            if dir.is_dir() {
                check_state_kept(&state_dir, &crate::fsio::canonical::resolve(&dir)?)?;
            } else {
                // Not made yet (`check-config`): judged as the run that makes it would judge
                // it (found by a review: passed here, refused at the service's start).
                check_state_to_be(&state_dir, &dir)?;
            }
            (dir, None)
        };
        // A state directory inside the watched tree must not be watched itself.
        self.own_files.push(state_dir.clone());
        self.watch = Some(WatchSettings {
            settle,
            poll,
            queue: None,
            state_dir,
            lock,
        });
        Ok(self)
    }

    /// Where the manifest of `algo` goes: `--manifest FILE` for the first hash `--op` names,
    /// `FILE.<hash>` (`FILE.sha512`, `FILE.blake3`) for the others; `None` without
    /// `--manifest`, or for a hash the run does not compute.
    pub(crate) fn manifest_for(&self, algo: HashAlgo) -> Option<PathBuf> {
        manifest_path(self.manifest.as_deref(), &self.spec, algo)
    }

    /// What this run keeps as its own, by path: the state's, output and move directories
    /// (and a coordinator's run files'), the manifests, the failure log and the state's files.
    pub(crate) fn own_paths(&self) -> OwnPaths {
        // The manifests and the failure log, the state directory and a coordinator's run
        // files' directory: each a directory or a file, as made by now.
        let (mut dirs, files): (Vec<PathBuf>, Vec<PathBuf>) =
            self.own_files.iter().cloned().partition(|p| p.is_dir());
        dirs.extend(self.out.iter().cloned());
        dirs.extend(self.move_source.iter().map(|a| a.root.clone()));
        dirs.extend(self.move_failed.iter().map(|a| a.root.clone()));
        let (mut lasting, replaced): (Vec<PathBuf>, Vec<PathBuf>) = files
            .into_iter()
            .partition(|f| Some(f) == self.failure_log.as_ref());
        let state = (self.incremental.as_ref().map(|i| &i.state_dir))
            .or(self.watch.as_ref().map(|w| &w.state_dir));
        if let Some(state) = state {
            lasting.extend(crate::state::FILE_NAMES.iter().map(|n| state.join(n)));
        }
        OwnPaths {
            dirs,
            replaced,
            lasting,
        }
    }

    /// filepipe's own directories and files by identity (`own_paths`), and in a service every
    /// pipeline's: what the walk and the watcher leave out whatever path reaches them, a bind
    /// mount in the tree or a followed symlink (see `fsio::own`). This run's are looked up at
    /// the first call, once every one of them has been made.
    fn own_ids(&self) -> &OwnIds {
        self.own_ids.get_or_init(|| OwnIds::of(&self.own_paths()))
    }

    /// Whether `ask` says so of this run's own (`own_ids`) or, in a service, of another
    /// pipeline's.
    fn own_by(&self, ask: impl Fn(&OwnIds) -> bool) -> bool {
        ask(self.own_ids()) || self.service_own.as_ref().is_some_and(|s| s.ask(&ask))
    }

    /// Whether the directory `id` is one of filepipe's own.
    pub(crate) fn is_own_dir(&self, id: own::Id) -> bool {
        self.own_by(|o| o.is_dir(id))
    }

    /// Whether `name` in the directory `dir` is one of filepipe's own files.
    pub(crate) fn is_own_named(&self, dir: own::Id, name: &OsStr) -> bool {
        self.own_by(|o| o.is_named(dir, name))
    }

    /// Whether `path` is one of filepipe's own files by its directory's identity and name.
    pub(crate) fn is_own_named_at(&self, path: &Path) -> bool {
        self.own_by(|o| o.is_named_at(path))
    }

    /// Whether the file `id` is one of filepipe's own that stay the same file (a hard link
    /// to the state's database).
    pub(crate) fn is_own_file(&self, id: own::Id) -> bool {
        self.own_by(|o| o.is_file(id))
    }

    /// Whether the file a followed symlink led to (open at `fd`, stat'ed as `st`) is one of
    /// filepipe's own.
    pub(crate) fn is_own_followed(&self, fd: &std::os::fd::OwnedFd, st: &rustix::fs::Stat) -> bool {
        self.own_by(|o| o.is_followed_file(fd, st))
    }

    /// The directory outputs for `rel` (a path relative to the root) are written under.
    pub(crate) fn out_root(&self) -> &Path {
        self.out.as_deref().unwrap_or(&self.root)
    }
}

/// See `Config::manifest_for`. The first hash keeps the name given, so adding a hash to a run
/// (`--op sha256` to `--op sha256,blake3`) moves no existing manifest and breaks no
/// `sha256sum -c FILE` already scripted; each other one is the same name with its own suffix,
/// next to it, where `b3sum -c FILE.blake3` finds it.
fn manifest_path(manifest: Option<&Path>, spec: &OpSpec, algo: HashAlgo) -> Option<PathBuf> {
    let manifest = manifest?;
    match spec.hashes().iter().position(|&a| a == algo)? {
        0 => Some(manifest.to_path_buf()),
        _ => {
            let mut name = manifest.as_os_str().to_os_string();
            name.push(".");
            name.push(OpKind::from(algo).as_str());
            Some(PathBuf::from(name))
        }
    }
}

/// Refuses an output root (`given`, resolved to `out`) that is the input root, encloses it or
/// lies inside it: outputs would then be written among the inputs, and read back as inputs or
/// hidden from the walk. Symlinks are resolved first, so no spelling of the same directory
/// slips through.
pub(crate) fn check_out(root: &Path, given: &Path, out: &Path) -> Result<()> {
    let what = if out == root {
        "is the input directory"
    } else if root.starts_with(out) {
        "encloses the input directory"
    } else if out.starts_with(root) {
        "is inside the input directory"
    } else {
        return Ok(());
    };
    bail!(
        "--out {} {what} {}: outputs would be mixed with the inputs; choose a directory \
         outside it, or leave --out out to write each output next to its input",
        given.display(),
        root.display()
    )
}

/// Refuses a state directory (`given`, resolved as `dir`) that is the input root or encloses
/// it: everything under the state directory is filepipe's own and never an input, so every
/// file of the tree was left out without a word, and the manifest written empty (found by a
/// review). One inside the tree is fine: it alone is left out.
fn check_state(root: &Path, given: &Path, dir: &Path) -> Result<()> {
    let how = if dir == root {
        "is the"
    } else if root.starts_with(dir) {
        "encloses the"
    } else if dir.starts_with(root) {
        return Ok(());
    } else {
        // Apart by path; by identity too? A bind mount or FUSE view of a directory of the
        // tree is walked as the tree, and the state's files in it, not known by that path,
        // were taken as inputs (found by a review: failed `in-use` each run).
        let Some(fd) = open_dir(dir) else {
            return Ok(());
        };
        match aside::overlap_at(root, &fd, dir) {
            Ok(Some("is inside the")) => bail!(
                "--state {} is inside the input directory {} by another path (a bind mount, a \
                 FUSE view or a hard-linked directory): the walk would take the state's files \
                 for inputs; name it by its path inside the tree, or choose a directory \
                 outside it",
                given.display(),
                root.display()
            ),
            Ok(Some(how)) => how,
            _ => return Ok(()),
        }
    };
    bail!(
        "--state {} {how} input directory {}: what lies under the state directory is \
         filepipe's own, never an input, so no file would be taken; choose a directory \
         outside the tree (or one inside it, which alone is left out)",
        given.display(),
        root.display()
    )
}

/// Refuses a state directory (`dir`, resolved; `given` as the user named it) that another
/// user may change, or swap by renaming a directory above it (`secret::check_state_dir`).
fn check_state_kept(given: &Path, dir: &Path) -> Result<()> {
    crate::secret::check_state_dir(dir, &crate::state::FILE_NAMES)
        .map_err(|why| state_not_kept(given, dir, &why))
}

/// Refuses a state directory not made yet (`to_be`, absolute; `given` as the user named it)
/// that would be made where another user may change it, before anything is made (a refused
/// one was left behind, empty: found by a review). One that exists is judged once resolved
/// (`check_state_kept`).
fn check_state_to_be(given: &Path, to_be: &Path) -> Result<()> {
    if to_be.is_dir() {
        return Ok(());
    }
    let (existing, _) = crate::fsio::canonical::resolve_existing(to_be)
        .with_context(|| format!("cannot create state directory {}", given.display()))?;
    crate::secret::check_state_dir_to_be(&existing)
        .map_err(|why| state_not_kept(given, &existing, &why))
}

/// The refusal of a state directory (`given`; `dir`, resolved, or where it would be made)
/// for `why`.
fn state_not_kept(given: &Path, dir: &Path, why: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "state directory {} ({}): {why}: another user could choose what filepipe writes there \
         (give a directory only root or this user may change: not one inside a tree others \
         write to, nor another user's, such as the packaged service's /var/lib/filepipe for a \
         root run)",
        given.display(),
        dir.display()
    )
}

/// Refuses a manifest or failure log (`own`) inside the state directory `dir`: written there,
/// one replaced the state's database (found by a review), and the state's files are its own.
fn check_own_files_apart(own: &[PathBuf], dir: &Path) -> Result<()> {
    let refuse = |f: &Path, how: &str| {
        bail!(
            "{} is inside the state directory {}{how}: the state keeps its own files there; \
             write manifests and failure logs elsewhere",
            f.display(),
            dir.display()
        )
    };
    if let Some(f) = own.iter().find(|f| f.starts_with(dir)) {
        return refuse(f, "");
    }
    // By identity too: a manifest named through a bind mount of the state directory
    // replaced its database (found by a review).
    for f in own {
        let Some(parent) = f.parent() else { continue };
        if let Some(fd) = open_dir(parent) {
            if let Ok(Some("is the" | "is inside the")) = aside::overlap_at(dir, &fd, parent) {
                return refuse(
                    f,
                    " (by a bind mount, a FUSE view or a hard-linked directory)",
                );
            }
        }
    }
    Ok(())
}

/// The directory at `path`, opened to be compared by identity (`aside::overlap_at`); `None`
/// if it cannot be (not there: nothing can be inside another by identity then).
fn open_dir(path: &Path) -> Option<std::os::fd::OwnedFd> {
    let flags =
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
    rustix::fs::open(path, flags, rustix::fs::Mode::empty()).ok()
}

/// The state directory's checks (`check_state`) made on the path `given` will have, before it
/// is made: a refused run leaves no directory behind (found by a review: one inside the tree
/// by another path was made, then refused, by batch, watch and the service, whose
/// `check-config` passed it). A directory made since is checked again once made, by
/// identity too. (`check_dirs_apart` is the command line's: the service names the config's
/// line and key itself.)
fn state_before_making(cfg: &Config, given: &Path) -> Result<()> {
    let to_be = absolute(given);
    // Named inside the tree, led out of it by a symlink there: whoever may write to the tree
    // chose where the state is written (found by a review: a link planted at the `--state`
    // path the user named put filepipe.sqlite and its lock outside the roots).
    if let Ok(named) = std::path::absolute(given) {
        let plain = named
            .components()
            .all(|c| !matches!(c, std::path::Component::ParentDir));
        let in_tree = named.starts_with(&cfg.root) || named.starts_with(&cfg.root_named);
        if plain && in_tree && !to_be.starts_with(&cfg.root) {
            bail!(
                "--state {} is named inside the input directory {} but a symlink there leads \
                 to {}, outside it: whoever may write to the tree would choose where the state \
                 is written; name that directory itself, or one inside the tree",
                given.display(),
                cfg.root.display(),
                to_be.display()
            );
        }
    }
    // Where it is to be made, something that is not a directory: the making would fail, after
    // `--out` or a move directory had been made (found by a review).
    if let Some(a) = to_be.ancestors().find(|a| a.symlink_metadata().is_ok()) {
        if !a.is_dir() {
            bail!(
                "--state {}: cannot create the state directory: {} is not a directory",
                given.display(),
                a.display()
            );
        }
    }
    check_state(&cfg.root, given, &to_be)?;
    if !to_be.starts_with(&cfg.root) {
        refuse_inside_before_making(
            &cfg.root,
            given,
            "--state",
            "the walk would take the state's files for inputs",
        )?;
    }
    Ok(())
}

/// How the directory `d` is or will be placed against the directory `dir` by identity, each
/// judged by the deepest of its ancestors that exists and the names below it (`None` where
/// that cannot tell: two directories made apart under different existing ones).
fn overlap_to_be(d: &Path, dir: &Path) -> Option<&'static str> {
    let existing = |p: &Path| -> Option<(PathBuf, PathBuf)> {
        let a = p.ancestors().find(|a| a.exists())?;
        Some((a.to_path_buf(), p.strip_prefix(a).ok()?.to_path_buf()))
    };
    let ((da, d_rest), (sa, s_rest)) = (existing(d)?, existing(dir)?);
    let fd = open_dir(&da)?;
    let how = aside::overlap_at(&sa, &fd, &da).ok().flatten()?;
    let (d_made, s_made) = (d_rest.as_os_str().is_empty(), s_rest.as_os_str().is_empty());
    match how {
        "is the" if d_rest == s_rest => Some("is the"),
        "is the" if s_rest.starts_with(&d_rest) => Some("encloses the"),
        "is the" if d_rest.starts_with(&s_rest) => Some("is inside the"),
        // `d` holds the state's existing ancestor: it holds the state.
        "encloses the" if d_made => Some("encloses the"),
        // `d` lies inside the state directory itself (made already).
        "is inside the" if s_made => Some("is inside the"),
        _ => None,
    }
}

/// Whether `Config::from_common` makes directories for `args` (`--out`, the move
/// directories): only then is a dry pass needed to check them against the state first.
fn makes_dirs(args: &PipelineArgs) -> bool {
    args.out.is_some() || args.move_source.is_some() || args.move_failed.is_some()
}

/// Refuses `--out` that is or lies in the state directory `dir`, or a move directory that is,
/// lies in or encloses it: outputs or moved inputs would land beside the state's database,
/// where a moved input's name could replace it, and the state directory is left out of every
/// walk (found by a review: batch
/// and watch accepted `--out st --state st`).
fn check_dirs_apart(cfg: &Config, dir: &Path) -> Result<()> {
    let dirs = [
        ("--out", cfg.out.as_deref()),
        (
            "--move-source",
            cfg.move_source.as_deref().map(|a| a.root.as_path()),
        ),
        (
            "--move-failed",
            cfg.move_failed.as_deref().map(|a| a.root.as_path()),
        ),
    ];
    for (flag, d) in dirs {
        let Some(d) = d else { continue };
        let by_path = if d == dir {
            Some("is the")
        } else if d.starts_with(dir) {
            Some("is inside the")
        } else if dir.starts_with(d) {
            Some("encloses the")
        } else {
            None
        };
        // By identity where the paths show nothing (a bind mount of the state directory
        // named as the output; found by a review). A directory not made yet is judged by the
        // deepest of its ancestors that exists and the names below it: `--move-source m
        // --state view/st`, `view` a bind mount of `m`, had the state made and locked in `m`
        // before the refusal (found by a review), and `--move-failed m/new --state
        // view/new/st` too.
        let (how, via) = match by_path.or_else(|| overlap_to_be(d, dir)) {
            Some(how) if by_path.is_some() => (how, ""),
            Some(how) => (
                how,
                " (by a bind mount, a FUSE view or a hard-linked directory)",
            ),
            None => continue,
        };
        // An output directory may hold the state (`--out arch --state arch/.filepipe`, as ran
        // before): outputs are named `.gz` or `.zst`, never as the state's files. A move
        // directory may not: moved inputs keep their names.
        if how == "encloses the" && flag == "--out" {
            continue;
        }
        bail!(
            "{flag} {} {how} state directory {}{via}: the state keeps its own files there; \
             choose directories apart",
            d.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Refuses `given` (`--out`, a move directory) before it is made, when the deepest of its
/// ancestors that exists lies in the tree at `root` by identity (a bind mount or FUSE view of
/// a directory of the tree on its way): the check made once it exists would refuse it too,
/// but only after making it, inside the tree (found by a review).
fn refuse_inside_before_making(root: &Path, given: &Path, flag: &str, why: &str) -> Result<()> {
    let wanted = absolute(given);
    let Some(existing) = wanted.ancestors().find(|a| a.exists()) else {
        return Ok(());
    };
    if existing == wanted {
        return Ok(());
    }
    let Ok(real) = fs::canonicalize(existing) else {
        return Ok(());
    };
    let Some(fd) = open_dir(&real) else {
        return Ok(());
    };
    match aside::overlap_at(root, &fd, &real) {
        Ok(Some(how @ ("is the" | "is inside the"))) => bail!(
            "{flag} {}: {} {how} input directory {} (by a bind mount, a FUSE view or a \
             hard-linked directory): {why}; choose a directory outside it",
            given.display(),
            existing.display(),
            root.display()
        ),
        _ => Ok(()),
    }
}

/// Refuses a `--move-source` or `--move-failed` directory (`given`, resolved as `dir`) that
/// overlaps the input root or the output root: moved files would be seen again as inputs (a
/// walk, a watch) or mixed with outputs.
pub(crate) fn check_aside(
    root: &Path,
    out: Option<&Path>,
    flag: &str,
    given: &Path,
    dir: &Path,
) -> Result<()> {
    for (tree, what) in [(Some(root), "input directory"), (out, "--out directory")] {
        let Some(tree) = tree else { continue };
        let how = if dir == tree {
            "is the"
        } else if tree.starts_with(dir) {
            "encloses the"
        } else if dir.starts_with(tree) {
            "is inside the"
        } else {
            continue;
        };
        bail!(
            "{flag} {} {how} {what} {}: moved files would be seen again or mixed with outputs; \
             choose a directory outside it",
            given.display(),
            tree.display()
        );
    }
    Ok(())
}

/// One worker per CPU, up to `MAX_JOBS`.
pub(crate) fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(usize::from(crate::cli::MAX_JOBS))
}

/// `path` made absolute through its deepest existing ancestor, for containment checks on
/// directories that do not exist yet.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    use std::path::Component;
    let Ok(full) = std::path::absolute(path) else {
        return path.to_path_buf();
    };
    // One component at a time, as the kernel resolves it: whatever exists is resolved (its
    // symlinks followed: its own user's and root's only, `fsio::canonical`; another's is
    // left in the path, to be refused where the path is made or opened), `..` climbs from
    // there, and only what does not exist (which holds no symlink) is taken by name, even
    // after a `..` leads back into what does.
    let mut resolved = PathBuf::from("/");
    for part in full.components() {
        match part {
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(name) => resolved.push(name),
            _ => continue,
        }
        if let Ok(real) = crate::fsio::canonical::resolve(&resolved) {
            resolved = real;
        }
    }
    resolved
}

/// Makes a file path absolute through its (existing) parent, so it can be compared with walked
/// paths even when the file itself does not exist yet.
fn absolute_file(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = crate::fsio::canonical::resolve(parent)
        .with_context(|| format!("cannot open directory {}", parent.display()))?;
    Ok(parent.join(name))
}

/// Refuses, before anything is read, a manifest name taken by a directory (or anything but a
/// regular file): batch mode's manifest, written at the end, could not replace it. Not watch
/// mode's: its manifest is derived from the state and a rewrite that fails is tried again
/// until it succeeds, so a name taken by anyone who may write in the manifest's directory (a
/// watched tree) must not keep the daemon from starting (`sink::state`).
fn check_manifest_name(path: &Path) -> Result<()> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.is_file() {
            bail!(
                "--manifest {} is not a regular file: the manifest would replace it",
                path.display()
            );
        }
    }
    Ok(())
}

/// Opens the directory of the manifest `path` (see `Config::manifest_dir`); refuses, before
/// anything is read, one filepipe may not write in.
fn open_manifest_dir(path: &Path) -> Result<Dir> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let cannot = |e: rustix::io::Errno| {
        anyhow::anyhow!(
            "--manifest {}: cannot write in {}: {}",
            path.display(),
            dir.display(),
            std::io::Error::from(e)
        )
    };
    rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).map_err(cannot)?;
    let flags =
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
    // Its path is resolved (`absolute_file`): a symlink on it now was swapped in since, and
    // the manifest would be written where it leads (found by a review).
    crate::fsio::canonical::open(dir, flags)
        .map(|fd| Dir::new(fd, dir.to_path_buf()))
        .map_err(cannot)
}

/// Refuses a manifest name held by a file that is not a manifest: every line a digest in hex,
/// two spaces or a space and a star, a name (GNU's escaped form starts with a backslash). A
/// derived name (`FILE.<hash>`, which the user did not type) must hold `algo`'s digests; the
/// name the user typed, any hash's (the op may have changed since the last run). The whole
/// file is read, a line at a time: notes kept among a manifest's lines anywhere are found
/// (found by reviews: reading only its first 1 MiB, then its ends, replaced such a file).
/// Blank lines (an editor's last newline) say nothing, and an empty file passes; a file that
/// cannot be read is left to the write at the end to fail on, and a name held by anything but
/// a regular file to `check_manifest_name`.
fn check_existing_manifest(path: &Path, algo: HashAlgo, typed: bool) -> Result<()> {
    use std::io::BufRead;
    use std::os::unix::fs::OpenOptionsExt;
    let Some(_) = fs::symlink_metadata(path).ok().filter(|m| m.is_file()) else {
        return Ok(());
    };
    // Not through a symlink, and never waiting on a FIFO swapped in since the look above.
    let Ok(file) = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    else {
        return Ok(());
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let lengths: Vec<usize> = if typed {
        HashAlgo::ALL.iter().map(|a| a.len() * 2).collect()
    } else {
        vec![algo.len() * 2]
    };
    let manifest_line = |line: &[u8]| {
        let line = line.strip_prefix(b"\\").unwrap_or(line);
        lengths.iter().any(|&hex| {
            line.len() > hex + 2
                && (line[hex..].starts_with(b"  ") || line[hex..].starts_with(b" *"))
                // Without an early exit, so it runs as a few vector instructions.
                && line[..hex].iter().fold(true, |ok, b| ok & b.is_ascii_hexdigit())
        })
    };
    let line_ok = |line: &[u8]| manifest_line(line) || line.iter().all(u8::is_ascii_whitespace);
    // Lines judged where they lie in the reader's buffer; only one cut by the buffer's end is
    // copied. (Read a line at a time into a vector, a 4 MB manifest took 10 ms, before an
    // unchanged rerun of 120 ms could start.)
    let mut reader = std::io::BufReader::with_capacity(256 << 10, file);
    let mut partial = Vec::new();
    let manifest = loop {
        let buf = reader
            .fill_buf()
            .with_context(|| format!("reading {}", path.display()))?;
        if buf.is_empty() {
            break partial.is_empty() || line_ok(&partial);
        }
        let mut start = 0;
        let mut good = true;
        for end in memchr::memchr_iter(b'\n', buf) {
            good = if partial.is_empty() {
                line_ok(&buf[start..end])
            } else {
                partial.extend_from_slice(&buf[start..end]);
                let ok = line_ok(&partial);
                partial.clear();
                ok
            };
            if !good {
                break;
            }
            start = end + 1;
        }
        // A line no manifest has (an image, a one-line JSON) is not held whole.
        partial.extend_from_slice(&buf[start..]);
        if !good || partial.len() as u64 > MANIFEST_LINE_MAX {
            break false;
        }
        let n = buf.len();
        reader.consume(n);
    };
    if !manifest {
        let (what, name) = if typed {
            ("a manifest".to_owned(), "--manifest")
        } else {
            (format!("a {algo} manifest"), "the derived manifest name")
        };
        bail!(
            "{} exists and is not {what}: {name} would replace it; move it, or choose another \
             --manifest",
            path.display(),
        );
    }
    Ok(())
}

/// The longest line read whole from a file at a manifest's name: longer than any manifest's
/// (a digest of 128 hex digits and a name, escaped, of a path thousands of directories deep),
/// and a bound on what is held of a file that is no manifest.
const MANIFEST_LINE_MAX: u64 = 1 << 20;

/// Include/exclude globs. A pattern without '/' matches the file name anywhere in the tree
/// (like fd and .gitignore); one with '/' matches the whole path relative to the root.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    include_name: GlobSet,
    include_path: GlobSet,
    exclude_name: GlobSet,
    exclude_path: GlobSet,
    has_include: bool,
    /// The globs as given (include, exclude): what a reload compares.
    patterns: (Vec<String>, Vec<String>),
}

impl Filter {
    /// Compiles the globs; a malformed one is a usage error.
    pub(crate) fn new(include: &[String], exclude: &[String]) -> Result<Filter> {
        let (include_name, include_path) = compile(include)?;
        let (exclude_name, exclude_path) = compile(exclude)?;
        Ok(Filter {
            include_name,
            include_path,
            exclude_name,
            exclude_path,
            has_include: !include.is_empty(),
            patterns: (include.to_vec(), exclude.to_vec()),
        })
    }

    /// The include and exclude globs as given.
    pub(crate) fn patterns(&self) -> (&[String], &[String]) {
        (&self.patterns.0, &self.patterns.1)
    }

    /// True if a file or directory at `rel` is excluded (directories are then not descended).
    pub(crate) fn excluded(&self, rel: &Path) -> bool {
        matches(&self.exclude_name, &self.exclude_path, rel)
    }

    /// True if a file at `rel` passes the include globs (all files do when there are none).
    pub(crate) fn included(&self, rel: &Path) -> bool {
        !self.has_include || matches(&self.include_name, &self.include_path, rel)
    }
}

fn matches(by_name: &GlobSet, by_path: &GlobSet, rel: &Path) -> bool {
    // An empty set matches nothing; asked anyway, it would first build its candidate (the
    // path normalised into a new buffer), twice per file of every walk without globs.
    let name = || rel.file_name().unwrap_or(OsStr::new(""));
    (!by_name.is_empty() && by_name.is_match(name()))
        || (!by_path.is_empty() && by_path.is_match(rel))
}

fn compile(globs: &[String]) -> Result<(GlobSet, GlobSet)> {
    let mut by_name = GlobSetBuilder::new();
    let mut by_path = GlobSetBuilder::new();
    for g in globs {
        let glob: Glob = GlobBuilder::new(g)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .with_context(|| format!("invalid glob {g:?}"))?;
        if OsStr::new(g).as_bytes().contains(&b'/') {
            by_path.add(glob);
        } else {
            by_name.add(glob);
        }
    }
    Ok((by_name.build()?, by_path.build()?))
}

/// A batch's `Config` from its command line after `filepipe batch` (unit tests' runs).
#[cfg(test)]
pub(crate) fn batch_config(args: &[&str]) -> Config {
    use clap::Parser as _;
    let line = ["filepipe", "batch"]
        .into_iter()
        .chain(args.iter().copied());
    match crate::cli::Cli::parse_from(line).command {
        crate::cli::Command::Batch(a) => Config::from_batch(&a, true).unwrap(),
        _ => unreachable!("a batch's command line"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(inc: &[&str], exc: &[&str]) -> Filter {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Filter::new(&s(inc), &s(exc)).unwrap()
    }

    #[test]
    fn name_globs_match_at_any_depth_path_globs_from_root() {
        let f = filter(&["*.log"], &["tmp", "a/skip/*"]);
        assert!(f.included(Path::new("x/y/z.log")));
        assert!(!f.included(Path::new("x/y/z.txt")));
        assert!(f.excluded(Path::new("deep/tmp")));
        assert!(f.excluded(Path::new("a/skip/f.log")));
        assert!(!f.excluded(Path::new("b/a/skip/f.log")));
    }

    #[test]
    fn no_include_means_everything() {
        let f = filter(&[], &[]);
        assert!(f.included(Path::new("anything")));
        assert!(!f.excluded(Path::new("anything")));
    }

    #[test]
    fn absolute_resolves_what_exists_even_after_a_dotdot_past_what_does_not() {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir(base.join("in")).unwrap();
        std::os::unix::fs::symlink(base.join("in"), base.join("link")).unwrap();
        for (given, want) in [
            ("in/new/..", "in"),
            ("link/sub", "in/sub"),
            ("nope/../link/sub", "in/sub"),
            ("in/./a/b/../c", "in/a/c"),
        ] {
            assert_eq!(absolute(&base.join(given)), base.join(want), "{given}");
        }
    }

    #[test]
    fn a_workers_flags_override_its_file_a_root_by_its_name() {
        let root = |name: &str, path: &str, given: &str| RootGiven {
            name: name.into(),
            path: path.into(),
            given: given.into(),
        };
        let file = WorkerSettings {
            url: Some("nats://file:4222".into()),
            roots: vec![root("a", "/file/a", "f:2"), root("b", "/file/b", "f:3")],
            out_roots: vec![root("o", "/file/o", "f:5")],
            jobs: Some(8),
            durability: Some(Durability::File),
            ..WorkerSettings::default()
        };
        let flags = WorkerSettings {
            roots: vec![root("b", "/flag/b", "--root b=/flag/b")],
            jobs: Some(2),
            allow_remove_source: true,
            ..WorkerSettings::default()
        };
        let merged = file.overridden_by(flags);
        assert_eq!(merged.url.as_deref(), Some("nats://file:4222"));
        assert_eq!(
            merged.roots,
            [
                root("a", "/file/a", "f:2"),
                root("b", "/flag/b", "--root b=/flag/b")
            ]
        );
        assert_eq!(merged.out_roots, [root("o", "/file/o", "f:5")]);
        assert_eq!(merged.jobs, Some(2));
        assert_eq!(merged.durability, Some(Durability::File));
        assert!(merged.allow_remove_source);
    }

    #[test]
    fn queue_absent_stays_local_and_a_url_given_is_taken() {
        assert_eq!(queue_url(None).unwrap(), None);
        let given = Some("nats://h:4222".to_string());
        assert_eq!(queue_url(Some(&given)).unwrap(), given);
    }

    #[test]
    fn bad_glob_is_an_error() {
        assert!(Filter::new(&["a[".to_string()], &[]).is_err());
    }
}
