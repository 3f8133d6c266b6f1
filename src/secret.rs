//! Secrets: a queue URL's user and password (or token), a credentials file's nkey seed. What a
//! URL or a message shows of them (`shown_url`, `redact`), and the rules for a file that holds
//! one or says where the queue is (`FileAccess::check_private`, `check_not_writable`, which
//! holds the directories above such a file to the same rule), or says whom to trust (a CA
//! file, `FileRule::Trust`); `open_checked` checks the file it opened, and its caller reads
//! that descriptor. A leaf: it imports nothing of the crate, so the config readers and the
//! cluster client share it.
//!
//! Redaction is conservative on purpose: a password may hold an unencoded `/`, `,`, `:` or `@`,
//! and a URL may come without a scheme (`user:pass@host:4222`, which the NATS client takes as
//! `nats://`), so everything before the last `@` is hidden, and a scheme-less word that is not
//! `HOST:PORT` (it may be a token pasted alone) too.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a NATS credentials file holds, for the private-file rule.
pub(crate) const CREDS_SECRET: &str = "an nkey seed (a NATS credentials file)";

/// What replaces a hidden part.
const HIDDEN: &str = "***";

/// `url` (a queue's: one server, or several comma-separated) as logs and messages may show it:
/// everything before its last `@` hidden (after a leading `scheme://`), and a server without a
/// scheme that is not `HOST:PORT` hidden whole.
pub(crate) fn shown_url(url: &str) -> String {
    let (head, hosts) = match url.rfind('@') {
        Some(last) => {
            let keep = scheme_len(url).filter(|&n| n <= last).unwrap_or(0);
            (format!("{}{HIDDEN}@", &url[..keep]), &url[last + 1..])
        }
        None => (String::new(), url),
    };
    // After the credentials: the first server's host, then the rest of the list.
    let mut pieces = hosts.split(',');
    let first = pieces.next().unwrap_or_default();
    let mut out = head;
    out.push_str(if out.is_empty() {
        shown_server(first)
    } else {
        first
    });
    for p in pieces {
        out.push(',');
        out.push_str(shown_server(p));
    }
    out
}

/// Whether a queue URL may carry a secret: a user and password, a token, or a word that may
/// be a token; the file that holds such a URL must be private.
pub(crate) fn url_has_secret(url: &str) -> bool {
    shown_url(url) != url
}

/// A server of a list without credentials: shown if it has a scheme or is `HOST:PORT`.
fn shown_server(p: &str) -> &str {
    if p.is_empty() || scheme_len(p).is_some() || is_host_port(p) {
        p
    } else {
        HIDDEN
    }
}

/// The length of a leading `scheme://`, if `s` starts with one.
fn scheme_len(s: &str) -> Option<usize> {
    let i = s.find("://")?;
    let scheme = &s[..i];
    let mut chars = scheme.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    ok.then_some(i + 3)
}

/// `HOST:PORT` (a name or an IPv4 address, or `[IPv6]`, and a decimal port).
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        !v6.is_empty()
            && v6
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    };
    host_ok && !port.is_empty() && port.len() <= 5 && port.chars().all(|c| c.is_ascii_digit())
}

