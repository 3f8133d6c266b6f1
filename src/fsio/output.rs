//! Safe, atomic output publishing.
//!
//! Invariants: an output directory is reached from its root one component at a time with
//! `O_NOFOLLOW`, so a planted symlink can never lead a write outside the output root; an output
//! is written to a mode-0600 temp file in its final directory, given the input's owner, ACL,
//! mode and times, synced, and only then given its final name (linked, or renamed, refusing an
//! existing name unless `--force`), and the directory is synced. The steps are separate
//! (`set_attrs`, `sync` into a `SyncedTemp`, `rename`, `sync_names`) so a caller can take each
//! for a group of files before the next; the types only allow a rename after the sync. A temp
//! file that is not published is removed when dropped.
//!
//! Where the file system allows it and a link needs no flush of its own (a journal commits it:
//! ext4 with a journal, XFS; or tmpfs), a temp is anonymous (`O_TMPFILE`): it has no name until
//! it is linked under its final one, and a crash leaves nothing. A named temp (elsewhere) proves
//! it is filepipe's: it carries the `user.filepipe.temp` extended attribute from just after
//! its creation until just after its rename, and its writer holds an open file description
//! lock on it for as long as it lives. `examine_temp` removes a file named like a temp only
//! with that mark and without a live lock, so no input that merely looks like a temp, and no
//! temp of a running filepipe (in another PID namespace, or on another host sharing the file
//! system), is ever deleted.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, RenameFlags, Stat, Timestamps};
use rustix::io::Errno;

use crate::error::{FileError, Kind};
use crate::fsio::acl::{self, Acl};
use crate::fsio::lock::{self as fslock, LockKind};
use crate::signals;

/// Prefix and suffix of filepipe's temp names: `.filepipe.<pid>-<salt>.<n>.tmp`. Short on
/// purpose, so a temp name fits even when the final name is close to NAME_MAX.
const TEMP_PREFIX: &str = ".filepipe.";
const TEMP_SUFFIX: &str = ".tmp";

/// The extended attribute that marks a temp as filepipe's (see the module comment).
const TEMP_MARK: &str = "user.filepipe.temp";
/// Its value in temps of filepipes before the host was recorded: such a temp may be any
/// host's, and is never removed.
const TEMP_MARK_V1: &[u8] = b"1";

/// The most bytes of a mark read: a version 3 mark is at most 55.
const MARK_MAX: usize = 128;

/// The longest a temp of this host whose writer's pids cannot be looked up here (another PID
/// namespace) may go untouched while its writer may still be alive (see `examine_temp`).
const UNTOUCHED_DEAD: std::time::Duration = std::time::Duration::from_secs(600);

/// This process's mark: `3:`, this host's id (`own_host`), the boot id and this process's PID
/// namespace (its inode), `:` between them. A sweep tells its own host's temps from other
/// hosts' on shared storage by the host: only its own host's are removed, since whether
/// another host's writer is alive its lock shows only where the mount carries locks between
/// hosts (not FUSE, not NFS mounted `nolock`). The boot says a temp of an earlier boot is dead
/// whatever its pid; the PID namespace says whether the pid in its name may be looked up here
/// (a writer in another container of this host, seen through a mount that does not carry its
/// lock, was taken for dead when its pid was not found here: found by a review). Version 2
/// marks (`2:` and the host) of earlier releases are still read.
fn own_mark() -> &'static [u8] {
    static MARK: OnceLock<Vec<u8>> = OnceLock::new();
    MARK.get_or_init(|| {
        // The boot id's first 16 hex digits: enough to tell boots apart, and the mark short.
        let boot: String = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(16)
            .collect();
        let pidns = own_pidns().map_or(String::new(), |ns| ns.to_string());
        format!("3:{}:{boot}:{pidns}", own_host()).into_bytes()
    })
}

/// This process's PID namespace, by its inode; `None` without /proc.
fn own_pidns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// What a temp's mark says of its writer.
#[derive(Debug, PartialEq, Eq)]
struct MarkOf<'a> {
    /// Its host (`own_host`); `None` for a version 1 mark, which may be any host's.
    host: Option<&'a [u8]>,
    /// Its boot id; `None` where unknown (version 2, or no /proc).
    boot: Option<&'a [u8]>,
    /// Its PID namespace; `None` where unknown.
    pidns: Option<&'a [u8]>,
}

impl<'a> MarkOf<'a> {
    /// `None` for a value that is no mark of filepipe's.
    fn parse(mark: &'a [u8]) -> Option<MarkOf<'a>> {
        let known = |b: &'a [u8]| Some(b).filter(|b| !b.is_empty());
        if mark == TEMP_MARK_V1 {
            return Some(MarkOf {
                host: None,
                boot: None,
                pidns: None,
            });
        }
        if let Some(host) = mark.strip_prefix(b"2:") {
            return Some(MarkOf {
                host: Some(host),
                boot: None,
                pidns: None,
            });
        }
        let mut parts = mark.strip_prefix(b"3:")?.splitn(3, |&b| b == b':');
        let (host, boot, pidns) = (parts.next()?, parts.next()?, parts.next()?);
        Some(MarkOf {
            host: Some(host),
            boot: known(boot),
            pidns: known(pidns),
        })
    }
}

/// This host's id: a hash of the machine id and host name. The machine id is hashed, as
/// systemd asks of anything that shows it; the host name tells apart containers made from one
/// image.
fn own_host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        use sha2::Digest as _;
        let machine = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .unwrap_or_default();
        let host = rustix::system::uname();
        let mut h = sha2::Sha256::new();
        h.update(b"filepipe temp host\0");
        h.update(machine.trim_ascii());
        h.update(b"\0");
        h.update(host.nodename().to_bytes());
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

/// Longest file name Linux file systems accept.
pub(crate) const NAME_MAX: usize = 255;

/// An open directory and the path it was reached by (for messages and the temp registry).
#[derive(Debug)]
pub(crate) struct Dir {
    /// The directory's file descriptor: all `*at` calls go through it.
    pub(crate) fd: OwnedFd,
    /// Its path, for messages only: never used to reach the directory again.
    pub(crate) path: PathBuf,
    /// Its file system and inode, to flush each directory and file system once however many
    /// handles lead to it; `None` if it could not be examined (then it is flushed on its own).
    /// Looked up at first use: a directory only synced (`--remove-source`) needs none.
    id: OnceLock<Option<(u64, u64)>>,
    /// Its file system's kind, looked up once (see `fs_kind`).
    kind: OnceLock<FsKind>,
}

impl Dir {
    /// Wraps an open directory; `path` is for messages.
    pub(crate) fn new(fd: OwnedFd, path: PathBuf) -> Dir {
        Dir {
            fd,
            path,
            id: OnceLock::new(),
            kind: OnceLock::new(),
        }
    }

    /// Its file system and inode (see the field).
    fn id(&self) -> Option<(u64, u64)> {
        *self
            .id
            .get_or_init(|| rfs::fstat(&self.fd).ok().map(|st| (st.st_dev, st.st_ino)))
    }
}

/// How outputs are made durable before they are reported published (`--durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Durability {
    /// Each group of outputs published together is flushed at once where the file system
    /// journals its metadata (ext4 with a journal, XFS, btrfs): one `syncfs` for all the
    /// group's temps, each file's own write error then checked, then the names and their
    /// directories. On ext4 without a journal, two `syncfs` in a row before the names and two
    /// after (see `sync_whole`). Elsewhere each file is flushed on its own, as with `file`.
    /// The promises of `file`, at a flush per group instead of one per file where that is
    /// sound.
    #[default]
    Group,
    /// Each output is flushed on its own (`fsync` of the file, then of its directory).
    File,
    /// Nothing is flushed, as gzip, pigz and zstd do: outputs are still written to temps and
    /// published atomically, but a crash of the machine (not of filepipe) can leave an output
    /// empty or incomplete under its final name. Refused with --move-source (and batch's
    /// --remove-source).
    None,
}

/// Opens directories below one root without following symlinks, remembering the last one so
/// consecutive files of the same directory (the walk's order) cost no syscall.
#[derive(Debug)]
pub(crate) struct DirCache {
    /// The root, opened once: every walk down starts from this descriptor, never from its
    /// path, so the root renamed away and replaced (by a symlink, say) afterwards is never
    /// followed. (Found by a review: outputs went wherever such a link led, as the root's
    /// path was looked up again at each change of directory, and with `--force` replaced
    /// files there.)
    root_dir: Arc<Dir>,
    create: bool,
    /// Whether each directory made is synced into its parent at once (a move directory, where
    /// the input's only name is about to go into it).
    sync_made: bool,
    last: Option<(PathBuf, Arc<Dir>)>,
    /// Each directory opened is swept of this host's dead temps the first time (cluster
    /// workers: see `Sweeper`).
    sweeper: Option<Arc<Sweeper>>,
}

impl DirCache {
    /// A cache for directories beneath `root`, already open; with `create`, missing ones are
    /// made.
    pub(crate) fn over(root: Arc<Dir>, create: bool) -> Self {
        DirCache {
            root_dir: root,
            create,
            sync_made: false,
            last: None,
            sweeper: None,
        }
    }

    /// The same cache, sweeping each directory it opens of stale temps the first time one of
    /// `sweeper`'s caches opens it.
    pub(crate) fn sweeping(self, sweeper: Option<Arc<Sweeper>>) -> Self {
        DirCache { sweeper, ..self }
    }

    /// A cache for directories under `root`, opened now (following it if it is a symlink:
    /// tests name roots by path).
    #[cfg(test)]
    pub(crate) fn new(root: &Path, create: bool) -> Self {
        Self::over(Arc::new(open_root(root).unwrap()), create)
    }

    /// A cache for directories beneath `root`, already open; missing ones are made, and each
    /// one made is synced into its parent before it is used.
    pub(crate) fn beneath(root: Arc<Dir>) -> Self {
        DirCache {
            sync_made: true,
            ..Self::over(root, true)
        }
    }

    /// The directory `rel_dir` (relative to the root), opened safely. `mode_of` gives what a
    /// directory that must be created takes, from its relative path.
    pub(crate) fn open(
        &mut self,
        rel_dir: &Path,
        mode_of: &dyn Fn(&Path) -> Mirror,
    ) -> Result<Arc<Dir>, FileError> {
        if let Some((_, dir)) = self.last.as_ref().filter(|(p, _)| p == rel_dir) {
            return Ok(Arc::clone(dir));
        }
        let dir = Arc::new(self.open_uncached(rel_dir, mode_of)?);
        if let Some(sweeper) = &self.sweeper {
            sweeper.sweep(&dir);
        }
        self.last = Some((rel_dir.to_path_buf(), Arc::clone(&dir)));
        Ok(dir)
    }

    /// Whether `open(rel_dir)` would give the directory remembered, not one looked up now.
    pub(crate) fn remembers(&self, rel_dir: &Path) -> bool {
        self.last.as_ref().is_some_and(|(p, _)| p == rel_dir)
    }

    /// Forgets the directory it remembers (it was deleted: the next `open` makes it again).
    pub(crate) fn forget(&mut self) {
        self.last = None;
    }

    fn open_uncached(
        &self,
        rel_dir: &Path,
        mode_of: &dyn Fn(&Path) -> Mirror,
    ) -> Result<Dir, FileError> {
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let root = &self.root_dir;
        let mut fd = rustix::io::fcntl_dupfd_cloexec(&root.fd, 0)
            .map_err(|e| FileError::errno(&format!("opening {}", root.path.display()), e))?;
        let mut path = root.path.clone();
        let mut rel = PathBuf::new();
        for comp in rel_dir.components() {
            let Component::Normal(name) = comp else {
                return Err(FileError::new(
                    Kind::UnsafeOutputPath,
                    format!("refusing path component {comp:?} in {}", rel_dir.display()),
                ));
            };
            path.push(name);
            rel.push(name);
            let flags = dir_flags | OFlags::NOFOLLOW;
            let next = match rfs::openat(&fd, name, flags, Mode::empty()) {
                Err(Errno::NOENT) if self.create => {
                    let mirror = mode_of(&rel);
                    let made = match rfs::mkdirat(&fd, name, mirror.mode) {
                        Ok(()) => true,
                        Err(Errno::EXIST) => false,
                        Err(e) => {
                            return Err(FileError::errno(
                                &format!("creating directory {}", path.display()),
                                e,
                            ))
                        }
                    };
                    let opened = rfs::openat(&fd, name, flags, Mode::empty());
                    if let (true, Ok(dir)) = (made, &opened) {
                        mirror.apply(dir);
                    }
                    // Whoever's it is now: one another user made in the moment between our
                    // look and our `mkdir` (EEXIST), or put in place of ours before we opened
                    // it, is judged as one found (found by a review, racing `mkdir` in a
                    // loop: the check was made only of directories found at the first look).
                    // (Judged by the mirror already worked out for the `mkdir`.)
                    if let Ok(dir) = &opened {
                        // One made here has the mirrored directory's permissions (`apply`):
                        // only whose it is now is asked.
                        let (full, access) = match made {
                            true => (None, None),
                            false => (mirror.full, mirror.acls.as_ref().map(|(a, _)| a.clone())),
                        };
                        self.check_found(dir, &path, || (mirror.owner, full, access))?;
                    }
                    // Its entry in its parent must survive a crash before anything's only
                    // name goes into it.
                    if made && self.sync_made {
                        rfs::fsync(&fd).map_err(|e| {
                            FileError::errno(&format!("syncing directory {}", path.display()), e)
                        })?;
                    }
                    opened
                }
                other => {
                    // Found, not made: in a mirror tree, it must be filepipe's user's or the
                    // owner's of the directory it mirrors (as made). Another user's is one
                    // they kept after their own input directory of that name went (a drop
                    // directory's `reports/`, removed and made again by someone else): the
                    // next owner's outputs and moved inputs would go where they read and
                    // delete them (found by a review).
                    if self.create {
                        if let Ok(dir) = &other {
                            self.check_found(dir, &path, || {
                                let mirror = mode_of(&rel);
                                let access = mirror.acls.map(|(a, _)| a);
                                (mirror.owner, mirror.full, access)
                            })?;
                        }
                    }
                    other
                }
            };
            fd = next.map_err(|e| match e {
                Errno::LOOP | Errno::NOTDIR => FileError {
                    kind: Kind::UnsafeOutputPath,
                    errno: Some(e.raw_os_error()),
                    message: format!(
                        "refusing to write through {}: it is a symlink or not a directory",
                        path.display()
                    ),
                },
                e => FileError::errno(&format!("opening directory {}", path.display()), e),
            })?;
        }
        Ok(Dir::new(fd, path))
    }

    /// Refuses the existing mirror directory `dir` (at `path`) unless filepipe's user or the
    /// owner of the input directory it mirrors owns it, and unless it is no more open than that
    /// directory: with more mode bits for others (or for its group, or another group), the
    /// outputs and moved inputs put in it are read, or changed, by users the input's directory
    /// kept out (found by a review: a private `0700` directory's files went into a `0755`
    /// one). `mirrors` tells that directory's owner and group, its mode and its access ACL (as
    /// `Mirror` has them for a directory made); asked only of a directory open to anyone but
    /// its owner, or not filepipe's user's. One with an access ACL must have the one `apply`
    /// would give it (the mirrored directory's, less its owning-group entry in another group),
    /// its group bits being that ACL's mask.
    fn check_found(
        &self,
        dir: &OwnedFd,
        path: &Path,
        mirrors: impl FnOnce() -> (Option<(u32, u32)>, Option<u32>, Option<Acl>),
    ) -> Result<(), FileError> {
        let st = rfs::fstat(dir)
            .map_err(|e| FileError::errno(&format!("opening directory {}", path.display()), e))?;
        let mine = st.st_uid == rustix::process::geteuid().as_raw();
        let mode = st.st_mode & 0o777;
        if mine && mode & 0o077 == 0 {
            return Ok(());
        }
        let (owner, full, input_acl) = mirrors();
        if !mine && owner.map(|(uid, _)| uid) != Some(st.st_uid) {
            let of = match owner {
                Some((uid, _)) => format!("uid {uid}"),
                None => "not known: it changed since the input was read".to_string(),
            };
            return Err(FileError::new(
                Kind::UnsafeOutputPath,
                format!(
                    "refusing to write into {}: it belongs to uid {}, neither filepipe's user nor the owner of the directory it mirrors ({of}); move it away to have it made anew",
                    path.display(),
                    st.st_uid
                ),
            ));
        }
        let (Some((_, gid)), Some(full)) = (owner, full) else {
            return Ok(());
        };
        let others = full & 0o007;
        // Its group's bits stand for the mirrored directory's group alone; members of another
        // group are only let in as far as others are. With an access ACL they are its mask, not
        // a group's rights (a directory mirrored for another group keeps a mask and no group
        // entry: found by a review), and the ACL itself is compared: it must be the one a
        // directory made for this input's would have (any other entry, a named user's say, lets
        // someone in whom the input's keeps out: found by a review of the first version, which
        // let any ACL pass).
        let group = match Acl::of_reached(dir, acl::ACCESS) {
            Acl::None if st.st_gid == gid => full & 0o070 | others << 3,
            Acl::None => others << 3,
            found => {
                let input = input_acl.unwrap_or(Acl::None);
                let same_group = st.st_gid == gid;
                let expected = if same_group {
                    input
                } else {
                    acl::without_owning_group(&input)
                };
                if !acl::no_more_open(&found, &expected, full, same_group) {
                    return Err(FileError::new(
                        Kind::UnsafeOutputPath,
                        format!(
                            "refusing to write into {}: its ACL lets in users the directory it mirrors keeps out, who could read or change what goes into it; narrow it (setfacl), or move the directory away to have it made anew",
                            path.display()
                        ),
                    ));
                }
                full & 0o070
            }
        };
        if mode & 0o077 & !(group | others) != 0 {
            return Err(FileError::new(
                Kind::UnsafeOutputPath,
                format!(
                    "refusing to write into {}: it is more open (mode {mode:04o}, group {}) than the directory it mirrors (mode {:04o}, group {gid}), so users that directory keeps out could read or change what goes into it; chmod it, or move it away to have it made anew",
                    path.display(),
                    st.st_gid,
                    full & 0o777
                ),
            ));
        }
        Ok(())
    }
}

/// Opens the root of a tree of outputs, `root` a canonical path (as every caller's is: the
/// config resolved the user's symlinks), with no symlink on the way: one there now was swapped
/// in since, by whoever may rename a directory on the path, and followed it would have every
/// output written where it leads (found by a review, racing a service's restart). Every
/// directory beneath it is then reached from this descriptor (`DirCache::over`).
pub(crate) fn open_root(root: &Path) -> Result<Dir, FileError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    crate::fsio::canonical::open(root, flags)
        .map(|fd| Dir::new(fd, root.to_path_buf()))
        .map_err(|e| {
            if crate::fsio::canonical::is_symlink_on_path(e) {
                FileError::new(
                    Kind::UnsafeOutputPath,
                    format!(
                        "refusing to write under {}: a symlink is on its path now",
                        root.display()
                    ),
                )
            } else {
                FileError::errno(&format!("opening {}", root.display()), e)
            }
        })
}

/// What a directory made to mirror an input directory takes from it (`mirrored`).
#[derive(Debug, Clone)]
pub(crate) struct Mirror {
    /// What `mkdir` makes it with (the umask applies): `0700` for a mirrored directory, open
    /// to no one else until `apply` has given it its owner, its ACLs and then its mode.
    mode: Mode,
    /// The mode `apply` then gives it, less the umask: its input directory's permissions,
    /// sticky and set-group-ID bits (which `mkdir` leaves to the parent: its files take the
    /// directory's group, as the input's do). `None`: left as made (`plain`).
    full: Option<u32>,
    /// Owner and group, given when permitted (as root; a user may give its own groups).
    owner: Option<(u32, u32)>,
    /// Its input directory's access and default ACLs, given before its mode is opened; `None`
    /// with `full`.
    acls: Option<(Acl, Acl)>,
}

