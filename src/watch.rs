//! Watch mode: the long-running source, and the sink that makes its results durable.
//!
//! Invariants: a file is taken only after it was closed after writing (or renamed into the tree,
//! or found by a scan) and its size and mtime then stayed unchanged for the settle time; a new
//! directory is scanned after its watch exists, so files created before are not lost; a queue
//! overflow triggers a full rescan reconciled against the state, so nothing is lost and nothing
//! done is redone; paths are coalesced while they wait, so a burst costs memory per distinct
//! path, never per event, and the job channel stays bounded; a path is never in flight twice.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{Receiver, Select, Sender, TryRecvError, TrySendError};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher as _};

use crate::cli::OpKind;
use crate::config::Config;
use crate::error::Kind;
use crate::pipeline;
use crate::report::{self, Disposition, Sink, Summary};
use crate::signals::Shutdown;
use crate::state::{self, Reader, Stamp, State};
use crate::travel::{BatchFill, Event, Job, Msg, Outcome, Stats};
use crate::walk::{self, Found};

/// After taking events, how long the watcher lets the next ones gather (see `Watch::run`).
const COALESCE: Duration = Duration::from_millis(1);

/// Path-keyed maps: foldhash is several times faster than std's SipHash on paths, and its
/// per-process random seed still keeps crafted file names from forcing collisions.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type Set<K> = HashSet<K, foldhash::fast::RandomState>;

/// The longest the watcher sleeps: bounds how late it notices a shutdown or a vanished root.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// What the sink tells the watcher once a file's outcome is committed to the state.
#[derive(Debug)]
pub struct Finished {
    /// The file, relative to the root.
    pub rel: PathBuf,
    /// Try again after this long (a transient failure with attempts left).
    pub retry_after: Option<Duration>,
}

/// Runs watch mode until a shutdown signal (Ok) or a fatal watcher error (Err). `stats` is
/// shared with whoever reports on the daemon (the service supervisor); `stats.ready` is raised
/// once the watches are in place and the initial scan is queued.
pub fn run(cfg: &Config, shutdown: &Shutdown, stats: &Stats) -> Result<Summary> {
    let settings = cfg.watch.as_ref().context("watch settings missing")?;
    let op = cfg.op.as_str();
    let state = State::open(&settings.state_dir, &cfg.root, op)?;
    let reader = State::reader(&settings.state_dir, &cfg.root, op)?;
    let (feedback_tx, feedback_rx) = crossbeam_channel::unbounded();
    let parts = Mutex::new(Some((reader, feedback_rx)));
    let source = |jobs: &Sender<Msg>, events: &Sender<Event>, stats: &Stats| {
        let taken = parts.lock().ok().and_then(|mut p| p.take());
        let (reader, feedback_rx) = taken.context("the watch source runs once")?;
        let (notify_tx, notify_rx) = crossbeam_channel::unbounded();
        // Watches first, then the initial scan: a file created in between is seen by both,
        // and coalesced, rather than by neither. One watch per directory, each added by the
        // scan just before it lists that directory: notify's recursive mode would walk (and
        // stat every file of) each new subtree itself, on top of our own scan.
        let mut watcher = notify::RecommendedWatcher::new(notify_tx, watcher_config())
            .context("starting the file system watcher")?;
        watcher
            .watch(&cfg.root, RecursiveMode::NonRecursive)
            .map_err(|e| watch_error(&cfg.root, e))?;
        let mut w = Watch {
            cfg,
            settle: settings.settle,
            stats,
            shutdown,
            reader,
            watcher,
            jobs,
            events,
            pending: Map::default(),
            ready: VecDeque::new(),
            ready_set: Map::default(),
            in_flight: BTreeSet::new(),
            redo: Set::default(),
            retries: Vec::new(),
            removals: Vec::new(),
            scans: 0,
            quiet_until: Instant::now(),
            deadlines: BinaryHeap::new(),
            scanned: VecDeque::new(),
            scanned_set: Set::default(),
        };
        w.run(&notify_rx, &feedback_rx)
    };
    let mut sink = StateSink {
        cfg,
        state,
        feedback: feedback_tx,
        finished: Vec::new(),
        in_transaction: false,
        // Written at start, so it exists (and is current) before the first change.
        dirty_since: keeps_manifest(cfg).then(Instant::now),
        manifest_written: None,
        manifest_cost: Duration::ZERO,
        last_outcome: None,
    };
    pipeline::run_op(cfg, shutdown, &source, &mut sink, stats)
}

/// The events watch mode acts on. Not opens and reads: every read, the workers' own included,
/// would otherwise cost an event, and they fill the same kernel queue whose overflow forces a
/// rescan.
fn watcher_config() -> notify::Config {
    use notify::EventKindMask as K;
    notify::Config::default()
        .with_event_kinds(K::CREATE | K::REMOVE | K::ALL_MODIFY | K::ACCESS_CLOSE)
}