/// `text` (a command line, a message that may quote a value) with every word holding an `@`
/// hidden up to its last `@`, but for a leading `--flag=`, quote and `scheme://`: the user and
/// password (or token) of any URL in it, with or without a scheme, reach no log.
pub(crate) fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(&redact_word(word));
        word.clear();
    };
    for c in text.chars() {
        if c.is_whitespace() {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn redact_word(w: &str) -> String {
    let Some(last) = w.rfind('@') else {
        return w.to_owned();
    };
    // What may stay: `--queue=`, then quotes or brackets, then a scheme.
    let mut keep = 0;
    if w.starts_with("--") {
        if let Some(eq) = w.find('=') {
            if w[2..eq]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                keep = eq + 1;
            }
        }
    }
    keep += w[keep..]
        .chars()
        .take_while(|c| matches!(c, '"' | '\'' | '`' | '(' | '[' | '<'))
        .count();
    keep += scheme_len(&w[keep..]).unwrap_or(0);
    if keep > last {
        keep = 0;
    }
    format!("{}{HIDDEN}{}", &w[..keep], &w[last..])
}

/// A file's owner, mode and POSIX access ACL, as read through a descriptor open on it: what
/// decides who else may read or write it.
pub(crate) struct FileAccess {
    /// Owner, group, mode.
    pub(crate) meta: Metadata,
    /// The named users' and groups' entries of its access ACL, with the mask applied: the
    /// only ones the mode does not show (a plain ACL has none).
    named: Vec<AclEntry>,
    /// Where the file opened is, as the kernel names the descriptor (`/proc/self/fd/N`):
    /// the directories above the file read, not those above a path that may lead elsewhere
    /// by now. `None` without /proc (a path is then resolved again).
    resolved: Option<PathBuf>,
}

/// A named user's or group's entry in an access ACL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AclEntry {
    group: bool,
    id: u32,
    /// r = 4, w = 2, x = 1, with the ACL's mask applied.
    perm: u16,
}

/// The tags of `system.posix_acl_access` entries (linux/posix_acl_xattr.h).
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;

impl FileAccess {
    /// Who may reach `file`: its metadata and its access ACL. A file system without ACLs
    /// has none; an ACL that cannot be read or parsed is an error (the rule cannot be
    /// checked, so the file is not trusted).
    pub(crate) fn of(file: &File) -> std::io::Result<FileAccess> {
        use std::os::fd::AsRawFd;
        let meta = file.metadata()?;
        let mut buf = vec![0u8; 4096];
        let named = named_entries(
            rustix::fs::fgetxattr(file, "system.posix_acl_access", &mut buf[..]).map(|n| &buf[..n]),
        )?;
        // An unlinked file reads as "/path (deleted)": no path to check, resolved again.
        let resolved = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok()
            .filter(|p| p.is_absolute() && p.exists());
        Ok(FileAccess {
            meta,
            named,
            resolved,
        })
    }

    /// Who may reach directory `dir` (a path without symlinks: the link itself is read).
    fn of_dir(dir: &Path) -> std::io::Result<FileAccess> {
        let meta = std::fs::symlink_metadata(dir)?;
        let mut buf = vec![0u8; 4096];
        let named = named_entries(
            rustix::fs::lgetxattr(dir, "system.posix_acl_access", &mut buf[..]).map(|n| &buf[..n]),
        )?;
        Ok(FileAccess {
            meta,
            named,
            resolved: None,
        })
    }

    /// Refuses a file that holds a secret (`what`: "the queue's password or token", "an nkey
    /// seed") when users other than its owner can read it: mode 0600 (or 0400), or, owned by
    /// root, 0640 for the group the service runs in (`root:filepipe`), as PostgreSQL asks of
    /// its key files; and no ACL entry that lets another user or group read it. Refused, not
    /// warned about: the secret is out already, and a warning at every start in a journal is
    /// what nobody reads (ssh refuses such a key file for the same reason). `Err` holds the
    /// reason.
    pub(crate) fn check_private(&self, what: &str, hint: &str) -> Result<(), String> {
        let mode = self.meta.mode() & 0o777;
        let private = mode & 0o077 == 0 || (self.meta.uid() == 0 && mode & 0o037 == 0);
        if !private {
            let who = if mode & 0o007 != 0 {
                "every user".to_string()
            } else {
                format!("group {}", self.meta.gid())
            };
            return Err(format!(
                "it holds {what}, and {who} may read it (mode {mode:04o}): chmod 600 it (or \
                 640, owned by root, for the service's group){hint}"
            ));
        }
        if let Some(e) = self.named.iter().find(|e| e.perm & 4 != 0) {
            return Err(format!(
                "it holds {what}, and its ACL lets {} read it: remove the entry (setfacl -b) and \
                 chmod 600 it (or 640, owned by root, for the service's group){hint}",
                e.who()
            ));
        }
        Ok(())
    }

