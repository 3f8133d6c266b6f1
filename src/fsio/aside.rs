//! Moving an input aside (`--move-source DIR`, `--move-failed DIR`): the input `rel` goes to
//! `DIR/rel`, never over an existing file (a clash takes a numbered name, see `numbered`).
//!
//! Invariants: the input is never lost. On one file system it is renamed (`renameat2` with
//! `RENAME_NOREPLACE`, or a link then an unlink where the file system lacks that flag); across
//! file systems it is copied to a temp in the destination, synced, compared with the input
//! byte for byte, given its name without clobbering, and only then unlinked. Destination
//! directories are made and opened beneath DIR without following symlinks (`DirCache`). Both
//! directories are synced before a move counts as done. Whatever stops a move before the
//! input's name is gone leaves the input where it was.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::error::{FileError, Kind};
use crate::fsio::acl::{self, Acl};
use crate::fsio::output::{self, Attrs, Dir, DirCache, TempOutput, NAME_MAX};

/// Most numbered names tried for one file before the move is given up (the input kept): a
/// done directory holding that many copies of one name wants a look by its operator.
const MAX_NUMBERED: u32 = 9_999;

/// Where a move went, or why the input stayed.
pub(crate) type Moved = Result<PathBuf, FileError>;

/// A directory inputs are moved to, mirroring their tree.
#[derive(Debug)]
pub(crate) struct Aside {
    /// The directory (canonical, made by `Config`), for messages and checks at start.
    pub(crate) root: PathBuf,
    /// The directory, opened once at start without following a symlink: every move goes
    /// beneath this descriptor, never by the path again, so DIR renamed away and replaced by
    /// a symlink while filepipe runs sends nothing elsewhere. `None` for a configuration only
    /// checked (`check-config`), which moves nothing.
    dir: Option<Arc<Dir>>,
}

