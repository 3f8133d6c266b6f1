//! The zstd format for `CompressOp`: one standard zstd frame per file (`zstd -t` passes,
//! `zstd -d` restores the bytes), with its content size and checksum, after a skippable frame
//! that stamps it as filepipe's output of this input.
//!
//! A file of up to `WHOLE_MAX` bytes is read whole and compressed in one call on the worker's
//! thread, by a context kept between files. A larger one streams through a context of its own
//! with libzstd's worker threads (`NbWorkers`): libzstd cuts the input into jobs (8 MiB at the
//! default level) compressed on all cores, each seeing the end of the previous one, so the size
//! stays that of one thread's frame. Its output is the same for any number of workers from 1
//! up (but not for 0, which is why the large path always has one): it depends only on the
//! input, its stamp and the level.
//!
//! Why a stamp: a zstd frame has no room for a date or a name, and `zstd -k` keeps the input's
//! mtime on its output, so a date alone (what marks a `.gz` as filepipe's) cannot tell our
//! `.zst` from someone else's. The stamp is a skippable frame (magic `0x184D2A5F`), which every
//! zstd decoder skips, holding `filepipe`, a version, and the input's size and mtime: an output
//! in place is up to date only if it is dated as its input and starts with its stamp.

use std::ffi::OsStr;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective as EndDirective;
use zstd::zstd_safe::{self, CCtx, CParameter, InBuffer, OutBuffer, ResetDirective};

use crate::cli::OpKind;
use crate::config::Config;
use crate::error::{Abandoned, FileError, Kind};
use crate::fsio::input::fill;
use crate::fsio::output::{Dir, WriteBehind};
use crate::ops::compress::{open_output, Codec, Totals};
use crate::signals;
use crate::travel::Job;

/// Largest input compressed whole on the worker's thread. Below it a tree keeps the cores busy
/// with whole files (and a file of up to 4 MiB is at most one of libzstd's jobs anyway); above
/// it the input streams (memory stays bounded) and one file is spread over all cores.
const WHOLE_MAX: u64 = 4 << 20;

/// Input read per streaming call: large enough that libzstd's workers are fed whole jobs
/// quickly, small enough to stay in cache while it is hashed (CRC-32) and copied.
const CHUNK: usize = 1 << 20;

/// The skippable frame's magic (zstd reserves `0x184D2A50` to `0x184D2A5F` for them).
const STAMP_MAGIC: u32 = 0x184D_2A5F;
/// What the stamp's content starts with: whose it is, then its layout's version.
const STAMP_TAG: &[u8; 9] = b"filepipe\x01";
/// The stamp's content: the tag, 3 bytes of zeros, the input's size (u64), its mtime's seconds
/// (i64) and nanoseconds (u32), all little-endian.
const STAMP_CONTENT: usize = 9 + 3 + 8 + 8 + 4;
/// The whole stamp frame: magic, content length, content.
const STAMP_LEN: usize = 8 + STAMP_CONTENT;

/// zstd at one level, and the budget of worker threads large files share.
#[derive(Debug)]
pub(crate) struct Zstd {
    level: i32,
    /// The most worker threads one large file asks for: the run's job count.
    jobs: usize,
    /// The input's CRC-32 is computed (`Totals::crc`): only a run that decompresses each
    /// output back to check it before its input goes (`--remove-source`, `--move-source`)
    /// reads it, and over a tree of text it costs 2-3% of the compression's time.
    crc: bool,
    /// Worker threads not lent to a large file. A file takes what is free (at least one, so
    /// its output is the same), so several large files at once share the cores instead of
    /// each starting `jobs` threads with their buffers (8 MiB jobs in and out, per thread).
    free: Mutex<usize>,
}

/// Per-worker state: the context and buffers of the whole-file path, kept between files
/// (allocating a context costs more than compressing a small file).
pub(crate) struct Scratch {
    /// Largest input compressed whole (`WHOLE_MAX`; tests lower it to reach the streaming path).
    whole_max: u64,
    /// A single-threaded context at the run's level, made at the first small file.
    whole: Option<CCtx<'static>>,
    /// The input (whole-file path) or the current chunk (streaming).
    input: Vec<u8>,
    /// The stamp and the frame (whole-file path) or libzstd's output (streaming).
    output: Vec<u8>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch")
            .field("whole", &self.whole.is_some())
            .field("input", &self.input.capacity())
            .field("output", &self.output.capacity())
            .finish()
    }
}

/// A libzstd error for this file.
fn zstd_error(what: &str, code: zstd_safe::ErrorCode) -> FileError {
    FileError::new(
        Kind::Internal,
        format!("zstd: {what}: {}", zstd_safe::get_error_name(code)),
    )
}

