//! tracing setup: human lines on stderr, and the JSON-lines failure log.
//!
//! Every skipped or failed file is one tracing event with target `filepipe::failures` and the
//! fields `status`, `path` (lossy UTF-8), `path_hex` (exact bytes, only for non-UTF-8 paths),
//! `op`, `error` (the kind), `errno` (when there is one), `run` and the message. The stderr
//! layer shows them filtered by `-v`/`-q`/`RUST_LOG`; the failure-log layer records all of them,
//! whatever the stderr verbosity. The failure log is appended to, never truncated (a service
//! restarted by systemd keeps its record), and each run starts with a `"status":"start"`
//! record; `run` tells the runs apart.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::filter::{filter_fn, EnvFilter, LevelFilter};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::prelude::*;

/// The target of per-file records.
pub(crate) const FAILURES: &str = "filepipe::failures";

/// `eprintln!` that never panics: a line for a stderr that cannot take it (a log on a full
/// disk, `2>/dev/full`) is lost, and the run keeps its exit status. `eprintln!` panicked, and
/// an error exit (1 or 2) became 101 (review r58).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use say;

/// Installs the global subscriber. `verbosity`: -1 quiet, 0 default, 1+ verbose.
pub(crate) fn init(verbosity: i8, failure_log: Option<&Path>) -> Result<()> {
    let default = match verbosity {
        i8::MIN..=-1 => LevelFilter::ERROR,
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        2 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    // Quiet still says which files failed, and why (as `gzip -q` and `sha256sum -c --quiet`
    // do): only their `warn` records, not the skipped files' `info` ones. Before, `-q` left a
    // failed run's stderr empty, its exit status the only word of it.
    let var = std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_default();
    let directives = match (var.is_empty(), verbosity < 0) {
        (true, true) => format!("error,{FAILURES}=warn"),
        _ => var,
    };
    let env = EnvFilter::builder()
        .with_default_directive(default.into())
        .parse_lossy(directives);
    // No colours: with them, the escapes on a line would be tracing's own and a name's
    // alike, and a name's could drive the terminal (set its title, say: found by a review).
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(HumanStderr)
        .fmt_fields(HumanFields)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_filter(env);
    let failures = match failure_log {
        Some(path) => {
            let file = open_failure_log(path, true)
                .with_context(|| format!("cannot open failure log {}", path.display()))?
                .context("the failure log is not there")?;
            // Each event is formatted whole, then written with one write(2) to an unbuffered
            // file: lines never tear, and nothing is left in a buffer if the process dies.
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_target(false)
                    .with_writer(Mutex::new(file))
                    .with_filter(filter_fn(|m| m.target() == FAILURES)),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(failures)
        .try_init()
        .context("installing the logger")?;
    let command = std::env::args_os()
        .map(|a| crate::secret::redact(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info!(
        target: FAILURES,
        status = "start",
        run = run_id(),
        pid = std::process::id(),
        version = env!("CARGO_PKG_VERSION"),
        command,
        "run started"
    );
    Ok(())
}

/// Opens the failure log `path` for appending, made (`0600`, less the umask) if `create` and
/// missing: `None` if it is not there and not to be made (`check-config`).
///
/// The log is often kept where others may write (the tree, `/tmp`): one who put a symlink or
/// a hard link at its name would have had filepipe, as root, append to any file they chose,
/// and a file of their own there would have them read every record (the names in a tree they
/// may not list). So it is opened beneath its directory, reached by its canonical path with
/// no symlink on it (`fsio::canonical`); a symlink at its name is followed only if it is
/// filepipe's user's (or root's), as `fs.protected_symlinks` follows one in a sticky
/// directory; and it must be a regular file of filepipe's user with one link. Made `0600`:
/// the records name files in trees others may not list; an operator may open an existing
/// log to others with `chmod`, which is kept.
pub(crate) fn open_failure_log(path: &Path, create: bool) -> Result<Option<File>> {
    use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
    use rustix::io::Errno;
    // O_APPEND: whole lines land at the end whoever else writes the file, even another
    // filepipe sharing it. O_NONBLOCK: a FIFO put there fails at once (ENXIO, no reader)
    // rather than blocking the start; it is cleared below for the file.
    let flags = OFlags::WRONLY
        | OFlags::APPEND
        | OFlags::NOFOLLOW
        | OFlags::CLOEXEC
        | OFlags::NOCTTY
        | OFlags::NONBLOCK;
    let me = rustix::process::geteuid().as_raw();
    let mut path = path.to_path_buf();
    let mut hops = 0;
    let fd = loop {
        let name = path
            .file_name()
            .with_context(|| format!("{} is not a file name", path.display()))?
            .to_owned();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir_path = crate::fsio::canonical::resolve(parent)
            .with_context(|| format!("cannot open directory {}", parent.display()))?;
        let dir = crate::fsio::canonical::open(
            &dir_path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
        .map_err(|e| {
            if crate::fsio::canonical::is_symlink_on_path(e) {
                anyhow::anyhow!(
                    "a symlink was put on the path of {} while it was opened",
                    dir_path.display()
                )
            } else {
                anyhow::Error::new(std::io::Error::from(e))
                    .context(format!("cannot open directory {}", dir_path.display()))
            }
        })?;
        let opened = if create {
            rfs::openat(
                &dir,
                &name,
                flags | OFlags::CREATE,
                Mode::from_raw_mode(0o600),
            )
        } else {
            rfs::openat(&dir, &name, flags, Mode::empty())
        };
        match opened {
            Err(Errno::NOENT) if !create => return Ok(None),
            Err(Errno::LOOP) => {
                let link = rfs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)?;
                if link.st_uid != me && link.st_uid != 0 {
                    anyhow::bail!(
                        "{} is a symlink of uid {}: filepipe follows only its own user's or root's to its failure log",
                        dir_path.join(&name).display(),
                        link.st_uid
                    );
                }
                hops += 1;
                if hops > 8 {
                    anyhow::bail!("too many levels of symbolic links");
                }
                let to = rfs::readlinkat(&dir, &name, Vec::new())?;
                path = dir_path.join(std::ffi::OsStr::from_bytes(to.as_bytes()));
            }
            Err(Errno::NXIO) => anyhow::bail!("not a regular file"),
            Err(e) => return Err(std::io::Error::from(e).into()),
            Ok(fd) => break fd,
        }
    };
    let st = rfs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        anyhow::bail!("not a regular file");
    }
    if st.st_uid != me {
        anyhow::bail!(
            "it belongs to uid {}, not to filepipe's user (uid {me}): whoever owns it would read every record, and may have linked it to another file",
            st.st_uid
        );
    }
    if st.st_nlink != 1 {
        anyhow::bail!(
            "it has {} hard links: it may be another file under a second name",
            st.st_nlink
        );
    }
    let flags = rfs::fcntl_getfl(&fd)?;
    rfs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)?;
    Ok(Some(File::from(fd)))
}

/// This run's identity in the failure log: its start time and process id, as
/// `20261202T195500Z-4242`.
pub(crate) fn run_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let compact: String = utc_now()
            .chars()
            .filter(|c| *c != '-' && *c != ':')
            .collect();
        format!("{compact}-{}", std::process::id())
    })
}

