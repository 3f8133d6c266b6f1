//! filepipe: a parallel file-processing pipeline.
//!
//! Data flows `cli` → `config` → a source (`walk`) → `pipeline` (bounded channel, workers,
//! sentinels) → `ops` (gzip, sha256) via `input`/`output` → `report` (progress, manifest,
//! failure log, summary). `watch` is the long-running source, with `state` its SQLite memory.
//! `verify` checks results; `signals` and `logging` serve them all.
//! `demo` (feature `demos`) holds the runnable concurrency lessons, apart from the pipeline.

pub mod cli;
pub mod config;
#[cfg(feature = "demos")]
pub mod demo;
pub mod error;
pub mod exit;
mod fslock;
pub mod input;
pub mod logging;
pub mod manifest;
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod report;
pub mod service;
pub mod signals;
pub mod state;
pub mod status;
mod travel;
pub mod verify;
pub mod walk;
pub mod watch;
