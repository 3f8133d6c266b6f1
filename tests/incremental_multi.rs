//! Incremental runs of several results (`batch --op sha256,zstd --state DIR`, and watch mode
//! restarted with another op): an unchanged rerun reads no file and writes every manifest a
//! full run writes; an op added to the pipeline has each file read once, for it alone, the
//! other results kept (digests, outputs); a state of the layout before rows were per result
//! is upgraded. Checked with strace's record of every open, `sha256sum -c`, `sha512sum -c`,
//! `b3sum -c` and `zstd -t`.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::strace::{have_strace, traced_opens, tree, Call};
use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

/// Whether every tool runs; if not, says SKIPPED and why.
fn have_or_skip(tools: &[&str]) -> bool {
    for tool in tools {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("SKIPPED: no {tool} to check the results");
            return false;
        }
    }
    if !have_strace() {
        eprintln!("SKIPPED: no strace to count the reads");
        return false;
    }
    true
}

/// `filepipe batch ROOT --op OP --state STATE --manifest SUMS --json ARGS`.
fn batch(t: &TestTree, op: &str, args: &[&OsStr]) -> Command {
    let mut cmd = filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--op"),
        s(op),
        s("--state"),
        t.side("state").as_os_str(),
        s("--manifest"),
        t.side("SUMS").as_os_str(),
        s("--json"),
    ]);
    cmd.args(args);
    cmd
}

/// How many times `calls` opened a file whose path (or name beneath a directory descriptor)
/// is `name` or ends with `/name`: file names in these trees are unique.
fn opens_of(calls: &[Call], name: &str) -> usize {
    calls
        .iter()
        .filter(|c| {
            let path = c.arg(1);
            let path = path.trim_matches('"');
            path == name || path.ends_with(&format!("/{name}"))
        })
        .count()
}

/// The names among `names` that `calls` opened, each with how many times.
fn opened(calls: &[Call], names: &[String]) -> Vec<(String, usize)> {
    names
        .iter()
        .map(|n| (n.clone(), opens_of(calls, n)))
        .filter(|(_, k)| *k > 0)
        .collect()
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The manifests a full, stateless run of the hashes `op` writes for the tree as it is now:
/// the first hash's, then the others', in `op`'s order.
fn fresh_manifests(t: &TestTree, op: &str) -> Vec<Vec<u8>> {
    let out = t.side("fresh.sums");
    run(filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--op"),
        s(op),
        s("--manifest"),
        out.as_os_str(),
    ]))
    .success();
    op.split(',')
        .enumerate()
        .map(|(i, h)| {
            let path = if i == 0 {
                out.clone()
            } else {
                with_suffix(&out, &format!(".{h}"))
            };
            fs::read(path).unwrap()
        })
        .collect()
}

/// `zstd -t` passes on `zst`, and `zstd -dc` gives back exactly `original`.
fn assert_zstd_restores(zst: &Path, original: &[u8]) {
    let dir = zst.parent().unwrap();
    let t = tool("zstd", &[s("-t"), s("-q"), zst.as_os_str()], dir);
    assert!(t.status.success(), "zstd -t {}: {t:?}", zst.display());
    let d = tool("zstd", &[s("-dc"), zst.as_os_str()], dir);
    assert!(d.stdout == original, "{} does not restore", zst.display());
}

/// Each file's identity and mtime: a file rewritten (or replaced) shows in one or the other.
fn identities(paths: &[PathBuf]) -> Vec<(u64, i64, i64)> {
    paths
        .iter()
        .map(|p| {
            let m = fs::metadata(p).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec())
        })
        .collect()
}

/// Sets the digest the state at `state` records for `rel` under `op` to `digest`, as no run
/// would: a digest listed afterwards is then the state's, never one computed again.
fn plant_digest(state: &Path, op: &str, rel: &str, digest: &[u8]) {
    let conn = rusqlite::Connection::open(state.join("filepipe.sqlite")).unwrap();
    let n = conn
        .execute(
            "UPDATE files SET digest = ?1 WHERE op = ?2 AND path = ?3",
            rusqlite::params![digest, op, rel.as_bytes()],
        )
        .unwrap();
    assert_eq!(n, 1, "{op} {rel}");
}

/// The line of `rel` in a manifest.
fn line_of(manifest: &[u8], rel: &str) -> String {
    String::from_utf8_lossy(manifest)
        .lines()
        .find(|l| l.ends_with(&format!("  {rel}")))
        .unwrap_or_else(|| panic!("{rel} is not listed"))
        .to_owned()
}

fn summary_counts(r: &Run) -> (u64, u64, u64) {
    let s = r.success().summary();
    let n = |k: &str| s[k].as_u64().unwrap();
    (n("done"), n("unchanged"), n("bytes_in"))
}

