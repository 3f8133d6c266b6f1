//! `filepipe status --queue URL`: the cluster as JetStream sees it, from the streams' and the
//! workers' consumers' own counters (one consumer per root).

use std::io::Write;

use anyhow::{Context, Result};
use futures_util::StreamExt;

use crate::cluster::{connect, Queue, JOBS_STREAM, OUTCOMES_STREAM};

/// Prints the queue's state: totals, then one line per root.
pub(crate) fn print(queue: &Queue, out: &mut impl Write) -> Result<()> {
    let conn = connect(queue, "filepipe-status")?;
    let (jobs, outcomes, consumers) = conn
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
            anyhow::Ok((jobs_info, outcomes_info, consumers))
        })
        .context("reading the queue's state")?;
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
    writeln!(out, "workers waiting\t{}", sum(|c| c.num_waiting as u64))?;
    writeln!(
        out,
        "outcomes\t{} messages kept ({} bytes)",
        outcomes.state.messages, outcomes.state.bytes
    )?;
    for c in consumers.iter().filter(|c| c.name.starts_with("workers-")) {
        writeln!(
            out,
            "root {}\tpending {}, in flight {}, redelivered {}, workers waiting {}",
            &c.name["workers-".len()..],
            c.num_pending,
            c.num_ack_pending,
            c.num_redelivered,
            c.num_waiting
        )?;
    }
    Ok(())
}
