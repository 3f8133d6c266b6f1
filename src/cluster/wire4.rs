//! Version 4 of the wire format: job and outcome messages in a compact binary form, read and
//! written by hand. JSON cost a worker and a coordinator about 11 k instructions a file between
//! them for outcomes alone (a digest as 64 hex characters, escaped and checked as UTF-8, eight
//! keys a file); here a digest travels as its bytes and a path as its bytes.
//!
//! Every message starts with the byte 4 (`VERSION_BINARY`), which no JSON text starts with,
//! then a byte for its kind (`J` jobs, `O` outcomes); integers are little-endian, of fixed
//! width. A job message is untrusted input, so the decoder checks every length and count
//! against the bytes left (and its own bound) before it allocates, refuses trailing bytes,
//! unknown op codes, unknown flag bits, and names or messages that are not UTF-8, and never
//! panics (it only takes slices it has checked). Paths are bytes, as file names are: their
//! rules (relative, plain parts, no NUL, at most PATH_MAX) are `WirePath::rel`'s, file by file,
//! as for JSON.
//!
//! ```text
//! jobs:      04 'J' run:s8 root:s8 out:s8 (empty: none) op:u8 n_ops:u8 ops:u8*n_ops level:u8
//!            flags:u8 (1 force, 2 remove_source, 4 move_source, 8 move_failed,
//!            16 follow_symlinks, 32 max_size)
//!            [move_source:s8] [move_failed:s8] [max_size:u64] n_files:u16, then per file:
//!            path:s32 flags:u8 (1 replace, 2 stamp, 4 size) [size:u64] [stamp size:u64 mtime_ns:i64]
//! outcomes:  04 'O' run:s8 worker:s16 n:u16, then per outcome:
//!            path:s32 status:u8 (0 done, 1 skipped, 2 failed) flags:u8 (1 kind, 2 message,
//!            4 errno, 8 read, 16 byte counts) [kind:s8] [message:s32] [errno:i32]
//!            [bytes_in:u64 bytes_out:u64] n_digests:u8 (algo:u8 bytes)*n [read size:u64 mtime_ns:i64]
//! s8, s16, s32: a length of that width, then as many bytes
//! ```

use std::os::unix::ffi::OsStrExt;

use crate::cli::OpKind;
use crate::cluster::wire::{
    is_binary, JobBatch, JobBatchOut, OutcomeBatch, WireFile, WireOutcome, WirePath, WireStamp,
    WireStatus, MAX_FILES, MAX_MESSAGE, MAX_PAYLOAD, MAX_WIRE_PATH, VERSION_BINARY,
};
use crate::digest::Digest;
use crate::error::FileError;
use crate::travel::Outcome;

/// A message's second byte: a batch of jobs.
const JOBS: u8 = b'J';

/// A message's second byte: a batch of outcomes.
const OUTCOMES: u8 = b'O';

/// The most outcomes a message holds: a worker sends at most a job message's files at once.
pub(crate) const MAX_OUTCOMES: usize = MAX_FILES;

/// The most digests an outcome holds: one per hash filepipe has.
const MAX_DIGESTS: usize = 3;

/// The most ops a job names: each op once.
const MAX_OPS: usize = 5;

/// The fewest bytes a file of a job takes (a path length, one byte of path, flags): what a
/// declared count of files is checked against before anything is allocated.
const MIN_JOB_FILE: usize = 4 + 1 + 1;

/// The fewest bytes an outcome takes (a path length, one byte of path, status, flags, the
/// digest count).
const MIN_OUTCOME: usize = 4 + 1 + 1 + 1 + 1;

impl JobBatch {
    /// Reads and checks a job message, JSON (versions 1-3) or binary (version 4, told by its
    /// first byte). Files are checked one by one, later: see `WirePath::rel`.
    pub(crate) fn parse(payload: &[u8]) -> Result<JobBatch, String> {
        if payload.len() > MAX_MESSAGE {
            return Err(format!("{} bytes, more than {MAX_MESSAGE}", payload.len()));
        }
        let b = if is_binary(payload)? {
            decode_jobs(payload)?
        } else {
            JobBatch::parse_json(payload)?
        };
        b.check()?;
        Ok(b)
    }
}

impl OutcomeBatch {
    /// Reads an outcome message: binary (version 4, told by its first byte) or JSON (any
    /// version but 4: the caller takes only `VERSION` of JSON). Its outcomes are checked one by
    /// one by `WireOutcome::outcome`.
    pub(crate) fn parse(payload: &[u8]) -> Result<OutcomeBatch, String> {
        if is_binary(payload)? {
            decode_outcomes(payload)
        } else {
            OutcomeBatch::parse_json(payload)
        }
    }
}

/// An op's code on the wire. Fixed for ever: a new op takes a new code.
fn op_code(op: OpKind) -> u8 {
    match op {
        OpKind::Gzip => 1,
        OpKind::Zstd => 2,
        OpKind::Sha256 => 3,
        OpKind::Sha512 => 4,
        OpKind::Blake3 => 5,
    }
}

/// The op of a code, or `Err` for one this release does not know.
fn op_of(code: u8) -> Result<OpKind, String> {
    Ok(match code {
        1 => OpKind::Gzip,
        2 => OpKind::Zstd,
        3 => OpKind::Sha256,
        4 => OpKind::Sha512,
        5 => OpKind::Blake3,
        _ => return Err(format!("unknown op code {code}")),
    })
}

/// Appends `bytes` after their length as one byte; `Err` if longer than 255.
fn put_s8(buf: &mut Vec<u8>, bytes: &[u8], what: &str) -> Result<(), String> {
    let n = u8::try_from(bytes.len()).map_err(|_| format!("{what}: longer than 255 bytes"))?;
    buf.push(n);
    buf.extend_from_slice(bytes);
    Ok(())
}

/// Appends `bytes` after their length as two bytes; `Err` if longer than 65,535.
fn put_s16(buf: &mut Vec<u8>, bytes: &[u8], what: &str) -> Result<(), String> {
    let n = u16::try_from(bytes.len()).map_err(|_| format!("{what}: longer than 65535 bytes"))?;
    buf.extend_from_slice(&n.to_le_bytes());
    buf.extend_from_slice(bytes);
    Ok(())
}

