//! One pool: its books under one short lock, allocation, resizing, revocation, and the queue of waiters.
//!
//! Every change of the books goes through [`PoolShared::with_state`], which holds the lock for the
//! change only and drops, after unlocking, any lease that could not be handed over (a lease's `Drop`
//! takes the same lock).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use slab::Slab;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::PoolConfig;
use crate::error::{MemoryError, Result};
use crate::events::{Event, EventBus, FailureReason, PoolName, PressureLevel, ReclaimReason};
use crate::lease::{Lease, LeaseId, ResizeBy, ScopeId};
use crate::metrics::{PoolMetrics, to_f64};
use crate::stats::PoolStats;

/// A handle on one pool; cheap to clone, all clones share the pool.
///
/// ```
/// use std::time::Duration;
/// use usine_memory::{MemoryManager, PoolConfig, ScopeId};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), usine_memory::MemoryError> {
/// let memory = MemoryManager::default();
/// let activations = memory.create_pool("activations", PoolConfig::new(8192, 4096))?;
/// let step = activations.allocate(8192, ScopeId::new(7))?; // the whole pool
///
/// // A second step waits until the first one's lease is dropped, up to its timeout.
/// let waiter = activations.clone();
/// let next = tokio::spawn(async move {
///     waiter.allocate_wait(4096, ScopeId::new(8), Duration::from_millis(500)).await
/// });
/// tokio::task::yield_now().await; // let it queue
/// assert_eq!(activations.stats().waiters, 1);
/// drop(step);
/// let next = next.await.expect("the task does not panic")?;
/// assert_eq!(next.reserved(), 4096);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    pub(crate) shared: Arc<PoolShared>,
}

/// The pool behind every `Pool` handle and every `Lease`.
pub(crate) struct PoolShared {
    pub(crate) name: PoolName,
    capacity: u64,
    block_size: u64,
    /// `used` at or above this turns the pressure high.
    high_water: u64,
    /// `used` at or below this turns it back to normal.
    low_water: u64,
    idle_timeout: Option<Duration>,
    state: Mutex<PoolState>,
    events: Arc<EventBus>,
    metrics: PoolMetrics,
}

/// The books, guarded by the pool's lock.
struct PoolState {
    used: u64,
    peak: u64,
    high: bool,
    next_lease: u64,
    next_waiter: u64,
    leases: Slab<Record>,
    waiters: VecDeque<Waiter>,
    allocations: u64,
    frees: u64,
    failures: u64,
    reclaimed: u64,
    total_wait: Duration,
}

/// What the pool knows of a live lease; revoking a lease removes its record.
struct Record {
    id: u64,
    len: u64,
    reserved: u64,
    scope: ScopeId,
    last_use: Instant,
}

/// A request queued for space, served strictly in arrival order.
struct Waiter {
    id: u64,
    requested: u64,
    reserved: u64,
    scope: ScopeId,
    since: Instant,
    /// Carries the lease, or the error that ended the wait (its scope was released).
    grant: oneshot::Sender<Result<Lease>>,
}

/// Leases built under the lock that must be dropped after it (their `Drop` takes the lock).
type Deferred = Vec<Lease>;

impl PoolShared {
    pub(crate) fn new(name: &str, config: &PoolConfig, events: Arc<EventBus>) -> Self {
        // The high mark rounds up and the low one down, so that they differ even in a tiny pool and a
        // pool whose use does not change never flips between the two levels.
        let share = |percent: u8| u128::from(config.capacity) * u128::from(percent);
        let mark = |bytes: u128| u64::try_from(bytes).expect("at most 100 % of a u64 capacity");
        Self {
            name: name.into(),
            capacity: config.capacity,
            block_size: config.block_size,
            high_water: mark(share(config.high_water_percent).div_ceil(100)),
            low_water: mark(share(config.low_water_percent) / 100),
            idle_timeout: config.idle_timeout,
            state: Mutex::new(PoolState {
                used: 0,
                peak: 0,
                high: false,
                next_lease: 0,
                next_waiter: 0,
                leases: Slab::new(),
                waiters: VecDeque::new(),
                allocations: 0,
                frees: 0,
                failures: 0,
                reclaimed: 0,
                total_wait: Duration::ZERO,
            }),
            metrics: PoolMetrics::register(name, config.capacity),
            events,
        }
    }

