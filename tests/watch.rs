//! `filepipe watch` end to end (RELIABILITY.md cases 18-24): the real binary watching temp
//! trees, outputs checked with the real gzip and sha256sum.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use sha2::Digest as _;

/// The real `sha256sum -c MANIFEST`, run in `dir`, must pass.
fn assert_sha256sum_c(manifest: &Path, dir: &Path) {
    let check = tool("sha256sum", &[OsStr::new("-c"), manifest.as_os_str()], dir);
    assert!(check.status.success(), "{check:?}");
}

fn manifest_lines(path: &Path) -> usize {
    fs::read(path).map_or(0, |m| m.iter().filter(|&&b| b == b'\n').count())
}

fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    wait_until(Duration::from_secs(90), what, cond);
}

/// Waits for the overflow tests' burst to be done: `expected` files, the daemon idle. 96 MiB
/// at level 9 and 20,000 files take 40 s on a quiet machine in a debug build, and took past
/// 90 s once while other tests and processes shared the two cores.
fn wait_for_burst(d: &Daemon, expected: u64) {
    wait_until(
        Duration::from_secs(240),
        "every file done and the daemon idle",
        || {
            d.notes
                .last_status()
                .is_some_and(|s| s.idle() && s.done >= expected)
        },
    );
}

fn gz_of(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(".gz");
    PathBuf::from(s)
}

#[test]
fn every_file_once_when_complete_pre_existing_renamed_nested_and_slow() {
    let t = TestTree::new().file("pre-existing.txt", &text_bytes(50_000, 1));
    let d = Daemon::ready(&t, &["--op", "gzip"]);
    wait_for("the pre-existing file", || {
        gz_of(&t.path("pre-existing.txt")).exists()
    });

    // Write to name.part, then rename: processed once, as name.
    fs::write(t.path("report.part"), text_bytes(20_000, 2)).unwrap();
    fs::rename(t.path("report.part"), t.path("report")).unwrap();
    // A whole nested directory in one burst: the file lands before the new watches exist.
    fs::create_dir_all(t.path("a/b/c")).unwrap();
    fs::write(t.path("a/b/c/f"), b"x\n").unwrap();
    // A slow writer: chunks 200 ms apart, one open file. Never taken before it is closed.
    let slow: Vec<u8> = text_bytes(60_000, 3);
    {
        let mut f = fs::File::create(t.path("slow.log")).unwrap();
        for chunk in slow.chunks(10_000) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            assert!(
                !gz_of(&t.path("slow.log")).exists(),
                "taken while still being written"
            );
        }
    }
    for f in ["report", "a/b/c/f", "slow.log"] {
        wait_for(f, || gz_of(&t.path(f)).exists());
    }
    // Idle with four done: had anything been taken twice, or an output as an input, the
    // count would not stop at four.
    d.wait_idle(4);
    let s = d.stop().success().summary();
    assert_eq!(s["done"], 4, "each file exactly once: {s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert!(!t.path("report.part.gz").exists());
    assert!(
        !t.path("pre-existing.txt.gz.gz").exists(),
        "outputs must not trigger themselves"
    );
    for f in ["pre-existing.txt", "report", "a/b/c/f", "slow.log"] {
        let gz = gz_of(&t.path(f));
        assert!(
            tool("gzip", &[OsStr::new("-t"), gz.as_os_str()], t.dir.path())
                .status
                .success()
        );
        let back = tool("gunzip", &[OsStr::new("-c"), gz.as_os_str()], t.dir.path());
        assert_eq!(back.stdout, fs::read(t.path(f)).unwrap(), "{f}");
    }
    assert_eq!(fs::read(t.path("slow.log")).unwrap(), slow);
}

/// The kernel's inotify queue length, if a burst of files can overflow it here; `None`, saying
/// the test is skipped, if it is too long.
fn overflowable_queue() -> Option<usize> {
    let queue: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16_384);
    if queue > 300_000 {
        eprintln!("SKIPPED: max_queued_events is {queue}: too many files to overflow it here");
        return None;
    }
    Some(queue)
}

/// How many files the daemon said it reads again after an overflow (`files=N` of its warning;
/// each counts done twice), from its log `err`; `None` if it said nothing of the kind.
fn read_again(err: &str) -> Option<u64> {
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("read again once back"))
        .collect();
    (!lines.is_empty()).then(|| {
        lines
            .iter()
            .map(|l| {
                l.split("files=")
                    .nth(1)
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("no files= in {l}"))
            })
            .sum()
    })
}

#[test]
fn overflow_while_stopped_rescans_and_processes_every_file_exactly_once() {
    let t = TestTree::new().file("marker", b"ready");
    let manifest = t.side("SHA256SUMS");
    let d = Daemon::ready(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
    );
    wait_for("the initial scan", || manifest_lines(&manifest) == 1);
    // The directories first, while it runs, so they are watched before the burst.
    for d in 0..20 {
        fs::create_dir_all(t.path(format!("burst/d{d}"))).unwrap();
    }
    fs::write(t.path("burst/d19/sentinel"), b"watched").unwrap();
    wait_for("the burst directories to be watched", || {
        manifest_lines(&manifest) == 2
    });
    // Frozen, it cannot read events: files (three events each) in watched directories
    // overflow the kernel's queue of max_queued_events (16,384 by default).
    let Some(queue) = overflowable_queue() else {
        return;
    };
    let n = (queue / 2).max(20_000);
    d.signal(rustix::process::Signal::STOP);
    for i in 0..n {
        fs::write(t.path(format!("burst/d{}/f{i}", i % 20)), format!("{i}\n")).unwrap();
    }
    // A directory created while events are being lost: it must still get watched.
    fs::create_dir(t.path("made-during-overflow")).unwrap();
    d.signal(rustix::process::Signal::CONT);
    wait_for("every burst file in the manifest", || {
        manifest_lines(&manifest) == n + 2
    });
    fs::write(
        t.path("made-during-overflow/late"),
        b"written after the rescan\n",
    )
    .unwrap();
    wait_for("the late file", || manifest_lines(&manifest) == n + 3);
    // Files being read when the events were lost are read again once back, whatever their
    // stamp (README: a write through a shared mapping changes none, and its close may be
    // among the lost events; tests/watch_overflow_mmap.rs), and the daemon says how many:
    // each counts done twice. Every other file counts once.
    wait_for("the daemon idle", || {
        d.notes
            .last_status()
            .is_some_and(|s| s.idle() && s.done >= n as u64 + 3)
    });
    let out = d.stop();
    let s = out.success().summary();
    let err = out.stderr();
    assert!(
        err.contains("overflowed"),
        "the burst did not overflow the queue, so this test proved nothing"
    );
    let again = read_again(&err).unwrap_or(0) as usize;
    assert_eq!(
        s["done"],
        n + 3 + again,
        "exactly once but the {again} read again: {s}"
    );
    assert_sha256sum_c(&manifest, &t.root());
}

