//! Regression tests for the promises a hostile, unlucky user broke (issue 15), one or more per
//! numbered case, named after it. Each failed against the build before its fix.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

fn p(x: &Path) -> &OsStr {
    x.as_os_str()
}

/// `filepipe batch ROOT ARGS`.
fn batch(t: &TestTree, args: &[&OsStr]) -> Run {
    let root = t.root();
    let mut all = vec![s("batch"), p(&root)];
    all.extend_from_slice(args);
    run(filepipe(&all))
}

/// Marks `path` as filepipe marks its temps.
fn mark_as_temp(path: &Path) {
    rustix::fs::setxattr(
        path,
        "user.filepipe.temp",
        &temp_mark(),
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Case 1: the stale-temp sweep deleted inputs.

#[test]
fn case_1_files_named_like_temps_are_never_deleted_and_always_reported() {
    let names = [
        ".filepipe.4000000.0.tmp",
        "sub/.filepipe.123456.1.tmp",
        ".filepipe.x.tmp",
    ];
    let mut t = TestTree::new().file("plain.txt", b"an ordinary input\n");
    for n in names {
        t = t.file(n, b"precious\n");
    }
    let log = t.side("failures.jsonl");
    for op in ["sha256", "gzip"] {
        let summary = batch(
            &t,
            &[
                s("--op"),
                s(op),
                s("--json"),
                s("--failure-log"),
                p(&log),
                s("--manifest"),
                p(&t.side("SUMS")),
            ][..if op == "gzip" { 5 } else { 7 }],
        )
        .code(0)
        .summary();
        assert_eq!(
            summary["files"], 4,
            "{op}: every file accounted for: {summary}"
        );
        assert_eq!(summary["done"], 1, "{op}: {summary}");
        assert_eq!(
            summary["skipped_by_reason"]["temp-name"], 3,
            "{op}: {summary}"
        );
        assert_eq!(summary["stale_temps_removed"], 0, "{op}: {summary}");
        for n in names {
            assert_eq!(fs::read(t.path(n)).unwrap(), b"precious\n", "{op} lost {n}");
            assert!(!t.path(format!("{n}.gz")).exists(), "{op} compressed {n}");
        }
        let records = failure_log(&log);
        let reported: Vec<_> = records_of(&records, "temp-name")
            .iter()
            .map(|r| r["path"].as_str().unwrap().to_string())
            .collect();
        for n in names {
            assert!(
                reported.iter().any(|r| r == n),
                "{op}: {n} not in {reported:?}"
            );
        }
    }
}

#[test]
fn case_1_a_stale_temp_is_removed_only_in_the_tree_a_writing_run_owns() {
    // A temp a stopped filepipe left (marked, and no live writer holds its lock).
    let t = TestTree::new()
        .file("a.txt", b"a\n")
        .file(".filepipe.77.0.tmp", b"torn output");
    mark_as_temp(&t.path(".filepipe.77.0.tmp"));
    // Hashing writes nothing in the tree: the leftover is reported, never read nor removed.
    let out = batch(&t, &[s("--op"), s("sha256"), s("--json")]);
    let json: serde_json::Value =
        serde_json::from_slice(&out.output().stderr).expect("summary on stderr");
    assert_eq!(json["skipped_by_reason"]["stale-temp"], 1, "{json}");
    assert!(!out.stdout().contains(".filepipe"));
    assert!(t.path(".filepipe.77.0.tmp").exists());
    // gzip writing next to its inputs owns this tree: it removes the leftover.
    let summary = batch(&t, &[s("--op"), s("gzip"), s("--json")])
        .code(0)
        .summary();
    assert_eq!(summary["stale_temps_removed"], 1, "{summary}");
    assert_eq!(summary["files"], 1, "{summary}");
    assert!(!t.path(".filepipe.77.0.tmp").exists());
}

#[test]
fn a_temp_another_host_marked_is_never_removed_even_by_a_run_that_owns_the_tree() {
    // On shared storage another host's live writer may hold a lock this mount does not show
    // (FUSE, NFS mounted nolock): only this host's own dead temps are removed. A temp of a
    // filepipe too old to record its host is another host's as far as anyone can tell.
    let t = TestTree::new()
        .file("a.txt", b"a\n")
        .file(
            ".filepipe.4194305-1.0.tmp",
            b"another host's output, being written",
        )
        .file(".filepipe.4194305-2.0.tmp", b"an old version's")
        .file(".filepipe.4194305-3.0.tmp", b"this host's, dead");
    let set = |name: &str, value: &[u8]| {
        rustix::fs::setxattr(
            t.path(name),
            "user.filepipe.temp",
            value,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap()
    };
    set(".filepipe.4194305-1.0.tmp", b"2:00112233445566ff");
    set(".filepipe.4194305-2.0.tmp", b"1");
    set(".filepipe.4194305-3.0.tmp", &temp_mark());
    let summary = batch(&t, &[s("--op"), s("gzip"), s("--json")])
        .code(0)
        .summary();
    assert_eq!(summary["stale_temps_removed"], 1, "{summary}");
    assert_eq!(summary["skipped_by_reason"]["temp-in-use"], 2, "{summary}");
    assert!(t.path(".filepipe.4194305-1.0.tmp").exists());
    assert!(t.path(".filepipe.4194305-2.0.tmp").exists());
    assert!(!t.path(".filepipe.4194305-3.0.tmp").exists());
}

#[test]
fn a_temp_of_this_host_whose_writer_still_runs_is_kept_though_its_lock_is_not_seen() {
    // A lock taken through another mount of the same files (a FUSE view of a directory its
    // writer uses directly) does not show here; the writer's pid, alive, keeps its temp.
    let t = TestTree::new().file("a.txt", b"a\n");
    let name = format!(".filepipe.{}-9.0.tmp", std::process::id());
    fs::write(t.path(&name), b"being written").unwrap();
    mark_as_temp(&t.path(&name));
    let summary = batch(&t, &[s("--op"), s("gzip"), s("--json")])
        .code(0)
        .summary();
    assert_eq!(summary["skipped_by_reason"]["temp-in-use"], 1, "{summary}");
    assert!(t.path(&name).exists());
}

#[test]
fn case_1_watch_gzip_never_deletes_a_file_named_like_a_temp() {
    let t = TestTree::new()
        .file(".filepipe.4000000.0.tmp", b"precious\n")
        .file("sub/.filepipe.123456.1.tmp", b"precious\n")
        .file("first.txt", b"x\n");
    let d = Daemon::ready(&t, &["--op", "gzip"]);
    d.wait_idle(1);
    d.stop().success();
    for n in [".filepipe.4000000.0.tmp", "sub/.filepipe.123456.1.tmp"] {
        assert_eq!(fs::read(t.path(n)).unwrap(), b"precious\n", "lost {n}");
    }
}

// ---------------------------------------------------------------------------------------------
// Case 2: a live temp of an instance in another PID namespace was swept.

#[test]
fn case_2_a_live_temp_of_an_instance_in_another_pid_namespace_is_kept() {
    if !is_root() {
        eprintln!("SKIPPED: a PID namespace needs root here");
        return;
    }
    let t = TestTree::new().file("big.bin", &noise_bytes(96 << 20, 5));
    let other = tempfile::tempdir().unwrap();
    fs::write(other.path().join("small.txt"), b"small\n").unwrap();
    let out_dir = t.side("out");
    // The first instance runs in its own PID namespace with a pid (1000000) that no process
    // of this one has: by pid alone its temp looks abandoned from here.
    let script = r#"echo 999999 > /proc/sys/kernel/ns_last_pid || exit 99; "$0" "$@""#;
    let mut first = Command::new("unshare");
    first
        .args(["-pf", "--mount-proc", "sh", "-c", script])
        .arg(bin())
        .args(["batch"])
        .arg(t.root())
        .args(["--op", "gzip", "--jobs", "1", "--out"])
        .arg(&out_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Named temps, as where the file system has no O_TMPFILE: anonymous ones have no name
    // for another instance to sweep at all.
    first.env("FILEPIPE_TEMPS", "named");
    std::os::unix::process::CommandExt::process_group(&mut first, 0);
    let first = Started::new(first);
    let group = rustix::process::Pid::from_child(&first);
    wait_until(Duration::from_secs(60), "the first instance's temp", || {
        !temps_in_progress(&out_dir).is_empty() || first_exited(&first)
    });
    rustix::process::kill_process_group(group, rustix::process::Signal::STOP).unwrap();
    // Caught mid-write: `.filepipe.1000000-<salt>.0.tmp`, locked by its writer.
    let temps = temps_under(&out_dir);
    assert_eq!(temps.len(), 1, "caught mid-write: {temps:?}");
    let name = temps[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(".filepipe.1000000"), "{name}");
    // A second instance on the same --out, meanwhile.
    let mut second = filepipe(&[
        s("batch"),
        p(other.path()),
        s("--op"),
        s("gzip"),
        s("--out"),
        p(&out_dir),
        s("--json"),
    ]);
    second.env("FILEPIPE_TEMPS", "named");
    let summary = run(second).code(0).summary();
    assert_eq!(summary["stale_temps_removed"], 0, "{summary}");
    assert_eq!(
        temps_in_progress(&out_dir),
        temps,
        "the live temp was removed"
    );
    rustix::process::kill_process_group(group, rustix::process::Signal::CONT).unwrap();
    first.finish(Duration::from_secs(120)).success();
    let check = tool(
        "gzip",
        &[s("-t"), p(&out_dir.join("big.bin.gz"))],
        t.dir.path(),
    );
    assert!(check.status.success(), "{check:?}");
}

fn first_exited(child: &std::process::Child) -> bool {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::test_kill_process(pid).is_err()
}

// ---------------------------------------------------------------------------------------------
// Case 3: --out equal to DIR, enclosing it or inside it silently processed nothing.

#[test]
fn case_3_out_that_is_encloses_or_lies_inside_dir_is_a_usage_error() {
    let t = TestTree::new()
        .file("a.txt", b"a\n")
        .file("sub/b.txt", b"b\n");
    std::os::unix::fs::symlink(t.root(), t.side("link-to-in")).unwrap();
    let root = t.root();
    let dotted = format!("{}/./", root.display());
    let (link, sub, new) = (t.side("link-to-in"), t.path("sub"), t.path("new/archive"));
    let up = t.path("new/..");
    let around = t.side("nope/../link-to-in/sub");
    let cases: Vec<(&Path, &OsStr)> = vec![
        (&root, p(&root)),
        (&root, s(&dotted)),
        (&root, p(&link)),
        (&root, p(&sub)),
        (&root, p(&new)),
        (&root, p(&up)),
        (&root, p(&around)),
        (&sub, p(&root)),
    ];
    let state = t.side("state");
    for (dir, out_dir) in cases {
        for cmd in ["batch", "watch"] {
            let mut args = vec![s(cmd), p(dir), s("--op"), s("gzip"), s("--out"), out_dir];
            if cmd == "watch" {
                args.extend([s("--state"), p(&state)]);
            }
            let err = spawn(&args)
                .finish(Duration::from_secs(20))
                .code(2)
                .stderr();
            assert!(err.contains("--out"), "{args:?}: {err}");
        }
    }
    assert!(!t.path("new").exists(), "a refused --out was created");
    assert!(!t.side("nope").exists(), "a refused --out was created");
    assert!(!t.path("a.txt.gz").exists() && !t.path("sub/b.txt.gz").exists());
}

// ---------------------------------------------------------------------------------------------
// Case 4: --remove-source never finished after a run stopped between publish and unlink.

#[test]
fn case_4_remove_source_finishes_what_an_earlier_run_published() {
    let t = TestTree::new()
        .file("a.log", &text_bytes(20_000, 1))
        .file("sub/b.log", &text_bytes(300_000, 2))
        .file("linked.log", b"two names\n")
        .file("damaged.log", &text_bytes(5_000, 3));
    fs::hard_link(t.path("linked.log"), t.side("other-name")).unwrap();
    let first = batch(&t, &[s("--op"), s("gzip"), s("--json")])
        .code(0)
        .summary();
    assert_eq!(first["done"], 4, "{first}");
    // One output is damaged afterwards, keeping its date: it must not stand for its input.
    let damaged = t.path("damaged.log.gz");
    let mtime = fs::metadata(&damaged).unwrap().modified().unwrap();
    fs::write(&damaged, b"not gzip").unwrap();
    let f = fs::File::options().write(true).open(&damaged).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let log = t.side("failures.jsonl");
    let summary = batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--remove-source"),
            s("--json"),
            s("--failure-log"),
            p(&log),
        ],
    )
    .code(1)
    .summary();
    assert_eq!(summary["done"], 3, "{summary}");
    assert_eq!(summary["failed_by_reason"]["output-exists"], 1, "{summary}");
    assert_eq!(
        summary["skipped_by_reason"]["up-to-date"],
        serde_json::Value::Null,
        "{summary}"
    );
    for (gone, len, seed) in [("a.log", 20_000, 1), ("sub/b.log", 300_000, 2)] {
        assert!(!t.path(gone).exists(), "{gone} was not removed");
        let gz = t.path(format!("{gone}.gz"));
        let back = tool("gunzip", &[s("-c"), p(&gz)], t.dir.path());
        assert_eq!(back.stdout, text_bytes(len, seed), "{gone}");
    }
    assert!(
        t.path("damaged.log").exists(),
        "kept: its output is damaged"
    );
    assert!(t.path("linked.log").exists(), "kept: it has two links");
    let records = failure_log(&log);
    let kept = records_of(&records, "hard-linked");
    assert_eq!(kept.len(), 1, "{records:?}");
    assert_eq!(kept[0]["status"], "kept");
}

// ---------------------------------------------------------------------------------------------
// Case 5: overlapping instances reported identical outputs as failures; two daemons shared a
// state.

#[test]
fn case_5_overlapping_batch_runs_find_identical_outputs_up_to_date() {
    let mut t = TestTree::new();
    for i in 0..1500 {
        t = t.file(
            format!("d{}/f{i}.txt", i % 10),
            &text_bytes(2_000 + i * 7, i as u64),
        );
    }
    let out_dir = t.side("out");
    let start = || {
        spawn(&[
            s("batch"),
            p(&t.root()),
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&out_dir),
            s("--json"),
        ])
    };
    let (a, b) = (start(), start());
    let (a, b) = (
        a.finish(Duration::from_secs(120)),
        b.finish(Duration::from_secs(120)),
    );
    let mut done = 0;
    for out in [&a, &b] {
        let summary = out.code(0).summary();
        assert_eq!(summary["failed"], 0, "{summary}");
        assert_eq!(summary["files"], 1500, "{summary}");
        done += summary["done"].as_u64().unwrap();
    }
    assert!(done >= 1500, "every file done by one of them");
    let check = tool("gzip", &[s("-tr"), p(&out_dir)], t.dir.path());
    assert!(check.status.success(), "{check:?}");
    assert!(temps_under(&out_dir).is_empty());
}

#[test]
fn case_5_a_second_daemon_on_one_state_exits_2_naming_the_holder() {
    let t = TestTree::new().file("a.txt", b"a\n");
    let other = TestTree::new();
    let first = Daemon::ready(&t, &["--op", "sha256"]);
    let state = t.side("state");
    let second = spawn(&[
        s("watch"),
        p(&other.root()),
        s("--op"),
        s("sha256"),
        s("--state"),
        p(&state),
    ]);
    let err = second.finish(Duration::from_secs(20)).code(2).stderr();
    assert!(err.contains("in use by filepipe pid"), "{err}");
    assert!(
        err.contains(&first.pid().to_string()),
        "names the holder: {err}"
    );
    first.stop().success();
    // Once the first is gone, the state is free again.
    let again = Daemon::start(
        &other,
        &["--op", "sha256", "--state", state.to_str().unwrap()],
    );
    std::thread::sleep(Duration::from_millis(100));
    again.stop().success();
}

// ---------------------------------------------------------------------------------------------
// Case 6: watch mode never processed a file linked into the tree.

#[test]
fn case_6_files_linked_into_the_watched_tree_are_processed() {
    use std::io::Write;
    let t = TestTree::new();
    let outside = t.side("outside");
    fs::create_dir(&outside).unwrap();
    let content = |name: &str| text_bytes(30_000, name.len() as u64);
    for name in ["a.txt", "b.txt"] {
        fs::write(outside.join(name), content(name)).unwrap();
    }
    let d = Daemon::ready(&t, &["--op", "gzip"]);
    // ln, and cp -l: a new name for a finished file, with no close event to tell of it.
    fs::hard_link(outside.join("a.txt"), t.path("a.txt")).unwrap();
    let cp = tool(
        "cp",
        &[s("-l"), p(&outside.join("b.txt")), p(&t.path("b.txt"))],
        t.dir.path(),
    );
    assert!(cp.status.success(), "{cp:?}");
    // A writer that writes an anonymous file, links it in whole (O_TMPFILE + linkat), and
    // closes it a moment later: its close names no file of the tree, and until it, the file
    // is still open for writing, so it is not taken yet.
    let anon = rustix::fs::openat(
        rustix::fs::CWD,
        t.root(),
        rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::WRONLY,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    let mut anon = fs::File::from(anon);
    anon.write_all(&content("c.txt")).unwrap();
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&anon));
    rustix::fs::linkat(
        rustix::fs::CWD,
        link.as_str(),
        rustix::fs::CWD,
        t.path("c.txt"),
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(anon);
    // A writer that creates its file and writes nothing for longer than the settle time: it
    // is not taken while empty, and is taken once, whole, after its close.
    let mut slow = fs::File::create(t.path("slow.txt")).unwrap();
    for name in ["a.txt", "b.txt", "c.txt"] {
        wait_until(Duration::from_secs(30), name, || {
            t.path(format!("{name}.gz")).exists()
        });
        let back = tool(
            "gunzip",
            &[s("-c"), p(&t.path(format!("{name}.gz")))],
            t.dir.path(),
        );
        assert_eq!(back.stdout, content(name), "{name}");
    }
    assert!(
        !t.path("slow.txt.gz").exists(),
        "taken while its writer had written nothing"
    );
    slow.write_all(b"first part\n").unwrap();
    std::thread::sleep(Duration::from_millis(400));
    slow.write_all(b"second part\n").unwrap();
    drop(slow);
    let idle = d.wait_idle(4);
    assert_eq!(idle.failed, 0, "{idle:?}");
    let back = tool(
        "gunzip",
        &[s("-c"), p(&t.path("slow.txt.gz"))],
        t.dir.path(),
    );
    assert_eq!(back.stdout, b"first part\nsecond part\n");
    d.stop().success();
}

// ---------------------------------------------------------------------------------------------
// Case 7: a repeated SIGTERM lost the work.

/// Sends `sig` to `child`.
fn signal(child: &std::process::Child, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_child(child), sig).unwrap();
}

