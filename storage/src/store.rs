//! `StorageManager`: save, get, remove, and the files behind them (crash-safe writes, quarantine, locks).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, CODEC};
use crate::error::{Result, StorageError};
use crate::format::{self, Corruption, Decoded, FORMAT_VERSION, Header, HeaderRead};
use crate::key::{GraphKey, KeyPart};
use crate::metrics::StoreMetrics;
use crate::migrate::Migrations;

/// The environment variable that overrides the default cache folder.
pub const CACHE_DIR_ENV: &str = "USINE_CACHE_DIR";
/// Files at least this large are mapped rather than read. Measured in `benches/graphs.rs`: reading
/// wins up to 2 MiB (90 against 111 us at 1 MiB), mapping from 4 MiB on (0.29 against 0.36 ms at 4 MiB,
/// 0.6 against 9 ms at 8 MiB, where reading needs a second large buffer beside the decoded graph).
pub const DEFAULT_MAP_THRESHOLD: u64 = 4 << 20;

/// Where the store lives and how large it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// The cache root; graphs live in `graphs/` below it.
    pub root: PathBuf,
    /// Size limit of all graph files together, in bytes; over it the least recently used go first.
    pub max_bytes: Option<u64>,
    /// Files at least this large are mapped into memory instead of read into a buffer.
    pub map_threshold: u64,
    /// How long a damaged file stays in `graphs/quarantine/` (for a person to look at) before the store
    /// removes it when it opens; [`DEFAULT_QUARANTINE_KEEP`] by default.
    pub quarantine_keep: Duration,
}

/// How long quarantined files are kept by default: a week.
pub const DEFAULT_QUARANTINE_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// How old a file left on its way out (`.evict-...`) must be before the sweep removes it: another process
/// may be putting it back, for the microseconds between its rename and its check.
const EVICT_STALE: Duration = Duration::from_secs(60);

impl StorageConfig {
    /// A store rooted at `root`, without a size limit.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            max_bytes: None,
            map_threshold: DEFAULT_MAP_THRESHOLD,
            quarantine_keep: DEFAULT_QUARANTINE_KEEP,
        }
    }

    /// The default root: `$USINE_CACHE_DIR` if set, else the platform's cache folder (for instance
    /// `$XDG_CACHE_HOME/usine` or `~/.cache/usine` on Linux).
    pub fn from_env() -> Result<Self> {
        Self::from_override(std::env::var_os(CACHE_DIR_ENV))
    }

    /// The default root given the value of `USINE_CACHE_DIR` (`None` or empty: the platform's folder).
    pub fn from_override(cache_dir: Option<std::ffi::OsString>) -> Result<Self> {
        match cache_dir {
            Some(dir) if !dir.is_empty() => Ok(Self::at(dir)),
            _ => dirs::cache_dir().map(|dir| Self::at(dir.join("usine"))).ok_or(StorageError::NoCacheDir),
        }
    }

    /// Sets the size limit.
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: Option<u64>) -> Self {
        self.max_bytes = max_bytes;
        self
    }
}

/// The answer to [`StorageManager::get`]: the graph, or why there is none to serve.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one lookup per load, a hit the common case: boxing it would allocate on every load to save stack on misses"
)]
pub enum Lookup<T> {
    /// The graph, whole and verified.
    Hit(Hit<T>),
    /// No usable graph: compile again.
    Miss(Miss),
}

impl<T> Lookup<T> {
    /// The graph, if it was a hit.
    pub fn hit(self) -> Option<T> {
        match self {
            Self::Hit(hit) => Some(hit.graph),
            Self::Miss(_) => None,
        }
    }

    /// The miss, if it was one.
    pub fn miss(&self) -> Option<&Miss> {
        match self {
            Self::Hit(_) => None,
            Self::Miss(miss) => Some(miss),
        }
    }
}

/// A graph served from the store.
#[derive(Debug)]
pub struct Hit<T> {
    /// The decoded graph.
    pub graph: T,
    /// The file's header.
    pub header: Header,
    /// The schema it was stored at when it had to be migrated on the way.
    pub migrated_from: Option<u32>,
    /// The file's raw section, served from its mapping (or its bytes, for a small file) without a copy;
    /// empty when it has none.
    pub raw: RawBytes,
}

/// The raw section of a graph file (see [`save_with_raw`](StorageManager::save_with_raw)): a view of
/// the file's mapping that keeps it alive. The mapping is of a file this store only ever replaces by
/// renaming a new one over it, never writes in place: what it shows does not change.
#[derive(Clone)]
pub struct RawBytes {
    pub(crate) file: Arc<FileBytes>,
    pub(crate) range: std::ops::Range<usize>,
}

impl RawBytes {
    /// No raw section.
    pub fn empty() -> Self {
        Self { file: Arc::new(FileBytes::Read(Vec::new())), range: 0..0 }
    }