impl Aside {
    /// Opens `root` (canonical: no symlink in it) once, refusing a symlink in its place.
    pub(crate) fn open(root: &Path) -> std::io::Result<Aside> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        // No symlink on the path (`fsio::canonical`): the path is canonical, so one there now
        // was put there since, and moves must not go where it leads.
        let fd = crate::fsio::canonical::open(root, flags)?;
        Ok(Aside {
            root: root.to_path_buf(),
            dir: Some(Arc::new(Dir::new(fd, root.to_path_buf()))),
        })
    }

    /// `root` as configured, not opened: for a configuration that is only checked.
    pub(crate) fn unopened(root: &Path) -> Aside {
        Aside {
            root: root.to_path_buf(),
            dir: None,
        }
    }

    /// The file an earlier move of the input `rel` left here, if one matches `moved`: `rel`
    /// itself or a numbered name of it (as `move_input` names a move), up to the first name
    /// not taken. Reached beneath the directory's descriptor without following a symlink; any
    /// error looking is taken as no such file. Its path and stat.
    pub(crate) fn find_moved(
        &self,
        rel: &Path,
        moved: impl Fn(&rfs::Stat) -> bool,
    ) -> Option<(PathBuf, rfs::Stat)> {
        use std::os::fd::AsFd as _;
        let root = crate::fsio::input::Root::of_fd(self.dir.as_ref()?.fd.as_fd()).ok()?;
        let name = rel.file_name()?;
        let rel_dir = rel.parent().unwrap_or(Path::new(""));
        for n in 0..=MAX_NUMBERED {
            let here = rel_dir.join(numbered(name, n)?);
            let st = root.lstat(&here).ok()?;
            if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::RegularFile && moved(&st)
            {
                return Some((self.root.join(here), st));
            }
        }
        None
    }

    /// Moves `name` in `src` (the input `rel` of the tree at `input_root`) to `rel` under this
    /// directory. The caller has just checked that the name leads to `read`, the file it means
    /// (same inode, size and times, one link); across file systems the copy is made from that
    /// file only, opened and checked again. `Ok(Ok(path))`: moved there, both directories
    /// synced. `Ok(Err(why))`: not moved, the input still in place (perhaps with a verified
    /// copy in DIR, which `why` names). `Err`: the input's name is gone and the file is under
    /// DIR, but syncing a directory failed, so a crash could still undo the move.
    pub(crate) fn move_input(
        &self,
        src: &Dir,
        name: &OsStr,
        rel: &Path,
        read: &rfs::Stat,
        input_root: Option<&crate::fsio::input::Root>,
    ) -> Result<Moved, FileError> {
        let not_moved = |e: FileError| FileError {
            message: format!("input not moved: {}", e.message),
            ..e
        };
        let rel_dir = rel.parent().unwrap_or(Path::new(""));
        // New directories take their input directory's permissions and owner, as under --out.
        let mode_of = |r: &Path| output::mirrored(input_root, r, rel_dir, Some((name, read)));
        let Some(top) = &self.dir else {
            let why = format!("{} was not opened at start", self.root.display());
            return Ok(Err(FileError::new(
                Kind::Io,
                format!("input not moved: {why}"),
            )));
        };
        let dest = match DirCache::beneath(Arc::clone(top)).open(rel_dir, &mode_of) {
            Ok(d) => d,
            Err(e) => return Ok(Err(not_moved(e))),
        };
        let within = Within {
            top,
            root: &self.root,
            rel_dir,
            mode_of: &mode_of,
        };
        // Still beneath DIR, just before the move: made and synced, it may have been moved
        // out meanwhile by whoever owns it (the input directory's owner: found by review
        // r55b, the input went where the directory went, and the log said DIR). Looked at
        // again once the input is there (below), since it may go in between.
        if let Some(e) = within.left(&dest) {
            return Ok(Err(not_moved(e)));
        }
        for n in 0..=MAX_NUMBERED {
            let Some(to) = numbered(name, n) else {
                return Ok(Err(name_too_long(name, n)));
            };
            match rfs::renameat_with(&src.fd, name, &dest.fd, &to, RenameFlags::NOREPLACE) {
                Ok(()) => {}
                Err(Errno::EXIST) => continue,
                // The file system has no RENAME_NOREPLACE (some NFS and FUSE file systems):
                // a link is no-clobber by nature, and the input's name goes once it stands.
                Err(Errno::INVAL) => return self.move_by_link(src, name, &dest, read, within),
                Err(Errno::XDEV) => return self.copy_across(src, name, &dest, read, within),
                Err(Errno::NOENT) => return Ok(Err(enoent(src, name, &dest, &to))),
                Err(e) => {
                    let what = format!("moving it to {}", dest.path.join(&to).display());
                    return Ok(Err(not_moved(FileError::errno(&what, e))));
                }
            }
            let path = dest.path.join(&to);
            // The name was checked just before, but acted on by name: another file renamed
            // over it meanwhile went instead. Only the very file that was read is moved; any
            // other goes back where it was, unprocessed.
            match rfs::statat(&dest.fd, &to, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(now) if same_version(&now, read) && now.st_nlink == 1 => {}
                _ => return put_back(src, name, &dest, &to, within),
            }
            // Moved out of DIR between the look above and the rename (review r55c's m5 held
            // the rename itself): the input goes back, or on into DIR. Once this look has
            // passed, a move of the directory is its owner's, after the input was moved.
            if let Some(e) = within.left(&dest) {
                return within.bring_back(src, name, &dest, &to, read, e);
            }
            output::sync_dir(&dest)?;
            output::sync_dir(src)?;
            return Ok(Ok(path));
        }
        Ok(Err(too_many(&dest, name)))
    }

    /// The move by `link` then `unlink`, where `RENAME_NOREPLACE` is not supported.
    fn move_by_link(
        &self,
        src: &Dir,
        name: &OsStr,
        dest: &Arc<Dir>,
        read: &rfs::Stat,
        within: Within<'_>,
    ) -> Result<Moved, FileError> {
        for n in 0..=MAX_NUMBERED {
            let Some(to) = numbered(name, n) else {
                return Ok(Err(name_too_long(name, n)));
            };
            match rfs::linkat(&src.fd, name, &dest.fd, &to, AtFlags::empty()) {
                Ok(()) => {}
                Err(Errno::EXIST) => continue,
                Err(Errno::XDEV) => return self.copy_across(src, name, dest, read, within),
                Err(Errno::NOENT) => return Ok(Err(enoent(src, name, dest, &to))),
                Err(e) => {
                    let what = format!("linking it as {}", dest.path.join(&to).display());
                    let e = FileError::errno(&what, e);
                    return Ok(Err(FileError {
                        message: format!("input not moved: {}", e.message),
                        ..e
                    }));
                }
            }
            // Not yet durable: the link is taken back, and the input stays, a single file.
            if let Err(e) = output::sync_dir(dest) {
                let back = match rfs::unlinkat(&dest.fd, &to, AtFlags::empty()) {
                    Ok(()) => String::new(),
                    Err(u) => format!("; its link there could not be removed: {u}"),
                };
                return Ok(Err(FileError {
                    message: format!("input not moved: {}{back}", e.message),
                    ..e
                }));
            }
            return finish_by_unlink(src, name, read, Second::Link, dest, &to, Some(within));
        }
        Ok(Err(too_many(dest, name)))
    }

    /// An input with two links, the other one its own counterpart under this directory (the
    /// same file at `rel` or a numbered name of it): a move by link stopped between its link
    /// and its unlink. Finishes it, as that move would have (`finish_by_unlink`). `None` where
    /// the second link is anything else: the input is then hard-linked, and stays.
    pub(crate) fn finish_linked(
        &self,
        src: &Dir,
        name: &OsStr,
        rel: &Path,
        read: &rfs::Stat,
    ) -> Option<Result<Moved, FileError>> {
        let top = self.dir.as_ref()?;
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut fd = rustix::io::fcntl_dupfd_cloexec(&top.fd, 0).ok()?;
        let mut path = top.path.clone();
        for comp in rel.parent().unwrap_or(Path::new("")).components() {
            let std::path::Component::Normal(c) = comp else {
                return None;
            };
            fd = rfs::openat(&fd, c, flags, Mode::empty()).ok()?;
            path.push(c);
        }
        let dest = Dir::new(fd, path);
        let rel_dir = rel.parent().unwrap_or(Path::new(""));
        // Directories made again (`Within::move_on`) as under --out, without the input's
        // tree at hand: filepipe's user's, 0700.
        let mode_of = |r: &Path| output::mirrored(None, r, rel_dir, None);
        let within = Within {
            top,
            root: &self.root,
            rel_dir,
            mode_of: &mode_of,
        };
        for n in 0..=MAX_NUMBERED {
            let to = numbered(name, n)?;
            let st = rfs::statat(&dest.fd, &to, AtFlags::SYMLINK_NOFOLLOW).ok()?;
            if st.st_dev == read.st_dev && st.st_ino == read.st_ino {
                let within = Some(within);
                return Some(finish_by_unlink(
                    src,
                    name,
                    read,
                    Second::Link,
                    &dest,
                    &to,
                    within,
                ));
            }
        }
        None
    }

    /// The move across file systems: copy, sync, compare, name (no-clobber), sync, unlink.
    fn copy_across(
        &self,
        src: &Dir,
        name: &OsStr,
        dest: &Arc<Dir>,
        read: &rfs::Stat,
        within: Within<'_>,
    ) -> Result<Moved, FileError> {
        let kept = |e: FileError| FileError {
            message: format!("input not moved: {}", e.message),
            ..e
        };
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let input = match rfs::openat(&src.fd, name, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(Errno::NOENT) => return Ok(Err(moved_away())),
            Err(e) => {
                let why = FileError::errno("opening it to copy it to another file system", e);
                return Ok(Err(kept(why)));
            }
        };
        // The very file that was read, unchanged: only that one is copied, and unlinked.
        let untouched = |st: &rfs::Stat| {
            same_version(st, read)
                && st.st_ctime == read.st_ctime
                && st.st_ctime_nsec == read.st_ctime_nsec
        };
        match rfs::fstat(&input) {
            Ok(st) if untouched(&st) => {}
            Ok(_) => return Ok(Err(changed())),
            Err(e) => return Ok(Err(kept(FileError::errno("stat of input", e)))),
        }
        let size = read.st_size as u64;
        // An earlier run stopped between naming its copy and unlinking the input: that copy,
        // if it holds the input's bytes, is this move's, and only the unlink is left. (A file
        // of the same name, date and bytes from elsewhere stands for it just as well: nothing
        // is lost, and no second copy is made of it.) Only one nobody else may change: it is
        // to be the only copy once the input goes, so it must be owned by the input's owner
        // (or filepipe's user), be no more open than the input, and have no other name
        // (found by a review: one anyone could write in DIR was taken).
        let me = rustix::process::geteuid().as_raw();
        let trusted = |st: &rfs::Stat| {
            st.st_nlink == 1
                && (st.st_uid == read.st_uid || st.st_uid == me)
                && st.st_mode & 0o7777 & !(read.st_mode & 0o7777) == 0
        };
        // Nor more open by its ACL: the input's, or none on a copy open to its owner alone (as
        // a copy is made where the ACL cannot go).
        let wanted = Acl::of(&input, acl::ACCESS);
        let acl_fits = |copy: &File, st: &rfs::Stat| match Acl::of(copy, acl::ACCESS) {
            Acl::Unknown(_) => false,
            Acl::None if st.st_mode & 0o077 == 0 => true,
            now => now == wanted,
        };
        let mut at = 0;
        let mut earlier = None;
        while let Some(to) = numbered(name, at) {
            match rfs::statat(&dest.fd, &to, AtFlags::SYMLINK_NOFOLLOW) {
                Err(_) => break,
                Ok(st)
                    if st.st_size == read.st_size
                        && st.st_mtime == read.st_mtime
                        && st.st_mtime_nsec == read.st_mtime_nsec
                        && trusted(&st)
                        && rfs::FileType::from_raw_mode(st.st_mode)
                            == rfs::FileType::RegularFile =>
                {
                    if let Ok(copy) = output_file(dest, &to) {
                        // Judged again on what was opened: the name may have been swapped.
                        let opened = rfs::fstat(&copy).is_ok_and(|o| {
                            trusted(&o)
                                && (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino)
                                && acl_fits(&copy, &o)
                        });
                        if opened && same_bytes(&input, &copy, size).unwrap_or(false) {
                            earlier = Some((to, copy));
                            break;
                        }
                    }
                }
                Ok(_) => {}
            }
            at += 1;
            if at > MAX_NUMBERED {
                break;
            }
        }
        if let Some((to, copy)) = earlier {
            let since = output::flush_mark();
            output::sync_file_on(dest, &copy)
                .map_err(|e| FileError::io("syncing the earlier copy", &e))
                .map_err(kept)?;
            output::sync_dir(dest)?;
            if let Err(e) = output::confirm_written(dest, since) {
                return Ok(Err(kept(e)));
            }
            return finish_by_unlink(src, name, read, Second::Copy, dest, &to, Some(within));
        }
        // Taken before the copy is made: without a journal, any flush error counted from
        // then on may be a failed write of its inode's block (see `output::FlushMark`), and
        // the input is removed only once the copy is known to be on the disk.
        let since = output::flush_mark();
        let mut temp = match TempOutput::create(Arc::clone(dest)) {
            Ok(t) => t,
            Err(e) => return Ok(Err(kept(e))),
        };
        let copied = (|| {
            // Never past its size as read, and a byte more to tell it grew: one grown to a
            // terabyte of holes as the copy began filled the move directory's file system
            // (found by a review).
            let mut from = std::io::Read::take(&input, size + 1);
            let n = std::io::copy(&mut from, temp.file())
                .map_err(|e| FileError::io("copying it to another file system", &e))?;
            if n != size {
                return Err(changed());
            }
            // Its access ACL with its mode, or a copy open to its owner alone (`Attrs`).
            temp.set_attrs(name, &Attrs::from_stat(read, wanted.clone()))?;
            keep_more(&input, temp.file(), read, name)
        })();
        if let Err(e) = copied {
            return Ok(Err(kept(e)));
        }
        let synced = match temp.sync(name) {
            Ok(s) => s,
            Err(e) => return Ok(Err(kept(e))),
        };
        // Read back through both descriptors: the copy must hold the input's bytes before
        // it gets a name, and the input must not have changed while it was copied.
        match same_bytes(&input, synced.file(), size) {
            Ok(true) => {}
            Ok(false) => {
                return Ok(Err(kept(FileError::new(
                    Kind::Corrupt,
                    "its copy on the other file system does not read back the same",
                ))))
            }
            Err(e) => return Ok(Err(kept(e))),
        }
        match rfs::fstat(&input) {
            Ok(st) if untouched(&st) => {}
            Ok(_) => return Ok(Err(changed())),
            Err(e) => return Ok(Err(kept(FileError::errno("stat of input", e)))),
        }
        let mut synced = synced;
        for n in 0..=MAX_NUMBERED {
            let Some(to) = numbered(name, n) else {
                return Ok(Err(name_too_long(name, n)));
            };
            match synced.rename(&to, false) {
                Ok(named) => {
                    output::sync_dir(dest)?;
                    if let Err(e) = output::confirm_written(dest, since) {
                        // Not left under its name for a later move to take for done.
                        named.withdraw();
                        return Ok(Err(kept(e)));
                    }
                    return finish_by_unlink(
                        src,
                        name,
                        read,
                        Second::Copy,
                        dest,
                        &to,
                        Some(within),
                    );
                }
                Err(e) if e.kind == Kind::OutputExists => continue,
                Err(e) => return Ok(Err(kept(e))),
            }
        }
        Ok(Err(too_many(dest, name)))
        // The temp, if never named, is removed as it drops.
    }
}

