//! Command-line syntax, parsed once by clap.
//!
//! Nothing here is validated beyond what clap checks; `config::Config::from_batch` turns these
//! raw arguments into the resolved configuration the pipeline runs on.

use std::ops::RangeInclusive;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::digest::HashAlgo;

/// The most worker threads a run may have. gzip runs as many block threads again, and each
/// worker holds buffers and descriptors: 256 keeps the largest machines busy (the work is
/// CPU- or disk-bound, never waiting on a network), where thousands of threads only cost
/// minutes of start-up and memory that can run out while threads start.
pub(crate) const MAX_JOBS: u16 = 256;

/// The longest settle time: an hour. A longer one would leave files unprocessed for longer
/// than anyone waits for them (and at the far end overflows the clock).
pub(crate) const MAX_SETTLE_MS: u64 = 3_600_000;

/// The longest interval between rescans (`--poll`): a day.
pub(crate) const MAX_POLL_SECS: u64 = 86_400;

/// The highest `--level` any op takes (zstd's 19; its 20-22 "ultra" levels need windows of up
/// to 128 MiB per thread, and gzip stops at 9, checked once the op is known).
pub(crate) const MAX_LEVEL: u32 = 19;

/// filepipe: gzip, zstd or hash (SHA-256, SHA-512, BLAKE3) a directory tree in parallel, every
/// file accounted for.
#[derive(Debug, Parser)]
#[command(name = "filepipe", version, about, max_term_width = 100)]
pub(crate) struct Cli {
    /// More log output on stderr (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    /// No progress bars and no summary; only errors on stderr (each failed file's among them).
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
    /// What to run.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Process every file under a directory once, then exit.
    Batch(BatchArgs),
    /// Check a sha256sum, sha512sum or b3sum manifest against its tree, or test every .gz and
    /// .zst file under a directory.
    Verify(VerifyArgs),
    /// Process what is new or changed under a directory, then every file completed there
    /// until SIGINT/SIGTERM.
    Watch(WatchArgs),
    /// Show what watch mode's state knows: counts per root, and failed files; with --queue, a
    /// cluster's queue and the workers seen.
    Status(StatusArgs),
    /// Validate a config file, its [[watch]] tables and its [worker] table, without running
    /// it (exit 0 if valid, 2 if not).
    CheckConfig(CheckConfigArgs),
    /// Take jobs from a cluster's queue (NATS JetStream) until SIGINT/SIGTERM: the other side
    /// of `batch --queue`.
    #[cfg(feature = "cluster")]
    Worker(WorkerArgs),
    /// Print a shell completion script (e.g. `filepipe completions bash >
    /// /etc/bash_completion.d/filepipe`).
    Completions(CompletionsArgs),
    /// Print the manual page (roff), e.g. `filepipe man | man -l -`.
    Man,
    /// Run a concurrency demo (`filepipe demo --list` lists them).
    #[cfg(feature = "demos")]
    Demo(crate::demo::DemoArgs),
}

/// The operation applied to each file.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OpKind {
    /// Compress each file to `name.gz` (a standard gzip stream).
    Gzip,
    /// Compress each file to `name.zst` (a standard zstd frame).
    Zstd,
    /// Hash each file with SHA-256 and write a `sha256sum` manifest.
    Sha256,
    /// Hash each file with SHA-512 and write a `sha512sum` manifest.
    Sha512,
    /// Hash each file with BLAKE3 and write a `b3sum` manifest.
    Blake3,
}

