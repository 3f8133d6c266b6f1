//! What travels through the queue: batches of jobs from a coordinator to the workers, batches
//! of outcomes back. JSON with a version; a job message is untrusted input (anyone allowed to
//! publish to the stream can write one), so everything a worker acts on is checked here: the
//! run and root names are plain tokens, the level is in range, the message is bounded, and a
//! file's path must be relative with plain components only. A bad path fails its file alone.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cli::OpKind;
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
const MAX_FILES: usize = 1024;

/// The longest path a job may name (PATH_MAX).
const MAX_PATH: usize = 4096;

/// The first message of `items`: as many of the first `most` as fit in `MAX_PAYLOAD` once
/// `encode`d (halving until they do: JSON escapes long names to six bytes a character), or
/// the first alone. Returns how many it holds, and its payload.
pub(crate) fn fitting<T>(
    items: &[T],
    most: usize,
    encode: impl Fn(&[T]) -> serde_json::Result<Vec<u8>>,
) -> serde_json::Result<(usize, Vec<u8>)> {
    let mut n = items.len().min(most).max(1);
    loop {
        let payload = encode(&items[..n])?;
        if payload.len() <= MAX_PAYLOAD || n == 1 {
            return Ok((n, payload));
        }
        n /= 2;
    }
}

/// Whether `s` is a name a run or a root may have: 1 to 64 of `A-Z a-z 0-9 _ -`. Such names
/// are also safe as NATS subject tokens.
pub(crate) fn valid_name(s: &str) -> bool {
    crate::config::valid_root_name(s)
}

/// A path relative to a root, as bytes: a string when it is UTF-8, else hex (file names need
/// not be UTF-8, JSON strings must be).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

    /// The path's bytes, or `None` if the hex is not hex.
    fn bytes(&self) -> Option<Vec<u8>> {
        match self {
            WirePath::Text(s) => Some(s.as_bytes().to_vec()),
            WirePath::Bytes { hex } => {
                if hex.len() % 2 != 0 || hex.len() > 2 * MAX_PATH {
                    return None;
                }
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                    .collect()
            }
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
                Kind::UnsafeOutputPath,
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
    /// `VERSION`.
    pub(crate) v: u32,
    /// The coordinator's run: outcomes go to its subject.
    pub(crate) run: String,
    /// The root's name; each worker maps it to its own mount point (`--root NAME=PATH`).
    pub(crate) root: String,
    /// The operation.
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
}

/// The version of a job message that names an output root or asks for its inputs removed:
/// what a worker from before them would ignore.
pub(crate) const VERSION_OUT: u32 = 2;

impl JobBatch {
    /// The version a batch is sent as: `VERSION`, or `VERSION_OUT` with an output root or
    /// `remove_source`.
    pub(crate) fn version(out: Option<&str>, remove_source: bool) -> u32 {
        if out.is_some() || remove_source {
            VERSION_OUT
        } else {
            VERSION
        }
    }

    /// Reads and checks a job message (files are checked one by one, later: see
    /// `WirePath::rel`).
    pub(crate) fn parse(payload: &[u8]) -> Result<JobBatch, String> {
        if payload.len() > MAX_MESSAGE {
            return Err(format!("{} bytes, more than {MAX_MESSAGE}", payload.len()));
        }
        let b: JobBatch = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        if b.v != JobBatch::version(b.out.as_deref(), b.remove_source) {
            return Err(format!(
                "version {}, this worker reads {VERSION}, and {VERSION_OUT} with an output root or --remove-source",
                b.v
            ));
        }
        if b.remove_source && !b.op.compresses() {
            return Err(format!("remove_source with op {}", b.op.as_str()));
        }
        if !valid_name(&b.run) || !valid_name(&b.root) {
            return Err("a run or root name that is not a plain name".into());
        }
        if let Some(out) = &b.out {
            if !valid_name(out) || *out == b.root {
                return Err("an output root that is not a plain name other than the root".into());
            }
        }
        // Each op's own range (gzip 1-9, zstd 1-19); a hash carries a level it does not use.
        if b.op.compresses() {
            b.op.level(Some(b.level))
                .map_err(|e| format!("level {e}"))?;
        }
        if b.files.is_empty() || b.files.len() > MAX_FILES {
            return Err(format!(
                "{} files (a coordinator sends 1 to {MAX_FILES})",
                b.files.len()
            ));
        }
        Ok(b)
    }
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
    /// Done, a hash: the digest in hex (its algorithm is the run's op).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) digest: Option<String>,
    /// Done: how the input looked when the worker read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) read: Option<WireStamp>,
}

/// A batch of outcomes, from one worker's flush.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutcomeBatch {
    /// `VERSION`.
    pub(crate) v: u32,
    /// The coordinator's run.
    pub(crate) run: String,
    /// Which worker (host and pid), for the logs.
    pub(crate) worker: String,
    /// The outcomes.
    pub(crate) outcomes: Vec<WireOutcome>,
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
            read: None,
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
                // One digest at most: a run with several results never reaches the queue
                // (`config::refuse_multi_in_cluster`).
                w.digest = done.digests.first().map(|d| d.to_hex());
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

    /// The outcome it stands for, in a run whose op computes `hash`; `Err` if it does not read
    /// back (an unknown kind, a digest that is not one of `hash`, or one where none belongs).
    pub(crate) fn outcome(&self, hash: Option<HashAlgo>) -> Result<Outcome, String> {
        let rel = self.rel.rel().map_err(|e| e.message)?;
        let error = || -> Result<FileError, String> {
            let kind = self.kind.as_deref().unwrap_or("");
            let kind = Kind::parse(kind).ok_or_else(|| format!("unknown kind {kind:?}"))?;
            Ok(FileError {
                kind,
                errno: self.errno,
                message: self.message.clone().unwrap_or_default(),
            })
        };
        Ok(match self.status {
            WireStatus::Done => {
                let digest = match (&self.digest, hash) {
                    (Some(hex), Some(algo)) => Some(
                        Digest::from_hex(algo, hex.as_bytes())
                            .ok_or_else(|| format!("not a {algo} digest: {hex:?}"))?,
                    ),
                    (Some(_), None) => return Err("a digest from an op that has none".into()),
                    (None, _) => None,
                };
                Outcome::Done {
                    rel,
                    done: Box::new(Done {
                        bytes_in: self.bytes_in,
                        bytes_out: self.bytes_out,
                        digests: digest.into_iter().collect(),
                        note: self.kind.is_some().then(error).transpose()?,
                        stamp: None,
                        unchanged: false,
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
            assert!(p.rel().is_err(), "{bad:?} accepted");
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
            let read = back.outcome(Some(HashAlgo::Sha512)).unwrap();
            assert_eq!(format!("{read:?}"), format!("{o:?}"));
            if matches!(o, Outcome::Done { .. }) {
                // The digest is the run's algorithm's, or the outcome is refused.
                assert!(back.outcome(Some(HashAlgo::Sha256)).is_err());
                assert!(back.outcome(None).is_err());
            }
        }
        let mut w = WireOutcome::of(&Outcome::Skipped {
            rel: "x".into(),
            reason: FileError::new(Kind::UpToDate, "up to date"),
        });
        w.kind = Some("made-up".into());
        assert!(w.outcome(None).is_err());
    }
}
