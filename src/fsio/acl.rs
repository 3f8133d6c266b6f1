//! POSIX ACLs carried from an input to what filepipe makes for it, as `cp -a` carries them: an
//! output (`.gz`, `.zst`, next to its input or under `--out`) and a copy moved to another file
//! system take the input's access ACL, and a directory mirrored under `--out` or a move
//! directory takes its input directory's access and default ACLs.
//!
//! Why: with an ACL, a file's group bits are the ACL's mask, not its group's permissions, and
//! a named entry may deny a user what others get. A mode copied without its ACL says something
//! else: `-rw-r-----+` whose group is `---` and whose one named user may read became a `0640`
//! output every member of the group read; a `0644` file denying one user by name, a `0644`
//! output that user read (found by a review).
//!
//! Invariants: nothing made is ever more open than its input. Where an input has no ACL (the
//! common case: one `fgetxattr`, `ENODATA`), what the new file or directory inherited from its
//! directory's default ACL is removed, as `cp -a` removes it: it was not the input's. Where
//! the ACL cannot be read or written (a file system without ACLs, any error), what is made is
//! open to its owner alone, and the log says so once.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs as rfs;
use rustix::io::Errno;

/// The access ACL: who may do what to the file or directory itself.
pub(crate) const ACCESS: &str = "system.posix_acl_access";
/// A directory's default ACL: what is made in it inherits it.
pub(crate) const DEFAULT: &str = "system.posix_acl_default";

/// The permissions an access ACL (`value`, as the kernel gives it) grants the owning group,
/// limited by its mask (what a group member gets through that entry), and others: `None` if
/// it does not read as one.
pub(crate) fn group_and_other(value: &[u8]) -> Option<(u32, u32)> {
    let e = Entries::of_value(value)?;
    Some((u32::from(e.group? & e.mask), u32::from(e.other?)))
}

/// Whether the access ACL `found` (of a directory already there) lets no one further in than
/// `expected` does, which is the ACL of the directory it stands for, or, `Acl::None`, its mode
/// (`mode`, whose group bits are its group's when `same_group`): each named user's or group's
/// entry, and the owning group's, with the mask applied, gives no more than the same entry of
/// `expected` with its mask (one `expected` lacks: no more than its others get), and others
/// get no more. The owning user's entry is left out (it is its owner's own). An ACL that
/// cannot be read as one is not judged so.
pub(crate) fn no_more_open(found: &Acl, expected: &Acl, mode: u32, same_group: bool) -> bool {
    let Some(found) = Entries::of(found) else {
        return false;
    };
    let expected = match expected {
        Acl::None => Entries {
            named: Vec::new(),
            group: Some(if same_group {
                (mode >> 3) as u16 & 0o7
            } else {
                mode as u16 & 0o7
            }),
            other: Some(mode as u16 & 0o7),
            mask: 0o7,
        },
        acl => match Entries::of(acl) {
            Some(e) => e,
            None => return false,
        },
    };
    let within = |have: u16, may: u16| have & !may == 0;
    let group = |e: &Entries| e.group.unwrap_or(0) & e.mask;
    let other = |e: &Entries| e.other.unwrap_or(0);
    within(group(&found), group(&expected))
        && within(other(&found), other(&expected))
        && found.named.iter().all(|&(tag, id, perm)| {
            let may = expected
                .named
                .iter()
                .find(|&&(t, i, _)| (t, i) == (tag, id))
                .map_or(other(&expected), |&(_, _, p)| p & expected.mask);
            within(perm & found.mask, may)
        })
}

/// An access ACL's entries, as `no_more_open` and `group_and_other` read them.
struct Entries {
    /// Named users' and groups' entries: tag, id, permissions.
    named: Vec<(u16, u32, u16)>,
    /// The owning group's and others' (`None` where the value lacks them).
    group: Option<u16>,
    other: Option<u16>,
    /// `rwx` without a mask entry.
    mask: u16,
}

impl Entries {
    fn of(acl: &Acl) -> Option<Entries> {
        match acl {
            Acl::Some(value) => Entries::of_value(value),
            _ => None,
        }
    }

