//! `--durability`: the order of flushes and names, read from the system calls of the real binary
//! (strace), and what a kill between a group's data flush and its names leaves (issue 18).
//!
//! The invariants: nothing appears under a final name before its bytes are flushed (by the
//! file's own fsync or a syncfs of its file system, begun after its last write and finished
//! before the name is given), and every name given is flushed before the run ends. `none`
//! flushes nothing at all.

mod common;

use std::collections::HashSet;
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

/// Where a test tree goes: the temp directory's file system, a fresh journaled ext4, or a
/// fresh ext4 without a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Tmp,
    Journaled,
    NoJournal,
}

/// The places to run on: always the temp directory's file system; an ext4 with a journal and
/// one without too where they can be mounted (else the test says it skipped that part).
fn places() -> Vec<(Place, Option<JournaledFs>)> {
    let mut places = vec![(Place::Tmp, None)];
    match JournaledFs::new() {
        Ok(fs) => places.push((Place::Journaled, Some(fs))),
        Err(why) => eprintln!("SKIPPED on a journaled ext4: {why}"),
    }
    match JournaledFs::with(&["-O", "^has_journal"]) {
        Ok(fs) => places.push((Place::NoJournal, Some(fs))),
        Err(why) => eprintln!("SKIPPED on an ext4 without a journal: {why}"),
    }
    places
}

/// A fresh ext4 without a journal, or `None` (the test says it skipped) where none can be made.
fn no_journal_fs() -> Option<JournaledFs> {
    JournaledFs::with(&["-O", "^has_journal"])
        .map_err(|why| eprintln!("SKIPPED: no ext4 without a journal: {why}"))
        .ok()
}

fn tree_at(n: u64, fs: &Option<JournaledFs>) -> TestTree {
    match fs {
        Some(fs) => tree_in(Some(&fs.path()), n),
        None => tree(n),
    }
}

/// The environment that asks for named temps (`named`), or none (`anonymous`: whatever the
/// file system allows).
fn temps_env(temps: &str) -> &'static [(&'static str, &'static str)] {
    if temps == "named" {
        &[("FILEPIPE_TEMPS", "named")]
    } else {
        &[]
    }
}

/// Whether a test that needs strace can run; says it skipped if not.
/// The tests here take turns: those that count flushes and groups see a group as what the
/// workers finish while the last one flushes, and with four tests at once on two cores (CI)
/// the workers of one fell behind its publisher, every group one file (66 flushes for 60
/// files, none whole), or no thread made the syncfs a test fails.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// strace's hold of every flush: 100 ms more in each.
const FLUSHES_HELD: &str = "inject=fsync,fdatasync,syncfs:delay_exit=100000";

fn strace_or_skip(what: &str) -> bool {
    let have = have_strace();
    if !have {
        eprintln!("SKIPPED: no strace to {what}");
    }
    have
}