impl Mirror {
    /// A directory made with `mode` only, owned by whoever makes it.
    #[cfg(test)]
    pub(crate) fn plain(mode: Mode) -> Self {
        Mirror {
            mode,
            full: None,
            owner: None,
            acls: None,
        }
    }

    /// Gives the directory just made (`dir`, `0700`) its owner and group, its input
    /// directory's ACLs, and then its mode. Only the very directory made here: one put in its
    /// place meanwhile (its parent's owner can) is not owned by this process, and is left as
    /// it is. A failure leaves it closer than its input, never more open: as `mkdir` made it
    /// if its owner or mode cannot be given (outputs keep their owner when they cannot be
    /// given the input's), open to its owner alone if its ACLs cannot.
    fn apply(&self, dir: &OwnedFd) {
        let Ok(st) = rfs::fstat(dir) else { return };
        if st.st_uid != rustix::process::geteuid().as_raw() {
            return;
        }
        if let Some((uid, gid)) = self.owner.filter(|&o| o != (st.st_uid, st.st_gid)) {
            let (u, g) = (
                rustix::process::Uid::from_raw(uid),
                rustix::process::Gid::from_raw(gid),
            );
            if rfs::fchown(dir, Some(u), Some(g)) == Err(Errno::PERM) {
                // Not root: the group alone, if this user is in it.
                let _ = rfs::fchown(dir, None, Some(g));
            }
        }
        let Some(full) = self.full else { return };
        // Not given its input directory's group: its group bits (or its ACL's owning-group
        // entry) would apply to another group, which may hold users the input's keeps out.
        let other_group = self
            .owner
            .is_some_and(|(_, gid)| rfs::fstat(dir).map_or(true, |now| now.st_gid != gid));
        let full = match &self.acls {
            _ if !other_group => full,
            Some((Acl::Some(_), _)) => full & !0o2000,
            _ => in_other_group(full),
        };
        let acls = self.acls.as_ref().map(|(access, default)| {
            if other_group {
                (
                    acl::without_owning_group(access),
                    acl::without_owning_group(default),
                )
            } else {
                (access.clone(), default.clone())
            }
        });
        // The umask applies, as to every directory filepipe makes (`rootdirs`). Read once:
        // filepipe never changes it, and a tree of many directories would read /proc for each.
        static UMASK: OnceLock<u32> = OnceLock::new();
        let umask = *UMASK.get_or_init(crate::fsio::rootdirs::umask);
        let mut bits = full & !(umask & 0o777);
        // The ACLs first, while it is still `0700`: the mode then given sets their mask to its
        // group bits, the input's mask (less the umask), so the two agree. The default ACL
        // too, as `cp -a` gives it: what is made inside inherits what the input's would.
        if let Some((access, default)) = &acls {
            let given = acl::give(dir, acl::ACCESS, access)
                .and_then(|()| acl::give(dir, acl::DEFAULT, default));
            if let Err(e) = given {
                // Its path, for the message only (as the kernel names it).
                let path = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()));
                acl::fell_back(&path.unwrap_or_default(), e);
                bits &= 0o700;
            }
        }
        // Set-group-ID set when the input has it, cleared when it has not (`mkdir` gives it
        // from the parent).
        let _ = rfs::fchmod(dir, Mode::from_raw_mode(bits));
    }
}

/// What a directory made to mirror the input directory `rel` (under `--out` or a move
/// directory) takes from it: its permissions and sticky bit (a shared `1777` inbox mirrored
/// without it would let anyone remove another's outputs, or the moved input that is now its
/// only copy), always the owner's `rwx`, its access and default ACLs (with an ACL, the group
/// bits are its mask: without it, the group would reach what the ACL keeps from it, and a user
/// it names and denies what others reach), and its owner, group and set-group-ID bit, so that
/// those who may read the inputs may reach their outputs (as root, the outputs took their
/// inputs' owners inside directories only root could enter; mirrored like `cp -a`, the
/// output tree gives each owner what the input tree gives).
///
/// `input` is the input's directory (`input_dir`, relative to the root) and its name and
/// stat as it was opened: the directory is reached beneath the input root's descriptor
/// (through the links on its way as `--follow-symlinks` follows them: one reached through a
/// link is mirrored with its own mode, not the link's `0777`), must still hold that very file,
/// and `rel`, one of its ancestors, is reached from it by `..`, up to the root itself. So what
/// is mirrored is the directories the input was read through, not whatever is at their
/// paths by now: a user who swapped their own open directory for another's private one
/// (`RENAME_EXCHANGE`) between the read and the mirror was given the private one's outputs
/// in a directory they owned (found by a review). Anything not as expected: `0700`, no owner,
/// no ACL.
pub(crate) fn mirrored(
    input_root: Option<&crate::fsio::input::Root>,
    rel: &Path,
    input_dir: &Path,
    input: Option<(&OsStr, &Stat)>,
) -> Mirror {
    let found = input_root.and_then(|root| ancestor_of_input(root, rel, input_dir, input));
    let Some((st, fd)) = found else {
        return Mirror {
            mode: Mode::RWXU,
            full: Some(0o700),
            owner: None,
            acls: Some((Acl::None, Acl::None)),
        };
    };
    Mirror {
        mode: Mode::RWXU,
        full: Some((st.st_mode & 0o3777) | 0o700),
        owner: Some((st.st_uid, st.st_gid)),
        acls: Some((
            Acl::of_reached(&fd, acl::ACCESS),
            Acl::of_reached(&fd, acl::DEFAULT),
        )),
    }
}

/// See `mirrored`: the stat of `rel`, reached up from the directory holding the input, and
/// the descriptor it was reached by (`O_PATH`).
fn ancestor_of_input(
    root: &crate::fsio::input::Root,
    rel: &Path,
    input_dir: &Path,
    input: Option<(&OsStr, &Stat)>,
) -> Option<(Stat, OwnedFd)> {
    let depth = |p: &Path| p.components().count();
    let up = depth(input_dir).checked_sub(depth(rel))?;
    if !input_dir.starts_with(rel) {
        return None;
    }
    let same = |a: &Stat, b: &Stat| (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino);
    if input_dir.as_os_str().is_empty() {
        // The root itself, which is never made.
        let fd = root.reach_following(input_dir).ok()?;
        return Some((rfs::fstat(&fd).ok()?, fd));
    }
    let mut fd = root.reach_following(input_dir).ok()?;
    if let Some((name, read)) = input {
        let now = rfs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
        if !same(&now, read) {
            return None;
        }
    }
    let mut found = None;
    for level in 0..=depth(input_dir) {
        let st = rfs::fstat(&fd).ok()?;
        if level == up {
            let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 0).ok()?;
            found = Some((st, dup));
        }
        if level == depth(input_dir) {
            // The top of the way up must be the root itself: a directory moved out of the
            // tree meanwhile is no part of it.
            return root.stat_root().ok().filter(|r| same(r, &st)).and(found);
        }
        fd = rfs::openat(
            &fd,
            "..",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
    }
    None
}

/// The times and permissions an output takes from its input.
#[derive(Debug, Clone)]
pub(crate) struct Attrs {
    /// Permission bits (no setuid/setgid/sticky: an archive is not a program).
    pub(crate) mode: u32,
    /// Owner and group, applied when permitted (as root); silently kept otherwise, like gzip.
    pub(crate) uid: u32,
    /// See `uid`.
    pub(crate) gid: u32,
    /// Access and modification times.
    pub(crate) times: Timestamps,
    /// The input's access ACL (see `fsio::acl`): with one, the group bits of `mode` are its
    /// mask, and the mode alone would let in whom the ACL keeps out.
    pub(crate) acl: Acl,
}

/// `mode`'s group bits in a group other than the one meant: no more than others get (that
/// group may hold users the input keeps out, who are others to it), and no set-group-ID bit.
pub(crate) fn in_other_group(mode: u32) -> u32 {
    mode & !0o2070 | (mode & ((mode & 0o007) << 3))
}

impl Attrs {
    /// What an output of these attributes is given in the group `gid`: these where it is the
    /// input's; where it is another (a run without the right to give the input's), its group
    /// class gives no more than others get, by the mode or by the ACL's owning-group entry
    /// (with an ACL the group bits are its mask, which named entries need).
    pub(crate) fn in_group(&self, gid: u32) -> Attrs {
        if gid == self.gid {
            return self.clone();
        }
        Attrs {
            mode: match self.acl {
                Acl::Some(_) => self.mode,
                _ => in_other_group(self.mode),
            },
            acl: acl::without_owning_group(&self.acl),
            ..self.clone()
        }
    }

    /// Attributes copied from an input's stat and its access ACL (`Acl::of` its descriptor).
    pub(crate) fn from_stat(st: &rfs::Stat, acl: Acl) -> Self {
        use rustix::fs::Timespec;
        Attrs {
            mode: st.st_mode & 0o777,
            uid: st.st_uid,
            gid: st.st_gid,
            times: Timestamps {
                last_access: Timespec {
                    tv_sec: st.st_atime as _,
                    tv_nsec: st.st_atime_nsec as _,
                },
                last_modification: Timespec {
                    tv_sec: st.st_mtime as _,
                    tv_nsec: st.st_mtime_nsec as _,
                },
            },
            acl,
        }
    }
}

/// An output being written, in the final directory, mode 0600 until its attributes are set.
/// Where the file system allows it, anonymous (`O_TMPFILE`): it has no name until it is
/// published, and a crash leaves nothing at all. Elsewhere a named temp, marked and locked as
/// filepipe's. Dropping it without publishing it removes it.
#[derive(Debug)]
pub(crate) struct TempOutput {
    dir: Arc<Dir>,
    /// The named temp's name; `None` for an anonymous one.
    name: Option<OsString>,
    file: Option<File>,
    /// The named temp's key in the registry of temps removed on an abrupt exit.
    registry_id: Option<u64>,
    /// The named temp carries the mark (the file system keeps user extended attributes).
    marked: bool,
    /// Under its final name: nothing left to remove.
    published: bool,
    /// The count of whole-file-system flush errors when it was created (see `FlushMark`).
    born: FlushMark,
    /// The file found under the final name and judged replaceable (filepipe's own output of
    /// an earlier version of the input): the only one this temp may take the place of, unless
    /// told to replace anything (`SyncedTemp::rename`).
    may_replace: Option<FileId>,
}

/// Whether an output (its mtime and ctime, `out`) is dated as filepipe dates it from its input
/// (`input_ns`, the input's mtime): the same time, or that time as a file system with coarser
/// timestamps keeps it, truncated (the kernel rounds down) to 100 ns (CIFS, NTFS), 1 us,
/// 10 ms (exFAT), 1 s (ext2 and ext3 with small inodes, HFS+, many FUSE) or 2 s (FAT). So an
/// output written with `--out` to such a file system is known for its input's, not taken for
/// another's file at every run. A coarser unit counts only where the output's ctime, which the
/// kernel sets at the file system's own granularity and nobody can set, is on a boundary of it
/// (of 10 ms for the coarsest, whose ctimes are kept finer): on a file system with nanosecond
/// times, only the same time counts, and a file dated by hand to a whole second is not taken
/// for an output of an input changed within that second.
///
/// A time nanoseconds since the epoch cannot hold (before 1678, after 2262) saturates, so
/// every such time looks the same: an input dated 2400 would find its output of the version
/// dated 2300 up to date (found by a review). Such a date tells nothing, and is never an
/// output's: the input is made again (or its output, not provably filepipe's, is reported).
pub(crate) fn dated_as(out: (i64, i64), input_ns: i64) -> bool {
    const UNITS: [i64; 5] = [100, 1_000, 10_000_000, 1_000_000_000, 2_000_000_000];
    let (mtime, ctime) = out;
    let saturated = |t: i64| t == i64::MAX || t == i64::MIN;
    if saturated(input_ns) || saturated(mtime) {
        return false;
    }
    mtime == input_ns
        || UNITS.iter().any(|&unit| {
            ctime.rem_euclid(unit.min(10_000_000)) == 0
                && mtime == input_ns - input_ns.rem_euclid(unit)
        })
}

/// The mtime and ctime of `st`, in nanoseconds since the epoch, for `dated_as`.
pub(crate) fn times_of(st: &Stat) -> (i64, i64) {
    #[allow(clippy::unnecessary_cast)]
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    #[allow(clippy::unnecessary_cast)]
    (
        ns(st.st_mtime as i64, st.st_mtime_nsec as i64),
        ns(st.st_ctime as i64, st.st_ctime_nsec as i64),
    )
}

/// A file told apart from any other that takes its name later: its device and inode, and its
/// ctime, which moves when it is renamed into place or changed, and which nobody can set (an
/// inode number freed may go to a new file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

impl FileId {
    pub(crate) fn of(st: &Stat) -> FileId {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
            #[allow(clippy::unnecessary_cast)]
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as i64),
        }
    }
}

/// This process's temp names start with this: `.filepipe.<pid>-<salt>.`. The salt tells this
/// process's temps from those of another process with the same pid (in another PID namespace,
/// or on another host sharing the file system).
fn own_prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's random source: no other process draws this.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let salt = h.finish() as u32;
        format!("{TEMP_PREFIX}{}-{salt:08x}.", std::process::id())
    })
}

/// A fresh name for a temp of this process.
pub(crate) fn temp_name() -> OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    OsString::from(format!("{}{n}{TEMP_SUFFIX}", own_prefix()))
}

/// Whether temps can be anonymous at all: `/proc/self/fd` to link one by (linking by
/// descriptor alone needs CAP_DAC_READ_SEARCH), and links of them allowed (a sandbox may
/// refuse them). File systems without `O_TMPFILE` are kept apart (`no_tmpfile`).
static ANONYMOUS: AtomicBool = AtomicBool::new(true);

/// What `FILEPIPE_TEMPS` asks for, for tests of each path on any file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TempsKnob {
    /// Unset: anonymous temps where their link needs no flush of its own, else named ones
    /// born anonymous, else (no `O_TMPFILE`) named ones created by name.
    Auto,
    /// `linked`: named temps, born anonymous (as without a journal).
    Linked,
    /// `named`: named temps created by name (as where the file system has no `O_TMPFILE`).
    Named,
}

fn temps_knob() -> TempsKnob {
    static KNOB: OnceLock<TempsKnob> = OnceLock::new();
    *KNOB.get_or_init(|| match std::env::var_os("FILEPIPE_TEMPS") {
        Some(v) if v == "named" => TempsKnob::Named,
        Some(v) if v == "linked" => TempsKnob::Linked,
        _ => TempsKnob::Auto,
    })
}

/// The file systems (by device) found to refuse anonymous files or their links: named temps
/// there are created by name. Kept per file system, so that one output tree on a file system
/// without `O_TMPFILE` (NFS, a FUSE one) costs the others nothing.
fn no_tmpfile() -> &'static std::sync::Mutex<std::collections::HashSet<u64>> {
    static SET: OnceLock<std::sync::Mutex<std::collections::HashSet<u64>>> = OnceLock::new();
    SET.get_or_init(Default::default)
}

/// Whether anonymous files may be tried in `dir`.
fn tmpfile_tried(dir: &Dir) -> bool {
    if !ANONYMOUS.load(Ordering::Relaxed) || temps_knob() == TempsKnob::Named {
        return false;
    }
    let dev = dir.id().map(|(dev, _)| dev);
    dev.is_none_or(|dev| no_tmpfile().lock().map_or(true, |set| !set.contains(&dev)))
}

/// `dir`'s file system refuses anonymous files, or their links (`e` says which).
fn refuse_tmpfile(dir: &Dir, e: Errno) {
    if let Some((dev, _)) = dir.id() {
        if let Ok(mut set) = no_tmpfile().lock() {
            if set.insert(dev) {
                tracing::debug!(dir = %dir.path.display(), error = %e, "no anonymous temps on this file system");
            }
        }
    }
}

/// Whether `e`, from making or linking an anonymous file, means the file system (or a sandbox)
/// does not allow it, rather than a failure of this one file (no space, a directory removed).
fn tmpfile_unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOSYS | Errno::PERM | Errno::XDEV
    )
}

impl TempOutput {
    /// Creates a fresh temp in `dir` for an output made durable file by file (`File`): see
    /// `create_for`.
    pub(crate) fn create(dir: Arc<Dir>) -> Result<Self, FileError> {
        Self::create_for(dir, Durability::File)
    }

    /// Creates a fresh temp in `dir` for an output to be published with `durability`:
    /// anonymous where it can be and its link will be made durable without a flush of its own
    /// (`anonymous_suits`), else named, locked and marked as this process's.
    pub(crate) fn create_for(dir: Arc<Dir>, durability: Durability) -> Result<Self, FileError> {
        let failed =
            |e| FileError::errno(&format!("creating temp file in {}", dir.path.display()), e);
        if temps_knob() == TempsKnob::Auto
            && tmpfile_tried(&dir)
            && anonymous_suits(&dir, durability)
        {
            match create_anonymous(&dir) {
                Ok(fd) => {
                    return Ok(TempOutput {
                        dir,
                        name: None,
                        file: Some(File::from(fd)),
                        registry_id: None,
                        marked: false,
                        published: false,
                        born: flush_mark(),
                        may_replace: None,
                    })
                }
                // Not supported by this file system: temps are created by name here from now on.
                Err(e) if tmpfile_unsupported(e) => refuse_tmpfile(&dir, e),
                Err(e) => return Err(failed(e)),
            }
        }
        loop {
            let name = temp_name();
            match create_named(&dir, &name) {
                Ok((fd, marked)) => {
                    let registry_id = Some(signals::register_temp(dir.path.join(&name)));
                    return Ok(TempOutput {
                        dir,
                        name: Some(name),
                        file: Some(File::from(fd)),
                        registry_id,
                        marked,
                        published: false,
                        born: flush_mark(),
                        may_replace: None,
                    });
                }
                // Left by another process with our name (the salt makes that all but
                // impossible): take the next number.
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(failed(e)),
            }
        }
    }

