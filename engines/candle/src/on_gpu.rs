//! A model whose passes run on the card (feature `cuda`): the CPU model's tokenizer, plan and
//! vocabulary, and [`GpuModel`]'s passes. Its sequences keep their keys and values on the card (no
//! paging, so no prefix cache yet); it batches and prefills in passes as the CPU model does.

use std::sync::Arc;

use async_trait::async_trait;
use usine_engine::{
    BatchStep, Detokenizer, EngineError, Fill, GenerationParams, LoadedModel, MemoryPlan, Message, PassOutcome,
    Prefill, Prepared, Sequence, Token, TokenId,
};

use crate::cuda::{GpuCache, GpuModel};
use crate::model::PREFILL_CHUNK;
use crate::{CancelOnDrop, CandleModel, Course, blocking, pass_outcome, sample};

pub(crate) struct CudaModel {
    /// The tokenizer, chat template, plan and end tokens.
    pub(crate) base: CandleModel,
    pub(crate) gpu: Arc<GpuModel>,
}

#[async_trait]
impl LoadedModel for CudaModel {
    fn memory_plan(&self) -> MemoryPlan {
        self.base.memory_plan()
    }

    fn tokenize(&self, text: &str) -> Vec<TokenId> {
        self.base.tokenize(text)
    }

    fn detokenizer(&self) -> Box<dyn Detokenizer> {
        self.base.detokenizer()
    }

    fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<TokenId>, EngineError> {
        self.base.chat_prompt(messages)
    }

    async fn warm_up(&self) -> Result<(), EngineError> {
        self.base.warm_up().await
    }

    fn max_batch(&self) -> usize {
        PREFILL_CHUNK
    }

    fn max_pass_tokens(&self) -> usize {
        PREFILL_CHUNK
    }

    async fn prefill(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        self.start(input, true).await
    }

    async fn open(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        self.start(input, false).await
    }

    async fn compute_batch(&self, steps: Vec<BatchStep>) -> Vec<Result<Token, EngineError>> {
        self.compute_pass(Vec::new(), steps).await.1
    }

    async fn compute_pass(&self, fills: Vec<Fill>, steps: Vec<BatchStep>) -> PassOutcome {
        let together = self.together(&fills, &steps).await;
        pass_outcome(fills.len(), steps.len(), together)
    }
}

impl CudaModel {
    /// A sequence of `input` with its cache on the card, the context but its last token computed now
    /// if `now`, else left to passes.
    async fn start(&self, input: Prefill<'_>, now: bool) -> Result<Box<dyn Sequence>, EngineError> {
        let (prompt, generated) = (input.prompt(), input.generated());
        let start = if prompt.is_empty() { vec![self.base.model.start_token()] } else { Vec::new() };
        let context: Vec<TokenId> = start.iter().chain(prompt).chain(generated).copied().collect();
        let base = context.len().saturating_sub(1);
        let capacity = input.capacity().max(1);
        let gpu = Arc::clone(&self.gpu);
        // A dropped prefill stops at the next chunk instead of running the whole prompt.
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = CancelOnDrop(Arc::clone(&cancelled));
        let cache = blocking(move || {
            let cache = gpu.cache(capacity)?;
            if now {
                for (index, chunk) in context[..base].chunks(PREFILL_CHUNK).enumerate() {
                    if cancelled.load(std::sync::atomic::Ordering::Relaxed) {
                        return Err(EngineError::Cancelled);
                    }
                    let tokens: Vec<_> = chunk
                        .iter()
                        .enumerate()
                        .map(|(offset, &token)| (token, index * PREFILL_CHUNK + offset, &cache))
                        .collect();
                    gpu.forward(&tokens, &[])?;
                }
            }
            Ok((cache, context))
        })
        .await?;
        drop(guard);
        let (cache, context) = cache;
        let unfilled = if now { Vec::new() } else { context[..base].to_vec() };
        Ok(Box::new(CudaSequence {
            gpu: Arc::clone(&self.gpu),
            cache: Arc::new(cache),
            course: Course::new(base, input.first_step(), unfilled),
            params: input.params().clone(),
            end_of_generation: Arc::clone(&self.base.end_of_generation),
        }))
    }

    fn own<'s>(&self, sequence: &'s Arc<dyn Sequence>) -> Result<&'s CudaSequence, EngineError> {
        let any: &dyn std::any::Any = &**sequence;
        any.downcast_ref::<CudaSequence>()
            .filter(|sequence| Arc::ptr_eq(&sequence.gpu, &self.gpu))
            .ok_or_else(|| EngineError::Fatal { message: "a pass with another model's sequence".to_owned() })
    }

    /// One pass on the card for `fills` and `steps`, each step's token sampled as its own compute does.
    async fn together(&self, fills: &[Fill], steps: &[BatchStep]) -> Result<Vec<Token>, EngineError> {
        // Each token of the pass: its id, position and sequence's cache; then what sampling needs.
        let mut tokens: Vec<(u32, usize, Arc<GpuCache>)> = Vec::new();
        for fill in fills {
            let sequence = self.own(&fill.sequence)?;
            let (chunk, start) = sequence.course.chunk(fill)?;
            for (offset, &token) in chunk.iter().enumerate() {
                tokens.push((token, start + offset, Arc::clone(&sequence.cache)));
            }
        }
        let mut sampling = Vec::with_capacity(steps.len());
        for step in steps {
            let sequence = self.own(&step.sequence)?;
            let position = sequence.course.position(&step.prepared)?;
            sampling.push((
                tokens.len(),
                sequence.params.clone(),
                step.prepared.step(),
                Arc::clone(&sequence.end_of_generation),
            ));
            let token = step.previous.unwrap_or_else(|| self.base.model.start_token());
            tokens.push((token, position, Arc::clone(&sequence.cache)));
        }
        let gpu = Arc::clone(&self.gpu);
        let chosen: Vec<usize> = sampling.iter().map(|(index, ..)| *index).collect();
        let logits = blocking(move || {
            let pass: Vec<_> = tokens.iter().map(|(token, position, cache)| (*token, *position, &**cache)).collect();
            gpu.forward(&pass, &chosen)
        })
        .await?;
        for fill in fills {
            self.own(&fill.sequence)?.course.filled(fill);
        }
        Ok(logits
            .iter()
            .zip(&sampling)
            .map(|(logits, (_, params, step, end))| {
                let id = sample::sample(logits, params, *step);
                Token { id, end_of_sequence: end.contains(&id) }
            })
            .collect())
    }
}

struct CudaSequence {
    gpu: Arc<GpuModel>,
    cache: Arc<GpuCache>,
    course: Course,
    params: GenerationParams,
    end_of_generation: Arc<[TokenId]>,
}

#[async_trait]
impl Sequence for CudaSequence {
    fn unfilled(&self) -> usize {
        self.course.unfilled()
    }

    async fn prepare(&self, step: u32) -> Result<Prepared, EngineError> {
        self.course.prepare(step)
    }

    async fn compute(&self, prepared: Prepared, previous: Option<TokenId>) -> Result<Token, EngineError> {
        let (step, position) = (prepared.step(), self.course.position(&prepared)?);
        let token = previous.unwrap_or_else(|| self.gpu.start_token());
        let (gpu, cache) = (Arc::clone(&self.gpu), Arc::clone(&self.cache));
        let logits = blocking(move || gpu.forward(&[(token, position, &cache)], &[0])).await?;
        let id = sample::sample(&logits[0], &self.params, step);
        Ok(Token { id, end_of_sequence: self.end_of_generation.contains(&id) })
    }
}
