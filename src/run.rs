//! The modes, assembled: each is the one pipeline with a different source and sink. Batch
//! mode walks the tree into the manifest sink (with `--state`, a walk that consults the state
//! into a sink that records in it too); watch mode (alone, or one per `[[watch]]` under
//! the service supervisor) watches it into the state sink. With `--queue`, a cluster's workers
//! stand in for the local ones (`cluster`).

use anyhow::{Context, Result};

use crate::config::Config;
use crate::pipeline;
use crate::report::Summary;
use crate::signals::Shutdown;
use crate::sink::incremental::IncrementalSink;
use crate::sink::manifest::ManifestSink;
use crate::sink::state::StateSink;
use crate::source::walk::Walk;
use crate::source::watch::Watch;
use crate::state::State;
use crate::travel::Stats;

/// Runs a batch over `cfg.root` and returns the summary once every file is accounted for.
pub(crate) fn batch(cfg: &Config, shutdown: &Shutdown) -> Result<Summary> {
    let stats = Stats::default();
    if let Some(incremental) = &cfg.incremental {
        // As in watch mode: the sink writes, the walker reads (WAL lets both proceed).
        let state = State::open(&incremental.state_dir, &cfg.root, &cfg.spec)?;
        let reader = State::reader(&incremental.state_dir, &cfg.root, &cfg.spec)?;
        let mut source = Walk::incremental(cfg, shutdown, reader);
        let mut sink = IncrementalSink::new(cfg, state);
        return pipeline::run(cfg, shutdown, &mut source, &mut sink, &stats);
    }
    let mut source = Walk::new(cfg, shutdown);
    let mut sink = ManifestSink::new(cfg);
    pipeline::run(cfg, shutdown, &mut source, &mut sink, &stats)
}

/// Runs watch mode until a shutdown signal (Ok) or a fatal watcher error (Err). `stats` is
/// shared with whoever reports on the daemon (the service supervisor); `stats.ready` is raised
/// once the watches are in place and the initial scan is queued.
pub(crate) fn watch(cfg: &Config, shutdown: &Shutdown, stats: &Stats) -> Result<Summary> {
    let settings = cfg.watch.as_ref().context("watch settings missing")?;
    #[cfg(feature = "cluster")]
    if let Some(q) = &settings.queue {
        // The same watcher and state, the queue's workers in place of local ones.
        let queue = crate::cluster::Queue {
            url: q.url.clone(),
            creds: q.creds.clone(),
            tls_ca: q.tls_ca.clone(),
        };
        return crate::cluster::coordinate_watch(
            cfg,
            &queue,
            (&q.root_name, q.out_root_name.as_deref()),
            &q.move_names,
            shutdown,
            stats,
        );
    }
    // Two connections: the sink writes, the watcher reads (WAL lets both proceed).
    let state = State::open(&settings.state_dir, &cfg.root, &cfg.spec)?;
    let reader = State::reader(&settings.state_dir, &cfg.root, &cfg.spec)?;
    let mut source = Watch::new(cfg, reader, shutdown)?;
    let mut sink = StateSink::new(cfg, state);
    pipeline::run(cfg, shutdown, &mut source, &mut sink, stats)
}
