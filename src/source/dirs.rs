//! The walk's directories, held by descriptor: each opened from its parent's descriptor
//! (`openat`, `O_NOFOLLOW`), listed with `getdents64`, its entries stat'ed and opened by name
//! relative to it. Nothing is ever looked up by full path below the walk's top directory, so a
//! directory swapped for a symlink between its parent's listing and its open fails to open
//! (`ENOTDIR`) instead of leading the walk out of the tree, and the kernel walks one
//! component per lookup however deep the tree.
//!
//! Invariants: at most `budget` directories are held open (besides what a caller opens for a
//! moment); to open one more, the shallowest open directory below the top is read to its end
//! into memory and closed. Coming back to it, it is opened again one level at a time from its
//! nearest open ancestor, `O_NOFOLLOW` (a link the walk followed on the way down is
//! resolved again beneath the root, as it was followed: `Relink`), the shallowest open one closed before each open past the budget (so never more are
//! held, and the levels just above stay open for the walk back up), and each level must be
//! the very directory it was (device and inode): a directory moved or replaced meanwhile is
//! reported, never listed; one that fails to open for another reason (`EMFILE`) is reported
//! as that. The top is never closed.
//! Otherwise a directory is listed one `getdents64` buffer at a time: memory is one buffer's
//! names per open level, plus what was read ahead of the closed ones.

use std::ffi::OsStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FileType, Mode, OFlags, RawDir, ResolveFlags};
use rustix::io::Errno;

/// How the walk opens a directory to list it: no atime games, never through a link.
const LIST: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

/// How the walk opens a directory again (closed for the budget, its listing read to its end
/// already): for its descriptor only, to stat and open its entries by name, so it needs no
/// read permission, which its first open had (a directory made unreadable, still searchable,
/// while the walk is below it keeps the rest of its entries walked, as a walk by path would).
const REOPEN: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

/// `getdents64`'s buffer: glibc's `readdir` uses 32 KiB too, about a thousand entries of a
/// tree of short names in one call.
const GETDENTS_BUF: usize = 32 * 1024;

/// Which directory a descriptor is: what a directory opened again must still be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct DirId {
    dev: u64,
    ino: u64,
}

impl DirId {
    fn of(fd: &OwnedFd) -> Result<DirId, Errno> {
        Ok(DirId::from_stat(&rfs::fstat(fd)?))
    }

    /// The directory `st` is the stat of.
    pub(crate) fn from_stat(st: &rfs::Stat) -> DirId {
        DirId {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }

    /// Its device and inode, as `fsio::own` knows filepipe's own directories.
    pub(crate) fn key(self) -> crate::fsio::own::Id {
        (self.dev, self.ino)
    }
}

/// A directory opened for listing, and which it is.
pub(crate) struct OpenDir {
    fd: OwnedFd,
    id: DirId,
}

impl OpenDir {
    /// `fd` (a directory opened for reading), with its identity.
    fn new(fd: OwnedFd) -> Result<OpenDir, Errno> {
        let id = DirId::of(&fd)?;
        Ok(OpenDir { fd, id })
    }

    /// Which directory it is.
    pub(crate) fn id(&self) -> DirId {
        self.id
    }

    /// A directory the caller resolved to an `O_PATH` descriptor (`RootDir::beneath`), opened
    /// for listing through it: no lookup by name at all.
    pub(crate) fn from_path_fd(fd: &OwnedFd) -> Result<OpenDir, Errno> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        OpenDir::new(rfs::openat(fd, ".", flags, Mode::empty())?)
    }
}

/// The input root, opened `O_PATH` once: the anchor for what the walk resolves from the root
/// rather than from a parent (links it follows or explains, the directory a watcher scans).
pub(crate) struct RootDir {
    fd: OwnedFd,
    /// Whether `openat2` works here (Linux 5.6, and not refused by a seccomp filter).
    openat2: bool,
    /// The root as `input::Root`, for links to follow one step at a time (`follow`): made at
    /// the first, as most trees have none.
    follower: std::sync::OnceLock<Option<crate::fsio::input::Root>>,
}

