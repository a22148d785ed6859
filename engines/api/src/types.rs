//! The shared types: what to compile, how to generate, what comes out, how far a compile has got, and
//! how much memory a loaded model needs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// A token's number in its model's vocabulary.
pub type TokenId = u32;

/// Most tokens one generation may ask for.
pub const MAX_TOKENS_LIMIT: u32 = 1 << 20;
/// Most stop sequences per generation.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_LEN: usize = 256;
/// Highest temperature.
pub const MAX_TEMPERATURE: f32 = 2.0;

/// A model as the catalog knows it: what an engine compiles.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The model's id in the catalog.
    pub id: String,
    /// The engine that runs it.
    pub engine: String,
    /// The engine's profile: hardware class, shape and timing (engine-defined names).
    pub profile: String,
    /// The quantization, where the engine offers several (engine-defined names).
    pub quantization: Option<String>,
    /// Other engine-specific settings that change the compiled graph.
    pub options: BTreeMap<String, String>,
}

impl ModelSpec {
    /// A spec of `id` on `engine` with `profile`, default quantization and no options.
    pub fn new(id: impl Into<String>, engine: impl Into<String>, profile: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            engine: engine.into(),
            profile: profile.into(),
            quantization: None,
            options: BTreeMap::new(),
        }
    }

    /// Sets the quantization.
    #[must_use]
    pub fn quantization(mut self, quantization: impl Into<String>) -> Self {
        self.quantization = Some(quantization.into());
        self
    }
}

/// How to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    /// Most tokens to generate (1 to [`MAX_TOKENS_LIMIT`]).
    pub max_tokens: u32,
    /// Sampling temperature, 0 (greedy) to [`MAX_TEMPERATURE`].
    pub temperature: f32,
    /// Nucleus sampling mass, above 0 and at most 1.
    pub top_p: f32,
    /// Sample among the `top_k` most likely tokens only (before `top_p`); 0 (the default) for all.
    #[serde(default)]
    pub top_k: u32,
    /// Seed of the sampler: the same seed gives the same text.
    pub seed: u64,
    /// Generation stops before any of these texts (at most [`MAX_STOP_SEQUENCES`], each 1 to
    /// [`MAX_STOP_LEN`] bytes).
    pub stop: Vec<String>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self { max_tokens: 128, temperature: 0.7, top_p: 0.95, top_k: 0, seed: 0, stop: Vec::new() }
    }
}

impl GenerationParams {
    /// Checks every parameter against its limit; engines call it before they start.
    pub fn validate(&self) -> Result<(), EngineError> {
        let invalid = |name: &'static str, value: String, limit: &str| {
            Err(EngineError::InvalidParams { name, value, limit: limit.to_owned() })
        };
        if !(1..=MAX_TOKENS_LIMIT).contains(&self.max_tokens) {
            return invalid("max_tokens", self.max_tokens.to_string(), &format!("1..={MAX_TOKENS_LIMIT}"));
        }
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return invalid("temperature", self.temperature.to_string(), &format!("0..={MAX_TEMPERATURE}"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("top_p", self.top_p.to_string(), "(0, 1]");
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            let limit = format!("at most {MAX_STOP_SEQUENCES} sequences");
            return invalid("stop", format!("{} sequences", self.stop.len()), &limit);
        }
        if let Some(bad) = self.stop.iter().find(|stop| stop.is_empty() || stop.len() > MAX_STOP_LEN) {
            let limit = format!("1..={MAX_STOP_LEN} bytes each");
            return invalid("stop", format!("a sequence of {} bytes", bad.len()), &limit);
        }
        Ok(())
    }
}

/// One generated token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Its id.
    pub id: TokenId,
    /// Whether the model ended the sequence with it (an end-of-sequence token: it has no text).
    pub end_of_sequence: bool,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// It reached `max_tokens`.
    Length,
    /// It reached a stop sequence (not included in the text).
    Stop,
    /// The model ended the sequence.
    EndOfSequence,
    /// The caller cancelled it.
    Cancelled,
}

/// How far a compile has got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The stage running now, for people ("fetching weights", "compiling shaders").
    pub stage: String,
    /// Of the whole compile, from 0 to 1; never goes backwards.
    pub fraction: f64,
    /// An estimate of the time left, when the engine can tell.
    pub eta: Option<Duration>,
}