    /// Whether the bytes are a mapping of the file (which other processes mapping it share) rather
    /// than a copy read into memory (a file below the mapping threshold).
    pub fn is_mapped(&self) -> bool {
        matches!(*self.file, FileBytes::Mapped(_))
    }
}

impl Default for RawBytes {
    fn default() -> Self {
        Self::empty()
    }
}

impl Deref for RawBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.file[self.range.clone()]
    }
}

impl AsRef<[u8]> for RawBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for RawBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBytes").field("len", &self.range.len()).field("mapped", &self.is_mapped()).finish()
    }
}

/// Why no graph was served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Miss {
    /// Nothing is stored under the key.
    #[error("absent")]
    Absent,
    /// The file was damaged; it was moved to `graphs/quarantine/`.
    #[error("corrupt ({0}); quarantined")]
    Corrupt(Corruption),
    /// The file was written by a newer usine; it is left alone.
    #[error("written in format {found}, newer than {supported}; left alone")]
    NewerFormat {
        /// The file's format version.
        found: u16,
        /// The newest this build reads.
        supported: u16,
    },
    /// The payload is in a codec this build does not know; the file is left alone.
    #[error("payload codec `{codec}` is unknown here; left alone")]
    UnknownCodec {
        /// The codec the header names.
        codec: String,
    },
    /// The file under this key's name holds another key's graph (a renamed file); quarantined.
    #[error("the file holds another key (differs in {}); quarantined", parts(.differs))]
    KeyMismatch {
        /// Where the stored key differs from the one asked for.
        differs: Vec<KeyPart>,
    },
    /// The file is whole (its checksum holds) but its payload does not decode as the type asked for:
    /// the caller's type changed without a new schema version. The file is left alone.
    #[error("the payload does not decode as the type asked for: {message}")]
    Undecodable {
        /// The codec's message.
        message: String,
    },
    /// An older schema of the graph is stored, but migrating it failed; it is left alone.
    #[error("migration from schema {from} failed: {message}")]
    MigrationFailed {
        /// The stored schema.
        from: u32,
        /// What went wrong.
        message: String,
    },
}

fn parts(parts: &[KeyPart]) -> String {
    parts.iter().copied().map(KeyPart::as_str).collect::<Vec<_>>().join(", ")
}

/// The reason of a miss, as counted in stats and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MissReason {
    /// [`Miss::Absent`].
    Absent = 0,
    /// [`Miss::Corrupt`].
    Corrupt = 1,
    /// [`Miss::NewerFormat`] and [`Miss::UnknownCodec`].
    UnsupportedVersion = 2,
    /// [`Miss::KeyMismatch`].
    KeyMismatch = 3,
    /// [`Miss::MigrationFailed`].
    MigrationFailed = 4,
    /// [`Miss::Undecodable`].
    Undecodable = 5,
}

impl MissReason {
    /// Every reason, in order.
    pub const ALL: [MissReason; 6] = [
        Self::Absent,
        Self::Corrupt,
        Self::UnsupportedVersion,
        Self::KeyMismatch,
        Self::MigrationFailed,
        Self::Undecodable,
    ];

    /// A short fixed name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Absent => "absent",
            Self::Corrupt => "corrupt",
            Self::UnsupportedVersion => "unsupported_version",
            Self::KeyMismatch => "key_mismatch",
            Self::MigrationFailed => "migration_failed",
            Self::Undecodable => "undecodable",
        }
    }
}

impl Miss {
    /// The counted reason.
    pub fn reason(&self) -> MissReason {
        match self {
            Self::Absent => MissReason::Absent,
            Self::Corrupt(_) => MissReason::Corrupt,
            Self::NewerFormat { .. } | Self::UnknownCodec { .. } => MissReason::UnsupportedVersion,
            Self::KeyMismatch { .. } => MissReason::KeyMismatch,
            Self::MigrationFailed { .. } => MissReason::MigrationFailed,
            Self::Undecodable { .. } => MissReason::Undecodable,
        }
    }
}

/// What a save wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// The graph file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Graphs evicted to stay under the size limit.
    pub evicted: Vec<GraphKey>,
}

/// The compiled-graph store of one cache folder, shared safely by threads and by processes.
///
/// Cheap to clone. See the crate documentation for an example.
#[derive(Clone)]
pub struct StorageManager {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: StorageConfig,
    pub(crate) graphs: PathBuf,
    pub(crate) quarantine: PathBuf,
    locks: PathBuf,
    pub(crate) migrations: Migrations,
    /// Graphs in use in this process, by file name, with a count: never evicted.
    pub(crate) pins: Mutex<HashMap<String, usize>>,
    /// The version of each note last written by this process ([`StorageManager::write_note_versioned`]).
    notes_written: Mutex<HashMap<String, u64>>,
    pub(crate) counters: Counters,
    pub(crate) metrics: StoreMetrics,
}

/// Counters since the store was opened in this process.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: [AtomicU64; 6],
    pub(crate) quarantined: AtomicU64,
    pub(crate) evicted: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) saves: AtomicU64,
}

