//! `--move-source DIR` and `--move-failed DIR` end to end: the real binary over temp trees,
//! outputs checked with the real gzip, moved inputs compared byte for byte; the move on one
//! file system and across two (a tmpfs), name clashes, inputs that must stay (hard-linked,
//! changed), a SIGKILL between publish and move then a rerun, failed inputs moved aside,
//! watch mode and the service's config keys, and the refusals.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

fn p(x: &Path) -> &OsStr {
    x.as_os_str()
}

fn have_strace() -> bool {
    Command::new("strace").arg("-V").output().is_ok()
}

/// `filepipe batch <t's root> --op gzip --json ARGS...`.
fn gzip_batch(t: &TestTree, args: &[&OsStr]) -> Run {
    let root = t.root();
    let mut cmd = filepipe(&[s("batch"), p(&root), s("--op"), s("gzip"), s("--json")]);
    cmd.args(args);
    run(cmd)
}

/// `gzip -t` passes on `gz` and it gunzips to `want`.
fn assert_gz(gz: &Path, want: &[u8]) {
    let t = tool("gzip", &[s("-t"), p(gz)], Path::new("/"));
    assert!(t.status.success(), "gzip -t {}: {t:?}", gz.display());
    let back = tool("gunzip", &[s("-c"), p(gz)], Path::new("/"));
    assert_eq!(back.stdout, want, "{}", gz.display());
}

/// A tmpfs mounted on a fresh directory (another file system than the temp dir's), unmounted
/// when dropped; `Err` with the reason where it cannot be mounted (not root, no mount).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new() -> Result<Tmpfs, String> {
        if !is_root() {
            return Err("not root: cannot mount a tmpfs".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m,mode=0777", "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let fs = Tmpfs { dir };
        let (a, b) = (
            fs::metadata(fs.path()).unwrap().dev(),
            fs::metadata(std::env::temp_dir()).unwrap().dev(),
        );
        if a == b {
            return Err("the tmpfs is on the temp dir's own file system".into());
        }
        Ok(fs)
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Runs `filepipe ARGS` under strace, killed (SIGKILL) at its `when`th call named in `calls`,
/// with named temps (`FILEPIPE_TEMPS=named`), so that an output's publish is one rename
/// whatever the file system (no probe, no link). `None` where strace is missing.
fn killed_at(calls: &str, when: u32, args: &[&OsStr]) -> Option<Run> {
    if Command::new("strace").arg("-V").output().is_err() {
        return None;
    }
    let mut cmd =
        common::strace::filepipe_injected(&[format!("inject={calls}:signal=SIGKILL:when={when}")]);
    cmd.args(args).env("FILEPIPE_TEMPS", "named");
    Some(run(cmd))
}

#[test]
fn inputs_move_to_their_relative_path_once_their_outputs_are_published() {
    let t = TestTree::new()
        .file("a.log", &text_bytes(20_000, 1))
        .file("sub/deeper/b.log", &text_bytes(300_000, 2))
        .file("empty.txt", b"");
    let a_mtime = fs::metadata(t.path("a.log")).unwrap().modified().unwrap();
    let done = t.side("done");
    let sum = gzip_batch(&t, &[s("--move-source"), p(&done)])
        .code(0)
        .summary();
    assert_eq!(sum["done"], 3, "{sum}");
    for (rel, data) in [
        ("a.log", text_bytes(20_000, 1)),
        ("sub/deeper/b.log", text_bytes(300_000, 2)),
        ("empty.txt", Vec::new()),
    ] {
        assert!(!t.path(rel).exists(), "{rel} left in the tree");
        assert_eq!(fs::read(done.join(rel)).unwrap(), data, "{rel} moved whole");
        assert_gz(&t.path(format!("{rel}.gz")), &data);
    }
    // Moved, not copied: the same file, dates and all.
    let moved = fs::metadata(done.join("a.log")).unwrap();
    assert_eq!(moved.modified().unwrap(), a_mtime);
    // Nothing but the moved files under DIR (no temp, no numbered name).
    let mut under: Vec<_> = walkdir::WalkDir::new(&done)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().strip_prefix(&done).unwrap().to_path_buf())
        .collect();
    under.sort();
    let want: Vec<PathBuf> = ["a.log", "empty.txt", "sub/deeper/b.log"]
        .iter()
        .map(PathBuf::from)
        .collect();
    assert_eq!(under, want);
    // A rerun finds nothing to do: the moved inputs are not in the tree any more.
    let again = gzip_batch(&t, &[s("--move-source"), p(&done)])
        .code(0)
        .summary();
    assert_eq!(again["done"], 0, "{again}");
}

#[test]
fn an_incremental_batch_still_moves_inputs_its_state_knows_as_done() {
    let t = TestTree::new()
        .file("a.log", &text_bytes(20_000, 12))
        .file("sub/b.log", &text_bytes(7_000, 13));
    let (state, done) = (t.side("state"), t.side("done"));
    let first = gzip_batch(&t, &[s("--state"), p(&state)]).code(0).summary();
    assert_eq!(first["done"], 2, "{first}");
    // Unchanged since, outputs in place: the state alone would call them done. An input
    // still here is one whose move is still to be done.
    let sum = gzip_batch(&t, &[s("--state"), p(&state), s("--move-source"), p(&done)])
        .code(0)
        .summary();
    assert_eq!(sum["done"], 2, "{sum}");
    for (rel, data) in [
        ("a.log", text_bytes(20_000, 12)),
        ("sub/b.log", text_bytes(7_000, 13)),
    ] {
        assert!(!t.path(rel).exists(), "{rel} not moved");
        assert_eq!(fs::read(done.join(rel)).unwrap(), data);
        assert_gz(&t.path(format!("{rel}.gz")), &data);
    }
}

#[test]
fn a_name_taken_in_the_move_directory_gets_a_number_never_an_overwrite() {
    let t = TestTree::new()
        .file("a.log", b"third a.log\n")
        .file("README", b"third README\n");
    let done = t.side("done");
    fs::create_dir(&done).unwrap();
    fs::write(done.join("a.log"), b"first a.log\n").unwrap();
    fs::write(done.join("a.1.log"), b"second a.log\n").unwrap();
    fs::write(done.join("README"), b"first README\n").unwrap();
    gzip_batch(&t, &[s("--move-source"), p(&done)])
        .code(0)
        .summary();
    assert_eq!(fs::read(done.join("a.log")).unwrap(), b"first a.log\n");
    assert_eq!(fs::read(done.join("a.1.log")).unwrap(), b"second a.log\n");
    assert_eq!(fs::read(done.join("a.2.log")).unwrap(), b"third a.log\n");
    assert_eq!(fs::read(done.join("README")).unwrap(), b"first README\n");
    assert_eq!(fs::read(done.join("README.1")).unwrap(), b"third README\n");
    assert!(!t.path("a.log").exists() && !t.path("README").exists());
}

#[test]
fn hard_linked_and_changed_inputs_are_kept_and_said_so() {
    let t = TestTree::new()
        .file("linked.log", b"two names\n")
        .file("plain.log", &text_bytes(5_000, 3));
    fs::hard_link(t.path("linked.log"), t.side("other-name")).unwrap();
    let done = t.side("done");
    let log = t.side("failures.jsonl");
    let sum = gzip_batch(
        &t,
        &[s("--move-source"), p(&done), s("--failure-log"), p(&log)],
    )
    .code(0)
    .summary();
    assert_eq!(sum["done"], 2, "{sum}");
    assert!(
        t.path("linked.log").exists(),
        "a hard-linked input must stay"
    );
    assert!(!done.join("linked.log").exists());
    assert_gz(&t.path("linked.log.gz"), b"two names\n");
    assert!(done.join("plain.log").exists() && !t.path("plain.log").exists());
    let records = failure_log(&log);
    let kept = records_of(&records, "hard-linked");
    assert_eq!(kept.len(), 1, "{records:?}");
    assert_eq!(kept[0]["status"], "kept");
    assert_eq!(kept[0]["path"], "linked.log");
    // (An input changed between its read and its move is kept too: see the unit test
    // `move_source_moves_only_inputs_unchanged_since_they_were_read` in ops/compress.rs, which
    // changes it at that very instant.)
}

#[test]
fn where_rename_noreplace_is_refused_the_move_is_a_link_then_an_unlink() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("SKIPPED: no strace to refuse RENAME_NOREPLACE");
        return;
    }
    let t = TestTree::new().file("a.log", b"moved by a link\n");
    let done = t.side("done");
    fs::create_dir(&done).unwrap();
    fs::write(done.join("a.log"), b"someone else's\n").unwrap();
    let root = t.root();
    // As on a file system without RENAME_NOREPLACE (EINVAL): the output's rename (named
    // temps) goes through, the move's is refused.
    let mut cmd = common::strace::filepipe_injected(&["inject=renameat2:error=EINVAL:when=2"]);
    cmd.args([s("batch"), p(&root), s("--op"), s("gzip"), s("--json")])
        .args([s("--move-source"), p(&done)])
        .env("FILEPIPE_TEMPS", "named");
    let sum = run(cmd).code(0).summary();
    assert_eq!(sum["done"], 1, "{sum}");
    assert_eq!(sum["warnings"], 0, "{sum}");
    assert!(!t.path("a.log").exists());
    assert_eq!(fs::read(done.join("a.log")).unwrap(), b"someone else's\n");
    assert_eq!(
        fs::read(done.join("a.1.log")).unwrap(),
        b"moved by a link\n"
    );
    assert_eq!(fs::metadata(done.join("a.1.log")).unwrap().nlink(), 1);
    assert_gz(&t.path("a.log.gz"), b"moved by a link\n");
}

