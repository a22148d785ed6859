//! The engine trait of usine, and what every engine shares.
//!
//! An [`Engine`] compiles a [`ModelSpec`] into a [`CompiledGraph`] (serde-serializable, so the kernel
//! can keep it in storage) and loads a graph into a [`LoadedModel`]. A loaded model declares its
//! [`MemoryPlan`] (the kernel and executor reserve it from the pools; engines never touch them),
//! tokenizes, detokenizes incrementally, and prefills a prompt into a [`Sequence`], which decodes one
//! token per step in two stages that can overlap: a prepare stage for step N+1 that does not need the
//! token of step N, and a compute stage for step N.
//!
//! Also here: the [`ZeroEngine`], which does no work at all (tests, and the floor of overhead
//! benchmarks); [`generate`], the reference driver; text helpers ([`Utf8Decoder`], [`ByteDetokenizer`], [`StopMatcher`]);
//! and, behind the `conformance` feature, the kit that checks any engine against the contract.
//!
//! This crate depends on no other usine crate, so that an engine can be written against it alone.

mod chat;
#[cfg(feature = "conformance")]
pub mod conformance;
mod engine;
mod error;
mod generate;
mod text;
mod types;
mod zero;

pub use chat::{Message, Role, render_plain};
pub use engine::{Detokenizer, Engine, LoadedModel, Prepared, Sequence, check_graph, check_spec};
pub use error::{EngineError, ErrorKind};
pub use generate::{check_context, generate};
pub use text::{ByteDetokenizer, Released, StopMatcher, Utf8Decoder};
pub use types::{
    CompiledGraph, Device, EngineDescriptor, FinishReason, Generated, GenerationParams, MAX_STOP_LEN,
    MAX_STOP_SEQUENCES, MAX_TEMPERATURE, MAX_TOKENS_LIMIT, MemoryPlan, ModelSpec, NoProgress, Progress, ProgressSink,
    RawSection, Token, TokenId,
};
pub use zero::ZeroEngine;
