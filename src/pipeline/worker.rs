//! A worker: one per pool thread, taking job batches until its sentinel. For each file it
//! opens the input safely beneath the root, has the op check and read it, verifies it did not
//! change while read (retrying if it did), and publishes the result inline or hands it to a
//! publisher (`publish`). Every job ends in exactly one outcome; with `--move-failed`, an
//! input that failed for good (unreadable, or named too long for its output) is moved aside
//! first, and its outcome says where it went.

use std::path::Path;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::config::Config;
use crate::error::{FileError, Kind};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};

use crate::fsio::input::{self, InputFile, NotRegular, OpenError};
use crate::fsio::output::Dir;
use crate::ops::Op;
use crate::pipeline::intake::{Intake, Place, Rest};
use crate::pipeline::publish::{guarded, not_done, publish_guarded, Ready};
use crate::signals::Shutdown;
use crate::travel::{Event, Job, Outcome, Stamp, INODE_UNKNOWN};

/// How many times a file that changed while being read is attempted in all.
const ATTEMPTS: u32 = 3;

/// Where a worker's verified results go.
pub(crate) struct Stage<'a, P> {
    /// Publisher threads (ops whose publish waits on the disk), or `None` to publish inline.
    pub(crate) publishers: Option<&'a Sender<Ready<P>>>,
    pub(crate) events: &'a Sender<Event>,
}

/// A worker: takes jobs until its sentinel (and until no other worker can give any up, see
/// `intake`), sends one outcome per job (or hands the job to a publisher, which sends it).
pub(crate) fn worker_loop<O: Op>(
    index: usize,
    cfg: &Config,
    op: &O,
    intake: &Intake<'_>,
    stage: &Stage<'_, O::Pending>,
    shutdown: &Shutdown,
) {
    let mut scratch = op.scratch();
    // Inputs are opened beneath the root, or not at all: the root's path is canonical, so one
    // that cannot be opened now was deleted, moved or replaced (by a symlink, say) since the
    // walk or the watcher found it, and opening inputs by full path read through whatever
    // was put there (found by a review of a service's restarts).
    let root = input::Root::named(&cfg.root, &cfg.root_named)
        .map_err(|e| tracing::warn!("opening the root: {e}; its files are not read"))
        .ok();
    let me = Worker {
        index,
        root: root.as_ref(),
    };
    let mut place = Place::default();
    while let Some(mut rest) = intake.next(&mut place) {
        let mut outcomes = Vec::with_capacity(rest.left());
        while let Some(job) = rest.pop() {
            if me.root.is_none() {
                let message = format!(
                    "cannot open the root {} (deleted, moved or replaced): not read",
                    cfg.root.display()
                );
                // A queue's job goes back, to be done elsewhere or later (its source stops the
                // pipeline on such a root before taking a job: this is a root gone between the
                // two looks). A local file is as if deleted: a watch's state keeps no row for
                // it, so its scan once the root is back (a service's restart) takes it.
                outcomes.push(if cfg.confined {
                    Outcome::Skipped {
                        rel: job.rel,
                        reason: FileError::new(Kind::Interrupted, message),
                    }
                } else {
                    Outcome::Failed {
                        rel: job.rel,
                        error: FileError::new(Kind::Vanished, message),
                    }
                });
                continue;
            }
            let ran = run_job(cfg, op, me, job, stage, shutdown, &mut scratch, &mut rest);
            if let Some(outcome) = ran {
                outcomes.push(outcome);
            }
        }
        drop(rest);
        if !outcomes.is_empty() && stage.events.send(Event::Finished(outcomes)).is_err() {
            return;
        }
    }
}

/// A worker, as a job sees it.
#[derive(Clone, Copy)]
struct Worker<'a> {
    /// Its index, for its progress line.
    index: usize,
    /// The input root, for `InputFile::open_beneath`.
    root: Option<&'a input::Root>,
}

