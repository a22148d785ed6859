//! Snapshots of a pool's books, and of all pools together.

use std::time::Duration;

/// A consistent snapshot of one pool, taken under its lock.
///
/// `used + available == capacity` always holds in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// The pool's name.
    pub name: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Bytes reserved by live leases.
    pub used: u64,
    /// Bytes free.
    pub available: u64,
    /// Highest `used` since the pool was created.
    pub peak: u64,
    /// Live leases.
    pub active_leases: usize,
    /// Leases handed out, at once or to a waiter.
    pub allocations: u64,
    /// Leases dropped by their owner.
    pub frees: u64,
    /// Allocations that failed (exhausted, too large or timed out).
    pub failures: u64,
    /// Leases revoked by the GC or a scope release.
    pub reclaimed: u64,
    /// Requests waiting for space now.
    pub waiters: usize,
    /// Time spent waiting by requests that finished waiting: granted, timed out, cancelled or released.
    pub total_wait: Duration,
}

/// Snapshots of every pool, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// One snapshot per pool.
    pub pools: Vec<PoolStats>,
}

impl MemoryStats {
    /// The snapshot of the pool with this name.
    pub fn pool(&self, name: &str) -> Option<&PoolStats> {
        self.pools.iter().find(|pool| pool.name == name)
    }

    /// Capacity of all pools together, in bytes (saturating at `u64::MAX`).
    pub fn capacity(&self) -> u64 {
        self.pools.iter().fold(0, |total, pool| total.saturating_add(pool.capacity))
    }

    /// Bytes reserved in all pools together (saturating at `u64::MAX`).
    pub fn used(&self) -> u64 {
        self.pools.iter().fold(0, |total, pool| total.saturating_add(pool.used))
    }
}