impl OpKind {
    /// The name used on the command line, in the config file and in the state.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OpKind::Gzip => "gzip",
            OpKind::Zstd => "zstd",
            OpKind::Sha256 => "sha256",
            OpKind::Sha512 => "sha512",
            OpKind::Blake3 => "blake3",
        }
    }

    /// The hash a hashing op computes; `None` for an op that writes outputs (gzip, zstd).
    pub(crate) fn hash(self) -> Option<HashAlgo> {
        match self {
            OpKind::Gzip | OpKind::Zstd => None,
            OpKind::Sha256 => Some(HashAlgo::Sha256),
            OpKind::Sha512 => Some(HashAlgo::Sha512),
            OpKind::Blake3 => Some(HashAlgo::Blake3),
        }
    }

    /// The suffix of this op's outputs, written next to the inputs or under `--out`; `None`
    /// for an op that writes no file per input (a hash).
    pub(crate) fn suffix(self) -> Option<&'static str> {
        match self {
            OpKind::Gzip => Some(".gz"),
            OpKind::Zstd => Some(".zst"),
            OpKind::Sha256 | OpKind::Sha512 | OpKind::Blake3 => None,
        }
    }

    /// The output of `rel` for a compressing op (`rel.gz`, `rel.zst`), relative to the output
    /// root; `None` for a hash.
    pub(crate) fn output_name(self, rel: &std::path::Path) -> Option<PathBuf> {
        let mut o = rel.as_os_str().to_os_string();
        o.push(self.suffix()?);
        Some(PathBuf::from(o))
    }

    /// Whether this op compresses each file into an output of its own (and so takes `--out`,
    /// `--level`, `--force`, `--remove-source` and `--move-source`).
    pub(crate) fn compresses(self) -> bool {
        self.suffix().is_some()
    }

    /// The compression levels `--level` takes for this op, as the op's own command-line tool
    /// numbers them (gzip -1..-9, zstd -1..-19); `None` for an op that does not compress.
    pub(crate) fn levels(self) -> Option<RangeInclusive<u32>> {
        match self {
            OpKind::Gzip => Some(1..=9),
            OpKind::Zstd => Some(1..=MAX_LEVEL),
            OpKind::Sha256 | OpKind::Sha512 | OpKind::Blake3 => None,
        }
    }

    /// The level when none is given: what the op's own tool uses (gzip 6, zstd 3). An op that
    /// does not compress carries gzip's, unused, because a cluster job message always holds a
    /// level and workers before zstd checked it was 1 to 9.
    pub(crate) fn default_level(self) -> u32 {
        match self {
            OpKind::Zstd => 3,
            OpKind::Gzip | OpKind::Sha256 | OpKind::Sha512 | OpKind::Blake3 => 6,
        }
    }

    /// `level` (from the command line, the config file or a job message) checked against this
    /// op's range; `None` gives the default. The error completes "--level ..." or "level ...".
    pub(crate) fn level(self, level: Option<u32>) -> Result<u32, String> {
        match (level, self.levels()) {
            (None, _) => Ok(self.default_level()),
            (Some(l), Some(range)) if range.contains(&l) => Ok(l),
            (Some(l), Some(range)) => Err(format!(
                "{l} is out of range for {} ({} to {})",
                self.as_str(),
                range.start(),
                range.end()
            )),
            (Some(_), None) => Err(format!("does not apply to {}", self.as_str())),
        }
    }
}

impl From<HashAlgo> for OpKind {
    fn from(algo: HashAlgo) -> OpKind {
        match algo {
            HashAlgo::Sha256 => OpKind::Sha256,
            HashAlgo::Sha512 => OpKind::Sha512,
            HashAlgo::Blake3 => OpKind::Blake3,
        }
    }
}

impl std::fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(OpKind::from(*self).as_str())
    }
}

/// What `--op` (or `op = "..."` in the config file) asks for: one op, or several results from
/// one read of each input (`sha256,zstd`: at most one compressor, and any hashes, each once).
///
/// The hashes keep the order they were given in: the first one's manifest is `--manifest FILE`
/// itself, the others' are `FILE.<name>` (see `config::Config::manifest_for`). The canonical
/// name (`canonical`), which the state files rows under and logs show, lists the hashes in a
/// fixed order (sha256, sha512, blake3) and the compressor last, so `zstd,sha256` and
/// `sha256,zstd` are the same pipeline to the state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct OpSpec {
    /// The compressing op (gzip, zstd), if any.
    compressor: Option<OpKind>,
    /// The hashes, in the order given.
    hashes: Vec<HashAlgo>,
}

