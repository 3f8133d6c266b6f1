//! Test helpers: a temp tree builder and a runner for the real `filepipe` binary.
#![allow(dead_code)]

#[cfg(feature = "cluster")]
pub mod cluster;
pub mod nats;
pub mod strace;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
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

    /// A tree in a temp directory under `parent` (another file system).
    pub fn new_in(parent: &Path) -> Self {
        let dir = tempfile::tempdir_in(parent).expect("tempdir");
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
        for e in walkdir::WalkDir::new(self.dir.path()).follow_links(false) {
            let e = e.unwrap();
            if e.file_type().is_symlink() {
                continue;
            }
            let mode = if e.file_type().is_dir() { 0o777 } else { 0o666 };
            fs::set_permissions(e.path(), fs::Permissions::from_mode(mode)).unwrap();
        }
        // The top one sticky, as /tmp: it holds the state directories beside the tree, and a
        // state directory another user may rename is refused.
        fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
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

/// How long a run may take before it is killed and the test fails (a hang is a test failure,
/// not a stuck CI).
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// A finished run, checked fd-style: `run(cmd).code(1)`, `run(cmd).success().summary()`. A
/// failed check shows the command line, the exit status, stdout and stderr.
pub struct Run {
    /// The command line (`{:?}` of the command: environment changes, program, arguments).
    command: String,
    /// What else a failure message should say (see `context`).
    context: String,
    output: Output,
}

impl Run {
    /// Says `what` too in every failure message: which case of a loop this run is, where the
    /// command line does not tell.
    pub fn context(mut self, what: impl std::fmt::Display) -> Run {
        self.context = what.to_string();
        self
    }

    /// Asserts that the run exited 0.
    #[track_caller]
    pub fn success(&self) -> &Self {
        if !self.output.status.success() {
            self.fail("expected success (exit code 0)");
        }
        self
    }

    /// Asserts that the run exited with `code`.
    #[track_caller]
    pub fn code(&self, code: i32) -> &Self {
        if self.output.status.code() != Some(code) {
            self.fail(&format!("expected exit code {code}"));
        }
        self
    }

    /// Asserts that the run did not exit 0: another exit code, or killed by a signal.
    #[track_caller]
    pub fn failure(&self) -> &Self {
        if self.output.status.success() {
            self.fail("expected a failure (an exit code other than 0, or a signal)");
        }
        self
    }

    /// Asserts that the run was killed by signal `sig`.
    #[track_caller]
    pub fn signal(&self, sig: i32) -> &Self {
        use std::os::unix::process::ExitStatusExt;
        if self.output.status.signal() != Some(sig) {
            self.fail(&format!("expected death by signal {sig}"));
        }
        self
    }

    /// The `--json` summary on stdout, parsed (check the exit code first: `.code(n).summary()`).
    #[track_caller]
    pub fn summary(&self) -> serde_json::Value {
        serde_json::from_slice(&self.output.stdout)
            .unwrap_or_else(|e| self.fail(&format!("expected a JSON summary on stdout: {e}")))
    }

    /// Stdout, lossily decoded.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// Stderr, lossily decoded.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// The raw output: status, stdout and stderr bytes.
    pub fn output(&self) -> &Output {
        &self.output
    }

    /// Panics with `what` and everything there is to know about the run.
    #[track_caller]
    fn fail(&self, what: &str) -> ! {
        let context = if self.context.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.context)
        };
        panic!("{what}{context}\n{}", describe(&self.command, &self.output))
    }
}

