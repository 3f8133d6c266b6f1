//! `filepipe watch --poll` on a file system whose writers make no events here. A FUSE mount
//! (bindfs) of a backing directory stands in for NFS: what is written to the backing directory
//! directly appears in the mount with no inotify event, as another NFS client's writes do.
//! Needs `bindfs` and `/dev/fuse`; prints SKIPPED without them.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A bindfs mount of `backing` on `mount`, unmounted when dropped.
struct Fuse {
    mount: PathBuf,
}

impl Fuse {
    /// Mounts, or `None` (having said SKIPPED) where FUSE or bindfs is missing.
    fn mount(backing: &Path, mount: &Path, test: &str) -> Option<Fuse> {
        if !Path::new("/dev/fuse").exists() {
            eprintln!("SKIPPED {test}: no /dev/fuse");
            return None;
        }
        let status = Command::new("bindfs").arg(backing).arg(mount).status();
        match status {
            Ok(s) if s.success() => Some(Fuse {
                mount: mount.to_path_buf(),
            }),
            Ok(s) => {
                eprintln!("SKIPPED {test}: bindfs failed ({s}): is FUSE usable here?");
                None
            }
            Err(e) => {
                eprintln!("SKIPPED {test}: cannot run bindfs ({e}); apt-get install bindfs");
                None
            }
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// The premise, checked with inotify itself: a file written to the backing directory makes
/// no event on the mount, one written through the mount does.
fn assert_backing_writes_are_unseen(backing: &Path, mount: &Path) {
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::NONBLOCK).unwrap();
    inotify::add_watch(&fd, mount, inotify::WatchFlags::CREATE).unwrap();
    fs::write(backing.join("premise-unseen"), b"x").unwrap();
    fs::write(mount.join("premise-seen"), b"x").unwrap();
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let mut reader = inotify::Reader::new(&fd, &mut buf);
    let mut names = Vec::new();
    while let Ok(ev) = reader.next() {
        if let Some(name) = ev.file_name() {
            names.push(name.to_string_lossy().into_owned());
        }
    }
    assert_eq!(
        names,
        ["premise-seen"],
        "the mount must hide backing writes"
    );
    fs::remove_file(backing.join("premise-unseen")).unwrap();
    fs::remove_file(backing.join("premise-seen")).unwrap();
}

#[test]
fn without_poll_a_watch_on_fuse_warns_that_other_writers_are_missed() {
    let t = TestTree::new();
    let backing = t.side("backing");
    fs::create_dir(&backing).unwrap();
    let Some(_fuse) = Fuse::mount(&backing, &t.root(), "the FUSE warning") else {
        return;
    };
    let d = Daemon::ready(&t, &["--op", "sha256"]);
    let run = d.stop();
    run.success();
    let err = run.stderr();
    assert!(
        err.contains("FUSE") && err.contains("--poll"),
        "no warning on stderr: {err}"
    );
}

#[test]
fn poll_finds_what_other_writers_add_change_and_delete_and_the_manifest_checks() {
    let t = TestTree::new();
    let backing = t.side("backing");
    fs::create_dir_all(backing.join("sub")).unwrap();
    let Some(_fuse) = Fuse::mount(&backing, &t.root(), "watch --poll") else {
        return;
    };
    assert_backing_writes_are_unseen(&backing, &t.root());
    let manifest = t.side("SUMS");
    let m = manifest.to_str().unwrap();
    let d = Daemon::ready(&t, &["--op", "sha256", "--manifest", m, "--poll", "1"]);
    // Written beneath the mount, as another host would: no event.
    fs::write(backing.join("a.txt"), text_bytes(30_000, 1)).unwrap();
    fs::write(backing.join("sub/b.log"), text_bytes(10_000, 2)).unwrap();
    fs::write(backing.join("gone.txt"), b"soon deleted\n").unwrap();
    d.wait_idle(3);
    let check = |expect: &[&str]| {
        let text = fs::read_to_string(&manifest).unwrap_or_default();
        let mut names: Vec<&str> = text.lines().filter_map(|l| l.get(66..)).collect();
        names.sort_unstable();
        names == expect
    };
    wait_until(Duration::from_secs(30), "the manifest of 3 files", || {
        check(&["a.txt", "gone.txt", "sub/b.log"])
    });
    let sums = |dir: &Path| tool("sha256sum", &[OsStr::new("-c"), manifest.as_os_str()], dir);
    assert!(sums(&t.root()).status.success(), "{:?}", sums(&t.root()));

    // Changed, deleted and added beneath the mount: each reconciled by a later poll.
    fs::write(backing.join("a.txt"), text_bytes(31_000, 3)).unwrap();
    fs::remove_file(backing.join("gone.txt")).unwrap();
    fs::write(backing.join("sub/c.bin"), noise_bytes(5_000, 4)).unwrap();
    wait_until(Duration::from_secs(30), "the manifest to follow", || {
        check(&["a.txt", "sub/b.log", "sub/c.bin"]) && sums(&t.root()).status.success()
    });
    let status = d.wait_idle(5);
    assert_eq!(status.failed, 0, "{status:?}");
    let run = d.stop();
    run.success();
    assert!(
        !run.stderr().contains("--poll SECS"),
        "warned although polling"
    );
}

/// A file shortened by `truncate(2)` by path (a write event with no open and no close) waited
/// for ever for its writer's close, the manifest keeping its old digest even with `--poll`
/// (found by a review). A poll now takes a file quiet for a settle time as it finds it.
#[test]
fn poll_takes_a_file_truncated_by_path() {
    let t = TestTree::new().file("f", b"hello\n");
    let manifest = t.side("SUMS");
    let m = manifest.to_str().unwrap();
    let d = Daemon::ready(&t, &["--op", "sha256", "--manifest", m, "--poll", "1"]);
    d.wait_idle(1);
    let path = std::ffi::CString::new(t.path("f").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path, and a length.
    assert_eq!(unsafe { libc::truncate(path.as_ptr(), 2) }, 0);
    let expected = {
        let out = tool("sha256sum", &[OsStr::new("f")], &t.root());
        String::from_utf8(out.stdout).unwrap()
    };
    wait_until(
        Duration::from_secs(30),
        "the new digest in the manifest",
        || fs::read_to_string(&manifest).is_ok_and(|text| text == expected),
    );
    d.stop().success();
}

/// A file blocked at its output name is taken again at each poll (up to five times): the
/// summary counted each attempt a failed file, five files for one (found by a review). It
/// counts one; the failure log keeps each attempt.
#[test]
fn a_file_blocked_at_its_output_name_counts_once_however_many_polls_try_it() {
    let t = TestTree::new();
    let log = t.side("failures.jsonl");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "gzip",
            "--poll",
            "1",
            "--failure-log",
            log.to_str().unwrap(),
            "--metrics",
            &addr,
        ],
    );
    // The foreign output first: a file at an input's output name is an output, not an input.
    fs::write(t.path("a.txt.gz"), b"someone else's\n").unwrap();
    d.wait_idle_where("a.txt.gz skipped", |s| s.skipped == 1);
    fs::write(t.path("a.txt"), b"mine\n").unwrap();
    wait_until(Duration::from_secs(30), "three attempts", || {
        records_of(&failure_log(&log), "output-exists").len() >= 3
    });
    // The metrics count the file once too (files ended; they counted each attempt).
    let scrape = Command::new("curl")
        .args(["-sSf", &format!("http://{addr}/metrics")])
        .output()
        .expect("curl");
    let text = String::from_utf8(scrape.stdout).unwrap();
    let failed: Vec<&str> = (text.lines())
        .filter(|l| {
            l.starts_with("filepipe_files_total{")
                && l.contains("outcome=\"failed\"")
                && l.contains("reason=\"output-exists\"")
        })
        .collect();
    assert_eq!(failed.len(), 1, "{text}");
    assert!(failed[0].ends_with(" 1"), "{}", failed[0]);
    let s = d.stop().success().summary();
    assert_eq!(
        (
            s["files"].as_u64(),
            s["failed"].as_u64(),
            s["skipped"].as_u64()
        ),
        (Some(2), Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(s["failed_by_reason"]["output-exists"], 1, "{s}");
    assert_eq!(fs::read(t.path("a.txt.gz")).unwrap(), b"someone else's\n");
}

/// A file blocked at its output name until the polls have used up its attempts is still
/// taken once the name is freed: the state then counted it failed for good with its stamp,
/// and it was never taken again (found by a review).
#[test]
fn a_file_whose_polls_used_up_its_attempts_is_done_once_its_output_name_is_freed() {
    let t = TestTree::new();
    let log = t.side("failures.jsonl");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "gzip",
            "--poll",
            "1",
            "--failure-log",
            log.to_str().unwrap(),
        ],
    );
    fs::write(t.path("a.txt.gz"), b"someone else's\n").unwrap();
    d.wait_idle_where("a.txt.gz skipped", |s| s.skipped == 1);
    fs::write(t.path("a.txt"), b"mine\n").unwrap();
    // Five attempts: the first, then one at each poll until they run out.
    wait_until(Duration::from_secs(60), "five attempts", || {
        records_of(&failure_log(&log), "output-exists").len() >= 5
    });
    d.wait_idle_where("the attempts over", |s| s.failed == 1);
    fs::rename(t.path("a.txt.gz"), t.side("moved.gz")).unwrap();
    d.wait_idle(1);
    let out = tool(
        "gzip",
        &[OsStr::new("-dc"), OsStr::new("a.txt.gz")],
        &t.root(),
    );
    assert_eq!(out.stdout, b"mine\n");
    let s = d.stop().success().summary();
    assert_eq!(
        (s["done"].as_u64(), s["failed"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
}