#[test]
fn several_hashes_rerun_without_reading_and_list_what_a_full_run_lists() {
    if !have_or_skip(&["sha256sum", "sha512sum", "b3sum"]) {
        return;
    }
    let n = 30;
    let t = tree(n);
    let names: Vec<String> = (0..n).map(|i| format!("f{i}.h")).collect();
    let op = "sha256,blake3,sha512";
    let sums = t.side("SUMS");
    let manifests = || {
        vec![
            fs::read(&sums).unwrap(),
            fs::read(with_suffix(&sums, ".blake3")).unwrap(),
            fs::read(with_suffix(&sums, ".sha512")).unwrap(),
        ]
    };
    assert_eq!(summary_counts(&run(batch(&t, op, &[]))).0, n);

    // Untouched: no file opened, every manifest byte for byte a full run's.
    let (again, calls) = traced_opens(&batch(&t, op, &[]));
    let (done, unchanged, bytes_in) = summary_counts(&again);
    assert_eq!((done, unchanged, bytes_in), (n, n, 0));
    assert_eq!(opened(&calls, &names), []);
    assert_eq!(manifests(), fresh_manifests(&t, op));

    // One changed with only its ctime telling, one rewritten longer: read once each, for
    // every hash; the others not at all.
    let f7 = t.path(format!("d1/{}", names[7]));
    let meta = fs::metadata(&f7).unwrap();
    let mut bytes = fs::read(&f7).unwrap();
    bytes[0] ^= 0x55;
    fs::write(&f7, &bytes).unwrap();
    fs::File::options()
        .write(true)
        .open(&f7)
        .unwrap()
        .set_modified(meta.modified().unwrap())
        .unwrap();
    fs::write(t.path(format!("d2/{}", names[8])), b"longer now\n").unwrap();
    let (third, calls) = traced_opens(&batch(&t, op, &[]));
    let (done, unchanged, _) = summary_counts(&third);
    assert_eq!((done, unchanged), (n, n - 2));
    assert_eq!(
        opened(&calls, &names),
        [(names[7].clone(), 1), (names[8].clone(), 1)]
    );
    assert_eq!(manifests(), fresh_manifests(&t, op));
    assert_check("sha256sum", &sums, &t.root(), n as usize);
    assert_check(
        "b3sum",
        &with_suffix(&sums, ".blake3"),
        &t.root(),
        n as usize,
    );
    assert_check(
        "sha512sum",
        &with_suffix(&sums, ".sha512"),
        &t.root(),
        n as usize,
    );

    // A row per file and result, none under the joined name.
    let status = run(filepipe(&[
        s("status"),
        s("--state"),
        t.side("state").as_os_str(),
    ]));
    let status = status.success().stdout();
    for h in ["sha256", "blake3", "sha512"] {
        assert!(status.contains(&format!("\t{h}\tdone\t{n}\n")), "{status}");
    }
    assert!(!status.contains(op), "{status}");
}

#[test]
fn ops_added_to_a_pipeline_read_each_file_once_for_what_is_missing_and_keep_the_rest() {
    if !have_or_skip(&["sha256sum", "b3sum", "zstd"]) {
        return;
    }
    let n = 12;
    let t = tree(n);
    let names: Vec<String> = (0..n).map(|i| format!("f{i}.h")).collect();
    let rels: Vec<String> = (0..n)
        .map(|i| format!("d{}/{}", i % 3, names[i as usize]))
        .collect();
    let out = t.side("out");
    let zst: Vec<PathBuf> = rels.iter().map(|r| out.join(format!("{r}.zst"))).collect();
    let zst_names: Vec<String> = names.iter().map(|n| format!("{n}.zst")).collect();
    let with_out = [s("--out"), out.as_os_str()];
    let sums = t.side("SUMS");
    let state = t.side("state");

    assert_eq!(summary_counts(&run(batch(&t, "sha256", &[]))).0, n);
    // A SHA-256 digest no run computes, for one file: wherever it is listed later, it came
    // from the state.
    let planted = [0xab_u8; 32];
    plant_digest(&state, "sha256", &rels[4], &planted);
    let planted_line = format!("{}  {}", "ab".repeat(32), rels[4]);

    // zstd added: each input read once, for its output alone; the digests kept.
    let (second, calls) = traced_opens(&batch(&t, "sha256,zstd", &with_out));
    let (done, unchanged, _) = summary_counts(&second);
    assert_eq!((done, unchanged), (n, 0));
    let once: Vec<(String, usize)> = names.iter().map(|n| (n.clone(), 1)).collect();
    assert_eq!(opened(&calls, &names), once);
    assert_eq!(line_of(&fs::read(&sums).unwrap(), &rels[4]), planted_line);
    for (r, z) in rels.iter().zip(&zst) {
        assert_zstd_restores(z, &fs::read(t.path(r)).unwrap());
    }
    let outputs = identities(&zst);

    // blake3 added: each input read once more, for BLAKE3 alone; the outputs neither opened
    // nor rewritten, the SHA-256 digests the state's.
    let op = "sha256,blake3,zstd";
    let (third, calls) = traced_opens(&batch(&t, op, &with_out));
    let (done, unchanged, _) = summary_counts(&third);
    assert_eq!((done, unchanged), (n, 0));
    assert_eq!(opened(&calls, &names), once);
    assert_eq!(opened(&calls, &zst_names), []);
    assert_eq!(identities(&zst), outputs);
    let fresh = fresh_manifests(&t, "sha256,blake3");
    assert_eq!(fs::read(with_suffix(&sums, ".blake3")).unwrap(), fresh[1]);
    assert_check(
        "b3sum",
        &with_suffix(&sums, ".blake3"),
        &t.root(),
        n as usize,
    );
    let m = fs::read(&sums).unwrap();
    assert_eq!(line_of(&m, &rels[4]), planted_line);
    for r in rels.iter().filter(|r| **r != rels[4]) {
        assert_eq!(line_of(&m, r), line_of(&fresh[0], r));
    }

    // Nothing missing now: nothing opened.
    let (fourth, calls) = traced_opens(&batch(&t, op, &with_out));
    assert_eq!(summary_counts(&fourth), (n, n, 0));
    assert_eq!(opened(&calls, &names), []);
    assert_eq!(opened(&calls, &zst_names), []);

    // An op removed: nothing to compute, the remaining manifest whole.
    let (fifth, calls) = traced_opens(&batch(&t, "sha256", &[]));
    assert_eq!(summary_counts(&fifth), (n, n, 0));
    assert_eq!(opened(&calls, &names), []);
    assert_eq!(line_of(&fs::read(&sums).unwrap(), &rels[4]), planted_line);

    // A file changed is redone for every result; an output deleted is made again, alone.
    fs::write(t.path(&rels[2]), b"changed content\n").unwrap();
    fs::remove_file(&zst[5]).unwrap();
    let (sixth, calls) = traced_opens(&batch(&t, op, &with_out));
    let (done, unchanged, _) = summary_counts(&sixth);
    assert_eq!((done, unchanged), (n, n - 2));
    assert_eq!(
        opened(&calls, &names),
        [(names[2].clone(), 1), (names[5].clone(), 1)]
    );
    assert_zstd_restores(&zst[2], b"changed content\n");
    assert_zstd_restores(&zst[5], &fs::read(t.path(&rels[5])).unwrap());
    let fresh = fresh_manifests(&t, "sha256,blake3");
    assert_eq!(fs::read(with_suffix(&sums, ".blake3")).unwrap(), fresh[1]);
    assert_eq!(
        line_of(&fs::read(&sums).unwrap(), &rels[2]),
        line_of(&fresh[0], &rels[2])
    );

    // --rehash still reads every file and records what it finds; outputs up to date stay.
    let outputs = identities(&zst);
    let (rehashed, calls) =
        traced_opens(&batch(&t, op, &[with_out[0], with_out[1], s("--rehash")]));
    let (done, unchanged, _) = summary_counts(&rehashed);
    assert_eq!((done, unchanged), (n, 0));
    assert_eq!(opened(&calls, &names), once);
    assert_eq!(identities(&zst), outputs);
    assert_eq!(fs::read(&sums).unwrap(), fresh[0]);
    assert_check("sha256sum", &sums, &t.root(), n as usize);
}

