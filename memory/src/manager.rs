//! `MemoryManager`: the registry of pools, scope release, GC, events and stats across pools.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;

use crate::config::{ManagerConfig, PoolConfig, StandardPools};
use crate::error::{MemoryError, Result};
use crate::events::{Event, EventBus, EventStream, ReclaimReason};
use crate::lease::{Lease, ScopeId};
use crate::metrics::describe_metrics;
use crate::pool::{Pool, PoolShared};
use crate::stats::{MemoryStats, PoolStats};

/// The pools of one runtime, and what looks after them.
///
/// Cheap to clone; all clones share the same pools.
///
/// ```
/// use usine_memory::{MemoryManager, MemoryError, ScopeId, StandardPools, KV_CACHE};
///
/// let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(64 << 20)?)?;
/// let request = ScopeId::fresh();
/// let kv = memory.allocate(KV_CACHE, 1 << 20, request)?;
/// assert_eq!(memory.pool_stats(KV_CACHE)?.used, 1 << 20);
///
/// // Too much for the pool right now: a typed error with the figures, never a panic.
/// let err = memory.allocate(KV_CACHE, 44 << 20, request).unwrap_err();
/// assert!(matches!(err, MemoryError::Exhausted { requested, .. } if requested == 44 << 20));
///
/// // The request ends: every lease of its scope comes back at once.
/// assert_eq!(memory.release_scope(request).leases, 1);
/// assert!(kv.is_revoked());
/// # Ok::<(), MemoryError>(())
/// ```
#[derive(Clone)]
pub struct MemoryManager {
    inner: Arc<Inner>,
}

struct Inner {
    config: ManagerConfig,
    pools: RwLock<BTreeMap<Arc<str>, Pool>>,
    events: Arc<EventBus>,
}

/// What a GC pass or a scope release took back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reclaimed {
    /// Leases revoked.
    pub leases: usize,
    /// Bytes returned to their pools.
    pub bytes: u64,
}

impl Reclaimed {
    fn add(&mut self, (leases, bytes): (usize, u64)) {
        self.leases += leases;
        self.bytes += bytes;
    }
}

impl Default for MemoryManager {
    /// A manager with no pools and the default settings.
    fn default() -> Self {
        Self::new(ManagerConfig::default())
    }
}

impl MemoryManager {
    /// A manager with no pools yet.
    ///
    /// Metric handles are registered with the recorder installed when each pool is created: install
    /// the exporter (in the binary) before creating pools, or their figures go nowhere.
    pub fn new(config: ManagerConfig) -> Self {
        describe_metrics();
        let events = Arc::new(EventBus::new(config.event_capacity));
        Self { inner: Arc::new(Inner { config, pools: RwLock::new(BTreeMap::new()), events }) }
    }

    /// A manager with default settings and the three standard pools, `kv-cache`, `activations` and
    /// `uniforms`.
    pub fn with_standard_pools(pools: &StandardPools) -> Result<Self> {
        let manager = Self::default();
        manager.create_standard_pools(pools)?;
        Ok(manager)
    }

    /// Creates the three standard pools in this manager.
    pub fn create_standard_pools(&self, pools: &StandardPools) -> Result<()> {
        for (name, config) in pools.named() {
            self.create_pool(name, config.clone())?;
        }
        Ok(())
    }

    /// Creates a pool.
    ///
    /// Fails with [`MemoryError::DuplicatePool`], [`MemoryError::InvalidName`],
    /// [`MemoryError::ZeroCapacity`], [`MemoryError::BlockSize`] or [`MemoryError::WaterMarks`].
    pub fn create_pool(&self, name: &str, config: PoolConfig) -> Result<Pool> {
        config.validate(name)?;
        let mut pools = self.inner.pools.write();
        if pools.contains_key(name) {
            return Err(MemoryError::DuplicatePool { pool: name.to_owned() });
        }
        let pool = Pool { shared: Arc::new(PoolShared::new(name, &config, Arc::clone(&self.inner.events))) };
        pools.insert(name.into(), pool.clone());
        self.inner.events.emit(|| Event::PoolCreated {
            pool: name.into(),
            capacity: config.capacity,
            block_size: config.block_size,
        });
        Ok(pool)
    }

