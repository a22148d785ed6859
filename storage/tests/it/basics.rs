//! Saving, getting, removing, listing, explaining; keys that cannot escape the folder.

use usine_storage::{
    CACHE_DIR_ENV, EntryStatus, GraphKey, KeyPart, Lookup, MAX_KEY_PART_LEN, Miss, MissReason, StorageConfig,
    StorageError,
};

use crate::{Graph, key, store};

#[test]
fn a_saved_graph_comes_back_whole_small_or_mapped() {
    let (_dir, store) = store();
    for (model, len) in [("small", 100), ("mapped", 5 << 20)] {
        let graph = Graph::sample(7, len);
        let saved = store.save(&key(model), &graph).unwrap();
        assert!(saved.path.starts_with(store.graphs_dir()));
        assert!(saved.bytes > len as u64);
        let Lookup::Hit(hit) = store.get::<Graph>(&key(model)).unwrap() else { panic!("a miss") };
        assert_eq!(hit.graph, graph);
        assert_eq!(hit.header.key, key(model));
        assert_eq!(hit.header.payload_len + 14 + 16 + serde_json_len(&hit.header), saved.bytes);
        assert_eq!(hit.migrated_from, None);
    }
    let stats = store.stats().unwrap();
    assert_eq!((stats.graphs, stats.hits, stats.saves), (2, 2, 2));
}

// Would catch: a raw section decoded or copied (its bytes would not be the file's mapping), placed off a
// page boundary, or not returned whole; and small files (read, not mapped) losing theirs.
#[test]
fn a_raw_section_comes_back_from_the_mapping_at_a_page_boundary() {
    let (_dir, store) = store();
    for (model, len, mapped) in [("small", 5000, false), ("large", 6 << 20, true)] {
        let raw: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let graph = Graph::sample(3, 100);
        let saved = store.save_with_raw(&key(model), &graph, &raw).unwrap();
        let Lookup::Hit(hit) = store.get::<Graph>(&key(model)).unwrap() else { panic!("a miss") };
        assert_eq!(hit.graph, graph);
        assert_eq!((hit.raw[..] == raw[..], hit.raw.is_mapped()), (true, mapped), "{model}");
        assert_eq!((hit.header.format, hit.header.raw_len), (2, len as u64));
        assert_eq!(hit.header.raw_offset % 4096, 0);
        assert_eq!(saved.bytes, hit.header.raw_offset + len as u64 + 16);
        if mapped {
            assert_eq!(hit.raw.as_ptr() as usize % 4096, 0, "the mapping starts at a page; so does the section");
        }
        // Without a raw section, none comes back.
        store.save(&key(model), &graph).unwrap();
        let Lookup::Hit(hit) = store.get::<Graph>(&key(model)).unwrap() else { panic!("a miss") };
        assert!(hit.raw.is_empty());
    }
}

// Would catch: a damaged raw section served (the engine would run damaged weights).
#[test]
fn a_flipped_byte_in_a_raw_section_is_caught_and_quarantined() {
    let (_dir, store) = store();
    let raw = vec![7_u8; 3 << 20];
    let saved = store.save_with_raw(&key("m"), &Graph::sample(1, 10), &raw).unwrap();
    let mut bytes = std::fs::read(&saved.path).unwrap();
    let at = bytes.len() - 16 - (1 << 20);
    bytes[at] ^= 0x01;
    std::fs::write(&saved.path, &bytes).unwrap();
    let lookup = store.get::<Graph>(&key("m")).unwrap();
    assert!(matches!(lookup.miss(), Some(Miss::Corrupt(usine_storage::Corruption::Checksum))), "{lookup:?}");
    assert!(!saved.path.exists(), "quarantined");
}

fn serde_json_len(header: &usine_storage::Header) -> u64 {
    serde_json::to_vec(header).unwrap().len() as u64
}

#[test]
fn saving_again_replaces_and_removing_forgets() {
    let (_dir, store) = store();
    store.save(&key("m"), &Graph::sample(1, 10)).unwrap();
    store.save(&key("m"), &Graph::sample(2, 10)).unwrap();
    assert_eq!(store.get::<Graph>(&key("m")).unwrap().hit(), Some(Graph::sample(2, 10)));
    assert!(store.remove(&key("m")).unwrap());
    assert!(!store.remove(&key("m")).unwrap());
    let lookup = store.get::<Graph>(&key("m")).unwrap();
    assert_eq!(lookup.miss(), Some(&Miss::Absent));
    assert_eq!(store.stats().unwrap().misses(MissReason::Absent), 1);
}

