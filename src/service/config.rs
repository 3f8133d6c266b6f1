//! The service's TOML config: read safely, validated whole (every error names the file, the
//! line and the key), and resolved into one `Config` per `[[watch]]` table, with the command
//! line's overrides applied; its `[worker]` table is `filepipe worker --config`'s (see
//! `worker_table`). A queue's password or token is read only from a file no other user can
//! read, and a file with a `[worker]` table, or a `queue_file`, only if no other user can
//! change it (`secret::FileAccess`); a `[[watch]]` table's `creds` and `tls_ca` are held to
//! the rules a worker's are (`secret::open_checked`). No error quotes a line of the file: it
//! may hold a password.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::cli::{OpSpec, PipelineArgs, WatchArgs, MAX_JOBS, MAX_POLL_SECS, MAX_SETTLE_MS};
use crate::config::{absolute, Config, DEFAULT_SETTLE_MS};
use crate::fsio::aside;
use crate::fsio::output::Durability;
use crate::fsio::rootdirs::NewDir;
use crate::secret::{self, FileAccess, FileRule};

use super::worker_table::WorkerTable;

/// The config file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    jobs: Option<Spanned<u16>>,
    failure_log: Option<PathBuf>,
    settle_ms: Option<Spanned<u64>>,
    poll_secs: Option<Spanned<u64>>,
    durability: Option<Durability>,
    metrics: Option<std::net::SocketAddr>,
    max_size: Option<Spanned<SizeValue>>,
    #[serde(default)]
    watch: Vec<WatchEntry>,
    /// `filepipe worker --config`'s settings: a worker's own, apart from the keys above
    /// (which are the `[[watch]]` tables').
    worker: Option<Spanned<WorkerTable>>,
}

/// One `[[watch]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchEntry {
    path: Spanned<PathBuf>,
    op: OpSpec,
    out: Option<Spanned<PathBuf>>,
    manifest: Option<Spanned<PathBuf>>,
    level: Option<Spanned<u32>>,
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    settle_ms: Option<Spanned<u64>>,
    poll_secs: Option<Spanned<u64>>,
    /// Larger files are skipped unread (`--max-size`).
    max_size: Option<Spanned<SizeValue>>,
    /// gzip, zstd: move each input here once its output is durable and verified.
    move_source: Option<Spanned<PathBuf>>,
    /// Move each input that failed for good here.
    move_failed: Option<Spanned<PathBuf>>,
    /// Cluster mode: settled files go to this NATS JetStream queue's workers.
    queue: Option<Spanned<String>>,
    /// Cluster mode: a file holding `queue`'s URL (with a password: not readable by others).
    queue_file: Option<Spanned<PathBuf>>,
    /// The name the workers know this root by [default: its directory's name].
    root_name: Option<Spanned<String>>,
    /// Cluster mode: the name the workers know `out` by (default: its own name).
    out_root_name: Option<Spanned<String>>,
    /// Cluster mode: the name the workers know `move_source` by (default: its own name).
    move_source_name: Option<Spanned<String>>,
    /// Cluster mode: the name the workers know `move_failed` by (default: its own name).
    move_failed_name: Option<Spanned<String>>,
    /// A NATS credentials file for `queue`.
    creds: Option<Spanned<PathBuf>>,
    /// CA certificates to trust for a tls:// `queue`.
    tls_ca: Option<Spanned<PathBuf>>,
}

/// `max_size` as written: a number of bytes, or a string with a unit (`"10G"`, as
/// `--max-size` takes it).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(t) => crate::cli::parse_size(t),
        }
    }
}

/// A loaded, validated config: one resolved `Config` per pipeline.
#[derive(Debug)]
pub(crate) struct Service {
    /// The pipelines, in file order.
    pub(crate) pipelines: Vec<Config>,
    /// The failure log all pipelines share.
    pub(crate) failure_log: Option<PathBuf>,
    /// Where Prometheus metrics are served (read at start: a reload does not move them).
    pub(crate) metrics: Option<std::net::SocketAddr>,
}

/// Command-line flags that override the file: its global settings and every pipeline's
/// (`--level` every compressing pipeline's, `--max-size` every pipeline's), plus globs added
/// to every pipeline.
#[derive(Debug, Default, Clone)]
pub(crate) struct Overrides {
    jobs: Option<u16>,
    level: Option<u32>,
    max_size: Option<u64>,
    state: Option<PathBuf>,
    settle: Option<u64>,
    poll: Option<u64>,
    failure_log: Option<PathBuf>,
    include: Vec<String>,
    exclude: Vec<String>,
    json: bool,
    durability: Option<Durability>,
    metrics: Option<std::net::SocketAddr>,
}

impl Overrides {
    /// The overrides in `filepipe watch --config FILE [flags]`; per-tree flags make no sense
    /// for several trees and are refused.
    pub(crate) fn from_args(args: &WatchArgs) -> Result<Overrides> {
        let c = &args.common;
        if c.out.is_some()
            || c.manifest.is_some()
            || c.move_source.is_some()
            || c.move_failed.is_some()
        {
            bail!(
                "with --config, give --out, --manifest, --move-source and --move-failed per \
                 [[watch]] in the file (out, manifest, move_source, move_failed)"
            );
        }
        Ok(Overrides {
            jobs: args.common.jobs,
            level: args.common.level,
            max_size: args.common.max_size,
            state: args.state.clone(),
            settle: args.settle,
            poll: args.poll,
            failure_log: args.common.failure_log.clone(),
            include: args.common.include.clone(),
            exclude: args.common.exclude.clone(),
            json: args.common.json,
            durability: args.common.durability,
            metrics: args.metrics,
        })
    }
}

