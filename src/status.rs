//! `filepipe status`: what watch mode's state knows, for humans and scripts.

use std::io::Write;
use std::path::Path;

use anyhow::Result;

use crate::state;

/// Prints counts per (root, op, status) and, with `failed`, every failed file.
pub(crate) fn print(dir: &Path, failed: bool, out: &mut impl Write) -> Result<()> {
    for (root, op, status, n) in state::counts(dir)? {
        writeln!(out, "{}\t{op}\t{status}\t{n}", root.display())?;
    }
    if failed {
        for row in state::failed(dir)? {
            writeln!(
                out,
                "FAILED\t{}\t{}\t{}\t{}\tattempts={}\t{}",
                row.root.display(),
                row.op,
                row.path.display(),
                row.error.as_deref().unwrap_or("?"),
                row.attempts,
                row.message.as_deref().unwrap_or(""),
            )?;
        }
    }
    Ok(())
}
