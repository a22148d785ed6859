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

fn spec(profile: &str) -> ModelSpec {
    ModelSpec::new("tinyllama", "transformers", profile)
}

#[tokio::test(start_paused = true)]
async fn both_profiles_pass_the_conformance_kit() {
    for profile in ["tiny", "cpu-1b"] {
        conformance::check(&transformers(SimConfig::default(), 4), &spec(profile))
            .await
            .unwrap_or_else(|failure| panic!("{profile}: {failure}"));
    }
}

#[tokio::test(start_paused = true)]
async fn the_cpu_profile_optimizes_in_1_5_s_loads_in_300_ms_and_decodes_12_tokens_a_second_on_4_threads() {
    let engine = transformers(SimConfig::default(), 4);
    assert_eq!(engine.descriptor().device, Device::Cpu);
    let start = Instant::now();
    let graph = engine.compile(&spec("cpu-1b"), &NoProgress).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    let start = Instant::now();
    let model = engine.load(&graph).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    model.warm_up().await.unwrap();

    let sequence = model.prefill(&model.tokenize("The kernel"), &GenerationParams::default()).await.unwrap();
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
        let engine = transformers(SimConfig::default(), threads);
        let model = engine.load(&engine.compile(&spec("cpu-1b"), &NoProgress).await.unwrap()).await.unwrap();
        model.warm_up().await.unwrap();
        let sequence = model.prefill(&[], &GenerationParams::default()).await.unwrap();
        let prepared = sequence.prepare(0).await.unwrap();
        let start = Instant::now();
        sequence.compute(prepared, None).await.unwrap();
        steps.push(start.elapsed().as_millis());
    }
    assert_eq!(steps, [336, 168, 84, 42]);
    assert!(default_threads() >= 1);
}