/// Runs one job of a batch (`rest`, the jobs after it); `None` when it was handed to a
/// publisher, which reports it.
#[allow(clippy::too_many_arguments)]
fn run_job<O: Op>(
    cfg: &Config,
    op: &O,
    me: Worker<'_>,
    job: Job,
    stage: &Stage<'_, O::Pending>,
    shutdown: &Shutdown,
    scratch: &mut O::Scratch,
    rest: &mut Rest<'_, '_>,
) -> Option<Outcome> {
    if shutdown.requested() {
        // Queued but not started: account for it, but do not start new work.
        let why = if shutdown.signal() == Some(libc::SIGHUP) {
            "not started: a reload stopped its pipeline (one the new configuration runs on \
             this directory takes it up at its scan)"
        } else {
            "not started: shutting down"
        };
        return Some(Outcome::Skipped {
            rel: job.rel,
            reason: FileError::new(Kind::Interrupted, why),
        });
    }
    if cfg.progress {
        let _ = stage.events.send(Event::Started {
            worker: me.index,
            rel: job.rel.clone(),
        });
    }
    let rel = job.rel.clone();
    // A bug in an op must cost one file, not the run.
    let prepared = guarded(&rel, || prepare(cfg, op, job, me.root, scratch, Some(rest)));
    match (prepared, stage.publishers) {
        (Err(outcome), _) => Some(outcome),
        (Ok(ready), None) => Some(publish_guarded(op, ready)),
        (Ok(ready), Some(tx)) => match tx.send(ready) {
            Ok(()) => None,
            Err(_) => Some(Outcome::Failed {
                rel,
                error: FileError::new(Kind::Internal, "the publisher threads are gone"),
            }),
        },
    }
}