    /// Runs `change` on the books under the lock, then drops the leases it deferred.
    fn with_state<R>(self: &Arc<Self>, change: impl FnOnce(&mut PoolState, &mut Deferred) -> R) -> R {
        let mut deferred = Deferred::new();
        let result = change(&mut self.state.lock(), &mut deferred);
        drop(deferred);
        result
    }

    /// `bytes` rounded up to whole blocks, or `TooLarge` (recorded as a failure) beyond the capacity.
    fn reservation(&self, st: &mut PoolState, bytes: u64) -> Result<u64> {
        match bytes.checked_next_multiple_of(self.block_size) {
            Some(reserved) if reserved <= self.capacity => Ok(reserved),
            _ => {
                self.failed(st, bytes, FailureReason::TooLarge);
                Err(MemoryError::TooLarge { pool: self.name.to_string(), requested: bytes, capacity: self.capacity })
            }
        }
    }

    /// Whether `reserved` more bytes may be taken now without overtaking a waiter.
    fn fits_now(&self, st: &PoolState, reserved: u64) -> bool {
        st.waiters.is_empty() && reserved <= self.capacity - st.used
    }

    /// The error for a request that does not fit now; `waiters` are the requests queued ahead of it.
    fn exhausted(&self, st: &mut PoolState, requested: u64, waiters: usize) -> MemoryError {
        self.failed(st, requested, FailureReason::Exhausted);
        MemoryError::Exhausted { pool: self.name.to_string(), requested, available: self.capacity - st.used, waiters }
    }

    fn failed(&self, st: &mut PoolState, requested: u64, reason: FailureReason) {
        st.failures += 1;
        self.metrics.failure(reason).increment(1);
        self.events.emit(|| Event::AllocationFailed {
            pool: self.name.clone(),
            requested,
            available: self.capacity - st.used,
            reason,
        });
    }

    /// Books a new lease of `len` bytes (`reserved` in whole blocks, known to fit).
    fn reserve(self: &Arc<Self>, st: &mut PoolState, len: u64, reserved: u64, scope: ScopeId, now: Instant) -> Lease {
        let id = st.next_lease;
        st.next_lease += 1;
        let slot = st.leases.insert(Record { id, len, reserved, scope, last_use: now });
        st.used += reserved;
        st.allocations += 1;
        self.metrics.allocations.increment(1);
        self.events.emit(|| Event::Allocated { pool: self.name.clone(), lease: LeaseId(id), bytes: reserved, scope });
        self.used_changed(st);
        Lease { pool: Arc::clone(self), slot, id: LeaseId(id), scope, len, reserved }
    }

    /// After any change of `used` or of the lease count: peak, gauges, and the water marks.
    fn used_changed(&self, st: &mut PoolState) {
        debug_assert_eq!(
            st.used,
            st.leases.iter().map(|(_, record)| record.reserved).sum::<u64>(),
            "`used` is the sum of the live leases' reservations"
        );
        if st.used > st.peak {
            st.peak = st.used;
            self.metrics.peak.set(to_f64(st.peak));
        }
        self.metrics.used.set(to_f64(st.used));
        self.metrics.leases.set(to_f64(st.leases.len() as u64));
        let high = if st.high { st.used > self.low_water } else { st.used >= self.high_water };
        if high != st.high {
            st.high = high;
            self.events.emit(|| Event::Pressure {
                pool: self.name.clone(),
                used: st.used,
                capacity: self.capacity,
                level: if high { PressureLevel::High } else { PressureLevel::Normal },
            });
        }
    }

    /// Hands freed space to the waiters at the head of the queue, in order, while the head fits.
    fn grant_waiters(self: &Arc<Self>, st: &mut PoolState, deferred: &mut Deferred) {
        if st.waiters.is_empty() {
            return;
        }
        let now = Instant::now();
        while let Some(head) = st.waiters.front() {
            if head.reserved > self.capacity - st.used {
                break;
            }
            let waiter = st.waiters.pop_front().expect("the head was just seen");
            let lease = self.reserve(st, waiter.requested, waiter.reserved, waiter.scope, now);
            self.waited(st, now - waiter.since);
            // A successful `send` hands the lease to the receiver, which drops it if its waiter is gone
            // (tokio >= 1.38). A failed one gives it back: it returns once the lock is released.
            if let Err(Ok(lease)) = waiter.grant.send(Ok(lease)) {
                deferred.push(lease);
            }
        }
        self.metrics.waiters.set(to_f64(st.waiters.len() as u64));
    }

