#![doc = include_str!("../README.md")]

mod chat;
#[cfg(feature = "conformance")]
pub mod conformance;
mod engine;
mod error;
mod generate;
#[cfg(feature = "test-util")]
pub mod scripted;
mod text;
mod types;
mod zero;

pub use chat::{Message, Role, render_plain};
pub use engine::{
    BatchStep, Blocks, Detokenizer, Engine, Fill, LoadedModel, PassOutcome, Prefill, Prepared, Sequence, check_graph,
    check_spec, compute_each,
};
pub use error::{EngineError, ErrorKind};
pub use generate::{check_context, generate, prefill};
pub use text::{ByteDetokenizer, Released, StopMatcher, Utf8Decoder};
pub use types::{
    CompiledGraph, Device, EngineDescriptor, FinishReason, Generated, GenerationParams, MAX_STOP_LEN,
    MAX_STOP_SEQUENCES, MAX_TEMPERATURE, MAX_TOKENS_LIMIT, MemoryPlan, ModelSpec, NoProgress, Progress, ProgressSink,
    RawSection, Token, TokenId,
};
pub use zero::ZeroEngine;
