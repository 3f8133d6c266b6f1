//! Watch mode's source: notify events and scans in, settled files out to the workers, as jobs.
//!
//! Invariants: a file is taken only after it was closed after writing (or renamed into the tree,
//! or found by a scan) and its size and mtime then stayed unchanged for the settle time
//! (`settle`); a new directory is scanned after its watch exists, so files created before are
//! not lost; a queue overflow triggers a full rescan reconciled against the state, so nothing is
//! lost and nothing done is redone; paths are coalesced while they wait, so a burst costs
//! memory per distinct path, never per event, and the job channel stays bounded; a path is
//! never in flight twice (`flight`).
//!
//! The parts: `events` says what each notify event means, `settle` decides when a file is
//! ready, `flight` keeps the books on files the workers have, and `Watch::run` below is the
//! loop that selects over events, recorded outcomes and room in the job channel.

mod events;
mod flight;
mod settle;
mod temps;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{Receiver, Select, Sender, TryRecvError, TrySendError};
use notify::{RecursiveMode, Watcher as _};
use rustix::fs::{FileType, OFlags};
use rustix::io::Errno;

use crate::config::Config;
use crate::fsio::input::Root;
use crate::signals::Shutdown;
use crate::source::recorded;
use crate::source::walk::{self, Found};
use crate::source::{Outlet, Source};
use crate::state::{FileStatus, Lacks, Reader};
use crate::travel::{BatchFill, Event, Job, Msg, Outcome, Recorded, Stamp, Stats};

use events::{
    anonymous, ignored_name, output_named, temp_like, watch_dir, watch_error, Change, Watched,
};
use flight::Flight;
use settle::{Look, Lost, Settle};
use temps::Temps;

/// After taking events, how long the watcher lets the next ones gather (see `Watch::run`).
const COALESCE: Duration = Duration::from_millis(1);

/// The longest the watcher sleeps: bounds how late it notices a shutdown or a vanished root.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Watch mode's source: runs until a shutdown is requested (Ok) or a fatal watcher error
/// (Err). `stats.ready` is raised once the watches are in place and the initial scan is queued.
pub(crate) struct Watch<'a> {
    cfg: &'a Config,
    settle: Duration,
    /// Rescan the whole tree this often (`--poll`).
    poll: Option<Duration>,
    shutdown: &'a Shutdown,
    /// The state, read (the sink writes it through its own connection).
    reader: Reader,
}

impl<'a> Watch<'a> {
    /// A watcher of `cfg.root` (which must have watch settings) reading `reader`.
    pub(crate) fn new(cfg: &'a Config, reader: Reader, shutdown: &'a Shutdown) -> Result<Self> {
        let settings = cfg.watch.as_ref().context("watch settings missing")?;
        Ok(Watch {
            cfg,
            settle: settings.settle,
            poll: settings.poll,
            shutdown,
            reader,
        })
    }
}

impl Source for Watch<'_> {
    fn listens(&self) -> bool {
        true
    }

    fn run(&mut self, out: Outlet<'_>) -> Result<()> {
        let recorded = out
            .recorded
            .context("the watcher must hear of recorded outcomes")?;
        // Bounded, and never blocking notify's thread (which our thread may be waiting on to
        // add a watch): events that find it full are dropped and the drop is said in `dropped`,
        // taken as the kernel's own overflow is, by a rescan. Unbounded, a process touching
        // a few names in a loop grew it by the event, not by the file: 1 GB in 30 s (found
        // by a review).
        let (tx, notify_rx) = crossbeam_channel::bounded(EVENTS_HELD);
        let dropped = Arc::new(AtomicBool::new(false));
        let notify_tx = Handler {
            tx,
            dropped: Arc::clone(&dropped),
        };
        // Watches first, then the initial scan: a file created in between is seen by both,
        // and coalesced, rather than by neither. One watch per directory, each added by the
        // scan just before it lists that directory: notify's recursive mode would walk (and
        // stat every file of) each new subtree itself, on top of our own scan.
        match (events::unseen_writers(&self.cfg.root), self.poll) {
            (Some(fs), None) => tracing::warn!(
                root = %self.cfg.root.display(),
                "the watched directory is on {fs}: changes made by other hosts (or beneath the \
                 mount) make no events here and would be missed; add --poll SECS (poll_secs in \
                 the config) to rescan on an interval"
            ),
            (Some(fs), Some(every)) => tracing::info!(
                root = %self.cfg.root.display(),
                "the watched directory is on {fs}: rescanning every {} s",
                every.as_secs()
            ),
            (None, _) => {}
        }
        let mut watcher = notify::RecommendedWatcher::new(notify_tx, events::watcher_config())
            .map_err(events::watcher_error)?;
        // The directory at the root's path first, then its watch, then the same directory
        // still: a root going or swapped as the pipeline starts is `RootGone`, as it is once
        // running (a service waits for it: a root made and removed in a loop ended the whole
        // service with "No path was found", found by a review).
        let gone = || anyhow::Error::from(RootGone(self.cfg.root.clone()));
        let root_id = root_id(&self.cfg.root).map_err(|_| gone())?;
        let mut limited = BTreeSet::new();
        match watcher.watch(&self.cfg.root, RecursiveMode::NonRecursive) {
            Ok(()) => {}
            // Even the root past the limit: the whole tree is scanned on an interval.
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                limited.insert(self.cfg.root.clone());
            }
            Err(e) => {
                return Err(match self::root_id(&self.cfg.root) {
                    Ok(id) if id == root_id => watch_error(&self.cfg.root, e),
                    _ => gone(),
                })
            }
        }
        if self::root_id(&self.cfg.root).ok() != Some(root_id) {
            return Err(gone());
        }
        let mut w = Watcher {
            root_id,
            cfg: self.cfg,
            stats: out.stats,
            shutdown: self.shutdown,
            reader: &self.reader,
            watcher,
            jobs: out.jobs,
            events: out.events,
            settle: Settle::new(self.settle),
            flight: Flight::default(),
            scans: 0,
            quiet_until: Instant::now(),
            poll: self.poll,
            unwatched: Default::default(),
            denied: Default::default(),
            dropped,
            overflowed: false,
            blocked: BTreeSet::new(),
            out_root: None,
            temps: Temps::default(),
            temps_quiet: temps::quiet_for(self.settle),
            limited,
            limit_said: false,
            limited_every: (self.settle * 100)
                .clamp(Duration::from_secs(1), Duration::from_secs(60)),
            unread: None,
        };
        w.run(&notify_rx, &recorded)
    }
}

