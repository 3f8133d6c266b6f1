//! Cluster mode configured without a secret on any command line (issue 17): a worker from the
//! config file's `[worker]` table (`filepipe worker --config FILE`), `check-config` on that
//! table, and a coordinator (`batch`, `watch`, `status`) whose `--queue` given alone takes the
//! URL from `FILEPIPE_QUEUE`. Against a real `nats-server` that asks for a password; results
//! checked with the real gzip, and `ps` and /proc/PID/cmdline checked for the password. Then
//! what a hostile review of the `[worker]` table found (each of those tests failed before its
//! fix): a password shown by an error or a log, or let through the rule that a file holding
//! one be private (a URL without a scheme, an unencoded `/` or `,`, a TOML error quoting the
//! line, a `queue` key under `[worker.roots]`, an ACL, a creds file), a file others may change,
//! an empty path mapping the config's own directory, an empty `FILEPIPE_QUEUE`, and
//! check-config missing the worker's start checks; and from a second review, a CA file
//! others may change or replace, a `[[watch]]` table's creds not checked when the file is
//! loaded, and a creds or CA file read again by its path after it was checked.
#![cfg(feature = "cluster")]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cluster::assert_outputs_of;
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
    fs::create_dir_all(t.side("archive").join("sub")).unwrap();
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
        // Nested output roots: `sub/x` to one and `x` to the other are the same output.
        (
            table("roots = { tree = \"in\" }\nout_roots = { oa = \"archive\", ob = \"archive/sub\" }\n"),
            0o644,
            vec!["worker.out_roots.oa", "output roots must be apart"],
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

/// A temp tree with an input root `in/` and a config file `worker.toml` holding `body`
/// (`{in}` replaced by the input root's path) with `mode`; the config's absolute path.
fn worker_file(body: &str, mode: u32) -> (TestTree, std::path::PathBuf) {
    let t = TestTree::new().file("a.txt", b"hello\n");
    let path = t.side("worker.toml");
    let body = body.replace("{in}", &t.root().display().to_string());
    write_mode(&path, &body, mode);
    (t, path)
}

/// `filepipe check-config FILE`, with no queue in the environment.
fn check_config(path: &Path) -> Run {
    let mut cmd = filepipe(&[s("check-config"), path.as_os_str()]);
    cmd.env_remove("FILEPIPE_QUEUE");
    run(cmd)
}

/// `filepipe worker --config FILE`, with no queue in the environment: every queue here is a
/// closed loopback port (or no URL at all), so it fails at start.
fn worker_config(path: &Path) -> Run {
    let mut cmd = filepipe(&[s("worker"), s("--config"), path.as_os_str()]);
    cmd.env_remove("FILEPIPE_QUEUE");
    run(cmd)
}

/// Neither stdout nor stderr of `r` shows the password.
fn assert_hidden(r: &Run, what: &str) {
    for (name, out) in [("stdout", r.stdout()), ("stderr", r.stderr())] {
        assert!(
            !out.contains(PASSWORD),
            "{what}: the password is shown on {name}:\n{out}"
        );
    }
}

/// async-nats takes a URL without a scheme (`user:pass@host:4222`, nats:// assumed), and the
/// worker connects with its user and password; a file others can read must not hold one.
#[test]
fn a_url_without_a_scheme_is_held_to_the_private_file_rule() {
    let body = format!(
        "[worker]\nqueue = \"filepipe:{PASSWORD}@127.0.0.1:4222\"\n[worker.roots]\nin = \"{{in}}\"\n"
    );
    let (_t, path) = worker_file(&body, 0o644);
    let r = check_config(&path);
    r.code(2);
    assert!(
        r.stderr().contains("password"),
        "the refusal should say why: {}",
        r.stderr()
    );
    assert_hidden(&r, "check-config");
}

/// The same URL in a private file: the worker's errors (and its log) show it redacted.
#[test]
fn a_worker_shows_a_url_without_a_scheme_redacted() {
    let body = format!(
        "[worker]\nqueue = \"filepipe:{PASSWORD}@127.0.0.1:1\"\n[worker.roots]\nin = \"{{in}}\"\n"
    );
    let (_t, path) = worker_file(&body, 0o600);
    let r = worker_config(&path);
    r.code(2);
    assert_hidden(&r, "worker --config, server unreachable");
}

/// A password with a `/` or `,` left unencoded (base64 passwords have `/`) is still a password:
/// a readable file holding it is refused, and no error shows it.
#[test]
fn a_password_with_an_unencoded_slash_or_comma_is_a_password_never_shown() {
    for sep in ["/", ","] {
        let body = format!(
            "[worker]\nqueue = \"nats://filepipe:ab{sep}{PASSWORD}@127.0.0.1:1\"\n[worker.roots]\nin = \"{{in}}\"\n"
        );
        let (_t, readable) = worker_file(&body, 0o644);
        let r = check_config(&readable).context(sep);
        r.code(2);
        assert_hidden(&r, "check-config, mode 644");
        let (_t2, private) = worker_file(&body, 0o600);
        let r = worker_config(&private).context(sep);
        // Refused with the way out, not sent as a host name.
        assert!(
            r.code(2).stderr().contains("percent-encoded"),
            "{}",
            r.stderr()
        );
        assert_hidden(&r, "worker --config, mode 600");
    }
}

/// A mistake in a private file that holds a password (a key misspelt, the `[worker]` header
/// forgotten, a quote missing) is an error naming the line, not one quoting it: the error
/// goes to the journal, which more users read than the file.
#[test]
fn toml_errors_name_the_line_without_quoting_it() {
    let url = format!("nats://filepipe:{PASSWORD}@127.0.0.1:1");
    let cases = [
        (
            "a misspelt key",
            format!("[worker]\nqueu = \"{url}\"\n[worker.roots]\nin = \"{{in}}\"\n"),
        ),
        (
            "no [worker] header",
            format!("queue = \"{url}\"\n[worker.roots]\nin = \"{{in}}\"\n"),
        ),
        (
            "an unterminated string",
            format!("[worker]\nqueue = \"{url}\n[worker.roots]\nin = \"{{in}}\"\n"),
        ),
    ];
    for (what, body) in cases {
        let (_t, path) = worker_file(&body, 0o600);
        let r = check_config(&path).context(what);
        r.code(2);
        assert_hidden(&r, &format!("check-config, {what}"));
        let r = worker_config(&path).context(what);
        r.code(2);
        assert_hidden(&r, &format!("worker --config, {what}"));
    }
}

/// `queue` written after `[worker.roots]` (the mistake the README warns of) is a root named
/// "queue" whose path is the URL: the error about that root must not print the URL.
#[test]
fn a_queue_key_under_worker_roots_is_refused_without_showing_it() {
    let body = format!(
        "[worker]\n[worker.roots]\nin = \"{{in}}\"\nqueue = \"nats://filepipe:{PASSWORD}@127.0.0.1:1\"\n"
    );
    let (_t, path) = worker_file(&body, 0o600);
    let r = check_config(&path);
    r.code(2);
    assert_hidden(&r, "check-config");
    let r = worker_config(&path);
    r.code(2);
    assert_hidden(&r, "worker --config");
}

/// `in = ""` is no path, as `--root in=` is refused: it must not map the config file's own
/// directory (/etc/filepipe, with the file and its password in it) as a root jobs may read,
/// and have compressed or hashed into an output root.
#[test]
fn an_empty_path_in_the_worker_table_is_refused_not_the_config_files_directory() {
    let (t, path) = worker_file(
        "[worker]\nqueue = \"nats://127.0.0.1:1\"\n[worker.roots]\nin = \"\"\n",
        0o600,
    );
    assert!(path.is_absolute());
    let r = check_config(&path);
    r.code(2);
    assert!(
        !r.stdout().contains("ok"),
        "check-config accepted an empty root path, mapping {}: {}",
        t.side("").display(),
        r.stdout()
    );
    assert!(
        r.stderr().contains("worker.roots.in: an empty path"),
        "{}",
        r.stderr()
    );
    // Nor any other path of the table.
    let out = t.side("out");
    fs::create_dir(&out).unwrap();
    for key in [
        "creds = \"\"",
        "tls_ca = \"\"",
        "failure_log = \"\"",
        "queue_file = \"\"",
        "out_roots = { o = \"\" }",
    ] {
        let body = format!("[worker]\n{key}\n[worker.roots]\nin = \"{{in}}\"\n");
        let (_t, path) = worker_file(&body, 0o600);
        let err = check_config(&path).context(key).code(2).stderr();
        assert!(err.contains("an empty path"), "{key}: {err}");
    }
}

/// Mode 640 owned by root lets the group read; an ACL entry for another user shows in the
/// group bits as the mask (still r--), and lets that user read the password too. ssh and
/// PostgreSQL see only the mode; a rule stated as "only the owner, or root's group" must see
/// the ACL.
#[test]
fn the_private_file_rule_sees_an_acl_granting_another_user_read() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (a root-owned file)");
        return;
    }
    let body = format!(
        "[worker]\nqueue = \"nats://filepipe:{PASSWORD}@127.0.0.1:1\"\n[worker.roots]\nin = \"{{in}}\"\n"
    );
    let (t, path) = worker_file(&body, 0o640);
    // The temp dir is 0700: let nobody reach the file (and only the file).
    fs::set_permissions(t.side(""), fs::Permissions::from_mode(0o711)).unwrap();
    // system.posix_acl_access: version 2, then (tag, perm, id) entries: user::rw-,
    // user:65534:r--, group::r--, mask::r--, other::---.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, 65534),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    if let Err(e) = rustix::fs::setxattr(
        &path,
        "system.posix_acl_access",
        &acl,
        rustix::fs::XattrFlags::empty(),
    ) {
        eprintln!("SKIPPED: no POSIX ACLs here ({e})");
        return;
    }
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // The precondition: nobody reads the password.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(PASSWORD),
        "the ACL should let nobody read the file: {out:?}"
    );
    let r = check_config(&path);
    assert!(r.code(2).stderr().contains("ACL"), "{}", r.stderr());
    assert_hidden(&r, "check-config");
}

