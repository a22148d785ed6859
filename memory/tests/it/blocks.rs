//! Kv blocks: prefix sharing, the last token, eviction order, exhaustion, models apart, the GC, waiting.

use std::time::Duration;

use usine_memory::{BlockStats, KvBlocks, MemoryError, MemoryManager, Pool, PoolConfig, ScopeId};

/// Pool blocks of 1 KiB; kv blocks of 4 tokens at 256 bytes a token, so one pool block each.
const BLOCK: u64 = 1024;
const MODEL: u64 = 0x6d6f_6465_6c31;

/// A manager with a pool of `blocks` kv blocks, and one model's space over it.
fn space(blocks: u64, idle_timeout: Option<Duration>) -> (MemoryManager, Pool, KvBlocks) {
    let memory = MemoryManager::default();
    let pool =
        memory.create_pool("kv-cache", PoolConfig::new(blocks * BLOCK, BLOCK).idle_timeout(idle_timeout)).unwrap();
    let kv = KvBlocks::new(pool.clone(), MODEL, 4, 256).unwrap();
    (memory, pool, kv)
}

/// `n` tokens counting up from `from`.
fn tokens(from: u32, n: u32) -> Vec<u32> {
    (from..from + n).collect()
}

/// The invariant that holds at every observable point, with no other user of the pool and nothing
/// revoked.
#[track_caller]
fn assert_balanced(kv: &KvBlocks, pool: &Pool) -> BlockStats {
    let stats = kv.stats();
    assert_eq!(stats.free + stats.cached + stats.in_use, stats.total, "{stats:?}");
    assert_eq!(pool.stats().used, u64::from(stats.cached + stats.in_use) * kv.block_bytes(), "{stats:?}");
    stats
}

// Would catch: a second sequence with the same prompt getting new blocks (no sharing), or shared blocks
// counted twice in the pool or released while the first sequence still holds them.
#[test]
fn a_prefix_shared_by_two_sequences_is_held_once_and_counted_once() {
    let (_memory, pool, kv) = space(16, None);
    let system = tokens(100, 8);
    let mut first = kv.start(&[&system[..], &[1, 2, 3]].concat());
    kv.cover(&mut first, 11).unwrap();
    assert_eq!(first.ids(), [0, 1, 2]);
    assert_eq!(kv.publish(&mut first, &[&system[..], &[1, 2, 3]].concat()).unwrap(), 2);

    let second_prompt = [&system[..], &[7, 7, 7, 7, 7]].concat();
    let mut second = kv.start(&second_prompt);
    assert_eq!((second.ids(), second.cached_tokens()), (&[0, 1][..], 8));
    kv.cover(&mut second, second_prompt.len()).unwrap();
    assert_eq!(second.ids(), [0, 1, 3, 4]);
    for shared in [0, 1] {
        assert_eq!(kv.block(shared).unwrap().refs, 2);
    }
    let stats = assert_balanced(&kv, &pool);
    assert_eq!((stats.in_use, stats.cached, stats.hit_tokens, stats.miss_tokens), (5, 0, 8, 11 + 5));

    drop(first);
    assert_eq!(kv.block(0).unwrap().refs, 1, "still the second's");
    assert!(kv.block(2).is_none(), "the first's private block is freed");
    drop(second);
    let stats = assert_balanced(&kv, &pool);
    assert_eq!((stats.in_use, stats.cached), (0, 2), "published blocks stay cached, the others go");
}

// Would catch: a prompt that is exactly a whole number of cached blocks served entirely from the cache,
// leaving no token to compute the first logits from.
#[test]
fn the_last_token_of_a_prompt_is_never_taken_from_the_cache() {
    let (_memory, pool, kv) = space(16, None);
    let prompt = tokens(1, 8);
    let mut first = kv.start(&prompt);
    kv.cover(&mut first, 8).unwrap();
    kv.publish(&mut first, &prompt).unwrap();
    drop(first);

    let exact = kv.start(&prompt);
    assert_eq!((exact.ids(), exact.cached_tokens()), (&[0][..], 4), "the second block holds the last token");
    drop(exact);
    let longer = kv.start(&tokens(1, 9));
    assert_eq!((longer.ids(), longer.cached_tokens()), (&[0, 1][..], 8));
    drop(longer);
    for short in [&[][..], &[1][..], &tokens(1, 4)[..]] {
        let table = kv.start(short);
        assert_eq!(table.cached_tokens(), 0, "{short:?}");
    }
    assert_eq!(assert_balanced(&kv, &pool).cached, 2);
}

