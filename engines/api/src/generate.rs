//! The reference driver: one sequence, step after step, stop sequences and limits honoured. The
//! executor pipelines and streams the same way; this one is for tests, tools and the conformance kit.

use crate::engine::{LoadedModel, Prefill, Sequence};
use crate::error::EngineError;
use crate::text::StopMatcher;
use crate::types::{FinishReason, Generated, GenerationParams, MemoryPlan, TokenId};

/// Generates from `prompt` with `params`, one step at a time, without pipelining.
///
/// Checks the parameters and that the prompt and `max_tokens` fit the model's context; stops at the
/// first stop sequence (not included in the text), at an end-of-sequence token, or after `max_tokens`.
pub async fn generate(
    model: &dyn LoadedModel,
    prompt: &str,
    params: &GenerationParams,
) -> Result<Generated, EngineError> {
    let prompt_tokens = model.tokenize(prompt);
    let sequence = prefill(model, &prompt_tokens, &[], params).await?;
    let mut detokenizer = model.detokenizer();
    let mut stops = StopMatcher::new(&params.stop);
    let mut previous = prompt_tokens.last().copied();
    let mut generation = Generated {
        text: String::new(),
        tokens: Vec::new(),
        finish: FinishReason::Length,
        prompt_tokens: u32::try_from(prompt_tokens.len()).unwrap_or(u32::MAX),
    };
    for step in 0..params.max_tokens {
        let prepared = sequence.prepare(step).await?;
        let token = sequence.compute(prepared, previous).await?;
        if token.end_of_sequence {
            generation.finish = FinishReason::EndOfSequence;
            break;
        }
        generation.tokens.push(token.id);
        let released = stops.push(&detokenizer.push(token.id));
        generation.text.push_str(&released.text);
        if released.stopped {
            generation.finish = FinishReason::Stop;
            return Ok(generation);
        }
        previous = Some(token.id);
    }
    let released = stops.push(&detokenizer.finish());
    generation.text.push_str(&released.text);
    if released.stopped {
        generation.finish = FinishReason::Stop;
    } else {
        generation.text.push_str(&stops.finish());
    }
    Ok(generation)
}

/// Prefills `model` with `prompt` and the tokens already `generated`, the input checked against the
/// model's own plan ([`Prefill::new`]): what a test or a tool that drives one model calls.
pub async fn prefill(
    model: &dyn LoadedModel,
    prompt: &[TokenId],
    generated: &[TokenId],
    params: &GenerationParams,
) -> Result<Box<dyn Sequence>, EngineError> {
    model.prefill(Prefill::new(&model.memory_plan(), prompt, generated, params)?).await
}

/// Fails with [`EngineError::ContextOverflow`] when `prompt_tokens + max_tokens` exceeds the plan's
/// context ([`Prefill::new`] calls it, with the prompt and the tokens already generated).
pub fn check_context(plan: &MemoryPlan, prompt_tokens: usize, params: &GenerationParams) -> Result<(), EngineError> {
    let limit = plan.max_context_tokens;
    if prompt_tokens as u64 + u64::from(params.max_tokens) > u64::from(limit) {
        let prompt = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
        return Err(EngineError::ContextOverflow { prompt, max_tokens: params.max_tokens, limit });
    }
    Ok(())
}