/// The largest config file read: far more than any real one, small enough that a mistaken
/// path (a disk image, /dev/zero) costs nothing.
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a config file: a regular file (a FIFO or a device is refused without blocking) of at
/// most `MAX_CONFIG_BYTES`, in UTF-8; with who may reach it (owner, mode, ACL), as read
/// through the same descriptor.
pub(super) fn read_config(path: &Path) -> Result<(String, FileAccess)> {
    use rustix::fs::OFlags;
    use std::io::Read;
    let ctx = || format!("cannot read config file {}", path.display());
    // As every path given to filepipe: through its own user's and root's symlinks only, and
    // opened with none on the way. Another user's link to a config file chose which of the
    // files the rules let through a worker ran by (found by a review: a link in /tmp to one
    // of root's private configs, re-pointed at will).
    let resolved = crate::fsio::canonical::resolve(path).with_context(ctx)?;
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let file = std::fs::File::from(
        crate::fsio::canonical::open(&resolved, flags)
            .map_err(std::io::Error::from)
            .with_context(ctx)?,
    );
    let access = FileAccess::of(&file).with_context(ctx)?;
    if !access.meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(ctx)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        bail!(
            "{}: larger than {} KiB: not a config file",
            path.display(),
            MAX_CONFIG_BYTES >> 10
        );
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok((text, access))
}

/// What a queue URL may hold, for the private-file rule.
const QUEUE_SECRET: &str =
    "the queue's password or token (or a URL without a scheme, which may be one)";

/// The URL in a `queue_file`: the file's text, trimmed (one URL, or several comma-separated);
/// only if no other user can change it (it says where the jobs come from), and a password or
/// token in it (or a word without a scheme, which may be one) only if the file is private.
pub(super) fn read_queue_file(path: &Path) -> Result<String, String> {
    let (text, access) = read_config(path).map_err(|e| format!("{e:#}"))?;
    access
        .check_not_writable(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let url = text.trim();
    if url.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if url.contains(char::is_whitespace) {
        return Err(format!(
            "{} holds more than one URL: one line, several servers comma-separated",
            path.display()
        ));
    }
    if secret::url_has_secret(url) {
        access
            .check_private(QUEUE_SECRET, "")
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(url.to_owned())
}

/// A queue URL given by `queue` or by `queue_file` in a table (never both); a secret in
/// `queue` only if the config file itself is private. `key` is the table's key prefix
/// (`watch[0].`, `worker.`); `Ok(None)`: neither given.
pub(super) fn queue_of(
    file: &Located,
    queue: Option<&Spanned<String>>,
    queue_file: Option<&Spanned<PathBuf>>,
    key: &str,
) -> Result<Option<String>> {
    match (queue, queue_file) {
        (Some(_), Some(f)) => Err(file.at(
            f.span(),
            &format!("{key}queue_file"),
            "give queue or queue_file, not both".into(),
        )),
        (Some(q), None) => {
            if secret::url_has_secret(q.get_ref()) {
                let hint = ", or move the URL to a queue_file that is";
                file.access
                    .check_private(QUEUE_SECRET, hint)
                    .map_err(|e| file.at(q.span(), &format!("{key}queue"), e))?;
            }
            Ok(Some(q.get_ref().clone()))
        }
        (None, Some(f)) => read_queue_file(&file.resolve(f.get_ref()))
            .map(Some)
            .map_err(|e| file.at(f.span(), &format!("{key}queue_file"), e)),
        (None, None) => Ok(None),
    }
}

/// A config file as read: where it is (relative paths in it resolve against its directory),
/// its text (errors name the line) and its metadata.
pub(super) struct Located<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
    pub(super) access: FileAccess,
}

impl Located<'_> {
    /// An error about `key`, at the line of `span`.
    pub(super) fn at(&self, span: Range<usize>, key: &str, msg: String) -> anyhow::Error {
        anyhow!("{}:{}: {key}: {msg}", self.path.display(), self.line(span))
    }

    /// The line `span` starts on.
    pub(super) fn line(&self, span: Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    /// `p` relative to the file's directory (systemd starts the daemon in /).
    pub(super) fn resolve(&self, p: &Path) -> PathBuf {
        self.path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Reads and parses a config file (not yet validated).
fn parse(path: &Path) -> Result<(String, FileAccess, FileConfig)> {
    let (text, access) = read_config(path)?;
    let file: FileConfig = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
    Ok((text, access, file))
}

/// A TOML error as `FILE: TOML parse error at line L, column C: message`, never with the line
/// it is on (toml's own message quotes it, and the line may be a queue URL with its password:
/// the error goes to the journal, which more users read than the file), and with any
/// credentials the message quotes (a value of the wrong type or variant) redacted.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> anyhow::Error {
    let msg = cut_lines(&secret::redact(e.message()));
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before
                .rsplit('\n')
                .next()
                .unwrap_or_default()
                .chars()
                .count()
                + 1;
            // toml's own words, which users may look for, without its quoted line.
            anyhow!(
                "{}: TOML parse error at line {line}, column {column}: {msg}",
                path.display()
            )
        }
        None => anyhow!("{}: {msg}", path.display()),
    }
}

/// What `filepipe check-config` found valid: the watch pipelines, and the worker's roots.
#[derive(Debug)]
pub(crate) struct Checked {
    /// The `[[watch]]` tables, resolved.
    pub(crate) pipelines: usize,
    /// The `[worker]` table, resolved, if the file has one.
    pub(crate) worker: Option<crate::config::WorkerConfig>,
}

/// Validates a whole config file, its `[[watch]]` tables and its `[worker]` table, creating
/// nothing: what `check-config` runs. A file with neither is refused.
pub(crate) fn check(path: &Path) -> Result<Checked> {
    let (_, _, file) = parse(path)?;
    let pipelines = if file.watch.is_empty() {
        0
    } else {
        load(path, &Overrides::default(), true, false)?
            .pipelines
            .len()
    };
    let worker = match file.worker {
        Some(_) => Some(crate::config::WorkerConfig::resolve(
            load_worker(path)?,
            false,
        )?),
        None if pipelines == 0 => {
            bail!(
                "{}: no [[watch]] or [worker] table: nothing to run",
                path.display()
            )
        }
        None => None,
    };
    Ok(Checked { pipelines, worker })
}

