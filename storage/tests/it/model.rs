//! Model-based test: random saves, gets, removes and pins under a size limit, against a plain model
//! of an LRU store.

use std::collections::BTreeMap;

use proptest::prelude::*;
use usine_storage::{Lookup, Migrations, Miss, Pin, StorageConfig, StorageManager};

use crate::{Graph, key};

const KEYS: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    Save { key: usize, seed: u8, len: usize },
    Get { key: usize },
    Remove { key: usize },
    Pin { key: usize },
    Unpin,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS, any::<u8>(), 0..3000usize).prop_map(|(key, seed, len)| Op::Save { key, seed, len }),
        4 => (0..KEYS).prop_map(|key| Op::Get { key }),
        1 => (0..KEYS).prop_map(|key| Op::Remove { key }),
        1 => (0..KEYS).prop_map(|key| Op::Pin { key }),
        1 => Just(Op::Unpin),
    ]
}

struct Stored {
    graph: Graph,
    bytes: u64,
    last_use: u64,
}

fn name(index: usize) -> String {
    format!("model-{index}")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_store_agrees_with_an_lru_model(ops in prop::collection::vec(op(), 1..40), limit in 2000u64..9000) {
        let dir = tempfile::tempdir().unwrap();
        let store = StorageManager::open(StorageConfig::at(dir.path()).max_bytes(Some(limit)), Migrations::new()).unwrap();
        let mut model: BTreeMap<usize, Stored> = BTreeMap::new();
        let mut pins: Vec<(usize, Pin)> = Vec::new();
        let mut tick = 0u64;
        for op in ops {
            tick += 1;
            match op {
                Op::Save { key: k, seed, len } => {
                    let graph = Graph::sample(seed, len);
                    let saved = match store.save(&key(&name(k)), &graph) {
                        Ok(saved) => saved,
                        Err(usine_storage::StorageError::ExceedsLimit { bytes, limit: refused }) => {
                            prop_assert!(bytes > limit && refused == limit);
                            continue; // refused before writing: the store is unchanged
                        }
                        Err(error) => panic!("{error}"),
                    };
                    model.insert(k, Stored { graph, bytes: saved.bytes, last_use: tick });
                    // Evict in LRU order, skipping pinned graphs, until under the limit.
                    let mut expected = Vec::new();
                    let mut order: Vec<(u64, usize)> = model.iter().map(|(k, s)| (s.last_use, *k)).collect();
                    order.sort_unstable();
                    let mut total: u64 = model.values().map(|s| s.bytes).sum();
                    for (_, k) in order {
                        if total <= limit {
                            break;
                        }
                        if pins.iter().any(|(pinned, _)| *pinned == k) {
                            continue;
                        }
                        total -= model.remove(&k).unwrap().bytes;
                        expected.push(key(&name(k)));
                    }
                    let mut evicted = saved.evicted.clone();
                    evicted.sort_by(|a, b| a.model.cmp(&b.model));
                    expected.sort_by(|a, b| a.model.cmp(&b.model));
                    prop_assert_eq!(evicted, expected);
                }
                Op::Get { key: k } => match (store.get::<Graph>(&key(&name(k))).unwrap(), model.get_mut(&k)) {
                    (Lookup::Hit(hit), Some(stored)) => {
                        prop_assert_eq!(&hit.graph, &stored.graph);
                        stored.last_use = tick;
                    }
                    (Lookup::Miss(Miss::Absent), None) => {}
                    (lookup, stored) => prop_assert!(false, "store {:?}, model has it: {}", lookup.miss(), stored.is_some()),
                },
                Op::Remove { key: k } => {
                    prop_assert_eq!(store.remove(&key(&name(k))).unwrap(), model.remove(&k).is_some());
                }
                Op::Pin { key: k } => pins.push((k, store.pin(&key(&name(k))))),
                Op::Unpin => {
                    pins.pop();
                }
            }
            let mut stored: Vec<String> =
                store.list().unwrap().iter().map(|entry| entry.header().unwrap().key.model.clone()).collect();
            stored.sort();
            let expected: Vec<String> = model.keys().map(|k| name(*k)).collect();
            prop_assert_eq!(stored, expected);
        }
    }
}
