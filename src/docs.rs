//! The manual page and the shell completions, both generated from the clap definitions, so
//! they never disagree with `--help`.

use std::io::{self, Write};

use clap::CommandFactory;

use crate::cli::Cli;

/// Writes the completion script for `shell`.
pub(crate) fn completions(shell: clap_complete::Shell, out: &mut impl Write) {
    clap_complete::generate(shell, &mut Cli::command(), "filepipe", out);
}

/// Writes the manual page: clap_mangen's sections (name, synopsis, description, options, every
/// subcommand with its own options), then the exit status, the environment and the files.
pub(crate) fn man(out: &mut impl Write) -> io::Result<()> {
    let cmd = Cli::command();
    let page = clap_mangen::Man::new(cmd.clone());
    page.render_title(out)?;
    page.render_name_section(out)?;
    page.render_synopsis_section(out)?;
    page.render_description_section(out)?;
    page.render_options_section(out)?;
    // Not clap_mangen's section, which names a page per subcommand (filepipe-batch(1)...):
    // every subcommand is on this page, in a section of its own below.
    writeln!(out, ".SH SUBCOMMANDS")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        writeln!(
            out,
            ".TP
\\fBfilepipe {}\\fR
{}",
            escape(sub.get_name()),
            escape(&about)
        )?;
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        writeln!(out, ".SH \"{}\"", format!("FILEPIPE {name}").to_uppercase())?;
        let about = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        writeln!(out, "{}", escape(&about))?;
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let flag = match (arg.get_short(), arg.get_long()) {
                (Some(s), Some(l)) => format!("\\-{s}, \\-\\-{l}"),
                (None, Some(l)) => format!("\\-\\-{l}"),
                (Some(s), None) => format!("\\-{s}"),
                (None, None) => format!("<{}>", id.to_uppercase()),
            };
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            writeln!(out, ".TP\n{flag}\n{}", escape(&help))?;
        }
    }
    out.write_all(EXTRA.as_bytes())?;
    page.render_version_section(out)?;
    Ok(())
}

/// Text made safe for roff: a leading dot or quote would start a request, a backslash an
/// escape.
fn escape(text: &str) -> String {
    text.lines()
        .map(|l| {
            let l = l.replace('\\', "\\e").replace('-', "\\-");
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The sections clap does not know: exit status, environment, files.
const EXTRA: &str = r#".SH "EXIT STATUS"
.TP
0
Every file done or deliberately skipped (a watch daemon or a worker stopped by a signal).
.TP
1
Some files failed (each is in the failure log), or a run\-time error stopped the run.
.TP
2
The invocation or the configuration is wrong (or a cluster queue cannot be reached at start):
nothing was processed.
.TP
4, 8 (verify)
\fBfilepipe verify MANIFEST\fR adds bits to its status: 4 when files listed in the manifest
are missing from the tree, 8 when files in the tree are not listed (added), 1 when a file did
not verify, could not be read, or a line is malformed. So 12 means files both missing and
added, 13 that and a mismatch; 2 is never such a bit.
.TP
130, 143
A batch interrupted by SIGINT or SIGTERM (128 + the signal); the summary covers the files done
before it.
.SH ENVIRONMENT
.TP
RUST_LOG
Log filter (tracing\-subscriber syntax); overrides \-v.
.TP
NOTIFY_SOCKET, WATCHDOG_USEC
systemd's notify protocol: READY=1, STATUS=, WATCHDOG=1.
.TP
STATE_DIRECTORY
Where watch mode keeps its SQLite state when \-\-state is not given (systemd sets it).
.SH FILES
.TP
/etc/filepipe/filepipe.toml
The service's configuration (\fBfilepipe watch \-\-config\fR); /etc/filepipe/NAME.toml for
filepipe@NAME.service.
.TP
/etc/filepipe/worker\-NAME.toml
A cluster worker's [worker] table (its queue or queue_file, roots, jobs), for
filepipe\-worker@NAME.service.
.TP
/etc/filepipe/worker\-NAME.env
Optional, for the same unit: FILEPIPE_QUEUE, the queue's URL, which overrides the table's.
.TP
/var/lib/filepipe/filepipe.sqlite
Watch mode's state (one row per file: its stamp, status and digest).
.TP
\&.filepipe.<pid>\-<salt>.<n>.tmp
A named temp file while an output is written; a later run removes those left by a crash.
.SH "SEE ALSO"
gzip(1), zstd(1), sha256sum(1), sha512sum(1), b3sum(1), systemd.service(5), nats\-server(8)
"#;
