//! Safe, atomic output publishing.
//!
//! Invariants: an output directory is reached from its root one component at a time with
//! `O_NOFOLLOW`, so a planted symlink can never lead a write outside the output root; an output
//! is written to a mode-0600 temp file in its final directory, given the input's owner, mode and
//! times, synced, and only then renamed into place (`RENAME_NOREPLACE` unless `--force`), and
//! the directory is synced. The steps are separate (`set_attrs`, `sync` into a `SyncedTemp`,
//! `rename`, `sync_dirs`) so a caller can take each for a group of files before the next; the
//! types only allow a rename after the sync. A temp file that is not published is unlinked when
//! dropped.
//!
//! A temp proves it is filepipe's: it carries the `user.filepipe.temp` extended attribute from
//! just after its creation until just after its rename, and its writer holds an open file
//! description lock on it for as long as it lives. `examine_temp` removes a file named like a
//! temp only with that mark and without a live lock, so no input that merely looks like a temp,
//! and no temp of a running filepipe (in another PID namespace, or on another host sharing the
//! file system), is ever deleted.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, RenameFlags, Timestamps};
use rustix::io::Errno;

use crate::error::{FileError, Kind};
use crate::fslock::{self, LockKind};
use crate::signals;

/// Prefix and suffix of filepipe's temp names: `.filepipe.<pid>-<salt>.<n>.tmp`. Short on
/// purpose, so a temp name fits even when the final name is close to NAME_MAX.
const TEMP_PREFIX: &str = ".filepipe.";
const TEMP_SUFFIX: &str = ".tmp";

/// The extended attribute that marks a temp as filepipe's (see the module comment).
const TEMP_MARK: &str = "user.filepipe.temp";
/// Its value: the version of the temp protocol.
const TEMP_MARK_VALUE: &[u8] = b"1";

/// Longest file name Linux file systems accept.
pub const NAME_MAX: usize = 255;

/// An open directory and the path it was reached by (for messages and the temp registry).
#[derive(Debug)]
pub struct Dir {
    /// The directory's file descriptor: all `*at` calls go through it.
    pub fd: OwnedFd,
    /// Its path, for messages only: never used to reach the directory again.
    pub path: PathBuf,
}

/// Opens directories below one root without following symlinks, remembering the last one so
/// consecutive files of the same directory (the walk's order) cost no syscall.
#[derive(Debug)]
pub struct DirCache {
    root: PathBuf,
    create: bool,
    last: Option<(PathBuf, Arc<Dir>)>,
}

impl DirCache {
    /// A cache for directories under `root`; with `create`, missing ones are made.
    pub fn new(root: &Path, create: bool) -> Self {
        DirCache {
            root: root.to_path_buf(),
            create,
            last: None,
        }
    }

    /// The directory `rel_dir` (relative to the root), opened safely. `mode_of` gives the mode
    /// for a directory that must be created, from its relative path.
    pub fn open(
        &mut self,
        rel_dir: &Path,
        mode_of: &dyn Fn(&Path) -> Mode,
    ) -> Result<Arc<Dir>, FileError> {
        if let Some((p, dir)) = &self.last {
            if p == rel_dir {
                return Ok(Arc::clone(dir));
            }
        }
        let dir = Arc::new(self.open_uncached(rel_dir, mode_of)?);
        self.last = Some((rel_dir.to_path_buf(), Arc::clone(&dir)));
        Ok(dir)
    }

