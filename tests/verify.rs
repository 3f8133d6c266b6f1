//! `filepipe verify` on good, corrupt, truncated and garbage inputs (RELIABILITY.md case 29).

mod common;

use std::ffi::OsStr;
use std::fs;

use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

#[test]
fn gz_tree_reports_each_bad_file_without_panicking() {
    let t = TestTree::new()
        .file("good.txt", &text_bytes(200_000, 1))
        .file("bad/truncated.txt", &text_bytes(200_000, 2))
        .file("bad/corrupt.txt", &text_bytes(200_000, 3));
    run(filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--op"),
        s("gzip"),
    ]))
    .success();
    let trunc = t.path("bad/truncated.txt.gz");
    let bytes = fs::read(&trunc).unwrap();
    fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let corrupt = t.path("bad/corrupt.txt.gz");
    let mut bytes = fs::read(&corrupt).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    bytes[mid + 1] ^= 0x55;
    fs::write(&corrupt, &bytes).unwrap();
    fs::write(t.path("bad/garbage.gz"), b"this is not gzip at all").unwrap();
    fs::write(t.path("bad/empty.gz"), b"").unwrap();
    // Real gzip agrees on which are bad.
    for f in [
        "bad/truncated.txt.gz",
        "bad/corrupt.txt.gz",
        "bad/garbage.gz",
        "bad/empty.gz",
    ] {
        assert!(!tool("gzip", &[s("-t"), t.path(f).as_os_str()], &t.root())
            .status
            .success());
    }
    let out = run(filepipe(&[s("verify"), t.root().as_os_str()]));
    let text = std::str::from_utf8(&out.code(1).output().stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        lines.iter().filter(|l| l.ends_with(": OK")).count() == 1,
        "{text}"
    );
    assert!(text.contains("good.txt.gz: OK"));
    for f in [
        "truncated.txt.gz",
        "corrupt.txt.gz",
        "garbage.gz",
        "empty.gz",
    ] {
        assert!(
            text.lines().any(|l| l.contains(f) && l.contains("FAILED")),
            "{f}: {text}"
        );
    }
}

#[test]
fn manifest_reports_mismatch_missing_and_malformed_lines() {
    let t = TestTree::new()
        .file("a", b"alpha")
        .file("b", b"beta")
        .file("c", b"gamma");
    let manifest = t.side("m");
    run(filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--op"),
        s("sha256"),
        s("--manifest"),
        manifest.as_os_str(),
    ]))
    .success();
    let verify = || {
        // The manifest lies beside the tree: its names resolve against --root.
        let root = t.root();
        let mut c = filepipe(&[
            s("verify"),
            manifest.as_os_str(),
            s("--root"),
            root.as_os_str(),
        ]);
        c.current_dir(t.root());
        run(c)
    };
    assert_eq!(verify().success().stdout(), "a: OK\nb: OK\nc: OK\n");
    fs::write(t.path("b"), b"changed").unwrap();
    fs::remove_file(t.path("c")).unwrap();
    let mut m = fs::read(&manifest).unwrap();
    m.extend_from_slice(b"not a manifest line\n\xff\xfe garbage\n");
    fs::write(&manifest, m).unwrap();
    let bad = verify();
    // A mismatch and malformed lines (1), a missing file (4).
    let text = bad.code(5).stdout();
    assert!(text.starts_with("a: OK\nb: FAILED"), "{text}");
    assert!(text.contains("c: MISSING"), "{text}");
    assert!(bad.stderr().contains("2 lines are improperly formatted"));
    // With -q, the failures and the malformed lines' count alone (they have no line of their
    // own; found by review r55: nothing at all was said of them).
    let root = t.root();
    let quiet = run(filepipe(&[
        s("verify"),
        manifest.as_os_str(),
        s("--root"),
        root.as_os_str(),
        s("-q"),
    ]));
    let text = quiet.code(5).stdout();
    assert!(!text.contains("OK"), "{text}");
    assert!(
        text.contains("b: FAILED") && text.contains("c: MISSING"),
        "{text}"
    );
    assert_eq!(
        quiet.stderr(),
        "filepipe: WARNING: 2 lines are improperly formatted\n"
    );
    // Pure garbage and a binary file as a manifest: errors, no panic.
    fs::write(
        &manifest,
        (0..=255u8).cycle().take(10_000).collect::<Vec<u8>>(),
    )
    .unwrap();
    // Every line malformed (1), so the tree's files are not listed (8).
    assert!(!verify().code(9).stderr().contains("panicked"));
}