    /// The open temp file, for writing.
    pub(crate) fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("temp file is open until publish")
    }

    /// The open temp file, for reading it back (`read_at`, or `ReadAt`).
    pub(crate) fn contents(&self) -> &File {
        self.file.as_ref().expect("temp file is open until publish")
    }

    /// The file now under the final name that this temp may take the place of (see
    /// `may_replace`): judged when the output was found, it must still be that very file at the
    /// rename, or the rename refuses (a file moved there meanwhile is another's).
    pub(crate) fn may_replace(&mut self, found: FileId) {
        self.may_replace = Some(found);
    }

    /// Gives an anonymous temp a temp name, as a named temp is made (see `create_named`):
    /// locked, marked and registered first, so a crash at any instant leaves nothing a sweep
    /// cannot prove to be filepipe's. `EXIST` takes the next name.
    fn give_name(&mut self) -> Result<(), Errno> {
        let file = self.file.as_ref().expect("open until published");
        fslock::lock(file, LockKind::Write, false)?;
        let marked = mark(file.as_fd(), &self.dir.path);
        let name = loop {
            let name = temp_name();
            match link_anonymous(file, &self.dir, &name) {
                Ok(()) => break name,
                Err(Errno::EXIST) => continue,
                Err(e) => {
                    no_anonymous_temps(e);
                    return Err(e);
                }
            }
        };
        self.registry_id = Some(signals::register_temp(self.dir.path.join(&name)));
        self.name = Some(name);
        self.marked = marked;
        Ok(())
    }

    /// The temp, just given `final_name`, as published: nothing of it left to remove.
    /// `flushed_anonymous`: it was still anonymous when its data was flushed, so its first link
    /// (to `final_name`, or to a temp name to rename over it from) came after the flush.
    fn published(&mut self, final_name: &OsStr, flushed_anonymous: bool) -> Named {
        self.published = true;
        if let Some(id) = self.registry_id.take() {
            signals::unregister_temp(id);
        }
        Named {
            dir: Arc::clone(&self.dir),
            name: final_name.to_os_string(),
            // Linked after its flush where a link needs a flush of its own (see
            // `anonymous_suits`): a replacing publish's temp name too (found by a review: its
            // link count was left to a single `syncfs`, whose cache flush comes before it
            // writes the inode tables).
            link_unflushed: flushed_anonymous && link_needs_fsync(&self.dir),
            file: self.file.take().expect("open until published"),
        }
    }

    /// Gives the temp the input's owner, ACL, mode and times. Done before the data is flushed,
    /// so they are durable with it; `final_name` is for messages.
    pub(crate) fn set_attrs(&mut self, final_name: &OsStr, a: &Attrs) -> Result<(), FileError> {
        let ctx = |what: &str| format!("{what} {}", self.dir.path.join(final_name).display());
        let file = self.file.as_ref().expect("temp file is open until synced");
        // chown first: it may clear mode bits, and it only succeeds with privilege. Called even
        // when the owner looks right already: which group a new file gets depends on the mount
        // (grpid) and on its directory's set-group-ID bit at that instant, so only this call
        // makes sure the output is never readable by a group its input was not.
        let chowned = rfs::fchown(
            file,
            Some(rustix::fs::Uid::from_raw(a.uid)),
            Some(rustix::fs::Gid::from_raw(a.gid)),
        );
        // Not given the input's group (a run without the right to: the shipped units' user),
        // its group bits, or its ACL's owning-group entry, would apply to another group than
        // the input's, which may hold users the input's keeps out (found by a review): they
        // give no more than others get then (`Attrs::in_group`). Named entries stay.
        let narrowed;
        let a = if chowned.is_err() {
            // u32::MAX, no group, where the stat fails: the group class is narrowed then.
            let gid = rfs::fstat(file).map_or(u32::MAX, |st| st.st_gid);
            narrowed = a.in_group(gid);
            &narrowed
        } else {
            a
        };
        // The ACL before the mode, while the temp is still `0600` (a named temp can be opened
        // by its name until it is published): the mode then sets the ACL's mask to the input's
        // mask, its group bits, so the two agree. Where the input has none, one the temp
        // inherited from its directory's default ACL goes, as `cp -a` removes it: its mask
        // would be the mode's group bits, letting in whom the directory names.
        let mode = match acl::give(file, acl::ACCESS, &a.acl) {
            Ok(()) => a.mode,
            Err(e) => {
                acl::fell_back(&self.dir.path.join(final_name), e);
                a.mode & 0o700
            }
        };
        rfs::fchmod(file, Mode::from_raw_mode(mode))
            .map_err(|e| FileError::errno(&ctx("setting mode of"), e))?;
        rfs::futimens(file, &a.times).map_err(|e| FileError::errno(&ctx("setting times of"), e))
    }

    /// Starts the kernel's write-back of everything written, without waiting. Only a hint:
    /// durability comes from `sync`, which then mostly waits for I/O already under way.
    pub(crate) fn start_writeback(&self) {
        if let Some(file) = &self.file {
            start_writeback(file);
        }
    }

    /// fsyncs the temp: data, mode and times are all durable before the final name can
    /// appear, so a crash never leaves an output a rerun would not recognise. The file stays
    /// open until it is published. `final_name` is for messages.
    pub(crate) fn sync(self, final_name: &OsStr) -> Result<SyncedTemp, FileError> {
        let result = flush_on(&self.dir, || {
            self.file.as_ref().expect("synced once").sync_all()
        });
        self.synced(result, final_name)
    }

    /// The temp, synced, given the result of its `fsync`.
    fn synced(
        self,
        fsync: std::io::Result<()>,
        final_name: &OsStr,
    ) -> Result<SyncedTemp, FileError> {
        fsync.map_err(|e| {
            let path = self.dir.path.join(final_name);
            FileError::io(&format!("syncing {}", path.display()), &e)
        })?;
        Ok(SyncedTemp(self))
    }
}

/// An anonymous temp in `dir` (read-write: it is read back through its own descriptor, since
/// once it has the input's mode it may not be opened again). `NOENT` where there is no
/// `/proc/self/fd` to link it by later.
fn create_anonymous(dir: &Dir) -> Result<OwnedFd, Errno> {
    static USABLE: OnceLock<bool> = OnceLock::new();
    let usable = *USABLE.get_or_init(|| Path::new("/proc/self/fd").is_dir());
    if !usable {
        // No /proc to link one by: not here, and nowhere else either.
        ANONYMOUS.store(false, Ordering::Relaxed);
        return Err(Errno::NOSYS);
    }
    let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
    let fd = rfs::openat(&dir.fd, ".", flags, Mode::from_raw_mode(0o600))?;
    // Once per process: can such a file be linked here? (A sandbox may allow O_TMPFILE and
    // refuse the link; finding out at the first publish would cost that file's work.) With a
    // probe file of its own: an anonymous file can be linked once only.
    static LINKS: OnceLock<bool> = OnceLock::new();
    let links = *LINKS.get_or_init(|| {
        let Ok(probe) = rfs::openat(&dir.fd, ".", flags, Mode::from_raw_mode(0o600)) else {
            return false;
        };
        // Locked and marked before it has a name, as every temp, and unlinked before its lock
        // goes with its descriptor: a crash before the unlink leaves nothing a sweep cannot
        // remove, and no sweep ever sees it unlocked while this process lives.
        let _ = fslock::lock(&probe, LockKind::Write, true);
        mark(&probe, &dir.path);
        let probe = File::from(probe);
        let name = temp_name();
        let linked = link_anonymous(&probe, dir, &name).is_ok();
        if linked {
            let _ = rfs::unlinkat(&dir.fd, &name, AtFlags::empty());
        }
        drop(probe);
        linked
    });
    if !links {
        // A sandbox that allows O_TMPFILE and refuses the link: nowhere, then.
        ANONYMOUS.store(false, Ordering::Relaxed);
        return Err(Errno::NOSYS);
    }
    Ok(fd)
}

/// After a link of an anonymous temp failed with `e` (other than `EXIST`): later temps are
/// named (this one's file fails).
fn no_anonymous_temps(e: Errno) {
    if ANONYMOUS.swap(false, Ordering::Relaxed) {
        tracing::warn!(error = %e, "cannot link anonymous temps here: creating them by name");
    }
}

/// Gives the anonymous file `fd` the name `name` in `dir`, failing with `EXIST` if it is taken.
fn link_anonymous(fd: &File, dir: &Dir, name: &OsStr) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let proc_link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rfs::linkat(rfs::CWD, &proc_link, &dir.fd, name, AtFlags::SYMLINK_FOLLOW)
}

/// Creates the named temp `name` in `dir` (where anonymous temps cannot be published), locked
/// and marked as this process's. Where the file system has anonymous files, it is made
/// anonymous, locked and marked, and only then given its name: it never exists by name without
/// its mark and its lock, so a crash at any instant leaves nothing a sweep cannot prove to be
/// filepipe's. (Its name comes before its first byte, so the fsync of its data also writes its
/// link count.) Elsewhere it is created by name, then locked and marked: a crash between the
/// two leaves an empty, unmarked temp, which no sweep removes; it is reported instead.
fn create_named(dir: &Dir, name: &OsStr) -> Result<(OwnedFd, bool), Errno> {
    if tmpfile_tried(dir) {
        match create_anonymous(dir) {
            Ok(fd) => {
                // Dropped on failure: an anonymous file leaves nothing behind.
                fslock::lock(&fd, LockKind::Write, true)?;
                let marked = mark(&fd, &dir.path);
                let file = File::from(fd);
                match link_anonymous(&file, dir, name) {
                    Ok(()) => return Ok((OwnedFd::from(file), marked)),
                    Err(e) if tmpfile_unsupported(e) => refuse_tmpfile(dir, e),
                    // EXIST (the caller takes the next name), or a failure of this file (no
                    // space, the directory removed): never a reason to create by name.
                    Err(e) => return Err(e),
                }
            }
            Err(e) if tmpfile_unsupported(e) => refuse_tmpfile(dir, e),
            Err(e) => return Err(e),
        }
    }
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::openat(&dir.fd, name, flags, Mode::from_raw_mode(0o600))?;
    if let Err(e) = fslock::lock(&fd, LockKind::Write, true) {
        let _ = rfs::unlinkat(&dir.fd, name, AtFlags::empty());
        return Err(e);
    }
    let marked = mark(&fd, &dir.path);
    Ok((fd, marked))
}

/// Sets filepipe's mark on a new named temp; false where the file system keeps no user
/// extended attributes (NFSv3, some FUSE ones): the temp is still locked and removed on
/// failure, but a crash leaves it for the user.
fn mark(fd: impl AsFd, dir: &Path) -> bool {
    match rfs::fsetxattr(fd, TEMP_MARK, own_mark(), rfs::XattrFlags::empty()) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "temp not marked");
            false
        }
    }
}

/// A temp output whose data and attributes are durable, ready for its final name. Dropping it
/// without `rename` removes it.
#[derive(Debug)]
pub(crate) struct SyncedTemp(TempOutput);

impl SyncedTemp {
    /// The directory the temp is in.
    pub(crate) fn dir(&self) -> &Arc<Dir> {
        &self.0.dir
    }

    /// The open temp file, for reading it back.
    pub(crate) fn file(&self) -> &File {
        self.0.file.as_ref().expect("open until renamed")
    }

    /// Gives the temp its final name (refusing to replace an existing file unless `replace`, or
    /// unless it is the very one the temp `may_replace`) and returns it as `Named`, whose directory the caller must sync before reporting the
    /// output as published: until then the new name may not survive a crash. An anonymous temp is
    /// linked under the name (a replacing one under a temp name first, then renamed over it);
    /// a named one is renamed, its mark removed once the name is final (a crash in between
    /// leaves it on an output, where it means nothing). On failure the temp is still there,
    /// to be looked at, until this is dropped.
    pub(crate) fn rename(&mut self, final_name: &OsStr, replace: bool) -> Result<Named, FileError> {
        let temp = &mut self.0;
        let path = temp.dir.path.join(final_name);
        let ctx = |what: &str| format!("{what} {}", path.display());
        let exists = |e: Errno| FileError {
            kind: Kind::OutputExists,
            errno: Some(e.raw_os_error()),
            message: format!("{} already exists; not overwritten", ctx("output")),
        };
        // A directory at the name, which `--force` does not replace (a rename over one says
        // EISDIR; it failed `io`, "Is a directory": found by a review).
        let a_dir = |e: Errno| FileError {
            kind: Kind::OutputExists,
            errno: Some(e.raw_os_error()),
            message: format!(
                "{} is a directory; not replaced, even with --force",
                ctx("output")
            ),
        };
        // A file judged replaceable when the output was found (filepipe's own, of an earlier
        // version) is replaced only if it is still that very file: one moved to the name since
        // (while the input was read, or the group flushed) is another's. Looked at just before
        // the rename; the name found free is taken only if it still is (no-clobber).
        let replace = match (replace, temp.may_replace) {
            (true, _) => true,
            (false, None) => false,
            (false, Some(found)) => {
                match rfs::statat(&temp.dir.fd, final_name, AtFlags::SYMLINK_NOFOLLOW) {
                    Err(Errno::NOENT) => false,
                    Ok(st) if FileId::of(&st) == found => true,
                    Ok(_) => {
                        return Err(FileError {
                            message: format!(
                                "{} changed since it was found to be filepipe's own output of an earlier version; not overwritten",
                                ctx("output")
                            ),
                            ..exists(Errno::EXIST)
                        })
                    }
                    Err(e) => return Err(FileError::errno(&ctx("stat of output"), e)),
                }
            }
        };
        // Anonymous still: flushed before it had any name (see `published`).
        let flushed_anonymous = temp.name.is_none();
        if flushed_anonymous {
            let file = temp.file.as_ref().expect("open until renamed");
            // The link never replaces, so it is all a publish takes where nothing may be
            // replaced, and where something may but the name is free (as it mostly is: `--force`
            // over a tree without outputs yet). A name taken (`EXIST`) is replaced by a rename
            // over it, the only way to replace a file by another atomically, from a temp name.
            match link_anonymous(file, &temp.dir, final_name) {
                Ok(()) => return Ok(temp.published(final_name, true)),
                Err(e @ Errno::EXIST) if !replace => return Err(exists(e)),
                Err(Errno::EXIST) => temp
                    .give_name()
                    .map_err(|e| FileError::errno(&ctx("publishing"), e))?,
                Err(e) => {
                    no_anonymous_temps(e);
                    return Err(FileError::errno(&ctx("publishing"), e));
                }
            }
        }
        let file = temp.file.as_ref().expect("open until renamed");
        let Some(name) = &temp.name else {
            return Err(FileError::new(
                Kind::Internal,
                "an anonymous temp was neither linked nor named",
            ));
        };
        let flags = if replace {
            RenameFlags::empty()
        } else {
            RenameFlags::NOREPLACE
        };
        // Its temp gone from a directory still there: removed under the writer (by
        // hand, or by a sweep of another host that took it for dead), which says
        // nothing of the input. As `vanished`, the input was taken for deleted: a
        // watch forgot the file until its next scan.
        let dir_there = || rfs::fstat(&temp.dir.fd).is_ok_and(|st| st.st_nlink > 0);
        let failed = |e: Errno| match e {
            Errno::EXIST => exists(e),
            Errno::ISDIR => a_dir(e),
            Errno::NOENT if dir_there() => FileError {
                kind: Kind::Io,
                errno: Some(e.raw_os_error()),
                message: format!(
                    "{}: its temp file {} was removed while the output was written; \
                     not published",
                    ctx("publishing"),
                    name.to_string_lossy()
                ),
            },
            e => FileError::errno(&ctx("publishing"), e),
        };
        match rfs::renameat_with(&temp.dir.fd, name, &temp.dir.fd, final_name, flags) {
            Ok(()) => {}
            // A file system that cannot rename without replacing (FUSE ones such as
            // exfat-fuse and fusefat refuse the flag).
            Err(Errno::INVAL) if !replace => {
                no_clobber_elsewise(&temp.dir, name, final_name).map_err(failed)?
            }
            Err(e) => return Err(failed(e)),
        }
        if temp.marked {
            let _ = rfs::fremovexattr(file, TEMP_MARK);
        }
        Ok(temp.published(final_name, flushed_anonymous))
    }
}

/// Gives the named temp `name` in `dir` the name `final_name` without replacing a file there,
/// on a file system that refuses `RENAME_NOREPLACE`: a hard link, which never replaces, then
/// the temp name's unlink; where there are no hard links either (FAT), a look that finds the
/// name free and then a plain rename, which replaces a file only if one appears between the
/// two calls (said once in the log).
fn no_clobber_elsewise(dir: &Dir, name: &OsStr, final_name: &OsStr) -> Result<(), Errno> {
    match rfs::linkat(&dir.fd, name, &dir.fd, final_name, AtFlags::empty()) {
        Ok(()) => {
            // The output is published under both names; the temp name goes (a failure leaves
            // a second name of the output, which a later sweep never removes: its mark is
            // taken off the output once published).
            let _ = rfs::unlinkat(&dir.fd, name, AtFlags::empty());
            Ok(())
        }
        Err(Errno::EXIST) => Err(Errno::EXIST),
        Err(_) => {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(dir = %dir.path.display(), "this file system can neither rename without replacing nor hard-link: an output is renamed into place once its name is found free, and a file made there between the two would be replaced");
            }
            match rfs::statat(&dir.fd, final_name, AtFlags::SYMLINK_NOFOLLOW) {
                Err(Errno::NOENT) => rfs::renameat(&dir.fd, name, &dir.fd, final_name),
                Ok(_) => Err(Errno::EXIST),
                Err(e) => Err(e),
            }
        }
    }
}

/// An output just given its final name, its directory not yet flushed.
#[derive(Debug)]
pub(crate) struct Named {
    dir: Arc<Dir>,
    name: OsString,
    /// The output, still open: it tells it from whatever may take its name later (while it is
    /// open its inode number cannot go to another file).
    file: File,
    /// First linked (under this name, or under a temp name renamed over an old output) after
    /// its data's flush, on a file system where the new link count reaches the disk with no
    /// directory's `fsync` (no journal): it needs a flush of its own, or its file system's
    /// whole (see `sync_names`).
    link_unflushed: bool,
}

impl Named {
    /// Its name, for `sync_names`.
    pub(crate) fn new_name(&self) -> NewName<'_> {
        NewName {
            dir: &self.dir,
            link: self.link_unflushed.then_some((&self.file, &*self.name)),
        }
    }

    /// Takes the name back after its directory's flush failed: the file is reported failed,
    /// and an output left under its name, with its input's times, would be taken for up to
    /// date by the next run, which would then never make it durable. Removed only while the
    /// name still leads to this very output (someone else's file put there since is left
    /// alone; one put there between that look and the unlink is the race this leaves open, for
    /// a file already failing on a failing disk).
    pub(crate) fn withdraw(&self) {
        let ours = match (
            rfs::statat(&self.dir.fd, &self.name, AtFlags::SYMLINK_NOFOLLOW),
            rfs::fstat(&self.file),
        ) {
            (Ok(now), Ok(out)) => (now.st_dev, now.st_ino) == (out.st_dev, out.st_ino),
            _ => false,
        };
        if ours {
            if let Err(e) = rfs::unlinkat(&self.dir.fd, &self.name, AtFlags::empty()) {
                tracing::warn!(path = %self.dir.path.join(&self.name).display(), error = %e,
                    "could not take back an output whose name did not reach the disk");
            }
        }
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if let (false, Some(name)) = (self.published, &self.name) {
            // Unlinked while still locked: no sweeper can see it unlocked under its name.
            let _ = rfs::unlinkat(&self.dir.fd, name, AtFlags::empty());
        }
        // An anonymous temp goes with its last descriptor.
        drop(self.file.take());
        if let Some(id) = self.registry_id.take() {
            signals::unregister_temp(id);
        }
    }
}

/// What a file named like a filepipe temp turned out to be (see `examine_temp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TempFound {
    /// This process's own temp, or gone by now: nothing to say about it.
    Ignore,
    /// The temp of a running filepipe (it holds the lock): left alone.
    InUse,
    /// Left by a filepipe that stopped (marked, unlocked), and removed.
    Removed,
    /// Left by a filepipe that stopped, and kept: the caller does not own this tree.
    Stale,
    /// Marked by another host's filepipe (or one too old to say which host), and not locked
    /// here: it may still be written by a live writer whose lock this mount does not show, so
    /// it is never removed.
    Foreign,
    /// Named like a temp but without the mark, or not examinable (the errno): neither read nor
    /// removed, since nothing proves filepipe made it.
    Unmarked(Option<Errno>),
}

