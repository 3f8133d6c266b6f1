//! Several results from one read through cluster mode (`--op sha256,blake3,zstd --queue`,
//! issues 17 and 19), against a real `nats-server` and real worker processes: every `.zst`
//! checked with the real `zstd`, every manifest with `sha256sum -c` and `b3sum -c`, and each
//! manifest byte for byte the one a local batch writes over the same tree. Hostile job
//! messages (an unknown op, two compressors, an op twice) and outcomes whose digests are not
//! the run's are refused without harm.
#![cfg(feature = "cluster")]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cluster::*;
use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

/// The ops most tests run: two hashes (two manifests) and a compressor, from one read.
const OPS: &str = "sha256,blake3,zstd";

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

/// `path` with `suffix` added to its name (`SUMS` -> `SUMS.blake3`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// A local `filepipe batch ROOT --op OP --manifest MANIFEST --json EXTRA`: the reference.
fn local_batch(root: &Path, op: &str, manifest: &Path, extra: &[&OsStr]) -> Run {
    let mut cmd = filepipe(&[s("batch"), root.as_os_str(), s("--op"), s(op), s("--json")]);
    cmd.arg("--manifest").arg(manifest).args(extra);
    run(cmd)
}

/// The manifests `--manifest manifest` gives for `op`'s hashes: FILE, then FILE.<hash>.
fn manifests_of(op: &str, manifest: &Path) -> Vec<PathBuf> {
    let hashes = op
        .split(',')
        .filter(|o| !["gzip", "zstd"].contains(o))
        .collect::<Vec<_>>();
    hashes
        .iter()
        .enumerate()
        .map(|(i, h)| match i {
            0 => manifest.to_path_buf(),
            _ => with_suffix(manifest, &format!(".{h}")),
        })
        .collect()
}

/// Each of `op`'s manifests at `got` is byte for byte the one at `want`.
fn assert_same_manifests(op: &str, got: &Path, want: &Path) {
    for (g, w) in manifests_of(op, got).iter().zip(manifests_of(op, want)) {
        let (g_bytes, w_bytes) = (fs::read(g).unwrap(), fs::read(&w).unwrap());
        assert!(
            g_bytes == w_bytes,
            "{} differs from the local run's {}:\n{}\n---\n{}",
            g.display(),
            w.display(),
            String::from_utf8_lossy(&g_bytes),
            String::from_utf8_lossy(&w_bytes)
        );
    }
}

/// `sha256sum -c SUMS` and `b3sum -c SUMS.blake3` pass, run from `root`, over `n` files each.
fn assert_checks(manifest: &Path, root: &Path, n: usize) {
    assert_check("sha256sum", manifest, root, n);
    assert_check("b3sum", &with_suffix(manifest, ".blake3"), root, n);
}

/// Every `.zst` output under `outputs` (one whose input is at the same place under `inputs`)
/// passes `zstd -t` and restores its input exactly; returns how many there are.
fn assert_zstd_outputs(outputs: &Path, inputs: &Path) -> usize {
    let mut n = 0;
    for e in walkdir::WalkDir::new(outputs)
        .into_iter()
        .filter_map(Result::ok)
    {
        let zst = e.path();
        if zst.extension() != Some(s("zst")) {
            continue;
        }
        let input = inputs.join(zst.strip_prefix(outputs).unwrap().with_extension(""));
        if !input.is_file() {
            // A .zst of the tree's own, with no input beside it: an input, hashed.
            continue;
        }
        n += 1;
        let dir = zst.parent().unwrap();
        let t = tool("zstd", &[s("-t"), s("-q"), zst.as_os_str()], dir);
        assert!(t.status.success(), "zstd -t {}: {t:?}", zst.display());
        let d = tool("zstd", &[s("-dc"), zst.as_os_str()], dir);
        assert!(d.status.success(), "zstd -dc {}: {d:?}", zst.display());
        assert!(
            d.stdout == fs::read(&input).unwrap(),
            "{} does not restore",
            zst.display()
        );
    }
    n
}

/// `tree(files, large)` and the awkward ones: a name with a space, one with a backslash
/// (escaped in the manifests), one with a leading `-`, an empty file, a `.gz` (hashed, not
/// compressed) and a `.zst` with no input beside it (an input too: hashed and listed).
fn tree_with_awkward_names(files: usize, large: usize) -> (TestTree, usize) {
    let t = tree(files, large)
        .file("odd/sp ace.txt", b"a space\n")
        .file("odd/back\\slash", b"a backslash\n")
        .file("odd/-leading", b"a dash\n")
        .file("odd/empty", b"")
        .file("odd/already.gz", b"\x1f\x8b not really, but named so\n")
        .file("odd/backup.zst", b"kept by someone, its input gone\n");
    (t, files + large + 6)
}

