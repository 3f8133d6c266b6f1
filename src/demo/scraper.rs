//! `demo scraper`: the seed's Concurrent Web Scraper — hyper on tokio, a semaphore capping
//! requests in flight, a governor token bucket pacing their starts, retries with backoff,
//! title + links as JSON lines. Without `--urls` it scrapes an embedded 127.0.0.1 site.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context};
use governor::clock::{Clock, MonotonicClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::report;

/// Sizes and limits for `demo scraper`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// File of URLs to scrape, one per line (`#` starts a comment; http:// only, this build
    /// has no TLS). Without it the demo serves and scrapes its embedded site.
    #[arg(long)]
    pub(crate) urls: Option<PathBuf>,
    /// Pages on the embedded site, besides its index
    #[arg(long, default_value_t = 12)]
    pub(crate) pages: usize,
    /// Simulated response time of the embedded site, in milliseconds
    #[arg(long, default_value_t = 200)]
    pub(crate) latency_ms: u64,
    /// Most requests in flight at once
    #[arg(long, default_value_t = 3, value_parser = super::positive)]
    pub(crate) concurrency: usize,
    /// Rate limit: requests started per second (the token bucket's refill rate)
    #[arg(long, default_value_t = 10.0)]
    pub(crate) rate: f64,
    /// Token bucket capacity: requests that may start back to back
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) burst: u32,
    /// Retries after a failed attempt (connection error, timeout, 429 or 5xx)
    #[arg(long, default_value_t = 2)]
    pub(crate) retries: u32,
    /// Per-attempt timeout, in milliseconds
    #[arg(long, default_value_t = 5_000)]
    pub(crate) timeout_ms: u64,
    /// Where to write the JSON lines [default: a new filepipe-demo-scrape-*.jsonl in the temp
    /// dir]
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

/// How the scraper behaves, independent of where the URLs come from.
#[derive(Debug, Clone)]
pub(crate) struct ScrapeConfig {
    /// Most requests in flight at once.
    pub(crate) concurrency: usize,
    /// Requests started per second, on average.
    pub(crate) rate: f64,
    /// Requests that may start back to back.
    pub(crate) burst: u32,
    /// Retries after a failed attempt.
    pub(crate) retries: u32,
    /// Per-attempt timeout.
    pub(crate) timeout: Duration,
    /// Wait before the first retry; doubled for each further one.
    pub(crate) backoff: Duration,
    /// Bodies longer than this are an error rather than a memory hazard.
    pub(crate) max_body: usize,
}

/// One URL's record, written as one JSON line.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Page {
    /// The URL as given.
    pub(crate) url: String,
    /// HTTP status of the last attempt, if one got that far.
    pub(crate) status: Option<u16>,
    /// Text of `<title>`, whitespace collapsed.
    pub(crate) title: Option<String>,
    /// `href`s of `<a>` tags, made absolute, first occurrence order, no duplicates.
    pub(crate) links: Vec<String>,
    /// Attempts made (1 + retries used).
    pub(crate) attempts: u32,
    /// Why the page was not scraped, if it was not.
    pub(crate) error: Option<String>,
    /// When the record was complete, in milliseconds from the scrape's start.
    pub(crate) done_ms: u64,
}

/// The record of a scrape.
#[derive(Debug, Clone)]
pub(crate) struct ScrapeRun {
    /// One record per input URL, in input order.
    pub(crate) pages: Vec<Page>,
    /// When each request (attempt) was let through by the rate limiter, sorted.
    pub(crate) request_times: Vec<Duration>,
    /// Most requests seen in flight at once, on the client side.
    pub(crate) peak_in_flight: usize,
    /// Wall time.
    pub(crate) elapsed: Duration,
}

// ---------------------------------------------------------------- rate limiting

/// governor's monotonic clock, remembering its last reading: read right after a
/// successful `check()`, that is the exact instant the token was granted.
#[derive(Clone, Debug, Default)]
struct RecordingClock {
    last: Arc<Mutex<Option<<MonotonicClock as Clock>::Instant>>>,
}

