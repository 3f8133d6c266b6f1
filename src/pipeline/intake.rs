//! How workers take their jobs: batches from the bounded job channel until each one's sentinel,
//! and the rest of a batch another worker gave up (`Rest::reading`) on coming to a large file.
//!
//! A source that stats its files sends a large one alone (`BatchFill`), so that no worker ends
//! the run holding several while the others have nothing. A batch walk that needs no stamps (no
//! state, no progress bar, no queue) does not stat its files at all, which spares one system
//! call of the six a small file costs, and fills its batches by count alone: the worker that
//! opens a large file in one gives up the jobs after it, which an idle worker takes.
//!
//! Invariant: nothing given up is left behind. A worker takes given-up batches before anything
//! else, and once it has its sentinel it stops only when no worker holds a batch (so none can
//! give up more) and none is waiting; a batch given up after that look is given up by a worker
//! still running, which looks again before it stops.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::{select_biased, unbounded, Receiver, Sender};

use crate::travel::{BatchFill, Job, Msg};

/// Where the workers take their batches.
pub(crate) struct Intake<'a> {
    jobs: &'a Receiver<Msg>,
    /// Jobs taken from `jobs` and not started yet, counted as they are taken (a batch given
    /// up stays counted: it was taken once).
    unstarted: &'a AtomicUsize,
    given_tx: Sender<Vec<Job>>,
    given_rx: Receiver<Vec<Job>>,
    /// Workers holding a batch, any of whom may still give up part of it.
    busy: AtomicUsize,
    /// A token each time `busy` falls to none, and each time a worker stops: it wakes a worker
    /// waiting to stop, which then looks again (see `next`).
    quiet_tx: Sender<()>,
    quiet_rx: Receiver<()>,
}

/// A worker's place at the intake: whether it has had its sentinel.
#[derive(Default)]
pub(crate) struct Place {
    sentinel: bool,
}

impl<'a> Intake<'a> {
    /// The intake of `workers` workers taking from `jobs`.
    pub(crate) fn new(jobs: &'a Receiver<Msg>, unstarted: &'a AtomicUsize, workers: usize) -> Self {
        let (given_tx, given_rx) = unbounded();
        let (quiet_tx, quiet_rx) = crossbeam_channel::bounded(workers.max(1));
        Intake {
            jobs,
            unstarted,
            given_tx,
            given_rx,
            busy: AtomicUsize::new(0),
            quiet_tx,
            quiet_rx,
        }
    }

    /// The next batch for the worker at `place` (done with when dropped); `None` when it is to
    /// stop.
    pub(crate) fn next(&self, place: &mut Place) -> Option<Rest<'_, 'a>> {
        loop {
            if let Ok(jobs) = self.given_rx.try_recv() {
                return Some(self.taken(jobs));
            }
            if !place.sentinel {
                select_biased! {
                    recv(self.given_rx) -> jobs => {
                        if let Ok(jobs) = jobs {
                            return Some(self.taken(jobs));
                        }
                    }
                    recv(self.jobs) -> msg => match msg {
                        Ok(Msg::Jobs(jobs)) => {
                            self.unstarted.fetch_add(jobs.len(), Ordering::Relaxed);
                            return Some(self.taken(jobs));
                        }
                        Ok(Msg::Shutdown) | Err(_) => place.sentinel = true,
                    },
                }
                continue;
            }
            // Its sentinel had: the source is done, but a worker still holding a batch may yet
            // give up part of it.
            if self.busy.load(Ordering::SeqCst) == 0 && self.given_rx.is_empty() {
                // Another worker waiting to stop looks again too.
                let _ = self.quiet_tx.try_send(());
                return None;
            }
            select_biased! {
                recv(self.given_rx) -> jobs => {
                    if let Ok(jobs) = jobs {
                        return Some(self.taken(jobs));
                    }
                }
                recv(self.quiet_rx) -> _ => {}
            }
        }
    }

    fn taken(&self, jobs: Vec<Job>) -> Rest<'_, 'a> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Rest {
            jobs: jobs.into(),
            fill: BatchFill::default(),
            intake: self,
        }
    }
}

/// A batch a worker took, the jobs it has not started yet.
pub(crate) struct Rest<'i, 'a> {
    jobs: VecDeque<Job>,
    /// What the files read so far from this batch hold.
    fill: BatchFill,
    intake: &'i Intake<'a>,
}

impl Rest<'_, '_> {
    /// How many jobs are left to start.
    pub(crate) fn left(&self) -> usize {
        self.jobs.len()
    }

    /// The next job to start.
    pub(crate) fn pop(&mut self) -> Option<Job> {
        let job = self.jobs.pop_front()?;
        self.intake.unstarted.fetch_sub(1, Ordering::Relaxed);
        Some(job)
    }

    /// About to read a file of `size` bytes: once the batch's files read hold as much as a
    /// sized source lets a batch hold (`BatchFill`: a large file alone, or `BATCH_BYTES` in
    /// all), the jobs after this one are given up, for a worker with nothing to do (or this
    /// one, later) to take. Counting the large files alone left a batch of 64 files of 3 MiB
    /// to one worker (found by a review: twice as long on two cores as a sized walk's).
    pub(crate) fn reading(&mut self, size: u64) {
        self.fill.add(size);
        if BatchFill::alone(size) || self.fill.full() {
            self.give_up();
        }
    }

    /// Gives up the jobs not started yet.
    fn give_up(&mut self) {
        if !self.jobs.is_empty() {
            let jobs: Vec<Job> = self.jobs.drain(..).collect();
            // Cannot fail: the intake holds a receiver.
            let _ = self.intake.given_tx.send(jobs);
        }
    }
}

