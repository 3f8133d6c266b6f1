//! End-to-end tests of `filepipe demo ...`: run the real binary (so worker and child
//! processes are real re-executions of it) with small sizes, and assert on what it prints.
//! No assertion depends on wall-clock speed; timings are printed, never compared.
#![cfg(feature = "demos")]

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{Run, Started, TIMEOUT};

/// Runs `filepipe ARGS` to completion, within the same time limit as the other tests' runs.
fn filepipe(args: &[&str]) -> Run {
    let mut cmd = common::filepipe(&[]);
    cmd.args(args);
    common::run(cmd)
}

/// Runs `filepipe demo <args>`, requires success, returns stdout.
fn demo(args: &[&str]) -> String {
    let mut full = vec!["demo"];
    full.extend_from_slice(args);
    filepipe(&full).success().stdout()
}

/// Every `check` line says ok, and there are at least `n` of them.
fn assert_checks_ok(stdout: &str, n: usize) {
    let checks: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("check "))
        .collect();
    assert!(checks.len() >= n, "expected {n} checks in:\n{stdout}");
    for c in checks {
        assert!(c.ends_with(": ok"), "failed check {c:?} in:\n{stdout}");
    }
}

fn lines_with<'a>(stdout: &'a str, needle: &str) -> Vec<&'a str> {
    stdout.lines().filter(|l| l.contains(needle)).collect()
}

/// The timestamped event lines (`  [  1.2 ms] ...`) containing `needle`.
fn events_with<'a>(stdout: &'a str, needle: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("  [") && l.contains(needle))
        .collect()
}

