//! Cluster mode on NATS JetStream: one coordinator walks or watches a tree on shared storage
//! and publishes its jobs to a work-queue stream; any number of workers, on any hosts, take them
//! from one durable pull consumer, run the same pipeline on them, publish each file's outcome
//! to an outcome stream, and only then acknowledge the job; the coordinator feeds the outcomes
//! to the same reporter and sink as a local run.
//!
//! ```text
//!  coordinator: walk | watch ─► FILEPIPE_JOBS (work queue, filepipe.jobs.<root>.<run>)
//!                               │ durable pull consumer "workers-<root>"
//!                               ▼
//!  workers: source/queue ─► pipeline ─► sink/queue ─► FILEPIPE_OUTCOMES (filepipe.outcomes.<run>)
//!                ▲ ack once the outcome is stored          │
//!                └──────────────────────────────────────── │ ──► coordinator: report, manifest | state
//! ```
//!
//! Delivery is at least once (a worker that dies holding a job has it redelivered after the
//! ack wait), effects are idempotent (an output already made for the same input is up to date,
//! and the coordinator counts the first outcome of each file only), so each file is accounted
//! for exactly once. Nothing here is a queue, a retry protocol or a heartbeat of our own:
//! JetStream's acks, ack wait, in-progress acks and de-duplication do that. A job a worker
//! terminates without an outcome (one from before the job's version, which cannot read it)
//! leaves the work queue for good: the coordinator finds it gone from the stream, with no
//! outcome stored, and publishes it again.

mod coordinator;
mod resume;
mod status;
mod trust;
pub(crate) mod wire;
pub(crate) mod wire4;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream::{self, consumer, stream};

pub(crate) use coordinator::run as coordinate;
pub(crate) use coordinator::watch as coordinate_watch;
pub(crate) use status::print as status;
pub(crate) use worker::run as work;

use crate::signals::Shutdown;

/// The work-queue stream of jobs: subjects `filepipe.jobs.<root>.<run>`.
pub(crate) const JOBS_STREAM: &str = "FILEPIPE_JOBS";
/// The stream of outcomes, `filepipe.outcomes.<run>`, and of cancellations,
/// `filepipe.cancel.<run>`, kept a week.
pub(crate) const OUTCOMES_STREAM: &str = "FILEPIPE_OUTCOMES";

/// How long a job may go unacknowledged before it is delivered again: short, since a worker
/// working on one sends in-progress acks (see `PROGRESS_EVERY`).
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(30);
/// How often a worker tells the server it is still working on the jobs it holds.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// A job's attempts: at its last, a worker that cannot finish it fails its files with the
/// reason. One delivered more than once more without an outcome (each worker that took it died
/// or hung on it; one more, as a server from before 2.11 may count a delivery it never made)
/// is failed and terminated rather than delivered again.
pub(crate) const MAX_DELIVER: i64 = 5;

/// The subject of a run's jobs, under its root's: each root has its own consumer, so a worker
/// is only ever given jobs for the roots it maps.
pub(crate) fn jobs_subject(root: &str, run: &str) -> String {
    format!("filepipe.jobs.{root}.{run}")
}

/// The durable pull consumer the workers that map `root` share.
pub(crate) fn workers(root: &str) -> String {
    format!("workers-{root}")
}

/// The subject on which a coordinator says its run is cancelled: stored (in the outcome
/// stream), so a worker that was not listening can still look it up.
pub(crate) fn cancel_subject(run: &str) -> String {
    format!("filepipe.cancel.{run}")
}

/// The header a coordinator's cancellation carries, its value the run: what makes a message on
/// `filepipe.cancel.<run>` a cancellation. The subject alone does not: any user may send a
/// request it is allowed with that subject as its reply subject, and the server then sends its
/// answer there itself (stored in the outcome stream, heard by every worker), whatever the
/// user's permission to publish there. No answer of the server's carries this header: API
/// answers and acks' answers have none of a message's, and a pull request answered there
/// delivers a job, whose headers only a coordinator sets (never this one).
pub(crate) const CANCEL_HEADER: &str = "Filepipe-Cancel";

/// Whether a message on `run`'s cancellation subject with `headers` is its coordinator's
/// cancellation (`CANCEL_HEADER` naming the run), not a server's answer sent there.
pub(crate) fn is_cancellation(run: &str, headers: Option<&async_nats::HeaderMap>) -> bool {
    headers
        .and_then(|h| h.get(CANCEL_HEADER))
        .is_some_and(|v| v.as_str() == run)
}

/// The headers of `run`'s cancellation.
pub(crate) fn cancellation_headers(run: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(CANCEL_HEADER, run);
    headers
}

