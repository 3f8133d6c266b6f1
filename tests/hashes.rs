//! `--op sha512` and `--op blake3` (issue 19): manifests the real `sha512sum -c` and `b3sum -c`
//! accept, digests that do not depend on `--jobs`, watch mode, and `verify` of each algorithm
//! with its added and missing files.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

/// The three hashing ops, with the tool that checks their manifests.
const HASHES: [(&str, &str); 3] = [
    ("sha256", "sha256sum"),
    ("sha512", "sha512sum"),
    ("blake3", "b3sum"),
];

/// Whether `tool` is installed; if not, says the test (or part) is SKIPPED.
fn have(tool: &str, what: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: {what}: {tool} is not installed");
    }
    found
}

/// Names that need escaping or are not UTF-8, beside plain ones.
fn awkward_tree() -> TestTree {
    TestTree::new()
        .file("plain", b"plain\n")
        .file("x y/z", b"spaces\n")
        .file("back\\slash", b"backslash\n")
        .file("nl\nname", b"newline\n")
        .file("-lead", b"dash\n")
        .file("empty", b"")
        .file("big", &noise_bytes(300_000, 5))
}

/// `filepipe batch ROOT --op OP --manifest MANIFEST EXTRA..`, which must succeed.
fn batch(t: &TestTree, op: &str, manifest: &Path, extra: &[&str]) {
    let root = t.root();
    let mut args = vec![
        s("batch"),
        root.as_os_str(),
        s("--op"),
        s(op),
        s("--manifest"),
        manifest.as_os_str(),
    ];
    args.extend(extra.iter().map(|a| s(a)));
    run(filepipe(&args)).context(op).success();
}

/// `filepipe verify ARGS`, run in `cwd`.
fn verify(args: &[&OsStr], cwd: &Path) -> Run {
    let mut c = filepipe(&[&[s("verify")], args].concat());
    c.current_dir(cwd);
    run(c)
}

#[test]
fn the_real_tools_accept_the_manifests_and_list_the_same_lines() {
    for (op, tool_name) in HASHES {
        if !have(tool_name, &format!("checking the {op} manifest")) {
            continue;
        }
        let t = awkward_tree();
        let manifest = t.side("SUMS");
        batch(&t, op, &manifest, &[]);
        let check = tool(tool_name, &[s("-c"), manifest.as_os_str()], &t.root());
        assert!(check.status.success(), "{tool_name} -c: {check:?}");
        // What the tool itself writes for the same files, in the manifest's order (sorted by
        // bytes): the very same bytes, escapes included.
        let mut names: Vec<&[u8]> = vec![
            b"-lead",
            b"back\\slash",
            b"big",
            b"empty",
            b"nl\nname",
            b"plain",
            b"x y/z",
        ];
        names.sort();
        let mut args: Vec<&OsStr> = vec![s("--")];
        args.extend(names.iter().map(|n| OsStr::from_bytes(n)));
        let theirs = tool(tool_name, &args, &t.root());
        assert!(theirs.status.success(), "{theirs:?}");
        assert_eq!(
            String::from_utf8_lossy(&fs::read(&manifest).unwrap()),
            String::from_utf8_lossy(&theirs.stdout),
            "{op}"
        );
    }
}

#[test]
fn non_utf8_names_are_listed_raw_and_verify() {
    // GNU's tools take any bytes; b3sum reads UTF-8 only and cannot list such a name itself,
    // so only filepipe verify is asked about the BLAKE3 manifest.
    for (op, tool_name) in HASHES {
        let t = TestTree::new()
            .file(b"caf\xe9", b"latin-1\n")
            .file(b"d\xff/x\ny", b"both\n")
            .file("plain", b"p\n");
        let manifest = t.side("SUMS");
        batch(&t, op, &manifest, &[]);
        let bytes = fs::read(&manifest).unwrap();
        assert!(bytes.windows(4).any(|w| w == b"caf\xe9"), "{op}: raw bytes");
        if op != "blake3" && have(tool_name, "non-UTF-8 names") {
            let check = tool(tool_name, &[s("-c"), manifest.as_os_str()], &t.root());
            assert!(check.status.success(), "{tool_name} -c: {check:?}");
        }
        let algo = if op == "blake3" { "blake3" } else { op };
        let root = t.root();
        verify(
            &[
                manifest.as_os_str(),
                s("--root"),
                root.as_os_str(),
                s("--algo"),
                s(algo),
            ],
            &root,
        )
        .context(op)
        .success();
    }
}

