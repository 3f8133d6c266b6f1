//! filepipe's own files that a tree may hold and that no batch lists, which `verify` must not
//! call added: the manifest verified, the other manifests a run of several hashes writes
//! beside it (`SUMS.blake3` beside `SUMS`), and the state directories the user names
//! (`--state DIR`, as batch and watch are told where theirs is).
//!
//! A state directory is told by its identity, never by what its files hold: anyone who may
//! write to the tree can make a directory whose files look like filepipe's and hold anything
//! (found by a review). A second manifest starts with a manifest line: only its first line is
//! read, opened beneath the root, no link followed, and a FIFO never opened.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{Mode, OFlags};

use crate::cli::OpKind;
use crate::digest::HashAlgo;
use crate::fsio::input::{fill, InputFile, Root};
use crate::manifest;

/// A file's device and inode.
pub(super) type FileId = (u64, u64);

/// filepipe's own files among those a walk of the tree finds.
pub(super) struct OwnFiles {
    /// The manifest verified, by identity, whatever path named it.
    manifest: Option<FileId>,
    /// The files where filepipe puts the other manifests of a run of several hashes, by
    /// identity and name (a hard link of another name is another file of the user's), with
    /// the hash each would hold (`None`: the first manifest, any).
    siblings: Vec<(FileId, OsString, Option<HashAlgo>)>,
    /// The state directories named with `--state`, by identity.
    state_dirs: Vec<FileId>,
}

impl OwnFiles {
    /// Those of the manifest at `path`, with the state directories `state_dirs` (see
    /// `state_dir_ids`).
    pub(super) fn of_manifest(path: &Path, state_dirs: Vec<FileId>) -> OwnFiles {
        OwnFiles {
            manifest: id_of(path),
            siblings: sibling_manifests(path)
                .into_iter()
                .filter_map(|(p, algo)| Some((id_of_file(&p)?, p.file_name()?.into(), algo)))
                .collect(),
            state_dirs,
        }
    }

    /// Whether the directory the walk found with identity `id` is a state directory named
    /// with `--state`: it and all it holds are left out.
    pub(super) fn is_state_dir(&self, id: FileId) -> bool {
        self.state_dirs.contains(&id)
    }

    /// Whether `rel`, a regular file the walk found under the root with identity `id`, is
    /// the manifest or another manifest of its run that holds a manifest line first.
    pub(super) fn holds(&self, root: &Path, beneath: &Root, rel: &Path, id: FileId) -> bool {
        if self.manifest == Some(id) {
            return true;
        }
        let sibling = (self.siblings.iter())
            .find(|(s, name, _)| *s == id && rel.file_name() == Some(name.as_os_str()));
        match sibling {
            Some(&(_, _, algo)) => starts_as_manifest(root, beneath, rel, algo),
            None => false,
        }
    }
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
}
