//! Cross-crate scenarios: the kernel with a simulated engine, the memory pools and the graph store
//! together, on paused time.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

mod candle;
mod executor;
mod kernel;
mod logs;
