//! Generated model files: random weights at a real model's widths, in any architecture and tensor
//! type usine runs, written as GGUF that llama.cpp runs too. No package ships a real model, so these
//! are what the parity check (`cargo xtask parity`), the tests and the benchmarks run (never
//! committed when larger than a few MB).

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use usine_engine::EngineError;

use crate::config::{Architecture, Config};
use crate::gguf::{fatal, uniform, write};
use crate::tokenizer::{self, Vocabulary};

/// The widths of a model to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// Its name, as `random_model` and `cargo xtask parity` take it.
    pub name: &'static str,
    /// The configuration (the generated file's vocabulary: the bytes, the end token, fillers).
    pub config: Config,
    /// Whether the file carries rotary frequency factors (Llama 3's `rope_freqs`).
    pub rope_factors: bool,
}

/// The presets: a tiny one of each architecture for the tests (K-quant blocks need widths of 256),
/// and four of real widths whose layers the caller chooses.
pub fn presets() -> Vec<Preset> {
    let base = |architecture, name, rope_factors| Preset {
        name,
        config: Config {
            architecture,
            dim: 256,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            ffn: 512,
            context: 512,
            vocab: 384,
            rms_epsilon: 1e-5,
            rope_theta: 10_000.0,
            rope_position_scale: 1.0,
            tied_output: false,
            bos: Some(crate::shape::END_OF_SEQUENCE),
            eos: Some(crate::shape::END_OF_SEQUENCE),
        },
        rope_factors,
    };
    let tiny_llama = base(Architecture::Llama, "tiny-llama", true);
    let mut tiny_qwen2 = base(Architecture::Qwen2, "tiny-qwen2", false);
    tiny_qwen2.config.tied_output = true;
    tiny_qwen2.config.rope_theta = 1_000_000.0;
    tiny_qwen2.config.rms_epsilon = 1e-6;
    let mut qwen = base(Architecture::Qwen2, "qwen2.5-0.5b", false);
    qwen.config = Config {
        dim: 896,
        layers: 24,
        heads: 14,
        kv_heads: 2,
        head_dim: 64,
        ffn: 4864,
        context: 32_768,
        vocab: 151_936,
        rms_epsilon: 1e-6,
        rope_theta: 1_000_000.0,
        tied_output: true,
        ..qwen.config
    };
    let mut tinyllama = base(Architecture::Llama, "tinyllama-1.1b", false);
    tinyllama.config = Config {
        dim: 2048,
        layers: 22,
        heads: 32,
        kv_heads: 4,
        head_dim: 64,
        ffn: 5632,
        context: 2048,
        vocab: 32_000,
        ..tinyllama.config
    };
    // Llama 3's shapes (the GPU's benchmark): tied embeddings at 1B, rotary factors at both.
    let mut llama_1b = base(Architecture::Llama, "llama-3.2-1b", true);
    llama_1b.config = Config {
        dim: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        ffn: 8192,
        context: 8192,
        vocab: 128_256,
        rope_theta: 500_000.0,
        tied_output: true,
        ..llama_1b.config
    };
    let mut llama_8b = base(Architecture::Llama, "llama-3.1-8b", true);
    llama_8b.config = Config {
        dim: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        ffn: 14_336,
        context: 8192,
        vocab: 128_256,
        rope_theta: 500_000.0,
        ..llama_8b.config
    };
    vec![tiny_llama, tiny_qwen2, qwen, tinyllama, llama_1b, llama_8b]
}

/// The tensor types a generated file can take: one type for every matrix, or llama.cpp's mixes.
pub const TYPES: [&str; 8] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"];

/// The type of the matrix `name` of `cols` columns in a file of type `kind` (one of [`TYPES`]). The
/// `_m` mixes are llama.cpp's in spirit: the base K-quant, and Q6_K for the value and down projections
/// and the output, which quantize worst. A K-quant needs rows of whole 256-value blocks; other rows
/// fall back to Q8_0 (llama.cpp falls back to a legacy type too).
fn matrix_type(kind: &str, name: &str, cols: usize) -> Option<GgmlDType> {
    let sensitive = name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight") || name == "output.weight";
    let dtype = match kind {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q6_k" => GgmlDType::Q6K,
        "q4_k_m" if sensitive => GgmlDType::Q6K,
        "q4_k_m" => GgmlDType::Q4K,
        "q5_k_m" if sensitive => GgmlDType::Q6K,
        "q5_k_m" => GgmlDType::Q5K,
        _ => return None,
    };
    let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
    Some(if k_quant && !cols.is_multiple_of(256) { GgmlDType::Q8_0 } else { dtype })
}