/// An input another process holds open for writing (a live log) keeps its name: removed, or
/// moved to another file system, what its writer writes next would go to a file no name leads
/// to (found by a review: `--remove-source` removed it, and the writer's next line was lost).
/// A move by rename on the same file system takes the writer's file along, and is done.
#[test]
fn an_input_still_open_for_writing_is_not_removed_or_copied_away() {
    use std::io::Write;
    let tmpfs = Tmpfs::new();
    let mut cases = vec![
        ("remove", vec![s("--remove-source")]),
        ("move here", vec![s("--move-source")]),
    ];
    match &tmpfs {
        Ok(_) => cases.push(("move across", vec![s("--move-source")])),
        Err(why) => eprintln!("SKIPPED (the move across file systems): {why}"),
    }
    for (what, mut args) in cases {
        let t = TestTree::new().file("live.log", b"line 1\n");
        let dest = match (what, &tmpfs) {
            ("move across", Ok(fs)) => fs.path().join("done"),
            _ => t.side("done"),
        };
        if what != "remove" {
            args.push(p(&dest));
        }
        let log = t.side("failures.jsonl");
        args.extend([s("--failure-log"), p(&log)]);
        let mut writer = fs::File::options()
            .append(true)
            .open(t.path("live.log"))
            .unwrap();
        let sum = gzip_batch(&t, &args).code(0).summary();
        assert_eq!(sum["done"], 1, "{what}: {sum}");
        assert_gz(&t.path("live.log.gz"), b"line 1\n");
        writer.write_all(b"line 2\n").unwrap();
        drop(writer);
        if what == "move here" {
            assert_eq!(
                fs::read(dest.join("live.log")).unwrap(),
                b"line 1\nline 2\n"
            );
            continue;
        }
        assert_eq!(
            fs::read(t.path("live.log")).unwrap(),
            b"line 1\nline 2\n",
            "{what}: the writer's line is lost"
        );
        let records = failure_log(&log);
        let kept = records_of(&records, "in-use");
        assert_eq!(kept.len(), 1, "{what}: {records:?}");
        assert_eq!(kept[0]["status"], "kept", "{what}");
    }
}

/// Where the kernel cannot tell whether an input is still written (another user's file, no
/// `CAP_LEASE`), the input goes as before, and the run says once that it cannot tell.
#[test]
fn where_writers_cannot_be_seen_the_run_says_so_once() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to run as another user than the files' owner");
        return;
    }
    let t = TestTree::new()
        .file("a.log", b"root's\n")
        .file("b.log", b"root's too\n");
    t.open_to_all();
    let mut cmd = unprivileged();
    cmd.args([
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("gzip"),
        s("--remove-source"),
    ]);
    let out = run(cmd);
    out.success();
    assert!(!t.path("a.log").exists() && !t.path("b.log").exists());
    let said = out.stderr();
    let told = "cannot tell whether an input is still open for writing before it is removed or \
                moved to another file system (filepipe is not its owner, and lacks CAP_LEASE)";
    assert_eq!(said.matches(told).count(), 1, "{said}");
}

