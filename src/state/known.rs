//! `KnownMap`: what the state knows of a tree, by path, as a watch scan or an incremental
//! walk holds it while it checks each file it finds against it; what is left at the end is
//! what it did not find.
//!
//! Made for tens of thousands of rows read at once and looked up once each: the paths lie end
//! to end in one buffer (where each ends in a vector of its own), the records in another vector
//! in the order they were read, and the index holds only their positions (4 bytes a file),
//! hashed over the path's bytes with foldhash. A
//! `HashMap<PathBuf, Known>` made an allocation per path, hashed paths component by component,
//! and moved 150-byte entries in and out of a 10 MB table: a third of an unchanged rerun's time
//! outside the kernel, for a tree of 50,000 files.
//!
//! Paths are compared byte for byte: every path in it and every path looked up is made by the
//! walk the same way (names joined by single slashes, no `.`), as the state's rows are.

use std::hash::BuildHasher;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use hashbrown::HashTable;

use super::Known;

/// What the state knows, by path relative to the root.
#[derive(Default)]
pub(crate) struct KnownMap {
    /// Every path's bytes, one after the other.
    names: Vec<u8>,
    /// Where each path ends in `names` (and the next begins), in the order they came.
    ends: Vec<usize>,
    /// Each path's record, at the same position; a record taken out is `None`. Apart from the
    /// paths: a look-up compares names through `ends` (8 bytes a path, 400 kB for 50,000: they
    /// stay in the cache) and reaches the record it takes only (184 bytes a path with its
    /// name's range, a cache miss for every comparison).
    known: Vec<Option<Known>>,
    /// Positions in `ends` and `known`, by the hash of their path.
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for KnownMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

fn bytes(rel: &Path) -> &[u8] {
    rel.as_os_str().as_bytes()
}

/// The bytes of path `i` of `names`, which end at `ends`.
fn name_at<'n>(names: &'n [u8], ends: &[usize], i: usize) -> &'n [u8] {
    let start = if i == 0 { 0 } else { ends[i - 1] };
    &names[start..ends[i]]
}

impl KnownMap {
    /// A map of the paths and records pushed into `builder`, indexed at once.
    fn build(mut self) -> Self {
        self.index = HashTable::with_capacity(self.ends.len());
        for i in 0..self.ends.len() {
            self.index_entry(i);
        }
        self
    }

    fn name(&self, i: usize) -> &[u8] {
        name_at(&self.names, &self.ends, i)
    }

    /// Indexes entry `i`; if its path is in already (pushed twice, not from one query), the
    /// later record goes to the earlier entry instead.
    fn index_entry(&mut self, i: usize) {
        let KnownMap {
            names,
            ends,
            known,
            index,
            hasher,
        } = self;
        let name = |j: u32| name_at(names, ends, j as usize);
        let key = name_at(names, ends, i);
        let hash = hasher.hash_one(key);
        match index.find(hash, |&j| name(j) == key).copied() {
            Some(j) => {
                let later = known[i].take();
                known[j as usize] = later;
            }
            None => {
                // Four billion paths would not fit in memory first.
                let at = u32::try_from(i).unwrap_or(u32::MAX);
                index.insert_unique(hash, at, |&j| hasher.hash_one(name(j)));
            }
        }
    }

    /// Adds the path `key` and its record to the entries, not indexed (`index_entry`).
    fn push_unindexed(&mut self, key: &[u8], known: Known) {
        self.names.extend_from_slice(key);
        self.ends.push(self.names.len());
        self.known.push(Some(known));
    }

    /// The position of `key`'s entry, if it was ever put in.
    fn find(&self, key: &[u8]) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        (self.index.find(hash, |&j| self.name(j as usize) == key)).map(|&j| j as usize)
    }

    /// Puts in what is known of the path `key` (its bytes), replacing what was.
    pub(crate) fn insert(&mut self, key: &[u8], known: Known) {
        match self.find(key) {
            Some(i) => self.known[i] = Some(known),
            None => {
                self.push_unindexed(key, known);
                self.index_entry(self.ends.len() - 1);
            }
        }
    }

    /// What is known of `rel`.
    pub(crate) fn get(&self, rel: &Path) -> Option<&Known> {
        self.known[self.find(bytes(rel))?].as_ref()
    }

    /// What is known of the path `key` (its bytes), to be changed.
    pub(crate) fn get_mut_bytes(&mut self, key: &[u8]) -> Option<&mut Known> {
        let i = self.find(key)?;
        self.known[i].as_mut()
    }

    /// Takes what is known of `rel` out: it is no longer among what is left.
    pub(crate) fn remove(&mut self, rel: &Path) -> Option<Known> {
        let i = self.find(bytes(rel))?;
        self.known[i].take()
    }

    /// How many paths are still in, counted (a pass over the entries: for the tests and the
    /// debug log, not the hot path).
    pub(crate) fn len(&self) -> usize {
        self.iter().count()
    }

    /// The paths and records still in, in the order they came.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Path, &Known)> {
        (self.known.iter().enumerate()).filter_map(|(i, known)| {
            let name = std::ffi::OsStr::from_bytes(self.name(i));
            Some((Path::new(name), known.as_ref()?))
        })
    }

    /// The paths still in, in the order they came.
    pub(crate) fn into_keys(self) -> impl Iterator<Item = PathBuf> {
        let KnownMap {
            names, ends, known, ..
        } = self;
        (known.into_iter().enumerate()).filter_map(move |(i, known)| {
            known?;
            let name = name_at(&names, &ends, i);
            Some(PathBuf::from(std::ffi::OsStr::from_bytes(name)))
        })
    }
}