/// Stored messages on a cancellation subject looked at, at most, for a genuine one when the
/// last is not: a forged answer stored after the cancellation must not hide it, and a flood
/// of them must not make a lookup endless (past this many, the run counts as not cancelled:
/// its jobs are done, which loses nothing).
const CANCEL_LOOKUPS: usize = 64;

/// Whether `run`'s coordinator stored its cancellation (`is_cancellation`).
pub(crate) async fn stored_cancellation(js: &jetstream::Context, run: &str) -> Result<bool> {
    use jetstream::stream::LastRawMessageErrorKind::NoMessageFound;
    let stream = js.get_stream(OUTCOMES_STREAM).await?;
    let subject = cancel_subject(run);
    let looked_up = |e: jetstream::stream::LastRawMessageError| {
        anyhow!("looking up whether run {run} was cancelled: {e}")
    };
    // The last first: the usual case, a cancellation and nothing after it.
    match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) if is_cancellation(run, Some(&m.headers)) => return Ok(true),
        Ok(_) => {}
        Err(e) if matches!(e.kind(), NoMessageFound) => return Ok(false),
        Err(e) => return Err(looked_up(e)),
    }
    let mut seq = 1;
    for _ in 0..CANCEL_LOOKUPS {
        let found = stream
            .raw_message_builder()
            .sequence(seq)
            .next_by_subject(subject.clone())
            .send()
            .await;
        match found {
            Ok(m) if is_cancellation(run, Some(&m.headers)) => return Ok(true),
            Ok(m) => seq = m.sequence + 1,
            Err(e) if matches!(e.kind(), NoMessageFound) => return Ok(false),
            Err(e) => return Err(looked_up(e)),
        }
    }
    tracing::warn!(%run, "more than {CANCEL_LOOKUPS} messages on the run's cancellation subject that are not a cancellation: taken for not cancelled");
    Ok(false)
}

/// The subject of a run's outcomes.
pub(crate) fn outcomes_subject(run: &str) -> String {
    format!("filepipe.outcomes.{run}")
}

/// Where the queue is: a NATS URL (`nats://`, or `tls://` for TLS; `user:password@` or a
/// token in it), and a credentials file for NATS accounts (JWT and nkey).
#[derive(Debug, Clone)]
pub(crate) struct Queue {
    /// The server's URL.
    pub(crate) url: String,
    /// A `.creds` file.
    pub(crate) creds: Option<PathBuf>,
    /// A PEM file of CA certificates to trust (a private CA's) in place of the system's (only
    /// these are trusted).
    pub(crate) tls_ca: Option<PathBuf>,
}

impl Queue {
    /// The URL as logs and messages show it: without the user and password (or token) it may
    /// hold, which would otherwise end up in the journal and in failure reports.
    pub(crate) fn shown(&self) -> String {
        crate::secret::shown_url(&self.url)
    }
}

/// A failure to reach or set up the queue at start: a usage error (exit 2), not a run's. Its
/// message is the whole chain of its cause, which is therefore not its `source` too (a chain
/// printed with `{:#}` would say each cause twice).
#[derive(Debug, thiserror::Error)]
#[error("{}", crate::error::chain(.0))]
pub(crate) struct Unreachable(pub(crate) anyhow::Error);

/// A connection to JetStream, with the runtime its client runs on. Threads that are not the
/// runtime's call into it with `rt.block_on`.
pub(crate) struct Conn {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    /// What the server refused this user.
    pub(crate) refusals: Arc<Refusals>,
    /// The CA certificates the client reads at each TLS connect, reconnects included (a
    /// sealed copy it opens by name): held as long as the client. Last, so dropped after
    /// `rt`, whose tasks reconnect.
    _trust: Option<trust::Trust>,
}

impl Conn {
    /// `setup` on this connection.
    pub(crate) async fn setup(&self) -> Result<()> {
        setup(&self.js, &self.refusals).await
    }

    /// Runs `fut`, a step of a start, to its end or to the server's refusal of a permission
    /// it needs (`Refusals::unless_refused`), whichever comes first.
    pub(crate) fn start<T>(&self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.rt
            .block_on(self.refusals.unless_refused(fut, Duration::ZERO))
    }
}

/// The permission violations the server reports on a connection (a user whose `permissions`
/// do not allow a subject: its publish or subscription is dropped, and the server says so
/// with an `-ERR` the client turns into an event). A refused JetStream request gets no answer
/// at all: without this, a start would wait out the request's timeout and then fail with
/// "timed out", or retry for ever.
#[derive(Debug)]
pub(crate) struct Refusals {
    /// The last refusal, as the server said it (`Permissions Violation for Publish to
    /// "SUBJECT"`); changed at each.
    last: tokio::sync::watch::Sender<Option<String>>,
}