/// A clear, actionable message for watch failures.
fn watch_error(root: &Path, e: notify::Error) -> anyhow::Error {
    if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unreadable here".into())
        };
        // Since Linux 5.11 the user namespace's own limit applies too, whichever is lower.
        let global = read("/proc/sys/fs/inotify/max_user_watches");
        let userns = read("/proc/sys/user/max_inotify_watches");
        return anyhow::anyhow!(
            "cannot watch every directory under {}: the inotify watch limit is exhausted \
             (fs.inotify.max_user_watches = {global}, user.max_inotify_watches = {userns}); \
             raise it, e.g. 'sysctl fs.inotify.max_user_watches=1048576' (and in /etc/sysctl.d/ \
             to keep it)",
            root.display()
        );
    }
    anyhow::anyhow!("cannot watch {}: {e}", root.display())
}

/// Whether a scan follows lost events (a queue overflow), which changes what it may assume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lost {
    /// Events are complete: a pending file is still being written.
    Nothing,
    /// The kernel dropped events: any pending file may have been closed since.
    Events,
}

/// A path waiting for its writer to finish.
#[derive(Debug)]
struct Pending {
    /// The last event (or check) that reset the settle clock.
    since: Instant,
    /// Size/mtime/inode at that moment: it must be the same after the settle time.
    stamp: Option<Stamp>,
    /// Closed after writing or renamed in: only such files are taken.
    complete: bool,
    /// Appeared with no write through its name since (`IN_CREATE` alone): linked in whole
    /// (`ln`, `cp -l`, an `O_TMPFILE` linked by its writer), which no close event reports, or
    /// created by a writer that has not written yet. Taken once it has content (or other
    /// names) that stays unchanged for the settle time; any write makes it an ordinary
    /// incomplete file, waiting for its close.
    linked: bool,
    /// A writer closed it since it was last taken: it is taken again even if its stamp is the
    /// one the state has (see the close event).
    closed: bool,
}

struct Watch<'a> {
    cfg: &'a Config,
    settle: Duration,
    stats: &'a Stats,
    shutdown: &'a Shutdown,
    reader: Reader,
    /// Owned here so new directories can be watched before they are scanned.
    watcher: notify::RecommendedWatcher,
    jobs: &'a Sender<Msg>,
    events: &'a Sender<Event>,
    pending: Map<PathBuf, Pending>,
    ready: VecDeque<PathBuf>,
    /// The paths in `ready`, so a burst is coalesced in O(1) per path, with the stamp each
    /// settled with (the worker checks it).
    ready_set: Map<PathBuf, Option<Stamp>>,
    /// Ordered, so "is anything under this directory in flight" is one range lookup: a
    /// deletion burst then costs a lookup per removal, not a scan of everything in flight.
    in_flight: BTreeSet<PathBuf>,
    /// Paths that changed again while in flight: look again when they come back.
    redo: Set<PathBuf>,
    retries: Vec<(Instant, PathBuf)>,
    /// Deletions waiting for files under them that are in flight (see `forget`).
    removals: Vec<PathBuf>,
    /// Scans so far.
    scans: u64,
    /// Events are not waited for before this (see `COALESCE`).
    quiet_until: Instant,
    /// When complete pending files are due, earliest first, so a wake-up looks only at those
    /// (not at every waiting path: that made a 100,000-file burst quadratic). Entries go stale
    /// when a file is touched again; `promote` skips those.
    deadlines: BinaryHeap<Reverse<(Instant, PathBuf)>>,
    /// Files found by scans, due in the order found, with the stamp the scan saw.
    scanned: VecDeque<(Instant, PathBuf, Option<Stamp>)>,
    /// The paths in `scanned`: a file two overlapping scans find is queued once.
    scanned_set: Set<PathBuf>,
}

