#![doc = include_str!("../README.md")]

mod admission;
mod batch;
mod config;
mod error;
mod event;
mod executor;
pub mod metrics;
mod paged;
mod request;
mod run;
mod stream;

pub use config::{
    ConfigError, ExecutorConfig, KvReservation, MAX_BACKOFF, MAX_BATCH, MAX_CHANNEL_CAPACITY, MAX_PASS_TOKENS,
    MAX_PREEMPTIONS, MAX_SLOTS, RetryPolicy, TimeoutOverrides, Timeouts,
};
pub use error::{ExecutorError, Phase};
pub use event::{Event, Usage};
pub use executor::{ExecutorStats, TaskExecutor};
pub use request::{Input, Priority, Request};
pub use stream::{GenerationStream, Output};
pub use usine_engine::{Message, Role};
