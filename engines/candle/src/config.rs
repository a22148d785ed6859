//! A model file read: its hyper-parameters from GGUF metadata, and its tensors checked against them.
//!
//! Two architectures run: `llama` (grouped-query attention; rotary embeddings on pairs of adjacent
//! values, as llama.cpp's converter lays out the query and key rows; Llama 3's frequency factors as
//! the `rope_freqs` tensor; linear rope scaling; tied or separate output) and `qwen2` (the same, with
//! biases on the query, key and value projections, and rotary embeddings on the two halves of a head).
//! Every key under the architecture's name is either read or refused: a key that changes the maths
//! and is not read would run the model wrong without a word.

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{self, Value};

use crate::kernel::Raw;
use crate::tokenizer::Vocabulary;

/// Longest context a model may declare.
pub(crate) const MAX_CONTEXT: usize = 1 << 20;
/// Widest layer a model may declare.
pub(crate) const MAX_WIDTH: usize = 1 << 16;
/// Most layers a model may declare.
pub(crate) const MAX_LAYERS: usize = 1024;
/// Largest vocabulary a model may declare.
pub(crate) const MAX_VOCAB: usize = 1 << 20;

/// The tensor types usine runs, as GGUF names them.
pub(crate) const TENSOR_TYPES: [GgmlDType; 8] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// A tensor type's name as llama.cpp's files and tools write it (`q8_0`, `q4_k`).
pub(crate) fn type_name(dtype: GgmlDType) -> String {
    let name = format!("{dtype:?}").to_lowercase();
    match name.strip_suffix('k') {
        Some(base) if base.starts_with('q') => format!("{base}_k"),
        _ => name,
    }
}

/// The architectures usine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama, TinyLlama, Mistral (without sliding windows), SmolLM.
    Llama,
    /// Qwen2 and Qwen2.5.
    Qwen2,
}

impl Architecture {
    /// Its name in `general.architecture`, and the prefix of its keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [Self::Llama, Self::Qwen2].into_iter().find(|architecture| architecture.name() == name)
    }
}

/// Which values of a head the rotary embedding turns together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rope {
    /// Values 2i and 2i+1 (llama.cpp's "normal" rope, for `llama`).
    Adjacent,
    /// Values i and i + half (GPT-NeoX's, for `qwen2`).
    Halves,
}

/// A model's hyper-parameters, every one read from its file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The architecture.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub dim: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key-value heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    /// The context the model was trained for.
    pub context: usize,
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// RMSNorm's epsilon.
    pub rms_epsilon: f32,
    /// The rotary embedding's base frequency.
    pub rope_theta: f32,
    /// Positions are multiplied by this before the rotary embedding (linear rope scaling: one over its
    /// factor; 1 without scaling).
    pub rope_position_scale: f32,
    /// The output projection is the token embeddings (no `output.weight`).
    pub tied_output: bool,
    /// The tokens that start and end a sequence, where the file names them.
    pub bos: Option<u32>,
    /// The token that ends a sequence, where the file names it.
    pub eos: Option<u32>,
}

