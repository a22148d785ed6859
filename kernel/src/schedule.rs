//! The loads under way: shared by their callers, the warm-up queue, pre-emption of warm-ups by users.
//!
//! Locks: the loads' lock, then the table's, never the other way: a load joins the table while it is
//! still among the loads under way, so a caller that finds it in neither starts a load of its own only
//! when there is none.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use usine_engine::{Engine, EngineError, ModelSpec};
use usine_storage::StorageManager;

use crate::catalog::Catalog;
use crate::config::{KernelConfig, LoadOptions};
use crate::error::KernelError;
use crate::events::{KernelEvent, LoadSource};
use crate::handle::ModelHandle;
use crate::loads::LoadPath;
use crate::table::Table;
use crate::telemetry::Telemetry;
use crate::usage::Usage;

/// The outcome of a load under way, shared by everyone waiting for it (`None` until it ends).
/// It holds a handle: the new model cannot be evicted before every waiter has its own.
type Outcome = watch::Receiver<Option<Result<ModelHandle, KernelError>>>;

/// A load under way.
struct Loading {
    outcome: Outcome,
    task: tokio::task::AbortHandle,
    /// Started by the warm-up queue, and no user waits for it: it may be pre-empted.
    warm: bool,
}

#[derive(Default)]
struct LoadState {
    loading: HashMap<String, Loading>,
    /// Models waiting to be warmed, in order.
    warm_queue: VecDeque<String>,
}

/// The loads under way and what they need.
pub(crate) struct Loads {
    pub(crate) config: KernelConfig,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) storage: StorageManager,
    pub(crate) table: Arc<Table>,
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) usage: Arc<Usage>,
    /// The fleet's shared tier, set once ([`RuntimeManager::share_through`](crate::RuntimeManager::share_through)).
    #[cfg(feature = "remote")]
    pub(crate) remote: std::sync::OnceLock<usine_storage::remote::RemoteTier>,
    state: Mutex<LoadState>,
    /// The runtime the kernel was made on: loads are spawned there, also from synchronous calls.
    runtime: tokio::runtime::Handle,
}

impl Loads {
    /// Starts the shared load of `model`; called under the loads' lock.
    fn start_load(
        self: &Arc<Self>,
        loads: &mut LoadState,
        model: &str,
        options: LoadOptions,
        warm: bool,
    ) -> Result<Outcome, KernelError> {
        let engine = self.catalog.engine_for(model)?;
        let spec = self.catalog.spec(model)?;
        let (done, outcome) = watch::channel(None);
        let task = self
            .runtime
            .spawn(tracing::Instrument::instrument(
                load_task(Arc::clone(self), spec, engine, options, done, outcome.clone()),
                tracing::info_span!(parent: None, "load", model),
            ))
            .abort_handle();
        loads.loading.insert(model.to_owned(), Loading { outcome: outcome.clone(), task, warm });
        Ok(outcome)
    }

    /// While more loads run than there are slots, cancels a warm-up load (not of `model`) and puts it
    /// back at the front of the queue; called under the loads' lock.
    fn preempt_warm_ups(&self, loads: &mut LoadState, model: &str) {
        while loads.loading.len() > self.config.load_slots && self.preempt_in(loads, model) {}
    }

    /// Cancels one warm-up load (not of `model`) and requeues it at the front; returns whether there was
    /// one. Called under the loads' lock.
    fn preempt_in(&self, loads: &mut LoadState, model: &str) -> bool {
        let Some(warm) =
            loads.loading.iter().find(|(id, loading)| loading.warm && *id != model).map(|(id, _)| id.clone())
        else {
            return false;
        };
        let loading = loads.loading.remove(&warm).expect("found just above");
        loading.task.abort(); // at its next await; a storage write under way still finishes whole
        loads.warm_queue.push_front(warm.clone());
        self.telemetry.emit(KernelEvent::WarmupPreempted { model: warm });
        true
    }

    /// Starts queued warm-ups while fewer loads than slots run.
    fn pump(self: &Arc<Self>) {
        let mut loads = self.state.lock();
        while loads.loading.len() < self.config.load_slots {
            let Some(model) = loads.warm_queue.pop_front() else { return };
            if self.table.contains(&model) || loads.loading.contains_key(&model) {
                continue;
            }
            let options = LoadOptions { warm: true, ..LoadOptions::default() };
            if self.start_load(&mut loads, &model, options, true).is_err() {
                continue; // removed from the catalog since it was queued
            }
        }
    }
}

