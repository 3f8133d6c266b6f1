//! The settle queue: paths wait here until their writer is done, then queue up for the
//! workers. The clock is the caller's (`now` on every call), so the rules below have fast unit
//! tests with made-up times.
//!
//! The rules: a file is taken only once it was closed after writing, renamed in, found by a
//! scan, or linked in whole (`Pending::linked`), and then nothing happened to it for the
//! settle time; a write after a close makes it wait for the next close; a file found by a scan
//! is taken after the settle time unless an event says otherwise (or, where writers make no
//! events, once a second look a settle time later finds it unchanged); a file the state
//! already has with the same stamp is not taken again, unless a writer closed it since. Paths are
//! coalesced while they wait: a burst costs memory per distinct path, never per event.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::travel::Stamp;

/// Path-keyed maps: foldhash is several times faster than std's SipHash on paths, and its
/// per-process random seed still keeps crafted file names from forcing collisions.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type Set<K> = HashSet<K, foldhash::fast::RandomState>;

/// The least time between the two looks that find a file linked in whole, whatever the settle
/// time: a writer's `echo x > f` makes its create event, then its write and close events, and
/// a look between them finds the content there already. With `--settle 0` both looks came at
/// once, before the write's events were read, so the file was taken as linked in whole, and
/// then again, with the same bytes, at its close (found by a review: 61 done for 60 files,
/// nothing said). The write's events, read in between, make it an ordinary file.
const LINKED_LOOK_GAP: Duration = Duration::from_millis(50);

/// Whether a scan follows lost events (a queue overflow), which changes what it may assume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lost {
    /// Events are complete: a pending file is still being written.
    Nothing,
    /// The kernel dropped events: any pending file may have been closed since.
    Events,
    /// A poll of a tree whose writers make no events here (other hosts writing to a network
    /// file system, `--poll`): what the scan finds may still be being written, so it is taken
    /// only once a second look, a settle time later, finds the same stamp. Events that do
    /// come (local writers) still decide for the files they told of.
    Unseen,
}

/// What the queue asks of the file system and the state when a file comes due.
pub(crate) trait Look {
    /// The stamp of `rel` if it is a regular file with content or more than one name (what a
    /// file linked in whole looks like); `None` if it is empty with one name, or gone.
    fn linked(&self, rel: &Path) -> Option<Stamp>;
    /// The stamp of `rel` if it is a regular file; `None` if it is not, or gone.
    fn stamp(&self, rel: &Path) -> Option<Stamp>;
    /// Whether the state has `rel` recorded (done, skipped or failed for good) with `stamp`.
    fn settled(&self, rel: &Path, stamp: Option<Stamp>) -> Result<bool>;
    /// Whether `rel` is there but will never have a stamp to settle on: it is neither a
    /// regular file nor a directory, or it cannot be looked at (its directory lets it be
    /// listed but not searched: a stamp taken then is `None`, as a file gone has). The worker
    /// says which.
    fn stampless(&self, rel: &Path) -> bool;
}

/// How often a file waiting for its writer's close is looked at, to forget it if its name
/// went with no event said so at that name.
const GONE_LOOK: Duration = Duration::from_secs(5);

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
    /// one the state has (see `Settle::closed`).
    closed: bool,
}

/// A file found by a scan, waiting for its settle time.
#[derive(Debug)]
struct Scanned {
    due: Instant,
    rel: PathBuf,
    /// What the scan saw.
    stamp: Option<Stamp>,
    /// Taken only if a look when due finds `stamp` still (`Lost::Unseen`).
    look_again: bool,
}

/// Paths waiting to settle, and settled ones waiting for the workers.
#[derive(Debug)]
pub(crate) struct Settle {
    settle: Duration,
    /// Paths events told of, waiting for their writer.
    pending: Map<PathBuf, Pending>,
    /// When complete pending files are due, earliest first, so a wake-up looks only at those
    /// (not at every waiting path: that made a 100,000-file burst quadratic). One entry per
    /// path at most (`queued`): a file touched again before its entry comes due is put back
    /// then, at its new time. (An entry per event made memory grow with the events, not with
    /// the files: 300 MB in 20 s for 64 names touched in a loop; found by a review.)
    deadlines: BinaryHeap<Reverse<(Instant, PathBuf)>>,
    /// The time of each path's entry in `deadlines`.
    queued: Map<PathBuf, Instant>,
    /// Files found by scans, due in the order found, with the stamp the scan saw.
    scanned: VecDeque<Scanned>,
    /// The paths in `scanned`: a file two overlapping scans find is queued once.
    scanned_set: Set<PathBuf>,
    /// Settled files, in the order they settled.
    ready: VecDeque<PathBuf>,
    /// The paths in `ready`, so a burst is coalesced in O(1) per path, with the stamp each
    /// settled with (the worker checks it). A path in `ready` but not here was forgotten.
    ready_set: Map<PathBuf, Option<Stamp>>,
    /// The paths in `ready` that a writer closed since they were last taken (`Pending::closed`):
    /// one the workers still have is then looked at again whatever its stamp (`closed_since`).
    closed_ready: Set<PathBuf>,
}

