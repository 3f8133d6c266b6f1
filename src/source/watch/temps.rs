//! Files named like a writer's temp (`*.tmp`, `*.part`, `*.crdownload`, `*~`, `.#*`): never
//! taken, since their writer renames them to their real name when done; but one that stays
//! is a file of the tree like any other, and is accounted for: once it has been left
//! unchanged for `quiet_for` (200 settle times, a minute by default), it is reported skipped
//! (`writer-temp`), once per version. Before, such a file was never reported at all (found
//! by a review), where `batch` processes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::travel::Stamp;

/// At most this many such names are followed at once: a flood of them (anyone who may write
/// in the tree can make one) holds no more than some 10 MB. Those past it are reported at
/// the next scan that finds them (a start, an overflow, a poll).
const MAX_FOLLOWED: usize = 65_536;

/// How long a writer's temp must be left unchanged to be reported: `settle` 200 times, at
/// least a second, at most an hour.
pub(crate) fn quiet_for(settle: Duration) -> Duration {
    (settle * 200).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// The temp-named files seen and not reported yet, each with when it last changed and, where
/// a scan (not an event) found it, its stamp then.
#[derive(Debug, Default)]
pub(crate) struct Temps {
    seen: BTreeMap<PathBuf, (Instant, Option<Stamp>)>,
    /// Names were left unfollowed, the map full, since it was said.
    full_said: bool,
}

impl Temps {
    /// An event on `rel`, if it is followed already: it changed now. Whether it was.
    pub(crate) fn touched(&mut self, rel: &Path, now: Instant) -> bool {
        match self.seen.get_mut(rel) {
            Some(at) => {
                *at = (now, None);
                true
            }
            None => false,
        }
    }

    /// An event on `rel`: it changed now.
    pub(crate) fn changed(&mut self, rel: &Path, now: Instant) {
        if let Some(at) = self.seen.get_mut(rel) {
            *at = (now, None);
        } else if self.room() {
            self.seen.insert(rel.to_path_buf(), (now, None));
        }
    }

    /// Whether one more name may be followed; said once if not, until there is room again.
    fn room(&mut self) -> bool {
        if self.seen.len() < MAX_FOLLOWED {
            self.full_said = false;
            return true;
        }
        if !std::mem::replace(&mut self.full_said, true) {
            tracing::warn!(
                followed = MAX_FOLLOWED,
                "too many files named like writers' temps to follow: those past them are \
                 reported at the next scan that finds them (a start, an overflow, a poll)"
            );
        }
        false
    }

    /// A scan found `rel` with `stamp`: it changed now unless it has that stamp already.
    pub(crate) fn found(&mut self, rel: &Path, stamp: Option<Stamp>, now: Instant) {
        let room = self.seen.contains_key(rel) || self.room();
        match self.seen.get_mut(rel) {
            Some((_, Some(was))) if Some(*was) == stamp => {}
            Some(at) => *at = (now, stamp),
            None if room => {
                self.seen.insert(rel.to_path_buf(), (now, stamp));
            }
            None => {}
        }
    }

    /// `rel` (a file, or a directory and what is under it) is gone.
    pub(crate) fn gone(&mut self, rel: &Path) {
        if self.seen.remove(rel).is_some() {
            return;
        }
        let under: Vec<PathBuf> = self
            .seen
            .range::<Path, _>((std::ops::Bound::Excluded(rel), std::ops::Bound::Unbounded))
            .take_while(|(p, _)| p.starts_with(rel))
            .map(|(p, _)| p.clone())
            .collect();
        for p in under {
            self.seen.remove(&p);
        }
    }

    /// Those unchanged since `now - quiet`, taken out, each with the stamp a scan saw (to be
    /// compared with the file's now: a poll sees changes only so).
    pub(crate) fn due(&mut self, now: Instant, quiet: Duration) -> Vec<(PathBuf, Option<Stamp>)> {
        let due: Vec<PathBuf> = self
            .seen
            .iter()
            .filter(|(_, (at, _))| now.saturating_duration_since(*at) >= quiet)
            .map(|(p, _)| p.clone())
            .collect();
        due.into_iter()
            .filter_map(|p| self.seen.remove(&p).map(|(_, stamp)| (p, stamp)))
            .collect()
    }

    /// Whether any is followed.
    pub(crate) fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64) -> Option<Stamp> {
        Some(Stamp {
            size,
            mtime_ns: 1,
            ctime_ns: 1,
            inode: 7,
        })
    }

    #[test]
    fn a_temp_is_due_once_left_unchanged_for_the_quiet_time() {
        let quiet = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut temps = Temps::default();
        temps.changed(Path::new("a.tmp"), t0);
        temps.found(Path::new("d/b.part"), stamp(1), t0);
        temps.found(Path::new("d/c.part"), stamp(1), t0);
        // A poll sees b unchanged (its clock runs on), c changed (its clock starts again).
        temps.found(Path::new("d/b.part"), stamp(1), t0 + quiet / 2);
        temps.found(Path::new("d/c.part"), stamp(2), t0 + quiet / 2);
        temps.changed(Path::new("a.tmp"), t0 + quiet / 2);
        assert!(temps.due(t0 + quiet / 2, quiet).is_empty());
        assert_eq!(
            temps.due(t0 + quiet, quiet),
            [(PathBuf::from("d/b.part"), stamp(1))]
        );
        let later: Vec<_> = temps
            .due(t0 + quiet * 2, quiet)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(later, [PathBuf::from("a.tmp"), PathBuf::from("d/c.part")]);
        assert!(temps.is_empty());
    }

    #[test]
    fn a_directory_gone_takes_its_temps_with_it() {
        let now = Instant::now();
        let mut temps = Temps::default();
        for p in ["d/a.tmp", "d/e/b.tmp", "d.tmp", "dd/c.tmp"] {
            temps.changed(Path::new(p), now);
        }
        temps.gone(Path::new("d"));
        let left: Vec<_> = temps
            .due(now + Duration::from_secs(1), Duration::ZERO)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(left, [PathBuf::from("d.tmp"), PathBuf::from("dd/c.tmp")]);
    }
}