#[test]
fn verify_accepts_a_real_sha256sum_manifest() {
    let t = TestTree::new()
        .file("x y", b"1")
        .file("back\\slash", b"2")
        .file("nl\nname", b"3");
    let m = tool(
        "sha256sum",
        &[s("x y"), s("back\\slash"), s("nl\nname")],
        &t.root(),
    );
    assert!(m.status.success());
    fs::write(t.side("m"), &m.stdout).unwrap();
    let root = t.root();
    let mut c = filepipe(&[
        s("verify"),
        t.side("m").as_os_str(),
        s("--root"),
        root.as_os_str(),
    ]);
    c.current_dir(t.root());
    run(c).success();
}

/// What `sha256sum --tag` and `sha512sum --tag` write (the BSD form, `SHA256 (NAME) = DIGEST`,
/// escaped as the usual form is) verifies too: the module promises every manifest the GNU
/// tools write (found by a review: every line was malformed). A name holding `) = ` is read
/// by the digest's place at the end.
#[test]
fn verify_accepts_the_bsd_form_the_gnu_tools_write_with_tag() {
    let names = ["x y", "back\\slash", "nl\nname", "odd) = name"];
    let mut t = TestTree::new();
    for (i, n) in names.iter().enumerate() {
        t = t.file(n, format!("content {i}\n").as_bytes());
    }
    for tool_name in ["sha256sum", "sha512sum"] {
        let mut args = vec![s("--tag")];
        args.extend(names.iter().map(|n| s(n)));
        let m = tool(tool_name, &args, &t.root());
        assert!(m.status.success(), "{tool_name}");
        let text = String::from_utf8_lossy(&m.stdout).into_owned();
        assert!(text.contains(" (x y) = "), "{text}");
        fs::write(t.side("m"), &m.stdout).unwrap();
        let root = t.root();
        let out = run(filepipe(&[
            s("verify"),
            t.side("m").as_os_str(),
            s("--root"),
            root.as_os_str(),
            s("--json"),
        ]));
        let last = out.context(tool_name).success().stdout();
        let summary: serde_json::Value =
            serde_json::from_str(last.lines().last().unwrap()).unwrap();
        assert_eq!(summary["ok"], 4, "{tool_name}: {last}");
        assert_eq!(summary["algo"], &tool_name[..6], "{tool_name}: {last}");
        // A changed file fails as in the usual form.
        fs::write(t.path("x y"), b"changed\n").unwrap();
        let out = run(filepipe(&[
            s("verify"),
            t.side("m").as_os_str(),
            s("--root"),
            root.as_os_str(),
        ]));
        assert!(out.code(1).stdout().contains("x y: FAILED"), "{tool_name}");
        fs::write(t.path("x y"), b"content 0\n").unwrap();
    }
}

/// A manifest read from a pipe (`verify /dev/stdin`, `<(...)`) is read once, from its start
/// (found by a review: the lines read to tell the algorithm were lost to a second open, and a
/// manifest whose every file was missing passed, exit 0, nothing printed).
#[test]
fn a_manifest_from_a_pipe_is_checked_whole() {
    use std::io::Write as _;
    let mut t = TestTree::new();
    for i in 0..300 {
        t = t.file(format!("f{i:03}"), format!("{i}\n").as_bytes());
    }
    let m = tool(
        "sha256sum",
        &[s("--"), s("f000"), s("f001"), s("f002")],
        &t.root(),
    );
    let mut manifest = m.stdout.clone();
    let rest: Vec<String> = (3..300).map(|i| format!("f{i:03}")).collect();
    let mut args = vec![s("--")];
    args.extend(rest.iter().map(|n| s(n)));
    manifest.extend(tool("sha256sum", &args, &t.root()).stdout);
    assert!(manifest.len() > 16 << 10, "more than a buffer's worth");
    for gone in ["f000", "f001", "f150"] {
        fs::remove_file(t.path(gone)).unwrap();
    }
    let root = t.root();
    let mut c = filepipe(&[s("verify"), s("/dev/stdin"), s("--root"), root.as_os_str()]);
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(&manifest).unwrap();
    let out = wait_output(child, TIMEOUT);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.ends_with(": OK")).count(),
        297,
        "{text}"
    );
    for gone in ["f000", "f001", "f150"] {
        assert!(text.contains(&format!("{gone}: MISSING")), "{text}");
    }
}

