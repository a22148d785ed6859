//! The table of models in memory and their weights: which are loaded, which are pinned, what each
//! holds in the weights pool, and the decisions over them (reserve room, evict, unload, expire). The
//! pool's figures and the table agree after every operation: a model's weights are its lease, and a
//! reservation not yet in the table counts against `max_loaded` until it joins or fails
//! (`tests` checks both against a model of the table).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use usine_engine::{LoadedModel, MemoryPlan};
use usine_memory::{MemoryError, Pool, ScopeId};

use crate::config::KeepAlive;
use crate::error::{Holder, KernelError};
use crate::events::{EvictReason, LoadSource};
use crate::handle::{Entry, ModelHandle, Weights};
use crate::telemetry::Telemetry;

/// A model loaded into `reservation`'s weights (which it now holds), and its place, which the table
/// takes when the entry joins it.
pub(crate) fn entry(
    id: String,
    model: Arc<dyn LoadedModel>,
    plan: MemoryPlan,
    (source, load_duration): (LoadSource, Duration),
    keep_alive: KeepAlive,
    reservation: Reservation,
) -> (Entry, Pending) {
    let entry = Entry {
        id,
        model,
        plan,
        source,
        load_duration,
        handles: AtomicUsize::new(0),
        last_use: Mutex::new(Instant::now()),
        keep_alive: Mutex::new(keep_alive),
        _weights: reservation.weights,
    };
    (entry, reservation.pending)
}

/// Room reserved for a load: its weights, and its place among the loaded models.
pub(crate) struct Reservation {
    weights: Weights,
    pending: Pending,
}

/// A place under `max_loaded` held by a load not yet in the table: given back when dropped.
pub(crate) struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Models {
    loaded: BTreeMap<String, Arc<Entry>>,
    pinned: BTreeSet<String>,
}

/// The models in memory.
pub(crate) struct Table {
    max_loaded: usize,
    weights: Pool,
    /// The scope of the weights leases: the table's own, so no request's scope release can touch them.
    scope: ScopeId,
    models: Mutex<Models>,
    /// Reservations of loads not yet in the table.
    pending: Arc<AtomicUsize>,
    /// Room may have come (a handle dropped, a model unloaded), or the kernel is going: what handles,
    /// weights and the reaper notify or wait on.
    pub(crate) changed: Arc<Notify>,
    telemetry: Arc<Telemetry>,
}

/// One loaded model, as `ollama ps` would show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The model's id.
    pub id: String,
    /// Bytes of weights it holds.
    pub weights_bytes: u64,
    /// Where it was loaded from.
    pub source: LoadSource,
    /// How long its load took.
    pub load_duration: Duration,
    /// Live handles.
    pub handles: usize,
    /// Pinned: never evicted.
    pub pinned: bool,
    /// Since its last use, when idle.
    pub idle_for: Option<Duration>,
    /// Until keep-alive unloads it, when idle and not kept forever.
    pub expires_in: Option<Duration>,
}

/// When `entry`'s keep-alive runs out once idle; `None` for never (a keep-alive too long to add to a
/// clock is forever).
fn expiry(entry: &Entry) -> Option<Instant> {
    match *entry.keep_alive.lock() {
        KeepAlive::For(keep) => entry.last_use.lock().checked_add(keep),
        KeepAlive::UnloadNow => Some(*entry.last_use.lock()),
        KeepAlive::Forever => None,
    }
}

/// Why a reservation could not be made at once.
enum Blocked {
    TooMany,
    Exhausted,
}

impl Table {
    pub(crate) fn new(max_loaded: usize, weights: Pool, telemetry: Arc<Telemetry>) -> Self {
        Self {
            max_loaded,
            weights,
            scope: ScopeId::fresh(),
            models: Mutex::default(),
            pending: Arc::new(AtomicUsize::new(0)),
            changed: Arc::new(Notify::new()),
            telemetry,
        }
    }

