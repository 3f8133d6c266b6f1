//! Opening and reading inputs without blocking and without ever trusting a torn read.
//!
//! Inputs are opened read-only with `O_NONBLOCK` (a FIFO swapped in after the walk cannot block
//! a worker) and `O_NOFOLLOW` unless symlinks are followed, then checked with `fstat` to be
//! regular files; with `O_NOATIME` where the kernel allows it, so reading leaves atime alone.
//! A worker resolves an input's path beneath a descriptor of the root, never following a symlink
//! on the way (`open_beneath`): a directory swapped for a link after the walk cannot lead a read
//! out of the tree.
//! `finish` compares a second `fstat` and the byte count with the first: any difference means
//! the file changed while it was read, and the result must be discarded.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::error::{FileError, Kind};

/// An open regular input file and the `fstat` it was opened with.
#[derive(Debug)]
pub(crate) struct InputFile {
    file: File,
    /// The stat taken right after opening (refreshed by `restart`).
    pub(crate) stat: Stat,
    read: u64,
    /// The access ACL, as read during this attempt's read (`keep_acl`): before `finish`
    /// compares the ctime, which a change of the ACL moves, so the ACL an output takes is the
    /// one the file had with the mode it was opened with. Read after, at the publish, it could
    /// be a new ACL over the old mode (found by a review: a `setfacl -m u:X:r,m::---` made
    /// after the read gave X and the group an output the input never let them read).
    acl: Option<crate::fsio::acl::Acl>,
}

/// Why an input could not be opened as a regular file.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Not a regular file (anymore): skip it, for this reason.
    NotRegular(NotRegular),
    /// A real error.
    Failed(FileError),
}

impl InputFile {
    /// Opens `path` for reading, refusing anything but a regular file: by full path, so only
    /// for tests (every caller opens beneath a root).
    #[cfg(test)]
    pub(crate) fn open(path: &Path, follow_symlinks: bool) -> Result<InputFile, OpenError> {
        Self::open_beneath(None, path, path, follow_symlinks, false)
    }

    /// Opens the input `rel` of the tree under `root` (`abs` is the same file by full path),
    /// refusing anything but a regular file. Without `follow_symlinks`, `rel` is resolved
    /// beneath `root` with no symlink anywhere on it (see `Root`): a directory swapped for a
    /// symlink after the walk listed it cannot lead the read out of the tree, and only `rel`'s
    /// components are looked up, not the root's. With `--follow-symlinks`, links are followed
    /// to what lies beneath `root` only, and nothing outside it is ever looked up
    /// (`Root::follow`). Without a `root` (tests), by full path.
    ///
    /// Where what `rel` leads to was not seen by a walk (links followed, which may have been
    /// pointed elsewhere since; `unvouched`, a cluster job's path, which anyone who may publish
    /// a job names), it is first reached with `O_PATH`, which opens nothing, and opened for
    /// reading only once found to be a regular file (`Root::reopen_regular`): a FIFO's waiting
    /// writer is never let go, a device's driver never asked. Files a walk listed as regular
    /// are opened at once (two system calls fewer), with the walk's word for their type.
    pub(crate) fn open_beneath(
        root: Option<&Root>,
        rel: &Path,
        abs: &Path,
        follow_symlinks: bool,
        unvouched: bool,
    ) -> Result<InputFile, OpenError> {
        let mut flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        if !follow_symlinks {
            flags |= OFlags::NOFOLLOW;
        }
        let beneath = root.filter(|_| !follow_symlinks);
        // Links followed beneath a root: resolved by the kernel, which refuses any step out of
        // it (`RESOLVE_BENEATH`: an absolute link, or `..` above the root, fails with EXDEV)
        // before looking there. Such a link, which may still lead back inside (an absolute
        // path into the tree), and any link where `openat2` is not to be had, are followed one
        // step at a time beneath the root (`Root::follow`).
        let confined = root.filter(|r| follow_symlinks && r.openat2);
        let judge = root.filter(|_| follow_symlinks);
        let refused = std::cell::Cell::new(None);
        let reach = |flags| match (beneath, confined, judge) {
            (Some(root), _, _) => root.open(rel, flags),
            (None, Some(root), _) => {
                match rfs::openat2(&root.fd, rel, flags, Mode::empty(), ResolveFlags::BENEATH) {
                    // A link that steps out (it may come back), or a rename anywhere on the
                    // system during a lookup with `..` (the kernel's EAGAIN): one step at a
                    // time.
                    Err(Errno::XDEV | Errno::AGAIN) => root.follow(rel, flags, &refused),
                    r => r,
                }
            }
            (None, None, Some(root)) => root.follow(rel, flags, &refused),
            (None, None, None) => rfs::open(abs, flags, Mode::empty()),
        };
        // Without /proc (a chroot) nothing can be reopened: opened directly, as a walked file
        // is (`Root::follow` opens the last step with the flags given).
        let first = root.filter(|_| (follow_symlinks || unvouched) && proc_fds());
        let open = |flags: OFlags| match first {
            Some(root) => {
                let place = reach(OFlags::PATH | OFlags::CLOEXEC | (flags & OFlags::NOFOLLOW))?;
                root.reopen_regular(&place, flags, &refused)
            }
            None => reach(flags),
        };
        // O_NOATIME: reading a file to hash or compress it is not a use of it (tmpwatch-style
        // cleanups go by atime), and not dirtying every inode saves work on a first pass. The
        // kernel allows it only to the file's owner (or CAP_FOWNER): anyone else's file is
        // opened again without it.
        let opened = match open(flags | OFlags::NOATIME) {
            Err(Errno::PERM) => open(flags),
            r => r,
        };
        if let Some(what) = refused.get() {
            return Err(OpenError::NotRegular(what));
        }
        let fd = opened.map_err(|e| match (e, beneath) {
            // The file itself, or (beneath the root) a directory on its path.
            (Errno::LOOP | Errno::NOTDIR, Some(root)) => match root.symlink_in(rel) {
                Some(what) => OpenError::NotRegular(what),
                None => OpenError::Failed(FileError::errno("opening input", e)),
            },
            (Errno::LOOP, None) if !follow_symlinks => OpenError::NotRegular(NotRegular::Symlink),
            // A write lease another process holds (`fcntl(F_SETLEASE)`): the open, never
            // blocking, is refused until its holder gives it up. The file is in use, not
            // broken: said so, and a watch tries it again as it tries a file open for writing
            // (found by a review: `io`, "Resource temporarily unavailable").
            (Errno::AGAIN, _) => OpenError::Failed(FileError {
                kind: Kind::InUse,
                errno: Some(e.raw_os_error()),
                message: "opening input: another process holds a lease on it (fcntl F_SETLEASE); \
                          it is taken once the lease is given up"
                    .to_string(),
            }),
            (e, _) => OpenError::Failed(FileError::errno("opening input", e)),
        })?;
        let stat =
            rfs::fstat(&fd).map_err(|e| OpenError::Failed(FileError::errno("stat of input", e)))?;
        let ft = FileType::from_raw_mode(stat.st_mode);
        if ft != FileType::RegularFile {
            return Err(OpenError::NotRegular(NotRegular::Special(ft)));
        }
        Ok(InputFile {
            file: File::from(fd),
            stat,
            read: 0,
            acl: None,
        })
    }

