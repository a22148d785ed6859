//! Integration tests of `usine-engine-candle` with small random-weight models: the conformance kit, the
//! same seed giving the same tokens, both quantizations, typed errors on bad source weights; and the
//! logits of generated GGUF files against llama.cpp's committed ones (`llama_cpp.rs`).

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

mod llama_cpp;
mod tokens;

use usine_engine::{Engine, GenerationParams, ModelSpec, NoProgress, generate};
use usine_engine_candle::{BUILTIN_PREFIX, CandleEngine, NAME, PROFILE, Shape, WEIGHTS_OPTION, random_weights};

const SHAPE: Shape = Shape { dim: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 192, max_context: 256 };

/// A spec of random weights of `SHAPE` written into `dir`.
fn spec(dir: &tempfile::TempDir, quantization: &str) -> ModelSpec {
    let path = dir.path().join("weights.safetensors");
    std::fs::write(&path, random_weights(&SHAPE, 7).unwrap()).unwrap();
    let mut spec = ModelSpec::new("random", NAME, PROFILE).quantization(quantization);
    spec.options.insert(WEIGHTS_OPTION.into(), path.display().to_string());
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_passes_the_conformance_kit_at_both_quantizations() {
    for quantization in ["q8_0", "q4_0"] {
        let dir = tempfile::tempdir().unwrap();
        let report = usine_engine::conformance::check(&CandleEngine::new(), &spec(&dir, quantization)).await;
        let report = report.unwrap_or_else(|failure| panic!("{quantization}: {failure}"));
        assert_eq!(report.checks.len(), 13, "{quantization}: {:?}", report.checks);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_tokens_and_the_plan_is_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let engine = CandleEngine::new();
    let graph = engine.compile(&spec(&dir, "q8_0"), &NoProgress).await.unwrap();
    let plan = engine.memory_plan(&graph).unwrap();
    assert_eq!(plan.kv_bytes_per_token, 2 * 2 * 32 * 4, "keys and values, 2 layers, 2 kv heads of 16, f32");
    assert_eq!(plan.max_context_tokens, 256);
    assert!(plan.weights_bytes > 0 && plan.weights_bytes < (SHAPE.params() * 4) as u64, "quantized: {plan:?}");
    let model = engine.load(&graph).await.unwrap();
    let params = GenerationParams { max_tokens: 24, temperature: 0.8, seed: 3, ..Default::default() };
    let first = generate(model.as_ref(), "Hello", &params).await.unwrap();
    let second = generate(model.as_ref(), "Hello", &params).await.unwrap();
    assert_eq!(first.tokens, second.tokens);
    let other = GenerationParams { seed: 4, ..params };
    assert_ne!(generate(model.as_ref(), "Hello", &other).await.unwrap().tokens, first.tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_source_weights_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let engine = CandleEngine::new();
    let mut missing = spec(&dir, "q8_0");
    missing.options.insert(WEIGHTS_OPTION.into(), dir.path().join("nope").display().to_string());
    let error = engine.compile(&missing, &NoProgress).await.unwrap_err();
    assert!(error.to_string().contains("reading the weights"), "{error}");
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not safetensors at all").unwrap();
    missing.options.insert(WEIGHTS_OPTION.into(), garbage.display().to_string());
    let error = engine.compile(&missing, &NoProgress).await.unwrap_err();
    assert!(error.to_string().contains("source weights"), "{error}");
    let mut unset = spec(&dir, "q8_0");
    unset.options.clear();
    assert!(engine.compile(&unset, &NoProgress).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_of_an_empty_prompt_goes_on_as_an_unbroken_run() {
    let dir = tempfile::tempdir().unwrap();
    let engine = CandleEngine::new();
    let model = engine.load(&engine.compile(&spec(&dir, "q8_0"), &NoProgress).await.unwrap()).await.unwrap();
    let params = GenerationParams { max_tokens: 12, temperature: 0.0, ..Default::default() };
    let unbroken = generate(model.as_ref(), "", &params).await.unwrap().tokens;
    assert_eq!(unbroken.len(), 12, "greedy on random weights runs to the end");
    let half = &unbroken[..6];
    let left = GenerationParams { max_tokens: 6, ..params.clone() };
    let sequence = usine_engine::prefill(model.as_ref(), &[], half, &left).await.unwrap();
    let mut resumed = Vec::new();
    let mut previous = half.last().copied();
    for step in 6..12 {
        let prepared = sequence.prepare(step).await.unwrap();
        let token = sequence.compute(prepared, previous).await.unwrap();
        resumed.push(token.id);
        previous = Some(token.id);
    }
    assert_eq!(resumed, unbroken[6..]);
}

/// Weights held in memory compile as the same file would, under `builtin:NAME`; an unknown name is a
/// typed error that lists the known ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_weights_compile_from_memory_as_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let weights: &'static [u8] = Box::leak(random_weights(&SHAPE, 7).unwrap().into_boxed_slice());
    let engine = CandleEngine::new().with_builtin("random", weights);
    let from_file = engine.compile(&spec(&dir, "q8_0"), &NoProgress).await.unwrap();
    let mut builtin = spec(&dir, "q8_0");
    builtin.options.insert(WEIGHTS_OPTION.into(), format!("{BUILTIN_PREFIX}random"));
    assert_eq!(engine.compile(&builtin, &NoProgress).await.unwrap().bytes, from_file.bytes);
    builtin.options.insert(WEIGHTS_OPTION.into(), format!("{BUILTIN_PREFIX}other"));
    let error = engine.compile(&builtin, &NoProgress).await.unwrap_err().to_string();
    assert!(error.contains("builtin:other") && error.contains("\"random\""), "{error}");
}

/// The threads of a pass split the rows and the heads without changing a bit of the result: one, two
/// and three threads (one more than the key-value heads, so a thread has none) sample the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_number_of_threads_gives_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let params = GenerationParams { max_tokens: 24, temperature: 0.8, seed: 3, ..Default::default() };
    let mut answers = Vec::new();
    for threads in [1, 2, 3] {
        let engine = CandleEngine::with_threads(threads).unwrap();
        for quantization in ["q8_0", "q4_0"] {
            let model = engine.load(&engine.compile(&spec(&dir, quantization), &NoProgress).await.unwrap()).await;
            answers.push((quantization, generate(model.unwrap().as_ref(), "Hello", &params).await.unwrap().tokens));
        }
    }
    for (quantization, tokens) in &answers[2..] {
        let first = &answers.iter().find(|(name, _)| name == quantization).unwrap().1;
        assert_eq!(tokens, first, "{quantization}");
    }
}

// Would catch: a tokenizer.json beside safetensors weights ignored (the conversation not rendered by its
// template, its end token not ending an answer), or one that does not fit the weights run anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenizer_json_beside_the_weights_is_the_models_tokenizer() {
    let vocab = concat!(env!("CARGO_MANIFEST_DIR"), "/vocab/");
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir, "q8_0");
    let engine = CandleEngine::new();
    let plain = engine.load(&engine.compile(&spec, &NoProgress).await.unwrap()).await.unwrap();
    let chat = [usine_engine::Message::new(usine_engine::Role::User, "Hi")];
    assert_eq!(plain.chat_prompt(&chat).unwrap(), b"User: Hi\nAssistant:".map(u32::from), "the bytes, without one");
    for (from, to) in
        [("hf-bytes.tokenizer.json", "tokenizer.json"), ("hf-bytes.tokenizer_config.json", "tokenizer_config.json")]
    {
        std::fs::copy(format!("{vocab}{from}"), dir.path().join(to)).unwrap();
    }
    let model = engine.load(&engine.compile(&spec, &NoProgress).await.unwrap()).await.unwrap();
    let ids = model.chat_prompt(&chat).unwrap();
    // hf-bytes: `<|im_end|>` is token 0, the template `user: Hi<|im_end|>assistant: `.
    assert_eq!(ids.iter().filter(|&&id| id == 0).count(), 1, "{ids:?}");
    assert_eq!(ids.len(), "user: Hi".len() + 1 + "assistant: ".len(), "{ids:?}");
    std::fs::copy(format!("{vocab}hf-llama3.tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let refused = engine.compile(&spec, &NoProgress).await.unwrap_err();
    assert!(refused.to_string().contains("holds 400 tokens; the weights' embeddings hold 257"), "{refused}");
}

/// Greedy tokens of `sequence` after `prompt`, `steps` of them, its blocks set to `grown` before the
/// steps past its first blocks (a paged sequence's table grows as it goes).
async fn decode(sequence: &dyn usine_engine::Sequence, prompt: &[u32], steps: u32, grown: &[u32]) -> Vec<u32> {
    let mut previous = prompt.last().copied();
    let mut tokens = Vec::new();
    for step in 0..steps {
        if step == 1 {
            sequence.set_blocks(grown);
        }
        let prepared = sequence.prepare(step).await.unwrap();
        let token = sequence.compute(prepared, previous).await.unwrap();
        tokens.push(token.id);
        previous = Some(token.id);
    }
    tokens
}

// Would catch: a paged sequence reading its keys at the wrong rows (a block table misread, a block
// boundary off by one), a prefill that recomputes or skips other tokens than the cached ones, or blocks
// that grew without the sequence seeing them: each must generate what a sequence with a kv-cache of its
// own does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_sequence_on_cached_blocks_generates_what_one_with_its_own_cache_does() {
    use usine_engine::{Blocks, Prefill};
    let dir = tempfile::tempdir().unwrap();
    let engine = CandleEngine::new();
    let graph = engine.compile(&spec(&dir, "q8_0"), &NoProgress).await.unwrap();
    let model = engine.load(&graph).await.unwrap();
    let block = model.kv_block_tokens().unwrap();
    assert_eq!(block, 16);
    let prompt = model.tokenize("The mill by the river turned all winter.");
    assert!(prompt.len() > 2 * block as usize && prompt.len() < 3 * block as usize, "{} tokens", prompt.len());
    let params = GenerationParams { max_tokens: 12, temperature: 0.0, ..Default::default() };
    let plan = model.memory_plan();
    let own = usine_engine::prefill(model.as_ref(), &prompt, &[], &params).await.unwrap();
    let expected = decode(own.as_ref(), &prompt, 12, &[]).await;

    // The first computes every block; the second finds the first two cached, in other blocks after them.
    for (ids, grown, cached) in [(&[0, 1, 2][..], &[0, 1, 2, 3][..], 0), (&[0, 1, 5][..], &[0, 1, 5, 6][..], 32)] {
        let input = Prefill::new(&plan, &prompt, &[], &params)
            .unwrap()
            .with_blocks(block, Blocks { ids, cached_tokens: cached })
            .unwrap();
        let paged = model.prefill(input).await.unwrap();
        assert_eq!(decode(paged.as_ref(), &prompt, 12, grown).await, expected, "{cached} tokens cached");
    }
    // Blocks without room for the context, or everything cached, are refused.
    let input = Prefill::new(&plan, &prompt, &[], &params).unwrap();
    assert!(input.with_blocks(block, Blocks { ids: &[0, 1], cached_tokens: 0 }).is_err());
    let all = prompt.len();
    assert!(input.with_blocks(block, Blocks { ids: &[0, 1, 2], cached_tokens: all }).is_err());
}
