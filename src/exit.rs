//! Exit codes, one place, so scripts and systemd can rely on them.

use std::process::ExitCode;

/// Every file done or deliberately skipped.
pub(crate) const SUCCESS: u8 = 0;
/// Some files failed (each is in the log), or a run-time error stopped the run.
pub(crate) const FAILURES: u8 = 1;
/// The invocation or the configuration is wrong; nothing was processed.
pub(crate) const USAGE: u8 = 2;
/// `verify`: files listed in the manifest are missing from the tree. A bit, with
/// `VERIFY_ADDED` and `FAILURES`, so one status tells every kind of difference found (a bit
/// of its own, never 2: a usage error stays distinct).
pub(crate) const VERIFY_MISSING: u8 = 4;
/// `verify`: files in the tree are not listed in the manifest. See `VERIFY_MISSING`.
pub(crate) const VERIFY_ADDED: u8 = 8;

/// The code for a run interrupted by `signal` (130 for SIGINT, 143 for SIGTERM).
pub(crate) fn interrupted(signal: i32) -> ExitCode {
    ExitCode::from(u8::try_from(128 + signal).unwrap_or(FAILURES))
}
