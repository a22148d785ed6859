//! `RuntimeManager`: the catalog, the engines, and which models are resident.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;
use usine_engine::{CompiledGraph, Engine, EngineError, ErrorKind, LoadedModel, MemoryPlan, ModelSpec, Progress};
use usine_memory::{Lease, MemoryError, MemoryManager, Pool, PoolConfig, ScopeId};
use usine_storage::{GraphKey, Lookup, StorageManager};

use crate::error::{Holder, KernelError};
use crate::events::{EvictReason, KernelEvent, LoadSource};
use crate::handle::ModelHandle;
use crate::metrics::KernelMetrics;

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
    /// Most [`ProgressStream`]s open at once (64).
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
    /// Run a throwaway generation after the load ([`LoadedModel::warm_up`]), so that the first real one
    /// pays no first-use cost. Warm-ups always do.
    pub warm: bool,
}

/// A model in memory.
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) model: Arc<dyn LoadedModel>,
    pub(crate) plan: MemoryPlan,
    pub(crate) source: LoadSource,
    pub(crate) load_duration: Duration,
    /// Live handles; only the load path makes it leave zero, under the state lock.
    pub(crate) handles: AtomicUsize,
    pub(crate) last_use: Mutex<Instant>,
    pub(crate) keep_alive: Mutex<KeepAlive>,
    _weights: Weights,
}

/// A model's weights: returned to the pool when dropped, and then the kernel's waiters are told.
pub(crate) struct Weights {
    lease: Option<Lease>,
    changed: Arc<Notify>,
}

impl Drop for Weights {
    fn drop(&mut self) {
        drop(self.lease.take()); // free first, then wake: a waiter must find the room
        self.changed.notify_waiters();
    }
}

/// A reservation made for a load that has not yet joined the loaded models: counted against
/// `max_loaded` until it does (or fails).
struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) struct Inner {
    pub(crate) config: KernelConfig,
    weights: Pool,
    storage: StorageManager,
    engines: RwLock<BTreeMap<String, Arc<dyn Engine>>>,
    catalog: RwLock<BTreeMap<String, ModelSpec>>,
    state: Mutex<State>,
    /// Room may have come (a handle dropped, a model unloaded), or the kernel is going: shared with the
    /// keep-alive reaper, which holds no strong reference to the kernel.
    pub(crate) changed: Arc<Notify>,
    events: broadcast::Sender<KernelEvent>,
    counters: Mutex<Counters>,
    /// Reservations of loads not yet among the loaded models.
    pending: Arc<AtomicUsize>,
    /// Progress streams open now.
    progress_streams: Arc<AtomicUsize>,
    /// The scope of the kernel's weights leases: its own, so no request's scope release can touch them.
    scope: ScopeId,
    /// The runtime the kernel was made on: loads are spawned there, also from synchronous calls.
    runtime: tokio::runtime::Handle,
    /// Uses per model, as kept in the cache folder, and when they were last written.
    usage: Mutex<(BTreeMap<String, u64>, Option<Instant>)>,
    metrics: KernelMetrics,
}

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
struct State {
    loaded: BTreeMap<String, Arc<Entry>>,
    loading: HashMap<String, Loading>,
    pinned: BTreeSet<String>,
    /// Models waiting to be warmed, in order.
    warm_queue: VecDeque<String>,
}

/// What the kernel has done since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Loads served by a model already in memory.
    pub memory_hits: u64,
    /// Loads served from a stored graph.
    pub disk_hits: u64,
    /// Loads that compiled.
    pub compiles: u64,
    /// Evictions, by reason.
    pub evictions: BTreeMap<EvictReason, u64>,
    /// Total time of loads from disk, and of loads that compiled.
    pub load_time: BTreeMap<LoadSource, Duration>,
}

type Counters = KernelStats;

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

/// One model's compile progress; see [`RuntimeManager::progress`].
#[derive(Debug)]
pub struct ProgressStream {
    events: broadcast::Receiver<KernelEvent>,
    model: String,
    ended: Option<ProgressEnd>,
    _slot: StreamSlot,
}

/// Why a [`ProgressStream`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressEnd {
    /// The model is loaded.
    Loaded,
    /// Its load failed.
    Failed,
    /// Its warm-up gave its slot to a user's load and went back to the front of the queue: it starts
    /// again later, and a new stream can follow it.
    Preempted,
    /// The kernel is gone.
    KernelGone,
}

