//! The batch source: a streaming walk of the input root.
//!
//! Invariants: directory entries are classified from their `d_type`, so FIFOs, sockets and
//! devices are reported as skipped without ever being opened or even stat'ed; symlinks are not
//! followed by default, and with `--follow-symlinks` never out of the root; filepipe's own
//! files (temps, manifest, failure log, a nested output root) are never treated as inputs.
//! Nothing is collected: each file goes to the bounded job channel as it is found.
//!
//! The walk never leaves the root: every directory is opened from its parent's descriptor,
//! `O_NOFOLLOW`, and its entries stat'ed by name relative to it (`dirs`), so a directory
//! swapped for a symlink between its parent's listing and its open fails to open and is
//! reported as a link, and no name from behind it is listed. walkdir cannot do this: it opens
//! every directory by its full path (walkdir#209, a TOCTOU race that lets a walk with
//! `follow_links(false)` descend through a swapped-in link, open; openat support is
//! walkdir#23, and #213 where the maintainer agrees it needs fixing, both open). A link is
//! followed (`--follow-symlinks`) or explained by resolving it beneath the root
//! (`openat2` `RESOLVE_BENEATH`), with a link back to a directory it is in found by the
//! device and inode of the walk's chain of directories.
//!
//! An incremental batch (`--state`) walks the same way, holding what the state knows of the
//! tree (one query, as watch mode's scan): a file recorded done with the stamp the walk's lstat
//! finds is reported done from the state and never opened, the others go to the workers.
//! Its stats are what a rerun of an unchanged tree costs, so it stats on `WALKERS` threads
//! (`scan_split`): each walks a subtree, and hands a subdirectory it comes to (opened: the
//! other walker lists that very directory) over to a walker that is idle, all but the first of
//! each directory (which it walks itself: a chain of directories stays on one walker). The
//! walkers are started only where the open-file limit leaves them room. Every entry is
//! classified as above, on the walker that lists it; what they find travels to the walk's own
//! thread in bounded chunks, and the directories handed over wait in a channel no longer than
//! there are walkers, so memory stays bounded by the depth of the tree as one walk's does.
//! With `--follow-symlinks` the walk stays on one thread: a link back to an ancestor is found
//! only among the directories of the walk's own chain, which a split walk would not have.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender};
use rustix::fs::{self as rfs, AtFlags, FileType};
use rustix::io::Errno;
use walkdir::WalkDir;

use crate::config::Config;
use crate::error::{FileError, Kind};
use crate::fsio::input::describe;
use crate::fsio::output::{self, TempFound};
use crate::signals::Shutdown;
use crate::source::dirs::{DirId, Dirs, Failure, OpenDir, RootDir, Step};
use crate::source::recorded;
use crate::source::{Outlet, Source};
use crate::state::{KnownMap, Lacks, Reader};
use crate::travel::{BatchFill, Event, Job, Msg, Outcome, Stamp, Stats, Unchanged};

/// At most this many directories are held open by a walk (see `dirs`): each both listed and
/// used to stat and open its entries by name. A deeper tree is still walked: the shallowest
/// open directory is read to its end into memory and closed, and opened again (one level at a
/// time from an open ancestor, checked to be the same directory) when the walk comes back to
/// it. (walkdir held 10 open for listing, and the walk 16 more `O_PATH` for its stats.)
const DIR_FDS: usize = 16;

/// Descriptors a walk opens for a moment besides its directories: the root's `O_PATH`
/// (held for the walk), and a link's target or a temp-like file being examined.
const WALK_TRANSIENT: usize = 2;

/// How many threads an incremental walk stats on at most (`scan_split`). On the 2-core VM of
/// BENCHMARKS.md (2026-12-04), a probe stat'ing the 50,000 files of a tree of 778 directories
/// took 84 ms on one thread, 47 ms on 2, 44 ms on 4 and 47 ms on 8 with the page cache warm;
/// with it cold, 552 ms, 259 ms, 246 ms and 224 ms: the more reads in flight, the better
/// (directories lie in different block groups), while the threads mostly wait. An unchanged
/// rerun of that tree, cold: 650 ms on one walk, 343-445 ms on 2 walkers, 342-372 ms on 4,
/// 295-349 ms on 8. Four, whose descriptors together are about one walk's (below): eight
/// held twice as many for a gain within the spread of a shared machine.
const WALKERS: usize = 4;

/// The directories each walker of a split walk holds open: one walk's share, and a little more
/// (the small bench tree is 5 levels from the root to its deepest files, which a walker can
/// then hold whole); a directory handed over waits for its walker with one more.
const WALKER_FDS: usize = DIR_FDS / WALKERS + 2;

/// Descriptors left, beyond one walk's, for the rest of the run while a split walk goes on
/// (the workers' inputs and temps, the state's database and journal, the logs): a split walk
/// is only had where the open-file limit leaves room for its walkers besides these.
const SPLIT_SPARE: usize = 32;

/// A split walk's walkers hand what they find to the walk's thread this many entries at a time.
const FOUND_CHUNK: usize = 256;

/// How many chunks each walker may have waiting for the walk's thread: 4,096 entries of 160
/// bytes and their two paths, about a megabyte a walker. When the state is read, the walk's
/// thread takes every file found before then (`settle`) on its own: with one chunk each, the
/// walkers then all waited on it (about 25 ms each, of an unchanged rerun's 120), and the two
/// cores had one thread to run.
const FOUND_CHUNKS_PER_WALKER: usize = 16;

/// What a scan finds.
pub(crate) enum Found {
    /// A regular file to process, by its path relative to the root, with its size, mtime and
    /// inode from the walk's lstat (absent if it vanished in between, or if the walk takes no
    /// stamps: see `How`). Its `Job` is made only
    /// if it goes to a worker: an unchanged file of an incremental walk never needs its
    /// absolute path, and 50,000 of them waited for the state twice as large with one.
    File(PathBuf, Option<Stamp>),
    /// A directory, handed on after it was opened and before it is listed: a watcher that
    /// watches it here sees every entry either in the listing or as an event. (Not so from a
    /// split walk, whose entries arrive in chunks: no watcher uses one.)
    Dir(PathBuf),
    /// An entry reported without processing (skipped or failed by the walk itself).
    Report(Outcome),
}

/// Batch mode's source: one walk of `cfg.root`.
pub(crate) struct Walk<'a> {
    cfg: &'a Config,
    shutdown: &'a Shutdown,
    /// An incremental batch's state, read (the sink writes it through its own connection).
    state: Option<Reader>,
    /// Whoever takes the jobs needs each file's size before it is read (a coordinator's
    /// batches go to other hosts, whose workers cannot share a batch out).
    sized: bool,
}

impl<'a> Walk<'a> {
    /// A walk of `cfg.root` that stops early when `shutdown` is requested.
    pub(crate) fn new(cfg: &'a Config, shutdown: &'a Shutdown) -> Self {
        Walk {
            cfg,
            shutdown,
            state: None,
            sized: false,
        }
    }

    /// The same walk for a coordinator, whose batches a large file travels in alone (see
    /// `sized`).
    pub(crate) fn for_queue(cfg: &'a Config, shutdown: &'a Shutdown) -> Self {
        Walk {
            sized: true,
            ..Walk::new(cfg, shutdown)
        }
    }

    /// The same walk for an incremental batch (`cfg.incremental`): a file the state recorded
    /// done with the stamp the walk finds is reported done from the state, without a read.
    pub(crate) fn incremental(cfg: &'a Config, shutdown: &'a Shutdown, state: Reader) -> Self {
        Walk {
            state: Some(state),
            ..Walk::new(cfg, shutdown)
        }
    }
}

impl Source for Walk<'_> {
    fn run(&mut self, out: Outlet<'_>) -> anyhow::Result<()> {
        let (cfg, shutdown) = (self.cfg, self.shutdown);
        let Some(reader) = self.state.take() else {
            // A file's stamp serves a sized batch and the progress bar's byte count, and
            // nothing else without a state: without them, no file is stat'ed (the worker's
            // `fstat` of what it opens is what counts), one system call of the six a small
            // file costs, and batches are filled by count (see `pipeline::intake`).
            let stamps = self.sized || cfg.progress;
            return walk(cfg, &out, shutdown, None, stamps);
        };
        // The state is read on a thread of its own while the walk starts: reading 50,000 rows
        // takes about half as long as stat'ing as many files, and the two are all an unchanged
        // rerun does.
        std::thread::scope(|s| {
            let loading = std::thread::Builder::new()
                .name("filepipe-state".into())
                .spawn_scoped(s, move || {
                    let started = std::time::Instant::now();
                    let known = reader.known_under(Path::new(""));
                    tracing::debug!(
                        files = known.as_ref().map_or(0, KnownMap::len),
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "state read"
                    );
                    known.with_context(|| {
                        let dir = cfg.incremental.as_ref().map(|i| i.state_dir.as_path());
                        let dir = dir.unwrap_or(Path::new("?")).display();
                        // Only a state that cannot be read at all gets here: a damaged one
                        // is not mended by running again.
                        format!(
                            "reading the state in {dir} (if it is damaged, move it aside: the \
                             next run reads every file again)"
                        )
                    })
                })?;
            walk(cfg, &out, shutdown, Some(loading), true)
        })
    }
}

