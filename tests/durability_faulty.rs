//! `--durability` on a disk that fails some metadata writes (issue 18): every file reported
//! done must be whole under its name on the disk. In a test binary of its own: its tests
//! mount loop devices over small tmpfs mounts, and one writes the failing blocks behind
//! filepipe's back with `sync` on purpose (as the kernel's write-back does), which no other
//! test should meet.

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

/// An ext4 without a journal on a loop image in a small tmpfs, unmounted (both) when dropped.
struct FaultyDisk {
    dir: tempfile::TempDir,
}

impl FaultyDisk {
    fn small(&self) -> std::path::PathBuf {
        self.dir.path().join("small")
    }
    fn mnt(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }
    fn image(&self) -> std::path::PathBuf {
        self.small().join("fs.img")
    }
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.mnt())
            .status();
        let _ = std::process::Command::new("umount")
            .arg(self.small())
            .status();
    }
}

fn sh(cmd: &str, args: &[&OsStr]) -> std::process::Output {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    out
}

impl FaultyDisk {
    /// An ext4 without a journal, 1 KiB blocks, on a loop image in a 300 MiB tmpfs, mounted at
    /// `mnt()`; every block of the image backed, so that only the holes `fail_inode_writes`
    /// punches fail.
    fn new() -> FaultyDisk {
        let d = FaultyDisk {
            dir: tempfile::tempdir().unwrap(),
        };
        fs::create_dir(d.small()).unwrap();
        fs::create_dir(d.mnt()).unwrap();
        let size = [s("-t"), s("tmpfs"), s("-o"), s("size=300M"), s("tmpfs")];
        sh("mount", &[&size[..], &[p(&d.small())]].concat());
        let img = d.image();
        fs::File::create(&img).unwrap().set_len(250 << 20).unwrap();
        let mkfs = [s("-q"), s("-F"), s("-b"), s("1024"), s("-N"), s("50000")];
        let opts = [
            s("-O"),
            s("^has_journal"),
            s("-E"),
            s("lazy_itable_init=0,nodiscard"),
        ];
        sh("mkfs.ext4", &[&mkfs[..], &opts[..], &[p(&img)]].concat());
        sh("fallocate", &[s("-l"), s("250M"), p(&img)]);
        sh("mount", &[s("-o"), s("loop"), p(&img), p(&d.mnt())]);
        d.no_merges();
        d
    }

