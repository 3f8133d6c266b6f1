//! `filepipe batch` end to end: the real binary over temp trees, checked with the real gzip,
//! gunzip and sha256sum (RELIABILITY.md cases 1-12, 15-17).

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

fn p(x: &std::path::Path) -> &OsStr {
    x.as_os_str()
}

const LONG_NAME: [u8; 253] = [b'n'; 253];

/// Runs `filepipe batch <t's root> args...`.
fn batch(t: &TestTree, args: &[&OsStr]) -> Run {
    let root = t.root();
    let mut cmd = filepipe(&[s("batch"), root.as_os_str()]);
    cmd.args(args);
    run(cmd)
}

/// `filepipe batch --op sha256` with a manifest and a failure log.
fn sha256_batch(t: &TestTree, manifest: &std::path::Path, log: &std::path::Path) -> Run {
    batch(
        t,
        &[
            s("--op"),
            s("sha256"),
            s("--manifest"),
            p(manifest),
            s("--failure-log"),
            p(log),
        ],
    )
}

fn awkward_tree() -> TestTree {
    TestTree::new()
        .file("plain.txt", b"hello\n")
        .file("nested/deeper/deepest/file.log", &text_bytes(50_000, 1))
        .file("nested/empty", b"")
        .dir("empty-dir/inner")
        .file("with space.txt", b"space")
        .file("new\nline", b"newline")
        .file("back\\slash", b"backslash")
        .file("carriage\rreturn", b"cr")
        .file("-leading-dash", b"dash")
        .file(b"non-utf8-\xff\xfe", b"bytes")
        .file(LONG_NAME, b"long")
}

#[test]
fn sha256_manifest_passes_sha256sum_c_with_awkward_names() {
    let t = awkward_tree();
    let manifest = t.side("SHA256SUMS");
    let log = t.side("failures.jsonl");
    sha256_batch(&t, &manifest, &log).success();
    let check = tool(
        "sha256sum",
        &[s("-c"), s("--strict"), p(&manifest)],
        &t.root(),
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let text = fs::read(&manifest).unwrap();
    // One line per file (escaped newlines do not count), sorted.
    assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 10);
    assert!(failure_log(&log).is_empty());
    // Verify agrees.
    run({
        let mut c = filepipe(&[s("verify"), p(&manifest), s("--root"), p(&t.root())]);
        c.current_dir(t.root());
        c
    })
    .success();
}

/// A rerun over an unchanged tree finds its manifest already saying what it would write: kept,
/// not written and flushed again (the same inode), its mtime the run's as a rewrite's would be.
/// Any difference (at the start, in the middle past the first chunk of lines compared, at the
/// end, a line more or less), or a manifest that is another user's, has it written whole again.
#[test]
fn an_unchanged_manifest_is_kept_and_any_other_is_written_whole_again() {
    let mut t = TestTree::new();
    for i in 0..5000 {
        t = t.file(format!("d{}/f{i:04}", i % 7), format!("{i}").as_bytes());
    }
    let manifest = t.side("SHA256SUMS");
    let log = t.side("failures.jsonl");
    sha256_batch(&t, &manifest, &log).success();
    let want = fs::read(&manifest).unwrap();
    assert_eq!(want.iter().filter(|&&b| b == b'\n').count(), 5000);
    let long_ago = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let age = |when| {
        fs::File::options()
            .write(true)
            .open(&manifest)
            .unwrap()
            .set_modified(when)
            .unwrap()
    };
    age(long_ago);
    let ino = fs::metadata(&manifest).unwrap().ino();
    sha256_batch(&t, &manifest, &log).success();
    let kept = fs::metadata(&manifest).unwrap();
    assert_eq!(kept.ino(), ino, "the unchanged manifest was written again");
    assert!(
        kept.modified().unwrap() > long_ago,
        "its mtime is the run's"
    );
    assert_eq!(fs::read(&manifest).unwrap(), want);
    // A hex digit of a line's digest changed (to another): the line starts at `at`.
    let flip = |text: &mut Vec<u8>, at: usize| {
        text[at] = if text[at] == b'0' { b'1' } else { b'0' };
    };
    let line_start = |text: &[u8], n: usize| {
        if n == 0 {
            0
        } else {
            (text.iter().enumerate())
                .filter(|(_, &b)| b == b'\n')
                .nth(n - 1)
                .unwrap()
                .0
                + 1
        }
    };
    type Edit<'a> = &'a dyn Fn(&mut Vec<u8>);
    let edits: [(&str, Edit); 5] = [
        ("first line", &|t| flip(t, 0)),
        ("line 4500", &|t| flip(t, line_start(t, 4500) + 10)),
        ("last line", &|t| flip(t, line_start(t, 4999) + 63)),
        ("last line gone", &|t| t.truncate(line_start(t, 4999))),
        ("a line more", &|t| {
            t.extend_from_slice(format!("{}  d0/zzz\n", "ab".repeat(32)).as_bytes())
        }),
    ];
    for (what, edit) in edits {
        let mut text = want.clone();
        edit(&mut text);
        assert_ne!(text, want, "{what}");
        fs::write(&manifest, &text).unwrap();
        let ino = fs::metadata(&manifest).unwrap().ino();
        sha256_batch(&t, &manifest, &log).success();
        assert!(
            fs::read(&manifest).unwrap() == want,
            "{what}: not written whole again"
        );
        assert_ne!(fs::metadata(&manifest).unwrap().ino(), ino, "{what}: kept");
    }
    assert!(sha256sum_c(&manifest, &t.root()));
    // The same text, but another user's: replaced by a manifest of ours.
    if !is_root() {
        eprintln!("SKIPPED (another user's manifest): not root, cannot give a file away");
        return;
    }
    std::os::unix::fs::chown(&manifest, Some(65534), Some(65534)).unwrap();
    sha256_batch(&t, &manifest, &log).success();
    let ours = fs::metadata(&manifest).unwrap();
    assert_eq!(
        (ours.uid(), fs::read(&manifest).unwrap() == want),
        (0, true)
    );
}

/// The manifest there is cut short (`: > SUMS`, a log rotation's copytruncate) while a run
/// that changed one file compares its text with it: the new manifest is still the run's whole
/// text. The start of the old one, copied into the new one after the comparison, took in
/// whatever it had become (found by review r54b: 11,808 lines of 20,000 published, exit 0).
/// strace holds the comparison's third read of the old manifest while it is truncated.
#[test]
fn a_manifest_cut_short_during_the_comparison_is_still_written_whole() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to hold the comparison");
        return;
    }
    let mut t = TestTree::new();
    for i in 0..20_000 {
        t = t.file(format!("f{i:05}"), format!("{i}").as_bytes());
    }
    let manifest = t.side("SUMS");
    let args = |cmd: &mut Command| {
        cmd.args(["batch", "-q", "--op", "sha256", "--manifest"])
            .arg(&manifest)
            .arg(t.root());
    };
    let mut first = Command::new(bin());
    args(&mut first);
    run(first).success();
    fs::write(t.path("f19999"), b"changed").unwrap();
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o", "/dev/null", "-P"])
        .arg(&manifest)
        .args(["-e", "trace=pread64"])
        .args(["-e", "inject=pread64:delay_enter=1500000:when=3"])
        .arg(bin())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    args(&mut cmd);
    let child = Started::new(cmd);
    let strace = child.id();
    // A thread of filepipe's in that read.
    let reading = common::strace::nr::PREAD64;
    wait_until(Duration::from_secs(60), "the held read", || {
        (common::strace::children(strace).into_iter())
            .any(|pid| common::strace::in_call(pid, &[reading]))
    });
    fs::File::create(&manifest).unwrap();
    child.finish(Duration::from_secs(60)).success();
    let text = fs::read_to_string(&manifest).unwrap();
    assert_eq!(text.lines().count(), 20_000);
    assert!(sha256sum_c(&manifest, &t.root()));
}

/// Whether `sha256sum -c --quiet MANIFEST` passes, run in `root`.
fn sha256sum_c(manifest: &Path, root: &Path) -> bool {
    tool("sha256sum", &[s("-c"), s("--quiet"), p(manifest)], root)
        .status
        .success()
}

#[test]
fn sha256_manifest_on_stdout_matches_file_manifest() {
    let t = awkward_tree();
    let out = batch(&t, &[s("--op"), s("sha256"), s("-q")]);
    out.success();
    let m = t.side("stdout.sha");
    fs::write(&m, &out.output().stdout).unwrap();
    assert!(tool("sha256sum", &[s("-c"), p(&m)], &t.root())
        .status
        .success());
    assert!(
        out.output().stderr.is_empty(),
        "quiet run printed: {}",
        out.stderr()
    );
}

/// `--manifest -` is refused, not taken for a file named `-` in the working directory (found
/// by a review: the manifest a pipe waited for went there, exit 0); `./-` is that file.
#[test]
fn a_manifest_named_dash_is_refused_and_dot_slash_dash_is_a_file() {
    let t = TestTree::new().file("a", b"x");
    let cwd = t.side("cwd");
    fs::create_dir(&cwd).unwrap();
    let mut cmd = filepipe(&[s("batch"), p(&t.root()), s("--op"), s("sha256")]);
    cmd.args(["--manifest", "-"]).current_dir(&cwd);
    let out = run(cmd);
    out.code(2);
    assert!(out.stderr().contains("--manifest -"), "{}", out.stderr());
    assert!(out.output().stdout.is_empty());
    assert!(!cwd.join("-").exists(), "a file named - was written");
    let mut cmd = filepipe(&[s("batch"), p(&t.root()), s("--op"), s("sha256")]);
    cmd.args(["--manifest", "./-", "-q"]).current_dir(&cwd);
    run(cmd).success();
    assert!(fs::read_to_string(cwd.join("-"))
        .unwrap()
        .ends_with("  a\n"));
}