impl Refusals {
    fn new() -> Refusals {
        Refusals {
            last: tokio::sync::watch::channel(None).0,
        }
    }

    /// Hears the client's events: each refusal is recorded, and logged (an error, whenever it
    /// comes: a permission missing mid-run is the server's configuration to fix), but for a
    /// stream's creation, which a worker need not be allowed (`setup` says what follows).
    fn heard(&self, event: &async_nats::Event) {
        if let async_nats::Event::ServerError(async_nats::ServerError::Other(said)) = event {
            if said.starts_with("Permissions Violation") {
                let refused = Refused(said.clone());
                if !refused.is_creation() {
                    tracing::error!("{refused}");
                }
                self.last.send_replace(Some(said.clone()));
            }
        }
    }

    /// `fut` (requests to the server), or, as soon as the server refuses this user something
    /// while it runs, an error that says what: a refused request is never answered. Then
    /// `settle` more for a refusal of what `fut` sent that needs no answer (a subscription:
    /// the server's refusal reaches the client before the answer to a later flush, but is
    /// heard on another task).
    pub(crate) async fn unless_refused<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T>>,
        settle: Duration,
    ) -> Result<T> {
        let mut refused = self.last.subscribe();
        let done = tokio::select! {
            done = fut => done?,
            Ok(()) = refused.changed() => return Err(refusal(refused.borrow().as_deref())),
        };
        match tokio::time::timeout(settle, refused.changed()).await {
            Ok(Ok(())) => Err(refusal(refused.borrow().as_deref())),
            _ => Ok(done),
        }
    }
}

/// The error for a refusal the server reported (`said`).
fn refusal(said: Option<&str>) -> anyhow::Error {
    Refused(said.unwrap_or("Permissions Violation").to_owned()).into()
}

/// The server refused this user a permission: what it said.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server refused this user a permission filepipe needs: {0}: allow it in the server's \
     authorization (systemd/nats-server.conf lists what each role needs)"
)]
pub(crate) struct Refused(String);

impl Refused {
    /// The subject refused (`... to "SUBJECT"`), if the server named one.
    fn subject(&self) -> Option<&str> {
        let (_, quoted) = self.0.split_once('"')?;
        quoted.strip_suffix('"')
    }

    /// Whether what was refused is a stream's creation.
    fn is_stream_creation(&self) -> bool {
        self.subject()
            .is_some_and(|s| s.starts_with("$JS.API.STREAM.CREATE."))
    }

    /// Whether what was refused is a stream's or a consumer's creation (which a worker
    /// need not be allowed: it waits for a coordinator's).
    fn is_creation(&self) -> bool {
        self.is_stream_creation()
            || self.subject().is_some_and(|s| {
                s.starts_with("$JS.API.CONSUMER.CREATE.")
                    || s.starts_with("$JS.API.CONSUMER.DURABLE.CREATE.")
            })
    }
}

/// Whether this user may publish on `subject` (a stream's), found without storing anything:
/// a message the stream refuses (it expects another stream) is published, and the server
/// either refuses the publish (`Refused`) or has the stream answer that it does not match. A
/// permission only needed mid-run (publishing jobs, outcomes) is thus missed at start, not
/// after a first job waits out its timeout and is retried for ever. Only for a subject no
/// one of ours hears live (a core subscriber sees the empty probe: not the cancellations).
pub(crate) async fn may_publish(conn: &Conn, subject: &str) -> Result<()> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_EXPECTED_STREAM,
        "FILEPIPE_PERMISSION_PROBE",
    );
    let probe = async {
        let ack = conn
            .js
            .publish_with_headers(subject.to_owned(), headers, bytes::Bytes::new())
            .await?;
        // The expected answer is the stream's refusal: not an error here.
        let _ = ack.await;
        anyhow::Ok(())
    };
    conn.refusals
        .unless_refused(probe, Duration::ZERO)
        .await
        .with_context(|| format!("publishing on {subject}"))
}

/// What a client does when the streams are missing and its user may not make them.
#[derive(Clone, Copy)]
pub(crate) enum Missing<'a> {
    /// An error (a coordinator: it makes the streams).
    Fail,
    /// Nothing made: `None` (`status`, a look, which left both streams on a server that had
    /// none, a mistyped one say, and failed where its user may not make them: found by a
    /// review).
    Look,
    /// Wait for a coordinator to make them, until `shutdown` (a worker, which may be started
    /// before any coordinator ever ran and need not be allowed to make streams).
    Await(&'a Shutdown),
}

