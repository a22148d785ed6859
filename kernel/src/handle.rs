//! `ModelHandle`: a loaded model that cannot be evicted while the handle lives.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::time::Instant;
use usine_engine::{LoadedModel, MemoryPlan};

use crate::events::LoadSource;
use crate::runtime::{Entry, Inner};

/// A loaded model. While any handle to a model lives, the model stays loaded; cheap to clone.
pub struct ModelHandle {
    entry: Arc<Entry>,
    kernel: Weak<Inner>,
}

impl ModelHandle {
    pub(crate) fn new(entry: Arc<Entry>, kernel: Weak<Inner>) -> Self {
        Self { entry, kernel }
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
    pub fn set_keep_alive(&self, keep_alive: crate::KeepAlive) {
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
        Self { entry: Arc::clone(&self.entry), kernel: Weak::clone(&self.kernel) }
    }
}

impl Drop for ModelHandle {
    fn drop(&mut self) {
        *self.entry.last_use.lock() = Instant::now();
        if self.entry.handles.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(kernel) = self.kernel.upgrade()
        {
            kernel.changed.notify_waiters(); // evictable now; keep-alive starts
        }
    }
}

impl std::fmt::Debug for ModelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelHandle").field("id", &self.entry.id).field("source", &self.entry.source).finish()
    }
}