    /// A new handle on `model` if it is loaded (counted as its use now).
    pub(crate) fn handle(&self, model: &str, keep_alive: Option<KeepAlive>) -> Option<ModelHandle> {
        let models = self.models.lock();
        models.loaded.get(model).map(|entry| self.new_handle(entry, keep_alive))
    }

    fn new_handle(&self, entry: &Arc<Entry>, keep_alive: Option<KeepAlive>) -> ModelHandle {
        entry.handles.fetch_add(1, Ordering::SeqCst);
        *entry.last_use.lock() = Instant::now();
        if let Some(keep_alive) = keep_alive {
            *entry.keep_alive.lock() = keep_alive;
        }
        ModelHandle::new(Arc::clone(entry), Arc::clone(&self.changed))
    }

    pub(crate) fn contains(&self, model: &str) -> bool {
        self.models.lock().loaded.contains_key(model)
    }

    /// Adds a loaded model, its reservation's place taken by it; returns a handle on it, or `None`
    /// (and drops the entry, freeing its weights) if the model is loaded already.
    pub(crate) fn insert(&self, entry: Entry, pending: Pending) -> Option<ModelHandle> {
        let mut models = self.models.lock();
        if models.loaded.contains_key(&entry.id) {
            drop(models);
            drop((entry, pending));
            return None;
        }
        let entry = Arc::new(entry);
        models.loaded.insert(entry.id.clone(), Arc::clone(&entry));
        drop(pending); // counted among the loaded models from now on
        Some(self.new_handle(&entry, None))
    }

