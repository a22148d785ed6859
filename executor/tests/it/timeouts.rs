//! Time limits: each phase's fires in its phase, at exactly its limit, with a typed error naming it.

use std::time::Duration;

use tokio::time::Instant;
use usine_executor::{ExecutorConfig, ExecutorError, Phase, Request, TimeoutOverrides, Timeouts};
use usine_memory::{ACTIVATIONS, KV_CACHE};

use crate::{COMPUTE, PREPARE, config, events, fixture, tokens};

fn limits(timeouts: Timeouts) -> ExecutorConfig {
    ExecutorConfig { timeouts, max_concurrent: 1, ..config() }
}

/// Runs a 100-token request and returns its events and when it ended.
async fn run(f: &crate::Fixture, request: Request) -> (Vec<Result<usine_executor::Event, ExecutorError>>, Duration) {
    let start = Instant::now();
    let all = events(f.executor.generate(request).unwrap()).await;
    (all, start.elapsed())
}

fn timeout(all: &[Result<usine_executor::Event, ExecutorError>]) -> (Phase, Duration) {
    match all.last() {
        Some(Err(ExecutorError::Timeout { phase, limit })) => (*phase, *limit),
        other => panic!("not a timeout: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_queue_wait_past_its_limit_is_refused() {
    let f = fixture(limits(Timeouts { queue: Some(Duration::from_millis(100)), ..Timeouts::default() }));
    let _model = f.loaded().await;
    let _busy = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(100)).unwrap();
    let (all, elapsed) = run(&f, Request::prompt("lab", "Hi")).await;
    assert_eq!(timeout(&all), (Phase::Queue, Duration::from_millis(100)));
    assert_eq!(elapsed, Duration::from_millis(100));
    assert_eq!(f.executor.stats().queued, 0, "it left the queue");
    assert_eq!(f.executor.stats().timeouts_by_phase, [1, 0, 0, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_slow_prefill_runs_out_of_time_to_first_token() {
    let f = fixture(limits(Timeouts { first_token: Some(Duration::from_millis(500)), ..Timeouts::default() }));
    f.script.lock().prefill = Duration::from_secs(1);
    let _model = f.loaded().await;
    let (all, elapsed) = run(&f, Request::prompt("lab", "Hi")).await;
    assert_eq!(timeout(&all), (Phase::FirstToken, Duration::from_millis(500)));
    assert_eq!(elapsed, Duration::from_millis(500));
    assert_eq!((f.used(ACTIVATIONS), f.used(KV_CACHE)), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_step_runs_out_of_time_between_tokens() {
    let f = fixture(limits(Timeouts { between_tokens: Some(Duration::from_secs(1)), ..Timeouts::default() }));
    f.script.lock().stall = Some((10, Duration::from_secs(5)));
    let _model = f.loaded().await;
    let (all, elapsed) = run(&f, Request::prompt("lab", "Hi").max_tokens(100)).await;
    assert_eq!(tokens(&all).len(), 10);
    assert_eq!(timeout(&all), (Phase::BetweenTokens, Duration::from_secs(1)));
    assert_eq!(elapsed, PREPARE + COMPUTE * 10 + Duration::from_secs(1));
    assert_eq!((f.used(ACTIVATIONS), f.used(KV_CACHE)), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn the_whole_request_has_its_own_limit() {
    let f = fixture(limits(Timeouts { total: Some(Duration::from_millis(300)), ..Timeouts::default() }));
    let _model = f.loaded().await;
    let (all, elapsed) = run(&f, Request::prompt("lab", "Hi").max_tokens(100)).await;
    assert_eq!(timeout(&all), (Phase::Total, Duration::from_millis(300)));
    assert_eq!(elapsed, Duration::from_millis(300));
    assert_eq!(tokens(&all).len(), 14); // a token every 20 ms after the first prepare: 14 by 285 ms
}

#[tokio::test(start_paused = true)]
async fn a_request_sets_its_own_limits() {
    let f = fixture(limits(Timeouts { total: Some(Duration::from_secs(60)), ..Timeouts::default() }));
    let _model = f.loaded().await;
    let tight = TimeoutOverrides { total: Some(Duration::from_millis(100)), ..TimeoutOverrides::default() };
    let (all, elapsed) = run(&f, Request::prompt("lab", "Hi").max_tokens(100).timeouts(tight)).await;
    assert_eq!(timeout(&all), (Phase::Total, Duration::from_millis(100)));
    assert_eq!(elapsed, Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn time_blocked_on_a_slow_reader_is_not_a_stall() {
    let f = fixture(limits(Timeouts { between_tokens: Some(Duration::from_millis(100)), ..Timeouts::default() }));
    let _model = f.loaded().await;
    let mut stream = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(40)).unwrap();
    let mut read = 0;
    while let Some(event) = stream.next().await {
        event.unwrap();
        read += 1;
        tokio::time::sleep(Duration::from_millis(500)).await; // far slower than the limit between tokens
    }
    assert_eq!(read, 42); // the start, 40 tokens, the end
}

#[tokio::test(start_paused = true)]
async fn a_limit_too_far_to_reach_is_no_limit() {
    let f = fixture(config());
    let forever = TimeoutOverrides {
        total: Some(Duration::MAX),
        between_tokens: Some(Duration::MAX),
        ..TimeoutOverrides::default()
    };
    let output = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(3).timeouts(forever)).unwrap();
    assert_eq!(output.output().await.unwrap().usage.generated_tokens, 3);
}