// Would catch: eviction of the most recently released block, or of a chain's head before its tail
// (which leaves the tail cached but unreachable).
#[test]
fn eviction_takes_the_least_recently_released_block_and_a_chains_tail_first() {
    let (_memory, pool, kv) = space(4, None);
    let older = tokens(10, 8);
    let newer = tokens(20, 8);
    for prompt in [&older, &newer] {
        let mut table = kv.start(prompt);
        kv.cover(&mut table, 8).unwrap();
        kv.publish(&mut table, prompt).unwrap();
    }
    // Blocks 0, 1 hold `older`, 2, 3 `newer`: all cached, the pool full.
    assert_eq!(assert_balanced(&kv, &pool).cached, 4);

    let mut fresh = kv.start(&[]);
    kv.cover(&mut fresh, 4).unwrap();
    assert_eq!(fresh.ids(), [1], "the older chain's tail first");
    kv.cover(&mut fresh, 8).unwrap();
    assert_eq!(fresh.ids(), [1, 0], "then its head");
    let stats = assert_balanced(&kv, &pool);
    assert_eq!((stats.evictions, stats.cached, stats.in_use), (2, 2, 2));
    let hit = kv.start(&tokens(20, 9));
    assert_eq!(hit.cached_tokens(), 8, "the newer chain is whole");
}

// Would catch: an exhausted pool panicking or giving an untyped error, a block taken before the failure
// leaking, or the pool's books left unbalanced.
#[test]
fn an_exhausted_pool_gives_a_typed_error_and_leaks_nothing() {
    let (_memory, pool, kv) = space(4, None);
    let other = pool.allocate(BLOCK, ScopeId::new(9)).unwrap();
    let mut table = kv.start(&[]);
    let err = kv.cover(&mut table, 16).unwrap_err();
    assert_eq!(err, MemoryError::Exhausted { pool: "kv-cache".into(), requested: BLOCK, available: 0, waiters: 0 });
    assert_eq!((table.ids(), table.capacity()), (&[0, 1, 2][..], 12), "the table keeps what it got");
    let err = kv.cover(&mut table, 17).unwrap_err();
    assert!(matches!(err, MemoryError::TooLarge { requested: 5120, capacity: 4096, .. }), "{err}");
    drop(other);
    drop(table);
    let stats = kv.stats();
    assert_eq!((stats.free, stats.cached, stats.in_use), (4, 0, 0));
    assert_eq!(pool.stats().used, 0);
    assert_eq!(pool.stats().active_leases, 0);
}

// Would catch: blocks of one model served to another with the same tokens over the same pool.
#[test]
fn two_models_over_one_pool_never_share_blocks() {
    let (_memory, pool, kv) = space(16, None);
    let other = KvBlocks::new(pool.clone(), MODEL + 1, 4, 256).unwrap();
    let prompt = tokens(1, 9);
    let mut table = kv.start(&prompt);
    kv.cover(&mut table, 9).unwrap();
    kv.publish(&mut table, &prompt).unwrap();
    drop(table);

    let theirs = other.start(&prompt);
    assert_eq!(theirs.cached_tokens(), 0);
    assert_eq!(other.stats().miss_tokens, 9);
    let mut theirs = theirs;
    other.cover(&mut theirs, 9).unwrap();
    other.publish(&mut theirs, &prompt).unwrap();
    let (ours, theirs_block) = (kv.block(0).unwrap(), other.block(0).unwrap());
    let (ours, theirs_block) = (ours.published.unwrap(), theirs_block.published.unwrap());
    assert_eq!(ours.tokens, theirs_block.tokens);
    assert_ne!(ours.hash, theirs_block.hash, "the model key is in the hash");
    // One model's tables cannot be used with the other's space.
    assert!(matches!(kv.cover(&mut theirs, 12), Err(MemoryError::ForeignBlockTable { .. })));
    assert!(matches!(kv.publish(&mut theirs, &prompt), Err(MemoryError::ForeignBlockTable { .. })));
    assert!(matches!(kv.touch(&theirs), Err(MemoryError::ForeignBlockTable { .. })));
}

