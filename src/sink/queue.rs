//! A cluster worker's sink: each outcome published to its run's outcome subject, and stored by
//! JetStream (its publish acknowledged) before the flush returns, so the source acknowledges a
//! job only once its outcomes are safe. A file abandoned here (a second signal) is not
//! published: it is handed back for another worker (`Disposition::Retry`).

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;

use crate::cluster::outcomes_subject;
use crate::cluster::wire::{fitting, OutcomeBatchOut, WireOutcome, VERSION};
use crate::error::Kind;
use crate::sink::{Disposition, Sink};
use crate::travel::Outcome;

/// Most outcomes in one message: well under the server's message size limit.
const PER_MESSAGE: usize = 500;

/// How long a publish is retried (the server restarting, a leader moving) before the run
/// stops; its jobs are then redelivered to another worker.
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);

/// The sink.
pub(crate) struct QueueSink {
    rt: tokio::runtime::Handle,
    js: jetstream::Context,
    run: String,
    worker: String,
    unsent: Vec<WireOutcome>,
    /// Drawn at random per sink: message ids stay unique when a worker starts a second
    /// pipeline for the same run (the first stopped when idle) within the duplicate window.
    nonce: u32,
    sent: u64,
    /// A publish gave up: later flushes fail at once (the run is stopping; a sink that retried
    /// again each time would hold its jobs for minutes more).
    gave_up: bool,
}

impl QueueSink {
    /// A sink for `run`'s outcomes, publishing through `js` (on the runtime `rt`).
    pub(crate) fn new(
        rt: tokio::runtime::Handle,
        js: jetstream::Context,
        run: String,
        worker: String,
    ) -> Self {
        QueueSink {
            rt,
            js,
            run,
            worker,
            unsent: Vec::new(),
            nonce: {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(0);
                h.finish() as u32
            },
            sent: 0,
            gave_up: false,
        }
    }

    /// Publishes `payload` and waits for JetStream to store it, retrying with a growing pause
    /// through an outage, under one message id so a retry is never stored twice.
    fn publish(&mut self, payload: Vec<u8>) -> Result<()> {
        self.sent += 1;
        // Unique to this run, worker and message: a retry is stored once, and no other
        // pipeline's message (a later run on the same worker) is ever mistaken for it.
        let id = format!(
            "{}.{}.{:08x}.{}",
            self.run, self.worker, self.nonce, self.sent
        );
        let subject = outcomes_subject(&self.run);
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let sent = self.rt.block_on(async {
                let ack = self
                    .js
                    .publish_with_headers(subject.clone(), headers, payload.clone().into())
                    .await?;
                ack.await.map_err(anyhow::Error::from)
            });
            match sent {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() < GIVE_UP_AFTER => {
                    tracing::warn!(error = %e, "publishing outcomes failed; retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    return Err(e).context(format!(
                        "publishing outcomes to {subject}: gave up after {GIVE_UP_AFTER:?}"
                    ))
                }
            }
        }
    }
}

impl Sink for QueueSink {
    fn outcome(&mut self, outcome: &Outcome) -> Result<Disposition> {
        if let Outcome::Skipped { reason, .. } = outcome {
            if reason.kind == Kind::Interrupted {
                return Ok(Disposition::Retry(Duration::ZERO));
            }
        }
        self.unsent.push(WireOutcome::of(outcome));
        Ok(Disposition::Final)
    }

    fn flush(&mut self) -> Result<()> {
        if self.gave_up && !self.unsent.is_empty() {
            anyhow::bail!("outcomes not published: an earlier publish gave up");
        }
        while !self.unsent.is_empty() {
            let (n, payload) = fitting(&self.unsent, PER_MESSAGE, |part| {
                serde_json::to_vec(&OutcomeBatchOut {
                    v: VERSION,
                    run: &self.run,
                    worker: &self.worker,
                    outcomes: part,
                })
            })?;
            if let Err(e) = self.publish(payload) {
                self.gave_up = true;
                return Err(e);
            }
            self.unsent.drain(..n);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.flush()
    }
}