/// Outcomes of unchanged files travel to the reporter this many at a time.
const UNCHANGED_BATCH: usize = 1024;

/// The state, as an incremental walk has it: still being read, or read.
enum Recorded<'s> {
    Loading(std::thread::ScopedJoinHandle<'s, anyhow::Result<KnownMap>>),
    Ready(KnownMap),
}

/// Where a walk's files go: to the workers in batches, or (unchanged) to the reporter.
struct Feed<'c, 'o> {
    cfg: &'c Config,
    out: &'c Outlet<'o>,
    batch: Batch,
    unchanged: Unchanged,
}

impl Feed<'_, '_> {
    /// Sends a file to the workers. False if they are gone.
    fn work(&mut self, job: Job, stamp: Option<Stamp>) -> bool {
        self.batch
            .add(job, stamp.map_or(0, |s| s.size), self.out.jobs)
    }

    /// The job of the file at `rel`.
    fn job(&self, rel: PathBuf) -> Job {
        Job::new(self.cfg.root.join(&rel), rel)
    }

    /// A file the state may know (`map`): reported from the state if unchanged, else sent to
    /// the workers. False if the run is stopping.
    fn take(&mut self, map: &mut KnownMap, rel: PathBuf, stamp: Option<Stamp>) -> bool {
        let was = map.remove(&rel);
        let replace = was
            .as_ref()
            .is_some_and(|k| recorded::replaces(self.cfg, k, &rel, stamp));
        let only = match was.map(|k| recorded::lacks(self.cfg, &k, &rel, stamp)) {
            Some(Lacks::Nothing(digests)) => {
                // Not read: its bytes are no part of this run's work.
                let size = stamp.map_or(0, |s| s.size);
                self.out.stats.bytes.fetch_sub(size, Ordering::Relaxed);
                self.unchanged.push(&rel, &digests);
                return self.unchanged.len() < UNCHANGED_BATCH || self.send_unchanged();
            }
            Some(Lacks::Part(only)) => Some(Box::new(only)),
            Some(Lacks::All) | None => None,
        };
        let job = Job {
            replace,
            only,
            ..self.job(rel)
        };
        self.work(job, stamp)
    }

    /// Sends the unchanged files waiting. False if the reporter is gone.
    fn send_unchanged(&mut self) -> bool {
        let files = std::mem::take(&mut self.unchanged);
        files.is_empty() || self.out.events.send(Event::Unchanged(files)).is_ok()
    }

    /// Sends everything waiting.
    fn flush(&mut self) {
        self.batch.flush(self.out.jobs);
        self.send_unchanged();
    }
}

/// Files an incremental walk found before the state was read: they wait for it.
#[derive(Default)]
struct Waiting {
    files: Vec<(PathBuf, Option<Stamp>)>,
    /// Entries reported by the walk itself: out of the map, so they are not taken as gone.
    reported: Vec<PathBuf>,
}

/// Once the state is read (or at once with `block`), takes what waited for it. `Ok(false)` if
/// the run is stopping; `Err` if the state could not be read.
fn settle(
    known: &mut Option<Recorded<'_>>,
    block: bool,
    waiting: &mut Waiting,
    feed: &mut Feed<'_, '_>,
) -> anyhow::Result<bool> {
    let due = |k: &mut Recorded<'_>| match k {
        Recorded::Loading(h) => block || h.is_finished(),
        Recorded::Ready(_) => false,
    };
    let Some(Recorded::Loading(handle)) = known.take_if(due) else {
        return Ok(true);
    };
    let mut map = handle
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
    for rel in waiting.reported.drain(..) {
        map.remove(&rel);
    }
    let mut going = true;
    for (rel, stamp) in waiting.files.drain(..) {
        going = going && feed.take(&mut map, rel, stamp);
    }
    *known = Some(Recorded::Ready(map));
    Ok(going)
}

/// Walks `cfg.root`, sending a `Job` per regular file and an outcome for everything it skips,
/// until the tree is exhausted or a shutdown is requested. With the state (`loading`, being
/// read), a file recorded done with the stamp it has now is reported done at once, from the
/// state (its digest, or its output in place), and never opened; files found before the state
/// is read wait for it. Without `stamps` (and then without the state), files are not stat'ed. Once the whole tree is walked, the files the state knew and the walk did
/// not find leave it (`Event::Unlisted`), as watch mode's scan forgets them. Fails only if the
/// state cannot be read.
fn walk<'s>(
    cfg: &Config,
    out: &Outlet<'_>,
    shutdown: &Shutdown,
    loading: Option<std::thread::ScopedJoinHandle<'s, anyhow::Result<KnownMap>>>,
    stamps: bool,
) -> anyhow::Result<()> {
    clean_own_dirs(cfg, out.stats);
    let mut known = loading.map(Recorded::Loading);
    let mut waiting = Waiting::default();
    let mut feed = Feed {
        cfg,
        out,
        batch: Batch::default(),
        unchanged: Unchanged::default(),
    };
    let mut failed = None;
    // The root itself could not be opened or listed (to its end): the walk saw none of the
    // tree, or part of it only, and no manifest may stand for it (found by review: a root
    // made unreadable replaced a good manifest with an empty one). Its outcome is reported
    // as any directory's, and the walk then fails.
    let mut root_unread = None;
    let mut complete = true;
    // Directories the walk could not list (or read to their end): what the state knew beneath
    // them was not seen, which says nothing of whether it is gone.
    let mut unlisted_dirs = std::collections::HashSet::new();
    // Only an incremental walk is split: a full run's workers keep the cores busy reading,
    // and its jobs go out in one walk's order.
    let split = known.is_some() && !cfg.follow_symlinks;
    let mut visit = |found| {
        match settle(&mut known, false, &mut waiting, &mut feed) {
            Ok(true) => {}
            Ok(false) => complete = false,
            Err(e) => {
                failed = Some(e);
                complete = false;
            }
        }
        if !complete {
            return false;
        }
        let sent = match (found, &mut known) {
            (Found::File(rel, stamp), None) => {
                let job = feed.job(rel);
                feed.work(job, stamp)
            }
            (Found::File(rel, stamp), Some(Recorded::Ready(map))) => feed.take(map, rel, stamp),
            (Found::File(rel, stamp), Some(Recorded::Loading(_))) => {
                waiting.files.push((rel, stamp));
                true
            }
            (Found::Dir(_), _) => true,
            (Found::Report(outcome), known) => {
                if let Outcome::Failed { rel, error } = &outcome {
                    // The walk fails only a directory it could not read (or the root).
                    unlisted_dirs.insert(rel.clone());
                    if rel.as_os_str().is_empty() {
                        root_unread = Some(error.message.clone());
                    }
                }
                match known {
                    Some(Recorded::Ready(map)) => {
                        map.remove(outcome.rel());
                    }
                    Some(Recorded::Loading(_)) => waiting.reported.push(outcome.rel().into()),
                    None => {}
                }
                out.stats.reported.fetch_add(1, Ordering::Relaxed);
                out.events.send(Event::Finished(vec![outcome])).is_ok()
            }
        };
        complete &= sent;
        sent
    };
    if split {
        let handed = scan_split(cfg, out.stats, shutdown, &mut visit);
        tracing::debug!(subtrees = handed, "walked on several threads");
    } else {
        let how = How {
            split: None,
            stamps,
        };
        scan_with(cfg, &cfg.root, how, out.stats, shutdown, &mut visit);
    }
    if failed.is_none() {
        match settle(&mut known, true, &mut waiting, &mut feed) {
            Ok(going) => complete &= going,
            Err(e) => failed = Some(e),
        }
    }
    feed.flush();
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some(why) = root_unread {
        anyhow::bail!("reading the input root {}: {why}", cfg.root.display());
    }
    // Only a walk of the whole tree tells what is gone: an interrupted one leaves the state be,
    // and one that could not list a directory leaves be what the state knew beneath it (the
    // rest of the tree was seen whole: what is gone there still goes).
    if let Some(Recorded::Ready(map)) = known {
        if complete && !shutdown.requested() {
            let gone: Vec<PathBuf> = (map.into_keys())
                .filter(|rel| !beneath_any(rel, &unlisted_dirs))
                .collect();
            if !gone.is_empty() {
                let _ = out.events.send(Event::Unlisted(gone));
            }
        }
    }
    Ok(())
}

/// Whether `rel` is one of `dirs` or beneath one (the root, `""`, holds everything).
fn beneath_any(rel: &Path, dirs: &std::collections::HashSet<PathBuf>) -> bool {
    !dirs.is_empty() && rel.ancestors().any(|a| dirs.contains(a))
}

