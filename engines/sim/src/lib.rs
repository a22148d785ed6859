//! The simulation kit behind usine's simulated engines (`usine-engine-webllm`,
//! `usine-engine-transformers`): everything of an engine but the arithmetic.
//!
//! A [`SimEngine`] of some [`Flavor`] compiles in named stages with progress, writes real graph bytes
//! (checked on load), tokenizes real text with a vocabulary of its own ([`text`]), generates readable
//! text with a seeded sampler, and takes the time its [`Profile`] says for each stage, with seeded jitter
//! when asked ([`SimConfig`]), always through `tokio::time`. [`Faults`] injects failures for the tests of
//! the layers above. Memory plans come from the profile's [`Shape`].

mod engine;
mod pace;
mod profile;
mod rng;
pub mod text;

pub use engine::{ConfigError, Faults, Flavor, GRAPH_SCHEMA, SimConfig, SimEngine};
pub use pace::Pacer;
pub use profile::{Profile, Q4, Q5, Quantization, Shape, TINY, Timeline};
pub use rng::Rng;