/// Why a watch ended: the watched directory is no longer at its path (deleted, moved, or
/// replaced by another directory or a symlink). A service waits for a directory to be back
/// there and starts the pipeline again; its other pipelines go on meanwhile.
#[derive(Debug, thiserror::Error)]
#[error("the watched directory {} was deleted or moved", .0.display())]
pub(crate) struct RootGone(pub(crate) PathBuf);

/// The device and inode of the directory at `root` itself (a symlink there is not followed).
fn root_id(root: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(root)?;
    if !m.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    Ok((m.dev(), m.ino()))
}

/// The running watcher.
struct Watcher<'a> {
    /// The watched directory's device and inode at the start: the root is in place only while
    /// its path leads to that very directory, with no symlink (`root_in_place`).
    root_id: (u64, u64),
    cfg: &'a Config,
    stats: &'a Stats,
    shutdown: &'a Shutdown,
    reader: &'a Reader,
    /// Owned here so new directories can be watched before they are scanned.
    watcher: notify::RecommendedWatcher,
    jobs: &'a Sender<Msg>,
    events: &'a Sender<Event>,
    settle: Settle,
    flight: Flight,
    /// Scans so far.
    scans: u64,
    /// Events are not waited for before this (see `COALESCE`).
    quiet_until: Instant,
    /// Rescan the whole tree this often (`--poll`).
    poll: Option<Duration>,
    /// Directories found that could not be watched (no permission to read them): tried again
    /// when their attributes change.
    unwatched: std::collections::BTreeSet<PathBuf>,
    /// Watched directories that could not be wholly read for want of permission (one its user
    /// may list but not search: its files cannot be looked at): scanned again when a change
    /// of their attributes (a `chmod`, a `chown`, an ACL) lets the daemon read and search
    /// them, not at a mere `touch`, nor at a change that still does not, which anyone who
    /// may change it could repeat to fill the failure log (found by a review).
    denied: BTreeSet<PathBuf>,
    /// Events were dropped, the channel from notify full (see `Handler`).
    dropped: Arc<AtomicBool>,
    /// The kernel's event queue overflowed since the last rescan for lost events.
    overflowed: bool,
    /// With `--out`: files that failed because another file holds their output's name,
    /// looked at every `BLOCKED_EVERY` (see `outputs_freed`).
    blocked: BTreeSet<PathBuf>,
    /// The output root, opened at the first look for freed names.
    out_root: Option<Root>,
    /// Files named like a writer's temp, never taken, reported once left unchanged for
    /// `temps_quiet` (see `temps`).
    temps: Temps,
    temps_quiet: Duration,
    /// Directories not watched because the inotify watch limit is reached: each scanned
    /// (and tried again) every `limited_every` at most, or four times the last such scan's
    /// duration if longer (found by a review: anyone who may make directories in the tree
    /// could exhaust the limit, which ended the daemon, and under the shipped units restarted
    /// it into the same end over and over).
    limited: BTreeSet<PathBuf>,
    /// The limit was said to be reached (once, until every directory is watched again).
    limit_said: bool,
    limited_every: Duration,
    /// While `read_again` scans a directory: the paths the scan reported failed, to tell
    /// whether it read that one.
    unread: Option<std::collections::HashSet<PathBuf>>,
}

/// How often the writers' temps followed (`Watcher::temps`) are looked at.
const TEMPS_EVERY: Duration = Duration::from_secs(1);

/// How often the output names of files another file blocked (`Watcher::blocked`) are looked
/// at: a stat each, for what is usually a handful of files.
const BLOCKED_EVERY: Duration = Duration::from_secs(2);

/// Events held between notify's thread and the watcher's at most: some 10 MB.
const EVENTS_HELD: usize = 65_536;

/// Hands notify's events to the watcher's thread without ever blocking notify's: one that
/// finds the channel full is dropped, and `dropped` says so.
struct Handler {
    tx: crossbeam_channel::Sender<notify::Result<notify::Event>>,
    dropped: Arc<AtomicBool>,
}

impl notify::EventHandler for Handler {
    fn handle_event(&mut self, event: notify::Result<notify::Event>) {
        if let Err(crossbeam_channel::TrySendError::Full(_)) = self.tx.try_send(event) {
            self.dropped.store(true, Ordering::Relaxed);
        }
    }
}

/// What the settle queue looks at when a file comes due: the tree and the state.
struct Disk<'a> {
    root: &'a Path,
    reader: &'a Reader,
    /// The files found that cannot be looked at (see `stampless`), for the watcher to look
    /// at their directories again later.
    hidden: std::cell::RefCell<Vec<PathBuf>>,
}

impl Look for Disk<'_> {
    fn linked(&self, rel: &Path) -> Option<Stamp> {
        rustix::fs::lstat(self.root.join(rel))
            .ok()
            .filter(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
                    && (st.st_size > 0 || st.st_nlink > 1)
            })
            .map(|st| Stamp::from_stat(&st))
    }

    fn stamp(&self, rel: &Path) -> Option<Stamp> {
        rustix::fs::lstat(self.root.join(rel))
            .ok()
            .filter(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            })
            .map(|st| Stamp::from_stat(&st))
    }

    fn settled(&self, rel: &Path, stamp: Option<Stamp>) -> Result<bool> {
        Ok(self.reader.lookup(rel)?.is_some_and(|k| k.settled(stamp)))
    }

    fn stampless(&self, rel: &Path) -> bool {
        match rustix::fs::lstat(self.root.join(rel)) {
            Ok(st) => !matches!(
                rustix::fs::FileType::from_raw_mode(st.st_mode),
                rustix::fs::FileType::RegularFile | rustix::fs::FileType::Directory
            ),
            Err(rustix::io::Errno::NOENT) => false,
            Err(_) => {
                self.hidden.borrow_mut().push(rel.to_path_buf());
                true
            }
        }
    }
}