    fn open_uncached(
        &self,
        rel_dir: &Path,
        mode_of: &dyn Fn(&Path) -> Mode,
    ) -> Result<Dir, FileError> {
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        // The root itself was named by the user and may be a symlink: follow it once.
        let mut fd = rfs::open(&self.root, dir_flags, Mode::empty())
            .map_err(|e| FileError::errno(&format!("opening {}", self.root.display()), e))?;
        let mut path = self.root.clone();
        let mut rel = PathBuf::new();
        for comp in rel_dir.components() {
            let Component::Normal(name) = comp else {
                return Err(FileError::new(
                    Kind::UnsafeOutputPath,
                    format!("refusing path component {comp:?} in {}", rel_dir.display()),
                ));
            };
            path.push(name);
            rel.push(name);
            let flags = dir_flags | OFlags::NOFOLLOW;
            let next = match rfs::openat(&fd, name, flags, Mode::empty()) {
                Err(Errno::NOENT) if self.create => {
                    match rfs::mkdirat(&fd, name, mode_of(&rel)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => {
                            return Err(FileError::errno(
                                &format!("creating directory {}", path.display()),
                                e,
                            ))
                        }
                    }
                    rfs::openat(&fd, name, flags, Mode::empty())
                }
                other => other,
            };
            fd = next.map_err(|e| match e {
                Errno::LOOP | Errno::NOTDIR => FileError {
                    kind: Kind::UnsafeOutputPath,
                    errno: Some(e.raw_os_error()),
                    message: format!(
                        "refusing to write through {}: it is a symlink or not a directory",
                        path.display()
                    ),
                },
                e => FileError::errno(&format!("opening directory {}", path.display()), e),
            })?;
        }
        Ok(Dir { fd, path })
    }
}

/// The times and permissions an output takes from its input.
#[derive(Debug, Clone)]
pub struct Attrs {
    /// Permission bits (no setuid/setgid/sticky: an archive is not a program).
    pub mode: u32,
    /// Owner and group, applied when permitted (as root); silently kept otherwise, like gzip.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Access and modification times.
    pub times: Timestamps,
}

impl Attrs {
    /// Attributes copied from an input's stat.
    pub fn from_stat(st: &rfs::Stat) -> Self {
        use rustix::fs::Timespec;
        Attrs {
            mode: st.st_mode & 0o777,
            uid: st.st_uid,
            gid: st.st_gid,
            times: Timestamps {
                last_access: Timespec {
                    tv_sec: st.st_atime as _,
                    tv_nsec: st.st_atime_nsec as _,
                },
                last_modification: Timespec {
                    tv_sec: st.st_mtime as _,
                    tv_nsec: st.st_mtime_nsec as _,
                },
            },
        }
    }
}

/// An output being written: a 0600 temp file in the final directory, marked and locked as
/// filepipe's. Dropping it without `publish` unlinks it.
#[derive(Debug)]
pub struct TempOutput {
    dir: Arc<Dir>,
    name: OsString,
    file: Option<File>,
    registry_id: u64,
    /// The mark could be set (the file system keeps user extended attributes).
    marked: bool,
}

/// This process's temp names start with this: `.filepipe.<pid>-<salt>.`. The salt tells this
/// process's temps from those of another process with the same pid (in another PID namespace,
/// or on another host sharing the file system).
fn own_prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's random source: no other process draws this.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let salt = h.finish() as u32;
        format!("{TEMP_PREFIX}{}-{salt:08x}.", std::process::id())
    })
}