/// Connects to `q` and makes sure the streams exist (creating them if not; an existing one is
/// used as it is). Any failure is `Unreachable`.
pub(crate) fn connect(q: &Queue, name: &str) -> Result<Conn, Unreachable> {
    connect_or_await(q, name, Missing::Fail)?
        .ok_or_else(|| Unreachable(anyhow!("the streams are missing")))
}

/// What a `--creds` file holds.
#[derive(Debug, PartialEq)]
enum Creds {
    /// A user JWT and its seed (a `.creds` file, the server in operator mode).
    Jwt,
    /// A user nkey seed alone: the server's config names the user by its public key (`nkey:
    /// U...`), as systemd/nats-server.conf suggests. A `.creds` file only was taken, so such a
    /// user could not connect at all (found by a review).
    Seed(String),
}

impl Creds {
    /// What `text` holds: a JWT, or else the one user seed in it (alone, as `nk -gen user`
    /// prints it, or between the seed markers of a `.creds` file; the same seed twice is one).
    /// Anything else is refused with what was found.
    fn of(text: &str) -> Result<Creds, &'static str> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if text.contains("-----BEGIN NATS USER JWT-----") {
            return Ok(Creds::Jwt);
        }
        let mut seeds: Vec<&str> = (text.lines())
            .map(str::trim)
            .filter(|l| l.starts_with("SU") && nkeys::KeyPair::from_seed(l).is_ok())
            .collect();
        seeds.sort_unstable();
        seeds.dedup();
        match seeds[..] {
            [seed] => Ok(Creds::Seed(seed.to_string())),
            [] if (text.lines()).any(|l| nkeys::KeyPair::from_seed(l.trim()).is_ok()) => Err(
                "its seed is not a user's (an account's or operator's seed is not for \
                     connecting)",
            ),
            // The public key is what the server's config holds: an easy file to give by
            // mistake, and it signs nothing (found by a review).
            [] if (text.lines()).any(|l| {
                let l = l.trim();
                l.starts_with('U') && nkeys::KeyPair::from_public_key(l).is_ok()
            }) =>
            {
                Err(
                    "it holds a user's public key (U...), not its seed: give the seed \
                     (SU..., the first line `nk -gen user -pubout` prints), and the server \
                     the public key",
                )
            }
            [] => Err(
                "neither a credentials file (a user JWT and its nkey seed, as `nsc \
                       generate creds` writes it) nor a user nkey seed (SU..., for a server \
                       whose user is `nkey: U...`)",
            ),
            _ => Err("it holds more than one user seed: which one to use is not known"),
        }
    }
}

/// `connect`; `None` if a shutdown came while it waited for the streams (`Missing::Await`).
pub(crate) fn connect_or_await(
    q: &Queue,
    name: &str,
    missing: Missing,
) -> Result<Option<Conn>, Unreachable> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("filepipe-nats")
        .enable_all()
        .build()
        .context("starting the NATS client's runtime")
        .map_err(Unreachable)?;
    let refusals = Arc::new(Refusals::new());
    let made = rt
        .block_on(async {
            let heard = refusals.clone();
            let mut opts = async_nats::ConnectOptions::new()
                .name(name)
                .connection_timeout(Duration::from_secs(5))
                .event_callback(move |event| {
                    heard.heard(&event);
                    async {}
                });
            let (servers, auth) = servers(&q.url)?;
            match auth {
                Some(Auth::UserPassword(user, pass)) => opts = opts.user_and_password(user, pass),
                Some(Auth::Token(token)) => opts = opts.token(token),
                None => {}
            }
            // Each file is checked and read through one descriptor, and its contents handed
            // to the client (the CA's as a sealed in-memory copy, `trust`): async-nats reading
            // it again by its path would read whatever is there by then, not the file checked.
            let trust = q.tls_ca.as_deref().map(trust::Trust::of).transpose()?;
            if let Some(trust) = &trust {
                opts = trust.given_to(opts).require_tls(true);
            }
            if let Some(creds) = &q.creds {
                let rule = crate::secret::FileRule::Secret(crate::secret::CREDS_SECRET);
                let read = crate::secret::read_checked(creds, rule).map_err(|e| anyhow!(e))?;
                let text = String::from_utf8(read).map_err(|e| {
                    let utf16 = e.as_bytes().starts_with(&[0xff, 0xfe])
                        || e.as_bytes().starts_with(&[0xfe, 0xff]);
                    let hint = if utf16 {
                        " (UTF-16: save it as UTF-8)"
                    } else {
                        ""
                    };
                    anyhow!("{}: not UTF-8 text{hint}", creds.display())
                })?;
                opts = match Creds::of(&text) {
                    Ok(Creds::Jwt) => opts
                        .credentials(&text)
                        .with_context(|| format!("reading the credentials {}", creds.display()))?,
                    Ok(Creds::Seed(seed)) => opts.nkey(seed),
                    Err(why) => bail!("{}: {why}", creds.display()),
                };
            }
            // The credentials went in as options: the addresses the client keeps (and logs,
            // at debug) hold none.
            let client = opts
                .connect(servers)
                .await
                .with_context(|| format!("cannot connect to NATS at {}", q.shown()))?;
            let mut js = jetstream::new(client.clone());
            // A busy server (a file store being written, many clients) may take more than the
            // client's default 5 s to answer an API request or store a message: a slow answer
            // must not fail a run or a start.
            js.set_timeout(Duration::from_secs(30));
            if let Missing::Look = missing {
                let there = refusals
                    .unless_refused(streams_there(&js), Duration::ZERO)
                    .await
                    .map_err(|e| {
                        e.context(format!(
                            "looking at JetStream at {} (is it -js?)",
                            q.shown()
                        ))
                    })?;
                return anyhow::Ok(there.then_some((client, js, trust)));
            }
            let made = match (setup(&js, &refusals).await, missing) {
                (Ok(()), _) => true,
                (Err(e), Missing::Await(shutdown)) if e.is::<MayNotMake>() => {
                    await_streams(&js, &refusals, shutdown).await?
                }
                (Err(e), _) if e.is::<MayNotMake>() || e.is::<Refused>() => {
                    return Err(e.context(format!("setting up JetStream at {}", q.shown())))
                }
                (Err(e), _) => {
                    return Err(e.context(format!(
                        "setting up JetStream at {} (is it -js?)",
                        q.shown()
                    )))
                }
            };
            anyhow::Ok(made.then_some((client, js, trust)))
        })
        .map_err(Unreachable)?;
    Ok(made.map(|(client, js, trust)| Conn {
        rt,
        client,
        js,
        refusals,
        _trust: trust,
    }))
}

