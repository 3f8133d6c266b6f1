//! Running as a service: the TOML config, one watch pipeline per `[[watch]]` under a
//! supervisor, reload on SIGHUP, and the sd_notify protocol.
//!
//! Invariants: a config is validated whole before anything runs or changes, and every error
//! names the file, the line and the key; a reload that fails keeps the running pipelines
//! untouched; a reload that succeeds stops only the pipelines that changed (they drain: files in
//! flight finish, queued ones stay unrecorded and are found again by the new pipeline's scan)
//! and starts the new ones. READY=1 is sent only once every pipeline has its watches in place
//! and its initial scan queued; WATCHDOG=1 only while every watcher loop turns and, wherever
//! work is in flight, bytes are being read or files finished.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sd_notify::NotifyState;
use serde::Deserialize;
use toml::Spanned;

use crate::cli::{OpKind, PipelineArgs, WatchArgs, MAX_JOBS, MAX_SETTLE_MS};
use crate::config::{absolute, Config, DEFAULT_SETTLE_MS};
use crate::fsio::input::BYTES_READ;
use crate::fsio::output::Durability;
use crate::report::Summary;
use crate::signals::Shutdown;
use crate::travel::Stats;

/// The config file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    jobs: Option<Spanned<u16>>,
    failure_log: Option<PathBuf>,
    settle_ms: Option<Spanned<u64>>,
    durability: Option<Durability>,
    #[serde(default)]
    watch: Vec<WatchEntry>,
}

/// One `[[watch]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchEntry {
    path: Spanned<PathBuf>,
    op: OpKind,
    out: Option<Spanned<PathBuf>>,
    manifest: Option<Spanned<PathBuf>>,
    level: Option<Spanned<u32>>,
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    settle_ms: Option<Spanned<u64>>,
}

/// A loaded, validated config: one resolved `Config` per pipeline.
#[derive(Debug)]
pub struct Service {
    /// The pipelines, in file order.
    pub pipelines: Vec<Config>,
    /// The failure log all pipelines share.
    pub failure_log: Option<PathBuf>,
}

/// Command-line flags that override the file: its global settings, plus globs added to every
/// pipeline.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    jobs: Option<u16>,
    state: Option<PathBuf>,
    settle: Option<u64>,
    failure_log: Option<PathBuf>,
    include: Vec<String>,
    exclude: Vec<String>,
    json: bool,
    durability: Option<Durability>,
}

impl Overrides {
    /// The overrides in `filepipe watch --config FILE [flags]`; per-tree flags make no sense
    /// for several trees and are refused.
    pub fn from_args(args: &WatchArgs) -> Result<Overrides> {
        if args.common.out.is_some() || args.common.manifest.is_some() {
            bail!("with --config, give --out and --manifest per [[watch]] in the file");
        }
        Ok(Overrides {
            jobs: args.common.jobs,
            state: args.state.clone(),
            settle: args.settle,
            failure_log: args.common.failure_log.clone(),
            include: args.common.include.clone(),
            exclude: args.common.exclude.clone(),
            json: args.common.json,
            durability: args.common.durability,
        })
    }
}

