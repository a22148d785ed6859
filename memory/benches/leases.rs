//! Lease benchmarks against the peer a user would otherwise pick, `tokio::sync::Semaphore`, in one run.
//!
//! - `allocate_drop`: one lease out and back, on one thread and on two threads contending on one pool.
//!   The peer is `Semaphore::try_acquire_many` of the same number of blocks, then drop.
//! - `handoff`: a lease freed in one task and granted to a waiter in another, round after round; the
//!   peers are `Semaphore::acquire_many`, bare (the floor) and bounded by `tokio::time::timeout` (the same
//!   capability as `allocate_wait`). Each iteration is [`ROUNDS`] hand-offs.
//!
//! Run with `cargo bench -p usine-memory`; ratios are computed in the closing notes from one run.

use std::sync::Arc;

use divan::counter::ItemsCount;
use divan::{Bencher, black_box};
use tokio::sync::Semaphore;
use usine_memory::{MemoryManager, Pool, PoolConfig, ScopeId};

const BLOCK: u64 = 4096;
/// Enough blocks that the contended benchmarks never run dry: contention, not exhaustion, is measured.
const CAPACITY_BLOCKS: u64 = 1 << 20;
const SCOPE: ScopeId = ScopeId::new(1);
const ROUNDS: u64 = 1000;
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

fn main() {
    divan::main();
}

fn pool(capacity_blocks: u64) -> (MemoryManager, Pool) {
    let memory = MemoryManager::default();
    let pool = memory
        .create_pool("bench", PoolConfig::new(capacity_blocks * BLOCK, BLOCK).idle_timeout(None))
        .expect("a valid pool");
    (memory, pool)
}

#[divan::bench_group(threads = [1, 2])]
mod allocate_drop {
    use super::*;

    #[divan::bench(args = [1, 16])]
    fn usine_pool(bencher: Bencher<'_, '_>, blocks: u64) {
        let (_memory, pool) = pool(CAPACITY_BLOCKS);
        bencher.bench(|| drop(black_box(pool.allocate(black_box(blocks * BLOCK), SCOPE))));
    }

    /// The same through the manager, looking the pool up by name each time.
    #[divan::bench(args = [1, 16])]
    fn usine_manager_by_name(bencher: Bencher<'_, '_>, blocks: u64) {
        let (memory, _pool) = pool(CAPACITY_BLOCKS);
        bencher.bench(|| drop(black_box(memory.allocate("bench", black_box(blocks * BLOCK), SCOPE))));
    }

    #[divan::bench(args = [1, 16])]
    fn tokio_semaphore(bencher: Bencher<'_, '_>, blocks: u64) {
        let semaphore = Semaphore::new(usize::try_from(CAPACITY_BLOCKS).expect("fits"));
        let permits = u32::try_from(blocks).expect("fits");
        bencher.bench(|| drop(black_box(semaphore.try_acquire_many(black_box(permits)))));
    }
}

/// Two tasks pass one block back and forth: each holds it across a yield, so the other is queued
/// when it is freed, and every acquisition is a hand-off through a waker.
mod handoff {
    use super::*;

    fn runtime(workers: usize) -> tokio::runtime::Runtime {
        let mut builder = if workers == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        };
        builder.enable_time().build().expect("a runtime")
    }

    #[divan::bench(args = [1, 2], counter = ItemsCount::new(ROUNDS))]
    fn usine_allocate_wait(bencher: Bencher<'_, '_>, workers: usize) {
        let runtime = runtime(workers);
        let (_memory, pool) = pool(1);
        bencher.bench_local(|| {
            runtime.block_on(async {
                let task = |pool: Pool| async move {
                    for _ in 0..ROUNDS / 2 {
                        let lease = pool.allocate_wait(BLOCK, SCOPE, PATIENCE).await;
                        tokio::task::yield_now().await;
                        drop(lease.expect("a hand-off in time"));
                    }
                };
                // Both on the runtime's workers: the thread of `block_on` only waits, so that two
                // threads share the two cores of the machine the figures come from.
                let (one, other) = (tokio::spawn(task(pool.clone())), tokio::spawn(task(pool.clone())));
                one.await.expect("no panic");
                other.await.expect("no panic");
            });
        });
    }

    #[divan::bench(args = [1, 2], counter = ItemsCount::new(ROUNDS))]
    fn tokio_semaphore(bencher: Bencher<'_, '_>, workers: usize) {
        semaphore_handoff(bencher, workers, false);
    }

    /// The peer with the same capability as `allocate_wait`: a wait bounded by a timeout.
    #[divan::bench(args = [1, 2], counter = ItemsCount::new(ROUNDS))]
    fn tokio_semaphore_with_timeout(bencher: Bencher<'_, '_>, workers: usize) {
        semaphore_handoff(bencher, workers, true);
    }

    fn semaphore_handoff(bencher: Bencher<'_, '_>, workers: usize, with_timeout: bool) {
        let runtime = runtime(workers);
        let semaphore = Arc::new(Semaphore::new(1));
        bencher.bench_local(|| {
            runtime.block_on(async {
                let task = move |semaphore: Arc<Semaphore>| async move {
                    for _ in 0..ROUNDS / 2 {
                        let permit = if with_timeout {
                            tokio::time::timeout(PATIENCE, semaphore.acquire_many(1)).await.expect("a hand-off in time")
                        } else {
                            semaphore.acquire_many(1).await
                        };
                        tokio::task::yield_now().await;
                        drop(permit.expect("never closed"));
                    }
                };
                let one = tokio::spawn(task(Arc::clone(&semaphore)));
                let other = tokio::spawn(task(Arc::clone(&semaphore)));
                one.await.expect("no panic");
                other.await.expect("no panic");
            });
        });
    }
}
