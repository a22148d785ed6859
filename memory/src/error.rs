//! The one error type of the crate: every variant carries the figures a user needs to act on it.

use std::time::Duration;

use crate::lease::LeaseId;

/// Everything that can go wrong in `usine-memory`.
///
/// Messages are lowercase, without a trailing period, and name the pool and the figures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// No pool has this name.
    #[error("unknown pool `{pool}` (known pools: {})", known.join(", "))]
    UnknownPool {
        /// The name that was asked for.
        pool: String,
        /// The pools that exist, sorted.
        known: Vec<String>,
    },
    /// A pool with this name already exists.
    #[error("pool `{pool}` already exists")]
    DuplicatePool {
        /// The name that is taken.
        pool: String,
    },
    /// A pool name that cannot be used (it becomes a metric label, so it is kept short and plain).
    #[error("invalid pool name `{name}`: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A pool must hold at least one block.
    #[error("pool `{pool}` has zero capacity")]
    ZeroCapacity {
        /// The pool being created.
        pool: String,
    },
    /// The block size is zero or does not divide the capacity.
    #[error("pool `{pool}`: block size {block_size} bytes does not divide capacity {capacity} bytes")]
    BlockSize {
        /// The pool being created.
        pool: String,
        /// Its capacity in bytes.
        capacity: u64,
        /// The offending block size in bytes.
        block_size: u64,
    },
    /// The water marks are percentages of capacity with `low < high <= 100`.
    #[error("pool `{pool}`: water marks must satisfy low < high <= 100 %, got high {high} %, low {low} %")]
    WaterMarks {
        /// The pool being created.
        pool: String,
        /// The high-water mark asked for.
        high: u8,
        /// The low-water mark asked for.
        low: u8,
    },
    /// Not enough free space right now; it may succeed later (see [`Pool::allocate_wait`](crate::Pool::allocate_wait)).
    #[error(
        "pool `{pool}` exhausted: requested {requested} bytes, {available} available{}",
        if *waiters > 0 { format!(", {waiters} waiters queued first") } else { String::new() }
    )]
    Exhausted {
        /// The pool asked.
        pool: String,
        /// Bytes requested (before rounding up to whole blocks).
        requested: u64,
        /// Bytes free in the pool at that moment.
        available: u64,
        /// Waiters ahead in the queue; a new request never overtakes them.
        waiters: usize,
    },
    /// The request exceeds the pool's whole capacity and can never succeed.
    #[error("request of {requested} bytes exceeds the whole capacity of pool `{pool}` ({capacity} bytes)")]
    TooLarge {
        /// The pool asked.
        pool: String,
        /// Bytes requested.
        requested: u64,
        /// The pool's capacity in bytes.
        capacity: u64,
    },
    /// Waited the whole timeout without the space coming free.
    #[error("timed out after {waited:?} waiting for {requested} bytes in pool `{pool}` ({available} available)")]
    TimedOut {
        /// The pool asked.
        pool: String,
        /// Bytes requested.
        requested: u64,
        /// Bytes free when the wait gave up.
        available: u64,
        /// How long the request waited.
        waited: Duration,
    },
    /// The lease was taken back by the GC or by [`MemoryManager::release_scope`](crate::MemoryManager::release_scope).
    #[error("lease {lease} of pool `{pool}` was revoked")]
    Revoked {
        /// The pool the lease came from.
        pool: String,
        /// The revoked lease.
        lease: LeaseId,
    },
    /// A kv block space that cannot be laid over its pool (see [`KvBlocks::new`](crate::KvBlocks::new)).
    #[error(
        "invalid kv blocks of {block_tokens} tokens at {bytes_per_token} bytes a token over pool `{pool}` ({capacity} bytes): {reason}"
    )]
    InvalidKvBlocks {
        /// The pool.
        pool: String,
        /// Its capacity in bytes.
        capacity: u64,
        /// Tokens per block asked for.
        block_tokens: u32,
        /// Kv bytes per token asked for.
        bytes_per_token: u64,
        /// Which rule they break.
        reason: &'static str,
    },
    /// A block table was passed to a kv block space other than the one that made it.
    #[error("the block table belongs to another kv block space (over pool `{pool}`)")]
    ForeignBlockTable {
        /// The pool of the table's own space.
        pool: String,
    },
    /// Waiting and the GC sweeper need a tokio runtime (with time enabled).
    #[error("no tokio runtime to {purpose}")]
    NoRuntime {
        /// What needed it.
        purpose: &'static str,
    },
    /// The request's scope was released while it waited for space.
    #[error("the {scope} was released while waiting for space in pool `{pool}`")]
    ScopeReleased {
        /// The pool waited on.
        pool: String,
        /// The released scope.
        scope: crate::lease::ScopeId,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = MemoryError> = std::result::Result<T, E>;