impl ProgressStream {
    /// The next report (stage, fraction, time left), or `None` once the load it follows ends: loaded,
    /// failed, or a warm-up pre-empted ([`ended`](Self::ended) says which). A reader that falls behind
    /// skips the reports it missed.
    pub async fn next(&mut self) -> Option<Progress> {
        while self.ended.is_none() {
            let end = match self.events.recv().await {
                Ok(KernelEvent::Progress { model, progress }) if model == self.model => return Some(progress),
                Ok(KernelEvent::Loaded { model, .. }) if model == self.model => ProgressEnd::Loaded,
                Ok(KernelEvent::LoadFailed { model, .. }) if model == self.model => ProgressEnd::Failed,
                Ok(KernelEvent::WarmupPreempted { model }) if model == self.model => ProgressEnd::Preempted,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => ProgressEnd::KernelGone,
            };
            self.ended = Some(end);
        }
        None
    }

    /// Why the stream ended; `None` while it runs.
    pub fn ended(&self) -> Option<ProgressEnd> {
        self.ended
    }
}

/// One of the [`KernelConfig::max_progress_streams`] slots, given back when its stream is dropped.
#[derive(Debug)]
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Decides which models are in memory, and gets a model ready as fast as it can.
///
/// Cheap to clone. See the crate documentation for an example.
#[derive(Clone)]
pub struct RuntimeManager {
    pub(crate) inner: Arc<Inner>,
}

