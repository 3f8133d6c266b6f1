//! Batch mode's sink: every done file's digests, kept until the end, then the manifests (one
//! per hash: `sha256sum -c`, `sha512sum -c` and `b3sum -c` each read one algorithm), sorted by
//! raw path bytes, each written once and published atomically (or printed on stdout). The same
//! writer serves watch mode's state sink, which rewrites its manifests from the state.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use rayon::slice::ParallelSliceMut;

use crate::config::Config;
use crate::digest::HashAlgo;
use crate::fsio::output::TempOutput;
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
    name: Range<usize>,
    digests: Range<usize>,
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
        // On every core: nothing else is left to do, and the sort is most of what is left of an
        // unchanged rerun once its walk is done (50,000 names: 5 ms on one core).
        let ManifestSink { names, files, .. } = self;
        files.par_sort_unstable_by(|a, b| names[a.name.clone()].cmp(&names[b.name.clone()]));
        for &algo in self.cfg.spec.hashes() {
            // Every done file has every digest (`ops::multi`), found by its algorithm: a file
            // read for some hashes only (`travel::Only`) has the others' after them. One
            // without is left out rather than listed under another algorithm's.
            let lines = self.files.iter().filter_map(|f| {
                self.digests[f.digests.clone()]
                    .iter()
                    .find(|d| d.algo() == algo)
                    .map(|d| (self.name(f), d))
            });
            write_manifest(self.cfg, algo, lines)?;
        }
        Ok(())
    }
}

/// Writes `algo`'s manifest lines, already sorted, to its manifest file (atomically, see
/// `Config::manifest_for`) or stdout.
pub(crate) fn write_manifest<'d>(
    cfg: &Config,
    algo: HashAlgo,
    lines: impl Iterator<Item = (&'d [u8], &'d Digest)> + Clone,
) -> Result<()> {
    if algo == HashAlgo::Blake3 {
        // Not an error: filepipe verify checks them, and b3sum could not have listed them.
        let non_utf8 = lines
            .clone()
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
    let write_all = |w: &mut dyn Write| -> io::Result<()> {
        let mut w = BufWriter::with_capacity(256 * 1024, w);
        for (rel, d) in lines.clone() {
            manifest::write_line(&mut w, d, rel)?;
        }
        w.flush()
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
    let mut temp = TempOutput::create(Arc::clone(&dir))
        .map_err(anyhow::Error::new)
        .with_context(|| format!("writing the manifest {}", path.display()))?;
    write_all(temp.file()).with_context(|| format!("writing {}", path.display()))?;
    let name: &OsStr = path.file_name().unwrap_or(OsStr::new("SHA256SUMS"));
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
    let attrs = None;
    temp.publish(name, attrs, true, cfg.durability)
        .map_err(|e| {
            // Its errors mostly name the manifest already ("publishing FILE: ..."): said once.
            let named = e.message.contains(&*path.to_string_lossy());
            let e = anyhow::Error::new(e);
            if named {
                e
            } else {
                e.context(format!("publishing {}", path.display()))
            }
        })
}