    /// Refuses a file that tells a daemon what to do (its config, where its queue is) when
    /// someone else than its owner may change it, as ssh's StrictModes refuses such a key or
    /// authorized_keys file: owned by root or by the user filepipe runs as, writable by its
    /// owner only (no w bit for the group or others, no ACL entry granting write); and when
    /// someone else may replace it, as StrictModes refuses it too: each directory above it
    /// (`check_dirs_above`). `path` is the path it was opened by, resolved again only if the
    /// descriptor's own path cannot be read.
    pub(crate) fn check_not_writable(&self, path: &Path) -> Result<(), String> {
        self.check_file_not_writable()?;
        let resolved = match &self.resolved {
            Some(p) => p.clone(),
            None => std::fs::canonicalize(path).map_err(|e| format!("cannot resolve it: {e}"))?,
        };
        check_dirs_above(&resolved, "the file")
    }

    /// `check_not_writable` for the file itself.
    fn check_file_not_writable(&self) -> Result<(), String> {
        match self.changeable_by_others() {
            Some(Changeable::Owner(why)) => Err(format!("{why}: chown it")),
            Some(Changeable::Mode(why)) => Err(format!("{why}: chmod go-w it")),
            Some(Changeable::Acl(why)) => Err(format!("{why}: remove the entry (setfacl -x)")),
            None => Ok(()),
        }
    }

    /// Who else than root or filepipe's user may change it, if anyone: its owner, its group or
    /// others by its mode, or a named entry of its ACL; said without what to do about it.
    fn changeable_by_others(&self) -> Option<Changeable> {
        let (uid, mode) = (self.meta.uid(), self.meta.mode() & 0o777);
        let me = rustix::process::geteuid().as_raw();
        if uid != 0 && uid != me {
            return Some(Changeable::Owner(format!(
                "it is owned by user {uid}, who may change it, not by root or the user filepipe \
                 runs as ({me})"
            )));
        }
        if mode & 0o022 != 0 {
            return Some(Changeable::Mode(format!(
                "users other than its owner may change it (mode {mode:04o})"
            )));
        }
        self.named
            .iter()
            .find(|e| e.perm & 2 != 0)
            .map(|e| Changeable::Acl(format!("its ACL lets {} change it", e.who())))
    }
}

/// Why a file or directory may be changed by others than root or filepipe's user.
enum Changeable {
    Owner(String),
    Mode(String),
    Acl(String),
}

/// Refuses a file at `resolved` (an absolute path without symlinks) that someone else than
/// root or the user filepipe runs as may replace with a file of their own, or move away: a
/// directory above it, up to /, owned by another user, or writable by its group or others
/// (its mode, or an ACL entry granting write to a named user or group), as ssh's StrictModes
/// refuses a key file below such a directory. A sticky directory (/tmp) may be writable by
/// all: there no one but an entry's owner (and the directory's) may rename or remove it, and
/// the file's owner and the directory's are held to the rule. The directories of the path
/// as given are not checked, only those of the file it resolved to: a symlink there that
/// someone may change can only lead to another file that passes the same rules.
fn check_dirs_above(resolved: &Path, what: &str) -> Result<(), String> {
    match resolved.parent() {
        Some(dir) => check_dir_and_above(dir, what),
        None => Ok(()),
    }
}