// Would catch: two tables that computed the same prompt at once both publishing, one overwriting the
// other in the index and leaving a block cached but unreachable.
#[test]
fn an_identical_block_published_twice_stays_one_and_the_copy_is_freed() {
    let (_memory, pool, kv) = space(16, None);
    let prompt = tokens(1, 9);
    let (mut one, mut two) = (kv.start(&prompt), kv.start(&prompt));
    kv.cover(&mut one, 9).unwrap();
    kv.cover(&mut two, 9).unwrap();
    assert_eq!(kv.publish(&mut one, &prompt).unwrap(), 2);
    assert_eq!(kv.publish(&mut two, &prompt).unwrap(), 0, "already published by the first");
    drop(one);
    drop(two);
    let stats = assert_balanced(&kv, &pool);
    assert_eq!((stats.cached, stats.in_use), (2, 0));
    let again = kv.start(&prompt);
    assert_eq!(again.ids(), [0, 1]);
}

// Would catch: a table whose leading blocks came from another's publication unable to publish its own
// after that one was evicted, or publishing under a stale parent.
#[test]
fn a_table_whose_twin_was_evicted_publishes_its_own_blocks() {
    let (_memory, pool, kv) = space(5, None);
    let prompt = tokens(1, 9);
    let (mut one, mut two) = (kv.start(&prompt), kv.start(&prompt));
    kv.cover(&mut one, 8).unwrap();
    kv.cover(&mut two, 8).unwrap();
    assert_eq!((one.ids(), two.ids()), (&[0, 1][..], &[2, 3][..]));
    kv.publish(&mut one, &prompt).unwrap();
    assert_eq!(kv.publish(&mut two, &prompt[..4]).unwrap(), 0);
    drop(one);
    let mut filler = kv.start(&[]);
    kv.cover(&mut filler, 12).unwrap();
    assert_eq!(filler.ids(), [4, 1, 0], "the first's blocks evicted, tail first");
    assert_eq!(kv.publish(&mut two, &prompt).unwrap(), 2, "its own, now that the twins are gone");
    drop(two);
    drop(filler);
    let hit = kv.start(&prompt);
    assert_eq!((hit.ids(), hit.cached_tokens()), (&[2, 3][..], 8));
    assert_balanced(&kv, &pool);
}

// Would catch: a cached block whose memory the GC took back served as a hit, or left counted as cached
// after it was met.
#[tokio::test(start_paused = true)]
async fn a_cached_block_the_gc_revoked_is_a_miss_and_is_freed() {
    let (memory, pool, kv) = space(8, Some(Duration::from_secs(30)));
    let prompt = tokens(1, 9);
    let mut table = kv.start(&prompt);
    kv.cover(&mut table, 9).unwrap();
    kv.publish(&mut table, &prompt).unwrap();
    drop(table);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(memory.gc_now().leases, 2);
    assert_eq!(pool.stats().used, 0);

    let table = kv.start(&prompt);
    assert_eq!(table.cached_tokens(), 0);
    let stats = kv.stats();
    assert_eq!((stats.cached, stats.in_use, stats.evictions), (0, 0, 2), "both blocks left the cache");
    drop(table);
    assert_balanced(&kv, &pool);
}

// Would catch: touch not reaching every block (the GC revoking a running sequence's kv), or a revoked
// block going unreported; and a request's scope release taking blocks other sequences share.
#[tokio::test(start_paused = true)]
async fn touch_keeps_a_tables_blocks_from_the_gc_and_reports_a_revoked_one() {
    let (memory, pool, kv) = space(8, Some(Duration::from_secs(30)));
    let mut table = kv.start(&[]);
    kv.cover(&mut table, 8).unwrap();
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(20)).await;
        kv.touch(&table).unwrap();
        assert_eq!(memory.gc_now().leases, 0);
    }
    assert_eq!(memory.release_scope(ScopeId::new(1)).leases, 0, "blocks belong to no request");
    assert_eq!(memory.release_scope(kv.scope()).leases, 2);
    assert!(matches!(kv.touch(&table), Err(MemoryError::Revoked { .. })));
    drop(table);
    assert_eq!(kv.stats().free, 8);
    assert_eq!(pool.stats().used, 0);
}

