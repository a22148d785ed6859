//! Damaged files: each case is a typed miss, the file goes to quarantine and is counted, nothing panics,
//! and no lying length makes the decoder allocate what the file does not hold.

use std::fs;
use std::path::Path;

use twox_hash::XxHash3_128;
use usine_storage::format::{FORMAT_VERSION, MAGIC, MAX_HEADER_LEN};
use usine_storage::{Corruption, GraphKey, Header, Lookup, Miss, MissReason, StorageError, StorageManager};

use crate::{Graph, key, quarantined, store};

/// A file of `version` with this header and payload and a correct checksum: damaged only where asked.
pub(crate) fn assemble(version: u16, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(payload);
    let sum = XxHash3_128::oneshot(&bytes);
    bytes.extend_from_slice(&sum.to_le_bytes());
    bytes
}

/// Recomputes the trailer after a deliberate change, so that the decoder looks past the checksum.
fn reseal(bytes: &mut [u8]) {
    let body = bytes.len() - 16;
    let sum = XxHash3_128::oneshot(&bytes[..body]);
    bytes[body..].copy_from_slice(&sum.to_le_bytes());
}

fn header_json(key: &GraphKey, codec: &str, payload_len: u64) -> Vec<u8> {
    serde_json::to_vec(&Header {
        format: FORMAT_VERSION,
        key: key.clone(),
        codec: codec.into(),
        created_unix_ms: 0,
        payload_len,
        payload_xxh3: String::new(),
        raw_offset: 0,
        raw_len: 0,
    })
    .unwrap()
}

/// Saves a sample graph under `model`, damages its file with `damage`, and reads it back.
fn damaged(store: &StorageManager, model: &str, damage: impl FnOnce(&mut Vec<u8>)) -> Lookup<Graph> {
    let saved = store.save(&key(model), &Graph::sample(9, 4096)).unwrap();
    let mut bytes = fs::read(&saved.path).unwrap();
    damage(&mut bytes);
    fs::write(&saved.path, &bytes).unwrap();
    store.get::<Graph>(&key(model)).unwrap()
}

#[track_caller]
fn assert_corrupt(lookup: &Lookup<Graph>, expected: impl Fn(&Corruption) -> bool, store: &StorageManager, model: &str) {
    match lookup.miss() {
        Some(Miss::Corrupt(corruption)) => assert!(expected(corruption), "{corruption:?}"),
        other => panic!("expected a corrupt miss, got {other:?}"),
    }
    assert!(!store.path_of(&key(model)).exists(), "moved out of the way");
    let name = key(model).file_name();
    assert!(quarantined(store).iter().any(|file| file.starts_with(&name)), "{:?}", quarantined(store));
}

