//! Errors (the store could not do its job) and misses (no usable graph: compile again).

use std::path::PathBuf;

use crate::key::KeyPart;

/// Everything that can go wrong in `usine-storage`.
///
/// A graph that is absent, corrupt or of an unknown version is not an error but a
/// [`Miss`](crate::Lookup::Miss): the caller compiles again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A file system operation failed.
    #[error("{action} `{}`: {source}", path.display())]
    Io {
        /// What the store was doing ("creating", "reading", ...).
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// No cache folder was configured and the platform has none.
    #[error("no cache folder: set USINE_CACHE_DIR or configure a root")]
    NoCacheDir,
    /// A key part is longer than the limit.
    #[error("key part `{part}` is {len} bytes long; the limit is {limit} bytes")]
    KeyPartTooLong {
        /// Which part.
        part: KeyPart,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The graph could not be encoded.
    #[error("encoding the graph with {codec}: {message}")]
    Encode {
        /// The codec.
        codec: &'static str,
        /// The codec's message.
        message: String,
    },
    /// The file on disk was written by a newer usine; it is left alone.
    #[error("a graph of format {found} (newer than {supported}) is stored under this key; it is left alone")]
    NewerFormat {
        /// The file's format version.
        found: u16,
        /// The newest format this build reads.
        supported: u16,
    },
    /// The graph's file alone would exceed the store's size limit.
    #[error("the graph's file is {bytes} bytes, over the store's size limit of {limit} bytes")]
    ExceedsLimit {
        /// The file's size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The file stored under this key holds its payload in a codec this build does not know; it is
    /// left alone.
    #[error("a graph in codec `{codec}` (unknown here) is stored under this key; it is left alone")]
    UnknownCodec {
        /// The codec the file's header names.
        codec: String,
    },
    /// The remote tier's URL does not name a Redis server.
    #[error("remote `{url}` is not a Redis URL (redis://[user:password@]host[:port][/db]): {message}")]
    RemoteUrl {
        /// The URL, its password hidden.
        url: String,
        /// The client's message.
        message: String,
    },
    /// A remote tier setting out of its range.
    #[error("remote {setting} is {value}; it must be {range}")]
    RemoteSetting {
        /// Which setting.
        setting: &'static str,
        /// Its value.
        value: String,
        /// What it may be.
        range: &'static str,
    },
    /// A note's name that could become a path outside the cache root, or a hidden file.
    #[error("`{name}` is not a note name: 1 to 64 letters, digits, `.`, `-` or `_`, not starting with `.`")]
    NoteName {
        /// The name given.
        name: String,
    },
    /// A migration step failed.
    #[error("migrating `{engine}` graphs from schema {from} to {to}: {message}")]
    Migration {
        /// The engine whose graphs were migrated.
        engine: String,
        /// The schema migrated from.
        from: u32,
        /// The schema migrated to.
        to: u32,
        /// What went wrong.
        message: String,
    },
}

impl StorageError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { action, path, source }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
