//! The conformance kit: the contract of [`Engine`], checked on any engine by one call from its tests.
//!
//! Turn it on in an engine crate's dev-dependencies (`features = ["conformance"]`), then:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use usine_engine::{ModelSpec, ZeroEngine, conformance};
//!
//! let report = conformance::check(&ZeroEngine::new(), &ModelSpec::new("any", "zero", "default")).await;
//! let report = report.unwrap_or_else(|failure| panic!("{failure}"));
//! assert!(report.checks.len() >= 10);
//! # }
//! ```
//!
//! What it checks: the descriptor names the engine; compiling reports progress from 0 to 1, never
//! backwards; the graph survives a serde round trip (what storage does; the raw section travels apart)
//! and loads, while a graph of
//! another engine or version is refused as an unusable graph; the memory plan, known before the load,
//! holds together and is the loaded model's; text survives tokenizing and detokenizing; the same seed
//! gives the same text; `max_tokens` and stop sequences are honoured; bad parameters and a context
//! overflow are typed errors from `prefill`; decoding with the prepare stage of step N+1 running during
//! the compute stage of step N gives the same tokens as one stage after the other; sequences opened and
//! run together through `compute_pass` (their contexts in chunks, where the model prefills in passes)
//! get the tokens each gets alone; and a generation resumed after a break goes on with the tokens the
//! unbroken one had.

use std::sync::Mutex;

use crate::engine::{BatchStep, Engine, Fill, LoadedModel, Prefill, Sequence};
use crate::error::{EngineError, ErrorKind};
use crate::generate::generate;
use crate::types::{CompiledGraph, FinishReason, GenerationParams, ModelSpec, Progress, TokenId};

/// The text the kit tokenizes and prompts with.
const SAMPLE: &str = "The kernel keeps the right models resident; the engine computes. Ünïcödé, too: 日本語 ✓";

/// Which checks passed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The names of the checks, in order.
    pub checks: Vec<&'static str>,
}

/// The first check that failed, and what was seen.
#[derive(Debug, Clone, thiserror::Error)]
#[error("conformance check `{check}` failed: {detail}")]
pub struct Failure {
    /// The check.
    pub check: &'static str,
    /// What was seen.
    pub detail: String,
}

fn fail<T>(check: &'static str, detail: impl Into<String>) -> Result<T, Failure> {
    Err(Failure { check, detail: detail.into() })
}

fn ensure(check: &'static str, holds: bool, detail: impl FnOnce() -> String) -> Result<(), Failure> {
    if holds { Ok(()) } else { fail(check, detail()) }
}

fn engine_error(check: &'static str) -> impl FnOnce(EngineError) -> Failure {
    move |error| Failure { check, detail: format!("unexpected error: {error}") }
}

