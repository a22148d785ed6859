//! The lab the executor's tests run in, a module of both test targets: `it`, where the lab's model
//! steps alone, and `batched`, where it batches. Each says which by its `BATCHING`.

use std::sync::Arc;
use std::time::Duration;

use usine_engine::scripted::{Script, ScriptHandle, ScriptedEngine};
use usine_engine::{MemoryPlan, ModelSpec, TokenId};
use usine_executor::{Event, ExecutorConfig, ExecutorError, GenerationStream, RetryPolicy, TaskExecutor, Timeouts};
use usine_kernel::{KernelConfig, ModelHandle, RuntimeManager};
use usine_memory::{ACTIVATIONS, KV_CACHE, MemoryManager, PoolConfig};
use usine_storage::{Migrations, StorageConfig, StorageManager};

use crate::BATCHING;

/// Steps a generation's sequence is computed ahead of the token it waits for: none where it steps
/// alone; one where it batches (the loop computes the next step while the generation sends the token
/// before it, so that every sequence of a pass is ready for the next without waiting for its task).
pub(crate) const AHEAD: u32 = if BATCHING.is_some() { 1 } else { 0 };

/// Bytes of kv-cache per token and of activations per step of the lab's models.
pub(crate) const KV_PER_TOKEN: u64 = 1024;
pub(crate) const ACTIVATIONS_PER_STEP: u64 = 4096;

pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    pub(crate) memory: MemoryManager,
    pub(crate) kernel: RuntimeManager,
    pub(crate) executor: TaskExecutor,
    pub(crate) script: ScriptHandle,
}

/// The lab's stage times: 5 ms to prepare, 20 ms to compute (the figures).
pub(crate) const PREPARE: Duration = Duration::from_millis(5);
pub(crate) const COMPUTE: Duration = Duration::from_millis(20);

/// Exact settings for timelines: no retry jitter, no time limits unless a test sets them.
pub(crate) fn config() -> ExecutorConfig {
    ExecutorConfig {
        retry: RetryPolicy { jitter: 0.0, ..RetryPolicy::default() },
        timeouts: Timeouts::default(),
        kv_up_front_share: 1.0, // the whole kv-cache up front, unless a test sets a share
        ..ExecutorConfig::default()
    }
}

pub(crate) fn fixture(config: ExecutorConfig) -> Fixture {
    fixture_with_pools(config, 1 << 20, 1 << 20)
}

pub(crate) fn fixture_with_pools(config: ExecutorConfig, kv_capacity: u64, activations_capacity: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let memory = MemoryManager::default();
    memory.create_pool(KV_CACHE, PoolConfig::new(kv_capacity, KV_PER_TOKEN).idle_timeout(None)).unwrap();
    memory.create_pool(ACTIVATIONS, PoolConfig::new(activations_capacity, 1024).idle_timeout(None)).unwrap();
    let storage = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    let kernel = RuntimeManager::new(KernelConfig::default(), &memory, storage).unwrap();
    let plan = MemoryPlan {
        weights_bytes: 1000,
        kv_bytes_per_token: KV_PER_TOKEN,
        activation_bytes_per_step: ACTIVATIONS_PER_STEP,
        max_context_tokens: 4096,
    };
    let script = Script { prepare: PREPARE, compute: COMPUTE, batch: BATCHING, ..Script::default() };
    let engine = ScriptedEngine::with_plan(plan, script);
    let script = engine.script();
    kernel.register_engine(Arc::new(engine));
    kernel.register_model(ModelSpec::new("lab", "zero", "default"));
    let executor = TaskExecutor::new(config, &kernel, &memory).unwrap();
    Fixture { _dir: dir, memory, kernel, executor, script }
}

impl Fixture {
    /// Loads the model ahead (its compile writes a file, which paused time does not wait for) and keeps
    /// it loaded, so that timelines start at the first step.
    pub(crate) async fn loaded(&self) -> ModelHandle {
        self.kernel.load_model("lab").await.unwrap()
    }

    pub(crate) fn used(&self, pool: &str) -> u64 {
        self.memory.pool_stats(pool).unwrap().used
    }
}

/// Every event of a stream, to its end.
pub(crate) async fn events(mut stream: GenerationStream) -> Vec<Result<Event, ExecutorError>> {
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        events.push(event);
    }
    events
}

/// The generated tokens among `events`.
pub(crate) fn tokens(events: &[Result<Event, ExecutorError>]) -> Vec<TokenId> {
    events.iter().filter_map(|event| if let Ok(Event::Token { id, .. }) = event { Some(*id) } else { None }).collect()
}
