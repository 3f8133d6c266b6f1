//! Upgrading a cluster: jobs newer than a worker knows (version 3, several results) that an
//! older worker refuses, and so leave the queue without an outcome, are published again until
//! an upgraded worker does them (batch and watch coordinators). From a hostile review; each
//! test here failed against the code it was written for.
#![cfg(feature = "cluster")]

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;

const OPS: &str = "sha256,blake3,zstd";

/// What a worker from before version 3 job messages does with one (its `Router::take`, as of
/// 16a9ca7^): `JobBatch::parse` refuses it (`"v":3` is not the version it computes for a
/// message without `out` or `remove_source`, and it does not know `ops`), and the message is
/// terminated: "Not a job anyone can run: never delivered again". Pulls from the workers'
/// consumer of `root` over the plain NATS protocol for `for_`, terminating every message as
/// such a worker does; returns the payloads it terminated.
fn a_worker_from_before_v3_takes(nats: &Nats, root: &str, for_: Duration) -> Vec<String> {
    let addr = nats.url.trim_start_matches("nats://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("INFO"), "{line}");
    write!(
        stream,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true}}\r\nSUB _INBOX.old 1\r\n"
    )
    .unwrap();
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.FILEPIPE_JOBS.workers-{root}");
    let request = br#"{"batch":16,"expires":400000000}"#;
    let mut taken = Vec::new();
    let until = Instant::now() + for_;
    while Instant::now() < until {
        write!(stream, "PUB {next} _INBOX.old {}\r\n", request.len()).unwrap();
        stream.write_all(request).unwrap();
        stream.write_all(b"\r\n").unwrap();
        let asked = Instant::now();
        while asked.elapsed() < Duration::from_millis(600) {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => panic!("the server hung up"),
                Ok(_) => {}
                Err(_) => break,
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("PING") => stream.write_all(b"PONG\r\n").unwrap(),
                Some("MSG") | Some("HMSG") => {
                    let total: usize = words.last().unwrap().parse().unwrap();
                    let mut body = vec![0; total + 2];
                    reader.read_exact(&mut body).unwrap();
                    body.truncate(total);
                    // A status (404 no messages, 408 timeout) has no reply subject.
                    let reply = match (words[0], words.len()) {
                        ("MSG", 5) | ("HMSG", 6) => words[3],
                        _ => continue,
                    };
                    if !reply.starts_with("$JS.ACK.") {
                        continue;
                    }
                    let payload = match words[0] {
                        "HMSG" => {
                            let hdr: usize = words[4].parse().unwrap();
                            body[hdr..].to_vec()
                        }
                        _ => body,
                    };
                    write!(stream, "PUB {reply} 5\r\n+TERM\r\n").unwrap();
                    taken.push(String::from_utf8_lossy(&payload).into_owned());
                }
                _ => {}
            }
        }
    }
    write!(stream, "PING\r\n").unwrap();
    stream.flush().unwrap();
    taken
}

