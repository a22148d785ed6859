//! Real-time accuracy of the simulated engines: 1,000 pipelined decode steps of each `tiny` profile, on
//! the real clock. The profile says 2 ms a step for the WebLLM-like engine (1 ms of preparation hidden
//! under 2 ms of device work) and 3 ms for the Transformers-like engine on 8 threads (1 ms of
//! preparation, then 2 ms of compute, on the same cores). The goal, within 2 % of the profile, and the
//! figures measured are in the README's last section.
//!
//! Run with `cargo bench -p usine-engine-webllm`. Before divan's table, one timed run of each prints
//! its ratio: measured / (1,000 x the profile's step).

use std::sync::Arc;

use divan::Bencher;
use usine_engine::{Engine, GenerationParams, LoadedModel, ModelSpec, NoProgress};
use usine_engine_sim::SimConfig;

const STEPS: u32 = 1000;

fn main() {
    let runtime = runtime();
    let engines: [(&str, Box<dyn Engine>, ModelSpec, f64); 2] = [
        (
            "webllm tiny",
            Box::new(usine_engine_webllm::webllm(SimConfig::default()).expect("a valid configuration")),
            ModelSpec::new("m", "webllm", "tiny"),
            2.0,
        ),
        (
            "transformers tiny, 8 threads",
            Box::new(usine_engine_transformers::transformers(SimConfig::default(), 8).expect("a valid configuration")),
            ModelSpec::new("m", "transformers", "tiny"),
            3.0,
        ),
    ];
    for (name, engine, spec, step_ms) in engines {
        let model = load(&runtime, engine.as_ref(), &spec);
        let start = std::time::Instant::now();
        decode(&runtime, model.as_ref());
        let measured = start.elapsed().as_secs_f64();
        let profile = f64::from(STEPS) * step_ms / 1e3;
        eprintln!("{name}: {STEPS} steps in {measured:.4} s, profile {profile:.3} s, ratio {:.4}", measured / profile);
    }
    divan::main();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime")
}

fn load(runtime: &tokio::runtime::Runtime, engine: &dyn Engine, spec: &ModelSpec) -> Arc<dyn LoadedModel> {
    runtime.block_on(async {
        let model = engine.load(&engine.compile(spec, &NoProgress).await.expect("compiles")).await.expect("loads");
        model.warm_up().await.expect("warms up");
        model
    })
}

/// 1,000 steps with the prepare stage of step N+1 running during the compute stage of step N.
fn decode(runtime: &tokio::runtime::Runtime, model: &dyn LoadedModel) {
    runtime.block_on(async {
        let params = GenerationParams { max_tokens: STEPS, ..GenerationParams::default() };
        let sequence = usine_engine::prefill(model, &[], &[], &params).await.expect("prefills");
        let mut prepared = sequence.prepare(0).await.expect("prepares");
        let mut previous = None;
        for step in 0..STEPS {
            let (token, next) = tokio::join!(sequence.compute(prepared, previous), sequence.prepare(step + 1));
            previous = Some(token.expect("computes").id);
            prepared = next.expect("prepares");
        }
    });
}

#[divan::bench(sample_count = 3, sample_size = 1)]
fn webllm_tiny_1000_steps_of_2_ms(bencher: Bencher<'_, '_>) {
    let runtime = runtime();
    let engine = usine_engine_webllm::webllm(SimConfig::default()).expect("a valid configuration");
    let model = load(&runtime, &engine, &ModelSpec::new("m", "webllm", "tiny"));
    bencher.bench_local(|| decode(&runtime, model.as_ref()));
}

#[divan::bench(sample_count = 3, sample_size = 1)]
fn transformers_tiny_8_threads_1000_steps_of_3_ms(bencher: Bencher<'_, '_>) {
    let runtime = runtime();
    let engine = usine_engine_transformers::transformers(SimConfig::default(), 8).expect("a valid configuration");
    let model = load(&runtime, &engine, &ModelSpec::new("m", "transformers", "tiny"));
    bencher.bench_local(|| decode(&runtime, model.as_ref()));
}
