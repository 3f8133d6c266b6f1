//! The directories filepipe makes for its own roots (`--out`, `--move-source`, `--move-failed`,
//! the state directory) and for the missing ancestors on their way.
//!
//! Invariants: none is ever more open than the input root it serves, not even for a moment:
//! each is made `0700`, then given its owner and its mode through a descriptor opened
//! `O_DIRECTORY | O_NOFOLLOW`, never by path, so a directory put at its path meanwhile is left
//! alone. A directory that exists already is never changed. (Found by a review: made by
//! `create_dir_all` with the umask's `0755`, `--out`, a move directory and the state of a
//! private tree let every user read its outputs, its moved inputs and its names and digests.)

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use rustix::fs::{self as rfs, Mode, OFlags, Stat};
use rustix::io::Errno;
use rustix::process::{Gid, Uid};

/// How a directory filepipe makes for one of its roots is to be: its mode and its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NewDir {
    /// Permissions, sticky and set-group-ID bits, before the umask.
    mode: u32,
    /// Owner and group to give it, where permitted (as root; a user may give a group it is
    /// in); `None`: the process's, who must write there.
    owner: Option<(u32, u32)>,
    /// The group its group bits are meant for: where the directory's group is another (it
    /// could not be given this one, or the roots it serves have different groups), the group
    /// gets no more than others do.
    group: Option<u32>,
}

impl NewDir {
    /// As `cp -a` makes the top directory of a copy of the input root (`root`, its stat): its
    /// permissions, sticky and set-group-ID bits, owner and group; always the owner's `rwx`,
    /// as the directories mirrored beneath (`output::mirrored`): filepipe writes there.
    pub(crate) fn like_input(root: &Stat) -> NewDir {
        NewDir {
            mode: (root.st_mode & 0o3777) | 0o700,
            owner: Some((root.st_uid, root.st_gid)),
            group: Some(root.st_gid),
        }
    }

    /// The input root at `root` as `like_input` takes it.
    pub(crate) fn like_input_at(root: &Path) -> io::Result<NewDir> {
        Ok(NewDir::like_input(&rfs::stat(root)?))
    }

    /// A state directory serving the input roots `roots`: owned by the process, which writes
    /// there, `0700` plus the read and search bits every root grants its group and others (a
    /// `0755` root gives `0755`, a `0700` one `0700`; a `0750` one `0750`, with the root's
    /// group). The state names every file of its trees and their digests: no one who may not
    /// list a tree may read it. A root that cannot be examined grants nothing. (The files in
    /// it, SQLite's, need no mode of their own: the directory keeps them from others.)
    pub(crate) fn state_for<'a>(roots: impl IntoIterator<Item = &'a Path>) -> NewDir {
        let mut grant = 0o055;
        let mut group = None;
        let mut groups_agree = true;
        for root in roots {
            let Ok(st) = rfs::stat(root) else {
                return NewDir::private();
            };
            grant &= st.st_mode & 0o055;
            match group {
                None => group = Some(st.st_gid),
                Some(g) if g != st.st_gid => groups_agree = false,
                Some(_) => {}
            }
        }
        NewDir {
            mode: 0o700 | grant,
            owner: None,
            group: group.filter(|_| groups_agree),
        }
    }

    /// What a missing directory above the one asked for is made as: never given away. Owned
    /// by another user (the tree's), it could be renamed by them and a symlink put in place
    /// of the root beneath it, which the next run follows by its path: outputs and moved
    /// inputs, written as root, would go wherever that user chose (`/etc/profile.d`). So it
    /// stays the process's, with the root's mode and group; where the tree's owner is
    /// another user, the group also gets search, never read, so that owner (in the tree's
    /// group) passes through to the root, the only thing beneath, whose own mode decides the
    /// rest.
    fn above(&self) -> NewDir {
        let Some((uid, _)) = self.owner else {
            return *self;
        };
        let search = if uid == rustix::process::geteuid().as_raw() {
            0
        } else {
            0o010
        };
        NewDir {
            mode: (self.mode & 0o777) | search,
            owner: None,
            group: self.group,
        }
    }

    /// Open to the process's user alone.
    fn private() -> NewDir {
        NewDir {
            mode: 0o700,
            owner: None,
            group: None,
        }
    }

    /// Makes the directory `path` as this says, and whichever of its ancestors are missing as
    /// `above` says (`fs::create_dir_all` otherwise: what exists is passed through, symlinks
    /// followed, and left as it is). With `sync`, each one made is synced into its parent
    /// before the next: a move directory must still be there after a power cut that keeps
    /// what was moved into it.
    pub(crate) fn create_all(&self, path: &Path, sync: bool) -> io::Result<()> {
        let path_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        // The deepest ancestor that exists, and the names below it, deepest first.
        let mut missing: Vec<OsString> = Vec::new();
        let mut at = path;
        let mut fd = loop {
            let here = if at.as_os_str().is_empty() {
                Path::new(".")
            } else {
                at
            };
            match rfs::open(here, path_flags, Mode::empty()) {
                Ok(fd) => break fd,
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
            let (Some(Component::Normal(name)), Some(parent)) =
                (at.components().next_back(), at.parent())
            else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a plain directory name", at.display()),
                ));
            };
            missing.push(name.to_os_string());
            at = parent;
        };
        let umask = umask();
        let above = self.above();
        for (i, name) in missing.iter().enumerate().rev() {
            let how = if i == 0 { self } else { &above };
            let made = match rfs::mkdirat(&fd, name, Mode::RWXU) {
                Ok(()) => true,
                // Made meanwhile (another run): someone else's, left as it is.
                Err(Errno::EXIST) => false,
                Err(e) => return Err(e.into()),
            };
            let next = if made {
                // Read-only, not `O_PATH`: `fchmod` and `fchown` need a real descriptor.
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let dir = rfs::openat(&fd, name, flags, Mode::empty())?;
                how.give(&dir, umask);
                if sync {
                    let parent = rfs::openat(
                        &fd,
                        ".",
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    rfs::fsync(&parent)?;
                }
                dir
            } else {
                rfs::openat(&fd, name, path_flags, Mode::empty())?
            };
            fd = next;
        }
        Ok(())
    }

    /// Gives the directory just made (`dir`, `0700` less the umask) its owner, group and mode.
    /// Only the very directory made here: one put in its place meanwhile (its parent's
    /// owner can) is not owned by this process, and is left as it is. A failure leaves it
    /// closer than asked, never more open.
    fn give(&self, dir: &OwnedFd, umask: u32) {
        let Ok(st) = rfs::fstat(dir) else { return };
        if st.st_uid != rustix::process::geteuid().as_raw() {
            return;
        }
        if let Some((uid, gid)) = self.owner.filter(|&o| o != (st.st_uid, st.st_gid)) {
            let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
            if rfs::fchown(dir, Some(u), Some(g)) == Err(Errno::PERM) {
                // Not root: the group alone, if this user is in it.
                let _ = rfs::fchown(dir, None, Some(g));
            }
        } else if let Some(g) = self.group.filter(|&g| g != st.st_gid) {
            // Its group must be the root's only where that group gets more than others do.
            if self.mode & 0o070 & !((self.mode & 0o007) << 3) != 0 {
                let _ = rfs::fchown(dir, None, Some(Gid::from_raw(g)));
            }
        }
        let Ok(now) = rfs::fstat(dir) else { return };
        // The umask applies, as to every directory filepipe makes (`mkdir` applies it to those
        // mirrored beneath): never more open than the user asked for either.
        let mut bits = self.mode & !(umask & 0o777);
        if self.group != Some(now.st_gid) {
            // Another group than the one meant: it gets what others get, at most.
            bits &= !0o070 | ((bits & 0o007) << 3);
        }
        let _ = rfs::fchmod(dir, Mode::from_raw_mode(bits));
    }
}

