//! What travels through the queue: batches of jobs from a coordinator to the workers, batches
//! of outcomes back. JSON with a version (1 to 3), or binary (version 4, `wire4`, told by its
//! first byte), read into the same types; a worker answers a job in its own format. A job
//! message is untrusted input (anyone allowed to
//! publish to the stream can write one), so everything a worker acts on is checked here: the
//! run and root names are plain tokens, the level is in range, the message is bounded, and a
//! file's path must be relative with plain components only. A bad path fails its file alone.
//! Several results from one read (`--op sha256,zstd`) travel as an op list in the job (known
//! ops only, one compressor at most, each once) and the digests in the outcome: named by their
//! algorithm when the run has several hashes, unnamed when it has one (as coordinators from
//! before read it), which the coordinator reads only with exactly its run's hashes. Errors
//! about a message's content are said in part (`in_part`): a message may be most of a
//! megabyte.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cli::{OpKind, OpSpec};
use crate::digest::{Digest, HashAlgo};
use crate::error::{FileError, Kind};
use crate::travel::{Done, Outcome, Stamp};

/// The message format's version: a worker refuses messages of another.
pub(crate) const VERSION: u32 = 1;

/// The largest message read (NATS's default max_payload): far more than a batch of 64 jobs.
pub(crate) const MAX_MESSAGE: usize = 1 << 20;

/// The largest payload written: room left under `MAX_MESSAGE` for the headers.
pub(crate) const MAX_PAYLOAD: usize = MAX_MESSAGE - 4096;

/// The most files a job message may hold: a coordinator sends batches of at most 64.
pub(crate) const MAX_FILES: usize = 1024;

/// The longest path a job may name (PATH_MAX).
pub(crate) const MAX_PATH: usize = 4096;

/// The longest path a job message may carry at all: a coordinator's walk names none longer
/// than PATH_MAX and a name (those past PATH_MAX fail their file alone, `WirePath::rel`). A
/// message with a longer one is refused whole: its failed outcome, which names the path, could
/// not be sent (a path near a message's size), and the job would come back for ever.
pub(crate) const MAX_WIRE_PATH: usize = 64 * 1024;

/// The first byte of every version 4 message: no JSON text starts with it (JSON starts with
/// white space, `{`, `[`, `"`, a digit, `-`, `t`, `f` or `n`).
pub(crate) const VERSION_BINARY: u8 = 4;

/// Whether `payload` is a version 4 message (`Ok(true)`), else JSON or nothing filepipe wrote
/// (`Ok(false)`); `Err` for a first byte no JSON text starts with, which a later binary
/// version would have (a control character: JSON allows only tab, newline and return).
pub(crate) fn is_binary(payload: &[u8]) -> Result<bool, String> {
    match payload.first() {
        Some(&VERSION_BINARY) => Ok(true),
        Some(&b) if b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r') => Err(format!(
            "version byte {b:#04x}: this release reads JSON (versions 1 to 3) and binary \
             messages of version 4"
        )),
        _ => Ok(false),
    }
}

/// The first message of `items`: as many of the first `most` as fit in `MAX_PAYLOAD` once
/// `encode`d (halving until they do: JSON escapes long names to six bytes a character), or
/// the first alone. Returns how many it holds, and its payload.
pub(crate) fn fitting<T, E>(
    items: &[T],
    most: usize,
    encode: impl Fn(&[T]) -> Result<Vec<u8>, E>,
) -> Result<(usize, Vec<u8>), E> {
    let mut n = items.len().min(most).max(1);
    loop {
        let payload = encode(&items[..n])?;
        if payload.len() <= MAX_PAYLOAD || n == 1 {
            return Ok((n, payload));
        }
        n /= 2;
    }
}

/// The most characters of an error about a message's content that are said: a message is
/// untrusted, and may put most of a megabyte in one field, which a serde error quotes whole
/// (an unknown op); a log line of a megabyte helps no one.
const SAID: usize = 256;

/// `text`, cut short to its first `SAID` characters (saying how long it was) if it is longer:
/// an error about an untrusted message, as logged.
pub(crate) fn in_part(text: &str) -> String {
    match text.char_indices().nth(SAID) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}... ({} bytes in all)", &text[..end], text.len()),
    }
}

/// Whether `s` is a name a run or a root may have: 1 to 64 of `A-Z a-z 0-9 _ -`. Such names
/// are also safe as NATS subject tokens.
pub(crate) fn valid_name(s: &str) -> bool {
    crate::config::valid_root_name(s)
}

/// A path relative to a root, as bytes: a string when it is UTF-8, else hex (file names need
/// not be UTF-8, JSON strings must be). Read by hand (`WirePathVisitor`), not as an untagged
/// enum: serde buffers each untagged value whole before trying the variants, an allocation
/// and a copy per file of every message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub(crate) enum WirePath {
    /// A UTF-8 path.
    Text(String),
    /// Any other path, its bytes in hex.
    Bytes {
        /// Two lower-case hex digits per byte.
        hex: String,
    },
}

impl<'de> Deserialize<'de> for WirePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WirePathVisitor)
    }
}

/// Reads a `WirePath` as the untagged enum did: a string, or a map with a `hex` string (other
/// keys ignored).
struct WirePathVisitor;

