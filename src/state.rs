//! Durable per-file state for watch mode and incremental batches (`batch --state`), in SQLite
//! (rusqlite, bundled).
//!
//! One row per (root, op, path), `op` a single op (`sha256`, `zstd`), path stored as raw bytes
//! so non-UTF-8 names survive: a pipeline of several results (`sha256,blake3,zstd`) keeps a row
//! per result, so adding an op to it finds the others' rows and computes only the new one, and
//! removing one just stops recording it. The reporter thread is the only writer; the watcher
//! reads through its own connection (WAL lets readers and the writer proceed together). A
//! file's result is "done" for a given size, mtime, ctime and inode: any change makes the file
//! a candidate again for every result, so after a crash or restart exactly the files that
//! appeared or changed, or lack a result, are processed. States written before rows were per
//! result (a watch of several results filed one row under `sha256,blake3,zstd`, the digests
//! concatenated) are split into per-result rows when opened for writing (`SCHEMA`). Done rows wait in the writer until the commit (or its
//! next other statement) and go in sorted by path, which keeps a burst's inserts together in
//! the B-tree. Commits happen once per outcome batch with
//! `synchronous=NORMAL`: a SIGKILL loses nothing committed; a power cut may lose the last
//! batches, which are then redone (gzip outputs are skipped as up to date).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex, Weak};

use anyhow::{bail, Context, Result};
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use rustix::io::Errno;

use crate::cli::{OpKind, OpSpec};
use crate::digest::{Digest, HashAlgo};
use crate::error::{FileError, Kind};
use crate::fsio::lock::{self as fslock, LockKind};
use crate::travel::{Done, Only, Stamp, CTIME_UNKNOWN};

mod known;
pub(crate) use known::KnownMap;

/// The layout of the database this filepipe writes, kept in SQLite's `user_version`: 0 is
/// before rows were per result (a pipeline of several results filed under their joined
/// name), 1 is a row per result.
const SCHEMA: i64 = 1;

/// The file name of the database inside the state directory.
pub(crate) const DB_NAME: &str = "filepipe.sqlite";

/// The file in the state directory that its owner holds locked (see `lock_dir`).
pub(crate) const LOCK_NAME: &str = "filepipe.lock";

/// Every file the state keeps in its directory: the lock, the database and SQLite's files
/// beside it.
pub(crate) const FILE_NAMES: [&str; 5] = [
    LOCK_NAME,
    DB_NAME,
    "filepipe.sqlite-wal",
    "filepipe.sqlite-shm",
    "filepipe.sqlite-journal",
];

/// A state directory owned by this process. Two daemons writing one state would each process
/// files the other already did (and fail on the other's outputs), so the directory belongs to
/// the one process that holds `LOCK_NAME` locked; the file also says who that is. The pipelines
/// of one process (a service's) share it; the lock goes when the last of them drops it.
#[derive(Debug)]
pub(crate) struct DirLock {
    file: std::fs::File,
    dir: PathBuf,
}

impl DirLock {
    /// Whether the lock file held is still the one at its path: not when the state directory
    /// was deleted or replaced since (a database opened there now is another, unlocked).
    pub(crate) fn in_place(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(held), Ok(there)) = (
            self.file.metadata(),
            std::fs::symlink_metadata(self.dir.join(LOCK_NAME)),
        ) else {
            return false;
        };
        held.nlink() > 0 && (held.dev(), held.ino()) == (there.dev(), there.ino())
    }
}

/// Takes the state directory `dir` (an existing, canonical path) for this process, or says
/// which process holds it.
pub(crate) fn lock_dir(dir: &Path) -> Result<Arc<DirLock>> {
    use std::io::Read;
    static HELD: Mutex<Vec<Weak<DirLock>>> = Mutex::new(Vec::new());
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    held.retain(|w| w.strong_count() > 0);
    if let Some(mine) = held.iter().filter_map(Weak::upgrade).find(|l| l.dir == dir) {
        return Ok(mine);
    }
    let path = dir.join(LOCK_NAME);
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o644)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match fslock::lock(&file, LockKind::Write, false) {
        Ok(()) => {}
        Err(Errno::AGAIN) => {
            let mut holder = String::new();
            let _ = (&file).take(4096).read_to_string(&mut holder);
            // Its first line: a holder writes its line over the last one's, then cuts the
            // file, and between the two the last one's end still follows it.
            let holder = holder.lines().next().unwrap_or("").trim();
            bail!(
                "the state directory {} is in use by {}: one state belongs to one process (a \
                 watch daemon or an incremental batch); stop that one first, or give this one \
                 its own --state (state_dir)",
                dir.display(),
                if holder.is_empty() {
                    "another filepipe"
                } else {
                    holder
                }
            );
        }
        Err(e) => {
            return Err(anyhow::Error::from(std::io::Error::from(e)))
                .with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    // Who holds it, for the message a second daemon prints.
    let host = rustix::system::uname();
    let who = format!(
        "filepipe pid {} on {} (started {})\n",
        std::process::id(),
        host.nodename().to_string_lossy(),
        crate::logging::utc_now()
    );
    // Written over what was there, then cut to its length: emptied first, the file gave its
    // block back and took one again at every start, and where the file system discards freed
    // blocks (`-o discard`) the truncate waited for the device.
    std::os::unix::fs::FileExt::write_all_at(&file, who.as_bytes(), 0)
        .and_then(|()| file.set_len(who.len() as u64))
        .with_context(|| format!("cannot write {}", path.display()))?;
    let lock = Arc::new(DirLock {
        file,
        dir: dir.to_path_buf(),
    });
    held.push(Arc::downgrade(&lock));
    Ok(lock)
}

/// Whether `e` says a state database is damaged (not a database, or corrupt), for the hint
/// of what to do about it.
pub(crate) fn damaged(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<rusqlite::Error>()
                .and_then(rusqlite::Error::sqlite_error_code),
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
        )
    })
}

/// How many attempts a transient failure gets before it is kept as failed.
pub(crate) const MAX_ATTEMPTS: u32 = 5;

/// How a file ended, as the state records it (the `status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileStatus {
    /// Processed: its output or digest is published.
    Done,
    /// Deliberately not processed (already compressed, up to date, interrupted...).
    Skipped,
    /// Failed, with the error and the attempts in the row.
    Failed,
}

impl FileStatus {
    /// The column's text.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FileStatus::Done => "done",
            FileStatus::Skipped => "skipped",
            FileStatus::Failed => "failed",
        }
    }
}

impl rusqlite::types::ToSql for FileStatus {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for FileStatus {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        match value.as_str()? {
            "done" => Ok(FileStatus::Done),
            "skipped" => Ok(FileStatus::Skipped),
            "failed" => Ok(FileStatus::Failed),
            other => Err(rusqlite::types::FromSqlError::Other(
                format!("unknown file status {other:?} in the state").into(),
            )),
        }
    }
}

/// What the state knows about one file's result of one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// How it ended.
    pub(crate) status: FileStatus,
    /// The stamp it had when it got that status (absent for some skips and failures).
    pub(crate) stamp: Option<Stamp>,
    /// Attempts so far (failures).
    pub(crate) attempts: u32,
    /// Failed because another process still had it open for writing: waited for, never
    /// given up on (see `Kind::InUse`).
    pub(crate) in_use: bool,
    /// An output filepipe made for a version of it is recorded (kept through later failures
    /// and skips): the next version may replace that output.
    pub(crate) made_output: bool,
    /// The mtime of the version whose output filepipe made (as it dates the output), kept
    /// through later failures and skips: what tells that output from a file another hand put
    /// at its name. `None` where unknown (a failure recorded before filepipe kept it).
    pub(crate) made_mtime: Option<i64>,
    /// The digest stored (a hash op's done file, of that op's length and a blob; `None`
    /// otherwise): an incremental batch lists it for a file it does not read again, and a done
    /// hash without one is read again (`Known::settled`). Kept inline: read as a byte vector,
    /// it was an allocation per row.
    pub(crate) digest: Option<Digest>,
}

impl Record {
    /// True if `now` needs no processing: done (or deliberately skipped) with the same stamp,
    /// or failed for good with the same stamp.
    pub(crate) fn settled(&self, now: Option<Stamp>) -> bool {
        let same = self.same_stamp(now);
        match self.status {
            FileStatus::Done => same,
            FileStatus::Skipped => same || self.stamp.is_none() && now.is_none(),
            // Unknown both times: a file its directory lets be listed, not looked at.
            FileStatus::Failed => {
                (same || self.stamp.is_none() && now.is_none())
                    && self.attempts >= MAX_ATTEMPTS
                    && !self.in_use
            }
        }
    }

    /// False for a done hash whose digest is not at hand: its row was damaged or written by
    /// something else (a digest of another length or type, or none). Taken for settled, the
    /// file was left out of watch mode's manifest for good (found by a review); so it is read
    /// again, as an incremental batch reads it.
    fn whole(&self, op: OpKind) -> bool {
        self.status != FileStatus::Done || op.hash().is_none() || self.digest.is_some()
    }

    /// True if the file was done and `now` is the stamp it was done with: an incremental batch
    /// takes its recorded result without reading it. Narrower than `settled`: a batch tries
    /// failed files again and looks afresh at skipped ones (another `--force` may apply).
    pub(crate) fn done_as(&self, now: Option<Stamp>) -> bool {
        self.status == FileStatus::Done && self.same_stamp(now)
    }

    /// Whether the recorded stamp is `now` (size, mtime, ctime and inode; see
    /// `Stamp::same_file`); never when either is unknown.
    fn same_stamp(&self, now: Option<Stamp>) -> bool {
        match (self.stamp, now) {
            (Some(a), Some(b)) => a.same_file(&b),
            _ => false,
        }
    }
}

/// What the state knows about one file, for the ops of a run (`Reader::ops`): a record per op
/// it has a row for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Known {
    /// One op of the run the state has a row for, and what it says: every known file has
    /// one, kept inline, so a run of one op makes no allocation per file beyond its row's.
    first: (OpKind, Record),
    /// The other ops' (runs of several results).
    more: Vec<(OpKind, Record)>,
    /// How many ops the run has: a file with fewer records lacks a result.
    wanted: usize,
}

/// Which of a run's results a file found with a stamp lacks (`Known::lacks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lacks {
    /// None: every result is recorded for this stamp; the digests (in `--op`'s order) are the
    /// state's.
    Nothing(Vec<Digest>),
    /// Some: a job for these only (the others' recorded digests with it).
    Part(Only),
    /// All of them (or the stamp is unknown): a whole job.
    All,
}

impl Known {
    /// A file known by `op`'s record, for a run of `wanted` ops (`add` the others).
    pub(crate) fn of(op: OpKind, record: Record, wanted: usize) -> Known {
        Known {
            first: (op, record),
            more: Vec::new(),
            wanted,
        }
    }

    /// Adds another op's record.
    pub(crate) fn add(&mut self, op: OpKind, record: Record) {
        self.more.push((op, record));
    }

    /// Every record, with its op.
    fn records(&self) -> impl Iterator<Item = &(OpKind, Record)> {
        std::iter::once(&self.first).chain(&self.more)
    }

    /// How many of the run's ops have a record.
    fn count(&self) -> usize {
        1 + self.more.len()
    }

    /// The record of `op`, if the state has one.
    pub(crate) fn record(&self, op: OpKind) -> Option<&Record> {
        self.records().find(|(k, _)| *k == op).map(|(_, r)| r)
    }

    /// True if `now` needs no processing: every op of the run settled with it
    /// (`Record::settled`).
    pub(crate) fn settled(&self, now: Option<Stamp>) -> bool {
        self.count() == self.wanted && self.records().all(|(op, r)| r.settled(now) && r.whole(*op))
    }

    /// True if some op of the run recorded the file done (with whatever stamp).
    pub(crate) fn any_done(&self) -> bool {
        self.records().any(|(_, r)| r.status == FileStatus::Done)
    }

    /// True if every op of the run was done with the stamp `now` (`Record::done_as`).
    #[cfg(test)]
    pub(crate) fn done_as(&self, now: Option<Stamp>) -> bool {
        self.count() == self.wanted && self.records().all(|(_, r)| r.done_as(now))
    }

