//! Model-based test: random sequences of operations against a plain model of the books.
//!
//! The model is a few lines of arithmetic per operation; after every step each pool's stats and each
//! lease's figures must agree with it, and `used + available == capacity` must hold.

use std::time::Duration;

use proptest::prelude::*;
use usine_memory::{Lease, MemoryError, MemoryManager, PoolConfig, ScopeId};

const NAMES: [&str; 3] = ["a", "b", "c"];
/// Pools `a` and `b` are collected after 30 s idle; `c` never.
fn idle_timeout(pool: usize) -> Option<Duration> {
    (pool < 2).then_some(Duration::from_secs(30))
}

#[derive(Debug, Clone)]
enum Op {
    Create { pool: usize, blocks: u64, block: u64 },
    Allocate { pool: usize, bytes: u64, scope: u64 },
    Grow { lease: usize, bytes: u64 },
    Shrink { lease: usize, bytes: u64 },
    Drop { lease: usize },
    Touch { lease: usize },
    ReleaseScope { scope: u64 },
    Advance { secs: u64 },
    Gc,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..3usize, 0..6u64, prop::sample::select(vec![0u64, 512, 1000, 1024]))
            .prop_map(|(pool, blocks, block)| Op::Create { pool, blocks, block }),
        6 => (0..3usize, 0..5000u64, 0..3u64).prop_map(|(pool, bytes, scope)| Op::Allocate { pool, bytes, scope }),
        3 => (any::<prop::sample::Index>(), 0..3000u64).prop_map(|(i, bytes)| Op::Grow { lease: i.index(1 << 16), bytes }),
        2 => (any::<prop::sample::Index>(), 0..3000u64).prop_map(|(i, bytes)| Op::Shrink { lease: i.index(1 << 16), bytes }),
        3 => any::<prop::sample::Index>().prop_map(|i| Op::Drop { lease: i.index(1 << 16) }),
        2 => any::<prop::sample::Index>().prop_map(|i| Op::Touch { lease: i.index(1 << 16) }),
        1 => (0..3u64).prop_map(|scope| Op::ReleaseScope { scope }),
        2 => (0..25u64).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Gc),
    ]
}

#[derive(Debug, Default, Clone, PartialEq)]
struct ModelPool {
    capacity: u64,
    block: u64,
    used: u64,
    peak: u64,
    allocations: u64,
    frees: u64,
    failures: u64,
    reclaimed: u64,
}

struct ModelLease {
    pool: usize,
    len: u64,
    reserved: u64,
    scope: u64,
    last_use: Duration,
    revoked: bool,
    handle: Lease,
}

#[derive(Default)]
struct Model {
    pools: [Option<ModelPool>; 3],
    leases: Vec<ModelLease>,
    now: Duration,
}

impl Model {
    fn round_up(pool: &ModelPool, bytes: u64) -> Option<u64> {
        bytes.checked_next_multiple_of(pool.block).filter(|&reserved| reserved <= pool.capacity)
    }

    /// Revokes the leases `doomed` picks; returns (leases, bytes).
    fn revoke(&mut self, doomed: impl Fn(&ModelLease, Duration) -> bool) -> (usize, u64) {
        let (mut count, mut bytes) = (0, 0);
        for lease in self.leases.iter_mut().filter(|lease| !lease.revoked) {
            if doomed(lease, self.now) {
                lease.revoked = true;
                let pool = self.pools[lease.pool].as_mut().unwrap();
                pool.used -= lease.reserved;
                pool.reclaimed += 1;
                count += 1;
                bytes += lease.reserved;
            }
        }
        (count, bytes)
    }

    fn lease(&mut self, index: usize) -> Option<usize> {
        (!self.leases.is_empty()).then(|| index % self.leases.len())
    }
}