/// `check_dirs_above`'s rule for `dir` (resolved) and every directory above it.
fn check_dir_and_above(dir: &Path, what: &str) -> Result<(), String> {
    let me = rustix::process::geteuid().as_raw();
    for dir in dir.ancestors() {
        let access = FileAccess::of_dir(dir)
            .map_err(|e| format!("cannot read the directory {} above it: {e}", dir.display()))?;
        let (uid, mode) = (access.meta.uid(), access.meta.mode() & 0o7777);
        let above = format!("the directory {} above it", dir.display());
        if uid != 0 && uid != me {
            // A state directory is moved, never its place chowned: that is often the other
            // user's own tree, and what they put in the state directory stays theirs.
            let fix = match what {
                "the state directory" => format!("move {what} out of it"),
                _ => format!("chown it, or move {what}"),
            };
            return Err(format!(
                "{above} is owned by user {uid}, who may replace {what} in it, not by root or \
                 the user filepipe runs as ({me}): {fix}"
            ));
        }
        if mode & 0o1000 != 0 {
            continue;
        }
        // An ACL's named entries first: with one, the group bits of the mode are its mask.
        if let Some(e) = access.named.iter().find(|e| e.perm & 2 != 0) {
            return Err(format!(
                "{above} has an ACL entry that lets {} add, rename or remove files in it: \
                 remove the entry (setfacl -x {} {}), or move {what}",
                e.who(),
                e.spec(),
                dir.display()
            ));
        }
        if mode & 0o022 != 0 {
            return Err(format!(
                "users other than its owner may add, rename or remove files in {above} (mode \
                 {mode:04o}): chmod go-w {} (or +t), or move {what}",
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Refuses a state directory (`dir`, an absolute path without symlinks) that someone else
/// than root or the user filepipe runs as may change: SQLite opens the database and its WAL
/// files in it by path, following symlinks, so whoever may add a file there, or rename the
/// directory or one above it, chooses what filepipe writes to (found by a review: the owner
/// of a tree holding `--state tree/.st` swapped the directory for one holding a symlink, and
/// root's run wrote its state into a database of theirs outside every root). The directory is
/// held to `check_not_writable`'s rule for a file, without a sticky exception (in a sticky
/// directory anyone may still add a name), and the directories above it to
/// `check_dirs_above`'s. So are the state's own `files` already in it: one another user put
/// there while they could (a symlink to a database of theirs, or a file they own and may
/// rewrite) would still choose what filepipe writes, and what its next manifest says, once the
/// directory was made safe (found by a review). The directory passed, so none can be put there
/// after this check.
pub(crate) fn check_state_dir(dir: &Path, files: &[&str]) -> Result<(), String> {
    let access = FileAccess::of_dir(dir).map_err(|e| format!("cannot read it: {e}"))?;
    // Another user's is never made safe by a chown: what is in it may be theirs (found by a
    // review: a database they made, chowned as a refusal told, was trusted with its forged
    // digests).
    if let Some(Changeable::Owner(why)) = access.changeable_by_others() {
        return Err(format!(
            "{why}, and what is in it may be theirs: use a new directory of root's or this \
             user's instead (a chown would not make what they put there filepipe's)"
        ));
    }
    access.check_file_not_writable()?;
    check_dirs_above(dir, "the state directory")?;
    for name in files {
        let access = match FileAccess::of_dir(&dir.join(name)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot read {name} in it: {e}")),
            Ok(access) => access,
        };
        if !access.meta.file_type().is_file() {
            return Err(format!(
                "{name} in it is not a regular file (a symlink, or another kind): filepipe makes \
                 only files there, so someone else put it there: remove it"
            ));
        }
        if let Some(why) = access.changeable_by_others() {
            let (Changeable::Owner(why) | Changeable::Mode(why) | Changeable::Acl(why)) = why;
            return Err(format!(
                "{name} in it: {why}, so what it holds may be another user's: remove it (filepipe \
                 makes it anew, and takes every file again)"
            ));
        }
    }
    Ok(())
}

/// `check_state_dir` for a state directory not made yet, to be made below `existing` (the
/// deepest directory of its path that exists, resolved), as `check-config` judges one: the
/// directories filepipe will make are its own, so `existing` and those above it decide.
pub(crate) fn check_state_dir_to_be(existing: &Path) -> Result<(), String> {
    check_dir_and_above(existing, "the state directory")
}

/// The named entries of an access ACL as `fgetxattr`/`lgetxattr` read it: none on a file
/// system without ACLs or a file without one; an ACL that cannot be parsed is an error (the
/// rule cannot be checked, so the file is not trusted).
fn named_entries(read: rustix::io::Result<&[u8]>) -> std::io::Result<Vec<AclEntry>> {
    match read {
        Ok(bytes) => parse_acl(bytes).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "its access ACL (system.posix_acl_access) cannot be parsed",
            )
        }),
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

impl AclEntry {
    /// The entry as `setfacl -x` names it.
    fn spec(&self) -> String {
        match self.group {
            true => format!("g:{}", self.id),
            false => format!("u:{}", self.id),
        }
    }

    fn who(&self) -> String {
        match self.group {
            true => format!("group {}", self.id),
            false => format!("user {}", self.id),
        }
    }
}

/// The named entries of a `system.posix_acl_access` value (version 2, then 8-byte entries:
/// tag, permissions, id, little-endian), each with the mask applied; `None` if it is not one.
fn parse_acl(bytes: &[u8]) -> Option<Vec<AclEntry>> {
    let (version, entries) = bytes.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*version) != 2 || entries.len() % 8 != 0 {
        return None;
    }
    let mut named = Vec::new();
    // Without a mask entry (an ACL of the three base entries only), nothing is masked.
    let mut mask = 0o7;
    for e in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        match tag {
            ACL_USER | ACL_GROUP => named.push(AclEntry {
                group: tag == ACL_GROUP,
                id,
                perm,
            }),
            ACL_MASK => mask = perm,
            _ => {}
        }
    }
    for e in &mut named {
        e.perm &= mask;
    }
    Some(named)
}

/// Which rule a file that says how to reach the queue is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileRule {
    /// It holds a secret (what: "an nkey seed"): readable by its owner only
    /// (`check_private`), and changeable by its owner only (`check_not_writable`).
    Secret(&'static str),
    /// It says whom to trust (a CA's certificates): anyone may read it, but whoever may change
    /// or replace it may have filepipe trust their own server, so it is held to
    /// `check_not_writable` (the file and each directory above it).
    Trust,
}

/// The largest file read by `read_checked`: far more than any credentials file or CA bundle
/// (Debian's whole bundle is about 220 KiB), small enough that a mistaken path costs nothing.
#[cfg(feature = "cluster")]
pub(crate) const MAX_CHECKED_BYTES: u64 = 4 << 20;

/// Opens `path` for reading and checks the file opened by `rule`, so whoever reads it from
/// the descriptor returned reads what was checked: no one can swap the file between the
/// check and the read. The path is resolved first, so a symlink (a Kubernetes secret volume
/// mounts each key as one) leads to its file, and errors name both; the resolved path is then
/// opened with `O_NOFOLLOW`, so a symlink put in its place meanwhile is refused, not
/// followed. Opened without blocking (a FIFO or a device is refused); the directories above
/// are those of the file opened, as the kernel names its descriptor. `Err` names the file.
pub(crate) fn open_checked(path: &Path, rule: FileRule) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let real =
        std::fs::canonicalize(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // Only the last component's symlink is named: one above it (/var/run to /run) says
    // nothing about the file.
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    let shown = match is_link {
        true => format!("{} (a symlink to {})", path.display(), real.display()),
        false => path.display().to_string(),
    };
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW)
        .open(&real)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => format!(
                "{shown}: replaced by a symlink while being opened: not followed; try again"
            ),
            _ => format!("cannot read {shown}: {e}"),
        })?;
    let access = FileAccess::of(&file).map_err(|e| format!("{shown}: {e}"))?;
    if !access.meta.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    match rule {
        FileRule::Secret(what) => access
            .check_private(what, "")
            .and_then(|()| access.check_not_writable(&real)),
        // Said first: why a file anyone may read is held to a rule at all.
        FileRule::Trust => access
            .check_not_writable(&real)
            .map_err(|e| format!("it says which servers to trust, and {e}")),
    }
    .map_err(|e| format!("{shown}: {e}"))?;
    Ok(file)
}