/// The process's umask, read without changing it (`umask(2)` can only set it, and another
/// thread could make a file meanwhile); `0` where /proc does not say, which takes the input
/// root's mode as it is, as `cp -a` does.
fn umask() -> u32 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    /// Every directory made takes the root's mode (less the umask), an ancestor without its
    /// sticky bit (the process owns root and tree here); one that exists is left as it is.
    #[test]
    fn made_directories_take_the_roots_mode_and_existing_ones_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("in");
        std::fs::create_dir(&root).unwrap();
        let umask = umask();
        for (mode, name) in [(0o700, "a"), (0o750, "b"), (0o755, "c"), (0o1777, "d")] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode)).unwrap();
            let kept = tmp.path().join(name);
            std::fs::create_dir(&kept).unwrap();
            std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o711)).unwrap();
            let new = NewDir::like_input_at(&root).unwrap();
            new.create_all(&kept.join("x/y"), true).unwrap();
            assert_eq!(mode_of(&kept), 0o711, "{name}: an existing one is kept");
            assert_eq!(mode_of(&kept.join("x")), mode & 0o777 & !umask, "{name}: x");
            assert_eq!(mode_of(&kept.join("x/y")), mode & !umask, "{name}: x/y");
        }
    }

    /// A state directory grants read and search only, and only what every root grants.
    #[test]
    fn a_state_directory_grants_what_every_root_grants_to_read() {
        let tmp = tempfile::tempdir().unwrap();
        let modes = |ms: &[u32]| {
            let roots: Vec<_> = ms
                .iter()
                .enumerate()
                .map(|(i, &m)| {
                    use std::os::unix::fs::PermissionsExt;
                    let r = tmp.path().join(format!("r{i}"));
                    let _ = std::fs::create_dir(&r);
                    std::fs::set_permissions(&r, std::fs::Permissions::from_mode(m)).unwrap();
                    r
                })
                .collect();
            NewDir::state_for(roots.iter().map(|r| r.as_path())).mode
        };
        assert_eq!(modes(&[0o755]), 0o755);
        assert_eq!(modes(&[0o700]), 0o700);
        assert_eq!(modes(&[0o750]), 0o750);
        assert_eq!(modes(&[0o777]), 0o755);
        assert_eq!(modes(&[0o755, 0o750]), 0o750);
        assert_eq!(modes(&[0o755, 0o700]), 0o700);
        assert_eq!(
            NewDir::state_for([tmp.path().join("none").as_path()]),
            NewDir::private()
        );
    }
}
