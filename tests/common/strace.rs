//! Reading what the real binary did from `strace -f`: its calls, in the order they happened
//! across threads, and the checks of the order of flushes and names (`--durability`).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::process::Command;

use super::{bin, run, text_bytes, Run, TestTree};

pub fn have_strace() -> bool {
    Command::new("strace").arg("-V").output().is_ok()
}

/// The pids of `pid`'s children (every thread's): the program a `strace` runs.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether a thread of process `pid` is in one of the system calls `numbers` (as
/// /proc/PID/task/TID/syscall gives them): one strace holds there (`delay_enter`) is.
pub fn in_call(pid: u32, numbers: &[&str]) -> bool {
    fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks.flatten().any(|task| {
            fs::read_to_string(task.path().join("syscall")).is_ok_and(|c| {
                c.split_whitespace()
                    .next()
                    .is_some_and(|n| numbers.contains(&n))
            })
        })
    })
}

/// System call numbers, as /proc/PID/task/TID/syscall gives them (`in_call`, `call_on`).
#[cfg(target_arch = "x86_64")]
pub mod nr {
    pub const READ: &str = "0";
    pub const PREAD64: &str = "17";
    pub const FSYNC: &str = "74";
    pub const SYNCFS: &str = "306";
    pub const RENAMEAT2: &str = "316";
}

/// System call numbers, as /proc/PID/task/TID/syscall gives them (`in_call`, `call_on`).
#[cfg(target_arch = "aarch64")]
pub mod nr {
    pub const READ: &str = "63";
    pub const PREAD64: &str = "67";
    pub const FSYNC: &str = "82";
    pub const SYNCFS: &str = "267";
    pub const RENAMEAT2: &str = "276";
}

/// What the descriptor leads to that a thread of process `pid` is in system call `number`
/// on (its first argument, as /proc/PID/task/TID/syscall gives the call): the file or
/// directory a call strace holds is about.
pub fn call_on(pid: u32, number: &str) -> Option<std::path::PathBuf> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find_map(|task| {
            let call = fs::read_to_string(task.path().join("syscall")).ok()?;
            let mut words = call.split_whitespace();
            (words.next()? == number).then_some(())?;
            let fd = u64::from_str_radix(words.next()?.trim_start_matches("0x"), 16).ok()?;
            fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()
        })
}

/// Writes out what the machine has waiting to be written (`sync`): with much of it (the test
/// binaries cargo just linked), `--durability group` flushes each file on its own rather than
/// wait for it all, and a test of how groups are flushed must see groups. False (the test
/// should say it skipped that part) if more than 64 MiB are dirty again right after.
pub fn write_out_dirty_data() -> bool {
    let st = Command::new("sync").status().unwrap();
    assert!(st.success(), "sync");
    dirty_mib() < 64
}

/// A fresh ext4 file system with a journal, on a loop device (its image in a temp directory),
/// unmounted when dropped: where `--durability group` flushes a group with one syncfs. `None`
/// (with the reason) where it cannot be made: not root, no mkfs.ext4, no loop devices.
pub struct JournaledFs {
    dir: tempfile::TempDir,
}

impl JournaledFs {
    pub fn new() -> Result<JournaledFs, String> {
        JournaledFs::with(&[])
    }

