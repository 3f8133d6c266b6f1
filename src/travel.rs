//! What travels between the stages: a source's `Job`s in `Msg`s to the workers, each file's
//! `Outcome` in `Event`s to the reporter, and the counters they share.
//!
//! A leaf: it imports nothing of the stages (sources, pipeline, ops, sinks), which all import
//! it, so every arrow between stages points one way.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub(crate) use crate::digest::Digest;
use crate::digest::HashAlgo;
use crate::error::FileError;

/// What a successful file leaves behind, for the reporter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Done {
    /// Bytes read from the input.
    pub(crate) bytes_in: u64,
    /// Bytes written (the .gz size; 0 for the hashes).
    pub(crate) bytes_out: u64,
    /// The digests (hashing ops, and a compressor with hashes), one per hash of the run in
    /// the order `--op` names them, for the manifests; empty for a compressor alone.
    pub(crate) digests: Vec<Digest>,
    /// Something worth reporting about an otherwise successful file (e.g. a hard-linked input
    /// kept despite `--remove-source`).
    pub(crate) note: Option<FileError>,
    /// The input's identity when it was read (set by the pipeline), for watch mode's state.
    pub(crate) stamp: Option<Stamp>,
    /// Incremental batch: not read, because the state recorded it done with the stamp the
    /// walk found; its digest (or output) is that earlier run's.
    pub(crate) unchanged: bool,
    /// The file's job carried only some of the run's results (`Job::only`): these were
    /// computed now, the others' rows in the state stand (their digests, where the job carried
    /// them, are among `digests` all the same). `None`: every result is this read's.
    pub(crate) only: Option<Box<Only>>,
}

/// The results of a run that one file's job computes, when the state has the others recorded
/// for the stamp the file still has (a hash added to the pipeline, an output deleted): the
/// file is read once, for these only. A job without it computes every result of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Only {
    /// The compressor's output is to be made (none is recorded, or it is no longer in place).
    pub(crate) compress: bool,
    /// The hashes to compute, in `--op`'s order (possibly none).
    pub(crate) hashes: Vec<HashAlgo>,
    /// The other hashes' digests as the state has them (an incremental batch lists them in its
    /// manifests; watch mode, which writes its manifests from the state, leaves this empty).
    pub(crate) recorded: Vec<Digest>,
    /// The stamp those results were recorded for: a file found with another when it is opened
    /// has changed since, and all of its results are computed (`Only::holds_for`).
    pub(crate) stamp: Stamp,
    /// The compressor's output in place is the one filepipe made for `stamp` (recorded done
    /// with an output, still dated as that version), as the walk found it. A file found changed
    /// when opened is then done like any changed file of an incremental run, and that output
    /// replaced (`Job::replace`), which the walk could not know to allow: it found it unchanged.
    pub(crate) replaces: bool,
}

impl Only {
    /// Whether the recorded results still describe the file as opened (`now`).
    pub(crate) fn holds_for(&self, now: &Stamp) -> bool {
        self.stamp.same_file(now)
    }

    /// The hashes to compute of the run's `all` (in `--op`'s order): `self`'s, or every one
    /// without `only`.
    pub(crate) fn hashes_of<'h>(only: Option<&'h Only>, all: &'h [HashAlgo]) -> &'h [HashAlgo] {
        only.map_or(all, |o| &o.hashes)
    }
}

/// One file to process.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    /// Absolute path (the canonical root joined with `rel`).
    pub(crate) abs: PathBuf,
    /// Path relative to the root: what the manifest and logs show.
    pub(crate) rel: PathBuf,
    /// An existing output for this file was made by filepipe (watch mode's state says so) and
    /// may be replaced when the file changed; anyone else's output never is without --force.
    pub(crate) replace: bool,
    /// Watch mode: the size, mtime and inode the file had when it settled. The worker's first
    /// fstat must match, so a change the watcher was not told about is caught without a second
    /// stat on the watcher's thread. A watching coordinator's job carries the size and mtime
    /// only (`Stamp::seen_elsewhere`): the worker then publishes an output only for the version
    /// the coordinator settled.
    pub(crate) expect: Option<Stamp>,
    /// Cluster mode: the job was delivered before, to a worker that did not say how it ended
    /// (it died, or its outcome was lost), and its message was stored then (the server's
    /// clock). An output holding exactly this input is then that delivery's work, and the
    /// file counts as done, not as skipped; what an earlier delivery did to the tree it did
    /// after that time.
    pub(crate) redelivered: Option<std::time::SystemTime>,
    /// Only these of the run's results, the state having the others for the file's stamp
    /// (incremental batch and watch mode); `None`: all of them.
    pub(crate) only: Option<Box<Only>>,
}

impl Job {
    /// The job of the file at `abs`, `rel` beneath the root: all of it, nothing expected of it.
    pub(crate) fn new(abs: PathBuf, rel: PathBuf) -> Job {
        Job {
            abs,
            rel,
            replace: false,
            expect: None,
            redelivered: None,
            only: None,
        }
    }
}

