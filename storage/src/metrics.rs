//! The crate's metrics, through the `metrics` facade: names, descriptions, and the handles of a store.

use metrics::{Counter, Gauge, Histogram, Unit, describe_counter, describe_gauge, describe_histogram};

use crate::store::MissReason;

/// Graphs served.
pub const HITS_TOTAL: &str = "usine_storage_hits_total";
/// Lookups that found no usable graph, by reason.
pub const MISSES_TOTAL: &str = "usine_storage_misses_total";
/// Files moved to `graphs/quarantine/`.
pub const QUARANTINED_TOTAL: &str = "usine_storage_quarantined_total";
/// Graphs removed to stay under the size limit, or by cleanup.
pub const EVICTED_TOTAL: &str = "usine_storage_evicted_total";
/// Bytes of graph files read.
pub const READ_BYTES_TOTAL: &str = "usine_storage_read_bytes_total";
/// Bytes of graph files written.
pub const WRITTEN_BYTES_TOTAL: &str = "usine_storage_written_bytes_total";
/// Time to load a graph (read, verify, decode).
pub const LOAD_DURATION_SECONDS: &str = "usine_storage_load_duration_seconds";
/// Time to save a graph (encode, write, sync, rename).
pub const SAVE_DURATION_SECONDS: &str = "usine_storage_save_duration_seconds";
/// Graph files in the store, as of the last scan.
pub const GRAPHS: &str = "usine_storage_graphs";
/// Bytes of graph files in the store, as of the last scan.
pub const STORED_BYTES: &str = "usine_storage_stored_bytes";

/// Graphs fetched from the remote tier and stored locally.
pub const REMOTE_HITS_TOTAL: &str = "usine_storage_remote_hits_total";
/// Remote fetches that found no graph.
pub const REMOTE_MISSES_TOTAL: &str = "usine_storage_remote_misses_total";
/// Damaged remote graphs found (never served, their manifest deleted).
pub const REMOTE_DAMAGED_TOTAL: &str = "usine_storage_remote_damaged_total";
/// Bytes moved to and from the remote tier, by direction.
pub const REMOTE_BYTES_TOTAL: &str = "usine_storage_remote_bytes_total";
/// Remote calls that failed or timed out, by operation.
pub const REMOTE_ERRORS_TOTAL: &str = "usine_storage_remote_errors_total";
/// Remote calls skipped while the tier cools down after an error.
pub const REMOTE_SKIPPED_TOTAL: &str = "usine_storage_remote_skipped_total";
/// Graphs not published for being over the size cap.
pub const REMOTE_OVERSIZED_TOTAL: &str = "usine_storage_remote_oversized_total";
/// Time to fetch a graph into the local store (chunks, checks, write, verify).
pub const REMOTE_FETCH_SECONDS: &str = "usine_storage_remote_fetch_seconds";
/// Time to publish a graph (chunks and manifest).
pub const REMOTE_PUBLISH_SECONDS: &str = "usine_storage_remote_publish_seconds";

/// Describes every metric of this crate to the installed recorder.
///
/// [`StorageManager::open`](crate::StorageManager::open) calls it; calling it again is harmless.
pub fn describe_metrics() {
    describe_counter!(HITS_TOTAL, Unit::Count, "Compiled graphs served from the store.");
    describe_counter!(
        MISSES_TOTAL,
        Unit::Count,
        "Lookups with no usable graph, by reason: absent, corrupt, unsupported_version, key_mismatch, migration_failed, undecodable."
    );
    describe_counter!(QUARANTINED_TOTAL, Unit::Count, "Damaged graph files moved to graphs/quarantine/.");
    describe_counter!(EVICTED_TOTAL, Unit::Count, "Graphs removed by the size limit or by cleanup.");
    describe_counter!(READ_BYTES_TOTAL, Unit::Bytes, "Bytes of graph files read.");
    describe_counter!(WRITTEN_BYTES_TOTAL, Unit::Bytes, "Bytes of graph files written.");
    describe_histogram!(LOAD_DURATION_SECONDS, Unit::Seconds, "Time to read, verify and decode a graph.");
    describe_histogram!(SAVE_DURATION_SECONDS, Unit::Seconds, "Time to encode, write, sync and rename a graph.");
    describe_gauge!(GRAPHS, Unit::Count, "Graph files in the store, as of the last scan.");
    describe_gauge!(STORED_BYTES, Unit::Bytes, "Bytes of graph files in the store, as of the last scan.");
    describe_counter!(
        REMOTE_HITS_TOTAL,
        Unit::Count,
        "Graphs fetched from the remote tier (Redis) and stored locally."
    );
    describe_counter!(REMOTE_MISSES_TOTAL, Unit::Count, "Remote fetches that found no graph.");
    describe_counter!(
        REMOTE_DAMAGED_TOTAL,
        Unit::Count,
        "Damaged remote graphs found: never served, their manifest deleted."
    );
    describe_counter!(
        REMOTE_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes moved to and from the remote tier, by direction: fetched, published."
    );
    describe_counter!(REMOTE_ERRORS_TOTAL, Unit::Count, "Remote calls that failed or timed out, by operation.");
    describe_counter!(
        REMOTE_SKIPPED_TOTAL,
        Unit::Count,
        "Remote calls skipped while the tier cools down after an error."
    );
    describe_counter!(REMOTE_OVERSIZED_TOTAL, Unit::Count, "Graphs not published for being over the remote size cap.");
    describe_histogram!(
        REMOTE_FETCH_SECONDS,
        Unit::Seconds,
        "Time to fetch a graph from the remote tier into the local store."
    );
    describe_histogram!(REMOTE_PUBLISH_SECONDS, Unit::Seconds, "Time to publish a graph to the remote tier.");
}

