//! The GC: leases idle longer than their pool's timeout are revoked, on demand or by the sweeper, exactly once.

use std::time::Duration;

use tokio::time::{Instant, advance, sleep};
use tokio_stream::StreamExt;
use usine_memory::{
    DEFAULT_IDLE_TIMEOUT, Event, ManagerConfig, MemoryError, MemoryManager, PoolConfig, ReclaimReason, ScopeId,
};

const SCOPE: ScopeId = ScopeId::new(1);

fn manager() -> (MemoryManager, usine_memory::Pool) {
    let memory = MemoryManager::new(ManagerConfig { gc_interval: Duration::from_secs(10), ..Default::default() });
    let pool = memory.create_pool("kv", PoolConfig::new(8192, 1024)).unwrap();
    (memory, pool)
}

#[tokio::test(start_paused = true)]
async fn gc_now_revokes_only_leases_idle_longer_than_the_timeout() {
    assert_eq!(DEFAULT_IDLE_TIMEOUT, Duration::from_secs(30));
    let (memory, pool) = manager();
    let idle = pool.allocate(1024, SCOPE).unwrap();
    let busy = pool.allocate(2048, SCOPE).unwrap();

    advance(Duration::from_secs(30)).await;
    assert_eq!(memory.gc_now().leases, 0, "idle exactly 30 s is not longer than 30 s");
    busy.touch().unwrap();
    advance(Duration::from_millis(1)).await;
    let reclaimed = memory.gc_now();
    assert_eq!((reclaimed.leases, reclaimed.bytes), (1, 1024));
    assert!(idle.is_revoked() && !busy.is_revoked());
    assert_eq!(idle.touch(), Err(MemoryError::Revoked { pool: "kv".into(), lease: idle.id() }));

    advance(Duration::from_millis(29_999)).await;
    assert_eq!(memory.gc_now().leases, 0, "touched exactly 30 s ago");
    advance(Duration::from_millis(1)).await;
    assert_eq!(memory.gc_now().bytes, 2048);

    drop(idle);
    drop(busy);
    let stats = pool.stats();
    assert_eq!((stats.used, stats.reclaimed, stats.frees), (0, 2, 0), "each lease returned exactly once");
}

#[tokio::test(start_paused = true)]
async fn growing_a_lease_counts_as_using_it() {
    let (memory, pool) = manager();
    let mut kv = pool.allocate(0, SCOPE).unwrap();
    for _ in 0..5 {
        advance(Duration::from_secs(20)).await;
        kv.try_grow(10).unwrap();
        assert_eq!(memory.gc_now().leases, 0);
    }
    advance(Duration::from_secs(31)).await;
    assert_eq!(memory.gc_now().leases, 1);
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_reclaims_on_its_interval_with_the_exact_idle_time() {
    let (memory, pool) = manager();
    let mut events = memory.subscribe();
    let start = Instant::now();
    let lease = pool.allocate(1024, SCOPE).unwrap();
    let _sweeper = memory.start_gc().unwrap();

    // Sweeps at 10, 20, 30 s find it idle at most 30 s; the one at 40 s takes it.
    let allocated = events.next().await.unwrap().unwrap();
    assert!(matches!(allocated, Event::Allocated { .. }));
    let reclaimed = events.next().await.unwrap().unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(40));
    assert_eq!(
        reclaimed,
        Event::Reclaimed {
            pool: "kv".into(),
            lease: lease.id(),
            bytes: 1024,
            scope: SCOPE,
            idle: Duration::from_secs(40),
            reason: ReclaimReason::Idle,
        }
    );
    assert!(lease.is_revoked());
    assert_eq!(pool.stats().used, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_sweeper_or_the_manager_stops_it() {
    let (memory, pool) = manager();
    let lease = pool.allocate(1024, SCOPE).unwrap();
    let sweeper = memory.start_gc().unwrap();
    drop(sweeper);
    sleep(Duration::from_secs(100)).await;
    assert!(!lease.is_revoked());

    let (memory, _pool) = manager();
    let sweeper = memory.start_gc().unwrap();
    drop(memory); // the sweeper holds only a weak reference, and ends at its next tick
    sleep(Duration::from_secs(9)).await;
    assert!(!sweeper.is_finished());
    sleep(Duration::from_secs(2)).await;
    assert!(sweeper.is_finished());
}

#[tokio::test(start_paused = true)]
async fn an_absurd_interval_is_bounded_not_a_crash() {
    let memory = MemoryManager::new(ManagerConfig { gc_interval: Duration::MAX, ..Default::default() });
    let pool = memory.create_pool("kv", PoolConfig::new(1024, 1024)).unwrap();
    let lease = pool.allocate(1024, SCOPE).unwrap();
    let sweeper = memory.start_gc().unwrap();
    sleep(usine_memory::MAX_GC_INTERVAL + Duration::from_secs(1)).await;
    assert!(lease.is_revoked(), "swept once a day at most");
    assert!(!sweeper.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_pool_without_idle_timeout_is_never_collected() {
    let memory = MemoryManager::default();
    let weights = memory.create_pool("weights", PoolConfig::new(4096, 1024).idle_timeout(None)).unwrap();
    let lease = weights.allocate(4096, SCOPE).unwrap();
    advance(Duration::from_secs(3600)).await;
    assert_eq!(memory.gc_now().leases, 0);
    assert!(!lease.is_revoked());
}

#[test]
fn the_sweeper_needs_a_runtime() {
    let (memory, _pool) = manager();
    let err = memory.start_gc().unwrap_err();
    assert_eq!(err, MemoryError::NoRuntime { purpose: "run the gc sweeper on" });
    assert_eq!(err.to_string(), "no tokio runtime to run the gc sweeper on");
}
