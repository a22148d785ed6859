//! Graph files brought from elsewhere (another host's store, through the remote tier): written beside
//! their place as they arrive, checked as they pass (the whole-file checksum is computed on the way, and
//! the header kept), then renamed into place like a save. A damaged or foreign file never takes the
//! place of a graph.
//!
//! On Linux the bytes go to the disk directly (`O_DIRECT`), past the page cache: on the machine this was
//! measured on, copying into the page cache cost three times what writing to the disk did (a 529 MB
//! file: 1.2 s buffered, 0.39 s direct). Where the file system refuses direct writes (at the open, or
//! at a first block written and taken back), they are buffered.

use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::Ordering;

use twox_hash::XxHash3_128;

use crate::CODEC;
use crate::error::{Result, StorageError};
use crate::format::{self, FORMAT_VERSION, Layout, MAX_HEADER_LEN};
use crate::key::GraphKey;
use crate::store::{Miss, Saved, StorageManager};

/// The alignment of direct writes: their memory, offsets and lengths.
const ALIGN: usize = 4096;
/// How much of a file's start is kept to read its header at the end: the prefix and the longest header.
const HEAD_KEPT: usize = 14 + MAX_HEADER_LEN as usize;
/// The checksum's length, at the end of every file.
const TRAILER_LEN: usize = 16;

/// A graph file on its way into the store: [`write`](Self::write) its bytes in order, then
/// [`commit`](Self::commit). Dropped uncommitted, it leaves nothing behind.
pub struct Import {
    store: StorageManager,
    key: GraphKey,
    temp: tempfile::NamedTempFile,
    /// The same file opened for direct writes, where the system allows them.
    direct: Option<Direct>,
    len: u64,
    written: u64,
    /// The checksum of every byte but the trailer's, so far.
    hasher: XxHash3_128,
    /// The file's start, for its header.
    head: Vec<u8>,
    /// The last bytes seen, to be the trailer if they are the last.
    tail: Vec<u8>,
}

impl std::fmt::Debug for Import {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Import")
            .field("key", &self.key)
            .field("len", &self.len)
            .field("written", &self.written)
            .field("direct", &self.direct.is_some())
            .finish_non_exhaustive()
    }
}

/// Direct writes: an aligned staging buffer, written out a whole number of blocks at a time.
struct Direct {
    file: File,
    buffer: Vec<u8>,
    /// Where the aligned part of `buffer` starts.
    start: usize,
    /// Bytes staged after `start`.
    staged: usize,
}

/// The staging buffer's capacity: a few chunks' worth.
const STAGE: usize = 16 << 20;

impl Direct {
    #[cfg(target_os = "linux")]
    fn open(path: &std::path::Path) -> Option<Self> {
        use std::io::Seek as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = File::options().write(true).custom_flags(libc::O_DIRECT).open(path).ok()?;
        let buffer = vec![0u8; STAGE + ALIGN];
        let start = buffer.as_ptr().align_offset(ALIGN);
        // A block written and taken back: some file systems take the flag at the open and refuse the
        // writes (EINVAL); those get buffered writes from the start, not a failed import.
        file.write_all(&buffer[start..start + ALIGN]).ok()?;
        file.set_len(0).ok()?;
        file.rewind().ok()?;
        Some(Self { file, buffer, start, staged: 0 })
    }

    #[cfg(not(target_os = "linux"))]
    fn open(_: &std::path::Path) -> Option<Self> {
        None
    }

    /// Stages `bytes`, writing out every full stage.
    fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let take = bytes.len().min(STAGE - self.staged);
            let at = self.start + self.staged;
            self.buffer[at..at + take].copy_from_slice(&bytes[..take]);
            self.staged += take;
            bytes = &bytes[take..];
            if self.staged == STAGE {
                self.flush_blocks()?;
            }
        }
        Ok(())
    }

    /// Writes out the staged whole blocks, keeping the rest staged.
    fn flush_blocks(&mut self) -> std::io::Result<()> {
        let whole = self.staged - self.staged % ALIGN;
        self.file.write_all(&self.buffer[self.start..self.start + whole])?;
        self.buffer.copy_within(self.start + whole..self.start + self.staged, self.start);
        self.staged -= whole;
        Ok(())
    }

    /// Writes out everything, the last block padded with zeros (cut off by the caller).
    fn finish(&mut self) -> std::io::Result<()> {
        let padded = self.staged.next_multiple_of(ALIGN);
        self.buffer[self.start + self.staged..self.start + padded].fill(0);
        self.file.write_all(&self.buffer[self.start..self.start + padded])?;
        self.staged = 0;
        Ok(())
    }
}

