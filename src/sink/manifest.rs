//! Batch mode's sink: every done file's digests, kept until the end, then the manifests (one
//! per hash: `sha256sum -c`, `sha512sum -c` and `b3sum -c` each read one algorithm), sorted by
//! raw path bytes, each written once to its temp, then all published together (or printed on stdout). The same
//! writer serves watch mode's state sink, which rewrites its manifests from the state.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use rayon::iter::ParallelIterator;
use rayon::slice::{ParallelSlice, ParallelSliceMut};

use crate::config::Config;
use crate::digest::HashAlgo;
use crate::fsio::output::{self, TempOutput};
use crate::manifest;
use crate::sink::{Disposition, Sink};
use crate::travel::{Digest, Outcome, Unchanged};

/// Batch mode: collect each done file's path and digests, write the sorted manifests at the
/// end. Kept end to end in three vectors, not an allocation or two per file: an unchanged
/// rerun of 50,000 files spends its time in such per-file costs (and in freeing them at exit).
pub(crate) struct ManifestSink<'a> {
    cfg: &'a Config,
    /// Every done file's path bytes, one after the other.
    names: Vec<u8>,
    /// Every done file's digests, one per hash of `cfg.spec.hashes()`, one file's after
    /// another's.
    digests: Vec<Digest>,
    /// The done files: where each one's name and digests are in `names` and `digests`.
    files: Vec<Listed>,
}

/// A done file of `ManifestSink`, by where its parts are.
struct Listed {
    /// The name's first bytes (`sort_key`): most comparisons of the sort end here, without a
    /// look at `names`.
    key: u128,
    name: Range<usize>,
    digests: Range<usize>,
}

/// The first 16 bytes of `name`, big-endian, padded with zeros: two names whose keys differ
/// compare as their keys do. (A path holds no NUL byte, so the padding sorts a name before
/// any longer one it begins.) Sorting by the names themselves went to the names' buffer for
/// every comparison, a cache miss each: 5 ms of an unchanged 50,000-file rerun's 120.
fn sort_key(name: &[u8]) -> u128 {
    let mut key = [0u8; 16];
    let n = name.len().min(16);
    key[..n].copy_from_slice(&name[..n]);
    u128::from_be_bytes(key)
}