/// Bytes `pid` has read so far (/proc/PID/io), a sign of progress that needs no output.
fn bytes_read(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("rchar:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn case_7_the_same_signal_twice_at_once_counts_once_and_drains() {
    // As timeout(1) does: the child, then its process group, microseconds apart.
    let mut t = TestTree::new();
    for i in 0..6 {
        t = t.file(format!("f{i}.log"), &text_bytes(12_000_000, i));
    }
    let child = spawn(&[
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("gzip"),
        s("--level"),
        s("9"),
        s("--jobs"),
        s("1"),
        s("--json"),
    ]);
    wait_until(Duration::from_secs(60), "a file in progress", || {
        !temps_in_progress(&t.root()).is_empty()
    });
    // Back to back, the two may reach the process as one; a moment apart (well within the
    // second the rule allows), the second is surely seen, and must still count once.
    signal(&child, rustix::process::Signal::TERM);
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, rustix::process::Signal::TERM);
    let summary = child.finish(Duration::from_secs(120)).code(143).summary();
    assert_eq!(summary["interrupted_by"], 15, "{summary}");
    // The file in progress was finished and published: a drain, not an abort.
    assert!(summary["done"].as_u64() >= Some(1), "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    // Files the walk had not reached are not counted; every file it found is.
    assert_eq!(
        summary["files"].as_u64(),
        summary["done"]
            .as_u64()
            .zip(summary["skipped_by_reason"]["interrupted"].as_u64())
            .map(|(d, i)| d + i),
        "{summary}"
    );
    assert!(temps_under(t.dir.path()).is_empty());
    let check = tool("gzip", &[s("-tr"), p(&t.root())], t.dir.path());
    assert!(check.status.success(), "{check:?}");
}

#[test]
fn case_7_a_real_second_signal_still_writes_the_manifest_log_and_summary() {
    // Sparse files: 1.5 GiB each to read, none of it on the disk, so a file takes long enough
    // to be caught in progress.
    let t = TestTree::new();
    const SIZE: u64 = 3 << 29;
    for i in 0..4 {
        fs::File::create(t.path(format!("f{i}.bin")))
            .unwrap()
            .set_len(SIZE)
            .unwrap();
    }
    let manifest = t.side("SHA256SUMS");
    let log = t.side("failures.jsonl");
    let child = spawn(&[
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("sha256"),
        s("--jobs"),
        s("1"),
        s("--manifest"),
        p(&manifest),
        s("--failure-log"),
        p(&log),
        s("--json"),
    ]);
    // One file and a bit read: one done, one in progress.
    let pid = child.id();
    wait_until(Duration::from_secs(120), "a file and a bit read", || {
        bytes_read(pid) > SIZE + (64 << 20)
    });
    signal(&child, rustix::process::Signal::INT);
    std::thread::sleep(Duration::from_millis(20));
    signal(&child, rustix::process::Signal::TERM);
    let summary = child.finish(Duration::from_secs(60)).code(130).summary();
    let done = summary["done"].as_u64().unwrap();
    assert!(done >= 1, "{summary}");
    assert!(done < 4, "the file in progress was abandoned: {summary}");
    let interrupted = summary["skipped_by_reason"]["interrupted"]
        .as_u64()
        .unwrap();
    assert_eq!(
        summary["files"].as_u64(),
        Some(done + interrupted),
        "{summary}"
    );
    assert_eq!(summary["failed"], 0, "{summary}");
    let listed = fs::read_to_string(&manifest).unwrap();
    assert_eq!(listed.lines().count() as u64, done, "{listed}");
    let check = tool("sha256sum", &[s("-c"), p(&manifest)], &t.root());
    assert!(check.status.success(), "{check:?}");
    let records = failure_log(&log);
    assert_eq!(
        records_of(&records, "interrupted").len() as u64,
        interrupted
    );
}

#[test]
fn case_7_watch_under_timeout_preserve_status_drains_and_prints_its_summary() {
    let t = TestTree::new().file("a.txt", b"a\n");
    let mut cmd = Command::new("timeout");
    cmd.args(["--preserve-status", "-s", "TERM", "1"])
        .arg(bin())
        .arg("watch")
        .arg(t.root())
        .args(["--op", "sha256", "--json", "--state"])
        .arg(t.side("state"));
    for _ in 0..3 {
        let summary = run({
            let mut c = Command::new("timeout");
            c.args(cmd.get_args());
            c
        })
        .code(0)
        .summary();
        assert_eq!(summary["op"], "sha256", "{summary}");
    }
}

// ---------------------------------------------------------------------------------------------
// Case 8: verify said OK when it could not check.

/// A gzip file of `data`, made by the real gzip.
fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    child.wait_with_output().unwrap().stdout
}