    /// An output filepipe made for a version of the file is recorded (`Record::made_output`).
    #[cfg(test)]
    pub(crate) fn made_output(&self) -> bool {
        self.records().any(|(_, r)| r.made_output)
    }

    /// Which of `spec`'s results the file, found with `now`, lacks: those whose row was not
    /// done with that stamp, a hash's whose digest is not at hand (not read: see `digest`),
    /// and the compressor's when `output_stands` (given whether the row names an output of
    /// filepipe's) says its output no longer does.
    pub(crate) fn lacks(
        &self,
        spec: &OpSpec,
        now: Option<Stamp>,
        output_stands: impl FnOnce(bool) -> bool,
    ) -> Lacks {
        let Some(stamp) = now else {
            return Lacks::All;
        };
        let mut hashes = Vec::new();
        let mut recorded = Vec::with_capacity(spec.hashes().len());
        for &algo in spec.hashes() {
            let digest = self
                .record(OpKind::from(algo))
                .filter(|r| r.done_as(now))
                .and_then(|r| r.digest.filter(|d| d.algo() == algo));
            match digest {
                Some(d) => recorded.push(d),
                None => hashes.push(algo),
            }
        }
        let compress = spec.compressor().is_some_and(|c| {
            !self
                .record(c)
                .filter(|r| r.done_as(now))
                .is_some_and(|r| output_stands(r.made_output))
        });
        if !compress && hashes.is_empty() {
            Lacks::Nothing(recorded)
        } else if recorded.is_empty() && compress == spec.compresses() {
            Lacks::All
        } else {
            Lacks::Part(Only {
                compress,
                hashes,
                recorded,
                stamp,
                replaces: false,
            })
        }
    }
}

/// The ops a run of `spec` files rows under, one per result: the hashes in their canonical
/// order, then the compressor.
fn ops_of(spec: &OpSpec) -> Vec<OpKind> {
    let mut ops: Vec<OpKind> = spec.hash_layout().into_iter().map(OpKind::from).collect();
    ops.extend(spec.compressor());
    ops
}

/// The writer side, owned by the reporter.
pub(crate) struct State {
    conn: Connection,
    /// The database file, for messages.
    path: PathBuf,
    /// Its device and inode when opened (`in_place`).
    file: (u64, u64),
    root: Vec<u8>,
    /// The run's ops (`ops_of`): each file's outcome is recorded under each.
    ops: Vec<OpKind>,
    /// Done rows not yet committed: the first `written` are in the open transaction, the
    /// rest are written (in path order) before the commit and before any other statement
    /// touches the table (`write_done`). All are kept until a commit succeeds, so a
    /// transaction SQLite rolls back (a full disk) loses none of them: the next one writes
    /// them again.
    done: Vec<DoneRow>,
    written: usize,
    /// The open transaction holds a statement other than done rows (a failure, a removal),
    /// which a rollback would lose.
    lossy: bool,
    /// Something given since the last good commit is lost: a write that failed, or a rollback
    /// of a `lossy` transaction. Said by the next `commit`.
    lost: bool,
    /// What the last failed `commit` left: every result since the last good one still held
    /// for the next (`holds_all`).
    held_all: bool,
}

/// A done file's row, waiting in `State::done`.
struct DoneRow {
    path: Vec<u8>,
    /// The op whose result it is.
    op: OpKind,
    stamp: Option<Stamp>,
    output: Option<Vec<u8>>,
    /// A hash's digest, if it is one.
    digest: Option<Digest>,
    updated: i64,
}

/// Done rows held back from the transaction at most (the reporter commits at least every
/// 50 ms, far fewer files).
const DONE_ROWS: usize = 4096;

/// A done file's row, bound by `DoneRow::bind`.
const INSERT_DONE: &str = "INSERT OR REPLACE INTO files
       (root, op, path, size, mtime_ns, inode, output, digest, status, attempts, updated, ctime_ns,
        made_mtime_ns)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'done', 0, ?9, ?10,
             CASE WHEN ?7 IS NOT NULL THEN ?5 END)";

/// The columns a `Record` is read from (`record_from_row`), as they are stored: what a row
/// means is worked out in Rust, once per row, not by `CASE` expressions SQLite evaluates
/// (comparing the status as text) for every row of a tree's.
const RECORD_COLUMNS: &str =
    "status, size, mtime_ns, inode, attempts, ctime_ns, error, output IS NOT NULL, digest, \
     made_mtime_ns";

/// A read-only view for the watcher's lookups.
pub(crate) struct Reader {
    conn: Connection,
    root: Vec<u8>,
    /// The run's ops (`ops_of`): a file's `Known` has a record for each the state has a row
    /// for.
    ops: Vec<OpKind>,
}

/// The device and inode of the file at `path` (not followed if a symlink).
fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join(DB_NAME)
}

/// The room `reserve_wal_index` makes ahead, where the disk has room: 8 of SQLite's 32 KiB
/// WAL-index regions, enough for a WAL of 32,768 pages (128 MiB), far beyond what filepipe's
/// commits and SQLite's checkpoints at 1,000 pages let it reach.
const WAL_INDEX_AHEAD: u64 = 256 * 1024;

/// Blocks on disk for the WAL index SQLite maps into memory (`filepipe.sqlite-shm`), where the
/// file system's blocks are smaller than a page (ext4 below 512 MiB: 1 KiB). SQLite grows the
/// file by writing the last byte of each page it adds, which there allocates one block of the
/// page's four: its first store into another on a full disk raises SIGBUS, and the run died
/// with no summary and no word (exit 135: found by review r57b). With the blocks allocated
/// here, a full disk is an error SQLite reports. The index as it is now must have its blocks
/// (a disk too full for them, a few KiB, is said at start); the room ahead only where the
/// WAL could grow to need it. A file system that cannot
/// allocate ahead (`EOPNOTSUPP`) is left as it was.
///
/// The file is opened only there, and never closed (`HeldIndexes`): SQLite's locks on it are
/// POSIX record locks, which the kernel drops, every one this process holds on the file, when
/// any descriptor of it is closed. Closed after its `fallocate`, the daemon held no lock on
/// its index; the next `filepipe status` then took it for the first to open the state and cut
/// the index to 3 bytes under the daemon's mapping: SIGBUS, in one run of `status` in a few
/// hundred while files came (found in CI, where a test read the state the same way).
fn reserve_wal_index(db: &Path) -> Result<()> {
    let Some(vfs) = small_blocks(db.parent().unwrap_or(Path::new("."))) else {
        return Ok(());
    };
    let mut name = db.as_os_str().to_owned();
    name.push("-shm");
    let shm = PathBuf::from(name);
    let mut held = HELD_INDEXES.lock().unwrap_or_else(|e| e.into_inner());
    let Some(file) = held.file(&shm)? else {
        return Ok(());
    };
    let size = file.metadata().map_or(0, |m| m.len());
    let keep = rustix::fs::FallocateFlags::KEEP_SIZE;
    match rustix::fs::fallocate(file, keep, 0, size) {
        Ok(()) => {}
        Err(e @ (Errno::NOSPC | Errno::DQUOT)) => bail!(
            "no room on the state's disk for its WAL index ({} KiB, {}): free some space \
             there, or give another --state ({e})",
            size.div_ceil(1024),
            shm.display()
        ),
        Err(_) => return Ok(()),
    }
    // A second region is needed only once the WAL holds 4,096 pages (16 MiB): where the disk
    // has not that much room, it never will, and what is left is the WAL's (taking it here
    // failed commits that had fitted).
    if size < WAL_INDEX_AHEAD && available(&vfs) > 16 * 1024 * 1024 + WAL_INDEX_AHEAD {
        let _ = rustix::fs::fallocate(file, keep, size, WAL_INDEX_AHEAD - size);
    }
    Ok(())
}

/// The file system of `dir` (asked without opening anything) where its blocks are smaller
/// than a page, as SQLite's WAL index needs them allocated (`reserve_wal_index`,
/// `room_to_open`); `None` elsewhere, or where it cannot be told.
fn small_blocks(dir: &Path) -> Option<rustix::fs::StatVfs> {
    let vfs = rustix::fs::statvfs(dir).ok()?;
    (vfs.f_bsize != 0 && vfs.f_bsize < rustix::param::page_size() as u64).then_some(vfs)
}

/// What `df` says is available: for root too, as ext4's free blocks include its own reserve,
/// which no one may take (a root run died of SIGBUS with 4 MiB "free" and 9 KiB available).
fn available(vfs: &rustix::fs::StatVfs) -> u64 {
    vfs.f_bavail.saturating_mul(vfs.f_frsize)
}

/// "cannot open state database PATH", saying so where its disk is full: SQLite's own words
/// for a WAL index it cannot map there are "disk I/O error ... xShmMap" (review r58b).
fn opening(db: &Path) -> String {
    format!(
        "cannot open state database {}{}",
        db.display(),
        disk_full(db)
    )
}

/// ", its disk is full (N KiB available)" where the file system of `db` has under 1 MiB
/// available; else nothing.
fn disk_full(db: &Path) -> String {
    let dir = db.parent().unwrap_or(Path::new("."));
    match rustix::fs::statvfs(dir).map(|vfs| available(&vfs)) {
        Ok(free) if free < 1 << 20 => format!(", its disk is full ({} KiB available)", free / 1024),
        _ => String::new(),
    }
}

/// The free space a state needs to be opened where the file system's blocks are smaller than
/// a page: SQLite's WAL index maps its first region (32 KiB) at once, allocating one block of
/// each page's four as it grows the file and the others as it stores into them, with no way
/// to fail but SIGBUS (`reserve_wal_index` comes after); the rest is for the WAL's first pages.
const ROOM_TO_OPEN: u64 = 64 * 1024;

/// Refuses to open the state at `db` in `dir` where blocks are smaller than a page and less
/// than `ROOM_TO_OPEN` is free: with 9 to 11 KiB free the start died of SIGBUS, with no word,
/// and again at each restart; with less, SQLite said "disk I/O error" (review r58).
fn room_to_open(dir: &Path, db: &Path) -> Result<()> {
    let Some(vfs) = small_blocks(dir) else {
        return Ok(());
    };
    // Root's 5 % would do too, but a disk filled to it is full.
    let free = available(&vfs);
    if free < ROOM_TO_OPEN {
        bail!(
            "no room on the state's disk for its WAL index ({} KiB available, {} KiB needed to \
             open {}): free some space there, or give another --state",
            free / 1024,
            ROOM_TO_OPEN / 1024,
            db.display()
        );
    }
    Ok(())
}

/// The WAL indexes `reserve_wal_index` opened, held open for as long as SQLite may hold locks
/// on them (see there).
static HELD_INDEXES: Mutex<HeldIndexes> = Mutex::new(HeldIndexes(Vec::new()));

struct HeldIndexes(Vec<std::fs::File>);

impl HeldIndexes {
    /// The index at `shm` (`None`: there is none, SQLite keeps it in memory), opened once per
    /// file. One whose name has gone (SQLite removes the index when the last connection of
    /// every process closes) is closed here: no connection of this process has it any more.
    fn file(&mut self, shm: &Path) -> Result<Option<&std::fs::File>> {
        use std::os::unix::fs::MetadataExt;
        self.0.retain(|f| f.metadata().is_ok_and(|m| m.nlink() > 0));
        let id = match file_id(shm) {
            Ok(id) => id,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", shm.display())),
        };
        let at = self
            .0
            .iter()
            .position(|f| f.metadata().is_ok_and(|m| (m.dev(), m.ino()) == id));
        let at = match at {
            Some(at) => at,
            None => {
                let file = match std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(shm)
                {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot open {}", shm.display()))
                    }
                };
                self.0.push(file);
                self.0.len() - 1
            }
        };
        Ok(Some(&self.0[at]))
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64
}