/// The bytes of a file, mapped or read.
pub(crate) enum FileBytes {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Read(bytes) => bytes,
        }
    }
}

/// The prefix of temporary files; the rest of the name is the target's stem and random letters.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";
/// The prefix of files on their way out (eviction, cleanup), checked before they are removed.
pub(crate) const EVICT_PREFIX: &str = ".evict-";

/// Which file a path named when it was read: saves replace files (a new inode), so a file seen earlier
/// and the file at its path now can be told apart before acting on the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// On platforms without inode numbers every file has the same id, and the checks pass.
    pub(crate) fn of(metadata: &fs::Metadata) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Self { dev: metadata.dev(), ino: metadata.ino() }
        }
        #[cfg(not(unix))]
        {
            let _ = metadata;
            Self { dev: 0, ino: 0 }
        }
    }
}

/// A file opened for reading, with its bytes and its identity.
pub(crate) struct Opened {
    file: File,
    pub(crate) bytes: Arc<FileBytes>,
    id: FileId,
}

/// A payload brought to a newer schema, its raw section (carried over unchanged: migrations work on
/// payloads), and the file it came from (removed once the new one is saved).
pub(crate) struct Upgraded {
    pub(crate) payload: Vec<u8>,
    pub(crate) raw: RawBytes,
    pub(crate) source: FileId,
}

/// A number for names that must not collide within this process.
fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
/// The extension of graph files.
pub(crate) const GRAPH_EXT: &str = "graph";

impl StorageManager {
    /// Opens (creating if needed) the store at `config.root` and sweeps the temporary files of writers
    /// that crashed.
    ///
    /// Metric handles are registered with the recorder installed now: install the exporter (in the
    /// binary) before opening the store, or its figures go nowhere.
    pub fn open(config: StorageConfig, migrations: Migrations) -> Result<Self> {
        let graphs = config.root.join("graphs");
        let quarantine = graphs.join("quarantine");
        let locks = graphs.join("locks");
        for dir in [&graphs, &quarantine, &locks] {
            fs::create_dir_all(dir).map_err(StorageError::io("creating", dir))?;
        }
        let store = Self {
            inner: Arc::new(Inner {
                config,
                graphs,
                quarantine,
                locks,
                migrations,
                pins: Mutex::new(HashMap::new()),
                notes_written: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                metrics: StoreMetrics::register(),
            }),
        };
        let swept = store.sweep_temporary_files()?;
        let quarantine_pruned = store.prune_quarantine()?;
        let locks_pruned = store.prune_locks()?;
        if swept + quarantine_pruned + locks_pruned > 0 {
            let root = store.root().display();
            tracing::info!(%root, swept, quarantine_pruned, locks_pruned, "store opened; leftovers removed");
        }
        store.refresh_gauges()?;
        Ok(store)
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.inner.config.root
    }

    /// The folder of the graph files.
    pub fn graphs_dir(&self) -> &Path {
        &self.inner.graphs
    }

    /// The folder damaged files are moved to.
    pub fn quarantine_dir(&self) -> &Path {
        &self.inner.quarantine
    }

