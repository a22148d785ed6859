//! The candle engine through the kernel, the store, the pools and the executor, with a small random
//! model: compiled once then loaded from the store, a damaged GGUF quarantined and compiled again, the
//! kv-cache pool holding exactly the plan while a generation runs, and a cancelled generation stopping.

use std::sync::Arc;
use std::time::Duration;

use usine_engine::ModelSpec;
use usine_engine_candle::{CandleEngine, NAME, PROFILE, Shape, WEIGHTS_OPTION, random_weights};
use usine_executor::{Event, ExecutorConfig, Request, TaskExecutor};
use usine_kernel::{KernelConfig, LoadSource, RuntimeManager};
use usine_memory::{ACTIVATIONS, KV_CACHE, MemoryManager, StandardPools};
use usine_storage::{Migrations, StorageConfig, StorageManager};

const SHAPE: Shape = Shape { dim: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 192, max_context: 512 };

struct Setup {
    dir: tempfile::TempDir,
    memory: MemoryManager,
    kernel: RuntimeManager,
    storage: StorageManager,
}

fn setup(dir: tempfile::TempDir) -> Setup {
    let weights = dir.path().join("weights.safetensors");
    if !weights.exists() {
        std::fs::write(&weights, random_weights(&SHAPE, 11).unwrap()).unwrap();
    }
    let storage = StorageManager::open(StorageConfig::at(dir.path().join("cache")), Migrations::new()).unwrap();
    let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(256 << 20).unwrap()).unwrap();
    let kernel = RuntimeManager::new(KernelConfig::default(), &memory, storage.clone()).unwrap();
    kernel.register_engine(Arc::new(CandleEngine::new()));
    let mut spec = ModelSpec::new("random", NAME, PROFILE).quantization("q4_0");
    spec.options.insert(WEIGHTS_OPTION.into(), weights.display().to_string());
    kernel.register_model(spec);
    Setup { dir, memory, kernel, storage }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_once_loaded_from_the_store_after_and_compiled_again_when_damaged() {
    let first = setup(tempfile::tempdir().unwrap());
    assert_eq!(first.kernel.load_model("random").await.unwrap().source(), LoadSource::Compile);
    let Setup { dir, storage, .. } = first;
    let second = setup(dir);
    assert_eq!(second.kernel.load_model("random").await.unwrap().source(), LoadSource::Disk);

    // Damage the stored GGUF: the next process quarantines it and compiles again.
    let entry = storage.list().unwrap().into_iter().next().unwrap();
    let path = storage.graphs_dir().join(&entry.file_name);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let Setup { dir, .. } = second;
    let third = setup(dir);
    assert_eq!(third.kernel.load_model("random").await.unwrap().source(), LoadSource::Compile);
    assert_eq!(std::fs::read_dir(third.storage.quarantine_dir()).unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_cache_pool_holds_the_plan_while_decoding_and_nothing_after_a_cancel() {
    let s = setup(tempfile::tempdir().unwrap());
    let plan = s.kernel.load_model("random").await.unwrap().memory_plan();
    let executor = TaskExecutor::new(ExecutorConfig::default(), &s.kernel, &s.memory).unwrap();
    let mut stream = executor.generate(Request::prompt("random", "Hello").max_tokens(400)).unwrap();
    let Some(Ok(Event::Started { prompt_tokens, .. })) = stream.next().await else { panic!("no start") };
    // The engine pages its kv-cache: the prompt and max_tokens in kv blocks of 16 tokens, each a whole
    // number of the pool's 4 KiB blocks.
    let blocks = (u64::from(prompt_tokens) + 400).div_ceil(16);
    let block_bytes = (16 * plan.kv_bytes_per_token).div_ceil(4096) * 4096;
    assert_eq!(s.memory.pool_stats(KV_CACHE).unwrap().used, blocks * block_bytes);
    for _ in 0..5 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream); // cancelled mid-generation
    // The cancel lands at the engine's next step on another thread: poll for it, with a deadline far
    // beyond a step's time, rather than sleeping a guessed while.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = executor.stats();
        let kv = s.memory.pool_stats(KV_CACHE).unwrap().used;
        let activations = s.memory.pool_stats(ACTIVATIONS).unwrap().used;
        if (kv, activations, stats.cancelled, stats.running) == (0, 0, 1, 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "10 s after the cancel: kv {kv} B, activations {activations} B, {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stats = executor.stats();
    assert!(stats.tokens < 400, "the forward loop stopped: {} tokens", stats.tokens);
    drop(s.dir);
}