impl Config {
    /// Width of the keys (and values) of one token in one layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    pub(crate) fn rope(&self) -> Rope {
        match self.architecture {
            Architecture::Llama => Rope::Adjacent,
            Architecture::Qwen2 => Rope::Halves,
        }
    }

    /// Whether the query, key and value projections have biases.
    pub(crate) fn qkv_bias(&self) -> bool {
        self.architecture == Architecture::Qwen2
    }

    /// The widest product but the logits: the stacked query, key and value projections, or the
    /// stacked gate and up.
    pub(crate) fn product_width(&self) -> usize {
        (self.dim + 2 * self.kv_dim()).max(2 * self.ffn)
    }

    /// The widest vector the threads of a pass exchange: a stacked product's output, or the logits.
    pub(crate) fn exchange_width(&self) -> usize {
        self.product_width().max(self.vocab)
    }

    /// The exchange buffers of a pass over `tokens` tokens: every token's products, or the logits of
    /// the last.
    pub(crate) fn chunk_exchange_width(&self, tokens: usize) -> usize {
        (tokens * self.product_width()).max(self.vocab)
    }

    /// The exchange buffers of a batched pass of `sequences` one-token sequences whose logits come
    /// `group` at a time: every token's products, or a group's logits.
    pub(crate) fn batch_exchange_width(&self, sequences: usize, group: usize) -> usize {
        (sequences * self.product_width()).max(sequences.min(group) * self.vocab)
    }

    /// Parameters in all (an output tied to the embeddings counted once).
    pub fn params(&self) -> usize {
        let attention = 2 * self.dim * self.heads * self.head_dim + 2 * self.kv_dim() * self.dim;
        let bias = if self.qkv_bias() { self.heads * self.head_dim + 2 * self.kv_dim() } else { 0 };
        let outputs = if self.tied_output { 1 } else { 2 };
        outputs * self.vocab * self.dim
            + self.layers * (attention + bias + 3 * self.dim * self.ffn + 2 * self.dim)
            + self.dim
    }

    /// The expected dimensions (rows, columns; or one) of every tensor, by its GGUF name.
    pub(crate) fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let q_dim = self.heads * self.head_dim;
        let mut tensors = vec![
            ("token_embd.weight".to_owned(), vec![self.vocab, self.dim]),
            ("output_norm.weight".to_owned(), vec![self.dim]),
        ];
        if !self.tied_output {
            tensors.push(("output.weight".to_owned(), vec![self.vocab, self.dim]));
        }
        for layer in 0..self.layers {
            let name = |part: &str| format!("blk.{layer}.{part}");
            tensors.extend([
                (name("attn_norm.weight"), vec![self.dim]),
                (name("attn_q.weight"), vec![q_dim, self.dim]),
                (name("attn_k.weight"), vec![self.kv_dim(), self.dim]),
                (name("attn_v.weight"), vec![self.kv_dim(), self.dim]),
                (name("attn_output.weight"), vec![self.dim, q_dim]),
                (name("ffn_norm.weight"), vec![self.dim]),
                (name("ffn_gate.weight"), vec![self.ffn, self.dim]),
                (name("ffn_up.weight"), vec![self.ffn, self.dim]),
                (name("ffn_down.weight"), vec![self.dim, self.ffn]),
            ]);
            if self.qkv_bias() {
                tensors.extend([
                    (name("attn_q.bias"), vec![q_dim]),
                    (name("attn_k.bias"), vec![self.kv_dim()]),
                    (name("attn_v.bias"), vec![self.kv_dim()]),
                ]);
            }
        }
        tensors
    }
}

/// A model file read: its configuration, and its tensors (borrowed from the file's bytes), each
/// checked against the configuration.
pub(crate) struct ModelFile<'a> {
    pub(crate) config: Config,
    tensors: HashMap<String, Raw<'a>>,
    /// `rope_freqs.weight`: Llama 3's frequency factors, one per pair of a head.
    pub(crate) rope_factors: Option<Vec<f32>>,
    /// Tensor types and their counts, for people (`q8_0 × 14, f32 × 5`).
    pub(crate) types: Vec<(GgmlDType, usize)>,
    /// The tokenizer's vocabulary.
    pub(crate) vocabulary: Vocabulary,
}

/// Why a file cannot be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused(pub(crate) String);

fn refused<T>(message: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(message.into()))
}

/// The keys of an architecture that usine reads (after `ARCH.`); any other key under `ARCH.` is refused.
const READ_KEYS: [&str; 16] = [
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    // Informational for linear scaling (the context before it); read by other scalings, refused above.
    "rope.scaling.original_context_length",
    "vocab_size",
    "expert_count",
];

