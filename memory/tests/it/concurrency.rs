//! Many tasks on a multi-thread runtime: allocating, waiting, growing, cancelling, revoking. Nothing
//! leaks, no waiter is lost, and the books balance at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use usine_memory::{MemoryError, MemoryManager, PoolConfig, ScopeId};

/// A small deterministic generator (SplitMix64), one per task, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

const TASKS: u64 = 48;
const ROUNDS: u64 = 300;
/// Long enough that only a lost wake-up could time out.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_a_pool_without_leaks_or_lost_waiters() {
    let memory = MemoryManager::default();
    let pool = memory.create_pool("kv", PoolConfig::new(64 * 1024, 1024).idle_timeout(None)).unwrap();
    let cancelled = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let pool = pool.clone();
        let cancelled = Arc::clone(&cancelled);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(task);
            let scope = ScopeId::new(task);
            for _ in 0..ROUNDS {
                let bytes = 1 + rng.below(16 * 1024);
                match rng.below(4) {
                    // Wait for space, use it a little, grow it, give it back.
                    0 | 1 => {
                        let mut lease = pool.allocate_wait(bytes, scope, PATIENCE).await.unwrap();
                        tokio::task::yield_now().await;
                        let _ = lease.try_grow(rng.below(4096));
                        lease.shrink(rng.below(4096)).unwrap();
                    }
                    // Try without waiting; exhaustion is fine, anything else is not.
                    2 => match pool.allocate(bytes, scope) {
                        Ok(_lease) => tokio::task::yield_now().await,
                        Err(MemoryError::Exhausted { .. }) => {}
                        Err(other) => panic!("{other}"),
                    },
                    // Give up on a wait at once: the queue must forget it.
                    _ => {
                        if tokio::time::timeout(Duration::ZERO, pool.allocate_wait(bytes, scope, PATIENCE))
                            .await
                            .is_err()
                        {
                            cancelled.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = pool.stats();
    assert_eq!((stats.used, stats.active_leases, stats.waiters), (0, 0, 0), "{stats:?}");
    assert_eq!(stats.allocations, stats.frees);
    assert!(stats.peak > 32 * 1024, "the pool was under pressure: {stats:?}");
    assert!(cancelled.load(Ordering::Relaxed) > 0, "some waits were cancelled while queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_racing_with_drops_returns_each_lease_exactly_once() {
    let memory = MemoryManager::default();
    let pool = memory.create_pool("kv", PoolConfig::new(256 * 1024, 1024).idle_timeout(None)).unwrap();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(1000 + task);
            for round in 0..ROUNDS {
                let scope = ScopeId::new(round % 8);
                if let Ok(mut lease) = pool.allocate(1 + rng.below(4096), scope) {
                    tokio::task::yield_now().await;
                    let _ = lease.try_grow(rng.below(2048));
                }
            }
        }));
    }
    let releaser = {
        let memory = memory.clone();
        tokio::spawn(async move {
            let mut reclaimed = 0;
            for round in 0..2000u64 {
                reclaimed += memory.release_scope(ScopeId::new(round % 8)).leases;
                tokio::task::yield_now().await;
            }
            reclaimed
        })
    };
    for task in tasks {
        task.await.unwrap();
    }
    let reclaimed = releaser.await.unwrap();
    let stats = pool.stats();
    assert_eq!((stats.used, stats.active_leases), (0, 0), "{stats:?}");
    assert_eq!(stats.allocations, stats.frees + stats.reclaimed);
    assert_eq!(stats.reclaimed, reclaimed as u64);
}