/// The metric handles of a remote tier.
#[cfg(feature = "remote")]
pub(crate) struct RemoteMetrics {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) damaged: Counter,
    pub(crate) fetched_bytes: Counter,
    pub(crate) published_bytes: Counter,
    pub(crate) skipped: Counter,
    pub(crate) oversized: Counter,
    pub(crate) fetch: Histogram,
    pub(crate) publish: Histogram,
}

#[cfg(feature = "remote")]
impl RemoteMetrics {
    pub(crate) fn register() -> Self {
        describe_metrics();
        Self {
            hits: metrics::counter!(REMOTE_HITS_TOTAL),
            misses: metrics::counter!(REMOTE_MISSES_TOTAL),
            damaged: metrics::counter!(REMOTE_DAMAGED_TOTAL),
            fetched_bytes: metrics::counter!(REMOTE_BYTES_TOTAL, "direction" => "fetched"),
            published_bytes: metrics::counter!(REMOTE_BYTES_TOTAL, "direction" => "published"),
            skipped: metrics::counter!(REMOTE_SKIPPED_TOTAL),
            oversized: metrics::counter!(REMOTE_OVERSIZED_TOTAL),
            fetch: metrics::histogram!(REMOTE_FETCH_SECONDS),
            publish: metrics::histogram!(REMOTE_PUBLISH_SECONDS),
        }
    }

    pub(crate) fn error(&self, op: &'static str) -> Counter {
        metrics::counter!(REMOTE_ERRORS_TOTAL, "op" => op)
    }
}

/// The metric handles of one store.
pub(crate) struct StoreMetrics {
    pub(crate) hits: Counter,
    misses: [Counter; 6],
    pub(crate) quarantined: Counter,
    pub(crate) evicted: Counter,
    pub(crate) read_bytes: Counter,
    pub(crate) written_bytes: Counter,
    pub(crate) load: Histogram,
    pub(crate) save: Histogram,
    pub(crate) graphs: Gauge,
    pub(crate) bytes: Gauge,
}

impl StoreMetrics {
    pub(crate) fn register() -> Self {
        describe_metrics();
        let miss = |reason: MissReason| metrics::counter!(MISSES_TOTAL, "reason" => reason.as_str());
        Self {
            hits: metrics::counter!(HITS_TOTAL),
            misses: MissReason::ALL.map(miss),
            quarantined: metrics::counter!(QUARANTINED_TOTAL),
            evicted: metrics::counter!(EVICTED_TOTAL),
            read_bytes: metrics::counter!(READ_BYTES_TOTAL),
            written_bytes: metrics::counter!(WRITTEN_BYTES_TOTAL),
            load: metrics::histogram!(LOAD_DURATION_SECONDS),
            save: metrics::histogram!(SAVE_DURATION_SECONDS),
            graphs: metrics::gauge!(GRAPHS),
            bytes: metrics::gauge!(STORED_BYTES),
        }
    }

    pub(crate) fn miss(&self, reason: MissReason) -> &Counter {
        &self.misses[reason as usize]
    }
}

/// Byte and count figures as gauge values; exact up to 2^53, far beyond any store.
#[allow(clippy::cast_precision_loss, reason = "exact below 2^53 bytes (8 PiB)")]
pub(crate) fn to_f64(value: u64) -> f64 {
    value as f64
}
