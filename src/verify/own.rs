//! filepipe's own files that a tree may hold and that no batch lists, which `verify` leaves
//! out of its added check: the manifest verified, the other manifests a run of several hashes
//! writes beside it (`SUMS.blake3` beside `SUMS`), and the state directories the user names
//! (`--state DIR`, as batch and watch are told where theirs is).
//!
//! Nothing a writer of the tree controls decides alone that a file is left out (a review hid
//! any payload behind a fake state directory, or behind one manifest line): a state directory
//! is left out only when named, by its identity; another manifest only when it is a regular
//! file in the very directory of the verified one (by identity), named as filepipe names it,
//! and all of it is a manifest as filepipe writes it, of its name's hash, listing exactly the
//! files the verified manifest lists, so that it holds nothing but their digests.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{Mode, OFlags};

use super::Under;
use crate::cli::OpKind;
use crate::digest::HashAlgo;
use crate::fsio::input::{InputFile, Root};
use crate::manifest;

/// A file's device and inode.
pub(super) type FileId = (u64, u64);

/// A second manifest may be this much larger than the verified one and still be read: one of
/// SHA-512 lists the same names with digests twice as long as one of SHA-256 or BLAKE3.
const SIBLING_FACTOR: u64 = 4;
/// ... plus this, for a small manifest (or one read from a pipe, whose size is unknown).
const SIBLING_SLACK: u64 = 64 * 1024;

/// filepipe's own files among those a walk of the tree finds.
pub(super) struct OwnFiles {
    /// The manifest verified, by identity, whatever path named it.
    manifest: Option<FileId>,
    /// The directory the manifest was named in, by identity: only there are other manifests
    /// of its run.
    dir: Option<FileId>,
    /// The names filepipe gives the other manifests of a run of several hashes, with the hash
    /// each holds (`None`: the first manifest, of any hash).
    siblings: Vec<(OsString, Option<HashAlgo>)>,
    /// The most bytes another manifest may hold to be read and told.
    limit: u64,
    /// The state directories named with `--state`, by identity.
    state_dirs: Vec<FileId>,
}

impl OwnFiles {
    /// Those of the manifest at `path`, of `size` bytes (0 if unknown), with the state
    /// directories `state_dirs` (see `state_dir_ids`).
    pub(super) fn of_manifest(path: &Path, size: u64, state_dirs: Vec<FileId>) -> OwnFiles {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        OwnFiles {
            manifest: id_of(path),
            dir: id_of(dir),
            siblings: sibling_manifests(path)
                .into_iter()
                .filter_map(|(p, algo)| Some((p.file_name()?.to_os_string(), algo)))
                .collect(),
            limit: size
                .saturating_mul(SIBLING_FACTOR)
                .saturating_add(SIBLING_SLACK),
            state_dirs,
        }
    }

    /// Whether the directory the walk found with identity `id` is a state directory named
    /// with `--state`: its state files are left out (`is_state_file_name`).
    pub(super) fn is_state_dir(&self, id: FileId) -> bool {
        self.state_dirs.contains(&id)
    }

