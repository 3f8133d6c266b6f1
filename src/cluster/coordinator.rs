//! `filepipe batch DIR --queue URL`: the coordinator. It walks the tree as a local batch does,
//! but publishes the jobs to the queue (batches as the local channel has them, one message
//! each, under a message id so that a publish retried after an error is stored once), and
//! feeds the outcomes the workers publish to the same reporter and manifest sink as a local
//! run: same progress, summary, failure log and exit codes. It ends once every file it
//! published has an outcome; each file's first outcome counts, later ones (a job delivered
//! again after a worker died) are dropped.
//!
//! A first signal stops the walk and the publishing, removes the run's jobs no worker has
//! taken yet, and waits for the outcomes of those in flight; files without one are reported
//! skipped (interrupted). A second signal stops waiting.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::consumer;
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::cluster::wire::{self, JobBatch, OutcomeBatch, WireFile, WirePath};
use crate::cluster::{
    cancel_subject, connect, jobs_subject, outcomes_subject, take, workers_consumer, Conn, Queue,
    Unreachable, ACK_WAIT, OUTCOMES_STREAM,
};
use crate::config::Config;
use crate::error::{FileError, Kind};
use crate::report::{self, Summary};
use crate::signals::{self, Shutdown};
use crate::sink::manifest::ManifestSink;
use crate::source::walk::Walk;
use crate::source::{Outlet, Source};
use crate::travel::{Event, Msg, Outcome, Stats};

/// After a first signal, how long the coordinator waits with no outcome arriving and no job in
/// flight before it stops waiting.
const QUIET: Duration = Duration::from_secs(3);

/// How long without a single outcome, jobs outstanding, before the coordinator says why.
const STALLED: Duration = Duration::from_secs(30);

/// What the publisher and the outcome reader share.
#[derive(Default)]
struct Ledger {
    /// Files published, whose outcome is awaited.
    expected: Mutex<HashSet<PathBuf>>,
    /// How many (files) were published.
    published: AtomicU64,
    /// The walk and the publishing are over.
    walked: AtomicBool,
}

/// A run id: unique, and a plain name (a subject token).
fn run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{secs:x}-{:08x}", h.finish() as u32)
}