#[test]
fn a_watch_restarted_with_another_hash_computes_only_that_one() {
    if !have_or_skip(&["sha256sum", "b3sum", "zstd"]) {
        return;
    }
    let t = TestTree::new()
        .file("a.txt", &text_bytes(20_000, 1))
        .file("sub/b.txt", &text_bytes(3_000, 2))
        .file("sub/c d.txt", &text_bytes(9_000, 3));
    let rels = ["a.txt", "sub/b.txt", "sub/c d.txt"];
    let out = t.side("out");
    let sums = t.side("SUMS");
    let b3 = with_suffix(&sums, ".blake3");
    let args = |op: &'static str| {
        [
            "--op",
            op,
            "--out",
            out.to_str().unwrap(),
            "--manifest",
            sums.to_str().unwrap(),
        ]
        .map(str::to_owned)
    };
    let started = |op| {
        let a = args(op);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Daemon::ready(&t, &a)
    };
    let d = started("sha256,zstd");
    d.wait_idle(3);
    d.stop().success();
    let zst: Vec<PathBuf> = rels.iter().map(|r| out.join(format!("{r}.zst"))).collect();
    let outputs = identities(&zst);
    plant_digest(&t.side("state"), "sha256", "sub/b.txt", &[0xab; 32]);

    // The config's op now also names blake3: every file is processed once (for BLAKE3), the
    // outputs are left as they are, the SHA-256 digests are the state's.
    let d = started("sha256,blake3,zstd");
    let status = d.wait_idle(3);
    assert_eq!((status.skipped, status.failed), (0, 0));
    wait_until(
        std::time::Duration::from_secs(30),
        "the BLAKE3 manifest",
        || b3.exists() && fs::read(&b3).unwrap().split(|&c| c == b'\n').count() == 4,
    );
    d.stop().success();
    assert_eq!(identities(&zst), outputs);
    assert_check("b3sum", &b3, &t.root(), 3);
    let m = fs::read(&sums).unwrap();
    assert_eq!(
        line_of(&m, "sub/b.txt"),
        format!("{}  sub/b.txt", "ab".repeat(32))
    );
    let fresh = fresh_manifests(&t, "sha256,blake3");
    assert_eq!(fs::read(&b3).unwrap(), fresh[1]);
    for r in ["a.txt", "sub/c d.txt"] {
        assert_eq!(line_of(&m, r), line_of(&fresh[0], r));
    }
    for (r, z) in rels.iter().zip(&zst) {
        assert_zstd_restores(z, &fs::read(t.path(r)).unwrap());
    }

    // Restarted again, nothing is missing: nothing is processed.
    let d = started("sha256,blake3,zstd");
    let status = d.wait_idle(0);
    assert_eq!((status.skipped, status.failed), (0, 0));
    d.stop().success();
    assert_eq!(identities(&zst), outputs);
}

/// An output deleted while the watch was down is made again when it restarts, alone (the
/// recorded digests kept, as a batch keeps them), with the same op and with a hash added. The
/// startup scan took a file settled in the state for its stamp as done, whatever became of its
/// output, and a file read for an added hash had its output taken as standing.
#[test]
fn a_watch_restarted_remakes_an_output_deleted_while_it_was_down() {
    if !have_or_skip(&["sha256sum", "b3sum", "zstd"]) {
        return;
    }
    let t = TestTree::new()
        .file("a.txt", &text_bytes(20_000, 1))
        .file("sub/b.txt", &text_bytes(3_000, 2))
        .file("sub/c.txt", &text_bytes(9_000, 3));
    let rels = ["a.txt", "sub/b.txt", "sub/c.txt"];
    let out = t.side("out");
    let sums = t.side("SUMS");
    let started = |op: &str| {
        let a = [
            "--op",
            op,
            "--out",
            out.to_str().unwrap(),
            "--manifest",
            sums.to_str().unwrap(),
        ];
        Daemon::ready(&t, &a)
    };
    let zst: Vec<PathBuf> = rels.iter().map(|r| out.join(format!("{r}.zst"))).collect();
    let d = started("sha256,zstd");
    d.wait_idle(3);
    d.stop().success();
    // Digests no run computes: listed afterwards, they are the state's, not read again.
    for r in rels {
        plant_digest(&t.side("state"), "sha256", r, &[0xab; 32]);
    }
    let planted = |r: &str| format!("{}  {r}", "ab".repeat(32));

    // The same op: a.txt.zst, deleted while down, is made again; nothing else is touched.
    let before = identities(&zst[1..]);
    fs::remove_file(&zst[0]).unwrap();
    let d = started("sha256,zstd");
    let status = d.wait_idle(1);
    assert_eq!((status.skipped, status.failed), (0, 0));
    d.stop().success();
    assert_zstd_restores(&zst[0], &fs::read(t.path(rels[0])).unwrap());
    assert_eq!(identities(&zst[1..]), before);
    let m = fs::read(&sums).unwrap();
    for r in rels {
        assert_eq!(line_of(&m, r), planted(r), "{r} was hashed again");
    }

    // blake3 added: every file read for it, and sub/b.txt.zst, deleted while down, made
    // again; the other outputs stay as they are.
    let kept = [zst[0].clone(), zst[2].clone()];
    let before = identities(&kept);
    fs::remove_file(&zst[1]).unwrap();
    let d = started("sha256,blake3,zstd");
    let status = d.wait_idle(3);
    assert_eq!((status.skipped, status.failed), (0, 0));
    let b3 = with_suffix(&sums, ".blake3");
    wait_until(
        std::time::Duration::from_secs(30),
        "the BLAKE3 manifest",
        || b3.exists() && fs::read(&b3).unwrap().split(|&c| c == b'\n').count() == 4,
    );
    d.stop().success();
    assert_zstd_restores(&zst[1], &fs::read(t.path(rels[1])).unwrap());
    assert_eq!(identities(&kept), before);
    assert_check("b3sum", &b3, &t.root(), 3);
    let m = fs::read(&sums).unwrap();
    for r in rels {
        assert_eq!(line_of(&m, r), planted(r), "{r} was hashed again");
    }
}

