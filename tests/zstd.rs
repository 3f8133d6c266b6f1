//! `--op zstd` end to end: the real binary over temp trees, every output checked with the real
//! `zstd -t` and `zstd -dc`. Each test says SKIPPED and passes where `zstd` is not installed.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

fn p(x: &Path) -> &OsStr {
    x.as_os_str()
}

/// Whether the zstd CLI is here to check the outputs; says the test skipped if not.
fn zstd_or_skip() -> bool {
    let have = std::process::Command::new("zstd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("SKIPPED: no zstd to check the outputs (apt-get install zstd)");
    }
    have
}

/// Runs `filepipe batch <t's root> --op zstd args...`.
fn zstd_batch(t: &TestTree, args: &[&OsStr]) -> Run {
    let mut cmd = filepipe(&[s("batch"), p(&t.root()), s("--op"), s("zstd")]);
    cmd.args(args);
    run(cmd)
}

fn zst_of(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(".zst");
    PathBuf::from(s)
}

/// `zstd -t` passes on `zst` and `zstd -dc` gives back exactly `original`.
fn assert_zstd_restores(zst: &Path, original: &[u8]) {
    let dir = zst.parent().unwrap();
    let t = tool("zstd", &[s("-t"), s("-q"), p(zst)], dir);
    assert!(t.status.success(), "zstd -t {}: {t:?}", zst.display());
    let d = tool("zstd", &[s("-dc"), p(zst)], dir);
    assert!(d.status.success(), "zstd -dc {}: {d:?}", zst.display());
    assert!(d.stdout == original, "{} does not restore", zst.display());
}

/// A tree of text, binary, empty and one large file (20 MiB: streamed through libzstd's worker
/// threads, more than two of its 8 MiB jobs).
fn mixed_tree() -> TestTree {
    TestTree::new()
        .file("text.log", &text_bytes(300_000, 1))
        .file("bin/noise.bin", &noise_bytes(200_000, 2))
        .file("empty", b"")
        .file("deep/er/small.txt", b"small\n")
        .file("large/big.log", &text_bytes(20 << 20, 3))
}

const MIXED: [&str; 5] = [
    "text.log",
    "bin/noise.bin",
    "empty",
    "deep/er/small.txt",
    "large/big.log",
];