impl<'de> serde::de::Visitor<'de> for WirePathVisitor {
    type Value = WirePath;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a path: a string, or {\"hex\": its bytes in hex}")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WirePath, E> {
        Ok(WirePath::Text(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<WirePath, E> {
        Ok(WirePath::Text(v))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<WirePath, A::Error> {
        /// A key of the map: `hex`, or another (ignored, as the untagged enum did).
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "lowercase")]
        enum Key {
            Hex,
            #[serde(other)]
            Other,
        }
        let mut hex: Option<String> = None;
        while let Some(key) = map.next_key::<Key>()? {
            if matches!(key, Key::Hex) {
                if hex.is_some() {
                    return Err(serde::de::Error::duplicate_field("hex"));
                }
                hex = Some(map.next_value()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        hex.map(|hex| WirePath::Bytes { hex })
            .ok_or_else(|| serde::de::Error::missing_field("hex"))
    }
}

impl WirePath {
    /// `p`'s bytes, as they will read back.
    pub(crate) fn of(p: &Path) -> WirePath {
        match p.to_str() {
            Some(s) => WirePath::Text(s.to_owned()),
            None => WirePath::Bytes {
                hex: p
                    .as_os_str()
                    .as_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            },
        }
    }

    /// The path's bytes, or `None` if the hex is not hex. Borrowed for a UTF-8 path (nearly
    /// every one): a job's path is checked and copied once, not twice.
    fn bytes(&self) -> Option<Cow<'_, [u8]>> {
        match self {
            WirePath::Text(s) => Some(Cow::Borrowed(s.as_bytes())),
            WirePath::Bytes { hex } => {
                if hex.len() % 2 != 0 || hex.len() > 2 * MAX_PATH {
                    return None;
                }
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                    .collect::<Option<Vec<u8>>>()
                    .map(Cow::Owned)
            }
        }
    }

    /// How many bytes the path has (its hex's half), for sizing a binary message.
    pub(super) fn wire_len(&self) -> usize {
        match self {
            WirePath::Text(s) => s.len(),
            WirePath::Bytes { hex } => hex.len() / 2,
        }
    }

    /// The path as given, whatever it is: what an outcome about it names.
    pub(crate) fn lossy(&self) -> PathBuf {
        match self.bytes() {
            Some(b) => PathBuf::from(OsStr::from_bytes(&b)),
            None => PathBuf::from("<undecodable path>"),
        }
    }

    /// The path, if a job may name it: not empty, relative, plain components only (no `..`,
    /// no `.`, no root), no NUL, at most PATH_MAX bytes. Anything else is refused: a job must
    /// never lead a worker outside its root, whatever the message says.
    pub(crate) fn rel(&self) -> Result<PathBuf, FileError> {
        let refuse = |why: &str| {
            Err(FileError::new(
                Kind::UnsafeJobPath,
                format!("refused job path: {why}"),
            ))
        };
        let Some(bytes) = self.bytes() else {
            return refuse("not hex");
        };
        if bytes.is_empty() || bytes.len() > MAX_PATH {
            return refuse("empty or longer than PATH_MAX");
        }
        if bytes.contains(&0) {
            return refuse("contains NUL");
        }
        // Byte by byte, not through Path::components, which quietly drops "." and repeated
        // or trailing slashes: the name the worker uses must be exactly the name checked.
        let plain = bytes
            .split(|&b| b == b'/')
            .all(|seg| !seg.is_empty() && seg != b"." && seg != b"..");
        if !plain {
            return refuse("not a plain relative path (absolute, '.', '..', or an empty part)");
        }
        let path = PathBuf::from(OsStr::from_bytes(&bytes));
        debug_assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
        Ok(path)
    }
}

/// What a file looked like: its size and mtime. Not the inode and ctime, which need not agree
/// between two hosts' views of one network file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WireStamp {
    /// Size in bytes.
    pub(crate) size: u64,
    /// Modification time, in nanoseconds since the epoch.
    pub(crate) mtime_ns: i64,
}

impl WireStamp {
    pub(crate) fn of(s: &Stamp) -> WireStamp {
        WireStamp {
            size: s.size,
            mtime_ns: s.mtime_ns,
        }
    }
}

/// One file of a job batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireFile {
    /// Relative to the root.
    pub(crate) rel: WirePath,
    /// Its size when the coordinator found it, or 0 when not sent (for progress, and batching
    /// on the worker; the coordinator's walk already sends a large file alone).
    pub(crate) size: u64,
    /// Watch mode: how the file looked when it settled. The worker does not act on it (its
    /// own read is checked whole, as always); the coordinator compares it with the outcome's
    /// `read`, so an outcome of another version of the file never counts for this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stamp: Option<WireStamp>,
    /// Watch mode: an existing output was made by filepipe for an earlier version of this
    /// file (the coordinator's state says so) and may be replaced. Grants nothing `force`
    /// does not: anyone who may publish a job may set that.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) replace: bool,
}

/// A batch of jobs: everything a worker needs to process them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobBatch {
    /// `JobBatch::version`'s.
    pub(crate) v: u32,
    /// The coordinator's run: outcomes go to its subject.
    pub(crate) run: String,
    /// The root's name; each worker maps it to its own mount point (`--root NAME=PATH`).
    pub(crate) root: String,
    /// The operation; with several results (`ops`), the one that decides outputs and the
    /// level (the compressor, else the first hash): what a worker from before `ops` reads.
    pub(crate) op: OpKind,
    /// The compression level (gzip, zstd).
    pub(crate) level: u32,
    /// gzip, zstd: redo up-to-date outputs, replace different ones.
    pub(crate) force: bool,
    /// The files.
    pub(crate) files: Vec<WireFile>,
    /// The output root's name (`--out`), mapped by each worker like `root`; absent: outputs
    /// next to their inputs. A message that has one is `VERSION_OUT`, so that a worker from
    /// before it (which would ignore the field, and write next to the inputs) refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) out: Option<String>,
    /// gzip, zstd: remove each input once its output is durable (`--remove-source`). A message
    /// with it is `VERSION_OUT` too: a worker from before it would keep the inputs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) remove_source: bool,
    /// Several results from one read: every op (`op` among them), checked as `--op` is. A
    /// message with them is `VERSION_MULTI`: a worker from before them would compute `op`'s
    /// result alone. Empty: `op` alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) ops: Vec<OpKind>,
    /// gzip, zstd: the name of the directory each input is moved to once its output is
    /// durable (`--move-source`), mapped by each worker with `--move-root NAME=PATH`. A message
    /// with it is `VERSION_MOVE`: a worker from before it would leave the inputs in the tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) move_source: Option<String>,
    /// The name of the directory an input that failed for good is moved to (`--move-failed`),
    /// mapped like `move_source`; `VERSION_MOVE` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) move_failed: Option<String>,
    /// Symlinks on a file's path, or the file itself, are followed (`--follow-symlinks`), as a
    /// local run follows them: only to what lies beneath the worker's root (what is opened is
    /// judged, `Root::holds`). A message with it is `VERSION_FOLLOW`: a worker from before it
    /// would skip every such file as a symlink.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) follow_symlinks: bool,
    /// Files larger than this many bytes are skipped unread, `over-max-size`
    /// (`--max-size`), checked by the worker on what it opens, as a local run checks it. A
    /// message with it is `VERSION_LIMIT`: a worker from before it would read every file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_size: Option<u64>,
}

/// A job message as it is written: `JobBatch`'s fields, borrowed, so that encoding a batch
/// (once, or again for each half of one too large) copies no path.
#[derive(Debug, Serialize)]
pub(crate) struct JobBatchOut<'a> {
    pub(crate) v: u32,
    pub(crate) run: &'a str,
    pub(crate) root: &'a str,
    pub(crate) op: OpKind,
    pub(crate) level: u32,
    pub(crate) force: bool,
    pub(crate) files: &'a [WireFile],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) out: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) remove_source: bool,
    #[serde(skip_serializing_if = "<[OpKind]>::is_empty")]
    pub(crate) ops: &'a [OpKind],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) move_source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) move_failed: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) follow_symlinks: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_size: Option<u64>,
}