impl RuntimeManager {
    /// A kernel over `memory` (its weights pool is created if absent) and `storage`, with a keep-alive
    /// reaper on the current tokio runtime (it stops when the kernel is dropped).
    pub fn new(config: KernelConfig, memory: &MemoryManager, storage: StorageManager) -> Result<Self, KernelError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| KernelError::NoRuntime)?;
        let counts = usage::read(&storage);
        let weights = match memory.pool(&config.weights_pool) {
            Ok(pool) => pool,
            Err(_) => memory
                .create_pool(&config.weights_pool, PoolConfig::new(config.weights_capacity, 1).idle_timeout(None))
                .map_err(|source| KernelError::Memory { model: "(weights pool)".into(), source })?,
        };
        let inner = Arc::new(Inner {
            config,
            weights,
            storage,
            engines: RwLock::default(),
            catalog: RwLock::default(),
            state: Mutex::default(),
            changed: Arc::new(Notify::new()),
            events: broadcast::channel(1024).0,
            counters: Mutex::default(),
            pending: Arc::new(AtomicUsize::new(0)),
            progress_streams: Arc::new(AtomicUsize::new(0)),
            scope: ScopeId::fresh(),
            runtime: runtime.clone(),
            usage: Mutex::new((counts, None)),
            metrics: KernelMetrics::register(),
        });
        runtime.spawn(reap(Arc::downgrade(&inner), Arc::clone(&inner.changed)));
        Ok(Self { inner })
    }

    /// Registers an engine under its descriptor's name.
    pub fn register_engine(&self, engine: Arc<dyn Engine>) {
        self.inner.engines.write().insert(engine.descriptor().name.clone(), engine);
    }

    /// Adds (or replaces) a model in the catalog, under its spec's id.
    pub fn register_model(&self, spec: ModelSpec) {
        self.inner.catalog.write().insert(spec.id.clone(), spec);
    }

    /// The engine that runs `model` (the seed's `getEngineFor`).
    pub fn engine_for(&self, model: &str) -> Result<Arc<dyn Engine>, KernelError> {
        self.inner.engine_for(model)
    }

    fn spec(&self, model: &str) -> Result<ModelSpec, KernelError> {
        self.inner.spec(model)
    }

    /// The key `model`'s compiled graph is stored under (for `usine cache explain`, say).
    pub fn graph_key(&self, model: &str) -> Result<usine_storage::GraphKey, KernelError> {
        let spec = self.spec(model)?;
        Ok(graph_key(&spec, self.engine_for(model)?.as_ref()))
    }

    /// Queues `models` for warming in the background, in order, behind those already queued. They load
    /// (and run a throwaway generation) while fewer than `load_slots` loads run; a user load of a queued
    /// model takes it out of the queue, and a user load that finds every slot taken by warm-ups
    /// pre-empts one, which goes back to the front of the queue.
    pub fn warm_up(&self, models: &[&str]) -> Result<(), KernelError> {
        for model in models {
            self.spec(model)?;
        }
        {
            let mut state = self.inner.state.lock();
            for model in models {
                let known = state.loaded.contains_key(*model)
                    || state.loading.contains_key(*model)
                    || state.warm_queue.iter().any(|queued| queued == model);
                if !known {
                    state.warm_queue.push_back((*model).to_owned());
                }
            }
        }
        self.inner.pump();
        Ok(())
    }

    /// The `n` most used models, most used first, from the counts kept in the cache folder across
    /// runs (the seed's smart pre-loading): warm them at start-up with [`warm_up`](Self::warm_up).
    pub fn most_used(&self, n: usize) -> Vec<(String, u64)> {
        let usage = self.inner.usage.lock();
        let mut counts: Vec<(String, u64)> = usage.0.iter().map(|(model, n)| (model.clone(), *n)).collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counts.truncate(n);
        counts
    }

    /// Writes the counts of use to the cache folder now (they are also written at most once a second
    /// as loads happen).
    pub async fn save_usage(&self) -> Result<(), KernelError> {
        let counts = self.inner.usage.lock().0.clone();
        let storage = self.inner.storage.clone();
        blocking(move || usage::write(&storage, &counts))
            .await
            .map_err(|source| KernelError::Storage { model: "(cleanup)".into(), source: Arc::new(source) })
    }

    /// Removes the stored graphs that no registered engine can ask for again (an older engine version,
    /// or a schema older than the engine's); graphs of other engines are left alone.
    pub async fn cleanup_graphs(&self) -> Result<usine_storage::Maintenance, KernelError> {
        let current = self
            .inner
            .engines
            .read()
            .values()
            .map(|engine| {
                let descriptor = engine.descriptor();
                usine_storage::CurrentEngine {
                    engine: descriptor.name.clone(),
                    version: descriptor.version.clone(),
                    schema: descriptor.graph_schema,
                }
            })
            .collect();
        let store = self.inner.storage.clone();
        let policy = usine_storage::Cleanup { unused_for: None, current };
        blocking(move || store.cleanup(&policy))
            .await
            .map_err(|source| KernelError::Storage { model: "(cleanup)".into(), source: Arc::new(source) })
    }

    /// Whether `model` is being loaded now (compiling, reading its graph, or waiting for room).
    pub fn is_loading(&self, model: &str) -> bool {
        self.inner.state.lock().loading.contains_key(model)
    }

    /// The models waiting to be warmed, in order.
    pub fn warm_queue(&self) -> Vec<String> {
        self.inner.state.lock().warm_queue.iter().cloned().collect()
    }

    /// A stream of kernel events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<KernelEvent> {
        self.inner.events.subscribe()
    }

    /// The progress of `model`'s next (or current) compile, until its load ends (see
    /// [`ProgressStream::next`]). At most [`KernelConfig::max_progress_streams`] are open at once: each
    /// holds a place in the kernel's event channel, and a server hands them to clients.
    pub fn progress(&self, model: &str) -> Result<ProgressStream, KernelError> {
        let limit = self.inner.config.max_progress_streams;
        let open = &self.inner.progress_streams;
        if open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).is_err() {
            return Err(KernelError::TooManyProgressStreams { limit });
        }
        let slot = StreamSlot(Arc::clone(open));
        Ok(ProgressStream { events: self.inner.events.subscribe(), model: model.to_owned(), ended: None, _slot: slot })
    }

    /// Loads `model` with the default options.
    pub async fn load_model(&self, model: &str) -> Result<ModelHandle, KernelError> {
        self.load_with(model, LoadOptions::default()).await
    }

    /// Hands out `model`: at once if it is in memory; else from its stored graph; else compiled, saved
    /// and loaded. Concurrent calls for one model share one load, which goes on if its callers leave;
    /// a caller that joins a load under way gets its keep-alive, but the load's timeout and warming are
    /// those of the caller that started it.
    pub async fn load_with(&self, model: &str, options: LoadOptions) -> Result<ModelHandle, KernelError> {
        let mut outcome = {
            let mut state = self.inner.state.lock();
            if let Some(entry) = state.loaded.get(model) {
                self.inner.count(|c| c.memory_hits += 1);
                self.inner.metrics.load(LoadSource::Memory, Duration::ZERO);
                return Ok(self.inner.handle(entry, options));
            }
            // A user asks: the model leaves the warm-up queue, and a warm-up load of it becomes theirs.
            state.warm_queue.retain(|queued| queued != model);
            let outcome = match state.loading.get_mut(model) {
                Some(loading) => {
                    loading.warm = false;
                    loading.outcome.clone()
                }
                None => self.inner.start_load(&mut state, model, options, false)?,
            };
            self.inner.preempt_warm_ups(&mut state, model);
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
        self.inner.used(handle.id());
        if let Some(keep_alive) = options.keep_alive {
            handle.set_keep_alive(keep_alive);
        }
        Ok(handle)
    }

    /// Keeps `model` loaded whatever happens, once it is (an unknown id is an error).
    pub fn pin(&self, model: &str) -> Result<(), KernelError> {
        self.spec(model)?;
        self.inner.state.lock().pinned.insert(model.to_owned());
        Ok(())
    }

    /// Lets `model` be evicted again.
    pub fn unpin(&self, model: &str) {
        self.inner.state.lock().pinned.remove(model);
        self.inner.changed.notify_waiters();
    }

    /// Unloads `model` now if no handle holds it and it is not pinned; returns whether it did.
    pub fn unload(&self, model: &str) -> bool {
        self.inner.unload_if(model, EvictReason::Unloaded, |_| true)
    }

    /// The loaded models.
    pub fn loaded(&self) -> Vec<ModelInfo> {
        let state = self.inner.state.lock();
        let now = Instant::now();
        state
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
                    pinned: state.pinned.contains(&entry.id),
                    idle_for,
                    expires_in,
                }
            })
            .collect()
    }

    /// What the kernel has done since it started.
    pub fn stats(&self) -> KernelStats {
        self.inner.counters.lock().clone()
    }
}