#[test]
fn gz_tree_results_keep_a_name_with_a_newline_on_one_line() {
    let t = TestTree::new()
        .file("nl\nname", b"x")
        .file("back\\slash", b"y");
    run(filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--op"),
        s("gzip"),
    ]))
    .success();
    let out = run(filepipe(&[s("verify"), t.root().as_os_str()]));
    let text = out.success().stdout();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("nl\\nname.gz: OK"), "{text}");
    assert!(text.contains("back\\\\slash.gz: OK"), "{text}");
    let json = run(filepipe(&[s("verify"), t.root().as_os_str(), s("--json")]));
    let paths: Vec<String> = json
        .success()
        .stdout()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["path"].as_str().map(str::to_owned)
        })
        .collect();
    assert!(
        paths.iter().any(|p| p.ends_with("nl\nname.gz")),
        "{paths:?}"
    );
}

/// The looser forms `sha256sum -c` reads are read alike, GNU's own verdicts the reference:
/// `#` comments, lines indented with spaces or tabs, and the BSD tools' one-character layout
/// (`sha256 -r`: `DIGEST name`, or a tab). As GNU does, the first line decides the layout for
/// the whole manifest: after a two-character line, a one-character line is malformed, and in
/// the one-character layout `DIGEST  x` names ` x`, not `x` (a file renamed with a leading
/// space cannot pass for another). Before, each such line was malformed: a GNU-valid manifest
/// failed.
#[test]
fn verify_reads_the_looser_forms_gnu_reads_as_gnu_reads_them() {
    let t = TestTree::new()
        .file("a", b"alpha\n")
        .file("b c", b"beta\n")
        .file("x", b"ex\n")
        .file(" x", b"space ex\n");
    let hex = |data: &[u8]| {
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(data)?;
                c.wait_with_output()
            })
            .unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    };
    let (a, b, x, sx) = (
        hex(b"alpha\n"),
        hex(b"beta\n"),
        hex(b"ex\n"),
        hex(b"space ex\n"),
    );
    let cases: Vec<(&str, String)> = vec![
        (
            "comments and indents",
            format!("# made by hand\n{a}  a\n  {b}  b c\n\t{x} *x\n#{x}  nothing\n"),
        ),
        (
            "one character",
            format!("{a} a\n{b}\tb c\n{sx}  x\n{x} x\n"),
        ),
        ("two, then one", format!("{a}  a\n{b} b c\n{x}  x\n")),
    ];
    for (what, manifest) in cases {
        fs::write(t.side("m"), &manifest).unwrap();
        let gnu = tool("sha256sum", &[s("-c"), t.side("m").as_os_str()], &t.root());
        let gnu_ok: Vec<String> = String::from_utf8_lossy(&gnu.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(": OK").map(str::to_string))
            .collect();
        let gnu_malformed = String::from_utf8_lossy(&gnu.stderr).contains("improperly formatted");
        assert!(!gnu_ok.is_empty(), "{what}: {gnu:?}");
        let root = t.root();
        let ours = run(filepipe(&[
            s("verify"),
            t.side("m").as_os_str(),
            s("--root"),
            root.as_os_str(),
            s("--json"),
        ]));
        let out = ours.output();
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let summary = lines.last().unwrap();
        let ok: Vec<String> = lines
            .iter()
            .filter(|l| l["status"] == "ok")
            .map(|l| l["path"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ok, gnu_ok, "{what}: {lines:?}");
        assert_eq!(
            summary["malformed"].as_u64().unwrap() > 0,
            gnu_malformed,
            "{what}: {summary} / {gnu:?}"
        );
    }
}

/// Results are printed as files are checked, in manifest order, as `sha256sum -c` prints
/// them: a manifest still being written (a pipe) has its first files' verdicts out before its
/// end. They were all printed at the end of the run, and a manifest of millions of files said
/// nothing for as long as it took.
#[test]
fn results_are_printed_while_the_manifest_is_still_being_read() {
    // More than the lines read to tell the algorithm.
    printed_while_read(&[], 80);
}