    /// An ext4 made with these extra `mkfs.ext4` options (`-O ^has_journal`: without one).
    pub fn with(options: &[&str]) -> Result<JournaledFs, String> {
        if !super::is_root() {
            return Err("not root: cannot mount a file system".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let img = dir.path().join("fs.img");
        fs::File::create(&img)
            .and_then(|f| f.set_len(256 << 20))
            .map_err(|e| e.to_string())?;
        fs::create_dir(dir.path().join("mnt")).map_err(|e| e.to_string())?;
        let ok = |cmd: &mut Command, what: &str| match cmd.output() {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!("{what}: {}", String::from_utf8_lossy(&out.stderr))),
            Err(e) => Err(format!("{what}: {e}")),
        };
        let mut mkfs = Command::new("mkfs.ext4");
        ok(
            mkfs.args(["-q", "-F", "-N", "50000"])
                .args(options)
                .arg(&img),
            "mkfs.ext4",
        )?;
        let mut mount = Command::new("mount");
        let mnt = dir.path().join("mnt");
        ok(
            mount.args(["-o", "loop"]).arg(&img).arg(&mnt),
            "mount -o loop",
        )?;
        Ok(JournaledFs { dir })
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }

    /// The image file: what the file system wrote to its disk, cache included.
    pub fn image(&self) -> std::path::PathBuf {
        self.dir.path().join("fs.img")
    }
}

impl Drop for JournaledFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// MiB waiting to be written, system-wide (Dirty plus Writeback in /proc/meminfo).
pub fn dirty_mib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("Dirty:") || l.starts_with("Writeback:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        / 1024
}

/// A tree of `n` small files in three directories, as a tree of headers, in a temp
/// directory under `parent` (default: the system's).
pub fn tree_in(parent: Option<&std::path::Path>, n: u64) -> TestTree {
    let mut t = match parent {
        Some(parent) => TestTree::new_in(parent),
        None => TestTree::new(),
    };
    for i in 0..n {
        let len = 2_000 + (i as usize * 7_919) % 30_000;
        t = t.file(format!("d{}/f{i}.h", i % 3), &text_bytes(len, i));
    }
    t
}

/// `tree_in` the system's temp directory.
pub fn tree(n: u64) -> TestTree {
    tree_in(None, n)
}

/// One system call of an `strace -f` log: where it began and where it returned (line numbers,
/// which follow the order of events across threads), its name, arguments and result.
#[derive(Debug, Clone)]
pub struct Call {
    /// The thread that made it (strace's pid column).
    pub pid: String,
    pub start: usize,
    pub end: usize,
    pub name: String,
    pub args: String,
    pub ret: String,
}

impl Call {
    /// The `i`th argument, as strace printed it (top-level commas only split).
    pub fn arg(&self, i: usize) -> String {
        let mut depth = 0i32;
        let mut quoted = false;
        let mut escaped = false;
        let mut parts = vec![String::new()];
        for c in self.args.chars() {
            if quoted {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => quoted = false,
                    _ => {}
                }
                parts.last_mut().unwrap().push(c);
                continue;
            }
            match c {
                '"' => quoted = true,
                '{' | '[' | '(' => depth += 1,
                '}' | ']' | ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(String::new());
                    continue;
                }
                _ => {}
            }
            parts.last_mut().unwrap().push(c);
        }
        parts
            .get(i)
            .map(|a| a.trim().to_string())
            .unwrap_or_default()
    }

    pub fn ok(&self) -> bool {
        !self.ret.starts_with('-') && self.ret != "?"
    }
}

/// The number of a descriptor strace printed with `-y` (`8</path/to/dir>`).
pub fn fd_num(arg: &str) -> &str {
    arg.split('<').next().unwrap_or(arg)
}

/// The path of a descriptor strace printed with `-y`.
pub fn fd_path(arg: &str) -> &str {
    arg.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map_or("", |(path, _)| path)
}

/// Parses an `strace -f -o LOG` log (no `-tt`), joining `<unfinished ...>` and `<... resumed>`
/// halves. A call cut short by a kill has the result `?`.
pub fn parse_strace(log: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut open: HashMap<String, (usize, String, String)> = HashMap::new();
    let split_ret = |rest: &str| -> (String, String) {
        // "args)   = ret ...": the last " = " follows the arguments (strace pads before it).
        match rest.rfind(" = ") {
            Some(i) => (
                rest[..i].trim_end().trim_end_matches(')').to_string(),
                rest[i + 3..].split_whitespace().next().unwrap_or("").into(),
            ),
            None => (rest.trim_end_matches(')').to_string(), "?".into()),
        }
    };
    for (n, line) in log.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = resumed.split_once(" resumed>") else {
                continue;
            };
            if let Some((start, name0, args0)) = open.remove(pid) {
                debug_assert_eq!(name, name0);
                let (args, ret) = split_ret(tail);
                calls.push(Call {
                    pid: pid.to_string(),
                    start,
                    end: n,
                    name: name0,
                    args: args0 + &args,
                    ret,
                });
            }
            continue;
        }
        let Some(paren) = rest.find('(') else {
            continue;
        };
        let name = rest[..paren].to_string();
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || name.is_empty() {
            continue;
        }
        let body = &rest[paren + 1..];
        if let Some(args) = body.strip_suffix(" <unfinished ...>") {
            open.insert(pid.to_string(), (n, name, args.to_string()));
            continue;
        }
        let (args, ret) = split_ret(body);
        calls.push(Call {
            pid: pid.to_string(),
            start: n,
            end: n,
            name,
            args,
            ret,
        });
    }
    // Calls never resumed (the process was killed in them).
    for (pid, (start, name, args)) in open {
        calls.push(Call {
            pid,
            start,
            end: usize::MAX,
            name,
            args,
            ret: "?".into(),
        });
    }
    calls.sort_by_key(|c| c.start);
    calls
}