    /// Reserves `needed` bytes of weights and a place among the loaded models for `model`, evicting idle
    /// unpinned models (least recently used first) and, when `preempt` finds one, cancelling a warm-up
    /// load that holds room; waits for room until `timeout`.
    pub(crate) async fn reserve(
        &self,
        model: &str,
        needed: u64,
        timeout: Duration,
        preempt: impl Fn() -> bool,
    ) -> Result<Reservation, KernelError> {
        let started = Instant::now();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let blocked = match self.try_reserve(model, needed)? {
                Ok(reservation) => return Ok(reservation),
                Err(blocked) => blocked,
            };
            let reason = match blocked {
                Blocked::TooMany => EvictReason::MaxLoaded,
                Blocked::Exhausted => EvictReason::Lru,
            };
            // A user never waits behind background work: a warm-up holding room gives it up.
            if self.evict_one(reason) || preempt() {
                continue;
            }
            let left = timeout.saturating_sub(started.elapsed());
            if tokio::time::timeout(left, changed).await.is_err() {
                let waited = started.elapsed();
                return Err(match blocked {
                    Blocked::TooMany => {
                        KernelError::TooManyLoaded { model: model.to_owned(), limit: self.max_loaded, waited }
                    }
                    Blocked::Exhausted => KernelError::OutOfMemory {
                        model: model.to_owned(),
                        needed,
                        free: self.weights.stats().available,
                        waited,
                        holders: self.holders(),
                    },
                });
            }
        }
    }

    /// A reservation now, or why not. The count and the allocation under the lock, so that two loads
    /// cannot both take the last place under `max_loaded`.
    fn try_reserve(&self, model: &str, needed: u64) -> Result<Result<Reservation, Blocked>, KernelError> {
        let models = self.models.lock();
        let loaded = models.loaded.len() + self.pending.load(Ordering::SeqCst);
        if loaded >= self.max_loaded {
            return Ok(Err(Blocked::TooMany));
        }
        match self.weights.allocate(needed, self.scope) {
            Ok(lease) => {
                self.pending.fetch_add(1, Ordering::SeqCst);
                drop(models);
                let weights = Weights { lease: Some(lease), changed: Arc::clone(&self.changed) };
                Ok(Ok(Reservation { weights, pending: Pending(Arc::clone(&self.pending)) }))
            }
            Err(MemoryError::TooLarge { capacity, .. }) => {
                Err(KernelError::TooLarge { model: model.to_owned(), needed, capacity })
            }
            Err(MemoryError::Exhausted { .. }) => Ok(Err(Blocked::Exhausted)),
            Err(source) => Err(KernelError::Memory { model: model.to_owned(), source }),
        }
    }

    /// Unloads `model` if it is idle, unpinned and `also` agrees; its weights return when its entry
    /// goes. Returns whether it did.
    pub(crate) fn unload_if(&self, model: &str, reason: EvictReason, also: impl FnOnce(&Entry) -> bool) -> bool {
        let removed = {
            let mut models = self.models.lock();
            let idle = models
                .loaded
                .get(model)
                .is_some_and(|entry| entry.idle() && !models.pinned.contains(model) && also(entry));
            if idle { models.loaded.remove(model) } else { None }
        };
        let Some(entry) = removed else { return false };
        drop(entry);
        self.telemetry.evicted(model, reason);
        self.changed.notify_waiters();
        true
    }

    /// Evicts the least recently used idle, unpinned model; returns whether there was one.
    pub(crate) fn evict_one(&self, reason: EvictReason) -> bool {
        let victim = {
            let models = self.models.lock();
            models
                .loaded
                .values()
                .filter(|entry| entry.idle() && !models.pinned.contains(&entry.id))
                .min_by_key(|entry| *entry.last_use.lock())
                .map(|entry| entry.id.clone())
        };
        victim.is_some_and(|model| self.unload_if(&model, reason, |_| true))
    }

    /// Unloads the idle models whose keep-alive ran out by `now`; returns when the next one runs out.
    pub(crate) fn expire(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let expired: Vec<String> = {
            let models = self.models.lock();
            models
                .loaded
                .values()
                .filter(|entry| entry.idle() && !models.pinned.contains(&entry.id))
                .filter_map(|entry| {
                    let expiry = expiry(entry)?;
                    if expiry <= now {
                        return Some(entry.id.clone());
                    }
                    next = Some(next.map_or(expiry, |next| next.min(expiry)));
                    None
                })
                .collect()
        };
        // Used again since the list was made (a handle taken and dropped): not expired any more.
        for model in expired {
            self.unload_if(&model, EvictReason::KeepAlive, |entry| {
                entry.idle() && expiry(entry).is_some_and(|at| at <= now)
            });
        }
        next
    }

    pub(crate) fn pin(&self, model: &str) {
        self.models.lock().pinned.insert(model.to_owned());
    }

    pub(crate) fn unpin(&self, model: &str) {
        self.models.lock().pinned.remove(model);
        self.changed.notify_waiters();
    }

    /// The models in the way of a load, and why they stay.
    fn holders(&self) -> Vec<Holder> {
        let models = self.models.lock();
        models
            .loaded
            .values()
            .map(|entry| Holder {
                model: entry.id.clone(),
                bytes: entry.plan.weights_bytes,
                why: if models.pinned.contains(&entry.id) { "pinned" } else { "in use" },
            })
            .collect()
    }

    /// The loaded models.
    pub(crate) fn infos(&self) -> Vec<ModelInfo> {
        let models = self.models.lock();
        let now = Instant::now();
        models
            .loaded
            .values()
            .map(|entry| {
                let handles = entry.handles.load(Ordering::SeqCst);
                let idle_for = (handles == 0).then(|| now - *entry.last_use.lock());
                let expires_in = match (*entry.keep_alive.lock(), idle_for) {
                    (KeepAlive::For(keep), Some(idle)) => Some(keep.saturating_sub(idle)),
                    (KeepAlive::UnloadNow, Some(_)) => Some(Duration::ZERO),
                    _ => None,
                };
                ModelInfo {
                    id: entry.id.clone(),
                    weights_bytes: entry.plan.weights_bytes,
                    source: entry.source,
                    load_duration: entry.load_duration,
                    handles,
                    pinned: models.pinned.contains(&entry.id),
                    idle_for,
                    expires_in,
                }
            })
            .collect()
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        self.changed.notify_waiters(); // the reaper wakes, finds the table gone, and ends
    }
}

#[cfg(test)]
mod tests;