/// With `--algo`, no line is read ahead to tell it: the first verdict comes out after the
/// first line. It waited for 64 lines or the manifest's end (review r57b).
#[test]
fn with_algo_the_first_result_is_printed_after_the_first_line() {
    printed_while_read(&[s("--algo"), s("sha256")], 1);
}

/// `verify` (with `extra` arguments) of a 100-file manifest written into a FIFO: `ahead`
/// lines, then a pause until the first verdict is out, then the rest.
fn printed_while_read(extra: &[&OsStr], ahead: usize) {
    use std::io::{BufRead, Write};
    let mut t = TestTree::new();
    for i in 0..100 {
        t = t.file(format!("f{i:03}"), format!("file {i}\n").as_bytes());
    }
    let mut names: Vec<std::ffi::OsString> = (0..100).map(|i| format!("f{i:03}").into()).collect();
    names.sort();
    let args: Vec<&OsStr> = names.iter().map(|n| n.as_os_str()).collect();
    let lines = String::from_utf8(tool("sha256sum", &args, &t.root()).stdout).unwrap();
    let lines: Vec<&str> = lines.lines().collect();
    let fifo = t.side("SUMS.sha256");
    mkfifo(&fifo);
    let root = t.root();
    let mut cmd = filepipe(&[s("verify"), fifo.as_os_str(), s("--root"), root.as_os_str()]);
    let mut child = cmd
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        for line in stdout.lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    let mut writer = fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    // Then a pause: the first verdict must come out while the manifest is not at its end.
    for line in &lines[..ahead] {
        writeln!(writer, "{line}").unwrap();
    }
    writer.flush().unwrap();
    let first = rx.recv_timeout(std::time::Duration::from_secs(60));
    assert_eq!(
        first.as_deref(),
        Ok("f000: OK"),
        "no result before the manifest's end"
    );
    for line in &lines[ahead..] {
        writeln!(writer, "{line}").unwrap();
    }
    drop(writer);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "{status:?} {rest:?}");
    let expected: Vec<String> = (1..100).map(|i| format!("f{i:03}: OK")).collect();
    assert_eq!(rest, expected);
}

/// The paths a `verify --json` run reports added, sorted by their bytes, each escaped as
/// Rust's `b".."` would (`\n`, `\xff`) so a failed comparison reads.
fn added_paths(r: &Run) -> Vec<String> {
    let mut added: Vec<Vec<u8>> = r
        .stdout()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["status"] == "added")
        .map(|l| match l["path_hex"].as_str() {
            Some(hex) => (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect(),
            None => l["path"].as_str().unwrap().as_bytes().to_vec(),
        })
        .collect();
    added.sort();
    added.iter().map(|p| p.escape_ascii().to_string()).collect()
}

