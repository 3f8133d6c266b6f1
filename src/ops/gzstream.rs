//! A gzip stream writer that compresses one file on several cores, the way pigz does.
//!
//! The input is cut into 128 KiB blocks; each block is raw-deflated on its own, primed with the
//! 32 KiB of input before it as a preset dictionary (so the ratio stays within a fraction of a
//! percent of a single stream), and ended with a sync flush so the pieces concatenate into one
//! valid deflate stream; the last block ends the stream. Per-block CRC-32s are combined in
//! order. Blocks are read in batches, so memory per file is bounded by the batch size whatever
//! the file size. A file of one block never leaves the calling thread.

use std::cell::RefCell;
use std::io::{Read, Write};

use flate2::{Compress, Compression, FlushCompress, Status};
use rayon::prelude::*;
use rayon::ThreadPool;

use crate::error::{FileError, Kind};

/// Bytes of input per independently compressed block (pigz's default).
pub const BLOCK: usize = 128 * 1024;
/// The deflate window: the dictionary each block is primed with.
const DICT: usize = 32 * 1024;
/// Blocks read per batch: enough to keep two cores busy with little idle time at batch ends,
/// small enough that each worker holds at most a few MiB.
const BATCH_BLOCKS: usize = 32;
const BATCH: usize = BLOCK * BATCH_BLOCKS;

/// Bytes a worker's reusable buffer needs.
pub const BUF_SIZE: usize = DICT + BATCH;

/// What goes into the gzip header.
#[derive(Debug, Clone)]
pub struct Header<'a> {
    /// Compression level 1-9.
    pub level: u32,
    /// The input's mtime in seconds (0 when it does not fit the 32-bit field).
    pub mtime: u32,
    /// The input's file name, stored like gzip does so `gunzip -N` can restore it.
    pub name: Option<&'a [u8]>,
}

/// Totals of one compressed stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// CRC-32 of the uncompressed data (as stored in the trailer).
    pub crc: u32,
    /// Uncompressed bytes.
    pub bytes_in: u64,
    /// Bytes of the whole gzip file, header and trailer included.
    pub bytes_out: u64,
}

/// Compresses `expected` bytes of `input` into `out` as one gzip member. `buf` must hold at
/// least `BUF_SIZE` bytes. A shorter input ends the stream early (the caller's stat check
/// rejects it); bytes past `expected` are not read.
pub fn compress(
    input: &mut impl Read,
    expected: u64,
    out: &mut impl Write,
    header: &Header<'_>,
    pool: Option<&ThreadPool>,
    buf: &mut [u8],
) -> Result<Totals, FileError> {
    let write_err = |e: std::io::Error| FileError::io("writing output", &e);
    let head = header_bytes(header);
    out.write_all(&head).map_err(write_err)?;
    let mut crc = crc32fast::Hasher::new();
    let mut bytes_in = 0u64;
    let mut bytes_out = head.len() as u64;
    let mut dict_len = 0;
    loop {
        let want = (expected - bytes_in).min(BATCH as u64) as usize;
        let n = fill(input, &mut buf[dict_len..dict_len + want])
            .map_err(|e| FileError::io("reading input", &e))?;
        bytes_in += n as u64;
        let last = n < want || bytes_in == expected;
        let data = &buf[..dict_len + n];
        let starts: Vec<usize> = if n == 0 {
            vec![dict_len]
        } else {
            (dict_len..dict_len + n).step_by(BLOCK).collect()
        };
        let block = |i: usize| {
            let start = starts[i];
            let end = (start + BLOCK).min(data.len());
            let final_block = last && i + 1 == starts.len();
            deflate_block(
                header.level,
                &data[start.saturating_sub(DICT)..start],
                &data[start..end],
                final_block,
            )
        };
        let blocks: Vec<_> = match pool {
            Some(pool) if starts.len() > 1 => {
                pool.install(|| (0..starts.len()).into_par_iter().map(block).collect())
            }
            _ => (0..starts.len()).map(block).collect(),
        };
        for b in blocks {
            let (bytes, block_crc) = b?;
            out.write_all(&bytes).map_err(write_err)?;
            bytes_out += bytes.len() as u64;
            crc.combine(&block_crc);
        }
        if last {
            break;
        }
        let keep = DICT.min(data.len());
        let from = data.len() - keep;
        buf.copy_within(from..from + keep, 0);
        dict_len = keep;
    }
    let crc = crc.finalize();
    let mut trailer = [0u8; 8];
    trailer[..4].copy_from_slice(&crc.to_le_bytes());
    trailer[4..].copy_from_slice(&(bytes_in as u32).to_le_bytes());
    out.write_all(&trailer).map_err(write_err)?;
    Ok(Totals {
        crc,
        bytes_in,
        bytes_out: bytes_out + 8,
    })
}

/// The RFC 1952 member header.
fn header_bytes(h: &Header<'_>) -> Vec<u8> {
    const FNAME: u8 = 0x08;
    const OS_UNIX: u8 = 3;
    // XFL: 2 = maximum compression, 4 = fastest, as gzip writes them.
    let xfl = match h.level {
        9 => 2,
        1 => 4,
        _ => 0,
    };
    let mut v = vec![0x1f, 0x8b, 8, 0];
    v.extend_from_slice(&h.mtime.to_le_bytes());
    v.extend_from_slice(&[xfl, OS_UNIX]);
    if let Some(name) = h.name.filter(|n| !n.contains(&0)) {
        v[3] |= FNAME;
        v.extend_from_slice(name);
        v.push(0);
    }
    v
}

thread_local! {
    /// One deflate state per thread, reset between blocks: creating one costs far more than a
    /// small file takes to compress.
    static DEFLATE: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
}