/// Looks at `name` in `dir` (a temp-like name): removes it, with `remove`, only if it carries
/// filepipe's mark and no live process holds its lock, and only the very file it examined.
pub(crate) fn examine_temp(dir: &impl AsFd, name: &OsStr, remove: bool) -> TempFound {
    if name.as_bytes().starts_with(own_prefix().as_bytes()) {
        return TempFound::Ignore;
    }
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rfs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return TempFound::Ignore,
        Err(e) => return TempFound::Unmarked(Some(e)),
    };
    let Ok(st) = rfs::fstat(&fd) else {
        return TempFound::Unmarked(None);
    };
    // The verdict stands only if the name still leads to the file examined: a temp published
    // (renamed) meanwhile is no longer there to speak of.
    let still_there = |found: TempFound| match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(now) if now.st_dev == st.st_dev && now.st_ino == st.st_ino => found,
        _ => TempFound::Ignore,
    };
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
        return still_there(TempFound::Unmarked(None));
    }
    // Locked by its writer: alive, wherever it runs. Held from here to the unlink, so no
    // writer can take it up meanwhile.
    match fslock::lock(&fd, LockKind::Read, false) {
        Ok(()) => {}
        Err(Errno::AGAIN | Errno::ACCESS) => return still_there(TempFound::InUse),
        Err(e) => return still_there(TempFound::Unmarked(Some(e))),
    }
    let mut value = [0u8; MARK_MAX];
    let value = match rfs::fgetxattr(&fd, TEMP_MARK, &mut value[..]) {
        Ok(n) => &value[..n],
        Err(_) => &[][..],
    };
    let Some(mark) = MarkOf::parse(value) else {
        return still_there(TempFound::Unmarked(None));
    };
    let own = MarkOf::parse(own_mark());
    let own = own.as_ref();
    if mark.host.is_none() || mark.host != own.and_then(|o| o.host) {
        return still_there(TempFound::Foreign);
    }
    // This host's and unlocked. Its lock may have been taken through another mount of the same
    // files (a FUSE view of a directory written directly), which does not show it here, so the
    // writer is looked for too.
    let alive = writer_may_live(&mark, own, || untouched(&st), || writer_alive(name));
    if alive {
        return still_there(TempFound::InUse);
    }
    if !remove {
        return still_there(TempFound::Stale);
    }
    match still_there(TempFound::Removed) {
        TempFound::Removed => match rfs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) => TempFound::Removed,
            Err(Errno::NOENT) => TempFound::Ignore,
            Err(e) => TempFound::Unmarked(Some(e)),
        },
        other => other,
    }
}

/// Removes this host's dead temps from each directory a cluster worker writes into, the first
/// time it does. A local run's walk sweeps its tree as it lists it (and `--out`, the move
/// directories and the manifest's directory at its start), but a worker walks nothing: the
/// temps a killed worker left (named ones, where the file system has no `O_TMPFILE`: NFS and
/// others shared storage is made of) stayed for ever on a host that runs only workers (found
/// by a review). Only what `examine_temp` proves dead is removed: marked by this host, its
/// lock free and its writer's pid gone; a live writer's temp, or another host's, is left.
/// The directories swept are remembered by identity for the pipeline's life, up to `MOST`
/// of them, then forgotten and swept again as they come: one listing of a directory each time.
#[derive(Debug, Default)]
pub(crate) struct Sweeper {
    swept: std::sync::Mutex<std::collections::HashSet<(u64, u64)>>,
}

impl Sweeper {
    /// The most directories remembered (16 bytes each).
    const MOST: usize = 1 << 20;

    /// Sweeps `dir` unless it was swept already.
    pub(crate) fn sweep(&self, dir: &Dir) {
        let Some(id) = dir.id() else {
            return;
        };
        {
            let mut swept = self
                .swept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if swept.len() >= Self::MOST {
                swept.clear();
            }
            if !swept.insert(id) {
                return;
            }
        }
        let removed = sweep_dir(dir);
        if removed > 0 {
            tracing::info!(
                dir = %dir.path.display(),
                removed,
                "removed stale temp files a stopped filepipe of this host left"
            );
        }
    }
}

/// Removes the dead temps of this host in `dir` (its own entries only); returns how many.
fn sweep_dir(dir: &Dir) -> u64 {
    // A descriptor of its own to list with: `dir.fd` is shared, and listing moves its offset.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let Ok(fd) = rfs::openat(&dir.fd, ".", flags, Mode::empty()) else {
        return 0;
    };
    let mut temps = Vec::new();
    let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 32 * 1024];
    let mut entries = rfs::RawDir::new(&fd, &mut buf);
    while let Some(Ok(e)) = entries.next() {
        let name = OsStr::from_bytes(e.file_name().to_bytes());
        if matches!(
            e.file_type(),
            rfs::FileType::RegularFile | rfs::FileType::Unknown
        ) && is_temp_name(name)
        {
            temps.push(name.to_owned());
        }
    }
    let mut removed = 0;
    for name in temps {
        match examine_temp(&dir.fd, &name, true) {
            TempFound::Removed => removed += 1,
            // At debug: each run's first write into the directory would say it again, and
            // anyone may name files so (a review filled a log that way). A coordinator's walk
            // reports such names in the tree.
            TempFound::Unmarked(_) => tracing::debug!(
                path = %dir.path.join(&name).display(),
                "named like a filepipe temp file but not marked as one: left alone"
            ),
            TempFound::Ignore | TempFound::InUse | TempFound::Stale | TempFound::Foreign => {}
        }
    }
    removed
}

/// Whether the writer of an unlocked temp of this host, marked `mark`, may still be alive, as
/// far as this process (marked `own`) can tell: of an earlier boot, it is dead; in this PID
/// namespace, it lives while the pid in the temp's name runs (`pid_runs`: a reused pid only
/// keeps a dead temp for longer); in another one, where its pids mean nothing here, it is
/// taken for alive until the temp has gone untouched (`untouched`) for `UNTOUCHED_DEAD` (a
/// container restarted leaves such temps: removed then). A boot is compared only where both
/// are known: a process that cannot read the boot id (the shipped units' `ProcSubset=pid`
/// hides /proc/sys) took every temp naming one for an earlier boot's, a live one too (found by
/// a review).
fn writer_may_live(
    mark: &MarkOf,
    own: Option<&MarkOf>,
    untouched: impl FnOnce() -> std::time::Duration,
    pid_runs: impl FnOnce() -> bool,
) -> bool {
    let earlier_boot =
        matches!((mark.boot, own.and_then(|o| o.boot)), (Some(a), Some(b)) if a != b);
    let elsewhere = mark.pidns.is_some() && mark.pidns != own.and_then(|o| o.pidns);
    if earlier_boot {
        false
    } else if elsewhere {
        untouched() < UNTOUCHED_DEAD
    } else {
        pid_runs()
    }
}

/// How long ago `st`'s file was last written or changed (zero if in the future), by its ctime
/// alone: a writer's last steps set its mtime to its input's, which may be any date (one in
/// 2100 kept a dead temp until then: found by a review), and nobody can set a ctime.
fn untouched(st: &Stat) -> std::time::Duration {
    let (_, last) = times_of(st);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    std::time::Duration::from_nanos(now.saturating_sub(last).max(0) as u64)
}

/// Whether the process whose pid a temp's name carries (`.filepipe.<pid>-...`) exists here.
fn writer_alive(name: &OsStr) -> bool {
    let Some(rest) = name.as_bytes().strip_prefix(TEMP_PREFIX.as_bytes()) else {
        return false;
    };
    let digits = rest.split(|&b| b == b'-').next().unwrap_or(b"");
    let pid = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw);
    match pid {
        // Our own pid with another salt (the name's prefix is not ours): an earlier process
        // with this pid, as a container's entrypoint always is 1, now dead.
        Some(pid) if pid.as_raw_nonzero().get() as u32 == std::process::id() => false,
        // EPERM: it exists, as another user's.
        Some(pid) => !matches!(rustix::process::test_kill_process(pid), Err(Errno::SRCH)),
        None => false,
    }
}

/// Reads a file from its start through `pread`, leaving its descriptor's offset alone (a temp
/// is read back this way while it is still being published).
pub(crate) struct ReadAt<'f> {
    file: &'f File,
    pos: u64,
}

impl<'f> ReadAt<'f> {
    /// A reader of `file` from offset 0.
    pub(crate) fn new(file: &'f File) -> Self {
        ReadAt { file, pos: 0 }
    }
}

impl std::io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A writer that starts the kernel's write-back of what it wrote every few MiB, so the flush
/// before publishing a large output waits for the last stretch only, not for all of it.
/// (Without a flush to come, `--durability none`, it only writes through.)
pub(crate) struct WriteBehind<'f> {
    file: &'f mut File,
    pending: u64,
    enabled: bool,
}

impl<'f> WriteBehind<'f> {
    /// How much written data triggers a write-back request.
    const CHUNK: u64 = 8 << 20;

    /// Wraps an output file; `durability` says whether a flush will follow.
    pub(crate) fn new(file: &'f mut File, durability: Durability) -> Self {
        WriteBehind {
            file,
            pending: 0,
            enabled: durability != Durability::None,
        }
    }
}

impl std::io::Write for WriteBehind<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.pending += n as u64;
        if self.enabled && self.pending >= Self::CHUNK {
            self.pending = 0;
            start_writeback(self.file);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Asks the kernel to start writing `file`'s dirty pages back. Only a hint
/// (SYNC_FILE_RANGE_WRITE does not wait and promises nothing): durability still comes from an
/// fsync. Errors are ignored for the same reason; the fsync reports them.
pub(crate) fn start_writeback(file: &File) {
    let _ = sync_file_range(file, libc::SYNC_FILE_RANGE_WRITE);
}

/// `sync_file_range(2)` over the whole of `file` (rustix does not wrap it).
#[allow(unsafe_code)]
fn sync_file_range(file: &File, flags: libc::c_uint) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call reads no memory of ours.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) } == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ))
    }
}

/// Whether `dir` was deleted since it was opened (its descriptor still works, but nothing can
/// be created in it).
pub(crate) fn deleted(dir: &Dir) -> bool {
    rfs::fstat(&dir.fd).is_ok_and(|st| st.st_nlink == 0)
}

/// Whether `name` in `dir` is the file `st` describes (the same file system and inode), not
/// following a symlink at the name.
pub(crate) fn holds(dir: &Dir, name: &OsStr, st: &rfs::Stat) -> bool {
    rfs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|now| now.st_dev == st.st_dev && now.st_ino == st.st_ino)
}

/// Whether `rel_dir` beneath `root` leads, now, to `dir` itself: looked up again one
/// component at a time with no symlink followed, never remembered (`DirCache` remembers).
/// False if it leads nowhere, or to another directory (`dir` was moved or replaced since).
pub(crate) fn is_at(root: &Dir, rel_dir: &Path, dir: &Dir) -> bool {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut at: Option<OwnedFd> = None;
    for comp in rel_dir.components() {
        let Component::Normal(name) = comp else {
            return false;
        };
        match rfs::openat(at.as_ref().unwrap_or(&root.fd), name, flags, Mode::empty()) {
            Ok(next) => at = Some(next),
            Err(_) => return false,
        }
    }
    let (Ok(here), Ok(there)) = (
        rfs::fstat(at.as_ref().unwrap_or(&root.fd)),
        rfs::fstat(&dir.fd),
    ) else {
        return false;
    };
    here.st_dev == there.st_dev && here.st_ino == there.st_ino
}

/// Whether `dir`, opened `depth` directories beneath `root`, is beneath it still, at whatever
/// depth: what a publish checks at every file, so nothing is written in a directory moved
/// out of the tree. Looked at with one lookup where it stays at its depth (`at_depth`), and
/// gone up one level at a time only where that fails (a directory moved within the tree to
/// another depth, a reorganisation, or out of it), the chain found then looked at again in
/// one lookup. (A deleted directory still has the `..` it had: nothing can be made in it
/// anyway.) An error is a lookup's: a directory on the way up that can no longer be
/// searched, say.
pub(crate) fn beneath(root: &Dir, depth: usize, dir: &Dir) -> Result<bool, Errno> {
    if at_depth(root, depth, dir)? {
        return Ok(true);
    }
    let Some(root_id) = root.id() else {
        return Err(Errno::BADF);
    };
    let id = |st: Stat| (st.st_dev, st.st_ino);
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut at = rfs::openat(&dir.fd, ".", flags, Mode::empty())?;
    let mut here = id(rfs::fstat(&at)?);
    // Bounded, should directories be moved under the walk up for ever.
    for levels in 0..1 << 16 {
        if here == root_id {
            // Each step looked only above itself: the levels passed may have left the tree
            // since (found by review r55b: a directory moved 20,000 levels down, then the
            // last of them moved out while the walk went up, got its output). The chain the
            // walk found is looked at again in one lookup, as at the directory's own depth.
            return at_depth(root, levels, dir);
        }
        let up = rfs::openat(&at, "..", flags, Mode::empty())?;
        let above = id(rfs::fstat(&up)?);
        // The top: `..` of the process's root is itself.
        if above == here {
            return Ok(false);
        }
        (at, here) = (up, above);
    }
    Ok(false)
}

/// Whether `rel_dir` beneath `root` leads to `dir` itself, by one lookup of its path (the
/// last component not followed if a symlink; any before it are, so with `at_depth` to keep
/// to the tree): a directory renamed away since it was opened (`mv out/d out/d.old`) does not.
pub(crate) fn leads_to(root: &Dir, rel_dir: &Path, dir: &Dir) -> bool {
    if rel_dir.as_os_str().is_empty() {
        return root.id().is_some() && root.id() == dir.id();
    }
    rfs::statat(&root.fd, rel_dir, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| Some((st.st_dev, st.st_ino)) == dir.id())
}

/// Whether the directory `depth` levels above `dir` (`../..`, as the kernel looks `..` up,
/// across mounts) is `root` itself: one lookup, no descriptor, whatever the depth (a walk
/// down from the root, as `is_at`, costs one `openat` per level).
pub(crate) fn at_depth(root: &Dir, depth: usize, dir: &Dir) -> Result<bool, Errno> {
    // A path is at most PATH_MAX bytes: deeper trees go up in steps of this many `..`.
    const STEP: usize = 1000;
    let Some(root_id) = root.id() else {
        return Err(Errno::BADF);
    };
    static UP: OnceLock<String> = OnceLock::new();
    let ups = UP.get_or_init(|| "../".repeat(STEP));
    let mut at: Option<OwnedFd> = None;
    let mut left = depth;
    loop {
        let from = at.as_ref().map_or(dir.fd.as_fd(), |fd| fd.as_fd());
        let n = left.min(STEP);
        // `..` n times, without the last slash; `.` for the root itself.
        let up = if n == 0 { "." } else { &ups[..3 * n - 1] };
        left -= n;
        if left == 0 {
            let st = rfs::statat(from, up, AtFlags::empty())?;
            return Ok((st.st_dev, st.st_ino) == root_id);
        }
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        at = Some(rfs::openat(from, up, flags, Mode::empty())?);
    }
}

/// fsyncs a directory so a rename or unlink in it survives a crash, as any flush on its file
/// system is (`flush_on`: one at a time without a journal, its error counted).
pub(crate) fn sync_dir(dir: &Dir) -> Result<(), FileError> {
    flush_on(dir, || fsync_dir(dir))
}

/// The `fsync` of `sync_dir`, not counted (for callers already inside `flush_on`).
fn fsync_dir(dir: &Dir) -> Result<(), FileError> {
    rfs::fsync(dir.fd.as_fd())
        .map_err(|e| FileError::errno(&format!("syncing directory {}", dir.path.display()), e))
}

/// Ok unless a flush error that may be another file's was reported on `dir`'s file system
/// since `since` (see `FlushMark`), asking first, on ext4 without a journal, for the metadata
/// write errors no `fsync` hears of (`check_written`). For a single file made durable by its
/// own `fsync`s (a copy moved to another file system) before something irreversible, such as
/// removing its input.
pub(crate) fn confirm_written(dir: &Dir, since: FlushMark) -> Result<(), FileError> {
    if fs_kind(dir) == FsKind::Ext4NoJournal {
        check_written(dir);
    }
    unharmed(dir, since, &dir.path)
}

/// `fsync`s `file`, on `dir`'s file system, as any flush there is (`flush_on`).
pub(crate) fn sync_file_on(dir: &Dir, file: &File) -> std::io::Result<()> {
    flush_on(dir, || file.sync_all())
}

/// The most data other than a group's own that may be waiting to be written for a group to be
/// flushed with `syncfs`: it waits for all of its file system's dirty data, another program's
/// too, so with more (a large copy under way) the group's files are flushed one by one
/// instead. 64 MiB take well under a second on any disk, and the check costs one read of
/// /proc/meminfo per group. The count is system-wide (the kernel keeps none per file system
/// that a process can read): dirty data on another disk, or filepipe's own next outputs, count
/// as foreign too, which only ever makes a group take the slower, per-file way.
const SYNCFS_MAX_FOREIGN: u64 = 64 << 20;

/// Bytes waiting to be written to disk, system-wide (`Dirty` plus `Writeback` in
/// /proc/meminfo); `None` where that cannot be read.
fn dirty_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((kib("Dirty:")? + kib("Writeback:")?) * 1024)
}

/// How a group's temps on one file system are flushed (see `sync_group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flushed {
    /// By one `syncfs` (journaled): each temp's own write error is then taken.
    Journaled,
    /// By `sync_whole` (ext4 without a journal): each temp's own write error is then taken, and
    /// the temps are failed if any whole flush reported an error since they were created.
    Whole,
    /// `sync_whole` failed: which file it hit cannot be told, so every temp there fails.
    WholeFailed(Errno),
    /// Each temp by its own `fsync`.
    Alone,
}

/// Publishes `temps` together, each under its name (replacing what is there if `replace`): all
/// of them made durable as `durability` says before any is named, so a failure to write them (a
/// full disk) leaves every name as it was; then several replacing ones are swapped in all or
/// none (`swap_in`); then every name is made durable. A run's manifests of several hashes go
/// this way: published one by one, a disk that filled in between, or a name that could not be
/// replaced (another user's file in a sticky directory, an immutable one: found by a review),
/// left one manifest new and another old, describing two different trees.
pub(crate) fn publish_together(
    temps: Vec<(TempOutput, OsString)>,
    replace: bool,
    durability: Durability,
) -> Result<(), FileError> {
    let names: Vec<OsString> = temps.iter().map(|(_, n)| n.clone()).collect();
    // Before the flush, as in `CompressOp::publish_group`: a mark taken after it could miss an
    // error another thread counted in between.
    let mark = flush_mark();
    let synced = sync_group(temps, 0, durability);
    // Every temp's error first: dropped unrenamed, each one's temp is removed.
    let synced = synced.into_iter().collect::<Result<Vec<_>, _>>()?;
    let named = if replace && synced.len() > 1 {
        match swap_in(synced, &names)? {
            SwapIn::Done(named) => named,
            // Renamed one after the other, as one is (see `swap_in`).
            SwapIn::Unsupported(synced) => (synced.into_iter().zip(&names))
                .map(|((mut temp, anonymous), name)| {
                    let mut named = temp.rename(name, replace)?;
                    named.link_unflushed |= anonymous && link_needs_fsync(&named.dir);
                    Ok(named)
                })
                .collect::<Result<Vec<_>, FileError>>()?,
        }
    } else {
        (synced.into_iter().zip(&names))
            .map(|(mut temp, name)| temp.rename(name, replace))
            .collect::<Result<Vec<_>, _>>()?
    };
    let new_names: Vec<NewName<'_>> = named.iter().map(Named::new_name).collect();
    sync_names(&new_names, durability, mark)
        .into_iter()
        .collect()
}