    /// Keeps the loop device from merging writes, so that each write request is one block.
    /// Why: the loop driver completes a write its backing file took only in part as a success
    /// (`lo_complete_rq` retries short reads only), so one request merged from blocks on both
    /// sides of a hole's edge (the last good inode-table block and the first failing one, both
    /// dirty) wrote the good block, dropped the rest, and reported success: a disk that lies,
    /// which no program can catch. It made `--durability group` look unsound here: a run under
    /// load reported 300 files done, 198 of them never on the disk, with no write error in the
    /// kernel's block trace at all (the request `790 + 102` sectors completed with status 0).
    /// A one-block request is either wholly backed or wholly in a hole, and fails as a real
    /// disk's write does.
    fn no_merges(&self) {
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mnt = self.mnt();
        let source = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let sep = f.iter().position(|x| *x == "-")?;
                (Path::new(f.get(4)?) == mnt).then(|| f.get(sep + 2).map(|s| s.to_string()))?
            })
            .expect("the loop device under the mount point");
        let dev = Path::new(&source).file_name().unwrap().to_owned();
        let knob = Path::new("/sys/block").join(dev).join("queue/nomerges");
        fs::write(&knob, "2").unwrap();
        assert_eq!(fs::read_to_string(&knob).unwrap().trim(), "2", "{knob:?}");
    }

    /// Makes the disk fail every write to each group's inode-table blocks past the first `ok`
    /// inodes after the last one in use now (the image's blocks there become holes in a full
    /// tmpfs: the loop device's write gets ENOSPC, ext4 an I/O error); every other write
    /// succeeds.
    fn fail_inode_writes(&self, ok: u64) {
        assert!(std::process::Command::new("sync")
            .status()
            .unwrap()
            .success());
        let inos: Vec<u64> = walkdir::WalkDir::new(self.mnt())
            .into_iter()
            .map(|e| {
                use std::os::unix::fs::MetadataExt;
                e.unwrap().metadata().unwrap().ino()
            })
            .collect();
        let img = self.image();
        let dump = String::from_utf8(sh("dumpe2fs", &[p(&img)]).stdout).unwrap();
        let per_group: u64 = dump
            .lines()
            .find_map(|l| l.strip_prefix("Inodes per group:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("inodes per group in dumpe2fs");
        let tables: Vec<(u64, u64)> = dump
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Inode table at "))
            .filter_map(|r| {
                let r = r.split_whitespace().next()?;
                let (a, b) = r.split_once('-')?;
                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            })
            .collect();
        assert!(!tables.is_empty(), "no inode table in dumpe2fs");
        for (g, &(start, end)) in tables.iter().enumerate() {
            let g = g as u64;
            let used = inos
                .iter()
                .filter(|&&i| (i - 1) / per_group == g)
                .map(|&i| (i - 1) % per_group + 1)
                .max()
                .unwrap_or(0);
            // 256-byte inodes, 1 KiB blocks: four to a block. Holes from the block of inode
            // used + ok on (whole 4 KiB pages of the tmpfs).
            let index = used + ok;
            let first = ((start + index / 4) * 1024).div_ceil(4096) * 4096;
            let last = (end + 1) * 1024 / 4096 * 4096;
            if first < last {
                let (at, len) = (first.to_string(), (last - first).to_string());
                sh(
                    "fallocate",
                    &[s("-p"), s("-o"), s(&at), s("-l"), s(&len), p(&img)],
                );
            }
        }
        use std::io::Write;
        let mut fill = fs::File::create(self.small().join("fill")).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while fill.write_all(&chunk).is_ok() {}
    }

    /// The disk as filepipe left it, as after a crash: a copy of the image, repaired by
    /// e2fsck and mounted read-only at the path returned (unmounted when the guard drops).
    fn after_a_crash(&self) -> CrashCopy {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("crash.img");
        fs::copy(self.image(), &copy).unwrap();
        // The copy is taken while the kernel may still be writing the image back, as a crash
        // would find it, so a block can be torn. e2fsck fixes some such damage only on a
        // second pass: a root directory block whose checksum it fixed in pass 2 still failed
        // its own check in pass 3, and the run ended "still has errors" (exit 4; seen once in
        // CI). Running it again until it is clean is what an operator does.
        let mut runs = Vec::new();
        loop {
            let fsck = std::process::Command::new("e2fsck")
                .args(["-f", "-y"])
                .arg(&copy)
                .output()
                .unwrap();
            let clean = fsck.status.code().unwrap_or(8) < 4;
            runs.push(fsck);
            if clean {
                break;
            }
            assert!(runs.len() < 3, "e2fsck never left the copy clean: {runs:?}");
        }
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        sh("mount", &[s("-o"), s("loop,ro"), p(&copy), p(&mnt)]);
        CrashCopy { dir, mnt }
    }
}

/// A crash image mounted read-only (see `FaultyDisk::after_a_crash`).
struct CrashCopy {
    #[allow(dead_code)]
    dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

impl Drop for CrashCopy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

/// Runs `filepipe ARGS`, with `eager` the kernel's write-back made eager meanwhile: `sync`
/// writes the inode-table blocks (and fails) behind filepipe's back while it runs, as the
/// kernel does early when much data is waiting (a build's, in CI). A file's own `fsync` then
/// finds its inode's block written and succeeds; `sync` leaves the error in the block
/// device's flag for a `syncfs` to read.
fn run_with_write_back(args: &[&OsStr], eager: bool) -> Run {
    let stop = std::sync::atomic::AtomicBool::new(!eager);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rustix::fs::sync();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        let out = run(filepipe(args));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        out
    })
}

/// The bytes of the 300 files of a `tree_in` at `root`, in order (`d{i % 3}/f{i}.h`).
fn originals(root: &Path) -> Vec<Vec<u8>> {
    (0..300u64)
        .map(|i| fs::read(root.join(format!("d{}/f{i}.h", i % 3))).unwrap())
        .collect()
}

/// One run of `--durability MODE` over 300 files on an ext4 without a journal whose disk
/// fails every write to the inode-table blocks past the first `ok` new inodes (see
/// `FaultyDisk::fail_inode_writes`). Returns (files reported done, those of them whose output
/// is not whole under its name on the disk), the disk read after e2fsck.
fn run_on_a_disk_failing_inode_writes(mode: &str, ok: u64, eager: bool) -> (u64, Vec<String>) {
    let d = FaultyDisk::new();
    let t = tree_in(Some(&d.mnt()), 300);
    let root = t.root();
    let originals = originals(&root);
    d.fail_inode_writes(ok);
    let log = t.side("failures.jsonl");
    let args = [
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--failure-log"),
        p(&log),
        s("--durability"),
        s(mode),
        s("--json"),
    ];
    let summary = run_with_write_back(&args, eager).summary();
    let failed: HashSet<String> = failure_log(&log)
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect();
    assert!(!failed.is_empty(), "no write failed: {summary}");
    let crash = d.after_a_crash();
    let rel_root = root.strip_prefix(d.mnt()).unwrap();
    let mut done = 0;
    let mut lost = Vec::new();
    for (i, original) in originals.iter().enumerate() {
        let rel = format!("d{}/f{i}.h", i % 3);
        if failed.contains(&rel) {
            continue;
        }
        done += 1;
        let back = std::process::Command::new("gunzip")
            .arg("-c")
            .arg(crash.mnt.join(rel_root).join(format!("{rel}.gz")))
            .output()
            .unwrap();
        if !back.status.success() || back.stdout != *original {
            lost.push(rel);
        }
    }
    assert_eq!(summary["done"], done, "{summary}");
    (done, lost)
}