impl TempOutput {
    /// Creates a fresh temp file in `dir`, locked and marked as this process's.
    pub fn create(dir: Arc<Dir>) -> Result<Self, FileError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = OsString::from(format!("{}{n}{TEMP_SUFFIX}", own_prefix()));
            let created = match create_claimed(&dir, &name) {
                Some(r) => r,
                None => create_then_claim(&dir, &name),
            };
            match created {
                Ok((fd, marked)) => {
                    let registry_id = signals::register_temp(dir.path.join(&name));
                    return Ok(TempOutput {
                        dir,
                        name,
                        file: Some(File::from(fd)),
                        registry_id,
                        marked,
                    });
                }
                // Left by another process with our name (the salt makes that all but
                // impossible): take the next number.
                Err(Errno::EXIST) => continue,
                Err(e) => {
                    return Err(FileError::errno(
                        &format!("creating temp file in {}", dir.path.display()),
                        e,
                    ))
                }
            }
        }
    }

    /// The temp file's name in its directory.
    pub fn name(&self) -> &OsStr {
        &self.name
    }

    /// The open temp file, for writing.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("temp file is open until publish")
    }

    /// Applies `attrs`, syncs data and attributes, renames the temp to `final_name` (refusing
    /// to replace an existing file unless `replace`), and syncs the directory.
    pub fn publish(
        mut self,
        final_name: &OsStr,
        attrs: Option<&Attrs>,
        replace: bool,
    ) -> Result<(), FileError> {
        if let Some(a) = attrs {
            self.set_attrs(final_name, a)?;
        }
        let dir = self.sync(final_name)?.rename(final_name, replace)?;
        sync_dir(&dir)
    }

    /// Gives the temp the input's owner, mode and times. Done before the fsync, so they are
    /// durable with the data; `final_name` is for messages.
    pub fn set_attrs(&mut self, final_name: &OsStr, a: &Attrs) -> Result<(), FileError> {
        let ctx = |what: &str| format!("{what} {}", self.dir.path.join(final_name).display());
        let file = self.file.as_ref().expect("temp file is open until synced");
        // chown first: it may clear mode bits, and it only succeeds with privilege.
        let _ = rfs::fchown(
            file,
            Some(rustix::fs::Uid::from_raw(a.uid)),
            Some(rustix::fs::Gid::from_raw(a.gid)),
        );
        rfs::fchmod(file, Mode::from_raw_mode(a.mode))
            .map_err(|e| FileError::errno(&ctx("setting mode of"), e))?;
        rfs::futimens(file, &a.times).map_err(|e| FileError::errno(&ctx("setting times of"), e))
    }

    /// Starts the kernel's write-back of everything written, without waiting. Only a hint:
    /// durability comes from `sync`, which then mostly waits for I/O already under way.
    pub fn start_writeback(&self) {
        if let Some(file) = &self.file {
            start_writeback(file);
        }
    }

    /// fsyncs the temp: data, mode and times are all durable before the name can appear, so a
    /// crash never leaves an output a rerun would not recognise. The file stays open (and
    /// locked) until the rename. `final_name` is for messages.
    pub fn sync(self, final_name: &OsStr) -> Result<SyncedTemp, FileError> {
        let file = self.file.as_ref().expect("synced once");
        file.sync_all().map_err(|e| {
            let path = self.dir.path.join(final_name);
            FileError::io(&format!("syncing {}", path.display()), &e)
        })?;
        Ok(SyncedTemp(self))
    }
}

/// Whether temps can be made anonymous first (`O_TMPFILE`, then linked under their name):
/// cleared for good at the first file system or sandbox that refuses it.
static ANONYMOUS_FIRST: AtomicBool = AtomicBool::new(true);

/// Makes the temp `name` in `dir` appear already locked and marked: an anonymous file
/// (`O_TMPFILE`) is locked and marked first, then linked under the name, so no crash can leave
/// the name on a file without the mark. `None` where that cannot be done here (a file system
/// without `O_TMPFILE`, no `/proc`): the caller then creates the name directly.
fn create_claimed(dir: &Dir, name: &OsStr) -> Option<Result<(OwnedFd, bool), Errno>> {
    use std::os::fd::AsRawFd;
    if !ANONYMOUS_FIRST.load(Ordering::Relaxed) {
        return None;
    }
    // Read-write: a temp is read back through its own descriptor (its mode, once set to the
    // input's, may not let us open it again).
    let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
    let fd = match rfs::openat(&dir.fd, ".", flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => fd,
        // Not supported by this file system (or kernel): its temps are created by name.
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOSYS) => return None,
        Err(e) => return Some(Err(e)),
    };
    // Nobody else can see the file yet: the lock cannot be contended.
    if let Err(e) = fslock::lock(&fd, LockKind::Write, false) {
        return Some(Err(e));
    }
    let marked = mark(&fd, &dir.path);
    // Linking an anonymous file by descriptor needs CAP_DAC_READ_SEARCH; through its /proc
    // link it needs only /proc.
    let proc_link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    match rfs::linkat(rfs::CWD, &proc_link, &dir.fd, name, AtFlags::SYMLINK_FOLLOW) {
        Ok(()) => Some(Ok((fd, marked))),
        Err(Errno::EXIST) => Some(Err(Errno::EXIST)),
        Err(e) => {
            tracing::debug!(error = %e, "cannot link anonymous temps: creating them by name");
            ANONYMOUS_FIRST.store(false, Ordering::Relaxed);
            None
        }
    }
}

