//! Decode speed of random-weight models of about 17 M and 58 M parameters, Q8_0 and Q4_0, on one and
//! two threads: tokens/s over the 127 greedy tokens after the first (divan prints items per second), as
//! `cargo xtask bench-peers` counts them; untimed before each sample, the prefill of a short prompt and
//! the first token. The model is compiled and loaded from bytes in memory once per benchmark (those
//! times are printed), not read from a file: for the file to the first token, and for llama.cpp on the
//! same GGUF files (the same weights and seed), see `bench-peers`.
//!
//! `batched`: the aggregate of 1, 4, 16 and 64 sequences stepped together through `compute_batch` (each
//! weight read once a pass for all), 58 M at Q8_0 on two threads: all sequences' tokens over the
//! [`BATCH_STEPS`] passes after their first, untimed; over the one-sequence figure, the gain batching
//! brings. For it against llama.cpp's batch API in the same run, see `bench-peers --batch`.

#![allow(clippy::unwrap_used, clippy::print_stderr, reason = "a benchmark's setup failing is a bug to see at once")]

use std::sync::Arc;
use std::time::Instant;

use divan::Bencher;
use divan::counter::ItemsCount;
use usine_engine::{BatchStep, Engine, GenerationParams, LoadedModel, ModelSpec, NoProgress, Sequence, TokenId};
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
/// Timed passes per sample of `batched`.
const BATCH_STEPS: u32 = 32;

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

#[divan::bench(args = [1, 4, 16, 64], sample_count = 5, sample_size = 1)]
fn batched(bencher: Bencher<'_, '_>, streams: usize) {
    let (runtime, model) = model("58m", "q8_0", 2);
    let prompt = model.tokenize("The kernel");
    let count = u32::try_from(streams).unwrap() * BATCH_STEPS;
    bencher
        .counter(ItemsCount::new(count))
        .with_inputs(|| {
            runtime.block_on(async {
                let mut running: Vec<(Arc<dyn Sequence>, TokenId)> = Vec::new();
                for seed in 0..streams as u64 {
                    let params = GenerationParams { max_tokens: BATCH_STEPS + 1, seed, ..GenerationParams::default() };
                    let sequence: Arc<dyn Sequence> =
                        usine_engine::prefill(model.as_ref(), &prompt, &[], &params).await.unwrap().into();
                    let first =
                        sequence.compute(sequence.prepare(0).await.unwrap(), prompt.last().copied()).await.unwrap();
                    running.push((sequence, first.id));
                }
                running
            })
        })
        .bench_local_values(|mut running| {
            runtime.block_on(async {
                for step in 1..=BATCH_STEPS {
                    let mut steps = Vec::with_capacity(running.len());
                    for (sequence, previous) in &running {
                        let prepared = sequence.prepare(step).await.unwrap();
                        steps.push(BatchStep { sequence: Arc::clone(sequence), prepared, previous: Some(*previous) });
                    }
                    let tokens = model.compute_batch(steps).await;
                    for ((_, previous), token) in running.iter_mut().zip(tokens) {
                        *previous = token.unwrap().id;
                    }
                }
            });
            running // dropped after the sample, untimed
        });
}
