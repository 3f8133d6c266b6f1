//! What an incremental batch (`batch --state`) takes from the state for a file its walk found
//! with a stamp: every result of the run recorded for that stamp (the file is not read), some
//! of them (it is read once, for the others only), or none.
//!
//! A compressor's recorded result stands only while its output is still in place, a regular
//! file dated as the input, as the op's own up-to-date test has it: an output deleted or
//! replaced since is made again. With `--force` (redo every output), `--remove-source` or
//! `--move-source` (an input still here is one whose removal or move is still to be done), the
//! compressor's result never stands; the hashes' recorded digests still do. An output the
//! state says filepipe made for an earlier version of a file that changed, and that is still the
//! one it made, is replaced, as watch mode replaces it (`replaces`).

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::state::{Known, Lacks};
use crate::travel::Stamp;

/// What the run does with a file the state knew as `known`, found now with `stamp`:
/// `Lacks::Nothing` gives the outcome without a read (`unchanged`), the others a job whole or
/// for the missing results. Everything is read again with `--rehash`.
pub(crate) fn lacks(cfg: &Config, known: &Known, rel: &Path, stamp: Option<Stamp>) -> Lacks {
    let Some(incremental) = &cfg.incremental else {
        return Lacks::All;
    };
    // One of the compressor's own outputs with its input beside it is no input: the op skips
    // it, whatever the state recorded when its input was away (found by review: the
    // incremental manifest listed `a.gz` where a stateless run skips it).
    if incremental.rehash || own_output_beside(cfg, rel) {
        return Lacks::All;
    }
    // Over a `--max-size` given since it was recorded: the workers skip it unread, as a run
    // without the state does (found by a review: its recorded result stood, and the manifest
    // listed it).
    if over_max_size(cfg, stamp) {
        return Lacks::All;
    }
    let lacks = known.lacks(&cfg.spec, stamp, |made_output| {
        // A compressor's row without an output is a file it left alone (already compressed,
        // only hashed): nothing of its own to check.
        !made_output || output_in_place(cfg, rel, stamp)
    });
    judged(cfg, known, rel, lacks)
}

/// Whether a file found with `stamp` is larger than `--max-size` (`max_size`): the workers
/// skip it unread (`over-max-size`), whatever the state recorded for it.
pub(crate) fn over_max_size(cfg: &Config, stamp: Option<Stamp>) -> bool {
    cfg.max_size
        .is_some_and(|max| stamp.is_some_and(|s| s.size > max))
}

/// `lacks` with a partial job's `replaces` set, for batch and watch alike: a file read for some
/// results because it has not changed is done whole should it have changed by the time it is
/// opened, and its output is then replaced by the rule a changed file's is (`replaces`),
/// judged now for the version recorded.
pub(crate) fn judged(cfg: &Config, known: &Known, rel: &Path, lacks: Lacks) -> Lacks {
    match lacks {
        Lacks::Part(mut only) => {
            only.replaces = made_for(cfg, known, rel).is_some_and(|m| m == only.stamp.mtime_ns);
            Lacks::Part(only)
        }
        other => other,
    }
}

/// Whether the compressor may replace the output it finds for `rel`, a file the state knew as
/// `known`, found now with `stamp`: only the very output filepipe made for an earlier version
/// of it, as watch mode replaces it. So the state must record the version an output was made
/// for (`Record::made_mtime`, kept through later failures: a retry after one replaces its own
/// old output), the file must not be recorded done as it is now (or another hand changed the
/// output), and the output there now must still be the one made then: a regular file dated as
/// that version (filepipe dates an output as its input). One that is not (another `--out`, or
/// a file someone put there, refused once and refused again) is not replaced: `--force` does
/// that.
pub(crate) fn replaces(cfg: &Config, known: &Known, rel: &Path, stamp: Option<Stamp>) -> bool {
    let done_now = compressor_record(cfg, known).is_some_and(|r| r.done_as(stamp));
    !done_now && made_for(cfg, known, rel).is_some()
}

/// Watch mode's rule for a whole job of `rel`, a file the state knew as `known`, found with
/// `stamp`: an output filepipe made for an earlier version may be replaced once the file
/// changed, even after failed attempts since (a retry of a change must not meet its own old
/// output as another's). A file whose compressor's row is done for this very stamp is read
/// again for a reason its stamp cannot show (it was in flight at an overflow, or written to
/// while read): its output is replaced if it is still the one made for this version, dated
/// as it. Otherwise such a file is taken only because its output went while nobody watched
/// (`output_gone`), and whatever is at the output's name now (nothing, a file another hand
/// put there, or one under a new `--out`) is not filepipe's to replace.
pub(crate) fn watch_replaces(
    cfg: &Config,
    known: &Known,
    rel: &Path,
    stamp: Option<Stamp>,
) -> bool {
    let Some(r) = compressor_record(cfg, known).filter(|r| r.made_output) else {
        return false;
    };
    if r.done_as(stamp) {
        return output_stands(cfg, rel, stamp);
    }
    // Changed (or failed since): the output made for the recorded version, if it is still the
    // one there. A failure recorded by a filepipe from before that version was kept
    // (`made_mtime` unknown) tells nothing: not replaced, as a batch does not (`--force` does
    // it), rather than risk a file another hand put there.
    r.made_mtime
        .is_some_and(|made| output_dated(cfg, rel, made))
}