/// `-q` leaves out the summary and the skipped files, never a failed one: its line is on
/// stderr, and it is the only line there. Before, a failed quiet run said nothing but its
/// exit status.
#[test]
fn a_quiet_run_still_says_which_file_failed_and_why() {
    let t = TestTree::new()
        .file("ok.txt", b"fine\n")
        .file("skipped.gz", b"not compressed again\n")
        .file(LONG_NAME, b"its output name is too long\n");
    let err = batch(&t, &[s("--op"), s("gzip"), s("-q")]).code(1).stderr();
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("255-byte limit") && lines[0].contains("status=\"failed\""),
        "{err}"
    );
    // Without -q, the summary too.
    let t = t.file("another.txt", b"more\n");
    let err = batch(&t, &[s("--op"), s("gzip")]).code(1).stderr();
    assert!(
        err.contains("255-byte limit") && err.contains("1 failed"),
        "{err}"
    );
}

#[test]
fn gzip_outputs_pass_gzip_t_and_gunzip_to_identical_bytes() {
    let t = awkward_tree().file("big/multi-block.log", &text_bytes(6_000_000, 2));
    fs::set_permissions(t.path("plain.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let log = t.side("failures.jsonl");
    // The 253-byte name cannot take ".gz": one clean per-file failure, exit 1.
    batch(&t, &[s("--op"), s("gzip"), s("--failure-log"), p(&log)]).code(1);
    let log = failure_log(&log);
    let too_long = records_of(&log, "name-too-long");
    assert_eq!(too_long.len(), 1, "{log:?}");
    let r = too_long[0];
    assert_eq!(r["errno"], 36);
    assert_eq!(r["op"], "gzip");
    assert_eq!(r["status"], "failed");
    assert_eq!(r["path"].as_str().unwrap().as_bytes(), LONG_NAME);
    assert!(r.get("path_hex").is_none(), "UTF-8 names carry no hex: {r}");
    let message = r["message"].as_str().unwrap();
    assert!(message.contains("255-byte limit"), "{message}");
    assert_eq!(log.len(), 1, "{log:?}");
    let mut checked = 0;
    for e in walkdir::WalkDir::new(t.root()) {
        let e = e.unwrap();
        let name = e.file_name().as_bytes();
        if !e.file_type().is_file() || name.ends_with(b".gz") || name == LONG_NAME {
            continue;
        }
        let mut gz = e.path().as_os_str().to_os_string();
        gz.push(".gz");
        let gz = std::path::PathBuf::from(gz);
        assert!(
            tool("gzip", &[s("-t"), p(&gz)], &t.root()).status.success(),
            "{gz:?}"
        );
        let back = tool("gunzip", &[s("-c"), p(&gz)], &t.root());
        assert_eq!(back.stdout, fs::read(e.path()).unwrap(), "{gz:?}");
        let (im, om) = (e.metadata().unwrap(), fs::metadata(&gz).unwrap());
        assert_eq!(om.mode() & 0o7777, im.mode() & 0o777, "{gz:?}");
        assert_eq!(
            (om.mtime(), om.mtime_nsec()),
            (im.mtime(), im.mtime_nsec()),
            "{gz:?}"
        );
        checked += 1;
    }
    assert_eq!(checked, 10);
    assert_eq!(
        fs::metadata(t.path("plain.txt.gz")).unwrap().mode() & 0o777,
        0o600
    );
    assert!(temps_under(t.dir.path()).is_empty());
}

/// As root, directories made under `--out` and under a move directory take their input
/// directory's owner, group and set-group-ID bit, as `cp -a` does: the outputs take their
/// inputs' owners, who could not reach them inside directories only root could enter.
#[test]
fn as_root_directories_made_under_out_and_move_dirs_take_their_inputs_owner() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to make files another user owns");
        return;
    }
    let t = TestTree::new().file("d/e/f.log", b"theirs\n");
    let nobody = Some(rustix::process::Uid::from_raw(65534));
    let nogroup = Some(rustix::process::Gid::from_raw(65534));
    for (rel, mode) in [("d", 0o2750), ("d/e", 0o2750), ("d/e/f.log", 0o640)] {
        rustix::fs::chown(t.path(rel), nobody, nogroup).unwrap();
        fs::set_permissions(t.path(rel), fs::Permissions::from_mode(mode)).unwrap();
    }
    let (out, moved) = (t.side("out"), t.side("moved"));
    batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&out),
            s("--move-source"),
            p(&moved),
        ],
    );
    for top in [&out, &moved] {
        for rel in ["d", "d/e"] {
            let m = fs::metadata(top.join(rel)).unwrap();
            assert_eq!(
                (m.uid(), m.gid(), m.mode() & 0o7777),
                (65534, 65534, 0o2750),
                "{}",
                top.join(rel).display()
            );
        }
    }
    // The owner reaches both, with no privilege.
    let as_owner = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        out.stdout
    };
    let gz = out.join("d/e/f.log.gz");
    assert_eq!(
        as_owner(&["gzip", "-dc", gz.to_str().unwrap()]),
        b"theirs\n"
    );
    let input = moved.join("d/e/f.log");
    assert_eq!(as_owner(&["cat", input.to_str().unwrap()]), b"theirs\n");
}

/// The user who owns the trees of the privacy tests: not the one who tries to read them.
const OWNER: u32 = 1234;

/// Gives `t`'s tree to `OWNER` (its group too), its root `mode`, its files `0644`: who may
/// read them is the root's to say. The temp directory around it is opened for others to pass
/// through.
fn give_tree_away(t: &TestTree, mode: u32) {
    let id = (
        Some(rustix::process::Uid::from_raw(OWNER)),
        Some(rustix::process::Gid::from_raw(OWNER)),
    );
    fs::set_permissions(t.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for e in walkdir::WalkDir::new(t.root()) {
        let e = e.unwrap();
        rustix::fs::chown(e.path(), id.0, id.1).unwrap();
        let m = if e.file_type().is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(e.path(), fs::Permissions::from_mode(m)).unwrap();
    }
    fs::set_permissions(t.root(), fs::Permissions::from_mode(mode)).unwrap();
}

/// `batch --op gzip` of `t` with `--out`, `--move-source` and `--state` to paths that do
/// not exist yet (`archive/2024`, `done/x`, `st`; `done` may).
fn batch_out_move_state(t: &TestTree) {
    let (out, done, st) = (t.side("archive/2024"), t.side("done/x"), t.side("st"));
    let args = [
        s("--op"),
        s("gzip"),
        s("--out"),
        p(&out),
        s("--move-source"),
        p(&done),
        s("--state"),
        p(&st),
    ];
    batch(t, &args).success();
}

/// Whether the user `uid` in the group `gid` alone can read the file `path`.
fn can_read(uid: u32, gid: u32, path: &Path) -> bool {
    as_user(uid, gid, &[s("cat"), p(path)]).status.success()
}

/// A private tree (`0700`, another user's) stays private in what filepipe makes for it: the
/// directories made for `--out`, `--move-source` and `--state`, their missing ancestors too,
/// are closed to other users, so none reads an output, a moved input or the state's names and
/// digests (found by a review: all were made `0755` by the umask). The tree's owner lists and
/// reads the first two (an ACL entry, or search through its group where there are no ACLs)
/// but may change nothing in them: they stay root's, so that owner can swap nothing root
/// opens there by path at the next run for a symlink. A directory that exists is left as it
/// is.
#[test]
fn directories_made_for_a_private_tree_keep_other_users_out() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to make a tree another user owns");
        return;
    }
    let t = TestTree::new()
        .file("g", b"secret 2\n")
        .file("sub/f", b"secret report\n");
    give_tree_away(&t, 0o700);
    fs::create_dir(t.side("done")).unwrap();
    fs::set_permissions(t.side("done"), fs::Permissions::from_mode(0o751)).unwrap();
    batch_out_move_state(&t);
    let run = |uid: u32, args: &[&OsStr]| as_user(uid, uid, args).status.success();
    for made in ["archive", "archive/2024", "done/x", "st"] {
        let (uid, _, mode) = owner_and_mode(&t.side(made));
        assert_eq!(
            (uid, mode & 0o007),
            (0, 0),
            "{made}: root's, nothing for others"
        );
        assert!(
            !run(65534, &[s("ls"), p(&t.side(made))]),
            "another user listed {made}"
        );
    }
    assert_eq!(owner_and_mode(&t.side("st")).2, 0o700, "st: filepipe's own");
    assert_eq!(
        owner_and_mode(&t.side("done")).2,
        0o751,
        "an existing one is kept"
    );
    for made in ["archive/2024", "done/x"] {
        let dir = t.side(made);
        assert!(
            run(OWNER, &[s("ls"), p(&dir)]),
            "the owner cannot list {made}"
        );
        let planted = dir.join("planted");
        assert!(
            !run(OWNER, &[s("touch"), p(&planted)]),
            "the owner wrote in {made}"
        );
    }
    let made = [
        "archive/2024/g.gz",
        "archive/2024/sub/f.gz",
        "done/x/g",
        "done/x/sub/f",
        "st/filepipe.sqlite",
    ];
    for rel in made {
        let f = t.side(rel);
        assert!(f.exists(), "{rel}");
        assert!(!can_read(65534, 65534, &f), "another user read {rel}");
    }
    for rel in &made[..4] {
        let f = t.side(rel);
        assert!(can_read(OWNER, OWNER, &f), "the owner cannot read {rel}");
    }
}

