//! Prometheus metrics (`--metrics ADDR:PORT`): what a daemon did and is doing, recorded by
//! metrics-exporter-prometheus and served on `/metrics` by threads of their own, so a scrape
//! never waits on the pipeline and the pipeline never waits on a scrape. Without `--metrics`
//! no recorder is installed and every update below is a no-op.
//!
//! The exporter's own listener is not used: it serves any number of connections and never
//! times one out, so a local client holding a thousand half-sent requests took every
//! descriptor the process had (inputs then failed for good with EMFILE) and its accept loop
//! spun a core logging hundreds of MB (found by a review). Here one thread accepts every
//! connection and waits (`poll`) for at most `PENDING` requests at once, each with a deadline;
//! a connection beyond that makes room by closing the one waiting longest, so idle clients
//! hold a few descriptors and never a scrape (when threads answered one connection each, 100
//! idle clients kept a scrape waiting 11.5 s, past Prometheus's 10 s timeout: found by a
//! review). `CONNECTIONS` threads write the answers.
//!
//! Every series carries the pipeline's root (`pipeline`): a service runs one per `[[watch]]`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context, Result};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::Config;
use crate::sink::Disposition;
use crate::travel::{Outcome, Stats};

/// The delays a file's output is published after the file was last written, in seconds:
/// from a settle time of well under a second to a retry an hour later.
const DELAY_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];

/// Starts serving `/metrics` on `addr` and installs the recorder. A port already in use, or
/// an address that cannot be bound, is an error here, at start.
/// Whether `serve` installed a recorder: without one, meters do no work at all (the label
/// strings of a series would otherwise be built per file on a batch's hot path, for nothing).
static ON: AtomicBool = AtomicBool::new(false);

pub(crate) fn serve(addr: SocketAddr) -> Result<()> {
    let listener =
        TcpListener::bind(addr).map_err(|e| anyhow!("cannot serve metrics on {addr}: {e}"))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(DELAY.into()),
            &DELAY_BUCKETS,
        )
        .and_then(|b| b.install_recorder())
        .map_err(|e| anyhow!("cannot serve metrics on {addr}: {e}"))?;
    listener.set_nonblocking(true).context("serving metrics")?;
    let (requests, to_answer) = crossbeam_channel::bounded::<Request>(CONNECTIONS);
    let (closing, to_close) = crossbeam_channel::bounded::<TcpStream>(LINGERING);
    for i in 0..CONNECTIONS {
        let (to_answer, handle, closing) = (to_answer.clone(), handle.clone(), closing.clone());
        std::thread::Builder::new()
            .name(format!("filepipe-metrics-{i}"))
            .spawn(move || {
                for r in to_answer {
                    answer(r, &handle, &closing);
                }
            })
            .context("starting the metrics threads")?;
    }
    std::thread::Builder::new()
        .name("filepipe-metrics-close".into())
        .spawn(move || linger(&to_close))
        .context("starting the metrics threads")?;
    std::thread::Builder::new()
        .name("filepipe-metrics-accept".into())
        .spawn(move || gather(&listener, &requests))
        .context("starting the metrics threads")?;
    // What the exporter's own task did: histograms are drained into their buckets here.
    std::thread::Builder::new()
        .name("filepipe-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP);
            handle.run_upkeep();
        })
        .context("starting the metrics threads")?;
    ON.store(true, Ordering::Relaxed);
    describe();
    gauge!("filepipe_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    Ok(())
}

const DELAY: &str = "filepipe_publish_delay_seconds";

/// Answers written at once (a thread each).
const CONNECTIONS: usize = 8;

/// Connections waiting for their request at once, at most: a new one closes the one that has
/// waited longest (a scraper sends its request as it connects, so only idle ones are closed).
const PENDING: usize = 8;

/// How long a client has to send its request: a scraper sends it at once.
const REQUEST_DEADLINE: Duration = Duration::from_secs(1);

/// How long a client has to take the answer, once its request is in.
const CLIENT_DEADLINE: Duration = Duration::from_secs(5);

/// The longest request head read (the request line and headers).
const REQUEST_MAX: usize = 8192;

/// How often the recorder's histograms are drained (the exporter's own default).
const UPKEEP: Duration = Duration::from_secs(5);

/// A request read: its connection, its head, and whether the head ended (not cut at
/// `REQUEST_MAX`).
struct Request {
    stream: TcpStream,
    head: Vec<u8>,
    complete: bool,
}

/// A connection waiting for the rest of its request.
struct Waiting {
    stream: TcpStream,
    head: Vec<u8>,
    until: Instant,
}

/// What a read of a waiting connection found.
enum Heard {
    /// Not all of the request yet.
    More,
    /// Closed, or failed: dropped.
    Gone,
    /// The head, whole (`true`) or cut at `REQUEST_MAX`.
    Head(bool),
}