/// Runs a batch over `cfg.root` through the queue; `root` is the name the workers map it by.
pub(crate) fn run(cfg: &Config, queue: &Queue, root: &str, shutdown: &Shutdown) -> Result<Summary> {
    if !wire::valid_name(root) {
        return Err(Unreachable(anyhow!(
            "--root-name {root:?}: a root's name is 1 to 64 of A-Z a-z 0-9 _ - (the workers map it with --root {root}=PATH)"
        ))
        .into());
    }
    if cfg.out.is_some() || cfg.remove_source || cfg.follow_symlinks {
        return Err(Unreachable(anyhow!(
            "--out, --remove-source and --follow-symlinks are not available with --queue yet"
        ))
        .into());
    }
    let conn = connect(queue, "filepipe-coordinator")?;
    let run = run_id();
    // The root's consumer, so that its jobs wait for workers even if none has started yet.
    let workers = conn
        .rt
        .block_on(workers_consumer(&conn.js, root))
        .context("creating the workers' consumer")
        .map_err(Unreachable)?;
    let outcomes = conn
        .rt
        .block_on(async {
            let stream = conn.js.get_stream(OUTCOMES_STREAM).await?;
            // Durable, so that it outlives a restart of the server; removed by the server
            // an hour after the coordinator stops reading.
            let c = stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(format!("coordinator-{run}")),
                    filter_subject: outcomes_subject(&run),
                    // Acknowledged once handed to the reporter: a batch lost on the way (a
                    // read cut short) is delivered again, and its files counted once.
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(10),
                    deliver_policy: consumer::DeliverPolicy::All,
                    inactive_threshold: Duration::from_secs(3600),
                    ..Default::default()
                })
                .await?;
            anyhow::Ok(c)
        })
        .context("reading the outcome stream")
        .map_err(Unreachable)?;
    tracing::info!(%run, root, queue = %queue.url, "coordinating");
    let stats = Stats::default();
    let ledger = Ledger::default();
    let (job_tx, job_rx) = bounded::<Msg>(4);
    let (event_tx, event_rx) = bounded::<Event>(1024);
    std::thread::scope(|s| {
        let reporter = std::thread::Builder::new()
            .name("filepipe-reporter".into())
            .spawn_scoped(s, || {
                let mut sink = ManifestSink::new(cfg);
                report::run(
                    cfg,
                    cfg.op.as_str(),
                    event_rx,
                    &stats,
                    &mut sink,
                    None,
                    shutdown,
                )
            })
            .context("starting the reporter")?;
        let walker = {
            let events = event_tx.clone();
            let stats = &stats;
            std::thread::Builder::new()
                .name("filepipe-source".into())
                .spawn_scoped(s, move || {
                    let out = Outlet {
                        jobs: &job_tx,
                        events: &events,
                        stats,
                        recorded: None,
                    };
                    Walk::new(cfg, shutdown).run(out)
                })
                .context("starting the walk")?
        };
        let publisher = std::thread::Builder::new()
            .name("filepipe-publish".into())
            .spawn_scoped(s, || {
                let r = publish(cfg, &conn, &run, root, &job_rx, &ledger, shutdown);
                ledger.walked.store(true, Ordering::Release);
                r
            })
            .context("starting the publisher")?;
        let gathered = gather(
            &conn, &outcomes, &workers, &run, &ledger, &event_tx, shutdown,
        );
        // Whatever stopped the gathering, the walk and the publisher stop too.
        if gathered.is_err() {
            shutdown.request(0);
        }
        drop(event_tx);
        let published = publisher
            .join()
            .map_err(|_| anyhow!("the publisher panicked"))?;
        let walked = walker.join().map_err(|_| anyhow!("the walk panicked"))?;
        let summary = reporter
            .join()
            .map_err(|_| anyhow!("the reporter panicked"))??;
        gathered?;
        published?;
        walked?;
        Ok(summary)
    })
}

/// Publishes the walk's batches as job messages until the walk ends (or a signal).
fn publish(
    cfg: &Config,
    conn: &Conn,
    run: &str,
    root: &str,
    jobs: &Receiver<Msg>,
    ledger: &Ledger,
    shutdown: &Shutdown,
) -> Result<()> {
    let subject = jobs_subject(root, run);
    let mut seq = 0u64;
    // Messages published and not yet confirmed stored: up to WINDOW at once, so a run does
    // not pay a round trip per message; each is confirmed in order.
    let mut unconfirmed: VecDeque<Pending> = VecDeque::new();
    for msg in jobs {
        let Msg::Jobs(batch) = msg else { continue };
        if shutdown.requested() {
            // Drained, not published: the walk stops at the signal too.
            continue;
        }
        if let Ok(mut expected) = ledger.expected.lock() {
            expected.extend(batch.iter().map(|j| j.rel.clone()));
        }
        // Sizes are not sent: the walk already put each large file in a message of its own.
        let rels: Vec<PathBuf> = batch.into_iter().map(|j| j.rel).collect();
        // One message, or several where long names (six bytes a character once escaped)
        // would make it too large to be stored.
        let mut rest = &rels[..];
        while !rest.is_empty() {
            let (n, payload) = wire::fitting(rest, usize::MAX, |part| {
                serde_json::to_vec(&JobBatch {
                    v: wire::VERSION,
                    run: run.to_owned(),
                    root: root.to_owned(),
                    op: cfg.op,
                    level: cfg.level,
                    force: cfg.force,
                    files: part
                        .iter()
                        .map(|rel| WireFile {
                            rel: WirePath::of(rel),
                            size: 0,
                        })
                        .collect(),
                })
            })?;
            seq += 1;
            let mut p = Pending {
                id: format!("{run}.{seq}"),
                payload: payload.into(),
                files: rest[..n].to_vec(),
                ack: None,
            };
            p.ack = conn.rt.block_on(p.send(conn, &subject)).ok();
            unconfirmed.push_back(p);
            rest = &rest[n..];
        }
        while unconfirmed.len() > WINDOW {
            if let Some(p) = unconfirmed.pop_front() {
                // An error only while stopping: the files of the messages behind it stay
                // awaited too, and are reported interrupted unless an outcome comes.
                confirm(conn, &subject, p, ledger, shutdown)?;
            }
        }
    }
    while let Some(p) = unconfirmed.pop_front() {
        confirm(conn, &subject, p, ledger, shutdown)?;
    }
    Ok(())
}