#[test]
fn every_output_is_named_only_after_its_data_is_flushed_and_its_name_is_flushed_after() {
    let _one = one_at_a_time();
    if !strace_or_skip("watch the order of flushes and names") {
        return;
    }
    for (place, fs) in &places() {
        for (mode, temps) in [
            ("group", "anonymous"),
            ("file", "anonymous"),
            ("group", "named"),
        ] {
            let t = tree_at(60, fs);
            let root = t.root();
            let env = temps_env(temps);
            let args = [
                s("batch"),
                p(&root),
                s("--op"),
                s("gzip"),
                s("--durability"),
                s(mode),
                s("--json"),
            ];
            let quiet = write_out_dirty_data();
            // Each flush held 100 ms: a group is what the workers finish while the last one
            // flushes, and in CI slow workers or a fast disk made groups of one to three
            // files, flushed file by file (84 flushes for 60 files; here too with each
            // `openat` held 15 ms). Held, the workers fill groups (14 to 21 flushes).
            let hold = (mode == "group").then_some(FLUSHES_HELD);
            let (out, calls) = traced(&args, env, hold);
            let summary = out.code(0).summary();
            let case = format!("{mode}, {temps} temps, {}", root.display());
            assert_eq!(summary["done"], 60, "{case}: {summary}");
            assert_eq!(check_flush_order(&calls, true), 60, "{case}: all published");
            let n = flushes(&calls);
            let syncfs = calls.iter().filter(|c| c.name == "syncfs").count();
            match (mode, place) {
                // Without a journal, each file's own fsync (and one per directory and group),
                // then one syncfs per group to read the metadata write errors no fsync hears
                // of (see tests/durability_faulty.rs).
                ("file", Place::NoJournal) => assert!(
                    syncfs > 0 && syncfs < 60 && n > 60,
                    "{case}: {n} flushes, {syncfs} syncfs"
                ),
                // With a journal each file's own fsync (and one per directory and group),
                // never a syncfs.
                ("file", Place::Journaled) => assert!(
                    syncfs == 0 && n > 60,
                    "{case}: {n} flushes, {syncfs} syncfs"
                ),
                // /tmp: either of the above.
                ("file", _) => assert!(
                    syncfs < 60 && n > 60,
                    "{case}: {n} flushes, {syncfs} syncfs"
                ),
                // A handful per group: far fewer than files.
                (_, Place::Journaled) if quiet => {
                    assert!(syncfs > 0 && n < 60, "{case}: {n} flushes, {syncfs} syncfs");
                    assert_eq!(check_own_errors_taken(&calls), 60, "{case}");
                }
                // Without a journal, groups of a few files or more by two syncfs in a row
                // (before the names, and after), each file's own write error taken after
                // them; smaller groups file by file.
                (_, Place::NoJournal) if quiet => {
                    let whole = check_whole_flushes(&calls);
                    assert!(
                        whole > 0 && n < 60,
                        "{case}: {whole} by syncfs, {n} flushes, {syncfs} syncfs"
                    );
                    // A group flushed whole needs no temp names: its temps are linked from
                    // anonymous ones, each link's count written by the flush after the names
                    // (checked above).
                    if temps == "anonymous" {
                        let linked = publishes(&calls).iter().filter(|p| p.linked).count();
                        assert!(linked > 0, "{case}: no temp was linked");
                    }
                }
                (_, Place::Journaled | Place::NoJournal) => {
                    eprintln!("SKIPPED the flush count of {case}: over 64 MiB dirty after sync")
                }
                _ => {}
            }
            for i in 0..60u64 {
                let gz = root.join(format!("d{}/f{i}.h.gz", i % 3));
                let ok = tool("gzip", &[s("-t"), p(&gz)], t.dir.path())
                    .status
                    .success();
                assert!(ok, "{case}: {}", gz.display());
            }
        }
    }
}