#[test]
fn repeated_overflows_are_rescanned_at_most_every_few_seconds() {
    // A rescan reads the whole tree, and the files in flight again: a process that overflows
    // the kernel's queue over and over must not have the daemon rescan back to back.
    let Some(queue) = overflowable_queue() else {
        return;
    };
    let t = TestTree::new().file("marker", b"ready").dir("churn");
    let manifest = t.side("SHA256SUMS");
    let d = Daemon::ready(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
    );
    wait_for("the initial scan", || manifest_lines(&manifest) == 1);
    // Names made and removed while the daemon is frozen (three events each, nothing left to
    // process): each round overflows the queue once the daemon reads it again. The last
    // round writes a file once the queue is full: only a rescan after it can find it.
    let rounds = 6;
    let started = std::time::Instant::now();
    for round in 1..=rounds {
        d.signal(rustix::process::Signal::STOP);
        for i in 0..queue / 3 + 2_000 {
            let p = t.path(format!("churn/x{i}"));
            fs::File::create(&p).unwrap();
            fs::remove_file(&p).unwrap();
        }
        if round == rounds {
            fs::write(t.path("churn/lost"), b"its events were lost\n").unwrap();
        }
        d.signal(rustix::process::Signal::CONT);
        // Time for it to read its queue (the overflow is queued at its end) before the next.
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for("the file whose events were lost", || {
        manifest_lines(&manifest) == 2
    });
    // Paced 5 s apart at least: one at the first overflow, one at the end, and one per 5 s
    // the rounds took (2-3 s on a quiet machine, 15 s on a loaded one: CI saw 4 rescans so).
    let took = started.elapsed();
    let most = 2 + (took.as_secs() / 5) as usize;
    let out = d.stop();
    let s = out.success().summary();
    let err = out.stderr();
    let rescans = err.matches("rescanning the whole tree").count();
    assert!(
        err.contains("overflowed"),
        "{rounds} rounds did not overflow the queue, so this test proved nothing"
    );
    assert!(
        (1..=most).contains(&rescans),
        "{rescans} rescans for {rounds} rounds of overflows in {took:?}: {err}"
    );
    assert_eq!(s["done"], 2, "{s}");
    assert_sha256sum_c(&manifest, &t.root());
}

#[test]
fn a_file_in_flight_at_an_overflow_is_read_again_and_said_so() {
    // The overflow's rescan finds a file a worker is still compressing. It may have changed
    // unseen (a write through a shared mapping changes no stamp, and its close may be among
    // the lost events), so it is read again once back, whatever its stamp, and counts done
    // twice: the daemon says so, with how many such files, and every other file counts once.
    let t = TestTree::new().file("marker", b"ready");
    let d = Daemon::ready(
        &t,
        &["--op", "gzip", "--level", "9", "--durability", "none"],
    );
    wait_for("the initial scan", || gz_of(&t.path("marker")).exists());
    for d in 0..20 {
        fs::create_dir_all(t.path(format!("burst/d{d}"))).unwrap();
    }
    fs::write(t.path("burst/d19/sentinel"), b"watched").unwrap();
    wait_for("the burst directories to be watched", || {
        gz_of(&t.path("burst/d19/sentinel")).exists()
    });
    let Some(queue) = overflowable_queue() else {
        return;
    };
    // Long enough at gzip -9 (seconds) to be in flight still when the overflow is read.
    let big = t.path("big.txt");
    fs::write(&big, text_bytes(96 << 20, 7)).unwrap();
    wait_for("a worker to open big.txt", || opens(d.pid(), &big));
    let n = (queue / 2).max(20_000);
    d.signal(rustix::process::Signal::STOP);
    for i in 0..n {
        fs::write(t.path(format!("burst/d{}/f{i}", i % 20)), format!("{i}\n")).unwrap();
    }
    d.signal(rustix::process::Signal::CONT);
    let expected = n as u64 + 3;
    wait_for_burst(&d, expected);
    let out = d.stop();
    let s = out.success().summary();
    assert!(
        out.stderr().contains("overflowed"),
        "the burst did not overflow the queue, so this test proved nothing"
    );
    let again = read_again(&out.stderr()).unwrap_or_else(|| {
        panic!("big.txt was being read at the overflow, and no line said it is read again")
    });
    assert_eq!(
        s["done"],
        expected + again,
        "exactly once but the {again} read again: {s}"
    );
    let gzip_t = tool(
        "gzip",
        &[OsStr::new("-t"), gz_of(&big).as_os_str()],
        &t.root(),
    );
    assert!(gzip_t.status.success(), "{gzip_t:?}");
}

/// A file made ready again while in flight (a chmod: taken again once back only if it
/// changed) and then in flight at an overflow (taken again whatever its stamp) is in the
/// overflow's count of files read again: it was read again, and counted done twice, but the
/// count left it out, as one already to be looked at (found by a review: 10 files counted
/// twice where the warning said 9).
#[test]
fn a_file_chmod_ed_in_flight_then_in_flight_at_an_overflow_is_said_read_again() {
    let t = TestTree::new().file("marker", b"ready");
    let d = Daemon::ready(
        &t,
        &["--op", "gzip", "--level", "9", "--durability", "none"],
    );
    wait_for("the initial scan", || gz_of(&t.path("marker")).exists());
    for d in 0..20 {
        fs::create_dir_all(t.path(format!("burst/d{d}"))).unwrap();
    }
    fs::write(t.path("burst/d19/sentinel"), b"watched").unwrap();
    wait_for("the burst directories to be watched", || {
        gz_of(&t.path("burst/d19/sentinel")).exists()
    });
    let Some(queue) = overflowable_queue() else {
        return;
    };
    let big = t.path("big.txt");
    fs::write(&big, text_bytes(96 << 20, 9)).unwrap();
    wait_for("a worker to open big.txt", || opens(d.pid(), &big));
    fs::set_permissions(&big, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Past the settle time: the chmod has made it ready while a worker has it.
    std::thread::sleep(Duration::from_secs(1));
    let n = (queue / 2).max(20_000);
    d.signal(rustix::process::Signal::STOP);
    for i in 0..n {
        fs::write(t.path(format!("burst/d{}/f{i}", i % 20)), format!("{i}\n")).unwrap();
    }
    d.signal(rustix::process::Signal::CONT);
    let expected = n as u64 + 3;
    wait_for_burst(&d, expected);
    let out = d.stop();
    let s = out.success().summary();
    assert!(
        out.stderr().contains("overflowed"),
        "the burst did not overflow the queue, so this test proved nothing"
    );
    let again = read_again(&out.stderr()).unwrap_or_else(|| {
        panic!("big.txt was being read at the overflow, and no line said it is read again: {s}")
    });
    assert_eq!(
        s["done"],
        expected + again,
        "exactly once but the {again} read again: {s}"
    );
}

#[test]
fn restart_after_sigkill_processes_only_new_and_changed_files() {
    let mut t = TestTree::new();
    for i in 0..10 {
        t = t.file(format!("old/{i}"), format!("old {i}\n").as_bytes());
    }
    let manifest = t.side("SHA256SUMS");
    let args = ["--op", "sha256", "--manifest", manifest.to_str().unwrap()];
    let d = Daemon::ready(&t, &args);
    wait_for("the first ten", || manifest_lines(&manifest) == 10);
    // Committed: the watcher hears of a file only once its state row is.
    d.wait_idle(10);
    d.kill();
    // While it is down: five new files and one changed.
    fs::create_dir_all(t.path("new")).unwrap();
    for i in 0..5 {
        fs::write(t.path(format!("new/{i}")), format!("new {i}\n")).unwrap();
    }
    fs::write(t.path("old/3"), b"changed while down\n").unwrap();
    let d = Daemon::ready(&t, &args);
    wait_for("the new files", || manifest_lines(&manifest) == 15);
    wait_for("the changed file", || {
        tool(
            "sha256sum",
            &[
                OsStr::new("-c"),
                OsStr::new("--quiet"),
                manifest.as_os_str(),
            ],
            &t.root(),
        )
        .status
        .success()
    });
    d.wait_idle(6);
    let s = d.stop().success().summary();
    assert_eq!(s["done"], 6, "only the new and the changed: {s}");
}

#[test]
fn deleted_root_is_reported_and_exits_nonzero() {
    let t = TestTree::new().file("f", b"x");
    let d = Daemon::ready(&t, &["--op", "sha256"]);
    fs::remove_dir_all(t.root()).unwrap();
    assert!(d.wait().code(1).stderr().contains("deleted or moved"));
}

/// A state directory, or its database, deleted while the daemon runs: it stops, saying so, at
/// the next commit, rather than go on recording into a database no name leads to (everything
/// done since would be done again at the next start, with nothing said). Its lock file removed
/// (another daemon could take the directory too): it stops, saying that.
#[test]
fn a_state_directory_deleted_while_running_stops_the_daemon_saying_so() {
    for gone in ["the directory", "the database", "the lock"] {
        let t = TestTree::new().file("f", b"x");
        let d = Daemon::ready(&t, &["--op", "sha256"]);
        d.wait_idle(1);
        let state = t.side("state");
        let (names, says): (&[&str], _) = match gone {
            "the directory" => (&[], "was deleted or replaced while filepipe ran"),
            "the database" => (
                &[
                    "filepipe.sqlite",
                    "filepipe.sqlite-wal",
                    "filepipe.sqlite-shm",
                ],
                "state database in",
            ),
            _ => (&["filepipe.lock"], "lock file of the state directory"),
        };
        if names.is_empty() {
            fs::remove_dir_all(&state).unwrap();
        }
        for name in names {
            let _ = fs::remove_file(state.join(name));
        }
        fs::write(t.path("g"), b"y").unwrap();
        let said = d.wait().code(1).stderr();
        assert!(said.contains(says), "{gone}: {said}");
    }
}

/// A directory made while the daemon runs with a name like a writer's temp file (`data.tmp`,
/// `old~`) is watched and scanned, as the walk at the start takes the files in it: the name
/// rule, meant for files, was applied to it, and its files were never taken (found by a
/// review). Removed, its files are forgotten. A directory's own attribute changes (`chmod`)
/// are no file to take: it was sent to the workers and skipped as a special file.
#[test]
fn directories_named_like_temps_are_watched_and_their_chmod_is_no_file() {
    let t = TestTree::new().file("a", b"a\n");
    let manifest = t.side("SUMS");
    let d = Daemon::ready(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
    );
    d.wait_idle(1);
    fs::create_dir(t.path("data.tmp")).unwrap();
    fs::create_dir(t.path("old~")).unwrap();
    fs::write(t.path("data.tmp/f1"), b"1\n").unwrap();
    fs::write(t.path("old~/f2"), b"2\n").unwrap();
    d.wait_idle(3);
    std::fs::set_permissions(
        t.path("data.tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    fs::write(t.path("b"), b"b\n").unwrap();
    d.wait_idle(4);
    wait_until(Duration::from_secs(30), "4 files in the manifest", || {
        manifest_lines(&manifest) == 4
    });
    fs::remove_dir_all(t.path("data.tmp")).unwrap();
    wait_until(Duration::from_secs(30), "3 files in the manifest", || {
        manifest_lines(&manifest) == 3
    });
    let listed = fs::read_to_string(&manifest).unwrap();
    assert!(listed.contains("  old~/f2\n"), "{listed}");
    let sum = d.stop().success().summary();
    assert_eq!(sum["skipped"], 0, "{sum}");
}

/// An empty tree and a daemon hashing it into a manifest as `nobody`, for another user to
/// write in (`as_writer`); `None` (said: skipped) unless the tests run as root.
fn unprivileged_daemon() -> Option<(TestTree, PathBuf, Daemon)> {
    if !is_root() {
        eprintln!("SKIPPED: needs root, to write as one user what the daemon reads as another");
        return None;
    }
    let t = TestTree::new();
    let manifest = t.side("SUMS");
    let d = Daemon::ready_unprivileged(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
    );
    Some((t, manifest, d))
}

/// Runs `script` in `t`'s tree as another user than the daemon's (uid 1234).
fn as_writer(t: &TestTree, script: &str) {
    let st = std::process::Command::new("setpriv")
        .args(["--reuid=1234", "--regid=1234", "--clear-groups", "sh", "-c"])
        .arg(script)
        .current_dir(t.root())
        .status()
        .unwrap();
    assert!(st.success(), "{script}");
}

/// A directory made unreadable to the daemon (`umask 077` by its writer) and opened up later
/// (`chmod 755`) is watched and scanned then: the watch that failed at its creation was never
/// tried again, and no file in it was ever taken, not even one written after the chmod (found
/// by a review). Run as `nobody` when the tests run as root, as CI does; the writer is
/// another user.
#[test]
fn a_directory_opened_up_after_it_came_is_watched_then() {
    let Some((t, manifest, d)) = unprivileged_daemon() else {
        return;
    };
    let up = t.path("up");
    let as_writer = |script: &str| as_writer(&t, script);
    as_writer("umask 077; mkdir up; echo one > up/f1");
    // Touched again and again while still closed: each touch retries the watch, and fails,
    // but reports nothing more (a touch in a loop filled the failure log at 3 MB/s: found by
    // a review).
    as_writer("for i in $(seq 50); do touch up; done");
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&up).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    as_writer("chmod 755 up; chmod 644 up/f1; echo two > up/f2; chmod 644 up/f2");
    wait_until(
        Duration::from_secs(30),
        "both files in the manifest",
        || {
            fs::read_to_string(&manifest)
                .is_ok_and(|m| m.contains("  up/f1\n") && m.contains("  up/f2\n"))
        },
    );
    let sum = d.stop().success().summary();
    assert!(sum["failed"].as_u64() <= Some(1), "{sum}");
}

/// A file in a directory its daemon may list but not search (mode 0744, another user's) is
/// reported failed, and taken once the directory is opened up (`chmod 755`): the missing
/// stamp was taken for a file gone, nothing was reported, and the chmod of a directory the
/// daemon watched led to no scan, so the file was never accounted for (found by a review).
/// Run as `nobody` when the tests run as root, as CI does; the writer is another user.
#[test]
fn a_file_in_a_directory_listed_but_not_searchable_is_reported_then_taken_once_opened_up() {
    let Some((t, manifest, d)) = unprivileged_daemon() else {
        return;
    };
    let as_writer = |script: &str| as_writer(&t, script);
    // Closed while it is written, then listable only.
    as_writer("umask 077; mkdir half; echo one > half/f1; chmod 644 half/f1; chmod 744 half");
    let failed = || d.notes.last_status().map_or(0, |s| s.failed);
    wait_until(Duration::from_secs(30), "the file reported", || {
        failed() >= 1
    });
    // Touched, its mode unchanged: no scan, no report more.
    as_writer("for i in $(seq 20); do touch half; done");
    // A file written there now is reported too, from its events: taken for a file gone, it
    // was not (found by a review).
    let before = failed();
    as_writer("echo two > half/f2; chmod 644 half/f2");
    wait_until(Duration::from_secs(30), "the new file reported", || {
        failed() > before
    });
    // Its mode changed back and forth, never so the daemon may enter it: no scan, no report
    // more (a scan at each change reported the directory each time: found by a review).
    as_writer("for i in 1 2 3 4 5; do chmod 740 half; chmod 744 half; done");
    as_writer("chmod 755 half");
    wait_until(
        Duration::from_secs(30),
        "both files in the manifest",
        || {
            fs::read_to_string(&manifest)
                .is_ok_and(|m| m.contains("  half/f1\n") && m.contains("  half/f2\n"))
        },
    );
    let out = d.stop();
    let sum = out.success().summary();
    assert_eq!(sum["done"], 2, "{sum}");
    // The files; and the directory, if the daemon saw it while it was still closed (0700).
    let denied = sum["failed_by_reason"]["permission-denied"].as_u64();
    assert!(matches!(denied, Some(2 | 3)), "{sum}");
    let err = out.stderr();
    assert!(
        err.lines()
            .any(|l| l.contains("path=half/f2") && l.contains("Permission denied")),
        "{err}"
    );
}

/// A tree of `n` small files `d/f{i}` and a daemon compressing with zstd -19 (slow enough, in
/// a debug build, for a large file to stay in flight while a test acts), with `--out` and a
/// manifest, idle once those are done: (tree, out, manifest, daemon).
fn slow_daemon(n: u64) -> (TestTree, PathBuf, PathBuf, Daemon) {
    let mut t = TestTree::new();
    for i in 0..n {
        t = t.file(format!("d/f{i}"), format!("{i}\n").as_bytes());
    }
    let (out, manifest) = (t.side("o"), t.side("SUMS"));
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "sha256,zstd",
            "--level",
            "19",
            "--out",
            out.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ],
    );
    d.wait_idle(n);
    (t, out, manifest, d)
}

/// Renames a file of `mb` MiB of noise into `d/big`, written beside the tree first, and waits
/// until it is in flight.
fn big_in_flight(t: &TestTree, d: &Daemon, mb: usize, seed: u64) {
    fs::write(t.side("big"), noise_bytes(mb << 20, seed)).unwrap();
    fs::rename(t.side("big"), t.path("d/big")).unwrap();
    wait_until(Duration::from_secs(60), "the big file in flight", || {
        d.notes.last_status().is_some_and(|s| s.in_flight == 1)
    });
}

/// A directory swapped for another (`rename(RENAME_EXCHANGE)`) while a file in it is being
/// compressed leaves no row of that file once it is recorded: the deletion, applied when the
/// path was there again, was not held back for the file in flight, whose outcome brought back
/// a row of what had gone (found by a review: `sha256sum -c` failed, `d/big: No such file`).
#[test]
fn a_directory_swapped_while_a_file_in_it_is_in_flight_leaves_no_row_of_it() {
    let (t, out, manifest, d) = slow_daemon(3);
    big_in_flight(&t, &d, 12, 5);
    let other = t.side("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("new"), b"fresh\n").unwrap();
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        t.path("d"),
        rustix::fs::CWD,
        &other,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .unwrap();
    assert!(
        !out.join("d/big.zst").exists(),
        "the big file was done before the swap: nothing tested (a bigger file?)"
    );
    // The big file recorded (it was read whole), then its row gone from the state, then the
    // manifest rewritten from the state.
    d.wait_idle(5);
    let state_paths = || -> Vec<String> {
        let conn = rusqlite::Connection::open(t.side("state").join("filepipe.sqlite")).unwrap();
        let mut stmt = conn
            .prepare("SELECT DISTINCT path FROM files ORDER BY path")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap();
        rows.map(|p| String::from_utf8(p.unwrap()).unwrap())
            .collect()
    };
    wait_until(Duration::from_secs(30), "only d/new in the state", || {
        state_paths() == ["d/new"]
    });
    wait_until(
        Duration::from_secs(30),
        "only d/new in the manifest",
        || {
            fs::read_to_string(&manifest).is_ok_and(|m| {
                let names: Vec<&str> = m.lines().filter_map(|l| l.get(66..)).collect();
                names == ["d/new"]
            })
        },
    );
    assert_sha256sum_c(&manifest, &t.root());
    d.stop().success();
}

/// A FIFO or a symlink made while the daemon runs is reported, as the scan at the start
/// reports them: they waited for ever as files linked in whole that never got content (found
/// by a review: in no summary, state or failure log).
#[test]
fn a_fifo_or_symlink_made_while_watching_is_reported() {
    let t = TestTree::new().file("a", b"a\n");
    let d = Daemon::ready(&t, &["--op", "sha256"]);
    d.wait_idle(1);
    mkfifo(&t.path("p"));
    std::os::unix::fs::symlink("/etc/hosts", t.path("l")).unwrap();
    wait_until(Duration::from_secs(30), "both reported", || {
        d.notes
            .last_status()
            .is_some_and(|s| s.idle() && s.skipped == 2)
    });
    let sum = d.stop().success().summary();
    assert_eq!(sum["skipped"], 2, "{sum}");
}

/// Directories made with a file in them and renamed at once: where each went is heard and its
/// file done, none is a failure, and the daemon goes idle. Each scanned after it had gone
/// (its creation heard) was counted a failed file, `vanished` (found by a review: 4 failures
/// in 20); and files heard at their first path after the rename stayed queued for ever.
#[test]
fn directories_made_and_renamed_at_once_are_no_failures() {
    let t = TestTree::new();
    let manifest = t.side("SUMS");
    let d = Daemon::ready(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
    );
    for i in 0..500 {
        let made = t.path(format!("d{i}"));
        fs::create_dir_all(made.join("sub")).unwrap();
        fs::write(made.join("sub/f"), format!("{i}\n")).unwrap();
        fs::rename(&made, t.path(format!("e{i}"))).unwrap();
    }
    // A file may be done at its first path too, before the rename is heard: 500 at least.
    // And idle: a file's events heard at its first path after its directory was renamed left
    // it queued there, waiting for a close, until the daemon stopped (forgotten now within a
    // few seconds of its name going).
    d.wait_idle_where("500 done at least", |s| s.done >= 500);
    // The manifest is rewritten at most once a second after a change.
    wait_until(Duration::from_secs(30), "500 files in the manifest", || {
        manifest_lines(&manifest) == 500
    });
    assert_sha256sum_c(&manifest, &t.root());
    let sum = d.stop().success().summary();
    assert_eq!(sum["failed"], 0, "{sum}");
}

/// A directory renamed away and back while a file under it is being compressed keeps every
/// file done in the state and the manifest. Its removal, held back until that file was
/// recorded, then deleted every row under the directory as it was by then: the 20 files done
/// before, and the one just done (found by a review: the manifest emptied, and stayed so).
#[test]
fn a_directory_renamed_away_and_back_while_a_file_in_it_is_in_flight_keeps_its_files() {
    let (t, out, manifest, d) = slow_daemon(20);
    big_in_flight(&t, &d, 24, 7);
    fs::rename(t.path("d"), t.path("d.tmp")).unwrap();
    fs::rename(t.path("d.tmp"), t.path("d")).unwrap();
    assert!(
        !out.join("d/big.zst").exists(),
        "the big file was done before the renames: nothing tested (a bigger file?)"
    );
    d.wait_idle(21);
    // The manifest is rewritten at most once a second after a change.
    wait_until(Duration::from_secs(30), "21 files in the manifest", || {
        manifest_lines(&manifest) == 21
    });
    assert_sha256sum_c(&manifest, &t.root());
    d.stop().success();
}

/// The root swapped for a symlink to elsewhere (one `rename(RENAME_EXCHANGE)`, by whoever owns
/// its parent) is a root moved: the daemon stops and says so. It went on (its check followed
/// the link), its rescans scanned the link's target outside the root, listed what is there in
/// the failure log, and emptied the manifest (found by a review).
#[test]
fn a_root_swapped_for_a_symlink_is_reported_and_exits_nonzero() {
    let t = TestTree::new().file("a", b"alpha\n").file("b", b"beta\n");
    let elsewhere = t.side("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(elsewhere.join("secret"), b"not ours\n").unwrap();
    let manifest = t.side("SUMS");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "sha256",
            "--poll",
            "1",
            "--manifest",
            manifest.to_str().unwrap(),
        ],
    );
    d.wait_idle(2);
    let link = t.side("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        t.root(),
        rustix::fs::CWD,
        &link,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .unwrap();
    let run = d.wait();
    assert!(
        run.code(1).stderr().contains("deleted or moved"),
        "{}",
        run.stderr()
    );
    let listed = fs::read_to_string(&manifest).unwrap();
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(!run.stderr().contains("secret"), "{}", run.stderr());
}

/// A file named with the op's suffix is filepipe's output only where its input is beside it.
/// One alone (a user's `x.gz`, there at the start or dropped in later) is a file of the tree:
/// skipped with the reason, as a batch skips it, and not reported again at the next start;
/// the outputs filepipe makes are never reported.
#[test]
fn a_gz_whose_input_is_not_beside_it_is_skipped_with_the_reason() {
    let t = TestTree::new().file("a.txt", &text_bytes(5_000, 1));
    let plain = t.side("plain");
    fs::write(&plain, b"a user's file\n").unwrap();
    let gz = tool("gzip", &[OsStr::new("-c"), plain.as_os_str()], &t.root()).stdout;
    let t = t.file("old.gz", &gz).file("sub/.gz", &gz);
    let log = t.side("failures.jsonl");
    let args = ["--op", "gzip", "--failure-log", log.to_str().unwrap()];
    let d = Daemon::ready(&t, &args);
    // Dropped in as writers do (a temp renamed), and beside a directory of the input's name:
    // a directory is no input of filepipe's.
    fs::write(t.path("dropped.part"), &gz).unwrap();
    fs::rename(t.path("dropped.part"), t.path("dropped.gz")).unwrap();
    fs::create_dir(t.path("backup")).unwrap();
    fs::write(t.path("backup.gz"), &gz).unwrap();
    fs::write(t.path("b.txt"), text_bytes(5_000, 2)).unwrap();
    let skipped = || {
        let mut names: Vec<String> = records_of(&failure_log(&log), "already-compressed")
            .iter()
            .map(|r| r["path"].as_str().unwrap_or_default().to_string())
            .collect();
        names.sort();
        names
    };
    wait_for("the four files alone reported", || skipped().len() == 4);
    let s = d.wait_idle(2);
    assert_eq!((s.skipped, s.failed), (4, 0), "{s:?}");
    let out = d.stop();
    out.success();
    assert_eq!(
        skipped(),
        ["backup.gz", "dropped.gz", "old.gz", "sub/.gz"],
        "{}",
        out.stderr()
    );
    for f in ["a.txt.gz", "b.txt.gz"] {
        let test = tool(
            "gzip",
            &[OsStr::new("-t"), t.path(f).as_os_str()],
            &t.root(),
        );
        assert!(test.status.success(), "{f}: {test:?}");
    }
    assert_eq!(fs::read(t.path("old.gz")).unwrap(), gz, "never written to");
    // Recorded skipped with their stamps: the next start does not report them again.
    let d = Daemon::ready(&t, &args);
    fs::write(t.path("c.txt"), b"after the restart\n").unwrap();
    let s = d.wait_idle(1);
    assert_eq!((s.skipped, s.failed), (0, 0), "{s:?}");
    d.stop().success();
    assert_eq!(skipped().len(), 4);
}

/// A file named like a writer's temp (`*.tmp`, `*.part`, ...) is never taken, but one left
/// unchanged (200 settle times) is a file of the tree: reported skipped `writer-temp`, once
/// per version, there at the start or made later. Before, it was never reported (found by
/// a review). A temp renamed to its real name, or left out by the filters, is not reported.
#[test]
fn a_writers_temp_left_unchanged_is_reported_skipped() {
    let t = TestTree::new()
        .file("left.tmp", b"a user's file\n")
        .file("sub/x.part", b"another\n")
        .file("a.txt", b"plain\n");
    let log = t.side("failures.jsonl");
    let args = [
        "--op",
        "sha256",
        "--settle",
        "10",
        "--exclude",
        "*.crdownload",
        "--failure-log",
        log.to_str().unwrap(),
    ];
    let d = Daemon::ready(&t, &args);
    fs::write(t.path("dl.part"), b"stalled\n").unwrap();
    fs::write(t.path("going.tmp"), b"renamed at once\n").unwrap();
    fs::rename(t.path("going.tmp"), t.path("going.txt")).unwrap();
    fs::write(t.path("skip.crdownload"), b"excluded\n").unwrap();
    let reported = || {
        let mut names: Vec<String> = records_of(&failure_log(&log), "writer-temp")
            .iter()
            .map(|r| r["path"].as_str().unwrap_or_default().to_string())
            .collect();
        names.sort();
        names
    };
    wait_for("the three temps left reported", || reported().len() >= 3);
    // A new version is reported again.
    fs::write(t.path("left.tmp"), b"changed\n").unwrap();
    wait_for("the new version reported", || reported().len() == 4);
    d.wait_idle(2);
    let out = d.stop();
    let s = out.success().summary();
    assert_eq!((&s["done"], &s["skipped"]), (&2.into(), &4.into()), "{s}");
    assert_eq!(
        reported(),
        ["dl.part", "left.tmp", "left.tmp", "sub/x.part"],
        "{}",
        out.stderr()
    );
    // Recorded with their stamps: the next start does not report them again.
    let d = Daemon::ready(&t, &args);
    fs::write(t.path("b.txt"), b"after the restart\n").unwrap();
    d.wait_idle(1);
    // Past the quiet time (2 s): what was found at the start was not followed.
    std::thread::sleep(Duration::from_secs(3));
    let out = d.stop();
    let s = out.success().summary();
    assert_eq!(s["skipped"], 0, "{s}");
    assert_eq!(reported().len(), 4);
}

/// A file whose output name another hand's file holds fails `output-exists`, the message
/// saying to move that file away (watch has no `--force`); once it is moved away, the watch
/// takes the file again by itself: no restart, no change to the file.
#[test]
fn a_file_blocked_at_its_output_name_is_done_once_the_other_file_is_moved_away() {
    let t = TestTree::new().file("a.txt.gz", b"someone else's\n");
    let log = t.side("failures.jsonl");
    let d = Daemon::ready(
        &t,
        &["--op", "gzip", "--failure-log", log.to_str().unwrap()],
    );
    fs::write(t.path("a.txt"), b"mine\n").unwrap();
    wait_for("the output-exists failure", || {
        !records_of(&failure_log(&log), "output-exists").is_empty()
    });
    let failures = failure_log(&log);
    let refused = records_of(&failures, "output-exists")[0];
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("move it away") && !m.contains("--force")),
        "{refused}"
    );
    assert_eq!(fs::read(t.path("a.txt.gz")).unwrap(), b"someone else's\n");
    fs::rename(t.path("a.txt.gz"), t.side("moved.gz")).unwrap();
    d.wait_idle(1);
    let out = tool(
        "gzip",
        &[OsStr::new("-dc"), OsStr::new("a.txt.gz")],
        &t.root(),
    );
    assert_eq!(out.stdout, b"mine\n");
    assert_eq!(fs::read(t.side("moved.gz")).unwrap(), b"someone else's\n");
    // Counted by how it ended: done, not also failed (found by a review); the other file
    // is skipped, already compressed.
    let s = d.stop().success().summary();
    assert_eq!(
        (
            s["files"].as_u64(),
            s["done"].as_u64(),
            s["failed"].as_u64()
        ),
        (Some(2), Some(1), Some(0)),
        "{s}"
    );
    assert_eq!(s["failed_by_reason"], serde_json::json!({}), "{s}");
}