impl<'a> ModelFile<'a> {
    /// Reads GGUF `bytes`. candle's header reader panics on some damaged headers (a zero alignment),
    /// so a panic is a refusal too; and it allocates what the header's lengths say, so they are walked
    /// first and held to the file's size (a hostile length would abort the process, not panic).
    pub(crate) fn read(bytes: &'a [u8]) -> Result<Self, Refused> {
        check_lengths(bytes)?;
        let read = std::panic::catch_unwind(|| gguf_file::Content::read(&mut Cursor::new(bytes)));
        let content = match read {
            Ok(Ok(content)) => content,
            Ok(Err(error)) => return refused(format!("not a GGUF file usine reads: {}", first_line(&error))),
            Err(_) => return refused("an unreadable GGUF header"),
        };
        let (mut config, rope_factors_expected) = read_config(&content)?;
        let vocabulary = Vocabulary::from_gguf(&content.metadata, config.vocab)
            .map_err(|reason| Refused(format!("its tokenizer: {reason}")))?;
        // The start and end tokens are the tokenizer's (with llama.cpp's defaults where the file names
        // none): the model starts an empty prompt with the same token a prompt starts with.
        (config.bos, config.eos) = (vocabulary.bos, vocabulary.eos);
        let mut expected = config.tensors();
        if rope_factors_expected {
            expected.push(("rope_freqs.weight".to_owned(), vec![config.head_dim / 2]));
        }
        let data_start = usize::try_from(content.tensor_data_offset).unwrap_or(usize::MAX);
        let mut tensors = HashMap::with_capacity(expected.len());
        let mut types: Vec<(GgmlDType, usize)> = Vec::new();
        for (name, dims) in &expected {
            let info =
                content.tensor_infos.get(name).map_or_else(|| refused(format!("tensor `{name}` is missing")), Ok)?;
            if info.shape.dims() != dims.as_slice() {
                return refused(format!("tensor `{name}` is {:?}, the metadata asks for {dims:?}", info.shape.dims()));
            }
            if !TENSOR_TYPES.contains(&info.ggml_dtype) {
                return refused(format!(
                    "tensor `{name}` is {}: usine runs {}",
                    type_name(info.ggml_dtype),
                    TENSOR_TYPES.map(type_name).join(", ")
                ));
            }
            // Vectors (norms, biases, factors) are read as f32 values: they must be F32.
            if dims.len() == 1 && info.ggml_dtype != GgmlDType::F32 {
                return refused(format!(
                    "tensor `{name}` is {}; usine reads vectors as f32",
                    type_name(info.ggml_dtype)
                ));
            }
            let elements: usize = dims.iter().product();
            let block = info.ggml_dtype.block_size();
            if !elements.is_multiple_of(block) || !dims.last().is_some_and(|cols| cols.is_multiple_of(block)) {
                return refused(format!("tensor `{name}`: rows of {dims:?} are not whole {block}-value blocks"));
            }
            let size = elements / block * info.ggml_dtype.type_size();
            let start = usize::try_from(info.offset).ok().and_then(|offset| data_start.checked_add(offset));
            let data = start.and_then(|start| bytes.get(start..start.checked_add(size)?));
            let Some(data) = data else {
                return refused(format!("tensor `{name}`'s {size} bytes lie outside the file"));
            };
            let (rows, cols) = match dims.as_slice() {
                [rows, cols] => (*rows, *cols),
                [cols] => (1, *cols),
                _ => unreachable!("the configuration names vectors and matrices only"),
            };
            tensors.insert(name.clone(), Raw { dtype: info.ggml_dtype, rows, cols, data });
            match types.iter_mut().find(|(dtype, _)| *dtype == info.ggml_dtype) {
                Some((_, count)) => *count += 1,
                None => types.push((info.ggml_dtype, 1)),
            }
        }
        if let Some(extra) = content.tensor_infos.keys().find(|name| !expected.iter().any(|(known, _)| known == *name))
        {
            return refused(format!("tensor `{extra}` is not one usine knows how to use"));
        }
        let mut file = Self { config, tensors, rope_factors: None, types, vocabulary };
        if rope_factors_expected {
            file.rope_factors = Some(file.vector("rope_freqs.weight")?);
        }
        Ok(file)
    }

    /// The tensor `name`, whose dimensions were checked.
    pub(crate) fn tensor(&self, name: &str) -> Result<Raw<'a>, Refused> {
        self.tensors.get(name).copied().map_or_else(|| refused(format!("tensor `{name}` is missing")), Ok)
    }

    /// The F32 vector `name`.
    pub(crate) fn vector(&self, name: &str) -> Result<Vec<f32>, Refused> {
        let raw = self.tensor(name)?;
        Ok(raw.data.chunks_exact(4).map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])).collect())
    }
}

