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

mod config;
mod watchdog;
mod worker_table;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sd_notify::NotifyState;

use crate::cli::OpSpec;
use crate::config::Config;
use crate::fsio::output::Durability;
use crate::fsio::own;
use crate::report::Summary;
use crate::signals::Shutdown;
use crate::source::watch::RootGone;
use crate::travel::Stats;

#[cfg(feature = "cluster")]
pub(crate) use config::load_worker;
pub(crate) use config::{check, load, Overrides, Service};
use watchdog::{notify, spawn_watchdog, Watched};

/// What identifies a pipeline across reloads: if any of it changes, the pipeline restarts
/// (its queued files are found again by the new one's scan); if none does, it keeps running.
/// Every setting of `Config` a pipeline runs with belongs here (a reload that removed
/// `move_source` went unapplied when it was missing: found by a review).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Identity {
    root: PathBuf,
    op: OpSpec,
    out: Option<PathBuf>,
    manifest: Option<PathBuf>,
    level: u32,
    jobs: usize,
    durability: Durability,
    max_size: Option<u64>,
    settle: Option<Duration>,
    poll: Option<Duration>,
    queue: Option<crate::config::QueueTarget>,
    state_dir: Option<PathBuf>,
    include: Vec<String>,
    exclude: Vec<String>,
    move_source: Option<PathBuf>,
    move_failed: Option<PathBuf>,
    failure_log: Option<PathBuf>,
    own_files: Vec<PathBuf>,
    root_named: PathBuf,
    follow_symlinks: bool,
    force: bool,
    remove_source: bool,
    json: bool,
}

impl Identity {
    fn of(cfg: &Config) -> Identity {
        let w = cfg.watch.as_ref();
        let (include, exclude) = cfg.filter.patterns();
        Identity {
            root: cfg.root.clone(),
            op: cfg.spec.clone(),
            out: cfg.out.clone(),
            manifest: cfg.manifest.clone(),
            level: cfg.level,
            jobs: cfg.jobs,
            durability: cfg.durability,
            max_size: cfg.max_size,
            settle: w.map(|w| w.settle),
            poll: w.and_then(|w| w.poll),
            queue: w.and_then(|w| w.queue.clone()),
            state_dir: w.map(|w| w.state_dir.clone()),
            include: include.to_vec(),
            exclude: exclude.to_vec(),
            move_source: cfg.move_source.as_ref().map(|a| a.root.clone()),
            move_failed: cfg.move_failed.as_ref().map(|a| a.root.clone()),
            failure_log: cfg.failure_log.clone(),
            own_files: cfg.own_files.clone(),
            root_named: cfg.root_named.clone(),
            follow_symlinks: cfg.follow_symlinks,
            force: cfg.force,
            remove_source: cfg.remove_source,
            json: cfg.json,
        }
    }
}

/// One running watch pipeline.
struct Running {
    /// This process's number for it (a restart is a new one): what the watchdog pairs by.
    id: u64,
    identity: Identity,
    cfg: Arc<Config>,
    stop: Arc<Shutdown>,
    stats: Arc<Stats>,
    handle: JoinHandle<Result<Summary>>,
}

/// A pipeline whose watched directory went (`RootGone`): the others go on, and it starts
/// again, with the same config (its descriptors and state lock kept), once a directory is
/// back at that path. Under the shipped units, ending the service instead stopped every
/// pipeline for good: the restart refuses a config whose directory is missing, and is not
/// restarted (found by a review).
struct Waiting {
    identity: Identity,
    cfg: Arc<Config>,
    /// Whether it was said that it is not started again by itself (`path_held`): once.
    said: bool,
}

