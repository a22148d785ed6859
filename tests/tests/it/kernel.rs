//! The kernel with the simulated WebLLM-like engine's 7B profile: the seed's timeline, exactly.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use usine_engine::ModelSpec;
use usine_engine_sim::SimConfig;
use usine_kernel::{KernelConfig, LoadSource, RuntimeManager};
use usine_memory::MemoryManager;
use usine_storage::{Migrations, StorageConfig, StorageManager};

#[tokio::test(start_paused = true)]
async fn a_7b_model_compiles_once_then_loads_from_disk_in_150_ms_then_from_memory_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    let memory = MemoryManager::default();
    let config = KernelConfig { weights_capacity: 8 << 30, ..KernelConfig::default() };
    let kernel = RuntimeManager::new(config, &memory, storage.clone()).unwrap();
    kernel.register_engine(Arc::new(usine_engine_webllm::webllm(SimConfig::default()).unwrap()));
    kernel.register_model(ModelSpec::new("llama-7b", "webllm", "7b"));

    let start = Instant::now();
    let first = kernel.load_model("llama-7b").await.unwrap();
    assert_eq!((first.source(), start.elapsed()), (LoadSource::Compile, Duration::from_millis(4000 + 150)));
    let weights = memory.pool_stats("weights").unwrap().used;
    assert_eq!(weights, first.memory_plan().weights_bytes);
    assert_eq!(storage.list().unwrap().len(), 1, "the 4 MiB graph is stored");
    drop(first);

    assert!(kernel.unload("llama-7b"));
    assert_eq!(memory.pool_stats("weights").unwrap().used, 0, "the weights went back to the pool");
    let start = Instant::now();
    let from_disk = kernel.load_model("llama-7b").await.unwrap();
    assert_eq!((from_disk.source(), start.elapsed()), (LoadSource::Disk, Duration::from_millis(150)));

    let start = Instant::now();
    let again = kernel.load_model("llama-7b").await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO, "a memory hit");
    drop((from_disk, again));
    let stats = kernel.stats();
    assert_eq!((stats.compiles, stats.disk_hits, stats.memory_hits), (1, 1, 1));
}
