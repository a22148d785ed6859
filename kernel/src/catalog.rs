//! The engines the kernel knows by name and the models it knows by id.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;
use usine_engine::{Engine, ModelSpec};

use crate::error::KernelError;

#[derive(Default)]
pub(crate) struct Catalog {
    engines: RwLock<BTreeMap<String, Arc<dyn Engine>>>,
    models: RwLock<BTreeMap<String, ModelSpec>>,
}

impl Catalog {
    pub(crate) fn register_engine(&self, engine: Arc<dyn Engine>) {
        self.engines.write().insert(engine.descriptor().name.clone(), engine);
    }

    pub(crate) fn register_model(&self, spec: ModelSpec) {
        self.models.write().insert(spec.id.clone(), spec);
    }

    pub(crate) fn spec(&self, model: &str) -> Result<ModelSpec, KernelError> {
        let models = self.models.read();
        models.get(model).cloned().ok_or_else(|| KernelError::UnknownModel {
            model: model.to_owned(),
            known: models.keys().cloned().collect(),
        })
    }

    pub(crate) fn engine_for(&self, model: &str) -> Result<Arc<dyn Engine>, KernelError> {
        let spec = self.spec(model)?;
        let engines = self.engines.read();
        engines.get(&spec.engine).cloned().ok_or_else(|| KernelError::UnknownEngine {
            model: model.to_owned(),
            engine: spec.engine.clone(),
            known: engines.keys().cloned().collect(),
        })
    }

    /// What each registered engine writes now: the graphs a cleanup keeps.
    pub(crate) fn current_engines(&self) -> Vec<usine_storage::CurrentEngine> {
        self.engines
            .read()
            .values()
            .map(|engine| {
                let descriptor = engine.descriptor();
                usine_storage::CurrentEngine {
                    engine: descriptor.name.clone(),
                    version: descriptor.version.clone(),
                    schema: descriptor.graph_schema,
                }
            })
            .collect()
    }
}
