//! The forward pass of a `llama` or `qwen2` decoder (`config.rs`), one token at a time: RMSNorm,
//! rotary embeddings, grouped-query attention over a kv-cache allocated once, SwiGLU.
//!
//! The weights come from the GGUF file's tensors; the matrix products are those of `matrix.rs`,
//! and the steps between them are plain loops over f32 slices. (They were candle tensor operations at
//! first: some 700 small ones per token at 58 M parameters, each allocating, which took a third of the
//! time of a token. The training forward in `train.rs` stays on candle's tensors, and a test holds the
//! two to the same logits.)

use std::sync::Mutex;

use usine_engine::EngineError;

use crate::config::{Config, ModelFile, Refused, Rope};
use crate::graph::{Reader, Writer};
use crate::kernel::{Isa, share_arena};
use crate::matrix::Matrix;
use crate::team::{Abandoned, Rank, Team, Tuner};

pub(crate) struct Layer {
    pub(crate) attention_norm: Vec<f32>,
    /// The query, key and value projections stacked: one product gives all three.
    pub(crate) wqkv: Matrix,
    /// Their biases, stacked alike (`qwen2`).
    pub(crate) qkv_bias: Option<Vec<f32>>,
    pub(crate) wo: Matrix,
    pub(crate) ffn_norm: Vec<f32>,
    /// The gate and up projections stacked.
    pub(crate) w13: Matrix,
    pub(crate) w2: Matrix,
}

/// A loaded model: its weights (matrices repacked for the kernels, or dense) and its rotary tables.
pub(crate) struct Model {
    pub(crate) config: Config,
    /// The token embeddings, looked up a row at a time; none where the output projection is tied to
    /// them (it is then the one matrix).
    pub(crate) embeddings: Option<Matrix>,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) output: Matrix,
    /// Llama 3's frequency factors of the rotary embedding, one per pair of a head.
    pub(crate) rope_factors: Option<Vec<f32>>,
    /// How many of the team's threads its passes use, timed on its own passes.
    tuner: Mutex<Tuner>,
    /// The same for its prefill passes, which are far longer.
    prefill_tuner: Mutex<Tuner>,
    /// The same for its batched passes.
    batch_tuner: Mutex<Tuner>,
}

/// Most tokens of a prompt run in one pass: their products read each weight once (a tile of rows at a
/// time, see `Rank::matmul`) instead of once a token.
pub(crate) const PREFILL_CHUNK: usize = 64;

/// Sequences whose logits one product of a batched pass computes: the exchange buffers hold a group's
/// logits, not the whole batch's (at 64 sequences of a 151,936-token vocabulary those would be 39 MB a
/// buffer), and the output projection is read once a group.
pub(crate) const LOGITS_GROUP: usize = 16;

/// One sequence's part of a pass: its tokens (vocabulary indices, checked) at positions `start..`, and
/// the cache their keys and values go to.
struct Segment<'a> {
    tokens: &'a [usize],
    start: usize,
    cache: &'a KvCache,
}

/// Keys and values of one sequence: per layer and key-value head, a row of `head_dim` a position (each
/// head behind its own lock: a head belongs to one thread of the team during a pass). Either its own
/// storage, allocated once for `capacity` tokens, position `p` in row `p`; or a view of its model's
/// [`Arena`] through its block table, position `p` in row `ids[p / block] × block + p % block`.
pub(crate) struct KvCache {
    heads: std::sync::Arc<[Mutex<Head>]>,
    /// The block size and the block table of a view of an arena.
    pages: Option<(usize, Vec<u32>)>,
    capacity: usize,
}

struct Head {
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl Head {
    /// Makes room for rows `..rows` (an arena grows as higher block ids come into use).
    fn reserve(&mut self, rows: usize, head_dim: usize) {
        if self.keys.len() < rows * head_dim {
            self.keys.resize(rows * head_dim, 0.0);
            self.values.resize(rows * head_dim, 0.0);
        }
    }
}

impl KvCache {
    /// A cache of `capacity` tokens (zeros), allocated now.
    pub(crate) fn new(config: &Config, capacity: usize) -> Result<Self, EngineError> {
        let size = capacity
            .checked_mul(config.head_dim)
            .ok_or_else(|| EngineError::Fatal { message: format!("a kv-cache of {capacity} tokens") })?;
        let heads = (0..config.layers * config.kv_heads)
            .map(|_| Mutex::new(Head { keys: vec![0.0; size], values: vec![0.0; size] }))
            .collect();
        Ok(Self { heads, pages: None, capacity })
    }

    /// Bytes held by the cache (an arena's view: the arena's).
    pub(crate) fn bytes(&self) -> usize {
        self.heads
            .iter()
            .map(|head| {
                let head = head.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                (head.keys.len() + head.values.len()) * size_of::<f32>()
            })
            .sum()
    }

    /// The row of `position`.
    fn row(&self, position: usize) -> usize {
        match &self.pages {
            None => position,
            Some((block, ids)) => ids[position / block] as usize * block + position % block,
        }
    }

    /// The rows of positions `..known`, in order, as runs of consecutive rows.
    fn runs(&self, known: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let (block, ids) = match &self.pages {
            None => (known.max(1), &[][..]),
            Some((block, ids)) => (*block, &ids[..]),
        };
        (0..known.div_ceil(block)).map(move |index| {
            let first = ids.get(index).map_or(0, |&id| id as usize * block);
            let length = block.min(known - index * block);
            first..first + length
        })
    }

    /// The lock of `layer`'s key-value head `kv_head`, with room for the rows of positions `..end`.
    fn head(&self, config: &Config, layer: usize, kv_head: usize, end: usize) -> std::sync::MutexGuard<'_, Head> {
        let mut head =
            self.heads[layer * config.kv_heads + kv_head].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((block, ids)) = &self.pages {
            let rows = ids[..end.div_ceil(*block)].iter().map(|&id| (id as usize + 1) * block).max().unwrap_or(0);
            head.reserve(rows, config.head_dim);
        }
        head
    }
}

