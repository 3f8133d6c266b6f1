//! Cluster mode under the server's own authorization: `systemd/nats-server.conf`, the example
//! shipped for users, started as it is (its passwords replaced, as users are told to, and its
//! store a temp one) with a `coordinator` and a `worker` user allowed exactly what each role
//! needs. A batch runs with the two users (outputs checked with gzip and sha256sum), the
//! server refuses a worker that publishes a job or a cancellation or purges the jobs, and a
//! coordinator that publishes an outcome, while the run goes on unharmed; `status` works as
//! the coordinator; and a user lacking a permission it needs is told at start (exit 2, naming
//! the subject), rather than left waiting for an answer that never comes.
#![cfg(feature = "cluster")]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cluster::{assert_results, tree, xdg};
use common::nats::*;
use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

const COORDINATOR: (&str, &str) = ("coordinator", "c00rd-Pa55-for-test");
const WORKER: (&str, &str) = ("worker", "w0rker-Pa55-for-test");

/// The example, as shipped.
fn example() -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/nats-server.conf"))
        .unwrap()
}

/// A third user, allowed everything: an administrator.
const ADMIN: (&str, &str) = ("admin", "adm1n-Pa55-for-test");

/// The example with `ADMIN` added to its users.
fn with_admin() -> String {
    let config = example().replacen(
        "  users = [\n",
        &format!(
            "  users = [\n    {{ user: {}, password: \"{}\" }}\n",
            ADMIN.0, ADMIN.1
        ),
        1,
    );
    assert!(
        config.contains("user: admin"),
        "the example's users list moved"
    );
    config
}

/// Deletes the workers' consumer of `root` as `ADMIN` (a server started `with_admin`).
fn delete_workers_consumer(nats: &Nats, root: &str) {
    let subject = format!("$JS.API.CONSUMER.DELETE.FILEPIPE_JOBS.workers-{root}");
    let gone = ask_as(nats, ADMIN, &subject, b"");
    assert_eq!(gone["success"], true, "{gone}");
}

/// A server with `config` (the example, or a variant of it), its placeholder passwords
/// replaced by the test's.
fn server(config: &str) -> Option<Nats> {
    let config = config
        .replace("REPLACE-coordinator-password", COORDINATOR.1)
        .replace("REPLACE-worker-password", WORKER.1);
    Nats::start_config(&config, "/var/lib/nats")
}

/// The server's URL with `user`'s name and password.
fn url_as(nats: &Nats, user: (&str, &str)) -> String {
    nats.url
        .replacen("nats://", &format!("nats://{}:{}@", user.0, user.1), 1)
}

/// `filepipe worker` as the worker user, mapping `tree` to `root`; its log in `dir`.
fn worker_cmd(nats: &Nats, root: &Path) -> Command {
    let mut cmd = filepipe(&[s("worker"), s("--queue"), s(&url_as(nats, WORKER))]);
    cmd.args(["--jobs", "2", "--root"])
        .arg(format!("tree={}", root.display()));
    cmd
}

/// `filepipe batch ROOT --op gzip,sha256 --manifest SUMS` as the coordinator user.
fn coordinator_cmd(nats: &Nats, t: &TestTree) -> Command {
    let mut cmd = filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--queue"),
        s(&url_as(nats, COORDINATOR)),
    ]);
    cmd.args(["--root-name", "tree", "--op", "gzip,sha256", "--json"])
        .arg("--manifest")
        .arg(t.side("SUMS"))
        .env("XDG_STATE_HOME", xdg(&t.root()));
    cmd
}

/// A coordinator (the example's user) of an empty tree under the root name `root`: it makes
/// the streams and that root's workers' consumer, and ends.
fn make_streams(nats: &Nats, root: &str) -> Run {
    let empty = TestTree::new();
    let mut setup = filepipe(&[
        s("batch"),
        empty.root().as_os_str(),
        s("--queue"),
        s(&url_as(nats, COORDINATOR)),
        s("--root-name"),
        s(root),
        s("--op"),
        s("sha256"),
    ]);
    setup.env("XDG_STATE_HOME", xdg(&empty.root()));
    run(setup)
}