/// How `swap_in` put a temp under its final name.
#[derive(Clone, Copy)]
enum Swapped {
    /// Exchanged with the file there (`RENAME_EXCHANGE`), now under the temp's name: its
    /// device and inode (its ctime moves with the exchange; it is not freed meanwhile).
    Exchanged((u64, u64)),
    /// Renamed to a name that was free.
    Renamed,
}

/// How `swap_in` ended, when it did not fail.
enum SwapIn {
    /// Every temp under its name.
    Done(Vec<Named>),
    /// The file system refuses `RENAME_EXCHANGE` or `RENAME_NOREPLACE` (NFS, CIFS, exFAT, many
    /// FUSE ones): nothing done, every temp named, with whether it was flushed anonymous.
    Unsupported(Vec<(SyncedTemp, bool)>),
}

/// Gives each of `temps` its name in `names`, replacing what is there (anything but a
/// directory), all or none: each is given a temp name (if anonymous), then exchanged with the
/// file under its name (`RENAME_EXCHANGE`) or renamed to the name if it is free; if one cannot
/// be, those done are exchanged or renamed back, and every name holds what it held. Once all
/// are in, the old files, now under the temps' names, are removed. A directory at a name fails
/// them all before any is touched. Where the file system refuses the flags, nothing is done
/// (`SwapIn::Unsupported`): the caller renames them one by one. (A crash, or a third signal,
/// which exits at once, between two exchanges leaves the names done new and the others old;
/// between the exchanges and the removals, an old file under a temp name, unmarked, which no
/// sweep removes, as none can prove it filepipe's.)
fn swap_in(mut temps: Vec<SyncedTemp>, names: &[OsString]) -> Result<SwapIn, FileError> {
    let path = |i: usize, t: &SyncedTemp| t.0.dir.path.join(&names[i]);
    // Said of the `i`th, and of the others: as they were, but for any not put back.
    let failed = |i: usize, t: &SyncedTemp, e: Errno, stuck: &[usize]| {
        let mut e = match e {
            Errno::ISDIR => FileError {
                kind: Kind::OutputExists,
                errno: Some(e.raw_os_error()),
                message: format!("{} is a directory; not replaced", path(i, t).display()),
            },
            Errno::AGAIN => FileError {
                kind: Kind::OutputExists,
                errno: None,
                message: format!(
                    "{} was replaced by another file while it was published; not replaced",
                    path(i, t).display()
                ),
            },
            e => FileError::errno(&format!("publishing {}", path(i, t).display()), e),
        };
        let named = |f: &dyn Fn(usize) -> bool| {
            (names.iter().enumerate())
                .filter(|&(j, _)| j != i && f(j))
                .map(|(_, n)| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        let (kept, new) = (
            named(&|j| !stuck.contains(&j)),
            named(&|j| stuck.contains(&j)),
        );
        if !kept.is_empty() {
            e.message = format!(
                "{}; nor was {} beside it replaced: {} as it was",
                e.message,
                kept.join(" or "),
                if kept.len() == 1 { "it is" } else { "each is" }
            );
        }
        if !new.is_empty() {
            e.message = format!(
                "{}; {} could not be put back, and is the new one",
                e.message,
                new.join(" and ")
            );
        }
        e
    };
    // Anonymous still: flushed before it had any name (see `published`).
    let mut anonymous = Vec::with_capacity(temps.len());
    for (i, t) in temps.iter_mut().enumerate() {
        anonymous.push(t.0.name.is_none());
        if t.0.name.is_none() {
            t.0.give_name().map_err(|e| failed(i, t, e, &[]))?;
        }
    }
    // What each name holds: anything but a directory is exchanged (a symlink itself, never
    // followed, as a rename over it replaces it), a free name taken.
    let mut found = Vec::with_capacity(temps.len());
    for (i, t) in temps.iter().enumerate() {
        match rfs::statat(&t.0.dir.fd, &names[i], AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory => {
                return Err(failed(i, t, Errno::ISDIR, &[]))
            }
            Ok(st) => found.push(Some((st.st_dev, st.st_ino))),
            Err(Errno::NOENT) => found.push(None),
            Err(e) => return Err(failed(i, t, e, &[])),
        }
    }
    // Undoes `done`, last first; the ones that could not be undone.
    let back = |done: &[Swapped], temps: &[SyncedTemp]| -> Vec<usize> {
        let mut stuck = Vec::new();
        for (j, how) in done.iter().enumerate().rev() {
            let (dir, temp_name) = (&temps[j].0.dir, temps[j].0.name.as_deref());
            let Some(temp_name) = temp_name else { continue };
            // An exchange is undone by the same exchange; a rename by its reverse.
            let undone = match how {
                Swapped::Exchanged(_) => {
                    rename_in(dir, temp_name, &names[j], RenameFlags::EXCHANGE)
                }
                Swapped::Renamed => rename_in(dir, &names[j], temp_name, RenameFlags::NOREPLACE),
            };
            if let Err(e) = undone {
                tracing::error!(
                    path = %dir.path.join(&names[j]).display(),
                    error = %std::io::Error::from(e),
                    "could not put the file back after another failed to be published beside it: it is the new one"
                );
                stuck.push(j);
            }
        }
        stuck
    };
    let mut done: Vec<Swapped> = Vec::with_capacity(temps.len());
    for (i, t) in temps.iter().enumerate() {
        let (dir, temp_name) = (&t.0.dir, t.0.name.as_deref().unwrap_or_default());
        let swapped = match found[i] {
            Some(old) => rename_in(dir, temp_name, &names[i], RenameFlags::EXCHANGE)
                .map(|()| Swapped::Exchanged(old)),
            None => rename_in(dir, temp_name, &names[i], RenameFlags::NOREPLACE)
                .map(|()| Swapped::Renamed),
        };
        match swapped {
            Ok(how) => done.push(how),
            Err(e) => {
                let stuck = back(&done, &temps);
                // The flag refused (found by a review: no manifest of several hashes could be
                // written on NFS or a FUSE file system): undone, and left to plain renames.
                if e == Errno::INVAL && stuck.is_empty() {
                    static SAID: AtomicBool = AtomicBool::new(false);
                    if !SAID.swap(true, Ordering::Relaxed) {
                        tracing::warn!(dir = %t.0.dir.path.display(), "this file system cannot exchange two files' names (RENAME_EXCHANGE): the manifests of several hashes are published one after the other, and a failure between two leaves one new beside one old");
                    }
                    return Ok(SwapIn::Unsupported(
                        temps.into_iter().zip(anonymous).collect(),
                    ));
                }
                return Err(failed(i, t, e, &stuck));
            }
        }
    }
    // What each exchange put under the temp's name must be what was looked at: a file put at
    // the name in between (a directory, another's file) is put back, and nothing is published.
    for (i, (t, how)) in temps.iter().zip(&done).enumerate() {
        let Swapped::Exchanged(old) = how else {
            continue;
        };
        let temp_name = t.0.name.as_deref().unwrap_or_default();
        let now = rfs::statat(&t.0.dir.fd, temp_name, AtFlags::SYMLINK_NOFOLLOW);
        if !now.is_ok_and(|st| (st.st_dev, st.st_ino) == *old) {
            let stuck = back(&done, &temps);
            return Err(failed(i, t, Errno::AGAIN, &stuck));
        }
    }
    let mut named = Vec::with_capacity(temps.len());
    for (((t, how), name), anonymous) in temps.into_iter().zip(done).zip(names).zip(anonymous) {
        let mut temp = t.0;
        if let (Swapped::Exchanged(_), Some(temp_name)) = (how, &temp.name) {
            // The old file, under the temp's name now.
            let _ = rfs::unlinkat(&temp.dir.fd, temp_name, AtFlags::empty());
        }
        if temp.marked {
            if let Some(file) = &temp.file {
                let _ = rfs::fremovexattr(file, TEMP_MARK);
            }
        }
        named.push(temp.published(name, anonymous));
    }
    Ok(SwapIn::Done(named))
}

/// `from` renamed to `to` in `dir`, as `flags` say.
fn rename_in(dir: &Dir, from: &OsStr, to: &OsStr, flags: RenameFlags) -> Result<(), Errno> {
    rfs::renameat_with(&dir.fd, from, &dir.fd, to, flags)
}

/// Makes every temp's data, mode and times durable before any of them is given its final
/// name, as `durability` says, and returns each (given with its final name, for messages) as a
/// `SyncedTemp` or its error, in order. `bytes` is about what the temps hold.
///
/// `Group`, on a file system that journals its metadata (see `journaled`): one `syncfs` writes
/// every temp of the group on that file system and commits the journal, then each temp's own
/// write error is taken with `sync_file_range` (waiting, no flush). That split is what makes
/// it sound: `syncfs` returns a journal failure directly, every time (the journal aborts), but
/// a write error of one file's data only once per descriptor it is called on, which another
/// group's call may have taken; each temp's own descriptor, private to it, reports its own.
/// On ext4 without a journal, a group of at least `WHOLE_MIN_GROUP` temps is flushed by
/// `sync_whole` (see there for why that is sound), each temp's own write error then taken the
/// same way. Elsewhere, and wherever this cannot tell, each temp is `fsync`ed on its own, its
/// write-back started for the whole group first and the `fsync`s issued together. So is a
/// group for which a journaled `syncfs` fails, or would wait for more than
/// `SYNCFS_MAX_FOREIGN` of other programs' data.
pub(crate) fn sync_group(
    mut temps: Vec<(TempOutput, OsString)>,
    bytes: u64,
    durability: Durability,
) -> Vec<Result<SyncedTemp, FileError>> {
    if durability == Durability::None {
        return temps.into_iter().map(|(t, _)| Ok(SyncedTemp(t))).collect();
    }
    // `file`: each on its own, one after another. Unknown (no /proc/meminfo, as under
    // systemd's ProcSubset=pid): syncfs, unbounded.
    let quiet = durability == Durability::Group
        && dirty_bytes().is_none_or(|d| d.saturating_sub(bytes) <= SYNCFS_MAX_FOREIGN);
    let mut on_fs: HashMap<u64, usize> = HashMap::new();
    for (t, _) in &temps {
        if let Some((dev, _)) = t.dir.id() {
            *on_fs.entry(dev).or_default() += 1;
        }
    }
    let mut how: HashMap<u64, Flushed> = HashMap::new();
    if quiet {
        for (t, _) in &temps {
            let Some((dev, _)) = t.dir.id() else { continue };
            how.entry(dev).or_insert_with(|| match fs_kind(&t.dir) {
                FsKind::Ext4Journal | FsKind::Xfs | FsKind::Btrfs => match rfs::syncfs(&t.dir.fd) {
                    Ok(()) => Flushed::Journaled,
                    Err(e) => {
                        tracing::debug!(dir = %t.dir.path.display(), error = %e,
                                "syncfs failed: each file flushed on its own");
                        Flushed::Alone
                    }
                },
                FsKind::Ext4NoJournal if on_fs[&dev] >= WHOLE_MIN_GROUP => {
                    match sync_whole(&t.dir) {
                        Some(Ok(())) => Flushed::Whole,
                        Some(Err(e)) => Flushed::WholeFailed(e),
                        None => Flushed::Alone,
                    }
                }
                _ => Flushed::Alone,
            });
        }
    }
    let how_of = |t: &TempOutput| {
        t.dir
            .id()
            .and_then(|(dev, _)| how.get(&dev).copied())
            .unwrap_or(Flushed::Alone)
    };
    // Anonymous temps flushed on their own where a link needs a flush of its own (ext4
    // without a journal, a group not flushed whole: see `anonymous_suits`) are named first,
    // so that their own `fsync` writes their link count and their directory's their name, as
    // for any named temp: two flushes each, not three.
    let mut unnamed: Vec<Option<FileError>> = temps
        .iter_mut()
        .map(|(t, name)| {
            let anonymous = t.name.is_none() && link_needs_fsync(&t.dir);
            if !anonymous || how_of(t) != Flushed::Alone {
                return None;
            }
            t.give_name().err().map(|e| {
                let path = t.dir.path.join(&*name);
                FileError::errno(&format!("naming the temp of {}", path.display()), e)
            })
        })
        .collect();
    // Flushed one by one: their write-back started together first, then their fsyncs issued
    // together with a journal, one after another without (see `flush_on`).
    let alone: Vec<(&File, &Dir)> = temps
        .iter()
        .zip(&unnamed)
        .filter(|((t, _), failed)| how_of(t) == Flushed::Alone && failed.is_none())
        .map(|((t, _), _)| (t.file.as_ref().expect("open until synced"), &*t.dir))
        .collect();
    // (Starting the write-back first still pays with the fsyncs together: in a probe writing
    // 4,000 files in groups of 256, 0.64-1.25 s against 1.02-1.28 s without.)
    for (file, _) in &alone {
        start_writeback(file);
    }
    let one_by_one = durability == Durability::File;
    let flushed = flush_each(
        &alone,
        |(f, d)| flush_on(d, || f.sync_all()),
        |(_, d)| d,
        one_by_one,
    );
    let mut flushed = flushed.into_iter();
    temps
        .into_iter()
        .zip(unnamed.iter_mut())
        .map(|((t, name), failed)| {
            if let Some(e) = failed.take() {
                return Err(e);
            }
            let how = how_of(&t);
            let path = t.dir.path.join(&name);
            let (dir, born) = (Arc::clone(&t.dir), t.born);
            let synced = match how {
                Flushed::Alone => {
                    let result = flushed.next().expect("one result per temp flushed alone");
                    t.synced(result, &name)?
                }
                Flushed::WholeFailed(e) => {
                    return Err(FileError::errno(
                        &format!(
                            "syncing {} (its file system, which has no journal, reported a \
                             write error that cannot be told to be another file's)",
                            path.display()
                        ),
                        e,
                    ))
                }
                Flushed::Journaled | Flushed::Whole => {
                    let file = t.file.as_ref().expect("open until synced");
                    written(file)
                        .map_err(|e| FileError::errno(&format!("writing {}", path.display()), e))?;
                    SyncedTemp(t)
                }
            };
            unharmed(&dir, born, &path)?;
            Ok(synced)
        })
        .collect()
}

/// Flushes that reported an error on a file system without a journal, so far in this process.
static SHARED_FLUSH_ERRORS: AtomicU64 = AtomicU64::new(0);

/// The count of flush errors on file systems without a journal at some instant. There, a
/// write error of the file system's metadata (an inode table's or a directory's block, shared
/// by many files) is reported once, to whichever flush writes the block (a `syncfs`, or one
/// file's `fsync`: the other files on that block then find it written, and their `fsync`s
/// succeed), and cannot be told to be any one file's: any output on such a file system made
/// durable across a reported error (created before it, or renamed before it and flushed
/// after) may be one it hit, and is failed rather than reported published (see `unharmed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlushMark(u64);

/// The count of flush errors on file systems without a journal now (see `FlushMark`).
pub(crate) fn flush_mark() -> FlushMark {
    FlushMark(SHARED_FLUSH_ERRORS.load(Ordering::SeqCst))
}

/// Whether a flush error on `dir`'s file system may be another file's (see `FlushMark`): no
/// journal (and not tmpfs, which flushes nothing).
fn errors_shared(dir: &Dir) -> bool {
    !journaled(dir) && fs_kind(dir) != FsKind::Memory
}

/// File systems (by device) whose flushes reported an error in this process: their outputs
/// are flushed file by file from then on (`sync_whole` is no longer used there), each file's
/// own `fsync` rewriting its inode's block if its own last change came after a failed write of
/// it.
fn degraded() -> std::sync::MutexGuard<'static, std::collections::HashSet<u64>> {
    static DEGRADED: OnceLock<std::sync::Mutex<std::collections::HashSet<u64>>> = OnceLock::new();
    DEGRADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Whether `dir`'s file system reported a flush error in this process (see `degraded`).
fn is_degraded(dir: &Dir) -> bool {
    dir.id().is_some_and(|(dev, _)| degraded().contains(&dev))
}

/// Records a flush error on `dir`'s file system: where it may be another file's (no journal),
/// every output in the making there fails (`FlushMark`), and the file system is flushed file
/// by file from then on (`degraded`).
fn flush_failed(dir: &Dir) {
    if !errors_shared(dir) {
        return;
    }
    SHARED_FLUSH_ERRORS.fetch_add(1, Ordering::SeqCst);
    if let Some((dev, _)) = dir.id() {
        if degraded().insert(dev) {
            tracing::warn!(dir = %dir.path.display(),
                "a flush failed on a file system without a journal: the outputs in the making \
                 there fail, and from now on its files are flushed one by one");
        }
    }
}

/// The lock every flush of `dir`'s file system takes where its errors are shared (see
/// `flush_on`, `sync_whole`, `check_written`): one per device, so that a long `syncfs` of one
/// file system (waiting for another program's data there) holds up no other's flushes. A
/// directory whose device is unknown shares one lock with every other such.
fn flush_lock(dir: &Dir) -> Arc<std::sync::Mutex<()>> {
    type Locks = HashMap<Option<u64>, Arc<std::sync::Mutex<()>>>;
    static LOCKS: OnceLock<std::sync::Mutex<Locks>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    Arc::clone(locks.entry(dir.id().map(|(dev, _)| dev)).or_default())
}

/// Runs `flush` (an `fsync`) of something on `dir`'s file system. Where its errors are shared
/// (no journal), one at a time in this process with every other such flush of that file system, an error counted
/// (`flush_failed`) before the next may start: two files whose inodes share a block, flushed
/// side by side, could otherwise see the first one's failed write of it taken by the second
/// for written, and the second reported done before the first's error was counted.
fn flush_on<T, E>(dir: &Dir, flush: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    if !errors_shared(dir) {
        return flush();
    }
    let lock = flush_lock(dir);
    let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
    let result = flush();
    if result.is_err() {
        flush_failed(dir);
    }
    result
}

/// Ok unless `dir` is on a file system without a journal where a flush reported an error
/// since `since` (see `FlushMark`); `path` names the file for the message.
fn unharmed(dir: &Dir, since: FlushMark, path: &Path) -> Result<(), FileError> {
    if flush_mark() == since || !errors_shared(dir) {
        return Ok(());
    }
    Err(FileError::errno(
        &format!(
            "syncing {} (its file system, which has no journal, reported a write error while \
             it was being made durable, which cannot be told to be another file's)",
            path.display()
        ),
        Errno::IO,
    ))
}

/// A group on ext4 without a journal is flushed whole (`sync_whole`) from this many of its
/// files on one file system: below, a file's own `fsync` and its directory's cost fewer flushes
/// (two) than the four of `sync_whole` before and after the renames.
const WHOLE_MIN_GROUP: usize = 4;

/// Flushes `dir`'s whole file system, an ext4 without a journal, so that every file and name
/// written on it before the call is on the disk: two `syncfs` in a row, one such flush at a
/// time in this process. `None` where it is not used: a flush error was met on that file
/// system before (see `degraded`), or no descriptor could be opened to flush it through.
///
/// Why two: without a journal, `syncfs` writes the files' data and inodes, then asks the disk
/// to flush its cache, and only then writes and waits for the file system's metadata blocks
/// (inode tables, directories, bitmaps) it found dirty (Linux's `sync_filesystem`); the second
/// call's flush is the one that makes those durable.
///
/// Why sound: a data write error is taken by each temp's own descriptor afterwards
/// (`written`), as with a journal. A metadata block's write error is reported by `syncfs` once,
/// to whichever call meets it first (the block device's error flag), and not to any file's own
/// `fsync` afterwards. With one flush at a time, every such error reported to this process is
/// seen here and counted (`FlushMark`), so that every output in the making on that file system
/// then fails. An error taken first by another program's `syncfs` of the same file system (or
/// its `fsync` of the block device) is lost to filepipe; files flushed one by one there are
/// checked the same way afterwards (`check_written`). The descriptor is opened for each flush, not kept: one held open
/// would keep the file system from being unmounted while a daemon runs, and one opened earlier
/// would report again, once, each data write error (any file's) from before this call, which
/// each temp's own descriptor reports to it anyway.
///
/// Callers that ask while a flush is under way wait for the next one, which serves them all:
/// the two publishers' groups then share flushes (one group's names with the other's data)
/// instead of queueing for one each, which is where a group's time went on a disk slow to
/// flush (140 `syncfs` taking 0.9 s of a 1.3 s run, back to back, on 8,000 small files). A
/// flush's error is that of each caller it served: which file's it was cannot be told.
fn sync_whole(dir: &Dir) -> Option<Result<(), Errno>> {
    match whole_flushes(dir) {
        Some(flushes) => flushes.combine(|| sync_whole_now(dir)),
        None => sync_whole_now(dir),
    }
}

/// Flushes that serve together every caller who asked while the one before was under way
/// (`sync_whole`'s of one device): which have started and finished, and each finished one's
/// result until every caller it served has taken it.
struct Combined<R> {
    state: std::sync::Mutex<CombinedState<R>>,
    done: std::sync::Condvar,
}

struct CombinedState<R> {
    /// A flush is under way (`started` is it).
    running: bool,
    /// The number of flushes started, and of those finished (all but the running one).
    started: u64,
    finished: u64,
    /// Callers waiting on each flush not yet taken by all of them, and its result once known.
    waiting: HashMap<u64, usize>,
    results: HashMap<u64, R>,
}

impl<R: Copy> Combined<R> {
    fn new() -> Combined<R> {
        Combined {
            state: std::sync::Mutex::new(CombinedState {
                running: false,
                started: 0,
                finished: 0,
                waiting: HashMap::new(),
                results: HashMap::new(),
            }),
            done: std::sync::Condvar::new(),
        }
    }

    /// The result of a `flush` that started after this call did: run here, if no flush is
    /// under way once the one before is over, or by another caller for all who wait on it.
    fn combine(&self, flush: impl FnOnce() -> R) -> R {
        let mut flush = Some(flush);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // This caller's writes (and renames) were made before now: any flush that starts from
        // now on covers them, the one running now may not.
        let wanted = state.started + 1;
        *state.waiting.entry(wanted).or_default() += 1;
        while state.finished < wanted {
            if state.running {
                state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // None under way, and the last one finished began before this call: this caller
            // runs the next, for itself and every caller that waits on it.
            let Some(flush) = flush.take() else {
                unreachable!("a caller runs at most the one flush it waits on")
            };
            state.running = true;
            state.started += 1;
            let generation = state.started;
            drop(state);
            let unwinding = Unwinding {
                combined: self,
                generation,
            };
            let result = flush();
            std::mem::forget(unwinding);
            state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.running = false;
            state.finished = generation;
            state.results.insert(generation, result);
            self.done.notify_all();
        }
        let Some(&result) = state.results.get(&wanted) else {
            unreachable!("a flush's result stays until its last caller takes it")
        };
        if let Some(n) = state.waiting.get_mut(&wanted) {
            *n -= 1;
            if *n == 0 {
                state.waiting.remove(&wanted);
                state.results.remove(&wanted);
            }
        }
        result
    }
}

/// A flush under way in `Combined::combine`, ended if it panics (the publisher catches a
/// panic and goes on: a panic costs its group, never the run). Only the caller that runs a
/// flush waits on it (those that ask meanwhile wait on the next), so it ends with no result,
/// and a caller waiting on the next one runs that. Without this, every later flush of the
/// device would wait for ever.
struct Unwinding<'a, R> {
    combined: &'a Combined<R>,
    generation: u64,
}

impl<R> Drop for Unwinding<'_, R> {
    fn drop(&mut self) {
        let mut state = (self.combined.state.lock()).unwrap_or_else(|p| p.into_inner());
        state.running = false;
        state.finished = self.generation;
        state.waiting.remove(&self.generation);
        self.combined.done.notify_all();
    }
}

/// What a whole flush comes to (`sync_whole`).
type Whole = Option<Result<(), Errno>>;

/// The combined whole flushes of `dir`'s device; `None` if its device is unknown (one flush
/// could then not be told to serve another directory's file system).
fn whole_flushes(dir: &Dir) -> Option<Arc<Combined<Whole>>> {
    type All = HashMap<u64, Arc<Combined<Whole>>>;
    static ALL: OnceLock<std::sync::Mutex<All>> = OnceLock::new();
    let (dev, _) = dir.id()?;
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    Some(Arc::clone(
        all.entry(dev).or_insert_with(|| Arc::new(Combined::new())),
    ))
}

/// One whole flush of `dir`'s file system (`sync_whole`), run by one caller for all those
/// waiting on it.
fn sync_whole_now(dir: &Dir) -> Option<Result<(), Errno>> {
    let lock = flush_lock(dir);
    let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
    if is_degraded(dir) {
        return None;
    }
    let fd = rfs::openat(
        &dir.fd,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let result = rfs::syncfs(&fd).and_then(|()| rfs::syncfs(&fd));
    if result.is_err() {
        flush_failed(dir);
    }
    Some(result)
}

/// Asks `dir`'s file system, an ext4 without a journal whose files were just flushed one by
/// one (`fsync`s), whether any write of its metadata failed meanwhile: one `syncfs`, counted
/// as a flush (`flush_failed`) if it reports an error, so that every output in the making
/// there then fails (`FlushMark`). Why: a file's own `fsync` writes its inode's block only if
/// its inode is still dirty; once the kernel's write-back has written that block (as it does
/// early when much data is waiting, a build's or a copy's) and the write failed, the block is
/// clean and still up to date in memory, the `fsync` succeeds, and the failure sits in the
/// block device's error flag, which only a `syncfs` (or another program's flush of the device)
/// reads. Seen in a CI run: files reported done whose inodes never reached a disk failing its
/// inode-table writes (tests/durability_faulty.rs). Costs one `syncfs` per group and file
/// system, which writes what the `fsync`s left (bitmaps, group descriptors) and flushes the
/// disk's cache once more.
fn check_written(dir: &Dir) {
    let lock = flush_lock(dir);
    let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
    // A descriptor opened now (see `sync_whole`); if none can be, the directory's own, which
    // may report an older data error again (a spurious failure, never a missed one).
    let fresh = rfs::openat(
        &dir.fd,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    );
    let result = match &fresh {
        Ok(fd) => rfs::syncfs(fd),
        Err(_) => rfs::syncfs(&dir.fd),
    };
    if let Err(e) = result {
        tracing::debug!(dir = %dir.path.display(), error = %e,
            "the check of a file system without a journal after its files' own flushes failed");
        flush_failed(dir);
    }
}

/// `flush_together` of the items on file systems with a journal; one after another for the
/// others (where `flush_on` takes them one at a time anyway), or for all with `one_by_one`.
/// Results in order.
fn flush_each<T: Sync, R: Send + Sync>(
    items: &[T],
    flush: impl Fn(&T) -> R + Sync,
    dir_of: fn(&T) -> &Dir,
    one_by_one: bool,
) -> Vec<R> {
    let serial: Vec<bool> = items
        .iter()
        .map(|i| one_by_one || errors_shared(dir_of(i)))
        .collect();
    let together: Vec<&T> = items
        .iter()
        .zip(&serial)
        .filter(|(_, &s)| !s)
        .map(|(i, _)| i)
        .collect();
    let mut flushed = flush_together(&together, |i| flush(i)).into_iter();
    items
        .iter()
        .zip(serial)
        .map(|(i, s)| {
            if s {
                flush(i)
            } else {
                flushed
                    .next()
                    .expect("one result per item flushed together")
            }
        })
        .collect()
}

/// At most this many `fsync`s of one group in flight together (see `flush_together`).
const FSYNCS_IN_FLIGHT: usize = 32;

/// Applies `flush` (an `fsync`) to each of `items`, up to `FSYNCS_IN_FLIGHT` at a time, and
/// returns each one's result, in order. Why together: each `fsync` ends in a flush of the
/// disk's write cache (and, with a journal, a commit), and the block layer serves the flushes
/// asked for while one is running with one more (probes on this project's VM disk: 8,000 files
/// flushed one after another 1.07 s, from 8 threads 0.46 s, from 64 threads 0.33 s). Used only
/// with a journal (see `flush_each`): there each file's write error comes back through its own
/// descriptor to its own `fsync`, as one at a time, and a failed metadata write aborts the
/// journal for every later caller. The calling thread flushes too, so a thread that cannot be
/// started only means fewer in flight.
fn flush_together<T: Sync, R: Send + Sync>(items: &[T], flush: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() < 2 {
        return items.iter().map(&flush).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<OnceLock<R>> = items.iter().map(|_| OnceLock::new()).collect();
    let drain = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(item) = items.get(i) else { break };
        let _ = results[i].set(flush(item));
    };
    let helpers = items.len().min(FSYNCS_IN_FLIGHT) - 1;
    std::thread::scope(|s| {
        for _ in 0..helpers {
            if std::thread::Builder::new()
                .name("fsync".into())
                .stack_size(64 * 1024)
                .spawn_scoped(s, drain)
                .is_err()
            {
                break;
            }
        }
        drain();
    });
    results
        .into_iter()
        .map(|r| r.into_inner().expect("every item flushed"))
        .collect()
}

/// Waits for `file`'s data to be written and returns the write error it met, if any (its own
/// descriptor's: see `sync_group`). Flushes nothing by itself.
fn written(file: &File) -> Result<(), Errno> {
    sync_file_range(
        file,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

/// What matters of a file system for flushing (see `fs_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FsKind {
    /// ext3 or ext4 with a journal.
    Ext4Journal,
    /// ext2, ext3 or ext4 without a journal, run by the ext4 driver.
    Ext4NoJournal,
    /// XFS.
    Xfs,
    /// btrfs.
    Btrfs,
    /// tmpfs: nothing survives a crash, so there is nothing to flush for.
    Memory,
    /// Anything else, or unknown: no journal to rely on.
    Other,
}

/// The kind of the file system `dir` is on, looked up once per directory handle (a file
/// system made anew under a long-running daemon is seen when its directories are opened
/// again).
fn fs_kind(dir: &Dir) -> FsKind {
    *dir.kind.get_or_init(|| {
        const XFS: i64 = 0x5846_5342;
        const BTRFS: i64 = 0x9123_683e;
        const EXT: i64 = 0xef53;
        const TMPFS: i64 = 0x0102_1994;
        let (Some((dev, _)), Ok(st)) = (dir.id(), rfs::fstatfs(&dir.fd)) else {
            return FsKind::Other;
        };
        // f_type's integer type differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        let kind = st.f_type as i64;
        match kind {
            XFS => FsKind::Xfs,
            BTRFS => FsKind::Btrfs,
            TMPFS => FsKind::Memory,
            EXT => {
                let (major, minor) = (rfs::major(dev), rfs::minor(dev));
                let name = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}"))
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_os_string()));
                let task = name.and_then(|n| {
                    std::fs::read_to_string(Path::new("/sys/fs/ext4").join(n).join("journal_task"))
                        .ok()
                });
                match task.as_deref().map(str::trim) {
                    Some("" | "<none>") => FsKind::Ext4NoJournal,
                    Some(_) => FsKind::Ext4Journal,
                    None => FsKind::Other,
                }
            }
            _ => FsKind::Other,
        }
    })
}

