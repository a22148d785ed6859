//! The counts of use per model, kept in the store's note `usage.json` across runs (the seed's smart
//! pre-loading: the most used models are warmed at start-up).

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use usine_storage::{StorageError, StorageManager};

const NOTE: &str = "usage.json";
/// Counts are written at most this often as loads happen.
const WRITE_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Usage {
    storage: StorageManager,
    /// The counts, and when they were last written.
    counts: Mutex<(BTreeMap<String, u64>, Option<Instant>)>,
}

impl Usage {
    /// The counts last written to `storage`; none when the note is absent or unreadable (they are
    /// advisory).
    pub(crate) fn read(storage: StorageManager) -> Self {
        let counts = storage
            .read_note(NOTE)
            .ok()
            .flatten()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self { storage, counts: Mutex::new((counts, None)) }
    }

    /// Counts a use of `model`, and writes the counts at most once a second, off the caller's path.
    pub(crate) fn used(&self, model: &str) {
        let mut counts = self.counts.lock();
        *counts.0.entry(model.to_owned()).or_default() += 1;
        let now = Instant::now();
        if counts.1.is_some_and(|last| now - last < WRITE_EVERY) {
            return;
        }
        counts.1 = Some(now);
        let (counts, storage) = (counts.0.clone(), self.storage.clone());
        // Advisory figures: a failed write only loses counts since the last one.
        drop(tokio::task::spawn_blocking(move || write(&storage, &counts)));
    }

    /// The `n` most used models, most used first.
    pub(crate) fn most_used(&self, n: usize) -> Vec<(String, u64)> {
        let counts = self.counts.lock();
        let mut most: Vec<(String, u64)> = counts.0.iter().map(|(model, n)| (model.clone(), *n)).collect();
        most.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        most.truncate(n);
        most
    }

    /// The counts now, and the store to write them to.
    pub(crate) fn snapshot(&self) -> (BTreeMap<String, u64>, StorageManager) {
        (self.counts.lock().0.clone(), self.storage.clone())
    }
}

/// Writes the counts crash-safe (a reader sees the old note or the new one). Writes run on blocking
/// threads in any order and counts only grow: the total is the note's version, so a stale write never
/// overwrites a fresher one.
pub(crate) fn write(storage: &StorageManager, counts: &BTreeMap<String, u64>) -> Result<(), StorageError> {
    let json = serde_json::to_vec(counts).expect("a map of strings to numbers");
    storage.write_note_versioned(NOTE, &json, counts.values().sum()).map(|_| ())
}
