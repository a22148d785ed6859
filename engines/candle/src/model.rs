//! The forward pass of a llama-shaped decoder, one token at a time: RMSNorm, rotary embeddings,
//! grouped-query attention over a kv-cache allocated once, SwiGLU.
//!
//! The weights come from candle's GGUF tensors; the matrix products are the kernels of `kernel.rs`,
//! and the steps between them are plain loops over f32 slices. (They were candle tensor operations at
//! first: some 700 small ones per token at 58 M parameters, each allocating, which took a third of the
//! time of a token. The training forward in `train.rs` stays on candle's tensors, and a test holds the
//! two to the same logits.)

use std::sync::Mutex;

use candle_core::Device;
use candle_core::quantized::QTensor;
use usine_engine::EngineError;

use crate::gguf::{Graph, fatal};
use crate::kernel::{Isa, QMatrix, share_arena};
use crate::shape::{END_OF_SEQUENCE, Shape, VOCAB};
use crate::team::{Abandoned, Rank, Team, Tuner};

const RMS_EPSILON: f32 = 1e-5;
const ROPE_THETA: f64 = 10_000.0;

struct Layer {
    attention_norm: Vec<f32>,
    /// The query, key and value projections stacked: one product gives all three.
    wqkv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    /// The gate (w1) and up (w3) projections stacked.
    w13: QMatrix,
    w2: QMatrix,
}

/// A loaded model: its weights (matrices quantized, repacked for the kernels) and its rotary tables.
pub(crate) struct Model {
    pub(crate) shape: Shape,
    /// One row of `dim` values per token (dequantized: rows are looked up, not multiplied).
    embeddings: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: QMatrix,
    /// cos and sin of every position and frequency: `max_context` rows of `head_dim / 2`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// How many of the team's threads its passes use, timed on its own passes.
    tuner: Mutex<Tuner>,
}

/// Keys and values of one sequence, allocated once for `capacity` tokens: per layer and key-value
/// head, `capacity` rows of `head_dim` (each head behind its own lock: a head belongs to one thread of
/// the team during a pass).
pub(crate) struct KvCache {
    heads: Vec<Mutex<Head>>,
    capacity: usize,
}

struct Head {
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvCache {
    /// A cache of `capacity` tokens (zeros), allocated now.
    pub(crate) fn new(shape: &Shape, capacity: usize) -> Result<Self, EngineError> {
        let size = capacity
            .checked_mul(shape.head_dim())
            .ok_or_else(|| EngineError::Fatal { message: format!("a kv-cache of {capacity} tokens") })?;
        let heads = (0..shape.layers * shape.kv_heads)
            .map(|_| Mutex::new(Head { keys: vec![0.0; size], values: vec![0.0; size] }))
            .collect();
        Ok(Self { heads, capacity })
    }

    /// Bytes held by the cache.
    pub(crate) fn bytes(&self) -> usize {
        self.heads
            .iter()
            .map(|head| {
                let head = head.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                (head.keys.len() + head.values.len()) * size_of::<f32>()
            })
            .sum()
    }
}

fn dense(tensor: &QTensor) -> Result<Vec<f32>, EngineError> {
    let tensor = tensor.dequantize(&Device::Cpu).map_err(fatal("weights"))?;
    tensor.flatten_all().and_then(|flat| flat.to_vec1::<f32>()).map_err(fatal("weights"))
}

impl Model {
    pub(crate) fn new(graph: Graph, tuner: Mutex<Tuner>) -> Result<Self, EngineError> {
        let Graph { shape, mut tensors } = graph;
        let mut take = |name: &str| {
            tensors.remove(name).ok_or_else(|| EngineError::CorruptGraph { message: format!("`{name}` missing") })
        };
        let isa = Isa::detect();
        let matrix = |parts: &[&QTensor]| QMatrix::from_qtensors(parts, isa).map_err(fatal("weights"));
        let embeddings = dense(&take("tok_embeddings.weight")?)?;
        let norm = dense(&take("norm.weight")?)?;
        let mut output = matrix(&[&take("output.weight")?])?;
        let mut layers = Vec::with_capacity(shape.layers);
        for layer in 0..shape.layers {
            let mut part = |name: &str| take(&format!("layers.{layer}.{name}.weight"));
            layers.push(Layer {
                attention_norm: dense(&part("attention_norm")?)?,
                wqkv: matrix(&[&part("attention.wq")?, &part("attention.wk")?, &part("attention.wv")?])?,
                wo: matrix(&[&part("attention.wo")?])?,
                ffn_norm: dense(&part("ffn_norm")?)?,
                w13: matrix(&[&part("feed_forward.w1")?, &part("feed_forward.w3")?])?,
                w2: matrix(&[&part("feed_forward.w2")?])?,
            });
        }
        let mut matrices: Vec<&mut QMatrix> = layers
            .iter_mut()
            .flat_map(|layer| [&mut layer.wqkv, &mut layer.wo, &mut layer.w13, &mut layer.w2])
            .chain([&mut output])
            .collect();
        share_arena(&mut matrices)
            .map_err(|error| EngineError::Fatal { message: format!("mapping memory for the weights: {error}") })?;
        let half = shape.head_dim() / 2;
        let (mut cos, mut sin) =
            (Vec::with_capacity(shape.max_context * half), Vec::with_capacity(shape.max_context * half));
        for position in 0..shape.max_context {
            for i in 0..half {
                #[expect(clippy::cast_precision_loss, reason = "positions and frequencies of a small model")]
                let angle = position as f64 / ROPE_THETA.powf(2.0 * i as f64 / (2 * half) as f64);
                #[expect(clippy::cast_possible_truncation, reason = "tables in f32")]
                let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                cos.push(c);
                sin.push(s);
            }
        }
        Ok(Self { shape, embeddings, layers, norm, output, cos, sin, tuner })
    }

