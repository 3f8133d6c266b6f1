//! A cluster worker's source: batches of jobs the worker's router took from the queue, fed to
//! the pipeline. Once every file of a message is recorded (its outcome stored by the queue
//! sink, see `sink::queue`), the message is settled: acknowledged, or handed back for
//! redelivery if a file of it was not finished here (a second signal abandoned it).
//!
//! Invariants: a message is settled only after each of its files' outcomes is stored, so a
//! worker that dies loses no outcome (its messages are redelivered); a path in flight here is
//! never started twice (a redelivered message naming it waits for the same outcome). Paths a
//! job may not name never get here: the router fails them (see `cluster::worker`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use crossbeam_channel::{select, Receiver, Sender};

use crate::signals::Shutdown;
use crate::source::{Outlet, Source};
use crate::travel::{BatchFill, Job, Msg, Recorded, Stamp};

/// A message's jobs, as the router hands them over.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// The router's key for the message.
    pub(crate) id: u64,
    /// Its files, their paths checked (`WirePath::rel`).
    pub(crate) files: Vec<Delivered>,
}

/// One file of a delivery.
#[derive(Debug)]
pub(crate) struct Delivered {
    /// Relative to the root, checked.
    pub(crate) rel: PathBuf,
    /// Its size as the coordinator saw it (0: not sent).
    pub(crate) size: u64,
    /// An existing output filepipe made for an earlier version may be replaced (`Job::replace`).
    pub(crate) replace: bool,
    /// Its message was delivered before, and stored then (`Job::redelivered`).
    pub(crate) redelivered: Option<std::time::SystemTime>,
    /// A watching coordinator's: the size and mtime it settled with (`Job::expect`).
    pub(crate) expect: Option<Stamp>,
}

/// A message whose files are all recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settled {
    /// The router's key for the message.
    pub(crate) id: u64,
    /// Every file of it ended here (ack); else it is to be delivered again (nak).
    pub(crate) done: bool,
}

/// The source: deliveries in, settled messages out.
pub(crate) struct QueueSource {
    root: PathBuf,
    deliveries: Receiver<Delivery>,
    settled: Sender<Settled>,
    /// The pipeline's stop: raised when its sink fails, and then the source stops, so the
    /// pipeline ends and the router hands its messages back.
    stop: Arc<Shutdown>,
}

impl QueueSource {
    /// A source of the jobs of one run (and root, op and level), with files under `root`.
    pub(crate) fn new(
        root: PathBuf,
        deliveries: Receiver<Delivery>,
        settled: Sender<Settled>,
        stop: Arc<Shutdown>,
    ) -> Self {
        QueueSource {
            root,
            deliveries,
            settled,
            stop,
        }
    }
}

/// The books: messages with files still to be recorded, and what each recorded path settles.
#[derive(Default)]
struct Books {
    /// Per message: files not yet recorded, and whether one of them is to be redone.
    open: HashMap<u64, (usize, bool)>,
    /// Each path in the pipeline, and the messages that named it: its outcome settles each.
    waiting: HashMap<PathBuf, Waiters>,
}

/// The messages that named one path in the pipeline: nearly always one, held without an
/// allocation of its own (a `Vec` of one was a malloc and a free per file).
#[derive(Debug)]
struct Waiters {
    first: u64,
    /// A redelivery of a message still held here, or a name twice in one message.
    more: Vec<u64>,
}

impl Waiters {
    fn of(id: u64) -> Waiters {
        Waiters {
            first: id,
            more: Vec::new(),
        }
    }
}

impl Books {
    /// One file of message `id` ended (`redo`: not here, to be delivered again). Returns the
    /// message if that was its last.
    fn one_done(&mut self, id: u64, redo: bool) -> Option<Settled> {
        let entry = self.open.get_mut(&id)?;
        entry.0 -= 1;
        entry.1 |= redo;
        if entry.0 > 0 {
            return None;
        }
        let (_, redo) = self.open.remove(&id)?;
        Some(Settled { id, done: !redo })
    }

    fn recorded(&mut self, r: &Recorded) -> Vec<Settled> {
        let redo = r.retry_after.is_some();
        let Some(w) = self.waiting.remove(&r.rel) else {
            return Vec::new();
        };
        std::iter::once(w.first)
            .chain(w.more)
            .filter_map(|id| self.one_done(id, redo))
            .collect()
    }
}

impl Source for QueueSource {
    fn listens(&self) -> bool {
        true
    }