/// Appends `bytes` after their length as four bytes (a message is at most a megabyte, so
/// nothing written is longer; `Err` otherwise).
fn put_s32(buf: &mut Vec<u8>, bytes: &[u8], what: &str) -> Result<(), String> {
    let n = u32::try_from(bytes.len()).map_err(|_| format!("{what}: longer than 4 GiB"))?;
    buf.extend_from_slice(&n.to_le_bytes());
    buf.extend_from_slice(bytes);
    Ok(())
}

/// Appends a stamp: size, then mtime.
fn put_stamp(buf: &mut Vec<u8>, s: &WireStamp) {
    buf.extend_from_slice(&s.size.to_le_bytes());
    buf.extend_from_slice(&s.mtime_ns.to_le_bytes());
}

/// A version 4 job message of `j`'s fields (its `v` is not written: the first byte says 4).
pub(crate) fn encode_jobs(j: &JobBatchOut) -> Result<Vec<u8>, String> {
    let paths: usize = j.files.iter().map(|f| f.rel.wire_len()).sum();
    let mut buf = Vec::with_capacity(64 + paths + j.files.len() * 8);
    buf.extend_from_slice(&[VERSION_BINARY, JOBS]);
    put_s8(&mut buf, j.run.as_bytes(), "run")?;
    put_s8(&mut buf, j.root.as_bytes(), "root")?;
    put_s8(&mut buf, j.out.unwrap_or("").as_bytes(), "out")?;
    buf.push(op_code(j.op));
    let n_ops = u8::try_from(j.ops.len()).map_err(|_| "too many ops".to_owned())?;
    buf.push(n_ops);
    buf.extend(j.ops.iter().map(|&op| op_code(op)));
    buf.push(u8::try_from(j.level).map_err(|_| format!("level {}", j.level))?);
    // The move roots' bits are new: a reader from before them refuses the message (an unknown
    // flag bit) rather than leave the inputs in the tree.
    buf.push(
        u8::from(j.force)
            | u8::from(j.remove_source) << 1
            | u8::from(j.move_source.is_some()) << 2
            | u8::from(j.move_failed.is_some()) << 3
            | u8::from(j.follow_symlinks) << 4
            | u8::from(j.max_size.is_some()) << 5,
    );
    for name in j.move_source.iter().chain(&j.move_failed) {
        put_s8(&mut buf, name.as_bytes(), "move root")?;
    }
    if let Some(max) = j.max_size {
        buf.extend_from_slice(&max.to_le_bytes());
    }
    let n = u16::try_from(j.files.len()).map_err(|_| "too many files".to_owned())?;
    buf.extend_from_slice(&n.to_le_bytes());
    for f in j.files {
        put_path(&mut buf, &f.rel)?;
        let flags =
            u8::from(f.replace) | u8::from(f.stamp.is_some()) << 1 | u8::from(f.size > 0) << 2;
        buf.push(flags);
        if f.size > 0 {
            buf.extend_from_slice(&f.size.to_le_bytes());
        }
        if let Some(s) = &f.stamp {
            put_stamp(&mut buf, s);
        }
    }
    Ok(buf)
}

/// Appends a path's bytes (a hex path decoded: binary messages carry bytes as they are). One
/// longer than PATH_MAX (a file in a deep tree's last directory) goes as it is, for the worker
/// to fail that file alone, as JSON has it.
fn put_path(buf: &mut Vec<u8>, rel: &WirePath) -> Result<(), String> {
    match rel {
        WirePath::Text(s) => put_s32(buf, s.as_bytes(), "path"),
        WirePath::Bytes { hex } => {
            let bytes = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()
                .filter(|_| hex.len() % 2 == 0)
                .ok_or("a path whose hex is not hex")?;
            put_s32(buf, &bytes, "path")
        }
    }
}

/// Reads a version 4 job message (its content is checked by the caller, as JSON's is).
pub(crate) fn decode_jobs(payload: &[u8]) -> Result<JobBatch, String> {
    let mut r = Reader::new(payload, JOBS, "job")?;
    let run = r.name("run")?;
    let root = r.name("root")?;
    let out = Some(r.name("out")?).filter(|o| !o.is_empty());
    let op = op_of(r.u8("op")?)?;
    let n_ops = usize::from(r.u8("op count")?);
    if n_ops > MAX_OPS {
        return Err(format!("{n_ops} ops (there are {MAX_OPS})"));
    }
    let ops = r
        .take(n_ops, "ops")?
        .iter()
        .map(|&c| op_of(c))
        .collect::<Result<Vec<_>, _>>()?;
    let level = u32::from(r.u8("level")?);
    let flags = r.flags(0b11_1111, "job flags")?;
    let move_source = (flags & 4 != 0)
        .then(|| r.name("move_source"))
        .transpose()?;
    let move_failed = (flags & 8 != 0)
        .then(|| r.name("move_failed"))
        .transpose()?;
    let max_size = (flags & 32 != 0).then(|| r.u64("max_size")).transpose()?;
    let n = r.count(MAX_FILES, MIN_JOB_FILE, "files")?;
    let mut files = Vec::with_capacity(n);
    for _ in 0..n {
        let rel = r.path()?;
        let ff = r.flags(0b111, "file flags")?;
        let size = if ff & 4 != 0 { r.u64("size")? } else { 0 };
        let stamp = if ff & 2 != 0 { Some(r.stamp()?) } else { None };
        files.push(WireFile {
            rel,
            size,
            stamp,
            replace: ff & 1 != 0,
        });
    }
    r.end()?;
    Ok(JobBatch {
        v: u32::from(VERSION_BINARY),
        run,
        root,
        op,
        level,
        force: flags & 1 != 0,
        files,
        out,
        remove_source: flags & 2 != 0,
        ops,
        move_source,
        move_failed,
        follow_symlinks: flags & 16 != 0,
        max_size,
    })
}