/// Creates the temp `name` in `dir` by name, then locks and marks it (where `O_TMPFILE` is
/// not available). A crash between the creation and the mark leaves an unmarked temp, which
/// no sweep removes: it is reported instead. The lock waits: a sweeper examining the file in
/// the instant after its creation holds a read lock for microseconds.
fn create_then_claim(dir: &Dir, name: &OsStr) -> Result<(OwnedFd, bool), Errno> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::openat(&dir.fd, name, flags, Mode::from_raw_mode(0o600))?;
    if let Err(e) = fslock::lock(&fd, LockKind::Write, true) {
        let _ = rfs::unlinkat(&dir.fd, name, AtFlags::empty());
        return Err(e);
    }
    let marked = mark(&fd, &dir.path);
    Ok((fd, marked))
}

/// Sets filepipe's mark on a new temp; false where the file system keeps no user extended
/// attributes (NFSv3, some FUSE ones): the temp is still locked and removed on failure, but a
/// crash leaves it for the user.
fn mark(fd: &OwnedFd, dir: &Path) -> bool {
    match rfs::fsetxattr(fd, TEMP_MARK, TEMP_MARK_VALUE, rfs::XattrFlags::empty()) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "temp not marked");
            false
        }
    }
}

/// A temp output whose data and attributes are durable, ready for its final name. Dropping it
/// without `rename` unlinks it.
#[derive(Debug)]
pub struct SyncedTemp(TempOutput);

impl SyncedTemp {
    /// The temp file's name in its directory.
    pub fn name(&self) -> &OsStr {
        &self.0.name
    }

    /// The directory the temp is in.
    pub fn dir(&self) -> &Arc<Dir> {
        &self.0.dir
    }

    /// The open temp file, for reading it back.
    pub fn file(&self) -> &File {
        self.0.file.as_ref().expect("open until renamed")
    }

    /// Renames the temp to `final_name` (refusing to replace an existing file unless
    /// `replace`) and returns the directory, which the caller must sync before reporting the
    /// output as published: until then the new name may not survive a crash. The mark comes
    /// off once the name is final (a crash in between leaves it on an output, where it means
    /// nothing), and the lock with the close. On failure the temp is still there, to be
    /// looked at, until this is dropped.
    pub fn rename(&mut self, final_name: &OsStr, replace: bool) -> Result<Arc<Dir>, FileError> {
        let temp = &mut self.0;
        let ctx = |what: &str| format!("{what} {}", temp.dir.path.join(final_name).display());
        let flags = if replace {
            RenameFlags::empty()
        } else {
            RenameFlags::NOREPLACE
        };
        let renamed = rfs::renameat_with(&temp.dir.fd, &temp.name, &temp.dir.fd, final_name, flags);
        if let Err(e) = renamed {
            return Err(match e {
                Errno::EXIST => FileError {
                    kind: Kind::OutputExists,
                    errno: Some(e.raw_os_error()),
                    message: format!("{} already exists; not overwritten", ctx("output")),
                },
                e => FileError::errno(&ctx("publishing"), e),
            });
        }
        signals::unregister_temp(temp.registry_id);
        // Published: nothing left for Drop to remove.
        temp.name.clear();
        if let Some(file) = temp.file.take() {
            if temp.marked {
                let _ = rfs::fremovexattr(&file, TEMP_MARK);
            }
        }
        Ok(Arc::clone(&temp.dir))
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            // Unlinked while still locked: no sweeper can see it unlocked under its name.
            let _ = rfs::unlinkat(&self.dir.fd, &self.name, AtFlags::empty());
            drop(self.file.take());
            signals::unregister_temp(self.registry_id);
        }
    }
}

/// What a file named like a filepipe temp turned out to be (see `examine_temp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TempFound {
    /// This process's own temp, or gone by now: nothing to say about it.
    Ignore,
    /// The temp of a running filepipe (it holds the lock): left alone.
    InUse,
    /// Left by a filepipe that stopped (marked, unlocked), and removed.
    Removed,
    /// Left by a filepipe that stopped, and kept: the caller does not own this tree.
    Stale,
    /// Named like a temp but without the mark, or not examinable (the errno): neither read nor
    /// removed, since nothing proves filepipe made it.
    Unmarked(Option<Errno>),
}

