//! `filepipe verify`: check a manifest like `sha256sum -c` (or `sha512sum -c`, `b3sum -c`) and
//! compare it with its tree, or test .gz and .zst files like `gzip -t` and `zstd -t`.
//!
//! Both check files in parallel and print one result line per file in a stable order (manifest
//! order then the added files sorted, or sorted paths); a manifest's verdicts are printed as
//! they are decided, while later files are checked. A missing, unreadable, corrupt or
//! truncated file, and a malformed manifest line, is a clear per-file error: never a panic,
//! never the end of the run. Nothing is passed over in silence: a directory that cannot be
//! read, and a `.gz` or `.zst` name that is not a regular file (a symlink, a FIFO, a
//! directory), is a line of its own and fails the run. A reader that closes the pipe early
//! (`| head`) is not an error; any other failure to write the results is.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use rayon::ThreadPool;
use walkdir::WalkDir;

use crate::config::Filter;
use crate::digest::HashAlgo;
use crate::error::Kind;
use crate::exit;
use crate::fsio::input::{InputFile, NotRegular, OpenError, Root};
use crate::fsio::output;
use crate::manifest::{self, Entry};
use crate::ops::hash::{hash_reader, Hasher, Tee, BUF_SIZE};

mod own;

/// What to verify and how, resolved from the command line.
#[derive(Debug)]
pub(crate) struct Options {
    /// A manifest, or a directory of .gz files.
    pub(crate) target: PathBuf,
    /// Threads checking files.
    pub(crate) jobs: usize,
    /// The manifest's hash; `None`: told by its digests' length (sha256 for 64 hex digits).
    pub(crate) algo: Option<HashAlgo>,
    /// Where names resolve; `None`: the manifest's directory.
    pub(crate) root: Option<PathBuf>,
    /// Never reported added.
    pub(crate) exclude: Vec<String>,
    /// State directories (`--state`): their state's own files are left out of the added check.
    pub(crate) state: Vec<PathBuf>,
    /// JSON lines instead of text.
    pub(crate) json: bool,
    /// No warnings on stderr.
    pub(crate) quiet: bool,
}

/// The result of a verification run.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Report {
    /// Files that checked out.
    pub(crate) ok: u64,
    /// Files with a wrong digest or a corrupt stream.
    pub(crate) failed: u64,
    /// Files that could not be opened or read.
    pub(crate) unreadable: u64,
    /// Manifest lines that could not be parsed.
    pub(crate) malformed: u64,
    /// Files listed in the manifest and absent from the tree.
    pub(crate) missing: u64,
    /// Files in the tree and not listed in the manifest.
    pub(crate) added: u64,
}

impl Report {
    /// The exit status: `FAILURES` for failed, unreadable or malformed, with the bits
    /// `VERIFY_MISSING` and `VERIFY_ADDED` for missing and added files (README, man page).
    pub(crate) fn exit_code(&self) -> u8 {
        let mut code = exit::SUCCESS;
        if self.failed > 0 || self.unreadable > 0 || self.malformed > 0 {
            code |= exit::FAILURES;
        }
        if self.missing > 0 {
            code |= exit::VERIFY_MISSING;
        }
        if self.added > 0 {
            code |= exit::VERIFY_ADDED;
        }
        code
    }
}

/// Why `verify` could not give its verdict.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The target could not be opened or read, or the pool not started: nothing was checked.
    #[error("{0:#}")]
    Setup(anyhow::Error),
    /// The results could not be written (a full disk, a closed descriptor): the run fails,
    /// whatever the files' verdicts, since nobody saw them.
    #[error("writing the results")]
    Output(#[source] io::Error),
}

/// Verifies `opts.target`: a directory's .gz and .zst files, or a manifest's entries and its
/// tree. Result lines go to `out`, warnings to stderr.
pub(crate) fn run(opts: &Options, out: &mut impl Write) -> std::result::Result<Report, Error> {
    let setup = |e: anyhow::Error| Error::Setup(e);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs)
        .build()
        .context("starting the verify pool")
        .map_err(setup)?;
    let target = &opts.target;
    let meta = std::fs::metadata(target)
        .with_context(|| format!("cannot open {}", target.display()))
        .map_err(setup)?;
    let mut printer = Printer {
        out,
        json: opts.json,
        quiet: opts.quiet,
        closed: false,
    };
    let output = |e: io::Error| Error::Output(e);
    let (report, algo) = if meta.is_dir() {
        if opts.algo.is_some()
            || opts.root.is_some()
            || !opts.exclude.is_empty()
            || !opts.state.is_empty()
        {
            return Err(setup(anyhow::anyhow!(
                "--algo, --root, --exclude and --state apply to a manifest, not to a directory \
                 of .gz and .zst files"
            )));
        }
        let (report, lines) = verify_compressed_tree(target, &pool).map_err(setup)?;
        for line in &lines {
            printer.line(line).map_err(output)?;
        }
        (report, None)
    } else {
        let (report, algo) = verify_manifest(opts, &pool, &mut printer)?;
        (report, Some(algo))
    };
    printer.summary(&report, algo).map_err(output)?;
    let warn = |n: u64, one: &str, many: &str| match n {
        0 => {}
        1 => crate::logging::say!("filepipe: WARNING: 1 {one}"),
        n => crate::logging::say!("filepipe: WARNING: {n} {many}"),
    };
    // With -q too: a malformed line has no line of its own in the report, so this is its only
    // word (as `sha256sum -c --quiet` still warns). Found by review r55: `verify -q` exited 1
    // saying nothing.
    warn(
        report.malformed,
        "line is improperly formatted",
        "lines are improperly formatted",
    );
    if !opts.quiet {
        warn(
            report.unreadable,
            "file could not be read or checked",
            "files could not be read or checked",
        );
        warn(report.failed, "file did not verify", "files did not verify");
        warn(
            report.missing,
            "listed file is missing",
            "listed files are missing",
        );
        warn(
            report.added,
            "file is not listed in the manifest (added)",
            "files are not listed in the manifest (added)",
        );
    }
    Ok(report)
}

/// One file's verdict.
pub(crate) enum Check {
    /// Verified.
    Ok,
    /// Wrong digest or corrupt stream, with why.
    Failed(String),
    /// Could not be opened or read, with why.
    Unreadable(String),
    /// Listed, and not in the tree.
    Missing,
    /// In the tree, and not listed.
    Added,
}

