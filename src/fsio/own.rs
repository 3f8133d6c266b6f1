//! filepipe's own directories and files known by identity, not only by path: what a walk or a
//! watcher must never take as an input, whichever path leads to it.
//!
//! By path, the state directory, an output root, a move directory, the manifests and the
//! failure log are left out where the tree names them (`walk::is_own`). But a bind mount in the
//! tree (or a symlink followed with `--follow-symlinks`) reaches the same directory by another
//! path: through one, a state directory outside the tree was walked, its database hashed while
//! it was being written and a `.gz` of it written into it, and a manifest's directory mounted
//! in the tree listed the previous manifest in the next (found by a review). A bind mount
//! shows the very directory, with its device and inode, so those are what is compared. (A FUSE
//! view, `bindfs`, has its own device and inodes: it is not recognised here; the checks at
//! start judge FUSE views of the tree by the mount table, `aside::overlap_at`.)

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use rustix::fs::{self as rfs, Mode, OFlags};

/// A directory's or a file's device and inode.
pub(crate) type Id = (u64, u64);

/// What one run (or one pipeline of a service) keeps as its own, by path: directories, files
/// replaced at each write (the manifests), and files that stay the same file while it runs
/// (the failure log, the state's database and lock).
#[derive(Debug, Default)]
pub(crate) struct OwnPaths {
    pub(crate) dirs: Vec<PathBuf>,
    pub(crate) replaced: Vec<PathBuf>,
    pub(crate) lasting: Vec<PathBuf>,
}

/// filepipe's own directories and files, each looked up once (when the walk or the watcher
/// first asks): one made again since (a manifest replaced by its next version, say) is still
/// known by its directory and name.
#[derive(Debug, Default)]
pub(crate) struct OwnIds {
    /// The state, output and move directories: left out whole.
    dirs: Vec<Id>,
    /// The manifests, the failure log and the state's files, by the directory they are in
    /// and their name: what a bind mount of that directory shows. Each by the path given and,
    /// where that leads through a symlink, by where it leads (a failure log named through a
    /// link is written where the link leads: found by a review).
    named: Vec<(Id, OsString)>,
    /// The files that stay the same file while filepipe runs, as they are now: for a symlink
    /// followed straight to one, and a hard link to one. (Not the manifests: the one there
    /// now is replaced at the end of the run, and a hard link a user keeps to it is theirs.)
    files: Vec<Id>,
}

impl OwnIds {
    /// The identities of what `paths` name, those that exist now: one that does not cannot
    /// be reached by another path either.
    pub(crate) fn of(paths: &OwnPaths) -> OwnIds {
        let mut own = OwnIds::default();
        own.add(paths);
        own
    }

    /// Adds the identities of what `paths` name.
    pub(crate) fn add(&mut self, paths: &OwnPaths) {
        for dir in &paths.dirs {
            if let Some(id) = id_of(dir, true) {
                self.dirs.push(id);
            }
        }
        for (file, lasting) in (paths.replaced.iter().map(|f| (f, false)))
            .chain(paths.lasting.iter().map(|f| (f, true)))
        {
            let real = std::fs::canonicalize(file).ok();
            for path in std::iter::once(file.as_path()).chain(real.as_deref()) {
                let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                    continue;
                };
                if let Some(id) = id_of(parent, true) {
                    if !self.is_named(id, name) {
                        self.named.push((id, name.to_owned()));
                    }
                }
            }
            if lasting {
                if let Some(id) = id_of(file, true) {
                    self.files.push(id);
                }
            }
        }
    }

    /// Whether the directory `id` is one of filepipe's own.
    pub(crate) fn is_dir(&self, id: Id) -> bool {
        self.dirs.contains(&id)
    }

    /// Whether `name` in the directory `dir` is one of filepipe's own files.
    pub(crate) fn is_named(&self, dir: Id, name: &OsStr) -> bool {
        self.named.iter().any(|(d, n)| *d == dir && n == name)
    }

    /// Whether `name` is the name of one of filepipe's own files in some directory.
    fn has_name(&self, name: &OsStr) -> bool {
        self.named.iter().any(|(_, n)| n == name)
    }

    /// Whether `path` names one of filepipe's own files by its directory and name, whatever
    /// path leads to that directory: its directory is looked up only if the name is one of
    /// theirs.
    pub(crate) fn is_named_at(&self, path: &Path) -> bool {
        path.file_name().is_some_and(|name| {
            self.has_name(name) && parent_id(path).is_some_and(|d| self.is_named(d, name))
        })
    }

    /// Whether the file `id` is one of filepipe's own that stay the same file (as it was when
    /// looked up).
    pub(crate) fn is_file(&self, id: Id) -> bool {
        self.files.contains(&id)
    }

    /// Whether the file open at `fd` (`O_PATH`, stat'ed as `st`), reached by following a
    /// symlink, is one of filepipe's own: the very file as it was looked up, or one by its
    /// name in an own file's directory (where the kernel says the descriptor is: a database
    /// made since the lookup, SQLite's `-wal` beside it).
    pub(crate) fn is_followed_file(&self, fd: &OwnedFd, st: &rfs::Stat) -> bool {
        if self.is_file((st.st_dev, st.st_ino)) {
            return true;
        }
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .is_ok_and(|path| self.is_named_at(&path))
    }
}