/// Receives progress reports; any `Fn(Progress)` is one.
pub trait ProgressSink: Send + Sync {
    /// One report.
    fn report(&self, progress: Progress);
}

impl<F: Fn(Progress) + Send + Sync> ProgressSink for F {
    fn report(&self, progress: Progress) {
        self(progress);
    }
}

/// A sink that drops every report.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn report(&self, _: Progress) {}
}

/// What a loaded model needs from the memory pools; the kernel and executor reserve it, engines never
/// touch the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// The weights, held while the model is loaded.
    pub weights_bytes: u64,
    /// The kv-cache of one token of one sequence.
    pub kv_bytes_per_token: u64,
    /// Scratch space of one decode step of one sequence.
    pub activation_bytes_per_step: u64,
    /// The longest sequence (prompt and generated tokens) the model takes.
    pub max_context_tokens: u32,
}

impl MemoryPlan {
    /// The kv-cache of `tokens` tokens; `None` on overflow.
    pub fn kv_bytes(&self, tokens: u32) -> Option<u64> {
        self.kv_bytes_per_token.checked_mul(u64::from(tokens))
    }

    /// Whether the figures hold together: a context of at least one token, and a full context's
    /// kv-cache that a `u64` can count.
    pub fn is_consistent(&self) -> bool {
        self.max_context_tokens > 0 && self.kv_bytes(self.max_context_tokens).is_some()
    }
}

/// What an engine says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineDescriptor {
    /// Its name, as model specs name it.
    pub name: String,
    /// Its version: a new version may compile differently.
    pub version: String,
    /// The schema of its compiled graphs' bytes.
    pub graph_schema: u32,
    /// Where its decode runs.
    pub device: Device,
    /// The quantizations it offers; the first is the default.
    pub quantizations: Vec<String>,
    /// Its profiles; see [`ModelSpec::profile`].
    pub profiles: Vec<String>,
}

/// Where an engine computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// A GPU: the compute stage runs there, the prepare stage on the CPU, and the two overlap.
    Gpu,
    /// The CPU: both stages share the same cores.
    Cpu,
}

/// A compiled graph: the bytes an engine needs to load a model fast, and what they were compiled from.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompiledGraph {
    /// The engine that compiled it.
    pub engine: String,
    /// That engine's version.
    pub engine_version: String,
    /// The schema of `bytes`.
    pub schema: u32,
    /// The spec it was compiled from.
    pub spec: ModelSpec,
    /// Engine-defined facts about the graph, for people (`usine cache ls`).
    pub metadata: BTreeMap<String, String>,
    /// The graph itself.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// Bytes the engine runs on where they lie (weights laid out for its kernels): stored apart from
    /// the encoded graph and served from a mapping of the stored file, never copied. Empty for engines
    /// that keep everything in `bytes`.
    #[serde(skip)]
    pub raw: RawSection,
}

/// The raw part of a compiled graph: shared, read-only bytes, in memory after a compile or in a
/// mapping of the graph's file after a load (kept alive by whoever holds a clone).
#[derive(Clone, Default)]
pub struct RawSection {
    bytes: Option<std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>>,
}

impl RawSection {
    /// The bytes `owner` holds, shared.
    pub fn new(owner: impl AsRef<[u8]> + Send + Sync + 'static) -> Self {
        Self { bytes: Some(std::sync::Arc::new(owner)) }
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.as_ref().map_or(&[], |bytes| (**bytes).as_ref())
    }

    /// Their owner, to keep them alive beside a borrow of them.
    pub fn owner(&self) -> Option<std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>> {
        self.bytes.clone()
    }
}

impl PartialEq for RawSection {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for RawSection {}

impl std::fmt::Debug for RawSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSection").field("len", &self.as_bytes().len()).finish()
    }
}

impl std::fmt::Debug for CompiledGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledGraph")
            .field("engine", &self.engine)
            .field("engine_version", &self.engine_version)
            .field("schema", &self.schema)
            .field("spec", &self.spec)
            .field("metadata", &self.metadata)
            .field("bytes", &self.bytes.len())
            .field("raw", &self.raw.as_bytes().len())
            .finish()
    }
}

/// What [`generate`](crate::generate) produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generated {
    /// The text, without the prompt and without a stop sequence.
    pub text: String,
    /// The generated tokens.
    pub tokens: Vec<TokenId>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
}