impl OpSpec {
    /// One op alone (a cluster worker's, from a job message; the tests').
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn single(kind: OpKind) -> OpSpec {
        match kind.hash() {
            Some(algo) => OpSpec {
                compressor: None,
                hashes: vec![algo],
            },
            None => OpSpec {
                compressor: Some(kind),
                hashes: Vec::new(),
            },
        }
    }

    /// The op that decides what applies (outputs, `--level`): the compressor if there is one,
    /// else the first hash.
    pub(crate) fn primary(&self) -> OpKind {
        self.compressor
            .unwrap_or_else(|| OpKind::from(self.hashes[0]))
    }

    /// The compressing op, if any.
    pub(crate) fn compressor(&self) -> Option<OpKind> {
        self.compressor
    }

    /// The hashes, in the order given.
    pub(crate) fn hashes(&self) -> &[HashAlgo] {
        &self.hashes
    }

    /// Whether it writes an output per input (and so takes `--out`, `--level`, `--force`).
    pub(crate) fn compresses(&self) -> bool {
        self.compressor.is_some()
    }

    /// Whether each input gives more than one result.
    pub(crate) fn is_multi(&self) -> bool {
        self.hashes.len() + usize::from(self.compressor.is_some()) > 1
    }

    /// The hashes in their canonical order (sha256, sha512, blake3): the order of the digests
    /// concatenated in a state row's `digest` column.
    pub(crate) fn hash_layout(&self) -> Vec<HashAlgo> {
        let mut v = self.hashes.clone();
        v.sort_by_key(|a| *a as u8);
        v
    }

    /// The canonical name: `sha256`, `zstd`, `sha256,blake3,zstd` (hashes in their fixed
    /// order, the compressor last). Interned: at most one string per combination is ever made
    /// (a `&'static str` is what logs, metrics and the state take an op's name as).
    pub(crate) fn canonical(&self) -> &'static str {
        use std::collections::HashSet;
        use std::sync::Mutex;
        if !self.is_multi() {
            return self.primary().as_str();
        }
        let mut parts: Vec<&str> = self
            .hash_layout()
            .into_iter()
            .map(|a| OpKind::from(a).as_str())
            .collect();
        parts.extend(self.compressor.map(OpKind::as_str));
        let name = parts.join(",");
        static NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
        let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
        let names = names.get_or_insert_with(HashSet::new);
        match names.get(name.as_str()) {
            Some(interned) => interned,
            None => {
                let leaked: &'static str = Box::leak(name.into_boxed_str());
                names.insert(leaked);
                leaked
            }
        }
    }
}

impl std::str::FromStr for OpSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<OpSpec, String> {
        let mut spec = OpSpec {
            compressor: None,
            hashes: Vec::new(),
        };
        for part in s.split(',') {
            let part = part.trim();
            let kind = OpKind::from_str(part, false).map_err(|_| {
                format!(
                    "unknown op {part:?} (expected gzip, zstd, sha256, sha512 or blake3, or \
                     several joined by commas: one compressor and any hashes, e.g. sha256,zstd)"
                )
            })?;
            spec.add(kind).map_err(|e| format!("{e} in {s:?}"))?;
        }
        Ok(spec)
    }
}

impl OpSpec {
    /// The ops `kinds` names together (a cluster job message's list), checked as `--op` is:
    /// at least one, at most one compressor, each op once.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn of_kinds(kinds: &[OpKind]) -> Result<OpSpec, String> {
        if kinds.is_empty() {
            return Err("no op".into());
        }
        let mut spec = OpSpec {
            compressor: None,
            hashes: Vec::new(),
        };
        for &kind in kinds {
            spec.add(kind)?;
        }
        Ok(spec)
    }

    /// Every op, the hashes in their order, then the compressor: what `of_kinds` reads back
    /// as the same spec.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn kinds(&self) -> Vec<OpKind> {
        let mut kinds: Vec<OpKind> = self.hashes.iter().map(|&a| OpKind::from(a)).collect();
        kinds.extend(self.compressor);
        kinds
    }

    /// Adds `kind`, unless it is there already or is a second compressor.
    fn add(&mut self, kind: OpKind) -> Result<(), String> {
        let name = kind.as_str();
        match (kind.hash(), self.compressor) {
            (Some(algo), _) if self.hashes.contains(&algo) => Err(format!("{name} is given twice")),
            (Some(algo), _) => {
                self.hashes.push(algo);
                Ok(())
            }
            (None, Some(c)) if c == kind => Err(format!("{name} is given twice")),
            (None, Some(c)) => Err(format!(
                "at most one compressor per run: {} and {name} are named",
                c.as_str()
            )),
            (None, None) => {
                self.compressor = Some(kind);
                Ok(())
            }
        }
    }
}

