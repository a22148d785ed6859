//! The kernel's error: what failed, for which model, with the figures.

use std::sync::Arc;
use std::time::Duration;

use usine_engine::EngineError;

/// A model holding memory, named in an out-of-memory error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The model.
    pub model: String,
    /// Its weights, in bytes.
    pub bytes: u64,
    /// Why it could not be evicted: "pinned" or "in use".
    pub why: &'static str,
}

/// Everything that can go wrong in the kernel. Cheap to clone: concurrent loads of one model share one
/// outcome.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// No model with this id in the catalog.
    #[error("unknown model `{model}` (known: {})", known.join(", "))]
    UnknownModel {
        /// The id asked for.
        model: String,
        /// The catalog, sorted.
        known: Vec<String>,
    },
    /// The model's engine is not registered.
    #[error("model `{model}` needs engine `{engine}`, which is not registered (registered: {})", known.join(", "))]
    UnknownEngine {
        /// The model.
        model: String,
        /// The engine it names.
        engine: String,
        /// The registered engines, sorted.
        known: Vec<String>,
    },
    /// The engine failed.
    #[error("model `{model}`: {source}")]
    Engine {
        /// The model.
        model: String,
        /// The engine's error.
        source: EngineError,
    },
    /// The graph store failed (not a miss: misses compile again).
    #[error("model `{model}`: graph store: {source}")]
    Storage {
        /// The model.
        model: String,
        /// The store's error.
        source: Arc<usine_storage::StorageError>,
    },
    /// The memory pools failed in a way that is not a lack of memory.
    #[error("model `{model}`: memory: {source}")]
    Memory {
        /// The model.
        model: String,
        /// The pools' error.
        source: usine_memory::MemoryError,
    },
    /// The model's weights can never fit the weights pool.
    #[error("model `{model}` needs {needed} bytes of weights, more than the whole pool ({capacity} bytes)")]
    TooLarge {
        /// The model.
        model: String,
        /// Its weights.
        needed: u64,
        /// The pool's capacity.
        capacity: u64,
    },
    /// Waited the whole load timeout for room, and none came: every model in the way is pinned or in use.
    #[error(
        "model `{model}` needs {needed} bytes of weights; {free} free after {waited:?}, held by {}",
        holders.iter().map(|h| format!("`{}` ({} bytes, {})", h.model, h.bytes, h.why)).collect::<Vec<_>>().join(", ")
    )]
    OutOfMemory {
        /// The model.
        model: String,
        /// Its weights.
        needed: u64,
        /// Bytes free when the wait ended.
        free: u64,
        /// How long it waited.
        waited: Duration,
        /// The models that could not be evicted.
        holders: Vec<Holder>,
    },
    /// Waited the whole load timeout for a slot under the limit of loaded models.
    #[error("model `{model}`: {limit} models are loaded (the limit) and none may be unloaded after {waited:?}")]
    TooManyLoaded {
        /// The model.
        model: String,
        /// The limit.
        limit: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// The kernel needs a tokio runtime.
    #[error("no tokio runtime to run the kernel on")]
    NoRuntime,
    /// The weights pool could not be made.
    #[error("the weights pool: {source}")]
    WeightsPool {
        /// The memory manager's error.
        source: usine_memory::MemoryError,
    },
    /// Maintenance of the store (the counts of use, a cleanup) failed.
    #[error("graph store: {source}")]
    Maintenance {
        /// The store's error.
        source: Arc<usine_storage::StorageError>,
    },
    /// The runtime is shutting down: storage work on a blocking thread was cancelled.
    #[error("the runtime is shutting down")]
    ShuttingDown,
    /// Too many progress streams are open.
    #[error("{limit} progress streams are open, the limit (`max_progress_streams`)")]
    TooManyProgressStreams {
        /// The limit.
        limit: usize,
    },
}
