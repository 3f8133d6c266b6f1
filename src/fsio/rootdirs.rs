//! The directories filepipe makes for its own roots (`--out`, `--move-source`, `--move-failed`,
//! the state directory) and for the missing ancestors on their way.
//!
//! Invariants: none is ever more open than the input root it serves, not even for a moment:
//! each is made `0700`, then given its group and mode through a descriptor opened
//! `O_DIRECTORY | O_NOFOLLOW`, never by path, so a directory put at its path meanwhile is left
//! alone. None is given away: each stays the process's, so no other user may rename what
//! filepipe reaches by path at its next run. A directory that exists already is never
//! changed. (Found by a review: made by `create_dir_all` with the umask's `0755`, `--out`, a
//! move directory and the state of a private tree let every user read its outputs, its moved
//! inputs and its names and digests.)

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{self as rfs, Mode, OFlags, Stat};
use rustix::io::Errno;
use rustix::process::Gid;

/// How a directory filepipe makes for one of its roots is to be: its mode, its group and who
/// else may reach it. Its owner is always the process, which writes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NewDir {
    /// Permissions, sticky and set-group-ID bits, before the umask.
    mode: u32,
    /// The group its group bits are meant for: where the directory's group is another (it
    /// could not be given this one, or the roots it serves have different groups), the group
    /// gets no more than others do.
    group: Option<u32>,
    /// The tree's owner, and what it is granted (`r-x` or `--x`, as other-class bits) where
    /// the mode does not grant it already: by an ACL entry, the one way to name a user who
    /// does not own the directory.
    tree_owner: Option<(u32, u32)>,
}

impl NewDir {
    /// What an output or move root is made as, from the input root's stat (`root`): its
    /// permissions, sticky and set-group-ID bits and its group, as `cp -a` makes the top
    /// directory of a copy; always the owner's `rwx`, as the directories mirrored beneath
    /// (`output::mirrored`). Not its owner: given to the tree's owner, a root would let them
    /// rename what lies in it, and swap what filepipe opens there by path at its next run (a
    /// state directory, `--out arch --state arch/.filepipe`; a failure log) for a symlink, to
    /// be written as root wherever they chose; an ancestor given away, the root itself. That
    /// owner is granted read and search instead (`tree_owner`): it reaches every output, and
    /// the directories mirrored beneath are its own.
    pub(crate) fn like_input(root: &Stat) -> NewDir {
        NewDir {
            mode: (root.st_mode & 0o3777) | 0o700,
            group: Some(root.st_gid),
            tree_owner: Some((root.st_uid, 0o5)),
        }
    }

    /// The input root at `root` as `like_input` takes it. With an access ACL on the root, its
    /// mode's group bits are the ACL's mask, not what its group gets, and its named entries
    /// are not carried: the group and others get what their own entries give them, no more
    /// (found by a review: a `0750` root whose ACL gave its group nothing and one user `r-x`
    /// made an `--out` root its whole group could list). Where the ACL cannot be read, they
    /// get nothing.
    pub(crate) fn like_input_at(root: &Path) -> io::Result<NewDir> {
        Ok(NewDir::like_input(&granted(root)?))
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
            let Ok(st) = granted(root) else {
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
            group: group.filter(|_| groups_agree),
            tree_owner: None,
        }
    }

    /// What a missing directory above the one asked for is made as: the root's mode and group
    /// (no sticky or set-group-ID bit: nothing but the root goes there), and search alone for
    /// the tree's owner, to pass through to the root, whose own mode decides the rest.
    fn above(&self) -> NewDir {
        NewDir {
            mode: self.mode & 0o777,
            group: self.group,
            tree_owner: self.tree_owner.map(|(uid, _)| (uid, 0o1)),
        }
    }

    /// Open to the process's user alone.
    fn private() -> NewDir {
        NewDir {
            mode: 0o700,
            group: None,
            tree_owner: None,
        }
    }