/// A file put at an output's name while the watch was down, or waiting under a new `--out`, is
/// another hand's: the restarted watch refuses it (`output-exists`) and leaves it, whether the
/// input changed meanwhile or changes later. The restart that remakes a deleted output took
/// such a file for filepipe's own and overwrote it, and a changed input replaced whatever was
/// at its output's name (the state kept no trace of the version the output was made for).
#[test]
fn a_watch_restarted_leaves_a_file_put_at_an_output_name_while_it_was_down() {
    if !have_or_skip(&["zstd"]) {
        return;
    }
    let t = TestTree::new()
        .file("a.txt", &text_bytes(20_000, 1))
        .file("b.txt", &text_bytes(5_000, 2));
    let (out1, out2) = (t.side("out1"), t.side("out2"));
    fs::create_dir_all(&out2).unwrap();
    let users = b"the user's own file, not filepipe's\n";
    // Dated apart from any input: written in the same clock tick as b.txt, it would carry
    // b.txt's mtime, as filepipe dates its outputs.
    let put = |path: &Path| {
        fs::write(path, users).unwrap();
        let f = fs::File::options().write(true).open(path).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30))
            .unwrap();
    };
    put(&out2.join("b.txt.zst"));
    let started = |out: &Path| Daemon::ready(&t, &["--op", "zstd", "--out", out.to_str().unwrap()]);
    let idle_with = |d: &Daemon, done: u64, failed: u64| {
        let what = format!("an idle status with {done} done and {failed} failed");
        wait_until(std::time::Duration::from_secs(60), &what, || {
            d.notes
                .last_status()
                .is_some_and(|s| s.idle() && (s.done, s.failed) == (done, failed))
        })
    };
    let d = started(&out1);
    d.wait_idle(2);
    d.stop().success();

    // Deleted and replaced by the user's file while down: refused, kept, whether the input
    // stayed as it was (a.txt) or changed too (b.txt).
    for name in ["a.txt.zst", "b.txt.zst"] {
        fs::remove_file(out1.join(name)).unwrap();
        put(&out1.join(name));
    }
    fs::write(t.path("b.txt"), text_bytes(6_000, 4)).unwrap();
    let d = started(&out1);
    idle_with(&d, 0, 2);
    // The input changes, after that failure: the output's name is still the user's.
    fs::write(t.path("a.txt"), text_bytes(7_000, 3)).unwrap();
    idle_with(&d, 0, 3);
    d.stop().success();
    for name in ["a.txt.zst", "b.txt.zst"] {
        assert_eq!(fs::read(out1.join(name)).unwrap(), users, "{name}");
    }

    // A new --out holding the user's file under b.txt's output name: refused, kept; a.txt's
    // output is made there.
    let d = started(&out2);
    idle_with(&d, 1, 1);
    d.stop().success();
    assert_eq!(fs::read(out2.join("b.txt.zst")).unwrap(), users);
    assert_zstd_restores(&out2.join("a.txt.zst"), &fs::read(t.path("a.txt")).unwrap());
}

/// A watch's failed attempt at a changed file (in use) keeps the version its output was made
/// for: a batch over the same state afterwards replaces filepipe's own output of the earlier
/// version. It refused it (`output-exists`): the state kept no trace of that version once a
/// failure was recorded.
#[test]
fn a_batch_after_a_watch_s_failed_attempt_replaces_filepipe_s_own_output() {
    use std::io::Write as _;
    if !have_or_skip(&["zstd"]) {
        return;
    }
    let t = TestTree::new().file("a.txt", &text_bytes(20_000, 1));
    let out = t.side("out");
    let d = Daemon::ready(&t, &["--op", "zstd", "--out", out.to_str().unwrap()]);
    d.wait_idle(1);
    // A writer keeps it open while another appends and closes: taken, and failed in use.
    let holder = fs::OpenOptions::new()
        .append(true)
        .open(t.path("a.txt"))
        .unwrap();
    let mut w = fs::OpenOptions::new()
        .append(true)
        .open(t.path("a.txt"))
        .unwrap();
    w.write_all(b"version two\n").unwrap();
    drop(w);
    wait_until(
        std::time::Duration::from_secs(60),
        "an attempt failed in use",
        || {
            d.notes
                .last_status()
                .is_some_and(|s| s.retrying + s.failed >= 1)
        },
    );
    d.stop().success();
    drop(holder);
    run(filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--op"),
        s("zstd"),
        s("--state"),
        t.side("state").as_os_str(),
        s("--out"),
        out.as_os_str(),
    ]))
    .success();
    assert_zstd_restores(&out.join("a.txt.zst"), &fs::read(t.path("a.txt")).unwrap());
}