#[test]
fn case_8_verify_fails_for_what_it_could_not_check() {
    let t = TestTree::new()
        .file("good.gz", &gzip_bytes(b"good\n"))
        .file("locked/corrupt.gz", b"\x1f\x8bnot really")
        .dir("a-directory.gz");
    std::os::unix::fs::symlink("good.gz", t.path("link.gz")).unwrap();
    mkfifo(&t.path("fifo.gz"));
    t.open_to_all();
    fs::set_permissions(t.path("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    let out = run({
        let mut c = unprivileged();
        c.args([s("verify"), p(&t.root())]);
        c
    });
    let stdout = out.code(1).stdout();
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{}: ", t.path(name).display())))
            .unwrap_or_else(|| panic!("no line for {name}: {stdout}"))
            .to_string()
    };
    assert!(line("good.gz").ends_with(": OK"));
    assert!(
        line("locked").contains("cannot read this directory"),
        "{stdout}"
    );
    assert!(line("link.gz").contains("a symlink"), "{stdout}");
    assert!(line("fifo.gz").contains("special file"), "{stdout}");
    assert!(line("a-directory.gz").contains("a directory"), "{stdout}");
    fs::set_permissions(t.path("locked"), fs::Permissions::from_mode(0o755)).unwrap();
}

/// `bytes`' SHA-256, as `sha256sum` prints it.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A manifest is untrusted input: whatever it names (`..`, an absolute path elsewhere, a
/// symlink in the tree that leads out, a FIFO), `verify` reads nothing outside its root, opens
/// no FIFO (a waiting writer stays blocked) and does not tell whether a path outside exists
/// (found by a review: it read and vouched for any file, OK or MISSING, and let a FIFO's
/// writer go).
#[test]
fn case_8_a_hostile_manifest_gets_verify_to_read_nothing_outside_its_root() {
    let t = TestTree::new().file("tree/a", b"alpha\n");
    let outside = t.side("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"secret\n").unwrap();
    let tree = t.path("tree");
    std::os::unix::fs::symlink(outside.join("secret"), tree.join("link")).unwrap();
    std::os::unix::fs::symlink(&outside, tree.join("outdir")).unwrap();
    std::os::unix::fs::symlink("a", tree.join("inlink")).unwrap();
    // Out of the root, to nothing: not "missing", which would tell what is not outside.
    std::os::unix::fs::symlink("../nothing-here", tree.join("dangling")).unwrap();
    fs::create_dir(tree.join("sub")).unwrap();
    std::os::unix::fs::symlink("../a", tree.join("sub/up")).unwrap();
    // Out and back in: through a directory outside that exists, and one that does not. Both
    // refused alike (the first was read, the second refused: an oracle for what exists).
    std::os::unix::fs::symlink("../outside/../tree/a", tree.join("probe-there")).unwrap();
    std::os::unix::fs::symlink("../nowhere/../tree/a", tree.join("probe-not-there")).unwrap();
    // Out and straight back in by the root's own name: followed.
    std::os::unix::fs::symlink("../tree/a", tree.join("back")).unwrap();
    mkfifo(&tree.join("fifo"));
    // A writer blocked on the FIFO until a reader opens it.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!("echo payload > '{}'", tree.join("fifo").display()))
        .spawn()
        .unwrap();
    // The right digests: a name read would check out.
    let secret = sha256_hex(b"secret\n");
    let alpha = sha256_hex(b"alpha\n");
    let abs_secret = outside.join("secret");
    let names: Vec<(String, &str)> = vec![
        ("../outside/secret".into(), "outside the root"),
        (abs_secret.display().to_string(), "outside the root"),
        ("link".into(), "leads outside the root"),
        ("outdir/secret".into(), "leads outside the root"),
        ("outdir/no-such-file".into(), "leads outside the root"),
        ("dangling".into(), "leads outside the root"),
        ("fifo".into(), "not a regular file"),
        ("sub/../a".into(), "outside the root"),
        ("probe-there".into(), "leads outside the root"),
        ("probe-not-there".into(), "leads outside the root"),
    ];
    let mut manifest = String::new();
    for (name, _) in &names {
        manifest.push_str(&format!("{secret}  {name}\n"));
    }
    for name in ["a", "inlink", "sub/up", "back"] {
        manifest.push_str(&format!("{alpha}  {name}\n"));
    }
    manifest.push_str(&format!("{alpha}  {}\n", tree.join("a").display()));
    fs::write(t.side("SUMS"), manifest).unwrap();
    let out = run(filepipe(&[
        s("verify"),
        p(&t.side("SUMS")),
        s("--root"),
        p(&tree),
    ]));
    // Failures only: nothing missing (a name outside the root is not looked for), nothing
    // added (the links and the FIFO are not regular files).
    let stdout = out.code(1).stdout();
    for (name, says) in &names {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no line for {name}: {stdout}"));
        assert!(
            line.contains("FAILED open or read") && line.contains(says),
            "{name}: {line}\n{stdout}"
        );
    }
    // Links that stay beneath the root are followed, as `batch --follow-symlinks` does.
    for name in ["a", "inlink", "sub/up", "back"] {
        assert!(
            stdout.contains(&format!("\n{name}: OK\n")),
            "{name}: {stdout}"
        );
    }
    assert!(
        stdout.contains(&format!("{}: OK\n", tree.join("a").display())),
        "{stdout}"
    );
    // The FIFO was never opened: its writer is still waiting.
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the FIFO's writer was let go"
    );
    fs::File::open(tree.join("fifo")).unwrap();
    writer.wait().unwrap();
}

/// A symlink through `/proc/PID/root` of a process in another mount namespace, where a bind
/// mount puts an outside directory at the root's own path: `/proc` then names what it leads
/// to with a path that reads as inside the root. Not read (found by a review: `verify` read
/// `/etc/shadow` so, and a cluster job with `follow_symlinks` had it compressed into the
/// tree). Needs root to make the namespace (CI runs as root); says SKIPPED otherwise.
#[test]
fn case_8_a_link_into_another_mount_namespace_is_not_taken_for_inside_the_root() {
    let t = TestTree::new().file("tree/a", b"alpha\n");
    let tree = t.path("tree");
    let outside = t.side("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"secret\n").unwrap();
    let ns = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount --bind '{}' '{}' && echo ready && exec sleep 120",
            outside.display(),
            tree.display()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut ns) = ns else {
        eprintln!("SKIPPED: unshare is not installed");
        return;
    };
    let mut ready = String::new();
    use std::io::BufRead as _;
    let _ = std::io::BufReader::new(ns.stdout.take().unwrap()).read_line(&mut ready);
    if ready.trim() != "ready" {
        let _ = ns.kill();
        let _ = ns.wait();
        eprintln!("SKIPPED: cannot make a mount namespace here (not root?)");
        return;
    }
    let through = format!("/proc/{}/root{}/secret", ns.id(), tree.display());
    std::os::unix::fs::symlink(&through, tree.join("link")).unwrap();
    fs::write(
        t.side("SUMS"),
        format!(
            "{}  link\n{}  a\n",
            sha256_hex(b"secret\n"),
            sha256_hex(b"alpha\n")
        ),
    )
    .unwrap();
    let out = run(filepipe(&[
        s("verify"),
        p(&t.side("SUMS")),
        s("--root"),
        p(&tree),
    ]));
    let _ = ns.kill();
    let _ = ns.wait();
    let stdout = out.code(1).stdout();
    assert!(
        stdout.contains("link: FAILED open or read (a symlink on its path leads outside the root"),
        "{stdout}"
    );
    assert!(stdout.contains("a: OK"), "{stdout}");
}

/// Added files are looked for in the whole tree: a directory the walk cannot read leaves the
/// report incomplete, which is said on a line of its own and fails the run (it was a warning
/// on stderr, silenced by `-q`, and the run passed).
#[test]
fn case_8_verify_fails_when_it_cannot_look_for_added_files_everywhere() {
    let t = TestTree::new()
        .file("a", b"alpha\n")
        .file("locked/evil", b"added where nobody looks\n");
    fs::write(t.side("SUMS"), format!("{}  a\n", sha256_hex(b"alpha\n"))).unwrap();
    t.open_to_all();
    fs::set_permissions(t.path("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    let out = run({
        let mut c = unprivileged();
        c.args([
            s("verify"),
            p(&t.side("SUMS")),
            s("--root"),
            p(&t.root()),
            s("-q"),
        ]);
        c
    });
    fs::set_permissions(t.path("locked"), fs::Permissions::from_mode(0o755)).unwrap();
    let stdout = out.code(1).stdout();
    assert!(
        stdout.contains("locked: FAILED open or read (cannot read this directory"),
        "{stdout}"
    );
    // -q prints what failed only (as `sha256sum -c --quiet`).
    assert!(!stdout.contains("a: OK"), "{stdout}");
}

