//! RuntimeManager: compile once, keep the right models resident, and get a model ready as fast as
//! possible when a user asks for it.
//!
//! A [`RuntimeManager`] knows engines by name and models by id. [`load_model`](RuntimeManager::load_model)
//! hands out a model already in memory at once; else it loads the graph stored by `usine-storage`;
//! else the engine compiles it (with progress events), the graph is saved, and loaded. Concurrent loads
//! of a model share one load, and across processes the store's key lock makes one compile while the
//! others wait and read. A [`ModelHandle`] keeps its model loaded; idle models leave after their
//! [`KeepAlive`], or least recently used first when another model needs their room in the weights pool
//! (or the limit of loaded models is reached). A load that finds no room waits up to its timeout, then
//! fails with the figures.
//!
//! The kernel never names a concrete engine: they are registered at run time.
//!
//! ```
//! use std::sync::Arc;
//! use usine_engine::{ModelSpec, ZeroEngine};
//! use usine_kernel::{KernelConfig, LoadSource, RuntimeManager};
//! use usine_memory::MemoryManager;
//! use usine_storage::{Migrations, StorageConfig, StorageManager};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let storage = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new())?;
//! let kernel = RuntimeManager::new(KernelConfig::default(), &MemoryManager::default(), storage)?;
//! kernel.register_engine(Arc::new(ZeroEngine::new()));
//! kernel.register_model(ModelSpec::new("tiny", "zero", "default"));
//!
//! let model = kernel.load_model("tiny").await?;
//! assert_eq!(model.source(), LoadSource::Compile); // the first time
//! assert_eq!(kernel.load_model("tiny").await?.source(), LoadSource::Compile); // same model, in memory
//! assert_eq!(kernel.stats().memory_hits, 1);
//! # Ok(()) }
//! ```

mod catalog;
mod config;
mod error;
mod events;
mod handle;
mod loads;
mod logs;
pub mod metrics;
mod progress;
mod reaper;
mod runtime;
mod schedule;
mod table;
mod telemetry;
mod usage;

pub use config::{KeepAlive, KernelConfig, LoadOptions};
pub use error::{Holder, KernelError};
pub use events::{EvictReason, KernelEvent, LoadSource};
pub use handle::ModelHandle;
pub use progress::{ProgressEnd, ProgressStream};
pub use runtime::RuntimeManager;
pub use table::ModelInfo;
pub use telemetry::KernelStats;