    /// Removes temporary files whose writer is gone (in `graphs/`, and the notes' in the root), and files
    /// a crashed eviction left on their way out. A writer holds a lock on its temporary file until the
    /// rename; the lock dies with the process, so a file that can be locked is stale. (A writer between
    /// creating its file and locking it can lose it here; it notices at the rename and writes again.) A
    /// file on its way out is removed only after [`EVICT_STALE`]: until its evictor has checked it, it may
    /// be a graph another process just saved, which the evictor puts back.
    fn sweep_temporary_files(&self) -> Result<usize> {
        let mut swept = 0;
        for dir in [&self.inner.graphs, &self.inner.config.root] {
            for entry in fs::read_dir(dir).map_err(StorageError::io("listing", dir))? {
                let entry = entry.map_err(StorageError::io("listing", dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let evicted = name.starts_with(EVICT_PREFIX) && dir == &self.inner.graphs;
                if !name.starts_with(TEMP_PREFIX) && !evicted {
                    continue;
                }
                let path = entry.path();
                let Ok(file) = File::open(&path) else { continue }; // gone already
                let stale = if evicted {
                    file.metadata().is_ok_and(|metadata| changed_before(&metadata, EVICT_STALE))
                } else {
                    file.try_lock().is_ok()
                };
                if stale && remove_if_present(&path)? {
                    swept += 1;
                }
            }
        }
        Ok(swept)
    }

    /// Removes quarantined files older than the configured [`StorageConfig::quarantine_keep`].
    fn prune_quarantine(&self) -> Result<usize> {
        let dir = &self.inner.quarantine;
        let mut pruned = 0;
        for entry in fs::read_dir(dir).map_err(StorageError::io("listing", dir))? {
            let entry = entry.map_err(StorageError::io("listing", dir))?;
            let old = entry.metadata().is_ok_and(|metadata| {
                metadata.is_file() && changed_before(&metadata, self.inner.config.quarantine_keep)
            });
            if old && remove_if_present(&entry.path())? {
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// Removes the lock files no process holds: each key leaves one behind after its first compile. A
    /// lock is removed while held by this sweep, and a locker checks that the file it locked is still
    /// the one at the path ([`lock`](Self::lock)), so no two processes ever hold one key.
    fn prune_locks(&self) -> Result<usize> {
        let dir = &self.inner.locks;
        let mut pruned = 0;
        for entry in fs::read_dir(dir).map_err(StorageError::io("listing", dir))? {
            let entry = entry.map_err(StorageError::io("listing", dir))?;
            let path = entry.path();
            let Ok(file) = File::options().write(true).open(&path) else { continue }; // gone already
            if file.try_lock().is_ok() && remove_if_present(&path)? {
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// The path of `key`'s graph file.
    pub fn path_of(&self, key: &GraphKey) -> PathBuf {
        self.inner.graphs.join(key.file_name())
    }

    /// Saves `graph` under `key`, atomically: a reader sees the old graph or the new one, never a part.
    ///
    /// Writes a temporary file in the same folder, syncs it, renames it over the target and syncs the
    /// folder. Refuses with [`StorageError::NewerFormat`] or [`StorageError::UnknownCodec`] to replace a
    /// file written by a newer usine, and with [`StorageError::ExceedsLimit`] a graph whose file alone
    /// would exceed the size limit. Then evicts the least recently used graphs if the store is over its
    /// size limit.
    pub fn save<T: Serialize + ?Sized>(&self, key: &GraphKey, graph: &T) -> Result<Saved> {
        self.save_with_raw(key, graph, &[])
    }

    /// [`save`](Self::save), with `raw` as the file's raw section: bytes written as they are, at a page
    /// boundary, and served by [`get`](Self::get) from the file's mapping without a decode or a copy
    /// ([`Hit::raw`]), so that two processes loading the graph share its pages.
    pub fn save_with_raw<T: Serialize + ?Sized>(&self, key: &GraphKey, graph: &T, raw: &[u8]) -> Result<Saved> {
        key.validate()?;
        let started = Instant::now();
        let payload = codec::encode(graph)?;
        let saved = self.save_encoded(key, &payload, raw)?;
        self.inner.metrics.save.record(started.elapsed().as_secs_f64());
        Ok(saved)
    }

    pub(crate) fn save_encoded(&self, key: &GraphKey, payload: &[u8], raw: &[u8]) -> Result<Saved> {
        let target = self.path_of(key);
        self.refuse_foreign(&target)?;
        let mut header = Header {
            format: FORMAT_VERSION,
            key: key.clone(),
            codec: CODEC.to_owned(),
            created_unix_ms: unix_ms(SystemTime::now()),
            payload_len: payload.len() as u64,
            payload_xxh3: format::payload_digest(payload),
            raw_offset: 0,
            raw_len: raw.len() as u64,
        };
        // The raw section's place depends on the header's length, which holds the place: the offset's
        // digits only grow while the header does, so this settles in a pass or two.
        let mut head_len = format::Encoder::start(&header).1.len() as u64;
        loop {
            let payload_end = head_len + payload.len() as u64;
            header.raw_offset = if raw.is_empty() { payload_end } else { format::raw_place(payload_end).0 };
            let len = format::Encoder::start(&header).1.len() as u64;
            if len == head_len {
                break;
            }
            head_len = len;
        }
        let (mut encoder, head) = format::Encoder::start(&header);
        encoder.payload(payload);
        let padding = if raw.is_empty() {
            Vec::new()
        } else {
            let padding = header.raw_offset - (head.len() + payload.len()) as u64;
            encoder.raw(usize::try_from(padding).expect("under a page"), raw)
        };
        let trailer = encoder.finish();
        let bytes = (head.len() + payload.len() + padding.len() + raw.len() + trailer.len()) as u64;
        if let Some(limit) = self.inner.config.max_bytes
            && bytes > limit
        {
            return Err(StorageError::ExceedsLimit { bytes, limit });
        }

        let pieces = [&head[..], payload, &padding[..], raw, &trailer[..]];
        let stem = key.file_name().trim_end_matches(".graph").to_owned();
        self.write_retrying(&self.inner.graphs, &stem, &pieces, &target)?;

        self.inner.counters.saves.fetch_add(1, Ordering::Relaxed);
        self.inner.counters.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        self.inner.metrics.written_bytes.increment(bytes);
        let evicted = self.enforce_limit()?;
        Ok(Saved { path: target, bytes, evicted })
    }

    /// Writes `pieces` to a temporary file beside `target` (in `dir`, named after `stem`), syncs it and
    /// renames it over `target`.
    fn write_atomically(&self, dir: &Path, stem: &str, pieces: &[&[u8]], target: &Path) -> Result<()> {
        let mut temp = self.temp_file(dir, stem)?;
        let temp_path = temp.path().to_owned();
        let file = temp.as_file_mut();
        for piece in pieces {
            file.write_all(piece).map_err(StorageError::io("writing", &temp_path))?;
        }
        self.persist(temp, target)
    }

    /// A temporary file in `dir` named after `stem`, locked until it is renamed or dropped (the sweeper
    /// leaves a locked file alone).
    pub(crate) fn temp_file(&self, dir: &Path, stem: &str) -> Result<tempfile::NamedTempFile> {
        let prefix = format!("{TEMP_PREFIX}{stem}-");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix);
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644)); // readable by other users, as a cache
        let temp = builder.tempfile_in(dir).map_err(StorageError::io("creating a temporary file in", dir))?;
        temp.as_file().lock().map_err(StorageError::io("locking", temp.path()))?;
        Ok(temp)
    }

    /// Stamps, syncs and renames a written temporary file over `target`.
    fn persist(&self, mut temp: tempfile::NamedTempFile, target: &Path) -> Result<()> {
        let temp_path = temp.path().to_owned();
        let file = temp.as_file_mut();
        // The last use, at full precision: the kernel stamps writes with a coarse clock, which would tie
        // graphs saved within a few milliseconds in the LRU order.
        file.set_modified(SystemTime::now()).map_err(StorageError::io("stamping", &temp_path))?;
        file.sync_all().map_err(StorageError::io("syncing", &temp_path))?;
        temp.persist(target).map_err(|error| StorageError::io("renaming into", target)(error.error))?;
        Ok(())
    }

    /// Puts an imported graph file (written and verified) in place, as a save would: refuses to replace
    /// a newer usine's file, then syncs, renames and syncs the folder.
    pub(crate) fn install(&self, temp: tempfile::NamedTempFile, target: &Path) -> Result<()> {
        self.refuse_foreign(target)?;
        self.persist(temp, target)?;
        sync_dir(&self.inner.graphs)
    }

    /// [`write_atomically`](Self::write_atomically), once more if a store opening in another process
    /// swept the temporary file in the instant between its creation and its lock (the rename then finds
    /// it gone); then syncs the folder.
    fn write_retrying(&self, dir: &Path, stem: &str, pieces: &[&[u8]], target: &Path) -> Result<()> {
        match self.write_atomically(dir, stem, pieces, target) {
            Err(StorageError::Io { action: "renaming into", source, .. }) if source.kind() == ErrorKind::NotFound => {
                self.write_atomically(dir, stem, pieces, target)?;
            }
            written => written?,
        }
        sync_dir(dir)
    }

    /// Writes a note: a small file of the store's users (the kernel's counts of use) in the cache root,
    /// as crash-safe as a graph (a synced temporary file renamed over the old note, the folder synced; a
    /// writer's crash leaves a temporary file that the next open sweeps). `name` is a program's
    /// constant, checked all the same: 1 to 64 letters, digits, `.`, `-` or `_`, not starting with `.`.
    pub fn write_note(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.note_path(name)?;
        self.write_retrying(&self.inner.config.root, name, &[bytes], &path)
    }

    /// Writes note `name` at `version` unless this process (through any clone of this manager) wrote
    /// it at a later version already; returns whether it wrote. For a note rewritten from blocking
    /// threads in any order (the kernel's counts of use, which only grow): a stale write never
    /// overwrites a fresher one.
    pub fn write_note_versioned(&self, name: &str, bytes: &[u8], version: u64) -> Result<bool> {
        let mut written = self.inner.notes_written.lock();
        if written.get(name).is_some_and(|&last| last > version) {
            return Ok(false);
        }
        self.write_note(name, bytes)?;
        written.insert(name.to_owned(), version);
        Ok(true)
    }

    /// The size in bytes of the graph stored under `key`, if there is one (its file's, unread).
    pub fn stored_len(&self, key: &GraphKey) -> Option<u64> {
        fs::metadata(self.path_of(key)).ok().map(|metadata| metadata.len())
    }

    /// The note `name` as last written whole; `None` if there is none.
    pub fn read_note(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.note_path(name)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
            Err(error) => Err(StorageError::io("reading", path)(error)),
        }
    }

    fn note_path(&self, name: &str) -> Result<PathBuf> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        if name.is_empty() || name.len() > 64 || name.starts_with('.') || !name.chars().all(allowed) {
            return Err(StorageError::NoteName { name: name.chars().take(80).collect() });
        }
        Ok(self.inner.config.root.join(name))
    }

    /// Refuses to replace a file that a newer usine wrote: a newer format, or a codec unknown here.
    fn refuse_foreign(&self, path: &Path) -> Result<()> {
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(StorageError::io("opening", path)(error)),
        };
        match format::read_header(|buf| file.read(buf)).map_err(StorageError::io("reading", path))? {
            HeaderRead::Newer(found) => Err(StorageError::NewerFormat { found, supported: FORMAT_VERSION }),
            HeaderRead::Valid(header) if header.codec != CODEC => {
                Err(StorageError::UnknownCodec { codec: header.codec })
            }
            // Ours, or damaged: replacing it is the fix.
            HeaderRead::Valid(_) | HeaderRead::Unreadable(_) => Ok(()),
        }
    }

    /// The graph stored under `key`, verified and decoded; or why there is none.
    ///
    /// A damaged file is moved to `graphs/quarantine/` and counted; a file from a newer usine is left
    /// alone. When only an older schema of the graph is stored and [`Migrations`] can bring it to
    /// `key.schema`, it is migrated, saved under `key` and served. Errors are kept for the store failing
    /// (a folder it cannot read, say); everything wrong with a graph is a [`Miss`].
    pub fn get<T: DeserializeOwned>(&self, key: &GraphKey) -> Result<Lookup<T>> {
        key.validate()?;
        let started = Instant::now();
        let lookup = match self.read_graph::<T>(key)? {
            Lookup::Miss(Miss::Absent) => self.migrate_on_read(key)?,
            found => found,
        };
        let counters = &self.inner.counters;
        match &lookup {
            Lookup::Hit(_) => {
                counters.hits.fetch_add(1, Ordering::Relaxed);
                self.inner.metrics.hits.increment(1);
                self.inner.metrics.load.record(started.elapsed().as_secs_f64());
            }
            Lookup::Miss(miss) => {
                counters.misses[miss.reason() as usize].fetch_add(1, Ordering::Relaxed);
                self.inner.metrics.miss(miss.reason()).increment(1);
            }
        }
        Ok(lookup)
    }

    /// Reads, verifies and decodes the file of `key`, without migrating.
    fn read_graph<T: DeserializeOwned>(&self, key: &GraphKey) -> Result<Lookup<T>> {
        let path = self.path_of(key);
        let Some(opened) = self.read_file(&path)? else { return Ok(Lookup::Miss(Miss::Absent)) };
        let (header, payload, raw) = match self.check(&path, &opened, key)? {
            Ok(valid) => valid,
            Err(miss) => return Ok(Lookup::Miss(miss)),
        };
        match codec::decode::<T>(payload) {
            Ok(graph) => {
                // The last use, for LRU eviction across processes; an owner-only operation, so best effort.
                let _ = opened.file.set_modified(SystemTime::now());
                let raw = RawBytes { file: Arc::clone(&opened.bytes), range: raw };
                Ok(Lookup::Hit(Hit { graph, header, migrated_from: None, raw }))
            }
            // Whole but not of the type asked for: not damage, so not quarantined.
            Err(message) => Ok(Lookup::Miss(Miss::Undecodable { message })),
        }
    }

    /// Opens and reads (or maps) a graph file; `None` when it does not exist.
    pub(crate) fn read_file(&self, path: &Path) -> Result<Option<Opened>> {
        let file = match File::options().read(true).open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(StorageError::io("opening", path)(error)),
        };
        let metadata = file.metadata().map_err(StorageError::io("reading metadata of", path))?;
        let len = metadata.len();
        let bytes = if len >= self.inner.config.map_threshold && len > 0 {
            FileBytes::Mapped(map(&file).map_err(StorageError::io("mapping", path))?)
        } else {
            let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            (&file).read_to_end(&mut bytes).map_err(StorageError::io("reading", path))?;
            FileBytes::Read(bytes)
        };
        self.inner.counters.bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.inner.metrics.read_bytes.increment(bytes.len() as u64);
        Ok(Some(Opened { file, bytes: Arc::new(bytes), id: FileId::of(&metadata) }))
    }

    /// Decodes an opened file and checks it holds `key`'s graph; quarantines what is damaged.
    #[expect(clippy::type_complexity, reason = "a header, a payload and a range, or a miss")]
    fn check<'a>(
        &self,
        path: &Path,
        opened: &'a Opened,
        key: &GraphKey,
    ) -> Result<Result<(Header, &'a [u8], std::ops::Range<usize>), Miss>> {
        match format::decode(&opened.bytes) {
            Err(corruption) => {
                self.quarantine(path, opened.id, corruption.as_str())?;
                Ok(Err(Miss::Corrupt(corruption)))
            }
            Ok(Decoded::Newer { format }) => Ok(Err(Miss::NewerFormat { found: format, supported: FORMAT_VERSION })),
            Ok(Decoded::Valid { header, payload, raw }) => {
                if header.key != *key {
                    self.quarantine(path, opened.id, "key_mismatch")?;
                    return Ok(Err(Miss::KeyMismatch { differs: key.differences(&header.key) }));
                }
                if header.codec != CODEC {
                    return Ok(Err(Miss::UnknownCodec { codec: header.codec }));
                }
                Ok(Ok((*header, payload, raw)))
            }
        }
    }