impl Check {
    /// The verdict's name in `--json` output.
    fn status(&self) -> &'static str {
        match self {
            Check::Ok => "ok",
            Check::Failed(_) => "failed",
            Check::Unreadable(_) => "unreadable",
            Check::Missing => "missing",
            Check::Added => "added",
        }
    }

    /// The text after the name, like sha256sum's.
    fn text(&self) -> String {
        match self {
            Check::Ok => "OK".into(),
            Check::Failed(why) => format!("FAILED ({why})"),
            Check::Unreadable(why) => format!("FAILED open or read ({why})"),
            Check::Missing => "MISSING".into(),
            Check::Added => "ADDED (not in the manifest)".into(),
        }
    }

    /// Why, for the failures that say.
    fn message(&self) -> Option<&str> {
        match self {
            Check::Failed(why) | Check::Unreadable(why) => Some(why),
            _ => None,
        }
    }
}

/// One result: the name as shown (escaped like a manifest line), its raw bytes, its verdict.
struct Line {
    shown: Vec<u8>,
    path: Vec<u8>,
    check: Check,
}

/// Writes result lines as they are decided (`name: verdict`, or one JSON object per line,
/// which `jq` reads as it comes), then the summary. A path that is not UTF-8 has its lossy
/// form in `path` and its bytes in `path_hex`, as in the failure log. A reader that closed the
/// pipe (`| head`) has what it wanted: nothing more is written (`closed`), and no error.
struct Printer<'a, W: Write> {
    out: &'a mut W,
    json: bool,
    /// `-q`: no `OK` lines in text (as `sha256sum -c --quiet`); `--json` records them all.
    quiet: bool,
    closed: bool,
}

impl<W: Write> Printer<'_, W> {
    fn line(&mut self, l: &Line) -> io::Result<()> {
        if self.quiet && !self.json && matches!(l.check, Check::Ok) {
            return Ok(());
        }
        let written = if self.json {
            let mut obj = serde_json::json!({
                "path": String::from_utf8_lossy(&l.path),
                "status": l.check.status(),
            });
            if std::str::from_utf8(&l.path).is_err() {
                let hex: String = l.path.iter().map(|b| format!("{b:02x}")).collect();
                obj["path_hex"] = hex.into();
            }
            if let Some(m) = l.check.message() {
                obj["message"] = m.into();
            }
            self.write(|out| {
                serde_json::to_writer(&mut *out, &obj)?;
                out.write_all(b"\n")
            })
        } else {
            self.write(|out| {
                out.write_all(&l.shown)?;
                writeln!(out, ": {}", l.check.text())
            })
        };
        written
    }

    /// The JSON summary, if `--json`; then everything written is flushed.
    fn summary(&mut self, report: &Report, algo: Option<HashAlgo>) -> io::Result<()> {
        if self.json {
            let mut summary = serde_json::to_value(report).map_err(io::Error::other)?;
            summary["status"] = "summary".into();
            if let Some(algo) = algo {
                summary["algo"] = algo.to_string().into();
            }
            summary["exit"] = report.exit_code().into();
            self.write(|out| {
                serde_json::to_writer(&mut *out, &summary)?;
                out.write_all(b"\n")
            })?;
        }
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write(|out| out.flush())
    }

    fn write(&mut self, f: impl FnOnce(&mut W) -> io::Result<()>) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        match f(self.out) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            r => r,
        }
    }
}

/// The manifest's algorithm: `--algo`, or told by its digests. 128 hex digits are SHA-512; 64
/// are SHA-256 or BLAKE3, which `detect_256` tells apart.
fn detect(
    opts: &Options,
    manifest: &Path,
    lines: &[Vec<u8>],
    root: &Under,
    beneath: &Root,
) -> HashAlgo {
    if let Some(algo) = opts.algo {
        return algo;
    }
    // A line in the BSD form names its algorithm (`BLAKE3 (a) = ...`).
    if let Some(algo) = lines.iter().find_map(|l| manifest::tagged(l)) {
        return algo;
    }
    let len = lines.iter().find_map(|l| manifest::hex_len(l));
    match len {
        Some(128) => HashAlgo::Sha512,
        Some(64) => detect_256(manifest, lines, root, beneath),
        _ => HashAlgo::Sha256,
    }
}

/// SHA-256 or BLAKE3, for a manifest of 64-digit digests: first by the suffix filepipe gives
/// a second manifest (`SUMS.sha256`, `SUMS.blake3`: `B3SUMS.sha256` is SHA-256, whatever the
/// rest of its name says), then BLAKE3 if its name says so (`B3SUMS`, `*.b3`), SHA-256 if its
/// name says that; otherwise the algorithm whose digest matches the first of the listed files
/// that can be read, and SHA-256 (what `sha256sum -c` would take it for) when neither matches
/// any of the first `PROBES`. The guess costs one more read of a file or a few; `--algo`
/// skips it.
fn detect_256(manifest: &Path, lines: &[Vec<u8>], root: &Under, beneath: &Root) -> HashAlgo {
    let name = manifest
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".sha256") {
        return HashAlgo::Sha256;
    }
    if name.ends_with(".blake3") || name.ends_with(".b3") {
        return HashAlgo::Blake3;
    }
    if name.contains("blake3") || name.contains("b3sum") {
        return HashAlgo::Blake3;
    }
    if name.contains("sha256") {
        return HashAlgo::Sha256;
    }
    /// How many readable files to try before taking SHA-256 (a tree where each changed).
    const PROBES: usize = 8;
    let mut probed = 0;
    for line in lines {
        if probed == PROBES {
            break;
        }
        let (Some(sha), Some(b3)) = (
            manifest::parse_line(line, HashAlgo::Sha256),
            manifest::parse_line(line, HashAlgo::Blake3),
        ) else {
            continue;
        };
        let Some(rel) = relative_to(root, &sha.name) else {
            continue;
        };
        let Ok(mut input) = open_listed(&root.real, beneath, &rel) else {
            continue;
        };
        let mut hashers = [Hasher::new(HashAlgo::Sha256), Hasher::new(HashAlgo::Blake3)];
        let mut tee = Tee::new(&mut input, &mut hashers);
        if io::copy(&mut tee, &mut io::sink()).is_err() {
            continue;
        }
        probed += 1;
        let [s, b] = hashers;
        match (s.finalize() == sha.digest, b.finalize() == b3.digest) {
            (true, _) => return HashAlgo::Sha256,
            (false, true) => return HashAlgo::Blake3,
            (false, false) => {}
        }
    }
    HashAlgo::Sha256
}

/// Where a manifest's names resolve: the root as the kernel names it (canonical: where its
/// files are read) and as the user gave it, made absolute, which a manifest of absolute names
/// may spell through a symlink (`/var/run` for `/run`).
struct Under {
    real: PathBuf,
    given: PathBuf,
}