/// The version of a job message that names an output root or asks for its inputs removed:
/// what a worker from before them would ignore.
pub(crate) const VERSION_OUT: u32 = 2;

/// The version of a job message with several ops (`ops`), an output root or not.
pub(crate) const VERSION_MULTI: u32 = 3;

/// The version of a JSON job message that names a directory its inputs are moved to
/// (`move_source`, `move_failed`): a worker from before them would leave the inputs where they
/// are. After 4, which is the binary format's (there, a flag bit says the same).
pub(crate) const VERSION_MOVE: u32 = 5;

/// The version of a JSON job message whose symlinks are followed (`follow_symlinks`).
pub(crate) const VERSION_FOLLOW: u32 = 6;

/// The version of a JSON job message with a size limit (`max_size`).
pub(crate) const VERSION_LIMIT: u32 = 7;

/// What a job message asks beyond a file's op and level, each of which needs a worker that
/// knows it (`JobBatch::version`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Asks {
    /// An output root, or inputs removed.
    pub(crate) out: bool,
    /// Several ops.
    pub(crate) multi: bool,
    /// A move root.
    pub(crate) moves: bool,
    /// Symlinks followed.
    pub(crate) follow: bool,
    /// A size limit.
    pub(crate) limit: bool,
}

impl JobBatch {
    /// The version a batch is sent as: `VERSION_LIMIT` with a size limit, else
    /// `VERSION_FOLLOW` with symlinks followed, else
    /// `VERSION_MOVE` with a directory inputs are moved to (which several ops never have), else
    /// `VERSION_MULTI` with several ops, else `VERSION_OUT` with an output root or inputs
    /// removed, else `VERSION`. A single op keeps the version
    /// it always had, so workers from before several results still take those jobs.
    pub(crate) fn version(asks: Asks) -> u32 {
        let Asks {
            out,
            multi,
            moves,
            follow,
            limit,
        } = asks;
        if limit {
            VERSION_LIMIT
        } else if follow {
            VERSION_FOLLOW
        } else if moves {
            VERSION_MOVE
        } else if multi {
            VERSION_MULTI
        } else if out {
            VERSION_OUT
        } else {
            VERSION
        }
    }

    /// The ops a batch sends for `spec`: `op` and, with several results, `ops`.
    pub(crate) fn ops_of(spec: &OpSpec) -> (OpKind, Vec<OpKind>) {
        let ops = if spec.is_multi() {
            spec.kinds()
        } else {
            Vec::new()
        };
        (spec.primary(), ops)
    }

    /// What the batch asks for: `op` alone, or its several ops. `Err` if they are not a run's
    /// (an unknown op does not even parse): a second compressor, an op twice, a list of one,
    /// or one whose deciding op is not `op`.
    pub(crate) fn spec(&self) -> Result<OpSpec, String> {
        if self.ops.is_empty() {
            return Ok(OpSpec::single(self.op));
        }
        let spec = OpSpec::of_kinds(&self.ops).map_err(|e| format!("ops: {e}"))?;
        if !spec.is_multi() {
            return Err("ops: a list of one op (a single op goes in op)".into());
        }
        if spec.primary() != self.op {
            return Err(format!(
                "ops {spec} decide by {}, and op says {}",
                spec.primary().as_str(),
                self.op.as_str()
            ));
        }
        Ok(spec)
    }

    /// The format the batch came in: outcomes of its files go back in the same.
    pub(crate) fn format(&self) -> Format {
        if self.v == u32::from(VERSION_BINARY) {
            Format::Binary
        } else {
            Format::Json
        }
    }

    /// Reads a JSON job message (versions 1-3); `parse` (in `wire4`) tells the formats apart
    /// and checks what either says.
    pub(super) fn parse_json(payload: &[u8]) -> Result<JobBatch, String> {
        let b: JobBatch = serde_json::from_slice(payload).map_err(|e| in_part(&e.to_string()))?;
        if b.v != b.wire_version() {
            return Err(format!(
                "version {}, this worker reads {VERSION}, {VERSION_OUT} with an output root \
                 or --remove-source, {VERSION_MULTI} with several ops, {VERSION_MOVE} with \
                 --move-source or --move-failed, {VERSION_FOLLOW} with --follow-symlinks, \
                 {VERSION_LIMIT} with --max-size, and binary messages of version 4",
                b.v
            ));
        }
        Ok(b)
    }

    /// The JSON version this batch's fields call for.
    fn wire_version(&self) -> u32 {
        JobBatch::version(Asks {
            out: self.out.is_some() || self.remove_source,
            multi: !self.ops.is_empty(),
            moves: self.move_source.is_some() || self.move_failed.is_some(),
            follow: self.follow_symlinks,
            limit: self.max_size.is_some(),
        })
    }

