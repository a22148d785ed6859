//! Decode speed of random-weight models of about 17 M and 58 M parameters, Q8_0 and Q4_0, on one and
//! two threads: tokens/s over the 127 greedy tokens after the first (divan prints items per second), as
//! `cargo xtask bench-peers` counts them; untimed before each sample, the prefill of a short prompt and
//! the first token. The model is compiled and loaded from bytes in memory once per benchmark (those
//! times are printed), not read from a file: for the file to the first token, and for llama.cpp on the
//! same GGUF files (the same weights and seed), see `bench-peers`.

#![allow(clippy::unwrap_used, clippy::print_stderr, reason = "a benchmark's setup failing is a bug to see at once")]

use std::sync::Arc;
use std::time::Instant;

use divan::Bencher;
use divan::counter::ItemsCount;
use usine_engine::{Engine, GenerationParams, LoadedModel, ModelSpec, NoProgress};
use usine_engine_candle::{CandleEngine, NAME, PROFILE, Shape, WEIGHTS_OPTION, random_weights};

fn main() {
    divan::main();
}

const SIZES: [(&str, Shape); 2] = [
    ("17m", Shape { dim: 384, layers: 11, heads: 6, kv_heads: 2, ffn: 1024, max_context: 2048 }),
    ("58m", Shape { dim: 640, layers: 13, heads: 10, kv_heads: 2, ffn: 1728, max_context: 2048 }),
];
/// Greedy tokens per sample, the first untimed.
const TOKENS: u32 = 128;

fn model(size: &str, quantization: &str, threads: usize) -> (tokio::runtime::Runtime, Arc<dyn LoadedModel>) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let shape = SIZES.iter().find(|(name, _)| *name == size).unwrap().1;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    std::fs::write(&path, random_weights(&shape, 58).unwrap()).unwrap();
    let mut spec = ModelSpec::new(size, NAME, PROFILE).quantization(quantization);
    spec.options.insert(WEIGHTS_OPTION.into(), path.display().to_string());
    let engine = CandleEngine::with_threads(threads).unwrap();
    let model = runtime.block_on(async {
        let start = Instant::now();
        let graph = engine.compile(&spec, &NoProgress).await.unwrap();
        let compiled = start.elapsed();
        let start = Instant::now();
        let model = engine.load(&graph).await.unwrap();
        eprintln!(
            "{size} ({} parameters) {quantization}: compile {compiled:.2?}, load {:.2?}, GGUF {} bytes",
            shape.params(),
            start.elapsed(),
            graph.bytes.len()
        );
        model
    });
    (runtime, model)
}

#[divan::bench(args = ["17m", "58m"], consts = [1, 2], sample_count = 5, sample_size = 1)]
fn q8_0<const THREADS: usize>(bencher: Bencher<'_, '_>, size: &str) {
    decode(bencher, size, "q8_0", THREADS);
}

#[divan::bench(args = ["17m", "58m"], consts = [1, 2], sample_count = 5, sample_size = 1)]
fn q4_0<const THREADS: usize>(bencher: Bencher<'_, '_>, size: &str) {
    decode(bencher, size, "q4_0", THREADS);
}

fn decode(bencher: Bencher<'_, '_>, size: &str, quantization: &str, threads: usize) {
    let (runtime, model) = model(size, quantization, threads);
    let params = GenerationParams { max_tokens: TOKENS, temperature: 0.0, ..GenerationParams::default() };
    let prompt = model.tokenize("The kernel");
    bencher
        .counter(ItemsCount::new(TOKENS - 1))
        .with_inputs(|| {
            runtime.block_on(async {
                let sequence = usine_engine::prefill(model.as_ref(), &prompt, &[], &params).await.unwrap();
                let first = sequence.compute(sequence.prepare(0).await.unwrap(), prompt.last().copied()).await.unwrap();
                (sequence, first.id)
            })
        })
        .bench_local_values(|(sequence, mut previous)| {
            runtime.block_on(async {
                for step in 1..TOKENS {
                    previous =
                        sequence.compute(sequence.prepare(step).await.unwrap(), Some(previous)).await.unwrap().id;
                }
            });
            sequence // dropped after the sample, untimed
        });
}