    fn run(&mut self, out: Outlet<'_>) -> Result<()> {
        let recorded = out
            .recorded
            .as_ref()
            .context("a queue source must hear of recorded outcomes")?;
        // A root that cannot be opened (unmounted, moved away, swapped for a link) stops the
        // pipeline before any file is taken: its jobs go back, and the worker rests the root.
        // Taken, each file failed for good at once, though another worker (or this one, once
        // the root is back) could do it (found by a review, with outputs under an output
        // root: next to the inputs, opening their directory stopped the pipeline already).
        crate::fsio::input::Root::named(&self.root, &self.root)
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot open the root {}", self.root.display()))?;
        let mut books = Books::default();
        let mut open = true;
        loop {
            if !open && books.open.is_empty() {
                return Ok(());
            }
            if self.stop.requested() {
                // The sink failed: what is unsettled goes back to the queue.
                return Ok(());
            }
            // The deliveries channel, until the router closes it; then only what is recorded.
            let never = crossbeam_channel::never();
            let deliveries = if open { &self.deliveries } else { &never };
            select! {
                recv(deliveries) -> d => match d {
                    Ok(d) => self.take(d, &mut books, &out)?,
                    Err(_) => open = false,
                },
                recv(recorded) -> r => match r {
                    Ok(batch) => {
                        for r in &batch {
                            for s in books.recorded(r) {
                                // The router is gone only once the worker is stopping.
                                let _ = self.settled.send(s);
                            }
                        }
                    }
                    Err(_) => return Ok(()),
                },
                default(Duration::from_millis(200)) => {}
            }
        }
    }
}

impl QueueSource {
    /// Takes one message's files (the router checked their paths) to the workers, in batches
    /// (`BatchFill`'s rule).
    fn take(&self, d: Delivery, books: &mut Books, out: &Outlet<'_>) -> Result<()> {
        books.open.insert(d.id, (d.files.len(), false));
        let mut batch = Vec::new();
        let mut fill = BatchFill::default();
        for Delivered {
            rel,
            size,
            replace,
            redelivered,
            expect,
        } in d.files
        {
            if let Some(w) = books.waiting.get_mut(&rel) {
                // In flight here already (a redelivery of a message this worker still holds,
                // or a name twice in one message): its outcome settles this one too.
                w.more.push(d.id);
                continue;
            }
            books.waiting.insert(rel.clone(), Waiters::of(d.id));
            if !fill.takes(size) {
                self.send(std::mem::take(&mut batch), out)?;
                fill = BatchFill::default();
            }
            fill.add(size);
            out.stats.files.fetch_add(1, Ordering::Relaxed);
            out.stats.bytes.fetch_add(size, Ordering::Relaxed);
            batch.push(Job {
                abs: self.root.join(&rel),
                rel,
                replace,
                expect,
                redelivered,
                only: None,
            });
        }
        if !batch.is_empty() {
            self.send(batch, out)?;
        }
        Ok(())
    }

    fn send(&self, batch: Vec<Job>, out: &Outlet<'_>) -> Result<()> {
        out.jobs
            .send(Msg::Jobs(batch))
            .ok()
            .context("the workers have stopped")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(rel: &str, redo: bool) -> Recorded {
        Recorded {
            rel: rel.into(),
            retry_after: redo.then_some(Duration::ZERO),
            output_blocked: false,
        }
    }

    #[test]
    fn a_message_is_settled_once_each_of_its_files_is_recorded() {
        let mut b = Books::default();
        b.open.insert(1, (2, false));
        b.waiting.insert("a".into(), Waiters::of(1));
        b.waiting.insert("b".into(), Waiters::of(1));
        assert!(b.recorded(&rec("a", false)).is_empty());
        assert!(b.recorded(&rec("zzz", false)).is_empty(), "not ours");
        assert_eq!(
            b.recorded(&rec("b", false)),
            [Settled { id: 1, done: true }]
        );
        assert!(b.open.is_empty() && b.waiting.is_empty());
    }

    #[test]
    fn a_file_to_be_redone_hands_its_message_back_and_a_shared_path_settles_both() {
        let mut b = Books::default();
        // Message 2 is a redelivery of message 1 while this worker still holds it.
        b.open.insert(1, (2, false));
        b.open.insert(2, (1, false));
        b.waiting.insert(
            "a".into(),
            Waiters {
                more: vec![2],
                ..Waiters::of(1)
            },
        );
        b.waiting.insert("b".into(), Waiters::of(1));
        assert_eq!(
            b.recorded(&rec("a", false)),
            [Settled { id: 2, done: true }]
        );
        assert_eq!(
            b.recorded(&rec("b", true)),
            [Settled { id: 1, done: false }]
        );
    }

    #[test]
    fn a_name_twice_in_one_message_is_counted_off_twice_by_its_one_outcome() {
        let mut b = Books::default();
        b.open.insert(7, (2, false));
        b.waiting.insert(
            "a".into(),
            Waiters {
                more: vec![7],
                ..Waiters::of(7)
            },
        );
        assert_eq!(
            b.recorded(&rec("a", false)),
            [Settled { id: 7, done: true }]
        );
    }
}