impl Drop for Rest<'_, '_> {
    /// The batch is done with (or its worker stopped early: what it did not start is given up,
    /// so a worker that stops does not take jobs with it).
    fn drop(&mut self) {
        self.give_up();
        if self.intake.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = self.intake.quiet_tx.try_send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::travel::BATCH_BYTES;
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::time::Duration;

    fn job(name: &str) -> Job {
        Job::new(PathBuf::from("/r").join(name), PathBuf::from(name))
    }

    /// Whether a worker other than `worker` has started a job (waited for, up to 10 s).
    fn another_started(ran: &Mutex<Vec<(usize, String)>>, worker: usize) -> bool {
        let others = || ran.lock().unwrap().iter().any(|(w, _)| *w != worker);
        let started = std::time::Instant::now();
        while !others() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        others()
    }

    /// Takes batches at `intake` until told to stop, recording each job started under
    /// `worker`; `big` is read as a large file, which waits (up to 10 s) until another worker
    /// has started a job.
    fn work(intake: &Intake<'_>, worker: usize, ran: &Mutex<Vec<(usize, String)>>) {
        let mut place = Place::default();
        while let Some(mut rest) = intake.next(&mut place) {
            while let Some(job) = rest.pop() {
                let name = job.rel.to_string_lossy().into_owned();
                ran.lock().unwrap().push((worker, name.clone()));
                if name == "big" {
                    rest.reading(BATCH_BYTES);
                    another_started(ran, worker);
                }
            }
        }
    }

    #[test]
    fn the_rest_of_a_batch_behind_a_large_file_goes_to_a_worker_that_had_its_sentinel() {
        // The walk of a few large files sends them in one batch and then the sentinels: the
        // second worker has its sentinel before the first opens the large file.
        let (tx, rx) = crossbeam_channel::bounded(4);
        let unstarted = AtomicUsize::new(0);
        let intake = Intake::new(&rx, &unstarted, 2);
        let ran = Mutex::new(Vec::new());
        tx.send(Msg::Jobs(vec![job("big"), job("b"), job("c")]))
            .unwrap();
        std::thread::scope(|s| {
            let first = s.spawn(|| {
                let mut place = Place::default();
                // Holds the batch before the sentinels are sent.
                let mut rest = intake.next(&mut place).unwrap();
                tx.send(Msg::Shutdown).unwrap();
                tx.send(Msg::Shutdown).unwrap();
                let second = s.spawn(|| work(&intake, 1, &ran));
                // The second worker has its sentinel, and waits for the first.
                while rx.len() > 1 {
                    std::thread::yield_now();
                }
                let job = rest.pop().unwrap();
                ran.lock()
                    .unwrap()
                    .push((0, job.rel.to_string_lossy().into_owned()));
                rest.reading(BATCH_BYTES);
                assert!(
                    another_started(&ran, 0),
                    "no worker took the rest of the batch"
                );
                drop(rest);
                // Its own sentinel, and nothing left to give up: it stops.
                assert!(intake.next(&mut place).is_none());
                second.join().unwrap();
            });
            first.join().unwrap();
        });
        let mut ran = ran.into_inner().unwrap();
        ran.sort();
        assert_eq!(
            ran,
            [(0, "big".into()), (1, "b".into()), (1, "c".into())],
            "each job started once, the rest by the other worker"
        );
        assert_eq!(unstarted.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_batch_is_given_up_after_as_many_bytes_as_a_sized_batch_holds() {
        let (_tx, rx) = crossbeam_channel::bounded(1);
        let unstarted = AtomicUsize::new(0);
        let intake = Intake::new(&rx, &unstarted, 2);
        let three_mib = 3 << 20;
        let mut rest = intake.taken((0..64).map(|i| job(&format!("{i}"))).collect());
        rest.pop();
        rest.reading(three_mib);
        assert_eq!(rest.jobs.len(), 63, "3 MiB read: the batch is kept");
        rest.pop();
        rest.reading(three_mib);
        assert!(rest.jobs.is_empty(), "6 MiB read: the rest is given up");
        let given = intake.given_rx.try_recv().unwrap();
        assert_eq!(given.len(), 62);
        // Small files: the batch is kept whole.
        let mut rest = intake.taken((0..64).map(|i| job(&format!("{i}"))).collect());
        while rest.pop().is_some() {
            rest.reading(16 << 10);
            assert!(intake.given_rx.is_empty());
        }
    }

    #[test]
    fn workers_share_batches_of_large_files_and_every_job_runs_once() {
        // Batches filled by count, large files among small ones, on 4 workers.
        let (tx, rx) = crossbeam_channel::bounded(8);
        let unstarted = AtomicUsize::new(0);
        let intake = Intake::new(&rx, &unstarted, 4);
        let ran = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for w in 0..4 {
                let (intake, ran) = (&intake, &ran);
                s.spawn(move || work(intake, w, ran));
            }
            for b in 0..20 {
                let mut jobs: Vec<Job> = (0..10).map(|i| job(&format!("{b}-{i}"))).collect();
                if b % 3 == 0 {
                    jobs.insert(b % 7, job("big"));
                }
                tx.send(Msg::Jobs(jobs)).unwrap();
            }
            for _ in 0..4 {
                tx.send(Msg::Shutdown).unwrap();
            }
        });
        let ran = ran.into_inner().unwrap();
        let mut names: Vec<&str> = ran.iter().map(|(_, n)| n.as_str()).collect();
        names.sort_unstable();
        let bigs = names.iter().filter(|&&n| n == "big").count();
        names.dedup();
        assert_eq!((names.len(), bigs), (201, 7), "every job exactly once");
        assert_eq!(unstarted.load(Ordering::Relaxed), 0);
    }
}