/// The compressor's row of a file the state knew as `known`, if the run has a compressor.
fn compressor_record<'k>(cfg: &Config, known: &'k Known) -> Option<&'k crate::state::Record> {
    cfg.spec.compressor().and_then(|c| known.record(c))
}

/// The mtime of the version of `rel` (a file the state knew as `known`) whose output filepipe
/// made, when the output there now is still that one (dated as it): the output a later
/// version may replace (`replaces`).
fn made_for(cfg: &Config, known: &Known, rel: &Path) -> Option<i64> {
    compressor_record(cfg, known)
        .filter(|r| r.made_output)
        .and_then(|r| r.made_mtime)
        .filter(|&made| output_dated(cfg, rel, made))
}

/// Whether the compressor's output of `rel`, a file the state knew as `known`, is recorded
/// made for the version found with `stamp` but is no longer in place (deleted, or replaced by
/// another hand): watch mode's scans take such a file, settled as it otherwise is, so that the
/// output is made again, as an incremental batch makes it (`lacks`). `--force` and a disposed
/// input change nothing here: a watch redoes no output it finds in place.
pub(crate) fn output_gone(cfg: &Config, known: &Known, rel: &Path, stamp: Option<Stamp>) -> bool {
    cfg.spec
        .compressor()
        .and_then(|c| known.record(c))
        .is_some_and(|r| r.done_as(stamp) && r.made_output && !output_stands(cfg, rel, stamp))
}

/// Whether the compressor's output for `rel` is in place for the version found with `stamp`
/// (dated as it), whatever `--force` says: watch mode's test of a recorded output, where a
/// batch's is `output_in_place`.
pub(crate) fn output_stands(cfg: &Config, rel: &Path, stamp: Option<Stamp>) -> bool {
    stamp.is_some_and(|stamp| output_dated(cfg, rel, stamp.mtime_ns))
}

/// The input `rel` is named as the compressor's output of, outputs beside their inputs (no
/// `--out`): `x` for `x.gz`. `None` for a name without the suffix, or one that names no file
/// (`.gz`, `dir/.gz`).
pub(crate) fn input_of_output(cfg: &Config, rel: &Path) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let suffix = cfg.spec.compressor().and_then(|c| c.suffix())?;
    if cfg.out.is_some() {
        return None;
    }
    let stem = rel.as_os_str().as_bytes().strip_suffix(suffix.as_bytes())?;
    if stem.is_empty() || stem.ends_with(b"/") {
        return None;
    }
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(stem)))
}

/// Whether `rel` is named as one of the compressor's own outputs next to its input (outputs
/// beside their inputs, no `--out`), and that input is there: a regular file, or with
/// `--follow-symlinks` a link (not followed here: nothing outside the root is looked at). The
/// op's own rule (`CompressOp::input_beside`, beneath the root's descriptor) decides; this
/// one only sends such a file to it rather than take the state's word, and errs that way.
pub(crate) fn own_output_beside(cfg: &Config, rel: &Path) -> bool {
    input_of_output(cfg, rel).is_some_and(|input| input_beside(cfg, &input))
}

/// Whether `input` (relative to the root) is there as an input of the compressor's: a regular
/// file, or with `--follow-symlinks` a link (see `own_output_beside`).
pub(crate) fn input_beside(cfg: &Config, input: &Path) -> bool {
    std::fs::symlink_metadata(cfg.root.join(input))
        .is_ok_and(|m| m.is_file() || cfg.follow_symlinks && m.file_type().is_symlink())
}

/// Whether the compressor's output for `rel` may be taken as made for the input found with
/// `stamp` (see the module's comment).
fn output_in_place(cfg: &Config, rel: &Path, stamp: Option<Stamp>) -> bool {
    if cfg.force || cfg.remove_source || cfg.move_source.is_some() {
        return false;
    }
    stamp.is_some_and(|stamp| output_dated(cfg, rel, stamp.mtime_ns))
}

/// Whether the compressor's output for `rel` is a regular, non-empty file dated `mtime_ns`, as
/// filepipe dates each output it makes (the input version's mtime).
fn output_dated(cfg: &Config, rel: &Path, mtime_ns: i64) -> bool {
    let Some(name) = cfg.op.output_name(rel) else {
        return false;
    };
    let Ok(st) = rustix::fs::lstat(cfg.out_root().join(name)) else {
        return false;
    };
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
        && st.st_size > 0
        && crate::fsio::output::dated_as(crate::fsio::output::times_of(&st), mtime_ns)
}