    /// The entries of `value`, as the kernel gives it: `None` if it does not read as an ACL.
    fn of_value(value: &[u8]) -> Option<Entries> {
        const USER: u16 = 0x02;
        const GROUP_OBJ: u16 = 0x04;
        const GROUP: u16 = 0x08;
        const MASK: u16 = 0x10;
        const OTHER: u16 = 0x20;
        let (version, entries) = value.split_first_chunk::<4>()?;
        if u32::from_le_bytes(*version) != 2 || entries.len() % 8 != 0 {
            return None;
        }
        let mut out = Entries {
            named: Vec::new(),
            group: None,
            other: None,
            mask: 0o7,
        };
        for e in entries.chunks_exact(8) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let perm = u16::from_le_bytes([e[2], e[3]]) & 0o7;
            let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            match tag {
                USER | GROUP => out.named.push((tag, id, perm)),
                GROUP_OBJ => out.group = Some(perm),
                MASK => out.mask = perm,
                OTHER => out.other = Some(perm),
                _ => {}
            }
        }
        Some(out)
    }
}

/// `acl` for a file whose owning group is not its input's (a run without the right to give it
/// that group): the owning group's entry gives no more than others get, since it would give
/// it to another group than the input's, which may hold users the input keeps out (and
/// those users are others to the input); named entries and the mask stay.
pub(crate) fn without_owning_group(acl: &Acl) -> Acl {
    const GROUP_OBJ: u16 = 0x04;
    const OTHER: u16 = 0x20;
    match acl {
        Acl::Some(value) if value.len() >= 4 && (value.len() - 4) % 8 == 0 => {
            let mut v = value.clone();
            let other = v[4..]
                .chunks_exact(8)
                .find(|e| u16::from_le_bytes([e[0], e[1]]) == OTHER)
                .map_or(0, |e| u16::from_le_bytes([e[2], e[3]]));
            for e in v[4..].chunks_exact_mut(8) {
                if u16::from_le_bytes([e[0], e[1]]) == GROUP_OBJ {
                    let group = u16::from_le_bytes([e[2], e[3]]) & other;
                    e[2..4].copy_from_slice(&group.to_le_bytes());
                }
            }
            Acl::Some(v)
        }
        // Not one read as one: nothing to narrow by entry (the caller opens it to its owner
        // alone where it cannot be given).
        other => other.clone(),
    }
}

/// One of an input's ACLs, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Acl {
    /// None: its mode says everything (no such attribute, or a file system without ACLs).
    None,
    /// The attribute's value as the kernel gives it, and takes it back, entries and ids alike.
    Some(Vec<u8>),
    /// It could not be read (this error): what is made from it is made open to its owner
    /// alone, since who else its input lets in is not known.
    Unknown(Errno),
}

impl Acl {
    /// The ACL `name` of the file or directory open at `fd`. One call where there is none or a
    /// small one, the common cases.
    pub(crate) fn of(fd: impl AsFd, name: &str) -> Acl {
        read(|buf| match buf {
            Some(buf) => rfs::fgetxattr(&fd, name, buf),
            None => rfs::fgetxattr_query(&fd, name),
        })
    }

    /// The ACL `name` of the directory `fd` reaches, `O_PATH` (which `fgetxattr` may refuse,
    /// `EBADF`): then read through `/proc/self/fd`, which leads to that very directory without
    /// its path being looked up again and needs no permission on it; where there is no /proc,
    /// through the directory opened for reading from that descriptor (as root; a user may lack
    /// the right, and what is made from it is then its owner's alone).
    pub(crate) fn of_reached(fd: impl AsFd, name: &str) -> Acl {
        match Acl::of(&fd, name) {
            Acl::Unknown(Errno::BADF) => {}
            other => return other,
        }
        let proc = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
        match read(|buf| match buf {
            Some(buf) => rfs::getxattr(&proc, name, buf),
            None => rfs::getxattr_query(&proc, name),
        }) {
            Acl::Unknown(Errno::NOENT) => {}
            other => return other,
        }
        let flags = rfs::OFlags::RDONLY | rfs::OFlags::DIRECTORY | rfs::OFlags::CLOEXEC;
        match rfs::openat(&fd, ".", flags, rfs::Mode::empty()) {
            Ok(dir) => Acl::of(&dir, name),
            Err(e) => Acl::Unknown(e),
        }
    }
}

