//! Fuzzing the decoder with proptest: arbitrary bytes, and mutations of valid files. Nothing panics, no
//! lying length allocates, and a damaged file is never served as a graph.
//!
//! The case counts are small for `cargo test`; a long run: `PROPTEST_CASES=1000000 cargo test --release
//! -p usine-storage --test it fuzz::`.

use proptest::prelude::*;
use usine_storage::format::{self, Decoded};
use usine_storage::{Header, Lookup, Miss};

use crate::{Graph, key, store};

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = format::decode(&bytes);
    }

    #[test]
    fn bytes_behind_a_valid_prefix_never_panic_the_decoder(
        version in 0u16..3,
        header_len in any::<u32>(),
        rest in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = format::MAGIC.to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&header_len.to_le_bytes());
        bytes.extend_from_slice(&rest);
        let _ = format::decode(&bytes);
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: prop::sample::Index, bit: u8 },
    Truncate { at: prop::sample::Index },
    Insert { at: prop::sample::Index, byte: u8 },
    Overwrite { at: prop::sample::Index, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() && !matches!(mutation, Mutation::Insert { .. }) {
        return; // truncated to nothing already: only an insertion changes it
    }
    match mutation {
        Mutation::Flip { at, bit } => {
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        Mutation::Truncate { at } => bytes.truncate(at.index(bytes.len())),
        Mutation::Insert { at, byte } => bytes.insert(at.index(bytes.len() + 1), *byte),
        Mutation::Overwrite { at, bytes: patch } => {
            let i = at.index(bytes.len());
            for (offset, byte) in patch.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(i + offset) {
                    *slot = *byte;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn a_mutated_file_is_served_only_if_unchanged(mutations in prop::collection::vec(mutation(), 1..4), seed in any::<u8>()) {
        let (_dir, store) = store();
        let original = Graph::sample(seed, 300);
        let saved = store.save(&key("fuzz"), &original).unwrap();
        let pristine = std::fs::read(&saved.path).unwrap();
        let mut bytes = pristine.clone();
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        std::fs::write(&saved.path, &bytes).unwrap();
        match store.get::<Graph>(&key("fuzz")).unwrap() {
            Lookup::Hit(hit) => {
                prop_assert_eq!(&bytes, &pristine, "a changed file was served");
                prop_assert_eq!(hit.graph, original);
            }
            Lookup::Miss(Miss::Corrupt(_)) => prop_assert!(!saved.path.exists(), "quarantined"),
            Lookup::Miss(Miss::NewerFormat { .. }) => {
                let newer = matches!(format::decode(&bytes), Ok(Decoded::Newer { .. }));
                prop_assert!(newer, "a newer format, as the decoder says");
            }
            Lookup::Miss(miss) => prop_assert!(false, "unexpected miss {}", miss),
        }
    }
}

/// Headers that parse or nearly parse, and payloads of any bytes, behind a correct checksum: what a
/// buggy or hostile writer could leave. Whatever the decoder and the codec make of it, nothing panics,
/// and a graph is served only when its header names the key asked for.
fn header_text() -> impl Strategy<Value = Vec<u8>> {
    let valid = serde_json::to_string(&Header {
        format: 1,
        key: key("fuzz"),
        codec: usine_storage::CODEC.into(),
        created_unix_ms: 0,
        payload_len: 0,
        payload_xxh3: String::new(),
        raw_offset: 0,
        raw_len: 0,
    })
    .unwrap();
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        (0..valid.len(), any::<u8>()).prop_map(move |(at, byte)| {
            let mut text = valid.clone().into_bytes();
            text[at] = byte;
            text
        }),
        (1u16..3, 0u64..5000, 0u64..10_000, 0u64..5000).prop_map(|(format, payload_len, raw_offset, raw_len)| {
            serde_json::to_vec(&Header {
                format,
                key: key("fuzz"),
                codec: usine_storage::CODEC.into(),
                created_unix_ms: 0,
                payload_len,
                payload_xxh3: String::new(),
                raw_offset,
                raw_len,
            })
            .unwrap()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn files_with_a_good_checksum_and_any_content_never_panic(
        version in 0u16..3,
        header in header_text(),
        payload in prop::collection::vec(any::<u8>(), 0..5000),
    ) {
        let bytes = crate::corruption::assemble(version, &header, &payload);
        let _ = format::decode(&bytes);
        let (_dir, store) = store();
        std::fs::write(store.path_of(&key("fuzz")), &bytes).unwrap();
        if let Lookup::Hit(hit) = store.get::<Graph>(&key("fuzz")).unwrap() {
            prop_assert_eq!(hit.header.key, key("fuzz"));
        }
    }
}