impl State {
    /// Opens (creating if needed) the database in `dir` for one root and the ops of `spec`,
    /// upgrading a state written before rows were per result (`upgrade`).
    pub(crate) fn open(dir: &Path, root: &Path, spec: &OpSpec) -> Result<State> {
        // One at a time in this process: the pipelines of a service open their shared state
        // together, and two connections turning a state from before WAL into WAL (or adding a
        // column) at once can each hold a read lock the other must wait out: SQLite then fails
        // one at once ("database is locked"), busy timeout or not, and that pipeline with it
        // (seen in a test of a service over an old state, about one start in four).
        static OPENING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = OPENING.lock().unwrap_or_else(|e| e.into_inner());
        // Made already, as `NewDir::state_for` says, by `Config`. The database and its WAL
        // files take SQLite's `0644` less the umask: the directory, open to no one the trees
        // are closed to, is what keeps their names and digests from other users.
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create state directory {}", dir.display()))?;
        let path = db_path(dir);
        room_to_open(dir, &path)?;
        // No symlink on the way (`dir` is resolved): what `secret::check_state_dir` asks of the
        // state's files, held again where SQLite opens them.
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::default() | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .with_context(|| opening(&path))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // SQLite opens a file it may not write read-only, without a word: the run then failed
        // at its first file's outcome, every pipeline of a service with it, and under the
        // shipped units again at each restart (found by a review).
        let not_a_state = || opening(&path);
        if conn
            .is_readonly(rusqlite::MAIN_DB)
            .with_context(not_a_state)?
        {
            bail!(
                "the state database {} cannot be written by this user: give it (and its \
                 directory) write permission, or another --state",
                path.display()
            );
        }
        // Refused before anything is written to it: a newer layout, or some other program's
        // database of that name (found by a review: it was turned to WAL and given columns,
        // then refused).
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .with_context(not_a_state)?;
        if version > SCHEMA {
            bail!(
                "the state database {} was written by a newer filepipe (layout {version}, this \
                 one knows up to {SCHEMA}): run that one, or give this one another --state",
                path.display()
            );
        }
        let columns: Vec<String> = (conn.prepare("SELECT name FROM pragma_table_info('files')"))
            .and_then(|mut q| q.query_map([], |r| r.get(0))?.collect())
            .with_context(not_a_state)?;
        if !columns.is_empty()
            && !["root", "op", "path"]
                .iter()
                .all(|c| columns.iter().any(|n| n == c))
        {
            bail!(
                "{} is not a filepipe state database (its `files` table is another program's): \
                 give filepipe another --state",
                path.display()
            );
        }
        // Another process (`filepipe status`, an administrator's `sqlite3`) can meet this one
        // in the same deadlock: it is waited out, as the busy timeout would be.
        retry_busy(|| {
            conn.execute_batch(
                "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS files (
                 root     BLOB    NOT NULL,
                 op       TEXT    NOT NULL,
                 path     BLOB    NOT NULL,
                 size     INTEGER,
                 mtime_ns INTEGER,
                 inode    INTEGER,
                 output   BLOB,
                 digest   BLOB,
                 status   TEXT    NOT NULL,
                 error    TEXT,
                 errno    INTEGER,
                 message  TEXT,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 updated  INTEGER NOT NULL,
                 ctime_ns INTEGER,
                 made_mtime_ns INTEGER,
                 PRIMARY KEY (root, op, path)
             ) WITHOUT ROWID;",
            )
        })
        .with_context(|| {
            format!(
                "cannot initialise state database {}{}",
                path.display(),
                disk_full(&path)
            )
        })?;
        // A state from before ctimes were recorded: the column is added, its rows keep NULL
        // (CTIME_UNKNOWN) until each file is next done. One from before the made output's
        // version was kept through failures: added too, NULL (`Record::made_mtime` then falls
        // back on a done row's own mtime).
        for column in ["ctime_ns", "made_mtime_ns"] {
            retry_busy(|| add_column(&mut conn, column))
                .with_context(|| format!("cannot upgrade state database {}", path.display()))?;
        }
        if version < SCHEMA {
            retry_busy(|| upgrade(&mut conn))
                .with_context(|| format!("cannot upgrade state database {}", path.display()))?;
        }
        reserve_wal_index(&path)?;
        // The file SQLite has open: after the statements above, it exists.
        let file = file_id(&path).with_context(not_a_state)?;
        Ok(State {
            conn,
            path,
            file,
            root: root.as_os_str().as_bytes().to_vec(),
            ops: ops_of(spec),
            done: Vec::new(),
            written: 0,
            lossy: false,
            lost: false,
            held_all: true,
        })
    }

    /// Whether the database file opened is still the one at its path: not once it was
    /// deleted or replaced (what is committed then goes to a file no name leads to).
    pub(crate) fn in_place(&self) -> bool {
        file_id(&self.path).is_ok_and(|id| id == self.file)
    }

    /// A second, read-only connection for lookups from another thread.
    pub(crate) fn reader(dir: &Path, root: &Path, spec: &OpSpec) -> Result<Reader> {
        let path = db_path(dir);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .with_context(|| format!("cannot open state database {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(Reader {
            conn,
            root: root.as_os_str().as_bytes().to_vec(),
            ops: ops_of(spec),
        })
    }

    /// Starts a transaction unless one is open (`commit` ends it; so may SQLite, rolling
    /// back after a full disk). Batching rows per transaction keeps the cost of durability to
    /// one WAL append per batch.
    ///
    /// A write that cannot begin (another process holding the state's write lock past the
    /// busy timeout, a full disk) is lost: said by the next `commit` (review r58b: a watch
    /// stopped so said nothing of a file it had not recorded, nor of a removal it had lost).
    pub(crate) fn begin(&mut self) -> Result<()> {
        let begun = self.begin_transaction();
        self.lost |= begun.is_err();
        begun
    }

    fn begin_transaction(&mut self) -> Result<()> {
        if !self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .with_context(|| format!("cannot write the state database {}", self.path.display()))
    }

    /// Whether there is anything for `commit` to do or to say: a transaction open, done rows
    /// waiting (their transaction rolled back), or a loss not yet said.
    pub(crate) fn unsettled(&self) -> bool {
        !self.conn.is_autocommit() || !self.done.is_empty() || self.lost
    }

    /// Commits what was given since the last commit (in a transaction of its own, where SQLite
    /// rolled the last one back). On failure, `holds_all` says whether all of it is still held
    /// for the next commit: the done rows always are; the rest is where the transaction is
    /// still open. A loss since the last good commit (a write that failed, a rollback of
    /// other statements) is an error here even where the commit itself succeeds, once.
    pub(crate) fn commit(&mut self) -> Result<()> {
        let committed = (|| -> Result<()> {
            self.begin_transaction()?;
            self.write_done()?;
            Ok(self.conn.execute_batch("COMMIT")?)
        })();
        if committed.is_ok() {
            self.done.clear();
            self.written = 0;
            self.lossy = false;
        } else {
            self.after_failure();
        }
        let lost = std::mem::take(&mut self.lost);
        self.held_all = !lost;
        let context = || format!("cannot write the state database {}", self.path.display());
        committed.with_context(context)?;
        if lost {
            bail!(
                "{}: an earlier write failed, and what it held is not recorded",
                context()
            );
        }
        Ok(())
    }

    /// Whether the last failed `commit` left every result since the last good one held for
    /// the next: then a good commit later records them all.
    pub(crate) fn holds_all(&self) -> bool {
        self.held_all
    }

    /// After a statement failed: where SQLite rolled the transaction back, its done rows are
    /// written again in the next, and anything else it held is lost. Where it held other
    /// statements, the rows it had are dropped with them: written again alone, a row could
    /// stand for a file whose later failure or removal was lost (the rows not yet written
    /// came after every statement, and stay).
    fn after_failure(&mut self) {
        if self.conn.is_autocommit() {
            if std::mem::take(&mut self.lossy) {
                self.lost = true;
                self.done.drain(..self.written);
            }
            self.written = 0;
        }
    }

    /// Runs a write other than a done row's (`lossy`): a failure loses it.
    fn write_other<T>(&mut self, write: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = self.write_done().and_then(|()| {
            self.lossy = true;
            let r = write(self);
            if r.is_err() {
                self.after_failure();
            }
            r
        });
        // Not written, whichever write failed.
        self.lost |= r.is_err();
        r
    }

    /// Records `op`'s result of a file as done, in the transaction `begin` opened. The row
    /// reaches SQLite before the commit and before any other statement of this `State`, so
    /// every read and write of the table sees the rows in the order they were recorded.
    pub(crate) fn done(
        &mut self,
        rel: &Path,
        op: OpKind,
        stamp: Option<Stamp>,
        output: Option<&Path>,
        digest: Option<&Digest>,
    ) -> Result<()> {
        debug_assert!(
            !self.conn.is_autocommit(),
            "State::done outside a transaction"
        );
        self.done.push(DoneRow {
            path: rel.as_os_str().as_bytes().to_vec(),
            op,
            stamp,
            output: output.map(|o| o.as_os_str().as_bytes().to_vec()),
            digest: digest.copied(),
            updated: now_secs(),
        });
        if self.done.len() - self.written >= DONE_ROWS {
            self.write_done()?;
        }
        Ok(())
    }

    /// Records a done file's results: a row per op of the run that `done` computed (all, or
    /// those of `Done::only`: the others' rows stand as they are), a hash's with its digest,
    /// the compressor's with `output` (`None`: it left the file alone).
    pub(crate) fn done_results(
        &mut self,
        rel: &Path,
        done: &Done,
        output: Option<&Path>,
    ) -> Result<()> {
        let only = done.only.as_deref();
        for i in 0..self.ops.len() {
            let op = self.ops[i];
            match op.hash() {
                Some(algo) => {
                    if only.is_some_and(|o| !o.hashes.contains(&algo)) {
                        continue;
                    }
                    // A done file has each of its hashes' digests (`ops::multi`); one
                    // without is left unrecorded, so the next run computes it.
                    if let Some(d) = done.digests.iter().find(|d| d.algo() == algo) {
                        self.done(rel, op, done.stamp, None, Some(d))?;
                    }
                }
                None => {
                    if only.is_none_or(|o| o.compress) {
                        self.done(rel, op, done.stamp, output, None)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the done rows not yet in the transaction in path order, one statement each:
    /// consecutive inserts then land on the same or neighbouring B-tree pages, where the order
    /// the workers finish in scatters them over the tree. The sort is stable, so a later row
    /// for the same path still replaces an earlier one. The rows stay until the commit.
    fn write_done(&mut self) -> Result<()> {
        if self.written == self.done.len() {
            return Ok(());
        }
        let from = self.written;
        self.done[from..].sort_by(|a, b| (a.op as u8, &a.path).cmp(&(b.op as u8, &b.path)));
        let written = (|| -> Result<()> {
            let mut stmt = self.conn.prepare_cached(INSERT_DONE)?;
            for row in &self.done[from..] {
                row.bind(&mut stmt, &self.root)?;
                stmt.raw_execute()?;
            }
            Ok(())
        })();
        // On failure the rows not known written are written again (rewriting one is
        // harmless), so a commit can never succeed without them.
        match written {
            Ok(()) => self.written = self.done.len(),
            Err(_) => self.after_failure(),
        }
        written
    }

    /// Records a failure or a skip, under every op of the run (a file is one outcome: the
    /// next attempt computes every result); failures count attempts (reset when the file
    /// changed). Returns the number of attempts so far.
    pub(crate) fn not_done(
        &mut self,
        rel: &Path,
        status: FileStatus,
        stamp: Option<Stamp>,
        e: &FileError,
    ) -> Result<u32> {
        let mut most = 0;
        for i in 0..self.ops.len() {
            let op = self.ops[i];
            let attempts = self.write_other(|st| st.not_done_as(rel, op, status, stamp, e))?;
            most = most.max(attempts);
        }
        Ok(most)
    }

    /// `not_done` for one op's row.
    fn not_done_as(
        &mut self,
        rel: &Path,
        op: OpKind,
        status: FileStatus,
        stamp: Option<Stamp>,
        e: &FileError,
    ) -> Result<u32> {
        let path = rel.as_os_str().as_bytes();
        // Read as the reader reads rows (`record_from_row`): one with a cell of the wrong
        // type is as good as none, and is rewritten whole here. Read strictly, it stopped the
        // run at the first failure of a file whose row the reader had taken for none (found
        // by a review).
        let previous = self
            .conn
            .prepare_cached(&format!(
                "SELECT {RECORD_COLUMNS} FROM files WHERE root=?1 AND op=?2 AND path=?3"
            ))?
            .query_row(params![self.root, op.as_str(), path], |r| {
                record_from_row(r, 0, op)
            })
            .optional()?
            .flatten();
        let op = op.as_str();
        let same_file = previous.as_ref().and_then(|p| p.stamp).is_some_and(|was| {
            stamp.is_some_and(|s| s.size == was.size && s.mtime_ns == was.mtime_ns)
        });
        // Waiting for a file in use goes on counting (its backoff grows) even as the file
        // changes; it does not spend the attempts of another failure after it.
        let attempts = match previous {
            Some(p)
                if (e.kind == Kind::InUse) == p.in_use
                    && (same_file || stamp.is_none() || e.kind == Kind::InUse) =>
            {
                p.attempts.saturating_add(1)
            }
            _ => 1,
        };

        // The output a done version of the file left (and its digest) is kept: it is still
        // filepipe's, and the file's next version may replace it (`Record::made_output`).
        // Forgetting it made every later version of a file that once failed meet an output
        // it could not replace. The version it was made for (its mtime) is kept with it, from
        // the done row this one replaces: it tells that output from a file another hand puts at
        // its name (`Record::made_mtime`).
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO files
               (root, op, path, size, mtime_ns, inode, status, error, errno, message, attempts,
                updated, ctime_ns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (root, op, path) DO UPDATE SET
               size = excluded.size, mtime_ns = excluded.mtime_ns, inode = excluded.inode,
               status = excluded.status, error = excluded.error, errno = excluded.errno,
               message = excluded.message, attempts = excluded.attempts,
               updated = excluded.updated, ctime_ns = excluded.ctime_ns,
               made_mtime_ns = CASE WHEN files.status = 'done' THEN
                   (CASE WHEN files.output IS NOT NULL
                              AND typeof(files.mtime_ns) = 'integer' THEN files.mtime_ns END)
                   WHEN typeof(files.made_mtime_ns) = 'integer' THEN files.made_mtime_ns END",
        )?;
        stmt.execute(params![
            self.root,
            op,
            path,
            stamp.map(|s| s.size as i64),
            stamp.map(|s| s.mtime_ns),
            stamp.map(|s| s.inode as i64),
            status,
            e.kind.as_str(),
            e.errno,
            e.message,
            attempts,
            now_secs(),
            stamp.map(|s| s.ctime_ns),
        ])?;
        Ok(attempts)
    }

    /// Forgets a file that was deleted or moved away, or a whole directory of them (a moved
    /// directory is one event), for the run's ops (another pipeline's rows are its own).
    pub(crate) fn remove(&mut self, rel: &Path) -> Result<()> {
        self.write_other(|st| st.remove_rows(rel))
    }

    fn remove_rows(&mut self, rel: &Path) -> Result<()> {
        let path = rel.as_os_str().as_bytes();
        // Rows under "rel/": byte strings from "rel/" up to (not including) "rel0", since '0'
        // follows '/' in ASCII.
        let lo = [path, b"/"].concat();
        let hi = [path, b"0"].concat();
        let mut stmt = self.conn.prepare_cached(
            "DELETE FROM files WHERE root=?1 AND op=?2
                 AND (path=?3 OR (path >= ?4 AND path < ?5))",
        )?;
        for op in &self.ops {
            stmt.execute(params![self.root, op.as_str(), path, lo, hi])?;
        }
        Ok(())
    }

    /// How `rel` ended, as recorded (pending rows written first), if it is known: failed if
    /// any of the run's results failed, else skipped if any was, else done.
    pub(crate) fn status_of(&mut self, rel: &Path) -> Result<Option<FileStatus>> {
        self.write_done()?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT status FROM files WHERE root=?1 AND op=?2 AND path=?3")?;
        let mut worst = None;
        for op in &self.ops {
            let status = stmt
                .query_row(
                    params![self.root, op.as_str(), rel.as_os_str().as_bytes()],
                    // A status that is none of filepipe's (a damaged row) is none, as the
                    // reader has it (`record_from_row`).
                    |r| {
                        Ok(
                            <FileStatus as rusqlite::types::FromSql>::column_result(r.get_ref(0)?)
                                .ok(),
                        )
                    },
                )
                .optional()?
                .flatten();
            worst = match (worst, status) {
                (Some(FileStatus::Failed), _) | (_, Some(FileStatus::Failed)) => {
                    Some(FileStatus::Failed)
                }
                (Some(FileStatus::Skipped), _) | (_, Some(FileStatus::Skipped)) => {
                    Some(FileStatus::Skipped)
                }
                (w, s) => w.or(s),
            };
        }
        Ok(worst)
    }

    /// Forgets exactly these files (no directory below them), for the run's ops: an
    /// incremental batch's walk did not find them. Exact, because a name the state knew as a
    /// file may be a directory now, whose files this run records meanwhile.
    pub(crate) fn remove_files(&mut self, rels: &[PathBuf]) -> Result<()> {
        self.write_other(|st| st.remove_file_rows(rels))
    }

    fn remove_file_rows(&mut self, rels: &[PathBuf]) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM files WHERE root=?1 AND op=?2 AND path=?3")?;
        for rel in rels {
            for op in &self.ops {
                stmt.execute(params![self.root, op.as_str(), rel.as_os_str().as_bytes()])?;
            }
        }
        Ok(())
    }

    /// `algo`'s digests of done files, sorted by path bytes, for its manifest. A digest of
    /// another length or type, which filepipe never wrote, is left out.
    pub(crate) fn digests(&mut self, algo: HashAlgo) -> Result<Vec<(Vec<u8>, Digest)>> {
        self.write_done()?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT path, digest FROM files
             WHERE root=?1 AND op=?2 AND status='done' AND digest IS NOT NULL ORDER BY path",
        )?;
        let rows = stmt.query_map(params![self.root, OpKind::from(algo).as_str()], |r| {
            // A path or digest that is not a blob is left out too (and its file read again:
            // see `Record::whole`), not an error that stops the run.
            let path = path_cell(r.get_ref(0)?, OpKind::from(algo)).map(<[u8]>::to_vec);
            let digest = match r.get_ref(1)? {
                rusqlite::types::ValueRef::Blob(b) => Digest::new(algo, b),
                _ => None,
            };
            Ok(path.zip(digest))
        })?;
        let mut out = Vec::new();
        for row in rows {
            if let Some(listed) = row? {
                out.push(listed);
            }
        }
        Ok(out)
    }
}

/// Splits the rows a pipeline of several results filed under their joined name
/// (`sha256,blake3,zstd`, the digests concatenated in the canonical order) into a row per
/// result, as this filepipe files them, and marks the database as of `SCHEMA`. A row already
/// there for a result (an incremental batch of that op alone) is kept if it is the newer.
/// A done row whose digests are not of the name's length gives no hash rows: those hashes
/// are computed again. One transaction: a crash leaves the old layout, upgraded next time.
/// Adds the INTEGER column `name` to the files table if it lacks it. Looked for and added in
/// one transaction taken for writing at once: the pipelines of a service open a shared state
/// together, and two that both found it missing would both add it ("duplicate column name").
/// Runs `f` again while it fails with "database is locked" for at most the busy timeout (10 s):
/// the failure SQLite gives at once, without waiting, when two connections each hold a read
/// lock and want to write (one must give up its transaction for the other to go on).
fn retry_busy<T, E>(mut f: impl FnMut() -> std::result::Result<T, E>) -> std::result::Result<T, E>
where
    E: RetryBusy,
{
    let limit = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Err(e) if e.busy() && std::time::Instant::now() < limit => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// An error that may be SQLite's "database is locked" (`retry_busy`).
trait RetryBusy {
    fn busy(&self) -> bool;
}

impl RetryBusy for rusqlite::Error {
    fn busy(&self) -> bool {
        self.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
    }
}

impl RetryBusy for anyhow::Error {
    fn busy(&self) -> bool {
        self.downcast_ref::<rusqlite::Error>()
            .is_some_and(RetryBusy::busy)
    }
}

fn add_column(conn: &mut Connection, name: &str) -> Result<()> {
    let has = |c: &Connection| {
        c.prepare("SELECT 1 FROM pragma_table_info('files') WHERE name = ?1")?
            .exists([name])
    };
    // Most opens find it: no write lock taken for them.
    if has(conn)? {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if !has(&tx)? {
        tx.execute_batch(&format!("ALTER TABLE files ADD COLUMN {name} INTEGER"))?;
    }
    tx.commit()?;
    Ok(())
}

fn upgrade(conn: &mut Connection) -> Result<()> {
    // Taken for writing at once (waiting, up to the busy timeout, for another upgrader), and
    // the layout read again inside: the pipelines of one service open a shared state together,
    // and a deferred transaction that read first could not then write ("database is locked",
    // found by a hostile review: a service of two [[watch]] tables failed to start).
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= SCHEMA {
        return Ok(());
    }
    type Old = (
        Vec<u8>,
        String,
        Vec<u8>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        FileStatus,
    );
    let old: Vec<Old> = tx
        .prepare(
            "SELECT root, op, path, output, digest, status FROM files WHERE instr(op, ',') > 0",
        )?
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    {
        // Every column but op, output and digest is copied as it is.
        let mut insert = tx.prepare(
            "INSERT INTO files
               (root, op, path, size, mtime_ns, inode, output, digest, status, error, errno,
                message, attempts, updated, ctime_ns)
             SELECT root, ?4, path, size, mtime_ns, inode, ?5, ?6, status, error, errno,
                    message, attempts, updated, ctime_ns
             FROM files WHERE root=?1 AND op=?2 AND path=?3
             ON CONFLICT (root, op, path) DO UPDATE SET
               size = excluded.size, mtime_ns = excluded.mtime_ns, inode = excluded.inode,
               output = excluded.output, digest = excluded.digest, status = excluded.status,
               error = excluded.error, errno = excluded.errno, message = excluded.message,
               attempts = excluded.attempts, updated = excluded.updated,
               ctime_ns = excluded.ctime_ns
             WHERE excluded.updated >= files.updated",
        )?;
        let mut delete = tx.prepare("DELETE FROM files WHERE root=?1 AND op=?2 AND path=?3")?;
        for (root, name, path, output, digest, status) in &old {
            // A name this filepipe cannot read is no row of its own: left alone.
            let Ok(spec) = name.parse::<OpSpec>() else {
                continue;
            };
            let layout = spec.hash_layout();
            let total: usize = layout.iter().map(|a| a.len()).sum();
            let digest = digest.as_deref().filter(|d| d.len() == total);
            let mut at = 0;
            for algo in layout {
                let part = digest.map(|d| &d[at..at + algo.len()]);
                at += algo.len();
                // A done hash without its digest would list nothing: left unrecorded, to be
                // computed. (A failed or skipped row has none to split.)
                if part.is_none() && *status == FileStatus::Done {
                    continue;
                }
                let op = OpKind::from(algo).as_str();
                insert.execute(params![root, name, path, op, None::<Vec<u8>>, part])?;
            }
            if let Some(c) = spec.compressor() {
                insert.execute(params![
                    root,
                    name,
                    path,
                    c.as_str(),
                    output,
                    None::<Vec<u8>>
                ])?;
            }
            delete.execute(params![root, name, path])?;
        }
    }
    tx.pragma_update(None, "user_version", SCHEMA)?;
    tx.commit()?;
    Ok(())
}

impl Reader {
    /// Everything the state knows under `dir` (relative to the root; "" for the whole tree),
    /// in one query per op: a scan checks each file it finds against this map instead of
    /// asking SQLite per file, and what is left in it afterwards was not found. Each done
    /// hash's digest comes with it (`Record::digest`): what an incremental batch lists for the
    /// files it does not read, and what tells watch mode a done row is whole (`Known::settled`).
    pub(crate) fn known_under(&self, dir: &Path) -> Result<KnownMap> {
        let columns = format!("SELECT path, {RECORD_COLUMNS} FROM files WHERE root=?1 AND op=?2");
        let d = dir.as_os_str().as_bytes();
        // Rows under "dir/": byte strings from "dir/" up to (not including) "dir0", since '0'
        // follows '/' in ASCII; the primary key makes this a range scan.
        let (lo, hi) = ([d, b"/"].concat(), [d, b"0"].concat());
        let mut stmt = if d.is_empty() {
            self.conn.prepare_cached(&columns)?
        } else {
            self.conn
                .prepare_cached(&format!("{columns} AND path >= ?3 AND path < ?4"))?
        };
        let wanted = self.ops.len();
        let mut out = KnownMap::default();
        for (i, &op) in self.ops.iter().enumerate() {
            let mut rows = if d.is_empty() {
                stmt.query(params![self.root, op.as_str()])?
            } else {
                stmt.query(params![self.root, op.as_str(), lo, hi])?
            };
            if i == 0 {
                // Pushed as read and indexed once at the end, at its size (see `known`).
                let mut first = known::Builder::default();
                while let Some(r) = rows.next()? {
                    let Some(path) = path_cell(r.get_ref(0)?, op) else {
                        continue;
                    };
                    match record_from_row(r, 1, op)? {
                        Some(record) => first.push(path, Known::of(op, record, wanted)),
                        None => damaged_row(path, op),
                    }
                }
                out = first.build();
                continue;
            }
            // The other ops' rows mostly join a file already in the map.
            while let Some(r) = rows.next()? {
                let Some(bytes) = path_cell(r.get_ref(0)?, op) else {
                    continue;
                };
                let Some(record) = record_from_row(r, 1, op)? else {
                    damaged_row(bytes, op);
                    continue;
                };
                out.add(bytes, op, record, wanted);
            }
        }
        Ok(out)
    }

    /// What the state knows about `rel`, if anything, with its digests: one statement
    /// whatever the number of ops (watch mode asks it of every file it hands a worker).
    pub(crate) fn lookup(&self, rel: &Path) -> Result<Option<Known>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT op, {RECORD_COLUMNS}
             FROM files WHERE root=?1 AND path=?2 AND op IN (?3, ?4, ?5, ?6)"
        ))?;
        // A run has at most four ops (three hashes and a compressor): the others repeat one.
        let op = |i: usize| self.ops.get(i).unwrap_or(&self.ops[0]).as_str();
        let rows = stmt.query_map(
            params![
                self.root,
                rel.as_os_str().as_bytes(),
                op(0),
                op(1),
                op(2),
                op(3)
            ],
            |r| {
                let name = r.get_ref(0)?.as_str()?;
                let Some(op) = self.ops.iter().find(|k| k.as_str() == name).copied() else {
                    return Ok(None);
                };
                let record = record_from_row(r, 1, op)?;
                if record.is_none() {
                    damaged_row(rel.as_os_str().as_bytes(), op);
                }
                Ok(record.map(|record| (op, record)))
            },
        )?;
        let mut known: Option<Known> = None;
        for row in rows {
            let Some((op, record)) = row? else {
                continue;
            };
            match &mut known {
                Some(k) => k.add(op, record),
                None => known = Some(Known::of(op, record, self.ops.len())),
            }
        }
        Ok(known)
    }
}

impl DoneRow {
    /// Binds this row to `INSERT_DONE`.
    fn bind(&self, stmt: &mut rusqlite::CachedStatement<'_>, root: &[u8]) -> rusqlite::Result<()> {
        stmt.raw_bind_parameter(1, root)?;
        stmt.raw_bind_parameter(2, self.op.as_str())?;
        stmt.raw_bind_parameter(3, self.path.as_slice())?;
        stmt.raw_bind_parameter(4, self.stamp.map(|s| s.size as i64))?;
        stmt.raw_bind_parameter(5, self.stamp.map(|s| s.mtime_ns))?;
        stmt.raw_bind_parameter(6, self.stamp.map(|s| s.inode as i64))?;
        stmt.raw_bind_parameter(7, self.output.as_deref())?;
        stmt.raw_bind_parameter(8, self.digest.as_ref().map(Digest::as_bytes))?;
        stmt.raw_bind_parameter(9, self.updated)?;
        stmt.raw_bind_parameter(10, self.stamp.map(|s| s.ctime_ns))
    }
}

/// A `Record` of `op` from the columns `RECORD_COLUMNS`, starting at `first`; `None` for a
/// row with a cell of another type than its column's, or out of its range (written by hand,
/// or damaged). Such a row is as good as none: its file is read again and the row rewritten
/// whole, where one such cell stopped the whole run (found by a review), as a damaged digest
/// already did not. Each cell is read once, as stored (a rerun reads a row per file of the
/// tree: rusqlite's typed `get` asked SQLite for each column's type and count again).
fn record_from_row(
    r: &rusqlite::Row<'_>,
    first: usize,
    op: OpKind,
) -> rusqlite::Result<Option<Record>> {
    let mut cells = [ValueRef::Null; 10];
    for (i, cell) in cells.iter_mut().enumerate() {
        *cell = r.get_ref(first + i)?;
    }
    Ok(decode_record(&cells, op))
}

/// An integer cell: `Some(None)` if NULL, `None` if of another type.
fn int_cell(cell: ValueRef<'_>) -> Option<Option<i64>> {
    match cell {
        ValueRef::Null => Some(None),
        ValueRef::Integer(n) => Some(Some(n)),
        _ => None,
    }
}

/// See `record_from_row`.
fn decode_record(cells: &[ValueRef<'_>; 10], op: OpKind) -> Option<Record> {
    let int = |i: usize| int_cell(cells[i]);
    let status = match cells[0] {
        ValueRef::Text(b"done") => FileStatus::Done,
        ValueRef::Text(b"skipped") => FileStatus::Skipped,
        ValueRef::Text(b"failed") => FileStatus::Failed,
        _ => return None,
    };
    let (size, mtime, inode, ctime) = (int(1)?, int(2)?, int(3)?, int(5)?);
    let stamp = match (size, mtime, inode) {
        (Some(size), Some(mtime_ns), Some(inode)) => Some(Stamp {
            size: size as u64,
            mtime_ns,
            ctime_ns: ctime.unwrap_or(CTIME_UNKNOWN),
            inode: inode as u64,
        }),
        _ => None,
    };
    let done = status == FileStatus::Done;
    let made_output = int(7)?.is_some_and(|n| n != 0);
    let in_use = match cells[6] {
        ValueRef::Null => false,
        ValueRef::Text(e) => e == Kind::InUse.as_str().as_bytes(),
        _ => return None,
    };
    Some(Record {
        status,
        stamp,
        // As the writer counts them (`State::not_done_as`): from 0, within a u32.
        attempts: u32::try_from(int(4)?.unwrap_or(0)).ok()?,
        in_use,
        made_output,
        // A done hash's digest, a blob of the op's length; any other (a row written by
        // something else, or damaged) is none, and the file is read again (`Record::whole`).
        digest: match (cells[8], op.hash()) {
            (ValueRef::Blob(bytes), Some(algo)) if done => Digest::new(algo, bytes),
            _ => None,
        },
        // The mtime of the version whose output filepipe made: a done row's own when it names
        // an output (whatever `made_mtime_ns` holds: a filepipe from before the column
        // rewrote the row without it), else what failures and skips kept.
        made_mtime: if done {
            mtime.filter(|_| made_output)
        } else {
            int(9)?
        },
    })
}

/// Says, once a run, that the state has a row it cannot use (`record_from_row`), naming the
/// first: its file is read again, and the row rewritten once it is.
/// A row's path: a blob, as filepipe writes every path. Any other value (text or a number:
/// written by hand, or damaged) names no file filepipe filed: the row is passed over as damaged
/// (`damaged_row`), as good as none, and the walk finds its file and gives it a row of its own.
/// (Taken as the same name, a text path would sort apart from the blob one and list its file
/// twice in a manifest made from the state.)
fn path_cell(cell: ValueRef<'_>, op: OpKind) -> Option<&[u8]> {
    match cell {
        ValueRef::Blob(path) => Some(path),
        other => {
            damaged_row(&shown_cell(other), op);
            None
        }
    }
}

/// A cell's value as `filepipe status` and warnings show it: a path's or a root's bytes, whatever
/// type it was stored as.
fn shown_cell(cell: ValueRef<'_>) -> Vec<u8> {
    match cell {
        ValueRef::Blob(b) | ValueRef::Text(b) => b.to_vec(),
        ValueRef::Integer(n) => n.to_string().into_bytes(),
        ValueRef::Real(x) => x.to_string().into_bytes(),
        ValueRef::Null => b"NULL".to_vec(),
    }
}

/// `shown_cell` as text (not UTF-8: replaced, as the status shows names).
fn shown_text(cell: ValueRef<'_>) -> String {
    String::from_utf8_lossy(&shown_cell(cell)).into_owned()
}

fn damaged_row(path: &[u8], op: OpKind) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        let path = String::from_utf8_lossy(path);
        tracing::warn!(
            path = %path,
            op = op.as_str(),
            "the state has a row with a value of the wrong type (written by hand, or damaged): \
             its file is read again and the row rewritten (said once a run)"
        );
    }
}