    /// Whether `rel`, a regular file the walk found beneath the root with identity `id`, is
    /// the manifest verified or another manifest of its run (see the module's comment), given
    /// the names the verified manifest lists (`listed`, relative to `under`).
    pub(super) fn holds(
        &self,
        beneath: &Root,
        rel: &Path,
        id: FileId,
        listed: &HashSet<PathBuf>,
        under: &Under,
    ) -> bool {
        if self.manifest == Some(id) {
            return true;
        }
        let Some(name) = rel.file_name() else {
            return false;
        };
        let Some(&(_, algo)) = self.siblings.iter().find(|(n, _)| n == name) else {
            return false;
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = if parent.as_os_str().is_empty() {
            beneath.stat_root()
        } else {
            beneath.lstat(parent)
        };
        let dir = dir.ok().map(|st| (st.st_dev, st.st_ino));
        if dir.is_none() || dir != self.dir {
            return false;
        }
        let Some(text) = read_whole(beneath, under, rel, id, self.limit) else {
            return false;
        };
        match algo {
            Some(algo) => lists_exactly(&text, algo, listed, under),
            None => HASHES
                .iter()
                .any(|&a| lists_exactly(&text, a, listed, under)),
        }
    }
}

/// Whether `name`, directly in a state directory named with `--state`, is one of the files a
/// state keeps there: its database (and SQLite's files beside it) and its lock. Anything else
/// there is reported like any file (found by a review: under umask 002 a group member's
/// files in the state directory were hidden with it).
pub(super) fn is_state_file_name(name: &str) -> bool {
    crate::state::FILE_NAMES.contains(&name)
}

/// The identities of the directories named with `--state`, each opened (a symlink to one
/// followed: the user named it): one that does not exist or is not a directory is an error.
pub(super) fn state_dir_ids(dirs: &[PathBuf]) -> Result<Vec<FileId>> {
    dirs.iter()
        .map(|d| {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            let st = rustix::fs::open(d, flags, Mode::empty())
                .and_then(rustix::fs::fstat)
                .map_err(std::io::Error::from)
                .with_context(|| format!("--state {}: cannot open the directory", d.display()))?;
            Ok((st.st_dev, st.st_ino))
        })
        .collect()
}

/// The device and inode of what `path` names (a symlink followed, as the manifest was read
/// through it): only compared with what the walk found beneath the root.
fn id_of(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// All of the regular file `rel`, if it is still the file the walk found (`id`) and holds at
/// most `limit` bytes: opened beneath the root, no link followed, a FIFO never opened.
fn read_whole(
    beneath: &Root,
    under: &Under,
    rel: &Path,
    id: FileId,
    limit: u64,
) -> Option<Vec<u8>> {
    let file =
        InputFile::open_beneath(Some(beneath), rel, &under.real.join(rel), false, true).ok()?;
    if (file.stat.st_dev, file.stat.st_ino) != id || file.size() > limit {
        return None;
    }
    let mut text = Vec::new();
    file.take(limit + 1).read_to_end(&mut text).ok()?;
    (text.len() as u64 <= limit).then_some(text)
}

/// Whether `text` is, byte for byte, a manifest of `algo` as filepipe writes it (each line
/// as `manifest::push_line` writes it: no comment, blank line, indentation or other layout,
/// where anything could be kept), naming each file of `listed` once and nothing else.
fn lists_exactly(text: &[u8], algo: HashAlgo, listed: &HashSet<PathBuf>, under: &Under) -> bool {
    let mut named = HashSet::with_capacity(listed.len());
    let mut layout = manifest::Layout::default();
    let mut written = Vec::new();
    for line in text.split_inclusive(|&b| b == b'\n') {
        let Some(body) = line.strip_suffix(b"\n") else {
            return false;
        };
        let Some(entry) = manifest::parse_line_in(body, algo, &mut layout) else {
            return false;
        };
        written.clear();
        manifest::push_line(&mut written, &entry.digest, &entry.name);
        if written != line {
            return false;
        }
        // As filepipe writes names: no `.`, `..` or empty component, which would let a name
        // be padded to carry anything (found by a review: `./` 3,000 times over); but for the
        // file named `-`, which it lists as `./-`, as GNU does, or `sha256sum -c` reads stdin
        // (its companions were reported added: found by a review).
        let name = match entry.name.as_slice() {
            manifest::STDIN_NAMED => manifest::STDIN,
            name => name,
        };
        let plain = !name.is_empty()
            && name
                .split(|&b| b == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b"..");
        let Some(rel) = super::relative_to(under, name).filter(|_| plain) else {
            return false;
        };
        if !listed.contains(&rel) || !named.insert(rel) {
            return false;
        }
    }
    named.len() == listed.len()
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

#[cfg(test)]
mod tests {
    use super::*;

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

    fn under() -> Under {
        Under {
            real: PathBuf::from("/r"),
            given: PathBuf::from("/r"),
        }
    }

    fn line(algo: HashAlgo, fill: u8, name: &[u8]) -> Vec<u8> {
        let digest = crate::digest::Digest::new(algo, &vec![fill; algo.len()]).unwrap();
        let mut l = Vec::new();
        manifest::push_line(&mut l, &digest, name);
        l
    }

    /// Only a manifest as filepipe writes it, naming each listed file once, is another
    /// manifest of the run: any other line (a comment, a blank line, an indented line, one
    /// more name, a name twice, a line of another hash) could carry anything.
    #[test]
    fn another_manifest_is_all_lines_filepipe_writes_naming_the_listed_files() {
        let listed: HashSet<PathBuf> = ["a", "nl\nname"].iter().map(PathBuf::from).collect();
        let algo = HashAlgo::Sha512;
        let good = [line(algo, 1, b"a"), line(algo, 2, b"nl\nname")].concat();
        let told = |text: &[u8]| lists_exactly(text, algo, &listed, &under());
        assert!(told(&good));
        assert!(!told(&good[..good.len() - 1]));
        assert!(!lists_exactly(&good, HashAlgo::Sha256, &listed, &under()));
        for extra in [
            b"# payload\n".to_vec(),
            b"\n".to_vec(),
            line(algo, 3, b"c"),
            line(algo, 3, b"a"),
            [b"  ".as_slice(), &line(algo, 3, b"a")].concat(),
        ] {
            assert!(!told(&[good.clone(), extra.clone()].concat()), "{extra:?}");
        }
        // One name only, or a line in the BSD form.
        assert!(!told(&line(algo, 1, b"a")));
        let tagged = format!("SHA512 (a) = {}\n", "01".repeat(64));
        assert!(!told(
            &[tagged.as_bytes(), &line(algo, 2, b"nl\nname")].concat()
        ));
        // An empty manifest's other manifest is empty.
        assert!(lists_exactly(b"", algo, &HashSet::new(), &under()));
    }
}