/// A GGUF file of `preset`'s widths with `layers` layers, its matrices of type `kind` (one of
/// [`TYPES`]), random weights from `seed`, the byte-level vocabulary: the same bytes for the same
/// arguments.
pub fn random_gguf(preset: &Preset, layers: usize, kind: &str, seed: u64) -> Result<Vec<u8>, EngineError> {
    let vocabulary = tokenizer::vocabulary("bytes", preset.config.vocab).expect("a known vocabulary");
    random_gguf_with(preset, layers, kind, seed, &vocabulary)
}

/// [`random_gguf`] with `vocabulary` (see [`tokenizer::vocabulary`]): the embeddings hold its tokens.
pub fn random_gguf_with(
    preset: &Preset,
    layers: usize,
    kind: &str,
    seed: u64,
    vocabulary: &Vocabulary,
) -> Result<Vec<u8>, EngineError> {
    let mut config = Config { layers, ..preset.config.clone() };
    config.vocab = vocabulary.tokens.len();
    (config.bos, config.eos) = (vocabulary.bos, vocabulary.eos);
    if matrix_type(kind, "", 256).is_none() {
        return Err(EngineError::InvalidParams { name: "type", value: kind.to_owned(), limit: TYPES.join(", ") });
    }
    let mut next = uniform(seed);
    let mut tensors = Vec::new();
    let mut expected = config.tensors();
    if preset.rope_factors {
        expected.push(("rope_freqs.weight".to_owned(), vec![config.head_dim / 2]));
    }
    for (name, dims) in expected {
        let count: usize = dims.iter().product();
        let values: Vec<f32> = match dims.as_slice() {
            // Norms near one, unequal (a norm applied to the wrong values shows); small biases; the
            // frequency factors between 1 and 8, as Llama 3's.
            [_] if name == "rope_freqs.weight" => (0..count).map(|_| 4.5 + 3.5 * next()).collect(),
            [_] if name.ends_with(".bias") => (0..count).map(|_| 0.5 * next()).collect(),
            [_] => (0..count).map(|_| 1.0 + 0.25 * next()).collect(),
            [_, cols] => {
                #[expect(clippy::cast_precision_loss, reason = "a scale")]
                let scale = 1.0 / (*cols as f32).sqrt();
                (0..count).map(|_| next() * scale).collect()
            }
            _ => unreachable!("vectors and matrices only"),
        };
        let tensor = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu).map_err(fatal("random weights"))?;
        let dtype = match dims.as_slice() {
            [_, cols] => matrix_type(kind, &name, *cols).expect("checked above"),
            _ => GgmlDType::F32,
        };
        tensors.push((name.clone(), QTensor::quantize(&tensor, dtype).map_err(fatal("quantizing"))?));
    }
    let arch = config.architecture.name();
    let count = |value: usize| Value::U32(u32::try_from(value).expect("preset widths are small"));
    let mut values = vec![
        ("general.architecture".to_owned(), Value::String(arch.to_owned())),
        ("general.name".to_owned(), Value::String(format!("usine random {} {kind}", preset.name))),
        (format!("{arch}.context_length"), count(config.context)),
        (format!("{arch}.embedding_length"), count(config.dim)),
        (format!("{arch}.block_count"), count(config.layers)),
        (format!("{arch}.feed_forward_length"), count(config.ffn)),
        (format!("{arch}.attention.head_count"), count(config.heads)),
        (format!("{arch}.attention.head_count_kv"), count(config.kv_heads)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(config.rms_epsilon)),
        (format!("{arch}.rope.freq_base"), Value::F32(config.rope_theta)),
        (format!("{arch}.rope.dimension_count"), count(config.head_dim)),
    ];
    values.extend(vocabulary.to_gguf());
    write(&values, &tensors)
}
