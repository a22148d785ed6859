//! Looking after the store: listing, verifying, stats, explaining misses, pins, eviction, cleanup and
//! migration. Everything here reads the folder itself, so it sees the work of other processes too.

use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crate::codec::CODEC;
use crate::error::{Result, StorageError};
use crate::format::{self, Corruption, Decoded, Header, HeaderRead};
use crate::key::{GraphKey, KeyPart};
use crate::metrics::to_f64;
use crate::store::{FileId, GRAPH_EXT, MissReason, StorageManager};

/// One graph file, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The file name (a digest of the key).
    pub file_name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Last use: saved or served.
    pub last_use: SystemTime,
    /// What its header says.
    pub status: EntryStatus,
    /// Which file it was, to act on this file and not on one saved at its path since.
    pub(crate) id: FileId,
}

/// What a listed file's header says, read without touching the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryStatus {
    /// A readable header.
    Valid(Box<Header>),
    /// A format newer than this build's: left alone.
    Newer(u16),
    /// A header that does not read: a damaged file.
    Unreadable(Corruption),
    /// A file this process may not open (another user's, say).
    Inaccessible(String),
}

impl Entry {
    /// The header, when it reads.
    pub fn header(&self) -> Option<&Header> {
        match &self.status {
            EntryStatus::Valid(header) => Some(header),
            _ => None,
        }
    }

    /// Whether this build owns the file: its format and codec. Files of a newer usine, and files this
    /// process cannot open, are never evicted or cleaned up.
    fn is_ours(&self) -> bool {
        match &self.status {
            EntryStatus::Valid(header) => header.codec == CODEC,
            EntryStatus::Unreadable(_) => true,
            EntryStatus::Newer(_) | EntryStatus::Inaccessible(_) => false,
        }
    }
}

/// What [`StorageManager::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Files whole and valid.
    pub valid: usize,
    /// Files of a newer format, left alone.
    pub newer: usize,
    /// Files moved to quarantine, with the reason.
    pub quarantined: Vec<(String, String)>,
}

/// Counters since the store was opened in this process, and the folder as it is now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// Graph files in the folder.
    pub graphs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Graphs served.
    pub hits: u64,
    /// Misses, by reason, in the order of [`MissReason::ALL`].
    pub misses: [u64; 6],
    /// Graphs saved.
    pub saves: u64,
    /// Files moved to quarantine.
    pub quarantined: u64,
    /// Graphs evicted or cleaned up.
    pub evicted: u64,
    /// Bytes of graph files read.
    pub bytes_read: u64,
    /// Bytes of graph files written.
    pub bytes_written: u64,
}

impl StorageStats {
    /// Misses for one reason.
    pub fn misses(&self, reason: MissReason) -> u64 {
        self.misses[reason as usize]
    }
}

/// Why a key has no graph, part by part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The key asked about.
    pub key: GraphKey,
    /// Whether a file with its name exists.
    pub stored: bool,
    /// The stored graph closest to the key (fewest differing parts), and the parts that differ.
    pub closest: Option<(GraphKey, Vec<KeyPart>)>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.stored {
            return write!(f, "a graph is stored for {}", self.key);
        }
        write!(f, "no graph is stored for {}", self.key)?;
        match &self.closest {
            None => write!(f, "; the store holds no graph"),
            Some((closest, differs)) => {
                let parts: Vec<String> = differs
                    .iter()
                    .map(|&part| format!("{part} ({} stored, {} asked)", closest.part(part), self.key.part(part)))
                    .collect();
                write!(f, "; the closest stored graph differs in {}", parts.join(", "))
            }
        }
    }
}

/// What to clean up; see [`StorageManager::cleanup`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Remove graphs not used for longer than this.
    pub unused_for: Option<Duration>,
    /// The engines whose current version and schema are known: their graphs of an older engine
    /// version, or of an older schema that no migration reaches, can never be asked for again.
    pub current: Vec<CurrentEngine>,
}

/// An engine as this build runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentEngine {
    /// Its name, as in keys.
    pub engine: String,
    /// Its version, as in keys; dotted numbers compare as numbers.
    pub version: String,
    /// The schema of the graphs it asks for.
    pub schema: u32,
}

