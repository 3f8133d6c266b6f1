//! The checksum manifest format of GNU `sha256sum` and `sha512sum`, and of `b3sum`, written
//! and read exactly as they do.
//!
//! A name containing a backslash, newline or carriage return is written with those escaped
//! (`\\`, `\n`, `\r`) and the line prefixed with a backslash; every other byte, including
//! non-UTF-8 ones, is written raw. So `sha256sum -c` and `sha512sum -c` accept every manifest
//! filepipe writes, and `filepipe verify` accepts every manifest they write. b3sum (1.5.5 and
//! later) escapes the same three bytes the same way; it reads names as UTF-8 only, so `b3sum -c`
//! stops at a line naming a non-UTF-8 file (b3sum itself cannot list one), which `filepipe
//! verify` checks. b3sum before 1.5.5 (Debian 12 has 1.2.0) does not know the `\r` escape.
//!
//! A file named exactly `-` is listed as `./-`: the tools read `-` as stdin, while `./-` is
//! that file to them and to `filepipe verify` (which drops a leading `./`).
//!
//! The BSD form the GNU tools write with `--tag` (`SHA256 (NAME) = DIGEST`, escaped the same
//! way) is read too, never written.

use crate::digest::{Digest, HashAlgo};

/// What `sha256sum -c` and `b3sum -c` read as stdin rather than as a file of that name.
pub(crate) const STDIN: &[u8] = b"-";
/// The file named `-`, as a manifest lists it (see the module's comment).
pub(crate) const STDIN_NAMED: &[u8] = b"./-";

/// Appends one manifest line for `name` (the path's raw bytes) to `out`.
pub(crate) fn push_line(out: &mut Vec<u8>, digest: &Digest, name: &[u8]) {
    // Needs no escape either way.
    let name = if name == STDIN { STDIN_NAMED } else { name };
    // An escaped name is longer than the name; its leading backslash goes before the digest,
    // where GNU and b3sum look for it. Most names need none: copied as they are.
    if needs_escape(name) {
        let shown = shown_name(name);
        out.push(b'\\');
        out.extend_from_slice(digest.hex_into(&mut [0; 128]));
        out.extend_from_slice(b"  ");
        out.extend_from_slice(&shown[1..]);
    } else {
        out.extend_from_slice(digest.hex_into(&mut [0; 128]));
        out.extend_from_slice(b"  ");
        out.extend_from_slice(name);
    }
    out.push(b'\n');
}

/// `name` as a manifest line shows it (and sha256sum -c its result): escaped, with a leading
/// backslash, when it holds a backslash, newline or carriage return; `./-` for `-`; raw
/// otherwise.
pub(crate) fn shown_name(name: &[u8]) -> Vec<u8> {
    if name == STDIN {
        return STDIN_NAMED.to_vec();
    }
    if !needs_escape(name) {
        return name.to_vec();
    }
    let mut out = Vec::with_capacity(name.len() + 2);
    out.push(b'\\');
    for &b in name {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b => out.push(b),
        }
    }
    out
}

/// Whether `name` holds a byte a manifest line escapes (backslash, newline, carriage return).
fn needs_escape(name: &[u8]) -> bool {
    name.iter().any(|b| matches!(b, b'\\' | b'\n' | b'\r'))
}

/// One parsed manifest line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The expected digest.
    pub(crate) digest: Digest,
    /// The file name, unescaped, as raw bytes.
    pub(crate) name: Vec<u8>,
    /// The name as it appeared in the manifest (escaped), for printing results like sha256sum.
    pub(crate) shown: Vec<u8>,
}

/// How many hex digits the digest of `line` has, if it looks like a manifest line: what
/// tells a SHA-512 manifest (128) from a SHA-256 or BLAKE3 one (64).
pub(crate) fn hex_len(line: &[u8]) -> Option<usize> {
    if let Some(algo) = tagged(line) {
        return Some(algo.hex_len());
    }
    let line = unindented(line);
    let rest = line.strip_prefix(b"\\").unwrap_or(line);
    let n = rest.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    (n > 0 && matches!(rest.get(n), Some(b' ' | b'\t')) && rest.len() > n + 1).then_some(n)
}

/// `line` without the spaces and tabs it starts with, which GNU's `sha256sum -c` ignores
/// (no digest and no escape mark starts with one, so nothing is lost).
fn unindented(line: &[u8]) -> &[u8] {
    let n = line
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count();
    &line[n..]
}

/// The tags of the BSD form (`sha256sum --tag`), with their algorithm.
const TAGS: [(&[u8], HashAlgo); 3] = [
    (b"SHA256 (", HashAlgo::Sha256),
    (b"SHA512 (", HashAlgo::Sha512),
    (b"BLAKE3 (", HashAlgo::Blake3),
];

/// The algorithm `line` names, if it is in the BSD form (`SHA256 (NAME) = DIGEST`).
pub(crate) fn tagged(line: &[u8]) -> Option<HashAlgo> {
    let line = unindented(line);
    let rest = line.strip_prefix(b"\\").unwrap_or(line);
    TAGS.iter()
        .find(|(tag, _)| rest.starts_with(tag))
        .map(|&(_, algo)| algo)
}

/// The escaped name and the digest's hex of a line in the BSD form of `algo`.
fn split_tagged(rest: &[u8], algo: HashAlgo) -> Option<(&[u8], &[u8])> {
    let (tag, _) = TAGS.iter().find(|(_, a)| *a == algo)?;
    let rest = rest.strip_prefix(*tag)?;
    let hex = algo.hex_len();
    let at = rest.len().checked_sub(hex + 4)?;
    (&rest[at..at + 4] == b") = ").then(|| (&rest[..at], &rest[at + 4..]))
}

