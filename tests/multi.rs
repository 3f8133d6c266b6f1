//! Several results from one read (`--op sha256,zstd`, issue 19): the real binary over temp
//! trees, each output checked with the real `zstd -t`/`zstd -dc` or `gzip -t`, each manifest
//! with `sha256sum -c`, `sha512sum -c` or `b3sum -c`, and strace to show each input is read
//! once. A test that needs a tool which is not installed says SKIPPED and passes.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::strace::{fd_path, have_strace, parse_strace};
use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

fn p(x: &Path) -> &OsStr {
    x.as_os_str()
}

/// Whether every tool in `tools` is installed; says the test skipped if not.
fn have_or_skip(tools: &[&str]) -> bool {
    for tool in tools {
        let ok = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("SKIPPED: no {tool} to check the results");
            return false;
        }
    }
    true
}

/// `filepipe batch ROOT --op OP --json ARGS...`.
fn batch(root: &Path, op: &str, args: &[&OsStr]) -> Run {
    let mut cmd = filepipe(&[s("batch"), p(root), s("--op"), s(op), s("--json")]);
    cmd.args(args);
    run(cmd)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// `zstd -t` passes on `zst` and `zstd -dc` gives back exactly `original`.
fn assert_zstd_restores(zst: &Path, original: &[u8]) {
    let dir = zst.parent().unwrap();
    let t = tool("zstd", &[s("-t"), s("-q"), p(zst)], dir);
    assert!(t.status.success(), "zstd -t {}: {t:?}", zst.display());
    let d = tool("zstd", &[s("-dc"), p(zst)], dir);
    assert!(d.status.success(), "zstd -dc {}: {d:?}", zst.display());
    assert!(d.stdout == original, "{} does not restore", zst.display());
}

/// The paths a manifest lists, unescaped as GNU tools escape them (a leading `\` marks a line
/// whose name has `\\` or `\n`).
fn listed(manifest: &Path) -> Vec<Vec<u8>> {
    // Not written yet (watch mode): nothing listed.
    let text = fs::read(manifest).unwrap_or_default();
    text.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (escaped, line) = match line.strip_prefix(b"\\") {
                Some(rest) => (true, rest),
                None => (false, line),
            };
            let at = line.windows(2).position(|w| w == b"  ").unwrap();
            let name = &line[at + 2..];
            if !escaped {
                return name.to_vec();
            }
            let mut out = Vec::new();
            let mut it = name.iter();
            while let Some(&b) = it.next() {
                if b == b'\\' {
                    match it.next() {
                        Some(b'n') => out.push(b'\n'),
                        Some(&c) => out.push(c),
                        None => {}
                    }
                } else {
                    out.push(b);
                }
            }
            out
        })
        .collect()
}

/// Files of a tree: (name bytes, content).
type Files = Vec<(Vec<u8>, Vec<u8>)>;

/// What one run left: its two manifests and its outputs by path.
type RunResults = (Vec<u8>, Vec<u8>, HashMap<PathBuf, Vec<u8>>);

/// Inputs with awkward names: a space, a newline, bytes that are not UTF-8, an empty file, one
/// large enough to stream (over 4 MiB) and one already compressed.
fn awkward_tree() -> (TestTree, Files) {
    let files: Files = vec![
        (b"plain.log".to_vec(), text_bytes(100_000, 1)),
        (b"with space/a b.txt".to_vec(), text_bytes(3_000, 2)),
        (b"nl\nname".to_vec(), b"newline in the name\n".to_vec()),
        (b"raw-\xff\xfe.bin".to_vec(), noise_bytes(40_000, 3)),
        (b"empty".to_vec(), Vec::new()),
        (b"big/large.log".to_vec(), text_bytes(6 << 20, 4)),
        (b"old.gz".to_vec(), noise_bytes(5_000, 5)),
    ];
    let mut t = TestTree::new();
    for (rel, data) in &files {
        t = t.file(rel, data);
    }
    (t, files)
}

