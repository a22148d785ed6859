#![doc = include_str!("../README.md")]

mod engine;
mod pace;
mod profile;
mod rng;
pub mod text;

pub use engine::{ConfigError, Faults, Flavor, GRAPH_SCHEMA, SimConfig, SimEngine};
pub use pace::Pacer;
pub use profile::{Batching, Profile, Q4, Q5, Quantization, Shape, TINY, Timeline};
pub use rng::Rng;
