//! Integration tests of `usine-memory`: one test binary, one module per capability.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

mod backpressure;
mod blocks;
mod blocks_model;
mod concurrency;
mod events;
mod gc;
mod leases;
mod model;
mod pools;
mod telemetry;

use usine_memory::{MemoryManager, Pool, PoolConfig, PoolStats};

/// A manager with one pool of `blocks` blocks of 1 KiB, never collected by the GC.
fn one_pool(blocks: u64) -> (MemoryManager, Pool) {
    let memory = MemoryManager::default();
    let pool = memory.create_pool("test", PoolConfig::new(blocks * 1024, 1024).idle_timeout(None)).unwrap();
    (memory, pool)
}

/// The invariant that holds at every observable point.
#[track_caller]
fn assert_books_balance(stats: &PoolStats) {
    assert_eq!(stats.used + stats.available, stats.capacity, "{stats:?}");
    assert!(stats.peak >= stats.used, "{stats:?}");
    assert_eq!(stats.used % stats.block_size, 0, "{stats:?}");
}
