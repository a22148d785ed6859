//! Creating pools, the standard pools, and allocating: rounding, typed errors with their figures.

use usine_memory::{ACTIVATIONS, KV_CACHE, MemoryError, MemoryManager, PoolConfig, ScopeId, StandardPools, UNIFORMS};

use crate::{assert_books_balance, one_pool};

const SCOPE: ScopeId = ScopeId::new(1);

#[test]
fn bad_pool_configurations_are_typed_errors_that_name_the_pool() {
    let memory = MemoryManager::default();
    memory.create_pool("kv", PoolConfig::new(4096, 1024)).unwrap();
    let cases = [
        ("kv", PoolConfig::new(4096, 1024), "pool `kv` already exists"),
        ("zero", PoolConfig::new(0, 1024), "pool `zero` has zero capacity"),
        ("odd", PoolConfig::new(4096, 1000), "pool `odd`: block size 1000 bytes does not divide capacity 4096 bytes"),
        ("noblock", PoolConfig::new(4096, 0), "pool `noblock`: block size 0 bytes does not divide capacity 4096 bytes"),
        (
            "calm",
            PoolConfig::new(4096, 1024).water_marks(0, 0),
            "pool `calm`: water marks must satisfy low < high <= 100 %, got high 0 %, low 0 %",
        ),
        (
            "over",
            PoolConfig::new(4096, 1024).water_marks(101, 80),
            "pool `over`: water marks must satisfy low < high <= 100 %, got high 101 %, low 80 %",
        ),
        (
            "flat",
            PoolConfig::new(4096, 1024).water_marks(90, 90),
            "pool `flat`: water marks must satisfy low < high <= 100 %, got high 90 %, low 90 %",
        ),
        ("", PoolConfig::new(4096, 1024), "invalid pool name ``: empty"),
        ("KV", PoolConfig::new(4096, 1024), "invalid pool name `KV`: only a-z, 0-9, `-` and `_` are allowed"),
        ("a/../b", PoolConfig::new(4096, 1024), "invalid pool name `a/../b`: only a-z, 0-9, `-` and `_` are allowed"),
    ];
    for (name, config, message) in cases {
        let err = memory.create_pool(name, config).unwrap_err();
        assert_eq!(err.to_string(), message);
    }
    let long = "x".repeat(65);
    let err = memory.create_pool(&long, PoolConfig::new(4096, 1024)).unwrap_err();
    assert!(matches!(err, MemoryError::InvalidName { reason: "longer than 64 bytes", .. }), "{err}");
    memory.create_pool(&"x".repeat(64), PoolConfig::new(4096, 1024)).unwrap();
    assert_eq!(memory.pools().len(), 2, "no failed creation left a pool behind");
}

#[test]
fn an_unknown_pool_lists_the_known_ones() {
    let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(1 << 20).unwrap()).unwrap();
    let err = memory.allocate("weights", 1, SCOPE).unwrap_err();
    assert_eq!(err.to_string(), "unknown pool `weights` (known pools: activations, kv-cache, uniforms)");
    assert!(!memory.can_allocate("weights", 1));
    assert!(memory.pool_stats("weights").is_err());
}

#[test]
fn standard_pools_share_a_budget_70_25_5_in_whole_blocks() {
    let pools = StandardPools::from_budget(100 * 4096).unwrap();
    assert_eq!(pools.kv_cache.capacity, 70 * 4096);
    assert_eq!(pools.activations.capacity, 25 * 4096);
    assert_eq!(pools.uniforms.capacity, 5 * 4096);
    let memory = MemoryManager::with_standard_pools(&pools).unwrap();
    let names: Vec<_> = memory.pools().iter().map(|pool| pool.name().to_owned()).collect();
    assert_eq!(names, [ACTIVATIONS, KV_CACHE, UNIFORMS]);
    assert_eq!(memory.stats().capacity(), 100 * 4096);

    // Rounded down: 10 blocks and a bit give uniforms half a block, which is none.
    let err = StandardPools::from_budget(10 * 4096 + 100).unwrap_err();
    assert_eq!(err, MemoryError::ZeroCapacity { pool: UNIFORMS.into() });
    // No overflow for the largest budget.
    assert!(StandardPools::from_budget(u64::MAX).is_ok());
}