/// Whether both streams are there (made by a coordinator); any trouble but a stream not found
/// is an error.
async fn streams_there(js: &jetstream::Context) -> Result<bool> {
    use jetstream::context::GetStreamErrorKind;
    for name in [JOBS_STREAM, OUTCOMES_STREAM] {
        match js.get_stream(name).await {
            Ok(_) => {}
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(anyhow!(e).context(format!("looking for {name}"))),
        }
    }
    Ok(true)
}

/// Waits for a coordinator to make the streams this user may not make, looking every second
/// (saying so once); `false` if a shutdown came first. Any other trouble is an error.
async fn await_streams(
    js: &jetstream::Context,
    refusals: &Refusals,
    shutdown: &Shutdown,
) -> Result<bool> {
    const WAITING: &str = "the streams are missing and this user may not make them: waiting for a coordinator to make them";
    tracing::warn!("{WAITING}");
    // Under systemd: started (connected, and waiting is what it is meant to do), with a
    // status that says for what. Holding the start job open instead would block
    // `systemctl start` and the boot's multi-user.target until some coordinator runs, which
    // on a host set up before any may be days.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(WAITING),
    ]);
    loop {
        if shutdown.requested() {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let found = refusals
            .unless_refused(
                async {
                    for name in [JOBS_STREAM, OUTCOMES_STREAM] {
                        match js.get_stream(name).await {
                            Ok(_) => {}
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    jetstream::context::GetStreamErrorKind::JetStream(j)
                                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                                ) =>
                            {
                                return Ok(false)
                            }
                            Err(e) => return Err(anyhow!(e).context(format!("looking for {name}"))),
                        }
                    }
                    Ok(true)
                },
                Duration::ZERO,
            )
            .await?;
        if found {
            tracing::info!("the streams are there");
            return Ok(true);
        }
    }
}

/// A stream is missing and the server refused this user to make it.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct MayNotMake(anyhow::Error);

/// The user and password, or the token, of a queue URL, percent-decoded.
enum Auth {
    UserPassword(String, String),
    Token(String),
}