/// The `[worker]` table of the config file at `path`, as given (paths resolved against the
/// file's directory, each root labelled with its line): `filepipe worker --config`'s
/// settings, before the command line's go over them.
pub(crate) fn load_worker(path: &Path) -> Result<crate::config::WorkerSettings> {
    let (text, access, file) = parse(path)?;
    let located = Located {
        path,
        text: &text,
        access,
    };
    let Some(table) = &file.worker else {
        bail!(
            "{}: no [worker] table (filepipe worker --config reads its settings from one)",
            path.display()
        );
    };
    // The top-level keys are the [[watch]] tables': in a file with none, one set there was
    // meant for the worker, and would silently do nothing.
    if file.watch.is_empty() {
        let set = [
            ("state_dir", file.state_dir.is_some()),
            ("jobs", file.jobs.is_some()),
            ("failure_log", file.failure_log.is_some()),
            ("settle_ms", file.settle_ms.is_some()),
            ("poll_secs", file.poll_secs.is_some()),
            ("durability", file.durability.is_some()),
            ("metrics", file.metrics.is_some()),
            ("max_size", file.max_size.is_some()),
        ];
        if let Some((key, _)) = set.iter().find(|(_, set)| *set) {
            bail!(
                "{}: {key} is set outside [worker], where it applies to [[watch]] tables, and \
                 the file has none: move it under [worker] (before any [worker.roots] table)",
                path.display()
            );
        }
    }
    table.get_ref().settings(&located, table.span())
}