/// A model's kv storage for its paged sequences: rows of blocks of `block` tokens, block `i` in rows
/// `i × block..`, each head growing as higher block ids come into use (the executor hands out the
/// lowest free ids first, so it stays as large as the most blocks in use at once).
pub(crate) struct Arena {
    heads: std::sync::Arc<[Mutex<Head>]>,
    block: usize,
}

impl Arena {
    /// An empty arena of blocks of `block` tokens.
    pub(crate) fn new(config: &Config, block: usize) -> Self {
        let heads =
            (0..config.layers * config.kv_heads).map(|_| Mutex::new(Head { keys: Vec::new(), values: Vec::new() }));
        Self { heads: heads.collect(), block }
    }

    /// The cache of a sequence whose block table is `ids`.
    pub(crate) fn view(&self, ids: &[u32]) -> KvCache {
        KvCache {
            heads: std::sync::Arc::clone(&self.heads),
            pages: Some((self.block, ids.to_vec())),
            capacity: ids.len() * self.block,
        }
    }
}

/// The memory plan of a model of `config` whose weights take `weight_bytes`, its context capped at
/// `context`, run by `threads` threads:
/// - weights: its matrices as `Matrix` holds them (repacked, or dense f32) and its vectors (f32), as
///   the compiled graph's raw section holds them;
/// - kv-cache per token: keys and values of every layer, f32;
/// - activations per step, for each thread (each has its own copy of a pass's vectors), for each of the
///   [`PREFILL_CHUNK`] tokens a prompt's pass runs: the residual and its norm, the queries, keys and
///   values, the attention's output (its share, then whole), the feed-forward's gate and up and their
///   product, three product outputs, its share of a product, and the vector quantized for a product
///   (quants, scales and lane sums: about two bytes and an eighth per value, at most the feed-forward's
///   width); once per thread, the attention's scores (a full context; the attention reads the kv-cache
///   in place) and the logits of a batched pass's group of [`LOGITS_GROUP`] sequences, gathered and
///   its share; and once, the two exchange buffers, a chunk's vectors or a group's logits wide.
///
/// So one step's activations cover a batched step of up to [`PREFILL_CHUNK`] sequences too.
pub(crate) fn plan_of(
    config: &Config,
    weight_bytes: u64,
    context: Option<usize>,
    threads: usize,
) -> usine_engine::MemoryPlan {
    let context = context.map_or(config.context, |cap| cap.min(config.context));
    let f32_bytes = 4;
    let (dim, ffn) = (config.dim, config.ffn);
    let quantized_vector = (ffn.max(dim) * 17 / 8).div_ceil(f32_bytes);
    let per_token = 7 * dim + 2 * config.kv_dim() + 3 * ffn + config.product_width() + quantized_vector;
    let per_thread = PREFILL_CHUNK * per_token + context + 2 * LOGITS_GROUP * config.vocab;
    let exchange =
        config.chunk_exchange_width(PREFILL_CHUNK).max(config.batch_exchange_width(PREFILL_CHUNK, LOGITS_GROUP));
    let activations = threads * per_thread + 2 * exchange;
    usine_engine::MemoryPlan {
        weights_bytes: weight_bytes,
        kv_bytes_per_token: (2 * config.layers * config.kv_dim() * f32_bytes) as u64,
        activation_bytes_per_step: (activations * f32_bytes) as u64,
        max_context_tokens: u32::try_from(context).expect("checked: at most 2^20"),
    }
}

impl Model {
    /// Bytes its weights hold: what [`plan`] announces.
    #[cfg(test)]
    pub(crate) fn weight_bytes(&self) -> u64 {
        let matrices = self
            .layers
            .iter()
            .flat_map(|layer| [&layer.wqkv, &layer.wo, &layer.w13, &layer.w2])
            .chain([&self.output])
            .chain(self.embeddings.as_ref())
            .map(Matrix::bytes)
            .sum::<u64>();
        let vectors = self.norm.len()
            + self
                .layers
                .iter()
                .map(|layer| {
                    layer.attention_norm.len() + layer.ffn_norm.len() + layer.qkv_bias.as_ref().map_or(0, Vec::len)
                })
                .sum::<usize>()
            + self.rope_factors.as_ref().map_or(0, Vec::len);
        matrices + (vectors * 4) as u64
    }

    /// The model in `file`, for at most `context` positions (the file's context, or less).
    pub(crate) fn new(file: &ModelFile<'_>, context: usize, tuner: Mutex<Tuner>) -> Result<Self, Refused> {
        let config = Config { context: context.min(file.config.context), ..file.config.clone() };
        let isa = Isa::detect();
        let matrix = |names: &[String]| {
            let parts = names.iter().map(|name| file.tensor(name)).collect::<Result<Vec<_>, _>>()?;
            Matrix::from_raw(&parts, isa)
        };
        let one = |name: &str| matrix(&[name.to_owned()]);
        let mut embeddings = Some(one("token_embd.weight")?);
        let mut output = if config.tied_output { embeddings.take().expect("just made") } else { one("output.weight")? };
        let norm = file.vector("output_norm.weight")?;
        let mut layers = Vec::with_capacity(config.layers);
        for layer in 0..config.layers {
            let name = |part: &str| format!("blk.{layer}.{part}");
            let qkv_bias = if config.qkv_bias() {
                let parts = ["attn_q.bias", "attn_k.bias", "attn_v.bias"].map(|part| file.vector(&name(part)));
                Some(parts.into_iter().collect::<Result<Vec<_>, _>>()?.concat())
            } else {
                None
            };
            layers.push(Layer {
                attention_norm: file.vector(&name("attn_norm.weight"))?,
                wqkv: matrix(&[name("attn_q.weight"), name("attn_k.weight"), name("attn_v.weight")])?,
                qkv_bias,
                wo: matrix(&[name("attn_output.weight")])?,
                ffn_norm: file.vector(&name("ffn_norm.weight"))?,
                w13: matrix(&[name("ffn_gate.weight"), name("ffn_up.weight")])?,
                w2: matrix(&[name("ffn_down.weight")])?,
            });
        }
        let mut matrices: Vec<&mut crate::kernel::QMatrix> = layers
            .iter_mut()
            .flat_map(|layer| [&mut layer.wqkv, &mut layer.wo, &mut layer.w13, &mut layer.w2])
            .chain([&mut output])
            .chain(embeddings.as_mut())
            .flat_map(Matrix::quantized)
            .collect();
        share_arena(&mut matrices).map_err(|error| Refused(format!("mapping memory for the weights: {error}")))?;
        let rope_factors = file.rope_factors.clone();
        let team_size = tuner.lock().map_or(1, |tuner| tuner.team_size());
        let (prefill_tuner, batch_tuner) = (Mutex::new(Tuner::patient(team_size)), Mutex::new(Tuner::new(team_size)));
        Ok(Self { config, embeddings, layers, norm, output, rope_factors, tuner, prefill_tuner, batch_tuner })
    }