    /// On a miss, looks for the graph at an older schema that the migrations can upgrade.
    fn migrate_on_read<T: DeserializeOwned>(&self, key: &GraphKey) -> Result<Lookup<T>> {
        for from in self.inner.migrations.sources(&key.engine, key.schema) {
            let upgraded = match self.upgrade(key, from)? {
                None => continue, // absent, quarantined or left alone: an older one may still serve
                Some(Err(message)) => return Ok(Lookup::Miss(Miss::MigrationFailed { from, message })),
                Some(Ok(upgraded)) => upgraded,
            };
            let graph = match codec::decode::<T>(&upgraded.payload) {
                Ok(graph) => graph,
                Err(message) => return Ok(Lookup::Miss(Miss::MigrationFailed { from, message })),
            };
            let saved = self.save_encoded(key, &upgraded.payload, &upgraded.raw)?;
            self.remove_exact(&self.path_of(&key.clone().schema(from)), upgraded.source)?;
            let header = self.header_of(&saved.path)?;
            return Ok(Lookup::Hit(Hit { graph, header, migrated_from: Some(from), raw: upgraded.raw }));
        }
        Ok(Lookup::Miss(Miss::Absent))
    }

    /// The payload of `key`'s graph stored at schema `from`, run through the migrations up to
    /// `key.schema`: `None` when no usable file is stored at `from`, `Some(Err)` when a step fails.
    pub(crate) fn upgrade(&self, key: &GraphKey, from: u32) -> Result<Option<Result<Upgraded, String>>> {
        let old_key = key.clone().schema(from);
        let old_path = self.path_of(&old_key);
        let Some(opened) = self.read_file(&old_path)? else { return Ok(None) };
        let Ok((_, payload, raw)) = self.check(&old_path, &opened, &old_key)? else { return Ok(None) };
        let upgraded = self.inner.migrations.run(&key.engine, from, key.schema, payload);
        let raw = RawBytes { file: Arc::clone(&opened.bytes), range: raw };
        Ok(Some(upgraded.map(|payload| Upgraded { payload, raw, source: opened.id })))
    }