/// `open_checked`, then the file's bytes, read from the descriptor checked (at most
/// `MAX_CHECKED_BYTES`). Only cluster mode reads such files (a creds file, a CA bundle).
#[cfg(feature = "cluster")]
pub(crate) fn read_checked(path: &Path, rule: FileRule) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = open_checked(path, rule)?;
    let mut bytes = Vec::new();
    file.take(MAX_CHECKED_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_CHECKED_BYTES {
        return Err(format!(
            "{}: larger than {} MiB: not what it should be",
            path.display(),
            MAX_CHECKED_BYTES >> 20
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_shows_no_user_password_or_token_whatever_it_holds() {
        for (url, shown) in [
            ("nats://q:4222", "nats://q:4222"),
            ("nats://alice:S3cret@h:1", "nats://***@h:1"),
            ("tls://token@q:4222", "tls://***@q:4222"),
            // Without a scheme, as the client takes it.
            ("alice:S3cret@h:4222", "***@h:4222"),
            ("token@h", "***@h"),
            // Unencoded / , : @ in a password: everything up to the last @.
            ("nats://alice:ab/S3cret@h:1", "nats://***@h:1"),
            ("nats://alice:ab,S3cret@h:1", "nats://***@h:1"),
            ("nats://alice:a@b:S3cret@h:1", "nats://***@h:1"),
            ("alice:pa://S3cret@h:1", "***@h:1"),
            // A list: the credentials hidden, the hosts after them shown.
            (
                "nats://a:S3cret@h:1,nats://h:2",
                "nats://***@h:1,nats://h:2",
            ),
            ("nats://a:S3cret@h:1,nats://a:S3cret@h:2", "nats://***@h:2"),
            // A word without a scheme that is not HOST:PORT may be a token.
            ("S3cretToken", "***"),
            ("127.0.0.1:4222", "127.0.0.1:4222"),
            ("nats://h:1,S3cretToken", "nats://h:1,***"),
            ("[::1]:4222", "[::1]:4222"),
        ] {
            assert_eq!(shown_url(url), shown, "{url}");
            assert_eq!(url_has_secret(url), url != shown, "{url}");
            assert!(!shown_url(url).contains("S3cret"), "{url}");
        }
    }

    #[test]
    fn every_word_with_credentials_in_a_text_is_redacted() {
        let r = redact;
        assert_eq!(
            r("worker --queue nats://alice:S3cret@h:1,nats://h:2/x --jobs 2"),
            "worker --queue nats://***@h:1,nats://h:2/x --jobs 2"
        );
        assert_eq!(r("--queue=nats://a:S3cret@h"), "--queue=nats://***@h");
        assert_eq!(r("--queue=a:S3cret@h"), "--queue=***@h");
        assert_eq!(
            r("unknown variant `nats://a:b/S3cret@h:1`, expected"),
            "unknown variant `nats://***@h:1`, expected"
        );
        assert_eq!(r("\"a:S3cret@h:1\""), "\"***@h:1\"");
        assert_eq!(r("/in/nats:/a:S3c/ret@h:1"), "***@h:1");
        assert_eq!(r("no url here"), "no url here");
    }

    #[test]
    fn named_acl_entries_are_read_with_the_mask() {
        let acl = |entries: &[(u16, u16, u32)]| {
            let mut v = 2u32.to_le_bytes().to_vec();
            for (tag, perm, id) in entries {
                v.extend(tag.to_le_bytes());
                v.extend(perm.to_le_bytes());
                v.extend(id.to_le_bytes());
            }
            v
        };
        let plain = acl(&[
            (0x01, 6, u32::MAX),
            (0x04, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ]);
        assert_eq!(parse_acl(&plain), Some(vec![]));
        let named = acl(&[
            (0x01, 6, u32::MAX),
            (0x02, 6, 65534),
            (0x04, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ]);
        assert_eq!(
            parse_acl(&named),
            Some(vec![AclEntry {
                group: false,
                id: 65534,
                perm: 4
            }])
        );
        assert_eq!(parse_acl(&[1, 0, 0, 0]), None);
        assert_eq!(parse_acl(&named[..7]), None);
    }
}
