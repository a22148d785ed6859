//! The executor's error: which phase failed, with the figures, and a short code for metrics and HTTP.

use std::time::Duration;

use usine_engine::EngineError;
use usine_kernel::KernelError;
use usine_memory::MemoryError;

use crate::config::ConfigError;

/// The phases of a request, each with its own time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Waiting in the admission queue for a generation slot.
    Queue,
    /// From leaving the queue to the first token: the load, the prefill and the first step.
    FirstToken,
    /// Between two tokens (time blocked on a slow reader is not counted).
    BetweenTokens,
    /// The whole request, from submission to its last event.
    Total,
    /// Blocked on a reader that takes no event (its channel full).
    Reader,
}

impl Phase {
    /// Its name, as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::FirstToken => "first_token",
            Self::BetweenTokens => "between_tokens",
            Self::Total => "total",
            Self::Reader => "reader",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Queue => "queue wait",
            Self::FirstToken => "time to first token",
            Self::BetweenTokens => "time between tokens",
            Self::Total => "whole request",
            Self::Reader => "wait for the reader",
        })
    }
}

/// Everything that can go wrong with a generation.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ExecutorError {
    /// Every generation slot is taken and the admission queue is full: try again later.
    #[error(
        "admission queue full: {queued} of {capacity} places taken, {running} generations running; refused {refused} request(s)"
    )]
    QueueFull {
        /// Generations running.
        running: usize,
        /// Requests queued.
        queued: usize,
        /// The queue's capacity.
        capacity: usize,
        /// Requests in the refused batch (1 for a single request).
        refused: usize,
    },
    /// A phase exceeded its time limit.
    #[error("{phase} exceeded its limit of {limit:?}")]
    Timeout {
        /// The phase.
        phase: Phase,
        /// Its limit.
        limit: Duration,
    },
    /// The model could not be made ready.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The request is wrong: parameters out of range, or a prompt that does not fit the context.
    #[error("model `{model}`: {source}")]
    InvalidRequest {
        /// The model.
        model: String,
        /// What the engine said.
        source: EngineError,
    },
    /// A pool could not give the memory a generation needs (it names the pool and the figures).
    #[error("model `{model}`: {source}")]
    Memory {
        /// The model.
        model: String,
        /// The pools' error.
        source: MemoryError,
    },
    /// The engine failed in a way a retry does not mend.
    #[error("model `{model}`: {source} (after {retries} retries)")]
    Engine {
        /// The model.
        model: String,
        /// The engine's error.
        source: EngineError,
        /// Retries made before it.
        retries: u32,
    },
    /// Transient failures went on past the retry limit.
    #[error("model `{model}`: gave up after {retries} retries (the limit); last error: {last}")]
    RetriesExhausted {
        /// The model.
        model: String,
        /// Retries made.
        retries: u32,
        /// The last failure.
        last: EngineError,
    },
    /// The executor is shutting down and takes no new work.
    #[error("the executor is shutting down")]
    ShuttingDown,
    /// A setting of the executor is outside its limit, or names a pool that does not exist.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The generation's task ended before its last event: the engine panicked.
    #[error("the generation ended without a result (its task panicked)")]
    Aborted,
    /// The executor needs a tokio runtime.
    #[error("no tokio runtime to run the executor on")]
    NoRuntime,
}

impl ExecutorError {
    /// A short, fixed name for the error's class: a metric label, an HTTP error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::QueueFull { .. } => "queue_full",
            Self::Timeout { .. } => "timeout",
            Self::Kernel(KernelError::UnknownModel { .. }) => "unknown_model",
            Self::Kernel(KernelError::TooManyProgressStreams { .. }) => "too_many_streams",
            Self::Kernel(KernelError::ShuttingDown) => "shutting_down",
            Self::Kernel(_) => "model_unavailable",
            Self::InvalidRequest { .. } => "invalid_request",
            Self::Memory { .. } => "out_of_memory",
            Self::Engine { source, .. } if source.kind() == usine_engine::ErrorKind::OutOfMemory => "out_of_memory",
            Self::Engine { .. } | Self::RetriesExhausted { .. } | Self::Aborted => "engine_failure",
            Self::ShuttingDown => "shutting_down",
            Self::Config(_) | Self::NoRuntime => "setup",
        }
    }
}
