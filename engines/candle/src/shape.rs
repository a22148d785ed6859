//! The shape of usine's own byte-level models, as their safetensors source declares it, and the
//! names of their tensors there.

use std::collections::HashMap;

use usine_engine::EngineError;

/// Byte-level vocabulary: the 256 bytes, then the end of a sequence (also the start of an empty one).
pub const VOCAB: usize = 257;
/// The end-of-sequence token.
pub const END_OF_SEQUENCE: u32 = 256;
/// Longest context a model may declare.
pub(crate) const MAX_CONTEXT: usize = 1 << 16;
/// Widest layer a model may declare.
pub(crate) const MAX_WIDTH: usize = 1 << 16;
/// Most layers a model may declare.
pub(crate) const MAX_LAYERS: usize = 1024;
/// Quantized rows come in blocks of 32 values (Q8_0, Q4_0): the widths must be multiples of it.
pub(crate) const BLOCK: usize = 32;

/// A decoder's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Width of the residual stream.
    pub dim: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key-value heads (grouped-query attention: `heads` is a multiple of it).
    pub kv_heads: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    /// Longest sequence.
    pub max_context: usize,
}

/// The keys of a shape in safetensors and GGUF metadata.
const KEYS: [&str; 6] = ["dim", "layers", "heads", "kv_heads", "ffn", "max_context"];

impl Shape {
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Width of the keys (and values) of one token in one layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
    }

    /// Checks that the dimensions hold together and that the weights can be quantized in blocks.
    pub fn check(&self) -> Result<(), EngineError> {
        let bad = |what: String| Err(EngineError::Fatal { message: format!("model shape: {what}") });
        if self.dim == 0 || self.layers == 0 || self.heads == 0 || self.kv_heads == 0 || self.ffn == 0 {
            return bad(format!("a dimension is zero in {self:?}"));
        }
        if !self.dim.is_multiple_of(self.heads)
            || !self.heads.is_multiple_of(self.kv_heads)
            || !self.head_dim().is_multiple_of(2)
        {
            return bad(format!("heads must divide the width, kv heads the heads, and heads be even in {self:?}"));
        }
        if !self.dim.is_multiple_of(BLOCK) || !self.ffn.is_multiple_of(BLOCK) {
            return bad(format!("dim and ffn must be multiples of {BLOCK} (quantization blocks) in {self:?}"));
        }
        if self.max_context == 0 || self.max_context > MAX_CONTEXT {
            return bad(format!("max_context {} is outside 1..={MAX_CONTEXT}", self.max_context));
        }
        if self.dim > MAX_WIDTH || self.ffn > MAX_WIDTH || self.heads > self.dim || self.layers > MAX_LAYERS {
            return bad(format!("dim and ffn at most {MAX_WIDTH}, layers at most {MAX_LAYERS} in {self:?}"));
        }
        Ok(())
    }

    /// Parameters in all.
    pub fn params(&self) -> usize {
        let attention = 2 * self.dim * self.dim + 2 * self.kv_dim() * self.dim;
        let feed_forward = 3 * self.dim * self.ffn;
        2 * VOCAB * self.dim + self.layers * (attention + feed_forward + 2 * self.dim) + self.dim
    }

    /// As metadata: string keys and values.
    pub fn to_metadata(&self) -> Vec<(&'static str, usize)> {
        let values = [self.dim, self.layers, self.heads, self.kv_heads, self.ffn, self.max_context];
        KEYS.into_iter().zip(values).collect()
    }

    /// From metadata read by `value`.
    pub fn from_metadata(value: impl Fn(&str) -> Option<usize>) -> Result<Self, EngineError> {
        let get = |key: &str| {
            value(key).ok_or_else(|| EngineError::CorruptGraph { message: format!("metadata `{key}` missing") })
        };
        let shape = Self {
            dim: get("dim")?,
            layers: get("layers")?,
            heads: get("heads")?,
            kv_heads: get("kv_heads")?,
            ffn: get("ffn")?,
            max_context: get("max_context")?,
        };
        shape.check()?;
        Ok(shape)
    }

    /// The expected shape (rows, columns; or one dimension) of every tensor, by name.
    pub fn tensors(&self) -> HashMap<String, Vec<usize>> {
        let mut tensors = HashMap::new();
        tensors.insert("tok_embeddings.weight".to_owned(), vec![VOCAB, self.dim]);
        tensors.insert("norm.weight".to_owned(), vec![self.dim]);
        tensors.insert("output.weight".to_owned(), vec![VOCAB, self.dim]);
        for layer in 0..self.layers {
            let name = |part: &str| format!("layers.{layer}.{part}.weight");
            tensors.insert(name("attention_norm"), vec![self.dim]);
            tensors.insert(name("attention.wq"), vec![self.dim, self.dim]);
            tensors.insert(name("attention.wk"), vec![self.kv_dim(), self.dim]);
            tensors.insert(name("attention.wv"), vec![self.kv_dim(), self.dim]);
            tensors.insert(name("attention.wo"), vec![self.dim, self.dim]);
            tensors.insert(name("ffn_norm"), vec![self.dim]);
            tensors.insert(name("feed_forward.w1"), vec![self.ffn, self.dim]);
            tensors.insert(name("feed_forward.w2"), vec![self.dim, self.ffn]);
            tensors.insert(name("feed_forward.w3"), vec![self.ffn, self.dim]);
        }
        tensors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_counts_its_parameters_and_names_its_tensors() {
        let shape = Shape { dim: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 160, max_context: 128 };
        shape.check().unwrap();
        let counted: usize = shape.tensors().values().map(|dims| dims.iter().product::<usize>()).sum();
        assert_eq!(counted, shape.params());
        assert!(Shape { dim: 60, ..shape }.check().is_err(), "not a multiple of 32");
        assert!(Shape { kv_heads: 3, ..shape }.check().is_err());
    }
}