/// The largest config file read: far more than any real one, small enough that a mistaken
/// path (a disk image, /dev/zero) costs nothing.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

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
pub fn load(path: &Path, overrides: &Overrides, quiet: bool, create: bool) -> Result<Service> {
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
        let misplaced = [
            (
                "out",
                w.op == OpKind::Sha256,
                w.out.as_ref().map(|o| o.span()),
            ),
            (
                "manifest",
                w.op == OpKind::Gzip,
                w.manifest.as_ref().map(|m| m.span()),
            ),
            (
                "level",
                w.op == OpKind::Sha256,
                w.level.as_ref().map(|l| l.span()),
            ),
        ];
        for (k, wrong, span) in misplaced {
            if let (true, Some(span)) = (wrong, span) {
                let msg = format!("does not apply to op = \"{}\"", w.op.as_str());
                return Err(at(span, &key(k), msg));
            }
        }
        let level = match &w.level {
            Some(l) if !(1..=9).contains(l.get_ref()) => {
                return Err(at(l.span(), &key("level"), "must be 1 to 9".into()))
            }
            Some(l) => *l.get_ref(),
            None => 6,
        };
        if let Some(out) = &w.out {
            let abs = absolute(&resolve(out.get_ref()));
            if let Some((other, _)) = roots.iter().find(|(r, _)| abs.starts_with(r)) {
                let msg = format!(
                    "{} is inside the watched tree {}: outputs would be watched as inputs",
                    abs.display(),
                    other.display()
                );
                return Err(at(out.span(), &key("out"), msg));
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
        };
        let settle = overrides
            .settle
            .or(w.settle_ms.as_ref().map(|s| *s.get_ref()))
            .or(file.settle_ms.as_ref().map(|s| *s.get_ref()))
            .unwrap_or(DEFAULT_SETTLE_MS);
        let cfg = Config::from_common(&root, w.op, &args, quiet, create)
            .and_then(|c| c.watching(state_dir.clone(), Duration::from_millis(settle), create))
            .map_err(|e| at(w.path.span(), &format!("watch[{i}]"), format!("{e:#}")))?;
        pipelines.push(cfg);
    }
    // An output root inside a watch root listed later is just as bad.
    for (i, (w, cfg)) in file.watch.iter().zip(&pipelines).enumerate() {
        if let (Some(out), Some(span)) = (&cfg.out, w.out.as_ref().map(|o| o.span())) {
            if let Some((other, _)) = roots.iter().find(|(r, _)| out.starts_with(r)) {
                let msg = format!(
                    "{} is inside the watched tree {}",
                    out.display(),
                    other.display()
                );
                return Err(at(span, &format!("watch[{i}].out"), msg));
            }
        }
    }
    Ok(Service {
        pipelines,
        failure_log,
    })
}

/// What identifies a pipeline across reloads: if any of it changes, the pipeline restarts.
fn identity(cfg: &Config) -> String {
    let w = cfg.watch.as_ref();
    format!(
        "{:?}|{:?}|{:?}|{:?}|{}|{}|{:?}|{:?}|{:?}|{:?}",
        cfg.root,
        cfg.op,
        cfg.out,
        cfg.manifest,
        cfg.level,
        cfg.jobs,
        cfg.durability,
        w.map(|w| w.settle),
        w.map(|w| &w.state_dir),
        cfg.filter
    )
}

/// One running watch pipeline.
struct Running {
    identity: String,
    cfg: Arc<Config>,
    stop: Arc<Shutdown>,
    stats: Arc<Stats>,
    handle: JoinHandle<Result<Summary>>,
}

fn start(cfg: Config) -> Result<Running> {
    let cfg = Arc::new(cfg);
    let stop = Arc::new(Shutdown::default());
    let stats = Arc::new(Stats::default());
    let (c, s, st) = (Arc::clone(&cfg), Arc::clone(&stop), Arc::clone(&stats));
    let handle = std::thread::Builder::new()
        .name("filepipe-pipeline".into())
        .spawn(move || crate::run::watch(&c, &s, &st))
        .context("starting a pipeline thread")?;
    tracing::info!(root = %cfg.root.display(), op = cfg.op.as_str(), "pipeline started");
    Ok(Running {
        identity: identity(&cfg),
        cfg,
        stop,
        stats,
        handle,
    })
}

