//! Sources: where jobs come from. Batch mode's is the walker (`walk`), watch mode's the
//! watcher (`watch`); a cluster worker's would be the queue's consumer.
//!
//! A source runs on its own thread. It sends jobs in batches (`Msg::Jobs`, filled by
//! `BatchFill`'s rule) to the bounded job channel, and the outcomes of what it skips itself
//! (symlinks, special files) straight to the reporter, until it is exhausted or a shutdown is
//! requested; the pipeline then sends one sentinel per worker. A source that needs to know
//! when a file it sent is recorded (the watcher, to take it again when it changes or to retry
//! it; a queue, to acknowledge the job) says so with `listens`, and hears of each file once the
//! sink has flushed its outcome.

mod dirs;
#[cfg(feature = "cluster")]
pub(crate) mod queue;
pub(crate) mod recorded;
pub(crate) mod walk;
pub(crate) mod watch;

use anyhow::Result;
use crossbeam_channel::{Receiver, Sender};

use crate::travel::{Event, Msg, Recorded, Stats};

/// What a source works with.
pub(crate) struct Outlet<'a> {
    /// Where its jobs go, in batches. Bounded: a send waits for the workers.
    pub(crate) jobs: &'a Sender<Msg>,
    /// Where the outcomes of files it reports itself go (to the reporter).
    pub(crate) events: &'a Sender<Event>,
    /// The counters it raises (files and bytes found, queue lengths).
    pub(crate) stats: &'a Stats,
    /// Files whose outcomes the sink has recorded, in batches; `Some` when the source
    /// `listens`. Unbounded, but it only ever holds files the source sent.
    pub(crate) recorded: Option<Receiver<Vec<Recorded>>>,
}

/// A source of jobs: the batch walker or the watcher.
pub(crate) trait Source: Send {
    /// Whether it wants to hear of each file's outcome once recorded (`Outlet::recorded`).
    fn listens(&self) -> bool {
        false
    }

    /// Sends jobs until the source is exhausted (Ok), a shutdown is requested (Ok), or it
    /// fails (Err, which ends the run once the workers have drained).
    fn run(&mut self, out: Outlet<'_>) -> Result<()>;
}