/// The current time in UTC, as RFC 3339 to the second (`2026-12-02T19:55:00Z`).
pub(crate) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `text` with its control characters (C0, DEL and C1) shown escaped, for a terminal or the
/// journal: a file name may hold any of them (the progress bar shows names).
pub(crate) fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push('\t'),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The human lines' fields as tracing writes them, except that a value given by `Display` or
/// `Debug` (a path, a directory, an error) is quoted and escaped like a string field unless it
/// is one plain word: `path=a b op="x"` read as a path `a`, a field `b` and a forged `op`
/// (found by a review); and a message with `=` in it is quoted whole. The JSON failure log
/// records the values themselves.
struct HumanFields;

impl<'a> MakeVisitor<Writer<'a>> for HumanFields {
    type Visitor = HumanVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        HumanVisitor(DefaultVisitor::new(target, true))
    }
}

/// See `HumanFields`.
struct HumanVisitor<'a>(DefaultVisitor<'a>);

impl Visit for HumanVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.record_str(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            // A message quotes names too ("X exists and is not this file's output"): one
            // that holds `=` is quoted whole, or a name could forge fields ahead of the real
            // ones (found by a review).
            let text = format!("{value:?}");
            return if text.contains('=') {
                self.0.record_debug(field, &format_args!("{text:?}"))
            } else {
                self.0.record_debug(field, value)
            };
        }
        let text = format!("{value:?}");
        if plain_word(&text) {
            self.0.record_debug(field, &format_args!("{text}"));
        } else {
            self.0.record_str(field, &text);
        }
    }
}

impl VisitOutput<std::fmt::Result> for HumanVisitor<'_> {
    fn finish(self) -> std::fmt::Result {
        self.0.finish()
    }
}

impl VisitFmt for HumanVisitor<'_> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        self.0.writer()
    }
}

/// Whether `text` reads as one field value as it is: no space, quote, `=` or backslash.
fn plain_word(text: &str) -> bool {
    !text.is_empty()
        && !text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '\\'))
}

/// Stderr for the human lines, with the control characters a file name (or a message quoting
/// one) may hold shown escaped: a name with a newline forged a line of its own (a separate
/// journal entry under systemd, `ERROR` and all), and a terminal escape in one drove the
/// terminal (found by a review). Each event comes in one write: only its last newline is
/// kept. The failure log is JSON, escaped already.
struct HumanStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for HumanStderr {
    type Writer = EscapedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        EscapedStderr
    }
}

/// See `HumanStderr`.
struct EscapedStderr;

impl std::io::Write for EscapedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, "\n"),
            None => (buf, ""),
        };
        let text = String::from_utf8_lossy(body);
        let plain = !text.chars().any(|c| c.is_control() && c != '\t');
        let mut stderr = std::io::stderr().lock();
        if plain {
            stderr.write_all(buf)?;
        } else {
            stderr.write_all(shown(&text).as_bytes())?;
            stderr.write_all(end.as_bytes())?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