impl TryFrom<String> for OpSpec {
    type Error = String;

    fn try_from(s: String) -> Result<OpSpec, String> {
        s.parse()
    }
}

impl std::fmt::Display for OpSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.canonical())
    }
}

/// Options shared by `batch` and `watch`: what to process, how, and where results go.
#[derive(Debug, Args)]
pub(crate) struct PipelineArgs {
    /// Worker threads, 1 to 256 [default: number of CPUs].
    #[arg(short, long, value_parser = clap::value_parser!(u16).range(1..=MAX_JOBS as i64))]
    pub(crate) jobs: Option<u16>,
    /// gzip, zstd: write outputs under DIR, mirroring the tree, instead of next to the inputs.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// sha256, sha512, blake3: write the manifest to FILE, atomically (batch: stdout if absent;
    /// watch: kept current from the state). With several hashes, FILE is the first one's and
    /// FILE.<hash> each other's.
    #[arg(long, value_name = "FILE")]
    pub(crate) manifest: Option<PathBuf>,
    /// Write one JSON line per failed or skipped file to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) failure_log: Option<PathBuf>,
    /// gzip, zstd: compression level, from 1 (fastest) to 9 (gzip, as gzip's -1 to -9: the
    /// output is about the size gzip -N writes) or 19 (zstd, as zstd -1 to -19) [default: 6 for
    /// gzip, 3 for zstd, as their own tools].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_LEVEL as i64))]
    pub(crate) level: Option<u32>,
    /// Only process files matching GLOB (repeatable). A glob without '/' matches the file
    /// name, one with '/' the path relative to DIR.
    #[arg(long, value_name = "GLOB")]
    pub(crate) include: Vec<String>,
    /// Skip files and directories matching GLOB (repeatable; same matching as --include).
    #[arg(long, value_name = "GLOB")]
    pub(crate) exclude: Vec<String>,
    /// Print the final summary as one JSON object (on stdout, or stderr if the manifest goes to
    /// stdout).
    #[arg(long)]
    pub(crate) json: bool,
    /// How outputs are flushed to disk before they are reported done: `group` (one flush for
    /// each group of files published together), `file` (an fsync per file and directory), or
    /// `none` (no flush, like gzip: a machine crash can leave incomplete outputs) [default:
    /// group].
    #[arg(long, value_enum, value_name = "MODE")]
    pub(crate) durability: Option<crate::fsio::output::Durability>,
    /// gzip, zstd: move each input, once its output is synced and verified (as removing an input
    /// requires), to the same relative path under DIR; never over a file there: a clash takes
    /// a numbered name (a.log -> a.1.log). Across file systems it is copied, synced and
    /// compared before the input goes. Hard-linked or changed inputs are kept. DIR must be
    /// outside the tree (and outside --out).
    #[arg(long, value_name = "DIR")]
    pub(crate) move_source: Option<PathBuf>,
    /// Move each input that failed for good (unreadable, or named too long for its output) to
    /// the same relative path under DIR, as --move-source moves; its failure log line says
    /// where it went. Inputs that failed for a passing reason (changed while read, disk full,
    /// an I/O error) stay to be tried again. DIR must be outside the tree.
    #[arg(long, value_name = "DIR")]
    pub(crate) move_failed: Option<PathBuf>,
    /// Skip files larger than SIZE (bytes, or with a K, M, G or T suffix: powers of 1024),
    /// reported `over-max-size` and never read: where others may write the tree, a sparse
    /// file of terabytes costs them no disk, but hours of reading and gigabytes of output.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) max_size: Option<u64>,
}