/// An incremental batch keeping its state inside the tree (`--state t/.st`), then a verify of
/// its manifest: with `--state t/.st` the state's own files in it are left out; without,
/// its files are added (verify cannot tell a state directory of the user's from a look-alike a
/// writer of the tree made to hide a payload), with a hint on stderr, by name only.
#[test]
fn verify_leaves_out_the_state_directory_named_with_state() {
    // The state directory's name has a newline and a byte that is not UTF-8.
    let state = b"st\nate\xff".as_slice();
    let t = TestTree::new()
        .file("a", b"a\n")
        .file("nl\nname", b"b\n")
        .file(b"raw\xfe", b"c\n");
    let manifest = t.path("SHA256SUMS");
    let state_dir = t.path(state);
    let root = t.root();
    let batch = [
        s("batch"),
        root.as_os_str(),
        s("--op"),
        s("sha256"),
        s("--manifest"),
        manifest.as_os_str(),
        s("--state"),
        state_dir.as_os_str(),
    ];
    run(filepipe(&batch)).success();
    assert!(state_dir.join("filepipe.sqlite").is_file());
    assert!(state_dir.join("filepipe.lock").is_file());
    let verify = |extra: &[&OsStr]| {
        run(filepipe(
            &[&[s("verify"), manifest.as_os_str(), s("--json")], extra].concat(),
        ))
    };
    let named = [s("--state"), state_dir.as_os_str()];
    let r = verify(&named);
    assert_eq!(added_paths(r.success()), Vec::<String>::new());
    assert!(!r.stderr().contains("state directory"), "{}", r.stderr());
    let summary: serde_json::Value =
        serde_json::from_str(r.stdout().lines().last().unwrap()).unwrap();
    assert_eq!(summary["ok"], 3, "{}", r.stdout());
    // Run again (the state read and written again), the same; a file put in the state
    // directory is not one of the state's: added (found by a review: under umask 002 a
    // group member's files there were hidden with it), and so is a directory's.
    run(filepipe(&batch)).success();
    fs::write(state_dir.join("notes"), b"mine\n").unwrap();
    fs::create_dir(state_dir.join("sub")).unwrap();
    fs::write(state_dir.join("sub/filepipe.sqlite"), b"payload\n").unwrap();
    assert_eq!(
        added_paths(verify(&named).code(8)),
        ["st\\nate\\xff/notes", "st\\nate\\xff/sub/filepipe.sqlite"]
    );
    fs::remove_dir_all(state_dir.join("sub")).unwrap();
    verify(&named).code(8);

    // Without --state: added, and one hint, on stderr only.
    let r = verify(&[]);
    assert_eq!(
        added_paths(r.code(8)),
        [
            "st\\nate\\xff/filepipe.lock",
            "st\\nate\\xff/filepipe.sqlite",
            "st\\nate\\xff/notes",
        ]
    );
    let hint =
        "looks like a filepipe state directory: pass --state DIR (or --exclude) if it is yours";
    assert_eq!(r.stderr().matches(hint).count(), 1, "{}", r.stderr());
    assert!(!r.stdout().contains("state directory"), "{}", r.stdout());
    // The text form escapes the name as a manifest would, on one line.
    let text = run(filepipe(&[s("verify"), manifest.as_os_str()]));
    assert!(
        text.code(8)
            .stdout()
            .contains("\\st\\nate\u{fffd}/notes: ADDED"),
        "{}",
        text.stdout()
    );
    assert!(text.stderr().contains(hint), "{}", text.stderr());
    fs::remove_file(state_dir.join("notes")).unwrap();
    // A copy of the state elsewhere in the tree is not the directory named.
    fs::create_dir(t.path("copy")).unwrap();
    for f in ["filepipe.sqlite", "filepipe.lock"] {
        fs::copy(state_dir.join(f), t.path("copy").join(f)).unwrap();
    }
    let r = verify(&named);
    assert_eq!(
        added_paths(r.code(8)),
        ["copy/filepipe.lock", "copy/filepipe.sqlite"]
    );
    // Named through a symlink, it is the same directory.
    std::os::unix::fs::symlink(&state_dir, t.side("st-link")).unwrap();
    let link = t.side("st-link");
    let r = verify(&[s("--state"), link.as_os_str(), s("--exclude"), s("copy")]);
    assert_eq!(added_paths(r.success()), Vec::<String>::new());
    // The root itself (or a directory around it) hides nothing: only what lies under the root.
    let r = verify(&[s("--state"), root.as_os_str()]);
    assert_eq!(added_paths(r.code(8)).len(), 4, "{}", r.stdout());
    // A --state that does not exist, or is not a directory: a usage error, nothing checked.
    for bad in [t.side("nowhere"), t.path("a")] {
        let r = verify(&[s("--state"), bad.as_os_str()]);
        assert!(r.code(2).stderr().contains("--state"), "{}", r.stderr());
        assert_eq!(r.stdout(), "");
    }
    // --state applies to a manifest only.
    let r = run(filepipe(&[
        s("verify"),
        root.as_os_str(),
        s("--state"),
        state_dir.as_os_str(),
    ]));
    r.code(2);
}