/// Many such files, their other files moved away at the first failure recorded in the log:
/// the moves' events reach the watch while most of the failures are not recorded yet (the
/// log is written before the state's commit). Each file is still taken again (before, those
/// whose event came first waited for a restart; found by CI as a flaky test above).
#[test]
fn files_whose_output_names_are_freed_while_their_failures_are_recorded_are_done() {
    const N: usize = 40;
    let mut t = TestTree::new();
    for i in 0..N {
        t = t.file(format!("f{i}.txt.gz"), b"someone else's\n");
    }
    let log = t.side("failures.jsonl");
    let d = Daemon::ready(
        &t,
        &["--op", "gzip", "--failure-log", log.to_str().unwrap()],
    );
    for i in 0..N {
        fs::write(t.path(format!("f{i}.txt")), format!("mine {i}\n")).unwrap();
    }
    wait_for("an output-exists failure", || {
        !records_of(&failure_log(&log), "output-exists").is_empty()
    });
    let aside = t.side("aside");
    fs::create_dir(&aside).unwrap();
    for i in 0..N {
        let name = format!("f{i}.txt.gz");
        fs::rename(t.path(&name), aside.join(&name)).unwrap();
    }
    d.wait_idle(N as u64);
    for i in 0..N {
        let out = tool(
            "gzip",
            &[OsStr::new("-dc"), OsStr::new(&format!("f{i}.txt.gz"))],
            &t.root(),
        );
        assert_eq!(out.stdout, format!("mine {i}\n").as_bytes());
    }
    let s = d.stop().success().summary();
    assert_eq!(
        (
            s["files"].as_u64(),
            s["done"].as_u64(),
            s["failed"].as_u64()
        ),
        (Some(2 * N as u64), Some(N as u64), Some(0)),
        "{s}"
    );
}

