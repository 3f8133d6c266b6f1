//! `filepipe verify`: check a manifest like `sha256sum -c`, or test .gz files like `gzip -t`.
//!
//! Both check files in parallel and print one result line per file in a stable order (manifest
//! order, or sorted paths). A missing, unreadable, corrupt or truncated file, and a malformed
//! manifest line, is a clear per-file error: never a panic, never the end of the run. Nothing
//! is passed over in silence: a directory that cannot be read, and a `.gz` name that is not a
//! regular file (a symlink, a FIFO, a directory), is a line of its own and fails the run. A
//! reader that closes the pipe early (`| head`) is not an error; any other failure to write
//! the results is.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use flate2::read::MultiGzDecoder;
use rayon::prelude::*;
use rayon::ThreadPool;
use walkdir::WalkDir;

use crate::digest::HashAlgo;
use crate::fsio::input::{InputFile, OpenError};
use crate::manifest::{self, Entry};
use crate::ops::hash::{hash_reader, BUF_SIZE};

/// The result of a verification run.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Report {
    /// Files that checked out.
    pub(crate) ok: u64,
    /// Files with a wrong digest or a corrupt stream.
    pub(crate) failed: u64,
    /// Files that could not be opened or read.
    pub(crate) unreadable: u64,
    /// Manifest lines that could not be parsed.
    pub(crate) malformed: u64,
}

impl Report {
    /// True when everything checked out.
    pub(crate) fn success(&self) -> bool {
        self.failed == 0 && self.unreadable == 0 && self.malformed == 0
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

/// Verifies `target`: a directory's .gz files, or a manifest's entries. Result lines go to
/// `out`, warnings to stderr.
pub(crate) fn run(
    target: &Path,
    jobs: usize,
    quiet: bool,
    out: &mut impl Write,
) -> std::result::Result<Report, Error> {
    let setup = |e: anyhow::Error| Error::Setup(e);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs)
        .build()
        .context("starting the verify pool")
        .map_err(setup)?;
    let meta = std::fs::metadata(target)
        .with_context(|| format!("cannot open {}", target.display()))
        .map_err(setup)?;
    let (report, lines) = if meta.is_dir() {
        verify_gz_tree(target, &pool)
    } else {
        verify_manifest(target, &pool).map_err(setup)?
    };
    match print(&lines, out) {
        // A reader that stopped reading (`| head`) has what it wanted.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        r => r.map_err(Error::Output)?,
    }
    if !quiet {
        if report.malformed > 0 {
            eprintln!(
                "filepipe: WARNING: {} lines are improperly formatted",
                report.malformed
            );
        }
        if report.unreadable > 0 {
            eprintln!(
                "filepipe: WARNING: {} files could not be read or checked",
                report.unreadable
            );
        }
        if report.failed > 0 {
            eprintln!("filepipe: WARNING: {} files did not verify", report.failed);
        }
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
}

/// Result lines: a name as shown, and its verdict.
type Lines = Vec<(Vec<u8>, String)>;

/// Writes `name: verdict` lines and flushes them.
fn print(lines: &Lines, out: &mut impl Write) -> io::Result<()> {
    for (name, status) in lines {
        out.write_all(name)?;
        writeln!(out, ": {status}")?;
    }
    out.flush()
}

fn verify_manifest(path: &Path, pool: &ThreadPool) -> Result<(Report, Lines)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut lines: Vec<Option<Entry>> = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.is_empty() {
            continue;
        }
        lines.push(manifest::parse_line(&line, HashAlgo::Sha256));
    }
    let results: Vec<Option<Check>> = pool.install(|| {
        lines
            .par_iter()
            .map_init(
                || vec![0u8; BUF_SIZE],
                |buf, e| e.as_ref().map(|e| check_digest(e, buf)),
            )
            .collect()
    });
    let mut report = Report::default();
    let mut shown = Vec::with_capacity(lines.len());
    for (entry, result) in lines.iter().zip(results) {
        let (Some(entry), Some(result)) = (entry, result) else {
            report.malformed += 1;
            continue;
        };
        let status = tally(&mut report, &result);
        shown.push((entry.shown.clone(), status));
    }
    Ok((report, shown))
}

