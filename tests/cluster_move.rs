//! `--move-source` and `--move-failed` through the queue, against a real `nats-server`: the
//! coordinator names each move directory by its own name, workers map it with
//! `--move-root NAME=PATH` and move inputs only with `--allow-remove-source`. Issue 17.
#![cfg(feature = "cluster")]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cluster::*;
use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

/// Every file under `dir` (not directories), relative to it, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().strip_prefix(dir).unwrap().to_path_buf())
        .collect();
    v.sort();
    v
}

/// Asserts that a coordinator's run ended with every one of its `n` files done.
fn assert_all_done(run: &Run, n: u64) {
    let sum = run.code(0).summary();
    assert_eq!(
        (sum["done"].as_u64(), sum["failed"].as_u64()),
        (Some(n), Some(0)),
        "{sum}\n{}",
        run.stderr()
    );
}

/// A worker of `t`'s tree (as root `tree`) with `--jobs JOBS`, allowed to move inputs, with the
/// move root `NAME=DIR` (`moves`).
fn mover(nats: &Nats, t: &TestTree, moves: (&str, &Path), jobs: &str) -> Worker {
    let roots = [format!("tree={}", t.root().display())];
    let move_root = format!("{}={}", moves.0, moves.1.display());
    Worker::start_with(
        nats,
        t.dir.path(),
        &roots,
        jobs,
        &["--move-root", &move_root, "--allow-remove-source"],
    )
}

/// A copy of `t`'s tree beside it, to compare moved inputs and outputs with.
fn copy_of(t: &TestTree) -> PathBuf {
    let copy = t.side("copy");
    cp("-a", &t.root(), &copy);
    copy
}

#[test]
fn two_workers_move_each_input_to_its_relative_path_once_its_output_is_whole() {
    let Some(nats) = Nats::start() else { return };
    let t = tree(80, 0);
    let copy = copy_of(&t);
    let done = t.side("done");
    fs::create_dir(&done).unwrap();
    // The workers mount the move directory elsewhere: the job carries its name, not its path.
    let mount = t.side("mnt-done");
    std::os::unix::fs::symlink(&done, &mount).unwrap();
    let roots = [format!("tree={}", t.root().display())];
    let move_root = format!("done={}", mount.display());
    let extra = ["--move-root", &move_root, "--allow-remove-source"];
    let _w1 = Worker::start_with(&nats, t.dir.path(), &roots, "2", &extra);
    // The second takes its roots from its config file's [worker] table.
    let toml = t.side("worker.toml");
    fs::write(
        &toml,
        format!(
            "[worker]\nallow_remove_source = true\n[worker.roots]\ntree = {:?}\n\
             [worker.move_roots]\ndone = {:?}\n",
            t.root().display().to_string(),
            mount.display().to_string()
        ),
    )
    .unwrap();
    let _w2 = Worker::start_with(
        &nats,
        t.dir.path(),
        &[],
        "2",
        &["--config", toml.to_str().unwrap()],
    );
    let args = [
        "--op",
        "gzip",
        "--root-name",
        "tree",
        "--move-source",
        done.to_str().unwrap(),
    ];
    let run = coordinate(&nats, &t.root(), &args);
    assert_all_done(&run, 80);
    // Every output whole (gzip -t and its input's bytes, from the copy), beside where its
    // input was; every input under the move directory at its relative path, as it was; none
    // left in the tree.
    assert_eq!(assert_outputs_of(&t.root(), &copy), 80);
    let inputs: Vec<PathBuf> = files_under(&copy);
    assert_eq!(files_under(&done), inputs);
    for rel in &inputs {
        assert_eq!(
            fs::read(done.join(rel)).unwrap(),
            fs::read(copy.join(rel)).unwrap()
        );
    }
    let left: Vec<PathBuf> = files_under(&t.root())
        .into_iter()
        .filter(|p| p.extension() != Some(OsStr::new("gz")))
        .collect();
    assert!(left.is_empty(), "inputs left in the tree: {left:?}");
}