impl std::fmt::Debug for RuntimeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeManager").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl Inner {
    /// A new handle on `entry`, counted as a use; called under the state lock.
    fn handle(self: &Arc<Self>, entry: &Arc<Entry>, options: LoadOptions) -> ModelHandle {
        self.used(&entry.id);
        entry.handles.fetch_add(1, Ordering::SeqCst);
        *entry.last_use.lock() = Instant::now();
        if let Some(keep_alive) = options.keep_alive {
            *entry.keep_alive.lock() = keep_alive;
        }
        ModelHandle::new(Arc::clone(entry), Arc::downgrade(self))
    }

    fn engine_for(&self, model: &str) -> Result<Arc<dyn Engine>, KernelError> {
        let spec = self.spec(model)?;
        let engines = self.engines.read();
        engines.get(&spec.engine).cloned().ok_or_else(|| KernelError::UnknownEngine {
            model: model.to_owned(),
            engine: spec.engine.clone(),
            known: engines.keys().cloned().collect(),
        })
    }

    fn spec(&self, model: &str) -> Result<ModelSpec, KernelError> {
        let catalog = self.catalog.read();
        catalog.get(model).cloned().ok_or_else(|| KernelError::UnknownModel {
            model: model.to_owned(),
            known: catalog.keys().cloned().collect(),
        })
    }

    /// Starts the shared load of `model`; called under the state lock.
    fn start_load(
        self: &Arc<Self>,
        state: &mut State,
        model: &str,
        options: LoadOptions,
        warm: bool,
    ) -> Result<Outcome, KernelError> {
        let engine = self.engine_for(model)?;
        let spec = self.spec(model)?;
        let (done, outcome) = watch::channel(None);
        let task = self
            .runtime
            .spawn(tracing::Instrument::instrument(
                load_task(Arc::clone(self), spec, engine, options, done, outcome.clone()),
                tracing::info_span!(parent: None, "load", model),
            ))
            .abort_handle();
        state.loading.insert(model.to_owned(), Loading { outcome: outcome.clone(), task, warm });
        Ok(outcome)
    }

    /// While more loads run than there are slots, cancels a warm-up load (not of `model`) and puts it
    /// back at the front of the queue; called under the state lock.
    fn preempt_warm_ups(&self, state: &mut State, model: &str) {
        while state.loading.len() > self.config.load_slots && self.preempt_in(state, model) {}
    }

    /// Cancels one warm-up load (not of `model`) that may hold room, putting it back at the front of the
    /// queue; returns whether there was one.
    fn preempt_one_warm_up(&self, model: &str) -> bool {
        self.preempt_in(&mut self.state.lock(), model)
    }

    /// Cancels one warm-up load (not of `model`) and requeues it at the front; called under the state lock.
    fn preempt_in(&self, state: &mut State, model: &str) -> bool {
        let Some(warm) =
            state.loading.iter().find(|(id, loading)| loading.warm && *id != model).map(|(id, _)| id.clone())
        else {
            return false;
        };
        let loading = state.loading.remove(&warm).expect("found just above");
        loading.task.abort(); // at its next await; a storage write under way still finishes whole
        state.warm_queue.push_front(warm.clone());
        self.emit(KernelEvent::WarmupPreempted { model: warm });
        true
    }

    /// Starts queued warm-ups while fewer loads than slots run.
    fn pump(self: &Arc<Self>) {
        let mut state = self.state.lock();
        while state.loading.len() < self.config.load_slots {
            let Some(model) = state.warm_queue.pop_front() else { return };
            if state.loaded.contains_key(&model) || state.loading.contains_key(&model) {
                continue;
            }
            let options = LoadOptions { warm: true, ..LoadOptions::default() };
            if self.start_load(&mut state, &model, options, true).is_err() {
                continue; // removed from the catalog since it was queued
            }
        }
    }

    /// Counts a use of `model`, and writes the counts at most once a second, off the caller's path.
    fn used(&self, model: &str) {
        let mut usage = self.usage.lock();
        *usage.0.entry(model.to_owned()).or_default() += 1;
        let now = Instant::now();
        if usage.1.is_some_and(|last| now - last < Duration::from_secs(1)) {
            return;
        }
        usage.1 = Some(now);
        let (counts, storage) = (usage.0.clone(), self.storage.clone());
        // Advisory figures: a failed write only loses counts since the last one.
        drop(tokio::task::spawn_blocking(move || usage::write(&storage, &counts)));
    }

    fn count(&self, change: impl FnOnce(&mut Counters)) {
        change(&mut self.counters.lock());
    }

    fn emit(&self, event: KernelEvent) {
        crate::logs::log(&event);
        let _ = self.events.send(event); // no subscriber: nobody to tell
    }

    /// Unloads `model` if it is idle, unpinned and `also` agrees; the weights return when the entry goes.
    fn unload_if(&self, model: &str, reason: EvictReason, also: impl FnOnce(&Entry) -> bool) -> bool {
        let removed = {
            let mut state = self.state.lock();
            let idle = state.loaded.get(model).is_some_and(|entry| {
                entry.handles.load(Ordering::SeqCst) == 0 && !state.pinned.contains(model) && also(entry)
            });
            if idle { state.loaded.remove(model) } else { None }
        };
        let Some(entry) = removed else { return false };
        drop(entry);
        self.count(|c| *c.evictions.entry(reason).or_default() += 1);
        self.metrics.evicted(reason);
        self.emit(KernelEvent::Evicted { model: model.to_owned(), reason });
        self.changed.notify_waiters();
        true
    }

    /// Evicts the least recently used idle, unpinned model; returns whether there was one.
    fn evict_one(&self, reason: EvictReason) -> bool {
        let victim = {
            let state = self.state.lock();
            state
                .loaded
                .values()
                .filter(|entry| entry.handles.load(Ordering::SeqCst) == 0 && !state.pinned.contains(&entry.id))
                .min_by_key(|entry| *entry.last_use.lock())
                .map(|entry| entry.id.clone())
        };
        victim.is_some_and(|model| self.unload_if(&model, reason, |_| true))
    }

    /// The models in the way of a load, and why they stay.
    fn holders(&self) -> Vec<Holder> {
        let state = self.state.lock();
        state
            .loaded
            .values()
            .map(|entry| Holder {
                model: entry.id.clone(),
                bytes: entry.plan.weights_bytes,
                why: if state.pinned.contains(&entry.id) { "pinned" } else { "in use" },
            })
            .collect()
    }

    /// Reserves `needed` bytes of weights, evicting idle models (least recently used first) and
    /// waiting for room until `timeout`.
    async fn reserve(
        &self,
        model: &str,
        needed: u64,
        timeout: Duration,
        user: bool,
    ) -> Result<(Weights, Pending), KernelError> {
        let started = Instant::now();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // The count and the allocation under the state lock, so that two loads cannot both take the
            // last place under `max_loaded`; the lock is released before any await.
            let (loaded, allocated) = {
                let state = self.state.lock();
                let loaded = state.loaded.len() + self.pending.load(Ordering::SeqCst);
                let allocated = (loaded < self.config.max_loaded).then(|| self.weights.allocate(needed, self.scope));
                if matches!(allocated, Some(Ok(_))) {
                    self.pending.fetch_add(1, Ordering::SeqCst);
                }
                drop(state);
                (loaded, allocated)
            };
            match allocated {
                None => {
                    if self.evict_one(EvictReason::MaxLoaded) || (user && self.preempt_one_warm_up(model)) {
                        continue;
                    }
                }
                Some(Ok(lease)) => {
                    let weights = Weights { lease: Some(lease), changed: Arc::clone(&self.changed) };
                    return Ok((weights, Pending(Arc::clone(&self.pending))));
                }
                Some(Err(MemoryError::TooLarge { capacity, .. })) => {
                    return Err(KernelError::TooLarge { model: model.to_owned(), needed, capacity });
                }
                Some(Err(MemoryError::Exhausted { .. })) => {
                    // A user never waits behind background work: a warm-up holding room gives it up.
                    if self.evict_one(EvictReason::Lru) || (user && self.preempt_one_warm_up(model)) {
                        continue;
                    }
                }
                Some(Err(source)) => return Err(KernelError::Memory { model: model.to_owned(), source }),
            }
            let left = timeout.saturating_sub(started.elapsed());
            if tokio::time::timeout(left, changed).await.is_err() {
                let waited = started.elapsed();
                if loaded >= self.config.max_loaded {
                    let limit = self.config.max_loaded;
                    return Err(KernelError::TooManyLoaded { model: model.to_owned(), limit, waited });
                }
                let free = self.weights.stats().available;
                return Err(KernelError::OutOfMemory {
                    model: model.to_owned(),
                    needed,
                    free,
                    waited,
                    holders: self.holders(),
                });
            }
        }
    }
}