/// zstd publishes through the very code gzip does (`ops::compress`): one light check that its
/// outputs too are named only once flushed, by group and by file, with both kinds of temps.
/// `--force` over outputs already there, on ext4 without a journal. A replaced output is
/// linked under a temp name after its group's flush, to be renamed over the old one: that link
/// changes its link count, which only its own `fsync` or two `syncfs` in a row write there, and
/// must be flushed before the output is reported (`check_whole_flushes`). Most output names
/// here are directories, which are not replaced, so a group flushed whole before its names
/// has too few names to be flushed whole after them, and each replaced output needs its own
/// flush (found by a review: only a directory's `fsync` and one `syncfs` came after it).
#[test]
fn without_a_journal_a_replaced_output_has_its_link_count_flushed() {
    let _one = one_at_a_time();
    if !strace_or_skip("watch the flushes of replaced outputs") {
        return;
    }
    let Some(fs) = no_journal_fs() else {
        return;
    };
    let mut mixed = 0;
    // A few runs: which groups form depends on timing (the case needs one of 4 files or
    // more flushed whole); each run is checked whole.
    for round in 0..4 {
        let t = tree_in(Some(&fs.path()), 48);
        let root = t.root();
        // An earlier output: gzip of nothing.
        let old = [
            0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        for i in 0..48u64 {
            let gz = root.join(format!("d{}/f{i}.h.gz", i % 3));
            if i % 4 == 1 {
                fs::write(&gz, old).unwrap();
            } else {
                fs::create_dir(&gz).unwrap();
            }
        }
        let args = [
            s("batch"),
            p(&root),
            s("--op"),
            s("gzip"),
            s("--force"),
            s("--json"),
        ];
        let quiet = write_out_dirty_data();
        let (out, calls) = traced(&args, &[], None);
        let summary = out.code(1).summary();
        let case = format!("round {round}, {}", root.display());
        assert_eq!(summary["done"], 12, "{case}: {summary}");
        assert_eq!(summary["failed"], 36, "{case}: {summary}");
        assert_eq!(check_flush_order(&calls, true), 12, "{case}");
        check_whole_flushes(&calls);
        // The case itself: a replaced output whose temp name came after its data's flush.
        mixed += publishes(&calls)
            .iter()
            .filter(|pb| !pb.linked)
            .filter(|pb| {
                let link = pb.first_link.expect("born anonymous");
                calls
                    .iter()
                    .any(|c| c.name == "syncfs" && c.ok() && c.end < link)
            })
            .count();
        for i in (1..48u64).step_by(4) {
            let rel = format!("d{}/f{i}.h", i % 3);
            let back = tool(
                "gunzip",
                &[s("-c"), p(&root.join(format!("{rel}.gz")))],
                t.dir.path(),
            );
            assert_eq!(
                back.stdout,
                fs::read(root.join(&rel)).unwrap(),
                "{case}: {rel}"
            );
        }
        if !quiet {
            eprintln!("{case}: over 64 MiB dirty after sync: groups flushed file by file");
        }
    }
    if mixed == 0 {
        eprintln!("SKIPPED the case itself: no replaced output was named after its group's flush");
    }
}

/// An output found up to date by a run that records its file done (`batch --state` here, and
/// watch mode) is flushed first, its own `fsync` and its directory's: it may be the work of a
/// run killed before its flush (found by a review: a watch restarted after a kill -9 recorded
/// such outputs done, and a crash copy of the disk then had none of them).
#[test]
fn an_output_found_up_to_date_is_flushed_before_a_state_records_it_done() {
    let _one = one_at_a_time();
    if !strace_or_skip("watch the flushes of outputs found up to date") {
        return;
    }
    let t = tree(12);
    let root = t.root();
    // Outputs made and never flushed, as a killed run leaves them.
    let made = [
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--durability"),
        s("none"),
    ];
    run(filepipe(&made)).code(0);
    let state = t.side("state");
    let args = [
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--state"),
        p(&state),
        s("--json"),
    ];
    let (out, calls) = traced(&args, &[], None);
    let summary = out.code(0).summary();
    assert_eq!(summary["failed"], 0, "{summary}");
    // Each output is opened (to be judged, then flushed) and flushed through one of its
    // descriptors before that one is closed. Counted by path: an output flushed through two
    // descriptors (`15</...>` and `16</...>`) is one output (CI counted 13 of 12 so).
    let flushed: HashSet<String> = calls
        .iter()
        .filter(|c| c.name == "openat" && c.ok() && c.arg(1).ends_with(".h.gz\""))
        .filter(|open| {
            let fd = fd_num(&open.ret);
            fsynced_between(&calls, fd, open.end, closed_after(&calls, fd, open.end))
        })
        .map(|open| (open.ret.split_once('<')).map_or(open.ret.clone(), |(_, path)| path.into()))
        .collect();
    assert_eq!(flushed.len(), 12, "outputs flushed: {flushed:?}");
}

#[test]
fn zstd_outputs_take_the_same_durable_publish() {
    let _one = one_at_a_time();
    if !strace_or_skip("watch the order of flushes and names") {
        return;
    }
    let have_zstd = std::process::Command::new("zstd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_zstd {
        eprintln!("SKIPPED: no zstd to check the outputs");
        return;
    }
    for (mode, temps) in [("group", "anonymous"), ("file", "named")] {
        let t = tree(30);
        let root = t.root();
        let args = [
            s("batch"),
            p(&root),
            s("--op"),
            s("zstd"),
            s("--durability"),
            s(mode),
            s("--json"),
        ];
        let (out, calls) = traced(&args, temps_env(temps), None);
        let case = format!("zstd, {mode}, {temps} temps");
        assert_eq!(out.code(0).summary()["done"], 30, "{case}");
        assert_eq!(check_flush_order(&calls, true), 30, "{case}: all published");
        assert!(flushes(&calls) > 0, "{case}");
        assert!(temps_under(t.dir.path()).is_empty(), "{case}");
        for i in 0..30u64 {
            let zst = root.join(format!("d{}/f{i}.h.zst", i % 3));
            let ok = tool("zstd", &[s("-t"), s("-q"), p(&zst)], t.dir.path())
                .status
                .success();
            assert!(ok, "{case}: {}", zst.display());
        }
    }
}

#[test]
fn durability_none_flushes_nothing_and_still_publishes_whole_outputs() {
    let _one = one_at_a_time();
    if !strace_or_skip("count the flushes") {
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
    assert_eq!(out.code(0).summary()["done"], 30);
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

/// Whether a temp left by a killed run carries filepipe's mark (a kill between a named temp's
/// creation and its marking leaves it unmarked: reported, never removed).
fn marked(path: &Path) -> bool {
    let mut buf = [0u8; 128];
    rustix::fs::getxattr(path, "user.filepipe.temp", &mut buf[..]).is_ok()
}

#[test]
fn a_kill_between_the_data_flush_and_the_names_leaves_no_output_and_a_rerun_finishes() {
    let _one = one_at_a_time();
    if !strace_or_skip("kill the run between its flush and its names") {
        return;
    }
    for (place, fs) in &places() {
        for temps in ["anonymous", "named"] {
            let t = tree_at(40, fs);
            let root = t.root();
            let case = format!("{temps} temps, {}", root.display());
            let args = [s("batch"), p(&root), s("--op"), s("gzip"), s("--json")];
            let env = temps_env(temps);
            // Killed at its first sync_file_range: with small files only publishers call it,
            // always before any name. On a journaled file system that is the check of the
            // first temp's write error, after the syncfs that wrote the group's data;
            // elsewhere that too, or the start of the group's write-back, before each file's
            // fsync. strace
            // counts `when` per thread, so whichever publisher gets there first dies, and the
            // process with it.
            let quiet = write_out_dirty_data();
            let inject = "inject=sync_file_range:signal=SIGKILL:when=1";
            let (killed, calls) = traced(&args, env, Some(inject));
            killed.context(format!("{case}: not killed")).failure();
            let kill = calls
                .iter()
                .find(|c| c.name == "sync_file_range")
                .unwrap_or_else(|| panic!("{case}: no sync_file_range"));
            let kill_at = kill.start;
            let syncfs_before: Vec<&Call> = calls
                .iter()
                .filter(|c| c.name == "syncfs" && c.ok() && c.end < kill_at)
                .collect();
            if *place == Place::Journaled && quiet {
                assert!(
                    !syncfs_before.is_empty(),
                    "{case}: the group's data was written by a syncfs before the kill"
                );
            }
            // Without a journal a group of a few files is flushed by two syncfs in a row
            // before each file's own write error is taken (a waiting sync_file_range); a
            // smaller group's write-back is started (not waiting) before each file's fsync.
            if *place == Place::NoJournal && kill.arg(3).contains("SYNC_FILE_RANGE_WAIT_AFTER") {
                assert!(syncfs_before.len() >= 2, "{case}: {syncfs_before:?}");
            }
            assert!(publishes(&calls).is_empty(), "{case}: no name was given");
            let outputs: Vec<_> = walkdir::WalkDir::new(&root)
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".gz"))
                .collect();
            assert!(outputs.is_empty(), "{case}: {outputs:?}");
            let left = temps_under(t.dir.path());
            // Anonymous temps where a link needs no flush of its own (a journal), and without
            // a journal in a group flushed whole (killed at the waiting sync_file_range after
            // its two syncfs: the flush after the links writes their link counts); named ones
            // elsewhere (a group flushed file by file names its temps before their flush).
            let whole = kill.arg(3).contains("SYNC_FILE_RANGE_WAIT_AFTER");
            if temps == "anonymous"
                && (*place == Place::Journaled || *place == Place::NoJournal && whole)
            {
                assert!(left.is_empty(), "{case}: anonymous temps vanish: {left:?}");
            } else if temps == "named" {
                assert!(
                    !left.is_empty(),
                    "{case}: named temps of the killed run are there"
                );
            }
            let marked_left = left.iter().filter(|p| marked(p)).count() as u64;
            let summary = run(filepipe(&args)).code(0).summary();
            assert_eq!(summary["done"], 40, "{case}: {summary}");
            assert_eq!(
                summary["stale_temps_removed"].as_u64().unwrap_or(0),
                marked_left,
                "{case}: {summary}"
            );
            assert!(
                temps_under(t.dir.path()).iter().all(|p| !marked(p)),
                "{case}"
            );
            for i in 0..40u64 {
                let rel = format!("d{}/f{i}.h", i % 3);
                let gz = root.join(format!("{rel}.gz"));
                let back = tool("gunzip", &[s("-c"), p(&gz)], t.dir.path());
                assert_eq!(
                    back.stdout,
                    fs::read(root.join(&rel)).unwrap(),
                    "{case}: {rel}"
                );
            }
        }
    }
}

#[test]
fn remove_source_with_durability_none_is_refused_before_anything_is_touched() {
    let _one = one_at_a_time();
    let t = tree(3);
    let root = t.root();
    let err = run(filepipe(&[
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--remove-source"),
        s("--durability"),
        s("none"),
    ]))
    .code(2)
    .stderr();
    assert!(
        err.contains("--remove-source needs durable outputs"),
        "{err}"
    );
    assert!(root.join("d0/f0.h").exists());
    assert!(!root.join("d0/f0.h.gz").exists());
}

#[test]
fn the_config_file_sets_durability_and_rejects_a_bad_value_with_its_line() {
    let _one = one_at_a_time();
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
        run(filepipe(&[s("check-config"), p(&conf)]))
            .context(good)
            .success();
    }
    write("sometimes");
    let err = run(filepipe(&[s("check-config"), p(&conf)]))
        .code(2)
        .stderr();
    assert!(err.contains("sometimes") && err.contains("line 1"), "{err}");
}

