//! Cluster mode's test helpers: coordinators (`batch --queue`) over a test tree, and the
//! nats-server and real `filepipe worker` processes of `nats`.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::{filepipe, run, text_bytes, tool, wait_until, Run, Started, TestTree};

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

// For the test files that take every cluster helper from here; not all use both.
#[allow(unused_imports)]
pub use super::nats::{Nats, Worker};

/// `filepipe batch ROOT --queue URL --json EXTRA`, to completion.
pub fn coordinate(nats: &Nats, root: &Path, extra: &[&str]) -> Run {
    let mut cmd = filepipe(&[s("batch"), root.as_os_str(), s("--queue"), s(&nats.url)]);
    cmd.arg("--json")
        .args(extra)
        .env("XDG_STATE_HOME", xdg(root));
    run(cmd)
}

/// The state directory's parent for a coordinator of `root` (its run files live there): the
/// test's own, beside the tree.
pub fn xdg(root: &Path) -> PathBuf {
    root.parent().unwrap().join("xdg")
}

/// `filepipe batch ROOT --queue URL --root-name tree --json EXTRA`, started (its output piped).
pub fn start_coordinator(nats: &Nats, root: &Path, extra: &[&str]) -> Started {
    let mut cmd = filepipe(&[s("batch"), root.as_os_str(), s("--queue"), s(&nats.url)]);
    cmd.args(["--root-name", "tree", "--json"])
        .args(extra)
        .env("XDG_STATE_HOME", xdg(root))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Started::new(cmd)
}

/// The `files=N` of the first line of a coordinator's log `err` that says `what`.
pub fn logged_files(err: &str, what: &str) -> u64 {
    err.lines()
        .find(|l| l.contains(what))
        .and_then(|l| {
            l.split("files=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {what:?} line: {err}"))
}

/// `start_coordinator` with `-v` and its log in a file beside the tree, once the log says
/// `line` (how far it got); returns it running, and the log's path.
pub fn start_coordinator_logged(
    nats: &Nats,
    t: &TestTree,
    extra: &[&str],
    line: &str,
) -> (Started, PathBuf) {
    let log = t.side("coordinator.log");
    let mut cmd = filepipe(&[s("batch"), t.root().as_os_str(), s("--queue"), s(&nats.url)]);
    cmd.args(["--root-name", "tree", "--json", "-v"])
        .args(extra)
        .env("XDG_STATE_HOME", xdg(&t.root()))
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).unwrap());
    let started = Started::new(cmd);
    wait_until(Duration::from_secs(60), line, || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains(line))
    });
    (started, log)
}

/// A tree of `files` text files in nested directories, and `large` files of 6 MiB.
pub fn tree(files: usize, large: usize) -> TestTree {
    let mut t = TestTree::new();
    for i in 0..files {
        t = t.file(
            format!("d{}/e{}/f{i}.log", i % 13, i % 3),
            &text_bytes(200 + (i * 97) % 20_000, i as u64),
        );
    }
    for i in 0..large {
        t = t.file(
            format!("big/b{i}.bin"),
            &text_bytes(6 << 20, 1000 + i as u64),
        );
    }
    t
}

/// Every .gz under `dir` restores its input, at the same place under `inputs`, exactly.
pub fn assert_outputs_of(dir: &Path, inputs: &Path) -> usize {
    let mut n = 0;
    for e in walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
    {
        let p = e.path();
        if p.extension() != Some(OsStr::new("gz")) {
            continue;
        }
        n += 1;
        let back = tool("gunzip", &[s("-c"), p.as_os_str()], dir);
        assert!(back.status.success(), "gunzip -c {}: {back:?}", p.display());
        let input = inputs.join(p.strip_prefix(dir).unwrap().with_extension(""));
        assert_eq!(
            back.stdout,
            fs::read(&input).unwrap(),
            "{}",
            input.display()
        );
    }
    n
}

/// Every output passes `gzip -t` and restores its input; the manifest passes `sha256sum -c`
/// (`t.side("SUMS")`) from the root; `files` in all.
pub fn assert_results(t: &TestTree, files: usize) {
    let gz: Vec<PathBuf> = walkdir::WalkDir::new(t.root())
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.into_path())
        .filter(|p| p.extension() == Some(OsStr::new("gz")))
        .collect();
    assert_eq!(gz.len(), files);
    let mut args: Vec<&OsStr> = vec![s("-t")];
    args.extend(gz.iter().map(|p| p.as_os_str()));
    let out = tool("gzip", &args, &t.root());
    assert!(out.status.success(), "gzip -t: {out:?}");
    assert_eq!(assert_outputs_of(&t.root(), &t.root()), files);
    let out = tool(
        "sha256sum",
        &[s("-c"), t.side("SUMS").as_os_str()],
        &t.root(),
    );
    assert!(out.status.success(), "sha256sum -c: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        files,
        "one manifest line a file"
    );
}

/// The jobs stream's message count and the jobs in flight, from `filepipe status --queue`.
pub fn queue_counts(nats: &Nats) -> (u64, u64) {
    let text = run(filepipe(&[s("status"), s("--queue"), s(&nats.url)]))
        .success()
        .stdout();
    // Before any coordinator made the streams: none queued (status only looks).
    if text.contains("no filepipe streams on this server") {
        return (0, 0);
    }
    let number = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(u64::MAX)
    };
    (number("jobs\t"), number("in flight\t"))
}

/// A version 4 (binary) job message of `run` for root `root`, written here by hand from the
/// layout in src/cluster/wire4.rs rather than by filepipe's own encoder (a second reading of
/// that layout): op code `op` (1 gzip, 2 zstd, 3 sha256, 4 sha512, 5 blake3), `level`, force,
/// no output root, each path's bytes (no size, no stamp).
pub fn binary_job(run: &str, root: &str, op: u8, level: u8, paths: &[&[u8]]) -> Vec<u8> {
    let mut m = vec![4, b'J'];
    for name in [run, root, ""] {
        m.push(name.len() as u8);
        m.extend_from_slice(name.as_bytes());
    }
    // The op, no list of ops, the level, flags: force.
    m.extend_from_slice(&[op, 0, level, 1]);
    m.extend_from_slice(&(paths.len() as u16).to_le_bytes());
    for p in paths {
        m.extend_from_slice(&(p.len() as u32).to_le_bytes());
        m.extend_from_slice(p);
        m.push(0);
    }
    m
}

/// The payload of `run`'s last outcome message in the outcome stream, if it has one.
pub fn last_outcome_message(nats: &Nats, run: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let got = nats.ask(
        "$JS.API.STREAM.MSG.GET.FILEPIPE_OUTCOMES",
        format!(r#"{{"last_by_subj":"filepipe.outcomes.{run}"}}"#).as_bytes(),
    );
    let data = got["message"]["data"].as_str()?;
    Some(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
    )
}

/// The inputs (not `.gz`) left under `dir`.
pub fn inputs_left(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.path().extension() != Some(OsStr::new("gz")))
        .count()
}

/// Sends `sig` to process `pid` (a worker paused mid-job with SIGSTOP, and let go).
pub fn signal_pid(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

/// `filepipe batch ROOT --op gzip`, locally: the outputs an earlier delivery (or run) made.
pub fn gzip_here(root: &Path) {
    run(filepipe(&[
        s("batch"),
        root.as_os_str(),
        s("--op"),
        s("gzip"),
    ]))
    .success();
}