/// Stored graphs up to this size are read on the runtime's thread: tens of microseconds, less than the
/// trip to a blocking thread costs. Larger ones are read on a blocking thread.
const INLINE_READ_MAX: u64 = 64 << 10;

/// A stored graph with its raw section, which stays in the file's mapping.
fn with_raw(hit: usine_storage::Hit<CompiledGraph>) -> CompiledGraph {
    let mut graph = hit.graph;
    if !hit.raw.is_empty() {
        graph.raw = usine_engine::RawSection::new(hit.raw);
    }
    graph
}

/// The key of a model's graph: every part that decides the engine's output.
fn graph_key(spec: &ModelSpec, engine: &dyn Engine) -> GraphKey {
    let descriptor = engine.descriptor();
    GraphKey::new(&spec.id, &descriptor.name, &descriptor.version)
        .device(&spec.profile)
        .options(&(&spec.quantization, &spec.options))
        .schema(descriptor.graph_schema)
}

/// Loads one model for every caller waiting on `done`; runs detached, so that a caller leaving does not
/// stop the others' load.
async fn load_task(
    inner: Arc<Inner>,
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
    inner.emit(KernelEvent::LoadStarted { model: model.clone() });
    let outcome = match load(&inner, &spec, engine.as_ref(), options).await {
        Err(error) => {
            inner.emit(KernelEvent::LoadFailed { model: model.clone(), message: error.to_string() });
            Err(error)
        }
        Ok((entry, pending)) => {
            let entry = Arc::new(entry);
            let mut state = inner.state.lock();
            let current = state.loading.get(&model).is_some_and(|loading| loading.outcome.same_channel(&leave.mine));
            if !current || state.loaded.contains_key(&model) {
                // Pre-empted after its last await, or loaded by another meanwhile: not ours to insert.
                drop(state);
                drop((entry, pending));
                return;
            }
            state.loaded.insert(model.clone(), Arc::clone(&entry));
            drop(pending); // counted among the loaded models from now on
            // The load's own handle, held by the outcome until every waiter has a clone (not a use).
            entry.handles.fetch_add(1, Ordering::SeqCst);
            let handle = ModelHandle::new(Arc::clone(&entry), Arc::downgrade(&inner));
            drop(state);
            let (source, duration) = (entry.source, entry.load_duration);
            inner.count(|c| {
                match source {
                    LoadSource::Disk => c.disk_hits += 1,
                    LoadSource::Compile => c.compiles += 1,
                    LoadSource::Memory => c.memory_hits += 1,
                }
                *c.load_time.entry(source).or_default() += duration;
            });
            inner.metrics.load(source, duration);
            inner.emit(KernelEvent::Loaded { model: model.clone(), source, duration });
            Ok(handle)
        }
    };
    let _ = done.send(Some(outcome)); // nobody waits any more: the model is loaded all the same
}