impl RootDir {
    /// Opens `root` (the canonical root), no symlink followed on its path: one there now was
    /// swapped in since the config resolved it (`fsio::canonical`), and would make the tree
    /// whatever it leads to.
    pub(crate) fn open(root: &Path) -> Result<RootDir, Errno> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = crate::fsio::canonical::open(root, flags)?;
        let openat2 = rfs::openat2(&fd, ".", flags, Mode::empty(), ResolveFlags::BENEATH).is_ok();
        Ok(RootDir {
            fd,
            openat2,
            follower: std::sync::OnceLock::new(),
        })
    }

    /// What `rel` leads to, reached `O_PATH`, links followed beneath the root only and
    /// nothing outside it ever looked up (`input::Root::reach_following`): `EXDEV` for a link
    /// leading out, whether or not anything is there. `named` is the root as the user named
    /// it, for absolute links that spell it so.
    pub(crate) fn follow(&self, named: &Path, rel: &Path) -> Result<OwnedFd, Errno> {
        use std::os::fd::AsFd;
        let follower = self.follower.get_or_init(|| {
            crate::fsio::input::Root::of_fd_named(self.fd.as_fd(), Some(named)).ok()
        });
        match follower {
            Some(root) => root.reach_following(rel),
            None => Err(Errno::MFILE),
        }
    }

    /// Whether links are resolved beneath the root by the kernel (`openat2`).
    pub(crate) fn has_openat2(&self) -> bool {
        self.openat2
    }

    /// `rel` opened `O_PATH` beneath the root: with `follow`, symlinks on the way are followed
    /// as long as they stay beneath it (`RESOLVE_BENEATH`: `..` above the root or an absolute
    /// link fails with `EXDEV`); without, none is (`RESOLVE_NO_SYMLINKS`: `ELOOP`, or a link
    /// as the last component is opened itself, which is no directory to list). Where
    /// `openat2` is not to be had, one component at a time, `O_NOFOLLOW`: no link is followed,
    /// and a link on the way fails as `EXDEV` with `follow` (not known to stay inside).
    pub(crate) fn beneath(&self, rel: &Path, follow: bool) -> Result<OwnedFd, Errno> {
        let flags = OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        if self.openat2 {
            let resolve = if follow {
                ResolveFlags::BENEATH
            } else {
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS
            };
            // O_NOFOLLOW would refuse a followed link as the last component.
            let flags = if follow {
                flags - OFlags::NOFOLLOW
            } else {
                flags
            };
            return rfs::openat2(&self.fd, rel, flags, Mode::empty(), resolve);
        }
        let mut at: Option<OwnedFd> = None;
        for c in rel.components() {
            let name = match c {
                std::path::Component::Normal(name) => name,
                std::path::Component::CurDir => continue,
                _ => return Err(Errno::XDEV),
            };
            let fd = rfs::openat(at.as_ref().unwrap_or(&self.fd), name, flags, Mode::empty())?;
            if FileType::from_raw_mode(rfs::fstat(&fd)?.st_mode) == FileType::Symlink {
                return Err(if follow { Errno::XDEV } else { Errno::LOOP });
            }
            at = Some(fd);
        }
        match at {
            Some(fd) => Ok(fd),
            None => rfs::openat(&self.fd, ".", flags, Mode::empty()),
        }
    }

    /// `rel`, a directory beneath the root, opened for listing (see `beneath`).
    pub(crate) fn list_beneath(&self, rel: &Path, follow: bool) -> Result<OpenDir, Errno> {
        OpenDir::from_path_fd(&self.beneath(rel, follow)?)
    }
}

/// How a level reached through a symlink the walk followed is opened again (`O_PATH`): given
/// its path, resolved as the walk followed it, beneath the root (`RootDir::beneath`), never by
/// following the link from its parent unchecked.
pub(crate) type Relink<'a> = &'a dyn Fn(&Path) -> Result<OwnedFd, Errno>;