#[test]
fn with_few_descriptors_allowed_groups_shrink_and_every_file_is_done() {
    let _one = one_at_a_time();
    if !have_prlimit() {
        return;
    }
    // 320 descriptors, soft and hard: groups of (320 - 256) / 9 = 7 files, where 256 would
    // hold over 1,500 descriptors between the ready channel and the two publishers. Then the
    // usual shape, soft 1024 and a higher hard limit, with one file per directory: each file
    // of a group holds its own output directory open too.
    let few = tree(600);
    let mut many = TestTree::new();
    for i in 0..1500u64 {
        many = many.file(format!("d{i}/f.h"), &text_bytes(3_000, i));
    }
    for (t, limit) in [(&few, "--nofile=320:320"), (&many, "--nofile=1024:4096")] {
        let root = t.root();
        let mut cmd = std::process::Command::new("prlimit");
        cmd.args([limit, "--"]).arg(bin()).args([
            s("batch"),
            p(&root),
            s("--op"),
            s("gzip"),
            s("--json"),
        ]);
        let summary = run(cmd).code(0).summary();
        let files = if limit.ends_with("320") { 600 } else { 1500 };
        assert_eq!(summary["done"], files, "{limit}: {summary}");
        assert_eq!(summary["failed"], 0, "{limit}: {summary}");
    }
}