/// Takes a finished, failed or cancelled load out of the table of loads under way.
struct Leave {
    inner: Arc<Inner>,
    model: String,
    mine: Outcome,
}

impl Drop for Leave {
    fn drop(&mut self) {
        {
            let mut state = self.inner.state.lock();
            if state.loading.get(&self.model).is_some_and(|loading| loading.outcome.same_channel(&self.mine)) {
                state.loading.remove(&self.model);
            }
        }
        self.inner.changed.notify_waiters(); // the reaper sees a new idle model; waiters may find room
        self.inner.pump();
    }
}

/// The load path: stored graph or compile, room for the weights, then the engine's load. A stored graph
/// the engine cannot use is removed and compiled again.
async fn load(
    inner: &Arc<Inner>,
    spec: &ModelSpec,
    engine: &dyn Engine,
    options: LoadOptions,
) -> Result<(Entry, Pending), KernelError> {
    let started = Instant::now();
    let model = spec.id.clone();
    let key = graph_key(spec, engine);
    let storage_error = |source| KernelError::Storage { model: model.clone(), source: Arc::new(source) };
    let engine_error = |source| KernelError::Engine { model: model.clone(), source };
    for attempt in 0..2 {
        let (graph, source) = {
            // A stored graph is read without the lock (saves are atomic renames). On a miss, the key's
            // lock makes one process compile while the others wait, then read what it saved.
            let store = inner.storage.clone();
            let get_key = key.clone();
            let lookup = if attempt > 0 {
                Lookup::Miss(usine_storage::Miss::Absent)
            } else if std::fs::metadata(store.path_of(&key)).is_ok_and(|file| file.len() <= INLINE_READ_MAX) {
                // A small graph reads in microseconds: less than the trip to a blocking thread.
                store.get::<CompiledGraph>(&get_key).map_err(storage_error)?
            } else {
                blocking(move || store.get::<CompiledGraph>(&get_key)).await.map_err(storage_error)?
            };
            if let Lookup::Miss(miss @ (usine_storage::Miss::Corrupt(_) | usine_storage::Miss::KeyMismatch { .. })) =
                &lookup
            {
                inner.emit(KernelEvent::GraphQuarantined { model: model.clone(), reason: miss.to_string() });
            }
            let stored = match lookup {
                Lookup::Hit(hit) => Some(with_raw(hit)),
                Lookup::Miss(_) => None,
            };
            match stored {
                Some(graph) => (graph, LoadSource::Disk),
                None => {
                    let store = inner.storage.clone();
                    let lock_key = key.clone();
                    let (events, id) = (inner.events.clone(), model.clone());
                    let (lock, stored) = blocking(move || {
                        let lock = match store.try_lock(&lock_key)? {
                            Some(lock) => lock,
                            None => {
                                // Said before the wait, which lasts as long as the other compile.
                                let waiting = KernelEvent::WaitingForCompile { model: id };
                                crate::logs::log(&waiting);
                                let _ = events.send(waiting);
                                store.lock(&lock_key)?
                            }
                        };
                        Ok((lock, store.get::<CompiledGraph>(&lock_key)?))
                    })
                    .await
                    .map_err(storage_error)?;
                    let found = match stored {
                        Lookup::Hit(hit) if attempt == 0 => (with_raw(hit), LoadSource::Disk),
                        _ => {
                            let events = inner.events.clone();
                            let id = model.clone();
                            let progress = move |progress: Progress| {
                                let _ = events.send(KernelEvent::Progress { model: id.clone(), progress });
                            };
                            tracing::info!(model, "compiling");
                            let graph = engine.compile(spec, &progress).await.map_err(engine_error)?;
                            let store = inner.storage.clone();
                            let (save_key, saved) = (key.clone(), graph.clone());
                            let save = move || store.save_with_raw(&save_key, &saved, saved.raw.as_bytes());
                            if let Err(error) = blocking(save).await {
                                // The model still loads; the next load compiles again.
                                inner
                                    .emit(KernelEvent::SaveFailed { model: model.clone(), message: error.to_string() });
                            }
                            (graph, LoadSource::Compile)
                        }
                    };
                    drop(lock);
                    found
                }
            }
        };
        let plan = match engine.memory_plan(&graph) {
            Ok(plan) => plan,
            Err(error) if error.kind() == ErrorKind::UnusableGraph && source == LoadSource::Disk => {
                tracing::warn!(model, %error, "stored graph unusable; compiling again");
                continue;
            }
            Err(error) => return Err(engine_error(error)),
        };
        let timeout = options.timeout.unwrap_or(inner.config.load_timeout);
        let (weights, pending) = inner.reserve(&model, plan.weights_bytes, timeout, !options.warm).await?;
        let loaded = match engine.load(&graph).await {
            Ok(loaded) => loaded,
            Err(error) if error.kind() == ErrorKind::UnusableGraph && source == LoadSource::Disk => {
                tracing::warn!(model, %error, "stored graph unusable; compiling again");
                continue;
            }
            Err(error) => return Err(engine_error(error)),
        };
        if options.warm {
            loaded.warm_up().await.map_err(engine_error)?;
        }
        let entry = Entry {
            id: model.clone(),
            model: loaded,
            plan,
            source,
            load_duration: started.elapsed(),
            handles: AtomicUsize::new(0),
            last_use: Mutex::new(Instant::now()),
            keep_alive: Mutex::new(options.keep_alive.unwrap_or(inner.config.keep_alive)),
            _weights: weights,
        };
        return Ok((entry, pending));
    }
    Err(engine_error(EngineError::CorruptGraph { message: "a freshly compiled graph was refused".into() }))
}

