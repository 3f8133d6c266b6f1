//! Cluster mode's test helpers: a `nats-server` of the test's own on a free port, real
//! `filepipe worker` processes, and coordinators (`batch --queue`) over a test tree.

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{filepipe, run, text_bytes, wait_until, Notifications, Run, Started, TestTree};

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

/// A JetStream server of our own, stopped when dropped.
pub struct Nats {
    child: Child,
    pub url: String,
    _store: tempfile::TempDir,
}

impl Nats {
    /// Starts one, ready for clients (its port answers with INFO); `None`, saying so, where
    /// there is no nats-server.
    pub fn start() -> Option<Nats> {
        Self::start_with(&[], "nats")
    }

    /// `start`, with more server arguments (TLS, users), its URL with `scheme`.
    pub fn start_with(extra: &[&OsStr], scheme: &str) -> Option<Nats> {
        if Command::new("nats-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: no nats-server (apt-get install nats-server)");
            return None;
        }
        let store = tempfile::tempdir().unwrap();
        // The server picks its own port (-1) and says which: a port found free here could be
        // taken by another test's server before this one binds it.
        let (child, port) = Self::spawn_with("-1", store.path(), extra);
        let url = format!("{scheme}://127.0.0.1:{port}");
        Some(Nats {
            child,
            url,
            _store: store,
        })
    }

    /// Starts a server on `port` ("-1": any) and returns it once it is ready for clients
    /// (its log says so), with the port it listens on.
    pub fn spawn(port: &str, store: &Path) -> (Child, u16) {
        Self::spawn_with(port, store, &[])
    }

    pub fn spawn_with(port: &str, store: &Path, extra: &[&OsStr]) -> (Child, u16) {
        let mut child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", port, "-sd"])
            .arg(store)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the log for ever, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut port = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.split("Listening for client connections on ").nth(1) {
                    port = at
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.trim().parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("nats-server did not say it is ready")
            .expect("nats-server did not say its port");
        (child, port)
    }

    /// Stops the server (SIGTERM, as systemd would) and starts it again on the same port and
    /// store, after `down`.
    pub fn restart(&mut self, down: Duration) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let _ = self.child.wait();
        std::thread::sleep(down);
        let port = self.url.rsplit(':').next().unwrap().to_owned();
        self.child = Self::spawn(&port, self._store.path()).0;
    }

    /// Publishes `payload` on `subject` over the plain NATS protocol, as anyone allowed to
    /// publish could: a stream whose subjects match stores it.
    pub fn publish_raw(&self, subject: &str, payload: &[u8]) {
        let addr = self.url.trim_start_matches("nats://");
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("INFO"), "{line}");
        write!(
            stream,
            "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nPUB {subject} {}\r\n",
            payload.len()
        )
        .unwrap();
        stream.write_all(payload).unwrap();
        stream.write_all(b"\r\nPING\r\n").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            assert!(!line.starts_with("-ERR"), "{line}");
            if line.starts_with("PONG") {
                break;
            }
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `filepipe worker`, ready (READY=1 on its notify socket) once it has bound the consumer.
pub struct Worker {
    child: Option<Child>,
    _notes: Notifications,
    log: PathBuf,
}

impl Worker {
    pub fn start(nats: &Nats, dir: &Path, roots: &[String], jobs: &str) -> Worker {
        Self::start_with(nats, dir, roots, jobs, &[])
    }

    /// `start`, with more arguments.
    pub fn start_with(
        nats: &Nats,
        dir: &Path,
        roots: &[String],
        jobs: &str,
        extra: &[&str],
    ) -> Worker {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = dir.join(format!("worker-{n}.sock"));
        let log = dir.join(format!("worker-{n}.log"));
        let notes = Notifications::listen(&socket);
        let mut cmd = filepipe(&[
            s("worker"),
            s("--queue"),
            s(&nats.url),
            s("--jobs"),
            s(jobs),
        ]);
        for r in roots {
            cmd.args(["--root", r]);
        }
        cmd.args(extra);
        cmd.env("NOTIFY_SOCKET", &socket)
            .env_remove("WATCHDOG_USEC")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let limit = Instant::now() + Duration::from_secs(30);
        while !notes.has("READY=1") {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "the worker exited before READY=1 ({st}): {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < limit, "no READY=1 from the worker");
            std::thread::sleep(Duration::from_millis(5));
        }
        Worker {
            child: Some(child),
            _notes: notes,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(c),
                rustix::process::Signal::TERM,
            );
        }
        if let Some(mut c) = self.child.take() {
            let limit = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < limit {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

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
