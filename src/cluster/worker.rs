//! `filepipe worker`: takes job messages from the workers' consumer and routes each to a
//! pipeline for its run (one per run, root, ops and level, started at its first message and
//! stopped when idle), each a `pipeline::run` between a queue source and a queue sink. The
//! router owns the messages: it acknowledges one once its source says every file of it is
//! recorded, sends in-progress acks for those it holds, and on a stop hands back what it could
//! not finish, so nothing waits out the ack wait. Outcomes go back in the format of their job
//! (binary for a job of version 4, JSON for one of a coordinator from before it).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use crossbeam_channel::{Receiver, Sender};

use crate::cli::OpSpec;
use crate::cluster::wire::{self, Format, JobBatch, OutcomeBatchOut, WireOutcome, WireStatus};
use crate::cluster::wire4::Records;
use crate::cluster::{
    await_workers_consumer, connect_or_await, may_publish, outcomes_subject, take, whoami,
    workers_consumer, Conn, Missing, Queue, Unreachable, MAX_DELIVER, NO_ANSWER, PROGRESS_EVERY,
};
use crate::config::{Config, Filter, WorkerConfig};
use crate::error::{FileError, Kind};
use crate::fsio::aside::{self, Aside};
use crate::pipeline;
use crate::report::{self, Summary};
use crate::signals::Shutdown;
use crate::sink::queue::QueueSink;
use crate::source::queue::{Delivered, Delivery, QueueSource, Settled};
use crate::travel::{Stamp, Stats};

/// How long a job handed back waits before it is delivered again: never a busy loop.
const NAK_DELAY: Duration = Duration::from_secs(1);

/// How long a job handed back as this worker stops asking for jobs of its root (the root
/// rests, or the worker stops) waits before it is delivered again: longer than a request of
/// this worker's left waiting lasts (`REQUEST_LIFE`), so that when the job comes due none of
/// them is still on the server, expired or let go, which nats-server 2.9 loses a delivery to
/// (see `REQUEST_LIFE`), and another worker's request has the job, not one of this worker's
/// left from before it stopped asking.
const HAND_BACK: Duration = Duration::from_secs(3);

/// How long a job that goes back because its pipeline failed here (or because what it names
/// rests here) waits before it is delivered again, by the server's count of its deliveries so
/// far, which is every worker's: 3 s after the first (another worker may do it: `HAND_BACK`),
/// then 10, 20 and 40 s. Its last attempt (the `MAX_DELIVER`th delivery) then comes at least
/// 73 s after its first however many workers fail on it in turn, and the worker that has it
/// then fails its files with the reason (`Router::after_stop`). With waits of 1 to 10 s, a job whose
/// shared output root was away for a moment failed for good in about 15 s with two workers
/// (found by a review); with 1, 5, 10 and 20 s before its attempts, in 36 s (found by the
/// next review).
fn back_off(delivered: i64) -> Duration {
    match delivered {
        ..=1 => HAND_BACK,
        2 => Duration::from_secs(10),
        3 => Duration::from_secs(20),
        _ => Duration::from_secs(40),
    }
}

/// Whether the directory at `path` (a root) opens now, through none but filepipe's user's
/// symlinks, as a pipeline opens it: what rests decide on.
fn dir_opens(path: &std::path::Path) -> bool {
    use rustix::fs::OFlags;
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    crate::fsio::canonical::open(path, flags).is_ok()
}

/// Whether the output root at `path` opens now as a pipeline opens it (for reading: a
/// directory of mode 000 opens by `O_PATH` only, and was taken for working; found by a
/// review).
fn out_root_opens(path: &std::path::Path) -> bool {
    crate::fsio::output::open_root(path).is_ok()
}

/// Whether `e` says the server did not answer (away, restarting), as the client or our own
/// bounds (`take`, `NO_ANSWER`) word it, rather than that it answered no.
fn no_answer(e: &anyhow::Error) -> bool {
    let said = format!("{e:#}");
    [NO_ANSWER, "timed out", "no responders"]
        .iter()
        .any(|w| said.contains(w))
}

/// The server's count of `m`'s deliveries (this one included).
fn deliveries(m: &jetstream::Message) -> i64 {
    m.info().map_or(1, |i| i.delivered)
}

/// Whether `m` is a job the coordinator published again (`LostJobs`: its message id says
/// `again`), once it found the job gone from the stream with no outcome read for its files.
/// An earlier delivery may have done them all the same, its outcome lost with a server that
/// went down (a test restarting the server saw 66 of 604 files counted skipped, up to date, by
/// such a job): its up-to-date outputs are judged as a redelivered job's are, by what they
/// hold. (Anyone who may publish a job can say so: it only has an up-to-date output compared
/// byte for byte with its input before it counts done.)
fn published_again(m: &jetstream::Message) -> bool {
    m.headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .is_some_and(|id| id.as_str().contains(".again"))
}

/// How long a root whose pipeline stopped with an error is first left alone (see `Rest`);
/// each stop in a row doubles it, up to `REST_MOST`.
const REST_FIRST: Duration = Duration::from_secs(5);

/// The longest a root is left alone after its pipelines stopped.
const REST_MOST: Duration = Duration::from_secs(60);

/// A pipeline with no message for this long stops (a finished run's).
const IDLE: Duration = Duration::from_secs(30);

/// How long the router waits for a job, when no root has one now, before it looks again
/// (see `Router::fetch`).
const WAIT_FOR_JOBS: Duration = Duration::from_millis(500);

/// How long a pull request left waiting for a job lasts on the server. The next one is asked
/// for while the last still has `RENEW_WITHIN` to go, so each root always has one that has not
/// expired: nats-server before 2.11 (Debian's 2.9.10) counts a delivery it never makes when a
/// job handed back with a delay comes due just as the only request left waiting has expired
/// (its "redo" path, fixed upstream in nats-server PR 5305), and the job then waits out the
/// ack wait, an attempt spent for nothing. With one request of half a second at a time, about
/// one job in a hundred handed back lost an attempt that way: the last one's files failed
/// `internal`, untried, 101 s after their first delivery, and others failed for good sooner
/// than the 71 s then promised (found by a review; the server's trace showed the deliveries).
const REQUEST_LIFE: Duration = Duration::from_secs(2);

/// See `REQUEST_LIFE`: more than the router's longest wait between looks (`WAIT_FOR_JOBS`).
const RENEW_WITHIN: Duration = Duration::from_secs(1);

// A job handed back comes due a second after the requests of the worker that let it go are
// gone; a request is renewed before the router's next look finds it expired.
const _: () = assert!(HAND_BACK.as_millis() >= REQUEST_LIFE.as_millis() + 1000);
const _: () = assert!(RENEW_WITHIN.as_millis() > WAIT_FOR_JOBS.as_millis());
const _: () = assert!(RENEW_WITHIN.as_millis() < REQUEST_LIFE.as_millis());

/// How often a worker looks for a missing consumer made again (`Router::missing`), as it
/// waits for one at its start.
const MISSING_EVERY: Duration = Duration::from_secs(1);

/// Messages a worker holds at most, per worker thread: enough that no thread waits for the
/// next fetch, few enough that a worker that dies holds little that must wait for redelivery.
const HELD_PER_THREAD: usize = 32;

/// What a pipeline is for: jobs with the same key share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    run: String,
    root: String,
    /// The op, or the several results from one read (`ops::multi`), as a local run has them.
    spec: OpSpec,
    level: u32,
    force: bool,
    /// The output root's name and where it is mounted here (`None`: next to the inputs).
    out: Option<(String, PathBuf)>,
    /// Inputs removed once their outputs are durable.
    remove_source: bool,
    /// The move roots' names (mapped in `Router::move_roots`): where inputs done
    /// (`--move-source`) and inputs failed for good (`--move-failed`) are moved.
    move_source: Option<String>,
    move_failed: Option<String>,
    /// Symlinks followed, to what lies beneath the root only.
    follow_symlinks: bool,
    /// Files larger are skipped unread (`--max-size` of the coordinator).
    max_size: Option<u64>,
    /// The jobs' format, which their outcomes take (a coordinator may send both: JSON for
    /// the jobs a worker from before version 4 refused).
    format: Format,
}