#[test]
fn across_file_systems_the_input_is_copied_synced_and_verified_before_it_goes() {
    let fs = match Tmpfs::new() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let t = TestTree::new()
        .file("a.log", &text_bytes(200_000, 4))
        .file("sub/b.bin", &noise_bytes(3 << 20, 5))
        .file("c.log", b"c, again\n")
        .file("d.log", b"d, again\n");
    fs::set_permissions(
        t.path("a.log"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    let a_mtime = fs::metadata(t.path("a.log")).unwrap().modified().unwrap();
    let done = fs.path().join("done");
    // An earlier run stopped after it named its copy of c.log and before it unlinked c.log:
    // that copy (same name, date and bytes) is taken as this move's, not copied again.
    fs::create_dir(&done).unwrap();
    fs::write(done.join("c.log"), b"c, again\n").unwrap();
    let c_mtime = fs::metadata(t.path("c.log")).unwrap().modified().unwrap();
    fs::File::options()
        .write(true)
        .open(done.join("c.log"))
        .unwrap()
        .set_modified(c_mtime)
        .unwrap();
    // The same for d.log, but open to anyone's writes: not taken to be the only copy (found
    // by a review), which a fresh copy beside it is.
    fs::write(done.join("d.log"), b"d, again\n").unwrap();
    let d_mtime = fs::metadata(t.path("d.log")).unwrap().modified().unwrap();
    let open = fs::File::options()
        .write(true)
        .open(done.join("d.log"))
        .unwrap();
    open.set_modified(d_mtime).unwrap();
    open.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .unwrap();
    let sum = gzip_batch(&t, &[s("--move-source"), p(&done)])
        .code(0)
        .summary();
    assert_eq!(sum["done"], 4, "{sum}");
    assert_eq!(fs::read(done.join("d.1.log")).unwrap(), b"d, again\n");
    assert_eq!(
        fs::metadata(done.join("d.1.log")).unwrap().mode() & 0o777,
        fs::metadata(done.join("c.log")).unwrap().mode() & 0o777,
        "the fresh copy has the input's mode"
    );
    assert_eq!(
        fs::read(done.join("a.log")).unwrap(),
        text_bytes(200_000, 4)
    );
    assert_eq!(
        fs::read(done.join("sub/b.bin")).unwrap(),
        noise_bytes(3 << 20, 5)
    );
    assert_eq!(fs::read(done.join("c.log")).unwrap(), b"c, again\n");
    assert!(
        !done.join("c.1.log").exists(),
        "the earlier copy was copied again"
    );
    for rel in ["a.log", "sub/b.bin", "c.log", "d.log"] {
        assert!(!t.path(rel).exists(), "{rel} left in the tree");
    }
    // The copy keeps the input's mode and mtime.
    let moved = fs::metadata(done.join("a.log")).unwrap();
    assert_eq!(moved.mode() & 0o777, 0o640);
    assert_eq!(moved.modified().unwrap(), a_mtime);
    assert_gz(&t.path("sub/b.bin.gz"), &noise_bytes(3 << 20, 5));
    assert!(temps_under(&done).is_empty(), "{:?}", temps_under(&done));
}

#[test]
fn sigkill_between_publish_and_move_loses_nothing_and_a_rerun_finishes_the_move() {
    let t = TestTree::new().file("a.log", &text_bytes(50_000, 6));
    let done = t.side("done");
    let root = t.root();
    let args = [
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--move-source"),
        p(&done),
    ];
    // The first rename publishes the output (its named temp to a.log.gz); the second is the
    // move.
    let Some(killed) = killed_at("renameat,renameat2", 2, &args) else {
        eprintln!("SKIPPED: no strace to kill the run at its move");
        return;
    };
    killed.signal(9);
    // Killed between the two: the output published and whole, the input still in place.
    assert_gz(&t.path("a.log.gz"), &text_bytes(50_000, 6));
    assert_eq!(fs::read(t.path("a.log")).unwrap(), text_bytes(50_000, 6));
    assert!(!done.join("a.log").exists());
    let gz_before = fs::metadata(t.path("a.log.gz")).unwrap();
    let mut cmd = filepipe(&[&args[..], &[s("--json")]].concat());
    cmd.current_dir("/");
    let sum = run(cmd).code(0).summary();
    assert_eq!(sum["done"], 1, "{sum}");
    assert!(
        !t.path("a.log").exists(),
        "the rerun did not finish the move"
    );
    assert_eq!(fs::read(done.join("a.log")).unwrap(), text_bytes(50_000, 6));
    // The rerun adopted the output (checked byte for byte), it did not compress again.
    let gz_after = fs::metadata(t.path("a.log.gz")).unwrap();
    assert_eq!(gz_before.ino(), gz_after.ino());
    assert_gz(&t.path("a.log.gz"), &text_bytes(50_000, 6));
}

#[test]
fn sigkill_after_a_copy_across_file_systems_is_named_then_the_rerun_only_unlinks() {
    let fs = match Tmpfs::new() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let t = TestTree::new().file("a.log", &text_bytes(80_000, 7));
    let done = fs.path().join("done");
    let root = t.root();
    let args = [
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--move-source"),
        p(&done),
    ];
    // Killed once the copy has its name in DIR, as the input's name is taken aside to be
    // removed: the fourth rename (the output's publish, the move's, refused with EXDEV, and
    // the copy's named temp to its name in DIR came before it).
    let Some(killed) = killed_at("renameat,renameat2", 4, &args) else {
        eprintln!("SKIPPED: no strace to kill the run at its unlink");
        return;
    };
    killed.signal(9);
    assert_eq!(fs::read(t.path("a.log")).unwrap(), text_bytes(80_000, 7));
    assert_eq!(fs::read(done.join("a.log")).unwrap(), text_bytes(80_000, 7));
    let sum = run(filepipe(&[&args[..], &[s("--json")]].concat()))
        .code(0)
        .summary();
    assert_eq!(sum["done"], 1, "{sum}");
    assert!(!t.path("a.log").exists());
    assert_eq!(fs::read(done.join("a.log")).unwrap(), text_bytes(80_000, 7));
    assert!(!done.join("a.1.log").exists(), "copied twice");
    assert_gz(&t.path("a.log.gz"), &text_bytes(80_000, 7));
}

/// A name of 253 bytes: its output's (`+ .gz`) is over NAME_MAX, a failure no retry mends.
const LONG_NAME: [u8; 253] = [b'n'; 253];

#[test]
fn inputs_that_failed_for_good_go_to_move_failed_and_the_log_says_where() {
    let t = TestTree::new()
        .file(LONG_NAME, b"named too long for its .gz\n")
        .file("sub/taken.log", b"its output's name is someone else's\n")
        .file("ok.log", b"fine\n");
    // Someone else's file where the output would go: a failure of the output, not of the
    // input, which stays.
    fs::write(t.path("sub/taken.log.gz"), b"not ours").unwrap();
    let failed = t.side("failed");
    let log = t.side("failures.jsonl");
    let sum = gzip_batch(
        &t,
        &[s("--move-failed"), p(&failed), s("--failure-log"), p(&log)],
    )
    .code(1)
    .summary();
    assert_eq!(sum["done"], 1, "{sum}");
    assert_eq!(sum["failed"], 2, "{sum}");
    let long = OsStr::from_bytes(&LONG_NAME);
    assert!(!t.root().join(long).exists(), "the failed input stayed");
    assert_eq!(
        fs::read(failed.join(long)).unwrap(),
        b"named too long for its .gz\n"
    );
    assert!(
        t.path("sub/taken.log").exists(),
        "moved for an output's fault"
    );
    assert!(!failed.join("sub").exists());
    assert!(
        t.path("ok.log").exists(),
        "a done input moves only with --move-source"
    );
    let records = failure_log(&log);
    let too_long = records_of(&records, "name-too-long");
    assert_eq!(too_long.len(), 1, "{records:?}");
    let msg = too_long[0]["message"].as_str().unwrap();
    let want = format!("input moved to {}", failed.join(long).display());
    assert!(msg.contains(&want), "{msg}");
}

#[test]
fn an_unreadable_input_goes_to_move_failed() {
    if !is_root() {
        eprintln!("SKIPPED: not root: cannot run as another user");
        return;
    }
    let t = TestTree::new()
        .file("secret.log", b"nobody may read this\n")
        .file("ok.log", b"fine\n");
    let failed = t.side("failed");
    fs::create_dir(&failed).unwrap();
    t.open_to_all();
    fs::set_permissions(&failed, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    fs::set_permissions(
        t.path("secret.log"),
        std::os::unix::fs::PermissionsExt::from_mode(0o200),
    )
    .unwrap();
    let root = t.root();
    let log = t.side("failures.jsonl");
    let mut cmd = unprivileged();
    cmd.args([s("batch"), p(&root), s("--op"), s("gzip"), s("--json")])
        .args([s("--move-failed"), p(&failed), s("--failure-log"), p(&log)])
        .env_remove("RUST_LOG");
    let sum = run(cmd).code(1).summary();
    assert_eq!(sum["failed"], 1, "{sum}");
    assert!(!t.path("secret.log").exists());
    assert_eq!(
        fs::read(failed.join("secret.log")).unwrap(),
        b"nobody may read this\n"
    );
    let records = failure_log(&log);
    let denied = records_of(&records, "permission-denied");
    assert_eq!(denied.len(), 1, "{records:?}");
    assert!(
        denied[0]["message"]
            .as_str()
            .unwrap()
            .contains("input moved to"),
        "{records:?}"
    );
}

#[test]
fn watch_mode_moves_each_processed_input_and_does_not_see_it_again() {
    let t = TestTree::new().file("before.log", &text_bytes(10_000, 8));
    let done = t.side("done");
    let log = t.side("failures.jsonl");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "gzip",
            "--move-source",
            done.to_str().unwrap(),
            "--failure-log",
            log.to_str().unwrap(),
        ],
    );
    d.wait_idle(1);
    fs::create_dir_all(t.path("sub")).unwrap();
    fs::write(t.path("sub/after.log"), text_bytes(40_000, 9)).unwrap();
    d.wait_idle(2);
    for (rel, data) in [
        ("before.log", text_bytes(10_000, 8)),
        ("sub/after.log", text_bytes(40_000, 9)),
    ] {
        assert!(!t.path(rel).exists(), "{rel} not moved");
        assert_eq!(fs::read(done.join(rel)).unwrap(), data);
        assert_gz(&t.path(format!("{rel}.gz")), &data);
    }
    // A new file under a moved one's name: its output's name holds the earlier file's
    // output, which filepipe no longer knows as its own (the earlier file left the tree, and
    // the state with it), so it is not overwritten: reported, and the input stays.
    fs::write(t.path("sub/after.log"), b"a second after.log\n").unwrap();
    wait_until(Duration::from_secs(60), "the second after.log", || {
        d.notes
            .last_status()
            .is_some_and(|s| s.idle() && s.failed == 1)
    });
    assert_eq!(
        fs::read(t.path("sub/after.log")).unwrap(),
        b"a second after.log\n"
    );
    assert!(!done.join("sub/after.1.log").exists());
    assert_gz(&t.path("sub/after.log.gz"), &text_bytes(40_000, 9));
    let sum = d.stop().summary();
    assert_eq!(sum["failed"], 1, "{sum}");
    // The moves were never taken for failures or deletions to complain about: the only
    // record is that one.
    let records = failure_log(&log);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["error"], "output-exists", "{records:?}");
}

#[test]
fn a_daemon_killed_between_publish_and_move_moves_the_input_when_started_again() {
    let t = TestTree::new().file("a.log", &text_bytes(30_000, 11));
    let (done, state) = (t.side("done"), t.side("state"));
    let root = t.root();
    let args = [
        s("watch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--settle"),
        s("100"),
        s("--state"),
        p(&state),
        s("--move-source"),
        p(&done),
    ];
    // The initial scan takes a.log: its output's rename, then its move, which is killed.
    let Some(killed) = killed_at("renameat,renameat2", 2, &args) else {
        eprintln!("SKIPPED: no strace to kill the daemon at its move");
        return;
    };
    killed.signal(9);
    assert_gz(&t.path("a.log.gz"), &text_bytes(30_000, 11));
    assert!(t.path("a.log").exists() && !done.join("a.log").exists());
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "gzip",
            "--state",
            state.to_str().unwrap(),
            "--move-source",
            done.to_str().unwrap(),
        ],
    );
    d.wait_idle(1);
    assert!(
        !t.path("a.log").exists(),
        "the restarted daemon did not move it"
    );
    assert_eq!(
        fs::read(done.join("a.log")).unwrap(),
        text_bytes(30_000, 11)
    );
    assert_gz(&t.path("a.log.gz"), &text_bytes(30_000, 11));
    let sum = d.stop().success().summary();
    assert_eq!(sum["failed"], 0, "{sum}");
}

#[test]
fn the_service_config_takes_move_source_and_move_failed_per_watch() {
    let t = TestTree::new()
        .file("a.log", &text_bytes(10_000, 10))
        .file(LONG_NAME, b"too long\n");
    let (done, failed) = (t.side("done"), t.side("failed"));
    let config = t.side("filepipe.toml");
    fs::write(
        &config,
        format!(
            "state_dir = {:?}\nsettle_ms = 100\n[[watch]]\npath = {:?}\nop = \"gzip\"\n\
             move_source = \"done\"\nmove_failed = \"failed\"\n",
            t.side("state"),
            t.root()
        ),
    )
    .unwrap();
    let socket = t.side("notify.sock");
    let n = Notifications::listen(&socket);
    let mut cmd = filepipe(&[s("watch"), s("--config"), p(&config), s("--json")]);
    cmd.env("NOTIFY_SOCKET", &socket)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = Started::new(cmd);
    // Relative to the config file.
    let long = OsStr::from_bytes(&LONG_NAME);
    wait_until(Duration::from_secs(60), "both files moved", || {
        done.join("a.log").exists() && failed.join(long).exists()
    });
    assert!(!t.path("a.log").exists());
    assert_gz(&t.path("a.log.gz"), &text_bytes(10_000, 10));
    assert!(n.has("READY=1"));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    // One file failed (and was moved aside): a stopped run with failures exits 1.
    let code = child.finish(Duration::from_secs(30)).output().status.code();
    assert!(matches!(code, Some(0 | 1)), "{code:?}");
}

