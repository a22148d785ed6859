//! A model in memory (`Entry`, its weights), and `ModelHandle`: a loaded model that cannot be evicted
//! while the handle lives.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use usine_engine::{LoadedModel, MemoryPlan};
use usine_memory::Lease;

use crate::config::KeepAlive;
use crate::events::LoadSource;

/// A model in memory.
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) model: Arc<dyn LoadedModel>,
    pub(crate) plan: MemoryPlan,
    pub(crate) source: LoadSource,
    pub(crate) load_duration: Duration,
    /// Live handles; only the table makes it leave zero, under its lock.
    pub(crate) handles: AtomicUsize,
    pub(crate) last_use: Mutex<Instant>,
    pub(crate) keep_alive: Mutex<KeepAlive>,
    pub(crate) _weights: Weights,
}

impl Entry {
    pub(crate) fn idle(&self) -> bool {
        self.handles.load(Ordering::SeqCst) == 0
    }
}

/// A model's weights: returned to the pool when dropped, and then the table's waiters are told.
pub(crate) struct Weights {
    pub(crate) lease: Option<Lease>,
    pub(crate) changed: Arc<Notify>,
}

impl Drop for Weights {
    fn drop(&mut self) {
        drop(self.lease.take()); // free first, then wake: a waiter must find the room
        self.changed.notify_waiters();
    }
}

/// A loaded model. While any handle to a model lives, the model stays loaded; cheap to clone.
pub struct ModelHandle {
    entry: Arc<Entry>,
    /// What the last handle's drop tells: the model is idle (evictable; its keep-alive starts).
    changed: Arc<Notify>,
}

impl ModelHandle {
    /// A handle on `entry`, whose count the caller has raised already.
    pub(crate) fn new(entry: Arc<Entry>, changed: Arc<Notify>) -> Self {
        Self { entry, changed }
    }

    /// The model's id.
    pub fn id(&self) -> &str {
        &self.entry.id
    }

    /// The engine's model: tokenize, prefill, decode.
    pub fn model(&self) -> &Arc<dyn LoadedModel> {
        &self.entry.model
    }

    /// What the model needs from the pools (its weights are reserved already).
    pub fn memory_plan(&self) -> MemoryPlan {
        self.entry.plan
    }

    /// Keeps the model this long once idle, from now on.
    pub fn set_keep_alive(&self, keep_alive: KeepAlive) {
        *self.entry.keep_alive.lock() = keep_alive;
    }

    /// Where this model was loaded from when it came into memory.
    pub fn source(&self) -> LoadSource {
        self.entry.source
    }
}

impl Clone for ModelHandle {
    fn clone(&self) -> Self {
        self.entry.handles.fetch_add(1, Ordering::SeqCst);
        Self { entry: Arc::clone(&self.entry), changed: Arc::clone(&self.changed) }
    }
}

impl Drop for ModelHandle {
    fn drop(&mut self) {
        *self.entry.last_use.lock() = Instant::now();
        if self.entry.handles.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.changed.notify_waiters(); // evictable now; keep-alive starts
        }
    }
}

impl std::fmt::Debug for ModelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelHandle").field("id", &self.entry.id).field("source", &self.entry.source).finish()
    }
}