#[test]
fn every_key_part_changes_the_file() {
    let base = key("m");
    let variants = [
        base.clone().device("gpu"),
        base.clone().options(&[("context", 4096)]),
        base.clone().schema(2),
        base.clone().namespace("tenant-a"),
        GraphKey::new("m", "transformers", "0.2.79").device("cpu"),
        GraphKey::new("m", "webllm", "0.2.80").device("cpu"),
        GraphKey::new("mm", "webllm", "0.2.79").device("cpu"),
    ];
    for variant in &variants {
        assert_ne!(variant.file_name(), base.file_name(), "{variant}");
        assert_eq!(base.differences(variant).len(), 1, "{variant}");
    }
    // Moving bytes between parts is another key.
    assert_ne!(GraphKey::new("ab", "c", "1").file_name(), GraphKey::new("a", "bc", "1").file_name());
}

#[test]
fn a_hostile_model_id_never_becomes_a_path() {
    let (dir, store) = store();
    let hostile = GraphKey::new("../../../../etc/passwd", "../engine", "/abs/olute");
    let saved = store.save(&hostile, &Graph::sample(3, 10)).unwrap();
    assert_eq!(saved.path.parent(), Some(store.graphs_dir()));
    let name = saved.path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.len() == 38 && name.ends_with(".graph") && name[..32].bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(store.get::<Graph>(&hostile).unwrap().hit(), Some(Graph::sample(3, 10)));
    assert!(!dir.path().parent().unwrap().join("etc").exists());
}

#[test]
fn an_overlong_key_part_is_a_typed_error_with_the_limit() {
    let (_dir, store) = store();
    let long = GraphKey::new("x".repeat(MAX_KEY_PART_LEN + 1), "webllm", "1");
    let err = store.save(&long, &Graph::sample(1, 1)).unwrap_err();
    assert!(matches!(err, StorageError::KeyPartTooLong { part: KeyPart::Model, len: 1025, limit: 1024 }));
    assert_eq!(err.to_string(), "key part `model` is 1025 bytes long; the limit is 1024 bytes");
    assert!(store.get::<Graph>(&long).is_err());
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn listing_reads_headers_without_payloads() {
    let (_dir, store) = store();
    store.save(&key("a"), &Graph::sample(1, 1000)).unwrap();
    store.save(&key("b").schema(2), &Graph::sample(2, 10)).unwrap();
    let entries = store.list().unwrap();
    assert_eq!(entries.len(), 2);
    let mut models: Vec<_> = entries.iter().map(|entry| entry.header().unwrap().key.model.clone()).collect();
    models.sort();
    assert_eq!(models, ["a", "b"]);
    for entry in &entries {
        let EntryStatus::Valid(header) = &entry.status else { panic!("{entry:?}") };
        assert_eq!(header.codec, usine_storage::CODEC);
        assert_eq!(entry.file_name, header.key.file_name());
    }
}

#[test]
fn a_miss_is_explained_part_by_part() {
    let (_dir, store) = store();
    store.save(&key("llama").schema(1), &Graph::sample(1, 10)).unwrap();
    store.save(&GraphKey::new("other", "transformers", "9").device("gpu"), &Graph::sample(2, 10)).unwrap();
    let asked = GraphKey::new("llama", "webllm", "0.2.80").device("cpu").schema(2);
    let explanation = store.explain(&asked).unwrap();
    assert!(!explanation.stored);
    let (closest, differs) = explanation.closest.clone().unwrap();
    assert_eq!(closest.model, "llama");
    assert_eq!(differs, [KeyPart::EngineVersion, KeyPart::Schema]);
    assert_eq!(
        explanation.to_string(),
        "no graph is stored for llama on webllm 0.2.80 for cpu (schema 2); the closest stored graph differs in \
         engine_version (0.2.79 stored, 0.2.80 asked), schema (1 stored, 2 asked)"
    );
    assert!(store.explain(&key("llama")).unwrap().stored);
}

#[test]
fn the_root_comes_from_the_environment_or_the_platform() {
    let set = StorageConfig::from_override(Some("/srv/usine-cache".into())).unwrap();
    assert_eq!(set.root, std::path::PathBuf::from("/srv/usine-cache"));
    for unset in [None, Some("".into())] {
        let root = StorageConfig::from_override(unset).unwrap().root;
        assert!(root.ends_with("usine") && root.is_absolute(), "{}", root.display());
    }
    let from_env = StorageConfig::from_env().unwrap().root;
    match std::env::var_os(CACHE_DIR_ENV) {
        Some(dir) if !dir.is_empty() => assert_eq!(from_env, std::path::PathBuf::from(dir)),
        _ => assert!(from_env.ends_with("usine")),
    }
}