    /// Reads the input's access ACL (`fsio::acl`) for this attempt: to be called before its
    /// read ends (`finish` then holds it to the mode it was opened with).
    pub(crate) fn keep_acl(&mut self) {
        self.acl = Some(crate::fsio::acl::Acl::of(
            &self.file,
            crate::fsio::acl::ACCESS,
        ));
    }

    /// The input's access ACL, as `keep_acl` read it (read now if it was not: a caller that
    /// then compares the ctime again).
    pub(crate) fn acl(&self) -> crate::fsio::acl::Acl {
        match &self.acl {
            Some(acl) => acl.clone(),
            None => crate::fsio::acl::Acl::of(&self.file, crate::fsio::acl::ACCESS),
        }
    }

    /// The input's size when it was opened.
    pub(crate) fn size(&self) -> u64 {
        self.stat.st_size as u64
    }

    /// Rewinds for another attempt after a change was detected, taking a fresh stat.
    pub(crate) fn restart(&mut self) -> Result<(), FileError> {
        self.file
            .rewind()
            .map_err(|e| FileError::io("rewinding input", &e))?;
        self.stat = rfs::fstat(&self.file).map_err(|e| FileError::errno("stat of input", e))?;
        self.read = 0;
        self.acl = None;
        Ok(())
    }