/// Review finding, found again in the fix: made the tree owner's (as `cp -a` makes a copy's
/// top directory), `--out arch` let that owner swap the state directory in it (README's own
/// `--state arch/.filepipe`) and plant a failure log there as symlinks: the next run, as
/// root, wrote the state and its lock elsewhere and appended to a root file. The roots stay
/// root's.
#[test]
fn the_trees_owner_cannot_redirect_what_a_root_run_opens_in_its_out_directory() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to make a tree another user owns");
        return;
    }
    let t = TestTree::new().file("a", b"data\n");
    give_tree_away(&t, 0o700);
    let (arch, st, log) = (
        t.side("arch"),
        t.side("arch/.filepipe"),
        t.side("arch/fail.log"),
    );
    let args = |with_log: bool| {
        let mut a = vec![
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&arch),
            s("--state"),
            p(&st),
        ];
        if with_log {
            a.extend([s("--failure-log"), p(&log)]);
        }
        a
    };
    batch(&t, &args(false)).success();
    let (elsewhere, victim) = (t.side("elsewhere"), t.side("victim"));
    fs::create_dir(&elsewhere).unwrap();
    fs::write(&victim, b"root's\n").unwrap();
    let script = format!(
        "mv {st} {st}.old; ln -s {elsewhere} {st}; ln -s {victim} {log}",
        st = st.display(),
        elsewhere = elsewhere.display(),
        victim = victim.display(),
        log = log.display()
    );
    // What the owner may try; whatever it manages, root's next run must stay in the roots.
    let _ = as_user(OWNER, OWNER, &[s("sh"), s("-c"), s(&script)]);
    fs::write(t.path("b"), b"more\n").unwrap();
    batch(&t, &args(true)).success();
    assert_eq!(
        fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "state written elsewhere"
    );
    assert_eq!(
        fs::read(&victim).unwrap(),
        b"root's\n",
        "the failure log went elsewhere"
    );
    assert!(st.join("filepipe.sqlite").is_file() && !st.is_symlink());
}

/// What filepipe makes for a tree is as open as the tree, less the umask, no more: a `0750`
/// tree's group (and no one else) reads its outputs, moved inputs and state, through
/// directories of root's given that group; a `0755` tree's are everyone's, as before.
#[test]
fn directories_made_for_a_tree_take_its_mode_and_group() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to make a tree another user owns");
        return;
    }
    for mode in [0o750, 0o755] {
        let t = TestTree::new().file("g", b"theirs\n");
        give_tree_away(&t, mode);
        batch_out_move_state(&t);
        let want = mode & !umask();
        // Root's own; a 0750 one with the tree's group, the group its group bits are for.
        for made in ["archive", "archive/2024", "done", "done/x", "st"] {
            let (uid, gid, got) = owner_and_mode(&t.side(made));
            assert_eq!((uid, got), (0, want), "{mode:o}: {made}");
            if mode == 0o750 {
                assert_eq!(gid, OWNER, "{mode:o}: {made}");
            }
        }
        let everyone = mode & 0o005 == 0o005;
        for rel in ["archive/2024/g.gz", "done/x/g", "st/filepipe.sqlite"] {
            let f = t.side(rel);
            assert!(
                can_read(65534, OWNER, &f),
                "{mode:o}: the group cannot read {rel}"
            );
            let read = can_read(65534, 65534, &f);
            assert_eq!(
                read, everyone,
                "{mode:o}: {rel} read by another user: {read}"
            );
        }
    }
}

#[test]
fn gzip_to_out_dir_mirrors_tree_and_stays_within_4_percent_of_gzip() {
    let t = TestTree::new()
        .file("a/b/big.log", &text_bytes(12_000_000, 3))
        .file("a/small.txt", &text_bytes(3_000, 4))
        .file("c/noise.bin", &noise_bytes(700_000, 5));
    let out_dir = t.side("out");
    let summary = batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&out_dir),
            s("--jobs"),
            s("2"),
            s("--json"),
        ],
    )
    .code(0)
    .summary();
    assert_eq!(
        (summary["files"].as_u64(), summary["done"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(summary["op"], "gzip");
    assert_eq!(
        (summary["skipped"].as_u64(), summary["failed"].as_u64()),
        (Some(0), Some(0))
    );
    let rels = ["a/b/big.log", "a/small.txt", "c/noise.bin"];
    let size = |p: std::path::PathBuf| fs::metadata(p).unwrap().len();
    let bytes_in: u64 = rels.iter().map(|r| size(t.path(r))).sum();
    let bytes_out: u64 = rels
        .iter()
        .map(|r| size(out_dir.join(format!("{r}.gz"))))
        .sum();
    assert_eq!(summary["bytes_in"].as_u64(), Some(bytes_in), "{summary}");
    assert_eq!(summary["bytes_out"].as_u64(), Some(bytes_out), "{summary}");
    let ratio = summary["ratio"].as_f64().unwrap();
    assert!(
        (ratio - bytes_out as f64 / bytes_in as f64).abs() < 1e-6,
        "{summary}"
    );
    let seconds = summary["seconds"].as_f64().unwrap();
    let rate = summary["bytes_per_second"].as_f64().unwrap();
    assert!(seconds > 0.0 && seconds < 120.0, "{summary}");
    assert!(
        (rate * seconds / bytes_in as f64 - 1.0).abs() < 0.01,
        "{summary}"
    );
    // The default level is 6: the same bytes as asking for it.
    let six = t.side("out6");
    batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&six),
            s("--level"),
            s("6"),
        ],
    )
    .success();
    for rel in rels {
        let gz = format!("{rel}.gz");
        let (a, b) = (
            fs::read(out_dir.join(&gz)).unwrap(),
            fs::read(six.join(&gz)).unwrap(),
        );
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(
            a == b,
            "{gz}: {} vs {} bytes, first difference at {first:?}",
            a.len(),
            b.len()
        );
    }
    for rel in rels {
        let gz = out_dir.join(format!("{rel}.gz"));
        let back = tool("gunzip", &[s("-c"), p(&gz)], t.dir.path());
        assert!(back.status.success());
        assert_eq!(back.stdout, fs::read(t.path(rel)).unwrap(), "{rel}");
        assert!(!t.path(format!("{rel}.gz")).exists(), "wrote next to input");
    }
    // Ratio against the real gzip -6 on the multi-block file.
    let reference = tool(
        "gzip",
        &[s("-6"), s("-c"), p(&t.path("a/b/big.log"))],
        t.dir.path(),
    );
    let ours = fs::metadata(out_dir.join("a/b/big.log.gz")).unwrap().len();
    let ratio = ours as f64 / reference.stdout.len() as f64;
    assert!(
        ratio <= 1.04,
        "output {ours} vs gzip -6 {}: {ratio}",
        reference.stdout.len()
    );
}

#[test]
fn special_files_are_skipped_without_opening() {
    let t = TestTree::new().file("regular", b"data");
    mkfifo(&t.path("fifo"));
    // A name that is not UTF-8: the failure log must still give its exact bytes back.
    let odd: &[u8] = b"fifo-\xff\xfe\n";
    mkfifo(&t.path(odd));
    let _sock = std::os::unix::net::UnixListener::bind(t.path("socket")).unwrap();
    let mut expected = 3;
    if is_root() {
        // /dev/null's numbers: reading it would not block, but opening a device at all is wrong.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            t.path("chardev"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o644),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        expected += 1;
    }
    let log = t.side("f.jsonl");
    for op in ["gzip", "sha256"] {
        // The log is appended to: each run's records on their own.
        let _ = fs::remove_file(&log);
        run(filepipe(
            &[
                s("batch"),
                p(&t.root()),
                s("--op"),
                s(op),
                s("--failure-log"),
                p(&log),
                s("--force"),
            ][..if op == "gzip" { 7 } else { 6 }],
        ))
        .success();
        let log = failure_log(&log);
        let special = records_of(&log, "special-file");
        assert_eq!(special.len(), expected, "{log:?}");
        assert!(special
            .iter()
            .all(|r| r["op"] == op && r["status"] == "skipped"));
        let hex: Vec<_> = special
            .iter()
            .filter_map(|r| r["path_hex"].as_str())
            .collect();
        assert_eq!(hex.len(), 1, "{log:?}");
        let bytes: Vec<u8> = (0..hex[0].len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[0][i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(bytes, odd);
    }
    assert!(t.path("regular.gz").exists());
    assert!(!t.path("fifo.gz").exists());
}

#[test]
fn symlinks_are_reported_and_never_followed_by_default() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), b"outside data").unwrap();
    let t = TestTree::new()
        .file("real/file", b"inside")
        .symlink("does-not-exist", "broken")
        .symlink("loop-b", "loop-a")
        .symlink("loop-a", "loop-b")
        .symlink(outside.path().join("secret"), "to-outside")
        .symlink(outside.path(), "to-outside-dir")
        .symlink("real", "to-dir")
        .symlink("real/file", "to-file");
    let log = t.side("f.jsonl");
    let manifest = t.side("m");
    let args = |follow: bool| {
        let mut v = vec![
            s("batch").to_os_string(),
            t.root().into_os_string(),
            "--op".into(),
            "sha256".into(),
            "--manifest".into(),
            manifest.clone().into_os_string(),
            "--failure-log".into(),
            log.clone().into_os_string(),
        ];
        if follow {
            v.push("--follow-symlinks".into());
        }
        v
    };
    let run_with = |follow| {
        let a = args(follow);
        run(filepipe(
            &a.iter().map(|x| x.as_os_str()).collect::<Vec<_>>(),
        ))
    };
    run_with(false).success();
    let records = failure_log(&log);
    assert_eq!(records_of(&records, "symlink").len(), 7, "{records:?}");
    let m = fs::read_to_string(&manifest).unwrap();
    assert_eq!(m.lines().count(), 1, "{m}");

    // Followed: links inside the root are processed, links leading out still refused.
    fs::remove_file(&log).unwrap();
    run_with(true).success();
    let m = fs::read_to_string(&manifest).unwrap();
    let names: Vec<&str> = m.lines().map(|l| &l[66..]).collect();
    assert_eq!(names, ["real/file", "to-dir/file", "to-file"], "{m}");
    let records = failure_log(&log);
    assert_eq!(records_of(&records, "symlink").len(), 5, "{records:?}");
    assert!(!m.contains("secret"));
}