/// An ACL read by `get` (an `fgetxattr` or a `getxattr` into a buffer, or of its size alone).
fn read(get: impl Fn(Option<&mut [u8]>) -> Result<usize, Errno>) -> Acl {
    // Room for 30 entries (8 bytes each, after a 4-byte header): any ACL set by hand.
    let mut small = [0u8; 244];
    match get(Some(&mut small)) {
        Ok(n) => return Acl::Some(small[..n].to_vec()),
        Err(Errno::NODATA) | Err(Errno::NOTSUP) => return Acl::None,
        Err(Errno::RANGE) => {}
        Err(e) => return Acl::Unknown(e),
    }
    // A larger one: its size, then it (again if it grew in between, a few times).
    for _ in 0..4 {
        let len = match get(None) {
            Ok(len) => len,
            Err(Errno::NODATA) => return Acl::None,
            Err(e) => return Acl::Unknown(e),
        };
        let mut value = vec![0u8; len];
        match get(Some(&mut value)) {
            Ok(n) => {
                value.truncate(n);
                return Acl::Some(value);
            }
            Err(Errno::RANGE) => continue,
            Err(Errno::NODATA) => return Acl::None,
            Err(e) => return Acl::Unknown(e),
        }
    }
    Acl::Unknown(Errno::RANGE)
}

/// Gives the file or directory open at `fd`, which filepipe just made (its owner, or root),
/// the ACL `name` its input has: that very one, or none (one it inherited from its directory's
/// default ACL is removed). An error where it cannot: the caller then opens it to its owner
/// alone (see `fell_back`).
pub(crate) fn give(fd: impl AsFd, name: &str, acl: &Acl) -> Result<(), Errno> {
    #[cfg(test)]
    if let Some(e) = tests::FAIL.with(|f| f.get()) {
        return Err(e);
    }
    match acl {
        Acl::Some(value) => rfs::fsetxattr(&fd, name, value, rfs::XattrFlags::empty()),
        // Looked for first: on ext4 a removal starts a journal handle even of one that is
        // not there (and may wait out a commit of the group flush under way), where a look
        // is a read. What was made carries only what it inherited when made, which the look
        // sees.
        Acl::None if Acl::of(&fd, name) == Acl::None => Ok(()),
        Acl::None => match rfs::fremovexattr(&fd, name) {
            // Nothing inherited, or no ACLs at all here: nothing to remove.
            Ok(()) | Err(Errno::NODATA) | Err(Errno::NOTSUP) => Ok(()),
            // Refused by a file system's own rule (a FUSE one may refuse any removal): nothing
            // lost if there is nothing to remove, which one more look tells.
            Err(e) => match Acl::of(&fd, name) {
                Acl::None => Ok(()),
                _ => Err(e),
            },
        },
        Acl::Unknown(e) => Err(*e),
    }
}