/// A size as `--max-size` takes it: a number of bytes, or with a K, M, G or T suffix (KiB,
/// MiB, ... too, any case): powers of 1024.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "{text:?}: a size is a whole number (1536M, not 1.5G)"
        ));
    }
    let number: u64 = number.parse().map_err(|_| {
        format!("{text:?}: a size is a whole number of bytes, or with K, M, G or T")
    })?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{text:?}: the unit is one of K, M, G, T (powers of 1024)"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?}: too large"))
}

/// Arguments of `filepipe batch`.
#[derive(Debug, Args)]
pub(crate) struct BatchArgs {
    /// The directory tree to process.
    pub(crate) dir: PathBuf,
    /// The operation to apply to each file: gzip, zstd, sha256, sha512, blake3, or several
    /// results from one read of each input, joined by commas (one compressor and any hashes:
    /// sha256,zstd).
    #[arg(long, value_name = "OP[,OP...]")]
    pub(crate) op: OpSpec,
    /// What to process and how.
    #[command(flatten)]
    pub(crate) common: PipelineArgs,
    /// Follow symlinks that stay inside DIR (links leading outside are still refused).
    #[arg(long)]
    pub(crate) follow_symlinks: bool,
    /// gzip, zstd: redo up-to-date outputs, replace existing different ones, and compress
    /// inputs that are already compressed (.gz, .zst, .xz, ...; never one named like this op's
    /// own outputs when they go next to the inputs).
    #[arg(long)]
    pub(crate) force: bool,
    /// gzip, zstd: delete each input once its output is synced and verified (never a hard-linked one).
    #[arg(long, conflicts_with = "move_source")]
    pub(crate) remove_source: bool,
    /// Incremental: record each file's stamp (size, mtime, ctime, inode) and result in the
    /// state database in DIR (watch mode's kind), and on later runs with the same DIR read only
    /// files whose stamp changed. A file changed with its stamp kept is not seen (see --rehash).
    #[arg(long, value_name = "DIR")]
    pub(crate) state: Option<PathBuf>,
    /// With --state: read every file again, ignoring the recorded stamps (and record them
    /// afresh).
    #[arg(long, requires = "state")]
    pub(crate) rehash: bool,
    /// Cluster mode: publish the jobs to the NATS JetStream queue at URL (nats://HOST:4222, or
    /// tls://...) for `filepipe worker`s to process, and gather their outcomes here. Given
    /// alone, the URL is read from FILEPIPE_QUEUE, which keeps a password in it out of the
    /// process list; without --queue the batch is local, whatever the environment holds.
    #[cfg(feature = "cluster")]
    #[arg(long, value_name = "URL")]
    pub(crate) queue: Option<Option<String>>,
    /// How a coordinator names its root and reaches the queue.
    #[cfg(feature = "cluster")]
    #[command(flatten)]
    pub(crate) coordinator: CoordinatorArgs,
}

/// Arguments of `filepipe watch`.
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// The directory tree to watch (or give --config).
    #[arg(required_unless_present = "config", conflicts_with = "config")]
    pub(crate) dir: Option<PathBuf>,
    /// The operation to apply to each file, or several joined by commas, as for batch (or give
    /// --config).
    #[arg(
        long,
        value_name = "OP[,OP...]",
        required_unless_present = "config",
        conflicts_with = "config"
    )]
    pub(crate) op: Option<OpSpec>,
    /// Run the pipelines described by this TOML file (see systemd/filepipe.toml). Flags given
    /// as well override the file's global settings and every pipeline's settle, poll,
    /// max_size and (compressing pipelines') level; --include and --exclude add to every
    /// pipeline's globs.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// What to process and how.
    #[command(flatten)]
    pub(crate) common: PipelineArgs,
    /// Where the state database lives [default: $STATE_DIRECTORY, else $XDG_STATE_HOME/filepipe,
    /// else ~/.local/state/filepipe].
    #[arg(long, value_name = "DIR")]
    pub(crate) state: Option<PathBuf>,
    /// Milliseconds a closed file's size and mtime must stay unchanged before it is taken, up
    /// to an hour (3600000) [default: 300].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=MAX_SETTLE_MS))]
    pub(crate) settle: Option<u64>,
    /// Also rescan the whole tree every SECS seconds (1 to 86400), reconciled against the
    /// state: for trees on NFS, SMB, FUSE or cluster file systems, where writes made by other
    /// hosts make no event here. A file a rescan finds is taken once a second look, a settle
    /// time later, finds it unchanged.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=MAX_POLL_SECS))]
    pub(crate) poll: Option<u64>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (e.g. 127.0.0.1:9187) [default: off;
    /// `metrics` in the config file].
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) metrics: Option<std::net::SocketAddr>,
    /// Cluster mode: publish each settled file as a job to the NATS JetStream queue at URL for
    /// `filepipe worker`s to process; their outcomes are recorded here, in the state. Given
    /// alone, the URL is read from FILEPIPE_QUEUE (as for batch).
    #[cfg(feature = "cluster")]
    #[arg(long, value_name = "URL", conflicts_with = "config")]
    pub(crate) queue: Option<Option<String>>,
    /// How a coordinator names its root and reaches the queue.
    #[cfg(feature = "cluster")]
    #[command(flatten)]
    pub(crate) coordinator: CoordinatorArgs,
}