/// Removes stale temps under a separate output root, in the manifest's directory and under the
/// move directories: the walk skips a nested output root and never sees the others.
pub(crate) fn clean_own_dirs(cfg: &Config, stats: &Stats) {
    if let Some(out) = &cfg.out {
        remove_stale_temps(out, usize::MAX, stats);
    }
    if let Some(dir) = cfg.manifest.as_deref().and_then(Path::parent) {
        remove_stale_temps(dir, 1, stats);
    }
    // A move across file systems copies to a temp in its move directory first: one stopped
    // before the copy was named leaves it there (the input itself still in the tree).
    for aside in cfg.move_source.iter().chain(&cfg.move_failed) {
        remove_stale_temps(&aside.root, usize::MAX, stats);
    }
}

/// Walks `dir` (the root or a directory under it), classifying every entry and handing it to
/// `visit`, until done, a shutdown, or `visit` returns false. Every file comes with its stamp.
pub(crate) fn scan(
    cfg: &Config,
    dir: &Path,
    stats: &Stats,
    shutdown: &Shutdown,
    visit: &mut dyn FnMut(Found) -> bool,
) {
    let how = How {
        split: None,
        stamps: true,
    };
    scan_with(cfg, dir, how, stats, shutdown, visit);
}

/// `scan`, as `how` says.
fn scan_with(
    cfg: &Config,
    dir: &Path,
    how: How<'_>,
    stats: &Stats,
    shutdown: &Shutdown,
    visit: &mut dyn FnMut(Found) -> bool,
) {
    match RootDir::open(&cfg.root) {
        Ok(root) => scan_tree(cfg, &root, Top::Path(dir), how, stats, shutdown, visit),
        Err(e) => {
            visit(dir_failed(cfg, dir, e));
        }
    }
}

/// How a scan goes.
#[derive(Clone, Copy)]
struct How<'s> {
    /// The walker of a split walk this scan is (see `scan_tree`), if it is one.
    split: Option<&'s Split>,
    /// Whether every file is lstat'ed for its stamp (see `file`).
    stamps: bool,
}

/// Where a scan starts.
enum Top<'p> {
    /// The root, or a directory beneath it (watch mode's new directories): opened beneath the
    /// root through no symlink (with `--follow-symlinks`, through links that stay beneath it).
    Path(&'p Path),
    /// A directory another walker of a split walk opened, and handed over with its path.
    Opened(OpenDir, PathBuf),
}

/// A directory the walk could not read, reported.
fn dir_failed(cfg: &Config, dir: &Path, e: Errno) -> Found {
    Found::Report(Outcome::Failed {
        rel: relative(cfg, dir),
        error: FileError::errno("reading directory", e),
    })
}

/// `scan` from `top`, or with `how.split` a walker's scan of the root or of a subdirectory
/// handed to it, which hands the subdirectories it comes to over to idle walkers (each opened
/// first: the other walker lists the very directory this one found, never looks it up again).
fn scan_tree(
    cfg: &Config,
    root: &RootDir,
    top: Top<'_>,
    how: How<'_>,
    stats: &Stats,
    shutdown: &Shutdown,
    visit: &mut dyn FnMut(Found) -> bool,
) {
    let split = how.split;
    let (top, path) = match top {
        Top::Opened(dir, path) => (dir, path),
        Top::Path(dir) => {
            let opened = match dir.strip_prefix(&cfg.root) {
                Ok(rel) => root.list_beneath(rel, cfg.follow_symlinks),
                Err(_) => Err(Errno::XDEV),
            };
            match opened {
                // A watcher's new directory that is one of filepipe's own by identity (the
                // walk never hands one over).
                Ok(opened) if cfg.is_own_dir(opened.id().key()) => return,
                Ok(opened) => (opened, dir.to_path_buf()),
                // A watch's new directory gone by the time it is scanned (made and renamed at
                // once): where it went is heard and scanned on its own.
                Err(Errno::NOENT) if dir != cfg.root => return,
                Err(e) => {
                    visit(dir_failed(cfg, dir, e));
                    return;
                }
            }
        }
    };
    // Every path the walk makes is the top's joined with names, so only the own files on the
    // same line as it (above it or below it) can be among them or contain them: the others
    // are never compared, which spares two component-wise comparisons per entry of a tree
    // that holds none of them (the manifest and state kept elsewhere).
    let own: Vec<&Path> = (cfg.own_files.iter())
        .map(PathBuf::as_path)
        .filter(|f| f.starts_with(&path) || path.starts_with(f))
        .collect();
    let budget = if split.is_some() { WALKER_FDS } else { DIR_FDS };
    let mut dirs = Dirs::new(top, path, budget);
    // A level reached through a followed link, opened again: the link resolved as it was
    // followed, beneath the root.
    let relink = |path: &Path| link_target(cfg, root, &relative(cfg, path));
    loop {
        if shutdown.requested() {
            return;
        }
        let kind = match dirs.next(&relink) {
            Step::End => return,
            Step::Entry(kind) => kind,
            Step::Failed { path, error, why } => {
                let error = match why {
                    Failure::Listing => FileError::errno("reading directory", error),
                    // Only its remaining entries are lost: they are this directory's
                    // failure (and what the state knew of them is kept, see `walk`).
                    Failure::Reopening => FileError {
                        message: format!(
                            "reading directory: moved or replaced while it was walked ({}): \
                             the entries not walked yet were not",
                            std::io::Error::from(error)
                        ),
                        ..FileError::errno("reading directory", error)
                    },
                    Failure::Reopen => FileError {
                        message: format!(
                            "reading directory: could not be opened again to walk the rest of \
                             it ({}): the entries not walked yet were not",
                            std::io::Error::from(error)
                        ),
                        ..FileError::errno("reading directory", error)
                    },
                };
                let rel = relative(cfg, &path);
                if !visit(Found::Report(Outcome::Failed { rel, error })) {
                    return;
                }
                continue;
            }
        };
        let found = match classify(cfg, root, &mut dirs, kind, &own, how.stamps, stats) {
            Classified::Nothing => continue,
            Classified::Found(found) => found,
            // A directory of filepipe's own reached by another path (a bind mount of the
            // state's, say, or a followed link to it): left out whole, as by its own path.
            Classified::Dir(dir, ..) if cfg.is_own_dir(dir.id().key()) => continue,
            Classified::Dir(dir, path, via_link) => {
                let mut dir = Some(dir);
                if let (Some(split), Some(went_in)) = (split, dirs.went_in()) {
                    // The first subdirectory of a directory this walker keeps: handing it
                    // over would leave this one with nothing to do if it was the directory's
                    // last entry, as in a chain of directories. Its siblings, found later,
                    // are what this walker would otherwise walk one after another.
                    if *went_in {
                        dir = dir.and_then(|d| split.offer(d, &path));
                    }
                    *went_in = true;
                }
                if let Some(dir) = dir {
                    dirs.push(dir, path.clone(), via_link);
                }
                // Handed on once opened and before it is listed (here or by the walker it
                // was handed to): a watcher that watches it now misses nothing.
                Found::Dir(path)
            }
        };
        if !visit(found) {
            return;
        }
    }
}

/// What a split walk's walkers take from their channel.
enum Subtree {
    /// The walk's root, walked as `scan` walks it.
    Root,
    /// A directory another walker came to, opened, and handed over with its path.
    Dir(OpenDir, PathBuf),
    /// The walk is over.
    End,
}

/// What the walkers of a split walk share.
struct Split {
    /// Subtrees to walk: no more than there are walkers (see `offer`).
    dirs: Sender<Subtree>,
    /// Subtrees given out (waiting in `dirs` or being walked) and not done yet: the walk is
    /// over when none is left.
    pending: AtomicUsize,
    /// Walkers waiting for a subtree.
    idle: AtomicUsize,
    /// The walk's thread stopped taking entries: subtrees not walked yet are dropped.
    stop: AtomicBool,
    /// Subtrees handed over, for the log (and the tests: the walk was split).
    handed: AtomicUsize,
    /// How many walkers take from `dirs`.
    walkers: usize,
}

impl Split {
    /// A walk whose root is to be sent on `dirs`, to `walkers` walkers.
    fn new(dirs: Sender<Subtree>, walkers: usize) -> Self {
        Split {
            dirs,
            walkers,
            pending: AtomicUsize::new(1),
            idle: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            handed: AtomicUsize::new(0),
        }
    }

    /// Hands `dir` (found at `path`) over to a walker if one is idle and none is waiting for
    /// it already; if none, gives it back, for the caller to walk.
    fn offer(&self, dir: OpenDir, path: &Path) -> Option<OpenDir> {
        if self.stop.load(Ordering::Relaxed) || self.idle.load(Ordering::Relaxed) <= self.dirs.len()
        {
            return Some(dir);
        }
        // Counted before it is sent, so the count never falls to none while it travels (the
        // offering walker's own subtree is counted too).
        self.pending.fetch_add(1, Ordering::AcqRel);
        match self.dirs.try_send(Subtree::Dir(dir, path.to_path_buf())) {
            Ok(()) => {
                self.handed.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                match e.into_inner() {
                    Subtree::Dir(dir, _) => Some(dir),
                    Subtree::Root | Subtree::End => None,
                }
            }
        }
    }

