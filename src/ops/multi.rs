//! Several results from one read (`--op sha256,zstd`): a compressor's output and any number of
//! hashes of each input, every byte read once and fed, as it is read, to every hasher and to
//! the compressor (`hash::Tee` under `compress::CompressOp::read_hashing`).
//!
//! The manifests describe the inputs: every input is hashed and listed, also when the
//! compressor leaves it alone (already compressed, or its output up to date: read for the
//! hashes anyway). Such a file is done, its reason a note (`"status":"hashed"` in the failure
//! log), its output untouched. A name of the compressor's own outputs next to the inputs
//! (`x.zst` with `--op sha256,zstd`) is not an input at all: skipped as the compressor alone
//! skips it, so a rerun's manifest lists what the first run's did, not the first run's outputs.
//!
//! One file is one outcome: done with every result, or failed (or skipped) with none. A file
//! whose compressor fails (an output in the way that is not filepipe's, a full disk) fails
//! whole and is left out of the manifests, as any failed file is; a torn read (the input
//! changed while read) drops every result together, and the file is read again.

use std::io::Read;

use crate::digest::{Digest, HashAlgo};
use crate::error::{FileError, Kind};
use crate::fsio::input::InputFile;
use crate::ops::compress::{self, Codec, CompressOp};
use crate::ops::hash::{hash_all, Hasher, BUF_SIZE};
use crate::ops::{Done, Op};
use crate::travel::{Job, Only};

/// A compressor and the hashes computed from the same read.
#[derive(Debug)]
pub(crate) struct MultiOp<C: Codec> {
    comp: CompressOp<C>,
    /// The hashes, in the order `--op` names them (each file's digests come in this order).
    hashes: Vec<HashAlgo>,
    /// The canonical name (`sha256,zstd`), for logs.
    name: &'static str,
}

/// Per-worker state.
#[derive(Debug)]
pub(crate) struct Scratch<S> {
    /// The compressor's.
    comp: compress::Scratch<S>,
    /// Reads of a file only hashed.
    buf: Vec<u8>,
    /// The compressor leaves the file being worked on alone (set by `check`, for `read`):
    /// `Some(Some(why))` by its own decision, `Some(None)` because its output is recorded and
    /// in place (`Job::only`).
    hash_only: Option<Option<FileError>>,
}

/// A file read, waiting for the input check and the publish.
#[derive(Debug)]
pub(crate) enum Pending {
    /// Compressed (a temp to publish) and hashed.
    Compressed {
        /// The compressor's pending output.
        output: compress::Pending,
        /// The digests, in the order of `MultiOp::hashes`.
        digests: Vec<Digest>,
    },
    /// Hashed only: the compressor leaves it alone, for this reason (none: its output is
    /// recorded and in place, and only hashes were missing).
    Hashed {
        /// The digests.
        digests: Vec<Digest>,
        /// Why it was not compressed.
        why: Option<FileError>,
    },
}

impl<C: Codec> MultiOp<C> {
    /// The compressor `comp` with `hashes` (at least one) computed from the same read.
    pub(crate) fn new(comp: CompressOp<C>, hashes: &[HashAlgo], name: &'static str) -> Self {
        MultiOp {
            comp,
            hashes: hashes.to_vec(),
            name,
        }
    }

    /// The done file of a compressor's result `r` with `digests`. An output found up to date
    /// at the publish (an identical one published meanwhile) is this input's: the file is
    /// hashed, its output in place, as if `check` had found it.
    fn join(
        r: Result<Done, FileError>,
        input: &InputFile,
        digests: Vec<Digest>,
    ) -> Result<Done, FileError> {
        match r {
            Ok(done) => Ok(Done { digests, ..done }),
            Err(e) if e.kind == Kind::UpToDate => Ok(Done {
                bytes_in: input.size(),
                digests,
                note: Some(e),
                ..Done::default()
            }),
            Err(e) => Err(e),
        }
    }
}

impl<C: Codec> Op for MultiOp<C> {
    type Scratch = Scratch<C::Scratch>;
    type Pending = Pending;
    const DEFER_PUBLISH: bool = true;