#[test]
fn a_state_of_the_layout_before_rows_per_result_is_upgraded_and_kept() {
    if !have_or_skip(&["sha512sum"]) {
        return;
    }
    // The tree the fixture was made over (testdata/state-v0/README), but for "c d", whose
    // bytes differ (same length) while its row is given its stamp: a digest of "charlie\n"
    // listed for it is the state's, kept, never one computed again.
    let t = TestTree::new()
        .file("a", b"alpha\n")
        .file("sub/b", b"bravo\n")
        .file("c d", b"CHARLIE\n");
    let state = t.side("state");
    fs::create_dir(&state).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/state-v0/filepipe.sqlite");
    fs::copy(&fixture, state.join("filepipe.sqlite")).unwrap();
    {
        // Its rows as main wrote them, pointed at this tree: its root, and its files' stamps.
        let conn = rusqlite::Connection::open(state.join("filepipe.sqlite")).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 0);
        let root = t.root();
        let root = root.as_os_str().as_encoded_bytes();
        for rel in ["a", "sub/b", "c d"] {
            let m = fs::symlink_metadata(t.path(rel)).unwrap();
            let n = conn
                .execute(
                    "UPDATE files SET root = ?1, size = ?2, mtime_ns = ?3, ctime_ns = ?4,
                         inode = ?5
                     WHERE op = 'sha256,blake3' AND path = ?6 AND status = 'done'",
                    rusqlite::params![
                        root,
                        m.size() as i64,
                        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                        m.ctime() * 1_000_000_000 + m.ctime_nsec(),
                        m.ino() as i64,
                        rel.as_bytes()
                    ],
                )
                .unwrap();
            assert_eq!(n, 1, "{rel}");
        }
    }
    let names = ["a", "b", "c d"].map(str::to_owned);

    // sha512 added to the watch's pipeline: each file read once, for SHA-512.
    let op = "sha256,blake3,sha512";
    let (first, calls) = traced_opens(&batch(&t, op, &[]));
    let (done, unchanged, _) = summary_counts(&first);
    assert_eq!((done, unchanged), (3, 0));
    let once: Vec<(String, usize)> = names.iter().map(|n| (n.clone(), 1)).collect();
    assert_eq!(opened(&calls, &names), once);
    let sums = t.side("SUMS");
    let b3 = with_suffix(&sums, ".blake3");
    let fresh = fresh_manifests(&t, op);
    // main's digests, each now under its own op; SHA-512 computed from the tree.
    let kept = [
        (
            &sums,
            &fresh[0],
            "999d1d048ee9123272dd9b718680551c83e867935b47c2650e6906dc22674e47",
        ),
        (
            &b3,
            &fresh[1],
            "6fefa7c34afdf72f751a54e46843684851c66ea403d0cfe9e45d52f61b06223c",
        ),
    ];
    for (manifest, fresh, charlie) in kept {
        let m = fs::read(manifest).unwrap();
        assert_eq!(line_of(&m, "c d"), format!("{charlie}  c d"));
        for rel in ["a", "sub/b"] {
            assert_eq!(line_of(&m, rel), line_of(fresh, rel));
        }
    }
    assert_eq!(fs::read(with_suffix(&sums, ".sha512")).unwrap(), fresh[2]);
    assert_check("sha512sum", &with_suffix(&sums, ".sha512"), &t.root(), 3);

    // The rows are per result now, and the next run reads nothing.
    let status = run(filepipe(&[s("status"), s("--state"), state.as_os_str()]));
    let status = status.success().stdout();
    for h in ["sha256", "blake3", "sha512"] {
        assert!(status.contains(&format!("\t{h}\tdone\t3\n")), "{status}");
    }
    assert!(!status.contains("sha256,blake3"), "{status}");
    let (again, calls) = traced_opens(&batch(&t, op, &[]));
    assert_eq!(summary_counts(&again), (3, 3, 0));
    assert_eq!(opened(&calls, &names), []);
}