#[test]
fn sha256_and_zstd_from_one_read_over_awkward_names() {
    if !have_or_skip(&["zstd", "sha256sum"]) {
        return;
    }
    let (t, files) = awkward_tree();
    let manifest = t.side("SHA256SUMS");
    let log = t.side("failures.jsonl");
    let r = batch(
        &t.root(),
        "sha256,zstd",
        &[s("--manifest"), p(&manifest), s("--failure-log"), p(&log)],
    );
    r.success();
    let sum = r.summary();
    assert_eq!(sum["op"], "sha256,zstd", "{sum}");
    // One outcome per file: every input done (the .gz one hashed only), none skipped.
    assert_eq!(sum["files"], files.len(), "{sum}");
    assert_eq!(sum["done"], files.len(), "{sum}");
    assert_eq!(sum["skipped"], 0, "{sum}");
    assert_eq!(sum["failed"], 0, "{sum}");
    for (rel, data) in &files {
        let input = t.path(rel);
        let zst = with_suffix(&input, ".zst");
        if rel.ends_with(b".gz") {
            // Already compressed: hashed and listed, not compressed.
            assert!(!zst.exists(), "{} compressed", zst.display());
            continue;
        }
        assert_zstd_restores(&zst, data);
        assert_eq!(&fs::read(&input).unwrap(), data, "input untouched");
    }
    // The manifest describes the inputs: every one, none of the outputs.
    assert_check("sha256sum", &manifest, &t.root(), files.len());
    let mut names = listed(&manifest);
    names.sort();
    let mut want: Vec<Vec<u8>> = files.iter().map(|(rel, _)| rel.clone()).collect();
    want.sort();
    assert_eq!(names, want);
    // The already-compressed one says why it was only hashed.
    let records = failure_log(&log);
    let hashed: Vec<_> = records.iter().filter(|r| r["status"] == "hashed").collect();
    assert_eq!(hashed.len(), 1, "{records:?}");
    assert_eq!(hashed[0]["path"], "old.gz");
    assert_eq!(hashed[0]["error"], "already-compressed");
}

#[test]
fn several_hashes_write_one_manifest_each_that_its_own_tool_checks() {
    if !have_or_skip(&["gzip", "sha256sum", "sha512sum", "b3sum"]) {
        return;
    }
    // b3sum reads UTF-8 names only: a space and a newline, no raw bytes.
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("a.txt", text_bytes(20_000, 1)),
        ("sub dir/b c.log", text_bytes(300_000, 2)),
        ("nl\nname", b"x\n".to_vec()),
        ("large.bin", noise_bytes(5 << 20, 3)),
        ("empty", Vec::new()),
    ];
    let mut t = TestTree::new();
    for (rel, data) in &files {
        t = t.file(rel, data);
    }
    let m = t.side("SUMS");
    // The first hash named is at --manifest itself, the others beside it.
    batch(
        &t.root(),
        "sha512,gzip,sha256,blake3",
        &[s("--manifest"), p(&m)],
    )
    .success();
    let root = t.root();
    assert_check("sha512sum", &m, &root, files.len());
    assert_check("sha256sum", &with_suffix(&m, ".sha256"), &root, files.len());
    assert_check("b3sum", &with_suffix(&m, ".blake3"), &root, files.len());
    for (rel, data) in &files {
        let gz = with_suffix(&t.path(rel), ".gz");
        let out = tool("gzip", &[s("-dc"), p(&gz)], &root);
        assert!(out.status.success() && &out.stdout == data, "{rel}");
    }

    // Hashes alone, several of them: the same manifests, no outputs.
    let t2 = TestTree::new().file("x", b"one\n").file("y z", b"two\n");
    let m2 = t2.side("B3SUMS");
    let r = batch(&t2.root(), "blake3,sha256", &[s("--manifest"), p(&m2)]);
    r.success();
    assert_eq!(r.summary()["op"], "sha256,blake3");
    assert_check("b3sum", &m2, &t2.root(), 2);
    assert_check("sha256sum", &with_suffix(&m2, ".sha256"), &t2.root(), 2);
    assert_eq!(fs::read_dir(t2.root()).unwrap().count(), 2, "no outputs");
}