/// True for failures worth retrying later: the file was busy or the disk was full.
pub(crate) fn transient(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Changed
            | Kind::NoSpace
            | Kind::FileTooLarge
            | Kind::Io
            | Kind::Interrupted
            | Kind::InUse
    )
}

/// One failed file, for `filepipe status --failed`.
#[derive(Debug)]
pub(crate) struct Row {
    /// The watch root.
    pub(crate) root: PathBuf,
    /// The operation.
    pub(crate) op: String,
    /// The file, relative to the root.
    pub(crate) path: PathBuf,
    /// The error kind, if any.
    pub(crate) error: Option<String>,
    /// The error message, if any.
    pub(crate) message: Option<String>,
    /// Attempts so far.
    pub(crate) attempts: u32,
}

/// Counts per (root, op, status), for `filepipe status`.
pub(crate) fn counts(dir: &Path) -> Result<Vec<(PathBuf, String, String, u64)>> {
    read_state(dir, counts_in)
}

fn counts_in(conn: &Connection) -> Result<Vec<(PathBuf, String, String, u64)>> {
    let mut stmt = conn.prepare(
        "SELECT root, op, status, COUNT(*) FROM files GROUP BY root, op, status ORDER BY 1, 2, 3",
    )?;
    // Each cell shown whatever it holds: a damaged row is shown, not a reason to show nothing.
    let rows = stmt.query_map([], |r| {
        Ok((
            bytes_path(shown_cell(r.get_ref(0)?)),
            shown_text(r.get_ref(1)?),
            shown_text(r.get_ref(2)?),
            r.get::<_, i64>(3)? as u64,
        ))
    })?;
    rows.map(|r| r.map_err(Into::into)).collect()
}