/// The servers of a queue URL (one, or several comma-separated; `nats://` assumed where no
/// scheme is given, as the client does), without their credentials, and the credentials: the
/// first server's (a list shares them). A list whose first server has none but a later one
/// has, or a server that does not parse, is refused: it is what a `,` or `/` left unencoded
/// in a password looks like, and guessing would send part of the password as a host name.
/// Errors show the URL only as `secret::shown_url` does.
fn servers(url: &str) -> Result<(Vec<async_nats::ServerAddr>, Option<Auth>)> {
    let shown = crate::secret::shown_url(url);
    let encode_hint = if url.contains('@') {
        " (a / , @ or : in a user or password must be percent-encoded: %2F %2C %40 %3A)"
    } else {
        ""
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .context("a user or password in the URL that is not UTF-8")
    };
    let mut servers = Vec::new();
    let mut auth = None;
    for (i, piece) in url.split(',').enumerate() {
        let addr: async_nats::ServerAddr = piece.trim().parse().map_err(|e: std::io::Error| {
            // The client names a wrong scheme, which may be a user's name: said without it.
            let e = e.to_string();
            let why = match e.contains("invalid scheme") {
                true => "the scheme is not nats, tls, ws or wss",
                false => e.as_str(),
            };
            anyhow!("not a NATS URL: {shown}: {why}{encode_hint}")
        })?;
        let mut inner = addr.into_inner();
        let has_auth = !inner.username().is_empty() || inner.password().is_some();
        if i == 0 && has_auth {
            auth = Some(match inner.password() {
                Some(pass) => Auth::UserPassword(decode(inner.username())?, decode(pass)?),
                None => Auth::Token(decode(inner.username())?),
            });
        } else if has_auth && auth.is_none() {
            bail!(
                "not a NATS URL: {shown}: a later server has a user or token and the first has \
                 none (a list takes the first server's){encode_hint}"
            );
        }
        let cleared = inner.set_username("").is_ok() && inner.set_password(None).is_ok();
        if !cleared {
            bail!("not a NATS URL: {shown}: a user or password where there can be none");
        }
        let addr = async_nats::ServerAddr::from_url(inner)
            .map_err(|e| anyhow!("not a NATS URL: {shown}: {e}"))?;
        servers.push(addr);
    }
    Ok((servers, auth))
}

/// The streams (created if missing; an existing one is used as it is). Two clients starting
/// together may both find a stream missing: the one whose create loses the race finds the
/// other's. A user the server refuses to make a missing stream gets `MayNotMake` at once.
async fn setup(js: &jetstream::Context, refusals: &Refusals) -> Result<()> {
    for _ in 0..2 {
        match refusals
            .unless_refused(create_streams(js), Duration::ZERO)
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if refused_to_make(&e) => return Err(MayNotMake(e).into()),
            Err(e)
                if js.get_stream(JOBS_STREAM).await.is_ok()
                    && js.get_stream(OUTCOMES_STREAM).await.is_ok() =>
            {
                tracing::debug!(error = %format!("{e:#}"), "another client made the streams");
                return Ok(());
            }
            Err(_) => {}
        }
    }
    match refusals
        .unless_refused(create_streams(js), Duration::ZERO)
        .await
    {
        Err(e) if refused_to_make(&e) => Err(MayNotMake(e).into()),
        done => done,
    }
}

/// Whether `e` is the server's refusal of a stream's creation.
fn refused_to_make(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>()
        .is_some_and(Refused::is_stream_creation)
}

