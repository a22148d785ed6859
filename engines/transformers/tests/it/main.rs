//! Integration tests of the simulated Transformers-like engine: the conformance kit, the CPU profile's
//! exact virtual timings and their scaling with threads.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

use std::time::Duration;

use tokio::time::Instant;
use usine_engine::{Device, Engine, GenerationParams, ModelSpec, NoProgress, conformance};
use usine_engine_sim::SimConfig;
use usine_engine_transformers::{default_threads, transformers};

fn cpu(config: SimConfig, threads: usize) -> usine_engine_sim::SimEngine {
    transformers(config, threads).unwrap()
}

fn spec(profile: &str) -> ModelSpec {
    ModelSpec::new("tinyllama", "transformers", profile)
}

#[tokio::test(start_paused = true)]
async fn both_profiles_pass_the_conformance_kit() {
    for profile in ["tiny", "cpu-1b"] {
        conformance::check(&cpu(SimConfig::default(), 4), &spec(profile))
            .await
            .unwrap_or_else(|failure| panic!("{profile}: {failure}"));
    }
}

#[tokio::test(start_paused = true)]
async fn the_cpu_profile_optimizes_in_1_5_s_loads_in_300_ms_and_decodes_12_tokens_a_second_on_4_threads() {
    let engine = cpu(SimConfig::default(), 4);
    assert_eq!(engine.descriptor().device, Device::Cpu);
    let start = Instant::now();
    let graph = engine.compile(&spec("cpu-1b"), &NoProgress).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    let start = Instant::now();
    let model = engine.load(&graph).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    model.warm_up().await.unwrap();

    let sequence =
        usine_engine::prefill(model.as_ref(), &model.tokenize("The kernel"), &[], &GenerationParams::default())
            .await
            .unwrap();
    let start = Instant::now();
    let prepared = sequence.prepare(0).await.unwrap();
    let (token, next) = tokio::join!(sequence.compute(prepared, None), sequence.prepare(1));
    assert!(token.is_ok() && next.is_ok());
    // On a CPU the stages share the cores: no overlap, 5 ms + 84 ms + 5 ms.
    assert_eq!(start.elapsed(), Duration::from_millis(5 + 84 + 5));
}

#[tokio::test(start_paused = true)]
async fn decode_scales_with_threads() {
    let mut steps = Vec::new();
    for threads in [1, 2, 4, 8] {
        let engine = cpu(SimConfig::default(), threads);
        let model = engine.load(&engine.compile(&spec("cpu-1b"), &NoProgress).await.unwrap()).await.unwrap();
        model.warm_up().await.unwrap();
        let sequence = usine_engine::prefill(model.as_ref(), &[], &[], &GenerationParams::default()).await.unwrap();
        let prepared = sequence.prepare(0).await.unwrap();
        let start = Instant::now();
        sequence.compute(prepared, None).await.unwrap();
        steps.push(start.elapsed().as_millis());
    }
    assert_eq!(steps, [336, 168, 84, 42]);
    assert!(default_threads() >= 1);
}

#[tokio::test(start_paused = true)]
async fn prefill_costs_6_ms_a_token_and_the_first_use_400_ms_unless_warmed() {
    let engine = cpu(SimConfig::default(), 4);
    let graph = engine.compile(&spec("cpu-1b"), &NoProgress).await.unwrap();
    let prompt = [300, 301, 302, 303, 304];
    for warm in [false, true] {
        let model = engine.load(&graph).await.unwrap();
        if warm {
            let start = Instant::now();
            model.warm_up().await.unwrap();
            assert_eq!(start.elapsed(), Duration::from_millis(400));
        }
        let start = Instant::now();
        usine_engine::prefill(model.as_ref(), &prompt, &[], &GenerationParams::default()).await.unwrap();
        let penalty = if warm { 0 } else { 400 };
        assert_eq!(start.elapsed(), Duration::from_millis(penalty + 5 * 6), "warmed: {warm}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_tiny_profile_takes_milliseconds() {
    let engine = cpu(SimConfig::default(), 4);
    let start = Instant::now();
    let graph = engine.compile(&spec("tiny"), &NoProgress).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(80));
    let model = engine.load(&graph).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    model.warm_up().await.unwrap();
    let sequence = usine_engine::prefill(model.as_ref(), &[300, 301], &[], &GenerationParams::default()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(121)); // 20 ms first use, 2 x 0.5 ms of prefill
    let prepared = sequence.prepare(0).await.unwrap();
    sequence.compute(prepared, None).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(126)); // 1 ms prepare, 4 ms compute
}

#[test]
fn a_jitter_outside_its_range_is_a_typed_error() {
    for jitter in [f64::NAN, -0.1, 1.5] {
        let err = transformers(SimConfig { jitter, ..Default::default() }, 4).unwrap_err();
        assert!(err.to_string().starts_with("jitter"), "{err}");
    }
}

// Would catch: a CPU profile whose batched step is as flat as a GPU's (a CPU's arithmetic is nearer its
// memory's speed), or one that does not batch at all.
#[tokio::test(start_paused = true)]
async fn a_batched_step_on_the_cpu_adds_an_eighth_of_a_step_a_sequence() {
    let engine = cpu(SimConfig::default(), 4);
    let graph = engine.compile(&spec("cpu-1b"), &NoProgress).await.unwrap();
    let model = engine.load(&graph).await.unwrap();
    model.warm_up().await.unwrap();
    assert_eq!(model.max_batch(), 16);
    let mut steps = Vec::new();
    for seed in 0..3 {
        let params = GenerationParams { max_tokens: 4, seed, ..Default::default() };
        let sequence: std::sync::Arc<dyn usine_engine::Sequence> =
            usine_engine::prefill(model.as_ref(), &[], &[], &params).await.unwrap().into();
        let prepared = sequence.prepare(0).await.unwrap();
        steps.push(usine_engine::BatchStep { sequence, prepared, previous: None });
    }
    let start = Instant::now();
    let tokens = model.compute_batch(steps).await;
    assert_eq!(start.elapsed(), Duration::from_millis(84 + 2 * 21 / 2)); // 84 ms, and 10.5 ms twice
    assert!(tokens.iter().all(Result::is_ok));
}
