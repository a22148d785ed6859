#![doc = include_str!("../README.md")]

mod catalog;
mod config;
mod error;
mod events;
mod handle;
mod loads;
mod logs;
pub mod metrics;
mod progress;
mod reaper;
mod runtime;
mod schedule;
mod table;
mod telemetry;
mod usage;

pub use config::{KeepAlive, KernelConfig, LoadOptions};
pub use error::{Holder, KernelError};
pub use events::{EvictReason, KernelEvent, KernelEvents, Lagged, LoadSource};
pub use handle::ModelHandle;
pub use progress::{ProgressEnd, ProgressStream};
pub use runtime::RuntimeManager;
pub use table::ModelInfo;
pub use telemetry::KernelStats;
