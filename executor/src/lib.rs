//! TaskExecutor: turns a request into a stream of tokens as fast as the engine allows, and never loses
//! memory on the way.
//!
//! A [`TaskExecutor`] admits at most [`max_concurrent`](ExecutorConfig::max_concurrent) generations at
//! once and queues the rest by [`Priority`], refusing at once when its queue is full. Each generation
//! gets its model from the kernel, reserves its kv-cache from the `kv-cache` pool and each step's
//! activations from the `activations` pool (waiting a bounded time under pressure), and runs its steps
//! two deep: the prepare stage of step N+1 beside the compute stage of step N, so at most two steps'
//! activations at once (one when the pool has no room for the second: the overlap waits). Tokens cross a
//! bounded channel, so a slow reader slows the generation instead of filling memory. Transient engine
//! failures are retried with backoff, resuming where the stream stopped; every phase has a time limit.
//! Dropping a [`GenerationStream`] cancels its generation within one step and returns every lease.
//!
//! ```
//! use std::sync::Arc;
//! use usine_engine::{MemoryPlan, ModelSpec, ZeroEngine};
//! use usine_executor::{Event, ExecutorConfig, Request, TaskExecutor};
//! use usine_kernel::{KernelConfig, RuntimeManager};
//! use usine_memory::{MemoryManager, StandardPools};
//! use usine_storage::{Migrations, StorageConfig, StorageManager};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(1 << 30)?)?;
//! let storage = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new())?;
//! let kernel = RuntimeManager::new(KernelConfig::default(), &memory, storage)?;
//! kernel.register_engine(Arc::new(ZeroEngine::new()));
//! kernel.register_model(ModelSpec::new("tiny", "zero", "default"));
//! let executor = TaskExecutor::new(ExecutorConfig::default(), &kernel, &memory)?;
//!
//! let mut stream = executor.generate(Request::prompt("tiny", "Hello").max_tokens(8))?;
//! let mut text = String::new();
//! while let Some(event) = stream.next().await {
//!     match event? {
//!         Event::Token { text: delta, .. } | Event::Text(delta) => text.push_str(&delta),
//!         Event::Finished(usage) => assert_eq!(usage.generated_tokens, 8),
//!         Event::Started { .. } => {}
//!     }
//! }
//! assert_eq!(text, "the zero");
//! # Ok(()) }
//! ```

mod admission;
mod config;
mod error;
mod event;
mod executor;
pub mod metrics;
mod request;
mod run;
mod stream;

pub use config::{
    ConfigError, ExecutorConfig, KvReservation, MAX_BACKOFF, MAX_CHANNEL_CAPACITY, MAX_SLOTS, RetryPolicy,
    TimeoutOverrides, Timeouts,
};
pub use error::{ExecutorError, Phase};
pub use event::{Event, Usage};
pub use executor::{ExecutorStats, TaskExecutor};
pub use request::{Input, Priority, Request};
pub use stream::{GenerationStream, Output};
pub use usine_engine::{Message, Role};