/// Stops a pipeline and waits for its drain.
fn stop(r: Running, signal: i32) -> Result<(Arc<Config>, Summary)> {
    r.stop.request(signal);
    let summary = r
        .handle
        .join()
        .map_err(|_| anyhow!("the pipeline for {} panicked", r.cfg.root.display()))?
        .with_context(|| format!("pipeline for {}", r.cfg.root.display()))?;
    Ok((r.cfg, summary))
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// How often STATUS= is sent when nothing changes.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// How often STATUS= is sent at most while counts change.
const STATUS_MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Runs the service until SIGINT/SIGTERM (Ok, with each pipeline's summary) or until a
/// pipeline fails (Err). `path` is the config file SIGHUP re-reads; `None` for `watch DIR`,
/// one pipeline from the command line under the same supervisor (so it speaks sd_notify too).
pub fn run(
    path: Option<&Path>,
    overrides: &Overrides,
    service: Service,
    signals: &Shutdown,
    quiet: bool,
) -> Result<Vec<(Arc<Config>, Summary)>> {
    let mut running = Vec::new();
    for cfg in service.pipelines {
        running.push(start(cfg)?);
    }
    let watched: Arc<Mutex<Vec<Arc<Stats>>>> = Arc::new(Mutex::new(Vec::new()));
    let set_watched = |running: &[Running]| {
        if let Ok(mut w) = watched.lock() {
            *w = running.iter().map(|r| Arc::clone(&r.stats)).collect();
        }
    };
    set_watched(&running);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        spawn_watchdog(interval, Arc::clone(&watched))?;
    }
    let mut ready_sent = false;
    let mut last_status = Instant::now() - STATUS_INTERVAL;
    let mut last_line = String::new();
    let mut done = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Some(sig) = signals.signal() {
            notify(&[
                NotifyState::Stopping,
                NotifyState::Status("stopping: draining"),
            ]);
            let mut first_err = None;
            for r in running.drain(..) {
                match stop(r, sig) {
                    Ok(s) => done.push(s),
                    Err(e) => first_err = first_err.or(Some(e)),
                }
            }
            return first_err.map_or(Ok(done), Err);
        }
        if let Some(i) = running.iter().position(|r| r.handle.is_finished()) {
            let r = running.remove(i);
            let root = r.cfg.root.clone();
            let err = match stop(r, libc::SIGTERM) {
                Err(e) => e,
                Ok(_) => anyhow!("the pipeline for {} stopped by itself", root.display()),
            };
            notify(&[NotifyState::Stopping]);
            for r in running.drain(..) {
                let _ = stop(r, libc::SIGTERM);
            }
            return Err(err);
        }
        let reload = signals.take_reload();
        if reload && path.is_none() {
            tracing::info!("SIGHUP: nothing to reload (no --config)");
        }
        if let (true, Some(path)) = (reload, path) {
            let now = NotifyState::monotonic_usec_now().ok();
            let mut states = vec![NotifyState::Reloading];
            states.extend(now);
            notify(&states);
            match load(path, overrides, quiet, true) {
                Err(e) => {
                    tracing::error!("reload failed, keeping the running configuration: {e:#}");
                    notify(&[
                        NotifyState::Ready,
                        NotifyState::Status("reload failed; see log"),
                    ]);
                }
                Ok(new) => {
                    let keep: HashSet<String> = new.pipelines.iter().map(identity).collect();
                    let (kept, gone): (Vec<_>, Vec<_>) =
                        running.drain(..).partition(|r| keep.contains(&r.identity));
                    running = kept;
                    let mut failed = None;
                    for r in gone {
                        tracing::info!(root = %r.cfg.root.display(), "pipeline removed by reload");
                        match stop(r, libc::SIGHUP) {
                            Ok(s) => done.push(s),
                            Err(e) => failed = failed.or(Some(e)),
                        }
                    }
                    let have: HashSet<String> =
                        running.iter().map(|r| r.identity.clone()).collect();
                    for cfg in new.pipelines {
                        if failed.is_none() && !have.contains(&identity(&cfg)) {
                            match start(cfg) {
                                Ok(r) => running.push(r),
                                Err(e) => failed = Some(e),
                            }
                        }
                    }
                    // Whatever went wrong, the pipelines still running drain before the exit.
                    if let Some(e) = failed {
                        notify(&[NotifyState::Stopping]);
                        for r in running.drain(..) {
                            let _ = stop(r, libc::SIGTERM);
                        }
                        return Err(e);
                    }
                    set_watched(&running);
                    if service.failure_log != new.failure_log {
                        tracing::warn!("a changed failure_log takes effect at the next restart");
                    }
                    ready_sent = false;
                }
            }
        }
        if !ready_sent
            && running
                .iter()
                .all(|r| r.stats.ready.load(Ordering::Relaxed))
        {
            notify(&[NotifyState::Ready]);
            ready_sent = true;
            tracing::info!(pipelines = running.len(), "ready");
        }
        // At every change (a few times a second at most), and every STATUS_INTERVAL: a
        // STATUS with nothing queued, in flight or waiting to retry says the daemon is idle.
        let status = status_line(&running);
        let since = last_status.elapsed();
        if since >= STATUS_INTERVAL || status != last_line && since >= STATUS_MIN_INTERVAL {
            last_status = Instant::now();
            notify(&[NotifyState::Status(&status)]);
            last_line = status;
        }
    }
}