#[test]
fn a_service_reloaded_with_another_hash_computes_only_that_one() {
    if !have_or_skip(&["b3sum", "zstd"]) {
        return;
    }
    let t = TestTree::new()
        .file("a.txt", &text_bytes(20_000, 4))
        .file("sub/b.txt", &text_bytes(3_000, 5))
        .file("sub/c d.txt", &text_bytes(9_000, 6));
    let rels = ["a.txt", "sub/b.txt", "sub/c d.txt"];
    let (out, sums, state) = (t.side("out"), t.side("SUMS"), t.side("state"));
    let b3 = with_suffix(&sums, ".blake3");
    let config = t.side("filepipe.toml");
    let write_config = |op: &str| {
        fs::write(
            &config,
            format!(
                "state_dir = {state:?}\nsettle_ms = 100\n[[watch]]\npath = {:?}\nop = {op:?}\n\
                 out = {out:?}\nmanifest = {sums:?}\n",
                t.root()
            ),
        )
        .unwrap();
    };
    let lines = |m: &Path| fs::read(m).map_or(0, |b| b.split(|&c| c == b'\n').count() - 1);
    let zst: Vec<PathBuf> = rels.iter().map(|r| out.join(format!("{r}.zst"))).collect();
    write_config("sha256,zstd");
    let socket = t.side("notify.sock");
    let notes = Notifications::listen(&socket);
    let mut cmd = filepipe(&[s("watch"), s("--config"), config.as_os_str()]);
    cmd.env("NOTIFY_SOCKET", &socket)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = Started::new(cmd);
    let limit = std::time::Duration::from_secs(60);
    wait_until(limit, "the first manifest and outputs", || {
        lines(&sums) == 3 && zst.iter().all(|z| z.exists())
    });
    let status = |n: &Notifications| n.last_status().filter(|s| s.idle());
    wait_until(limit, "idle", || status(&notes).is_some());
    let outputs = identities(&zst);
    // Planted while the daemon idles (between its transactions): its SHA-256 digests are
    // not computed again, so this one stays.
    {
        let conn = rusqlite::Connection::open(state.join("filepipe.sqlite")).unwrap();
        conn.busy_timeout(limit).unwrap();
        let n = conn
            .execute(
                "UPDATE files SET digest = ?1 WHERE op = 'sha256' AND path = ?2",
                rusqlite::params![[0xab_u8; 32], b"sub/b.txt"],
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    write_config("sha256,blake3,zstd");
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    wait_until(limit, "the BLAKE3 manifest", || lines(&b3) == 3);
    wait_until(limit, "idle after the reload", || {
        status(&notes).is_some_and(|s| s.done == 3)
    });
    assert_eq!(identities(&zst), outputs, "outputs rewritten");
    assert_check("b3sum", &b3, &t.root(), 3);
    let m = fs::read(&sums).unwrap();
    assert_eq!(
        line_of(&m, "sub/b.txt"),
        format!("{}  sub/b.txt", "ab".repeat(32))
    );
    let last = status(&notes).unwrap();
    assert_eq!((last.skipped, last.failed), (0, 0));
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    child.finish(limit).success();
}

/// An incremental batch replaces only the very output it made for an earlier version of a
/// changed file. Not a file the user put where an output would go under another `--out`, and
/// not one refused once as not filepipe's: that stays refused run after run, however its
/// failure was recorded (both found by a hostile review: each was overwritten).
#[test]
fn an_incremental_batch_replaces_only_the_output_it_made() {
    if !have_or_skip(&["zstd"]) {
        return;
    }
    let t = TestTree::new()
        .file("f", b"version one\n")
        .file("g", b"gee\n");
    let (o1, o2) = (t.side("o1"), t.side("o2"));
    fs::create_dir_all(&o1).unwrap();
    fs::create_dir_all(&o2).unwrap();
    let change = |content: &[u8]| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(t.path("f"), content).unwrap();
    };
    run(batch(&t, "sha256,zstd", &[s("--out"), o1.as_os_str()])).success();
    // Its own output of the changed file: replaced.
    change(b"version two\n");
    run(batch(&t, "sha256,zstd", &[s("--out"), o1.as_os_str()])).success();
    assert_zstd_restores(&o1.join("f.zst"), b"version two\n");
    // Another --out, where the user keeps a file of that name: kept.
    let mine = b"the user's own file, not a zstd of anything\n";
    fs::write(o2.join("f.zst"), mine).unwrap();
    change(b"version three\n");
    run(batch(&t, "sha256,zstd", &[s("--out"), o2.as_os_str()])).code(1);
    assert_eq!(
        fs::read(o2.join("f.zst")).unwrap(),
        mine,
        "under a new --out"
    );
    // Refused once, refused again: the file has not changed, the output is not filepipe's.
    fs::write(o1.join("g.zst"), mine).unwrap();
    for _ in 0..2 {
        run(batch(&t, "sha256,zstd", &[s("--out"), o1.as_os_str()])).code(1);
        assert_eq!(
            fs::read(o1.join("g.zst")).unwrap(),
            mine,
            "refused, then replaced"
        );
    }
    // --force replaces what it is told to.
    run(batch(
        &t,
        "sha256,zstd",
        &[s("--out"), o1.as_os_str(), s("--force")],
    ))
    .success();
    assert_zstd_restores(&o1.join("g.zst"), b"gee\n");
    assert_zstd_restores(&o1.join("f.zst"), b"version three\n");
}

/// A service whose `[[watch]]` tables share one state, started over a state of the layout
/// before rows per result: every pipeline opens it at once and the upgrade runs once, the
/// others waiting for it, not failing (found by a hostile review: "database is locked", the
/// service exited 1 on its first start after the upgrade, in 5 runs of 5).
#[test]
fn a_service_of_several_pipelines_starts_over_an_older_state() {
    let t = TestTree::new()
        .file("r1/a", b"a\n")
        .file("r2/b", b"b\n")
        .file("r3/c", b"c\n");
    let state = t.side("state");
    fs::create_dir_all(&state).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/state-v0/filepipe.sqlite");
    fs::copy(&fixture, state.join("filepipe.sqlite")).unwrap();
    let config = t.side("filepipe.toml");
    let mut toml = format!("state_dir = {state:?}\nsettle_ms = 100\n");
    for (dir, op) in [
        ("r1", "sha256,blake3"),
        ("r2", "sha256,blake3"),
        ("r3", "sha256"),
    ] {
        toml.push_str(&format!(
            "[[watch]]\npath = {:?}\nop = {op:?}\nmanifest = {:?}\n",
            t.path(dir),
            t.side(&format!("SUMS-{dir}"))
        ));
    }
    fs::write(&config, toml).unwrap();
    let socket = t.side("notify.sock");
    let notes = Notifications::listen(&socket);
    let mut cmd = filepipe(&[s("watch"), s("--config"), config.as_os_str()]);
    cmd.env("NOTIFY_SOCKET", &socket)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = Started::new(cmd);
    let limit = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let manifests = ["r1", "r2", "r3"].map(|d| t.side(&format!("SUMS-{d}")));
    let ran = || {
        notes.has("READY=1")
            && manifests
                .iter()
                .all(|m| fs::read(m).is_ok_and(|b| !b.is_empty()))
    };
    while !ran() {
        if child.try_wait().is_ok_and(|s| s.is_some()) {
            child.finish(std::time::Duration::from_secs(5)).success();
            panic!("the service exited before every pipeline ran");
        }
        assert!(
            std::time::Instant::now() < limit,
            "timed out waiting for every pipeline"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    child.finish(std::time::Duration::from_secs(60)).success();
    let conn = rusqlite::Connection::open(state.join("filepipe.sqlite")).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
}

/// A file the walk found unchanged since its recorded results, so queued for an added hash
/// alone, that changes before a worker opens it (here while strace holds that open back) is
/// done like any changed file: every result computed from the version opened, and the output
/// filepipe made for the recorded version replaced. It failed `output-exists` once (the walk,
/// finding it unchanged, allowed no replacing), the next run mending it.
#[test]
fn a_file_changed_between_the_walk_and_the_open_of_its_partial_job_is_done_whole() {
    if !have_or_skip(&["zstd", "sha256sum", "b3sum"]) {
        return;
    }
    let t = TestTree::new()
        .file("f", b"version one\n")
        .file("g", b"left as it is\n");
    let out = t.side("out");
    let with_out = [s("--out"), out.as_os_str()];
    run(batch(&t, "sha256,zstd", &with_out)).success();
    assert_zstd_restores(&out.join("f.zst"), b"version one\n");
    let trace = t.side("trace");
    let root = t.root();
    let added = batch(&t, "sha256,blake3,zstd", &with_out);
    let mut cmd = Command::new("strace");
    // Only opens beneath the root's descriptor are traced (-P matches the descriptor), and
    // each is held back before it is made, so the trace line of f's says the worker is about
    // to open it, the walk long done with it.
    cmd.args(["-f", "-qq", "-y", "-P"])
        .arg(&root)
        .args(["-e", "trace=openat2", "-o"])
        .arg(&trace)
        .args(["-e", "inject=openat2:delay_enter=1500000"])
        .arg(added.get_program())
        .args(added.get_args())
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let started = Started::new(cmd);
    wait_until(
        std::time::Duration::from_secs(60),
        "the worker's open of f held back",
        || fs::read_to_string(&trace).is_ok_and(|t| t.contains(", \"f\", {flags=")),
    );
    fs::write(t.path("f"), b"version two, longer\n").unwrap();
    let r = started.finish(std::time::Duration::from_secs(120));
    let (done, unchanged, _) = summary_counts(&r);
    assert_eq!((done, unchanged), (2, 0));
    assert_zstd_restores(&out.join("f.zst"), b"version two, longer\n");
    assert_zstd_restores(&out.join("g.zst"), b"left as it is\n");
    let sums = t.side("SUMS");
    assert_check("sha256sum", &sums, &root, 2);
    assert_check("b3sum", &with_suffix(&sums, ".blake3"), &root, 2);
    // The state has the version read: a rerun finds nothing to do.
    let (again, calls) = traced_opens(&batch(&t, "sha256,blake3,zstd", &with_out));
    assert_eq!(summary_counts(&again).1, 2);
    assert_eq!(opened(&calls, &["f".into(), "g".into()]), []);
}

/// The same in watch mode, restarted with a hash added: a file that changes before the worker
/// opens it for that hash alone is done whole, its output replaced, and no failure is left.
/// (Here the job's settled stamp, `Job::expect`, catches the change first: the file is tried
/// again, as one its writer's close tells of, with its own output replaceable. A guard that
/// the partial job's path keeps it so.)
#[test]
fn a_watched_file_changed_before_the_open_of_its_partial_job_is_done_whole() {
    if !have_or_skip(&["zstd", "sha256sum", "b3sum"]) {
        return;
    }
    let t = TestTree::new()
        .file("f", b"version one\n")
        .file("g", b"left as it is\n");
    let root = t.root();
    let out = t.side("out");
    let sums = t.side("SUMS");
    let args = |op: &'static str| {
        [
            "--op",
            op,
            "--out",
            out.to_str().unwrap(),
            "--manifest",
            sums.to_str().unwrap(),
        ]
        .map(str::to_owned)
    };
    let a = args("sha256,zstd");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let d = Daemon::ready(&t, &a);
    d.wait_idle(2);
    d.stop().success();

    // Restarted under strace, which holds back each open beneath the root's descriptor (the
    // worker's of f among them) and writes its line first.
    let trace = t.side("trace");
    let socket = t.side("notify-traced.sock");
    let notes = Notifications::listen(&socket);
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-y", "-P"])
        .arg(&root)
        .args(["-e", "trace=openat2", "-o"])
        .arg(&trace)
        .args(["-e", "inject=openat2:delay_enter=1500000"])
        .arg(bin())
        .arg("watch")
        .arg(&root)
        .arg("--state")
        .arg(t.side("state"))
        .args(["--json", "--settle", "150"])
        .args(args("sha256,blake3,zstd"))
        .env("NOTIFY_SOCKET", &socket)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let started = Started::new(cmd);
    wait_until(
        std::time::Duration::from_secs(60),
        "the worker's open of f held back",
        || {
            fs::read_to_string(&trace)
                .is_ok_and(|t| t.contains(", \"f\", {flags=O_RDONLY|O_NOCTTY"))
        },
    );
    fs::write(t.path("f"), b"version two, longer\n").unwrap();
    let restores =
        |zst: &Path, want: &[u8]| tool("zstd", &[s("-dc"), zst.as_os_str()], &out).stdout == want;
    wait_until(
        std::time::Duration::from_secs(90),
        "f.zst of version two, and the daemon idle",
        || {
            notes.last_status().is_some_and(|s| s.idle())
                && restores(&out.join("f.zst"), b"version two, longer\n")
        },
    );
    let status = notes.last_status().unwrap();
    // The daemon (strace's child) stops on SIGTERM as the service does.
    let pid: i32 = fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        started.id(),
        started.id()
    ))
    .unwrap()
    .split_whitespace()
    .next()
    .unwrap()
    .parse()
    .unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let r = started.finish(std::time::Duration::from_secs(60));
    r.success();
    assert_eq!(
        (status.skipped, status.failed),
        (0, 0),
        "{:?}",
        notes.lines()
    );
    assert_zstd_restores(&out.join("f.zst"), b"version two, longer\n");
    assert_zstd_restores(&out.join("g.zst"), b"left as it is\n");
    assert_check("sha256sum", &sums, &root, 2);
    assert_check("b3sum", &with_suffix(&sums, ".blake3"), &root, 2);
}

