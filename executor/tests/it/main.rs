//! Integration tests of `usine-executor`, on paused time, with the zero engine slowed down to a known
//! timeline (a prepare stage, a compute stage, a prefill) and faults injected at chosen steps.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

mod admission;
mod cancel;
mod memory;
mod pipeline;
mod reader;
mod retry;
mod telemetry;
mod timeouts;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use usine_engine::{
    CompiledGraph, Detokenizer, Engine, EngineDescriptor, EngineError, LoadedModel, MemoryPlan, ModelSpec, Prefill,
    Prepared, ProgressSink, Sequence, Token, TokenId, ZeroEngine,
};
use usine_executor::{Event, ExecutorConfig, ExecutorError, GenerationStream, RetryPolicy, TaskExecutor, Timeouts};
use usine_kernel::{KernelConfig, ModelHandle, RuntimeManager};
use usine_memory::{ACTIVATIONS, KV_CACHE, MemoryManager, PoolConfig};
use usine_storage::{Migrations, StorageConfig, StorageManager};

/// Bytes of kv-cache per token and of activations per step of the lab's models.
const KV_PER_TOKEN: u64 = 1024;
const ACTIVATIONS_PER_STEP: u64 = 4096;

/// What the lab engine does, and what it saw.
#[derive(Default)]
struct Script {
    prepare: Duration,
    compute: Duration,
    prefill: Duration,
    /// Step → failures left: the compute of that step fails with a transient error.
    transient: BTreeMap<u32, u32>,
    /// The compute of this step fails with a fatal error.
    fatal: Option<u32>,
    /// The compute of this step takes this much longer.
    stall: Option<(u32, Duration)>,
    /// The compute of this step ends the sequence.
    end_at: Option<u32>,
    /// The compute of this step panics (an engine bug).
    panic_at: Option<u32>,
    /// Every prefill: prompt tokens, tokens already generated, `max_tokens` asked.
    prefills: Vec<(usize, usize, u32)>,
    /// Computes started.
    computes: u32,
}

/// The zero engine, slowed down and made to fail as the script says.
struct Lab {
    zero: ZeroEngine,
    script: Arc<Mutex<Script>>,
}

#[async_trait::async_trait]
impl Engine for Lab {
    fn descriptor(&self) -> &EngineDescriptor {
        self.zero.descriptor()
    }

    fn memory_plan(&self, graph: &CompiledGraph) -> Result<MemoryPlan, EngineError> {
        self.zero.memory_plan(graph)
    }

    async fn compile(&self, spec: &ModelSpec, progress: &dyn ProgressSink) -> Result<CompiledGraph, EngineError> {
        self.zero.compile(spec, progress).await
    }

    async fn load(&self, graph: &CompiledGraph) -> Result<Arc<dyn LoadedModel>, EngineError> {
        Ok(Arc::new(LabModel { inner: self.zero.load(graph).await?, script: Arc::clone(&self.script) }))
    }
}

struct LabModel {
    inner: Arc<dyn LoadedModel>,
    script: Arc<Mutex<Script>>,
}

#[async_trait::async_trait]
impl LoadedModel for LabModel {
    fn memory_plan(&self) -> MemoryPlan {
        self.inner.memory_plan()
    }

    fn tokenize(&self, text: &str) -> Vec<TokenId> {
        self.inner.tokenize(text)
    }

    fn detokenizer(&self) -> Box<dyn Detokenizer> {
        self.inner.detokenizer()
    }

    async fn prefill(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        let delay = {
            let mut script = self.script.lock();
            script.prefills.push((input.prompt().len(), input.generated().len(), input.params().max_tokens));
            script.prefill
        };
        tokio::time::sleep(delay).await;
        let inner = self.inner.prefill(input).await?;
        Ok(Box::new(LabSequence { inner, script: Arc::clone(&self.script) }))
    }
}