/// What a coordinator (`batch` or `watch` with `--queue`) needs besides the queue's URL.
#[cfg(feature = "cluster")]
#[derive(Debug, Args)]
pub(crate) struct CoordinatorArgs {
    /// Cluster mode: the name the workers know DIR by (their --root NAME=PATH) [default: DIR's
    /// own name].
    #[arg(long, value_name = "NAME", requires = "queue")]
    pub(crate) root_name: Option<String>,
    /// Cluster mode: the name the workers know --out's directory by (their --out-root
    /// NAME=PATH) [default: that directory's own name].
    #[arg(long, value_name = "NAME", requires_all = ["queue", "out"])]
    pub(crate) out_root_name: Option<String>,
    /// Cluster mode: the name the workers know --move-source's directory by (their
    /// --move-root NAME=PATH) [default: that directory's own name].
    #[arg(long, value_name = "NAME", requires_all = ["queue", "move_source"])]
    pub(crate) move_source_name: Option<String>,
    /// Cluster mode: the name the workers know --move-failed's directory by (their
    /// --move-root NAME=PATH) [default: that directory's own name].
    #[arg(long, value_name = "NAME", requires_all = ["queue", "move_failed"])]
    pub(crate) move_failed_name: Option<String>,
    /// Cluster mode: a NATS credentials file (.creds), or a file holding a user's nkey seed
    /// (SU...) alone.
    #[arg(long, value_name = "FILE", requires = "queue")]
    pub(crate) creds: Option<PathBuf>,
    /// Cluster mode: trust the CA certificates in this PEM file for a tls:// queue (a private
    /// CA), in place of the system's: only these are trusted.
    #[arg(long, value_name = "FILE", requires = "queue")]
    pub(crate) tls_ca: Option<PathBuf>,
}

/// Arguments of `filepipe completions`.
#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub(crate) shell: clap_complete::Shell,
}

/// Arguments of `filepipe check-config`.
#[derive(Debug, Args)]
pub(crate) struct CheckConfigArgs {
    /// The TOML config file.
    pub(crate) file: PathBuf,
}

/// Arguments of `filepipe status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The state directory [default: as for watch].
    #[arg(long, value_name = "DIR")]
    pub(crate) state: Option<PathBuf>,
    /// List every failed file with its error and attempts.
    #[arg(long)]
    pub(crate) failed: bool,
    /// Show the cluster queue at URL instead (jobs pending, in flight, redelivered; workers
    /// waiting for jobs). Given alone, the URL is read from FILEPIPE_QUEUE.
    #[cfg(feature = "cluster")]
    #[arg(long, value_name = "URL", conflicts_with_all = ["state", "failed"])]
    pub(crate) queue: Option<Option<String>>,
    /// A NATS credentials file (.creds), or a file holding a user's nkey seed (SU...) alone,
    /// for --queue.
    #[cfg(feature = "cluster")]
    #[arg(long, value_name = "FILE", requires = "queue")]
    pub(crate) creds: Option<PathBuf>,
    /// Trust the CA certificates in this PEM file for a tls:// --queue.
    #[cfg(feature = "cluster")]
    #[arg(long, value_name = "FILE", requires = "queue")]
    pub(crate) tls_ca: Option<PathBuf>,
}

