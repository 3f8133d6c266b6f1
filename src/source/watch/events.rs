//! From notify to the watcher: which kernel events are asked for, what each means for a path
//! (`Change`), which names are never taken, which file systems it cannot see other writers
//! on, and clear messages for watch failures.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::RecursiveMode;

use crate::config::Config;

/// The events watch mode acts on. Not opens and reads: every read, the workers' own included,
/// would otherwise cost an event, and they fill the same kernel queue whose overflow forces a
/// rescan.
pub(crate) fn watcher_config() -> notify::Config {
    use notify::EventKindMask as K;
    notify::Config::default()
        .with_event_kinds(K::CREATE | K::REMOVE | K::ALL_MODIFY | K::ACCESS_CLOSE)
}

/// Whether `path` (`rel` in the tree of `cfg`), just created or renamed into it, is a
/// directory to watch and scan: a directory itself, or with `--follow-symlinks` a link to a
/// directory that lies beneath the root (links are followed only within the root, as the walk
/// follows them, one step at a time from the root: nothing outside is looked up). A link to a
/// directory outside is a symlink like any other, reported as one.
pub(crate) fn is_new_dir(cfg: &Config, path: &Path, rel: &Path) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => true,
        Ok(m) if m.file_type().is_symlink() && cfg.follow_symlinks => {
            crate::fsio::input::Root::named(&cfg.root, &cfg.root_named)
                .and_then(|root| root.reach_following(rel))
                .and_then(|fd| rustix::fs::fstat(&fd))
                .is_ok_and(|st| {
                    rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::Directory
                })
        }
        _ => false,
    }
}

/// The kind of file system `root` is on, if it is one whose files other machines (or a
/// layer beneath the mount) can change without an inotify event here: NFS, SMB/CIFS, FUSE
/// (sshfs, GlusterFS, s3fs, bindfs), 9p, Ceph, Lustre, AFS, GPFS and other cluster file
/// systems (notify-rs issue 475). Watch mode then needs `--poll`.
pub(crate) fn unseen_writers(root: &Path) -> Option<&'static str> {
    let st = rustix::fs::statfs(root).ok()?;
    // f_type's integer type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let kind = st.f_type as i64 & 0xffff_ffff;
    Some(match kind {
        0x6969 => "NFS",
        0xff53_4d42 => "CIFS",
        0xfe53_4d42 => "SMB2",
        0x517b => "SMB",
        0x6573_5546 => "a FUSE file system",
        0x0102_1997 => "9p",
        0x00c3_6400 => "CephFS",
        0x0bd0_0bd0 => "Lustre",
        0x5346_414f | 0x6b41_4653 => "AFS",
        0x4750_4653 => "GPFS",
        0x7461_636f => "OCFS2",
        0x0116_1970 => "GFS2",
        _ => return None,
    })
}

/// What an event says about a path under the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// A directory appeared (created, or renamed in): watch it, then scan it, so files created
    /// in it before its watch existed are not lost.
    NewDir,
    /// Renamed into place: complete by convention (write to .part, then rename).
    RenamedIn,
    /// Closed after writing: complete, and looked at again even if its stamp is the one
    /// already done.
    Closed,
    /// chmod, touch, chown: the writer may be done (install, curl -R), or not.
    Metadata,
    /// A new name (`IN_CREATE`): a writer starting, or a file linked in whole.
    Created,
    /// Written to: its writer is not done.
    Written,
    /// Deleted, or moved out of the tree.
    Gone,
}

/// What an event of `kind` says about its path; `is_dir` is asked only when that matters
/// (a creation or a rename into the tree). `None` for events that change nothing.
pub(crate) fn change(kind: &EventKind, is_dir: impl Fn() -> bool) -> Option<Change> {
    Some(match kind {
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(RenameMode::To)) if is_dir() => {
            Change::NewDir
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => Change::RenamedIn,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Change::Closed,
        EventKind::Modify(ModifyKind::Metadata(_)) => Change::Metadata,
        EventKind::Create(_) => Change::Created,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any | ModifyKind::Other) => {
            Change::Written
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
            Change::Gone
        }
        _ => return None,
    })
}

/// Whether an event about the root itself says it is gone.
pub(crate) fn root_gone(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
    )
}

/// A clear, actionable message for watch failures.
pub(crate) fn watch_error(root: &Path, e: notify::Error) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("cannot watch {}", root.display()))
}

/// A kernel setting under /proc/sys, as shown in a message.
fn sysctl(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unreadable here".into())
}

/// The watcher could not be made (`inotify_init1` failed). Its `EMFILE` is the inotify
/// instance limit as often as the descriptor limit: the bare "Too many open files" named
/// neither (found by a review).
pub(crate) fn watcher_error(e: notify::Error) -> anyhow::Error {
    let emfile =
        matches!(&e.kind, notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::EMFILE));
    let e = anyhow::Error::new(e);
    if !emfile {
        return e.context("starting the file system watcher");
    }
    // Since Linux 5.11 the user namespace's own limit applies too, whichever is lower.
    let global = sysctl("/proc/sys/fs/inotify/max_user_instances");
    let userns = sysctl("/proc/sys/user/max_inotify_instances");
    e.context(format!(
        "starting the file system watcher: either this user's inotify instances are all in use \
         (fs.inotify.max_user_instances = {global}, user.max_inotify_instances = {userns}: \
         raise them, e.g. 'sysctl fs.inotify.max_user_instances=1024') or this process is out \
         of file descriptors (ulimit -n)"
    ))
}