/// Job messages published at once, their stores not yet confirmed.
const WINDOW: usize = 64;

/// A job message on its way.
struct Pending {
    /// Its message id: a retry is stored once.
    id: String,
    payload: bytes::Bytes,
    files: Vec<PathBuf>,
    /// The server's confirmation to come (`None`: the publish itself failed).
    ack: Option<async_nats::jetstream::context::PublishAckFuture>,
}

impl Pending {
    async fn send(
        &self,
        conn: &Conn,
        subject: &str,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", self.id.as_str());
        Ok(conn
            .js
            .publish_with_headers(subject.to_owned(), headers, self.payload.clone())
            .await?)
    }
}

/// Waits for `p` to be stored, publishing it again (same id) while the server fails to say
/// so; then its files count as published.
fn confirm(
    conn: &Conn,
    subject: &str,
    mut p: Pending,
    ledger: &Ledger,
    shutdown: &Shutdown,
) -> Result<()> {
    let mut pause = Duration::from_millis(100);
    loop {
        let stored = match p.ack.take() {
            Some(ack) => conn
                .rt
                .block_on(async { ack.await })
                .map_err(anyhow::Error::from),
            None => Err(anyhow!("not sent")),
        };
        match stored {
            Ok(_) => break,
            Err(e) if !shutdown.requested() => {
                tracing::warn!(error = %e, "publishing jobs failed; retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
                p.ack = conn.rt.block_on(p.send(conn, subject)).ok();
            }
            Err(e) => {
                // Stopping: this message may not be stored. Its files stay awaited, and are
                // reported interrupted unless an outcome comes.
                return Err(e).context("publishing jobs");
            }
        }
    }
    ledger
        .published
        .fetch_add(p.files.len() as u64, Ordering::Release);
    Ok(())
}

/// Reads outcomes and hands each file's first one to the reporter, until every published file
/// has one (or, after a signal, until the jobs in flight are done).
fn gather(
    conn: &Conn,
    outcomes: &consumer::PullConsumer,
    workers: &consumer::PullConsumer,
    run: &str,
    ledger: &Ledger,
    events: &Sender<Event>,
    shutdown: &Shutdown,
) -> Result<()> {
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut last_outcome = Instant::now();
    let mut last_warning = Instant::now();
    let mut cancelled_at: Option<Instant> = None;
    loop {
        let walked = ledger.walked.load(Ordering::Acquire);
        let published = ledger.published.load(Ordering::Acquire) as usize;
        // Every file sent (or about to be) has its outcome: the files of a message whose store
        // was never confirmed (a signal stopped the publishing) are awaited too, and reported
        // interrupted below unless an outcome comes.
        let awaited = ledger.expected.lock().map_or(usize::MAX, |e| e.len());
        if walked && seen.len() >= awaited && !shutdown.requested() {
            return Ok(());
        }
        if walked && seen.len() >= awaited {
            return interrupted(ledger, &seen, events);
        }
        if shutdown.requested() && walked {
            if cancelled_at.is_none() {
                cancelled_at = Some(Instant::now());
                // Workers drop the run's jobs they have not started (removing them from the
                // stream by subject would upset the consumer on a 2.9 server: nats-server
                // issue 5075). Stored, so a worker that was not listening finds it too.
                let said = conn.rt.block_on(async {
                    let ack = conn.js.publish(cancel_subject(run), "".into()).await?;
                    ack.await.map_err(anyhow::Error::from)
                });
                match said {
                    Ok(_) => tracing::info!(
                        "interrupted: workers told to drop the run's jobs not yet started"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "telling the workers the run is cancelled failed: they will do its jobs")
                    }
                }
            }
            // Done waiting once outcomes have stopped and no job of this root is in flight, or
            // after an ack wait at most (other runs' jobs count as in flight too).
            let waited = cancelled_at.is_some_and(|t| t.elapsed() >= ACK_WAIT + QUIET);
            let idle =
                last_outcome.elapsed() >= QUIET && in_flight(conn, workers).is_ok_and(|n| n == 0);
            if idle || waited || signals::aborted() {
                return interrupted(ledger, &seen, events);
            }
        }
        let msgs = conn
            .rt
            .block_on(take(outcomes, 256, Duration::from_millis(250)));
        let msgs = match msgs {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading outcomes failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let mut firsts = Vec::new();
        for m in &msgs {
            let batch: OutcomeBatch = match serde_json::from_slice(&m.payload) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "an outcome message that does not read: ignored");
                    continue;
                }
            };
            if batch.v != wire::VERSION || batch.run != run {
                continue;
            }
            let expected = ledger
                .expected
                .lock()
                .map_err(|_| anyhow!("the ledger is poisoned"))?;
            for w in &batch.outcomes {
                let outcome = match w.outcome() {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::warn!(worker = %batch.worker, error = %e, "an outcome that does not read: ignored");
                        continue;
                    }
                };
                // Only files this run published, each once: the first outcome counts.
                let rel = outcome.rel().to_path_buf();
                if expected.contains(&rel) && seen.insert(rel) {
                    firsts.push(outcome);
                }
            }
        }
        let firsts_sent = !firsts.is_empty();
        if firsts_sent {
            last_outcome = Instant::now();
            events
                .send(Event::Finished(firsts))
                .map_err(|_| anyhow!("the reporter has stopped"))?;
        }
        // Handed on: not to be delivered again (an ack lost only costs a duplicate, dropped).
        conn.rt.block_on(async {
            for m in &msgs {
                let _ = m.ack().await;
            }
        });
        if !firsts_sent
            && last_outcome.elapsed() >= STALLED
            && last_warning.elapsed() >= STALLED
            && seen.len() < published
        {
            last_warning = Instant::now();
            let waiting = waiting_workers(conn, workers).unwrap_or(0);
            if waiting == 0 {
                tracing::warn!(
                    outstanding = published - seen.len(),
                    "no outcome for {STALLED:?} and no worker is asking for jobs: start `filepipe worker --queue ... --root NAME=PATH`"
                );
            } else {
                tracing::warn!(
                    outstanding = published - seen.len(),
                    workers_waiting = waiting,
                    "no outcome for {STALLED:?}"
                );
            }
        }
    }
}