/// Runs `op` over the tree incrementally (the state and manifest `inc` kept from run to run)
/// and stateless (manifest `full`), in that order, and asserts that both runs end alike and
/// every manifest of the one is byte for byte the other's.
fn incremental_and_stateless_agree(t: &TestTree, op: &str, step: &str) {
    let (inc, full) = (t.side("inc.sums"), t.side("full.sums"));
    let batch_to = |manifest: &Path, state: bool| {
        let mut cmd = filepipe(&[
            s("batch"),
            t.root().as_os_str(),
            s("--op"),
            s(op),
            s("--manifest"),
            manifest.as_os_str(),
        ]);
        if state {
            cmd.arg("--state").arg(t.side("state"));
        }
        run(cmd).context(step)
    };
    let (a, b) = (batch_to(&inc, true), batch_to(&full, false));
    let code = b.output().status.code();
    a.code(code.unwrap_or(-1));
    let hashes: Vec<&str> = op
        .split(',')
        .filter(|h| !["gzip", "zstd"].contains(h))
        .collect();
    for (i, h) in hashes.iter().enumerate() {
        let suffix = if i == 0 {
            String::new()
        } else {
            format!(".{h}")
        };
        let (mine, theirs) = (
            fs::read(with_suffix(&inc, &suffix)).unwrap(),
            fs::read(with_suffix(&full, &suffix)).unwrap(),
        );
        assert!(
            mine == theirs,
            "{step}: the incremental {h} manifest is not the stateless run's:\n{}\n---- \
             stateless:\n{}",
            String::from_utf8_lossy(&mine),
            String::from_utf8_lossy(&theirs)
        );
    }
}

