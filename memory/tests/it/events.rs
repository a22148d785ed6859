//! Events: what subscribers see, in order, and what a lagging subscriber is told.

use std::time::Duration;

use tokio_stream::{Stream, StreamExt};
use usine_memory::{
    Event, EventStream, FailureReason, Lagged, ManagerConfig, MemoryManager, PoolConfig, PoolName, PressureLevel,
    ReclaimReason, ScopeId,
};

/// Every event already sent, without waiting for more.
async fn drain(events: &mut EventStream) -> Vec<Result<Event, Lagged>> {
    let mut seen = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, events.next()).await {
        seen.push(event);
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn subscribers_see_every_change_in_order() {
    let memory = MemoryManager::default();
    let mut events = memory.subscribe();
    let pool = memory.create_pool("kv", PoolConfig::new(10 * 1024, 1024).water_marks(80, 70)).unwrap();
    let (scope, other) = (ScopeId::new(5), ScopeId::new(6));
    let mut a = pool.allocate(7 * 1024, scope).unwrap();
    let a_id = a.id();
    a.try_grow(1024).unwrap(); // 8 of 10 blocks: the high mark
    pool.allocate(4096, scope).unwrap_err();
    pool.allocate_wait(4096, scope, Duration::from_millis(500)).await.unwrap_err();
    pool.allocate(4096 * 4, scope).unwrap_err();
    a.shrink(1024).unwrap(); // 7 of 10: the low mark
    let b = pool.allocate(1024, other).unwrap();
    memory.release_scope(scope);
    let b_id = b.id();
    drop(b);
    drop(a); // revoked already: no event

    let kv = || -> PoolName { "kv".into() };
    let expected = [
        Event::PoolCreated { pool: kv(), capacity: 10240, block_size: 1024 },
        Event::Allocated { pool: kv(), lease: a_id, bytes: 7168, scope },
        Event::Resized { pool: kv(), lease: a_id, from: 7168, to: 8192 },
        Event::Pressure { pool: kv(), used: 8192, capacity: 10240, level: PressureLevel::High },
        Event::AllocationFailed { pool: kv(), requested: 4096, available: 2048, reason: FailureReason::Exhausted },
        Event::WaitStarted { pool: kv(), requested: 4096, available: 2048, ahead: 0 },
        Event::AllocationFailed { pool: kv(), requested: 4096, available: 2048, reason: FailureReason::TimedOut },
        Event::WaitTimedOut { pool: kv(), requested: 4096, waited: Duration::from_millis(500) },
        Event::AllocationFailed { pool: kv(), requested: 16384, available: 2048, reason: FailureReason::TooLarge },
        Event::Resized { pool: kv(), lease: a_id, from: 8192, to: 7168 },
        Event::Pressure { pool: kv(), used: 7168, capacity: 10240, level: PressureLevel::Normal },
        Event::Allocated { pool: kv(), lease: b_id, bytes: 1024, scope: other },
        Event::Pressure { pool: kv(), used: 8192, capacity: 10240, level: PressureLevel::High },
        Event::Reclaimed {
            pool: kv(),
            lease: a_id,
            bytes: 7168,
            scope,
            idle: Duration::ZERO,
            reason: ReclaimReason::Scope,
        },
        Event::Pressure { pool: kv(), used: 1024, capacity: 10240, level: PressureLevel::Normal },
        Event::Freed { pool: kv(), lease: b_id, bytes: 1024 },
    ];
    let seen: Vec<Event> = drain(&mut events).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_lagging_subscriber_is_told_how_many_events_it_missed() {
    let memory = MemoryManager::new(ManagerConfig { event_capacity: 4, ..Default::default() });
    let pool = memory.create_pool("kv", PoolConfig::new(4096, 1024)).unwrap();
    let mut slow = memory.subscribe();
    for _ in 0..5 {
        drop(pool.allocate(1024, ScopeId::new(1)).unwrap()); // two events each
    }
    let seen = drain(&mut slow).await;
    assert_eq!(seen[0], Err(Lagged { missed: 6 }));
    assert_eq!(seen[0].as_ref().unwrap_err().to_string(), "event subscriber lagged behind and missed 6 events");
    assert_eq!(seen.len(), 5, "then the four newest events");
    assert!(matches!(seen[4], Ok(Event::Freed { .. })));
}

#[tokio::test]
async fn a_subscriber_sees_only_what_happens_after_it_subscribed_and_the_stream_ends_with_the_manager() {
    let memory = MemoryManager::default();
    let pool = memory.create_pool("kv", PoolConfig::new(4096, 1024)).unwrap();
    let before = pool.allocate(1024, ScopeId::new(1)).unwrap();
    let mut events = memory.subscribe();
    drop(before);
    assert!(matches!(events.next().await, Some(Ok(Event::Freed { bytes: 1024, .. }))));
    drop(pool);
    drop(memory);
    assert_eq!(events.next().await, None);
}

#[test]
fn pressure_does_not_flap_between_the_water_marks() {
    let memory = MemoryManager::default();
    let pool = memory.create_pool("kv", PoolConfig::new(100 * 1024, 1024)).unwrap(); // marks at 90 and 80 blocks
    let mut events = memory.subscribe();
    let base = pool.allocate(85 * 1024, ScopeId::new(1)).unwrap();
    let mut levels = Vec::new();
    for _ in 0..10 {
        let top = pool.allocate(5 * 1024, ScopeId::new(1)).unwrap(); // 90: high
        drop(top); // 85: still high, above the low mark
    }
    drop(base); // 0: normal
    while let Some(Ok(event)) = futures_now(&mut events) {
        if let Event::Pressure { used, level, .. } = event {
            levels.push((used / 1024, level));
        }
    }
    assert_eq!(levels, [(90, PressureLevel::High), (0, PressureLevel::Normal)]);
}

/// The next event if one is ready, without a runtime.
fn futures_now(events: &mut EventStream) -> Option<Result<Event, Lagged>> {
    let waker = std::task::Waker::noop();
    match std::pin::Pin::new(events).poll_next(&mut std::task::Context::from_waker(waker)) {
        std::task::Poll::Ready(next) => next,
        std::task::Poll::Pending => None,
    }
}

#[test]
fn even_a_tiny_pool_has_two_distinct_water_marks() {
    let memory = MemoryManager::default();
    let pool = memory.create_pool("tiny", PoolConfig::new(4, 1)).unwrap(); // high at 4 bytes, low at 3
    let mut events = memory.subscribe();
    let mut lease = pool.allocate(4, ScopeId::new(1)).unwrap();
    lease.shrink(1).unwrap(); // 3: back to normal
    lease.try_grow(0).unwrap(); // no change, no event
    let mut levels = Vec::new();
    while let Some(Ok(event)) = futures_now(&mut events) {
        if let Event::Pressure { used, level, .. } = event {
            levels.push((used, level));
        }
    }
    assert_eq!(levels, [(4, PressureLevel::High), (3, PressureLevel::Normal)]);
}

#[test]
fn an_absurd_event_capacity_is_cut_to_the_limit() {
    let memory = MemoryManager::new(ManagerConfig { event_capacity: usize::MAX, ..Default::default() });
    let mut events = memory.subscribe();
    memory.create_pool("kv", PoolConfig::new(1024, 1024)).unwrap();
    assert!(matches!(futures_now(&mut events), Some(Ok(Event::PoolCreated { .. }))));
    assert_eq!(usine_memory::MAX_EVENT_CAPACITY, 1 << 20);
}
