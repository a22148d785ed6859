//! Loading and saving compiled graphs, against the floor and the peer, in one run.
//!
//! - `get`: a stored graph of 1, 16, 64 and 256 MiB, verified and decoded, read by mapping the file
//!   (`usine_mapped`) or by reading it into a buffer (`usine_read`); against `std::fs::read` of the same
//!   file (the floor for a copy, no verification), the same plus one checksum pass (the floor for a
//!   verified copy) and `cacache::read_sync` of the same bytes (the peer: a content-addressed cache
//!   that checks integrity), written with its default SHA-256 (`cacache_read`) and with XXH3-128, the
//!   hash usine checks (`cacache_read_xxh3`).
//! - `save`: the same graphs saved (`usine`: encode, XXH3-128, write, fsync, rename, fsync the folder;
//!   the store has no setting for another hash or for skipping the fsyncs) against `cacache::write_sync`
//!   as it is (SHA-256, no fsync: `cacache_write`), with XXH3-128 (`cacache_write_xxh3`), and with
//!   XXH3-128 then an fsync of the two files it wrote and of their folders (`cacache_write_xxh3_synced`:
//!   the same hash and the same durability as usine).
//!
//! Run with `cargo bench -p usine-storage`; the figures are in the README's last section.

use std::fs::File;
use std::path::{Path, PathBuf};

use divan::{Bencher, black_box};
use serde::{Deserialize, Serialize};
use usine_storage::{GraphKey, Lookup, Migrations, StorageConfig, StorageManager};

const MIB: usize = 1 << 20;
const SIZES: [usize; 4] = [1, 16, 64, 256];

fn main() {
    divan::main();
}

/// A compiled graph: a little metadata and a large blob.
#[derive(Serialize, Deserialize)]
struct Graph {
    name: String,
    #[serde(with = "serde_bytes")]
    weights: Vec<u8>,
}

fn graph(mib: usize) -> Graph {
    Graph {
        name: format!("bench-{mib}"),
        weights: (0..mib * MIB).map(|i| u8::try_from(i * 31 % 251).expect("below 251")).collect(),
    }
}

fn key(mib: usize) -> GraphKey {
    GraphKey::new(format!("bench-{mib}"), "webllm", "1").device("cpu")
}

/// A store holding the graph of `mib` MiB, mapping files from `map_threshold` bytes, and the same
/// payload bytes in a cacache folder beside it, under `graph` (SHA-256) and `graph-xxh3` (XXH3-128).
struct Setup {
    _dir: tempfile::TempDir,
    store: StorageManager,
    file: PathBuf,
    cacache: PathBuf,
}

fn setup(mib: usize, map_threshold: u64) -> Setup {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let config = StorageConfig { map_threshold, ..StorageConfig::at(dir.path().join("usine")) };
    let store = StorageManager::open(config, Migrations::new()).expect("a store");
    let graph = graph(mib);
    let file = store.save(&key(mib), &graph).expect("saved").path;
    let cacache = dir.path().join("cacache");
    cacache::write_sync(&cacache, "graph", &graph.weights).expect("written");
    cacache::write_sync_with_algo(cacache::Algorithm::Xxh3, &cacache, "graph-xxh3", &graph.weights).expect("written");
    Setup { _dir: dir, store, file, cacache }
}

#[divan::bench_group(sample_count = 10, sample_size = 1)]
mod get {
    use super::*;

    fn usine(bencher: Bencher<'_, '_>, mib: usize, map_threshold: u64) {
        let setup = setup(mib, map_threshold);
        bencher.bench_local(|| {
            let Lookup::Hit(hit) = setup.store.get::<Graph>(&key(mib)).expect("no error") else { panic!("a miss") };
            black_box(hit.graph.weights.len())
        });
    }

    #[divan::bench(args = SIZES)]
    fn usine_mapped(bencher: Bencher<'_, '_>, mib: usize) {
        usine(bencher, mib, 0);
    }

