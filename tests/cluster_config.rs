//! Cluster mode configured without a secret on any command line (issue 17): a worker from the
//! config file's `[worker]` table (`filepipe worker --config FILE`), `check-config` on that
//! table, and a coordinator (`batch`, `watch`, `status`) whose `--queue` given alone takes the
//! URL from `FILEPIPE_QUEUE`. Against a real `nats-server` that asks for a password; results
//! checked with the real gzip, and `ps` and /proc/PID/cmdline checked for the password.
#![cfg(feature = "cluster")]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::nats::*;
use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

/// The password the servers here ask for: no command line may show it.
const PASSWORD: &str = "s3cret-Pa55";

/// A server that lets in user `filepipe` with `PASSWORD` only, and the URL that holds both.
fn server_with_password() -> Option<(Nats, String)> {
    let nats = Nats::start_with(
        &[s("--user"), s("filepipe"), s("--pass"), s(PASSWORD)],
        "nats",
    )?;
    let host = nats.url.trim_start_matches("nats://").to_owned();
    let url = format!("nats://filepipe:{PASSWORD}@{host}");
    Some((nats, url))
}

/// Writes `body` to `path` with `mode`.
fn write_mode(path: &Path, body: &str, mode: u32) {
    fs::write(path, body).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// What every user can see of process `pid`'s command line: /proc/PID/cmdline, and `ps`'s
/// listing where there is a `ps`.
fn visible_command_line(pid: u32) -> String {
    let mut seen = String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ");
    if let Ok(ps) = Command::new("ps")
        .args(["-ww", "-o", "args=", "-p", &pid.to_string()])
        .output()
    {
        seen.push_str(&String::from_utf8_lossy(&ps.stdout));
    }
    seen
}

/// Every .gz under `dir` passes the real `gzip -t` and restores its input under `inputs`.
fn assert_outputs_of(dir: &Path, inputs: &Path) -> usize {
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

fn tree(files: usize) -> TestTree {
    let mut t = TestTree::new();
    for i in 0..files {
        t = t.file(
            format!("d{}/f{i}.log", i % 7),
            &text_bytes(300 + (i * 131) % 9_000, i as u64),
        );
    }
    t
}

/// `filepipe batch ROOT --queue` (no URL: it comes from FILEPIPE_QUEUE=`url`), started, its
/// log in a file beside the tree.
fn coordinator_from_env(t: &TestTree, url: &str, extra: &[&str]) -> (Started, PathBuf) {
    let log = t.side("coordinator.log");
    let mut cmd = filepipe(&[s("batch"), t.root().as_os_str(), s("--queue")]);
    cmd.args(["--op", "gzip", "--root-name", "tree", "--json", "-v"])
        .args(extra)
        .env("FILEPIPE_QUEUE", url)
        .env("XDG_STATE_HOME", t.side("xdg"))
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).unwrap());
    (Started::new(cmd), log)
}

