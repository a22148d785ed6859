//! The zero-cost engine: does no work at all, instantly. For tests of the layers above, and as the floor
//! against which usine's own overhead is measured.

use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::{Detokenizer, Engine, LoadedModel, Prefill, Prepared, Sequence, check_graph, check_spec};
use crate::error::EngineError;
use crate::text::ByteDetokenizer;
use crate::types::{
    CompiledGraph, Device, EngineDescriptor, MemoryPlan, ModelSpec, Progress, ProgressSink, RawSection, Token, TokenId,
};

/// The text the zero engine "generates", from an offset the seed picks.
const TEXT: &[u8] = b"the zero engine does no work at all, so that what you measure is usine itself. ";

/// An engine that compiles, loads and decodes without doing anything: byte tokens, a fixed text, no
/// delay. Its memory plan is whatever it is given (default: nothing at all, a 4096-token context).
///
/// ```
/// use usine_engine::{Engine, GenerationParams, ModelSpec, NoProgress, ZeroEngine, generate};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), usine_engine::EngineError> {
/// let engine = ZeroEngine::new();
/// let graph = engine.compile(&ModelSpec::new("any", "zero", "default"), &NoProgress).await?;
/// let model = engine.load(&graph).await?;
/// let params = GenerationParams { max_tokens: 8, ..Default::default() };
/// let out = generate(model.as_ref(), "Hello", &params).await?;
/// assert_eq!(out.text, "the zero");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ZeroEngine {
    descriptor: EngineDescriptor,
    plan: MemoryPlan,
}

impl Default for ZeroEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl ZeroEngine {
    /// The engine's name.
    pub const NAME: &'static str = "zero";
    /// The token that ends a sequence (the zero engine never produces it).
    pub const END_OF_SEQUENCE: TokenId = 256;

    /// A zero engine whose models need no memory.
    pub fn new() -> Self {
        Self::with_plan(MemoryPlan {
            weights_bytes: 0,
            kv_bytes_per_token: 0,
            activation_bytes_per_step: 0,
            max_context_tokens: 4096,
        })
    }

    /// A zero engine whose models declare `plan`, to exercise the memory accounting above it.
    pub fn with_plan(plan: MemoryPlan) -> Self {
        Self {
            descriptor: EngineDescriptor {
                name: Self::NAME.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                graph_schema: 1,
                device: Device::Cpu,
                quantizations: vec!["none".into()],
                profiles: vec!["default".into()],
            },
            plan,
        }
    }
}

#[async_trait]
impl Engine for ZeroEngine {
    fn descriptor(&self) -> &EngineDescriptor {
        &self.descriptor
    }

    async fn compile(&self, spec: &ModelSpec, progress: &dyn ProgressSink) -> Result<CompiledGraph, EngineError> {
        check_spec(&self.descriptor, spec)?;
        progress.report(Progress { stage: "nothing to do".into(), fraction: 0.0, eta: None });
        progress.report(Progress { stage: "done".into(), fraction: 1.0, eta: None });
        Ok(CompiledGraph {
            engine: self.descriptor.name.clone(),
            engine_version: self.descriptor.version.clone(),
            schema: self.descriptor.graph_schema,
            spec: spec.clone(),
            metadata: Default::default(),
            bytes: b"zero".to_vec(),
            raw: RawSection::default(),
        })
    }

    fn memory_plan(&self, graph: &CompiledGraph) -> Result<MemoryPlan, EngineError> {
        check_graph(&self.descriptor, graph)?;
        Ok(self.plan)
    }

    async fn load(&self, graph: &CompiledGraph) -> Result<Arc<dyn LoadedModel>, EngineError> {
        check_graph(&self.descriptor, graph)?;
        if graph.bytes != b"zero" {
            return Err(EngineError::CorruptGraph { message: format!("{} unexpected bytes", graph.bytes.len()) });
        }
        Ok(Arc::new(ZeroModel { plan: self.plan }))
    }
}

struct ZeroModel {
    plan: MemoryPlan,
}

#[async_trait]
impl LoadedModel for ZeroModel {
    fn memory_plan(&self) -> MemoryPlan {
        self.plan
    }

    fn tokenize(&self, text: &str) -> Vec<TokenId> {
        text.bytes().map(TokenId::from).collect()
    }

    fn detokenizer(&self) -> Box<dyn Detokenizer> {
        Box::new(ByteDetokenizer::default())
    }

    async fn prefill(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        let start = usize::try_from(input.params().seed % TEXT.len() as u64).expect("below the text's length");
        Ok(Box::new(ZeroSequence { start }))
    }
}

struct ZeroSequence {
    start: usize,
}

#[async_trait]
impl Sequence for ZeroSequence {
    async fn prepare(&self, step: u32) -> Result<Prepared, EngineError> {
        Ok(Prepared::new(step, ()))
    }

    async fn compute(&self, prepared: Prepared, _previous: Option<TokenId>) -> Result<Token, EngineError> {
        let at = (self.start + prepared.step() as usize) % TEXT.len();
        Ok(Token { id: TokenId::from(TEXT[at]), end_of_sequence: false })
    }
}