#[test]
fn a_rerun_hashes_up_to_date_and_compressed_inputs_and_lists_no_output() {
    if !have_or_skip(&["zstd", "sha256sum"]) {
        return;
    }
    let (t, files) = awkward_tree();
    let first = t.side("first");
    batch(&t.root(), "sha256,zstd", &[s("--manifest"), p(&first)]).success();
    // The outputs are up to date: nothing is compressed again, yet every input is read for
    // its hash and listed, and the outputs (named as the compressor's own, next to the
    // inputs) are not inputs.
    let second = t.side("second");
    let r = batch(&t.root(), "sha256,zstd", &[s("--manifest"), p(&second)]);
    r.success();
    let sum = r.summary();
    let outputs = files.len() - 1;
    assert_eq!(sum["done"], files.len(), "{sum}");
    assert_eq!(sum["skipped"], outputs, "{sum}");
    assert_eq!(sum["bytes_out"], 0, "{sum}");
    assert_eq!(fs::read(&first).unwrap(), fs::read(&second).unwrap());
    assert_check("sha256sum", &second, &t.root(), files.len());
}

#[test]
fn outputs_and_manifests_are_the_same_whatever_jobs_is() {
    if !have_or_skip(&["zstd"]) {
        return;
    }
    // One tree, copied with its dates (zstd outputs carry their input's mtime in their stamp).
    let mut t = TestTree::new();
    for i in 0..40u64 {
        t = t.file(
            format!("d{}/f{i}", i % 4),
            &text_bytes(1_000 + 5_000 * i as usize, i),
        );
    }
    let t = t.file("big", &text_bytes(9 << 20, 99));
    let mut results: Vec<RunResults> = Vec::new();
    for jobs in ["1", "2", "3"] {
        let copy = t.side(&format!("copy-{jobs}"));
        let cp = tool("cp", &[s("-a"), p(&t.root()), p(&copy)], Path::new("/"));
        assert!(cp.status.success(), "{cp:?}");
        let m = t.side(&format!("SUMS-{jobs}"));
        batch(
            &copy,
            "blake3,zstd,sha512",
            &[s("--jobs"), s(jobs), s("--manifest"), p(&m)],
        )
        .success();
        let outputs = walkdir::WalkDir::new(&copy)
            .into_iter()
            .map(Result::unwrap)
            .filter(|e| e.path().extension() == Some(OsStr::new("zst")))
            .map(|e| {
                let rel = e.path().strip_prefix(&copy).unwrap().to_path_buf();
                (rel, fs::read(e.path()).unwrap())
            })
            .collect::<HashMap<_, _>>();
        assert_eq!(outputs.len(), 41, "--jobs {jobs}");
        let first = fs::read(&m).unwrap();
        let second = fs::read(with_suffix(&m, ".sha512")).unwrap();
        results.push((first, second, outputs));
    }
    for r in &results[1..] {
        assert!(
            r.0 == results[0].0,
            "the blake3 manifest differs with --jobs"
        );
        assert!(
            r.1 == results[0].1,
            "the sha512 manifest differs with --jobs"
        );
        assert!(r.2 == results[0].2, "an output differs with --jobs");
    }
}

