//! Publishing: a verified result made durable and visible. Ops whose publish waits on the
//! disk (gzip's flushes) run it on publisher threads, which take every result that is ready
//! and publish them as one group sharing the flushes; each file of a group is reported only
//! once it is durable. A panic costs its file (or its group), never the run; after a second
//! signal, results still waiting are abandoned unpublished.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::error::{FileError, Kind};
use crate::fsio::input::InputFile;
use crate::ops::Op;
use crate::signals;
use crate::travel::{Done, Event, Job, Outcome, Stamp};

/// How long a publisher waits for more results to join its group while the workers have jobs
/// queued: a group's flushes cost about the same for one file as for 256, so under load a group
/// is worth filling (without waiting, groups hold what the workers finish during one flush, a
/// few files). With nothing queued (a watch daemon between files, the end of a batch) it never
/// waits, so a lone file is published at once.
const GROUP_LINGER: Duration = Duration::from_millis(32);

/// Runs `f`, turning a panic into a failed outcome for `rel`.
pub(crate) fn guarded<T>(rel: &Path, f: impl FnOnce() -> Result<T, Outcome>) -> Result<T, Outcome> {
    panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(Outcome::Failed {
            rel: rel.to_path_buf(),
            error: FileError::panicked(p.as_ref()),
        })
    })
}

/// `publish`, with a panic costing only this file.
pub(crate) fn publish_guarded<O: Op>(op: &O, ready: Ready<O::Pending>) -> Outcome {
    if signals::aborted() {
        return abandon(vec![ready]).remove(0);
    }
    let rel = ready.job.rel.clone();
    guarded(&rel, || Ok(publish(op, ready))).unwrap_or_else(|failed| failed)
}

/// A publisher: makes verified results durable and visible until the workers are all gone.
/// `backlog` tells whether the workers have jobs queued.
pub(crate) fn publisher_loop<O: Op>(
    op: &O,
    ready: &Receiver<Ready<O::Pending>>,
    events: &Sender<Event>,
    group_max: usize,
    backlog: &dyn Fn() -> bool,
) {
    while let Ok(first) = ready.recv() {
        // Whatever else is ready joins; while more work is queued, what is finished within
        // GROUP_LINGER joins too (see there). A lone file is published at once.
        let mut group = vec![first];
        let deadline = Instant::now() + GROUP_LINGER;
        while group.len() < group_max {
            match ready.try_recv() {
                Ok(r) => group.push(r),
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if !backlog() || signals::aborted() => break,
                Err(TryRecvError::Empty) => match ready.recv_deadline(deadline) {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                },
            }
        }
        if events
            .send(Event::Finished(publish_group_guarded(op, group)))
            .is_err()
        {
            return;
        }
    }
}

/// A group's files, abandoned unpublished after a second signal: their temps go as their
/// pending results drop.
fn abandon<P>(group: Vec<Ready<P>>) -> Vec<Outcome> {
    group
        .into_iter()
        .map(|r| Outcome::Skipped {
            rel: r.job.rel,
            reason: FileError::new(
                Kind::Interrupted,
                "not published: stopped by a second signal",
            ),
        })
        .collect()
}

/// `publish_group`, with a panic failing the group's files but not the run. An op's own steps
/// for one file are guarded per file (`FileError::guard`); this is for a panic in a step the
/// group shares. Some files may have been published by then: reporting them failed errs on the
/// side of redoing them.
fn publish_group_guarded<O: Op>(op: &O, group: Vec<Ready<O::Pending>>) -> Vec<Outcome> {
    if signals::aborted() {
        return abandon(group);
    }
    let rels: Vec<PathBuf> = group.iter().map(|r| r.job.rel.clone()).collect();
    panic::catch_unwind(AssertUnwindSafe(|| publish_group(op, group))).unwrap_or_else(|p| {
        let error = FileError::panicked(p.as_ref());
        rels.into_iter()
            .map(|rel| Outcome::Failed {
                rel,
                error: error.clone(),
            })
            .collect()
    })
}

/// A verified result waiting to be published: the input has been read whole and unchanged.
pub(crate) struct Ready<P> {
    /// The file.
    pub(crate) job: Job,
    /// The open input (its stat gives the output's attributes).
    pub(crate) input: InputFile,
    /// The op's pending result.
    pub(crate) pending: P,
}