    /// A subtree is done: after the last, every walker is told the walk is over (`dirs` is
    /// empty then, and holds one message per walker).
    fn done(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            for _ in 0..self.walkers {
                let _ = self.dirs.send(Subtree::End);
            }
        }
    }
}

/// Marks a subtree done however its walk ends, a panic included: the other walkers, and the
/// walk's thread waiting for them, would otherwise wait forever.
struct Walking<'s>(&'s Split);

impl Drop for Walking<'_> {
    fn drop(&mut self) {
        self.0.done();
    }
}

/// Walks the root as `scan` does, on `WALKERS` threads (see the module docs), handing every
/// entry to `visit` on this thread, until done, a shutdown, or `visit` returns false. Returns
/// how many subtrees were handed from one walker to another.
fn scan_split(
    cfg: &Config,
    stats: &Stats,
    shutdown: &Shutdown,
    visit: &mut dyn FnMut(Found) -> bool,
) -> usize {
    let walkers = walkers_allowed();
    tracing::debug!(walkers, "incremental walk");
    let root = match RootDir::open(&cfg.root) {
        Ok(root) if walkers >= 2 => root,
        _ => {
            scan(cfg, &cfg.root, stats, shutdown, visit);
            return 0;
        }
    };
    let root = &root;
    let (dirs_tx, dirs_rx) = crossbeam_channel::bounded(walkers);
    let (found_tx, found_rx) =
        crossbeam_channel::bounded::<Vec<Found>>(walkers * FOUND_CHUNKS_PER_WALKER);
    let split = Split::new(dirs_tx, walkers);
    let walked = std::thread::scope(|s| {
        let mut spawned_any = false;
        for i in 0..walkers {
            let (split, dirs, found) = (&split, dirs_rx.clone(), found_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("filepipe-walk{i}"))
                .spawn_scoped(s, move || {
                    walker(cfg, root, split, &dirs, &found, stats, shutdown)
                });
            spawned_any |= spawned.is_ok();
        }
        if !spawned_any {
            return false;
        }
        drop(found_tx);
        // Cannot fail: the walkers hold receivers, and the channel has room.
        let _ = split.dirs.send(Subtree::Root);
        'found: for chunk in found_rx.iter() {
            for found in chunk {
                if !visit(found) {
                    split.stop.store(true, Ordering::Relaxed);
                    break 'found;
                }
            }
        }
        // Walkers blocked sending find the channel closed, and stop.
        drop(found_rx);
        true
    });
    if !walked {
        // No thread to be had: the walk goes on this one.
        scan(cfg, &cfg.root, stats, shutdown, visit);
    }
    split.handed.load(Ordering::Relaxed)
}

/// How many walkers the open-file limit has room for: the split walk's descriptors (each
/// walker's `WALKER_FDS`, a directory handed over waiting for it and one it opens for a
/// moment) are on top of what the process holds now (the state's among them), and must leave
/// what one walk would hold and `SPLIT_SPARE` to the rest of the run, which lives with one
/// walk. Under a limit so
/// low that fewer than two fit, the walk is one walk, as a full run's (a walker that fails a
/// directory with EMFILE costs its files a read on the next run too: see `walk`).
fn walkers_allowed() -> usize {
    use rustix::process::{getrlimit, Resource};
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    // /proc may be missing (a chroot): then only the limit is known, and the walk takes its
    // walkers if the limit leaves them room beside the reserve alone.
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    let room = soft
        .saturating_sub(open)
        .saturating_sub(DIR_FDS + WALK_TRANSIENT + SPLIT_SPARE);
    (room / (WALKER_FDS + 1 + WALK_TRANSIENT)).min(WALKERS)
}

/// One walker of a split walk: walks the subtrees it is given until told the walk is over.
fn walker(
    cfg: &Config,
    root: &RootDir,
    split: &Split,
    dirs: &Receiver<Subtree>,
    found: &Sender<Vec<Found>>,
    stats: &Stats,
    shutdown: &Shutdown,
) {
    let mut chunk = Vec::with_capacity(FOUND_CHUNK);
    let send = |chunk: &mut Vec<Found>| {
        let full = std::mem::replace(chunk, Vec::with_capacity(FOUND_CHUNK));
        if found.send(full).is_err() {
            split.stop.store(true, Ordering::Relaxed);
        }
    };
    loop {
        split.idle.fetch_add(1, Ordering::Relaxed);
        let next = dirs.recv();
        split.idle.fetch_sub(1, Ordering::Relaxed);
        let top = match next {
            Ok(Subtree::Root) => Top::Path(&cfg.root),
            Ok(Subtree::Dir(dir, path)) => Top::Opened(dir, path),
            Ok(Subtree::End) | Err(_) => return,
        };
        let _done = Walking(split);
        if split.stop.load(Ordering::Relaxed) || shutdown.requested() {
            continue;
        }
        let how = How {
            split: Some(split),
            stamps: true,
        };
        scan_tree(cfg, root, top, how, stats, shutdown, &mut |f| {
            chunk.push(f);
            if chunk.len() >= FOUND_CHUNK {
                send(&mut chunk);
            }
            !split.stop.load(Ordering::Relaxed)
        });
        if !chunk.is_empty() {
            send(&mut chunk);
        }
    }
}

/// What an entry of the walk is to the walk.
enum Classified {
    /// Nothing to hand on (filtered out, filepipe's own, vanished).
    Nothing,
    /// A file, or a report.
    Found(Found),
    /// A directory opened to be walked, its path, and whether a followed link led to it.
    Dir(OpenDir, PathBuf, bool),
}

/// Classifies the entry `dirs` is at, whose `d_type` is `kind` (a file with its stamp if
/// `stamps`).
fn classify(
    cfg: &Config,
    root: &RootDir,
    dirs: &mut Dirs,
    kind: FileType,
    own: &[&Path],
    stamps: bool,
    stats: &Stats,
) -> Classified {
    let report = |o| Classified::Found(Found::Report(o));
    let Some(dir) = dirs.dir_fd() else {
        // Never so: an entry is handed out only while its directory is open.
        return Classified::Nothing;
    };
    let name = dirs.name();
    let path = dirs.dir_path().join(name);
    let rel = relative(cfg, &path);
    // Where the file system does not fill d_type in, an lstat tells, and serves as a file's
    // stamp.
    let (kind, lstat) = match kind {
        FileType::Unknown => match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => (FileType::from_raw_mode(st.st_mode), Some(st)),
            Err(Errno::NOENT) => return Classified::Nothing,
            Err(e) => {
                let error = FileError::errno("examining", e);
                return report(Outcome::Failed { rel, error });
            }
        },
        kind => (kind, None),
    };
    if cfg.filter.excluded(&rel) || own.iter().any(|f| path.starts_with(f)) {
        return Classified::Nothing;
    }
    // By identity too: the manifest's or the state's directory reached through a bind mount in
    // the tree, its files by their names there (found by a review: the state's database was
    // hashed, and a `.gz` of it written into it).
    if (dirs.dir_id()).is_some_and(|d| cfg.is_own_named(d.key(), name)) {
        return Classified::Nothing;
    }
    match kind {
        FileType::Directory if too_long(&path) => report(too_long_dir(rel)),
        FileType::Directory => match dirs.open_child() {
            Ok(opened) => Classified::Dir(opened, path, false),
            // In a watch, gone since it was listed: where it went is heard and scanned. It
            // was counted a failed file, `vanished` (found by a review: directories made and
            // renamed at once). A batch says so: the files it held go uncounted (and a file
            // system may answer ENOENT for a directory that is there: found by the next).
            Err(Errno::NOENT) if cfg.watch.is_some() => Classified::Nothing,
            Err(e) => report(not_opened(cfg, root, dirs, rel, e)),
        },
        FileType::Symlink if cfg.follow_symlinks => follow_link(cfg, root, dirs, path, rel, stats),
        FileType::Symlink => {
            let reason = link_reason(cfg, root, &rel);
            report(Outcome::Skipped { rel, reason })
        }
        FileType::RegularFile => file(cfg, dir, name, rel, lstat, stamps, stats),
        other => report(special(rel, other)),
    }
}

/// Whether `path` is too long to be opened by path (`PATH_MAX` with its NUL). The walk
/// opens by descriptor and could go deeper, but a worker opens a job by its path beneath the
/// root and would fail every file down there (`ENAMETOOLONG`), and a chain of any depth would
/// be walked (tens of thousands of levels held in memory): the walk stops where walkdir did.
fn too_long(path: &Path) -> bool {
    path.as_os_str().len() >= libc::PATH_MAX as usize
}

/// A directory `too_long` to go into: one failure, as walkdir's open of it by path reported.
fn too_long_dir(rel: PathBuf) -> Outcome {
    let error = FileError::errno("reading directory", Errno::NAMETOOLONG);
    Outcome::Failed { rel, error }
}