/// "2 pipelines: queued 0, in flight 0, retrying 0, done 12, skipped 0, failed 1".
fn status_line(running: &[Running]) -> String {
    let sum = |f: fn(&Stats) -> u64| running.iter().map(|r| f(&r.stats)).sum::<u64>();
    let mut s = String::new();
    let _ = write!(
        s,
        "{} {}: queued {}, in flight {}, retrying {}, done {}, skipped {}, failed {}",
        running.len(),
        if running.len() == 1 {
            "pipeline"
        } else {
            "pipelines"
        },
        sum(|s| s.queued.load(Ordering::Relaxed)),
        sum(|s| s.in_flight.load(Ordering::Relaxed)),
        sum(|s| s.retrying.load(Ordering::Relaxed)),
        sum(|s| s.done.load(Ordering::Relaxed)),
        sum(|s| s.skipped.load(Ordering::Relaxed)),
        sum(|s| s.failed.load(Ordering::Relaxed)),
    );
    s
}

/// Liveness as the watchdog sees it between two pings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Liveness {
    /// Each ready pipeline's watcher loop count.
    pub loops: Vec<u64>,
    /// Files in flight, all pipelines.
    pub in_flight: u64,
    /// Bytes read plus outcomes counted, all pipelines.
    pub progress: u64,
}

impl Liveness {
    fn sample(stats: &[Arc<Stats>]) -> Liveness {
        let ready: Vec<&Arc<Stats>> = stats
            .iter()
            .filter(|s| s.ready.load(Ordering::Relaxed))
            .collect();
        let outcomes: u64 = stats
            .iter()
            .map(|s| {
                s.done.load(Ordering::Relaxed)
                    + s.skipped.load(Ordering::Relaxed)
                    + s.failed.load(Ordering::Relaxed)
            })
            .sum();
        Liveness {
            loops: ready
                .iter()
                .map(|s| s.loop_ticks.load(Ordering::Relaxed))
                .collect(),
            in_flight: stats
                .iter()
                .map(|s| s.in_flight.load(Ordering::Relaxed))
                .sum(),
            progress: BYTES_READ.load(Ordering::Relaxed) + outcomes,
        }
    }

    /// True if, from `before` to `self`, every watcher loop turned and, if work was in flight,
    /// something moved. A wedged worker pool (or a hung fsync) fails the second test.
    pub fn healthy_since(&self, before: &Liveness) -> bool {
        let loops_turned = self.loops.len() != before.loops.len()
            || self
                .loops
                .iter()
                .zip(&before.loops)
                .all(|(now, then)| now > then);
        let busy = self.in_flight > 0 && before.in_flight > 0;
        loops_turned && (!busy || self.progress > before.progress)
    }
}

/// Pings WATCHDOG=1 every `interval / 2` while the pipelines are healthy.
fn spawn_watchdog(interval: Duration, watched: Arc<Mutex<Vec<Arc<Stats>>>>) -> Result<()> {
    std::thread::Builder::new()
        .name("filepipe-watchdog".into())
        .spawn(move || {
            let sample = || {
                watched
                    .lock()
                    .map(|w| Liveness::sample(&w))
                    .unwrap_or_default()
            };
            let mut before = sample();
            loop {
                std::thread::sleep(interval / 2);
                let now = sample();
                if now.healthy_since(&before) {
                    notify(&[NotifyState::Watchdog]);
                } else {
                    tracing::error!("no progress: withholding the watchdog ping");
                }
                before = now;
            }
        })
        .context("starting the watchdog thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_health() {
        let idle = Liveness {
            loops: vec![5],
            in_flight: 0,
            progress: 100,
        };
        let idle_later = Liveness {
            loops: vec![9],
            in_flight: 0,
            progress: 100,
        };
        assert!(
            idle_later.healthy_since(&idle),
            "idle and looping is healthy"
        );
        let stuck_loop = Liveness {
            loops: vec![5],
            ..idle_later.clone()
        };
        assert!(
            !stuck_loop.healthy_since(&idle),
            "a watcher loop that stopped is not"
        );
        let busy = Liveness {
            loops: vec![5],
            in_flight: 2,
            progress: 100,
        };
        let wedged = Liveness {
            loops: vec![9],
            in_flight: 2,
            progress: 100,
        };
        assert!(
            !wedged.healthy_since(&busy),
            "work in flight and nothing moving is wedged"
        );
        let working = Liveness {
            loops: vec![9],
            in_flight: 2,
            progress: 4196,
        };
        assert!(working.healthy_since(&busy));
    }
}
