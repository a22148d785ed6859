//! Training (the `train` feature): the same decoder over whole sequences, with a causal mask, on f32
//! variables, fitted to a text with AdamW; written out as the safetensors that `compile` reads.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer as _;
use usine_engine::EngineError;

use crate::gguf::fatal;
use crate::shape::{END_OF_SEQUENCE, Shape, VOCAB};

const RMS_EPSILON: f64 = 1e-5;
const ROPE_THETA: f64 = 10_000.0;

/// How to train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub context: usize,
    /// Peak learning rate (cosine decay to a tenth of it).
    pub learning_rate: f64,
    /// Steps over which the learning rate rises linearly to its peak (0: none), while AdamW's
    /// estimates of the gradients' scale settle.
    pub warmup: usize,
    /// Seed of the initial weights and of the batches.
    pub seed: u64,
    /// Shares of each batch whose gradients are computed in parallel (on rayon's threads) and
    /// averaged into one optimizer step: the same step, in a fraction of the time. Divides `batch`.
    pub shards: usize,
}

impl Schedule {
    /// The learning rate at `step`: the warm-up's ramp, then a cosine from the peak down to a tenth of it.
    #[must_use]
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "a schedule")]
        let (step, warmup, steps) = (step as f64, self.warmup as f64, self.steps as f64);
        if step < warmup {
            return self.learning_rate * (step + 1.0) / warmup;
        }
        let progress = (step - warmup) / (steps - warmup).max(1.0);
        self.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
    }
}

/// A model being trained.
pub struct Trainer {
    shape: Shape,
    vars: Vec<(String, Var)>,
}

/// Seeded numbers, uniform in [-1, 1) (splitmix64).
struct Numbers(u64);

impl Numbers {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        #[expect(clippy::cast_precision_loss, reason = "24 bits of a random number")]
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        2.0 * unit - 1.0
    }
}

impl Trainer {
    /// A model of `shape` with seeded initial weights.
    pub fn new(shape: Shape, seed: u64) -> Result<Self, EngineError> {
        shape.check()?;
        let mut numbers = Numbers(seed);
        let mut names: Vec<(String, Vec<usize>)> = shape.tensors().into_iter().collect();
        names.sort();
        let mut vars = Vec::with_capacity(names.len());
        for (name, dims) in names {
            let count: usize = dims.iter().product();
            let values: Vec<f32> = if dims.len() == 1 {
                vec![1.0; count]
            } else {
                #[expect(clippy::cast_precision_loss, reason = "a scale")]
                let scale = 1.0 / (dims[1] as f32).sqrt();
                (0..count).map(|_| numbers.uniform() * scale).collect()
            };
            let tensor = Tensor::from_vec(values, dims, &Device::Cpu).map_err(fatal("initial weights"))?;
            vars.push((name, Var::from_tensor(&tensor).map_err(fatal("initial weights"))?));
        }
        Ok(Self { shape, vars })
    }