/// Loads one model for every caller waiting on `done`; runs detached, so that a caller leaving does not
/// stop the others' load.
async fn load_task(
    inner: Arc<Loads>,
    spec: ModelSpec,
    engine: Arc<dyn Engine>,
    options: LoadOptions,
    done: watch::Sender<Option<Result<ModelHandle, KernelError>>>,
    mine: Outcome,
) {
    let model = spec.id.clone();
    // Whatever happens (an end, a panic, an abort at an await), this load leaves the table of loads
    // under way, if it is still there, and frees its slot for the warm-up queue.
    let leave = Leave { inner: Arc::clone(&inner), model: model.clone(), mine };
    inner.telemetry.emit(KernelEvent::LoadStarted { model: model.clone() });
    let path = LoadPath {
        storage: &inner.storage,
        table: &inner.table,
        telemetry: &inner.telemetry,
        load_timeout: inner.config.load_timeout,
        keep_alive: inner.config.keep_alive,
        #[cfg(feature = "remote")]
        remote: inner.remote.get(),
    };
    // A user's load may take the room of a warm-up under way.
    let preempt = || !options.warm && inner.preempt_in(&mut inner.state.lock(), &model);
    let outcome = match path.load(&spec, engine.as_ref(), options, preempt).await {
        Err(error) => {
            inner.telemetry.emit(KernelEvent::LoadFailed { model: model.clone(), message: error.to_string() });
            Err(error)
        }
        Ok((entry, pending)) => {
            let (source, duration) = (entry.source, entry.load_duration);
            let handle = {
                let loads = inner.state.lock();
                let current =
                    loads.loading.get(&model).is_some_and(|loading| loading.outcome.same_channel(&leave.mine));
                // Pre-empted after its last await, or loaded by another meanwhile: not ours to insert.
                if current { inner.table.insert(entry, pending) } else { None }
            };
            let Some(handle) = handle else { return };
            inner.telemetry.loaded(source, duration);
            inner.telemetry.emit(KernelEvent::Loaded { model: model.clone(), source, duration });
            Ok(handle)
        }
    };
    // Out of the loads under way before the outcome is told: a caller that comes after a failure starts
    // a new load rather than joining this one and its error.
    drop(leave);
    let _ = done.send(Some(outcome)); // nobody waits any more: the model is loaded all the same
}

/// Takes a finished, failed or cancelled load out of the table of loads under way.
struct Leave {
    inner: Arc<Loads>,
    model: String,
    mine: Outcome,
}

impl Drop for Leave {
    fn drop(&mut self) {
        {
            let mut loads = self.inner.state.lock();
            if loads.loading.get(&self.model).is_some_and(|loading| loading.outcome.same_channel(&self.mine)) {
                loads.loading.remove(&self.model);
            }
        }
        self.inner.table.changed.notify_waiters(); // the reaper sees a new idle model; waiters may find room
        self.inner.pump();
    }
}

impl Loads {
    pub(crate) fn new(
        config: KernelConfig,
        catalog: Arc<Catalog>,
        storage: StorageManager,
        (table, telemetry, usage): (Arc<Table>, Arc<Telemetry>, Arc<Usage>),
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            config,
            catalog,
            storage,
            table,
            telemetry,
            usage,
            #[cfg(feature = "remote")]
            remote: std::sync::OnceLock::new(),
            state: Mutex::default(),
            runtime,
        }
    }

    /// `model`, from memory or by a load shared with its other callers (see
    /// [`RuntimeManager::load_with`](crate::RuntimeManager::load_with)).
    pub(crate) async fn load(self: &Arc<Self>, model: &str, options: LoadOptions) -> Result<ModelHandle, KernelError> {
        let mut outcome = {
            let mut loads = self.state.lock();
            if let Some(handle) = self.table.handle(model, options.keep_alive) {
                self.usage.used(model);
                self.telemetry.loaded(LoadSource::Memory, Duration::ZERO);
                return Ok(handle);
            }
            // A user asks: the model leaves the warm-up queue, and a warm-up load of it becomes theirs.
            loads.warm_queue.retain(|queued| queued != model);
            let outcome = match loads.loading.get_mut(model) {
                Some(loading) => {
                    loading.warm = false;
                    loading.outcome.clone()
                }
                None => self.start_load(&mut loads, model, options, false)?,
            };
            self.preempt_warm_ups(&mut loads, model);
            outcome
        };
        let result = loop {
            if let Some(result) = outcome.borrow_and_update().clone() {
                break result;
            }
            if outcome.changed().await.is_err() {
                break Err(KernelError::Engine { model: model.to_owned(), source: EngineError::Cancelled });
            }
        };
        let handle = result?; // a clone of the load's own handle: the model stays
        self.usage.used(handle.id());
        if let Some(keep_alive) = options.keep_alive {
            handle.set_keep_alive(keep_alive);
        }
        Ok(handle)
    }

    /// Queues `models` (known to the catalog) for warming, behind those already queued.
    pub(crate) fn warm_up(self: &Arc<Self>, models: &[&str]) {
        {
            let mut loads = self.state.lock();
            for model in models {
                let known = self.table.contains(model)
                    || loads.loading.contains_key(*model)
                    || loads.warm_queue.iter().any(|queued| queued == model);
                if !known {
                    loads.warm_queue.push_back((*model).to_owned());
                }
            }
        }
        self.pump();
    }

    pub(crate) fn is_loading(&self, model: &str) -> bool {
        self.state.lock().loading.contains_key(model)
    }

    pub(crate) fn warm_queue(&self) -> Vec<String> {
        self.state.lock().warm_queue.iter().cloned().collect()
    }
}