#[test]
fn refusals_name_the_problem_and_touch_nothing() {
    let t = TestTree::new().file("a.log", b"x\n").dir("sub");
    let root = t.root();
    let done = t.side("done");
    let inside = t.path("sub/done");
    let sums = t.side("SUMS");
    let cases: Vec<(Vec<&OsStr>, &str)> = vec![
        (
            vec![s("--op"), s("sha256"), s("--move-source"), p(&done)],
            "--move-source only applies to --op gzip or zstd",
        ),
        (
            vec![
                s("--op"),
                s("sha256,zstd"),
                s("--manifest"),
                p(&sums),
                s("--move-source"),
                p(&done),
            ],
            "--move-source does not combine with several results (--op sha256,zstd)",
        ),
        (
            vec![
                s("--op"),
                s("gzip"),
                s("--durability"),
                s("none"),
                s("--move-source"),
                p(&done),
            ],
            "--move-source needs durable outputs",
        ),
        (
            vec![s("--op"), s("gzip"), s("--move-source"), p(&inside)],
            "is inside the input directory",
        ),
        (
            vec![s("--op"), s("gzip"), s("--move-failed"), p(&inside)],
            "is inside the input directory",
        ),
        (
            vec![s("--op"), s("gzip"), s("--move-source"), p(t.dir.path())],
            "encloses the input directory",
        ),
        (
            vec![
                s("--op"),
                s("gzip"),
                s("--out"),
                p(&done),
                s("--move-source"),
                p(&done),
            ],
            "is the --out directory",
        ),
        (
            vec![
                s("--op"),
                s("gzip"),
                s("--remove-source"),
                s("--move-source"),
                p(&done),
            ],
            "cannot be used with",
        ),
    ];
    for (args, want) in cases {
        let mut cmd = filepipe(&[s("batch"), p(&root)]);
        cmd.args(&args);
        let err = run(cmd).code(2).stderr();
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!inside.exists(), "{args:?} made its directory");
        assert!(t.path("a.log").exists() && !t.path("a.log.gz").exists());
    }
    // Watch mode refuses the same way, and so does a config file.
    let mut cmd = filepipe(&[s("watch"), p(&root), s("--op"), s("gzip")]);
    cmd.args([
        s("--state"),
        p(&t.side("state")),
        s("--move-source"),
        p(&inside),
    ]);
    let err = run(cmd).code(2).stderr();
    assert!(err.contains("is inside the input directory"), "{err}");
    // Several results with a compressor among them: what is refused is said, not that the op
    // does not compress.
    let mut cmd = filepipe(&[s("watch"), p(&root), s("--op"), s("sha256,zstd")]);
    cmd.args([
        s("--state"),
        p(&t.side("state")),
        s("--move-source"),
        p(&done),
    ]);
    let err = run(cmd).code(2).stderr();
    assert!(
        err.contains("does not combine with several results") && !err.contains("only applies"),
        "{err}"
    );
    let config = t.side("filepipe.toml");
    for (key, value, want) in [
        ("move_source", "in/sub/done", "is inside the watched tree"),
        ("move_failed", "in/sub/done", "is inside the watched tree"),
    ] {
        fs::write(
            &config,
            format!("[[watch]]\npath = \"in\"\nop = \"gzip\"\n{key} = {value:?}\n"),
        )
        .unwrap();
        let err = run(filepipe(&[s("check-config"), p(&config)]))
            .code(2)
            .stderr();
        assert!(err.contains(want) && err.contains(key), "{key}: {err}");
    }
    fs::write(
        &config,
        "[[watch]]\npath = \"in\"\nop = \"sha256\"\nmove_source = \"done\"\n",
    )
    .unwrap();
    let err = run(filepipe(&[s("check-config"), p(&config)]))
        .code(2)
        .stderr();
    assert!(
        err.contains("move_source") && err.contains("does not apply"),
        "{err}"
    );
    fs::write(
        &config,
        "[[watch]]\npath = \"in\"\nop = \"sha256,zstd\"\nmove_source = \"done\"\n",
    )
    .unwrap();
    let err = run(filepipe(&[s("check-config"), p(&config)]))
        .code(2)
        .stderr();
    assert!(
        err.contains("does not combine with several results"),
        "{err}"
    );
    assert!(!inside.exists() && !done.exists());
}

/// `filepipe batch <t's root> --op gzip --move-source DONE EXTRA...` under `strace -f -y`,
/// tracing `calls`; the trace's text once it succeeded.
fn traced_move(t: &TestTree, done: &Path, calls: &str, extra: &[&str]) -> String {
    let trace = t.side("trace");
    let root = t.root();
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-y", "-e", &format!("trace={calls}"), "-o"])
        .arg(&trace)
        .arg(bin())
        .args([s("batch"), p(&root), s("--op"), s("gzip")])
        .args([s("--move-source"), p(done)])
        .args(extra)
        .env_remove("RUST_LOG");
    run(cmd).success();
    fs::read_to_string(&trace).unwrap()
}

// Cases found by a hostile review of the feature (each failed before its fix).

/// A bind mount, undone when dropped.
struct Bind(PathBuf);

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A bindfs view of `back` at `t`'s side `view` (made here), unmounted when the guard drops.
fn bindfs_view(t: &TestTree, back: &Path) -> (PathBuf, Bind) {
    let view = t.side("view");
    fs::create_dir(&view).unwrap();
    let st = Command::new("bindfs")
        .arg(back)
        .arg(&view)
        .status()
        .unwrap();
    assert!(st.success(), "bindfs");
    (view.clone(), Bind(view))
}

/// Found by a review (fixed): A crash between the link and the unlink of a move by link (file systems without
/// RENAME_NOREPLACE) leaves the input with a second link in DIR. The rerun then calls it
/// "hard-linked" and keeps it for ever, and DIR shares the inode with the tree (an edit of the
/// input edits the "moved" file), against "a SIGKILL between publish and move loses nothing;
/// the rerun moves the input" and "DIR never shares a file with the tree".
#[test]
fn a_move_by_link_killed_before_its_unlink_is_finished_by_the_rerun() {
    if !have_strace() {
        eprintln!("SKIPPED: no strace");
        return;
    }
    let t = TestTree::new().file("a.log", b"moved by a link\n");
    let done = t.side("done");
    let root = t.root();
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-o", "/dev/null"])
        // The output's publish is the first renameat2; the move's is refused as where the
        // file system has no RENAME_NOREPLACE, so it links, then is killed as it takes the
        // input's name aside to remove it (a plain rename, RENAME_NOREPLACE refused too).
        .args(["-e", "inject=renameat2:error=EINVAL:when=2+"])
        .args(["-e", "inject=renameat:signal=SIGKILL:when=1"])
        .arg(bin())
        .args([s("batch"), p(&root), s("--op"), s("gzip")])
        .args([s("--move-source"), p(&done)])
        .env_remove("RUST_LOG")
        .env("FILEPIPE_TEMPS", "named");
    run(cmd).signal(9);
    assert!(done.join("a.log").exists(), "the kill came before the link");
    let log = t.side("failures.jsonl");
    let mut again = filepipe(&[s("batch"), p(&root), s("--op"), s("gzip"), s("--json")]);
    again.args([s("--move-source"), p(&done), s("--failure-log"), p(&log)]);
    let sum = run(again).code(0).summary();
    assert!(
        !t.path("a.log").exists(),
        "the rerun did not finish the move: {sum} {:?}",
        failure_log(&log)
    );
    assert_eq!(fs::metadata(done.join("a.log")).unwrap().nlink(), 1);
    assert_eq!(fs::read(done.join("a.log")).unwrap(), b"moved by a link\n");
}

/// Found by a review (fixed): A DIR bind-mounted from a directory inside the tree passes the path check (and a move
/// there, EXDEV across the two mounts, is a copy that lands in the tree): README says a DIR
/// inside the tree is refused at start. In watch mode this loops for ever
/// (in/archive/archive/archive/...).
#[test]
fn a_move_directory_bind_mounted_from_inside_the_tree_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED: not root: cannot bind mount");
        return;
    }
    let t = TestTree::new().file("a.log", b"a\n").dir("archive");
    let done = t.side("done");
    fs::create_dir(&done).unwrap();
    let st = Command::new("mount")
        .arg("--bind")
        .arg(t.path("archive"))
        .arg(&done)
        .status()
        .unwrap();
    assert!(st.success(), "mount --bind");
    let _bind = Bind(done.clone());
    let root = t.root();
    let mut cmd = filepipe(&[s("batch"), p(&root), s("--op"), s("gzip"), s("--json")]);
    cmd.args([s("--move-source"), p(&done)]);
    let r = run(cmd);
    assert!(
        !t.path("archive/a.log").exists(),
        "the moved input landed back in the tree"
    );
    r.code(2);
}