    /// A model to go on training from safetensors `bytes` (as `to_safetensors` wrote them).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, EngineError> {
        let shape = crate::gguf::source_shape(bytes)?;
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(fatal("weights"))?;
        let mut vars: Vec<(String, Var)> = tensors
            .into_iter()
            .map(|(name, tensor)| Ok((name, Var::from_tensor(&tensor).map_err(fatal("weights"))?)))
            .collect::<Result<_, EngineError>>()?;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { shape, vars })
    }

    /// Mean cross-entropy (nats per byte) of predicting each token of `tokens` from those before.
    pub fn loss(&self, tokens: &[u32]) -> Result<f32, EngineError> {
        let inputs = Tensor::from_vec(tokens[..tokens.len() - 1].to_vec(), (1, tokens.len() - 1), &Device::Cpu)
            .map_err(fatal("loss"))?;
        let targets = Tensor::from_vec(tokens[1..].to_vec(), tokens.len() - 1, &Device::Cpu).map_err(fatal("loss"))?;
        let logits = self.forward(&inputs).and_then(|l| l.squeeze(0)).map_err(fatal("loss"))?;
        candle_nn::loss::cross_entropy(&logits, &targets).and_then(|l| l.to_scalar::<f32>()).map_err(fatal("loss"))
    }

    /// The greedy continuation of `prompt` by `count` tokens, through the training forward (f32, whole
    /// sequences): a look at what the model has learnt, without quantization in the way.
    pub fn continue_greedily(&self, prompt: &[u32], count: usize) -> Result<Vec<u32>, EngineError> {
        // An empty prompt starts from the end-of-sequence token, as the engine does.
        let mut tokens = if prompt.is_empty() { vec![END_OF_SEQUENCE] } else { prompt.to_vec() };
        let start = tokens.len();
        for _ in 0..count {
            let start = tokens.len().saturating_sub(self.shape.max_context);
            let window = &tokens[start..];
            let input = Tensor::from_vec(window.to_vec(), (1, window.len()), &Device::Cpu).map_err(fatal("sample"))?;
            let logits = self
                .forward(&input)
                .and_then(|logits| logits.squeeze(0)?.get(window.len() - 1)?.argmax(0)?.to_scalar::<u32>())
                .map_err(fatal("sample"))?;
            tokens.push(logits);
        }
        Ok(tokens[start..].to_vec())
    }

    fn weight(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, var)| var.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg(format!("no weight `{name}`")))
    }

    /// Logits of every position of `tokens` ([batch, time]).
    fn forward(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let shape = &self.shape;
        let (batch, time) = tokens.dims2()?;
        let (heads, kv_heads, head_dim) = (shape.heads, shape.kv_heads, shape.head_dim());
        let mut x = self
            .weight("tok_embeddings.weight")?
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((batch, time, shape.dim))?;
        let (cos, sin) = rope_tables(head_dim, time)?;
        let mask = causal_mask(time)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let linear =
            |x: &Tensor, name: String| -> candle_core::Result<Tensor> { x.broadcast_matmul(&self.weight(&name)?.t()?) };
        for layer in 0..shape.layers {
            let name = |part: &str| format!("layers.{layer}.{part}.weight");
            let h = rms_norm(&x, self.weight(&name("attention_norm"))?)?;
            let q = linear(&h, name("attention.wq"))?.reshape((batch, time, heads, head_dim))?.transpose(1, 2)?;
            let k = linear(&h, name("attention.wk"))?.reshape((batch, time, kv_heads, head_dim))?.transpose(1, 2)?;
            let v = linear(&h, name("attention.wv"))?.reshape((batch, time, kv_heads, head_dim))?.transpose(1, 2)?;
            let (q, k) = (rope(&q.contiguous()?, &cos, &sin)?, rope(&k.contiguous()?, &cos, &sin)?);
            // Each key-value head serves its group of query heads.
            let group = heads / kv_heads;
            let expand = |t: Tensor| -> candle_core::Result<Tensor> {
                t.unsqueeze(2)?
                    .broadcast_as((batch, kv_heads, group, time, head_dim))?
                    .reshape((batch, heads, time, head_dim))
            };
            let (k, v) = (expand(k)?, expand(v.contiguous()?)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            // `softmax`, not `softmax_last_dim`: the fused one has no backward pass, and the gradient
            // would stop there, leaving wq and wk untrained (a test checks that every weight learns).
            let attention = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
            let attention = attention.transpose(1, 2)?.reshape((batch, time, shape.dim))?;
            x = (x + linear(&attention, name("attention.wo"))?)?;
            let h = rms_norm(&x, self.weight(&name("ffn_norm"))?)?;
            let gate = linear(&h, name("feed_forward.w1"))?.silu()?;
            let up = linear(&h, name("feed_forward.w3"))?;
            x = (x + linear(&(gate * up)?, name("feed_forward.w2"))?)?;
        }
        let x = rms_norm(&x, self.weight("norm.weight")?)?;
        linear(&x, "output.weight".to_owned())
    }

    /// Fits the model to `text` (bytes, with the end-of-sequence token between documents), reporting
    /// each step's loss (nats per byte) to `report`, which may read the weights as they are (to save a
    /// checkpoint, say): they change in place.
    pub fn train(
        &self,
        text: &[u32],
        schedule: &Schedule,
        mut report: impl FnMut(usize, f32),
    ) -> Result<(), EngineError> {
        let span = schedule.context + 1;
        if schedule.batch == 0 || schedule.context == 0 {
            return Err(EngineError::Fatal { message: format!("an empty batch in {schedule:?}") });
        }
        if text.len() <= span {
            return Err(EngineError::Fatal {
                message: format!("{} tokens of text: too few for a context of {}", text.len(), schedule.context),
            });
        }
        let vars: Vec<Var> = self.vars.iter().map(|(_, var)| var.clone()).collect();
        let params = candle_nn::ParamsAdamW { lr: schedule.learning_rate, weight_decay: 0.01, ..Default::default() };
        let mut optimizer = candle_nn::AdamW::new(vars, params).map_err(fatal("optimizer"))?;
        let mut numbers = Numbers(schedule.seed ^ 0xDA7A);
        for step in 0..schedule.steps {
            optimizer.set_learning_rate(schedule.learning_rate_at(step));
            let mut inputs = Vec::with_capacity(schedule.batch * schedule.context);
            let mut targets = Vec::with_capacity(schedule.batch * schedule.context);
            for _ in 0..schedule.batch {
                let start = usize::try_from(numbers.next_u64() % (text.len() - span) as u64).expect("below the length");
                inputs.extend_from_slice(&text[start..start + schedule.context]);
                targets.extend_from_slice(&text[start + 1..start + span]);
            }
            let (grads, loss) = self.gradients(&inputs, &targets, schedule)?;
            optimizer.step(&grads).map_err(fatal("optimizer"))?;
            report(step, loss);
        }
        Ok(())
    }

    /// The gradients of the mean loss over a batch (`inputs` and `targets`, `batch` rows of `context`
    /// tokens), and that loss. Each shard's rows go forward and back on a thread of its own; each
    /// shard's loss is a mean over as many tokens, so the batch's gradient is the mean of theirs,
    /// summed in shard order (the same numbers at every run).
    fn gradients(
        &self,
        inputs: &[u32],
        targets: &[u32],
        schedule: &Schedule,
    ) -> Result<(candle_core::backprop::GradStore, f32), EngineError> {
        use rayon::prelude::*;
        if schedule.shards == 0 || !schedule.batch.is_multiple_of(schedule.shards) {
            return Err(EngineError::Fatal {
                message: format!("{} shards do not divide a batch of {}", schedule.shards, schedule.batch),
            });
        }
        let rows = schedule.batch / schedule.shards;
        let length = rows * schedule.context;
        let shard = |index: usize| -> candle_core::Result<(candle_core::backprop::GradStore, f32)> {
            let range = index * length..(index + 1) * length;
            let inputs = Tensor::from_slice(&inputs[range.clone()], (rows, schedule.context), &Device::Cpu)?;
            let targets = Tensor::from_slice(&targets[range], length, &Device::Cpu)?;
            let logits = self.forward(&inputs)?.reshape((length, VOCAB))?;
            let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
            Ok((loss.backward()?, loss.to_scalar::<f32>()?))
        };
        // rayon's threads: candle's matrix products inside a shard share the same pool, so the two
        // levels of parallelism do not oversubscribe the cores.
        let shards = (0..schedule.shards)
            .into_par_iter()
            .map(shard)
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(fatal("backward"))?;
        let mut shards = shards.into_iter();
        let (mut grads, mut loss) = shards.next().ok_or_else(|| EngineError::Fatal { message: "no shard".into() })?;
        let others: Vec<_> = shards.collect();
        // A weight without a gradient would silently never learn (AdamW skips it): an operation without
        // a backward pass somewhere between it and the loss.
        let missing =
            |name: &str| EngineError::Fatal { message: format!("`{name}` has no gradient: the forward cuts it off") };
        #[expect(clippy::cast_precision_loss, reason = "a handful of shards")]
        let share = 1.0 / schedule.shards as f64;
        for (name, var) in &self.vars {
            let mut sum = grads.get(var.as_tensor()).ok_or_else(|| missing(name))?.clone();
            if others.is_empty() {
                continue;
            }
            for (other, _) in &others {
                let grad = other.get(var.as_tensor()).ok_or_else(|| missing(name))?;
                sum = (sum + grad).map_err(fatal("gradients"))?;
            }
            grads.insert(var.as_tensor(), (sum * share).map_err(fatal("gradients"))?);
        }
        for (_, other_loss) in &others {
            loss += other_loss;
        }
        #[expect(clippy::cast_precision_loss, reason = "a handful of shards")]
        Ok((grads, loss / schedule.shards as f32))
    }

    /// The weights as safetensors, with the shape in the metadata.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, EngineError> {
        let metadata: HashMap<String, String> =
            self.shape.to_metadata().into_iter().map(|(key, value)| (key.to_owned(), value.to_string())).collect();
        let tensors: Vec<(&str, &Tensor)> =
            self.vars.iter().map(|(name, var)| (name.as_str(), var.as_tensor())).collect();
        safetensors::serialize(tensors, Some(metadata))
            .map_err(|error| EngineError::Fatal { message: format!("writing safetensors: {error}") })
    }
}

