//! filepipe: a parallel file-processing pipeline. The binary calls `main`; nothing else is
//! public.
//!
//! Data flows `cli` → `config` → a `source` (`walk`, or `watch`) → `pipeline` (bounded
//! channel, workers, sentinels, publishers) → `ops` (gzip, the hashes), which reach files through
//! `fsio` → `report` (progress, failure records, summary) → a `sink` (the manifest, or the
//! SQLite `state`). What travels between these stages is in `travel`, which imports none of
//! them. `run` assembles a mode from a source and a sink; `service` supervises one watch
//! pipeline per `[[watch]]` table. `verify` and `status` are commands of their own; `signals`,
//! `logging`, `secret` and `exit` serve them all. `demo` (feature `demos`) holds the runnable
//! concurrency lessons, apart from the pipeline.

// A few system calls need it (rustix does not wrap them); each such function says why it is
// sound, and allows it there alone.
#![deny(unsafe_code)]

mod app;
mod cli;
#[cfg(feature = "cluster")]
mod cluster;
mod config;
#[cfg(feature = "demos")]
mod demo;
mod digest;
mod docs;
mod error;
mod exit;
mod fsio;
mod logging;
mod manifest;
mod ops;
mod pipeline;
mod report;
mod run;
mod secret;
mod service;
mod signals;
mod sink;
mod source;
mod state;
mod status;
mod travel;
mod verify;

pub use app::main;