/// What a cleanup or a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Graphs removed (or migrated), with why.
    pub done: Vec<(GraphKey, String)>,
    /// Graphs that could not be migrated, with why; left alone.
    pub failed: Vec<(GraphKey, String)>,
}

/// Keeps a graph from eviction and cleanup while it lives; see [`StorageManager::pin`].
#[derive(Debug)]
pub struct Pin {
    store: StorageManager,
    file_name: String,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.store.inner.pins.lock();
        if let Some(count) = pins.get_mut(&self.file_name) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.file_name);
            }
        }
    }
}

impl StorageManager {
    /// Every graph file with its header, read without touching the payloads.
    pub fn list(&self) -> Result<Vec<Entry>> {
        let dir = &self.inner.graphs;
        let mut entries = Vec::new();
        for entry in fs::read_dir(dir).map_err(StorageError::io("listing", dir))? {
            let entry = entry.map_err(StorageError::io("listing", dir))?;
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != GRAPH_EXT) || !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
                Err(error) => return Err(StorageError::io("reading metadata of", &path)(error)),
            };
            let status = match File::open(&path) {
                Ok(mut file) => match format::read_header(|buf| file.read(buf)) {
                    Ok(HeaderRead::Valid(header)) => EntryStatus::Valid(Box::new(header)),
                    Ok(HeaderRead::Newer(format)) => EntryStatus::Newer(format),
                    Ok(HeaderRead::Unreadable(corruption)) => EntryStatus::Unreadable(corruption),
                    Err(error) => EntryStatus::Inaccessible(error.to_string()),
                },
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => EntryStatus::Inaccessible(error.to_string()),
            };
            entries.push(Entry {
                file_name: entry.file_name().to_string_lossy().into_owned(),
                bytes: metadata.len(),
                last_use: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                status,
                id: FileId::of(&metadata),
            });
        }
        entries.sort_by(|a, b| a.file_name.cmp(&b.file_name));
        self.set_gauges(&entries);
        Ok(entries)
    }

    fn set_gauges(&self, entries: &[Entry]) {
        self.inner.metrics.graphs.set(to_f64(entries.len() as u64));
        self.inner.metrics.bytes.set(to_f64(entries.iter().map(|entry| entry.bytes).sum()));
    }

    pub(crate) fn refresh_gauges(&self) -> Result<()> {
        self.list().map(drop)
    }

    /// Reads and verifies every graph file; damaged ones (and files whose header holds another key than
    /// their name says) go to quarantine. Files of a newer usine are counted and left alone.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        for entry in self.list()? {
            if let EntryStatus::Inaccessible(_) = entry.status {
                report.newer += 1; // not ours to judge
                continue;
            }
            let path = self.inner.graphs.join(&entry.file_name);
            let (id, bytes) = match File::open(&path).and_then(|mut file| {
                let id = FileId::of(&file.metadata()?);
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes).map(|_| (id, bytes))
            }) {
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(StorageError::io("reading", &path)(error)),
            };
            let problem = match format::decode(&bytes) {
                Ok(Decoded::Newer { .. }) => {
                    report.newer += 1;
                    continue;
                }
                Ok(Decoded::Valid { header, .. }) if header.codec != CODEC => {
                    report.newer += 1;
                    continue;
                }
                Ok(Decoded::Valid { header, .. }) if header.key.file_name() != entry.file_name => {
                    "key_mismatch".to_owned()
                }
                Ok(Decoded::Valid { .. }) => {
                    report.valid += 1;
                    continue;
                }
                Err(corruption) => corruption.as_str().to_owned(),
            };
            self.quarantine(&path, id, &problem)?;
            report.quarantined.push((entry.file_name, problem));
        }
        self.refresh_gauges()?;
        Ok(report)
    }

    /// Counters since the store was opened in this process, and the folder's graphs and bytes now.
    pub fn stats(&self) -> Result<StorageStats> {
        let entries = self.list()?;
        let counters = &self.inner.counters;
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        Ok(StorageStats {
            graphs: entries.len(),
            bytes: entries.iter().map(|entry| entry.bytes).sum(),
            hits: load(&counters.hits),
            misses: std::array::from_fn(|index| load(&counters.misses[index])),
            saves: load(&counters.saves),
            quarantined: load(&counters.quarantined),
            evicted: load(&counters.evicted),
            bytes_read: load(&counters.bytes_read),
            bytes_written: load(&counters.bytes_written),
        })
    }

    /// Why `key` has no graph: whether its file exists, and how the closest stored graph differs.
    pub fn explain(&self, key: &GraphKey) -> Result<Explanation> {
        let stored = self.path_of(key).exists();
        let closest = self
            .list()?
            .into_iter()
            .filter_map(|entry| entry.header().map(|header| header.key.clone()))
            .map(|stored| {
                let differs = key.differences(&stored);
                (stored, differs)
            })
            .filter(|(_, differs)| !differs.is_empty())
            // Fewest differing parts; among equals, the one that differs latest in key order.
            .min_by_key(|(_, differs)| (differs.len(), std::cmp::Reverse(differs.first().copied())));
        Ok(Explanation { key: key.clone(), stored, closest })
    }

    /// Keeps `key`'s graph from eviction and cleanup until the returned pin is dropped (its model is
    /// loaded, say). Pins hold in this process only.
    pub fn pin(&self, key: &GraphKey) -> Pin {
        let file_name = key.file_name();
        *self.inner.pins.lock().entry(file_name.clone()).or_default() += 1;
        Pin { store: self.clone(), file_name }
    }

    fn is_pinned(&self, file_name: &str) -> bool {
        self.inner.pins.lock().contains_key(file_name)
    }

    /// Evicts the least recently used graphs, never a pinned one nor one of a newer usine, until the store
    /// is under its limit (or nothing more may go).
    pub fn enforce_limit(&self) -> Result<Vec<GraphKey>> {
        let Some(limit) = self.inner.config.max_bytes else { return Ok(Vec::new()) };
        let mut entries = self.list()?;
        let mut total: u64 = entries.iter().map(|entry| entry.bytes).sum();
        if total <= limit {
            return Ok(Vec::new());
        }
        entries.sort_by(|a, b| (a.last_use, &a.file_name).cmp(&(b.last_use, &b.file_name)));
        let mut evicted = Vec::new();
        for entry in entries {
            if total <= limit {
                break;
            }
            if self.is_pinned(&entry.file_name) || !entry.is_ours() {
                continue;
            }
            if self.remove_exact(&self.inner.graphs.join(&entry.file_name), entry.id)? {
                total -= entry.bytes;
                let model = entry.header().map(|header| header.key.model.as_str());
                tracing::info!(
                    file = entry.file_name,
                    model,
                    bytes = entry.bytes,
                    limit,
                    "graph evicted: the store is over its limit"
                );
                self.count_evicted();
                if let Some(header) = entry.header() {
                    evicted.push(header.key.clone());
                }
            }
        }
        self.refresh_gauges()?;
        Ok(evicted)
    }

    /// Removes the file `entry` lists, unless another process saved a new file at its path since the
    /// listing; returns whether it removed it.
    pub fn remove_listed(&self, entry: &Entry) -> Result<bool> {
        let removed = self.remove_exact(&self.inner.graphs.join(&entry.file_name), entry.id)?;
        if removed {
            self.refresh_gauges()?;
        }
        Ok(removed)
    }

    fn count_evicted(&self) {
        self.inner.counters.evicted.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.evicted.increment(1);
    }

    /// Removes the graphs that can never be asked for again (an engine version older than the current
    /// one, or an older schema no migration reaches) and the graphs of any version unused for longer
    /// than `unused_for`. Never a pinned graph, and never a file of a newer format or codec.
    pub fn cleanup(&self, policy: &Cleanup) -> Result<Maintenance> {
        let now = SystemTime::now();
        let mut report = Maintenance::default();
        for entry in self.list()? {
            if self.is_pinned(&entry.file_name) || !entry.is_ours() {
                continue;
            }
            let Some(header) = entry.header() else { continue };
            let key = &header.key;
            let idle = now.duration_since(entry.last_use).unwrap_or_default();
            let reason = if policy.unused_for.is_some_and(|limit| idle > limit) {
                Some(format!("unused for {}s", idle.as_secs()))
            } else {
                policy.current.iter().find(|current| current.engine == key.engine).and_then(|current| {
                    if older_version(&key.engine_version, &current.version) {
                        Some(format!("engine version {} is older than {}", key.engine_version, current.version))
                    } else if key.schema < current.schema
                        && !self.inner.migrations.sources(&key.engine, current.schema).contains(&key.schema)
                    {
                        Some(format!("schema {} cannot be migrated to {}", key.schema, current.schema))
                    } else {
                        None
                    }
                })
            };
            if let Some(reason) = reason
                && self.remove_exact(&self.inner.graphs.join(&entry.file_name), entry.id)?
            {
                tracing::info!(file = entry.file_name, model = key.model, reason, "graph cleaned up");
                self.count_evicted();
                report.done.push((key.clone(), reason));
            }
        }
        self.refresh_gauges()?;
        Ok(report)
    }

    /// Upgrades, in place and atomically, every graph stored at a schema older than the newest its
    /// engine's migrations reach.
    pub fn migrate(&self) -> Result<Maintenance> {
        let mut report = Maintenance::default();
        for entry in self.list()? {
            let Some(header) = entry.header() else { continue };
            let old_key = header.key.clone();
            let Some(latest) = self.inner.migrations.latest(&old_key.engine) else { continue };
            if old_key.schema >= latest {
                continue;
            }
            let new_key = old_key.clone().schema(latest);
            let old_path = self.inner.graphs.join(&entry.file_name);
            if self.path_of(&new_key).exists() {
                // Already stored at the newest schema: the old file is obsolete.
                if self.remove_exact(&old_path, entry.id)? {
                    report.done.push((old_key, format!("schema {latest} was already stored")));
                }
                continue;
            }
            match self.upgrade(&new_key, old_key.schema)? {
                None => report.failed.push((old_key, "unreadable; see verify".to_owned())),
                Some(Err(message)) => report.failed.push((old_key, message)),
                Some(Ok(upgraded)) => {
                    self.save_encoded(&new_key, &upgraded.payload, &upgraded.raw)?;
                    // The file upgraded, which may be newer than the one listed; never a file saved since.
                    self.remove_exact(&old_path, upgraded.source)?;
                    report.done.push((old_key.clone(), format!("schema {} -> {latest}", old_key.schema)));
                }
            }
        }
        Ok(report)
    }
}

