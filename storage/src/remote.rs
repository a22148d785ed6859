//! The fleet's tier: compiled graphs shared through a Redis server, so that a graph compiled on one host
//! is loaded by the others (feature `remote`).
//!
//! A graph is stored as chunks and a manifest. The chunks are keyed by the file's own checksum, so a
//! chunk is never updated in place; the manifest, written last, is the commit marker and the only key a
//! publish replaces. A reader requires the manifest, checks every chunk against it, and imports the file
//! through [`StorageManager::begin_import`], which verifies the whole file before it takes its place. A
//! damaged remote graph is never served: its manifest is deleted (only if it is still the one read) and
//! the caller compiles and publishes again.
//!
//! The tier fails open: every call is bounded by [`RemoteConfig::timeout`], and after an error the tier
//! is skipped for [`RemoteConfig::cool_down`], with a log line and a metric. Redis down, slow or full
//! costs a load at most one time bound.
//!
//! Keys, under `usine:graph:f{format}:{key digest}` (the local file name's digest, which no user string
//! steers): `:manifest`, `:lease`, and `:{file checksum}:{chunk index}`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::AsyncCommands as _;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;
use twox_hash::XxHash3_64;

use crate::StorageError;
use crate::format::FORMAT_VERSION;
use crate::key::GraphKey;
use crate::metrics::RemoteMetrics;
use crate::store::StorageManager;

/// Redis refuses values over 512 MiB, and large values stall its one thread: chunks are at most this.
pub const MAX_CHUNK_BYTES: usize = 256 << 20;
/// The smallest chunk: a graph of gigabytes in tiny chunks would be millions of calls.
pub const MIN_CHUNK_BYTES: usize = 64 << 10;

/// How the remote tier reaches its server and what it may do there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    /// `redis://[user:password@]host[:port][/db]` (or `unix:///path`); the password is never printed.
    pub url: String,
    /// The most time one call to the server may take (connecting included); past it, the load goes on
    /// without the tier. Default 2 s.
    pub timeout: Duration,
    /// How long the tier is skipped after an error. Default 30 s.
    pub cool_down: Duration,
    /// How long a published graph stays in Redis; `None` for as long as the server keeps it. Default 7
    /// days.
    pub ttl: Option<Duration>,
    /// The largest graph file published or fetched, in bytes. Default 8 GiB.
    pub max_graph_bytes: u64,
    /// The size of a chunk, in bytes, at most [`MAX_CHUNK_BYTES`]. Default 2 MiB: a 60 MB graph came
    /// in 1.7 times faster than in 8 MiB chunks (a finer pipeline, and Redis serves small values best).
    pub chunk_bytes: usize,
    /// Chunks in flight at once. Default 8.
    pub window: usize,
    /// How long a compile lease lives without renewal (a host that dies holding one frees it after
    /// this); renewed every third of it while the compile runs. Default 30 s.
    pub lease: Duration,
    /// The most time a host waits for another host's compile before compiling itself. Default 10 min.
    pub wait: Duration,
}

impl RemoteConfig {
    /// The defaults, for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timeout: Duration::from_secs(2),
            cool_down: Duration::from_secs(30),
            ttl: Some(Duration::from_secs(7 * 24 * 3600)),
            max_graph_bytes: 8 << 30,
            chunk_bytes: 2 << 20,
            window: 8,
            lease: Duration::from_secs(30),
            wait: Duration::from_secs(600),
        }
    }
}

/// What a fetch found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The graph is now in the local store, verified.
    Hit {
        /// Bytes fetched.
        bytes: u64,
    },
    /// No graph under this key (no manifest).
    Absent,
    /// A graph was there but damaged; it was not stored, and its manifest was deleted.
    Damaged {
        /// What was wrong.
        reason: String,
    },
    /// The tier is down or cooling down; nothing was fetched.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// Chunks and manifest written.
    Done {
        /// Bytes uploaded.
        bytes: u64,
    },
    /// Not published, by the rules (too large, not stored locally).
    Skipped {
        /// Why.
        reason: String,
    },
    /// The tier is down or cooling down.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// What asking for the fleet's compile lease gave.