#[test]
fn every_kind_of_damage_is_a_typed_miss_and_quarantined() {
    let (_dir, store) = store();
    let lookup = damaged(&store, "truncated", |bytes| bytes.truncate(bytes.len() - 100));
    assert_corrupt(&lookup, |c| *c == Corruption::Checksum, &store, "truncated");

    let lookup = damaged(&store, "flipped", |bytes| {
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
    });
    assert_corrupt(&lookup, |c| *c == Corruption::Checksum, &store, "flipped");

    let lookup = damaged(&store, "magic", |bytes| bytes[0] = b'X');
    assert_corrupt(&lookup, |c| *c == Corruption::BadMagic, &store, "magic");

    let lookup = damaged(&store, "empty", Vec::clear);
    assert_corrupt(&lookup, |c| matches!(c, Corruption::Truncated { len: 0, min: 30 }), &store, "empty");

    let lookup = damaged(&store, "short", |bytes| bytes.truncate(20));
    assert_corrupt(&lookup, |c| matches!(c, Corruption::Truncated { len: 20, .. }), &store, "short");

    let lookup = damaged(&store, "header-len", |bytes| {
        bytes[10..14].copy_from_slice(&60_000u32.to_le_bytes());
        reseal(bytes);
    });
    assert_corrupt(
        &lookup,
        |c| matches!(c, Corruption::BadLength { field: "header", claimed: 60_000, .. }),
        &store,
        "header-len",
    );

    let lookup = damaged(&store, "huge-header", |bytes| {
        bytes[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(bytes);
    });
    assert_corrupt(
        &lookup,
        |c| matches!(c, Corruption::BadLength { claimed, actual, .. } if *claimed == u64::from(u32::MAX) && *actual == u64::from(MAX_HEADER_LEN)),
        &store,
        "huge-header",
    );

    let stats = store.stats().unwrap();
    assert_eq!((stats.quarantined, stats.misses(MissReason::Corrupt), stats.hits), (7, 7, 0));
}

#[test]
fn a_header_that_lies_about_the_payload_is_caught_even_with_a_good_checksum() {
    let (_dir, store) = store();
    let key = key("liar");
    let payload = vec![0u8; 64];
    let bytes = assemble(FORMAT_VERSION, &header_json(&key, usine_storage::CODEC, 1 << 40), &payload);
    fs::write(store.path_of(&key), bytes).unwrap();
    let lookup = store.get::<Graph>(&key).unwrap();
    assert_eq!(
        lookup.miss(),
        Some(&Miss::Corrupt(Corruption::BadLength { field: "payload", claimed: 1 << 40, actual: 64 }))
    );
}

#[test]
fn a_payload_with_a_lying_inner_length_fails_without_allocating_it() {
    let (_dir, store) = store();
    let key = key("inner-liar");
    // `Graph.name` claims 2^60 bytes; the payload holds 8.
    let payload = (1u64 << 60).to_le_bytes().to_vec();
    let bytes = assemble(FORMAT_VERSION, &header_json(&key, usine_storage::CODEC, 8), &payload);
    fs::write(store.path_of(&key), bytes).unwrap();
    let lookup = store.get::<Graph>(&key).unwrap();
    assert!(matches!(lookup.miss(), Some(Miss::Undecodable { .. })), "{lookup:?}");
    assert_eq!(store.stats().unwrap().misses(MissReason::Undecodable), 1);
}

#[test]
fn a_whole_graph_read_as_another_type_is_undecodable_and_left_alone() {
    let (_dir, store) = store();
    store.save(&key("typed"), &Graph::sample(1, 100)).unwrap();
    let lookup = store.get::<(u64, u64, u64, u64, u64, u64, u64, u64)>(&key("typed")).unwrap();
    assert!(matches!(lookup.miss(), Some(Miss::Undecodable { .. })), "{lookup:?}");
    assert!(quarantined(&store).is_empty(), "not damage: the caller's type changed");
    assert_eq!(store.get::<Graph>(&key("typed")).unwrap().hit(), Some(Graph::sample(1, 100)));
}

#[test]
fn a_flipped_version_bit_is_damage_not_a_newer_format() {
    let (_dir, store) = store();
    let lookup = damaged(&store, "version", |bytes| bytes[9] ^= 0x01); // version 1 reads as 257
    assert_corrupt(&lookup, |c| *c == Corruption::Checksum, &store, "version");
}

#[test]
fn a_file_renamed_to_another_keys_name_is_a_key_mismatch() {
    let (_dir, store) = store();
    let a = store.save(&key("a"), &Graph::sample(1, 10)).unwrap();
    let b_key = GraphKey::new("b", "webllm", "0.2.80").device("cpu");
    fs::copy(&a.path, store.path_of(&b_key)).unwrap();
    let lookup = store.get::<Graph>(&b_key).unwrap();
    assert_eq!(
        lookup.miss(),
        Some(&Miss::KeyMismatch {
            differs: vec![usine_storage::KeyPart::Model, usine_storage::KeyPart::EngineVersion]
        })
    );
    assert_eq!(
        lookup.miss().unwrap().to_string(),
        "the file holds another key (differs in model, engine_version); quarantined"
    );
    assert!(!store.path_of(&b_key).exists());
    assert_eq!(store.get::<Graph>(&key("a")).unwrap().hit(), Some(Graph::sample(1, 10)), "the original is untouched");
    assert_eq!(store.stats().unwrap().misses(MissReason::KeyMismatch), 1);
}

#[test]
fn a_file_from_a_newer_usine_is_neither_served_nor_touched_nor_overwritten() {
    let (_dir, store) = store();
    let key = key("future");
    let future = assemble(FORMAT_VERSION + 1, b"{\"whatever\": \"the future holds\"}", b"payload");
    let path = store.path_of(&key);
    fs::write(&path, &future).unwrap();

    let lookup = store.get::<Graph>(&key).unwrap();
    let (found, supported) = (FORMAT_VERSION + 1, FORMAT_VERSION);
    assert_eq!(lookup.miss(), Some(&Miss::NewerFormat { found, supported }));
    let err = store.save(&key, &Graph::sample(1, 10)).unwrap_err();
    assert!(matches!(err, StorageError::NewerFormat { found: 3, supported: 2 }), "{err}");
    let report = store.verify().unwrap();
    assert_eq!((report.newer, report.valid, report.quarantined.len()), (1, 0, 0));
    assert_eq!(fs::read(&path).unwrap(), future, "left exactly as it was");
    assert!(quarantined(&store).is_empty());
    assert_eq!(store.stats().unwrap().misses(MissReason::UnsupportedVersion), 1);
}

#[test]
fn a_payload_in_an_unknown_codec_is_left_alone() {
    let (_dir, store) = store();
    let key = key("wincode");
    let bytes = assemble(FORMAT_VERSION, &header_json(&key, "wincode-1", 4), b"abcd");
    fs::write(store.path_of(&key), &bytes).unwrap();
    assert_eq!(store.get::<Graph>(&key).unwrap().miss(), Some(&Miss::UnknownCodec { codec: "wincode-1".into() }));
    let err = store.save(&key, &Graph::sample(1, 10)).unwrap_err();
    assert!(matches!(&err, StorageError::UnknownCodec { codec } if codec == "wincode-1"), "{err}");
    assert_eq!(fs::read(store.path_of(&key)).unwrap(), bytes, "left exactly as it was");
}

#[test]
fn verify_quarantines_what_is_damaged_and_keeps_the_rest() {
    let (_dir, store) = store();
    store.save(&key("good"), &Graph::sample(1, 100)).unwrap();
    let bad = store.save(&key("bad"), &Graph::sample(2, 100)).unwrap();
    let mut bytes = fs::read(&bad.path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&bad.path, bytes).unwrap();
    let renamed = store.save(&key("renamed"), &Graph::sample(3, 100)).unwrap();
    fs::rename(&renamed.path, store.graphs_dir().join(key("elsewhere").file_name())).unwrap();
    fs::write(store.graphs_dir().join("0000.graph"), b"").unwrap();

    let report = store.verify().unwrap();
    assert_eq!(report.valid, 1);
    let mut reasons: Vec<&str> = report.quarantined.iter().map(|(_, reason)| reason.as_str()).collect();
    reasons.sort_unstable();
    assert_eq!(reasons, ["checksum", "key_mismatch", "truncated"]);
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(quarantined(&store).len(), 3);
}

/// Files left in the folder by something other than usine are not graphs and are not touched.
#[test]
fn foreign_files_are_ignored() {
    let (_dir, store) = store();
    let readme = store.graphs_dir().join("README.txt");
    fs::write(&readme, "mine").unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(Path::new(&readme).exists());
}
