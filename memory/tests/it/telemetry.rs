//! Telemetry: the figures the `metrics` facade receives, checked with a debugging recorder.

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use usine_engine::scripted::metrics_snapshot as snapshot;
use usine_memory::{MemoryManager, PoolConfig, ScopeId, metrics as names};

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