impl Watch<'_> {
    fn run(
        &mut self,
        notify_rx: &Receiver<notify::Result<notify::Event>>,
        feedback: &Receiver<Vec<Finished>>,
    ) -> Result<()> {
        walk::clean_own_dirs(self.cfg, self.stats);
        self.scan(&self.cfg.root.clone(), Lost::Nothing)?;
        self.stats.ready.store(true, Ordering::Relaxed);
        let mut last_root_check = Instant::now();
        loop {
            if self.shutdown.requested() {
                return Ok(());
            }
            self.stats.loop_ticks.fetch_add(1, Ordering::Relaxed);
            // Sleep until the next file is due (bounded, for shutdown and the root check).
            let now = Instant::now();
            let next = [
                self.deadlines.peek().map(|Reverse((at, _))| *at),
                self.scanned.front().map(|(at, _, _)| *at),
            ];
            let wait = next
                .into_iter()
                .flatten()
                .min()
                .map_or(MAX_WAIT, |at| at.saturating_duration_since(now))
                .clamp(Duration::from_millis(1), MAX_WAIT);
            // Wake for an event, a commit, or room in the job channel while files are ready:
            // the workers then never wait on the watcher's other work for their next batch.
            // Right after taking events, not for the next ones for COALESCE: a writer's stream
            // of events then costs a wake-up per batch, not one per event on both threads.
            let listen = now >= self.quiet_until;
            let wait = if listen {
                wait
            } else {
                wait.min(self.quiet_until - now)
            };
            {
                let mut sel = Select::new();
                if listen {
                    sel.recv(notify_rx);
                }
                sel.recv(feedback);
                if !self.ready.is_empty() {
                    sel.send(self.jobs);
                }
                let _ = sel.ready_timeout(wait);
            }
            if Instant::now() >= self.quiet_until {
                // One pass per burst before promoting, except that files already due go out
                // between the scans of a burst of new directories.
                let mut taken = 0;
                while taken < 4096 {
                    let ev = match notify_rx.try_recv() {
                        Ok(ev) => Ok(ev),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => Err(crossbeam_channel::RecvError),
                    };
                    taken += 1;
                    let scans = self.scans;
                    self.on_notify(ev)?;
                    if self.scans != scans {
                        self.promote()?;
                        self.dispatch()?;
                    }
                }
                if taken > 0 {
                    self.quiet_until = Instant::now() + COALESCE;
                }
            }
            for f in feedback.try_iter().flatten() {
                self.on_finished(f);
            }
            if !self.removals.is_empty() {
                self.send_removals()?;
            }
            self.promote()?;
            self.dispatch()?;
            if last_root_check.elapsed() > Duration::from_secs(1) {
                last_root_check = Instant::now();
                if !self.cfg.root.is_dir() {
                    bail!(
                        "the watched directory {} was deleted or moved",
                        self.cfg.root.display()
                    );
                }
            }
            let queued = self.pending.len() + self.scanned.len() + self.ready.len();
            self.stats.queued.store(queued as u64, Ordering::Relaxed);
            self.stats
                .in_flight
                .store(self.in_flight.len() as u64, Ordering::Relaxed);
            self.stats
                .retrying
                .store(self.retries.len() as u64, Ordering::Relaxed);
        }
    }

    fn on_notify(
        &mut self,
        ev: Result<notify::Result<notify::Event>, crossbeam_channel::RecvError>,
    ) -> Result<()> {
        match ev {
            Ok(Ok(event)) => self.on_event(event),
            Ok(Err(e)) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                Err(watch_error(&self.cfg.root, e))
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "file system watcher error");
                Ok(())
            }
            Err(_) => bail!("the file system watcher stopped"),
        }
    }

    fn send(&self, event: Event) -> Result<()> {
        self.events
            .send(event)
            .map_err(|_| anyhow!("the reporter has stopped"))
    }

    /// Watches `dir` (not its subdirectories: a scan of it watches those); harmless if it
    /// already is watched.
    fn watch(&mut self, dir: &Path) -> Result<()> {
        watch_dir(&mut self.watcher, &self.cfg.root, dir)
    }

    /// Scans `dir` (already watched by the caller), watching each directory under it before
    /// listing it: files not already settled in the state wait to be taken, and files the
    /// state knows under `dir` that no longer exist are forgotten (their deletion may have
    /// happened while filepipe was down, or been lost in an overflow).
    fn scan(&mut self, dir: &Path, lost: Lost) -> Result<()> {
        self.scans += 1;
        let under = dir.strip_prefix(&self.cfg.root).unwrap_or(Path::new(""));
        // One query for the subtree; each file found is taken out, so what is left was not.
        let mut known = self.reader.known_under(under)?;
        let (cfg, stats, shutdown) = (self.cfg, self.stats, self.shutdown);
        let watcher = &mut self.watcher;
        let mut found = Vec::new();
        let mut watch_failed = None;
        walk::scan(cfg, dir, stats, shutdown, &mut |f| {
            if let Found::Dir(d) = &f {
                if let Err(e) = watch_dir(watcher, &cfg.root, d) {
                    watch_failed = Some(e);
                    return false;
                }
            } else {
                found.push(f);
            }
            true
        });
        if let Some(e) = watch_failed {
            return Err(e);
        }
        for f in found {
            match f {
                Found::File(job, stamp) => {
                    let was = known.remove(&job.rel);
                    // The walk applied the filters and skipped filepipe's own files.
                    if ignored_name(cfg, &job.rel) || was.is_some_and(|k| k.settled(stamp)) {
                        continue;
                    }
                    self.found(job.rel, stamp, lost);
                }
                Found::Report(outcome) => {
                    let rel = match &outcome {
                        Outcome::Skipped { rel, .. }
                        | Outcome::Failed { rel, .. }
                        | Outcome::Done { rel, .. } => rel.clone(),
                    };
                    let was = known.remove(&rel);
                    // Temp-like names (filepipe's own among them) are never taken here.
                    if ignored_name(cfg, &rel) {
                        continue;
                    }
                    // Report a symlink or special file once, not at every rescan.
                    let stamp = Stamp::of(&self.cfg.root.join(&rel));
                    if matches!(outcome, Outcome::Skipped { .. })
                        && was.is_some_and(|k| k.settled(stamp))
                    {
                        continue;
                    }
                    self.stats.reported.fetch_add(1, Ordering::Relaxed);
                    self.send(Event::Finished(vec![outcome]))?;
                }
                Found::Dir(_) => {}
            }
        }
        let mut gone: Vec<PathBuf> = known.into_keys().collect();
        if lost == Lost::Events {
            // A file in flight is not in the state yet, and its deletion may be among the lost
            // events.
            gone.extend(
                self.in_flight
                    .iter()
                    .filter(|p| p.starts_with(under))
                    .cloned(),
            );
        }
        for rel in gone {
            if std::fs::symlink_metadata(self.cfg.root.join(&rel)).is_err() {
                self.forget(rel)?;
            }
        }
        Ok(())
    }

    fn settled(&self, rel: &Path, stamp: Option<Stamp>) -> Result<bool> {
        Ok(self.reader.lookup(rel)?.is_some_and(|k| k.settled(stamp)))
    }

    fn on_event(&mut self, event: notify::Event) -> Result<()> {
        if event.need_rescan() {
            tracing::warn!("the kernel's event queue overflowed: rescanning the whole tree");
            // Directories created during the overflow lost their IN_CREATE, so notify never
            // watched them: watch the whole tree again first.
            let root = self.cfg.root.clone();
            self.watch(&root)?;
            return self.scan(&root, Lost::Events);
        }
        for path in &event.paths {
            if path == &self.cfg.root {
                let gone = matches!(
                    event.kind,
                    EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                );
                if gone && !path.is_dir() {
                    bail!(
                        "the watched directory {} was deleted or moved",
                        path.display()
                    );
                }
                continue;
            }
            let Ok(rel) = path.strip_prefix(&self.cfg.root) else {
                continue;
            };
            let rel = rel.to_path_buf();
            if self.ignored(&rel, path) {
                continue;
            }
            match event.kind {
                // A new directory: watch it, then scan it, so files created in it before its
                // watch existed are not lost.
                EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(RenameMode::To))
                    if path.is_dir() =>
                {
                    self.watch(path)?;
                    self.scan(path, Lost::Nothing)?
                }
                // Renamed into place: complete by convention (write to .part, then rename).
                EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                    self.touch(rel, true, Stamp::of(path))
                }
                // Closed after writing: complete, and looked at again even if its stamp is
                // the one already done (writes through a shared mapping change no stamp, and
                // the mapping's end is this close).
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                    self.touch(rel.clone(), true, Stamp::of(path));
                    if let Some(p) = self.pending.get_mut(&rel) {
                        p.closed = true;
                    }
                }
                // chmod, touch, chown: the writer may be done (install, curl -R), or not.
                EventKind::Modify(ModifyKind::Metadata(_)) => self.touched_metadata(rel, path),
                EventKind::Create(_) => self.appeared(rel),
                EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any | ModifyKind::Other) => {
                    self.touch(rel, false, None)
                }
                EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
                    self.forget(rel)?
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Records activity on `rel`; `complete` if it was closed after writing or renamed in.
    fn touch(&mut self, rel: PathBuf, complete: bool, stamp: Option<Stamp>) {
        let now = Instant::now();
        if complete {
            self.deadlines
                .push(Reverse((now + self.settle, rel.clone())));
        }
        let p = self.pending.entry(rel).or_insert(Pending {
            since: now,
            stamp: None,
            complete: false,
            linked: false,
            closed: false,
        });
        p.since = now;
        // A new write after a close makes it incomplete again until the next close.
        p.complete = complete;
        p.stamp = stamp;
        p.linked = false;
    }

    /// A new name in the tree (`IN_CREATE`): a writer starting, or a file linked in whole. It
    /// waits as `linked` until a write says which (see `Pending::linked`); nothing is stat'ed
    /// here, so a burst of created files costs no more than before.
    fn appeared(&mut self, rel: PathBuf) {
        let now = Instant::now();
        self.deadlines
            .push(Reverse((now + self.settle, rel.clone())));
        self.pending.insert(
            rel,
            Pending {
                since: now,
                stamp: None,
                complete: false,
                linked: true,
                closed: false,
            },
        );
    }

    /// A metadata change restarts the settle clock but says nothing about whether the writer is
    /// done: a waiting file keeps its state; any other file is looked at again (the state
    /// tells whether it really changed).
    fn touched_metadata(&mut self, rel: PathBuf, path: &Path) {
        let stamp = Stamp::of(path);
        match self.pending.get_mut(&rel) {
            Some(p) if p.linked => {
                // Still nothing written: settle again from now.
                p.since = Instant::now();
                p.stamp = None;
                self.deadlines.push(Reverse((p.since + self.settle, rel)));
            }
            waiting => {
                let complete = waiting.is_none_or(|p| p.complete);
                self.touch(rel, complete, stamp);
            }
        }
    }

    /// A file found by a scan: complete unless events say it is still being written. After an
    /// overflow, events cannot say so (the close may be what was lost), so the scan is trusted
    /// and the settle time alone guards against a writer still at work.
    fn found(&mut self, rel: PathBuf, stamp: Option<Stamp>, lost: Lost) {
        if stamp.is_none() {
            // Vanished since the listing: its removal event follows.
            return;
        }
        // Already on its way (a scan of an enclosing directory raced this one, or an overflow
        // rescan): the state does not know it yet, so only these sets can tell.
        if self.in_flight.contains(&rel) {
            if lost == Lost::Events {
                // It may have changed unseen: look again once it is back.
                self.redo.insert(rel);
            }
            return;
        }
        if let Some(waiting) = self.ready_set.get_mut(&rel) {
            *waiting = stamp;
            return;
        }
        if lost == Lost::Events {
            self.pending.remove(&rel);
        } else if self.pending.contains_key(&rel) {
            return;
        }
        if !self.scanned_set.insert(rel.clone()) {
            return;
        }
        // A queue of its own, not `pending`: scanned files settle in the order found, so a
        // 100,000-file scan costs a push and a pop each rather than map and heap updates.
        self.scanned
            .push_back((Instant::now() + self.settle, rel, stamp));
    }

    /// `rel` (a file, or a directory and everything under it) is gone: it leaves the queues,
    /// the state and the manifest. While a file under it is in flight, the removal waits for
    /// that file's outcome to be committed, or the outcome would bring the file back.
    fn forget(&mut self, rel: PathBuf) -> Result<()> {
        self.pending.remove(&rel);
        if !self.retries.is_empty() {
            self.retries.retain(|(_, p)| !p.starts_with(&rel));
        }
        // Its entries in `ready` and `scanned` are skipped once it is out of their sets.
        self.ready_set.remove(&rel);
        self.scanned_set.remove(&rel);
        if in_flight_under(&self.in_flight, &rel) {
            self.removals.push(rel);
            return Ok(());
        }
        self.send(Event::Removed(rel))
    }

    /// Moves settled, complete files to the ready queue.
    fn promote(&mut self) -> Result<()> {
        let now = Instant::now();
        while self.scanned.front().is_some_and(|(at, _, _)| *at <= now) {
            let Some((_, rel, stamp)) = self.scanned.pop_front() else {
                break;
            };
            // An event since the scan put it in `pending`, which now decides; otherwise it was
            // not touched for the whole settle time (and the worker checks `stamp`). The scan
            // already found it unsettled in the state. Out of the set: forgotten since.
            if !self.scanned_set.remove(&rel) || self.pending.contains_key(&rel) {
                continue;
            }
            if self.ready_set.insert(rel.clone(), stamp).is_none() {
                self.ready.push_back(rel);
            }
        }
        while self
            .deadlines
            .peek()
            .is_some_and(|Reverse((at, _))| *at <= now)
        {
            let Some(Reverse((at, rel))) = self.deadlines.pop() else {
                break;
            };
            let Some(p) = self.pending.get_mut(&rel) else {
                continue;
            };
            // Touched again since this entry was queued (a newer one stands), or reopened.
            if !(p.complete || p.linked) || p.since + self.settle != at {
                continue;
            }
            if p.linked && !p.complete {
                // No write through its name for a whole settle time. Linked in whole if it
                // has content (or other names); then it must stay exactly so for one more
                // settle time, as a closed file must.
                let now_stamp = rustix::fs::lstat(self.cfg.root.join(&rel))
                    .ok()
                    .filter(|st| {
                        rustix::fs::FileType::from_raw_mode(st.st_mode)
                            == rustix::fs::FileType::RegularFile
                            && (st.st_size > 0 || st.st_nlink > 1)
                    });
                let now_stamp = now_stamp.map(|st| Stamp::from_stat(&st));
                match (p.stamp, now_stamp) {
                    // Unchanged across the settle time: as good as closed.
                    (Some(then), Some(now)) if then == now => p.complete = true,
                    // First look, or changed by something no event reported: look again.
                    (_, Some(now)) => {
                        p.stamp = Some(now);
                        p.since = Instant::now();
                        self.deadlines.push(Reverse((p.since + self.settle, rel)));
                        continue;
                    }
                    // Empty with one name (a writer that has not written yet) or gone:
                    // events decide from here.
                    (_, None) => {
                        p.linked = false;
                        continue;
                    }
                }
            }
            // No event for the whole settle time: unchanged since `p.stamp` was taken (the
            // worker's first fstat checks that against `expect`).
            let Some(p) = self.pending.remove(&rel) else {
                continue;
            };
            if p.stamp.is_none() {
                // Vanished before its stamp was taken: its removal event follows.
                continue;
            }
            if p.closed || !self.settled(&rel, p.stamp)? {
                // Already waiting: only its stamp is newer.
                if self.ready_set.insert(rel.clone(), p.stamp).is_none() {
                    self.ready.push_back(rel);
                }
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.retries = later;
        for (_, rel) in due {
            let stamp = Stamp::of(&self.cfg.root.join(&rel));
            if stamp.is_some() {
                self.touch(rel, true, stamp);
            }
        }
        Ok(())
    }

    /// Sends ready files to the workers without ever blocking: a full channel just means they
    /// wait here, coalesced, while events keep being read.
    fn dispatch(&mut self) -> Result<()> {
        // The watcher is the only sender, so a channel with room now still has it at the send:
        // a batch is never built only to be taken apart again.
        while !self.ready.is_empty() && !self.jobs.is_full() {
            // Batches as in batch mode (`BatchFill`), so the deeper queue never holds much
            // more than small files.
            let mut batch = Vec::new();
            let mut fill = BatchFill::default();
            while !fill.full() {
                let Some(front) = self.ready.front() else {
                    break;
                };
                let size = self
                    .ready_set
                    .get(front)
                    .copied()
                    .flatten()
                    .map_or(0, |s| s.size);
                if !fill.takes(size) {
                    break;
                }
                let Some(rel) = self.ready.pop_front() else {
                    break;
                };
                // Not in the set: forgotten (deleted) while it waited here.
                let Some(expect) = self.ready_set.remove(&rel) else {
                    continue;
                };
                // Written to again since it settled: it waits for a new settle time.
                if self.pending.contains_key(&rel) {
                    continue;
                }
                if self.in_flight.contains(&rel) {
                    self.redo.insert(rel);
                    continue;
                }
                // An output filepipe itself made for this file may be replaced when the file
                // changes; anyone else's never is.
                let replace = self.cfg.op == OpKind::Gzip
                    && self
                        .reader
                        .lookup(&rel)?
                        .is_some_and(|k| k.status == state::FileStatus::Done);
                self.in_flight.insert(rel.clone());
                fill.add(size);
                batch.push(Job {
                    abs: self.cfg.root.join(&rel),
                    rel,
                    replace,
                    expect,
                });
            }
            if batch.is_empty() {
                return Ok(());
            }
            let n = batch.len() as u64;
            match self.jobs.try_send(Msg::Jobs(batch)) {
                Ok(()) => {
                    self.stats.files.fetch_add(n, Ordering::Relaxed);
                }
                Err(TrySendError::Full(Msg::Jobs(batch))) => {
                    for job in batch.into_iter().rev() {
                        self.in_flight.remove(&job.rel);
                        self.ready_set.insert(job.rel.clone(), job.expect);
                        self.ready.push_front(job.rel);
                    }
                    return Ok(());
                }
                Err(TrySendError::Full(Msg::Shutdown)) => bail!("a sentinel was sent early"),
                Err(TrySendError::Disconnected(_)) => bail!("the workers have stopped"),
            }
        }
        Ok(())
    }

    /// Sends the removals that waited for files now committed.
    fn send_removals(&mut self) -> Result<()> {
        for rel in std::mem::take(&mut self.removals) {
            if in_flight_under(&self.in_flight, &rel) {
                self.removals.push(rel);
            } else {
                self.send(Event::Removed(rel))?;
            }
        }
        Ok(())
    }

    fn on_finished(&mut self, fb: Finished) {
        self.in_flight.remove(&fb.rel);
        if let Some(after) = fb.retry_after {
            self.retries.push((Instant::now() + after, fb.rel.clone()));
        }
        if !self.redo.is_empty() && self.redo.remove(&fb.rel) {
            // Something happened to it while it was read (a close among it): looked at again
            // whatever its stamp says.
            let stamp = Stamp::of(&self.cfg.root.join(&fb.rel));
            self.touch(fb.rel.clone(), true, stamp);
            if let Some(p) = self.pending.get_mut(&fb.rel) {
                p.closed = true;
            }
        }
    }

    /// Paths never taken: writers' temp files, filepipe's own files and outputs, and what the
    /// filters leave out. `abs` is `rel` under the root.
    fn ignored(&self, rel: &Path, abs: &Path) -> bool {
        ignored_name(self.cfg, rel)
            || walk::is_own(self.cfg, abs)
            || self.cfg.filter.excluded(rel)
            || !self.cfg.filter.included(rel) && !abs.is_dir()
            || anonymous(abs)
    }
}

/// Whether `rel` or anything under it is in `in_flight`. Paths order component by component,
/// so everything under `rel` sorts right after it: the first path from `rel` on tells.
fn in_flight_under(in_flight: &BTreeSet<PathBuf>, rel: &Path) -> bool {
    in_flight
        .range::<Path, _>((std::ops::Bound::Included(rel), std::ops::Bound::Unbounded))
        .next()
        .is_some_and(|p| p.starts_with(rel))
}

/// Watches `dir` alone (a scan watches its subdirectories); harmless if it already is watched.
fn watch_dir(watcher: &mut notify::RecommendedWatcher, root: &Path, dir: &Path) -> Result<()> {
    match watcher.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => Err(watch_error(root, e)),
        // Gone again already: its removal event follows.
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot watch");
            Ok(())
        }
    }
}

