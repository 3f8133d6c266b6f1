//! `demo shared-memory`: seed 004 — a child process (filepipe re-run as `demo shm-child`)
//! maps the parent's named POSIX shm block of f64s and adds 10 to each; the parent sees it,
//! then unlinks the name. Contrast: a thread over an `Arc` of atomics, no name needed.

use std::fs::File;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use memmap2::MmapMut;
use rustix::shm;

use super::report;

const F64_SIZE: usize = std::mem::size_of::<f64>();

/// Sizes for `demo shared-memory` (defaults: the seed's 5 values [1, 2, 3, 4, 5], +10).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Number of f64 values in the block (initialised to 1, 2, 3, ...)
    #[arg(long, default_value_t = 5, value_parser = super::positive)]
    pub(crate) len: usize,
    /// What the child adds to each value
    #[arg(long, default_value_t = 10.0)]
    pub(crate) add: f64,
}

/// Arguments of the hidden `demo shm-child` subcommand.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ChildArgs {
    /// POSIX shared memory name of the block, as created by the parent
    #[arg(long)]
    pub(crate) name: String,
    /// Number of f64 values in it
    #[arg(long)]
    pub(crate) len: usize,
    /// What to add to each value
    #[arg(long)]
    pub(crate) add: f64,
}

/// A named shared memory block of `len` f64 values, mapped into this process. The
/// creating side removes the name when dropped; the mapping itself lives until unmapped.
#[derive(Debug)]
pub(crate) struct ShmBlock {
    name: String,
    len: usize,
    map: MmapMut,
    owner: bool,
}

impl ShmBlock {
    /// Creates a new block under a fresh name, zero-filled.
    pub(crate) fn create(len: usize) -> anyhow::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // pid + counter is unique within this boot's live processes; the time part keeps a
        // name left behind by a killed run from colliding with a later run reusing the pid.
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("/filepipe-demo-{}-{seq}-{nanos}", std::process::id());
        let fd = shm::open(
            name.as_str(),
            shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR,
            shm::Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("creating shared memory {name}"))?;
        // Own the name before anything else can fail, so it is unlinked on every path.
        let unlink_guard = Unlink(&name);
        let file = File::from(fd);
        file.set_len((len * F64_SIZE) as u64)
            .with_context(|| format!("sizing shared memory {name}"))?;
        let map = map(&file, &name)?;
        std::mem::forget(unlink_guard);
        Ok(Self {
            name,
            len,
            map,
            owner: true,
        })
    }

    /// Maps an existing block by name (the child's side).
    pub(crate) fn open(name: &str, len: usize) -> anyhow::Result<Self> {
        let fd = shm::open(name, shm::OFlags::RDWR, shm::Mode::empty())
            .with_context(|| format!("opening shared memory {name}"))?;
        let file = File::from(fd);
        let size = file
            .metadata()
            .with_context(|| format!("sizing shared memory {name}"))?
            .len();
        ensure!(
            size >= (len * F64_SIZE) as u64,
            "shared memory {name} holds {size} bytes, too few for {len} f64 values"
        );
        Ok(Self {
            name: name.to_string(),
            len,
            map: map(&file, name)?,
            owner: false,
        })
    }

    /// The block's name, for handing to another process.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Copies the values out.
    pub(crate) fn values(&self) -> Vec<f64> {
        self.map
            .chunks_exact(F64_SIZE)
            .take(self.len)
            .map(|c| {
                let mut bytes = [0; F64_SIZE];
                bytes.copy_from_slice(c);
                f64::from_ne_bytes(bytes)
            })
            .collect()
    }

    /// Overwrites the values from `values` (extra values are ignored).
    pub(crate) fn set_values(&mut self, values: &[f64]) {
        for (c, v) in self.map.chunks_exact_mut(F64_SIZE).zip(values) {
            c.copy_from_slice(&v.to_ne_bytes());
        }
    }

    /// Adds `x` to every value in place (the seed's `array += 10`).
    pub(crate) fn add_to_each(&mut self, x: f64) {
        let updated: Vec<f64> = self.values().into_iter().map(|v| v + x).collect();
        self.set_values(&updated);
    }
}

#[allow(unsafe_code)]
fn map(file: &File, name: &str) -> anyhow::Result<MmapMut> {
    // SAFETY: the mapping is shared with other processes, which is the point; the demo's
    // protocol keeps them from touching it at the same time (the parent does not read or
    // write while the child runs), and values are copied in and out, never referenced.
    unsafe { MmapMut::map_mut(file) }.with_context(|| format!("mapping shared memory {name}"))
}

/// Unlinks a shared memory name when dropped.
struct Unlink<'a>(&'a str);

impl Drop for Unlink<'_> {
    fn drop(&mut self) {
        let _ = shm::unlink(self.0);
    }
}

impl Drop for ShmBlock {
    fn drop(&mut self) {
        if self.owner {
            // Removes the name only; a process that still has it mapped keeps its view.
            let _ = shm::unlink(self.name.as_str());
        }
    }
}

/// The process part of the run.
#[derive(Debug, Clone)]
pub(crate) struct ProcessPart {
    /// Values before the child ran.
    pub(crate) before: Vec<f64>,
    /// Values the parent read after the child exited.
    pub(crate) after: Vec<f64>,
    /// The block's name.
    pub(crate) name: String,
    /// Spawn, run and exit of the child.
    pub(crate) elapsed: Duration,
}