    /// Checks what a job message says, whatever its format.
    pub(super) fn check(&self) -> Result<(), String> {
        let b = self;
        let spec = b.spec()?;
        if b.remove_source && !b.op.compresses() {
            return Err(format!("remove_source with op {}", b.op.as_str()));
        }
        // As on the command line: an input may only go once its manifest lines are written,
        // which the coordinator does at the end.
        if b.remove_source && spec.is_multi() {
            return Err(format!("remove_source with several ops ({spec})"));
        }
        if !valid_name(&b.run) || !valid_name(&b.root) {
            return Err("a run or root name that is not a plain name".into());
        }
        if let Some(out) = &b.out {
            if !valid_name(out) || *out == b.root {
                return Err("an output root that is not a plain name other than the root".into());
            }
        }
        // As on the command line: a move is a removal from the tree (compressing single ops
        // only, never with remove_source), and done inputs and failed ones never share a
        // directory. A name is a plain name, never a path: a worker maps it, or refuses it.
        if b.move_source.is_some() && (!b.op.compresses() || spec.is_multi() || b.remove_source) {
            return Err(format!(
                "move_source with op {spec}{}",
                if b.remove_source {
                    " and remove_source"
                } else {
                    ""
                }
            ));
        }
        for name in b.move_source.iter().chain(&b.move_failed) {
            if !valid_name(name) || *name == b.root || Some(name) == b.out.as_ref() {
                return Err(
                    "a move root that is not a plain name other than the root and the output root"
                        .into(),
                );
            }
        }
        if b.move_source.is_some() && b.move_source == b.move_failed {
            return Err("move_source and move_failed name the same root".into());
        }
        // Each op's own range (gzip 1-9, zstd 1-19); a hash carries a level it does not use.
        if b.op.compresses() {
            b.op.level(Some(b.level))
                .map_err(|e| format!("level {e}"))?;
        }
        if let Some(f) = b.files.iter().find(|f| f.rel.wire_len() > MAX_WIRE_PATH) {
            return Err(format!(
                "a path of {} bytes (a coordinator sends none longer than PATH_MAX and a name)",
                f.rel.wire_len()
            ));
        }
        if b.files.is_empty() || b.files.len() > MAX_FILES {
            return Err(format!(
                "{} files (a coordinator sends 1 to {MAX_FILES})",
                b.files.len()
            ));
        }
        Ok(())
    }
}

/// How a message is written: workers answer a job in its own format, so a coordinator that
/// reads only JSON gets JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Format {
    /// JSON, versions 1 to 3: what every release reads.
    Json,
    /// Binary, version 4 (`wire4`): less CPU a file on both sides.
    Binary,
}

/// How a file ended, on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WireStatus {
    /// Processed and published.
    Done,
    /// Left alone, with the reason.
    Skipped,
    /// Could not be processed.
    Failed,
}

/// One file's outcome, on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireOutcome {
    /// The file, relative to the root.
    pub(crate) rel: WirePath,
    /// How it ended.
    pub(crate) status: WireStatus,
    /// Skipped or failed: the reason's kind (`Kind::as_str`); done: its note's (an input
    /// `--remove-source` kept), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<String>,
    /// Skipped or failed: the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<String>,
    /// The errno, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) errno: Option<i32>,
    /// Done: bytes read.
    #[serde(default)]
    pub(crate) bytes_in: u64,
    /// Done: bytes written.
    #[serde(default)]
    pub(crate) bytes_out: u64,
    /// Done, with one hash: the digest in hex (its algorithm is the run's one hash), as every
    /// coordinator reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) digest: Option<String>,
    /// Done, with several hashes (`ops`): every digest, named by its algorithm. Never with
    /// `digest`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) digests: Vec<WireDigest>,
    /// Done: how the input looked when the worker read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) read: Option<WireStamp>,
    /// Done, read from a version 4 message: the digests as their bytes (never with `digest`
    /// or `digests`, which are JSON's). Never written as JSON.
    #[serde(skip)]
    pub(crate) raw: Vec<Digest>,
}

/// One of a file's digests, named by its algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WireDigest {
    /// The hash (`sha256`, `sha512`, `blake3`).
    pub(crate) algo: OpKind,
    /// The digest in hex.
    pub(crate) hex: String,
}

/// The most digests an outcome may name: one per hash filepipe has.
const MAX_DIGESTS: usize = 3;

/// A batch of outcomes, from one worker's flush.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutcomeBatch {
    /// `VERSION`. Named digests (`WireOutcome::digests`) did not change it: a worker sends
    /// them only for a job of several ops, which only a coordinator that reads them sends.
    pub(crate) v: u32,
    /// The coordinator's run.
    pub(crate) run: String,
    /// Which worker (host and pid), for the logs.
    pub(crate) worker: String,
    /// The outcomes.
    pub(crate) outcomes: Vec<WireOutcome>,
}

impl OutcomeBatch {
    /// Reads a JSON outcome message (any version but 4: the caller takes only `VERSION` of
    /// JSON); `parse` (in `wire4`) tells the formats apart.
    pub(super) fn parse_json(payload: &[u8]) -> Result<OutcomeBatch, String> {
        let b: OutcomeBatch =
            serde_json::from_slice(payload).map_err(|e| in_part(&e.to_string()))?;
        // Version 4 is binary: no release writes it as JSON.
        if b.v == u32::from(VERSION_BINARY) {
            return Err("a JSON message saying version 4, which is binary".into());
        }
        Ok(b)
    }

    /// Whether the coordinator reads it: version 4, or JSON of `VERSION`.
    pub(crate) fn readable(&self) -> bool {
        self.v == VERSION || self.v == u32::from(VERSION_BINARY)
    }
}

/// An outcome message as it is written: `OutcomeBatch`'s fields, borrowed (as `JobBatchOut`).
#[derive(Debug, Serialize)]
pub(crate) struct OutcomeBatchOut<'a> {
    pub(crate) v: u32,
    pub(crate) run: &'a str,
    pub(crate) worker: &'a str,
    pub(crate) outcomes: &'a [WireOutcome],
}

/// `d` in lower-case hex, as `Digest::to_hex` has it, without its check for UTF-8 that is not
/// there (hex is ASCII): a digest per file of every outcome message.
fn hex_of(d: &Digest) -> String {
    let mut buf = [0; 128];
    std::str::from_utf8(d.hex_into(&mut buf)).map_or_else(|_| String::new(), str::to_owned)
}