/// Says, once per run, that an input's ACL could not be read or given to what was made for it
/// (`path`, the output or directory), which is then open to its owner alone; each time at debug
/// level.
pub(crate) fn fell_back(path: &std::path::Path, e: Errno) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(path = %path.display(), error = %e, "an input's ACL could not be read or given to what filepipe made for it (a file system without ACLs?): outputs and directories made without their input's ACL are open to their owner only");
    } else {
        tracing::debug!(path = %path.display(), error = %e, "ACL not given: open to its owner only");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;
    use std::os::unix::fs::PermissionsExt;

    thread_local! {
        /// An error `give` fails with in this thread, for the fallbacks' tests.
        pub(crate) static FAIL: Cell<Option<Errno>> = const { Cell::new(None) };
    }

    /// Runs `f` with every `give` of this thread failing with `e`.
    pub(crate) fn failing<T>(e: Errno, f: impl FnOnce() -> T) -> T {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                FAIL.with(|f| f.set(None));
            }
        }
        FAIL.with(|f| f.set(Some(e)));
        let _reset = Reset;
        f()
    }

    /// An ACL as the kernel takes it, of `entries` (tag, permissions, id), sorted by tag.
    pub(crate) fn value(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    /// An access ACL: user::rw-, user:`uid`:r--, group::---, mask::r--, other::---.
    pub(crate) fn named_reader(uid: u32) -> Vec<u8> {
        const NO_ID: u32 = u32::MAX;
        value(&[
            (0x01, 6, NO_ID),
            (0x02, 4, uid),
            (0x04, 0, NO_ID),
            (0x10, 4, NO_ID),
            (0x20, 0, NO_ID),
        ])
    }

    /// Whether this file system keeps ACLs (a tmpfs or ext4 does; a test is skipped elsewhere).
    #[test]
    fn the_owning_groups_permissions_are_its_entrys_within_the_mask() {
        // user::rwx, user:1700:r-x, group::---, mask::r-x, other::---
        let v = value(&[
            (1, 7, u32::MAX),
            (2, 5, 1700),
            (4, 0, u32::MAX),
            (0x10, 5, u32::MAX),
            (0x20, 0, u32::MAX),
        ]);
        assert_eq!(group_and_other(&v), Some((0, 0)));
        // group::rwx, mask::r-x, other::r--
        let v = value(&[
            (1, 7, u32::MAX),
            (4, 7, u32::MAX),
            (0x10, 5, u32::MAX),
            (0x20, 4, u32::MAX),
        ]);
        assert_eq!(group_and_other(&v), Some((5, 4)));
        assert_eq!(group_and_other(b"\x02\0\0\0\x01"), None);
    }

    /// `no_more_open`: named entries and the owning group's within the mask, against the same
    /// entries of the ACL expected (or its others, for an entry it lacks); the owner's left out.
    #[test]
    fn an_acl_is_no_more_open_only_when_no_entry_gives_more() {
        const NO_ID: u32 = u32::MAX;
        let acl = |entries: &[(u16, u16, u32)]| Acl::Some(value(entries));
        // The input's: user::rwx, user:1700:r-x, group::---, mask::r-x, other::---.
        let input = acl(&[
            (1, 7, NO_ID),
            (2, 5, 1700),
            (4, 0, NO_ID),
            (0x10, 5, NO_ID),
            (0x20, 0, NO_ID),
        ]);
        assert!(no_more_open(&input, &input, 0o750, true));
        // The same with a narrower mask (a umask), or a narrower owner: still no more open.
        let narrower = acl(&[
            (1, 5, NO_ID),
            (2, 7, 1700),
            (4, 0, NO_ID),
            (0x10, 1, NO_ID),
            (0x20, 0, NO_ID),
        ]);
        assert!(no_more_open(&narrower, &input, 0o750, true));
        // Another user named, or others let in: more open.
        let stranger = acl(&[
            (1, 7, NO_ID),
            (2, 5, 1800),
            (4, 0, NO_ID),
            (0x10, 5, NO_ID),
            (0x20, 0, NO_ID),
        ]);
        assert!(!no_more_open(&stranger, &input, 0o750, true));
        let others = acl(&[
            (1, 7, NO_ID),
            (4, 0, NO_ID),
            (0x10, 0, NO_ID),
            (0x20, 5, NO_ID),
        ]);
        assert!(!no_more_open(&others, &input, 0o750, true));
        // Against a mode alone: its group for the same group, others otherwise.
        let group = acl(&[
            (1, 7, NO_ID),
            (4, 5, NO_ID),
            (0x10, 5, NO_ID),
            (0x20, 0, NO_ID),
        ]);
        assert!(no_more_open(&group, &Acl::None, 0o750, true));
        assert!(!no_more_open(&group, &Acl::None, 0o750, false));
        assert!(!no_more_open(&group, &Acl::None, 0o700, true));
        // Unreadable: not judged no more open.
        assert!(!no_more_open(&Acl::Unknown(Errno::IO), &input, 0o750, true));
    }

    fn acls_here(file: &std::fs::File) -> bool {
        rfs::fsetxattr(file, ACCESS, &named_reader(4321), rfs::XattrFlags::empty()).is_ok()
    }

    #[test]
    fn an_acl_is_read_as_the_kernel_gives_it_and_none_is_none() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        assert_eq!(Acl::of(&file, ACCESS), Acl::None);
        if !acls_here(&file) {
            eprintln!("SKIPPED: no ACLs on this file system");
            return;
        }
        assert_eq!(Acl::of(&file, ACCESS), Acl::Some(named_reader(4321)));
        // The mask is the group bits.
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        // Reached O_PATH, as the directories mirrored are.
        let reached = rfs::open(
            &path,
            rfs::OFlags::PATH | rfs::OFlags::CLOEXEC,
            rfs::Mode::empty(),
        )
        .unwrap();
        assert_eq!(
            Acl::of_reached(&reached, ACCESS),
            Acl::Some(named_reader(4321))
        );
        // A large one (more entries than the first read's buffer holds): read whole.
        let mut entries = vec![(0x01, 6, u32::MAX)];
        entries.extend((5000..5040).map(|uid| (0x02, 4, uid)));
        entries.extend([
            (0x04, 0, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ]);
        let big = value(&entries);
        give(&file, ACCESS, &Acl::Some(big.clone())).unwrap();
        assert_eq!(Acl::of(&file, ACCESS), Acl::Some(big));
        // None given: removed, and the mode's group bits are the group's again.
        give(&file, ACCESS, &Acl::None).unwrap();
        assert_eq!(Acl::of(&file, ACCESS), Acl::None);
        give(&file, ACCESS, &Acl::None).unwrap();
        assert_eq!(
            give(&file, ACCESS, &Acl::Unknown(Errno::IO)),
            Err(Errno::IO)
        );
    }
}