/// Publishes a verified result and says how the file ended.
pub(crate) fn publish<O: Op>(op: &O, ready: Ready<O::Pending>) -> Outcome {
    let Ready {
        job,
        input,
        pending,
    } = ready;
    if let Some(e) = superseded(&job, &input) {
        return not_done(job.rel, e);
    }
    let result = op.publish(&job, &input, pending);
    outcome(job, &input, result)
}

/// A result that would replace an existing output (`Job::replace`) for an input no longer
/// at its name: another version of the file has taken its place since it was read, and that
/// version's job (here, or a cluster's other worker, which may already have published) owns
/// the output. Without this look, a worker that stalled past a cluster's ack wait would put
/// an old version's output over the newer one's, and nothing would redo it. What is left is
/// the moment between this look and the rename.
fn superseded(job: &Job, input: &InputFile) -> Option<FileError> {
    if !job.replace {
        return None;
    }
    let read = Stamp::from_stat(&input.stat);
    // A symlink at the name was followed to what was read (`--follow-symlinks`): what it
    // leads to now is compared, not the link (found by a review: a link's own stamp never
    // matched, and its file failed `changed-while-read` at every run).
    let now = match rustix::fs::lstat(&job.abs) {
        Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_symlink() => {
            rustix::fs::stat(&job.abs).ok()
        }
        other => other.ok(),
    };
    match now.map(|st| Stamp::from_stat(&st)) {
        Some(now) if now.same_file(&read) => None,
        _ => Some(FileError::new(
            Kind::Changed,
            "replaced or changed since it was read: its output is left to the newer version",
        )),
    }
}

/// Publishes verified results as one group and says how each file ended, in order.
pub(crate) fn publish_group<O: Op>(op: &O, group: Vec<Ready<O::Pending>>) -> Vec<Outcome> {
    // Superseded results are dropped (their temps with them) before the group is published.
    let mut early: Vec<Option<Outcome>> = Vec::with_capacity(group.len());
    let mut kept = Vec::with_capacity(group.len());
    for r in group {
        match superseded(&r.job, &r.input) {
            Some(e) => early.push(Some(not_done(r.job.rel, e))),
            None => {
                early.push(None);
                kept.push(r);
            }
        }
    }
    let mut published = publish_kept(op, kept).into_iter();
    early
        .into_iter()
        .map(|o| {
            o.or_else(|| published.next())
                .unwrap_or_else(|| Outcome::Failed {
                    rel: PathBuf::new(),
                    error: FileError::new(Kind::Internal, "the op lost a file of its group"),
                })
        })
        .collect()
}

/// `publish_group` of the results still to be published.
fn publish_kept<O: Op>(op: &O, group: Vec<Ready<O::Pending>>) -> Vec<Outcome> {
    if group.is_empty() {
        return Vec::new();
    }
    let (heads, pendings): (Vec<_>, Vec<_>) = group
        .into_iter()
        .map(|r| ((r.job, r.input), r.pending))
        .unzip();
    let items = heads
        .iter()
        .zip(pendings)
        .map(|((job, input), pending)| (job, input, pending))
        .collect();
    let mut results = op.publish_group(items).into_iter();
    heads
        .into_iter()
        .map(|(job, input)| {
            let result = results.next().unwrap_or_else(|| {
                Err(FileError::new(
                    Kind::Internal,
                    "the op lost a file of its group",
                ))
            });
            outcome(job, &input, result)
        })
        .collect()
}

/// The outcome of a publish.
fn outcome(job: Job, input: &InputFile, result: Result<Done, FileError>) -> Outcome {
    match result {
        Ok(mut done) => {
            done.stamp = Some(Stamp::from_stat(&input.stat));
            // A job for some results only: the others are the state's, listed with these
            // (the manifests find each digest by its algorithm).
            if let Some(only) = job.only {
                done.digests.extend_from_slice(&only.recorded);
                done.only = Some(only);
            }
            Outcome::Done {
                rel: job.rel,
                done: Box::new(done),
            }
        }
        Err(e) => not_done(job.rel, e),
    }
}

/// How a file that was not done ended: skipped when nothing was wrong with it (found up to
/// date only at the publish, as when an identical output appeared meanwhile; or abandoned by a
/// second signal, to be done by the next run), failed otherwise.
pub(crate) fn not_done(rel: PathBuf, e: FileError) -> Outcome {
    match e.kind {
        Kind::UpToDate | Kind::Interrupted => Outcome::Skipped { rel, reason: e },
        _ => Outcome::Failed { rel, error: e },
    }
}