#[test]
fn a_worker_started_with_only_a_config_file_does_the_jobs_of_a_coordinator_whose_url_is_in_its_environment(
) {
    let Some((_nats, url)) = server_with_password() else {
        return;
    };
    let t = tree(120);
    let archive = t.side("archive");
    fs::create_dir(&archive).unwrap();
    // Relative paths resolve against the file's directory, not the worker's.
    let config = t.side("worker.toml");
    write_mode(
        &config,
        &format!(
            "[worker]\nqueue = {url:?}\njobs = 2\ndurability = \"file\"\n\
             [worker.roots]\ntree = \"in\"\n[worker.out_roots]\narchive = \"archive\"\n"
        ),
        0o600,
    );
    let checked = run(filepipe(&[s("check-config"), config.as_os_str()]));
    let said = checked.success().stdout();
    assert!(said.contains("ok, a worker for roots tree"), "{said}");
    // The coordinator first: its jobs wait in the stream for the worker, and it runs (its
    // command line can be read) until they are done.
    let (coordinator, log) = coordinator_from_env(&t, &url, &["--out", archive.to_str().unwrap()]);
    wait_until(Duration::from_secs(60), "jobs published", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("jobs published"))
    });
    let seen = visible_command_line(coordinator.id());
    assert!(seen.contains("batch"), "not the coordinator's: {seen}");
    assert!(
        !seen.contains(PASSWORD),
        "the coordinator shows the password: {seen}"
    );
    // The worker: nothing but --config, and no FILEPIPE_QUEUE to fall back on, run from
    // another directory than the file's.
    let mut cmd = filepipe(&[s("worker"), s("--config"), config.as_os_str()]);
    cmd.env_remove("FILEPIPE_QUEUE").current_dir("/");
    let worker = Worker::ready(cmd, t.dir.path());
    let seen = visible_command_line(worker.pid());
    assert!(seen.contains("--config"), "not the worker's: {seen}");
    assert!(
        !seen.contains(PASSWORD),
        "the worker shows the password: {seen}"
    );
    let sum = coordinator
        .finish(Duration::from_secs(120))
        .code(0)
        .summary();
    assert_eq!(sum["files"], 120, "{sum}");
    assert_eq!(sum["done"], 120, "{sum}");
    assert_eq!(assert_outputs_of(&archive, &t.root()), 120);
    // `status --queue` alone reads the same variable.
    let mut status = filepipe(&[s("status"), s("--queue")]);
    status.env("FILEPIPE_QUEUE", &url);
    let shown = run(status).success().stdout();
    assert!(shown.contains("jobs"), "{shown}");
    assert!(!shown.contains(PASSWORD), "{shown}");
    // Neither log holds the password.
    let logs = format!("{}{}", fs::read_to_string(&log).unwrap(), worker.log());
    assert!(logs.contains("worker ready"), "{logs}");
    assert!(!logs.contains(PASSWORD), "the password logged: {logs}");
}

#[test]
fn flags_and_filepipe_queue_override_the_worker_table_a_root_by_its_name() {
    let Some((_nats, url)) = server_with_password() else {
        return;
    };
    let t = tree(30);
    // The file's URL leads nowhere and its root does not exist: the command line's replace
    // them (the root by its name), so the worker starts and does the jobs.
    let config = t.side("worker.toml");
    write_mode(
        &config,
        "[worker]\nqueue = \"nats://127.0.0.1:1\"\n[worker.roots]\ntree = \"no-such-dir\"\n",
        0o644,
    );
    let root = format!("tree={}", t.root().display());
    let mut cmd = filepipe(&[s("worker"), s("--config"), config.as_os_str()]);
    cmd.args(["--root", &root, "--jobs", "1"])
        .env("FILEPIPE_QUEUE", &url);
    let worker = Worker::ready(cmd, t.dir.path());
    let (coordinator, _) = coordinator_from_env(&t, &url, &[]);
    let sum = coordinator
        .finish(Duration::from_secs(120))
        .code(0)
        .summary();
    assert_eq!(sum["done"], 30, "{sum}");
    assert_eq!(assert_outputs_of(&t.root(), &t.root()), 30);
    // Said in its log, since a forgotten exported variable would otherwise go unnoticed.
    let log = worker.log();
    assert!(log.contains("overrides the config file's"), "{log}");
}

