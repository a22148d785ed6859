//! Integration tests of `usine-kernel`, on paused time, with the zero engine slowed down to a known
//! timeline: the load path and its sources, one load per model, LRU under the weights budget, pins,
//! keep-alive, waiting for room, and the catalog's errors.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use usine_engine::scripted::{Script, ScriptHandle, ScriptedEngine};
use usine_engine::{MemoryPlan, ModelSpec};
use usine_kernel::{
    EvictReason, KeepAlive, KernelConfig, KernelError, KernelEvent, LoadOptions, LoadSource, ProgressEnd,
    RuntimeManager,
};
use usine_memory::MemoryManager;
use usine_storage::{Migrations, StorageConfig, StorageManager};

const COMPILE: Duration = Duration::from_secs(4);
const LOAD: Duration = Duration::from_millis(150);
const WEIGHTS: u64 = 1000;

struct Fixture {
    _dir: tempfile::TempDir,
    kernel: RuntimeManager,
    /// The scripted engine's script: a compile of 4 s, a load of 150 ms, the compiles counted.
    script: ScriptHandle,
    storage: StorageManager,
}

fn fixture(config: KernelConfig, models: &[&str]) -> Fixture {
    fixture_failing(config, models, None)
}

fn fixture_failing(config: KernelConfig, models: &[&str], failing: Option<&'static str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    let kernel = RuntimeManager::new(config, &MemoryManager::default(), storage.clone()).unwrap();
    let plan = MemoryPlan {
        weights_bytes: WEIGHTS,
        kv_bytes_per_token: 0,
        activation_bytes_per_step: 0,
        max_context_tokens: 4096,
    };
    let script = Script { compile: COMPILE, load: LOAD, fail_load: failing.map(str::to_owned), ..Script::default() };
    let engine = ScriptedEngine::with_plan(plan, script);
    let script = engine.script();
    kernel.register_engine(Arc::new(engine));
    for model in models {
        kernel.register_model(ModelSpec::new(*model, "zero", "default"));
    }
    Fixture { _dir: dir, kernel, script, storage }
}

fn config(models_that_fit: u64) -> KernelConfig {
    KernelConfig { weights_capacity: models_that_fit * WEIGHTS, ..KernelConfig::default() }
}

#[tokio::test(start_paused = true)]
async fn compile_once_then_memory_hits_then_disk_after_an_unload() {
    let f = fixture(config(4), &["a"]);
    let start = Instant::now();
    let first = f.kernel.load_model("a").await.unwrap();
    assert_eq!((first.source(), start.elapsed()), (LoadSource::Compile, COMPILE + LOAD));

    let start = Instant::now();
    let again = f.kernel.load_model("a").await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO, "a memory hit");
    drop((first, again));

    assert!(f.kernel.unload("a"));
    let start = Instant::now();
    let from_disk = f.kernel.load_model("a").await.unwrap();
    assert_eq!((from_disk.source(), start.elapsed()), (LoadSource::Disk, LOAD));

    let stats = f.kernel.stats();
    assert_eq!((stats.compiles, stats.disk_hits, stats.memory_hits), (1, 1, 1));
    assert_eq!(stats.load_time[&LoadSource::Compile], COMPILE + LOAD);
    assert_eq!(stats.evictions[&EvictReason::Unloaded], 1);
    assert_eq!(f.script.lock().compiles, 1);
}

