//! Compile: source weights (safetensors) → checked shapes → quantized matrices → a GGUF file. Load:
//! GGUF bytes → tensors.

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use usine_engine::{EngineError, Progress, ProgressSink};

use crate::shape::Shape;

/// The quantizations offered, by name; the first is the default.
pub const QUANTIZATIONS: [(&str, GgmlDType); 2] = [("q8_0", GgmlDType::Q8_0), ("q4_0", GgmlDType::Q4_0)];

/// The GGUF keys of a shape, as llama.cpp reads a `llama` model (so that the same file runs in both).
const SHAPE_KEYS: [(&str, &str); 6] = [
    ("dim", "llama.embedding_length"),
    ("layers", "llama.block_count"),
    ("heads", "llama.attention.head_count"),
    ("kv_heads", "llama.attention.head_count_kv"),
    ("ffn", "llama.feed_forward_length"),
    ("max_context", "llama.context_length"),
];

/// A tensor's name in GGUF (llama.cpp's) from its name in the source weights.
fn gguf_name(source: &str) -> String {
    let renamed = [
        ("tok_embeddings.", "token_embd."),
        ("norm.", "output_norm."),
        ("attention_norm.", "attn_norm."),
        ("attention.wq.", "attn_q."),
        ("attention.wk.", "attn_k."),
        ("attention.wv.", "attn_v."),
        ("attention.wo.", "attn_output."),
        ("feed_forward.w1.", "ffn_gate."),
        ("feed_forward.w2.", "ffn_down."),
        ("feed_forward.w3.", "ffn_up."),
    ];
    let name = source.strip_prefix("layers.").map_or_else(|| source.to_owned(), |rest| format!("blk.{rest}"));
    for (from, to) in renamed {
        if let Some(at) = name.find(from)
            && (at == 0 || name.as_bytes()[at - 1] == b'.')
        {
            return format!("{}{to}{}", &name[..at], &name[at + from.len()..]);
        }
    }
    name
}

/// A byte as GPT-2's byte-level vocabulary prints it: printable Latin-1 bytes stand for themselves,
/// the others are shifted past 255 in order.
pub(crate) fn byte_token(byte: u8) -> String {
    let printable = |byte: u8| (33..=126).contains(&byte) || (161..=172).contains(&byte) || byte >= 174;
    let code = if printable(byte) {
        u32::from(byte)
    } else {
        let shifted = (0..byte).filter(|earlier| !printable(*earlier)).count();
        256 + u32::try_from(shifted).expect("below 256")
    };
    char::from_u32(code).expect("below the surrogates").to_string()
}

pub(crate) fn fatal(context: &str) -> impl Fn(candle_core::Error) -> EngineError + '_ {
    move |error| EngineError::Fatal { message: format!("{context}: {error}") }
}

/// The shape written in safetensors metadata.
pub fn source_shape(bytes: &[u8]) -> Result<Shape, EngineError> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|error| EngineError::Fatal { message: format!("source weights: {error}") })?;
    let entries = metadata.metadata().clone().unwrap_or_default();
    Shape::from_metadata(|key| entries.get(key)?.parse().ok())
        .map_err(|error| EngineError::Fatal { message: format!("source weights: {error}") })
}

