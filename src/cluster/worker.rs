//! `filepipe worker`: takes job messages from the workers' consumer and routes each to a
//! pipeline for its run (one per run, root, op and level, started at its first message and
//! stopped when idle), each a `pipeline::run` between a queue source and a queue sink. The
//! router owns the messages: it acknowledges one once its source says every file of it is
//! recorded, sends in-progress acks for those it holds, and on a stop hands back what it could
//! not finish, so nothing waits out the ack wait.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use crossbeam_channel::{Receiver, Sender};

use crate::cli::{OpKind, WorkerArgs};
use crate::cluster::wire::{self, JobBatch, OutcomeBatch, WireOutcome, WireStatus};
use crate::cluster::{
    connect, outcomes_subject, take, whoami, Conn, Queue, Unreachable, JOBS_STREAM, MAX_DELIVER,
    PROGRESS_EVERY, WORKERS,
};
use crate::config::{self, Config, Filter};
use crate::error::Kind;
use crate::pipeline;
use crate::report::Summary;
use crate::signals::Shutdown;
use crate::sink::queue::QueueSink;
use crate::source::queue::{Delivery, QueueSource, Settled};
use crate::travel::Stats;

/// A pipeline with no message for this long stops (a finished run's).
const IDLE: Duration = Duration::from_secs(30);

/// Messages a worker holds at most, per worker thread: enough that no thread waits for the
/// next fetch, few enough that a worker that dies holds little that must wait for redelivery.
const HELD_PER_THREAD: usize = 32;

/// What a pipeline is for: jobs with the same key share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    run: String,
    root: String,
    op: OpKind,
    level: u32,
    force: bool,
}

/// A running pipeline.
struct Running {
    deliveries: Sender<Delivery>,
    thread: JoinHandle<Result<Summary>>,
    held: usize,
    last: Instant,
}

/// The roots a worker maps: `NAME=PATH`, each path an existing directory.
fn roots(args: &[String]) -> Result<HashMap<String, PathBuf>> {
    let mut roots = HashMap::new();
    for a in args {
        let Some((name, path)) = a.split_once('=') else {
            bail!("--root {a}: expected NAME=PATH");
        };
        if !wire::valid_name(name) {
            bail!("--root {a}: a root's name is 1 to 64 of A-Z a-z 0-9 _ -");
        }
        let path = std::fs::canonicalize(path)
            .with_context(|| format!("--root {a}: {path} is not reachable"))?;
        if !path.is_dir() {
            bail!("--root {a}: {} is not a directory", path.display());
        }
        if roots.insert(name.to_owned(), path).is_some() {
            bail!("--root {name} given twice");
        }
    }
    Ok(roots)
}

/// Runs a worker until a shutdown is requested; `Unreachable` if it cannot start.
pub(crate) fn run(args: &WorkerArgs, shutdown: &Shutdown) -> Result<()> {
    let roots = roots(&args.roots).map_err(Unreachable)?;
    let queue = Queue {
        url: args.queue.clone(),
        creds: args.creds.clone(),
    };
    let conn = connect(&queue, "filepipe-worker")?;
    let consumer: PullConsumer = conn
        .rt
        .block_on(async {
            let stream = conn.js.get_stream(JOBS_STREAM).await?;
            anyhow::Ok(
                stream
                    .get_consumer(WORKERS)
                    .await
                    .map_err(|e| anyhow!("{e}"))?,
            )
        })
        .context("binding the workers' consumer")
        .map_err(Unreachable)?;
    let jobs = args.jobs.map_or_else(config::default_jobs, usize::from);
    tracing::info!(queue = %args.queue, roots = ?roots.keys().collect::<Vec<_>>(), jobs, "worker ready");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let mut router = Router {
        conn: &conn,
        consumer,
        roots,
        jobs,
        durability: args.durability.unwrap_or_default(),
        me: whoami(),
        held: HashMap::new(),
        next_id: 0,
        pipelines: HashMap::new(),
        warned: HashSet::new(),
        settled: crossbeam_channel::unbounded(),
    };
    router.run(shutdown)
}

struct Router<'a> {
    conn: &'a Conn,
    consumer: PullConsumer,
    roots: HashMap<String, PathBuf>,
    jobs: usize,
    durability: crate::fsio::output::Durability,
    me: String,
    /// Messages held, by id, with the pipeline each went to.
    held: HashMap<u64, (jetstream::Message, Key)>,
    next_id: u64,
    pipelines: HashMap<Key, Running>,
    /// Root names already warned about (jobs for roots this worker does not map).
    warned: HashSet<String>,
    settled: (Sender<Settled>, Receiver<Settled>),
}

