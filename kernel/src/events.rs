//! What the kernel tells its subscribers.

use std::time::Duration;

use usine_engine::Progress;

/// Where a load got its model from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoadSource {
    /// Already loaded.
    Memory,
    /// A stored graph.
    Disk,
    /// Compiled (and saved).
    Compile,
}

impl LoadSource {
    /// A short fixed name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Disk => "disk",
            Self::Compile => "compile",
        }
    }
}

/// Why a model left memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EvictReason {
    /// Room for another model's weights (least recently used first).
    Lru,
    /// Under the limit of loaded models.
    MaxLoaded,
    /// Idle past its keep-alive.
    KeepAlive,
    /// Unloaded by hand.
    Unloaded,
}

impl EvictReason {
    /// A short fixed name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::MaxLoaded => "max_loaded",
            Self::KeepAlive => "keep_alive",
            Self::Unloaded => "unloaded",
        }
    }
}

/// Something the kernel did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum KernelEvent {
    /// A load began (not a memory hit).
    LoadStarted {
        /// The model.
        model: String,
    },
    /// A compile progressed.
    Progress {
        /// The model.
        model: String,
        /// How far.
        progress: Progress,
    },
    /// A model is loaded.
    Loaded {
        /// The model.
        model: String,
        /// From where.
        source: LoadSource,
        /// How long it took.
        duration: Duration,
    },
    /// A load failed.
    LoadFailed {
        /// The model.
        model: String,
        /// The error, as text.
        message: String,
    },
    /// A model left memory.
    Evicted {
        /// The model.
        model: String,
        /// Why.
        reason: EvictReason,
    },
    /// A warm-up load gave its slot to a user load and went back to the front of the queue.
    WarmupPreempted {
        /// The model.
        model: String,
    },
    /// Another process compiles the model (it holds the graph's lock): this load waits for its graph.
    WaitingForCompile {
        /// The model.
        model: String,
    },
    /// The stored graph was damaged: the store moved it to quarantine, and the model compiles again.
    GraphQuarantined {
        /// The model.
        model: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A compiled graph could not be saved; the model is loaded all the same.
    SaveFailed {
        /// The model.
        model: String,
        /// The store's error.
        message: String,
    },
}