/// Opens safely (beneath `root`, see `input::Root`), checks, reads, and verifies the input
/// did not change while read (retrying if it did). `Err` is a final outcome (skipped or
/// failed, or done by an earlier delivery of a cluster job); `Ok` is ready to publish. The jobs
/// after it in its batch (`rest`) are given up to the other workers if it is large.
pub(crate) fn prepare<O: Op>(
    cfg: &Config,
    op: &O,
    job: Job,
    root: Option<&input::Root>,
    scratch: &mut O::Scratch,
    rest: Option<&mut Rest<'_, '_>>,
) -> Result<Ready<O::Pending>, Outcome> {
    let failed = |job: Job, error| not_done(job.rel, error);
    if let Some(reason) = op.skipped_by_name(&job) {
        return Err(Outcome::Skipped {
            rel: job.rel,
            reason,
        });
    }
    let mut job = job;
    // A cluster job's path was walked by its coordinator, not here: what it names now is
    // reached before it is opened (`InputFile::open_beneath`).
    let opened =
        InputFile::open_beneath(root, &job.rel, &job.abs, cfg.follow_symlinks, cfg.confined);
    // Gone, its job delivered before: that delivery may have finished it and disposed of it.
    if job.redelivered.is_some()
        && matches!(&opened, Err(OpenError::Failed(e)) if e.kind == Kind::Vanished)
    {
        if let Some(done) = op.finished_earlier(&job, scratch) {
            return Err(Outcome::Done {
                rel: job.rel,
                done: Box::new(done),
            });
        }
    }
    let mut input = match opened {
        Ok(f) => f,
        Err(OpenError::NotRegular(what)) => {
            let reason = match what {
                NotRegular::Symlink => {
                    FileError::new(Kind::Symlink, "not a regular file (symlink)")
                }
                NotRegular::SymlinkOnPath | NotRegular::OutsideRoot => {
                    FileError::new(Kind::Symlink, format!("{what}; not followed"))
                }
                NotRegular::Special(_) => {
                    FileError::new(Kind::SpecialFile, format!("not a regular file ({what})"))
                }
            };
            return Err(Outcome::Skipped {
                rel: job.rel,
                reason,
            });
        }
        // Watch mode: deleted after it settled, which is no failure (its removal event says
        // the same).
        Err(OpenError::Failed(e)) if e.kind == Kind::Vanished && job.expect.is_some() => {
            return Err(Outcome::Skipped {
                rel: job.rel,
                reason: FileError::new(Kind::Vanished, "deleted before it was processed"),
            });
        }
        // Unreadable: no retry mends it (`--move-failed` moves it aside). Not in watch mode:
        // what tells a file still being written (a lease, /proc of its writer) needs it open
        // or its writer's /proc, which an unreadable file of another user denies, and a file
        // moved from under its writer (a log being appended to) is worse than one left.
        Err(OpenError::Failed(e)) if e.kind == Kind::PermissionDenied => {
            let e = if job.expect.is_some() && cfg.move_failed.is_some() {
                FileError {
                    message: format!(
                        "{}; not moved aside: in watch mode an unreadable file may still be \
                         written, which filepipe cannot tell",
                        e.message
                    ),
                    ..e
                }
            } else {
                set_aside(cfg, root, &job, e)
            };
            return Err(failed(job, e));
        }
        Err(OpenError::Failed(e)) => return Err(failed(job, e)),
    };
    // A hard link to one of filepipe's own files that stay the same file (the state's
    // database, read while this run writes it; found by a review): whatever led here, a
    // link in the tree or a followed symlink, not read.
    if cfg.is_own_file((input.stat.st_dev, input.stat.st_ino)) {
        let reason = FileError::new(
            Kind::HardLinked,
            "a hard link to filepipe's own file (the state's database or lock, or the failure \
             log); not read",
        );
        return Err(Outcome::Skipped {
            rel: job.rel,
            reason,
        });
    }
    // Never read past `--max-size` (a sparse file of terabytes costs whoever made it no disk).
    if let Some(reason) = over_max_size(cfg, &input) {
        return Err(Outcome::Skipped {
            rel: job.rel,
            reason,
        });
    }
    let now = Stamp::from_stat(&input.stat);
    if let Some(rest) = rest {
        rest.reading(now.size);
    }
    if let Some(expected) = job.expect.filter(|e| !e.same_file(&now)) {
        // Another file under the name (renamed over it) has its own events and settles in
        // its turn; the same file changed with none is what a write through a shared mapping
        // does (found by a review: a rename was reported as such a write).
        let message = if expected.inode != now.inode && expected.inode != INODE_UNKNOWN {
            "replaced after it settled (another file renamed over it): that file is taken in \
             its turn"
        } else {
            "changed after it settled, with no event telling of it (a write through mmap?)"
        };
        return Err(failed(job, FileError::new(Kind::Changed, message)));
    }
    // Results recorded for a stamp the file no longer has describe another version: every
    // result is computed from this read instead. (The walk's stamp was taken a moment ago;
    // watch mode's `expect` already holds the job to it.)
    outdated(&mut job, &input);
    // Watch mode takes files that may still be written without an event to say so (through a
    // shared mapping): one still open for writing when its read ends is not taken. (A writer
    // that had it open while it was read and closed it since is heard of by its close event,
    // which has the file looked at again.) One probe, not one before and one after: each
    // costs a lease taken and dropped, 0.13 s of a 100,000-file burst.
    let watched = job.expect.is_some();
    // Its job was delivered before, to a worker that stopped before saying how it ended: an
    // output up to date may be that delivery's work. It counts done if it holds exactly this
    // input, read and compared as `--remove-source` adopts an output in place (the op's read
    // does that for a redelivered job); dated right but holding other bytes, it is skipped as
    // up to date, as the first delivery would have found it.
    let mut confirming = false;
    match op.check(&job, &input, scratch) {
        Ok(None) => {}
        Ok(Some(reason)) if reason.kind == Kind::UpToDate && job.redelivered.is_some() => {
            confirming = true;
        }
        Ok(Some(reason)) => {
            return Err(Outcome::Skipped {
                rel: job.rel,
                reason,
            })
        }
        // Named too long for its output: no retry mends it either.
        Err(e) if e.kind == Kind::NameTooLong => {
            let e = set_aside(cfg, root, &job, e);
            return Err(failed(job, e));
        }
        Err(e) => return Err(failed(job, e)),
    }
    let mut attempt = 1;
    loop {
        // Its ACL, for its output, read before `finish` holds it to the mode it was opened
        // with (`InputFile::keep_acl`); only an output takes it.
        if cfg.spec.compressor().is_some() {
            input.keep_acl();
        }
        let read = match op.read(&job, &mut input, scratch) {
            Ok(p) => match input.finish() {
                // Its size says nothing of its content: read again, it would say the same.
                Err(e) if e.kind == Kind::SpecialFile => return Err(failed(job, e)),
                finished => finished.map(|()| p),
            },
            // The op saw it change under it (zstd's frame, pledged to the size found, cannot
            // end short of it): read again, as a change `finish` finds is (found by a review:
            // zstd failed a file that shrank, which gzip read again).
            Err(e) if e.kind == Kind::Changed => Err(e),
            Err(e) if confirming && e.kind == Kind::OutputExists => {
                return Err(Outcome::Skipped {
                    rel: job.rel,
                    reason: FileError::new(
                        Kind::UpToDate,
                        format!(
                            "output up to date by its date, not counted done: {}",
                            e.message
                        ),
                    ),
                });
            }
            Err(e) => return Err(failed(job, e)),
        };
        match read {
            Ok(_) if watched && open_for_writing(&input, &job.rel) => {
                return Err(failed(job, still_open()))
            }
            Ok(pending) => {
                return Ok(Ready {
                    job,
                    input,
                    pending,
                })
            }
            Err(mut e) if attempt >= ATTEMPTS => {
                e.message = format!("{} (gave up after {ATTEMPTS} attempts)", e.message);
                return Err(failed(job, e));
            }
            Err(e) => {
                // Said, at -v: the summary counts the file once, by how it ended, and its
                // bytes once (found by a review: a file read twice left no trace).
                tracing::info!(
                    path = %job.rel.display(),
                    attempt,
                    "{}: reading it again",
                    e.message
                );
                // Give a writer that is mid-way a moment to finish before looking again.
                std::thread::sleep(Duration::from_millis(100 << attempt));
                attempt += 1;
                if let Err(e) = input.restart() {
                    return Err(failed(job, e));
                }
                // It may have grown past `--max-size` since it was let in.
                if let Some(reason) = over_max_size(cfg, &input) {
                    return Err(Outcome::Skipped {
                        rel: job.rel,
                        reason,
                    });
                }
                // A file that changed has none of its recorded results any more.
                outdated(&mut job, &input);
                // Decided again of the file as it is now: an output up to date with the
                // version first opened is not with this one.
                match op.check(&job, &input, scratch) {
                    Ok(None) => {}
                    Ok(Some(reason)) => {
                        return Err(Outcome::Skipped {
                            rel: job.rel,
                            reason,
                        })
                    }
                    Err(e) => return Err(failed(job, e)),
                }
            }
        }
    }
}

