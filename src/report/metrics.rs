//! Prometheus metrics (`--metrics ADDR:PORT`): what a daemon did and is doing, served on
//! `/metrics` by metrics-exporter-prometheus from a thread and runtime of its own, so a scrape
//! never waits on the pipeline and the pipeline never waits on a scrape. Without `--metrics`
//! no recorder is installed and every update below is a no-op.
//!
//! Every series carries the pipeline's root (`pipeline`): a service runs one per `[[watch]]`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Result};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::config::Config;
use crate::sink::Disposition;
use crate::travel::{Outcome, Stats};

/// The delays a file's output is published after the file was last written, in seconds:
/// from a settle time of well under a second to a retry an hour later.
const DELAY_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];

/// Starts serving `/metrics` on `addr` and installs the recorder. A port already in use, or
/// an address that cannot be bound, is an error here, at start.
/// Whether `serve` installed a recorder: without one, meters do no work at all (the label
/// strings of a series would otherwise be built per file on a batch's hot path, for nothing).
static ON: AtomicBool = AtomicBool::new(false);

pub(crate) fn serve(addr: SocketAddr) -> Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(DELAY.into()),
            &DELAY_BUCKETS,
        )
        .and_then(|b| b.install())
        .map_err(|e| anyhow!("cannot serve metrics on {addr}: {e}"))?;
    ON.store(true, Ordering::Relaxed);
    describe();
    gauge!("filepipe_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    Ok(())
}

const DELAY: &str = "filepipe_publish_delay_seconds";

/// HELP and unit lines for every series.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "filepipe_files_total",
        "Files that ended, by outcome (done, skipped, failed) and reason"
    );
    describe_counter!(
        "filepipe_retries_total",
        "Failed attempts that will be tried again, by reason"
    );
    describe_counter!(
        "filepipe_input_bytes_total",
        Unit::Bytes,
        "Bytes read from the files done"
    );
    describe_counter!(
        "filepipe_output_bytes_total",
        Unit::Bytes,
        "Bytes written for the files done (compressed outputs)"
    );
    describe_gauge!(
        "filepipe_queued_files",
        "Files waiting to settle or for a worker"
    );
    describe_gauge!(
        "filepipe_in_flight_files",
        "Files the workers have and have not finished"
    );
    describe_gauge!(
        "filepipe_retrying_files",
        "Files waiting to be tried again after a transient failure"
    );
    describe_histogram!(
        DELAY,
        Unit::Seconds,
        "From a file's last write (its mtime) to its output published and recorded"
    );
    describe_counter!(
        "filepipe_rescans_total",
        "Whole-tree rescans, by cause (overflow: the kernel dropped events; poll: --poll)"
    );
    describe_gauge!(
        "filepipe_state_commit_timestamp_seconds",
        Unit::Seconds,
        "When the state last committed outcomes (Unix time)"
    );
    describe_gauge!("filepipe_build_info", "The running build (value 1)");
}

/// The pipeline's name in its series: its root.
fn pipeline(cfg: &Config) -> String {
    cfg.root.display().to_string()
}

/// One pipeline's meters, for its reporter.
pub(crate) struct Meter {
    pipeline: String,
    op: &'static str,
    bytes_in: Counter,
    bytes_out: Counter,
    queued: Gauge,
    in_flight: Gauge,
    retrying: Gauge,
    delay: Histogram,
}

impl Meter {
    pub(crate) fn new(cfg: &Config, op: &'static str) -> Meter {
        let pipeline = pipeline(cfg);
        let p = pipeline.clone();
        Meter {
            bytes_in: counter!("filepipe_input_bytes_total", "pipeline" => p.clone(), "op" => op),
            bytes_out: counter!("filepipe_output_bytes_total", "pipeline" => p.clone(), "op" => op),
            queued: gauge!("filepipe_queued_files", "pipeline" => p.clone()),
            in_flight: gauge!("filepipe_in_flight_files", "pipeline" => p.clone()),
            retrying: gauge!("filepipe_retrying_files", "pipeline" => p.clone()),
            delay: histogram!(DELAY, "pipeline" => p, "op" => op),
            pipeline,
            op,
        }
    }

    /// One outcome, as the sink disposed of it.
    pub(crate) fn outcome(&self, outcome: &Outcome, disposition: &Disposition) {
        if !ON.load(Ordering::Relaxed) {
            return;
        }
        let (ended, reason) = match outcome {
            Outcome::Done { done, .. } => {
                self.bytes_in.increment(done.bytes_in);
                self.bytes_out.increment(done.bytes_out);
                if let Some(stamp) = done.stamp {
                    let written = SystemTime::UNIX_EPOCH
                        + Duration::from_nanos(u64::try_from(stamp.mtime_ns).unwrap_or(0));
                    // A file dated in the future (clock skew, touch -d) says nothing.
                    if let Ok(delay) = SystemTime::now().duration_since(written) {
                        self.delay.record(delay.as_secs_f64());
                    }
                }
                ("done", "")
            }
            Outcome::Skipped { reason, .. } => ("skipped", reason.kind.as_str()),
            Outcome::Failed { error, .. } => {
                if matches!(disposition, Disposition::Retry(_)) {
                    counter!("filepipe_retries_total", "pipeline" => self.pipeline.clone(), "op" => self.op, "reason" => error.kind.as_str())
                        .increment(1);
                    return;
                }
                ("failed", error.kind.as_str())
            }
        };
        counter!(
            "filepipe_files_total",
            "pipeline" => self.pipeline.clone(),
            "op" => self.op,
            "outcome" => ended,
            "reason" => reason
        )
        .increment(1);
    }

    /// The queue lengths the source keeps in `stats`.
    pub(crate) fn gauges(&self, stats: &Stats) {
        use std::sync::atomic::Ordering::Relaxed;
        if !ON.load(Relaxed) {
            return;
        }
        self.queued.set(stats.queued.load(Relaxed) as f64);
        self.in_flight.set(stats.in_flight.load(Relaxed) as f64);
        self.retrying.set(stats.retrying.load(Relaxed) as f64);
    }
}

/// A whole-tree rescan of `cfg`'s root, and why.
pub(crate) fn rescan(cfg: &Config, cause: &'static str) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    counter!("filepipe_rescans_total", "pipeline" => pipeline(cfg), "cause" => cause).increment(1);
}

/// `cfg`'s state committed outcomes just now.
pub(crate) fn committed(cfg: &Config) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!("filepipe_state_commit_timestamp_seconds", "pipeline" => pipeline(cfg)).set(now);
}
