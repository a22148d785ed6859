//! Profiles: a model's shape (which gives its memory plan) and its timeline (which gives the simulated
//! compute time), and the quantizations that change both.

use std::time::Duration;

use usine_engine::MemoryPlan;

/// The shape of a decoder-only transformer: enough to derive its memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Parameters in all.
    pub params: u64,
    /// Transformer layers.
    pub layers: u64,
    /// Hidden size.
    pub hidden: u64,
    /// Key-value heads (fewer than the query heads with grouped-query attention).
    pub kv_heads: u64,
    /// Size of one head.
    pub head_dim: u64,
    /// Vocabulary of the real model the shape is taken from.
    pub vocab: u64,
    /// Longest sequence.
    pub max_context: u32,
}

/// The toy shape of the `tiny` profiles: 10M parameters, for demos and fast tests.
pub const TINY: Shape =
    Shape { params: 10_000_000, layers: 4, hidden: 256, kv_heads: 4, head_dim: 64, vocab: 4096, max_context: 2048 };

/// Bytes of one kv-cache element: f16.
const KV_ELEMENT_BYTES: u64 = 2;
/// Bytes of one activation element: f32.
const ACTIVATION_BYTES: u64 = 4;

impl Shape {
    /// The memory plan of this shape under `quantization`:
    /// - weights: parameters × bits per weight / 8;
    /// - kv-cache per token: 2 (keys and values) × layers × kv heads × head size × 2 bytes (f16);
    /// - activations per step: (4 × hidden, the MLP's widest layer, + vocabulary, the logits) × 4 bytes.
    pub fn memory_plan(&self, quantization: &Quantization) -> MemoryPlan {
        MemoryPlan {
            weights_bytes: self.params * u64::from(quantization.bits_per_weight_x10) / 80,
            kv_bytes_per_token: 2 * self.layers * self.kv_heads * self.head_dim * KV_ELEMENT_BYTES,
            activation_bytes_per_step: (4 * self.hidden + self.vocab) * ACTIVATION_BYTES,
            max_context_tokens: self.max_context,
        }
    }
}

/// A quantization: fewer bits are smaller and faster, more bits slower and more exact (the seeds weigh
/// Q4 against Q5 this way).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantization {
    /// Its name in model specs.
    pub name: &'static str,
    /// Bits per weight, in tenths, scales included (4.5 bits for Q4: 45).
    pub bits_per_weight_x10: u32,
    /// How much slower a step is than with the engine's first quantization.
    pub step_factor: f64,
}

/// Q4 with block scales: 4.5 bits a weight, the reference speed.
pub const Q4: Quantization = Quantization { name: "q4", bits_per_weight_x10: 45, step_factor: 1.0 };
/// Q5 with block scales: 5.5 bits a weight, more exact, about 15 % slower a step (memory-bound decode
/// reads 22 % more bytes, partly hidden).
pub const Q5: Quantization = Quantization { name: "q5", bits_per_weight_x10: 55, step_factor: 1.15 };

/// How long each part of a model's life takes, nominally (before jitter).
///
/// tokio's timer counts whole milliseconds, so the durations of single waits are whole milliseconds;
/// a sum of smaller costs (prefill per token) is rounded up by the timer, and the overshoot is taken off
/// the next wait of the same stream (see [`Pacer`](crate::Pacer)), so long runs keep the pace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    /// The compile, in named stages.
    pub compile: Vec<(&'static str, Duration)>,
    /// Loading a compiled graph.
    pub load: Duration,
    /// Prefill, per prompt token.
    pub prefill_per_token: Duration,
    /// The prepare stage of one step (CPU).
    pub prepare: Duration,
    /// The compute stage of one step (device), with the first quantization.
    pub compute: Duration,
    /// Paid by the first generation after a load, unless the model was warmed up.
    pub first_use: Duration,
    /// How a batched step of several sequences costs.
    pub batch: Batching,
}

/// A batched step: one step's compute plus `per_sequence` for each sequence after the first, at most
/// `max` sequences. Decode reads every weight once a step whoever it is for, so a GPU's steps are
/// nearly flat in the batch (on an H100 an 8B-shaped step took 6.06 ms for one sequence, 6.30 ms for
/// 64); a CPU's grow faster, its arithmetic being nearer its memory's speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most sequences a step advances; 1 for a model that does not batch.
    pub max: usize,
    /// What each sequence after the first adds to a step (with the first quantization).
    pub per_sequence: Duration,
}

impl Timeline {
    /// The whole compile.
    pub fn compile_total(&self) -> Duration {
        self.compile.iter().map(|(_, duration)| *duration).sum()
    }
}

/// A named profile: a shape, a timeline, and the size of its compiled graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Its name in model specs.
    pub name: &'static str,
    /// Where its figures come from.
    pub source: &'static str,
    /// The model's shape.
    pub shape: Shape,
    /// Its timeline.
    pub timeline: Timeline,
    /// Bytes of its compiled graph.
    pub graph_bytes: usize,
}
