//! The gzip operation: `name` → `name.gz`, next to the input or mirrored under `--out`.
//!
//! Invariants: inputs are never modified; an existing output is only replaced with `--force`;
//! an up-to-date output (same mtime as its input, which filepipe copies on publish) is skipped;
//! `--remove-source` unlinks an input only after its output was published, synced and
//! decompressed back to the same length and CRC, and never when the input has other hard links.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::read::MultiGzDecoder;
use rayon::ThreadPool;
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::config::Config;
use crate::error::{FileError, Kind};
use crate::input::InputFile;
use crate::ops::gzstream::{self, Header, Totals};
use crate::ops::{Done, Op};
use crate::output::{self, Attrs, Dir, DirCache, TempOutput};
use crate::pipeline::Job;

/// The gzip operation and its settings.
#[derive(Debug)]
pub struct GzipOp {
    level: u32,
    force: bool,
    remove_source: bool,
    root: PathBuf,
    out_root: PathBuf,
    mirrored: bool,
    /// Compresses the blocks of large files in parallel. Separate from the worker pool on
    /// purpose: the workers block on the job channel, so they could never steal these tasks.
    blocks: Option<ThreadPool>,
}

/// Per-worker state.
#[derive(Debug)]
pub struct Scratch {
    out_dirs: DirCache,
    bufs: gzstream::Buffers,
}

/// A compressed temp file waiting for the input check.
#[derive(Debug)]
pub struct Pending {
    temp: TempOutput,
    dir: Arc<Dir>,
    totals: Totals,
}

impl GzipOp {
    /// Builds the operation from the config, including the block pool when there is more than
    /// one job.
    pub fn new(cfg: &Config) -> anyhow::Result<Self> {
        let blocks = if cfg.jobs > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.jobs)
                    .thread_name(|i| format!("filepipe-block-{i}"))
                    .build()?,
            )
        } else {
            None
        };
        Ok(GzipOp {
            level: cfg.level,
            force: cfg.force,
            remove_source: cfg.remove_source,
            root: cfg.root.clone(),
            out_root: cfg.out_root().to_path_buf(),
            mirrored: cfg.out.is_some(),
            blocks,
        })
    }

    fn out_name(job: &Job) -> Result<OsString, FileError> {
        let name = job.rel.file_name().unwrap_or(OsStr::new(""));
        let mut out = name.to_os_string();
        out.push(".gz");
        if out.len() > output::NAME_MAX {
            return Err(FileError {
                kind: Kind::NameTooLong,
                errno: Some(libc::ENAMETOOLONG),
                message: format!(
                    "output name would be {} bytes, over the {}-byte limit",
                    out.len(),
                    output::NAME_MAX
                ),
            });
        }
        Ok(out)
    }

    fn out_dir(&self, job: &Job, scratch: &mut Scratch) -> Result<Arc<Dir>, FileError> {
        let rel_dir = job.rel.parent().unwrap_or(Path::new(""));
        let root = &self.root;
        // New output directories take their input directory's permissions: an archive tree is
        // never more open than the tree it mirrors.
        scratch.out_dirs.open(rel_dir, &|rel: &Path| {
            let mode = std::fs::symlink_metadata(root.join(rel)).map_or(0o700, |m| m.mode());
            Mode::from_raw_mode((mode & 0o777) | 0o700)
        })
    }

    /// Decompresses the published output and compares it with what was compressed.
    fn verify_output(&self, dir: &Dir, name: &OsStr, totals: &Totals) -> Result<(), FileError> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(&dir.fd, name, flags, Mode::empty())
            .map_err(|e| FileError::errno("reopening output to verify it", e))?;
        let mut dec = MultiGzDecoder::new(io::BufReader::with_capacity(256 * 1024, File::from(fd)));
        let mut crc = crc32fast::Hasher::new();
        let mut len = 0u64;
        let mut buf = vec![0; 256 * 1024];
        loop {
            match dec.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    crc.update(&buf[..n]);
                    len += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(FileError::new(
                        Kind::Corrupt,
                        format!("published output does not decompress: {e}"),
                    ))
                }
            }
        }
        if len != totals.bytes_in || crc.finalize() != totals.crc {
            return Err(FileError::new(
                Kind::Corrupt,
                "published output does not match the input",
            ));
        }
        Ok(())
    }

    /// Unlinks the input after a verified publish, unless that would lose data.
    fn remove_source(&self, job: &Job, input: &InputFile) -> Result<Option<FileError>, FileError> {
        let st = &input.stat;
        if st.st_nlink > 1 {
            return Ok(Some(FileError::new(
                Kind::HardLinked,
                format!("input kept: it has {} hard links", st.st_nlink),
            )));
        }
        // The name must still lead to the very file that was compressed.
        let now = rfs::lstat(&job.abs).map_err(|e| FileError::errno("stat of input", e))?;
        if now.st_nlink > 1 {
            return Ok(Some(FileError::new(
                Kind::HardLinked,
                format!("input kept: it now has {} hard links", now.st_nlink),
            )));
        }
        let same = now.st_dev == st.st_dev
            && now.st_ino == st.st_ino
            && now.st_size == st.st_size
            && now.st_mtime == st.st_mtime
            && now.st_mtime_nsec == st.st_mtime_nsec;
        if !same {
            return Ok(Some(FileError::new(
                Kind::Changed,
                "input kept: it changed after it was compressed",
            )));
        }
        let parent = job.abs.parent().unwrap_or(Path::new("/"));
        let dir_fd = rfs::open(
            parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FileError::errno("opening input directory", e))?;
        let name = job.abs.file_name().unwrap_or(OsStr::new(""));
        rfs::unlinkat(&dir_fd, name, AtFlags::empty())
            .map_err(|e| FileError::errno("removing input", e))?;
        let dir = Dir {
            fd: dir_fd,
            path: parent.to_path_buf(),
        };
        output::sync_dir(&dir)?;
        Ok(None)
    }
}