/// Every pipeline's own directories and files in a service, for each pipeline to leave out
/// too (found by a review: a bind mount in one pipeline's tree of another's move directory
/// had the first compress the second's moved inputs and move them away). Replaced whole when
/// the pipelines running change (a reload), and read by every pipeline's walk and watcher.
#[derive(Debug, Default)]
pub(crate) struct Shared(RwLock<OwnIds>);

impl Shared {
    /// The identities of what `paths` name, for every pipeline from now on.
    pub(crate) fn set(&self, paths: impl IntoIterator<Item = OwnPaths>) {
        let mut own = OwnIds::default();
        for p in paths {
            own.add(&p);
        }
        // A poisoned lock held what a panicking reader saw: replaced all the same.
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = own;
    }

    /// What `ask` says of every pipeline's own, now: under the read lock, nothing copied (it
    /// is asked for every entry a walk meets).
    pub(crate) fn ask(&self, ask: impl Fn(&OwnIds) -> bool) -> bool {
        ask(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The device and inode of what `path` names, following a symlink at its end or not; `None`
/// if it cannot be looked up. `O_PATH`: nothing is opened for reading, a FIFO included.
fn id_of(path: &Path, follow: bool) -> Option<Id> {
    let mut flags = OFlags::PATH | OFlags::CLOEXEC;
    if !follow {
        flags |= OFlags::NOFOLLOW;
    }
    let fd = rfs::open(path, flags, Mode::empty()).ok()?;
    let st = rfs::fstat(&fd).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// The device and inode of the directory `path` is in (following links on the way), if it
/// can be looked up.
fn parent_id(path: &Path) -> Option<Id> {
    id_of(path.parent()?, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_and_files_are_known_by_identity_and_files_also_by_their_directory_and_name() {
        let tmp = tempfile::tempdir().unwrap();
        let (st, sums) = (tmp.path().join("st"), tmp.path().join("sums"));
        std::fs::create_dir(&st).unwrap();
        std::fs::create_dir(&sums).unwrap();
        std::fs::write(sums.join("SUMS"), "x").unwrap();
        let manifest = sums.join("SUMS");
        let missing = tmp.path().join("gone/LOG");
        let own = OwnIds::of(&OwnPaths {
            dirs: vec![st.clone()],
            replaced: vec![manifest.clone(), missing],
            lasting: Vec::new(),
        });
        let id = |p: &Path| id_of(p, true).unwrap();
        assert!(own.is_dir(id(&st)));
        assert!(!own.is_dir(id(&sums)));
        assert!(own.is_named(id(&sums), OsStr::new("SUMS")));
        assert!(!own.is_named(id(&st), OsStr::new("SUMS")));
        assert!(own.has_name(OsStr::new("SUMS")) && !own.has_name(OsStr::new("LOG")));
        // A manifest is replaced at each write: known by its directory and name only.
        assert!(!own.is_file(id(&manifest)));
        assert_eq!(parent_id(&manifest), Some(id(&sums)));
    }
}