impl Router<'_> {
    fn run(&mut self, shutdown: &Shutdown) -> Result<()> {
        let most = HELD_PER_THREAD * self.jobs;
        let mut last_progress = Instant::now();
        let mut pause = Duration::ZERO;
        while !shutdown.requested() {
            self.settle_ready();
            if last_progress.elapsed() >= PROGRESS_EVERY {
                self.progress();
                last_progress = Instant::now();
            }
            self.reap(false)?;
            let room = most.saturating_sub(self.held.len());
            if room == 0 {
                if let Ok(s) = self.settled.1.recv_timeout(Duration::from_millis(200)) {
                    self.settle(s);
                }
                continue;
            }
            match self.fetch(room) {
                Ok(msgs) => {
                    pause = Duration::ZERO;
                    for m in msgs {
                        self.take(m)?;
                    }
                }
                Err(e) => {
                    // The server is down or moving: the client reconnects by itself; this only
                    // waits, more each time, never spins.
                    pause = (pause * 2).clamp(Duration::from_millis(250), Duration::from_secs(10));
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?pause, "fetching jobs failed");
                    std::thread::sleep(pause);
                }
            }
        }
        tracing::info!(held = self.held.len(), "stopping: finishing the jobs held");
        self.reap(true)?;
        // What no pipeline settled (it stopped early) goes back at once.
        for (_, (m, _)) in self.held.drain() {
            let _ = self.conn.rt.block_on(m.ack_with(AckKind::Nak(None)));
        }
        Ok(())
    }

    /// Up to `n` messages, waiting at most half a second for the first.
    fn fetch(&self, n: usize) -> Result<Vec<jetstream::Message>> {
        let wait = Duration::from_millis(500);
        self.conn.rt.block_on(take(&self.consumer, n, wait))
    }

    /// Routes one message to its pipeline (starting it if need be), or settles it at once
    /// when it cannot be run here.
    fn take(&mut self, m: jetstream::Message) -> Result<()> {
        let delivered = m.info().map_or(1, |i| i.delivered);
        let batch = match JobBatch::parse(&m.payload) {
            Ok(b) => b,
            Err(e) => {
                // Not a job anyone can run: never delivered again. Without a valid run there
                // is no coordinator to tell.
                tracing::error!(subject = %m.subject, error = %e, "refused a job message");
                let _ = self.conn.rt.block_on(m.ack_with(AckKind::Term));
                return Ok(());
            }
        };
        let Some(root) = self.roots.get(&batch.root).cloned() else {
            if self.warned.insert(batch.root.clone()) {
                tracing::warn!(root = %batch.root, "jobs for a root this worker does not map (--root {}=PATH): left for other workers", batch.root);
            }
            let later = AckKind::Nak(Some(Duration::from_secs(5)));
            let _ = self.conn.rt.block_on(m.ack_with(later));
            return Ok(());
        };
        if delivered > MAX_DELIVER {
            // Every worker that took it died or hung on it: its files fail, for good.
            let message = format!(
                "delivered {delivered} times without an outcome: each worker that took it \
                 stopped before finishing it"
            );
            self.fail_all(&batch, &message)?;
            let _ = self.conn.rt.block_on(m.ack_with(AckKind::Term));
            return Ok(());
        }
        let key = Key {
            run: batch.run.clone(),
            root: batch.root.clone(),
            op: batch.op,
            level: batch.level,
            force: batch.force,
        };
        if !self.pipelines.contains_key(&key) {
            let running = self.start(&key, root)?;
            self.pipelines.insert(key.clone(), running);
        }
        let id = self.next_id;
        self.next_id += 1;
        let files = batch.files;
        let Some(p) = self.pipelines.get_mut(&key) else {
            bail!("a pipeline vanished");
        };
        p.held += 1;
        p.last = Instant::now();
        self.held.insert(id, (m, key));
        if p.deliveries.send(Delivery { id, files }).is_err() {
            // It stopped (a sink failure); its messages are handed back below.
            tracing::warn!("a pipeline stopped; its jobs go back to the queue");
        }
        Ok(())
    }

    /// Publishes a failed outcome for every file of `batch`.
    fn fail_all(&self, batch: &JobBatch, message: &str) -> Result<()> {
        let outcomes = batch
            .files
            .iter()
            .map(|f| WireOutcome {
                rel: f.rel.clone(),
                status: WireStatus::Failed,
                kind: Some(Kind::Internal.as_str().into()),
                message: Some(message.into()),
                errno: None,
                bytes_in: 0,
                bytes_out: 0,
                digest: None,
            })
            .collect();
        let out = OutcomeBatch {
            v: wire::VERSION,
            run: batch.run.clone(),
            worker: self.me.clone(),
            outcomes,
        };
        let payload = serde_json::to_vec(&out)?;
        self.conn
            .rt
            .block_on(async {
                let ack = self
                    .conn
                    .js
                    .publish(outcomes_subject(&batch.run), payload.into())
                    .await?;
                ack.await.map_err(anyhow::Error::from)
            })
            .context("publishing the outcomes of a job delivered too often")?;
        Ok(())
    }

    /// Starts the pipeline for `key`, on files under `root`.
    fn start(&self, key: &Key, root: PathBuf) -> Result<Running> {
        let cfg = Config {
            root: root.clone(),
            op: key.op,
            jobs: self.jobs,
            out: None,
            manifest: None,
            failure_log: None,
            level: key.level,
            filter: Filter::default(),
            follow_symlinks: false,
            force: key.force,
            remove_source: false,
            durability: self.durability,
            json: false,
            quiet: true,
            progress: false,
            own_files: Vec::new(),
            watch: None,
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let settled = self.settled.0.clone();
        let sink = QueueSink::new(
            self.conn.rt.handle().clone(),
            self.conn.js.clone(),
            key.run.clone(),
            self.me.clone(),
        );
        tracing::info!(run = %key.run, root = %key.root, op = key.op.as_str(), "pipeline started");
        let thread = std::thread::Builder::new()
            .name(format!("filepipe-run-{}", key.run))
            .spawn(move || {
                let mut source = QueueSource::new(root, rx, settled);
                let mut sink = sink;
                // Its own stop signal, never raised: a worker's pipelines finish what they hold
                // (a second signal still abandons it, handed back for redelivery).
                let stop = Arc::new(Shutdown::default());
                let stats = Stats::default();
                pipeline::run(&cfg, &stop, &mut source, &mut sink, &stats)
            })
            .context("starting a pipeline thread")?;
        Ok(Running {
            deliveries: tx,
            thread,
            held: 0,
            last: Instant::now(),
        })
    }

    /// Settles what the pipelines report settled.
    fn settle_ready(&mut self) {
        while let Ok(s) = self.settled.1.try_recv() {
            self.settle(s);
        }
    }

    fn settle(&mut self, s: Settled) {
        let Some((m, key)) = self.held.remove(&s.id) else {
            return;
        };
        if let Some(p) = self.pipelines.get_mut(&key) {
            p.held -= 1;
        }
        let kind = if s.done {
            AckKind::Ack
        } else {
            AckKind::Nak(None)
        };
        if let Err(e) = self.conn.rt.block_on(m.ack_with(kind)) {
            // Unacknowledged, it is delivered again after the ack wait: its files are then
            // found up to date, and the coordinator counts each file once.
            tracing::warn!(error = %e, "acknowledging a job failed");
        }
    }

    /// Tells the server the jobs held are being worked on.
    fn progress(&self) {
        for (m, _) in self.held.values() {
            if let Err(e) = self.conn.rt.block_on(m.ack_with(AckKind::Progress)) {
                tracing::debug!(error = %e, "in-progress ack failed");
                break;
            }
        }
    }

    /// Stops idle pipelines (all of them with `all`, once each has finished what it holds).
    fn reap(&mut self, all: bool) -> Result<()> {
        let idle: Vec<Key> = self
            .pipelines
            .iter()
            .filter(|(_, p)| {
                all || p.thread.is_finished() || p.held == 0 && p.last.elapsed() > IDLE
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in idle {
            let Some(p) = self.pipelines.remove(&key) else {
                continue;
            };
            drop(p.deliveries);
            // Its last messages settle while it drains; the server hears they are worked on.
            let mut last_progress = Instant::now();
            while !p.thread.is_finished() {
                if let Ok(s) = self.settled.1.recv_timeout(Duration::from_millis(100)) {
                    self.settle(s);
                }
                if last_progress.elapsed() >= PROGRESS_EVERY {
                    self.progress();
                    last_progress = Instant::now();
                }
            }
            self.settle_ready();
            match p.thread.join() {
                Ok(Ok(summary)) => tracing::info!(
                    run = %key.run,
                    done = summary.done,
                    skipped = summary.skipped,
                    failed = summary.failed,
                    "pipeline finished"
                ),
                Ok(Err(e)) => {
                    tracing::error!(run = %key.run, error = %format!("{e:#}"), "pipeline stopped")
                }
                Err(_) => tracing::error!(run = %key.run, "pipeline panicked"),
            }
        }
        Ok(())
    }
}