/// Walks a GGUF header, checking that every length and count it holds fits in the bytes left: what
/// candle's reader allocates from them is then at most the file's size.
fn check_lengths(bytes: &[u8]) -> Result<(), Refused> {
    struct Cursor<'b> {
        bytes: &'b [u8],
        at: usize,
        wide: bool,
    }
    impl Cursor<'_> {
        fn take(&mut self, count: usize) -> Result<&[u8], Refused> {
            let end = self.at.checked_add(count).filter(|end| *end <= self.bytes.len());
            let end = end.map_or_else(
                || refused("not a GGUF file usine reads: a header that runs past the end of the file"),
                Ok,
            )?;
            let taken = &self.bytes[self.at..end];
            self.at = end;
            Ok(taken)
        }
        fn u32(&mut self) -> Result<u32, Refused> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
        }
        /// A length or count (u32 in GGUF version 1, u64 after), at most the bytes left over `each`.
        fn length(&mut self, each: usize) -> Result<usize, Refused> {
            let value = if self.wide {
                u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"))
            } else {
                u64::from(self.u32()?)
            };
            let left = (self.bytes.len() - self.at) / each.max(1);
            match usize::try_from(value) {
                Ok(value) if value <= left => Ok(value),
                _ => refused(format!(
                    "not a GGUF file usine reads: a header length of {value}, past the end of the file"
                )),
            }
        }
        fn string(&mut self) -> Result<(), Refused> {
            let len = self.length(1)?;
            self.take(len).map(|_| ())
        }
        fn value(&mut self, kind: u32, depth: usize) -> Result<(), Refused> {
            let size = match kind {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                10..=12 => 8,
                8 => return self.string(),
                9 if depth < 4 => {
                    let element = self.u32()?;
                    // Every element takes at least a byte, so the count is held to the bytes left.
                    let count = self.length(1)?;
                    for _ in 0..count {
                        self.value(element, depth + 1)?;
                    }
                    return Ok(());
                }
                _ => {
                    return refused(format!(
                        "not a GGUF file usine reads: a value of type {kind}, or arrays nested too deep"
                    ));
                }
            };
            self.take(size).map(|_| ())
        }
    }
    let mut cursor = Cursor { bytes, at: 0, wide: true };
    if cursor.take(4)? != b"GGUF" {
        return refused("not a GGUF file usine reads: no GGUF magic");
    }
    cursor.wide = cursor.u32()? >= 2;
    // A tensor's entry takes at least 20 bytes, a key-value pair at least 9 (in version 1's u32 lengths).
    let tensors = cursor.length(20)?;
    let pairs = cursor.length(9)?;
    for _ in 0..pairs {
        cursor.string()?;
        let kind = cursor.u32()?;
        cursor.value(kind, 0)?;
    }
    for _ in 0..tensors {
        cursor.string()?;
        let dims = cursor.u32()?;
        if dims > 4 {
            return refused(format!("not a GGUF file usine reads: a tensor of {dims} dimensions (4 at most)"));
        }
        cursor.take(dims as usize * if cursor.wide { 8 } else { 4 } + 4 + 8)?;
    }
    Ok(())
}

/// The first line of a candle error: with `RUST_BACKTRACE` set, the rest is a backtrace of candle's
/// reader, which says nothing to a person about their file.
pub(crate) fn first_line(error: &candle_core::Error) -> String {
    error.to_string().lines().next().unwrap_or_default().to_owned()
}

/// An integer value, whatever its width in the file.
fn integer(value: &Value) -> Option<u64> {
    match value {
        Value::U8(value) => Some(u64::from(*value)),
        Value::U16(value) => Some(u64::from(*value)),
        Value::U32(value) => Some(u64::from(*value)),
        Value::U64(value) => Some(*value),
        Value::I8(value) => u64::try_from(*value).ok(),
        Value::I16(value) => u64::try_from(*value).ok(),
        Value::I32(value) => u64::try_from(*value).ok(),
        Value::I64(value) => u64::try_from(*value).ok(),
        _ => None,
    }
}