/// Found by a review: a fake state directory, made by anyone who may write to the tree (an
/// empty lock, a 512-byte page 1 with the `files` table's text then any payload, and
/// SQLite's side files with their magic then any payload), hid every one of its files from
/// the added check. Nothing in a file's content hides it now.
#[test]
fn a_fake_state_directory_hides_nothing() {
    let t = TestTree::new().file("a", b"a\n");
    let manifest = t.path("SUMS");
    let root = t.root();
    run(filepipe(&[
        s("batch"),
        root.as_os_str(),
        s("--op"),
        s("sha256"),
        s("--manifest"),
        manifest.as_os_str(),
    ]))
    .success();
    let fake = t.path("sub/.st");
    fs::create_dir_all(&fake).unwrap();
    fs::write(fake.join("filepipe.lock"), b"").unwrap();
    let sql = b"CREATE TABLE files (root,op,path,size,mtime_ns,inode,output,digest,status,error,\
                errno,message,attempts,updated,x,PRIMARY KEY (root, op, path)) WITHOUT ROWID";
    let mut page = [b"SQLite format 3\0\x02\x00".as_slice(), &[0; 82], sql].concat();
    page.resize(512, 0);
    let mut payload = b"#!/bin/sh\necho pwned\n".to_vec();
    payload.resize(512 * 100, b'#');
    fs::write(fake.join("filepipe.sqlite"), [page, payload].concat()).unwrap();
    let wal = [
        b"\x37\x7f\x06\x82\0\0\0\0\0\0\x10\0".as_slice(),
        &b"any payload at all, any size\n".repeat(1000),
    ]
    .concat();
    fs::write(fake.join("filepipe.sqlite-wal"), wal).unwrap();
    let journal = [[0u8; 8].as_slice(), &b"another payload\n".repeat(1000)].concat();
    fs::write(fake.join("filepipe.sqlite-journal"), journal).unwrap();
    let r = run(filepipe(&[s("verify"), manifest.as_os_str(), s("--json")]));
    assert_eq!(
        added_paths(r.code(8)),
        [
            "sub/.st/filepipe.lock",
            "sub/.st/filepipe.sqlite",
            "sub/.st/filepipe.sqlite-journal",
            "sub/.st/filepipe.sqlite-wal",
        ]
    );
    assert!(
        r.stderr()
            .contains("sub/.st: looks like a filepipe state directory"),
        "{}",
        r.stderr()
    );
}

/// A watch daemon keeping its state in the tree, running (SQLite's write-ahead log and its
/// index beside the database), named with `--state`: none of its files is added. Its failure
/// log in the tree is: verify cannot tell which log a run was given, and a JSON-lines file of
/// the user's must not go unreported; it is named with `--exclude`.
#[test]
fn verify_leaves_out_a_running_watchs_state_and_is_told_its_failure_log() {
    let t = TestTree::new().file("a", b"a\n").file("b", b"b\n");
    let manifest = t.path("SUMS");
    let state_dir = t.path(".st");
    let log = t.path("failures.jsonl");
    let d = Daemon::ready(
        &t,
        &[
            "--op",
            "sha256",
            "--manifest",
            manifest.to_str().unwrap(),
            "--state",
            state_dir.to_str().unwrap(),
            "--failure-log",
            log.to_str().unwrap(),
        ],
    );
    d.wait_idle(2);
    wait_until(std::time::Duration::from_secs(60), "two lines", || {
        fs::read(&manifest).is_ok_and(|m| m.iter().filter(|&&b| b == b'\n').count() == 2)
    });
    assert!(state_dir.join("filepipe.sqlite-wal").is_file());
    let verify = |extra: &[&OsStr]| {
        run(filepipe(
            &[
                &[
                    s("verify"),
                    manifest.as_os_str(),
                    s("--json"),
                    s("--state"),
                    state_dir.as_os_str(),
                ],
                extra,
            ]
            .concat(),
        ))
    };
    let r = verify(&[]);
    assert_eq!(added_paths(r.code(8)), ["failures.jsonl"]);
    verify(&[s("--exclude"), s("failures.jsonl")]).success();
    d.stop().success();
    verify(&[s("--exclude"), s("failures.jsonl")]).success();
}

