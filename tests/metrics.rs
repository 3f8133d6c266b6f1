//! `--metrics ADDR:PORT`: a watch daemon's Prometheus metrics, scraped with the real curl and
//! validated with the real `promtool check metrics` (Debian package `prometheus`; SKIPPED
//! without it), and a port already in use refused at start (issue 20).

mod common;

use std::ffi::OsStr;
use std::fs;
use std::net::TcpListener;
use std::process::{Command, Stdio};

use common::*;

/// A loopback port free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// One sample's value: the first line that starts with `name{` and holds every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_watch_daemon_serves_metrics_that_promtool_accepts_and_that_count_what_it_did() {
    let t = TestTree::new().file("early.txt", &text_bytes(10_000, 1));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::ready(&t, &["--op", "gzip", "--metrics", &addr]);
    fs::write(t.path("a.log"), text_bytes(50_000, 2)).unwrap();
    fs::write(t.path("b.log"), noise_bytes(3_000, 3)).unwrap();
    // Named like an output: never taken, so never counted.
    fs::write(t.path("c.gz"), b"not really gzip").unwrap();
    d.wait_idle(3);
    let scraped = Command::new("curl")
        .args(["-sSf", &format!("http://{addr}/metrics")])
        .output()
        .expect("curl");
    assert!(scraped.status.success(), "{scraped:?}");
    let text = String::from_utf8(scraped.stdout).unwrap();
    let root = format!("pipeline=\"{}\"", t.root().display());
    let done = ["outcome=\"done\"", "op=\"gzip\"", &root];
    assert_eq!(
        sample(&text, "filepipe_files_total", &done),
        Some(3.0),
        "{text}"
    );
    let input = 10_000.0 + 50_000.0 + 3_000.0;
    assert_eq!(
        sample(&text, "filepipe_input_bytes_total", &[&root]),
        Some(input),
        "{text}"
    );
    assert!(sample(&text, "filepipe_output_bytes_total", &[&root]).is_some_and(|b| b > 0.0));
    assert_eq!(
        sample(&text, "filepipe_publish_delay_seconds_count", &[&root]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "filepipe_queued_files", &[&root]), Some(0.0));
    assert!(
        sample(&text, "filepipe_state_commit_timestamp_seconds", &[&root])
            .is_some_and(|t| t > 1.7e9),
        "{text}"
    );
    assert_eq!(
        sample(&text, "filepipe_build_info", &["version="]),
        Some(1.0)
    );
    d.stop().success();

    let Ok(mut promtool) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("SKIPPED: promtool check metrics (apt-get install prometheus)");
        return;
    };
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {out:?}\n{text}"
    );
}