/// The number right after `prefix` on the first line containing it.
fn number_after(stdout: &str, prefix: &str) -> usize {
    let line = stdout
        .lines()
        .find(|l| l.contains(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{stdout}"));
    let rest = &line[line.find(prefix).expect("prefix") + prefix.len()..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?} in {line:?}"))
}

const DEMOS: [&str; 11] = [
    "threads",
    "cpu",
    "async",
    "producer-consumer",
    "scraper",
    "shared-memory",
    "race",
    "semaphore",
    "barrier",
    "fizzbuzz",
    "as-completed",
];

#[test]
fn list_prints_one_line_per_demo_name_first() {
    let out = demo(&["--list"]);
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, DEMOS, "list was:\n{out}");
    assert!(out.lines().all(|l| l.split_whitespace().count() > 3));
    assert!(!out.contains("cpu-worker") && !out.contains("shm-child"));
    // Bare `demo` shows the same list plus how to run one.
    let bare = demo(&[]);
    assert!(bare.starts_with(&out));
    // A list that cannot be written is an error, as for every other printer (it exited 0).
    let full = std::fs::File::options()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let mut cmd = common::filepipe(&[]);
    cmd.args(["demo", "--list"])
        .stdin(Stdio::null())
        .stdout(full)
        .stderr(Stdio::piped());
    let err = Started::new(cmd).finish(TIMEOUT).code(1).stderr();
    assert!(err.contains("No space left on device"), "{err}");
}

#[test]
fn every_demo_has_help_with_its_size_flags() {
    for (name, flag) in [
        ("threads", "--tasks"),
        ("cpu", "--workers"),
        ("async", "--concurrency"),
        ("producer-consumer", "--consumers"),
        ("scraper", "--rate"),
        ("shared-memory", "--len"),
        ("race", "--increments"),
        ("semaphore", "--permits"),
        ("barrier", "--threads"),
        ("fizzbuzz", "--n"),
        ("as-completed", "--tasks"),
    ] {
        let out = demo(&[name, "--help"]);
        assert!(out.contains(flag), "{name} --help lacks {flag}:\n{out}");
        assert!(out.contains("[default:"), "{name} --help shows no defaults");
    }
}

#[test]
fn invalid_sizes_are_usage_errors() {
    filepipe(&["demo", "semaphore", "--permits", "0"]).code(2);
    filepipe(&["demo", "no-such-demo"]).code(2);
}

#[test]
fn threads_pool_runs_every_task() {
    let out = demo(&[
        "threads",
        "--tasks",
        "6",
        "--delay-ms",
        "5",
        "--workers",
        "3",
    ]);
    assert!(out.contains("time  sequential"));
    assert!(out.contains("time  thread pool (3 threads)"));
    assert!(number_after(&out, "(peak") <= 3);
    assert_checks_ok(&out, 2);
}

#[test]
fn cpu_all_three_ways_agree_and_processes_are_real() {
    let out = demo(&[
        "cpu",
        "--tasks",
        "5",
        "--base",
        "1000",
        "--step",
        "700",
        "--scale",
        "1",
        "--workers",
        "2",
    ]);
    assert!(out.contains("time  sequential"));
    assert!(out.contains("time  rayon pool (2 threads)"));
    assert!(out.contains("time  2 worker processes"));
    assert!(out.contains("no GIL"));
    let pids: Vec<usize> = lines_with(&out, "worker process ")
        .iter()
        .map(|l| number_after(l, "worker process"))
        .collect();
    assert_eq!(pids.len(), 2, "{out}");
    assert_ne!(pids[0], pids[1]);
    assert!(!pids.contains(&(std::process::id() as usize)));
    assert_checks_ok(&out, 1);
}

#[test]
fn cpu_worker_speaks_the_pipe_protocol() {
    let mut cmd = common::filepipe(&[]);
    cmd.args(["demo", "cpu-worker"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = Started::new(cmd);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"3\n10\n1000000\n")
        .expect("writing items");
    let out = child.finish(TIMEOUT);
    assert_eq!(out.success().stdout(), "5\n285\n333332833333500000\n");
}

#[test]
fn async_semaphore_bound_holds() {
    let out = demo(&[
        "async",
        "--tasks",
        "12",
        "--delay-ms",
        "5",
        "--concurrency",
        "3",
    ]);
    assert!(number_after(&out, "peak tasks inside the semaphore:") <= 3);
    assert_checks_ok(&out, 2);
}

#[test]
fn producer_consumer_consumes_each_item_once_then_one_sentinel_each() {
    let out = demo(&[
        "producer-consumer",
        "--producers",
        "2",
        "--consumers",
        "3",
        "--items",
        "20",
        "--capacity",
        "4",
        "--produce-ms",
        "1",
        "--consume-ms",
        "2",
    ]);
    let mut produced: Vec<usize> = events_with(&out, " produced ")
        .iter()
        .map(|l| number_after(l, " produced "))
        .collect();
    let mut consumed: Vec<usize> = events_with(&out, " consumed ")
        .iter()
        .map(|l| number_after(l, " consumed "))
        .collect();
    produced.sort_unstable();
    consumed.sort_unstable();
    assert_eq!(produced, (0..20).collect::<Vec<_>>());
    assert_eq!(consumed, produced);
    for c in 0..3 {
        let mine: Vec<&str> = events_with(&out, &format!("consumer-{c} "));
        let sentinels = mine.iter().filter(|l| l.contains("stop sentinel")).count();
        assert_eq!(sentinels, 1, "consumer-{c}:\n{out}");
        assert!(mine.last().expect("lines").contains("stop sentinel"));
    }
    assert_checks_ok(&out, 2);
}

#[test]
fn producer_consumer_early_stop_is_graceful() {
    let out = demo(&[
        "producer-consumer",
        "--items",
        "100000",
        "--produce-ms",
        "1",
        "--consume-ms",
        "0",
        "--stop-after-ms",
        "50",
    ]);
    assert!(out.contains("asked to stop early"));
    assert_eq!(events_with(&out, "stop sentinel").len(), 3);
    assert_checks_ok(&out, 2);
}

#[test]
fn scraper_collects_the_embedded_site_within_its_limits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let jsonl = dir.path().join("pages.jsonl");
    let out = demo(&[
        "scraper",
        "--pages",
        "6",
        "--latency-ms",
        "10",
        "--concurrency",
        "2",
        "--rate",
        "50",
        "--burst",
        "2",
        "--out",
        jsonl.to_str().expect("utf8 path"),
    ]);
    assert!(out.contains("achieved request rate"));
    assert!(number_after(&out, "peak requests in flight:") <= 2);
    assert!(!lines_with(&out, "[2 attempts]").is_empty(), "{out}");
    assert_checks_ok(&out, 4);

    let text = std::fs::read_to_string(&jsonl).expect("reading the JSON lines");
    let pages: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(pages.len(), 7);
    for p in &pages {
        assert_eq!(p["status"], 200, "{p}");
        assert!(p["title"].is_string(), "{p}");
        assert!(!p["links"].as_array().expect("links").is_empty(), "{p}");
    }
}

#[test]
fn scraper_reads_a_url_file_and_records_failures() {
    let dir = tempfile::tempdir().expect("temp dir");
    let urls = dir.path().join("urls.txt");
    // Nothing listens on loopback port 1; https is refused by this TLS-less build.
    std::fs::write(
        &urls,
        "# comment\nhttp://127.0.0.1:1/\n\nhttps://127.0.0.1/\n",
    )
    .expect("writing the URL file");
    let jsonl = dir.path().join("out.jsonl");
    let out = demo(&[
        "scraper",
        "--urls",
        urls.to_str().expect("utf8"),
        "--retries",
        "1",
        "--out",
        jsonl.to_str().expect("utf8"),
    ]);
    assert!(out.contains("2 URLs from the --urls file"));
    assert_eq!(lines_with(&out, "FAILED").len(), 2);
    // The unreachable URL was tried twice, the https one not at all: one retry (it said 0,
    // requests less pages).
    assert_eq!(lines_with(&out, "[2 attempts]").len(), 1, "{out}");
    assert!(out.contains("2 requests (1 retries)"), "{out}");
    let text = std::fs::read_to_string(&jsonl).expect("reading the JSON lines");
    assert_eq!(text.lines().count(), 2);
}

/// Without `--out`, the results go to a new file of the run's own in the temp directory:
/// the fixed name it had there followed another user's symlink (root's demo wrote over any
/// file) and could be made first by another user to read the results (found by a review).
#[test]
fn scraper_results_go_to_a_new_private_file_never_through_a_planted_link() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().expect("temp dir");
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious\n").expect("victim");
    std::os::unix::fs::symlink(&victim, tmp.path().join("filepipe-demo-scrape.jsonl"))
        .expect("planted link");
    let mut results = Vec::new();
    for _ in 0..2 {
        let mut cmd = common::filepipe(&[]);
        cmd.args(["demo", "scraper", "--pages", "2", "--latency-ms", "1"]);
        cmd.env("TMPDIR", tmp.path());
        let out = common::run(cmd).success().stdout();
        let line = lines_with(&out, "results: ");
        let path = line[0].split("results: ").nth(1).expect("a path");
        let path = std::path::PathBuf::from(path.split(" (").next().expect("a path"));
        assert_eq!(path.parent(), Some(tmp.path()), "{out}");
        let meta = std::fs::symlink_metadata(&path).expect("the results file");
        assert!(meta.is_file() && meta.nlink() == 1, "{meta:?}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("results")
                .lines()
                .count(),
            3
        );
        results.push(path);
    }
    assert_ne!(results[0], results[1], "each run its own file");
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious\n");
}