    /// The header of a file just written by this store.
    fn header_of(&self, path: &Path) -> Result<Header> {
        let mut file = File::open(path).map_err(StorageError::io("opening", path))?;
        match format::read_header(|buf| file.read(buf)).map_err(StorageError::io("reading", path))? {
            HeaderRead::Valid(header) => Ok(header),
            HeaderRead::Newer(_) | HeaderRead::Unreadable(_) => Err(StorageError::io("reading the header of", path)(
                std::io::Error::new(ErrorKind::InvalidData, "the file was replaced by an unreadable one"),
            )),
        }
    }

    /// Removes `key`'s graph; returns whether there was one.
    pub fn remove(&self, key: &GraphKey) -> Result<bool> {
        let removed = remove_if_present(&self.path_of(key))?;
        if removed {
            sync_dir(&self.inner.graphs)?;
        }
        Ok(removed)
    }

    /// Moves the damaged file `id` from `path` to the quarantine folder, named after it, the reason and
    /// the time. When another process saved a new file at `path` since it was read, that one stays.
    pub(crate) fn quarantine(&self, path: &Path, id: FileId, reason: &str) -> Result<()> {
        let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        let target = self.inner.quarantine.join(format!("{name}.{reason}.{}.{}", unix_ms(SystemTime::now()), unique()));
        if take_exact(path, id, &target)? {
            tracing::warn!(file = name, reason, to = %target.display(), "damaged graph quarantined");
            sync_dir(&self.inner.quarantine)?;
            sync_dir(&self.inner.graphs)?;
            self.inner.counters.quarantined.fetch_add(1, Ordering::Relaxed);
            self.inner.metrics.quarantined.increment(1);
        }
        Ok(())
    }

