//! The executor's integration tests (`tests/it`) again, where the lab's model batches: every
//! generation's steps go through the model's batching loop, and the timelines, resumes, time limits,
//! cancellations and the soak hold as they do where each sequence steps alone.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

#[path = "../it/admission.rs"]
mod admission;
mod batching;
#[path = "../it/cancel.rs"]
mod cancel;
#[path = "../it/memory.rs"]
mod memory;
#[path = "../it/pipeline.rs"]
mod pipeline;
#[path = "../it/prefix.rs"]
mod prefix;
#[path = "../it/reader.rs"]
mod reader;
#[path = "../it/retry.rs"]
mod retry;
#[path = "../it/telemetry.rs"]
mod telemetry;
#[path = "../it/timeouts.rs"]
mod timeouts;

#[path = "../it/lab.rs"]
mod lab;

use std::time::Duration;

use lab::*;
use usine_engine::scripted::Batching;

/// The lab's model batches: up to 8 sequences a pass, each after the first adding 1 ms to the pass.
const BATCHING: Option<Batching> = Some(Batching { max: 8, per_sequence: Duration::from_millis(1) });
