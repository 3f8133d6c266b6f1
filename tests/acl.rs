//! POSIX ACLs end to end, as root with `setfacl`, `getfacl` and `setpriv`: an output (next to
//! its input or under `--out`), a directory mirrored under `--out` or a move directory, and a
//! copy moved to another file system carry their input's ACLs as `cp -a` does, take nothing
//! from the output tree's default ACL that their input does not have, and are their owner's
//! alone where ACLs cannot go (README: "whoever may reach an input may reach its output, and no
//! one more"). Found by a review: outputs and mirrored directories took the mode alone, whose
//! group bits are an ACL's mask, and the group the ACL kept out read them.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// The inputs' owner and group.
const OWNER: u32 = 1500;
const GROUP: u32 = 1600;
/// A user the inputs' ACLs name and let read.
const NAMED: u32 = 1700;
/// A member of `GROUP`, whom the inputs' ACLs keep out (and one names and denies).
const MEMBER: u32 = 65534;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

fn p(x: &Path) -> &OsStr {
    x.as_os_str()
}

/// Whether the tests can run here: as root, with `setfacl` on a file system with ACLs.
fn ready(t: &TestTree) -> bool {
    if !is_root() {
        eprintln!("SKIPPED: needs root to make files other users own");
        return false;
    }
    let probe = t.side("probe");
    fs::write(&probe, b"").unwrap();
    match Command::new("setfacl")
        .arg("-m")
        .arg("u:1700:r")
        .arg(&probe)
        .output()
    {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!("SKIPPED: no POSIX ACLs here: {out:?}");
            false
        }
        Err(e) => {
            eprintln!("SKIPPED: no setfacl (Debian's acl package): {e}");
            false
        }
    }
}