#[test]
fn each_input_is_read_once_for_every_result() {
    if !have_strace() {
        eprintln!("SKIPPED: no strace to count the reads");
        return;
    }
    let (t, files) = awkward_tree();
    let m = t.side("SUMS");
    let trace = t.side("strace.log");
    let mut cmd = std::process::Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-y",
        "-s",
        "0",
        "-e",
        "trace=read,pread64,readv,preadv",
    ])
    .arg("-o")
    .arg(&trace)
    .arg(bin())
    .args([s("batch"), p(&t.root()), s("--op"), s("sha256,blake3,zstd")])
    .args([s("--jobs"), s("2"), s("--manifest"), p(&m)]);
    run(cmd).success();
    // The bytes read through descriptors of each input, summed: its size, not once per result.
    let log = fs::read_to_string(&trace).unwrap();
    let mut read: HashMap<String, u64> = HashMap::new();
    for call in parse_strace(&log) {
        if call.ok() {
            let n: u64 = call.ret.parse().unwrap_or(0);
            *read.entry(fd_path(&call.arg(0)).to_string()).or_default() += n;
        }
    }
    for (rel, data) in &files {
        // strace prints a name's non-printable bytes escaped: such a name is looked up by
        // its printable start (no two inputs here share one).
        let path = t.path(rel);
        let bytes = path.as_os_str().as_bytes();
        let printable = bytes
            .iter()
            .position(|&b| !(0x20..0x7f).contains(&b))
            .unwrap_or(bytes.len());
        let prefix = String::from_utf8_lossy(&bytes[..printable]).into_owned();
        let got: u64 = if printable == bytes.len() {
            read.get(&prefix).copied().unwrap_or(0)
        } else {
            read.iter()
                .filter(|(k, _)| k.starts_with(&prefix) && !k.ends_with(".zst"))
                .map(|(_, n)| *n)
                .sum()
        };
        assert_eq!(
            got,
            data.len() as u64,
            "{}: bytes read from the input",
            String::from_utf8_lossy(rel)
        );
    }
    assert_eq!(listed(&m).len(), files.len());
}

#[test]
fn a_file_whose_output_cannot_be_published_fails_whole_and_is_not_listed() {
    // Someone else's file under the output's name: the compressor refuses to overwrite it,
    // so the file fails, and the manifest must not list it as if it were done.
    let t = TestTree::new()
        .file("ok.txt", b"fine\n")
        .file("taken.txt", b"mine\n")
        .file("taken.txt.zst", b"not filepipe's output\n");
    let m = t.side("SUMS");
    let r = batch(&t.root(), "sha256,zstd", &[s("--manifest"), p(&m)]);
    r.code(1);
    let sum = r.summary();
    assert_eq!(sum["done"], 1, "{sum}");
    assert_eq!(sum["failed"], 1, "{sum}");
    // taken.txt.zst is named like an output next to the inputs: not an input either.
    assert_eq!(sum["skipped"], 1, "{sum}");
    assert_eq!(listed(&m), vec![b"ok.txt".to_vec()]);
    assert_eq!(
        fs::read(t.path("taken.txt.zst")).unwrap(),
        b"not filepipe's output\n"
    );
}

#[test]
fn what_cannot_be_combined_is_refused_before_anything_is_read() {
    let t = TestTree::new().file("a", b"a\n");
    let m = t.side("SUMS");
    let aside = t.side("aside");
    let cases: [(&str, Vec<&OsStr>, &str); 9] = [
        ("gzip,zstd", vec![], "at most one compressor"),
        ("sha256,zstd,sha256", vec![], "given twice"),
        ("zstd,zstd", vec![], "given twice"),
        ("sha256,md5", vec![], "unknown op"),
        ("sha256,zstd", vec![s("--remove-source")], "--remove-source"),
        (
            "zstd,blake3",
            vec![s("--move-source"), p(&aside)],
            "--move-source",
        ),
        ("sha256,blake3", vec![], "--manifest"),
        (
            "sha256,blake3",
            vec![s("--level"), s("3"), s("--manifest"), p(&m)],
            "--level",
        ),
        (
            "sha256,gzip",
            vec![s("--level"), s("12"), s("--manifest"), p(&m)],
            "--level",
        ),
    ];
    for (op, args, why) in cases {
        let r = batch(&t.root(), op, &args);
        r.failure();
        assert!(r.stderr().contains(why), "{op} {args:?}: {}", r.stderr());
        assert!(
            !t.path("a.zst").exists() && !t.path("a.gz").exists(),
            "{op}"
        );
        assert!(!m.exists(), "{op}: a manifest was written");
    }
    // Cluster mode takes several results too (tests/cluster_multi.rs): not refused, the run
    // gets as far as dialling the queue.
    if cfg!(feature = "cluster") {
        let r = batch(
            &t.root(),
            "sha256,zstd",
            &[
                s("--queue"),
                s("nats://127.0.0.1:1"),
                s("--manifest"),
                p(&m),
            ],
        );
        r.code(2);
        assert!(r.stderr().contains("cannot connect"), "{}", r.stderr());
    }
    // A compressor with a hash takes --manifest (a compressor alone still does not).
    batch(&t.root(), "zstd", &[s("--manifest"), p(&m)]).failure();
    batch(&t.root(), "zstd,sha256", &[s("--manifest"), p(&m)]).success();
    assert_eq!(listed(&m), vec![b"a".to_vec()]);
}

