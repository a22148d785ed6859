//! The table against a model of it: after any sequence of reservations and loads, handles taken and
//! dropped, pins, unloads and evictions, the table holds the models the model says, with their handles
//! and pins; the weights pool's bytes are the loaded models' weights; no more than `max_loaded` are
//! loaded; eviction takes the least recently used idle, unpinned model; and a reservation succeeds or
//! fails (too many, out of memory, too large) as the model says.

#![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use usine_engine::{ByteDetokenizer, Detokenizer, EngineError, LoadedModel, MemoryPlan, Prefill, Sequence, TokenId};
use usine_memory::{MemoryManager, PoolConfig};

use super::*;

const CAPACITY: u64 = 100;
const MAX_LOADED: usize = 3;
const MODELS: usize = 5;

struct Nothing;

#[async_trait]
impl LoadedModel for Nothing {
    fn memory_plan(&self) -> MemoryPlan {
        plan(0)
    }

    fn tokenize(&self, text: &str) -> Vec<TokenId> {
        text.bytes().map(TokenId::from).collect()
    }

    fn detokenizer(&self) -> Box<dyn Detokenizer> {
        Box::new(ByteDetokenizer::default())
    }

    async fn prefill(&self, _: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        Err(EngineError::Fatal { message: "a table test's model does not run".into() })
    }
}

fn plan(weights_bytes: u64) -> MemoryPlan {
    MemoryPlan { weights_bytes, kv_bytes_per_token: 0, activation_bytes_per_step: 0, max_context_tokens: 1 }
}

#[derive(Debug, Clone)]
enum Op {
    /// Reserve `bytes` for model `m` (no wait), and load it into the table if that works.
    Load(usize, u64),
    /// Take a handle on model `m` (if loaded).
    Take(usize),
    /// Drop the `i`th handle held (modulo their count).
    Drop(usize),
    Pin(usize),
    Unpin(usize),
    Unload(usize),
    Evict,
}

fn op() -> impl Strategy<Value = Op> {
    let model = 0..MODELS;
    prop_oneof![
        3 => (model.clone(), 1..=CAPACITY + 10).prop_map(|(m, bytes)| Op::Load(m, bytes)),
        2 => model.clone().prop_map(Op::Take),
        2 => (0..8_usize).prop_map(Op::Drop),
        1 => model.clone().prop_map(Op::Pin),
        1 => model.clone().prop_map(Op::Unpin),
        1 => model.prop_map(Op::Unload),
        1 => Just(Op::Evict),
    ]
}

/// What the table should hold: per model, its bytes, live handles and last use (a tick); the pins.
#[derive(Default)]
struct Model {
    loaded: BTreeMap<String, (u64, usize, u64)>,
    pinned: std::collections::BTreeSet<String>,
    tick: u64,
}

impl Model {
    fn used(&self) -> u64 {
        self.loaded.values().map(|(bytes, _, _)| bytes).sum()
    }

    fn lru(&self) -> Option<String> {
        self.loaded
            .iter()
            .filter(|(id, (_, handles, _))| *handles == 0 && !self.pinned.contains(*id))
            .min_by_key(|(_, (_, _, last))| *last)
            .map(|(id, _)| id.clone())
    }

    /// What a reservation of `bytes` does: evicts as the table would; `Err` names the refusal.
    fn reserve(&mut self, bytes: u64) -> Result<(), &'static str> {
        loop {
            if self.loaded.len() >= MAX_LOADED {
                let victim = self.lru().ok_or("too many")?;
                self.loaded.remove(&victim);
            } else if bytes > CAPACITY {
                return Err("too large");
            } else if self.used() + bytes > CAPACITY {
                let victim = self.lru().ok_or("out of memory")?;
                self.loaded.remove(&victim);
            } else {
                return Ok(());
            }
        }
    }
}

fn name(m: usize) -> String {
    format!("m{m}")
}