/// The stamp frame for an input of this stat.
fn stamp(st: &rustix::fs::Stat) -> [u8; STAMP_LEN] {
    stamp_of(st.st_size as u64, st.st_mtime, st.st_mtime_nsec as u32)
}

/// The stamp frame for an input of `size` bytes modified at `sec`.`nsec`.
fn stamp_of(size: u64, sec: i64, nsec: u32) -> [u8; STAMP_LEN] {
    let mut s = [0u8; STAMP_LEN];
    s[..4].copy_from_slice(&STAMP_MAGIC.to_le_bytes());
    s[4..8].copy_from_slice(&(STAMP_CONTENT as u32).to_le_bytes());
    s[8..17].copy_from_slice(STAMP_TAG);
    s[20..28].copy_from_slice(&size.to_le_bytes());
    s[28..36].copy_from_slice(&sec.to_le_bytes());
    s[36..40].copy_from_slice(&nsec.to_le_bytes());
    s
}

impl Zstd {
    /// zstd at `level` with up to `jobs` worker threads per large file, each input's CRC-32
    /// computed.
    pub(crate) fn with_level(level: u32, jobs: usize) -> Self {
        Zstd {
            level: level as i32,
            jobs: jobs.max(1),
            crc: true,
            free: Mutex::new(jobs.max(1)),
        }
    }