    fn waited(&self, st: &mut PoolState, waited: Duration) {
        st.total_wait += waited;
        self.metrics.wait.record(waited.as_secs_f64());
    }

    /// The record of `lease`, unless it was revoked.
    fn record_mut<'a>(st: &'a mut PoolState, lease: &Lease) -> Option<&'a mut Record> {
        st.leases.get_mut(lease.slot).filter(|record| record.id == lease.id.0)
    }

    pub(crate) fn allocate(self: &Arc<Self>, bytes: u64, scope: ScopeId) -> Result<Lease> {
        self.with_state(|st, _| {
            let reserved = self.reservation(st, bytes)?;
            if !self.fits_now(st, reserved) {
                let waiters = st.waiters.len();
                return Err(self.exhausted(st, bytes, waiters));
            }
            Ok(self.reserve(st, bytes, reserved, scope, Instant::now()))
        })
    }

    /// The `Drop` of a lease: returns its blocks unless it was revoked, and serves waiters.
    pub(crate) fn release(self: &Arc<Self>, lease: &Lease) {
        self.with_state(|st, deferred| {
            if Self::record_mut(st, lease).is_none() {
                return; // revoked: its blocks were returned then
            }
            let record = st.leases.remove(lease.slot);
            st.used -= record.reserved;
            st.frees += 1;
            self.metrics.frees.increment(1);
            self.events.emit(|| Event::Freed { pool: self.name.clone(), lease: lease.id, bytes: record.reserved });
            self.used_changed(st);
            self.grant_waiters(st, deferred);
        });
    }

    pub(crate) fn touch(&self, lease: &Lease) -> Result<()> {
        let mut st = self.state.lock();
        let record = Self::record_mut(&mut st, lease).ok_or_else(|| lease.revoked_error())?;
        record.last_use = Instant::now();
        Ok(())
    }

    /// Marks `leases` of this pool in use now, in order, under one lock; returns how many were touched
    /// before the first revoked one (all of them when none was).
    pub(crate) fn touch_all<'a>(&self, leases: impl IntoIterator<Item = &'a Lease>) -> usize {
        let mut st = self.state.lock();
        let now = Instant::now();
        let mut touched = 0;
        for lease in leases {
            debug_assert!(std::ptr::eq(Arc::as_ptr(&lease.pool), self), "a lease of this pool");
            let Some(record) = Self::record_mut(&mut st, lease) else { break };
            record.last_use = now;
            touched += 1;
        }
        touched
    }

    pub(crate) fn is_revoked(&self, lease: &Lease) -> bool {
        Self::record_mut(&mut self.state.lock(), lease).is_none()
    }

    /// Grows or shrinks `lease`; returns its new length and reservation.
    pub(crate) fn resize(self: &Arc<Self>, lease: &Lease, by: ResizeBy) -> Result<(u64, u64)> {
        self.with_state(|st, deferred| {
            let record = Self::record_mut(st, lease).ok_or_else(|| lease.revoked_error())?;
            let (old_len, old_reserved) = (record.len, record.reserved);
            let len = match by {
                ResizeBy::Grow(additional) => old_len.saturating_add(additional),
                ResizeBy::Shrink(released) => old_len.saturating_sub(released),
            };
            let reserved = self.reservation(st, len)?;
            if reserved > old_reserved {
                // A grow does not queue behind waiters: see `Lease::try_grow`.
                let extra = reserved - old_reserved;
                if extra > self.capacity - st.used {
                    return Err(self.exhausted(st, len - old_len, 0));
                }
                st.used += extra;
            } else {
                st.used -= old_reserved - reserved;
            }
            let record = Self::record_mut(st, lease).expect("checked above, under the same lock");
            record.len = len;
            record.reserved = reserved;
            record.last_use = Instant::now();
            if reserved != old_reserved {
                self.events.emit(|| Event::Resized {
                    pool: self.name.clone(),
                    lease: lease.id,
                    from: old_reserved,
                    to: reserved,
                });
                self.used_changed(st);
                self.grant_waiters(st, deferred);
            }
            Ok((len, reserved))
        })
    }

    /// Revokes every lease `doomed` picks; returns how many leases and bytes came back.
    pub(crate) fn revoke(
        self: &Arc<Self>,
        reason: ReclaimReason,
        doomed: impl Fn(&ScopeId, Duration) -> bool,
    ) -> (usize, u64) {
        self.with_state(|st, deferred| {
            let now = Instant::now();
            let slots: Vec<usize> = st
                .leases
                .iter()
                .filter(|(_, record)| doomed(&record.scope, now - record.last_use))
                .map(|(slot, _)| slot)
                .collect();
            let mut bytes = 0;
            for &slot in &slots {
                let record = st.leases.remove(slot);
                st.used -= record.reserved;
                st.reclaimed += 1;
                bytes += record.reserved;
                self.metrics.reclaimed(reason).increment(1);
                self.events.emit(|| Event::Reclaimed {
                    pool: self.name.clone(),
                    lease: LeaseId(record.id),
                    bytes: record.reserved,
                    scope: record.scope,
                    idle: now - record.last_use,
                    reason,
                });
            }
            let mut released_waiters = false;
            if reason == ReclaimReason::Scope {
                // Requests of a released scope stop waiting: their work has ended.
                while let Some(index) = st.waiters.iter().position(|waiter| doomed(&waiter.scope, Duration::ZERO)) {
                    let waiter = st.waiters.remove(index).expect("the index was just found");
                    self.waited(st, now - waiter.since);
                    let error = MemoryError::ScopeReleased { pool: self.name.to_string(), scope: waiter.scope };
                    // Nothing to give back if the waiter is gone already: it holds no lease.
                    let _ = waiter.grant.send(Err(error));
                    released_waiters = true;
                }
            }
            if !slots.is_empty() {
                self.used_changed(st);
            }
            if !slots.is_empty() || released_waiters {
                self.grant_waiters(st, deferred);
            }
            (slots.len(), bytes)
        })
    }

    /// Revokes the leases idle longer than the pool's idle timeout.
    pub(crate) fn collect_idle(self: &Arc<Self>) -> (usize, u64) {
        let Some(limit) = self.idle_timeout else { return (0, 0) };
        let (leases, bytes) = self.revoke(ReclaimReason::Idle, |_, idle| idle > limit);
        if leases > 0 {
            let (pool, idle_limit_seconds) = (&*self.name, limit.as_secs_f64());
            tracing::info!(pool, leases, bytes, idle_limit_seconds, "idle leases revoked");
        }
        (leases, bytes)
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let st = self.state.lock();
        PoolStats {
            name: self.name.to_string(),
            capacity: self.capacity,
            block_size: self.block_size,
            used: st.used,
            available: self.capacity - st.used,
            peak: st.peak,
            active_leases: st.leases.len(),
            allocations: st.allocations,
            frees: st.frees,
            failures: st.failures,
            reclaimed: st.reclaimed,
            waiters: st.waiters.len(),
            total_wait: st.total_wait,
        }
    }
}