/// A running pipeline.
struct Running {
    deliveries: Sender<Delivery>,
    /// Raised when its sink failed: nothing more is routed to it, and what it holds is let
    /// go (no more in-progress acks), to be delivered again.
    stop: Arc<Shutdown>,
    thread: JoinHandle<Result<Summary>>,
    held: usize,
    last: Instant,
}

/// Runs a worker until a shutdown is requested; `Unreachable` if it cannot start.
pub(crate) fn run(cfg: &WorkerConfig, shutdown: &Shutdown) -> Result<()> {
    let roots = cfg.roots.clone();
    let out_roots = cfg.out_roots.clone();
    // Each opened once, here, as a local batch opens its --move-source: every move goes
    // beneath that descriptor, never by the path again.
    let mut move_roots = HashMap::new();
    for (name, path) in &cfg.move_roots {
        let aside = Aside::open(path)
            .with_context(|| format!("cannot open --move-root {name}={}", path.display()))
            .map_err(Unreachable)?;
        move_roots.insert(name.clone(), Arc::new(aside));
    }
    // Checked by identity too, as a local batch checks its --move-source: a bind mount or a
    // hard-linked directory hides an overlap from the paths `WorkerConfig::resolve` compares,
    // and moved inputs would land among the inputs (to be taken again) or the outputs. Two
    // move roots may not overlap either: any job may pair any two of them, and done and
    // failed inputs would be mixed.
    for (name, aside) in &move_roots {
        let others = roots
            .iter()
            .map(|(n, p)| (n, p, "input root"))
            .chain(out_roots.iter().map(|(n, p)| (n, p, "output root")))
            .chain(
                cfg.move_roots
                    .iter()
                    .filter(|(n, _)| *n != name)
                    .map(|(n, p)| (n, p, "move root")),
            );
        for (other, path, what) in others {
            let how = aside::overlap(path, aside)
                .with_context(|| format!("cannot examine --move-root {name}"))
                .map_err(Unreachable)?;
            if let Some(how) = how {
                return Err(Unreachable(anyhow::anyhow!(
                    "--move-root {name}={} {how} {what} {other} ({}) (by a bind mount or \
                     hard-linked directory): moved inputs would be seen again or mixed with \
                     outputs or other moved inputs; choose a directory apart from it",
                    cfg.move_roots[name].display(),
                    path.display()
                ))
                .into());
            }
        }
    }
    // Output roots likewise, against the input roots: a bind mount (or FUSE view) of an
    // input tree's directory given as an output root got outputs written among the inputs
    // (found by a review), which `WorkerConfig::resolve`'s paths do not show; and against
    // each other.
    let flags =
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
    for (name, out) in &out_roots {
        let fd = rustix::fs::open(out, flags, rustix::fs::Mode::empty())
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot open --out-root {name}={}", out.display()))
            .map_err(Unreachable)?;
        // And against the other output roots: jobs of two coordinators, `sub/x` to one and
        // `x` to the other nested in it through a bind mount, would write the same output
        // (`WorkerConfig::resolve` refuses that by path).
        let others = (roots.iter().map(|(n, p)| (n, p, "input root"))).chain(
            (out_roots.iter().filter(|(n, _)| *n != name)).map(|(n, p)| (n, p, "output root")),
        );
        for (other, path, what) in others {
            let how = aside::overlap_at(path, &fd, out)
                .with_context(|| format!("cannot examine --out-root {name}"))
                .map_err(Unreachable)?;
            if let Some(how) = how {
                let why = if what == "input root" {
                    "outputs would be mixed with the inputs"
                } else {
                    "two runs could write the same output"
                };
                return Err(Unreachable(anyhow::anyhow!(
                    "--out-root {name}={} {how} {what} {other} ({}) (by a bind mount, a FUSE \
                     view or a hard-linked directory): {why}; choose a directory apart from it",
                    out.display(),
                    path.display()
                ))
                .into());
            }
        }
    }
    let queue = Queue {
        url: cfg.url.clone(),
        creds: cfg.creds.clone(),
        tls_ca: cfg.tls_ca.clone(),
    };
    // A worker need not be allowed to make the streams: it waits for a coordinator to.
    let Some(conn) = connect_or_await(&queue, "filepipe-worker", Missing::Await(shutdown))? else {
        return Ok(());
    };
    // One consumer per root this worker maps: it is only ever given jobs it can do.
    let mut consumers = Vec::new();
    // Made by a coordinator if this user may not (waiting for it), and refused if it is not
    // as filepipe makes it: exit 2, saying what differs.
    for root in roots.keys() {
        let c = conn
            .rt
            .block_on(await_workers_consumer(
                &conn.js,
                &conn.refusals,
                root,
                shutdown,
            ))
            .with_context(|| format!("binding the workers' consumer for root {root}"))
            .map_err(Unreachable)?;
        let Some(c) = c else {
            return Ok(());
        };
        consumers.push((root.clone(), c));
    }
    // Cancelled runs, as their coordinators say (core NATS: heard only while connected; a job
    // of a cancelled run taken later is simply done). A subscription the server refuses is
    // only said after the fact: flushed, and given a moment for the refusal to be heard.
    let cancels = conn
        .rt
        .block_on(conn.refusals.unless_refused(
            async {
                let sub = conn.client.subscribe("filepipe.cancel.>").await?;
                conn.client.flush().await?;
                anyhow::Ok(sub)
            },
            Duration::from_millis(250),
        ))
        .context("subscribing to cancellations")
        .map_err(Unreachable)?;
    conn.start(may_publish(&conn, &outcomes_subject("permission-probe")))
        .map_err(Unreachable)?;
    let jobs = cfg.jobs;
    tracing::info!(queue = %queue.shown(), roots = %roots.keys().cloned().collect::<Vec<_>>().join(","), jobs, "worker ready");
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("taking jobs"),
    ]);
    let mut router = Router {
        conn: &conn,
        consumers,
        next_consumer: 0,
        tampered: HashSet::new(),
        missing: HashSet::new(),
        resting: HashMap::new(),
        met_rest: HashMap::new(),
        taken: HashMap::new(),
        seen: HashMap::new(),
        given_back: Default::default(),
        cancels,
        cancelled: HashSet::new(),
        checked: HashSet::new(),
        roots,
        out_roots,
        move_roots,
        allow_remove_source: cfg.allow_remove_source,
        jobs,
        durability: cfg.durability,
        me: whoami(),
        held: HashMap::new(),
        next_id: 0,
        pipelines: HashMap::new(),
        warned: HashSet::new(),
        settled: crossbeam_channel::unbounded(),
        waiting: HashMap::new(),
        next_request: 0,
        one_at_a_time: HashSet::new(),
        answers: crossbeam_channel::unbounded(),
        refused: None,
    };
    router.run(shutdown)
}

struct Router<'a> {
    conn: &'a Conn,
    /// Each mapped root's consumer.
    consumers: Vec<(String, PullConsumer)>,
    /// The consumer to ask first next time (round robin, so no root starves another).
    next_consumer: usize,
    /// Roots whose consumer was found changed (`Tampered`) mid-run: not fetched from until it
    /// is as filepipe makes it again.
    tampered: HashSet<String>,
    /// Roots whose consumer was deleted mid-run and that this worker could not make again
    /// (its user may not): not fetched from until a coordinator has made it. A pull on a
    /// missing consumer gets no answer from the server, so each fetch waited out the
    /// client's 5 s for it, and the other roots' jobs with it.
    missing: HashSet<String>,
    /// What this worker leaves alone for a while because its last pipeline stopped with an
    /// error (see `Resting`).
    resting: HashMap<Resting, Rest>,
    /// When a job that rests here was last met, by root: a resting root is not looked at
    /// again before `WAIT_FOR_JOBS` has passed (see `fetch`).
    met_rest: HashMap<String, Instant>,
    /// The jobs this worker took, by consumer name (`take`), and what it last saw of each
    /// resting root's consumer (`others_take`).
    taken: HashMap<String, u64>,
    seen: HashMap<String, Seen>,
    /// The jobs this worker gave back with a delay, by consumer name, until a few seconds
    /// past when they are due again: out on the server, and this worker's (`others_take`).
    given_back: std::cell::RefCell<Vec<(String, Instant)>>,
    cancels: async_nats::Subscriber,
    /// Runs whose coordinator said they are cancelled.
    cancelled: HashSet<String>,
    /// Runs looked up in the stream already (and not cancelled then).
    checked: HashSet<String>,
    roots: HashMap<String, PathBuf>,
    /// The output roots (`--out-root`): written to only, never taken as inputs.
    out_roots: HashMap<String, PathBuf>,
    /// The move roots (`--move-root`), opened: inputs are moved beneath them, never read.
    move_roots: HashMap<String, Arc<Aside>>,
    /// `--allow-remove-source`: jobs may have their inputs removed.
    allow_remove_source: bool,
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
    /// The pull requests left waiting for a job, by id: one or two a root (see `fetch`).
    waiting: HashMap<u64, Waiting>,
    next_request: u64,
    /// Roots whose consumer refused a second request waiting (see `answers`).
    one_at_a_time: HashSet<String>,
    /// What the waiting requests' readers hear (see `Answer`).
    answers: (Sender<Answer>, Receiver<Answer>),
    /// The error a waiting request last ended with, for `fetch` to return (and the worker to
    /// pause on) when no job came: a refusal only such a request meets (a consumer's limit
    /// on waiting requests) must not have it ask again at once, for ever.
    refused: Option<anyhow::Error>,
}

