//! Opening a root by its canonical path with no symlink anywhere on it. The config resolves
//! each root once (`canonicalize`); a symlink found on that path later was put there since,
//! by someone who may write a directory above the root (a user's drop directory, say), and
//! following it would make the tree somewhere else: `/srv/in/alice/data` read as
//! `/root/data` once `alice` is swapped for a link to `/root`. Every root (input, output,
//! state) is opened here, and from then on reached only through its descriptor.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use rustix::fs::{self as rfs, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// `path` (absolute, canonical) opened with `flags`, no symlink followed on the way or at
/// its end: `ELOOP` (or `EXDEV`) where one is there now.
pub(crate) fn open(path: &Path, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    match rfs::openat2(
        rfs::CWD,
        path,
        flags,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS,
    ) {
        // Without openat2 (before Linux 5.6, or refused by a seccomp filter, as systemd's
        // `RestrictSUIDSGID=` refuses it): one component at a time.
        Err(Errno::NOSYS | Errno::PERM) => one_at_a_time(path, flags),
        r => r,
    }
}

/// Whether `e`, from `open`, says a symlink is on the path.
pub(crate) fn is_symlink_on_path(e: Errno) -> bool {
    matches!(e, Errno::LOOP | Errno::XDEV)
}

/// `path` opened with `flags`, each directory on the way opened `O_NOFOLLOW` from its
/// parent: `ELOOP` where one is a symlink (which `O_PATH | O_DIRECTORY` would call
/// `ENOTDIR`, as for a file).
fn one_at_a_time(path: &Path, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let step =
        |at: &OwnedFd, name: &OsStr, how: OFlags| match rfs::openat(at, name, how, Mode::empty()) {
            Err(Errno::NOTDIR)
                if rfs::statat(at, name, rfs::AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
                    rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Symlink
                }) =>
            {
                Err(Errno::LOOP)
            }
            r => r,
        };
    let names: Vec<&OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        return rfs::open("/", flags, Mode::empty());
    }
    let mut fd = rfs::open("/", dir_flags, Mode::empty())?;
    for (i, name) in names.iter().enumerate() {
        let how = if i + 1 == names.len() {
            flags | OFlags::NOFOLLOW
        } else {
            dir_flags
        };
        fd = step(&fd, name, how)?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root is never opened through a symlink on its path, whichever way it is opened.
    #[test]
    fn no_symlink_is_followed_on_the_way_or_at_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir_all(real.join("a/out")).unwrap();
        std::os::unix::fs::symlink(real.join("a"), real.join("link")).unwrap();
        for flags in [
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        ] {
            for open in [open, one_at_a_time] {
                assert!(open(&real.join("a/out"), flags).is_ok());
                assert!(open(Path::new("/"), flags).is_ok());
                for through in [real.join("link/out"), real.join("link")] {
                    let e = open(&through, flags).expect_err("opened through a symlink");
                    assert!(is_symlink_on_path(e), "{through:?}: {e}");
                }
            }
        }
    }
}
