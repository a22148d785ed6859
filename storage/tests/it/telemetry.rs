//! Telemetry: what the `metrics` facade receives from a store, checked with a debugging recorder.

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use usine_engine::scripted::metrics_snapshot;
use usine_storage::{Migrations, StorageConfig, StorageManager, metrics as names};

use crate::{Graph, key};

#[test]
fn hits_misses_quarantine_and_bytes_reach_the_metrics_facade_described() {
    let recorder = DebuggingRecorder::new();
    let dir = tempfile::tempdir().unwrap();
    let store = metrics::with_local_recorder(&recorder, || {
        StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap()
    });
    let saved = store.save(&key("a"), &Graph::sample(1, 1000)).unwrap();
    store.get::<Graph>(&key("a")).unwrap().hit().unwrap();
    store.get::<Graph>(&key("absent")).unwrap();
    std::fs::write(&saved.path, b"garbage").unwrap();
    store.get::<Graph>(&key("a")).unwrap();

    let seen = metrics_snapshot(&recorder);
    let value = |name: &str| seen.get(name).map(|(value, _)| value);
    assert_eq!(value("usine_storage_hits_total{}"), Some(&DebugValue::Counter(1)));
    assert_eq!(value("usine_storage_misses_total{reason=absent}"), Some(&DebugValue::Counter(1)));
    assert_eq!(value("usine_storage_misses_total{reason=corrupt}"), Some(&DebugValue::Counter(1)));
    assert_eq!(value("usine_storage_quarantined_total{}"), Some(&DebugValue::Counter(1)));
    assert_eq!(value("usine_storage_written_bytes_total{}"), Some(&DebugValue::Counter(saved.bytes)));
    assert_eq!(value("usine_storage_read_bytes_total{}"), Some(&DebugValue::Counter(saved.bytes + 7)));
    let Some(DebugValue::Histogram(loads)) = value("usine_storage_load_duration_seconds{}") else { panic!() };
    assert_eq!(loads.len(), 1, "one timed load: the hit");
    for name in [
        names::HITS_TOTAL,
        names::MISSES_TOTAL,
        names::QUARANTINED_TOTAL,
        names::EVICTED_TOTAL,
        names::READ_BYTES_TOTAL,
        names::WRITTEN_BYTES_TOTAL,
        names::LOAD_DURATION_SECONDS,
        names::SAVE_DURATION_SECONDS,
        names::GRAPHS,
        names::STORED_BYTES,
    ] {
        let (_, (_, description)) = seen
            .iter()
            .find(|(key, _)| key.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("{name} was not registered"));
        assert!(description.as_ref().is_some_and(|text| !text.is_empty()), "{name} has no description");
    }
}
