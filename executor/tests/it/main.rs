//! Integration tests of `usine-executor`, on paused time, with the zero engine slowed down to a known
//! timeline (a prepare stage, a compute stage, a prefill) and faults injected at chosen steps. The
//! lab's model steps alone here; the `batched` target runs the same tests where it batches.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

mod admission;
mod cancel;
mod memory;
mod pipeline;
mod prefix;
mod reader;
mod retry;
mod telemetry;
mod timeouts;

mod lab;

use lab::*;
use usine_engine::scripted::Batching;

/// The lab's model does not batch: each generation steps its sequence on its own.
const BATCHING: Option<Batching> = None;