    /// The compiled graph of the model: its table and its raw section (see `graph.rs`).
    /// The graph of this model (its table and raw section), with `vocabulary` (the tokenizer's bytes).
    pub(crate) fn write(&self, vocabulary: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut writer = Writer::new(&self.config);
        writer.bytes("vocabulary", vocabulary);
        if let Some(embeddings) = &self.embeddings {
            writer.matrix("embeddings", embeddings);
        }
        writer.matrix("output", &self.output);
        writer.vector("norm", &self.norm);
        if let Some(factors) = &self.rope_factors {
            writer.vector("rope_factors", factors);
        }
        for (index, layer) in self.layers.iter().enumerate() {
            let name = |part: &str| format!("{index}.{part}");
            writer.vector(&name("attention_norm"), &layer.attention_norm);
            writer.matrix(&name("wqkv"), &layer.wqkv);
            if let Some(bias) = &layer.qkv_bias {
                writer.vector(&name("qkv_bias"), bias);
            }
            writer.matrix(&name("wo"), &layer.wo);
            writer.vector(&name("ffn_norm"), &layer.ffn_norm);
            writer.matrix(&name("w13"), &layer.w13);
            writer.matrix(&name("w2"), &layer.w2);
        }
        writer.finish()
    }

    /// The model of a compiled graph, its weights where `graph`'s raw section holds them, for at most
    /// `context` positions.
    pub(crate) fn from_graph(graph: &Reader, context: usize, tuner: Mutex<Tuner>) -> Result<Self, String> {
        let config = Config { context: context.min(graph.config.context), ..graph.config.clone() };
        let isa = Isa::detect();
        let (dim, q_dim, kv_dim) = (config.dim, config.heads * config.head_dim, config.kv_dim());
        let embeddings =
            if config.tied_output { None } else { Some(graph.matrix("embeddings", (config.vocab, dim), isa)?) };
        let output = graph.matrix("output", (config.vocab, dim), isa)?;
        let norm = graph.vector("norm", dim)?;
        let rope_factors =
            if graph.has("rope_factors") { Some(graph.vector("rope_factors", config.head_dim / 2)?) } else { None };
        let mut layers = Vec::with_capacity(config.layers);
        for index in 0..config.layers {
            let name = |part: &str| format!("{index}.{part}");
            let qkv_bias =
                if config.qkv_bias() { Some(graph.vector(&name("qkv_bias"), q_dim + 2 * kv_dim)?) } else { None };
            layers.push(Layer {
                attention_norm: graph.vector(&name("attention_norm"), dim)?,
                wqkv: graph.matrix(&name("wqkv"), (q_dim + 2 * kv_dim, dim), isa)?,
                qkv_bias,
                wo: graph.matrix(&name("wo"), (dim, q_dim), isa)?,
                ffn_norm: graph.vector(&name("ffn_norm"), dim)?,
                w13: graph.matrix(&name("w13"), (2 * config.ffn, dim), isa)?,
                w2: graph.matrix(&name("w2"), (dim, config.ffn), isa)?,
            });
        }
        let team_size = tuner.lock().map_or(1, |tuner| tuner.team_size());
        let (prefill_tuner, batch_tuner) = (Mutex::new(Tuner::patient(team_size)), Mutex::new(Tuner::new(team_size)));
        Ok(Self { config, embeddings, layers, norm, output, rope_factors, tuner, prefill_tuner, batch_tuner })
    }

    /// The token that starts an empty sequence: the file's start token, else its end token, else 0.
    pub(crate) fn start_token(&self) -> u32 {
        self.config.bos.or(self.config.eos).unwrap_or(0)
    }

    /// Runs `token` (None: [`Self::start_token`]) at `position` on the team's threads, writing its keys
    /// and values into `cache`, and returns the logits of the next token. Writing a position again
    /// overwrites it (a retried step is harmless).
    pub(crate) fn forward(
        &self,
        team: &Team,
        token: Option<u32>,
        position: usize,
        cache: &KvCache,
    ) -> Result<Vec<f32>, EngineError> {
        if position >= cache.capacity || position >= self.config.context {
            return Err(EngineError::Fatal {
                message: format!("position {position} is beyond the kv-cache of {} tokens", cache.capacity),
            });
        }
        let token = token.unwrap_or_else(|| self.start_token()) as usize;
        if token >= self.config.vocab {
            return Err(EngineError::InvalidParams {
                name: "token",
                value: token.to_string(),
                limit: format!("the vocabulary's 0..{}", self.config.vocab),
            });
        }
        team.run(self.config.exchange_width(), &self.tuner, |rank| self.pass(rank, token, position, cache))
    }

    /// Runs `tokens` at positions `start..` in passes of up to [`PREFILL_CHUNK`] tokens, writing their
    /// keys and values into `cache`, and returns the logits after the last (the same, to the bit, as
    /// [`forward`](Self::forward) token by token). `stop` is asked between passes.
    pub(crate) fn prefill(
        &self,
        team: &Team,
        tokens: &[u32],
        start: usize,
        cache: &KvCache,
        stop: &dyn Fn() -> bool,
    ) -> Result<Vec<f32>, EngineError> {
        let end = start + tokens.len();
        if tokens.is_empty() || end > cache.capacity || end > self.config.context {
            return Err(EngineError::Fatal {
                message: format!("positions {start}..{end} in a kv-cache of {} tokens", cache.capacity),
            });
        }
        let tokens = self.checked_tokens(tokens)?;
        let mut logits = Vec::new();
        for (index, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            if stop() {
                return Err(EngineError::Cancelled);
            }
            let segment = Segment { tokens: chunk, start: start + index * PREFILL_CHUNK, cache };
            let width = self.config.chunk_exchange_width(chunk.len());
            logits = team.run_tokens(width, (&self.prefill_tuner, chunk.len()), |rank| {
                let last = self.pass_segments(rank, std::slice::from_ref(&segment))?;
                rank.matvec(&self.output, &last[0])
            })?;
        }
        Ok(logits)
    }