#[test]
fn without_a_journal_every_file_reported_done_is_on_the_disk_under_its_name() {
    let _one = one_at_a_time();
    // An ext4 made without a journal, on a loop image. Right after filepipe exits, the image
    // file holds what the file system wrote to its disk: a copy of it, repaired by e2fsck and
    // mounted, is the disk after a power cut at that instant. With anonymous temps synced
    // before they had a name, the inodes' link counts never reached it: e2fsck found every
    // output's inode free, and with --remove-source the inputs were gone too.
    let Some(fs) = no_journal_fs() else {
        return;
    };
    for mode in ["group", "file"] {
        let t = tree_in(Some(&fs.path()), 20);
        let root = t.root();
        let originals: Vec<Vec<u8>> = (0..20u64)
            .map(|i| fs::read(root.join(format!("d{}/f{i}.h", i % 3))).unwrap())
            .collect();
        let args = [
            s("batch"),
            p(&root),
            s("--op"),
            s("gzip"),
            s("--remove-source"),
            s("--durability"),
            s(mode),
            s("--json"),
        ];
        assert_eq!(run(filepipe(&args)).code(0).summary()["done"], 20, "{mode}");
        // The disk as filepipe left it.
        let crash = tempfile::tempdir().unwrap();
        let img = crash.path().join("crash.img");
        fs::copy(fs.image(), &img).unwrap();
        let fsck = std::process::Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            fsck.status.code().unwrap_or(8) < 4,
            "{mode}: e2fsck: {fsck:?}"
        );
        let mnt = crash.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(mounted.success(), "{mode}: mount the crash image");
        let rel_root = root.strip_prefix(fs.path()).unwrap();
        let mut lost = Vec::new();
        for (i, original) in originals.iter().enumerate() {
            let gz = mnt.join(rel_root).join(format!("d{}/f{i}.h.gz", i % 3));
            let back = std::process::Command::new("gunzip")
                .arg("-c")
                .arg(&gz)
                .output()
                .unwrap();
            if !back.status.success() || back.stdout != *original {
                lost.push(gz);
            }
        }
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        assert!(
            lost.is_empty(),
            "{mode}: outputs lost in the crash: {lost:?}\n{fsck:?}"
        );
    }
}

