//! The hashing ops (SHA-256, SHA-512, BLAKE3): each file's digest, for the manifest; or, with
//! several hashes (`--op sha256,blake3`), each of them from one read of the file.
//!
//! One op over a small `Hasher` enum: the algorithms differ only in the state they update.
//! sha2 picks the SHA-NI code path at run time where the CPU has it, blake3 its SIMD one. The
//! read buffer is large enough that per-call overhead vanishes and small enough that the
//! kernel's copy into it, and the hashing after, stay in the core's own caches. A large BLAKE3
//! file is hashed on all cores (`update_rayon`, BLAKE3's tree makes the digest the same): the
//! workers hash different files in parallel, but a lone large file would leave the other cores
//! idle. Inputs are read, never mapped: a file truncated while mapped raises SIGBUS.

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest as _, Sha256, Sha512};

use crate::digest::{Digest, HashAlgo};
use crate::error::FileError;
use crate::fsio::input::{fill, InputFile};
use crate::ops::{Done, Op};
use crate::travel::{Job, Only};

/// Size of the per-worker read buffer. Measured on 4 x 256 MiB (hyperfine, 15 runs): 64 KiB
/// took 373 ms, 32 KiB 378 ms, 256 KiB and 1 MiB 387-389 ms (the copy out of the page cache
/// costs a fifth more system time into a buffer that spills from L2).
pub(crate) const BUF_SIZE: usize = 64 * 1024;

/// BLAKE3 files of at least this size are hashed on the hash pool when alone (see `PAR_CHUNK`).
const PAR_MIN: u64 = 4 << 20;

/// The piece of a large BLAKE3 file read, then hashed on every thread of the hash pool. Large
/// enough that splitting it among the threads costs little, small enough to stay in L2/L3.
const PAR_CHUNK: usize = 1 << 20;