#[test]
fn a_worker_not_allowed_to_remove_inputs_fails_move_jobs_and_moves_nothing() {
    let Some(nats) = Nats::start() else { return };
    let t = tree(20, 0);
    let done = t.side("done");
    fs::create_dir(&done).unwrap();
    let roots = [format!("tree={}", t.root().display())];
    let move_root = format!("done={}", done.display());
    let _w = Worker::start_with(
        &nats,
        t.dir.path(),
        &roots,
        "2",
        &["--move-root", &move_root],
    );
    let before = files_under(&t.root());
    let args = [
        "--op",
        "gzip",
        "--root-name",
        "tree",
        "--move-source",
        done.to_str().unwrap(),
    ];
    let run = coordinate(&nats, &t.root(), &args);
    assert_eq!(run.code(1).summary()["failed"], 20, "{}", run.stderr());
    assert!(
        run.stderr().contains("--allow-remove-source"),
        "{}",
        run.stderr()
    );
    assert_eq!(files_under(&t.root()), before, "the tree changed");
    assert!(files_under(&done).is_empty(), "an input was moved");
    // A worker that does not map the move directory fails the jobs too, naming it.
    _w.stop();
    let _w = Worker::start_with(&nats, t.dir.path(), &roots, "1", &["--allow-remove-source"]);
    let run = coordinate(&nats, &t.root(), &args);
    assert_eq!(run.code(1).summary()["failed"], 20, "{}", run.stderr());
    assert!(
        run.stderr().contains("--move-root done="),
        "{}",
        run.stderr()
    );
    assert_eq!(files_under(&t.root()), before, "the tree changed");
    // A move directory whose name is no plain name, or the root's, is refused at start.
    for bad in [t.side("done.d"), t.side("tree")] {
        let run = coordinate(
            &nats,
            &t.root(),
            &[
                "--op",
                "gzip",
                "--root-name",
                "tree",
                "--move-source",
                bad.to_str().unwrap(),
            ],
        );
        assert!(
            run.code(2).stderr().contains("--move-root"),
            "{}",
            run.stderr()
        );
        assert!(!bad.exists() || files_under(&bad).is_empty());
    }
    assert_eq!(files_under(&t.root()), before, "the tree changed");
    // A worker whose move root is inside an input root does not start.
    let inside = format!("done={}", t.root().join("d0").display());
    let mut cmd = filepipe(&[
        OsStr::new("worker"),
        OsStr::new("--queue"),
        OsStr::new(&nats.url),
    ]);
    cmd.args(["--root", &roots[0], "--move-root", &inside]);
    let refused = common::run(cmd);
    refused.code(2);
    assert!(
        refused.stderr().contains("is inside the root"),
        "{}",
        refused.stderr()
    );
}

#[test]
fn a_worker_refuses_move_roots_that_overlap_a_root_or_each_other_by_any_path() {
    // No server needed: a worker checks its roots before it connects.
    let t = tree(2, 0);
    let root = format!("tree={}", t.root().display());
    let worker = |extra: &[String]| {
        let mut cmd = filepipe(&[
            OsStr::new("worker"),
            OsStr::new("--queue"),
            OsStr::new("nats://127.0.0.1:1"),
            OsStr::new("--allow-remove-source"),
        ]);
        cmd.args(["--root", &root]).args(extra);
        common::run(cmd)
    };
    // Two names for one directory: any job may pair them, mixing done and failed inputs.
    let x = t.side("x");
    fs::create_dir(&x).unwrap();
    let both = [
        "--move-root".to_owned(),
        format!("done={}", x.display()),
        "--move-root".to_owned(),
        format!("bad={}", x.join("..").join("x").display()),
    ];
    let refused = worker(&both);
    assert!(
        refused
            .code(2)
            .stderr()
            .contains("move roots must be apart"),
        "{}",
        refused.stderr()
    );
    // A bind mount of a directory of the tree: apart by path, the tree itself by identity
    // (moved inputs would land back among the inputs).
    let mnt = t.side("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "--bind",
            t.root().join("d0").to_str().unwrap(),
            mnt.to_str().unwrap(),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED (the bind mount part): mount --bind needs root");
        return;
    }
    let refused = worker(&["--move-root".to_owned(), format!("done={}", mnt.display())]);
    // The same bind mount as an output root: outputs would be written among the inputs
    // (found by a review: only move roots were checked by identity).
    let out = worker(&["--out-root".to_owned(), format!("o={}", mnt.display())]);
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert!(
        refused
            .code(2)
            .stderr()
            .contains("is inside the input root tree"),
        "{}",
        refused.stderr()
    );
    assert!(
        out.code(2)
            .stderr()
            .contains("is inside the input root tree"),
        "{}",
        out.stderr()
    );
}