/// What to say when the inotify watch limit is reached under `root`: the limits, and how to
/// raise them.
pub(crate) fn limit_reached(root: &Path) -> String {
    // Since Linux 5.11 the user namespace's own limit applies too, whichever is lower.
    let global = sysctl("/proc/sys/fs/inotify/max_user_watches");
    let userns = sysctl("/proc/sys/user/max_inotify_watches");
    format!(
        "cannot watch every directory under {}: the inotify watch limit is exhausted \
         (fs.inotify.max_user_watches = {global}, user.max_inotify_watches = {userns}); the \
         directories past it are scanned on an interval instead, which is slower and costlier; \
         raise the limit, e.g. 'sysctl fs.inotify.max_user_watches=1048576' (and in \
         /etc/sysctl.d/ to keep it)",
        root.display()
    )
}

/// Whether a directory is watched (`watch_dir`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Watched {
    Yes,
    /// Gone again already (its removal event follows) or not to be read (tried again when
    /// its attributes change: `Watcher::unwatched`).
    No,
    /// The inotify watch limit is reached: scanned on an interval (`Watcher::limited`).
    Limit,
}

/// Watches `dir` alone (a scan watches its subdirectories); harmless if it already is watched.
/// A symlink is not followed (`IN_DONT_FOLLOW`) unless `follow_symlinks`: a link made to a
/// directory outside the tree, or swapped in for one of its directories, would otherwise have
/// the kernel report the outside directory's names as the tree's.
pub(crate) fn watch_dir(
    watcher: &mut notify::RecommendedWatcher,
    dir: &Path,
    follow_symlinks: bool,
) -> Watched {
    use notify::Watcher as _;
    let how = notify::WatchPathConfig::new(RecursiveMode::NonRecursive)
        .with_dereference_symlinks(follow_symlinks);
    match watcher.watch_with(dir, how) {
        Ok(()) => Watched::Yes,
        Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => Watched::Limit,
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot watch");
            Watched::No
        }
    }
}

/// Writers' temp names (filepipe's own temps among them): never taken, whatever the filters
/// say.
pub(crate) fn temp_like(rel: &Path) -> bool {
    let name = rel.file_name().unwrap_or(OsStr::new("")).as_bytes();
    [&b".part"[..], b".tmp", b".crdownload", b"~"]
        .iter()
        .any(|s| name.ends_with(s))
        || name.starts_with(b".#")
}

/// Whether `rel` is named as one of the op's outputs next to its input (`.gz` for gzip,
/// `.zst` for zstd, no `--out`). With `--out`, a name with the suffix in the tree is a user's
/// file like any other (reported already compressed, or hashed).
pub(crate) fn output_named(cfg: &Config, rel: &Path) -> bool {
    let name = rel.file_name().unwrap_or(OsStr::new("")).as_bytes();
    cfg.out.is_none()
        && cfg
            .op
            .suffix()
            .is_some_and(|s| name.ends_with(s.as_bytes()))
}

/// Whether `rel` is a writer's temp name or named as an output next to its input: names a
/// file of which may be filepipe's, never taken as such (see `Watcher::not_taken`).
pub(crate) fn ignored_name(cfg: &Config, rel: &Path) -> bool {
    temp_like(rel) || output_named(cfg, rel)
}

/// Whether an event's path is an anonymous file's (`O_TMPFILE`, filepipe's own temps among
/// them): the kernel reports writes to one, and its close, under a made-up name `#<inode>`
/// that no directory holds. Such a file is seen when it is linked in (`IN_CREATE`).
pub(crate) fn anonymous(abs: &Path) -> bool {
    let name = abs.file_name().unwrap_or(OsStr::new("")).as_bytes();
    name.len() > 1
        && name[0] == b'#'
        && name[1..].iter().all(u8::is_ascii_digit)
        && std::fs::symlink_metadata(abs).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind};

    #[test]
    fn each_event_kind_means_one_change_and_only_new_names_ask_for_a_directory() {
        let file = || false;
        let dir = || true;
        let cases = [
            (EventKind::Create(CreateKind::File), Some(Change::Created)),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                Some(Change::RenamedIn),
            ),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                Some(Change::Closed),
            ),
            (EventKind::Access(AccessKind::Close(AccessMode::Read)), None),
            (
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                Some(Change::Metadata),
            ),
            (
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                Some(Change::Written),
            ),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::From)),
                Some(Change::Gone),
            ),
            (EventKind::Remove(RemoveKind::File), Some(Change::Gone)),
        ];
        for (kind, want) in cases {
            assert_eq!(change(&kind, file), want, "{kind:?}");
        }
        for kind in [
            EventKind::Create(CreateKind::Folder),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
        ] {
            assert_eq!(change(&kind, dir), Some(Change::NewDir), "{kind:?}");
        }
        // Only a new name may be a directory to watch: nothing else costs a stat.
        let never = || -> bool { panic!("asked whether a path is a directory") };
        assert_eq!(
            change(&EventKind::Remove(RemoveKind::Any), never),
            Some(Change::Gone)
        );
        assert_eq!(
            change(
                &EventKind::Access(AccessKind::Close(AccessMode::Write)),
                never
            ),
            Some(Change::Closed)
        );
    }
}