#[derive(Debug)]
pub enum Leased {
    /// This host compiles; release the lease once the graph is published.
    Acquired(Lease),
    /// Another host compiles now.
    Busy,
    /// The tier is down or cooling down: compile without a lease.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// What waiting for another host's compile gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waited {
    /// The graph was published: fetch it.
    Published,
    /// The lease ended without a graph (the other host failed or died).
    Abandoned,
    /// Still compiling after [`RemoteConfig::wait`].
    TimedOut,
    /// The tier went down while waiting.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// The fleet's compile lease on one key: renewed while held, released by [`release`](Self::release)
/// (compare-and-delete: never another host's) or when dropped (then it expires on its own).
pub struct Lease {
    tier: RemoteTier,
    key: String,
    token: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Lease {
    /// Gives the lease back, if it is still this host's: whatever the cool-down (hosts waiting on it
    /// would wait for it to expire), once, within the time bound.
    pub async fn release(self) {
        self.renewal.abort();
        let (key, token) = (self.key.clone(), self.token.clone());
        let release = async move |mut conn: MultiplexedConnection| {
            RELEASE.key(&key).arg(&token).invoke_async::<i64>(&mut conn).await
        };
        if let Err(reason) = self.tier.best_effort(release).await {
            tracing::info!(remote = self.tier.url(), reason, "compile lease left to expire");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Deletes a key only if it still holds the value given: a lease's token, or a manifest as read.
static RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
});
/// Deletes a damaged graph: its manifest (`KEYS[1]`) if it still holds what was read (`ARGV[1]`), and
/// then its chunks (`KEYS[2..]`).
static DROP_DAMAGED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end \
         for i = 1, #KEYS do redis.call('DEL', KEYS[i]) end return 1",
    )
});
/// Deletes a failed publish's chunks (`KEYS[2..]`) unless the manifest (`KEYS[1]`) names their file's
/// checksum (`ARGV[1]`).
static DISCARD: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "local m = redis.call('GET', KEYS[1]) if m and string.find(m, ARGV[1], 1, true) then return 0 end \
         local n = 0 for i = 2, #KEYS do n = n + redis.call('DEL', KEYS[i]) end return n",
    )
});
/// Extends a lease only if it is still this host's.
static RENEW: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
    )
});

/// What a reader needs to take a graph: its length, chunking and checksums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    /// The storage format of the file.
    format: u16,
    /// The local file name of the key.
    file: String,
    /// The file's length.
    len: u64,
    /// Every chunk but the last is this long.
    chunk_bytes: u64,
    /// The file's own checksum (its trailer), in hex: the chunks' keys.
    checksum: String,
    /// XXH3-64 of each chunk.
    chunks: Vec<u64>,
}

/// The tier's figures since it was made, in this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Graphs fetched and stored.
    pub hits: u64,
    /// Fetches that found no graph.
    pub misses: u64,
    /// Damaged graphs found (never served).
    pub damaged: u64,
    /// Graphs published.
    pub published: u64,
    /// Bytes fetched.
    pub fetched_bytes: u64,
    /// Bytes published.
    pub published_bytes: u64,
    /// Calls that failed or timed out.
    pub errors: u64,
    /// Calls skipped while cooling down.
    pub skipped: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    damaged: AtomicU64,
    published: AtomicU64,
    fetched_bytes: AtomicU64,
    published_bytes: AtomicU64,
    errors: AtomicU64,
    skipped: AtomicU64,
}

/// The remote tier: a Redis server shared by a fleet. Cheap to clone; connects on first use and again
/// after errors.
#[derive(Clone)]
pub struct RemoteTier {
    inner: Arc<Inner>,
}

struct Inner {
    config: RemoteConfig,
    client: redis::Client,
    shown: String,
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// Skipped until then, after an error.
    down_until: Mutex<Option<Instant>>,
    counters: Counters,
    metrics: RemoteMetrics,
}

impl fmt::Debug for RemoteTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteTier").field("url", &self.inner.shown).finish_non_exhaustive()
    }
}