/// A batch of several hashes writes a manifest for each, beside the first (`SUMS`,
/// `SUMS.sha512`, `SUMS.blake3`), and leaves them all out of its walk: verifying any one of
/// them reports none of the others added (found by a review: each was, exit 8). Told by all
/// it holds, not by its name: a file named like one that holds anything but the same names'
/// digests is added, and so is one of that name in another directory. A file named `-`,
/// listed `./-` as GNU lists it, took the others for manifests of something else (found by
/// a review: each added, exit 8).
#[test]
fn verify_leaves_out_the_other_manifests_of_a_run_of_several_hashes() {
    // The manifest's name has a newline and a byte that is not UTF-8.
    let t = TestTree::new()
        .file("a", b"a\n")
        .file("nl\nname", b"b\n")
        .file("-", b"c\n");
    let manifest = t.path(b"SU\nMS\xff");
    let root = t.root();
    run(filepipe(&[
        s("batch"),
        root.as_os_str(),
        s("--op"),
        s("sha256,sha512,blake3"),
        s("--manifest"),
        manifest.as_os_str(),
    ]))
    .success();
    let with = |suffix: &str| {
        let mut p = manifest.clone().into_os_string();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    let verify = |m: &std::path::Path| run(filepipe(&[s("verify"), m.as_os_str(), s("--json")]));
    for m in [manifest.clone(), with(".sha512"), with(".blake3")] {
        assert!(m.is_file(), "{m:?}");
        let r = verify(&m);
        assert_eq!(added_paths(r.success()), Vec::<String>::new(), "{m:?}");
    }
    fs::write(with(".sha256"), b"not a manifest\n").unwrap();
    for m in [manifest.clone(), with(".blake3")] {
        let r = verify(&m);
        assert_eq!(added_paths(r.code(8)), ["SU\\nMS\\xff.sha256"], "{m:?}");
    }
    // Nor is a file of the tree left out through a link of that name to it.
    fs::remove_file(with(".sha256")).unwrap();
    fs::copy(with(".blake3"), t.path("mine")).unwrap();
    std::os::unix::fs::symlink("mine", with(".sha256")).unwrap();
    let r = verify(&manifest);
    assert_eq!(added_paths(r.code(8)), ["mine"]);
    // ...nor through a hard link.
    fs::remove_file(with(".sha256")).unwrap();
    fs::hard_link(t.path("mine"), with(".sha256")).unwrap();
    let r = verify(&manifest);
    assert_eq!(added_paths(r.code(8)), ["mine"]);
}

/// Found by a review: a file named as another manifest of the run hid any payload after one
/// manifest line, and a hard link of that name in another directory was hidden too (only the
/// name was compared). All of it must be the listed files' digests, in the manifest's own
/// directory.
#[test]
fn a_file_named_as_another_manifest_hides_no_payload() {
    let t = TestTree::new()
        .file("a", b"a\n")
        .file("b", b"b\n")
        .dir("sub");
    let manifest = t.path("SUMS");
    let root = t.root();
    run(filepipe(&[
        s("batch"),
        root.as_os_str(),
        s("--op"),
        s("sha256,sha512"),
        s("--manifest"),
        manifest.as_os_str(),
    ]))
    .success();
    let sha512 = t.path("SUMS.sha512");
    let good = fs::read(&sha512).unwrap();
    let verify = || run(filepipe(&[s("verify"), manifest.as_os_str(), s("--json")]));
    assert_eq!(added_paths(verify().success()), Vec::<String>::new());
    // A hard link of the real one, of that name, in another directory.
    fs::hard_link(&sha512, t.path("sub/SUMS.sha512")).unwrap();
    assert_eq!(added_paths(verify().code(8)), ["sub/SUMS.sha512"]);
    fs::remove_file(t.path("sub/SUMS.sha512")).unwrap();
    let first_line = good
        .split_inclusive(|&b| b == b'\n')
        .next()
        .unwrap()
        .to_vec();
    let blake = t.path("SUMS.blake3");
    let payloads: [(&str, Vec<u8>); 8] = [
        (
            "one line, then a payload",
            [first_line.clone(), b"#!/bin/sh\necho pwned\n".to_vec()].concat(),
        ),
        (
            "the whole manifest, then a comment",
            [good.clone(), b"# echo pwned\n".to_vec()].concat(),
        ),
        (
            "the whole manifest, then a blank line",
            [good.clone(), b"\n".to_vec()].concat(),
        ),
        ("one name only", first_line.clone()),
        ("a name twice", [good.clone(), first_line.clone()].concat()),
        (
            "indented lines",
            good.split_inclusive(|&b| b == b'\n')
                .flat_map(|l| [b"\t".as_slice(), l].concat())
                .collect(),
        ),
        // Names padded to carry anything (found by a review: `./` 3,000 times over): the
        // same files, not as filepipe writes them.
        (
            "names padded with ./",
            good.split_inclusive(|&b| b == b'\n')
                .flat_map(|l| {
                    let at = l.windows(2).position(|w| w == b"  ").unwrap() + 2;
                    [&l[..at], "./".repeat(50).as_bytes(), &l[at..]].concat()
                })
                .collect(),
        ),
        (
            "names through sub/..",
            good.split_inclusive(|&b| b == b'\n')
                .flat_map(|l| {
                    let at = l.windows(2).position(|w| w == b"  ").unwrap() + 2;
                    [&l[..at], b"sub/../".as_slice(), &l[at..]].concat()
                })
                .collect(),
        ),
    ];
    for (what, bytes) in payloads {
        fs::write(&sha512, &bytes).unwrap();
        assert_eq!(added_paths(verify().code(8)), ["SUMS.sha512"], "{what}");
        // Under a name of another hash of the run, the same.
        fs::rename(&sha512, &blake).unwrap();
        assert_eq!(added_paths(verify().code(8)), ["SUMS.blake3"], "{what}");
        fs::remove_file(&blake).unwrap();
    }
    // Digests of another hash under this hash's name.
    fs::write(&sha512, fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(added_paths(verify().code(8)), ["SUMS.sha512"]);
    fs::write(&sha512, &good).unwrap();
    assert_eq!(added_paths(verify().success()), Vec::<String>::new());
}

/// A directory the walk cannot read is reported whatever stops a second look at it: under a
/// low open-file limit, that look failed too, the directory was taken for absent, and verify
/// passed (exit 0) with its files never checked (found by a review, under `ulimit -n 12`).
#[test]
fn a_directory_unreadable_for_want_of_descriptors_is_reported_not_passed() {
    if !have_prlimit() {
        return;
    }
    let deep = "x/".repeat(18);
    let mut t = TestTree::new();
    for d in 1..=3 {
        t = t
            .file(format!("d{d}/{deep}f"), b"deep")
            .file(format!("d{d}/g"), b"top");
    }
    run(filepipe(&[
        s("batch"),
        t.root().as_os_str(),
        s("--op"),
        s("gzip"),
    ]))
    .success();
    // Without the limit, all six pass.
    let all = run(filepipe(&[s("verify"), t.root().as_os_str()]));
    assert_eq!(all.code(0).stdout().matches(": OK").count(), 6);
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=12", "--"]).arg(bin()).args([
        s("verify"),
        s("--jobs"),
        s("2"),
        t.root().as_os_str(),
    ]);
    let out = run(cmd);
    let text = format!("{}{}", out.stdout(), out.stderr());
    assert!(text.contains("cannot read this directory"), "{text}");
    out.code(1);
}

