//! Integration tests of the simulated WebLLM-like engine: the conformance kit, the profiles' exact
//! virtual timings, memory plans from shapes, jitter, text, and fault injection.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use usine_engine::{
    Engine, EngineError, FinishReason, GenerationParams, LoadedModel, ModelSpec, NoProgress, Progress, conformance,
    generate,
};
use usine_engine_sim::{Faults, SimConfig};
use usine_engine_webllm::webllm;

fn web(config: SimConfig) -> usine_engine_sim::SimEngine {
    webllm(config).unwrap()
}

fn spec(profile: &str) -> ModelSpec {
    ModelSpec::new("llama", "webllm", profile)
}

async fn loaded(config: SimConfig, spec: &ModelSpec) -> Arc<dyn LoadedModel> {
    let engine = web(config);
    let graph = engine.compile(spec, &NoProgress).await.unwrap();
    engine.load(&graph).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn both_profiles_and_both_quantizations_pass_the_conformance_kit() {
    for spec in [spec("tiny"), spec("7b"), spec("7b").quantization("q5")] {
        conformance::check(&web(SimConfig::default()), &spec)
            .await
            .unwrap_or_else(|failure| panic!("{spec:?}: {failure}"));
    }
    let jittery = SimConfig { jitter: 0.1, seed: 9, ..Default::default() };
    conformance::check(&web(jittery), &spec("tiny")).await.unwrap_or_else(|failure| panic!("{failure}"));
}

#[tokio::test(start_paused = true)]
async fn the_7b_compile_takes_4_s_in_named_stages_with_progress() {
    let seen = Mutex::new(Vec::new());
    let start = Instant::now();
    let record = |progress: Progress| seen.lock().unwrap().push((start.elapsed(), progress));
    let graph = web(SimConfig::default()).compile(&spec("7b"), &record).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(4));
    let seen = seen.into_inner().unwrap();
    let timeline: Vec<(u128, &str, f64, u128)> =
        seen.iter().map(|(at, p)| (at.as_millis(), p.stage.as_str(), p.fraction, p.eta.unwrap().as_millis())).collect();
    assert_eq!(
        timeline,
        [
            (0, "fetching weights", 0.0, 4000),
            (1200, "compiling shaders", 0.3, 2800),
            (3200, "building pipelines", 0.8, 800),
            (3800, "writing cache", 0.95, 200),
            (4000, "done", 1.0, 0),
        ]
    );
    assert_eq!(graph.bytes.len(), 4 << 20, "a graph of a realistic size");
    assert_eq!(graph.metadata["profile"], "7b");
}

#[tokio::test(start_paused = true)]
async fn the_7b_loads_in_150_ms_and_decodes_at_28_tokens_a_second() {
    let engine = web(SimConfig::default());
    let graph = engine.compile(&spec("7b"), &NoProgress).await.unwrap();
    let start = Instant::now();
    let model = engine.load(&graph).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(150));

    // The first generation pays 800 ms that warming removes; prefill costs 1.5 ms a prompt token.
    let prompt = model.tokenize("The kernel keeps the right models resident and loads them");
    assert_eq!(prompt.len(), 10);
    let params = GenerationParams { max_tokens: 10, ..Default::default() };
    let start = Instant::now();
    let sequence = usine_engine::prefill(model.as_ref(), &prompt, &[], &params).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(800 + 15));
    let start = Instant::now();
    usine_engine::prefill(model.as_ref(), &prompt, &[], &params).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(15), "no penalty the second time");

    // One step: 2 ms of CPU preparation, then 36 ms on the device.
    let start = Instant::now();
    let prepared = sequence.prepare(0).await.unwrap();
    sequence.compute(prepared, prompt.last().copied()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(2 + 36));
    // Pipelined: the preparation of the next step hides under the device's work.
    let prepared = sequence.prepare(1).await.unwrap();
    let start = Instant::now();
    let (token, next) = tokio::join!(sequence.compute(prepared, None), sequence.prepare(2));
    assert_eq!(start.elapsed(), Duration::from_millis(36));
    assert!(token.is_ok() && next.is_ok());
}

#[tokio::test(start_paused = true)]
async fn warming_up_removes_the_first_generation_penalty() {
    let model = loaded(SimConfig::default(), &spec("7b")).await;
    let start = Instant::now();
    model.warm_up().await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(800));
    let start = Instant::now();
    usine_engine::prefill(model.as_ref(), &model.tokenize("The kernel"), &[], &GenerationParams::default())
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(3));
    let start = Instant::now();
    model.warm_up().await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO, "once is enough");
}

