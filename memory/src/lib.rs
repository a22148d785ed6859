//! Memory pools for LLM inference: every byte of kv-cache, activations and uniforms, accounted.
//!
//! A [`MemoryManager`] holds named [`Pool`]s of fixed capacity, cut into blocks. Reserving space
//! gives a [`Lease`] that returns its blocks when dropped, so no code path frees by hand.
//!
//! - **Allocate is check-and-reserve in one step**: [`Pool::allocate`] succeeds or fails with the
//!   figures ([`MemoryError::Exhausted`], [`MemoryError::TooLarge`]). [`Pool::can_allocate`] is
//!   advisory only.
//! - **Backpressure**: [`Pool::allocate_wait`] waits up to a timeout, woken when space returns,
//!   first come first served.
//! - **Leases grow and shrink in place** ([`Lease::try_grow`], [`Lease::shrink`]), as a sequence's
//!   kv-cache does, and belong to a [`ScopeId`]: [`MemoryManager::release_scope`] revokes a whole
//!   request's leases at once.
//! - **GC**: leases not [`touch`](Lease::touch)ed for longer than their pool's idle timeout (30 s by
//!   default) are revoked by [`MemoryManager::gc_now`] or the sweeper of
//!   [`MemoryManager::start_gc`]; their blocks return exactly once.
//! - **Events** ([`MemoryManager::subscribe`]) and **stats** ([`MemoryManager::stats`]), and the same
//!   figures through the `metrics` facade (see [`metrics`](crate::metrics)).
//!
//! At every observable point `used + available == capacity`, and once every lease is gone, `used == 0`.
//!
//! All waiting goes through `tokio::time`, so tests run on paused time.
//!
//! ```
//! use std::time::Duration;
//! use usine_memory::{MemoryManager, StandardPools, ScopeId, KV_CACHE, ACTIVATIONS};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), usine_memory::MemoryError> {
//! let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(256 << 20)?)?;
//! let request = ScopeId::fresh();
//!
//! // The sequence's kv-cache grows token by token.
//! let mut kv = memory.allocate(KV_CACHE, 0, request)?;
//! for _token in 0..16 {
//!     kv.try_grow(32 * 1024)?;
//!     // Each step's scratch space; waits up to 500 ms under pressure.
//!     let _step = memory.allocate_wait(ACTIVATIONS, 1 << 20, request, Duration::from_millis(500)).await?;
//! }
//! assert_eq!(kv.len(), 16 * 32 * 1024);
//! drop(kv);
//! assert_eq!(memory.stats().used(), 0);
//! # Ok(()) }
//! ```

mod config;
mod error;
mod events;
mod lease;
mod manager;
pub mod metrics;
mod pool;
mod stats;

pub use config::{
    ACTIVATIONS, DEFAULT_BLOCK_SIZE, DEFAULT_HIGH_WATER_PERCENT, DEFAULT_IDLE_TIMEOUT, DEFAULT_LOW_WATER_PERCENT,
    KV_CACHE, MAX_EVENT_CAPACITY, MAX_POOL_NAME_LEN, ManagerConfig, PoolConfig, StandardPools, UNIFORMS,
};
pub use error::{MemoryError, Result};
pub use events::{Event, EventStream, FailureReason, Lagged, PoolName, PressureLevel, ReclaimReason};
pub use lease::{Lease, LeaseId, ScopeId};
pub use manager::{GcTask, MAX_GC_INTERVAL, MemoryManager, Reclaimed};
pub use pool::Pool;
pub use stats::{MemoryStats, PoolStats};