#[test]
fn two_workers_give_a_local_batch_s_outputs_and_manifests_byte_for_byte() {
    if !have_or_skip(&["zstd", "sha256sum", "b3sum"]) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let (t, n) = tree_with_awkward_names(300, 1);
    // The reference: a local batch of the same ops, its outputs under --out, so the tree is
    // left as it was for the cluster's run.
    let local_out = t.side("local-out");
    let local = t.side("LOCAL");
    let out = [s("--out"), local_out.as_os_str()];
    local_batch(&t.root(), OPS, &local, &out).code(0);

    // Two workers, each mapping the output root too.
    let arch = t.side("arch");
    fs::create_dir(&arch).unwrap();
    let root = format!("tree={}", t.root().display());
    let out_root = format!("arch={}", arch.display());
    let workers: Vec<Worker> = (0..2)
        .map(|_| {
            let extra = ["--out-root", out_root.as_str()];
            Worker::start_with(
                &nats,
                t.dir.path(),
                std::slice::from_ref(&root),
                "2",
                &extra,
            )
        })
        .collect();
    let sums = t.side("SUMS");
    let args = ["--op", OPS, "--root-name", "tree", "--manifest"];
    let args = [&args[..], &[sums.to_str().unwrap()]].concat();

    // Outputs under --out first, the tree left as it is.
    let with_out = [&args[..], &["--out", arch.to_str().unwrap()]].concat();
    let sum = coordinate(&nats, &t.root(), &with_out).code(0).summary();
    assert_eq!(
        (
            sum["files"].as_u64(),
            sum["done"].as_u64(),
            sum["failed"].as_u64()
        ),
        (Some(n as u64), Some(n as u64), Some(0)),
        "{sum}"
    );
    assert_same_manifests(OPS, &sums, &local);
    assert_checks(&sums, &t.root(), n);
    // Every input but the .gz and the .zst has its .zst, whole, and the very bytes the local
    // run wrote (an output depends only on its input and the level).
    assert_eq!(assert_zstd_outputs(&arch, &t.root()), n - 2);
    let same_outputs = |dir: &Path| {
        let mut count = 0;
        for e in walkdir::WalkDir::new(&local_out)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
        {
            let rel = e.path().strip_prefix(&local_out).unwrap();
            assert!(
                fs::read(e.path()).unwrap() == fs::read(dir.join(rel)).unwrap(),
                "{} differs from the local run's",
                rel.display()
            );
            count += 1;
        }
        count
    };
    assert_eq!(same_outputs(&arch), n - 2);

    // Outputs next to the inputs.
    let sum = coordinate(&nats, &t.root(), &args).code(0).summary();
    assert_eq!(
        (
            sum["files"].as_u64(),
            sum["done"].as_u64(),
            sum["failed"].as_u64()
        ),
        (Some(n as u64), Some(n as u64), Some(0)),
        "{sum}"
    );
    assert_same_manifests(OPS, &sums, &local);
    assert_checks(&sums, &t.root(), n);
    let compressed = assert_zstd_outputs(&t.root(), &t.root());
    assert_eq!(compressed, n - 2);
    assert_eq!(same_outputs(&t.root()), n - 2);
    // Run again over the tree and its outputs: each output is up to date, each input hashed
    // again and listed as before, the outputs not listed (skipped, as the compressor skips
    // them).
    let sum = coordinate(&nats, &t.root(), &args).code(0).summary();
    assert_eq!(sum["done"].as_u64(), Some(n as u64), "{sum}");
    assert_eq!(sum["skipped"].as_u64(), Some(compressed as u64), "{sum}");
    assert_same_manifests(OPS, &sums, &local);

    // Several hashes and no compressor: every file of the tree (the .zst outputs are inputs
    // now), as a local run lists them.
    let hashes = "sha512,blake3";
    let (cluster, local) = (t.side("H"), t.side("LOCAL-H"));
    local_batch(&t.root(), hashes, &local, &[]).code(0);
    let args = ["--op", hashes, "--root-name", "tree", "--manifest"];
    let args = [&args[..], &[cluster.to_str().unwrap()]].concat();
    let sum = coordinate(&nats, &t.root(), &args).code(0).summary();
    assert_eq!(sum["done"].as_u64(), Some((n + compressed) as u64), "{sum}");
    assert_same_manifests(hashes, &cluster, &local);
    let check = tool(
        "sha512sum",
        &[s("-c"), s("--quiet"), cluster.as_os_str()],
        &t.root(),
    );
    assert!(check.status.success(), "{check:?}");
    // Both workers took part (in one of the four runs at least: each takes jobs as they come).
    for w in &workers {
        assert!(
            w.log().contains("pipeline started"),
            "a worker did nothing: {}",
            w.log()
        );
    }
}