/// Renames `to` in `dest` back to `name` in `src` (never over a file): a move took a file
/// that was not the one read, renamed over the input's name between its check and the move.
fn put_back(
    src: &Dir,
    name: &OsStr,
    dest: &Dir,
    to: &OsStr,
    within: Within<'_>,
) -> Result<Moved, FileError> {
    let Err(e) = move_back(src, name, dest, to) else {
        return Ok(Err(FileError::new(
            Kind::Changed,
            "input not moved: another file was renamed over its name as it was moved; that \
             file was put back, unprocessed",
        )));
    };
    // Where it is now, as the kernel says (its directory may have moved since: found by
    // review r56b, the note named the path in DIR it had left).
    let at = match rfs::statat(&dest.fd, to, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => format!("it is at {}", now_at(dest, to)),
        Err(_) => format!(
            "it is no longer at {}, where it was moved (renamed or removed there since)",
            now_at(dest, to)
        ),
    };
    let message = format!(
        "input not moved: another file was renamed over its name as it was moved, and could \
         not be put back ({e}): {at}"
    );
    match within.left(dest) {
        // Outside DIR and the tree: the file fails, saying so, rather than end done.
        Some(left) => Err(FileError::new(
            left.kind,
            format!("{message} ({})", left.message),
        )),
        None => Ok(Err(FileError::new(Kind::Changed, message))),
    }
}

/// Renames `to` in `dest` back to `name` in `src`, never over a file there, and syncs both.
fn move_back(src: &Dir, name: &OsStr, dest: &Dir, to: &OsStr) -> Result<(), String> {
    rfs::renameat_with(&dest.fd, to, &src.fd, name, RenameFlags::NOREPLACE)
        .map_err(|e| e.to_string())?;
    output::sync_dir(src)
        .and(output::sync_dir(dest))
        .map_err(|e| e.message)
}

/// Where the kernel says `name` in `dir` is now (`/proc/self/fd`): `dir` may have been moved
/// since it was opened. Its path as opened where /proc cannot say.
fn now_at(dir: &Dir, name: &OsStr) -> String {
    use std::os::fd::AsRawFd;
    match std::fs::read_link(format!("/proc/self/fd/{}", dir.fd.as_raw_fd())) {
        Ok(at) => at.join(name).display().to_string(),
        Err(_) => format!(
            "{} (where its directory was before it moved)",
            dir.path.join(name).display()
        ),
    }
}

/// Where a move's directory must still be when the input goes there: `rel_dir` beneath `top`,
/// the move directory as opened at start (`root`, its path); `mode_of` gives a directory made
/// again there its mode, as `DirCache::open` takes it.
#[derive(Clone, Copy)]
struct Within<'a> {
    top: &'a Arc<Dir>,
    root: &'a Path,
    rel_dir: &'a Path,
    mode_of: &'a dyn Fn(&Path) -> output::Mirror,
}

impl Within<'_> {
    /// Why `dest` is no longer beneath the move directory (its owner moved it, or an ancestor,
    /// out), or `None` while it is.
    fn left(&self, dest: &Dir) -> Option<FileError> {
        let depth = self.rel_dir.components().count();
        match output::beneath(self.top, depth, dest) {
            Ok(true) => None,
            Ok(false) => Some(FileError::new(
                Kind::UnsafeOutputPath,
                format!(
                    "{} was moved out of {} meanwhile",
                    dest.path.display(),
                    self.root.display()
                ),
            )),
            Err(e) => {
                let what = format!(
                    "looking {} up beneath {}",
                    dest.path.display(),
                    self.root.display()
                );
                Some(FileError::errno(&what, e))
            }
        }
    }

    /// The input, just renamed to `to` in `dest`, which had left the move directory (`left`
    /// says why): put back under its name in the tree; where that cannot be (a writer put a
    /// new file at the name, or its directory went), moved on into its directory beneath the
    /// move directory, made again (`move_on`). Never left out there unsaid (found by review
    /// r56: a failed put-back left the input outside both, and the note named a path in DIR).
    fn bring_back(
        &self,
        src: &Dir,
        name: &OsStr,
        dest: &Dir,
        to: &OsStr,
        read: &rfs::Stat,
        left: FileError,
    ) -> Result<Moved, FileError> {
        match move_back(src, name, dest, to) {
            Ok(()) => Ok(Err(FileError::new(
                left.kind,
                format!(
                    "input not moved: {}; it was put back in the tree",
                    left.message
                ),
            ))),
            Err(e) => {
                let why = format!("{}, and it could not be put back ({e})", left.message);
                self.move_on(dest, to, name, (read.st_dev, read.st_ino), read, &why)
            }
        }
    }

    /// Moves `to` in `dest` (a directory that left the move directory; the file `file`, by
    /// device and inode, which holds the input as `read`) into `rel_dir` beneath the move
    /// directory, made again, under `name` or a numbered name: where the move meant it to be.
    /// `Ok(Ok(path))` there. `Err` (the file fails) where that cannot be done, saying where the
    /// input is now.
    fn move_on(
        &self,
        dest: &Dir,
        to: &OsStr,
        name: &OsStr,
        file: (u64, u64),
        read: &rfs::Stat,
        why: &str,
    ) -> Result<Moved, FileError> {
        let stuck = |at: String, e: String| {
            FileError::new(
                Kind::UnsafeOutputPath,
                format!(
                    "input moved, but {why}; it could not be moved into {} again ({e}): it is \
                     {at}",
                    self.root.display()
                ),
            )
        };
        // Still the file moved there: the directory is its owner's, who may have put another
        // at its name.
        match rfs::statat(&dest.fd, to, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if (st.st_dev, st.st_ino) == file && st.st_size == read.st_size => {}
            Ok(_) => {
                let e = "another file is at its name there now".to_string();
                return Err(stuck(format!("at {}", now_at(dest, to)), e));
            }
            Err(e) => return Err(stuck(format!("at {}", now_at(dest, to)), e.to_string())),
        }
        let again = DirCache::beneath(Arc::clone(self.top))
            .open(self.rel_dir, self.mode_of)
            .map_err(|e| stuck(format!("at {}", now_at(dest, to)), e.message))?;
        if let Some(e) = self.left(&again) {
            return Err(stuck(format!("at {}", now_at(dest, to)), e.message));
        }
        // There under `next`: the very file (the directory out there is its owner's, who may
        // have put another at its name since the look above: found by review r56b, an
        // impostor was moved into DIR and the input left out there), still beneath the move
        // directory, and made durable.
        let landed = |next: &OsStr| -> Result<Moved, FileError> {
            let there = rfs::statat(&again.fd, next, AtFlags::SYMLINK_NOFOLLOW);
            if !there.is_ok_and(|st| (st.st_dev, st.st_ino) == file) {
                let back = match move_back(dest, to, &again, next) {
                    Ok(()) => String::new(),
                    Err(e) => format!(
                        ", and could not be taken back from {} ({e})",
                        now_at(&again, next)
                    ),
                };
                let e = format!("another file was put at its name there{back}");
                let at = format!("somewhere in {}", now_at(dest, OsStr::new("")));
                return Err(stuck(at, e));
            }
            if let Some(e) = self.left(&again) {
                return Err(stuck(format!("at {}", now_at(&again, next)), e.message));
            }
            output::sync_dir(&again)?;
            output::sync_dir(dest)?;
            Ok(Ok(again.path.join(next)))
        };
        let mut e = "every numbered name there is taken".to_string();
        for n in 0..=MAX_NUMBERED {
            let Some(next) = numbered(name, n) else {
                e = format!(
                    "its name there is taken, and numbered {n} would be over {NAME_MAX} bytes"
                );
                break;
            };
            let renamed =
                rfs::renameat_with(&dest.fd, to, &again.fd, &next, RenameFlags::NOREPLACE);
            let linked = match renamed {
                Ok(()) => return landed(&next),
                // No RENAME_NOREPLACE (FUSE, some NFS): a link, then the name out there goes.
                Err(Errno::INVAL) => rfs::linkat(&dest.fd, to, &again.fd, &next, AtFlags::empty()),
                Err(e) => Err(e),
            };
            match linked {
                Ok(()) => {
                    if let Err(e) = rfs::unlinkat(&dest.fd, to, AtFlags::empty()) {
                        let at = format!("at {} and {}", now_at(&again, &next), now_at(dest, to));
                        let e = format!("its name out there could not be removed: {e}");
                        return Err(stuck(at, e));
                    }
                    return landed(&next);
                }
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(stuck(format!("at {}", now_at(dest, to)), e.to_string())),
            }
        }
        Err(stuck(format!("at {}", now_at(dest, to)), e))
    }
}