async fn create_streams(js: &jetstream::Context) -> Result<()> {
    js.get_or_create_stream(stream::Config {
        name: JOBS_STREAM.into(),
        subjects: vec!["filepipe.jobs.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        max_message_size: wire::MAX_MESSAGE as i32,
        ..Default::default()
    })
    .await?;
    js.get_or_create_stream(stream::Config {
        name: OUTCOMES_STREAM.into(),
        subjects: vec!["filepipe.outcomes.>".into(), "filepipe.cancel.>".into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(7 * 24 * 3600),
        duplicate_window: Duration::from_secs(120),
        max_message_size: wire::MAX_MESSAGE as i32,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// The workers' consumer of `root` as filepipe makes it: explicit acks, redelivery after
/// `ACK_WAIT`, no server-side limit on deliveries (the worker enforces `MAX_DELIVER`, so the
/// files are reported failed, not silently dropped).
fn workers_config(root: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(workers(root)),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: 100_000,
        filter_subject: format!("filepipe.jobs.{root}.>"),
        ..Default::default()
    }
}

/// The workers' consumer of `root` was found with settings filepipe does not make (changed by
/// a user allowed to, or made ahead by one): working from it could leave jobs undelivered for
/// ever, or delivered again and again. What differs, setting by setting.
#[derive(Debug, thiserror::Error)]
#[error(
    "the workers' consumer {name} on {JOBS_STREAM} is not as filepipe makes it ({}): someone \
     changed or made it; not used. Remove it (`nats consumer rm {JOBS_STREAM} {name}`) and a \
     coordinator makes it again; let only the coordinator user create consumers \
     (systemd/nats-server.conf)",
    .differs.join("; ")
)]
pub(crate) struct Tampered {
    name: String,
    differs: Vec<String>,
}

/// `info`, the consumer found for `root`, checked against `workers_config`: every setting
/// that decides which jobs are delivered, how, and when again.
pub(crate) fn check_workers_consumer(root: &str, info: &consumer::Info) -> Result<(), Tampered> {
    let want = workers_config(root);
    let got = &info.config;
    let mut differs = Vec::new();
    let mut differ = |what: &str, got: String, want: String| {
        if got != want {
            differs.push(format!("{what} {got}, not {want}"));
        }
    };
    // Ours, alone (several filters, as a 2.10 server may hold, leave this one empty).
    differ(
        "filter subject",
        format!("{:?}", got.filter_subject),
        format!("{:?}", want.filter_subject),
    );
    differ(
        "ack policy",
        format!("{:?}", got.ack_policy),
        format!("{:?}", want.ack_policy),
    );
    differ(
        "ack wait",
        format!("{:?}", got.ack_wait),
        format!("{:?}", want.ack_wait),
    );
    // No limit (-1, or 0 as a server may say it): a limit would drop a file's job silently.
    differ(
        "max deliver",
        got.max_deliver.max(0).to_string(),
        want.max_deliver.max(0).to_string(),
    );
    differ(
        "deliver policy",
        format!("{:?}", got.deliver_policy),
        format!("{:?}", want.deliver_policy),
    );
    differ(
        "max ack pending",
        got.max_ack_pending.to_string(),
        want.max_ack_pending.to_string(),
    );
    differ(
        "deliver subject (a push consumer)",
        format!("{:?}", got.deliver_subject),
        "None".to_owned(),
    );
    differ(
        "headers only",
        got.headers_only.to_string(),
        false.to_string(),
    );
    differ("backoff", format!("{:?}", got.backoff), "[]".to_owned());
    differ(
        "max batch, bytes, expires",
        format!("{} {} {:?}", got.max_batch, got.max_bytes, got.max_expires),
        format!("0 0 {:?}", Duration::ZERO),
    );
    match differs.is_empty() {
        true => Ok(()),
        false => Err(Tampered {
            name: workers(root),
            differs,
        }),
    }
}

/// The workers' consumer for `root`, created if missing (`workers_config`), and checked
/// (`check_workers_consumer`: a `Tampered` error if it is not as filepipe makes it).
pub(crate) async fn workers_consumer(
    js: &jetstream::Context,
    root: &str,
) -> Result<consumer::PullConsumer> {
    let stream = js.get_stream(JOBS_STREAM).await?;
    let consumer = stream
        .get_or_create_consumer(&workers(root), workers_config(root))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    check_workers_consumer(root, consumer.cached_info())?;
    Ok(consumer)
}

/// `workers_consumer` for a worker, whose user need not be allowed to create consumers
/// (the example's is not): if the server refuses it the creation of a missing one, it waits
/// for a coordinator to make it, looking every second (saying so once, and, under systemd,
/// ready: waiting is what it is there for); `None` if a shutdown came first.
pub(crate) async fn await_workers_consumer(
    js: &jetstream::Context,
    refusals: &Refusals,
    root: &str,
    shutdown: &Shutdown,
) -> Result<Option<consumer::PullConsumer>> {
    match refusals
        .unless_refused(workers_consumer(js, root), Duration::ZERO)
        .await
    {
        Err(e)
            if e.downcast_ref::<Refused>()
                .is_some_and(Refused::is_creation) => {}
        done => return done.map(Some),
    }
    let waiting = format!(
        "the workers' consumer {} is missing and this user may not make it: waiting for a \
         coordinator to make it",
        workers(root)
    );
    tracing::warn!("{waiting}");
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&waiting),
    ]);
    let stream = js.get_stream(JOBS_STREAM).await?;
    loop {
        if shutdown.requested() {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let found = refusals
            .unless_refused(
                async { Ok(stream.consumer_info(workers(root)).await) },
                Duration::ZERO,
            )
            .await?;
        match found {
            Ok(_) => {
                tracing::info!(consumer = %workers(root), "the workers' consumer is there");
                return refusals
                    .unless_refused(workers_consumer(js, root), Duration::ZERO)
                    .await
                    .map(Some);
            }
            Err(e) if consumer_not_found(&e) => {}
            Err(e) => return Err(anyhow!(e).context(format!("looking for {}", workers(root)))),
        }
    }
}

/// Whether a consumer info request failed because the consumer is not there.
pub(crate) fn consumer_not_found(e: &jetstream::context::ConsumerInfoError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::ConsumerInfoErrorKind::NotFound
    ) || matches!(
        e.kind(),
        jetstream::context::ConsumerInfoErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
    )
}