/// What is left alone after a pipeline stopped with an error. Its jobs went back at once, to
/// be taken by other workers; taken here again at once, each would have stopped the next
/// pipeline the same way, and a job's deliveries were spent in seconds on this one worker
/// (found by a review: 6 in 8.5 s, then its files failed as if every worker had died on
/// them, the real reason nowhere).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Resting {
    /// The input root cannot be opened: no job of it can be done here; those met go back.
    Root(String),
    /// The root opens, so what failed is the job's output or move root (or the queue): only
    /// jobs naming the same directories go back untried, each as an attempt that failed the
    /// same way, until the rest is over.
    /// Resting the whole root for it let anyone who may publish a job naming a broken output
    /// root hold up every other run of the root (found by a review).
    Dirs {
        root: String,
        out: Option<String>,
        move_source: Option<String>,
        move_failed: Option<String>,
    },
}

impl Resting {
    /// The directories a job of `root` names.
    fn dirs(
        root: &str,
        out: Option<&str>,
        move_source: Option<&str>,
        move_failed: Option<&str>,
    ) -> Resting {
        Resting::Dirs {
            root: root.to_owned(),
            out: out.map(str::to_owned),
            move_source: move_source.map(str::to_owned),
            move_failed: move_failed.map(str::to_owned),
        }
    }

    /// The input root it is of.
    fn root(&self) -> &str {
        match self {
            Resting::Root(root) | Resting::Dirs { root, .. } => root,
        }
    }

    /// The directories a pipeline's jobs name.
    fn of(key: &Key) -> Resting {
        Resting::dirs(
            &key.root,
            key.out.as_ref().map(|(name, _)| name.as_str()),
            key.move_source.as_deref(),
            key.move_failed.as_deref(),
        )
    }
}

/// What a worker last saw of a root's consumer while it rested (`Router::others_take`).
struct Seen {
    at: Instant,
    /// The deliveries the server had counted, and those this worker had taken, then.
    seq: u64,
    taken: u64,
    /// When another worker was last seen taking the root's jobs.
    others_at: Option<Instant>,
    /// What was concluded then: another worker takes them.
    others: bool,
}

impl Seen {
    /// What is seen of a root's consumer at `now` (`Router::others_take`): `asked` is what the
    /// server answered (the deliveries it counted, the jobs out), `None` if it did not;
    /// `taken` the jobs this worker took of it since it started, `own` those it holds or gave
    /// back lately; `last` the sample before.
    fn judge(
        last: Option<&Seen>,
        asked: Option<(u64, usize)>,
        taken: u64,
        own: usize,
        now: Instant,
    ) -> Seen {
        // A sample from an earlier rest, long over, says nothing of now: taken for a first
        // look (others' deliveries since would count as taken now).
        let last = last.filter(|l| now < l.at + OTHERS_QUIET);
        let mut others_at = last.and_then(|l| l.others_at);
        let others = match (asked, last) {
            // No answer, or nothing to compare with yet: someone else's, nothing looked at.
            (None, _) | (Some(_), None) => true,
            (Some((seq, out)), Some(last)) => {
                let grew = (seq.saturating_sub(last.seq)).saturating_sub(taken - last.taken);
                if grew > 0 {
                    others_at = Some(now);
                }
                others_at
                    .is_some_and(|t| now < t + OTHERS_QUIET || (out > own && now < t + OTHERS_LONG))
            }
        };
        Seen {
            at: now,
            seq: asked.map_or(last.map_or(0, |l| l.seq), |(seq, _)| seq),
            taken,
            others_at,
            others,
        }
    }
}

/// How long after another worker was last seen taking a root's jobs a worker resting that
/// root still leaves its jobs to it, whatever it holds.
const OTHERS_QUIET: Duration = Duration::from_secs(30);

/// ... and while more jobs are out than this worker's own: a slow healthy worker may hold its
/// share for minutes; jobs given back by a worker that stopped are out until taken.
const OTHERS_LONG: Duration = Duration::from_secs(300);

/// How long something is left alone (`Resting`).
struct Rest {
    /// What it rests starts no pipeline until then (unless it opens again).
    until: Instant,
    /// How long this rest was: the next one, if the next pipeline stops too, is twice that.
    pause: Duration,
    /// Why the pipeline stopped, said in the files' failure should their job run out of
    /// deliveries.
    why: String,
    /// Over, and what it rests found to open since (`Router::renew_rests`): the next job
    /// tries it.
    over: bool,
}

/// What the reader of a pull request left waiting hears. Each such request is read to its end
/// by a task of its own on the client's runtime, never by the router, which may be busy
/// elsewhere for seconds: the client's stream of a request ends on its own clock (the
/// request's expiry and 5 s), and a job that came meanwhile, unread, would be dropped with it
/// and wait out the ack wait before another worker could have it.
enum Answer {
    /// A job: this worker's, its ack wait running.
    Job(Box<jetstream::Message>),
    /// Request `id` ended: answered, expired, or refused (`error`).
    Ended { id: u64, error: Option<String> },
}

/// A pull request left waiting for a job.
struct Waiting {
    root: String,
    /// When the server lets it go (by this worker's clock: the server's starts a little later).
    expires: Instant,
    /// Its reader, stopped when the worker stops.
    reader: tokio::task::JoinHandle<()>,
}