/// A job message for the root `tree`, of the run `hostile`, naming `a.txt`, with `fields`
/// (`"v":..,"op":..,"ops":..`) in it.
fn hostile_job(fields: &str) -> String {
    format!(
        r#"{{{fields},"run":"hostile","root":"tree","level":3,"force":true,"files":[{{"rel":"a.txt","size":1}}]}}"#
    )
}

#[test]
fn hostile_job_messages_with_several_ops_are_refused_and_nothing_is_written() {
    let Some(nats) = Nats::start() else { return };
    let t = TestTree::new()
        .file("a.txt", b"the file every hostile job names\n")
        .file("b.txt", b"another\n");
    let root = format!("tree={}", t.root().display());
    let worker = Worker::start(&nats, t.dir.path(), std::slice::from_ref(&root), "1");
    // A real run first: it creates the streams, proves the worker works, and makes the
    // output a job with "force" would replace.
    let sums = t.side("SUMS");
    let args = ["--op", OPS, "--root-name", "tree", "--manifest"];
    let args = [&args[..], &[sums.to_str().unwrap()]].concat();
    assert_eq!(
        coordinate(&nats, &t.root(), &args).code(0).summary()["done"],
        2
    );
    let output = t.path("a.txt.zst");
    let before = fs::metadata(&output).unwrap();
    let hostile = [
        // An op no filepipe has.
        r#""v":3,"op":"zstd","ops":["sha256","md5","zstd"]"#,
        // Two compressors.
        r#""v":3,"op":"zstd","ops":["sha256","gzip","zstd"]"#,
        r#""v":3,"op":"gzip","ops":["gzip","zstd"]"#,
        // An op twice.
        r#""v":3,"op":"zstd","ops":["sha256","sha256","zstd"]"#,
        r#""v":3,"op":"zstd","ops":["zstd","blake3","zstd"]"#,
        // A list of one, or none.
        r#""v":3,"op":"zstd","ops":["zstd"]"#,
        r#""v":3,"op":"zstd","ops":[]"#,
        // A list whose deciding op is not the message's op.
        r#""v":3,"op":"gzip","ops":["sha256","zstd"]"#,
        // Not a list of names.
        r#""v":3,"op":"zstd","ops":"sha256,zstd""#,
        r#""v":3,"op":"zstd","ops":["sha256",{"hex":"00"},"zstd"]"#,
        // Several ops in a version that has none, and a version no one reads.
        r#""v":1,"op":"zstd","ops":["sha256","zstd"]"#,
        r#""v":2,"op":"zstd","ops":["sha256","zstd"],"out":"elsewhere""#,
        r#""v":4,"op":"zstd","ops":["sha256","zstd"]"#,
        // Inputs removed with several results: refused as on the command line.
        r#""v":3,"op":"zstd","ops":["sha256","zstd"],"remove_source":true"#,
    ];
    for fields in hostile {
        nats.publish_raw("filepipe.jobs.tree.hostile", hostile_job(fields).as_bytes());
    }
    // An unknown op most of a megabyte long, which the parser's error quotes: said in part.
    let huge = format!(
        r#""v":3,"op":"zstd","ops":["sha256","{}","zstd"]"#,
        "x".repeat(900_000)
    );
    nats.publish_raw("filepipe.jobs.tree.hostile", hostile_job(&huge).as_bytes());
    // Each refused, none run: no outcome, the message settled for good.
    wait_until(Duration::from_secs(30), "every hostile job refused", || {
        worker.log().matches("refused a job message").count() > hostile.len()
    });
    wait_until(Duration::from_secs(30), "the queue to be empty", || {
        let st = run(filepipe(&[s("status"), s("--queue"), s(&nats.url)]));
        let text = st.stdout();
        text.contains("pending\t0") && text.contains("in flight\t0")
    });
    let log = worker.log();
    for why in [
        "unknown variant `md5`",
        "at most one compressor",
        "given twice",
        "a list of one",
        "version 1",
        "version 4",
        "remove_source with several ops",
    ] {
        assert!(log.contains(why), "no refusal saying {why:?}: {log}");
    }
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    assert!(log.contains("bytes in all"), "{log}");
    // Nothing was run: the output a forced job would have replaced is the same file, no .gz
    // appeared, the input is still there.
    let after = fs::metadata(&output).unwrap();
    assert_eq!(
        (after.ino(), after.mtime_nsec()),
        (before.ino(), before.mtime_nsec())
    );
    assert!(!t.path("a.txt.gz").exists());
    assert!(t.path("a.txt").is_file());
    // The worker still works.
    fs::write(t.path("c.txt"), b"after the attack\n").unwrap();
    let sum = coordinate(&nats, &t.root(), &args).code(0).summary();
    assert_eq!(sum["done"], 3, "{sum}");
    assert_checks(&sums, &t.root(), 3);
}