/// A worker started before any coordinator (the streams missing: it may not make them) waits
/// for one; a batch with the two users then runs to the end, every file done once, and
/// `filepipe status` works as the coordinator user (and is refused, naming the permission, as
/// the worker, which the example does not let list the consumers).
#[test]
fn a_batch_runs_with_the_example_configs_coordinator_and_worker_users() {
    let Some(nats) = server(&example()) else {
        return;
    };
    let t = tree(120, 0);
    let log = t.side("worker.log");
    let mut worker = worker_cmd(&nats, &t.root())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let said = |what: &str| fs::read_to_string(&log).unwrap_or_default().contains(what);
    wait_until(
        Duration::from_secs(30),
        "the worker waits for the streams",
        || said("waiting for a coordinator"),
    );
    assert!(
        worker.try_wait().unwrap().is_none(),
        "{}",
        fs::read_to_string(&log).unwrap()
    );
    let r = run(coordinator_cmd(&nats, &t)).context("coordinator");
    let sum = r.success().summary();
    assert_eq!(sum["done"], 120, "{sum}");
    assert_eq!(sum["failed"], 0, "{sum}");
    assert!(said("worker ready"));
    assert_results(&t, 120);

    // The coordinator ends once every outcome is stored; a worker acknowledges each job just
    // after storing its outcome, so the last jobs may still be in flight for a moment.
    let mut last = String::new();
    wait_until(
        Duration::from_secs(30),
        "status as the coordinator: no job left, none in flight",
        || {
            let status = run(filepipe(&[
                s("status"),
                s("--queue"),
                s(&url_as(&nats, COORDINATOR)),
            ]));
            last = status.success().stdout();
            let drained = last.contains("jobs\t0 messages") && last.contains("in flight\t0\n");
            if !drained {
                // A process a poll: not every 5 ms.
                std::thread::sleep(Duration::from_millis(100));
            }
            drained
        },
    );
    assert!(last.contains("root tree\t"), "{last}");
    // The worker seen, from its outcomes, which the coordinator user may read.
    assert!(last.contains("workers seen\t1 "), "{last}");
    let err = run(filepipe(&[
        s("status"),
        s("--queue"),
        s(&url_as(&nats, WORKER)),
    ]))
    .code(2)
    .stderr();
    assert!(err.contains("$JS.API.CONSUMER.LIST.FILEPIPE_JOBS"), "{err}");
    let _ = worker.kill();
    let _ = worker.wait();
    // The server logged no refusal of what the roles did.
    assert!(
        !said("refused this user"),
        "{}",
        fs::read_to_string(&log).unwrap()
    );
}

/// The forgeries the permissions stop: the worker user publishing a job, a cancellation, or a
/// purge of the jobs, and the coordinator user publishing an outcome, each refused by the
/// server (a permission violation) while a run waits for its worker; the run then ends with
/// every file done once and right.
#[test]
fn the_server_refuses_a_worker_publishing_a_job_and_a_coordinator_an_outcome() {
    let Some(nats) = server(&example()) else {
        return;
    };
    let t = tree(60, 0);
    // The coordinator first: its jobs wait in the stream for a worker.
    let mut coordinator = coordinator_cmd(&nats, &t);
    coordinator.stdout(Stdio::piped()).stderr(Stdio::piped());
    let coordinator = Started::new(coordinator);
    let status = || {
        run(filepipe(&[
            s("status"),
            s("--queue"),
            s(&url_as(&nats, COORDINATOR)),
        ]))
    };
    wait_until(Duration::from_secs(30), "the jobs are queued", || {
        let r = status();
        r.output().status.success() && !r.stdout().contains("jobs\t0 messages")
    });
    let job = br#"{"v":3,"run":"forged","root":"tree","files":[{"rel":"../../etc/passwd"}]}"#;
    for (user, subject, payload) in [
        (WORKER, "filepipe.jobs.tree.forged", &job[..]),
        (WORKER, "filepipe.cancel.forged", b""),
        (WORKER, "$JS.API.STREAM.PURGE.FILEPIPE_JOBS", b"{}"),
        (WORKER, "$JS.API.STREAM.DELETE.FILEPIPE_OUTCOMES", b""),
        (
            COORDINATOR,
            "filepipe.outcomes.forged",
            br#"{"v":3,"run":"forged","worker":"x","outcomes":[]}"#,
        ),
    ] {
        let err = nats
            .publish_as(user, subject, payload)
            .expect_err(&format!("{} may publish on {subject}", user.0));
        assert!(
            err.contains("Permissions Violation") && err.contains(subject),
            "{}: {subject}: {err}",
            user.0
        );
    }
    // What each is allowed, it may (the test's publishing is refused for the right reason).
    nats.publish_as(WORKER, "filepipe.outcomes.forged", b"x")
        .expect("the worker user may publish outcomes");
    let w = Worker::ready(worker_cmd(&nats, &t.root()), &t.side(""));
    let r = coordinator
        .finish(Duration::from_secs(120))
        .context("coordinator");
    let sum = r.success().summary();
    assert_eq!(sum["done"], 60, "{sum}");
    assert_eq!(sum["failed"], 0, "{sum}");
    assert_results(&t, 60);
    assert!(!w.log().contains("refused this user"), "{}", w.log());
}