// Would catch: a waiting cover that only listens to the pool, so a block going to the cache (which
// frees no pool memory) leaves it waiting until its timeout.
#[tokio::test(start_paused = true)]
async fn cover_wait_is_woken_by_a_block_going_to_the_cache() {
    let (_memory, pool, kv) = space(2, None);
    let prompt = tokens(1, 9);
    let mut holder = kv.start(&prompt);
    kv.cover(&mut holder, 8).unwrap();
    kv.publish(&mut holder, &prompt).unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(holder);
    });
    let started = tokio::time::Instant::now();
    let mut table = kv.start(&[]);
    kv.cover_wait(&mut table, 8, Duration::from_secs(5)).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    assert_eq!(table.ids(), [1, 0]);
    release.await.unwrap();
    assert_eq!(kv.stats().evictions, 2);
    assert_eq!(pool.stats().waiters, 0);
}

// Would catch: a waiting cover not woken by pool memory another user frees, or one that overruns its
// timeout, or that drops the blocks it got before timing out.
#[tokio::test(start_paused = true)]
async fn cover_wait_takes_freed_pool_memory_and_times_out_keeping_what_it_got() {
    let (_memory, pool, kv) = space(3, None);
    let other = pool.allocate(2 * BLOCK, ScopeId::new(9)).unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(other);
    });
    let started = tokio::time::Instant::now();
    let mut table = kv.start(&[]);
    kv.cover_wait(&mut table, 12, Duration::from_secs(1)).await.unwrap();
    assert_eq!((table.ids(), started.elapsed()), (&[0, 1, 2][..], Duration::from_millis(100)));
    release.await.unwrap();

    let mut second = kv.start(&[]);
    drop(table);
    let hog = pool.allocate(2 * BLOCK, ScopeId::new(9)).unwrap();
    let started = tokio::time::Instant::now();
    let err = kv.cover_wait(&mut second, 8, Duration::from_millis(400)).await.unwrap_err();
    assert!(matches!(err, MemoryError::TimedOut { requested: BLOCK, .. }), "{err}");
    assert_eq!(started.elapsed(), Duration::from_millis(400));
    assert_eq!(second.ids().len(), 1, "the block it got stays with the table");
    drop((second, hog));
    assert_eq!(pool.stats().used, 0);
    assert_eq!(pool.stats().waiters, 0);
}

// Would catch: zero or overflowing sizes accepted (a division by zero or a wrapped block size later),
// or a block larger than the pool accepted with no id to hand out.
#[test]
fn sizes_that_cannot_work_are_typed_errors() {
    let memory = MemoryManager::default();
    let pool = memory.create_pool("kv-cache", PoolConfig::new(64 * BLOCK, BLOCK)).unwrap();
    let reason = |result: Result<KvBlocks, MemoryError>| match result.unwrap_err() {
        MemoryError::InvalidKvBlocks { reason, .. } => reason,
        other => panic!("{other}"),
    };
    assert_eq!(reason(KvBlocks::new(pool.clone(), 0, 0, 256)), "zero tokens per block");
    assert_eq!(reason(KvBlocks::new(pool.clone(), 0, 16, 0)), "zero bytes per token");
    assert_eq!(reason(KvBlocks::new(pool.clone(), 0, u32::MAX, u64::MAX)), "the block size overflows 64 bits");
    assert_eq!(reason(KvBlocks::new(pool.clone(), 0, 16, 4097)), "a block exceeds the pool's capacity");
    let err = KvBlocks::new(pool.clone(), 0, 16, 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid kv blocks of 16 tokens at 0 bytes a token over pool `kv-cache` (65536 bytes): zero bytes per token"
    );
    // A kv block that is not a whole number of pool blocks is rounded up: its lease holds that much.
    let kv = KvBlocks::new(pool, 0, 16, 100).unwrap();
    assert_eq!((kv.block_bytes(), kv.total()), (2048, 32));
}