#[test]
fn case_8_a_result_that_cannot_be_written_fails_a_closed_pipe_does_not() {
    let t = TestTree::new().file("good.gz", &gzip_bytes(b"good\n"));
    // Runs `cmd` with its stdout to `stdout` (so the Run's stdout is empty).
    let run_to = |mut cmd: Command, stdout: Stdio| {
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        Started::new(cmd).finish(TIMEOUT)
    };
    // /dev/full: every write fails with ENOSPC.
    let full = fs::File::options().write(true).open("/dev/full").unwrap();
    let err = run_to(filepipe(&[s("verify"), p(&t.root())]), full.into())
        .code(1)
        .stderr();
    assert!(err.contains("No space left"), "{err}");
    // A reader that went away (`| head`): no error, the verdict's exit code.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let err = run_to(filepipe(&[s("verify"), p(&t.root())]), writer.into())
        .code(0)
        .stderr();
    assert_eq!(err, "");
    // The same for status.
    let d = Daemon::ready(&t, &["--op", "sha256"]);
    d.wait_idle(1);
    drop(d);
    let state = t.side("state");
    for args in [&["status"][..], &["status", "--failed"]] {
        let status_to = |stdout: Stdio| {
            let mut cmd = filepipe(&[s(args[0])]);
            cmd.args(&args[1..]).arg("--state").arg(&state);
            run_to(cmd, stdout)
        };
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let err = status_to(writer.into()).code(0).stderr();
        assert_eq!(err, "", "{args:?}");
        let full = fs::File::options().write(true).open("/dev/full").unwrap();
        status_to(full.into()).code(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Case 9: the failure log was truncated at every start.

#[test]
fn case_9_the_failure_log_keeps_every_run_and_tells_them_apart() {
    let t = TestTree::new().file("ok.txt", b"ok\n");
    let long = "n".repeat(253);
    let t = t.file(&long, b"its output name is too long\n");
    let log = t.side("failures.jsonl");
    for _ in 0..2 {
        batch(
            &t,
            &[
                s("--op"),
                s("gzip"),
                s("--failure-log"),
                p(&log),
                s("--force"),
            ],
        )
        .code(1);
    }
    let all = failure_log_all(&log);
    let starts: Vec<_> = all.iter().filter(|r| r["status"] == "start").collect();
    assert_eq!(starts.len(), 2, "{all:?}");
    assert_ne!(starts[0]["run"], starts[1]["run"]);
    let failed = records_of(&all, "name-too-long");
    assert_eq!(failed.len(), 2, "both runs' records: {all:?}");
    assert_eq!(failed[0]["run"], starts[0]["run"]);
    assert_eq!(failed[1]["run"], starts[1]["run"]);
    assert!(starts[0]["command"]
        .as_str()
        .unwrap()
        .contains("--failure-log"));
}

// ---------------------------------------------------------------------------------------------
// Case 10: writes through mmap left a stale manifest entry.

/// The manifest line `sha256sum` would write for `data` named `name`.
fn manifest_line(data: &[u8], name: &str) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{hex}  {name}")
}

#[test]
fn case_10_a_file_written_through_a_mapping_after_its_close_is_listed_with_its_final_content() {
    let t = TestTree::new();
    let manifest = t.side("SHA256SUMS");
    let d = Daemon::ready(
        &t,
        &["--op", "sha256", "--manifest", manifest.to_str().unwrap()],
    );
    let path = t.path("mapped.bin");
    let len = 4096;
    // A file written and closed (complete: it settles from here), then mapped by a writer
    // that closes its descriptor and goes on writing through the mapping for three seconds,
    // within one page: after the first write the kernel leaves the mtime alone, and no event
    // comes until the munmap.
    fs::write(&path, vec![b'-'; len]).unwrap();
    let mut map = SharedMap::open(&path, len);
    let mut content = vec![0u8; len];
    for round in 0..60u8 {
        content[..64].fill(b'a' + round % 26);
        content[64 + round as usize] = round;
        map.write(0, &content);
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(map);
    let line = manifest_line(&content, "mapped.bin");
    wait_until(
        Duration::from_secs(60),
        "the final content in the manifest",
        || fs::read_to_string(&manifest).is_ok_and(|m| m.contains(&line)),
    );
    d.stop().success();
    let check = tool("sha256sum", &[s("-c"), p(&manifest)], &t.root());
    assert!(check.status.success(), "{check:?}");
}

#[test]
fn case_10_a_rewrite_that_puts_size_and_mtime_back_is_hashed_again() {
    // As cp -p or rsync --inplace -t over an existing file: new bytes, same size, same mtime.
    let t = TestTree::new().file("f.txt", b"first version\n");
    let manifest = t.side("SHA256SUMS");
    let args = ["--op", "sha256", "--manifest", manifest.to_str().unwrap()];
    let rewrite = |content: &[u8]| {
        let mtime = fs::metadata(t.path("f.txt")).unwrap().modified().unwrap();
        let f = fs::File::options()
            .write(true)
            .open(t.path("f.txt"))
            .unwrap();
        std::io::Write::write_all(&mut &f, content).unwrap();
        f.set_modified(mtime).unwrap();
    };
    let d = Daemon::ready(&t, &args);
    d.wait_idle(1);
    // While it runs.
    rewrite(b"other version\n");
    let line = manifest_line(b"other version\n", "f.txt");
    wait_until(
        Duration::from_secs(60),
        "the rewrite in the manifest",
        || fs::read_to_string(&manifest).is_ok_and(|m| m.contains(&line)),
    );
    d.wait_idle(2);
    d.stop();
    // While it is down.
    rewrite(b"third version\n");
    let d = Daemon::ready(&t, &args);
    let line = manifest_line(b"third version\n", "f.txt");
    wait_until(
        Duration::from_secs(60),
        "the rewrite made while down",
        || fs::read_to_string(&manifest).is_ok_and(|m| m.contains(&line)),
    );
    d.wait_idle(1);
    d.stop().success();
}

// ---------------------------------------------------------------------------------------------
// Case 13 (smaller ones).

#[test]
fn case_13_the_watch_summary_counts_each_file_once_however_often_it_was_tried() {
    let t = TestTree::new();
    let log = t.side("failures.jsonl");
    let d = Daemon::ready(
        &t,
        &["--op", "sha256", "--failure-log", log.to_str().unwrap()],
    );
    // Written and closed, but another descriptor keeps it open for writing for a few seconds:
    // tried, found in use, tried again (1 s, then 2 s later), and done once it is closed.
    fs::write(t.path("busy.txt"), b"busy\n").unwrap();
    let holder = fs::File::options()
        .write(true)
        .open(t.path("busy.txt"))
        .unwrap();
    wait_until(Duration::from_secs(30), "a retry", || {
        d.notes.last_status().is_some_and(|s| s.retrying == 1)
    });
    std::thread::sleep(Duration::from_millis(3500));
    drop(holder);
    let idle = d.wait_idle(1);
    assert_eq!((idle.done, idle.failed), (1, 0), "{idle:?}");
    let summary = d.stop().summary();
    assert_eq!(summary["files"], 1, "one file: {summary}");
    assert_eq!(summary["done"], 1, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert!(summary["retries"].as_u64() >= Some(2), "{summary}");
    // Logged once, however many times it was tried: the log is never truncated.
    let records = failure_log(&log);
    assert_eq!(records_of(&records, "in-use").len(), 1, "{records:?}");
}

// ---------------------------------------------------------------------------------------------
// Case 11: absurd --jobs aborted.

#[test]
fn case_11_jobs_is_bounded_and_a_thread_that_cannot_start_is_a_clear_error() {
    let t = TestTree::new().file("a.txt", b"a\n");
    for jobs in ["65535", "257", "0"] {
        let child = spawn(&[
            s("batch"),
            p(&t.root()),
            s("--op"),
            s("sha256"),
            s("--jobs"),
            s(jobs),
        ]);
        let err = child.finish(Duration::from_secs(20)).code(2).stderr();
        assert!(err.contains("1..=256"), "{err}");
    }
    batch(&t, &[s("--op"), s("gzip"), s("--jobs"), s("256"), s("-q")]).success();
    let config = t.side("filepipe.toml");
    fs::write(
        &config,
        format!(
            "jobs = 1000\n[[watch]]\npath = {:?}\nop = \"sha256\"\n",
            t.root()
        ),
    )
    .unwrap();
    let err = run(filepipe(&[s("check-config"), p(&config)]))
        .code(2)
        .stderr();
    assert!(err.contains(":1: jobs: must be 1 to 256"), "{err}");
    // Threads that cannot be started (a limit on processes): a clear error, never an abort.
    if !is_root() {
        eprintln!("SKIPPED (thread limit half): needs root to run as another user");
        return;
    }
    t.open_to_all();
    // A user of its own: the limit counts every process and thread of the user, and the other
    // tests running beside this one as `nobody` (65534) made the exec itself fail (EAGAIN).
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--nproc=4",
        "setpriv",
        "--reuid=65511",
        "--regid=65511",
        "--clear-groups",
    ])
    .arg(bin())
    .args(["batch"])
    .arg(t.root())
    .args(["--op", "sha256", "--jobs", "32"]);
    let err = run(cmd).code(1).stderr();
    assert!(err.contains("worker threads"), "{err}");
    assert!(!err.contains("fatal runtime error"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Case 12: config files were read without limits.

#[test]
fn case_12_config_files_are_read_within_limits_and_every_duration_is_bounded() {
    let t = TestTree::new().file("a.txt", b"a\n");
    let check = |path: &Path| spawn(&[s("check-config"), p(path)]).finish(Duration::from_secs(20));
    let fifo = t.side("fifo.toml");
    mkfifo(&fifo);
    let big = t.side("big.toml");
    fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    for (path, says) in [
        (Path::new("/dev/zero"), "not a regular file"),
        (fifo.as_path(), "not a regular file"),
        (big.as_path(), "larger than 1024 KiB"),
    ] {
        let err = check(path).code(2).stderr();
        assert!(err.contains(says), "{path:?}: {err}");
    }
    // A parse error quotes its line: cut, not echoed whole (twice).
    let long = t.side("long.toml");
    fs::write(&long, format!("jobs = \"{}\n", "x".repeat(900_000))).unwrap();
    let out = check(&long);
    let err = &out.code(2).output().stderr;
    assert!(err.len() < 4096, "{} bytes on stderr", err.len());
    // Durations: an hour at most, in the file (global and per pipeline) and on the command line.
    let root = format!("{:?}", t.root());
    for (body, line) in [
        (
            format!(
                "settle_ms = 18446744073709551615\n[[watch]]\npath = {root}\nop = \"sha256\"\n"
            ),
            ":1: settle_ms",
        ),
        (
            format!("[[watch]]\npath = {root}\nop = \"sha256\"\nsettle_ms = 3600001\n"),
            ":4: watch[0].settle_ms",
        ),
    ] {
        let config = t.side("c.toml");
        fs::write(&config, body).unwrap();
        let err = check(&config).code(2).stderr();
        assert!(err.contains(line), "{err}");
        assert!(err.contains("at most 3600000"), "{err}");
    }
    run(filepipe(&[
        s("watch"),
        p(&t.root()),
        s("--op"),
        s("sha256"),
        s("--settle"),
        s("18446744073709551615"),
    ]))
    .code(2);
}

#[test]
fn case_13_a_manifest_that_cannot_be_written_is_refused_before_anything_is_read() {
    let t = TestTree::new().file("a.txt", b"a\n");
    fs::create_dir(t.side("a-directory")).unwrap();
    let err = batch(
        &t,
        &[
            s("--op"),
            s("sha256"),
            s("--manifest"),
            p(&t.side("a-directory")),
        ],
    )
    .code(2)
    .stderr();
    assert!(err.contains("not a regular file"), "{err}");
    if is_root() {
        // A directory nobody may write in.
        t.open_to_all();
        let locked = t.side("locked");
        fs::create_dir(&locked).unwrap();
        let err = run({
            let mut c = unprivileged();
            c.args([
                s("batch"),
                p(&t.root()),
                s("--op"),
                s("sha256"),
                s("--manifest"),
            ])
            .arg(locked.join("SUMS"));
            c
        })
        .code(2)
        .stderr();
        assert!(err.contains("cannot write in"), "{err}");
    }
}

#[test]
fn case_13_the_json_summary_is_printed_even_when_the_manifest_write_fails() {
    // A large sparse file keeps the run busy while the manifest's directory disappears.
    let t = TestTree::new().file("small.txt", b"small\n");
    fs::File::create(t.path("big.bin"))
        .unwrap()
        .set_len(3 << 29)
        .unwrap();
    let mdir = t.side("mdir");
    fs::create_dir(&mdir).unwrap();
    let child = spawn(&[
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("sha256"),
        s("--jobs"),
        s("1"),
        s("--manifest"),
        p(&mdir.join("SUMS")),
        s("--json"),
    ]);
    let pid = child.id();
    wait_until(Duration::from_secs(60), "the big file in progress", || {
        bytes_read(pid) > 64 << 20
    });
    fs::remove_dir(&mdir).unwrap();
    let out = child.finish(Duration::from_secs(120));
    let summary = out.code(1).summary();
    assert_eq!(summary["done"], 2, "{summary}");
    assert!(
        summary["error"]
            .as_str()
            .is_some_and(|e| e.contains("SUMS")),
        "{summary}"
    );
    assert!(out.stderr().contains("SUMS"), "{}", out.stderr());
}

#[test]
fn case_13_a_link_to_a_directory_it_is_in_never_suggests_the_flag_already_given() {
    let t = TestTree::new().file("f", b"f\n");
    std::os::unix::fs::symlink(".", t.path("loop")).unwrap();
    let log = t.side("failures.jsonl");
    batch(
        &t,
        &[
            s("--op"),
            s("sha256"),
            s("--follow-symlinks"),
            s("--failure-log"),
            p(&log),
        ],
    )
    .success();
    let records = failure_log(&log);
    let link = records_of(&records, "symlink");
    assert_eq!(link.len(), 1, "{records:?}");
    let message = link[0]["message"].as_str().unwrap();
    assert!(message.contains("loop"), "{message}");
    assert!(!message.contains("--follow-symlinks"), "{message}");
}

#[test]
fn case_10_watch_gzip_redoes_a_rewrite_that_puts_the_mtime_back() {
    // cp -p, touch -r: its own output is dated right, but holds the old content.
    let t = TestTree::new().file("x", b"version one\n");
    let d = Daemon::ready(&t, &["--op", "gzip"]);
    d.wait_idle(1);
    let mtime = fs::metadata(t.path("x")).unwrap().modified().unwrap();
    fs::write(t.path("x"), b"version two, longer\n").unwrap();
    fs::File::options()
        .write(true)
        .open(t.path("x"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let gunzip = || tool("gunzip", &[s("-c"), p(&t.path("x.gz"))], t.dir.path()).stdout;
    wait_until(Duration::from_secs(60), "the new content in x.gz", || {
        gunzip() == b"version two, longer\n"
    });
    d.wait_idle(2);
    d.stop().success();
}

#[test]
fn case_10_where_the_kernel_cannot_tell_the_daemon_says_so_once() {
    if !is_root() {
        eprintln!("SKIPPED: needs root, to run the daemon as a user that owns none of the files");
        return;
    }
    let t = TestTree::new().file("a.txt", b"a\n").file("b.txt", b"b\n");
    t.open_to_all();
    let socket = t.side("notify.sock");
    let notes = Notifications::listen(&socket);
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = unprivileged();
    cmd.arg("watch")
        .arg(t.root())
        .args(["--op", "sha256", "--json", "--settle", "100", "--state"])
        .arg(t.side("state"))
        .env("NOTIFY_SOCKET", &socket);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = Started::new(cmd);
    wait_until(Duration::from_secs(60), "both files hashed", || {
        notes.last_status().is_some_and(|s| s.idle() && s.done == 2)
    });
    signal(&child, rustix::process::Signal::TERM);
    let err = child.finish(Duration::from_secs(60)).success().stderr();
    assert_eq!(
        err.matches("cannot tell whether files are still open")
            .count(),
        1,
        "{err}"
    );
}

#[test]
fn case_13_a_file_waiting_to_be_retried_then_deleted_is_no_failure() {
    let t = TestTree::new();
    let d = Daemon::ready(&t, &["--op", "sha256"]);
    fs::write(t.path("busy.txt"), b"busy\n").unwrap();
    let holder = fs::File::options()
        .write(true)
        .open(t.path("busy.txt"))
        .unwrap();
    wait_until(Duration::from_secs(30), "a retry", || {
        d.notes.last_status().is_some_and(|s| s.retrying == 1)
    });
    fs::remove_file(t.path("busy.txt")).unwrap();
    drop(holder);
    let summary = d.stop().summary();
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["files"], 0, "{summary}");
}

/// Runs `filepipe ARGS` under strace, killed (SIGKILL) at its first rename: the instant a
/// replacing publish has its temp under a temp name. `None` where strace is missing.
fn killed_at_first_rename(args: &[&OsStr], named: bool) -> Option<Run> {
    if Command::new("strace").arg("-V").output().is_err() {
        return None;
    }
    let mut cmd =
        common::strace::filepipe_injected(&["inject=renameat,renameat2:signal=SIGKILL:when=1"]);
    cmd.args(args);
    if named {
        cmd.env("FILEPIPE_TEMPS", "named");
    }
    Some(run(cmd))
}

#[test]
fn case_1_a_crash_while_replacing_leaves_only_a_temp_the_next_run_removes() {
    for named in [false, true] {
        let t = TestTree::new().file("a.log", &text_bytes(50_000, 1));
        let out_dir = t.side("out");
        let root = t.root();
        let args = [
            s("batch"),
            p(&root),
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&out_dir),
        ];
        run(filepipe(&[&args[..], &[s("--json")]].concat()))
            .code(0)
            .summary();
        let Some(killed) = killed_at_first_rename(&[&args[..], &[s("--force")]].concat(), named)
        else {
            eprintln!("SKIPPED: no strace to kill the run at its rename");
            return;
        };
        killed.context("not killed").failure();
        let left = temps_under(t.dir.path());
        assert_eq!(left.len(), 1, "named {named}: the replacing temp: {left:?}");
        let summary = run(filepipe(&[&args[..], &[s("--json")]].concat()))
            .code(0)
            .summary();
        assert_eq!(
            summary["stale_temps_removed"], 1,
            "named {named}: {summary}"
        );
        assert!(temps_under(t.dir.path()).is_empty(), "named {named}");
        let back = tool(
            "gunzip",
            &[s("-c"), p(&out_dir.join("a.log.gz"))],
            t.dir.path(),
        );
        assert_eq!(back.stdout, text_bytes(50_000, 1));
    }
}

/// With `--follow-symlinks`, a link the walk found leading inside the root and pointed out of
/// it before a worker opened the file behind it (here while strace holds that open back) must
/// not get the outside file read: the worker opens by full path, following links, and judges
/// what it opened (found by a hostile review: the outside file's digest was in the manifest,
/// and with gzip its contents in the outputs).
#[test]
fn with_follow_symlinks_a_link_pointed_outside_after_the_walk_is_not_read() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace");
        return;
    }
    let t = TestTree::new().file("real/secret", b"inside the tree\n");
    let outside = tempfile::tempdir().unwrap();
    fs::write(
        outside.path().join("secret"),
        b"OUTSIDE, never to be read\n",
    )
    .unwrap();
    let root = t.root();
    let link = root.join("l");
    std::os::unix::fs::symlink("real", &link).unwrap();
    let trace = t.side("trace");
    let sums = t.side("SUMS");
    let log = t.side("failures.jsonl");
    let mut cmd = Command::new("strace");
    // The opens beneath the root are held back (-P, -y to show paths): the worker's of
    // l/secret among them (by openat2 beneath the root, which follows links only within it;
    // or by full path), and the walk's of directories.
    cmd.args(["-f", "-y", "-P"])
        .arg(&root)
        .args(["-e", "trace=open,openat,openat2", "-o"])
        .arg(&trace)
        .args(["-e", "inject=open,openat,openat2:delay_enter=1500000"])
        .arg(bin())
        .args([
            s("batch"),
            p(&root),
            s("--op"),
            s("sha256"),
            s("--follow-symlinks"),
        ])
        .arg("--manifest")
        .arg(&sums)
        .arg("--failure-log")
        .arg(&log)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Started::new(cmd);
    wait_until(
        Duration::from_secs(60),
        "the open of l/secret held back",
        || {
            fs::read_to_string(&trace)
                .is_ok_and(|t| t.contains("/l/secret\"") || t.contains(", \"l/secret\""))
        },
    );
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(outside.path(), &link).unwrap();
    started.finish(Duration::from_secs(60));
    let manifest = fs::read_to_string(&sums).unwrap_or_default();
    let outside_digest = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(b"OUTSIDE, never to be read\n");
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert!(
        !manifest.contains(&outside_digest),
        "the file outside the root was read: {manifest}"
    );
    let failures = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        failures.contains("l/secret") && failures.contains("outside the root"),
        "l/secret not reported as leading outside the root: {failures}\n{}",
        fs::read_to_string(&trace).unwrap_or_default()
    );
}

/// A directory the walk closed to stay within its descriptor budget and comes back to is
/// opened again only to reach its entries by name: read permission taken from it meanwhile
/// (still searchable) must not lose them. A walk by path read each directory whole before
/// going on, and the files stay openable (found by a hostile review of the walk by
/// descriptors: 15 of 70 done, the rest failed as "could not be opened again").
#[test]
fn a_directory_made_unreadable_while_the_walk_is_below_it_keeps_its_entries() {
    if !common::strace::have_strace() || !is_root() {
        eprintln!("SKIPPED: needs strace, and root to drop privileges");
        return;
    }
    const FILES: usize = 200;
    let mut tree = TestTree::new();
    for i in 0..FILES {
        tree = tree.file(format!("x/a{i:03}"), format!("{i}\n").as_bytes());
    }
    // Deeper than the walk's budget of open directories, so x is closed on the way down.
    let mut chain = String::from("x");
    for i in 1..=20 {
        chain.push_str(&format!("/d{i}"));
        tree = tree.file(format!("{chain}/f"), format!("{i}\n").as_bytes());
    }
    tree.open_to_all();
    let t = tree;
    let root = t.root();
    let held = root.join(&chain).parent().unwrap().to_path_buf();
    let trace = t.side("trace");
    let sums = t.side("SUMS");
    let log = t.side("failures.jsonl");
    let mut cmd = Command::new("strace");
    // The open of the deepest directory (from its parent's descriptor, which strace's -P
    // matches) is held back on its way out while x loses its read right: strace writes the
    // call before the delay, so the trace says when.
    cmd.args(["-f", "-qq", "-P"])
        .arg(&held)
        .args(["-e", "trace=openat", "-o"])
        .arg(&trace)
        .args(["-e", "inject=openat:delay_exit=1500000"])
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(bin())
        .args([s("batch"), p(&root), s("--op"), s("sha256"), s("--json")])
        .arg("--manifest")
        .arg(&sums)
        .arg("--failure-log")
        .arg(&log)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Started::new(cmd);
    wait_until(
        Duration::from_secs(60),
        "the open of the chain's deep directory held back",
        || fs::read_to_string(&trace).is_ok_and(|t| t.contains("\"d20\"")),
    );
    fs::set_permissions(root.join("x"), fs::Permissions::from_mode(0o311)).unwrap();
    let out = started.finish(Duration::from_secs(60));
    fs::set_permissions(root.join("x"), fs::Permissions::from_mode(0o777)).unwrap();
    let failures = fs::read_to_string(&log).unwrap_or_default();
    let manifest = fs::read_to_string(&sums).unwrap_or_default();
    assert_eq!(manifest.lines().count(), FILES + 20, "{failures}");
    out.success();
}

/// Whoever owns the directory a root is in can rename the root away during a run and put a
/// symlink to anywhere in its place. Outputs, and the manifest, still go beneath the
/// directories opened at the start: the output directories were found again by path at each
/// change of directory, so outputs went where the link led, owned by the inputs' owner, and
/// with `--force` replaced files there; the manifest was written by path at the end (found by
/// a review: 552 files written into a victim tree, and its `.gz` files replaced). Both ways:
/// outputs next to the inputs, and under `--out` with a manifest, each root swapped.
#[test]
fn outputs_and_manifests_stay_beneath_the_directories_opened_at_the_start() {
    for with_out in [false, true] {
        let t = TestTree::new();
        let victim = t.side("victim");
        for d in 0..40 {
            for i in 0..10 {
                let rel = format!("d{d:02}/f{i}");
                let p = t.path(&rel);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, noise_bytes(300_000, d * 10 + i + 1)).unwrap();
            }
            fs::create_dir_all(victim.join(format!("d{d:02}"))).unwrap();
            fs::write(victim.join(format!("d{d:02}/f5.gz")), b"precious").unwrap();
        }
        fs::create_dir(t.side("m")).unwrap();
        fs::write(victim.join("SUMS"), b"precious").unwrap();
        let victim_before = listing(&victim);
        let (root, arch, sums) = (t.root(), t.side("arch"), t.side("m/SUMS"));
        let mut args = vec![
            s("batch"),
            p(&root),
            s("--force"),
            s("--jobs"),
            s("1"),
            s("--json"),
        ];
        if with_out {
            args.extend([s("--op"), s("gzip,sha256"), s("--out"), p(&arch)]);
            args.extend([s("--manifest"), p(&sums)]);
        } else {
            args.extend([s("--op"), s("gzip")]);
        }
        let mut child = spawn(&args);
        // The first output out: every directory the run writes beneath is open by now.
        let outputs = if with_out { arch.clone() } else { root.clone() };
        wait_until(Duration::from_secs(60), "a first output", || {
            walkdir::WalkDir::new(&outputs)
                .into_iter()
                .filter_map(Result::ok)
                .any(|e| e.path().extension() == Some(OsStr::new("gz")))
        });
        let swap = |dir: &Path| {
            let moved = dir.with_extension("moved");
            fs::rename(dir, &moved).unwrap();
            std::os::unix::fs::symlink(&victim, dir).unwrap();
            moved
        };
        let tree = swap(&root);
        let arch_now = if with_out { swap(&arch) } else { tree.clone() };
        let m_now = if with_out {
            swap(&t.side("m"))
        } else {
            t.side("m")
        };
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its roots were swapped: nothing tested (a bigger tree?)"
        );
        let run = child.finish(Duration::from_secs(300));
        let sum = run.success().summary();
        assert_eq!(sum["done"], 400, "{sum}");
        assert_eq!(listing(&victim), victim_before, "written outside the roots");
        // Every output where the roots are now, whole.
        for d in 0..40 {
            for i in 0..10 {
                let out = arch_now.join(format!("d{d:02}/f{i}.gz"));
                let back = std::process::Command::new("gzip")
                    .arg("-dc")
                    .arg(&out)
                    .output()
                    .unwrap();
                assert!(back.status.success(), "{out:?}");
                assert_eq!(back.stdout, noise_bytes(300_000, d * 10 + i + 1), "{out:?}");
            }
        }
        if with_out {
            let check = tool("sha256sum", &[s("-c"), p(&m_now.join("SUMS"))], &tree);
            assert!(check.status.success(), "{check:?}");
        }
    }
}