/// A user lacking a permission its role needs at start is told so at once, exit 2, the
/// subject named, instead of waiting out a request the server never answers (or, for a
/// subscription, never hearing of it): a worker that may not hear cancellations, bind its
/// consumer or publish outcomes, a coordinator that may not publish jobs or make its outcome
/// consumer. (Publishing is found out without storing anything: the jobs stream is empty
/// after a run, in the test above.)
#[test]
fn a_user_without_a_permission_it_needs_is_told_at_start() {
    let t = tree(3, 0);
    let cases = [
        (
            "worker: subscribe filepipe.cancel.>",
            "      # count: a server's answer sent there, as any user can have it, is not one).\n      \"filepipe.cancel.>\"\n",
            "filepipe.cancel.>",
            true,
        ),
        (
            "worker: CONSUMER.INFO",
            "      \"$JS.API.CONSUMER.INFO.FILEPIPE_JOBS.*\"\n      \"$JS.API.CONSUMER.MSG.NEXT.FILEPIPE_JOBS.*\"\n",
            "$JS.API.CONSUMER.INFO.FILEPIPE_JOBS.workers-tree",
            true,
        ),
        (
            "worker: publish filepipe.outcomes.>",
            "      # Outcomes only.\n      \"filepipe.outcomes.>\"\n",
            "filepipe.outcomes.",
            true,
        ),
        (
            "coordinator: publish filepipe.jobs.>",
            "      \"filepipe.jobs.>\"\n      \"filepipe.cancel.>\"\n",
            "filepipe.jobs.tree.",
            false,
        ),
        (
            "coordinator: CONSUMER.CREATE on the outcomes",
            "      \"$JS.API.CONSUMER.CREATE.FILEPIPE_OUTCOMES.>\"\n",
            "$JS.API.CONSUMER.CREATE.FILEPIPE_OUTCOMES.coordinator-",
            false,
        ),
    ];
    for (what, line, subject, as_worker) in cases {
        let config = example();
        assert!(config.contains(line), "{what}: the example changed");
        let Some(nats) = server(&config.replacen(line, "", 1)) else {
            return;
        };
        // The streams and the workers' consumer exist (made by a coordinator of nothing).
        if as_worker {
            make_streams(&nats, "tree").context(what).success();
        }
        let mut cmd = match as_worker {
            true => worker_cmd(&nats, &t.root()),
            false => coordinator_cmd(&nats, &t),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Well within the client's 30 s wait for an answer: not a timeout's error.
        let r = Started::new(cmd)
            .finish(Duration::from_secs(20))
            .context(what);
        let err = r.code(2).stderr();
        assert!(
            err.contains("refused this user a permission") && err.contains(subject),
            "{what}: {err}"
        );
    }
}

/// A worker waiting for a coordinator to make the streams stops at SIGTERM, as one ready does
/// (exit 0: a signal is how a worker is meant to stop), without ever taking jobs (`worker
/// ready`).
#[test]
fn a_worker_waiting_for_the_streams_stops_at_a_signal() {
    let Some(nats) = server(&example()) else {
        return;
    };
    let t = tree(1, 0);
    let log = t.side("worker.log");
    let mut worker = worker_cmd(&nats, &t.root());
    worker
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).unwrap());
    let worker = Started::new(worker);
    wait_until(
        Duration::from_secs(30),
        "the worker waits for the streams",
        || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("waiting for a coordinator")
        },
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&worker),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    worker.finish(Duration::from_secs(10)).success();
    assert!(!fs::read_to_string(&log).unwrap().contains("worker ready"));
}