    /// Lends a large file worker threads: what is free, at most `jobs`, at least one.
    fn take_threads(&self) -> Threads<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let n = (*free).clamp(1, self.jobs);
        *free = free.saturating_sub(n);
        Threads { owner: self, n }
    }

    /// A context at the run's level, with a checksum (what `zstd -t` checks), for `workers`
    /// threads (0: the caller's).
    fn context(&self, workers: usize) -> Result<CCtx<'static>, FileError> {
        let mut cctx = CCtx::try_create()
            .ok_or_else(|| FileError::new(Kind::Internal, "zstd: cannot allocate a context"))?;
        let set = |cctx: &mut CCtx<'static>, p| {
            cctx.set_parameter(p)
                .map(drop)
                .map_err(|c| zstd_error("setting a parameter", c))
        };
        set(&mut cctx, CParameter::CompressionLevel(self.level))?;
        set(&mut cctx, CParameter::ChecksumFlag(true))?;
        if workers > 0 {
            set(&mut cctx, CParameter::NbWorkers(workers as u32))?;
        }
        Ok(cctx)
    }

    /// The whole input in one call, and the stamp and frame in one write (most files of a tree
    /// are small: each write is a trip through the file system).
    fn compress_whole(
        &self,
        input: &mut impl Read,
        expected: u64,
        head: &[u8; STAMP_LEN],
        out: &mut impl Write,
        scratch: &mut Scratch,
    ) -> Result<Totals, FileError> {
        let want = usize::try_from(expected)
            .map_err(|_| FileError::new(Kind::Internal, "zstd: input too large"))?;
        scratch.input.resize(want, 0);
        let n = fill(input, &mut scratch.input).map_err(|e| FileError::io("reading input", &e))?;
        let data = &scratch.input[..n];
        let cctx = match &mut scratch.whole {
            Some(cctx) => cctx,
            slot => slot.insert(self.context(0)?),
        };
        // A frame abandoned by an error earlier is dropped, the parameters kept.
        cctx.reset(ResetDirective::SessionOnly)
            .map_err(|c| zstd_error("resetting", c))?;
        scratch
            .output
            .resize(STAMP_LEN + zstd_safe::compress_bound(n), 0);
        scratch.output[..STAMP_LEN].copy_from_slice(head);
        let len = cctx
            .compress2(&mut scratch.output[STAMP_LEN..], data)
            .map_err(|c| zstd_error("compressing", c))?;
        let end = STAMP_LEN + len;
        out.write_all(&scratch.output[..end])
            .map_err(|e| FileError::io("writing output", &e))?;
        Ok(Totals {
            crc: self.crc.then(|| crc32fast::hash(data)),
            bytes_in: n as u64,
            bytes_out: end as u64,
        })
    }

    /// The input in chunks through a context with worker threads of its own (dropped with the
    /// file: it waits for its workers, and keeps no job buffers once the file is done).
    fn compress_streaming(
        &self,
        input: &mut impl Read,
        expected: u64,
        head: &[u8; STAMP_LEN],
        out: &mut impl Write,
        scratch: &mut Scratch,
    ) -> Result<Totals, FileError> {
        let threads = self.take_threads();
        let mut cctx = self.context(threads.n)?;
        let totals = self.stream(&mut cctx, input, expected, head, out, scratch);
        if totals.is_err() && signals::aborted() {
            // Freeing a context waits until libzstd's jobs in flight are done (a job is 32 MiB
            // at level 19: tens of seconds), and a second signal must not wait for them
            // (RELIABILITY #16). The run is ending: the context's memory and threads end with
            // the process.
            std::mem::forget(cctx);
        }
        totals
    }

    /// `compress_streaming`'s work, through `cctx`.
    fn stream(
        &self,
        cctx: &mut CCtx<'static>,
        input: &mut impl Read,
        expected: u64,
        head: &[u8; STAMP_LEN],
        out: &mut impl Write,
        scratch: &mut Scratch,
    ) -> Result<Totals, FileError> {
        // Pledged, so the frame header carries the content size, as zstd's own does.
        cctx.set_pledged_src_size(Some(expected))
            .map_err(|c| zstd_error("pledging the size", c))?;
        out.write_all(head)
            .map_err(|e| FileError::io("writing output", &e))?;
        let mut crc = self.crc.then(crc32fast::Hasher::new);
        let (mut bytes_in, mut bytes_out) = (0u64, head.len() as u64);
        scratch
            .output
            .resize(zstd_safe::CCtx::out_size().max(CHUNK), 0);
        loop {
            let want = (expected - bytes_in).min(CHUNK as u64) as usize;
            scratch.input.resize(want, 0);
            let n =
                fill(input, &mut scratch.input).map_err(|e| FileError::io("reading input", &e))?;
            if n < want {
                // libzstd refuses to end a frame short of its pledged size; the input shrank
                // while it was read, which the caller would reject anyway.
                return Err(FileError::new(
                    Kind::Changed,
                    "input shrank while it was read",
                ));
            }
            let chunk = &scratch.input[..n];
            if let Some(crc) = &mut crc {
                crc.update(chunk);
            }
            bytes_in += n as u64;
            let last = bytes_in == expected;
            let directive = if last {
                EndDirective::ZSTD_e_end
            } else {
                EndDirective::ZSTD_e_continue
            };
            let mut src = InBuffer::around(chunk);
            loop {
                // With every job slot busy, each call waits for the oldest job's next 512 KiB,
                // and the chunk goes in only once a whole job is done (32 MiB at level 19):
                // a second signal is heard here too, not only at the next read.
                if signals::aborted() {
                    return Err(FileError::new(Kind::Interrupted, Abandoned.to_string()));
                }
                let mut dst = OutBuffer::around(&mut scratch.output[..]);
                let remaining = cctx
                    .compress_stream2(&mut dst, &mut src, directive)
                    .map_err(|c| zstd_error("compressing", c))?;
                let written = dst.as_slice();
                out.write_all(written)
                    .map_err(|e| FileError::io("writing output", &e))?;
                bytes_out += written.len() as u64;
                let done = if last {
                    remaining == 0
                } else {
                    src.pos() == src.src.len()
                };
                if done {
                    break;
                }
            }
            if last {
                break;
            }
        }
        Ok(Totals {
            crc: crc.map(crc32fast::Hasher::finalize),
            bytes_in,
            bytes_out,
        })
    }
}

/// Worker threads lent to one large file; given back when dropped (also on an error).
struct Threads<'a> {
    owner: &'a Zstd,
    n: usize,
}

impl Drop for Threads<'_> {
    fn drop(&mut self) {
        let mut free = self.owner.free.lock().unwrap_or_else(|e| e.into_inner());
        // A file lent one thread past an empty budget gives back what it could not take.
        *free = (*free + self.n).min(self.owner.jobs);
    }
}

impl Codec for Zstd {
    type Scratch = Scratch;
    const KIND: OpKind = OpKind::Zstd;

    fn new(cfg: &Config) -> anyhow::Result<Self> {
        Ok(Zstd {
            crc: cfg.remove_source || cfg.move_source.is_some(),
            ..Zstd::with_level(cfg.level, cfg.jobs)
        })
    }

    fn scratch(&self) -> Scratch {
        Scratch {
            whole_max: WHOLE_MAX,
            whole: None,
            input: Vec::new(),
            output: Vec::new(),
        }
    }

    fn compress(
        &self,
        _job: &Job,
        stat: &rustix::fs::Stat,
        input: &mut impl Read,
        out: &mut WriteBehind<'_>,
        scratch: &mut Scratch,
    ) -> Result<Totals, FileError> {
        let expected = stat.st_size as u64;
        let head = stamp(stat);
        if expected <= scratch.whole_max {
            self.compress_whole(input, expected, &head, out, scratch)
        } else {
            self.compress_streaming(input, expected, &head, out, scratch)
        }
    }