    /// Makes the directory `path` as this says, and whichever of its ancestors are missing as
    /// `above` says (`fs::create_dir_all` otherwise: what exists is passed through, its own user's
    /// and root's symlinks followed, and left as it is). With `sync`, each one made is synced into its parent
    /// before the next: a move directory must still be there after a power cut that keeps
    /// what was moved into it.
    pub(crate) fn create_all(&self, path: &Path, sync: bool) -> io::Result<()> {
        let path_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        // The deepest ancestor that exists, resolved following only trusted symlinks and
        // opened with none on its path (`fsio::canonical`), and the names below it, deepest
        // first.
        let (at, mut missing) = crate::fsio::canonical::resolve_existing(path)?;
        missing.reverse();
        let mut fd = crate::fsio::canonical::open(&at, path_flags)?;
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

    /// Gives the directory just made (`dir`, `0700` less the umask) its group and mode, and the
    /// tree's owner its entry. Only the very directory made here: one put in its place
    /// meanwhile (its parent's owner can) is not owned by this process, and is left as it is.
    /// A failure leaves it closer than asked, never more open.
    fn give(&self, dir: &OwnedFd, umask: u32) {
        let Ok(st) = rfs::fstat(dir) else { return };
        if st.st_uid != rustix::process::geteuid().as_raw() {
            return;
        }
        // Its group must be the root's only where that group gets more than others do.
        if let Some(g) = self.group.filter(|&g| g != st.st_gid) {
            if self.mode & 0o070 & !((self.mode & 0o007) << 3) != 0 {
                let _ = rfs::fchown(dir, None, Some(Gid::from_raw(g)));
            }
        }
        let Ok(now) = rfs::fstat(dir) else { return };
        // The umask applies, as to every directory filepipe makes (`mkdir` applies it to those
        // mirrored beneath): never more open than the user asked for either.
        let full = self.mode & !(umask & 0o777);
        let mut bits = full;
        if self.group != Some(now.st_gid) {
            // Another group than the one meant: it gets what others get, at most, and passes
            // on nothing (no set-group-ID bit).
            bits &= !0o2070 | ((bits & 0o007) << 3);
        }
        // What it inherited from its parent's default ACL goes before its mode is opened: the
        // mode's group bits become that ACL's mask, and a user a parent's `setfacl -d -m
        // u:X:rwx` names could list an `--out` root or a state directory of a tree X may not
        // (found by a review). Where it cannot go, the directory stays `0700`, which leaves
        // the inherited entries nothing (their mask is `---`).
        {
            use crate::fsio::acl::{self, Acl};
            for name in [acl::DEFAULT, acl::ACCESS] {
                if let Err(e) = acl::give(dir, name, &Acl::None) {
                    tracing::warn!(error = %e, "a directory filepipe made keeps an ACL it inherited and could not remove: left open to its owner only");
                    return;
                }
            }
        }
        if rfs::fchmod(dir, Mode::from_raw_mode(bits)).is_err() {
            return;
        }
        let Some((uid, perm)) = self
            .tree_owner
            .filter(|&(uid, perm)| uid != now.st_uid && bits & perm != perm)
        else {
            return;
        };
        if grant_by_acl(dir, bits, uid, perm).is_ok() {
            return;
        }
        // No ACLs on this file system: search for the tree's group, which its owner is
        // usually in (never read: the group may hold others).
        let Some(g) = self.group else { return };
        if now.st_gid == g || rfs::fchown(dir, None, Some(Gid::from_raw(g))).is_ok() {
            let _ = rfs::fchmod(dir, Mode::from_raw_mode(full | 0o010));
        }
    }
}

/// Grants the user `uid` the permissions `perm` (`rwx` as other-class bits) on `dir`, whose
/// mode is `bits`, by its access ACL: the owner, its group and others keep what `bits` gives
/// them (the mask, shown as the group bits, is the group's bits and `perm`).
fn grant_by_acl(dir: &OwnedFd, bits: u32, uid: u32, perm: u32) -> Result<(), Errno> {
    // `system.posix_acl_access` as the kernel takes it (linux/posix_acl_xattr.h): a version,
    // then entries sorted by tag, each a tag, its permissions and an id, little-endian.
    const VERSION: u32 = 2;
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const NO_ID: u32 = u32::MAX;
    let group = (bits >> 3) & 0o7;
    let entries = [
        (USER_OBJ, (bits >> 6) & 0o7, NO_ID),
        (USER, perm, uid),
        (GROUP_OBJ, group, NO_ID),
        (MASK, group | perm, NO_ID),
        (OTHER, bits & 0o7, NO_ID),
    ];
    let mut value = VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        value.extend_from_slice(&tag.to_le_bytes());
        // At most 0o7: fits.
        value.extend_from_slice(&(perm as u16).to_le_bytes());
        value.extend_from_slice(&id.to_le_bytes());
    }
    rfs::fsetxattr(
        dir,
        "system.posix_acl_access",
        &value,
        rfs::XattrFlags::empty(),
    )
}

/// The stat of the directory `root` (opened once), its mode's group and other bits
/// limited to what its access ACL grants them: with an ACL, the mode's group bits are the
/// ACL's mask, not what its group gets, and its named entries are not carried by what is
/// made from the mode (found by a review: a `0750` root whose ACL gave its group nothing and
/// one user `r-x` made an `--out` root, and a state directory, its whole group could list).
/// Where the ACL cannot be read, they get nothing.
fn granted(root: &Path) -> io::Result<Stat> {
    use crate::fsio::acl::{self, Acl};
    let fd = rfs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut st = rfs::fstat(&fd)?;
    let (group, other) = match Acl::of_reached(&fd, acl::ACCESS) {
        Acl::None => return Ok(st),
        Acl::Some(v) => acl::group_and_other(&v).unwrap_or((0, 0)),
        Acl::Unknown(_) => (0, 0),
    };
    st.st_mode = st.st_mode & !0o077 | (st.st_mode & ((group << 3) | other));
    Ok(st)
}

/// The process's umask, read without changing it (`umask(2)` can only set it, and another
/// thread could make a file meanwhile); `0` where /proc does not say, which takes the input
/// root's mode as it is, as `cp -a` does.
pub(crate) fn umask() -> u32 {
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
    /// sticky bit (the process owns the tree here: nothing to grant); one that exists is left
    /// as it is.
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