/// An absolute link that stays inside the root is followed like a relative one, and so is
/// every link reached through it (the kernel's `RESOLVE_BENEATH` refuses absolute links, so the
/// walk must resolve those another way); without `--follow-symlinks` it is reported for what
/// it is, not as leading outside.
#[test]
fn absolute_links_inside_the_root_are_followed_like_relative_ones() {
    let t = TestTree::new()
        .file("real/x", b"hello\n")
        .file("real/sub/f", b"s\n")
        .symlink("x", "real/l")
        .symlink("sub", "real/dl");
    let root = t.root();
    std::os::unix::fs::symlink(root.join("real"), root.join("abs")).unwrap();
    std::os::unix::fs::symlink("abs", root.join("rel2abs")).unwrap();
    std::os::unix::fs::symlink(root.join("real/x"), root.join("absfile")).unwrap();
    let (manifest, log) = (t.side("m"), t.side("f.jsonl"));
    let with = |follow: bool| {
        let mut cmd = filepipe(&[s("batch"), p(&root), s("--op"), s("sha256")]);
        cmd.args([s("--manifest"), p(&manifest), s("--failure-log"), p(&log)]);
        if follow {
            cmd.arg("--follow-symlinks");
        }
        run(cmd).success();
        let m = fs::read_to_string(&manifest).unwrap();
        let names: Vec<String> = m.lines().map(|l| l[66..].to_string()).collect();
        (names, failure_log(&log))
    };
    let (names, records) = with(true);
    for want in [
        "absfile",
        "abs/x",
        "abs/l",
        "abs/sub/f",
        "abs/dl/f",
        "rel2abs/x",
        "rel2abs/l",
        "rel2abs/dl/f",
        "real/dl/f",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want}: {names:?}\n{records:?}"
        );
    }
    assert!(
        records
            .iter()
            .all(|r| !r["message"].as_str().unwrap_or("").contains("outside")),
        "{records:?}"
    );
    fs::remove_file(&log).unwrap();
    let (names, records) = with(false);
    assert_eq!(names, ["real/sub/f", "real/x"], "{records:?}");
    let abs = records
        .iter()
        .find(|r| r["path"] == "abs")
        .expect("abs reported");
    assert!(
        abs["message"]
            .as_str()
            .unwrap()
            .contains("symlink to a directory"),
        "{abs}"
    );
}

#[test]
fn unreadable_file_and_directory_fail_per_file_and_run_continues() {
    let t = TestTree::new()
        .file("ok.txt", b"fine")
        .file("locked.txt", b"secret")
        .file("locked-dir/inner.txt", b"hidden");
    t.open_to_all();
    fs::set_permissions(t.path("locked.txt"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(t.path("locked-dir"), fs::Permissions::from_mode(0o000)).unwrap();
    let log = t.side("f.jsonl");
    let manifest = t.side("m");
    let mut cmd = unprivileged();
    cmd.args([s("batch"), p(&t.root()), s("--op"), s("sha256")])
        .args([s("--manifest"), p(&manifest), s("--failure-log"), p(&log)]);
    let out = run(cmd);
    fs::set_permissions(t.path("locked-dir"), fs::Permissions::from_mode(0o755)).unwrap();
    out.code(1);
    let records = failure_log(&log);
    let denied = records_of(&records, "permission-denied");
    assert_eq!(denied.len(), 2, "{records:?}");
    assert!(denied
        .iter()
        .all(|r| r["errno"] == 13 && r["status"] == "failed"));
    let mut paths: Vec<&str> = denied.iter().map(|r| r["path"].as_str().unwrap()).collect();
    paths.sort();
    assert_eq!(paths, ["locked-dir", "locked.txt"]);
    assert!(fs::read_to_string(&manifest)
        .unwrap()
        .contains("  ok.txt\n"));
}

#[test]
fn existing_different_output_is_kept_unless_force() {
    let t = TestTree::new()
        .file("x", &text_bytes(10_000, 9))
        .file("x.gz", b"not mine");
    let log = t.side("f.jsonl");
    batch(&t, &[s("--op"), s("gzip"), s("--failure-log"), p(&log)]).code(1);
    assert_eq!(fs::read(t.path("x.gz")).unwrap(), b"not mine");
    let records = failure_log(&log);
    assert_eq!(
        records_of(&records, "output-exists").len(),
        1,
        "{records:?}"
    );
    assert_eq!(
        records_of(&records, "already-compressed").len(),
        1,
        "{records:?}"
    );

    batch(&t, &[s("--op"), s("gzip"), s("--force")]).success();
    let back = tool("gunzip", &[s("-c"), p(&t.path("x.gz"))], t.dir.path());
    assert_eq!(back.stdout, fs::read(t.path("x")).unwrap());
}

#[test]
fn rerun_skips_up_to_date_outputs_and_never_makes_gz_gz() {
    let t = TestTree::new()
        .file("a.txt", b"aaaa")
        .file("d/b.txt", b"bbbb");
    let first = batch(&t, &[s("--op"), s("gzip"), s("--json")]);
    assert_eq!(first.code(0).summary()["done"], 2);
    let second = batch(&t, &[s("--op"), s("gzip"), s("--json")]);
    let sum = second.code(0).summary();
    assert_eq!(sum["done"], 0);
    assert_eq!(sum["skipped_by_reason"]["up-to-date"], 2);
    assert_eq!(sum["skipped_by_reason"]["already-compressed"], 2);
    assert!(!t.path("a.txt.gz.gz").exists());
    // --force redoes them.
    let forced = batch(&t, &[s("--op"), s("gzip"), s("--json"), s("--force")]);
    assert_eq!(forced.code(0).summary()["done"], 2);
}

/// Review finding (MEDIUM): every time past 2262 saturated to the same nanosecond count, so an
/// input changed and dated 2400 found its output of the version dated 2300 up to date, and
/// the stale output stayed. Such dates tell nothing: the input is never up to date by them.
#[test]
fn an_input_dated_past_2262_is_never_taken_for_up_to_date_by_its_date() {
    let t = TestTree::new().file("f", b"version one\n");
    let out = t.side("o");
    let dated = |when: &str| {
        let touch = tool("touch", &[s("-d"), s(when), p(&t.path("f"))], &t.root());
        assert!(touch.status.success(), "{touch:?}");
    };
    dated("2300-01-01");
    let args = [s("--op"), s("gzip"), s("--out"), p(&out), s("--json")];
    assert_eq!(batch(&t, &args).code(0).summary()["done"], 1);
    if fs::metadata(out.join("f.gz")).unwrap().mtime() < 10_000_000_000 {
        eprintln!("SKIPPED: this file system does not keep dates past 2262");
        return;
    }
    // The same size, another date past 2262.
    fs::write(t.path("f"), b"VERSION TWO\n").unwrap();
    dated("2400-06-01");
    let second = batch(&t, &args);
    let sum = second.summary();
    assert!(sum["skipped_by_reason"]["up-to-date"].is_null(), "{sum}");
    // Not provably filepipe's output of this input: never replaced without --force.
    assert_eq!(sum["failed_by_reason"]["output-exists"], 1, "{sum}");
    let forced = batch(&t, &[&args[..], &[s("--force")]].concat());
    assert_eq!(forced.code(0).summary()["done"], 1);
    let back = tool("gzip", &[s("-dc"), p(&out.join("f.gz"))], &t.root());
    assert_eq!(back.stdout, b"VERSION TWO\n");
}

#[test]
fn remove_source_deletes_verified_inputs_but_keeps_hard_linked_ones() {
    let t = TestTree::new()
        .file("single", &text_bytes(300_000, 4))
        .file("linked", b"two names");
    fs::hard_link(t.path("linked"), t.side("other-name")).unwrap();
    let original = fs::read(t.path("single")).unwrap();
    let log = t.side("f.jsonl");
    batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--remove-source"),
            s("--failure-log"),
            p(&log),
        ],
    )
    .success();
    assert!(!t.path("single").exists());
    let back = tool("gunzip", &[s("-c"), p(&t.path("single.gz"))], t.dir.path());
    assert_eq!(back.stdout, original);
    assert!(t.path("linked").exists() && t.path("linked.gz").exists());
    let records = failure_log(&log);
    let kept = records_of(&records, "hard-linked");
    assert_eq!(kept.len(), 1, "{records:?}");
    assert_eq!(kept[0]["status"], "kept");
}

/// A user's `x.gz` that bears its input's very mtime (the kernel's clock ticks every few
/// milliseconds: written together, both get the same nanoseconds; here set with `touch -r`)
/// is not taken for filepipe's up-to-date output unless it holds that input: its gzip header
/// must carry the input's mtime and its trailer the input's length, as `gzip -k` also writes.
/// It was taken on its date alone: the input never compressed, then overwritten by the next
/// change (found by review).
#[test]
fn an_archive_dated_as_its_input_is_not_taken_for_its_output_unless_it_holds_it() {
    let t = TestTree::new()
        .file("mine.txt", b"the input\n")
        .file("kept.txt", b"compressed by gzip -k\n");
    let theirs = tool(
        "sh",
        &[
            s("-c"),
            s("echo 'a user archive, not of mine.txt' | gzip > mine.txt.gz && touch -r mine.txt mine.txt.gz && gzip -k kept.txt"),
        ],
        &t.root(),
    );
    assert!(theirs.status.success(), "{theirs:?}");
    let archive = fs::read(t.path("mine.txt.gz")).unwrap();
    let r = batch(&t, &[s("--op"), s("gzip"), s("--json")]);
    let sum = r.code(1).summary();
    assert_eq!(sum["failed_by_reason"]["output-exists"], 1, "{sum}");
    assert_eq!(
        sum["skipped_by_reason"]["up-to-date"], 1,
        "gzip -k's output: {sum}"
    );
    assert_eq!(fs::read(t.path("mine.txt.gz")).unwrap(), archive);
}