/// A blocked file taken again once its output name is freed, while a writer holds it open
/// (`in-use`, an attempt to be made again), and the watch stopped then: one file, failed
/// `in-use`, as it last ended (it counted twice: `output-exists` and `in-use`; found by a
/// review).
#[test]
fn a_blocked_file_taken_again_and_found_in_use_counts_once() {
    blocked_then_in_use(false);
}

/// The same, the file then deleted while it waits for its next attempt: it ended failed
/// `output-exists`, and stays counted so (it went uncounted: found by a review).
#[test]
fn a_blocked_file_taken_again_in_use_and_deleted_stays_counted() {
    blocked_then_in_use(true);
}

/// A blocked file's output name freed while a writer holds it open; deleted then if `delete`.
fn blocked_then_in_use(delete: bool) {
    let t = TestTree::new().file("a.txt", b"mine\n");
    let out = t.side("out");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("a.txt.gz"), b"someone else's\n").unwrap();
    let log = t.side("failures.jsonl");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "gzip",
            "--out",
            out.to_str().unwrap(),
            "--failure-log",
            log.to_str().unwrap(),
        ],
    );
    wait_for("the output-exists failure", || {
        !records_of(&failure_log(&log), "output-exists").is_empty()
    });
    // Open for writing, nothing written: the next attempt finds it in use.
    let _writer = fs::OpenOptions::new()
        .append(true)
        .open(t.path("a.txt"))
        .unwrap();
    fs::remove_file(out.join("a.txt.gz")).unwrap();
    wait_for("the in-use attempt", || {
        failure_log(&log)
            .iter()
            .any(|r| r["status"] == "retrying" && r["error"] == "in-use")
    });
    let last = if delete {
        fs::remove_file(t.path("a.txt")).unwrap();
        d.wait_idle_where("the deletion heard", |s| s.retrying == 0);
        "output-exists"
    } else {
        "in-use"
    };
    let s = d.stop().success().summary();
    assert_eq!(
        (s["files"].as_u64(), s["failed"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(s["failed_by_reason"], serde_json::json!({ last: 1 }), "{s}");
}

/// The same with `--out`: the output tree makes no events for the watch, so it looks at the
/// blocked names itself (before, the file waited for a restart or a change of its own).
#[test]
fn with_out_a_file_blocked_at_its_output_name_is_done_once_the_other_file_is_moved_away() {
    let t = TestTree::new().file("d/a.txt", b"mine\n");
    let out = t.side("out");
    fs::create_dir_all(out.join("d")).unwrap();
    fs::write(out.join("d/a.txt.gz"), b"someone else's\n").unwrap();
    let log = t.side("failures.jsonl");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "gzip",
            "--out",
            out.to_str().unwrap(),
            "--failure-log",
            log.to_str().unwrap(),
        ],
    );
    wait_for("the output-exists failure", || {
        !records_of(&failure_log(&log), "output-exists").is_empty()
    });
    assert_eq!(
        fs::read(out.join("d/a.txt.gz")).unwrap(),
        b"someone else's\n"
    );
    fs::rename(out.join("d/a.txt.gz"), t.side("moved.gz")).unwrap();
    d.wait_idle(1);
    let unzipped = tool("gzip", &[OsStr::new("-dc"), OsStr::new("d/a.txt.gz")], &out);
    assert_eq!(unzipped.stdout, b"mine\n");
    assert_eq!(fs::read(t.side("moved.gz")).unwrap(), b"someone else's\n");
    // Counted by how it ended: done, not also failed (found by a review).
    let s = d.stop().success().summary();
    assert_eq!(
        (
            s["files"].as_u64(),
            s["done"].as_u64(),
            s["failed"].as_u64()
        ),
        (Some(1), Some(1), Some(0)),
        "{s}"
    );
    assert_eq!(s["failed_by_reason"], serde_json::json!({}), "{s}");
}

