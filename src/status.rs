//! `filepipe status`: what watch mode's state knows, for humans and scripts.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use crate::state;

/// The context of a failed write of what `print` prints: a state that cannot be read is
/// another matter (its own exit status).
#[derive(Debug)]
pub(crate) struct Writing;

impl std::fmt::Display for Writing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("writing to stdout")
    }
}

/// Prints counts per (root, op, status) and, with `failed`, every failed file: all read first,
/// so that an error is either the state's or the write's (`Writing`).
pub(crate) fn print(dir: &Path, failed: bool, out: &mut impl Write) -> Result<()> {
    let counts = state::counts(dir)?;
    let rows = if failed {
        state::failed(dir)?
    } else {
        Vec::new()
    };
    let write = |out: &mut dyn Write| -> std::io::Result<()> {
        for (root, op, status, n) in &counts {
            writeln!(out, "{}\t{op}\t{status}\t{n}", root.display())?;
        }
        for row in &rows {
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
        out.flush()
    };
    write(out).context(Writing)
}