/// README, "Scaling out": "A worker from before them refuses them without an outcome (...), so
/// a coordinator using `--out`, `--remove-source` or several results waits, warning every
/// 30 s (...), until an up-to-date worker takes its jobs: upgrade the workers before the
/// coordinators." A worker from before terminates the message it refuses, so no up-to-date
/// worker is ever given it: the coordinator waits for ever, upgraded workers or not.
#[test]
fn a_v3_job_refused_by_a_worker_from_before_is_still_done_once_an_upgraded_worker_runs() {
    let Some(nats) = Nats::start() else { return };
    let mut t = TestTree::new();
    for i in 0..5 {
        t = t.file(format!("f{i}"), &text_bytes(1000 + i, i as u64));
    }
    let root = format!("tree={}", t.root().display());
    // An upgraded worker, stopped at once: the workers' consumer exists, and nothing takes
    // the jobs but the old worker below.
    let mut first = Worker::start(&nats, t.dir.path(), std::slice::from_ref(&root), "1");
    first.kill();
    let sums = t.side("SUMS");
    let args = ["--op", OPS, "--manifest", sums.to_str().unwrap()];
    let (mut coordinator, log) = start_coordinator_logged(&nats, &t, &args, "jobs published");
    // A host not yet upgraded takes the jobs and refuses them, as it was written to.
    // (Every job of this run is version 3, so terminating each is what that worker does; a
    // queue that never gives it version 3 jobs is a way to pass this test.)
    let taken = a_worker_from_before_v3_takes(&nats, "tree", Duration::from_secs(3));
    for job in &taken {
        assert!(job.contains(r#""v":3"#), "{job}");
    }
    eprintln!(
        "the worker from before terminated {} job messages",
        taken.len()
    );
    // The operator then upgrades the workers, as the stall warning tells them to.
    let _upgraded = Worker::start(&nats, t.dir.path(), std::slice::from_ref(&root), "1");
    // Past the coordinator's 30 s stall warning, and long enough for the upgraded worker.
    let limit = Instant::now() + Duration::from_secs(75);
    while coordinator.try_wait().unwrap().is_none() && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(100));
    }
    let waiting = coordinator.try_wait().unwrap().is_none();
    if waiting {
        coordinator.kill().unwrap();
    }
    let logged = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !waiting,
        "the coordinator still waits for the jobs a worker from before terminated, with an \
         upgraded worker running:\n{logged}"
    );
    let sum = coordinator
        .finish(Duration::from_secs(10))
        .code(0)
        .summary();
    assert_eq!(sum["done"].as_u64(), Some(5), "{sum}");
    // And the coordinator said why it published them again.
    assert!(
        logged.contains("a worker that does not know job version 3 refused them; republished"),
        "{logged}"
    );
}

/// Watch mode gathers outcomes through the same code: a settled file whose version 3 job a
/// worker from before terminated is published again, and recorded (listed in both manifests,
/// its `.zst` made) once an upgraded worker runs.
#[test]
fn a_watching_coordinator_republishes_the_v3_jobs_a_worker_from_before_refused() {
    let Some(nats) = Nats::start() else { return };
    let t = TestTree::new();
    let root = format!("tree={}", t.root().display());
    let mut first = Worker::start(&nats, t.dir.path(), std::slice::from_ref(&root), "1");
    first.kill();
    let sums = t.side("SUMS");
    let args = [
        "--op",
        OPS,
        "--manifest",
        sums.to_str().unwrap(),
        "--queue",
        &nats.url,
        "--root-name",
        "tree",
    ];
    let d = Daemon::ready(&t, &args);
    for i in 0..5 {
        fs::write(t.path(format!("f{i}")), text_bytes(1000 + i, i as u64)).unwrap();
    }
    let taken = a_worker_from_before_v3_takes(&nats, "tree", Duration::from_secs(3));
    assert!(!taken.is_empty(), "the worker from before was given no job");
    for job in &taken {
        assert!(job.contains(r#""v":3"#), "{job}");
    }
    let _upgraded = Worker::start(&nats, t.dir.path(), std::slice::from_ref(&root), "1");
    d.wait_idle(5);
    let listed = |m: &std::path::Path| {
        fs::read_to_string(m)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .count()
    };
    let b3 = t.side("SUMS.blake3");
    wait_until(
        Duration::from_secs(30),
        "both manifests list 5 files",
        || listed(&sums) == 5 && listed(&b3) == 5,
    );
    for (checker, m) in [("sha256sum", &sums), ("b3sum", &b3)] {
        let out = tool(checker, &["-c".as_ref(), m.as_os_str()], &t.root());
        assert!(
            out.status.success(),
            "{checker} -c {}: {out:?}",
            m.display()
        );
    }
    for i in 0..5 {
        let zst = t.path(format!("f{i}.zst"));
        let back = tool("zstd", &["-dc".as_ref(), zst.as_os_str()], &t.root());
        assert!(back.status.success(), "{}: {back:?}", zst.display());
        assert_eq!(back.stdout, text_bytes(1000 + i, i as u64));
    }
    let stopped = d.stop();
    let logged = stopped.success().stderr();
    assert!(
        logged.contains("a worker that does not know job version 3 refused them; republished"),
        "{logged}"
    );
}
