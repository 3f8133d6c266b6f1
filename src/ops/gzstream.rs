//! A gzip stream writer that compresses one file on several cores, the way pigz does.
//!
//! The input is cut into 128 KiB blocks; each block is raw-deflated on its own, primed with the
//! 32 KiB of input before it as a preset dictionary (so the ratio stays within a fraction of a
//! percent of a single stream), and ended with a sync flush so the pieces concatenate into one
//! valid deflate stream; the last block ends the stream. Per-block CRC-32s are combined in
//! order. At most a small window of blocks is in flight, so memory per file is bounded whatever
//! the file size. A file of one block never leaves the calling thread.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{Read, Write};

use flate2::{Compress, Compression, FlushCompress, Status};
use rayon::ThreadPool;

use crate::error::{FileError, Kind};
use crate::input::fill;

/// Bytes of input per independently compressed block (pigz's default).
pub const BLOCK: usize = 128 * 1024;
/// The deflate window: the dictionary each block is primed with.
const DICT: usize = 32 * 1024;

/// Bytes a worker's reusable buffer needs (for the single-threaded path).
pub const BUF_SIZE: usize = DICT + BLOCK;

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

/// Running totals of the deflate body.
struct Body {
    crc: crc32fast::Hasher,
    bytes_in: u64,
    bytes_out: u64,
}

impl Body {
    fn append(&mut self, out: &mut impl Write, block: Deflated) -> Result<(), FileError> {
        let (bytes, crc) = block?;
        out.write_all(&bytes)
            .map_err(|e| FileError::io("writing output", &e))?;
        self.bytes_out += bytes.len() as u64;
        self.crc.combine(&crc);
        Ok(())
    }
}

/// Compresses `expected` bytes of `input` into `out` as one gzip member. `buf` must hold at
/// least `BUF_SIZE` bytes. A shorter input ends the stream early (the caller's stat check
/// rejects it); bytes past `expected` are not read. With a `pool` and more than one block of
/// input, blocks are compressed on the pool while this thread reads and writes.
pub fn compress(
    input: &mut impl Read,
    expected: u64,
    out: &mut impl Write,
    header: &Header<'_>,
    pool: Option<&ThreadPool>,
    buf: &mut [u8],
) -> Result<Totals, FileError> {
    let head = header_bytes(header);
    out.write_all(&head)
        .map_err(|e| FileError::io("writing output", &e))?;
    let mut body = Body {
        crc: crc32fast::Hasher::new(),
        bytes_in: 0,
        bytes_out: head.len() as u64,
    };
    match pool {
        Some(pool) if expected > BLOCK as u64 => {
            compress_parallel(input, expected, out, header.level, pool, &mut body)?
        }
        _ => compress_serial(input, expected, out, header.level, buf, &mut body)?,
    }
    let crc = body.crc.finalize();
    let mut trailer = [0u8; 8];
    trailer[..4].copy_from_slice(&crc.to_le_bytes());
    trailer[4..].copy_from_slice(&(body.bytes_in as u32).to_le_bytes());
    out.write_all(&trailer)
        .map_err(|e| FileError::io("writing output", &e))?;
    Ok(Totals {
        crc,
        bytes_in: body.bytes_in,
        bytes_out: body.bytes_out + 8,
    })
}

/// Reads the next block of at most `BLOCK` bytes after the `dict_len` bytes already at the start
/// of `block`. Returns whether it is the last one.
fn read_block(
    input: &mut impl Read,
    expected: u64,
    block: &mut Vec<u8>,
    dict_len: usize,
    body: &mut Body,
) -> Result<bool, FileError> {
    let want = (expected - body.bytes_in).min(BLOCK as u64) as usize;
    block.resize(dict_len + want, 0);
    let n = fill(input, &mut block[dict_len..]).map_err(|e| FileError::io("reading input", &e))?;
    block.truncate(dict_len + n);
    body.bytes_in += n as u64;
    Ok(n < want || body.bytes_in == expected)
}

/// One block after another on this thread, each primed with the previous 32 KiB.
fn compress_serial(
    input: &mut impl Read,
    expected: u64,
    out: &mut impl Write,
    level: u32,
    buf: &mut [u8],
    body: &mut Body,
) -> Result<(), FileError> {
    let mut block = Vec::with_capacity(buf.len());
    let mut dict_len = 0;
    loop {
        let last = read_block(input, expected, &mut block, dict_len, body)?;
        let (dict, data) = block.split_at(dict_len);
        body.append(out, deflate_block(level, dict, data, last))?;
        if last {
            return Ok(());
        }
        let keep = DICT.min(block.len());
        block.drain(..block.len() - keep);
        dict_len = keep;
    }
}

/// Blocks compressed on `pool` through a sliding window: this thread reads ahead and writes
/// finished blocks in order, so the pool never waits for a whole batch to drain.
fn compress_parallel(
    input: &mut impl Read,
    expected: u64,
    out: &mut impl Write,
    level: u32,
    pool: &ThreadPool,
    body: &mut Body,
) -> Result<(), FileError> {
    // Enough blocks in flight to keep every pool thread busy while one waits to be written;
    // memory stays at a few hundred KiB per block.
    let window = 2 * pool.current_num_threads() + 2;
    let (tx, rx) = crossbeam_channel::unbounded::<(usize, Deflated, Vec<u8>)>();
    pool.in_place_scope(|scope| {
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut finished: BTreeMap<usize, Deflated> = BTreeMap::new();
        let mut tail: Vec<u8> = Vec::with_capacity(DICT);
        let (mut sent, mut written, mut eof) = (0usize, 0usize, false);
        loop {
            while !eof && sent - written < window {
                let mut block = spare.pop().unwrap_or_else(|| Vec::with_capacity(BUF_SIZE));
                block.clear();
                block.extend_from_slice(&tail);
                let dict_len = block.len();
                let last = read_block(input, expected, &mut block, dict_len, body)?;
                tail.clear();
                tail.extend_from_slice(&block[block.len() - DICT.min(block.len())..]);
                let tx = tx.clone();
                let index = sent;
                scope.spawn(move |_| {
                    let (dict, data) = block.split_at(dict_len);
                    let result = deflate_block(level, dict, data, last);
                    let _ = tx.send((index, result, block));
                });
                sent += 1;
                eof = last;
            }
            if written == sent {
                return Ok(());
            }
            let (index, result, block) = rx
                .recv()
                .map_err(|_| FileError::new(Kind::Internal, "a compression task was lost"))?;
            spare.push(block);
            finished.insert(index, result);
            while let Some(result) = finished.remove(&written) {
                body.append(out, result)?;
                written += 1;
            }
        }
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

/// A compressed block and the CRC-32 of its input.
type Deflated = Result<(Vec<u8>, crc32fast::Hasher), FileError>;

thread_local! {
    /// One deflate state per thread, reset between blocks: creating one costs far more than a
    /// small file takes to compress.
    static DEFLATE: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
}

/// Raw-deflates one block primed with `dict`, ending with a sync flush, or with the end of the
/// stream if `last`. Returns the bytes and the block's CRC-32.
fn deflate_block(level: u32, dict: &[u8], data: &[u8], last: bool) -> Deflated {
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
        for len in [
            0,
            1,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            20 * BLOCK,
            33 * BLOCK + 5,
        ] {
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