/// Looks at `name` in `dir` (a temp-like name): removes it, with `remove`, only if it carries
/// filepipe's mark and no live process holds its lock, and only the very file it examined.
pub fn examine_temp(dir: &impl AsFd, name: &OsStr, remove: bool) -> TempFound {
    if name.as_bytes().starts_with(own_prefix().as_bytes()) {
        return TempFound::Ignore;
    }
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rfs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return TempFound::Ignore,
        Err(e) => return TempFound::Unmarked(Some(e)),
    };
    let Ok(st) = rfs::fstat(&fd) else {
        return TempFound::Unmarked(None);
    };
    // The verdict stands only if the name still leads to the file examined: a temp published
    // (renamed) meanwhile is no longer there to speak of.
    let still_there = |found: TempFound| match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(now) if now.st_dev == st.st_dev && now.st_ino == st.st_ino => found,
        _ => TempFound::Ignore,
    };
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
        return still_there(TempFound::Unmarked(None));
    }
    // Locked by its writer: alive, wherever it runs. Held from here to the unlink, so no
    // writer can take it up meanwhile.
    match fslock::lock(&fd, LockKind::Read, false) {
        Ok(()) => {}
        Err(Errno::AGAIN | Errno::ACCESS) => return still_there(TempFound::InUse),
        Err(e) => return still_there(TempFound::Unmarked(Some(e))),
    }
    let mut value = [0u8; 8];
    let marked = matches!(
        rfs::fgetxattr(&fd, TEMP_MARK, &mut value[..]),
        Ok(n) if value[..n] == *TEMP_MARK_VALUE
    );
    if !marked {
        return still_there(TempFound::Unmarked(None));
    }
    if !remove {
        return still_there(TempFound::Stale);
    }
    match still_there(TempFound::Removed) {
        TempFound::Removed => match rfs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) => TempFound::Removed,
            Err(Errno::NOENT) => TempFound::Ignore,
            Err(e) => TempFound::Unmarked(Some(e)),
        },
        other => other,
    }
}

/// `examine_temp` for a path, through its parent directory.
pub fn examine_temp_path(path: &Path, remove: bool) -> TempFound {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return TempFound::Ignore;
    };
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    match rfs::open(parent, flags, Mode::empty()) {
        Ok(dir) => examine_temp(&dir, name, remove),
        Err(e) => TempFound::Unmarked(Some(e)),
    }
}

/// A writer that starts the kernel's write-back of what it wrote every few MiB, so the fsync
/// before publishing a large output waits for the last stretch only, not for all of it.
pub struct WriteBehind<'f> {
    file: &'f mut File,
    pending: u64,
}

impl<'f> WriteBehind<'f> {
    /// How much written data triggers a write-back request.
    const CHUNK: u64 = 8 << 20;

    /// Wraps an output file.
    pub fn new(file: &'f mut File) -> Self {
        WriteBehind { file, pending: 0 }
    }
}