impl Pool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The pool's capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.shared.capacity
    }

    /// The pool's block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.shared.block_size
    }

    /// Reserves `bytes` (rounded up to whole blocks) for `scope`, in one step, or fails at once.
    ///
    /// Fails with [`MemoryError::TooLarge`] when the request exceeds the whole capacity and
    /// [`MemoryError::Exhausted`] when the space is not free now, or when earlier requests are
    /// waiting for space (a new request never overtakes them).
    pub fn allocate(&self, bytes: u64, scope: ScopeId) -> Result<Lease> {
        self.shared.allocate(bytes, scope)
    }

    /// Whether [`allocate`](Self::allocate) would succeed right now. Advisory only: another
    /// allocation may take the space before yours, so never check then allocate; allocate and handle
    /// the error.
    pub fn can_allocate(&self, bytes: u64) -> bool {
        let st = self.shared.state.lock();
        bytes
            .checked_next_multiple_of(self.shared.block_size)
            .is_some_and(|reserved| reserved <= self.shared.capacity && self.shared.fits_now(&st, reserved))
    }

    /// Reserves `bytes` for `scope`, waiting up to `timeout` for the space to come free.
    ///
    /// Waiters are served strictly first come, first served, so a large request is not starved by
    /// small ones. The wait is woken when space returns; nothing polls. Dropping the returned future
    /// leaves nothing reserved. Fails at once with [`MemoryError::TooLarge`] for a request that could
    /// never fit, with [`MemoryError::TimedOut`] after `timeout`, with [`MemoryError::ScopeReleased`]
    /// when [`MemoryManager::release_scope`](crate::MemoryManager::release_scope) ends its scope, and
    /// with [`MemoryError::NoRuntime`] outside a tokio runtime (which must have time enabled).
    pub async fn allocate_wait(&self, bytes: u64, scope: ScopeId, timeout: Duration) -> Result<Lease> {
        let shared = &self.shared;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(MemoryError::NoRuntime { purpose: "wait for space on" });
        }
        let since = Instant::now();
        let queued = shared.with_state(|st, _| {
            let reserved = shared.reservation(st, bytes)?;
            if shared.fits_now(st, reserved) {
                return Ok(Queued::Served(shared.reserve(st, bytes, reserved, scope, since)));
            }
            let (grant, granted) = oneshot::channel();
            let id = st.next_waiter;
            st.next_waiter += 1;
            let ahead = st.waiters.len();
            st.waiters.push_back(Waiter { id, requested: bytes, reserved, scope, since, grant });
            shared.metrics.waiters.set(to_f64(st.waiters.len() as u64));
            shared.events.emit(|| Event::WaitStarted {
                pool: shared.name.clone(),
                requested: bytes,
                available: shared.capacity - st.used,
                ahead,
            });
            Ok(Queued::Waiting(Wait { pool: Arc::clone(shared), id, since, granted: None }, granted))
        })?;
        let (mut wait, granted) = match queued {
            Queued::Served(lease) => return Ok(lease),
            Queued::Waiting(wait, granted) => (wait, granted),
        };
        let granted = wait.granted.insert(granted);
        let outcome = tokio::time::timeout(timeout, granted).await;
        match outcome {
            Ok(Ok(served)) => {
                wait.granted = None; // served: the grant (or the scope release) took it off the queue
                served
            }
            // `Ok(Err(_))` cannot happen: a waiter's sender is only dropped after sending.
            Ok(Err(_)) | Err(_) => wait.give_up(bytes),
        }
    }

    /// A snapshot of the pool's books.
    pub fn stats(&self) -> PoolStats {
        self.shared.stats()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.shared.name)
            .field("capacity", &self.shared.capacity)
            .field("block_size", &self.shared.block_size)
            .finish_non_exhaustive()
    }
}