/// Whether `dir`'s file system journals its metadata, so that a `syncfs` returning success
/// means every inode and name written before it is on disk, and a failed commit is returned to
/// every caller: XFS, btrfs, and ext3/ext4 with a journal (`/sys/fs/ext4/DEV/journal_task`).
/// False for anything else and whenever it cannot tell.
fn journaled(dir: &Dir) -> bool {
    matches!(
        fs_kind(dir),
        FsKind::Ext4Journal | FsKind::Xfs | FsKind::Btrfs
    )
}

/// Whether an anonymous temp, synced before it had a name, would need a flush of its own once
/// linked for its link count to reach the disk; temps are named there instead (see
/// `TempOutput::create`). Not on ext4 with a journal nor on XFS, where the directory's fsync
/// commits the transaction (log) that holds the inode's new link count, nor on tmpfs;
/// elsewhere (no journal: the directory's fsync writes the directory's block only; btrfs: not
/// shown otherwise), yes.
fn link_needs_fsync(dir: &Dir) -> bool {
    !matches!(
        fs_kind(dir),
        FsKind::Ext4Journal | FsKind::Xfs | FsKind::Memory
    )
}

/// Whether a temp in `dir` for an output published with `durability` may be anonymous: where
/// its link needs no flush of its own (`link_needs_fsync`); with `none`, which flushes nothing;
/// and with `group` on ext4 without a journal, where a group is flushed whole after its names
/// are given (`sync_whole` writes every inode's new link count with the directories), a temp
/// of a group flushed otherwise is named before its flush (`SyncedTemp` never holds an
/// anonymous temp there that `sync_group` flushed on its own), and one linked by a group whose
/// names are then not flushed whole has its own `fsync` (`sync_names`). Elsewhere a named temp
/// costs a few calls and no flush (its own fsync writes its link count, and the directory's
/// fsync its rename), where an anonymous one would need a second flush once linked. Anonymous
/// there, a publish costs four calls fewer (no lock, mark, or rename, nor the mark's removal)
/// and one change of the directory instead of two: 7-11% of the time of a gzip run over a tree
/// of small files (BENCHMARKS.md, session 48).
fn anonymous_suits(dir: &Dir, durability: Durability) -> bool {
    match durability {
        Durability::None => true,
        Durability::File => !link_needs_fsync(dir),
        Durability::Group => {
            !link_needs_fsync(dir) || (fs_kind(dir) == FsKind::Ext4NoJournal && !is_degraded(dir))
        }
    }
}

/// A name just given, for `sync_names`: its directory, and, where its link count reaches the
/// disk with no directory's `fsync` (`Named::link_unflushed`), its file and name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewName<'a> {
    dir: &'a Arc<Dir>,
    link: Option<(&'a File, &'a OsStr)>,
}

impl<'a> NewName<'a> {
    /// A name in `dir` that its directory's flush makes durable.
    pub(crate) fn in_dir(dir: &'a Arc<Dir>) -> Self {
        NewName { dir, link: None }
    }
}

/// Makes the names just given (`names`) durable, as `durability` says, and returns, for each
/// in order, its result. `since` is the `flush_mark` taken before the names were given. Each
/// distinct directory is fsynced once (the same directory may come through several handles;
/// on a journaling file system the first commits the names of all).
/// With `group` and no journal, the directories are fsynced together (see `flush_together`:
/// each is a flush of the disk's cache), or, on ext4 without a journal and for at least
/// `WHOLE_MIN_GROUP` names there, their file system is flushed whole (`sync_whole`); a
/// directory there then fails if any whole flush reported an error since `since`. An ext4
/// without a journal that is not flushed whole here is checked once after its directories'
/// `fsync`s (`check_written`), with the same effect. A file linked while anonymous there
/// (`Named::link_unflushed`: only a whole flush writes its link count with its name) is
/// `fsync`ed too when its file system is not flushed whole. `None`: nothing.
pub(crate) fn sync_names(
    names: &[NewName<'_>],
    durability: Durability,
    since: FlushMark,
) -> Vec<Result<(), FileError>> {
    if durability == Durability::None {
        return names.iter().map(|_| Ok(())).collect();
    }
    let dirs: Vec<&Arc<Dir>> = names.iter().map(|n| n.dir).collect();
    // Each directory's place in `distinct`; one that cannot be told apart (no id) is its own.
    let mut distinct: Vec<&Arc<Dir>> = Vec::new();
    let mut first: HashMap<(u64, u64), usize> = HashMap::new();
    let mut on_fs: HashMap<u64, usize> = HashMap::new();
    let slots: Vec<usize> = dirs
        .iter()
        .map(|dir| match dir.id() {
            Some(id) => {
                *on_fs.entry(id.0).or_default() += 1;
                *first.entry(id).or_insert_with(|| {
                    distinct.push(dir);
                    distinct.len() - 1
                })
            }
            None => {
                distinct.push(dir);
                distinct.len() - 1
            }
        })
        .collect();
    // Flushed whole: each file system without a journal with enough names in this group, once
    // (the directories there are then synced by it).
    let mut whole: HashMap<u64, Option<Result<(), Errno>>> = HashMap::new();
    if durability == Durability::Group && dirty_bytes().is_none_or(|d| d <= SYNCFS_MAX_FOREIGN) {
        for dir in &distinct {
            let Some((dev, _)) = dir.id() else { continue };
            if fs_kind(dir) == FsKind::Ext4NoJournal && on_fs[&dev] >= WHOLE_MIN_GROUP {
                whole.entry(dev).or_insert_with(|| sync_whole(dir));
            }
        }
    }
    let whole_of = |dir: &Dir| {
        dir.id()
            .and_then(|(dev, _)| whole.get(&dev).cloned().flatten())
    };
    let rest: Vec<&&Arc<Dir>> = distinct.iter().filter(|d| whole_of(d).is_none()).collect();
    // Together only where each is a flush of its own (no journal); elsewhere the first
    // commits the names of all, and threads would only wait for it side by side.
    let together = durability == Durability::Group
        && rest
            .iter()
            .any(|dir| !journaled(dir) && fs_kind(dir) != FsKind::Memory);
    let mut synced_rest = flush_each(
        &rest,
        |dir| flush_on(dir, || fsync_dir(dir)),
        |dir| dir,
        !together,
    )
    .into_iter();
    // Each file linked while anonymous whose file system was not flushed whole: its own
    // `fsync` writes its new link count (its name is its directory's).
    let links: Vec<(usize, &File, &OsStr, &Dir)> = names
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let (file, name) = n.link?;
            whole_of(n.dir)
                .is_none()
                .then_some((i, file, name, &**n.dir))
        })
        .collect();
    let mut linked: HashMap<usize, Result<(), FileError>> = links
        .iter()
        .zip(flush_each(
            &links,
            |(_, file, name, dir)| {
                flush_on(dir, || file.sync_all()).map_err(|e| {
                    FileError::io(&format!("syncing {}", dir.path.join(name).display()), &e)
                })
            },
            |(_, _, _, dir)| dir,
            !together,
        ))
        .map(|((i, ..), result)| (*i, result))
        .collect();
    // Checked: each ext4 without a journal not flushed whole here (too few names, too much
    // other data waiting, or a flush error met there before), once (see `check_written`); its
    // error fails every directory on such a file system below (`unharmed`).
    let mut checked = std::collections::HashSet::new();
    for dir in &distinct {
        let Some((dev, _)) = dir.id() else { continue };
        if fs_kind(dir) == FsKind::Ext4NoJournal && whole_of(dir).is_none() && checked.insert(dev) {
            check_written(dir);
        }
    }
    let synced: Vec<Result<(), FileError>> = distinct
        .iter()
        .map(|dir| {
            match whole_of(dir) {
                None => synced_rest
                    .next()
                    .expect("one result per directory synced")?,
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    return Err(FileError::errno(
                        &format!(
                            "syncing directory {} (its file system, which has no journal, \
                             reported a write error that cannot be told to be another's)",
                            dir.path.display()
                        ),
                        e,
                    ))
                }
            }
            unharmed(dir, since, &dir.path)
        })
        .collect();
    slots
        .into_iter()
        .enumerate()
        .map(|(k, i)| synced[i].clone().and(linked.remove(&k).unwrap_or(Ok(()))))
        .collect()
}