#[test]
fn outputs_pass_zstd_t_and_restore_with_mode_and_mtime() {
    if !zstd_or_skip() {
        return;
    }
    let t = mixed_tree();
    fs::set_permissions(t.path("text.log"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(t.path("large/big.log"), fs::Permissions::from_mode(0o640)).unwrap();
    let sum = zstd_batch(&t, &[s("--json")]).success().summary();
    assert_eq!(sum["done"], 5, "{sum}");
    assert!(sum["ratio"].as_f64().is_some_and(|r| r < 0.7), "{sum}");
    for rel in MIXED {
        let input = t.path(rel);
        let zst = zst_of(&input);
        assert_zstd_restores(&zst, &fs::read(&input).unwrap());
        let (i, o) = (fs::metadata(&input).unwrap(), fs::metadata(&zst).unwrap());
        assert_eq!(o.mode() & 0o777, i.mode() & 0o777, "{rel}: mode");
        assert_eq!(
            (o.mtime(), o.mtime_nsec()),
            (i.mtime(), i.mtime_nsec()),
            "{rel}: mtime"
        );
    }
    // The content size is in the frame header, as zstd's own outputs have it.
    let list = tool(
        "zstd",
        &[s("-lv"), p(&t.path("large/big.log.zst"))],
        t.dir.path(),
    );
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("20971520"), "{text}");
    // And `filepipe verify DIR` tests them too.
    let v = run(filepipe(&[s("verify"), p(&t.root())]));
    v.success();
    assert_eq!(v.stdout().matches(": OK").count(), 5, "{}", v.stdout());
}

#[test]
fn output_is_byte_identical_whatever_jobs_is() {
    if !zstd_or_skip() {
        return;
    }
    let t = mixed_tree();
    let mut outs = Vec::new();
    for jobs in ["1", "2", "3"] {
        let out = t.side(&format!("out{jobs}"));
        zstd_batch(&t, &[s("--jobs"), s(jobs), s("--out"), p(&out)]).success();
        outs.push(out);
    }
    for rel in MIXED {
        let first = fs::read(zst_of(&outs[0].join(rel))).unwrap();
        for out in &outs[1..] {
            let other = fs::read(zst_of(&out.join(rel))).unwrap();
            assert!(first == other, "{rel} differs in {}", out.display());
        }
    }
    assert_zstd_restores(
        &zst_of(&outs[0].join("large/big.log")),
        &fs::read(t.path("large/big.log")).unwrap(),
    );
}

#[test]
fn levels_1_and_19_work_and_the_range_depends_on_the_op() {
    if !zstd_or_skip() {
        return;
    }
    let data = text_bytes(400_000, 4);
    let t = TestTree::new().file("a.log", &data);
    let mut sizes = Vec::new();
    for level in ["1", "19"] {
        let out = t.side(&format!("l{level}"));
        zstd_batch(&t, &[s("--level"), s(level), s("--out"), p(&out)]).success();
        let zst = out.join("a.log.zst");
        assert_zstd_restores(&zst, &data);
        sizes.push(fs::metadata(&zst).unwrap().len());
    }
    assert!(sizes[1] < sizes[0], "level 19 smaller than 1: {sizes:?}");
    let root = t.root();
    let usage = |op: &str, level: &str| {
        let r = run(filepipe(&[
            s("batch"),
            p(&root),
            s("--op"),
            s(op),
            s("--level"),
            s(level),
        ]));
        r.code(2);
        r.stderr()
    };
    for level in ["0", "20"] {
        usage("zstd", level);
    }
    // gzip keeps its own range (1-9), with a message that says so.
    let why = usage("gzip", "12");
    assert!(why.contains("1 to 9"), "{why}");
    // A hash takes no level.
    usage("sha256", "3");
    // Nothing was written by the refused runs.
    assert!(!t.path("a.log.zst").exists() && !t.path("a.log.gz").exists());
}

#[test]
fn already_compressed_inputs_are_skipped_with_the_reason_and_compressed_with_force() {
    if !zstd_or_skip() {
        return;
    }
    let names = [
        "a.gz", "b.XZ", "c.zip", "d.7z", "e.bz2", "f.lz4", "g.zst", "h.Zst",
    ];
    let mut t = TestTree::new().file("plain.txt", &text_bytes(5_000, 5));
    for n in names {
        t = t.file(n, &noise_bytes(3_000, 6));
    }
    let log = t.side("f.jsonl");
    let sum = zstd_batch(&t, &[s("--json"), s("--failure-log"), p(&log)])
        .success()
        .summary();
    assert_eq!(sum["done"], 1, "{sum}");
    assert_eq!(sum["skipped_by_reason"]["already-compressed"], 8, "{sum}");
    let records = failure_log(&log);
    let skipped = records_of(&records, "already-compressed");
    assert_eq!(skipped.len(), 8, "{records:?}");
    assert!(
        skipped.iter().all(|r| r["status"] == "skipped"),
        "{records:?}"
    );
    // gzip skips them as well.
    let sum = run({
        let mut c = filepipe(&[s("batch"), p(&t.root()), s("--op"), s("gzip")]);
        c.arg("--json");
        c
    })
    .success()
    .summary();
    assert_eq!(sum["skipped_by_reason"]["already-compressed"], 9, "{sum}");
    // --force compresses them, all but the names of zstd's own outputs next to the inputs
    // (g.zst would become g.zst.zst, and every rerun would add one).
    let sum = zstd_batch(&t, &[s("--json"), s("--force")])
        .success()
        .summary();
    assert_eq!(sum["skipped_by_reason"]["already-compressed"], 2, "{sum}");
    for n in names
        .iter()
        .filter(|n| !n.ends_with(".zst") && **n != "plain.txt")
    {
        let input = t.path(n);
        assert_zstd_restores(&zst_of(&input), &fs::read(&input).unwrap());
    }
    assert!(!t.path("g.zst.zst").exists());
    // With --out, outputs are never read back as inputs: even g.zst is compressed.
    let out = t.side("out");
    let sum = zstd_batch(&t, &[s("--json"), s("--force"), s("--out"), p(&out)])
        .success()
        .summary();
    assert_eq!(sum["skipped"], 0, "{sum}");
    assert!(out.join("g.zst.zst").exists());
}

#[test]
fn a_rerun_finds_outputs_up_to_date_and_a_foreign_zst_is_not_taken_for_ours() {
    if !zstd_or_skip() {
        return;
    }
    let t = TestTree::new()
        .file("a.txt", &text_bytes(9_000, 7))
        .file("d/b.txt", &text_bytes(70_000, 8))
        .file("theirs.txt", &text_bytes(10_000, 9));
    // Someone compressed one input with zstd itself, which keeps the input's mtime.
    let made = tool("zstd", &[s("-q"), s("-k"), s("theirs.txt")], &t.root());
    assert!(made.status.success(), "{made:?}");
    let theirs = fs::read(t.path("theirs.txt.zst")).unwrap();
    let same_date = |a: &Path, b: &Path| {
        let (a, b) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap());
        (a.mtime(), a.mtime_nsec()) == (b.mtime(), b.mtime_nsec())
    };
    assert!(same_date(&t.path("theirs.txt"), &t.path("theirs.txt.zst")));
    let log = t.side("f.jsonl");
    let first = zstd_batch(&t, &[s("--json"), s("--failure-log"), p(&log)]);
    let sum = first.code(1).summary();
    assert_eq!(sum["done"], 2, "{sum}");
    // Dated right but not stamped by filepipe: another file, kept and reported.
    assert_eq!(sum["failed_by_reason"]["output-exists"], 1, "{sum}");
    assert_eq!(fs::read(t.path("theirs.txt.zst")).unwrap(), theirs);
    // Rerun: ours are up to date, theirs still refused.
    let sum = zstd_batch(&t, &[s("--json")]).code(1).summary();
    assert_eq!(sum["done"], 0, "{sum}");
    assert_eq!(sum["skipped_by_reason"]["up-to-date"], 2, "{sum}");
    // --force replaces theirs with ours, which a rerun then finds up to date.
    let sum = zstd_batch(&t, &[s("--json"), s("--force")])
        .success()
        .summary();
    assert_eq!(sum["done"], 3, "{sum}");
    assert_ne!(fs::read(t.path("theirs.txt.zst")).unwrap(), theirs);
    let sum = zstd_batch(&t, &[s("--json")]).success().summary();
    assert_eq!(sum["skipped_by_reason"]["up-to-date"], 3, "{sum}");
    for rel in ["a.txt", "d/b.txt", "theirs.txt"] {
        let input = t.path(rel);
        assert_zstd_restores(&zst_of(&input), &fs::read(&input).unwrap());
    }
}