/// Runs every check on `engine`, compiling `spec` (which must name a profile the engine has).
pub async fn check(engine: &dyn Engine, spec: &ModelSpec) -> Result<Report, Failure> {
    let mut report = Report::default();
    let mut passed = |name| report.checks.push(name);

    let descriptor = engine.descriptor();
    ensure("descriptor", !descriptor.name.is_empty() && !descriptor.version.is_empty(), || format!("{descriptor:?}"))?;
    ensure("descriptor", descriptor.profiles.contains(&spec.profile), || {
        format!("profile `{}` is not among {:?}", spec.profile, descriptor.profiles)
    })?;
    passed("descriptor");

    let seen = Mutex::new(Vec::<Progress>::new());
    let record = |progress: Progress| seen.lock().expect("not poisoned").push(progress);
    let graph = engine.compile(spec, &record).await.map_err(engine_error("compile"))?;
    let seen = seen.into_inner().expect("not poisoned");
    let fractions: Vec<f64> = seen.iter().map(|progress| progress.fraction).collect();
    ensure("progress", fractions.first() == Some(&0.0) && fractions.last() == Some(&1.0), || {
        format!("progress must go from 0 to 1, saw {fractions:?}")
    })?;
    ensure("progress", fractions.windows(2).all(|pair| pair[0] <= pair[1]), || {
        format!("progress went backwards: {fractions:?}")
    })?;
    ensure("progress", seen.iter().all(|progress| !progress.stage.is_empty()), || "a stage without a name".into())?;
    passed("progress");

    ensure("graph", graph.engine == descriptor.name && graph.engine_version == descriptor.version, || {
        format!("the graph says {} {}", graph.engine, graph.engine_version)
    })?;
    let json = serde_json::to_vec(&graph).map_err(|error| Failure { check: "graph", detail: error.to_string() })?;
    let mut stored: CompiledGraph =
        serde_json::from_slice(&json).map_err(|error| Failure { check: "graph", detail: error.to_string() })?;
    // The raw section travels apart (storage writes it as it is, and serves it from the file's mapping).
    ensure("graph", stored.raw.as_bytes().is_empty(), || "the raw section went through serde".into())?;
    stored.raw = graph.raw.clone();
    ensure("graph", stored == graph, || "the graph changed in a serde round trip".into())?;
    passed("graph round trip");

    let mut foreign = stored.clone();
    foreign.engine_version.push_str("-other");
    match engine.load(&foreign).await {
        Err(error) if error.kind() == ErrorKind::UnusableGraph => {}
        Err(error) => return fail("foreign graph", format!("refused, but as {:?}: {error}", error.kind())),
        Ok(_) => return fail("foreign graph", "a graph of another engine version was loaded"),
    }
    match engine.memory_plan(&foreign) {
        Err(error) if error.kind() == ErrorKind::UnusableGraph => {}
        other => return fail("foreign graph", format!("its memory plan was {other:?}")),
    }
    passed("foreign graph refused");

    let planned = engine.memory_plan(&stored).map_err(engine_error("memory plan"))?;
    let model = engine.load(&stored).await.map_err(engine_error("load"))?;
    let plan = model.memory_plan();
    ensure("memory plan", plan.is_consistent(), || format!("{plan:?}"))?;
    ensure("memory plan", planned == plan, || format!("{planned:?} before the load, {plan:?} after"))?;
    passed("memory plan, before and after the load");

    let tokens = model.tokenize(SAMPLE);
    let mut detokenizer = model.detokenizer();
    let mut text: String = tokens.iter().map(|&token| detokenizer.push(token)).collect();
    text.push_str(&detokenizer.finish());
    ensure("tokenizer", text == SAMPLE && !tokens.is_empty(), || format!("{SAMPLE:?} came back as {text:?}"))?;
    passed("tokenizer round trip");

    let params = GenerationParams { max_tokens: 24, seed: 7, ..GenerationParams::default() };
    let first = generate(model.as_ref(), SAMPLE, &params).await.map_err(engine_error("determinism"))?;
    let second = generate(model.as_ref(), SAMPLE, &params).await.map_err(engine_error("determinism"))?;
    ensure("determinism", first == second, || format!("{first:?} then {second:?}"))?;
    ensure("determinism", !first.tokens.is_empty(), || "no token generated".into())?;
    passed("same seed, same text");

    let short = GenerationParams { max_tokens: 3, ..params.clone() };
    let out = generate(model.as_ref(), SAMPLE, &short).await.map_err(engine_error("max tokens"))?;
    ensure("max tokens", out.tokens.len() <= 3, || format!("{} tokens for max_tokens 3", out.tokens.len()))?;
    ensure("max tokens", out.finish != FinishReason::Length || out.tokens.len() == 3, || format!("{out:?}"))?;
    passed("max tokens honoured");

    stop_sequences(model.as_ref(), &params, &first.text).await?;
    passed("stop sequences honoured");

    let bad = GenerationParams { temperature: f32::NAN, ..params.clone() };
    match Prefill::new(&plan, &tokens, &[], &bad) {
        Err(EngineError::InvalidParams { name: "temperature", .. }) => {}
        Err(error) => return fail("typed errors", format!("a NaN temperature gave {error}")),
        Ok(_) => return fail("typed errors", "a NaN temperature was accepted for a prefill"),
    }
    let full = vec![tokens[0]; plan.max_context_tokens as usize];
    let one = GenerationParams { max_tokens: 1, ..params.clone() };
    match Prefill::new(&plan, &full, &[], &one) {
        Err(EngineError::ContextOverflow { limit, .. }) if limit == plan.max_context_tokens => {}
        Err(error) => return fail("typed errors", format!("a prompt that fills the context gave {error}")),
        Ok(_) => return fail("typed errors", "a prompt with no room for a token was accepted for a prefill"),
    }
    passed("typed errors");

    let pipelined = decode(model.as_ref(), &tokens, &[], &params, true).await?;
    ensure("pipelining", pipelined == first.tokens, || {
        format!("pipelined {pipelined:?}, one stage after the other {:?}", first.tokens)
    })?;
    passed("prepare N+1 during compute N");

    batched(model.as_ref(), &tokens, &params).await?;
    passed("batched steps, each sequence's own tokens");

    let half = first.tokens.len() / 2;
    let resumed = decode(model.as_ref(), &tokens, &first.tokens[..half], &params, false).await?;
    ensure("resume", resumed == first.tokens[half..], || {
        format!("resumed after {half} tokens with {resumed:?}, the run without a break had {:?}", &first.tokens[half..])
    })?;
    passed("resume after a break");

    Ok(report)
}