    /// Whether some process has this file open for writing, a shared writable mapping
    /// included (it keeps the file so after its descriptor is closed, and writes through it
    /// change the mtime only at the first write to each clean page, so no stat can tell).
    /// `None` where the kernel will not say: the probe is a read lease, which needs the file's
    /// owner or CAP_LEASE, and a file system that has leases (not NFS).
    #[allow(unsafe_code)]
    pub(crate) fn open_for_writing(&self) -> Option<bool> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this struct owns; F_SETLEASE takes an int argument.
        // The lease is dropped at once: a writer opening the file meanwhile waits microseconds
        // (its break signal, SIGIO, is ignored: see `signals::install`).
        let r = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
        if r == 0 {
            // SAFETY: as above.
            unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
            return Some(false);
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EBUSY) => Some(true),
            _ => None,
        }
    }

    /// Checks that the file is exactly as it was when opened and that all of it was read.
    /// One that holds more than its size says, with nothing changed, is `special-file`: its
    /// size says nothing of its content (`/proc`'s files say 0), and reading it again would
    /// say the same.
    pub(crate) fn finish(&self) -> Result<(), FileError> {
        // The ops read to the size only (no read to see the end of every file): an empty one
        // is looked at for a byte more (found by review r55b: `/proc` files, bind-mounted
        // into a tree, were hashed and compressed as empty).
        let beyond = if self.stat.st_size == 0 && self.read == 0 {
            let mut probe = [0u8; 1];
            (&self.file)
                .read(&mut probe)
                .map_err(|e| FileError::io("reading input", &e))? as u64
        } else {
            0
        };
        let now = rfs::fstat(&self.file).map_err(|e| FileError::errno("stat of input", e))?;
        let before = &self.stat;
        let unchanged = now.st_size == before.st_size
            && now.st_mtime == before.st_mtime
            && now.st_mtime_nsec == before.st_mtime_nsec
            && now.st_ctime == before.st_ctime
            && now.st_ctime_nsec == before.st_ctime_nsec;
        let size = u64::try_from(before.st_size).unwrap_or(0);
        if unchanged && self.read + beyond > size {
            return Err(FileError::new(
                Kind::SpecialFile,
                format!(
                    "it holds more than its size says ({size} bytes), with nothing changed: \
                     its size says nothing of its content (a /proc or /sys file?); not read"
                ),
            ));
        }
        // Less than its size, with nothing changed, is what a `/sys` file gives (each says
        // 4096): on a file system whose sizes are made up, that is the file, not a writer
        // (found by review r55c: three attempts, then `changed-while-read`). Elsewhere a
        // regular file truncated and filled again within one timestamp tick looks the same,
        // and is tried again.
        if unchanged && self.read < size && made_up_sizes(&self.file) {
            return Err(FileError::new(
                Kind::SpecialFile,
                format!(
                    "it holds less than its size says ({} of {size} bytes), with nothing changed, \
                     on a kernel file system (/proc, /sys) whose sizes say nothing of content; \
                     not read",
                    self.read
                ),
            ));
        }
        if unchanged && self.read == size {
            Ok(())
        } else {
            Err(FileError::new(
                Kind::Changed,
                format!(
                    "file changed while being read (size {} -> {}, {} bytes read)",
                    before.st_size, now.st_size, self.read
                ),
            ))
        }
    }
}

/// Whether `file` is on one of the kernel's file systems whose files' sizes say nothing of
/// what a read gives (`/proc`, `/sys`, `debugfs`, `tracefs`, `securityfs`, cgroups, `configfs`,
/// `efivarfs`): asked only of a read that ended short of the size.
fn made_up_sizes(file: &File) -> bool {
    let Ok(st) = rfs::fstatfs(file) else {
        return false;
    };
    // f_type's integer type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let kind = st.f_type as i64 & 0xffff_ffff;
    const KINDS: [i64; 9] = [
        0x9fa0,      // proc
        0x6265_6572, // sysfs
        0x6462_6720, // debugfs
        0x7472_6163, // tracefs
        0x7363_6673, // securityfs
        0x6367_7270, // cgroup2
        0x0027_e0eb, // cgroup
        0x6265_6570, // configfs
        0xde5e_81e4, // efivarfs
    ];
    KINDS.contains(&kind)
}

/// What an input turned out to be instead of a regular file to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotRegular {
    /// A symlink, not followed.
    Symlink,
    /// Reached through a directory that is a symlink, not followed.
    SymlinkOnPath,
    /// With `--follow-symlinks`, what the path leads to now is outside the root: not read.
    OutsideRoot,
    /// Another kind of file: a FIFO, a socket, a device, a directory.
    Special(FileType),
}

impl std::fmt::Display for NotRegular {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotRegular::Symlink => "symlink",
            NotRegular::SymlinkOnPath => "a directory on its path is a symlink",
            NotRegular::OutsideRoot => "a symlink on its path now leads outside the root",
            NotRegular::Special(ft) => describe(*ft),
        })
    }
}

/// One step of a path `Root::follow` has still to take.
enum Step {
    /// Into the entry of that name.
    Name(std::ffi::OsString),
    /// `..`.
    Up,
    /// `/`: back to the top.
    FromTop,
    /// What was reached must be a directory (a trailing `/` or `/.`, which `components` drops).
    Dir,
}

impl Step {
    /// Puts the steps of `path` on `todo`, a stack (the next step last).
    fn push(path: &Path, todo: &mut Vec<Step>) {
        use std::os::unix::ffi::OsStrExt;
        let b = path.as_os_str().as_bytes();
        if b.ends_with(b"/") || b.ends_with(b"/.") || b == b"." {
            todo.push(Step::Dir);
        }
        for c in path.components().rev() {
            match c {
                Component::Normal(n) => todo.push(Step::Name(n.to_owned())),
                Component::ParentDir => todo.push(Step::Up),
                Component::RootDir => todo.push(Step::FromTop),
                Component::CurDir | Component::Prefix(_) => {}
            }
        }
    }
}

