//! What the watcher has handed to the workers and not yet heard back about: files in flight,
//! files to look at again when they come back, transient failures waiting for their retry,
//! and deletions held back until the files under them are recorded.
//!
//! Invariants: a path is in flight at most once; a deletion is passed on only when nothing
//! under it is in flight, or the file's outcome, recorded after it, would bring it back.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::travel::Recorded;

/// Path maps: foldhash is several times faster than std's SipHash on paths, and its
/// per-process random seed still keeps crafted file names from forcing collisions.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The watcher's books on files in flight.
#[derive(Debug, Default)]
pub(crate) struct Flight {
    /// Ordered, so "is anything under this directory in flight" is one range lookup: a
    /// deletion burst then costs a lookup per removal, not a scan of everything in flight.
    in_flight: BTreeSet<PathBuf>,
    /// Paths that something happened to while in flight: look again when they come back;
    /// `true` if whatever their stamp says (see `redo`).
    redo: Map<PathBuf, bool>,
    /// Transient failures, with the time each is due again.
    retries: Vec<(Instant, PathBuf)>,
    /// Deletions waiting for files under them that are in flight (see `forget`).
    removals: Vec<PathBuf>,
}

impl Flight {
    /// `rel` was sent to the workers.
    pub(crate) fn start(&mut self, rel: PathBuf) {
        self.in_flight.insert(rel);
    }

    /// `rel` was taken back before the workers saw it (the job channel was full).
    pub(crate) fn unstart(&mut self, rel: &Path) {
        self.in_flight.remove(rel);
    }

    /// Whether `rel` is in flight.
    pub(crate) fn contains(&self, rel: &Path) -> bool {
        self.in_flight.contains(rel)
    }

    /// `rel`, in flight, may have changed since it was read: it is looked at again once back.
    /// `whatever_stamp` if it is taken then even with the stamp just recorded (a writer closed
    /// it, or events about it were lost: a write through a shared mapping changes no stamp);
    /// otherwise the state decides, as for any event (a chmod, a stale event, changes nothing).
    pub(crate) fn redo(&mut self, rel: PathBuf, whatever_stamp: bool) {
        *self.redo.entry(rel).or_default() |= whatever_stamp;
    }

    /// How many paths are to be taken again once back whatever their stamp (see `redo`): each
    /// will count done once more. One to be looked at again for a stamp's sake counts here once
    /// it is also to be taken whatever its stamp (found by a review: a file made ready while in
    /// flight, then in flight at an overflow, was read again and not in the overflow's count).
    pub(crate) fn redo_count(&self) -> usize {
        self.redo
            .values()
            .filter(|&&whatever_stamp| whatever_stamp)
            .count()
    }

    /// The sink recorded `r`'s outcome: `r.rel` is no longer in flight. Returns whether it must
    /// be looked at again now (something happened to it while it was read), and if so whether
    /// whatever its stamp (see `redo`).
    pub(crate) fn recorded(&mut self, r: &Recorded, now: Instant) -> Option<bool> {
        self.in_flight.remove(&r.rel);
        if let Some(after) = r.retry_after {
            self.retries.push((now + after, r.rel.clone()));
        }
        if self.redo.is_empty() {
            return None;
        }
        self.redo.remove(&r.rel)
    }

    /// The retries due by `now`, out of the books.
    pub(crate) fn due_retries(&mut self, now: Instant) -> Vec<PathBuf> {
        if self.retries.is_empty() {
            return Vec::new();
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.retries = later;
        due.into_iter().map(|(_, rel)| rel).collect()
    }

    /// `rel` (a file, or a directory and everything under it) is gone: its retries are
    /// dropped. Returns whether its removal may be passed on now; if not, it is held until
    /// nothing under it is in flight (see `removals_due`).
    pub(crate) fn forget(&mut self, rel: &Path) -> bool {
        if !self.retries.is_empty() {
            self.retries.retain(|(_, p)| !p.starts_with(rel));
        }
        if in_flight_under(&self.in_flight, rel) {
            self.removals.push(rel.to_path_buf());
            return false;
        }
        true
    }

    /// The held-back removals that nothing in flight blocks any more, out of the books.
    pub(crate) fn removals_due(&mut self) -> Vec<PathBuf> {
        if self.removals.is_empty() {
            return Vec::new();
        }
        let (blocked, due): (Vec<_>, Vec<_>) = std::mem::take(&mut self.removals)
            .into_iter()
            .partition(|rel| in_flight_under(&self.in_flight, rel));
        self.removals = blocked;
        due
    }

    /// The files in flight under `dir` (after lost events, their deletion may be among them).
    pub(crate) fn under<'a>(&'a self, dir: &'a Path) -> impl Iterator<Item = &'a PathBuf> + 'a {
        self.in_flight.iter().filter(move |p| p.starts_with(dir))
    }

    /// Files in flight.
    pub(crate) fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Files waiting for a retry.
    pub(crate) fn retrying(&self) -> usize {
        self.retries.len()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    fn recorded(rel: &str, retry_after: Option<Duration>) -> Recorded {
        Recorded {
            rel: PathBuf::from(rel),
            retry_after,
            output_blocked: false,
        }
    }

    #[test]
    fn a_deletion_waits_for_the_files_under_it_to_be_recorded() {
        let t0 = Instant::now();
        let mut f = Flight::default();
        f.start("d/a".into());
        f.start("d/b".into());
        assert!(f.forget(Path::new("e")), "nothing under e is in flight");
        assert!(!f.forget(Path::new("d")), "d/a and d/b are in flight");
        assert!(f.removals_due().is_empty());
        f.recorded(&recorded("d/a", None), t0);
        assert!(f.removals_due().is_empty(), "d/b is still in flight");
        f.recorded(&recorded("d/b", None), t0);
        assert_eq!(f.removals_due(), [PathBuf::from("d")]);
        assert!(f.removals_due().is_empty(), "passed on once");
        assert_eq!(f.len(), 0);
    }

    #[test]
    fn retries_come_due_at_their_time_and_a_deletion_drops_them() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut f = Flight::default();
        for rel in ["a", "d/b", "d/c"] {
            f.start(rel.into());
        }
        f.recorded(&recorded("a", Some(s(1))), t0);
        f.recorded(&recorded("d/b", Some(s(2))), t0);
        f.recorded(&recorded("d/c", Some(s(4))), t0);
        assert_eq!(f.retrying(), 3);
        assert!(f.due_retries(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(f.due_retries(t0 + s(1)), [PathBuf::from("a")]);
        assert!(f.forget(Path::new("d")), "nothing under d is in flight");
        assert_eq!(
            f.retrying(),
            0,
            "the deleted directory's retries are dropped"
        );
        assert!(f.due_retries(t0 + s(10)).is_empty());
    }

    #[test]
    fn a_file_changed_while_in_flight_is_looked_at_again_once_back() {
        let t0 = Instant::now();
        let mut f = Flight::default();
        f.start("a".into());
        f.start("b".into());
        f.start("c".into());
        f.redo("c".into(), false);
        assert_eq!(f.redo_count(), 0, "c is taken again only if it changed");
        f.redo("a".into(), false);
        f.redo("a".into(), true);
        f.redo("a".into(), false);
        assert_eq!(f.redo_count(), 1);
        assert!(f.contains(Path::new("a")));
        assert_eq!(f.recorded(&recorded("a", None), t0), Some(true));
        assert_eq!(f.recorded(&recorded("b", None), t0), None);
        assert_eq!(f.recorded(&recorded("c", None), t0), Some(false));
        assert!(!f.contains(Path::new("a")));
        assert_eq!(f.under(Path::new("")).count(), 0);
    }
}
