//! Schema migrations, step by step, on read and all at once; and the fixtures of every released schema.

use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use usine_storage::{GraphKey, Lookup, Migrations, Miss, MissReason, StorageConfig, StorageManager};

#[path = "../fixtures/schemas.rs"]
#[allow(unreachable_pub, reason = "shared with the example that writes the fixtures")]
mod schemas;

use schemas::{V1, V2, fixture_key, released};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct V3 {
    name: String,
    layers: u32,
    heads: u32,
    kv_bytes_per_token: u64,
}

fn migrations() -> Migrations {
    let mut migrations = Migrations::new();
    migrations.register("webllm", 1, |old: V1| V2 { name: old.name, layers: old.layers, heads: 8 }).register(
        "webllm",
        2,
        |old: V2| V3 {
            kv_bytes_per_token: u64::from(old.layers) * u64::from(old.heads) * 256,
            name: old.name,
            layers: old.layers,
            heads: old.heads,
        },
    );
    migrations
}

fn open(dir: &std::path::Path) -> StorageManager {
    StorageManager::open(StorageConfig::at(dir), migrations()).unwrap()
}

#[test]
fn an_old_schema_is_migrated_two_steps_on_read_and_stored_at_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.save(&fixture_key(1), &V1 { name: "m".into(), layers: 4 }).unwrap();

    let Lookup::Hit(hit) = store.get::<V3>(&fixture_key(3)).unwrap() else { panic!("a miss") };
    assert_eq!(hit.graph, V3 { name: "m".into(), layers: 4, heads: 8, kv_bytes_per_token: 8192 });
    assert_eq!((hit.migrated_from, hit.header.key.schema), (Some(1), 3));
    assert!(!store.path_of(&fixture_key(1)).exists(), "the old file is replaced");
    let Lookup::Hit(again) = store.get::<V3>(&fixture_key(3)).unwrap() else { panic!("a miss") };
    assert_eq!(again.migrated_from, None, "the second read is direct");
}

#[test]
fn migrate_rewrites_every_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.save(&fixture_key(1), &V1 { name: "one".into(), layers: 1 }).unwrap();
    store.save(&fixture_key(2).namespace("b"), &V2 { name: "two".into(), layers: 2, heads: 2 }).unwrap();
    store.save(&GraphKey::new("x", "transformers", "1").schema(1), &V1 { name: "x".into(), layers: 1 }).unwrap();

    let report = store.migrate().unwrap();
    assert_eq!(report.done.len(), 2, "{report:?}");
    assert!(report.failed.is_empty());
    let schemas: Vec<(String, u32)> = store
        .list()
        .unwrap()
        .iter()
        .map(|entry| (entry.header().unwrap().key.model.clone(), entry.header().unwrap().key.schema))
        .collect();
    assert_eq!(schemas.len(), 3);
    assert!(schemas.contains(&("fixture-model".into(), 3)));
    assert!(schemas.contains(&("x".into(), 1)), "no migrations for that engine: untouched");
    assert_eq!(store.get::<V3>(&fixture_key(3).namespace("b")).unwrap().hit().unwrap().kv_bytes_per_token, 2 * 2 * 256);
    assert!(store.migrate().unwrap().done.is_empty(), "nothing left to migrate");
}

#[test]
fn a_failing_migration_is_a_miss_that_leaves_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut failing = Migrations::new();
    failing.register("webllm", 1, |_: V2| V3 { name: String::new(), layers: 0, heads: 0, kv_bytes_per_token: 0 });
    let store = StorageManager::open(StorageConfig::at(dir.path()), failing).unwrap();
    // Stored as V1 but the step expects V2: the step cannot decode it.
    store.save(&fixture_key(1), &V1 { name: "m".into(), layers: 4 }).unwrap();
    let lookup = store.get::<V3>(&fixture_key(2)).unwrap();
    assert!(matches!(lookup.miss(), Some(Miss::MigrationFailed { from: 1, .. })), "{lookup:?}");
    assert!(store.path_of(&fixture_key(1)).exists());
    assert_eq!(store.stats().unwrap().misses(MissReason::MigrationFailed), 1);
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The files of every released format and schema, as saved by the release that introduced them. They are
/// written by `cargo run -p usine-storage --example bless_fixtures` when a new schema or format is
/// released, and committed; this test only reads them.
#[test]
fn fixtures_of_every_released_schema_still_read() {
    for (file, schema) in released() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        fs::copy(fixtures().join(file), store.path_of(&fixture_key(schema))).unwrap();
        assert_eq!(store.verify().unwrap().valid, 1, "{file}");
        let Lookup::Hit(hit) = store.get::<V3>(&fixture_key(3)).unwrap() else { panic!("{file}: a miss") };
        let heads = if schema == 1 { 8 } else { 4 };
        assert_eq!(
            hit.graph,
            V3 { name: "fixture".into(), layers: 12, heads, kv_bytes_per_token: 12 * u64::from(heads) * 256 },
            "{file}"
        );
        assert_eq!(hit.migrated_from, Some(schema));
        assert_eq!((hit.header.format, hit.raw.is_empty()), (2, true), "{file}: saved again in format 2");
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fs::copy(fixtures().join("format1-schema2.graph"), store.path_of(&fixture_key(2))).unwrap();
    let Lookup::Hit(hit) = store.get::<V2>(&fixture_key(2)).unwrap() else { panic!("a miss") };
    assert_eq!(hit.graph, V2 { name: "fixture".into(), layers: 12, heads: 4 }, "read at its own schema, no migration");
    assert_eq!((hit.header.format, hit.raw.is_empty()), (1, true), "format 1: read as format 2 without a raw section");
}
