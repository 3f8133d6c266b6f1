//! The service's TOML config: read safely, validated whole (every error names the file, the
//! line and the key), and resolved into one `Config` per `[[watch]]` table, with the command
//! line's overrides applied.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::cli::{OpSpec, PipelineArgs, WatchArgs, MAX_JOBS, MAX_POLL_SECS, MAX_SETTLE_MS};
use crate::config::{absolute, Config, DEFAULT_SETTLE_MS};
use crate::fsio::output::Durability;

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
    #[serde(default)]
    watch: Vec<WatchEntry>,
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
    /// gzip, zstd: move each input here once its output is durable and verified.
    move_source: Option<Spanned<PathBuf>>,
    /// Move each input that failed for good here.
    move_failed: Option<Spanned<PathBuf>>,
    /// Cluster mode: settled files go to this NATS JetStream queue's workers.
    queue: Option<Spanned<String>>,
    /// The name the workers know this root by [default: its directory's name].
    root_name: Option<Spanned<String>>,
    /// Cluster mode: the name the workers know `out` by (default: its own name).
    out_root_name: Option<Spanned<String>>,
    /// A NATS credentials file for `queue`.
    creds: Option<PathBuf>,
    /// CA certificates to trust for a tls:// `queue`.
    tls_ca: Option<PathBuf>,
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

/// Command-line flags that override the file: its global settings, plus globs added to every
/// pipeline.
#[derive(Debug, Default, Clone)]
pub(crate) struct Overrides {
    jobs: Option<u16>,
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
/// most `MAX_CONFIG_BYTES`, in UTF-8.
fn read_config(path: &Path) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let ctx = || format!("cannot read config file {}", path.display());
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(ctx)?;
    let meta = file.metadata().with_context(ctx)?;
    if !meta.is_file() {
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
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// A message about the file with every line cut to a readable length: a parse error quotes
/// the offending line, which may be megabytes long.
fn cut_lines(msg: &str) -> String {
    const MAX_LINE: usize = 200;
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
    let text = read_config(path)?;
    let file: FileConfig = toml::from_str(&text)
        .map_err(|e| anyhow!("{}: {}", path.display(), cut_lines(&e.to_string())))?;
    // Relative paths in the file are relative to the file, not to wherever the daemon runs
    // (systemd starts it in /).
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| base.join(p);
    let at = |span: Range<usize>, key: &str, msg: String| {
        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
        anyhow!("{}:{line}: {key}: {msg}", path.display())
    };
    if file.watch.is_empty() {
        bail!("{}: no [[watch]] table: nothing to run", path.display());
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
    let state_dir = overrides
        .state
        .clone()
        .or(file.state_dir.as_deref().map(resolve))
        .unwrap_or_else(crate::state::default_dir);
    let failure_log = overrides
        .failure_log
        .clone()
        .or(file.failure_log.as_deref().map(resolve));
    let mut roots: Vec<(PathBuf, Range<usize>)> = Vec::new();
    let mut pipelines = Vec::new();
    for (i, w) in file.watch.iter().enumerate() {
        let key = |k: &str| format!("watch[{i}].{k}");
        let root = std::fs::canonicalize(resolve(w.path.get_ref())).map_err(|e| {
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
        for (other, span) in &roots {
            if root.starts_with(other) || other.starts_with(&root) {
                let line = text[..span.start].matches('\n').count() + 1;
                let msg = format!(
                    "{} overlaps the watch root {} (line {line}): a file would be processed twice",
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
        let level = w.level.as_ref().map(|l| *l.get_ref());
        for (k, dir) in [
            ("out", &w.out),
            ("move_source", &w.move_source),
            ("move_failed", &w.move_failed),
        ] {
            let Some(dir) = dir else { continue };
            let abs = absolute(&resolve(dir.get_ref()));
            if let Some((other, _)) = roots.iter().find(|(r, _)| abs.starts_with(r)) {
                let msg = format!(
                    "{} is inside the watched tree {}: its files would be watched as inputs",
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
                c.watching(state_dir.clone(), settle, poll, create)
            })
            .map_err(|e| at(w.path.span(), &format!("watch[{i}]"), format!("{e:#}")))?;
        if let Some(queue) = &w.queue {
            if !cfg!(feature = "cluster") {
                let msg = "this filepipe is built without cluster mode (feature cluster)";
                return Err(at(queue.span(), &key("queue"), msg.into()));
            }
            let name = match &w.root_name {
                Some(n) => n.get_ref().clone(),
                None => crate::config::default_root_name(&root),
            };
            if !crate::config::valid_root_name(&name) {
                let span = w.root_name.as_ref().map_or(queue.span(), |n| n.span());
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
                        (None, None) => queue.span(),
                    };
                    let msg = format!(
                        "the output root's name {out_name:?} is not 1 to 64 of A-Z a-z 0-9 _ - other than the root's name {name:?} (set out_root_name)"
                    );
                    return Err(at(span, &key("out_root_name"), msg));
                }
            }
            if let Some(settings) = cfg.watch.as_mut() {
                settings.queue = Some(crate::config::QueueTarget {
                    url: queue.get_ref().clone(),
                    creds: w.creds.as_deref().map(resolve),
                    tls_ca: w.tls_ca.as_deref().map(resolve),
                    root_name: name,
                    out_root_name: w.out_root_name.as_ref().map(|n| n.get_ref().clone()),
                });
            }
            if let (Some(n), None) = (&w.out_root_name, &w.out) {
                return Err(at(n.span(), &key("out_root_name"), "needs out".into()));
            }
        } else if let Some(span) = w.root_name.as_ref().map(|n| n.span()) {
            return Err(at(span, &key("root_name"), "needs queue".into()));
        } else if let Some(span) = w.out_root_name.as_ref().map(|n| n.span()) {
            return Err(at(span, &key("out_root_name"), "needs queue".into()));
        }
        pipelines.push(cfg);
    }
    // An output root or a move directory inside a watch root listed later is just as bad; a
    // move directory that encloses another pipeline's watched tree hands it the moved files
    // to process again, and one that holds another pipeline's outputs mixes the two.
    let outs: Vec<Option<&Path>> = pipelines.iter().map(|c| c.out.as_deref()).collect();
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
            if let Some((other, _)) = roots.iter().find(|(r, _)| dir.starts_with(r)) {
                let msg = format!(
                    "{} is inside the watched tree {}",
                    dir.display(),
                    other.display()
                );
                return Err(at(span, &format!("watch[{i}].{k}"), msg));
            }
            if k == "out" {
                continue;
            }
            if let Some((other, _)) = roots.iter().find(|(r, _)| r.starts_with(dir)) {
                let msg = format!(
                    "{} encloses the watched tree {}: files moved there would be processed again",
                    dir.display(),
                    other.display()
                );
                return Err(at(span, &format!("watch[{i}].{k}"), msg));
            }
            let clash = outs.iter().enumerate().find_map(|(j, o)| {
                o.filter(|o| j != i && (o.starts_with(dir) || dir.starts_with(o)))
            });
            if let Some(o) = clash {
                let msg = format!(
                    "{} overlaps the output directory {} of another pipeline",
                    dir.display(),
                    o.display()
                );
                return Err(at(span, &format!("watch[{i}].{k}"), msg));
            }
        }
    }
    Ok(Service {
        pipelines,
        failure_log,
        metrics: overrides.metrics.or(file.metrics),
    })
}
