//! The forward pass of a llama-shaped decoder on candle tensors: RMSNorm, rotary embeddings,
//! grouped-query attention over a kv-cache allocated once, SwiGLU, one token at a time.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module as _, Tensor};
use usine_engine::EngineError;

use crate::gguf::{Graph, fatal};
use crate::shape::{END_OF_SEQUENCE, Shape};

const RMS_EPSILON: f64 = 1e-5;
const ROPE_THETA: f64 = 10_000.0;

struct Layer {
    attention_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w1: QMatMul,
    w2: QMatMul,
    w3: QMatMul,
}

/// A loaded model: its weights (quantized matrices stay quantized) and its rotary tables.
pub(crate) struct Model {
    pub(crate) shape: Shape,
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    /// cos and sin of every position and frequency: [max_context, head_dim / 2].
    cos: Tensor,
    sin: Tensor,
}

/// Keys and values of one sequence, every layer, allocated once for `capacity` tokens.
pub(crate) struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    capacity: usize,
}

impl KvCache {
    /// A cache of `capacity` tokens (zeros), allocated now.
    pub(crate) fn new(shape: &Shape, capacity: usize) -> Result<Self, EngineError> {
        let zeros = || {
            Tensor::zeros((shape.kv_heads, capacity, shape.head_dim()), DType::F32, &Device::Cpu)
                .map_err(fatal("kv-cache"))
        };
        let keys = (0..shape.layers).map(|_| zeros()).collect::<Result<_, _>>()?;
        let values = (0..shape.layers).map(|_| zeros()).collect::<Result<_, _>>()?;
        Ok(Self { keys, values, capacity })
    }

    /// Bytes held by the cache's tensors.
    pub(crate) fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|tensor| tensor.elem_count() * DType::F32.size_in_bytes()).sum()
    }
}

fn matmul(tensor: QTensor) -> Result<QMatMul, EngineError> {
    QMatMul::from_qtensor(tensor).map_err(fatal("weights"))
}

impl Model {
    pub(crate) fn new(graph: Graph) -> Result<Self, EngineError> {
        let Graph { shape, mut tensors } = graph;
        let mut take = |name: &str| {
            tensors.remove(name).ok_or_else(|| EngineError::CorruptGraph { message: format!("`{name}` missing") })
        };
        let dense = |tensor: QTensor| tensor.dequantize(&Device::Cpu).map_err(fatal("weights"));
        let embeddings = dense(take("tok_embeddings.weight")?)?;
        let norm = dense(take("norm.weight")?)?;
        let output = matmul(take("output.weight")?)?;
        let mut layers = Vec::with_capacity(shape.layers);
        for layer in 0..shape.layers {
            let mut part = |name: &str| take(&format!("layers.{layer}.{name}.weight"));
            layers.push(Layer {
                attention_norm: dense(part("attention_norm")?)?,
                wq: matmul(part("attention.wq")?)?,
                wk: matmul(part("attention.wk")?)?,
                wv: matmul(part("attention.wv")?)?,
                wo: matmul(part("attention.wo")?)?,
                ffn_norm: dense(part("ffn_norm")?)?,
                w1: matmul(part("feed_forward.w1")?)?,
                w2: matmul(part("feed_forward.w2")?)?,
                w3: matmul(part("feed_forward.w3")?)?,
            });
        }
        let half = shape.head_dim() / 2;
        #[expect(clippy::cast_precision_loss, reason = "positions and frequencies of a small model")]
        let angles: Vec<f32> = (0..shape.max_context)
            .flat_map(|position| {
                (0..half).map(move |i| {
                    let frequency = 1.0 / ROPE_THETA.powf(2.0 * i as f64 / (2 * half) as f64);
                    #[expect(clippy::cast_possible_truncation, reason = "an angle in f32")]
                    let angle = (position as f64 * frequency) as f32;
                    angle
                })
            })
            .collect();
        let angles = Tensor::from_vec(angles, (shape.max_context, half), &Device::Cpu).map_err(fatal("rope"))?;
        let (cos, sin) = (angles.cos().map_err(fatal("rope"))?, angles.sin().map_err(fatal("rope"))?);
        Ok(Self { shape, embeddings, layers, norm, output, cos, sin })
    }

