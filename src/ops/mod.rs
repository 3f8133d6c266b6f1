//! The operations a worker applies to one file, behind one small trait.
//!
//! The pipeline (`pipeline::prepare`, then `pipeline::publish`) owns the common protocol: open the input safely, let the op
//! decide whether to skip it, let it stream the input into a pending result, check the input did
//! not change while read (retrying if it did), and only then let the op publish. An op never
//! publishes anything derived from a torn read.

pub(crate) mod compress;
pub(crate) mod gzip;
pub(crate) mod gzstream;
pub(crate) mod hash;
pub(crate) mod multi;
pub(crate) mod zstd;

use crate::error::FileError;
use crate::fsio::input::InputFile;
pub(crate) use crate::travel::Done;
use crate::travel::Job;

/// `Op::publish` for an op whose own `publish_group` is where publishing happens: a group of
/// one.
pub(crate) fn publish_alone<O: Op + ?Sized>(
    op: &O,
    job: &Job,
    input: &InputFile,
    pending: O::Pending,
) -> Result<Done, FileError> {
    op.publish_group(vec![(job, input, pending)])
        .pop()
        .unwrap_or_else(|| {
            Err(FileError::new(
                crate::error::Kind::Internal,
                "publish lost its file",
            ))
        })
}

/// One file operation (gzip, zstd, a hash, ...). Adding an operation means implementing this.
pub(crate) trait Op: Sync {
    /// Per-worker reusable state: buffers, directory caches.
    type Scratch;
    /// A result computed from the input but not yet published (e.g. a temp file).
    type Pending: Send;

    /// True when `publish` waits on the disk (fsync): the pipeline then runs it on publisher
    /// threads, so workers keep computing while outputs are made durable.
    const DEFER_PUBLISH: bool = false;

    /// The name used in logs and the failure log.
    fn name(&self) -> &'static str;

    /// Fresh per-worker state.
    fn scratch(&self) -> Self::Scratch;

    /// Why this file is skipped by its name alone (a compressor's own output, an already
    /// compressed file), before it is even opened: no open, stat and close for each of the
    /// outputs a rerun finds next to their inputs. `None` (the default): opened and `check`ed.
    fn skipped_by_name(&self, _job: &Job) -> Option<FileError> {
        None
    }

    /// Decides, before reading, whether this file is skipped (`Ok(Some(reason))`), fails, or
    /// is processed (`Ok(None)`). Called with the input already opened and stat'ed.
    fn check(
        &self,
        job: &Job,
        input: &InputFile,
        scratch: &mut Self::Scratch,
    ) -> Result<Option<FileError>, FileError>;

    /// Streams the input into a pending result. The caller verifies the input did not change
    /// before calling `publish`; a dropped `Pending` must leave no trace.
    fn read(
        &self,
        job: &Job,
        input: &mut InputFile,
        scratch: &mut Self::Scratch,
    ) -> Result<Self::Pending, FileError>;

    /// A redelivered cluster job (`Job::redelivered`) whose input is gone: the outcome of an
    /// earlier delivery that finished the file, its input disposed of, and stopped before
    /// saying so, when what it left shows that. `None` (the default): the file vanished.
    fn finished_earlier(&self, _job: &Job, _scratch: &mut Self::Scratch) -> Option<Done> {
        None
    }

    /// Makes a verified result visible. May run on another thread than `read` did.
    fn publish(
        &self,
        job: &Job,
        input: &InputFile,
        pending: Self::Pending,
    ) -> Result<Done, FileError>;

    /// Makes several verified results visible together, so an op can share the disk's flushes
    /// among them. Returns one result per item, in order; one item's failure must not fail the
    /// others, and an item is `Ok` only once it is as durable as `publish` would have made it.
    /// The default publishes them one by one.
    fn publish_group(
        &self,
        group: Vec<(&Job, &InputFile, Self::Pending)>,
    ) -> Vec<Result<Done, FileError>> {
        group
            .into_iter()
            .map(|(job, input, pending)| self.publish(job, input, pending))
            .collect()
    }
}