    /// Runs one token of each sequence of `batch` (a token, `None` for [`Self::start_token`], its
    /// position and its sequence's cache) in one pass whose products read each weight once for all, and
    /// returns `choose` applied to each one's logits (in `batch`'s order): the logits are those
    /// [`forward`](Self::forward) gives each alone, to the bit. At most [`PREFILL_CHUNK`] sequences.
    #[cfg(test)]
    pub(crate) fn forward_batch<T: Send>(
        &self,
        team: &Team,
        batch: &[(Option<u32>, usize, &KvCache)],
        choose: impl Fn(usize, &[f32]) -> T + Sync,
    ) -> Result<Vec<T>, EngineError> {
        self.forward_pass(team, &[], batch, choose)
    }

    /// [`forward_batch`](Self::forward_batch) with chunks of other sequences' contexts in the same pass
    /// (`fills`: tokens, the position of the first, and the sequence's cache), whose keys and values
    /// it writes as [`prefill`](Self::prefill) would, to the bit, and whose logits nobody needs. At
    /// most [`PREFILL_CHUNK`] tokens in all, at least one.
    pub(crate) fn forward_pass<T: Send>(
        &self,
        team: &Team,
        fills: &[(&[u32], usize, &KvCache)],
        batch: &[(Option<u32>, usize, &KvCache)],
        choose: impl Fn(usize, &[f32]) -> T + Sync,
    ) -> Result<Vec<T>, EngineError> {
        let total = batch.len() + fills.iter().map(|(tokens, ..)| tokens.len()).sum::<usize>();
        if total == 0 || total > PREFILL_CHUNK || fills.iter().any(|(tokens, ..)| tokens.is_empty()) {
            return Err(EngineError::Fatal {
                message: format!("a pass of {total} tokens (1 to {PREFILL_CHUNK}, each fill at least one)"),
            });
        }
        let mut filled = Vec::with_capacity(fills.len());
        for &(tokens, start, cache) in fills {
            let end = start + tokens.len();
            if end > cache.capacity || end > self.config.context {
                return Err(EngineError::Fatal {
                    message: format!("positions {start}..{end} in a kv-cache of {} tokens", cache.capacity),
                });
            }
            filled.push(self.checked_tokens(tokens)?);
        }
        let mut tokens = Vec::with_capacity(batch.len());
        for &(token, position, cache) in batch {
            if position >= cache.capacity || position >= self.config.context {
                return Err(EngineError::Fatal {
                    message: format!("position {position} is beyond the kv-cache of {} tokens", cache.capacity),
                });
            }
            tokens.push(token.unwrap_or_else(|| self.start_token()));
        }
        let tokens = self.checked_tokens(&tokens)?;
        let segments: Vec<Segment<'_>> = fills
            .iter()
            .zip(&filled)
            .map(|(&(_, start, cache), tokens)| Segment { tokens, start, cache })
            .chain(batch.iter().zip(&tokens).map(|(&(_, start, cache), token)| Segment {
                tokens: std::slice::from_ref(token),
                start,
                cache,
            }))
            .collect();
        let width = self.config.batch_exchange_width(total, LOGITS_GROUP);
        // Passes with prompts' chunks are timed apart from steps alone, each per token.
        let tuner = if fills.is_empty() { &self.batch_tuner } else { &self.prefill_tuner };
        team.run_tokens(width, (tuner, total), |rank| {
            let last = self.pass_segments(rank, &segments)?;
            // The logits a group of sequences at a time, so that the widest exchange holds a group's, not
            // the whole batch's; only the first thread keeps what `choose` makes of them.
            let mut chosen = Vec::with_capacity(if rank.is_first() { batch.len() } else { 0 });
            for (group, hs) in last[fills.len()..].chunks(LOGITS_GROUP).enumerate() {
                let logits = rank.matmul(&self.output, hs)?;
                if rank.is_first() {
                    chosen.extend(
                        logits.iter().enumerate().map(|(index, logits)| choose(group * LOGITS_GROUP + index, logits)),
                    );
                }
            }
            Ok(chosen)
        })
    }

    /// `tokens` as indices, each checked against the vocabulary.
    fn checked_tokens(&self, tokens: &[u32]) -> Result<Vec<usize>, EngineError> {
        tokens
            .iter()
            .map(|&token| {
                let index = token as usize;
                if index < self.config.vocab {
                    Ok(index)
                } else {
                    Err(EngineError::InvalidParams {
                        name: "token",
                        value: token.to_string(),
                        limit: format!("the vocabulary's 0..{}", self.config.vocab),
                    })
                }
            })
            .collect()
    }