struct LabSequence {
    inner: Box<dyn Sequence>,
    script: Arc<Mutex<Script>>,
}

#[async_trait::async_trait]
impl Sequence for LabSequence {
    async fn prepare(&self, step: u32) -> Result<Prepared, EngineError> {
        let delay = self.script.lock().prepare;
        tokio::time::sleep(delay).await;
        self.inner.prepare(step).await
    }

    async fn compute(&self, prepared: Prepared, previous: Option<TokenId>) -> Result<Token, EngineError> {
        let step = prepared.step();
        let delay = {
            let mut script = self.script.lock();
            script.computes += 1;
            script.compute + script.stall.filter(|&(at, _)| at == step).map_or(Duration::ZERO, |(_, d)| d)
        };
        tokio::time::sleep(delay).await;
        let injected = {
            let mut script = self.script.lock();
            assert_ne!(script.panic_at, Some(step), "injected panic at {step}");
            if script.fatal == Some(step) {
                Some(Err(EngineError::Fatal { message: format!("injected at {step}") }))
            } else if let Some(left) = script.transient.get_mut(&step).filter(|left| **left > 0) {
                *left -= 1;
                Some(Err(EngineError::Transient { message: format!("injected at {step}") }))
            } else if script.end_at == Some(step) {
                Some(Ok(Token { id: ZeroEngine::END_OF_SEQUENCE, end_of_sequence: true }))
            } else {
                None
            }
        };
        if let Some(injected) = injected {
            return injected;
        }
        self.inner.compute(prepared, previous).await
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    memory: MemoryManager,
    kernel: RuntimeManager,
    executor: TaskExecutor,
    script: Arc<Mutex<Script>>,
}

/// The lab's stage times: 5 ms to prepare, 20 ms to compute (the figures).
const PREPARE: Duration = Duration::from_millis(5);
const COMPUTE: Duration = Duration::from_millis(20);

/// Exact settings for timelines: no retry jitter, no time limits unless a test sets them.
fn config() -> ExecutorConfig {
    ExecutorConfig {
        retry: RetryPolicy { jitter: 0.0, ..RetryPolicy::default() },
        timeouts: Timeouts::default(),
        kv_up_front_share: 1.0, // the whole kv-cache up front, unless a test sets a share
        ..ExecutorConfig::default()
    }
}

fn fixture(config: ExecutorConfig) -> Fixture {
    fixture_with_pools(config, 1 << 20, 1 << 20)
}

fn fixture_with_pools(config: ExecutorConfig, kv_capacity: u64, activations_capacity: u64) -> Fixture {
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
    let script = Arc::new(Mutex::new(Script { prepare: PREPARE, compute: COMPUTE, ..Script::default() }));
    kernel.register_engine(Arc::new(Lab { zero: ZeroEngine::with_plan(plan), script: Arc::clone(&script) }));
    kernel.register_model(ModelSpec::new("lab", "zero", "default"));
    let executor = TaskExecutor::new(config, &kernel, &memory).unwrap();
    Fixture { _dir: dir, memory, kernel, executor, script }
}

impl Fixture {
    /// Loads the model ahead (its compile writes a file, which paused time does not wait for) and keeps
    /// it loaded, so that timelines start at the first step.
    async fn loaded(&self) -> ModelHandle {
        self.kernel.load_model("lab").await.unwrap()
    }

    fn used(&self, pool: &str) -> u64 {
        self.memory.pool_stats(pool).unwrap().used
    }
}

/// Every event of a stream, to its end.
async fn events(mut stream: GenerationStream) -> Vec<Result<Event, ExecutorError>> {
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        events.push(event);
    }
    events
}

/// The generated tokens among `events`.
fn tokens(events: &[Result<Event, ExecutorError>]) -> Vec<TokenId> {
    events.iter().filter_map(|event| if let Ok(Event::Token { id, .. }) = event { Some(*id) } else { None }).collect()
}