/// A tree whose temp directory and input root any user may pass through.
fn tree() -> TestTree {
    let t = TestTree::new();
    fs::set_permissions(t.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(t.root(), fs::Permissions::from_mode(0o755)).unwrap();
    t
}

/// `tree()`, where ACLs can be tested (`ready`); `None`, said skipped, elsewhere.
fn acl_tree() -> Option<TestTree> {
    let t = tree();
    ready(&t).then_some(t)
}

/// `filepipe batch <t's root> --op gzip --out OUT EXTRA` run as uid 1500 (group 1500 alone),
/// who may not give outputs another group.
fn gzip_as_1500(t: &TestTree, out: &Path, extra: &[&OsStr]) -> Run {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=1500", "--regid=1500", "--clear-groups"])
        .arg(bin())
        .args([
            s("batch"),
            p(&t.root()),
            s("--op"),
            s("gzip"),
            s("--out"),
            p(out),
        ])
        .args(extra)
        .env_remove("RUST_LOG");
    run(cmd)
}

/// Makes `rel` under `t`'s root, a directory (`None`) or a file of `content`, owned by
/// `OWNER:GROUP` with `mode`, then given the ACL entries `acl` (`setfacl -m`; none if empty).
fn make(t: &TestTree, rel: &str, content: Option<&[u8]>, mode: u32, acl: &str) -> PathBuf {
    let path = t.path(rel);
    match content {
        Some(c) => fs::write(&path, c).unwrap(),
        None => fs::create_dir(&path).unwrap(),
    }
    rustix::fs::chown(
        &path,
        Some(rustix::process::Uid::from_raw(OWNER)),
        Some(rustix::process::Gid::from_raw(GROUP)),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    if !acl.is_empty() {
        setfacl(&path, &["-m", acl]);
    }
    path
}

fn setfacl(path: &Path, args: &[&str]) {
    let out = Command::new("setfacl")
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "setfacl {args:?} {}: {out:?}",
        path.display()
    );
}

/// `getfacl` of `path`, numeric, without its header: the access ACL, then the default one.
fn getfacl(path: &Path) -> String {
    let out = Command::new("getfacl")
        .args(["-c", "-n", "-p"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "getfacl {}: {out:?}", path.display());
    String::from_utf8(out.stdout).unwrap()
}

/// Whether the user `uid` (group `gid`, and `groups`) may read the file or list the
/// directory `path`.
fn may_read(uid: u32, gid: u32, groups: &str, path: &Path) -> bool {
    let tool = if path.is_dir() { "ls" } else { "cat" };
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!("--groups={groups}")
    };
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg(groups)
        .arg(tool)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The member of `GROUP` whom the ACLs keep out.
fn member_reads(path: &Path) -> bool {
    may_read(MEMBER, MEMBER, &GROUP.to_string(), path)
}

/// The user the ACLs name.
fn named_reads(path: &Path) -> bool {
    may_read(NAMED, NAMED, "", path)
}

/// `filepipe batch <t's root> ARGS` under `umask 022` (what the mirrored directories' modes,
/// and so their ACLs' masks, are compared with).
fn batch(t: &TestTree, args: &[&OsStr]) -> Run {
    let mut cmd = Command::new("sh");
    cmd.args([s("-c"), s("umask 022; exec \"$0\" \"$@\""), s(&bin())])
        .args([s("batch"), p(&t.root())])
        .args(args)
        .env_remove("RUST_LOG");
    run(cmd)
}

/// A `kind` file system mounted for a test, or `None`, said skipped, where it cannot be.
fn mounted(kind: &str) -> Option<Mount> {
    match Mount::new(kind) {
        Ok(m) => Some(m),
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// A file system mounted on a fresh directory, unmounted when dropped.
struct Mount(tempfile::TempDir);

impl Mount {
    /// `mount -t KIND`: `Err` with the reason where it cannot be mounted.
    fn new(kind: &str) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", kind, kind])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t {kind}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let m = Mount(dir);
        fs::set_permissions(m.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Ok(m)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// An output, next to its input or under `--out`, of every compressing op, carries its input's
/// access ACL: `memo.txt` (`0600`, ACL `u:1700:r, g::-, o::-`, shown `-rw-r-----+`: the group
/// bits are the mask) was compressed to a `0640` output every member of its group read, and
/// `deny.txt` (`0644` denying user 65534 by name) to a `0644` one that user read.
#[test]
fn an_output_carries_its_inputs_acl_next_to_it_and_under_out() {
    let Some(t) = acl_tree() else {
        return;
    };
    let memo = make(
        &t,
        "memo.txt",
        Some(b"for 1700 only\n"),
        0o600,
        "u:1700:r,g::-,o::-",
    );
    let deny = make(&t, "deny.txt", Some(b"not for 65534\n"), 0o644, "u:65534:-");
    assert!(!member_reads(&memo) && named_reads(&memo));
    assert!(!member_reads(&deny) && may_read(1800, 1800, "", &deny));
    let (out, multi) = (t.side("out"), t.side("multi"));
    batch(&t, &[s("--op"), s("gzip")]).success();
    batch(&t, &[s("--op"), s("zstd"), s("--out"), p(&out)]).success();
    batch(&t, &[s("--op"), s("sha256,gzip"), s("--out"), p(&multi)]).success();
    for (input, name) in [(&memo, "memo.txt"), (&deny, "deny.txt")] {
        let outputs = [
            t.path(format!("{name}.gz")),
            out.join(format!("{name}.zst")),
            multi.join(format!("{name}.gz")),
        ];
        for output in &outputs {
            let (i, o) = (fs::metadata(input).unwrap(), fs::metadata(output).unwrap());
            assert_eq!(
                (o.uid(), o.gid(), o.mode() & 0o7777),
                (i.uid(), i.gid(), i.mode() & 0o7777),
                "{}",
                output.display()
            );
            assert_eq!(getfacl(output), getfacl(input), "{}", output.display());
            assert!(
                !member_reads(output),
                "user 65534 read {}",
                output.display()
            );
        }
        if name == "memo.txt" {
            assert!(outputs.iter().all(|o| named_reads(o)), "1700 cannot read");
        } else {
            assert!(
                outputs.iter().all(|o| may_read(1800, 1800, "", o)),
                "1800 cannot read"
            );
        }
    }
}

/// A directory mirrored under `--out` and under a move directory carries its input
/// directory's access and default ACLs: `private` (`0750` to its group, an ACL keeping that
/// group out and letting user 1700 in) was mirrored `0750` with no ACL, and every member of
/// the group listed it.
#[test]
fn a_mirrored_directory_carries_its_inputs_acls_under_out_and_a_move_directory() {
    let Some(t) = acl_tree() else {
        return;
    };
    let private = make(&t, "private", None, 0o750, "u:1700:rx,g::-,o::-");
    setfacl(&private, &["-d", "-m", "u:1700:rx,g::-,o::-"]);
    make(
        &t,
        "private/f.txt",
        Some(b"for 1700 only\n"),
        0o600,
        "u:1700:r,g::-,o::-",
    );
    assert!(!member_reads(&private) && named_reads(&private));
    let (out, moved) = (t.side("out"), t.side("moved"));
    batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&out),
            s("--move-source"),
            p(&moved),
        ],
    )
    .success();
    let want = getfacl(&private);
    assert!(want.contains("default:user:1700:r-x"), "{want}");
    for top in [&out, &moved] {
        let dir = top.join("private");
        assert_eq!(getfacl(&dir), want, "{}", dir.display());
        let m = fs::metadata(&dir).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (OWNER, GROUP, 0o750));
        assert!(!member_reads(&dir), "user 65534 listed {}", dir.display());
        assert!(named_reads(&dir), "1700 cannot list {}", dir.display());
    }
    let gz = out.join("private/f.txt.gz");
    assert!(!member_reads(&gz) && named_reads(&gz));
    assert!(named_reads(&moved.join("private/f.txt")));
}

/// An output tree's default ACL (`--out` given to an operator's directory with
/// `setfacl -d -m u:65534:rwx`; an input's directory another user keeps one on) gives nothing
/// to what filepipe makes there that its input does not give: the ACL a new file or
/// directory inherits from it goes, as `cp -a` removes it. Kept, its mask was the group bits
/// of the input's mode, and the user it names read outputs of inputs it could not read.
#[test]
fn an_output_trees_default_acl_gives_nothing_its_inputs_do_not() {
    let Some(t) = acl_tree() else {
        return;
    };
    make(&t, "sub", None, 0o750, "");
    let input = make(&t, "sub/a.txt", Some(b"group only\n"), 0o640, "");
    // A directory of the tree whose default ACL lets 65534 in, and an input in it without one
    // (moved in, or its ACL removed since).
    let shared = make(&t, "shared", None, 0o755, "");
    setfacl(&shared, &["-d", "-m", "u:65534:rwx"]);
    let moved_in = make(&t, "shared/b.txt", Some(b"group only\n"), 0o640, "");
    setfacl(&moved_in, &["-b"]);
    let out = t.side("out");
    fs::create_dir(&out).unwrap();
    setfacl(&out, &["-m", "u:65534:rwx"]);
    setfacl(&out, &["-d", "-m", "u:65534:rwx"]);
    assert!(!may_read(MEMBER, MEMBER, "", &input) && !may_read(MEMBER, MEMBER, "", &moved_in));
    batch(&t, &[s("--op"), s("gzip"), s("--out"), p(&out)]).success();
    batch(&t, &[s("--op"), s("gzip"), s("--include"), s("shared/**")]).success();
    let outputs = [out.join("sub/a.txt.gz"), t.path("shared/b.txt.gz")];
    for made in [out.join("sub"), outputs[0].clone(), outputs[1].clone()] {
        let acl = getfacl(&made);
        assert!(!acl.contains("65534"), "{}: {acl}", made.display());
        assert!(
            !may_read(MEMBER, MEMBER, "", &made),
            "65534 read {}",
            made.display()
        );
    }
    for o in &outputs {
        assert_eq!(
            fs::metadata(o).unwrap().mode() & 0o7777,
            0o640,
            "{}",
            o.display()
        );
        assert!(
            may_read(MEMBER, GROUP, "", o),
            "the group cannot read {}",
            o.display()
        );
    }
}

/// Where an ACL cannot go (`--out` and the move directory on a ramfs, which keeps none), what
/// is made from an input with one is its owner's alone, and the run says so once; an input
/// without one is made as before. The move there is a copy (another file system), which
/// `keep_more` gave the ACL with a warning only when it failed, leaving the copy `0640` to a
/// group the input kept out. On a tmpfs, which keeps ACLs, the moved copy has its input's.
#[test]
fn where_acls_cannot_go_what_is_made_is_its_owners_alone() {
    let Some(t) = acl_tree() else {
        return;
    };
    let Some(ram) = mounted("ramfs") else {
        return;
    };
    let private = make(&t, "private", None, 0o750, "u:1700:rx,g::-,o::-");
    let memo = make(
        &t,
        "private/memo.txt",
        Some(b"for 1700\n"),
        0o640,
        "u:1700:r,g::-",
    );
    make(&t, "plain.txt", Some(b"for all\n"), 0o644, "");
    let (memo_acl, private_acl) = (getfacl(&memo), getfacl(&private));
    let (out, moved) = (ram.path().join("out"), ram.path().join("moved"));
    let r = batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&out),
            s("--move-source"),
            p(&moved),
        ],
    );
    r.success();
    let mode = |p: &Path| {
        let m = fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    for dir in [out.join("private"), moved.join("private")] {
        assert_eq!(mode(&dir), (OWNER, GROUP, 0o700), "{}", dir.display());
        assert!(!member_reads(&dir));
    }
    for file in [
        out.join("private/memo.txt.gz"),
        moved.join("private/memo.txt"),
    ] {
        assert_eq!(mode(&file), (OWNER, GROUP, 0o600), "{}", file.display());
    }
    assert_eq!(mode(&out.join("plain.txt.gz")), (OWNER, GROUP, 0o644));
    assert_eq!(mode(&moved.join("plain.txt")), (OWNER, GROUP, 0o644));
    let said = r.stderr().matches("ACL could not be read or given").count();
    assert_eq!(said, 1, "{}", r.stderr());
    // A file system with ACLs: the copy, and the directory made for it, carry the input's.
    let tmpfs = match Mount::new("tmpfs") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED (the tmpfs part): {why}");
            return;
        }
    };
    let memo = make(
        &t,
        "private/memo2.txt",
        Some(b"for 1700\n"),
        0o640,
        "u:1700:r,g::-",
    );
    let moved = tmpfs.path().join("moved");
    batch(&t, &[s("--op"), s("gzip"), s("--move-source"), p(&moved)]).success();
    assert!(!memo.exists());
    assert_eq!(getfacl(&moved.join("private/memo2.txt")), memo_acl);
    assert_eq!(getfacl(&moved.join("private")), private_acl);
    assert!(!member_reads(&moved.join("private/memo2.txt")));
}