/// How a move directory overlaps a tree by identity, where their paths do not show it: a
/// bind mount of a directory inside the tree, or a path whose ancestor is one. `Some("is
/// the" | "is inside the" | "encloses the")`, or `None` where they are apart. Three looks:
/// the directories' own (device, inode) up each one's `..` chain, and where each lies within
/// its file system (`/proc/self/mountinfo`), which is what a bind mount hides from paths.
pub(crate) fn overlap(tree: &Path, dir: &Aside) -> std::io::Result<Option<&'static str>> {
    let Some(top) = &dir.dir else { return Ok(None) };
    overlap_at(tree, &top.fd, &dir.root)
}

/// `overlap` for a directory open at `dir_fd`, whose canonical path is `dir` (an `--out`
/// directory, say). Also through a FUSE file system that names a directory as its source
/// (bindfs, which shows that directory's files with their own inode numbers on a device of
/// its own, so that neither `..` nor the device tells): the source's path is compared (found
/// by a review: a bindfs view of a directory of the tree was taken as `--move-source`, and
/// moved inputs landed back in the tree).
pub(crate) fn overlap_at(
    tree: &Path,
    dir_fd: &OwnedFd,
    dir: &Path,
) -> std::io::Result<Option<&'static str>> {
    let mounts = Mounts::read();
    // `O_PATH`, as for the `..` chain: only the right to pass through is needed.
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let tree_fd = rfs::open(tree, flags, Mode::empty())?;
    let tree = Identity::of(&mounts, &tree_fd, tree)?;
    let dir = Identity::of(&mounts, dir_fd, dir)?;
    tree.overlap(&dir)
}

/// `/proc/self/mountinfo`, read once for a batch of comparisons (a config's directories are
/// compared pairwise: reading it for each pair took a minute over a thousand mounts).
#[derive(Clone)]
pub(crate) struct Mounts(std::rc::Rc<Vec<Mount>>);

thread_local! {
    /// The mount table `with_mount_table` read for the checks it runs, if it runs them.
    static SNAPSHOT: std::cell::RefCell<Option<Mounts>> = const { std::cell::RefCell::new(None) };
}

impl Mounts {
    /// The mount table now (or as `with_mount_table` read it for the checks it runs); empty
    /// where it cannot be read (the paths and `..` still tell).
    pub(crate) fn read() -> Mounts {
        if let Some(m) = SNAPSHOT.with(|s| s.borrow().clone()) {
            return m;
        }
        Mounts::read_now()
    }

    fn read_now() -> Mounts {
        Mounts(std::rc::Rc::new(parse_mounts(
            &std::fs::read("/proc/self/mountinfo").unwrap_or_default(),
        )))
    }
}

/// Runs `f`, a configuration's checks, with the mount table read once for all of them: each
/// check by identity read it again (about six per pipeline, so a service of 100 pipelines on
/// a host of 1,000 mounts took 2.4 s to start). The table is what it was when `f` began: a
/// mount made meanwhile is the same race as one made just after.
pub(crate) fn with_mount_table<T>(f: impl FnOnce() -> T) -> T {
    if SNAPSHOT.with(|s| s.borrow().is_some()) {
        return f();
    }
    struct Forget;
    impl Drop for Forget {
        fn drop(&mut self) {
            SNAPSHOT.with(|s| *s.borrow_mut() = None);
        }
    }
    SNAPSHOT.with(|s| *s.borrow_mut() = Some(Mounts::read_now()));
    let _forget = Forget;
    f()
}

/// What `overlap_at` compares of one directory, looked up once: its canonical path, where it
/// really is seen through FUSE views, its (device, inode) and its ancestors' by `..`, and
/// where it lies within its file system.
pub(crate) struct Identity {
    path: PathBuf,
    real: PathBuf,
    id: (u64, u64),
    /// Up to `/`; the error kept, reported only when the comparison needs the chain.
    ancestors: Result<Vec<(u64, u64)>, (std::io::ErrorKind, String)>,
    in_fs: Option<(Vec<u8>, PathBuf)>,
}

impl Identity {
    /// The identity of the directory open at `fd`, whose canonical path is `path`.
    pub(crate) fn of(mounts: &Mounts, fd: &OwnedFd, path: &Path) -> std::io::Result<Identity> {
        // `O_PATH`: the chain needs only the right to pass through each directory, not to
        // read it (found by a review: a 0711 ancestor owned by another user made every check
        // beneath it fail, or count as apart).
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let id = |st: &rfs::Stat| (st.st_dev, st.st_ino);
        let own = id(&rfs::fstat(fd)?);
        // The ancestors by `..` (which a bind mount does not hide), up to `/`.
        let ancestors = || -> std::io::Result<Vec<(u64, u64)>> {
            let mut out = Vec::new();
            let mut at = rfs::openat(fd, "..", flags, Mode::empty())?;
            let mut last = own;
            for _ in 0..4096 {
                let now = id(&rfs::fstat(&at)?);
                if now == last {
                    break;
                }
                out.push(now);
                last = now;
                at = rfs::openat(&at, "..", flags, Mode::empty())?;
            }
            Ok(out)
        };
        Ok(Identity {
            path: path.to_path_buf(),
            real: beneath_fuse(&mounts.0, path),
            id: own,
            ancestors: ancestors().map_err(|e| (e.kind(), e.to_string())),
            in_fs: in_file_system(&mounts.0, path),
        })
    }