    /// The pool with this name; keep the handle to skip the lookup on hot paths.
    pub fn pool(&self, name: &str) -> Result<Pool> {
        let pools = self.inner.pools.read();
        pools.get(name).cloned().ok_or_else(|| MemoryError::UnknownPool {
            pool: name.to_owned(),
            known: pools.keys().map(|known| known.to_string()).collect(),
        })
    }

    /// Every pool, sorted by name.
    pub fn pools(&self) -> Vec<Pool> {
        self.inner.pools.read().values().cloned().collect()
    }

    /// [`Pool::allocate`] on the pool with this name.
    pub fn allocate(&self, pool: &str, bytes: u64, scope: ScopeId) -> Result<Lease> {
        self.pool(pool)?.allocate(bytes, scope)
    }

    /// [`Pool::allocate_wait`] on the pool with this name.
    pub async fn allocate_wait(&self, pool: &str, bytes: u64, scope: ScopeId, timeout: Duration) -> Result<Lease> {
        self.pool(pool)?.allocate_wait(bytes, scope, timeout).await
    }

    /// [`Pool::can_allocate`] on the pool with this name; `false` for an unknown pool. Advisory only.
    pub fn can_allocate(&self, pool: &str, bytes: u64) -> bool {
        self.pool(pool).is_ok_and(|pool| pool.can_allocate(bytes))
    }

    /// Revokes every lease of `scope`, in every pool, at once; their later drops free nothing. Requests
    /// of the scope still waiting for space stop waiting, with [`MemoryError::ScopeReleased`].
    pub fn release_scope(&self, scope: ScopeId) -> Reclaimed {
        let mut reclaimed = Reclaimed::default();
        for pool in self.pools() {
            reclaimed.add(pool.shared.revoke(ReclaimReason::Scope, |lease_scope, _| *lease_scope == scope));
        }
        reclaimed
    }

    /// Revokes, in every pool with an idle timeout, the leases not used for longer than it.
    pub fn gc_now(&self) -> Reclaimed {
        let mut reclaimed = Reclaimed::default();
        for pool in self.pools() {
            reclaimed.add(pool.shared.collect_idle());
        }
        reclaimed
    }

    /// Starts the GC sweeper: a task on the current tokio runtime that calls [`gc_now`](Self::gc_now)
    /// every [`ManagerConfig::gc_interval`], the first time one interval from now.
    ///
    /// The sweeper stops when the returned handle is dropped, or when the manager is gone. Fails with
    /// [`MemoryError::NoRuntime`] outside a tokio runtime.
    pub fn start_gc(&self) -> Result<GcTask> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| MemoryError::NoRuntime { purpose: "run the gc sweeper on" })?;
        let manager = Arc::downgrade(&self.inner);
        // Bounded both ways: a zero period would spin, and `Duration::MAX` would overflow the clock.
        let period = self.inner.config.gc_interval.clamp(Duration::from_millis(1), MAX_GC_INTERVAL);
        let task = runtime.spawn(sweep(manager, period));
        Ok(GcTask { task })
    }

    /// A stream of events from now on; see [`EventStream`].
    pub fn subscribe(&self) -> EventStream {
        self.inner.events.subscribe()
    }

    /// A snapshot of one pool.
    pub fn pool_stats(&self, name: &str) -> Result<PoolStats> {
        Ok(self.pool(name)?.stats())
    }

    /// A snapshot of every pool, sorted by name (each pool is consistent in itself).
    pub fn stats(&self) -> MemoryStats {
        MemoryStats { pools: self.pools().iter().map(Pool::stats).collect() }
    }
}

impl std::fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryManager")
            .field("pools", &self.inner.pools.read().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

async fn sweep(manager: Weak<Inner>, period: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = manager.upgrade() else { return };
        MemoryManager { inner }.gc_now();
    }
}

/// The longest GC interval: one day.
pub const MAX_GC_INTERVAL: Duration = Duration::from_secs(86_400);

/// The running GC sweeper; dropping it stops the sweeper.
#[derive(Debug)]
pub struct GcTask {
    task: tokio::task::JoinHandle<()>,
}

impl GcTask {
    /// Whether the sweeper has stopped (its manager is gone).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for GcTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}
