//! `--durability`: the order of flushes and names, read from the system calls of the real binary
//! (strace), and what a kill between a group's data flush and its names leaves (issue 18).
//!
//! The invariants: nothing appears under a final name before its bytes are flushed (by the
//! file's own fsync or a syncfs of its file system, begun after its last write and finished
//! before the name is given), and every name given is flushed before the run ends. `none`
//! flushes nothing at all.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use common::strace::*;
use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

fn p(x: &Path) -> &OsStr {
    x.as_os_str()
}

#[test]
fn every_output_is_named_only_after_its_data_is_flushed_and_its_name_is_flushed_after() {
    if !have_strace() {
        eprintln!("SKIPPED: no strace to watch the order of flushes and names");
        return;
    }
    for (mode, temps) in [
        ("group", "anonymous"),
        ("file", "anonymous"),
        ("group", "named"),
    ] {
        let t = tree(60);
        let root = t.root();
        let env: &[(&str, &str)] = if temps == "named" {
            &[("FILEPIPE_TEMPS", "named")]
        } else {
            &[]
        };
        let args = [
            s("batch"),
            p(&root),
            s("--op"),
            s("gzip"),
            s("--durability"),
            s(mode),
            s("--json"),
        ];
        write_out_dirty_data(&root);
        let (out, calls) = traced(&args, env, None);
        let summary = summary_of(&out, 0);
        assert_eq!(summary["done"], 60, "{mode}, {temps} temps: {summary}");
        let checked = check_flush_order(&calls, true);
        assert_eq!(
            checked, 60,
            "{mode}, {temps} temps: every output was published"
        );
        let n = flushes(&calls);
        let syncfs = calls.iter().filter(|c| c.name == "syncfs").count();
        match mode {
            // Each file's own fsync (and one per directory and group), never a syncfs.
            "file" => assert!(syncfs == 0 && n > 60, "file: {n} flushes, {syncfs} syncfs"),
            // A handful per group: far fewer than files.
            _ => assert!(syncfs > 0 && n < 60, "group: {n} flushes for 60 files"),
        }
        for i in 0..60u64 {
            let rel = format!("d{}/f{i}.h", i % 3);
            let gz = root.join(format!("{rel}.gz"));
            assert!(tool("gzip", &[s("-t"), p(&gz)], t.dir.path())
                .status
                .success());
        }
    }
}

#[test]
fn durability_none_flushes_nothing_and_still_publishes_whole_outputs() {
    if !have_strace() {
        eprintln!("SKIPPED: no strace to count the flushes");
        return;
    }
    let t = tree(30);
    let root = t.root();
    let args = [
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--durability"),
        s("none"),
        s("--json"),
    ];
    let (out, calls) = traced(&args, &[], None);
    assert_eq!(summary_of(&out, 0)["done"], 30);
    assert_eq!(
        flushes(&calls),
        0,
        "no fsync, fdatasync or syncfs with none"
    );
    assert_eq!(publishes(&calls).len(), 30);
    assert!(temps_under(t.dir.path()).is_empty());
    for i in 0..30u64 {
        let gz = root.join(format!("d{}/f{i}.h.gz", i % 3));
        let back = tool("gunzip", &[s("-c"), p(&gz)], t.dir.path());
        assert_eq!(
            back.stdout,
            fs::read(root.join(format!("d{}/f{i}.h", i % 3))).unwrap()
        );
    }
}

#[test]
fn a_kill_between_the_data_flush_and_the_names_leaves_no_output_and_a_rerun_finishes() {
    if !have_strace() {
        eprintln!("SKIPPED: no strace to kill the run between its flush and its names");
        return;
    }
    for temps in ["anonymous", "named"] {
        let t = tree(40);
        let root = t.root();
        let args = [s("batch"), p(&root), s("--op"), s("gzip"), s("--json")];
        let env: &[(&str, &str)] = if temps == "named" {
            &[("FILEPIPE_TEMPS", "named")]
        } else {
            &[]
        };
        // Killed at its first fsync: only publishers call it, and in a group, after the
        // syncfs that wrote the group's data and before any name (it flushes the disk's
        // cache; a process kill leaves the page cache as it is, so where the data is makes no
        // difference to what the next run finds). strace counts `when` per thread; every
        // thread's first fsync is after a syncfs.
        write_out_dirty_data(&root);
        let (killed, calls) = traced(&args, env, Some("inject=fsync:signal=SIGKILL:when=1"));
        assert_ne!(killed.status.code(), Some(0), "{temps}: not killed");
        let kill_at = calls
            .iter()
            .find(|c| c.name == "fsync")
            .unwrap_or_else(|| panic!("{temps}: no fsync"))
            .start;
        assert!(
            calls
                .iter()
                .any(|c| c.name == "syncfs" && c.ok() && c.end < kill_at),
            "{temps}: the group's data was written by a syncfs before the kill"
        );
        assert!(publishes(&calls).is_empty(), "{temps}: no name was given");
        // Nothing under a final name; named temps left for the next run (marked, unlocked).
        let outputs: Vec<_> = walkdir::WalkDir::new(&root)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".gz"))
            .collect();
        assert!(outputs.is_empty(), "{temps}: {outputs:?}");
        let left = temps_under(t.dir.path());
        if temps == "anonymous" {
            assert!(
                left.is_empty(),
                "anonymous temps vanish with the process: {left:?}"
            );
        } else {
            assert!(!left.is_empty(), "named temps of the killed run are there");
        }
        let summary = summary_of(&run(filepipe(&args)), 0);
        assert_eq!(summary["done"], 40, "{temps}: {summary}");
        assert_eq!(
            summary["stale_temps_removed"].as_u64().unwrap_or(0),
            left.len() as u64,
            "{temps}: {summary}"
        );
        assert!(temps_under(t.dir.path()).is_empty());
        for i in 0..40u64 {
            let rel = format!("d{}/f{i}.h", i % 3);
            let gz = root.join(format!("{rel}.gz"));
            let back = tool("gunzip", &[s("-c"), p(&gz)], t.dir.path());
            assert_eq!(
                back.stdout,
                fs::read(root.join(&rel)).unwrap(),
                "{temps}: {rel}"
            );
        }
    }
}

#[test]
fn remove_source_with_durability_none_is_refused_before_anything_is_touched() {
    let t = tree(3);
    let root = t.root();
    let out = run(filepipe(&[
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--remove-source"),
        s("--durability"),
        s("none"),
    ]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--remove-source needs durable outputs"),
        "{err}"
    );
    assert!(root.join("d0/f0.h").exists());
    assert!(!root.join("d0/f0.h.gz").exists());
}

#[test]
fn the_config_file_sets_durability_and_rejects_a_bad_value_with_its_line() {
    let t = tree(1);
    let conf = t.side("filepipe.toml");
    let write = |durability: &str| {
        fs::write(
            &conf,
            format!(
                "durability = \"{durability}\"\n[[watch]]\npath = \"{}\"\nop = \"gzip\"\n",
                t.root().display()
            ),
        )
        .unwrap();
    };
    for good in ["group", "file", "none"] {
        write(good);
        let out = run(filepipe(&[s("check-config"), p(&conf)]));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{good}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    write("sometimes");
    let out = run(filepipe(&[s("check-config"), p(&conf)]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sometimes") && err.contains("line 1"), "{err}");
}
