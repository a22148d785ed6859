//! The zero engine's costs: the floor of every executor benchmark. Decode steps (prepare, then compute),
//! 1,000 to an iteration so that the runtime's entry is not what is measured, and a whole 100-token
//! generation through the reference driver.
//!
//! Run with `cargo bench -p usine-engine`.

use divan::{Bencher, black_box};
use usine_engine::{Engine, GenerationParams, LoadedModel, ModelSpec, NoProgress, ZeroEngine, generate};

fn main() {
    divan::main();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().expect("a runtime")
}

fn model(runtime: &tokio::runtime::Runtime) -> std::sync::Arc<dyn LoadedModel> {
    runtime.block_on(async {
        let engine = ZeroEngine::new();
        let graph = engine.compile(&ModelSpec::new("any", "zero", "default"), &NoProgress).await.expect("compiles");
        engine.load(&graph).await.expect("loads")
    })
}

#[divan::bench(counter = divan::counter::ItemsCount::new(1000usize))]
fn zero_steps(bencher: Bencher<'_, '_>) {
    let runtime = runtime();
    let model = model(&runtime);
    let sequence = runtime
        .block_on(usine_engine::prefill(model.as_ref(), &[1, 2, 3], &[], &GenerationParams::default()))
        .expect("prefills");
    bencher.bench_local(|| {
        runtime.block_on(async {
            for step in 0..1000 {
                let prepared = sequence.prepare(step).await.expect("prepares");
                black_box(sequence.compute(prepared, Some(7)).await.expect("computes"));
            }
        })
    });
}

#[divan::bench(counter = divan::counter::ItemsCount::new(100usize))]
fn zero_generate_100_tokens(bencher: Bencher<'_, '_>) {
    let runtime = runtime();
    let model = model(&runtime);
    let params = GenerationParams { max_tokens: 100, ..GenerationParams::default() };
    bencher.bench_local(|| {
        runtime.block_on(async { black_box(generate(model.as_ref(), "prompt", &params).await.expect("generates")) })
    });
}
