//! The crate's metrics, through the `metrics` facade: names, descriptions, and per-pool handles.
//!
//! Handles are registered once, when a pool is created, with the recorder installed at that time; an
//! allocation then costs a few atomic updates, and nothing at all without a recorder.

use metrics::{Counter, Gauge, Histogram, Unit, describe_counter, describe_gauge, describe_histogram};

use crate::events::{FailureReason, ReclaimReason};

/// Capacity of a pool.
pub const POOL_CAPACITY_BYTES: &str = "usine_memory_pool_capacity_bytes";
/// Bytes reserved by live leases.
pub const POOL_USED_BYTES: &str = "usine_memory_pool_used_bytes";
/// Highest use seen.
pub const POOL_PEAK_BYTES: &str = "usine_memory_pool_peak_bytes";
/// Live leases.
pub const POOL_LEASES: &str = "usine_memory_pool_leases";
/// Requests waiting for space.
pub const POOL_WAITERS: &str = "usine_memory_pool_waiters";
/// Leases handed out.
pub const ALLOCATIONS_TOTAL: &str = "usine_memory_allocations_total";
/// Leases dropped by their owner.
pub const FREES_TOTAL: &str = "usine_memory_frees_total";
/// Failed allocations, by reason.
pub const ALLOCATION_FAILURES_TOTAL: &str = "usine_memory_allocation_failures_total";
/// Leases revoked, by reason.
pub const RECLAIMED_TOTAL: &str = "usine_memory_reclaimed_total";
/// How long requests waited for space.
pub const WAIT_DURATION_SECONDS: &str = "usine_memory_wait_duration_seconds";

/// Blocks of the kv block spaces over a pool, by state: `in_use`, `cached` or `free` (summed over the
/// spaces of the pool, one per loaded model).
pub const KV_BLOCKS: &str = "usine_memory_kv_blocks";
/// Tokens a sequence's start looked up in the prefix cache, by outcome: `hit` (found, not computed
/// again) or `miss`.
pub const KV_PREFIX_TOKENS_TOTAL: &str = "usine_memory_kv_prefix_tokens_total";
/// Bytes of a pool that cached kv blocks hold (kept for a prefix hit, no sequence holding them): the
/// part of the pool's use that outlives every generation.
pub const KV_CACHED_BYTES: &str = "usine_memory_kv_cached_bytes";
/// Cached kv blocks dropped from the cache other than by a hit.
pub const KV_EVICTIONS_TOTAL: &str = "usine_memory_kv_evictions_total";

/// Describes every metric of this crate to the installed recorder.
///
/// [`MemoryManager`](crate::MemoryManager) calls it when it is built; calling it again is harmless.
pub fn describe_metrics() {
    describe_gauge!(POOL_CAPACITY_BYTES, Unit::Bytes, "Capacity of a memory pool.");
    describe_gauge!(
        POOL_USED_BYTES,
        Unit::Bytes,
        "Bytes of a memory pool reserved by live leases (the weights pool holds idle models kept alive too)."
    );
    describe_gauge!(POOL_PEAK_BYTES, Unit::Bytes, "Highest use of a memory pool since it was created.");
    describe_gauge!(POOL_LEASES, Unit::Count, "Live leases of a memory pool.");
    describe_gauge!(POOL_WAITERS, Unit::Count, "Requests waiting for space in a memory pool.");
    describe_counter!(ALLOCATIONS_TOTAL, Unit::Count, "Leases handed out by a memory pool.");
    describe_counter!(FREES_TOTAL, Unit::Count, "Leases dropped by their owner and returned to a pool.");
    describe_counter!(
        ALLOCATION_FAILURES_TOTAL,
        Unit::Count,
        "Failed allocations, by reason: exhausted, too_large, timed_out."
    );
    describe_counter!(RECLAIMED_TOTAL, Unit::Count, "Leases revoked, by reason: idle (GC) or scope.");
    describe_histogram!(
        WAIT_DURATION_SECONDS,
        Unit::Seconds,
        "Time requests waited for space in a memory pool: granted, timed out, cancelled or released."
    );
    describe_gauge!(
        KV_BLOCKS,
        Unit::Count,
        "Kv-cache blocks over a memory pool, by state: in_use (held by sequences), cached (kept for a prefix hit), free."
    );
    describe_gauge!(
        KV_CACHED_BYTES,
        Unit::Bytes,
        "Bytes of a memory pool held by cached kv blocks (kept for a prefix hit, held by no sequence)."
    );
    describe_counter!(
        KV_PREFIX_TOKENS_TOTAL,
        Unit::Count,
        "Prompt tokens looked up in the kv prefix cache, by outcome: hit (kv reused) or miss (computed)."
    );
    describe_counter!(
        KV_EVICTIONS_TOTAL,
        Unit::Count,
        "Cached kv-cache blocks dropped other than by a hit: reused for new blocks, revoked by the GC, or unreachable."
    );
}