#[test]
fn watch_mode_publishes_outputs_and_keeps_every_manifest() {
    if !have_or_skip(&["zstd", "sha256sum", "b3sum"]) {
        return;
    }
    let t = TestTree::new()
        .file("pre.log", &text_bytes(30_000, 1))
        .file("old.gz", &noise_bytes(2_000, 2));
    let m = t.side("SUMS");
    let m_str = m.to_str().unwrap();
    let d = Daemon::ready(&t, &["--op", "sha256,blake3,zstd", "--manifest", m_str]);
    fs::create_dir_all(t.path("new dir")).unwrap();
    fs::write(t.path("new dir/later.txt"), text_bytes(50_000, 3)).unwrap();
    fs::write(t.path("nl\nname"), b"x\n").unwrap();
    d.wait_idle(4);
    let b3 = with_suffix(&m, ".blake3");
    wait_until(Duration::from_secs(30), "both manifests", || {
        listed(&m).len() == 4 && b3.exists() && listed(&b3).len() == 4
    });
    d.stop().success();
    assert_check("sha256sum", &m, &t.root(), 4);
    assert_check("b3sum", &b3, &t.root(), 4);
    for rel in ["pre.log", "new dir/later.txt", "nl\nname"] {
        let data = fs::read(t.path(rel)).unwrap();
        assert_zstd_restores(&with_suffix(&t.path(rel), ".zst"), &data);
    }
    assert!(!t.path("old.gz.zst").exists());

    // Restarted: the manifests are rewritten from the state's digests, each algorithm's own
    // part of the row, and a changed file is redone (its own output replaced).
    fs::remove_file(&m).unwrap();
    fs::remove_file(&b3).unwrap();
    let d = Daemon::ready(&t, &["--op", "sha256,blake3,zstd", "--manifest", m_str]);
    fs::write(t.path("pre.log"), b"changed\n").unwrap();
    wait_until(
        Duration::from_secs(30),
        "the manifests after the change",
        || {
            b3.exists()
                && m.exists()
                && fs::read(&m).unwrap().windows(7).any(|w| w == b"pre.log")
                && tool("sha256sum", &[s("-c"), s("--quiet"), p(&m)], &t.root())
                    .status
                    .success()
        },
    );
    d.stop().success();
    assert_check("sha256sum", &m, &t.root(), 4);
    assert_check("b3sum", &b3, &t.root(), 4);
    assert_zstd_restores(&t.path("pre.log.zst"), b"changed\n");
}

#[test]
fn the_config_file_takes_several_results_and_refuses_what_cannot_be() {
    let t = TestTree::new().file("a", b"a\n");
    let config = t.side("filepipe.toml");
    let check = |op: &str, extra: &str| {
        fs::write(
            &config,
            format!(
                "state_dir = {:?}\n[[watch]]\npath = {:?}\nop = {op:?}\n{extra}",
                t.side("state"),
                t.root()
            ),
        )
        .unwrap();
        run(filepipe(&[s("check-config"), p(&config)]))
    };
    let m = format!("manifest = {:?}\n", t.side("SUMS"));
    check("sha256,zstd", &m).success();
    check("zstd,sha512", "level = 19\n").success();
    let r = check("gzip,zstd", "");
    r.failure();
    assert!(
        r.stderr().contains("at most one compressor"),
        "{}",
        r.stderr()
    );
    let r = check("zstd", &m);
    r.failure();
    assert!(r.stderr().contains("manifest"), "{}", r.stderr());
}