/// A request to the server as `user` over the plain protocol: `payload` published on `subject`
/// with `reply` as its reply subject (the server answers there, as itself: the user's publish
/// permissions are not asked about the reply subject). `Err` holds a refusal (`-ERR`).
fn request_as(
    nats: &Nats,
    user: (&str, &str),
    subject: &str,
    reply: &str,
    payload: &[u8],
) -> Result<(), String> {
    use std::io::{BufRead, Write};
    let (mut stream, mut reader) = nats.raw_connection_as(Some(user), Duration::from_secs(5));
    write!(stream, "PUB {subject} {reply} {}\r\n", payload.len()).unwrap();
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

/// What `user` gets back for a request on `subject` (its answer's payload, read on an inbox
/// the user may subscribe to).
fn ask_as(nats: &Nats, user: (&str, &str), subject: &str, payload: &[u8]) -> serde_json::Value {
    use std::io::{BufRead, Read, Write};
    let (mut stream, mut reader) = nats.raw_connection_as(Some(user), Duration::from_secs(5));
    write!(
        stream,
        "SUB _INBOX.review 1\r\nPUB {subject} _INBOX.review {}\r\n",
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
        if let Some(rest) = line.strip_prefix("MSG ") {
            let len: usize = rest.split_whitespace().last().unwrap().parse().unwrap();
            let mut body = vec![0u8; len + 2];
            reader.read_exact(&mut body).unwrap();
            return serde_json::from_slice(&body[..len]).unwrap();
        }
    }
}

/// The runs whose jobs are queued now, as anyone allowed to look at the jobs stream (the
/// worker user) finds them: the stream's subjects, `filepipe.jobs.<root>.<run>`.
fn queued_runs(nats: &Nats, user: (&str, &str)) -> Vec<String> {
    let info = ask_as(
        nats,
        user,
        "$JS.API.STREAM.INFO.FILEPIPE_JOBS",
        br#"{"subjects_filter":">"}"#,
    );
    info["state"]["subjects"]
        .as_object()
        .map(|o| {
            o.keys()
                .map(|s| s.rsplit('.').next().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The worker user may not publish a cancellation (`filepipe.cancel.>` is denied it, as the
/// README says the server enforces), but it may send any request it is allowed with
/// `filepipe.cancel.<run>` as the reply subject: the server's answer is then published there
/// by the server itself, stored in the outcomes stream as the run's cancellation, and every
/// (honest) worker drops the run's jobs. The run must still end with every file done (what
/// the server stores cannot be helped: it is not to be taken for a cancellation).
#[test]
fn the_worker_user_cannot_cancel_a_run_through_a_reply_subject() {
    let Some(nats) = server(&example()) else {
        return;
    };
    let t = tree(20, 0);
    let mut coordinator = coordinator_cmd(&nats, &t);
    coordinator.stdout(Stdio::piped()).stderr(Stdio::piped());
    let coordinator = Started::new(coordinator);
    let mut runs = Vec::new();
    wait_until(Duration::from_secs(30), "the jobs are queued", || {
        runs = queued_runs(&nats, WORKER);
        !runs.is_empty()
    });
    let run = &runs[0];
    // A request the worker user is allowed, answered on the run's cancellation subject.
    request_as(
        &nats,
        WORKER,
        "$JS.API.STREAM.INFO.FILEPIPE_JOBS",
        &format!("filepipe.cancel.{run}"),
        b"",
    )
    .expect("the worker user may look at the jobs stream");
    let stored = ask_as(
        &nats,
        COORDINATOR,
        "$JS.API.STREAM.MSG.GET.FILEPIPE_OUTCOMES",
        format!(r#"{{"last_by_subj":"filepipe.cancel.{run}"}}"#).as_bytes(),
    );
    // The server stores the answer (a JSON stream info) as the run's cancellation: no
    // permission can stop that, so it is the readers' to tell from their coordinator's
    // (empty) one. Taken as one, the worker drops each job of the run ("run cancelled by
    // its coordinator") and the coordinator republishes them for ever, blaming old workers.
    let stored_msg = stored.get("message").is_some();
    let _w = Worker::ready(worker_cmd(&nats, &t.root()), &t.side(""));
    let gz = || {
        walkdir::WalkDir::new(t.root())
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension() == Some(OsStr::new("gz")))
            .count()
    };
    // (The worker drops them silently: it finds the cancellation when it first meets the run.)
    let what = format!(
        "the run's 20 outputs (a cancellation stored by the worker user: {stored_msg}; \
         the worker dropped the run's jobs if none come)"
    );
    wait_until(Duration::from_secs(60), &what, || gz() == 20);
    let r = coordinator
        .finish(Duration::from_secs(90))
        .context("coordinator");
    let sum = r.success().summary();
    assert_eq!(sum["done"], 20, "{sum}");
    assert_results(&t, 20);
}

/// A root's workers' consumer is shared by every worker of the root: one changed (its filter,
/// ack wait, deliveries) hangs or reshapes every run of the root. The example does not let
/// the worker user make or change one (the reviewer's finding: it did, and a consumer made
/// with a filter no job matches left every job stored and never delivered, the coordinator
/// waiting for ever). And one changed all the same (by a user allowed to: an older
/// configuration's worker, an administrator) is refused by the worker and the coordinator at
/// start, exit 2, naming it and what differs, instead of worked from. (Adapted from the
/// reviewer's test, which made the change as the worker user: the example now refuses that,
/// so the change is made as the coordinator user, which may create consumers.)
#[test]
fn a_workers_consumer_changed_by_the_worker_user_does_not_hang_a_run() {
    let Some(nats) = server(&example()) else {
        return;
    };
    // The streams and the root's consumer, made by a coordinator of an empty tree.
    make_streams(&nats, "tree").success();
    let change = br#"{"stream_name":"FILEPIPE_JOBS","config":{"name":"workers-tree","durable_name":"workers-tree","filter_subject":"filepipe.jobs.tree.none","ack_policy":"explicit","deliver_policy":"all"}}"#;
    let refused = request_as(
        &nats,
        WORKER,
        "$JS.API.CONSUMER.CREATE.FILEPIPE_JOBS.workers-tree",
        "_INBOX.review",
        change,
    );
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("Permissions Violation")),
        "the worker user may change the workers' consumer: {refused:?}"
    );
    let made = ask_as(
        &nats,
        COORDINATOR,
        "$JS.API.CONSUMER.CREATE.FILEPIPE_JOBS.workers-tree",
        change,
    );
    assert!(made.get("error").is_none(), "{made}");
    assert_eq!(made["config"]["filter_subject"], "filepipe.jobs.tree.none");
    let t = tree(10, 0);
    let mut worker = worker_cmd(&nats, &t.root());
    worker.stdout(Stdio::piped()).stderr(Stdio::piped());
    let w = Started::new(worker).finish(Duration::from_secs(30));
    let err = w.code(2).stderr();
    assert!(
        err.contains("workers-tree") && err.contains("filter subject"),
        "{err}"
    );
    let mut coordinator = coordinator_cmd(&nats, &t);
    coordinator.stdout(Stdio::piped()).stderr(Stdio::piped());
    let r = Started::new(coordinator)
        .finish(Duration::from_secs(90))
        .context("coordinator");
    let err = r.code(2).stderr();
    assert!(
        err.contains("workers-tree") && err.contains("filter subject"),
        "{err}"
    );
}

/// A worker waiting for a coordinator to make the streams must not hold its unit's start job
/// open: `filepipe-worker@.service` is Type=notify and WantedBy=multi-user.target (so the
/// target is ordered after it), and the wait sends EXTEND_TIMEOUT_USEC every second with no
/// end, past the unit's TimeoutStartSec=1min: on hosts booted before any coordinator ever ran
/// (the case the wait is for), `systemctl start` / `enable --now` blocks and the boot never
/// reaches multi-user.target until a coordinator runs, which may be days. It should say
/// READY=1 (with a STATUS= saying what it waits for) once it knows it must wait.
#[test]
fn a_worker_waiting_for_the_streams_does_not_hold_its_start_job_open() {
    let Some(nats) = server(&example()) else {
        return;
    };
    let t = tree(1, 0);
    let socket = t.side("notify.sock");
    let notes = Notifications::listen(&socket);
    let log = t.side("worker.log");
    let mut worker = worker_cmd(&nats, &t.root());
    worker
        .env("NOTIFY_SOCKET", &socket)
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).unwrap());
    let worker = Started::new(worker);
    wait_until(
        Duration::from_secs(30),
        "the worker waits for the streams",
        || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("waiting for a coordinator")
        },
    );
    let ready = std::panic::catch_unwind(|| {
        wait_until(Duration::from_secs(10), "READY=1 while it waits", || {
            notes.has("READY=1")
        })
    })
    .is_ok();
    let extended = notes.count("EXTEND_TIMEOUT_USEC=");
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&worker),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    worker.finish(Duration::from_secs(10)).success();
    assert!(
        ready,
        "no READY=1 after 10 s of waiting for a coordinator; the start timeout extended {extended} times"
    );
}