#[test]
fn incremental_and_stateless_runs_list_the_same_files_as_the_tree_changes() {
    // Found by review: an output `a.gz` hashed as an input while `a` was away stayed listed
    // from the state once `a` was back, where a stateless run skips it (its input beside it),
    // and a hash added to the pipeline read it for that hash alone.
    let t = TestTree::new()
        .file("a", b"hello\n")
        .file("b", b"bee\n")
        .file("d/c", b"sea\n");
    let away = t.side("a.away");
    type Change<'t> = Box<dyn Fn() + 't>;
    let steps: Vec<(&str, Change)> = vec![
        ("first run", Box::new(|| {})),
        (
            "a moved away: a.gz alone",
            Box::new(|| fs::rename(t.path("a"), &away).unwrap()),
        ),
        (
            "a back beside a.gz",
            Box::new(|| fs::rename(&away, t.path("a")).unwrap()),
        ),
        ("unchanged", Box::new(|| {})),
        (
            "d/c moved away",
            Box::new(|| fs::rename(t.path("d/c"), t.side("c")).unwrap()),
        ),
        (
            "d/c back",
            Box::new(|| fs::rename(t.side("c"), t.path("d/c")).unwrap()),
        ),
        (
            "a removed: a.gz alone",
            Box::new(|| fs::remove_file(t.path("a")).unwrap()),
        ),
        (
            "a new file at a, its old output beside it",
            Box::new(|| fs::write(t.path("a"), b"another a\n").unwrap()),
        ),
        (
            "a user's b.gz beside a directory b/",
            Box::new(|| {
                fs::remove_file(t.path("b")).unwrap();
                fs::remove_file(t.path("b.gz")).unwrap();
                fs::create_dir(t.path("b")).unwrap();
                fs::write(t.path("b/inner"), b"inner\n").unwrap();
                fs::write(t.path("b.gz"), b"not filepipe's\n").unwrap();
            }),
        ),
    ];
    for op in ["sha256,gzip", "sha256,blake3,gzip"] {
        for (step, change) in &steps {
            change();
            incremental_and_stateless_agree(&t, op, &format!("{op}: {step}"));
        }
        // The tree as it was, for the next op (which keeps the same state).
        let _ = fs::remove_dir_all(t.path("b"));
        let _ = fs::remove_file(t.path("b.gz"));
        fs::write(t.path("b"), b"bee\n").unwrap();
        fs::write(t.path("a"), b"hello\n").unwrap();
        for gz in ["a.gz", "b.gz", "d/c.gz"] {
            let _ = fs::remove_file(t.path(gz));
        }
    }
    // The state of a run that hashed a.gz alone, then a hash added to the pipeline once a is
    // back: a.gz is no input, not one read for the new hash alone.
    let op = "sha256,gzip";
    incremental_and_stateless_agree(&t, op, "before a hash is added");
    fs::rename(t.path("a"), &away).unwrap();
    incremental_and_stateless_agree(&t, op, "a moved away, before a hash is added");
    fs::rename(&away, t.path("a")).unwrap();
    incremental_and_stateless_agree(&t, "sha256,blake3,gzip", "a back, a hash added");
}

#[test]
fn a_gz_named_after_what_is_no_input_is_hashed_and_listed() {
    // Found by review: `backup.gz` beside a directory `backup/` was taken for filepipe's own
    // output and left out of the manifest, yet a directory is never an input. Nor is a link
    // not followed, or a FIFO; with --follow-symlinks, a link to a file is.
    let t = TestTree::new()
        .file("backup/inner", b"inner\n")
        .file("backup.gz", b"a user's archive\n")
        .file("real", b"real\n")
        .symlink("real", "lnk")
        .file("lnk.gz", b"not the link's output\n")
        .file("fifo.gz", b"nor the fifo's\n");
    mkfifo(&t.path("fifo"));
    let listed = |manifest: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(manifest)
            .lines()
            .filter_map(|l| l.split_once("  ").map(|(_, name)| name.to_owned()))
            .collect()
    };
    for step in ["first run", "rerun"] {
        incremental_and_stateless_agree(&t, "sha256,gzip", step);
        let names = listed(&fs::read(t.side("full.sums")).unwrap());
        for gz in ["backup.gz", "lnk.gz", "fifo.gz"] {
            assert!(
                names.iter().any(|n| n == gz),
                "{step}: {gz} is not listed: {names:?}"
            );
        }
    }
    // Followed, the link is an input: lnk.gz, named as its output, is not one.
    let sums = t.side("follow.sums");
    let mut cmd = filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--op"),
        s("sha256,gzip"),
        s("--follow-symlinks"),
        s("--manifest"),
        sums.as_os_str(),
    ]);
    cmd.arg("--json");
    let _ = run(cmd);
    let names = listed(&fs::read(&sums).unwrap());
    assert!(names.iter().any(|n| n == "backup.gz"), "{names:?}");
    assert!(!names.iter().any(|n| n == "lnk.gz"), "{names:?}");
}
