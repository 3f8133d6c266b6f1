//! Per-file errors as data.
//!
//! A `FileError` describes why one file was skipped or failed; it travels to the reporter inside
//! an `Outcome` and never aborts the run. Fatal, run-wide problems use `anyhow` instead.

use std::fmt;
use std::io;

/// Why a file could not be processed, or was deliberately left alone. The kebab-case name is
/// what the failure log's `error` field carries, so scripts can match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    /// The file disappeared between the walk and the open (ENOENT).
    Vanished,
    /// EACCES / EPERM on the input or the output.
    PermissionDenied,
    /// Size, mtime or ctime changed while the file was read: the result would be torn.
    Changed,
    /// FIFO, socket or device: never opened, so no worker can block on it.
    SpecialFile,
    /// A symlink (broken, looping, leading outside the root, or simply not followed).
    Symlink,
    /// An output with other content already exists and `--force` was not given.
    OutputExists,
    /// The output exists and is up to date (same mtime as the input).
    UpToDate,
    /// A compressing op's input is already compressed (`.gz`, `.zst`, `.xz`, `.bz2`, `.lz4`,
    /// `.zip`, `.7z`): skipped unless `--force`, and never when named like the op's own outputs
    /// next to them.
    AlreadyCompressed,
    /// The output name would exceed NAME_MAX (ENAMETOOLONG).
    NameTooLong,
    /// ENOSPC or EDQUOT while writing the output.
    NoSpace,
    /// EFBIG: RLIMIT_FSIZE or the file system's maximum file size.
    FileTooLarge,
    /// A component of the output path is a symlink or not a directory: refused so that nothing
    /// is ever written outside the output root.
    UnsafeOutputPath,
    /// Not started because a shutdown signal arrived first, or abandoned mid-way by a second
    /// one (nothing was published).
    Interrupted,
    /// `--remove-source` refused: the input has more than one hard link. Or the file is a
    /// hard link to one of filepipe's own (the state's database, the failure log): not read.
    HardLinked,
    /// A corrupt gzip or zstd stream, or a digest mismatch, found by `verify`.
    Corrupt,
    /// Any other I/O error.
    Io,
    /// A bug: an operation panicked on this file. The run goes on.
    Internal,
    /// A temp file another running filepipe is writing: not an input.
    TempInUse,
    /// Watch mode: another process still has the file open for writing (a shared writable
    /// mapping counts), so it may still change without an event: tried again until it is not.
    InUse,
    /// A temp file a stopped filepipe left, in a tree this run does not write to.
    StaleTemp,
    /// Named like a filepipe temp file, but nothing proves filepipe made it: neither read nor
    /// removed.
    TempName,
    /// Watch mode: named like a writer's temp file (`*.tmp`, `*.part`, ...), which its writer
    /// renames when done, and left unchanged long enough to be a file of the tree: never
    /// taken by that name.
    WriterTemp,
    /// Larger than `--max-size`: never read.
    OverMaxSize,
    /// Cluster mode: the job's output root is not mapped on the worker that took it (its
    /// `--out-root NAME=PATH`).
    UnmappedRoot,
    /// Cluster mode: the job asks for its inputs removed, and the worker that took it may not
    /// (no `--allow-remove-source`, or `--durability none`).
    RemoveRefused,
    /// Cluster mode: the file's outcome came, but this coordinator cannot read it (a worker of
    /// a later release, with a kind of failure this one has no name for; or a broken one, once
    /// the job has left the queue): the job was taken and settled, how it ended is unknown
    /// here, and it is not published again.
    UnreadableOutcome,
    /// Cluster mode: a job message names a path no job may (empty, absolute, with a `.`, `..`
    /// or empty part, a NUL, over PATH_MAX, or hex that does not decode): that file fails at
    /// the worker before anything is opened. An input's name, not an output's.
    UnsafeJobPath,
}

impl Kind {
    /// The stable name used in logs and the failure log.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Vanished => "vanished",
            Kind::PermissionDenied => "permission-denied",
            Kind::Changed => "changed-while-read",
            Kind::SpecialFile => "special-file",
            Kind::Symlink => "symlink",
            Kind::OutputExists => "output-exists",
            Kind::UpToDate => "up-to-date",
            Kind::AlreadyCompressed => "already-compressed",
            Kind::NameTooLong => "name-too-long",
            Kind::NoSpace => "no-space",
            Kind::FileTooLarge => "file-too-large",
            Kind::UnsafeOutputPath => "unsafe-output-path",
            Kind::Interrupted => "interrupted",
            Kind::HardLinked => "hard-linked",
            Kind::Corrupt => "corrupt",
            Kind::Io => "io",
            Kind::Internal => "internal",
            Kind::TempInUse => "temp-in-use",
            Kind::InUse => "in-use",
            Kind::StaleTemp => "stale-temp",
            Kind::TempName => "temp-name",
            Kind::WriterTemp => "writer-temp",
            Kind::OverMaxSize => "over-max-size",
            Kind::UnmappedRoot => "unmapped-root",
            Kind::RemoveRefused => "remove-refused",
            Kind::UnreadableOutcome => "unreadable-outcome",
            Kind::UnsafeJobPath => "unsafe-job-path",
        }
    }
}