/// Most jobs in one message.
pub(crate) const BATCH_FILES: usize = 64;
/// Most input bytes in one message; a larger file is sent on its own.
pub(crate) const BATCH_BYTES: u64 = 4 << 20;

/// How much a batch being filled holds, and the rule both sources fill batches by: at most
/// `BATCH_FILES` files and `BATCH_BYTES` bytes, and a file of `BATCH_BYTES` or more alone, so
/// a worker never ends a run holding several large files while the others have nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchFill {
    files: usize,
    bytes: u64,
}

impl BatchFill {
    /// Whether a file of `size` bytes goes in its own batch.
    pub(crate) fn alone(size: u64) -> bool {
        size >= BATCH_BYTES
    }

    /// Whether a file of `size` bytes may join: an empty batch takes anything, a full one
    /// nothing, and a large file only an empty one.
    pub(crate) fn takes(&self, size: u64) -> bool {
        self.files == 0 || !self.full() && !Self::alone(size)
    }

    /// Counts a file that joined.
    pub(crate) fn add(&mut self, size: u64) {
        self.files += 1;
        self.bytes += size;
    }

    /// Whether nothing more may join.
    pub(crate) fn full(&self) -> bool {
        self.files >= BATCH_FILES || self.bytes >= BATCH_BYTES
    }
}

/// What travels from a source to the workers.
#[derive(Debug)]
pub(crate) enum Msg {
    /// Process these files, in order.
    Jobs(Vec<Job>),
    /// Sentinel: the receiving worker stops. Exactly one is sent per worker.
    Shutdown,
}

/// How one file ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Processed and published.
    Done {
        /// The file, relative to the root.
        rel: PathBuf,
        /// What was produced (boxed: it is the largest variant by far).
        done: Box<Done>,
    },
    /// Deliberately left alone, with the reason.
    Skipped {
        /// The file, relative to the root.
        rel: PathBuf,
        /// Why.
        reason: FileError,
    },
    /// Could not be processed.
    Failed {
        /// The file, relative to the root.
        rel: PathBuf,
        /// What went wrong.
        error: FileError,
    },
}

impl Outcome {
    /// The file, relative to the root.
    pub(crate) fn rel(&self) -> &Path {
        match self {
            Outcome::Done { rel, .. }
            | Outcome::Skipped { rel, .. }
            | Outcome::Failed { rel, .. } => rel,
        }
    }
}

/// Files an incremental batch found as the state recorded them: done, not read, their digests
/// the state's. Kept end to end, not as an `Outcome` each: an unchanged rerun of 50,000 files
/// spent a third of its time outside the kernel making, sending, counting and freeing them
/// (a path, a `Done` and a vector of digests per file).
#[derive(Debug, Default)]
pub(crate) struct Unchanged {
    /// Every file's path bytes (relative to the root), one after the other.
    names: Vec<u8>,
    /// Every file's digests, in `--op`'s order, one file's after another's.
    digests: Vec<Digest>,
    /// Where each file's name and digests end in `names` and `digests`.
    ends: Vec<(usize, usize)>,
}

impl Unchanged {
    /// Adds the file `rel`, with the digests the state has for it.
    pub(crate) fn push(&mut self, rel: &Path, digests: &[Digest]) {
        self.names.extend_from_slice(rel.as_os_str().as_bytes());
        self.digests.extend_from_slice(digests);
        self.ends.push((self.names.len(), self.digests.len()));
    }

    /// How many files.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Each file's path bytes and digests, in the order they were added.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[Digest])> {
        let starts = std::iter::once((0, 0)).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|((n0, d0), &(n1, d1))| (&self.names[n0..n1], &self.digests[d0..d1]))
    }
}

/// What the reporter hears.
#[derive(Debug)]
pub(crate) enum Event {
    /// A worker started on a file (only sent when progress is shown).
    Started {
        /// Which worker.
        worker: usize,
        /// The file.
        rel: PathBuf,
    },
    /// Files are finished, one way or another.
    Finished(Vec<Outcome>),
    /// Incremental batch: files done from the state, unread (an `Outcome::Done` each, as
    /// far as counts, sinks and summaries go).
    Unchanged(Unchanged),
    /// A file was deleted or moved out of the tree (watch mode).
    Removed(PathBuf),
    /// Incremental batch: files the state knows that the complete walk did not find (deleted,
    /// renamed, or no longer selected): exactly these paths, never what is below them.
    Unlisted(Vec<PathBuf>),
}

/// What the reporter tells a source that listens (`source::Source::listens`) once the sink
/// has recorded a file's outcome durably: the file is no longer in flight, and may be due
/// again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recorded {
    /// The file, relative to the root.
    pub(crate) rel: PathBuf,
    /// Try again after this long (a transient failure with attempts left).
    pub(crate) retry_after: Option<Duration>,
    /// It failed because another file holds its output's name (`output-exists`): it is due
    /// again once that name is free.
    pub(crate) output_blocked: bool,
}