/// What a directory entry that failed to open (`e`) is reported as: one swapped for a symlink
/// since its parent was listed fails here (`O_NOFOLLOW`), and is reported as any link is, not
/// one name from behind it taken or watched.
fn not_opened(cfg: &Config, root: &RootDir, dirs: &Dirs, rel: PathBuf, e: Errno) -> Outcome {
    if let (Errno::NOTDIR | Errno::LOOP, Some(dir)) = (e, dirs.dir_fd()) {
        let name = dirs.name();
        let now = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW);
        if now.is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink) {
            let reason = link_reason(cfg, root, &rel);
            return Outcome::Skipped { rel, reason };
        }
    }
    let error = FileError::errno("reading directory", e);
    Outcome::Failed { rel, error }
}

/// A symlink with `--follow-symlinks`: followed if it leads to a file or a directory beneath
/// the root (a directory not one it is in), else reported.
fn follow_link(
    cfg: &Config,
    root: &RootDir,
    dirs: &mut Dirs,
    path: PathBuf,
    rel: PathBuf,
    stats: &Stats,
) -> Classified {
    let report = |o| Classified::Found(Found::Report(o));
    let Some(dir) = dirs.dir_fd() else {
        return Classified::Nothing;
    };
    let name = dirs.name();
    let target = match link_target(cfg, root, &rel).and_then(|fd| {
        let st = rfs::fstat(&fd)?;
        Ok((fd, st))
    }) {
        Ok(target) => target,
        Err(_) => {
            let reason = link_reason(cfg, root, &rel);
            return report(Outcome::Skipped { rel, reason });
        }
    };
    let (fd, st) = target;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory if cfg.is_own_dir(DirId::from_stat(&st).key()) => report(own_link(rel)),
        FileType::Directory => {
            if let Some(ancestor) = dirs.ancestor(DirId::from_stat(&st)) {
                let to = relative(cfg, ancestor);
                let to = if to.as_os_str().is_empty() {
                    "the root".to_string()
                } else {
                    to.display().to_string()
                };
                let reason = FileError::new(
                    Kind::Symlink,
                    format!(
                        "symlink loop: it leads back to {to}, a directory it is in; not followed"
                    ),
                );
                return report(Outcome::Skipped { rel, reason });
            }
            if too_long(&path) {
                return report(too_long_dir(rel));
            }
            dirs.make_room();
            match OpenDir::from_path_fd(&fd) {
                Ok(opened) => Classified::Dir(opened, path, true),
                Err(e) => report(Outcome::Failed {
                    rel,
                    error: FileError::errno("reading directory", e),
                }),
            }
        }
        // One of filepipe's own files (the state's database, a manifest) by another path.
        FileType::RegularFile if cfg.is_own_followed(&fd, &st) => report(own_link(rel)),
        // Stat'ed through the link, beneath the root: the file the worker's open will find.
        FileType::RegularFile => file(cfg, dir, name, rel, Some(st), true, stats),
        other => report(special(rel, other)),
    }
}

/// A symlink followed to one of filepipe's own directories or files (see `fsio::own`): skipped,
/// as the user's link it is.
fn own_link(rel: PathBuf) -> Outcome {
    let reason = FileError::new(
        Kind::Symlink,
        "symlink to filepipe's own files (the state directory, an output or move directory, a \
         manifest or the failure log); not followed",
    );
    Outcome::Skipped { rel, reason }
}

/// A FIFO, socket or device: skipped without ever being opened.
fn special(rel: PathBuf, kind: FileType) -> Outcome {
    let reason = FileError::new(
        Kind::SpecialFile,
        format!("not a regular file ({}); not opened", describe(kind)),
    );
    Outcome::Skipped { rel, reason }
}

/// A regular file, `name` in `dir` (`st`: its stat, if the walk has it already; looked up if
/// not and `stamps`): a job, or nothing (filtered out, filepipe's own temp), or a report (a
/// temp-like name).
fn file(
    cfg: &Config,
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    rel: PathBuf,
    st: Option<rfs::Stat>,
    stamps: bool,
    stats: &Stats,
) -> Classified {
    if output::is_temp_name(name) {
        return match temp_reason(cfg, dir, name, &rel, stats) {
            Some(reason) => Classified::Found(Found::Report(Outcome::Skipped { rel, reason })),
            None => Classified::Nothing,
        };
    }
    if !cfg.filter.included(&rel) {
        return Classified::Nothing;
    }
    // One lstat per file, by name in its directory (the kernel looks up one component), on
    // this thread: the size balances batches and feeds progress, and an incremental run or
    // watch mode compares the stamp with its state. An lstat: a file swapped for a link
    // after the listing is not taken for the link's target. A walk with no use for stamps
    // takes none: the worker opens the file by name as it would anyway, and what it opened
    // is what it checks (a link, a FIFO, a directory it may not search, a file gone).
    let st = match st {
        Some(st) => Some(st),
        None if !stamps => None,
        None => match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            // Gone since the listing: the worker says so (`vanished`), and a watch hears of it.
            Err(Errno::NOENT) => None,
            // Listed but not to be looked at: a directory its user may read but not search
            // (mode 0744 to others). A watch took the missing stamp for a file gone, and never
            // reported it, nor took it once the directory was opened up (found by a review).
            Err(e) => {
                return Classified::Found(Found::Report(Outcome::Failed {
                    rel,
                    error: FileError::errno("examining the file", e),
                }))
            }
        },
    };
    let stamp = st.map(|st| Stamp::from_stat(&st));
    stats
        .bytes
        .fetch_add(stamp.map_or(0, |s| s.size), Ordering::Relaxed);
    stats.files.fetch_add(1, Ordering::Relaxed);
    Classified::Found(Found::File(rel, stamp))
}

/// Jobs waiting to be sent together (filled by `BatchFill`'s rule).
#[derive(Default)]
pub(crate) struct Batch {
    jobs: Vec<Job>,
    fill: BatchFill,
}

impl Batch {
    /// Adds a job, sending the batch when it is full. False if the workers are gone.
    pub(crate) fn add(&mut self, job: Job, size: u64, tx: &Sender<Msg>) -> bool {
        if BatchFill::alone(size) {
            // A large file goes alone, so no worker is left holding several of them at the end.
            return tx.send(Msg::Jobs(vec![job])).is_ok();
        }
        self.jobs.push(job);
        self.fill.add(size);
        if self.fill.full() {
            return self.flush(tx);
        }
        true
    }

    /// Sends what is waiting. False if the workers are gone.
    pub(crate) fn flush(&mut self, tx: &Sender<Msg>) -> bool {
        self.fill = BatchFill::default();
        if self.jobs.is_empty() {
            return true;
        }
        tx.send(Msg::Jobs(std::mem::take(&mut self.jobs))).is_ok()
    }
}

/// `path` relative to the root (the path itself if outside it).
pub(crate) fn relative(cfg: &Config, path: &Path) -> PathBuf {
    rel_under(&cfg.root, path).to_path_buf()
}

/// `path` relative to `root` (the path itself if outside it), as `Path::strip_prefix` has it.
/// A walk's paths are its root joined with names: the root's bytes, a slash, the rest. Taken
/// as such, without `strip_prefix`'s walk over the components of both (a tenth of what the walk
/// of an unchanged tree cost, in an incremental rerun); anything else, a root not in canonical
/// form included, goes the component way.
fn rel_under<'p>(root: &Path, path: &'p Path) -> &'p Path {
    use std::os::unix::ffi::OsStrExt;
    // Names joined by single slashes, none of them "." (which components skip): their bytes
    // and their components say the same.
    let plain = |b: &[u8]| b.split(|&c| c == b'/').all(|n| !n.is_empty() && n != b".");
    let (r, p) = (root.as_os_str().as_bytes(), path.as_os_str().as_bytes());
    if let Some(rest) = p.strip_prefix(r).and_then(|rest| rest.strip_prefix(b"/")) {
        if r.first() == Some(&b'/') && plain(&r[1..]) && plain(rest) {
            return Path::new(std::ffi::OsStr::from_bytes(rest));
        }
    }
    path.strip_prefix(root).unwrap_or(path)
}

/// The manifest, the failure log and the state directory (and everything under them) are
/// filepipe's. (An output root is never inside the input root: `config::check_out`.) A file
/// of theirs is known by its directory's identity too, whatever path leads there (a bind
/// mount of the manifest's directory in the tree: see `fsio::own`).
pub(crate) fn is_own(cfg: &Config, path: &Path) -> bool {
    cfg.own_files.iter().any(|f| path.starts_with(f)) || cfg.is_own_named_at(path)
}