/// A name of 253 bytes: its output's (`+ .gz`) is over NAME_MAX, a failure no retry mends
/// (as tests/move_source.rs makes one).
const LONG_NAME: [u8; 253] = [b'n'; 253];

#[test]
fn move_failed_through_the_queue_moves_an_input_failed_for_good_and_says_where() {
    let Some(nats) = Nats::start() else { return };
    let t = TestTree::new()
        .file(LONG_NAME, b"named too long for its .gz\n")
        .file("ok.log", b"fine\n");
    let failed = t.side("failed");
    fs::create_dir(&failed).unwrap();
    let roots = [format!("tree={}", t.root().display())];
    let move_root = format!("failed={}", failed.display());
    let log = t.side("worker-failures.jsonl");
    let _w = Worker::start_with(
        &nats,
        t.dir.path(),
        &roots,
        "1",
        &[
            "--move-root",
            &move_root,
            "--allow-remove-source",
            "--failure-log",
            log.to_str().unwrap(),
        ],
    );
    let args = [
        "--op",
        "gzip",
        "--root-name",
        "tree",
        "--move-failed",
        failed.to_str().unwrap(),
    ];
    let run = coordinate(&nats, &t.root(), &args);
    let sum = run.code(1).summary();
    assert_eq!(
        (sum["done"].as_u64(), sum["failed"].as_u64()),
        (Some(1), Some(1)),
        "{sum}\n{}",
        run.stderr()
    );
    let long = OsStr::from_bytes(&LONG_NAME);
    assert!(!t.root().join(long).exists(), "the failed input stayed");
    assert_eq!(
        fs::read(failed.join(long)).unwrap(),
        b"named too long for its .gz\n"
    );
    assert!(
        t.path("ok.log").exists(),
        "a done input moves only with --move-source"
    );
    let want = format!("input moved to {}", failed.join(long).display());
    assert!(run.stderr().contains(&want), "{}", run.stderr());
}

/// A job message alone cannot name a path for a move root: `..`, an absolute path or one
/// with a slash is refused, and no input moves.
#[test]
fn a_hostile_job_message_naming_a_path_as_its_move_root_is_refused() {
    let Some(nats) = Nats::start() else { return };
    let t = tree(3, 0);
    let done = t.side("done");
    fs::create_dir(&done).unwrap();
    let worker = mover(&nats, &t, ("done", &done), "1");
    let before = files_under(&t.root());
    for (i, name) in ["..", "/tmp", "done/..", "../done"].iter().enumerate() {
        let msg = format!(
            r#"{{"v":5,"run":"evil{i}","root":"tree","op":"gzip","level":6,"force":false,"move_source":{name:?},"files":[{{"rel":"d0/e0/f0.log","size":0}}]}}"#
        );
        nats.publish_raw(&format!("filepipe.jobs.tree.evil{i}"), msg.as_bytes());
    }
    wait_until(Duration::from_secs(60), "four refusals", || {
        worker.log().matches("refused a job message").count() >= 4
    });
    assert_eq!(files_under(&t.root()), before, "the tree changed");
    assert!(files_under(&done).is_empty(), "an input was moved");
    assert!(
        !t.dir.path().join("d0").exists() && !Path::new("/tmp/d0/e0/f0.log").exists(),
        "an input moved outside its move root"
    );
}