/// Names never taken whatever the filters say: writers' temp files and (gzip) outputs.
fn ignored_name(cfg: &Config, rel: &Path) -> bool {
    let name = rel.file_name().unwrap_or(OsStr::new("")).as_bytes();
    let temp_like = [&b".part"[..], b".tmp", b".crdownload", b"~"]
        .iter()
        .any(|s| name.ends_with(s))
        || name.starts_with(b".#");
    temp_like || cfg.op == OpKind::Gzip && name.ends_with(b".gz")
}

/// Whether an event's path is an anonymous file's (`O_TMPFILE`, filepipe's own temps among
/// them): the kernel reports writes to one, and its close, under a made-up name `#<inode>`
/// that no directory holds. Such a file is seen when it is linked in (`IN_CREATE`).
fn anonymous(abs: &Path) -> bool {
    let name = abs.file_name().unwrap_or(OsStr::new("")).as_bytes();
    name.len() > 1
        && name[0] == b'#'
        && name[1..].iter().all(u8::is_ascii_digit)
        && std::fs::symlink_metadata(abs).is_err()
}

/// The output of `rel` (gzip).
fn gz_name(rel: &Path) -> PathBuf {
    let mut o = rel.as_os_str().to_os_string();
    o.push(".gz");
    PathBuf::from(o)
}