impl<'a> ManifestSink<'a> {
    /// A sink writing `cfg`'s manifest (a hash) or nothing (gzip).
    pub(crate) fn new(cfg: &'a Config) -> Self {
        ManifestSink {
            cfg,
            names: Vec::new(),
            digests: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Lists the file `name` (its path bytes) with its `digests` (none: not listed).
    fn push(&mut self, name: &[u8], digests: &[Digest]) {
        if digests.is_empty() {
            return;
        }
        let (n, d) = (self.names.len(), self.digests.len());
        self.names.extend_from_slice(name);
        self.digests.extend_from_slice(digests);
        self.files.push(Listed {
            key: sort_key(name),
            name: n..self.names.len(),
            digests: d..self.digests.len(),
        });
    }

    fn name(&self, file: &Listed) -> &[u8] {
        &self.names[file.name.clone()]
    }
}

impl Sink for ManifestSink<'_> {
    fn outcome(&mut self, outcome: &Outcome) -> Result<Disposition> {
        if let Outcome::Done { rel, done } = outcome {
            self.push(rel.as_os_str().as_bytes(), &done.digests);
        }
        Ok(Disposition::Final)
    }

    fn unchanged(&mut self, files: &Unchanged) -> Result<()> {
        self.files.reserve(files.len());
        for (name, digests) in files.iter() {
            self.push(name, digests);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        // On every core, as the lines are formatted (`write_manifest`): nothing else is left to
        // do, and an unchanged rerun of 50,000 files has waited 15-18 ms here, a seventh of its
        // time (now 8-10, most of it the flush).
        let started = std::time::Instant::now();
        let ManifestSink { names, files, .. } = self;
        files.par_sort_unstable_by(|a, b| by_name(names, a, b));
        let mut manifests = Manifests::new(self.cfg);
        for &algo in self.cfg.spec.hashes() {
            // Every done file has every digest (`ops::multi`), found by its algorithm: a file
            // read for some hashes only (`travel::Only`) has the others' after them. One
            // without is left out rather than listed under another algorithm's.
            let line = |f: &Listed| {
                self.digests[f.digests.clone()]
                    .iter()
                    .find(|d| d.algo() == algo)
                    .map(|d| (self.name(f), d))
            };
            manifests.write(algo, &self.files, line)?;
        }
        manifests.publish()?;
        tracing::debug!(
            files = self.files.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "manifests sorted and written"
        );
        Ok(())
    }
}

/// How two listed files order in a manifest: by their names' bytes (`names`, the sink's), the
/// keys first.
fn by_name(names: &[u8], a: &Listed, b: &Listed) -> std::cmp::Ordering {
    (a.key.cmp(&b.key)).then_with(|| names[a.name.clone()].cmp(&names[b.name.clone()]))
}

/// Lines a manifest writer formats as one task (see `write_manifest`).
const FORMAT_CHUNK: usize = 4096;

/// The manifest already at a manifest's name, compared with the new text as it is formatted
/// (one of filepipe's user's, as `Manifests::write` would keep its mode and group). If every
/// byte is the same, it is kept: an unchanged tree's rerun (a cron job's, a watch's rewrite
/// after a change that left its manifests as they were) then writes and flushes nothing again
/// (an unchanged 50,000-file rerun spent a tenth of its time writing and flushing the same
/// 3.5 MB). At the first byte that differs the comparison stops, and the text is formatted
/// again, whole, into a temp: nothing of the old file's is ever copied into the new one (a
/// copy of its start, read again after the comparison, took in whatever another process had
/// made of it meanwhile: found by review r54b, a truncation published a manifest short of
/// 8,000 lines).
struct Same {
    old: fs::File,
    /// How many bytes of text have been compared (all equal so far).
    at: u64,
    /// Where `old`'s bytes are read into to be compared.
    theirs: Vec<u8>,
}

impl Same {
    /// Whether the old file is the whole text compared: no more bytes than it.
    fn whole(&self) -> io::Result<bool> {
        Ok(self.old.metadata()?.len() == self.at)
    }

    /// Keeps the old file as the manifest: its data and its directory are flushed (who wrote
    /// it may not have; a run stopped between its rename and its directory's flush left both
    /// to whoever comes next), and its mtime made now, as a rewrite would have (what a cron
    /// job's run is seen by).
    fn keep(&self, dir: &output::Dir, flush: bool) -> io::Result<()> {
        if flush {
            self.old.sync_data()?;
            output::sync_dir(dir).map_err(io::Error::other)?;
        }
        let now = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
        };
        if let Err(e) = rustix::fs::futimens(&self.old, &now) {
            tracing::debug!(error = %e, "cannot set an unchanged manifest's mtime");
        }
        Ok(())
    }
}

impl Write for Same {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        self.theirs.resize(buf.len(), 0);
        let mut got = 0;
        while got < buf.len() {
            match self
                .old
                .read_at(&mut self.theirs[got..], self.at + got as u64)
            {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.theirs[..got] != *buf {
            // Not a failure: the end of the comparison.
            return Err(io::Error::other("the manifest differs"));
        }
        self.at += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A temp being written: its write-back starts at the end of each group (`flush`), so the
/// flush at the end waits for less.
struct Writing<'t>(&'t fs::File);

impl Write for Writing<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&mut &*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        output::start_writeback(self.0);
        Ok(())
    }
}

/// The manifest at `name` in `dir`, opened to be compared with a new one's text: a regular
/// file of filepipe's user's, whose mode and group a rewrite would keep (see
/// `Manifests::write`): its group one of ours, or no group bits to lose. Anything else is
/// replaced as before, whatever it holds.
fn same_candidate(dir: &output::Dir, name: &OsStr) -> Option<fs::File> {
    use rustix::fs::{FileType, Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(&dir.fd, name, flags, Mode::empty()).ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    let me = rustix::process::geteuid();
    let ours = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
        && st.st_uid == me.as_raw()
        && (st.st_mode & 0o070 == 0
            || st.st_gid == rustix::process::getegid().as_raw()
            || me.is_root());
    ours.then(|| fs::File::from(fd))
}

/// A run's manifests, one per hash, written one after the other (each to its temp, or to
/// stdout) and then published together (`output::publish_together`): a full disk leaves all of
/// them as they were, not some new and some old.
pub(crate) struct Manifests<'c> {
    cfg: &'c Config,
    /// The manifests written so far, each in its temp, and their names and paths.
    written: Vec<(TempOutput, std::ffi::OsString)>,
    paths: Vec<PathBuf>,
}

impl<'c> Manifests<'c> {
    /// None written yet.
    pub(crate) fn new(cfg: &'c Config) -> Self {
        Manifests {
            cfg,
            written: Vec::new(),
            paths: Vec::new(),
        }
    }

    /// Gives every manifest written its name. A temp not published (this failed, or was never
    /// called) is removed when dropped.
    pub(crate) fn publish(self) -> Result<()> {
        let Manifests {
            cfg,
            written,
            paths,
        } = self;
        if written.is_empty() {
            return Ok(());
        }
        output::publish_together(written, true, cfg.durability).map_err(|e| {
            // Its errors mostly name a manifest already ("syncing FILE: ..."): said once.
            let named = paths
                .iter()
                .any(|p| e.message.contains(&*p.to_string_lossy()));
            let e = anyhow::Error::new(e);
            if named {
                e
            } else {
                let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                e.context(format!("publishing {}", paths.join(" and ")))
            }
        })
    }