/// Explains why the symlink `rel` is not followed, looking at what it leads to beneath the
/// root without opening it for reading (`link_target`): a link leading out is said to, never
/// stat'ed there.
fn link_reason(cfg: &Config, root: &RootDir, rel: &Path) -> FileError {
    let target = link_target(cfg, root, rel).and_then(|fd| rfs::fstat(&fd));
    let is_dir = |st: &rfs::Stat| FileType::from_raw_mode(st.st_mode) == FileType::Directory;
    let msg = match target {
        Err(Errno::LOOP) => "symlink loop; not followed".into(),
        Err(Errno::NOENT) => "broken symlink; not followed".into(),
        Err(Errno::XDEV) => "symlink leading outside the root; not followed".into(),
        Err(e) => format!(
            "symlink whose target cannot be examined ({}); not followed",
            std::io::Error::from(e)
        ),
        Ok(st) if is_dir(&st) && cfg.follow_symlinks => {
            "symlink to a directory; not followed".into()
        }
        Ok(st) if is_dir(&st) => {
            "symlink to a directory; not followed (see --follow-symlinks)".into()
        }
        Ok(_) if cfg.follow_symlinks => "symlink; not followed".into(),
        Ok(_) => "symlink; not followed (see --follow-symlinks)".into(),
    };
    FileError::new(Kind::Symlink, msg)
}

/// What the symlink `rel` leads to, opened `O_PATH` (nothing is opened for reading, a FIFO
/// included) and resolved beneath the root, the link itself and any link on the way followed
/// only while they stay beneath it: `EXDEV` if it leads out. A path with an absolute link on
/// it (which `RESOLVE_BENEATH` refuses, any absolute one), or where `openat2` is refused, is
/// followed one step at a time from the root (`RootDir::follow`), nothing outside it looked
/// up: by path (`canonicalize`, as before), what a link leading out met there showed in its
/// reason (`broken symlink` for `/etc/no-such-file`, `leading outside the root` for
/// `/etc/shadow`), which told anyone who may write in the tree what exists outside it (found
/// by a review).
fn link_target(cfg: &Config, root: &RootDir, rel: &Path) -> Result<OwnedFd, Errno> {
    if !root.has_openat2() {
        return root.follow(&cfg.root_named, rel);
    }
    match root.beneath(rel, true) {
        Err(Errno::XDEV | Errno::AGAIN) => root.follow(&cfg.root_named, rel),
        other => other,
    }
}

/// Removes the temp files that stopped filepipes left under `dir` (down to `depth`): only
/// those that carry filepipe's mark and no live writer's lock (see `output::examine_temp`).
fn remove_stale_temps(dir: &Path, depth: usize, stats: &Stats) {
    // Each temp's directory is reached beneath `dir` with no symlink on the way: one swapped
    // in during the sweep cannot lead it to a (dead, marked) temp elsewhere.
    let Ok(root) = crate::fsio::input::Root::new(dir) else {
        return;
    };
    let entries = WalkDir::new(dir).max_depth(depth).into_iter();
    for entry in entries.filter_map(Result::ok) {
        if !entry.file_type().is_file() || !output::is_temp_name(entry.file_name()) {
            continue;
        }
        let parent = entry.path().parent().unwrap_or(dir);
        let Ok(rel) = parent.strip_prefix(dir) else {
            continue;
        };
        if let Ok(fd) = root.open_dir(rel) {
            match output::examine_temp(&fd, entry.file_name(), true) {
                TempFound::Removed => {
                    stats.stale_temps_removed.fetch_add(1, Ordering::Relaxed);
                }
                // Not an input (this tree is filepipe's output), but not provably filepipe's
                // either: left, and said.
                TempFound::Unmarked(_) => tracing::warn!(
                    path = %entry.path().display(),
                    "named like a filepipe temp file but not marked as one: left alone"
                ),
                TempFound::Ignore | TempFound::InUse | TempFound::Stale | TempFound::Foreign => {}
            }
        }
    }
}

