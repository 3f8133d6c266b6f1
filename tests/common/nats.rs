//! A real `nats-server` (Debian's) for the cluster tests, started on a free loopback port with
//! a temp store, and real `filepipe worker`s, each ready once it says READY=1.

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{filepipe, Notifications};

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

/// A JetStream server of our own, stopped when dropped.
pub struct Nats {
    pub child: Child,
    pub url: String,
    pub _store: tempfile::TempDir,
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
        let mut args = vec![
            s("-js"),
            s("-a"),
            s("127.0.0.1"),
            s("-p"),
            s(port),
            s("-sd"),
        ];
        args.push(store.as_os_str());
        args.extend(extra);
        Self::spawn_args(&args)
    }

    /// A server started with the configuration `config` (a nats-server.conf's text, its
    /// `store_dir` replaced by a temp store's), listening on a free loopback port.
    pub fn start_config(config: &str, store_dir: &str) -> Option<Nats> {
        if Command::new("nats-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: no nats-server (apt-get install nats-server)");
            return None;
        }
        let store = tempfile::tempdir().unwrap();
        let conf = store.path().join("nats-server.conf");
        let data = store.path().join("data");
        assert!(config.contains(store_dir), "no {store_dir} in the config");
        fs::write(
            &conf,
            config.replace(store_dir, &data.display().to_string()),
        )
        .unwrap();
        let (child, port) = Self::spawn_args(&[
            s("-c"),
            conf.as_os_str(),
            s("-a"),
            s("127.0.0.1"),
            s("-p"),
            s("-1"),
        ]);
        Some(Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        })
    }

    /// `nats-server ARGS`, once it is ready for clients, with the port it listens on.
    fn spawn_args(args: &[&OsStr]) -> (Child, u16) {
        let mut child = Command::new("nats-server")
            .args(args)
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

    /// A plain NATS protocol connection to the server (no client library: as a peer from
    /// another release, or anyone allowed to publish, would speak it), past the server's INFO
    /// and our CONNECT, reading with `timeout`: the stream to write to and a reader of it.
    pub fn raw_connection(&self, timeout: Duration) -> (TcpStream, BufReader<TcpStream>) {
        self.raw_connection_as(None, timeout)
    }

    /// `raw_connection`, as `user` (name, password) if given.
    pub fn raw_connection_as(
        &self,
        user: Option<(&str, &str)>,
        timeout: Duration,
    ) -> (TcpStream, BufReader<TcpStream>) {
        let addr = self.url.trim_start_matches("nats://");
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(timeout)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("INFO"), "{line}");
        let auth = user.map_or(String::new(), |(u, p)| {
            format!(",\"user\":{},\"pass\":{}", json_string(u), json_string(p))
        });
        write!(
            stream,
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true{auth}}}\r\n"
        )
        .unwrap();
        (stream, reader)
    }

    /// Publishes `payload` on `subject` as `user` (name, password) over the plain protocol;
    /// `Err` holds what the server said if it refused it (an `-ERR` before the `PONG`).
    pub fn publish_as(
        &self,
        user: (&str, &str),
        subject: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        let (mut stream, mut reader) = self.raw_connection_as(Some(user), Duration::from_secs(5));
        write!(stream, "PUB {subject} {}\r\n", payload.len()).unwrap();
        stream.write_all(payload).unwrap();
        stream.write_all(b"\r\nPING\r\n").unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.starts_with("-ERR") {
                return Err(line.trim_end().to_owned());
            }
            if line.starts_with("PONG") {
                return Ok(());
            }
        }
    }

    /// Publishes `payload` on `subject` over the plain NATS protocol, as anyone allowed to
    /// publish could: a stream whose subjects match stores it.
    pub fn publish_raw(&self, subject: &str, payload: &[u8]) {
        let (mut stream, mut reader) = self.raw_connection(Duration::from_secs(5));
        let mut line = String::new();
        write!(stream, "PUB {subject} {}\r\n", payload.len()).unwrap();
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

impl Nats {
    /// Takes the next job of the workers' consumer `consumer` and hands it back at once (a
    /// NAK), as a client that is no worker may: the server delivers it again without waiting
    /// out the ack wait, delivered twice, as it would a job whose worker died. `false` if none
    /// was there within a second.
    pub fn nak_next(&self, consumer: &str) -> bool {
        self.nak_next_after(consumer, Duration::ZERO)
    }

    /// `nak_next`, delivered again only after `delay` (a NAK with a delay, as a worker's).
    pub fn nak_next_after(&self, consumer: &str, delay: Duration) -> bool {
        let nak = match delay.as_nanos() {
            0 => "-NAK".to_owned(),
            ns => format!("-NAK {{\"delay\":{ns}}}"),
        };
        let (mut stream, mut reader) = self.raw_connection(Duration::from_secs(5));
        let req = br#"{"batch":1,"expires":1000000000}"#;
        write!(
            stream,
            "SUB _INBOX.nak 1\r\nPUB $JS.API.CONSUMER.MSG.NEXT.FILEPIPE_JOBS.{consumer} _INBOX.nak {}\r\n",
            req.len()
        )
        .unwrap();
        stream.write_all(req).unwrap();
        stream.write_all(b"\r\n").unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return false;
            }
            assert!(!line.starts_with("-ERR"), "{consumer}: {line}");
            if line.starts_with("PING") {
                stream.write_all(b"PONG\r\n").unwrap();
                continue;
            }
            // MSG subject sid [reply] len, or HMSG subject sid [reply] hlen len.
            let (head, is_msg) = match (line.strip_prefix("MSG "), line.strip_prefix("HMSG ")) {
                (Some(h), _) => (h, true),
                (_, Some(h)) => (h, false),
                _ => continue,
            };
            let parts: Vec<&str> = head.split_whitespace().collect();
            let len: usize = parts[parts.len() - 1].parse().unwrap();
            let mut body = vec![0u8; len + 2];
            reader.read_exact(&mut body).unwrap();
            let with_reply = if is_msg { 4 } else { 5 };
            match parts.get(2).filter(|_| parts.len() == with_reply) {
                Some(reply) if reply.starts_with("$JS.ACK") => {
                    write!(stream, "PUB {reply} {}\r\n{nak}\r\nPING\r\n", nak.len()).unwrap();
                    loop {
                        line.clear();
                        reader.read_line(&mut line).unwrap();
                        if line.starts_with("PONG") {
                            return true;
                        }
                    }
                }
                // A status (no messages, request timed out): none now.
                _ => return false,
            }
        }
    }

    /// The server's answer to a request on `subject` (a JetStream API call), as JSON.
    pub fn ask(&self, subject: &str, payload: &[u8]) -> serde_json::Value {
        let (mut stream, mut reader) = self.raw_connection(Duration::from_secs(5));
        write!(
            stream,
            "SUB _INBOX.ask 1\r\nPUB {subject} _INBOX.ask {}\r\n",
            payload.len()
        )
        .unwrap();
        stream.write_all(payload).unwrap();
        stream.write_all(b"\r\n").unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            assert!(!line.starts_with("-ERR"), "{subject}: {line}");
            if line.starts_with("PING") {
                stream.write_all(b"PONG\r\n").unwrap();
            }
            if let Some(rest) = line.strip_prefix("MSG ") {
                let len: usize = rest.split_whitespace().last().unwrap().parse().unwrap();
                let mut body = vec![0u8; len + 2];
                reader.read_exact(&mut body).unwrap();
                return serde_json::from_slice(&body[..len]).unwrap();
            }
        }
    }
}

/// `text` as a JSON string.
fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `filepipe worker`, ready (READY=1 on its notify socket) once it has bound the consumer.
pub struct Worker {
    pub child: Option<Child>,
    _notes: Notifications,
    pub log: PathBuf,
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
        Self::ready(cmd, dir)
    }

    /// Starts `cmd` (a `filepipe worker` command line) with its log in a file under `dir`,
    /// and returns it once it says READY=1.
    pub fn ready(mut cmd: Command, dir: &Path) -> Worker {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = dir.join(format!("worker-{n}.sock"));
        let log = dir.join(format!("worker-{n}.log"));
        let notes = Notifications::listen(&socket);
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

impl Worker {
    /// Stops the worker as systemd would (SIGTERM), and waits for it: it hands back what it
    /// holds and lets its waiting requests end (up to 2.5 s). For a worker a test goes on
    /// without; one left to the end of a test is killed (`Drop`), since the server goes too.
    pub fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&c),
                rustix::process::Signal::TERM,
            );
            let limit = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < limit {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills the worker: a graceful stop costs up to 2.5 s a worker (its waiting requests end),
/// which a test ending with its server does not need; `stop` is the graceful one.
impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}
