//! Graph files brought from elsewhere (another host's store, through the remote tier): written beside
//! their place as they arrive, verified whole, then renamed into place like a save. A damaged or foreign
//! file never takes the place of a graph.

use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::Ordering;

use crate::CODEC;
use crate::error::{Result, StorageError};
use crate::format::{self, Decoded, FORMAT_VERSION};
use crate::key::GraphKey;
use crate::store::{Miss, Saved, StorageManager};

/// A graph file on its way into the store: [`write`](Self::write) its bytes in order, then
/// [`commit`](Self::commit). Dropped uncommitted, it leaves nothing behind.
#[derive(Debug)]
pub struct Import {
    store: StorageManager,
    key: GraphKey,
    temp: tempfile::NamedTempFile,
    written: u64,
}

impl StorageManager {
    /// Starts bringing in the file of `key`'s graph from elsewhere.
    pub fn begin_import(&self, key: &GraphKey) -> Result<Import> {
        key.validate()?;
        let stem = key.file_name().trim_end_matches(".graph").to_owned();
        let temp = self.temp_file(&self.inner.graphs, &stem)?;
        Ok(Import { store: self.clone(), key: key.clone(), temp, written: 0 })
    }

    /// The bytes of the graph file stored under `key`, unverified (a reader verifies them), or `None`:
    /// what the remote tier publishes.
    pub fn file_bytes(&self, key: &GraphKey) -> Result<Option<crate::RawBytes>> {
        let path = self.path_of(key);
        Ok(self.read_file(&path)?.map(|opened| {
            let len = opened.bytes.len();
            crate::RawBytes { file: opened.bytes, range: 0..len }
        }))
    }
}

impl Import {
    /// Appends `bytes` to the file; refuses past the store's size limit.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let written = self.written + bytes.len() as u64;
        if let Some(limit) = self.store.inner.config.max_bytes
            && written > limit
        {
            return Err(StorageError::ExceedsLimit { bytes: written, limit });
        }
        let path = self.temp.path().to_owned();
        self.temp.as_file_mut().write_all(bytes).map_err(StorageError::io("writing", &path))?;
        self.written = written;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies the whole file (its checksum, that it holds `key`'s graph in this build's codec and a
    /// format it reads), then syncs it and renames it into place: `Ok(Err(miss))` says what was wrong,
    /// and nothing was stored.
    pub fn commit(self) -> Result<std::result::Result<Saved, Miss>> {
        let Self { store, key, mut temp, written } = self;
        let path = temp.path().to_owned();
        temp.as_file_mut().flush().map_err(StorageError::io("writing", &path))?;
        let verdict = {
            let file = File::open(&path).map_err(StorageError::io("opening", &path))?;
            let bytes = crate::store::map_or_read(&file, written).map_err(StorageError::io("reading", &path))?;
            match format::decode(&bytes) {
                Err(corruption) => Err(Miss::Corrupt(corruption)),
                Ok(Decoded::Newer { format }) => Err(Miss::NewerFormat { found: format, supported: FORMAT_VERSION }),
                Ok(Decoded::Valid { header, .. }) if header.key != key => {
                    Err(Miss::KeyMismatch { differs: key.differences(&header.key) })
                }
                Ok(Decoded::Valid { header, .. }) if header.codec != CODEC => {
                    Err(Miss::UnknownCodec { codec: header.codec })
                }
                Ok(Decoded::Valid { .. }) => Ok(()),
            }
        };
        if let Err(miss) = verdict {
            return Ok(Err(miss)); // the temporary file goes with `temp`
        }
        let target = store.path_of(&key);
        store.install(temp, &target)?;
        let inner = &store.inner;
        inner.counters.saves.fetch_add(1, Ordering::Relaxed);
        inner.counters.bytes_written.fetch_add(written, Ordering::Relaxed);
        inner.metrics.written_bytes.increment(written);
        let evicted = store.enforce_limit()?;
        Ok(Ok(Saved { path: target, bytes: written, evicted }))
    }
}