/// Every entry under `dir` with its content (files) or none (directories), sorted.
fn listing(dir: &Path) -> Vec<(std::path::PathBuf, Option<Vec<u8>>)> {
    let mut v: Vec<_> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            let content = e.file_type().is_file().then(|| fs::read(e.path()).unwrap());
            (e.path().to_path_buf(), content)
        })
        .collect();
    v.sort();
    v
}

/// With `--follow-symlinks`, a link leading out of the root is reported for what it is,
/// whatever is or is not there: its skip reason was found by looking outside (`canonicalize`),
/// so `broken symlink` told that a path outside did not exist and `leading outside the root`
/// that it did, to anyone who may write in the tree and read the failure log (found by a
/// review). Links out and back in through a directory outside, there or not, are alike too;
/// a link back in by the root's own name, and an absolute link spelling the root the way the
/// user named it (through a symlink), are followed.
#[test]
fn a_link_out_of_the_root_is_reported_alike_whatever_lies_outside() {
    let t = TestTree::new().file("a", b"alpha\n");
    let outside = t.side("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"secret\n").unwrap();
    let named = t.side("named");
    std::os::unix::fs::symlink(t.root(), &named).unwrap();
    let link = |to: &Path, at: &str| std::os::unix::fs::symlink(to, t.path(at)).unwrap();
    link(&outside.join("secret"), "out-there");
    link(&outside.join("no-such-file"), "out-not-there");
    link(Path::new("../outside/../in/a"), "back-there");
    link(Path::new("../nowhere/../in/a"), "back-not-there");
    link(Path::new("../in/a"), "back");
    link(&named.join("a"), "spelled");
    let log = t.side("failures.jsonl");
    let out = run(filepipe(&[
        s("batch"),
        p(&named),
        s("--op"),
        s("sha256"),
        s("--follow-symlinks"),
        s("--failure-log"),
        p(&log),
        s("--manifest"),
        p(&t.side("SUMS")),
        s("--json"),
    ]));
    let sum = out.code(0).summary();
    let reasons: std::collections::HashMap<String, String> = failure_log(&log)
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_string(),
                r["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let outs = ["out-there", "out-not-there", "back-there", "back-not-there"];
    for name in outs {
        assert_eq!(
            reasons.get(name).map(String::as_str),
            Some("symlink leading outside the root; not followed"),
            "{name}: {reasons:?}"
        );
    }
    // `a`, and the links that come back to it.
    assert_eq!(sum["done"], 3, "{sum} {reasons:?}");
    let manifest = fs::read_to_string(t.side("SUMS")).unwrap();
    for name in ["a", "back", "spelled"] {
        assert!(
            manifest.contains(&format!("  {name}\n")),
            "{name}: {manifest}"
        );
    }
}

/// A file name with a newline or a terminal escape cannot forge a line of the human log (a
/// separate journal entry under systemd) or drive a terminal: its control characters are
/// shown escaped (found by a review: ` ERROR fake line` came out as a line of its own). The
/// failure log, JSON, keeps the name exact.
/// Nor through a message that quotes the name ("X exists and is not this file's output"): a
/// message holding `=` is quoted whole (found by a review).
#[test]
fn a_name_in_a_message_cannot_forge_fields_ahead_of_the_real_ones() {
    let name = r#"z status="done" path=forged.log"#;
    let t = TestTree::new().file(name, b"x\n");
    let out = t.side("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join(format!("{name}.gz")), b"someone else's\n").unwrap();
    let r = run(filepipe(&[
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("gzip"),
        s("--out"),
        p(&out),
    ]));
    let stderr = r.code(1).stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("is not this file's output"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.starts_with(" WARN \""), "{line}");
    assert!(line.contains(r#"status="failed""#), "{line}");
}

#[test]
fn a_name_with_a_newline_cannot_forge_a_log_line() {
    let t = TestTree::new();
    let name = "evil\n ERROR fake line \x1b[31mred";
    mkfifo(&t.path(name));
    // Nor fields on its line: a value with spaces or quotes is quoted, as string fields are.
    let fields = r#"a status="done" error="none""#;
    mkfifo(&t.path(fields));
    let log = t.side("failures.jsonl");
    let out = run(filepipe(&[
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("sha256"),
        s("-v"),
        s("--failure-log"),
        p(&log),
    ]));
    let stderr = out.success().stderr();
    assert!(
        !stderr.lines().any(|l| l.starts_with(" ERROR fake")),
        "{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    assert!(
        stderr.contains(r#"path="evil\n ERROR fake line \u{1b}[31mred" op="#),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"path="a status=\"done\" error=\"none\"" op="#),
        "{stderr}"
    );
    let records = failure_log(&log);
    let paths: Vec<_> = records.iter().map(|r| r["path"].clone()).collect();
    assert!(paths.contains(&name.into()), "{records:?}");
    assert!(paths.contains(&fields.into()), "{records:?}");
}

/// The failure log is often kept where others may write. Root's run must not append to a
/// file another user chose (a symlink or a hard link at its name), to a file of theirs (they
/// would read every record), or block on a FIFO; a log it makes is `0600`. Its own user's
/// symlink is followed. Before, the log was opened by its path, following anything.
#[test]
fn a_failure_log_where_others_may_write_is_never_theirs_to_redirect() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to act as another user in the log's directory");
        return;
    }
    let t = TestTree::new().file("a", b"data\n");
    let dropdir = t.side("dropdir");
    fs::create_dir(&dropdir).unwrap();
    rustix::fs::chown(
        &dropdir,
        Some(rustix::fs::Uid::from_raw(65534)),
        Some(rustix::fs::Gid::from_raw(65534)),
    )
    .unwrap();
    let victim = t.side("victim");
    fs::write(&victim, b"root's\n").unwrap();
    let log = dropdir.join("fail.log");
    let with_log = || batch(&t, &[s("--op"), s("sha256"), s("--failure-log"), p(&log)]);
    // The other user's symlink, their own file, a hard link to root's file, a FIFO.
    let plants = ["uid 65534", "uid 65534", "hard links", "not a regular file"];
    for (i, said) in plants.into_iter().enumerate() {
        let _ = fs::remove_file(&log);
        match i {
            0 => drop(as_user(
                65534,
                65534,
                &[s("ln"), s("-s"), p(&victim), p(&log)],
            )),
            1 => drop(as_user(65534, 65534, &[s("touch"), p(&log)])),
            2 => fs::hard_link(&victim, &log).unwrap(),
            _ => mkfifo(&log),
        }
        assert!(
            fs::symlink_metadata(&log).is_ok(),
            "{said}: nothing planted"
        );
        let started = std::time::Instant::now();
        let out = with_log();
        out.code(2);
        assert!(out.stderr().contains(said), "{said}: {}", out.stderr());
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{said}: blocked"
        );
        assert_eq!(fs::read(&victim).unwrap(), b"root's\n", "{said}");
    }
    // Root's own log, made 0600; root's symlink to it followed.
    let _ = fs::remove_file(&log);
    with_log().success();
    assert_eq!(owner_and_mode(&log), (0, 0, 0o600));
    let link = t.side("root-link.log");
    std::os::unix::fs::symlink(&log, &link).unwrap();
    let before = failure_log_all(&log).len();
    batch(&t, &[s("--op"), s("sha256"), s("--failure-log"), p(&link)]).success();
    assert!(failure_log_all(&log).len() > before);
}

/// A mirror directory (under `--out`, or a move directory) another user kept after their own
/// input directory of that name went is not written into: the next owner's `reports/` was
/// mirrored into it, where the squatter read and deleted the output and, with
/// `--remove-source`, the only copy (found by a review). The file fails (or, with
/// `--move-source`, is kept) with `unsafe-output-path`; its input stays.
#[test]
fn a_mirror_directory_another_user_kept_is_never_written_into() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to act as two users in a drop directory");
        return;
    }
    for how in ["--out", "--move-source"] {
        let t = TestTree::new();
        fs::set_permissions(t.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(t.root(), fs::Permissions::from_mode(0o1777)).unwrap();
        let (dest, log) = (t.side("dest"), t.side("fail.log"));
        let run_as_root = || {
            let mut args = vec![s("--op"), s("gzip"), s(how), p(&dest)];
            if how == "--out" {
                args.push(s("--remove-source"));
            }
            args.extend([s("--failure-log"), p(&log)]);
            batch(&t, &args)
        };
        let (reports, mirror) = (t.path("reports"), dest.join("reports"));
        let sh = |uid: u32, script: String| {
            let out = as_user(uid, uid, &[s("sh"), s("-c"), s(&script)]);
            assert!(out.status.success(), "{script}: {out:?}");
        };
        sh(
            65534,
            format!("mkdir {0} && echo x > {0}/dummy", reports.display()),
        );
        run_as_root().success();
        assert_eq!(owner_and_mode(&mirror).0, 65534, "{how}: mirrored as cp -a");
        let script = format!(
            "rm -rf {r}; chmod 777 {m}; rm -f {m}/*",
            r = reports.display(),
            m = mirror.display()
        );
        sh(65534, script);
        let q3 = reports.join("q3.txt");
        sh(
            1500,
            format!(
                "mkdir -m 700 {} && echo private > {}",
                reports.display(),
                q3.display()
            ),
        );
        let out = run_as_root();
        if how == "--out" {
            out.code(1);
        } else {
            out.success();
        }
        assert_eq!(fs::read(&q3).unwrap(), b"private\n", "{how}: input gone");
        let left: Vec<_> = fs::read_dir(&mirror).unwrap().collect();
        assert!(left.is_empty(), "{how}: written into it: {left:?}");
        let records = failure_log(&log);
        let refused = records_of(&records, "unsafe-output-path");
        assert_eq!(refused.len(), 1, "{how}: {records:?}");
        assert_eq!(refused[0]["path"], "reports/q3.txt", "{how}");
        assert!(
            refused[0]["message"]
                .as_str()
                .unwrap()
                .contains("uid 65534"),
            "{how}: {refused:?}"
        );
    }
}

/// A mirror directory already there that is more open than the input directory it mirrors is
/// not written into: a private `0700` directory's files went into a `0755` one, readable by
/// every user (found by a review). The file fails (or, with `--move-source`, is kept) with
/// `unsafe-output-path`; its input stays, and no output or moved input is left readable. One
/// no more open (the same mode, or narrower) is used as before.
#[test]
fn a_mirror_directory_more_open_than_its_input_directory_is_not_written_into() {
    for how in ["--out", "--move-source"] {
        let t = TestTree::new().file("priv/secret.txt", b"private\n");
        fs::set_permissions(t.path("priv"), fs::Permissions::from_mode(0o700)).unwrap();
        let (dest, log) = (t.side("dest"), t.side("fail.log"));
        let mirror = dest.join("priv");
        fs::create_dir_all(&mirror).unwrap();
        fs::set_permissions(&mirror, fs::Permissions::from_mode(0o755)).unwrap();
        let args = [
            s("--op"),
            s("gzip"),
            s(how),
            p(&dest),
            s("--failure-log"),
            p(&log),
        ];
        let out = batch(&t, &args);
        assert_mirror_refused(&out, how, &mirror, &log, "more open (mode 0755");
        assert_eq!(fs::read(t.path("priv/secret.txt")).unwrap(), b"private\n");
        // Narrowed as the input's: used.
        fs::set_permissions(&mirror, fs::Permissions::from_mode(0o700)).unwrap();
        batch(&t, &args).success();
        assert_eq!(fs::read_dir(&mirror).unwrap().count(), 1, "{how}");
    }
}

/// A path given to a root run (the tree, `--out`, the manifest's directory) is resolved
/// following only root's symlinks: another user's link on it chooses where root reads and
/// writes (a user who swapped their `sums/` for a link had the manifest written in a
/// root-only directory; found by a review). Refused at start, naming the link; root's own
/// links are followed as before.
#[test]
fn another_users_symlink_on_a_given_path_is_not_followed() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to make another user's symlink");
        return;
    }
    let t = TestTree::new().file("a", b"data\n");
    let (theirs, secret) = (t.side("theirs"), t.side("rootonly"));
    fs::create_dir(&theirs).unwrap();
    fs::create_dir(&secret).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(t.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    rustix::fs::chown(&theirs, Some(rustix::fs::Uid::from_raw(65534)), None).unwrap();
    let link = |name: &str, to: &Path| {
        let at = theirs.join(name);
        let out = as_user(65534, 65534, &[s("ln"), s("-s"), p(to), p(&at)]);
        assert!(out.status.success(), "{out:?}");
        at
    };
    let (tree, sums, out, state) = (
        link("tree", &t.root()),
        link("sums", &secret),
        link("out", &secret),
        link("state", &secret),
    );
    let manifest = sums.join("SUMS");
    let root = t.root();
    let cases: [Vec<&OsStr>; 4] = [
        vec![s("batch"), p(&tree), s("--op"), s("sha256")],
        vec![
            s("batch"),
            p(&root),
            s("--op"),
            s("sha256"),
            s("--manifest"),
            p(&manifest),
        ],
        vec![
            s("batch"),
            p(&root),
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&out),
        ],
        // The state directory too: the database would be written where they chose.
        vec![
            s("batch"),
            p(&root),
            s("--op"),
            s("sha256"),
            s("--state"),
            p(&state),
        ],
    ];
    for args in cases {
        let r = run(filepipe(&args));
        r.code(2);
        assert!(
            r.stderr().contains("is a symlink of uid 65534"),
            "{}",
            r.stderr()
        );
        assert_eq!(fs::read_dir(&secret).unwrap().count(), 0, "{args:?}");
    }
    // Watch mode's state directory alike; under `timeout`, so that a watch that took it
    // fails the test (exit 124) instead of running on.
    let mut watch = Command::new("timeout");
    watch.arg("20").arg(bin()).args([
        s("watch"),
        p(&root),
        s("--op"),
        s("sha256"),
        s("--state"),
        p(&state),
    ]);
    let r = run(watch);
    r.code(2);
    assert!(
        r.stderr().contains("is a symlink of uid 65534"),
        "{}",
        r.stderr()
    );
    assert_eq!(fs::read_dir(&secret).unwrap().count(), 0);
    // Root's own link is followed, as before.
    let roots = t.side("roots-link");
    std::os::unix::fs::symlink(&secret, &roots).unwrap();
    let out = roots.join("out");
    batch(&t, &[s("--op"), s("gzip"), s("--out"), p(&out)]).success();
    assert!(secret.join("out/a.gz").is_file());
}

