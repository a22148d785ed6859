//! Telemetry: the figures the `metrics` facade receives, checked with a debugging recorder.

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use usine_engine::scripted::metrics_snapshot as snapshot;
use usine_memory::{KvBlocks, MemoryManager, PoolConfig, ScopeId, metrics as names};

fn gauge(value: f64) -> DebugValue {
    DebugValue::Gauge(value.into())
}

#[test]
fn pool_figures_reach_the_metrics_facade_described() {
    let recorder = DebuggingRecorder::new();
    let (memory, pool) = metrics::with_local_recorder(&recorder, || {
        let memory = MemoryManager::default();
        let pool = memory.create_pool("kv-cache", PoolConfig::new(4096, 1024)).unwrap();
        (memory, pool)
    });
    // Handles were registered with the pool: later calls, outside the closure, still reach the recorder.
    let kept = pool.allocate(2048, ScopeId::new(1)).unwrap();
    drop(pool.allocate(1024, ScopeId::new(1)).unwrap());
    pool.allocate(4096, ScopeId::new(1)).unwrap_err();
    pool.allocate(8192, ScopeId::new(1)).unwrap_err();
    memory.release_scope(ScopeId::new(1));
    drop(kept);

    let seen = snapshot(&recorder);
    let value = |name: &str| seen.get(name).map(|(value, _)| value);
    assert_eq!(value("usine_memory_pool_capacity_bytes{pool=kv-cache}"), Some(&gauge(4096.0)));
    assert_eq!(value("usine_memory_pool_used_bytes{pool=kv-cache}"), Some(&gauge(0.0)));
    assert_eq!(value("usine_memory_pool_peak_bytes{pool=kv-cache}"), Some(&gauge(3072.0)));
    assert_eq!(value("usine_memory_pool_leases{pool=kv-cache}"), Some(&gauge(0.0)));
    assert_eq!(value("usine_memory_allocations_total{pool=kv-cache}"), Some(&DebugValue::Counter(2)));
    assert_eq!(value("usine_memory_frees_total{pool=kv-cache}"), Some(&DebugValue::Counter(1)));
    let failures = "usine_memory_allocation_failures_total{pool=kv-cache,reason=";
    assert_eq!(value(&format!("{failures}exhausted}}")), Some(&DebugValue::Counter(1)));
    assert_eq!(value(&format!("{failures}too_large}}")), Some(&DebugValue::Counter(1)));
    assert_eq!(value(&format!("{failures}timed_out}}")), Some(&DebugValue::Counter(0)));
    assert_eq!(value("usine_memory_reclaimed_total{pool=kv-cache,reason=scope}"), Some(&DebugValue::Counter(1)));
    assert_eq!(value("usine_memory_reclaimed_total{pool=kv-cache,reason=idle}"), Some(&DebugValue::Counter(0)));

    for name in [
        names::POOL_CAPACITY_BYTES,
        names::POOL_USED_BYTES,
        names::POOL_PEAK_BYTES,
        names::POOL_LEASES,
        names::POOL_WAITERS,
        names::ALLOCATIONS_TOTAL,
        names::FREES_TOTAL,
        names::ALLOCATION_FAILURES_TOTAL,
        names::RECLAIMED_TOTAL,
        names::WAIT_DURATION_SECONDS,
    ] {
        let described = seen.iter().find(|(key, _)| key.starts_with(&format!("{name}{{")));
        let (_, (_, description)) = described.unwrap_or_else(|| panic!("{name} was not registered"));
        assert!(description.as_ref().is_some_and(|text| !text.is_empty()), "{name} has no description");
    }
}