/// Outcomes on their way, written as version 4 records as they come (no copy of the path nor
/// hex of the digest in between), sent as messages of as many as fit.
#[derive(Debug, Default)]
pub(crate) struct Records {
    buf: Vec<u8>,
    /// Where each record ends in `buf`.
    ends: Vec<usize>,
}

impl Records {
    /// Whether there are none.
    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Adds an outcome of the pipeline.
    pub(crate) fn push(&mut self, o: &Outcome) -> Result<(), String> {
        let start = self.buf.len();
        let written = write_outcome(&mut self.buf, o);
        self.close(start, written)
    }

    /// Adds a failed outcome of a file never run (a path refused, a job no worker here can do).
    pub(crate) fn push_failed(&mut self, rel: &WirePath, e: &FileError) -> Result<(), String> {
        let start = self.buf.len();
        let written = (|| {
            put_path(&mut self.buf, rel)?;
            write_reason(&mut self.buf, 2, e, None, &[], None)
        })();
        self.close(start, written)
    }

    /// Ends the record begun at `start`, or takes it back if it could not be written.
    fn close(&mut self, start: usize, written: Result<(), String>) -> Result<(), String> {
        match written {
            Ok(()) => {
                self.ends.push(self.buf.len());
                Ok(())
            }
            Err(e) => {
                self.buf.truncate(start);
                Err(e)
            }
        }
    }

    /// The first message of the records (of `run`, from `worker`): as many of the first
    /// `most` as fit in `MAX_PAYLOAD`, at least one. Returns how many it holds, and its payload.
    pub(crate) fn message(
        &self,
        run: &str,
        worker: &str,
        most: usize,
    ) -> Result<(usize, Vec<u8>), String> {
        let mut head = Vec::with_capacity(8 + run.len() + worker.len());
        head.extend_from_slice(&[VERSION_BINARY, OUTCOMES]);
        put_s8(&mut head, run.as_bytes(), "run")?;
        put_s16(&mut head, worker.as_bytes(), "worker")?;
        let room = MAX_PAYLOAD.saturating_sub(head.len() + 2);
        let most = most.clamp(1, MAX_OUTCOMES);
        let mut n = self.ends.len().min(most);
        while n > 1 && self.ends[n - 1] > room {
            n -= 1;
        }
        let end = match n.checked_sub(1) {
            Some(last) => self.ends[last],
            None => 0,
        };
        let mut payload = head;
        payload.reserve(2 + end);
        // n is at most MAX_OUTCOMES, which fits.
        payload.extend_from_slice(&(n as u16).to_le_bytes());
        payload.extend_from_slice(&self.buf[..end]);
        Ok((n, payload))
    }

    /// Forgets the first `n` records (sent).
    pub(crate) fn drain(&mut self, n: usize) {
        let n = n.min(self.ends.len());
        let Some(cut) = n.checked_sub(1).map(|last| self.ends[last]) else {
            return;
        };
        self.buf.drain(..cut);
        self.ends.drain(..n);
        for e in &mut self.ends {
            *e -= cut;
        }
    }
}

/// Writes `o` as a record.
fn write_outcome(buf: &mut Vec<u8>, o: &Outcome) -> Result<(), String> {
    put_s32(buf, o.rel().as_os_str().as_bytes(), "path")?;
    match o {
        Outcome::Done { done, .. } => {
            let read = done.stamp.as_ref().map(WireStamp::of);
            let counts = (done.bytes_in, done.bytes_out);
            match &done.note {
                Some(note) => write_reason(buf, 0, note, Some(counts), &done.digests, read),
                None => {
                    buf.push(0);
                    buf.push(16 | if read.is_some() { 8 } else { 0 });
                    write_rest(buf, Some(counts), &done.digests, read)
                }
            }
        }
        Outcome::Skipped { reason, .. } => write_reason(buf, 1, reason, None, &[], None),
        Outcome::Failed { error, .. } => write_reason(buf, 2, error, None, &[], None),
    }
}

/// Writes a record's status and all after the path, with a reason (a note, for a done file).
fn write_reason(
    buf: &mut Vec<u8>,
    status: u8,
    e: &FileError,
    counts: Option<(u64, u64)>,
    digests: &[Digest],
    read: Option<WireStamp>,
) -> Result<(), String> {
    buf.push(status);
    let flags = 1
        | 2
        | if e.errno.is_some() { 4 } else { 0 }
        | if read.is_some() { 8 } else { 0 }
        | if counts.is_some() { 16 } else { 0 };
    buf.push(flags);
    put_s8(buf, e.kind.as_str().as_bytes(), "kind")?;
    put_s32(buf, e.message.as_bytes(), "message")?;
    if let Some(errno) = e.errno {
        buf.extend_from_slice(&errno.to_le_bytes());
    }
    write_rest(buf, counts, digests, read)
}

/// Writes a record's byte counts, digests and stamp (its flags said which are there).
fn write_rest(
    buf: &mut Vec<u8>,
    counts: Option<(u64, u64)>,
    digests: &[Digest],
    read: Option<WireStamp>,
) -> Result<(), String> {
    if let Some((bytes_in, bytes_out)) = counts {
        buf.extend_from_slice(&bytes_in.to_le_bytes());
        buf.extend_from_slice(&bytes_out.to_le_bytes());
    }
    if digests.len() > MAX_DIGESTS {
        return Err(format!("{} digests", digests.len()));
    }
    buf.push(digests.len() as u8);
    for d in digests {
        buf.push(op_code(OpKind::from(d.algo())));
        buf.extend_from_slice(d.as_bytes());
    }
    if let Some(s) = &read {
        put_stamp(buf, s);
    }
    Ok(())
}