/// A move directory whose own name is no plain name (`archive.2026`), or one the workers
/// mount under another name, is named for them with `--move-source-name` and
/// `--move-failed-name`: refused at start without (exit 2, saying which flag to give), and
/// with a name another root of the run has; with them, the jobs carry the names given and
/// the workers map those.
#[test]
fn move_directories_are_named_for_the_workers_with_move_source_name_and_move_failed_name() {
    let Some(nats) = Nats::start() else { return };
    let t = tree(30, 0);
    let copy = copy_of(&t);
    let done = t.side("archive.2026");
    let bad = t.side("failed.d");
    fs::create_dir(&done).unwrap();
    fs::create_dir(&bad).unwrap();
    let roots = [format!("tree={}", t.root().display())];
    let (move_done, move_bad) = (
        format!("done={}", done.display()),
        format!("rejects={}", bad.display()),
    );
    let extra = [
        "--move-root",
        &move_done,
        "--move-root",
        &move_bad,
        "--allow-remove-source",
    ];
    let _w = Worker::start_with(&nats, t.dir.path(), &roots, "2", &extra);
    let base = [
        "--op",
        "gzip",
        "--root-name",
        "tree",
        "--move-source",
        done.to_str().unwrap(),
        "--move-failed",
        bad.to_str().unwrap(),
    ];
    let refused = |names: &[&str], flag: &str| {
        let args: Vec<&str> = base.iter().chain(names).copied().collect();
        let run = coordinate(&nats, &t.root(), &args);
        run.code(2);
        assert!(run.stderr().contains(flag), "{}", run.stderr());
    };
    refused(&[], "--move-source-name");
    refused(&["--move-source-name", "done"], "--move-failed-name");
    refused(
        &[
            "--move-source-name",
            "tree",
            "--move-failed-name",
            "rejects",
        ],
        "--move-source-name",
    );
    refused(
        &["--move-source-name", "done", "--move-failed-name", "done"],
        "--move-failed-name",
    );
    assert_eq!(
        files_under(&t.root()),
        files_under(&copy),
        "a refused run moved files"
    );
    // A name without --queue is a usage error.
    let local = run(filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--op"),
        s("gzip"),
        s("--move-source"),
        done.as_os_str(),
        s("--move-source-name"),
        s("done"),
    ]));
    local.code(2);

    let names = [
        "--move-source-name",
        "done",
        "--move-failed-name",
        "rejects",
    ];
    let args: Vec<&str> = base.iter().chain(&names).copied().collect();
    let run = coordinate(&nats, &t.root(), &args);
    assert_all_done(&run, 30);
    assert_eq!(assert_outputs_of(&t.root(), &copy), 30);
    assert_eq!(files_under(&done), files_under(&copy));
}

/// `check-config` holds a watching coordinator's move directories to the rule the coordinator
/// does: a directory whose own name is no plain name needs `move_source_name` (or
/// `move_failed_name`), and a name needs `queue` and its directory.
#[test]
fn check_config_refuses_a_move_directory_name_the_coordinator_refuses() {
    let t = TestTree::new();
    let done = t.side("archive.2026");
    fs::create_dir(&done).unwrap();
    let check = |extra: &str, queue: bool| {
        let cfg = t.side("f.toml");
        let queue = if queue {
            "queue = \"nats://127.0.0.1:4999\"\n"
        } else {
            ""
        };
        fs::write(
            &cfg,
            format!(
                "state_dir = {:?}\n[[watch]]\npath = {:?}\nop = \"gzip\"\nmove_source = {:?}\n{queue}{extra}",
                t.side("state").display().to_string(),
                t.root().display().to_string(),
                done.display().to_string()
            ),
        )
        .unwrap();
        run(filepipe(&[s("check-config"), cfg.as_os_str()]))
    };
    for (extra, queue) in [
        ("root_name = \"tree\"\n", true),
        (
            "root_name = \"tree\"\nmove_source_name = \"not a name!\"\n",
            true,
        ),
        ("root_name = \"tree\"\nmove_source_name = \"tree\"\n", true),
        ("root_name = \"tree\"\nmove_failed_name = \"bad\"\n", true),
        ("move_source_name = \"done\"\n", false),
    ] {
        let checked = check(extra, queue);
        assert_eq!(
            checked.output().status.code(),
            Some(2),
            "check-config accepted a file whose pipeline cannot start ({extra:?}, queue {queue}): {}",
            checked.stdout()
        );
    }
    let ok = check("root_name = \"tree\"\nmove_source_name = \"done\"\n", true);
    assert_eq!(ok.output().status.code(), Some(0), "{}", ok.stderr());
}

