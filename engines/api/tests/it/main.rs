//! Integration tests of `usine-engine`: the zero engine against the conformance kit, the reference
//! driver, the parameters' limits and the errors' classes.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

use usine_engine::{
    Engine, EngineError, ErrorKind, FinishReason, GenerationParams, MemoryPlan, ModelSpec, NoProgress, ZeroEngine,
    conformance, generate,
};

fn spec() -> ModelSpec {
    ModelSpec::new("any", "zero", "default")
}

#[tokio::test]
async fn the_zero_engine_passes_the_conformance_kit() {
    let report = conformance::check(&ZeroEngine::new(), &spec()).await.unwrap_or_else(|failure| panic!("{failure}"));
    assert_eq!(
        report.checks,
        [
            "descriptor",
            "progress",
            "graph round trip",
            "foreign graph refused",
            "memory plan, before and after the load",
            "tokenizer round trip",
            "same seed, same text",
            "max tokens honoured",
            "stop sequences honoured",
            "typed errors",
            "prepare N+1 during compute N",
            "batched steps, each sequence's own tokens",
            "resume after a break",
        ]
    );
}

#[tokio::test]
async fn the_kit_catches_an_engine_that_breaks_the_contract() {
    // A memory plan whose full-context kv-cache overflows is not consistent.
    let broken = ZeroEngine::with_plan(MemoryPlan {
        weights_bytes: 1,
        kv_bytes_per_token: u64::MAX,
        activation_bytes_per_step: 1,
        max_context_tokens: 4096,
    });
    let failure = conformance::check(&broken, &spec()).await.unwrap_err();
    assert_eq!(failure.check, "memory plan");
    // A spec the engine does not know stops the kit at once.
    let failure = conformance::check(&ZeroEngine::new(), &ModelSpec::new("any", "zero", "7b")).await.unwrap_err();
    assert_eq!(failure.check, "descriptor");
}

#[tokio::test]
async fn the_reference_driver_honours_limits_and_stops() {
    let engine = ZeroEngine::new();
    let model = engine.load(&engine.compile(&spec(), &NoProgress).await.unwrap()).await.unwrap();
    let params = GenerationParams { max_tokens: 15, ..Default::default() };
    let out = generate(model.as_ref(), "prompt", &params).await.unwrap();
    assert_eq!((out.text.as_str(), out.finish, out.prompt_tokens), ("the zero engine", FinishReason::Length, 6));

    let stopped = GenerationParams { stop: vec![" eng".into()], ..params.clone() };
    let out = generate(model.as_ref(), "prompt", &stopped).await.unwrap();
    assert_eq!((out.text.as_str(), out.finish), ("the zero", FinishReason::Stop));

    let seeded = GenerationParams { seed: 4, max_tokens: 4, ..params.clone() };
    assert_eq!(generate(model.as_ref(), "", &seeded).await.unwrap().text, "zero");

    let overflow = GenerationParams { max_tokens: 4096, ..params };
    let err = generate(model.as_ref(), "prompt", &overflow).await.unwrap_err();
    assert_eq!(err, EngineError::ContextOverflow { prompt: 6, max_tokens: 4096, limit: 4096 });
    assert_eq!(
        err.to_string(),
        "the prompt's 6 tokens and max_tokens 4096 exceed the context of 4096 tokens; max_tokens 4090 would fit"
    );
    let full = GenerationParams { max_tokens: 1, ..overflow };
    let long = "x".repeat(4096);
    let err = generate(model.as_ref(), &long, &full).await.unwrap_err();
    assert!(err.to_string().ends_with("exceed the context of 4096 tokens; the prompt alone fills it"), "{err}");
}

