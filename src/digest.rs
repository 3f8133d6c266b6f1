//! Hash algorithms and the digests they give: a value that knows its algorithm and length.
//!
//! A leaf like `travel` (it imports nothing of the crate): digests travel from the ops through
//! the reporter to the sinks, the state and the queue. A digest is built only from bytes of its
//! algorithm's length, so a SHA-256 digest can never be written where a SHA-512 one belongs.
//! Names are spelled once, by `cli::OpKind::as_str` (`From<HashAlgo> for OpKind` there).

/// A hash algorithm filepipe computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub(crate) enum HashAlgo {
    /// SHA-256, as `sha256sum`.
    Sha256,
    /// SHA-512, as `sha512sum`.
    Sha512,
    /// BLAKE3 (256-bit output), as `b3sum`.
    Blake3,
}

impl HashAlgo {
    /// Every algorithm.
    pub(crate) const ALL: [HashAlgo; 3] = [HashAlgo::Sha256, HashAlgo::Sha512, HashAlgo::Blake3];

    /// The digest's length in bytes.
    pub(crate) fn len(self) -> usize {
        match self {
            HashAlgo::Sha256 | HashAlgo::Blake3 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// The digest's length in hex digits, as a manifest spells it.
    pub(crate) fn hex_len(self) -> usize {
        2 * self.len()
    }
}

/// A digest: its algorithm and exactly that algorithm's number of bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Digest {
    algo: HashAlgo,
    /// The first `algo.len()` bytes are the digest, the rest zero.
    bytes: [u8; 64],
}

impl Digest {
    /// The digest `bytes` of `algo`, or `None` when the length is not `algo`'s (a state row or
    /// a message written by something else).
    pub(crate) fn new(algo: HashAlgo, bytes: &[u8]) -> Option<Digest> {
        if bytes.len() != algo.len() {
            return None;
        }
        let mut d = Digest {
            algo,
            bytes: [0; 64],
        };
        d.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(d)
    }

    /// Its algorithm.
    pub(crate) fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// Its bytes (`algo().len()` of them).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.algo.len()]
    }

    /// Lower-case hex, as `sha256sum`, `sha512sum` and `b3sum` print it (b3sum reads only
    /// lower case).
    pub(crate) fn to_hex(self) -> String {
        let mut buf = [0; 128];
        String::from_utf8_lossy(self.hex_into(&mut buf)).into_owned()
    }

    /// The same lower-case hex, written into `buf`, without an allocation: a manifest writes
    /// one per line.
    pub(crate) fn hex_into<'b>(&self, buf: &'b mut [u8; 128]) -> &'b [u8] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes = self.as_bytes();
        for (pair, b) in buf.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 15)];
        }
        &buf[..bytes.len() * 2]
    }

    /// The digest of `algo` that `hex` spells (either case), or `None`.
    pub(crate) fn from_hex(algo: HashAlgo, hex: &[u8]) -> Option<Digest> {
        if hex.len() != algo.hex_len() {
            return None;
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let mut bytes = [0u8; 64];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            bytes[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Digest { algo, bytes })
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}:{}", self.algo, self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_checked_and_hex_roundtrips() {
        for algo in HashAlgo::ALL {
            let bytes: Vec<u8> = (0..algo.len() as u8).collect();
            let d = Digest::new(algo, &bytes).unwrap();
            assert_eq!(d.as_bytes(), bytes);
            assert_eq!(d.to_hex().len(), algo.hex_len());
            assert_eq!(Digest::from_hex(algo, d.to_hex().as_bytes()), Some(d));
            assert_eq!(
                Digest::from_hex(algo, d.to_hex().to_uppercase().as_bytes()),
                Some(d)
            );
            assert_eq!(Digest::new(algo, &bytes[1..]), None);
            assert_eq!(Digest::from_hex(algo, &d.to_hex().as_bytes()[2..]), None);
        }
        // The same bytes under two algorithms are two different digests.
        let a = Digest::new(HashAlgo::Sha256, &[1; 32]).unwrap();
        let b = Digest::new(HashAlgo::Blake3, &[1; 32]).unwrap();
        assert_ne!(a, b);
        assert_eq!(Digest::from_hex(HashAlgo::Sha256, &[b'g'; 64]), None);
    }
}
