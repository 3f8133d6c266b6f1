//! `--durability group` with much of another program's data waiting to be written: a group is
//! flushed file by file, not by a syncfs that would wait for all of it (issue 18). Alone in its
//! test binary: the dirty data would change how the other durability tests flush.

mod common;

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
    // 256 MiB written and not flushed: a syncfs would wait for all of it (another program's
    // data, as far as the run is concerned).
    // On a journaled file system: elsewhere every file is flushed on its own anyway.
    let jfs = match JournaledFs::new() {
        Ok(jfs) => jfs,
        Err(why) => {
            eprintln!("SKIPPED: no journaled ext4 to run on: {why}");
            return;
        }
    };
    let t = tree_in(Some(&jfs.path()), 20);
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
        eprintln!("SKIPPED: the kernel wrote the data back already ({dirty_mib} MiB dirty)");
        return;
    }
    let root = t.root();
    let args = [s("batch"), p(&root), s("--op"), s("gzip"), s("--json")];
    let (out, calls) = traced(&args, &[], None);
    let _ = fs::remove_file(&big);
    assert_eq!(out.code(0).summary()["done"], 20);
    assert_eq!(check_flush_order(&calls, true), 20);
    let syncfs = calls.iter().filter(|c| c.name == "syncfs").count();
    assert_eq!(syncfs, 0, "{dirty_mib} MiB dirty: no syncfs waits for them");
}