/// Every failed file, for `filepipe status --failed`.
pub(crate) fn failed(dir: &Path) -> Result<Vec<Row>> {
    read_state(dir, failed_in)
}

fn failed_in(conn: &Connection) -> Result<Vec<Row>> {
    let mut stmt = conn.prepare(
        "SELECT root, op, path, error, message, attempts FROM files
         WHERE status='failed' ORDER BY root, op, path",
    )?;
    let rows = stmt.query_map([], |r| {
        let text = |i: usize| -> rusqlite::Result<Option<String>> {
            let cell = r.get_ref(i)?;
            Ok((cell != ValueRef::Null).then(|| shown_text(cell)))
        };
        Ok(Row {
            root: bytes_path(shown_cell(r.get_ref(0)?)),
            op: shown_text(r.get_ref(1)?),
            path: bytes_path(shown_cell(r.get_ref(2)?)),
            error: text(3)?,
            message: text(4)?,
            attempts: match r.get_ref(5)? {
                ValueRef::Integer(n) => u32::try_from(n).unwrap_or(0),
                _ => 0,
            },
        })
    })?;
    rows.map(|r| r.map_err(Into::into)).collect()
}

/// Reads the state in `dir` with `read`. One in WAL mode that no process has open (`idle_wal`)
/// is read as it lies on disk (`immutable`): a read-only connection would make its `-wal` and
/// `-shm` beside it and leave them there (next to a copy of a state: found by a review), and
/// fails where it may not make them (a user who may read the state but not write its
/// directory: SQLITE_READONLY_DIRECTORY). Should a writer have come meanwhile (the file changed,
/// or its `-wal` or `-shm` appeared: its checkpoint may have written the file under the read),
/// it is read again the usual way, with it.
fn read_state<T>(dir: &Path, read: impl Fn(&Connection) -> Result<T>) -> Result<T> {
    let path = db_path(dir);
    if let Some(before) = idle_wal(&path) {
        let result = open_read_only(dir, true).and_then(|conn| read(&conn));
        if idle_wal(&path) == Some(before) {
            return result;
        }
    }
    read(&open_read_only(dir, false)?)
}