/// A message about the file with every line cut to a readable length: a parse error may quote
/// a value, which may be megabytes long. (600: the list of the keys a table takes, which an
/// unknown key's error gives, fits; at 200 it was cut.)
fn cut_lines(msg: &str) -> String {
    const MAX_LINE: usize = 600;
    msg.trim_end()
        .lines()
        .map(|l| match l.char_indices().nth(MAX_LINE) {
            Some((i, _)) => format!("{}... ({} more bytes)", &l[..i], l.len() - i),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and validates a config file. Errors name the file, the line and the key. With
/// `create`, missing output and state directories are made; without, nothing is written.
pub(crate) fn load(
    path: &Path,
    overrides: &Overrides,
    quiet: bool,
    create: bool,
) -> Result<Service> {
    // Every check by identity, of every pipeline, compares with the mount table as it was
    // read once (`Places` did so for the pairs; each pipeline's own checks read it again).
    aside::with_mount_table(|| load_checked(path, overrides, quiet, create))
}

fn load_checked(path: &Path, overrides: &Overrides, quiet: bool, create: bool) -> Result<Service> {
    // The whole file checked first as `check-config` checks it, making nothing: start then
    // refuses what check-config refuses, and a refusal leaves no directory or lock behind
    // (found by a review: an output directory inside another pipeline's, by a bind mount,
    // was made, and a state directory there given its lock, before the refusal).
    if create {
        load(path, overrides, quiet, false)?;
    }
    let (text, access, file) = parse(path)?;
    let located = Located {
        path,
        text: &text,
        access,
    };
    // Relative paths in the file are relative to the file, not to wherever the daemon runs
    // (systemd starts it in /).
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| base.join(p);
    let at = |span: Range<usize>, key: &str, msg: String| {
        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
        anyhow!("{}:{line}: {key}: {msg}", path.display())
    };
    // The [worker] table is the worker's to resolve, but a password it exposes is refused
    // here too: the file is one, whichever daemon reads it.
    if let Some(table) = &file.worker {
        table.get_ref().settings(&located, table.span())?;
    }
    if file.watch.is_empty() {
        let hint = match &file.worker {
            Some(_) => " (its [worker] table is `filepipe worker --config`'s)",
            None => "",
        };
        bail!(
            "{}: no [[watch]] table: nothing to watch{hint}",
            path.display()
        );
    }
    if let Some(j) = &file.jobs {
        if !(1..=MAX_JOBS).contains(j.get_ref()) {
            let msg = format!("must be 1 to {MAX_JOBS}");
            return Err(at(j.span(), "jobs", msg));
        }
    }
    let jobs = overrides.jobs.or(file.jobs.as_ref().map(|j| *j.get_ref()));
    let settle_ok = |s: &Option<Spanned<u64>>, key: &str| match s {
        Some(s) if *s.get_ref() > MAX_SETTLE_MS => {
            let msg = format!("must be at most {MAX_SETTLE_MS} (an hour)");
            Err(at(s.span(), key, msg))
        }
        _ => Ok(()),
    };
    settle_ok(&file.settle_ms, "settle_ms")?;
    let poll_ok = |s: &Option<Spanned<u64>>, key: &str| match s {
        Some(s) if !(1..=MAX_POLL_SECS).contains(s.get_ref()) => {
            let msg = format!("must be 1 to {MAX_POLL_SECS} (a day)");
            Err(at(s.span(), key, msg))
        }
        _ => Ok(()),
    };
    poll_ok(&file.poll_secs, "poll_secs")?;
    let size_of = |s: &Option<Spanned<SizeValue>>, key: &str| match s {
        Some(s) => s
            .get_ref()
            .bytes()
            .map(Some)
            .map_err(|e| at(s.span(), key, e)),
        None => Ok(None),
    };
    let max_size = size_of(&file.max_size, "max_size")?;
    let empty = [
        ("state_dir", file.state_dir.as_deref()),
        ("failure_log", file.failure_log.as_deref()),
    ];
    if let Some((k, _)) = empty
        .iter()
        .find(|(_, p)| p.is_some_and(|p| p.as_os_str().is_empty()))
    {
        bail!("{}: {k}: an empty path: give one", path.display());
    }
    let state_dir = overrides
        .state
        .clone()
        .or(file.state_dir.as_deref().map(resolve))
        .unwrap_or_else(crate::state::default_dir);
    let failure_log = overrides
        .failure_log
        .clone()
        .or(file.failure_log.as_deref().map(resolve));
    // The state directory, where the first pipeline makes it, is open to no one any of the
    // trees is closed to: it names every file of each and its digest.
    let new_state = create.then(|| {
        let paths: Vec<PathBuf> = file
            .watch
            .iter()
            .map(|w| resolve(w.path.get_ref()))
            .collect();
        NewDir::state_for(paths.iter().map(PathBuf::as_path))
    });
    let mut roots: Vec<(PathBuf, Range<usize>)> = Vec::new();
    let mut pipelines = Vec::new();
    let places = Places::default();
    for (i, w) in file.watch.iter().enumerate() {
        let key = |k: &str| format!("watch[{i}].{k}");
        // An empty path joins to the config file's own directory: never what was meant.
        let paths = [
            ("path", Some(&w.path)),
            ("out", w.out.as_ref()),
            ("manifest", w.manifest.as_ref()),
            ("move_source", w.move_source.as_ref()),
            ("move_failed", w.move_failed.as_ref()),
        ];
        for (k, p) in paths {
            if let Some(p) = p.filter(|p| p.get_ref().as_os_str().is_empty()) {
                let msg = "an empty path: give the directory or file".to_string();
                return Err(at(p.span(), &key(k), msg));
            }
            // A `~` is the shell's: here it is a directory of that name beside the config,
            // which is never what was meant when it is not there (the error said only "No
            // such file or directory": found by a review).
            if let Some(p) = p.filter(|p| {
                std::os::unix::ffi::OsStrExt::as_bytes(p.get_ref().as_os_str()).starts_with(b"~")
                    && std::fs::symlink_metadata(resolve(p.get_ref())).is_err()
            }) {
                let msg = format!(
                    "{}: a leading ~ is not expanded in a config file (only a shell expands \
                     it): give the full path",
                    p.get_ref().display()
                );
                return Err(at(p.span(), &key(k), msg));
            }
        }
        let root = crate::fsio::canonical::resolve(&resolve(w.path.get_ref())).map_err(|e| {
            at(
                w.path.span(),
                &key("path"),
                format!("{}: {e}", w.path.get_ref().display()),
            )
        })?;
        if !root.is_dir() {
            let msg = format!("{} is not a directory", root.display());
            return Err(at(w.path.span(), &key("path"), msg));
        }
        // The directories the tables before made are made by now.
        places.made();
        for (other, span) in &roots {
            if let Some((_, note)) = places.overlap(other, &root) {
                let line = text[..span.start].matches('\n').count() + 1;
                let msg = format!(
                    "{} overlaps the watch root {} (line {line}){note}: a file would be \
                     processed twice",
                    root.display(),
                    other.display()
                );
                return Err(at(w.path.span(), &key("path"), msg));
            }
        }
        roots.push((root.clone(), w.path.span()));
        settle_ok(&w.settle_ms, &key("settle_ms"))?;
        poll_ok(&w.poll_secs, &key("poll_secs"))?;
        let misplaced = [
            ("out", !w.op.compresses(), w.out.as_ref().map(|o| o.span())),
            (
                "manifest",
                w.op.hashes().is_empty(),
                w.manifest.as_ref().map(|m| m.span()),
            ),
            (
                "level",
                !w.op.compresses(),
                w.level.as_ref().map(|l| l.span()),
            ),
            (
                "move_source",
                !w.op.compresses(),
                w.move_source.as_ref().map(|m| m.span()),
            ),
        ];
        for (k, wrong, span) in misplaced {
            if let (true, Some(span)) = (wrong, span) {
                let msg = format!("does not apply to op = \"{}\"", w.op);
                return Err(at(span, &key(k), msg));
            }
        }
        // Checked here, against the op's range, to name the line.
        if let Some(l) = &w.level {
            w.op.primary()
                .level(Some(*l.get_ref()))
                .map_err(|e| at(l.span(), &key("level"), e))?;
        }
        let level = match overrides.level {
            // As --level is checked on the command line, for each pipeline it applies to;
            // a hashing pipeline has none to take.
            Some(l) if w.op.compresses() => {
                w.op.primary()
                    .level(Some(l))
                    .map_err(|e| anyhow!("--level {l} for watch[{i}] (op = \"{}\"): {e}", w.op))?;
                Some(l)
            }
            _ => w.level.as_ref().map(|l| *l.get_ref()),
        };
        for (k, dir) in [
            ("out", &w.out),
            ("move_source", &w.move_source),
            ("move_failed", &w.move_failed),
        ] {
            let Some(dir) = dir else { continue };
            let abs = absolute(&resolve(dir.get_ref()));
            let inside = roots
                .iter()
                .find_map(|(r, _)| places.lies_in(r, &abs).map(|note| (r, note)));
            if let Some((other, note)) = inside {
                let msg = format!(
                    "{} is inside the watched tree {}{note}: its files would be watched as \
                     inputs",
                    abs.display(),
                    other.display()
                );
                return Err(at(dir.span(), &key(k), msg));
            }
        }
        let args = PipelineArgs {
            jobs,
            out: w.out.as_ref().map(|o| resolve(o.get_ref())),
            manifest: w.manifest.as_ref().map(|m| resolve(m.get_ref())),
            failure_log: failure_log.clone(),
            level,
            include: [&w.include[..], &overrides.include[..]].concat(),
            exclude: [&w.exclude[..], &overrides.exclude[..]].concat(),
            json: overrides.json,
            durability: overrides.durability.or(file.durability),
            move_source: w.move_source.as_ref().map(|m| resolve(m.get_ref())),
            move_failed: w.move_failed.as_ref().map(|m| resolve(m.get_ref())),
            max_size: overrides
                .max_size
                .or(size_of(&w.max_size, &key("max_size"))?.or(max_size)),
        };
        let settle = overrides
            .settle
            .or(w.settle_ms.as_ref().map(|s| *s.get_ref()))
            .or(file.settle_ms.as_ref().map(|s| *s.get_ref()))
            .unwrap_or(DEFAULT_SETTLE_MS);
        let poll = overrides
            .poll
            .or(w.poll_secs.as_ref().map(|s| *s.get_ref()))
            .or(file.poll_secs.as_ref().map(|s| *s.get_ref()))
            .map(Duration::from_secs);
        let mut cfg = Config::from_common(&root, &w.op, &args, quiet, create)
            .and_then(|c| {
                let settle = Duration::from_millis(settle);
                c.watching(state_dir.clone(), settle, poll, new_state)
            })
            .map_err(|e| at(w.path.span(), &format!("watch[{i}]"), format!("{e:#}")))?;
        let url = queue_of(&located, w.queue.as_ref(), w.queue_file.as_ref(), &key(""))?;
        let queue_span = w
            .queue
            .as_ref()
            .map(|q| q.span())
            .or(w.queue_file.as_ref().map(|f| f.span()));
        if let (Some(url), Some(queue_span)) = (url, queue_span) {
            if !cfg!(feature = "cluster") {
                let msg = "this filepipe is built without cluster mode (feature cluster)";
                return Err(at(queue_span, &key("queue"), msg.into()));
            }
            let name = match &w.root_name {
                Some(n) => n.get_ref().clone(),
                None => crate::config::default_root_name(&root),
            };
            if !crate::config::valid_root_name(&name) {
                let span = w
                    .root_name
                    .as_ref()
                    .map_or(queue_span.clone(), |n| n.span());
                let msg = format!(
                    "the root's name {name:?} is not 1 to 64 of A-Z a-z 0-9 _ - (set root_name)"
                );
                return Err(at(span, &key("root_name"), msg));
            }
            // The output root's name, as the coordinator will check it when it starts: a file
            // that loads must start (a reload must not stop the service).
            if let Some(out) = &cfg.out {
                let given = w.out_root_name.as_ref().map(|n| n.get_ref().as_str());
                if let Err(out_name) = crate::config::out_root_name(out, given, &name) {
                    let span = match (&w.out_root_name, &w.out) {
                        (Some(n), _) => n.span(),
                        (None, Some(o)) => o.span(),
                        (None, None) => queue_span.clone(),
                    };
                    let msg = format!(
                        "the output root's name {out_name:?} is not 1 to 64 of A-Z a-z 0-9 _ - other than the root's name {name:?} (set out_root_name)"
                    );
                    return Err(at(span, &key("out_root_name"), msg));
                }
            }
            // The move directories' names, as the coordinator will check them.
            let given = crate::config::MoveNames {
                source: w.move_source_name.as_ref().map(|n| n.get_ref().clone()),
                failed: w.move_failed_name.as_ref().map(|n| n.get_ref().clone()),
            };
            let out_name = cfg.out.as_deref().map(|out| {
                let given = w.out_root_name.as_ref().map(|n| n.get_ref().as_str());
                crate::config::out_root_name(out, given, &name).unwrap_or_default()
            });
            let taken: Vec<&str> = std::iter::once(name.as_str())
                .chain(out_name.as_deref())
                .collect();
            let dirs = (
                cfg.move_source.as_deref().map(|a| a.root.as_path()),
                cfg.move_failed.as_deref().map(|a| a.root.as_path()),
            );
            if let Err((which, bad)) = crate::config::move_root_names(dirs, &given, &taken) {
                let (named, dir, k) = match which {
                    "source" => (&w.move_source_name, &w.move_source, "move_source_name"),
                    _ => (&w.move_failed_name, &w.move_failed, "move_failed_name"),
                };
                let span = match (named, dir) {
                    (Some(n), _) => n.span(),
                    (None, Some(d)) => d.span(),
                    (None, None) => queue_span.clone(),
                };
                let msg = format!(
                    "the move directory's name {bad:?} is not 1 to 64 of A-Z a-z 0-9 _ - other than the root's, the output root's and the other move directory's (set {k})"
                );
                return Err(at(span, &key(k), msg));
            }
            // Held to the rules a worker's (and a coordinator's flags') are, here, so that
            // check-config and a reload refuse what the coordinator would refuse when it
            // connects: a seed others may read, a CA others may change or replace.
            let queue_files = [
                ("creds", &w.creds, FileRule::Secret(secret::CREDS_SECRET)),
                ("tls_ca", &w.tls_ca, FileRule::Trust),
            ];
            for (k, given, rule) in queue_files {
                let Some(p) = given else { continue };
                if p.get_ref().as_os_str().is_empty() {
                    let msg = "an empty path: give the file".to_string();
                    return Err(at(p.span(), &key(k), msg));
                }
                secret::open_checked(&resolve(p.get_ref()), rule)
                    .map_err(|e| at(p.span(), &key(k), e))?;
            }
            // A coordinator's file says where its jobs go and its outcomes come from (a server
            // that answers for files it never saw would have them recorded done) and which
            // credentials it uses: held to the rule a `[worker]` table's file is (ssh's
            // StrictModes), so that no other user may change or replace it. After the files it
            // names, whose errors say more.
            located
                .access
                .check_not_writable(located.path)
                .map_err(|e| at(queue_span.clone(), &key("queue"), e))?;
            if let Some(settings) = cfg.watch.as_mut() {
                settings.queue = Some(crate::config::QueueTarget {
                    url,
                    creds: w.creds.as_ref().map(|p| resolve(p.get_ref())),
                    tls_ca: w.tls_ca.as_ref().map(|p| resolve(p.get_ref())),
                    root_name: name,
                    out_root_name: w.out_root_name.as_ref().map(|n| n.get_ref().clone()),
                    move_names: given,
                });
            }
            if let (Some(n), None) = (&w.out_root_name, &w.out) {
                return Err(at(n.span(), &key("out_root_name"), "needs out".into()));
            }
            if let (Some(n), None) = (&w.move_source_name, &w.move_source) {
                return Err(at(
                    n.span(),
                    &key("move_source_name"),
                    "needs move_source".into(),
                ));
            }
            if let (Some(n), None) = (&w.move_failed_name, &w.move_failed) {
                return Err(at(
                    n.span(),
                    &key("move_failed_name"),
                    "needs move_failed".into(),
                ));
            }
        } else if let Some(span) = w.root_name.as_ref().map(|n| n.span()) {
            return Err(at(span, &key("root_name"), "needs queue".into()));
        } else if let Some(span) = w.out_root_name.as_ref().map(|n| n.span()) {
            return Err(at(span, &key("out_root_name"), "needs queue".into()));
        } else if let Some(span) = w.move_source_name.as_ref().map(|n| n.span()) {
            return Err(at(span, &key("move_source_name"), "needs queue".into()));
        } else if let Some(span) = w.move_failed_name.as_ref().map(|n| n.span()) {
            return Err(at(span, &key("move_failed_name"), "needs queue".into()));
        } else if let Some(span) = w.creds.as_ref().map(|n| n.span()) {
            return Err(at(span, &key("creds"), "needs queue".into()));
        } else if let Some(span) = w.tls_ca.as_ref().map(|n| n.span()) {
            return Err(at(span, &key("tls_ca"), "needs queue".into()));
        }
        pipelines.push(cfg);
    }
    // As `--level` with a hash op is refused on the command line: a flag that applies to
    // nothing is a mistake to say, not to ignore.
    if let Some(l) = overrides.level {
        if !file.watch.iter().any(|w| w.op.compresses()) {
            bail!(
                "--level {l}: no pipeline of {} compresses (--level is gzip's and zstd's)",
                path.display()
            );
        }
    }
    // An output root or a move directory inside a watch root listed later is just as bad; a
    // move directory that encloses another pipeline's watched tree hands it the moved files
    // to process again, and one that holds another pipeline's outputs mixes the two.
    places.made();
    let outs: Vec<Option<&Path>> = pipelines.iter().map(|c| c.out.as_deref()).collect();
    let states: Vec<&Path> = pipelines
        .iter()
        .filter_map(|c| c.watch.as_ref().map(|w| w.state_dir.as_path()))
        .collect();
    let moves: Vec<[(&str, Option<&Path>); 2]> = pipelines
        .iter()
        .map(|c| {
            [
                (
                    "move_source",
                    c.move_source.as_ref().map(|a| a.root.as_path()),
                ),
                (
                    "move_failed",
                    c.move_failed.as_ref().map(|a| a.root.as_path()),
                ),
            ]
        })
        .collect();
    for (i, (w, cfg)) in file.watch.iter().zip(&pipelines).enumerate() {
        let dirs = [
            ("out", cfg.out.as_deref(), &w.out),
            (
                "move_source",
                cfg.move_source.as_ref().map(|a| a.root.as_path()),
                &w.move_source,
            ),
            (
                "move_failed",
                cfg.move_failed.as_ref().map(|a| a.root.as_path()),
                &w.move_failed,
            ),
        ];
        for (k, dir, given) in dirs {
            let (Some(dir), Some(span)) = (dir, given.as_ref().map(|o| o.span())) else {
                continue;
            };
            let inside = roots
                .iter()
                .find_map(|(r, _)| places.lies_in(r, dir).map(|note| (r, note)));
            if let Some((other, note)) = inside {
                let msg = format!(
                    "{} is inside the watched tree {}{note}",
                    dir.display(),
                    other.display()
                );
                return Err(at(span, &format!("watch[{i}].{k}"), msg));
            }
            // An output root enclosing a watched tree (its own or another's) would write
            // outputs where they are watched as inputs; one shared with (or inside, or around)
            // another pipeline's would let one pipeline's output stand for the other's input
            // ("skipped: up-to-date" with the other file's bytes).
            let around = roots
                .iter()
                .find_map(|(r, _)| match places.overlap(r, dir) {
                    Some(("encloses the", note)) => Some((r, note)),
                    _ => None,
                });
            if let Some((other, note)) = around {
                let why = match k {
                    "out" => "outputs written there would be watched as inputs",
                    _ => "files moved there would be processed again",
                };
                let msg = format!(
                    "{} encloses the watched tree {}{note}: {why}",
                    dir.display(),
                    other.display()
                );
                return Err(at(span, &format!("watch[{i}].{k}"), msg));
            }
            // The state directory (the pipelines share one) is the state's own: outputs or
            // moved inputs written there (or in a tree around it) sit beside filepipe.sqlite,
            // where a file of the tree named so would meet it. An output root around it is
            // fine: an output's name ends in .gz or .zst, never one of the state's files
            // (`state_dir = "arch/.filepipe"` with `out = "arch"` ran before, and a review
            // found an upgrade refusing it); a moved input keeps its name.
            let state = states.iter().find_map(|s| match places.overlap(s, dir) {
                Some(("encloses the", _)) if k == "out" => None,
                how => how.map(|how| (s, how)),
            });
            if let Some((s, (how, note))) = state {
                let what = match k {
                    "out" => "outputs",
                    _ => "moved inputs",
                };
                let msg = format!(
                    "{} {how} state directory {}{note}: the state keeps its own files there; \
                     write {what} elsewhere",
                    dir.display(),
                    s.display()
                );
                return Err(at(span, &format!("watch[{i}].{k}"), msg));
            }
            // Two output roots that overlap are named at the later one, as roots are.
            let clash = outs.iter().enumerate().find_map(|(j, o)| {
                let other = if k == "out" { j < i } else { j != i };
                let o = o.filter(|_| other)?;
                places.overlap(o, dir).map(|(_, note)| (o, note))
            });
            if let Some((o, note)) = clash {
                let msg = format!(
                    "{} overlaps the output directory {} of another pipeline{note}: one \
                     pipeline's outputs would be taken for the other's",
                    dir.display(),
                    o.display()
                );
                return Err(at(span, &format!("watch[{i}].{k}"), msg));
            }
            // A move directory shared with (or inside, or around) another pipeline's, of
            // either kind, mixes the inputs moved from two trees: a.log of one and a.log of
            // the other side by side, one under a numbered name, neither saying which tree it
            // came from. Named at the later one.
            let earlier = moves[..i].iter().flatten();
            let clash = earlier.filter(|_| k != "out").find_map(|(theirs, m)| {
                let m = (*m)?;
                places.overlap(m, dir).map(|how| (theirs, m, how))
            });
            if let Some((theirs, m, (how, note))) = clash {
                let msg = format!(
                    "{} {how} {theirs} directory {} of another pipeline{note}: the inputs moved \
                     from two trees would be mixed",
                    dir.display(),
                    m.display()
                );
                return Err(at(span, &format!("watch[{i}].{k}"), msg));
            }
        }
    }
    check_own_files(
        path,
        &file,
        &pipelines,
        failure_log.as_deref(),
        &places,
        &at,
    )?;
    Ok(Service {
        pipelines,
        failure_log,
        metrics: overrides.metrics.or(file.metrics),
    })
}

/// Where the directories compared between pipelines lie, each looked up once: a config's
/// directories are compared pairwise, and looking up each `..` chain and the mount table for
/// every pair took over a minute for 60 pipelines over a thousand mounts. One for a load: the
/// mount table is read once, and each directory's identity found once (`aside::Identity`).
#[derive(Default)]
struct Places {
    places: RefCell<HashMap<PathBuf, Place>>,
    identities: RefCell<HashMap<PathBuf, Option<Rc<aside::Identity>>>>,
    mounts: std::cell::OnceCell<aside::Mounts>,
}

/// Where a directory lies: the deepest of its ancestors that exists (itself, once made;
/// canonical), the rest of its path below that (from `/`), and the mount that ancestor is on.
#[derive(Clone)]
struct Place {
    at: PathBuf,
    below: PathBuf,
    mount: Option<u64>,
}

impl Places {
    /// Forgets where the directories not made yet lie (the deepest ancestor that exists
    /// changes as a table's directories are made), keeping the places of those that exist and
    /// the identities: clearing them all for each table canonicalized every root again, 50,000
    /// readlink calls for 100 pipelines.
    fn made(&self) {
        self.places
            .borrow_mut()
            .retain(|_, place| place.below == Path::new("/"));
    }

    fn of(&self, p: &Path) -> Place {
        if let Some(place) = self.places.borrow().get(p) {
            return place.clone();
        }
        use rustix::fs::{AtFlags, StatxFlags};
        let existing = p.ancestors().find(|a| a.exists()).unwrap_or(p);
        let rest = p.strip_prefix(existing).unwrap_or(Path::new(""));
        let at = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
        let below = Path::new("/").join(rest);
        let flags = AtFlags::SYMLINK_NOFOLLOW;
        let mount = rustix::fs::statx(rustix::fs::CWD, &at, flags, StatxFlags::MNT_ID)
            .ok()
            .filter(|st| st.stx_mask & StatxFlags::MNT_ID.bits() != 0)
            .map(|st| st.stx_mnt_id);
        let place = Place { at, below, mount };
        self.places
            .borrow_mut()
            .insert(p.to_path_buf(), place.clone());
        place
    }

    /// The identity of the existing directory at the canonical path `p`, looked up once;
    /// `None` when it cannot be opened. Opened without following a link at its last
    /// component: a link put there since is not taken for the directory.
    fn identity(&self, p: &Path) -> Option<Rc<aside::Identity>> {
        if let Some(known) = self.identities.borrow().get(p) {
            return known.clone();
        }
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mounts = self.mounts.get_or_init(aside::Mounts::read);
        let found = rustix::fs::open(p, flags, Mode::empty())
            .ok()
            .and_then(|fd| aside::Identity::of(mounts, &fd, p).ok())
            .map(Rc::new);
        self.identities
            .borrow_mut()
            .insert(p.to_path_buf(), found.clone());
        found
    }

    /// How the directory `dir` lies to the directory `tree`: "is the", "is inside the" or
    /// "encloses the", and how that was found: by path (""), or by identity
    /// (`aside::Identity`), for the same directory reached by another path (a bind mount, a
    /// FUSE view), which a comparison of canonical paths passes over. One not made yet
    /// (`check-config` makes nothing) is compared through the deepest of its ancestors that
    /// exists. `None` when apart.
    fn overlap(&self, tree: &Path, dir: &Path) -> Option<(&'static str, &'static str)> {
        const BY_IDENTITY: &str = " (by a bind mount, a FUSE view or another path to it)";
        if let Some(how) = by_path(tree, dir) {
            return Some((how, ""));
        }
        let (t, d) = (self.of(tree), self.of(dir));
        // Within one mount a directory has one path (no directory is hard-linked): the
        // paths, compared above, said it all.
        if t.mount.is_some() && t.mount == d.mount {
            return None;
        }
        let (ti, di) = (self.identity(&t.at)?, self.identity(&d.at)?);
        let how = match ti.overlap(&di).ok()? {
            // The same directory: the parts not made yet tell.
            Some("is the") => by_path(&t.below, &d.below),
            // `dir`'s existing ancestor is inside `tree` (found by a review: `out =
            // "/m/new"`, /m a bind mount of another pipeline's output directory, passed
            // check-config, and start made the directory before refusing it). When `tree`
            // is not made yet, a directory that exists cannot lie in it: apart.
            Some("is inside the") if t.below == Path::new("/") => Some("is inside the"),
            Some("encloses the") if d.below == Path::new("/") => Some("encloses the"),
            _ => None,
        };
        how.map(|how| (how, BY_IDENTITY))
    }

    /// Whether `dir`, or the deepest of its ancestors that exists (it may be made only
    /// later), is `tree` or lies inside it, by path or by identity (see `overlap`).
    fn lies_in(&self, tree: &Path, dir: &Path) -> Option<&'static str> {
        let existing = self.of(dir).at;
        let dirs = if existing == dir {
            &[dir][..]
        } else {
            &[dir, &existing][..]
        };
        dirs.iter().find_map(|d| match self.overlap(tree, d) {
            Some(("is the" | "is inside the", note)) => Some(note),
            _ => None,
        })
    }

    /// Whether the files `a` and `b` are one: the same path, or the same name in the same
    /// directory reached by two paths (see `overlap`); with how that was found.
    fn same_file(&self, a: &Path, b: &Path) -> Option<&'static str> {
        if a == b {
            return Some("");
        }
        match (a.parent(), b.parent()) {
            (Some(pa), Some(pb)) if a.file_name() == b.file_name() => match self.overlap(pa, pb) {
                Some(("is the", note)) => Some(note),
                _ => None,
            },
            _ => None,
        }
    }
}

/// `Places::overlap` by path alone.
fn by_path(tree: &Path, dir: &Path) -> Option<&'static str> {
    if dir == tree {
        Some("is the")
    } else if dir.starts_with(tree) {
        Some("is inside the")
    } else if tree.starts_with(dir) {
        Some("encloses the")
    } else {
        None
    }
}

