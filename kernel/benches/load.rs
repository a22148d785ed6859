//! The kernel's own cost on the load path, with the zero engine (which costs nothing):
//! - a memory hit (`load_model` of a loaded model);
//! - a disk hit (the model unloaded, its graph stored) against storage's own `get` of the same graph,
//!   which is the floor. The goal, within 1.1 times the floor, and whether it holds today are in the
//!   README's last section.
//!
//! Run with `cargo bench -p usine-kernel`.

use std::sync::Arc;

use divan::{Bencher, black_box};
use usine_engine::{CompiledGraph, ModelSpec, ZeroEngine};
use usine_kernel::{KernelConfig, RuntimeManager};
use usine_memory::MemoryManager;
use usine_storage::{GraphKey, Migrations, StorageConfig, StorageManager};

fn main() {
    divan::main();
}

struct Setup {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    kernel: RuntimeManager,
    storage: StorageManager,
}

fn setup() -> Setup {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary folder");
    let storage = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).expect("a store");
    let kernel = runtime.block_on(async {
        let kernel =
            RuntimeManager::new(KernelConfig::default(), &MemoryManager::default(), storage.clone()).expect("a kernel");
        kernel.register_engine(Arc::new(ZeroEngine::new()));
        kernel.register_model(ModelSpec::new("m", "zero", "default"));
        drop(kernel.load_model("m").await.expect("compiles and loads"));
        kernel
    });
    Setup { _dir: dir, runtime, kernel, storage }
}

#[divan::bench]
fn memory_hit(bencher: Bencher<'_, '_>) {
    let s = setup();
    bencher.bench_local(|| s.runtime.block_on(async { black_box(s.kernel.load_model("m").await.expect("loaded")) }));
}

#[divan::bench(sample_size = 1)]
fn disk_hit(bencher: Bencher<'_, '_>) {
    let s = setup();
    // The unload happens before each measured load, outside the timing.
    bencher.with_inputs(|| assert!(s.kernel.unload("m"))).bench_local_values(|()| {
        s.runtime.block_on(async { black_box(s.kernel.load_model("m").await.expect("from disk")) })
    });
}

/// The floor: storage's own get of the graph the kernel loads.
#[divan::bench]
fn storage_get_floor(bencher: Bencher<'_, '_>) {
    let s = setup();
    let file = s.storage.list().expect("listed").pop().expect("one graph");
    let key: GraphKey = file.header().expect("valid").key.clone();
    bencher.bench_local(|| black_box(s.storage.get::<CompiledGraph>(&key).expect("read").hit().expect("a hit")));
}