/// A job delivered again after an earlier delivery moved its inputs (`--move-source`) and
/// stopped before saying so: its files are done, from the outputs in place and the inputs
/// under the move directory, moved after the job was stored. They ended `vanished`. The job is
/// handed back (NAK) so that the server delivers it again at once; a local batch with the same
/// move directory does what the earlier delivery did.
#[test]
fn a_job_delivered_again_after_its_inputs_were_moved_counts_them_done() {
    let Some(nats) = Nats::start() else { return };
    let t = tree(20, 0);
    let copy = copy_of(&t);
    let done = t.side("done");
    fs::create_dir(&done).unwrap();
    let args = ["--op", "gzip", "--move-source", done.to_str().unwrap()];
    let started = start_coordinator(&nats, &t.root(), &args);
    wait_until(
        Duration::from_secs(30),
        "the job taken and handed back",
        || nats.nak_next("workers-tree"),
    );
    // The earlier delivery's work, after the job was stored.
    let local = run(filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--op"),
        s("gzip"),
        s("--move-source"),
        done.as_os_str(),
    ]));
    local.success();
    assert_eq!(files_under(&done), files_under(&copy));
    let _w = mover(&nats, &t, ("done", &done), "2");
    let out = started.finish(Duration::from_secs(60));
    let sum = out.code(0).summary();
    assert_eq!(sum["done"], 20, "{sum}\n{}", out.stderr());
    assert_eq!(assert_outputs_of(&t.root(), &copy), 20);
}

/// A `--move-failed` batch whose coordinator is killed mid-run and resumed by the same
/// command: the inputs moved aside before the kill are no longer in the tree for the second
/// walk, and are counted failed from the outcomes the first run left (each once, not lost and
/// not doubled), as are those moved after it; the rest are done.
#[test]
fn a_resumed_move_failed_batch_counts_each_input_moved_aside_once() {
    let Some(nats) = Nats::start() else { return };
    let (good, bad) = (120, 30);
    let mut t = TestTree::new();
    for i in 0..good {
        t = t.file(
            format!("d{}/f{i}.log", i % 7),
            &text_bytes(1 << 20, 9000 + i as u64),
        );
    }
    // Names too long for their .gz: each fails for good, after the worker has taken it.
    for i in 0..bad {
        let mut name = format!("d{}/x{i:03}", i % 7).into_bytes();
        name.resize(3 + 253, b'n');
        t = t.file(&name, format!("failed {i}\n").as_bytes());
    }
    let failed = t.side("failed");
    fs::create_dir(&failed).unwrap();
    let worker = mover(&nats, &t, ("failed", &failed), "1");
    let args = [
        "--op",
        "gzip",
        "--level",
        "9",
        "--move-failed",
        failed.to_str().unwrap(),
    ];
    let mut first = start_coordinator(&nats, &t.root(), &args);
    wait_until(
        Duration::from_secs(120),
        "some inputs moved aside and some done",
        || {
            files_under(&failed).len() >= 5
                && inputs_left(&t.root()) < good + bad - 5
                && gz_under(&t.root()) >= 20
        },
    );
    signal_pid(worker.pid(), rustix::process::Signal::STOP);
    std::thread::sleep(Duration::from_millis(300));
    first.kill().unwrap();
    first.finish(Duration::from_secs(10));
    let moved_before = files_under(&failed).len();
    let (again, log) = start_coordinator_logged(&nats, &t, &args, "still queued");
    signal_pid(worker.pid(), rustix::process::Signal::CONT);
    let run = again.finish(Duration::from_secs(180));
    let sum = run.code(1).summary();
    let context = format!(
        "{moved_before} moved aside before the kill: {sum}\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        (sum["done"].as_u64(), sum["failed"].as_u64()),
        (Some(good as u64), Some(bad as u64)),
        "{context}"
    );
    assert_eq!(files_under(&failed).len(), bad, "{context}");
    assert_eq!(inputs_left(&t.root()), good, "{context}");
    assert_eq!(gz_under(&t.root()), good, "{context}");
}

/// The `.gz` files under `dir`.
fn gz_under(dir: &Path) -> usize {
    files_under(dir)
        .iter()
        .filter(|p| p.extension() == Some(OsStr::new("gz")))
        .count()
}