/// An env file left with `FILEPIPE_QUEUE=` (empty; the unit's EnvironmentFile is optional
/// and says it may set the URL) sets no URL: a coordinator's `--queue` takes it as unset, and
/// the worker must keep its config file's queue rather than refuse to start for want of one.
#[test]
fn an_empty_filepipe_queue_is_unset_and_leaves_the_config_files_queue() {
    let Some(nats) = Nats::start() else { return };
    let t = TestTree::new().file("a.txt", b"hello\n");
    let path = t.side("worker.toml");
    write_mode(
        &path,
        &format!(
            "[worker]\nqueue = \"{}\"\n[worker.roots]\nin = \"{}\"\n",
            nats.url,
            t.root().display()
        ),
        0o600,
    );
    let mut cmd = filepipe(&[s("worker"), s("--config"), path.as_os_str()]);
    cmd.env("FILEPIPE_QUEUE", "");
    let w = Worker::ready(cmd, &t.side(""));
    assert!(w.pid() != 0);
}

/// systemd/README.md: "`check-config` applies the same rule, and every other check the worker
/// makes at start". The worker refuses (exit 2, not restarted) a failure log it cannot open, a
/// CA file or a credentials file that is not there; check-config must say so first, as it does
/// for a `[[watch]]` table's failure log.
#[test]
fn check_config_makes_the_workers_start_checks() {
    let cases = [
        (
            "failure_log in a missing directory",
            "failure_log = \"nodir/failures.jsonl\"",
        ),
        ("a missing tls_ca", "tls_ca = \"missing-ca.pem\""),
        ("a missing creds file", "creds = \"missing.creds\""),
    ];
    for (what, key) in cases {
        let body = format!(
            "[worker]\nqueue = \"nats://127.0.0.1:1\"\n{key}\n[worker.roots]\nin = \"{{in}}\"\n"
        );
        let (_t, path) = worker_file(&body, 0o600);
        // The worker refuses it at start, before it reaches for the server...
        worker_config(&path).context(what).code(2);
        // ...so check-config, which says it checks what the worker checks, must too.
        check_config(&path).context(what).code(2);
    }
}