impl WireOutcome {
    /// An outcome, for the wire.
    pub(crate) fn of(o: &Outcome) -> WireOutcome {
        let mut w = WireOutcome {
            rel: WirePath::of(o.rel()),
            status: WireStatus::Done,
            kind: None,
            message: None,
            errno: None,
            bytes_in: 0,
            bytes_out: 0,
            digest: None,
            digests: Vec::new(),
            read: None,
            raw: Vec::new(),
        };
        let why = |w: &mut WireOutcome, status, e: &FileError| {
            w.status = status;
            w.kind = Some(e.kind.as_str().to_owned());
            w.message = Some(e.message.clone());
            w.errno = e.errno;
        };
        match o {
            Outcome::Done { done, .. } => {
                w.bytes_in = done.bytes_in;
                w.bytes_out = done.bytes_out;
                // One digest unnamed, as coordinators from before several results read it
                // (the run has one hash, so it says which); several, each named.
                match &done.digests[..] {
                    [one] => w.digest = Some(hex_of(one)),
                    several => {
                        w.digests = several
                            .iter()
                            .map(|d| WireDigest {
                                algo: OpKind::from(d.algo()),
                                hex: hex_of(d),
                            })
                            .collect();
                    }
                }
                w.read = done.stamp.as_ref().map(WireStamp::of);
                if let Some(note) = &done.note {
                    why(&mut w, WireStatus::Done, note);
                }
            }
            Outcome::Skipped { reason, .. } => why(&mut w, WireStatus::Skipped, reason),
            Outcome::Failed { error, .. } => why(&mut w, WireStatus::Failed, error),
        }
        w
    }

    /// The digests of a done file, in the order of `hashes` (the run's): exactly one of each,
    /// or `Err`. One hash may come as `digest` (unnamed) or named; several come named.
    fn digests(&self, hashes: &[HashAlgo]) -> Result<Vec<Digest>, String> {
        if !self.raw.is_empty() {
            return self.raw_digests(hashes);
        }
        let named: Vec<(HashAlgo, &str)> = match (&self.digest, &self.digests[..], hashes) {
            (Some(_), [_, ..], _) => return Err("both digest and digests".into()),
            (Some(hex), [], [algo]) => vec![(*algo, hex.as_str())],
            (Some(_), [], _) => {
                return Err(format!(
                    "one unnamed digest, and the run has {} hashes",
                    hashes.len()
                ))
            }
            (None, listed, _) => {
                if listed.len() > MAX_DIGESTS {
                    return Err(format!("{} digests", listed.len()));
                }
                listed
                    .iter()
                    .map(|d| match d.algo.hash() {
                        Some(algo) => Ok((algo, d.hex.as_str())),
                        None => Err(format!("a digest named {}", d.algo.as_str())),
                    })
                    .collect::<Result<_, String>>()?
            }
        };
        let mut digests = Vec::with_capacity(hashes.len());
        for &algo in hashes {
            let mut of_algo = named.iter().filter(|(a, _)| *a == algo);
            let (Some((_, hex)), None) = (of_algo.next(), of_algo.next()) else {
                return Err(format!("not exactly one {algo} digest"));
            };
            let d = Digest::from_hex(algo, hex.as_bytes()).ok_or_else(|| {
                // Said in part: a hostile one may be most of a megabyte.
                let start: String = hex.chars().take(2 * algo.hex_len()).collect();
                format!("not a {algo} digest: {start:?}")
            })?;
            digests.push(d);
        }
        if named.len() != hashes.len() {
            return Err("a digest of a hash the run does not compute".into());
        }
        Ok(digests)
    }

    /// `digests` for a version 4 outcome, whose digests came as bytes of their algorithm's
    /// length: exactly one of each of `hashes`, none other, in `hashes`' order.
    fn raw_digests(&self, hashes: &[HashAlgo]) -> Result<Vec<Digest>, String> {
        if self.digest.is_some() || !self.digests.is_empty() {
            return Err("digests both as bytes and as hex".into());
        }
        if self.raw.len() != hashes.len() {
            return Err(format!(
                "{} digests, and the run has {} hashes",
                self.raw.len(),
                hashes.len()
            ));
        }
        let mut digests = Vec::with_capacity(hashes.len());
        for &algo in hashes {
            let mut of_algo = self.raw.iter().filter(|d| d.algo() == algo);
            let (Some(d), None) = (of_algo.next(), of_algo.next()) else {
                return Err(format!("not exactly one {algo} digest"));
            };
            digests.push(*d);
        }
        Ok(digests)
    }