#[test]
fn status_lists_failed_files_from_the_state() {
    let long = "n".repeat(253);
    let t = TestTree::new()
        .file(&long, b"cannot take .gz")
        .file("ok", b"fine");
    let d = Daemon::ready(&t, &["--op", "gzip"]);
    wait_for("the good file", || t.path("ok.gz").exists());
    let idle = d.wait_idle(1);
    assert_eq!(idle.failed, 1, "{idle:?}");
    let s = d.stop().success().summary();
    assert_eq!(
        (s["done"].as_u64(), s["failed"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    let text = run(filepipe(&[
        OsStr::new("status"),
        OsStr::new("--state"),
        t.side("state").as_os_str(),
        OsStr::new("--failed"),
    ]))
    .success()
    .stdout();
    assert!(text.contains("\tgzip\tdone\t1"), "{text}");
    let failed: Vec<&str> = text.lines().filter(|l| l.starts_with("FAILED")).collect();
    assert_eq!(failed.len(), 1, "{text}");
    assert!(
        failed[0].contains("name-too-long")
            && failed[0]
                .as_bytes()
                .windows(253)
                .any(|w| w == long.as_bytes())
    );
}

/// `filepipe status`, run again and again while the daemon records a stream of files, never
/// stops the daemon; and the daemon holds SQLite's lock on its WAL index (`-shm`) all along.
/// The state's open had opened that file itself and closed it, and a close drops every POSIX
/// lock the process holds on the file: each `status` then took itself for the first to open
/// the state and cut the index under the daemon's mapping (SIGBUS, exit 135, within a few
/// hundred runs of `status`; seen in CI as a daemon killed at its stop in another test).
///
/// Both where the state's blocks are pages (the temp directory's file system: the index is not
/// opened by filepipe) and where they are 1 KiB (an ext4 below 512 MiB, root only: the index is
/// opened, to allocate its blocks, and held open).
#[test]
fn status_run_while_files_come_never_stops_the_daemon() {
    let small_blocks = match common::strace::JournaledFs::with(&["-b", "1024"]) {
        Ok(fs) => Some(fs),
        Err(why) => {
            eprintln!("SKIPPED a state on 1 KiB blocks: {why}");
            None
        }
    };
    let t = TestTree::new();
    status_while_files_come(&t, &t.side("state"));
    if let Some(fs) = &small_blocks {
        let t = TestTree::new();
        status_while_files_come(&t, &fs.path().join("state"));
    }
}

fn status_while_files_come(t: &TestTree, state: &Path) {
    use std::os::unix::fs::MetadataExt;
    fs::write(t.path("first"), b"1\n").unwrap();
    let d = Daemon::ready(t, &["--op", "sha256", "--state", state.to_str().unwrap()]);
    d.wait_idle(1);
    let shm = state.join("filepipe.sqlite-shm");
    let ino = fs::metadata(&shm).unwrap().ino();
    let locks = fs::read_to_string("/proc/locks").unwrap();
    let held = locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(4) == Some(&d.pid().to_string().as_str())
            && f.get(5).is_some_and(|id| id.ends_with(&format!(":{ino}")))
    });
    assert!(
        held,
        "the daemon holds no lock on {}:\n{locks}",
        shm.display()
    );
    let root = t.root();
    let writer = std::thread::spawn(move || {
        for i in 0..2000 {
            fs::write(root.join(format!("f{i}")), format!("{i}\n")).unwrap();
        }
    });
    let mut runs = 0;
    while !writer.is_finished() || runs < 50 {
        run(filepipe(&[
            OsStr::new("status"),
            OsStr::new("--state"),
            state.as_os_str(),
        ]))
        .success();
        runs += 1;
    }
    writer.join().unwrap();
    d.wait_idle(2001);
    let s = d.stop().success().summary();
    assert_eq!(s["done"], 2001, "{}: {s}", state.display());
}

/// Past the inotify watch limit, the directories that could not be watched are scanned on an
/// interval (100 settle times: 1 s here) and their files taken; the daemon goes on and says
/// once which sysctl to raise. Before, the daemon ended (exit 1), and anyone who may make
/// directories in the tree could end it, over and over under the shipped units (found by a
/// review).
#[test]
fn past_the_inotify_watch_limit_directories_are_scanned_on_an_interval() {
    // Lower this user namespace's own limit (Linux 5.11+) instead of the machine's.
    let mut t = TestTree::new();
    for d in ["a", "b", "c", "d", "e"] {
        t = t.file(format!("{d}/first"), d.as_bytes());
    }
    let (manifest, log) = (t.side("SUMS"), t.side("stderr.txt"));
    let script = r#"echo 3 > /proc/sys/user/max_inotify_watches || exit 99
exec "$@" 2> "$LOG""#;
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-r", "sh", "-c", script, "sh"])
        .env("LOG", &log)
        .arg(common::bin())
        .arg("watch")
        .arg(t.root())
        .args(["--op", "sha256", "--settle", "10", "--state"])
        .arg(t.side("state"))
        .arg("--manifest")
        .arg(&manifest)
        .stdout(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let listed = || {
        if fs::metadata(&manifest).is_err() {
            return 0;
        }
        manifest_names(&manifest).len()
    };
    wait_for("the five files there at the start", || {
        if let Ok(Some(status)) = child.try_wait() {
            let stderr = fs::read_to_string(&log).unwrap_or_default();
            assert_ne!(
                status.code(),
                Some(99),
                "cannot lower the limit here: {stderr}"
            );
            panic!("the daemon ended: {status}: {stderr}");
        }
        listed() == 5
    });
    // Three directories at most are watched (the root among them): the others' new files
    // are found by their scans.
    for d in ["a", "b", "c", "d", "e"] {
        fs::write(t.path(format!("{d}/second")), b"later\n").unwrap();
    }
    fs::create_dir(t.path("e/new")).unwrap();
    fs::write(t.path("e/new/third"), b"deeper\n").unwrap();
    wait_for("the six files made since", || listed() == 11);
    assert!(child.try_wait().unwrap().is_none(), "the daemon ended");
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let stderr = fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    let said = stderr.matches("inotify watch limit is exhausted").count();
    assert_eq!(said, 1, "said once: {stderr}");
    assert!(
        stderr.contains("max_user_watches"),
        "names the sysctl: {stderr}"
    );
}

#[test]
fn chmod_after_close_does_not_leave_a_file_waiting() {
    let t = TestTree::new();
    let d = Daemon::ready(&t, &["--op", "gzip"]);
    // Like install(1) or curl -R: write, close, then set the mode and times.
    fs::write(t.path("installed"), b"done writing\n").unwrap();
    let mut perms = fs::metadata(t.path("installed")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o640);
    fs::set_permissions(t.path("installed"), perms).unwrap();
    wait_for("the chmod'ed file", || t.path("installed.gz").exists());
    let s = d.stop().success().summary();
    assert_eq!(s["done"], 1, "{s}");
}

#[test]
fn files_in_new_directories_are_never_lost() {
    let t = TestTree::new();
    let manifest = t.side("SUMS");
    let d = Daemon::ready(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
    );
    // The race: a file created right after its directory, before any watch can exist on it.
    for n in 0..150 {
        fs::create_dir_all(t.path(format!("d{n}/b/c"))).unwrap();
        fs::write(t.path(format!("d{n}/b/c/f")), format!("{n}\n")).unwrap();
        fs::create_dir(t.path(format!("e{n}"))).unwrap();
        fs::write(t.path(format!("e{n}/g")), format!("{n}\n")).unwrap();
    }
    wait_for("all 300 files", || manifest_lines(&manifest) == 300);
    d.wait_idle(300);
    let s = d.stop().success().summary();
    assert_eq!(s["done"], 300, "{s}");
}

#[test]
fn deletions_leave_the_manifest_while_running_and_across_restarts() {
    let t = TestTree::new()
        .file("keep", b"k\n")
        .file("gone-while-down", b"g\n")
        .file("sub/a", b"a\n")
        .file("sub/b", b"b\n");
    let manifest = t.side("SUMS");
    let args = ["--op", "sha256", "--manifest", manifest.to_str().unwrap()];
    let outside = tempfile::tempdir().unwrap();
    let d = Daemon::ready(&t, &args);
    wait_for("four files", || manifest_lines(&manifest) == 4);
    // A directory moved out of the tree is one event for all its files.
    fs::rename(t.path("sub"), outside.path().join("sub")).unwrap();
    wait_for("the moved directory's files to leave", || {
        manifest_lines(&manifest) == 2
    });
    d.stop().success().summary();
    // Deleted while the daemon was down: the start-up scan reconciles.
    fs::remove_file(t.path("gone-while-down")).unwrap();
    let d = Daemon::ready(&t, &args);
    wait_for("the deleted file to leave", || {
        manifest_lines(&manifest) == 1
    });
    d.stop().success().summary();
    assert_sha256sum_c(&manifest, &t.root());
}

/// Changed while the daemon was down: a file that became a directory, a directory that became
/// a file, a file a new `--exclude` leaves out and one over a new `--max-size`. The start-up
/// scan leaves the state and the manifest as a fresh start would have them (found by a
/// review: the rows stayed, the manifest listed a directory and failed `sha256sum -c`, and
/// `status` counted files no longer there or no longer selected).
#[test]
fn files_whose_kind_or_selection_changed_while_down_leave_the_state_and_manifest() {
    let t = TestTree::new()
        .file("keep", b"k\n")
        .file("f", b"a file, then a directory\n")
        .file("sub/s1", b"1\n")
        .file("sub/s2", b"2\n")
        .file("x.dat", b"excluded later\n")
        .file("big", &[b'b'; 5000])
        .file("l/f", b"a directory, then a link out of the tree\n");
    let manifest = t.side("SUMS");
    let args = ["--op", "sha256", "--manifest", manifest.to_str().unwrap()];
    let d = Daemon::ready(&t, &args);
    d.wait_idle(7);
    d.stop().success();
    // Looked at through the link, `l/f` was a file still (found by a review).
    let outside = t.side("outside");
    fs::rename(t.path("l"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, t.path("l")).unwrap();
    fs::remove_file(t.path("f")).unwrap();
    fs::create_dir(t.path("f")).unwrap();
    fs::write(t.path("f/x"), b"x\n").unwrap();
    fs::remove_dir_all(t.path("sub")).unwrap();
    fs::write(t.path("sub"), b"a directory, then a file\n").unwrap();
    let mut again = args.to_vec();
    again.extend(["--exclude", "*.dat", "--max-size", "1000"]);
    let d = Daemon::ready(&t, &again);
    let names = || -> Vec<String> {
        let text = fs::read_to_string(&manifest).unwrap_or_default();
        let mut names: Vec<String> = text.lines().map(|l| l[66..].to_string()).collect();
        names.sort();
        names
    };
    wait_for("the manifest of the tree as it is", || {
        names() == ["f/x", "keep", "sub"]
    });
    d.wait_idle(2);
    let s = d.stop().success().summary();
    assert_eq!(s["skipped_by_reason"]["over-max-size"], 1, "{s}");
    assert_sha256sum_c(&manifest, &t.root());
    let status = run(filepipe(&[
        OsStr::new("status"),
        OsStr::new("--state"),
        t.side("state").as_os_str(),
    ]))
    .success()
    .stdout();
    assert!(status.contains("\tdone\t3\n"), "{status}");
    // `big`, over the size, and the link `l`.
    assert!(status.contains("\tskipped\t2\n"), "{status}");
    assert!(!status.contains("failed"), "{status}");
}

#[test]
fn manifest_is_kept_current_during_a_steady_stream() {
    let t = TestTree::new();
    let manifest = t.side("SUMS");
    let d = Daemon::ready(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
    );
    // One file every 100 ms, until the manifest has grown: the stream goes on for as long as
    // that takes (a slow machine only makes it longer), so this fails only if the manifest
    // is never rewritten while files keep coming. The timing of the rule itself is tested
    // beside it (watch::tests).
    let mut n = 0;
    while manifest_lines(&manifest) == 0 {
        assert!(
            n < 600,
            "the manifest was not rewritten during a 60 s stream"
        );
        fs::write(t.path(format!("f{n}")), format!("{n}\n")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        n += 1;
    }
    wait_for("all of them", || manifest_lines(&manifest) == n);
    d.wait_idle(n as u64);
    d.stop().success().summary();
}

#[test]
fn a_changed_input_replaces_its_own_output_but_never_a_foreign_one() {
    let t = TestTree::new()
        .file("foreign.gz", b"someone else's")
        .file("foreign", b"x\n");
    let d = Daemon::ready(&t, &["--op", "gzip"]);
    fs::write(t.path("f"), b"one\n").unwrap();
    wait_for("the first version", || t.path("f.gz").exists());
    // Recorded as done (and so as filepipe's own output) before the change.
    d.wait_idle(1);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(t.path("f"))
        .unwrap();
    f.write_all(b"two\n").unwrap();
    drop(f);
    wait_for("the second version", || {
        tool(
            "gunzip",
            &[OsStr::new("-c"), t.path("f.gz").as_os_str()],
            t.dir.path(),
        )
        .stdout
            == b"one\ntwo\n"
    });
    d.wait_idle(2);
    let s = d.stop().success().summary();
    assert_eq!(s["done"], 2, "{s}");
    assert_eq!(s["failed"], 1, "the foreign output is refused: {s}");
    assert_eq!(fs::read(t.path("foreign.gz")).unwrap(), b"someone else's");
}

/// The state is the record: a commit that fails (here every write past the first byte of a
/// file, under RLIMIT_FSIZE) stops the daemon, with exit 1, instead of hanging or going on
/// with files it could not record.
#[test]
fn a_state_write_failure_stops_the_daemon_instead_of_hanging() {
    let t = TestTree::new();
    let manifest = t.side("SUMS");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "sha256",
            "--manifest",
            manifest.to_str().unwrap(),
            "--jobs",
            "1",
        ],
    );
    wait_for("the first manifest", || manifest.exists());
    // Its stderr is a pipe, which the limit leaves alone.
    let pid = rustix::process::Pid::from_raw(d.pid() as i32).unwrap();
    let limit = rustix::process::Rlimit {
        current: Some(1),
        maximum: rustix::process::getrlimit(rustix::process::Resource::Fsize).maximum,
    };
    rustix::process::prlimit(Some(pid), rustix::process::Resource::Fsize, limit).unwrap();
    for i in 0..8 {
        fs::write(t.path(format!("f{i}")), b"x\n").unwrap();
    }
    let stderr = d.wait().code(1).stderr();
    assert!(
        stderr.contains("stopping: cannot write the state database")
            && stderr.contains("filepipe.sqlite: disk I/O error"),
        "the error says why, naming the database: {stderr}"
    );
}

/// A manifest that cannot be rewritten is derived data, not the record: anyone who may write
/// in the tree can take its name (here with a directory; a full disk does the same), and that
/// must not stop the daemon. The failure is logged once, the files are still recorded in the
/// state, and the manifest lists them all once its name is free again.
#[test]
fn a_manifest_that_cannot_be_rewritten_is_retried_and_never_stops_the_daemon() {
    let t = TestTree::new().file("a", b"a\n");
    let manifest = t.path("SHA256SUMS");
    let log = t.side("daemon.log");
    let mut d = Daemon::ready_logging_to(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
        &log,
    );
    let said = || fs::read_to_string(&log).unwrap();
    wait_for("the first manifest", || manifest_lines(&manifest) == 1);
    fs::remove_file(&manifest).unwrap();
    fs::create_dir(&manifest).unwrap();
    fs::write(t.path("b"), b"b\n").unwrap();
    wait_for("the failed rewrite to be logged", || {
        said().contains("SHA256SUMS")
    });
    assert!(d.running(), "the daemon stopped: {}", said());
    assert!(!said().contains("stopping"), "{}", said());
    let m = manifest.display();
    assert!(
        !said().contains(&format!("publishing {m}: publishing {m}")),
        "the error names the manifest once: {}",
        said()
    );
    // Still recording (each outcome is counted once committed to the state).
    fs::write(t.path("c"), b"c\n").unwrap();
    d.wait_idle(3);
    assert!(d.running(), "the daemon stopped: {}", said());
    fs::remove_dir(&manifest).unwrap();
    wait_for("the manifest rewritten from the state", || {
        manifest_lines(&manifest) == 3
    });
    wait_for("the recovery to be logged", || {
        said().contains("manifest rewritten again")
    });
    d.stop().success();
    let said = said();
    assert_eq!(
        said.matches("manifest not rewritten").count(),
        1,
        "the same error is logged once, however often the rewrite is tried: {said}"
    );
    assert_sha256sum_c(&manifest, &t.root());
}

/// A manifest's name held by a directory at start: batch mode refuses it at once (exit 2),
/// since its one manifest, written at the end, could not replace it. Watch mode starts
/// anyway: anyone who may write in the tree could otherwise keep a service down (the units
/// do not restart after exit 2), and its manifests are rewritten once the names are free.
#[test]
fn a_manifest_name_held_by_a_directory_refuses_a_batch_but_not_a_watch() {
    let t = TestTree::new()
        .file("a", b"a\n")
        .dir("SUMS")
        .dir("SUMS.sha512");
    let sums = t.path("SUMS");
    let manifest = [
        "--op",
        "sha256,sha512",
        "--manifest",
        sums.to_str().unwrap(),
    ];
    let mut batch = filepipe(&[OsStr::new("batch"), t.root().as_os_str()]);
    batch.args(manifest);
    let r = run(batch);
    assert!(
        r.code(2).stderr().contains("is not a regular file"),
        "{}",
        r.stderr()
    );
    fs::remove_dir(&sums).unwrap();
    let mut batch = filepipe(&[OsStr::new("batch"), t.root().as_os_str()]);
    batch.args(manifest);
    let r = run(batch);
    assert!(
        r.code(2)
            .stderr()
            .contains("SUMS.sha512 is not a regular file"),
        "the derived name too: {}",
        r.stderr()
    );
    fs::create_dir(&sums).unwrap();

    let log = t.side("daemon.log");
    let d = Daemon::ready_logging_to(&t, &manifest, &log);
    let said = || fs::read_to_string(&log).unwrap();
    wait_for("the failed rewrite to be logged", || {
        said().contains("manifest not rewritten")
    });
    fs::remove_dir(&sums).unwrap();
    fs::remove_dir(t.path("SUMS.sha512")).unwrap();
    wait_for("both manifests", || {
        manifest_lines(&sums) == 1 && manifest_lines(&t.path("SUMS.sha512")) == 1
    });
    d.stop().success();
    assert_sha256sum_c(&sums, &t.root());
}

/// A change no event reports (a write through a shared mapping) after the close, within the
/// settle time: the worker's first fstat no longer matches the stamp the file settled with, so
/// the file is retried and only its final content is ever listed.
#[test]
fn a_change_no_event_reports_is_caught_by_the_settled_stamp() {
    let t = TestTree::new();
    let manifest = t.side("SHA256SUMS");
    let log = t.side("failures.jsonl");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "sha256",
            "--settle",
            "1500",
            "--manifest",
            manifest.to_str().unwrap(),
            "--failure-log",
            log.to_str().unwrap(),
        ],
    );
    wait_for("the daemon's first manifest", || manifest.exists());
    let path = t.path("mapped.bin");
    let len = 8192;
    // Closed: it settles from here. A shared mapping keeps the file open after its descriptor
    // is closed, so its close event waits for munmap: the write below is seen by no event.
    fs::write(&path, vec![b'a'; len]).unwrap();
    let mut map = SharedMap::open(&path, len);
    std::thread::sleep(Duration::from_millis(500));
    map.write(0, &[b'b'; 100]);
    wait_for("the change to be caught", || {
        failure_log(&log).iter().any(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("changed after it settled"))
        })
    });
    drop(map);
    let mut want = vec![b'b'; 100];
    want.resize(len, b'a');
    let hex: String = sha2::Sha256::digest(&want)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let line = format!("{hex}  mapped.bin");
    wait_for("the final content in the manifest", || {
        fs::read_to_string(&manifest).is_ok_and(|m| m.contains(&line))
    });
    let s = d.stop().success().summary();
    assert_eq!(s["done"], 1, "{s}");
    assert_sha256sum_c(&manifest, &t.root());
}