impl std::io::Write for WriteBehind<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.pending += n as u64;
        if self.pending >= Self::CHUNK {
            self.pending = 0;
            start_writeback(self.file);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Asks the kernel to start writing `file`'s dirty pages back. Only a hint
/// (SYNC_FILE_RANGE_WRITE does not wait and promises nothing): durability still comes from an
/// fsync. Errors are ignored for the same reason; the fsync reports them.
fn start_writeback(file: &File) {
    // SAFETY: a valid open fd; the call reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
            0,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// fsyncs a directory so a rename or unlink in it survives a crash.
pub fn sync_dir(dir: &Dir) -> Result<(), FileError> {
    rfs::fsync(dir.fd.as_fd())
        .map_err(|e| FileError::errno(&format!("syncing directory {}", dir.path.display()), e))
}

/// fsyncs each distinct directory among `dirs` once (the same directory may come through
/// several handles) and returns, for each of `dirs` in order, its directory's result.
pub fn sync_dirs(dirs: &[&Arc<Dir>]) -> Vec<Result<(), FileError>> {
    let mut done: HashMap<(u64, u64), Result<(), FileError>> = HashMap::new();
    dirs.iter()
        .map(|dir| match rfs::fstat(&dir.fd) {
            Ok(st) => done
                .entry((st.st_dev, st.st_ino))
                .or_insert_with(|| sync_dir(dir))
                .clone(),
            // Cannot tell it apart from the others: sync it on its own.
            Err(_) => sync_dir(dir),
        })
        .collect()
}

/// True for names of filepipe's own temp files: they are never inputs.
pub fn is_temp_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(TEMP_PREFIX.as_bytes()) && b.ends_with(TEMP_SUFFIX.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_recognised_and_short() {
        let pid = std::process::id();
        assert!(is_temp_name(OsStr::new(&format!(".filepipe.{pid}.7.tmp"))));
        assert!(!is_temp_name(OsStr::new("filepipe.1.tmp")));
        assert!(own_prefix().len() < 40, "{}", own_prefix());
        assert!(is_temp_name(OsStr::new(&format!(
            "{}0{TEMP_SUFFIX}",
            own_prefix()
        ))));
    }

    /// A file named like another process's temp, marked and/or locked as `how` says; the
    /// returned descriptor holds the lock.
    fn foreign_temp(dir: &Path, name: &str, mark: bool, lock: bool) -> File {
        let path = dir.join(name);
        std::fs::write(&path, b"content").unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        if mark {
            rfs::fsetxattr(&file, TEMP_MARK, TEMP_MARK_VALUE, rfs::XattrFlags::empty()).unwrap();
        }
        if lock {
            fslock::lock(&file, LockKind::Write, false).unwrap();
        }
        file
    }

    #[test]
    fn only_a_marked_unlocked_temp_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = rfs::open(tmp.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let examine = |name: &str, remove| examine_temp(&dir, OsStr::new(name), remove);
        // Named like a temp, but nothing says filepipe made it: never removed.
        let _plain = foreign_temp(tmp.path(), ".filepipe.4000000.0.tmp", false, false);
        assert_eq!(
            examine(".filepipe.4000000.0.tmp", true),
            TempFound::Unmarked(None)
        );
        // Marked, and locked by a live writer (another description counts as another owner,
        // as a process in another PID namespace or on another host would).
        let live = foreign_temp(tmp.path(), ".filepipe.1.0.tmp", true, true);
        assert_eq!(examine(".filepipe.1.0.tmp", true), TempFound::InUse);
        // Its writer died: stale, removed only when asked.
        drop(live);
        assert_eq!(examine(".filepipe.1.0.tmp", false), TempFound::Stale);
        assert!(tmp.path().join(".filepipe.1.0.tmp").exists());
        assert_eq!(examine(".filepipe.1.0.tmp", true), TempFound::Removed);
        assert!(!tmp.path().join(".filepipe.1.0.tmp").exists());
        assert!(tmp.path().join(".filepipe.4000000.0.tmp").exists());
        // Gone, or this process's own: nothing to say.
        assert_eq!(examine(".filepipe.9.9.tmp", true), TempFound::Ignore);
        let mut cache = DirCache::new(tmp.path(), false);
        let out = cache.open(Path::new(""), &|_| Mode::empty()).unwrap();
        let mine = TempOutput::create(out).unwrap();
        assert_eq!(
            examine(mine.name().to_str().unwrap(), true),
            TempFound::Ignore
        );
    }

    #[test]
    fn both_ways_of_creating_a_temp_leave_it_marked_and_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DirCache::new(tmp.path(), false)
            .open(Path::new(""), &|_| Mode::empty())
            .unwrap();
        let anonymous = create_claimed(&dir, OsStr::new(".filepipe.t.1.tmp"))
            .expect("O_TMPFILE and /proc here");
        let named = create_then_claim(&dir, OsStr::new(".filepipe.t.2.tmp"));
        for (fd, name) in [(anonymous, "1"), (named, "2")] {
            let (fd, marked) = fd.unwrap();
            assert!(marked, "{name}");
            let name = format!(".filepipe.t.{name}.tmp");
            assert_eq!(
                examine_temp(&dir.fd, OsStr::new(&name), true),
                TempFound::InUse
            );
            drop(fd);
            assert_eq!(
                examine_temp(&dir.fd, OsStr::new(&name), true),
                TempFound::Removed
            );
        }
    }

    #[test]
    fn a_live_temp_is_marked_and_locked_and_its_output_keeps_neither() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cache = DirCache::new(tmp.path(), false);
        let out = cache.open(Path::new(""), &|_| Mode::empty()).unwrap();
        let mut temp = TempOutput::create(out).unwrap();
        std::io::Write::write_all(temp.file(), b"data").unwrap();
        let path = tmp.path().join(temp.name());
        let mut value = [0u8; 8];
        let n = rfs::getxattr(&path, TEMP_MARK, &mut value[..]).unwrap();
        assert_eq!(&value[..n], TEMP_MARK_VALUE);
        // Another description cannot lock it: its writer is alive.
        let other = File::open(&path).unwrap();
        assert_eq!(
            fslock::lock(&other, LockKind::Read, false),
            Err(Errno::AGAIN)
        );
        drop(other);
        temp.publish(OsStr::new("out"), None, false).unwrap();
        let out = tmp.path().join("out");
        assert_eq!(std::fs::read(&out).unwrap(), b"data");
        assert_eq!(
            rfs::getxattr(&out, TEMP_MARK, &mut value[..]),
            Err(Errno::NODATA)
        );
        fslock::lock(&File::open(&out).unwrap(), LockKind::Read, false).unwrap();
    }

    #[test]
    fn unpublished_temp_is_removed_and_publish_refuses_to_clobber() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cache = DirCache::new(tmp.path(), true);
        let dir = cache
            .open(Path::new("a/b"), &|_| Mode::from_raw_mode(0o755))
            .unwrap();
        {
            let mut t = TempOutput::create(Arc::clone(&dir)).unwrap();
            std::io::Write::write_all(t.file(), b"partial").unwrap();
        }
        assert_eq!(
            std::fs::read_dir(tmp.path().join("a/b")).unwrap().count(),
            0
        );
        std::fs::write(tmp.path().join("a/b/x"), b"old").unwrap();
        let mut t = TempOutput::create(dir).unwrap();
        std::io::Write::write_all(t.file(), b"new").unwrap();
        let err = t.publish(OsStr::new("x"), None, false).unwrap_err();
        assert_eq!(err.kind, Kind::OutputExists);
        assert_eq!(std::fs::read(tmp.path().join("a/b/x")).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(tmp.path().join("a/b")).unwrap().count(),
            1
        );
    }

    #[test]
    fn synced_temp_is_removed_unless_renamed_and_dirs_sync_once_per_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let mode = |_: &Path| Mode::from_raw_mode(0o755);
        let a = DirCache::new(tmp.path(), true)
            .open(Path::new("a"), &mode)
            .unwrap();
        let a_again = DirCache::new(tmp.path(), true)
            .open(Path::new("a"), &mode)
            .unwrap();
        let b = DirCache::new(tmp.path(), true)
            .open(Path::new("b"), &mode)
            .unwrap();
        {
            let mut t = TempOutput::create(Arc::clone(&a)).unwrap();
            std::io::Write::write_all(t.file(), b"synced, never renamed").unwrap();
            t.start_writeback();
            let _synced = t.sync(OsStr::new("x")).unwrap();
        }
        assert_eq!(std::fs::read_dir(tmp.path().join("a")).unwrap().count(), 0);
        let mut t = TempOutput::create(Arc::clone(&b)).unwrap();
        std::io::Write::write_all(t.file(), b"data").unwrap();
        let dir = t
            .sync(OsStr::new("y"))
            .unwrap()
            .rename(OsStr::new("y"), false)
            .unwrap();
        assert!(Arc::ptr_eq(&dir, &b));
        assert_eq!(std::fs::read(tmp.path().join("b/y")).unwrap(), b"data");
        let results = sync_dirs(&[&a, &b, &a_again, &b]);
        assert_eq!(results, vec![Ok(()), Ok(()), Ok(()), Ok(())]);
    }

    #[test]
    fn write_behind_writes_everything_through() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let mut file = File::create(&path).unwrap();
        let data: Vec<u8> = (0..20_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = WriteBehind::new(&mut file);
        for chunk in data.chunks(1 << 20) {
            std::io::Write::write_all(&mut w, chunk).unwrap();
        }
        std::io::Write::flush(&mut w).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn planted_symlink_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("a")).unwrap();
        let mut cache = DirCache::new(tmp.path(), true);
        let err = cache
            .open(Path::new("a/b"), &|_| Mode::from_raw_mode(0o755))
            .unwrap_err();
        assert_eq!(err.kind, Kind::UnsafeOutputPath);
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
