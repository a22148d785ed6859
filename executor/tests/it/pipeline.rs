//! Pipelining: the prepare stage of step N+1 overlaps the compute stage of step N; turned off, the
//! stages add up. Stop sequences and the end of a sequence flush the pipeline.

use std::time::Duration;

use tokio::time::Instant;
use usine_engine::FinishReason;
use usine_executor::{Event, ExecutorConfig, Request};
use usine_memory::{ACTIVATIONS, KV_CACHE};

use crate::{ACTIVATIONS_PER_STEP, AHEAD, COMPUTE, PREPARE, config, events, fixture, tokens};

async fn hundred_tokens(config: ExecutorConfig) -> (Duration, usine_executor::Usage, u64) {
    let f = fixture(config);
    let _model = f.loaded().await;
    let start = Instant::now();
    let output = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(100)).unwrap().output().await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(output.usage.generated_tokens, 100);
    assert_eq!(output.tokens.len(), 100);
    (elapsed, output.usage, f.memory.pool_stats(ACTIVATIONS).unwrap().peak)
}

#[tokio::test(start_paused = true)]
async fn hundred_tokens_pipelined_take_one_prepare_and_a_hundred_computes() {
    let (elapsed, usage, peak) = hundred_tokens(config()).await;
    assert_eq!(elapsed, PREPARE + COMPUTE * 100); // 2005 ms: the compute stage never waits after step 0
    assert_eq!(usage.pipeline_idle, PREPARE);
    assert_eq!(usage.time_to_first_token, PREPARE + COMPUTE);
    assert_eq!(usage.tokens_per_second, 50.0); // 99 tokens in 1.98 s after the first
    assert_eq!(peak, 2 * ACTIVATIONS_PER_STEP, "two steps in flight: one computing, one prepared");
}

#[tokio::test(start_paused = true)]
async fn hundred_tokens_without_pipelining_take_the_sum_of_the_stages() {
    let (elapsed, usage, peak) = hundred_tokens(ExecutorConfig { pipelining: false, ..config() }).await;
    assert_eq!(elapsed, (PREPARE + COMPUTE) * 100); // 2500 ms
    assert_eq!(usage.pipeline_idle, PREPARE * 100);
    assert_eq!(usage.tokens_per_second, 40.0);
    assert_eq!(peak, ACTIVATIONS_PER_STEP);
}

#[tokio::test(start_paused = true)]
async fn a_prepare_slower_than_the_compute_leaves_the_compute_idle_for_the_difference() {
    let f = fixture(config());
    f.script.lock().prepare = Duration::from_millis(30);
    let _model = f.loaded().await;
    let start = Instant::now();
    let output = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(10)).unwrap().output().await.unwrap();
    // 30 ms for step 0's prepare, then nine steps paced by the prepare stage, then the last compute.
    assert_eq!(start.elapsed(), Duration::from_millis(30 + 9 * 30 + 20));
    assert_eq!(output.usage.pipeline_idle, Duration::from_millis(30 + 9 * 10));
}

#[tokio::test(start_paused = true)]
async fn the_text_is_what_the_reference_driver_generates() {
    let f = fixture(config());
    let model = f.loaded().await;
    let params = usine_engine::GenerationParams { max_tokens: 40, seed: 7, ..Default::default() };
    let reference = usine_engine::generate(model.model().as_ref(), "Hello", &params).await.unwrap();
    let output = f.executor.generate(Request::prompt("lab", "Hello").params(params)).unwrap().output().await.unwrap();
    assert_eq!(output.text, reference.text);
    assert_eq!(output.tokens, reference.tokens);
    assert_eq!(output.usage.finish, FinishReason::Length);
}

#[tokio::test(start_paused = true)]
async fn a_stop_sequence_ends_the_generation_before_it_and_flushes_the_step_prepared_ahead() {
    let f = fixture(config());
    let _model = f.loaded().await;
    let params = usine_engine::GenerationParams { max_tokens: 50, stop: vec!["engine".into()], ..Default::default() };
    let all = events(f.executor.generate(Request::prompt("lab", "Hi").params(params)).unwrap()).await;
    let text: String = all
        .iter()
        .filter_map(|event| match event {
            Ok(Event::Token { text, .. } | Event::Text(text)) => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, "the zero "); // the zero engine says "the zero engine does no work..."
    let Some(Ok(Event::Finished(usage))) = all.last() else { panic!("no usage: {all:?}") };
    assert_eq!(usage.finish, FinishReason::Stop);
    assert_eq!(usage.generated_tokens, 15); // through the "e" that completes "engine"
    // Where it batches, the step after was computed already, and its token dropped.
    assert_eq!(f.script.lock().computes, 15 + AHEAD, "the step prepared ahead never computes");
    assert_eq!((f.used(ACTIVATIONS), f.used(KV_CACHE)), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn an_end_of_sequence_ends_the_generation_without_a_token() {
    let f = fixture(config());
    f.script.lock().end_at = Some(3);
    let _model = f.loaded().await;
    let all = events(f.executor.generate(Request::prompt("lab", "Hi").max_tokens(50)).unwrap()).await;
    assert_eq!(tokens(&all).len(), 3);
    let Some(Ok(Event::Finished(usage))) = all.last() else { panic!("no usage: {all:?}") };
    assert_eq!((usage.finish, usage.generated_tokens), (FinishReason::EndOfSequence, 3));
    assert_eq!((f.used(ACTIVATIONS), f.used(KV_CACHE)), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn events_come_in_order_with_the_figures_of_the_start() {
    let f = fixture(config());
    let all = events(f.executor.generate(Request::prompt("lab", "Hello").max_tokens(3)).unwrap()).await;
    let Some(Ok(Event::Started { source, queued, prompt_tokens, .. })) = all.first() else { panic!("{all:?}") };
    assert_eq!((*source, *queued, *prompt_tokens), (usine_kernel::LoadSource::Compile, Duration::ZERO, 5));
    let indices: Vec<u32> = all
        .iter()
        .filter_map(|event| if let Ok(Event::Token { index, .. }) = event { Some(*index) } else { None })
        .collect();
    assert_eq!(indices, [0, 1, 2]);
    assert!(matches!(all.last(), Some(Ok(Event::Finished(_)))));
}