impl Router<'_> {
    fn run(&mut self, shutdown: &Shutdown) -> Result<()> {
        let most = HELD_PER_THREAD * self.jobs;
        let mut last_progress = Instant::now();
        let mut last_missing_check = Instant::now();
        let mut pause = Duration::ZERO;
        while !shutdown.requested() {
            self.settle_ready();
            // A job a waiting request got is taken even with no room: it is this worker's
            // already, its ack wait running (one a root at most over the limit).
            for m in self.answers(Duration::ZERO) {
                self.take(m)?;
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                self.progress();
                self.check_consumers();
                last_progress = Instant::now();
            } else if !self.missing.is_empty() && last_missing_check.elapsed() >= MISSING_EVERY {
                self.check_consumers();
                last_missing_check = Instant::now();
            }
            self.reap(false)?;
            let room = most.saturating_sub(self.held.len());
            if room == 0 {
                if let Ok(s) = self.settled.1.recv_timeout(Duration::from_millis(200)) {
                    self.settle(s);
                }
                continue;
            }
            self.hear_cancels();
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
        // Requests still waiting expire within `REQUEST_LIFE` (the server says so), and a job
        // one gets meanwhile goes back at once, not started. Their readers are not stopped
        // sooner: a job the client had taken in for one, not yet read, was dropped with it,
        // and waited out the ack wait (found by a review). Bounded: a server gone away
        // answers nothing, and its jobs are delivered again anyway.
        let until = Instant::now() + REQUEST_LIFE + WAIT_FOR_JOBS;
        let mut late = 0;
        while !self.waiting.is_empty() {
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                break;
            };
            for m in self.answers(left) {
                self.ack(&m, AckKind::Nak(Some(HAND_BACK)));
                late += 1;
            }
        }
        if late > 0 {
            tracing::info!(jobs = late, "jobs that came as the worker stopped: handed back as the worker stopped, not started");
        }
        let readers: Vec<_> = self.waiting.drain().map(|(_, w)| w.reader).collect();
        for r in readers {
            r.abort();
        }
        self.reap(true)?;
        // What no pipeline settled (it stopped early) goes back at once.
        for (_, (m, _)) in std::mem::take(&mut self.held) {
            self.ack(&m, AckKind::Nak(Some(HAND_BACK)));
        }
        // The last acknowledgements are only queued on the connection: sent before the
        // process ends, or the jobs they hand back waited out the ack wait (found by a
        // review). Bounded, as a server gone away takes none.
        let flushed = self.conn.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), self.conn.client.flush()).await
        });
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!("the last acknowledgements may not have reached the server: their jobs are delivered again after the ack wait");
        }
        Ok(())
    }

    /// Settles `m`, held by a pipeline that ended before its files did (`stopped` says why, if
    /// it failed): back to the queue for a later attempt (`back_off`), or, when this was its
    /// last, its files fail with that reason, for good. Left to the next delivery, they failed
    /// there with none (the worker that took it may never have tried it), after a last wait
    /// for nothing (found by a review).
    fn after_stop(&mut self, m: &jetstream::Message, stopped: Option<&str>) {
        let last = deliveries(m) >= MAX_DELIVER;
        let batch = match stopped {
            Some(_) if last => JobBatch::parse(&m.payload).ok(),
            _ => None,
        };
        let (Some(why), Some(batch)) = (stopped, batch) else {
            self.ack(m, AckKind::Nak(Some(back_off(deliveries(m)))));
            return;
        };
        let message = format!(
            "tried {} times, and each worker that took it stopped before finishing it; on this \
             worker ({}): {why}",
            deliveries(m),
            self.me
        );
        let failed: Vec<_> = batch
            .files
            .iter()
            .map(|f| (f.rel.clone(), FileError::new(Kind::Io, message.clone())))
            .collect();
        match self.fail(&batch, failed) {
            Ok(()) => self.ack(m, AckKind::Term),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not fail a job at its last attempt");
                self.ack(m, AckKind::Nak(Some(NAK_DELAY)));
            }
        }
    }

    /// Whether `root`'s jobs are left alone now: its consumer changed or missing. (A root that
    /// rests is still looked at: `rests`.)
    fn skips(&self, root: &str) -> bool {
        self.tampered.contains(root) || self.missing.contains(root)
    }

    /// Rests just over whose directories still do not open are begun again, twice as long
    /// (up to `REST_MOST`), without a pipeline started to find out: the next job offered
    /// stopped it the same way, an attempt spent at the end of each rest, while a healthy
    /// worker beside this one could have done the job (found by a review). A resting root is
    /// still looked at (`rests`), and the jobs it meets go back as attempts, the last made
    /// for real (`take`): begun again while nothing of the root was fetched, a root's rest
    /// left a lone worker's jobs waiting for ever, never failed (found by the next review).
    /// What opens again is left to the next job to try: a directory that opens may still
    /// refuse writes, which only a pipeline finds out.
    fn renew_rests(&mut self, now: Instant) {
        for (what, rest) in &mut self.resting {
            let (root, out) = match what {
                Resting::Root(_) => (what.root(), None),
                Resting::Dirs { out, .. } => (what.root(), out.as_ref()),
            };
            if rest.over || now < rest.until {
                continue;
            }
            // Move roots are held open since the worker started: they cannot stop opening.
            let root_opens = self.roots.get(root).is_none_or(|p| dir_opens(p));
            let out_opens =
                || (out.and_then(|o| self.out_roots.get(o))).is_none_or(|p| out_root_opens(p));
            if root_opens && out_opens() {
                rest.over = true;
                continue;
            }
            rest.pause = (rest.pause * 2).min(REST_MOST);
            rest.until = now + rest.pause;
            tracing::info!(
                %root,
                out = out.map(String::as_str).unwrap_or_default(),
                retry_in = ?rest.pause,
                "the {} still cannot be opened: this worker starts no pipeline for {} until \
                 then, unless it opens again (each job it meets goes back as an attempt)",
                if root_opens { "output root" } else { "root" },
                if matches!(what, Resting::Root(_)) {
                    "the root's jobs"
                } else {
                    "the jobs naming these directories"
                }
            );
        }
    }

    /// Whether `root`, or the jobs of `root` naming some output or move root, rest here: the
    /// root then gets no request left waiting, only looks for what is there now, one job at a
    /// time (see `fetch`). The server gives a job to the oldest request waiting, and this idle
    /// worker's were older than those of a busy healthy one: it took first almost every job
    /// naming its broken output root, each handed back, an attempt spent and a second lost
    /// (found by a review). Its looks still take other runs' jobs of the root, at most
    /// `WAIT_FOR_JOBS` late.
    fn rests(&self, root: &str, now: Instant) -> bool {
        (self.resting.iter()).any(|(what, rest)| what.root() == root && now < rest.until)
    }

    /// Whether another worker takes jobs of the root at `at` in `consumers`: the deliveries
    /// the server counts on the root's consumer grew by more than this worker took within
    /// `OTHERS_QUIET`, or within `OTHERS_LONG` while the consumer has more jobs out (delivered, not yet settled) than
    /// this worker holds or gave back lately. A healthy worker slow enough to take no new job
    /// for 30 s, holding its share of a backlog, counted as gone, and the jobs past its share
    /// had their last attempt here (found by a review: 352 files of 2,400); its share is what
    /// is out. Jobs out for longer with no one taking any (given back by a worker that
    /// stopped) must not keep a lone worker from them for good: after `OTHERS_LONG`, it looks.
    /// (Not the requests waiting on the consumer: this worker's own, from before its rest,
    /// count there too, and a lone worker left its jobs alone.) Asked of the server at most
    /// every `WAIT_FOR_JOBS`; a server that does not answer counts as someone else's (nothing
    /// is looked at then).
    fn others_take(&mut self, at: usize, now: Instant) -> bool {
        let (root, c) = &mut self.consumers[at];
        if let Some(seen) = self.seen.get(root.as_str()) {
            if now < seen.at + WAIT_FOR_JOBS {
                return seen.others;
            }
        }
        let root = root.clone();
        let asked = self.conn.rt.block_on(async {
            let info = tokio::time::timeout(Duration::from_secs(2), c.info()).await;
            info.ok()?
                .ok()
                .map(|i| (i.delivered.consumer_sequence, i.num_ack_pending))
        });
        let consumer = format!("workers-{root}");
        let taken = self.taken.get(&consumer).copied().unwrap_or(0);
        let mut given_back = self.given_back.borrow_mut();
        given_back.retain(|(_, due)| now < *due);
        let own = (self.held.values().filter(|(_, k)| k.root == root).count())
            + (given_back.iter().filter(|(c, _)| *c == consumer).count());
        drop(given_back);
        let seen = Seen::judge(self.seen.get(&root), asked, taken, own, now);
        let others = seen.others;
        self.seen.insert(root, seen);
        others
    }

    /// Up to `n` messages from the roots' consumers: first what any of them has now, in turn;
    /// if none has any, a request for a job left waiting on each root, all at once (a new one
    /// where the last is about to expire: `REQUEST_LIFE`), and at most `WAIT_FOR_JOBS` for the
    /// first answer. (Waiting on each root in turn, a quarter of a second each for two roots, a
    /// run's first jobs waited out the idle root's quarter: 0.1 s of a 1.2 s run on average.
    /// Waiting on each for longer, 50,000 small files took 6.8 s instead of 2.5 s.) A request
    /// left waiting is answered later, into `answers`.
    fn fetch(&mut self, n: usize) -> Result<Vec<jetstream::Message>> {
        let k = self.consumers.len().max(1);
        let now = Instant::now();
        self.renew_rests(now);
        if self.consumers.iter().all(|(root, _)| self.skips(root)) {
            // Nothing to fetch from: wait as a fetch would, never spin.
            std::thread::sleep(WAIT_FOR_JOBS);
            return Ok(Vec::new());
        }
        let mut failed = None;
        for i in 0..k {
            let at = (self.next_consumer + i) % k;
            let root = &self.consumers[at].0;
            if self.skips(root) {
                continue;
            }
            // A resting root is looked at one job at a time, and not again for
            // `WAIT_FOR_JOBS` once a look met a job that rests (looks of as many jobs as there
            // was room for, one after another, gave back a job a look).
            let resting = self.rests(root, now);
            if resting && (self.met_rest.get(root)).is_some_and(|t| now < *t + WAIT_FOR_JOBS) {
                continue;
            }
            // Nor at all while another worker takes the root's jobs: even one job a look,
            // a busy healthy worker beside this one left most jobs of a backlog to it as they
            // came due again, each given back, and many had their last attempt here, failed
            // for good (found by a review: 176 files of 3,000). Only a worker alone on the
            // root needs to meet its jobs, for them to reach their last attempt.
            if resting && self.others_take(at, now) {
                continue;
            }
            let (root, c) = &self.consumers[at];
            let want = if resting { 1 } else { n };
            match self.conn.rt.block_on(take(c, want, Duration::ZERO)) {
                Ok(msgs) if msgs.is_empty() => {}
                Ok(msgs) => {
                    self.next_consumer = (at + 1) % k;
                    return Ok(msgs);
                }
                Err(e) => {
                    // One root's trouble (its consumer deleted, say) must not stop the
                    // others: try to make it again, and go on to the next root.
                    // (A server that lost its store has no streams either: made again.)
                    // (Bounded by the server's refusal: a worker user that may not
                    // make it gets no answer, and retries once a coordinator has.)
                    // Bounded as a fetch is: each request of it waits up to 30 s for an
                    // answer, and a worker told to stop during an outage waited them out
                    // (found by a review: 159 s to exit, past its unit's 2 minutes).
                    let again = self.conn.start(async {
                        let made = async {
                            self.conn.setup().await?;
                            workers_consumer(&self.conn.js, root).await
                        };
                        tokio::time::timeout(Duration::from_secs(5), made)
                            .await
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("{NO_ANSWER} within 5s")))
                    });
                    failed = Some(e.context(format!("root {root}")));
                    match again {
                        Ok(c) => self.consumers[at].1 = c,
                        // No answer (the server away, restarting): looked up again at the next
                        // fetch. Taken for a consumer gone, the log said so through every
                        // outage (found by a review).
                        Err(why) if no_answer(&why) => {
                            tracing::debug!(%root, error = %format!("{why:#}"), "the workers' consumer could not be looked up");
                        }
                        Err(why) => {
                            tracing::warn!(%root, error = %format!("{why:#}"), "the workers' consumer of this root is gone and could not be made again: its jobs are not taken until a coordinator makes it");
                            self.missing.insert(root.clone());
                        }
                    }
                }
            }
        }
        self.next_consumer = (self.next_consumer + 1) % k;
        if let Some(e) = failed {
            return Err(e);
        }
        for (root, c) in &self.consumers {
            let single = self.one_at_a_time.contains(root);
            let lasts = |w: &Waiting| w.root == *root && (single || w.expires > now + RENEW_WITHIN);
            if self.skips(root) || self.rests(root, now) || self.waiting.values().any(lasts) {
                continue;
            }
            let asked = self.conn.rt.block_on(async {
                let ask = c.batch().max_messages(1).expires(REQUEST_LIFE).messages();
                tokio::time::timeout(Duration::from_secs(5), ask).await
            });
            let mut batch = match asked {
                Ok(Ok(batch)) => batch,
                Ok(Err(e)) => return Err(anyhow::anyhow!("root {root}: {e}")),
                Err(_) => return Err(anyhow::anyhow!("root {root}: no answer from the server")),
            };
            let (id, tx) = (self.next_request, self.answers.0.clone());
            self.next_request += 1;
            let reader = self.conn.rt.spawn(async move {
                use futures_util::StreamExt;
                let mut error = None;
                while let Some(answer) = batch.next().await {
                    match answer {
                        Ok(m) => {
                            let _ = tx.send(Answer::Job(Box::new(m)));
                        }
                        Err(e) => {
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
                let _ = tx.send(Answer::Ended { id, error });
            });
            let expires = now + REQUEST_LIFE;
            let root = root.clone();
            self.waiting.insert(
                id,
                Waiting {
                    root,
                    expires,
                    reader,
                },
            );
        }
        let got = self.answers(WAIT_FOR_JOBS);
        if got.is_empty() && self.waiting.is_empty() {
            // No request waiting (each root resting): wait as a request would, never spin.
            std::thread::sleep(WAIT_FOR_JOBS);
        }
        match self.refused.take() {
            Some(e) if got.is_empty() => Err(e),
            _ => Ok(got),
        }
    }

    /// The jobs the waiting requests got: what they have now, or (`wait` not zero) at most
    /// `wait` for the first, or until no request is left waiting. A request that ended with an
    /// error leaves it in `refused`.
    fn answers(&mut self, wait: Duration) -> Vec<jetstream::Message> {
        let until = Instant::now() + wait;
        let mut got = Vec::new();
        loop {
            let heard = match until.checked_duration_since(Instant::now()) {
                Some(left) if got.is_empty() && !self.waiting.is_empty() => {
                    self.answers.1.recv_timeout(left).ok()
                }
                _ => self.answers.1.try_recv().ok(),
            };
            match heard {
                Some(Answer::Job(m)) => got.push(*m),
                Some(Answer::Ended { id, error }) => {
                    let root = self.waiting.remove(&id).map(|w| w.root).unwrap_or_default();
                    // The next request refused while the last still waits: the consumer allows
                    // no more waiting requests (`max_waiting`, made so by hand). The root then
                    // has one at a time, renewed once it ends, as before overlapping ones; a
                    // refusal of this worker's own overlap is no failure to pause on (found by
                    // a review: a lone worker warned every second and a half).
                    let overlap_refused = error
                        .as_deref()
                        .is_some_and(|e| e.contains("Exceeded MaxWaiting"))
                        && self.waiting.values().any(|w| w.root == root);
                    if overlap_refused {
                        if self.one_at_a_time.insert(root.clone()) {
                            tracing::info!(%root, "the workers' consumer allows no more requests waiting: one at a time on this root");
                        }
                        continue;
                    }
                    if let Some(e) = error {
                        tracing::debug!(%root, error = %e, "a waiting request for a job failed");
                        self.refused = Some(anyhow::anyhow!("root {root}: {e}"));
                    }
                }
                None => return got,
            }
        }
    }

    /// Checks each root's consumer is still as filepipe makes it: one changed mid-run (by a
    /// user allowed to) is not fetched from, with an error saying what differs, until it is
    /// again (removed and made again by a coordinator, say).
    fn check_consumers(&mut self) {
        for (root, c) in &mut self.consumers {
            // Bounded as a fetch is: a server slow to answer must not hold up the acks.
            let asked = self.conn.rt.block_on(async {
                let info = tokio::time::timeout(Duration::from_secs(5), c.info()).await;
                info.ok()?.ok().cloned()
            });
            let Some(info) = asked else {
                // Unanswered or gone: the next fetch says so and makes it again (or, missing
                // already, a coordinator will).
                continue;
            };
            if self.missing.remove(root.as_str()) {
                tracing::info!(%root, "the workers' consumer is there again: taking its jobs");
            }
            match crate::cluster::check_workers_consumer(root, &info) {
                Err(t) => {
                    if self.tampered.insert(root.clone()) {
                        tracing::error!("{t}: its jobs are not taken until it is");
                    }
                }
                Ok(()) => {
                    if self.tampered.remove(root.as_str()) {
                        tracing::info!(%root, "the workers' consumer is as filepipe makes it again: taking its jobs");
                    }
                }
            }
        }
    }

    /// Hears of cancelled runs.
    fn hear_cancels(&mut self) {
        use futures_util::{FutureExt, StreamExt};
        while let Some(Some(m)) = self
            .conn
            .rt
            .block_on(async { self.cancels.next().now_or_never() })
        {
            if let Some(run) = m.subject.as_str().strip_prefix("filepipe.cancel.") {
                // Only a coordinator's: the server's answer to a request sent with this
                // subject for its reply lands here too, and is no cancellation.
                if !crate::cluster::is_cancellation(run, m.headers.as_ref()) {
                    tracing::debug!(%run, "a message on a run's cancellation subject that is not a cancellation: ignored");
                    continue;
                }
                if wire::valid_name(run) && self.cancelled.insert(run.to_owned()) {
                    tracing::info!(%run, "run cancelled by its coordinator");
                }
            }
        }
    }

    /// Whether `run` was cancelled: heard live, or (the first time this worker meets the run)
    /// looked up in the stream, where the coordinator stored it.
    fn is_cancelled(&mut self, run: &str) -> bool {
        if self.cancelled.contains(run) {
            return true;
        }
        if !self.checked.insert(run.to_owned()) {
            return false;
        }
        let found = self
            .conn
            .rt
            .block_on(crate::cluster::stored_cancellation(&self.conn.js, run));
        match found {
            Ok(true) => {
                self.cancelled.insert(run.to_owned());
                true
            }
            // Asked and answered: not cancelled (a later cancel is heard live).
            Ok(false) => false,
            // No answer: ask again next time.
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "looking up a run's cancellation failed");
                self.checked.remove(run);
                false
            }
        }
    }

    /// Settles `m` with `kind`; a failure only means the server delivers it again later.
    fn ack(&self, m: &jetstream::Message, kind: AckKind) {
        if let (AckKind::Nak(Some(delay)), Ok(info)) = (&kind, m.info()) {
            let now = Instant::now();
            let mut given_back = self.given_back.borrow_mut();
            // Pruned when a resting root is looked at, and here: a worker that never rests
            // must not keep one for every job it ever gave back.
            if given_back.len() >= 1024 {
                given_back.retain(|(_, due)| now < *due);
            }
            given_back.push((
                info.consumer.to_owned(),
                now + *delay + Duration::from_secs(5),
            ));
        }
        if let Err(e) = self.conn.rt.block_on(m.ack_with(kind)) {
            tracing::warn!(error = %e, "acknowledging a job failed");
        }
    }

    /// Routes one message to its pipeline (starting it if need be), or settles it at once
    /// when it cannot be run here.
    fn take(&mut self, m: jetstream::Message) -> Result<()> {
        let delivered = deliveries(&m).max(1);
        let again = published_again(&m);
        if let Ok(info) = m.info() {
            *self.taken.entry(info.consumer.to_owned()).or_default() += 1;
        }
        // When the message was stored, for a redelivery: an earlier delivery acted after it.
        let stored = m.info().ok().map(|i| {
            let ns = i.published.unix_timestamp_nanos().max(0);
            std::time::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
        });
        let parsed = JobBatch::parse(&m.payload).and_then(|b| Ok((b.spec()?, b)));
        let (spec, batch) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                // Not a job anyone can run: never delivered again. Without a valid run there
                // is no coordinator to tell.
                tracing::error!(subject = %m.subject, error = %e, "refused a job message");
                self.ack(&m, AckKind::Term);
                return Ok(());
            }
        };
        if self.is_cancelled(&batch.run) {
            self.ack(&m, AckKind::Term);
            return Ok(());
        }
        let Some(root) = self.roots.get(&batch.root).cloned() else {
            // Its subject said one root, its body another: not a job a coordinator wrote.
            if self.warned.insert(batch.root.clone()) {
                tracing::error!(root = %batch.root, subject = %m.subject, "refused a job message: for a root its subject does not name");
            }
            self.ack(&m, AckKind::Term);
            return Ok(());
        };
        // The output root, mapped here like the input root, and never overlapping it (a job
        // message is untrusted: it must not get outputs written among the inputs).
        let moves = batch.move_source.is_some() || batch.move_failed.is_some();
        if batch.remove_source || moves {
            // Removing inputs is the worker's operator's choice, not a message's; and it
            // needs durable outputs, which a worker told not to flush does not make. Moving
            // an input out of the tree is a removal from it: the same allowance.
            let asks = if batch.remove_source {
                "its inputs removed"
            } else {
                "its inputs moved out of the tree"
            };
            let refused = if !self.allow_remove_source {
                Some(format!(
                    "the job asks for {asks}, and this worker ({}) was not started with --allow-remove-source",
                    self.me
                ))
            } else if (batch.remove_source || batch.move_source.is_some())
                && self.durability == crate::fsio::output::Durability::None
            {
                Some(format!(
                    "--remove-source and --move-source need durable outputs, and this worker ({}) runs with --durability none",
                    self.me
                ))
            } else {
                None
            };
            if let Some(message) = refused {
                self.refuse(&m, &batch, spec.canonical(), Kind::RemoveRefused, message);
                return Ok(());
            }
        }
        let out = match &batch.out {
            None => None,
            // Output roots are apart from every input root (checked at start).
            Some(name) => match self.out_roots.get(name) {
                Some(dir) => Some((name.clone(), dir.clone())),
                None => {
                    let message = format!(
                        "the output root {name:?} is not mapped on this worker ({}): give it --out-root {name}=PATH, as every worker of root {:?} needs",
                        self.me, batch.root
                    );
                    self.refuse(&m, &batch, spec.canonical(), Kind::UnmappedRoot, message);
                    return Ok(());
                }
            },
        };
        // A move root, mapped here like the output root (apart from every root, checked at
        // start); a message names it, never a path.
        for name in batch.move_source.iter().chain(&batch.move_failed) {
            if !self.move_roots.contains_key(name) {
                let message = format!(
                    "the move root {name:?} is not mapped on this worker ({}): give it --move-root {name}=PATH, as every worker of root {:?} needs",
                    self.me, batch.root
                );
                self.refuse(&m, &batch, spec.canonical(), Kind::UnmappedRoot, message);
                return Ok(());
            }
        }
        // The directories it names, which may be resting here.
        let dirs = Resting::dirs(
            &batch.root,
            batch.out.as_deref(),
            batch.move_source.as_deref(),
            batch.move_failed.as_deref(),
        );
        // One delivery past the last is still an attempt, made for real: a server from before
        // 2.11 may have counted one it never made (see `REQUEST_LIFE`), and the job's files
        // then failed here untried.
        if delivered > MAX_DELIVER + 1 {
            // Every worker that took it died or hung on it: its files fail, for good.
            let mut message = format!(
                "delivered {} times without an outcome: each worker that took it stopped \
                 before finishing it",
                delivered - 1
            );
            let rest = self
                .resting
                .get(&dirs)
                .or_else(|| self.resting.get(&Resting::Root(batch.root.clone())));
            if let Some(rest) = rest {
                message += &format!(
                    " (this worker's last pipeline of root {:?} stopped: {})",
                    batch.root, rest.why
                );
            }
            let failed: Vec<_> = batch
                .files
                .iter()
                .map(|f| {
                    (
                        f.rel.clone(),
                        FileError::new(Kind::Internal, message.clone()),
                    )
                })
                .collect();
            match self.fail(&batch, failed) {
                Ok(()) => self.ack(&m, AckKind::Term),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not fail a job delivered too often");
                    self.ack(&m, AckKind::Nak(Some(NAK_DELAY)));
                }
            }
            return Ok(());
        }
        // Paths a job may not name fail here, before anything is opened; the rest are run.
        let mut files = Vec::with_capacity(batch.files.len());
        let mut refused = Vec::new();
        for f in &batch.files {
            match f.rel.rel() {
                Ok(rel) => files.push(Delivered {
                    rel,
                    size: f.size,
                    replace: f.replace,
                    redelivered: stored.filter(|_| delivered > 1 || again),
                    expect: f.stamp.map(|s| Stamp::seen_elsewhere(s.size, s.mtime_ns)),
                }),
                Err(e) => refused.push((f.rel.clone(), e)),
            }
        }
        if !refused.is_empty() {
            // The same failure-log records as the pipeline's.
            for (rel, e) in &refused {
                report::record("failed", spec.canonical(), &rel.lossy(), e);
            }
            if let Err(e) = self.fail(&batch, refused) {
                tracing::warn!(error = %format!("{e:#}"), "could not publish refused paths' outcomes");
                self.ack(&m, AckKind::Nak(Some(NAK_DELAY)));
                return Ok(());
            }
        }
        if files.is_empty() {
            self.ack(&m, AckKind::Ack);
            return Ok(());
        }
        let key = Key {
            run: batch.run.clone(),
            root: batch.root.clone(),
            spec,
            level: batch.level,
            force: batch.force,
            out,
            remove_source: batch.remove_source,
            move_source: batch.move_source.clone(),
            move_failed: batch.move_failed.clone(),
            follow_symlinks: batch.follow_symlinks,
            max_size: batch.max_size,
            format: batch.format(),
        };
        // A pipeline of this key that ended or is ending (its root, its directories or its
        // sink failed) is reaped first, and the job goes back as one it held would: an attempt,
        // failed at its last with that reason. Sent to it, the job went back as an attempt
        // too, but at its last the worker that took it next failed it untried, with no reason,
        // 40 s later (found by a review).
        if self
            .pipelines
            .get(&key)
            .is_some_and(|p| p.stop.requested() || p.thread.is_finished())
        {
            if let Some(why) = self.reap_one(key.clone())? {
                self.after_stop(&m, Some(&why));
                return Ok(());
            }
        }
        let now = Instant::now();
        let resting = |what: &Resting| self.resting.get(what).filter(|r| now < r.until);
        // Its root (a request left waiting got it as the root's rest began), or its output or
        // move root, failed here lately: no pipeline is started for it during the rest (jobs
        // anyone may publish, naming a broken output root over and over, held up every other
        // run of the root: found by a review). It goes back as if tried and failed the same
        // way: an attempt, offered again later each time (`back_off`), at its last failed
        // with that reason. Every delivery is an attempt, whichever worker has it: handed
        // back untried and not counted, a job was counted by the next worker anyway, which
        // cannot tell, and with several workers failed for good untried, with no reason
        // (found by a review); with one worker, jobs met rest after rest and took minutes to
        // fail.
        let why = resting(&Resting::Root(batch.root.clone()))
            .or_else(|| resting(&dirs))
            .map(|r| r.why.clone());
        if let Some(why) = why {
            // Unless what it names opens again: the rest is over then, whatever its length
            // (rests grow to a minute, and one begun just before the root came back failed
            // jobs for good with the old reason, untried: found by a review). And a job's
            // last attempt is always made for real.
            let back =
                dir_opens(&root) && key.out.as_ref().is_none_or(|(_, dir)| out_root_opens(dir));
            if back {
                self.resting.remove(&Resting::Root(batch.root.clone()));
                self.resting.remove(&dirs);
            } else if delivered < MAX_DELIVER {
                self.met_rest.insert(batch.root.clone(), Instant::now());
                self.after_stop(&m, Some(&why));
                return Ok(());
            }
        }
        if !self.pipelines.contains_key(&key) {
            let running = self.start(&key, root)?;
            self.pipelines.insert(key.clone(), running);
        }
        let id = self.next_id;
        self.next_id += 1;
        let Some(p) = self.pipelines.get_mut(&key) else {
            bail!("a pipeline vanished");
        };
        if p.stop.requested() || p.deliveries.send(Delivery { id, files }).is_err() {
            // It stopped since (its sink failed just now): back to the queue, for later or
            // another worker.
            self.ack(&m, AckKind::Nak(Some(back_off(deliveries(&m)))));
            return Ok(());
        }
        p.held += 1;
        p.last = Instant::now();
        self.held.insert(id, (m, key));
        Ok(())
    }

    /// Fails every file of `m` (`batch`, of the op named `op`) with `kind` and `message`, which
    /// no worker here can do, and settles it: for good once the outcomes are stored, else for
    /// later.
    fn refuse(
        &self,
        m: &jetstream::Message,
        batch: &JobBatch,
        op: &'static str,
        kind: Kind,
        message: String,
    ) {
        let failed: Vec<_> = batch
            .files
            .iter()
            .map(|f| (f.rel.clone(), FileError::new(kind, message.clone())))
            .collect();
        for (rel, e) in &failed {
            report::record("failed", op, &rel.lossy(), e);
        }
        match self.fail(batch, failed) {
            Ok(()) => self.ack(m, AckKind::Term),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not fail a job this worker cannot do");
                self.ack(m, AckKind::Nak(Some(NAK_DELAY)));
            }
        }
    }

    /// Publishes a failed outcome for each of `files` (of `batch`'s run), and waits for it to
    /// be stored.
    fn fail(&self, batch: &JobBatch, files: Vec<(wire::WirePath, FileError)>) -> Result<()> {
        if batch.format() == Format::Binary {
            let mut records = Records::default();
            for (rel, e) in &files {
                records.push_failed(rel, e).map_err(anyhow::Error::msg)?;
            }
            while !records.is_empty() {
                let (n, payload) = records
                    .message(&batch.run, &self.me, usize::MAX)
                    .map_err(anyhow::Error::msg)?;
                self.publish_outcomes(&batch.run, payload)?;
                records.drain(n);
            }
            return Ok(());
        }
        let outcomes: Vec<WireOutcome> = files
            .into_iter()
            .map(|(rel, e)| WireOutcome {
                rel,
                status: WireStatus::Failed,
                kind: Some(e.kind.as_str().into()),
                message: Some(e.message),
                errno: e.errno,
                bytes_in: 0,
                bytes_out: 0,
                digest: None,
                digests: Vec::new(),
                read: None,
                raw: Vec::new(),
            })
            .collect();
        // As many messages as it takes to stay under the limit (JSON escapes long names).
        let mut rest = &outcomes[..];
        while !rest.is_empty() {
            let (n, payload) = wire::fitting(rest, usize::MAX, |part| {
                serde_json::to_vec(&OutcomeBatchOut {
                    v: wire::VERSION,
                    run: &batch.run,
                    worker: &self.me,
                    outcomes: part,
                })
            })?;
            self.publish_outcomes(&batch.run, payload)?;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Publishes an outcome message of `run`, and waits for it to be stored.
    fn publish_outcomes(&self, run: &str, payload: Vec<u8>) -> Result<()> {
        self.conn
            .rt
            .block_on(async {
                let ack = self
                    .conn
                    .js
                    .publish(outcomes_subject(run), payload.into())
                    .await?;
                ack.await.map_err(anyhow::Error::from)
            })
            .context("publishing failed outcomes")?;
        Ok(())
    }

    /// Starts the pipeline for `key`, on files under `root`.
    fn start(&self, key: &Key, root: PathBuf) -> Result<Running> {
        let cfg = Config {
            root_named: root.clone(),
            root: root.clone(),
            op: key.spec.primary(),
            spec: key.spec.clone(),
            jobs: self.jobs,
            out: key.out.as_ref().map(|(_, dir)| dir.clone()),
            manifest: None,
            manifest_dir: None,
            failure_log: None,
            level: key.level,
            filter: Filter::default(),
            follow_symlinks: key.follow_symlinks,
            force: key.force,
            remove_source: key.remove_source,
            move_source: key
                .move_source
                .as_ref()
                .and_then(|n| self.move_roots.get(n).cloned()),
            move_failed: key
                .move_failed
                .as_ref()
                .and_then(|n| self.move_roots.get(n).cloned()),
            durability: self.durability,
            // Checked on what is opened, as a local run checks it.
            max_size: key.max_size,
            json: false,
            quiet: true,
            progress: false,
            own_files: Vec::new(),
            own_ids: Default::default(),
            service_own: None,
            confined: true,
            sweep_out_dirs: true,
            coordinated: true,
            watch: None,
            incremental: None,
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let settled = self.settled.0.clone();
        let sink = QueueSink::new(
            self.conn.rt.handle().clone(),
            self.conn.js.clone(),
            key.run.clone(),
            self.me.clone(),
            key.format,
        );
        tracing::info!(run = %key.run, root = %key.root, op = key.spec.canonical(), "pipeline started");
        // Its own stop, raised only by a failure of its sink (then its source stops, and what
        // it holds goes back): a worker's pipelines finish what they hold on a signal (a second
        // one still abandons it, handed back for redelivery).
        let stop = Arc::new(Shutdown::default());
        let pipeline_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("filepipe-run-{}", key.run))
            .spawn(move || {
                let mut source = QueueSource::new(root, rx, settled, Arc::clone(&stop));
                let mut sink = sink;
                let stats = Stats::default();
                pipeline::run(&cfg, &stop, &mut source, &mut sink, &stats)
            })
            .context("starting a pipeline thread")?;
        Ok(Running {
            deliveries: tx,
            stop: pipeline_stop,
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
        // Unacknowledged (the ack lost), it is delivered again after the ack wait: its files
        // are then found up to date, and the coordinator counts each file once.
        self.ack(
            &m,
            if s.done {
                AckKind::Ack
            } else {
                AckKind::Nak(Some(back_off(deliveries(&m))))
            },
        );
    }

    /// Tells the server the jobs held are being worked on (not those of a pipeline that
    /// stopped: they are let go, to be delivered again after the ack wait).
    fn progress(&self) {
        for (m, key) in self.held.values() {
            if self.pipelines.get(key).is_some_and(|p| p.stop.requested()) {
                continue;
            }
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
            self.reap_one(key)?;
        }
        Ok(())
    }

    /// Stops the pipeline of `key` once it has finished what it holds (at once if it ended),
    /// settles what it left, and rests what made it stop, if anything did: returns why.
    fn reap_one(&mut self, key: Key) -> Result<Option<String>> {
        let Some(p) = self.pipelines.remove(&key) else {
            return Ok(None);
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
        let stopped = match p.thread.join() {
            Ok(Ok(summary)) => {
                tracing::info!(
                    run = %key.run,
                    done = summary.done,
                    skipped = summary.skipped,
                    failed = summary.failed,
                    "pipeline finished"
                );
                None
            }
            Ok(Err(e)) => {
                // How many files' outcomes its sink could not publish, where it says (found by
                // a review: the count was dropped here). Their jobs go back below.
                let lost = (e.downcast_ref::<crate::report::Stopped>())
                    .map_or(0, |s| s.summary.unrecorded);
                Some(match lost {
                    0 => format!("{e:#}"),
                    n => format!("{e:#} ({n} files' outcomes not published: their jobs go back)"),
                })
            }
            Err(_) => Some("it panicked".to_owned()),
        };
        // What it still holds (it stopped early: its sink failed, or its directories) goes
        // back to the queue, later each time it comes back (`back_off`), or, at its last
        // attempt, fails with the reason.
        let orphans: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, (_, k))| *k == key)
            .map(|(id, _)| *id)
            .collect();
        for id in orphans {
            if let Some((m, _)) = self.held.remove(&id) {
                self.after_stop(&m, stopped.as_deref());
            }
        }
        let Some(stopped) = stopped else {
            // The root and the job's directories work: their rests are over.
            self.resting.remove(&Resting::Root(key.root.clone()));
            self.resting.remove(&Resting::of(&key));
            return Ok(None);
        };
        // Its jobs went back (above) for other workers to take; this one leaves them alone
        // for a while, longer each time in a row, rather than stop the next pipeline the
        // same way at once and spend their deliveries: the whole root if it cannot be
        // opened now, else only the jobs naming the same output and move roots.
        let root_opens = self
            .roots
            .get(&key.root)
            .is_some_and(|path| dir_opens(path));
        let what = if root_opens {
            Resting::of(&key)
        } else {
            Resting::Root(key.root.clone())
        };
        // Twice the last rest if it ended lately (still failing), else the first.
        let now = Instant::now();
        let pause = match self.resting.get(&what) {
            Some(r) if now.saturating_duration_since(r.until) < REST_MOST * 2 => {
                (r.pause * 2).min(REST_MOST)
            }
            _ => REST_FIRST,
        };
        tracing::error!(
            run = %key.run,
            root = %key.root,
            error = %stopped,
            retry_in = ?pause,
            "{}",
            if root_opens {
                "pipeline stopped: this worker starts no pipeline for the jobs naming its \
                 output and move roots until then (each it meets goes back as an attempt)"
            } else {
                "pipeline stopped: its root cannot be opened; this worker starts no pipeline \
                 for its jobs until then (each it meets goes back as an attempt)"
            }
        );
        self.resting.insert(
            what,
            Rest {
                until: now + pause,
                pause,
                why: stopped.clone(),
                over: false,
            },
        );
        Ok(Some(stopped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_last_attempt_comes_more_than_a_minute_after_its_first() {
        assert_eq!(back_off(0), HAND_BACK);
        assert_eq!(back_off(1), HAND_BACK);
        // The waits before each attempt after the first.
        let waits: Duration = (1..MAX_DELIVER).map(back_off).sum();
        assert_eq!(waits, Duration::from_secs(73));
        assert_eq!(back_off(i64::MAX), Duration::from_secs(40));
    }
    /// `Seen::judge` after `last`, `secs` later.
    fn next(last: &Seen, secs: u64, seq: u64, out: usize, taken: u64, own: usize) -> Seen {
        let now = last.at + Duration::from_secs(secs);
        Seen::judge(Some(last), Some((seq, out)), taken, own, now)
    }

    #[test]
    fn a_resting_worker_leaves_a_root_to_others_taking_its_jobs() {
        let start = Instant::now();
        // The first look compares with nothing: taken for someone else's.
        let first = Seen::judge(None, Some((100, 10)), 5, 0, start);
        assert!(first.others);
        // Nothing delivered since but what it took itself: alone, it looks.
        let alone = next(&first, 1, 102, 10, 7, 0);
        assert!(!alone.others, "its own takes are not another's");
        // Another worker took 3: the root is left to it.
        let busy = next(&alone, 1, 105, 10, 7, 0);
        assert!(busy.others);
        // ... for 30 s after its last take, whatever is out.
        let quiet = next(&busy, 29, 105, 0, 7, 0);
        assert!(quiet.others);
        let past = next(&quiet, 2, 105, 0, 7, 0);
        assert!(!past.others, "nobody took any in 30 s and nothing is out");
    }

    #[test]
    fn a_slow_healthy_worker_holding_jobs_keeps_them_from_a_resting_one_for_minutes() {
        let start = Instant::now();
        let first = Seen::judge(None, Some((100, 32)), 0, 0, start);
        let busy = next(&first, 1, 101, 32, 0, 0);
        assert!(busy.others);
        let took_last = busy.at;
        // No new take for 4 minutes, but 32 jobs are out and this worker holds 2 of them.
        let mut seen = busy;
        for _ in 0..24 {
            seen = next(&seen, 10, 101, 32, 0, 2);
            assert!(
                seen.others,
                "jobs out beyond its own: another worker holds them"
            );
        }
        // Only its own out: the other worker is gone.
        let own = next(&seen, 10, 101, 2, 0, 2);
        assert!(!own.others);
        // Jobs out for more than 5 minutes with nobody taking any: looked at again.
        let mut seen = next(&own, 0, 101, 32, 0, 2);
        assert!(seen.others);
        while seen.at < took_last + OTHERS_LONG {
            seen = next(&seen, 10, 101, 32, 0, 2);
        }
        assert!(
            !seen.others,
            "a lone worker must still meet the jobs given back to it"
        );
    }

    #[test]
    fn a_stale_sample_or_no_answer_is_no_reason_to_look() {
        let start = Instant::now();
        let first = Seen::judge(None, Some((100, 0)), 0, 0, start);
        // The server does not answer: nothing looked at, the sample kept.
        let silent = Seen::judge(Some(&first), None, 0, 0, start + Duration::from_secs(1));
        assert!(silent.others);
        assert_eq!(silent.seq, 100);
        // A sample older than 30 s (an earlier rest): others' deliveries since are not
        // compared with it, and the look after it counts them from now.
        let later = start + OTHERS_QUIET + Duration::from_secs(1);
        let fresh = Seen::judge(Some(&first), Some((500, 0)), 0, 0, later);
        assert!(fresh.others);
        assert_eq!(fresh.seq, 500);
        let alone = next(&fresh, 1, 500, 0, 0, 0);
        assert!(!alone.others);
    }
}