#[tokio::test(start_paused = true)]
async fn memory_plans_come_from_the_shape_and_q5_is_bigger_and_slower() {
    let q4 = loaded(SimConfig::default(), &spec("7b")).await;
    let q5 = loaded(SimConfig::default(), &spec("7b").quantization("q5")).await;
    let plan = q4.memory_plan();
    assert_eq!(plan.weights_bytes, 6_740_000_000 * 45 / 80); // 4.5 bits a weight
    assert_eq!(plan.kv_bytes_per_token, 2 * 32 * 32 * 128 * 2); // K and V, 32 layers, 32 heads of 128, f16
    assert_eq!(plan.activation_bytes_per_step, (4 * 4096 + 32_000) * 4);
    assert_eq!(plan.max_context_tokens, 4096);
    assert_eq!(q5.memory_plan().weights_bytes, 6_740_000_000 * 55 / 80);
    assert_eq!(q5.memory_plan().kv_bytes_per_token, plan.kv_bytes_per_token);

    let params = GenerationParams { max_tokens: 1, ..Default::default() };
    let mut step = Vec::new();
    for model in [&q4, &q5] {
        model.warm_up().await.unwrap();
        let sequence = usine_engine::prefill(model.as_ref(), &[], &[], &params).await.unwrap();
        let prepared = sequence.prepare(0).await.unwrap();
        let start = Instant::now();
        sequence.compute(prepared, None).await.unwrap();
        step.push(start.elapsed());
    }
    assert_eq!(step, [Duration::from_millis(36), Duration::from_millis(41)]); // 36 ms x 1.15, to the millisecond
}