/// A file in the input tree named like a filepipe temp: removed if it is provably a stale
/// temp and this run writes its outputs in the input tree (gzip next to its inputs), ignored if
/// it is this process's own or a running filepipe's, and otherwise reported, never read: it is
/// either filepipe's leftover or someone's file that must not be taken for one. `None` when
/// there is nothing to report.
fn temp_reason(
    cfg: &Config,
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    rel: &Path,
    stats: &Stats,
) -> Option<FileError> {
    let remove = cfg.op.compresses() && cfg.out.is_none();
    let found = output::examine_temp(&dir, name, remove);
    let reason = match found {
        TempFound::Ignore => return None,
        TempFound::Removed => {
            stats.stale_temps_removed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        _ if !cfg.filter.included(rel) => return None,
        TempFound::InUse => FileError::new(
            Kind::TempInUse,
            "a temp file another running filepipe is writing; left alone",
        ),
        TempFound::Foreign => FileError::new(
            Kind::TempInUse,
            "a temp file of a filepipe on another host (or of an old version); left alone: \
             whether its writer is alive cannot be told from here",
        ),
        TempFound::Stale => FileError::new(
            Kind::StaleTemp,
            "a temp file a stopped filepipe left; not an input, and not removed: this run \
             writes no outputs in this tree",
        ),
        TempFound::Unmarked(errno) => FileError {
            kind: Kind::TempName,
            errno: errno.map(|e| e.raw_os_error()),
            message: format!(
                "named like a filepipe temp file but {}: neither read nor removed (rename it to \
                 have it processed)",
                match errno {
                    Some(e) => format!("cannot be examined ({e})"),
                    None => "not marked as one".into(),
                }
            ),
        },
    };
    Some(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::travel::Digest;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::symlink;

    fn config(root: &Path, extra: &[&str]) -> Config {
        let mut args = vec![root.to_str().unwrap(), "--op", "sha256"];
        args.extend_from_slice(extra);
        crate::config::batch_config(&args)
    }

    /// What an incremental walk of a tree with files `same` (recorded with its stamp),
    /// `changed` (recorded with another size) and `new`, and a recorded `gone`, sends: the
    /// files for the workers, the unchanged files' outcomes, and the files it found gone. With
    /// `late`, the state is read only once the walk has found every file, so they all wait for
    /// it; without, it is read before the walk starts.
    #[allow(clippy::type_complexity)]
    fn incremental_walk(late: bool) -> (Vec<PathBuf>, Vec<(PathBuf, Vec<Digest>)>, Vec<PathBuf>) {
        use crate::state::{FileStatus, Known, Record};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        for name in ["same", "changed", "new"] {
            std::fs::write(root.join(name), name).unwrap();
        }
        let state = tmp.path().join("state");
        let cfg = config(&root, &["--state", state.to_str().unwrap()]);
        let recorded = |name: &str, size_delta: u64| {
            let mut stamp = Stamp::of(&root.join(name)).unwrap_or(Stamp {
                size: 1,
                mtime_ns: 1,
                ctime_ns: 1,
                inode: 1,
            });
            stamp.size += size_delta;
            let record = Record {
                status: FileStatus::Done,
                stamp: Some(stamp),
                attempts: 0,
                in_use: false,
                made_output: false,
                digest: crate::digest::Digest::new(crate::digest::HashAlgo::Sha256, &[7; 32]),
                made_mtime: None,
            };
            let known = Known::of(crate::cli::OpKind::Sha256, record, 1);
            (PathBuf::from(name), known)
        };
        let map: KnownMap = [
            recorded("same", 0),
            recorded("changed", 1),
            recorded("gone", 0),
        ]
        .into_iter()
        .collect();
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let (stats, shutdown) = (Stats::default(), Shutdown::default());
        let out = Outlet {
            jobs: &jobs_tx,
            events: &events_tx,
            stats: &stats,
            recorded: None,
        };
        std::thread::scope(|s| {
            let stats = &stats;
            let loading = s.spawn(move || {
                let since = std::time::Instant::now();
                while late && stats.files.load(Ordering::Relaxed) < 3 {
                    assert!(since.elapsed().as_secs() < 10, "the walk found no files");
                    std::thread::yield_now();
                }
                Ok(map)
            });
            while !late && !loading.is_finished() {
                std::thread::yield_now();
            }
            walk(&cfg, &out, &shutdown, Some(loading), true).unwrap();
        });
        drop((jobs_tx, events_tx));
        let mut sent: Vec<PathBuf> = jobs_rx
            .iter()
            .flat_map(|m| match m {
                Msg::Jobs(jobs) => jobs.into_iter().map(|j| j.rel).collect::<Vec<_>>(),
                Msg::Shutdown => Vec::new(),
            })
            .collect();
        sent.sort();
        let (mut unchanged, mut gone) = (Vec::new(), Vec::new());
        for event in events_rx {
            match event {
                Event::Unchanged(files) => unchanged.extend(
                    files
                        .iter()
                        .map(|(name, d)| (PathBuf::from(OsStr::from_bytes(name)), d.to_vec())),
                ),
                Event::Unlisted(rels) => gone.extend(rels),
                other => panic!("unexpected {other:?}"),
            }
        }
        (sent, unchanged, gone)
    }

    #[test]
    fn an_incremental_walk_takes_unchanged_files_from_the_state_whenever_it_is_read() {
        for late in [false, true] {
            let (sent, unchanged, gone) = incremental_walk(late);
            let names = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
            assert_eq!(sent, names(&["changed", "new"]), "late: {late}");
            assert_eq!(unchanged.len(), 1, "late: {late}");
            let (rel, digests) = &unchanged[0];
            assert_eq!(rel, Path::new("same"));
            assert_eq!(
                digests.first().map(|d| d.as_bytes().to_vec()),
                Some(vec![7; 32])
            );
            assert_eq!(gone, names(&["gone"]), "late: {late}");
        }
    }

    #[test]
    fn rel_under_is_strip_prefix() {
        let roots = [
            "/r", "/r/s", "/", "/r/", "/r//s", "/r/./s", "/r/.", "r/s", "/r/..",
        ];
        let rests = [
            "a", "a/b", "", "/a", "a/", "a//b", "./a", "a/./b", "a/.", ".", "..", "a/..",
        ];
        for root in roots {
            for rest in rests {
                for sep in ["/", "", "//"] {
                    let path = PathBuf::from(format!("{root}{sep}{rest}"));
                    let want = path.strip_prefix(root).unwrap_or(&path);
                    let got = rel_under(Path::new(root), &path);
                    assert_eq!(got.as_os_str(), want.as_os_str(), "{root:?} {path:?}");
                }
            }
        }
    }

    fn assert_stamp(path: &Path, stamp: Option<Stamp>, st: rustix::io::Result<rfs::Stat>) {
        let want = Stamp::from_stat(&st.unwrap());
        assert_eq!(stamp, Some(want), "{}", path.display());
    }

    /// Every stamp the walk hands on, by path relative to the root.
    fn stamps(cfg: &Config) -> Vec<(PathBuf, Option<Stamp>)> {
        let mut out = Vec::new();
        let (stats, shutdown) = (Stats::default(), Shutdown::default());
        scan(cfg, &cfg.root, &stats, &shutdown, &mut |f| {
            if let Found::File(rel, stamp) = f {
                out.push((rel, stamp));
            }
            true
        });
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn stamps_are_the_lstat_of_each_file_at_every_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dir = tmp.path().to_path_buf();
        let mut want = Vec::new();
        // Deeper than DIR_FDS, with files before and after each subdirectory in any order.
        for level in 0..(DIR_FDS + 6) {
            for name in ["a", "z"] {
                let f = dir.join(format!("{name}{level}"));
                std::fs::write(&f, vec![b'x'; level * 3 + name.len()]).unwrap();
                want.push(f);
            }
            dir.push("d");
            std::fs::create_dir(&dir).unwrap();
        }
        let cfg = config(tmp.path(), &[]);
        let got = stamps(&cfg);
        assert_eq!(got.len(), want.len());
        for (rel, stamp) in got {
            let path = cfg.root.join(&rel);
            assert_stamp(&path, stamp, rfs::lstat(&path));
        }
    }

    #[test]
    fn with_follow_symlinks_only_links_are_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("target"), b"twelve bytes").unwrap();
        symlink("target", root.join("link")).unwrap();
        std::fs::create_dir(root.join("real")).unwrap();
        std::fs::write(root.join("real/inner"), b"inner").unwrap();
        symlink("real", root.join("dirlink")).unwrap();
        let cfg = config(root, &["--follow-symlinks"]);
        let got = stamps(&cfg);
        let names: Vec<_> = got.iter().map(|(r, _)| r.to_str().unwrap()).collect();
        assert_eq!(names, ["dirlink/inner", "link", "real/inner", "target"]);
        for (rel, stamp) in got {
            // The link is stat'ed through to its target, as a stat of its path would.
            let path = cfg.root.join(&rel);
            assert_stamp(&path, stamp, rfs::stat(&path));
        }
        // Without the option, the link is never stat'ed as a file at all.
        let cfg = config(root, &[]);
        let names: Vec<_> = stamps(&cfg).into_iter().map(|(r, _)| r).collect();
        assert_eq!(
            names,
            [PathBuf::from("real/inner"), PathBuf::from("target")]
        );
    }

    #[test]
    fn a_directory_swapped_for_a_link_after_the_listing_is_not_walked_through() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"not the tree's").unwrap();
        for i in 0..10 {
            std::fs::write(root_file(&root, &format!("f{i}")), b"a file").unwrap();
            std::fs::write(root_file(&root, &format!("d{i}/inner")), b"in a directory").unwrap();
        }
        let cfg = config(&root, &[]);
        let (stats, shutdown) = (Stats::default(), Shutdown::default());
        let (mut dirs_seen, mut swapped) = (Vec::new(), Vec::new());
        let (mut files, mut skipped) = (Vec::new(), Vec::new());
        scan(&cfg, &cfg.root, &stats, &shutdown, &mut |f| {
            match f {
                Found::Dir(d) => dirs_seen.push(d),
                Found::File(rel, _) => {
                    if files.is_empty() {
                        // The root is listed already: every directory not walked yet becomes
                        // a link to a directory outside the tree.
                        for i in 0..10 {
                            let d = cfg.root.join(format!("d{i}"));
                            if !dirs_seen.contains(&d) {
                                std::fs::rename(&d, tmp.path().join(format!("moved{i}"))).unwrap();
                                symlink(&outside, &d).unwrap();
                                swapped.push(PathBuf::from(format!("d{i}")));
                            }
                        }
                    }
                    files.push(rel);
                }
                Found::Report(Outcome::Skipped { rel, reason }) => {
                    assert_eq!(reason.kind, Kind::Symlink, "{rel:?}: {reason:?}");
                    skipped.push(rel);
                }
                Found::Report(other) => panic!("unexpected {other:?}"),
            }
            true
        });
        assert!(
            !swapped.is_empty(),
            "the first file came after every directory"
        );
        assert!(
            !files.iter().any(|f| f.ends_with("secret")),
            "walked through a link: {files:?}"
        );
        skipped.sort();
        swapped.sort();
        assert_eq!(skipped, swapped);
        assert_eq!(files.len(), 10 + 10 - swapped.len(), "{files:?}");
    }

    fn root_file(root: &Path, rel: &str) -> PathBuf {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    }

    #[test]
    fn a_file_swapped_for_a_link_after_the_listing_is_not_stated_as_its_target() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir(&root).unwrap();
        std::fs::write(&outside, vec![b'o'; 5000]).unwrap();
        for i in 0..10 {
            std::fs::write(root.join(format!("f{i}")), b"listed as a regular file").unwrap();
        }
        let cfg = config(&root, &["--follow-symlinks"]);
        let (stats, shutdown) = (Stats::default(), Shutdown::default());
        let mut seen = Vec::new();
        scan(&cfg, &cfg.root, &stats, &shutdown, &mut |f| {
            if let Found::File(rel, stamp) = f {
                if seen.is_empty() {
                    // The directory is listed already: swap every other file for a link.
                    for i in 0..10 {
                        let p = cfg.root.join(format!("f{i}"));
                        if p != cfg.root.join(&rel) {
                            std::fs::remove_file(&p).unwrap();
                            symlink(&outside, &p).unwrap();
                        }
                    }
                }
                seen.push((cfg.root.join(rel), stamp));
            }
            true
        });
        assert_eq!(seen.len(), 10);
        for (abs, stamp) in &seen[1..] {
            // The link's own lstat (which the worker's fstat of the target will not match),
            // never the outside file's stat.
            assert_stamp(abs, *stamp, rfs::lstat(abs));
        }
    }

    /// What a walk hands on, as comparable lines: the path relative to the root, and what it is.
    fn found_line(found: Found, root: &Path) -> (PathBuf, String) {
        match found {
            Found::File(rel, stamp) => (rel, format!("file {stamp:?}")),
            Found::Dir(dir) => (rel_under(root, &dir).to_path_buf(), "dir".into()),
            Found::Report(Outcome::Skipped { rel, reason }) => (rel, format!("skipped {reason:?}")),
            Found::Report(Outcome::Failed { rel, error }) => (rel, format!("failed {error:?}")),
            Found::Report(other) => panic!("unexpected {other:?}"),
        }
    }

    /// A chain whose paths grow past PATH_MAX: the walk goes into every directory whose path
    /// an open by path takes, reports the first one past it once (as walkdir's open of it
    /// did: `ENAMETOOLONG`) and goes no deeper (it went on down by descriptor, as deep as the
    /// chain, every file below failing in the workers).
    #[test]
    fn a_directory_past_path_max_is_reported_once_and_not_walked() {
        use rustix::fs::{mkdirat, openat, Mode, OFlags, CWD};
        let tmp = tempfile::tempdir().unwrap();
        let name = "d".repeat(200);
        let mut dir = tmp.path().to_path_buf();
        let mut want_files = 0;
        while dir.join(&name).as_os_str().len() < libc::PATH_MAX as usize {
            dir.push(&name);
            std::fs::create_dir(&dir).unwrap();
            if dir.join("f").as_os_str().len() < libc::PATH_MAX as usize {
                std::fs::write(dir.join("f"), b"x").unwrap();
                want_files += 1;
            }
        }
        // One past it, and more below, made relative to the last one openable by path.
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mut at = openat(CWD, &dir, flags, Mode::empty()).unwrap();
        for _ in 0..5 {
            mkdirat(&at, name.as_str(), Mode::RWXU).unwrap();
            at = openat(&at, name.as_str(), flags, Mode::empty()).unwrap();
            let f = OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC;
            drop(openat(&at, "f", f, Mode::RUSR | Mode::WUSR).unwrap());
        }
        let cfg = config(tmp.path(), &[]);
        let (stats, shutdown) = (Stats::default(), Shutdown::default());
        let mut lines = Vec::new();
        scan(&cfg, &cfg.root, &stats, &shutdown, &mut |f| {
            lines.push(found_line(f, &cfg.root));
            true
        });
        let files = lines.iter().filter(|(_, l)| l.starts_with("file")).count();
        let failed: Vec<_> = lines
            .iter()
            .filter(|(_, l)| l.starts_with("failed"))
            .collect();
        assert_eq!(files, want_files, "{} lines", lines.len());
        assert_eq!(failed.len(), 1, "{failed:?}");
        let (rel, line) = failed[0];
        assert_eq!(cfg.root.join(rel), dir.join(&name));
        assert!(line.contains("File name too long"), "{line}");
    }

    fn fifo(path: &Path) {
        use rustix::fs::{FileType, Mode, CWD};
        rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::RUSR | Mode::WUSR, 0).unwrap();
    }

    /// A tree of many directories (`width` of them, with subdirectories and files), a chain
    /// deeper than DIR_FDS, FIFOs and links among them.
    fn wide_tree(root: &Path, width: usize) {
        for i in 0..width {
            std::fs::write(root_file(root, &format!("a{i}/top")), b"top").unwrap();
            for j in 0..3 {
                for k in 0..4 {
                    let f = root_file(root, &format!("a{i}/s{j}/f{k}"));
                    std::fs::write(f, vec![b'x'; i + j + k]).unwrap();
                }
            }
        }
        fifo(&root.join("a1/s1/fifo"));
        symlink("../s0/f0", root.join("a2/s1/link")).unwrap();
        symlink("../../a3", root.join("a2/s2/dirlink")).unwrap();
        symlink("/", root.join("a4/out")).unwrap();
        let mut deep = root.join("deep");
        for level in 0..(DIR_FDS + 6) {
            deep.push(format!("d{level}"));
            std::fs::write(root_file(&deep, "f"), b"deep").unwrap();
        }
    }

    /// Everything `scan_split` hands on, sorted, and how many subtrees went to other walkers.
    fn split_lines(cfg: &Config) -> (Vec<(PathBuf, String)>, usize) {
        let (stats, shutdown) = (Stats::default(), Shutdown::default());
        let mut lines = Vec::new();
        let handed = scan_split(cfg, &stats, &shutdown, &mut |f| {
            lines.push(found_line(f, &cfg.root));
            true
        });
        lines.sort();
        (lines, handed)
    }

    #[test]
    fn a_walk_split_over_threads_finds_what_one_walk_finds() {
        let tmp = tempfile::tempdir().unwrap();
        wide_tree(tmp.path(), 60);
        let cfg = config(tmp.path(), &[]);
        let (stats, shutdown) = (Stats::default(), Shutdown::default());
        let mut one = Vec::new();
        scan(&cfg, &cfg.root, &stats, &shutdown, &mut |f| {
            one.push(found_line(f, &cfg.root));
            true
        });
        one.sort();
        assert_eq!(one.len(), 60 * (2 + 3 * 5) + 1 + 2 * (DIR_FDS + 6) + 4);
        // Whether a walker is idle when another comes to a directory depends on the scheduler:
        // walked again until the walk was split at least once (each walk must find the same).
        // (Tried for up to a minute: twenty walks were not always enough on a busy machine.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let (lines, handed) = split_lines(&cfg);
            assert_eq!(lines, one);
            if handed > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no walk was split");
        }
    }

    #[test]
    fn a_chain_of_directories_is_walked_by_one_walker_and_siblings_are_handed_over() {
        let tmp = tempfile::tempdir().unwrap();
        let mut deep = tmp.path().to_path_buf();
        for level in 0..40 {
            std::fs::write(root_file(&deep, "f"), format!("{level}")).unwrap();
            deep.push("d");
        }
        let cfg = config(tmp.path(), &[]);
        // Every level's only subdirectory is the first its walker comes to: kept, however
        // many walkers are idle.
        for _ in 0..5 {
            let (lines, handed) = split_lines(&cfg);
            assert_eq!(lines.len(), 40 + 39);
            assert_eq!(handed, 0);
        }
        // Beside a sibling, a subdirectory is handed over to an idle walker.
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..40 {
            std::fs::write(root_file(tmp.path(), &format!("d{i}/f")), b"x").unwrap();
        }
        let cfg = config(tmp.path(), &[]);
        // Whether a walker is idle when a sibling comes depends on the machine's load: tried
        // until one is, for up to a minute (one run in twenty was not enough on a busy CI).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while split_lines(&cfg).1 == 0 {
            assert!(std::time::Instant::now() < deadline, "no walk was split");
        }
    }

    #[test]
    fn what_is_beneath_a_directory_not_listed_is_not_taken_as_gone() {
        let dirs = |v: &[&str]| v.iter().map(PathBuf::from).collect();
        let failed = dirs(&["a/locked", "b"]);
        for (rel, beneath) in [
            ("a/locked", true),
            ("a/locked/f", true),
            ("a/locked/sub/f", true),
            ("b/f", true),
            ("a/lockedx/f", false),
            ("a/f", false),
            ("bb/f", false),
            ("f", false),
        ] {
            assert_eq!(beneath_any(Path::new(rel), &failed), beneath, "{rel}");
        }
        let root = dirs(&[""]);
        assert!(beneath_any(Path::new("any/f"), &root));
        assert!(beneath_any(Path::new("f"), &root));
        assert!(!beneath_any(Path::new("f"), &dirs(&[])));
    }

    #[test]
    fn a_split_walk_stops_when_its_thread_stops_taking_entries_or_on_shutdown() {
        let tmp = tempfile::tempdir().unwrap();
        // More files than can be in flight when the walkers see the shutdown (below), so a walk
        // that went on regardless would be caught.
        let in_flight = (1 + WALKERS * (FOUND_CHUNKS_PER_WALKER + 1)) * FOUND_CHUNK;
        let (dirs, per_dir) = (64, 400);
        assert!(dirs * per_dir > 10 + in_flight);
        // Links to one file: as many regular files to the walk, at a fraction of the cost.
        let one = tmp.path().join("one");
        std::fs::write(&one, b"x").unwrap();
        for i in 0..dirs {
            let dir = tmp.path().join(format!("d{i}"));
            std::fs::create_dir(&dir).unwrap();
            for k in 0..per_dir {
                std::fs::hard_link(&one, dir.join(format!("f{k}"))).unwrap();
            }
        }
        let cfg = config(tmp.path(), &[]);
        let stats = Stats::default();
        let shutdown = Shutdown::default();
        let mut taken = 0;
        scan_split(&cfg, &stats, &shutdown, &mut |_| {
            taken += 1;
            taken < 10
        });
        assert_eq!(taken, 10);
        let mut files = 0;
        scan_split(&cfg, &stats, &shutdown, &mut |f| {
            files += usize::from(matches!(f, Found::File(..)));
            if files == 10 {
                shutdown.request(libc::SIGTERM);
            }
            true
        });
        // What was found before the walkers saw the shutdown, not the whole tree: no more than
        // the chunk being taken, those in the channel (`FOUND_CHUNKS_PER_WALKER` a walker), and
        // one more from each walker.
        assert!((10..=10 + in_flight).contains(&files), "{files} files");
    }

    #[test]
    fn a_directory_handed_over_is_walked_by_its_descriptor_whatever_its_name_leads_to_now() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::write(root_file(&outside, "secret"), b"not the tree's").unwrap();
        std::fs::write(root_file(&root, "real/inner"), b"in the tree").unwrap();
        let cfg = config(&root, &[]);
        let (stats, shutdown) = (Stats::default(), Shutdown::default());
        let (tx, _rx) = crossbeam_channel::bounded(WALKERS);
        let split = Split::new(tx, WALKERS);
        let rootdir = RootDir::open(&cfg.root).unwrap();
        // Opened by the walker that came to it, then swapped for a link to a directory
        // outside the tree before the walker it was handed to lists it.
        let opened = rootdir.list_beneath(Path::new("real"), false).unwrap();
        std::fs::rename(root.join("real"), tmp.path().join("aside")).unwrap();
        symlink(&outside, root.join("real")).unwrap();
        let mut lines = Vec::new();
        let top = Top::Opened(opened, cfg.root.join("real"));
        scan_tree(
            &cfg,
            &rootdir,
            top,
            How {
                split: Some(&split),
                stamps: true,
            },
            &stats,
            &shutdown,
            &mut |f| {
                lines.push(found_line(f, &cfg.root));
                true
            },
        );
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].0, PathBuf::from("real/inner"));
        assert!(lines[0].1.starts_with("file Some"), "{lines:?}");
        // Beneath the root, a directory that is a link now is not opened at all.
        let now = rootdir.list_beneath(Path::new("real"), false).err();
        assert!(matches!(now, Some(Errno::LOOP | Errno::NOTDIR)), "{now:?}");
    }
}