    /// Removes the file `id` from `path`, unless another process saved a new file there since it was
    /// listed; returns whether it removed it.
    pub(crate) fn remove_exact(&self, path: &Path, id: FileId) -> Result<bool> {
        let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        let aside = self.inner.graphs.join(format!("{EVICT_PREFIX}{name}-{}", unique()));
        let taken = take_exact(path, id, &aside)?;
        if taken {
            remove_if_present(&aside)?;
            sync_dir(&self.inner.graphs)?;
        }
        Ok(taken)
    }

    /// Takes the cross-process lock of `key`, waiting for it: one process compiles, the others wait and
    /// then read what it saved. Blocks the thread; from async code, call it on a blocking thread.
    ///
    /// Locks are per open file: two `lock` calls for one key on one thread wait for each other forever.
    pub fn lock(&self, key: &GraphKey) -> Result<KeyLock> {
        loop {
            let (file, path) = self.lock_file(key)?;
            file.lock().map_err(StorageError::io("locking", &path))?;
            if still_at(&file, &path)? {
                return Ok(KeyLock { _file: file });
            }
            // Pruned while this process waited: the lock is the file at the path, so take that one.
        }
    }

    /// The lock of `key` if it is free now.
    pub fn try_lock(&self, key: &GraphKey) -> Result<Option<KeyLock>> {
        loop {
            let (file, path) = self.lock_file(key)?;
            match file.try_lock() {
                Ok(()) if still_at(&file, &path)? => return Ok(Some(KeyLock { _file: file })),
                Ok(()) => {} // pruned between the open and the lock: try the file at the path now
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(error)) => return Err(StorageError::io("locking", &path)(error)),
            }
        }
    }

    fn lock_file(&self, key: &GraphKey) -> Result<(File, PathBuf)> {
        let path = self.inner.locks.join(key.file_name().replace(".graph", ".lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(StorageError::io("opening", &path))?;
        Ok((file, path))
    }
}

/// Whether `file` is still the file at `path` (not removed or replaced since it was opened).
fn still_at(file: &File, path: &Path) -> Result<bool> {
    let opened = file.metadata().map_err(StorageError::io("reading metadata of", path))?;
    match fs::metadata(path) {
        Ok(now) => Ok(FileId::of(&now) == FileId::of(&opened)),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(false),
        Err(error) => Err(StorageError::io("reading metadata of", path)(error)),
    }
}

/// Whether the file's inode last changed (a write, a rename) more than `age` ago. Where the platform has
/// no change time, its modification time.
fn changed_before(metadata: &fs::Metadata, age: Duration) -> bool {
    #[cfg(unix)]
    let changed = {
        use std::os::unix::fs::MetadataExt;
        let nanos = u32::try_from(metadata.ctime_nsec()).unwrap_or(0);
        u64::try_from(metadata.ctime()).map_or(UNIX_EPOCH, |seconds| UNIX_EPOCH + Duration::new(seconds, nanos))
    };
    #[cfg(not(unix))]
    let changed = metadata.modified().unwrap_or(UNIX_EPOCH);
    SystemTime::now().duration_since(changed).is_ok_and(|since| since > age)
}

impl std::fmt::Debug for StorageManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageManager").field("root", &self.inner.config.root).finish_non_exhaustive()
    }
}