/// Arguments of `filepipe worker`.
#[cfg(feature = "cluster")]
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// The NATS JetStream server (nats://HOST:4222, or tls://...; user:password@ or a token
    /// in it if the server asks). Read from the environment when not given, which keeps a
    /// password out of the process list (`ps` shows every user the command line); either
    /// overrides the config file's.
    #[arg(
        long,
        value_name = "URL",
        env = "FILEPIPE_QUEUE",
        hide_env_values = true
    )]
    pub(crate) queue: Option<String>,
    /// Read the settings from this TOML file's [worker] table (see systemd/worker.toml).
    /// Flags given as well override the file's settings; a --root or --out-root replaces the
    /// file's root of the same name.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// A root the jobs may name, and where it is mounted on this host (repeatable). Jobs for
    /// a root this worker does not map are left for other workers.
    #[arg(
        long = "root",
        value_name = "NAME=PATH",
        required_unless_present = "config"
    )]
    pub(crate) roots: Vec<String>,
    /// An output root jobs may name (a coordinator's --out), and where it is mounted on this
    /// host (repeatable). Only outputs are written there: it is never taken as an input root,
    /// and may not overlap one.
    #[arg(long = "out-root", value_name = "NAME=PATH")]
    pub(crate) out_roots: Vec<String>,
    /// A directory jobs may have their inputs moved to (a coordinator's --move-source or
    /// --move-failed, known by that directory's own name), and where it is mounted on this
    /// host (repeatable). Never taken as an input root; may not overlap an input or output
    /// root. Moving inputs also needs --allow-remove-source.
    #[arg(long = "move-root", value_name = "NAME=PATH")]
    pub(crate) move_roots: Vec<String>,
    /// Do the jobs that ask for their inputs to be removed (or moved to a --move-root) once
    /// their outputs are durable (a coordinator's --remove-source, --move-source or
    /// --move-failed); without it such jobs fail, and no input is removed or moved.
    #[arg(long)]
    pub(crate) allow_remove_source: bool,
    /// Worker threads, 1 to 256 [default: number of CPUs].
    #[arg(short, long, value_parser = clap::value_parser!(u16).range(1..=MAX_JOBS as i64))]
    pub(crate) jobs: Option<u16>,
    /// How outputs are flushed before they are reported done (see `batch --help`).
    #[arg(long, value_enum, value_name = "MODE")]
    pub(crate) durability: Option<crate::fsio::output::Durability>,
    /// Write one JSON line per failed or skipped file to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) failure_log: Option<PathBuf>,
    /// A NATS credentials file (.creds), or a file holding a user's nkey seed (SU...) alone.
    #[arg(long, value_name = "FILE")]
    pub(crate) creds: Option<PathBuf>,
    /// Trust the CA certificates in this PEM file for a tls:// queue (a private CA), in place
    /// of the system's: only these are trusted.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (e.g. 127.0.0.1:9187) [default: off].
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) metrics: Option<std::net::SocketAddr>,
}

