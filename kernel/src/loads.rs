//! The load path: a stored graph, a graph another host published in the remote tier (feature
//! `remote`), or a compile (one per key across processes, and across the fleet's hosts); room for the
//! weights, then the engine's load. A stored graph the engine cannot use is compiled again.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use usine_engine::{CompiledGraph, Engine, EngineError, ErrorKind, ModelSpec, Progress};
use usine_storage::{GraphKey, Lookup, Miss, StorageError, StorageManager};

use crate::config::{KeepAlive, LoadOptions};
use crate::error::KernelError;
use crate::events::{KernelEvent, LoadSource};
use crate::handle::Entry;
use crate::table::{Pending, Table, entry};
use crate::telemetry::Telemetry;

/// Stored graphs up to this size are read on the runtime's thread: tens of microseconds, less than the
/// trip to a blocking thread costs. Larger ones are read on a blocking thread.
const INLINE_READ_MAX: u64 = 64 << 10;

/// What a load needs: the store, the table to make room in, where to tell, and the defaults.
pub(crate) struct LoadPath<'a> {
    pub(crate) storage: &'a StorageManager,
    pub(crate) table: &'a Table,
    pub(crate) telemetry: &'a Telemetry,
    pub(crate) load_timeout: Duration,
    pub(crate) keep_alive: KeepAlive,
    /// The fleet's shared tier, if one is configured.
    #[cfg(feature = "remote")]
    pub(crate) remote: Option<&'a usine_storage::remote::RemoteTier>,
}

/// What the fleet says about a graph missing here: fetched, or compile (holding its lease, if any).
#[cfg(feature = "remote")]
enum Fleet {
    Fetched(CompiledGraph),
    Compile(Option<usine_storage::remote::Lease>),
}

/// The key of a model's graph: every part that decides the engine's output.
pub(crate) fn graph_key(spec: &ModelSpec, engine: &dyn Engine) -> GraphKey {
    let descriptor = engine.descriptor();
    GraphKey::new(&spec.id, &descriptor.name, &descriptor.version)
        .device(&spec.profile)
        .options(&(&spec.quantization, &spec.options))
        .schema(descriptor.graph_schema)
}

/// A stored graph with its raw section, which stays in the file's mapping.
fn with_raw(hit: usine_storage::Hit<CompiledGraph>) -> CompiledGraph {
    let mut graph = hit.graph;
    if !hit.raw.is_empty() {
        graph.raw = usine_engine::RawSection::new(hit.raw);
    }
    graph
}