    fn decoder<'r, R: BufRead + 'r>(&self, compressed: R) -> io::Result<Box<dyn Read + 'r>> {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(
            compressed,
        )?))
    }

    /// Ours if it starts with the stamp of this input as it is now (its size and mtime).
    fn owns(
        &self,
        dir: &Dir,
        name: &OsStr,
        _len: u64,
        input: &rustix::fs::Stat,
    ) -> Result<bool, FileError> {
        let file = open_output(dir, name)?;
        let mut head = [0u8; STAMP_LEN];
        let mut got = 0;
        while got < STAMP_LEN {
            match file.read_at(&mut head[got..], got as u64) {
                Ok(0) => return Ok(false),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FileError::io("reading the existing output", &e)),
            }
        }
        Ok(head == stamp(input))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress_with(level: u32, workers: usize, data: &[u8]) -> Vec<u8> {
        let z = Zstd::with_level(level, workers);
        let mut cctx = z.context(workers).unwrap();
        cctx.set_pledged_src_size(Some(data.len() as u64)).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; CHUNK];
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            let last = (i + 1) * CHUNK >= data.len();
            let mut src = InBuffer::around(chunk);
            loop {
                let mut dst = OutBuffer::around(&mut buf[..]);
                let d = if last {
                    EndDirective::ZSTD_e_end
                } else {
                    EndDirective::ZSTD_e_continue
                };
                let remaining = cctx.compress_stream2(&mut dst, &mut src, d).unwrap();
                out.extend_from_slice(dst.as_slice());
                if (last && remaining == 0) || (!last && src.pos() == chunk.len()) {
                    break;
                }
            }
        }
        out
    }

    /// What the large path relies on for outputs that do not depend on `--jobs`.
    #[test]
    fn the_frame_is_the_same_for_any_number_of_workers() {
        let data: Vec<u8> = (0..24u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x3f)
            .collect();
        let one = compress_with(3, 1, &data);
        for workers in [2, 3] {
            assert!(one == compress_with(3, workers, &data), "{workers} workers");
        }
        let mut back = Vec::new();
        zstd::stream::read::Decoder::new(&one[..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
    }

    /// A reader that hands out its data in the chunk sizes given, cycling.
    struct Chunky<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        i: usize,
    }

    impl Read for Chunky<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.sizes[self.i % self.sizes.len()]
                .min(buf.len())
                .min(self.data.len());
            self.i += 1;
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn unzstd(bytes: &[u8]) -> Vec<u8> {
        let mut back = Vec::new();
        Zstd::with_level(3, 1)
            .decoder(bytes)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        back
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// Random bytes read in random chunks, whole or streamed on worker threads, at any
        /// level: the output starts with the stamp, and decompresses to the bytes.
        #[test]
        fn random_bytes_in_random_chunks_roundtrip(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600_000),
            sizes in proptest::collection::vec(1usize..70_000, 1..8),
            level in 1u32..=19,
            whole in proptest::prelude::any::<bool>(),
            workers in 1usize..=3,
        ) {
            let z = Zstd::with_level(level, workers);
            let mut scratch = z.scratch();
            if !whole {
                scratch.whole_max = 0;
            }
            let head = stamp_of(data.len() as u64, 1_700_000_000, 5);
            let mut out = Vec::new();
            let mut r = Chunky { data: &data, sizes, i: 0 };
            let len = data.len() as u64;
            let totals = if whole {
                z.compress_whole(&mut r, len, &head, &mut out, &mut scratch)
            } else {
                z.compress_streaming(&mut r, len, &head, &mut out, &mut scratch)
            }
            .unwrap();
            proptest::prop_assert_eq!(totals.bytes_out, out.len() as u64);
            proptest::prop_assert_eq!(totals.crc, Some(crc32fast::hash(&data)));
            proptest::prop_assert!(out.starts_with(&head));
            // The stamp is a skippable frame: the decoder passes over it.
            proptest::prop_assert!(unzstd(&out) == data);
        }
    }

    #[test]
    fn threads_are_lent_from_one_budget_and_given_back() {
        let z = Zstd::with_level(3, 4);
        let a = z.take_threads();
        assert_eq!(a.n, 4);
        let b = z.take_threads();
        assert_eq!(b.n, 1, "at least one, whatever is free");
        drop(a);
        let c = z.take_threads();
        assert_eq!(c.n, 4);
        drop((b, c));
        assert_eq!(*z.free.lock().unwrap(), 4);
    }
}
