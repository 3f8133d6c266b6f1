//! `KnownMap`: what the state knows of a tree, by path, as a watch scan or an incremental
//! walk holds it while it checks each file it finds against it; what is left at the end is
//! what it did not find.
//!
//! Made for tens of thousands of rows read at once and looked up once each: the paths lie end
//! to end in one buffer (where each ends in a vector of its own), the records packed in another
//! vector in the order they were read (`Slot`: 64 bytes a file, its digest's bytes end to end in
//! a third), and the index holds only their positions (4 bytes a file), hashed over the path's
//! bytes with foldhash. A
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

use super::{FileStatus, Known, Record};
use crate::cli::OpKind;
use crate::digest::{Digest, HashAlgo};
use crate::travel::Stamp;

/// What the state knows, by path relative to the root.
#[derive(Default)]
pub(crate) struct KnownMap {
    /// Every path's bytes, one after the other.
    names: Vec<u8>,
    /// Where each path ends in `names` (and the next begins), in the order they came.
    ends: Vec<usize>,
    /// Each path's entry, at the same position. Apart from the paths: a look-up compares names
    /// through `ends` (8 bytes a path, 400 kB for 50,000: they stay in the cache) and reaches
    /// the entry it takes only.
    slots: Vec<Slot>,
    /// The digests' bytes, one after the other (`Slot::digest_at`).
    digests: Vec<u8>,
    /// The records of a file's other ops (runs of several results), by `Slot::more`.
    more: Vec<Vec<(OpKind, Record)>>,
    /// Positions in `ends` and `slots`, by the hash of their path.
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

/// A file's entry: its first record, packed into 64 bytes where a `Known` takes 176 (most of
/// them the room a digest has for 64 bytes). The map's entries are its memory: 50,000 of them
/// as `Known`s were 8.8 MB, each page zeroed by the kernel as first touched (a page fault costs
/// this VM some microseconds), and each look-up's entry three cache lines instead of one.
#[derive(Clone, Copy)]
struct Slot {
    /// Meaningful with `STAMP` only.
    stamp: Stamp,
    /// Meaningful with `MADE_MTIME` only.
    made_mtime: i64,
    /// Where the digest's bytes begin in `KnownMap::digests`, if `digest_algo` says it has one
    /// (its length is the algorithm's).
    digest_at: usize,
    /// Its other records' place in `KnownMap::more`, or `NO_MORE`.
    more: u32,
    attempts: u32,
    /// `Known::wanted`: at most four ops.
    wanted: u32,
    op: OpKind,
    status: FileStatus,
    digest_algo: Option<HashAlgo>,
    /// `TAKEN`, `STAMP`, `MADE_MTIME`, `IN_USE`, `MADE_OUTPUT`.
    flags: u8,
}

/// `Slot::flags`: the entry was taken out (`remove`), and is no longer in the map.
const TAKEN: u8 = 1;
/// `Slot::flags`: `Record::stamp` is `Some(Slot::stamp)`.
const STAMP: u8 = 2;
/// `Slot::flags`: `Record::made_mtime` is `Some(Slot::made_mtime)`.
const MADE_MTIME: u8 = 4;
/// `Slot::flags`: `Record::in_use`.
const IN_USE: u8 = 8;
/// `Slot::flags`: `Record::made_output`.
const MADE_OUTPUT: u8 = 16;
/// `Slot::more` of a file with one record.
const NO_MORE: u32 = u32::MAX;

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
            slots,
            index,
            hasher,
            ..
        } = self;
        let name = |j: u32| name_at(names, ends, j as usize);
        let key = name_at(names, ends, i);
        let hash = hasher.hash_one(key);
        match index.find(hash, |&j| name(j) == key).copied() {
            Some(j) => {
                slots[j as usize] = slots[i];
                slots[i].flags |= TAKEN;
            }
            None => {
                // Four billion paths would not fit in memory first.
                let at = u32::try_from(i).unwrap_or(u32::MAX);
                index.insert_unique(hash, at, |&j| hasher.hash_one(name(j)));
            }
        }
    }

    /// `known`, packed: its digest's bytes and other records go to the map's vectors. (An
    /// entry replaced leaves its own there, unreached: only a path put in twice does that.)
    fn pack(&mut self, known: Known) -> Slot {
        let Known {
            first: (op, record),
            more,
            wanted,
        } = known;
        let digest_at = self.digests.len();
        if let Some(d) = &record.digest {
            self.digests.extend_from_slice(d.as_bytes());
        }
        let more = if more.is_empty() {
            NO_MORE
        } else {
            self.more.push(more);
            u32::try_from(self.more.len() - 1).unwrap_or(NO_MORE)
        };
        let flag = |set: bool, flag: u8| if set { flag } else { 0 };
        Slot {
            stamp: record.stamp.unwrap_or(Stamp {
                size: 0,
                mtime_ns: 0,
                ctime_ns: 0,
                inode: 0,
            }),
            made_mtime: record.made_mtime.unwrap_or(0),
            digest_at,
            more,
            attempts: record.attempts,
            wanted: u32::try_from(wanted).unwrap_or(u32::MAX),
            op,
            status: record.status,
            digest_algo: record.digest.map(|d| d.algo()),
            flags: flag(record.stamp.is_some(), STAMP)
                | flag(record.made_mtime.is_some(), MADE_MTIME)
                | flag(record.in_use, IN_USE)
                | flag(record.made_output, MADE_OUTPUT),
        }
    }

    /// `slot`'s first record, unpacked.
    fn record(&self, slot: &Slot) -> Record {
        let has = |flag: u8| slot.flags & flag != 0;
        Record {
            status: slot.status,
            stamp: has(STAMP).then_some(slot.stamp),
            attempts: slot.attempts,
            in_use: has(IN_USE),
            made_output: has(MADE_OUTPUT),
            made_mtime: has(MADE_MTIME).then_some(slot.made_mtime),
            digest: slot.digest_algo.and_then(|algo| {
                let at = slot.digest_at;
                Digest::new(algo, self.digests.get(at..at + algo.len())?)
            }),
        }
    }

    /// What `slot` knows, with `more`, its other records.
    fn known(&self, slot: &Slot, more: Vec<(OpKind, Record)>) -> Known {
        Known {
            first: (slot.op, self.record(slot)),
            more,
            wanted: slot.wanted as usize,
        }
    }

    /// A copy of `slot`'s other records.
    fn more_of(&self, slot: &Slot) -> Vec<(OpKind, Record)> {
        (self.more.get(slot.more as usize).cloned()).unwrap_or_default()
    }

    /// Adds the path `key` and its record to the entries, not indexed (`index_entry`).
    fn push_unindexed(&mut self, key: &[u8], known: Known) {
        let slot = self.pack(known);
        self.names.extend_from_slice(key);
        self.ends.push(self.names.len());
        self.slots.push(slot);
    }

    /// The position of `key`'s entry, if it is in (put in, and not taken out since).
    fn find(&self, key: &[u8]) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        let i = *self.index.find(hash, |&j| self.name(j as usize) == key)? as usize;
        (self.slots[i].flags & TAKEN == 0).then_some(i)
    }

    /// Puts in what is known of the path `key` (its bytes), replacing what was.
    pub(crate) fn insert(&mut self, key: &[u8], known: Known) {
        let hash = self.hasher.hash_one(key);
        let at = (self.index)
            .find(hash, |&j| self.name(j as usize) == key)
            .copied();
        match at {
            Some(i) => self.slots[i as usize] = self.pack(known),
            None => {
                self.push_unindexed(key, known);
                self.index_entry(self.ends.len() - 1);
            }
        }
    }

    /// Adds `op`'s record to what is known of the path `key` (its bytes); one not in (or
    /// taken out) is put in with that record alone, for a run of `wanted` ops.
    pub(crate) fn add(&mut self, key: &[u8], op: OpKind, record: Record, wanted: usize) {
        let Some(i) = self.find(key) else {
            return self.insert(key, Known::of(op, record, wanted));
        };
        match self.more.get_mut(self.slots[i].more as usize) {
            Some(more) => more.push((op, record)),
            None => {
                self.more.push(vec![(op, record)]);
                self.slots[i].more = u32::try_from(self.more.len() - 1).unwrap_or(NO_MORE);
            }
        }
    }

    /// What is known of `rel`.
    #[cfg(test)]
    pub(crate) fn get(&self, rel: &Path) -> Option<Known> {
        let slot = &self.slots[self.find(bytes(rel))?];
        Some(self.known(slot, self.more_of(slot)))
    }

    /// Takes what is known of `rel` out: it is no longer among what is left.
    pub(crate) fn remove(&mut self, rel: &Path) -> Option<Known> {
        let i = self.find(bytes(rel))?;
        self.slots[i].flags |= TAKEN;
        let slot = self.slots[i];
        let more = (self.more.get_mut(slot.more as usize)).map_or_else(Vec::new, std::mem::take);
        Some(self.known(&slot, more))
    }

    /// How many paths are still in, counted (a pass over the entries: for the tests and the
    /// debug log, not the hot path).
    pub(crate) fn len(&self) -> usize {
        (self.slots.iter()).filter(|s| s.flags & TAKEN == 0).count()
    }

    /// The paths and records still in, in the order they came.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Path, Known)> {
        (self.slots.iter().enumerate()).filter_map(|(i, slot)| {
            if slot.flags & TAKEN != 0 {
                return None;
            }
            let name = std::ffi::OsStr::from_bytes(self.name(i));
            Some((Path::new(name), self.known(slot, self.more_of(slot))))
        })
    }

    /// The paths still in, in the order they came.
    pub(crate) fn into_keys(self) -> impl Iterator<Item = PathBuf> {
        let KnownMap {
            names, ends, slots, ..
        } = self;
        (slots.into_iter().enumerate()).filter_map(move |(i, slot)| {
            if slot.flags & TAKEN != 0 {
                return None;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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

    fn attempts(k: Option<Known>) -> Option<u32> {
        k.and_then(|k| k.record(OpKind::Sha256).map(|r| r.attempts))
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
                attempts(map.remove(&rel)),
                Some(if i == 0 { 5000 } else { i })
            );
            assert!(map.remove(&rel).is_none(), "taken once");
        }
        assert_eq!(map.len(), 10);
        map.add(b"d1/f995", OpKind::Zstd, record(0), 2);
        let more = map.get(Path::new("d1/f995")).unwrap();
        assert!(more.record(OpKind::Sha256).is_some() && more.record(OpKind::Zstd).is_some());
        // Taken out: put in again, with that record alone.
        map.add(b"d1/f2", OpKind::Zstd, record(0), 2);
        let alone = map.get(Path::new("d1/f2")).unwrap();
        assert!(alone.record(OpKind::Sha256).is_none() && alone.record(OpKind::Zstd).is_some());
        map.remove(Path::new("d1/f2"));
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

    /// Every field of every record comes out as it went in, whatever it holds, the other ops'
    /// records with it; and an entry is one cache line.
    #[test]
    fn a_known_file_comes_out_as_it_went_in() {
        assert!(std::mem::size_of::<Slot>() <= 64);
        let stamp = Stamp {
            size: u64::MAX,
            mtime_ns: -5,
            ctime_ns: i64::MIN,
            inode: 1 << 40,
        };
        let full = |algo: HashAlgo, status| Record {
            status,
            stamp: Some(stamp),
            attempts: u32::MAX,
            in_use: true,
            made_output: true,
            made_mtime: Some(-1),
            digest: Digest::new(algo, &vec![0xa5; algo.len()]),
        };
        let mut several = Known::of(OpKind::Sha512, full(HashAlgo::Sha512, FileStatus::Done), 3);
        several.add(OpKind::Blake3, full(HashAlgo::Blake3, FileStatus::Skipped));
        several.add(OpKind::Zstd, record(2));
        let files = [
            ("bare", known(0)),
            (
                "full",
                Known::of(
                    OpKind::Sha256,
                    full(HashAlgo::Sha256, FileStatus::Failed),
                    1,
                ),
            ),
            ("several", several),
        ];
        let mut map: KnownMap = (files.iter().cloned())
            .map(|(name, k)| (PathBuf::from(name), k))
            .collect();
        for (name, k) in &files {
            assert_eq!(map.get(Path::new(name)).as_ref(), Some(k), "{name}");
        }
        for (name, k) in &files {
            assert_eq!(map.remove(Path::new(name)).as_ref(), Some(k), "{name}");
        }
        assert_eq!(map.len(), 0);
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