/// Refuses files filepipe writes that another of its writers would overwrite or read: a
/// manifest another pipeline also writes (each rewrites it with its own lines), or inside
/// another pipeline's watched tree or output root (hashed or replaced as that pipeline's
/// file: two such manifests rewrite each other forever); a manifest or the failure log that is
/// the config file itself (it would be corrupted). One in the state directory is refused per
/// pipeline, as on the command line (`Config::watching`).
fn check_own_files(
    path: &Path,
    file: &FileConfig,
    pipelines: &[Config],
    failure_log: Option<&Path>,
    places: &Places,
    at: &dyn Fn(Range<usize>, &str, String) -> anyhow::Error,
) -> Result<()> {
    let config = std::fs::canonicalize(path).unwrap_or_else(|_| absolute(path));
    // What a file of filepipe's own may not be; `None`: it may be that.
    let forbidden = |f: &Path| (*f == config).then_some("is the config file itself");
    if let Some(log) = failure_log {
        let log = absolute(log);
        if let Some(why) = forbidden(&log) {
            bail!(
                "{}: failure_log: {} {why}: it would be corrupted",
                path.display(),
                log.display()
            );
        }
    }
    let manifests: Vec<Vec<PathBuf>> = pipelines
        .iter()
        .map(|c| {
            c.spec
                .hashes()
                .iter()
                .filter_map(|&a| c.manifest_for(a))
                .collect()
        })
        .collect();
    for (i, (w, mine)) in file.watch.iter().zip(&manifests).enumerate() {
        let Some(span) = w.manifest.as_ref().map(|m| m.span()) else {
            continue;
        };
        let key = format!("watch[{i}].manifest");
        for m in mine {
            if let Some(why) = forbidden(m) {
                let msg = format!("{} {why}: it would be corrupted", m.display());
                return Err(at(span, &key, msg));
            }
            let same = manifests[..i]
                .iter()
                .flatten()
                .find_map(|theirs| places.same_file(theirs, m));
            if let Some(note) = same {
                let msg = format!(
                    "{} is also another pipeline's manifest{note}: each would overwrite the \
                     other's",
                    m.display()
                );
                return Err(at(span, &key, msg));
            }
            let theirs = pipelines.iter().enumerate().filter(|(j, _)| *j != i);
            // Another's output tree is never read as input: a manifest kept there (an
            // archive's own SHA256SUMS) is fine, as it was before these checks.
            for (_, other) in theirs {
                let d = &other.root;
                let inside = match m.parent() {
                    Some(parent) => places.lies_in(d, parent),
                    None => m.starts_with(d).then_some(""),
                };
                if let Some(note) = inside {
                    let msg = format!(
                        "{} is inside {}, another pipeline's tree{note}: that pipeline would \
                         take it for one of its files",
                        m.display(),
                        d.display()
                    );
                    return Err(at(span, &key, msg));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_secret_is_read_only_from_a_file_others_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("queue.url");
        std::fs::write(&f, "nats://u:p@h:4222\n").unwrap();
        let mode = |m: u32| {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m)).unwrap();
            FileAccess::of(&std::fs::File::open(&f).unwrap()).unwrap()
        };
        let private = |m: u32| mode(m).check_private(QUEUE_SECRET, "");
        assert!(private(0o600).is_ok());
        assert!(private(0o400).is_ok());
        let e = private(0o644).unwrap_err();
        assert!(e.contains("every user") && e.contains("0644"), "{e}");
        assert!(private(0o620).is_err());
        // Group-readable only for a file root owns (the service's group reads it).
        let m = mode(0o640);
        let by_root = m.meta.uid() == 0;
        assert_eq!(m.check_private(QUEUE_SECRET, "").is_ok(), by_root);
        assert_eq!(read_queue_file(&f).is_ok(), by_root);
        mode(0o600);
        assert_eq!(read_queue_file(&f).unwrap(), "nats://u:p@h:4222");
        // Writable by others: refused, secret or not (it says where the jobs come from).
        mode(0o620);
        assert!(read_queue_file(&f).unwrap_err().contains("chmod go-w"));
        // No secret, no rule.
        std::fs::write(&f, "nats://h:4222").unwrap();
        mode(0o644);
        assert_eq!(read_queue_file(&f).unwrap(), "nats://h:4222");
        // Without a scheme: a password, or a bare word that may be a token, is one.
        for url in ["u:p@h:4222", "S3cretToken"] {
            std::fs::write(&f, url).unwrap();
            assert!(
                read_queue_file(&f).unwrap_err().contains("every user"),
                "{url}"
            );
        }
        std::fs::write(&f, "nats://a:1\nnats://b:2\n").unwrap();
        assert!(read_queue_file(&f)
            .unwrap_err()
            .contains("more than one URL"));
    }
}