impl RemoteTier {
    /// A tier for `config`; checks the settings, connects nothing yet.
    pub fn new(config: RemoteConfig) -> Result<Self, StorageError> {
        let shown = crate::redact_url(&config.url);
        let out_of_range = |setting, value: String, range| StorageError::RemoteSetting { setting, value, range };
        if config.timeout.is_zero() || config.timeout > Duration::from_secs(600) {
            return Err(out_of_range("timeout", format!("{:?}", config.timeout), "from 1 ms to 10 min"));
        }
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&config.chunk_bytes) {
            return Err(out_of_range("chunk_bytes", config.chunk_bytes.to_string(), "from 64 KiB to 256 MiB"));
        }
        if !(1..=64).contains(&config.window) {
            return Err(out_of_range("window", config.window.to_string(), "from 1 to 64"));
        }
        if config.lease < 3 * config.timeout {
            // Renewed every third of its life, each renewal bounded by the timeout.
            return Err(out_of_range("lease", format!("{:?}", config.lease), "at least 3 times the timeout"));
        }
        if config.ttl.is_some_and(|ttl| ttl < Duration::from_secs(1)) {
            return Err(out_of_range("ttl", format!("{:?}", config.ttl), "at least 1 s, or none"));
        }
        let client = redis::Client::open(config.url.as_str())
            .map_err(|error| StorageError::RemoteUrl { url: shown.clone(), message: error.to_string() })?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client,
                shown,
                connection: tokio::sync::Mutex::new(None),
                down_until: Mutex::new(None),
                counters: Counters::default(),
                metrics: RemoteMetrics::register(),
            }),
        })
    }

    /// The server's URL, its password hidden.
    pub fn url(&self) -> &str {
        &self.inner.shown
    }

    /// The settings.
    pub fn config(&self) -> &RemoteConfig {
        &self.inner.config
    }

    /// How much longer the tier is skipped after an error; `None` when it is in use.
    pub fn cooling_down(&self) -> Option<Duration> {
        let until = (*self.inner.down_until.lock())?;
        until.checked_duration_since(Instant::now())
    }

    /// The figures since the tier was made.
    pub fn stats(&self) -> RemoteStats {
        let c = &self.inner.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RemoteStats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            damaged: get(&c.damaged),
            published: get(&c.published),
            fetched_bytes: get(&c.fetched_bytes),
            published_bytes: get(&c.published_bytes),
            errors: get(&c.errors),
            skipped: get(&c.skipped),
        }
    }

    /// Asks the server for a `PING`, ignoring any cool-down: its round trip, or why it failed.
    pub async fn ping(&self) -> Result<Duration, String> {
        let started = Instant::now();
        let conn = self.connect_anyway().await?;
        let ping =
            async move |mut conn: MultiplexedConnection| redis::cmd("PING").query_async::<String>(&mut conn).await;
        match tokio::time::timeout(self.inner.config.timeout, ping(conn)).await {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// Fetches `key`'s graph into `store`, verified.
    pub async fn fetch(&self, store: &StorageManager, key: &GraphKey) -> Fetched {
        let started = Instant::now();
        let base = base(key);
        let manifest_key = format!("{base}:manifest");
        let get_manifest = {
            let manifest_key = manifest_key.clone();
            async move |mut conn: MultiplexedConnection| conn.get::<_, Option<Vec<u8>>>(&manifest_key).await
        };
        let text = match self.call("fetch", get_manifest).await {
            Ok(Some(text)) => text,
            Ok(None) => {
                self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
                self.inner.metrics.misses.increment(1);
                return Fetched::Absent;
            }
            Err(reason) => return Fetched::Unavailable { reason },
        };
        let (outcome, chunk_keys) = match self.check_manifest(&text, key) {
            Ok(manifest) => {
                let chunk_keys =
                    (0..manifest.chunks.len()).map(|index| format!("{base}:{}:{index}", manifest.checksum)).collect();
                (self.fetch_chunks(store, key, &base, &manifest).await, chunk_keys)
            }
            Err(reason) => (Err(Fault::Damaged(reason)), Vec::new()),
        };
        match outcome {
            Ok(bytes) => {
                self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                self.inner.counters.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.inner.metrics.hits.increment(1);
                self.inner.metrics.fetched_bytes.increment(bytes);
                self.inner.metrics.fetch.record(started.elapsed().as_secs_f64());
                Fetched::Hit { bytes }
            }
            Err(Fault::Unavailable(reason)) => Fetched::Unavailable { reason },
            Err(Fault::Local(reason)) => Fetched::Unavailable { reason: format!("the local store: {reason}") },
            Err(Fault::Damaged(reason)) => {
                self.inner.counters.damaged.fetch_add(1, Ordering::Relaxed);
                self.inner.metrics.damaged.increment(1);
                tracing::warn!(remote = self.url(), file = key.file_name(), reason, "damaged remote graph; not used");
                // The manifest, if it is still the one read, and its chunks (never a newer publish's).
                let delete = async move |mut conn: MultiplexedConnection| {
                    let mut delete = DROP_DAMAGED.prepare_invoke();
                    delete.key(&manifest_key).arg(&text);
                    for chunk in &chunk_keys {
                        delete.key(chunk);
                    }
                    delete.invoke_async::<i64>(&mut conn).await.map(drop)
                };
                let _ = self.call("delete", delete).await;
                Fetched::Damaged { reason }
            }
        }
    }

    fn check_manifest(&self, text: &[u8], key: &GraphKey) -> Result<Manifest, String> {
        let manifest: Manifest =
            serde_json::from_slice(text).map_err(|error| format!("the manifest does not parse: {error}"))?;
        let expected_chunks = manifest.len.div_ceil(manifest.chunk_bytes.max(1));
        if manifest.format != FORMAT_VERSION || manifest.file != key.file_name() {
            return Err(format!("the manifest is of {} at format {}", manifest.file, manifest.format));
        }
        if manifest.len > self.inner.config.max_graph_bytes {
            let limit = self.inner.config.max_graph_bytes;
            return Err(format!("the graph is {} bytes, over max_graph_bytes ({limit})", manifest.len));
        }
        if manifest.chunk_bytes < MIN_CHUNK_BYTES as u64
            || manifest.chunk_bytes > MAX_CHUNK_BYTES as u64
            || manifest.chunks.len() as u64 != expected_chunks
            || manifest.checksum.len() != 32
            || !manifest.checksum.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err("the manifest's chunking does not add up".into());
        }
        Ok(manifest)
    }

    /// Gets the chunks, `window` at a time, checks each, and writes them in order to an import that
    /// verifies the whole file before it is stored.
    async fn fetch_chunks(
        &self,
        store: &StorageManager,
        key: &GraphKey,
        base: &str,
        manifest: &Manifest,
    ) -> Result<u64, Fault> {
        let store = store.clone();
        let (import_key, len) = (key.clone(), manifest.len);
        let import = blocking(move || store.begin_import(&import_key, len)).await?.map_err(Fault::local)?;
        // The writer: a blocking thread that takes checked chunks in order while the next ones arrive.
        let window = self.inner.config.window;
        let (to_writer, mut chunks) = tokio::sync::mpsc::channel::<Vec<u8>>(4 * window);
        let writer = tokio::task::spawn_blocking(move || {
            let mut import = import;
            while let Some(bytes) = chunks.blocking_recv() {
                import.write(&bytes)?;
            }
            Ok::<_, crate::StorageError>(import)
        });
        let count = manifest.chunks.len();
        let mut in_flight = JoinSet::new();
        let mut arrived = std::collections::BTreeMap::new();
        let mut next_request = 0;
        for index in 0..count {
            while next_request < count && next_request < index + window {
                let chunk_key = format!("{base}:{}:{next_request}", manifest.checksum);
                let tier = self.clone();
                let request = next_request;
                in_flight.spawn(async move {
                    let get =
                        async move |mut conn: MultiplexedConnection| conn.get::<_, Option<Vec<u8>>>(&chunk_key).await;
                    (request, tier.call("fetch", get).await)
                });
                next_request += 1;
            }
            let bytes = loop {
                if let Some(bytes) = arrived.remove(&index) {
                    break bytes;
                }
                let Some(joined) = in_flight.join_next().await else { unreachable!("chunk {index} was requested") };
                let (request, got) = joined.map_err(|error| Fault::Unavailable(error.to_string()))?;
                arrived.insert(request, got);
            };
            let bytes = match bytes {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return Err(Fault::Damaged(format!("chunk {index} of {count} is missing"))),
                Err(reason) => return Err(Fault::Unavailable(reason)),
            };
            let expected_len = if index + 1 == count {
                manifest.len - manifest.chunk_bytes * (count as u64 - 1)
            } else {
                manifest.chunk_bytes
            };
            if bytes.len() as u64 != expected_len {
                let len = bytes.len();
                return Err(Fault::Damaged(format!("chunk {index} is {len} bytes; the manifest says {expected_len}")));
            }
            if XxHash3_64::oneshot(&bytes) != manifest.chunks[index] {
                return Err(Fault::Damaged(format!("chunk {index} does not match its checksum")));
            }
            if to_writer.send(bytes).await.is_err() {
                break; // the writer failed: its error comes below
            }
        }
        drop(to_writer);
        let import = match writer.await {
            Ok(written) => written.map_err(Fault::local)?,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => return Err(Fault::Unavailable("the runtime is shutting down".into())),
        };
        match blocking(move || import.commit()).await?.map_err(Fault::local)? {
            Ok(saved) => Ok(saved.bytes),
            Err(miss) => Err(Fault::Damaged(format!("the file: {miss}"))),
        }
    }

    /// Publishes the graph stored locally under `key`: chunks, then the manifest.
    pub async fn publish(&self, store: &StorageManager, key: &GraphKey) -> Published {
        let started = Instant::now();
        if let Some(reason) = self.skip() {
            return Published::Unavailable { reason };
        }
        let (store, file_key) = (store.clone(), key.clone());
        let bytes = match blocking(move || store.file_bytes(&file_key)).await {
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => return Published::Skipped { reason: "not in the local store".into() },
            Ok(Err(error)) => return Published::Skipped { reason: error.to_string() },
            Err(fault) => return Published::Skipped { reason: fault.to_string() },
        };
        let len = bytes.len() as u64;
        let limit = self.inner.config.max_graph_bytes;
        if len > limit {
            self.inner.metrics.oversized.increment(1);
            return Published::Skipped { reason: format!("the graph is {len} bytes, over max_graph_bytes ({limit})") };
        }
        if bytes.len() < 16 {
            return Published::Skipped { reason: "the stored file is truncated".into() };
        }
        let checksum = format!("{:032x}", u128::from_le_bytes(bytes[bytes.len() - 16..].try_into().expect("16 bytes")));
        let chunk_bytes = self.inner.config.chunk_bytes;
        let bytes = Arc::new(bytes);
        let base = base(key);
        let ttl_ms = self.inner.config.ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let count = bytes.len().div_ceil(chunk_bytes);
        let mut sums = Vec::with_capacity(count);
        let mut in_flight = JoinSet::new();
        let chunk_keys: Vec<String> = (0..count).map(|index| format!("{base}:{checksum}:{index}")).collect();
        let manifest_key = format!("{base}:manifest");
        for index in 0..count {
            if in_flight.len() >= self.inner.config.window
                && let Some(Ok(Err(reason))) = in_flight.join_next().await
            {
                self.discard(&manifest_key, &checksum, &chunk_keys).await;
                return Published::Unavailable { reason };
            }
            let range = index * chunk_bytes..((index + 1) * chunk_bytes).min(bytes.len());
            sums.push(XxHash3_64::oneshot(&bytes[range.clone()]));
            let (tier, bytes, chunk_key) = (self.clone(), Arc::clone(&bytes), chunk_keys[index].clone());
            in_flight.spawn(async move {
                let set = async move |mut conn: MultiplexedConnection| {
                    set(&mut conn, &chunk_key, &bytes[range], ttl_ms).await
                };
                tier.call("publish", set).await
            });
        }
        while let Some(joined) = in_flight.join_next().await {
            if let Ok(Err(reason)) = joined {
                in_flight.shutdown().await;
                self.discard(&manifest_key, &checksum, &chunk_keys).await;
                return Published::Unavailable { reason };
            }
        }
        let manifest = Manifest {
            format: FORMAT_VERSION,
            file: key.file_name(),
            len,
            chunk_bytes: chunk_bytes as u64,
            checksum: checksum.clone(),
            chunks: sums,
        };
        let text = serde_json::to_vec(&manifest).expect("a manifest serializes");
        let commit = {
            let manifest_key = manifest_key.clone();
            async move |mut conn: MultiplexedConnection| set(&mut conn, &manifest_key, &text, ttl_ms).await
        };
        if let Err(reason) = self.call("publish", commit).await {
            self.discard(&manifest_key, &checksum, &chunk_keys).await;
            return Published::Unavailable { reason };
        }
        self.inner.counters.published.fetch_add(1, Ordering::Relaxed);
        self.inner.counters.published_bytes.fetch_add(len, Ordering::Relaxed);
        self.inner.metrics.published_bytes.increment(len);
        self.inner.metrics.publish.record(started.elapsed().as_secs_f64());
        Published::Done { bytes: len }
    }

    /// After a failed publish, removes the chunks it wrote (a full Redis keeps no orphans until their
    /// TTL), unless a manifest names them: another host published the same file. Once, within the time
    /// bound, whatever the cool-down; failures are only logged.
    async fn discard(&self, manifest_key: &str, checksum: &str, chunk_keys: &[String]) {
        let (manifest_key, checksum, chunk_keys) = (manifest_key.to_owned(), checksum.to_owned(), chunk_keys.to_vec());
        let discard = async move |mut conn: MultiplexedConnection| {
            let mut discard = DISCARD.prepare_invoke();
            discard.key(&manifest_key).arg(&checksum);
            for chunk in &chunk_keys {
                discard.key(chunk);
            }
            discard.invoke_async::<i64>(&mut conn).await
        };
        match self.best_effort(discard).await {
            Ok(removed) => tracing::info!(remote = self.url(), removed, "chunks of a failed publish removed"),
            Err(reason) => tracing::info!(remote = self.url(), reason, "chunks of a failed publish left to expire"),
        }
    }

    /// A call that cleans up after this host, made whatever the cool-down, within the time bound; its
    /// failure starts no cool-down.
    async fn best_effort<T, F, Fut>(&self, work: F) -> Result<T, String>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let bounded = tokio::time::timeout(self.inner.config.timeout, async {
            let conn = self.connect_anyway().await?;
            work(conn).await.map_err(|error| error.to_string())
        });
        bounded.await.unwrap_or_else(|_| Err(self.timed_out()))
    }

    /// A connection whatever the cool-down (for cleanup and `PING`).
    async fn connect_anyway(&self) -> Result<MultiplexedConnection, String> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let conn = self.open().await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Asks for the fleet's lease to compile `key`.
    pub async fn lease(&self, key: &GraphKey) -> Leased {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let lease_key = format!("{}:lease", base(key));
        let token = format!(
            "{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_nanos())
        );
        let lease_ms = u64::try_from(self.inner.config.lease.as_millis()).unwrap_or(u64::MAX);
        let take = {
            let (lease_key, token) = (lease_key.clone(), token.clone());
            async move |mut conn: MultiplexedConnection| {
                redis::cmd("SET")
                    .arg(&lease_key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease_ms)
                    .query_async::<Option<String>>(&mut conn)
                    .await
            }
        };
        match self.call("lease", take).await {
            Ok(Some(_)) => {
                let renewal = tokio::spawn(self.clone().renew(lease_key.clone(), token.clone(), lease_ms));
                Leased::Acquired(Lease { tier: self.clone(), key: lease_key, token, renewal })
            }
            Ok(None) => Leased::Busy,
            Err(reason) => Leased::Unavailable { reason },
        }
    }

    async fn renew(self, lease_key: String, token: String, lease_ms: u64) {
        let every = self.inner.config.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let (lease_key, token) = (lease_key.clone(), token.clone());
            let renew = async move |mut conn: MultiplexedConnection| {
                RENEW.key(&lease_key).arg(&token).arg(lease_ms).invoke_async::<i64>(&mut conn).await
            };
            // Whatever the cool-down (an error elsewhere must not let the fleet compile too); only a
            // lease found lost ends the renewal. Unreachable, it is tried again a third later.
            if matches!(self.best_effort(renew).await, Ok(0)) {
                return; // lost: the compile goes on, and another host may compile too
            }
        }
    }

    /// Waits for another host's compile of `key`: until its manifest appears, its lease ends without
    /// one, or `deadline` passes (a caller that waits again keeps its first deadline, so that it waits
    /// [`RemoteConfig::wait`] in all).
    pub async fn wait_published(&self, key: &GraphKey, deadline: Instant) -> Waited {
        let base = base(key);
        let poll = Duration::from_millis(50).min(self.inner.config.lease / 3);
        loop {
            let (manifest_key, lease_key) = (format!("{base}:manifest"), format!("{base}:lease"));
            let look = async move |mut conn: MultiplexedConnection| {
                redis::pipe().exists(&manifest_key).exists(&lease_key).query_async::<(bool, bool)>(&mut conn).await
            };
            match self.call("wait", look).await {
                Ok((true, _)) => return Waited::Published,
                Ok((false, false)) => return Waited::Abandoned,
                Ok((false, true)) => {}
                Err(reason) => return Waited::Unavailable { reason },
            }
            if Instant::now() + poll > deadline {
                return Waited::TimedOut;
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Why the tier is skipped now, if it is (counted).
    fn skip(&self) -> Option<String> {
        let left = self.cooling_down()?;
        self.inner.counters.skipped.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.skipped.increment(1);
        Some(format!("cooling down after an error for {} ms more", left.as_millis()))
    }

    /// A connection, made when there is none. One caller connects at a time; those queued behind a
    /// failed attempt give up at once (the cool-down it started), rather than each trying in turn.
    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        if let Some(left) = self.cooling_down() {
            return Err(format!("cooling down after an error for {} ms more", left.as_millis()));
        }
        let conn = self.open().await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// A new connection, within the time bound.
    async fn open(&self) -> Result<MultiplexedConnection, String> {
        let timeout = self.inner.config.timeout;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        match tokio::time::timeout(timeout, self.inner.client.get_multiplexed_async_connection_with_config(&config))
            .await
        {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(error)) => Err(format!("connecting: {error}")),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> String {
        format!("no answer within {} ms (the remote timeout)", self.inner.config.timeout.as_millis())
    }

    /// One call to the server, bounded by the timeout; an error or a timeout starts the cool-down.
    async fn call<T, F, Fut>(&self, op: &'static str, work: F) -> Result<T, String>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if let Some(reason) = self.skip() {
            return Err(reason);
        }
        // Connecting and the call under one bound.
        let bounded = tokio::time::timeout(self.inner.config.timeout, async {
            let conn = self.connect().await?;
            work(conn).await.map_err(|error| error.to_string())
        });
        let result = match bounded.await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(reason)) => reason,
            Err(_) => self.timed_out(),
        };
        self.failed(op, &result);
        Err(result)
    }

    /// Starts the cool-down (first, so that callers queued for the connection give up), then drops
    /// the connection unless another caller holds its slot (a broken one fails its next call at once).
    fn failed(&self, op: &'static str, reason: &str) {
        self.inner.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.error(op).increment(1);
        let until = Instant::now() + self.inner.config.cool_down;
        let was_up = self.inner.down_until.lock().replace(until).is_none_or(|before| before <= Instant::now());
        if let Ok(mut slot) = self.inner.connection.try_lock() {
            *slot = None;
        }
        if was_up {
            let cool_down_ms = self.inner.config.cool_down.as_millis();
            tracing::warn!(
                remote = self.url(),
                op,
                reason,
                cool_down_ms,
                "remote graph tier unavailable; going on without it"
            );
        }
    }
}