/// Found by a review (fixed): `--out` was checked against the tree by path only, so a bind
/// mount of a directory of the tree was taken: outputs were written among the inputs, and
/// with `--force` over them (an input `sub/a.gz` replaced by `a`'s output). `--move-failed`
/// bind-mounted from the `--move-source` directory passed too. Both refused now, by identity.
#[test]
fn an_out_or_move_failed_directory_bind_mounted_from_another_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED: not root: cannot bind mount");
        return;
    }
    let t = TestTree::new()
        .file("a", b"x\n")
        .file("sub/a.gz", b"an input, not an output\n");
    let bind = |from: &Path, to: &Path| {
        fs::create_dir_all(to).unwrap();
        let st = Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(st.success(), "mount --bind");
        Bind(to.to_path_buf())
    };
    let out = t.side("o");
    let _out = bind(&t.path("sub"), &out);
    let root = t.root();
    let mut cmd = filepipe(&[s("batch"), p(&root), s("--op"), s("gzip"), s("--force")]);
    cmd.args([s("--out"), p(&out), s("--exclude"), s("*.gz")]);
    let r = run(cmd);
    assert_eq!(
        fs::read(t.path("sub/a.gz")).unwrap(),
        b"an input, not an output\n",
        "an input replaced by an output"
    );
    assert!(
        r.code(2).stderr().contains("input directory"),
        "{}",
        r.stderr()
    );
    // One still to be made under the bind mount: refused before it is made in the tree.
    let mut cmd = filepipe(&[s("batch"), p(&root), s("--op"), s("gzip")]);
    cmd.args([s("--out"), p(&out.join("new"))]);
    let r = run(cmd);
    assert!(
        r.code(2).stderr().contains("input directory"),
        "{}",
        r.stderr()
    );
    assert!(
        !t.path("sub/new").exists(),
        "a refused --out was made in the tree"
    );
    let (done, failed) = (t.side("done"), t.side("failed"));
    fs::create_dir(&done).unwrap();
    let _failed = bind(&done, &failed);
    let mut cmd = filepipe(&[s("batch"), p(&root), s("--op"), s("gzip")]);
    cmd.args([s("--move-source"), p(&done), s("--move-failed"), p(&failed)]);
    let r = run(cmd);
    assert!(
        r.code(2).stderr().contains("--move-source directory"),
        "{}",
        r.stderr()
    );
    assert!(t.path("a").exists(), "an input moved");
}

/// Found by a review (fixed): a bindfs (FUSE) view of a directory of the tree was taken as
/// `--move-source`: bindfs shows the files with their own inode numbers on a device of its own,
/// so neither `..` nor mountinfo's device told, and moved inputs landed back in the tree (and
/// were done again at each run). Its source directory, in mountinfo, is compared now.
#[test]
fn a_move_directory_that_is_a_bindfs_view_of_the_tree_is_refused() {
    if !is_root() || Command::new("bindfs").arg("--version").output().is_err() {
        eprintln!("SKIPPED: needs root and bindfs");
        return;
    }
    let t = TestTree::new().file("a.log", b"a\n").dir("sub");
    let (view, _view) = bindfs_view(&t, &t.path("sub"));
    let root = t.root();
    let mut cmd = filepipe(&[s("batch"), p(&root), s("--op"), s("gzip")]);
    cmd.args([s("--move-source"), p(&view)]);
    let r = run(cmd);
    assert!(
        !t.path("sub/a.log").exists(),
        "the moved input landed back in the tree"
    );
    assert!(r.code(2).stderr().contains("FUSE"), "{}", r.stderr());
}

/// Found by a review (fixed): on bindfs (FUSE), which has no `RENAME_NOREPLACE`, a move is a
/// link then an unlink, and bindfs keeps showing the link count the file had: every input was
/// kept, "changed or gained a link while it was moved". The link in DIR being the very file
/// is what is gone by there.
#[test]
fn on_bindfs_inputs_move_by_link() {
    if !is_root() || Command::new("bindfs").arg("--version").output().is_err() {
        eprintln!("SKIPPED: needs root and bindfs");
        return;
    }
    let t = TestTree::new()
        .file("t/a.log", b"a\n")
        .file("t/b.log", b"b\n");
    fs::create_dir(t.path("done")).unwrap();
    let (view, _view) = bindfs_view(&t, &t.root());
    let mut cmd = filepipe(&[
        s("batch"),
        p(&view.join("t")),
        s("--op"),
        s("gzip"),
        s("--json"),
    ]);
    cmd.args([s("--move-source"), p(&view.join("done"))]);
    let r = run(cmd);
    let sum = r.code(0).summary();
    assert_eq!(sum["warnings"], 0, "{sum} {}", r.stderr());
    for name in ["a.log", "b.log"] {
        assert!(
            !t.path(format!("t/{name}")).exists(),
            "{name} kept: {}",
            r.stderr()
        );
        assert_eq!(
            fs::metadata(t.path(format!("done/{name}")))
                .unwrap()
                .nlink(),
            1
        );
        assert_gz(
            &t.path(format!("t/{name}.gz")),
            &fs::read(t.path(format!("done/{name}"))).unwrap(),
        );
    }
}

/// Found by a review (fixed): DIR is opened by path, following symlinks, for every move (`DirCache::new(root)` in
/// `Aside::move_input`): DIR renamed away and replaced by a symlink while the daemon runs sends
/// inputs, under names the tree's writers choose, outside DIR (here `cron.d/evil`).
#[test]
fn a_move_directory_swapped_for_a_symlink_while_watching_sends_nothing_outside() {
    let t = TestTree::new().file("first.log", b"first\n");
    let done = t.side("done");
    let outside = t.side("outside");
    fs::create_dir(&outside).unwrap();
    let d = Daemon::ready(
        &t,
        &["--op", "gzip", "--move-source", done.to_str().unwrap()],
    );
    d.wait_idle(1);
    assert!(done.join("first.log").exists());
    fs::rename(&done, t.side("done.old")).unwrap();
    std::os::unix::fs::symlink(&outside, &done).unwrap();
    fs::create_dir(t.path("cron.d")).unwrap();
    fs::write(t.path("cron.d/evil"), b"* * * * * root evil\n").unwrap();
    wait_until(Duration::from_secs(60), "cron.d/evil handled", || {
        d.notes
            .last_status()
            .is_some_and(|s| s.idle() && s.done + s.failed >= 2)
    });
    d.stop();
    assert!(
        !outside.join("cron.d/evil").exists(),
        "the move followed the symlink out of DIR"
    );
}

/// Found by a review (fixed): Directories made under DIR for a move are never fsynced into their parents
/// (`DirCache::open_uncached` mkdirat, then only the leaf and the source are synced): the
/// input's only name is then in a directory whose own entry may not survive a power cut.
#[test]
fn directories_made_in_the_move_directory_are_synced_into_their_parents() {
    if !have_strace() {
        eprintln!("SKIPPED: no strace");
        return;
    }
    let t = TestTree::new().file("x/y/a.log", b"deep\n");
    let done = t.side("done");
    fs::create_dir(&done).unwrap();
    let text = traced_move(&t, &done, "mkdirat,fsync,fdatasync,syncfs", &[]);
    assert!(!t.path("x/y/a.log").exists());
    let lines: Vec<&str> = text.lines().collect();
    let done_s = done.to_str().unwrap();
    let mut checked = 0;
    for (i, l) in lines.iter().enumerate() {
        let Some(rest) = l.split_once("mkdirat(").map(|x| x.1) else {
            continue;
        };
        // mkdirat(9</tmp/.../done>, "x", 0755) = 0
        let Some(parent) = rest
            .split_once('<')
            .and_then(|x| x.1.split_once('>'))
            .map(|x| x.0)
        else {
            continue;
        };
        if !parent.starts_with(done_s) || !l.ends_with("= 0") {
            continue;
        }
        checked += 1;
        let synced = lines[i..].iter().any(|m| {
            (m.contains("fsync(") || m.contains("syncfs(")) && m.contains(&format!("<{parent}>"))
        });
        assert!(synced, "{parent} never synced after: {l}");
    }
    assert_eq!(checked, 2, "expected mkdirat of x and y under DIR:\n{text}");
}

/// Found by a review (fixed): Watch mode: an input failed for good and moved aside by --move-failed leaves the state
/// with the move (taken as a deletion), so `filepipe status --failed` no longer lists it; the
/// same failure without --move-failed is listed.
#[test]
fn a_failed_input_moved_aside_is_still_listed_by_status_failed() {
    let long = [b'n'; 253];
    let t = TestTree::new().file(long, b"too long for its .gz\n");
    let failed = t.side("failed");
    let d = Daemon::ready(
        &t,
        &["--op", "gzip", "--move-failed", failed.to_str().unwrap()],
    );
    wait_until(Duration::from_secs(60), "moved aside", || {
        failed.join(OsStr::from_bytes(&long)).exists()
    });
    std::thread::sleep(Duration::from_millis(1500));
    d.stop();
    let state = t.side("state");
    let out = run(filepipe(&[
        s("status"),
        s("--state"),
        p(&state),
        s("--failed"),
    ]));
    let text = out.stdout();
    assert!(
        text.contains("FAILED") && text.contains("nnnnnnnn"),
        "status --failed forgot the failure:\n{text}"
    );
}