/// Whether the sink keeps a manifest: sha256 with `--manifest`.
fn keeps_manifest(cfg: &Config) -> bool {
    cfg.manifest.is_some() && cfg.op == OpKind::Sha256
}

/// Records outcomes in the state, tells the watcher, and keeps the manifest current.
struct StateSink<'a> {
    cfg: &'a Config,
    state: State,
    feedback: Sender<Vec<Finished>>,
    finished: Vec<Finished>,
    in_transaction: bool,
    /// When the manifest first differed from the state since it was last written.
    dirty_since: Option<Instant>,
    manifest_written: Option<Instant>,
    /// How long the last rewrite took (it grows with the state, not with the change).
    manifest_cost: Duration,
    last_outcome: Option<Instant>,
}

/// The manifest is rewritten whole (from the state) once outcomes pause for `MANIFEST_QUIET`,
/// at most every `MANIFEST_INTERVAL`: a burst costs one rewrite at its end instead of one a
/// second in the middle of it, competing with the workers. A steady stream never pauses, so a
/// change waits at most `MANIFEST_STALE`, or ten times the last rewrite's duration if longer:
/// rewriting a manifest of millions of files then takes at most a tenth of the reporter's time.
const MANIFEST_INTERVAL: Duration = Duration::from_secs(1);
/// See `MANIFEST_INTERVAL`.
const MANIFEST_QUIET: Duration = Duration::from_millis(200);
/// See `MANIFEST_INTERVAL`.
const MANIFEST_STALE: Duration = Duration::from_secs(2);