impl Op for GzipOp {
    type Scratch = Scratch;
    type Pending = Pending;
    const DEFER_PUBLISH: bool = true;

    fn name(&self) -> &'static str {
        "gzip"
    }

    fn scratch(&self) -> Scratch {
        Scratch {
            out_dirs: DirCache::new(&self.out_root, self.mirrored),
            bufs: gzstream::Buffers::new(),
        }
    }

    fn check(
        &self,
        job: &Job,
        input: &InputFile,
        scratch: &mut Scratch,
    ) -> Result<Option<FileError>, FileError> {
        if job.rel.as_os_str().as_bytes().ends_with(b".gz") {
            return Ok(Some(FileError::new(
                Kind::AlreadyCompressed,
                "already has the .gz suffix",
            )));
        }
        let name = Self::out_name(job)?;
        let dir = self.out_dir(job, scratch)?;
        match rfs::statat(&dir.fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(FileError::errno("stat of output", e)),
            Ok(_) if self.force => Ok(None),
            Ok(out) => {
                let st = &input.stat;
                let regular =
                    rfs::FileType::from_raw_mode(out.st_mode) == rfs::FileType::RegularFile;
                if regular
                    && out.st_size > 0
                    && out.st_mtime == st.st_mtime
                    && out.st_mtime_nsec == st.st_mtime_nsec
                {
                    Ok(Some(FileError::new(Kind::UpToDate, "output is up to date")))
                } else if job.replace && regular {
                    // Our own output of an earlier version of this file: redo it.
                    Ok(None)
                } else {
                    Err(FileError {
                        kind: Kind::OutputExists,
                        errno: Some(libc::EEXIST),
                        message: format!(
                            "{} exists and is not this file's output; not overwritten (use --force)",
                            dir.path.join(&name).display()
                        ),
                    })
                }
            }
        }
    }

    fn read(
        &self,
        job: &Job,
        input: &mut InputFile,
        scratch: &mut Scratch,
    ) -> Result<Pending, FileError> {
        let dir = self.out_dir(job, scratch)?;
        let mut temp = TempOutput::create(Arc::clone(&dir))?;
        let mtime = u32::try_from(input.stat.st_mtime).unwrap_or(0);
        let name = job.rel.file_name().map(|n| n.as_bytes());
        let header = Header {
            level: self.level,
            mtime,
            name,
        };
        let expected = input.size();
        let totals = gzstream::compress(
            input,
            expected,
            &mut output::WriteBehind::new(temp.file()),
            &header,
            self.blocks.as_ref(),
            &mut scratch.bufs,
        )?;
        Ok(Pending { temp, dir, totals })
    }

    fn publish(&self, job: &Job, input: &InputFile, pending: Pending) -> Result<Done, FileError> {
        let name = Self::out_name(job)?;
        let attrs = Attrs::from_stat(&input.stat);
        // Checked while still a temp: an output that does not decompress back to the input
        // never gets a final name, so a rerun cannot mistake it for an up-to-date one.
        if self.remove_source {
            self.verify_output(&pending.dir, pending.temp.name(), &pending.totals)?;
        }
        pending
            .temp
            .publish(&name, Some(&attrs), self.force || job.replace)?;
        let mut note = None;
        if self.remove_source {
            note = self.remove_source(job, input)?;
        }
        Ok(Done {
            bytes_in: pending.totals.bytes_in,
            bytes_out: pending.totals.bytes_out,
            digest: None,
            note,
            stamp: None,
        })
    }
}