    /// The outcome it stands for, in a run that computes `hashes` (in their order, which the
    /// digests take); `Err` if it does not read back (an unknown kind; a done file without
    /// exactly one well-formed digest of each of `hashes`, or with another; a digest on a file
    /// not done).
    pub(crate) fn outcome(&self, hashes: &[HashAlgo]) -> Result<Outcome, String> {
        let rel = self.rel.rel().map_err(|e| e.message)?;
        let error = || -> Result<FileError, String> {
            let kind = self.kind.as_deref().unwrap_or("");
            let kind = Kind::parse(kind)
                .ok_or_else(|| format!("unknown kind {}", in_part(&format!("{kind:?}"))))?;
            Ok(FileError {
                kind,
                errno: self.errno,
                message: self.message.clone().unwrap_or_default(),
            })
        };
        let any_digest = self.digest.is_some() || !self.digests.is_empty() || !self.raw.is_empty();
        if self.status != WireStatus::Done && any_digest {
            return Err("a digest of a file not done".into());
        }
        Ok(match self.status {
            WireStatus::Done => {
                let digests = self.digests(hashes)?;
                Outcome::Done {
                    rel,
                    done: Box::new(Done {
                        bytes_in: self.bytes_in,
                        bytes_out: self.bytes_out,
                        digests,
                        note: self.kind.is_some().then(error).transpose()?,
                        stamp: None,
                        unchanged: false,
                        only: None,
                    }),
                }
            }
            WireStatus::Skipped => Outcome::Skipped {
                rel,
                reason: error()?,
            },
            WireStatus::Failed => Outcome::Failed {
                rel,
                error: error()?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_message_s_error_is_said_in_part() {
        let op = "x".repeat(1 << 19);
        let job = format!(
            r#"{{"v":3,"op":"zstd","ops":["sha256","{op}","zstd"],"run":"r","root":"t","level":3,"force":false,"files":[{{"rel":"a","size":1}}]}}"#
        );
        let e = JobBatch::parse(job.as_bytes()).unwrap_err();
        assert!(e.len() < 1024, "{} bytes", e.len());
        assert!(e.starts_with("unknown variant `xxx"), "{e}");
        assert!(e.contains("bytes in all"), "{e}");
        // A short one is said whole.
        let e = JobBatch::parse(br#"{"v":3,"op":"md5"}"#).unwrap_err();
        assert!(
            e.contains("unknown variant `md5`") && !e.contains("in all"),
            "{e}"
        );
        // Cut between characters, never inside one.
        let long = "\u{e9}".repeat(1000);
        assert!(in_part(&long).starts_with(&"\u{e9}".repeat(SAID)));
        let kind = WireOutcome {
            rel: WirePath::Text("a".into()),
            status: WireStatus::Failed,
            kind: Some("k".repeat(1 << 19)),
            message: None,
            errno: None,
            bytes_in: 0,
            bytes_out: 0,
            digest: None,
            digests: Vec::new(),
            read: None,
            raw: Vec::new(),
        };
        let e = kind.outcome(&[]).unwrap_err();
        assert!(e.len() < 1024 && e.starts_with("unknown kind"), "{e}");
    }

    #[test]
    fn a_job_path_must_be_plain_and_relative() {
        for ok in ["a", "a/b.log", "x y/ü.txt", "..a/b..", ".hidden"] {
            let p = WirePath::Text(ok.into());
            assert_eq!(p.rel().unwrap(), Path::new(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "./a",
            "a/./b",
            "a\0b",
            "/",
            "a//b",
            "a/",
            "a/.",
        ] {
            let p = WirePath::Text(bad.into());
            let refused = p.rel().expect_err(bad);
            // An input's name, refused as such: never an output's reason.
            assert_eq!(refused.kind, Kind::UnsafeJobPath, "{bad:?}");
        }
        let long = WirePath::Text("a/".repeat(3000));
        assert!(long.rel().is_err());
        // Not UTF-8: round-trips through hex.
        let raw = Path::new(OsStr::from_bytes(b"caf\xe9/x"));
        let w = WirePath::of(raw);
        assert!(matches!(w, WirePath::Bytes { .. }));
        assert_eq!(w.rel().unwrap(), raw);
        let json = serde_json::to_string(&w).unwrap();
        let back: WirePath = serde_json::from_str(&json).unwrap();
        assert_eq!(back.rel().unwrap(), raw);
        for hex in ["zz", "2f6574632f706173737764", "0"] {
            // "/etc/passwd" in hex is refused too.
            assert!(WirePath::Bytes { hex: hex.into() }.rel().is_err(), "{hex}");
        }
    }

    #[test]
    fn a_path_reads_as_the_untagged_enum_read_it() {
        let read = |json: &str| serde_json::from_str::<WirePath>(json);
        assert_eq!(read(r#""a/b""#).unwrap(), WirePath::Text("a/b".into()));
        assert_eq!(read(r#""a\u002fb""#).unwrap(), WirePath::Text("a/b".into()));
        let hex = WirePath::Bytes { hex: "6162".into() };
        assert_eq!(read(r#"{"hex":"6162"}"#).unwrap(), hex);
        // An escaped key is the same key; other keys are ignored, as before.
        assert_eq!(read(r#"{"h\u0065x":"6162"}"#).unwrap(), hex);
        assert_eq!(read(r#"{"x":[1,{}],"hex":"6162"}"#).unwrap(), hex);
        for bad in [
            r#"{}"#,
            r#"{"hex":1}"#,
            r#"{"hex":"61","hex":"62"}"#,
            "1",
            "[]",
            "null",
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_job_message_written_borrowed_reads_back_whole() {
        let files = vec![
            WireFile {
                rel: WirePath::Text("a \"b\"/\u{e9}".into()),
                size: 0,
                stamp: Some(WireStamp {
                    size: 3,
                    mtime_ns: -4,
                }),
                replace: true,
            },
            WireFile {
                rel: WirePath::of(Path::new(OsStr::from_bytes(b"caf\xe9"))),
                size: 9,
                stamp: None,
                replace: false,
            },
        ];
        let ops = [OpKind::Sha256, OpKind::Zstd];
        let json = serde_json::to_vec(&JobBatchOut {
            v: VERSION_MULTI,
            run: "r1",
            root: "in",
            op: OpKind::Zstd,
            level: 3,
            force: true,
            files: &files,
            out: Some("o"),
            remove_source: false,
            ops: &ops,
            move_source: None,
            move_failed: None,
            follow_symlinks: false,
            max_size: None,
        })
        .unwrap();
        let b = JobBatch::parse(&json).unwrap();
        assert_eq!(
            (b.run.as_str(), b.root.as_str(), b.out.as_deref()),
            ("r1", "in", Some("o"))
        );
        assert_eq!(
            (b.op, b.ops.as_slice(), b.level, b.force),
            (OpKind::Zstd, &ops[..], 3, true)
        );
        assert_eq!(format!("{:?}", b.files), format!("{files:?}"));
        // Fields a message without them leaves out, as before.
        let plain = serde_json::to_string(&JobBatchOut {
            v: VERSION,
            run: "r1",
            root: "in",
            op: OpKind::Gzip,
            level: 6,
            force: false,
            files: &files[..1],
            out: None,
            remove_source: false,
            ops: &[],
            move_source: None,
            move_failed: None,
            follow_symlinks: false,
            max_size: None,
        })
        .unwrap();
        assert!(JobBatch::parse(plain.as_bytes()).is_ok(), "{plain}");
        assert!(
            !plain.contains("\"out\"")
                && !plain.contains("\"ops\"")
                && !plain.contains("remove_source"),
            "{plain}"
        );
    }

    #[test]
    fn a_job_message_is_checked_before_anything_is_done() {
        let good = r#"{"v":1,"run":"r1","root":"in","op":"gzip","level":6,"force":false,
            "files":[{"rel":"a","size":1}]}"#;
        assert!(JobBatch::parse(good.as_bytes()).is_ok());
        for op in ["sha256", "sha512", "blake3"] {
            let hash = good.replace("\"gzip\"", &format!("{op:?}"));
            assert!(JobBatch::parse(hash.as_bytes()).is_ok(), "{op}");
        }
        let zstd = good.replace(r#""gzip","level":6"#, r#""zstd","level":19"#);
        assert!(JobBatch::parse(zstd.as_bytes()).is_ok());
        for bad in [
            good.replace("\"v\":1", "\"v\":2"),
            good.replace("\"r1\"", "\"r.1\""),
            good.replace("\"in\"", "\"../in\""),
            good.replace("\"gzip\"", "\"rm\""),
            good.replace("\"level\":6", "\"level\":10"),
            good.replace("\"level\":6", "\"level\":0"),
            good.replace(r#""gzip","level":6"#, r#""zstd","level":20"#),
            good.replace(r#"{"rel":"a","size":1}"#, ""),
            "not json".into(),
            format!("{{\"pad\":\"{}\"}}", "x".repeat(MAX_MESSAGE)),
        ] {
            assert!(JobBatch::parse(bad.as_bytes()).is_err(), "{bad:.80}");
        }
    }

    #[test]
    fn a_job_message_that_moves_its_inputs_is_a_version_of_its_own_and_names_plain_roots() {
        let good = r#"{"v":5,"run":"r1","root":"in","op":"gzip","level":6,"force":false,
            "files":[{"rel":"a","size":1}],"move_source":"done","move_failed":"bad"}"#;
        let b = JobBatch::parse(good.as_bytes()).unwrap();
        assert_eq!(
            (b.move_source.as_deref(), b.move_failed.as_deref()),
            (Some("done"), Some("bad"))
        );
        for bad in [
            // A worker of version 2 or 3 would read it and leave the inputs in the tree.
            good.replace("\"v\":5", "\"v\":2"),
            good.replace("\"v\":5", "\"v\":1"),
            good.replace("\"done\"", "\"..\""),
            good.replace("\"done\"", "\"/etc\""),
            good.replace("\"bad\"", "\"../x\""),
            good.replace("\"done\"", "\"in\""),
            good.replace("\"done\"", "\"bad\""),
            good.replace(r#""gzip","level":6"#, r#""sha256","level":6"#),
            good.replace("\"force\":false", "\"force\":false,\"remove_source\":true"),
        ] {
            assert!(JobBatch::parse(bad.as_bytes()).is_err(), "{bad:.200}");
        }
        // Without them, a message is the version it always was.
        let plain = good
            .replace("\"v\":5", "\"v\":1")
            .replace(r#","move_source":"done","move_failed":"bad""#, "");
        assert!(JobBatch::parse(plain.as_bytes()).is_ok(), "{plain}");
    }

    #[test]
    fn a_job_message_with_several_ops_is_checked_as_op_is_on_the_command_line() {
        let good = r#"{"v":3,"run":"r1","root":"in","op":"zstd","level":19,"force":false,
            "files":[{"rel":"a","size":1}],"ops":["sha256","blake3","zstd"]}"#;
        let b = JobBatch::parse(good.as_bytes()).unwrap();
        let spec = b.spec().unwrap();
        assert_eq!(spec.canonical(), "sha256,blake3,zstd");
        assert_eq!(spec, "sha256,blake3,zstd".parse().unwrap());
        // What a coordinator sends reads back as its own spec.
        for op in [
            "sha256,zstd",
            "blake3,sha512",
            "sha256,sha512,blake3,gzip",
            "gzip",
        ] {
            let spec: OpSpec = op.parse().unwrap();
            let (op, ops) = JobBatch::ops_of(&spec);
            let b = JobBatch {
                v: JobBatch::version(Asks {
                    multi: !ops.is_empty(),
                    ..Asks::default()
                }),
                run: "r".into(),
                root: "in".into(),
                op,
                ops,
                level: op.default_level(),
                force: false,
                files: vec![WireFile {
                    rel: WirePath::Text("a".into()),
                    size: 0,
                    stamp: None,
                    replace: false,
                }],
                out: None,
                remove_source: false,
                move_source: None,
                move_failed: None,
                follow_symlinks: false,
                max_size: None,
            };
            let read = JobBatch::parse(&serde_json::to_vec(&b).unwrap()).unwrap();
            assert_eq!(read.spec().unwrap(), spec);
        }
        let two_hashes = good
            .replace(r#""op":"zstd","level":19"#, r#""op":"sha256","level":6"#)
            .replace(r#","zstd"]"#, "]");
        assert!(JobBatch::parse(two_hashes.as_bytes()).is_ok());
        let with_out = good.replace(r#""force":false"#, r#""force":false,"out":"o""#);
        assert!(JobBatch::parse(with_out.as_bytes()).is_ok());
        for (bad, why) in [
            (good.replace(r#""blake3""#, r#""md5""#), "unknown variant"),
            (
                good.replace(r#""blake3""#, r#""gzip""#),
                "at most one compressor",
            ),
            (good.replace(r#""blake3""#, r#""sha256""#), "given twice"),
            (good.replace(r#""blake3""#, r#""zstd""#), "given twice"),
            (good.replace(r#""sha256","blake3","#, ""), "a list of one"),
            (
                good.replace(r#"["sha256","blake3","zstd"]"#, "[]"),
                "version 3",
            ),
            (good.replace(r#""v":3"#, r#""v":2"#), "version 2"),
            (good.replace(r#""v":3"#, r#""v":1"#), "version 1"),
            (
                good.replace(r#""op":"zstd""#, r#""op":"gzip""#),
                "op says gzip",
            ),
            (
                good.replace(r#""op":"zstd""#, r#""op":"sha256""#),
                "op says sha256",
            ),
            (good.replace(r#""level":19"#, r#""level":20"#), "level"),
            (
                good.replace(r#""force":false"#, r#""force":false,"remove_source":true"#),
                "remove_source",
            ),
            (good.replace(r#""zstd"]"#, r#""zstd",42]"#), "expected"),
            (good.replace(r#"["sha256""#, r#""sha256""#), "expected"),
        ] {
            let e = JobBatch::parse(bad.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{bad:.200}: {e}");
        }
    }

    #[test]
    fn a_message_takes_as_many_items_as_fit_and_at_least_one() {
        let encode = |part: &[String]| serde_json::to_vec(part);
        let small: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        assert_eq!(fitting(&small, 64, encode).unwrap().0, 64);
        assert_eq!(fitting(&small[..3], 64, encode).unwrap().0, 3);
        // 10 items of 300 KiB: three fit under the limit, halving from 10 gives two.
        let big = vec!["x".repeat(300 << 10); 10];
        let (n, payload) = fitting(&big, usize::MAX, encode).unwrap();
        assert_eq!(n, 2);
        assert!(payload.len() <= MAX_PAYLOAD);
        // One item too large alone still goes (the caller's limits keep that from happening).
        let huge = vec!["x".repeat(2 << 20)];
        assert_eq!(fitting(&huge, 64, encode).unwrap().0, 1);
    }

    #[test]
    fn outcomes_read_back_as_they_were() {
        let done = Outcome::Done {
            rel: "a/b".into(),
            done: Box::new(Done {
                bytes_in: 10,
                bytes_out: 4,
                digests: vec![Digest::new(HashAlgo::Sha512, &[7; 64]).unwrap()],
                ..Done::default()
            }),
        };
        let failed = Outcome::Failed {
            rel: "c".into(),
            error: FileError {
                kind: Kind::NoSpace,
                errno: Some(28),
                message: "writing: no space".into(),
            },
        };
        for o in [done, failed] {
            let json = serde_json::to_string(&WireOutcome::of(&o)).unwrap();
            let back: WireOutcome = serde_json::from_str(&json).unwrap();
            let read = back.outcome(&[HashAlgo::Sha512]).unwrap();
            assert_eq!(format!("{read:?}"), format!("{o:?}"));
            if matches!(o, Outcome::Done { .. }) {
                // One unnamed digest, as before several results: what every coordinator reads.
                assert!(json.contains("\"digest\":") && !json.contains("\"digests\""));
                // The digest is the run's algorithm's, or the outcome is refused.
                assert!(back.outcome(&[HashAlgo::Sha256]).is_err());
                assert!(back.outcome(&[]).is_err());
            }
        }
        let mut w = WireOutcome::of(&Outcome::Skipped {
            rel: "x".into(),
            reason: FileError::new(Kind::UpToDate, "up to date"),
        });
        w.kind = Some("made-up".into());
        assert!(w.outcome(&[]).is_err());
    }

    fn digest_of(algo: HashAlgo, byte: u8) -> Digest {
        Digest::new(algo, &vec![byte; algo.len()]).unwrap()
    }

    #[test]
    fn several_digests_travel_named_and_read_back_in_the_run_s_order_or_not_at_all() {
        let (sha256, blake3) = (
            digest_of(HashAlgo::Sha256, 1),
            digest_of(HashAlgo::Blake3, 2),
        );
        let done = |digests: Vec<Digest>| Outcome::Done {
            rel: "a".into(),
            done: Box::new(Done {
                bytes_in: 3,
                bytes_out: 2,
                digests,
                note: Some(FileError::new(Kind::AlreadyCompressed, "a .gz")),
                ..Done::default()
            }),
        };
        let sent = WireOutcome::of(&done(vec![blake3, sha256]));
        let json = serde_json::to_string(&sent).unwrap();
        assert!(json.contains(r#"{"algo":"blake3","hex":"0202"#), "{json}");
        let back: WireOutcome = serde_json::from_str(&json).unwrap();
        // In the order of the run's hashes, whatever order they came in.
        let run = [HashAlgo::Sha256, HashAlgo::Blake3];
        let read = back.outcome(&run).unwrap();
        assert_eq!(
            format!("{read:?}"),
            format!("{:?}", done(vec![sha256, blake3]))
        );
        // Exactly the run's hashes: not fewer, not others, not one twice.
        for hashes in [
            &[HashAlgo::Sha256][..],
            &[HashAlgo::Sha256, HashAlgo::Blake3, HashAlgo::Sha512],
            &[HashAlgo::Sha256, HashAlgo::Sha512],
            &[],
        ] {
            assert!(back.outcome(hashes).is_err(), "{hashes:?}");
        }
        let bad = |change: &dyn Fn(&mut WireOutcome)| {
            let mut w = sent.clone();
            change(&mut w);
            w.outcome(&run)
        };
        let hex = |w: &mut WireOutcome, i: usize, hex: String| w.digests[i].hex = hex;
        for (what, change) in [
            (
                "one twice",
                &(|w: &mut WireOutcome| w.digests[0] = w.digests[1].clone())
                    as &dyn Fn(&mut WireOutcome),
            ),
            ("one left out", &|w| {
                w.digests.pop();
            }),
            ("another's", &|w| w.digests[0].algo = OpKind::Sha512),
            ("a compressor's", &|w| w.digests[0].algo = OpKind::Zstd),
            ("too short", &|w| hex(w, 0, "02".repeat(31))),
            ("too long", &|w| hex(w, 1, "01".repeat(33))),
            ("not hex", &|w| hex(w, 1, "zz".repeat(32))),
            ("SHA-512's length", &|w| hex(w, 1, "01".repeat(64))),
            ("also unnamed", &|w| w.digest = Some("01".repeat(32))),
            ("more than there are hashes", &|w| {
                let more = w.digests.clone();
                w.digests.extend(more);
            }),
            ("on a failed file", &|w| {
                w.status = WireStatus::Failed;
                w.kind = Some("io".into());
            }),
        ] {
            assert!(bad(change).is_err(), "{what}");
        }
        // Unnamed, one digest stands for a run's only hash, never for several.
        let mut unnamed = sent.clone();
        unnamed.digests.clear();
        unnamed.digest = Some("01".repeat(32));
        assert!(unnamed.outcome(&[HashAlgo::Sha256]).is_ok());
        assert!(unnamed.outcome(&run).is_err());
        // And a lone hash may come named too.
        let mut named = sent.clone();
        named.digests.remove(0);
        assert!(named.outcome(&[HashAlgo::Sha256]).is_ok());
    }
}