/// Arguments of `filepipe verify`.
#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// A checksum manifest in the format of sha256sum, sha512sum or b3sum (names resolve
    /// against --root), or a directory whose .gz and .zst files are all tested.
    pub(crate) target: PathBuf,
    /// Worker threads, 1 to 256 [default: number of CPUs].
    #[arg(short, long, value_parser = clap::value_parser!(u16).range(1..=MAX_JOBS as i64))]
    pub(crate) jobs: Option<u16>,
    /// The manifest's hash. Without it, 128 hex digits mean sha512; 64 mean blake3 or sha256,
    /// told by the manifest's name (B3SUMS, *.blake3, SHA256SUMS) or else by the first listed
    /// file that can be read.
    #[arg(long, value_enum, value_name = "ALGO")]
    pub(crate) algo: Option<HashAlgo>,
    /// Where the manifest's names resolve, and the tree compared with it: files found under DIR
    /// and not listed are reported `added`, listed files absent `missing` [default: the
    /// manifest's directory].
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Files and directories under the root never reported `added` (repeatable; the same
    /// matching as batch's --exclude). Never reported either: the manifest itself, filepipe's
    /// temp files, and another manifest of a run of several hashes (NAME.sha256, .sha512,
    /// .blake3 beside NAME, or NAME beside NAME.blake3) only if it is a regular file in the
    /// manifest's own directory, at most 4 times the manifest's size plus 64 KiB, that is all
    /// manifest lines as filepipe writes them, of its name's hash, naming exactly the files
    /// the manifest lists. A state directory and a
    /// failure log in the tree are reported unless named (--state, --exclude).
    #[arg(long, value_name = "GLOB")]
    pub(crate) exclude: Vec<String>,
    /// A filepipe state directory (batch's or watch's --state DIR) whose state files
    /// (filepipe.sqlite, its -wal, -shm and -journal, filepipe.lock) are never reported
    /// `added`, if it lies under the root: told by its identity, not by its name or content
    /// (repeatable); anything else in it is. One that does not exist or is not a directory is
    /// an error.
    #[arg(long, value_name = "DIR")]
    pub(crate) state: Vec<PathBuf>,
    /// Print one JSON object per line: one per file ("status": ok, failed, unreadable, missing
    /// or added), then a last one with "status": "summary" and the counts.
    #[arg(long)]
    pub(crate) json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_specs_parse_refuse_and_name_themselves_canonically() {
        let spec: OpSpec = "zstd,blake3,sha256".parse().unwrap();
        assert_eq!(spec.compressor(), Some(OpKind::Zstd));
        // The order given (the first hash's manifest is --manifest itself) ...
        assert_eq!(spec.hashes(), [HashAlgo::Blake3, HashAlgo::Sha256]);
        // ... and the canonical one, for the state: hashes in a fixed order, compressor last.
        assert_eq!(spec.hash_layout(), [HashAlgo::Sha256, HashAlgo::Blake3]);
        assert_eq!(spec.canonical(), "sha256,blake3,zstd");
        assert_eq!(spec.primary(), OpKind::Zstd);
        assert!(spec.is_multi() && spec.compresses());
        // Interned: the same string for the same combination.
        let again: OpSpec = "sha256, blake3 ,zstd".parse().unwrap();
        assert!(std::ptr::eq(spec.canonical(), again.canonical()));
        // One op alone is named as it always was.
        for kind in [OpKind::Gzip, OpKind::Zstd, OpKind::Sha256, OpKind::Blake3] {
            let one: OpSpec = kind.as_str().parse().unwrap();
            assert_eq!(one, OpSpec::single(kind));
            assert_eq!(one.canonical(), kind.as_str());
            assert!(!one.is_multi());
            assert_eq!(one.primary(), kind);
        }
        let hashes: OpSpec = "sha512,sha256".parse().unwrap();
        assert_eq!(hashes.primary(), OpKind::Sha512);
        assert!(!hashes.compresses());
        for (bad, why) in [
            ("gzip,zstd", "at most one compressor"),
            ("zstd,sha256,gzip", "at most one compressor"),
            ("sha256,sha256", "given twice"),
            ("zstd,sha256,zstd", "given twice"),
            ("sha256,", "unknown op"),
            ("", "unknown op"),
            ("SHA256", "unknown op"),
        ] {
            let e = bad.parse::<OpSpec>().unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        // A job message's list is checked the same way, and a spec's own list reads back.
        for good in ["zstd,blake3,sha256", "sha512,sha256", "gzip", "blake3"] {
            let spec: OpSpec = good.parse().unwrap();
            assert_eq!(OpSpec::of_kinds(&spec.kinds()), Ok(spec));
        }
        use OpKind::{Gzip, Sha256, Zstd};
        for (bad, why) in [
            (&[Gzip, Zstd][..], "at most one compressor"),
            (&[Sha256, Zstd, Sha256], "given twice"),
            (&[], "no op"),
        ] {
            let e = OpSpec::of_kinds(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
