//! Crash safety, for real: a child process saves graphs in a loop and is killed with SIGKILL at random
//! moments, many times. After each kill the store opens, sweeps the dead writer's temporary files, and
//! every graph is whole and valid, or absent; never served torn, never quarantined.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use usine_storage::{GraphKey, Lookup, Migrations, StorageConfig, StorageManager};

use crate::{quarantined, spawn_child};

const CHILD_DIR: &str = "USINE_TEST_CRASH_WRITER_DIR";
const KEYS: u64 = 6;
const ROUNDS: u64 = 40;

/// A graph whose every byte follows from its key and generation, so a torn one cannot pass for whole.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Written {
    key: u64,
    generation: u64,
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

impl Written {
    fn new(key: u64, generation: u64) -> Self {
        // From 64 KiB to about 8 MiB, so that kills land in the middle of writes; cheap to build, so
        // that the writer spends its time writing.
        let len = (1 + ((key * 7919 + generation * 104_729) % 128) as usize) * 64 * 1024;
        Self { key, generation, bytes: vec![fill(key, generation); len] }
    }

    fn is_consistent(&self, key: u64) -> bool {
        let fill = fill(key, self.generation);
        self.key == key
            && self.bytes.len() == Self::new(key, self.generation).bytes.len()
            && self.bytes.iter().all(|&b| b == fill)
    }
}

fn fill(key: u64, generation: u64) -> u8 {
    (key * 31 + generation * 17) as u8
}

fn graph_key(index: u64) -> GraphKey {
    GraphKey::new(format!("crash-{index}"), "webllm", "1").device("cpu")
}

/// Writes forever when run as the child of the crash test; run as a plain test, writes a few rounds
/// and reads them back.
#[test]
fn writer() {
    let child = std::env::var_os(CHILD_DIR);
    let dir = tempfile::tempdir().unwrap();
    let root = child.clone().map_or_else(|| dir.path().to_owned(), std::path::PathBuf::from);
    let store = StorageManager::open(StorageConfig::at(&root), Migrations::new()).unwrap();
    std::fs::write(root.join("writing"), b"").unwrap(); // the parent times its kill from here
    let start = u64::from(std::process::id()) * 1000; // generations differ between children
    for generation in start.. {
        for key in 0..KEYS {
            store.save(&graph_key(key), &Written::new(key, generation)).unwrap();
        }
        if child.is_none() && generation == start + 2 {
            break;
        }
    }
    for key in 0..KEYS {
        let graph = store.get::<Written>(&graph_key(key)).unwrap().hit().unwrap();
        assert_eq!((graph.generation, graph.is_consistent(key)), (start + 2, true));
    }
}

#[test]
fn killed_writers_never_leave_a_torn_graph() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 0x5EED_u64;
    let (mut served, mut absent, mut torn_writes) = (0, 0, 0);
    for round in 0..ROUNDS {
        let _ = std::fs::remove_file(dir.path().join("writing"));
        let mut child = spawn_child("crash::writer", CHILD_DIR, dir.path());
        while !dir.path().join("writing").exists() {
            std::thread::sleep(Duration::from_micros(200));
        }
        if round % 2 == 0 {
            // At a random moment: wherever the writer happens to be.
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            std::thread::sleep(Duration::from_micros(500 + (seed >> 33) % 40_000));
        } else {
            // In the middle of a write, whatever the disk's speed: frozen with a temporary file half
            // written and an earlier graph already saved.
            freeze_mid_write(&child, &dir.path().join("graphs"));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        // The writer was killed in the middle of a write when its temporary file is still there.
        let graphs = dir.path().join("graphs");
        torn_writes += std::fs::read_dir(&graphs)
            .unwrap()
            .filter(|entry| entry.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-"))
            .count();
        let store = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(store.graphs_dir())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files survived the sweep: {leftovers:?}");
        for key in 0..KEYS {
            match store.get::<Written>(&graph_key(key)).unwrap() {
                Lookup::Hit(hit) => {
                    assert!(hit.graph.is_consistent(key), "key {key}: served a graph that is not whole");
                    served += 1;
                }
                Lookup::Miss(usine_storage::Miss::Absent) => absent += 1,
                Lookup::Miss(miss) => panic!("key {key}: {miss}"),
            }
        }
        assert!(quarantined(&store).is_empty(), "nothing was torn, so nothing is quarantined");
    }
    assert!(served > 0, "the writers got graphs to disk ({absent} lookups found none)");
    eprintln!("{ROUNDS} kills, {torn_writes} in the middle of a write; {served} graphs served whole, {absent} absent");
    assert!(torn_writes as u64 >= ROUNDS / 2, "every other kill lands in the middle of a write");
    // A SIGKILL stops the process, not the machine: the fsyncs that make a write survive a power cut
    // are in the code (`write_atomically`, `sync_dir`) but cannot be observed here.
}

/// Stops `child` (SIGSTOP) at a moment when `graphs` holds a saved graph and a temporary file with
/// bytes in it; until then, lets it run a little more at a time.
fn freeze_mid_write(child: &std::process::Child, graphs: &std::path::Path) {
    let pid = child.id().to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill").args([name, &pid]).status().unwrap();
        assert!(status.success(), "kill {name} {pid}");
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        signal("-STOP");
        // The signal is asynchronous: wait until the kernel reports the process stopped (state `T`).
        while !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap().contains(") T ") {
            std::thread::yield_now();
        }
        let (mut saved, mut writing) = (false, false);
        for entry in std::fs::read_dir(graphs).into_iter().flatten() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                writing |= entry.metadata().is_ok_and(|meta| meta.len() > 0);
            } else {
                saved |= entry.file_type().unwrap().is_file();
            }
        }
        if saved && writing {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the writer never got to the middle of a write");
        signal("-CONT");
        std::thread::sleep(Duration::from_micros(100));
    }
}