impl Watcher<'_> {
    /// Notes that `rel` (a directory, or a file in one) could not be read for want of
    /// permission: its directory is scanned again once the daemon may enter it (`denied`).
    fn denied_at(&mut self, rel: &Path) {
        let path = self.cfg.root.join(rel);
        let dir = match is_real_dir(&path) {
            true => Some(path.as_path()),
            false => path.parent(),
        };
        if let Some(dir) = dir {
            self.denied.insert(dir.to_path_buf());
        }
    }

    /// Fails the run if the watched directory is no longer at its path: deleted, moved, or
    /// replaced (by a symlink to elsewhere, say: found by a review, where `is_dir`, which
    /// follows it, saw nothing wrong, and the rescans scanned the link's target outside the
    /// root and emptied the manifest). RELIABILITY case 23.
    fn root_in_place(&self) -> Result<()> {
        match root_id(&self.cfg.root) {
            Ok(id) if id == self.root_id => Ok(()),
            _ => Err(RootGone(self.cfg.root.clone()).into()),
        }
    }

    fn run(
        &mut self,
        notify_rx: &Receiver<notify::Result<notify::Event>>,
        recorded: &Receiver<Vec<Recorded>>,
    ) -> Result<()> {
        walk::clean_own_dirs(self.cfg, self.stats);
        self.scan(&self.cfg.root.clone(), Lost::Nothing)?;
        self.stats.ready.store(true, Ordering::Relaxed);
        let mut last_root_check = Instant::now();
        let mut last_blocked_check = Instant::now();
        let mut last_temps_check = Instant::now();
        let mut next_limited_scan = Instant::now() + self.limited_every;
        let mut next_drop_rescan = Instant::now();
        let mut last_poll = Instant::now();
        loop {
            if self.shutdown.requested() {
                return Ok(());
            }
            self.stats.loop_ticks.fetch_add(1, Ordering::Relaxed);
            // Sleep until the next file is due (bounded, for shutdown and the root check).
            let now = Instant::now();
            let wait = self
                .settle
                .next_due()
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
                sel.recv(recorded);
                if self.settle.has_ready() {
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
                // Events lost, our channel full or the kernel's queue overflowed: once what
                // the channel holds is applied (it came before the loss), the tree is
                // rescanned. Not more often than every few seconds (a rescan costs the whole
                // tree, and each one reads the files in flight again): a process touching
                // names in a loop filled it every 0.2 s and the daemon rescanned without end
                // (found by a review); the kernel's overflows, each one queued after a
                // rescan's own reads, are held to the same pace.
                let lost = self.dropped.load(Ordering::Relaxed) || self.overflowed;
                if lost && Instant::now() >= next_drop_rescan {
                    // What it holds now: a flood still under way would keep it full.
                    for _ in 0..notify_rx.len() {
                        match notify_rx.try_recv() {
                            Ok(ev) => self.on_notify(Ok(ev))?,
                            Err(_) => break,
                        }
                    }
                    if std::mem::take(&mut self.overflowed) {
                        tracing::warn!(
                            "the kernel's event queue overflowed: rescanning the whole tree"
                        );
                    }
                    if self.dropped.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            "events came faster than they were read and some were dropped: \
                             rescanning the whole tree"
                        );
                    }
                    let started = Instant::now();
                    self.rescan_lost()?;
                    next_drop_rescan =
                        Instant::now() + (started.elapsed() * 4).max(Duration::from_secs(5));
                }
            }
            for r in recorded.try_iter().flatten() {
                self.on_recorded(&r);
            }
            for rel in self.flight.removals_due() {
                self.removal_due(rel)?;
            }
            if self.poll.is_some_and(|every| last_poll.elapsed() >= every) {
                // Writers on other hosts make no events here: look at the whole tree, as
                // after an overflow, reconciled against the state. The interval runs from the
                // end of a scan, so a tree that takes longer to scan is not scanned back to
                // back.
                let root = self.cfg.root.clone();
                let started = Instant::now();
                self.watch(&root);
                self.scan(&root, Lost::Unseen)?;
                crate::report::metrics::rescan(self.cfg, "poll");
                tracing::debug!(scans = self.scans, took = ?started.elapsed(), "polled");
                last_poll = Instant::now();
            }
            self.promote()?;
            self.dispatch()?;
            if last_root_check.elapsed() > Duration::from_secs(1) {
                last_root_check = Instant::now();
                self.root_in_place()?;
            }
            if !self.blocked.is_empty() && last_blocked_check.elapsed() >= BLOCKED_EVERY {
                last_blocked_check = Instant::now();
                self.outputs_freed();
            }
            if !self.limited.is_empty() && Instant::now() >= next_limited_scan {
                let started = Instant::now();
                self.scan_limited()?;
                next_limited_scan =
                    Instant::now() + (started.elapsed() * 4).max(self.limited_every);
            }
            if !self.temps.is_empty() && last_temps_check.elapsed() >= TEMPS_EVERY {
                last_temps_check = Instant::now();
                self.temps_left()?;
            }
            let stats = self.stats;
            stats
                .queued
                .store(self.settle.queued() as u64, Ordering::Relaxed);
            stats
                .in_flight
                .store(self.flight.len() as u64, Ordering::Relaxed);
            stats
                .retrying
                .store(self.flight.retrying() as u64, Ordering::Relaxed);
        }
    }

    fn on_notify(
        &mut self,
        ev: Result<notify::Result<notify::Event>, crossbeam_channel::RecvError>,
    ) -> Result<()> {
        match ev {
            Ok(Ok(event)) => self.on_event(event),
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
    /// Whether it is watched now (see `watch_dir`); one that is not is in `unwatched`, or in
    /// `limited` past the inotify watch limit.
    fn watch(&mut self, dir: &Path) -> bool {
        let watched = watch_dir(&mut self.watcher, dir, self.cfg.follow_symlinks);
        set_aside(watched, dir, &mut self.unwatched, &mut self.limited);
        if watched == Watched::Limit {
            self.limit_reached();
        }
        watched == Watched::Yes
    }

    /// Says, once, that the inotify watch limit is reached.
    fn limit_reached(&mut self) {
        if !std::mem::replace(&mut self.limit_said, true) {
            tracing::warn!("{}", events::limit_reached(&self.cfg.root));
        }
    }

    /// Scans the directories past the inotify watch limit (`limited`), each tried again first
    /// (watches freed since by deleted directories are taken), as a poll scans the tree:
    /// reconciled against the state.
    fn scan_limited(&mut self) -> Result<()> {
        let all = std::mem::take(&mut self.limited);
        // A directory's scan covers those under it.
        let mut tops: Vec<PathBuf> = Vec::new();
        for d in all {
            if !tops.last().is_some_and(|t| d.starts_with(t)) {
                tops.push(d);
            }
        }
        for d in tops {
            if !is_real_dir(&d) {
                continue;
            }
            self.watch(&d);
            self.scan(&d, Lost::Unseen)?;
        }
        crate::report::metrics::rescan(self.cfg, "watch-limit");
        if self.limited.is_empty() && self.limit_said {
            self.limit_said = false;
            tracing::info!(root = %self.cfg.root.display(), "every directory is watched again");
        }
        Ok(())
    }

    /// Scans `dir` (already watched by the caller), watching each directory under it before
    /// listing it: files not already settled in the state wait to be taken, and files the
    /// state knows under `dir` that no longer exist are forgotten (their deletion may have
    /// happened while filepipe was down, or been lost in an overflow).
    fn scan(&mut self, dir: &Path, lost: Lost) -> Result<()> {
        // The scan goes by path: not once the root's path leads elsewhere.
        self.root_in_place()?;
        self.scans += 1;
        let under = dir.strip_prefix(&self.cfg.root).unwrap_or(Path::new(""));
        // One query for the subtree; each file found is taken out, so what is left was not.
        let mut known = self.reader.known_under(under)?;
        let (cfg, stats, shutdown) = (self.cfg, self.stats, self.shutdown);
        let watcher = &mut self.watcher;
        let (unwatched, limited) = (&mut self.unwatched, &mut self.limited);
        let mut found = Vec::new();
        let mut at_limit = false;
        walk::scan(cfg, dir, stats, shutdown, &mut |f| {
            if let Found::Dir(d) = &f {
                let watched = watch_dir(watcher, d, cfg.follow_symlinks);
                set_aside(watched, d, unwatched, limited);
                at_limit |= watched == Watched::Limit;
            } else {
                found.push(f);
            }
            true
        });
        if at_limit {
            self.limit_reached();
        }
        let now = Instant::now();
        for f in found {
            match f {
                Found::File(rel, stamp) => {
                    let was = known.remove(&rel);
                    // A settled file whose output went while nobody watched (filepipe down,
                    // or events lost) is taken, to make it again as a batch would. Not at a
                    // poll: it would look for every output every few seconds.
                    // Nor a file done before a `max_size` it is over was set: the workers
                    // skip it, and it leaves the manifest, as a fresh start would have it.
                    let settled = was.is_some_and(|k| {
                        k.settled(stamp)
                            && (lost == Lost::Unseen
                                || !recorded::output_gone(cfg, &k, &rel, stamp))
                            && !(k.any_done() && recorded::over_max_size(cfg, stamp))
                    });
                    // The walk applied the filters and skipped filepipe's own files.
                    if settled || self.not_taken(&rel) {
                        if !settled && self.writer_temp(&rel) {
                            self.temps.found(&rel, stamp, now);
                        }
                        continue;
                    }
                    self.found(rel, stamp, lost, now);
                }
                Found::Report(outcome) => {
                    let rel = match &outcome {
                        Outcome::Skipped { rel, .. }
                        | Outcome::Failed { rel, .. }
                        | Outcome::Done { rel, .. } => rel.clone(),
                    };
                    if let (Some(unread), Outcome::Failed { .. }) = (&mut self.unread, &outcome) {
                        unread.insert(rel.clone());
                    }
                    if let Outcome::Failed { error, .. } = &outcome {
                        if error.kind == crate::error::Kind::PermissionDenied {
                            // The directory itself, or the one a file of it is in.
                            self.denied_at(&rel);
                        }
                    }
                    let was = known.remove(&rel);
                    // Temp-like names (filepipe's own among them) are never taken here.
                    if self.not_taken(&rel) {
                        continue;
                    }
                    // Report a symlink, a special file or an unreadable directory once, not at
                    // every rescan (with --poll, every few seconds).
                    let stamp = Stamp::of(&self.cfg.root.join(&rel));
                    if matches!(outcome, Outcome::Skipped { .. } | Outcome::Failed { .. })
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
        if lost != Lost::Nothing {
            // A file in flight is not in the state yet, and its deletion may be among the lost
            // (or never made) events.
            gone.extend(self.flight.under(under).cloned());
        }
        let mut unlisted = Vec::new();
        for rel in gone {
            // Gone, not merely hidden: a file whose directory lets it be listed but not
            // looked at was forgotten, and reported again from scratch (found by a review).
            // Looked at beneath the root, no symlink followed: a directory above it swapped
            // for a link leads out of the tree (found by a review: its row stayed, and whether
            // it did told the tree's owner what was there outside).
            match lstat_in_tree(&self.cfg.root.join(&rel)) {
                // No longer there, or a directory above it is a file now.
                Err(Errno::NOENT | Errno::NOTDIR) => {
                    self.forget(rel)?;
                }
                // A directory now, reached only through a symlink now, or no longer selected
                // (the filters changed since): no longer a file of the tree, as an
                // incremental batch has it. Its row alone goes, by its exact path: the files
                // in a directory that took its name are rows of their own, found by this scan
                // (found by a review: the rows stayed, and the manifest listed a directory).
                // One in flight ends first.
                r if !self.flight.contains(&rel)
                    && match r {
                        Ok(st) => {
                            FileType::from_raw_mode(st.st_mode).is_dir()
                                || !selected(self.cfg, &rel)
                        }
                        Err(e) => crate::fsio::canonical::is_symlink_on_path(e),
                    } =>
                {
                    self.settle.forget(&rel);
                    unlisted.push(rel);
                }
                _ => {}
            }
        }
        if !unlisted.is_empty() {
            self.send(Event::Unlisted(unlisted))?;
        }
        Ok(())
    }

    /// A file found by a scan.
    fn found(&mut self, rel: PathBuf, stamp: Option<Stamp>, lost: Lost, now: Instant) {
        // Already on its way (a scan of an enclosing directory raced this one, or an overflow
        // rescan): the state does not know it yet, so only the books can tell.
        if stamp.is_some() && self.flight.contains(&rel) {
            // It may have changed unseen: look again once it is back. Not after a poll: a
            // file in flight for longer than the interval would be redone at every poll; the
            // next poll finds a real change against the state.
            if lost == Lost::Events {
                self.flight.redo(rel, true);
            }
            return;
        }
        self.settle.found(rel, stamp, lost, now);
    }

    /// Events were lost (the kernel's queue overflowed, or ours was full): the whole tree is
    /// watched and scanned again, reconciled against the state.
    fn rescan_lost(&mut self) -> Result<()> {
        crate::report::metrics::rescan(self.cfg, "overflow");
        // Directories created during the overflow lost their IN_CREATE, so notify never
        // watched them: watch the whole tree again first.
        let root = self.cfg.root.clone();
        self.watch(&root);
        let before = self.flight.redo_count();
        self.scan(&root, Lost::Events)?;
        // Said, with how many, so that a count of done files one more than the files for
        // each of these is not taken for a file processed twice by mistake.
        let again = self.flight.redo_count().saturating_sub(before);
        if again > 0 {
            tracing::warn!(
                files = again,
                "files being read when the events were lost are read again once back, \
                 whatever their stamp (a write through a shared mapping changes none): \
                 each counts done twice"
            );
        }
        Ok(())
    }

    fn on_event(&mut self, event: notify::Event) -> Result<()> {
        if event.need_rescan() {
            // Rescanned by the loop, at most every few seconds (see `run`).
            self.overflowed = true;
            return Ok(());
        }
        for path in &event.paths {
            if path == &self.cfg.root {
                if events::root_gone(&event.kind) {
                    self.root_in_place()?;
                }
                continue;
            }
            let Ok(rel) = path.strip_prefix(&self.cfg.root) else {
                continue;
            };
            let rel = rel.to_path_buf();
            if self.ignored(&rel, path) {
                let change = events::change(&event.kind, || false);
                // A writer's stream of events on its temp costs a map update each, not a
                // look at what the name is (`writer_temp` stats it) each.
                if change.is_some() && change != Some(Change::Gone) {
                    let now = Instant::now();
                    if !self.temps.touched(&rel, now) && self.writer_temp(&rel) {
                        self.temps.changed(&rel, now);
                    }
                }
                if change == Some(Change::Gone) {
                    self.output_freed(&rel)?;
                    // What went may have been a directory of that name, whose files were
                    // taken: forgotten with it (nothing to forget for a file of that name).
                    if ignored_name(self.cfg, &rel) && !walk::is_own(self.cfg, path) {
                        self.forget(rel)?;
                    }
                }
                continue;
            }
            let is_dir = || events::is_new_dir(self.cfg, path, &rel);
            let Some(change) = events::change(&event.kind, is_dir) else {
                continue;
            };
            let now = Instant::now();
            match change {
                // One of filepipe's own directories (a move or output directory) renamed or
                // mounted into the tree: never watched, or each moved file or output made in
                // it would be taken again, for ever (found by a review). The walk's scans
                // leave such a directory out too.
                Change::NewDir if own_dir(self.cfg, path) => {}
                Change::NewDir => {
                    self.watch(path);
                    self.scan(path, Lost::Nothing)?
                }
                Change::RenamedIn => self.settle.touch(rel, true, Stamp::of(path), now),
                Change::Closed => {
                    self.settle.touch(rel.clone(), true, Stamp::of(path), now);
                    self.settle.closed(&rel);
                }
                Change::Metadata if is_real_dir(path) => {
                    // A directory's own attributes: no file to take (it was sent to the
                    // workers, and skipped as a special file). One that could not be watched
                    // when it came (no permission yet: `umask 077`, then `chmod`) is tried
                    // again now: its files were never seen (found by a review).
                    // Scanned only once watched: each failed try would report the directory
                    // again, and anyone who may touch it could fill the failure log (found
                    // by a review).
                    // So is one that could not be wholly read (`denied`), once the daemon may
                    // enter it: not at a change that still keeps it out.
                    let watched = self.unwatched.remove(path) && self.watch(path);
                    let opened = self.denied.contains(path) && may_enter(path);
                    if opened {
                        self.denied.remove(path);
                    }
                    if watched || opened {
                        self.scan(path, Lost::Nothing)?;
                    }
                }
                Change::Metadata => self.settle.touched_metadata(rel, Stamp::of(path), now),
                Change::Created => self.settle.appeared(rel, now),
                Change::Written => self.settle.touch(rel, false, None, now),
                Change::Gone => {
                    // Ordered: what is under `path` is one range (a retain over all of them
                    // at each deletion was quadratic: found by a review).
                    if !self.limited.is_empty() {
                        self.limited.retain(|d| !d.starts_with(path));
                    }
                    if !self.denied.is_empty() {
                        self.denied.retain(|d| !d.starts_with(path));
                    }
                    if !self.unwatched.is_empty() {
                        let under: Vec<PathBuf> = self
                            .unwatched
                            .range::<Path, _>((
                                std::ops::Bound::Included(path.as_path()),
                                std::ops::Bound::Unbounded,
                            ))
                            .take_while(|d| d.starts_with(path))
                            .cloned()
                            .collect();
                        for d in under {
                            self.unwatched.remove(&d);
                        }
                    }
                    if path.symlink_metadata().is_ok() {
                        // There again by now: an event older than what is there (a file
                        // deleted and made anew at once, or events applied after a rescan
                        // that lost some). Forgotten, a file made anew was never done (found
                        // by a review). Held back like any removal while something at or
                        // under it is in flight (its outcome would bring back a row of what
                        // went): `removal_due` looks again once it is recorded.
                        if self.flight.forget(&rel) {
                            self.there_again(rel)?
                        }
                    } else {
                        self.forget(rel)?
                    }
                }
            }
        }
        Ok(())
    }

    /// `rel`, deleted or moved away, may be the name of the op's output next to an input: if
    /// that input's output failed (a file another hand put at the name stood in the way,
    /// `output-exists`), it is taken again now that the name is free, as the user who moved
    /// that file away means it to be, not only at the daemon's next start or the input's next
    /// change. An output made and then deleted is not made again here (a user may archive
    /// outputs while the watch runs); a restart's scan makes it, as a batch would.
    fn output_freed(&mut self, rel: &Path) -> Result<()> {
        let Some(compressor) = self
            .cfg
            .spec
            .compressor()
            .filter(|_| self.cfg.out.is_none())
        else {
            return Ok(());
        };
        let suffix = compressor.suffix().unwrap_or_default().as_bytes();
        let name = rel.file_name().unwrap_or_default().as_bytes();
        let Some(stem) = name.strip_suffix(suffix).filter(|s| !s.is_empty()) else {
            return Ok(());
        };
        let input = rel.with_file_name(OsStr::from_bytes(stem));
        let abs = self.cfg.root.join(&input);
        if self.flight.contains(&input) || self.ignored(&input, &abs) {
            return Ok(());
        }
        if !std::fs::symlink_metadata(&abs).is_ok_and(|m| m.is_file()) {
            return Ok(());
        }
        let failed = self.reader.lookup(&input)?.is_some_and(|k| {
            k.record(compressor)
                .is_some_and(|r| r.status == FileStatus::Failed)
        });
        if failed {
            tracing::debug!(path = %input.display(), "its output's name was freed: taken again");
            // As a touch of it (`touched_metadata`): a file its writer is still writing (a
            // write since, no close yet) keeps waiting for the close; another settles now.
            self.settle
                .touched_metadata(input.clone(), Stamp::of(&abs), Instant::now());
            self.take_again(&input);
        }
        Ok(())
    }

    /// A file whose output's name was freed (`touched_metadata` just now) is taken once it
    /// settles whatever the state says: its failures for the name may have used up its
    /// attempts (`--poll` tries it at each rescan), and the state then counts it settled for
    /// good, so it was never taken again (found by a review).
    fn take_again(&mut self, rel: &Path) {
        self.settle.closed(rel);
    }

    /// `rel` failed because another file held its output's name next to it, and that name
    /// may have been freed before the failure was recorded: its removal event came while the
    /// file was still in flight, and `output_freed` passed it over (found by CI). Taken again
    /// if the name is free now; if not, its removal's event is still to come, and the failure
    /// is recorded by then.
    fn output_free_already(&mut self, rel: &Path, now: Instant) {
        let Some(output) = self.cfg.spec.compressor().and_then(|c| c.output_name(rel)) else {
            return;
        };
        let gone = matches!(
            std::fs::symlink_metadata(self.cfg.root.join(output)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound
        );
        let abs = self.cfg.root.join(rel);
        if gone && std::fs::symlink_metadata(&abs).is_ok_and(|m| m.is_file()) {
            tracing::debug!(path = %rel.display(), "its output's name was freed: taken again");
            let stamp = Stamp::of(&abs);
            // As in `output_freed`: a file still being written keeps waiting for its close.
            self.settle.touched_metadata(rel.to_path_buf(), stamp, now);
            self.take_again(rel);
        }
    }

    /// With `--out`, a file whose output's name another file held (`blocked`) is taken again
    /// once that name is free, as `output_freed` takes one next to its input: the output tree
    /// makes no events here, so the names are looked at, beneath the output root's descriptor
    /// (no link followed). Before, such a file waited for the daemon's next start or the
    /// input's next change.
    fn outputs_freed(&mut self) {
        let (Some(out), Some(compressor)) = (&self.cfg.out, self.cfg.spec.compressor()) else {
            self.blocked.clear();
            return;
        };
        if self.out_root.is_none() {
            match Root::new(out) {
                Ok(root) => self.out_root = Some(root),
                Err(e) => {
                    tracing::debug!(dir = %out.display(), error = %e, "output root not opened yet");
                    return;
                }
            }
        }
        let Some(root) = &self.out_root else { return };
        let freed: Vec<PathBuf> = self
            .blocked
            .iter()
            .filter(|rel| {
                compressor
                    .output_name(rel)
                    .is_some_and(|o| matches!(root.lstat(&o), Err(rustix::io::Errno::NOENT)))
            })
            .cloned()
            .collect();
        let now = Instant::now();
        for rel in freed {
            self.blocked.remove(&rel);
            let abs = self.cfg.root.join(&rel);
            if self.flight.contains(&rel) || self.ignored(&rel, &abs) {
                continue;
            }
            let stamp = Stamp::of(&abs);
            if stamp.is_none() {
                continue;
            }
            tracing::debug!(path = %rel.display(), "its output's name was freed: taken again");
            // As in `output_freed`: a file still being written keeps waiting for its close.
            self.settle.touched_metadata(rel.clone(), stamp, now);
            self.take_again(&rel);
        }
    }

    /// `rel` (a file, or a directory and everything under it) is gone: it leaves the queues,
    /// the state and the manifest. While a file under it is in flight, the removal waits for
    /// that file's outcome to be recorded, or the outcome would bring the file back.
    /// A removal held back while files under `rel` were in flight, due now. What is there now
    /// decides, not what was gone then: a directory renamed away and back meanwhile, or made
    /// anew under its name, holds files done since, and the removal of everything under it
    /// deleted them from the state and the manifest (found by a review). Gone still: passed
    /// on. There again: a directory is scanned, reconciled against the state (what is gone
    /// from it is forgotten then, and what changed done); a file is looked at again.
    fn removal_due(&mut self, rel: PathBuf) -> Result<()> {
        if self.cfg.root.join(&rel).symlink_metadata().is_err() {
            return self.send(Event::Removed(rel));
        }
        self.there_again(rel)
    }

    /// `rel`, told gone (an event, or a removal held back), is there again by now: what is
    /// there decides. A directory is scanned and reconciled against the state (a file's row
    /// at its name, from before, goes); a file is looked at again (the rows of a directory of
    /// its name, from before, go). Only those rows: the ones of what is there now stay
    /// (found by a review: the path's whole range was removed, the files done since included).
    fn there_again(&mut self, rel: PathBuf) -> Result<()> {
        let path = self.cfg.root.join(&rel);
        if is_real_dir(&path) {
            self.send(Event::Unlisted(vec![rel]))?;
            // No event was lost (a file in flight is not read again for it): a directory
            // renamed away and back is watched under either name.
            return self.scan(&path, Lost::Nothing);
        }
        let under: Vec<PathBuf> = self.reader.known_under(&rel)?.into_keys().collect();
        if !under.is_empty() {
            self.send(Event::Unlisted(under))?;
        }
        self.settle
            .touch(rel, true, Stamp::of(&path), Instant::now());
        Ok(())
    }

    fn forget(&mut self, rel: PathBuf) -> Result<()> {
        self.settle.forget(&rel);
        if !self.temps.is_empty() {
            self.temps.gone(&rel);
        }
        if !self.blocked.is_empty() {
            self.blocked.retain(|p| !p.starts_with(&rel));
        }
        if self.flight.forget(&rel) {
            self.send(Event::Removed(rel))?;
        }
        Ok(())
    }

    /// Moves settled files to the ready queue, and retries that are due back to settling.
    fn promote(&mut self) -> Result<()> {
        let now = Instant::now();
        let disk = Disk {
            root: &self.cfg.root,
            reader: self.reader,
            hidden: Default::default(),
        };
        self.settle.promote(now, &disk)?;
        for rel in disk.hidden.into_inner() {
            self.denied_at(&rel);
        }
        let mut unread = Vec::new();
        for rel in self.flight.due_retries(now) {
            let path = self.cfg.root.join(&rel);
            if is_real_dir(&path) {
                unread.push(rel);
                continue;
            }
            let stamp = Stamp::of(&path);
            if stamp.is_some() {
                self.settle.touch(rel, true, stamp, now);
            }
        }
        for rel in unread {
            self.read_again(rel)?;
        }
        Ok(())
    }

    /// A directory a scan could not read (out of descriptors, an I/O error), due for another
    /// try: scanned again, never taken as a file. Taken as one, it was skipped `special-file`
    /// and its files were never listed, none of them done or failed, until a restart (found by
    /// a review, under `ulimit -n 32`). Read this time, the failure recorded under its path
    /// goes; not, that failure counts one more attempt, as a file's does.
    fn read_again(&mut self, rel: PathBuf) -> Result<()> {
        let path = self.cfg.root.join(&rel);
        self.unread = Some(Default::default());
        self.watch(&path);
        let scanned = self.scan(&path, Lost::Unseen);
        let unread = self.unread.take().unwrap_or_default();
        scanned?;
        if !unread.contains(&rel) {
            tracing::info!(dir = %rel.display(), "a directory that could not be read was read");
            self.send(Event::Unlisted(vec![rel]))?;
        }
        Ok(())
    }

    /// Sends ready files to the workers without ever blocking: a full channel just means they
    /// wait here, coalesced, while events keep being read.
    fn dispatch(&mut self) -> Result<()> {
        // The watcher is the only sender, so a channel with room now still has it at the send:
        // a batch is never built only to be taken apart again.
        while self.settle.has_ready() && !self.jobs.is_full() {
            // Batches as in batch mode (`BatchFill`), so the deeper queue never holds much
            // more than small files.
            let mut batch = Vec::new();
            let mut fill = BatchFill::default();
            while !fill.full() {
                let Some(size) = self.settle.next_size() else {
                    break;
                };
                if !fill.takes(size) {
                    break;
                }
                let Some((rel, expect)) = self.settle.pop_ready() else {
                    break;
                };
                // Asked of every file taken, so that none is left in the books.
                let closed = self.settle.closed_since(&rel);
                if self.flight.contains(&rel) {
                    // Ready again while a worker has it: taken again once back whatever its
                    // stamp only if a writer closed it meanwhile (the end of a write through a
                    // shared mapping); after a chmod or a stale event, only if it changed.
                    // Each time it is, it counts done once more (found by a review: a chmod of
                    // a file in flight had it read and counted twice, with nothing said).
                    self.flight.redo(rel, closed);
                    continue;
                }
                // An output filepipe itself made for this file may be replaced when the file
                // changes (`recorded::watch_replaces`); anyone else's never is. A file
                // with some of several results recorded for the stamp it settled with (an op
                // added to the pipeline) is read for the others only.
                let known = if self.cfg.op.compresses() || self.cfg.spec.is_multi() {
                    self.reader.lookup(&rel)?
                } else {
                    None
                };
                let replace = self.cfg.op.compresses()
                    && known
                        .as_ref()
                        .is_some_and(|k| recorded::watch_replaces(self.cfg, k, &rel, expect));
                // A recorded output no longer in place is made again (alone if the rest
                // stands), as a batch makes it.
                let stands = |made: bool| !made || recorded::output_stands(self.cfg, &rel, expect);
                let only = known.map(|k| {
                    let lacks = k.lacks(&self.cfg.spec, expect, stands);
                    recorded::judged(self.cfg, &k, &rel, lacks)
                });
                let only = match only {
                    Some(Lacks::Part(only)) => Some(Box::new(only)),
                    _ => None,
                };
                self.flight.start(rel.clone());
                fill.add(size);
                batch.push(Job {
                    abs: self.cfg.root.join(&rel),
                    rel,
                    replace,
                    expect,
                    redelivered: None,
                    only,
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
                        self.flight.unstart(&job.rel);
                        self.settle.unpop(job.rel, job.expect);
                    }
                    return Ok(());
                }
                Err(TrySendError::Full(Msg::Shutdown)) => bail!("a sentinel was sent early"),
                Err(TrySendError::Disconnected(_)) => bail!("the workers have stopped"),
            }
        }
        Ok(())
    }

    /// The sink recorded a file's outcome: it is out of flight, and is looked at again if
    /// something happened to it while it was read: whatever its stamp says after a close or
    /// lost events, else only if it changed (the state, just committed, tells).
    fn on_recorded(&mut self, r: &Recorded) {
        let now = Instant::now();
        if self.cfg.out.is_some() {
            if r.output_blocked {
                self.blocked.insert(r.rel.clone());
            } else if !self.blocked.is_empty() {
                self.blocked.remove(&r.rel);
            }
        }
        if let Some(whatever_stamp) = self.flight.recorded(r, now) {
            let stamp = Stamp::of(&self.cfg.root.join(&r.rel));
            self.settle.touch(r.rel.clone(), true, stamp, now);
            if whatever_stamp {
                self.settle.closed(&r.rel);
            }
        }
        if r.output_blocked && self.cfg.out.is_none() {
            // Out of flight now: as `output_freed` would have taken it.
            self.output_free_already(&r.rel, now);
        }
    }

    /// Paths never taken: writers' temp files, filepipe's own files and outputs, and what the
    /// filters leave out. `abs` is `rel` under the root.
    fn ignored(&self, rel: &Path, abs: &Path) -> bool {
        // Temp-like names are files' (a directory `data.tmp` or `x.gz` holds files to take, as
        // the walk takes them: it was never watched; found by a review).
        self.not_taken(rel) && !is_real_dir(abs)
            || walk::is_own(self.cfg, abs)
            || self.cfg.filter.excluded(rel)
            || !self.cfg.filter.included(rel) && !abs.is_dir()
            || anonymous(abs)
    }

    /// Whether `rel` is a file named like a writer's temp that is to be reported once left
    /// (`temps`): not filepipe's own temp (the walk reports one a stopped run left), nor a
    /// name the filters leave out. Its path is `rel` under the root.
    fn writer_temp(&self, rel: &Path) -> bool {
        let name = rel.file_name().unwrap_or_default();
        temp_like(rel)
            && !crate::fsio::output::is_temp_name(name)
            && !self.cfg.filter.excluded(rel)
            && self.cfg.filter.included(rel)
            && !walk::is_own(self.cfg, &self.cfg.root.join(rel))
    }

    /// Reports the writers' temps left unchanged for `temps_quiet` (`temps`): skipped, with
    /// the reason, once per version (the sink records the stamp, so a scan that finds it
    /// again says nothing).
    fn temps_left(&mut self) -> Result<()> {
        let now = Instant::now();
        for (rel, seen) in self.temps.due(now, self.temps_quiet) {
            let Ok(st) = rustix::fs::lstat(self.cfg.root.join(&rel)) else {
                continue;
            };
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
            {
                continue;
            }
            let stamp = Some(Stamp::from_stat(&st));
            if seen.is_some() && seen != stamp {
                // A poll saw it change since: its clock starts again.
                self.temps.found(&rel, stamp, now);
                continue;
            }
            if self.reader.lookup(&rel)?.is_some_and(|k| k.settled(stamp)) {
                continue;
            }
            let reason = crate::error::FileError::new(
                crate::error::Kind::WriterTemp,
                format!(
                    "named like a writer's temp file (*.tmp, *.part, *.crdownload, *~, .#*) and \
                     left unchanged for {} s: watch never takes such a name, which its writer \
                     renames when done; rename it to have it processed",
                    self.temps_quiet.as_secs()
                ),
            );
            self.stats.reported.fetch_add(1, Ordering::Relaxed);
            self.send(Event::Finished(vec![Outcome::Skipped { rel, reason }]))?;
        }
        Ok(())
    }

    /// Whether the file `rel` is never taken by its name: a writer's temp, or filepipe's own
    /// output next to its input. A name with the op's suffix whose input is neither beside it
    /// nor on its way is a user's file (an `x.gz` dropped in, or left by `gzip x`), taken as a
    /// batch takes it: the op skips it (`already-compressed`) or, with hashes, lists it.
    /// Where inputs leave once done (`--remove-source`, `--move-source`), every output stands
    /// alone, so no such name is taken.
    fn not_taken(&self, rel: &Path) -> bool {
        if temp_like(rel) {
            return true;
        }
        if !output_named(self.cfg, rel) {
            return false;
        }
        let cfg = self.cfg;
        cfg.remove_source
            || cfg.move_source.is_some()
            || recorded::input_of_output(cfg, rel)
                .is_some_and(|i| self.flight.contains(&i) || recorded::input_beside(cfg, &i))
    }
}

/// Keeps a directory not watched where it is looked at again: one that may not be read in
/// `unwatched` (tried when its attributes change), one past the inotify watch limit in
/// `limited` (scanned on an interval).
fn set_aside(
    watched: Watched,
    dir: &Path,
    unwatched: &mut BTreeSet<PathBuf>,
    limited: &mut BTreeSet<PathBuf>,
) {
    match watched {
        Watched::Yes => {}
        Watched::No => {
            unwatched.insert(dir.to_path_buf());
        }
        Watched::Limit => {
            limited.insert(dir.to_path_buf());
        }
    }
}

/// Whether the directory `path` leads to is one of filepipe's own, by identity.
fn own_dir(cfg: &Config, path: &Path) -> bool {
    rustix::fs::stat(path).is_ok_and(|st| cfg.is_own_dir((st.st_dev, st.st_ino)))
}

/// Whether this process may read and search the directory `path` (by its effective ids, its
/// mode and any ACL).
fn may_enter(path: &Path) -> bool {
    use rustix::fs::{Access, AtFlags, CWD};
    rustix::fs::accessat(
        CWD,
        path,
        Access::READ_OK | Access::EXEC_OK,
        AtFlags::EACCESS,
    )
    .is_ok()
}

/// Whether `path` is a directory itself (a symlink to one is not).
fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// `lstat` of `path` (beneath the canonical root), following no symlink on the way or at its
/// end: `ELOOP` or `EXDEV` where one is there now.
fn lstat_in_tree(path: &Path) -> rustix::io::Result<rustix::fs::Stat> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::fstat(crate::fsio::canonical::open(path, flags)?)
}

/// Whether the filters select the file at `rel` (relative to the root): it passes the include
/// globs, and neither it nor a directory above it is excluded (the walk does not descend into
/// an excluded directory).
fn selected(cfg: &Config, rel: &Path) -> bool {
    cfg.filter.included(rel)
        && !rel
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| cfg.filter.excluded(a))
}