/// Raw-deflates one block primed with `dict`, ending with a sync flush, or with the end of the
/// stream if `last`. Returns the bytes and the block's CRC-32.
fn deflate_block(
    level: u32,
    dict: &[u8],
    data: &[u8],
    last: bool,
) -> Result<(Vec<u8>, crc32fast::Hasher), FileError> {
    let internal =
        |e: &dyn std::fmt::Display| FileError::new(Kind::Internal, format!("deflate: {e}"));
    let mut crc = crc32fast::Hasher::new();
    crc.update(data);
    DEFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c = match &mut *slot {
            Some((l, c)) if *l == level => {
                c.reset();
                c
            }
            slot => {
                &mut slot
                    .insert((level, Compress::new(Compression::new(level), false)))
                    .1
            }
        };
        if !dict.is_empty() {
            c.set_dictionary(dict).map_err(|e| internal(&e))?;
        }
        let flush = if last {
            FlushCompress::Finish
        } else {
            FlushCompress::Sync
        };
        let mut out = Vec::with_capacity(data.len() + data.len() / 8 + 64);
        let start_in = c.total_in();
        loop {
            let consumed = (c.total_in() - start_in) as usize;
            let status = c
                .compress_vec(&data[consumed..], &mut out, flush)
                .map_err(|e| internal(&e))?;
            let consumed = (c.total_in() - start_in) as usize;
            let room_left = out.len() < out.capacity();
            match status {
                Status::StreamEnd => break,
                // A sync flush is complete once all input is in and output did not fill up.
                Status::Ok | Status::BufError if !last && consumed == data.len() && room_left => {
                    break
                }
                Status::BufError if room_left => {
                    return Err(internal(&"deflate made no progress"));
                }
                _ => out.reserve(out.capacity().max(4096)),
            }
        }
        Ok((out, crc))
    })
}

/// Reads until `buf` is full or the input ends.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::MultiGzDecoder;
    use proptest::prelude::*;

    fn roundtrip(data: &[u8], pool: Option<&ThreadPool>, level: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0; BUF_SIZE];
        let h = Header {
            level,
            mtime: 7,
            name: Some(b"x"),
        };
        let t = compress(
            &mut &data[..],
            data.len() as u64,
            &mut out,
            &h,
            pool,
            &mut buf,
        )
        .unwrap();
        assert_eq!(t.bytes_in, data.len() as u64);
        assert_eq!(t.bytes_out, out.len() as u64);
        assert_eq!(t.crc, crc32fast::hash(data));
        let mut back = Vec::new();
        MultiGzDecoder::new(&out[..])
            .read_to_end(&mut back)
            .unwrap();
        back
    }

    fn pool() -> ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
    }

    #[test]
    fn empty_and_exact_block_multiples() {
        let p = pool();
        for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, BATCH, BATCH + BLOCK + 5] {
            let data: Vec<u8> = (0..len)
                .map(|i| (i % 251) as u8 ^ (i / 7000) as u8)
                .collect();
            assert_eq!(roundtrip(&data, Some(&p), 6), data, "len {len}");
            assert_eq!(roundtrip(&data, None, 1), data, "len {len}");
        }
    }

    #[test]
    fn dictionary_keeps_ratio_close_to_one_stream() {
        // Text-like data where cross-block matches matter.
        let line = b"2026-11-24T02:28:03Z host filepipe[1234]: processed file /srv/data/file";
        let data: Vec<u8> = (0..40_000u32)
            .flat_map(|i| [&line[..], &i.to_string().into_bytes(), b"\n"].concat())
            .collect();
        let mut ours = Vec::new();
        let h = Header {
            level: 6,
            mtime: 0,
            name: None,
        };
        compress(
            &mut &data[..],
            data.len() as u64,
            &mut ours,
            &h,
            Some(&pool()),
            &mut vec![0; BUF_SIZE],
        )
        .unwrap();
        let mut single = flate2::write::GzEncoder::new(Vec::new(), Compression::new(6));
        single.write_all(&data).unwrap();
        let single = single.finish().unwrap();
        assert!(
            (ours.len() as f64) < single.len() as f64 * 1.02,
            "{} vs {}",
            ours.len(),
            single.len()
        );
    }

    #[test]
    fn short_input_ends_stream_cleanly() {
        let data = vec![5u8; 1000];
        let mut out = Vec::new();
        let h = Header {
            level: 6,
            mtime: 0,
            name: None,
        };
        let t = compress(
            &mut &data[..],
            5000,
            &mut out,
            &h,
            None,
            &mut vec![0; BUF_SIZE],
        )
        .unwrap();
        assert_eq!(t.bytes_in, 1000);
        let mut back = Vec::new();
        MultiGzDecoder::new(&out[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    /// Reads in random-sized chunks, like a slow or interrupted file system would.
    struct Chunky<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        i: usize,
    }
    impl Read for Chunky<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let want = self.sizes[self.i % self.sizes.len()]
                .min(buf.len())
                .min(self.data.len());
            self.i += 1;
            buf[..want].copy_from_slice(&self.data[..want]);
            self.data = &self.data[want..];
            Ok(want)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_bytes_in_random_chunks_roundtrip(
            data in prop::collection::vec(any::<u8>(), 0..600_000),
            sizes in prop::collection::vec(1usize..70_000, 1..8),
            level in 1u32..=9,
        ) {
            let mut out = Vec::new();
            let h = Header { level, mtime: 1, name: None };
            let mut r = Chunky { data: &data, sizes, i: 0 };
            compress(&mut r, data.len() as u64, &mut out, &h, Some(&pool()), &mut vec![0; BUF_SIZE]).unwrap();
            let mut back = Vec::new();
            MultiGzDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
            prop_assert_eq!(back, data);
        }
    }
}