/// The command line, the exit status, stdout and stderr, for a failure message.
fn describe(command: &str, out: &Output) -> String {
    format!(
        "command: {command}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A process still running, started from a command that is remembered for failure messages.
/// Derefs to its `Child` (its id and stdin, for signals and input); `finish` waits for it.
/// One dropped unfinished (a test that panicked) is killed, so it does not outlive the test.
pub struct Started {
    child: Option<Child>,
    command: String,
}

impl Started {
    /// Spawns `cmd` as it is set up (pipe its stdout and stderr to see them in the `Run`).
    pub fn new(mut cmd: Command) -> Started {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Started {
            child: Some(child),
            command: format!("{cmd:?}"),
        }
    }

    /// Waits for it to exit (see `wait_output`); kills it and panics after `limit`.
    #[track_caller]
    pub fn finish(mut self, limit: Duration) -> Run {
        let child = self.child.take().expect("finished once");
        match wait_or_kill(child, limit) {
            Ok(output) => Run {
                command: std::mem::take(&mut self.command),
                context: String::new(),
                output,
            },
            Err(out) => panic!(
                "timed out after {limit:?} (killed)\n{}",
                describe(&self.command, &out)
            ),
        }
    }
}

impl std::ops::Deref for Started {
    type Target = Child;

    fn deref(&self) -> &Child {
        self.child.as_ref().expect("not finished")
    }
}

impl std::ops::DerefMut for Started {
    fn deref_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("not finished")
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `filepipe ARGS` with its stdout and stderr piped (wait for it with `finish`).
pub fn spawn(args: &[&OsStr]) -> Started {
    let mut cmd = filepipe(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    Started::new(cmd)
}

/// Whether `prlimit` is there to lower a limit; if not, says the test skipped.
pub fn have_prlimit() -> bool {
    let there = Command::new("prlimit").arg("-V").output().is_ok();
    if !there {
        eprintln!("SKIPPED: no prlimit to lower the open-file limit");
    }
    there
}

/// Runs to completion with no input, within `TIMEOUT`.
#[track_caller]
pub fn run(mut cmd: Command) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Started::new(cmd).finish(TIMEOUT)
}

/// Waits for `child` to exit, reading its output meanwhile (a child blocked on a full pipe
/// would never exit); kills it and panics after `limit`.
pub fn wait_output(child: Child, limit: Duration) -> Output {
    wait_or_kill(child, limit).unwrap_or_else(|out| {
        panic!(
            "timed out; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits for `child` to exit, reading its output meanwhile; after `limit`, kills it and
/// returns what it wrote as the error.
fn wait_or_kill(child: Child, limit: Duration) -> Result<Output, Output> {
    let pid = rustix::process::Pid::from_child(&child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out.unwrap()),
        Err(_) => {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            Err(rx.recv().unwrap().unwrap())
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

/// The failure log's per-file records, parsed (not the records that mark each run's start).
pub fn failure_log(path: &Path) -> Vec<serde_json::Value> {
    failure_log_all(path)
        .into_iter()
        .filter(|r| r["status"] != "start")
        .collect()
}

/// Every record of the failure log, parsed.
pub fn failure_log_all(path: &Path) -> Vec<serde_json::Value> {
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

/// A run with `--out` or `--move-source` (`how`) that refused to write into an existing mirror
/// directory `mirror`: the file failed (`--out`: exit 1) or its input was kept (exit 0),
/// nothing went into `mirror`, and the failure log at `log` holds one `unsafe-output-path`
/// record whose message says `says`.
#[allow(dead_code)]
pub fn assert_mirror_refused(out: &Run, how: &str, mirror: &Path, log: &Path, says: &str) {
    if how == "--out" {
        out.code(1);
    } else {
        out.success();
    }
    let left: Vec<_> = fs::read_dir(mirror).unwrap().collect();
    assert!(left.is_empty(), "{how}: written into it: {left:?}");
    let records = failure_log(log);
    let refused = records_of(&records, "unsafe-output-path");
    assert_eq!(refused.len(), 1, "{how}: {records:?}");
    let message = refused[0]["message"].as_str().unwrap();
    assert!(message.contains(says), "{how}: {refused:?}");
}

/// `cp FLAG FROM TO` (`-a` a tree, `-p` a file with its mode and dates), which must succeed.
pub fn cp(flag: &str, from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg(flag)
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "cp {flag} {} {}",
        from.display(),
        to.display()
    );
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

/// This process's umask (the binary it starts inherits it), read from /proc without changing
/// it; `0` where /proc does not say, as filepipe takes it.
pub fn umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0)
}

/// `args` run as the user `uid` with the group `gid` and no other (`setpriv`, as root): what
/// another user may do.
pub fn as_user(uid: u32, gid: u32, args: &[&OsStr]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("setpriv {args:?}: {e}"))
}

/// Owner, group and mode (with the sticky, set-user-ID and set-group-ID bits) of `path`.
pub fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
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

/// Whether `pid` has a descriptor open on `path`.
#[allow(dead_code)]
pub fn opens(pid: u32, path: &Path) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .any(|fd| fs::read_link(fd.path()).is_ok_and(|p| p == path))
        })
        .unwrap_or(false)
}

/// Waits until `cond` holds, polling; panics after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `filepipe watch`, listening to its sd_notify messages; killed if the test ends
/// without stopping it.
pub struct Daemon {
    child: Option<Started>,
    /// What it said on its notify socket (READY=1, STATUS=...).
    pub notes: Notifications,
}

impl Daemon {
    /// `filepipe watch ROOT --json --settle 150 EXTRA` with `--state` beside the tree (unless
    /// EXTRA has one), not yet ready: see `ready`.
    pub fn start(t: &TestTree, extra: &[&str]) -> Daemon {
        Daemon::spawn(t, extra, Stdio::piped())
    }

    /// As `ready`, its stderr written to the file `log` as it goes, for a test to wait on
    /// what it says while it runs (`Run::stderr` of `stop` is then empty).
    pub fn ready_logging_to(t: &TestTree, extra: &[&str], log: &Path) -> Daemon {
        let file = std::fs::File::create(log).unwrap();
        let mut d = Daemon::spawn(t, extra, Stdio::from(file));
        d.wait_ready();
        d
    }

    /// As `ready`, run as `nobody` when the tests run as root (`unprivileged`): the temp
    /// tree is opened to all first.
    pub fn ready_unprivileged(t: &TestTree, extra: &[&str]) -> Daemon {
        t.open_to_all();
        let mut cmd = unprivileged();
        cmd.env_remove("RUST_LOG");
        let mut d = Daemon::spawn_with(cmd, t, extra, Stdio::piped());
        d.wait_ready();
        d
    }

    /// As `ready`, run through `cmd`: a command line that ends with filepipe's binary (under
    /// `prlimit`, say).
    pub fn ready_through(mut cmd: Command, t: &TestTree, extra: &[&str]) -> Daemon {
        cmd.env_remove("RUST_LOG");
        let mut d = Daemon::spawn_with(cmd, t, extra, Stdio::piped());
        d.wait_ready();
        d
    }

    fn spawn(t: &TestTree, extra: &[&str], stderr: Stdio) -> Daemon {
        Daemon::spawn_with(filepipe(&[]), t, extra, stderr)
    }

    fn spawn_with(mut cmd: Command, t: &TestTree, extra: &[&str], stderr: Stdio) -> Daemon {
        static SOCKETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SOCKETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = t.side(&format!("notify-{n}.sock"));
        let notes = Notifications::listen(&socket);
        cmd.args([OsStr::new("watch"), t.root().as_os_str()]);
        if !extra.contains(&"--state") {
            cmd.args(["--state"]).arg(t.side("state"));
        }
        cmd.arg("--json");
        if !extra.contains(&"--settle") {
            cmd.args(["--settle", "150"]);
        }
        cmd.args(extra)
            .env("NOTIFY_SOCKET", &socket)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        cmd.stdout(Stdio::piped()).stderr(stderr);
        Daemon {
            child: Some(Started::new(cmd)),
            notes,
        }
    }

    /// Starts the daemon and waits until it is ready: its watches are in place and its
    /// initial scan is queued (READY=1), so whatever the test does next is seen.
    pub fn ready(t: &TestTree, extra: &[&str]) -> Daemon {
        let mut d = Daemon::start(t, extra);
        d.wait_ready();
        d
    }

    /// Waits for READY=1 (or for the daemon to exit, which fails the test).
    pub fn wait_ready(&mut self) {
        let limit = Instant::now() + Duration::from_secs(60);
        while !self.notes.has("READY=1") {
            assert!(self.running(), "the daemon exited before READY=1");
            assert!(Instant::now() < limit, "timed out waiting for READY=1");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the daemon says it is idle (nothing queued, in flight or waiting to retry)
    /// with `done` files done, and returns that STATUS line's counts.
    pub fn wait_idle(&self, done: u64) -> Status {
        self.wait_idle_where(&format!("{done} done"), |s| s.done == done)
    }

    /// Waits for an idle STATUS that `wanted` (`what` says what, in the failure message).
    pub fn wait_idle_where(&self, what: &str, wanted: impl Fn(&Status) -> bool) -> Status {
        let limit = Instant::now() + Duration::from_secs(90);
        loop {
            let last = self.notes.last_status();
            if let Some(s) = last.filter(|s| s.idle() && wanted(s)) {
                return s;
            }
            assert!(
                Instant::now() < limit,
                "timed out waiting for an idle STATUS with {what}; last: {last:?}"
            );
            // A daemon that died (its process a zombie, not yet waited for) never gets there:
            // said at once, not after the time limit.
            let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            assert!(
                state != Some('Z'),
                "the daemon exited while waiting for an idle STATUS with {what}; last: {last:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether it has not exited (yet).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_none()))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(self.child.as_ref().unwrap());
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// SIGTERM, then the finished run: exit status, stdout and stderr.
    pub fn stop(mut self) -> Run {
        self.signal(rustix::process::Signal::TERM);
        self.child.take().unwrap().finish(Duration::from_secs(60))
    }

    pub fn kill(mut self) {
        self.signal(rustix::process::Signal::KILL);
        self.child.take().unwrap().finish(Duration::from_secs(10));
    }

    /// The finished run, once it exits by itself.
    pub fn wait(mut self) -> Run {
        self.child.take().unwrap().finish(Duration::from_secs(60))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Started's own drop kills it.
        self.child.take();
    }
}

/// Datagrams received on a fake notify socket, with their arrival times.
pub struct Notifications {
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Notifications {
    pub fn listen(path: &Path) -> Notifications {
        let sock = UnixDatagram::bind(path).unwrap();
        // A daemon run as another user (`Daemon::ready_unprivileged`) may send to it too.
        fs::set_permissions(path, fs::Permissions::from_mode(0o777)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let got: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = Arc::clone(&got);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock().unwrap().push((Instant::now(), msg));
                }
                if Arc::strong_count(&sink) == 1 {
                    return;
                }
            }
        });
        Notifications { got }
    }

    /// Every line received so far ("READY=1", "STATUS=...").
    pub fn lines(&self) -> Vec<(Instant, String)> {
        let got = self.got.lock().unwrap();
        got.iter()
            .flat_map(|(t, m)| m.lines().map(move |l| (*t, l.to_string())))
            .collect()
    }

    pub fn has(&self, prefix: &str) -> bool {
        self.lines().iter().any(|(_, l)| l.starts_with(prefix))
    }

    /// The counts of the last STATUS= line.
    pub fn last_status(&self) -> Option<Status> {
        self.lines()
            .iter()
            .rev()
            .find_map(|(_, l)| l.strip_prefix("STATUS=").and_then(Status::parse))
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.lines()
            .iter()
            .filter(|(_, l)| l.starts_with(prefix))
            .count()
    }
}

/// The counts of a STATUS= line: "1 pipeline: queued 0, in flight 0, retrying 0, done 3, ...".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub queued: u64,
    pub in_flight: u64,
    pub retrying: u64,
    pub done: u64,
    pub skipped: u64,
    pub failed: u64,
}

impl Status {
    fn parse(line: &str) -> Option<Status> {
        let (_, counts) = line.split_once(": ")?;
        let get = |name: &str| -> Option<u64> {
            counts
                .split(", ")
                .find_map(|c| c.strip_prefix(name)?.trim().parse().ok())
        };
        Some(Status {
            queued: get("queued ")?,
            in_flight: get("in flight ")?,
            retrying: get("retrying ")?,
            done: get("done ")?,
            skipped: get("skipped ")?,
            failed: get("failed ")?,
        })
    }

    /// Nothing queued, in flight or waiting to be retried.
    pub fn idle(&self) -> bool {
        self.queued == 0 && self.in_flight == 0 && self.retrying == 0
    }
}

/// A file mapped shared and writable with its descriptor already closed, as a writer that
/// maps and closes does: writes through it reach the file with no event, and its close event
/// waits for the unmap (on drop).
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

impl SharedMap {
    /// Maps the first `len` bytes of the existing file `path`.
    pub fn open(path: &Path, len: usize) -> SharedMap {
        use std::os::fd::AsRawFd;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        // SAFETY: a fresh shared mapping of `len` bytes of an open file; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        SharedMap {
            ptr: ptr.cast(),
            len,
        }
    }

    /// Writes `bytes` at `offset` through the mapping.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: within the mapping, which lives as long as self.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) };
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, not used after this.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Temps being written under `dir`: filepipe's named temps, and anonymous (`O_TMPFILE`) files
/// some process has open there, as `/proc/PID/fd/N` (a path that reaches the file: `stat` it
/// for its mode).
pub fn temps_in_progress(dir: &Path) -> Vec<PathBuf> {
    let mut found = temps_under(dir);
    // A named temp born anonymous still reads as DIR/#INODE (deleted) through the descriptor
    // it was made with: counted once, by its name.
    let named: std::collections::HashSet<u64> = found
        .iter()
        .filter_map(|p| fs::symlink_metadata(p).ok())
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .collect();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.filter_map(Result::ok) {
        if !p.file_name().as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            // An anonymous file reads as DIR/#INODE (deleted).
            let t = target.as_os_str().as_bytes();
            let anonymous = t.ends_with(b" (deleted)")
                && target.parent().is_some_and(|d| d.starts_with(dir))
                && target
                    .file_name()
                    .is_some_and(|n| n.as_bytes().starts_with(b"#"));
            let inode = target
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.trim_start_matches('#').split(' ').next())
                .and_then(|n| n.parse::<u64>().ok());
            if anonymous && !inode.is_some_and(|i| named.contains(&i)) {
                found.push(fd.path());
            }
        }
    }
    found
}

/// The value of the `user.filepipe.temp` mark filepipe gives its temps on this host: `2:` and
/// the first 8 bytes, in hex, of SHA-256 over "filepipe temp host", NUL, the machine id, NUL
/// and the host name (the contract `fsio::output` writes and its sweep checks).
pub fn temp_mark() -> Vec<u8> {
    use sha2::Digest as _;
    let machine = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| fs::read(p).ok())
        .unwrap_or_default();
    let host = rustix::system::uname();
    let mut h = sha2::Sha256::new();
    h.update(b"filepipe temp host\0");
    h.update(machine.trim_ascii());
    h.update(b"\0");
    h.update(host.nodename().to_bytes());
    let id: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("2:{id}").into_bytes()
}

/// `checker -c manifest` (sha256sum, b3sum, sha512sum) passes, run in `dir` (the manifest's
/// paths are relative to it), and checked `n` files.
pub fn assert_check(checker: &str, manifest: &Path, dir: &Path, n: usize) {
    let out = tool(checker, &[OsStr::new("-c"), manifest.as_os_str()], dir);
    assert!(
        out.status.success(),
        "{checker} -c {}: {}{}",
        manifest.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| l.ends_with(b": OK"))
        .count();
    assert_eq!(ok, n, "{checker} -c {}: {:?}", manifest.display(), out);
}

/// A bind mount made for a test, unmounted when dropped (before its directory is removed).
pub struct BindMount(PathBuf);

impl BindMount {
    /// Each `(from, at)` bound, or `None` (saying why) if one cannot be.
    pub fn all(pairs: &[(&Path, &Path)]) -> Option<Vec<BindMount>> {
        pairs
            .iter()
            .map(|(from, at)| BindMount::new(from, at))
            .collect()
    }

    /// A bind mount the test made itself at `at`, to be unmounted when dropped.
    pub fn existing(at: &Path) -> BindMount {
        BindMount(at.to_path_buf())
    }

    /// Binds `from` at `at` (made if missing), or `None`, saying why, where mount(2) is not
    /// permitted.
    pub fn new(from: &Path, at: &Path) -> Option<BindMount> {
        fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(BindMount(at.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: mount --bind not permitted: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: no mount(8): {e}");
                None
            }
        }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The names a manifest at `path` lists (its lines' names as written, escapes and all), in
/// its order; none if it does not exist.
pub fn manifest_names(path: &Path) -> Vec<String> {
    let listed = fs::read_to_string(path).unwrap_or_default();
    (listed.lines())
        .filter_map(|l| l.split_once("  "))
        .map(|(_, n)| n.to_string())
        .collect()
}

/// `filepipe COMMAND ROOT ARGS... --state STATE` (`args`: the command, then the rest), with
/// the state on a 150 KiB tmpfs mounted in a private user and mount namespace, to completion;
/// `None` (said: skipped) where no tmpfs can be mounted so.
#[allow(dead_code)]
pub fn on_a_small_tmpfs_state(t: &TestTree, args: &[&str]) -> Option<Run> {
    let state = t.side("state");
    fs::create_dir(&state).unwrap();
    // The tmpfs lives in the namespace only: what the state holds at the end is copied to
    // `state-after` beside it, for the test to read.
    let after = t.side("state-after");
    fs::create_dir(&after).unwrap();
    let script = r#"mount -t tmpfs -o size=150k,mode=0700 none "$1" || exit 99
state=$1 after=$2 bin=$3 command=$4 root=$5; shift 5
"$bin" "$command" "$root" --state "$state" "$@"
rc=$?
cp -r "$state"/. "$after"/ || exit 98
exit $rc"#;
    let mut cmd = Command::new("unshare");
    cmd.args(["-rm", "sh", "-c", script, "sh"])
        .arg(&state)
        .arg(&after)
        .arg(bin())
        .arg(args[0])
        .arg(t.root())
        .args(&args[1..]);
    let out = run(cmd);
    if out.output().status.code() == Some(99) {
        eprintln!("SKIPPED: could not mount a tmpfs: {}", out.stderr());
        return None;
    }
    Some(out)
}

/// After a run stopped by a full state disk (`on_a_small_tmpfs_state`): the summary's
/// `unrecorded` is exactly what the state copied to `state-after` lacks of its `done` files,
/// and the disk did fill before every file was recorded.
pub fn assert_unrecorded_is_what_the_state_lacks(t: &TestTree, sum: &serde_json::Value) {
    let conn = rusqlite::Connection::open(t.side("state-after").join("filepipe.sqlite")).unwrap();
    let recorded: u64 = conn
        .query_row(
            "SELECT COUNT(DISTINCT path) FROM files WHERE status = 'done'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let done = sum["done"].as_u64().unwrap();
    let unrecorded = sum["unrecorded"].as_u64().unwrap_or(0);
    assert!(
        recorded < done,
        "the disk filled before every file was recorded: {sum}"
    );
    assert_eq!(recorded, done - unrecorded, "{sum}");
}

/// A bindfs (FUSE) view of `back` at `view` (both made here), with bindfs's `options`,
/// unmounted when the guard is dropped; `None`, said, where there is no bindfs.
pub fn bindfs(back: &Path, view: &Path, options: &[&str]) -> Option<Unmount> {
    if Command::new("bindfs").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no bindfs");
        return None;
    }
    fs::create_dir(back).unwrap();
    fs::create_dir(view).unwrap();
    let st = Command::new("bindfs")
        .args(options)
        .arg(back)
        .arg(view)
        .status()
        .unwrap();
    assert!(st.success(), "bindfs");
    Some(Unmount(view.to_path_buf()))
}

/// A mount point, unmounted (lazily) when dropped.
pub struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