/// Paths and records pushed in the order they are read, indexed once at the end
/// (`KnownMap::build`): growing the index as they come would hash every path again at each
/// doubling.
#[derive(Default)]
pub(crate) struct Builder(KnownMap);

impl Builder {
    /// Adds the path `key` (its bytes) and what is known of it.
    pub(crate) fn push(&mut self, key: &[u8], known: Known) {
        self.0.push_unindexed(key, known);
    }

    /// The map of what was pushed.
    pub(crate) fn build(self) -> KnownMap {
        self.0.build()
    }
}

impl FromIterator<(PathBuf, Known)> for KnownMap {
    fn from_iter<I: IntoIterator<Item = (PathBuf, Known)>>(iter: I) -> Self {
        let mut b = Builder::default();
        for (rel, known) in iter {
            b.push(bytes(&rel), known);
        }
        b.build()
    }
}

impl std::ops::Index<&Path> for KnownMap {
    type Output = Known;

    fn index(&self, rel: &Path) -> &Known {
        self.get(rel)
            .unwrap_or_else(|| panic!("{} is not in the map", rel.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::OpKind;
    use crate::state::{FileStatus, Record};

    fn record(attempts: u32) -> Record {
        Record {
            status: FileStatus::Failed,
            stamp: None,
            attempts,
            in_use: false,
            made_output: false,
            made_mtime: None,
            digest: None,
        }
    }

    fn known(attempts: u32) -> Known {
        Known::of(OpKind::Sha256, record(attempts), 1)
    }

    fn attempts(k: Option<&Known>) -> Option<u32> {
        k.and_then(|k| k.record(OpKind::Sha256)).map(|r| r.attempts)
    }

    #[test]
    fn paths_are_found_taken_out_and_what_is_left_is_listed() {
        let mut b = Builder::default();
        for i in 0..1000u32 {
            b.push(format!("d{}/f{i}", i % 7).as_bytes(), known(i));
        }
        // The same path twice: the later one stands.
        b.push(b"d0/f0", known(5000));
        let mut map = b.build();
        assert_eq!(map.len(), 1000);
        assert_eq!(attempts(map.get(Path::new("d0/f0"))), Some(5000));
        assert_eq!(attempts(map.get(Path::new("d3/f10"))), Some(10));
        assert!(map.get(Path::new("d3/f11")).is_none(), "another directory");
        assert!(map.get(Path::new("d3")).is_none());
        for i in 0..990u32 {
            let rel = PathBuf::from(format!("d{}/f{i}", i % 7));
            assert_eq!(
                attempts(map.remove(&rel).as_ref()),
                Some(if i == 0 { 5000 } else { i })
            );
            assert!(map.remove(&rel).is_none(), "taken once");
        }
        assert_eq!(map.len(), 10);
        map.get_mut_bytes(b"d1/f995")
            .unwrap()
            .add(OpKind::Zstd, record(0));
        assert!(map[Path::new("d1/f995")].record(OpKind::Zstd).is_some());
        // Put in again once taken out, and a new one.
        map.insert(b"d1/f1", known(1));
        map.insert(b"new", known(7));
        map.insert(b"new", known(8));
        assert_eq!(attempts(map.get(Path::new("new"))), Some(8));
        assert_eq!(map.len(), 12);
        let mut left: Vec<PathBuf> = map.into_keys().collect();
        left.sort();
        let mut want: Vec<PathBuf> = (990..1000u32)
            .map(|i| PathBuf::from(format!("d{}/f{i}", i % 7)))
            .chain([PathBuf::from("d1/f1"), PathBuf::from("new")])
            .collect();
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn names_are_bytes_not_text() {
        let odd: &[u8] = b"caf\xe9/\n\x01name";
        let map: KnownMap = [(PathBuf::from(std::ffi::OsStr::from_bytes(odd)), known(3))]
            .into_iter()
            .collect();
        assert_eq!(
            attempts(map.get(Path::new(std::ffi::OsStr::from_bytes(odd)))),
            Some(3)
        );
        assert!(map.get(Path::new("caf")).is_none());
    }
}
