//! The size limit (least recently used first, never a pinned graph) and cleanup of obsolete graphs.

use std::fs::File;
use std::time::{Duration, SystemTime};

use usine_storage::{Cleanup, CurrentEngine, GraphKey, Migrations, StorageConfig, StorageManager};

use crate::{Graph, key};

/// Sets a graph's last use to `ago` before now.
fn last_used(store: &StorageManager, key: &GraphKey, ago: Duration) {
    let file = File::options().write(true).open(store.path_of(key)).unwrap();
    file.set_modified(SystemTime::now() - ago).unwrap();
}

#[test]
fn over_the_limit_the_least_recently_used_unpinned_graphs_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let probe = StorageManager::open(StorageConfig::at(dir.path().join("probe")), Migrations::new()).unwrap();
    let one = probe.save(&key("probe"), &Graph::sample(0, 1000)).unwrap().bytes;
    let limit = one * 7 / 2; // room for three graphs and a half
    let store = StorageManager::open(StorageConfig::at(dir.path()).max_bytes(Some(limit)), Migrations::new()).unwrap();

    for (model, ago) in [("a", 30), ("b", 20), ("c", 10)] {
        assert!(store.save(&key(model), &Graph::sample(1, 1000)).unwrap().evicted.is_empty());
        last_used(&store, &key(model), Duration::from_secs(ago));
    }
    assert!(store.get::<Graph>(&key("a")).unwrap().hit().is_some()); // a hit is a use: `a` is newest now
    let _loaded = store.pin(&key("b")); // oldest, but its model is loaded

    let saved = store.save(&key("d"), &Graph::sample(1, 1000)).unwrap();
    assert_eq!(saved.evicted, [key("c")]);
    let mut left: Vec<String> =
        store.list().unwrap().iter().map(|entry| entry.header().unwrap().key.model.clone()).collect();
    left.sort();
    assert_eq!(left, ["a", "b", "d"]);
    let stats = store.stats().unwrap();
    assert_eq!((stats.evicted, stats.bytes <= limit), (1, true));
}

#[test]
fn pinned_graphs_and_files_of_a_newer_usine_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let probe = StorageManager::open(StorageConfig::at(dir.path().join("probe")), Migrations::new()).unwrap();
    let one = probe.save(&key("probe"), &Graph::sample(0, 1000)).unwrap().bytes;
    let store =
        StorageManager::open(StorageConfig::at(dir.path()).max_bytes(Some(one * 3 / 2)), Migrations::new()).unwrap();
    let newer = crate::corruption::assemble(usine_storage::format::FORMAT_VERSION + 1, b"{}", &[7; 4000]);
    let newer_path = store.graphs_dir().join(key("from-the-future").file_name());
    std::fs::write(&newer_path, &newer).unwrap();
    File::options().write(true).open(&newer_path).unwrap().set_modified(SystemTime::UNIX_EPOCH).unwrap();

    let pins = [store.pin(&key("a")), store.pin(&key("b"))];
    assert!(store.save(&key("a"), &Graph::sample(1, 1000)).unwrap().evicted.is_empty());
    assert!(store.save(&key("b"), &Graph::sample(2, 1000)).unwrap().evicted.is_empty());
    assert_eq!(store.list().unwrap().len(), 3, "over the limit, but nothing may go");
    drop(pins);
    assert_eq!(store.enforce_limit().unwrap(), [key("a"), key("b")]);
    assert_eq!(std::fs::read(&newer_path).unwrap(), newer, "the newer usine's file is untouched");
}

#[test]
fn a_graph_larger_than_the_whole_limit_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let store = StorageManager::open(StorageConfig::at(dir.path()).max_bytes(Some(1000)), Migrations::new()).unwrap();
    let err = store.save(&key("big"), &Graph::sample(1, 2000)).unwrap_err();
    let usine_storage::StorageError::ExceedsLimit { bytes, limit: 1000 } = err else { panic!("{err}") };
    assert!(bytes > 2000);
    assert_eq!(
        err.to_string(),
        format!("the graph's file is {bytes} bytes, over the store's size limit of 1000 bytes")
    );
    assert!(std::fs::read_dir(store.graphs_dir()).unwrap().all(|entry| entry.unwrap().path().is_dir()));
}

#[test]
fn cleanup_removes_what_can_never_be_asked_for_again_and_what_went_unused() {
    let dir = tempfile::tempdir().unwrap();
    let mut migrations = Migrations::new();
    migrations.register("webllm", 2, |old: Graph| old);
    let store = StorageManager::open(StorageConfig::at(dir.path()), migrations).unwrap();
    let graph = Graph::sample(1, 10);
    let older_engine = GraphKey::new("m", "webllm", "0.2.9").schema(3);
    let newer_engine = GraphKey::new("m", "webllm", "0.10.0").schema(3);
    let current = GraphKey::new("m", "webllm", "0.2.79").schema(3);
    let unmigratable = GraphKey::new("n", "webllm", "0.2.79").schema(1);
    let migratable = GraphKey::new("o", "webllm", "0.2.79").schema(2);
    let newer_schema = GraphKey::new("p", "webllm", "0.2.79").schema(4);
    let stale = GraphKey::new("q", "transformers", "1.0");
    let stale_pinned = GraphKey::new("r", "transformers", "1.0");
    for key in
        [&older_engine, &newer_engine, &current, &unmigratable, &migratable, &newer_schema, &stale, &stale_pinned]
    {
        store.save(key, &graph).unwrap();
    }
    for key in [&stale, &stale_pinned] {
        last_used(&store, key, Duration::from_secs(3 * 86_400));
    }
    let _loaded = store.pin(&stale_pinned);

    let policy = Cleanup {
        unused_for: Some(Duration::from_secs(86_400)),
        current: vec![CurrentEngine { engine: "webllm".into(), version: "0.2.79".into(), schema: 3 }],
    };
    let report = store.cleanup(&policy).unwrap();
    let mut removed: Vec<(String, String)> =
        report.done.iter().map(|(key, why)| (key.model.clone() + " " + &key.engine_version, why.clone())).collect();
    removed.sort();
    assert_eq!(
        removed,
        [
            ("m 0.2.9".to_owned(), "engine version 0.2.9 is older than 0.2.79".to_owned()),
            ("n 0.2.79".to_owned(), "schema 1 cannot be migrated to 3".to_owned()),
            ("q 1.0".to_owned(), "unused for 259200s".to_owned()),
        ]
    );
    assert_eq!(store.list().unwrap().len(), 5);
    assert_eq!(store.stats().unwrap().evicted, 3);
}

#[test]
fn cleanup_orders_pre_release_engine_versions_as_semver() {
    let (_dir, store) = crate::store();
    let graph = Graph::sample(2, 10);
    let older = GraphKey::new("m", "webllm", "0.2.78-sim");
    let current = GraphKey::new("m", "webllm", "0.2.79-sim");
    let newer = GraphKey::new("m", "webllm", "0.2.80-sim");
    for key in [&older, &current, &newer] {
        store.save(key, &graph).unwrap();
    }
    let policy = Cleanup {
        unused_for: None,
        current: vec![CurrentEngine { engine: "webllm".into(), version: "0.2.79-sim".into(), schema: 1 }],
    };
    let report = store.cleanup(&policy).unwrap();
    assert_eq!(report.done, [(older, "engine version 0.2.78-sim is older than 0.2.79-sim".to_owned())]);
    assert!(store.path_of(&current).exists() && store.path_of(&newer).exists());
}