/// How a manifest's lines part digest and name, as GNU's `sha256sum -c` tells it from the
/// first line that says: two characters (`  ` text mode, ` *` binary mode), or a single space
/// or tab (the BSD tools' `-r` form, `sha256 -r` on FreeBSD). Why one layout for the whole
/// manifest rather than a guess per line: `DIGEST   name` is the name ` name` in one layout
/// and `name` in the other, and a file renamed with a leading space must not pass for another
/// (GNU's reason for refusing mixed manifests, followed here).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Layout {
    /// `Some(true)`: one character; `Some(false)`: two; `None`: no line has said yet.
    one: Option<bool>,
}

/// Parses one line (without its trailing newline) of a manifest of `algo`, alone. `None`
/// means an improperly formatted line (a digest of another length among them).
pub(crate) fn parse_line(line: &[u8], algo: HashAlgo) -> Option<Entry> {
    parse_line_in(line, algo, &mut Layout::default())
}

/// Parses one line (without its trailing newline) of a manifest of `algo` whose `layout` the
/// lines before told (and this one may tell). `None` means an improperly formatted line.
pub(crate) fn parse_line_in(line: &[u8], algo: HashAlgo, layout: &mut Layout) -> Option<Entry> {
    let line = unindented(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (escaped, rest) = match line.strip_prefix(b"\\") {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let hex = algo.hex_len();
    let (name, digest) = if tagged(line).is_some() {
        // "SHA256 (name) = digest": a tag of another algorithm is malformed here.
        let (name, hex) = split_tagged(rest, algo)?;
        (name, Digest::from_hex(algo, hex)?)
    } else {
        if rest.len() < hex + 2 || !matches!(rest[hex], b' ' | b'\t') {
            return None;
        }
        let digest = Digest::from_hex(algo, &rest[..hex])?;
        // "  name" (text mode) or " *name" (binary mode): the same for a hash. A name of one
        // byte after one space is the one-character layout, as GNU takes it.
        let after = &rest[hex + 1..];
        let two = after.len() > 1 && matches!(after[0], b' ' | b'*');
        let name = match (two, layout.one) {
            (true, Some(true)) => after,
            (true, _) => {
                layout.one = Some(false);
                &after[1..]
            }
            (false, Some(false)) => return None,
            (false, _) => {
                layout.one = Some(true);
                after
            }
        };
        (name, digest)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_escaped_lines_roundtrip() {
        for (algo, name) in HashAlgo::ALL
            .into_iter()
            .flat_map(|a| NAMES.map(|n| (a, n)))
        {
            let d = Digest::new(algo, &vec![0xab; algo.len()]).unwrap();
            let mut line = Vec::new();
            push_line(&mut line, &d, name);
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(hex_len(&line), Some(algo.hex_len()));
            let e = parse_line(line.strip_suffix(b"\n").unwrap(), algo).unwrap();
            assert_eq!(e.digest, d);
            assert_eq!(e.name, name);
        }
    }

    const NAMES: [&[u8]; 5] = [
        b"plain name",
        b"back\\slash",
        b"new\nline",
        b"c\rr",
        b"\xff\xfe-x",
    ];

    #[test]
    fn matches_gnu_escaping() {
        let mut line = Vec::new();
        let zero = Digest::new(HashAlgo::Sha256, &[0; 32]).unwrap();
        push_line(&mut line, &zero, b"a\\b\nc");
        let expected = format!("\\{}  a\\\\b\\nc\n", "0".repeat(64));
        assert_eq!(line, expected.as_bytes());
    }

    /// `sha256sum -c` and `b3sum -c` would read stdin for a line naming `-` (found by a
    /// review): the file of that name is listed as `./-`, which they open.
    #[test]
    fn a_file_named_dash_is_listed_as_dot_slash_dash() {
        for algo in HashAlgo::ALL {
            let d = Digest::new(algo, &vec![0x0f; algo.len()]).unwrap();
            let mut line = Vec::new();
            push_line(&mut line, &d, b"-");
            let hex = "0f".repeat(algo.len());
            assert_eq!(line, format!("{hex}  ./-\n").as_bytes());
            let e = parse_line(line.strip_suffix(b"\n").unwrap(), algo).unwrap();
            assert_eq!((&e.name[..], &e.shown[..]), (&b"./-"[..], &b"./-"[..]));
            assert_eq!(shown_name(b"-"), b"./-");
            // Only the whole name: `-x`, `a/-` and `./-` itself are files to the tools.
            for name in [&b"-x"[..], b"a/-", b"./-", b"--"] {
                line.clear();
                push_line(&mut line, &d, name);
                assert!(line.ends_with(&[b"  ", name, b"\n"].concat()));
            }
        }
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        for bad in [&b""[..], b"xyz", &[b'a'; 66], b"\\", &[b'0'; 200]] {
            for algo in HashAlgo::ALL {
                assert_eq!(parse_line(bad, algo), None);
            }
        }
        let mut bad_escape = Vec::from(&b"\\"[..]);
        bad_escape.extend_from_slice(&[b'0'; 64]);
        bad_escape.extend_from_slice(b"  a\\q");
        assert_eq!(parse_line(&bad_escape, HashAlgo::Sha256), None);
        let mut binary = vec![b'0'; 64];
        binary.extend_from_slice(b" *f");
        assert_eq!(parse_line(&binary, HashAlgo::Sha256).unwrap().name, b"f");
        // A SHA-256 line is not a SHA-512 one, nor the other way round.
        assert_eq!(parse_line(&binary, HashAlgo::Sha512), None);
        let mut long = vec![b'0'; 128];
        long.extend_from_slice(b"  f");
        assert_eq!(parse_line(&long, HashAlgo::Sha256), None);
        assert_eq!(hex_len(&long), Some(128));
    }
}
