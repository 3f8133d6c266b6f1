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

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, RenameFlags, Timestamps};
use rustix::io::Errno;

use crate::error::{FileError, Kind};
use crate::signals;

/// Prefix and suffix of filepipe's temp names: `.filepipe.<pid>.<n>.tmp`. Short on purpose, so a
/// temp name fits even when the final name is close to NAME_MAX.
const TEMP_PREFIX: &str = ".filepipe.";
const TEMP_SUFFIX: &str = ".tmp";

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

/// An output being written: a 0600 temp file in the final directory. Dropping it without
/// `publish` unlinks it.
#[derive(Debug)]
pub struct TempOutput {
    dir: Arc<Dir>,
    name: OsString,
    file: Option<File>,
    registry_id: u64,
}

impl TempOutput {
    /// Creates a fresh temp file in `dir`.
    pub fn create(dir: Arc<Dir>) -> Result<Self, FileError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = OsString::from(format!("{TEMP_PREFIX}{pid}.{n}{TEMP_SUFFIX}"));
            let flags =
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rfs::openat(&dir.fd, &name, flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => {
                    let registry_id = signals::register_temp(dir.path.join(&name));
                    return Ok(TempOutput {
                        dir,
                        name,
                        file: Some(File::from(fd)),
                        registry_id,
                    });
                }
                // Left by an earlier process with our pid: take the next number.
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

    /// fsyncs the temp and closes it: data, mode and times are all durable before the name can
    /// appear, so a crash never leaves an output a rerun would not recognise. `final_name` is
    /// for messages.
    pub fn sync(mut self, final_name: &OsStr) -> Result<SyncedTemp, FileError> {
        let file = self.file.take().expect("synced once");
        file.sync_all().map_err(|e| {
            let path = self.dir.path.join(final_name);
            FileError::io(&format!("syncing {}", path.display()), &e)
        })?;
        Ok(SyncedTemp(self))
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

    /// Renames the temp to `final_name` (refusing to replace an existing file unless
    /// `replace`) and returns the directory, which the caller must sync before reporting the
    /// output as published: until then the new name may not survive a crash.
    pub fn rename(mut self, final_name: &OsStr, replace: bool) -> Result<Arc<Dir>, FileError> {
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
        Ok(Arc::clone(&temp.dir))
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            drop(self.file.take());
            let _ = rfs::unlinkat(&self.dir.fd, &self.name, AtFlags::empty());
            signals::unregister_temp(self.registry_id);
        }
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

/// True if a temp name was left by a process that no longer runs (a crash or SIGKILL), so it
/// is safe to delete. Temps of live processes (another filepipe on the same tree) are kept.
pub fn is_stale_temp(name: &OsStr) -> bool {
    if !is_temp_name(name) {
        return false;
    }
    let b = name.as_bytes();
    let middle = &b[TEMP_PREFIX.len()..b.len() - TEMP_SUFFIX.len()];
    let pid = middle
        .split(|&c| c == b'.')
        .next()
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(|p| p.parse::<i32>().ok());
    match pid {
        Some(pid) if pid as u32 == std::process::id() => false,
        Some(pid) => match rustix::process::Pid::from_raw(pid) {
            Some(p) => rustix::process::test_kill_process(p) == Err(Errno::SRCH),
            None => true,
        },
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_recognised_and_short() {
        let pid = std::process::id();
        assert!(is_temp_name(OsStr::new(&format!(".filepipe.{pid}.7.tmp"))));
        assert!(!is_temp_name(OsStr::new("filepipe.1.tmp")));
        // Our own temps are never stale; those of a pid that cannot exist are.
        assert!(!is_stale_temp(OsStr::new(&format!(
            ".filepipe.{pid}.7.tmp"
        ))));
        assert!(is_stale_temp(OsStr::new(".filepipe.2147483600.1.tmp")));
        assert!(!is_stale_temp(OsStr::new(".filepipe.x.1.tmp")));
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
