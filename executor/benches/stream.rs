//! The executor's speed, in real time.
//!
//! - `pipeline`: tokens/s of one stream whose engine takes 2 ms to prepare a step and 5 ms to compute it,
//!   pipelined and not; the ideal is one token per 5 ms (`1 / max(cpu, gpu)`), the sequential sum one per
//!   7 ms; 100 tokens also wait for the first prepare, so the pipelined ceiling is 100 / 502 ms
//!   = 199.2 tokens/s. The scripted engine runs paced: each stage measures how much longer its sleep
//!   took than asked and pays that back in its next sleep, so the timer's millisecond granularity is not
//!   counted against the executor; any delay outside the sleep (the executor's own) is.
//! - `overhead`: the zero-cost engine, so that only usine is measured: one stream of 1,000 tokens against
//!   the floor of a bare tokio bounded channel passing 1,000 items between two tasks (both on one thread,
//!   so that the per-token cost is measured, not thread wake-ups), and the aggregate over 1, 100 and
//!   1,000 concurrent streams on two worker threads.
//!
//! Run with `cargo bench -p usine-executor`; divan prints items (tokens) per second.

#![allow(clippy::unwrap_used, reason = "a benchmark's setup failing is a bug to see at once")]

use std::sync::Arc;
use std::time::Duration;

use divan::Bencher;
use divan::counter::ItemsCount;
use usine_engine::scripted::{Script, ScriptedEngine};
use usine_engine::{Engine, MemoryPlan, ModelSpec, ZeroEngine};
use usine_executor::{ExecutorConfig, Request, TaskExecutor, Timeouts};
use usine_kernel::{KernelConfig, ModelHandle, RuntimeManager};
use usine_memory::{MemoryManager, StandardPools};
use usine_storage::{Migrations, StorageConfig, StorageManager};

fn main() {
    divan::main();
}

const PREPARE: Duration = Duration::from_millis(2);
const COMPUTE: Duration = Duration::from_millis(5);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// One thread: the per-token cost alone, without the wake-ups between threads (which dominate and vary
/// from run to run on two cores).
fn single_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    executor: TaskExecutor,
    _model: ModelHandle,
}

/// An executor over `engine`, its model `bench` loaded ahead.
fn setup(runtime: &tokio::runtime::Runtime, engine: Arc<dyn Engine>, config: ExecutorConfig) -> Setup {
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(4 << 30).unwrap()).unwrap();
        let storage = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
        let kernel = RuntimeManager::new(KernelConfig::default(), &memory, storage).unwrap();
        kernel.register_engine(engine);
        kernel.register_model(ModelSpec::new("bench", "zero", "default"));
        let model = kernel.load_model("bench").await.unwrap();
        let config = ExecutorConfig { timeouts: Timeouts::default(), ..config };
        Setup { _dir: dir, executor: TaskExecutor::new(config, &kernel, &memory).unwrap(), _model: model }
    })
}

/// A plan that makes every step take real leases: 1 KiB of kv-cache a token, 4 KiB of activations a step.
const PLAN: MemoryPlan = MemoryPlan {
    weights_bytes: 1 << 20,
    kv_bytes_per_token: 1024,
    activation_bytes_per_step: 4096,
    max_context_tokens: 8192,
};

/// Tokens of each stream in the pipelining benchmark.
const PIPELINE_TOKENS: u32 = 100;

#[divan::bench(args = [true, false], sample_count = 10, sample_size = 1)]
fn pipeline(bencher: Bencher<'_, '_>, pipelining: bool) {
    let runtime = runtime();
    let script = Script { prepare: PREPARE, compute: COMPUTE, paced: true, ..Script::default() };
    let engine = Arc::new(ScriptedEngine::with_plan(PLAN, script));
    let setup = setup(&runtime, engine, ExecutorConfig { pipelining, ..ExecutorConfig::default() });
    bencher.counter(ItemsCount::new(PIPELINE_TOKENS)).bench_local(|| {
        runtime.block_on(async {
            let request = Request::prompt("bench", "Hi").max_tokens(PIPELINE_TOKENS);
            let output = setup.executor.generate(request).unwrap().output().await.unwrap();
            assert_eq!(output.usage.generated_tokens, PIPELINE_TOKENS);
        });
    });
}

/// Tokens of the one-stream overhead benchmark and its floor.
const ONE_STREAM_TOKENS: u32 = 1000;

#[divan::bench(sample_count = 50)]
fn overhead_one_stream(bencher: Bencher<'_, '_>) {
    let runtime = single_thread();
    let setup = setup(&runtime, Arc::new(ZeroEngine::with_plan(PLAN)), ExecutorConfig::default());
    bencher.counter(ItemsCount::new(ONE_STREAM_TOKENS)).bench_local(|| {
        runtime.block_on(async {
            let request = Request::prompt("bench", "Hi").max_tokens(ONE_STREAM_TOKENS);
            let mut stream = setup.executor.generate(request).unwrap();
            let mut events = 0;
            while let Some(event) = stream.next().await {
                divan::black_box(event.unwrap());
                events += 1;
            }
            assert_eq!(events, ONE_STREAM_TOKENS + 2);
        });
    });
}

/// The floor: the same number of items through a bare bounded channel of the same capacity, from a
/// spawned producer task to the reader.
#[divan::bench(sample_count = 50)]
fn overhead_floor_bare_channel(bencher: Bencher<'_, '_>) {
    let runtime = single_thread();
    let capacity = ExecutorConfig::default().channel_capacity;
    bencher.counter(ItemsCount::new(ONE_STREAM_TOKENS)).bench_local(|| {
        runtime.block_on(async {
            let (sender, mut receiver) = tokio::sync::mpsc::channel(capacity);
            tokio::spawn(async move {
                for item in 0..ONE_STREAM_TOKENS {
                    if sender.send(item).await.is_err() {
                        break;
                    }
                }
            });
            let mut items = 0;
            while let Some(item) = receiver.recv().await {
                divan::black_box(item);
                items += 1;
            }
            assert_eq!(items, ONE_STREAM_TOKENS);
        });
    });
}

/// Tokens of each stream when many run at once.
const CONCURRENT_TOKENS: u32 = 200;

#[divan::bench(args = [1, 100, 1000], sample_count = 5, sample_size = 1)]
fn overhead_concurrent_streams(bencher: Bencher<'_, '_>, streams: u32) {
    let runtime = runtime();
    let slots = usize::try_from(streams).unwrap();
    let config = ExecutorConfig { max_concurrent: slots, queue_capacity: 0, ..ExecutorConfig::default() };
    let setup = setup(&runtime, Arc::new(ZeroEngine::with_plan(PLAN)), config);
    bencher.counter(ItemsCount::new(streams * CONCURRENT_TOKENS)).bench_local(|| {
        runtime.block_on(async {
            let requests = (0..streams).map(|_| Request::prompt("bench", "Hi").max_tokens(CONCURRENT_TOKENS));
            let readers: Vec<_> = setup
                .executor
                .generate_batch(requests.collect())
                .unwrap()
                .into_iter()
                .map(|mut stream| {
                    tokio::spawn(async move {
                        let mut tokens = 0;
                        while let Some(event) = stream.next().await {
                            if let usine_executor::Event::Token { .. } = event.unwrap() {
                                tokens += 1;
                            }
                        }
                        tokens
                    })
                })
                .collect();
            for reader in readers {
                assert_eq!(reader.await.unwrap(), CONCURRENT_TOKENS);
            }
        });
    });
}