/// A connection that only reads the state in `dir`, `immutable` or not (see `read_state`).
fn open_read_only(dir: &Path, immutable: bool) -> Result<Connection> {
    let path = db_path(dir);
    // Only a file not there is "no state": a directory this user may not search is said as
    // such (`exists` is false for both: found by a review).
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no state database at {} (has filepipe watch run with this --state?)",
            path.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot open state database {}", path.display()))
        }
        Ok(_) => {}
    }
    // SQLite would open a FIFO put at its name and wait on it for good.
    if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
        anyhow::bail!(
            "{} is not a filepipe state: not a regular file",
            path.display()
        );
    }
    let conn = if immutable {
        Connection::open_with_flags(
            immutable_uri(&path),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )
    } else {
        Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
    }
    .with_context(|| opening(&path))?;
    // An empty file, or another program's database, is no state: said so, not as SQL's "no
    // such table" or "no such column" (found by reviews). (A file that is not a database at
    // all fails here too, and `damaged` gives its advice.)
    let tables: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'files'",
            [],
            |r| r.get(0),
        )
        .with_context(|| {
            format!(
                "cannot read state database {}{}",
                path.display(),
                disk_full(&path)
            )
        })?;
    let ours = tables > 0
        && conn
            .prepare("SELECT root, op, path, status FROM files LIMIT 0")
            .is_ok();
    if !ours {
        anyhow::bail!(
            "{} is not a filepipe state (no files table as filepipe makes it): empty, or \
             another program's database",
            path.display()
        );
    }
    Ok(conn)
}

/// If the database at `path` is in WAL mode (its header's read and write versions are 2) with
/// no `-wal` or `-shm` file beside it (its writers keep both while they have it open: no
/// process has it open), which file it is and when it last changed.
fn idle_wal(path: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::OpenOptionsExt;
    // Never waiting on a FIFO put at its name: a regular file only.
    let mut file = (std::fs::File::options().read(true))
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))?;
    let mut header = [0u8; 20];
    file.read_exact(&mut header).ok()?;
    if !header.starts_with(b"SQLite format 3\0") || header[18..20] != [2, 2] {
        return None;
    }
    let beside = |suffix: &str| {
        let mut name = path.as_os_str().to_os_string();
        name.push(suffix);
        std::fs::symlink_metadata(name).is_ok()
    };
    if beside("-wal") || beside("-shm") {
        return None;
    }
    let m = file.metadata().ok()?;
    let ns = |s: i64, n: i64| s * 1_000_000_000 + n;
    Some((
        m.ino(),
        m.size(),
        ns(m.mtime(), m.mtime_nsec()),
        ns(m.ctime(), m.ctime_nsec()),
    ))
}

/// `path` as an SQLite URI that opens it immutable: every byte but unreserved ones and `/`
/// percent-encoded, so no name (a `?`, a `#`, a `%`, bytes that are not UTF-8) reads as
/// anything but the path.
fn immutable_uri(path: &Path) -> String {
    use percent_encoding::{percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const KEPT: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let encoded = percent_encode(path.as_os_str().as_bytes(), KEPT);
    format!("file:{encoded}?immutable=1")
}

fn bytes_path(b: Vec<u8>) -> PathBuf {
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(b))
}