/// A manifest names every file and its digest: made `0600`, not `0644` (a review read a
/// private file's short content back from its digest); one its owner opened with `chmod`
/// keeps that mode when the next run replaces it.
#[test]
fn a_manifest_is_private_until_its_owner_shares_it() {
    let t = TestTree::new().file("pin.txt", b"4711\n");
    let sums = t.side("SHA256SUMS");
    let hash = || batch(&t, &[s("--op"), s("sha256"), s("--manifest"), p(&sums)]);
    hash().success();
    let mode = || owner_and_mode(&sums).2;
    assert_eq!(mode(), 0o600 & !umask());
    fs::set_permissions(&sums, fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(t.path("more.txt"), b"more\n").unwrap();
    hash().success();
    assert_eq!(mode(), 0o640);
    assert_eq!(manifest_names(&sums), ["more.txt", "pin.txt"]);
}

/// A file another process holds a write lease on (`fcntl(F_SETLEASE)`) is in use, not broken:
/// its open is refused (never waited for), and it fails `in-use` saying why, where it failed
/// `io` "Resource temporarily unavailable" (found by a review).
#[test]
fn a_leased_file_is_in_use_not_an_io_error() {
    if Command::new("perl").arg("-e1").status().is_err() {
        eprintln!("SKIPPED: needs perl to hold a lease");
        return;
    }
    let t = TestTree::new().file("leased", b"x\n").file("other", b"y\n");
    let ready = t.side("ready");
    let script = r#"use Fcntl; my ($p, $ready) = @ARGV; $SIG{IO} = 'IGNORE';
sysopen(my $fh, $p, O_RDONLY) or die "open: $!"; fcntl($fh, 1024, F_WRLCK) or die "lease: $!";
open(my $r, '>', $ready) or die; close $r; sleep 30;"#;
    let mut holder = Command::new("perl")
        .args(["-e", script])
        .arg(t.path("leased"))
        .arg(&ready)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the lease", || {
        if let Ok(Some(_)) = holder.try_wait() {
            panic!("perl could not take the lease");
        }
        ready.exists()
    });
    let log = t.side("failures.jsonl");
    let out = batch(&t, &[s("--op"), s("sha256"), s("--failure-log"), p(&log)]);
    let _ = holder.kill();
    let _ = holder.wait();
    out.code(1);
    let records = failure_log(&log);
    let in_use = records_of(&records, "in-use");
    assert_eq!(in_use.len(), 1, "{records:?}");
    assert_eq!(in_use[0]["path"], "leased");
    assert!(
        in_use[0]["message"].as_str().unwrap().contains("lease"),
        "{in_use:?}"
    );
}