    /// How the directory `dir` lies to this one (the tree): `Some("is the" | "is inside the"
    /// | "encloses the")`, or `None` where they are apart; see `overlap_at`.
    pub(crate) fn overlap(&self, dir: &Identity) -> std::io::Result<Option<&'static str>> {
        let tree = self;
        if (tree.real.as_path(), dir.real.as_path()) != (&tree.path, &dir.path) {
            if dir.real == tree.real {
                return Ok(Some("is the"));
            } else if dir.real.starts_with(&tree.real) {
                return Ok(Some("is inside the"));
            } else if tree.real.starts_with(&dir.real) {
                return Ok(Some("encloses the"));
            }
        }
        if tree.id == dir.id {
            return Ok(Some("is the"));
        }
        let below = |i: &Identity, id: &(u64, u64)| match &i.ancestors {
            Ok(a) => Ok(a.contains(id)),
            Err((kind, msg)) => Err(std::io::Error::new(*kind, msg.clone())),
        };
        if below(dir, &tree.id)? {
            return Ok(Some("is inside the"));
        }
        if below(tree, &dir.id)? {
            return Ok(Some("encloses the"));
        }
        let (Some((tdev, tpath)), Some((ddev, dpath))) = (&tree.in_fs, &dir.in_fs) else {
            return Ok(None);
        };
        if tdev != ddev {
            return Ok(None);
        }
        Ok(if dpath == tpath {
            Some("is the")
        } else if dpath.starts_with(tpath) {
            Some("is inside the")
        } else if tpath.starts_with(dpath) {
            Some("encloses the")
        } else {
            None
        })
    }
}

/// One line of `/proc/self/mountinfo`, its fields unescaped.
struct Mount {
    /// The file system's device, `major:minor`.
    dev: Vec<u8>,
    /// The directory of the file system mounted here (a bind mount's, say), from its root.
    root: PathBuf,
    point: PathBuf,
    /// The mount point's depth (components): a deeper mount hides the ones it lies in.
    depth: usize,
    /// `None` for a line without its type and source (passed over by `through_fuse`);
    /// `Some(Some(dir))` for a FUSE file system mounted from the directory `dir`.
    fuse_source: Option<Option<PathBuf>>,
}

/// `/proc/self/mountinfo`'s lines, parsed.
fn parse_mounts(text: &[u8]) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let f: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        if f.len() < 5 {
            continue;
        }
        let path = |field: &[u8]| PathBuf::from(OsString::from_vec(unescape(field)));
        let point = path(f[4]);
        let sep = f.iter().position(|x| *x == b"-");
        let typed = sep.and_then(|sep| Some((f.get(sep + 1)?, f.get(sep + 2)?)));
        let fuse_source = typed.map(|(kind, source)| {
            let source = path(source);
            (kind.starts_with(b"fuse") && source.is_absolute()).then_some(source)
        });
        out.push(Mount {
            dev: f[2].to_vec(),
            root: path(f[3]),
            depth: point.components().count(),
            point,
            fuse_source,
        });
    }
    out
}

/// Where the canonical `path` lies within its file system, from `/proc/self/mountinfo`
/// (`mounts`): the mount's device (`major:minor`) and the path from that file system's root.
/// The last mount whose mount point holds `path` hides the others.
fn in_file_system(mounts: &[Mount], path: &Path) -> Option<(Vec<u8>, PathBuf)> {
    let mut best: Option<(usize, &Mount, &Path)> = None;
    for m in mounts {
        let Ok(rest) = path.strip_prefix(&m.point) else {
            continue;
        };
        if best.as_ref().is_none_or(|b| m.depth >= b.0) {
            best = Some((m.depth, m, rest));
        }
    }
    best.map(|(_, m, rest)| (m.dev.clone(), m.root.join(rest)))
}

/// Where the canonical `path` really is, seen through FUSE file systems mounted from a
/// directory (`through_fuse`), a view of a view included (up to a depth of 8).
fn beneath_fuse(mounts: &[Mount], path: &Path) -> PathBuf {
    let mut at = path.to_path_buf();
    for _ in 0..8 {
        match through_fuse(mounts, &at) {
            Some(next) if next != at => at = next,
            _ => break,
        }
    }
    at
}

/// Where the canonical `path` really is when it lies in a FUSE file system mounted from a
/// directory (mountinfo's source field an absolute path to a directory, as bindfs gives it),
/// or in a bind mount of a directory of one (mountinfo's root field): that directory's path
/// (canonical) joined with `path`'s place in the mount; `None` otherwise, and when that path
/// does not exist.
fn through_fuse(mounts: &[Mount], path: &Path) -> Option<PathBuf> {
    let mut best: Option<(usize, PathBuf)> = None;
    for m in mounts {
        let Some(source) = &m.fuse_source else {
            continue;
        };
        let Ok(rest) = path.strip_prefix(&m.point) else {
            continue;
        };
        if best.as_ref().is_some_and(|b| m.depth < b.0) {
            continue;
        }
        let root = m.root.strip_prefix("/").unwrap_or(&m.root);
        let fuse_dir = source.as_ref().map(|s| s.join(root).join(rest));
        // A deeper mount hides the ones it lies in, FUSE or not.
        best = Some((m.depth, fuse_dir.unwrap_or_default()));
    }
    let (_, at) = best?;
    if at.as_os_str().is_empty() {
        return None;
    }
    std::fs::canonicalize(at).ok()
}

/// A mountinfo field with its octal escapes (`\040` for a space) undone.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|o| field[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(o) => {
                out.push(o.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// What a rename keeps and `Attrs` leaves out, given to a copy on another file system: the
/// set-user-ID, set-group-ID and sticky bits, only where the copy did get the input's owner
/// and group (else a set-ID program would run as whoever filepipe is), and the extended
/// attributes (labels, `user.*`). An attribute the other file system or filepipe's
/// privileges refuse is said in the log, and the move goes on: the copy's bytes are the input's.
/// Not the ACLs: `set_attrs` gave the access ACL already, or made the copy open to its owner
/// alone where it could not (a warning would leave the copy more open than its input: a
/// `0640` mode whose group bits were a mask, the group itself kept out by the ACL).
fn keep_more(input: &File, copy: &File, read: &rfs::Stat, name: &OsStr) -> Result<(), FileError> {
    let special = read.st_mode & 0o7000;
    if special != 0 {
        let st = rfs::fstat(copy).map_err(|e| FileError::errno("stat of the copy", e))?;
        if st.st_uid == read.st_uid && st.st_gid == read.st_gid {
            // Onto the permissions `set_attrs` gave (owner-only where the ACL could not go).
            rfs::fchmod(copy, Mode::from_raw_mode((st.st_mode & 0o777) | special))
                .map_err(|e| FileError::errno("setting the mode of the copy", e))?;
        } else {
            tracing::warn!(file = %name.to_string_lossy(), "copied without its set-ID bits: it could not be given the input's owner");
        }
    }
    let mut names = vec![0u8; 4096];
    let len = loop {
        match rfs::flistxattr(input, &mut names[..]) {
            Ok(n) => break n,
            Err(Errno::RANGE) if names.len() < 1 << 20 => names.resize(names.len() * 4, 0),
            Err(Errno::NOTSUP) => return Ok(()),
            Err(e) => {
                return Err(FileError::errno(
                    "listing the extended attributes of the input",
                    e,
                ))
            }
        }
    };
    let mut value = vec![0u8; 4096];
    let acl = |a: &[u8]| a.starts_with(b"system.posix_acl_");
    for attr in names[..len]
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty() && !acl(a))
    {
        let attr = OsStr::from_bytes(attr);
        let n = loop {
            match rfs::fgetxattr(input, attr, &mut value[..]) {
                Ok(n) => break Ok(n),
                Err(Errno::RANGE) if value.len() < 1 << 20 => value.resize(value.len() * 4, 0),
                Err(e) => break Err(e),
            }
        };
        let set = n.and_then(|n| rfs::fsetxattr(copy, attr, &value[..n], rfs::XattrFlags::empty()));
        if let Err(e) = set {
            tracing::warn!(file = %name.to_string_lossy(), attribute = %attr.to_string_lossy(), error = %e, "extended attribute not copied to the other file system");
        }
    }
    Ok(())
}