fn check_digest(entry: &Entry, buf: &mut [u8]) -> Check {
    let path = Path::new(OsStr::from_bytes(&entry.name));
    let mut input = match InputFile::open(path, true) {
        Ok(f) => f,
        Err(OpenError::NotRegular(what)) => {
            return Check::Unreadable(format!("not a regular file ({what})"))
        }
        Err(OpenError::Failed(e)) => return Check::Unreadable(e.message),
    };
    match hash_reader(HashAlgo::Sha256, &mut input, buf) {
        Ok(d) if d == entry.digest => Check::Ok,
        Ok(_) => Check::Failed("checksum mismatch".into()),
        Err(e) => Check::Unreadable(format!("reading: {e}")),
    }
}

fn tally(report: &mut Report, result: &Check) -> String {
    match result {
        Check::Ok => {
            report.ok += 1;
            "OK".into()
        }
        Check::Failed(why) => {
            report.failed += 1;
            format!("FAILED ({why})")
        }
        Check::Unreadable(why) => {
            report.unreadable += 1;
            format!("FAILED open or read ({why})")
        }
    }
}

/// What the walk of a tree found to verify.
enum Found {
    /// A regular `.gz` file: tested.
    Gz,
    /// Something that could not be checked, and why: a fails-the-run verdict of its own.
    NotChecked(String),
}

fn verify_gz_tree(root: &Path, pool: &ThreadPool) -> (Report, Lines) {
    let mut found: Vec<(PathBuf, Found)> = Vec::new();
    for entry in WalkDir::new(root).min_depth(1) {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // A directory (or entry) the walk could not read: its .gz files went unchecked.
                let path = e.path().unwrap_or(root).to_path_buf();
                let why = match e.io_error() {
                    Some(io) => format!("cannot read this directory: {io}"),
                    None => e.to_string(),
                };
                found.push((path, Found::NotChecked(why)));
                continue;
            }
        };
        if !entry.file_name().as_bytes().ends_with(b".gz") {
            continue;
        }
        let ft = entry.file_type();
        let found_here = if ft.is_file() {
            Found::Gz
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
        found.push((entry.into_path(), found_here));
    }
    found.sort_unstable_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    let results: Vec<Check> = pool.install(|| {
        found
            .par_iter()
            .map_init(
                || vec![0u8; BUF_SIZE],
                |buf, (p, f)| match f {
                    Found::Gz => test_gz(p, buf),
                    Found::NotChecked(why) => Check::Unreadable(why.clone()),
                },
            )
            .collect()
    });
    let mut report = Report::default();
    let mut lines = Vec::with_capacity(found.len());
    for ((path, _), result) in found.iter().zip(results) {
        let status = tally(&mut report, &result);
        lines.push((path.as_os_str().as_bytes().to_vec(), status));
    }
    (report, lines)
}

/// Decompresses a whole .gz file, checking every member's CRC-32 and length like `gzip -t`.
pub(crate) fn test_gz(path: &Path, buf: &mut [u8]) -> Check {
    let input = match InputFile::open(path, false) {
        Ok(f) => f,
        Err(OpenError::NotRegular(what)) => {
            return Check::Unreadable(format!("not a regular file ({what})"))
        }
        Err(OpenError::Failed(e)) => return Check::Unreadable(e.message),
    };
    test_gz_stream(BufReader::with_capacity(BUF_SIZE, input), buf)
}

/// Tests a gzip stream read from `r`. Any byte sequence gives a verdict, never a panic.
pub(crate) fn test_gz_stream(mut r: impl BufRead, buf: &mut [u8]) -> Check {
    match r.fill_buf() {
        Ok([]) => return Check::Failed("empty file: unexpected end of file".into()),
        Ok(_) => {}
        Err(e) => return Check::Unreadable(format!("reading: {e}")),
    }
    let mut dec = MultiGzDecoder::new(r);
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

        /// Manifest lines of any bytes parse or are rejected, never panic.
        #[test]
        fn manifest_lines_never_panic(line in prop::collection::vec(any::<u8>(), 0..200)) {
            for algo in HashAlgo::ALL {
                let _ = crate::manifest::parse_line(&line, algo);
            }
        }
    }
}