/// The root of a tree, open, for reaching paths beneath it without following any symlink and
/// without `..` leading out: with one `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` where the
/// kernel has it, else one component at a time with `O_NOFOLLOW` (Linux before 5.6, and
/// seccomp filters that refuse `openat2`, among them systemd's `RestrictSUIDSGID=`, which the
/// shipped units set).
#[derive(Debug)]
pub(crate) struct Root {
    fd: OwnedFd,
    openat2: bool,
    /// Where the kernel says the root is (`/proc/self/fd`), read once for `follow`; `None`
    /// where /proc cannot say (links are then followed only while they stay beneath it).
    real: Option<PathBuf>,
    /// The root's path as it was named (made absolute), where that differs from `real`: an
    /// absolute link into the tree may be written either way (`Root::follow`).
    given: Option<PathBuf>,
}

/// Whether `/proc/self/fd` is there to reopen a descriptor through (`Root::reopen_regular`).
fn proc_fds() -> bool {
    static THERE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *THERE.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// Where the kernel says the file open at `fd` is.
fn real_path(fd: &OwnedFd) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
}

impl Root {
    /// Opens `root` (`O_PATH`, not followed if it is itself a symlink) and finds out whether
    /// `openat2` works here.
    pub(crate) fn new(root: &Path) -> rustix::io::Result<Root> {
        Self::owning(rfs::open(root, Self::DIR, Mode::empty())?, Some(root))
    }

    /// Opens `root` (`O_PATH`), a canonical path, with no symlink on it (`fsio::canonical`:
    /// one there now was swapped in since the config resolved it), which the user named
    /// `named` (through a symlink, say): an absolute link into the tree may spell it either
    /// way (`follow`).
    pub(crate) fn named(root: &Path, named: &Path) -> rustix::io::Result<Root> {
        Self::owning(crate::fsio::canonical::open(root, Self::DIR)?, Some(named))
    }

    /// A root already open (`fd`, a directory opened without following a symlink, such as a
    /// move directory's), its descriptor duplicated.
    pub(crate) fn of_fd(fd: std::os::fd::BorrowedFd<'_>) -> rustix::io::Result<Root> {
        Self::of_fd_named(fd, None)
    }

    /// `of_fd`, for a root the user named `named` (see `named`).
    pub(crate) fn of_fd_named(
        fd: std::os::fd::BorrowedFd<'_>,
        named: Option<&Path>,
    ) -> rustix::io::Result<Root> {
        Self::owning(rustix::io::fcntl_dupfd_cloexec(fd, 0)?, named)
    }

    /// The root open at `fd` (`O_PATH`), named `named`: finds out whether `openat2` works
    /// here and where the kernel says it is.
    fn owning(fd: OwnedFd, named: Option<&Path>) -> rustix::io::Result<Root> {
        let openat2 = rfs::openat2(&fd, ".", Self::DIR, Mode::empty(), Self::RESOLVE).is_ok();
        let real = real_path(&fd);
        let given = named
            .and_then(|n| std::path::absolute(n).ok())
            .filter(|g| real.as_ref() != Some(g));
        Ok(Root {
            fd,
            openat2,
            real,
            given,
        })
    }

    /// The stat of the root itself.
    pub(crate) fn stat_root(&self) -> rustix::io::Result<Stat> {
        rfs::fstat(&self.fd)
    }

