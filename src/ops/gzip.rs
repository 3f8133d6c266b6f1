//! The gzip format for `CompressOp`: a standard gzip member per file (`gzip -t` passes,
//! `gunzip` restores the bytes) carrying the input's name and mtime in its header, written by
//! `gzstream` (libdeflate for whole small files, pigz-style blocks on all cores for large ones).
//!
//! An existing `.gz` dated as its input (to the nanosecond, which filepipe gives each output)
//! counts as filepipe's: the date is the mark, as it always was (see `Codec::owns`).

use std::ffi::OsStr;
use std::io::{self, BufRead, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use flate2::read::MultiGzDecoder;

use crate::cli::OpKind;
use crate::config::Config;
use crate::error::FileError;
use crate::fsio::output::{Dir, WriteBehind};
use crate::ops::compress::{open_output, Codec, Totals};
use crate::ops::gzstream::{self, BlockPool, Header};
use crate::travel::Job;

/// gzip at one level, and the threads that compress large files' blocks.
#[derive(Debug)]
pub(crate) struct Gzip {
    level: u32,
    /// Compresses the blocks of large files in parallel. Separate from the worker pool on
    /// purpose: the workers block on the job channel, so they could never steal these tasks.
    blocks: Option<BlockPool>,
}

impl Gzip {
    /// gzip at `level`, every file on the calling thread (tests).
    #[cfg(test)]
    pub(crate) fn with_level(level: u32) -> Self {
        Gzip {
            level,
            blocks: None,
        }
    }
}

impl Codec for Gzip {
    type Scratch = gzstream::Buffers;
    const KIND: OpKind = OpKind::Gzip;

    /// gzip at the run's level, with a block pool when there is more than one job.
    fn new(cfg: &Config) -> anyhow::Result<Self> {
        let blocks = if cfg.jobs > 1 {
            Some(BlockPool::new(cfg.jobs)?)
        } else {
            None
        };
        Ok(Gzip {
            level: cfg.level,
            blocks,
        })
    }

    fn scratch(&self) -> gzstream::Buffers {
        gzstream::Buffers::new()
    }

    fn compress(
        &self,
        job: &Job,
        stat: &rustix::fs::Stat,
        input: &mut impl Read,
        out: &mut WriteBehind<'_>,
        scratch: &mut gzstream::Buffers,
    ) -> Result<Totals, FileError> {
        let header = Header {
            level: self.level,
            mtime: u32::try_from(stat.st_mtime).unwrap_or(0),
            name: job.rel.file_name().map(|n| n.as_bytes()),
        };
        let expected = stat.st_size as u64;
        gzstream::compress(input, expected, out, &header, self.blocks.as_ref(), scratch)
    }

    fn decoder<'r, R: BufRead + 'r>(&self, compressed: R) -> io::Result<Box<dyn Read + 'r>> {
        Ok(Box::new(MultiGzDecoder::new(compressed)))
    }

    /// Ours if, dated as the input (checked before), its gzip header carries the input's mtime
    /// and its trailer the input's length (modulo 2^32), as filepipe writes them. The date
    /// alone is not enough: the kernel dates files from a clock that ticks every few
    /// milliseconds, so a user's `x.gz` written just before or after `x` can bear the very same
    /// nanoseconds (found by a review: 19 of 20 such archives taken for up-to-date outputs,
    /// then overwritten once their inputs changed). `gzip -k` of the same input passes, and
    /// is that input's output as much as filepipe's would be.
    fn owns(
        &self,
        dir: &Dir,
        name: &OsStr,
        len: u64,
        input: &rustix::fs::Stat,
    ) -> Result<bool, FileError> {
        // Header (10 bytes) and trailer (8) at the least.
        if len < 18 {
            return Ok(false);
        }
        let file = open_output(dir, name)?;
        let mut head = [0u8; 8];
        let mut tail = [0u8; 4];
        for (buf, at) in [(&mut head[..], 0), (&mut tail[..], len - 4)] {
            match file.read_exact_at(buf, at) {
                Ok(()) => {}
                // Shorter than it was stat'ed: changed since, not an output to trust.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(FileError::io("reading the existing output", &e)),
            }
        }
        let mtime = u32::try_from(input.st_mtime).unwrap_or(0);
        Ok(head[..3] == [0x1f, 0x8b, 8]
            && head[4..8] == mtime.to_le_bytes()
            && tail == (input.st_size as u64 as u32).to_le_bytes())
    }
}
