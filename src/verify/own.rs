//! filepipe's own files that a tree may hold and that no batch lists, which `verify` must not
//! call added: those of a state directory kept inside the tree (`batch --state t/.st`, `watch
//! --state t/.st`), which batch and watch leave out of their walk, and the other manifests a
//! run of several hashes writes beside the one verified (`SUMS.blake3` beside `SUMS`).
//!
//! Told by what they hold, never by their name alone (anyone could hide a file from the report
//! by naming it `filepipe.sqlite`): a directory is a state directory when its
//! `filepipe.sqlite` is a SQLite database whose page 1 (or, before its first checkpoint, its
//! write-ahead log's first frame) holds the `files` table filepipe creates, next to a
//! `filepipe.lock` that says `filepipe pid ...`; a second manifest starts with a manifest line.
//! Only bounded prefixes are read (a header, one page of at most 64 KiB, one line), each file
//! opened beneath the root, no link followed, and a FIFO never opened.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::cli::OpKind;
use crate::digest::HashAlgo;
use crate::fsio::input::{fill, InputFile, Root};
use crate::manifest;
use crate::state::{DB_NAME, LOCK_NAME};

/// What SQLite keeps beside a database while it is open (or after a process that had it open
/// was killed): its write-ahead log, the log's shared index, a rollback journal.
const SIDE_SUFFIXES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// The largest page SQLite writes: page 1 is read whole, never more.
const MAX_PAGE: usize = 65536;

/// The first 4 bytes of a SQLite write-ahead log (its checksums' byte order in the last bit).
const WAL_MAGIC: [[u8; 4]; 2] = [[0x37, 0x7f, 0x06, 0x82], [0x37, 0x7f, 0x06, 0x83]];

/// A SQLite WAL index grows by regions of this size.
const SHM_REGION: u64 = 32768;

/// The most a lock file holds: one line saying who holds it (`state::lock_dir` writes `filepipe
/// pid N on HOST (started TIME)`, a host name at most 64 bytes).
const LOCK_MAX: usize = 256;

/// The first 16 bytes of every SQLite database.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// How the table filepipe creates is recorded in SQLite's schema (`sqlite_schema.sql`: SQLite
/// keeps the statement as written, `IF NOT EXISTS` dropped, and puts the columns an `ALTER
/// TABLE ... ADD COLUMN` added before the constraints).
const TABLE_START: &[u8] = b"CREATE TABLE files (";

/// The columns every state filepipe ever wrote has, in their order (later ones added more).
const COLUMNS: [&str; 14] = [
    "root", "op", "path", "size", "mtime_ns", "inode", "output", "digest", "status", "error",
    "errno", "message", "attempts", "updated",
];

/// A file's device and inode.
pub(super) type FileId = (u64, u64);

/// filepipe's own files among those a walk of the tree finds: the manifest verified, the other
/// manifests of the run that wrote it, and state directories.
pub(super) struct OwnFiles {
    /// The manifest verified, by identity, whatever path named it.
    manifest: Option<FileId>,
    /// The files where filepipe puts the other manifests of a run of several hashes, by
    /// identity and name (a hard link of another name is another file of the user's), with
    /// the hash each would hold (`None`: the first manifest, any).
    siblings: Vec<(FileId, OsString, Option<HashAlgo>)>,
    state_dirs: StateDirs,
}

impl OwnFiles {
    /// Those of the manifest at `path`.
    pub(super) fn of_manifest(path: &Path) -> OwnFiles {
        OwnFiles {
            manifest: id_of(path),
            siblings: sibling_manifests(path)
                .into_iter()
                .filter_map(|(p, algo)| Some((id_of_file(&p)?, p.file_name()?.into(), algo)))
                .collect(),
            state_dirs: StateDirs::default(),
        }
    }

    /// Whether `rel`, a regular file the walk found under the root with identity `id`, is
    /// one of filepipe's own: the manifest, another manifest of its run that holds a manifest
    /// line first, or a file of a state directory.
    pub(super) fn holds(&mut self, root: &Path, beneath: &Root, rel: &Path, id: FileId) -> bool {
        if self.manifest == Some(id) {
            return true;
        }
        let sibling = (self.siblings.iter())
            .find(|(s, name, _)| *s == id && rel.file_name() == Some(name.as_os_str()));
        if let Some(&(_, _, algo)) = sibling {
            if starts_as_manifest(root, beneath, rel, algo) {
                return true;
            }
        }
        self.state_dirs.holds(root, beneath, rel)
    }
}