/// Runs storage's file work on a blocking thread (which also holds paused time still in tests).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, usine_storage::StorageError> + Send + 'static,
) -> Result<T, usine_storage::StorageError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err(usine_storage::StorageError::Io {
            action: "running storage work on a blocking thread (the runtime is shutting down)",
            path: std::path::PathBuf::new(),
            source: std::io::Error::other("cancelled"),
        }),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.changed.notify_waiters(); // the reaper wakes, finds the kernel gone, and ends
    }
}

/// Unloads idle models whose keep-alive ran out, sleeping until the next expiry or a change.
async fn reap(inner: std::sync::Weak<Inner>, notify: Arc<Notify>) {
    loop {
        let changed = notify.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let Some(kernel) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let expired: Vec<String> = {
            let state = kernel.state.lock();
            state
                .loaded
                .values()
                .filter(|entry| entry.handles.load(Ordering::SeqCst) == 0 && !state.pinned.contains(&entry.id))
                .filter_map(|entry| {
                    let expiry = match *entry.keep_alive.lock() {
                        // A keep-alive too long to add to a clock is forever.
                        KeepAlive::For(keep) => entry.last_use.lock().checked_add(keep)?,
                        KeepAlive::UnloadNow => *entry.last_use.lock(),
                        KeepAlive::Forever => return None,
                    };
                    if expiry <= now {
                        return Some(entry.id.clone());
                    }
                    next = Some(next.map_or(expiry, |next| next.min(expiry)));
                    None
                })
                .collect()
        };
        for model in expired {
            kernel.unload_if(&model, EvictReason::KeepAlive, |entry| entry.handles.load(Ordering::SeqCst) == 0);
        }
        drop(kernel);
        match next {
            Some(next) => {
                let _ = tokio::time::timeout_at(next, changed).await;
            }
            None => changed.await,
        }
    }
}

