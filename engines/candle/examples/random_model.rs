//! Writes a random-weight model, never committed:
//!
//! - `random_model 17m|58m|tiny OUT.safetensors`: usine's own byte-level model of that size, as
//!   safetensors (for speed work; `cargo xtask random-model`).
//! - `random_model gguf PRESET TYPE OUT.gguf [LAYERS [VOCAB]]`: a GGUF file of a preset's widths
//!   (`tiny-llama`, `tiny-qwen2`, `qwen2.5-0.5b`, `tinyllama-1.1b`, `llama-3.2-1b`, `llama-3.1-8b`), its
//!   matrices of TYPE (`f32`,
//!   `f16`, `bf16`, `q8_0`, `q4_0`, `q4_k_m`, `q5_k_m`, `q6_k`), with LAYERS layers (default: 2) and
//!   the vocabulary VOCAB (default `bytes`; the trained ones: `mistral`, `llama2`, `gpt2`, `qwen2`,
//!   `llama3`, `smollm`, each with its family's pre-tokenizer and chat template);
//!   prints one JSON line: parameters, vocabulary, bytes, layers, seed and the file's BLAKE3 (the
//!   fixtures of `cargo xtask parity --bless` record the last three).

#![allow(clippy::print_stderr, clippy::print_stdout, reason = "a tool that reports what it wrote")]

use usine_engine_candle::{Shape, TYPES, presets, random_gguf_with, random_weights, tokenizer};

/// The seed of every file written.
const SEED: u64 = 58;

/// The sizes: about 17 and 58 million parameters (the issue's), and a tiny one for tests.
fn shape(size: &str) -> Option<Shape> {
    match size {
        "17m" => Some(Shape { dim: 384, layers: 11, heads: 6, kv_heads: 2, ffn: 1024, max_context: 2048 }),
        "58m" => Some(Shape { dim: 640, layers: 13, heads: 10, kv_heads: 2, ffn: 1728, max_context: 2048 }),
        "tiny" => Some(Shape { dim: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 192, max_context: 256 }),
        _ => None,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [gguf, preset, kind, out, rest @ ..] = args.as_slice()
        && gguf == "gguf"
    {
        let layers: usize = rest.first().map_or(Ok(2), |layers| layers.parse())?;
        let vocabulary_name = rest.get(1).map_or("bytes", String::as_str);
        let presets = presets();
        let preset = presets.iter().find(|known| known.name == preset).ok_or_else(|| {
            let names: Vec<_> = presets.iter().map(|preset| preset.name).collect();
            format!("unknown preset `{preset}` ({})", names.join(", "))
        })?;
        if !TYPES.contains(&kind.as_str()) {
            return Err(format!("unknown type `{kind}` ({})", TYPES.join(", ")).into());
        }
        let vocabulary = tokenizer::vocabulary(vocabulary_name, preset.config.vocab).ok_or_else(|| {
            format!("unknown vocabulary `{vocabulary_name}` ({})", tokenizer::VOCABULARIES.join(", "))
        })?;
        let bytes = random_gguf_with(preset, layers, kind, SEED, &vocabulary)?;
        std::fs::write(out, &bytes)?;
        let config = usine_engine_candle::Config { layers, vocab: vocabulary.tokens.len(), ..preset.config.clone() };
        println!(
            "{{\"params\": {}, \"vocab\": {}, \"bytes\": {}, \"layers\": {layers}, \"seed\": {SEED}, \"blake3\": \"{}\"}}",
            config.params(),
            config.vocab,
            bytes.len(),
            blake3::hash(&bytes).to_hex()
        );
        return Ok(());
    }
    let [size, out] = args.as_slice() else {
        return Err(
            "usage: random_model 17m|58m|tiny OUT.safetensors | random_model gguf PRESET TYPE OUT.gguf [LAYERS [VOCAB]]".into(),
        );
    };
    let shape = shape(size).ok_or_else(|| format!("unknown size `{size}` (17m, 58m, tiny)"))?;
    std::fs::write(out, random_weights(&shape, SEED)?)?;
    eprintln!("random_model: {} parameters in {out}", shape.params());
    Ok(())
}
