//! The one place demos print through, so every demo reads the same: a header with its name
//! and claim, indented info/event/timing lines, `why:` notes, and a `check` line per claim.
//! Integration tests match on these prefixes (`time `, `check `, `ok`), so keep them stable.

use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `-q`: nothing on stdout; a failed check alone is said, on stderr, as errors are.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Makes every demo quiet from now on (`filepipe -q demo ...`).
pub(crate) fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Writes one line to stdout, unless `-q` was given. Unlike `println!` it does not panic when
/// stdout is gone (`filepipe demo ... | head`): the demo still runs to its end, just unheard.
macro_rules! say {
    ($($arg:tt)*) => {{
        if !QUIET.load(Ordering::Relaxed) {
            let _ = writeln!(std::io::stdout().lock(), $($arg)*);
        }
    }};
}

/// Prints the demo's banner: its name and, from `--list`, what it shows.
pub(crate) fn header(name: &str) {
    let about = super::demo_list()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| a)
        .unwrap_or_default();
    say!("== filepipe demo {name} ==");
    say!("   {about}");
}

/// Prints an indented line of plain information.
pub(crate) fn info(text: impl Display) {
    say!("  {text}");
}

/// Prints something that happened `at` (time since the demo's start) while it ran.
pub(crate) fn event(at: Duration, text: impl Display) {
    say!("  [{:>9}] {text}", fmt_duration(at));
}

/// Prints one timing line: what was timed, how long it took, and a free-form detail.
pub(crate) fn timing(label: &str, took: Duration, detail: impl Display) {
    say!("  time  {label:<26} {:>9}  {detail}", fmt_duration(took));
}

/// Prints an explanation of why the result looks the way it does, wrapped to fit a terminal.
pub(crate) fn note(text: impl Display) {
    for (i, line) in wrap(&text.to_string(), NOTE_WIDTH).iter().enumerate() {
        let lead = if i == 0 { "why:" } else { "" };
        say!("  {lead:<4}  {line}");
    }
}

const NOTE_WIDTH: usize = 90;

/// Greedy word wrap to lines of at most `width` characters (longer words stand alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// `base / took`, the speed-up of `took` over `base` (0 when `took` is zero).
pub(crate) fn speedup(base: Duration, took: Duration) -> f64 {
    if took.is_zero() {
        0.0
    } else {
        base.as_secs_f64() / took.as_secs_f64()
    }
}

/// Human-sized duration: seconds above one second, else milliseconds, else microseconds.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else if d >= Duration::from_millis(1) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{} µs", d.as_micros())
    }
}

/// Collects the demo's checks of its own claims; the demo's exit code is their verdict.
#[derive(Debug)]
pub(crate) struct Checks {
    all_ok: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Self { all_ok: true }
    }
}

impl Checks {
    /// Prints `check <claim>: ok` or `: FAILED` and remembers a failure. Under `-q` a failure
    /// is still said, on stderr: the exit code alone would not tell which claim failed.
    pub(crate) fn check(&mut self, claim: impl Display, ok: bool) {
        say!("  check {claim}: {}", if ok { "ok" } else { "FAILED" });
        if !ok && QUIET.load(Ordering::Relaxed) {
            let _ = writeln!(
                std::io::stderr().lock(),
                "filepipe: demo check {claim}: FAILED"
            );
        }
        self.all_ok &= ok;
    }

    /// Success when every check held.
    pub(crate) fn exit_code(&self) -> ExitCode {
        if self.all_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_use_a_readable_unit() {
        assert_eq!(fmt_duration(Duration::from_millis(2500)), "2.50 s");
        assert_eq!(fmt_duration(Duration::from_micros(12_340)), "12.3 ms");
        assert_eq!(fmt_duration(Duration::from_micros(7)), "7 µs");
    }

    #[test]
    fn wrap_keeps_words_whole_and_lines_short() {
        let lines = wrap("aa bb cc dd", 5);
        assert_eq!(lines, vec!["aa bb", "cc dd"]);
        assert_eq!(wrap("abcdefgh ij", 4), vec!["abcdefgh", "ij"]);
        assert!(wrap("", 10).is_empty());
    }

    #[test]
    fn speedup_guards_zero() {
        assert_eq!(speedup(Duration::from_secs(2), Duration::ZERO), 0.0);
        assert_eq!(speedup(Duration::from_secs(2), Duration::from_secs(1)), 2.0);
    }
}