impl Settle {
    /// An empty queue whose files settle after `settle` without events.
    pub(crate) fn new(settle: Duration) -> Self {
        Settle {
            settle,
            pending: Map::default(),
            deadlines: BinaryHeap::new(),
            queued: Map::default(),
            scanned: VecDeque::new(),
            scanned_set: Set::default(),
            ready: VecDeque::new(),
            ready_set: Map::default(),
            closed_ready: Set::default(),
        }
    }

    /// Activity on `rel` at `now`; `complete` if it was closed after writing or renamed in,
    /// with `stamp` taken then.
    pub(crate) fn touch(
        &mut self,
        rel: PathBuf,
        complete: bool,
        stamp: Option<Stamp>,
        now: Instant,
    ) {
        if complete {
            self.schedule(&rel, now + self.settle);
        } else {
            // Waits for its close; looked at now and then in case its name went (`promote`).
            self.schedule(&rel, now + GONE_LOOK);
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

    /// A writer closed `rel` (already `touch`ed): it is taken again even if its stamp is the
    /// one already done, since writes through a shared mapping change no stamp, and the
    /// mapping's end is this close.
    pub(crate) fn closed(&mut self, rel: &Path) {
        if let Some(p) = self.pending.get_mut(rel) {
            p.closed = true;
        }
    }

    /// A new name in the tree (`IN_CREATE`): a writer starting, or a file linked in whole. It
    /// waits as `linked` until a write says which (see `Pending::linked`); nothing is stat'ed
    /// here, so a burst of created files costs no more than before.
    pub(crate) fn appeared(&mut self, rel: PathBuf, now: Instant) {
        self.schedule(&rel, now + self.settle);
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

    /// A metadata change (chmod, touch, chown) restarts the settle clock but says nothing about
    /// whether the writer is done: a waiting file keeps its state; any other file is looked at
    /// again (the state tells whether it really changed).
    pub(crate) fn touched_metadata(&mut self, rel: PathBuf, stamp: Option<Stamp>, now: Instant) {
        match self.pending.get_mut(&rel) {
            Some(p) if p.linked => {
                // Still nothing written: settle again from now.
                p.since = now;
                p.stamp = None;
                self.schedule(&rel, now + self.settle);
            }
            waiting => {
                let complete = waiting.is_none_or(|p| p.complete);
                self.touch(rel, complete, stamp, now);
            }
        }
    }

    /// Puts `rel` in `deadlines` at `due`, unless it is there already no later (it is put back
    /// at its time then, if touched since: see `promote`).
    fn schedule(&mut self, rel: &Path, due: Instant) {
        if self.queued.get(rel).is_some_and(|&at| at <= due) {
            return;
        }
        self.queued.insert(rel.to_path_buf(), due);
        self.deadlines.push(Reverse((due, rel.to_path_buf())));
    }

    /// A file found by a scan (and not in flight): complete unless events say it is still being
    /// written. After an overflow, events cannot say so (the close may be what was lost), so
    /// the scan is trusted and the settle time alone guards against a writer still at work.
    pub(crate) fn found(&mut self, rel: PathBuf, stamp: Option<Stamp>, lost: Lost, now: Instant) {
        if stamp.is_none() {
            // Vanished since the listing: its removal event follows.
            return;
        }
        if let Some(waiting) = self.ready_set.get_mut(&rel) {
            if lost != Lost::Unseen || *waiting == stamp {
                *waiting = stamp;
                return;
            }
            // Changed, unseen, while it waited for a worker: it settles again, from this look
            // (its place in `ready` is skipped once it is out of the set).
            self.ready_set.remove(&rel);
        }
        if lost == Lost::Events {
            self.pending.remove(&rel);
        } else if let Some(p) = self.pending.get(&rel) {
            // At a poll, a file waiting for its writer's close with no event for a whole
            // settle time is taken as the scan found it: a truncate(2) by path writes with no
            // open and no close, and the file waited for ever with its old digest (found by a
            // review). The second look a settle time later, and the worker's check for a
            // writer that still has it open, guard a writer at work.
            let quiet =
                !p.complete && !p.linked && now.saturating_duration_since(p.since) >= self.settle;
            if lost != Lost::Unseen || !quiet {
                return;
            }
            self.pending.remove(&rel);
        }
        if !self.scanned_set.insert(rel.clone()) {
            return;
        }
        // A queue of its own, not `pending`: scanned files settle in the order found, so a
        // 100,000-file scan costs a push and a pop each rather than map and heap updates.
        self.scanned.push_back(Scanned {
            due: now + self.settle,
            rel,
            stamp,
            look_again: lost == Lost::Unseen,
        });
    }

    /// `rel` is gone: it leaves the queue. Its entries in `ready`, `scanned` and `deadlines`
    /// are skipped once it is out of their sets.
    pub(crate) fn forget(&mut self, rel: &Path) {
        self.pending.remove(rel);
        self.ready_set.remove(rel);
        self.scanned_set.remove(rel);
        self.closed_ready.remove(rel);
    }

    /// Moves the files settled by `now` to the ready queue.
    pub(crate) fn promote(&mut self, now: Instant, look: &impl Look) -> Result<()> {
        while self.scanned.front().is_some_and(|s| s.due <= now) {
            let Some(s) = self.scanned.pop_front() else {
                break;
            };
            // An event since the scan put it in `pending`, which now decides; otherwise it was
            // not touched for the whole settle time (and the worker checks `stamp`). The scan
            // already found it unsettled in the state. Out of the set: forgotten since.
            if !self.scanned_set.contains(&s.rel) || self.pending.contains_key(&s.rel) {
                self.scanned_set.remove(&s.rel);
                continue;
            }
            if s.look_again {
                // No event would have told of a write since the scan: look.
                match look.stamp(&s.rel) {
                    Some(seen) if Some(seen) == s.stamp => {}
                    // Still changing: another settle time from this look.
                    Some(seen) => {
                        self.scanned.push_back(Scanned {
                            due: now + self.settle,
                            stamp: Some(seen),
                            ..s
                        });
                        continue;
                    }
                    // Gone, or no longer a regular file: the next scan decides.
                    None => {
                        self.scanned_set.remove(&s.rel);
                        continue;
                    }
                }
            }
            self.scanned_set.remove(&s.rel);
            self.make_ready(s.rel, s.stamp);
        }
        while self
            .deadlines
            .peek()
            .is_some_and(|Reverse((at, _))| *at <= now)
        {
            let Some(Reverse((at, rel))) = self.deadlines.pop() else {
                break;
            };
            if self.queued.get(&rel) != Some(&at) {
                // Put back earlier than this (forgotten, then touched anew).
                continue;
            }
            self.queued.remove(&rel);
            let settle = self.settle;
            let Some(p) = self.pending.get_mut(&rel) else {
                continue;
            };
            if !(p.complete || p.linked) {
                // Reopened: its close puts it back. Unless its name has gone since: events
                // heard at a path under a directory renamed or removed at once (a removal
                // forgets only the directory's own name) waited here for a close that never
                // comes at that path, counted queued until the daemon stopped (found while
                // testing a burst of directories made and renamed at once).
                if look.stamp(&rel).is_none() && !look.stampless(&rel) {
                    self.pending.remove(&rel);
                } else {
                    self.schedule(&rel, now + GONE_LOOK);
                }
                continue;
            }
            if p.since + settle > at {
                // Touched again since: back at its new time.
                let due = p.since + settle;
                self.schedule(&rel, due);
                continue;
            }
            if p.linked && !p.complete {
                // No write through its name for a whole settle time. Linked in whole if it
                // has content (or other names); then it must stay exactly so for one more
                // settle time, as a closed file must.
                match (p.stamp, look.linked(&rel)) {
                    // Unchanged across the settle time: as good as closed.
                    (Some(then), Some(seen)) if then == seen => p.complete = true,
                    // First look, or changed by something no event reported: look again.
                    (_, Some(seen)) => {
                        p.stamp = Some(seen);
                        p.since = now;
                        self.schedule(&rel, now + settle.max(LINKED_LOOK_GAP));
                        continue;
                    }
                    // Not a regular file (a symlink, a FIFO, a socket made in the tree): no
                    // event will come for it, and it is to be reported, as a scan reports it
                    // (it waited for ever: found by a review). The worker says what it is.
                    (_, None) if look.stampless(&rel) => {
                        self.pending.remove(&rel);
                        self.make_ready(rel, None);
                        continue;
                    }
                    // Empty with one name (a writer that has not written yet) or gone:
                    // events decide from here, and a look now and then whether it is gone
                    // (a directory made and renamed at once, its creation heard as a file's
                    // when it was no longer there to be told a directory, waited for ever).
                    (_, None) => {
                        p.linked = false;
                        self.schedule(&rel, now + GONE_LOOK);
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
                // Vanished before its stamp was taken: its removal event follows. Unless it
                // cannot be looked at: the worker then says why (`permission-denied`); taken
                // for gone, it was never reported (found by a review).
                if look.stampless(&rel) {
                    self.make_ready(rel, None);
                }
                continue;
            }
            if p.closed {
                self.closed_ready.insert(rel.clone());
                self.make_ready(rel, p.stamp);
            } else if !look.settled(&rel, p.stamp)? {
                self.make_ready(rel, p.stamp);
            }
        }
        Ok(())
    }

    /// Queues `rel` for the workers, or (already queued) only updates its stamp.
    fn make_ready(&mut self, rel: PathBuf, stamp: Option<Stamp>) {
        if self.ready_set.insert(rel.clone(), stamp).is_none() {
            self.ready.push_back(rel);
        }
    }

    /// The size of the next ready file (0 if unknown), after dropping what went stale at the
    /// front: forgotten files, and files written to again since they settled (they wait for
    /// a new settle time in `pending`). `None` when nothing is ready.
    pub(crate) fn next_size(&mut self) -> Option<u64> {
        while let Some(front) = self.ready.front() {
            match self.ready_set.get(front) {
                None => {}
                Some(_) if self.pending.contains_key(front) => {
                    self.ready_set.remove(front);
                }
                Some(stamp) => return Some(stamp.map_or(0, |s| s.size)),
            }
            self.ready.pop_front();
        }
        None
    }

    /// The next ready file and the stamp it settled with (see `next_size`).
    pub(crate) fn pop_ready(&mut self) -> Option<(PathBuf, Option<Stamp>)> {
        self.next_size()?;
        let rel = self.ready.pop_front()?;
        let stamp = self.ready_set.remove(&rel)?;
        Some((rel, stamp))
    }

    /// Whether `rel`, just taken with `pop_ready`, was closed by a writer since it was last
    /// taken; forgotten once asked.
    pub(crate) fn closed_since(&mut self, rel: &Path) -> bool {
        !self.closed_ready.is_empty() && self.closed_ready.remove(rel)
    }

    /// Puts a file taken with `pop_ready` back at the front (the job channel was full).
    pub(crate) fn unpop(&mut self, rel: PathBuf, stamp: Option<Stamp>) {
        self.ready_set.insert(rel.clone(), stamp);
        self.ready.push_front(rel);
    }

    /// Whether files are ready for the workers (some may have gone stale).
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// When the next waiting file may be due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let deadline = self.deadlines.peek().map(|Reverse((at, _))| *at);
        let scanned = self.scanned.front().map(|s| s.due);
        deadline.into_iter().chain(scanned).min()
    }

    /// Files waiting to settle or for the workers.
    pub(crate) fn queued(&self) -> usize {
        self.pending.len() + self.scanned.len() + self.ready.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    const SETTLE: Duration = Duration::from_millis(100);

    /// A made-up tree and state: what `linked` and `settled` answer, and who asked.
    #[derive(Default)]
    struct Fake {
        linked: HashMap<PathBuf, Stamp>,
        /// What a plain look finds (regular files).
        files: HashMap<PathBuf, Stamp>,
        settled: HashMap<PathBuf, Stamp>,
        /// Neither regular files nor directories.
        special: std::collections::HashSet<PathBuf>,
        asked_linked: RefCell<Vec<PathBuf>>,
    }

    impl Look for Fake {
        fn linked(&self, rel: &Path) -> Option<Stamp> {
            self.asked_linked.borrow_mut().push(rel.to_path_buf());
            self.linked.get(rel).copied()
        }
        fn stamp(&self, rel: &Path) -> Option<Stamp> {
            self.files.get(rel).copied()
        }
        fn settled(&self, rel: &Path, stamp: Option<Stamp>) -> Result<bool> {
            Ok(stamp.is_some() && self.settled.get(rel).copied() == stamp)
        }
        fn stampless(&self, rel: &Path) -> bool {
            self.special.contains(rel)
        }
    }

    fn stamp(size: u64) -> Option<Stamp> {
        Some(Stamp {
            size,
            mtime_ns: 1,
            ctime_ns: 1,
            inode: 7,
        })
    }

    /// Everything ready at `now`, in order, taken out.
    fn ready_at(q: &mut Settle, now: Instant, look: &Fake) -> Vec<String> {
        q.promote(now, look).unwrap();
        std::iter::from_fn(|| q.pop_ready())
            .map(|(rel, _)| rel.display().to_string())
            .collect()
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    /// Memory grows with the files, not the events: a name touched 100,000 times (created,
    /// closed, chmod'ed, forgotten and created again) holds one deadline, and is taken once
    /// quiet (found by a review: an entry per event, 300 MB in 20 s).
    #[test]
    fn a_file_touched_again_and_again_holds_one_deadline() {
        let t0 = Instant::now();
        let look = Fake::default();
        let mut q = Settle::new(SETTLE);
        for i in 0..100_000u64 {
            let now = t0 + Duration::from_micros(i);
            match i % 4 {
                0 => q.touch("f".into(), true, stamp(i), now),
                1 => q.touched_metadata("f".into(), stamp(i), now),
                2 => q.forget(Path::new("f")),
                _ => q.appeared("f".into(), now),
            }
            assert!(q.deadlines.len() <= 2, "{i}: {}", q.deadlines.len());
        }
        q.touch("f".into(), true, stamp(1), ms(t0, 100));
        assert!(ready_at(&mut q, ms(t0, 199), &look).is_empty());
        assert_eq!(ready_at(&mut q, ms(t0, 200), &look), ["f"]);
        assert!(q.deadlines.is_empty() && q.queued.is_empty());
    }

    /// Only a file a writer closed is said closed when taken (a file the workers still have is
    /// then read again whatever its stamp); one made ready by a chmod is not, and asking
    /// forgets.
    #[test]
    fn a_file_taken_says_whether_a_writer_closed_it_since() {
        let t0 = Instant::now();
        let look = Fake::default();
        let mut q = Settle::new(SETTLE);
        q.touch("w".into(), true, stamp(1), t0);
        q.closed(Path::new("w"));
        q.touched_metadata("m".into(), stamp(2), t0);
        q.promote(ms(t0, 100), &look).unwrap();
        let mut taken: Vec<_> = std::iter::from_fn(|| {
            let (rel, _) = q.pop_ready()?;
            Some((rel.display().to_string(), q.closed_since(&rel)))
        })
        .collect();
        taken.sort();
        assert_eq!(taken, [("m".into(), false), ("w".into(), true)]);
        assert!(!q.closed_since(Path::new("w")), "asked once");
        assert!(q.closed_ready.is_empty());
    }

    #[test]
    fn a_closed_file_is_taken_once_quiet_for_the_settle_time_and_each_event_restarts_it() {
        let t0 = Instant::now();
        let look = Fake::default();
        let mut q = Settle::new(SETTLE);
        q.touch("f".into(), true, stamp(1), t0);
        assert!(ready_at(&mut q, ms(t0, 99), &look).is_empty());
        // Closed again at 50 ms: due at 150, not 100.
        q.touch("f".into(), true, stamp(2), ms(t0, 50));
        assert!(ready_at(&mut q, ms(t0, 100), &look).is_empty());
        assert_eq!(ready_at(&mut q, ms(t0, 150), &look), ["f"]);
        assert_eq!(q.queued(), 0);
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn a_file_written_and_not_closed_is_never_taken_until_its_close() {
        let t0 = Instant::now();
        let mut look = Fake::default();
        look.files.insert("f".into(), stamp(1).unwrap());
        let mut q = Settle::new(SETTLE);
        q.touch("f".into(), true, stamp(1), t0);
        // Written after its close: a writer is back at work.
        q.touch("f".into(), false, None, ms(t0, 10));
        assert!(ready_at(&mut q, ms(t0, 10_000), &look).is_empty());
        assert_eq!(q.queued(), 1, "still waiting for its writer");
        q.touch("f".into(), true, stamp(2), ms(t0, 20_000));
        assert_eq!(ready_at(&mut q, ms(t0, 20_100), &look), ["f"]);
    }

    /// A file waiting for its writer's close (or heard appear, and found neither with content
    /// nor gone) whose name went with no event at that name (its directory renamed away: the
    /// removal forgets only the directory's name) is forgotten at the next look, not counted
    /// queued for ever.
    #[test]
    fn a_file_waiting_for_its_close_is_forgotten_once_its_name_is_gone() {
        let t0 = Instant::now();
        let mut look = Fake::default();
        look.files.insert("d/f".into(), stamp(1).unwrap());
        let mut q = Settle::new(SETTLE);
        q.touch("d/f".into(), false, None, t0);
        assert!(ready_at(&mut q, t0 + GONE_LOOK, &look).is_empty());
        assert_eq!(q.queued(), 1, "there: still waiting for its writer");
        look.files.clear();
        assert!(ready_at(&mut q, t0 + GONE_LOOK * 2, &look).is_empty());
        assert_eq!(q.queued(), 0, "gone: forgotten");
        // Heard appear, and gone when its settle time is up (a directory made and renamed
        // at once, its creation taken for a file's): forgotten at the next look.
        q.appeared("d/sub".into(), t0);
        assert!(ready_at(&mut q, ms(t0, 100), &look).is_empty());
        assert_eq!(q.queued(), 1);
        assert!(ready_at(&mut q, ms(t0, 100) + GONE_LOOK, &look).is_empty());
        assert_eq!(q.queued(), 0, "gone: forgotten");
    }

    #[test]
    fn a_file_the_state_has_unchanged_is_not_taken_again_unless_a_writer_closed_it() {
        let t0 = Instant::now();
        let mut look = Fake::default();
        look.settled.insert("same".into(), stamp(5).unwrap());
        look.settled.insert("mapped".into(), stamp(5).unwrap());
        let mut q = Settle::new(SETTLE);
        // A chmod of a done file: looked at, found settled, left alone.
        q.touched_metadata("same".into(), stamp(5), t0);
        // A close (writes through a shared mapping change no stamp): taken again.
        q.touch("mapped".into(), true, stamp(5), t0);
        q.closed(Path::new("mapped"));
        assert_eq!(ready_at(&mut q, ms(t0, 100), &look), ["mapped"]);
    }

    #[test]
    fn a_metadata_change_restarts_the_clock_but_keeps_an_open_file_waiting() {
        let t0 = Instant::now();
        let look = Fake::default();
        let mut q = Settle::new(SETTLE);
        q.touch("open".into(), false, None, t0);
        q.touched_metadata("open".into(), stamp(1), ms(t0, 10));
        assert!(
            ready_at(&mut q, ms(t0, 1000), &look).is_empty(),
            "no close yet"
        );
        q.touch("closed".into(), true, stamp(1), t0);
        q.touched_metadata("closed".into(), stamp(2), ms(t0, 90));
        assert!(ready_at(&mut q, ms(t0, 100), &look).is_empty());
        assert_eq!(ready_at(&mut q, ms(t0, 190), &look), ["closed"]);
    }

    #[test]
    fn a_file_linked_in_whole_is_taken_after_two_quiet_settle_times_and_an_empty_one_waits() {
        let t0 = Instant::now();
        let mut look = Fake::default();
        look.linked.insert("linked".into(), stamp(9).unwrap());
        let mut q = Settle::new(SETTLE);
        q.appeared("linked".into(), t0);
        q.appeared("empty".into(), t0);
        assert!(ready_at(&mut q, ms(t0, 99), &look).is_empty());
        assert!(
            look.asked_linked.borrow().is_empty(),
            "nothing is stat'ed early"
        );
        // First look at 100 ms: content, stamp noted; it must stay so for one more settle.
        assert!(ready_at(&mut q, ms(t0, 100), &look).is_empty());
        assert_eq!(look.asked_linked.borrow().len(), 2);
        assert_eq!(ready_at(&mut q, ms(t0, 200), &look), ["linked"]);
        // The empty one is left to events: its writer's close takes it.
        assert!(ready_at(&mut q, ms(t0, 10_000), &look).is_empty());
        q.touch("empty".into(), true, stamp(3), ms(t0, 10_000));
        assert_eq!(ready_at(&mut q, ms(t0, 10_100), &look), ["empty"]);
    }

    /// With no settle time, `echo x > f` seen between its create event and its write's: the
    /// content is there, but the second look waits for the write's events, which make it an
    /// ordinary file taken once, at its close (both looks came at once, and it was taken as
    /// linked in whole and again at its close: 61 done for 60 files).
    #[test]
    fn with_no_settle_time_a_file_seen_before_its_write_events_is_taken_once_at_its_close() {
        let t0 = Instant::now();
        let mut look = Fake::default();
        look.linked.insert("f".into(), stamp(2).unwrap());
        let mut q = Settle::new(Duration::ZERO);
        q.appeared("f".into(), t0);
        assert!(
            ready_at(&mut q, t0, &look).is_empty(),
            "taken at its create"
        );
        assert!(ready_at(&mut q, ms(t0, 1), &look).is_empty());
        q.touch("f".into(), false, None, ms(t0, 2));
        q.touch("f".into(), true, stamp(2), ms(t0, 2));
        q.closed(Path::new("f"));
        assert_eq!(ready_at(&mut q, ms(t0, 2), &look), ["f"]);
        assert!(ready_at(&mut q, ms(t0, 1_000), &look).is_empty());
        // Linked in whole (no write event comes): taken after the gap.
        q.appeared("g".into(), t0);
        look.linked.insert("g".into(), stamp(3).unwrap());
        assert!(ready_at(&mut q, t0, &look).is_empty());
        assert_eq!(ready_at(&mut q, t0 + LINKED_LOOK_GAP, &look), ["g"]);
    }

    #[test]
    fn a_linked_file_that_changes_unseen_waits_again_and_a_write_makes_it_ordinary() {
        let t0 = Instant::now();
        let mut look = Fake::default();
        look.linked.insert("f".into(), stamp(1).unwrap());
        let mut q = Settle::new(SETTLE);
        q.appeared("f".into(), t0);
        assert!(ready_at(&mut q, ms(t0, 100), &look).is_empty());
        look.linked.insert("f".into(), stamp(2).unwrap());
        assert!(
            ready_at(&mut q, ms(t0, 200), &look).is_empty(),
            "changed: looks again"
        );
        assert_eq!(ready_at(&mut q, ms(t0, 300), &look), ["f"]);
        // Another one that is written to: no longer `linked`, it waits for its close.
        q.appeared("g".into(), t0);
        q.touch("g".into(), false, None, ms(t0, 50));
        look.linked.insert("g".into(), stamp(1).unwrap());
        assert!(ready_at(&mut q, ms(t0, 10_000), &look).is_empty());
    }

    #[test]
    fn scanned_files_are_taken_in_order_unless_an_event_says_a_writer_is_at_work() {
        let t0 = Instant::now();
        let look = Fake::default();
        let mut q = Settle::new(SETTLE);
        for (i, rel) in ["a", "b", "c"].into_iter().enumerate() {
            q.found(rel.into(), stamp(i as u64), Lost::Nothing, ms(t0, i as u64));
        }
        // Found twice (overlapping scans): queued once.
        q.found("a".into(), stamp(0), Lost::Nothing, ms(t0, 5));
        // b is written to after the scan: events decide, and there was no close.
        q.touch("b".into(), false, None, ms(t0, 10));
        // Vanished between the listing and its stat: its removal event follows.
        q.found("gone".into(), None, Lost::Nothing, t0);
        assert_eq!(q.next_due(), Some(ms(t0, 100)));
        assert_eq!(ready_at(&mut q, ms(t0, 102), &look), ["a", "c"]);
    }

    #[test]
    fn after_lost_events_a_scan_trusts_what_it_finds() {
        let t0 = Instant::now();
        let look = Fake::default();
        let mut q = Settle::new(SETTLE);
        // Its close may be among the lost events.
        q.touch("f".into(), false, None, t0);
        q.found("f".into(), stamp(1), Lost::Events, ms(t0, 1));
        assert_eq!(ready_at(&mut q, ms(t0, 101), &look), ["f"]);
    }

    #[test]
    fn a_poll_takes_a_file_only_once_a_second_look_finds_it_unchanged() {
        let t0 = Instant::now();
        let mut look = Fake::default();
        let mut q = Settle::new(SETTLE);
        // Another host is writing "growing": the poll saw 1 byte, it has 2 by the due time.
        q.found("growing".into(), stamp(1), Lost::Unseen, t0);
        q.found("still".into(), stamp(4), Lost::Unseen, t0);
        q.found("gone".into(), stamp(4), Lost::Unseen, t0);
        look.files.insert("growing".into(), stamp(2).unwrap());
        look.files.insert("still".into(), stamp(4).unwrap());
        assert_eq!(ready_at(&mut q, ms(t0, 100), &look), ["still"]);
        // Another settle time from that look; it grew again, then stopped.
        look.files.insert("growing".into(), stamp(3).unwrap());
        assert!(ready_at(&mut q, ms(t0, 199), &look).is_empty());
        assert!(ready_at(&mut q, ms(t0, 200), &look).is_empty());
        let (rel, seen) = {
            assert_eq!(q.next_due(), Some(ms(t0, 300)));
            q.promote(ms(t0, 300), &look).unwrap();
            q.pop_ready().unwrap()
        };
        assert_eq!((rel.to_str(), seen), (Some("growing"), stamp(3)));
        assert_eq!(q.queued(), 0, "the vanished file is dropped");
        // Ready, then changed unseen before a worker took it: a second look again.
        q.found("late".into(), stamp(1), Lost::Unseen, ms(t0, 300));
        look.files.insert("late".into(), stamp(1).unwrap());
        q.promote(ms(t0, 400), &look).unwrap();
        assert_eq!(q.next_size(), Some(1));
        q.found("late".into(), stamp(2), Lost::Unseen, ms(t0, 400));
        look.files.insert("late".into(), stamp(2).unwrap());
        assert_eq!(q.next_size(), None, "not ready on the poll's word alone");
        assert_eq!(ready_at(&mut q, ms(t0, 500), &look), ["late"]);
        // A local writer's events still decide for the file they told of: it is open.
        q.touch("local".into(), false, None, ms(t0, 400));
        q.found("local".into(), stamp(1), Lost::Unseen, ms(t0, 400));
        look.files.insert("local".into(), stamp(1).unwrap());
        assert!(ready_at(&mut q, ms(t0, 10_000), &look).is_empty());
    }

    #[test]
    fn a_burst_of_events_on_one_path_queues_it_once_and_a_deletion_drops_it() {
        let t0 = Instant::now();
        let look = Fake::default();
        let mut q = Settle::new(SETTLE);
        for i in 0..1000 {
            q.touch("hot".into(), i % 2 == 0, stamp(i), ms(t0, i / 10));
        }
        q.touch("hot".into(), true, stamp(7), ms(t0, 100));
        q.touch("doomed".into(), true, stamp(1), t0);
        q.found("scanned".into(), stamp(1), Lost::Nothing, t0);
        q.forget(Path::new("doomed"));
        q.forget(Path::new("scanned"));
        assert_eq!(ready_at(&mut q, ms(t0, 200), &look), ["hot"]);
        assert_eq!(q.queued(), 0);
    }

    #[test]
    fn ready_files_give_their_size_and_stale_ones_are_dropped_at_the_front() {
        let t0 = Instant::now();
        let look = Fake::default();
        let mut q = Settle::new(SETTLE);
        q.touch("a".into(), true, stamp(10), t0);
        q.touch("b".into(), true, stamp(20), t0);
        q.touch("c".into(), true, stamp(30), t0);
        q.promote(ms(t0, 100), &look).unwrap();
        // a deleted, b written to again while it waited for the workers.
        q.forget(Path::new("a"));
        q.touch("b".into(), false, None, ms(t0, 101));
        assert_eq!(q.next_size(), Some(30));
        let (rel, got) = q.pop_ready().unwrap();
        assert_eq!((rel.as_path(), got), (Path::new("c"), stamp(30)));
        // The job channel was full: back at the front, with its stamp.
        q.unpop(rel, got);
        assert_eq!(q.pop_ready(), Some((PathBuf::from("c"), stamp(30))));
        assert_eq!(q.next_size(), None);
        assert!(!q.has_ready());
    }
}