#[tokio::test(start_paused = true)]
async fn jitter_is_seeded_and_bounded() {
    let compile_time = |seed: u64| async move {
        let start = Instant::now();
        web(SimConfig { jitter: 0.1, seed, ..Default::default() }).compile(&spec("7b"), &NoProgress).await.unwrap();
        start.elapsed()
    };
    let (a, b, c) = (compile_time(1).await, compile_time(1).await, compile_time(2).await);
    assert_eq!(a, b, "the same seed, the same timeline");
    assert_ne!(a, c);
    for took in [a, c] {
        assert!(took >= Duration::from_millis(3600) && took <= Duration::from_millis(4400), "{took:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_text_is_readable_and_sometimes_ends_on_its_own() {
    let model = loaded(SimConfig::default(), &spec("tiny")).await;
    let mut ended = 0;
    for seed in 0..20 {
        let params = GenerationParams { max_tokens: 60, seed, ..Default::default() };
        let out = generate(model.as_ref(), "What does the kernel do?", &params).await.unwrap();
        assert!(out.text.split_whitespace().count() >= 2, "{out:?}");
        assert!(out.text.chars().all(|c| c.is_ascii_alphanumeric() || " .".contains(c)), "{:?}", out.text);
        if out.finish == FinishReason::EndOfSequence {
            ended += 1;
        }
    }
    assert!((1..20).contains(&ended), "{ended} of 20 ended on their own");
}

#[tokio::test(start_paused = true)]
async fn faults_are_injected_where_asked() {
    let failing = web(SimConfig { faults: Faults { compile_fails: true, ..Default::default() }, ..Default::default() });
    let start = Instant::now();
    let err = failing.compile(&spec("7b"), &NoProgress).await.unwrap_err();
    assert_eq!(err, EngineError::Fatal { message: "injected: compile failed in `fetching weights`".into() });
    assert_eq!(start.elapsed(), Duration::from_millis(1200));

    let engine = web(SimConfig::default());
    let graph = engine.compile(&spec("tiny"), &NoProgress).await.unwrap();
    let oom =
        web(SimConfig { faults: Faults { load_out_of_memory: true, ..Default::default() }, ..Default::default() });
    assert!(matches!(oom.load(&graph).await.err().unwrap(), EngineError::OutOfMemory { .. }));

    let faults = Faults {
        transient_at: Some((2, 2)),
        fatal_at: Some(5),
        stall_at: Some((3, Duration::from_secs(2))),
        ..Default::default()
    };
    let model = loaded(SimConfig { faults, ..Default::default() }, &spec("tiny")).await;
    let sequence = usine_engine::prefill(model.as_ref(), &[], &[], &GenerationParams::default()).await.unwrap();
    let mut outcomes = Vec::new();
    for step in [0, 1, 2, 2, 2, 3, 4, 5] {
        let prepared = sequence.prepare(step).await.unwrap();
        let start = Instant::now();
        let result = sequence.compute(prepared, None).await;
        outcomes.push((step, result.map_err(|error| error.kind()).map(|_| ()), start.elapsed().as_millis()));
    }
    use usine_engine::ErrorKind::{Fatal, Transient};
    assert_eq!(
        outcomes,
        [
            (0, Ok(()), 2),
            (1, Ok(()), 2),
            (2, Err(Transient), 2),
            (2, Err(Transient), 2),
            (2, Ok(()), 2),
            (3, Ok(()), 2002),
            (4, Ok(()), 2),
            (5, Err(Fatal), 2),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_graph_with_damaged_bytes_is_refused() {
    let engine = web(SimConfig::default());
    let mut graph = engine.compile(&spec("tiny"), &NoProgress).await.unwrap();
    let middle = graph.bytes.len() / 2;
    graph.bytes[middle] ^= 1;
    assert_eq!(
        engine.load(&graph).await.err().unwrap(),
        EngineError::CorruptGraph { message: "checksum mismatch".into() }
    );
}

#[tokio::test(start_paused = true)]
async fn sequences_of_one_model_take_turns_on_its_device() {
    let model = loaded(SimConfig::default(), &spec("7b")).await;
    model.warm_up().await.unwrap();
    let params = GenerationParams::default();
    let (a, b) = (
        usine_engine::prefill(model.as_ref(), &[], &[], &params).await.unwrap(),
        usine_engine::prefill(model.as_ref(), &[], &[], &params).await.unwrap(),
    );
    let (pa, pb) = (a.prepare(0).await.unwrap(), b.prepare(0).await.unwrap());
    let start = Instant::now();
    let (ta, tb) = tokio::join!(a.compute(pa, None), b.compute(pb, None));
    assert!(ta.is_ok() && tb.is_ok());
    assert_eq!(start.elapsed(), Duration::from_millis(2 * 36), "one GPU: one step after the other");
}

#[tokio::test(start_paused = true)]
async fn a_graph_of_schema_1_is_upgraded_with_its_memory_plan_and_loads() {
    let engine = web(SimConfig::default());
    let graph = engine.compile(&spec("7b").quantization("q5"), &NoProgress).await.unwrap();
    let plan = engine.memory_plan(&graph).unwrap();
    // As schema 1 stored it: no plan in the metadata, which this version refuses.
    let mut old = graph.clone();
    old.schema = 1;
    old.metadata.retain(|key, _| ["profile", "quantization", "source"].contains(&key.as_str()));
    assert!(matches!(engine.load(&old).await, Err(EngineError::GraphMismatch { .. })));
    let upgraded = usine_engine_webllm::flavor().upgrade_graph(old);
    assert_eq!(upgraded, graph, "the upgrade gives what a compile of this version gives");
    assert_eq!(engine.memory_plan(&upgraded).unwrap(), plan);
    engine.load(&upgraded).await.unwrap();
    // A graph whose plan is gone is corrupt (compiled again by the kernel), not a panic or a guess.
    let mut planless = graph;
    planless.metadata.remove("kv_bytes_per_token");
    let error = engine.memory_plan(&planless).unwrap_err();
    assert_eq!(error.to_string(), engine.load(&planless).await.err().unwrap().to_string());
    assert!(error.to_string().contains("`kv_bytes_per_token` missing"), "{error}");
}

// Would catch: a batched step that costs what its sequences cost one at a time (no batching for the
// applications built on the simulator), or one that ignores the profile's share per sequence.
#[tokio::test(start_paused = true)]
async fn a_batched_step_of_26_sequences_takes_45_ms_where_one_at_a_time_take_936() {
    let model = loaded(SimConfig::default(), &spec("7b")).await;
    model.warm_up().await.unwrap();
    assert_eq!(model.max_batch(), 64);
    let mut steps = Vec::new();
    for seed in 0..26 {
        let params = GenerationParams { max_tokens: 4, seed, ..Default::default() };
        let sequence: Arc<dyn usine_engine::Sequence> =
            usine_engine::prefill(model.as_ref(), &[], &[], &params).await.unwrap().into();
        let prepared = sequence.prepare(0).await.unwrap();
        steps.push(usine_engine::BatchStep { sequence, prepared, previous: None });
    }
    let start = Instant::now();
    let tokens = model.compute_batch(steps).await;
    assert_eq!(start.elapsed(), Duration::from_millis(36 + 25 * 360 / 1000)); // a step, and 1 % of one a sequence more
    assert_eq!(tokens.len(), 26);
    assert!(tokens.iter().all(Result::is_ok));
}
