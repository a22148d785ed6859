//! The engine error: every failure says whether a retry is worth it.

/// What went wrong in an engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A failure that may not happen again: worth a retry.
    #[error("transient engine failure: {message}")]
    Transient {
        /// What happened.
        message: String,
    },
    /// A failure that will happen again: not worth a retry.
    #[error("fatal engine failure: {message}")]
    Fatal {
        /// What happened.
        message: String,
    },
    /// The device ran out of memory.
    #[error("out of memory: needed {needed} bytes, {available} available")]
    OutOfMemory {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The work was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A generation parameter is outside its limit.
    #[error("generation parameter `{name}` is {value}, outside {limit}")]
    InvalidParams {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is allowed.
        limit: String,
    },
    /// The prompt and the tokens asked for do not fit the model's context.
    #[error(
        "the prompt's {prompt} tokens and max_tokens {max_tokens} exceed the context of {limit} tokens; {}",
        if prompt < limit { format!("max_tokens {} would fit", limit - prompt) } else { "the prompt alone fills it".to_owned() }
    )]
    ContextOverflow {
        /// Tokens of the prompt (and of the tokens already generated, on a resume).
        prompt: u32,
        /// The tokens asked for.
        max_tokens: u32,
        /// The model's context.
        limit: u32,
    },
    /// The spec names a profile or quantization the engine does not have.
    #[error("engine `{engine}` has no {what} `{name}` (it has: {})", known.join(", "))]
    Unsupported {
        /// The engine.
        engine: String,
        /// "profile" or "quantization".
        what: &'static str,
        /// The name asked for.
        name: String,
        /// What the engine has.
        known: Vec<String>,
    },
    /// A model file the engine cannot run: it says what is missing or unsupported.
    #[error("the model is not one this engine runs: {message}")]
    UnsupportedModel {
        /// What is missing or unsupported.
        message: String,
    },
    /// The model's chat template refused the conversation (its own rules, or its length).
    #[error("{message}")]
    ChatTemplate {
        /// What the template said.
        message: String,
    },
    /// A compiled graph from another engine, version or schema.
    #[error("graph compiled by {found} cannot be loaded by {expected}")]
    GraphMismatch {
        /// Engine, version and schema of the graph.
        found: String,
        /// Engine, version and schema of the engine asked to load it.
        expected: String,
    },
    /// The graph's bytes are not what the engine wrote.
    #[error("corrupt compiled graph: {message}")]
    CorruptGraph {
        /// What is wrong.
        message: String,
    },
}

/// The classes of failure the layers above act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Retry, with backoff.
    Transient,
    /// Do not retry.
    Fatal,
    /// Free memory (evict, wait) before trying again.
    OutOfMemory,
    /// Stop quietly.
    Cancelled,
    /// The caller's input is wrong: report it, do not retry.
    InvalidInput,
    /// The compiled graph cannot be loaded (damaged, or from another engine version): compile again.
    UnusableGraph,
}

impl EngineError {
    /// The class of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Transient { .. } => ErrorKind::Transient,
            Self::Fatal { .. } => ErrorKind::Fatal,
            Self::CorruptGraph { .. } | Self::GraphMismatch { .. } => ErrorKind::UnusableGraph,
            Self::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            Self::Cancelled => ErrorKind::Cancelled,
            Self::InvalidParams { .. }
            | Self::ContextOverflow { .. }
            | Self::Unsupported { .. }
            | Self::UnsupportedModel { .. }
            | Self::ChatTemplate { .. } => ErrorKind::InvalidInput,
        }
    }

    /// Whether a retry is worth it.
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }
}