/// The example does not let the worker user make a consumer: a worker started when the
/// streams exist but its root's consumer does not (a coordinator ran for another root only)
/// waits for a coordinator to make it, ready under systemd meanwhile, then takes the root's
/// jobs: a batch ends with every file done.
#[test]
fn a_worker_waits_for_a_coordinator_to_make_its_roots_consumer() {
    let Some(nats) = server(&example()) else {
        return;
    };
    // The streams, and another root's consumer only.
    make_streams(&nats, "other").success();
    let t = tree(12, 0);
    let socket = t.side("notify.sock");
    let notes = Notifications::listen(&socket);
    let log = t.side("worker.log");
    let mut worker = worker_cmd(&nats, &t.root());
    worker
        .env("NOTIFY_SOCKET", &socket)
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    let worker = Started::new(worker);
    let said = |what: &str| fs::read_to_string(&log).unwrap_or_default().contains(what);
    wait_until(
        Duration::from_secs(30),
        "the worker waits for its root's consumer",
        || said("workers-tree is missing and this user may not make it"),
    );
    wait_until(Duration::from_secs(10), "READY=1 while it waits", || {
        notes.has("READY=1")
    });
    assert!(!said("worker ready"));
    let r = run(coordinator_cmd(&nats, &t)).context("coordinator");
    let sum = r.success().summary();
    assert_eq!(sum["done"], 12, "{sum}");
    assert!(said("worker ready"));
    assert_results(&t, 12);
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&worker),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    worker.finish(Duration::from_secs(30)).success();
    // The server's refusal of the creation is what the wait follows from, not an error.
    assert!(
        !said("refused this user"),
        "{}",
        fs::read_to_string(&log).unwrap()
    );
}