/// Whether `now` (the input, one link by its stat) is on a FUSE file system that has not
/// shown the link the move just made (`to` in `dest`, the very same file): bindfs keeps
/// showing the link count it had, so every move by link there was taken back as "changed or
/// gained a link" (found by a review). Where the count cannot be trusted, the link in DIR
/// being this file is all there is to go by.
fn fuse_link_unseen(src: &Dir, dest: &Dir, to: &OsStr, now: &rfs::Stat) -> bool {
    now.st_nlink == 1
        && on_fuse(src)
        && rfs::statat(&dest.fd, to, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|l| (l.st_dev, l.st_ino) == (now.st_dev, now.st_ino))
}

/// Whether libfuse keeps the file `read` in `src` as `.fuse_hidden*` (replaced while this
/// process has it open, deleted at its close): its other link is that, not a real one (found
/// by review r56b: a real second link in the tree, `ln a b`, was taken for it).
fn fuse_hidden(src: &Dir, read: &rfs::Stat) -> bool {
    if !on_fuse(src) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        src.fd.as_raw_fd()
    })) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name().as_bytes().starts_with(b".fuse_hidden")
            && rfs::statat(
                &src.fd,
                e.file_name().as_os_str(),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .is_ok_and(|st| (st.st_dev, st.st_ino) == (read.st_dev, read.st_ino))
    })
}

/// Whether `dir` is on a FUSE file system, whose link counts may lag (see `fuse_link_unseen`).
fn on_fuse(dir: &Dir) -> bool {
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    // f_type's integer type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    rfs::fstatfs(&dir.fd).is_ok_and(|fs| fs.f_type as i64 == FUSE_SUPER_MAGIC)
}

/// How a move made the input's second name, before the first goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Second {
    /// A hard link in DIR (one file system): the input has two links now, and a new ctime.
    Link,
    /// A verified copy in DIR (another file system): the input itself is untouched.
    Copy,
}

/// The last step of a move that made a second name first (`second`, `to` in `dest`): the
/// input's name goes, if it still leads to the file that was read, unchanged, with no other
/// link than one the move made. Otherwise the input stays: a link made in DIR is taken back
/// (the file is not moved, and DIR never shares a file with the tree); a copy stays, a copy of
/// the input as it was read, and the note says where. So too where `dest` is no longer
/// `within` the move directory before the input's name goes; where it left after, the input
/// is moved on into the move directory (`Within::move_on`).
fn finish_by_unlink(
    src: &Dir,
    name: &OsStr,
    read: &rfs::Stat,
    second: Second,
    dest: &Dir,
    to: &OsStr,
    within: Option<Within<'_>>,
) -> Result<Moved, FileError> {
    // The second name's file: the input itself for a link; a copy is another file, looked at
    // before the input's name goes.
    let file = match second {
        Second::Link => Some((read.st_dev, read.st_ino)),
        Second::Copy => rfs::statat(&dest.fd, to, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| (st.st_dev, st.st_ino)),
    };
    let moved = unlink_input(src, name, read, second, dest, to, within)?;
    let (Ok(path), Some(within)) = (&moved, within) else {
        return Ok(moved);
    };
    match (within.left(dest), file) {
        (None, _) => Ok(Ok(path.clone())),
        (Some(e), Some(file)) => within.move_on(dest, to, name, file, read, &e.message),
        (Some(e), None) => Err(FileError::new(
            e.kind,
            format!(
                "input moved, but {}: it is at {}",
                e.message,
                now_at(dest, to)
            ),
        )),
    }
}

/// `finish_by_unlink`, up to the input's name going.
fn unlink_input(
    src: &Dir,
    name: &OsStr,
    read: &rfs::Stat,
    second: Second,
    dest: &Dir,
    to: &OsStr,
    within: Option<Within<'_>>,
) -> Result<Moved, FileError> {
    let path = dest.path.join(to);
    let kept = |kind: Kind, why: String| -> Moved {
        let message = match second {
            Second::Link => match rfs::unlinkat(&dest.fd, to, AtFlags::empty()) {
                Ok(()) => format!("input not moved: {why}"),
                Err(e) => format!(
                    "input not moved: {why}; its link at {} could not be removed: {e}",
                    path.display()
                ),
            },
            Second::Copy => format!(
                "input kept: {why}; a copy of it as it was read is at {}",
                path.display()
            ),
        };
        Err(FileError::new(kind, message))
    };
    let now = match rfs::statat(&src.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => {
            return Ok(kept(
                Kind::Vanished,
                "it was renamed or deleted meanwhile".into(),
            ))
        }
        Err(e) => {
            let e = FileError::errno("stat of input", e);
            return Ok(kept(e.kind, e.message));
        }
    };
    let unchanged = match second {
        Second::Link => {
            same_version(&now, read) && (now.st_nlink == 2 || fuse_link_unseen(src, dest, to, &now))
        }
        Second::Copy => {
            same_version(&now, read)
                && now.st_nlink == 1
                && now.st_ctime == read.st_ctime
                && now.st_ctime_nsec == read.st_ctime_nsec
        }
    };
    if !unchanged {
        // Another file took the name since the link was made (a writer's new version renamed
        // into place): the file read lost its name to it and lives on as the link in DIR
        // alone, moved all the same. Taking the link back there would delete the file read,
        // whose only name it is (found by a review). On FUSE its count says 2 still: libfuse
        // keeps a file replaced while open (this process has it open) as `.fuse_hidden*`,
        // deleted at its close, so the link in DIR is its only name all the same (found by
        // review r56 on bindfs: the link was taken back, and the input lost).
        let replaced = (now.st_dev, now.st_ino) != (read.st_dev, read.st_ino);
        if second == Second::Link && replaced {
            let moved = rfs::statat(&dest.fd, to, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|l| {
                (l.st_dev, l.st_ino) == (read.st_dev, read.st_ino)
                    && (l.st_nlink == 1 || l.st_nlink == 2 && fuse_hidden(src, read))
            });
            if moved {
                return Ok(Ok(path));
            }
        }
        let why = "it changed or gained a link while it was moved".into();
        return Ok(kept(Kind::Changed, why));
    }
    // The second name's directory moved out of DIR while it was made (by its owner): the
    // input stays, and is not left named out there, not even as a copy (found by review r56:
    // the copy stayed, and the note named a path in DIR).
    if let Some(e) = within.and_then(|w| w.left(dest)) {
        if second == Second::Copy {
            let message = match rfs::unlinkat(&dest.fd, to, AtFlags::empty()) {
                Ok(()) => format!("input kept: {}; the copy made there was removed", e.message),
                Err(u) => format!(
                    "input kept: {}; a copy of it as it was read is at {} (it could not be \
                     removed: {u})",
                    e.message,
                    now_at(dest, to)
                ),
            };
            return Ok(Err(FileError::new(e.kind, message)));
        }
        return Ok(kept(e.kind, e.message));
    }
    // Taken from its name by a rename to a fresh name of this process's, and only then
    // removed, once that is seen to be the file just examined: a file a writer renamed over
    // the name after that look (its new version, written to a temp and renamed into place) is
    // put back, never deleted unread (found by a review: removed by name, such replacements
    // were lost, 5 of 300 with DIR on another file system). As `remove_checked` removes an
    // input.
    let temp = match take_aside(src, name) {
        Ok(temp) => temp,
        Err(Errno::NOENT) => {
            return Ok(kept(
                Kind::Vanished,
                "it was renamed or deleted meanwhile".into(),
            ))
        }
        Err(e) => {
            let e = FileError::errno("removing its old name", e);
            return Ok(kept(e.kind, e.message));
        }
    };
    let took = rfs::statat(&src.fd, &temp, AtFlags::SYMLINK_NOFOLLOW).ok();
    let file = |t: &rfs::Stat| (t.st_dev, t.st_ino) == (now.st_dev, now.st_ino);
    // Its links counted again too (one added in the tree since the look would have DIR share
    // the file with the tree), but not on FUSE, which may not show the count a rename leaves.
    let links = |t: &rfs::Stat| t.st_nlink == now.st_nlink || on_fuse(src);
    let same = took.is_some_and(|t| file(&t) && same_version(&t, read) && links(&t));
    if !same && took.is_some_and(|t| file(&t)) {
        // The very file, changed (or linked) since the look: back under its name, not moved.
        let back = rename_back(src, &temp, name);
        output::sync_dir(src)?;
        let why = match back {
            Ok(()) => "it changed or gained a link while it was moved".to_string(),
            Err(e) => format!(
                "it changed or gained a link while it was moved, and could not be put back \
                 under its name ({e}): it is at {}",
                src.path.join(&temp).display()
            ),
        };
        return Ok(kept(Kind::Changed, why));
    }
    // A copy's input loses its last name with this unlink; a link's lives on in DIR.
    let writers = match second {
        Second::Copy if same => Writers::of(src, &temp),
        _ => Writers::Unknown,
    };
    if same && writers.in_use() {
        let back = rename_back(src, &temp, name);
        output::sync_dir(src)?;
        let why = match back {
            Ok(()) => STILL_WRITTEN.to_string(),
            Err(e) => format!(
                "{STILL_WRITTEN}, and it could not be put back under its name ({e}): it is at {}",
                src.path.join(&temp).display()
            ),
        };
        return Ok(kept(Kind::InUse, why));
    }
    if same {
        if let Err(e) = rfs::unlinkat(&src.fd, &temp, AtFlags::empty()) {
            let back = rename_back(src, &temp, name);
            let e = FileError::errno("removing its old name", e);
            let message = match back {
                Ok(()) => e.message,
                Err(b) => format!(
                    "{}; and it could not be put back under its name ({b}): it is at {}",
                    e.message,
                    src.path.join(&temp).display()
                ),
            };
            return Ok(kept(e.kind, message));
        }
        output::sync_dir(src)?;
        return Ok(Ok(path));
    }
    // Another file took the name since the look: the file read lost it to that one, and
    // lives on under DIR only (the link or the verified copy made there), moved all the same.
    // The other file goes back under the name, untouched (watch mode takes it in its turn,
    // where it fails `output-exists`: its output's name holds the moved file's output).
    let back = rename_back(src, &temp, name);
    output::sync_dir(src)?;
    if let Err(e) = back {
        tracing::warn!(
            file = %src.path.join(name).display(),
            at = %src.path.join(&temp).display(),
            error = %e,
            "a file renamed over an input as it was moved could not be put back under its name"
        );
    }
    Ok(Ok(path))
}