/// A directory renamed inside the tree keeps being watched under its new name, down to its
/// subdirectories (one watch per directory, moved by the rename), and its files leave the
/// manifest under the old names and come back under the new ones.
#[test]
fn a_directory_renamed_inside_the_tree_is_watched_under_its_new_name() {
    let t = TestTree::new().file("old/deep/a", b"a\n");
    let manifest = t.side("SUMS");
    let d = Daemon::ready(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
    );
    let listed = |name: &str| {
        fs::read_to_string(&manifest).is_ok_and(|m| m.lines().any(|l| l.ends_with(name)))
    };
    wait_for("old/deep/a", || listed("  old/deep/a"));
    fs::rename(t.path("old"), t.path("new")).unwrap();
    wait_for("new/deep/a, and old/deep/a gone", || {
        listed("  new/deep/a") && !listed("  old/deep/a")
    });
    // Written after the rename, two levels down: seen through the moved directory's watches.
    fs::write(t.path("new/deep/b"), b"b\n").unwrap();
    fs::create_dir(t.path("new/deep/more")).unwrap();
    fs::write(t.path("new/deep/more/c"), b"c\n").unwrap();
    wait_for("new/deep/b and new/deep/more/c", || {
        listed("  new/deep/b") && listed("  new/deep/more/c")
    });
    let s = d.stop().success().summary();
    assert_eq!(s["done"], 4, "{s}");
    assert_eq!(manifest_lines(&manifest), 3);
    assert_sha256sum_c(&manifest, &t.root());
}

