//! filepipe: a parallel file-processing pipeline.
//!
//! Data flows `cli` → `config` → a `source` (`walk`, or `watch`) → `pipeline` (bounded
//! channel, workers, sentinels, publishers) → `ops` (gzip, sha256), which reach files through
//! `fsio` → `report` (progress, failure records, summary) → a `sink` (the manifest, or the
//! SQLite `state`). What travels between these stages is in `travel`, which imports none of
//! them. `run` assembles a mode from a source and a sink; `service` supervises one watch
//! pipeline per `[[watch]]` table. `verify` and `status` are commands of their own; `signals`,
//! `logging` and `exit` serve them all. `demo` (feature `demos`) holds the runnable
//! concurrency lessons, apart from the pipeline.

pub mod cli;
pub mod config;
#[cfg(feature = "demos")]
pub mod demo;
pub mod error;
pub mod exit;
pub mod fsio;
pub mod logging;
pub mod manifest;
pub mod ops;
pub mod pipeline;
pub mod report;
pub mod run;
pub mod service;
pub mod signals;
pub mod sink;
pub mod source;
pub mod state;
pub mod status;
mod travel;
pub mod verify;