/// The accepting thread, for good: accepts every connection, reads requests as they come on
/// all of them, and hands each whole request to the answering threads. A failure to accept
/// or to poll (no descriptor left, say) waits a moment: never a busy loop, and said once a
/// minute at most.
fn gather(listener: &TcpListener, requests: &crossbeam_channel::Sender<Request>) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use std::collections::VecDeque;
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut warned: Option<Instant> = None;
    let mut warn = |what: &str, e: &std::io::Error| {
        if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
            tracing::warn!(error = %e, "{what} failed");
            warned = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    loop {
        let now = Instant::now();
        waiting.retain(|w| w.until > now);
        let wait = (waiting.iter().map(|w| w.until).min())
            .map_or(Duration::from_secs(60), |until| until - now);
        let timeout = Timespec::try_from(wait).unwrap_or(Timespec {
            tv_sec: 60,
            tv_nsec: 0,
        });
        let (accept, ready) = {
            let mut fds: Vec<PollFd<'_>> = std::iter::once(PollFd::new(listener, PollFlags::IN))
                .chain(
                    waiting
                        .iter()
                        .map(|w| PollFd::new(&w.stream, PollFlags::IN)),
                )
                .collect();
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    warn("waiting for metrics connections", &e.into());
                    continue;
                }
            }
            let ready: Vec<bool> = fds[1..].iter().map(|f| !f.revents().is_empty()).collect();
            (!fds[0].revents().is_empty(), ready)
        };
        for i in (0..ready.len()).rev() {
            if !ready[i] {
                continue;
            }
            match read_more(&mut waiting[i]) {
                Heard::More => {}
                Heard::Gone => drop(waiting.remove(i)),
                Heard::Head(complete) => {
                    if let Some(w) = waiting.remove(i) {
                        if !hand_over(w, complete, requests) {
                            return;
                        }
                    }
                }
            }
        }
        if !accept {
            continue;
        }
        // A few at a time, each read at once: a scraper's request is in by then, and goes to
        // be answered before a burst of idle connects can push it out (found by a review:
        // one accept loop draining the backlog closed scrapes it had not read yet).
        for _ in 0..PENDING {
            match listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let mut w = Waiting {
                        stream,
                        head: Vec::with_capacity(1024),
                        until: Instant::now() + REQUEST_DEADLINE,
                    };
                    match read_more(&mut w) {
                        Heard::More => {}
                        Heard::Gone => continue,
                        Heard::Head(complete) => {
                            if !hand_over(w, complete, requests) {
                                return;
                            }
                            continue;
                        }
                    }
                    if waiting.len() >= PENDING {
                        waiting.pop_front();
                    }
                    waiting.push_back(w);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn("accepting a metrics connection", &e);
                    break;
                }
            }
        }
    }
}

/// Hands `w`'s request, its head read, to the answering threads; `false` once they are gone.
fn hand_over(w: Waiting, complete: bool, requests: &crossbeam_channel::Sender<Request>) -> bool {
    // Answered by a thread that writes with a deadline: blocking again (a connection that
    // cannot be is dropped).
    if w.stream.set_nonblocking(false).is_err() {
        return true;
    }
    let request = Request {
        stream: w.stream,
        head: w.head,
        complete,
    };
    requests.send(request).is_ok()
}

/// Reads what `w`'s client sent since, without waiting.
fn read_more(w: &mut Waiting) -> Heard {
    let mut buf = [0u8; 1024];
    loop {
        // A bare LF ends lines too (RFC 9112 allows a server to take it).
        let head = &w.head;
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Heard::Head(true);
        }
        if head.len() >= REQUEST_MAX {
            return Heard::Head(false);
        }
        match w.stream.read(&mut buf) {
            Ok(0) => return Heard::Gone,
            Ok(n) => w.head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Heard::More,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Heard::Gone,
        }
    }
}