/// Whether nobody but this process's user and root may rename what lies at `root`, a
/// directory there now: every directory above it is theirs and writable by no one else, or
/// sticky, where only an entry's owner renames it, so the entry below (the root included)
/// must be theirs too. A pipeline whose root another user could swap is not started again by
/// itself: that user could race its start, a symlink swapped in between its opens of the root,
/// and have outputs written outside every root (found by a review). A reload starts it.
fn path_held(root: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let ours = |m: &std::fs::Metadata| m.uid() == 0 || m.uid() == me;
    let mut parent_sticky = false;
    let mut path: Vec<&Path> = root.ancestors().collect();
    path.reverse();
    for (i, dir) in path.iter().enumerate() {
        let Ok(m) = std::fs::symlink_metadata(dir) else {
            return false;
        };
        if !m.is_dir() {
            return false;
        }
        if i + 1 == path.len() {
            return !parent_sticky || ours(&m);
        }
        let others_write = m.mode() & 0o022 != 0;
        if !ours(&m) || others_write && m.mode() & 0o1000 == 0 {
            return false;
        }
        parent_sticky = others_write;
    }
    false
}

/// The directory at `path` itself (not through a symlink), if one is: its device, inode and
/// birth time (where the file system keeps one: a directory removed and made again at once
/// often gets the same inode number).
fn dir_id(path: &Path) -> Option<(u64, u64, Option<std::time::SystemTime>)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .filter(std::fs::Metadata::is_dir)
        .map(|m| (m.dev(), m.ino(), m.created().ok()))
}

/// How often a waiting pipeline's directory is looked for.
const ROOT_LOOK_EVERY: Duration = Duration::from_secs(1);

fn start(cfg: Arc<Config>) -> Result<Running> {
    let stop = Arc::new(Shutdown::default());
    let stats = Arc::new(Stats::default());
    let (c, s, st) = (Arc::clone(&cfg), Arc::clone(&stop), Arc::clone(&stats));
    let handle = std::thread::Builder::new()
        .name("filepipe-pipeline".into())
        .spawn(move || {
            // Whatever ended it, while its directory went or was replaced (as it started: an
            // output root that could not be opened, say), it ended because the directory went:
            // it waits for it (a root made and removed in a loop ended the service with
            // "opening ...: No such file or directory", found by CI).
            let before = dir_id(&c.root);
            crate::run::watch(&c, &s, &st).map_err(|e| {
                let gone = e.chain().any(|e| e.is::<RootGone>());
                if !gone && (before.is_none() || dir_id(&c.root) != before) {
                    anyhow::Error::new(RootGone(c.root.clone())).context(format!("{e:#}"))
                } else {
                    e
                }
            })
        })
        .context("starting a pipeline thread")?;
    tracing::info!(root = %cfg.root.display(), op = cfg.spec.canonical(), "pipeline started");
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    Ok(Running {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        identity: Identity::of(&cfg),
        cfg,
        stop,
        stats,
        handle,
    })
}

