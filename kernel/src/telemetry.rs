//! What the kernel tells: its events (a broadcast channel, and a log line each), its counters, and its
//! metrics, in one place that every room reports to.

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::events::{EvictReason, KernelEvent, LoadSource};
use crate::metrics::KernelMetrics;

/// What the kernel has done since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Loads served by a model already in memory.
    pub memory_hits: u64,
    /// Loads served from a stored graph.
    pub disk_hits: u64,
    /// Loads served by a graph fetched from the remote tier (another host's compile).
    pub remote_hits: u64,
    /// Loads that compiled.
    pub compiles: u64,
    /// Evictions, by reason.
    pub evictions: BTreeMap<EvictReason, u64>,
    /// Total time of loads from disk, and of loads that compiled.
    pub load_time: BTreeMap<LoadSource, Duration>,
}

pub(crate) struct Telemetry {
    pub(crate) events: broadcast::Sender<KernelEvent>,
    stats: Mutex<KernelStats>,
    metrics: KernelMetrics,
}

impl Telemetry {
    pub(crate) fn new() -> Self {
        Self { events: broadcast::channel(1024).0, stats: Mutex::default(), metrics: KernelMetrics::register() }
    }

    /// Logs `event` and sends it to the subscribers (none: nobody to tell).
    pub(crate) fn emit(&self, event: KernelEvent) {
        crate::logs::log(&event);
        let _ = self.events.send(event);
    }

    /// A load served by `source` in `duration`.
    pub(crate) fn loaded(&self, source: LoadSource, duration: Duration) {
        {
            let mut stats = self.stats.lock();
            match source {
                LoadSource::Disk => stats.disk_hits += 1,
                LoadSource::Remote => stats.remote_hits += 1,
                LoadSource::Compile => stats.compiles += 1,
                LoadSource::Memory => stats.memory_hits += 1,
            }
            if source != LoadSource::Memory {
                *stats.load_time.entry(source).or_default() += duration;
            }
        }
        self.metrics.load(source, duration);
    }

    /// `model` left memory for `reason`.
    pub(crate) fn evicted(&self, model: &str, reason: EvictReason) {
        *self.stats.lock().evictions.entry(reason).or_default() += 1;
        self.metrics.evicted(reason);
        self.emit(KernelEvent::Evicted { model: model.to_owned(), reason });
    }

    pub(crate) fn stats(&self) -> KernelStats {
        self.stats.lock().clone()
    }
}
