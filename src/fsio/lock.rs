//! Open file description locks, the one kind of file lock that means the same thing to every
//! process that can see the file.
//!
//! An OFD lock (`F_OFD_SETLK`) belongs to the open file description, not to the process: it is
//! held until that description is closed, whatever else the process opens or closes (a classic
//! POSIX lock would be dropped by closing any other descriptor of the file), two descriptions
//! conflict even within one process, and the kernel keeps it on the inode, so processes in other
//! PID namespaces and, on NFS, on other hosts see it too. Temp files and state directories use
//! it to prove that their owner is alive.

use std::os::fd::{AsFd, AsRawFd};

use rustix::io::Errno;

/// Shared (read) or exclusive (write). A read lock needs a descriptor open for reading, a write
/// lock one open for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockKind {
    /// Shared: conflicts with a write lock only.
    Read,
    /// Exclusive: conflicts with any other lock.
    Write,
}

/// Locks all of `file` (to its end, however it grows). With `wait`, blocks until the lock is
/// free; without, fails with `EAGAIN` while another description holds a conflicting one.
#[allow(unsafe_code)]
pub(crate) fn lock(file: &impl AsFd, kind: LockKind, wait: bool) -> rustix::io::Result<()> {
    // SAFETY: an all-zero `flock` is a valid value (plain integers); OFD locks require l_pid 0,
    // and l_start 0 with l_len 0 means the whole file.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = match kind {
        LockKind::Read => libc::F_RDLCK,
        LockKind::Write => libc::F_WRLCK,
    } as _;
    lock.l_whence = libc::SEEK_SET as _;
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: a valid open descriptor, and a pointer to a live, initialised flock that the
        // kernel only reads.
        let r = unsafe { libc::fcntl(file.as_fd().as_raw_fd(), cmd, &lock) };
        if r == 0 {
            return Ok(());
        }
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        match Errno::from_raw_os_error(errno) {
            Errno::INTR => continue,
            // Some file systems say "would block" this way.
            Errno::ACCESS => return Err(Errno::AGAIN),
            e => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn descriptions_conflict_even_in_one_process_and_a_close_releases() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let a = File::create(&path).unwrap();
        lock(&a, LockKind::Write, false).unwrap();
        let b = File::open(&path).unwrap();
        assert_eq!(lock(&b, LockKind::Read, false), Err(Errno::AGAIN));
        // Closing some other descriptor of the file does not release it (a POSIX lock would).
        drop(File::open(&path).unwrap());
        assert_eq!(lock(&b, LockKind::Read, false), Err(Errno::AGAIN));
        drop(a);
        lock(&b, LockKind::Read, false).unwrap();
        let c = File::open(&path).unwrap();
        lock(&c, LockKind::Read, false).unwrap();
    }
}