/// With `--follow-symlinks`, a file reached through a link is compressed under the link's
/// name, and the link is kept, said to be one: neither it nor its target is the link's input
/// to remove (it was said to have "changed after it was compressed").
#[test]
fn remove_source_keeps_a_followed_link_and_says_it_is_one() {
    let t = TestTree::new().file("real.txt", &text_bytes(20_000, 5));
    std::os::unix::fs::symlink("real.txt", t.path("link.txt")).unwrap();
    let original = fs::read(t.path("real.txt")).unwrap();
    let log = t.side("f.jsonl");
    // The target left out of the run: only the link's job could remove it.
    let args = [
        s("--op"),
        s("gzip"),
        s("--follow-symlinks"),
        s("--remove-source"),
        s("--exclude"),
        s("real.txt"),
        s("--failure-log"),
        p(&log),
    ];
    batch(&t, &args).success();
    let back = tool(
        "gunzip",
        &[s("-c"), p(&t.path("link.txt.gz"))],
        t.dir.path(),
    );
    assert_eq!(back.stdout, original);
    assert_eq!(fs::read(t.path("real.txt")).unwrap(), original);
    assert!(fs::symlink_metadata(t.path("link.txt")).is_ok_and(|m| m.is_symlink()));
    let records = failure_log(&log);
    let kept = records_of(&records, "symlink");
    assert_eq!(kept.len(), 1, "{records:?}");
    assert_eq!(kept[0]["status"], "kept");
    assert!(
        kept[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("its name is a symlink")),
        "{records:?}"
    );
}

#[test]
fn remove_source_keeps_an_input_it_may_not_unlink_and_says_why() {
    // The inputs' directories are read-only: the outputs are written under --out and are
    // durable, but the inputs cannot be removed. That is a kept input with its reason, not a
    // failed file (the work is done, and a rerun would find the output up to date).
    let t = TestTree::new()
        .file("a.log", &text_bytes(50_000, 1))
        .file("sub/b.log", &text_bytes(70_000, 2));
    let out_dir = t.side("out");
    fs::create_dir(&out_dir).unwrap();
    t.open_to_all();
    for dir in [t.root(), t.path("sub")] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o555)).unwrap();
    }
    let log = t.side("f.jsonl");
    let mut cmd = unprivileged();
    cmd.args([s("batch"), p(&t.root()), s("--op"), s("gzip"), s("--json")])
        .args([s("--remove-source"), s("--out"), p(&out_dir)])
        .args([s("--failure-log"), p(&log)]);
    let out = run(cmd);
    for dir in [t.root(), t.path("sub")] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let summary = out.code(0).summary();
    assert_eq!(
        (summary["done"].as_u64(), summary["failed"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(summary["warnings"], 2, "{summary}");
    for rel in ["a.log", "sub/b.log"] {
        let back = tool(
            "gunzip",
            &[s("-c"), p(&out_dir.join(format!("{rel}.gz")))],
            t.dir.path(),
        );
        assert_eq!(
            back.stdout,
            fs::read(t.path(rel)).unwrap(),
            "{rel} kept whole"
        );
    }
    let records = failure_log(&log);
    assert_eq!(records.len(), 2, "{records:?}");
    for r in &records {
        assert_eq!(r["status"], "kept", "{r}");
        assert_eq!(r["error"], "permission-denied", "{r}");
        assert_eq!(r["errno"], 13, "{r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap()
                .starts_with("input not removed: "),
            "{r}"
        );
    }
}

#[test]
fn planted_symlink_in_output_tree_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let t = TestTree::new()
        .file("a/f.txt", b"data")
        .file("b/g.txt", b"more");
    let out_dir = t.side("out");
    fs::create_dir(&out_dir).unwrap();
    std::os::unix::fs::symlink(outside.path(), out_dir.join("a")).unwrap();
    let log = t.side("f.jsonl");
    batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&out_dir),
            s("--failure-log"),
            p(&log),
        ],
    )
    .code(1);
    let records = failure_log(&log);
    assert_eq!(
        records_of(&records, "unsafe-output-path").len(),
        1,
        "{records:?}"
    );
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        0,
        "wrote outside the output root"
    );
    assert!(out_dir.join("b/g.txt.gz").exists(), "the run must go on");
}

#[test]
fn rlimit_fsize_is_a_per_file_efbig_and_later_files_still_done() {
    let t = TestTree::new()
        .file("big.bin", &noise_bytes(2_000_000, 7))
        .file("small1", b"tiny")
        .file("small2", b"tiny too");
    let log = t.side("f.jsonl");
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--fsize=500000", "--"]).arg(bin()).args([
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("gzip"),
        s("--jobs"),
        s("1"),
        s("--failure-log"),
        p(&log),
    ]);
    run(cmd).code(1);
    let records = failure_log(&log);
    let efbig = records_of(&records, "file-too-large");
    assert_eq!(efbig.len(), 1, "{records:?}");
    assert_eq!(efbig[0]["errno"], 27);
    assert!(t.path("big.bin").exists() && !t.path("big.bin.gz").exists());
    assert!(t.path("small1.gz").exists() && t.path("small2.gz").exists());
    assert!(temps_under(t.dir.path()).is_empty());
}

/// Runs the shell `script` with `args` ($1...) as root of a private user and mount namespace,
/// where it may mount a small tmpfs that goes with it.
fn in_mount_namespace(script: &str, args: &[&OsStr]) -> Run {
    let mut c = Command::new("unshare");
    c.args([s("-rm"), s("sh"), s("-c"), s(script), s("sh")])
        .args(args);
    run(c)
}

#[test]
fn disk_full_is_a_per_file_enospc_with_temp_removed() {
    // A 256 KiB tmpfs as the output root, mounted in a private user+mount namespace.
    let t = TestTree::new()
        .file("a-big.bin", &noise_bytes(1_000_000, 8))
        .file("b-small", b"fits")
        .file("c-small", b"fits too");
    let out_dir = t.side("out");
    fs::create_dir(&out_dir).unwrap();
    let log = t.side("f.jsonl");
    let script = r#"mount -t tmpfs -o size=256k none "$1" || exit 99
"$2" batch "$3" --op gzip --jobs 2 --out "$1" --failure-log "$4"; code=$?
echo "temps=$(find "$1" -name '.filepipe.*' | wc -l) small=$(ls "$1" | grep -c small)"
exit $code"#;
    let out = in_mount_namespace(script, &[p(&out_dir), s(&bin()), p(&t.root()), p(&log)]);
    assert_ne!(
        out.output().status.code(),
        Some(99),
        "could not mount a tmpfs: {}",
        out.stderr()
    );
    let stdout = out.code(1).stdout();
    assert!(stdout.contains("temps=0 small=2"), "{stdout}");
    let records = failure_log(&log);
    let full = records_of(&records, "no-space");
    assert_eq!(full.len(), 1, "{records:?}");
    assert_eq!(full[0]["errno"], 28);
    assert!(t.path("a-big.bin").exists());
}

#[test]
fn a_disk_full_for_one_manifest_of_several_leaves_them_all_as_they_were() {
    // The manifests of `sha256,blake3` on a 160 KiB tmpfs: a first run of 500 files leaves
    // two of 36 KiB. The second, over 1,000 files, writes two of 72 KiB: the first beside the
    // old ones fits (144 KiB), the second does not. Published one by one, the first replaced
    // its old one (the tmpfs then 108 KiB full), and the second, failing at 180 KiB, left the
    // old blake3 manifest beside a new sha256 one: two different trees.
    let mut t = TestTree::new();
    for i in 0..500 {
        t = t.file(format!("f{i:04}"), format!("{i}").as_bytes());
    }
    let mnt = t.side("mnt");
    fs::create_dir(&mnt).unwrap();
    let script = r#"mount -t tmpfs -o size=160k none "$1" || exit 99
"$2" batch "$3" --op sha256,blake3 --manifest "$1/SUMS" --quiet || exit 98
cp "$1/SUMS" "$1/SUMS.blake3" "$4" || exit 97
for i in $(seq 500 999); do echo "$i" > "$3/f$(printf %04d "$i")"; done
"$2" batch "$3" --op sha256,blake3 --manifest "$1/SUMS" --quiet; code=$?
cmp "$1/SUMS" "$4/SUMS" && cmp "$1/SUMS.blake3" "$4/SUMS.blake3" && echo "as they were"
echo "left: $(ls -A "$1" | tr '\n' ' ')"
exit $code"#;
    let kept = t.side("kept");
    fs::create_dir(&kept).unwrap();
    let out = in_mount_namespace(script, &[p(&mnt), s(&bin()), p(&t.root()), p(&kept)]);
    let code = out.output().status.code();
    assert_ne!(code, Some(99), "could not mount a tmpfs: {}", out.stderr());
    assert!(
        code != Some(98) && code != Some(97),
        "the first run failed: {}",
        out.stderr()
    );
    let stdout = out.code(1).stdout();
    // The failure is the second manifest's, said as such.
    assert!(out.stderr().contains("No space left"), "{}", out.stderr());
    assert!(
        stdout.contains("as they were"),
        "{stdout}\n{}",
        out.stderr()
    );
    assert!(stdout.contains("left: SUMS SUMS.blake3 \n"), "{stdout}");
    // They were the first run's: 500 lines each.
    for name in ["SUMS", "SUMS.blake3"] {
        let lines = fs::read(kept.join(name)).unwrap();
        assert_eq!(lines.iter().filter(|&&b| b == b'\n').count(), 500, "{name}");
    }
}

#[test]
fn a_manifest_that_cannot_be_replaced_leaves_the_others_as_they_were_too() {
    // SUMS.blake3 immutable (`chattr +i`; root only): its rename fails after SUMS's could have
    // been done. Renamed one by one, SUMS was new beside an old SUMS.blake3 (found by a
    // review); swapped in all or none, SUMS is put back.
    let t = TestTree::new().file("a", b"one").file("b", b"two");
    let dir = t.side("sums");
    fs::create_dir(&dir).unwrap();
    let sums = dir.join("SUMS");
    let args = |extra: &[&OsStr]| {
        let mut a = vec![
            p(&t.root()).to_owned(),
            s("--op").to_owned(),
            s("sha256,blake3").to_owned(),
            s("--manifest").to_owned(),
            p(&sums).to_owned(),
        ];
        a.extend(extra.iter().map(|x| x.to_os_string()));
        a
    };
    let run_with = |extra: &[&OsStr]| {
        let mut c = Command::new(bin());
        c.arg("batch").args(args(extra));
        run(c)
    };
    run_with(&[]).success();
    let before = (
        fs::read(&sums).unwrap(),
        fs::read(dir.join("SUMS.blake3")).unwrap(),
    );
    let immutable = |on: bool| {
        Command::new("chattr")
            .arg(if on { "+i" } else { "-i" })
            .arg(dir.join("SUMS.blake3"))
            .status()
            .is_ok_and(|s| s.success())
    };
    if !immutable(true) {
        eprintln!("SKIPPED: chattr +i is not possible here (not root, or the file system has no such flag)");
        return;
    }
    fs::write(t.path("c"), b"three").unwrap();
    let out = run_with(&[]);
    immutable(false);
    let err = out.code(1).stderr();
    assert!(
        err.contains("nor was SUMS beside it replaced: it is as it was"),
        "{err}"
    );
    let after = (
        fs::read(&sums).unwrap(),
        fs::read(dir.join("SUMS.blake3")).unwrap(),
    );
    assert_eq!(after, before, "both manifests are the first run's");
    let left: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "no temp left: {left:?}");
    // Replaceable again: both are the new run's.
    run_with(&[]).success();
    let lines = |p: &Path| fs::read_to_string(p).unwrap().lines().count();
    assert_eq!((lines(&sums), lines(&dir.join("SUMS.blake3"))), (3, 3));
}