/// The device and inode of what `path` names (a symlink followed, as the manifest was read
/// through it): only compared with the walk's files, each found beneath the root.
fn id_of(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The device and inode of `path` if it is a regular file, not a symlink: a link named
/// `SUMS.blake3` to another file of the tree must not get that file left out.
fn id_of_file(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|m| (m.dev(), m.ino()))
}

/// The hashes a manifest may be of, in the order filepipe names them.
const HASHES: [HashAlgo; 3] = [HashAlgo::Sha256, HashAlgo::Sha512, HashAlgo::Blake3];

/// Where a run of several hashes puts its other manifests, given one of them (`path`): the
/// first keeps the name given (`SUMS`), each other one is that name and its hash's
/// (`SUMS.blake3`, `SUMS.sha512`; `config::manifest_path`). `path` itself is not among them.
fn sibling_manifests(path: &Path) -> Vec<(PathBuf, Option<HashAlgo>)> {
    let suffixed = |base: &OsStr, algo: HashAlgo| {
        let mut name = base.to_os_string();
        name.push(".");
        name.push(OpKind::from(algo).as_str());
        (path.with_file_name(name), Some(algo))
    };
    let Some(name) = path.file_name() else {
        return Vec::new();
    };
    let mut found: Vec<_> = HASHES.iter().map(|&a| suffixed(name, a)).collect();
    // `SUMS.blake3` verified: `SUMS` and the others beside it.
    let base = HASHES.iter().find_map(|&a| {
        let suffix = format!(".{}", OpKind::from(a).as_str());
        name.as_bytes()
            .strip_suffix(suffix.as_bytes())
            .filter(|b| !b.is_empty())
    });
    if let Some(base) = base {
        let base = OsStr::from_bytes(base);
        found.push((path.with_file_name(base), None));
        found.extend(HASHES.iter().map(|&a| suffixed(base, a)));
    }
    found.retain(|(p, _)| p != path);
    found
}

/// Whether the regular file `rel` starts with a line of a manifest of `algo` (of any hash if
/// `None`), as filepipe writes them: its first line, at most `LONGEST_LINE` bytes, is read.
fn starts_as_manifest(root: &Path, beneath: &Root, rel: &Path, algo: Option<HashAlgo>) -> bool {
    let Some((start, _)) = prefix(root, beneath, rel, super::LONGEST_LINE + 1) else {
        return false;
    };
    let Some(end) = start.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let line = &start[..end];
    match algo {
        Some(algo) => manifest::parse_line(line, algo).is_some(),
        None => HASHES
            .iter()
            .any(|&a| manifest::parse_line(line, a).is_some()),
    }
}

/// The directories of one tree found to be, or not to be, filepipe state directories, each
/// asked once.
#[derive(Default)]
struct StateDirs {
    known: HashMap<PathBuf, bool>,
}

impl StateDirs {
    /// Whether `rel`, a regular file the walk found under the root, is one of the files
    /// filepipe keeps in a state directory (the database, its SQLite side files, the lock)
    /// and lies in one. A file of another name beside them is not, nor one of a side file's
    /// name that holds something else.
    fn holds(&mut self, root: &Path, beneath: &Root, rel: &Path) -> bool {
        let Some(name) = rel.file_name() else {
            return false;
        };
        let Some(kind) = state_name(name) else {
            return false;
        };
        let dir = rel.parent().unwrap_or(Path::new(""));
        let in_state_dir = match self.known.get(dir) {
            Some(&known) => known,
            None => {
                let is = is_state_dir(root, beneath, dir);
                self.known.insert(dir.to_path_buf(), is);
                is
            }
        };
        in_state_dir
            && match kind {
                // Both read to tell the directory.
                StateName::Own => true,
                StateName::Side(suffix) => prefix(root, beneath, rel, 12)
                    .is_some_and(|(start, size)| is_sqlite_side(suffix, &start, size)),
            }
    }
}

