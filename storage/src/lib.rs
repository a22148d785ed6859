#![doc = include_str!("../README.md")]

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