impl Kind {
    /// Every kind, for `parse`.
    const ALL: [Kind; 27] = [
        Kind::Vanished,
        Kind::PermissionDenied,
        Kind::Changed,
        Kind::SpecialFile,
        Kind::Symlink,
        Kind::OutputExists,
        Kind::UpToDate,
        Kind::AlreadyCompressed,
        Kind::NameTooLong,
        Kind::NoSpace,
        Kind::FileTooLarge,
        Kind::UnsafeOutputPath,
        Kind::Interrupted,
        Kind::HardLinked,
        Kind::Corrupt,
        Kind::Io,
        Kind::Internal,
        Kind::TempInUse,
        Kind::InUse,
        Kind::StaleTemp,
        Kind::TempName,
        Kind::WriterTemp,
        Kind::OverMaxSize,
        Kind::UnmappedRoot,
        Kind::RemoveRefused,
        Kind::UnreadableOutcome,
        Kind::UnsafeJobPath,
    ];

    /// The kind named `name` (as `as_str` writes it), for outcomes read back from a queue.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One file's error: a kind to match on, the errno when the kernel gave one, and a message for
/// humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileError {
    /// What went wrong, as a stable category.
    pub(crate) kind: Kind,
    /// The OS error number, when the error came from a system call.
    pub(crate) errno: Option<i32>,
    /// A human-readable explanation, including the failing step.
    pub(crate) message: String,
}

impl FileError {
    /// An error with no errno.
    pub(crate) fn new(kind: Kind, message: impl Into<String>) -> Self {
        FileError {
            kind,
            errno: None,
            message: message.into(),
        }
    }

    /// Classifies an I/O error that happened while doing `what` (e.g. "opening input").
    pub(crate) fn io(what: &str, err: &io::Error) -> Self {
        if err.get_ref().is_some_and(|e| e.is::<Abandoned>()) {
            return FileError::new(Kind::Interrupted, err.to_string());
        }
        let errno = err.raw_os_error();
        let kind = match errno {
            Some(libc::ENOENT) => Kind::Vanished,
            Some(libc::EACCES) | Some(libc::EPERM) => Kind::PermissionDenied,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Kind::NoSpace,
            Some(libc::EFBIG) => Kind::FileTooLarge,
            Some(libc::ENAMETOOLONG) => Kind::NameTooLong,
            Some(libc::EEXIST) => Kind::OutputExists,
            Some(libc::ELOOP) => Kind::Symlink,
            _ => Kind::Io,
        };
        FileError {
            kind,
            errno,
            message: format!("{what}: {err}"),
        }
    }

    /// Same as [`FileError::io`] for rustix's errno type.
    pub(crate) fn errno(what: &str, err: rustix::io::Errno) -> Self {
        Self::io(what, &io::Error::from(err))
    }

    /// The failure a caught panic stands for (a bug: the run goes on without this file).
    pub(crate) fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        FileError::new(Kind::Internal, format!("panic: {msg}"))
    }

    /// Runs one file's step so that a panic in it fails that file alone.
    pub(crate) fn guard<T>(step: impl FnOnce() -> Result<T, FileError>) -> Result<T, FileError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(step))
            .unwrap_or_else(|p| Err(FileError::panicked(p.as_ref())))
    }
}

/// The error a read returns once a second shutdown request aborted the run: the file is
/// abandoned, not failed (`FileError::io` makes it `Kind::Interrupted`).
#[derive(Debug)]
pub(crate) struct Abandoned;

impl fmt::Display for Abandoned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("abandoned: stopped by a second signal")
    }
}

impl std::error::Error for Abandoned {}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind)
    }
}

impl std::error::Error for FileError {}

/// `e` with its causes, as `{:#}` has it, but without a cause that the one before already
/// says: some libraries' errors show their source in their own text too, and the chain then
/// said it twice or three times ("authorization violation: nats: authorization violation:
/// nats: authorization violation", found by a review).
pub(crate) fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if !last.is_empty() && last.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
        last = said;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        let inner = anyhow::anyhow!("nats: authorization violation");
        let lib = inner.context("authorization violation: nats: authorization violation");
        let e = lib.context("cannot connect to NATS at nats://q1:4222");
        assert_eq!(
            chain(&e),
            "cannot connect to NATS at nats://q1:4222: authorization violation: nats: \
             authorization violation"
        );
        // Causes that say something new are all kept, in order.
        let e = anyhow::anyhow!("No such file or directory (os error 2)")
            .context("reading /etc/x")
            .context("loading the config");
        assert_eq!(
            chain(&e),
            "loading the config: reading /etc/x: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn every_kind_reads_back_from_its_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("no-such-kind"), None);
    }

    #[test]
    fn errno_maps_to_kind() {
        let e = FileError::io("writing", &io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind, Kind::NoSpace);
        assert_eq!(e.errno, Some(libc::ENOSPC));
        assert!(e.message.starts_with("writing: "));
        let e = FileError::io("opening", &io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.kind, Kind::Vanished);
        let e = FileError::io("x", &io::Error::other("odd"));
        assert_eq!((e.kind, e.errno), (Kind::Io, None));
    }
}
