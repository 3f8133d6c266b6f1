//! `filepipe status --queue URL`: the cluster as JetStream sees it, from the streams' and the
//! workers' consumer's own counters.

use std::io::Write;

use anyhow::{Context, Result};
use async_nats::jetstream::consumer::PullConsumer;

use crate::cluster::{connect, Queue, JOBS_STREAM, OUTCOMES_STREAM, WORKERS};

/// Prints the queue's state.
pub(crate) fn print(queue: &Queue, out: &mut impl Write) -> Result<()> {
    let conn = connect(queue, "filepipe-status")?;
    let (jobs, outcomes, workers) = conn
        .rt
        .block_on(async {
            let mut jobs = conn.js.get_stream(JOBS_STREAM).await?;
            let jobs_info = jobs.info().await?.clone();
            let mut outcomes = conn.js.get_stream(OUTCOMES_STREAM).await?;
            let outcomes_info = outcomes.info().await?.clone();
            let mut c: PullConsumer = jobs
                .get_consumer(WORKERS)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let c_info = c.info().await?.clone();
            anyhow::Ok((jobs_info, outcomes_info, c_info))
        })
        .context("reading the queue's state")?;
    writeln!(out, "queue\t{}", queue.url)?;
    writeln!(
        out,
        "jobs\t{} messages waiting or in flight ({} bytes)",
        jobs.state.messages, jobs.state.bytes
    )?;
    writeln!(out, "pending\t{}", workers.num_pending)?;
    writeln!(out, "in flight\t{}", workers.num_ack_pending)?;
    writeln!(out, "redelivered\t{}", workers.num_redelivered)?;
    writeln!(out, "workers waiting\t{}", workers.num_waiting)?;
    writeln!(
        out,
        "outcomes\t{} messages kept ({} bytes)",
        outcomes.state.messages, outcomes.state.bytes
    )?;
    Ok(())
}
