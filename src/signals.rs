//! SIGINT/SIGTERM/SIGHUP handling and the registry of in-flight temp files.
//!
//! The first signal only raises a flag: sources stop, workers get their sentinels and drain.
//! A second signal exits at once, after unlinking every registered temp file, so even an
//! impatient user is left with no partial output under any name. SIGXFSZ is caught so that
//! exceeding RLIMIT_FSIZE surfaces as a per-file EFBIG instead of killing the process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};
use signal_hook::iterator::Signals;

/// Shared shutdown state, raised by the first SIGINT/SIGTERM.
#[derive(Debug, Default)]
pub struct Shutdown {
    requested: AtomicBool,
    signal: AtomicI32,
    reload: AtomicBool,
}

impl Shutdown {
    /// True once a shutdown was requested.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// Requests a shutdown as if `signal` had arrived.
    pub fn request(&self, signal: i32) {
        self.signal.store(signal, Ordering::Relaxed);
        self.requested.store(true, Ordering::Relaxed);
    }

    /// The signal that caused the shutdown, if any.
    pub fn signal(&self) -> Option<i32> {
        self.requested()
            .then(|| self.signal.load(Ordering::Relaxed))
    }

    /// True once per SIGHUP: the caller should reload its configuration.
    pub fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::Relaxed)
    }
}

/// Installs the handlers: returns the flag the pipeline polls.
pub fn install() -> Result<Arc<Shutdown>> {
    let shutdown = Arc::new(Shutdown::default());
    // Any handler turns SIGXFSZ's default "terminate" into "write fails with EFBIG".
    signal_hook::flag::register(SIGXFSZ, Arc::new(AtomicBool::new(false)))
        .context("installing the SIGXFSZ handler")?;
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    let flag = Arc::clone(&shutdown);
    std::thread::Builder::new()
        .name("filepipe-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    // Reload, not stop: only a service that reads a config acts on it.
                    flag.reload.store(true, Ordering::Relaxed);
                    continue;
                }
                if flag.requested() {
                    remove_all_temps();
                    std::process::exit(128 + sig);
                }
                flag.request(sig);
                tracing::warn!(
                    signal = sig,
                    "shutting down: finishing files in progress (signal again to exit at once)"
                );
            }
        })
        .context("starting the signal thread")?;
    Ok(shutdown)
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
pub fn register_temp(path: PathBuf) -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    lock_temps().insert(id, path);
    id
}

/// Forgets a temp file that was published or removed.
pub fn unregister_temp(id: u64) {
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