/// Compiles safetensors `bytes` into GGUF bytes, matrices quantized to `dtype`, reporting progress.
/// `vocabulary`: the tokenizer the file carries (default: the bytes).
pub(crate) fn compile(
    bytes: &[u8],
    dtype: GgmlDType,
    vocabulary: Option<&crate::tokenizer::Vocabulary>,
    progress: &dyn ProgressSink,
) -> Result<Vec<u8>, EngineError> {
    let report =
        |stage: &str, fraction: f64| progress.report(Progress { stage: stage.to_owned(), fraction, eta: None });
    report("reading weights", 0.0);
    let shape = source_shape(bytes)?;
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(fatal("source weights"))?;
    report("checking shapes", 0.1);
    let expected = shape.tensors();
    for (name, dims) in &expected {
        let tensor = tensors
            .get(name)
            .ok_or_else(|| EngineError::Fatal { message: format!("source weights: tensor `{name}` missing") })?;
        if tensor.dims() != dims.as_slice() {
            return Err(EngineError::Fatal {
                message: format!("source weights: `{name}` is {:?}, the shape asks for {dims:?}", tensor.dims()),
            });
        }
    }
    if let Some(extra) = tensors.keys().find(|name| !expected.contains_key(*name)) {
        return Err(EngineError::Fatal { message: format!("source weights: unexpected tensor `{extra}`") });
    }
    let mut names: Vec<&String> = expected.keys().collect();
    names.sort();
    let mut quantized: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    for (index, name) in names.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "a fraction for people")]
        report("quantizing", 0.15 + 0.75 * index as f64 / names.len() as f64);
        let tensor = tensors[*name].to_dtype(candle_core::DType::F32).map_err(fatal(name))?;
        // Matrices are quantized (the embeddings too: rows are looked up by dequantizing); norms stay f32.
        let dtype = if tensor.rank() == 2 { dtype } else { GgmlDType::F32 };
        quantized.push((name.as_str(), QTensor::quantize(&tensor, dtype).map_err(fatal(name))?));
    }
    report("writing GGUF", 0.9);
    let mut values: Vec<(String, Value)> = shape
        .to_metadata()
        .into_iter()
        .map(|(key, value)| {
            let gguf_key = SHAPE_KEYS.iter().find(|(ours, _)| *ours == key).expect("every key has its name").1;
            (gguf_key.to_owned(), Value::U32(u32::try_from(value).expect("checked: small dimensions")))
        })
        .collect();
    values.extend([
        ("general.architecture".to_owned(), Value::String("llama".to_owned())),
        ("general.name".to_owned(), Value::String("usine".to_owned())),
        ("llama.rope.dimension_count".to_owned(), Value::U32(u32::try_from(shape.head_dim()).expect("small"))),
        ("llama.rope.freq_base".to_owned(), Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon".to_owned(), Value::F32(1e-5)),
    ]);
    match vocabulary {
        Some(vocabulary) => values.extend(vocabulary.to_gguf()),
        None => values.extend(crate::tokenizer::vocabulary("bytes", 0).expect("a known vocabulary").to_gguf()),
    }
    let renamed: Vec<(String, QTensor)> =
        quantized.into_iter().map(|(name, tensor)| (gguf_name(name), tensor)).collect();
    let bytes = write(&values, &renamed)?;
    report("done", 1.0);
    Ok(bytes)
}

/// A GGUF file of `values` and `tensors`, as llama.cpp reads it.
pub(crate) fn write(values: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<Vec<u8>, EngineError> {
    let metadata: Vec<(&str, &Value)> = values.iter().map(|(key, value)| (key.as_str(), value)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).map_err(fatal("writing GGUF"))?;
    let mut bytes = out.into_inner();
    if values.iter().any(|(key, value)| {
        key == "tokenizer.ggml.merges" && matches!(value, Value::Array(merges) if merges.is_empty())
    }) {
        type_empty_array_as_strings(&mut bytes, "tokenizer.ggml.merges")?;
    }
    Ok(bytes)
}

/// Seeded uniform values in [-1, 1): splitmix64's 53 high bits.
pub(crate) fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        #[expect(clippy::cast_precision_loss, reason = "53 bits of a random number")]
        let unit = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
        #[expect(clippy::cast_possible_truncation, reason = "a weight")]
        let weight = (2.0 * unit - 1.0) as f32;
        weight
    }
}

/// candle's writer gives an empty array the element type `u32` (it has no element to take it from);
/// llama.cpp refuses merges that are not strings, even none. Retypes the empty array under `key` in
/// written GGUF `bytes` as an array of strings.
fn type_empty_array_as_strings(bytes: &mut [u8], key: &str) -> Result<(), EngineError> {
    const ARRAY: u32 = 9;
    const U32: u32 = 4;
    const STRING: u32 = 8;
    // In the header: the key (u64 length, then its bytes), the value's type, the element type, the count.
    let mut pattern = Vec::with_capacity(8 + key.len() + 16);
    pattern.extend_from_slice(&(key.len() as u64).to_le_bytes());
    pattern.extend_from_slice(key.as_bytes());
    pattern.extend_from_slice(&ARRAY.to_le_bytes());
    pattern.extend_from_slice(&U32.to_le_bytes());
    pattern.extend_from_slice(&0_u64.to_le_bytes());
    let element_type = 8 + key.len() + 4;
    let found = bytes.windows(pattern.len()).position(|window| {
        // Typed u32 (candle's writer now), or already strings (a writer that knows better).
        window[..element_type] == pattern[..element_type]
            && (window[element_type..element_type + 4] == U32.to_le_bytes()
                || window[element_type..element_type + 4] == STRING.to_le_bytes())
            && window[element_type + 4..] == pattern[element_type + 4..]
    });
    let at = found.ok_or_else(|| EngineError::Fatal { message: format!("writing GGUF: no empty array `{key}`") })?;
    bytes[at + element_type..at + element_type + 4].copy_from_slice(&STRING.to_le_bytes());
    Ok(())
}

