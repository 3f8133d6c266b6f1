//! `--durability group` with much of another program's data waiting to be written: a group is
//! flushed file by file, not by a syncfs that would wait for all of it (issue 18). Alone in its
//! test binary: the dirty data would change how the other durability tests flush.

mod common;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use common::strace::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

fn p(x: &Path) -> &OsStr {
    x.as_os_str()
}

#[test]
fn with_much_foreign_dirty_data_a_group_is_flushed_file_by_file() {
    if !have_strace() {
        eprintln!("SKIPPED: no strace to see which flush was used");
        return;
    }
    // On file systems where a group is otherwise flushed by syncfs: an ext4 with a journal,
    // and one without.
    for (what, options) in [
        ("a journal", &[][..]),
        ("no journal", &["-O", "^has_journal"][..]),
    ] {
        let fs = match JournaledFs::with(options) {
            Ok(fs) => fs,
            Err(why) => {
                eprintln!("SKIPPED on an ext4 with {what}: {why}");
                continue;
            }
        };
        let t = tree_in(Some(&fs.path()), 60);
        // 256 MiB written and not flushed: a syncfs would wait for all of it (another
        // program's data, as far as the run is concerned).
        let big_dir = tempfile::tempdir().unwrap();
        let big = big_dir.path().join("big.bin");
        {
            use std::io::Write;
            let mut f = fs::File::create(&big).unwrap();
            let chunk = vec![0x5au8; 1 << 20];
            for _ in 0..256 {
                f.write_all(&chunk).unwrap();
            }
        }
        let dirty_mib = dirty_mib();
        if dirty_mib < 128 {
            let _ = fs::remove_file(&big);
            eprintln!(
                "SKIPPED on an ext4 with {what}: the kernel wrote the data back already \
                 ({dirty_mib} MiB dirty)"
            );
            continue;
        }
        let root = t.root();
        let args = [s("batch"), p(&root), s("--op"), s("gzip"), s("--json")];
        let (out, calls) = traced(&args, &[], None);
        let _ = fs::remove_file(&big);
        assert_eq!(out.code(0).summary()["done"], 60, "{what}");
        assert_eq!(check_flush_order(&calls, true), 60, "{what}");
        let syncfs = calls.iter().filter(|c| c.name == "syncfs").count();
        let fsyncs: Vec<&Call> = calls.iter().filter(|c| c.name == "fsync").collect();
        let files_fsynced = fsyncs
            .iter()
            .filter(|c| !Path::new(fd_path(&c.arg(0))).is_dir())
            .count();
        assert!(files_fsynced >= 60, "{what}: {files_fsynced} files fsynced");
        if options.is_empty() {
            assert_eq!(
                syncfs, 0,
                "{what}: {dirty_mib} MiB dirty: no syncfs waits for them"
            );
        } else {
            // Without a journal, one syncfs per group after its files' own fsyncs, to read
            // the metadata write errors no fsync hears of (`check_written`; it waits for
            // other programs' data on the same file system only, not on the one here), and
            // never the two in a row of a group flushed whole.
            assert!(
                syncfs < 60 && check_whole_flushes(&calls) == 0,
                "{what}: {syncfs} syncfs"
            );
        }
        if options.is_empty() {
            // With a journal, a group's fsyncs are issued together: from more threads than
            // the two that publish.
            let threads: HashSet<&str> = fsyncs
                .iter()
                .filter(|c| !Path::new(fd_path(&c.arg(0))).is_dir())
                .map(|c| c.pid.as_str())
                .collect();
            assert!(threads.len() > 2, "{what}: fsyncs from {threads:?}");
        } else {
            // Without, one at a time: a failed write of an inode table's block is reported
            // only to the fsync that wrote it, and must be counted before another file's
            // fsync can take that block for written.
            for pair in fsyncs.windows(2) {
                assert!(
                    pair[1].start > pair[0].end,
                    "{what}: fsyncs side by side: {:?}",
                    pair
                );
            }
        }
    }
}