/// Answers one HTTP/1 request, then closes its connection: `GET` or `HEAD /metrics` gets the
/// metrics, anything else its error status. A client that does not take the answer within
/// `CLIENT_DEADLINE` is dropped.
fn answer(
    request: Request,
    handle: &PrometheusHandle,
    closing: &crossbeam_channel::Sender<TcpStream>,
) {
    let Request {
        mut stream,
        head,
        complete,
    } = request;
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = first.strip_suffix(b"\r").unwrap_or(first);
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (words.next().unwrap_or_default(), words.next());
    // The absolute form (`http://host/metrics`), which a server must take, as the origin form.
    let path = target.map(|t| {
        let t = match t.strip_prefix(b"http://") {
            Some(rest) => rest
                .iter()
                .position(|&b| b == b'/')
                .map_or(&b"/"[..], |i| &rest[i..]),
            None => t,
        };
        t.split(|&b| b == b'?').next().unwrap_or_default()
    });
    let (status, body) = match (complete, method, path) {
        (false, _, _) => ("431 Request Header Fields Too Large", String::new()),
        (true, _, None) => ("400 Bad Request", String::new()),
        (true, b"GET" | b"HEAD", Some(b"/metrics")) => ("200 OK", handle.render()),
        (true, b"GET" | b"HEAD", Some(_)) => ("404 Not Found", "metrics are on /metrics\n".into()),
        (true, _, Some(_)) => ("405 Method Not Allowed", String::new()),
    };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        reply.push_str("Allow: GET, HEAD\r\n");
    }
    reply.push_str("\r\n");
    if method != b"HEAD" {
        reply.push_str(&body);
    }
    // A client that does not take the answer holds this thread `CLIENT_DEADLINE` per write
    // that blocks (the kernel's socket buffer takes a page of metrics in one).
    if stream.set_write_timeout(Some(CLIENT_DEADLINE)).is_ok()
        && stream.write_all(reply.as_bytes()).is_ok()
    {
        // What the client sent past the head (pipelined requests), unread, would have the
        // close reset the connection, and a client reading to the end lose the answer (found
        // by a review): the answer's end is said, then what comes is read and dropped, for a
        // moment, by `linger`, not here: a client that never closes held this thread for
        // it, and 500 such clients kept a scrape waiting 3.5 s (found by a review).
        let _ = stream.shutdown(std::net::Shutdown::Write);
        if stream.set_nonblocking(true).is_ok() {
            // Full (a flood of such clients): closed now.
            let _ = closing.try_send(stream);
        }
    }
}

/// How long an answered connection's late bytes are read and dropped before it is closed.
const LINGER: Duration = Duration::from_millis(200);

/// Answered connections lingering at once, at most: a new one closes the oldest.
const LINGERING: usize = 256;

/// The closing thread, for good: reads and drops what answered connections still send, each
/// until its client closes it or for `LINGER`, all at once (`poll`).
fn linger(to_close: &crossbeam_channel::Receiver<TcpStream>) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use std::collections::VecDeque;
    let mut held: VecDeque<(TcpStream, Instant)> = VecDeque::new();
    let mut sink = [0u8; 4096];
    loop {
        if held.is_empty() {
            match to_close.recv() {
                Ok(s) => held.push_back((s, Instant::now() + LINGER)),
                Err(_) => return,
            }
        }
        while let Ok(s) = to_close.try_recv() {
            if held.len() >= LINGERING {
                held.pop_front();
            }
            held.push_back((s, Instant::now() + LINGER));
        }
        let now = Instant::now();
        held.retain(|(_, until)| *until > now);
        // Woken for new connections to hold at least this often.
        let wait = (held.iter().map(|(_, until)| *until - now).min())
            .unwrap_or(LINGER)
            .min(Duration::from_millis(20));
        let timeout = Timespec::try_from(wait).unwrap_or(Timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        });
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd<'_>> = (held.iter())
                .map(|(s, _)| PollFd::new(s, PollFlags::IN))
                .collect();
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) => fds.iter().map(|f| !f.revents().is_empty()).collect(),
                Err(rustix::io::Errno::INTR) => continue,
                // Nothing to wait on well: each closed now.
                Err(_) => {
                    held.clear();
                    continue;
                }
            }
        };
        for i in (0..ready.len()).rev() {
            if !ready[i] {
                continue;
            }
            let stream = &mut held[i].0;
            let open = loop {
                match stream.read(&mut sink) {
                    Ok(0) => break false,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break false,
                }
            };
            if !open {
                drop(held.remove(i));
            }
        }
    }
}

/// HELP and unit lines for every series.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "filepipe_files_total",
        "Files that ended, by outcome (done, skipped, failed) and reason"
    );
    describe_counter!(
        "filepipe_retries_total",
        "Failed attempts that will be tried again, by reason"
    );
    describe_counter!(
        "filepipe_input_bytes_total",
        Unit::Bytes,
        "Bytes read from the files done"
    );
    describe_counter!(
        "filepipe_output_bytes_total",
        Unit::Bytes,
        "Bytes written for the files done (compressed outputs)"
    );
    describe_gauge!(
        "filepipe_queued_files",
        "Files waiting to settle or for a worker"
    );
    describe_gauge!(
        "filepipe_in_flight_files",
        "Files the workers have and have not finished"
    );
    describe_gauge!(
        "filepipe_retrying_files",
        "Files waiting to be tried again after a transient failure"
    );
    describe_histogram!(
        DELAY,
        Unit::Seconds,
        "From a file's last write (its mtime) to its output published and recorded"
    );
    describe_counter!(
        "filepipe_rescans_total",
        "Whole-tree rescans, by cause (overflow: the kernel dropped events; poll: --poll)"
    );
    describe_gauge!(
        "filepipe_state_commit_timestamp_seconds",
        Unit::Seconds,
        "When the state last committed outcomes (Unix time)"
    );
    describe_gauge!("filepipe_build_info", "The running build (value 1)");
}

