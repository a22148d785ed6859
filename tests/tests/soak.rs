//! The soak: thousands of generations through the executor with random faults (transient, fatal, stalls),
//! random cancellations and tight time limits, after which every pool is back to zero and the
//! process's resident memory has stopped growing (the seeds' leak profiling). A test binary of its own,
//! so that the resident memory it reads is its own.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

use std::sync::Arc;
use std::time::Duration;

use usine_engine::ModelSpec;
use usine_engine_sim::{Faults, Flavor, Q4, SimConfig, SimEngine};
use usine_executor::{ExecutorConfig, ExecutorError, Request, RetryPolicy, TaskExecutor, TimeoutOverrides, Timeouts};
use usine_kernel::{KernelConfig, RuntimeManager};
use usine_memory::{ACTIVATIONS, KV_CACHE, MemoryManager, StandardPools};
use usine_storage::{Migrations, StorageConfig, StorageManager};

/// Generations per round; the first round warms the allocator up, the later ones must not grow.
const PER_ROUND: usize = 1000;
const ROUNDS: usize = 3;
/// How much the resident memory may move between the end of the first round and the end of the last:
/// allocator noise, far below what a leak of a lease, a task or a stream per generation would add
/// (a leaked 4 KiB per generation alone is 8 MiB over two rounds).
const RSS_SLACK: u64 = 4 << 20;

/// A WebLLM-like engine of the `tiny` profile under its own name, with `faults`.
fn engine(name: &'static str, faults: Faults) -> Arc<SimEngine> {
    let flavor = Flavor {
        name,
        version: "soak",
        device: usine_engine::Device::Gpu,
        profiles: vec![usine_engine_webllm::tiny()],
        quantizations: vec![Q4],
    };
    Arc::new(SimEngine::new(flavor, SimConfig { jitter: 0.1, seed: 7, faults }).unwrap())
}

#[tokio::test(start_paused = true)]
async fn thousands_of_faulty_cancelled_and_timed_out_generations_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(256 << 20).unwrap()).unwrap();
    let kernel = RuntimeManager::new(KernelConfig::default(), &memory, storage).unwrap();
    let engines = [
        ("clean", Faults::default()),
        // 900 failures in all at token 1: the first requests run out of retries, later ones get through.
        ("transient", Faults { transient_at: Some((1, 900)), ..Faults::default() }),
        ("fatal", Faults { fatal_at: Some(2), ..Faults::default() }),
        ("stall", Faults { stall_at: Some((1, Duration::from_millis(400))), ..Faults::default() }),
    ];
    for (name, faults) in engines {
        kernel.register_engine(engine(name, faults));
        kernel.register_model(ModelSpec::new(name, name, "tiny"));
    }
    let config = ExecutorConfig {
        max_concurrent: 16,
        queue_capacity: 64,
        retry: RetryPolicy { max_retries: 2, initial_backoff: Duration::from_millis(5), ..RetryPolicy::default() },
        timeouts: Timeouts { between_tokens: Some(Duration::from_millis(200)), ..Timeouts::standard() },
        ..ExecutorConfig::default()
    };
    let executor = TaskExecutor::new(config, &kernel, &memory).unwrap();
    let mut rng = fastrand::Rng::with_seed(2026);
    let mut rss = Vec::new();
    let mut refused = 0;
    for _ in 0..ROUNDS {
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..PER_ROUND {
            let model = ["clean", "transient", "fatal", "stall"][rng.usize(0..4)];
            let mut request = Request::prompt(model, "The kernel keeps").max_tokens(rng.u32(1..24));
            request.params.seed = rng.u64(..); // each its own text, so that faults land before the end
            if rng.u8(0..10) == 0 {
                request = request.timeouts(TimeoutOverrides {
                    total: Some(Duration::from_millis(rng.u64(5..60))),
                    ..TimeoutOverrides::default()
                });
            }
            let read = rng.usize(0..30); // events read before the stream is dropped (past the end: all)
            let stream = match executor.generate(request) {
                Ok(stream) => stream,
                Err(ExecutorError::QueueFull { .. }) => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await; // let the queue drain
                    continue;
                }
                Err(error) => panic!("{error}"),
            };
            readers.spawn(async move {
                let mut stream = stream;
                for _ in 0..read {
                    if stream.next().await.is_none() {
                        break;
                    }
                }
            });
            if rng.u8(0..4) == 0 {
                tokio::time::sleep(Duration::from_millis(rng.u64(0..5))).await;
            }
        }
        while readers.join_next().await.transpose().unwrap().is_some() {}
        tokio::time::sleep(Duration::from_millis(10)).await; // aborted tasks are dropped
        for pool in [KV_CACHE, ACTIVATIONS] {
            let stats = memory.pool_stats(pool).unwrap();
            assert_eq!((stats.used, stats.active_leases, stats.waiters), (0, 0, 0), "{pool}: {stats:?}");
        }
        let stats = executor.stats();
        assert_eq!((stats.running, stats.queued), (0, 0), "{stats:?}");
        rss.push(resident_bytes());
    }

    let stats = executor.stats();
    let ended = stats.completed + stats.cancelled + stats.timed_out + stats.failed + stats.rejected;
    assert_eq!(ended, (ROUNDS * PER_ROUND) as u64, "{stats:?}");
    assert_eq!(stats.rejected, refused);
    // Every kind of ending happened, many times.
    for (what, count) in [
        ("completed", stats.completed),
        ("cancelled", stats.cancelled),
        ("timed out", stats.timed_out),
        ("failed", stats.failed),
        ("timed out between tokens", stats.timeouts_by_phase[2]),
        ("timed out in all", stats.timeouts_by_phase[3]),
        ("retries", stats.retries),
    ] {
        assert!(count >= 50, "only {count} {what}: {stats:?}");
    }
    let (first, last) = (rss[0], rss[ROUNDS - 1]);
    assert!(last <= first + RSS_SLACK, "resident memory grew from {first} to {last} bytes: {rss:?}");
}

/// The process's resident memory, from `/proc/self/status`. The leak check is half of this test, so a
/// system where it cannot be read fails the test rather than skipping the check.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status")
        .expect("the soak reads its resident memory from /proc/self/status (Linux)");
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("a VmRSS line in /proc/self/status");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("VmRSS in kB");
    kib * 1024
}