/// Reads a version 4 outcome message. Its outcomes are checked by `WireOutcome::outcome`, as
/// JSON's are; their digests come as `WireOutcome::raw`, already of their algorithm's length.
pub(crate) fn decode_outcomes(payload: &[u8]) -> Result<OutcomeBatch, String> {
    let mut r = Reader::new(payload, OUTCOMES, "outcome")?;
    let run = r.name("run")?;
    let worker = r.text16("worker")?;
    let n = r.count(MAX_OUTCOMES, MIN_OUTCOME, "outcomes")?;
    let mut outcomes = Vec::with_capacity(n);
    for _ in 0..n {
        let rel = r.path()?;
        let status = match r.u8("status")? {
            0 => WireStatus::Done,
            1 => WireStatus::Skipped,
            2 => WireStatus::Failed,
            s => return Err(format!("unknown status {s}")),
        };
        let flags = r.flags(0b11111, "outcome flags")?;
        let kind = if flags & 1 != 0 {
            Some(r.text8("kind")?)
        } else {
            None
        };
        let message = if flags & 2 != 0 {
            Some(r.text32("message")?)
        } else {
            None
        };
        let errno = if flags & 4 != 0 {
            Some(r.i32("errno")?)
        } else {
            None
        };
        let (bytes_in, bytes_out) = if flags & 16 != 0 {
            (r.u64("bytes_in")?, r.u64("bytes_out")?)
        } else {
            (0, 0)
        };
        let n_digests = usize::from(r.u8("digest count")?);
        if n_digests > MAX_DIGESTS {
            return Err(format!("{n_digests} digests ({MAX_DIGESTS} at most)"));
        }
        let mut raw = Vec::with_capacity(n_digests);
        for _ in 0..n_digests {
            let op = op_of(r.u8("digest algorithm")?)?;
            let algo = op
                .hash()
                .ok_or_else(|| format!("a digest named {}", op.as_str()))?;
            let bytes = r.take(algo.len(), "digest")?;
            raw.push(Digest::new(algo, bytes).ok_or("a digest of the wrong length")?);
        }
        let read = if flags & 8 != 0 {
            Some(r.stamp()?)
        } else {
            None
        };
        outcomes.push(WireOutcome {
            rel,
            status,
            kind,
            message,
            errno,
            bytes_in,
            bytes_out,
            digest: None,
            digests: Vec::new(),
            read,
            raw,
        });
    }
    r.end()?;
    Ok(OutcomeBatch {
        v: u32::from(VERSION_BINARY),
        run,
        worker,
        outcomes,
    })
}