#[test]
fn standard_pools_take_explicit_sizes() {
    let pools = StandardPools {
        kv_cache: PoolConfig::new(1 << 20, 16 << 10),
        activations: PoolConfig::new(1 << 16, 4096).idle_timeout(None),
        uniforms: PoolConfig::new(4096, 256),
    };
    let memory = MemoryManager::with_standard_pools(&pools).unwrap();
    assert_eq!(memory.pool(KV_CACHE).unwrap().block_size(), 16 << 10);
    assert_eq!(memory.pool(UNIFORMS).unwrap().capacity(), 4096);

    let broken = StandardPools { uniforms: PoolConfig::new(4096, 3000), ..pools };
    assert!(matches!(MemoryManager::with_standard_pools(&broken), Err(MemoryError::BlockSize { .. })));
}

#[test]
fn allocations_round_up_to_whole_blocks() {
    let (_memory, pool) = one_pool(8);
    let a = pool.allocate(1, SCOPE).unwrap();
    let b = pool.allocate(1024, SCOPE).unwrap();
    let c = pool.allocate(1025, SCOPE).unwrap();
    let empty = pool.allocate(0, SCOPE).unwrap();
    assert_eq!([a.reserved(), b.reserved(), c.reserved(), empty.reserved()], [1024, 1024, 2048, 0]);
    assert_eq!([a.len(), b.len(), c.len(), empty.len()], [1, 1024, 1025, 0]);
    assert!(empty.is_empty());
    let stats = pool.stats();
    assert_eq!((stats.used, stats.available, stats.active_leases, stats.allocations), (4096, 4096, 4, 4));
    assert_books_balance(&stats);
}

#[test]
fn exhaustion_and_oversized_requests_carry_their_figures() {
    let (_memory, pool) = one_pool(4);
    let _held = pool.allocate(3000, SCOPE).unwrap(); // three blocks
    let err = pool.allocate(2000, SCOPE).unwrap_err();
    assert_eq!(err, MemoryError::Exhausted { pool: "test".into(), requested: 2000, available: 1024, waiters: 0 });
    assert_eq!(err.to_string(), "pool `test` exhausted: requested 2000 bytes, 1024 available");

    let err = pool.allocate(4097, SCOPE).unwrap_err();
    assert_eq!(err, MemoryError::TooLarge { pool: "test".into(), requested: 4097, capacity: 4096 });
    assert_eq!(err.to_string(), "request of 4097 bytes exceeds the whole capacity of pool `test` (4096 bytes)");
    // Rounding up `u64::MAX` would overflow: still a typed error.
    assert!(matches!(pool.allocate(u64::MAX, SCOPE), Err(MemoryError::TooLarge { .. })));

    let stats = pool.stats();
    assert_eq!((stats.allocations, stats.failures, stats.used), (1, 3, 3072));
    assert_books_balance(&stats);
}

#[test]
fn can_allocate_is_advisory_and_agrees_with_allocate_when_nothing_else_runs() {
    let (memory, pool) = one_pool(2);
    assert!(pool.can_allocate(2048));
    assert!(!pool.can_allocate(2049));
    assert!(memory.can_allocate("test", 1));
    let _held = pool.allocate(1024, SCOPE).unwrap();
    assert!(pool.can_allocate(1024));
    assert!(!pool.can_allocate(1025));
    assert!(!pool.can_allocate(u64::MAX));
    let stats = pool.stats();
    assert_eq!(stats.failures, 0, "asking is not failing");
}

#[test]
fn the_same_pool_is_shared_by_every_handle() {
    let (memory, pool) = one_pool(2);
    let _held = memory.allocate("test", 1024, SCOPE).unwrap();
    assert_eq!(pool.stats().used, 1024);
    assert_eq!(memory.pool("test").unwrap().stats(), pool.stats());
    assert_eq!(memory.stats().pool("test"), Some(&pool.stats()));
    assert_eq!(memory.stats().used(), 1024);
}
