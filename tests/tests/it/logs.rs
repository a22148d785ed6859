//! The libraries' `tracing` events, read through a real subscriber: loads, compiles and evictions at
//! `info`, admission at `debug`, retries and quarantine at `warn`, the GC's revocations, the store's
//! eviction and its sweep at open.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use usine_engine::ModelSpec;
use usine_engine_sim::{Faults, SimConfig};
use usine_executor::{ExecutorConfig, Request};
use usine_kernel::{KernelConfig, RuntimeManager};
use usine_memory::{KV_CACHE, MemoryManager, ScopeId, StandardPools};
use usine_storage::{GraphKey, Migrations, StorageConfig, StorageManager};

/// The lines the fmt subscriber writes (plain, without time), kept in memory.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures the events of this thread, `debug` and above, until the guard is dropped.
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        // A callsite caches whether any subscriber wants it: hit first by a test on a thread without
        // one, it was cached as wanted by none, and this thread's subscriber missed its events (1 run
        // in 8 here). A process-wide subscriber that wants everything (and writes it nowhere) keeps
        // every callsite asking the thread's own subscriber at each event.
        static EVERYTHING: std::sync::Once = std::sync::Once::new();
        EVERYTHING.call_once(|| {
            let nowhere = tracing_subscriber::fmt().with_writer(std::io::sink).with_max_level(tracing::Level::TRACE);
            tracing::subscriber::set_global_default(nowhere.finish())
                .expect("the one global subscriber of this process");
        });
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    /// The lines holding every one of `parts`, `count` of them.
    fn lines(&self, parts: &[&str], count: usize) -> Vec<String> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<String> =
            text.lines().filter(|line| parts.iter().all(|part| line.contains(part))).map(str::to_owned).collect();
        assert_eq!(lines.len(), count, "lines with {parts:?} in:\n{text}");
        lines
    }

    /// The one line holding every one of `parts`.
    fn line(&self, parts: &[&str]) -> String {
        self.lines(parts, 1).remove(0)
    }
}

// On a current-thread runtime, so that the tasks' events reach this thread's subscriber.
#[tokio::test(start_paused = true)]
async fn a_generation_logs_its_admission_load_retry_and_the_eviction_it_causes() {
    let (logs, _guard) = Logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(1 << 30).unwrap()).unwrap();
    let kernel =
        RuntimeManager::new(KernelConfig { max_loaded: 1, ..KernelConfig::default() }, &memory, storage).unwrap();
    let faults = Faults { transient_at: Some((2, 1)), ..Faults::default() };
    kernel
        .register_engine(Arc::new(usine_engine_webllm::webllm(SimConfig { faults, ..SimConfig::default() }).unwrap()));
    for id in ["a", "b"] {
        kernel.register_model(ModelSpec::new(id, "webllm", "tiny"));
    }
    let executor = usine_executor::TaskExecutor::new(ExecutorConfig::default(), &kernel, &memory).unwrap();
    for id in ["a", "b"] {
        executor.generate(Request::prompt(id, "Hi").max_tokens(5)).unwrap().output().await.unwrap();
    }

    logs.lines(&["DEBUG usine_executor", "admitted requests=1 queued=0"], 2);
    logs.line(&[" INFO load{model=\"a\"}: usine_kernel", "compiling model=\"a\""]);
    logs.line(&[" INFO load{model=\"a\"}: usine_kernel", "loaded model=\"a\" source=\"compile\" seconds="]);
    let retry = logs.line(&["transient engine failure; retrying"]);
    assert!(retry.starts_with(" WARN generation{model=\"a\" request=0}: usine_executor"), "{retry}");
    assert!(retry.contains("model=\"a\" retry=1 backoff_seconds="), "{retry}");
    // The first model leaves for the second: under the second's load, a span of its own (a load is shared
    // by its callers, no one's child).
    logs.line(&[" INFO load{model=\"b\"}: usine_kernel", "evicted model=\"a\" reason=\"max_loaded\""]);

    let lease = memory.allocate(KV_CACHE, 4096, ScopeId::fresh()).unwrap();
    tokio::time::advance(Duration::from_secs(31)).await;
    memory.gc_now();
    logs.line(&[" INFO usine_memory", "idle leases revoked pool=\"kv-cache\" leases=1 bytes="]);
    drop(lease);
}

#[test]
fn the_store_logs_quarantine_eviction_and_what_it_sweeps_at_open() {
    let (logs, _guard) = Logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let store = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    let key = |model: &str| GraphKey::new(model, "webllm", "0.2.79").device("cpu");
    let saved = store.save(&key("old"), &vec![1_u8; 64]).unwrap();
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&saved.path).unwrap().set_modified(an_hour_ago).unwrap();
    store.save(&key("new"), &vec![2_u8; 64]).unwrap();

    let path = store.path_of(&key("new"));
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();
    assert!(store.get::<Vec<u8>>(&key("new")).unwrap().hit().is_none());
    logs.line(&[" WARN usine_storage", "damaged graph quarantined", "reason=\"checksum\""]);

    // A writer that died mid-save leaves its temporary file, unlocked: the next open sweeps it.
    let mut leftover = std::fs::File::create(store.graphs_dir().join(".tmp-dead-writer")).unwrap();
    leftover.write_all(b"half a graph").unwrap();
    drop((leftover, store));
    let store = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    logs.line(&[" INFO usine_storage", "store opened; leftovers removed", "swept=1"]);

    store.save(&key("new"), &vec![2_u8; 64]).unwrap();
    let limited = StorageConfig::at(dir.path()).max_bytes(Some(saved.bytes));
    StorageManager::open(limited, Migrations::new()).unwrap().enforce_limit().unwrap();
    logs.line(&[" INFO usine_storage", "graph evicted: the store is over its limit", "model=\"old\""]);
}
