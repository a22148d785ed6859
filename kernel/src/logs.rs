//! The kernel's events as `tracing` events: loads and evictions at `info`, what went wrong at `warn`.
//! The binary chooses the subscriber; with none, an event costs a check of the level.

use crate::events::KernelEvent;

/// Logs `event`. Compile progress does not come here: a stage is not news.
pub(crate) fn log(event: &KernelEvent) {
    match event {
        KernelEvent::LoadStarted { model } => tracing::info!(model, "loading"),
        KernelEvent::Loaded { model, source, duration } => {
            tracing::info!(model, source = source.as_str(), seconds = duration.as_secs_f64(), "loaded");
        }
        // Said to the caller too, but a warm-up's has no caller.
        KernelEvent::LoadFailed { model, message } => tracing::warn!(model, error = message, "load failed"),
        KernelEvent::Evicted { model, reason } => tracing::info!(model, reason = reason.as_str(), "evicted"),
        // Emitted under the state lock: debug, so that by default nothing is written there.
        KernelEvent::WarmupPreempted { model } => {
            tracing::debug!(model, "warm-up pre-empted by a user's load; queued again");
        }
        KernelEvent::SaveFailed { model, message } => {
            tracing::warn!(model, error = message, "compiled graph not saved; the next load compiles again");
        }
        KernelEvent::WaitingForCompile { model } => {
            tracing::info!(model, "another process compiles it; waiting for its graph");
        }
        KernelEvent::WaitingForHost { model } => {
            tracing::info!(model, "another host compiles it; waiting for its graph in the remote tier");
        }
        // The store said so at `warn`, with the file; this says which model compiles again.
        KernelEvent::GraphQuarantined { model, reason } => {
            tracing::info!(model, reason, "stored graph damaged; compiling again");
        }
        KernelEvent::Progress { .. } => {}
    }
}