/// Whether a manifest that has differed from the state since `dirty_since` is rewritten at
/// `now` (see `MANIFEST_INTERVAL`): `written` is the last rewrite, `last_outcome` the last
/// change, `cost` how long the last rewrite took.
fn manifest_due(
    now: Instant,
    dirty_since: Instant,
    written: Option<Instant>,
    last_outcome: Option<Instant>,
    cost: Duration,
) -> bool {
    let rested = written.is_none_or(|t| now - t >= MANIFEST_INTERVAL);
    let quiet = last_outcome.is_none_or(|t| now - t >= MANIFEST_QUIET);
    let overdue = now - dirty_since >= MANIFEST_STALE.max(cost * 10);
    rested && (quiet || overdue)
}

impl StateSink<'_> {
    fn begin(&mut self) -> Result<()> {
        if !self.in_transaction {
            self.state.begin()?;
            self.in_transaction = true;
        }
        Ok(())
    }

    /// The manifest no longer matches the state.
    fn changed(&mut self) {
        if keeps_manifest(self.cfg) {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
    }

    fn write_manifest(&mut self) -> Result<()> {
        if !keeps_manifest(self.cfg) {
            return Ok(());
        }
        let started = Instant::now();
        let digests = self.state.digests()?;
        report::write_manifest(self.cfg, digests.iter().map(|(p, d)| (p.as_slice(), d)))?;
        self.dirty_since = None;
        self.manifest_written = Some(Instant::now());
        self.manifest_cost = started.elapsed();
        Ok(())
    }
}