/// A file that shrinks while zstd reads it is read again, as gzip's is (found by a review: its
/// frame, pledged to the size found, cannot end short of it, and the file failed
/// `changed-while-read` at once). Truncated once the run has it open, mid-way through a read
/// of about a second.
#[test]
fn a_file_that_shrinks_while_read_is_read_again() {
    if !zstd_or_skip() {
        return;
    }
    let t = TestTree::new().file("big.log", &text_bytes(16 << 20, 8));
    let big = t.path("big.log");
    let mut cmd = filepipe(&[
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("zstd"),
        s("--level"),
        s("12"),
        s("--json"),
        s("-v"),
    ]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let run = Started::new(cmd);
    wait_until(Duration::from_secs(60), "the run to open big.log", || {
        opens(run.id(), &big)
    });
    fs::write(&big, b"what is left\n").unwrap();
    let out = run.finish(TIMEOUT);
    let sum = out.code(0).summary();
    assert_eq!(sum["done"], 1, "{sum}");
    assert_zstd_restores(&zst_of(&big), b"what is left\n");
    assert!(
        out.stderr().contains("reading it again"),
        "{}",
        out.stderr()
    );
}

#[test]
fn remove_source_removes_inputs_only_after_a_verified_output() {
    if !zstd_or_skip() {
        return;
    }
    let big = text_bytes(6 << 20, 10);
    let t = TestTree::new()
        .file("a.txt", &text_bytes(9_000, 11))
        .file("big.log", &big)
        .file("linked", b"two names");
    fs::hard_link(t.path("linked"), t.side("other-name")).unwrap();
    let sum = zstd_batch(&t, &[s("--json"), s("--remove-source")])
        .success()
        .summary();
    assert_eq!(sum["done"], 3, "{sum}");
    assert!(!t.path("a.txt").exists() && !t.path("big.log").exists());
    assert!(t.path("linked").exists(), "a hard-linked input is kept");
    assert_zstd_restores(&t.path("big.log.zst"), &big);
}

#[test]
fn verify_reports_corrupt_and_truncated_zst_files() {
    if !zstd_or_skip() {
        return;
    }
    let t = TestTree::new()
        .file("good.txt", &text_bytes(50_000, 12))
        .file("flipped.txt", &text_bytes(50_000, 13))
        .file("cut.txt", &text_bytes(50_000, 14));
    zstd_batch(&t, &[]).success();
    let flipped = t.path("flipped.txt.zst");
    let mut bytes = fs::read(&flipped).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x40;
    fs::write(&flipped, bytes).unwrap();
    let cut = t.path("cut.txt.zst");
    let bytes = fs::read(&cut).unwrap();
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let v = run(filepipe(&[s("verify"), p(&t.root())]));
    v.code(1);
    let out = v.stdout();
    assert!(out.contains("good.txt.zst: OK"), "{out}");
    assert!(out.contains("flipped.txt.zst: FAILED"), "{out}");
    assert!(out.contains("cut.txt.zst: FAILED"), "{out}");
    // zstd agrees on both.
    for bad in [&flipped, &cut] {
        assert!(!tool("zstd", &[s("-t"), s("-q"), p(bad)], t.dir.path())
            .status
            .success());
    }
}

#[test]
fn watch_mode_compresses_each_file_once_and_skips_compressed_ones() {
    if !zstd_or_skip() {
        return;
    }
    let t = TestTree::new().file("before.txt", &text_bytes(30_000, 15));
    let log = t.side("f.jsonl");
    let d = Daemon::ready(
        &t,
        &["--op", "zstd", "--failure-log", log.to_str().unwrap()],
    );
    let wait_for = |what: &str, path: PathBuf| {
        wait_until(Duration::from_secs(90), what, || path.exists());
    };
    wait_for("the pre-existing file", t.path("before.txt.zst"));
    fs::write(t.path("new.part"), text_bytes(20_000, 16)).unwrap();
    fs::rename(t.path("new.part"), t.path("new.log")).unwrap();
    fs::write(t.path("archive.xz"), noise_bytes(5_000, 17)).unwrap();
    wait_for("new.log", t.path("new.log.zst"));
    wait_until(Duration::from_secs(90), "archive.xz skipped", || {
        !records_of(&failure_log(&log), "already-compressed").is_empty()
    });
    d.wait_idle(2);
    let sum = d.stop().success().summary();
    assert_eq!(sum["done"], 2, "{sum}");
    assert_eq!(sum["skipped_by_reason"]["already-compressed"], 1, "{sum}");
    assert!(
        !t.path("before.txt.zst.zst").exists(),
        "outputs never trigger"
    );
    assert!(!t.path("archive.xz.zst").exists());
    for rel in ["before.txt", "new.log"] {
        let input = t.path(rel);
        assert_zstd_restores(&zst_of(&input), &fs::read(&input).unwrap());
    }
}

#[test]
fn remove_source_after_a_stopped_run_adopts_the_stamped_outputs_without_recompressing() {
    if !zstd_or_skip() {
        return;
    }
    let t = TestTree::new()
        .file("a.txt", &text_bytes(9_000, 18))
        .file("b.log", &text_bytes(5 << 20, 19));
    let inputs: Vec<Vec<u8>> = ["a.txt", "b.log"]
        .iter()
        .map(|r| fs::read(t.path(r)).unwrap())
        .collect();
    // A run published the outputs and stopped before removing the inputs.
    zstd_batch(&t, &[]).success();
    let ino = |rel: &str| fs::metadata(zst_of(&t.path(rel))).unwrap().ino();
    let before = (ino("a.txt"), ino("b.log"));
    let sum = zstd_batch(&t, &[s("--json"), s("--remove-source")])
        .success()
        .summary();
    assert_eq!(sum["done"], 2, "{sum}");
    // The very outputs, checked against the inputs, and the inputs gone.
    assert_eq!((ino("a.txt"), ino("b.log")), before);
    for (rel, data) in ["a.txt", "b.log"].iter().zip(&inputs) {
        assert!(!t.path(rel).exists(), "{rel} removed");
        assert_zstd_restores(&zst_of(&t.path(rel)), data);
    }
}

#[test]
fn a_second_signal_stops_a_large_file_at_level_19_at_once() {
    // libzstd compresses a large file in jobs of 32 MiB at level 19, each many seconds of
    // one core's work; the second request must not wait for the jobs in flight to end
    // (RELIABILITY #16). No zstd CLI needed: nothing is published.
    let t = TestTree::new().file("big.log", &text_bytes(64 << 20, 19));
    let mut cmd = filepipe(&[
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("zstd"),
        s("--level"),
        s("19"),
        s("--jobs"),
        s("2"),
    ]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = Started::new(cmd);
    wait_until(Duration::from_secs(60), "the temp file", || {
        !temps_in_progress(&t.root()).is_empty()
    });
    // Let libzstd's jobs start (the first is handed to a worker once 32 MiB are read).
    std::thread::sleep(Duration::from_millis(500));
    // A second request (another signal: the same one at once would count once).
    common::cluster::signal_pid(child.id(), rustix::process::Signal::INT);
    std::thread::sleep(Duration::from_millis(50));
    common::cluster::signal_pid(child.id(), rustix::process::Signal::TERM);
    let asked = std::time::Instant::now();
    child.finish(Duration::from_secs(120)).code(130);
    // Without the check, the run went on for the rest of the file: some 50 s on a quiet
    // machine. With it, 0.4 s quiet, but each call waits for a job's next 512 KiB at level 19,
    // and on a loaded CI machine (other tests, two cores) that took 6.2 s once: the bound
    // lies between, with room on both sides.
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "the run went on for {took:?} after the second signal"
    );
    assert!(!t.path("big.log.zst").exists());
    assert!(temps_under(t.dir.path()).is_empty());
}