/// A FUSE view whose extended attributes are read-only (`bindfs --xattr-ro`) refuses both the
/// ACL given to an output and the removal of one it never had: an output of an input with an
/// ACL is its owner's alone there, and one of an input without keeps its mode (the refused
/// removal is looked past once nothing is found to remove).
#[test]
fn where_acls_are_refused_an_output_of_an_input_without_one_keeps_its_mode() {
    let Some(t) = acl_tree() else {
        return;
    };
    let (back, view) = (t.side("back"), t.side("view"));
    let Some(_unmount) = bindfs(&back, &view, &["--xattr-ro"]) else {
        return;
    };
    make(
        &t,
        "memo.txt",
        Some(b"for 1700\n"),
        0o600,
        "u:1700:r,g::-,o::-",
    );
    make(&t, "plain.txt", Some(b"for all\n"), 0o644, "");
    let out = view.join("out");
    batch(&t, &[s("--op"), s("gzip"), s("--out"), p(&out)]).success();
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&out.join("memo.txt.gz")), 0o600);
    assert_eq!(mode(&out.join("plain.txt.gz")), 0o644);
}

/// With `--remove-source`, an output already in place stands for its input only if it lets in
/// no one the input keeps out, by its ACL as by its mode: one without the input's ACL (made by
/// an earlier build, or its ACL removed since) was trusted, and the input removed, leaving the
/// only copy readable by the group the input's ACL kept out.
#[test]
fn an_output_in_place_without_its_inputs_acl_does_not_stand_for_it() {
    let Some(t) = acl_tree() else {
        return;
    };
    let memo = make(
        &t,
        "memo.txt",
        Some(b"for 1700 only\n"),
        0o600,
        "u:1700:r,g::-,o::-",
    );
    batch(&t, &[s("--op"), s("gzip")]).success();
    let gz = t.path("memo.txt.gz");
    // As an earlier build made it: the mode alone, its group bits the mask.
    setfacl(&gz, &["-b"]);
    fs::set_permissions(&gz, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(member_reads(&gz));
    let r = batch(&t, &[s("--op"), s("gzip"), s("--remove-source")]);
    assert!(memo.exists(), "the input went: {}", r.stderr());
    assert!(
        r.stderr().contains("has another ACL than its input"),
        "{}",
        r.stderr()
    );
}

/// A move across file systems finishes an earlier one (a copy named, the input not yet
/// unlinked) only with a copy no more open than the input, by its ACL as by its mode: a copy
/// without the input's ACL was taken, and the input unlinked, leaving the only copy open to
/// the group the ACL kept out. Now the input is copied again beside it, with its ACL.
#[test]
fn a_copy_in_the_move_directory_without_the_inputs_acl_does_not_stand_for_it() {
    let Some(t) = acl_tree() else {
        return;
    };
    let Some(tmpfs) = mounted("tmpfs") else {
        return;
    };
    let memo = make(
        &t,
        "memo.txt",
        Some(b"for 1700 only\n"),
        0o640,
        "u:1700:r,g::-",
    );
    let moved = tmpfs.path().join("moved");
    fs::create_dir(&moved).unwrap();
    // What an earlier build's copy would be where its ACL failed: the same bytes, date, owner
    // and mode, no ACL (`cp -p` keeps no ACL).
    let planted = moved.join("memo.txt");
    cp("-p", &memo, &planted);
    setfacl(&planted, &["-b"]);
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(member_reads(&planted));
    let want = getfacl(&memo);
    batch(&t, &[s("--op"), s("gzip"), s("--move-source"), p(&moved)]).success();
    assert!(!memo.exists());
    let copy = moved.join("memo.1.txt");
    assert_eq!(getfacl(&copy), want, "{}", copy.display());
    assert!(!member_reads(&copy));
}

/// A cluster worker runs the same ops: its outputs, next to the inputs and under an output
/// root, and the directories it mirrors there carry the inputs' ACLs too.
#[cfg(feature = "cluster")]
#[test]
fn a_cluster_workers_outputs_carry_their_inputs_acls() {
    use common::nats::{Nats, Worker};
    let Some(t) = acl_tree() else {
        return;
    };
    let Some(nats) = Nats::start() else { return };
    let private = make(&t, "private", None, 0o750, "u:1700:rx,g::-,o::-");
    let memo = make(
        &t,
        "private/memo.txt",
        Some(b"for 1700\n"),
        0o640,
        "u:1700:r,g::-",
    );
    let out = t.side("out");
    fs::create_dir(&out).unwrap();
    let roots = [format!("tree={}", t.root().display())];
    let out_root = format!("out={}", out.display());
    let _worker = Worker::start_with(&nats, t.dir.path(), &roots, "1", &["--out-root", &out_root]);
    let coordinate = |extra: &[&OsStr]| {
        let mut cmd = filepipe(&[s("batch"), p(&t.root()), s("--queue"), s(&nats.url)]);
        cmd.args([s("--root-name"), s("tree")])
            .args(extra)
            .env("XDG_STATE_HOME", t.side("xdg"));
        run(cmd).success();
    };
    coordinate(&[s("--op"), s("gzip")]);
    coordinate(&[s("--op"), s("zstd"), s("--out"), p(&out)]);
    for output in [
        t.path("private/memo.txt.gz"),
        out.join("private/memo.txt.zst"),
    ] {
        assert_eq!(getfacl(&output), getfacl(&memo), "{}", output.display());
        assert!(
            !member_reads(&output),
            "user 65534 read {}",
            output.display()
        );
    }
    let dir = out.join("private");
    assert_eq!(
        getfacl(&dir).lines().count(),
        getfacl(&private).lines().count()
    );
    assert!(getfacl(&dir).contains("user:1700:r-x"), "{}", getfacl(&dir));
    assert!(!member_reads(&dir), "user 65534 listed {}", dir.display());
}

/// The `--out` and move roots filepipe makes take the input root's mode and group, less what
/// its ACL keeps from them: a root whose ACL gives its group nothing (`g::-`, the mode's
/// group bits being the mask a named user's `r-x` needs) made an `--out` root its whole
/// group could list (found by a review), and a state directory too. Named entries are not carried; the tree's owner is
/// let in as before.
#[test]
fn an_out_root_made_for_a_root_with_an_acl_is_no_more_open_than_its_entries() {
    let Some(t) = acl_tree() else {
        return;
    };
    let root = t.root();
    rustix::fs::chown(
        &root,
        Some(rustix::process::Uid::from_raw(OWNER)),
        Some(rustix::process::Gid::from_raw(GROUP)),
    )
    .unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o750)).unwrap();
    setfacl(&root, &["-m", "u:1700:rx,g::-,o::-"]);
    make(
        &t,
        "salaries.txt",
        Some(b"secret\n"),
        0o600,
        "u:1700:r,g::-",
    );
    assert!(!member_reads(&root));
    let (out, moved, state) = (t.side("out"), t.side("moved"), t.side("state"));
    batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&out),
            s("--move-source"),
            p(&moved),
            s("--state"),
            p(&state),
        ],
    )
    .success();
    assert!(!member_reads(&state), "the group lists the state");
    for made in [&out, &moved] {
        assert!(!member_reads(made), "the group lists {}", made.display());
        assert!(
            may_read(OWNER, OWNER, "", made),
            "the tree's owner cannot list {}",
            made.display()
        );
    }
}

