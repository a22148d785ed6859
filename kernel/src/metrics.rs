//! The kernel's metrics, through the `metrics` facade.

use std::time::Duration;

use metrics::{Counter, Histogram, Unit, describe_counter, describe_histogram};

use crate::events::{EvictReason, LoadSource};

/// Loads, by source (memory, disk, remote, compile).
pub const LOADS_TOTAL: &str = "usine_kernel_loads_total";
/// Evictions, by reason.
pub const EVICTIONS_TOTAL: &str = "usine_kernel_evictions_total";
/// Load durations, by source (disk, remote, compile).
pub const LOAD_DURATION_SECONDS: &str = "usine_kernel_load_duration_seconds";

/// Describes every metric of this crate to the installed recorder.
pub fn describe_metrics() {
    describe_counter!(
        LOADS_TOTAL,
        Unit::Count,
        "Model loads, by source: memory, disk, remote (another host's compile, through Redis), compile."
    );
    describe_counter!(
        EVICTIONS_TOTAL,
        Unit::Count,
        "Models unloaded, by reason: lru, max_loaded, keep_alive, unloaded."
    );
    describe_histogram!(LOAD_DURATION_SECONDS, Unit::Seconds, "Time to load a model, by source.");
}

pub(crate) struct KernelMetrics {
    loads: [Counter; 4],
    durations: [Histogram; 4],
    evictions: [Counter; 4],
}

const SOURCES: [LoadSource; 4] = [LoadSource::Memory, LoadSource::Disk, LoadSource::Remote, LoadSource::Compile];
const REASONS: [EvictReason; 4] =
    [EvictReason::Lru, EvictReason::MaxLoaded, EvictReason::KeepAlive, EvictReason::Unloaded];

impl KernelMetrics {
    pub(crate) fn register() -> Self {
        describe_metrics();
        Self {
            loads: SOURCES.map(|source| metrics::counter!(LOADS_TOTAL, "source" => source.as_str())),
            durations: SOURCES.map(|source| metrics::histogram!(LOAD_DURATION_SECONDS, "source" => source.as_str())),
            evictions: REASONS.map(|reason| metrics::counter!(EVICTIONS_TOTAL, "reason" => reason.as_str())),
        }
    }

    pub(crate) fn load(&self, source: LoadSource, duration: Duration) {
        let index = SOURCES.iter().position(|s| *s == source).expect("every source is listed");
        self.loads[index].increment(1);
        if source != LoadSource::Memory {
            self.durations[index].record(duration.as_secs_f64());
        }
    }

    pub(crate) fn evicted(&self, reason: EvictReason) {
        let index = REASONS.iter().position(|r| *r == reason).expect("every reason is listed");
        self.evictions[index].increment(1);
    }
}