    #[divan::bench(args = SIZES)]
    fn usine_read(bencher: Bencher<'_, '_>, mib: usize) {
        usine(bencher, mib, u64::MAX);
    }

    #[divan::bench(args = SIZES)]
    fn fs_read(bencher: Bencher<'_, '_>, mib: usize) {
        let setup = setup(mib, 0);
        bencher.bench_local(|| black_box(std::fs::read(&setup.file).expect("read").len()));
    }

    /// The floor for a verified read: the copy, plus one pass of the checksum over the file.
    #[divan::bench(args = SIZES)]
    fn fs_read_and_checksum(bencher: Bencher<'_, '_>, mib: usize) {
        let setup = setup(mib, 0);
        bencher.bench_local(|| {
            let bytes = std::fs::read(&setup.file).expect("read");
            black_box(twox_hash::XxHash3_128::oneshot(&bytes))
        });
    }

    #[divan::bench(args = SIZES)]
    fn cacache_read(bencher: Bencher<'_, '_>, mib: usize) {
        let setup = setup(mib, 0);
        bencher.bench_local(|| black_box(cacache::read_sync(&setup.cacache, "graph").expect("read").len()));
    }

    #[divan::bench(args = SIZES)]
    fn cacache_read_xxh3(bencher: Bencher<'_, '_>, mib: usize) {
        let setup = setup(mib, 0);
        bencher.bench_local(|| black_box(cacache::read_sync(&setup.cacache, "graph-xxh3").expect("read").len()));
    }
}

#[divan::bench_group(sample_count = 5, sample_size = 1)]
mod save {
    use super::*;

    #[divan::bench(args = SIZES)]
    fn usine(bencher: Bencher<'_, '_>, mib: usize) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let store = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).expect("a store");
        let graph = graph(mib);
        bencher.bench_local(|| black_box(store.save(&key(mib), &graph).expect("saved").bytes));
    }

    #[divan::bench(args = SIZES)]
    fn cacache_write(bencher: Bencher<'_, '_>, mib: usize) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let graph = graph(mib);
        bencher.bench_local(|| black_box(cacache::write_sync(dir.path(), "graph", &graph.weights).expect("written")));
    }

    fn write_xxh3(cache: &Path, graph: &Graph) -> cacache::Integrity {
        cacache::write_sync_with_algo(cacache::Algorithm::Xxh3, cache, "graph", &graph.weights).expect("written")
    }

    #[divan::bench(args = SIZES)]
    fn cacache_write_xxh3(bencher: Bencher<'_, '_>, mib: usize) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let graph = graph(mib);
        bencher.bench_local(|| black_box(write_xxh3(dir.path(), &graph)));
    }

    /// Each write followed by what usine does for durability: fsync the files written (here the content
    /// file and the index bucket, found after a first write: the same paths every time) and the folders
    /// that name them.
    #[divan::bench(args = SIZES)]
    fn cacache_write_xxh3_synced(bencher: Bencher<'_, '_>, mib: usize) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let graph = graph(mib);
        write_xxh3(dir.path(), &graph);
        let files = files_under(dir.path());
        assert_eq!(files.len(), 2, "one content file and one index bucket: {files:?}");
        let folders: Vec<PathBuf> =
            files.iter().map(|file| file.parent().expect("inside the cache").to_owned()).collect();
        bencher.bench_local(|| {
            let integrity = write_xxh3(dir.path(), &graph);
            for path in files.iter().chain(&folders) {
                File::open(path).and_then(|file| file.sync_all()).expect("synced");
            }
            black_box(integrity)
        });
    }

    /// The files under `dir`, but for cacache's folder of temporary files.
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).expect("readable") {
            let path = entry.expect("readable").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|name| name != "tmp") {
                    files.extend(files_under(&path));
                }
            } else {
                files.push(path);
            }
        }
        files
    }
}
