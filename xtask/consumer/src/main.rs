//! A user of usine-memory and usine-storage, from their READMEs: a kv-cache that grows a token at a
//! time under a budget, and a compiled graph stored once and read back.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use usine_memory::{ACTIVATIONS, KV_CACHE, MemoryManager, ScopeId, StandardPools};
use usine_storage::{GraphKey, Lookup, Migrations, StorageConfig, StorageManager};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Compiled {
    kernels: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(64 << 20)?)?;
    let request = ScopeId::fresh();
    let mut kv = memory.allocate(KV_CACHE, 0, request)?;
    for _token in 0..8 {
        kv.try_grow(4096)?;
        let _step = memory.allocate_wait(ACTIVATIONS, 1 << 16, request, Duration::from_millis(100)).await?;
    }
    assert_eq!(kv.len(), 8 * 4096);
    drop(kv);
    assert_eq!(memory.stats().used(), 0, "every byte back once the leases are gone");

    let dir = tempfile::tempdir()?;
    let store = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new())?;
    let key = GraphKey::new("tiny", "consumer", "1").device("cpu");
    assert!(matches!(store.get::<Compiled>(&key)?, Lookup::Miss(_)));
    store.save(&key, &Compiled { kernels: vec!["matmul".into()] })?;
    let graph = store.get::<Compiled>(&key)?.hit().ok_or("the graph saved just above")?;
    assert_eq!(graph.kernels, ["matmul"]);
    println!("usine-memory and usine-storage work as their READMEs say");
    Ok(())
}