/// How a request not waited for longer is worded (a worker tells it from a refusal by it).
pub(crate) const NO_ANSWER: &str = "no answer from the server";

/// Up to `n` messages from `consumer`: those available now, or else the first to arrive
/// within `wait` (none if none does). Never returns at once empty-handed while the server
/// answers, so a caller looping on it does not spin.
pub(crate) async fn take(
    consumer: &consumer::PullConsumer,
    n: usize,
    wait: Duration,
) -> Result<Vec<jetstream::Message>> {
    // A pull request the server never answers (it restarted while holding it) would leave
    // the stream waiting for ever: the whole take is bounded, and a caller retries.
    let limit = wait + Duration::from_secs(5);
    tokio::time::timeout(limit, take_now_or_first(consumer, n, wait))
        .await
        .map_err(|_| anyhow::anyhow!("{NO_ANSWER} within {limit:?}"))?
}

async fn take_now_or_first(
    consumer: &consumer::PullConsumer,
    n: usize,
    wait: Duration,
) -> Result<Vec<jetstream::Message>> {
    use futures_util::StreamExt;
    let collect = |mut batch: consumer::pull::Batch| async move {
        let mut msgs = Vec::new();
        while let Some(m) = batch.next().await {
            msgs.push(m.map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        anyhow::Ok(msgs)
    };
    // No wait: what is there now.
    let now = consumer
        .fetch()
        .max_messages(n)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let msgs = collect(now).await?;
    if !msgs.is_empty() || wait.is_zero() {
        return Ok(msgs);
    }
    // Nothing: wait for the first to arrive (the next call takes the rest).
    let first = consumer
        .batch()
        .max_messages(1)
        .expires(wait)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    collect(first).await
}

/// Who this process is, for logs and outcome batches: host name and pid.
pub(crate) fn whoami() -> String {
    let host = rustix::system::uname();
    format!(
        "{}:{}",
        host.nodename().to_string_lossy(),
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_creds_file_holds_a_jwt_or_one_user_seed() {
        let user = nkeys::KeyPair::new_user().seed().unwrap();
        let other = nkeys::KeyPair::new_user().seed().unwrap();
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{user}\n------END USER NKEY SEED------\n"
        );
        let seed = Ok(Creds::Seed(user.clone()));
        assert_eq!(Creds::of(&creds), Ok(Creds::Jwt));
        assert_eq!(Creds::of(&user), seed);
        assert_eq!(Creds::of(&format!("  {user}  \r\n")), seed);
        assert_eq!(Creds::of(&format!("\u{feff}{user}\n")), seed);
        assert_eq!(Creds::of(&format!("{user}\n{user}\n")), seed);
        assert_eq!(Creds::of(&format!("# mine\n{user}\n")), seed);
        let marked =
            format!("-----BEGIN USER NKEY SEED-----\n{user}\n------END USER NKEY SEED------\n");
        assert_eq!(Creds::of(&marked), seed);
        // Which of two would be a guess; an account's or operator's seed is no user's.
        let two = Creds::of(&format!("{user}\n{other}\n")).unwrap_err();
        assert!(two.contains("more than one"), "{two}");
        let account = nkeys::KeyPair::new_account().seed().unwrap();
        let not_a_user = Creds::of(&account).unwrap_err();
        assert!(not_a_user.contains("not a user's"), "{not_a_user}");
        let public = nkeys::KeyPair::new_user().public_key();
        let public_only = Creds::of(&format!("{public}\n")).unwrap_err();
        assert!(public_only.contains("public key"), "{public_only}");
        assert!(Creds::of("SUNOTASEED").unwrap_err().contains("neither"));
        assert!(Creds::of("").unwrap_err().contains("neither"));
    }

    #[test]
    fn a_refusal_names_its_subject_and_a_stream_creation_is_told_apart() {
        let create = Refused(
            r#"Permissions Violation for Publish to "$JS.API.STREAM.CREATE.FILEPIPE_JOBS""#.into(),
        );
        assert_eq!(
            create.subject(),
            Some("$JS.API.STREAM.CREATE.FILEPIPE_JOBS")
        );
        assert!(create.is_stream_creation());
        assert!(refused_to_make(&anyhow::Error::from(create)));
        let sub =
            Refused(r#"Permissions Violation for Subscription to "filepipe.cancel.>""#.into());
        assert_eq!(sub.subject(), Some("filepipe.cancel.>"));
        assert!(!sub.is_stream_creation());
        assert!(!refused_to_make(&anyhow::Error::from(sub)));
        assert_eq!(Refused("Permissions Violation".into()).subject(), None);
        assert!(!refused_to_make(&anyhow!("timed out")));
    }
}