/// Why `input` is not read, if it is larger than `--max-size` (as opened: its reads stop at
/// that size, `InputFile::read`).
fn over_max_size(cfg: &Config, input: &InputFile) -> Option<FileError> {
    let size = u64::try_from(input.stat.st_size).unwrap_or(0);
    let max = cfg.max_size.filter(|&max| size > max)?;
    Some(FileError::new(
        Kind::OverMaxSize,
        format!("{size} bytes, over --max-size ({max} bytes); not read"),
    ))
}

/// A job for some results only (`Job::only`) of a file found changed since they were recorded
/// becomes a job for all of them, as a changed file's is: its output made by filepipe for the
/// recorded version (`Only::replaces`) is replaced. Without that, the walk (which found the
/// file unchanged and so allowed no replacing) left this version failing `output-exists` once.
fn outdated(job: &mut Job, input: &InputFile) {
    if let Some(only) = job
        .only
        .take_if(|o| !o.holds_for(&Stamp::from_stat(&input.stat)))
    {
        job.replace |= only.replaces;
    }
}

/// `--move-failed DIR`: moves an input that failed for good (`error`) to its relative path
/// under DIR, as `--move-source` moves one (`fsio::aside`), and says in the error where it
/// went, or why it stayed. Only a regular file with one link, reached beneath the root without
/// following a symlink, is moved. Without `--move-failed`, `error` as it is.
fn set_aside(cfg: &Config, root: Option<&input::Root>, job: &Job, error: FileError) -> FileError {
    let Some(dir) = &cfg.move_failed else {
        return error;
    };
    let note = |what: String| FileError {
        message: format!("{}; {what}", error.message),
        ..error.clone()
    };
    let rel_dir = job.rel.parent().unwrap_or(Path::new(""));
    let parent = job.abs.parent().unwrap_or(Path::new("/"));
    let opened = match root {
        Some(root) => root.open_dir(rel_dir),
        None => rfs::open(
            parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ),
    };
    let fd = match opened {
        Ok(fd) => fd,
        Err(e) => return note(format!("not moved aside: opening its directory: {e}")),
    };
    let name = job.rel.file_name().unwrap_or_default();
    let st = match rfs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(e) => return note(format!("not moved aside: stat: {e}")),
    };
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
        return note("not moved aside: no longer a regular file".into());
    }
    let src = Dir::new(fd, parent.to_path_buf());
    let moved = if st.st_nlink > 1 {
        // Two links may be a move by link stopped half-way, its second link in DIR.
        match dir.finish_linked(&src, name, &job.rel, &st) {
            Some(moved) => moved,
            None => {
                return note(format!(
                    "not moved aside: it has {} hard links",
                    st.st_nlink
                ))
            }
        }
    } else {
        dir.move_input(&src, name, &job.rel, &st, root)
    };
    match moved {
        Ok(Ok(to)) => note(format!("input moved to {}", to.display())),
        Ok(Err(why)) => note(why.message),
        // Says itself where the input is (`aside::Within::move_on`).
        Err(e) if e.kind == Kind::UnsafeOutputPath => note(e.message),
        Err(e) => note(format!(
            "input moved under {}, but {} (the move may not survive a crash)",
            dir.root.display(),
            e.message
        )),
    }
}