    /// Runs `token` at `position`, writing its keys and values into `cache`, and returns the logits of
    /// the next token. Writing a position again overwrites it (a retried step is harmless).
    pub(crate) fn forward(
        &self,
        token: Option<u32>,
        position: usize,
        cache: &KvCache,
    ) -> Result<Vec<f32>, EngineError> {
        self.step(token, position, cache).map_err(fatal("forward"))
    }

    fn step(&self, token: Option<u32>, position: usize, cache: &KvCache) -> candle_core::Result<Vec<f32>> {
        if position >= cache.capacity {
            candle_core::bail!("position {position} is beyond the kv-cache of {} tokens", cache.capacity);
        }
        let shape = &self.shape;
        let (heads, kv_heads, head_dim) = (shape.heads, shape.kv_heads, shape.head_dim());
        let token = usize::try_from(token.unwrap_or(END_OF_SEQUENCE)).unwrap_or(usize::MAX);
        let mut x = self.embeddings.narrow(0, token, 1)?; // [1, dim]
        let cos = self.cos.narrow(0, position, 1)?;
        let sin = self.sin.narrow(0, position, 1)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        for (layer, weights) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &weights.attention_norm)?;
            let q = rope(&weights.wq.forward(&h)?.reshape((heads, head_dim))?, &cos, &sin)?;
            let k = rope(&weights.wk.forward(&h)?.reshape((kv_heads, head_dim))?, &cos, &sin)?;
            let v = weights.wv.forward(&h)?.reshape((kv_heads, 1, head_dim))?;
            cache.keys[layer].slice_set(&k.reshape((kv_heads, 1, head_dim))?, 1, position)?;
            cache.values[layer].slice_set(&v, 1, position)?;
            let keys = cache.keys[layer].narrow(1, 0, position + 1)?; // [kv_heads, t, head_dim]
            let values = cache.values[layer].narrow(1, 0, position + 1)?;
            // Grouped-query attention: the query heads of a group share their key-value head.
            let q = q.reshape((kv_heads, heads / kv_heads, head_dim))?;
            let scores = (q.matmul(&keys.t()?.contiguous()?)? * scale)?; // [kv_heads, group, t]
            let attention = softmax_last(&scores)?.matmul(&values.contiguous()?)?; // [kv_heads, group, head_dim]
            x = (x + weights.wo.forward(&attention.reshape((1, shape.dim))?)?)?;
            let h = rms_norm(&x, &weights.ffn_norm)?;
            let gate = weights.w1.forward(&h)?.silu()?;
            let up = weights.w3.forward(&h)?;
            x = (x + weights.w2.forward(&(gate * up)?)?)?;
        }
        let logits = self.output.forward(&rms_norm(&x, &self.norm)?)?;
        logits.squeeze(0)?.to_vec1::<f32>()
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + RMS_EPSILON)?.sqrt()?)?.broadcast_mul(weight)
}

/// Rotates each pair (2i, 2i+1) of every head of `x` ([n, head_dim]) by the position's angles.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (n, head_dim) = x.dims2()?;
    let pairs = x.reshape((n, head_dim / 2, 2))?;
    let (even, odd) = (pairs.narrow(2, 0, 1)?.squeeze(2)?, pairs.narrow(2, 1, 1)?.squeeze(2)?);
    let rotated_even = (even.broadcast_mul(cos)? - odd.broadcast_mul(sin)?)?;
    let rotated_odd = (even.broadcast_mul(sin)? + odd.broadcast_mul(cos)?)?;
    Tensor::stack(&[rotated_even, rotated_odd], 2)?.reshape((n, head_dim))
}

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}