#[tokio::test(start_paused = true)]
async fn ten_concurrent_loads_of_one_model_compile_once() {
    let f = fixture(config(4), &["a"]);
    let mut events = f.kernel.subscribe();
    let start = Instant::now();
    let loads: Vec<_> = (0..10)
        .map(|_| {
            let kernel = f.kernel.clone();
            tokio::spawn(async move { kernel.load_model("a").await })
        })
        .collect();
    for load in loads {
        load.await.unwrap().unwrap();
    }
    assert_eq!(start.elapsed(), COMPILE + LOAD);
    assert_eq!(f.script.lock().compiles, 1);
    let mut started = 0;
    while let Some(event) = events.try_next() {
        started += usize::from(matches!(event, KernelEvent::LoadStarted { .. }));
    }
    assert_eq!(started, 1);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_leaves_does_not_stop_the_shared_load() {
    let f = fixture(config(4), &["a"]);
    let leaving = tokio::time::timeout(Duration::from_secs(1), f.kernel.load_model("a")).await;
    assert!(leaving.is_err(), "gave up after a second");
    let start = Instant::now();
    let handle = f.kernel.load_model("a").await.unwrap();
    assert_eq!(start.elapsed(), COMPILE + LOAD - Duration::from_secs(1), "joined the load under way");
    assert_eq!(handle.source(), LoadSource::Compile);
}

#[tokio::test(start_paused = true)]
async fn lru_evicts_the_least_recently_used_idle_model_never_a_pinned_or_busy_one() {
    let f = fixture(config(3), &["a", "b", "c", "d", "e"]);
    for model in ["a", "b", "c"] {
        drop(f.kernel.load_model(model).await.unwrap());
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    drop(f.kernel.load_model("c").await.unwrap()); // a memory hit makes c the most recently used
    tokio::time::advance(Duration::from_secs(1)).await;
    f.kernel.pin("a").unwrap(); // the oldest, but pinned
    let mut events = f.kernel.subscribe();
    drop(f.kernel.load_model("d").await.unwrap()); // b is older than c: b goes
    assert_eq!(evictions(&mut events), [KernelEvent::Evicted { model: "b".into(), reason: EvictReason::Lru }]);
    let busy = f.kernel.load_model("c").await.unwrap(); // in use
    f.kernel.unpin("a");
    drop(f.kernel.load_model("e").await.unwrap()); // a is the oldest idle one now; c is busy
    assert_eq!(evictions(&mut events), [KernelEvent::Evicted { model: "a".into(), reason: EvictReason::Lru }]);
    let loaded: Vec<String> = f.kernel.loaded().into_iter().map(|info| info.id).collect();
    assert_eq!(loaded, ["c", "d", "e"]);
    drop(busy);
}

#[tokio::test(start_paused = true)]
async fn a_limit_of_loaded_models_is_honoured() {
    let f = fixture(KernelConfig { max_loaded: 2, ..config(10) }, &["a", "b", "c"]);
    for model in ["a", "b", "c"] {
        drop(f.kernel.load_model(model).await.unwrap());
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    let loaded: Vec<String> = f.kernel.loaded().into_iter().map(|info| info.id).collect();
    assert_eq!(loaded, ["b", "c"]);
    assert_eq!(f.kernel.stats().evictions[&EvictReason::MaxLoaded], 1);
}

#[tokio::test(start_paused = true)]
async fn idle_models_leave_after_their_keep_alive() {
    let f = fixture(config(4), &["a", "b", "c"]);
    drop(f.kernel.load_model("a").await.unwrap()); // default: 5 minutes
    let idle_since = Instant::now();
    let options = |keep_alive| LoadOptions { keep_alive: Some(keep_alive), ..LoadOptions::default() };
    drop(f.kernel.load_with("b", options(KeepAlive::Forever)).await.unwrap());
    let c = f.kernel.load_with("c", options(KeepAlive::UnloadNow)).await.unwrap();
    assert_eq!(f.kernel.loaded().len(), 3);
    drop(c);
    tokio::task::yield_now().await;
    let loaded: Vec<String> = f.kernel.loaded().into_iter().map(|info| info.id).collect();
    assert_eq!(loaded, ["a", "b"], "unload now");

    let a = f.kernel.loaded().into_iter().find(|info| info.id == "a").unwrap();
    assert_eq!(a.expires_in, Some(Duration::from_secs(300) - (Instant::now() - idle_since)));
    tokio::time::sleep_until(idle_since + Duration::from_secs(300) - Duration::from_millis(1)).await;
    assert_eq!(f.kernel.loaded().len(), 2);
    let mut events = f.kernel.subscribe();
    tokio::time::sleep(Duration::from_millis(1)).await;
    tokio::task::yield_now().await;
    assert_eq!(evictions(&mut events), [KernelEvent::Evicted { model: "a".into(), reason: EvictReason::KeepAlive }]);
    let loaded: Vec<String> = f.kernel.loaded().into_iter().map(|info| info.id).collect();
    assert_eq!(loaded, ["b"], "kept forever");
}

#[tokio::test(start_paused = true)]
async fn a_load_without_room_waits_for_it_then_fails_with_the_figures() {
    let f = fixture(KernelConfig { load_timeout: Duration::from_secs(2), ..config(1) }, &["a", "b"]);
    f.kernel.pin("a").unwrap();
    let a = f.kernel.load_model("a").await.unwrap();
    drop(f.kernel.load_model("b").await.err()); // compiles b's graph, then waits 2 s for room
    let start = Instant::now();
    let err = f.kernel.load_model("b").await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2), "the graph is on disk now: only the wait");
    let KernelError::OutOfMemory { needed, free, waited, holders, .. } = &err else { panic!("{err}") };
    assert_eq!((*needed, *free, *waited), (WEIGHTS, 0, Duration::from_secs(2)));
    assert_eq!(holders[0].model, "a");
    assert_eq!(holders[0].why, "pinned");
    assert_eq!(
        err.to_string(),
        "model `b` needs 1000 bytes of weights; 0 free after 2s, held by `a` (1000 bytes, pinned)"
    );

    // Room comes back during the wait: the load goes on at that moment.
    let kernel = f.kernel.clone();
    let waiting = tokio::spawn(async move { kernel.load_model("b").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.kernel.unpin("a");
    let start = Instant::now();
    drop(a);
    let b = waiting.await.unwrap().unwrap();
    assert_eq!(start.elapsed(), LOAD);
    assert_eq!(b.source(), LoadSource::Disk);
}

#[tokio::test(start_paused = true)]
async fn unknown_models_and_engines_list_what_is_known() {
    let f = fixture(config(1), &["a"]);
    f.kernel.register_model(ModelSpec::new("orphan", "webllm", "7b"));
    let err = f.kernel.load_model("nope").await.unwrap_err();
    assert_eq!(err.to_string(), "unknown model `nope` (known: a, orphan)");
    let err = f.kernel.load_model("orphan").await.unwrap_err();
    assert_eq!(err.to_string(), "model `orphan` needs engine `webllm`, which is not registered (registered: zero)");
    assert!(f.kernel.pin("nope").is_err());
}

#[tokio::test(start_paused = true)]
async fn a_damaged_stored_graph_means_compile_again() {
    let f = fixture(config(2), &["a"]);
    drop(f.kernel.load_model("a").await.unwrap());
    assert!(f.kernel.unload("a"));
    for entry in f.storage.list().unwrap() {
        std::fs::write(f.storage.graphs_dir().join(&entry.file_name), b"garbage").unwrap();
    }
    let start = Instant::now();
    let handle = f.kernel.load_model("a").await.unwrap();
    assert_eq!((handle.source(), start.elapsed()), (LoadSource::Compile, COMPILE + LOAD));
    assert_eq!(f.script.lock().compiles, 2);
}

/// The evictions among the events received so far.
fn evictions(events: &mut usine_kernel::KernelEvents) -> Vec<KernelEvent> {
    let mut seen = Vec::new();
    while let Some(event) = events.try_next() {
        if matches!(event, KernelEvent::Evicted { .. }) {
            seen.push(event);
        }
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn a_user_load_is_as_fast_with_twenty_warm_ups_queued_as_with_none() {
    let models: Vec<String> = (0..21).map(|i| format!("m{i}")).collect();
    let names: Vec<&str> = models.iter().map(String::as_str).collect();
    let f = fixture(KernelConfig { load_slots: 1, max_loaded: 30, ..config(30) }, &names);
    let mut events = f.kernel.subscribe();
    f.kernel.warm_up(&names[1..]).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await; // the first warm-up is compiling
    assert_eq!(f.kernel.warm_queue().len(), 19);

    let start = Instant::now();
    let user = f.kernel.load_model("m0").await.unwrap();
    assert_eq!(start.elapsed(), COMPILE + LOAD, "as with an empty queue");
    assert_eq!(user.source(), LoadSource::Compile);
    let mut preempted = Vec::new();
    while let Some(event) = events.try_next() {
        if let KernelEvent::WarmupPreempted { model } = event {
            preempted.push(model);
        }
    }
    assert_eq!(preempted, ["m1"]);
    // Put back at the front of the queue, m1 took the slot again as soon as the user's load ended.
    assert_eq!(f.kernel.warm_queue().len(), 19);
    assert_eq!(f.kernel.warm_queue()[0], "m2");

    // Then the warm-ups go on, one at a time, and all of them end up loaded.
    tokio::time::sleep((COMPILE + LOAD) * 20 + Duration::from_secs(1)).await;
    assert!(f.kernel.warm_queue().is_empty());
    assert_eq!(f.kernel.loaded().len(), 21);
}

#[tokio::test(start_paused = true)]
async fn a_user_load_of_a_warming_model_takes_over_its_load_and_a_queued_one_leaves_the_queue() {
    let f = fixture(KernelConfig { load_slots: 1, ..config(4) }, &["a", "b"]);
    f.kernel.warm_up(&["a", "b"]).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let a = f.kernel.load_model("a").await.unwrap();
    assert_eq!(start.elapsed(), COMPILE + LOAD - Duration::from_secs(1), "joined the warm-up under way");
    drop(a);
    assert!(f.kernel.warm_queue().is_empty(), "b left the queue for the free slot");
    let start = Instant::now();
    let b = f.kernel.load_model("b").await.unwrap();
    assert_eq!(start.elapsed(), COMPILE + LOAD, "joined b's warm-up, which had just started");
    assert_eq!((b.source(), f.script.lock().compiles), (LoadSource::Compile, 2));
}

#[tokio::test(start_paused = true)]
async fn uses_are_counted_across_runs_to_warm_the_most_used_first() {
    let f = fixture(config(4), &["a", "b", "c"]);
    for (model, uses) in [("a", 1), ("b", 3), ("c", 2)] {
        for _ in 0..uses {
            drop(f.kernel.load_model(model).await.unwrap());
        }
    }
    f.kernel.save_usage().await.unwrap();
    assert_eq!(f.kernel.most_used(2), [("b".to_owned(), 3), ("c".to_owned(), 2)]);

    // The next run reads the counts from the cache folder.
    let next = RuntimeManager::new(config(4), &MemoryManager::default(), f.storage.clone()).unwrap();
    assert_eq!(next.most_used(3), [("b".to_owned(), 3), ("c".to_owned(), 2), ("a".to_owned(), 1)]);
}

#[tokio::test(start_paused = true)]
async fn cleanup_drops_the_graphs_of_older_engine_versions() {
    let f = fixture(config(4), &["a"]);
    drop(f.kernel.load_model("a").await.unwrap());
    let old = usine_storage::GraphKey::new("a", "zero", "0.0.1").device("default");
    f.storage.save(&old, &"an old graph").unwrap();
    let other = usine_storage::GraphKey::new("a", "webllm", "0.0.1");
    f.storage.save(&other, &"another engine's graph").unwrap();
    let report = f.kernel.cleanup_graphs().await.unwrap();
    assert_eq!(report.done.len(), 1);
    assert_eq!(report.done[0].0, old);
    assert_eq!(f.storage.list().unwrap().len(), 2, "the current graph and the other engine's stay");
}

#[tokio::test(start_paused = true)]
async fn loads_and_evictions_reach_the_metrics_facade_described() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let f = metrics::with_local_recorder(&recorder, || fixture(config(1), &["a", "b"]));
    drop(f.kernel.load_model("a").await.unwrap());
    drop(f.kernel.load_model("a").await.unwrap());
    drop(f.kernel.load_model("b").await.unwrap()); // evicts a
    let seen = usine_engine::scripted::metrics_snapshot(&recorder);
    let value = |name: &str| seen.get(name).map(|(value, description)| (value, description.is_some()));
    assert_eq!(value("usine_kernel_loads_total{source=compile}"), Some((&DebugValue::Counter(2), true)));
    assert_eq!(value("usine_kernel_loads_total{source=memory}"), Some((&DebugValue::Counter(1), true)));
    assert_eq!(value("usine_kernel_evictions_total{reason=lru}"), Some((&DebugValue::Counter(1), true)));
    let Some((DebugValue::Histogram(compiles), true)) = value("usine_kernel_load_duration_seconds{source=compile}")
    else {
        panic!("no compile durations")
    };
    let seconds: Vec<f64> = compiles.iter().map(|value| value.into_inner()).collect();
    assert_eq!(seconds, [(COMPILE + LOAD).as_secs_f64(); 2]);
}

#[tokio::test(start_paused = true)]
async fn room_freed_by_a_failed_load_wakes_the_loads_waiting_for_it() {
    let f = fixture_failing(config(1), &["a", "b"], Some("a"));
    drop(f.kernel.load_model("b").await.unwrap()); // b's graph is stored
    assert!(f.kernel.unload("b"));
    let kernel = f.kernel.clone();
    let failing = tokio::spawn(async move { kernel.load_model("a").await });
    tokio::time::sleep(COMPILE + Duration::from_millis(50)).await; // a holds the room, its load fails at 150 ms
    let start = Instant::now();
    let b = f.kernel.load_model("b").await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100) + LOAD, "woken when a's room came back");
    assert_eq!(b.source(), LoadSource::Disk);
    assert!(failing.await.unwrap().is_err());
}

#[tokio::test(start_paused = true)]
async fn the_progress_of_a_failing_load_ends_with_it() {
    let f = fixture_failing(config(1), &["a"], Some("a"));
    let mut progress = f.kernel.progress("a").unwrap();
    let kernel = f.kernel.clone();
    let load = tokio::spawn(async move { kernel.load_model("a").await });
    let mut reports = 0;
    while progress.next().await.is_some() {
        reports += 1;
    }
    assert_eq!((reports, progress.ended()), (2, Some(ProgressEnd::Failed)));
    assert!(load.await.unwrap().is_err());
}

#[tokio::test(start_paused = true)]
async fn one_load_s_progress_can_be_followed_to_the_end() {
    let f = fixture(config(2), &["a", "b"]);
    let mut progress = f.kernel.progress("a").unwrap();
    let kernel = f.kernel.clone();
    let other = tokio::spawn(async move { kernel.load_model("b").await });
    let kernel = f.kernel.clone();
    let load = tokio::spawn(async move { kernel.load_model("a").await });
    let mut fractions = Vec::new();
    while let Some(report) = progress.next().await {
        fractions.push(report.fraction);
    }
    assert_eq!(fractions, [0.0, 1.0], "a's reports only, then the end");
    assert_eq!(progress.ended(), Some(ProgressEnd::Loaded));
    assert!(load.await.unwrap().is_ok() && other.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn the_progress_of_a_pre_empted_warm_up_ends_and_says_so() {
    // One slot and room for one model, held by b: a's warm-up could not start again for the whole load
    // timeout, so a stream that waited for its end would wait as long.
    let f = fixture(KernelConfig { load_slots: 1, ..config(1) }, &["a", "b"]);
    f.kernel.warm_up(&["a"]).unwrap();
    let mut progress = f.kernel.progress("a").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kernel = f.kernel.clone();
    let user = tokio::spawn(async move { kernel.load_model("b").await });
    let start = Instant::now();
    assert_eq!(progress.next().await, None);
    assert_eq!((progress.ended(), start.elapsed()), (Some(ProgressEnd::Preempted), Duration::ZERO));
    assert_eq!(progress.next().await, None, "ended for good");
    drop(user.await.unwrap().unwrap());
}

#[tokio::test(start_paused = true)]
async fn progress_streams_are_capped_and_a_dropped_one_gives_its_place_back() {
    let f = fixture(KernelConfig { max_progress_streams: 2, ..config(1) }, &["a"]);
    let first = f.kernel.progress("a").unwrap();
    let _second = f.kernel.progress("a").unwrap();
    let error = f.kernel.progress("a").unwrap_err();
    assert_eq!(error.to_string(), "2 progress streams are open, the limit (`max_progress_streams`)");
    drop(first);
    f.kernel.progress("a").unwrap();
}

/// Would catch: a fleet's tier that is down failing a load, or being asked again at once. Nothing
/// listens at its address: the load compiles as it would without a tier, the tier counts one error and
/// steps aside for its cool-down, so the next load of another model does not call it.
#[cfg(feature = "remote")]
#[tokio::test(start_paused = true)]
async fn a_remote_tier_that_is_down_never_fails_a_load() {
    use usine_storage::remote::{RemoteConfig, RemoteTier};
    let f = fixture(config(4), &["a", "b"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tier = RemoteTier::new(RemoteConfig::new(format!("redis://127.0.0.1:{port}"))).unwrap();
    assert!(f.kernel.share_through(tier.clone()));
    assert!(!f.kernel.share_through(tier.clone()), "a tier is set once");
    assert_eq!(f.kernel.load_model("a").await.unwrap().source(), LoadSource::Compile);
    assert_eq!(tier.stats().errors, 1);
    assert!(tier.cooling_down().is_some());
    assert_eq!(f.kernel.load_model("b").await.unwrap().source(), LoadSource::Compile);
    let stats = tier.stats();
    assert_eq!((stats.errors, stats.hits, stats.published), (1, 0, 0));
    assert!(stats.skipped >= 1, "{stats:?}");
    assert_eq!(f.script.lock().compiles, 2);
}