/// `--manifest ROOT/SUMS` with two hashes derives `ROOT/SUMS.sha512`. A user's input of that
/// name is refused, not silently dropped from the walk and overwritten (found by a review).
#[test]
fn a_derived_manifest_name_never_clobbers_a_user_input() {
    let t = TestTree::new()
        .file("a", b"a\n")
        .file("SUMS.sha512", b"my precious notes, an input\n");
    let m = t.path("SUMS");
    let r = batch(&t.root(), "sha256,sha512", &[s("--manifest"), p(&m)]);
    assert!(
        r.code(2).stderr().contains("is not a sha512 manifest"),
        "{}",
        r.stderr()
    );
    assert_eq!(
        fs::read(t.path("SUMS.sha512")).unwrap(),
        b"my precious notes, an input\n",
    );
}

/// The name the user typed too: an input of the tree, or any file that is not a manifest, is
/// refused, not replaced (found by a review: `--manifest t/a` replaced the input `t/a`); a
/// manifest of any hash (the op changed since) is replaced as before. Nor may a manifest go
/// into the state directory, where it replaced the state's database.
#[test]
fn the_typed_manifest_name_replaces_only_a_manifest() {
    let t = TestTree::new()
        .file("a", b"my precious notes, an input\n")
        .file("b", b"b\n");
    let r = batch(&t.root(), "sha256", &[s("--manifest"), p(&t.path("a"))]);
    assert!(
        r.code(2).stderr().contains("exists and is not a manifest"),
        "{}",
        r.stderr()
    );
    assert_eq!(
        fs::read(t.path("a")).unwrap(),
        b"my precious notes, an input\n"
    );
    // A sha512 manifest of an earlier run, replaced by this sha256 one.
    let m = t.side("SUMS");
    batch(&t.root(), "sha512", &[s("--manifest"), p(&m)]).success();
    batch(&t.root(), "sha256", &[s("--manifest"), p(&m)]).success();
    let listed = fs::read_to_string(&m).unwrap();
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(listed.lines().all(|l| l.find(' ') == Some(64)), "{listed}");
    // Longer than what is read of it (64 KiB): a manifest cut in a line is still one, and a
    // file with no whole line in what is read (an image, a one-line JSON) is not.
    let long: String = (0..4000).map(|i| format!("{i:064x}  f{i}\n")).collect();
    fs::write(&m, &long).unwrap();
    batch(&t.root(), "sha256", &[s("--manifest"), p(&m)]).success();
    assert_eq!(fs::read_to_string(&m).unwrap().lines().count(), 2);
    // Nor notes kept after a manifest's lines, in a file read whole (up to 128 KiB) or by its
    // ends (found by a review: only the first 64 KiB were read, and such a file was replaced).
    // Each kept, unchanged, with the reason.
    let refused = |name: &str, notes: &str| {
        let kept = t.side(name);
        fs::write(&kept, notes).unwrap();
        let r = batch(&t.root(), "sha256", &[s("--manifest"), p(&kept)]);
        assert!(
            r.code(2).stderr().contains("exists and is not a manifest"),
            "{name}: {}",
            r.stderr()
        );
        assert_eq!(fs::read_to_string(&kept).unwrap(), notes, "{name}");
    };
    for lines in [1200, 4000] {
        let mut notes = long.lines().take(lines).collect::<Vec<_>>().join("\n");
        notes.push_str("\n# NOTES (do not lose)\nthe server room key is under the mat\n");
        refused(&format!("notes-{lines}.txt"), &notes);
    }
    // Nor notes kept in the middle of a long one: the whole file is read (found by a review,
    // when only its ends were).
    let head: String = long.lines().take(2000).collect::<Vec<_>>().join("\n");
    for (i, middle) in [
        "# NOTES keep these\n".to_owned(),
        format!("{}\n", "x".repeat(100 << 10)),
    ]
    .iter()
    .enumerate()
    {
        refused(
            &format!("notes-middle-{i}.txt"),
            &format!("{head}\n{middle}{head}\n"),
        );
    }
    let one_line = t.side("one-line.json");
    fs::write(&one_line, vec![b'7'; 200 << 10]).unwrap();
    let r = batch(&t.root(), "sha256", &[s("--manifest"), p(&one_line)]);
    assert!(
        r.code(2).stderr().contains("exists and is not a manifest"),
        "{}",
        r.stderr()
    );
    let state = t.side("state");
    fs::create_dir_all(&state).unwrap();
    let inside = state.join("filepipe.sqlite");
    let r = batch(
        &t.root(),
        "sha256",
        &[s("--state"), p(&state), s("--manifest"), p(&inside)],
    );
    assert!(
        r.code(2).stderr().contains("inside the state directory"),
        "{}",
        r.stderr()
    );
}

