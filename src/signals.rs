//! SIGINT/SIGTERM/SIGHUP handling and the registry of in-flight temp files.
//!
//! The first signal only raises a flag: sources stop, workers get their sentinels and drain.
//! The same signal again within `REPEAT` counts once (timeout(1) and service managers signal
//! the process and then its group, so one request can arrive twice within microseconds).
//! A second request aborts: reads in progress stop at their next buffer, results not yet
//! published are dropped (their temps removed), and the run then ends as after a drain, so the
//! manifest, the failure log and the summary still cover every file published. Only a third
//! exits at once, after unlinking every registered temp file, for a disk that hangs the abort:
//! even then no partial output is left under any name. SIGXFSZ is caught so that exceeding
//! RLIMIT_FSIZE surfaces as a per-file EFBIG instead of killing the process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};
use signal_hook::iterator::Signals;

/// Shared shutdown state, raised by the first SIGINT/SIGTERM.
#[derive(Debug, Default)]
pub(crate) struct Shutdown {
    requested: AtomicBool,
    signal: AtomicI32,
    reload: AtomicBool,
}

impl Shutdown {
    /// True once a shutdown was requested.
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// Requests a shutdown as if `signal` had arrived.
    pub(crate) fn request(&self, signal: i32) {
        self.signal.store(signal, Ordering::Relaxed);
        self.requested.store(true, Ordering::Relaxed);
    }

    /// The signal that caused the shutdown, if any.
    pub(crate) fn signal(&self) -> Option<i32> {
        self.requested()
            .then(|| self.signal.load(Ordering::Relaxed))
    }

    /// True once per SIGHUP: the caller should reload its configuration.
    pub(crate) fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::Relaxed)
    }
}

/// Installs the handlers: returns the flag the pipeline polls.
pub(crate) fn install() -> Result<Arc<Shutdown>> {
    let shutdown = Arc::new(Shutdown::default());
    // Any handler turns SIGXFSZ's default "terminate" into "write fails with EFBIG".
    signal_hook::flag::register(SIGXFSZ, Arc::new(AtomicBool::new(false)))
        .context("installing the SIGXFSZ handler")?;
    // A lease break (a writer opening a file during `InputFile::open_for_writing`'s probe)
    // signals SIGIO, whose default is to terminate: nothing here needs to hear of it.
    signal_hook::flag::register(libc::SIGIO, Arc::new(AtomicBool::new(false)))
        .context("installing the SIGIO handler")?;
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    let flag = Arc::clone(&shutdown);
    std::thread::Builder::new()
        .name("filepipe-signals".into())
        .spawn(move || {
            let mut requests = Requests::default();
            for sig in signals.forever() {
                if sig == SIGHUP {
                    // Reload, not stop: only a service that reads a config acts on it.
                    flag.reload.store(true, Ordering::Relaxed);
                    continue;
                }
                match requests.count(sig, Instant::now()) {
                    Request::Repeat => {
                        tracing::debug!(signal = sig, "the same signal again at once: counted once")
                    }
                    Request::Drain => {
                        SIGNALLED.store(true, Ordering::Relaxed);
                        flag.request(sig);
                        tracing::warn!(
                            signal = sig,
                            "shutting down: finishing files in progress (signal again to stop \
                             them)"
                        );
                    }
                    Request::Abort => {
                        ABORTED.store(true, Ordering::Relaxed);
                        tracing::warn!(
                            signal = sig,
                            "stopping now: files in progress are abandoned, results so far \
                             written (signal again to exit at once)"
                        );
                    }
                    Request::Exit => {
                        remove_all_temps();
                        std::process::exit(128 + sig);
                    }
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(shutdown)
}

/// A signal repeated within this long counts once.
const REPEAT: Duration = Duration::from_secs(1);

/// What a shutdown signal asks for, given the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// The same signal as the last one, within `REPEAT` of it: nothing new.
    Repeat,
    /// The first: finish files in progress.
    Drain,
    /// The second: stop files in progress, write what was done.
    Abort,
    /// The third: exit now.
    Exit,
}

/// The shutdown signals so far.
#[derive(Debug, Default)]
struct Requests {
    counted: u32,
    last: Option<(i32, Instant)>,
}

impl Requests {
    fn count(&mut self, sig: i32, now: Instant) -> Request {
        // Within REPEAT of the request it repeats (not of the last repeat: a signal sent every
        // 0.9 s is a new request each second time).
        let repeat = self
            .last
            .is_some_and(|(s, at)| s == sig && now.saturating_duration_since(at) < REPEAT);
        if repeat {
            return Request::Repeat;
        }
        self.last = Some((sig, now));
        self.counted += 1;
        match self.counted {
            1 => Request::Drain,
            2 => Request::Abort,
            _ => Request::Exit,
        }
    }
}

/// Raised by the first shutdown request (see the module comment).
static SIGNALLED: AtomicBool = AtomicBool::new(false);

/// True once a signal asked the process to stop (and drain): what waits on others (a queue
/// server away) then waits less, within a service manager's stop timeout.
pub(crate) fn signalled() -> bool {
    SIGNALLED.load(Ordering::Relaxed)
}

/// Raised by the second shutdown request (see the module comment).
static ABORTED: AtomicBool = AtomicBool::new(false);

/// True once a second shutdown request asked to stop files in progress: reads stop at their
/// next buffer, and results not yet published are dropped.
pub(crate) fn aborted() -> bool {
    ABORTED.load(Ordering::Relaxed)
}

fn temps() -> &'static Mutex<HashMap<u64, PathBuf>> {
    static TEMPS: OnceLock<Mutex<HashMap<u64, PathBuf>>> = OnceLock::new();
    TEMPS.get_or_init(Default::default)
}

/// The registry, even after a panic elsewhere poisoned its lock: a map insert or removal cannot
/// leave it half-changed, and a registry that silently stopped recording would leave temps
/// behind on an abrupt exit.
fn lock_temps() -> std::sync::MutexGuard<'static, HashMap<u64, PathBuf>> {
    temps()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records a temp file that must be removed on an abrupt exit. Returns its registry key.
pub(crate) fn register_temp(path: PathBuf) -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    lock_temps().insert(id, path);
    id
}

/// Forgets a temp file that was published or removed.
pub(crate) fn unregister_temp(id: u64) {
    lock_temps().remove(&id);
}

fn remove_all_temps() {
    // Keep the lock: no worker may publish (and unregister) a temp we are about to unlink.
    let lock = lock_temps();
    for path in lock.values() {
        let _ = std::fs::remove_file(path);
    }
    std::mem::forget(lock);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_repeated_at_once_counts_once_and_the_third_request_exits() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Requests::default();
        assert_eq!(r.count(SIGTERM, at(0)), Request::Drain);
        // timeout(1): the child, then its process group, microseconds apart.
        assert_eq!(r.count(SIGTERM, at(0)), Request::Repeat);
        assert_eq!(r.count(SIGTERM, at(900)), Request::Repeat);
        // Measured from the request, not from its last repeat.
        assert_eq!(r.count(SIGTERM, at(1800)), Request::Abort);
        let mut r = Requests::default();
        assert_eq!(r.count(SIGTERM, at(0)), Request::Drain);
        // A second request, a while later or by another signal, aborts; a third exits.
        assert_eq!(r.count(SIGTERM, at(2500)), Request::Abort);
        assert_eq!(r.count(SIGINT, at(2600)), Request::Exit);
        let mut r = Requests::default();
        assert_eq!(r.count(SIGINT, at(0)), Request::Drain);
        assert_eq!(r.count(SIGTERM, at(10)), Request::Abort);
    }
}