/// End to end, against a server that asks for the password: a world-readable config file
/// whose URL has no scheme (`filepipe:PASSWORD@HOST:PORT`, which the client takes as nats://)
/// must be refused, as the same URL with nats:// is; the worker must not log in with it, nor
/// log it.
#[test]
fn a_worker_refuses_a_readable_config_whose_url_without_a_scheme_holds_the_password() {
    let Some(nats) = Nats::start_with(
        &[s("--user"), s("filepipe"), s("--pass"), s(PASSWORD)],
        "nats",
    ) else {
        return;
    };
    let host = nats.url.trim_start_matches("nats://");
    let body = format!(
        "[worker]\nqueue = \"filepipe:{PASSWORD}@{host}\"\n[worker.roots]\nin = \"{{in}}\"\n"
    );
    let (t, path) = worker_file(&body, 0o644);
    let log = t.side("worker.log");
    let mut child = filepipe(&[s("worker"), s("--config"), path.as_os_str()])
        .env_remove("FILEPIPE_QUEUE")
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Until it exits, or says it is ready (bound to the queue with the password).
    let limit = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("worker ready")
        {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        assert!(
            std::time::Instant::now() < limit,
            "the worker neither exited nor got ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains(PASSWORD),
        "the worker's log shows the password:\n{text}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "a world-readable file with the password: the worker should refuse it:\n{text}"
    );
}

/// Like ssh's StrictModes: a config file with a `[worker]` table, or the `queue_file` it names,
/// that another user may change (the group or others have `w`, or another user owns it) is
/// refused, password or not: it says where the jobs come from and which directories they may
/// read and write.
#[test]
fn a_worker_file_or_queue_file_others_may_change_is_refused() {
    let body = "[worker]\nqueue = \"nats://127.0.0.1:1\"\n[worker.roots]\nin = \"{in}\"\n";
    for mode in [0o664, 0o646, 0o620] {
        let (_t, path) = worker_file(body, mode);
        let err = check_config(&path).context(mode).code(2).stderr();
        assert!(err.contains("chmod go-w"), "{mode:o}: {err}");
        let err = worker_config(&path).context(mode).code(2).stderr();
        assert!(err.contains("chmod go-w"), "{mode:o}: {err}");
    }
    // Readable by all, with no secret: fine.
    let (t, path) = worker_file(body, 0o644);
    check_config(&path).success();
    // A queue_file without a secret, but writable by the group.
    let queue = t.side("queue.url");
    write_mode(&queue, "nats://127.0.0.1:1\n", 0o664);
    let body = "[worker]\nqueue_file = \"queue.url\"\n[worker.roots]\nin = \"{in}\"\n";
    let path = t.side("worker.toml");
    write_mode(
        &path,
        &body.replace("{in}", &t.root().display().to_string()),
        0o600,
    );
    let err = check_config(&path).code(2).stderr();
    assert!(
        err.contains("queue.url") && err.contains("chmod go-w"),
        "{err}"
    );
    write_mode(&queue, "nats://127.0.0.1:1\n", 0o644);
    check_config(&path).success();
    if is_root() {
        // Owned by another user, who may chmod it and write it.
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = check_config(&path).code(2).stderr();
        assert!(err.contains("owned by user 65534"), "{err}");
    }
}

/// A config file whose `[[watch]]` table has a queue (a coordinator's) is held to the rule a
/// `[worker]` table's file is: it says where the jobs go, where outcomes come from (a server
/// answering for files it never saw would have them recorded done) and which credentials to
/// use, so no other user may change it. A watch table without a queue is not (as before).
#[test]
fn a_coordinators_config_others_may_change_is_refused() {
    let t = TestTree::new().file("a.txt", b"hello\n");
    let path = t.side("watch.toml");
    let root = t.root().display().to_string();
    let with_queue =
        format!("[[watch]]\npath = \"{root}\"\nop = \"sha256\"\nqueue = \"nats://127.0.0.1:1\"\n");
    for mode in [0o664, 0o646, 0o620] {
        write_mode(&path, &with_queue, mode);
        let err = check_config(&path).context(mode).code(2).stderr();
        assert!(
            err.contains("watch.toml:4: watch[0].queue: ") && err.contains("chmod go-w"),
            "{mode:o}: {err}"
        );
    }
    write_mode(&path, &with_queue, 0o644);
    check_config(&path).success();
    if is_root() {
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = check_config(&path).code(2).stderr();
        assert!(err.contains("owned by user 65534"), "{err}");
        std::os::unix::fs::chown(&path, Some(0), None).unwrap();
    }
    let local = format!("[[watch]]\npath = \"{root}\"\nop = \"sha256\"\n");
    write_mode(&path, &local, 0o664);
    check_config(&path).success();
}

/// A queue_file holding a URL without a scheme with a password, or a word that may be a
/// token pasted alone, is held to the private-file rule, and never shown.
#[test]
fn a_queue_file_with_a_url_without_a_scheme_or_a_bare_token_must_be_private() {
    let body = "[worker]\nqueue_file = \"queue.url\"\n[worker.roots]\nin = \"{in}\"\n";
    for url in [
        format!("filepipe:{PASSWORD}@127.0.0.1:1"),
        PASSWORD.to_string(),
    ] {
        let (t, path) = worker_file(body, 0o600);
        let queue = t.side("queue.url");
        write_mode(&queue, &url, 0o644);
        let r = check_config(&path).context(&url);
        assert!(
            r.code(2).stderr().contains("every user may read it"),
            "{}",
            r.stderr()
        );
        assert_hidden(&r, "check-config, queue_file 644");
        // Private, it is taken, and the worker's errors do not show it.
        write_mode(&queue, &url, 0o600);
        check_config(&path).context(&url).success();
        let r = worker_config(&path).context(&url);
        r.code(2);
        assert_hidden(&r, "worker --config, queue_file 600");
    }
}

/// A credentials file holds an nkey seed: held to the private-file rule (and to StrictModes)
/// by check-config, the worker, and a coordinator given --creds, before any connection.
#[test]
fn a_creds_file_must_be_private() {
    let body = "[worker]\nqueue = \"nats://127.0.0.1:1\"\ncreds = \"w.creds\"\n[worker.roots]\nin = \"{in}\"\n";
    let (t, path) = worker_file(body, 0o600);
    let creds = t.side("w.creds");
    write_mode(&creds, "-----BEGIN USER NKEY SEED-----\nSUAX\n", 0o644);
    let err = check_config(&path).code(2).stderr();
    assert!(
        err.contains("w.creds") && err.contains("nkey seed"),
        "{err}"
    );
    let err = worker_config(&path).code(2).stderr();
    assert!(err.contains("nkey seed"), "{err}");
    let mut cmd = filepipe(&[s("batch"), t.root().as_os_str(), s("--op"), s("sha256")]);
    cmd.args(["--queue", "nats://127.0.0.1:1", "--creds"])
        .arg(&creds);
    let err = run(cmd).code(2).stderr();
    assert!(err.contains("nkey seed"), "{err}");
    write_mode(&creds, "-----BEGIN USER NKEY SEED-----\nSUAX\n", 0o600);
    check_config(&path).success();
}

/// `chmod MODE DIR`.
fn chmod(dir: &Path, mode: u32) {
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).unwrap();
}