#[test]
fn without_a_journal_a_failed_whole_flush_fails_its_files_and_names_none_of_them() {
    let _one = one_at_a_time();
    if !strace_or_skip("make a syncfs fail") {
        return;
    }
    let Some(fs) = no_journal_fs() else {
        return;
    };
    let t = tree_in(Some(&fs.path()), 200);
    let root = t.root();
    let log = t.side("failures.jsonl");
    let args = [
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--failure-log"),
        p(&log),
        s("--json"),
    ];
    if !write_out_dirty_data() {
        eprintln!("SKIPPED: over 64 MiB dirty after sync: groups would be flushed file by file");
        return;
    }
    // Each thread's first syncfs fails, as one that met a write error of the file system's
    // metadata (a block shared by many files) would: which file it hit cannot be told.
    let (out, calls) = traced(&args, &[], Some("inject=syncfs:error=EIO:when=1"));
    let summary = out.code(1).summary();
    let (done, failed) = (
        summary["done"].as_u64().unwrap(),
        summary["failed"].as_u64().unwrap(),
    );
    assert_eq!(done + failed, 200, "{summary}");
    assert!(
        calls.iter().any(|c| c.name == "syncfs" && !c.ok()),
        "a syncfs was made to fail"
    );
    // At least the group whose flush failed (four files or more) failed, with the reason.
    let records = failure_log(&log);
    assert!(failed >= 4, "{summary}");
    assert_eq!(records.len() as u64, failed);
    for r in &records {
        assert_eq!(r["error"], "io", "{r}");
        assert!(r["message"].as_str().unwrap().contains("no journal"), "{r}");
    }
    // None of them has an output under its name, and no temp is left; every file done is
    // whole (and named only after two syncfs in a row, or its own fsync).
    let failed_paths: HashSet<String> = records
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect();
    for i in 0..200u64 {
        let rel = format!("d{}/f{i}.h", i % 3);
        let gz = root.join(format!("{rel}.gz"));
        if failed_paths.contains(&rel) {
            assert!(!gz.exists(), "{rel} failed but was published");
        } else {
            let back = tool("gunzip", &[s("-c"), p(&gz)], t.dir.path());
            assert_eq!(back.stdout, fs::read(root.join(&rel)).unwrap(), "{rel}");
        }
    }
    assert!(temps_under(&root).is_empty());
    check_whole_flushes(&calls);
    // A rerun finishes the job. (Every file may have failed: the failed flush can serve both
    // publishers' groups at once, and the ones in the making then fail too.)
    let summary = run(filepipe(&args)).code(0).summary();
    assert_eq!(summary["done"], failed, "{summary}");
    assert_eq!(
        summary["skipped_by_reason"]["up-to-date"]
            .as_u64()
            .unwrap_or(0),
        done,
        "{summary}"
    );
}