/// The calls the checks need, traced with their string arguments whole.
pub const TRACED: &str =
    "trace=openat,write,fsync,fdatasync,syncfs,sync_file_range,linkat,renameat2,renameat";

/// `filepipe ARGS` under `strace -f`, with `env`; its output and the parsed calls.
pub fn traced(args: &[&OsStr], env: &[(&str, &str)], inject: Option<&str>) -> (Run, Vec<Call>) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-y", "-s", "300", "-o"])
        .arg(log.path())
        .args(["-e", TRACED]);
    if let Some(i) = inject {
        cmd.args(["-e", i]);
    }
    cmd.arg(bin()).args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(cmd);
    let text = fs::read_to_string(log.path()).unwrap();
    (out, parse_strace(&text))
}

/// A name given to an output: the call that gave it, the temp's descriptor (its number), and
/// the directory's path.
pub struct Publish {
    pub call: Call,
    pub fd: String,
    pub dir: String,
    /// A link of an anonymous temp, not a named temp's rename.
    pub linked: bool,
    /// The line where the file got its first name: this link, or the link that gave a temp
    /// born anonymous its temp name (`None` for a temp created by name, linked at birth).
    pub first_link: Option<usize>,
}

pub fn is_temp_name(arg: &str) -> bool {
    arg.starts_with("\".filepipe.") && arg.ends_with(".tmp\"")
}

/// Every publish of an output in `calls`: a link of an anonymous temp (`/proc/self/fd/N`) to a
/// final name, or the rename of a named temp to one. Links to temp names (the probe, a named
/// temp's birth, and the first step of a replacing publish) are not publishes.
pub fn publishes(calls: &[Call]) -> Vec<Publish> {
    // A temp's name: its descriptor, and the line of the link that gave it (if it had one).
    let mut named_fd: HashMap<String, (String, Option<usize>)> = HashMap::new();
    let mut out = Vec::new();
    for c in calls {
        match c.name.as_str() {
            "openat" if c.ok() && is_temp_name(&c.arg(1)) && c.arg(2).contains("O_CREAT") => {
                named_fd.insert(c.arg(1), (fd_num(&c.ret).to_string(), None));
            }
            // Failed (`EXIST`: `--force` tries the link first, then replaces by a rename):
            // not a publish.
            "linkat" if c.ok() && !is_temp_name(&c.arg(3)) => {
                let from = c.arg(1);
                let fd = from
                    .trim_matches('"')
                    .strip_prefix("/proc/self/fd/")
                    .expect("a link of an anonymous temp")
                    .to_string();
                out.push(Publish {
                    call: c.clone(),
                    fd,
                    dir: fd_path(&c.arg(2)).to_string(),
                    linked: true,
                    first_link: Some(c.end),
                });
            }
            // A named temp born anonymous (locked and marked first), then given its temp name.
            "linkat" if c.ok() && c.arg(1).starts_with("\"/proc/self/fd/") => {
                let fd = c.arg(1).trim_matches('"')["/proc/self/fd/".len()..].to_string();
                named_fd.insert(c.arg(3), (fd, Some(c.end)));
            }
            "renameat2" | "renameat"
                if c.ok() && is_temp_name(&c.arg(1)) && !is_temp_name(&c.arg(3)) =>
            {
                let (fd, first_link) = named_fd
                    .get(&c.arg(1))
                    .cloned()
                    .expect("the temp was created");
                out.push(Publish {
                    call: c.clone(),
                    fd,
                    dir: fd_path(&c.arg(2)).to_string(),
                    linked: false,
                    first_link,
                });
            }
            _ => {}
        }
    }
    out
}