/// A file system that refuses `renameat2`'s flags (bindfs here, as NFS, CIFS, exFAT and other
/// FUSE ones do): the manifests of several hashes are renamed one by one there. Swapped in all
/// or none only, none could ever be written (found by a review).
#[test]
fn where_names_cannot_be_exchanged_the_manifests_of_several_hashes_are_still_written() {
    let t = TestTree::new().file("a", b"one").file("b", b"two");
    let (back, view) = (t.side("back"), t.side("view"));
    let Some(_unmount) = bindfs(&back, &view, &[]) else {
        return;
    };
    let sums = view.join("SUMS");
    for (round, extra) in [("first", None), ("again", Some("c"))] {
        if let Some(name) = extra {
            fs::write(t.path(name), b"three").unwrap();
        }
        let mut c = Command::new(bin());
        c.args([s("batch"), p(&t.root()), s("--op"), s("sha256,blake3")])
            .args([s("--manifest"), p(&sums)]);
        let out = run(c);
        let err = out.success().stderr();
        assert!(
            err.contains("cannot exchange two files' names"),
            "{round}: {err}"
        );
        let files = 2 + usize::from(extra.is_some());
        for name in ["SUMS", "SUMS.blake3"] {
            let text = fs::read_to_string(view.join(name)).unwrap();
            assert_eq!(text.lines().count(), files, "{round}: {name}");
        }
        let check = tool("sha256sum", &[s("-c"), p(&sums)], &t.root());
        assert!(check.status.success(), "{round}: {check:?}");
        let left: Vec<_> = fs::read_dir(&back)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{round}: no temp left: {left:?}");
    }
}

#[test]
fn file_appended_while_read_is_never_published() {
    // Each of the ATTEMPTS reads must overlap an append, or the file is hashed (and rightly
    // so) and the test fails. So the file takes tens of ms to read, and the writer never
    // sleeps: a sleeping writer on a loaded CI machine missed a whole 7 ms read once.
    const SIZE: usize = 48 << 20;
    let t = TestTree::new()
        .file("growing.log", &text_bytes(SIZE, 6))
        .file("stable", b"ok");
    let path = t.path("growing.log");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let path = path.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(b"appended line\n").unwrap();
            }
        })
    };
    // Start only once the writer is writing.
    while fs::metadata(&path).unwrap().len() == SIZE as u64 {
        std::thread::yield_now();
    }
    let log = t.side("f.jsonl");
    let manifest = t.side("m");
    let out = batch(
        &t,
        &[
            s("--op"),
            s("sha256"),
            s("--manifest"),
            p(&manifest),
            s("--failure-log"),
            p(&log),
            s("-v"),
        ],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    out.code(1);
    let records = failure_log(&log);
    assert_eq!(
        records_of(&records, "changed-while-read").len(),
        1,
        "{records:?}"
    );
    // Each read again said at -v (a review found none said, the summary counting one read).
    assert_eq!(
        out.stderr().matches("reading it again").count(),
        2,
        "{}",
        out.stderr()
    );
    let m = fs::read_to_string(&manifest).unwrap();
    assert!(!m.contains("growing.log") && m.contains("stable"), "{m}");
}

/// True once the child has a handler for signal `sig` (its SigCgt mask in /proc).
fn catches(child: &std::process::Child, sig: u32) -> bool {
    let status = fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

fn signal(child: &std::process::Child, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, sig).unwrap();
}

#[test]
fn sigint_drains_in_flight_files_and_leaves_valid_outputs() {
    let mut t = TestTree::new();
    for i in 0..60 {
        t = t.file(format!("f{i:03}.log"), &text_bytes(1_500_000, i));
    }
    let log = t.side("f.jsonl");
    let child = spawn(&[
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("gzip"),
        s("--level"),
        s("9"),
        s("--jobs"),
        s("1"),
        s("--failure-log"),
        p(&log),
        s("--json"),
    ]);
    // Mid-run: at least one output published.
    wait_until(Duration::from_secs(60), "a first output", || {
        fs::read_dir(t.root())
            .unwrap()
            .any(|e| e.unwrap().file_name().as_bytes().ends_with(b".gz"))
    });
    signal(&child, rustix::process::Signal::INT);
    let summary = child.finish(Duration::from_secs(60)).code(130).summary();
    assert_eq!(summary["interrupted_by"], 2);
    let done = summary["done"].as_u64().unwrap();
    assert!((1..60).contains(&done), "{summary}");
    // Every published output is whole; nothing is left half-written.
    let gz: Vec<_> = fs::read_dir(t.root())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some(s("gz")))
        .collect();
    assert_eq!(gz.len() as u64, done);
    for g in &gz {
        assert!(
            tool("gzip", &[s("-t"), p(g)], t.dir.path())
                .status
                .success(),
            "{g:?}"
        );
    }
    assert!(temps_under(t.dir.path()).is_empty());
    // Files queued but not started are accounted for as interrupted; the ones in flight when
    // the signal came finished and were published (a file cut short would say otherwise).
    let records = failure_log(&log);
    assert!(
        records
            .iter()
            .all(|r| r["error"] == "interrupted" && r["message"] == "not started: shutting down"),
        "{records:?}"
    );
    assert_eq!(
        done + records.len() as u64 + 60 - summary["files"].as_u64().unwrap(),
        60
    );
}