/// The counts of use per model, in the store's note `usage.json`.
mod usage {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use parking_lot::Mutex;
    use usine_storage::{StorageError, StorageManager};

    const NOTE: &str = "usage.json";

    /// The counts last written; none when the note is absent or unreadable (they are advisory).
    pub(super) fn read(storage: &StorageManager) -> BTreeMap<String, u64> {
        storage.read_note(NOTE).ok().flatten().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
    }

    /// The total of the counts last written to each store (by its root). Writes run on blocking threads
    /// in any order (the throttled one of `used` is not awaited), and counts only grow: a write holding a
    /// smaller total than the note's is stale and must not overwrite it.
    static WRITTEN: Mutex<BTreeMap<PathBuf, u64>> = Mutex::new(BTreeMap::new());

    /// Writes the counts crash-safe (a reader sees the old note or the new one, which survives a power
    /// cut once written); counts older than the note's are left unwritten.
    pub(super) fn write(storage: &StorageManager, counts: &BTreeMap<String, u64>) -> Result<(), StorageError> {
        let total: u64 = counts.values().sum();
        let mut written = WRITTEN.lock();
        if written.get(storage.root()).is_some_and(|&last| last > total) {
            return Ok(());
        }
        let json = serde_json::to_vec(counts).expect("a map of strings to numbers");
        storage.write_note(NOTE, &json)?;
        written.insert(storage.root().to_owned(), total);
        Ok(())
    }
}