/// A manifest name as a path relative to the root: `./` parts dropped, an absolute name under
/// the root (either spelling) made relative. `None` for a name that cannot be under the root.
fn relative_to(root: &Under, name: &[u8]) -> Option<PathBuf> {
    let path = Path::new(OsStr::from_bytes(name));
    let path = if path.is_absolute() {
        path.strip_prefix(&root.real)
            .or_else(|_| path.strip_prefix(&root.given))
            .ok()?
    } else {
        path
    };
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(n) => rel.push(n),
            // `..` may lead anywhere: such a name is neither read nor matched with the tree.
            _ => return None,
        }
    }
    Some(rel)
}

/// Lines read to tell a manifest's algorithm (`detect`): its digests' length is the first
/// line's, and a 64-digit one is probed on the first few files.
const DETECT_LINES: usize = 64;

/// The longest manifest line taken: a digest, a marker and a name of `PATH_MAX` bytes each
/// escaped to two (GNU escapes `\\` and `\n`). Longer is malformed, and never held whole.
const LONGEST_LINE: usize = 128 + 3 + 2 * 4096;

/// A manifest line as `Lines` reads it.
enum ManifestLine<'a> {
    /// Without its newline.
    Whole(&'a [u8]),
    /// Longer than `LONGEST_LINE`: skipped to its end, unread.
    TooLong,
}

/// A manifest's lines, each at most `LONGEST_LINE` long (one of 4 GB is not read into
/// memory whole, as `BufRead::split` would).
struct Lines<R> {
    input: R,
    line: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    fn new(input: R) -> Self {
        Lines {
            input,
            line: Vec::new(),
        }
    }

    /// The next line that is not empty or a comment, `None` at the end. A comment starts
    /// with `#`, as GNU's `sha256sum -c` takes it (and skips it, however long).
    fn next_line(&mut self) -> io::Result<Option<ManifestLine<'_>>> {
        loop {
            self.line.clear();
            let limit = LONGEST_LINE as u64 + 1;
            if (&mut self.input)
                .take(limit)
                .read_until(b'\n', &mut self.line)?
                == 0
            {
                return Ok(None);
            }
            let whole = self.line.last() == Some(&b'\n');
            if whole {
                self.line.pop();
            } else if self.line.len() > LONGEST_LINE {
                self.input.skip_until(b'\n')?;
            }
            if matches!(self.line.first(), None | Some(b'#')) {
                continue;
            }
            if !whole && self.line.len() > LONGEST_LINE {
                return Ok(Some(ManifestLine::TooLong));
            }
            return Ok(Some(ManifestLine::Whole(&self.line)));
        }
    }
}

/// Results are printed in manifest order as they are decided, while the files after them are
/// checked: at most this many files are taken ahead of the first one not printed yet (one
/// huge file holds the printing back, and the results after it wait, this many at most).
const WINDOW: usize = 4096;