    /// One thread's part of a pass over several segments of tokens (see [`prefill`](Self::prefill) and
    /// [`forward_batch`](Self::forward_batch)): every product a matrix product over all their tokens,
    /// the attention token by token in order, each against its own segment's cache. Returns the last
    /// token's final normalized state of each segment (what the output projection takes).
    fn pass_segments(&self, rank: &Rank<'_>, segments: &[Segment<'_>]) -> Result<Vec<Vec<f32>>, Abandoned> {
        let config = &self.config;
        let (head_dim, kv_dim, ffn) = (config.head_dim, config.kv_dim(), config.ffn);
        let q_dim = config.heads * head_dim;
        let group = config.heads / config.kv_heads;
        let positions: Vec<usize> =
            segments.iter().flat_map(|segment| segment.start..segment.start + segment.tokens.len()).collect();
        let angles: Vec<_> =
            positions.iter().map(|&position| rotary_angles(config, self.rope_factors.as_deref(), position)).collect();
        let rope = config.rope();
        #[expect(clippy::cast_precision_loss, reason = "a small head width")]
        let scale = 1.0 / (head_dim as f32).sqrt();
        let kv_heads = rank.share(config.kv_heads);
        let embeddings = self.embeddings.as_ref().unwrap_or(&self.output);
        let mut xs: Vec<Vec<f32>> =
            segments.iter().flat_map(|segment| segment.tokens).map(|token| embeddings.row(*token)).collect();
        let mut hs = vec![vec![0.0; config.dim]; xs.len()];
        let mut scores = vec![0.0; positions.iter().max().map_or(0, |last| last + 1)];
        for (index, layer) in self.layers.iter().enumerate() {
            for (x, h) in xs.iter().zip(&mut hs) {
                rms_norm(x, &layer.attention_norm, config.rms_epsilon, h);
            }
            let mut qkvs = rank.matmul(&layer.wqkv, &hs)?;
            if let Some(bias) = &layer.qkv_bias {
                qkvs.iter_mut().for_each(|qkv| add(qkv, bias));
            }
            let mut attention = vec![vec![0.0; kv_heads.len() * group * head_dim]; xs.len()];
            for (slot, kv_head) in kv_heads.clone().enumerate() {
                let mut first = 0;
                for segment in segments {
                    let rows = first..first + segment.tokens.len();
                    first = rows.end;
                    let cache = segment.cache;
                    let mut head = cache.head(config, index, kv_head, segment.start + segment.tokens.len());
                    let (qkvs, angles) = (&mut qkvs[rows.clone()], &angles[rows.clone()]);
                    // Every token's key and value first: each token then attends to those before it.
                    for (t, qkv) in qkvs.iter_mut().enumerate() {
                        let (cos, sin) = &angles[t];
                        let position = segment.start + t;
                        let (keys, values) = qkv[q_dim..].split_at_mut(kv_dim);
                        let key = &mut keys[kv_head * head_dim..][..head_dim];
                        rotate(rope, key, cos, sin);
                        let row = cache.row(position);
                        head.keys[row * head_dim..][..head_dim].copy_from_slice(key);
                        head.values[row * head_dim..][..head_dim]
                            .copy_from_slice(&values[kv_head * head_dim..][..head_dim]);
                    }
                    for ((t, qkv), attention) in qkvs.iter_mut().enumerate().zip(&mut attention[rows]) {
                        let (cos, sin) = &angles[t];
                        let known = segment.start + t + 1;
                        let scores = &mut scores[..known];
                        for query_head in 0..group {
                            let query = &mut qkv[(kv_head * group + query_head) * head_dim..][..head_dim];
                            rotate(rope, query, cos, sin);
                            attend(&head, cache, known, query, scale, scores, {
                                &mut attention[(slot * group + query_head) * head_dim..][..head_dim]
                            });
                        }
                    }
                }
            }
            let attention = rank.gather_many(&attention, kv_heads.start * group * head_dim, q_dim)?;
            for (x, out) in xs.iter_mut().zip(rank.matmul(&layer.wo, &attention)?) {
                add(x, &out);
            }
            for (x, h) in xs.iter().zip(&mut hs) {
                rms_norm(x, &layer.ffn_norm, config.rms_epsilon, h);
            }
            let products: Vec<Vec<f32>> = rank
                .matmul(&layer.w13, &hs)?
                .iter()
                .map(|gate_up| {
                    let (gate, up) = gate_up.split_at(ffn);
                    gate.iter().zip(up).map(|(gate, up)| gate / (1.0 + (-gate).exp()) * up).collect()
                })
                .collect();
            for (x, out) in xs.iter_mut().zip(rank.matmul(&layer.w2, &products)?) {
                add(x, &out);
            }
        }
        let mut last = 0;
        Ok(segments
            .iter()
            .map(|segment| {
                last += segment.tokens.len();
                let mut h = vec![0.0; config.dim];
                rms_norm(&xs[last - 1], &self.norm, config.rms_epsilon, &mut h);
                h
            })
            .collect())
    }

    /// One thread's part of a pass.
    fn pass(&self, rank: &Rank<'_>, token: usize, position: usize, cache: &KvCache) -> Result<Vec<f32>, Abandoned> {
        let config = &self.config;
        let (head_dim, kv_dim, ffn) = (config.head_dim, config.kv_dim(), config.ffn);
        let q_dim = config.heads * head_dim;
        let group = config.heads / config.kv_heads;
        let (cos, sin) = rotary_angles(config, self.rope_factors.as_deref(), position);
        let (cos, sin) = (&cos[..], &sin[..]);
        let rope = config.rope();
        #[expect(clippy::cast_precision_loss, reason = "a small head width")]
        let scale = 1.0 / (head_dim as f32).sqrt();
        // This thread's key-value heads, and with them their groups of query heads.
        let kv_heads = rank.share(config.kv_heads);
        let mut x = self.embeddings.as_ref().unwrap_or(&self.output).row(token);
        let mut h = vec![0.0; config.dim];
        let mut scores = vec![0.0; position + 1];
        let mut attention = vec![0.0; kv_heads.len() * group * head_dim];
        for (index, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attention_norm, config.rms_epsilon, &mut h);
            let mut qkv = rank.matvec(&layer.wqkv, &h)?;
            if let Some(bias) = &layer.qkv_bias {
                add(&mut qkv, bias);
            }
            let (queries, rest) = qkv.split_at_mut(q_dim);
            let (keys, values) = rest.split_at_mut(kv_dim);
            for (slot, kv_head) in kv_heads.clone().enumerate() {
                let mut head = cache.head(config, index, kv_head, position + 1);
                let key = &mut keys[kv_head * head_dim..][..head_dim];
                rotate(rope, key, cos, sin);
                let row = cache.row(position);
                head.keys[row * head_dim..][..head_dim].copy_from_slice(key);
                head.values[row * head_dim..][..head_dim].copy_from_slice(&values[kv_head * head_dim..][..head_dim]);
                let known = position + 1;
                for query_head in 0..group {
                    let query = &mut queries[(kv_head * group + query_head) * head_dim..][..head_dim];
                    rotate(rope, query, cos, sin);
                    let out = &mut attention[(slot * group + query_head) * head_dim..][..head_dim];
                    out.fill(0.0);
                    attend(&head, cache, known, query, scale, &mut scores, out);
                }
            }
            let attention = rank.gather(&attention, kv_heads.start * group * head_dim, q_dim)?;
            add(&mut x, &rank.matvec(&layer.wo, &attention)?);
            rms_norm(&x, &layer.ffn_norm, config.rms_epsilon, &mut h);
            let gate_up = rank.matvec(&layer.w13, &h)?;
            let (gate, up) = gate_up.split_at(ffn);
            let product: Vec<f32> = gate.iter().zip(up).map(|(gate, up)| gate / (1.0 + (-gate).exp()) * up).collect();
            add(&mut x, &rank.matvec(&layer.w2, &product)?);
        }
        rms_norm(&x, &self.norm, config.rms_epsilon, &mut h);
        rank.matvec(&self.output, &h)
    }
}