fn run(ops: Vec<Op>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    runtime.block_on(async {
        let memory = MemoryManager::default();
        let pool = memory.create_pool("weights", PoolConfig::new(CAPACITY, 1).idle_timeout(None)).unwrap();
        let table = Table::new(MAX_LOADED, pool.clone(), Arc::new(Telemetry::new()));
        let mut model = Model::default();
        let mut handles: Vec<(String, ModelHandle)> = Vec::new();
        for op in ops {
            tokio::time::advance(Duration::from_millis(1)).await; // every use at its own instant
            model.tick += 1;
            let tick = model.tick;
            match op.clone() {
                Op::Load(m, bytes) => {
                    if table.contains(&name(m)) {
                        continue;
                    }
                    let expected = model.reserve(bytes);
                    let reserved = table.reserve(&name(m), bytes, Duration::ZERO, || false).await;
                    match (&expected, reserved) {
                        (Ok(()), Ok(reservation)) => {
                            let (entry, pending) = entry(
                                name(m),
                                Arc::new(Nothing),
                                plan(bytes),
                                (LoadSource::Compile, Duration::ZERO),
                                KeepAlive::Forever,
                                reservation,
                            );
                            handles.push((name(m), table.insert(entry, pending).unwrap()));
                            model.loaded.insert(name(m), (bytes, 1, tick));
                        }
                        (Err("too many"), Err(KernelError::TooManyLoaded { .. }))
                        | (Err("out of memory"), Err(KernelError::OutOfMemory { .. }))
                        | (Err("too large"), Err(KernelError::TooLarge { .. })) => {}
                        (expected, got) => {
                            panic!("{op:?}: the model says {expected:?}, the table {:?}", got.err())
                        }
                    }
                }
                Op::Take(m) => {
                    let handle = table.handle(&name(m), None);
                    assert_eq!(handle.is_some(), model.loaded.contains_key(&name(m)), "{op:?}");
                    if let Some(handle) = handle {
                        let state = model.loaded.get_mut(&name(m)).unwrap();
                        (state.1, state.2) = (state.1 + 1, tick);
                        handles.push((name(m), handle));
                    }
                }
                Op::Drop(i) => {
                    if !handles.is_empty() {
                        let (id, handle) = handles.remove(i % handles.len());
                        drop(handle);
                        let state = model.loaded.get_mut(&id).unwrap();
                        (state.1, state.2) = (state.1 - 1, tick);
                    }
                }
                Op::Pin(m) => {
                    table.pin(&name(m));
                    model.pinned.insert(name(m));
                }
                Op::Unpin(m) => {
                    table.unpin(&name(m));
                    model.pinned.remove(&name(m));
                }
                Op::Unload(m) => {
                    let idle = model.loaded.get(&name(m)).is_some_and(|(_, handles, _)| *handles == 0)
                        && !model.pinned.contains(&name(m));
                    assert_eq!(table.unload_if(&name(m), EvictReason::Unloaded, |_| true), idle, "{op:?}");
                    if idle {
                        model.loaded.remove(&name(m));
                    }
                }
                Op::Evict => {
                    let victim = model.lru();
                    assert_eq!(table.evict_one(EvictReason::Lru), victim.is_some(), "{op:?}");
                    if let Some(victim) = victim {
                        model.loaded.remove(&victim);
                    }
                }
            }
            let infos = table.infos();
            let held: BTreeMap<String, (u64, usize, bool)> =
                infos.iter().map(|info| (info.id.clone(), (info.weights_bytes, info.handles, info.pinned))).collect();
            let expected: BTreeMap<String, (u64, usize, bool)> = model
                .loaded
                .iter()
                .map(|(id, (bytes, handles, _))| (id.clone(), (*bytes, *handles, model.pinned.contains(id))))
                .collect();
            assert_eq!(held, expected, "after {op:?}");
            assert_eq!(pool.stats().used, model.used(), "after {op:?}: the pool's bytes are the loaded weights");
            assert!(infos.len() <= MAX_LOADED);
            assert_eq!(table.pending.load(Ordering::SeqCst), 0, "no reservation outlives its load");
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_table_holds_what_its_model_says(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
