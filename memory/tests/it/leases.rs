//! Leases: freeing on drop, growing and shrinking in place, scopes, and revocation exactly once.

use usine_memory::{MemoryError, MemoryManager, PoolConfig, ScopeId};

use crate::{assert_books_balance, one_pool};

#[test]
fn dropping_a_lease_returns_its_blocks() {
    let (_memory, pool) = one_pool(4);
    let lease = pool.allocate(2048, ScopeId::new(1)).unwrap();
    assert_eq!(pool.stats().used, 2048);
    drop(lease);
    let stats = pool.stats();
    assert_eq!((stats.used, stats.active_leases, stats.frees, stats.peak), (0, 0, 1, 2048));
    assert_books_balance(&stats);
}

#[test]
fn growing_reserves_blocks_only_when_the_length_needs_them() {
    let (_memory, pool) = one_pool(4);
    let mut kv = pool.allocate(0, ScopeId::new(1)).unwrap();
    for token in 1..=10 {
        kv.try_grow(100).unwrap();
        assert_eq!(kv.len(), token * 100);
    }
    assert_eq!((kv.len(), kv.reserved(), pool.stats().used), (1000, 1024, 1024));
    kv.try_grow(24).unwrap();
    assert_eq!(kv.reserved(), 1024, "exactly one block");
    kv.try_grow(1).unwrap();
    assert_eq!((kv.reserved(), pool.stats().used), (2048, 2048));
}

#[test]
fn a_failed_grow_changes_nothing() {
    let (_memory, pool) = one_pool(4);
    let mut kv = pool.allocate(1024, ScopeId::new(1)).unwrap();
    let _other = pool.allocate(2048, ScopeId::new(2)).unwrap();
    let err = kv.try_grow(2048).unwrap_err();
    assert_eq!(err, MemoryError::Exhausted { pool: "test".into(), requested: 2048, available: 1024, waiters: 0 });
    let err = kv.try_grow(4096).unwrap_err();
    assert_eq!(err, MemoryError::TooLarge { pool: "test".into(), requested: 5120, capacity: 4096 });
    assert!(matches!(kv.try_grow(u64::MAX), Err(MemoryError::TooLarge { .. })));
    assert_eq!((kv.len(), kv.reserved()), (1024, 1024));
    let stats = pool.stats();
    assert_eq!((stats.used, stats.failures), (3072, 3));
    assert_books_balance(&stats);
}

#[test]
fn shrinking_returns_whole_blocks_and_stops_at_zero() {
    let (_memory, pool) = one_pool(4);
    let mut kv = pool.allocate(4096, ScopeId::new(1)).unwrap();
    kv.shrink(1000).unwrap();
    assert_eq!((kv.len(), kv.reserved(), pool.stats().used), (3096, 4096, 4096));
    kv.shrink(2072).unwrap();
    assert_eq!((kv.len(), kv.reserved(), pool.stats().used), (1024, 1024, 1024));
    kv.shrink(u64::MAX).unwrap();
    assert_eq!((kv.len(), kv.reserved(), pool.stats().used), (0, 0, 0));
    drop(kv);
    let stats = pool.stats();
    assert_eq!((stats.used, stats.frees, stats.peak), (0, 1, 4096));
}

#[test]
fn releasing_a_scope_revokes_its_leases_in_every_pool_and_no_other() {
    let memory = MemoryManager::default();
    let kv = memory.create_pool("kv", PoolConfig::new(8192, 1024)).unwrap();
    let act = memory.create_pool("act", PoolConfig::new(8192, 1024)).unwrap();
    let (request, other) = (ScopeId::new(10), ScopeId::new(11));
    let mut a = kv.allocate(2048, request).unwrap();
    let b = act.allocate(1024, request).unwrap();
    let c = kv.allocate(1024, other).unwrap();

    let reclaimed = memory.release_scope(request);
    assert_eq!((reclaimed.leases, reclaimed.bytes), (2, 3072));
    assert!(a.is_revoked() && b.is_revoked() && !c.is_revoked());
    assert_eq!((kv.stats().used, act.stats().used), (1024, 0));
    assert_eq!((kv.stats().reclaimed, act.stats().reclaimed), (1, 1));

    // A revoked lease says so, and cannot be grown back into the pool.
    let revoked = MemoryError::Revoked { pool: "kv".into(), lease: a.id() };
    assert_eq!(a.touch(), Err(revoked.clone()));
    assert_eq!(a.try_grow(1), Err(revoked.clone()));
    assert_eq!(a.shrink(1), Err(revoked));
    assert_eq!(a.touch().unwrap_err().to_string(), format!("lease #{} of pool `kv` was revoked", a.id().get()));
    assert_eq!(memory.release_scope(request).leases, 0, "nothing left in the scope");
    assert_eq!(kv.stats().used, 1024, "nothing happened to the other scope");
}

#[test]
fn a_revoked_lease_frees_nothing_when_dropped_even_after_its_slot_is_reused() {
    let (memory, pool) = one_pool(4);
    let old = pool.allocate(1024, ScopeId::new(1)).unwrap();
    memory.release_scope(ScopeId::new(1));
    let new = pool.allocate(2048, ScopeId::new(2)).unwrap(); // may take the freed record's slot
    assert_ne!(old.id(), new.id());
    drop(old);
    let stats = pool.stats();
    assert_eq!((stats.used, stats.active_leases, stats.frees, stats.reclaimed), (2048, 1, 0, 1));
    assert!(!new.is_revoked());
    drop(new);
    assert_eq!(pool.stats().used, 0);
}

#[test]
fn leases_describe_themselves() {
    let (_memory, pool) = one_pool(4);
    let scope = ScopeId::fresh();
    let lease = pool.allocate(10, scope).unwrap();
    assert_eq!((lease.pool(), lease.scope()), ("test", scope));
    assert_ne!(ScopeId::fresh(), scope);
    let debug = format!("{lease:?}");
    assert!(
        debug.contains("pool: \"test\"") && debug.contains("len: 10") && debug.contains("reserved: 1024"),
        "{debug}"
    );
}