/// Runs each of `modes` on a fresh failing disk once per entry of `eager` (see
/// `run_on_a_disk_failing_inode_writes`): every file reported done must be whole under its
/// name. A run may fail every file (the first flush can meet the error before any is done);
/// how many were done is printed.
fn every_done_file_is_on_the_disk(modes: &[&str], eager: &[bool], ok: u64) {
    for mode in modes {
        let mut runs = Vec::new();
        for &eager in eager {
            let (done, lost) = run_on_a_disk_failing_inode_writes(mode, ok, eager);
            assert!(
                lost.is_empty(),
                "--durability {mode} (eager write-back: {eager}): {} of {done} files reported \
                 done are not whole under their names on the disk: {:?}... (earlier runs: \
                 {runs:?})",
                lost.len(),
                &lost[..lost.len().min(5)]
            );
            runs.push(done);
        }
        eprintln!("--durability {mode}: files done per run {runs:?}");
    }
}

/// A disk that fails some metadata writes (the inode table past the first 100 new inodes) and
/// none of the data, its blocks written behind filepipe's back while it runs. Several outputs
/// share an inode-table block; without a journal, a file's own `fsync` finds the block
/// written (by the kernel's write-back, or here `sync`) and succeeds though the write failed,
/// and only a `syncfs` reads the error. The first 200 new inodes are good, so that files are
/// done before the trouble starts. Before the check of each group (`check_written`), every
/// run of this test failed: 9 to 75 of the files reported done were not on the disk, or the
/// errors went unseen altogether (300 done, none failed).
#[test]
fn with_eager_write_back_no_file_flushed_alone_is_reported_done_off_a_failing_disk() {
    if !is_root() {
        eprintln!("SKIPPED: not root: cannot mount a file system");
        return;
    }
    every_done_file_is_on_the_disk(&["file"], &[true, true, true], 200);
}

/// The same disk, each mode, with and without the eager write-back. Whatever the mode, every
/// file reported done must be whole under its name: an error a flush reports fails every
/// output in the making there. (Once `#[ignore]`d: `group` seemed to lose files about once in
/// 60 runs under load, which was the loop device's doing; see `FaultyDisk::no_merges`.)
#[test]
fn without_a_journal_a_failed_inode_table_write_never_leaves_a_file_reported_done_off_the_disk() {
    if !is_root() {
        eprintln!("SKIPPED: not root: cannot mount a file system");
        return;
    }
    every_done_file_is_on_the_disk(&["file", "group"], &[false, true, false, true], 100);
}

/// `--move-source DIR` with DIR on an ext4 without a journal whose inode tables fail past the
/// first `ok` new inodes, the tree on another file system, so that each input is copied
/// across, flushed, and only then unlinked (`aside::copy_across`). Returns (inputs gone from
/// the tree, those of them not whole at DIR/rel on the disk after e2fsck).
fn move_across_onto_a_failing_disk(ok: u64, eager: bool) -> (usize, Vec<String>) {
    let d = FaultyDisk::new();
    let dest = d.mnt().join("done");
    for i in 0..3 {
        fs::create_dir_all(dest.join(format!("d{i}"))).unwrap();
    }
    let t = tree_in(None, 300);
    let root = t.root();
    let originals = originals(&root);
    d.fail_inode_writes(ok);
    let log = t.side("failures.jsonl");
    let args = [
        s("batch"),
        p(&root),
        s("--op"),
        s("gzip"),
        s("--failure-log"),
        p(&log),
        s("--move-source"),
        p(&dest),
        s("--json"),
    ];
    let _ = run_with_write_back(&args, eager);
    let crash = d.after_a_crash();
    let mut gone = 0;
    let mut lost = Vec::new();
    for (i, original) in originals.iter().enumerate() {
        let rel = format!("d{}/f{i}.h", i % 3);
        if root.join(&rel).exists() {
            continue;
        }
        gone += 1;
        match fs::read(crash.mnt.join("done").join(&rel)) {
            Ok(b) if b == *original => {}
            _ => lost.push(rel),
        }
    }
    (gone, lost)
}

/// An input moved to another file system goes only once its copy is on the disk: on a disk
/// failing inode-table writes without a journal, a copy's own `fsync`s succeed once the
/// write-back has written (and failed) its inode's block, and the input was removed though
/// its copy never reached the disk (found by a hostile review: 15 of 65 and 18 of 68 inputs
/// lost with the eager write-back, 3 of 53 without). The input is the only copy with
/// `--move-failed` too, which takes the same path.
#[test]
fn an_input_moved_across_is_removed_only_once_its_copy_is_on_a_failing_disk() {
    if !is_root() {
        eprintln!("SKIPPED: not root: cannot mount a file system");
        return;
    }
    let mut runs = Vec::new();
    for eager in [true, false, true] {
        let (gone, lost) = move_across_onto_a_failing_disk(40, eager);
        assert!(
            lost.is_empty(),
            "eager write-back {eager}: {} of {gone} inputs moved are not whole in the move \
             directory on the disk: {:?}... (earlier runs: {runs:?})",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        runs.push(gone);
    }
    eprintln!("inputs moved per run {runs:?}");
}