/// Which of a state directory's files a name is.
#[derive(Debug, PartialEq, Eq)]
enum StateName {
    /// The database or the lock.
    Own,
    /// A file SQLite keeps beside the database, by its suffix.
    Side(&'static str),
}

/// Which of a state directory's files `name` is, if any.
fn state_name(name: &OsStr) -> Option<StateName> {
    let name = name.as_bytes();
    if name == LOCK_NAME.as_bytes() || name == DB_NAME.as_bytes() {
        return Some(StateName::Own);
    }
    let side = name.strip_prefix(DB_NAME.as_bytes())?;
    SIDE_SUFFIXES
        .into_iter()
        .find(|s| side == s.as_bytes())
        .map(StateName::Side)
}

/// Whether `start`, the first bytes of a file of `size` bytes named for SQLite's `suffix` side
/// file, is what SQLite writes there (each may also be empty: truncated, or made and not
/// written yet), its size too where SQLite's layout says it at every moment (whole regions;
/// not a log's whole frames, which a running daemon's write leaves part-written for a while).
fn is_sqlite_side(suffix: &str, start: &[u8], size: u64) -> bool {
    let first = |n: usize| start.get(..n);
    size == 0
        || match suffix {
            // A 32-byte header (a page size at offset 8), then frames.
            "-wal" => first(12).is_some_and(|h| {
                let page = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
                WAL_MAGIC.contains(&[h[0], h[1], h[2], h[3]])
                    && page.is_power_of_two()
                    && (512..=MAX_PAGE).contains(&page)
            }),
            // The index's version, 3007000, in the host's byte order, in regions of 32 KiB.
            "-shm" => {
                size.is_multiple_of(SHM_REGION)
                    && first(4).is_some_and(|v| v == 3_007_000u32.to_ne_bytes())
            }
            // A journal's magic, or its header zeroed once committed (`journal_mode=PERSIST`).
            "-journal" => first(8).is_some_and(|m| {
                m == [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7] || m == [0; 8]
            }),
            _ => false,
        }
}

/// Whether the directory `dir` (relative to the root) holds filepipe's state: a lock that
/// says it is filepipe's, and a database with filepipe's table.
fn is_state_dir(root: &Path, beneath: &Root, dir: &Path) -> bool {
    let lock = prefix(root, beneath, &dir.join(LOCK_NAME), LOCK_MAX + 1);
    if !lock.is_some_and(|(l, size)| is_lock(&l, size)) {
        return false;
    }
    let db = dir.join(DB_NAME);
    if let Some(page) = first_page(root, beneath, &db) {
        if holds_filepipe_table(&page) {
            return true;
        }
    }
    // In WAL mode a new database's schema is in the log until the first checkpoint: a running
    // daemon's, or one killed before it closed, has a page 1 with no table in the database.
    let mut wal = db.into_os_string();
    wal.push("-wal");
    first_logged_page_1(root, beneath, Path::new(&wal)).is_some_and(|p| holds_filepipe_table(&p))
}

/// Whether a lock file of `size` bytes that starts with `start` (all of it, if it is a lock)
/// is what filepipe writes: one line saying which filepipe holds it, or nothing (it is empty
/// until its owner writes who it is, and a process killed in between leaves it so).
fn is_lock(start: &[u8], size: u64) -> bool {
    size == 0
        || size == start.len() as u64
            && start.starts_with(b"filepipe pid ")
            && start.iter().position(|&b| b == b'\n') == Some(start.len() - 1)
}

/// At most `limit` bytes from the start of the regular file `rel`, and its size, opened
/// beneath the root without following links (`None` if it cannot be: missing, a symlink, a
/// FIFO, unreadable).
fn prefix(root: &Path, beneath: &Root, rel: &Path, limit: usize) -> Option<(Vec<u8>, u64)> {
    let mut file =
        InputFile::open_beneath(Some(beneath), rel, &root.join(rel), false, true).ok()?;
    let mut buf = vec![0u8; limit];
    let n = fill(&mut file, &mut buf).ok()?;
    buf.truncate(n);
    Some((buf, file.size()))
}

/// Page 1 of the SQLite database `rel` (its header and the schema's first page), or `None`
/// for a file that is not one.
fn first_page(root: &Path, beneath: &Root, rel: &Path) -> Option<Vec<u8>> {
    let mut file =
        InputFile::open_beneath(Some(beneath), rel, &root.join(rel), false, true).ok()?;
    let mut header = [0u8; 100];
    if fill(&mut file, &mut header).ok()? < header.len() || !header.starts_with(SQLITE_MAGIC) {
        return None;
    }
    // Big-endian at offset 16; 1 stands for 65536.
    let size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => MAX_PAGE,
        n => usize::from(n),
    };
    // A database is whole pages.
    if !size.is_power_of_two()
        || !(512..=MAX_PAGE).contains(&size)
        || !file.size().is_multiple_of(size as u64)
    {
        return None;
    }
    let mut page = header.to_vec();
    file.take((size - header.len()) as u64)
        .read_to_end(&mut page)
        .ok()?;
    Some(page)
}