/// Picks a stop sequence from the middle of a generated text and checks the generation stops right
/// before it.
async fn stop_sequences(model: &dyn LoadedModel, params: &GenerationParams, text: &str) -> Result<(), Failure> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    if chars.len() < 6 {
        return fail("stop sequences", format!("the generated text {text:?} is too short to cut"));
    }
    let (from, to) = (chars[chars.len() / 2].0, chars.get(chars.len() / 2 + 2).map_or(text.len(), |&(at, _)| at));
    let stop = text[from..to].to_owned();
    let expected = &text[..text.find(&stop).expect("cut from the text")];
    let with_stop = GenerationParams { stop: vec![stop.clone()], ..params.clone() };
    let out = generate(model, SAMPLE, &with_stop).await.map_err(engine_error("stop sequences"))?;
    ensure("stop sequences", out.finish == FinishReason::Stop && out.text == expected, || {
        format!("stop {stop:?}: expected {expected:?} and a stop, got {:?} ({:?})", out.text, out.finish)
    })
}

/// Opens three sequences (other seeds, other prompt lengths) and runs them together through
/// [`LoadedModel::compute_pass`], at most [`LoadedModel::max_batch`] sequences and
/// [`LoadedModel::max_pass_tokens`] tokens a pass: where the model prefills in passes, their contexts in
/// chunks of several sizes beside the others' steps. Checks each gets the tokens it gets alone, and
/// that its unfilled count falls by each chunk; the sequences leave the passes as they end.
async fn batched(model: &dyn LoadedModel, tokens: &[TokenId], params: &GenerationParams) -> Result<(), Failure> {
    const CHECK: &str = "batching";
    /// A sequence, its last token, its tokens so far, its next step, its unfilled tokens and those
    /// filled, and whether it ended.
    struct Running {
        sequence: std::sync::Arc<dyn Sequence>,
        previous: Option<TokenId>,
        out: Vec<TokenId>,
        step: u32,
        unfilled: usize,
        filled: usize,
        done: bool,
    }
    let inputs: Vec<(usize, GenerationParams)> = (0..3_u64)
        .map(|index| {
            let prompt = tokens.len() - usize::try_from(index).expect("small") % tokens.len();
            (prompt, GenerationParams { seed: params.seed + index, ..params.clone() })
        })
        .collect();
    let mut alone = Vec::new();
    for (prompt, params) in &inputs {
        alone.push(decode(model, &tokens[..*prompt], &[], params, false).await?);
    }
    let mut sequences: Vec<Running> = Vec::new();
    for (prompt, params) in &inputs {
        let input = Prefill::new(&model.memory_plan(), &tokens[..*prompt], &[], params).map_err(engine_error(CHECK))?;
        let sequence: std::sync::Arc<dyn Sequence> = model.open(input).await.map_err(engine_error(CHECK))?.into();
        let unfilled = sequence.unfilled();
        ensure(CHECK, unfilled < (*prompt).max(1), || format!("{unfilled} unfilled of a prompt of {prompt}"))?;
        let previous = tokens[..*prompt].last().copied();
        sequences.push(Running { sequence, previous, out: Vec::new(), step: 0, unfilled, filled: 0, done: false });
    }
    let (most, budget) = (model.max_batch().max(1), model.max_pass_tokens().max(1));
    for pass in 0.. {
        let (mut fills, mut filling, mut steps, mut stepping) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut used = 0;
        for (index, running) in sequences.iter().enumerate().filter(|(_, running)| !running.done) {
            if fills.len() + steps.len() == most || used == budget {
                break;
            }
            if running.filled < running.unfilled {
                // Chunks of 1 to 5 tokens, changing from pass to pass.
                let chunk = (1 + (index + pass) % 5).min(running.unfilled - running.filled).min(budget - used);
                let sequence = std::sync::Arc::clone(&running.sequence);
                fills.push(Fill { sequence, done: running.filled, tokens: chunk });
                filling.push((index, chunk));
                used += chunk;
            } else {
                let prepared = running.sequence.prepare(running.step).await.map_err(engine_error(CHECK))?;
                let sequence = std::sync::Arc::clone(&running.sequence);
                steps.push(BatchStep { sequence, prepared, previous: running.previous });
                stepping.push(index);
                used += 1;
            }
        }
        if stepping.is_empty() && filling.is_empty() {
            break;
        }
        let (filled, results) = model.compute_pass(fills, steps).await;
        ensure(CHECK, results.len() == stepping.len() && filled.len() == filling.len(), || {
            format!(
                "{} and {} results for {} steps and {} fills",
                results.len(),
                filled.len(),
                stepping.len(),
                filling.len()
            )
        })?;
        for (&(index, chunk), result) in filling.iter().zip(filled) {
            result.map_err(engine_error(CHECK))?;
            let running = &mut sequences[index];
            running.filled += chunk;
            let left = running.sequence.unfilled();
            ensure(CHECK, left == running.unfilled - running.filled, || {
                format!("{left} unfilled after {} of {}", running.filled, running.unfilled)
            })?;
        }
        for (&index, result) in stepping.iter().zip(results) {
            let token = result.map_err(engine_error(CHECK))?;
            let running = &mut sequences[index];
            running.step += 1;
            if token.end_of_sequence {
                running.done = true;
            } else {
                running.out.push(token.id);
                running.previous = Some(token.id);
                running.done = running.step == params.max_tokens;
            }
        }
    }
    for (running, alone) in sequences.iter().zip(&alone) {
        ensure(CHECK, &running.out == alone, || format!("batched {:?}, alone {alone:?}", running.out))?;
    }
    Ok(())
}