impl Sink for StateSink<'_> {
    fn outcome(&mut self, outcome: &Outcome) -> Result<Disposition> {
        self.begin()?;
        self.last_outcome = Some(Instant::now());
        let (rel, retry_after) = match outcome {
            // Deleted before it could be read: gone, like a deletion seen as an event (a file
            // deleted while in flight is recorded, then removed: the watcher holds its removal
            // back until this outcome is committed).
            Outcome::Failed { rel, error: e } | Outcome::Skipped { rel, reason: e }
                if e.kind == Kind::Vanished =>
            {
                self.state.remove(rel)?;
                self.changed();
                (rel, None)
            }
            Outcome::Done { rel, done } => {
                let output = (self.cfg.op == OpKind::Gzip).then(|| gz_name(rel));
                self.state
                    .done(rel, done.stamp, output.as_deref(), done.digest.as_ref())?;
                if done.digest.is_some() {
                    self.changed();
                }
                (rel, None)
            }
            // Not started because of a shutdown: left for the next start, nothing to record.
            Outcome::Skipped { rel, reason } if reason.kind == Kind::Interrupted => (rel, None),
            // Its output is already in place (a run stopped between the publish and the
            // commit, or an identical output published meanwhile): done, so that a later
            // change of the file replaces that output as filepipe's own.
            Outcome::Skipped { rel, reason } if reason.kind == Kind::UpToDate => {
                let stamp = Stamp::of(&self.cfg.root.join(rel));
                let output = gz_name(rel);
                self.state.done(rel, stamp, Some(&output), None)?;
                (rel, None)
            }
            Outcome::Skipped { rel, reason } => {
                // With its stamp, so the next scan knows it is settled unless it changes.
                let stamp = Stamp::of(&self.cfg.root.join(rel));
                self.state
                    .not_done(rel, state::FileStatus::Skipped, stamp, reason)?;
                // It may have been done before: its line leaves the manifest.
                self.changed();
                (rel, None)
            }
            Outcome::Failed { rel, error } => {
                let stamp = Stamp::of(&self.cfg.root.join(rel));
                let attempts = self
                    .state
                    .not_done(rel, state::FileStatus::Failed, stamp, error)?;
                self.changed();
                // A file in use is waited for as long as its writer keeps it open.
                let retry = state::transient(error.kind)
                    && (attempts < state::MAX_ATTEMPTS || error.kind == Kind::InUse);
                // 1 s, 2 s, 4 s ... between attempts, at most about a minute.
                (
                    rel,
                    retry.then(|| Duration::from_secs(1 << (attempts - 1).min(6))),
                )
            }
        };
        let disposition = if retry_after.is_some() {
            Disposition::Retry
        } else {
            Disposition::Final
        };
        self.finished.push(Finished {
            rel: rel.clone(),
            retry_after,
        });
        Ok(disposition)
    }

    fn removed(&mut self, rel: &Path) -> Result<()> {
        self.begin()?;
        // A deletion burst (rm -r) is a burst too: the rewrite waits for its end.
        self.last_outcome = Some(Instant::now());
        self.state.remove(rel)?;
        self.changed();
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.in_transaction {
            self.state.commit()?;
            self.in_transaction = false;
        }
        // Only after the commit: the watcher then never sees a file as finished that a crash
        // right now would make the state forget.
        if !self.finished.is_empty() {
            // One message per committed batch: a burst must not wake the watcher per file.
            let _ = self.feedback.send(std::mem::take(&mut self.finished));
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        let Some(dirty_since) = self.dirty_since else {
            return Ok(());
        };
        let now = Instant::now();
        if manifest_due(
            now,
            dirty_since,
            self.manifest_written,
            self.last_outcome,
            self.manifest_cost,
        ) {
            self.write_manifest()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.flush()?;
        if self.dirty_since.is_some() {
            self.write_manifest()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_under_finds_the_path_or_anything_below_it_and_nothing_else() {
        let set: BTreeSet<PathBuf> = ["a/b/c", "a.txt", "a-1/x", "b"]
            .iter()
            .map(PathBuf::from)
            .collect();
        for (rel, want) in [
            ("a", true),
            ("a/b", true),
            ("a/b/c", true),
            ("a/b/c/d", false),
            ("a/x", false),
            ("a.txt", true),
            ("a-1", true),
            ("a-", false),
            ("b", true),
            ("", true),
            ("c", false),
        ] {
            assert_eq!(in_flight_under(&set, Path::new(rel)), want, "{rel}");
        }
    }

    #[test]
    fn the_manifest_waits_for_a_pause_but_never_longer_than_it_may_go_stale() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let cheap = Duration::from_millis(5);
        // A lone change: rewritten once outcomes pause for MANIFEST_QUIET.
        assert!(!manifest_due(ms(100), ms(0), None, Some(ms(0)), cheap));
        assert!(manifest_due(ms(200), ms(0), None, Some(ms(0)), cheap));
        // A steady stream (an outcome every 100 ms) never pauses: rewritten once the change
        // is MANIFEST_STALE old, not before.
        assert!(!manifest_due(ms(1900), ms(0), None, Some(ms(1850)), cheap));
        assert!(manifest_due(ms(2000), ms(0), None, Some(ms(1950)), cheap));
        // Never twice within MANIFEST_INTERVAL, however quiet.
        assert!(!manifest_due(
            ms(2500),
            ms(2100),
            Some(ms(2000)),
            Some(ms(2100)),
            cheap
        ));
        assert!(manifest_due(
            ms(3000),
            ms(2100),
            Some(ms(2000)),
            Some(ms(2100)),
            cheap
        ));
        // A manifest that takes 0.5 s to rewrite goes stale for up to ten times that.
        let dear = Duration::from_millis(500);
        assert!(!manifest_due(
            ms(4900),
            ms(0),
            Some(ms(0)),
            Some(ms(4850)),
            dear
        ));
        assert!(manifest_due(
            ms(5000),
            ms(0),
            Some(ms(0)),
            Some(ms(4950)),
            dear
        ));
    }
}
