//! Migrations of payload schemas, one step at a time (N → N+1 → ...), registered by the payload's owner.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;

type Step = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Send + Sync>;

/// The registry of schema migrations, per engine.
///
/// Each step turns a payload of schema `from` into one of schema `from + 1`. On a miss for schema
/// N, the store looks for the same graph at an older schema that a chain of steps can bring to N, and
/// upgrades it; [`StorageManager::migrate`](crate::StorageManager::migrate) upgrades every old file at once.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use usine_storage::Migrations;
///
/// #[derive(Serialize, Deserialize)]
/// struct V1 { layers: u32 }
/// #[derive(Serialize, Deserialize)]
/// struct V2 { layers: u32, heads: u32 }
///
/// let mut migrations = Migrations::new();
/// migrations.register("webllm", 1, |old: V1| V2 { layers: old.layers, heads: 8 });
/// assert_eq!(migrations.latest("webllm"), Some(2));
/// ```
#[derive(Default)]
pub struct Migrations {
    steps: BTreeMap<(String, u32), Step>,
}

impl Migrations {
    /// No migrations.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the step from schema `from` to `from + 1` of `engine`'s graphs; a second step for the
    /// same schema replaces the first.
    pub fn register<Old, New>(
        &mut self,
        engine: &str,
        from: u32,
        step: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> &mut Self
    where
        Old: DeserializeOwned,
        New: Serialize,
    {
        let step = move |payload: &[u8]| -> Result<Vec<u8>, String> {
            let old: Old = codec::decode(payload)?;
            codec::encode(&step(old)).map_err(|error| error.to_string())
        };
        self.steps.insert((engine.to_owned(), from), Box::new(step));
        self
    }

    /// The newest schema a step of `engine` reaches, if it has any.
    pub fn latest(&self, engine: &str) -> Option<u32> {
        self.steps.range((engine.to_owned(), 0)..=(engine.to_owned(), u32::MAX)).map(|((_, from), _)| from + 1).max()
    }

    /// The schemas below `to` that a chain of steps brings to `to`, newest first.
    pub(crate) fn sources(&self, engine: &str, to: u32) -> Vec<u32> {
        let mut sources = Vec::new();
        let mut schema = to;
        while schema > 0 && self.steps.contains_key(&(engine.to_owned(), schema - 1)) {
            schema -= 1;
            sources.push(schema);
        }
        sources
    }

    /// Runs the steps from `from` up to `to` on an encoded payload.
    pub(crate) fn run(&self, engine: &str, from: u32, to: u32, payload: &[u8]) -> Result<Vec<u8>, String> {
        let mut current = payload.to_vec();
        for schema in from..to {
            let step =
                self.steps.get(&(engine.to_owned(), schema)).ok_or_else(|| format!("no step from schema {schema}"))?;
            current = step(&current).map_err(|error| format!("step {schema} -> {}: {error}", schema + 1))?;
        }
        Ok(current)
    }
}

impl fmt::Debug for Migrations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.steps.keys()).finish()
    }
}