    fn name(&self) -> &'static str {
        self.name
    }

    fn scratch(&self) -> Self::Scratch {
        Scratch {
            comp: self.comp.scratch(),
            buf: vec![0; BUF_SIZE],
            hash_only: None,
        }
    }

    fn check(
        &self,
        job: &Job,
        input: &InputFile,
        scratch: &mut Self::Scratch,
    ) -> Result<Option<FileError>, FileError> {
        scratch.hash_only = None;
        // One of this run's own outputs (or a rerun's), its input beside it: not an input,
        // also when the state has some of its results (recorded while its input was away:
        // found by review, such a file was read for a hash added to the pipeline, and
        // listed). A `.zst` alone is a user's file (a backup, or what --remove-source left):
        // listed.
        if self.comp.own_output_name(job) && self.comp.input_beside(job) {
            if let Some(reason) = self.comp.skipped_by_name(job) {
                return Ok(Some(reason));
            }
        }
        if job.only.as_ref().is_some_and(|o| !o.compress) {
            // Its output is recorded for this very input and was found in place: only hashes
            // are missing, and the compressor is not asked (it would find the output up to
            // date, or, replaced by `--force`, redo it).
            scratch.hash_only = Some(None);
            return Ok(None);
        }
        match self.comp.check(job, input, &mut scratch.comp)? {
            None => Ok(None),
            // Left alone by the compressor, but an input all the same: hashed.
            Some(reason) => {
                scratch.hash_only = Some(Some(reason));
                Ok(None)
            }
        }
    }

    fn read(
        &self,
        job: &Job,
        input: &mut InputFile,
        scratch: &mut Self::Scratch,
    ) -> Result<Pending, FileError> {
        // A file with some results recorded (`Job::only`) is read for the others alone.
        let hashes = Only::hashes_of(job.only.as_deref(), &self.hashes);
        // Kept in the scratch (cloned, not taken): a torn read is read again.
        if let Some(why) = scratch.hash_only.clone() {
            let size = input.size();
            let digests = hash_all(hashes, &mut (&mut *input).take(size), &mut scratch.buf)
                .map_err(|e| FileError::io("reading input", &e))?;
            return Ok(Pending::Hashed { digests, why });
        }
        let mut hashers: Vec<Hasher> = hashes.iter().map(|&a| Hasher::new(a)).collect();
        let output = self
            .comp
            .read_hashing(job, input, &mut scratch.comp, &mut hashers)?;
        Ok(Pending::Compressed {
            output,
            digests: hashers.into_iter().map(Hasher::finalize).collect(),
        })
    }

    fn publish(&self, job: &Job, input: &InputFile, pending: Pending) -> Result<Done, FileError> {
        crate::ops::publish_alone(self, job, input, pending)
    }

    /// The compressed files are published as the compressor alone publishes them (one group,
    /// sharing its flushes); each is done, with its digests, only once its output is durable.
    /// A file only hashed has nothing to publish.
    fn publish_group(
        &self,
        group: Vec<(&Job, &InputFile, Pending)>,
    ) -> Vec<Result<Done, FileError>> {
        let mut results: Vec<Option<Result<Done, FileError>>> = Vec::with_capacity(group.len());
        let mut compressed = Vec::new();
        let mut waiting = Vec::new();
        for (job, input, pending) in group {
            match pending {
                Pending::Hashed { digests, why } => results.push(Some(Ok(Done {
                    bytes_in: input.size(),
                    digests,
                    note: why,
                    ..Done::default()
                }))),
                Pending::Compressed { output, digests } => {
                    waiting.push((results.len(), input, digests));
                    compressed.push((job, input, output));
                    results.push(None);
                }
            }
        }
        let published = self.comp.publish_group(compressed);
        for ((slot, input, digests), r) in waiting.into_iter().zip(published) {
            results[slot] = Some(Self::join(r, input, digests));
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(FileError::new(Kind::Internal, "publish lost its file")))
            })
            .collect()
    }
}