/// Counters the walker raises and the reporter reads for progress totals.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Regular files sent to the workers so far.
    pub(crate) files: AtomicU64,
    /// Their sizes (only counted when progress is shown: it costs a stat per file).
    pub(crate) bytes: AtomicU64,
    /// Entries reported without being sent (skipped or failed by the walker itself).
    pub(crate) reported: AtomicU64,
    /// Stale temp files of crashed runs removed.
    pub(crate) stale_temps_removed: AtomicU64,
    /// Watch mode: files waiting to settle or to be sent to a worker.
    pub(crate) queued: AtomicU64,
    /// Watch mode: files sent to the workers and not yet finished.
    pub(crate) in_flight: AtomicU64,
    /// Watch mode: files waiting to be tried again after a transient failure.
    pub(crate) retrying: AtomicU64,
    /// Outcomes the reporter has counted: done, skipped, failed (for status lines).
    pub(crate) done: AtomicU64,
    /// See `done`.
    pub(crate) skipped: AtomicU64,
    /// See `done`.
    pub(crate) failed: AtomicU64,
    /// Watch mode: iterations of the watcher's loop, a liveness sign for the watchdog.
    pub(crate) loop_ticks: AtomicU64,
    /// Watch mode: the initial scan is queued and the watches are in place.
    pub(crate) ready: std::sync::atomic::AtomicBool,
}

/// Identity of a file's content as far as the file system tells: any change means redo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// Size in bytes.
    pub(crate) size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub(crate) mtime_ns: i64,
    /// Status change time in nanoseconds since the epoch: unlike the mtime, no one can set it,
    /// so a rewrite that puts the size and mtime back (`cp -p`, `touch -r`) still moves it.
    /// `CTIME_UNKNOWN` in rows written before filepipe recorded it.
    pub(crate) ctime_ns: i64,
    /// Inode number (a file replaced by rename gets a new one).
    pub(crate) inode: u64,
}

/// The ctime of a state row written before ctimes were recorded, or of a stamp taken on
/// another host: compared as equal to any.
pub(crate) const CTIME_UNKNOWN: i64 = i64::MIN;

/// The inode of a stamp taken on another host (a cluster job's), whose inode numbers need not
/// be this host's: compared as equal to any.
pub(crate) const INODE_UNKNOWN: u64 = u64::MAX;

/// Nanoseconds since the epoch, saturating: a file dated past 2262 must not overflow (or
/// panic in debug builds).
fn ns(secs: i64, nsecs: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

impl Stamp {
    /// The stamp of a stat result.
    pub(crate) fn from_stat(st: &rustix::fs::Stat) -> Stamp {
        Stamp {
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec as i64),
            inode: st.st_ino,
        }
    }

    /// The same content as far as the file system tells (a ctime or inode not known matches
    /// any).
    pub(crate) fn same_file(&self, other: &Stamp) -> bool {
        let ctime = self.ctime_ns == other.ctime_ns
            || self.ctime_ns == CTIME_UNKNOWN
            || other.ctime_ns == CTIME_UNKNOWN;
        let inode = self.inode == other.inode
            || self.inode == INODE_UNKNOWN
            || other.inode == INODE_UNKNOWN;
        self.size == other.size && self.mtime_ns == other.mtime_ns && inode && ctime
    }

    /// What another host saw of a file: its size and mtime (see `INODE_UNKNOWN`).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn seen_elsewhere(size: u64, mtime_ns: i64) -> Stamp {
        Stamp {
            size,
            mtime_ns,
            ctime_ns: CTIME_UNKNOWN,
            inode: INODE_UNKNOWN,
        }
    }

    /// The stamp of `path`, not following a final symlink.
    pub(crate) fn of(path: &Path) -> Option<Stamp> {
        rustix::fs::lstat(path).ok().map(|st| Stamp::from_stat(&st))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn d(byte: u8) -> Digest {
        Digest::new(HashAlgo::Sha256, &[byte; 32]).unwrap()
    }

    #[test]
    fn an_unchanged_batch_gives_back_each_file_with_its_own_digests_in_order() {
        let mut files = Unchanged::default();
        assert!(files.is_empty() && files.iter().next().is_none());
        files.push(Path::new("a/b"), &[d(1), d(2)]);
        // A compressor alone lists no digest; a name that is not UTF-8 is bytes as ever.
        files.push(Path::new("c"), &[]);
        files.push(Path::new(OsStr::from_bytes(b"d/\xff\n")), &[d(3)]);
        let got: Vec<(&[u8], Vec<u8>)> = files
            .iter()
            .map(|(name, ds)| {
                (
                    name,
                    ds.iter().flat_map(|d| d.as_bytes()[..1].to_vec()).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (&b"a/b"[..], vec![1, 2]),
                (&b"c"[..], vec![]),
                (&b"d/\xff\n"[..], vec![3]),
            ]
        );
        assert_eq!(files.len(), 3);
    }
}