/// Renames `name` in `dir` to a fresh temp name of this process's, returned: what is then
/// checked before it is removed (`finish_by_unlink`, `--remove-source`'s `remove_checked`), so
/// that only the file checked goes, never one renamed over the name in between.
pub(crate) fn take_aside(dir: &Dir, name: &OsStr) -> Result<OsString, Errno> {
    let temp = output::temp_name();
    match rfs::renameat_with(&dir.fd, name, &dir.fd, &temp, RenameFlags::NOREPLACE) {
        // No RENAME_NOREPLACE here (some NFS, FUSE): the temp name is this process's own and
        // fresh, so a plain rename clobbers nothing.
        Err(Errno::INVAL) => rfs::renameat(&dir.fd, name, &dir.fd, &temp)?,
        r => r?,
    }
    Ok(temp)
}

/// Whether a file about to lose its last name (`--remove-source`'s unlink, a move's unlink
/// after its copy to another file system) is open for writing by another process: its writes
/// from then on would go to a file no name leads to, lost (found by a review: a log whose
/// writer kept it open was removed, and its next lines with it). Asked of the file under its
/// private name (`take_aside`), which no writer can open anew, with a read lease taken on it
/// (`fcntl(F_SETLEASE)`, the file's owner's or `CAP_LEASE`'s): refused while anyone has it
/// open for writing, and held until the unlink, so that a writer that looked the name up
/// before it was taken aside, and opens it meanwhile, waits on the lease and shows as its
/// break. Where no lease can be had (another's file without `CAP_LEASE`, a file system
/// without leases) nothing is known, and the file goes as before.
pub(crate) enum Writers {
    /// None; the lease is held until this is dropped.
    Held(OwnedFd),
    /// Open for writing by another process.
    Open,
    /// Cannot tell.
    Unknown,
}

impl Writers {
    /// Takes the lease on `temp` in `dir`. (rustix does not wrap `F_SETLEASE`.)
    #[allow(unsafe_code)]
    pub(crate) fn of(dir: &Dir, temp: &OsStr) -> Writers {
        use std::os::fd::AsRawFd;
        // FUSE grants leases, but sees only the writers that go through it: one writing to
        // the file system beneath (a bindfs's source) is not seen (found by a review).
        if on_fuse(dir) {
            return unknown(
                &dir.path,
                "it is on FUSE, which does not see writers beneath it",
            );
        }
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rfs::openat(&dir.fd, temp, flags, Mode::empty()) {
            Ok(fd) => fd,
            // A write lease another process holds: in use.
            Err(Errno::AGAIN) => return Writers::Open,
            Err(e) => return unknown(&dir.path, &format!("it could not be opened: {e}")),
        };
        // SAFETY: fcntl on a descriptor owned here; F_SETLEASE takes an int argument.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) } == 0 {
            return Writers::Held(fd);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EBUSY) => Writers::Open,
            Some(libc::EACCES) => {
                unknown(&dir.path, "filepipe is not its owner, and lacks CAP_LEASE")
            }
            _ => unknown(&dir.path, &format!("its file system gives no lease: {e}")),
        }
    }

    /// Whether the file must keep its name: open for writing when the lease was asked for, or
    /// a writer's open waiting on it now (the lease is breaking). Asked just before the unlink.
    #[allow(unsafe_code)]
    pub(crate) fn in_use(&self) -> bool {
        use std::os::fd::AsRawFd;
        match self {
            Writers::Open => true,
            // SAFETY: fcntl on a descriptor owned here.
            Writers::Held(fd) => unsafe {
                libc::fcntl(fd.as_raw_fd(), libc::F_GETLEASE) != libc::F_RDLCK
            },
            Writers::Unknown => false,
        }
    }
}

/// `Writers::Unknown`, said once a run (as watch mode says that it cannot tell whether a file is
/// still written): the files go as before, and one still written may lose what comes next.
fn unknown(dir: &Path, why: &str) -> Writers {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            dir = %dir.display(),
            "cannot tell whether an input is still open for writing before it is removed or \
             moved to another file system ({why}); inputs go as before, and if another process \
             is still writing to one, what it writes next is lost (said once; see README, \
             --remove-source)"
        );
    }
    Writers::Unknown
}

/// Why a file open for writing by another process keeps its name (`Writers`).
pub(crate) const STILL_WRITTEN: &str =
    "another process still has it open for writing (what it writes next would be lost with it)";