/// Page 1 as the write-ahead log `rel` holds it in its first frame, or `None`. The first
/// transaction of a new database (creating its table) writes page 1 first, and a log starts
/// over only once all of it is in the database.
fn first_logged_page_1(root: &Path, beneath: &Root, rel: &Path) -> Option<Vec<u8>> {
    let mut file =
        InputFile::open_beneath(Some(beneath), rel, &root.join(rel), false, true).ok()?;
    // A 32-byte header (magic, version, page size), then frames: 24 bytes (the page number
    // first), then the page.
    let mut header = [0u8; 32 + 24];
    if fill(&mut file, &mut header).ok()? < header.len() {
        return None;
    }
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if !WAL_MAGIC.contains(&[header[0], header[1], header[2], header[3]]) || be32(32) != 1 {
        return None;
    }
    let size = usize::try_from(be32(8)).ok()?;
    if !size.is_power_of_two() || !(512..=MAX_PAGE).contains(&size) {
        return None;
    }
    let mut page = Vec::with_capacity(size);
    file.take(size as u64).read_to_end(&mut page).ok()?;
    Some(page)
}

/// Whether a schema page holds the `files` table as filepipe creates it: filepipe's columns
/// in its order (any it added since after them), keyed by (root, op, path), without rowid.
fn holds_filepipe_table(page: &[u8]) -> bool {
    let Some(at) = page
        .windows(TABLE_START.len())
        .position(|w| w == TABLE_START)
    else {
        return false;
    };
    let rest = &page[at + TABLE_START.len()..];
    let end = b") WITHOUT ROWID";
    let Some(len) = rest.windows(end.len()).position(|w| w == end) else {
        return false;
    };
    let Ok(body) = std::str::from_utf8(&rest[..len]) else {
        return false;
    };
    // Column definitions and constraints, parted by the commas outside parentheses.
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in body.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    let words = |part: &str| part.split_whitespace().collect::<Vec<_>>().join(" ");
    let parts: Vec<String> = parts.into_iter().map(words).collect();
    let names: Vec<&str> = parts
        .iter()
        .map(|p| p.split(' ').next().unwrap_or(""))
        .collect();
    names.len() > COLUMNS.len()
        && names[..COLUMNS.len()] == COLUMNS
        && parts
            .iter()
            .any(|p| p.replace(" (", "(") == "PRIMARY KEY(root, op, path)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statement as `sqlite_schema` keeps it for a state written by filepipe, with the
    /// columns added later put before the constraint as SQLite puts them.
    const SCHEMA_SQL: &str = "CREATE TABLE files (
                 root     BLOB    NOT NULL,
                 op       TEXT    NOT NULL,
                 path     BLOB    NOT NULL,
                 size     INTEGER,
                 mtime_ns INTEGER,
                 inode    INTEGER,
                 output   BLOB,
                 digest   BLOB,
                 status   TEXT    NOT NULL,
                 error    TEXT,
                 errno    INTEGER,
                 message  TEXT,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 updated  INTEGER NOT NULL, ctime_ns INTEGER, made_mtime_ns INTEGER,
                 PRIMARY KEY (root, op, path)
             ) WITHOUT ROWID";

    /// A state as filepipe's own code writes it is told, while open (its table still in the
    /// write-ahead log) and once closed: a change to the table that this module does not
    /// follow fails here.
    #[test]
    fn a_state_filepipe_writes_is_told_open_and_closed() {
        let tree = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tree.path()).unwrap();
        let dir = root.join(".st");
        std::fs::create_dir(&dir).unwrap();
        let beneath = Root::new(&root).unwrap();
        let told = |rel: &str| StateDirs::default().holds(&root, &beneath, Path::new(rel));
        let lock = crate::state::lock_dir(&dir).unwrap();
        let state = crate::state::State::open(&dir, &root, &"sha256".parse().unwrap()).unwrap();
        assert!(told(".st/filepipe.sqlite"));
        assert!(told(".st/filepipe.lock"));
        assert!(told(".st/filepipe.sqlite-wal"));
        drop(state);
        drop(lock);
        assert!(told(".st/filepipe.sqlite"));
        assert!(told(".st/filepipe.lock"));
        std::fs::write(dir.join("notes"), b"mine").unwrap();
        assert!(!told(".st/notes"));
        // A lock of someone else's: not a state directory.
        std::fs::write(dir.join("filepipe.lock"), b"my lock").unwrap();
        assert!(!told(".st/filepipe.sqlite"));
    }

    #[test]
    fn the_table_is_told_by_its_columns_and_key() {
        let page = |sql: &str| [b"\0\x01junk".as_slice(), sql.as_bytes(), b"\0"].concat();
        assert!(holds_filepipe_table(&page(SCHEMA_SQL)));
        assert!(!holds_filepipe_table(&page(
            &SCHEMA_SQL.replace("inode    INTEGER,", "")
        )));
        assert!(!holds_filepipe_table(&page(
            &SCHEMA_SQL.replace("(root, op, path)", "(path)")
        )));
        assert!(!holds_filepipe_table(&page(
            &SCHEMA_SQL.replace("WITHOUT ROWID", "")
        )));
        assert!(!holds_filepipe_table(&page(
            "CREATE TABLE files (root BLOB"
        )));
        assert!(!holds_filepipe_table(b"not a database"));
    }

    #[test]
    fn only_the_state_names_are_asked_about() {
        for name in ["filepipe.sqlite", "filepipe.lock"] {
            assert_eq!(state_name(OsStr::new(name)), Some(StateName::Own), "{name}");
        }
        for side in SIDE_SUFFIXES {
            let name = format!("filepipe.sqlite{side}");
            assert_eq!(state_name(OsStr::new(&name)), Some(StateName::Side(side)));
        }
        for name in [
            "filepipe.sqlite-x",
            "notes.txt",
            "filepipe.sqlite.bak",
            "filepipe",
        ] {
            assert_eq!(state_name(OsStr::new(name)), None, "{name}");
        }
    }

    #[test]
    fn the_other_manifests_are_where_a_run_of_several_hashes_puts_them() {
        let names = |path: &str| {
            let mut n: Vec<String> = sibling_manifests(Path::new(path))
                .into_iter()
                .map(|(p, algo)| format!("{} {algo:?}", p.display()))
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names("d/SUMS"),
            [
                "d/SUMS.blake3 Some(Blake3)",
                "d/SUMS.sha256 Some(Sha256)",
                "d/SUMS.sha512 Some(Sha512)"
            ]
        );
        assert_eq!(
            names("d/SUMS.blake3"),
            [
                "d/SUMS None",
                "d/SUMS.blake3.blake3 Some(Blake3)",
                "d/SUMS.blake3.sha256 Some(Sha256)",
                "d/SUMS.blake3.sha512 Some(Sha512)",
                "d/SUMS.sha256 Some(Sha256)",
                "d/SUMS.sha512 Some(Sha512)"
            ]
        );
        // A name that is only a suffix has no first manifest.
        assert_eq!(names(".sha256").len(), 3);
    }

    #[test]
    fn a_side_file_is_told_by_its_first_bytes() {
        let wal = b"\x37\x7f\x06\x82\0\x2d\xe2\x18\0\0\x10\0";
        assert!(is_sqlite_side("-wal", b"", 0));
        assert!(is_sqlite_side("-wal", wal, 32 + 2 * (24 + 4096)));
        assert!(!is_sqlite_side(
            "-wal",
            b"\x37\x7f\x06\x82\0\x2d\xe2\x18\0\0\x10\x01",
            32
        ));
        assert!(!is_sqlite_side("-wal", b"my notes", 8));
        let shm = 3_007_000u32.to_ne_bytes();
        assert!(is_sqlite_side("-shm", &shm, 32768));
        assert!(!is_sqlite_side("-shm", &shm, 40000));
        assert!(!is_sqlite_side("-shm", b"\x37\x7f", 2));
        assert!(is_sqlite_side("-journal", &[0; 8], 4096));
        assert!(!is_sqlite_side("-journal", b"journal of mine", 15));
    }

    #[test]
    fn a_lock_is_one_line_saying_which_filepipe_holds_it() {
        let line = b"filepipe pid 7 on host (started 2026-01-01T00:00:00Z)\n";
        assert!(is_lock(line, line.len() as u64));
        assert!(is_lock(b"", 0));
        assert!(!is_lock(line, line.len() as u64 + 100));
        assert!(!is_lock(b"filepipe pid 7\nand more\n", 24));
        assert!(!is_lock(b"my lock\n", 8));
    }
}