#[test]
fn every_parameter_has_a_limit_that_its_error_names() {
    let cases = [
        (
            GenerationParams { max_tokens: 0, ..Default::default() },
            "generation parameter `max_tokens` is 0, outside 1..=1048576",
        ),
        (
            GenerationParams { temperature: 2.5, ..Default::default() },
            "generation parameter `temperature` is 2.5, outside 0..=2",
        ),
        (
            GenerationParams { temperature: f32::NAN, ..Default::default() },
            "generation parameter `temperature` is NaN, outside 0..=2",
        ),
        (GenerationParams { top_p: 0.0, ..Default::default() }, "generation parameter `top_p` is 0, outside (0, 1]"),
        (
            GenerationParams { stop: vec![String::new()], ..Default::default() },
            "generation parameter `stop` is a sequence of 0 bytes, outside 1..=256 bytes each",
        ),
        (
            GenerationParams { stop: vec!["x".into(); 17], ..Default::default() },
            "generation parameter `stop` is 17 sequences, outside at most 16 sequences",
        ),
    ];
    for (params, message) in cases {
        let err = params.validate().unwrap_err();
        assert_eq!(err.to_string(), message);
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
    assert!(GenerationParams::default().validate().is_ok());
}

#[test]
fn errors_say_whether_a_retry_is_worth_it() {
    assert!(EngineError::Transient { message: "device lost".into() }.is_transient());
    assert_eq!(EngineError::Fatal { message: "bad weights".into() }.kind(), ErrorKind::Fatal);
    assert_eq!(EngineError::OutOfMemory { needed: 2, available: 1 }.kind(), ErrorKind::OutOfMemory);
    assert_eq!(EngineError::Cancelled.kind(), ErrorKind::Cancelled);
    // Either way the graph cannot be used: compile again.
    assert_eq!(EngineError::CorruptGraph { message: String::new() }.kind(), ErrorKind::UnusableGraph);
    let mismatch = EngineError::GraphMismatch { found: "a".into(), expected: "b".into() };
    assert_eq!(mismatch.kind(), ErrorKind::UnusableGraph);
    assert!(!EngineError::Cancelled.is_transient());
}

#[tokio::test]
async fn unknown_profiles_and_foreign_graphs_are_typed_errors() {
    let engine = ZeroEngine::new();
    let err = engine.compile(&ModelSpec::new("m", "zero", "7b"), &NoProgress).await.unwrap_err();
    assert_eq!(err.to_string(), "engine `zero` has no profile `7b` (it has: default)");
    let err = engine.compile(&spec().quantization("q4"), &NoProgress).await.unwrap_err();
    assert_eq!(err.to_string(), "engine `zero` has no quantization `q4` (it has: none)");

    let mut graph = engine.compile(&spec(), &NoProgress).await.unwrap();
    graph.schema = 2;
    let err = engine.load(&graph).await.err().unwrap();
    assert_eq!(err.to_string(), "graph compiled by zero 0.1.0 (schema 2) cannot be loaded by zero 0.1.0 (schema 1)");
    graph.schema = 1;
    graph.bytes = b"torn".to_vec();
    assert!(matches!(engine.load(&graph).await.err().unwrap(), EngineError::CorruptGraph { .. }));
}

/// An engine that breaks one rule of the contract, around the zero engine.
struct Broken {
    inner: ZeroEngine,
    progress_backwards: bool,
    nondeterministic: bool,
}

#[async_trait::async_trait]
impl Engine for Broken {
    fn descriptor(&self) -> &usine_engine::EngineDescriptor {
        self.inner.descriptor()
    }

    fn memory_plan(&self, graph: &usine_engine::CompiledGraph) -> Result<MemoryPlan, EngineError> {
        self.inner.memory_plan(graph)
    }

    async fn compile(
        &self,
        spec: &ModelSpec,
        progress: &dyn usine_engine::ProgressSink,
    ) -> Result<usine_engine::CompiledGraph, EngineError> {
        if self.progress_backwards {
            for fraction in [0.0, 0.6, 0.3, 1.0] {
                progress.report(usine_engine::Progress { stage: "step".into(), fraction, eta: None });
            }
            return self.inner.compile(spec, &NoProgress).await;
        }
        self.inner.compile(spec, progress).await
    }

    async fn load(
        &self,
        graph: &usine_engine::CompiledGraph,
    ) -> Result<std::sync::Arc<dyn usine_engine::LoadedModel>, EngineError> {
        let model = self.inner.load(graph).await?;
        if self.nondeterministic {
            return Ok(std::sync::Arc::new(Forgetful { inner: model, runs: std::sync::atomic::AtomicU64::new(0) }));
        }
        Ok(model)
    }
}

/// A model that ignores the seed: every run starts somewhere else.
struct Forgetful {
    inner: std::sync::Arc<dyn usine_engine::LoadedModel>,
    runs: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl usine_engine::LoadedModel for Forgetful {
    fn memory_plan(&self) -> MemoryPlan {
        self.inner.memory_plan()
    }

    fn tokenize(&self, text: &str) -> Vec<usine_engine::TokenId> {
        self.inner.tokenize(text)
    }

    fn detokenizer(&self) -> Box<dyn usine_engine::Detokenizer> {
        self.inner.detokenizer()
    }

    async fn prefill(&self, input: usine_engine::Prefill<'_>) -> Result<Box<dyn usine_engine::Sequence>, EngineError> {
        let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let params = GenerationParams { seed: input.params().seed + run, ..input.params().clone() };
        let plan = self.inner.memory_plan();
        self.inner.prefill(usine_engine::Prefill::new(&plan, input.prompt(), input.generated(), &params)?).await
    }
}

#[tokio::test]
async fn the_kit_catches_progress_going_backwards_and_text_that_ignores_the_seed() {
    let backwards = Broken { inner: ZeroEngine::new(), progress_backwards: true, nondeterministic: false };
    let failure = conformance::check(&backwards, &spec()).await.unwrap_err();
    assert_eq!(failure.check, "progress");
    assert!(failure.detail.contains("went backwards"), "{failure}");

    let forgetful = Broken { inner: ZeroEngine::new(), progress_backwards: false, nondeterministic: true };
    let failure = conformance::check(&forgetful, &spec()).await.unwrap_err();
    assert_eq!(failure.check, "determinism");
}