/// True for names of filepipe's own temp files: they are never inputs.
pub(crate) fn is_temp_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(TEMP_PREFIX.as_bytes()) && b.ends_with(TEMP_SUFFIX.as_bytes())
}

/// Whether `name` in `dir` is a filepipe temp being written now: a regular file carrying the
/// mark of one (any host's) whose lock a live process holds, as every writer of a named temp
/// does from before the name exists until the rename. Neither alone will do: the mark is an
/// extended attribute any writer of the file may set (found by a review: a payload named and
/// marked as a temp was hidden from `verify`'s added check), and any process may lock a
/// file it can read. A temp a stopped run left is not being written.
pub(crate) fn temp_being_written(dir: &impl AsFd, name: &OsStr) -> bool {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let Ok(fd) = rfs::openat(dir, name, flags, Mode::empty()) else {
        return false;
    };
    let regular = rfs::fstat(&fd)
        .is_ok_and(|st| rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::RegularFile);
    let mut value = [0u8; MARK_MAX];
    let marked = match rfs::fgetxattr(&fd, TEMP_MARK, &mut value[..]) {
        Ok(n) => MarkOf::parse(&value[..n]).is_some(),
        Err(_) => false,
    };
    // A read lock is refused only while someone holds a write lock: the writer's. Taken, it
    // goes with this descriptor.
    regular && marked && matches!(fslock::lock(&fd, LockKind::Read, false), Err(Errno::AGAIN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Publishes one temp as `name`.
    fn publish(
        temp: TempOutput,
        name: &str,
        replace: bool,
        durability: Durability,
    ) -> Result<(), FileError> {
        publish_together(vec![(temp, name.into())], replace, durability)
    }

    /// `beneath` sees a directory moved out of the root, or with an ancestor moved out; one
    /// moved within the root, at its depth or another, is still beneath it; a tree deeper
    /// than one path's worth of `..` is gone up in steps.
    #[test]
    fn a_directory_is_beneath_the_root_until_it_or_an_ancestor_is_moved_out() {
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        fs::create_dir_all(root_path.join("a/b/c")).unwrap();
        fs::create_dir_all(root_path.join("x/y")).unwrap();
        let root = open_root(&root_path).unwrap();
        let open = |p: &Path| open_root(p).unwrap();
        assert_eq!(beneath(&root, 0, &root), Ok(true));
        let c = open(&root_path.join("a/b/c"));
        assert_eq!(at_depth(&root, 3, &c), Ok(true));
        assert_eq!(beneath(&root, 3, &c), Ok(true));
        // Not at the depth told, but beneath.
        assert_eq!(at_depth(&root, 2, &c), Ok(false));
        assert_eq!(beneath(&root, 2, &c), Ok(true));
        fs::rename(root_path.join("a/b"), root_path.join("x/y/b")).unwrap();
        assert_eq!(at_depth(&root, 3, &c), Ok(false));
        assert_eq!(beneath(&root, 3, &c), Ok(true), "moved deeper, within");
        fs::rename(root_path.join("x/y/b"), root_path.join("x/b")).unwrap();
        assert_eq!(
            beneath(&root, 3, &c),
            Ok(true),
            "moved within, at its depth"
        );
        fs::rename(root_path.join("x"), tmp.path().join("x")).unwrap();
        assert_eq!(beneath(&root, 3, &c), Ok(false), "its ancestor moved out");
        fs::rename(tmp.path().join("x/b"), tmp.path().join("b")).unwrap();
        assert_eq!(beneath(&root, 3, &c), Ok(false), "moved out, shallower");
        fs::rename(tmp.path().join("b"), root_path.join("b")).unwrap();
        assert_eq!(beneath(&root, 3, &c), Ok(true), "moved back");

        let deep: PathBuf = std::iter::repeat_n("d", 1200).collect();
        fs::create_dir_all(root_path.join(&deep)).unwrap();
        let bottom = open(&root_path.join(&deep));
        assert_eq!(at_depth(&root, 1200, &bottom), Ok(true));
        assert_eq!(at_depth(&root, 1199, &bottom), Ok(false));
        assert_eq!(beneath(&root, 1199, &bottom), Ok(true));
        fs::rename(root_path.join("d"), tmp.path().join("d")).unwrap();
        assert_eq!(beneath(&root, 1200, &bottom), Ok(false));
    }

    /// Callers who ask while a flush is under way are served together by the next one, which
    /// starts after every one of them asked, and each is given that flush's result.
    #[test]
    fn an_output_is_dated_as_its_input_at_the_units_coarse_file_systems_keep() {
        let input = 1_700_000_001_123_456_789;
        // A ctime with nanoseconds: a file system that keeps them.
        let fine = 1_700_000_005_987_654_321;
        assert!(dated_as((input, fine), input));
        // CIFS (100 ns), 1 us, exFAT (10 ms), ext2 (1 s), FAT (2 s, down to an even second),
        // each with a ctime of its own granularity (FAT's kept to 10 ms).
        for (out, ctime) in [
            (1_700_000_001_123_456_700, 1_700_000_005_987_654_300),
            (1_700_000_001_123_456_000, 1_700_000_005_987_654_000),
            (1_700_000_001_120_000_000, 1_700_000_005_980_000_000),
            (1_700_000_001_000_000_000, 1_700_000_005_000_000_000),
            (1_700_000_000_000_000_000, 1_700_000_005_980_000_000),
        ] {
            assert!(dated_as((out, ctime), input), "{out}");
            // The same date on a file system with nanosecond ctimes: set by hand.
            assert!(!dated_as((out, fine), input), "{out} on a fine file system");
        }
        // Not a truncation of it: another time, rounded up, or a second before.
        for out in [
            1_700_000_001_123_456_788,
            1_700_000_001_123_456_800,
            1_700_000_002_000_000_000,
            1_699_999_999_000_000_000,
        ] {
            assert!(!dated_as((out, 1_700_000_005_000_000_000), input), "{out}");
        }
        // Before 1970 too (the kernel rounds toward the past).
        assert!(dated_as((-2_000_000_000, -3_000_000_000), -1_500_000_000));
        // Past 2262 (or before 1678) every time saturates alike: none is an output's date.
        for far in [i64::MAX, i64::MIN] {
            assert!(!dated_as((far, 1_700_000_005_000_000_000), far));
        }
    }

    /// A mirror directory another user made in the moment between the look for it and the
    /// `mkdir` (`EEXIST`) is judged as one found there: refused unless it is ours or the
    /// mirrored directory's owner's (found by a review racing `mkdir` in a loop). The race
    /// is made certain here: `mode_of`, called between the two, makes it.
    #[test]
    fn a_mirror_directory_another_user_makes_at_the_mkdir_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: needs root to make another user's directory");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let theirs = tmp.path().join("d");
        let squat = |rel: &Path| {
            if std::fs::create_dir(&theirs).is_ok() {
                let nobody = Some(rustix::process::Uid::from_raw(65534));
                rfs::chown(&theirs, nobody, None).unwrap();
            }
            assert_eq!(rel, Path::new("d"));
            Mirror {
                owner: Some((1500, 1500)),
                ..Mirror::plain(Mode::from_raw_mode(0o700))
            }
        };
        let Err(e) = DirCache::new(tmp.path(), true).open(Path::new("d"), &squat) else {
            panic!("another user's directory was used");
        };
        assert_eq!(e.kind, Kind::UnsafeOutputPath, "{}", e.message);
        assert!(e.message.contains("uid 65534"), "{}", e.message);
        // Its mirrored directory's owner's is used, as is ours.
        rfs::chown(&theirs, Some(rustix::process::Uid::from_raw(1500)), None).unwrap();
        assert!(DirCache::new(tmp.path(), true)
            .open(Path::new("d"), &squat)
            .is_ok());
    }

    /// An output root is opened with no symlink on its path: one there was swapped in after
    /// the config resolved the path (a review raced a service's restart so).
    #[test]
    fn an_output_root_is_never_opened_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir_all(real.join("a/out")).unwrap();
        std::os::unix::fs::symlink(real.join("a"), real.join("link")).unwrap();
        assert!(open_root(&real.join("a/out")).is_ok());
        for through in [real.join("link/out"), real.join("link")] {
            let Err(e) = open_root(&through) else {
                panic!("{} opened through a symlink", through.display())
            };
            assert_eq!(e.kind, Kind::UnsafeOutputPath, "{}", e.message);
        }
    }

    #[test]
    fn flushes_asked_for_during_one_are_served_together_by_the_next() {
        use std::sync::atomic::AtomicUsize;
        use std::time::{Duration, Instant};
        const LATE: usize = 7;
        let combined = Arc::new(Combined::<usize>::new());
        let flushes = Arc::new(AtomicUsize::new(0));
        let (running, is_running) = std::sync::mpsc::channel();
        let first = {
            let (combined, flushes) = (Arc::clone(&combined), Arc::clone(&flushes));
            std::thread::spawn(move || {
                combined.combine(|| {
                    running.send(()).expect("the test waits");
                    // Held until every late caller waits on the next flush.
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        let waiting = combined
                            .state
                            .lock()
                            .expect("lock")
                            .waiting
                            .get(&2)
                            .copied();
                        if waiting == Some(LATE) {
                            break;
                        }
                        assert!(
                            Instant::now() < deadline,
                            "late callers never waited: {waiting:?}"
                        );
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    flushes.fetch_add(1, Ordering::SeqCst) + 1
                })
            })
        };
        is_running.recv().expect("the first flush runs");
        let late: Vec<_> = (0..LATE)
            .map(|_| {
                let (combined, flushes) = (Arc::clone(&combined), Arc::clone(&flushes));
                std::thread::spawn(move || {
                    combined.combine(|| flushes.fetch_add(1, Ordering::SeqCst) + 1)
                })
            })
            .collect();
        assert_eq!(first.join().expect("first caller"), 1);
        for caller in late {
            assert_eq!(
                caller.join().expect("late caller"),
                2,
                "served by the flush after"
            );
        }
        assert_eq!(
            flushes.load(Ordering::SeqCst),
            2,
            "one flush for the seven late callers"
        );
        let state = combined.state.lock().expect("lock");
        assert!(
            state.waiting.is_empty() && state.results.is_empty(),
            "nothing kept"
        );
        drop(state);
        // Alone, a caller runs its own flush.
        assert_eq!(combined.combine(|| 30), 30);
        assert_eq!(combined.combine(|| 40), 40);
    }

    /// A flush that panics (its publisher catches it and goes on) leaves no flush running for
    /// ever: a caller that asked meanwhile runs the next one, and later callers are served.
    #[test]
    fn a_flush_that_panics_leaves_the_next_to_a_waiting_caller() {
        use std::time::Duration;
        let combined = Arc::new(Combined::<usize>::new());
        let (running, is_running) = std::sync::mpsc::channel();
        let panicking = {
            let combined = Arc::clone(&combined);
            std::thread::spawn(move || {
                combined.combine(|| {
                    running.send(()).expect("the test waits");
                    // Until the other caller waits on the next flush.
                    while combined.state.lock().expect("lock").waiting.get(&2) != Some(&1) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    panic!("a flush that panics");
                })
            })
        };
        is_running.recv().expect("the first flush runs");
        let (served, got) = std::sync::mpsc::channel();
        let waiter = {
            let combined = Arc::clone(&combined);
            std::thread::spawn(move || {
                served.send(combined.combine(|| 7)).expect("the test waits");
            })
        };
        assert!(panicking.join().is_err(), "the flush panicked");
        assert_eq!(
            got.recv_timeout(Duration::from_secs(30)),
            Ok(7),
            "a waiter hung"
        );
        waiter.join().expect("waiter");
        let (served, got) = std::sync::mpsc::channel();
        let later = Arc::clone(&combined);
        std::thread::spawn(move || served.send(later.combine(|| 8)).expect("the test waits"));
        assert_eq!(
            got.recv_timeout(Duration::from_secs(30)),
            Ok(8),
            "a later caller hung"
        );
        let state = combined.state.lock().expect("lock");
        assert!(
            state.waiting.is_empty() && state.results.is_empty(),
            "nothing kept"
        );
    }

    /// However callers interleave, each is served by a flush that started after it asked.
    #[test]
    fn a_combined_flush_always_starts_after_its_caller_asked() {
        use std::sync::atomic::AtomicUsize;
        let combined = Arc::new(Combined::<usize>::new());
        let writes = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let (combined, writes) = (Arc::clone(&combined), Arc::clone(&writes));
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let mine = writes.fetch_add(1, Ordering::SeqCst) + 1;
                        // A flush covers the writes made before it started.
                        let covered = combined.combine(|| {
                            let seen = writes.load(Ordering::SeqCst);
                            std::thread::yield_now();
                            seen
                        });
                        assert!(
                            covered >= mine,
                            "write {mine} served by a flush that saw {covered}"
                        );
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.join().expect("caller");
        }
    }

    #[test]
    fn temp_names_are_recognised_and_short() {
        let pid = std::process::id();
        assert!(is_temp_name(OsStr::new(&format!(".filepipe.{pid}.7.tmp"))));
        assert!(!is_temp_name(OsStr::new("filepipe.1.tmp")));
        assert!(own_prefix().len() < 40, "{}", own_prefix());
        assert!(is_temp_name(OsStr::new(&format!(
            "{}0{TEMP_SUFFIX}",
            own_prefix()
        ))));
    }

    /// A file named like another process's temp, marked and/or locked as `how` says; the
    /// returned descriptor holds the lock.
    fn foreign_temp(dir: &Path, name: &str, mark: bool, lock: bool) -> File {
        let path = dir.join(name);
        std::fs::write(&path, b"content").unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        if mark {
            rfs::fsetxattr(&file, TEMP_MARK, own_mark(), rfs::XattrFlags::empty()).unwrap();
        }
        if lock {
            fslock::lock(&file, LockKind::Write, false).unwrap();
        }
        file
    }

    #[test]
    fn only_a_marked_unlocked_temp_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = rfs::open(tmp.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let examine = |name: &str, remove| examine_temp(&dir, OsStr::new(name), remove);
        // Named like a temp, but nothing says filepipe made it: never removed.
        let _plain = foreign_temp(tmp.path(), ".filepipe.4000000.0.tmp", false, false);
        assert_eq!(
            examine(".filepipe.4000000.0.tmp", true),
            TempFound::Unmarked(None)
        );
        // Marked, and locked by a live writer (another description counts as another owner,
        // as a process in another PID namespace or on another host would).
        let live = foreign_temp(tmp.path(), ".filepipe.1.0.tmp", true, true);
        assert_eq!(examine(".filepipe.1.0.tmp", true), TempFound::InUse);
        // Its writer died: stale, removed only when asked.
        drop(live);
        assert_eq!(examine(".filepipe.1.0.tmp", false), TempFound::Stale);
        assert!(tmp.path().join(".filepipe.1.0.tmp").exists());
        assert_eq!(examine(".filepipe.1.0.tmp", true), TempFound::Removed);
        assert!(!tmp.path().join(".filepipe.1.0.tmp").exists());
        assert!(tmp.path().join(".filepipe.4000000.0.tmp").exists());
        // Gone, or this process's own: nothing to say.
        assert_eq!(examine(".filepipe.9.9.tmp", true), TempFound::Ignore);
        let mine = temp_name();
        std::fs::write(tmp.path().join(&mine), b"mine").unwrap();
        assert_eq!(examine(mine.to_str().unwrap(), true), TempFound::Ignore);
    }

    /// A temp of this host whose writer is in another PID namespace (its pid means nothing
    /// here) is kept while it was touched lately, even with no lock seen (a writer through a
    /// FUSE view); of an earlier boot, it is dead. A version 2 mark
    /// (no boot, no namespace) is judged by its pid, as before.
    #[test]
    fn a_temp_of_another_pid_namespace_is_judged_by_its_age_and_boot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = rfs::open(tmp.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let own = std::str::from_utf8(own_mark()).unwrap().to_owned();
        let boot = own.split(':').nth(2).unwrap().to_owned();
        let put = |name: &str, mark: &str, age_secs: u64| {
            let path = tmp.path().join(name);
            std::fs::write(&path, b"torn").unwrap();
            rfs::setxattr(&path, TEMP_MARK, mark.as_bytes(), rfs::XattrFlags::empty()).unwrap();
            let then = std::time::SystemTime::now() - std::time::Duration::from_secs(age_secs);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(then)
                .unwrap();
        };
        let host = own_host();
        // Pid 4194305 exists nowhere: only the namespace and the age keep these.
        let other_ns = format!("3:{host}:{boot}:1");
        put(".filepipe.4194305-0.0.tmp", &other_ns, 5);
        put(
            ".filepipe.4194305-0.2.tmp",
            &format!("3:{host}:another-boot:1"),
            5,
        );
        put(".filepipe.4194305-0.3.tmp", &format!("2:{host}"), 5);
        put(
            ".filepipe.4194305-0.4.tmp",
            &format!("3:0123456789abcdef:{boot}:1"),
            3600,
        );
        let examine = |name: &str| examine_temp(&dir, OsStr::new(name), true);
        // (An old one cannot be made here: the mark sets its ctime to now, and the ctime
        // counts, since a writer's last steps set its mtime back to its input's.)
        assert_eq!(examine(".filepipe.4194305-0.0.tmp"), TempFound::InUse);
        assert_eq!(examine(".filepipe.4194305-0.2.tmp"), TempFound::Removed);
        assert_eq!(examine(".filepipe.4194305-0.3.tmp"), TempFound::Removed);
        assert_eq!(examine(".filepipe.4194305-0.4.tmp"), TempFound::Foreign);
        // Parsed as written, and every version read.
        assert_eq!(
            MarkOf::parse(own_mark()).unwrap().host,
            Some(host.as_bytes())
        );
        assert!(MarkOf::parse(b"1").is_some_and(|m| m.host.is_none()));
        assert!(MarkOf::parse(b"3:abc").is_none());
        assert!(MarkOf::parse(b"4:abc:def:1").is_none());
    }

    /// The rules of `writer_may_live`, each case by itself.
    #[test]
    fn a_writer_is_judged_by_boot_then_namespace_then_pid() {
        let m = |mark: &'static str| MarkOf::parse(mark.as_bytes()).unwrap();
        let minute = std::time::Duration::from_secs(60);
        let live = |mark: &MarkOf, own: &MarkOf, idle: u64, runs: bool| {
            writer_may_live(mark, Some(own), || minute * idle as u32, || runs)
        };
        let own = m("3:h:b1:7");
        // Another boot: dead, whatever the pid or namespace say.
        assert!(!live(&m("3:h:b0:7"), &own, 0, true));
        // This boot, this namespace: by the pid.
        assert!(live(&m("3:h:b1:7"), &own, 60, true));
        assert!(!live(&m("3:h:b1:7"), &own, 0, false));
        // Another namespace: by the age, the pid meaning nothing here.
        assert!(live(&m("3:h:b1:8"), &own, 9, false));
        assert!(!live(&m("3:h:b1:8"), &own, 11, true));
        // This process cannot read the boot id (`ProcSubset=pid`): a mark naming one is not
        // of an earlier boot for that; nor is one that names none.
        let blind = m("3:h::7");
        assert!(live(&m("3:h:b1:7"), &blind, 0, true));
        assert!(live(&m("3:h:b1:8"), &blind, 1, false));
        assert!(live(&m("2:h"), &own, 0, true));
        assert!(!live(&m("2:h"), &own, 0, false));
    }

    #[test]
    fn a_temp_s_writer_is_alive_if_its_pid_runs_and_is_not_this_process() {
        let name = |pid: u32| OsString::from(format!("{TEMP_PREFIX}{pid}-0000beef.0{TEMP_SUFFIX}"));
        // Another live process (the test harness's parent).
        assert!(writer_alive(&name(std::os::unix::process::parent_id())));
        // This pid under another salt: an earlier process that had it (a container's pid 1).
        assert!(!writer_alive(&name(std::process::id())));
        // Past pid_max: nobody.
        assert!(!writer_alive(&name(4_194_305)));
        assert!(!writer_alive(OsStr::new(".filepipe.77.0.tmp")));
    }

    /// What is mirrored is the directories the input was read through: its own directory must
    /// still hold that very file, and its ancestors are reached from it by `..`. A directory
    /// swapped in at the path meanwhile (`RENAME_EXCHANGE` of one's own open directory with
    /// another's private one) gives a private `0700` with no owner, never the swapped one's
    /// (found by a review: a user got a directory of their own holding another's outputs).
    #[test]
    fn a_directory_swapped_after_the_read_is_not_mirrored() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let perms = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        std::fs::create_dir_all(tmp.path().join("top/private")).unwrap();
        std::fs::create_dir_all(tmp.path().join("top/open")).unwrap();
        std::fs::write(tmp.path().join("top/private/f"), b"x").unwrap();
        perms(&tmp.path().join("top"), 0o750);
        perms(&tmp.path().join("top/private"), 0o700);
        perms(&tmp.path().join("top/open"), 0o777);
        let read = rfs::stat(tmp.path().join("top/private/f")).unwrap();
        let root = crate::fsio::input::Root::new(tmp.path()).unwrap();
        let dir = Path::new("top/private");
        let input = Some((OsStr::new("f"), &read));
        // As read: the directory and its parent, reached from it.
        assert_eq!(mirrored(Some(&root), dir, dir, input).full, Some(0o700));
        let top = mirrored(Some(&root), Path::new("top"), dir, input);
        assert_eq!(top.full, Some(0o750));
        assert!(top.owner.is_some());
        rfs::renameat_with(
            rfs::CWD,
            tmp.path().join("top/private"),
            rfs::CWD,
            tmp.path().join("top/open"),
            RenameFlags::EXCHANGE,
        )
        .unwrap();
        for rel in [dir, Path::new("top")] {
            let m = mirrored(Some(&root), rel, dir, input);
            assert_eq!(
                (m.full, m.owner, m.acls),
                (Some(0o700), None, Some((Acl::None, Acl::None))),
                "{rel:?}"
            );
        }
    }

    /// A shared inbox (`1777`) is mirrored with its sticky bit: without it, anyone could remove
    /// another's outputs, or a moved input that is now its only copy (found by a review).
    #[test]
    fn a_mirrored_directory_keeps_its_inputs_sticky_bit() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        for (mode, want) in [(0o1777, 0o1777), (0o750, 0o750), (0o055, 0o755)] {
            let d = tmp.path().join(format!("d{mode:o}"));
            std::fs::create_dir(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            let root = crate::fsio::input::Root::new(tmp.path()).unwrap();
            let rel = Path::new(d.file_name().unwrap());
            assert_eq!(
                mirrored(Some(&root), rel, rel, None).full,
                Some(want),
                "{mode:o}"
            );
        }
        assert_eq!(
            mirrored(None, Path::new("x"), Path::new("x"), None).full,
            Some(0o700)
        );
        // Reached through a link (`--follow-symlinks`): the directory's mode, not the link's.
        std::os::unix::fs::symlink("d750", tmp.path().join("link")).unwrap();
        let root = crate::fsio::input::Root::new(tmp.path()).unwrap();
        assert_eq!(
            mirrored(Some(&root), Path::new("link"), Path::new("link"), None).full,
            Some(0o750)
        );
    }

    #[test]
    fn a_named_temp_is_marked_and_locked_while_its_writer_lives() {
        // Where anonymous temps cannot be made (no O_TMPFILE), temps are named.
        let tmp = tempfile::tempdir().unwrap();
        let dir = DirCache::new(tmp.path(), false)
            .open(Path::new(""), &|_| Mirror::plain(Mode::empty()))
            .unwrap();
        let name = OsStr::new(".filepipe.t.2.tmp");
        let (fd, marked) = create_named(&dir, name).unwrap();
        assert!(marked);
        let mut value = [0u8; MARK_MAX];
        let n = rfs::fgetxattr(&fd, TEMP_MARK, &mut value[..]).unwrap();
        assert_eq!(&value[..n], own_mark());
        assert_eq!(examine_temp(&dir.fd, name, true), TempFound::InUse);
        drop(fd);
        assert_eq!(examine_temp(&dir.fd, name, true), TempFound::Removed);
    }

    #[test]
    fn a_named_temp_removed_under_its_writer_fails_its_publish_as_io_not_vanished() {
        // `vanished` says the input was deleted: a watch then forgot the file.
        let tmp = tempfile::tempdir().unwrap();
        let dir = DirCache::new(tmp.path(), false)
            .open(Path::new(""), &|_| Mirror::plain(Mode::empty()))
            .unwrap();
        let name = OsString::from(".filepipe.t.3.tmp");
        let (fd, marked) = create_named(&dir, &name).unwrap();
        let mut temp = TempOutput {
            dir: Arc::clone(&dir),
            name: Some(name.clone()),
            file: Some(File::from(fd)),
            registry_id: None,
            marked,
            published: false,
            born: flush_mark(),
            may_replace: None,
        };
        std::io::Write::write_all(temp.file(), b"data").unwrap();
        std::fs::remove_file(tmp.path().join(&name)).unwrap();
        let err = publish(temp, "out", false, Durability::File).unwrap_err();
        assert_eq!(err.kind, Kind::Io, "{err:?}");
        assert!(err.message.contains("was removed while"), "{err:?}");
        assert!(!tmp.path().join("out").exists());
    }

    #[test]
    fn an_anonymous_temp_has_no_name_until_it_is_published_and_then_exactly_its_own() {
        // On tmpfs, where temps are anonymous whatever the disk's file system is.
        let Ok(tmp) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("SKIPPED: no /dev/shm (tmpfs) for anonymous temps");
            return;
        };
        let dir = DirCache::new(tmp.path(), false)
            .open(Path::new(""), &|_| Mirror::plain(Mode::empty()))
            .unwrap();
        let names = || {
            let mut v: Vec<_> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let mut temp = TempOutput::create(Arc::clone(&dir)).unwrap();
        assert!(temp.name.is_none(), "O_TMPFILE and /proc here");
        std::io::Write::write_all(temp.file(), b"data").unwrap();
        assert!(names().is_empty(), "{:?}", names());
        publish(temp, "out", false, Durability::File).unwrap();
        assert_eq!(names(), ["out"]);
        assert_eq!(std::fs::read(tmp.path().join("out")).unwrap(), b"data");
        // Replacing (--force, a manifest) goes through a temp name, and leaves only the output.
        let mut temp = TempOutput::create(Arc::clone(&dir)).unwrap();
        std::io::Write::write_all(temp.file(), b"new").unwrap();
        let other = TempOutput::create(Arc::clone(&dir)).unwrap();
        let err = publish(other, "out", false, Durability::File).unwrap_err();
        assert_eq!(err.kind, Kind::OutputExists);
        temp.set_attrs(
            OsStr::new("out"),
            &Attrs {
                mode: 0o640,
                uid: 0,
                gid: 0,
                times: rfs::fstat(temp.contents())
                    .map(|st| Attrs::from_stat(&st, Acl::None).times)
                    .unwrap(),
                acl: Acl::None,
            },
        )
        .unwrap();
        publish(temp, "out", true, Durability::Group).unwrap();
        assert_eq!(names(), ["out"]);
        assert_eq!(std::fs::read(tmp.path().join("out")).unwrap(), b"new");
    }

    #[test]
    fn unpublished_temp_is_removed_and_publish_refuses_to_clobber() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cache = DirCache::new(tmp.path(), true);
        let dir = cache
            .open(Path::new("a/b"), &|_| {
                Mirror::plain(Mode::from_raw_mode(0o755))
            })
            .unwrap();
        {
            let mut t = TempOutput::create(Arc::clone(&dir)).unwrap();
            std::io::Write::write_all(t.file(), b"partial").unwrap();
        }
        assert_eq!(
            std::fs::read_dir(tmp.path().join("a/b")).unwrap().count(),
            0
        );
        std::fs::write(tmp.path().join("a/b/x"), b"old").unwrap();
        let mut t = TempOutput::create(dir).unwrap();
        std::io::Write::write_all(t.file(), b"new").unwrap();
        let err = publish(t, "x", false, Durability::Group).unwrap_err();
        assert_eq!(err.kind, Kind::OutputExists);
        assert_eq!(std::fs::read(tmp.path().join("a/b/x")).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(tmp.path().join("a/b")).unwrap().count(),
            1
        );
    }

    #[test]
    fn synced_temp_is_removed_unless_renamed_and_dirs_sync_once_per_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let mode = |_: &Path| Mirror::plain(Mode::from_raw_mode(0o755));
        let a = DirCache::new(tmp.path(), true)
            .open(Path::new("a"), &mode)
            .unwrap();
        let a_again = DirCache::new(tmp.path(), true)
            .open(Path::new("a"), &mode)
            .unwrap();
        let b = DirCache::new(tmp.path(), true)
            .open(Path::new("b"), &mode)
            .unwrap();
        {
            let mut t = TempOutput::create(Arc::clone(&a)).unwrap();
            std::io::Write::write_all(t.file(), b"synced, never renamed").unwrap();
            t.start_writeback();
            let _synced = t.sync(OsStr::new("x")).unwrap();
        }
        assert_eq!(std::fs::read_dir(tmp.path().join("a")).unwrap().count(), 0);
        let mut t = TempOutput::create(Arc::clone(&b)).unwrap();
        std::io::Write::write_all(t.file(), b"data").unwrap();
        let named = t
            .sync(OsStr::new("y"))
            .unwrap()
            .rename(OsStr::new("y"), false)
            .unwrap();
        assert!(Arc::ptr_eq(&named.dir, &b));
        assert_eq!(std::fs::read(tmp.path().join("b/y")).unwrap(), b"data");
        let names = [&a, &b, &a_again, &b].map(NewName::in_dir);
        let results = sync_names(&names, Durability::File, flush_mark());
        assert_eq!(results, vec![Ok(()), Ok(()), Ok(()), Ok(())]);
    }

    /// A name linked from an anonymous temp where no directory's flush writes its link count
    /// (`Named::link_unflushed`) has its file flushed too when its file system is not flushed
    /// whole: its result is that flush's. Seen through a descriptor whose `fsync` fails (a
    /// pipe's: `EINVAL`), on tmpfs: a failed flush on a file system without a journal would
    /// fail every output in the making in this process (`flush_failed`), other tests' too.
    #[test]
    fn a_link_not_flushed_whole_has_its_own_flush() {
        let Ok(tmp) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("SKIPPED: no /dev/shm");
            return;
        };
        let dir = DirCache::new(tmp.path(), true)
            .open(Path::new("d"), &|_| {
                Mirror::plain(Mode::from_raw_mode(0o755))
            })
            .unwrap();
        if fs_kind(&dir) != FsKind::Memory {
            eprintln!("SKIPPED: /dev/shm is not a tmpfs");
            return;
        }
        let (pipe, _writer) = std::io::pipe().unwrap();
        let pipe = File::from(OwnedFd::from(pipe));
        let plain = NewName::in_dir(&dir);
        let linked = NewName {
            dir: &dir,
            link: Some((&pipe, OsStr::new("x.gz"))),
        };
        for durability in [Durability::Group, Durability::File] {
            let results = sync_names(&[plain, linked, plain], durability, flush_mark());
            assert_eq!(results[0], Ok(()), "{durability:?}");
            assert_eq!(results[2], Ok(()), "{durability:?}");
            let err = results[1].clone().unwrap_err();
            assert_eq!(err.errno, Some(libc::EINVAL), "{durability:?}: {err:?}");
            assert!(err.message.contains("x.gz"), "{durability:?}: {err:?}");
        }
        let none = sync_names(&[linked], Durability::None, flush_mark());
        assert_eq!(none, vec![Ok(())]);
    }

    #[test]
    fn a_name_taken_back_is_removed_only_while_it_leads_to_the_output() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DirCache::new(tmp.path(), false)
            .open(Path::new(""), &|_| Mirror::plain(Mode::empty()))
            .unwrap();
        let publish = |name: &str| {
            let mut t = TempOutput::create(Arc::clone(&dir)).unwrap();
            std::io::Write::write_all(t.file(), name.as_bytes()).unwrap();
            t.sync(OsStr::new(name))
                .unwrap()
                .rename(OsStr::new(name), false)
                .unwrap()
        };
        let ours = publish("ours");
        ours.withdraw();
        assert!(!tmp.path().join("ours").exists());
        // Someone else's file put under the name since: left alone.
        let theirs = publish("theirs");
        std::fs::remove_file(tmp.path().join("theirs")).unwrap();
        std::fs::write(tmp.path().join("theirs"), b"another file").unwrap();
        theirs.withdraw();
        assert_eq!(
            std::fs::read(tmp.path().join("theirs")).unwrap(),
            b"another file"
        );
    }

    #[test]
    fn write_behind_writes_everything_through() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let mut file = File::create(&path).unwrap();
        let data: Vec<u8> = (0..20_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = WriteBehind::new(&mut file, Durability::Group);
        for chunk in data.chunks(1 << 20) {
            std::io::Write::write_all(&mut w, chunk).unwrap();
        }
        std::io::Write::flush(&mut w).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    /// Whether this file system keeps ACLs (`path`, a directory, given one and back).
    fn acls_at(path: &Path) -> bool {
        let dir = rfs::open(path, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        acl::give(
            &dir,
            acl::ACCESS,
            &Acl::Some(acl::tests::named_reader(4321)),
        )
        .is_ok()
            && acl::give(&dir, acl::ACCESS, &Acl::None).is_ok()
    }

    /// A directory's ACL for the tests: user::rwx, user:4321:`named`, group::---, mask, other::---.
    fn dir_acl(named: u16) -> Vec<u8> {
        const NO_ID: u32 = u32::MAX;
        acl::tests::value(&[
            (0x01, 7, NO_ID),
            (0x02, named, 4321),
            (0x04, 0, NO_ID),
            (0x10, named, NO_ID),
            (0x20, 0, NO_ID),
        ])
    }

    /// An output takes its input's access ACL (its mode's group bits being that ACL's mask);
    /// where the input has none, the ACL it inherited from its directory's default one goes (the
    /// mode would have opened it to whom the directory names); and where the ACL cannot be given
    /// or was not read, it is its owner's alone (found by a review: outputs took the mode only,
    /// and the group the ACL kept out read them).
    #[test]
    fn an_output_takes_its_inputs_acl_or_is_its_owners_alone() {
        let tmp = tempfile::tempdir().unwrap();
        if !acls_at(tmp.path()) {
            eprintln!("SKIPPED: no ACLs on this file system");
            return;
        }
        let d = rfs::open(
            tmp.path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        rfs::fsetxattr(&d, acl::DEFAULT, &dir_acl(6), rfs::XattrFlags::empty()).unwrap();
        let dir = DirCache::new(tmp.path(), false)
            .open(Path::new(""), &|_| Mirror::plain(Mode::empty()))
            .unwrap();
        let attrs_with = |acl: Acl, temp: &TempOutput| {
            let st = rfs::fstat(temp.contents()).unwrap();
            Attrs {
                mode: 0o640,
                ..Attrs::from_stat(&st, acl)
            }
        };
        let given = |acl: Acl| {
            let mut temp = TempOutput::create(Arc::clone(&dir)).unwrap();
            std::io::Write::write_all(temp.file(), b"data").unwrap();
            let attrs = attrs_with(acl, &temp);
            temp.set_attrs(OsStr::new("out"), &attrs).unwrap();
            let st = rfs::fstat(temp.contents()).unwrap();
            (st.st_mode & 0o7777, Acl::of(temp.contents(), acl::ACCESS))
        };
        let input = acl::tests::named_reader(1700);
        assert_eq!(
            given(Acl::Some(input.clone())),
            (0o640, Acl::Some(input.clone()))
        );
        // The directory's default ACL named 4321: gone with an input that has none.
        assert_eq!(given(Acl::None), (0o640, Acl::None));
        // Not read: its owner's alone.
        assert_eq!(given(Acl::Unknown(Errno::IO)).0, 0o600);
        // Not given (a file system without ACLs): its owner's alone.
        let (mode, _) = acl::tests::failing(Errno::OPNOTSUPP, || given(Acl::Some(input)));
        assert_eq!(mode, 0o600);
    }

    /// A mirrored directory takes its input directory's access and default ACLs, given while it
    /// is `0700`, then its mode; one whose input has none keeps none of what the output tree's
    /// default ACL gave it; where they cannot be given, it is its owner's alone.
    #[test]
    fn a_mirrored_directory_takes_its_inputs_acls_or_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let (input, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        if !acls_at(input.path()) || !acls_at(out.path()) {
            eprintln!("SKIPPED: no ACLs on this file system");
            return;
        }
        let umask = crate::fsio::rootdirs::umask();
        let set = |p: &Path, name: &str, value: &[u8]| {
            let d = rfs::open(p, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
            rfs::fsetxattr(&d, name, value, rfs::XattrFlags::empty()).unwrap();
        };
        for d in ["acl", "plain", "failing"] {
            std::fs::create_dir(input.path().join(d)).unwrap();
            let m = if d == "plain" { 0o755 } else { 0o750 };
            std::fs::set_permissions(input.path().join(d), std::fs::Permissions::from_mode(m))
                .unwrap();
        }
        for d in ["acl", "failing"] {
            set(&input.path().join(d), acl::ACCESS, &dir_acl(5));
            set(&input.path().join(d), acl::DEFAULT, &dir_acl(4));
        }
        // The output tree's own default ACL, which every directory made in it inherits.
        set(out.path(), acl::DEFAULT, &dir_acl(7));
        let root = crate::fsio::input::Root::new(input.path()).unwrap();
        let made = |rel: &str| {
            let rel = Path::new(rel);
            let mut cache = DirCache::new(out.path(), true);
            let dir = cache
                .open(rel, &|r| mirrored(Some(&root), r, rel, None))
                .unwrap();
            let st = rfs::fstat(&dir.fd).unwrap();
            (
                st.st_mode & 0o7777,
                Acl::of(&dir.fd, acl::ACCESS),
                Acl::of(&dir.fd, acl::DEFAULT),
            )
        };
        let (mode, access, default) = made("acl");
        assert_eq!(mode, 0o750 & !umask);
        if umask & 0o050 == 0 {
            assert_eq!(access, Acl::Some(dir_acl(5)));
        }
        assert_eq!(default, Acl::Some(dir_acl(4)));
        assert_eq!(made("plain"), (0o755 & !umask, Acl::None, Acl::None));
        let (mode, _, _) = acl::tests::failing(Errno::OPNOTSUPP, || made("failing"));
        assert_eq!(mode, 0o700 & !umask);
    }

    #[test]
    fn planted_symlink_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("a")).unwrap();
        let mut cache = DirCache::new(tmp.path(), true);
        let err = cache
            .open(Path::new("a/b"), &|_| {
                Mirror::plain(Mode::from_raw_mode(0o755))
            })
            .unwrap_err();
        assert_eq!(err.kind, Kind::UnsafeOutputPath);
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
