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

/// The GGUF metadata key prefix of the shape.
const PREFIX: &str = "usine.llama.";

pub(crate) fn fatal(context: &str) -> impl Fn(candle_core::Error) -> EngineError + '_ {
    move |error| EngineError::Fatal { message: format!("{context}: {error}") }
}

fn corrupt(error: impl std::fmt::Display) -> EngineError {
    EngineError::CorruptGraph { message: error.to_string() }
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
pub(crate) fn compile(bytes: &[u8], dtype: GgmlDType, progress: &dyn ProgressSink) -> Result<Vec<u8>, EngineError> {
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
    let mut quantized = Vec::with_capacity(names.len());
    for (index, name) in names.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "a fraction for people")]
        report("quantizing", 0.15 + 0.75 * index as f64 / names.len() as f64);
        let tensor = tensors[*name].to_dtype(candle_core::DType::F32).map_err(fatal(name))?;
        // Matrices are quantized (the embeddings too: rows are looked up by dequantizing); norms stay f32.
        let dtype = if tensor.rank() == 2 { dtype } else { GgmlDType::F32 };
        quantized.push((name.as_str(), QTensor::quantize(&tensor, dtype).map_err(fatal(name))?));
    }
    report("writing GGUF", 0.9);
    let values: Vec<(String, Value)> = shape
        .to_metadata()
        .into_iter()
        .map(|(key, value)| (format!("{PREFIX}{key}"), Value::U64(value as u64)))
        .collect();
    let metadata: Vec<(&str, &Value)> = values.iter().map(|(key, value)| (key.as_str(), value)).collect();
    let tensors: Vec<(&str, &QTensor)> = quantized.iter().map(|(name, tensor)| (*name, tensor)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).map_err(fatal("writing GGUF"))?;
    report("done", 1.0);
    Ok(out.into_inner())
}

/// A GGUF graph read back: its shape and tensors.
pub(crate) struct Graph {
    pub(crate) shape: Shape,
    pub(crate) tensors: HashMap<String, QTensor>,
}

/// Reads only the shape and the size of the weights from GGUF `bytes` (headers, no tensor data).
pub(crate) fn read_plan(bytes: &[u8]) -> Result<(Shape, u64), EngineError> {
    let content = gguf_file::Content::read(&mut Cursor::new(bytes)).map_err(corrupt)?;
    let shape = shape_of(&content)?;
    let data = (bytes.len() as u64).saturating_sub(content.tensor_data_offset);
    Ok((shape, data))
}

fn shape_of(content: &gguf_file::Content) -> Result<Shape, EngineError> {
    Shape::from_metadata(|key| match content.metadata.get(&format!("{PREFIX}{key}"))? {
        Value::U64(value) => usize::try_from(*value).ok(),
        _ => None,
    })
}

/// Reads a whole GGUF graph.
pub(crate) fn read(bytes: &[u8]) -> Result<Graph, EngineError> {
    let mut reader = Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut reader).map_err(corrupt)?;
    let shape = shape_of(&content)?;
    let mut tensors = HashMap::new();
    for (name, dims) in shape.tensors() {
        let tensor = content.tensor(&mut reader, &name, &Device::Cpu).map_err(corrupt)?;
        if tensor.shape().dims() != dims.as_slice() {
            return Err(corrupt(format!("`{name}` is {:?}, the shape asks for {dims:?}", tensor.shape().dims())));
        }
        tensors.insert(name, tensor);
    }
    Ok(Graph { shape, tensors })
}

/// Seeded random weights of `shape`, as safetensors bytes: for tests and speed work (never committed).
pub fn random_weights(shape: &Shape, seed: u64) -> Result<Vec<u8>, EngineError> {
    shape.check()?;
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // splitmix64, then a uniform value in [-1, 1)
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        #[expect(clippy::cast_precision_loss, reason = "53 bits of a random number")]
        let unit = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
        #[expect(clippy::cast_possible_truncation, reason = "a weight")]
        let weight = (2.0 * unit - 1.0) as f32;
        weight
    };
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