    /// Writes `algo`'s manifest to a temp beside its manifest file (see
    /// `Config::manifest_for`), to be published with the others, or to stdout: a line for each
    /// of `files`, already sorted, that `line` gives a name and digest.
    pub(crate) fn write<'d, T: Sync>(
        &mut self,
        algo: HashAlgo,
        files: &'d [T],
        line: impl Fn(&'d T) -> Option<(&'d [u8], &'d Digest)> + Sync,
    ) -> Result<()> {
        let cfg = self.cfg;
        if algo == HashAlgo::Blake3 {
            // Not an error: filepipe verify checks them, and b3sum could not have listed them.
            let non_utf8 = (files.iter().filter_map(&line))
                .filter(|(rel, _)| std::str::from_utf8(rel).is_err())
                .count();
            // Said again for a manifest only when it has more: a watch rewrites its manifest up to
            // once a second, and the same warning each time only buries the log.
            static SAID: std::sync::Mutex<Option<HashMap<Option<PathBuf>, usize>>> =
                std::sync::Mutex::new(None);
            let more = SAID.lock().map_or(true, |mut said| {
                let said = said
                    .get_or_insert_with(HashMap::new)
                    .entry(cfg.manifest_for(algo))
                    .or_insert(0);
                let more = non_utf8 > *said;
                *said = (*said).max(non_utf8);
                more
            });
            if non_utf8 > 0 && more {
                tracing::warn!(
                    files = non_utf8,
                    "names that are not UTF-8 are in the manifest: b3sum -c stops at the first \
                 (it reads UTF-8 only); filepipe verify checks them"
                );
            }
        }
        // `w` is flushed after each group: a temp's write-back then starts, so the flush at the
        // end waits for less.
        let write_all = |w: &mut dyn Write| -> io::Result<()> {
            // Formatted on every core, `FORMAT_CHUNK` lines to a task and a group of tasks at a
            // time (so a huge manifest is never held whole twice), and written in order: on one
            // core, 50,000 lines took 8 ms of an unchanged rerun's 120, with nothing else to do.
            let group = FORMAT_CHUNK * rayon::current_num_threads().max(1);
            for files in files.chunks(group) {
                let texts: Vec<Vec<u8>> = files
                    .par_chunks(FORMAT_CHUNK)
                    .map(|chunk| {
                        // The names and digests copied out first, then formatted: sorted, the files
                        // lie all over memory, and a loop this short has many of their cache misses
                        // under way at once, where formatting each line as it is reached waited for
                        // them one by one (most of the formatting's time).
                        let mut names = Vec::with_capacity(chunk.len() * 32);
                        let mut lines = Vec::with_capacity(chunk.len());
                        for (rel, d) in chunk.iter().filter_map(&line) {
                            names.extend_from_slice(rel);
                            lines.push((names.len(), *d));
                        }
                        let mut text = Vec::with_capacity(chunk.len() * 128);
                        let mut start = 0;
                        for (end, d) in &lines {
                            manifest::push_line(&mut text, d, &names[start..*end]);
                            start = *end;
                        }
                        text
                    })
                    .collect();
                for text in &texts {
                    w.write_all(text)?;
                }
                w.flush()?;
            }
            Ok(())
        };
        let Some(path) = &cfg.manifest_for(algo) else {
            return match write_all(&mut io::stdout().lock()) {
                // A closed pipe (`| head`) is the reader's choice, not our failure.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                other => other.context("writing the manifest to stdout"),
            };
        };
        // Beneath the directory opened at the start, never its path again (`Config::manifest_dir`).
        let Some(dir) = cfg.manifest_dir.as_ref().map(Arc::clone) else {
            anyhow::bail!(
                "writing the manifest {}: its directory was not opened at the start",
                path.display()
            );
        };
        let name: &OsStr = path.file_name().unwrap_or(OsStr::new("SHA256SUMS"));
        if let Some(old) = same_candidate(&dir, name) {
            let mut same = Same {
                old,
                at: 0,
                theirs: Vec::new(),
            };
            // Differing, or unreadable (a failing disk, another's change): written anew, as
            // it always was.
            let whole = write_all(&mut same).is_ok() && same.whole().unwrap_or(false);
            if whole {
                same.keep(&dir, cfg.durability != output::Durability::None)
                    .with_context(|| format!("flushing {}", path.display()))?;
                tracing::debug!(manifest = %path.display(), "manifest unchanged: kept as it is");
                return Ok(());
            }
        }
        let mut temp = TempOutput::create(Arc::clone(&dir))
            .map_err(anyhow::Error::new)
            .with_context(|| format!("writing the manifest {}", path.display()))?;
        write_all(&mut Writing(temp.contents()))
            .with_context(|| format!("writing {}", path.display()))?;
        // A manifest names every file of the tree and its digest, the names of directories others
        // may not list and the digests of files they may not read among them (a short secret's
        // digest gives it away): made `0600`, less the umask, as the state and the failure log
        // are (found by a review: `0644`). One replaced keeps the mode and group its owner gave
        // it (`chmod`, `chgrp` to share it), as an editor keeps them: only one of filepipe's
        // user's (another's `0666` file put at the name would have them rewrite the manifest).
        let me = rustix::process::geteuid().as_raw();
        let before = rustix::fs::statat(&dir.fd, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .filter(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
                    && st.st_uid == me
            });
        let mut mode = before.map_or(0o600 & !crate::fsio::rootdirs::umask(), |st| {
            st.st_mode & 0o666
        });
        if let Some(st) = before {
            let gid = rustix::fs::Gid::from_raw(st.st_gid);
            // Not ours to give (not root, and not in that group): the group stays ours, and
            // the group bits would serve a group the owner did not choose: dropped.
            if rustix::fs::fchown(&*temp.file(), None, Some(gid)).is_err()
                && rustix::fs::fstat(&*temp.file()).is_ok_and(|now| now.st_gid != st.st_gid)
            {
                mode &= !0o070;
            }
        }
        rustix::fs::fchmod(&*temp.file(), rustix::fs::Mode::from_raw_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        self.written.push((temp, name.to_os_string()));
        self.paths.push(path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A SHA-256 digest made of `seed`.
    fn digest(seed: usize) -> Digest {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&(seed as u64).to_be_bytes());
        bytes[31] = 0xa5;
        Digest::new(HashAlgo::Sha256, &bytes).unwrap()
    }

    fn config(root: &Path, manifest: &Path) -> Config {
        let (root, manifest) = (root.to_str().unwrap(), manifest.to_str().unwrap());
        crate::config::batch_config(&[root, "--op", "sha256", "--manifest", manifest])
    }

    proptest! {
        /// Names sharing long beginnings, names that begin others, and bytes above 0x7f: the
        /// keys never order two names otherwise than their bytes do.
        #[test]
        fn names_sort_as_their_bytes_do(
            parts in prop::collection::vec(
                (
                    prop::sample::select(vec!["", "a", "sixteen/bytes/ab", "seventeen/bytes/a"]),
                    prop::collection::vec(prop::sample::select(vec![1u8, b'/', b'a', 0xff]), 0..6),
                ),
                0..60,
            ),
        ) {
            // Beginnings of 16 bytes and more, shared: the keys alone cannot order them.
            let mut want: Vec<Vec<u8>> =
                (parts.iter()).map(|(begin, end)| [begin.as_bytes(), end].concat()).collect();
            let mut names = Vec::new();
            let mut files: Vec<Listed> = (want.iter())
                .map(|name| {
                    let start = names.len();
                    names.extend_from_slice(name);
                    Listed { key: sort_key(name), name: start..names.len(), digests: 0..0 }
                })
                .collect();
            files.sort_unstable_by(|a, b| by_name(&names, a, b));
            want.sort();
            let sorted: Vec<&[u8]> = files.iter().map(|f| &names[f.name.clone()]).collect();
            prop_assert_eq!(sorted, want.iter().map(Vec::as_slice).collect::<Vec<_>>());
        }
    }

    /// More files than one group of formatting tasks holds, given in no order, names to escape
    /// among them: the manifest is every line, sorted, as `push_line` writes each.
    #[test]
    fn a_manifest_of_many_groups_is_every_line_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let manifest = tmp.path().join("SHA256SUMS");
        let root = tmp.path().join("tree");
        std::fs::create_dir(&root).unwrap();
        let cfg = config(&root, &manifest);
        let n = 2 * FORMAT_CHUNK * rayon::current_num_threads() + FORMAT_CHUNK / 3;
        let name = |i: usize| match i % 5 {
            0 => format!("dir{}/a\\b\nc{i}", i % 7).into_bytes(),
            1 => [b"caf\xe9/".as_slice(), i.to_string().as_bytes()].concat(),
            _ => format!("a/very/long/shared/beginning/f{i}").into_bytes(),
        };
        let mut sink = ManifestSink::new(&cfg);
        // Backwards: in no order the names have.
        for i in (0..n).rev() {
            sink.push(&name(i), &[digest(i)]);
        }
        sink.finish().unwrap();
        let mut want: Vec<(Vec<u8>, Digest)> = (0..n).map(|i| (name(i), digest(i))).collect();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        let mut lines = Vec::new();
        for (name, d) in &want {
            manifest::push_line(&mut lines, d, name);
        }
        assert_eq!(std::fs::read(&manifest).unwrap(), lines);
    }
}