/// A name that ends as a directory's (`f/`, `f//.`) naming a regular file is not that file:
/// `sha256sum -c` fails it ("Not a directory"), and so does verify. It passed, read as `f`
/// (the path's components drop the slash: found by review r57).
#[test]
fn a_name_ending_in_a_slash_is_not_the_file_before_it() {
    let t = TestTree::new().file("f", b"the file\n");
    let root = t.root();
    let sums = run(filepipe(&[
        s("batch"),
        root.as_os_str(),
        s("--op"),
        s("sha256"),
    ]));
    let line = String::from_utf8(sums.success().output().stdout.clone()).unwrap();
    let digest = line.split_whitespace().next().unwrap();
    for name in ["f/", "f//.", "./f/"] {
        fs::write(t.side("m"), format!("{digest}  {name}\n")).unwrap();
        let gnu = tool("sha256sum", &[s("-c"), t.side("m").as_os_str()], &root);
        assert!(!gnu.status.success(), "{name}: {gnu:?}");
        let ours = run(filepipe(&[
            s("verify"),
            t.side("m").as_os_str(),
            s("--root"),
            root.as_os_str(),
            s("--json"),
        ]));
        // And `f`, listed by no name of its own, is added (exit 1 + 8).
        let out = ours.code(9).stdout();
        assert!(out.contains("not a directory"), "{name}: {out}");
        assert!(out.contains(r#""added":1"#), "{name}: {out}");
    }
    fs::write(t.side("m"), format!("{digest}  ./f\n")).unwrap();
    run(filepipe(&[
        s("verify"),
        t.side("m").as_os_str(),
        s("--root"),
        root.as_os_str(),
    ]))
    .success();
}