async fn step(memory: &MemoryManager, model: &mut Model, op: Op) {
    match op {
        Op::Create { pool, blocks, block } => {
            let config = PoolConfig::new(blocks * 1024, block).idle_timeout(idle_timeout(pool));
            let result = memory.create_pool(NAMES[pool], config);
            let expected_error = if blocks == 0 {
                Some("zero capacity")
            } else if block == 0 || (blocks * 1024) % block != 0 {
                Some("block size")
            } else if model.pools[pool].is_some() {
                Some("already exists")
            } else {
                None
            };
            match (result, expected_error) {
                (Ok(_), None) => {
                    model.pools[pool] = Some(ModelPool { capacity: blocks * 1024, block, ..Default::default() });
                }
                (Err(err), Some(expected)) => assert!(err.to_string().contains(expected), "{err} vs {expected}"),
                (result, expected) => {
                    panic!("create {op_pool}: got {result:?}, expected {expected:?}", op_pool = NAMES[pool])
                }
            }
        }
        Op::Allocate { pool, bytes, scope } => {
            let result = memory.allocate(NAMES[pool], bytes, ScopeId::new(scope));
            let Some(model_pool) = model.pools[pool].as_mut() else {
                assert!(matches!(result, Err(MemoryError::UnknownPool { .. })), "{result:?}");
                return;
            };
            match Model::round_up(model_pool, bytes) {
                None => {
                    model_pool.failures += 1;
                    assert!(matches!(result, Err(MemoryError::TooLarge { .. })), "{result:?}");
                }
                Some(reserved) if reserved > model_pool.capacity - model_pool.used => {
                    model_pool.failures += 1;
                    let available = model_pool.capacity - model_pool.used;
                    assert_eq!(
                        result.unwrap_err(),
                        MemoryError::Exhausted { pool: NAMES[pool].into(), requested: bytes, available, waiters: 0 }
                    );
                }
                Some(reserved) => {
                    model_pool.used += reserved;
                    model_pool.peak = model_pool.peak.max(model_pool.used);
                    model_pool.allocations += 1;
                    let handle = result.unwrap();
                    let now = model.now;
                    model.leases.push(ModelLease {
                        pool,
                        len: bytes,
                        reserved,
                        scope,
                        last_use: now,
                        revoked: false,
                        handle,
                    });
                }
            }
        }
        Op::Grow { lease, bytes } => {
            let Some(i) = model.lease(lease) else { return };
            let now = model.now;
            let lease = &mut model.leases[i];
            let result = lease.handle.try_grow(bytes);
            let pool = model.pools[lease.pool].as_mut().unwrap();
            if lease.revoked {
                assert!(matches!(result, Err(MemoryError::Revoked { .. })), "{result:?}");
                return;
            }
            match Model::round_up(pool, lease.len + bytes) {
                None => {
                    pool.failures += 1;
                    assert!(matches!(result, Err(MemoryError::TooLarge { .. })), "{result:?}");
                }
                Some(reserved) if reserved - lease.reserved > pool.capacity - pool.used => {
                    pool.failures += 1;
                    assert!(matches!(result, Err(MemoryError::Exhausted { .. })), "{result:?}");
                }
                Some(reserved) => {
                    result.unwrap();
                    pool.used += reserved - lease.reserved;
                    pool.peak = pool.peak.max(pool.used);
                    (lease.len, lease.reserved, lease.last_use) = (lease.len + bytes, reserved, now);
                }
            }
        }
        Op::Shrink { lease, bytes } => {
            let Some(i) = model.lease(lease) else { return };
            let now = model.now;
            let lease = &mut model.leases[i];
            let result = lease.handle.shrink(bytes);
            if lease.revoked {
                assert!(matches!(result, Err(MemoryError::Revoked { .. })), "{result:?}");
                return;
            }
            result.unwrap();
            let pool = model.pools[lease.pool].as_mut().unwrap();
            let len = lease.len.saturating_sub(bytes);
            let reserved = len.next_multiple_of(pool.block);
            pool.used -= lease.reserved - reserved;
            (lease.len, lease.reserved, lease.last_use) = (len, reserved, now);
        }
        Op::Drop { lease } => {
            let Some(i) = model.lease(lease) else { return };
            let lease = model.leases.swap_remove(i);
            if !lease.revoked {
                let pool = model.pools[lease.pool].as_mut().unwrap();
                pool.used -= lease.reserved;
                pool.frees += 1;
            }
            drop(lease.handle);
        }
        Op::Touch { lease } => {
            let Some(i) = model.lease(lease) else { return };
            let now = model.now;
            let lease = &mut model.leases[i];
            assert_eq!(lease.handle.touch().is_err(), lease.revoked);
            lease.last_use = now;
        }
        Op::ReleaseScope { scope } => {
            let reclaimed = memory.release_scope(ScopeId::new(scope));
            let expected = model.revoke(|lease, _| lease.scope == scope);
            assert_eq!((reclaimed.leases, reclaimed.bytes), expected);
        }
        Op::Advance { secs } => {
            tokio::time::advance(Duration::from_secs(secs)).await;
            model.now += Duration::from_secs(secs);
        }
        Op::Gc => {
            let reclaimed = memory.gc_now();
            let expected =
                model.revoke(|lease, now| idle_timeout(lease.pool).is_some_and(|limit| now - lease.last_use > limit));
            assert_eq!((reclaimed.leases, reclaimed.bytes), expected);
        }
    }
}

fn check(memory: &MemoryManager, model: &Model) {
    for (index, expected) in model.pools.iter().enumerate() {
        let Some(expected) = expected else {
            assert!(memory.pool_stats(NAMES[index]).is_err());
            continue;
        };
        let stats = memory.pool_stats(NAMES[index]).unwrap();
        let live = model.leases.iter().filter(|lease| lease.pool == index && !lease.revoked).count();
        assert_eq!(stats.used + stats.available, stats.capacity);
        let actual = ModelPool {
            capacity: stats.capacity,
            block: stats.block_size,
            used: stats.used,
            peak: stats.peak,
            allocations: stats.allocations,
            frees: stats.frees,
            failures: stats.failures,
            reclaimed: stats.reclaimed,
        };
        assert_eq!(&actual, expected, "pool {}", NAMES[index]);
        assert_eq!(stats.active_leases, live);
        assert_eq!(stats.waiters, 0);
    }
    for lease in &model.leases {
        assert_eq!(lease.handle.is_revoked(), lease.revoked);
        assert_eq!((lease.handle.len(), lease.handle.reserved()), (lease.len, lease.reserved));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_books_agree_with_a_plain_model(ops in prop::collection::vec(op(), 1..80)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let memory = MemoryManager::default();
            let mut model = Model::default();
            for op in ops {
                step(&memory, &mut model, op).await;
                check(&memory, &model);
            }
            let pools: Vec<_> = memory.pools();
            drop(std::mem::take(&mut model.leases));
            for pool in pools {
                assert_eq!(pool.stats().used, 0, "every lease gone: nothing used");
            }
        });
    }
}