/// What `Dirs::next` comes to.
pub(crate) enum Step {
    /// An entry of the deepest directory (`Dirs::name`, `Dirs::dir_fd`), with its type from
    /// `d_type` (`Unknown` where the file system does not fill it in).
    Entry(FileType),
    /// A directory that could not be listed to its end, or opened again: `Dirs::dir_fd` is not
    /// to be used. Reported once; the walk goes on above it.
    Failed {
        path: PathBuf,
        error: Errno,
        why: Failure,
    },
    /// The top directory is walked.
    End,
}

/// Why a directory's walk stopped short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Reading its entries failed.
    Listing,
    /// Closed for the descriptor budget, it could not be opened again as the same directory
    /// (moved, replaced, or swapped for a link meanwhile): its entries not yet walked are not.
    Reopening,
    /// Closed for the budget, opening it again failed for another reason than its being gone
    /// (out of descriptors, denied, an I/O error): its entries not yet walked are not.
    Reopen,
}

/// Why a level could not be opened again, by the error: gone from where it was, or something
/// else there (`ESTALE`: another directory), is a directory moved or replaced; anything else
/// (out of descriptors above all) is said as it is, not as a move.
fn reopen_failure(error: Errno) -> Failure {
    match error {
        Errno::STALE | Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV => {
            Failure::Reopening
        }
        _ => Failure::Reopen,
    }
}

/// Entries of one directory read and not walked yet: one buffer's names, or (a directory
/// closed for the budget) all that was left of it.
#[derive(Default)]
struct Listing {
    names: Vec<u8>,
    /// Start and end of each name in `names`, and its `d_type`.
    entries: Vec<(usize, usize, FileType)>,
    next: usize,
    /// `getdents64` said there is no more.
    end: bool,
    /// Reading on failed (`end` is set): said once the entries read before are walked.
    error: Option<Errno>,
}

impl Listing {
    /// The next entry read, as a range of `names`.
    fn take(&mut self) -> Option<(usize, usize, FileType)> {
        let e = self.entries.get(self.next).copied();
        self.next += usize::from(e.is_some());
        e
    }

    /// Reads one buffer more from `fd` (the entries walked are dropped first), or, with
    /// `to_end`, everything left.
    fn read(&mut self, fd: BorrowedFd<'_>, buf: &mut [MaybeUninit<u8>], to_end: bool) {
        if self.next == self.entries.len() {
            self.names.clear();
            self.entries.clear();
            self.next = 0;
        }
        while !self.end {
            let mut dir = RawDir::new(fd, &mut *buf);
            let mut any = false;
            while let Some(entry) = dir.next() {
                match entry {
                    Ok(e) => {
                        any = true;
                        let name = e.file_name().to_bytes();
                        if name != b"." && name != b".." {
                            let start = self.names.len();
                            self.names.extend_from_slice(name);
                            let end = self.names.len();
                            self.entries.push((start, end, e.file_type()));
                        }
                    }
                    Err(e) => {
                        self.end = true;
                        self.error = Some(e);
                        return;
                    }
                }
                // One getdents64 call's worth: the next entry would read again.
                if dir.is_buffer_empty() {
                    break;
                }
            }
            if !any {
                self.end = true;
            }
            if !to_end {
                return;
            }
        }
    }
}

/// One directory of the walk's current chain.
struct Level {
    /// `None` once closed for the budget (its listing is then read to its end).
    fd: Option<OwnedFd>,
    /// Its path's length: its path is the start of `Dirs::path` (the deepest's), which every
    /// level shares instead of a copy each (a chain's paths would be quadratic in its depth).
    path_len: usize,
    /// Its range in its parent's listing (empty for the top): what it is opened again by.
    name: Vec<u8>,
    id: DirId,
    /// Reached through a symlink the walk followed (`--follow-symlinks`): opened again
    /// through it.
    via_link: bool,
    listing: Listing,
    /// Whether the walk went into one of its subdirectories already (see `Dirs::went_in`).
    went_in: bool,
}