#[test]
fn shared_memory_child_change_is_visible_to_the_parent() {
    let out = demo(&["shared-memory", "--len", "4", "--add", "10"]);
    assert!(
        out.contains("process: before [1.0, 2.0, 3.0, 4.0]"),
        "{out}"
    );
    assert!(
        out.contains("process: after  [11.0, 12.0, 13.0, 14.0]"),
        "{out}"
    );
    assert!(
        out.contains("thread:  after  [11.0, 12.0, 13.0, 14.0]"),
        "{out}"
    );
    assert_checks_ok(&out, 2);
    // The block's name is unlinked once the demo is over.
    let name = lines_with(&out, "shared memory block")[0]
        .rsplit(' ')
        .next()
        .expect("name")
        .to_string();
    assert!(!std::path::Path::new(&format!("/dev/shm{name}")).exists());
}

#[test]
fn race_mutex_and_atomic_counts_are_exact() {
    let out = demo(&["race", "--threads", "4", "--increments", "20000"]);
    let exact = |label: &str| {
        let line = lines_with(&out, label)[0];
        number_after(line, "count")
    };
    assert_eq!(exact("Mutex<u64>"), 80_000);
    assert_eq!(exact("AtomicU64::fetch_add"), 80_000);
    // The racy count may or may not lose updates, but what the demo says of it must add up:
    // count + lost = expected, and the note matches what happened.
    let racy = lines_with(&out, "load + store (racy)")[0];
    let (count, lost) = (number_after(racy, "count"), number_after(racy, "lost"));
    assert_eq!(count + lost, 80_000, "{racy}");
    assert!(count > 0, "{racy}");
    let note = if lost == 0 {
        "happened to lose nothing"
    } else {
        "the racy counter lost updates"
    };
    assert_eq!(lines_with(&out, note).len(), 1, "{out}");
    assert_checks_ok(&out, 2);
}

