//! A batch coordinator's run file: how the same command, run again after its coordinator was
//! killed, finds the run to resume. One small file per batch (the tree, its root name, the op
//! and its settings, the queue and the manifest, hashed into the name) under the state
//! directory's `coordinator/`, holding the run's id while it runs, removed once the run has
//! ended (finished or interrupted). An open file description lock on it, held for the run,
//! keeps a second coordinator of the same batch from starting alongside.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::cluster::wire;
use crate::config::Config;
use crate::fsio::lock::{self as fslock, LockKind};
use crate::fsio::rootdirs::NewDir;

/// A batch's run file, locked by this process.
pub(crate) struct RunFile {
    file: File,
    path: PathBuf,
    /// The run a coordinator killed before it ended left in it.
    previous: Option<String>,
}

impl RunFile {
    /// Opens and locks the run file of the batch `cfg` describes, coordinated through `url`
    /// under the root name `root`, in `dir` (the state directory).
    pub(crate) fn open(
        dir: PathBuf,
        cfg: &Config,
        url: &str,
        root: &str,
        out: Option<&str>,
    ) -> Result<RunFile> {
        let dir = dir.join("coordinator");
        let refused = |dir: &Path, why: &str| {
            anyhow::anyhow!(
                "the coordinators' directory {}: {why}: another user could choose the run a \
                 coordinator resumes (set STATE_DIRECTORY or HOME to a directory only root or \
                 this user may change)",
                dir.display()
            )
        };
        // One to be made is judged by the directories it would be made in, before anything is
        // made (a refused one was left behind, empty: found by a review), as a state directory
        // is (`config::check_state_to_be`).
        let absolute = crate::config::absolute(&dir);
        if !absolute.is_dir() {
            let (existing, _) = crate::fsio::canonical::resolve_existing(&absolute)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            crate::secret::check_state_dir_to_be(&existing)
                .map_err(|why| refused(&existing, &why))?;
        }
        // Made, the state directory too where missing, as a state directory is: open to no
        // one the tree is closed to.
        NewDir::state_for([cfg.root.as_path()])
            .create_all(&crate::config::absolute(&dir), false)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // Held to a state directory's rule: whoever may change it, or a directory above it,
        // could choose the run a coordinator resumes, and where its run file is written.
        let dir = crate::fsio::canonical::resolve(&crate::config::absolute(&dir))
            .with_context(|| format!("cannot open {}", dir.display()))?;
        crate::secret::check_state_dir(&dir, &[]).map_err(|why| refused(&dir, &why))?;
        // What makes two commands the same batch: a change to any of it starts a new run.
        let mut h = Sha256::new();
        let manifest = cfg.manifest.as_deref().unwrap_or("-".as_ref());
        // The URL without its credentials: a rotated password is the same batch.
        let url = crate::secret::shown_url(url);
        let (include, exclude) = cfg.filter.patterns();
        let globs = format!("{include:?}{exclude:?}");
        for part in [
            cfg.root.as_os_str().as_bytes(),
            root.as_bytes(),
            // The canonical name: one op's is its own, as before several results; the hashes'
            // order only names the manifests, and an outcome carries every digest anyway.
            cfg.spec.canonical().as_bytes(),
            &cfg.level.to_le_bytes(),
            &[u8::from(cfg.force)],
            url.as_bytes(),
            manifest.as_os_str().as_bytes(),
            // The files the batch takes: another --include is another batch.
            globs.as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        // The output root, where there is one, and --remove-source (a batch without either
        // keeps the key it had before they were possible).
        if let (Some(dir), Some(name)) = (&cfg.out, out) {
            for part in [dir.as_os_str().as_bytes(), name.as_bytes()] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
        }
        if cfg.remove_source {
            h.update(b"remove-source");
        }
        // Links followed, and a size limit: either changes which files are done (a batch
        // without them keeps the key it had before they travelled).
        if cfg.follow_symlinks {
            h.update(b"follow-symlinks");
        }
        if let Some(max) = cfg.max_size {
            h.update(b"max-size");
            h.update(max.to_le_bytes());
        }
        // Where inputs are moved: another directory is another batch.
        for (aside, tag) in [
            (&cfg.move_source, &b"move-source"[..]),
            (&cfg.move_failed, &b"move-failed"[..]),
        ] {
            if let Some(aside) = aside {
                let part = aside.root.as_os_str().as_bytes();
                h.update(tag);
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
        }
        let key: String = h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let path = dir.join(format!("{key}.run"));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // One put there while the directory was open to others is theirs still.
        crate::secret::FileAccess::of(&file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
            .check_not_writable(&path)
            .map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))?;
        match fslock::lock(&file, LockKind::Write, false) {
            Ok(()) => {}
            Err(Errno::AGAIN) => bail!(
                "another coordinator is running this batch (it holds {}): wait for it, or stop it",
                path.display()
            ),
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        let mut text = String::new();
        (&mut file)
            .take(256)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let previous = Some(text.trim().to_owned()).filter(|r| wire::valid_name(r));
        Ok(RunFile {
            file,
            path,
            previous,
        })
    }

    /// The run a killed coordinator of this batch left unfinished, if any.
    pub(crate) fn previous(&self) -> Option<&str> {
        self.previous.as_deref()
    }

    /// Records `run` as this batch's run, durably, before its first job is published.
    pub(crate) fn record(&mut self, run: &str) -> Result<()> {
        let ctx = || format!("cannot write {}", self.path.display());
        self.file.set_len(0).with_context(ctx)?;
        self.file.rewind().with_context(ctx)?;
        self.file
            .write_all(format!("{run}\n").as_bytes())
            .with_context(ctx)?;
        self.file.sync_data().with_context(ctx)
    }

    /// The run ended, every file accounted for: nothing to resume.
    pub(crate) fn finish(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the run file: the next run of this batch resumes a finished run, and finds every file done");
        }
    }
}