/// The chain of directories from the walk's top to the one being listed.
pub(crate) struct Dirs {
    levels: Vec<Level>,
    /// The deepest level's path: each level's is a prefix of it (`Level::path_len`).
    path: Vec<u8>,
    /// How many levels are open, kept as they open and close (not counted again each time).
    open: usize,
    /// No level below the top and above this one is open: where the shallowest open one is
    /// looked for (so a chain's trimming is not quadratic in its depth either).
    low: usize,
    /// Whether `openat2` works here: a reopen goes down most of the way in one call.
    jump: bool,
    /// The most levels open at once (for the tests).
    #[cfg(test)]
    peak: usize,
    budget: usize,
    buf: Box<[MaybeUninit<u8>]>,
    /// The entry last handed out by `next`: a range of the deepest level's `names`.
    current: (usize, usize),
}

impl Dirs {
    /// A walk of `top` (found at `path`) holding at most `budget` directories open (at least
    /// 3: the top, a directory and the subdirectory being opened from it).
    pub(crate) fn new(top: OpenDir, path: PathBuf, budget: usize) -> Dirs {
        let path = path.into_os_string().into_vec();
        let mut dirs = Dirs {
            levels: Vec::new(),
            path: Vec::new(),
            open: 1,
            low: 1,
            jump: {
                let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
                rfs::openat2(&top.fd, ".", flags, Mode::empty(), ResolveFlags::BENEATH).is_ok()
            },
            #[cfg(test)]
            peak: 1,
            budget: budget.max(3),
            buf: vec![MaybeUninit::uninit(); GETDENTS_BUF].into_boxed_slice(),
            current: (0, 0),
        };
        dirs.levels.push(Level {
            fd: Some(top.fd),
            path_len: path.len(),
            name: Vec::new(),
            id: top.id,
            via_link: false,
            listing: Listing::default(),
            went_in: false,
        });
        dirs.path = path;
        dirs
    }

    /// The next entry of the walk, depth first: the entries of the directory last pushed, then
    /// what is left of its parent's, and so on up to the top.
    pub(crate) fn next(&mut self, relink: Relink<'_>) -> Step {
        loop {
            let Some(level) = self.levels.last_mut() else {
                return Step::End;
            };
            if let Some((start, end, kind)) = level.listing.take() {
                if level.fd.is_none() {
                    if let Err((path, error, why)) = self.reopen(relink) {
                        return Step::Failed { path, error, why };
                    }
                }
                self.current = (start, end);
                return Step::Entry(kind);
            }
            if !level.listing.end {
                let Some(fd) = level.fd.as_ref() else {
                    // Never so: a level is closed only once read to its end.
                    level.listing.end = true;
                    continue;
                };
                level.listing.read(fd.as_fd(), &mut self.buf, false);
                continue;
            }
            if let Some(error) = level.listing.error.take() {
                return Step::Failed {
                    path: self.dir_path().to_path_buf(),
                    error,
                    why: Failure::Listing,
                };
            }
            self.truncate(self.levels.len() - 1);
        }
    }

    /// The entry `next` last handed out.
    pub(crate) fn name(&self) -> &OsStr {
        let (start, end) = self.current;
        let names = self.levels.last().map_or(&[][..], |l| &l.listing.names);
        OsStr::from_bytes(names.get(start..end).unwrap_or_default())
    }