/// `--max-size`: a larger file is skipped unread, with its reason; a sparse file of a
/// terabyte (no disk, hours to read) among them. The watch takes the same limit.
#[test]
fn files_over_max_size_are_skipped_unread() {
    let t = TestTree::new()
        .file("small", &[7u8; 100])
        .file("big", &[7u8; 2048]);
    let huge = fs::File::create(t.path("sparse")).unwrap();
    huge.set_len(1 << 40).unwrap();
    let log = t.side("failures.jsonl");
    let started = std::time::Instant::now();
    let r = batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--max-size"),
            s("1K"),
            s("--failure-log"),
            p(&log),
            s("--json"),
        ],
    );
    let summary = r.success().summary();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the sparse file was read"
    );
    assert_eq!(
        summary["skipped_by_reason"]["over-max-size"], 2,
        "{summary}"
    );
    assert!(t.path("small.gz").is_file());
    assert!(!t.path("big.gz").exists() && !t.path("sparse.gz").exists());
    let records = failure_log(&log);
    let skipped = records_of(&records, "over-max-size");
    assert!(
        skipped.iter().any(|r| r["message"]
            .as_str()
            .unwrap()
            .starts_with("1099511627776 bytes, over --max-size (1024 bytes)")),
        "{skipped:?}"
    );
    // A size that does not parse is a usage error.
    for bad in ["1X", "-1", "K", "99999999T"] {
        batch(&t, &[s("--op"), s("gzip"), s("--max-size"), s(bad)]).code(2);
    }
}

/// A directory a batch listed and then could not open for ENOENT (gone since, or a network or
/// FUSE file system that says so of one that is there: here strace makes its open fail) is
/// reported, its files uncounted but not silently (a watch passes over a directory gone, where
/// it went being heard: found by a review, which found the batch saying nothing).
#[test]
fn a_batch_reports_a_listed_directory_that_would_not_open() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace");
        return;
    }
    let t = TestTree::new()
        .file("d1/f", b"1\n")
        .file("d2/f", b"2\n")
        .file("d3/f", b"3\n");
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "trace=openat,openat2",
        "-P",
    ])
    .arg(t.path("d2"))
    .args(["-P", "d2", "-e", "inject=openat,openat2:error=ENOENT"])
    .arg(bin())
    .arg("batch")
    .arg(t.root())
    .args(["--op", "sha256", "--json", "--manifest"])
    .arg(t.side("SUMS"))
    .env_remove("RUST_LOG");
    let out = run(cmd);
    let sum = out.code(1).summary();
    assert_eq!(sum["done"], 2, "{sum}");
    assert_eq!(sum["failed_by_reason"]["vanished"], 1, "{sum}");
    assert!(out.stderr().contains("path=d2"), "{}", out.stderr());
}

/// The name of the file in `dir` a thread of process `pid` is reading (in `read` on it):
/// where strace holds it.
fn reading_in(pid: u32, dir: &Path) -> Option<String> {
    let file = common::strace::call_on(pid, common::strace::nr::READ)?;
    (file.parent() == Some(dir)).then_some(())?;
    Some(file.file_name()?.to_string_lossy().into_owned())
}

/// `batch -j1 --op gzip --quiet` over a tree of 20 files `d/f00`..`d/f19` (holding
/// `"{prefix} {i}\n"`), with its worker held by strace in its first read (2 s): returned once
/// it is in that read, with the file's name.
fn gzip_held_in_d(prefix: &str) -> (TestTree, Started, String) {
    gzip_held_in_d_with(prefix, |_| Vec::new())
}

/// `strace` running the binary (its arguments to follow) with the first read of any of
/// `d/f00`..`d/f19` held 2 s.
fn strace_holding_first_read(d: &Path) -> Command {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o", "/dev/null"]);
    for i in 0..20 {
        cmd.arg("-P").arg(d.join(format!("f{i:02}")));
    }
    cmd.args(["-e", "trace=read"])
        .args(["-e", "inject=read:delay_enter=2000000:when=1"])
        .arg(bin());
    cmd
}

/// `gzip_held_in_d`, with more arguments for the run (given the tree).
fn gzip_held_in_d_with(
    prefix: &str,
    more: impl Fn(&TestTree) -> Vec<std::ffi::OsString>,
) -> (TestTree, Started, String) {
    let mut t = TestTree::new();
    for i in 0..20 {
        t = t.file(
            format!("d/f{i:02}"),
            format!("{prefix} {i}\n").trim_start().as_bytes(),
        );
    }
    let d = t.path("d");
    let mut cmd = strace_holding_first_read(&d);
    cmd.args(["batch", "-j1", "--op", "gzip", "--quiet"])
        .arg(t.root())
        .args(more(&t))
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = Started::new(cmd);
    let strace = child.id();
    let mut held = None;
    // In the read itself: an input opened is checked (and its output directory looked at)
    // before it is read.
    wait_until(Duration::from_secs(30), "the held read", || {
        held = common::strace::children(strace)
            .into_iter()
            .find_map(|pid| reading_in(pid, &d));
        held.is_some()
    });
    (t, child, held.expect("waited for"))
}

/// Swaps a new `d` in for `gzip_held_in_d`'s: made aside, whole (`make(i, old file, new
/// file)` for each of its 20 names), then `mv d d.old; mv d.new d`.
fn swap_d(t: &TestTree, make: impl Fn(usize, &Path, &Path) -> std::io::Result<()>) {
    let (d, new) = (t.path("d"), t.path("d.new"));
    fs::create_dir(&new).unwrap();
    for i in 0..20 {
        let name = format!("f{i:02}");
        make(i, &d.join(&name), &new.join(&name)).unwrap();
    }
    fs::rename(&d, t.path("d.old")).unwrap();
    fs::rename(&new, &d).unwrap();
}

/// `mv d d.old; mkdir d` with new files under the same names, while a run beside the inputs is
/// in `d`: each later file is read from the new `d` (by its path), and its output must be made
/// there, beside it. The output directory remembered from the file before was the old one,
/// now `d.old`: the new `d/f07`'s output went to `d.old/f07.gz`, beside the old `d.old/f07`
/// it does not hold, which a rerun then takes for up to date (and with `--remove-source` the
/// new `d/f07` was removed, its only copy in `d.old`). Found by review r54. The worker is held
/// in its first read (strace delays it) while the directory is swapped.
#[test]
fn a_directory_swapped_during_a_run_beside_the_inputs_gets_no_output_of_another_file() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the worker in a read");
        return;
    }
    let (t, child, held) = gzip_held_in_d("old");
    swap_d(&t, |i, _, at| fs::write(at, format!("new {i}\n")));
    let out = child.finish(Duration::from_secs(60));
    out.success();
    // Every output holds exactly the file beside it under its name.
    let mut outputs = 0;
    for dir in [t.path("d"), t.path("d.old")] {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let name = e.file_name().into_string().unwrap();
            let Some(input) = name.strip_suffix(".gz") else {
                continue;
            };
            outputs += 1;
            let back = tool("gzip", &[s("-dc"), e.path().as_os_str()], &dir);
            assert!(back.status.success(), "{}", e.path().display());
            assert_eq!(
                String::from_utf8_lossy(&back.stdout),
                fs::read_to_string(dir.join(input)).unwrap(),
                "{} does not hold the file beside it",
                e.path().display()
            );
        }
    }
    assert_eq!(outputs, 20, "one output for each file listed");
    // The file held in its read is read and published in the directory it was opened in.
    assert!(
        t.path("d.old").join(format!("{held}.gz")).exists(),
        "{held}"
    );
}

