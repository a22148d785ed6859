//! Waiting for space: woken when it returns, first come first served, exact timeouts, clean cancellation.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use tokio::time::Instant;
use usine_memory::{MemoryError, ScopeId};

use crate::{assert_books_balance, one_pool};

const SCOPE: ScopeId = ScopeId::new(1);
const TIMEOUT: Duration = Duration::from_millis(500);

/// Polls `future` once; it must still be pending (queued).
async fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) {
    assert!(tokio::time::timeout(Duration::ZERO, future).await.is_err(), "expected the request to wait");
}

#[tokio::test(start_paused = true)]
async fn a_wait_times_out_after_exactly_its_timeout_with_the_figures() {
    let (_memory, pool) = one_pool(2);
    let _held = pool.allocate(1024, SCOPE).unwrap();
    let start = Instant::now();
    let err = pool.allocate_wait(2048, SCOPE, TIMEOUT).await.unwrap_err();
    assert_eq!(start.elapsed(), TIMEOUT);
    assert_eq!(err, MemoryError::TimedOut { pool: "test".into(), requested: 2048, available: 1024, waited: TIMEOUT });
    assert_eq!(err.to_string(), "timed out after 500ms waiting for 2048 bytes in pool `test` (1024 available)");
    let stats = pool.stats();
    assert_eq!((stats.failures, stats.waiters, stats.total_wait, stats.used), (1, 0, TIMEOUT, 1024));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_woken_the_moment_space_returns() {
    let (_memory, pool) = one_pool(2);
    let held = pool.allocate(2048, SCOPE).unwrap();
    let waiter = pool.clone();
    let start = Instant::now();
    let task = tokio::spawn(async move { waiter.allocate_wait(1024, ScopeId::new(2), TIMEOUT).await });
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(pool.stats().waiters, 1);
    drop(held);
    let lease = task.await.unwrap().unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(120), "woken at the free, not at a polling tick");
    assert_eq!((lease.reserved(), lease.scope()), (1024, ScopeId::new(2)));
    let stats = pool.stats();
    assert_eq!((stats.total_wait, stats.waiters, stats.allocations), (Duration::from_millis(120), 0, 2));
}