/// The first step of `allocate_wait`: served at once, or queued.
enum Queued {
    Served(Lease),
    Waiting(Wait, oneshot::Receiver<Result<Lease>>),
}

/// A queued request; leaving the queue when dropped is what makes a cancelled wait leave nothing.
struct Wait {
    pool: Arc<PoolShared>,
    id: u64,
    since: Instant,
    /// `None` once served.
    granted: Option<oneshot::Receiver<Result<Lease>>>,
}

impl Wait {
    /// Leaves the queue after the timeout, unless a grant won the race, in which case it is kept.
    fn give_up(mut self, requested: u64) -> Result<Lease> {
        let pool = Arc::clone(&self.pool);
        let timed_out = pool.with_state(|st, deferred| {
            if !self.leave(st, deferred) {
                return None;
            }
            let waited = Instant::now() - self.since;
            pool.failed(st, requested, FailureReason::TimedOut);
            pool.events.emit(|| Event::WaitTimedOut { pool: pool.name.clone(), requested, waited });
            Some(MemoryError::TimedOut {
                pool: pool.name.to_string(),
                requested,
                available: pool.capacity - st.used,
                waited,
            })
        });
        let granted = self.granted.take();
        match timed_out {
            Some(error) => Err(error),
            None => granted
                .and_then(|mut granted| granted.try_recv().ok())
                .expect("a request taken off the queue by another was sent its answer under the lock"),
        }
    }

    /// Removes this request from the queue; returns whether it was still there (not yet granted).
    fn leave(&self, st: &mut PoolState, deferred: &mut Deferred) -> bool {
        let Some(index) = st.waiters.iter().position(|waiter| waiter.id == self.id) else {
            return false;
        };
        st.waiters.remove(index);
        self.pool.waited(st, Instant::now() - self.since);
        // Without this request at the head, the next ones may fit now; grants also refresh the gauge.
        self.pool.grant_waiters(st, deferred);
        self.pool.metrics.waiters.set(to_f64(st.waiters.len() as u64));
        true
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Some(granted) = self.granted.take() {
            // Cancelled while queued. A lease granted in the meantime sits in `granted`: it is
            // dropped below, after the lock, and its own `Drop` returns it.
            let pool = Arc::clone(&self.pool);
            pool.with_state(|st, deferred| self.leave(st, deferred));
            drop(granted);
        }
    }
}