#[test]
fn semaphore_never_exceeds_its_permits() {
    let out = demo(&[
        "semaphore",
        "--workers",
        "7",
        "--permits",
        "3",
        "--hold-ms",
        "5",
    ]);
    let in_use: Vec<usize> = events_with(&out, "got a permit")
        .iter()
        .map(|l| number_after(l, "got a permit ("))
        .collect();
    assert_eq!(in_use.len(), 7);
    assert!(in_use.iter().all(|&k| (1..=3).contains(&k)), "{out}");
    assert_checks_ok(&out, 2);
}

#[test]
fn barrier_holds() {
    let out = demo(&["barrier", "--threads", "3", "--work-ms", "5"]);
    assert_eq!(events_with(&out, "finished phase 1").len(), 3);
    assert_eq!(lines_with(&out, "(leader)").len(), 1);
    assert_checks_ok(&out, 2);
}

#[test]
fn fizzbuzz_output_is_exactly_the_sequence() {
    let out = demo(&["fizzbuzz", "--n", "15"]);
    let said: Vec<&str> = lines_with(&out, " thread")
        .iter()
        .filter(|l| l.contains("<-"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        said,
        [
            "1", "2", "Fizz", "4", "Buzz", "Fizz", "7", "8", "Fizz", "Buzz", "11", "Fizz", "13",
            "14", "FizzBuzz"
        ]
    );
    assert!(out.contains("FizzBuzz <- FizzBuzz thread"));
    assert_checks_ok(&out, 1);
}

/// `-q` keeps a demo's report off stdout, as it keeps a batch's summary; its checks still
/// decide the exit code. The cpu demo's worker processes run under it too.
#[test]
fn quiet_demos_print_nothing_and_still_succeed() {
    for args in [
        &["-q", "demo", "fizzbuzz", "--n", "15"][..],
        &["-q", "demo", "barrier", "--threads", "3", "--work-ms", "5"],
        &[
            "demo",
            "cpu",
            "--quiet",
            "--tasks",
            "3",
            "--base",
            "1000",
            "--step",
            "700",
            "--scale",
            "1",
            "--workers",
            "2",
        ],
    ] {
        let r = filepipe(args);
        r.success();
        assert_eq!(r.stdout(), "", "{args:?}");
        assert_eq!(r.stderr(), "", "{args:?}");
    }
    // Without it, the same demo reports.
    assert!(demo(&["fizzbuzz", "--n", "3"]).contains("check "));
}

#[test]
fn as_completed_returns_every_task_in_finishing_order() {
    let out = demo(&["as-completed", "--tasks", "5", "--step-ms", "5"]);
    let mut done: Vec<usize> = events_with(&out, " done (waited")
        .iter()
        .map(|l| number_after(l, "task "))
        .collect();
    done.sort_unstable();
    assert_eq!(done, [0, 1, 2, 3, 4]);
    assert_checks_ok(&out, 2);
}