#[test]
fn without_a_journal_a_file_failed_by_a_whole_flush_after_its_name_is_redone_by_a_rerun() {
    let _one = one_at_a_time();
    // README: when a syncfs without a journal reports an error, "it fails every output still
    // in the making there (created, or named and not yet flushed ...)... A rerun does those
    // files again." A file failed by the flush after the names already has its output under
    // its final name, with its input's mtime: the rerun must not take it for up to date (it
    // was never made durable), or the failure is forgotten and a later crash loses it.
    if !strace_or_skip("make a syncfs after the names fail") {
        return;
    }
    let Some(fs) = no_journal_fs() else {
        return;
    };
    for attempt in 0..6 {
        let t = tree_in(Some(&fs.path()), 200);
        let root = t.root();
        let log = t.side("failures.jsonl");
        let args = [
            s("batch"),
            p(&root),
            s("--op"),
            s("gzip"),
            s("--failure-log"),
            p(&log),
            s("--json"),
        ];
        if !write_out_dirty_data() {
            eprintln!(
                "SKIPPED: over 64 MiB dirty after sync: groups would be flushed file by file"
            );
            return;
        }
        // Each thread's third syncfs fails: a publisher's first group of four or more files is
        // flushed by two before its names and two after, so this is the first after the names.
        let (out, calls) = traced(&args, &[], Some("inject=syncfs:error=EIO:when=3"));
        if !calls.iter().any(|c| c.name == "syncfs" && !c.ok()) {
            // No thread made three: its groups were flushed file by file (a loaded machine),
            // and nothing failed. As below: try again on a fresh tree.
            eprintln!(
                "attempt {attempt}: no third syncfs to fail: {}",
                out.stderr()
            );
            continue;
        }
        let summary = out.code(1).summary();
        let failed = summary["failed"].as_u64().unwrap();
        let records = failure_log(&log);
        assert_eq!(records.len() as u64, failed);
        let failed_paths: HashSet<String> = records
            .iter()
            .map(|r| r["path"].as_str().unwrap().to_string())
            .collect();
        // Files named before the failed flush, and failed by it.
        let failed_at = calls
            .iter()
            .find(|c| c.name == "syncfs" && !c.ok())
            .unwrap()
            .start;
        let named_but_failed: Vec<String> = publishes(&calls)
            .iter()
            .filter(|pb| pb.call.end < failed_at)
            .filter_map(|pb| {
                let dir = Path::new(&pb.dir).strip_prefix(&root).ok()?;
                let name = pb.call.arg(3);
                let rel = dir.join(name.trim_matches('"').strip_suffix(".gz")?);
                let rel = rel.to_string_lossy().into_owned();
                failed_paths.contains(&rel).then_some(rel)
            })
            .collect();
        if named_but_failed.is_empty() {
            // Where each thread's third syncfs falls depends on how the groups formed (a group
            // of fewer than four is flushed file by file): try again on a fresh tree.
            eprintln!("attempt {attempt}: the error did not land after a group's names: {summary}");
            continue;
        }
        // Not left under their names: the failure means no output.
        for rel in &named_but_failed {
            assert!(!root.join(format!("{rel}.gz")).exists(), "{rel}");
        }
        // The rerun, with nothing failing, does every failed file again.
        let summary = run(filepipe(&args)).code(0).summary();
        assert_eq!(
            summary["done"],
            failed,
            "{} files failed after their names were given ({:?}...) were not done again: \
             {summary}",
            named_but_failed.len(),
            &named_but_failed[..named_but_failed.len().min(3)]
        );
        return;
    }
    panic!("in six attempts the injected error never landed after a group's names");
}