/// The pipeline's name in its series: its root.
fn pipeline(cfg: &Config) -> String {
    cfg.root.display().to_string()
}

/// One pipeline's meters, for its reporter.
pub(crate) struct Meter {
    pipeline: String,
    op: &'static str,
    bytes_in: Counter,
    bytes_out: Counter,
    queued: Gauge,
    in_flight: Gauge,
    retrying: Gauge,
    delay: Histogram,
}

impl Meter {
    pub(crate) fn new(cfg: &Config, op: &'static str) -> Meter {
        let pipeline = pipeline(cfg);
        let p = pipeline.clone();
        Meter {
            bytes_in: counter!("filepipe_input_bytes_total", "pipeline" => p.clone(), "op" => op),
            bytes_out: counter!("filepipe_output_bytes_total", "pipeline" => p.clone(), "op" => op),
            queued: gauge!("filepipe_queued_files", "pipeline" => p.clone()),
            in_flight: gauge!("filepipe_in_flight_files", "pipeline" => p.clone()),
            retrying: gauge!("filepipe_retrying_files", "pipeline" => p.clone()),
            delay: histogram!(DELAY, "pipeline" => p, "op" => op),
            pipeline,
            op,
        }
    }

    /// One outcome, as the sink disposed of it.
    pub(crate) fn outcome(&self, outcome: &Outcome, disposition: &Disposition) {
        if !ON.load(Ordering::Relaxed) {
            return;
        }
        let (ended, reason) = match outcome {
            Outcome::Done { done, .. } => {
                self.bytes_in.increment(done.bytes_in);
                self.bytes_out.increment(done.bytes_out);
                if let Some(stamp) = done.stamp {
                    let written = SystemTime::UNIX_EPOCH
                        + Duration::from_nanos(u64::try_from(stamp.mtime_ns).unwrap_or(0));
                    // A file dated in the future (clock skew, touch -d) says nothing.
                    if let Ok(delay) = SystemTime::now().duration_since(written) {
                        self.delay.record(delay.as_secs_f64());
                    }
                }
                ("done", "")
            }
            Outcome::Skipped { reason, .. } => ("skipped", reason.kind.as_str()),
            Outcome::Failed { error, .. } => {
                if matches!(disposition, Disposition::Retry(_)) {
                    counter!("filepipe_retries_total", "pipeline" => self.pipeline.clone(), "op" => self.op, "reason" => error.kind.as_str())
                        .increment(1);
                    return;
                }
                ("failed", error.kind.as_str())
            }
        };
        counter!(
            "filepipe_files_total",
            "pipeline" => self.pipeline.clone(),
            "op" => self.op,
            "outcome" => ended,
            "reason" => reason
        )
        .increment(1);
    }

    /// Counts `n` files an incremental batch found unchanged: done, nothing published (so no
    /// publish delay is recorded for them: their age is not one).
    pub(crate) fn unchanged(&self, n: usize) {
        if !ON.load(Ordering::Relaxed) || n == 0 {
            return;
        }
        counter!(
            "filepipe_files_total",
            "pipeline" => self.pipeline.clone(),
            "op" => self.op,
            "outcome" => "done",
            "reason" => ""
        )
        .increment(n as u64);
    }

    /// The queue lengths the source keeps in `stats`.
    pub(crate) fn gauges(&self, stats: &Stats) {
        use std::sync::atomic::Ordering::Relaxed;
        if !ON.load(Relaxed) {
            return;
        }
        self.queued.set(stats.queued.load(Relaxed) as f64);
        self.in_flight.set(stats.in_flight.load(Relaxed) as f64);
        self.retrying.set(stats.retrying.load(Relaxed) as f64);
    }
}

/// A pipeline stopped (a service's reload removed or restarted it, or its directory went): its
/// queues read 0, not what they held last. The series stay (the exporter cannot drop one),
/// and an alert on files queued while commits stop would fire for a pipeline no longer there
/// (found by a review).
impl Drop for Meter {
    fn drop(&mut self) {
        if ON.load(Ordering::Relaxed) {
            self.queued.set(0.0);
            self.in_flight.set(0.0);
            self.retrying.set(0.0);
        }
    }
}

/// A whole-tree rescan of `cfg`'s root, and why.
pub(crate) fn rescan(cfg: &Config, cause: &'static str) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    counter!("filepipe_rescans_total", "pipeline" => pipeline(cfg), "cause" => cause).increment(1);
}

/// `cfg`'s state committed outcomes just now.
pub(crate) fn committed(cfg: &Config) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!("filepipe_state_commit_timestamp_seconds", "pipeline" => pipeline(cfg)).set(now);
}