impl LoadPath<'_> {
    /// Loads `spec` with `engine`; `preempt` cancels a warm-up load holding room (a user's load only).
    pub(crate) async fn load(
        &self,
        spec: &ModelSpec,
        engine: &dyn Engine,
        options: LoadOptions,
        preempt: impl Fn() -> bool,
    ) -> Result<(Entry, Pending), KernelError> {
        let started = Instant::now();
        let model = spec.id.clone();
        let key = graph_key(spec, engine);
        let engine_error = |source| KernelError::Engine { model: model.clone(), source };
        for attempt in 0..2 {
            let (graph, source) = match self.stored(&model, &key, attempt).await? {
                Some(graph) => (graph, LoadSource::Disk),
                None => match self.fetched(&model, &key, attempt).await? {
                    Some(graph) => (graph, LoadSource::Remote),
                    None => self.compile_once(spec, engine, &key, attempt).await?,
                },
            };
            let plan = match engine.memory_plan(&graph) {
                Ok(plan) => plan,
                Err(error) if error.kind() == ErrorKind::UnusableGraph && source.stored() => {
                    tracing::warn!(model, %error, "stored graph unusable; compiling again");
                    continue;
                }
                Err(error) => return Err(engine_error(error)),
            };
            let timeout = options.timeout.unwrap_or(self.load_timeout);
            let reservation = self.table.reserve(&model, plan.weights_bytes, timeout, &preempt).await?;
            let loaded = match engine.load(&graph).await {
                Ok(loaded) => loaded,
                Err(error) if error.kind() == ErrorKind::UnusableGraph && source.stored() => {
                    tracing::warn!(model, %error, "stored graph unusable; compiling again");
                    continue;
                }
                Err(error) => return Err(engine_error(error)),
            };
            if options.warm {
                loaded.warm_up().await.map_err(engine_error)?;
            }
            let keep_alive = options.keep_alive.unwrap_or(self.keep_alive);
            let timing = (source, started.elapsed());
            return Ok(entry(model.clone(), loaded, plan, timing, keep_alive, reservation));
        }
        Err(engine_error(EngineError::CorruptGraph { message: "a freshly compiled graph was refused".into() }))
    }

    /// The graph stored under `key` (none on a second attempt, after an unusable one); read without the
    /// store's lock (saves are atomic renames).
    async fn stored(&self, model: &str, key: &GraphKey, attempt: usize) -> Result<Option<CompiledGraph>, KernelError> {
        if attempt > 0 {
            return Ok(None);
        }
        let store = self.storage.clone();
        let get_key = key.clone();
        let lookup = if store.stored_len(key).is_some_and(|len| len <= INLINE_READ_MAX) {
            store.get::<CompiledGraph>(key)
        } else {
            blocking(move || store.get::<CompiledGraph>(&get_key)).await?
        }
        .map_err(storage_error(model))?;
        Ok(self.hit(model, lookup))
    }

    /// On a local miss, the graph another host published, fetched into the local store (none without a
    /// remote tier, on a second attempt, or when the tier has none or is down).
    #[cfg(feature = "remote")]
    async fn fetched(&self, model: &str, key: &GraphKey, attempt: usize) -> Result<Option<CompiledGraph>, KernelError> {
        let Some(remote) = self.remote.filter(|_| attempt == 0) else { return Ok(None) };
        self.fetch_remote(remote, model, key).await
    }

    #[cfg(not(feature = "remote"))]
    async fn fetched(&self, _: &str, _: &GraphKey, _: usize) -> Result<Option<CompiledGraph>, KernelError> {
        Ok(None)
    }

    /// Fetches `key`'s graph from the tier into the store, then reads it as any stored graph.
    #[cfg(feature = "remote")]
    async fn fetch_remote(
        &self,
        remote: &usine_storage::remote::RemoteTier,
        model: &str,
        key: &GraphKey,
    ) -> Result<Option<CompiledGraph>, KernelError> {
        match remote.fetch(self.storage, key).await {
            usine_storage::remote::Fetched::Hit { .. } => self.stored(model, key, 0).await,
            _ => Ok(None),
        }
    }

    /// Under the local key lock, on a miss everywhere: the fleet's lease to compile, or the graph of the
    /// host that holds it, once published. Without a tier, or with the tier down, compile without one.
    #[cfg(feature = "remote")]
    async fn fleet(&self, model: &str, key: &GraphKey, attempt: usize) -> Result<Fleet, KernelError> {
        use usine_storage::remote::{Leased, Waited};
        let Some(remote) = self.remote.filter(|_| attempt == 0) else { return Ok(Fleet::Compile(None)) };
        // One bound for the whole wait, even across a second lease.
        let deadline = tokio::time::Instant::now() + remote.config().wait;
        // Twice at most: a lease that ends without a graph (its host failed) is taken again once.
        for _ in 0..2 {
            match remote.lease(key).await {
                Leased::Acquired(lease) => {
                    // Published between this host's fetch and its lease: no compile.
                    if let Some(graph) = self.fetch_remote(remote, model, key).await? {
                        lease.release().await;
                        return Ok(Fleet::Fetched(graph));
                    }
                    return Ok(Fleet::Compile(Some(lease)));
                }
                Leased::Unavailable { .. } => return Ok(Fleet::Compile(None)),
                Leased::Busy => {
                    self.telemetry.emit(KernelEvent::WaitingForHost { model: model.to_owned() });
                    match remote.wait_published(key, deadline).await {
                        Waited::Published => {
                            return Ok(match self.fetch_remote(remote, model, key).await? {
                                Some(graph) => Fleet::Fetched(graph),
                                None => Fleet::Compile(None),
                            });
                        }
                        Waited::Abandoned => continue,
                        Waited::TimedOut | Waited::Unavailable { .. } => return Ok(Fleet::Compile(None)),
                    }
                }
            }
        }
        Ok(Fleet::Compile(None))
    }

    /// A lookup's graph; a damaged or foreign one is told (the store quarantined it).
    fn hit(&self, model: &str, lookup: Lookup<CompiledGraph>) -> Option<CompiledGraph> {
        match lookup {
            Lookup::Hit(hit) => Some(with_raw(hit)),
            Lookup::Miss(miss @ (Miss::Corrupt(_) | Miss::KeyMismatch { .. })) => {
                let quarantined = KernelEvent::GraphQuarantined { model: model.to_owned(), reason: miss.to_string() };
                self.telemetry.emit(quarantined);
                None
            }
            Lookup::Miss(_) => None,
        }
    }

    /// Under the key's lock across processes: the graph another process saved meanwhile, or a compile
    /// saved for the others.
    async fn compile_once(
        &self,
        spec: &ModelSpec,
        engine: &dyn Engine,
        key: &GraphKey,
        attempt: usize,
    ) -> Result<(CompiledGraph, LoadSource), KernelError> {
        let model = spec.id.as_str();
        let store = self.storage.clone();
        let lock_key = key.clone();
        let (events, id) = (self.telemetry.events.clone(), model.to_owned());
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
        .await?
        .map_err(storage_error(model))?;
        let found = match self.hit(model, stored).filter(|_| attempt == 0) {
            Some(graph) => (graph, LoadSource::Disk),
            None => {
                #[cfg(feature = "remote")]
                let lease = match self.fleet(model, key, attempt).await? {
                    Fleet::Fetched(graph) => return Ok((graph, LoadSource::Remote)),
                    Fleet::Compile(lease) => lease,
                };
                let events = self.telemetry.events.clone();
                let id = model.to_owned();
                let progress = move |progress: Progress| {
                    let _ = events.send(KernelEvent::Progress { model: id.clone(), progress });
                };
                tracing::info!(model, "compiling");
                let graph = match engine.compile(spec, &progress).await {
                    Ok(graph) => graph,
                    Err(source) => {
                        // Given back at once: the hosts waiting on it compile now, not at its expiry.
                        #[cfg(feature = "remote")]
                        if let Some(lease) = lease {
                            lease.release().await;
                        }
                        return Err(KernelError::Engine { model: model.to_owned(), source });
                    }
                };
                let store = self.storage.clone();
                let (save_key, saved) = (key.clone(), graph.clone());
                let save = move || store.save_with_raw(&save_key, &saved, saved.raw.as_bytes());
                match blocking(save).await.and_then(|saved| saved.map_err(storage_error(model))) {
                    // The model still loads; the next load compiles again.
                    Err(error) => self
                        .telemetry
                        .emit(KernelEvent::SaveFailed { model: model.to_owned(), message: error.to_string() }),
                    // Published before the lease ends: a host waiting on it finds the graph.
                    #[cfg(feature = "remote")]
                    Ok(_) => {
                        if let Some(remote) = self.remote {
                            let published = remote.publish(self.storage, key).await;
                            tracing::info!(model, ?published, "published to the remote tier");
                        }
                    }
                    #[cfg(not(feature = "remote"))]
                    Ok(_) => {}
                }
                #[cfg(feature = "remote")]
                if let Some(lease) = lease {
                    lease.release().await;
                }
                (graph, LoadSource::Compile)
            }
        };
        drop(lock);
        Ok(found)
    }
}

fn storage_error(model: &str) -> impl Fn(StorageError) -> KernelError + '_ {
    move |source| KernelError::Storage { model: model.to_owned(), source: Arc::new(source) }
}

/// Runs storage's file work on a blocking thread (which also holds paused time still in tests); a
/// runtime shutting down cancels it.
pub(crate) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, KernelError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => Ok(result),
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err(KernelError::ShuttingDown),
    }
}