#[test]
fn a_tree_deeper_than_the_walks_open_directories_is_scanned_whole_and_not_redone() {
    // The scan stats files by name relative to their directory, holding at most 16 directories
    // open; the levels above the 16 deepest fall back to stat by path. A
    // file whose stat went wrong either way would never be taken (or be redone at the restart).
    let mut t = TestTree::new();
    let mut dir = String::new();
    let mut files = 0;
    for level in 0..24 {
        t = t
            .file(
                format!("{dir}f{level}"),
                format!("level {level}\n").as_bytes(),
            )
            .file(
                format!("{dir}side{level}/g"),
                format!("side {level}\n").as_bytes(),
            )
            .file(
                format!("{dir}z{level}"),
                format!("after {level}\n").as_bytes(),
            );
        files += 3;
        dir.push_str("d/");
    }
    let manifest = t.side("SHA256SUMS");
    let args = ["--op", "sha256", "--manifest", manifest.to_str().unwrap()];
    let d = Daemon::ready(&t, &args);
    wait_for("every file of the deep tree", || {
        manifest_lines(&manifest) == files
    });
    let s = d.stop().success().summary();
    assert_eq!(s["done"], files, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert_sha256sum_c(&manifest, &t.root());
    // The stamps the scan takes must equal those the workers recorded: nothing is redone.
    let d = Daemon::ready(&t, &args);
    // Ready means the start-up scan is queued: idle with nothing done, nothing was queued.
    let idle = d.wait_idle(0);
    assert_eq!(
        idle,
        Status {
            done: 0,
            skipped: 0,
            failed: 0,
            ..idle
        }
    );
    let s = d.stop().success().summary();
    // Every outcome counts in "files": a file redone, or queued to be and interrupted.
    assert_eq!(s["files"], 0, "a restart looked at files again: {s}");
    assert_eq!(manifest_lines(&manifest), files);
}

#[test]
fn a_done_file_replaced_by_one_that_is_skipped_leaves_the_manifest() {
    let t = TestTree::new()
        .file("kept", b"kept\n")
        .file("swapped", b"first\n");
    let manifest = t.side("SHA256SUMS");
    let args = ["--op", "sha256", "--manifest", manifest.to_str().unwrap()];
    let d = Daemon::ready(&t, &args);
    wait_for("both files", || manifest_lines(&manifest) == 2);
    // A FIFO from outside the tree renamed over a done file: no deletion event, only the rename
    // in, and the worker then skips it without opening it. Its old line must go, with nothing
    // else changing in the state.
    let fifo = t.side("new-fifo");
    mkfifo(&fifo);
    fs::rename(&fifo, t.path("swapped")).unwrap();
    wait_for("the skipped file's line to leave the manifest", || {
        manifest_lines(&manifest) == 1
    });
    let s = d.stop().success().summary();
    assert_eq!(s["skipped"], 1, "{s}");
    assert!(fs::read_to_string(&manifest).unwrap().ends_with("  kept\n"));
    assert_sha256sum_c(&manifest, &t.root());
}

/// A symlink to a directory outside the tree, made in the watched tree, is a symlink like any
/// other: never watched nor scanned, so nothing created outside
/// afterwards, a file or a directory, is ever named by filepipe (found by a hostile review:
/// the link was taken for a new directory, followed by the watch and the scan, and the outside
/// names reached the failure log).
#[test]
fn a_link_to_a_directory_outside_the_tree_is_never_watched() {
    let t = TestTree::new().file("marker", b"ready");
    let log = t.side("failures.jsonl");
    let manifest = t.side("SHA256SUMS");
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("BEFORE_THE_LINK"), b"outside\n").unwrap();
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "sha256",
            "--manifest",
            manifest.to_str().unwrap(),
            "--failure-log",
            log.to_str().unwrap(),
        ],
    );
    wait_for("the initial scan", || manifest_lines(&manifest) == 1);
    std::os::unix::fs::symlink(outside.path(), t.path("X")).unwrap();
    // Events are taken in order: once a file made after the link is done, the link was seen.
    fs::write(t.path("after-link"), b"after\n").unwrap();
    wait_for("the file made after the link", || {
        manifest_lines(&manifest) == 2
    });
    fs::write(outside.path().join("VICTIM_PRIVATE_NAME"), b"outside\n").unwrap();
    fs::create_dir(outside.path().join("VICTIM_SUBDIR")).unwrap();
    fs::write(outside.path().join("VICTIM_SUBDIR/f"), b"outside\n").unwrap();
    // And once a file made after those outside is done, their events (if any) were heard.
    fs::write(t.path("after"), b"after\n").unwrap();
    wait_for("the file made after", || manifest_lines(&manifest) == 3);
    let out = d.stop();
    let everything = format!(
        "{}{}{}{}",
        out.stdout(),
        out.stderr(),
        fs::read_to_string(&log).unwrap_or_default(),
        fs::read_to_string(&manifest).unwrap_or_default()
    );
    for name in ["VICTIM", "BEFORE_THE_LINK"] {
        assert!(!everything.contains(name), "{name} named: {everything}");
    }
}