fn float(value: &Value) -> Option<f32> {
    match value {
        Value::F32(value) => Some(*value),
        #[expect(clippy::cast_possible_truncation, reason = "hyper-parameters in f32, as llama.cpp reads them")]
        Value::F64(value) => Some(*value as f32),
        _ => None,
    }
}

/// The configuration in `content`'s metadata, and whether the file carries rope frequency factors.
fn read_config(content: &gguf_file::Content) -> Result<(Config, bool), Refused> {
    let metadata = &content.metadata;
    let architecture = match metadata.get("general.architecture") {
        Some(Value::String(name)) => Architecture::from_name(name)
            .map_or_else(|| refused(format!("architecture `{name}` is not one usine runs (llama, qwen2)")), Ok)?,
        Some(_) => return refused("`general.architecture` is not a string"),
        None => return refused("`general.architecture` is missing"),
    };
    let prefix = format!("{}.", architecture.name());
    let mut unread: Vec<&String> = metadata
        .keys()
        .filter(|key| key.strip_prefix(&prefix).is_some_and(|rest| !READ_KEYS.contains(&rest)))
        .collect();
    unread.sort();
    if let Some(key) = unread.first() {
        return refused(format!("key `{key}` is not read by usine and may change the model's maths"));
    }
    let key = |name: &str| format!("{prefix}{name}");
    let count = |name: &str, limit: usize| -> Result<Option<usize>, Refused> {
        match metadata.get(&key(name)) {
            None => Ok(None),
            Some(value) => match integer(value).and_then(|value| usize::try_from(value).ok()) {
                Some(value) if (1..=limit).contains(&value) => Ok(Some(value)),
                _ => refused(format!("key `{}` is {value:?}, outside 1..={limit}", key(name))),
            },
        }
    };
    let required = |name: &str, limit: usize| {
        count(name, limit)?.map_or_else(|| refused(format!("key `{}` is missing", key(name))), Ok)
    };
    let real = |name: &str| -> Result<Option<f32>, Refused> {
        match metadata.get(&key(name)) {
            None => Ok(None),
            Some(value) => match float(value) {
                Some(value) if value.is_finite() && value > 0.0 => Ok(Some(value)),
                _ => refused(format!("key `{}` is {value:?}, not a positive number", key(name))),
            },
        }
    };
    let dim = required("embedding_length", MAX_WIDTH)?;
    let layers = required("block_count", MAX_LAYERS)?;
    let heads = required("attention.head_count", dim)?;
    let kv_heads = count("attention.head_count_kv", heads)?.unwrap_or(heads);
    let ffn = required("feed_forward_length", MAX_WIDTH)?;
    let context = required("context_length", MAX_CONTEXT)?;
    if !dim.is_multiple_of(heads) || !heads.is_multiple_of(kv_heads) {
        return refused(format!("{heads} heads and {kv_heads} key-value heads do not divide a width of {dim}"));
    }
    let head_dim = dim / heads;
    for name in ["attention.key_length", "attention.value_length", "rope.dimension_count"] {
        if let Some(value) = count(name, MAX_WIDTH)?
            && value != head_dim
        {
            return refused(format!(
                "key `{}` is {value}; usine runs heads of the width over the heads ({head_dim})",
                key(name)
            ));
        }
    }
    if !head_dim.is_multiple_of(2) {
        return refused(format!("heads of {head_dim} values: the rotary embedding turns pairs"));
    }
    if let Some(experts) = metadata.get(&key("expert_count")).and_then(integer)
        && experts > 0
    {
        return refused(format!("key `{}` is {experts}: usine runs no mixture of experts", key("expert_count")));
    }
    let rms_epsilon = real("attention.layer_norm_rms_epsilon")?
        .map_or_else(|| refused(format!("key `{}` is missing", key("attention.layer_norm_rms_epsilon"))), Ok)?;
    let rope_theta = real("rope.freq_base")?.unwrap_or(10_000.0);
    let scaling = match metadata.get(&key("rope.scaling.type")) {
        None => "none".to_owned(),
        Some(Value::String(kind)) => kind.clone(),
        Some(other) => return refused(format!("key `{}` is {other:?}, not a string", key("rope.scaling.type"))),
    };
    let factor = real("rope.scaling.factor")?;
    let rope_position_scale = match (scaling.as_str(), factor) {
        ("none", _) | ("linear", None) => 1.0,
        ("linear", Some(factor)) => 1.0 / factor,
        (other, _) => return refused(format!("rope scaling `{other}` is not one usine runs (none, linear)")),
    };
    let embeddings = content
        .tensor_infos
        .get("token_embd.weight")
        .map_or_else(|| refused("tensor `token_embd.weight` is missing"), Ok)?;
    let vocab = match embeddings.shape.dims() {
        [vocab, width] if *width == dim && (1..=MAX_VOCAB).contains(vocab) => *vocab,
        other => {
            return refused(format!("tensor `token_embd.weight` is {other:?}; a vocabulary of width {dim} expected"));
        }
    };
    if let Some(declared) = count("vocab_size", MAX_VOCAB)?
        && declared != vocab
    {
        return refused(format!("key `{}` is {declared}, the embeddings hold {vocab} tokens", key("vocab_size")));
    }
    let token = |name: &str| match metadata.get(name).and_then(integer) {
        Some(id) if id < vocab as u64 => u32::try_from(id).ok(),
        _ => None,
    };
    let config = Config {
        architecture,
        dim,
        layers,
        heads,
        kv_heads,
        head_dim,
        ffn,
        context,
        vocab,
        rms_epsilon,
        rope_theta,
        rope_position_scale,
        tied_output: !content.tensor_infos.contains_key("output.weight"),
        bos: token("tokenizer.ggml.bos_token_id"),
        eos: token("tokenizer.ggml.eos_token_id"),
    };
    Ok((config, content.tensor_infos.contains_key("rope_freqs.weight")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use candle_core::quantized::QTensor;

    use super::*;
    use crate::generate::{presets, random_gguf};

    /// The tiny llama file, its metadata and tensors changed by `edit`, written again.
    fn edited(edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>)) -> Vec<u8> {
        let bytes = random_gguf(&presets()[0], 1, "q8_0", 3).unwrap();
        let content = gguf_file::Content::read(&mut Cursor::new(&bytes)).unwrap();
        let mut values: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        let mut tensors: Vec<(String, QTensor)> = names
            .into_iter()
            .map(|name| {
                (name.clone(), content.tensor(&mut Cursor::new(&bytes), name, &candle_core::Device::Cpu).unwrap())
            })
            .collect();
        edit(&mut values, &mut tensors);
        crate::gguf::write(&values, &tensors).unwrap()
    }

    fn refusal(bytes: &[u8]) -> String {
        ModelFile::read(bytes).err().expect("refused").0
    }

    // Would catch: a file read although it holds what usine would run wrong or not at all.
    #[test]
    fn a_file_usine_cannot_run_is_refused_with_what_is_missing_or_unsupported() {
        let set = |key: &'static str, value: Value| {
            move |values: &mut Vec<(String, Value)>, _: &mut Vec<(String, QTensor)>| {
                values.retain(|(known, _)| known != key);
                values.push((key.to_owned(), value));
            }
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                edited(set("general.architecture", Value::String("gemma".into()))),
                "architecture `gemma` is not one usine runs (llama, qwen2)",
            ),
            (
                edited(set("llama.attention.sliding_window", Value::U32(4096))),
                "key `llama.attention.sliding_window` is not read by usine and may change the model's maths",
            ),
            (
                edited(set("llama.rope.scaling.type", Value::String("yarn".into()))),
                "rope scaling `yarn` is not one usine runs (none, linear)",
            ),
            (
                edited(set("llama.expert_count", Value::U32(8))),
                "key `llama.expert_count` is 8: usine runs no mixture of experts",
            ),
            (
                edited(set("llama.rope.dimension_count", Value::U32(32))),
                "key `llama.rope.dimension_count` is 32; usine runs heads of the width over the heads (64)",
            ),
            (edited(set("llama.block_count", Value::U32(2))), "tensor `blk.1.attn_norm.weight` is missing"),
            (
                edited(|values, _| values.retain(|(key, _)| key != "llama.attention.layer_norm_rms_epsilon")),
                "key `llama.attention.layer_norm_rms_epsilon` is missing",
            ),
            (
                edited(|_, tensors| {
                    let dense = tensors[0].1.dequantize(&candle_core::Device::Cpu).unwrap();
                    let q5 = QTensor::quantize(&dense, GgmlDType::Q5_0).unwrap();
                    let name = tensors[0].0.clone();
                    tensors[0] = (name, q5);
                }),
                "tensor `blk.0.attn_k.weight` is q5_0: usine runs f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k",
            ),
            (
                edited(|_, tensors| {
                    let extra = tensors
                        .iter()
                        .find(|(name, _)| name == "output_norm.weight")
                        .unwrap()
                        .1
                        .dequantize(&candle_core::Device::Cpu)
                        .unwrap();
                    tensors
                        .push(("blk.0.attn_q_norm.weight".into(), QTensor::quantize(&extra, GgmlDType::F32).unwrap()));
                }),
                "tensor `blk.0.attn_q_norm.weight` is not one usine knows how to use",
            ),
            (b"GGUF\x03\x00\x00\x00".to_vec(), "not a GGUF file usine reads: "),
        ];
        for (bytes, expected) in cases {
            let refused = refusal(&bytes);
            assert!(refused.starts_with(expected), "{refused:?}, expected {expected:?}");
        }
        // The unedited file reads, and says what it holds.
        let bytes = edited(|_, _| {});
        let file = ModelFile::read(&bytes).unwrap();
        assert_eq!(file.config, Config { layers: 1, ..presets()[0].config.clone() });
        assert_eq!(file.rope_factors.as_ref().map(Vec::len), Some(32));
    }

    // Would catch: a header length that makes the reader allocate what the file claims (a hostile file
    // of a few bytes would abort the process on a terabyte allocation).
    #[test]
    fn a_header_length_past_the_file_is_refused_before_anything_is_allocated() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3_u32.to_le_bytes());
        bytes.extend_from_slice(&0_u64.to_le_bytes()); // tensors
        bytes.extend_from_slice(&1_u64.to_le_bytes()); // one key-value pair
        bytes.extend_from_slice(&(1_u64 << 40).to_le_bytes()); // its key: a terabyte long
        bytes.extend_from_slice(b"general.architecture");
        assert!(refusal(&bytes).contains("past the end of the file"), "{}", refusal(&bytes));
        let mut array = b"GGUF".to_vec();
        array.extend_from_slice(&3_u32.to_le_bytes());
        array.extend_from_slice(&0_u64.to_le_bytes());
        array.extend_from_slice(&1_u64.to_le_bytes());
        array.extend_from_slice(&3_u64.to_le_bytes());
        array.extend_from_slice(b"key");
        array.extend_from_slice(&9_u32.to_le_bytes()); // an array
        array.extend_from_slice(&4_u32.to_le_bytes()); // of u32
        array.extend_from_slice(&u64::MAX.to_le_bytes()); // of every count
        assert!(refusal(&array).contains("past the end of the file"), "{}", refusal(&array));
        // A real file passes the walk, every length in it.
        check_lengths(&random_gguf(&presets()[1], 1, "q4_k_m", 3).unwrap()).unwrap();
    }

    // Would catch: a file whose tensor lies past its end read out of bounds, or a panic on it.
    #[test]
    fn a_truncated_file_is_refused() {
        let bytes = random_gguf(&presets()[1], 1, "q4_0", 3).unwrap();
        for cut in [bytes.len() - 1, bytes.len() / 2, 100, 10] {
            let refused = refusal(&bytes[..cut]);
            assert!(refused.contains("outside the file") || refused.contains("GGUF"), "{cut}: {refused}");
        }
    }
}