/// Checks that each publish in `calls` gave its name only after a flush of its data, and that
/// each name was flushed afterwards (when `finished`: the run was not killed). Returns how many
/// publishes were checked.
pub fn check_flush_order(calls: &[Call], finished: bool) -> usize {
    let pubs = publishes(calls);
    for pb in &pubs {
        let at = pb.call.start;
        let last_write = last_write(calls, pb);
        let flushed = calls.iter().any(|c| {
            let covers = c.name == "syncfs" || c.name == "fsync" && fd_num(&c.arg(0)) == pb.fd;
            covers && c.ok() && c.start > last_write && c.end < at
        });
        assert!(
            flushed,
            "{:?} was given its name without a flush of its data since its last write (line {})",
            pb.call, last_write
        );
        if finished {
            let name_flushed = calls.iter().any(|c| {
                // Any descriptor of the directory: two workers may each hold one.
                let covers =
                    c.name == "syncfs" || c.name == "fsync" && fd_path(&c.arg(0)) == pb.dir;
                covers && c.ok() && c.start > pb.call.end
            });
            assert!(name_flushed, "{:?}: the name was never flushed", pb.call);
        }
    }
    pubs.len()
}

/// The line where the last write to `pb`'s temp before its name ended (since the temp's
/// descriptor was opened).
fn last_write(calls: &[Call], pb: &Publish) -> usize {
    let at = pb.call.start;
    let opened = calls
        .iter()
        .filter(|c| c.name == "openat" && c.ok() && fd_num(&c.ret) == pb.fd && c.end < at)
        .map(|c| c.end)
        .max()
        .expect("the temp's creation is in the log");
    calls
        .iter()
        .filter(|c| c.name == "write" && fd_num(&c.arg(0)) == pb.fd)
        .filter(|c| c.start > opened && c.end < at)
        .map(|c| c.end)
        .max()
        .unwrap_or_else(|| panic!("no write to the temp before {:?}", pb.call))
}

/// The line where descriptor `fd` is next closed after line `after` (`usize::MAX` if never):
/// past it, its number may be another file's.
pub fn closed_after(calls: &[Call], fd: &str, after: usize) -> usize {
    calls
        .iter()
        .filter(|c| c.name == "close" && fd_num(&c.arg(0)) == fd && c.start > after)
        .map(|c| c.start)
        .min()
        .unwrap_or(usize::MAX)
}

/// Whether descriptor `fd` was `fsync`ed successfully between lines `after` and `before`.
pub fn fsynced_between(calls: &[Call], fd: &str, after: usize, before: usize) -> bool {
    calls.iter().any(|c| {
        c.name == "fsync" && fd_num(&c.arg(0)) == fd && c.ok() && c.start > after && c.end < before
    })
}

/// Whether two successful `syncfs` in a row (the second begun after the first returned) ran
/// between lines `after` and `before`: on a file system without a journal, the second one's
/// flush is the one that makes the first's metadata writes durable.
fn two_syncfs_between(calls: &[Call], after: usize, before: usize) -> bool {
    let ends: Vec<usize> = calls
        .iter()
        .filter(|c| c.name == "syncfs" && c.ok() && c.start > after && c.end < before)
        .map(|c| c.end)
        .collect();
    calls.iter().any(|c| {
        c.name == "syncfs"
            && c.ok()
            && c.end < before
            && ends.iter().any(|&first_end| c.start > first_end)
    })
}