#[test]
fn sigterm_leaves_a_valid_manifest_for_the_files_done() {
    let mut t = TestTree::new();
    for i in 0..3000 {
        t = t.file(format!("d{}/f{i}", i % 10), &text_bytes(2000, i));
    }
    let manifest = t.side("m");
    let mut cmd = filepipe(&[
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("sha256"),
        s("--jobs"),
        s("1"),
        s("--manifest"),
        p(&manifest),
    ]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let child = Started::new(cmd);
    // As soon as its handler is in place, freeze it, so the signal certainly lands mid-run.
    wait_until(Duration::from_secs(30), "the SIGTERM handler", || {
        catches(&child, 15)
    });
    signal(&child, rustix::process::Signal::STOP);
    signal(&child, rustix::process::Signal::TERM);
    signal(&child, rustix::process::Signal::CONT);
    child.finish(Duration::from_secs(60)).code(143);
    let m = fs::read_to_string(&manifest).unwrap();
    assert!(m.lines().count() < 3000, "the run was not interrupted");
    if !m.is_empty() {
        let check = tool(
            "sha256sum",
            &[s("-c"), s("--strict"), p(&manifest)],
            &t.root(),
        );
        assert!(check.status.success());
    }
    assert!(temps_under(t.dir.path()).is_empty());
}

#[test]
fn second_signal_abandons_the_file_in_progress_without_partial_output() {
    let t = TestTree::new().file("huge.log", &text_bytes(80_000_000, 11));
    let mut cmd = filepipe(&[
        s("batch"),
        p(&t.root()),
        s("--op"),
        s("gzip"),
        s("--level"),
        s("9"),
        s("--jobs"),
        s("1"),
    ]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let child = Started::new(cmd);
    wait_until(Duration::from_secs(60), "the temp file", || {
        !temps_in_progress(&t.root()).is_empty()
    });
    // Private from the start: the input's mode is only given at publish time.
    for temp in temps_in_progress(&t.root()) {
        // (A descriptor may have closed since it was listed.)
        if let Ok(meta) = fs::metadata(&temp) {
            assert_eq!(meta.mode() & 0o7777, 0o600, "{temp:?}");
        }
    }
    // A second request (another signal: the same one at once would count once) abandons the
    // file in progress.
    signal(&child, rustix::process::Signal::INT);
    std::thread::sleep(Duration::from_millis(50));
    signal(&child, rustix::process::Signal::TERM);
    child.finish(Duration::from_secs(60)).code(130);
    // Had the second signal been ignored, the drain would have published huge.log.gz.
    assert!(!t.path("huge.log.gz").exists());
    assert!(temps_under(t.dir.path()).is_empty());
}

#[test]
fn sigkill_at_random_points_then_rerun_finishes_without_corruption() {
    let mut t = TestTree::new();
    for i in 0..40 {
        t = t.file(
            format!("d{}/f{i}.log", i % 4),
            &text_bytes(400_000 + i as usize * 10_000, i),
        );
    }
    let out_dir = t.side("out");
    let root = t.root();
    let args = [
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--jobs"),
        s("2"),
        s("--out"),
        p(&out_dir),
        s("--json"),
    ];
    let count_outputs = || {
        walkdir::WalkDir::new(&out_dir)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().as_bytes().ends_with(b".gz"))
            .count()
    };
    for round in 0..3 {
        let before = count_outputs();
        let child = filepipe(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until(Duration::from_secs(60), "progress", || {
            count_outputs() > before || round == 2 && !temps_in_progress(&out_dir).is_empty()
        });
        std::thread::sleep(Duration::from_millis(7 * round));
        signal(&child, rustix::process::Signal::KILL);
        wait_output(child, Duration::from_secs(10));
        // Whatever exists under a final name is a complete gzip file.
        for e in walkdir::WalkDir::new(&out_dir)
            .into_iter()
            .filter_map(Result::ok)
        {
            if e.file_name().as_bytes().ends_with(b".gz") {
                assert!(tool("gzip", &[s("-t"), p(e.path())], t.dir.path())
                    .status
                    .success());
            }
        }
    }
    let done_before = count_outputs();
    let summary = run(filepipe(&args)).code(0).summary();
    assert_eq!(
        summary["skipped_by_reason"]["up-to-date"].as_u64(),
        Some(done_before as u64)
    );
    assert_eq!(summary["done"].as_u64(), Some(40 - done_before as u64));
    let left = temps_under(t.dir.path());
    assert!(left.is_empty(), "stale temps must be cleaned up: {left:?}");
    assert_eq!(count_outputs(), 40);
    for i in 0..40 {
        let rel = format!("d{}/f{i}.log", i % 4);
        let back = tool(
            "gunzip",
            &[s("-c"), p(&out_dir.join(format!("{rel}.gz")))],
            t.dir.path(),
        );
        assert_eq!(back.stdout, fs::read(t.path(&rel)).unwrap());
    }
}

#[test]
fn include_and_exclude_globs_select_files() {
    let t = TestTree::new()
        .file("a.log", b"1")
        .file("b.txt", b"2")
        .file("skip/c.log", b"3")
        .file("keep/d.log", b"4");
    let out = batch(
        &t,
        &[
            s("--op"),
            s("sha256"),
            s("--include"),
            s("*.log"),
            s("--exclude"),
            s("skip"),
        ],
    );
    out.success();
    let m = std::str::from_utf8(&out.output().stdout).unwrap();
    let names: Vec<&str> = m.lines().map(|l| &l[66..]).collect();
    assert_eq!(names, ["a.log", "keep/d.log"]);
}

#[test]
fn usage_errors_exit_2() {
    let t = TestTree::new();
    for args in [
        vec![s("batch"), p(&t.side("missing")), s("--op"), s("gzip")],
        vec![
            s("batch"),
            p(&t.root()),
            s("--op"),
            s("sha256"),
            s("--out"),
            s("/tmp"),
        ],
        vec![
            s("batch"),
            p(&t.root()),
            s("--op"),
            s("gzip"),
            s("--level"),
            s("10"),
        ],
        vec![s("batch"), p(&t.root()), s("--op"), s("zip")],
        vec![
            s("batch"),
            p(&t.root()),
            s("--op"),
            s("gzip"),
            s("--include"),
            s("a["),
        ],
    ] {
        run(filepipe(&args)).code(2);
    }
}

#[test]
fn stale_temps_are_removed_from_the_output_tree_and_the_manifest_directory() {
    // Temps a stopped filepipe left carry its mark (and nobody's lock); a file that only looks
    // like one does not, and stays.
    let mark = |path: &Path| {
        rustix::fs::setxattr(
            path,
            "user.filepipe.temp",
            &temp_mark(),
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap()
    };
    let stale = ".filepipe.4194305-0.0.tmp";
    let lookalike = ".filepipe.4194305.9.tmp";
    let t = TestTree::new().file("a.txt", b"a");
    let out_dir = t.side("archive");
    fs::create_dir_all(out_dir.join("sub")).unwrap();
    for (dir, name) in [
        (out_dir.join("sub"), stale),
        (t.dir.path().to_path_buf(), stale),
    ] {
        fs::write(dir.join(name), b"torn").unwrap();
        mark(&dir.join(name));
    }
    fs::write(out_dir.join(lookalike), b"someone's file").unwrap();
    let gz = batch(
        &t,
        &[s("--op"), s("gzip"), s("--out"), p(&out_dir), s("--json")],
    );
    let summary = gz.code(0).summary();
    assert_eq!(summary["stale_temps_removed"], 1, "{summary}");
    assert_eq!(summary["files"], 1, "{summary}");
    batch(
        &t,
        &[s("--op"), s("sha256"), s("--manifest"), p(&t.side("SUMS"))],
    )
    .success();
    assert_eq!(temps_under(t.dir.path()), [out_dir.join(lookalike)]);
}

#[test]
fn far_future_mtime_is_handled() {
    let t = TestTree::new().file("future", b"from 2300\n");
    let out = tool(
        "touch",
        &[s("-d"), s("2300-01-01"), p(&t.path("future"))],
        t.dir.path(),
    );
    assert!(out.status.success());
    for op in ["sha256", "gzip"] {
        batch(&t, &[s("--op"), s(op), s("-q")]).success();
    }
    let back = tool("gunzip", &[s("-c"), p(&t.path("future.gz"))], t.dir.path());
    assert_eq!(back.stdout, b"from 2300\n");
}

#[test]
fn created_output_directories_are_no_more_open_than_their_inputs() {
    let t = TestTree::new()
        .file("private/f", b"secret\n")
        .file("shared/g", b"open\n");
    fs::set_permissions(t.path("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(t.path("shared"), fs::Permissions::from_mode(0o755)).unwrap();
    let out_dir = t.side("out");
    batch(&t, &[s("--op"), s("gzip"), s("--out"), p(&out_dir)]).success();
    let mode = |d: &str| fs::metadata(out_dir.join(d)).unwrap().mode() & 0o777;
    assert_eq!(mode("private"), 0o700);
    // Never more open than the input; the umask may only narrow it.
    assert_eq!(mode("shared") & !0o755, 0);
}

/// Reading a file to hash or compress it leaves its atime alone (O_NOATIME): cleanups that go
/// by atime must not see every processed file as just used. Run on a tmpfs mounted
/// `strictatime` in a user namespace, so the test does not depend on how the machine mounts
/// its disks (relatime updates atime once a day at most, noatime never).
#[test]
fn inputs_keep_their_access_time() {
    let t = TestTree::new();
    let script = r#"set -e
mount -t tmpfs -o strictatime,size=4m tmpfs "$1" || exit 99
cd "$1"
mkdir in
echo h > in/hashed
echo c > in/control
touch -a -d @1000000000 in/hashed in/control
cat in/control > /dev/null
"$2" batch in --op sha256 -q > /dev/null
echo "$(stat -c %X in/control) $(stat -c %X in/hashed)""#;
    let mnt = t.side("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-rm", "sh", "-c", script, "sh"])
        .arg(&mnt)
        .arg(bin());
    let out = run(cmd);
    let status = out.output().status;
    if status.code() == Some(99) || !status.success() && !is_root() {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs in a user namespace here: {}",
            out.stderr()
        );
        return;
    }
    let stdout = out.success().stdout();
    let times: Vec<u64> = stdout
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    // The control proves this mount updates atime on a plain read: the test can fail.
    assert_ne!(times[0], 1_000_000_000, "strictatime did not update atime");
    assert_eq!(
        times[1], 1_000_000_000,
        "reading the input changed its atime"
    );
}

/// Machine code that stays the same from commit to commit, and whether it is that: the
/// toolchain's own `libstd-*.so` (optimised code, as the binaries users compress are). Where
/// the toolchain ships none, this test's debug binary, whose code grows with every commit
/// (hence the wider allowances for it below: its ratio to gzip moved from 1.047 to 1.091 as
/// the project grew, with no change in compression).
fn machine_code() -> (Vec<u8>, bool) {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let libstd = sysroot.and_then(|root| {
        let targets = fs::read_dir(root.join("lib/rustlib")).ok()?;
        let mut found: Vec<PathBuf> = targets
            .flatten()
            .filter_map(|t| fs::read_dir(t.path().join("lib")).ok())
            .flat_map(|d| d.flatten().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|n| n.starts_with("libstd-") && n.ends_with(".so"))
            })
            .collect();
        found.sort();
        found.into_iter().next()
    });
    match libstd
        .and_then(|p| fs::read(p).ok())
        .filter(|b| b.len() >= 1 << 20)
    {
        Some(code) => (code, true),
        None => {
            eprintln!(
                "note: no libstd-*.so in the toolchain: machine code from this test's own binary, \
                 with wider allowances"
            );
            (fs::read(bin()).unwrap(), false)
        }
    }
}

#[test]
fn every_level_compresses_about_as_well_as_gzip_at_that_level() {
    // `--level N` asks for gzip -N's compression, whichever library serves it. Text and machine
    // code, compressed whole (libdeflate) and, above 4 MiB, in blocks (zlib-rs), each against
    // the real gzip at the same level.
    let (machine, fixed_code) = machine_code();
    let code = |len: usize| {
        machine
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect::<Vec<u8>>()
    };
    // Real text: libdeflate's lead over gzip is smallest on source code.
    let mut source = Vec::new();
    for dir in ["src", "src/ops", "tests"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for name in names
            .iter()
            .filter(|n| n.extension() == Some(OsStr::new("rs")))
        {
            source.extend(fs::read(name).unwrap());
        }
    }
    let t = TestTree::new()
        .file("whole/source.txt", &source)
        .file("whole/text.log", &text_bytes(1 << 20, 7))
        .file("whole/code.bin", &code(3 << 20))
        .file("blocks/text.log", &text_bytes(6 << 20, 8))
        .file("blocks/code.bin", &code(6 << 20));
    for level in 1..=9u32 {
        let out = t.side(&format!("out{level}"));
        batch(
            &t,
            &[
                s("--op"),
                s("gzip"),
                s("--level"),
                s(&level.to_string()),
                s("--out"),
                p(&out),
            ],
        )
        .success();
        for rel in [
            "whole/source.txt",
            "whole/text.log",
            "whole/code.bin",
            "blocks/text.log",
            "blocks/code.bin",
        ] {
            let limit = match rel {
                // The toolchain's libstd, optimised code: at most 2.2% more than gzip -N at any
                // level, whole or in blocks (1.022x at level 4 in blocks, 1.014x at 6 whole;
                // Rust 1.95), within the 4% the speed targets allow.
                "whole/code.bin" | "blocks/code.bin" if fixed_code => 1.04,
                // The default, 6, uses libdeflate's level 4 (LIBDEFLATE_LEVEL): at most 3.6%
                // more than gzip -6 on the calibration corpora, within the 4% the speed targets
                // allow. Source code is its worst case, and this source (1.036x) changes with
                // every commit: half a point more keeps ordinary edits from tripping the test,
                // while libdeflate's level 3 (1.052x here) still fails it.
                "whole/source.txt" if level == 6 => 1.045,
                _ if rel.starts_with("whole/") && level == 6 => 1.04,
                // Where libdeflate serves N with its level N-1 (LIBDEFLATE_LEVEL): at most 1.5%
                // more than gzip -N on the calibration corpora (the margin allows for this
                // source and binary changing).
                _ if rel.starts_with("whole/") && ![1, 2, 5].contains(&level) => 1.02,
                // zlib-rs's level 1 wrote 38% more than gzip -1 on this text before it was mapped
                // to 2. On machine code it writes up to 4.7% more (this debug binary, which
                // changes with every commit: 4.73% once it held async-nats and tokio, 6.10%
                // with libzstd, blake3 and the metrics exporter too, 7.07% with the binary
                // wire format and the state per result: the binary's code, not a change in
                // compression, which no commit since 6.10% has touched).
                "blocks/code.bin" if level == 1 => 1.08,
                // zlib-rs hashes 4 bytes below level 9, so it misses the 3-byte matches machine
                // code is full of: up to 5.8% more than gzip on this debug binary (2-3% on the
                // system binaries of the calibration, ZLIB_LEVEL), which its level 9 (a 3-byte
                // hash) meets; 7.7% at level 4 once the binary held async-nats and tokio, 9.02%
                // once it held the cluster's permission checks (a debug binary's code, not a
                // change in compression: the same build of main's code measured 1.09 or less).
                "blocks/code.bin" => 1.095,
                // libdeflate's own level 1 writes 5% more than gzip -1 on machine code; this
                // debug binary changes with every commit (5.04% at 44fa22f).
                "whole/code.bin" if level == 1 => 1.06,
                _ => 1.05,
            };
            let ours = fs::metadata(out.join(format!("{rel}.gz"))).unwrap().len();
            let gz = tool(
                "gzip",
                &[s(&format!("-{level}")), s("-c"), s(rel)],
                &t.root(),
            );
            assert!(gz.status.success(), "gzip -{level} {rel}");
            let theirs = gz.stdout.len() as u64;
            let ratio = ours as f64 / theirs as f64;
            assert!(
                ratio <= limit,
                "level {level}, {rel}: {ours} bytes against gzip -{level}'s {theirs} ({ratio:.4})"
            );
        }
    }
}

#[test]
fn progress_is_drawn_on_a_terminal_and_hidden_with_quiet() {
    let mut t = TestTree::new();
    for i in 0..24 {
        t = t.file(format!("d{}/f{i:02}.log", i % 3), &text_bytes(1_000_000, i));
    }
    // `script` gives the run a terminal for stderr, as an administrator's shell would.
    let under_a_terminal = |extra: &str| {
        let cmd = format!(
            "{} batch {} --op gzip --level 9 --force --jobs 2 {extra}",
            bin(),
            t.root().display()
        );
        let out = tool(
            "script",
            &[s("-qfec"), s(&cmd), s("/dev/null")],
            t.dir.path(),
        );
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = under_a_terminal("");
    // The overall bar (files of the total found so far, bytes, ETA) and a line per worker.
    assert!(
        shown.contains(" files ") && shown.contains("ETA"),
        "{shown}"
    );
    assert!(
        shown.contains(".log"),
        "no worker line naming a file: {shown}"
    );
    let quiet = under_a_terminal("--quiet");
    assert!(!quiet.contains("ETA"), "{quiet}");
    // Not a terminal: no bar either.
    let piped = batch(&t, &[s("--op"), s("gzip"), s("--force")]);
    assert!(!piped.stderr().contains("ETA"));
}

#[test]
fn verbosity_selects_which_per_file_lines_reach_stderr() {
    let t = TestTree::new().file("regular", b"data");
    mkfifo(&t.path("pipe"));
    let stderr = |args: &[&OsStr], rust_log: Option<&str>| {
        let mut cmd = filepipe(&[s("batch"), p(&t.root()), s("--op"), s("sha256")]);
        cmd.args(args);
        if let Some(v) = rust_log {
            cmd.env("RUST_LOG", v);
        }
        run(cmd).success().stderr()
    };
    // A skip is an info line: shown with -v or RUST_LOG=info, not by default.
    let line = "not a regular file (FIFO)";
    assert!(!stderr(&[], None).contains(line));
    assert!(stderr(&[s("-v")], None).contains(line));
    assert!(stderr(&[], Some("info")).contains(line));
    // -q: nothing at all on stderr for a run without failures.
    assert!(stderr(&[s("-q")], None).is_empty());
}

/// An output directory named with `..` after a name not made yet is made where the name leads
/// as the checks judged it: the name is not made on the way (found by a review:
/// `--out A/junk/../../o` made `A/junk`, an empty directory in the input tree).
#[test]
fn an_output_path_climbing_out_of_a_name_not_made_makes_nothing_on_the_way() {
    let t = TestTree::new().file("f", b"f\n");
    let out = t.root().join("junk/../../o2");
    run(filepipe(&[
        OsStr::new("batch"),
        t.root().as_os_str(),
        OsStr::new("--op"),
        OsStr::new("gzip"),
        OsStr::new("--out"),
        out.as_os_str(),
    ]))
    .success();
    assert!(!t.path("junk").exists());
    assert!(t.side("o2/f.gz").is_file());
}

/// A directory at an output's name is no output anyone made: `--force` does not replace it,
/// and the file fails `output-exists`, saying so, for gzip and zstd alike; the directory and
/// what it holds are kept (found by a review: a rename over it failed `io`, "Is a directory").
#[test]
fn force_does_not_replace_a_directory_at_the_output_name() {
    for (op, ext) in [("gzip", "gz"), ("zstd", "zst")] {
        let t = TestTree::new()
            .file("x", b"x\n")
            .file(format!("x.{ext}/kept"), b"kept\n")
            .file("y", b"y\n");
        let log = t.side("failures.jsonl");
        let args = [
            s("--op"),
            s(op),
            s("--force"),
            s("--json"),
            s("--failure-log"),
            p(&log),
        ];
        let sum = batch(&t, &args).code(1).summary();
        // `y`, and what the directory holds.
        assert_eq!(
            (sum["done"].as_u64(), sum["failed"].as_u64()),
            (Some(2), Some(1)),
            "{sum}"
        );
        let log = failure_log(&log);
        let exists = records_of(&log, "output-exists");
        assert_eq!((exists.len(), log.len()), (1, 1), "{log:?}");
        let message = exists[0]["message"].as_str().unwrap();
        assert!(message.contains("is a directory"), "{message}");
        assert_eq!(
            fs::read(t.path(format!("x.{ext}/kept"))).unwrap(),
            b"kept\n"
        );
        assert!(t.path(format!("y.{ext}")).is_file());
    }
}

/// A kept manifest is as durable as a rewritten one: its data and its directory are flushed
/// (a run stopped between its rename and its directory's flush, or a manifest last written
/// with `--durability none`, leaves both to the next run), and it is neither renamed nor
/// linked (found by review r54b: only its data was flushed).
#[test]
fn a_kept_manifest_is_flushed_with_its_directory() {
    if !common::strace::have_strace() {
        eprintln!("SKIPPED: no strace to see the flushes");
        return;
    }
    let t = TestTree::new().file("a", b"one").file("b", b"two");
    let dir = t.side("sums");
    fs::create_dir(&dir).unwrap();
    let manifest = dir.join("SUMS");
    let root = t.root();
    let args = [
        s("batch"),
        p(&root),
        s("--op"),
        s("sha256"),
        s("--manifest"),
        p(&manifest),
    ];
    let (first, _) = common::strace::traced(&args, &[], None);
    first.success();
    let (again, calls) = common::strace::traced(&args, &[], None);
    again.success();
    let on = |name: &str, path: &Path| {
        calls.iter().any(|c| {
            c.name == name && c.ok() && common::strace::fd_path(&c.arg(0)) == path.to_str().unwrap()
        })
    };
    assert!(
        on("fdatasync", &manifest),
        "the kept manifest's data is not flushed"
    );
    assert!(
        on("fsync", &dir),
        "the kept manifest's directory is not flushed"
    );
    let named = calls.iter().any(|c| {
        matches!(&*c.name, "renameat2" | "renameat" | "linkat") && c.args.contains("SUMS")
    });
    assert!(!named, "the unchanged manifest was written again");
}

/// A stderr that cannot be written (a log on a full disk; `/dev/full` here) costs the lines,
/// never the exit status: the summary and an error's message went through `eprintln!`, which
/// panicked, and exit 0, 1 or 2 became 101 (review r58).
#[test]
fn a_stderr_that_cannot_be_written_keeps_the_exit_status() {
    let t = TestTree::new().file("a", b"a\n");
    let code = |args: &[&OsStr]| {
        let mut sh = Command::new("sh");
        sh.args(["-c", "exec \"$0\" \"$@\" 2>/dev/full"])
            .arg(bin())
            .args(args)
            .env_remove("RUST_LOG");
        run(sh).output().status.code()
    };
    // The summary, on stderr.
    let done = code(&[s("batch"), p(&t.root()), s("--op"), s("gzip")]);
    assert_eq!(done, Some(0));
    // A run's own error (the root is not there), and a verify's warning of a malformed line.
    let failed = code(&[s("batch"), p(&t.path("none")), s("--op"), s("gzip")]);
    assert!(matches!(failed, Some(1 | 2)), "{failed:?}");
    let sums = t.side("SUMS");
    fs::write(&sums, "not a line of a manifest\n").unwrap();
    let verified = code(&[s("verify"), p(&sums)]);
    assert!(
        verified.is_some_and(|c| c != 101 && c & 1 == 1),
        "{verified:?}"
    );
}