#[test]
fn a_metrics_port_already_in_use_is_a_clear_error_at_start_from_the_flag_or_the_config() {
    let t = TestTree::new().dir("a");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let state = t.side("state");
    let mut cmd = filepipe(&[
        OsStr::new("watch"),
        t.root().as_os_str(),
        OsStr::new("--op"),
        OsStr::new("sha256"),
        OsStr::new("--state"),
        state.as_os_str(),
        OsStr::new("--metrics"),
        OsStr::new(&addr),
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let err = run(cmd).code(2).stderr();
    assert!(
        err.contains(&format!("cannot serve metrics on {addr}")),
        "{err}"
    );

    let config = t.side("c.toml");
    fs::write(
        &config,
        format!(
            "state_dir = {:?}\nmetrics = \"{addr}\"\n[[watch]]\npath = {:?}\nop = \"gzip\"\n",
            state.to_str().unwrap(),
            t.path("a").to_str().unwrap()
        ),
    )
    .unwrap();
    let mut cmd = filepipe(&[
        OsStr::new("watch"),
        OsStr::new("--config"),
        config.as_os_str(),
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let err = run(cmd).code(2).stderr();
    assert!(
        err.contains(&format!("cannot serve metrics on {addr}")),
        "{err}"
    );
    drop(busy);
}

/// Clients that connect and never finish their request hold none of the daemon's descriptors
/// beyond the few connections answered at once (found by a review: a thousand of them took
/// every descriptor, and inputs then failed for good), and are dropped after a few seconds;
/// the metrics are on `/metrics` only, for `GET` and `HEAD`.
#[test]
fn clients_that_never_finish_a_request_hold_no_more_than_a_few_descriptors() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let t = TestTree::new().file("a.txt", &text_bytes(1_000, 1));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::ready(&t, &["--op", "gzip", "--metrics", &addr]);
    d.wait_idle(1);
    let fds = || {
        fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    // Fewer than the listen backlog (128), so each connect completes at once.
    let slow: Vec<TcpStream> = (0..60)
        .map(|_| {
            let mut c = TcpStream::connect(&addr).unwrap();
            c.write_all(b"GET /metr").unwrap();
            c
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let during = fds();
    assert!(
        during <= before + 12,
        "{during} descriptors with 60 slow clients, {before} before"
    );
    // A scrape meanwhile is answered, well within Prometheus's 10 s timeout: idle clients
    // make room for it (a review's 100 idle clients kept one waiting 11.5 s; these 60 kept
    // one 7 s when a thread waited out each one's request deadline).
    let scrape = Command::new("curl")
        .args(["-sSf", "--max-time", "4", &format!("http://{addr}/metrics")])
        .output()
        .expect("curl");
    assert!(scrape.status.success(), "{scrape:?}");
    // Each is dropped within the deadline: the first ones are closed by now.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let mut first = &slow[0];
    let mut rest = Vec::new();
    first
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_eq!(first.read_to_end(&mut rest).unwrap_or(0), 0, "{rest:?}");
    drop(slow);
    let status = |method: &str, path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .args(["--max-time", "60", &format!("http://{addr}{path}")])
            .output()
            .expect("curl");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(status("GET", "/metrics"), "200");
    assert_eq!(status("GET", "/"), "404");
    assert_eq!(status("POST", "/metrics"), "405");
    d.stop().success();
}

/// An answered connection is read to its client's close (or for a moment), so that what a
/// client sent past its request (pipelined requests) does not have the close reset the
/// connection, which on a lossy link loses an answer still in flight; and that moment is spent
/// by one thread for every such connection, not by the threads that answer: 120 clients that
/// send a request and then neither read nor close kept a scrape waiting 3 s (found by a
/// review; the scrape below fails on the build before). (On loopback nothing is lost in
/// flight, so the pipelined client only checks that its answer is whole and alone.)
#[test]
fn answered_clients_that_linger_neither_lose_their_answer_nor_hold_up_a_scrape() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let t = TestTree::new().file("a.txt", &text_bytes(1_000, 1));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::ready(&t, &["--op", "gzip", "--metrics", &addr]);
    d.wait_idle(1);
    // Two requests at once, then more bytes once the answer is on its way.
    let mut c = TcpStream::connect(&addr).unwrap();
    c.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let _ = c.write_all(b"GET / HTTP/1.1\r\n\r\n");
    // Read late, as a busy client does: a reset that came meanwhile would lose the answer.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut answer = Vec::new();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    c.read_to_end(&mut answer)
        .expect("the answer, whole, then the end");
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    let length: usize = (head.lines())
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.parse().ok())
        .expect("a length");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body.len(), length, "{answer}");
    assert!(body.contains("filepipe_files_total"), "{body}");
    // Fewer than the listen backlog (128), so each connect completes at once.
    let idle: Vec<TcpStream> = (0..120)
        .map(|_| {
            let mut c = TcpStream::connect(&addr).unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    let scrape = Command::new("curl")
        .args(["-sSf", "--max-time", "2", &format!("http://{addr}/metrics")])
        .output()
        .expect("curl");
    assert!(scrape.status.success(), "{scrape:?}");
    drop(idle);
    d.stop().success();
}

/// Review finding (LOW): a pipeline a reload removed kept its queue gauges at what they last
/// held, so an alert on files queued while commits stop fired for a pipeline no longer there.
/// Its queues read 0 once it stops.
#[test]
fn a_pipeline_a_reload_removes_has_its_queues_read_zero() {
    let t = TestTree::new().dir("a").dir("b");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = t.side("filepipe.toml");
    let table = |dir: &str, settle: u32| {
        format!(
            "[[watch]]\npath = {:?}\nop = \"gzip\"\nsettle_ms = {settle}\n",
            t.path(dir)
        )
    };
    let head = format!("state_dir = \"state\"\nmetrics = \"{addr}\"\n");
    let both = format!("{head}{}{}", table("a", 100), table("b", 3_600_000));
    fs::write(&config, &both).unwrap();
    let socket = t.side("notify.sock");
    let n = Notifications::listen(&socket);
    let mut cmd = filepipe(&[
        OsStr::new("watch"),
        OsStr::new("--config"),
        config.as_os_str(),
    ]);
    cmd.env("NOTIFY_SOCKET", &socket)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = Started::new(cmd);
    wait_until(std::time::Duration::from_secs(60), "READY=1", || {
        n.has("READY=1")
    });
    // Waiting an hour to settle: queued.
    for i in 0..3 {
        fs::write(t.path(format!("b/{i}.txt")), b"waits\n").unwrap();
    }
    let b = format!("pipeline=\"{}\"", t.path("b").display());
    let queued = || {
        let scraped = Command::new("curl")
            .args(["-sSf", &format!("http://{addr}/metrics")])
            .output()
            .expect("curl");
        let text = String::from_utf8(scraped.stdout).unwrap_or_default();
        sample(&text, "filepipe_queued_files", &[&b])
    };
    wait_until(
        std::time::Duration::from_secs(60),
        "b's 3 files queued",
        || queued() == Some(3.0),
    );
    let readies = n.count("READY=1");
    fs::write(&config, format!("{head}{}", table("a", 100))).unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    wait_until(
        std::time::Duration::from_secs(60),
        "READY=1 after the reload",
        || n.count("READY=1") > readies,
    );
    assert_eq!(queued(), Some(0.0));
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    child.finish(std::time::Duration::from_secs(30)).success();
}