/// The thread part of the run.
#[derive(Debug, Clone)]
pub(crate) struct ThreadPart {
    /// Values before the thread ran.
    pub(crate) before: Vec<f64>,
    /// Values after it was joined.
    pub(crate) after: Vec<f64>,
    /// Spawn, run and join of the thread.
    pub(crate) elapsed: Duration,
}

/// Initial values 1, 2, 3, ... like the seed's `[1, 2, 3, 4, 5]`.
pub(crate) fn initial_values(len: usize) -> Vec<f64> {
    (1..=len).map(|i| i as f64).collect()
}

/// Creates the block, runs `exe demo shm-child` on it, and reads it back.
pub(crate) fn run_process(exe: &Path, len: usize, add: f64) -> anyhow::Result<ProcessPart> {
    let mut block = ShmBlock::create(len)?;
    block.set_values(&initial_values(len));
    let before = block.values();
    let start = Instant::now();
    let status = Command::new(exe)
        .args(["demo", "shm-child", "--name", block.name(), "--len"])
        .arg(len.to_string())
        .arg("--add")
        .arg(add.to_string())
        .status()
        .with_context(|| format!("running child process {}", exe.display()))?;
    let elapsed = start.elapsed();
    ensure!(status.success(), "child process failed: {status}");
    Ok(ProcessPart {
        before,
        after: block.values(),
        name: block.name().to_string(),
        elapsed,
    })
}

/// Entry point of the hidden `demo shm-child` subcommand.
pub(crate) fn child_main(args: &ChildArgs) -> anyhow::Result<ExitCode> {
    let mut block = ShmBlock::open(&args.name, args.len)?;
    block.add_to_each(args.add);
    Ok(ExitCode::SUCCESS)
}

/// The thread version: the values live in an `Arc<[AtomicU64]>` (f64 bits), a spawned
/// thread adds `add` to each, and the main thread reads them after joining it.
pub(crate) fn run_thread(len: usize, add: f64) -> ThreadPart {
    let shared: Arc<[AtomicU64]> = initial_values(len)
        .into_iter()
        .map(|v| AtomicU64::new(v.to_bits()))
        .collect();
    let read = |values: &[AtomicU64]| -> Vec<f64> {
        values
            .iter()
            .map(|a| f64::from_bits(a.load(Ordering::SeqCst)))
            .collect()
    };
    let before = read(&shared);
    let start = Instant::now();
    let theirs = Arc::clone(&shared);
    let worker = thread::spawn(move || {
        for a in theirs.iter() {
            // An f64 has no atomic add, so update its bit pattern with compare-and-swap.
            let _ = a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |bits| {
                Some((f64::from_bits(bits) + add).to_bits())
            });
        }
    });
    if let Err(p) = worker.join() {
        std::panic::resume_unwind(p);
    }
    ThreadPart {
        before,
        after: read(&shared),
        elapsed: start.elapsed(),
    }
}

/// Runs both parts and prints before and after.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the filepipe executable")?;
    report::header("shared-memory");
    let procs = run_process(&exe, args.len, args.add)?;
    report::info(format!("process: shared memory block {}", procs.name));
    report::info(format!("process: before {:?}", procs.before));
    report::info(format!("process: after  {:?}", procs.after));
    report::timing(
        "child process",
        procs.elapsed,
        format!("spawn, map, add {}, exit", args.add),
    );
    let threads = run_thread(args.len, args.add);
    report::info(format!("thread:  before {:?}", threads.before));
    report::info(format!("thread:  after  {:?}", threads.after));
    report::timing(
        "thread",
        threads.elapsed,
        format!("spawn, add {}, join", args.add),
    );
    report::note(
        "processes have separate address spaces, so sharing needs an OS object both map by name \
         (shm_open + mmap, what Python's SharedMemory does) and an explicit unlink; threads \
         already share memory, and Rust only asks that shared mutation go through atomics or \
         locks — the Arc frees it when the last thread lets go.",
    );
    let want: Vec<f64> = initial_values(args.len)
        .into_iter()
        .map(|v| v + args.add)
        .collect();
    let mut checks = report::Checks::default();
    checks.check(
        "the child process's change is visible to the parent",
        procs.after == want,
    );
    checks.check("the thread's change is visible", threads.after == want);
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_mapping_by_name_sees_and_makes_the_same_changes() {
        let mut parent = ShmBlock::create(5).expect("create");
        parent.set_values(&initial_values(5));
        // What the child process does, from a second, independent mapping of the name.
        child_main(&ChildArgs {
            name: parent.name().to_string(),
            len: 5,
            add: 10.0,
        })
        .expect("child side");
        assert_eq!(parent.values(), vec![11.0, 12.0, 13.0, 14.0, 15.0]);
    }

    #[test]
    fn dropping_the_creator_unlinks_the_name() {
        let name = ShmBlock::create(1).expect("create").name().to_string();
        assert!(ShmBlock::open(&name, 1).is_err());
    }

    #[test]
    fn opening_a_too_small_block_fails() {
        let block = ShmBlock::create(2).expect("create");
        assert!(ShmBlock::open(block.name(), 3).is_err());
    }

    #[test]
    fn thread_sees_the_same_change() {
        let part = run_thread(5, 10.0);
        assert_eq!(part.before, initial_values(5));
        assert_eq!(part.after, vec![11.0, 12.0, 13.0, 14.0, 15.0]);
    }
}
