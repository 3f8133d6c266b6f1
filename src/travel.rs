//! What travels between the stages: a source's `Job`s in `Msg`s to the workers, each file's
//! `Outcome` in `Event`s to the reporter, and the counters they share.
//!
//! A leaf: it imports nothing of the stages (sources, pipeline, ops, sinks), which all import
//! it, so every arrow between stages points one way.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use crate::error::FileError;
use crate::state::Stamp;

/// What a successful file leaves behind, for the reporter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Done {
    /// Bytes read from the input.
    pub bytes_in: u64,
    /// Bytes written (the .gz size; 0 for sha256).
    pub bytes_out: u64,
    /// The SHA-256 digest, for the manifest.
    pub digest: Option<[u8; 32]>,
    /// Something worth reporting about an otherwise successful file (e.g. a hard-linked input
    /// kept despite `--remove-source`).
    pub note: Option<FileError>,
    /// The input's identity when it was read (set by the pipeline), for watch mode's state.
    pub stamp: Option<Stamp>,
}

/// One file to process.
#[derive(Debug, Clone)]
pub struct Job {
    /// Absolute path (the canonical root joined with `rel`).
    pub abs: PathBuf,
    /// Path relative to the root: what the manifest and logs show.
    pub rel: PathBuf,
    /// An existing output for this file was made by filepipe (watch mode's state says so) and
    /// may be replaced when the file changed; anyone else's output never is without --force.
    pub replace: bool,
    /// Watch mode: the size, mtime and inode the file had when it settled. The worker's first
    /// fstat must match, so a change the watcher was not told about is caught without a second
    /// stat on the watcher's thread.
    pub expect: Option<Stamp>,
}

/// Most jobs in one message.
pub const BATCH_FILES: usize = 64;
/// Most input bytes in one message; a larger file is sent on its own.
pub const BATCH_BYTES: u64 = 4 << 20;

/// How much a batch being filled holds, and the rule both sources fill batches by: at most
/// `BATCH_FILES` files and `BATCH_BYTES` bytes, and a file of `BATCH_BYTES` or more alone, so
/// a worker never ends a run holding several large files while the others have nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchFill {
    files: usize,
    bytes: u64,
}

impl BatchFill {
    /// Whether a file of `size` bytes goes in its own batch.
    pub fn alone(size: u64) -> bool {
        size >= BATCH_BYTES
    }

    /// Whether a file of `size` bytes may join: an empty batch takes anything, a full one
    /// nothing, and a large file only an empty one.
    pub fn takes(&self, size: u64) -> bool {
        self.files == 0 || !self.full() && !Self::alone(size)
    }

    /// Counts a file that joined.
    pub fn add(&mut self, size: u64) {
        self.files += 1;
        self.bytes += size;
    }

    /// Whether nothing more may join.
    pub fn full(&self) -> bool {
        self.files >= BATCH_FILES || self.bytes >= BATCH_BYTES
    }
}

/// What travels from a source to the workers.
#[derive(Debug)]
pub enum Msg {
    /// Process these files, in order.
    Jobs(Vec<Job>),
    /// Sentinel: the receiving worker stops. Exactly one is sent per worker.
    Shutdown,
}

/// How one file ended.
#[derive(Debug)]
pub enum Outcome {
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

/// What the reporter hears.
#[derive(Debug)]
pub enum Event {
    /// A worker started on a file (only sent when progress is shown).
    Started {
        /// Which worker.
        worker: usize,
        /// The file.
        rel: PathBuf,
    },
    /// Files are finished, one way or another.
    Finished(Vec<Outcome>),
    /// A file was deleted or moved out of the tree (watch mode).
    Removed(PathBuf),
}

/// Counters the walker raises and the reporter reads for progress totals.
#[derive(Debug, Default)]
pub struct Stats {
    /// Regular files sent to the workers so far.
    pub files: AtomicU64,
    /// Their sizes (only counted when progress is shown: it costs a stat per file).
    pub bytes: AtomicU64,
    /// Entries reported without being sent (skipped or failed by the walker itself).
    pub reported: AtomicU64,
    /// Stale temp files of crashed runs removed.
    pub stale_temps_removed: AtomicU64,
    /// Watch mode: files waiting to settle or to be sent to a worker.
    pub queued: AtomicU64,
    /// Watch mode: files sent to the workers and not yet finished.
    pub in_flight: AtomicU64,
    /// Watch mode: files waiting to be tried again after a transient failure.
    pub retrying: AtomicU64,
    /// Outcomes the reporter has counted: done, skipped, failed (for status lines).
    pub done: AtomicU64,
    /// See `done`.
    pub skipped: AtomicU64,
    /// See `done`.
    pub failed: AtomicU64,
    /// Watch mode: iterations of the watcher's loop, a liveness sign for the watchdog.
    pub loop_ticks: AtomicU64,
    /// Watch mode: the initial scan is queued and the watches are in place.
    pub ready: std::sync::atomic::AtomicBool,
}