/// The running state of one file's hash.
pub(crate) enum Hasher {
    /// SHA-256.
    Sha256(Sha256),
    /// SHA-512.
    Sha512(Sha512),
    /// BLAKE3 (boxed: its state is nearly 2 KiB).
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    /// A fresh state for `algo`.
    pub(crate) fn new(algo: HashAlgo) -> Hasher {
        match algo {
            HashAlgo::Sha256 => Hasher::Sha256(Sha256::new()),
            HashAlgo::Sha512 => Hasher::Sha512(Sha512::new()),
            HashAlgo::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// Hashes `data` on this thread.
    pub(crate) fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The digest of everything hashed.
    pub(crate) fn finalize(self) -> Digest {
        match self {
            Hasher::Sha256(h) => digest(HashAlgo::Sha256, &h.finalize()),
            Hasher::Sha512(h) => digest(HashAlgo::Sha512, &h.finalize()),
            Hasher::Blake3(h) => digest(HashAlgo::Blake3, h.finalize().as_bytes()),
        }
    }
}

/// A digest from a hasher's output, which has the algorithm's length by construction.
fn digest(algo: HashAlgo, bytes: &[u8]) -> Digest {
    Digest::new(algo, bytes).expect("a hasher's output has its algorithm's length")
}

/// Hashes everything `r` yields with `algo`, through `buf`, on this thread.
pub(crate) fn hash_reader(algo: HashAlgo, r: &mut impl Read, buf: &mut [u8]) -> io::Result<Digest> {
    let mut h = Hasher::new(algo);
    loop {
        match r.read(buf) {
            Ok(0) => return Ok(h.finalize()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A reader that feeds every byte it reads to `hashers` as it goes: the input is read once,
/// whoever consumes it (a compressor, `ops::multi`), and each hash sees the bytes while they
/// are still in the core's caches.
pub(crate) struct Tee<'h, R> {
    inner: R,
    hashers: &'h mut [Hasher],
}

impl<'h, R: Read> Tee<'h, R> {
    /// `inner`, read through `hashers` (none: `inner` as it is).
    pub(crate) fn new(inner: R, hashers: &'h mut [Hasher]) -> Self {
        Tee { inner, hashers }
    }
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        for h in self.hashers.iter_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Hashes everything `r` yields with each of `algos`, through `buf`, on this thread: one read,
/// every hash updated from the same buffer. The digests come in the order of `algos`.
pub(crate) fn hash_all(
    algos: &[HashAlgo],
    r: &mut impl Read,
    buf: &mut [u8],
) -> io::Result<Vec<Digest>> {
    let mut hashers: Vec<Hasher> = algos.iter().map(|&a| Hasher::new(a)).collect();
    loop {
        match r.read(buf) {
            Ok(0) => return Ok(hashers.into_iter().map(Hasher::finalize).collect()),
            Ok(n) => hashers.iter_mut().for_each(|h| h.update(&buf[..n])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A hashing operation. It writes nothing next to inputs: digests go to the reporter.
#[derive(Debug)]
pub(crate) struct HashOp {
    /// The hashes, in the order `--op` names them (each file's digests come in this order).
    algos: Vec<HashAlgo>,
    /// The op's name, for logs: the hash's, or the canonical list of several.
    name: &'static str,
    /// BLAKE3 with more than one job: the threads that hash a large file's pieces. Separate
    /// from the worker pool on purpose: the workers block on the job channel, so they could
    /// never steal these tasks.
    pool: Option<rayon::ThreadPool>,
    /// With a pool: files being read now. A large file's piece goes to the pool only while it
    /// is the one file being read: with others, every core already hashes a file of its own,
    /// and splitting pieces among them only adds hand-offs (four 256 MiB files on two cores:
    /// 0.37 s on the pool against 0.24 s one file per worker; one 1 GiB file: 0.29 s on the
    /// pool against 0.36 s on one thread; medians of 9 interleaved runs, shared machine).
    reading: AtomicUsize,
}

/// Counts a file in `HashOp::reading` while it lives.
struct Reading<'a>(&'a AtomicUsize);

impl<'a> Reading<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Reading(n)
    }

    /// Whether this is the only file being read.
    fn alone(&self) -> bool {
        self.0.load(Ordering::Relaxed) <= 1
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-worker buffers.
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    /// Every file's reads.
    small: Vec<u8>,
    /// A large BLAKE3 file's pieces (the one hashed, the one read) while it is hashed on the
    /// pool; empty otherwise.
    large: [Vec<u8>; 2],
}

impl HashOp {
    /// The op computing `algo`; `jobs` threads hash a large BLAKE3 file.
    #[cfg(test)]
    pub(crate) fn new(algo: HashAlgo, jobs: usize) -> anyhow::Result<HashOp> {
        HashOp::several(&[algo], crate::cli::OpKind::from(algo).as_str(), jobs)
    }

    /// The op computing each of `algos` (at least one) from one read of each file, known as
    /// `name`. BLAKE3 alone hashes a large file on `jobs` threads; among several hashes it is
    /// updated on the worker's thread like the others, in the same loop over the same buffer.
    pub(crate) fn several(
        algos: &[HashAlgo],
        name: &'static str,
        jobs: usize,
    ) -> anyhow::Result<HashOp> {
        let pool = if algos == [HashAlgo::Blake3] && jobs > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(jobs)
                    .thread_name(|i| format!("filepipe-hash-{i}"))
                    .build()?,
            )
        } else {
            None
        };
        Ok(HashOp {
            algos: algos.to_vec(),
            name,
            pool,
            reading: AtomicUsize::new(0),
        })
    }

    /// Hashes `input` with BLAKE3: while it is the only file being read (`reading`), a
    /// `PAR_CHUNK` at a time on all the pool's threads, the next piece read meanwhile (the copy
    /// out of the page cache costs about half the hashing's time with AVX-512, which a read
    /// before each piece would add to the wall time); otherwise through `small` on this
    /// thread, as any file. The pieces' buffers are taken only while alone and given back at
    /// the end, so a run holds about one pair of them, whatever `--jobs` is.
    fn blake3_large(
        pool: &rayon::ThreadPool,
        reading: &Reading<'_>,
        input: &mut (impl Read + Send),
        bufs: &mut Buffers,
    ) -> io::Result<Digest> {
        let mut h = blake3::Hasher::new();
        // Bytes read into `large[0]` and not yet hashed.
        let mut pending = 0;
        let result = loop {
            if !reading.alone() {
                if pending > 0 {
                    h.update(&bufs.large[0][..pending]);
                    pending = 0;
                }
                match input.read(&mut bufs.small) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        h.update(&bufs.small[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
                continue;
            }
            let [this, next] = &mut bufs.large;
            this.resize(PAR_CHUNK, 0);
            next.resize(PAR_CHUNK, 0);
            if pending == 0 {
                match fill(input, this) {
                    Ok(0) => break Ok(()),
                    Ok(n) => pending = n,
                    Err(e) => break Err(e),
                }
            }
            let piece = &this[..pending];
            let hash = || {
                h.update_rayon(piece);
            };
            match pool.install(|| rayon::join(hash, || fill(input, next))).1 {
                Ok(n) => pending = n,
                Err(e) => break Err(e),
            }
            std::mem::swap(this, next);
            if pending == 0 {
                break Ok(());
            }
        };
        bufs.large = Default::default();
        result.map(|()| digest(HashAlgo::Blake3, h.finalize().as_bytes()))
    }
}

impl Op for HashOp {
    type Scratch = Buffers;
    type Pending = Vec<Digest>;

    fn name(&self) -> &'static str {
        self.name
    }

    fn scratch(&self) -> Buffers {
        Buffers {
            small: vec![0; BUF_SIZE],
            large: [Vec::new(), Vec::new()],
        }
    }

    fn check(
        &self,
        _: &Job,
        _: &InputFile,
        _: &mut Buffers,
    ) -> Result<Option<FileError>, FileError> {
        Ok(None)
    }

    fn read(
        &self,
        job: &Job,
        input: &mut InputFile,
        bufs: &mut Buffers,
    ) -> Result<Vec<Digest>, FileError> {
        // Read exactly the size fstat gave: no extra read(2) to see EOF on every small file.
        // Growth or shrinkage is caught by the caller's second fstat.
        let size = input.size();
        let mut input = input.take(size);
        // A file with some digests recorded (`Job::only`) is read for the others alone. (The
        // pool is BLAKE3's alone, a run with one hash, whose jobs never carry a part.)
        let algos = Only::hashes_of(job.only.as_deref(), &self.algos);
        // With a pool, every file is counted while it is read (see `Reading`).
        let pool = (self.pool.as_ref()).map(|pool| (pool, Reading::new(&self.reading)));
        let digests = match (&pool, algos) {
            // A BLAKE3 file that fits the buffer is read whole and hashed in one call: the
            // hasher's state (2 KiB, boxed, past the allocator's per-thread cache) is neither
            // made nor freed for it. Its malloc and free were 4% of a run over 50,000 small
            // files (perf).
            (_, &[HashAlgo::Blake3]) if size <= bufs.small.len() as u64 => {
                let whole = &mut bufs.small[..size as usize];
                fill(&mut input, whole).map(|n| {
                    let hash = blake3::hash(&whole[..n]);
                    vec![digest(HashAlgo::Blake3, hash.as_bytes())]
                })
            }
            (Some((pool, reading)), _) => if size >= PAR_MIN {
                Self::blake3_large(pool, reading, &mut input, bufs)
            } else {
                hash_reader(HashAlgo::Blake3, &mut input, &mut bufs.small)
            }
            .map(|d| vec![d]),
            (None, &[algo]) => hash_reader(algo, &mut input, &mut bufs.small).map(|d| vec![d]),
            (None, algos) => hash_all(algos, &mut input, &mut bufs.small),
        };
        digests.map_err(|e| FileError::io("reading input", &e))
    }

    fn publish(&self, _: &Job, input: &InputFile, digests: Vec<Digest>) -> Result<Done, FileError> {
        Ok(Done {
            bytes_in: input.size(),
            digests,
            ..Done::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(algo: HashAlgo, data: &[u8]) -> String {
        hash_reader(algo, &mut &data[..], &mut [0; 7])
            .unwrap()
            .to_hex()
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            hex(HashAlgo::Sha256, b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(HashAlgo::Sha512, b"abc"),
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
        assert_eq!(
            hex(HashAlgo::Blake3, b"abc"),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    /// A reader that, at given reads, has another file start or stop being read.
    struct Others<'a> {
        data: &'a [u8],
        reads: usize,
        reading: &'a AtomicUsize,
    }

    impl Read for Others<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            match self.reads {
                3 => self.reading.fetch_add(1, Ordering::Relaxed),
                40 => self.reading.fetch_sub(1, Ordering::Relaxed),
                _ => 0,
            };
            self.data.read(buf)
        }
    }

    #[test]
    fn a_large_blake3_file_hashes_the_same_as_others_start_and_stop() {
        // Alone for two pieces, then not (64 KiB reads on this thread), then alone again: the
        // bytes already read for the pool are hashed first, whatever the switch.
        let data: Vec<u8> = (0..6 * PAR_CHUNK + 17)
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let op = HashOp::new(HashAlgo::Blake3, 2).unwrap();
        let reading = Reading::new(&op.reading);
        let mut input = Others {
            data: &data,
            reads: 0,
            reading: &op.reading,
        };
        let mut bufs = op.scratch();
        let pool = op.pool.as_ref().unwrap();
        let digest = HashOp::blake3_large(pool, &reading, &mut input, &mut bufs).unwrap();
        assert!(input.reads > 40, "the switch back was reached");
        assert_eq!(digest.to_hex(), blake3::hash(&data).to_hex().as_str());
        assert!(
            bufs.large.iter().all(|b| b.capacity() == 0),
            "buffers given back"
        );
    }

    /// A plain job for the file at `path`, named `f`.
    fn job_of(path: &std::path::Path) -> Job {
        Job {
            abs: path.to_path_buf(),
            rel: "f".into(),
            replace: false,
            expect: None,
            redelivered: None,
            only: None,
        }
    }

    /// Files up to the buffer's size are read whole and hashed in one call (BLAKE3), larger
    /// ones streamed: either way each digest is the file's, at the edges of BLAKE3's chunks
    /// and of the buffer, and for a file that shrank after its size was taken (the caller's
    /// second fstat fails it; the digest is of what was there).
    #[test]
    fn files_around_the_buffers_size_hash_as_themselves() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let job = job_of(&path);
        for size in [0, 1, 1023, 1024, 1025, BUF_SIZE - 1, BUF_SIZE, BUF_SIZE + 1] {
            let data: Vec<u8> = (0..size).map(|i| (i * 13 % 249) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            for jobs in [1, 2] {
                let op = HashOp::new(HashAlgo::Blake3, jobs).unwrap();
                let mut input = InputFile::open(&path, false).unwrap();
                let digest = op.read(&job, &mut input, &mut op.scratch()).unwrap();
                let expected = blake3::hash(&data);
                assert_eq!(digest.len(), 1);
                assert_eq!(
                    digest[0].to_hex(),
                    expected.to_hex().as_str(),
                    "{size} bytes"
                );
            }
        }
        let data = vec![7u8; 5000];
        std::fs::write(&path, &data).unwrap();
        let op = HashOp::new(HashAlgo::Blake3, 2).unwrap();
        let mut input = InputFile::open(&path, false).unwrap();
        std::fs::write(&path, &data[..100]).unwrap();
        let digest = op.read(&job, &mut input, &mut op.scratch()).unwrap();
        assert_eq!(
            digest[0].to_hex(),
            blake3::hash(&data[..100]).to_hex().as_str()
        );
    }

    #[test]
    fn a_file_of_several_buffers_hashes_as_one_stream() {
        // The integration tests' files are mostly smaller than the buffer: these take several
        // reads, the last one short, through the worker's own read path; the BLAKE3 one is
        // large enough for the pool, in several pieces, and must hash as on one thread.
        let data: Vec<u8> = (0..PAR_MIN as usize + 3 * PAR_CHUNK / 2 + 17)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, &data).unwrap();
        let job = job_of(&path);
        for algo in HashAlgo::ALL {
            for (jobs, others) in [(1, 0), (3, 0), (3, 1)] {
                let mut input = InputFile::open(&path, false).unwrap();
                let op = HashOp::new(algo, jobs).unwrap();
                // Another file being read: the large one is hashed on this thread.
                let _others: Vec<_> = (0..others).map(|_| Reading::new(&op.reading)).collect();
                let digest = op.read(&job, &mut input, &mut op.scratch()).unwrap();
                let mut one = Hasher::new(algo);
                one.update(&data);
                assert_eq!(
                    digest,
                    vec![one.finalize()],
                    "{algo:?}, {jobs} jobs, {others} others"
                );
            }
        }
        // Several at once, from one read: each as if alone, in the order given.
        let algos = [HashAlgo::Blake3, HashAlgo::Sha256, HashAlgo::Sha512];
        let op = HashOp::several(&algos, "sha256,sha512,blake3", 3).unwrap();
        let mut input = InputFile::open(&path, false).unwrap();
        let digests = op.read(&job, &mut input, &mut op.scratch()).unwrap();
        let alone: Vec<Digest> = algos
            .iter()
            .map(|&a| hash_reader(a, &mut &data[..], &mut [0; 4096]).unwrap())
            .collect();
        assert_eq!(digests, alone);
        assert_eq!(op.name(), "sha256,sha512,blake3");
    }
}