/// Why a fetch did not store a graph.
enum Fault {
    Damaged(String),
    Unavailable(String),
    Local(String),
}

impl Fault {
    fn local(error: crate::StorageError) -> Self {
        Self::Local(error.to_string())
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Damaged(reason) | Self::Unavailable(reason) | Self::Local(reason) => f.write_str(reason),
        }
    }
}

/// The prefix of a key's entries: the storage format and the local file name's digest.
fn base(key: &GraphKey) -> String {
    format!("usine:graph:f{FORMAT_VERSION}:{}", key.file_name().trim_end_matches(".graph"))
}

async fn set(conn: &mut MultiplexedConnection, key: &str, value: &[u8], ttl_ms: Option<u64>) -> redis::RedisResult<()> {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value);
    if let Some(ttl_ms) = ttl_ms {
        cmd.arg("PX").arg(ttl_ms);
    }
    cmd.query_async::<()>(conn).await
}

/// Storage's file work on a blocking thread.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Fault> {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => Ok(value),
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err(Fault::Unavailable("the runtime is shutting down".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_never_shown() {
        assert_eq!(crate::redact_url("redis://:s3cret@cache.internal:6380/2"), "redis://:***@cache.internal:6380/2");
        assert_eq!(crate::redact_url("redis://fleet:s3cret@10.0.0.5"), "redis://fleet:***@10.0.0.5");
        assert_eq!(crate::redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        let error = RemoteTier::new(RemoteConfig::new("http://:pw@host")).unwrap_err();
        assert!(!error.to_string().contains("pw@"), "{error}");
    }

    #[test]
    fn settings_out_of_range_are_refused_by_name() {
        let refused = |change: fn(&mut RemoteConfig)| {
            let mut config = RemoteConfig::new("redis://127.0.0.1:1");
            change(&mut config);
            RemoteTier::new(config).unwrap_err().to_string()
        };
        assert!(refused(|c| c.chunk_bytes = MAX_CHUNK_BYTES + 1).contains("chunk_bytes"));
        assert!(refused(|c| c.timeout = Duration::ZERO).contains("timeout"));
        assert!(refused(|c| c.window = 0).contains("window"));
        assert!(refused(|c| c.ttl = Some(Duration::from_millis(10))).contains("ttl"));
        assert!(refused(|c| c.chunk_bytes = 1000).contains("chunk_bytes"));
        assert!(refused(|c| c.lease = Duration::from_secs(5)).contains("lease"));
        assert!(RemoteTier::new(RemoteConfig::new("redis://127.0.0.1:1")).is_ok());
    }

    /// No server listens: the first call fails within the time bound and starts the cool-down, and
    /// the next calls are skipped at once without a connection attempt.
    #[tokio::test]
    async fn an_unreachable_server_fails_open_and_cools_down() {
        let folder = tempfile::tempdir().unwrap();
        let store = StorageManager::open(crate::StorageConfig::at(folder.path()), crate::Migrations::new()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener); // a port nothing listens on
        let mut config = RemoteConfig::new(format!("redis://127.0.0.1:{port}"));
        config.timeout = Duration::from_millis(500);
        let tier = RemoteTier::new(config).unwrap();
        let key = GraphKey::new("m", "e", "1");
        assert!(matches!(tier.fetch(&store, &key).await, Fetched::Unavailable { .. }));
        assert_eq!(tier.stats().errors, 1);
        assert!(tier.cooling_down().is_some());
        assert!(matches!(tier.lease(&key).await, Leased::Unavailable { .. }));
        assert!(matches!(tier.publish(&store, &key).await, Published::Unavailable { .. }));
        let stats = tier.stats();
        assert_eq!((stats.errors, stats.skipped), (1, 2));
        assert!(tier.ping().await.is_err());
    }
}