/// The same outside the tree: a file the user never named on the command line is replaced.
#[test]
fn a_derived_manifest_name_never_clobbers_an_existing_user_file() {
    let t = TestTree::new().file("a", b"a\n");
    let m = t.side("SUMS");
    let other = t.side("SUMS.blake3");
    fs::write(&other, b"not a manifest: the user's own file\n").unwrap();
    let r = batch(&t.root(), "sha256,blake3", &[s("--manifest"), p(&m)]);
    // Refusing the run would do; silently replacing the file does not.
    if r.output().status.success() {
        assert_eq!(
            fs::read(&other).unwrap(),
            b"not a manifest: the user's own file\n",
            "SUMS.blake3 (never named by the user) was replaced"
        );
    }
}

/// A real input named like an output (`backup.zst`, no `backup` beside it): `--op sha256`
/// lists it; `--op sha256,zstd` leaves it out of the manifest, so the manifest of the same
/// tree depends on whether a compressor rides along.
#[test]
fn a_user_zst_file_is_listed_as_sha256_alone_lists_it() {
    let t = TestTree::new()
        .file("a.txt", b"a\n")
        .file("backup.zst", &noise_bytes(4_000, 9));
    let alone = t.side("ALONE");
    batch(&t.root(), "sha256", &[s("--manifest"), p(&alone)]).success();
    let multi = t.side("MULTI");
    batch(&t.root(), "sha256,zstd", &[s("--manifest"), p(&multi)]).success();
    assert_eq!(
        listed(&alone),
        listed(&multi),
        "the sha256 manifest differs when zstd is added"
    );
}

/// The failure log and a derived manifest name may be the same file: one overwrites the other.
#[test]
fn failure_log_and_derived_manifest_do_not_collide() {
    let t = TestTree::new().file("a", b"a\n").file("b.gz", b"xx");
    let m = t.side("SUMS");
    let log = t.side("SUMS.blake3");
    let r = batch(
        &t.root(),
        "sha256,blake3,zstd",
        &[s("--manifest"), p(&m), s("--failure-log"), p(&log)],
    );
    assert!(
        !r.output().status.success(),
        "--failure-log {} is also the blake3 manifest, yet the run was accepted",
        log.display()
    );
}

/// Watch mode with `--out` (outputs elsewhere): a user's `x.zst` dropped in the tree is
/// ignored by name (`events::ignored_name` matches the op's suffix even when mirrored): never
/// hashed, never listed, no record of it. Batch mode over the same tree lists it (hashed only).
#[test]
fn watch_with_out_lists_a_user_zst_input_as_batch_does() {
    let t = TestTree::new()
        .file("a.txt", &text_bytes(3_000, 1))
        .file("archive.tar.zst", &noise_bytes(3_000, 2));
    let out = t.side("out");
    fs::create_dir(&out).unwrap();
    let bm = t.side("BATCH");
    let r = batch(
        &t.root(),
        "sha256,zstd",
        &[s("--out"), p(&t.side("out-batch")), s("--manifest"), p(&bm)],
    );
    r.success();
    assert_eq!(listed(&bm).len(), 2, "batch lists both");
    let m = t.side("SUMS");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "sha256,zstd",
            "--out",
            out.to_str().unwrap(),
            "--manifest",
            m.to_str().unwrap(),
        ],
    );
    wait_until(Duration::from_secs(30), "the manifest", || {
        listed(&m).contains(&b"a.txt".to_vec())
    });
    std::thread::sleep(Duration::from_secs(2));
    let got = listed(&m);
    d.stop();
    assert_eq!(got, listed(&bm), "watch's manifest differs from batch's");
}