/// Reads a message front to back; every read is checked against what is left, and says what
/// it was reading when it fails.
struct Reader<'a> {
    left: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader past the version and kind bytes of `payload`, which must be a version 4
    /// message of `kind` (`what`: "job" or "outcome", for the errors) at most `MAX_MESSAGE` long.
    fn new(payload: &'a [u8], kind: u8, what: &str) -> Result<Self, String> {
        if payload.len() > MAX_MESSAGE {
            return Err(format!("{} bytes, more than {MAX_MESSAGE}", payload.len()));
        }
        match payload {
            [VERSION_BINARY, k, left @ ..] if *k == kind => Ok(Reader { left }),
            [VERSION_BINARY, k, ..] => Err(format!(
                "version 4, not a {what} message (kind byte {k:#04x})"
            )),
            [v, ..] => Err(format!("version byte {v:#04x}, this release reads 4")),
            [] => Err("an empty message".into()),
        }
    }

    fn left(&self) -> usize {
        self.left.len()
    }

    /// The next `n` bytes.
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.left.len() {
            return Err(format!(
                "cut short: {what} needs {n} bytes, {} left",
                self.left.len()
            ));
        }
        let (head, rest) = self.left.split_at(n);
        self.left = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let b = self.take(N, what)?;
        b.try_into().map_err(|_| format!("{what}: cut short"))
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn i64(&mut self, what: &str) -> Result<i64, String> {
        self.array(what).map(i64::from_le_bytes)
    }

    fn i32(&mut self, what: &str) -> Result<i32, String> {
        self.array(what).map(i32::from_le_bytes)
    }

    /// A flags byte, with no bit outside `known` (a later version's bits would mean something
    /// this release would not do).
    fn flags(&mut self, known: u8, what: &str) -> Result<u8, String> {
        let f = self.u8(what)?;
        if f & !known != 0 {
            return Err(format!("{what} {f:#04x}: unknown bits"));
        }
        Ok(f)
    }

    /// `len` bytes as UTF-8.
    fn text(&mut self, len: usize, what: &str) -> Result<String, String> {
        let b = self.take(len, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| format!("{what}: not UTF-8"))
    }

    fn text8(&mut self, what: &str) -> Result<String, String> {
        let n = usize::from(self.u8(what)?);
        self.text(n, what)
    }

    fn text16(&mut self, what: &str) -> Result<String, String> {
        let n = usize::from(self.u16(what)?);
        self.text(n, what)
    }

    fn text32(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32(what)? as usize;
        self.text(n, what)
    }

    /// A run's, root's or output root's name: UTF-8 of at most 255 bytes (its rule is the
    /// caller's: JSON's and this format's names are checked alike).
    fn name(&mut self, what: &str) -> Result<String, String> {
        self.text8(what)
    }

    /// A path: its bytes, a string when they are UTF-8 (as JSON has it), else hex. Any bytes
    /// are read (its rules are `WirePath::rel`'s, file by file); the length is checked
    /// against what is left before anything is copied.
    fn path(&mut self) -> Result<WirePath, String> {
        let n = self.u32("path length")? as usize;
        let b = self.take(n, "path")?;
        if n > MAX_WIRE_PATH {
            // Refused whole, as `JobBatch::check` refuses JSON's (see `MAX_WIRE_PATH`).
            return Err(format!(
                "a path of {n} bytes (a coordinator sends none longer than PATH_MAX and a name)"
            ));
        }
        Ok(match std::str::from_utf8(b) {
            Ok(s) => WirePath::Text(s.to_owned()),
            // As JSON carries it: the path's bytes, exactly (a path past PATH_MAX then fails
            // its file alone, and its outcome names it as it came).
            Err(_) => WirePath::Bytes {
                hex: b.iter().map(|b| format!("{b:02x}")).collect(),
            },
        })
    }

    /// A count of `what` (two bytes), checked before anything is allocated for them: at most
    /// `most`, and no more than the bytes left hold at `each` bytes at least apiece.
    fn count(&mut self, most: usize, each: usize, what: &str) -> Result<usize, String> {
        let n = usize::from(self.u16(what)?);
        if n > most || n.saturating_mul(each) > self.left() {
            return Err(format!(
                "{n} {what} declared ({most} at most), in {} bytes",
                self.left()
            ));
        }
        Ok(n)
    }

    fn stamp(&mut self) -> Result<WireStamp, String> {
        Ok(WireStamp {
            size: self.u64("stamp size")?,
            mtime_ns: self.i64("stamp mtime")?,
        })
    }

    /// Nothing may follow the message.
    fn end(&self) -> Result<(), String> {
        match self.left.len() {
            0 => Ok(()),
            n => Err(format!("{n} bytes after the end of the message")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;

    use super::*;
    use crate::cluster::wire::MAX_PATH;
    use crate::digest::HashAlgo;
    use crate::error::Kind;
    use crate::travel::{Done, Stamp};

    fn file(rel: &[u8], stamp: Option<WireStamp>, replace: bool) -> WireFile {
        WireFile {
            rel: WirePath::of(Path::new(OsStr::from_bytes(rel))),
            size: 0,
            stamp,
            replace,
        }
    }

    fn job<'a>(files: &'a [WireFile], ops: &'a [OpKind]) -> JobBatchOut<'a> {
        JobBatchOut {
            v: 3,
            run: "r1",
            root: "in",
            op: OpKind::Zstd,
            level: 19,
            force: true,
            files,
            out: Some("o"),
            remove_source: false,
            ops,
            move_source: None,
            move_failed: None,
            follow_symlinks: false,
            max_size: None,
        }
    }

    #[test]
    fn move_roots_travel_as_flag_bits_and_names_that_an_older_reader_refuses() {
        let files = [file(b"a/b.log", None, false)];
        let mut j = job(&files, &[]);
        j.op = OpKind::Gzip;
        j.level = 6;
        j.move_source = Some("done");
        j.move_failed = Some("bad");
        let payload = encode_jobs(&j).unwrap();
        let b = JobBatch::parse(&payload).unwrap();
        assert_eq!(
            (b.move_source.as_deref(), b.move_failed.as_deref()),
            (Some("done"), Some("bad"))
        );
        // A reader from before them knew the bits 1 and 2 only: what it does with these.
        // 04 'J', run "r1", root "in", out "o", op, no ops, level: the flags follow.
        let flags_at = 2 + 3 + 3 + 2 + 3;
        assert_eq!(payload[flags_at], 0b1101);
        let mut older = Reader {
            left: &payload[flags_at..],
        };
        assert!(older.flags(0b11, "job flags").is_err());
        // A move root is a name, never a path.
        for hostile in ["..", "/etc", "a/b"] {
            j.move_source = Some(hostile);
            let payload = encode_jobs(&j).unwrap();
            assert!(JobBatch::parse(&payload).is_err(), "{hostile}");
        }
    }

    #[test]
    fn following_symlinks_travels_as_a_flag_bit_and_a_json_version_older_readers_refuse() {
        let files = [file(b"a/b.log", None, false)];
        let mut j = job(&files, &[]);
        j.follow_symlinks = true;
        let payload = encode_jobs(&j).unwrap();
        assert!(JobBatch::parse(&payload).unwrap().follow_symlinks);
        // A reader from before it knew the bits up to 8: it refuses the message. (04 'J',
        // run "r1", root "in", out "o", op, no ops, level: the flags follow.)
        let flags_at = 2 + 3 + 3 + 2 + 3;
        assert_eq!(payload[flags_at], 0b1_0001);
        let mut older = Reader {
            left: &payload[flags_at..],
        };
        assert!(older.flags(0b1111, "job flags").is_err());
        // In JSON, a version of its own, and one that says it must be that version.
        j.v = crate::cluster::wire::VERSION_FOLLOW;
        let json = serde_json::to_vec(&j).unwrap();
        assert!(JobBatch::parse(&json).unwrap().follow_symlinks);
        j.v = 3;
        assert!(JobBatch::parse(&serde_json::to_vec(&j).unwrap()).is_err());
    }

    #[test]
    fn a_size_limit_travels_after_a_flag_bit_and_in_a_json_version_older_readers_refuse() {
        let files = [file(b"a/b.log", None, false)];
        let mut j = job(&files, &[]);
        j.move_failed = Some("bad");
        for max in [0, 1, 10 << 30, u64::MAX] {
            j.max_size = Some(max);
            let payload = encode_jobs(&j).unwrap();
            let b = JobBatch::parse(&payload).unwrap();
            assert_eq!(
                (b.max_size, b.move_failed.as_deref()),
                (Some(max), Some("bad"))
            );
            // A reader from before it knew the bits up to 16: it refuses the message.
            let flags_at = 2 + 3 + 3 + 2 + 3;
            assert_eq!(payload[flags_at], 0b10_1001);
            let mut older = Reader {
                left: &payload[flags_at..],
            };
            assert!(older.flags(0b1_1111, "job flags").is_err());
            // The limit's bytes cut short: refused, never read as a file count.
            let mut cut = payload.clone();
            cut.truncate(flags_at + 1 + 4 + 3);
            assert!(JobBatch::parse(&cut).is_err());
        }
        // Without the limit, the bit is clear and no bytes are spent.
        j.max_size = None;
        let without = encode_jobs(&j).unwrap();
        j.max_size = Some(7);
        assert_eq!(encode_jobs(&j).unwrap().len(), without.len() + 8);
        // In JSON, a version of its own, and one that says it must be that version.
        j.v = crate::cluster::wire::VERSION_LIMIT;
        let json = serde_json::to_vec(&j).unwrap();
        assert_eq!(JobBatch::parse(&json).unwrap().max_size, Some(7));
        j.v = crate::cluster::wire::VERSION_MOVE;
        assert!(JobBatch::parse(&serde_json::to_vec(&j).unwrap()).is_err());
    }

    /// A job message of three files, one not UTF-8, one with a stamp and `replace`.
    fn a_job() -> Vec<u8> {
        let files = [
            file(b"a/b.log", None, false),
            file(
                b"caf\xe9/x",
                Some(WireStamp {
                    size: 7,
                    mtime_ns: -3,
                }),
                true,
            ),
            file("ü".as_bytes(), None, false),
        ];
        encode_jobs(&job(&files, &[OpKind::Sha256, OpKind::Zstd])).unwrap()
    }

    #[test]
    fn a_job_message_reads_back_as_it_was_written() {
        let files = [
            file(b"a/b.log", None, false),
            file(
                b"caf\xe9/x",
                Some(WireStamp {
                    size: 7,
                    mtime_ns: -3,
                }),
                true,
            ),
        ];
        let ops = [OpKind::Sha256, OpKind::Zstd];
        let payload = encode_jobs(&job(&files, &ops)).unwrap();
        assert_eq!(payload[0], VERSION_BINARY);
        let b = JobBatch::parse(&payload).unwrap();
        assert_eq!(b.format(), crate::cluster::wire::Format::Binary);
        assert_eq!(
            (b.run.as_str(), b.root.as_str(), b.out.as_deref()),
            ("r1", "in", Some("o"))
        );
        assert_eq!(
            (b.op, b.ops.as_slice(), b.level, b.force, b.remove_source),
            (OpKind::Zstd, &ops[..], 19, true, false)
        );
        assert_eq!(format!("{:?}", b.files), format!("{files:?}"));
        assert_eq!(
            b.files[1].rel.rel().unwrap(),
            Path::new(OsStr::from_bytes(b"caf\xe9/x"))
        );
        // The same checks as JSON's: a level out of range is refused, whatever the format.
        let mut bad = job(&files, &ops);
        bad.level = 20;
        let e = JobBatch::parse(&encode_jobs(&bad).unwrap()).unwrap_err();
        assert!(e.contains("level"), "{e}");
        // A single op without an output root.
        let mut plain = job(&files[..1], &[]);
        plain.op = OpKind::Sha256;
        plain.out = None;
        plain.level = 6;
        let b = JobBatch::parse(&encode_jobs(&plain).unwrap()).unwrap();
        assert_eq!((b.op, b.ops.len(), b.out), (OpKind::Sha256, 0, None));
    }

    /// Hostile version 4 job messages: each refused whole, with a reason, never a panic.
    #[test]
    fn a_hostile_job_message_is_refused_whole() {
        let good = a_job();
        assert!(JobBatch::parse(&good).is_ok());
        // Cut short anywhere.
        for n in 0..good.len() {
            let e = JobBatch::parse(&good[..n]).unwrap_err();
            assert!(!e.is_empty(), "{n}");
        }
        // Anything after the end.
        let mut trailing = good.clone();
        trailing.push(0);
        let e = JobBatch::parse(&trailing).unwrap_err();
        assert!(e.contains("after the end"), "{e}");
        let at = |i: usize, b: u8| {
            let mut m = good.clone();
            m[i] = b;
            JobBatch::parse(&m).unwrap_err()
        };
        // Offsets in `a_job`: 04 'J', run (1+2), root (1+2), out (1+1), op at 10, n_ops at
        // 11, ops at 12-13, level at 14, flags at 15, file count at 16-17, the first path's
        // length at 18-21.
        assert_eq!(&good[..4], &[4, b'J', 2, b'r']);
        for (e, why) in [
            (at(0, 5), "version byte 0x05"),
            (at(0, 0), "version byte 0x00"),
            (at(1, b'O'), "not a job message"),
            (at(2, 200), "cut short"),
            (at(3, 0xff), "not UTF-8"),
            (at(10, 9), "unknown op code 9"),
            (at(11, 200), "200 ops"),
            (at(12, 0), "unknown op code 0"),
            (at(15, 0x80), "unknown bits"),
            (at(16, 0xff), "files declared"),
            (at(17, 0xff), "files declared"),
            (at(21, 0xff), "cut short: path needs"),
            (at(18, 0xfe), "cut short"),
        ] {
            assert!(e.contains(why), "{why}: {e}");
        }
        // A file count of 0 is refused by the common checks, as JSON's.
        let mut none = good[..18].to_vec();
        none[16] = 0;
        none[17] = 0;
        assert!(JobBatch::parse(&none).unwrap_err().contains("0 files"));
        // A root that is not a plain name.
        let files = [file(b"a", None, false)];
        let mut j = job(&files, &[]);
        j.op = OpKind::Gzip;
        j.level = 6;
        j.out = None;
        j.root = "../in";
        assert!(JobBatch::parse(&encode_jobs(&j).unwrap()).is_err());
        // More than a message may hold.
        let mut huge = good.clone();
        huge.resize(MAX_MESSAGE + 1, 0);
        assert!(JobBatch::parse(&huge).unwrap_err().contains("more than"));
    }

    /// Paths a job may not name still read (they are bytes), and are refused file by file, as
    /// JSON's are.
    #[test]
    fn a_bad_path_in_a_binary_job_fails_its_file_alone() {
        let long = vec![b'a'; MAX_PATH + 1];
        let long_raw = [&long[..], b"\xe9"].concat();
        let files: Vec<WireFile> = [
            &b"../x"[..],
            b"/etc/passwd",
            b"a/../../x",
            b"a\0b",
            b"",
            &long,
            &long_raw,
            b"ok",
        ]
        .iter()
        .map(|p| file(p, None, false))
        .collect();
        let mut j = job(&files, &[]);
        j.op = OpKind::Gzip;
        j.level = 6;
        let b = JobBatch::parse(&encode_jobs(&j).unwrap()).unwrap();
        let ok: Vec<bool> = b.files.iter().map(|f| f.rel.rel().is_ok()).collect();
        assert_eq!(ok, [false, false, false, false, false, false, false, true]);
    }

    /// A path longer than any a coordinator sends (PATH_MAX and a name) refuses its message
    /// whole, in either format: its failed outcome, naming it, might not fit in a message,
    /// and the job would come back for ever (found by a hostile review: a non-UTF-8 path of
    /// 350,000 bytes, read lossily, tripled in its outcome). Its non-UTF-8 bytes are never
    /// read lossily below that.
    #[test]
    fn a_path_longer_than_any_walk_names_refuses_its_message_in_either_format() {
        let huge = vec![0xff; MAX_WIRE_PATH + 1];
        let files = [file(&huge, None, false), file(b"ok", None, false)];
        let mut j = job(&files, &[]);
        j.op = OpKind::Sha256;
        let e = JobBatch::parse(&encode_jobs(&j).unwrap()).unwrap_err();
        assert!(e.contains(&format!("{} bytes", MAX_WIRE_PATH + 1)), "{e}");
        let mut json = serde_json::to_value(&j).unwrap();
        json["v"] = 2.into(); // an output root, one op
        let e = JobBatch::parse(&serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(e.contains(&format!("{} bytes", MAX_WIRE_PATH + 1)), "{e}");
        // At the bound, read as its bytes (hex), not lossily, and failed alone.
        let at = vec![0xff; MAX_WIRE_PATH];
        let files = [file(&at, None, false), file(b"ok", None, false)];
        let j = job(&files, &[]);
        let b = JobBatch::parse(&encode_jobs(&j).unwrap()).unwrap();
        assert_eq!(b.files[0].rel.wire_len(), MAX_WIRE_PATH);
        assert!(matches!(&b.files[0].rel, WirePath::Bytes { hex } if hex.len() == 2 * at.len()));
        assert!(b.files[0].rel.rel().is_err() && b.files[1].rel.rel().is_ok());
    }

    /// Version 4 is binary only: a JSON outcome message saying 4 is not read as one.
    #[test]
    fn a_json_outcome_message_of_version_4_is_refused() {
        let json = br#"{"v":4,"run":"r","worker":"w","outcomes":[]}"#;
        let e = OutcomeBatch::parse(json).unwrap_err();
        assert!(e.contains("version 4"), "{e}");
    }

    fn digest(algo: HashAlgo, byte: u8) -> Digest {
        Digest::new(algo, &vec![byte; algo.len()]).unwrap()
    }

    fn outcomes() -> Vec<Outcome> {
        vec![
            Outcome::Done {
                rel: "a/b".into(),
                done: Box::new(Done {
                    bytes_in: 10,
                    bytes_out: 4,
                    digests: vec![digest(HashAlgo::Sha256, 1), digest(HashAlgo::Blake3, 2)],
                    stamp: Some(Stamp::seen_elsewhere(10, -5)),
                    ..Done::default()
                }),
            },
            Outcome::Done {
                rel: PathBuf::from(OsStr::from_bytes(b"caf\xe9")),
                done: Box::new(Done {
                    bytes_in: 3,
                    digests: vec![digest(HashAlgo::Blake3, 3), digest(HashAlgo::Sha256, 4)],
                    note: Some(FileError::new(Kind::HardLinked, "kept: 2 links")),
                    ..Done::default()
                }),
            },
            Outcome::Skipped {
                rel: "s".into(),
                reason: FileError::new(Kind::UpToDate, "up to date"),
            },
            Outcome::Failed {
                rel: "f".into(),
                error: FileError {
                    kind: Kind::NoSpace,
                    errno: Some(28),
                    message: "writing: no space \u{e9}".into(),
                },
            },
        ]
    }

    /// What the coordinator makes of an outcome sent as JSON, the format every release reads.
    fn as_json(o: &Outcome, hashes: &[HashAlgo]) -> String {
        let json = serde_json::to_vec(&WireOutcome::of(o)).unwrap();
        let w: WireOutcome = serde_json::from_slice(&json).unwrap();
        format!("{:?} {:?}", w.outcome(hashes), w.read)
    }

    #[test]
    fn outcomes_read_back_as_json_s_do() {
        let hashes = [HashAlgo::Sha256, HashAlgo::Blake3];
        let sent = outcomes();
        let mut r = Records::default();
        for o in &sent {
            r.push(o).unwrap();
        }
        r.push_failed(
            &WirePath::Text("../x".into()),
            &FileError::new(Kind::UnsafeJobPath, "refused"),
        )
        .unwrap();
        let (n, payload) = r.message("r1", "host:1", 500).unwrap();
        assert_eq!(n, 5);
        let b = OutcomeBatch::parse(&payload).unwrap();
        assert!(b.readable());
        assert_eq!((b.run.as_str(), b.worker.as_str()), ("r1", "host:1"));
        for (o, w) in sent.iter().zip(&b.outcomes) {
            assert_eq!(
                format!("{:?} {:?}", w.outcome(&hashes), w.read),
                as_json(o, &hashes)
            );
        }
        // The refused path reads as it was sent, and is refused by the coordinator too.
        assert_eq!(b.outcomes[4].rel, WirePath::Text("../x".into()));
        assert!(b.outcomes[4].outcome(&hashes).is_err());
        // Digests are the run's or the outcome does not read: not fewer, not others.
        for other in [
            &[HashAlgo::Sha256][..],
            &[HashAlgo::Sha512, HashAlgo::Blake3],
            &[HashAlgo::Sha256, HashAlgo::Blake3, HashAlgo::Sha512],
        ] {
            assert!(b.outcomes[0].outcome(other).is_err(), "{other:?}");
        }
        let mut twice = b.outcomes[0].clone();
        twice.raw[1] = twice.raw[0];
        assert!(twice.outcome(&hashes).is_err());
        let mut not_done = b.outcomes[0].clone();
        not_done.status = WireStatus::Failed;
        not_done.kind = Some("io".into());
        assert!(not_done.outcome(&hashes).is_err());
        // Sent, they are forgotten.
        r.drain(n);
        assert!(r.is_empty());
    }

    #[test]
    fn outcomes_go_in_as_many_messages_as_fit() {
        let long = "x/".repeat(2000) + "f";
        let mut r = Records::default();
        for i in 0..600 {
            r.push(&Outcome::Skipped {
                rel: format!("{long}{i}").into(),
                reason: FileError::new(Kind::UpToDate, "up to date"),
            })
            .unwrap();
        }
        let mut read = Vec::new();
        let mut messages = 0;
        while !r.is_empty() {
            let (n, payload) = r.message("r1", "w", 500).unwrap();
            assert!(
                n >= 1 && payload.len() <= MAX_PAYLOAD,
                "{n} {}",
                payload.len()
            );
            let b = OutcomeBatch::parse(&payload).unwrap();
            assert_eq!(b.outcomes.len(), n);
            read.extend(b.outcomes.into_iter().map(|w| w.rel.lossy()));
            r.drain(n);
            messages += 1;
        }
        assert!(messages >= 3, "{messages}");
        let want: Vec<PathBuf> = (0..600).map(|i| format!("{long}{i}").into()).collect();
        assert_eq!(read, want);
    }

    #[test]
    fn a_hostile_outcome_message_is_refused_whole() {
        let mut r = Records::default();
        for o in &outcomes() {
            r.push(o).unwrap();
        }
        let (_, good) = r.message("r1", "w", 500).unwrap();
        assert!(OutcomeBatch::parse(&good).is_ok());
        for n in 0..good.len() {
            assert!(OutcomeBatch::parse(&good[..n]).is_err(), "{n}");
        }
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"xx");
        assert!(OutcomeBatch::parse(&trailing).is_err());
        // A count no message of this size holds is refused before anything is allocated.
        // Offsets: 04 'O', run (1+2), worker (2+1), the count at 8-9.
        let mut many = good.clone();
        many[8] = 0xff;
        many[9] = 0xff;
        let e = OutcomeBatch::parse(&many).unwrap_err();
        assert!(e.contains("outcomes declared"), "{e}");
        // The first outcome's path length, then its status and flags.
        let mut huge = good.clone();
        huge[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(OutcomeBatch::parse(&huge)
            .unwrap_err()
            .contains("cut short"));
        let path = u32::from_le_bytes(good[10..14].try_into().unwrap()) as usize;
        let status = 14 + path;
        let mut bad = good.clone();
        bad[status] = 3;
        assert!(OutcomeBatch::parse(&bad).unwrap_err().contains("status"));
        let mut bad = good.clone();
        bad[status + 1] = 0x80;
        assert!(OutcomeBatch::parse(&bad)
            .unwrap_err()
            .contains("unknown bits"));
        // A job message is not an outcome message.
        assert!(OutcomeBatch::parse(&a_job()).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes, after each first two bytes a decoder may see, never panic.
        #[test]
        fn decoding_random_bytes_never_panics(
            head in prop::sample::select(vec![&b""[..], &b"\x04"[..], &b"\x04J"[..], &b"\x04O"[..], &b"{"[..]]),
            body in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut m = head.to_vec();
            m.extend_from_slice(&body);
            let _ = JobBatch::parse(&m);
            let _ = OutcomeBatch::parse(&m);
        }

        /// A good message with a few bytes changed never panics either (random bytes rarely
        /// get past the first fields).
        #[test]
        fn decoding_a_changed_message_never_panics(
            changes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            outcome in any::<bool>(),
        ) {
            let mut m = if outcome {
                let mut r = Records::default();
                for o in &outcomes() {
                    r.push(o).unwrap();
                }
                r.message("r1", "w", 500).unwrap().1
            } else {
                a_job()
            };
            for (i, b) in changes {
                let at = i.index(m.len());
                m[at] = b;
            }
            if let Ok(b) = OutcomeBatch::parse(&m) {
                for w in &b.outcomes {
                    let _ = w.outcome(&[HashAlgo::Sha256, HashAlgo::Blake3]);
                }
            }
            if let Ok(b) = JobBatch::parse(&m) {
                for f in &b.files {
                    let _ = f.rel.rel();
                }
            }
        }

        /// Any job batch a coordinator may write reads back whole.
        #[test]
        fn jobs_round_trip(
            files in prop::collection::vec(
                (
                    prop::collection::vec(any::<u8>(), 0..300),
                    prop::option::of((any::<u64>(), any::<i64>())),
                    any::<bool>(),
                    any::<u64>(),
                ),
                1..40,
            ),
            force in any::<bool>(),
            level in 1u32..=9,
        ) {
            let files: Vec<WireFile> = files
                .into_iter()
                .map(|(p, stamp, replace, size)| WireFile {
                    size,
                    ..file(&p, stamp.map(|(size, mtime_ns)| WireStamp { size, mtime_ns }), replace)
                })
                .collect();
            let mut j = job(&files, &[]);
            j.op = OpKind::Gzip;
            j.level = level;
            j.force = force;
            j.out = None;
            let b = JobBatch::parse(&encode_jobs(&j).unwrap()).unwrap();
            prop_assert_eq!(format!("{:?}", b.files), format!("{files:?}"));
            prop_assert_eq!((b.level, b.force), (level, force));
        }

        /// Any outcome a worker may write reads back as it reads from JSON.
        #[test]
        fn outcomes_round_trip(
            rel in prop::collection::vec(any::<u8>(), 1..200),
            which in 0usize..3,
            message in ".{0,40}",
            errno in prop::option::of(any::<i32>()),
            counts in (any::<u64>(), any::<u64>()),
            stamp in prop::option::of((any::<u64>(), any::<i64>())),
            bytes in any::<u8>(),
        ) {
            let rel = PathBuf::from(OsStr::from_bytes(&rel));
            let error = FileError { kind: Kind::Io, errno, message };
            let o = match which {
                0 => Outcome::Done {
                    rel,
                    done: Box::new(Done {
                        bytes_in: counts.0,
                        bytes_out: counts.1,
                        digests: vec![digest(HashAlgo::Sha512, bytes)],
                        stamp: stamp.map(|(s, m)| Stamp::seen_elsewhere(s, m)),
                        note: errno.map(|_| error.clone()),
                        ..Done::default()
                    }),
                },
                1 => Outcome::Skipped { rel, reason: error },
                _ => Outcome::Failed { rel, error },
            };
            let mut r = Records::default();
            r.push(&o).unwrap();
            let b = OutcomeBatch::parse(&r.message("r", "w", 500).unwrap().1).unwrap();
            let w = &b.outcomes[0];
            prop_assert_eq!(
                format!("{:?} {:?}", w.outcome(&[HashAlgo::Sha512]), w.read),
                as_json(&o, &[HashAlgo::Sha512])
            );
        }
    }
}