/// A workers' consumer changed while a worker runs (here its ack wait, by the coordinator
/// user, standing for anyone allowed to): the worker says so, naming what differs, and takes
/// nothing from it; once it is as filepipe makes it again, the worker takes its jobs and a
/// batch ends with every file done.
#[test]
fn a_worker_stops_taking_from_a_workers_consumer_changed_mid_run() {
    let Some(nats) = server(&example()) else {
        return;
    };
    let t = tree(8, 0);
    // The streams and the root's consumer, made by a coordinator of an empty tree.
    make_streams(&nats, "tree").success();
    let w = Worker::ready(worker_cmd(&nats, &t.root()), &t.side(""));
    let said = |what: &str| {
        fs::read_to_string(&w.log)
            .unwrap_or_default()
            .contains(what)
    };
    let info = ask_as(
        &nats,
        WORKER,
        "$JS.API.CONSUMER.INFO.FILEPIPE_JOBS.workers-tree",
        b"",
    );
    let made = info["config"].clone();
    let mut changed = made.clone();
    changed["ack_wait"] = serde_json::json!(5_000_000_000u64);
    let update = |config: &serde_json::Value| {
        let body = serde_json::json!({"stream_name": "FILEPIPE_JOBS", "config": config});
        let r = ask_as(
            &nats,
            COORDINATOR,
            "$JS.API.CONSUMER.CREATE.FILEPIPE_JOBS.workers-tree",
            body.to_string().as_bytes(),
        );
        assert!(r.get("error").is_none(), "{r}");
        r
    };
    assert_eq!(update(&changed)["config"]["ack_wait"], 5_000_000_000u64);
    wait_until(
        Duration::from_secs(30),
        "the worker to say the consumer changed",
        || said("workers-tree on FILEPIPE_JOBS is not as filepipe makes it (ack wait 5s"),
    );
    update(&made);
    wait_until(
        Duration::from_secs(30),
        "the worker to take the consumer's jobs again",
        || said("the workers' consumer is as filepipe makes it again"),
    );
    let r = run(coordinator_cmd(&nats, &t)).context("coordinator");
    let sum = r.success().summary();
    assert_eq!(sum["done"], 8, "{sum}");
    assert_results(&t, 8);
}

