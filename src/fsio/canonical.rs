//! The paths filepipe is given, resolved once, and opened by that resolution with no symlink
//! anywhere on them.
//!
//! `resolve` is `canonicalize` that follows only the symlinks of filepipe's user or root
//! (`fs.protected_symlinks`' rule, applied on every directory, not just sticky ones): a link
//! another user made on a path given to filepipe chooses where it reads and writes (a user
//! who swapped `/srv/in/alice` for a link to `/etc` had a root run list `/etc/shadow`'s digest,
//! and write outputs and manifests there). `open` then opens the resolved path with no
//! symlink on it: one there now was put there since, by someone who may write a directory
//! above it. Every root (input, output, move, state), manifest directory and failure log is
//! reached so, and from then on only through its descriptor.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

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

/// The longest symlink chain followed, as the kernel's.
const MAX_LINKS: usize = 40;

/// `path` made absolute and free of symlinks, `.` and `..`, as `canonicalize` makes it, but
/// following only symlinks owned by filepipe's user or root: another's is an error naming it.
/// Every component must exist.
pub(crate) fn resolve(path: &Path) -> io::Result<PathBuf> {
    let (resolved, missing) = resolve_existing(path)?;
    match missing.first() {
        None => Ok(resolved),
        // ENOENT's own words ("No such file or directory"), not the kind's ("entity not
        // found"), which every message about a missing path said (found by a review).
        Some(_) => Err(io::Error::from_raw_os_error(libc::ENOENT)),
    }
}

/// `resolve` of the longest part of `path` that exists, and the plain names below it that do
/// not (yet), in order: for a directory to be made. A `..` after a missing name is an error
/// (the caller makes such paths absolute first, `..` taken lexically).
pub(crate) fn resolve_existing(path: &Path) -> io::Result<(PathBuf, Vec<OsString>)> {
    enum Step {
        Top,
        Up,
        Name(OsString),
    }
    fn steps(path: &Path, into: &mut VecDeque<Step>) {
        for c in path.components().rev() {
            match c {
                Component::RootDir => into.push_front(Step::Top),
                Component::ParentDir => into.push_front(Step::Up),
                Component::Normal(n) => into.push_front(Step::Name(n.to_owned())),
                Component::CurDir | Component::Prefix(_) => {}
            }
        }
    }
    let me = rustix::process::geteuid().as_raw();
    let mut todo = VecDeque::new();
    steps(path, &mut todo);
    let mut at = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir()?
    };
    let mut links = 0;
    let mut missing: Vec<OsString> = Vec::new();
    while let Some(step) = todo.pop_front() {
        let name = match step {
            Step::Top => {
                at = PathBuf::from("/");
                continue;
            }
            Step::Up => {
                if !missing.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{}: `..` after a missing directory", path.display()),
                    ));
                }
                at.pop();
                continue;
            }
            Step::Name(name) => name,
        };
        if !missing.is_empty() {
            missing.push(name);
            continue;
        }
        let here = at.join(&name);
        let st = match rfs::lstat(&here) {
            Ok(st) => st,
            Err(Errno::NOENT) => {
                missing.push(name);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::Symlink {
            at = here;
            continue;
        }
        if st.st_uid != me && st.st_uid != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is a symlink of uid {}: filepipe follows only its own user's and root's \
                     on the paths it is given (give the path it leads to, if that is meant)",
                    here.display(),
                    st.st_uid
                ),
            ));
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(Errno::LOOP.into());
        }
        let target = rfs::readlink(&here, Vec::new())?;
        steps(Path::new(OsStr::from_bytes(target.as_bytes())), &mut todo);
    }
    Ok((at, missing))
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

    /// Resolved as `canonicalize` resolves, this user's links followed, `..` after them too.
    #[test]
    fn resolve_agrees_with_canonicalize_on_this_users_links() {
        let tmp = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir_all(real.join("a/b/c")).unwrap();
        std::os::unix::fs::symlink("a/b", real.join("rel")).unwrap();
        std::os::unix::fs::symlink(real.join("a"), real.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../a", real.join("a/b/c/up")).unwrap();
        for p in [
            "a/b/c",
            "rel/c",
            "abs/b/../b/c",
            "rel/c/up/b",
            "a/./b//c/",
            "rel/..",
        ] {
            let path = real.join(p);
            assert_eq!(
                resolve(&path).unwrap(),
                std::fs::canonicalize(&path).unwrap(),
                "{p}"
            );
        }
        let (at, missing) = resolve_existing(&real.join("rel/new/er")).unwrap();
        assert_eq!(at, real.join("a/b"));
        assert_eq!(missing, ["new", "er"]);
        assert!(resolve(&real.join("rel/new")).is_err());
        assert!(resolve_existing(&real.join("new/../a")).is_err());
        std::os::unix::fs::symlink("loop", real.join("loop")).unwrap();
        assert!(resolve(&real.join("loop")).is_err());
    }

    /// Another user's symlink on the way is refused, named; root's is followed.
    #[test]
    fn another_users_symlink_is_not_followed() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: needs root to make another user's symlink");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir_all(real.join("a/b")).unwrap();
        let theirs = real.join("theirs");
        std::os::unix::fs::symlink(real.join("a"), &theirs).unwrap();
        let nobody = Some(rustix::process::Uid::from_raw(65534));
        rfs::chownat(
            rfs::CWD,
            &theirs,
            nobody,
            None,
            rfs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        let e = resolve(&theirs.join("b")).unwrap_err();
        assert!(e.to_string().contains("symlink of uid 65534"), "{e}");
        assert!(resolve_existing(&theirs.join("new")).is_err());
        std::os::unix::fs::symlink(real.join("a"), real.join("roots")).unwrap();
        assert_eq!(resolve(&real.join("roots/b")).unwrap(), real.join("a/b"));
    }

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