/// Whether engine version `a` is older than `b`, by semantic versioning (`0.2.78-sim` is older than
/// `0.2.79-sim`; a pre-release is older than its release). A version of one or two numbers has the rest
/// as zeros (`1.0` is `1.0.0`); versions that do not parse are never called older.
fn older_version(a: &str, b: &str) -> bool {
    match (lenient_semver(a), lenient_semver(b)) {
        (Some(a), Some(b)) => a.cmp_precedence(&b).is_lt(),
        _ => false,
    }
}

fn lenient_semver(version: &str) -> Option<semver::Version> {
    let split = version.find(['-', '+']).unwrap_or(version.len());
    let (core, rest) = version.split_at(split);
    let padding = match core.split('.').count() {
        1 => ".0.0",
        2 => ".0",
        _ => "",
    };
    semver::Version::parse(&format!("{core}{padding}{rest}")).ok()
}

#[cfg(test)]
mod tests {
    use super::older_version;

    #[test]
    fn versions_compare_by_semver_with_missing_parts_as_zeros() {
        assert!(older_version("0.2.9", "0.2.79"));
        assert!(older_version("1.9", "1.10"));
        assert!(!older_version("1.0", "1.0.0"));
        assert!(!older_version("1.0.0", "1.0"));
        assert!(older_version("1.0", "1.0.1"));
        assert!(!older_version("2.0", "1.99.99"));
        assert!(!older_version("nightly", "1.0"), "what does not parse is never older");
        assert!(older_version("0.2.78-sim", "0.2.79-sim"), "the simulated engines' versions");
        assert!(!older_version("0.2.79-sim", "0.2.79-sim"));
        assert!(older_version("0.2.79-sim", "0.2.79"), "a pre-release is older than its release");
        assert!(older_version("1.0.0-alpha", "1.0.0-beta"));
        assert!(!older_version("1.0.0+build.1", "1.0.0+build.2"), "build metadata does not order");
    }
}
