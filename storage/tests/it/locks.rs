//! Per-key locks across threads and across processes: one compiles, the others wait and then read.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use usine_storage::{Migrations, StorageConfig, StorageManager};

use crate::{Graph, key, spawn_child, store};

const CHILD_DIR: &str = "USINE_TEST_LOCK_HOLDER_DIR";

#[test]
fn concurrent_loaders_of_one_key_compile_it_once() {
    let (_dir, store) = store();
    let compiles = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (store, compiles) = (store.clone(), Arc::clone(&compiles));
            std::thread::spawn(move || {
                let _lock = store.lock(&key("shared")).unwrap();
                if let Some(graph) = store.get::<Graph>(&key("shared")).unwrap().hit() {
                    return graph;
                }
                compiles.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20)); // compiling
                let graph = Graph::sample(5, 1000);
                store.save(&key("shared"), &graph).unwrap();
                graph
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap(), Graph::sample(5, 1000));
    }
    assert_eq!(compiles.load(Ordering::SeqCst), 1);
}

/// Holds the lock of `key("held")` in a child process until it is killed. Run as a plain test, it
/// checks the same lock from two threads of this process.
#[test]
fn holder() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        let store = StorageManager::open(StorageConfig::at(&dir), Migrations::new()).unwrap();
        let _lock = store.lock(&key("held")).unwrap();
        std::fs::write(std::path::Path::new(&dir).join("locked"), b"").unwrap();
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let (_dir, store) = store();
    let lock = store.lock(&key("held")).unwrap();
    let other = store.clone();
    assert!(std::thread::spawn(move || other.try_lock(&key("held")).unwrap().is_none()).join().unwrap());
    assert!(store.try_lock(&key("other")).unwrap().is_some(), "other keys are free");
    drop(lock);
    assert!(store.try_lock(&key("held")).unwrap().is_some());
}

#[test]
fn a_lock_held_by_another_process_is_released_when_it_dies() {
    let (dir, store) = store();
    let mut child = spawn_child("locks::holder", CHILD_DIR, dir.path());
    let started = Instant::now();
    while !dir.path().join("locked").exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "the child never took the lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(store.try_lock(&key("held")).unwrap().is_none(), "held by the child");
    child.kill().unwrap(); // SIGKILL: no chance to unlock by hand
    child.wait().unwrap();
    assert!(store.try_lock(&key("held")).unwrap().is_some(), "released by the child's death");
}