/// Seeded random weights of `shape`, as safetensors bytes: for tests and speed work (never committed).
pub fn random_weights(shape: &Shape, seed: u64) -> Result<Vec<u8>, EngineError> {
    shape.check()?;
    let mut next = uniform(seed);
    let mut names: Vec<(String, Vec<usize>)> = shape.tensors().into_iter().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for (name, dims) in names {
        let count: usize = dims.iter().product();
        let values: Vec<f32> = if dims.len() == 1 {
            vec![1.0; count] // norms start at one
        } else {
            #[expect(clippy::cast_precision_loss, reason = "a scale")]
            let scale = 1.0 / (dims[1] as f32).sqrt();
            (0..count).map(|_| next() * scale).collect()
        };
        tensors.push((name, Tensor::from_vec(values, dims, &Device::Cpu).map_err(fatal("random weights"))?));
    }
    let metadata: HashMap<String, String> =
        shape.to_metadata().into_iter().map(|(key, value)| (key.to_owned(), value.to_string())).collect();
    safetensors::serialize(tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)), Some(metadata))
        .map_err(|error| EngineError::Fatal { message: format!("writing safetensors: {error}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_take_llama_cpp_names_and_bytes_gpt2_stand_ins() {
        assert_eq!(gguf_name("tok_embeddings.weight"), "token_embd.weight");
        assert_eq!(gguf_name("norm.weight"), "output_norm.weight");
        assert_eq!(gguf_name("output.weight"), "output.weight");
        assert_eq!(gguf_name("layers.3.attention_norm.weight"), "blk.3.attn_norm.weight");
        assert_eq!(gguf_name("layers.3.attention.wq.weight"), "blk.3.attn_q.weight");
        assert_eq!(gguf_name("layers.0.ffn_norm.weight"), "blk.0.ffn_norm.weight");
        assert_eq!(gguf_name("layers.0.feed_forward.w2.weight"), "blk.0.ffn_down.weight");
        let tokens = crate::tokenizer::vocabulary("bytes", 0).expect("a known vocabulary").tokens;
        let text = |index: usize| tokens[index].clone();
        assert_eq!(
            (text(usize::from(b'a')), text(usize::from(b' ')), text(256)),
            ("a".into(), "\u{120}".into(), "<|endoftext|>".into())
        );
        let distinct: std::collections::BTreeSet<String> = (0..257).map(text).collect();
        assert_eq!(distinct.len(), 257);
    }

    #[test]
    fn the_empty_merges_are_an_array_of_strings_as_llama_cpp_asks() {
        let shape = crate::shape::Shape { dim: 32, layers: 1, heads: 2, kv_heads: 1, ffn: 64, max_context: 16 };
        let source = random_weights(&shape, 1).expect("weights");
        let bytes = compile(&source, GgmlDType::Q8_0, None, &usine_engine::NoProgress).expect("compiled");
        let key = b"tokenizer.ggml.merges";
        let at = bytes.windows(key.len()).position(|window| window == key).expect("the key is written");
        let after = &bytes[at + key.len()..at + key.len() + 16];
        assert_eq!(after[..4], 9_u32.to_le_bytes(), "an array");
        assert_eq!(after[4..8], 8_u32.to_le_bytes(), "of strings");
        assert_eq!(after[8..], 0_u64.to_le_bytes(), "empty");
        let content = gguf_file::Content::read(&mut Cursor::new(&bytes)).expect("candle reads it back");
        assert!(
            matches!(content.metadata.get("tokenizer.ggml.merges"), Some(Value::Array(merges)) if merges.is_empty())
        );
    }
}
