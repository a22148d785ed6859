//! Memory: the kv-cache reserved up front or grown per token, activations per step, waits under
//! pressure that end in typed errors naming the pool, and nothing left behind.

use std::time::Duration;

use tokio::time::Instant;
use usine_executor::{Event, ExecutorConfig, ExecutorError, KvReservation, Request};
use usine_memory::{ACTIVATIONS, KV_CACHE, MemoryError, ScopeId};

use crate::{ACTIVATIONS_PER_STEP, AHEAD, COMPUTE, KV_PER_TOKEN, PREPARE, config, fixture, fixture_with_pools};

#[tokio::test(start_paused = true)]
async fn the_kv_cache_of_prompt_and_max_tokens_is_reserved_up_front() {
    let f = fixture(config());
    let mut stream = f.executor.generate(Request::prompt("lab", "Hello").max_tokens(20)).unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Event::Started { .. }))));
    assert_eq!(f.used(KV_CACHE), (5 + 20) * KV_PER_TOKEN);
    stream.output().await.unwrap();
    assert_eq!(f.used(KV_CACHE), 0);
    assert_eq!(f.memory.pool_stats(KV_CACHE).unwrap().peak, 25 * KV_PER_TOKEN);
}

#[tokio::test(start_paused = true)]
async fn per_token_the_kv_cache_grows_with_the_sequence() {
    let f = fixture(ExecutorConfig { kv_reservation: KvReservation::PerToken, ..config() });
    let mut stream = f.executor.generate(Request::prompt("lab", "Hello").max_tokens(20)).unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Event::Started { .. }))));
    let ahead = u64::from(AHEAD);
    let room = (5 + 1 + ahead) * KV_PER_TOKEN;
    assert_eq!(f.used(KV_CACHE), room, "the prompt, and room for the token being computed (and the one ahead)");
    for _ in 0..10 {
        stream.next().await.unwrap().unwrap();
    }
    // Ten tokens read; the eleventh is being computed, with its room (and the twelfth's, batching).
    assert_eq!(f.used(KV_CACHE), (5 + 11 + ahead) * KV_PER_TOKEN);
    let output = stream.output().await.unwrap();
    assert_eq!(output.usage.generated_tokens, 20);
    assert_eq!(f.memory.pool_stats(KV_CACHE).unwrap().peak, 25 * KV_PER_TOKEN);
    assert_eq!(f.used(KV_CACHE), 0);
}

#[tokio::test(start_paused = true)]
async fn a_kv_cache_that_does_not_come_free_fails_after_the_wait_naming_the_pool() {
    // Room for one 105-token sequence and no more.
    let f = fixture_with_pools(ExecutorConfig { max_concurrent: 2, ..config() }, 128 * KV_PER_TOKEN, 1 << 20);
    let _model = f.loaded().await;
    let first = f.executor.generate(Request::prompt("lab", "Hello").max_tokens(100)).unwrap();
    let start = Instant::now();
    let error = f.executor.generate(Request::prompt("lab", "Hello").max_tokens(100)).unwrap().output().await;
    let error = error.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(500), "the default wait under pressure");
    let ExecutorError::Memory { source: MemoryError::TimedOut { pool, requested, .. }, .. } = &error else {
        panic!("{error}")
    };
    assert_eq!((pool.as_str(), *requested), (KV_CACHE, 105 * KV_PER_TOKEN));
    assert_eq!(error.code(), "out_of_memory");
    drop(first);
    tokio::task::yield_now().await;
    assert_eq!(f.used(KV_CACHE), 0);
}

#[tokio::test(start_paused = true)]
async fn a_sequence_waits_for_a_kv_cache_that_comes_free_in_time() {
    let patient = ExecutorConfig { max_concurrent: 2, memory_wait: Duration::from_secs(1), ..config() };
    let f = fixture_with_pools(patient, 128 * KV_PER_TOKEN, 1 << 20);
    let _model = f.loaded().await;
    let first = f.executor.generate(Request::prompt("lab", "Hello").max_tokens(30)).unwrap(); // 35 tokens, 605 ms
    let second = f.executor.generate(Request::prompt("lab", "Hello").max_tokens(100)).unwrap(); // 105 tokens
    let (first, second) = tokio::join!(first.output(), second.output());
    assert_eq!(first.unwrap().usage.generated_tokens, 30);
    let second = second.unwrap();
    assert_eq!(second.usage.generated_tokens, 100);
    assert_eq!(second.usage.time_to_first_token, Duration::from_millis(605 + 25));
}

#[tokio::test(start_paused = true)]
async fn a_kv_cache_larger_than_the_pool_fails_at_once() {
    let f = fixture_with_pools(config(), 64 * KV_PER_TOKEN, 1 << 20);
    let _model = f.loaded().await;
    let start = Instant::now();
    let error = f.executor.generate(Request::prompt("lab", "Hello").max_tokens(100)).unwrap().output().await;
    let error = error.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(matches!(error, ExecutorError::Memory { source: MemoryError::TooLarge { .. }, .. }), "{error}");
    assert!(error.to_string().contains("exceeds the whole capacity of pool `kv-cache` (65536 bytes)"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn with_room_for_one_step_of_activations_the_pipeline_runs_one_step_at_a_time() {
    let f = fixture_with_pools(config(), 1 << 20, ACTIVATIONS_PER_STEP);
    let _model = f.loaded().await;
    let start = Instant::now();
    let output = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(10)).unwrap().output().await.unwrap();
    // The step ahead waits for the computing step's activations: prepare and compute add up again.
    assert_eq!(start.elapsed(), (PREPARE + COMPUTE) * 10);
    assert_eq!(output.usage.pipeline_idle, PREPARE * 10);
}

#[tokio::test(start_paused = true)]
async fn activations_that_do_not_come_free_fail_after_the_wait_naming_the_pool() {
    let f = fixture_with_pools(config(), 1 << 20, ACTIVATIONS_PER_STEP);
    let _model = f.loaded().await;
    let _taken = f.memory.allocate(ACTIVATIONS, ACTIVATIONS_PER_STEP, ScopeId::fresh()).unwrap();
    let start = Instant::now();
    let all = crate::events(f.executor.generate(Request::prompt("lab", "Hi").max_tokens(10)).unwrap()).await;
    assert_eq!(start.elapsed(), Duration::from_millis(500));
    let Some(Err(ExecutorError::Memory { source: MemoryError::TimedOut { pool, .. }, .. })) = all.last() else {
        panic!("{all:?}")
    };
    assert_eq!(pool, ACTIVATIONS);
    assert_eq!(f.used(KV_CACHE), 0);
}

#[tokio::test(start_paused = true)]
async fn without_pipelining_one_step_of_activations_is_enough() {
    let f = fixture_with_pools(ExecutorConfig { pipelining: false, ..config() }, 1 << 20, ACTIVATIONS_PER_STEP);
    let output = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(10)).unwrap().output().await.unwrap();
    assert_eq!(output.usage.generated_tokens, 10);
}

#[tokio::test(start_paused = true)]
async fn the_executor_needs_its_pools() {
    let f = fixture(config());
    let config = ExecutorConfig { kv_pool: "nope".into(), ..config() };
    let error = usine_executor::TaskExecutor::new(config, &f.kernel, &f.memory).unwrap_err();
    assert!(error.to_string().starts_with("executor setting `kv_pool` is `nope`, outside the memory manager's pools"));
}