/// A file named exactly `-`: `sha256sum -c` and `b3sum -c` read stdin for that name, so it is
/// listed as `./-` (found by a review: the manifest failed the real tools, and hung on a
/// terminal). `filepipe verify` takes `./-` for that file: neither missing nor added.
#[test]
fn a_file_named_dash_is_checked_by_the_tools_not_read_from_stdin() {
    for (op, tool_name) in HASHES {
        let t = TestTree::new()
            .file("-", b"dash file\n")
            .file("a", b"a\n")
            .file("sub/-", b"dash below\n");
        let manifest = t.side("SUMS");
        batch(&t, op, &manifest, &[]);
        let text = fs::read(&manifest).unwrap();
        assert!(
            text.windows(6).any(|w| w == b"  ./-\n"),
            "{op}: {}",
            String::from_utf8_lossy(&text)
        );
        if have(tool_name, &format!("checking the {op} manifest")) {
            // Its stdin is empty (`tool`): had it read stdin, `-` would fail, not hang.
            assert_check(tool_name, &manifest, &t.root(), 3);
        }
        let root = t.root();
        let args = [
            manifest.as_os_str(),
            s("--root"),
            root.as_os_str(),
            s("--algo"),
            s(op),
        ];
        verify(&args, &root).context(op).success();
        fs::rename(t.path("-"), t.path("moved")).unwrap();
        let r = verify(&args, &root);
        let out = r.code(12).stdout();
        assert!(out.contains("./-: MISSING\n"), "{op}: {out}");
        assert!(out.contains("moved: ADDED"), "{op}: {out}");
        // Not listed, it is shown as a manifest would list it.
        fs::rename(t.path("moved"), t.path("-")).unwrap();
        fs::remove_file(t.path("a")).unwrap();
        let other = t.side("OTHER");
        fs::write(&other, b"").unwrap();
        let r = verify(
            &[
                other.as_os_str(),
                s("--root"),
                root.as_os_str(),
                s("--algo"),
                s(op),
            ],
            &root,
        );
        let out = r.code(8).stdout();
        assert!(out.contains("./-: ADDED"), "{op}: {out}");
    }
}

#[test]
fn a_digest_is_the_same_whatever_jobs_is() {
    // 9 MiB: above the size BLAKE3 hashes on all threads (4 MiB), in pieces of 1 MiB and a
    // short one; the small files go through the one-thread path.
    let t = TestTree::new()
        .file("large", &noise_bytes(9 << 20 | 12345, 7))
        .file("small", b"small\n")
        .file("mid", &text_bytes(200_000, 3));
    for (op, _) in HASHES {
        let manifests: Vec<Vec<u8>> = ["1", "2", "3"]
            .iter()
            .map(|jobs| {
                let m = t.side(&format!("SUMS-{op}-{jobs}"));
                batch(&t, op, &m, &["--jobs", jobs]);
                fs::read(&m).unwrap()
            })
            .collect();
        assert_eq!(manifests[0], manifests[1], "{op}: --jobs 1 vs 2");
        assert_eq!(manifests[0], manifests[2], "{op}: --jobs 1 vs 3");
        assert_eq!(manifests[0].iter().filter(|&&b| b == b'\n').count(), 3);
    }
    if have("b3sum", "BLAKE3 of a large file against b3sum") {
        let m = fs::read(t.side("SUMS-blake3-2")).unwrap();
        let theirs = tool("b3sum", &[s("large")], &t.root());
        assert!(m.starts_with(&theirs.stdout), "{theirs:?}");
    }
}

