//! The kernel's settings, and a load's.

use std::time::Duration;

/// How long an idle model stays loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// This long after its last handle is dropped.
    For(Duration),
    /// Until evicted for room or unloaded by hand.
    Forever,
    /// Unloaded as soon as its last handle is dropped.
    UnloadNow,
}

/// The kernel's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    /// The pool the models' weights come from (created with `weights_capacity` if absent).
    pub weights_pool: String,
    /// Capacity of the weights pool when the kernel creates it, in bytes.
    pub weights_capacity: u64,
    /// Most models loaded at once.
    pub max_loaded: usize,
    /// How long a load waits for room before it fails.
    pub load_timeout: Duration,
    /// Default keep-alive of idle models (5 minutes).
    pub keep_alive: KeepAlive,
    /// Loads in parallel: warm-ups start only while fewer run, and a user load that finds them all
    /// taken by warm-ups pre-empts one (2).
    pub load_slots: usize,
    /// Most [`ProgressStream`](crate::ProgressStream)s open at once (64).
    pub max_progress_streams: usize,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            weights_pool: "weights".into(),
            weights_capacity: 16 << 30,
            max_loaded: 8,
            load_timeout: Duration::from_secs(30),
            keep_alive: KeepAlive::For(Duration::from_secs(300)),
            load_slots: 2,
            max_progress_streams: 64,
        }
    }
}

/// Per-load settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Keep-alive of this model from now on, instead of the default.
    pub keep_alive: Option<KeepAlive>,
    /// How long to wait for room, instead of the default.
    pub timeout: Option<Duration>,
    /// Run a throwaway generation after the load
    /// ([`LoadedModel::warm_up`](usine_engine::LoadedModel::warm_up)), so that the first real one pays
    /// no first-use cost. Warm-ups always do.
    pub warm: bool,
}