/// The metric handles of the kv block spaces over one pool. Gauges move by differences, so that the
/// spaces of several models over one pool add up.
pub(crate) struct BlockMetrics {
    pub(crate) in_use: Gauge,
    pub(crate) cached: Gauge,
    pub(crate) cached_bytes: Gauge,
    pub(crate) free: Gauge,
    pub(crate) hit_tokens: Counter,
    pub(crate) miss_tokens: Counter,
    pub(crate) evictions: Counter,
}

impl BlockMetrics {
    pub(crate) fn register(pool: &str) -> Self {
        let blocks = |state: &'static str| metrics::gauge!(KV_BLOCKS, "pool" => pool.to_owned(), "state" => state);
        let tokens = |outcome: &'static str| metrics::counter!(KV_PREFIX_TOKENS_TOTAL, "pool" => pool.to_owned(), "outcome" => outcome);
        Self {
            in_use: blocks("in_use"),
            cached: blocks("cached"),
            cached_bytes: metrics::gauge!(KV_CACHED_BYTES, "pool" => pool.to_owned()),
            free: blocks("free"),
            hit_tokens: tokens("hit"),
            miss_tokens: tokens("miss"),
            evictions: metrics::counter!(KV_EVICTIONS_TOTAL, "pool" => pool.to_owned()),
        }
    }
}

/// The metric handles of one pool.
pub(crate) struct PoolMetrics {
    pub(crate) used: Gauge,
    pub(crate) peak: Gauge,
    pub(crate) leases: Gauge,
    pub(crate) waiters: Gauge,
    pub(crate) allocations: Counter,
    pub(crate) frees: Counter,
    failures: [Counter; 3],
    reclaimed: [Counter; 2],
    pub(crate) wait: Histogram,
}

impl PoolMetrics {
    pub(crate) fn register(pool: &str, capacity: u64) -> Self {
        let label = || [("pool", pool.to_owned())];
        let failure = |reason: FailureReason| metrics::counter!(ALLOCATION_FAILURES_TOTAL, "pool" => pool.to_owned(), "reason" => reason.as_str());
        let reclaimed = |reason: ReclaimReason| metrics::counter!(RECLAIMED_TOTAL, "pool" => pool.to_owned(), "reason" => reason.as_str());
        metrics::gauge!(POOL_CAPACITY_BYTES, &label()).set(to_f64(capacity));
        Self {
            used: metrics::gauge!(POOL_USED_BYTES, &label()),
            peak: metrics::gauge!(POOL_PEAK_BYTES, &label()),
            leases: metrics::gauge!(POOL_LEASES, &label()),
            waiters: metrics::gauge!(POOL_WAITERS, &label()),
            allocations: metrics::counter!(ALLOCATIONS_TOTAL, &label()),
            frees: metrics::counter!(FREES_TOTAL, &label()),
            failures: [
                failure(FailureReason::Exhausted),
                failure(FailureReason::TooLarge),
                failure(FailureReason::TimedOut),
            ],
            reclaimed: [reclaimed(ReclaimReason::Idle), reclaimed(ReclaimReason::Scope)],
            wait: metrics::histogram!(WAIT_DURATION_SECONDS, &label()),
        }
    }

    pub(crate) fn failure(&self, reason: FailureReason) -> &Counter {
        &self.failures[match reason {
            FailureReason::Exhausted => 0,
            FailureReason::TooLarge => 1,
            FailureReason::TimedOut => 2,
        }]
    }

    pub(crate) fn reclaimed(&self, reason: ReclaimReason) -> &Counter {
        &self.reclaimed[match reason {
            ReclaimReason::Idle => 0,
            ReclaimReason::Scope => 1,
        }]
    }
}

/// Byte and count figures as gauge values; exact up to 2^53, far beyond any pool.
#[allow(clippy::cast_precision_loss, reason = "exact below 2^53 bytes (8 PiB)")]
pub(crate) fn to_f64(value: u64) -> f64 {
    value as f64
}
