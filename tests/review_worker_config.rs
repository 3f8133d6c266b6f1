//! Review of `filepipe worker --config` (the `[worker]` table, issue 17), as a hostile user and
//! an administrator would try it: a queue's password shown by an error or a log, the rule that
//! a file holding one be private bypassed, a root the file did not mean to map, an override
//! that does the wrong thing. Each test here failed against the reviewed change.
#![cfg(feature = "cluster")]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::nats::*;
use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

/// The password in every URL here: no output may show it.
const PASSWORD: &str = "s3cret-Pa55";

/// Writes `body` to `path` with `mode`.
fn write_mode(path: &Path, body: &str, mode: u32) {
    fs::write(path, body).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A temp tree with an input root `in/` and a config file `worker.toml` holding `body`
/// (`{in}` replaced by the input root's path) with `mode`; the config's absolute path.
fn config(body: &str, mode: u32) -> (TestTree, std::path::PathBuf) {
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
fn check_config_refuses_a_password_in_a_queue_url_without_a_scheme_in_a_readable_file() {
    let body = format!(
        "[worker]\nqueue = \"filepipe:{PASSWORD}@127.0.0.1:4222\"\n[worker.roots]\nin = \"{{in}}\"\n"
    );
    let (_t, path) = config(&body, 0o644);
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
fn a_worker_does_not_show_the_password_of_a_queue_url_without_a_scheme() {
    let body = format!(
        "[worker]\nqueue = \"filepipe:{PASSWORD}@127.0.0.1:1\"\n[worker.roots]\nin = \"{{in}}\"\n"
    );
    let (_t, path) = config(&body, 0o600);
    let r = worker_config(&path);
    r.code(2);
    assert_hidden(&r, "worker --config, server unreachable");
}

/// A password with a `/` left unencoded (base64 passwords have them) is still a password: a
/// readable file holding it is refused, and no error shows it.
#[test]
fn a_password_with_an_unencoded_slash_is_refused_in_a_readable_file_and_never_shown() {
    let body = format!(
        "[worker]\nqueue = \"nats://filepipe:ab/{PASSWORD}@127.0.0.1:1\"\n[worker.roots]\nin = \"{{in}}\"\n"
    );
    let (_t, readable) = config(&body, 0o644);
    let r = check_config(&readable);
    r.code(2);
    assert_hidden(&r, "check-config, mode 644");
    let (_t2, private) = config(&body, 0o600);
    let r = worker_config(&private);
    r.code(2);
    assert_hidden(&r, "worker --config, mode 600");
}

/// A mistake in a private file that holds a password (a key misspelt, the `[worker]` header
/// forgotten, a quote missing) is an error naming the line, not one quoting it: the error
/// goes to the journal, which more users read than the file.
#[test]
fn a_toml_error_in_a_private_worker_config_does_not_quote_the_password() {
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
        let (_t, path) = config(&body, 0o600);
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
fn a_queue_key_under_worker_roots_does_not_print_the_password() {
    let body = format!(
        "[worker]\n[worker.roots]\nin = \"{{in}}\"\nqueue = \"nats://filepipe:{PASSWORD}@127.0.0.1:1\"\n"
    );
    let (_t, path) = config(&body, 0o600);
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
fn an_empty_root_path_in_the_worker_table_is_refused_not_the_config_files_directory() {
    let (t, path) = config(
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
}

/// Mode 640 owned by root lets the group read; an ACL entry for another user shows in the
/// group bits as the mask (still r--), and lets that user read the password too. ssh and
/// PostgreSQL see only the mode; a rule stated as "only the owner, or root's group" must see
/// the ACL.
#[test]
fn a_root_owned_640_file_whose_acl_lets_another_user_read_it_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (a root-owned file)");
        return;
    }
    let body = format!(
        "[worker]\nqueue = \"nats://filepipe:{PASSWORD}@127.0.0.1:1\"\n[worker.roots]\nin = \"{{in}}\"\n"
    );
    let (t, path) = config(&body, 0o640);
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
    r.code(2);
    assert_hidden(&r, "check-config");
}

/// An env file left with `FILEPIPE_QUEUE=` (empty; the unit's EnvironmentFile is optional
/// and says it may set the URL) sets no URL: a coordinator's `--queue` takes it as unset, and
/// the worker must keep its config file's queue rather than refuse to start for want of one.
#[test]
fn an_empty_filepipe_queue_leaves_the_config_files_queue() {
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
fn check_config_refuses_what_the_worker_refuses_at_start() {
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
        let (_t, path) = config(&body, 0o600);
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
    let (t, path) = config(&body, 0o644);
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