/// Held while a process works on one key; released when dropped, or when the process dies.
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
}

/// Maps a graph file. Graph files are never modified in place: writers rename a complete new file over
/// the old one, which leaves a mapping of the old file intact.
#[allow(unsafe_code, reason = "mapping is what makes large loads fast; see the safety note")]
fn map(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapped file is never written in place by this crate (saves rename a new file over it,
    // removals unlink it; both leave an existing mapping valid). Only an outside program truncating or
    // rewriting the file in place (restoring a backup with `cp` over the folder, say), or a failing disk,
    // could change the mapped bytes under us; the process then gets SIGBUS rather than a typed error.
    // The cache folder belongs to usine, and the README says so.
    unsafe { memmap2::MmapOptions::new().populate().map(file) }
}

/// Renames the file at `path` to `to` if it is still the file `id`; else puts back what it moved (unless
/// a newer file took `path` meanwhile) and returns `false`.
fn take_exact(path: &Path, id: FileId, to: &Path) -> Result<bool> {
    match fs::rename(path, to) {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(false), // gone already
        Err(error) => return Err(StorageError::io("moving", path)(error)),
    }
    let moved = match fs::symlink_metadata(to) {
        Ok(moved) => moved,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(StorageError::io("reading metadata of", to)(error)),
    };
    if FileId::of(&moved) == id {
        return Ok(true);
    }
    // A file saved after we looked: back where it was, unless an even newer one is there now.
    match fs::hard_link(to, path) {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::AlreadyExists => {}
        Err(error) => return Err(StorageError::io("restoring", path)(error)),
    }
    remove_if_present(to)?;
    Ok(false)
}

pub(crate) fn remove_if_present(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(false),
        Err(error) => Err(StorageError::io("removing", path)(error)),
    }
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|dir| dir.sync_all()).map_err(StorageError::io("syncing", dir))
}

pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(path: &Path) -> FileId {
        FileId::of(&fs::metadata(path).unwrap())
    }

    #[test]
    fn take_exact_takes_the_file_it_was_shown() {
        let dir = tempfile::tempdir().unwrap();
        let (path, aside) = (dir.path().join("a.graph"), dir.path().join("aside"));
        fs::write(&path, b"damaged").unwrap();
        assert!(take_exact(&path, id(&path), &aside).unwrap());
        assert_eq!(fs::read(&aside).unwrap(), b"damaged");
        assert!(!path.exists());
        assert!(!take_exact(&path, id(&aside), &aside).unwrap(), "nothing left to take");
    }

    #[test]
    fn take_exact_leaves_a_file_saved_since_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let (path, aside) = (dir.path().join("a.graph"), dir.path().join("aside"));
        fs::write(&path, b"damaged").unwrap();
        let seen = id(&path);
        // Another process saves a good file: a new inode renamed over the old one.
        let fresh = dir.path().join(".tmp-fresh");
        fs::write(&fresh, b"good").unwrap();
        fs::rename(&fresh, &path).unwrap();
        assert!(!take_exact(&path, seen, &aside).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"good", "put back");
        assert!(!aside.exists());
    }
}