    /// The stat of `rel` itself (a symlink is not followed), reached as `open` reaches it.
    pub(crate) fn lstat(&self, rel: &Path) -> rustix::io::Result<Stat> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        rfs::fstat(self.open(rel, flags)?)
    }

    const DIR: OFlags = OFlags::PATH
        .union(OFlags::DIRECTORY)
        .union(OFlags::CLOEXEC)
        .union(OFlags::NOFOLLOW);
    const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS);

    /// Opens `rel` with `flags` (which must hold `O_NOFOLLOW`).
    pub(crate) fn open(&self, rel: &Path, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        if self.openat2 {
            return rfs::openat2(&self.fd, rel, flags, Mode::empty(), Self::RESOLVE);
        }
        let name = rel.file_name().ok_or(Errno::INVAL)?;
        let dir = self.dir(rel.parent().unwrap_or(Path::new("")))?;
        rfs::openat(dir.as_ref().unwrap_or(&self.fd), name, flags, Mode::empty())
    }

    /// Opens the directory `rel_dir` for reading (and syncing): `""` is the root itself.
    pub(crate) fn open_dir(&self, rel_dir: &Path) -> rustix::io::Result<OwnedFd> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let rel_dir = if rel_dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel_dir
        };
        if self.openat2 {
            return rfs::openat2(&self.fd, rel_dir, flags, Mode::empty(), Self::RESOLVE);
        }
        let dir = self.dir(rel_dir)?;
        rfs::openat(dir.as_ref().unwrap_or(&self.fd), ".", flags, Mode::empty())
    }

    /// `rel_dir` opened `O_PATH`, one component at a time (`None`: the root itself).
    fn dir(&self, rel_dir: &Path) -> rustix::io::Result<Option<OwnedFd>> {
        let mut dir: Option<OwnedFd> = None;
        for c in rel_dir.components() {
            let name = match c {
                Component::Normal(name) => name,
                Component::CurDir => continue,
                // Never in a path relative to the root; refused rather than followed.
                _ => return Err(Errno::XDEV),
            };
            let at = dir.as_ref().unwrap_or(&self.fd);
            dir = Some(rfs::openat(at, name, Self::DIR, Mode::empty())?);
        }
        Ok(dir)
    }

    /// After a refused open of `rel`: which symlink refused it, `rel` itself (`"symlink"`) or a
    /// directory on its path; `None` if neither (not a directory, or it changed meanwhile).
    /// Looks at one component at a time, never through a link.
    pub(crate) fn symlink_in(&self, rel: &Path) -> Option<NotRegular> {
        let is_link = |at: &OwnedFd, name: &std::ffi::OsStr| {
            rfs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
        };
        let mut dir: Option<OwnedFd> = None;
        let mut components = rel.components().peekable();
        while let Some(Component::Normal(name)) = components.next() {
            let at = dir.as_ref().unwrap_or(&self.fd);
            if components.peek().is_none() {
                return is_link(at, name).then_some(NotRegular::Symlink);
            }
            match rfs::openat(at, name, Self::DIR, Mode::empty()) {
                Ok(next) => dir = Some(next),
                Err(_) => return is_link(at, name).then_some(NotRegular::SymlinkOnPath),
            }
        }
        None
    }

    /// Follows `rel` beneath this root, links included, as the kernel resolves a path, but
    /// without ever looking anything up outside the root: each name is looked up from a
    /// directory beneath it with `O_NOFOLLOW`, a link's text is read and taken in its place,
    /// and `..` goes back to the directory this walk came from (its own stack of descriptors,
    /// never the kernel's `..`). A step above the root is followed as text only, against the
    /// path the kernel gives for the root (`real`): `../tree/x` from the root `/srv/tree`
    /// comes back in, as does an absolute link into the root's path (`real`, or `given`, the
    /// spelling the root was named by); any other step out is refused (`refused`, EXDEV)
    /// before anything there is looked at. Why not follow by full path and judge where it led
    /// (as before): the lookups outside told, by failing or not, whether a path outside
    /// exists (a link `../x/../tree/a` was read if `/srv/x` existed and refused if not),
    /// which let whoever names a path (a job, a manifest) probe for files as the user
    /// filepipe runs as.
    ///
    /// `flags` are for the last step: with `O_PATH`, what the path leads to is reached and
    /// nothing is opened; without it (no /proc to reopen through), opened with them.
    fn follow(
        &self,
        rel: &Path,
        flags: OFlags,
        refused: &std::cell::Cell<Option<NotRegular>>,
    ) -> rustix::io::Result<OwnedFd> {
        // The kernel's own limit on links followed in one lookup.
        const MAX_LINKS: usize = 40;
        let out = || {
            refused.set(Some(NotRegular::OutsideRoot));
            Err(Errno::XDEV)
        };
        let mut todo = Vec::new();
        Step::push(rel, &mut todo);
        // Where the walk is: beneath the root (`here`, the directory it is in, `None` at the
        // root itself, and `trail`, the device and inode of each directory entered from the
        // root down to `here`), or, as text only, at a directory above it (`above`, a proper
        // ancestor of `real`). One descriptor held, not one per level: a planted chain of
        // links thousands of directories deep would otherwise hold thousands, and leave the
        // other files none (found by a review).
        let id = |st: &Stat| (st.st_dev, st.st_ino);
        let mut here: Option<OwnedFd> = None;
        let mut trail: Vec<(u64, u64)> = Vec::new();
        let mut above: Option<PathBuf> = None;
        let mut reached: Option<OwnedFd> = None;
        let mut links = 0;
        while let Some(step) = todo.pop() {
            if reached.is_some() {
                // A step on from a file that is no directory (a name, `..`, or a trailing `/`).
                return Err(Errno::NOTDIR);
            }
            match (step, &self.real, above.take()) {
                (Step::Dir, _, at) => above = at,
                (Step::FromTop, Some(real), _) => {
                    (here, trail) = (None, Vec::new());
                    above = real.parent().map(|_| PathBuf::from("/"));
                }
                (Step::Up, Some(_), Some(mut at)) => {
                    at.pop();
                    above = Some(at);
                }
                (Step::Up, real, None) => {
                    if trail.pop().is_none() {
                        match real {
                            Some(real) => above = real.parent().map(Path::to_path_buf),
                            None => return out(),
                        }
                    } else if trail.is_empty() {
                        here = None;
                    } else if let Some(at) = &here {
                        // The kernel's `..` from here, taken only if it is the very directory
                        // this walk came down from: a directory moved meanwhile (out of the
                        // root, say) is not followed up.
                        let up =
                            rfs::openat(at, "..", Self::DIR - OFlags::NOFOLLOW, Mode::empty())?;
                        if Some(id(&rfs::fstat(&up)?)) != trail.last().copied() {
                            return out();
                        }
                        here = Some(up);
                    }
                }
                (Step::Name(name), Some(real), Some(at)) => {
                    let next = at.join(&name);
                    if next == *real {
                        above = None;
                    } else if real.starts_with(&next) {
                        above = Some(next);
                    } else {
                        return out();
                    }
                }
                (Step::Name(name), _, None) => {
                    let at = here.as_ref().unwrap_or(&self.fd);
                    let place = rfs::openat(at, &name, Self::PLACE, Mode::empty())?;
                    let st = rfs::fstat(&place)?;
                    match FileType::from_raw_mode(st.st_mode) {
                        FileType::Symlink => {
                            links += 1;
                            if links > MAX_LINKS {
                                return Err(Errno::LOOP);
                            }
                            use std::os::unix::ffi::OsStringExt;
                            let link = PathBuf::from(std::ffi::OsString::from_vec(
                                rfs::readlinkat(&place, "", Vec::new())?.into_bytes(),
                            ));
                            let given = self.given.as_ref().zip(self.real.as_ref());
                            match given.and_then(|(g, r)| Some(r.join(link.strip_prefix(g).ok()?)))
                            {
                                Some(inside) => Step::push(&inside, &mut todo),
                                None => Step::push(&link, &mut todo),
                            }
                        }
                        FileType::Directory => {
                            trail.push(id(&st));
                            here = Some(place);
                        }
                        _ if flags.contains(OFlags::PATH) => reached = Some(place),
                        // Opened for reading at once (no /proc to reopen through): only a
                        // regular file, never a FIFO (whose waiting writer it would let go).
                        ft if ft != FileType::RegularFile => {
                            refused.set(Some(NotRegular::Special(ft)));
                            return Err(Errno::NXIO);
                        }
                        _ => {
                            reached = Some(rfs::openat(
                                at,
                                &name,
                                flags | OFlags::NOFOLLOW,
                                Mode::empty(),
                            )?)
                        }
                    }
                }
                // No path for the root: a step out cannot be followed even as text.
                (Step::FromTop | Step::Up | Step::Name(_), None, _) => return out(),
            }
        }
        if above.is_some() {
            return out();
        }
        match reached {
            Some(place) => Ok(place),
            None => {
                let at = here.as_ref().unwrap_or(&self.fd);
                rfs::openat(at, ".", flags | OFlags::NOFOLLOW, Mode::empty())
            }
        }
    }

    /// What `rel` leads to, reached `O_PATH` (nothing opened, a FIFO included), links followed
    /// as `follow` follows them: beneath the root only, nothing outside ever looked up;
    /// `EXDEV` for a link that leads out, whether or not anything is there.
    pub(crate) fn reach_following(&self, rel: &Path) -> rustix::io::Result<OwnedFd> {
        let refused = std::cell::Cell::new(None);
        self.follow(rel, OFlags::PATH | OFlags::CLOEXEC, &refused)
    }

    /// How `follow` reaches each name: the thing itself, opened for nothing.
    const PLACE: OFlags = OFlags::PATH.union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

    /// Opens `place` (reached with `O_PATH`) for reading with `flags`, if it is a regular
    /// file, through `/proc/self/fd`, which reopens that very file without looking its path up
    /// again; anything else is said in `refused`, and the open fails (ENXIO), never opened.
    fn reopen_regular(
        &self,
        place: &OwnedFd,
        flags: OFlags,
        refused: &std::cell::Cell<Option<NotRegular>>,
    ) -> rustix::io::Result<OwnedFd> {
        use std::os::fd::AsRawFd;
        match FileType::from_raw_mode(rfs::fstat(place)?.st_mode) {
            FileType::RegularFile => rfs::open(
                format!("/proc/self/fd/{}", place.as_raw_fd()),
                flags - OFlags::NOFOLLOW,
                Mode::empty(),
            ),
            ft => {
                refused.set(Some(match ft {
                    FileType::Symlink => NotRegular::Symlink,
                    ft => NotRegular::Special(ft),
                }));
                Err(Errno::NXIO)
            }
        }
    }

    /// Whether this root resolves with `openat2`.
    #[cfg(test)]
    pub(crate) fn uses_openat2(&self) -> bool {
        self.openat2
    }

    /// A root that resolves one component at a time, as where `openat2` is refused.
    #[cfg(test)]
    pub(crate) fn without_openat2(mut self) -> Root {
        self.openat2 = false;
        self
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Bytes read from inputs by the whole process: the service watchdog's sign that workers are
/// making progress even inside one long file.
pub(crate) static BYTES_READ: AtomicU64 = AtomicU64::new(0);

impl Read for InputFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Checked per buffer, so even a worker deep in a large file stops at once.
        if crate::signals::aborted() {
            return Err(io::Error::other(crate::error::Abandoned));
        }
        // Never past the size the file had when opened (or last restarted): one that grew
        // meanwhile is changed whatever follows (`finish` says so and the read is done again),
        // and reading on to its new end read whatever it grew to, a terabyte of holes made
        // after `--max-size` let it in (found by a review).
        let left = u64::try_from(self.stat.st_size)
            .unwrap_or(0)
            .saturating_sub(self.read);
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if buf.is_empty() {
            return Ok(0);
        }
        if take == 0 {
            // At its size as opened: a byte more, if there is one, is read only to tell
            // `finish` it is not what its size said (a read of 1, not of the rest): a file
            // whose size says nothing of its content (`/proc`, `/sys`) must not pass as
            // empty.
            let mut probe = [0u8; 1];
            let n = self.file.read(&mut probe)?;
            self.read += n as u64;
            return Ok(0);
        }
        let n = self.file.read(&mut buf[..take])?;
        self.read += n as u64;
        BYTES_READ.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A human name for a non-regular file type.
pub(crate) fn describe(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "unknown file type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ACL an output takes is the one read during the read, which `finish` holds to the
    /// mode the file was opened with: an ACL changed after it (`setfacl`, which moves the
    /// ctime) makes the read changed, never a new ACL over the old mode (found by a review).
    #[test]
    fn the_acl_an_output_takes_is_read_with_the_mode_it_goes_with() {
        use crate::fsio::acl::{self, Acl};
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, b"x\n").unwrap();
        let Ok(mut input) = InputFile::open(&path, false) else {
            panic!("cannot open {}", path.display())
        };
        input.keep_acl();
        let mut got = Vec::new();
        input.read_to_end(&mut got).unwrap();
        // user::rw-, user:1700:r--, group::r--, mask::---, other::---
        let narrowed = acl::tests::value(&[
            (1, 6, u32::MAX),
            (2, 4, 1700),
            (4, 4, u32::MAX),
            (0x10, 0, u32::MAX),
            (0x20, 0, u32::MAX),
        ]);
        if rfs::setxattr(&path, acl::ACCESS, &narrowed, rfs::XattrFlags::empty()).is_err() {
            eprintln!("SKIPPED: no ACLs here");
            return;
        }
        assert_eq!(input.acl(), Acl::None, "the ACL read with the mode");
        assert_eq!(input.finish().unwrap_err().kind, Kind::Changed);
        input.restart().unwrap();
        input.keep_acl();
        assert_eq!(input.acl(), Acl::Some(narrowed));
    }

    /// A file that grows while read is read to its size as opened, and one byte more to
    /// tell it grew, never to its new end (a terabyte of holes made after `--max-size` let
    /// it in was read for hours: found by a review); it is then changed.
    #[test]
    fn a_file_is_never_read_past_its_size_as_opened() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, vec![7u8; 5000]).unwrap();
        let Ok(mut input) = InputFile::open(&path, false) else {
            panic!("cannot open {}", path.display())
        };
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let mut got = Vec::new();
        input.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 5000);
        assert_eq!(input.read, 5001);
        assert_eq!(input.finish().unwrap_err().kind, Kind::Changed);
        // Restarted, it is read to its new size, as it is now.
        input.restart().unwrap();
        assert_eq!(input.stat.st_size, 1 << 30);
    }
    /// A file whose size says nothing of its content (`/proc`'s say 0) is not taken for
    /// empty, read to its size as the ops do (`take`): `finish` looks for a byte more, and
    /// says what it is. A file empty as opened that stays so is fine.
    #[test]
    fn a_file_holding_more_than_its_size_says_is_not_taken_for_empty() {
        let Ok(mut input) = InputFile::open(Path::new("/proc/self/status"), false) else {
            eprintln!("SKIPPED: no /proc/self/status");
            return;
        };
        assert_eq!(input.stat.st_size, 0);
        let mut got = Vec::new();
        (&mut input).take(0).read_to_end(&mut got).unwrap();
        let e = input.finish().unwrap_err();
        assert_eq!(e.kind, Kind::SpecialFile, "{}", e.message);
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let input = InputFile::open(&empty, false).unwrap();
        input.finish().unwrap();
    }

    use std::io::Write;

    #[test]
    fn fifo_is_refused_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("p");
        rfs::mknodat(
            rfs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert!(matches!(
            InputFile::open(&fifo, false),
            Err(OpenError::NotRegular(NotRegular::Special(FileType::Fifo)))
        ));
    }

    #[test]
    fn vanished_file_is_a_vanished_error() {
        let tmp = tempfile::tempdir().unwrap();
        match InputFile::open(&tmp.path().join("gone"), false) {
            Err(OpenError::Failed(e)) => assert_eq!(e.kind, Kind::Vanished),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn append_during_read_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, vec![b'a'; 1000]).unwrap();
        let mut input = InputFile::open(&path, false).unwrap();
        let mut buf = vec![0; 4096];
        fill(&mut input, &mut buf).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"more")
            .unwrap();
        assert_eq!(input.finish().unwrap_err().kind, Kind::Changed);
        input.restart().unwrap();
        assert_eq!(fill(&mut input, &mut buf).unwrap(), 1004);
        input.finish().unwrap();
    }

    #[test]
    fn symlink_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("t"), b"x").unwrap();
        std::os::unix::fs::symlink("t", tmp.path().join("l")).unwrap();
        assert!(matches!(
            InputFile::open(&tmp.path().join("l"), false),
            Err(OpenError::NotRegular(NotRegular::Symlink))
        ));
        assert!(InputFile::open(&tmp.path().join("l"), true).is_ok());
    }

    fn read_all(mut input: InputFile) -> Vec<u8> {
        let mut got = Vec::new();
        input.read_to_end(&mut got).unwrap();
        got
    }

    #[test]
    fn beneath_the_root_no_symlink_is_followed_on_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(root.join("d/e/f"), b"inside").unwrap();
        std::fs::write(root.join("plain"), b"not a directory").unwrap();
        std::fs::write(outside.join("f"), b"outside").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(root.join("d/e/f"), root.join("d/l")).unwrap();
        let link = |to: &str, at: &str| std::os::unix::fs::symlink(to, root.join(at)).unwrap();
        link("../root/d/e/f", "back");
        link("../../../root/d/../d/e/f", "d/e/up");
        link("../outside/../root/d/e/f", "probe-there");
        link("../nowhere/../root/d/e/f", "probe-not-there");
        link("..", "parent");
        link("/", "slash");
        link("d/nothing", "dangling");
        link("loop", "loop");
        // Up from two levels down, by the kernel's `..` checked against the way down.
        link("../../d/e/../e/f", "d/e/climb");
        // A trailing slash: only a directory will do, as the kernel has it.
        link("d/e/f/", "slashed");
        std::os::unix::fs::symlink(root.canonicalize().unwrap().join("d/e/f"), root.join("abs"))
            .unwrap();
        let with_openat2 = Root::new(&root).unwrap();
        // Both ways of resolving: openat2, and one component at a time (the fallback, tested
        // everywhere; where openat2 is refused, as under the shipped units' seccomp filter,
        // only the fallback can be).
        let mut roots = vec![Root::new(&root).unwrap().without_openat2()];
        if with_openat2.openat2 {
            roots.push(with_openat2);
        } else {
            eprintln!("SKIPPED (openat2 half): openat2 is refused here; the fallback is tested");
        }
        for r in roots {
            let open = |rel: &str, follow| {
                let (rel, abs) = (Path::new(rel), root.join(rel));
                InputFile::open_beneath(Some(&r), rel, &abs, follow, false)
            };
            assert_eq!(read_all(open("d/e/f", false).unwrap()), b"inside", "{r:?}");
            assert_eq!(read_all(open("plain", false).unwrap()), b"not a directory");
            assert!(
                matches!(
                    open("link/f", false),
                    Err(OpenError::NotRegular(NotRegular::SymlinkOnPath))
                ),
                "{r:?}"
            );
            assert!(
                matches!(
                    open("d/l", false),
                    Err(OpenError::NotRegular(NotRegular::Symlink))
                ),
                "{r:?}"
            );
            // Vanished files and files used as directories are failures, not links.
            for (rel, kind) in [("d/gone", Kind::Vanished), ("plain/x", Kind::Io)] {
                match open(rel, false) {
                    Err(OpenError::Failed(e)) => assert_eq!(e.kind, kind, "{rel} {r:?}"),
                    other => panic!("{rel}: unexpected {other:?}"),
                }
            }
            // --follow-symlinks follows them, by path, within the root only: what was opened
            // is judged, and a file outside is not read.
            assert_eq!(read_all(open("d/l", true).unwrap()), b"inside");
            assert!(
                matches!(
                    open("link/f", true),
                    Err(OpenError::NotRegular(NotRegular::OutsideRoot))
                ),
                "{r:?}"
            );
            // A link that leaves the root and comes back is followed, as text, without a look
            // outside: one through a directory outside is refused whether that exists or not
            // (whether it does was told before: read if it did, refused if not).
            for rel in ["back", "abs", "d/e/up", "d/e/climb"] {
                assert_eq!(read_all(open(rel, true).unwrap()), b"inside", "{rel} {r:?}");
            }
            for rel in ["probe-there", "probe-not-there", "parent/x", "slash"] {
                assert!(
                    matches!(
                        open(rel, true),
                        Err(OpenError::NotRegular(NotRegular::OutsideRoot))
                    ),
                    "{rel} {r:?}: {:?}",
                    open(rel, true)
                );
            }
            assert!(
                matches!(open("slashed", true), Err(OpenError::Failed(_))),
                "{r:?}"
            );
            // A dangling link inside the root is a file that is not there; a loop, a failure.
            match open("dangling", true) {
                Err(OpenError::Failed(e)) => assert_eq!(e.kind, Kind::Vanished, "{r:?}"),
                other => panic!("dangling: unexpected {other:?}"),
            }
            assert!(
                matches!(open("loop", true), Err(OpenError::Failed(_))),
                "{r:?}"
            );
            // The directory of an input, for --remove-source: never through a link either.
            assert!(r.open_dir(Path::new("d/e")).is_ok());
            assert!(r.open_dir(Path::new("")).is_ok());
            assert!(r.open_dir(Path::new("link")).is_err(), "{r:?}");
        }
    }
}
