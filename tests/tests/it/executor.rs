//! The executor over the kernel with the simulated WebLLM-like engine's 7B profile: a streamed answer
//! whose timeline is the seed's, exactly, and whose memory comes from the pools and goes back.

use std::sync::Arc;
use std::time::Duration;

use usine_engine::{FinishReason, ModelSpec};
use usine_engine_sim::SimConfig;
use usine_executor::{Event, ExecutorConfig, Request};
use usine_kernel::{KernelConfig, LoadSource, RuntimeManager};
use usine_memory::{KV_CACHE, MemoryManager, StandardPools};
use usine_storage::{Migrations, StorageConfig, StorageManager};

#[tokio::test(start_paused = true)]
async fn a_7b_answer_streams_at_the_profiles_pace_and_returns_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(8 << 30).unwrap()).unwrap();
    let kernel = RuntimeManager::new(KernelConfig::default(), &memory, storage).unwrap();
    kernel.register_engine(Arc::new(usine_engine_webllm::webllm(SimConfig::default()).unwrap()));
    kernel.register_model(ModelSpec::new("llama-7b", "webllm", "7b"));
    let executor = usine_executor::TaskExecutor::new(ExecutorConfig::default(), &kernel, &memory).unwrap();
    let profile = usine_engine_webllm::seven_b();
    let timeline = &profile.timeline;
    let kv_per_token = profile.shape.memory_plan(&usine_engine_sim::Q4).kv_bytes_per_token;

    for (round, source) in [(0, LoadSource::Compile), (1, LoadSource::Compile)] {
        let request = Request::prompt("llama-7b", "What does the kernel do?").max_tokens(64);
        let mut stream = executor.generate(request).unwrap();
        let Some(Ok(Event::Started { source: from, prompt_tokens, load, .. })) = stream.next().await else {
            panic!("no start")
        };
        assert_eq!(from, source, "the second request finds the model in memory, loaded by the first");
        assert_eq!(memory.pool_stats(KV_CACHE).unwrap().used, (u64::from(prompt_tokens) + 64) * kv_per_token);
        let output = stream.output().await.unwrap();
        let usage = output.usage;
        // The prefill of the prompt is one wait, rounded up to whole milliseconds by the timer.
        let micros = (timeline.prefill_per_token * prompt_tokens).as_micros();
        let prefill = Duration::from_millis(u64::try_from(micros.div_ceil(1000)).unwrap());
        let decode_start = prefill + timeline.prepare + timeline.compute;
        if round == 0 {
            assert_eq!(load, timeline.compile_total() + timeline.load);
            assert_eq!(usage.time_to_first_token, load + timeline.first_use + decode_start);
        } else {
            assert_eq!(load, Duration::ZERO);
            assert_eq!(usage.time_to_first_token, decode_start, "warm: no first-use cost");
        }
        assert!(usage.generated_tokens > 0 && !output.text.is_empty());
        if usage.generated_tokens > 1 {
            assert!((usage.tokens_per_second - 1.0 / timeline.compute.as_secs_f64()).abs() < 1e-9, "{usage:?}");
        }
        assert!(matches!(usage.finish, FinishReason::Length | FinishReason::EndOfSequence));
        assert_eq!(memory.pool_stats(KV_CACHE).unwrap().used, 0);
        assert_eq!(memory.pool_stats(usine_memory::ACTIVATIONS).unwrap().used, 0);
    }
}