#[test]
fn check_config_refuses_bad_worker_tables_naming_the_line_and_key() {
    let t = TestTree::new().dir("sub");
    fs::create_dir(t.side("archive")).unwrap();
    let config = t.side("w.toml");
    let secret = t.side("queue.url");
    let with_password = format!("nats://filepipe:{PASSWORD}@127.0.0.1:4222");
    let table = |rest: &str| format!("[worker]\n{rest}");
    // (the file, its mode, what the error says)
    let cases: Vec<(String, u32, Vec<&str>)> = vec![
        (
            table("roots = { tree = \"in\" }\nbogus = 1\n"),
            0o644,
            vec!["unknown field `bogus`"],
        ),
        (
            table("roots = { tree = \"in\", gone = \"no-such-dir\" }\n"),
            0o644,
            vec!["w.toml:2: worker.roots.gone", "not reachable"],
        ),
        (
            table("roots = { tree = \"in\" }\nout_roots = { arch = \"in/sub\" }\n"),
            0o644,
            vec!["w.toml:3: worker.out_roots.arch", "inside the input root"],
        ),
        (
            table("roots = { tree = \"in\" }\nout_roots = { arch = \".\" }\n"),
            0o644,
            vec!["worker.out_roots.arch", "encloses the input root"],
        ),
        (
            table("roots = { tree = \"in\" }\nout_roots = { tree = \"archive\" }\n"),
            0o644,
            vec!["worker.out_roots.tree", "also an input root's name"],
        ),
        (
            table("roots = { \"a.b\" = \"in\" }\n"),
            0o644,
            vec!["worker.roots.a.b", "a root's name"],
        ),
        (table("jobs = 3\n"), 0o644, vec!["no root"]),
        (
            table("jobs = 0\nroots = { tree = \"in\" }\n"),
            0o644,
            vec!["w.toml:2: worker.jobs", "1 to 256"],
        ),
        (
            table("queue = \"nats://127.0.0.1:4222\"\nqueue_file = \"queue.url\"\nroots = { tree = \"in\" }\n"),
            0o644,
            vec!["worker.queue_file", "not both"],
        ),
        // A password in a file others can read: the file's mode, and the way out.
        (
            table(&format!("queue = {with_password:?}\nroots = {{ tree = \"in\" }}\n")),
            0o644,
            vec!["w.toml:2: worker.queue", "every user may read it", "chmod 600"],
        ),
        (
            table(&format!("queue = {with_password:?}\nroots = {{ tree = \"in\" }}\n")),
            0o660,
            vec!["worker.queue", "group", "may read it"],
        ),
        (
            table("queue_file = \"queue.url\"\nroots = { tree = \"in\" }\n"),
            0o600,
            vec!["worker.queue_file", "queue.url", "every user may read it"],
        ),
        // A key set above the table, where it would be the [[watch]] tables' and do nothing.
        (
            format!("jobs = 4\n{}", table("roots = { tree = \"in\" }\n")),
            0o644,
            vec!["jobs is set outside [worker]"],
        ),
        ("# nothing\n".to_string(), 0o644, vec!["no [[watch]] or [worker] table"]),
    ];
    for (body, mode, says) in &cases {
        write_mode(&config, body, *mode);
        // The queue file others can read (only the case that names it reads it).
        write_mode(&secret, &with_password, 0o644);
        let out = run(filepipe(&[s("check-config"), config.as_os_str()])).context(body);
        let err = out.code(2).stderr();
        for want in says {
            assert!(err.contains(want), "{body:?} should say {want:?}: {err}");
        }
        assert!(!err.contains(PASSWORD), "the password shown: {err}");
    }
    // What check-config refuses, the worker refuses at start, with the same words (exit 2,
    // which the unit does not restart on).
    write_mode(
        &config,
        &table("roots = { tree = \"in\", gone = \"no-such-dir\" }\n"),
        0o644,
    );
    let mut cmd = filepipe(&[s("worker"), s("--config"), config.as_os_str()]);
    cmd.env("FILEPIPE_QUEUE", "nats://127.0.0.1:1");
    let err = run(cmd).code(2).stderr();
    assert!(err.contains("w.toml:2: worker.roots.gone"), "{err}");
    // A private file may hold the password: mode 0600, or 0640 owned by root (for the
    // service's group), for the table itself or its queue_file.
    for (body, mode) in [
        (
            table(&format!(
                "queue = {with_password:?}\nroots = {{ tree = \"in\" }}\n"
            )),
            0o600,
        ),
        (
            table("queue_file = \"queue.url\"\nroots = { tree = \"in\" }\n"),
            0o644,
        ),
    ] {
        write_mode(&config, &body, mode);
        let secret_mode = if is_root() { 0o640 } else { 0o600 };
        write_mode(&secret, &with_password, secret_mode);
        let out = run(filepipe(&[s("check-config"), config.as_os_str()])).context(&body);
        assert!(
            out.success()
                .stdout()
                .contains("ok, a worker for roots tree"),
            "{}",
            out.stdout()
        );
    }
    // Without a URL, the worker's comes from its command line or environment.
    write_mode(&config, &table("roots = { tree = \"in\" }\n"), 0o644);
    let out = run(filepipe(&[s("check-config"), config.as_os_str()]));
    assert!(
        out.success().stdout().contains("FILEPIPE_QUEUE"),
        "{}",
        out.stdout()
    );
    // A [[watch]] table holds its coordinator's URL by the same rule.
    let watch = format!(
        "state_dir = {:?}\n[[watch]]\npath = \"in\"\nop = \"gzip\"\n",
        t.side("state").display().to_string()
    );
    write_mode(
        &config,
        &format!("{watch}queue = {with_password:?}\n"),
        0o644,
    );
    let err = run(filepipe(&[s("check-config"), config.as_os_str()]))
        .code(2)
        .stderr();
    assert!(err.contains("watch[0].queue"), "{err}");
    write_mode(
        &config,
        &format!("{watch}queue_file = \"queue.url\"\n"),
        0o644,
    );
    write_mode(&secret, &with_password, 0o600);
    run(filepipe(&[s("check-config"), config.as_os_str()])).success();
}