/// On a file system without a journal: checks that every publish whose data was not flushed
/// by the temp's own `fsync` had it flushed by two `syncfs` in a row after its last write and
/// before its name, its own write error taken after them (a waiting `sync_file_range` on its
/// own descriptor), and that its name was then flushed by its directory's `fsync` or by two
/// `syncfs` in a row. The link that gave a file born anonymous its first name (the final one,
/// or a temp name) changed its inode's link count, which no directory's `fsync` writes there:
/// two `syncfs` in a row after it, or the file's own `fsync`, must, before the file is closed.
/// Returns how many publishes were flushed by `syncfs`.
pub fn check_whole_flushes(calls: &[Call]) -> usize {
    let mut whole = 0;
    for pb in publishes(calls) {
        let at = pb.call.start;
        if let Some(link) = pb.first_link {
            let closed = closed_after(calls, &pb.fd, pb.call.end);
            let own_after = fsynced_between(calls, &pb.fd, link, closed);
            // Before it is closed too: filepipe holds each output open until it has reported
            // it, and later groups' flushes do not count.
            assert!(
                own_after || two_syncfs_between(calls, link, closed),
                "{:?}: its link count (first link at line {link}) was flushed neither by its \
                 own fsync nor by two syncfs in a row before it was closed",
                pb.call
            );
        }
        let last_write = last_write(calls, &pb);
        let own = calls.iter().any(|c| {
            c.name == "fsync"
                && fd_num(&c.arg(0)) == pb.fd
                && c.ok()
                && c.start > last_write
                && c.end < at
        });
        if own {
            continue;
        }
        assert!(
            two_syncfs_between(calls, last_write, at),
            "{:?}: its data was not flushed by two syncfs in a row before its name",
            pb.call
        );
        let own_error_taken = calls.iter().any(|c| {
            c.name == "sync_file_range"
                && fd_num(&c.arg(0)) == pb.fd
                && c.arg(3).contains("SYNC_FILE_RANGE_WAIT_AFTER")
                && c.ok()
                && c.end < at
                && two_syncfs_between(calls, last_write, c.start)
        });
        assert!(
            own_error_taken,
            "{:?}: its own write error was not taken after the syncfs",
            pb.call
        );
        let dir_fsync = calls.iter().any(|c| {
            c.name == "fsync" && fd_path(&c.arg(0)) == pb.dir && c.ok() && c.start > pb.call.end
        });
        assert!(
            dir_fsync || two_syncfs_between(calls, pb.call.end, usize::MAX),
            "{:?}: its name was not flushed by two syncfs in a row",
            pb.call
        );
        whole += 1;
    }
    whole
}

pub fn flushes(calls: &[Call]) -> usize {
    calls
        .iter()
        .filter(|c| matches!(c.name.as_str(), "fsync" | "fdatasync" | "syncfs"))
        .count()
}

/// For a group flushed with one syncfs: checks that each publish's temp had its own write
/// error taken (`sync_file_range` waiting, on its own descriptor) after a syncfs and before its
/// name. Returns how many were checked.
pub fn check_own_errors_taken(calls: &[Call]) -> usize {
    let pubs = publishes(calls);
    for pb in &pubs {
        let at = pb.call.start;
        let taken = calls.iter().any(|c| {
            c.name == "sync_file_range"
                && fd_num(&c.arg(0)) == pb.fd
                && c.arg(3).contains("SYNC_FILE_RANGE_WAIT_AFTER")
                && c.ok()
                && c.end < at
                && calls
                    .iter()
                    .any(|f| f.name == "syncfs" && f.ok() && f.end < c.start)
        });
        assert!(
            taken,
            "{:?}: its own write error was not taken after the syncfs",
            pb.call
        );
    }
    pubs.len()
}

/// `cmd` (a `filepipe` command built by a test) under `strace -f`, tracing every way to open a
/// file, with descriptors' paths (`-y`): its run and the opens.
pub fn traced_opens(cmd: &Command) -> (Run, Vec<Call>) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut st = Command::new("strace");
    st.args(["-f", "-qq", "-y", "-s", "300", "-o"])
        .arg(log.path())
        .args(["-e", "trace=open,openat,openat2,creat"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env_remove("RUST_LOG");
    let out = run(st);
    let text = fs::read_to_string(log.path()).unwrap();
    (out, parse_strace(&text))
}

/// `strace -f -o /dev/null -e INJECT.. filepipe`, `RUST_LOG` cleared: the real binary with
/// faults injected at the calls each `inject=` spec names (its arguments to be added).
pub fn filepipe_injected<S: AsRef<OsStr>>(injects: &[S]) -> Command {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-o", "/dev/null"]);
    for inject in injects {
        cmd.arg("-e").arg(inject);
    }
    cmd.arg(bin()).env_remove("RUST_LOG");
    cmd
}