#[test]
fn without_a_journal_a_watched_file_failed_after_its_name_is_not_recorded_done_unflushed() {
    let _one = one_at_a_time();
    // Watch mode retries a failed file. One failed by the whole flush after its name (a syncfs
    // error there fails every output named and not yet flushed) still has its output under
    // its final name: the retry must make it durable, not take it for up to date and record
    // it done. Nothing in a fresh tree can be up to date but through that: every output in
    // it is this daemon's.
    if !strace_or_skip("make a watch daemon's syncfs fail") {
        return;
    }
    let Some(fs) = no_journal_fs() else {
        return;
    };
    for attempt in 0..3 {
        if !write_out_dirty_data() {
            eprintln!(
                "SKIPPED: over 64 MiB dirty after sync: groups would be flushed file by file"
            );
            return;
        }
        let t = TestTree::new_in(&fs.path());
        let root = t.root();
        let socket = t.side("notify.sock");
        let notes = Notifications::listen(&socket);
        let log = t.side("strace.log");
        let mut cmd = std::process::Command::new("strace");
        cmd.args(["-f", "-qq", "-o"])
            .arg(&log)
            // Each thread's third syncfs: a publisher's first group of four or more files is
            // flushed by two before its names and two after.
            .args(["-e", "trace=syncfs", "-e", "inject=syncfs:error=EIO:when=3"])
            .arg(bin())
            .args([s("watch"), p(&root), s("--op"), s("gzip"), s("--json")])
            .args([s("--settle"), s("150"), s("--state"), p(&t.side("state"))])
            .env("NOTIFY_SOCKET", &socket)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let daemon = Started::new(cmd);
        wait_until(std::time::Duration::from_secs(60), "READY=1", || {
            notes.has("READY=1")
        });
        // Three batches of 60 files, each moved in at once (a directory renamed into the root),
        // so that the daemon publishes them in groups.
        for b in 0..3u64 {
            let stage = t.dir.path().join(format!("stage{b}"));
            fs::create_dir(&stage).unwrap();
            for i in 0..60u64 {
                fs::write(
                    stage.join(format!("f{i}.h")),
                    text_bytes(2_000 + i as usize * 97, b * 100 + i),
                )
                .unwrap();
            }
            fs::rename(&stage, root.join(format!("b{b}"))).unwrap();
            let outputs = |b: u64| {
                (0..60u64)
                    .filter(|i| root.join(format!("b{b}/f{i}.h.gz")).exists())
                    .count()
            };
            wait_until(
                std::time::Duration::from_secs(90),
                "the batch's outputs",
                || outputs(b) == 60 && notes.last_status().is_some_and(|s| s.idle()),
            );
        }
        // SIGTERM to filepipe (strace's child), then its summary.
        let children =
            fs::read_to_string(format!("/proc/{0}/task/{0}/children", daemon.id())).unwrap();
        let pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let out = daemon.finish(std::time::Duration::from_secs(60));
        let summary = out.summary();
        let calls = parse_strace(&fs::read_to_string(&log).unwrap());
        if !calls.iter().any(|c| c.name == "syncfs" && !c.ok()) {
            // No publisher got to a third syncfs: its groups were flushed file by file (fewer
            // than four files, or much dirty data written meanwhile). Try again.
            eprintln!("attempt {attempt}: no syncfs was made to fail: {summary}");
            continue;
        }
        assert!(summary["retries"].as_u64().unwrap() > 0, "{summary}");
        assert_eq!(
            summary["skipped_by_reason"]["up-to-date"]
                .as_u64()
                .unwrap_or(0),
            0,
            "files failed after their names were taken for up to date by their retry, never \
             flushed, and recorded done: {summary}"
        );
        return;
    }
    eprintln!(
        "SKIPPED: in three attempts no group was flushed by syncfs often enough to make one fail"
    );
}