    /// The deepest directory, the entry's: open while its entries are handed out.
    pub(crate) fn dir_fd(&self) -> Option<BorrowedFd<'_>> {
        self.levels.last()?.fd.as_ref().map(AsFd::as_fd)
    }

    /// Which directory the deepest is: the entry's.
    pub(crate) fn dir_id(&self) -> Option<DirId> {
        self.levels.last().map(|l| l.id)
    }

    /// The deepest directory's path (the top's as given, joined with names).
    pub(crate) fn dir_path(&self) -> &Path {
        self.path_of(self.levels.len().saturating_sub(1))
    }

    /// The path of level `k` (of the deepest if there is no such level).
    fn path_of(&self, k: usize) -> &Path {
        let len = self.levels.get(k).map_or(self.path.len(), |l| l.path_len);
        Path::new(OsStr::from_bytes(&self.path[..len]))
    }

    /// Drops the levels from `k` on (their descriptors closed).
    fn truncate(&mut self, k: usize) {
        for level in self.levels.drain(k..) {
            self.open -= usize::from(level.fd.is_some());
        }
        let len = self.levels.last().map_or(0, |l| l.path_len);
        self.path.truncate(len);
        self.low = self.low.min(self.levels.len()).max(1);
    }

    /// `fd` as level `k`'s descriptor.
    fn set_open(&mut self, k: usize, fd: OwnedFd) {
        if self.levels[k].fd.replace(fd).is_none() {
            self.open += 1;
        }
        self.low = self.low.min(k).max(1);
        #[cfg(test)]
        {
            self.peak = self.peak.max(self.open);
        }
    }

    /// Closes the shallowest open level below the top and above level `keep` after reading it
    /// to its end; false if there is none.
    fn close_shallowest(&mut self, keep: usize) -> bool {
        let mut k = self.low.max(1);
        while k < keep.min(self.levels.len()) {
            let level = &mut self.levels[k];
            if let Some(fd) = level.fd.take() {
                level.listing.read(fd.as_fd(), &mut self.buf, true);
                self.open -= 1;
                self.low = k + 1;
                return true;
            }
            k += 1;
        }
        self.low = self.low.max(k.min(keep)).max(1);
        false
    }

    /// Whether the walk went into a subdirectory of the deepest directory already; set it.
    pub(crate) fn went_in(&mut self) -> Option<&mut bool> {
        self.levels.last_mut().map(|l| &mut l.went_in)
    }

    /// The path of the directory of the chain that is `id`, if one is (a link followed back
    /// to a directory it is in).
    pub(crate) fn ancestor(&self, id: DirId) -> Option<&Path> {
        let k = self.levels.iter().position(|l| l.id == id)?;
        Some(self.path_of(k))
    }

    /// The entry, a directory, opened from the deepest directory's descriptor, never through
    /// a link: `ENOTDIR` if it is one now (or anything but a directory).
    pub(crate) fn open_child(&mut self) -> Result<OpenDir, Errno> {
        self.make_room();
        let fd = self.dir_fd().ok_or(Errno::BADF)?;
        OpenDir::new(rfs::openat(fd, self.name(), LIST, Mode::empty())?)
    }

    /// Makes room for one more directory: closes the shallowest open one below the top, not
    /// the deepest (whose entry is being opened), after reading it to its end.
    pub(crate) fn make_room(&mut self) {
        if self.open >= self.budget {
            self.close_shallowest(self.levels.len().saturating_sub(1));
        }
    }

    /// Goes into `dir`, the entry `next` last handed out, found at `path` (`via_link`: by
    /// following a symlink): its entries come next.
    pub(crate) fn push(&mut self, dir: OpenDir, path: PathBuf, via_link: bool) {
        self.make_room();
        let name = self.name().as_bytes().to_vec();
        let path = path.into_os_string().into_vec();
        debug_assert!(path.starts_with(&self.path));
        self.path = path;
        self.levels.push(Level {
            fd: None,
            path_len: self.path.len(),
            name,
            id: dir.id,
            via_link,
            listing: Listing::default(),
            went_in: false,
        });
        self.set_open(self.levels.len() - 1, dir.fd);
    }

    /// Opens the deepest directory again (closed for the budget), one level at a time from
    /// its nearest open ancestor, each checked to be the directory it was. Never more than the
    /// budget open on the way: before each level is opened the shallowest open one (not the
    /// top, nor the parent it is opened from) is closed if need be, so the levels just above
    /// the deepest stay open, and the walk coming back up finds them so. On failure the levels
    /// from the first that is not are dropped, and its path is returned with why.
    fn reopen(&mut self, relink: Relink<'_>) -> Result<(), (PathBuf, Errno, Failure)> {
        let deepest = self.levels.len() - 1;
        let from = (self.levels.iter().rposition(|l| l.fd.is_some())).unwrap_or(0);
        let mut start = from + 1;
        // Down to a few levels above the deepest in one openat2 by the names between, beneath
        // the open ancestor and through no link (what a level at a time would each have
        // checked, but in one call: coming back up a chain of D levels otherwise costs D²/budget
        // system calls); the level reached must be the one it was. The last few are opened a
        // level at a time, each kept open for the way back up.
        let j = deepest
            .saturating_sub(self.budget.saturating_sub(3))
            .max(start);
        let linked = self.levels[start..=j].iter().any(|l| l.via_link);
        if self.jump && j > start && !linked {
            while self.open >= self.budget && self.close_shallowest(from) {}
            let first = &self.levels[start];
            let names = &self.path[first.path_len - first.name.len()..self.levels[j].path_len];
            let resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            let opened = match self.levels[from].fd.as_ref() {
                Some(at) => {
                    rfs::openat2(at, OsStr::from_bytes(names), REOPEN, Mode::empty(), resolve)
                        .and_then(OpenDir::new)
                }
                None => Err(Errno::BADF),
            };
            match opened {
                Ok(dir) if dir.id == self.levels[j].id => {
                    self.set_open(j, dir.fd);
                    start = j + 1;
                }
                // Not reached, or not the directory it was (a rename anywhere meanwhile makes
                // openat2 say EAGAIN): a level at a time, which finds the level that moved and
                // reports that one.
                _ => {}
            }
        }
        for k in start..=deepest {
            while self.open >= self.budget && self.close_shallowest(k - 1) {}
            let (above, below) = self.levels.split_at(k);
            let level = &below[0];
            let opened = match above.last().and_then(|l| l.fd.as_ref()) {
                Some(parent) => {
                    let name = OsStr::from_bytes(&level.name);
                    if level.via_link {
                        let path = Path::new(OsStr::from_bytes(&self.path[..level.path_len]));
                        relink(path).and_then(OpenDir::new)
                    } else {
                        rfs::openat(parent, name, REOPEN, Mode::empty()).and_then(OpenDir::new)
                    }
                }
                None => Err(Errno::BADF),
            };
            match opened {
                Ok(dir) if dir.id == level.id => self.set_open(k, dir.fd),
                Ok(_) | Err(_) => {
                    let error = opened.err().unwrap_or(Errno::STALE);
                    let why = reopen_failure(error);
                    let path = self.path_of(k).to_path_buf();
                    self.truncate(k);
                    return Err((path, error, why));
                }
            }
        }
        Ok(())
    }

    /// How many directories are open (for the tests).
    #[cfg(test)]
    fn open_count(&self) -> usize {
        let open = self.levels.iter().filter(|l| l.fd.is_some()).count();
        assert_eq!(open, self.open, "the count kept");
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks `root` with `budget`, going into every directory; the files found (by path) and
    /// the failures, checking the budget at every step.
    fn walk(
        root: &Path,
        budget: usize,
        mut at_each: impl FnMut(&mut Dirs),
    ) -> (Vec<PathBuf>, Vec<(PathBuf, Failure)>) {
        let top = RootDir::open(root)
            .unwrap()
            .list_beneath(Path::new(""), false)
            .unwrap();
        let mut dirs = Dirs::new(top, root.to_path_buf(), budget);
        let (mut files, mut failed) = (Vec::new(), Vec::new());
        loop {
            assert!(dirs.open_count() <= budget.max(3));
            match dirs.next(&|_: &Path| panic!("no link followed")) {
                Step::End => break,
                Step::Failed { path, why, .. } => failed.push((path, why)),
                Step::Entry(FileType::Directory) => {
                    let path = dirs.dir_path().join(dirs.name());
                    let dir = dirs.open_child().unwrap();
                    dirs.push(dir, path, false);
                    at_each(&mut dirs);
                }
                Step::Entry(_) => files.push(dirs.dir_path().join(dirs.name())),
            }
        }
        files.sort();
        assert!(dirs.peak <= budget.max(3), "{} open at once", dirs.peak);
        (files, failed)
    }

    /// A chain of `levels` directories in `parent`, each with a file created before its
    /// subdirectory and one after (`a…` and `z…`, so a listing in name order has one on each
    /// side too): whatever the file system's order, some are listed after the subdirectory.
    fn chain(parent: Option<&Path>, levels: usize) -> (tempfile::TempDir, Vec<PathBuf>) {
        let tmp = match parent {
            Some(p) => tempfile::tempdir_in(p).unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        let mut dir = tmp.path().to_path_buf();
        let mut want = Vec::new();
        for level in 0..levels {
            let a = dir.join(format!("a{level}"));
            std::fs::write(&a, b"x").unwrap();
            dir.push("d");
            std::fs::create_dir(&dir).unwrap();
            let z = a.with_file_name(format!("z{level}"));
            std::fs::write(&z, b"x").unwrap();
            want.extend([a, z]);
        }
        want.sort();
        (tmp, want)
    }

    /// Coming back up a chain far deeper than the budget, a level closed is opened again from
    /// the nearest open ancestor (the top) down: within the budget all the way (it held every
    /// level for a moment, which under a low open-file limit failed, losing files). On tmpfs
    /// too, whose listings put the file created last first.
    /// A directory reached through a followed link, closed for the budget, is opened again by
    /// resolving the link beneath the root as it was followed, never through the link from its
    /// parent: a link repointed outside meanwhile is refused on the way (`EXDEV`), the outside
    /// directory never opened (it was, and then found not to be the one walked: `ESTALE`).
    #[test]
    fn a_followed_link_is_reopened_beneath_the_root_not_through_the_link() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let (root, x) = (tmp.path(), tmp.path().join("x"));
        std::fs::create_dir_all(root.join("real/d1/d2/d3")).unwrap();
        std::fs::create_dir_all(outside.path().join("d1/d2/d3")).unwrap();
        std::fs::create_dir(&x).unwrap();
        for i in 0..50 {
            std::fs::write(root.join(format!("real/a{i}")), b"x").unwrap();
            std::fs::write(root.join(format!("real/z{i}")), b"x").unwrap();
        }
        let link = x.join("link");
        std::os::unix::fs::symlink("../real", &link).unwrap();
        let rootdir = RootDir::open(root).unwrap();
        if !rootdir.has_openat2() {
            eprintln!("SKIPPED: no openat2 (links are not followed without it)");
            return;
        }
        let relink = |p: &Path| rootdir.beneath(p.strip_prefix(root).unwrap(), true);
        let top = rootdir.list_beneath(Path::new(""), false).unwrap();
        let mut dirs = Dirs::new(top, root.to_path_buf(), 3);
        let (mut failed, mut swapped) = (Vec::new(), false);
        loop {
            match dirs.next(&relink) {
                Step::End => break,
                Step::Failed { path, error, why } => failed.push((path, error, why)),
                Step::Entry(FileType::Symlink) => {
                    let path = dirs.dir_path().join(dirs.name());
                    let fd = rootdir.beneath(path.strip_prefix(root).unwrap(), true);
                    let dir = OpenDir::from_path_fd(&fd.unwrap()).unwrap();
                    dirs.push(dir, path, true);
                }
                Step::Entry(FileType::Directory) => {
                    let path = dirs.dir_path().join(dirs.name());
                    if path.starts_with(root.join("real")) {
                        continue;
                    }
                    let dir = dirs.open_child().unwrap();
                    dirs.push(dir, path, false);
                    if dirs.dir_path().ends_with("d3") {
                        let at = dirs.levels.iter().position(|l| l.via_link).unwrap();
                        let l = &dirs.levels[at];
                        assert!(l.fd.is_none(), "the link's level still open");
                        if l.listing.next == l.listing.entries.len() {
                            eprintln!("d1 came last in the link's listing: nothing to reopen");
                            return;
                        }
                        std::fs::remove_file(&link).unwrap();
                        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
                        swapped = true;
                    }
                }
                Step::Entry(_) => {}
            }
        }
        assert!(swapped);
        assert_eq!(failed, [(link, Errno::XDEV, Failure::Reopening)]);
    }

    /// A level far above the deepest replaced meanwhile: a reopen going down in one call
    /// (openat2) does not reach the directory it was, goes a level at a time instead, and the
    /// replaced level is reported, once, not each level below it one after another.
    #[test]
    fn a_level_replaced_above_a_reopen_in_one_call_is_reported_once() {
        let shm = Path::new("/dev/shm");
        for parent in [None, Some(shm).filter(|p| p.is_dir())] {
            let (tmp, _) = chain(parent, 40);
            let replaced = tmp.path().join("d/d/d/d/d/d/d/d/d/d");
            let mut swapped = false;
            let (_, failed) = walk(tmp.path(), 6, |dirs| {
                if !swapped && dirs.levels.len() == 31 {
                    std::fs::rename(&replaced, tmp.path().join("aside")).unwrap();
                    std::fs::create_dir(&replaced).unwrap();
                    swapped = true;
                }
            });
            assert!(swapped);
            assert_eq!(
                failed,
                [(replaced.clone(), Failure::Reopening)],
                "{parent:?}"
            );
        }
    }

    #[test]
    fn out_of_descriptors_is_not_a_directory_moved() {
        for e in [
            Errno::MFILE,
            Errno::NFILE,
            Errno::ACCESS,
            Errno::IO,
            Errno::NOMEM,
        ] {
            assert_eq!(reopen_failure(e), Failure::Reopen, "{e:?}");
        }
        for e in [Errno::STALE, Errno::NOENT, Errno::NOTDIR, Errno::LOOP] {
            assert_eq!(reopen_failure(e), Failure::Reopening, "{e:?}");
        }
    }

    #[test]
    fn a_reopen_down_a_deep_chain_holds_no_more_than_the_budget() {
        let shm = Path::new("/dev/shm");
        for parent in [None, Some(shm).filter(|p| p.is_dir())] {
            let (tmp, want) = chain(parent, 300);
            for budget in [3, 6, 16] {
                let (files, failed) = walk(tmp.path(), budget, |_| {});
                assert_eq!(files.len(), want.len(), "{parent:?}, budget {budget}");
                assert_eq!(files, want, "{parent:?}, budget {budget}");
                assert!(failed.is_empty(), "{failed:?}");
            }
        }
    }

    #[test]
    fn a_chain_deeper_than_the_budget_is_walked_whole_within_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dir = tmp.path().to_path_buf();
        let mut want = Vec::new();
        for level in 0..40 {
            for name in ["a", "z"] {
                let f = dir.join(format!("{name}{level}"));
                std::fs::write(&f, b"x").unwrap();
                want.push(f);
            }
            dir.push("d");
            std::fs::create_dir(&dir).unwrap();
        }
        want.sort();
        for budget in [3, 4, 16] {
            let (files, failed) = walk(tmp.path(), budget, |_| {});
            assert_eq!(files, want, "budget {budget}");
            assert!(failed.is_empty(), "{failed:?}");
        }
    }

    #[test]
    fn a_directory_closed_for_the_budget_and_replaced_meanwhile_is_reported_not_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let x = tmp.path().join("x");
        std::fs::create_dir(&x).unwrap();
        // Files on both sides of the chain, whatever order the listing has them in.
        for i in 0..100 {
            std::fs::write(x.join(format!("before{i}")), b"x").unwrap();
        }
        std::fs::create_dir_all(x.join("d1/d2/d3")).unwrap();
        for i in 0..100 {
            std::fs::write(x.join(format!("after{i}")), b"x").unwrap();
        }
        let mut swapped = false;
        let (files, failed) = walk(tmp.path(), 3, |dirs| {
            if dirs.dir_path().ends_with("d3") {
                // x is closed (its entries left are in memory): replaced by a directory with
                // the same names, which is not the one the walk was in.
                let x_level = &dirs.levels[1];
                assert!(x_level.fd.is_none());
                assert!(
                    x_level.listing.next < x_level.listing.entries.len(),
                    "d1 came last in x's listing: nothing left to check"
                );
                std::fs::rename(&x, tmp.path().join("x-aside")).unwrap();
                std::fs::create_dir(&x).unwrap();
                std::fs::write(x.join("NOT-THE-WALKS"), b"x").unwrap();
                swapped = true;
            }
        });
        assert!(swapped);
        assert_eq!(failed, [(x.clone(), Failure::Reopening)]);
        assert!(
            files.iter().all(|f| !f.ends_with("NOT-THE-WALKS")),
            "{files:?}"
        );
        assert!(files.len() < 200, "{} files", files.len());
    }
}