/// The cluster run a coordinator's log says it is coordinating: the unquoted `run=` of its
/// "coordinating" line (each line also carries the process's own, quoted, `run="..."`).
fn logged_run(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("coordinating"))
        .flat_map(|l| l.split(" run=").skip(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .find(|r| !r.starts_with('"'))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no run of the coordinator's in its log: {log}"))
}

#[test]
fn outcomes_without_exactly_the_run_s_digests_are_ignored_and_the_files_done_by_a_worker() {
    if !have_or_skip(&["sha256sum", "b3sum"]) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let mut t = TestTree::new();
    for i in 0..10 {
        t = t.file(format!("f{i}"), &text_bytes(1000 + i, i as u64));
    }
    let local = t.side("LOCAL");
    let out = t.side("local-out");
    local_batch(&t.root(), OPS, &local, &[s("--out"), out.as_os_str()]).code(0);
    // No worker yet: the jobs wait, and the coordinator waits for their outcomes.
    let sums = t.side("SUMS");
    let args = ["--op", OPS, "--manifest", sums.to_str().unwrap()];
    let (coordinator, log) = start_coordinator_logged(&nats, &t, &args, "jobs published");
    let run_id = logged_run(&fs::read_to_string(&log).unwrap());
    let (sha256, sha512, blake3) = ("ab".repeat(32), "cd".repeat(64), "ef".repeat(32));
    let named = |pairs: &[(&str, &str)]| {
        let list: Vec<String> = pairs
            .iter()
            .map(|(algo, hex)| format!(r#"{{"algo":"{algo}","hex":"{hex}"}}"#))
            .collect();
        format!(r#""digests":[{}]"#, list.join(","))
    };
    // Each names a file of its own: had one been taken, its file would be done with it.
    let bad = [
        // One of the run's two hashes left out.
        named(&[("sha256", &sha256)]),
        // One of them too short, too long, not hex, or with SHA-512's length.
        named(&[("sha256", &sha256), ("blake3", &blake3[2..])]),
        named(&[("sha256", &sha256), ("blake3", &format!("{blake3}00"))]),
        named(&[("sha256", &sha256), ("blake3", &"zz".repeat(32))]),
        named(&[("sha256", &sha256), ("blake3", &sha512)]),
        // One twice, one the run does not compute, a compressor's.
        named(&[
            ("sha256", &sha256),
            ("sha256", &sha256),
            ("blake3", &blake3),
        ]),
        named(&[
            ("sha256", &sha256),
            ("blake3", &blake3),
            ("sha512", &sha512),
        ]),
        named(&[("sha256", &sha256), ("zstd", &blake3)]),
        // One unnamed digest for two hashes, and none at all.
        format!(r#""digest":"{sha256}""#),
        r#""bytes_out":1"#.to_string(),
    ];
    let outcomes: Vec<String> = bad
        .iter()
        .enumerate()
        .map(|(i, digests)| format!(r#"{{"rel":"f{i}","status":"done","bytes_in":1,{digests}}}"#))
        .collect();
    let message = format!(
        r#"{{"v":1,"run":"{run_id}","worker":"hostile","outcomes":[{}]}}"#,
        outcomes.join(",")
    );
    nats.publish_raw(&format!("filepipe.outcomes.{run_id}"), message.as_bytes());
    wait_until(Duration::from_secs(30), "every bad outcome ignored", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("an outcome that does not read")
            .count()
            >= bad.len()
    });
    // The workers' outcomes are the ones that count.
    let root = format!("tree={}", t.root().display());
    let _workers: Vec<Worker> = (0..2)
        .map(|_| Worker::start(&nats, t.dir.path(), std::slice::from_ref(&root), "1"))
        .collect();
    let sum = coordinator
        .finish(Duration::from_secs(120))
        .code(0)
        .summary();
    assert_eq!(
        (sum["done"].as_u64(), sum["failed"].as_u64()),
        (Some(10), Some(0)),
        "{sum}"
    );
    assert_same_manifests(OPS, &sums, &local);
    assert_checks(&sums, &t.root(), 10);
}

/// The sorted names a manifest lists (a 64-digit digest, two spaces, the name).
fn manifest_names(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.get(66..))
        .map(str::to_owned)
        .collect();
    names.sort_unstable();
    names
}

#[test]
fn a_watching_coordinator_with_several_results_keeps_a_local_run_s_manifests_through_a_sigkill() {
    if !have_or_skip(&["zstd", "sha256sum", "b3sum"]) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let t = TestTree::new().file("before.txt", &text_bytes(5_000, 1));
    let in_root = format!("in={}", t.root().display());
    let _workers: Vec<Worker> = (0..2)
        .map(|_| Worker::start(&nats, t.dir.path(), std::slice::from_ref(&in_root), "2"))
        .collect();
    let sums = t.side("SUMS");
    let args = [
        "--op",
        OPS,
        "--manifest",
        sums.to_str().unwrap(),
        "--queue",
        &nats.url,
    ];
    let d = Daemon::ready(&t, &args);
    fs::write(t.path("a.txt"), text_bytes(30_000, 2)).unwrap();
    fs::create_dir(t.path("sub")).unwrap();
    fs::write(t.path("sub/b.log"), text_bytes(70_000, 3)).unwrap();
    // Hashed, not compressed: listed all the same.
    fs::write(t.path("sub/c.gz"), b"named as compressed\n").unwrap();
    d.wait_idle(4);
    let want = ["a.txt", "before.txt", "sub/b.log", "sub/c.gz"];
    for m in manifests_of(OPS, &sums) {
        wait_until(Duration::from_secs(30), "manifests of 4 files", || {
            manifest_names(&m) == want
        });
    }
    assert_checks(&sums, &t.root(), 4);

    // SIGKILLed with files on their way, then started again on the same state: each file is
    // listed once in each manifest, with its digests.
    fs::create_dir(t.path("burst")).unwrap();
    for i in 0..1000 {
        fs::write(
            t.path(format!("burst/f{i}")),
            text_bytes(2_000 + i, i as u64),
        )
        .unwrap();
    }
    wait_until(Duration::from_secs(60), "some of the burst done", || {
        d.notes.last_status().is_some_and(|s| s.done > 4)
    });
    d.kill();
    let d = Daemon::ready(&t, &args);
    let checked = |m: &Path| manifest_names(m).len() == 1004;
    wait_until(
        Duration::from_secs(120),
        "every file in the manifests",
        || manifests_of(OPS, &sums).iter().all(|m| checked(m)),
    );
    d.stop().success();
    let status = run(filepipe(&[
        s("status"),
        s("--state"),
        t.side("state").as_os_str(),
        s("--failed"),
    ]))
    .success()
    .stdout();
    assert!(!status.contains("failed"), "{status}");
    assert_checks(&sums, &t.root(), 1004);
    assert_eq!(assert_zstd_outputs(&t.root(), &t.root()), 1003);
    // A local batch over the same tree (its outputs all up to date, each input hashed again)
    // writes the same manifests.
    let local = t.side("LOCAL");
    let sum = local_batch(&t.root(), OPS, &local, &[]).code(0).summary();
    assert_eq!(sum["done"].as_u64(), Some(1004), "{sum}");
    assert_same_manifests(OPS, &sums, &local);
}

#[test]
fn a_batch_coordinator_with_several_results_killed_mid_run_is_resumed_each_file_once() {
    if !have_or_skip(&["zstd", "sha256sum", "b3sum"]) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let t = tree(600, 0);
    let sums = t.side("SUMS");
    let args = ["--op", OPS, "--manifest", sums.to_str().unwrap()];
    // No worker yet: the jobs it publishes wait in the queue. Killed once some are there.
    let mut first = start_coordinator(&nats, &t.root(), &args);
    wait_until(Duration::from_secs(90), "jobs published", || {
        queue_counts(&nats).0 > 0
    });
    first.kill().unwrap();
    first.finish(Duration::from_secs(10));
    // A worker does what was published, its outcomes (with every digest) kept in the stream.
    let root = format!("tree={}", t.root().display());
    let worker = Worker::start(&nats, t.dir.path(), std::slice::from_ref(&root), "2");
    wait_until(Duration::from_secs(120), "the queue to drain", || {
        queue_counts(&nats) == (0, 0)
    });
    // The outputs of the jobs published before the kill: files of the tree now, beside their
    // inputs (the walk finds them, the workers skip them).
    let made = walkdir::WalkDir::new(t.root())
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension() == Some(s("zst")))
        .count() as u64;
    assert!(made > 0 && made <= 600, "{made} outputs before the resume");
    // The same command resumes the run: the outcomes so far count, with their digests, and
    // only the rest is published.
    let verbose = [&args[..], &["-v"]].concat();
    let again = start_coordinator(&nats, &t.root(), &verbose).finish(Duration::from_secs(120));
    let sum = again.code(0).summary();
    let err = again.stderr();
    assert!(err.contains("resuming"), "{err}");
    let (replayed, published) = (
        logged_files(&err, "read again"),
        logged_files(&err, "jobs published"),
    );
    assert!(replayed > 0, "{err}\n{}", worker.log());
    assert_eq!(replayed + published, 600 + made, "{err}");
    assert_eq!(
        (
            sum["files"].as_u64(),
            sum["done"].as_u64(),
            sum["skipped"].as_u64()
        ),
        (Some(600 + made), Some(600), Some(made)),
        "{sum}"
    );
    for m in manifests_of(OPS, &sums) {
        let names = manifest_names(&m);
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!((names.len(), unique.len()), (600, 600), "{}", m.display());
    }
    assert_checks(&sums, &t.root(), 600);
    assert_eq!(assert_zstd_outputs(&t.root(), &t.root()), 600);
    // The manifests a local batch writes over the same tree (its outputs up to date).
    let local = t.side("LOCAL");
    local_batch(&t.root(), OPS, &local, &[]).code(0);
    assert_same_manifests(OPS, &sums, &local);
}

/// A `[[watch]]` table with a queue and several results, run by the service
/// (`filepipe watch --config FILE`) with a real nats-server and one worker: every file (one
/// there before the start, the others written after READY=1, one in a new directory) is
/// compressed by the worker and listed in both manifests, checked with the real tools.
#[test]
fn a_watch_table_with_a_queue_takes_several_results() {
    if !have_or_skip(&["zstd", "sha256sum", "b3sum"]) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let t = TestTree::new().file("before.txt", &text_bytes(5_000, 1));
    let _worker = Worker::start(
        &nats,
        t.dir.path(),
        &[format!("multi={}", t.root().display())],
        "2",
    );
    let cfg = t.side("f.toml");
    let sums = t.side("SUMS");
    fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[[watch]]\npath = {:?}\nop = \"sha256,blake3,zstd\"\nmanifest = {:?}\nsettle_ms = 100\nqueue = {:?}\nroot_name = \"multi\"\n",
            t.side("state").display().to_string(),
            t.root().display().to_string(),
            sums.display().to_string(),
            nats.url,
        ),
    )
    .unwrap();
    let checked = run(filepipe(&[s("check-config"), cfg.as_os_str()]));
    assert!(
        checked.success().stdout().contains("ok, 1 pipelines"),
        "{}",
        checked.stdout()
    );
    let socket = t.side("notify.sock");
    let notes = Notifications::listen(&socket);
    let mut cmd = filepipe(&[s("watch"), s("--config"), cfg.as_os_str()]);
    cmd.env("NOTIFY_SOCKET", &socket)
        .env_remove("WATCHDOG_USEC")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let service = Started::new(cmd);
    wait_until(Duration::from_secs(60), "READY=1", || notes.has("READY=1"));
    fs::write(t.path("a.txt"), text_bytes(30_000, 2)).unwrap();
    fs::create_dir(t.path("sub")).unwrap();
    fs::write(t.path("sub/b.log"), text_bytes(70_000, 3)).unwrap();
    let want = ["a.txt", "before.txt", "sub/b.log"];
    for m in manifests_of(OPS, &sums) {
        wait_until(Duration::from_secs(60), "manifests of 3 files", || {
            manifest_names(&m) == want
        });
    }
    assert_checks(&sums, &t.root(), 3);
    assert_eq!(assert_zstd_outputs(&t.root(), &t.root()), 3);
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&service),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    service.finish(Duration::from_secs(60)).success();
}