/// One query head's attention over positions `..known` of `cache` (read from `head`, its lock held):
/// the scores of every key, their softmax, and the values they weigh added into `out` (zeros).
fn attend(head: &Head, cache: &KvCache, known: usize, query: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let head_dim = query.len();
    let scores = &mut scores[..known];
    let mut score = scores.iter_mut();
    for rows in cache.runs(known) {
        for key in head.keys[rows.start * head_dim..rows.end * head_dim].chunks_exact(head_dim) {
            *score.next().expect("a score a position") = dot(query, key) * scale;
        }
    }
    softmax(scores);
    let mut weight = scores.iter();
    for rows in cache.runs(known) {
        for value in head.values[rows.start * head_dim..rows.end * head_dim].chunks_exact(head_dim) {
            let weight = weight.next().expect("a weight a position");
            for (out, value) in out.iter_mut().zip(value) {
                *out += weight * value;
            }
        }
    }
}

/// cos and sin of `position`'s angle for each pair of a head: position × scale × base^(−2i/d), over
/// the pair's frequency factor where the file has them (Llama 3), computed in f64. (A few dozen values
/// a pass: cheaper computed than a table of every position of a 128k context.)
pub(crate) fn rotary_angles(config: &Config, factors: Option<&[f32]>, position: usize) -> (Vec<f32>, Vec<f32>) {
    let half = config.head_dim / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(half), Vec::with_capacity(half));
    for i in 0..half {
        #[expect(clippy::cast_precision_loss, reason = "positions and frequencies of a model")]
        let mut angle = position as f64
            * f64::from(config.rope_position_scale)
            * f64::from(config.rope_theta).powf(-2.0 * i as f64 / config.head_dim as f64);
        if let Some(factors) = factors {
            angle /= f64::from(factors[i]);
        }
        #[expect(clippy::cast_possible_truncation, reason = "angles in f32")]
        let (c, s) = (angle.cos() as f32, angle.sin() as f32);
        cos.push(c);
        sin.push(s);
    }
    (cos, sin)
}

/// The dot product, in 8 lanes (a single running sum would be one long chain the compiler may not
/// reorder; lanes are what it vectorizes).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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

fn rms_norm(x: &[f32], weight: &[f32], epsilon: f32, out: &mut [f32]) {
    #[expect(clippy::cast_precision_loss, reason = "a small width")]
    let mean_square = x.iter().map(|x| x * x).sum::<f32>() / x.len() as f32;
    let inverse = 1.0 / (mean_square + epsilon).sqrt();
    for ((out, x), weight) in out.iter_mut().zip(x).zip(weight) {
        *out = x * inverse * weight;
    }
}