#[test]
fn a_coordinator_goes_to_the_queue_in_filepipe_queue_only_when_given_queue() {
    let t = tree(5);
    // Nothing listens on port 1: a run that went to it would fail with exit 2.
    let dead = "nats://127.0.0.1:1";
    // Without --queue, the variable is not a reason to leave this host.
    let mut cmd = filepipe(&[s("batch"), t.root().as_os_str(), s("--op"), s("gzip")]);
    cmd.arg("--json").env("FILEPIPE_QUEUE", dead);
    let sum = run(cmd).code(0).summary();
    assert_eq!(sum["done"], 5, "{sum}");
    assert_eq!(assert_outputs_of(&t.root(), &t.root()), 5);
    // With --queue alone, it is where the jobs go.
    let mut cmd = filepipe(&[s("batch"), t.root().as_os_str(), s("--op"), s("sha256")]);
    cmd.arg("--queue").env("FILEPIPE_QUEUE", dead);
    let err = run(cmd).code(2).stderr();
    assert!(
        err.contains("cannot connect to NATS at nats://127.0.0.1:1"),
        "{err}"
    );
    // And without the variable, --queue alone is a usage error that says where the URL goes.
    let state = t.side("state");
    for extra in [
        &["batch"][..],
        &["watch", "--state", state.to_str().unwrap()][..],
    ] {
        let mut cmd = filepipe(&[s(extra[0]), t.root().as_os_str(), s("--op"), s("sha256")]);
        cmd.args(&extra[1..])
            .arg("--queue")
            .env_remove("FILEPIPE_QUEUE");
        let err = run(cmd).code(2).stderr();
        assert!(err.contains("FILEPIPE_QUEUE"), "{extra:?}: {err}");
    }
    // Refused before anything was made.
    assert!(!state.exists());
    let mut cmd = filepipe(&[s("status"), s("--queue")]);
    cmd.env_remove("FILEPIPE_QUEUE");
    assert!(run(cmd).code(2).stderr().contains("FILEPIPE_QUEUE"));
    // Nothing was published anywhere, and no output written: the tree is as it was.
    assert!(temps_under(t.dir.path()).is_empty());
}