/// Whether another process has `input` open for writing, as far as the kernel says; the first
/// time it will not say, the operator hears why once.
fn open_for_writing(input: &InputFile, rel: &Path) -> bool {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match input.open_for_writing() {
        Some(open) => open,
        None => {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    path = %rel.display(),
                    "cannot tell whether files are still open for writing (filepipe is not \
                     their owner and lacks CAP_LEASE, or the file system has no leases): a \
                     writer that keeps writing through a shared mapping after its close may go \
                     unseen (see README, 'What is guaranteed')"
                );
            }
            false
        }
    }
}

/// Why a watched file that another process still has open for writing is not taken (yet).
fn still_open() -> FileError {
    FileError::new(
        Kind::InUse,
        "still open for writing by another process (a shared writable mapping keeps it so after \
         its descriptor is closed): not taken yet",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::travel::{BatchFill, BATCH_BYTES};
    use std::path::PathBuf;

    #[test]
    fn batches_hold_64_files_or_4_mib_and_a_large_file_alone() {
        let fill = |sizes: &[u64]| {
            let mut f = BatchFill::default();
            for &size in sizes {
                assert!(f.takes(size), "{size} into {f:?}");
                f.add(size);
            }
            f
        };
        let small = fill(&[1000; 63]);
        assert!(!small.full() && small.takes(1000));
        assert!(fill(&[1000; 64]).full());
        // Bytes: four 1 MiB files fill it.
        let mb = 1 << 20;
        assert!(!fill(&[mb; 3]).full() && fill(&[mb; 4]).full());
        // A file of 4 MiB or more: only into an empty batch, which it then fills.
        assert!(!small.takes(BATCH_BYTES) && small.takes(BATCH_BYTES - 1));
        assert!(fill(&[BATCH_BYTES * 10]).full());
        assert!(BatchFill::alone(BATCH_BYTES) && !BatchFill::alone(BATCH_BYTES - 1));
    }
    use crate::digest::HashAlgo;
    use crate::ops::hash::HashOp;

    fn config(root: &Path) -> Config {
        config_op(root, "sha256")
    }

    fn config_op(root: &Path, op: &str) -> Config {
        crate::config::batch_config(&[root.to_str().unwrap(), "--op", op])
    }

    /// A job for `rel` under `cfg`'s root, delivered once, for every result.
    fn job_of(cfg: &Config, rel: &str) -> Job {
        Job {
            abs: cfg.root.join(rel),
            rel: PathBuf::from(rel),
            replace: false,
            expect: None,
            redelivered: None,
            only: None,
        }
    }

    #[test]
    fn an_output_a_redelivered_job_finds_up_to_date_is_done_only_if_it_holds_the_input() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, b"made once").unwrap();
        let cfg = config_op(tmp.path(), "gzip");
        let op = crate::ops::compress::CompressOp::<crate::ops::gzip::Gzip>::new(&cfg).unwrap();
        let mut scratch = op.scratch();
        let job = |redelivered: bool| Job {
            redelivered: redelivered.then(std::time::SystemTime::now),
            ..job_of(&cfg, "f")
        };
        let ready = prepare(&cfg, &op, job(false), None, &mut scratch, None).unwrap();
        assert!(matches!(publish_guarded(&op, ready), Outcome::Done { .. }));
        let gz = tmp.path().join("f.gz");
        let made = std::fs::read(&gz).unwrap();
        let inode = std::fs::metadata(&gz).unwrap().ino();
        // Delivered once: up to date, skipped, as a batch finds it.
        match prepare(&cfg, &op, job(false), None, &mut scratch, None) {
            Err(Outcome::Skipped { reason, .. }) => assert_eq!(reason.kind, Kind::UpToDate),
            other => panic!("{:?}", other.err()),
        }
        // Delivered again: the output holds exactly the input, so it is the earlier
        // delivery's work, done, and left as it is.
        let ready = prepare(&cfg, &op, job(true), None, &mut scratch, None).unwrap();
        match publish_guarded(&op, ready) {
            Outcome::Done { done, .. } => assert_eq!(done.bytes_in, 9),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&gz).unwrap(), made);
        assert_eq!(std::fs::metadata(&gz).unwrap().ino(), inode);
        // Dated as the input, with its mode, but holding other bytes; then holding exactly
        // the input but with another mode (a user's `gzip -k` made more open): skipped,
        // untouched.
        // (Headed with the input's mtime and as long as it, as filepipe's own would be: what
        // a look at the header and trailer cannot tell from it.)
        let secs = std::fs::metadata(&f).unwrap().mtime() as u32;
        let gzip = |data: &[u8]| {
            let mut e = flate2::GzBuilder::new()
                .mtime(secs)
                .write(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, data).unwrap();
            e.finish().unwrap()
        };
        let mode = std::fs::metadata(&f).unwrap().mode() & 0o777;
        for (bytes, mode) in [(gzip(b"made ONCE"), mode), (gzip(b"made once"), 0o666)] {
            std::fs::remove_file(&gz).unwrap();
            std::fs::write(&gz, &bytes).unwrap();
            std::fs::set_permissions(&gz, std::fs::Permissions::from_mode(mode)).unwrap();
            let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
            std::fs::File::options()
                .write(true)
                .open(&gz)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
            match prepare(&cfg, &op, job(true), None, &mut scratch, None) {
                Err(Outcome::Skipped { reason, .. }) => {
                    assert_eq!(reason.kind, Kind::UpToDate);
                    assert!(reason.message.contains("not counted done"), "{reason:?}");
                }
                other => panic!("{:?}", other.err()),
            }
            assert_eq!(std::fs::read(&gz).unwrap(), bytes);
            let now = std::fs::metadata(&gz).unwrap().mode() & 0o777;
            assert_eq!(now, mode, "the output's mode was changed");
        }
    }

    #[test]
    fn a_redelivered_job_whose_input_an_earlier_delivery_moved_is_done_from_what_it_left() {
        use crate::ops::compress::CompressOp;
        use crate::ops::zstd::Zstd;
        let tmp = tempfile::tempdir().unwrap();
        let (tree, aside) = (tmp.path().join("in"), tmp.path().join("done"));
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::create_dir(&aside).unwrap();
        std::fs::write(tree.join("sub/f"), b"moved once").unwrap();
        let cfg = crate::config::batch_config(&[
            tree.to_str().unwrap(),
            "--op",
            "zstd",
            "--move-source",
            aside.to_str().unwrap(),
        ]);
        let op = CompressOp::<Zstd>::new(&cfg).unwrap();
        let mut scratch = op.scratch();
        // The job's message, stored before its first delivery.
        let stored = std::time::SystemTime::now();
        let job = |redelivered: bool| Job {
            redelivered: redelivered.then_some(stored),
            ..job_of(&cfg, "sub/f")
        };
        let settled = Stamp::of(&tree.join("sub/f")).unwrap();
        let ready = prepare(&cfg, &op, job(false), None, &mut scratch, None).unwrap();
        assert!(matches!(publish_guarded(&op, ready), Outcome::Done { .. }));
        assert!(!tree.join("sub/f").exists() && aside.join("sub/f").exists());
        // The same job delivered again: its output in place, made of the file moved aside;
        // the version read is the one moved (a watching coordinator checks it).
        match prepare(&cfg, &op, job(true), None, &mut scratch, None) {
            Err(Outcome::Done { done, .. }) => {
                assert_eq!(done.bytes_in, 10);
                let read = done.stamp.unwrap();
                assert_eq!((read.size, read.mtime_ns), (settled.size, settled.mtime_ns));
            }
            other => panic!("{:?}", other.err()),
        }
        // A message stored well after the move (a later run's job for a file of the same
        // name, deleted before it was read): the earlier run's leftovers do not make it done.
        let later = Job {
            redelivered: Some(stored + std::time::Duration::from_secs(60)),
            ..job_of(&cfg, "sub/f")
        };
        match prepare(&cfg, &op, later, None, &mut scratch, None) {
            Err(Outcome::Failed { error, .. }) => assert_eq!(error.kind, Kind::Vanished),
            other => panic!("{:?}", other.err()),
        }
        // Delivered once only, it is a file deleted before it was processed.
        let vanished = |outcome| match outcome {
            Err(Outcome::Failed { error, .. }) => error.kind == Kind::Vanished,
            _ => false,
        };
        assert!(vanished(prepare(
            &cfg,
            &op,
            job(false),
            None,
            &mut scratch,
            None
        )));
        // What is under the move directory is not what the output was made of (another
        // mtime): nothing shows the job was done.
        let moved = std::fs::File::options()
            .write(true)
            .open(aside.join("sub/f"))
            .unwrap();
        moved
            .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(9))
            .unwrap();
        assert!(vanished(prepare(
            &cfg,
            &op,
            job(true),
            None,
            &mut scratch,
            None
        )));
    }

    /// A redelivered job (a hostile message left unacknowledged is one) naming a file that
    /// does not exist makes no directory in the output tree while it looks for what an
    /// earlier delivery left.
    #[test]
    fn a_redelivered_job_for_a_missing_file_makes_no_output_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (tree, aside, out) = (
            tmp.path().join("in"),
            tmp.path().join("done"),
            tmp.path().join("out"),
        );
        for d in [&tree, &aside, &out] {
            std::fs::create_dir(d).unwrap();
        }
        let cfg = crate::config::batch_config(&[
            tree.to_str().unwrap(),
            "--op",
            "gzip",
            "--out",
            out.to_str().unwrap(),
            "--move-source",
            aside.to_str().unwrap(),
        ]);
        let op = crate::ops::compress::CompressOp::<crate::ops::gzip::Gzip>::new(&cfg).unwrap();
        let mut scratch = op.scratch();
        let job = Job {
            redelivered: Some(std::time::SystemTime::now()),
            ..job_of(&cfg, "x/y/never")
        };
        match prepare(&cfg, &op, job, None, &mut scratch, None) {
            Err(Outcome::Failed { error, .. }) => assert_eq!(error.kind, Kind::Vanished),
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }

    #[test]
    fn a_result_for_a_version_replaced_since_it_was_read_does_not_replace_the_output() {
        use std::io::Read as _;
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, b"version one").unwrap();
        let cfg = config_op(tmp.path(), "gzip");
        let op = crate::ops::compress::CompressOp::<crate::ops::gzip::Gzip>::new(&cfg).unwrap();
        let mut scratch = op.scratch();
        let job = |replace| Job {
            replace,
            ..job_of(&cfg, "f")
        };
        let ready = prepare(&cfg, &op, job(false), None, &mut scratch, None).unwrap();
        assert!(matches!(publish_guarded(&op, ready), Outcome::Done { .. }));
        // Version two is read; before its result is published, version three takes its name
        // (and a newer job, elsewhere, its output).
        std::fs::write(&f, b"version two, longer").unwrap();
        let ready = prepare(&cfg, &op, job(true), None, &mut scratch, None).unwrap();
        std::fs::write(tmp.path().join("f.new"), b"version three").unwrap();
        std::fs::rename(tmp.path().join("f.new"), &f).unwrap();
        match publish_guarded(&op, ready) {
            Outcome::Failed { error, .. } => assert_eq!(error.kind, Kind::Changed),
            other => panic!("{other:?}"),
        }
        let mut out = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(tmp.path().join("f.gz")).unwrap())
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(
            out, "version one",
            "the output was replaced by a superseded version"
        );
        // The same through a publisher's group.
        let ready = prepare(&cfg, &op, job(true), None, &mut scratch, None).unwrap();
        std::fs::write(&f, b"version four!").unwrap();
        let outcomes = crate::pipeline::publish::publish_group(&op, vec![ready]);
        assert!(
            matches!(&outcomes[..], [Outcome::Failed { error, .. }] if error.kind == Kind::Changed)
        );
    }

    #[test]
    fn a_directory_swapped_for_a_link_after_the_walk_is_not_read_through() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(root.join("d/f"), b"listed in the tree").unwrap();
        std::fs::write(outside.join("f"), b"outside the tree").unwrap();
        let cfg = config(&root);
        let job = || job_of(&cfg, "d/f");
        let op = HashOp::new(HashAlgo::Sha256, 1).unwrap();
        let mut scratch = op.scratch();
        let roots = || {
            let root = input::Root::new(&cfg.root).unwrap();
            [root, input::Root::new(&cfg.root).unwrap().without_openat2()]
        };
        for root in roots() {
            assert!(prepare(&cfg, &op, job(), Some(&root), &mut scratch, None).is_ok());
        }
        // Listed, queued, and then the directory's name leads outside the tree.
        std::fs::rename(root.join("d"), root.join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        for root in roots() {
            match prepare(&cfg, &op, job(), Some(&root), &mut scratch, None) {
                Err(Outcome::Skipped { rel, reason }) => {
                    assert_eq!(rel, Path::new("d/f"));
                    assert_eq!(reason.kind, Kind::Symlink);
                    assert!(reason.message.contains("on its path"), "{}", reason.message);
                }
                Err(other) => panic!("unexpected {other:?} ({root:?})"),
                Ok(_) => panic!("read the file outside the tree ({root:?})"),
            }
        }
    }
}