/// Rotates each pair of a head by the position's angles: values (2i, 2i+1), or (i, i + half).
fn rotate(rope: Rope, head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let turn = |a: &mut f32, b: &mut f32, cos: f32, sin: f32| {
        let (x, y) = (*a, *b);
        *a = x * cos - y * sin;
        *b = x * sin + y * cos;
    };
    match rope {
        Rope::Adjacent => {
            for ((pair, cos), sin) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (a, b) = pair.split_at_mut(1);
                turn(&mut a[0], &mut b[0], *cos, *sin);
            }
        }
        Rope::Halves => {
            let (first, second) = head.split_at_mut(head.len() / 2);
            for (((a, b), cos), sin) in first.iter_mut().zip(second).zip(cos).zip(sin) {
                turn(a, b, *cos, *sin);
            }
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;
    use crate::generate::{presets, random_gguf};

    // Would catch: a compiled graph whose model computes other logits than the file's (a weight
    // misplaced, a scale misread), or a plan announcing other bytes than the weights take (the pools
    // would count wrong); for quantized, dense, mixed, tied and separate outputs, biases and factors.
    #[test]
    fn a_compiled_graph_runs_the_files_model_and_its_plan_counts_its_weights() {
        for preset in presets().iter().filter(|preset| preset.name.starts_with("tiny")) {
            for kind in ["f16", "q8_0", "q4_0", "q4_k_m"] {
                let bytes = random_gguf(preset, 2, kind, 1).unwrap();
                let file = ModelFile::read(&bytes).unwrap();
                let team = Team::new(1).unwrap();
                let direct = Model::new(&file, 64, team.tuner()).unwrap();
                let (table, raw) = direct.write(&[]);
                let graph = Reader::read(&table, &usine_engine::RawSection::new(raw)).unwrap();
                let model = Model::from_graph(&graph, 64, team.tuner()).unwrap();
                let plan = plan_of(&graph.config, graph.weight_bytes(), Some(64), 1);
                assert_eq!(plan.weights_bytes, model.weight_bytes(), "{} {kind}", preset.name);
                assert_eq!(direct.weight_bytes(), model.weight_bytes(), "{} {kind}", preset.name);
                assert_eq!((plan.max_context_tokens, model.config.context), (64, 64));
                let (first, second) =
                    (KvCache::new(&model.config, 4).unwrap(), KvCache::new(&model.config, 4).unwrap());
                for (position, token) in [72, 105, 300, 7].into_iter().enumerate() {
                    let expected = direct.forward(&team, Some(token), position, &first).unwrap();
                    let logits = model.forward(&team, Some(token), position, &second).unwrap();
                    assert_eq!(logits, expected, "{} {kind} at {position}", preset.name);
                }
            }
        }
    }

    // Would catch: a damaged or foreign table read as a model, or a range outside the raw section.
    #[test]
    fn a_table_that_does_not_hold_is_refused() {
        let bytes = random_gguf(&presets()[0], 1, "q8_0", 1).unwrap();
        let team = Team::new(1).unwrap();
        let (table, raw) = Model::new(&ModelFile::read(&bytes).unwrap(), 64, team.tuner()).unwrap().write(&[]);
        let text = String::from_utf8(table).unwrap();
        let raw = usine_engine::RawSection::new(raw);
        let load = |table: &str, raw: &usine_engine::RawSection| {
            Reader::read(table.as_bytes(), raw)
                .and_then(|graph| Model::from_graph(&graph, 64, team.tuner()).map(|_| ()))
        };
        assert_eq!(load(&text, &raw), Ok(()));
        let short = usine_engine::RawSection::new(raw.as_bytes()[..raw.as_bytes().len() / 2].to_vec());
        assert!(load(&text, &short).unwrap_err().contains("outside the raw section"));
        assert!(load(&text.replace("config ffn 512", "config ffn 256"), &raw).unwrap_err().contains("no matrix"));
        assert!(
            load(&text.replace("usine-candle-graph 3", "usine-candle-graph 2"), &raw).unwrap_err().contains("schema")
        );
        assert!(load(&text.replace("config vocab", "config vocabulary"), &raw).unwrap_err().contains("missing"));
        assert!(load(&text, &usine_engine::RawSection::default()).unwrap_err().contains("no raw section"));
        // Sizes that would overflow the arithmetic of a load (a hostile table), or make a pass panic.
        for (from, to) in [
            ("config vocab 384", "config vocab 1152921504606846976"),
            ("config head_dim 64", "config head_dim 0"),
            ("config dim 256", "config dim 4611686018427387904"),
            ("config eos 256", "config eos 999"),
        ] {
            let error = load(&text.replace(from, to), &raw).unwrap_err();
            assert!(error.contains("does not hold"), "{to}: {error}");
        }
    }

    // Would catch: a prompt's pass over many tokens computing anything else than token-by-token passes
    // (a key written after it was needed, a position off by one, a tile of rows skipped), on one thread
    // and two, over more than one chunk.
    #[test]
    fn a_prefill_in_chunks_gives_the_logits_of_token_by_token_passes_to_the_bit() {
        for (preset, kind) in [(&presets()[0], "q8_0"), (&presets()[1], "q4_0"), (&presets()[0], "f16")] {
            let bytes = random_gguf(preset, 2, kind, 5).unwrap();
            let file = ModelFile::read(&bytes).unwrap();
            let tokens: Vec<u32> =
                (0..PREFILL_CHUNK + 9).map(|index| u32::try_from((index * 37 + 11) % 384).unwrap()).collect();
            for threads in [1, 2] {
                let team = Team::new(threads).unwrap();
                let model = Model::new(&file, 256, team.tuner()).unwrap();
                let (one, many) = (KvCache::new(&model.config, 80).unwrap(), KvCache::new(&model.config, 80).unwrap());
                let mut expected = Vec::new();
                for (position, token) in tokens.iter().enumerate() {
                    expected = model.forward(&team, Some(*token), position, &one).unwrap();
                }
                let (first, rest) = tokens.split_at(5);
                model.prefill(&team, first, 0, &many, &|| false).unwrap();
                let logits = model.prefill(&team, rest, 5, &many, &|| false).unwrap();
                assert_eq!(logits, expected, "{} {kind} on {threads} threads", preset.name);
                // The cache holds what token-by-token passes wrote: the next token's logits agree too.
                let next = model.forward(&team, Some(7), tokens.len(), &many).unwrap();
                assert_eq!(next, model.forward(&team, Some(7), tokens.len(), &one).unwrap());
            }
        }
        let team = Team::new(1).unwrap();
        let model = Model::new(
            &ModelFile::read(&random_gguf(&presets()[0], 1, "q8_0", 5).unwrap()).unwrap(),
            256,
            team.tuner(),
        )
        .unwrap();
        let cache = KvCache::new(&model.config, 4).unwrap();
        assert!(matches!(model.prefill(&team, &[1, 2, 3], 0, &cache, &|| true), Err(EngineError::Cancelled)));
        assert!(model.prefill(&team, &[1, 2, 3, 4, 5], 0, &cache, &|| false).is_err(), "past the cache");
        assert!(model.prefill(&team, &[1, 999], 0, &cache, &|| false).is_err(), "past the vocabulary");
    }

    // Would catch: a batched pass computing anything else than each sequence's own pass (a key written
    // into another sequence's cache, a position or a row of logits swapped, a group of logits skipped),
    // for more sequences than a group of logits, at different positions, on one thread and two.
    #[test]
    fn a_batched_pass_gives_each_sequence_the_logits_of_its_own_pass_to_the_bit() {
        for (preset, kind) in [(&presets()[0], "q8_0"), (&presets()[1], "q4_0")] {
            let bytes = random_gguf(preset, 2, kind, 9).unwrap();
            let file = ModelFile::read(&bytes).unwrap();
            for threads in [1, 2] {
                let team = Team::new(threads).unwrap();
                let model = Model::new(&file, 64, team.tuner()).unwrap();
                let sequences = LOGITS_GROUP + 3;
                let (alone, together): (Vec<KvCache>, Vec<KvCache>) = (0..sequences)
                    .map(|_| (KvCache::new(&model.config, 8).unwrap(), KvCache::new(&model.config, 8).unwrap()))
                    .unzip();
                // Sequence s has s % 4 tokens before: the batch mixes positions 0 to 3.
                let token = |s: usize, position: usize| u32::try_from((s * 31 + position * 7) % 384).unwrap();
                let mut expected = Vec::new();
                for s in 0..sequences {
                    let length = s % 4;
                    for position in 0..length {
                        model.forward(&team, Some(token(s, position)), position, &alone[s]).unwrap();
                        model.forward(&team, Some(token(s, position)), position, &together[s]).unwrap();
                    }
                    expected.push(model.forward(&team, Some(token(s, length)), length, &alone[s]).unwrap());
                }
                let batch: Vec<_> = (0..sequences).map(|s| (Some(token(s, s % 4)), s % 4, &together[s])).collect();
                let logits = model.forward_batch(&team, &batch, |index, logits| (index, logits.to_vec())).unwrap();
                assert_eq!(logits.len(), sequences);
                for (s, (index, logits)) in logits.into_iter().enumerate() {
                    assert_eq!(index, s);
                    assert_eq!(logits, expected[s], "{} {kind}, sequence {s} on {threads} threads", preset.name);
                }
                // Each cache holds what its own pass wrote: the next token agrees too.
                let (last, at) = (sequences - 1, (sequences - 1) % 4 + 1);
                let next = model.forward(&team, Some(5), at, &together[last]).unwrap();
                assert_eq!(next, model.forward(&team, Some(5), at, &alone[last]).unwrap());
            }
        }
        let team = Team::new(1).unwrap();
        let bytes = random_gguf(&presets()[0], 1, "q8_0", 5).unwrap();
        let model = Model::new(&ModelFile::read(&bytes).unwrap(), 64, team.tuner()).unwrap();
        let cache = KvCache::new(&model.config, 2).unwrap();
        let none: [(Option<u32>, usize, &KvCache); 0] = [];
        assert!(model.forward_batch(&team, &none, |_, _| ()).is_err(), "an empty batch");
        assert!(model.forward_batch(&team, &[(Some(1), 2, &cache)], |_, _| ()).is_err(), "past the cache");
        assert!(model.forward_batch(&team, &[(Some(999), 0, &cache)], |_, _| ()).is_err(), "past the vocabulary");
        let many = vec![(Some(1), 0, &cache); PREFILL_CHUNK + 1];
        assert!(model.forward_batch(&team, &many, |_, _| ()).is_err(), "more than a pass's activations cover");
    }

    // Would catch: a chunk of a prompt in a pass writing other keys than its prefill would (a position
    // shifted by the steps beside it, a row of another sequence's), a step's logits disturbed by the
    // chunks before it, or a pass over the activations' bound accepted.
    #[test]
    fn a_pass_of_prompt_chunks_and_steps_writes_and_gives_what_each_alone_does_to_the_bit() {
        let bytes = random_gguf(&presets()[0], 2, "q8_0", 3).unwrap();
        let file = ModelFile::read(&bytes).unwrap();
        let prompt: Vec<u32> = (0..23).map(|index| u32::try_from((index * 53 + 7) % 384).unwrap()).collect();
        for threads in [1, 2] {
            let team = Team::new(threads).unwrap();
            let model = Model::new(&file, 64, team.tuner()).unwrap();
            let new = || KvCache::new(&model.config, 32).unwrap();
            // Alone: the prompt's prefill, then its next token; and a sequence's step at position 2.
            let (alone, stepping_alone) = (new(), new());
            model.prefill(&team, &prompt, 0, &alone, &|| false).unwrap();
            let expected_next = model.forward(&team, Some(9), prompt.len(), &alone).unwrap();
            for position in 0..2 {
                model.forward(&team, Some(4), position, &stepping_alone).unwrap();
            }
            let expected_step = model.forward(&team, Some(5), 2, &stepping_alone).unwrap();
            // Together: the prompt in chunks of 10, 9 and 4, beside the same steps of the other sequence.
            let (filled, stepping) = (new(), new());
            for position in 0..2 {
                model.forward(&team, Some(4), position, &stepping).unwrap();
            }
            let mut start = 0;
            for (index, size) in [10, 9, 4].into_iter().enumerate() {
                let chunk = &prompt[start..start + size];
                let at = 2 + index;
                let token = if index == 0 { 5 } else { 6 };
                let logits = model
                    .forward_pass(&team, &[(chunk, start, &filled)], &[(Some(token), at, &stepping)], |_, logits| {
                        logits.to_vec()
                    })
                    .unwrap();
                if index == 0 {
                    assert_eq!(
                        logits,
                        std::slice::from_ref(&expected_step),
                        "the step beside a chunk, on {threads} threads"
                    );
                }
                start += size;
            }
            let next = model.forward(&team, Some(9), prompt.len(), &filled).unwrap();
            assert_eq!(next, expected_next, "after a prompt filled in chunks, on {threads} threads");
            // Chunks alone (no step): nothing to choose.
            let only = model.forward_pass(&team, &[(&prompt[..3], 0, &new())], &[], |_, _| ()).unwrap();
            assert!(only.is_empty());
        }
        let team = Team::new(1).unwrap();
        let model = Model::new(&file, 64, team.tuner()).unwrap();
        let cache = KvCache::new(&model.config, 4).unwrap();
        let none: [(Option<u32>, usize, &KvCache); 0] = [];
        let big = vec![1; PREFILL_CHUNK];
        let wide = KvCache::new(&model.config, PREFILL_CHUNK + 1).unwrap();
        let refused = |fills: &[(&[u32], usize, &KvCache)], steps: &[(Option<u32>, usize, &KvCache)]| {
            model.forward_pass(&team, fills, steps, |_, _| ()).is_err()
        };
        assert!(refused(&[(&big, 0, &wide)], &[(Some(1), 0, &cache)]), "more tokens than a pass's activations cover");
        assert!(refused(&[(&[], 0, &cache)], &none), "an empty chunk");
        assert!(refused(&[(&[1, 2, 3], 2, &cache)], &none), "a chunk past the cache");
        assert!(refused(&[(&[1, 999], 0, &cache)], &none), "a chunk past the vocabulary");
    }

    // Would catch: halves and adjacent pairs confused, or a rotation that changes a vector's length.
    #[test]
    fn the_rotary_embedding_turns_the_pairs_each_architecture_names() {
        let (cos, sin) = ([0.0, 1.0], [1.0, 0.0]); // a quarter turn for the first pair, none for the second
        let mut head = [1.0, 2.0, 3.0, 4.0];
        rotate(Rope::Adjacent, &mut head, &cos, &sin);
        assert_eq!(head, [-2.0, 1.0, 3.0, 4.0]);
        let mut head = [1.0, 2.0, 3.0, 4.0];
        rotate(Rope::Halves, &mut head, &cos, &sin);
        assert_eq!(head, [-3.0, 2.0, 1.0, 4.0]);
    }
}
