//! The `sha256sum` manifest format, written and read exactly as GNU coreutils does.
//!
//! A name containing a backslash, newline or carriage return is written with those escaped
//! (`\\`, `\n`, `\r`) and the line prefixed with a backslash; every other byte, including
//! non-UTF-8 ones, is written raw. So `sha256sum -c` accepts every manifest filepipe writes, and
//! `filepipe verify` accepts every manifest `sha256sum` writes.

use std::io::{self, Write};

/// Writes one manifest line for `name` (the path's raw bytes).
pub(crate) fn write_line(w: &mut impl Write, digest: &[u8; 32], name: &[u8]) -> io::Result<()> {
    let escape = name.iter().any(|b| matches!(b, b'\\' | b'\n' | b'\r'));
    if !escape {
        w.write_all(to_hex(digest).as_bytes())?;
        w.write_all(b"  ")?;
        w.write_all(name)?;
        return w.write_all(b"\n");
    }
    w.write_all(b"\\")?;
    w.write_all(to_hex(digest).as_bytes())?;
    w.write_all(b"  ")?;
    for &b in name {
        match b {
            b'\\' => w.write_all(b"\\\\")?,
            b'\n' => w.write_all(b"\\n")?,
            b'\r' => w.write_all(b"\\r")?,
            b => w.write_all(&[b])?,
        }
    }
    w.write_all(b"\n")
}

/// One parsed manifest line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The expected digest.
    pub(crate) digest: [u8; 32],
    /// The file name, unescaped, as raw bytes.
    pub(crate) name: Vec<u8>,
    /// The name as it appeared in the manifest (escaped), for printing results like sha256sum.
    pub(crate) shown: Vec<u8>,
}

/// Parses one line (without its trailing newline). `None` means an improperly formatted line.
pub(crate) fn parse_line(line: &[u8]) -> Option<Entry> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (escaped, rest) = match line.strip_prefix(b"\\") {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    if rest.len() < 66 {
        return None;
    }
    let digest = from_hex(&rest[..64])?;
    // "  name" (text mode) or " *name" (binary mode): the same for SHA-256.
    let name = match &rest[64..66] {
        b"  " | b" *" => &rest[66..],
        _ => return None,
    };
    if name.is_empty() {
        return None;
    }
    let unescaped = if escaped {
        unescape(name)?
    } else {
        name.to_vec()
    };
    let mut shown = Vec::with_capacity(name.len() + 1);
    if escaped {
        shown.push(b'\\');
    }
    shown.extend_from_slice(name);
    Some(Entry {
        digest,
        name: unescaped,
        shown,
    })
}

fn unescape(name: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len());
    let mut it = name.iter();
    while let Some(&b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next()? {
            b'\\' => out.push(b'\\'),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            _ => return None,
        }
    }
    Some(out)
}

/// The digest `hex` spells (64 hex digits, either case), or `None`.
pub(crate) fn from_hex(hex: &[u8]) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Lower-case hex, as `sha256sum` prints it.
pub(crate) fn to_hex(digest: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_escaped_lines_roundtrip() {
        let d = [0xab; 32];
        for name in [
            &b"plain name"[..],
            b"back\\slash",
            b"new\nline",
            b"c\rr",
            b"\xff\xfe-x",
        ] {
            let mut line = Vec::new();
            write_line(&mut line, &d, name).unwrap();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            let e = parse_line(line.strip_suffix(b"\n").unwrap()).unwrap();
            assert_eq!(e.digest, d);
            assert_eq!(e.name, name);
        }
    }

    #[test]
    fn matches_gnu_escaping() {
        let mut line = Vec::new();
        write_line(&mut line, &[0; 32], b"a\\b\nc").unwrap();
        let expected = format!("\\{}  a\\\\b\\nc\n", "0".repeat(64));
        assert_eq!(line, expected.as_bytes());
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        for bad in [&b""[..], b"xyz", &[b'a'; 66], b"\\", &[b'0'; 200]] {
            assert_eq!(parse_line(bad), None);
        }
        let mut bad_escape = Vec::from(&b"\\"[..]);
        bad_escape.extend_from_slice(&[b'0'; 64]);
        bad_escape.extend_from_slice(b"  a\\q");
        assert_eq!(parse_line(&bad_escape), None);
        let mut binary = vec![b'0'; 64];
        binary.extend_from_slice(b" *f");
        assert_eq!(parse_line(&binary).unwrap().name, b"f");
    }
}