/// A workers' consumer deleted mid-run (by an administrator, here a third user allowed
/// everything) that the worker's user may not make again: the worker says so once and stops
/// asking it for jobs, so its other root is served at full pace (a pull on a missing consumer
/// is never answered: each fetch waited out the client's 5 s for it, and failed again); once
/// a coordinator has made it again, the worker takes its jobs.
#[test]
fn a_deleted_consumer_the_worker_may_not_make_again_does_not_slow_its_other_roots() {
    let config = with_admin();
    let Some(nats) = server(&config) else {
        return;
    };
    make_streams(&nats, "tree").success();
    make_streams(&nats, "other").success();
    let t = tree(6, 0);
    let other = TestTree::new().file("x", b"other root\n");
    let mut cmd = worker_cmd(&nats, &t.root());
    cmd.arg("--root")
        .arg(format!("other={}", other.root().display()));
    let w = Worker::ready(cmd, &t.side(""));
    let log = || fs::read_to_string(&w.log).unwrap_or_default();
    delete_workers_consumer(&nats, "other");
    wait_until(
        Duration::from_secs(30),
        "the worker to find the consumer gone",
        || log().contains("is gone and could not be made again"),
    );
    // Runs on the other root, back to back, for longer than several fetches: each fetch
    // asked the missing consumer in turn, and failed after 5 s.
    std::thread::sleep(Duration::from_secs(1));
    let failed = log().matches("fetching jobs failed").count();
    for _ in 0..3 {
        let r = run(coordinator_cmd(&nats, &t)).context("coordinator");
        assert_eq!(r.success().summary()["done"], 6);
    }
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        log().matches("fetching jobs failed").count(),
        failed,
        "fetches failed again:\n{}",
        log()
    );
    assert_results(&t, 6);
    // Made again by a coordinator of that root: its jobs are taken.
    make_streams(&nats, "other").success();
    wait_until(
        Duration::from_secs(30),
        "the worker to take the consumer's jobs again",
        || log().contains("the workers' consumer is there again"),
    );
    let mut c = filepipe(&[
        s("batch"),
        other.root().as_os_str(),
        s("--queue"),
        s(&url_as(&nats, COORDINATOR)),
        s("--root-name"),
        s("other"),
        s("--op"),
        s("gzip"),
        s("--json"),
    ]);
    c.env("XDG_STATE_HOME", xdg(&other.root()));
    assert_eq!(run(c).success().summary()["done"], 1);
    let unzipped = tool("gzip", &[s("-dc"), s("x.gz")], &other.root());
    assert_eq!(unzipped.stdout, b"other root\n");
}

/// A workers' consumer deleted while a coordinator awaits its run's outcomes (by an
/// administrator, here a third user allowed everything), with workers whose user may not
/// make it again: the coordinator makes it again within seconds, and the run ends with every
/// file done (before, it waited for ever: it made the consumer only at its start).
#[test]
fn a_coordinator_makes_again_a_workers_consumer_deleted_mid_run() {
    let config = with_admin();
    let Some(nats) = server(&config) else {
        return;
    };
    let t = tree(5, 0);
    // No worker yet: the run's jobs wait in the stream.
    let mut c = coordinator_cmd(&nats, &t);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let coordinator = Started::new(c);
    let pending = || {
        let info = ask_as(
            &nats,
            ADMIN,
            "$JS.API.CONSUMER.INFO.FILEPIPE_JOBS.workers-tree",
            b"",
        );
        info["num_pending"].as_u64().unwrap_or(0)
    };
    wait_until(Duration::from_secs(30), "the run's jobs queued", || {
        pending() > 0
    });
    delete_workers_consumer(&nats, "tree");
    let log = t.side("worker.log");
    let mut w = worker_cmd(&nats, &t.root());
    w.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    let worker = Started::new(w);
    let r = coordinator.finish(Duration::from_secs(60));
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&worker),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    worker.finish(Duration::from_secs(30)).success();
    let sum = r.success().summary();
    assert_eq!(sum["done"], 5, "{sum}");
    assert!(
        r.stderr().contains("was gone: made again"),
        "{}",
        r.stderr()
    );
    assert_results(&t, 5);
}