impl StorageManager {
    /// Starts bringing in the `len` bytes of the file of `key`'s graph from elsewhere; refuses a file
    /// over the store's size limit before a byte is written.
    pub fn begin_import(&self, key: &GraphKey, len: u64) -> Result<Import> {
        key.validate()?;
        if let Some(limit) = self.inner.config.max_bytes
            && len > limit
        {
            return Err(StorageError::ExceedsLimit { bytes: len, limit });
        }
        let stem = key.file_name().trim_end_matches(".graph").to_owned();
        let temp = self.temp_file(&self.inner.graphs, &stem)?;
        let direct = Direct::open(temp.path());
        Ok(Import {
            store: self.clone(),
            key: key.clone(),
            temp,
            direct,
            len,
            written: 0,
            hasher: XxHash3_128::new(),
            head: Vec::new(),
            tail: Vec::new(),
        })
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
    /// Appends `bytes` to the file; refuses bytes past the length announced.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let written = self.written + bytes.len() as u64;
        if written > self.len {
            let path = self.temp.path().to_owned();
            let error = std::io::Error::new(std::io::ErrorKind::InvalidData, format!("more than {} bytes", self.len));
            return Err(StorageError::io("importing", path)(error));
        }
        if self.head.len() < HEAD_KEPT {
            let take = bytes.len().min(HEAD_KEPT - self.head.len());
            self.head.extend_from_slice(&bytes[..take]);
        }
        // Every byte but the last `TRAILER_LEN` of the file is hashed; those are kept aside.
        let body_end = self.len.saturating_sub(TRAILER_LEN as u64);
        let hashed = usize::try_from(body_end.saturating_sub(self.written).min(bytes.len() as u64)).unwrap_or(0);
        self.hasher.write(&bytes[..hashed]);
        self.tail.extend_from_slice(&bytes[hashed..]);
        let path = self.temp.path().to_owned();
        let outcome = match &mut self.direct {
            Some(direct) => direct.write(bytes),
            None => self.temp.as_file_mut().write_all(bytes),
        };
        outcome.map_err(StorageError::io("writing", &path))?;
        self.written = written;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks the whole file (every byte arrived, its checksum, that it holds `key`'s graph in this
    /// build's codec and a format it reads), then syncs it and renames it into place: `Ok(Err(miss))`
    /// says what was wrong, and nothing was stored.
    pub fn commit(mut self) -> Result<std::result::Result<Saved, Miss>> {
        if let Err(miss) = self.verdict() {
            return Ok(Err(miss)); // the temporary file goes with `temp`
        }
        let path = self.temp.path().to_owned();
        if let Some(mut direct) = self.direct.take() {
            direct.finish().map_err(StorageError::io("writing", &path))?;
            direct.file.set_len(self.len).map_err(StorageError::io("cutting", &path))?;
        }
        self.temp.as_file_mut().flush().map_err(StorageError::io("writing", &path))?;
        let Self { store, key, temp, written, .. } = self;
        let target = store.path_of(&key);
        store.install(temp, &target)?;
        let inner = &store.inner;
        inner.counters.saves.fetch_add(1, Ordering::Relaxed);
        inner.counters.bytes_written.fetch_add(written, Ordering::Relaxed);
        inner.metrics.written_bytes.increment(written);
        let evicted = store.enforce_limit()?;
        Ok(Ok(Saved { path: target, bytes: written, evicted }))
    }

    /// What is wrong with the file, if anything: the checks of a read.
    fn verdict(&self) -> std::result::Result<(), Miss> {
        let min = (14 + TRAILER_LEN) as u64;
        if self.written < self.len || self.len < min {
            let corruption = crate::Corruption::Truncated { len: self.written, min: self.len.max(min) };
            return Err(Miss::Corrupt(corruption));
        }
        let trailer: [u8; TRAILER_LEN] =
            self.tail[..].try_into().map_err(|_| Miss::Corrupt(crate::Corruption::Checksum))?;
        if self.hasher.finish_128() != u128::from_le_bytes(trailer) {
            return Err(Miss::Corrupt(crate::Corruption::Checksum));
        }
        match format::layout(&self.head, self.len - TRAILER_LEN as u64).map_err(Miss::Corrupt)? {
            Layout::Newer { format } => Err(Miss::NewerFormat { found: format, supported: FORMAT_VERSION }),
            Layout::Valid { header, .. } if header.key != self.key => {
                Err(Miss::KeyMismatch { differs: self.key.differences(&header.key) })
            }
            Layout::Valid { header, .. } if header.codec != CODEC => Err(Miss::UnknownCodec { codec: header.codec }),
            Layout::Valid { .. } => Ok(()),
        }
    }
}
