//! What the store tidies when it opens, and what it must leave alone: temporary files of dead writers,
//! files on their way out that another process may still put back, old quarantined files, lock files
//! nobody holds; removals of exactly the file listed; notes beside the graphs.

use std::time::Duration;

use usine_storage::{Migrations, StorageConfig, StorageError, StorageManager};

use crate::{Graph, key, store};

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn clearing_what_was_listed_leaves_a_graph_saved_at_its_path_since() {
    let (_dir, store) = store();
    store.save(&key("a"), &Graph::sample(1, 100)).unwrap();
    let listed = store.list().unwrap();
    store.save(&key("a"), &Graph::sample(2, 100)).unwrap(); // another process, between list and remove
    assert!(!store.remove_listed(&listed[0]).unwrap(), "the file listed is gone already");
    assert_eq!(store.get::<Graph>(&key("a")).unwrap().hit(), Some(Graph::sample(2, 100)));
    let listed = store.list().unwrap();
    assert!(store.remove_listed(&listed[0]).unwrap());
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn a_file_on_its_way_out_is_left_to_its_evictor_while_it_is_fresh() {
    let (dir, store) = store();
    // As `remove_exact` leaves it for the instant between its rename and its check, when the file
    // turns out to be a graph just saved by another process and must be put back.
    let aside = store.graphs_dir().join(".evict-0123.graph-42-0");
    std::fs::write(&aside, b"a graph another process is putting back").unwrap();
    drop(StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap());
    assert!(aside.exists(), "swept while its evictor may still restore it");
}

#[test]
fn quarantined_files_are_kept_for_their_time_then_pruned_at_open() {
    let (dir, store) = store();
    let path = store.save(&key("q"), &Graph::sample(3, 1000)).unwrap().path;
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert!(store.get::<Graph>(&key("q")).unwrap().miss().is_some());
    assert_eq!(crate::quarantined(&store).len(), 1);
    drop(StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap());
    assert_eq!(crate::quarantined(&store).len(), 1, "kept for a week by default");
    let keep_none = StorageConfig { quarantine_keep: Duration::ZERO, ..StorageConfig::at(dir.path()) };
    drop(StorageManager::open(keep_none, Migrations::new()).unwrap());
    assert!(crate::quarantined(&store).is_empty());
}

#[test]
fn lock_files_nobody_holds_are_pruned_and_a_held_one_stays_exclusive() {
    let (dir, store) = store();
    let locks = store.graphs_dir().join("locks");
    drop(store.lock(&key("free")).unwrap());
    let held = store.lock(&key("held")).unwrap();
    assert_eq!(names(&locks).len(), 2);
    let other = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    assert_eq!(names(&locks).len(), 1, "the free lock's file is pruned, the held one stays");
    assert!(other.try_lock(&key("held")).unwrap().is_none(), "still held");
    drop(held);
    let again = other.try_lock(&key("held")).unwrap().expect("free now");
    // Pruned while held by nobody but the pruner: a store that opens now must not take it from `again`.
    drop(StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap());
    assert!(store.try_lock(&key("held")).unwrap().is_none(), "two holders of one key");
    drop(again);
    assert!(store.try_lock(&key("held")).unwrap().is_some());
}

#[test]
fn a_locker_that_waited_on_a_pruned_file_takes_the_lock_at_the_path() {
    let (dir, store) = store();
    let first = store.lock(&key("k")).unwrap();
    let waiter = {
        let store = store.clone();
        std::thread::spawn(move || store.lock(&key("k")).unwrap())
    };
    // The waiter blocks on the file; once `first` lets go, a pruning open may unlink it before the waiter
    // wakes. Whichever happens, the waiter must end up holding the lock at the path, alone.
    drop(first);
    drop(StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap());
    let held = waiter.join().unwrap();
    assert!(store.try_lock(&key("k")).unwrap().is_none(), "the waiter's lock is the one at the path");
    drop(held);
}

#[test]
fn notes_are_written_whole_and_their_names_cannot_leave_the_root() {
    let (dir, store) = store();
    assert_eq!(store.read_note("usage.json").unwrap(), None);
    store.write_note("usage.json", b"{\"a\":1}").unwrap();
    store.write_note("usage.json", b"{\"a\":2}").unwrap();
    assert_eq!(store.read_note("usage.json").unwrap().as_deref(), Some(&b"{\"a\":2}"[..]));
    for bad in ["", "../usage.json", "a/b", ".hidden", &"x".repeat(65), "usage\0.json"] {
        let error = store.write_note(bad, b"x").unwrap_err();
        assert!(matches!(error, StorageError::NoteName { .. }), "{bad:?}: {error}");
    }
    // A writer that died mid-write leaves its temporary file in the root; the next open sweeps it.
    let stale = dir.path().join(".tmp-usage.json-dead");
    std::fs::write(&stale, b"{\"a\":").unwrap();
    drop(StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap());
    assert!(!stale.exists());
    assert_eq!(names(dir.path()), ["graphs", "usage.json"]);
}