/// An rsnapshot-style rotation while a run beside the inputs is in `d`: `mv d d.old` and a new
/// `d` of hard links to the same files (`cp -al`). The files opened after it are opened
/// through the new `d`, and their outputs belong there: the old directory "holds" each of them
/// too under its name (the same inode), which is no proof (found by review r54b: all the
/// outputs went to `d.old`, which the rotation then removes).
#[test]
fn a_hard_link_rotation_during_a_run_gets_the_new_directory_its_outputs() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the worker in a read");
        return;
    }
    let (t, child, _) = gzip_held_in_d("");
    swap_d(&t, |_, old, at| fs::hard_link(old, at));
    let d = t.path("d");
    child.finish(Duration::from_secs(60)).success();
    let outputs = |dir: &Path| {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".gz"))
            .count()
    };
    // The file read at the rotation may have its output in either; every other one is new.
    let (new_d, old_d) = (outputs(&d), outputs(&t.path("d.old")));
    assert!(
        new_d >= 19 && old_d <= 1 && new_d + old_d == 20,
        "{new_d} outputs in d, {old_d} in d.old"
    );
}

/// The directory of a file being published moved away (`mv d d.old`) and the file removed
/// from it before its output is given a name (strace holds the publish in the temp's flush): the
/// output is not published where no input is beside it, nor was its directory at its path,
/// and the file fails, saying why. Before, `d.old/f.gz` appeared beside nothing.
#[test]
fn an_output_is_not_published_in_a_directory_moved_away_from_its_input() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the publish in its flush");
        return;
    }
    let t = TestTree::new().file("d/f", b"data\n");
    let child = gzip_held_in_first_flush(&t, &[]);
    fs::rename(t.path("d"), t.path("d.old")).unwrap();
    fs::remove_file(t.path("d.old/f")).unwrap();
    let out = child.finish(Duration::from_secs(60));
    let err = out.code(1).stderr();
    assert!(
        err.contains("its directory was moved or replaced while it was read"),
        "{err}"
    );
    let left: Vec<_> = fs::read_dir(t.path("d.old"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "published beside nothing: {left:?}");
}

/// A directory moved out of the tree by its owner while one of its files is worked on (strace
/// holds the publish in the temp's flush): the output is not published there, outside the
/// root, and the file fails saying why. Beside the inputs the input's own ancestor is moved
/// (the file is still beside its output, in a tree no longer filepipe's); with `--out`, the
/// output tree's directory. Before, `outside/d/f.gz` (or `away/d/f.gz`) appeared there. One
/// moved within the tree to another depth (a reorganisation) is no such thing: its output is
/// published beside it (found by review r55: it failed, "moved out of the tree").
#[test]
fn an_output_is_not_published_in_a_directory_moved_out_of_the_tree() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the publish in its flush");
        return;
    }
    for (mirrored, within) in [(false, false), (true, false), (false, true)] {
        let case = format!("mirrored {mirrored}, within {within}");
        let t = TestTree::new().file("a/d/f", b"data\n");
        fs::create_dir_all(t.path("z/y")).unwrap();
        let out_root = t.side("out");
        let out: &[&OsStr] = if mirrored {
            &[OsStr::new("--out"), out_root.as_os_str()]
        } else {
            &[]
        };
        let child = gzip_held_in_first_flush(&t, out);
        let (moved, to) = match (mirrored, within) {
            (true, _) => (t.side("out/a"), t.side("away")),
            (false, false) => (t.path("a"), t.side("outside")),
            (false, true) => (t.path("a"), t.path("z/y/a")),
        };
        fs::rename(&moved, &to).unwrap();
        let out = child.finish(Duration::from_secs(60));
        let mut left: Vec<_> = fs::read_dir(to.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        if within {
            out.success();
            assert_eq!(left, ["f", "f.gz"], "{case}: published beside its input");
            continue;
        }
        let err = out.code(1).stderr();
        assert!(
            err.contains("moved out of the tree while the file was worked on"),
            "{case}: {err}"
        );
        let expected: Vec<std::ffi::OsString> = if mirrored { vec![] } else { vec!["f".into()] };
        assert_eq!(left, expected, "{case}: published outside the tree");
    }
}

/// Under `--out`, the output directory `out/d` moved out of the output tree by its owner
/// (`mv out/d away`) while the run is in it (its worker held in a read): no output is ever
/// published in `away` after the move, the file then in hand fails saying why, and every
/// later file's output is made in a new `out/d`. Before, each later output went to `away/d`,
/// outside the tree, however long the run went on. Renamed within the tree (`mv out/d
/// out/d.old`), the file in hand is published there, inside, and the later ones in a new
/// `out/d` too (found by review r55b: they all went to `out/d.old`, and a rerun made them
/// again).
#[test]
fn an_output_directory_moved_out_of_the_output_tree_is_made_again_and_not_written_to() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the worker in a read");
        return;
    }
    for within in [false, true] {
        let (t, child, held) =
            gzip_held_in_d_with("", |t| vec!["--out".into(), t.side("out").into()]);
        let mut before: Vec<_> = fs::read_dir(t.side("out/d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let to = if within {
            t.side("out/d.old")
        } else {
            t.side("away")
        };
        fs::rename(t.side("out/d"), &to).unwrap();
        let out = child.finish(Duration::from_secs(60));
        if within {
            out.success();
            before.push(format!("{held}.gz").into());
        } else {
            let err = out.code(1).stderr();
            assert!(
                err.contains(&format!("path=d/{held} ")) && err.contains("moved out of the tree"),
                "{err}"
            );
            assert_eq!(err.matches("moved out of the tree").count(), 1, "{err}");
        }
        before.sort();
        let mut moved: Vec<_> = fs::read_dir(&to)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        moved.sort();
        assert_eq!(
            moved, before,
            "within {within}: published there after the move"
        );
        for i in 0..20 {
            let name = format!("f{i:02}");
            if name == held || before.contains(&format!("{name}.gz").into()) {
                continue;
            }
            let gz = t.side("out/d").join(format!("{name}.gz"));
            assert!(gz.is_file(), "{} not made in the new out/d", gz.display());
        }
    }
}

/// `batch -j1 --op gzip` over `t` (and `more` arguments), its first flush held 2 s by strace
/// (`fsync` or `syncfs`, the temp's before its name: which one depends on the file system and
/// the group's size): returned once a thread of filepipe's is in it.
fn gzip_held_in_first_flush(t: &TestTree, more: &[&OsStr]) -> Started {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o", "/dev/null"])
        .args(["-e", "trace=fsync,syncfs"])
        .args(["-e", "inject=fsync,syncfs:delay_enter=2000000:when=1"])
        .arg(bin())
        .args(["batch", "-j1", "--op", "gzip"])
        .arg(t.root())
        .args(more)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = Started::new(cmd);
    let strace = child.id();
    wait_until(Duration::from_secs(30), "the publish's flush", || {
        common::strace::children(strace)
            .into_iter()
            .any(|pid| common::strace::in_call(pid, &FLUSHES))
    });
    child
}

/// `fsync`'s and `syncfs`'s numbers.
const FLUSHES: [&str; 2] = [common::strace::nr::FSYNC, common::strace::nr::SYNCFS];

/// A file whose size says nothing of its content is not hashed or compressed as what its
/// size says: it fails `special-file`, at once (read again, it would say the same), and the
/// run goes on. `/proc/version`, bind-mounted into the tree, says 0 bytes and holds more:
/// found by review r55b, the empty file's digest was listed for it, and an empty `.gz` made. A
/// `/sys` file says 4096 and holds less: found by review r55c, it was read three times and
/// failed `changed-while-read`, as if a writer were at it.
#[test]
fn a_file_whose_size_says_nothing_of_its_content_fails_as_such() {
    if !common::is_root() {
        eprintln!("SKIPPED: not root: cannot bind mount");
        return;
    }
    // A /sys file that holds a few bytes on any Linux machine.
    let sys = [
        "/sys/kernel/uevent_seqnum",
        "/sys/devices/system/cpu/online",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("no /sys/kernel/uevent_seqnum nor /sys/devices/system/cpu/online");
    let t = TestTree::new()
        .file("plain.txt", b"plain\n")
        .file("version", b"")
        .file("seqnum", b"");
    let mut bound = Vec::new();
    for (from, to) in [("/proc/version", "version"), (sys, "seqnum")] {
        let at = t.path(to);
        let st = Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(&at)
            .output()
            .unwrap();
        if !st.status.success() {
            eprintln!(
                "SKIPPED: mount --bind not permitted: {}",
                String::from_utf8_lossy(&st.stderr).trim()
            );
            return;
        }
        bound.push(common::BindMount::existing(&at));
    }
    assert_eq!(fs::metadata(t.path("seqnum")).unwrap().len(), 4096);
    for op in ["sha256", "blake3", "gzip", "sha256,zstd"] {
        let mut cmd = filepipe(&[
            s("batch"),
            t.root().as_os_str(),
            s("--op"),
            s(op),
            s("--json"),
        ]);
        if op.contains("sha") || op.contains("blake") {
            cmd.arg("--manifest").arg(t.side("SUMS"));
        }
        let out = run(cmd);
        let sum = out.code(1).summary();
        // Failed as such (a retried read would end `changed-while-read`).
        assert_eq!(sum["failed_by_reason"]["special-file"], 2, "{op}: {sum}");
        assert_eq!(sum["failed"], 2, "{op}: {sum}");
        assert_eq!(sum["done"], 1, "{op}: {sum}");
        let err = out.stderr();
        assert!(err.contains("holds more than its size says"), "{op}: {err}");
        assert!(err.contains("holds less than its size says"), "{op}: {err}");
        assert!(!err.contains("changed while being read"), "{op}: {err}");
        for name in ["version", "seqnum"] {
            for ext in ["gz", "zst"] {
                assert!(
                    !t.path(format!("{name}.{ext}")).exists(),
                    "{op}: {name}.{ext}"
                );
            }
        }
        if op.contains("sha") || op.contains("blake") {
            let listed = fs::read_to_string(t.side("SUMS")).unwrap();
            assert!(
                !listed.contains("version") && !listed.contains("seqnum"),
                "{op}: {listed}"
            );
        }
        // The next op finds the tree as it was.
        for ext in ["gz", "zst"] {
            let _ = fs::remove_file(t.path(format!("plain.txt.{ext}")));
        }
    }
}

/// `--out` with `--remove-source`, outputs up to date from an earlier run: while the run is in
/// `u/d` (its worker held in a read), the owner of `out/u` moves it out of the output tree and
/// puts a symlink to it in its place. No output out there stands for its input: the file in
/// hand and every later one fail `unsafe-output-path`, and every input is kept. Found by
/// review r55c: the outputs, reached through the link, were adopted and another user's
/// inputs removed.
#[test]
fn outputs_found_through_a_link_out_of_the_tree_never_stand_for_their_inputs() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the worker in a read");
        return;
    }
    let mut t = TestTree::new();
    for i in 0..20 {
        t = t.file(format!("u/d/f{i:02}"), format!("{i}\n").as_bytes());
    }
    let out = t.side("out");
    let gzip = |cmd: &mut Command| {
        cmd.args(["batch", "-j1", "--op", "gzip", "--quiet"])
            .arg(t.root())
            .arg("--out")
            .arg(&out)
            .env_remove("RUST_LOG");
    };
    let mut first = Command::new(bin());
    gzip(&mut first);
    run(first).success();
    let d = t.path("u/d");
    let mut cmd = strace_holding_first_read(&d);
    gzip(&mut cmd);
    cmd.arg("--remove-source")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = Started::new(cmd);
    let strace = child.id();
    wait_until(Duration::from_secs(30), "the held read", || {
        common::strace::children(strace)
            .into_iter()
            .any(|pid| reading_in(pid, &d).is_some())
    });
    let away = t.side("away");
    fs::rename(out.join("u"), &away).unwrap();
    std::os::unix::fs::symlink(&away, out.join("u")).unwrap();
    let err = child.finish(Duration::from_secs(60)).code(1).stderr();
    assert_eq!(err.matches("unsafe-output-path").count(), 20, "{err}");
    for i in 0..20 {
        assert!(
            d.join(format!("f{i:02}")).is_file(),
            "f{i:02} removed: {err}"
        );
    }
}