impl Clock for RecordingClock {
    type Instant = <MonotonicClock as Clock>::Instant;

    fn now(&self) -> Self::Instant {
        let now = MonotonicClock.now();
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(now);
        now
    }
}

/// A token bucket of `burst` tokens refilled at `rate` per second (governor's GCRA).
struct TokenBucket {
    limiter: RateLimiter<NotKeyed, InMemoryState, RecordingClock>,
    clock: RecordingClock,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32) -> anyhow::Result<Self> {
        ensure!(
            rate.is_finite() && rate > 0.0 && rate <= 1e9,
            "--rate must be a positive number of requests per second, got {rate}"
        );
        let quota = Quota::with_period(Duration::from_secs_f64(1.0 / rate))
            .context("rate too high")?
            .allow_burst(NonZeroU32::new(burst).context("--burst must be at least 1")?);
        let clock = RecordingClock::default();
        Ok(Self {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
        })
    }

    /// Waits for a token; returns when it was granted. Sleeps on tokio's timer rather than
    /// governor's `until_ready`, which would start a timer thread of its own.
    async fn take(&self) -> Instant {
        loop {
            match self.limiter.check() {
                // Nothing else runs on this thread between check() and here, so `last` is
                // the reading check() just used.
                Ok(()) => {
                    return self
                        .clock
                        .last
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .unwrap_or_else(Instant::now)
                }
                Err(not_until) => {
                    let wait = not_until.wait_time_from(MonotonicClock.now());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Whether sorted request times fit a token bucket of `burst` tokens refilled at `rate`
/// per second: no window `[t_i, t_j]` holds more than `burst + rate x (t_j - t_i)` starts.
/// `slack` widens each window to absorb clock rounding.
pub(crate) fn within_rate(times: &[Duration], rate: f64, burst: u32, slack: Duration) -> bool {
    times.iter().enumerate().all(|(i, &ti)| {
        times[i..].iter().enumerate().all(|(k, &tj)| {
            let window = (tj.saturating_sub(ti) + slack).as_secs_f64();
            (k + 1) as f64 <= f64::from(burst) + rate * window + 1e-9
        })
    })
}

// ---------------------------------------------------------------- client

/// Aborts a spawned task when dropped, so a timed-out request leaves no connection behind.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One GET over a fresh HTTP/1.1 connection; returns status and body text.
async fn fetch(uri: &Uri, max_body: usize) -> anyhow::Result<(StatusCode, String)> {
    ensure!(
        uri.scheme_str() == Some("http"),
        "only http:// URLs are supported (this build has no TLS)"
    );
    let authority = uri.authority().context("URL has no host")?;
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    let _conn = AbortOnDrop(tokio::spawn(conn));
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::get(path)
        .header(HOST, authority.as_str())
        .header(USER_AGENT, "filepipe-demo-scraper")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let res = sender
        .send_request(req)
        .await
        .context("sending the request")?;
    let status = res.status();
    let body = Limited::new(res.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| anyhow!(e))
        .context("reading the body")?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Longest wait between two attempts, however many retries are allowed.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the URL tasks share.
struct Shared {
    cfg: ScrapeConfig,
    start: Instant,
    permits: Semaphore,
    bucket: TokenBucket,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    request_times: Mutex<Vec<Duration>>,
}

/// Scrapes one URL: attempts until success, a non-retryable answer, or retries run out.
async fn scrape_one(url: String, shared: Arc<Shared>) -> Page {
    let mut page = Page {
        url: url.clone(),
        status: None,
        title: None,
        links: Vec::new(),
        attempts: 0,
        error: None,
        done_ms: 0,
    };
    let finish = |mut page: Page| {
        page.done_ms = shared.start.elapsed().as_millis() as u64;
        page
    };
    let uri: Uri = match url.parse() {
        Ok(uri) => uri,
        Err(e) => {
            page.error = Some(format!("bad URL: {e}"));
            return finish(page);
        }
    };
    if uri.scheme_str() != Some("http") {
        page.error = Some("only http:// URLs are supported (this build has no TLS)".to_string());
        return finish(page);
    }
    loop {
        page.attempts += 1;
        let outcome = {
            // Permit first, then token: a token is only spent when a request can go out.
            let Ok(_permit) = shared.permits.acquire().await else {
                page.error = Some("scraper shut down".to_string());
                return finish(page);
            };
            let granted = shared.bucket.take().await;
            shared
                .request_times
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(granted.saturating_duration_since(shared.start));
            let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            shared.peak.fetch_max(now, Ordering::SeqCst);
            let outcome =
                tokio::time::timeout(shared.cfg.timeout, fetch(&uri, shared.cfg.max_body)).await;
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            outcome
        };
        let retryable = match outcome {
            Ok(Ok((status, body))) => {
                page.status = Some(status.as_u16());
                if status.is_success() {
                    let (title, links) = extract(&uri, &body);
                    page.title = title;
                    page.links = links;
                    page.error = None;
                    return finish(page);
                }
                page.error = Some(format!("HTTP {status}"));
                status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
            }
            Ok(Err(e)) => {
                page.error = Some(format!("{e:#}"));
                true
            }
            Err(_) => {
                page.error = Some(format!("timed out after {:?}", shared.cfg.timeout));
                true
            }
        };
        if !retryable || page.attempts > shared.cfg.retries {
            return finish(page);
        }
        // Exponential backoff (capped), without the permit, so other URLs proceed meanwhile.
        let backoff = shared.cfg.backoff * 2u32.saturating_pow(page.attempts - 1);
        tokio::time::sleep(backoff.min(MAX_BACKOFF)).await;
    }
}

/// Scrapes `urls` concurrently under `cfg`'s limits. Must run on a current-thread runtime
/// (see [`TokenBucket::take`]), which is why only [`scrape_blocking`] is public.
async fn scrape(urls: &[String], cfg: &ScrapeConfig) -> anyhow::Result<ScrapeRun> {
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        start: Instant::now(),
        permits: Semaphore::new(cfg.concurrency),
        bucket: TokenBucket::new(cfg.rate, cfg.burst)?,
        in_flight: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        request_times: Mutex::new(Vec::new()),
    });
    let mut set = JoinSet::new();
    for (i, url) in urls.iter().enumerate() {
        let shared = shared.clone();
        let url = url.clone();
        set.spawn(async move { (i, scrape_one(url, shared).await) });
    }
    let mut pages: Vec<Option<Page>> = vec![None; urls.len()];
    while let Some(joined) = set.join_next().await {
        let (i, page) = joined.context("a scraper task panicked")?;
        pages[i] = Some(page);
    }
    let mut request_times = std::mem::take(
        &mut *shared
            .request_times
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    request_times.sort();
    Ok(ScrapeRun {
        pages: pages.into_iter().flatten().collect(),
        request_times,
        peak_in_flight: shared.peak.load(Ordering::SeqCst),
        elapsed: shared.start.elapsed(),
    })
}

/// Scrapes `urls` concurrently under `cfg`'s limits, on a fresh single-threaded runtime:
/// concurrency here is all `.await`s.
pub(crate) fn scrape_blocking(urls: &[String], cfg: &ScrapeConfig) -> anyhow::Result<ScrapeRun> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(scrape(urls, cfg))
}

/// A new file of this process's own in the temp directory, for the results when `--out` does
/// not name one: never a name found there (`O_EXCL`, which no symlink passes). A fixed name
/// there followed another user's symlink, so root's demo wrote over any file, and another user
/// could make the file first to read each run's results (found by a review).
fn own_temp_file() -> anyhow::Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir();
    let mut last = None;
    for n in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!(
            "filepipe-demo-scrape-{}-{nanos:08x}{n}.jsonl",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    Err(
        anyhow::Error::from(last.unwrap_or_else(|| std::io::Error::other("no name")))
            .context(format!("creating a results file in {}", dir.display())),
    )
}

/// Writes one JSON object per page, one per line, to `file` (at `path`, for messages).
fn write_pages(file: File, path: &Path, pages: &[Page]) -> anyhow::Result<()> {
    let mut out = BufWriter::new(file);
    for page in pages {
        serde_json::to_writer(&mut out, page).context("encoding a page as JSON")?;
        out.write_all(b"\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------- HTML

/// Pulls the `<title>` text and the `<a href>` links out of a page. A deliberately small
/// scanner (no HTML parser dependency): enough for ordinary pages, not for every edge case.
pub(crate) fn extract(base: &Uri, html: &str) -> (Option<String>, Vec<String>) {
    // ASCII lowercasing keeps every byte offset, so positions found in `lower` index `html`.
    let lower = html.to_ascii_lowercase();
    (find_title(html, &lower), find_links(base, html, &lower))
}

fn find_title(html: &str, lower: &str) -> Option<String> {
    let open = lower.find("<title")?;
    let start = open + lower[open..].find('>')? + 1;
    let end = start + lower[start..].find("</title")?;
    let text = decode_entities(&html[start..end]);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    (!text.is_empty()).then_some(text)
}

fn find_links(base: &Uri, html: &str, lower: &str) -> Vec<String> {
    let mut links: Vec<String> = Vec::new();
    let mut pos = 0;
    while let Some(found) = lower[pos..].find("<a") {
        let tag_start = pos + found;
        let Some(len) = lower[tag_start..].find('>') else {
            break;
        };
        let tag_end = tag_start + len;
        pos = tag_end;
        // `<abbr>`, `<article>`...: only a real `<a` followed by whitespace is a link.
        if !lower[tag_start + 2..].starts_with(|c: char| c.is_ascii_whitespace()) {
            continue;
        }
        if let Some(href) = attribute(
            &html[tag_start..tag_end],
            &lower[tag_start..tag_end],
            "href",
        ) {
            if let Some(url) = resolve(base, &decode_entities(href)) {
                if !links.contains(&url) {
                    links.push(url);
                }
            }
        }
    }
    links
}

/// The value of attribute `name` in one tag's text (quoted or bare).
fn attribute<'a>(tag: &'a str, lower_tag: &str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(found) = lower_tag[from..].find(name) {
        let at = from + found;
        from = at + name.len();
        let preceded_by_space = lower_tag[..at].ends_with(|c: char| c.is_ascii_whitespace());
        let rest = lower_tag[from..].trim_start();
        if !preceded_by_space || !rest.starts_with('=') {
            continue;
        }
        let value_at = tag.len() - rest[1..].trim_start().len();
        let value = &tag[value_at..];
        return Some(match value.chars().next() {
            Some(q @ ('"' | '\'')) => value[1..].split(q).next().unwrap_or(""),
            _ => value
                .split(|c: char| c.is_ascii_whitespace() || c == '>')
                .next()
                .unwrap_or(""),
        });
    }
    None
}

fn decode_entities(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// Makes `href` absolute against `base`; `None` for fragments and non-web schemes.
/// Relative paths are joined textually (`..` is not folded), which is fine for fetching.
pub(crate) fn resolve(base: &Uri, href: &str) -> Option<String> {
    let href = href.trim();
    let href = href.split('#').next().unwrap_or("");
    if href.is_empty() {
        return None;
    }
    let lower = href.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Some(href.to_string());
    }
    if ["mailto:", "javascript:", "tel:", "data:", "ftp:"]
        .iter()
        .any(|s| lower.starts_with(s))
    {
        return None;
    }
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority()?.as_str();
    if let Some(rest) = href.strip_prefix("//") {
        return Some(format!("{scheme}://{rest}"));
    }
    if href.starts_with('/') {
        return Some(format!("{scheme}://{authority}{href}"));
    }
    let path = base.path();
    if href.starts_with('?') {
        return Some(format!("{scheme}://{authority}{path}{href}"));
    }
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    let dir = if dir.is_empty() { "/" } else { dir };
    Some(format!("{scheme}://{authority}{dir}{href}"))
}

// ---------------------------------------------------------------- embedded site

/// What the embedded site saw.
#[derive(Debug, Default)]
pub(crate) struct SiteStats {
    in_flight: AtomicUsize,
    /// Most requests it was serving at once.
    pub(crate) peak_in_flight: AtomicUsize,
    /// Requests served.
    pub(crate) requests: AtomicUsize,
    /// 503 answers it gave on purpose.
    pub(crate) injected_failures: AtomicUsize,
    hits: Mutex<HashMap<String, u32>>,
}

/// A small site on 127.0.0.1: an index linking `/page/1..=pages`, each page linking its
/// neighbours. Every page answers after `latency`; every fourth page answers 503 the first
/// time, to give the retries something to do. Stops when dropped.
pub(crate) struct Site {
    addr: SocketAddr,
    pages: usize,
    stats: Arc<SiteStats>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Site {
    /// Binds a free port and serves from a thread with its own runtime, apart from the
    /// scraper's, like a remote server would be.
    pub(crate) fn start(pages: usize, latency: Duration) -> anyhow::Result<Site> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the site's tokio runtime")?;
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .context("binding the embedded site to 127.0.0.1")?;
        let addr = listener
            .local_addr()
            .context("reading the site's address")?;
        let stats = Arc::new(SiteStats::default());
        let (shutdown, stop) = oneshot::channel();
        let served = stats.clone();
        let thread = std::thread::Builder::new()
            .name("demo-site".to_string())
            .spawn(move || {
                rt.block_on(async move {
                    let accept = tokio::spawn(serve(listener, pages, latency, served));
                    // Sender dropped or fired: either way, stop serving.
                    let _ = stop.await;
                    accept.abort();
                });
            })
            .context("starting the site's thread")?;
        Ok(Site {
            addr,
            pages,
            stats,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The index and every page, as absolute URLs.
    pub(crate) fn urls(&self) -> Vec<String> {
        std::iter::once(format!("http://{}/", self.addr))
            .chain((1..=self.pages).map(|i| format!("http://{}/page/{i}", self.addr)))
            .collect()
    }

    /// The title the site gives `/page/{i}`, for checking the scrape.
    pub(crate) fn page_title(i: usize, pages: usize) -> String {
        format!("Page {i} of {pages} & counting")
    }

    /// Counters of what the site saw.
    pub(crate) fn stats(&self) -> &SiteStats {
        &self.stats
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(listener: TcpListener, pages: usize, latency: Duration, stats: Arc<SiteStats>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                site_page(req, pages, latency, stats.clone())
            });
            // A client hanging up mid-response is its business, not the site's.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn site_page(
    req: Request<Incoming>,
    pages: usize,
    latency: Duration,
    stats: Arc<SiteStats>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    stats.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    stats.requests.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(latency).await;
    let path = req.uri().path().to_string();
    let hit = {
        let mut hits = stats.hits.lock().unwrap_or_else(PoisonError::into_inner);
        let n = hits.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let page: Option<usize> = if path == "/" {
        Some(0)
    } else {
        path.strip_prefix("/page/")
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=pages).contains(n))
    };
    let (status, body) = match page {
        Some(i) if i % 4 == 0 && i > 0 && hit == 1 => {
            stats.injected_failures.fetch_add(1, Ordering::SeqCst);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "<html><head><title>Busy</title></head><body>try again</body></html>".to_string(),
            )
        }
        Some(0) => (StatusCode::OK, index_html(pages)),
        Some(i) => (StatusCode::OK, page_html(i, pages)),
        None => (
            StatusCode::NOT_FOUND,
            "<html><head><title>Not found</title></head></html>".to_string(),
        ),
    };
    stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    Ok(res)
}

fn index_html(pages: usize) -> String {
    let items: String = (1..=pages)
        .map(|i| format!("<li><a href=\"/page/{i}\">page {i}</a></li>\n"))
        .collect();
    format!(
        "<!doctype html>\n<html><head><title>filepipe demo site</title></head>\n\
         <body><h1>Index</h1><ul>\n{items}</ul></body></html>\n"
    )
}

fn page_html(i: usize, pages: usize) -> String {
    // Links in several spellings (absolute path, relative, single quotes, fragment) to give
    // the link resolver some variety.
    let prev = if i > 1 {
        format!("<a class=\"nav\" href=\"/page/{}\">previous</a>", i - 1)
    } else {
        String::new()
    };
    let next = if i < pages {
        format!("<a href='{}#top'>next</a>", i + 1)
    } else {
        String::new()
    };
    format!(
        "<!doctype html>\n<html><head>\n<TITLE>\n  {} </TITLE></head>\n\
         <body><p>{prev} <A HREF=\"/\">index</A> {next}</p></body></html>\n",
        Site::page_title(i, pages).replace('&', "&amp;")
    )
}

// ---------------------------------------------------------------- the demo

fn read_url_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Runs the demo: serve (unless `--urls`), scrape, store, print the limits and the rates.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    report::header("scraper");
    let site = match &args.urls {
        Some(_) => None,
        None => Some(Site::start(
            args.pages,
            Duration::from_millis(args.latency_ms),
        )?),
    };
    let urls = match (&args.urls, &site) {
        (Some(path), _) => read_url_file(path)?,
        (None, Some(site)) => site.urls(),
        (None, None) => Vec::new(),
    };
    let cfg = ScrapeConfig {
        concurrency: args.concurrency,
        rate: args.rate,
        burst: args.burst,
        retries: args.retries,
        timeout: Duration::from_millis(args.timeout_ms),
        backoff: Duration::from_millis(100),
        max_body: 4 << 20,
    };
    match &site {
        Some(site) => report::info(format!(
            "embedded site at {} ({} pages + index, {} ms per response, every 4th page fails once)",
            site.addr, args.pages, args.latency_ms
        )),
        None => report::info(format!("{} URLs from the --urls file", urls.len())),
    }
    report::info(format!(
        "limits: {} in flight, {} requests/s with bursts of {}, {} retries",
        cfg.concurrency, cfg.rate, cfg.burst, cfg.retries
    ));
    // Where the results go, made first: a temp directory that cannot take them fails the
    // demo before the scrape, not after it (found by a review).
    let (out, file) = match &args.out {
        Some(out) => {
            let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
            (out.clone(), file)
        }
        None => own_temp_file()?,
    };
    let run = scrape_blocking(&urls, &cfg)?;
    let mut by_time: Vec<&Page> = run.pages.iter().collect();
    by_time.sort_by_key(|p| p.done_ms);
    for p in by_time {
        let what = match (&p.title, &p.error) {
            (_, Some(e)) => format!("FAILED: {e}"),
            (title, None) => format!(
                "{:?}, {} links",
                title.as_deref().unwrap_or("(no title)"),
                p.links.len()
            ),
        };
        let tries = if p.attempts > 1 {
            format!(" [{} attempts]", p.attempts)
        } else {
            String::new()
        };
        report::event(
            Duration::from_millis(p.done_ms),
            format!("{} -> {what}{tries}", p.url),
        );
    }
    write_pages(file, &out, &run.pages)?;
    let requests = run.request_times.len();
    let span = match (run.request_times.first(), run.request_times.last()) {
        (Some(a), Some(b)) => b.saturating_sub(*a),
        _ => Duration::ZERO,
    };
    let achieved = if span.is_zero() {
        0.0
    } else {
        (requests - 1) as f64 / span.as_secs_f64()
    };
    let ok = run.pages.iter().filter(|p| p.error.is_none()).count();
    // Each page's attempts after its first: a page with a bad URL made none, and the requests
    // less the pages undercounted by one for each (found by a review).
    let retries: u32 = (run.pages.iter())
        .map(|p| p.attempts.saturating_sub(1))
        .sum();
    report::timing(
        "scrape",
        run.elapsed,
        format!(
            "{ok}/{} pages, {requests} requests ({retries} retries)",
            run.pages.len(),
        ),
    );
    if requests < 2 {
        report::info("too few requests to measure a rate");
    } else {
        // The bucket's own ceiling over this span: the burst up front, then `rate` per second.
        let ceiling = (f64::from(cfg.burst) - 1.0 + cfg.rate * span.as_secs_f64())
            / span.as_secs_f64().max(f64::MIN_POSITIVE);
        report::info(format!(
            "achieved request rate {achieved:.1}/s against the limit of {}/s \
             (with the burst of {}, at most {ceiling:.1}/s over this {})",
            cfg.rate,
            cfg.burst,
            report::fmt_duration(span)
        ));
    }
    report::info(format!(
        "peak requests in flight: {} (limit {})",
        run.peak_in_flight, cfg.concurrency
    ));
    report::info(format!(
        "results: {} (one JSON object per line)",
        out.display()
    ));
    report::note(
        "all of this runs on one thread: each request is a task that yields at every .await. The \
         semaphore caps open requests, the token bucket spaces their starts (a burst may go \
         back to back, then one per 1/rate), and a failed attempt gives its slot back while it \
         backs off.",
    );

    let mut checks = report::Checks::default();
    checks.check(
        format!("never more than {} requests in flight", cfg.concurrency),
        run.peak_in_flight <= cfg.concurrency,
    );
    checks.check(
        "request start times respect the token bucket",
        within_rate(
            &run.request_times,
            cfg.rate,
            cfg.burst,
            Duration::from_millis(1),
        ),
    );
    if let Some(site) = &site {
        let stats = site.stats();
        checks.check(
            format!(
                "the site saw at most {} at once (peak {})",
                cfg.concurrency,
                stats.peak_in_flight.load(Ordering::SeqCst)
            ),
            stats.peak_in_flight.load(Ordering::SeqCst) <= cfg.concurrency,
        );
        let all_titled = run
            .pages
            .iter()
            .all(|p| p.error.is_none() && p.title.is_some());
        checks.check(
            format!("every one of the {} pages collected", urls.len()),
            all_titled && run.pages.len() == urls.len(),
        );
    }
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().expect("uri")
    }

    #[test]
    fn extracts_title_and_absolute_deduplicated_links() {
        let html = r##"<html><head><title>
              Hello &amp; welcome </title></head><body>
            <a href="/a">1</a> <abbr href="/no">x</abbr> <a class=x href='b?q=1#frag'>2</a>
            <A HREF=/a>dup</A> <a href="https://other.example/c">3</a>
            <a href="#top">4</a> <a href="mailto:x@y">5</a> <a name="n">6</a>
        </body></html>"##;
        let (title, links) = extract(&uri("http://h:8/dir/page"), html);
        assert_eq!(title.as_deref(), Some("Hello & welcome"));
        assert_eq!(
            links,
            vec![
                "http://h:8/a".to_string(),
                "http://h:8/dir/b?q=1".to_string(),
                "https://other.example/c".to_string(),
            ]
        );
    }

    #[test]
    fn missing_title_is_none() {
        assert_eq!(extract(&uri("http://h/"), "<p>no title</p>").0, None);
        assert_eq!(extract(&uri("http://h/"), "<title>  </title>").0, None);
    }

    #[test]
    fn resolves_relative_forms() {
        let base = uri("http://h/x/y");
        assert_eq!(resolve(&base, "z").as_deref(), Some("http://h/x/z"));
        assert_eq!(resolve(&base, "?p=2").as_deref(), Some("http://h/x/y?p=2"));
        assert_eq!(resolve(&base, "//cdn/q").as_deref(), Some("http://cdn/q"));
        assert_eq!(
            resolve(&uri("http://h"), "z").as_deref(),
            Some("http://h/z")
        );
        assert_eq!(resolve(&base, "javascript:void(0)"), None);
    }

    #[test]
    fn rate_check_accepts_a_paced_schedule_and_rejects_a_flood() {
        let ms = Duration::from_millis;
        // 10/s with a burst of 2: two at once, then one every 100 ms.
        let paced = [ms(0), ms(0), ms(100), ms(200), ms(300)];
        assert!(within_rate(&paced, 10.0, 2, Duration::ZERO));
        let flood = [ms(0), ms(0), ms(0), ms(100)];
        assert!(!within_rate(&flood, 10.0, 2, Duration::ZERO));
        let too_fast = [ms(0), ms(0), ms(50), ms(100)];
        assert!(!within_rate(&too_fast, 10.0, 2, Duration::ZERO));
    }

    #[test]
    fn scrapes_the_embedded_site_within_both_limits() {
        let pages = 8;
        let site = Site::start(pages, Duration::from_millis(20)).expect("site");
        let urls = site.urls();
        let cfg = ScrapeConfig {
            concurrency: 2,
            rate: 40.0,
            burst: 3,
            retries: 2,
            timeout: Duration::from_secs(10),
            backoff: Duration::from_millis(5),
            max_body: 1 << 20,
        };
        let run = scrape_blocking(&urls, &cfg).expect("scrape");

        // Every page collected, titles and links right, the injected failures retried.
        assert_eq!(run.pages.len(), pages + 1);
        for (i, p) in run.pages.iter().enumerate() {
            assert_eq!(p.url, urls[i]);
            assert_eq!(p.error, None, "{p:?}");
            assert_eq!(p.status, Some(200));
            if i == 0 {
                assert_eq!(p.title.as_deref(), Some("filepipe demo site"));
                assert_eq!(p.links, urls[1..].to_vec());
            } else {
                assert_eq!(p.title, Some(Site::page_title(i, pages)));
                assert!(p.links.contains(&urls[0]));
                assert_eq!(p.attempts, if i % 4 == 0 { 2 } else { 1 }, "{p:?}");
            }
        }
        let stats = site.stats();
        assert_eq!(stats.injected_failures.load(Ordering::SeqCst), pages / 4);
        assert_eq!(stats.requests.load(Ordering::SeqCst), pages + 1 + pages / 4);
        assert_eq!(run.request_times.len(), pages + 1 + pages / 4);

        // The limits: concurrency seen from both ends, and the timestamps of request starts
        // (exact grant instants, so 1 ms of slack only absorbs rounding).
        assert!(
            run.peak_in_flight <= 2,
            "client peak {}",
            run.peak_in_flight
        );
        assert!(stats.peak_in_flight.load(Ordering::SeqCst) <= 2);
        assert!(within_rate(
            &run.request_times,
            cfg.rate,
            cfg.burst,
            Duration::from_millis(1)
        ));
    }

    #[test]
    fn unreachable_and_unsupported_urls_are_recorded_not_fatal() {
        let cfg = ScrapeConfig {
            concurrency: 2,
            rate: 1000.0,
            burst: 5,
            retries: 1,
            timeout: Duration::from_secs(5),
            backoff: Duration::from_millis(1),
            max_body: 1024,
        };
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let urls = vec![
            "http://127.0.0.1:1/".to_string(),
            "https://127.0.0.1/".to_string(),
            "not a url".to_string(),
        ];
        let run = scrape_blocking(&urls, &cfg).expect("scrape");
        assert_eq!(run.pages.len(), 3);
        assert!(run.pages.iter().all(|p| p.error.is_some()));
        assert_eq!(run.pages[0].attempts, 2, "refused connection is retried");
        assert_eq!(
            run.pages[1].attempts, 0,
            "https is refused before any request"
        );
        assert_eq!(run.pages[2].attempts, 0);
        assert_eq!(run.request_times.len(), 2);
    }

    #[test]
    fn json_lines_round_trip() {
        let dir = std::env::temp_dir().join(format!("filepipe-scrape-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("out.jsonl");
        let page = Page {
            url: "http://h/".into(),
            status: Some(200),
            title: Some("t".into()),
            links: vec!["http://h/a".into()],
            attempts: 1,
            error: None,
            done_ms: 3,
        };
        let file = File::create(&path).expect("create");
        write_pages(file, &path, &[page.clone(), page]).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);
        let v: serde_json::Value =
            serde_json::from_str(text.lines().next().expect("line")).expect("json");
        assert_eq!(v["title"], "t");
        assert_eq!(v["links"][0], "http://h/a");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