/// The default state directory: `$STATE_DIRECTORY` under systemd, else the XDG state dir.
pub(crate) fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several, colon-separated: the first is ours.
        let first = d.as_bytes().split(|&b| b == b':').next().unwrap_or(b"");
        if !first.is_empty() {
            return PathBuf::from(std::ffi::OsStr::from_bytes(first));
        }
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("filepipe");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/state/filepipe"),
        None => PathBuf::from("/var/lib/filepipe"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    const S: OpKind = OpKind::Sha256;

    fn spec(ops: &str) -> OpSpec {
        ops.parse().unwrap()
    }

    /// The SHA-256 record of a file known to a run of sha256 alone.
    fn rec(k: &Known) -> &Record {
        k.record(S).unwrap()
    }

    /// A SHA-256 digest of 32 `b`s.
    fn d(b: u8) -> Digest {
        Digest::new(HashAlgo::Sha256, &[b; 32]).unwrap()
    }

    /// A new state (root /data, op sha256) in a temp dir, and a reader on it.
    fn open_state() -> (tempfile::TempDir, State, Reader) {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new("/data");
        let st = State::open(dir.path(), root, &spec("sha256")).unwrap();
        let reader = State::reader(dir.path(), root, &spec("sha256")).unwrap();
        (dir, st, reader)
    }

    #[test]
    fn a_failure_for_good_with_no_stamp_either_time_is_settled() {
        let r = Record {
            status: FileStatus::Failed,
            stamp: None,
            attempts: MAX_ATTEMPTS,
            in_use: false,
            made_output: false,
            made_mtime: None,
            digest: None,
        };
        // A file its directory lets be listed, not looked at: reported 5 times, then quiet.
        assert!(r.settled(None));
        assert!(!Record {
            attempts: 1,
            ..r.clone()
        }
        .settled(None));
        // Looked at now: taken again.
        let now = Stamp::of(Path::new("/")).unwrap();
        assert!(!r.settled(Some(now)));
    }

    #[test]
    fn a_state_directory_is_held_once_per_process_and_says_by_whom() {
        let dir = tempfile::tempdir().unwrap();
        let a = lock_dir(dir.path()).unwrap();
        let b = lock_dir(dir.path()).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the pipelines of one process share it");
        let holder = std::fs::read_to_string(dir.path().join(LOCK_NAME)).unwrap();
        assert!(
            holder.contains(&format!("pid {}", std::process::id())),
            "{holder}"
        );
        // Any other description (another process's) finds it taken.
        let other = std::fs::File::open(dir.path().join(LOCK_NAME)).unwrap();
        assert_eq!(
            fslock::lock(&other, LockKind::Read, false),
            Err(Errno::AGAIN)
        );
        drop((a, b));
        fslock::lock(&other, LockKind::Read, false).unwrap();
    }

    #[test]
    fn a_holder_caught_between_its_write_and_its_cut_is_named_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_NAME);
        // Another process's lock, its line written over a longer one and not cut yet.
        std::fs::write(&path, "filepipe pid 7 on b (started T)\nname (started U)\n").unwrap();
        let other = std::fs::File::options().write(true).open(&path).unwrap();
        fslock::lock(&other, LockKind::Write, false).unwrap();
        let e = format!("{:#}", lock_dir(dir.path()).err().unwrap());
        assert!(
            e.contains("in use by filepipe pid 7 on b (started T): one state"),
            "{e}"
        );
        assert!(!e.contains("(started U)"), "{e}");
    }

    #[test]
    fn a_failure_after_a_done_version_keeps_its_output_and_version_and_its_digest_unlisted() {
        let (_dir, mut st, reader) = open_state();
        let rel = Path::new("f");
        let s1 = Stamp {
            size: 3,
            mtime_ns: 10,
            ctime_ns: 11,
            inode: 7,
        };
        st.begin().unwrap();
        st.done(rel, S, Some(s1), Some(Path::new("f.gz")), Some(&d(1)))
            .unwrap();
        st.commit().unwrap();
        assert!(rec(&reader.lookup(rel).unwrap().unwrap()).made_output);
        // The next version fails (it changed while read): the output filepipe made is still
        // its own, so the version after may replace it.
        let e = FileError::new(Kind::Changed, "changed while read");
        let s2 = Stamp { size: 5, ..s1 };
        st.not_done(rel, FileStatus::Failed, Some(s2), &e).unwrap();
        let k = reader.lookup(rel).unwrap().unwrap();
        assert!(k.made_output() && rec(&k).status == FileStatus::Failed);
        // Not done, so not listed.
        assert!(st.digests(HashAlgo::Sha256).unwrap().is_empty());
        // The version it was made for is kept through failures, whatever they are.
        assert_eq!(rec(&k).made_mtime, Some(10));
        let e = FileError::new(
            Kind::OutputExists,
            "f.gz exists and is not this file's output",
        );
        let s3 = Stamp { mtime_ns: 12, ..s2 };
        st.not_done(rel, FileStatus::Failed, Some(s3), &e).unwrap();
        let k = reader.lookup(rel).unwrap().unwrap();
        assert!(k.made_output() && rec(&k).made_mtime == Some(10));
        assert!(!reader
            .lookup(Path::new("never"))
            .unwrap()
            .is_some_and(|k| k.made_output()));
    }

    /// The stamp the digest tests record their files with.
    fn stamp_a() -> Stamp {
        Stamp {
            size: 3,
            mtime_ns: 10,
            ctime_ns: 11,
            inode: 7,
        }
    }

    /// A done hash row whose digest is not one this op could have (another length, NULL, a
    /// TEXT or INTEGER value: a damaged state, or one edited by hand) is not settled, so watch
    /// mode reads the file again instead of leaving it out of its manifest for good; and it
    /// fails neither a scan nor the manifest's query (found by a review: a TEXT digest stopped
    /// the run).
    #[test]
    fn a_done_hash_whose_stored_digest_is_damaged_is_read_again_and_fails_nothing() {
        let (_dir, mut st, reader) = open_state();
        let s = stamp_a();
        let names = ["good", "short", "null", "text", "int"];
        st.begin().unwrap();
        for name in names {
            st.done(Path::new(name), S, Some(s), None, Some(&d(1)))
                .unwrap();
        }
        st.commit().unwrap();
        for (name, value) in [
            ("short", "X'0102'"),
            ("null", "NULL"),
            (
                "text",
                "'0101010101010101010101010101010101010101010101010101010101010101'",
            ),
            ("int", "42"),
        ] {
            st.conn
                .execute(
                    &format!("UPDATE files SET digest = {value} WHERE path = ?1"),
                    [name.as_bytes()],
                )
                .unwrap();
        }
        let known = reader.known_under(Path::new("")).unwrap();
        for name in names {
            let k = known.get(Path::new(name)).unwrap();
            assert_eq!(k.settled(Some(s)), name == "good", "{name}");
            let looked = reader.lookup(Path::new(name)).unwrap().unwrap();
            assert_eq!(looked.settled(Some(s)), name == "good", "{name}");
        }
        let listed = st.digests(HashAlgo::Sha256).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, b"good");
    }

    /// A row with a cell of the wrong type, or out of its range, is as good as none: its file
    /// is read again (not settled, not in the map) and its row rewritten whole by the writer,
    /// not the whole run stopped, by the reader or by the writer's read of it on the file's
    /// next failure (both found by a review).
    #[test]
    fn a_row_with_a_cell_of_the_wrong_type_is_as_good_as_none_to_the_reader_and_the_writer() {
        let (_dir, mut st, reader) = open_state();
        let s = stamp_a();
        let damage = [
            ("status", "'finished'"),
            ("status", "X'646f6e65'"),
            ("size", "'abc'"),
            ("mtime_ns", "1.5"),
            ("inode", "X'00'"),
            ("ctime_ns", "'x'"),
            ("attempts", "-1"),
            ("attempts", "1099511627776"),
            ("error", "X'696e2d757365'"),
            ("made_mtime_ns", "'yesterday'"),
        ];
        let name = |i: usize| format!("f{i}");
        st.begin().unwrap();
        st.done(Path::new("good"), S, Some(s), None, Some(&d(1)))
            .unwrap();
        let e = FileError::new(Kind::PermissionDenied, "no");
        for i in 0..damage.len() {
            st.not_done(Path::new(&name(i)), FileStatus::Failed, Some(s), &e)
                .unwrap();
        }
        st.commit().unwrap();
        for (i, (column, value)) in damage.iter().enumerate() {
            st.conn
                .execute(
                    &format!("UPDATE files SET {column} = {value} WHERE path = ?1"),
                    [name(i).as_bytes()],
                )
                .unwrap();
        }
        let known = reader.known_under(Path::new("")).unwrap();
        assert!(known.get(Path::new("good")).unwrap().settled(Some(s)));
        for (i, damaged) in damage.iter().enumerate() {
            let rel = PathBuf::from(name(i));
            assert!(known.get(&rel).is_none(), "{damaged:?}");
            assert!(reader.lookup(&rel).unwrap().is_none(), "{damaged:?}");
            // Failing again, it is counted from the start and its row rewritten whole.
            st.begin().unwrap();
            let attempts = st.not_done(&rel, FileStatus::Failed, Some(s), &e).unwrap();
            st.commit().unwrap();
            assert_eq!(attempts, 1, "{damaged:?}");
            let again = reader.lookup(&rel).unwrap().unwrap();
            assert_eq!(again.record(S).map(|r| r.attempts), Some(1), "{damaged:?}");
        }
    }

    /// A row whose path is not a blob (text, a number: written by hand) names no file: the
    /// reader, the manifest's digests and `status` pass it over or show it, where the whole
    /// read failed, an incremental batch with no manifest and a watch at its start (found by a
    /// review).
    #[test]
    fn a_row_whose_path_is_not_a_blob_stops_no_reader() {
        let (dir, mut st, reader) = open_state();
        let s = stamp_a();
        st.begin().unwrap();
        for name in ["good", "text", "number"] {
            st.done(Path::new(name), S, Some(s), None, Some(&d(1)))
                .unwrap();
        }
        let e = FileError::new(Kind::PermissionDenied, "no");
        st.not_done(Path::new("failed"), FileStatus::Failed, Some(s), &e)
            .unwrap();
        st.commit().unwrap();
        for (name, value) in [
            ("text", "CAST(path AS TEXT)"),
            ("number", "12"),
            ("failed", "'f'"),
        ] {
            st.conn
                .execute(
                    &format!("UPDATE files SET path = {value} WHERE path = ?1"),
                    [name.as_bytes()],
                )
                .unwrap();
        }
        let known = reader.known_under(Path::new("")).unwrap();
        let left: Vec<PathBuf> = known.into_keys().collect();
        assert_eq!(left, [PathBuf::from("good")]);
        let listed = st.digests(HashAlgo::Sha256).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, b"good");
        let counted: u64 = counts(dir.path()).unwrap().iter().map(|c| c.3).sum();
        assert_eq!(counted, 4);
        let failed = failed(dir.path()).unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].path, Path::new("f"));
        assert_eq!(failed[0].error.as_deref(), Some("permission-denied"));
    }

    #[test]
    fn a_state_s_path_reads_as_nothing_else_in_its_uri() {
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"/s t/a?b#c%d/caf\xe9/x-y._~z"));
        assert_eq!(
            immutable_uri(odd),
            "file:/s%20t/a%3Fb%23c%25d/caf%E9/x-y._~z?immutable=1"
        );
    }

    /// `status` reads a state no process has open as it lies on disk, and reads it again the
    /// usual way should it change under that read (a writer that came meanwhile).
    #[test]
    fn a_state_open_nowhere_is_read_as_it_lies_and_again_if_it_changed_meanwhile() {
        let (dir, mut st, reader) = open_state();
        st.begin().unwrap();
        st.done(Path::new("a"), S, Some(stamp_a()), None, Some(&d(1)))
            .unwrap();
        st.commit().unwrap();
        drop((st, reader));
        let path = db_path(dir.path());
        assert!(idle_wal(&path).is_some(), "closed, its -wal and -shm went");
        let reads = std::cell::Cell::new(0);
        let counted = read_state(dir.path(), |conn| {
            reads.set(reads.get() + 1);
            counts_in(conn)
        })
        .unwrap();
        assert_eq!((counted.len(), reads.get()), (1, 1));
        let beside = || {
            let mut names: Vec<_> = (std::fs::read_dir(dir.path()).unwrap())
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        assert_eq!(beside(), ["filepipe.sqlite"], "nothing made beside it");
        let changed = read_state(dir.path(), |conn| {
            reads.set(reads.get() + 1);
            if reads.get() == 2 {
                let then = SystemTime::now() - Duration::from_secs(3600);
                let file = std::fs::File::options().write(true).open(&path).unwrap();
                file.set_modified(then).unwrap();
            }
            counts_in(conn)
        })
        .unwrap();
        // Read again the usual way (whose connection makes the -wal and -shm, as a writer's
        // coming meanwhile would have).
        assert_eq!((changed, reads.get()), (counted, 3));
    }

    #[test]
    fn a_batch_reads_digests_back_and_forgets_exactly_the_files_it_did_not_find() {
        let (_dir, mut st, reader) = open_state();
        let s = stamp_a();
        st.begin().unwrap();
        st.done(Path::new("a"), S, Some(s), None, Some(&d(1)))
            .unwrap();
        st.done(Path::new("a/x"), S, Some(s), None, Some(&d(2)))
            .unwrap();
        let e = FileError::new(Kind::PermissionDenied, "no");
        st.not_done(Path::new("b"), FileStatus::Failed, Some(s), &e)
            .unwrap();
        st.commit().unwrap();
        let known = reader.known_under(Path::new("")).unwrap();
        let a = known.get(Path::new("a")).unwrap();
        assert_eq!(
            rec(&a).digest.as_ref().map(Digest::as_bytes),
            Some(&[1u8; 32][..])
        );
        assert!(a.done_as(Some(s)));
        assert!(
            !a.done_as(Some(Stamp { ctime_ns: 12, ..s })),
            "ctime counts"
        );
        assert!(!a.done_as(Some(Stamp { inode: 8, ..s })), "inode counts");
        let b = known.get(Path::new("b")).unwrap();
        assert!(
            !b.done_as(Some(s)) && rec(&b).digest.is_none(),
            "failed: tried again"
        );
        // "a" is gone (a directory now, say): its row goes, the rows beneath it stay.
        st.begin().unwrap();
        st.remove_files(&[PathBuf::from("a")]).unwrap();
        st.commit().unwrap();
        assert!(reader.lookup(Path::new("a")).unwrap().is_none());
        assert!(reader.lookup(Path::new("a/x")).unwrap().is_some());
    }

    #[test]
    fn done_then_changed_then_failed_attempts() {
        let (dir, mut st, reader) = open_state();
        let rel = Path::new("a/\u{e9}t\u{e9}");
        let s1 = Stamp {
            size: 3,
            mtime_ns: 10,
            ctime_ns: 11,
            inode: 7,
        };
        st.begin().unwrap();
        st.done(rel, S, Some(s1), None, Some(&d(1))).unwrap();
        st.commit().unwrap();
        let k = reader.lookup(rel).unwrap().unwrap();
        assert!(k.settled(Some(s1)));
        assert!(!k.settled(Some(Stamp { size: 4, ..s1 })));
        assert_eq!(
            st.digests(HashAlgo::Sha256).unwrap(),
            vec![(rel.as_os_str().as_bytes().to_vec(), d(1))]
        );
        let e = FileError::new(Kind::Changed, "busy");
        assert_eq!(
            st.not_done(rel, FileStatus::Failed, Some(s1), &e).unwrap(),
            1
        );
        assert_eq!(
            st.not_done(rel, FileStatus::Failed, Some(s1), &e).unwrap(),
            2
        );
        let s2 = Stamp { size: 9, ..s1 };
        assert_eq!(
            st.not_done(rel, FileStatus::Failed, Some(s2), &e).unwrap(),
            1,
            "a changed file starts over"
        );
        assert_eq!(failed(dir.path()).unwrap().len(), 1);
        st.remove(rel).unwrap();
        assert!(reader.lookup(rel).unwrap().is_none());
        // Another root or op does not see these rows.
        let other = State::reader(dir.path(), Path::new("/data"), &spec("gzip")).unwrap();
        assert!(other.lookup(rel).unwrap().is_none());
    }

    #[test]
    fn a_failed_write_keeps_the_done_rows_for_the_next_attempt() {
        // A commit must never succeed without rows that were recorded before it.
        let (_dir, mut st, reader) = open_state();
        let s = Some(Stamp {
            size: 1,
            mtime_ns: 2,
            ctime_ns: 2,
            inode: 3,
        });
        st.begin().unwrap();
        st.done(Path::new("a"), S, s, None, Some(&d(1))).unwrap();
        st.done(Path::new("b"), S, s, None, Some(&d(2))).unwrap();
        // The table is out of reach for a moment: writing the rows fails.
        st.conn
            .execute_batch("ALTER TABLE files RENAME TO elsewhere")
            .unwrap();
        assert!(st.commit().is_err());
        st.conn
            .execute_batch("ALTER TABLE elsewhere RENAME TO files")
            .unwrap();
        st.commit().unwrap();
        for name in ["a", "b"] {
            let k = reader.lookup(Path::new(name)).unwrap().unwrap();
            assert!(k.settled(s), "{name}");
        }
    }

    /// A state "full" at its present size: SQLite's `max_page_count`, which fails a write
    /// that would grow the file with SQLITE_FULL, as a full disk does.
    fn full(st: &State, full: bool) {
        let pages: i64 = st
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        let max = if full { pages } else { 1 << 30 };
        st.conn
            .query_row(&format!("PRAGMA max_page_count = {max}"), [], |_| Ok(()))
            .unwrap();
    }

    /// A commit that fails for want of room keeps every done row, whether or not SQLite
    /// rolled the transaction back: it says it holds them all, and the next good commit
    /// records them, without a new `begin`. (The reporter counted files since such a failure
    /// unrecorded for good: a watch said 1,936 of 2,000 unrecorded where the state had 208:
    /// CI, twice.)
    #[test]
    fn a_commit_failed_for_room_holds_its_done_rows_for_the_next() {
        let (_dir, mut st, reader) = open_state();
        let name = |i: u64| PathBuf::from(format!("d/a-file-with-a-longish-name-{i:05}"));
        let stamp = Some(Stamp {
            size: 1,
            mtime_ns: 1,
            ctime_ns: 1,
            inode: 2,
        });
        st.begin().unwrap();
        st.done(&name(0), S, stamp, None, Some(&d(0))).unwrap();
        st.commit().unwrap();
        full(&st, true);
        st.begin().unwrap();
        for i in 1..2000 {
            st.done(&name(i), S, stamp, None, Some(&d(1))).unwrap();
        }
        assert!(st.commit().is_err(), "no room");
        assert!(st.holds_all(), "the done rows are held");
        assert!(st.unsettled());
        assert!(reader.lookup(&name(1)).unwrap().is_none());
        full(&st, false);
        st.commit().unwrap();
        assert!(st.holds_all());
        assert!(!st.unsettled());
        for i in 0..2000 {
            assert!(reader.lookup(&name(i)).unwrap().is_some(), "{i}");
        }
        // With a failure in the transaction too: a rollback loses it, and says so. Where
        // SQLite kept the transaction open, it is all still there.
        st.begin().unwrap();
        let e = FileError::new(Kind::PermissionDenied, "no");
        st.not_done(&name(0), FileStatus::Failed, stamp, &e)
            .unwrap();
        for i in 2000..4000 {
            st.done(&name(i), S, stamp, None, Some(&d(1))).unwrap();
        }
        full(&st, true);
        assert!(st.commit().is_err(), "no room");
        let rolled_back = st.conn.is_autocommit();
        assert_eq!(st.holds_all(), !rolled_back);
        full(&st, false);
        st.commit().unwrap();
        let failed = reader.lookup(&name(0)).unwrap().unwrap();
        assert_eq!(rec(&failed).status == FileStatus::Failed, !rolled_back);
    }

    /// A transaction that cannot begin (another process holds the write lock past the busy
    /// timeout) loses the write the sink was about to make: the next commit says so, even
    /// once the lock is free, and does not say it holds everything (review r58b).
    #[test]
    fn a_write_that_cannot_begin_is_said_lost() {
        let (dir, mut st, _reader) = open_state();
        st.conn.busy_timeout(Duration::from_millis(20)).unwrap();
        let other = Connection::open(dir.path().join(DB_NAME)).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!(st.begin().is_err(), "locked");
        other.execute_batch("COMMIT").unwrap();
        assert!(st.unsettled());
        assert!(st.commit().is_err(), "the loss is said");
        assert!(!st.holds_all());
        // Said once: the next commit is a good one.
        st.begin().unwrap();
        st.commit().unwrap();
        assert!(st.holds_all());
    }

    #[test]
    fn buffered_done_rows_keep_their_order_with_other_statements() {
        // Done rows wait to be written, sorted, at the commit or after DONE_ROWS of them;
        // whatever comes next must still see them, and a later row for the same path must win.
        let (_dir, mut st, reader) = open_state();
        let stamp = |size| {
            Some(Stamp {
                size,
                mtime_ns: 1,
                ctime_ns: 1,
                inode: 2,
            })
        };
        let n = 2 * DONE_ROWS as u64 + 5;
        let name = |i: u64| PathBuf::from(format!("d/f{i:05}"));
        st.begin().unwrap();
        for i in 0..n {
            st.done(&name(i), S, stamp(i), None, Some(&d(i as u8)))
                .unwrap();
        }
        // Redone with new content while the first row may still wait, then removed, failed.
        st.done(&name(n - 1), S, stamp(100), None, Some(&d(0xee)))
            .unwrap();
        st.done(&name(n - 2), S, stamp(0), None, Some(&d(0)))
            .unwrap();
        st.remove(&name(n - 2)).unwrap();
        st.done(&name(n - 3), S, stamp(0), None, Some(&d(0)))
            .unwrap();
        let e = FileError::new(Kind::Changed, "busy");
        assert_eq!(
            st.not_done(&name(n - 3), FileStatus::Failed, stamp(0), &e)
                .unwrap(),
            1
        );
        st.done(&name(n), S, stamp(7), None, Some(&d(7))).unwrap();
        // The manifest's view inside the transaction already has them all.
        let digests = st.digests(HashAlgo::Sha256).unwrap();
        assert_eq!(digests.len() as u64, n - 1);
        assert_eq!(digests.last().unwrap().1, d(7));
        // Nothing is visible to the watcher before the commit, everything after it.
        assert!(reader.lookup(&name(0)).unwrap().is_none());
        st.commit().unwrap();
        for i in 0..n - 3 {
            let k = reader.lookup(&name(i)).unwrap().unwrap();
            assert!(k.settled(stamp(i)), "{i}");
        }
        assert!(reader
            .lookup(&name(n - 1))
            .unwrap()
            .unwrap()
            .settled(stamp(100)));
        assert!(reader.lookup(&name(n - 2)).unwrap().is_none());
        assert_eq!(
            rec(&reader.lookup(&name(n - 3)).unwrap().unwrap()).status,
            FileStatus::Failed
        );
        assert!(reader.lookup(&name(n)).unwrap().unwrap().settled(stamp(7)));
        let all = st.digests(HashAlgo::Sha256).unwrap();
        let redone = name(n - 1).into_os_string().into_vec();
        let rows: Vec<_> = all.iter().filter(|(p, _)| *p == redone).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1, d(0xee), "the later row wins");
    }

    #[test]
    fn a_file_lacks_exactly_the_results_not_recorded_for_the_stamp_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new("/data");
        let s1 = Stamp {
            size: 3,
            mtime_ns: 10,
            ctime_ns: 11,
            inode: 7,
        };
        // A run of sha256 and zstd records both; the file is known to a run that adds blake3.
        let mut st = State::open(dir.path(), root, &spec("sha256,zstd")).unwrap();
        let sha = d(1);
        st.begin().unwrap();
        st.done(Path::new("f"), S, Some(s1), None, Some(&sha))
            .unwrap();
        st.done(
            Path::new("f"),
            OpKind::Zstd,
            Some(s1),
            Some(Path::new("f.zst")),
            None,
        )
        .unwrap();
        st.commit().unwrap();
        let wider = spec("blake3,zstd,sha256");
        let reader = State::reader(dir.path(), root, &wider).unwrap();
        let k = reader.lookup(Path::new("f")).unwrap().unwrap();
        assert!(!k.settled(Some(s1)), "blake3 is missing");
        let only = match k.lacks(&wider, Some(s1), |made| made) {
            Lacks::Part(only) => only,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (only.compress, &only.hashes[..], &only.recorded[..]),
            (false, &[HashAlgo::Blake3][..], &[sha][..])
        );
        // Its output gone, the compressor's result is missing too.
        let Lacks::Part(only) = k.lacks(&wider, Some(s1), |_| false) else {
            panic!("a part")
        };
        assert!(only.compress && only.hashes == [HashAlgo::Blake3]);
        // The same ops (or fewer) lack nothing; the recorded digests come in --op's order.
        assert_eq!(
            k.lacks(&spec("zstd,sha256"), Some(s1), |made| made),
            Lacks::Nothing(vec![sha])
        );
        // Changed, or of unknown stamp: everything is computed.
        let s2 = Stamp { ctime_ns: 12, ..s1 };
        assert_eq!(k.lacks(&wider, Some(s2), |made| made), Lacks::All);
        assert_eq!(k.lacks(&wider, None, |made| made), Lacks::All);
        // The scan's map merges the rows of every op of the run, digests included: only the
        // hash without a row is computed.
        let map = reader.known_under(Path::new("")).unwrap();
        assert!(map
            .get(Path::new("f"))
            .unwrap()
            .record(OpKind::Zstd)
            .is_some_and(|r| r.made_output));
        let Lacks::Part(only) = map
            .get(Path::new("f"))
            .unwrap()
            .lacks(&wider, Some(s1), |m| m)
        else {
            panic!("a part")
        };
        assert_eq!(only.hashes, [HashAlgo::Blake3]);
    }

    #[test]
    fn a_done_file_records_only_the_results_its_job_computed() {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new("/data");
        let run = spec("sha256,blake3,zstd");
        let mut st = State::open(dir.path(), root, &run).unwrap();
        let reader = State::reader(dir.path(), root, &run).unwrap();
        let s1 = Stamp {
            size: 3,
            mtime_ns: 10,
            ctime_ns: 11,
            inode: 7,
        };
        let b3 = Digest::new(HashAlgo::Blake3, &[3; 32]).unwrap();
        let old = d(1);
        st.begin().unwrap();
        st.done(Path::new("f"), S, Some(s1), None, Some(&old))
            .unwrap();
        st.done(
            Path::new("f"),
            OpKind::Zstd,
            Some(s1),
            Some(Path::new("f.zst")),
            None,
        )
        .unwrap();
        // Read for blake3 only: its digests list the recorded sha256 too, which is not
        // written again, nor is the compressor's row.
        let done = Done {
            digests: vec![b3, old],
            stamp: Some(s1),
            only: Some(Box::new(Only {
                compress: false,
                hashes: vec![HashAlgo::Blake3],
                recorded: vec![old],
                stamp: s1,
                replaces: false,
            })),
            ..Done::default()
        };
        st.done_results(Path::new("f"), &done, None).unwrap();
        st.commit().unwrap();
        let k = reader.lookup(Path::new("f")).unwrap().unwrap();
        assert!(k.settled(Some(s1)) && k.done_as(Some(s1)));
        assert!(k.made_output(), "the compressor's row keeps its output");
        assert_eq!(
            st.digests(HashAlgo::Blake3).unwrap(),
            vec![(b"f".to_vec(), b3)]
        );
        assert_eq!(
            st.digests(HashAlgo::Sha256).unwrap(),
            vec![(b"f".to_vec(), old)]
        );
        // A failure is recorded under every op of the run: the next attempt redoes them all.
        let e = FileError::new(Kind::Changed, "busy");
        st.begin().unwrap();
        st.not_done(Path::new("f"), FileStatus::Failed, Some(s1), &e)
            .unwrap();
        st.commit().unwrap();
        let k = reader.lookup(Path::new("f")).unwrap().unwrap();
        assert_eq!(k.lacks(&run, Some(s1), |m| m), Lacks::All);
        assert_eq!(
            st.status_of(Path::new("f")).unwrap(),
            Some(FileStatus::Failed)
        );
    }

    #[test]
    fn a_state_of_joined_names_is_split_into_a_row_per_result() {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new("/data");
        // The layout of filepipe before rows were per result, as a watch of
        // sha256,blake3,zstd wrote it: one row, the digests concatenated in the canonical
        // order; and an older sha256 row of a batch of that op alone.
        {
            let conn = Connection::open(db_path(dir.path())).unwrap();
            conn.execute_batch(
                "CREATE TABLE files (
                     root BLOB NOT NULL, op TEXT NOT NULL, path BLOB NOT NULL, size INTEGER,
                     mtime_ns INTEGER, inode INTEGER, output BLOB, digest BLOB,
                     status TEXT NOT NULL, error TEXT, errno INTEGER, message TEXT,
                     attempts INTEGER NOT NULL DEFAULT 0, updated INTEGER NOT NULL,
                     ctime_ns INTEGER, PRIMARY KEY (root, op, path)) WITHOUT ROWID;",
            )
            .unwrap();
            let digest = [[1u8; 32], [3u8; 32]].concat();
            let row = "INSERT INTO files (root, op, path, size, mtime_ns, inode, output, digest,
                          status, error, attempts, updated, ctime_ns)
                       VALUES (?1, ?2, ?3, 3, 10, 7, ?4, ?5, ?6, ?7, ?8, ?9, 11)";
            let root = b"/data".to_vec();
            let none: Option<Vec<u8>> = None;
            let no_error: Option<&str> = None;
            conn.execute(
                row,
                params![
                    root,
                    "sha256,blake3,zstd",
                    b"f".to_vec(),
                    b"f.zst".to_vec(),
                    digest,
                    "done",
                    no_error,
                    0,
                    200
                ],
            )
            .unwrap();
            conn.execute(
                row,
                params![
                    root,
                    "sha256,blake3,zstd",
                    b"g".to_vec(),
                    none,
                    none,
                    "failed",
                    "changed",
                    2,
                    200
                ],
            )
            .unwrap();
            conn.execute(
                row,
                params![
                    root,
                    "sha256",
                    b"f".to_vec(),
                    none,
                    vec![9u8; 32],
                    "done",
                    no_error,
                    0,
                    100
                ],
            )
            .unwrap();
        }
        let run = spec("sha256,blake3,zstd");
        let mut st = State::open(dir.path(), root, &run).unwrap();
        let reader = State::reader(dir.path(), root, &run).unwrap();
        let s1 = Stamp {
            size: 3,
            mtime_ns: 10,
            ctime_ns: 11,
            inode: 7,
        };
        let f = reader.lookup(Path::new("f")).unwrap().unwrap();
        assert!(f.done_as(Some(s1)) && f.made_output());
        let b3 = Digest::new(HashAlgo::Blake3, &[3; 32]).unwrap();
        assert_eq!(
            f.lacks(&run, Some(s1), |m| m),
            Lacks::Nothing(vec![d(1), b3]),
            "the newer row's digests, each under its own op"
        );
        let g = reader.lookup(Path::new("g")).unwrap().unwrap();
        assert!([S, OpKind::Blake3, OpKind::Zstd, OpKind::Sha512]
            .iter()
            .all(|&op| g
                .record(op)
                .is_none_or(|r| r.status == FileStatus::Failed && r.attempts == 2)));
        assert_eq!(g.count(), 3);
        // No joined name is left, and the database says which layout it has.
        let joined: i64 = st
            .conn
            .query_row("SELECT COUNT(*) FROM files WHERE op LIKE '%,%'", [], |r| {
                r.get(0)
            })
            .unwrap();
        let version: i64 = st
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!((joined, version), (0, SCHEMA));
        st.begin().unwrap();
        st.commit().unwrap();
        // A state of a layout this filepipe does not know is refused, not misread.
        st.conn
            .pragma_update(None, "user_version", SCHEMA + 1)
            .unwrap();
        drop((st, reader));
        let err = State::open(dir.path(), root, &run).err().unwrap();
        assert!(format!("{err:#}").contains("newer filepipe"), "{err:#}");
    }
}
