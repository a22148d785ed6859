//! `RuntimeManager`: the kernel's facade. What is in memory is the table's (`table.rs`), the loads
//! under way the scheduler's (`schedule.rs`), how a model is loaded the load path's (`loads.rs`).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use usine_engine::{Engine, ModelSpec};
use usine_memory::{MemoryManager, PoolConfig};
use usine_storage::StorageManager;

use crate::catalog::Catalog;
use crate::config::{KernelConfig, LoadOptions};
use crate::error::KernelError;
use crate::events::{EvictReason, KernelEvents};
use crate::handle::ModelHandle;
use crate::loads::{blocking, graph_key};
use crate::progress::ProgressStream;
use crate::schedule::Loads;
use crate::table::{ModelInfo, Table};
use crate::telemetry::{KernelStats, Telemetry};
use crate::usage::Usage;

/// Decides which models are in memory, and gets a model ready as fast as it can.
///
/// Cheap to clone. See the crate documentation for an example.
#[derive(Clone)]
pub struct RuntimeManager {
    catalog: Arc<Catalog>,
    loads: Arc<Loads>,
    /// Progress streams open now.
    progress_streams: Arc<AtomicUsize>,
}

impl RuntimeManager {
    /// A kernel over `memory` (its weights pool is created if absent) and `storage`, with a keep-alive
    /// reaper on the current tokio runtime (it stops when the kernel is dropped).
    pub fn new(config: KernelConfig, memory: &MemoryManager, storage: StorageManager) -> Result<Self, KernelError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| KernelError::NoRuntime)?;
        let weights = match memory.pool(&config.weights_pool) {
            Ok(pool) => pool,
            Err(_) => memory
                .create_pool(&config.weights_pool, PoolConfig::new(config.weights_capacity, 1).idle_timeout(None))
                .map_err(|source| KernelError::WeightsPool { source })?,
        };
        let telemetry = Arc::new(Telemetry::new());
        let table = Arc::new(Table::new(config.max_loaded, weights, Arc::clone(&telemetry)));
        runtime.spawn(crate::reaper::reap(Arc::downgrade(&table), Arc::clone(&table.changed)));
        let usage = Arc::new(Usage::read(storage.clone()));
        let catalog = Arc::new(Catalog::default());
        let loads = Loads::new(config, Arc::clone(&catalog), storage, (table, telemetry, usage), runtime);
        Ok(Self { catalog, loads: Arc::new(loads), progress_streams: Arc::new(AtomicUsize::new(0)) })
    }

    /// Shares compiled graphs with a fleet through `tier`: a graph missing from the local store is
    /// fetched from it, and one compiled here is published to it, one compile per graph for the whole
    /// fleet. Set once, before the first load; returns `false` (and changes nothing) when a tier is
    /// already set.
    #[cfg(feature = "remote")]
    pub fn share_through(&self, tier: usine_storage::remote::RemoteTier) -> bool {
        self.loads.remote.set(tier).is_ok()
    }

    /// The fleet's shared tier, if one is set.
    #[cfg(feature = "remote")]
    pub fn remote_tier(&self) -> Option<&usine_storage::remote::RemoteTier> {
        self.loads.remote.get()
    }

    /// Registers an engine under its descriptor's name.
    pub fn register_engine(&self, engine: Arc<dyn Engine>) {
        self.catalog.register_engine(engine);
    }

    /// Adds (or replaces) a model in the catalog, under its spec's id.
    pub fn register_model(&self, spec: ModelSpec) {
        self.catalog.register_model(spec);
    }

    /// The engine that runs `model` (the seed's `getEngineFor`).
    pub fn engine_for(&self, model: &str) -> Result<Arc<dyn Engine>, KernelError> {
        self.catalog.engine_for(model)
    }

    /// The key `model`'s compiled graph is stored under (for `usine cache explain`, say).
    pub fn graph_key(&self, model: &str) -> Result<usine_storage::GraphKey, KernelError> {
        let spec = self.catalog.spec(model)?;
        Ok(graph_key(&spec, self.engine_for(model)?.as_ref()))
    }

    /// Queues `models` for warming in the background, in order, behind those already queued. They load
    /// (and run a throwaway generation) while fewer than `load_slots` loads run; a user load of a queued
    /// model takes it out of the queue, and a user load that finds every slot taken by warm-ups
    /// pre-empts one, which goes back to the front of the queue.
    pub fn warm_up(&self, models: &[&str]) -> Result<(), KernelError> {
        for model in models {
            self.catalog.spec(model)?;
        }
        self.loads.warm_up(models);
        Ok(())
    }

    /// The `n` most used models, most used first, from the counts kept in the cache folder across
    /// runs (the seed's smart pre-loading): warm them at start-up with [`warm_up`](Self::warm_up).
    pub fn most_used(&self, n: usize) -> Vec<(String, u64)> {
        self.loads.usage.most_used(n)
    }

    /// Writes the counts of use to the cache folder now (they are also written at most once a second
    /// as loads happen).
    pub async fn save_usage(&self) -> Result<(), KernelError> {
        let (counts, storage) = self.loads.usage.snapshot();
        blocking(move || crate::usage::write(&storage, &counts))
            .await?
            .map_err(|source| KernelError::Maintenance { source: Arc::new(source) })
    }

    /// Removes the stored graphs that no registered engine can ask for again (an older engine version,
    /// or a schema older than the engine's); graphs of other engines are left alone.
    pub async fn cleanup_graphs(&self) -> Result<usine_storage::Maintenance, KernelError> {
        let store: StorageManager = self.loads.storage.clone();
        let policy = usine_storage::Cleanup { unused_for: None, current: self.catalog.current_engines() };
        blocking(move || store.cleanup(&policy))
            .await?
            .map_err(|source| KernelError::Maintenance { source: Arc::new(source) })
    }

    /// Whether `model` is being loaded now (compiling, reading its graph, or waiting for room).
    pub fn is_loading(&self, model: &str) -> bool {
        self.loads.is_loading(model)
    }

    /// The models waiting to be warmed, in order.
    pub fn warm_queue(&self) -> Vec<String> {
        self.loads.warm_queue()
    }

    /// The kernel's events from now on, as a stream.
    pub fn subscribe(&self) -> KernelEvents {
        KernelEvents::new(self.loads.telemetry.events.subscribe())
    }

    /// The progress of `model`'s next (or current) compile, until its load ends (see
    /// [`ProgressStream::next`]). At most [`KernelConfig::max_progress_streams`] are open at once: each
    /// holds a place in the kernel's event channel, and a server hands them to clients.
    pub fn progress(&self, model: &str) -> Result<ProgressStream, KernelError> {
        let events = self.loads.telemetry.events.subscribe();
        ProgressStream::open(events, model, &self.progress_streams, self.loads.config.max_progress_streams)
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
        self.loads.load(model, options).await
    }

    /// Keeps `model` loaded whatever happens, once it is (an unknown id is an error).
    pub fn pin(&self, model: &str) -> Result<(), KernelError> {
        self.catalog.spec(model)?;
        self.loads.table.pin(model);
        Ok(())
    }

    /// Lets `model` be evicted again.
    pub fn unpin(&self, model: &str) {
        self.loads.table.unpin(model);
    }

    /// Unloads `model` now if no handle holds it and it is not pinned; returns whether it did.
    pub fn unload(&self, model: &str) -> bool {
        self.loads.table.unload_if(model, EvictReason::Unloaded, |_| true)
    }

    /// The loaded models.
    pub fn loaded(&self) -> Vec<ModelInfo> {
        self.loads.table.infos()
    }

    /// What the kernel has done since it started.
    pub fn stats(&self) -> KernelStats {
        self.loads.telemetry.stats()
    }
}

impl std::fmt::Debug for RuntimeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeManager").field("config", &self.loads.config).finish_non_exhaustive()
    }
}