/// The files published and without an outcome, reported as not processed.
fn interrupted(ledger: &Ledger, seen: &HashSet<PathBuf>, events: &Sender<Event>) -> Result<()> {
    let expected = ledger
        .expected
        .lock()
        .map_err(|_| anyhow!("the ledger is poisoned"))?;
    let left: Vec<Outcome> = expected
        .iter()
        .filter(|rel| !seen.contains(*rel))
        .map(|rel| Outcome::Skipped {
            rel: rel.clone(),
            reason: FileError::new(
                Kind::Interrupted,
                "not processed: the run was interrupted before a worker finished it",
            ),
        })
        .collect();
    if !left.is_empty() {
        events
            .send(Event::Finished(left))
            .map_err(|_| anyhow!("the reporter has stopped"))?;
    }
    Ok(())
}

/// Jobs of this root delivered to workers and not yet acknowledged (all runs').
fn in_flight(conn: &Conn, workers: &consumer::PullConsumer) -> Result<usize> {
    Ok(consumer_info(conn, workers)?.num_ack_pending)
}

/// Workers of this root asking for jobs right now.
fn waiting_workers(conn: &Conn, workers: &consumer::PullConsumer) -> Result<usize> {
    Ok(consumer_info(conn, workers)?.num_waiting)
}

fn consumer_info(conn: &Conn, workers: &consumer::PullConsumer) -> Result<consumer::Info> {
    let mut c = workers.clone();
    conn.rt
        .block_on(async { anyhow::Ok(c.info().await?.clone()) })
}
