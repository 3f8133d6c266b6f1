//! Test helpers: a temp tree builder and a runner for the real `filepipe` binary.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test: the one cargo built, or `FILEPIPE_TEST_BIN` (to show that a
/// regression test fails against an older build).
pub fn bin() -> String {
    std::env::var("FILEPIPE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_filepipe").into())
}

/// A temp directory with an input tree under `in/` and room for outputs beside it.
pub struct TestTree {
    pub dir: tempfile::TempDir,
}

impl TestTree {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("in")).unwrap();
        TestTree { dir }
    }

    /// The input root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("in")
    }

    /// A path beside the input root (for outputs, manifests, logs).
    pub fn side(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates a file (and its parent dirs) under the root; `rel` may hold any bytes.
    pub fn file(self, rel: impl AsRef<[u8]>, content: &[u8]) -> Self {
        let p = self.root().join(OsStr::from_bytes(rel.as_ref()));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        self
    }

    pub fn dir(self, rel: &str) -> Self {
        fs::create_dir_all(self.root().join(rel)).unwrap();
        self
    }

    pub fn symlink(self, target: impl AsRef<Path>, rel: &str) -> Self {
        let p = self.root().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
        self
    }

    pub fn path(&self, rel: impl AsRef<[u8]>) -> PathBuf {
        self.root().join(OsStr::from_bytes(rel.as_ref()))
    }

    /// Makes the whole temp dir reachable by an unprivileged user (tempdirs are 0700).
    pub fn open_to_all(&self) {
        fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        for e in walkdir::WalkDir::new(self.dir.path()).follow_links(false) {
            let e = e.unwrap();
            if e.file_type().is_symlink() {
                continue;
            }
            let mode = if e.file_type().is_dir() { 0o777 } else { 0o666 };
            fs::set_permissions(e.path(), fs::Permissions::from_mode(mode)).unwrap();
        }
    }
}

/// `filepipe ARGS` with the given working directory.
pub fn filepipe(args: &[&OsStr]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).env_remove("RUST_LOG");
    c
}

/// The binary as `nobody` when the tests run as root (as CI does), where every permission
/// check would pass; as the current user otherwise.
pub fn unprivileged() -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin());
        c
    } else {
        Command::new(bin())
    }
}

/// The `--json` summary of a run that exited with `code` (stderr shown if it did not).
pub fn summary_of(out: &Output, code: i32) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON summary on stdout")
}

/// Runs to completion, with a generous timeout (a hang is a test failure, not a stuck CI).
pub fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn filepipe");
    wait_output(child, Duration::from_secs(120))
}

/// Waits for `child` to exit, reading its output meanwhile (a child blocked on a full pipe
/// would never exit); kills it and panics after `limit`.
pub fn wait_output(child: Child, limit: Duration) -> Output {
    let pid = rustix::process::Pid::from_child(&child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let out = rx.recv().unwrap().unwrap();
            panic!(
                "timed out; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Runs an external checker (gzip, sha256sum, ...) and returns its output.
pub fn tool(cmd: &str, args: &[&OsStr], cwd: &Path) -> Output {
    Command::new(cmd)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

/// The failure log as parsed JSON records.
pub fn failure_log(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Records of the failure log with the given `error` kind.
pub fn records_of<'a>(log: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    log.iter().filter(|r| r["error"] == kind).collect()
}

/// Every file under `dir` whose name is a filepipe temp.
pub fn temps_under(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().as_bytes();
            n.starts_with(b".filepipe.") && n.ends_with(b".tmp")
        })
        .map(|e| e.into_path())
        .collect()
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Deterministic, moderately compressible bytes (text-like with varying numbers).
pub fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 100);
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "filepipe",
        "error",
        "ok",
        "GET",
        "/srv/data",
    ];
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let w = words[(x >> 33) as usize % words.len()];
        out.extend_from_slice(format!("{} {w} {}\n", x >> 40, (x >> 20) & 0xffff).as_bytes());
    }
    out.truncate(len);
    out
}

/// Deterministic incompressible bytes.
pub fn noise_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

/// Waits until `cond` holds, polling; panics after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `filepipe watch`; killed if the test ends without stopping it.
pub struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    pub fn start(t: &TestTree, extra: &[&str]) -> Daemon {
        let mut cmd = filepipe(&[OsStr::new("watch"), t.root().as_os_str()]);
        if !extra.contains(&"--state") {
            cmd.args(["--state"]).arg(t.side("state"));
        }
        cmd.arg("--json");
        if !extra.contains(&"--settle") {
            cmd.args(["--settle", "150"]);
        }
        cmd.args(extra);
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Daemon { child: Some(child) }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(self.child.as_ref().unwrap());
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// SIGTERM, then the exit status, stdout and stderr.
    pub fn stop(mut self) -> Output {
        self.signal(rustix::process::Signal::TERM);
        wait_output(self.child.take().unwrap(), Duration::from_secs(60))
    }

    pub fn kill(mut self) {
        self.signal(rustix::process::Signal::KILL);
        wait_output(self.child.take().unwrap(), Duration::from_secs(10));
    }

    pub fn wait(mut self) -> Output {
        wait_output(self.child.take().unwrap(), Duration::from_secs(60))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