/// Renames `temp` in `dir` back to `name`, clobbering nothing: where `RENAME_NOREPLACE` is
/// refused (some NFS, FUSE), by a link (which never replaces) and the temp's removal.
pub(crate) fn rename_back(dir: &Dir, temp: &OsStr, name: &OsStr) -> Result<(), Errno> {
    match rfs::renameat_with(&dir.fd, temp, &dir.fd, name, RenameFlags::NOREPLACE) {
        Err(Errno::INVAL) => match rfs::linkat(&dir.fd, temp, &dir.fd, name, AtFlags::empty()) {
            Ok(()) => rfs::unlinkat(&dir.fd, temp, AtFlags::empty()),
            // A directory made at the name (which takes no link): renamed back if the name
            // is still free, the look and the rename a moment apart (found by a review).
            Err(Errno::PERM) => match rfs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Err(Errno::NOENT) => rfs::renameat(&dir.fd, temp, &dir.fd, name),
                Ok(_) => Err(Errno::EXIST),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        r => r,
    }
}

/// Whether `now` is still the version of the file `read` was taken of: the same file, size
/// and mtime. (The ctime is compared where the move made no link, which would move it.)
pub(crate) fn same_version(now: &rfs::Stat, read: &rfs::Stat) -> bool {
    now.st_dev == read.st_dev
        && now.st_ino == read.st_ino
        && now.st_size == read.st_size
        && now.st_mtime == read.st_mtime
        && now.st_mtime_nsec == read.st_mtime_nsec
}

/// `name` with the clash number `n` (0: the name itself): `a.log` → `a.1.log`, `a` → `a.1`,
/// `.profile` → `.profile.1`. The number goes before the last extension so the copy keeps
/// its type for whatever opens it by its extension. `None` if that is over NAME_MAX.
pub(crate) fn numbered(name: &OsStr, n: u32) -> Option<OsString> {
    let bytes = name.as_bytes();
    if n == 0 {
        return Some(name.to_os_string());
    }
    let dot = bytes.iter().rposition(|&b| b == b'.').filter(|&i| i > 0);
    let (stem, ext) = bytes.split_at(dot.unwrap_or(bytes.len()));
    let mut out = Vec::with_capacity(bytes.len() + 6);
    out.extend_from_slice(stem);
    out.extend_from_slice(format!(".{n}").as_bytes());
    out.extend_from_slice(ext);
    (out.len() <= NAME_MAX).then(|| OsString::from_vec(out))
}

/// Opens a regular file in `dir` to read it, never through a symlink.
fn output_file(dir: &Dir, name: &OsStr) -> Result<File, Errno> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    rfs::openat(&dir.fd, name, flags, Mode::empty()).map(File::from)
}

/// Whether `a` and `b` both hold exactly `size` bytes, the same ones.
fn same_bytes(a: &File, b: &File, size: u64) -> Result<bool, FileError> {
    let len = |f: &File| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| FileError::io("stat", &e))
    };
    if len(a)? != size || len(b)? != size {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; 256 * 1024], vec![0u8; 256 * 1024]);
    let mut at = 0u64;
    while at < size {
        let want = (size - at).min(x.len() as u64) as usize;
        a.read_exact_at(&mut x[..want], at)
            .map_err(|e| FileError::io("reading the input back", &e))?;
        b.read_exact_at(&mut y[..want], at)
            .map_err(|e| FileError::io("reading the copy back", &e))?;
        if x[..want] != y[..want] {
            return Ok(false);
        }
        at += want as u64;
    }
    Ok(true)
}

/// The input's name no longer leads anywhere: someone else renamed or deleted it.
fn moved_away() -> FileError {
    FileError::new(
        Kind::Vanished,
        "input not moved: it was renamed or deleted meanwhile",
    )
}

/// A rename or link of the input that said ENOENT: either the input's name is gone (someone
/// else renamed or deleted it), or, with the input still there, the destination directory
/// was removed from DIR since it was opened.
fn enoent(src: &Dir, name: &OsStr, dest: &Dir, to: &OsStr) -> FileError {
    match rfs::statat(&src.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => moved_away(),
        _ => FileError {
            kind: Kind::Io,
            errno: Some(libc::ENOENT),
            message: format!(
                "input not moved: the directory of {} was removed as the input was moved there",
                dest.path.join(to).display()
            ),
        },
    }
}

/// The input changed after it was read: it stays, to be seen again.
fn changed() -> FileError {
    FileError::new(
        Kind::Changed,
        "input not moved: it changed after it was read",
    )
}

fn name_too_long(name: &OsStr, n: u32) -> FileError {
    FileError::new(
        Kind::NameTooLong,
        format!(
            "input not moved: its name is taken in the move directory, and {:?} numbered {n} \
             would be over {NAME_MAX} bytes",
            name
        ),
    )
}

fn too_many(dest: &Dir, name: &OsStr) -> FileError {
    FileError::new(
        Kind::OutputExists,
        format!(
            "input not moved: {} and {MAX_NUMBERED} numbered names of it are all taken",
            dest.path.join(name).display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_dir(path: &Path) -> Dir {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        Dir::new(
            rfs::open(path, flags, Mode::empty()).unwrap(),
            path.to_path_buf(),
        )
    }

    /// A writer's new version renamed over the input after the move linked it into DIR: the
    /// input read lives on as that link alone, so it counts moved and keeps it; the new
    /// version stays in the tree, unread. (Taken back, the link deleted the file read.)
    #[test]
    fn an_input_replaced_by_rename_while_it_is_moved_by_link_is_moved_and_the_new_one_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let (tree, moved) = (tmp.path().join("t"), tmp.path().join("m"));
        std::fs::create_dir(&tree).unwrap();
        std::fs::create_dir(&moved).unwrap();
        std::fs::write(tree.join("a"), b"read\n").unwrap();
        let (src, dest) = (open_dir(&tree), open_dir(&moved));
        let read = rfs::statat(&src.fd, "a", AtFlags::SYMLINK_NOFOLLOW).unwrap();
        rfs::linkat(&src.fd, "a", &dest.fd, "a", AtFlags::empty()).unwrap();
        std::fs::write(tree.join(".new"), b"new\n").unwrap();
        std::fs::rename(tree.join(".new"), tree.join("a")).unwrap();
        let name = OsStr::new("a");
        let r = finish_by_unlink(&src, name, &read, Second::Link, &dest, name, None).unwrap();
        assert_eq!(r.unwrap(), moved.join("a"));
        assert_eq!(std::fs::read(moved.join("a")).unwrap(), b"read\n");
        assert_eq!(std::fs::read(tree.join("a")).unwrap(), b"new\n");
        // Changed in place instead (the same file): not moved, the link taken back.
        std::fs::write(tree.join("b"), b"read\n").unwrap();
        let read = rfs::statat(&src.fd, "b", AtFlags::SYMLINK_NOFOLLOW).unwrap();
        rfs::linkat(&src.fd, "b", &dest.fd, "b", AtFlags::empty()).unwrap();
        std::fs::write(tree.join("b"), b"appended, longer\n").unwrap();
        let name = OsStr::new("b");
        let r = finish_by_unlink(&src, name, &read, Second::Link, &dest, name, None).unwrap();
        assert_eq!(r.unwrap_err().kind, Kind::Changed);
        assert!(!moved.join("b").exists());
        assert_eq!(
            std::fs::read(tree.join("b")).unwrap(),
            b"appended, longer\n"
        );
    }

    #[test]
    fn a_clash_number_goes_before_the_last_extension() {
        let n = |s: &str, n| numbered(OsStr::new(s), n).map(|o| o.into_string().unwrap());
        assert_eq!(n("a.log", 0).as_deref(), Some("a.log"));
        assert_eq!(n("a.log", 1).as_deref(), Some("a.1.log"));
        assert_eq!(n("a.tar.gz", 12).as_deref(), Some("a.tar.12.gz"));
        assert_eq!(n("README", 2).as_deref(), Some("README.2"));
        assert_eq!(n(".profile", 1).as_deref(), Some(".profile.1"));
        assert_eq!(n(&"x".repeat(255), 1), None);
        assert_eq!(n(&"x".repeat(253), 1).map(|s| s.len()), Some(255));
    }
}