/// Found by a review (fixed): An unreadable input that a writer still has open (a log being appended to) is moved to
/// --move-failed from under the writer as soon as some other descriptor of it is closed: the
/// in-use check that makes a readable file wait (retry) needs the open that failed. README:
/// "in use" is a failure that may pass and leaves the input in place.
#[test]
fn an_unreadable_input_still_being_written_is_not_moved_aside() {
    if !is_root() {
        eprintln!("SKIPPED: not root: cannot run as another user");
        return;
    }
    let t = TestTree::new();
    t.open_to_all();
    let failed = t.side("failed");
    fs::create_dir(&failed).unwrap();
    fs::set_permissions(&failed, fs::Permissions::from_mode(0o777)).unwrap();
    let (root, state) = (t.root(), t.side("state"));
    let mut cmd = unprivileged();
    cmd.args([
        s("watch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--settle"),
        s("150"),
    ])
    .args([s("--state"), p(&state), s("--move-failed"), p(&failed)])
    .env_remove("RUST_LOG")
    .stdout(Stdio::null())
    .stderr(fs::File::create(t.side("daemon.err")).unwrap());
    let daemon = Started::new(cmd);
    std::thread::sleep(Duration::from_millis(3000));
    let mut w = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(t.path("app.log"))
        .unwrap();
    for i in 0..8 {
        writeln!(w, "line {i}").unwrap();
        // Another descriptor open for writing closes (a child that inherited it exits, a
        // helper appends): a close event, while `w` keeps the file open.
        if fs::OpenOptions::new()
            .append(true)
            .open(t.path("app.log"))
            .is_err()
        {
            break; // gone from the tree
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    daemon.finish(Duration::from_secs(30));
    assert!(
        t.path("app.log").exists() && !failed.join("app.log").exists(),
        "a file still open for writing was moved aside: {}",
        fs::read_to_string(t.side("daemon.err")).unwrap_or_default()
    );
}

/// Found by a review (fixed): A move across file systems killed before its copy is named leaves a named temp (a full
/// copy of the input, with the input's mode) in DIR; DIR is never swept, so it stays for ever
/// (RELIABILITY: "a crash leaves at most a temp file, cleaned up at the next start").
#[test]
fn a_copy_killed_before_it_is_named_leaves_no_temp_after_the_rerun() {
    if !have_strace() {
        eprintln!("SKIPPED: no strace");
        return;
    }
    let fs2 = match Tmpfs::new() {
        Ok(f) => f,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let t = TestTree::new().file("a.bin", &noise_bytes(1 << 20, 3));
    let done = fs2.path().join("done");
    let root = t.root();
    let args = [
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--move-source"),
        p(&done),
    ];
    // renameat2 #1: the output's publish; #2: the move, EXDEV; #3: the copy's name.
    let mut cmd =
        common::strace::filepipe_injected(&["inject=renameat,renameat2:signal=SIGKILL:when=3"]);
    cmd.args(args).env("FILEPIPE_TEMPS", "named");
    run(cmd).signal(9);
    assert!(t.path("a.bin").exists());
    let sum = run(filepipe(&[&args[..], &[s("--json")]].concat()))
        .code(0)
        .summary();
    assert!(!t.path("a.bin").exists(), "{sum}");
    assert_eq!(temps_under(&done), Vec::<PathBuf>::new(), "{sum}");
}

/// Found by a review (fixed): The service config refuses a move directory inside a watched tree, but not one that
/// encloses another pipeline's watched tree: files moved there are processed again by that
/// pipeline ("a file would be processed twice", the reason overlapping roots are refused).
#[test]
fn a_move_directory_enclosing_another_watch_root_is_refused() {
    let t = TestTree::new();
    fs::create_dir_all(t.side("b/sub")).unwrap();
    let config = t.side("filepipe.toml");
    fs::write(
        &config,
        "[[watch]]\npath = \"in\"\nop = \"gzip\"\nmove_source = \"b\"\n\
         [[watch]]\npath = \"b/sub\"\nop = \"gzip\"\n",
    )
    .unwrap();
    let r = run(filepipe(&[s("check-config"), p(&config)]));
    r.code(2);
}

/// Found by a review (fixed): A move across file systems drops what a rename keeps: set-group-ID bit and extended
/// attributes (ACLs, labels, user.*). README: "given its mode, owner and times".
#[test]
fn a_move_across_file_systems_keeps_the_mode_bits_and_xattrs() {
    let fs2 = match Tmpfs::new() {
        Ok(f) => f,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let t = TestTree::new().file("a.sh", b"#!/bin/sh\n");
    fs::set_permissions(t.path("a.sh"), fs::Permissions::from_mode(0o2750)).unwrap();
    rustix::fs::setxattr(
        t.path("a.sh"),
        "user.origin",
        b"upload-42",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let done = fs2.path().join("done");
    let root = t.root();
    let mut cmd = filepipe(&[s("batch"), p(&root), s("--op"), s("gzip"), s("--json")]);
    cmd.args([s("--move-source"), p(&done)]);
    run(cmd).code(0);
    let moved = done.join("a.sh");
    assert_eq!(fs::metadata(&moved).unwrap().mode() & 0o7777, 0o2750);
    let mut buf = [0u8; 64];
    let n = rustix::fs::getxattr(&moved, "user.origin", &mut buf[..]).unwrap_or(0);
    assert_eq!(&buf[..n], b"upload-42");
}

/// Found by a review (fixed): The move, and --remove-source's unlink, act on the input's name after checking what it
/// leads to: a file renamed over that name in between (here while strace holds the call on
/// `a.log` back) was moved or deleted, unprocessed. Now only the file that was read goes; any
/// other is put back under its name.
fn replaced_between_check_and_act(dispose: &[&str]) {
    if !have_strace() {
        eprintln!("SKIPPED: no strace");
        return;
    }
    let t = TestTree::new().file("a.log", b"old, compressed\n");
    let fresh = t.side("fresh");
    fs::write(&fresh, b"new, never read\n").unwrap();
    let trace = t.side("trace");
    let root = t.root();
    let mut cmd = Command::new("strace");
    // Only the calls that name `a.log` are held back (-P), the output's own untouched.
    cmd.args(["-f", "-P", "a.log", "-e", "trace=renameat2,unlinkat", "-o"])
        .arg(&trace)
        .args(["-e", "inject=renameat2,unlinkat:delay_enter=1500000"])
        .arg(bin())
        .args([s("batch"), p(&root), s("--op"), s("gzip"), s("--json")])
        .args(dispose)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Started::new(cmd);
    wait_until(
        Duration::from_secs(60),
        "the call on a.log held back",
        || fs::read_to_string(&trace).is_ok_and(|t| t.contains("\"a.log\"")),
    );
    fs::rename(&fresh, t.path("a.log")).unwrap();
    started.finish(Duration::from_secs(60));
    assert_eq!(
        fs::read(t.path("a.log")).ok().as_deref(),
        Some(&b"new, never read\n"[..]),
        "the file renamed over the input was not left in place: {}",
        fs::read_to_string(&trace).unwrap_or_default()
    );
}

#[test]
fn a_file_renamed_over_the_input_as_it_is_moved_is_put_back() {
    let t = TestTree::new();
    let done = t.side("done");
    replaced_between_check_and_act(&["--move-source", done.to_str().unwrap()]);
}

#[test]
fn a_file_renamed_over_the_input_as_it_is_removed_is_kept() {
    replaced_between_check_and_act(&["--remove-source"]);
}

/// The order that makes a move durable, from the calls the binary makes: the output's name is
/// flushed into its directory before the input is moved, and after the move both the
/// destination directory and the input's directory are flushed. (Removing either directory
/// fsync of the move left tests/move_source.rs passing.)
#[test]
fn a_move_flushes_the_output_first_and_both_directories_after() {
    if !have_strace() {
        eprintln!("SKIPPED: no strace");
        return;
    }
    let t = TestTree::new().file("a.log", b"flushed in order\n");
    let done = t.side("done");
    fs::create_dir(&done).unwrap();
    let root = t.root();
    let text = traced_move(
        &t,
        &done,
        "renameat2,linkat,fsync,fdatasync,syncfs",
        &["--durability", "file"],
    );
    assert!(done.join("a.log").exists() && !t.path("a.log").exists());
    let lines: Vec<&str> = text.lines().collect();
    let (root_s, done_s) = (root.to_str().unwrap(), done.to_str().unwrap());
    let dir_sync = |l: &str, dir: &str| l.contains("fsync(") && l.contains(&format!("<{dir}>"));
    let moved = lines
        .iter()
        .position(|l| {
            l.contains("renameat2(")
                && l.contains(&format!("<{root_s}>, \"a.log\""))
                && l.contains(&format!("<{done_s}>, \"a.log\""))
                && l.ends_with("= 0")
        })
        .unwrap_or_else(|| panic!("no move of a.log:\n{text}"));
    let published = lines[..moved]
        .iter()
        .position(|l| l.contains("\"a.log.gz\"") && l.ends_with("= 0"))
        .unwrap_or_else(|| panic!("a.log.gz not published before the move:\n{text}"));
    assert!(
        lines[published..moved].iter().any(|l| dir_sync(l, root_s)),
        "the output's directory was not flushed before the move:\n{text}"
    );
    let after = &lines[moved..];
    assert!(
        after.iter().any(|l| dir_sync(l, done_s)),
        "DIR not flushed after the move:\n{text}"
    );
    assert!(
        after.iter().any(|l| dir_sync(l, root_s)),
        "the input's directory not flushed after the move:\n{text}"
    );
}

/// --move-failed and --move-source in one directory (or one inside the other) would mix failed
/// inputs with processed ones: refused at start, before anything is made.
#[test]
fn move_failed_overlapping_move_source_is_refused() {
    let t = TestTree::new().file("a.log", b"a\n");
    let done = t.side("done");
    let root = t.root();
    for failed in [done.clone(), done.join("failed")] {
        let mut cmd = filepipe(&[s("batch"), p(&root), s("--op"), s("gzip")]);
        cmd.args([s("--move-source"), p(&done), s("--move-failed"), p(&failed)]);
        let r = run(cmd);
        r.code(2);
        assert!(r.stderr().contains("overlap"), "{}", r.stderr());
        assert!(!done.exists() && t.path("a.log").exists());
    }
}

/// The directory under DIR a move is about to go into, moved out of DIR by its owner meanwhile
/// (strace holds the sync of its parent, as `d` is made in `DIR/u`, while `DIR/u` is moved
/// away): the input is not moved where the directory went, outside DIR, but kept, and the
/// note says why. Found by review r55b: the input went to `away/u/d/a`, and `-v` said it was
/// moved to `DIR/u/d/a`.
#[test]
fn an_input_is_not_moved_into_a_directory_moved_out_of_dir() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the move");
        return;
    }
    let (t, done, away) = tree_done_away();
    let held = done.join("u");
    let child = strace_move("fsync", "delay_enter", &held, &t.root(), &done);
    let strace = child.id();
    let fsync = common::strace::nr::FSYNC;
    wait_until(Duration::from_secs(30), "the held sync of DIR/u", || {
        common::strace::children(strace)
            .into_iter()
            .any(|pid| common::strace::call_on(pid, fsync).as_deref() == Some(held.as_path()))
    });
    fs::rename(&held, away.join("u")).unwrap();
    let out = child.finish(Duration::from_secs(60));
    let err = out.success().stderr();
    assert!(
        err.contains("input not moved") && err.contains("was moved out of"),
        "{err}"
    );
    assert_eq!(fs::read(t.path("u/d/a")).unwrap(), b"moved or kept\n");
    assert!(t.path("u/d/a.gz").is_file());
    assert!(!away.join("u/d/a").exists(), "moved outside DIR");
}

/// As above, with the directory moved out of DIR at the last moment: after the look that it
/// is still beneath DIR, while strace holds the rename of the input into it. The input is put
/// back where it was, and the note says why. Found by review r55c (its script m5): the input
/// went where the directory went.
#[test]
fn an_input_renamed_into_a_directory_just_moved_out_of_dir_is_put_back() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the move");
        return;
    }
    let (t, done, away) = tree_done_away();
    let child = strace_move(
        "renameat2",
        "delay_enter",
        &done.join("u/d"),
        &t.root(),
        &done,
    );
    let strace = child.id();
    let rename = common::strace::nr::RENAMEAT2;
    // The output's publish, a rename too, comes before `DIR/u/d` is made: a rename seen once
    // it is there is the move's.
    let moving = || {
        done.join("u/d").is_dir()
            && common::strace::children(strace)
                .into_iter()
                .any(|pid| common::strace::in_call(pid, &[rename]))
    };
    wait_until(
        Duration::from_secs(30),
        "the held rename into DIR/u/d",
        moving,
    );
    fs::rename(done.join("u"), away.join("u")).unwrap();
    let out = child.finish(Duration::from_secs(60));
    let err = out.success().stderr();
    assert!(
        err.contains("input not moved")
            && err.contains("was moved out of")
            && err.contains("put back"),
        "{err}"
    );
    assert_eq!(fs::read(t.path("u/d/a")).unwrap(), b"moved or kept\n");
    assert!(t.path("u/d/a.gz").is_file());
    assert!(!away.join("u/d/a").exists(), "left outside DIR");
    assert_eq!(fs::read_dir(away.join("u/d")).unwrap().count(), 0);
}

/// A tree holding `u/d/a` ("moved or kept"), and beside it an empty `done` (DIR) and `away`
/// (where an owner moves a directory out of DIR to).
fn tree_done_away() -> (TestTree, PathBuf, PathBuf) {
    let t = TestTree::new().file("u/d/a", b"moved or kept\n");
    let (done, away) = (t.side("done"), t.side("away"));
    fs::create_dir(&done).unwrap();
    fs::create_dir(&away).unwrap();
    (t, done, away)
}

/// `batch -j1 --op gzip TREE --move-source DONE` under strace, which holds the first `call`
/// (`fsync`, `renameat2`, `linkat`) on `held` (a directory under DONE) for two seconds, as it
/// enters the call or once it is made (`when`: `delay_enter`, `delay_exit`).
fn strace_move(call: &str, when: &str, held: &Path, tree: &Path, done: &Path) -> Started {
    let inject = format!("{call}:{when}=2000000:when=1");
    strace_moves(&[held], call, &[&inject], "gzip", tree, done)
}

/// `strace_move` with more holds: strace traces the calls `trace` (`renameat2,mkdirat`) on any
/// of the paths `on`, and holds them as each of `injects` (strace's `-e inject=` values) says;
/// `op` is `--op`'s value.
fn strace_moves(
    on: &[&Path],
    trace: &str,
    injects: &[&str],
    op: &str,
    tree: &Path,
    done: &Path,
) -> Started {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o", "/dev/null"]);
    for path in on {
        cmd.arg("-P").arg(path);
    }
    cmd.args(["-e", &format!("trace={trace}")]);
    for inject in injects {
        cmd.args(["-e", &format!("inject={inject}")]);
    }
    cmd.arg(bin())
        .args(["batch", "-j1", "--op", op])
        .arg(tree)
        .arg("--move-source")
        .arg(done)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Started::new(cmd)
}

/// A tree holding `t/u/d/NAME` ("the input"), with `done` (DIR) and `away` (where an owner
/// moves a directory out of DIR to) beside `t`, all three under the tree's root.
fn t_done_away(name: &str) -> (TestTree, PathBuf, PathBuf) {
    let t = TestTree::new().file(format!("t/u/d/{name}"), b"the input\n");
    let (done, away) = (t.path("done"), t.path("away"));
    fs::create_dir(&done).unwrap();
    fs::create_dir(&away).unwrap();
    (t, done, away)
}

/// `strace_move` holding `call` once it is made, returned once `held/a` is there.
fn held_after(call: &str, held: &Path, tree: &Path, done: &Path) -> Started {
    let child = strace_move(call, "delay_exit", held, tree, done);
    wait_until(
        Duration::from_secs(30),
        "the held call's name in DIR",
        || held.join("a").exists(),
    );
    child
}

/// The input's directory under DIR moved out of DIR just after the input was renamed into it,
/// and a writer's new file at the input's old name meanwhile: it cannot be put back (the name
/// is taken), so it is moved on into its directory under DIR, made again, where the move meant
/// it to go. Found by review r56 (its m1): it was left outside both DIR and the tree, exit 0,
/// and the note named a path in DIR where it was not.
#[test]
fn an_input_that_cannot_be_put_back_is_moved_on_into_dir() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the move");
        return;
    }
    let (t, done, away) = t_done_away("a");
    let child = held_after("renameat2", &done.join("u/d"), &t.path("t"), &done);
    fs::rename(done.join("u"), away.join("u")).unwrap();
    fs::write(t.path("t/u/d/a"), b"a writer's new file\n").unwrap();
    let out = child.finish(Duration::from_secs(60));
    let err = out.success().stderr();
    assert_eq!(
        fs::read(done.join("u/d/a")).unwrap(),
        b"the input\n",
        "{err}"
    );
    assert_eq!(
        fs::read(t.path("t/u/d/a")).unwrap(),
        b"a writer's new file\n"
    );
    assert!(!away.join("u/d/a").exists(), "left outside DIR: {err}");
    assert_gz(&t.path("t/u/d/a.gz"), b"the input\n");
}

