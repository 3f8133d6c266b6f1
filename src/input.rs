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
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};

use crate::error::{FileError, Kind};

/// An open regular input file and the `fstat` it was opened with.
#[derive(Debug)]
pub struct InputFile {
    file: File,
    /// The stat taken right after opening (refreshed by `restart`).
    pub stat: Stat,
    read: u64,
}

/// Why an input could not be opened as a regular file.
#[derive(Debug)]
pub enum OpenError {
    /// Not a regular file (anymore): skip it, with this description.
    NotRegular(&'static str),
    /// A real error.
    Failed(FileError),
}

impl InputFile {
    /// Opens `path` for reading, refusing anything but a regular file.
    pub fn open(path: &Path, follow_symlinks: bool) -> Result<InputFile, OpenError> {
        Self::open_beneath(None, path, path, follow_symlinks)
    }

    /// Opens the input `rel` of the tree whose root directory is `root` (`abs` is the same file
    /// by full path), refusing anything but a regular file. Without `follow_symlinks`, `rel` is
    /// resolved beneath `root` with no symlink anywhere on it (`openat2` with
    /// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): a directory swapped for a symlink after the walk
    /// listed it cannot lead the read out of the tree, and only `rel`'s components are looked
    /// up, not the root's. With `--follow-symlinks`, or without a `root` (see `open_root`), by
    /// full path.
    pub fn open_beneath(
        root: Option<BorrowedFd<'_>>,
        rel: &Path,
        abs: &Path,
        follow_symlinks: bool,
    ) -> Result<InputFile, OpenError> {
        let mut flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        if !follow_symlinks {
            flags |= OFlags::NOFOLLOW;
        }
        let beneath = root.filter(|_| !follow_symlinks);
        let open = |flags| match beneath {
            Some(root) => rfs::openat2(root, rel, flags, Mode::empty(), no_symlinks()),
            None => rfs::open(abs, flags, Mode::empty()),
        };
        // O_NOATIME: reading a file to hash or compress it is not a use of it (tmpwatch-style
        // cleanups go by atime), and not dirtying every inode saves work on a first pass. The
        // kernel allows it only to the file's owner (or CAP_FOWNER): anyone else's file is
        // opened again without it.
        let opened = match open(flags | OFlags::NOATIME) {
            Err(rustix::io::Errno::PERM) => open(flags),
            r => r,
        };
        let fd = opened.map_err(|e| match (e, beneath) {
            // The file itself, or (resolving beneath the root) a directory on its path.
            (rustix::io::Errno::LOOP, Some(root)) => {
                match rfs::statat(root, rel, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                        OpenError::NotRegular("symlink")
                    }
                    _ => OpenError::NotRegular(SYMLINK_ON_PATH),
                }
            }
            (rustix::io::Errno::LOOP, None) if !follow_symlinks => OpenError::NotRegular("symlink"),
            (e, _) => OpenError::Failed(FileError::errno("opening input", e)),
        })?;
        let stat =
            rfs::fstat(&fd).map_err(|e| OpenError::Failed(FileError::errno("stat of input", e)))?;
        let ft = FileType::from_raw_mode(stat.st_mode);
        if ft != FileType::RegularFile {
            return Err(OpenError::NotRegular(describe(ft)));
        }
        Ok(InputFile {
            file: File::from(fd),
            stat,
            read: 0,
        })
    }

    /// The input's size when it was opened.
    pub fn size(&self) -> u64 {
        self.stat.st_size as u64
    }

    /// Rewinds for another attempt after a change was detected, taking a fresh stat.
    pub fn restart(&mut self) -> Result<(), FileError> {
        self.file
            .rewind()
            .map_err(|e| FileError::io("rewinding input", &e))?;
        self.stat = rfs::fstat(&self.file).map_err(|e| FileError::errno("stat of input", e))?;
        self.read = 0;
        Ok(())
    }

    /// Checks that the file is exactly as it was when opened and that all of it was read.
    pub fn finish(&self) -> Result<(), FileError> {
        let now = rfs::fstat(&self.file).map_err(|e| FileError::errno("stat of input", e))?;
        let before = &self.stat;
        let same = now.st_size == before.st_size
            && now.st_mtime == before.st_mtime
            && now.st_mtime_nsec == before.st_mtime_nsec
            && now.st_ctime == before.st_ctime
            && now.st_ctime_nsec == before.st_ctime_nsec
            && self.read == before.st_size as u64;
        if same {
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

/// What `OpenError::NotRegular` says of a file reached through a symlinked directory.
pub const SYMLINK_ON_PATH: &str = "a directory on its path is a symlink";

/// How inputs are resolved beneath the root: no symlink on the way, no `..` out of it.
fn no_symlinks() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS
}

/// The root directory `root`, opened `O_PATH` for `InputFile::open_beneath`; `None` where
/// `openat2` is missing (Linux before 5.6, or a seccomp filter that refuses it), and inputs are
/// then opened by full path.
pub fn open_root(root: &Path) -> Option<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = rfs::open(root, flags, Mode::empty()).ok()?;
    rfs::openat2(&fd, ".", flags, Mode::empty(), no_symlinks()).ok()?;
    Some(fd)
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
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
pub static BYTES_READ: AtomicU64 = AtomicU64::new(0);

impl Read for InputFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read += n as u64;
        BYTES_READ.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A human name for a non-regular file type.
pub fn describe(ft: FileType) -> &'static str {
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
    use std::io::Write;
    use std::os::fd::AsFd;

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
            Err(OpenError::NotRegular("FIFO"))
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
            Err(OpenError::NotRegular("symlink"))
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
        std::fs::write(outside.join("f"), b"outside").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(root.join("d/e/f"), root.join("d/l")).unwrap();
        let fd = open_root(&root).expect("openat2 (Linux 5.6+)");
        let open = |rel: &str, follow| {
            let (rel, abs) = (Path::new(rel), root.join(rel));
            InputFile::open_beneath(Some(fd.as_fd()), rel, &abs, follow)
        };
        assert_eq!(read_all(open("d/e/f", false).unwrap()), b"inside");
        assert!(matches!(
            open("link/f", false),
            Err(OpenError::NotRegular(SYMLINK_ON_PATH))
        ));
        assert!(matches!(
            open("d/l", false),
            Err(OpenError::NotRegular("symlink"))
        ));
        // Vanished files are still told apart from links.
        match open("d/gone", false) {
            Err(OpenError::Failed(e)) => assert_eq!(e.kind, Kind::Vanished),
            other => panic!("unexpected {other:?}"),
        }
        // --follow-symlinks follows them, by path.
        assert_eq!(read_all(open("link/f", true).unwrap()), b"outside");
    }
}