#[test]
fn verify_finds_a_changed_file_with_each_algorithm() {
    for (op, _) in HASHES {
        let t = TestTree::new().file("a", b"alpha\n").file("b", b"beta\n");
        let manifest = t.side("SUMS");
        batch(&t, op, &manifest, &[]);
        let root = t.root();
        let algo: &[&OsStr] = if op == "blake3" {
            &[s("--algo"), s("blake3")]
        } else {
            &[]
        };
        let base = [manifest.as_os_str(), s("--root"), root.as_os_str()];
        let args = |extra: &[&'static OsStr]| -> Vec<&OsStr> { [&base[..], extra].concat() };
        let ok = verify(&args(algo), &root);
        assert_eq!(ok.success().stdout(), "a: OK\nb: OK\n", "{op}");
        fs::write(t.path("b"), b"changed\n").unwrap();
        let bad = verify(&args(algo), &root);
        assert_eq!(
            bad.code(1).stdout(),
            "a: OK\nb: FAILED (checksum mismatch)\n",
            "{op}"
        );
        if op == "blake3" {
            // 64 hex digits and a name that says nothing: the first file that matches (a)
            // tells BLAKE3 from SHA-256.
            let guessed = verify(&args(&[s("--json")]), &root);
            let lines = json_lines(guessed.code(1));
            assert_eq!(lines.last().unwrap()["algo"], "blake3", "{lines:?}");
            assert_eq!(lines[0]["status"], "ok", "{lines:?}");
            // Every file changed: nothing to tell by, so SHA-256, as sha256sum -c would...
            fs::write(t.path("a"), b"changed too\n").unwrap();
            let guessed = verify(&args(&[s("--json")]), &root);
            let lines = json_lines(guessed.code(1));
            assert_eq!(lines.last().unwrap()["algo"], "sha256", "{lines:?}");
            // ...unless the manifest's name says BLAKE3.
            let b3sums = t.side("B3SUMS");
            fs::copy(&manifest, &b3sums).unwrap();
            let named = verify(
                &[
                    b3sums.as_os_str(),
                    s("--root"),
                    root.as_os_str(),
                    s("--json"),
                ],
                &root,
            );
            let lines = json_lines(named.code(1));
            assert_eq!(lines.last().unwrap()["algo"], "blake3", "{lines:?}");
            assert_eq!(lines[0]["status"], "failed", "{lines:?}");
        }
        if op == "sha512" {
            // Told the wrong algorithm: every line is malformed (1), so nothing is listed and
            // both files are added (8).
            let wrong = verify(&args(&[s("--algo"), s("sha256")]), &root);
            assert!(wrong
                .code(9)
                .stderr()
                .contains("2 lines are improperly formatted"));
        }
    }
}

/// The `--json` lines of a verify run, parsed.
fn json_lines(r: &Run) -> Vec<serde_json::Value> {
    r.stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// The paths (as bytes) of `status` in JSON lines.
fn with_status(lines: &[serde_json::Value], status: &str) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = lines
        .iter()
        .filter(|l| l["status"] == status)
        .map(|l| match l["path_hex"].as_str() {
            Some(hex) => (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect(),
            None => l["path"].as_str().unwrap().as_bytes().to_vec(),
        })
        .collect();
    out.sort();
    out
}

/// Takes an open file description lock for writing on all of `file`, as filepipe's writers
/// lock their temps (`F_OFD_SETLK`): held until `file` is closed.
fn ofd_write_lock(file: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero `flock` is valid (plain integers); OFD locks require l_pid 0.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as _;
    lock.l_whence = libc::SEEK_SET as _;
    // SAFETY: a valid descriptor and a valid `flock` for the call's duration.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn verify_reports_added_and_missing_files_with_their_own_exit_bits() {
    for (op, algo) in [("sha512", "sha512"), ("blake3", "blake3")] {
        let t = TestTree::new()
            .file("a", b"alpha\n")
            .file("nl\nname", b"newline\n")
            .file(b"raw\xff", b"not utf-8\n")
            .file("sub/c", b"gamma\n");
        // The manifest inside the tree, where verify looks by default: never hashed, never
        // added.
        let manifest = t.path("SUMS");
        batch(&t, op, &manifest, &[]);
        let root = t.root();
        let m = manifest.as_os_str();
        let a: &[&OsStr] = &[m, s("--algo"), s(algo)];
        let json: &[&OsStr] = &[m, s("--algo"), s(algo), s("--json")];
        verify(a, Path::new("/")).context(op).success();
        // A filepipe temp being written (named and marked so, its writer holding its lock)
        // is not an added file; one merely named like one is (or anyone could hide a file
        // from the report by its name), and so is one also marked whose lock nobody holds: a
        // stopped run's leftover, or a payload marked by whoever may write the tree (the mark
        // is an extended attribute the file's owner sets: found by a review).
        let temp = t.path(".filepipe.1-x.0.tmp");
        fs::write(&temp, b"temp").unwrap();
        rustix::fs::setxattr(
            &temp,
            "user.filepipe.temp",
            &temp_mark(),
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let r = verify(a, Path::new("/"));
        assert!(
            r.code(8).stdout().contains(".filepipe.1-x.0.tmp: ADDED"),
            "{op}: {}",
            r.stdout()
        );
        let writer = fs::OpenOptions::new().write(true).open(&temp).unwrap();
        ofd_write_lock(&writer);
        verify(a, Path::new("/")).context(op).success();
        drop(writer);
        fs::remove_file(&temp).unwrap();
        fs::write(t.path(".filepipe.2-y.0.tmp"), b"hidden?").unwrap();
        let r = verify(a, Path::new("/"));
        assert!(
            r.code(8).stdout().contains(".filepipe.2-y.0.tmp: ADDED"),
            "{op}: {}",
            r.stdout()
        );
        fs::remove_file(t.path(".filepipe.2-y.0.tmp")).unwrap();

        fs::remove_file(t.path("nl\nname")).unwrap();
        let r = verify(a, &root);
        assert!(
            r.code(4).stdout().contains("\\nl\\nname: MISSING\n"),
            "{op}"
        );
        // -q: what failed only, as `sha256sum -c --quiet` (found by review: OK lines too).
        let r = verify(&[a, &[s("-q")]].concat(), &root);
        assert_eq!(r.code(4).stdout(), "\\nl\\nname: MISSING\n", "{op}");

        fs::write(t.path("new\nfile"), b"added\n").unwrap();
        fs::write(t.path(b"sub/add\xfe"), b"added too\n").unwrap();
        let r = verify(a, &root);
        let text = r.code(12).stdout();
        assert!(text.contains("\\new\\nfile: ADDED"), "{op}: {text}");
        assert!(r.stderr().contains("2 files are not listed"), "{op}");

        fs::write(t.path("a"), b"changed\n").unwrap();
        let r = verify(json, &root);
        let lines = json_lines(r.code(13));
        assert_eq!(
            with_status(&lines, "added"),
            vec![b"new\nfile".to_vec(), b"sub/add\xfe".to_vec()],
            "{op}"
        );
        assert_eq!(with_status(&lines, "missing"), vec![b"nl\nname".to_vec()]);
        assert_eq!(with_status(&lines, "failed"), vec![b"a".to_vec()]);
        assert_eq!(
            with_status(&lines, "ok"),
            vec![b"raw\xff".to_vec(), b"sub/c".to_vec()]
        );
        let summary = lines.last().unwrap();
        assert_eq!(summary["status"], "summary");
        assert_eq!(summary["algo"], algo);
        assert_eq!(
            (&summary["added"], &summary["missing"], &summary["failed"]),
            (&2.into(), &1.into(), &1.into())
        );
        assert_eq!(summary["exit"], 13);

        // Elsewhere, with --root: the same verdicts; --exclude leaves out what it names.
        let outside = t.side("OUT-SUMS");
        fs::copy(&manifest, &outside).unwrap();
        let r = verify(
            &[
                outside.as_os_str(),
                s("--algo"),
                s(algo),
                s("--root"),
                root.as_os_str(),
                s("--exclude"),
                s("sub"),
                s("--exclude"),
                s("new*"),
                s("--exclude"),
                s("SUMS"),
            ],
            Path::new("/"),
        );
        assert!(!r.code(5).stdout().contains("ADDED"), "{op}");
    }
}

/// A second manifest filepipe writes (`--op blake3,sha256 --manifest B3SUMS` makes
/// `B3SUMS.sha256`) is told by the suffix filepipe gave it, before the rest of its name
/// (found by a review: `B3SUMS.sha256` was taken for BLAKE3, every file FAILED).
#[test]
fn verify_tells_a_second_manifest_by_the_suffix_filepipe_gave_it() {
    let t = TestTree::new()
        .file("a", b"alpha\n")
        .file("sub/b", b"beta\n");
    let manifest = t.side("B3SUMS");
    batch(&t, "blake3,sha256", &manifest, &[]);
    let root = t.root();
    for m in ["B3SUMS", "B3SUMS.sha256"] {
        let r = verify(
            &[t.side(m).as_os_str(), s("--root"), root.as_os_str()],
            Path::new("/"),
        );
        assert_eq!(r.context(m).success().stdout(), "a: OK\nsub/b: OK\n", "{m}");
    }
}

#[test]
fn verify_refuses_manifest_options_for_a_gz_tree() {
    let t = TestTree::new().file("a", b"x");
    let r = verify(&[t.root().as_os_str(), s("--algo"), s("sha512")], &t.root());
    assert!(r.code(2).stderr().contains("apply to a manifest"));
}

#[test]
fn watch_mode_keeps_a_manifest_the_tools_accept() {
    for (op, tool_name) in [("sha512", "sha512sum"), ("blake3", "b3sum")] {
        let t = TestTree::new().file("before", b"there at start\n");
        let manifest = t.side("SUMS");
        let d = Daemon::ready(&t, &["--op", op, "--manifest", manifest.to_str().unwrap()]);
        fs::write(t.path("back\\slash"), b"added while watching\n").unwrap();
        fs::create_dir(t.path("d")).unwrap();
        fs::write(t.path("d/nl\nname"), noise_bytes(5 << 20, 9)).unwrap();
        d.wait_idle(3);
        wait_until(std::time::Duration::from_secs(60), "three lines", || {
            fs::read(&manifest).is_ok_and(|m| m.iter().filter(|&&b| b == b'\n').count() == 3)
        });
        d.stop().success();
        let algo = if op == "blake3" { "blake3" } else { op };
        let mut c = filepipe(&[
            s("verify"),
            manifest.as_os_str(),
            s("--root"),
            t.root().as_os_str(),
            s("--algo"),
            s(algo),
        ]);
        c.current_dir(t.root());
        run(c).context(op).success();
        if have(tool_name, &format!("checking watch mode's {op} manifest")) {
            let check = tool(tool_name, &[s("-c"), manifest.as_os_str()], &t.root());
            assert!(check.status.success(), "{tool_name} -c: {check:?}");
        }
        // The state carries the algorithm: status shows this op's counts.
        let status = run(filepipe(&[
            s("status"),
            s("--state"),
            t.side("state").as_os_str(),
        ]));
        assert!(
            status.success().stdout().contains(op),
            "{}",
            status.stdout()
        );
    }
}