/// DIR on another file system (a copy, then the input's unlink), the copy's directory moved
/// out of DIR as the copy is named: the input is kept, and the copy out there removed. Found
/// by review r56 (its m2): the copy stayed outside DIR, and the note said it was in DIR.
#[test]
fn a_copy_made_in_a_directory_moved_out_of_dir_is_removed_and_the_input_kept() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the move");
        return;
    }
    let fs = match Tmpfs::new() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let t = TestTree::new().file("u/d/a", b"the input\n");
    let (done, away) = (fs.dir.path().join("done"), fs.dir.path().join("away"));
    fs::create_dir(&done).unwrap();
    fs::create_dir(&away).unwrap();
    let child = held_after("linkat", &done.join("u/d"), &t.root(), &done);
    fs::rename(done.join("u"), away.join("u")).unwrap();
    let out = child.finish(Duration::from_secs(60));
    let err = out.success().stderr();
    assert!(
        err.contains("was moved out of") && err.contains("the copy made there was removed"),
        "{err}"
    );
    assert_eq!(fs::read(t.path("u/d/a")).unwrap(), b"the input\n");
    assert_eq!(fs::read_dir(away.join("u/d")).unwrap().count(), 0, "{err}");
}

/// On bindfs (a move by link, then unlink), a writer's new version renamed over the input
/// while the link into DIR is made: the file read lives on as that link alone, moved. bindfs
/// shows it with two links still (libfuse keeps a file replaced while open as `.fuse_hidden*`,
/// gone at its close). Found by review r56 (its m3): the link in DIR was taken back, and the
/// input lost at the close.
#[test]
fn on_bindfs_an_input_replaced_while_its_link_is_made_is_not_lost() {
    let Some((t, _view, view, child)) = bindfs_link_held() else {
        return;
    };
    let new = view.join("t/u/d/.a.new");
    fs::write(&new, b"a writer's new version\n").unwrap();
    fs::rename(&new, view.join("t/u/d/a")).unwrap();
    let out = child.finish(Duration::from_secs(60));
    let err = out.success().stderr();
    assert_eq!(
        fs::read(t.path("done/u/d/a")).unwrap(),
        b"the input\n",
        "{err}"
    );
    assert_eq!(
        fs::read(t.path("t/u/d/a")).unwrap(),
        b"a writer's new version\n"
    );
}