/// Bytes as tokens, documents separated by the end-of-sequence token.
pub fn tokens_of(documents: &[String]) -> Vec<u32> {
    let mut tokens = Vec::new();
    for document in documents {
        tokens.extend(document.bytes().map(u32::from));
        tokens.push(END_OF_SEQUENCE);
    }
    tokens
}

fn rms_norm(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + RMS_EPSILON)?.sqrt()?)?.broadcast_mul(weight)
}

fn rope_tables(head_dim: usize, time: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    #[expect(clippy::cast_precision_loss, clippy::cast_possible_truncation, reason = "angles of a small model")]
    let angles: Vec<f32> = (0..time)
        .flat_map(|position| {
            (0..half).map(move |i| (position as f64 / ROPE_THETA.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        })
        .collect();
    let angles = Tensor::from_vec(angles, (time, half), &Device::Cpu)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Rotates each pair (2i, 2i+1) of `x` ([batch, heads, time, head_dim]) by its position's angles.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (batch, heads, time, head_dim) = x.dims4()?;
    let pairs = x.reshape((batch, heads, time, head_dim / 2, 2))?;
    let (even, odd) = (pairs.narrow(4, 0, 1)?.squeeze(4)?, pairs.narrow(4, 1, 1)?.squeeze(4)?);
    let rotated_even = (even.broadcast_mul(cos)? - odd.broadcast_mul(sin)?)?;
    let rotated_odd = (even.broadcast_mul(sin)? + odd.broadcast_mul(cos)?)?;
    Tensor::stack(&[rotated_even, rotated_odd], 4)?.reshape((batch, heads, time, head_dim))
}

fn causal_mask(time: usize) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..time)
        .flat_map(|row| (0..time).map(move |column| if column > row { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (time, time), &Device::Cpu)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;
    use crate::model::{KvCache, Model};

    /// A position's logits depend only on the tokens up to it: changing the last token changes none
    /// of the logits before it.
    #[test]
    fn the_training_forward_does_not_see_ahead() {
        let shape = Shape { dim: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 192, max_context: 64 };
        let trainer = Trainer::new(shape, 5).unwrap();
        let logits = |text: &str| {
            let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
            let batch = Tensor::from_vec(tokens.clone(), (1, tokens.len()), &Device::Cpu).unwrap();
            trainer.forward(&batch).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
        };
        let (a, b) = (logits("The kernel keeps"), logits("The kernel keepX"));
        assert_eq!(a[..15], b[..15]);
        assert_ne!(a[15], b[15]);
    }

    /// Every weight learns (has a gradient that is not zero: a fused operation without a backward
    /// pass once cut wq and wk off), and splitting a batch into shards computed on their own threads
    /// changes nothing but rounding: the averaged gradients and loss are the whole batch's.
    #[test]
    fn sharded_gradients_are_the_whole_batch_gradients() {
        let shape = Shape { dim: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 192, max_context: 16 };
        let trainer = Trainer::new(shape, 9).unwrap();
        let text: Vec<u32> = "The kernel keeps the models it loaded warm, and the executor streams tokens."
            .bytes()
            .map(u32::from)
            .collect();
        let (inputs, targets): (Vec<u32>, Vec<u32>) =
            (0..4).flat_map(|row| (0..16).map(move |i| row * 9 + i)).map(|i| (text[i], text[i + 1])).unzip();
        let schedule = Schedule { steps: 1, batch: 4, context: 16, learning_rate: 1e-3, warmup: 0, seed: 1, shards: 1 };
        let (whole, whole_loss) = trainer.gradients(&inputs, &targets, &schedule).unwrap();
        let (sharded, sharded_loss) =
            trainer.gradients(&inputs, &targets, &Schedule { shards: 2, ..schedule }).unwrap();
        assert!((whole_loss - sharded_loss).abs() < 1e-5, "{whole_loss} against {sharded_loss}");
        for (name, var) in &trainer.vars {
            let a = whole
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = sharded.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let scale = a.iter().fold(0.0_f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}: no gradient");
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0_f32, f32::max);
            assert!(worst <= scale * 1e-4, "{name}: gradients differ by {worst} (largest {scale})");
        }
        let odd = Schedule { shards: 3, ..schedule };
        let error = trainer.gradients(&inputs, &targets, &odd).map(|_| ()).unwrap_err();
        assert!(error.to_string().contains("3 shards do not divide a batch of 4"), "{error}");
    }

    /// The warm-up ramps linearly to the peak; the cosine then ends at a tenth of it.
    #[test]
    fn the_learning_rate_warms_up_then_decays() {
        let schedule =
            Schedule { steps: 110, batch: 8, context: 8, learning_rate: 1.0, warmup: 10, seed: 1, shards: 1 };
        let rates: Vec<f64> = (0..110).map(|step| schedule.learning_rate_at(step)).collect();
        assert!((rates[0] - 0.1).abs() < 1e-12 && (rates[4] - 0.5).abs() < 1e-12 && (rates[9] - 1.0).abs() < 1e-12);
        assert!((rates[10] - 1.0).abs() < 1e-12);
        assert!((rates[60] - 0.55).abs() < 1e-12, "{}", rates[60]);
        assert!(rates[10..].windows(2).all(|pair| pair[1] < pair[0]));
        assert!((rates[109] - 0.1).abs() < 1e-3, "{}", rates[109]);
    }

    /// The training forward (whole sequences, masked) and the engine's (a token at a time, a kv-cache)
    /// compute the same function: same logits at every position, up to Q8_0's rounding.
    #[test]
    fn training_and_inference_compute_the_same_logits() {
        let shape = Shape { dim: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 192, max_context: 64 };
        let trainer = Trainer::new(shape, 5).unwrap();
        let text: Vec<u32> = "The kernel keeps".bytes().map(u32::from).collect();
        let batch = Tensor::from_vec(text.clone(), (1, text.len()), &Device::Cpu).unwrap();
        let trained = trainer.forward(&batch).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();

        let gguf = crate::gguf::compile(
            &trainer.to_safetensors().unwrap(),
            candle_core::quantized::GgmlDType::Q8_0,
            None,
            &usine_engine::NoProgress,
        )
        .unwrap();
        let team = crate::team::Team::new(2).unwrap();
        let file = crate::config::ModelFile::read(&gguf).unwrap();
        let model = Model::new(&file, shape.max_context, team.tuner()).unwrap();
        let cache = KvCache::new(&model.config, text.len()).unwrap();
        for (position, token) in text.iter().enumerate() {
            let logits = model.forward(&team, Some(*token), position, &cache).unwrap();
            let worst = logits.iter().zip(&trained[position]).map(|(a, b)| (a - b).abs()).fold(0.0_f32, f32::max);
            assert!(worst < 0.05, "position {position}: logits differ by {worst}");
        }
    }
}