    /// Runs `token` at `position` on the team's threads, writing its keys and values into `cache`, and
    /// returns the logits of the next token. Writing a position again overwrites it (a retried step is
    /// harmless).
    pub(crate) fn forward(
        &self,
        team: &Team,
        token: Option<u32>,
        position: usize,
        cache: &KvCache,
    ) -> Result<Vec<f32>, EngineError> {
        if position >= cache.capacity || position >= self.shape.max_context {
            return Err(EngineError::Fatal {
                message: format!("position {position} is beyond the kv-cache of {} tokens", cache.capacity),
            });
        }
        let token = token.unwrap_or(END_OF_SEQUENCE) as usize;
        if token >= VOCAB {
            return Err(EngineError::Fatal { message: format!("token {token} is not in the vocabulary of {VOCAB}") });
        }
        team.run(self.shape.exchange_width(), &self.tuner, |rank| self.pass(rank, token, position, cache))
    }

    /// One thread's part of a pass.
    fn pass(&self, rank: &Rank<'_>, token: usize, position: usize, cache: &KvCache) -> Result<Vec<f32>, Abandoned> {
        let shape = &self.shape;
        let (dim, head_dim, kv_dim, ffn) = (shape.dim, shape.head_dim(), shape.kv_dim(), shape.ffn);
        let group = shape.heads / shape.kv_heads;
        let half = head_dim / 2;
        let (cos, sin) = (&self.cos[position * half..][..half], &self.sin[position * half..][..half]);
        #[expect(clippy::cast_precision_loss, reason = "a small head width")]
        let scale = 1.0 / (head_dim as f32).sqrt();
        // This thread's key-value heads, and with them their groups of query heads.
        let kv_heads = rank.share(shape.kv_heads);
        let mut x = self.embeddings[token * dim..][..dim].to_vec();
        let mut h = vec![0.0; dim];
        let mut scores = vec![0.0; position + 1];
        let mut attention = vec![0.0; kv_heads.len() * group * head_dim];
        for (index, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attention_norm, &mut h);
            let mut qkv = rank.matvec(&layer.wqkv, &h)?;
            let (queries, rest) = qkv.split_at_mut(dim);
            let (keys, values) = rest.split_at_mut(kv_dim);
            for (slot, kv_head) in kv_heads.clone().enumerate() {
                let mut head = cache.heads[index * shape.kv_heads + kv_head]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let key = &mut keys[kv_head * head_dim..][..head_dim];
                rope(key, cos, sin);
                head.keys[position * head_dim..][..head_dim].copy_from_slice(key);
                head.values[position * head_dim..][..head_dim]
                    .copy_from_slice(&values[kv_head * head_dim..][..head_dim]);
                let known = position + 1;
                for query_head in 0..group {
                    let query = &mut queries[(kv_head * group + query_head) * head_dim..][..head_dim];
                    rope(query, cos, sin);
                    for (score, key) in scores.iter_mut().zip(head.keys[..known * head_dim].chunks_exact(head_dim)) {
                        *score = dot(query, key) * scale;
                    }
                    softmax(&mut scores);
                    let out = &mut attention[(slot * group + query_head) * head_dim..][..head_dim];
                    out.fill(0.0);
                    for (weight, value) in scores.iter().zip(head.values[..known * head_dim].chunks_exact(head_dim)) {
                        for (out, value) in out.iter_mut().zip(value) {
                            *out += weight * value;
                        }
                    }
                }
            }
            let attention = rank.gather(&attention, kv_heads.start * group * head_dim, dim)?;
            add(&mut x, &rank.matvec(&layer.wo, &attention)?);
            rms_norm(&x, &layer.ffn_norm, &mut h);
            let gate_up = rank.matvec(&layer.w13, &h)?;
            let (gate, up) = gate_up.split_at(ffn);
            let product: Vec<f32> = gate.iter().zip(up).map(|(gate, up)| gate / (1.0 + (-gate).exp()) * up).collect();
            add(&mut x, &rank.matvec(&layer.w2, &product)?);
        }
        rms_norm(&x, &self.norm, &mut h);
        rank.matvec(&self.output, &h)
    }
}

/// The dot product, in 8 lanes (a single running sum would be one long chain the compiler may not
/// reorder; lanes are what it vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0_f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += a[lane] * b[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

fn rms_norm(x: &[f32], weight: &[f32], out: &mut [f32]) {
    #[expect(clippy::cast_precision_loss, reason = "a small width")]
    let mean_square = x.iter().map(|x| x * x).sum::<f32>() / x.len() as f32;
    let inverse = 1.0 / (mean_square + RMS_EPSILON).sqrt();
    for ((out, x), weight) in out.iter_mut().zip(x).zip(weight) {
        *out = x * inverse * weight;
    }
}

/// Rotates each pair (2i, 2i+1) of a head by the position's angles.
fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((pair, cos), sin) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (even, odd) = (pair[0], pair[1]);
        pair[0] = even * cos - odd * sin;
        pair[1] = even * sin + odd * cos;
    }
}

fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in x.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in x.iter_mut() {
        *x /= sum;
    }
}