/// `filepipe batch ROOT --op sha256 --queue (closed port) --creds CREDS`: refused at start.
fn coordinator_with_creds(t: &TestTree, creds: &Path) -> Run {
    let mut cmd = filepipe(&[s("batch"), t.root().as_os_str(), s("--op"), s("sha256")]);
    cmd.args(["--queue", "nats://127.0.0.1:1", "--creds"])
        .arg(creds);
    run(cmd)
}

/// Like ssh's StrictModes, the directories above a config file with a `[worker]` table, a
/// `queue_file` and a creds file (their resolved path, up to /) are held to the rule the file
/// is: owned by root or the user filepipe runs as, no `w` for the group or others (unless
/// sticky, like /tmp), no ACL entry granting `w`; whoever may write a directory may replace
/// the file in it with their own. Refused by check-config, the worker and a coordinator given
/// `--creds`, naming the directory; a directory two levels up counts as much as the parent.
#[test]
fn a_directory_above_a_worker_file_queue_file_or_creds_others_may_change_is_refused() {
    let t = TestTree::new().file("a.txt", b"hello\n");
    // etc/filepipe/{worker.toml, queue.url, w.creds} beside the tree; the temp dir is 0700.
    let etc = t.side("etc");
    let dir = etc.join("filepipe");
    fs::create_dir_all(&dir).unwrap();
    chmod(&etc, 0o755);
    chmod(&dir, 0o755);
    let config = dir.join("worker.toml");
    let queue = dir.join("queue.url");
    let creds = dir.join("w.creds");
    write_mode(
        &config,
        &format!(
            "[worker]\nqueue = \"nats://127.0.0.1:1\"\ncreds = \"w.creds\"\n[worker.roots]\nin = \"{}\"\n",
            t.root().display()
        ),
        0o600,
    );
    write_mode(&creds, "-----BEGIN USER NKEY SEED-----\nSUAX\n", 0o600);
    write_mode(&queue, "nats://127.0.0.1:1\n", 0o644);
    let with_queue_file = t.side("queue-file.toml");
    write_mode(
        &with_queue_file,
        &format!(
            "[worker]\nqueue_file = \"{}\"\n[worker.roots]\nin = \"{}\"\n",
            queue.display(),
            t.root().display()
        ),
        0o600,
    );
    check_config(&config).success();
    check_config(&with_queue_file).success();
    let refused = |what: &str, d: &Path, says: &str| {
        let shown = d.display().to_string();
        for (name, r) in [
            ("check-config", check_config(&config)),
            ("worker --config", worker_config(&config)),
            ("check-config, queue_file", check_config(&with_queue_file)),
            ("batch --creds", coordinator_with_creds(&t, &creds)),
        ] {
            let err = r.context(format!("{what}: {name}")).code(2).stderr();
            assert!(
                err.contains(&format!("the directory {shown} above it")) && err.contains(says),
                "{what}: {name}: {err}"
            );
        }
    };
    for (d, mode) in [(&dir, 0o777), (&dir, 0o775), (&etc, 0o757), (&etc, 0o770)] {
        chmod(d, mode);
        refused(&format!("{mode:o}"), d, "chmod go-w");
        chmod(d, 0o755);
    }
    // Sticky, like /tmp: no one else may rename or remove what they do not own.
    chmod(&etc, 0o1777);
    check_config(&config).success();
    check_config(&with_queue_file).success();
    // (The seed here is no real one: taken, the client then fails to parse it.)
    let err = coordinator_with_creds(&t, &creds).code(2).stderr();
    assert!(err.contains("neither a credentials file"), "{err}");
    chmod(&etc, 0o755);
    // An ACL entry granting another user write, the mode showing only its mask (g+w).
    match Command::new("setfacl")
        .args(["-m", "u:65534:rwx"])
        .arg(&dir)
        .output()
    {
        Ok(out) if out.status.success() => {
            refused("an ACL entry", &dir, "ACL entry that lets user 65534");
            let out = Command::new("setfacl")
                .arg("-b")
                .arg(&dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            check_config(&config).success();
        }
        Ok(out) => eprintln!("SKIPPED: no POSIX ACLs here: {out:?}"),
        Err(e) => eprintln!("SKIPPED: no setfacl (Debian's acl package): {e}"),
    }
    if is_root() {
        // Owned by another user, who may chmod it and replace the file.
        std::os::unix::fs::chown(&etc, Some(65534), None).unwrap();
        refused("owned by 65534", &etc, "owned by user 65534");
        std::os::unix::fs::chown(&etc, Some(0), None).unwrap();
        check_config(&config).success();
    }
}

/// etc/filepipe (0755, beside the tree `t`, in a 0700 temp dir) holding a CA file in its own
/// directory (tls/ca.pem, 0644), a creds file (0600), a config with a `[worker]` table and one
/// with a `[[watch]]` table naming them (0600); the directory's path.
fn etc_with_ca_and_creds(t: &TestTree) -> PathBuf {
    let etc = t.side("etc");
    let dir = etc.join("filepipe");
    fs::create_dir_all(&dir).unwrap();
    chmod(&etc, 0o755);
    chmod(&dir, 0o755);
    fs::create_dir(dir.join("tls")).unwrap();
    chmod(&dir.join("tls"), 0o755);
    // No real certificate: the rules are checked before the contents are parsed.
    write_mode(
        &dir.join("tls/ca.pem"),
        "# no certificate here yet\n",
        0o644,
    );
    write_mode(
        &dir.join("w.creds"),
        "-----BEGIN USER NKEY SEED-----\nSUAX\n",
        0o600,
    );
    let root = t.root().display().to_string();
    let queue = "queue = \"nats://127.0.0.1:1\"\ncreds = \"w.creds\"\ntls_ca = \"tls/ca.pem\"\n";
    write_mode(
        &dir.join("worker.toml"),
        &format!("[worker]\n{queue}[worker.roots]\nin = \"{root}\"\n"),
        0o600,
    );
    write_mode(
        &dir.join("watch.toml"),
        &format!("[[watch]]\npath = \"{root}\"\nop = \"sha256\"\n{queue}"),
        0o600,
    );
    dir
}

/// `filepipe ARGS.. --queue (closed port) FLAG FILE`, a coordinator (`batch`) or `status`.
fn queue_client(args: &[&OsStr], flag: &str, file: &Path) -> Run {
    let mut cmd = filepipe(args);
    cmd.args(["--queue", "nats://127.0.0.1:1", flag]).arg(file);
    run(cmd)
}

/// A CA file says which servers to trust: anyone may read it, but whoever may change it, or
/// replace it (a directory above it), may have filepipe trust their own server. Held to the
/// rule a worker's config is, by check-config (`[worker]` and `[[watch]]` tables), the worker
/// and a coordinator or `status` given `--tls-ca`, before any connection: exit 2, naming the
/// file and the reason. (Before, only its existence was checked.)
#[test]
fn a_ca_file_anyone_may_read_but_others_may_change_or_replace_is_refused() {
    let t = TestTree::new().file("a.txt", b"hello\n");
    let dir = etc_with_ca_and_creds(&t);
    let (ca, worker, watch) = (
        dir.join("tls/ca.pem"),
        dir.join("worker.toml"),
        dir.join("watch.toml"),
    );
    let root = t.root();
    let batch = [s("batch"), root.as_os_str(), s("--op"), s("sha256")];
    let refused = |what: &str, says: &[&str]| {
        for (name, r) in [
            ("check-config [worker]", check_config(&worker)),
            ("worker --config", worker_config(&worker)),
            ("check-config [[watch]]", check_config(&watch)),
            ("batch --tls-ca", queue_client(&batch, "--tls-ca", &ca)),
            (
                "status --tls-ca",
                queue_client(&[s("status")], "--tls-ca", &ca),
            ),
        ] {
            let err = r.context(format!("{what}: {name}")).code(2).stderr();
            assert!(
                err.contains(&format!("{}: it says which servers to trust", ca.display()))
                    && says.iter().all(|w| err.contains(w)),
                "{what}: {name}: {err}"
            );
        }
    };
    // World-readable is fine: a CA's certificates are public.
    check_config(&worker).success();
    check_config(&watch).success();
    for mode in [0o666, 0o646, 0o664] {
        chmod(&ca, mode);
        refused(
            &format!("ca.pem {mode:o}"),
            &[&format!("{mode:04o}"), "chmod go-w it"],
        );
    }
    chmod(&ca, 0o644);
    // Its own directory: group- or world-writable, or another user's.
    let tls = dir.join("tls");
    for (d, mode) in [(&tls, 0o775), (&tls, 0o757)] {
        chmod(d, mode);
        let above = format!("the directory {} above it", d.display());
        refused(
            &format!("{} {mode:o}", d.display()),
            &[&above, "chmod go-w"],
        );
        chmod(d, 0o755);
    }
    check_config(&worker).success();
    if is_root() {
        std::os::unix::fs::chown(&ca, Some(65534), None).unwrap();
        refused("ca.pem owned by 65534", &["owned by user 65534"]);
        std::os::unix::fs::chown(&ca, Some(0), None).unwrap();
        std::os::unix::fs::chown(&tls, Some(65534), None).unwrap();
        let above = format!("the directory {} above it", tls.display());
        refused("tls/ owned by 65534", &[&above, "owned by user 65534"]);
        std::os::unix::fs::chown(&tls, Some(0), None).unwrap();
    }
    // Past the rules, the contents are read: these hold no certificate.
    let err = queue_client(&batch, "--tls-ca", &ca).code(2).stderr();
    assert!(err.contains("no certificate in it"), "{err}");
}

/// A `[[watch]]` table's queue secrets get the checks a `[worker]` table's and the command
/// line's get, when the file is loaded (check-config, a start, a reload), not only when the
/// coordinator connects: a creds file the group or every user may read, or in a directory
/// others may write, is refused, naming the line, the key and the file. (Before, check-config
/// accepted them.) A creds or tls_ca without a queue does nothing: refused.
#[test]
fn a_watch_tables_creds_are_held_to_the_workers_rules_when_the_file_is_loaded() {
    let t = TestTree::new().file("a.txt", b"hello\n");
    let dir = etc_with_ca_and_creds(&t);
    let (creds, watch) = (dir.join("w.creds"), dir.join("watch.toml"));
    check_config(&watch).success();
    let key = format!("watch.toml:5: watch[0].creds: {}: ", creds.display());
    // 0640 is allowed to a root-owned file (its group is the service's): 0660 is not.
    let gid = std::os::unix::fs::MetadataExt::gid(&fs::metadata(&creds).unwrap());
    for (mode, who) in [
        (0o660, format!("group {gid}")),
        (0o644, "every user".into()),
    ] {
        chmod(&creds, mode);
        let err = check_config(&watch)
            .context(format!("{mode:o}"))
            .code(2)
            .stderr();
        let says = format!("{who} may read it (mode {mode:04o})");
        assert!(
            err.contains(&key) && err.contains("nkey seed") && err.contains(&says),
            "{mode:o}: {err}"
        );
    }
    chmod(&creds, 0o600);
    chmod(&dir, 0o770);
    let err = check_config(&watch).code(2).stderr();
    let above = format!("the directory {} above it", dir.display());
    assert!(err.contains(&key) && err.contains(&above), "{err}");
    chmod(&dir, 0o755);
    check_config(&watch).success();
    // Without a queue, creds or tls_ca would be ignored: refused instead.
    for k in ["creds = \"w.creds\"", "tls_ca = \"tls/ca.pem\""] {
        let body = format!(
            "[[watch]]\npath = \"{}\"\nop = \"sha256\"\n{k}\n",
            t.root().display()
        );
        write_mode(&watch, &body, 0o600);
        let err = check_config(&watch).context(k).code(2).stderr();
        assert!(err.contains("needs queue"), "{k}: {err}");
    }
}

/// A creds or CA file given as a symlink (as a Kubernetes secret volume mounts each key) is
/// the file it leads to that is checked and read, and the error names both.
#[test]
fn a_creds_file_given_as_a_symlink_is_checked_as_its_file_and_named_with_it() {
    let t = TestTree::new().file("a.txt", b"hello\n");
    let dir = etc_with_ca_and_creds(&t);
    let real = dir.join("w.creds");
    let link = dir.join("link.creds");
    std::os::unix::fs::symlink("w.creds", &link).unwrap();
    let root = t.root();
    let batch = [s("batch"), root.as_os_str(), s("--op"), s("sha256")];
    // Read, and its contents judged (neither a JWT nor a user seed).
    let err = queue_client(&batch, "--creds", &link).code(2).stderr();
    assert!(err.contains("neither a credentials file"), "{err}");
    chmod(&real, 0o644);
    let err = queue_client(&batch, "--creds", &link).code(2).stderr();
    let named = format!("{} (a symlink to {})", link.display(), real.display());
    assert!(
        err.contains(&named) && err.contains("every user may read it"),
        "{err}"
    );
}

/// The creds and CA files are opened once by a coordinator, with O_NOFOLLOW, and what it
/// checked is what it reads and gives the client: async-nats reading the file again by its
/// path (as it did) would read whatever was put there after the check. Seen with the real
/// strace.
#[test]
fn a_coordinator_opens_its_creds_and_ca_files_once_and_reads_what_it_checked() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace");
        return;
    }
    let t = TestTree::new().file("a.txt", b"hello\n");
    let dir = etc_with_ca_and_creds(&t);
    for (flag, file, says) in [
        ("--creds", dir.join("w.creds"), "neither a credentials file"),
        ("--tls-ca", dir.join("tls/ca.pem"), "no certificate in it"),
    ] {
        let trace = t.side("strace.log");
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-qq", "-e", "trace=open,openat,openat2", "-o"])
            .arg(&trace)
            .arg(bin())
            .arg("batch")
            .arg(t.root())
            .args(["--op", "sha256", "--queue", "nats://127.0.0.1:1", flag])
            .arg(&file);
        // Refused after the file was read: its contents reached the parser.
        let err = run(cmd).context(flag).code(2).stderr();
        assert!(err.contains(says), "{flag}: {err}");
        let quoted = format!("\"{}\"", file.display());
        let opens: Vec<String> = fs::read_to_string(&trace)
            .unwrap()
            .lines()
            .filter(|l| l.contains(&quoted))
            .map(str::to_owned)
            .collect();
        assert!(
            opens.len() == 1 && opens[0].contains("O_NOFOLLOW"),
            "{flag}: opened other than once with O_NOFOLLOW: {opens:#?}"
        );
    }
}

/// A config file named through another user's symlink is refused, as every path given to
/// filepipe is: that user could point it at any config the rules let through (another
/// worker's roots, `--allow-remove-source`). Root's and filepipe's user's own links are
/// followed. Before, the link was followed, and only the file it led to was judged.
#[test]
fn a_config_file_named_through_another_users_symlink_is_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to give a symlink another owner");
        return;
    }
    let body = "[worker]\nqueue = \"nats://127.0.0.1:1\"\n[worker.roots]\nin = \"{in}\"\n";
    let (t, path) = worker_file(body, 0o600);
    let theirs = t.side("theirs.toml");
    let mine = t.side("mine.toml");
    std::os::unix::fs::symlink(&path, &theirs).unwrap();
    std::os::unix::fs::symlink(&path, &mine).unwrap();
    rustix::fs::chownat(
        rustix::fs::CWD,
        &theirs,
        Some(rustix::process::Uid::from_raw(65534)),
        None,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
    check_config(&mine).success();
    for r in [check_config(&theirs), worker_config(&theirs)] {
        let err = r.code(2).stderr();
        assert!(err.contains("is a symlink of uid 65534"), "{err}");
    }
}