#[tokio::test(start_paused = true)]
async fn a_request_that_fits_at_once_does_not_wait() {
    let (_memory, pool) = one_pool(2);
    let start = Instant::now();
    let lease = pool.allocate_wait(2048, SCOPE, TIMEOUT).await.unwrap();
    assert_eq!((start.elapsed(), lease.reserved(), pool.stats().total_wait), (Duration::ZERO, 2048, Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn a_request_that_can_never_fit_fails_at_once() {
    let (_memory, pool) = one_pool(2);
    let start = Instant::now();
    let err = pool.allocate_wait(4096, SCOPE, TIMEOUT).await.unwrap_err();
    assert!(matches!(err, MemoryError::TooLarge { requested: 4096, capacity: 2048, .. }));
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served_so_a_large_one_is_not_starved() {
    let (_memory, pool) = one_pool(4);
    let first = pool.allocate(2048, SCOPE).unwrap();
    let second = pool.allocate(2048, SCOPE).unwrap();

    let mut large = pin!(pool.allocate_wait(4096, ScopeId::new(2), TIMEOUT));
    poll_once(large.as_mut()).await;
    let mut small = pin!(pool.allocate_wait(1024, ScopeId::new(3), TIMEOUT));
    poll_once(small.as_mut()).await;
    assert_eq!(pool.stats().waiters, 2);

    drop(first); // 2048 free: enough for the small request, but the large one came first
    poll_once(small.as_mut()).await;
    assert!(!pool.can_allocate(1024), "a newcomer does not overtake the queue either");
    let err = pool.allocate(1024, SCOPE).unwrap_err();
    assert_eq!(err, MemoryError::Exhausted { pool: "test".into(), requested: 1024, available: 2048, waiters: 2 });
    assert_eq!(err.to_string(), "pool `test` exhausted: requested 1024 bytes, 2048 available, 2 waiters queued first");

    drop(second);
    let large = large.await.unwrap();
    assert_eq!(large.reserved(), 4096);
    drop(large);
    let small = small.await.unwrap();
    assert_eq!(small.reserved(), 1024);
    assert_books_balance(&pool.stats());
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_wait_leaves_the_queue_and_lets_the_next_one_through() {
    let (_memory, pool) = one_pool(4);
    let _held = pool.allocate(3072, SCOPE).unwrap();
    let mut large = Box::pin(pool.allocate_wait(4096, ScopeId::new(2), TIMEOUT));
    poll_once(large.as_mut()).await;
    let waiter = pool.clone();
    let small = tokio::spawn(async move { waiter.allocate_wait(1024, ScopeId::new(3), TIMEOUT).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(pool.stats().waiters, 2);

    drop(large); // the head gives up: the small request behind it fits at once
    let small = small.await.unwrap().unwrap();
    assert_eq!(small.reserved(), 1024);
    let stats = pool.stats();
    assert_eq!((stats.waiters, stats.used, stats.failures), (0, 4096, 0));
}

#[tokio::test(start_paused = true)]
async fn a_wait_dropped_after_its_grant_returns_the_granted_lease() {
    let (_memory, pool) = one_pool(2);
    let held = pool.allocate(2048, SCOPE).unwrap();
    let mut waiting = Box::pin(pool.allocate_wait(2048, ScopeId::new(2), TIMEOUT));
    poll_once(waiting.as_mut()).await;
    drop(held); // granted to the waiter, which is never polled again
    assert_eq!(pool.stats().used, 2048, "the grant is booked to the waiter");
    drop(waiting);
    let stats = pool.stats();
    assert_eq!((stats.used, stats.active_leases, stats.allocations, stats.frees), (0, 0, 2, 2));
    assert_books_balance(&stats);
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_waiter_does_not_block_the_ones_behind_it() {
    let (_memory, pool) = one_pool(4);
    let held = pool.allocate(3072, SCOPE).unwrap();
    let big = pool.clone();
    let big = tokio::spawn(async move { big.allocate_wait(4096, ScopeId::new(2), Duration::from_millis(100)).await });
    tokio::time::sleep(Duration::from_millis(1)).await;
    let small = pool.clone();
    let small = tokio::spawn(async move { small.allocate_wait(2048, ScopeId::new(3), TIMEOUT).await });
    tokio::time::sleep(Duration::from_millis(1)).await;
    drop(held); // 4096 free: the big one at the head is served first
    let big = big.await.unwrap().unwrap();
    assert_eq!(big.reserved(), 4096);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(big);
    assert_eq!(small.await.unwrap().unwrap().reserved(), 2048);
    assert_eq!(start.elapsed(), Duration::from_millis(50));

    // Now the head times out, and the request queued behind it is served at that moment.
    let (_memory, pool) = one_pool(4);
    let _held = pool.allocate(3072, SCOPE).unwrap();
    let start = Instant::now();
    let big = pool.clone();
    let big = tokio::spawn(async move { big.allocate_wait(4096, ScopeId::new(2), Duration::from_millis(100)).await });
    tokio::time::sleep(Duration::from_millis(1)).await;
    let small = pool.allocate_wait(1024, ScopeId::new(3), TIMEOUT).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert!(
        matches!(big.await.unwrap(), Err(MemoryError::TimedOut { waited, .. }) if waited == Duration::from_millis(100))
    );
    assert_eq!(small.reserved(), 1024);
}

#[tokio::test(start_paused = true)]
async fn shrinking_and_scope_release_also_wake_waiters() {
    let (memory, pool) = one_pool(2);
    let mut kv = pool.allocate(2048, SCOPE).unwrap();
    let waiter = pool.clone();
    let task = tokio::spawn(async move { waiter.allocate_wait(1024, ScopeId::new(2), TIMEOUT).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    kv.shrink(1024).unwrap();
    let granted = task.await.unwrap().unwrap();
    assert_eq!(granted.reserved(), 1024);

    let waiter = pool.clone();
    let task = tokio::spawn(async move { waiter.allocate_wait(2048, ScopeId::new(3), TIMEOUT).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    drop(granted);
    memory.release_scope(SCOPE);
    assert_eq!(task.await.unwrap().unwrap().reserved(), 2048);
}

#[tokio::test(start_paused = true)]
async fn a_grow_does_not_queue_behind_waiters() {
    let (_memory, pool) = one_pool(4);
    let mut running = pool.allocate(1024, SCOPE).unwrap();
    let mut waiting = Box::pin(pool.allocate_wait(4096, ScopeId::new(2), TIMEOUT));
    poll_once(waiting.as_mut()).await;
    running.try_grow(2048).unwrap(); // a running sequence goes on
    let err = pool.allocate(1024, SCOPE).unwrap_err(); // a new request does not overtake
    assert!(matches!(err, MemoryError::Exhausted { waiters: 1, .. }), "{err}");
    drop(running);
    assert_eq!(waiting.await.unwrap().reserved(), 4096);
}

#[tokio::test(start_paused = true)]
async fn releasing_a_scope_ends_its_waits_and_serves_the_next() {
    let (memory, pool) = one_pool(2);
    let _held = pool.allocate(1024, ScopeId::new(1)).unwrap();
    let (doomed, other) = (ScopeId::new(2), ScopeId::new(3));
    let waiter = pool.clone();
    let ended = tokio::spawn(async move { waiter.allocate_wait(2048, doomed, TIMEOUT).await });
    tokio::time::sleep(Duration::from_millis(1)).await;
    let waiter = pool.clone();
    let next = tokio::spawn(async move { waiter.allocate_wait(1024, other, TIMEOUT).await });
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(pool.stats().waiters, 2);

    let start = Instant::now();
    assert_eq!(memory.release_scope(doomed).leases, 0);
    let err = ended.await.unwrap().unwrap_err();
    assert_eq!(err, MemoryError::ScopeReleased { pool: "test".into(), scope: doomed });
    assert_eq!(err.to_string(), "the scope 2 was released while waiting for space in pool `test`");
    assert_eq!(next.await.unwrap().unwrap().scope(), other, "the request behind it fits now");
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(pool.stats().waiters, 0);
}

#[test]
fn waiting_outside_a_runtime_is_a_typed_error() {
    let (_memory, pool) = one_pool(1);
    let _held = pool.allocate(1024, SCOPE).unwrap();
    let waiting = pool.allocate_wait(1024, SCOPE, TIMEOUT);
    let err = futures_block_on(waiting).unwrap_err();
    assert_eq!(err, MemoryError::NoRuntime { purpose: "wait for space on" });
    assert_eq!(pool.stats().waiters, 0);
}

/// Polls a future to completion on this thread, outside any tokio runtime.
fn futures_block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
    }
}
