//! Graph files brought from another store: stored only when whole, verified and of the key asked for.

use usine_storage::{Corruption, Lookup, Miss, StorageConfig, StorageManager};

use crate::{Graph, key, store};

/// The file another host's store wrote for `model`.
fn published(model: &str, graph: &Graph) -> Vec<u8> {
    let (_dir, other) = store();
    other.save(&key(model), graph).unwrap();
    std::fs::read(other.path_of(&key(model))).unwrap()
}

/// Would catch: an import that writes nothing, writes it elsewhere, or serves a different graph.
#[test]
fn a_whole_file_imported_in_pieces_is_served() {
    let graph = Graph::sample(7, 300_000);
    let bytes = published("llama", &graph);
    let (_dir, store) = store();
    let mut import = store.begin_import(&key("llama"), bytes.len() as u64).unwrap();
    for piece in bytes.chunks(65_536) {
        import.write(piece).unwrap();
    }
    assert_eq!(import.written(), bytes.len() as u64);
    let saved = import.commit().unwrap().unwrap();
    assert_eq!((saved.path, saved.bytes), (store.path_of(&key("llama")), bytes.len() as u64));
    assert_eq!(store.get::<Graph>(&key("llama")).unwrap().hit().unwrap(), graph);
    assert_eq!(&store.file_bytes(&key("llama")).unwrap().unwrap()[..], &bytes[..]);
}

/// Would catch: a damaged, truncated or foreign file taking a key's place, or a temporary file left
/// behind by a refused import.
#[test]
fn a_damaged_truncated_or_foreign_file_is_refused_and_leaves_nothing() {
    let bytes = published("llama", &Graph::sample(3, 50_000));
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 1;
    let cases: [(&str, &[u8], &str, u64); 4] = [
        ("flipped", &flipped, "llama", bytes.len() as u64),
        ("truncated", &bytes[..bytes.len() - 9], "llama", bytes.len() as u64 - 9),
        ("short of its length", &bytes[..bytes.len() - 9], "llama", bytes.len() as u64),
        ("foreign", &bytes, "qwen", bytes.len() as u64),
    ];
    for (case, file, model, len) in cases {
        let (dir, store) = store();
        let mut import = store.begin_import(&key(model), len).unwrap();
        for piece in file.chunks(10_000) {
            import.write(piece).unwrap();
        }
        let miss = import.commit().unwrap().unwrap_err();
        match case {
            "foreign" => assert!(matches!(miss, Miss::KeyMismatch { .. }), "{case}: {miss:?}"),
            "short of its length" => assert!(matches!(miss, Miss::Corrupt(Corruption::Truncated { .. })), "{miss:?}"),
            _ => assert!(matches!(miss, Miss::Corrupt(Corruption::Checksum)), "{case}: {miss:?}"),
        }
        assert!(matches!(store.get::<Graph>(&key(model)).unwrap(), Lookup::Miss(Miss::Absent)), "{case}");
        let left: Vec<_> = std::fs::read_dir(store.graphs_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|name| name == "quarantine" || name == "locks"), "{case}: {left:?}");
        drop(dir);
    }
}

/// Would catch: an import past the store's size limit filling the disk before it is refused, or one
/// that goes on past the length it announced.
#[test]
fn an_import_over_the_size_limit_or_past_its_length_is_refused() {
    let bytes = published("llama", &Graph::sample(5, 200_000));
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig::at(dir.path()).max_bytes(Some(100_000));
    let store = StorageManager::open(config, usine_storage::Migrations::new()).unwrap();
    let error = store.begin_import(&key("llama"), bytes.len() as u64).unwrap_err();
    let limit = format!("the graph's file is {} bytes, over the store's size limit of 100000 bytes", bytes.len());
    assert_eq!(error.to_string(), limit);
    let mut import = store.begin_import(&key("llama"), 60_000).unwrap();
    import.write(&bytes[..60_000]).unwrap();
    let error = import.write(&bytes[60_000..60_001]).unwrap_err().to_string();
    assert!(error.contains("more than 60000 bytes"), "{error}");
    assert!(store.stored_len(&key("llama")).is_none());
}

/// Would catch: an import that only works where direct writes do. In a memory file system (`/dev/shm`,
/// where the kernel may refuse `O_DIRECT`), the same file comes in whole; skipped where there is none.
#[test]
fn an_import_into_a_memory_file_system_is_served_too() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let graph = Graph::sample(9, 100_000);
    let bytes = published("llama", &graph);
    let dir = tempfile::tempdir_in(shm).unwrap();
    let store = StorageManager::open(StorageConfig::at(dir.path()), usine_storage::Migrations::new()).unwrap();
    let mut import = store.begin_import(&key("llama"), bytes.len() as u64).unwrap();
    import.write(&bytes).unwrap();
    import.commit().unwrap().unwrap();
    assert_eq!(store.get::<Graph>(&key("llama")).unwrap().hit().unwrap(), graph);
}
