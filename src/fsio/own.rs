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
use std::path::Path;

use rustix::fs::{self as rfs, Mode, OFlags};

/// A directory's or a file's device and inode.
pub(crate) type Id = (u64, u64);

/// filepipe's own directories and files, each looked up once (when the walk or the watcher
/// first asks): one made again since (a manifest replaced by its next version, say) is still
/// known by its directory and name.
#[derive(Debug, Default)]
pub(crate) struct OwnIds {
    /// The state, output and move directories: left out whole.
    dirs: Vec<Id>,
    /// The manifests, the failure log and the state's files, by the directory they are in
    /// and their name: what a bind mount of that directory shows.
    named: Vec<(Id, OsString)>,
    /// The same files as they are now, for a symlink followed straight to one.
    files: Vec<Id>,
}

impl OwnIds {
    /// The identities of `dirs` and of `files` (and of each file's directory), those that
    /// exist now: one that does not cannot be reached by another path either.
    pub(crate) fn of<'p>(
        dirs: impl IntoIterator<Item = &'p Path>,
        files: impl IntoIterator<Item = &'p Path>,
    ) -> OwnIds {
        let mut own = OwnIds::default();
        for dir in dirs {
            if let Some(id) = id_of(dir, true) {
                own.dirs.push(id);
            }
        }
        for file in files {
            let (Some(parent), Some(name)) = (file.parent(), file.file_name()) else {
                continue;
            };
            if let Some(id) = id_of(parent, true) {
                own.named.push((id, name.to_owned()));
            }
            if let Some(id) = id_of(file, false) {
                own.files.push(id);
            }
        }
        own
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

    /// Whether the file `id` is one of filepipe's own (as it was when looked up).
    pub(crate) fn is_file(&self, id: Id) -> bool {
        self.files.contains(&id)
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

/// Whether the file open at `fd` (`O_PATH`, stat'ed as `st`), reached by following a
/// symlink, is one of filepipe's own: the very file as it was looked up, or one by its name in
/// an own file's directory (where the kernel says the descriptor is: a database made since
/// the lookup, SQLite's `-wal` beside it).
pub(crate) fn is_own_file(own: &OwnIds, fd: &OwnedFd, st: &rfs::Stat) -> bool {
    if own.is_file((st.st_dev, st.st_ino)) {
        return true;
    }
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|path| own.is_named_at(&path))
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
        let own = OwnIds::of([st.as_path()], [manifest.as_path(), missing.as_path()]);
        let id = |p: &Path| id_of(p, true).unwrap();
        assert!(own.is_dir(id(&st)));
        assert!(!own.is_dir(id(&sums)));
        assert!(own.is_named(id(&sums), OsStr::new("SUMS")));
        assert!(!own.is_named(id(&st), OsStr::new("SUMS")));
        assert!(own.has_name(OsStr::new("SUMS")) && !own.has_name(OsStr::new("LOG")));
        assert!(own.is_file(id(&manifest)));
        assert_eq!(parent_id(&manifest), Some(id(&sums)));
    }
}
