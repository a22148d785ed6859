//! Compiled graphs on disk: compile a model once, load it fast ever after.
//!
//! A [`StorageManager`] keeps the graphs that engines compile in `graphs/` under a cache root, one
//! file per [`GraphKey`]. Files are written crash-safely (temporary file, sync, rename, sync of the
//! folder), checked on every read (XXH3-128 over the whole file), and named by a digest of the key, so
//! no user string becomes a path. A damaged file is quarantined and reported as a [`Miss`]: the caller
//! compiles again. Older schemas are upgraded by [`Migrations`]; files of a newer usine are left alone.
//! A size limit evicts the least recently used graphs, never a [pinned](StorageManager::pin) one.
//! Processes that share the folder coordinate through per-key [locks](StorageManager::lock).
//!
//! The file format is described in [`format`].
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use usine_storage::{GraphKey, Lookup, Migrations, StorageConfig, StorageManager};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct Compiled { kernels: Vec<String> }
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let store = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new())?;
//! let key = GraphKey::new("tiny-llama", "webllm", "0.2.79").device("cpu");
//!
//! assert!(matches!(store.get::<Compiled>(&key)?, Lookup::Miss(_))); // compile, then save
//! store.save(&key, &Compiled { kernels: vec!["matmul".into()] })?;
//!
//! let graph = store.get::<Compiled>(&key)?.hit().expect("saved just above");
//! assert_eq!(graph.kernels, ["matmul"]);
//! # Ok::<(), usine_storage::StorageError>(())
//! ```

mod codec;
mod error;
pub mod format;
mod key;
mod maintain;
pub mod metrics;
mod migrate;
mod store;

pub use codec::CODEC;
pub use error::{Result, StorageError};
pub use format::{Corruption, Header};
pub use key::{GraphKey, KeyPart, MAX_KEY_PART_LEN};
pub use maintain::{
    Cleanup, CurrentEngine, Entry, EntryStatus, Explanation, Maintenance, Pin, StorageStats, VerifyReport,
};
pub use migrate::Migrations;
pub use store::{
    CACHE_DIR_ENV, DEFAULT_MAP_THRESHOLD, DEFAULT_QUARANTINE_KEEP, Hit, KeyLock, Lookup, Miss, MissReason, RawBytes,
    Saved, StorageConfig, StorageManager,
};