/// A writer's new version renamed over the input while the input's rename into DIR is held
/// (so the rename moves the writer's file, not the one read: it goes back), then, while that
/// rename is held once made, DIR/u moved out of DIR and a third file put at the input's name
/// (so it cannot go back). The writer's file is out there, with its directory: the file fails,
/// and the message says where it is. Found by review r56b (its n1): it ended done, the note
/// naming a path in DIR where nothing was.
#[test]
fn a_writers_file_that_cannot_be_put_back_fails_and_says_where_it_is() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the move");
        return;
    }
    let (t, done, away) = t_done_away("a");
    let held = done.join("u/d");
    let inject = "renameat2:delay_enter=2000000:delay_exit=2000000:when=1";
    let child = strace_moves(
        &[&held],
        "renameat2",
        &[inject],
        "gzip",
        &t.path("t"),
        &done,
    );
    let strace = child.id();
    let rename = common::strace::nr::RENAMEAT2;
    wait_until(
        Duration::from_secs(30),
        "the held rename into DIR/u/d",
        || {
            held.is_dir()
                && common::strace::children(strace)
                    .into_iter()
                    .any(|pid| common::strace::in_call(pid, &[rename]))
        },
    );
    let new = t.path("t/u/d/.a.new");
    fs::write(&new, b"a writer's new version\n").unwrap();
    fs::rename(&new, t.path("t/u/d/a")).unwrap();
    wait_until(Duration::from_secs(30), "the rename made", || {
        held.join("a").exists()
    });
    fs::rename(done.join("u"), away.join("u")).unwrap();
    fs::write(t.path("t/u/d/a"), b"a third file\n").unwrap();
    let out = child.finish(Duration::from_secs(60));
    let err = out.failure().stderr();
    let there = away.join("u/d/a");
    assert!(
        err.contains("could not be put back")
            && err.contains(&format!("it is at {}", there.display())),
        "{err}"
    );
    assert!(
        err.contains("1 failed (failed: 1 unsafe-output-path)"),
        "{err}"
    );
    assert_eq!(fs::read(&there).unwrap(), b"a writer's new version\n");
    assert_eq!(fs::read(t.path("t/u/d/a")).unwrap(), b"a third file\n");
    assert!(!done.join("u").exists(), "{err}");
    assert_gz(&t.path("t/u/d/a.gz"), b"the input\n");
}

/// As in `an_input_that_cannot_be_put_back_is_moved_on_into_dir`, and, while the move on
/// makes DIR/u again, the owner of the directory out there swaps another file in at the
/// input's name. The impostor is not taken into DIR (it goes back), and the file fails, its
/// message saying where the input is. Found by review r56b (its n2): the move on renamed by
/// name, and the impostor was taken for the input.
#[test]
fn a_file_swapped_in_for_the_input_outside_dir_is_not_moved_into_dir() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the move");
        return;
    }
    let (t, done, away) = t_done_away("a");
    // The first `mkdirat` in DIR makes DIR/u for the move, the second is the move on's.
    let child = strace_moves(
        &[&done.join("u/d"), &done],
        "renameat2,mkdirat",
        &[
            "renameat2:delay_exit=2000000:when=1",
            "mkdirat:delay_exit=2000000:when=2",
        ],
        "gzip",
        &t.path("t"),
        &done,
    );
    wait_until(Duration::from_secs(30), "the rename into DIR made", || {
        done.join("u/d/a").exists()
    });
    fs::rename(done.join("u"), away.join("u")).unwrap();
    fs::write(t.path("t/u/d/a"), b"a writer's new file\n").unwrap();
    // Held once made, so DIR/u there again means the move on is in its `mkdirat`.
    wait_until(Duration::from_secs(30), "the move on's DIR/u", || {
        done.join("u").is_dir()
    });
    fs::rename(away.join("u/d/a"), away.join("u/d/a.real")).unwrap();
    fs::write(away.join("u/d/a"), b"an impostor\n").unwrap();
    let out = child.finish(Duration::from_secs(60));
    let err = out.failure().stderr();
    assert!(
        err.contains("could not be moved into")
            && err.contains(&format!(
                "it is somewhere in {}/",
                away.join("u/d").display()
            )),
        "{err}"
    );
    assert!(
        !done.join("u/d/a").exists(),
        "the impostor moved into DIR: {err}"
    );
    assert_eq!(fs::read(away.join("u/d/a")).unwrap(), b"an impostor\n");
    assert_eq!(fs::read(away.join("u/d/a.real")).unwrap(), b"the input\n");
    assert_eq!(
        fs::read(t.path("t/u/d/a")).unwrap(),
        b"a writer's new file\n"
    );
    assert_gz(&t.path("t/u/d/a.gz"), b"the input\n");
}

/// On bindfs, while the move's link into DIR is made, someone links the input to a second
/// name in the tree, and a writer renames a new version over its first. The input has a real
/// second link (not libfuse's `.fuse_hidden*` of `on_bindfs_an_input_replaced_..._not_lost`):
/// the link in DIR is taken back, the input kept at its other name. Found by review r56b (its
/// n6): any FUSE file with two links was taken as moved.
#[test]
fn on_bindfs_an_input_given_a_second_name_as_it_is_moved_is_kept() {
    let Some((t, _view, view, child)) = bindfs_link_held() else {
        return;
    };
    fs::hard_link(view.join("t/u/d/a"), view.join("t/u/d/b")).unwrap();
    let new = view.join("t/u/d/.a.new");
    fs::write(&new, b"a writer's new version\n").unwrap();
    fs::rename(&new, view.join("t/u/d/a")).unwrap();
    let out = child.finish(Duration::from_secs(60));
    let err = out.success().stderr();
    assert!(
        err.contains("input not moved") && err.contains("gained a link"),
        "{err}"
    );
    assert!(!t.path("done/u/d/a").exists(), "{err}");
    assert_eq!(fs::read(t.path("t/u/d/b")).unwrap(), b"the input\n");
    assert_eq!(
        fs::read(t.path("t/u/d/a")).unwrap(),
        b"a writer's new version\n"
    );
}

/// As in `an_input_that_cannot_be_put_back_is_moved_on_into_dir`, with a name of 251 bytes
/// (the longest a `.gz` fits), and DIR/u/d made again by someone, with files at that name and
/// the names numbered 1 to 999: numbered 1000 is over 255 bytes. The file fails, and the
/// message says so and where the input is. It said "every numbered name there is taken"
/// (review r56b).
#[test]
fn an_input_whose_name_has_no_room_for_a_number_fails_its_move_on_saying_so() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the move");
        return;
    }
    let name = "n".repeat(251);
    let (t, done, away) = t_done_away(&name);
    let held = done.join("u/d");
    let inject = "renameat2:delay_exit=2000000:when=1";
    let child = strace_moves(
        &[&held],
        "renameat2",
        &[inject],
        "gzip",
        &t.path("t"),
        &done,
    );
    wait_until(Duration::from_secs(30), "the rename into DIR made", || {
        held.join(&name).exists()
    });
    fs::rename(done.join("u"), away.join("u")).unwrap();
    fs::write(t.path(format!("t/u/d/{name}")), b"a writer's new file\n").unwrap();
    fs::create_dir_all(&held).unwrap();
    fs::write(held.join(&name), b"someone else's\n").unwrap();
    for n in 1..1000 {
        fs::write(held.join(format!("{name}.{n}")), b"someone else's\n").unwrap();
    }
    let out = child.finish(Duration::from_secs(60));
    let err = out.failure().stderr();
    let there = away.join("u/d").join(&name);
    assert!(
        err.contains("numbered 1000 would be over 255 bytes")
            && err.contains(&format!("it is at {}", there.display())),
        "{err}"
    );
    assert_eq!(fs::read(&there).unwrap(), b"the input\n");
    assert_eq!(fs::read_dir(&held).unwrap().count(), 1000);
}

/// A tree holding `t/u/d/a` ("the input") and `done` beside `t`, seen through a bindfs view
/// (`view`, unmounted when the `Bind` drops), and `batch` of `view/t` with `--move-source
/// view/done` held once the move's link into `done/u/d` is made. `None` (said) without root,
/// bindfs or strace.
fn bindfs_link_held() -> Option<(TestTree, Bind, PathBuf, Started)> {
    if !is_root() || Command::new("bindfs").arg("--version").output().is_err() {
        eprintln!("SKIPPED: needs root and bindfs");
        return None;
    }
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the move");
        return None;
    }
    let t = TestTree::new().file("t/u/d/a", b"the input\n");
    fs::create_dir(t.path("done")).unwrap();
    let (view, _view) = bindfs_view(&t, &t.root());
    let done = view.join("done");
    let child = held_after("linkat", &done.join("u/d"), &view.join("t"), &done);
    Some((t, _view, view, child))
}