#[tokio::test(start_paused = true)]
async fn waits_are_measured_in_seconds() {
    let recorder = DebuggingRecorder::new();
    let pool = metrics::with_local_recorder(&recorder, || {
        MemoryManager::default().create_pool("activations", PoolConfig::new(1024, 1024)).unwrap()
    });
    let _held = pool.allocate(1024, ScopeId::new(1)).unwrap();
    pool.allocate_wait(1024, ScopeId::new(1), std::time::Duration::from_millis(250)).await.unwrap_err();
    let seen = snapshot(&recorder);
    let (wait, _) = &seen["usine_memory_wait_duration_seconds{pool=activations}"];
    assert_eq!(*wait, DebugValue::Histogram(vec![0.25.into()]));
    let (timed_out, _) = &seen["usine_memory_allocation_failures_total{pool=activations,reason=timed_out}"];
    assert_eq!(*timed_out, DebugValue::Counter(1));
    assert_eq!(seen["usine_memory_pool_waiters{pool=activations}"].0, gauge(0.0));
}

// Would catch: kv block gauges set per space (two models over one pool overwriting each other's
// figures), counters not reaching the recorder, or a dropped space leaving its blocks on the gauges.
#[test]
fn kv_block_figures_reach_the_metrics_facade_summed_over_the_models_of_a_pool() {
    let recorder = DebuggingRecorder::new();
    let (pool, one, two) = metrics::with_local_recorder(&recorder, || {
        let pool = MemoryManager::default().create_pool("kv-cache", PoolConfig::new(4096, 1024)).unwrap();
        let one = KvBlocks::new(pool.clone(), 1, 4, 256).unwrap();
        let two = KvBlocks::new(pool.clone(), 2, 4, 256).unwrap();
        (pool, one, two)
    });
    let prompt: Vec<u32> = (1..=9).collect();
    let mut first = one.start(&prompt);
    one.cover(&mut first, 9).unwrap();
    one.publish(&mut first, &prompt).unwrap();
    drop(first);
    let second = one.start(&prompt); // 8 tokens hit, 1 missed
    let mut other = two.start(&[]);
    two.cover(&mut other, 8).unwrap();
    drop(second);
    let mut third = one.start(&[]);
    one.cover(&mut third, 4).unwrap(); // the pool is full: one cached block evicted
    assert_eq!(pool.stats().used, 4096);

    let seen = snapshot(&recorder);
    let value = |name: &str| seen.get(name).map(|(value, _)| value);
    let blocks = |state: &str| value(&format!("usine_memory_kv_blocks{{pool=kv-cache,state={state}}}"));
    assert_eq!(
        (blocks("in_use"), blocks("cached"), blocks("free")),
        (Some(&gauge(3.0)), Some(&gauge(1.0)), Some(&gauge(4.0)))
    );
    let tokens =
        |outcome: &str| value(&format!("usine_memory_kv_prefix_tokens_total{{pool=kv-cache,outcome={outcome}}}"));
    assert_eq!((tokens("hit"), tokens("miss")), (Some(&DebugValue::Counter(8)), Some(&DebugValue::Counter(10))));
    assert_eq!(value("usine_memory_kv_evictions_total{pool=kv-cache}"), Some(&DebugValue::Counter(1)));
    assert_eq!(
        value("usine_memory_kv_cached_bytes{pool=kv-cache}"),
        Some(&gauge(1024.0)),
        "one block of 4 × 256 bytes"
    );
    for name in [names::KV_BLOCKS, names::KV_CACHED_BYTES, names::KV_PREFIX_TOKENS_TOTAL, names::KV_EVICTIONS_TOTAL] {
        let described = seen.iter().find(|(key, _)| key.starts_with(&format!("{name}{{")));
        let (_, (_, description)) = described.unwrap_or_else(|| panic!("{name} was not registered"));
        assert!(description.as_ref().is_some_and(|text| !text.is_empty()), "{name} has no description");
    }

    drop((third, other, one, two));
    // A snapshot resets what it reads: this one holds the changes since the last, every block leaving.
    let seen = snapshot(&recorder);
    for (state, before) in [("in_use", 3.0), ("cached", 1.0), ("free", 4.0)] {
        let key = format!("usine_memory_kv_blocks{{pool=kv-cache,state={state}}}");
        assert_eq!(seen[&key].0, gauge(-before), "{state}: both spaces are gone");
    }
    assert_eq!(seen["usine_memory_kv_cached_bytes{pool=kv-cache}"].0, gauge(-1024.0));
    assert_eq!(pool.stats().used, 0);
}