/// The roots filepipe makes (`--out`, `--state`, and the missing directories above them) keep
/// nothing of a default ACL on the directory they are made in: a parent an operator gave
/// `setfacl -d -m u:65534:rwx` let 65534 list the `--out` root and read the state's names and
/// digests of a tree it may not list (found by a review).
#[test]
fn roots_made_under_a_default_acl_keep_none_of_it() {
    let Some(t) = acl_tree() else {
        return;
    };
    fs::set_permissions(t.root(), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(t.path("f"), b"private\n").unwrap();
    let parent = t.side("p");
    fs::create_dir(&parent).unwrap();
    setfacl(&parent, &["-m", "u:65534:rx"]);
    setfacl(&parent, &["-d", "-m", "u:65534:rwx"]);
    let (out, state) = (parent.join("a/out"), parent.join("state"));
    batch(
        &t,
        &[
            s("--op"),
            s("gzip"),
            s("--out"),
            p(&out),
            s("--state"),
            p(&state),
        ],
    )
    .success();
    for made in [parent.join("a"), out, state] {
        let acl = getfacl(&made);
        assert!(!acl.contains("65534"), "{}: {acl}", made.display());
        assert!(
            !may_read(MEMBER, MEMBER, "", &made),
            "65534 lists {}",
            made.display()
        );
    }
}

/// A user let in to another user's tree by an ACL (the systemd README's setup for the
/// service's user) mirrors its directories into its own `--out`, run after run: a directory it
/// made, for another group (a mask, no group entry), is not taken for one more open than the
/// directory it mirrors (found by a review: the mask was read as the group's rights, and every
/// file below failed `unsafe-output-path`, at every run).
#[test]
fn a_mirror_made_for_another_users_acl_tree_is_used_run_after_run() {
    let Some(t) = acl_tree() else {
        return;
    };
    let chown = |path: &Path| {
        rustix::fs::chown(
            path,
            Some(rustix::process::Uid::from_raw(NAMED)),
            Some(rustix::process::Gid::from_raw(GROUP)),
        )
        .unwrap();
    };
    for (rel, content, mode) in [
        ("app", None, 0o750),
        ("app/2024", None, 0o750),
        ("app/a.log", Some(&b"a\n"[..]), 0o640),
        ("app/2024/b.log", Some(&b"b\n"[..]), 0o640),
    ] {
        let path = t.path(rel);
        match content {
            Some(c) => fs::write(&path, c).unwrap(),
            None => fs::create_dir(&path).unwrap(),
        }
        chown(&path);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        setfacl(&path, &["-m", "u:1500:rX"]);
    }
    let out = t.side("out");
    fs::create_dir(&out).unwrap();
    rustix::fs::chown(&out, Some(rustix::process::Uid::from_raw(OWNER)), None).unwrap();
    let first = gzip_as_1500(&t, &out, &[s("--json")]).success().summary();
    assert_eq!(first["done"], 2, "{first}");
    let again = gzip_as_1500(&t, &out, &[s("--json")]).success().summary();
    assert_eq!(again["failed"], 0, "{again}");
    assert_eq!(again["skipped_by_reason"]["up-to-date"], 2, "{again}");
}

/// A mirror directory already there whose ACL lets in a user (or group) the input directory it
/// mirrors keeps out is not written into, whatever its mode (found by a review: the first
/// version of the rule left out every directory with an ACL, and a private directory's output
/// and moved input were read by the user its mirror's ACL named).
#[test]
fn a_mirror_directory_whose_acl_lets_others_in_is_not_written_into() {
    let Some(t) = acl_tree() else {
        return;
    };
    make(&t, "priv", None, 0o700, "");
    make(&t, "priv/s.log", Some(b"private\n"), 0o644, "");
    for (how, entry) in [("--out", "u:65534:rx"), ("--move-source", "g:65534:rx")] {
        let dest = t.side(&format!("dest{how}"));
        let mirror = dest.join("priv");
        fs::create_dir_all(&mirror).unwrap();
        fs::set_permissions(&mirror, fs::Permissions::from_mode(0o700)).unwrap();
        setfacl(&mirror, &["-m", entry]);
        let log = t.side(&format!("fail{how}.log"));
        let out = batch(
            &t,
            &[
                s("--op"),
                s("gzip"),
                s(how),
                p(&dest),
                s("--failure-log"),
                p(&log),
            ],
        );
        assert_mirror_refused(&out, how, &mirror, &log, "its ACL lets in");
    }
}

/// A run that cannot give an output its input's group (not root: the shipped units' user)
/// leaves the output in its own group, to which the input's group bits, or its ACL's
/// owning-group entry, do not belong: that group gets no more than others do then. Before,
/// a member of the runner's group read outputs of inputs it could not read (found by a
/// review; so in releases before ACLs too); then, read no longer what others read.
#[test]
fn an_output_left_in_another_group_gives_that_group_what_others_get() {
    let Some(t) = acl_tree() else {
        return;
    };
    let out = t.side("out");
    fs::create_dir(&out).unwrap();
    rustix::fs::chown(&out, Some(rustix::process::Uid::from_raw(OWNER)), None).unwrap();
    // Readable by the runner (1500) by name, and by group 1600: not by group 1500.
    for (name, acl) in [("plain", ""), ("named", "u:1500:r")] {
        let f = t.path(name);
        fs::write(&f, b"group 1600's\n").unwrap();
        rustix::fs::chown(
            &f,
            Some(rustix::process::Uid::from_raw(NAMED)),
            Some(rustix::process::Gid::from_raw(GROUP)),
        )
        .unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        if !acl.is_empty() {
            fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
            setfacl(&f, &["-m", acl]);
        }
    }
    gzip_as_1500(&t, &out, &[]).success();
    // A member of the runner's group, 1500, whom the inputs keep out (others read `plain`).
    let runners_group = |path: &Path| may_read(1800, OWNER, "", path);
    let named = out.join("named.gz");
    assert!(!runners_group(&t.path("named")));
    assert!(!runners_group(&named), "{}", getfacl(&named));
    let plain = out.join("plain.gz");
    assert_eq!(fs::metadata(&plain).unwrap().mode() & 0o777, 0o644);
    assert!(runners_group(&plain), "what others read");
    // Made once: the next run finds it up to date, as it would give it (no redo each run).
    let summary = gzip_as_1500(&t, &out, &[s("--json")]).success().summary();
    assert_eq!(summary["skipped_by_reason"]["up-to-date"], 2, "{summary}");
}

/// An output up to date by its bytes but more open than its input is now (an ACL entry taken
/// away, a `chmod`, since: neither moves the mtime) is redone with the input's attributes,
/// not left as it was (found by a review: the user the entry named kept reading the output).
#[test]
fn an_output_more_open_than_its_input_now_is_redone() {
    let Some(t) = acl_tree() else {
        return;
    };
    let f = make(&t, "f", Some(b"for 1700, once\n"), 0o640, "u:1700:r");
    let g = make(&t, "g", Some(b"for everyone, once\n"), 0o644, "");
    let gzip = || batch(&t, &[s("--op"), s("gzip"), s("--json")]);
    gzip().success();
    assert!(named_reads(&t.path("f.gz")));
    setfacl(&f, &["-b"]);
    fs::set_permissions(&g, fs::Permissions::from_mode(0o600)).unwrap();
    let out = gzip();
    let summary = out.success().summary();
    assert_eq!(summary["done"], 2, "{summary}");
    assert!(
        !named_reads(&t.path("f.gz")),
        "{}",
        getfacl(&t.path("f.gz"))
    );
    assert_eq!(fs::metadata(t.path("g.gz")).unwrap().mode() & 0o777, 0o600);
    // Then up to date again.
    let again = gzip().success().summary();
    assert_eq!(again["skipped_by_reason"]["up-to-date"], 2, "{again}");
}

/// `--remove-source` takes an output already in place for its input only once it is what
/// filepipe gives it: in another group than the input's (a run that cannot give the input's),
/// with the owning-group entry narrowed as a fresh output's is. It was given the input's ACL
/// as it is, and the only copy left read by the runner's group (found by a review).
#[test]
fn an_output_taken_for_its_input_in_another_group_is_narrowed_as_a_fresh_one() {
    let Some(t) = acl_tree() else {
        return;
    };
    let out = t.side("out");
    fs::create_dir(&out).unwrap();
    rustix::fs::chown(&out, Some(rustix::process::Uid::from_raw(OWNER)), None).unwrap();
    rustix::fs::chown(t.root(), Some(rustix::process::Uid::from_raw(OWNER)), None).unwrap();
    let a = make(&t, "a.txt", Some(b"group 1600's\n"), 0o640, "u:1700:r");
    let as_owner = |extra: &[&OsStr]| {
        gzip_as_1500(&t, &out, extra).success();
    };
    as_owner(&[]);
    as_owner(&[s("--remove-source")]);
    assert!(!a.exists(), "the input was not removed");
    let gz = out.join("a.txt.gz");
    assert!(!may_read(1800, OWNER, "", &gz), "{}", getfacl(&gz));
    assert!(named_reads(&gz));
}
