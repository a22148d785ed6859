//! Integration tests of `usine-storage`: one test binary, one module per capability.

#![allow(clippy::cast_possible_truncation, reason = "test patterns wrap bytes on purpose")]
#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

mod basics;
pub(crate) mod corruption;
mod crash;
mod full;
mod fuzz;
mod housekeeping;
mod imports;
mod locks;
mod migrations;
mod model;
mod retention;
mod telemetry;

use serde::{Deserialize, Serialize};
use tempfile::TempDir;
use usine_storage::{GraphKey, Migrations, StorageConfig, StorageManager};

/// A compiled graph as an engine might keep it: a few fields and a large blob of bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Graph {
    name: String,
    layers: u32,
    #[serde(with = "serde_bytes")]
    weights: Vec<u8>,
}

impl Graph {
    fn sample(seed: u8, len: usize) -> Self {
        Self {
            name: format!("graph-{seed}"),
            layers: u32::from(seed) + 1,
            weights: (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect(),
        }
    }
}

fn key(model: &str) -> GraphKey {
    GraphKey::new(model, "webllm", "0.2.79").device("cpu")
}

/// A store in a fresh temporary folder, without migrations or size limit.
fn store() -> (TempDir, StorageManager) {
    let dir = tempfile::tempdir().unwrap();
    let store = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    (dir, store)
}

/// The names of the files in the quarantine folder.
fn quarantined(store: &StorageManager) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.quarantine_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Runs one test of this binary in a child process, in child mode: `env` names the folder it works in.
fn spawn_child(test: &str, env: &str, dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}
