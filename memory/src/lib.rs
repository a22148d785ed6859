#![doc = include_str!("../README.md")]

mod blocks;
mod config;
mod error;
mod events;
mod lease;
mod manager;
pub mod metrics;
mod pool;
mod stats;

pub use blocks::{BlockInfo, BlockStats, BlockTable, DEFAULT_BLOCK_TOKENS, KvBlocks, PublishedBlock};
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