fn verify_manifest(
    opts: &Options,
    pool: &ThreadPool,
    printer: &mut Printer<'_, impl Write>,
) -> std::result::Result<(Report, HashAlgo), Error> {
    let setup = |e: anyhow::Error| Error::Setup(e);
    // Before anything is printed: a state directory that cannot be opened is a usage error.
    let state_dirs = own::state_dir_ids(&opts.state).map_err(setup)?;
    let (mut report, algo, manifest, size, first, under, beneath) =
        open_manifest(opts).map_err(setup)?;
    let filter = Filter::new(&[], &opts.exclude).map_err(setup)?;
    let path = &opts.target;
    let mut listed: HashSet<PathBuf> = HashSet::new();
    // Three parts: a thread reads and parses the manifest (a pipe may be slow to give its
    // lines, and must not hold up printing), the pool checks the files, and this thread
    // prints the results in manifest order. Each file taken costs a credit, given back once
    // its result is printed: no more than `WINDOW` are ever taken ahead of the printing.
    let (work_tx, work_rx) = crossbeam_channel::bounded::<(usize, Entry)>(WINDOW);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<(usize, Entry, Check)>();
    let (credit_tx, credit_rx) = crossbeam_channel::bounded::<()>(WINDOW);
    let (end_tx, end_rx) = crossbeam_channel::bounded::<Fed>(1);
    for _ in 0..WINDOW {
        let _ = credit_tx.send(());
    }
    let reading = format!("reading {}", path.display());
    std::thread::Builder::new()
        .name("filepipe-verify-read".into())
        .spawn(move || feed(manifest, first, algo, work_tx, credit_rx, end_tx, reading))
        .context("starting the manifest's reader")
        .map_err(setup)?;
    let (under, beneath) = (&under, &beneath);
    // Dropped when printing ends: checkers stop even if the reader waits on a stalled pipe.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let streamed = pool.in_place_scope(|scope| -> std::result::Result<(), Error> {
        // Each of the pool's threads checks the next file taken, whatever its size.
        for _ in 0..pool.current_num_threads() {
            let (work, done, stop) = (work_rx.clone(), done_tx.clone(), stop_rx.clone());
            scope.spawn(move |_| {
                let mut buf = vec![0u8; BUF_SIZE];
                loop {
                    let (seq, entry) = crossbeam_channel::select! {
                        recv(work) -> next => match next {
                            Ok(next) => next,
                            Err(_) => break,
                        },
                        recv(stop) -> _ => break,
                    };
                    let check = check_digest(algo, under, beneath, &entry, &mut buf);
                    if done.send((seq, entry, check)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let _stop = stop_tx;
        let mut printed = 0usize;
        let mut ahead: std::collections::BTreeMap<usize, (Entry, Check)> = Default::default();
        let (mut end_rx, mut done_rx) = (end_rx, done_rx);
        let mut fed: Option<Fed> = None;
        let mut checkers_gone = false;
        loop {
            if fed
                .as_ref()
                .is_some_and(|f| f.taken == printed || checkers_gone)
                || printer.closed
            {
                break;
            }
            crossbeam_channel::select! {
                recv(done_rx) -> next => match next {
                    Ok((seq, entry, check)) => {
                        ahead.insert(seq, (entry, check));
                    }
                    // Every checker is done, as they are once the reader has fed its last
                    // line: the reader's end (its count of malformed lines, or why it
                    // stopped) is still to be heard. Breaking here lost it whenever the
                    // checkers' ends came first (CI, under load: "malformed":0).
                    Err(_) => {
                        done_rx = crossbeam_channel::never();
                        checkers_gone = true;
                    }
                },
                recv(end_rx) -> end => {
                    // Heard once: the reader is done (or gone, having said nothing).
                    end_rx = crossbeam_channel::never();
                    fed = Some(end.unwrap_or_else(|_| Fed {
                        taken: printed + ahead.len(),
                        malformed: 0,
                        error: Some(anyhow::anyhow!("the manifest's reader stopped")),
                    }));
                }
            }
            while let Some((entry, check)) = ahead.remove(&printed) {
                printed += 1;
                let _ = credit_tx.try_send(());
                // `f/` does not list `f` (it fails "not a directory"): `f` is still added.
                if let Some(rel) = relative_to(under, &entry.name).filter(|_| !as_dir(&entry.name))
                {
                    listed.insert(rel);
                }
                tally(&mut report, &check);
                let line = Line {
                    shown: entry.shown,
                    path: entry.name,
                    check,
                };
                printer.line(&line).map_err(Error::Output)?;
            }
            if done_rx.is_empty() {
                printer.flush().map_err(Error::Output)?;
            }
        }
        // Nobody reads on (`| head`), or all is printed: nothing more is started.
        while work_rx.try_recv().is_ok() {}
        match fed {
            Some(f) => {
                report.malformed += f.malformed;
                f.error.map_or(Ok(()), |e| Err(Error::Setup(e)))
            }
            None => Ok(()),
        }
    });
    streamed?;
    if printer.closed {
        return Ok((report, algo));
    }
    let own = own::OwnFiles::of_manifest(path, size, state_dirs);
    let mut state_like = Vec::new();
    for (rel, check) in added(under, beneath, &listed, &filter, &own) {
        tally(&mut report, &check);
        if rel.file_name() == Some(OsStr::new(crate::state::DB_NAME)) {
            let dir = rel.parent().unwrap_or(Path::new(""));
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            state_like.push(manifest::shown_name(dir.as_os_str().as_bytes()));
        }
        let name = rel.into_os_string().into_encoded_bytes();
        let line = Line {
            shown: manifest::shown_name(&name),
            path: name,
            check,
        };
        printer.line(&line).map_err(Error::Output)?;
    }
    // By name only (a tree's writer may name anything so, and its content is not read): a
    // hint, never a verdict, on stderr.
    if !opts.quiet {
        for dir in state_like {
            crate::logging::say!(
                "filepipe: {}: looks like a filepipe state directory: pass --state DIR (or \
                 --exclude) if it is yours",
                String::from_utf8_lossy(&dir)
            );
        }
    }
    Ok((report, algo))
}

/// What the manifest's reader says at its end.
struct Fed {
    /// Files taken to check (well-formed lines), numbered from 0 in manifest order.
    taken: usize,
    /// Lines that are not manifest lines.
    malformed: u64,
    /// Why the reading stopped before the end, if it did.
    error: Option<anyhow::Error>,
}

/// Reads the manifest's lines (the `first` already read, then the rest), parses them with one
/// layout, and hands each entry, numbered, to the checkers, a `credit` each; says how it
/// ended on `end`. Stops early when nobody takes credits or entries any more.
fn feed(
    mut manifest: Lines<BufReader<File>>,
    first: Vec<Vec<u8>>,
    algo: HashAlgo,
    work: crossbeam_channel::Sender<(usize, Entry)>,
    credits: crossbeam_channel::Receiver<()>,
    end: crossbeam_channel::Sender<Fed>,
    reading: String,
) {
    let mut layout = manifest::Layout::default();
    let mut fed = Fed {
        taken: 0,
        malformed: 0,
        error: None,
    };
    let mut first = first.into_iter();
    loop {
        let entry = match first.next() {
            Some(line) => manifest::parse_line_in(&line, algo, &mut layout),
            None => match manifest.next_line() {
                Ok(Some(ManifestLine::Whole(line))) => {
                    manifest::parse_line_in(line, algo, &mut layout)
                }
                Ok(Some(ManifestLine::TooLong)) => None,
                Ok(None) => break,
                Err(e) => {
                    fed.error = Some(anyhow::Error::new(e).context(reading));
                    break;
                }
            },
        };
        let Some(entry) = entry else {
            fed.malformed += 1;
            continue;
        };
        if credits.recv().is_err() || work.send((fed.taken, entry)).is_err() {
            return;
        }
        fed.taken += 1;
    }
    drop(work);
    #[cfg(test)]
    std::thread::sleep(tests::held_end());
    let _ = end.send(fed);
}

/// A manifest opened, its size (0 for a pipe), its first lines read and its algorithm told,
/// with the root its names resolve against (as text, and opened).
type Opened = (
    Report,
    HashAlgo,
    Lines<BufReader<File>>,
    u64,
    Vec<Vec<u8>>,
    Under,
    Root,
);

fn open_manifest(opts: &Options) -> Result<Opened> {
    let path = &opts.target;
    // Opened and read once: a manifest may come through a pipe (`verify /dev/stdin`, `<(...)`)
    // or a FIFO, which a second open would not read from the start. The first lines tell the
    // algorithm and are kept; the rest is parsed as it comes, only well-formed lines kept: a
    // manifest is untrusted input, and 50 MB of short garbage lines kept whole took 5 GB.
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file
        .metadata()
        .map_or(0, |m| if m.is_file() { m.len() } else { 0 });
    let mut manifest = Lines::new(BufReader::new(file));
    let mut report = Report::default();
    let mut first: Vec<Vec<u8>> = Vec::new();
    // Only as many as the algorithm needs (none with --algo; one that names it or has 128
    // digits): a manifest from a slow pipe has its first results printed as they come, as
    // `sha256sum -c` prints them (it waited for 64 lines or the pipe's end: review r57b).
    let mut known = opts.algo.is_some();
    while !known && first.len() < DETECT_LINES {
        match manifest.next_line() {
            Ok(Some(ManifestLine::Whole(line))) => {
                known = manifest::tagged(line).is_some() || manifest::hex_len(line) == Some(128);
                first.push(line.to_vec());
            }
            Ok(Some(ManifestLine::TooLong)) => report.malformed += 1,
            Ok(None) => break,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    let root = match &opts.root {
        Some(r) => r.clone(),
        None => match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    let given = std::path::absolute(&root)
        .with_context(|| format!("cannot open the root {}", root.display()))?;
    let root = std::fs::canonicalize(&root)
        .with_context(|| format!("cannot open the root {}", root.display()))?;
    let under = Under {
        real: root.clone(),
        given,
    };
    if !root.is_dir() {
        bail!("the root {} is not a directory", root.display());
    }
    // Every listed file is reached beneath the root: a manifest is untrusted input, and its
    // names (`../`, an absolute path elsewhere, a link in the tree) must not get anything
    // outside the root opened, nor tell whether something exists there.
    let beneath = Root::named(&root, &under.given)
        .map_err(io::Error::from)
        .with_context(|| format!("cannot open the root {}", root.display()))?;
    let algo = detect(opts, path, &first, &under, &beneath);
    Ok((report, algo, manifest, size, first, under, beneath))
}

/// The regular files under `root` not in `listed` (relative to the root, sorted by their
/// bytes): what a batch run would hash now and the manifest lacks, each `Check::Added`.
/// Symlinks are not followed (batch does not hash them by default); excluded names,
/// filepipe's temps (named so and marked: a name alone hides nothing) and filepipe's `own`
/// files (the manifest, the other manifests of its run, the state's files in the directories
/// named with `--state`: none of which the batch that wrote the manifest lists) are left out. A
/// directory that cannot be read (no permission, a path too long) leaves its files unknown: a
/// line of its own that fails the run, since the report of added files is then incomplete.
fn added(
    under: &Under,
    beneath: &Root,
    listed: &HashSet<PathBuf>,
    filter: &Filter,
    own: &own::OwnFiles,
) -> Vec<(PathBuf, Check)> {
    use std::os::unix::fs::MetadataExt;
    let root = under.real.as_path();
    let mut found = Vec::new();
    // The state directories named with `--state` the walk found: their state files are left
    // out, whatever else they hold is not (a group-writable one held anything).
    let mut state_dirs: Vec<PathBuf> = Vec::new();
    let mut it = WalkDir::new(root).min_depth(1).into_iter();
    while let Some(entry) = it.next() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e.path().unwrap_or(root);
                let rel = path.strip_prefix(root).unwrap_or(path).to_path_buf();
                if !may_be_dir_beneath(beneath, &rel) {
                    continue;
                }
                let why = match e.io_error() {
                    Some(io) => format!("cannot read this directory: {io}"),
                    None => e.to_string(),
                };
                found.push((
                    rel,
                    Check::Unreadable(format!("{why}: files there not compared with the manifest")),
                ));
                continue;
            }
        };
        let Ok(rel) = entry.path().strip_prefix(root) else {
            continue;
        };
        let is_state_dir = || {
            entry.file_type().is_dir()
                && (entry.metadata().ok()).is_some_and(|m| own.is_state_dir((m.dev(), m.ino())))
        };
        if filter.excluded(rel) {
            if entry.file_type().is_dir() {
                it.skip_current_dir();
            }
            continue;
        }
        if is_state_dir() {
            state_dirs.push(rel.to_path_buf());
            continue;
        }
        let state_file = || {
            rel.parent()
                .is_some_and(|p| state_dirs.iter().any(|d| d == p))
                && entry
                    .file_name()
                    .to_str()
                    .is_some_and(own::is_state_file_name)
        };
        if !entry.file_type().is_file()
            || listed.contains(rel)
            || output::is_temp_name(entry.file_name())
                && (rel.parent().and_then(|p| beneath.open_dir(p).ok()))
                    .is_some_and(|dir| output::temp_being_written(&dir, entry.file_name()))
        {
            continue;
        }
        if state_file() {
            // By name, before any look: a live state's files come and go (found by a review:
            // its -wal and -shm replaced as the walk passed failed the run).
            continue;
        }
        let id = entry.metadata().ok().map(|m| (m.dev(), m.ino()));
        let here = beneath.lstat(rel).ok().map(|st| (st.st_dev, st.st_ino));
        if here.is_some() && here != id {
            // Replaced while the walk went by (a rename over it, an exchange): what is there
            // now was not looked at, and a writer swapping files in a loop hid one from the
            // report this way (found by a review). Not compared: the run fails, saying so.
            found.push((
                rel.to_path_buf(),
                Check::Unreadable(
                    "replaced while verify walked the tree: not compared with the manifest; \
                     verify again once the tree is still"
                        .into(),
                ),
            ));
            continue;
        }
        if here.is_none() || id.is_some_and(|id| own.holds(beneath, rel, id, listed, under)) {
            continue;
        }
        found.push((rel.to_path_buf(), Check::Added));
    }
    found.sort_unstable_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    found
}

/// Whether `rel`, as a walk by path found it (device and inode `id`), is that very file beneath
/// the root, reached from its descriptor without following any link. The walks go by path: a
/// directory swapped for a symlink while they run leads them out of the tree (found by a
/// review: names under /etc reported added), and what they find there is not reported.
fn is_beneath(beneath: &Root, rel: &Path, id: Option<(u64, u64)>) -> bool {
    let here = beneath.lstat(rel).ok().map(|st| (st.st_dev, st.st_ino));
    here.is_some() && here == id
}

/// Whether `rel`, which the walk could not read, may be a directory beneath the root and is
/// to be reported (see `is_beneath`): unless it is found to be something else, to be gone, or
/// to lie past a symlink or outside the root. One that cannot even be looked at (out of
/// descriptors, say) is reported: taken for absent, its files went unchecked and the run
/// passed (found by a review, under `ulimit -n 12`).
fn may_be_dir_beneath(beneath: &Root, rel: &Path) -> bool {
    if rel.as_os_str().is_empty() {
        return true;
    }
    use rustix::io::Errno;
    match beneath.lstat(rel) {
        Ok(st) => {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        }
        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => false,
        Err(_) => true,
    }
}

/// Opens the listed file `rel` for reading, beneath the root whatever the manifest or the tree
/// says: reached with `O_PATH` first (a FIFO's writer is never let go, a device's driver
/// never asked), symlinks followed only to what lies beneath the root (as `batch
/// --follow-symlinks` follows them), and a path that leads out of the root refused whether
/// or not anything is there.
fn open_listed(root: &Path, beneath: &Root, rel: &Path) -> Result<InputFile, OpenError> {
    InputFile::open_beneath(Some(beneath), rel, &root.join(rel), true, true)
}

fn check_digest(
    algo: HashAlgo,
    root: &Under,
    beneath: &Root,
    entry: &Entry,
    buf: &mut [u8],
) -> Check {
    let Some(rel) = relative_to(root, &entry.name) else {
        return Check::Unreadable(
            "outside the root, not read: a name with `..` or an absolute path elsewhere".into(),
        );
    };
    let mut input = match open_listed(&root.real, beneath, &rel) {
        Ok(f) => f,
        Err(OpenError::NotRegular(NotRegular::OutsideRoot)) => {
            return Check::Unreadable(
                "a symlink on its path leads outside the root, not read".into(),
            )
        }
        Err(OpenError::NotRegular(what)) => {
            return Check::Unreadable(format!("not a regular file ({what})"))
        }
        Err(OpenError::Failed(e)) if e.kind == Kind::Vanished => return Check::Missing,
        Err(OpenError::Failed(e)) => return Check::Unreadable(e.message),
    };
    // `f/` or `f/.` names a directory: the file `f` is not read as if named `f` (GNU's open
    // fails it "Not a directory"; the path's components had lost the slash: review r57).
    if as_dir(&entry.name) {
        return Check::Unreadable("not a directory, which its name ends as (`/`)".into());
    }
    match hash_reader(algo, &mut input, buf) {
        Ok(d) if d == entry.digest => Check::Ok,
        Ok(_) => Check::Failed("checksum mismatch".into()),
        Err(e) => Check::Unreadable(format!("reading: {e}")),
    }
}

/// Whether a listed name ends as a directory's does (`d/`, `d/.`).
fn as_dir(name: &[u8]) -> bool {
    name.ends_with(b"/") || name.ends_with(b"/.")
}

fn tally(report: &mut Report, check: &Check) {
    let n = match check {
        Check::Ok => &mut report.ok,
        Check::Failed(_) => &mut report.failed,
        Check::Unreadable(_) => &mut report.unreadable,
        Check::Missing => &mut report.missing,
        Check::Added => &mut report.added,
    };
    *n += 1;
}

/// What the walk of a tree found to verify.
enum Found {
    /// A regular `.gz` file: tested.
    Gz,
    /// A regular `.zst` file: tested.
    Zst,
    /// Something that could not be checked, and why: a fails-the-run verdict of its own.
    NotChecked(String),
}

fn verify_compressed_tree(root: &Path, pool: &ThreadPool) -> Result<(Report, Vec<Line>)> {
    // Each file is opened beneath the root, no link followed, and what the walk (by path)
    // found is reported only if it is there (`is_beneath`): a directory swapped for a symlink
    // during the run must not get a file outside the tree decompressed, nor its name shown.
    let beneath = Root::new(root)
        .map_err(io::Error::from)
        .with_context(|| format!("cannot open {}", root.display()))?;
    let mut found: Vec<(PathBuf, Found)> = Vec::new();
    for entry in WalkDir::new(root).min_depth(1) {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // A directory (or entry) the walk could not read: its files went unchecked.
                let path = e.path().unwrap_or(root).to_path_buf();
                if !may_be_dir_beneath(&beneath, path.strip_prefix(root).unwrap_or(&path)) {
                    continue;
                }
                let why = match e.io_error() {
                    Some(io) => format!("cannot read this directory: {io}"),
                    None => e.to_string(),
                };
                found.push((path, Found::NotChecked(why)));
                continue;
            }
        };
        // The names filepipe gives its outputs, exactly (as `gzip -t -r` and `zstd -t -r` pick
        // theirs by suffix).
        let name = entry.file_name().as_bytes();
        let format = if name.ends_with(b".gz") {
            Found::Gz
        } else if name.ends_with(b".zst") {
            Found::Zst
        } else {
            continue;
        };
        let ft = entry.file_type();
        let found_here = if ft.is_file() {
            format
        } else {
            let what = if ft.is_symlink() {
                "a symlink"
            } else if ft.is_dir() {
                "a directory"
            } else {
                "a special file"
            };
            Found::NotChecked(format!("{what}, not a regular file: not checked"))
        };
        let id = {
            use std::os::unix::fs::MetadataExt;
            entry.metadata().ok().map(|m| (m.dev(), m.ino()))
        };
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        if !is_beneath(&beneath, rel, id) {
            continue;
        }
        found.push((entry.into_path(), found_here));
    }
    found.sort_unstable_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    let results: Vec<Check> = pool.install(|| {
        found
            .par_iter()
            .map_init(
                || vec![0u8; BUF_SIZE],
                |buf, (p, f)| match f {
                    Found::Gz => test_file(&beneath, root, p, buf, test_gz_stream),
                    Found::Zst => test_file(&beneath, root, p, buf, test_zst_stream),
                    Found::NotChecked(why) => Check::Unreadable(why.clone()),
                },
            )
            .collect()
    });
    let mut report = Report::default();
    let mut lines = Vec::with_capacity(found.len());
    for ((path, _), check) in found.into_iter().zip(results) {
        tally(&mut report, &check);
        let path = path.into_os_string().into_encoded_bytes();
        lines.push(Line {
            shown: manifest::shown_name(&path),
            path,
            check,
        });
    }
    Ok((report, lines))
}

/// Tests a whole compressed file `path` (under `root`) with `test` (`test_gz_stream`,
/// `test_zst_stream`), opened beneath the root with no link followed.
fn test_file(
    beneath: &Root,
    root: &Path,
    path: &Path,
    buf: &mut [u8],
    test: fn(BufReader<InputFile>, &mut [u8]) -> Check,
) -> Check {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let input = match InputFile::open_beneath(Some(beneath), rel, path, false, false) {
        Ok(f) => f,
        Err(OpenError::NotRegular(what)) => {
            return Check::Unreadable(format!("not a regular file ({what})"))
        }
        Err(OpenError::Failed(e)) => return Check::Unreadable(e.message),
    };
    test(BufReader::with_capacity(BUF_SIZE, input), buf)
}

/// An empty input is no valid file of either format (`gzip -t` and `zstd -t` both refuse it).
fn empty(r: &mut impl BufRead) -> Option<Check> {
    match r.fill_buf() {
        Ok([]) => Some(Check::Failed("empty file: unexpected end of file".into())),
        Ok(_) => None,
        Err(e) => Some(Check::Unreadable(format!("reading: {e}"))),
    }
}

/// Tests a gzip stream read from `r`, every member's CRC-32 and length, like `gzip -t`: zero
/// bytes after the last member are padding (a tape's, a block device's), which `gzip -t`
/// accepts in silence; any other bytes there are not a member, which it reports ("trailing
/// garbage ignored", exit 2), and so does this, by that name, not as a truncated member
/// (found by a review). Any byte sequence gives a verdict, never a panic.
pub(crate) fn test_gz_stream(mut r: impl BufRead, buf: &mut [u8]) -> Check {
    if let Some(verdict) = empty(&mut r) {
        return verdict;
    }
    loop {
        // A member, and exactly its bytes: the rest stays in `r`.
        match drain(flate2::bufread::GzDecoder::new(&mut r), buf) {
            Check::Ok => {}
            bad => return bad,
        }
        match r.fill_buf() {
            Ok([]) => return Check::Ok,
            // The next member's magic: it is tested in its turn.
            Ok([0x1f, ..]) => {}
            Ok([0, ..]) => return zero_padding(r),
            Ok(_) => return Check::Failed(TRAILING_GARBAGE.into()),
            Err(e) => return Check::Unreadable(format!("reading: {e}")),
        }
    }
}

/// What follows the last gzip member when it is not one (see `test_gz_stream`).
const TRAILING_GARBAGE: &str = "trailing garbage after the last gzip member";

/// The rest of `r`, after the last gzip member, if it is all zero bytes.
fn zero_padding(mut r: impl BufRead) -> Check {
    loop {
        let n = match r.fill_buf() {
            Ok([]) => return Check::Ok,
            Ok(rest) if rest.iter().all(|&b| b == 0) => rest.len(),
            Ok(_) => return Check::Failed(TRAILING_GARBAGE.into()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Check::Unreadable(format!("reading: {e}")),
        };
        r.consume(n);
    }
}

/// Tests zstd frames read from `r`, every frame's checksum (when it has one, as filepipe's and
/// zstd's own do) and content size, skippable frames skipped, like `zstd -t`. Any byte
/// sequence gives a verdict, never a panic.
pub(crate) fn test_zst_stream(mut r: impl BufRead, buf: &mut [u8]) -> Check {
    if let Some(verdict) = empty(&mut r) {
        return verdict;
    }
    match zstd::stream::read::Decoder::with_buffer(r) {
        Ok(dec) => drain(dec, buf),
        Err(e) => Check::Failed(format!("cannot start decoding: {e}")),
    }
}

/// Decompresses everything `dec` gives; the verdict is its first error, if any.
fn drain(mut dec: impl Read, buf: &mut [u8]) -> Check {
    loop {
        match dec.read(buf) {
            Ok(0) => return Check::Ok,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Check::Failed("truncated: unexpected end of file".into())
            }
            Err(e) => return Check::Failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn verdict(bytes: &[u8]) -> Check {
        test_gz_stream(bytes, &mut [0; 4096])
    }

    /// How long the manifest's reader waits between its last line fed and its end said (the
    /// tests below that set it are the only ones to hear it late).
    static HOLD_END_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    pub(super) fn held_end() -> std::time::Duration {
        let ms = HOLD_END_MS.load(std::sync::atomic::Ordering::Relaxed);
        std::time::Duration::from_millis(ms)
    }

    /// The reader's end heard after every checker is done (as a loaded machine may have it):
    /// its count of malformed lines still counts. It was lost: the printing stopped when the
    /// checkers did (CI: a summary with "malformed":0 and exit 0 where `sha256sum -c` warned).
    #[test]
    fn malformed_lines_count_when_the_readers_end_comes_last() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"alpha\n").unwrap();
        let mut hasher = Hasher::new(HashAlgo::Sha256);
        hasher.update(b"alpha\n");
        let digest = hasher.finalize().to_hex();
        let manifest = dir.path().join("SHA256SUMS");
        std::fs::write(&manifest, format!("{digest}  a\nnot a manifest line\n")).unwrap();
        HOLD_END_MS.store(300, std::sync::atomic::Ordering::Relaxed);
        let opts = Options {
            target: manifest,
            jobs: 2,
            algo: None,
            root: None,
            exclude: Vec::new(),
            state: Vec::new(),
            json: true,
            quiet: true,
        };
        let report = run(&opts, &mut Vec::new());
        HOLD_END_MS.store(0, std::sync::atomic::Ordering::Relaxed);
        let report = report.unwrap();
        assert_eq!((report.ok, report.malformed), (1, 1), "{report:?}");
    }

    #[test]
    fn good_concatenated_and_bad_streams() {
        let mut two = gz(b"first member ");
        two.extend(gz(b"second member"));
        assert!(matches!(verdict(&two), Check::Ok));
        assert!(matches!(verdict(b""), Check::Failed(_)));
        let good = gz(&[7; 10_000]);
        assert!(matches!(verdict(&good[..good.len() - 3]), Check::Failed(_)));
        let mut bad_crc = good.clone();
        let n = bad_crc.len();
        bad_crc[n - 6] ^= 1;
        assert!(matches!(verdict(&bad_crc), Check::Failed(_)));
        // Zero padding after the last member is accepted, as `gzip -t` does; other bytes are
        // said to be what they are, also after padding. A member after padding is not looked
        // for (gzip neither).
        let mut padded = two.clone();
        padded.extend([0; 700]);
        assert!(matches!(verdict(&padded), Check::Ok));
        for tail in [&b"garbage\n"[..], b"\0\0\0x", b"\x1f"] {
            let mut trailing = two.clone();
            trailing.extend(tail);
            match verdict(&trailing) {
                Check::Failed(why) if tail[0] == 0x1f => {
                    assert!(why.contains("end of file"), "{why}")
                }
                Check::Failed(why) => assert_eq!(why, TRAILING_GARBAGE, "{tail:?}"),
                _ => panic!("{tail:?} after the last member passed"),
            }
        }
    }

    #[test]
    fn manifest_names_are_matched_with_the_tree_relative_to_the_root() {
        let root = Under {
            real: PathBuf::from("/srv/r"),
            given: PathBuf::from("/var/srv/r"),
        };
        let rel = |n: &[u8]| relative_to(&root, n);
        assert_eq!(rel(b"a/b"), Some(PathBuf::from("a/b")));
        assert_eq!(rel(b"./a/./b"), Some(PathBuf::from("a/b")));
        assert_eq!(rel(b"/srv/r/a"), Some(PathBuf::from("a")));
        assert_eq!(rel(b"/var/srv/r/a"), Some(PathBuf::from("a")));
        assert_eq!(rel(b"/elsewhere/a"), None);
        assert_eq!(rel(b"../r/a"), None);
        assert_eq!(
            rel(b"a\nb\xff"),
            Some(PathBuf::from(OsStr::from_bytes(b"a\nb\xff")))
        );
    }

    /// A manifest line longer than any a name can make is malformed (a comment, skipped),
    /// without being held (50 MB of garbage lines kept whole took 5 GB; a 4 GB line, 4 GB), and the next
    /// line is read as usual.
    #[test]
    fn manifest_lines_are_read_in_bounded_memory() {
        let mut text = b"ok line\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', 3 * LONGEST_LINE));
        // An empty line, a comment and a comment too long to hold: skipped alike.
        text.extend_from_slice(b"\n\n# comment\n#");
        text.extend(std::iter::repeat_n(b'y', 3 * LONGEST_LINE));
        text.extend_from_slice(b"\nlast, no newline");
        let mut lines = Lines::new(BufReader::with_capacity(1000, &text[..]));
        let mut seen = Vec::new();
        while let Some(l) = lines.next_line().unwrap() {
            seen.push(match l {
                ManifestLine::Whole(b) => String::from_utf8_lossy(b).into_owned(),
                ManifestLine::TooLong => "<too long>".into(),
            });
            assert!(lines.line.capacity() <= 2 * LONGEST_LINE);
        }
        assert_eq!(seen, ["ok line", "<too long>", "last, no newline"]);
    }

    /// What a walk by path found through a directory swapped for a symlink is not beneath the
    /// root: reached from the root's descriptor with no link followed, it is another file, or
    /// none (the walks report only what `is_beneath` vouches for).
    #[test]
    fn a_file_found_through_a_swapped_directory_is_not_beneath_the_root() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("z")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("z/f"), b"inside").unwrap();
        std::fs::write(outside.join("f"), b"outside").unwrap();
        let beneath = Root::new(&root).unwrap();
        let id = |p: &Path| {
            std::fs::symlink_metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino()))
        };
        assert!(is_beneath(
            &beneath,
            Path::new("z/f"),
            id(&root.join("z/f"))
        ));
        assert!(may_be_dir_beneath(&beneath, Path::new("z")));
        // The walk, by path, after `z` became a link out: it finds outside/f as z/f.
        std::fs::rename(root.join("z"), tmp.path().join("z-away")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("z")).unwrap();
        let found = id(&root.join("z").join("f"));
        assert_eq!(found, id(&outside.join("f")));
        assert!(!is_beneath(&beneath, Path::new("z/f"), found));
        assert!(!may_be_dir_beneath(&beneath, Path::new("z")));
    }

    #[test]
    fn exit_bits_add_up() {
        let r = |failed, missing, added| Report {
            failed,
            missing,
            added,
            ..Report::default()
        };
        assert_eq!(r(0, 0, 0).exit_code(), 0);
        assert_eq!(r(1, 0, 0).exit_code(), 1);
        assert_eq!(r(0, 2, 0).exit_code(), 4);
        assert_eq!(r(0, 0, 3).exit_code(), 8);
        assert_eq!(r(1, 1, 1).exit_code(), 13);
    }

    fn zst(data: &[u8]) -> Vec<u8> {
        zstd::stream::encode_all(data, 3).unwrap()
    }

    fn zst_verdict(bytes: &[u8]) -> Check {
        test_zst_stream(bytes, &mut [0; 4096])
    }

    #[test]
    fn good_concatenated_skippable_and_bad_zstd_frames() {
        let mut two = zst(b"first frame ");
        // A skippable frame (what filepipe's stamp is) between two frames.
        two.extend([0x5f, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        two.extend(zst(b"second frame"));
        assert!(matches!(zst_verdict(&two), Check::Ok));
        assert!(matches!(zst_verdict(b""), Check::Failed(_)));
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        e.include_checksum(true).unwrap();
        let data: Vec<u8> = (0..50_000u32)
            .map(|i| (i % 251) as u8 ^ (i >> 9) as u8)
            .collect();
        e.write_all(&data).unwrap();
        let good = e.finish().unwrap();
        assert!(matches!(zst_verdict(&good), Check::Ok));
        assert!(matches!(
            zst_verdict(&good[..good.len() - 3]),
            Check::Failed(_)
        ));
        let mut bad_sum = good.clone();
        let n = bad_sum.len();
        bad_sum[n - 2] ^= 1;
        assert!(matches!(zst_verdict(&bad_sum), Check::Failed(_)));
        assert!(matches!(zst_verdict(&gz(b"not zstd")), Check::Failed(_)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Garbage never panics and is never accepted as zstd (unless it starts with a frame
        /// or skippable frame magic).
        #[test]
        fn zstd_garbage_gives_a_verdict(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let accepted = matches!(zst_verdict(&bytes), Check::Ok);
            let magic = bytes.len() >= 4 && (bytes[..4] == [0x28, 0xb5, 0x2f, 0xfd]
                || (bytes[1..4] == [0x2a, 0x4d, 0x18] && bytes[0] & 0xf0 == 0x50));
            prop_assert!(!accepted || magic);
        }

        /// A valid zstd file cut short, or with bytes flipped: a verdict, never a panic.
        #[test]
        fn mutated_zstd_frames_give_a_verdict(
            data in prop::collection::vec(any::<u8>(), 1..20_000),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let good = zst(&data);
            let mut bad = good.clone();
            for (i, x) in &flips {
                let i = i.index(bad.len());
                bad[i] ^= x;
            }
            let _ = zst_verdict(&bad);
            let cut = cut.index(good.len());
            prop_assert!(!matches!(zst_verdict(&good[..cut]), Check::Ok));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Garbage never panics and is never accepted.
        #[test]
        fn garbage_gives_a_verdict(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let accepted = matches!(verdict(&bytes), Check::Ok);
            prop_assert!(!accepted || bytes.starts_with(&[0x1f, 0x8b]));
        }

        /// A valid stream with bytes flipped, cut or appended: a verdict, never a panic; a flip
        /// in the deflate data or trailer is caught (the CRC-32 sees every data change).
        #[test]
        fn mutated_streams_give_a_verdict(
            data in prop::collection::vec(any::<u8>(), 1..20_000),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let good = gz(&data);
            let mut bad = good.clone();
            for (i, x) in &flips {
                let i = 10 + i.index(bad.len() - 10);
                bad[i] ^= x;
            }
            let _ = verdict(&bad);
            let cut = cut.index(good.len());
            prop_assert!(!matches!(verdict(&good[..cut]), Check::Ok));
        }

        /// Any name (any bytes but NUL) written to a manifest line of any algorithm reads
        /// back as itself, on one line, and its shown form is the line's name part.
        #[test]
        fn any_name_roundtrips_through_a_manifest_line(
            name in prop::collection::vec(1u8..=255, 1..100),
            algo in prop::sample::select(HashAlgo::ALL.to_vec()),
            fill in any::<u8>(),
        ) {
            let digest = crate::digest::Digest::new(algo, &vec![fill; algo.len()]).unwrap();
            let mut line = Vec::new();
            crate::manifest::push_line(&mut line, &digest, &name);
            prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            let line = line.strip_suffix(b"\n").unwrap();
            let e = crate::manifest::parse_line(line, algo).unwrap();
            // `-` is listed as `./-` (the tools read `-` as stdin): the same file to `rel`.
            let listed: &[u8] = if name == b"-" { b"./-" } else { &name };
            prop_assert_eq!(&e.name[..], listed);
            prop_assert_eq!(e.digest, digest);
            prop_assert_eq!(&e.shown, &crate::manifest::shown_name(&name));
        }

        /// Manifest lines of any bytes parse or are rejected, never panic.
        #[test]
        fn manifest_lines_never_panic(line in prop::collection::vec(any::<u8>(), 0..200)) {
            for algo in HashAlgo::ALL {
                let _ = crate::manifest::parse_line(&line, algo);
            }
        }
    }
}