/// The same, the consumer made again by someone else with other settings (a 5 s ack wait):
/// the coordinator says so, once, instead of waiting in silence; once it is removed, the
/// coordinator makes it as filepipe does and the run ends with every file done.
#[test]
fn a_coordinator_says_when_the_workers_consumer_is_made_again_otherwise() {
    let Some(nats) = server(&with_admin()) else {
        return;
    };
    let t = tree(3, 0);
    let log = t.side("coordinator.log");
    let mut c = coordinator_cmd(&nats, &t);
    c.stdout(Stdio::piped())
        .stderr(fs::File::create(&log).unwrap());
    let coordinator = Started::new(c);
    let info = || {
        ask_as(
            &nats,
            ADMIN,
            "$JS.API.CONSUMER.INFO.FILEPIPE_JOBS.workers-tree",
            b"",
        )
    };
    wait_until(Duration::from_secs(30), "the run's jobs queued", || {
        info()["num_pending"].as_u64().unwrap_or(0) > 0
    });
    let mut changed = info()["config"].clone();
    changed["ack_wait"] = serde_json::json!(5_000_000_000u64);
    let delete = || delete_workers_consumer(&nats, "tree");
    delete();
    let body = serde_json::json!({"stream_name": "FILEPIPE_JOBS", "config": changed});
    let made = ask_as(
        &nats,
        ADMIN,
        "$JS.API.CONSUMER.CREATE.FILEPIPE_JOBS.workers-tree",
        body.to_string().as_bytes(),
    );
    assert!(made.get("error").is_none(), "{made}");
    let said = |what: &str| fs::read_to_string(&log).unwrap_or_default().contains(what);
    wait_until(
        Duration::from_secs(30),
        "the coordinator to say the consumer is not as filepipe makes it",
        || said("is not as filepipe makes it (ack wait 5s"),
    );
    delete();
    let mut w = worker_cmd(&nats, &t.root());
    w.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let worker = Started::new(w);
    let r = coordinator.finish(Duration::from_secs(60));
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&worker),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    worker.finish(Duration::from_secs(30)).success();
    assert_eq!(r.success().summary()["done"], 3);
    let text = fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("is not as filepipe makes it").count(),
        1,
        "{text}"
    );
    assert!(text.contains("was gone: made again"), "{text}");
    assert_results(&t, 3);
}

/// A user who may read the streams' and consumers' counters but not the stored outcomes.
const LOOKER: (&str, &str) = ("looker", "l00ker-Pa55-for-test");

/// `status --queue` as a user who may not read the stored outcomes still prints the counters,
/// and says the workers seen are not known (it printed nothing, exit 2: found by a review).
#[test]
fn status_without_leave_to_read_outcomes_still_prints_the_counters() {
    let config = example().replacen(
        "  users = [\n",
        &format!(
            "  users = [\n    {{ user: {}, password: \"{}\", permissions: {{ publish = {{ allow = [\
             \"$JS.API.STREAM.INFO.>\", \"$JS.API.CONSUMER.LIST.FILEPIPE_JOBS\", \
             \"$JS.API.CONSUMER.INFO.FILEPIPE_JOBS.*\" ] }}, subscribe = {{ allow = [\"_INBOX.>\"] }} }} }}\n",
            LOOKER.0, LOOKER.1
        ),
        1,
    );
    let Some(nats) = server(&config) else {
        return;
    };
    make_streams(&nats, "tree").success();
    // An outcome stored, for the workers seen to be looked for.
    nats.publish_as(
        WORKER,
        "filepipe.outcomes.r1",
        br#"{"v":3,"run":"r1","worker":"w:1","outcomes":[]}"#,
    )
    .expect("the worker user may publish outcomes");
    let text = run(filepipe(&[
        s("status"),
        s("--queue"),
        s(&url_as(&nats, COORDINATOR)),
    ]))
    .success()
    .stdout();
    assert!(text.contains("workers seen\t1 "), "{text}");
    let out = run(filepipe(&[
        s("status"),
        s("--queue"),
        s(&url_as(&nats, LOOKER)),
    ]));
    let text = out.success().stdout();
    assert!(text.contains("root tree\tpending 0"), "{text}");
    assert!(text.contains("workers seen\tnot known: "), "{text}");
}
