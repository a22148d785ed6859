//! Retries: a transient failure mid-stream resumes where the stream stopped, after a backoff that
//! doubles; fatal failures are not retried; the limit holds.

use std::time::Duration;

use tokio::time::Instant;
use usine_executor::{Event, ExecutorConfig, ExecutorError, Request, RetryPolicy};
use usine_memory::{ACTIVATIONS, KV_CACHE};

use crate::{COMPUTE, PREPARE, config, events, fixture, tokens};

const BACKOFF: Duration = Duration::from_millis(50);

#[tokio::test(start_paused = true)]
async fn a_transient_failure_at_token_40_resumes_with_no_duplicate_and_no_gap() {
    let unbroken = {
        let f = fixture(config());
        tokens(&events(f.executor.generate(Request::prompt("lab", "Hi").max_tokens(100)).unwrap()).await)
    };
    let f = fixture(config());
    f.script.lock().transient.insert(40, 1);
    let _model = f.loaded().await;
    let start = Instant::now();
    let all = events(f.executor.generate(Request::prompt("lab", "Hi").max_tokens(100)).unwrap()).await;
    let elapsed = start.elapsed();
    assert_eq!(tokens(&all), unbroken);
    let indices: Vec<u32> = all
        .iter()
        .filter_map(|event| if let Ok(Event::Token { index, .. }) = event { Some(*index) } else { None })
        .collect();
    assert_eq!(indices, (0..100).collect::<Vec<_>>());
    let Some(Ok(Event::Finished(usage))) = all.last() else { panic!("{all:?}") };
    assert_eq!(usage.retries, 1);
    // Resumed with the prompt and the 40 tokens sent, asking for the 60 left.
    assert_eq!(f.script.lock().prefills, [(2, 0, 100), (2, 40, 60)]);
    // 40 good steps, the failed one, the backoff, a prepare nothing overlaps, 60 more steps.
    assert_eq!(elapsed, PREPARE + COMPUTE * 40 + COMPUTE + BACKOFF + PREPARE + COMPUTE * 60);
    assert_eq!(f.executor.stats().retries, 1);
    assert_eq!((f.used(ACTIVATIONS), f.used(KV_CACHE)), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn the_backoff_doubles_between_retries() {
    let f = fixture(config());
    f.script.lock().transient.insert(0, 3);
    let _model = f.loaded().await;
    let start = Instant::now();
    let output = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(1)).unwrap().output().await.unwrap();
    assert_eq!(output.usage.retries, 3);
    let tries = 4 * (PREPARE + COMPUTE);
    assert_eq!(start.elapsed(), tries + BACKOFF * (1 + 2 + 4));
}

#[tokio::test(start_paused = true)]
async fn the_backoff_is_jittered_within_its_fraction() {
    let jitter = ExecutorConfig { retry: RetryPolicy { jitter: 0.5, ..RetryPolicy::default() }, ..config() };
    let f = fixture(jitter);
    f.script.lock().transient.insert(0, 1);
    let _model = f.loaded().await;
    let start = Instant::now();
    f.executor.generate(Request::prompt("lab", "Hi").max_tokens(1)).unwrap().output().await.unwrap();
    let backoff = start.elapsed() - 2 * (PREPARE + COMPUTE);
    assert!(backoff >= BACKOFF / 2 && backoff <= BACKOFF * 3 / 2, "{backoff:?}");
    assert_ne!(backoff, BACKOFF, "the seeded jitter moved it");
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_limit_with_the_last_error() {
    let f = fixture(config());
    f.script.lock().transient.insert(5, 10);
    let all = events(f.executor.generate(Request::prompt("lab", "Hi").max_tokens(20)).unwrap()).await;
    assert_eq!(tokens(&all).len(), 5, "the tokens before the failure were sent");
    let Some(Err(ExecutorError::RetriesExhausted { retries, last, .. })) = all.last() else { panic!("{all:?}") };
    assert_eq!(*retries, 3);
    assert!(last.is_transient());
    let stats = f.executor.stats();
    assert_eq!((stats.retries, stats.failed, stats.completed), (3, 1, 0));
    assert_eq!((f.used(ACTIVATIONS), f.used(KV_CACHE)), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_fatal_failure_is_not_retried() {
    let f = fixture(config());
    f.script.lock().fatal = Some(2);
    let all = events(f.executor.generate(Request::prompt("lab", "Hi").max_tokens(20)).unwrap()).await;
    assert_eq!(tokens(&all).len(), 2);
    let Some(Err(error @ ExecutorError::Engine { retries: 0, .. })) = all.last() else { panic!("{all:?}") };
    assert_eq!(error.code(), "engine_failure");
    assert_eq!(f.script.lock().prefills.len(), 1);
    assert_eq!(f.executor.stats().retries, 0);
}

#[tokio::test(start_paused = true)]
async fn with_retries_off_a_transient_failure_ends_the_stream() {
    let off = ExecutorConfig { retry: RetryPolicy { max_retries: 0, ..RetryPolicy::default() }, ..config() };
    let f = fixture(off);
    f.script.lock().transient.insert(0, 1);
    let all = events(f.executor.generate(Request::prompt("lab", "Hi").max_tokens(3)).unwrap()).await;
    assert!(matches!(all.last(), Some(Err(ExecutorError::RetriesExhausted { retries: 0, .. }))), "{all:?}");
}