/// A chmod of a file being compressed changes nothing it was read for: the file is read and
/// counted once. The change made it ready again while in flight, and once back it was taken
/// again whatever its stamp, as if a writer had closed it (found by a review: 20 MB compressed
/// twice, "2 files: 2 done" for one file, and no line saying why).
#[test]
fn a_chmod_of_a_file_in_flight_does_not_have_it_read_again() {
    let (t, out, manifest, d) = slow_daemon(3);
    big_in_flight(&t, &d, 12, 11);
    fs::set_permissions(
        t.path("d/big"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    assert!(
        !out.join("d/big.zst").exists(),
        "the big file was done before the chmod: nothing tested (a bigger file?)"
    );
    wait_until(Duration::from_secs(60), "the big file done", || {
        d.notes
            .last_status()
            .is_some_and(|s| s.idle() && s.done >= 4)
    });
    // Past the settle time of the change, which a second read would have followed.
    std::thread::sleep(Duration::from_secs(2));
    let sum = d.stop().success().summary();
    assert_eq!(sum["done"], 4, "the chmod had the file read again: {sum}");
    assert_sha256sum_c(&manifest, &t.root());
}

/// The state's directory and the manifest's, reached through bind mounts in the watched tree,
/// are never taken: before, the initial scan hashed the state's database, and each manifest
/// written was taken through its view, changing the next (found by a review).
#[test]
fn the_state_and_the_manifest_reached_through_bind_mounts_in_the_tree_are_not_taken() {
    let t = TestTree::new().file("a/x", b"x\n");
    let (state, sums) = (t.side("state"), t.side("sums"));
    for d in [&state, &sums] {
        fs::create_dir(d).unwrap();
    }
    let (view_st, view_sums) = (t.path("view-st"), t.path("a/view-sums"));
    let Some(_views) = BindMount::all(&[(&state, &view_st), (&sums, &view_sums)]) else {
        return;
    };
    let manifest = sums.join("SUMS");
    let d = Daemon::ready(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
    );
    wait_for("the initial scan", || manifest_lines(&manifest) >= 1);
    // Written once the manifest is: its view's event comes first, and settles first.
    fs::write(t.path("a/y"), b"y\n").unwrap();
    let names = || manifest_names(&manifest);
    wait_for("a/y in the manifest", || names().iter().any(|n| n == "a/y"));
    assert_eq!(names(), ["a/x", "a/y"]);
    let s = d.wait_idle(2);
    assert_eq!((s.skipped, s.failed), (0, 0), "{s:?}");
    d.stop().success();
}

/// Review finding (MEDIUM, rev38a): the move directory renamed into the watched tree was
/// watched as a new directory; each file moved into it was taken again and moved one level
/// deeper, for ever (19 times in 4 s). One of filepipe's own directories coming into the tree
/// is never watched.
#[test]
fn a_move_directory_renamed_into_the_tree_is_not_watched() {
    let t = TestTree::new().file("a", b"a\n");
    let (out, moved) = (t.side("o"), t.side("ms"));
    let (o, m) = (out.to_str().unwrap(), moved.to_str().unwrap());
    let d = Daemon::ready(&t, &["--op", "gzip", "--out", o, "--move-source", m]);
    wait_for("a moved aside", || moved.join("a").exists());
    fs::rename(&moved, t.path("ms")).unwrap();
    fs::write(t.path("b"), b"b\n").unwrap();
    wait_for("b moved aside", || t.path("ms/b").exists());
    // Written once `b` is in the renamed directory: were it watched, `b` would settle first.
    fs::write(t.path("c"), b"c\n").unwrap();
    wait_for("c moved aside", || t.path("ms/c").exists());
    assert!(!out.join("ms").exists() && !t.path("ms/ms").exists());
    let s = d.wait_idle(3);
    assert_eq!((s.skipped, s.failed), (0, 0), "{s:?}");
    d.stop().success();
}

/// Review finding (MEDIUM, rev38b): a new file put at an input's name right after
/// `--move-source` moved the input was taken for a new version of the moved file, and its
/// output replaced the moved file's only output (10 of 10 in the reviewer's run). It fails
/// `output-exists` and stays in the tree, as README says.
#[test]
fn a_file_put_at_a_moved_inputs_name_does_not_replace_its_output() {
    let t = TestTree::new();
    let moved = t.side("done");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "gzip",
            "--move-source",
            moved.to_str().unwrap(),
            "-j",
            "1",
        ],
    );
    let n = 10;
    for i in 0..n {
        let name = t.path(format!("f{i}"));
        let mut first = noise_bytes(1 << 20, i);
        first.extend_from_slice(format!("FIRST {i}\n").as_bytes());
        fs::write(t.path(format!(".t{i}")), &first).unwrap();
        fs::write(t.side(&format!("n{i}")), format!("SECOND {i}\n")).unwrap();
        fs::rename(t.path(format!(".t{i}")), &name).unwrap();
        wait_until(Duration::from_secs(60), "the input moved", || {
            !name.exists()
        });
        fs::rename(t.side(&format!("n{i}")), &name).unwrap();
    }
    wait_for("every second file failed", || {
        d.notes
            .last_status()
            .is_some_and(|s| s.idle() && s.failed == n)
    });
    for i in 0..n {
        let gz = t.path(format!("f{i}.gz"));
        let out = tool("gzip", &[OsStr::new("-dc"), gz.as_os_str()], t.dir.path()).stdout;
        assert!(out.ends_with(format!("FIRST {i}\n").as_bytes()), "f{i}.gz");
        let now = fs::read(t.path(format!("f{i}"))).unwrap();
        assert_eq!(now, format!("SECOND {i}\n").as_bytes());
    }
    d.stop();
}

/// The directories `watch` makes for a private tree (`0700`): `--out`, `--move-source` and
/// `--state`, their missing ancestors too, are `0700`, closed to everyone the tree is closed
/// to (found by a review: made `0755` by the umask, the state naming every file and its
/// digest to every user).
#[test]
fn directories_made_for_a_private_tree_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestTree::new().file("a.log", b"mine\n");
    fs::set_permissions(t.root(), fs::Permissions::from_mode(0o700)).unwrap();
    let (out, done, st) = (t.side("arch/o"), t.side("moved/x"), t.side("priv/st"));
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "gzip",
            "--out",
            out.to_str().unwrap(),
            "--move-source",
            done.to_str().unwrap(),
            "--state",
            st.to_str().unwrap(),
        ],
    );
    for made in ["arch", "arch/o", "moved", "moved/x", "priv", "priv/st"] {
        let (_, _, mode) = owner_and_mode(&t.side(made));
        assert_eq!(mode, 0o700, "{made}: {mode:o}");
    }
    wait_for("a.log moved", || t.side("moved/x/a.log").exists());
    d.stop().success();
}

/// A directory a scan cannot read (out of descriptors) is read again later, never taken as a
/// file: taken as one, it was skipped `special-file` and its files were never listed, none of
/// them done or failed until a restart (found by a review, under `ulimit -n 32`: 30 files of
/// 400 unaccounted for, the summary saying nothing failed). Which directory runs out of
/// descriptors is a matter of timing: the build before the fix failed this test in one run of
/// two or three here, never the build after it in 8.
#[test]
fn a_directory_unreadable_for_want_of_descriptors_is_read_again_not_taken_as_a_file() {
    if !have_prlimit() {
        return;
    }
    let mut t = TestTree::new();
    for d in 0..10 {
        for i in 0..10 {
            t = t.file(format!("d{d}/f{i}"), format!("{d} {i}\n").as_bytes());
        }
    }
    let mut prlimit = std::process::Command::new("prlimit");
    prlimit.args(["--nofile=32:32", "--"]).arg(common::bin());
    let daemon = Daemon::ready_through(
        prlimit,
        &t,
        &["--op", "gzip", "--jobs", "2", "--settle", "100"],
    );
    // Each file ends done or failed (out of descriptors, five times), and nothing waits.
    let ended = |n: u64| {
        let limit = Instant::now() + Duration::from_secs(90);
        while Instant::now() < limit {
            let status = daemon.notes.last_status().filter(Status::idle);
            if status.is_some_and(|s| s.done + s.failed >= n) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    ended(100);
    for d in 10..40 {
        for i in 0..10 {
            let path = t.path(format!("d{d}/f{i}"));
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, format!("{d} {i}\n")).unwrap();
        }
    }
    ended(400);
    let sum = daemon.stop().code(0).summary();
    assert_eq!(sum["files"], 400, "{sum}");
    assert_eq!(sum["skipped"], 0, "{sum}");
    let (done, failed) = (sum["done"].as_u64(), sum["failed"].as_u64());
    assert_eq!(done.zip(failed).map(|(d, f)| d + f), Some(400), "{sum}");
}

/// Out of inotify instances, the error names the limit: it said only "Too many open files"
/// (found by a review).
#[test]
fn out_of_inotify_instances_the_error_names_the_limit() {
    let t = TestTree::new().file("a", b"a");
    // This user namespace's own limit (Linux 5.11+), not the machine's.
    let script = r#"echo 0 > /proc/sys/user/max_inotify_instances || exit 99
exec "$@""#;
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-r", "sh", "-c", script, "sh"])
        .arg(common::bin())
        .arg("watch")
        .arg(t.root())
        .args(["--op", "sha256", "--state"])
        .arg(t.side("state"));
    let out = run(cmd);
    if out.output().status.code() == Some(99) {
        eprintln!("SKIPPED: cannot lower the limit here: {}", out.stderr());
        return;
    }
    let err = out.code(1).stderr();
    assert!(err.contains("max_user_instances"), "{err}");
}

/// A watch stopped by a state database that fills its disk still prints its summary with
/// `--json`, as `batch` does, the error in it: it printed none (found by a review). The
/// summary says how many of its files the state does not record: it counted them done, and
/// the state and manifest missed them with nothing said (found by a review).
#[test]
fn a_watch_stopped_by_a_full_state_disk_prints_its_json_summary() {
    let mut t = TestTree::new();
    for d in 0..20 {
        for i in 0..100 {
            t = t.file(format!("d{d}/a-file-with-a-longish-name-{i}.txt"), b"x");
        }
    }
    let Some(out) = on_a_small_tmpfs_state(&t, &["watch", "--op", "sha256", "--json"]) else {
        return;
    };
    let sum = out.code(1).summary();
    assert!(
        sum["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot write the state database")),
        "{sum}\n{}",
        out.stderr()
    );
    // What the state lacks is said: taken again at the next run.
    assert_unrecorded_is_what_the_state_lacks(&t, &sum);
}
