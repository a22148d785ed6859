#![doc = include_str!("../README.md")]

mod codec;
mod error;
pub mod format;
mod import;
mod key;
mod maintain;
pub mod metrics;
mod migrate;
#[cfg(feature = "remote")]
pub mod remote;
mod store;

pub use codec::CODEC;
pub use error::{Result, StorageError};
pub use format::{Corruption, Header};
pub use import::Import;
pub use key::{GraphKey, KeyPart, MAX_KEY_PART_LEN};
pub use maintain::{
    Cleanup, CurrentEngine, Entry, EntryStatus, Explanation, Maintenance, Pin, StorageStats, VerifyReport,
};
pub use migrate::Migrations;
pub use store::{
    CACHE_DIR_ENV, DEFAULT_MAP_THRESHOLD, DEFAULT_QUARANTINE_KEEP, Hit, KeyLock, Lookup, Miss, MissReason, RawBytes,
    Saved, StorageConfig, StorageManager,
};

/// `url` with any password replaced by `***` (`redis://user:***@host:6379/0`): a server's address
/// fit for logs and listings.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}
