//! `filepipe status --queue URL`: the cluster as JetStream sees it, from the streams' and the
//! workers' consumers' own counters (one consumer per root), and the workers seen lately from
//! the outcomes they stored. It only looks: a server without filepipe's streams gets none.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use futures_util::StreamExt;

use crate::cluster::wire::OutcomeBatch;
use crate::cluster::{connect_or_await, Missing, Queue, JOBS_STREAM, OUTCOMES_STREAM};

/// How far back a worker's outcomes make it one seen.
const SEEN_WITHIN: Duration = Duration::from_secs(15 * 60);

/// The outcome messages read back at most, newest first, to find the workers seen: each is a
/// request to the server, and a message holds up to a job message's outcomes.
const SEEN_LOOKUPS: u64 = 500;

/// A worker seen in the outcome stream.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    /// Files it stored outcomes of, within `SEEN_WITHIN` (in the messages read).
    files: u64,
    /// Its newest outcome message, seconds since the epoch.
    last: i64,
}

/// Prints the queue's state: totals, then one line per root, then the workers seen.
pub(crate) fn print(queue: &Queue, out: &mut impl Write) -> Result<()> {
    let Some(conn) = connect_or_await(queue, "filepipe-status", Missing::Look)? else {
        writeln!(out, "queue\t{}", queue.shown())?;
        writeln!(
            out,
            "no filepipe streams on this server: no coordinator has run on it (is it the \
             right server?)"
        )?;
        return Ok(());
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (jobs, outcomes_stream, outcomes, consumers) = conn
        .start(async {
            let mut jobs = conn.js.get_stream(JOBS_STREAM).await?;
            let jobs_info = jobs.info().await?.clone();
            let mut outcomes = conn.js.get_stream(OUTCOMES_STREAM).await?;
            let outcomes_info = outcomes.info().await?.clone();
            let mut consumers = Vec::new();
            let mut list = jobs.consumers();
            while let Some(c) = list.next().await {
                consumers.push(c.map_err(|e| anyhow::anyhow!("{e}"))?);
            }
            anyhow::Ok((jobs_info, outcomes, outcomes_info, consumers))
        })
        .context("reading the queue's state")?;
    // On its own: a user who may read the counters but not the stored outcomes still gets
    // the counters (it got nothing: found by a review).
    let since = now - SEEN_WITHIN.as_secs() as i64;
    let seen = conn.start(workers_seen(&outcomes_stream, &outcomes.state, since));
    let sum = |f: fn(&async_nats::jetstream::consumer::Info) -> u64| -> u64 {
        consumers
            .iter()
            .filter(|c| c.name.starts_with("workers-"))
            .map(f)
            .sum()
    };
    writeln!(out, "queue\t{}", queue.shown())?;
    writeln!(
        out,
        "jobs\t{} messages waiting or in flight ({} bytes)",
        jobs.state.messages, jobs.state.bytes
    )?;
    writeln!(out, "pending\t{}", sum(|c| c.num_pending))?;
    writeln!(out, "in flight\t{}", sum(|c| c.num_ack_pending as u64))?;
    writeln!(out, "redelivered\t{}", sum(|c| c.num_redelivered as u64))?;
    // Pull requests, not workers: an idle worker keeps up to two waiting on each root, the
    // next asked for before the last expires ("workers waiting" counted each: found by a
    // review).
    writeln!(out, "requests waiting\t{}", sum(|c| c.num_waiting as u64))?;
    writeln!(
        out,
        "outcomes\t{} messages kept ({} bytes)",
        outcomes.state.messages, outcomes.state.bytes
    )?;
    for c in consumers.iter().filter(|c| c.name.starts_with("workers-")) {
        writeln!(
            out,
            "root {}\tpending {}, in flight {}, redelivered {}, requests waiting {}",
            &c.name["workers-".len()..],
            c.num_pending,
            c.num_ack_pending,
            c.num_redelivered,
            c.num_waiting
        )?;
    }
    let (workers, complete) = match seen {
        Ok(seen) => seen,
        Err(e) => {
            writeln!(
                out,
                "workers seen\tnot known: {}",
                crate::logging::shown(&crate::error::chain(&e))
            )?;
            return Ok(());
        }
    };
    let within = if complete {
        String::new()
    } else {
        format!(", in the last {SEEN_LOOKUPS} outcome messages")
    };
    writeln!(
        out,
        "workers seen\t{} (outcomes stored in the last {} min{within})",
        workers.len(),
        SEEN_WITHIN.as_secs() / 60
    )?;
    let mut workers: Vec<_> = workers.into_iter().collect();
    workers.sort_by(|a, b| b.1.last.cmp(&a.1.last).then_with(|| a.0.cmp(&b.0)));
    for (name, seen) in workers {
        writeln!(
            out,
            "worker {}\t{} files, last {} s ago",
            field(&name),
            seen.files,
            (now - seen.last).max(0)
        )?;
    }
    Ok(())
}

/// The longest worker name shown: a real one is a host name and a pid.
const NAME_MAX: usize = 100;

/// A worker's name as a field of a tab-separated line: what its message says, which anyone
/// allowed to publish outcomes wrote, so with every control character (a tab too: it forged
/// a field), the characters that reorder or hide text on a terminal (bidi controls,
/// zero-width and invisible ones, tags) and backslashes shown escaped, and cut at `NAME_MAX`
/// characters (found by reviews).
fn field(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if i == NAME_MAX {
            out.push_str(&format!(
                "... ({} more bytes)",
                name.len() - out_len(name, i)
            ));
            break;
        }
        let hidden = matches!(c, '\u{00ad}' | '\u{034f}' | '\u{061c}' | '\u{115f}' | '\u{1160}'
            | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}' | '\u{3164}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}'
            | '\u{e0000}'..='\u{e007f}');
        if c == '\\' {
            // Else a name holding the text `\u{9}` reads as one holding a tab.
            out.push_str("\\\\");
        } else if c.is_control() || hidden {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The bytes of `name`'s first `chars` characters.
fn out_len(name: &str, chars: usize) -> usize {
    name.char_indices()
        .nth(chars)
        .map_or(name.len(), |(i, _)| i)
}

/// The workers that stored outcomes since `since` (seconds since the epoch), by name (host
/// and pid, as each says: a name in a message is what its publisher wrote, shown escaped),
/// from the outcome stream's messages read back from its newest, at most `SEEN_LOOKUPS`; and
/// whether every message since `since` was read.
async fn workers_seen(
    stream: &async_nats::jetstream::stream::Stream,
    state: &async_nats::jetstream::stream::State,
    since: i64,
) -> Result<(BTreeMap<String, Seen>, bool)> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    if state.messages == 0 {
        return Ok((seen, true));
    }
    let mut seq = state.last_sequence;
    for _ in 0..SEEN_LOOKUPS {
        if seq < state.first_sequence || seq == 0 {
            return Ok((seen, true));
        }
        let m = match stream.get_raw_message(seq).await {
            Ok(m) => m,
            // Removed (a limit, a deletion): the one before.
            Err(e) if matches!(e.kind(), RawMessageErrorKind::NoMessageFound) => {
                seq -= 1;
                continue;
            }
            Err(e) => return Err(anyhow::anyhow!("reading outcome message {seq}: {e}")),
        };
        let at = m.time.unix_timestamp();
        if at < since {
            return Ok((seen, true));
        }
        seq -= 1;
        // Cancellations are stored there too; a message that does not read says nothing.
        if !m.subject.starts_with("filepipe.outcomes.") {
            continue;
        }
        if let Ok(batch) = OutcomeBatch::parse(&m.payload) {
            let s = seen.entry(batch.worker).or_default();
            s.files += batch.outcomes.len() as u64;
            s.last = s.last.max(at);
        }
    }
    Ok((seen, seq < state.first_sequence))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_name_is_one_field_on_a_line_and_hides_nothing() {
        assert_eq!(field("host-a:1234"), "host-a:1234");
        assert_eq!(
            field("x\nworker fake\t999 files"),
            "x\\u{a}worker fake\\u{9}999 files"
        );
        assert_eq!(field("ab\u{202e}cd\u{200b}"), "ab\\u{202e}cd\\u{200b}");
        assert_eq!(field("\u{1b}[31m"), "\\u{1b}[31m");
        // Told apart from a name holding the escape's text, and no look-alike of another.
        assert_eq!(field("a\\u{9}b"), "a\\\\u{9}b");
        assert_eq!(field("host:1\u{ad}"), "host:1\\u{ad}");
        assert_eq!(field("h\u{e0041}"), "h\\u{e0041}");
        let long = "é".repeat(300);
        let shown = field(&long);
        assert!(shown.starts_with(&"é".repeat(NAME_MAX)), "{shown}");
        assert!(shown.ends_with("... (400 more bytes)"), "{shown}");
    }
}