/// Decodes the steps after `generated` up to `max_tokens` (or an end of sequence), one stage after the
/// other or, `pipelined`, with the prepare stage of each next step running during the compute stage of
/// the current one, as the executor does. Returns the tokens after `generated`.
async fn decode(
    model: &dyn LoadedModel,
    prompt: &[TokenId],
    generated: &[TokenId],
    params: &GenerationParams,
    pipelined: bool,
) -> Result<Vec<TokenId>, Failure> {
    let check = if pipelined { "pipelining" } else { "resume" };
    // A resume asks for what is left (see `LoadedModel::prefill`); the steps still count from the start.
    let left = params.max_tokens - u32::try_from(generated.len()).expect("fewer than max_tokens");
    let resume = GenerationParams { max_tokens: left, ..params.clone() };
    let input = Prefill::new(&model.memory_plan(), prompt, generated, &resume).map_err(engine_error(check))?;
    let sequence = model.prefill(input).await.map_err(engine_error(check))?;
    let mut tokens = Vec::new();
    let mut previous = generated.last().or(prompt.last()).copied();
    let first = u32::try_from(generated.len()).expect("fewer than max_tokens");
    let mut prepared = sequence.prepare(first).await.map_err(engine_error(check))?;
    for step in first..params.max_tokens {
        let last = step + 1 == params.max_tokens;
        let (token, next) = if pipelined && !last {
            let (token, next) = tokio::join!(sequence.compute(prepared, previous), sequence.prepare(step + 1));
            (token, Some(next))
        } else {
            (sequence.compute(prepared, previous).await, None)
        };
        let token = token.map_err(engine_error(check))?;
        if token.end_of_sequence {
            break;
        }
        tokens.push(token.id);
        previous = Some(token.id);
        if last {
            break;
        }
        prepared = match next {
            Some(next) => next.map_err(engine_error(check))?,
            None => sequence.prepare(step + 1).await.map_err(engine_error(check))?,
        };
    }
    Ok(tokens)
}