/// Stops every pipeline still running, each drained, after `e` ended the service; returns `e`.
fn stop_all(running: &mut Vec<Running>, e: anyhow::Error) -> anyhow::Error {
    notify(&[NotifyState::Stopping]);
    for r in running.drain(..) {
        let _ = stop(r, libc::SIGTERM);
    }
    e
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

/// A reload whose new pipelines are not all ready yet: if one of them stops meanwhile (a
/// state directory that holds no database, say: what `check-config` cannot see), the reload
/// failed, and the pipelines it stopped start again, as a failed reload keeps the running
/// configuration (nginx, watchman), where the whole service stopped.
struct Pending {
    /// The ids of the pipelines the reload started.
    started: Vec<u64>,
    /// The configs of the pipelines it stopped, descriptors and all, to start again.
    previous: Vec<Arc<Config>>,
}

/// What of a stopped pipeline's config the summary printed at exit needs: a config of its
/// own, without the descriptors the pipeline held (manifest and move directories, the state
/// lock). Never the pipeline's own `Arc`: a failed reload starts that one again, and a config
/// kept for the summary that shares it holds its descriptors until the exit, one more set
/// at every reload that stops it again (found by a review).
fn for_summary(cfg: &Config) -> Arc<Config> {
    Arc::new(Config {
        root: cfg.root.clone(),
        root_named: cfg.root_named.clone(),
        op: cfg.op,
        spec: cfg.spec.clone(),
        jobs: cfg.jobs,
        out: cfg.out.clone(),
        manifest: cfg.manifest.clone(),
        manifest_dir: None,
        failure_log: cfg.failure_log.clone(),
        level: cfg.level,
        filter: crate::config::Filter::default(),
        follow_symlinks: cfg.follow_symlinks,
        force: cfg.force,
        remove_source: cfg.remove_source,
        move_source: None,
        move_failed: None,
        durability: cfg.durability,
        max_size: cfg.max_size,
        json: cfg.json,
        quiet: cfg.quiet,
        progress: cfg.progress,
        own_files: Vec::new(),
        own_ids: Default::default(),
        service_own: None,
        confined: cfg.confined,
        sweep_out_dirs: cfg.sweep_out_dirs,
        coordinated: cfg.coordinated,
        watch: cfg.watch.as_ref().map(|w| crate::config::WatchSettings {
            lock: None,
            ..w.clone()
        }),
        // A watch pipeline keeps its state in `watch`, never here.
        incremental: None,
    })
}

/// How often STATUS= is sent when nothing changes.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// How often STATUS= is sent at most while counts change.
const STATUS_MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Runs the service until SIGINT/SIGTERM (Ok, with each pipeline's summary) or until a
/// pipeline fails (Err). `path` is the config file SIGHUP re-reads; `None` for `watch DIR`,
/// one pipeline from the command line under the same supervisor (so it speaks sd_notify too).
pub(crate) fn run(
    path: Option<&Path>,
    overrides: &Overrides,
    service: Service,
    signals: &Shutdown,
    quiet: bool,
) -> Result<Vec<(Arc<Config>, Summary)>> {
    let mut running = Vec::new();
    crate::pipeline::share_descriptors(service.pipelines.len());
    // Every pipeline's own directories and files, which each leaves out too: set before the
    // pipelines start, again whenever the set running changes.
    let own = Arc::new(own::Shared::default());
    own.set(service.pipelines.iter().map(Config::own_paths));
    for mut cfg in service.pipelines {
        cfg.service_own = Some(Arc::clone(&own));
        running.push(start(Arc::new(cfg))?);
    }
    let watched: Arc<Mutex<Vec<Watched>>> = Arc::new(Mutex::new(Vec::new()));
    let set_watched = |running: &[Running]| {
        if let Ok(mut w) = watched.lock() {
            *w = running
                .iter()
                .map(|r| (r.id, Arc::clone(&r.stats)))
                .collect();
        }
    };
    set_watched(&running);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        spawn_watchdog(interval, Arc::clone(&watched))?;
    }
    let mut ready_sent = false;
    let mut last_status = Instant::now() - STATUS_INTERVAL;
    let mut last_line = String::new();
    let mut done: Vec<(Arc<Config>, Summary)> = Vec::new();
    let mut pending: Option<Pending> = None;
    let mut waiting: Vec<Waiting> = Vec::new();
    let mut last_root_look = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Some(sig) = signals.signal() {
            notify(&[
                NotifyState::Stopping,
                NotifyState::Status("stopping: draining"),
            ]);
            for w in &waiting {
                tracing::warn!(
                    root = %w.cfg.root.display(),
                    "stopped while its pipeline waited for the watched directory to be back"
                );
            }
            let mut first_err = None;
            for r in running.drain(..) {
                match stop(r, sig) {
                    Ok((cfg, summary)) => done.push((for_summary(&cfg), summary)),
                    Err(e) => first_err = first_err.or(Some(e)),
                }
            }
            return first_err.map_or(Ok(done), Err);
        }
        if let Some(i) = running.iter().position(|r| r.handle.is_finished()) {
            let r = running.remove(i);
            // A pipeline the last reload started that stopped before it was ready: the
            // reload failed, and the configuration before it comes back.
            if let Some(p) = pending.take_if(|p| p.started.contains(&r.id)) {
                let root = r.cfg.root.clone();
                let err = match stop(r, libc::SIGTERM) {
                    Err(e) => e,
                    Ok(_) => anyhow!("the pipeline for {} stopped by itself", root.display()),
                };
                tracing::error!(
                    "reload failed, restoring the previous configuration: a new pipeline \
                     could not start: {err:#}"
                );
                let (new, kept): (Vec<_>, Vec<_>) =
                    running.drain(..).partition(|r| p.started.contains(&r.id));
                running = kept;
                for r in new {
                    if let Ok((cfg, summary)) = stop(r, libc::SIGHUP) {
                        done.push((for_summary(&cfg), summary));
                    }
                }
                let mut failed = None;
                own.set(
                    (running.iter().map(|r| r.cfg.own_paths()))
                        .chain(p.previous.iter().map(|c| c.own_paths()))
                        .chain(waiting.iter().map(|w| w.cfg.own_paths())),
                );
                for cfg in p.previous {
                    match start(cfg) {
                        Ok(r) => running.push(r),
                        Err(e) => failed = failed.or(Some(e)),
                    }
                }
                if let Some(e) = failed {
                    return Err(stop_all(&mut running, e));
                }
                set_watched(&running);
                notify(&[NotifyState::Status("reload failed; see log")]);
                ready_sent = false;
                continue;
            }
            let (identity, cfg) = (r.identity.clone(), Arc::clone(&r.cfg));
            let mut err = match stop(r, libc::SIGTERM) {
                Err(e) => e,
                Ok(_) => anyhow!("the pipeline for {} stopped by itself", cfg.root.display()),
            };
            // Stopped by a failed state or manifest write: the account of what it did is
            // still given (`watch --json` printed none).
            if let Some(stopped) = err.downcast_mut::<crate::report::Stopped>() {
                stopped.cfg = Some(for_summary(&cfg));
            }
            // A service's pipeline whose directory went waits for it; `watch DIR` alone ends,
            // as it always did (exit 1).
            if path.is_some() && err.chain().any(|e| e.is::<RootGone>()) {
                tracing::error!(
                    "{err:#}: its pipeline stopped; the other pipelines go on, and it starts \
                     again once a directory is back at {}",
                    cfg.root.display()
                );
                waiting.push(Waiting {
                    identity,
                    cfg,
                    said: false,
                });
                set_watched(&running);
                continue;
            }
            return Err(stop_all(&mut running, err));
        }
        if !waiting.is_empty() && last_root_look.elapsed() >= ROOT_LOOK_EVERY {
            last_root_look = Instant::now();
            // Judged once the directory is back (a directory above it may be missing until
            // then: found by a review, which then waited for ever), and at each look (only
            // the owners of what is above it can make it held).
            let mut back = Vec::new();
            for mut w in std::mem::take(&mut waiting) {
                if dir_id(&w.cfg.root).is_some() {
                    if path_held(&w.cfg.root) {
                        back.push(w);
                        continue;
                    }
                    if !w.said {
                        w.said = true;
                        tracing::error!(
                            root = %w.cfg.root.display(),
                            "the watched directory is back, but another user may rename it or \
                             a directory above it: its pipeline is not started again by itself \
                             (send SIGHUP)"
                        );
                    }
                }
                waiting.push(w);
            }
            for w in back {
                // Its state directory went with the root (it lay inside) or was replaced: a
                // database opened at its path now would be another, unlocked, without what
                // the pipelines recorded (found by a review). The service ends, saying so.
                let lock = w.cfg.watch.as_ref().and_then(|s| s.lock.as_ref());
                if lock.is_some_and(|l| !l.in_place()) {
                    let e = anyhow!(
                        "the state directory of the pipeline for {} was deleted or replaced \
                         while the service ran; restart the service",
                        w.cfg.root.display()
                    );
                    return Err(stop_all(&mut running, e));
                }
                // At warn, as the error it answers: the default log level shows both.
                tracing::warn!(
                    root = %w.cfg.root.display(),
                    "the watched directory is back: its pipeline starts again"
                );
                match start(w.cfg) {
                    Ok(r) => running.push(r),
                    Err(e) => return Err(stop_all(&mut running, e)),
                }
                set_watched(&running);
                ready_sent = false;
            }
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
            let loaded = load(path, overrides, quiet, true).and_then(|new| {
                // The failure log is opened once, by the logger, at start: pipelines started
                // with another would leave the one still written unguarded (read as an input
                // when it lies in a watched tree).
                if new.failure_log != service.failure_log {
                    bail!(
                        "{}: failure_log changed: it takes effect only when the service \
                         restarts",
                        path.display()
                    );
                }
                Ok(new)
            });
            match loaded {
                Err(e) => {
                    tracing::error!("reload failed, keeping the running configuration: {e:#}");
                    notify(&[
                        NotifyState::Ready,
                        NotifyState::Status("reload failed; see log"),
                    ]);
                }
                Ok(new) => {
                    let keep: HashSet<Identity> = new.pipelines.iter().map(Identity::of).collect();
                    crate::pipeline::share_descriptors(new.pipelines.len());
                    let (kept, gone): (Vec<_>, Vec<_>) =
                        running.drain(..).partition(|r| keep.contains(&r.identity));
                    running = kept;
                    // Waiting pipelines the new file still has are started by it below (its
                    // check found their directories back), those it lacks are removed: either
                    // way, their configs and what they hold go first.
                    for w in waiting.drain(..) {
                        if !keep.contains(&w.identity) {
                            tracing::info!(
                                root = %w.cfg.root.display(),
                                "waiting pipeline removed by reload"
                            );
                        }
                    }
                    let have: HashSet<Identity> =
                        running.iter().map(|r| r.identity.clone()).collect();
                    if gone.is_empty() && keep.is_subset(&have) {
                        // Nothing to stop or start (the file unchanged, or a second SIGHUP
                        // for the same change): a reload still pending stays so, and is
                        // undone if one of its pipelines cannot start (found by a review: the
                        // second SIGHUP dropped the undo, and that failure then ended the
                        // whole service).
                        tracing::info!("reload: the configuration is unchanged");
                        ready_sent = false;
                        continue;
                    }
                    // A reload before the last one's pipelines were all ready: the configs it
                    // stopped are dropped now, before the new pipelines open theirs. Those it
                    // started and this one keeps are still on trial: one that cannot start
                    // fails this reload, not the service.
                    let trial: Vec<u64> = pending.take().map(|p| p.started).unwrap_or_default();
                    let on_trial: Vec<u64> = (trial.iter().copied())
                        .filter(|id| running.iter().any(|r| r.id == *id))
                        .collect();
                    let mut failed = None;
                    let mut previous = Vec::new();
                    let roots: HashSet<&Path> =
                        new.pipelines.iter().map(|c| c.root.as_path()).collect();
                    for r in gone {
                        tracing::info!(root = %r.cfg.root.display(), "pipeline removed by reload");
                        // SIGHUP where a new pipeline watches the same directory and takes up
                        // what this one leaves unstarted (its failure-log lines say so);
                        // SIGTERM where none will.
                        let replaced = roots.contains(r.cfg.root.as_path());
                        let signal = if replaced {
                            libc::SIGHUP
                        } else {
                            libc::SIGTERM
                        };
                        let was_on_trial = trial.contains(&r.id);
                        match stop(r, signal) {
                            Ok((cfg, summary)) => {
                                done.push((for_summary(&cfg), summary));
                                previous.push(cfg);
                            }
                            // One the last reload started, still on trial, that could not
                            // start: that reload failed, and this one removes it anyway. Not
                            // the end of the service (found by a review).
                            Err(e) if was_on_trial => tracing::error!(
                                "a pipeline the previous reload started could not start, and \
                                 this reload stops it: {e:#}"
                            ),
                            Err(e) => failed = failed.or(Some(e)),
                        }
                    }
                    let mut started = on_trial;
                    // Those kept and those about to start: the new set's, before any starts.
                    own.set(new.pipelines.iter().map(Config::own_paths));
                    for mut cfg in new.pipelines {
                        if failed.is_none() && !have.contains(&Identity::of(&cfg)) {
                            cfg.service_own = Some(Arc::clone(&own));
                            match start(Arc::new(cfg)) {
                                Ok(r) => {
                                    started.push(r.id);
                                    running.push(r);
                                }
                                Err(e) => failed = Some(e),
                            }
                        }
                    }
                    // Whatever went wrong, the pipelines still running drain before the exit.
                    if let Some(e) = failed {
                        return Err(stop_all(&mut running, e));
                    }
                    set_watched(&running);
                    pending = Some(Pending { started, previous });
                    ready_sent = false;
                }
            }
        }
        let all_ready = |p: &Pending| {
            running
                .iter()
                .filter(|r| p.started.contains(&r.id))
                .all(|r| r.stats.ready.load(Ordering::Relaxed))
        };
        if pending.as_ref().is_some_and(all_ready) {
            // The reload is done: the configs it stopped, and their descriptors, go.
            pending = None;
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
        let status = status_line(&running, waiting.len());
        let since = last_status.elapsed();
        if since >= STATUS_INTERVAL || status != last_line && since >= STATUS_MIN_INTERVAL {
            last_status = Instant::now();
            notify(&[NotifyState::Status(&status)]);
            last_line = status;
        }
    }
}

/// "2 pipelines: queued 0, in flight 0, retrying 0, done 12, skipped 0, failed 1", with
/// ", 1 waiting for its directory" after the pipelines when one is (`Waiting`).
fn status_line(running: &[Running], waiting: usize) -> String {
    let sum = |f: fn(&Stats) -> u64| running.iter().map(|r| f(&r.stats)).sum::<u64>();
    let mut s = String::new();
    let waiting = match waiting {
        0 => String::new(),
        1 => ", 1 waiting for its directory".to_string(),
        n => format!(", {n} waiting for their directories"),
    };
    let _ = write!(
        s,
        "{} {}{waiting}: queued {}, in flight {}, retrying {}, done {}, skipped {}, failed {}",
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity of the one pipeline in a config file made of `watch_table`.
    fn identity_of(dir: &Path, watch_table: &str) -> Identity {
        let file = dir.join("filepipe.toml");
        let text = format!(
            "state_dir = \"state\"\n[[watch]]\npath = \"in\"\nop = \"sha256\"\n{watch_table}\n"
        );
        std::fs::write(&file, text).unwrap();
        let service = load(&file, &Overrides::default(), true, false).unwrap();
        Identity::of(&service.pipelines[0])
    }

    /// A root is held where nobody else may rename it or what is above it: a directory
    /// writable by others only if sticky, and then the entry below it ours (a review had
    /// another user's root, made in a sticky directory, started again by itself).
    #[test]
    fn a_root_is_held_only_where_no_other_user_may_rename_it() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let set = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let top = tmp.path().join("top");
        let root = top.join("in");
        std::fs::create_dir_all(&root).unwrap();
        set(tmp.path(), 0o755);
        set(&top, 0o755);
        let held_above = path_held(tmp.path());
        assert_eq!(path_held(&root), held_above);
        if !held_above {
            eprintln!("SKIPPED: the temp directory's own parents are not held here");
            return;
        }
        set(&top, 0o777);
        assert!(!path_held(&root), "a parent others may write");
        set(&top, 0o1777);
        assert!(path_held(&root), "sticky, and the root ours");
        if rustix::process::geteuid().is_root() {
            let nobody = Some(rustix::process::Uid::from_raw(65534));
            rustix::fs::chown(&root, nobody, None).unwrap();
            assert!(!path_held(&root), "sticky, and the root another user's");
            set(&top, 0o755);
            assert!(
                path_held(&root),
                "another user's root in a parent only we may write"
            );
        }
        assert!(!path_held(&top.join("missing")));
    }

    #[test]
    fn a_reload_restarts_a_pipeline_when_anything_it_runs_with_changes_even_a_glob() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("in")).unwrap();
        let plain = identity_of(tmp.path(), "");
        assert_eq!(plain, identity_of(tmp.path(), ""), "unchanged: kept");
        for changed in [
            "exclude = [\"*.log\"]",
            "exclude = [\"*.tmp\"]",
            "include = [\"*.log\"]",
            "settle_ms = 1000",
            "poll_secs = 30",
            "manifest = \"SUMS\"",
        ] {
            assert_ne!(plain, identity_of(tmp.path(), changed), "{changed}");
        }
        assert_ne!(
            identity_of(tmp.path(), "exclude = [\"*.log\"]"),
            identity_of(tmp.path(), "exclude = [\"*.txt\"]")
        );
    }
}
