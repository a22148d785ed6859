//! Cancellation and backpressure: a dropped stream stops its generation within one step and returns
//! every lease; a reader that does not read stops the generation instead of filling memory.

use std::time::Duration;

use usine_executor::{Event, ExecutorConfig, Request};
use usine_memory::{ACTIVATIONS, KV_CACHE};

use crate::{AHEAD, COMPUTE, config, fixture};

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_stops_within_one_step_and_returns_every_lease() {
    let f = fixture(config());
    let _model = f.loaded().await;
    let mut stream = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(100)).unwrap();
    for _ in 0..11 {
        stream.next().await.unwrap().unwrap(); // the start and ten tokens
    }
    assert!(f.used(KV_CACHE) > 0 && f.used(ACTIVATIONS) > 0);
    drop(stream);
    tokio::task::yield_now().await; // the aborted task is dropped when next polled
    assert_eq!((f.used(ACTIVATIONS), f.used(KV_CACHE)), (0, 0));
    let computes = f.script.lock().computes;
    tokio::time::sleep(COMPUTE * 10).await;
    assert_eq!(f.script.lock().computes, computes, "no step after the drop");
    assert!(computes <= 12, "{computes} computes for 10 tokens read (the channel holds a few more)");
    let stats = f.executor.stats();
    assert_eq!((stats.cancelled, stats.running), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn random_cancellations_leave_every_pool_at_zero() {
    let f = fixture(ExecutorConfig { max_concurrent: 8, queue_capacity: 400, ..config() });
    let _model = f.loaded().await;
    let mut rng = fastrand::Rng::with_seed(42);
    let mut readers = Vec::new();
    for n in 0..300 {
        let stream = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(rng.u32(1..40))).unwrap();
        let read = rng.usize(0..45); // events to read before dropping (more than there are: read to the end)
        let pause = Duration::from_millis(rng.u64(0..30));
        readers.push(tokio::spawn(async move {
            let mut stream = stream;
            for _ in 0..read {
                if stream.next().await.is_none() {
                    break;
                }
            }
            if n % 3 == 0 {
                tokio::time::sleep(pause).await; // hold it unread for a while: backpressure, then the drop
            }
        }));
    }
    for reader in readers {
        reader.await.unwrap();
    }
    tokio::task::yield_now().await;
    assert_eq!((f.used(ACTIVATIONS), f.used(KV_CACHE)), (0, 0));
    let stats = f.executor.stats();
    assert_eq!((stats.running, stats.queued), (0, 0));
    assert_eq!(stats.completed + stats.cancelled, 300);
    assert!(stats.cancelled > 100 && stats.completed > 10, "{stats:?}");
    let pools = f.memory.stats();
    assert_eq!(pools.pool(KV_CACHE).unwrap().active_leases, 0);
    assert_eq!(pools.pool(ACTIVATIONS).unwrap().active_leases, 0);
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_does_not_read_stops_the_generation_at_the_channel_capacity() {
    let f = fixture(ExecutorConfig { channel_capacity: 4, ..config() });
    let _model = f.loaded().await;
    let mut stream = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(1000)).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await; // long enough for 500 tokens
    // The start and three tokens fill the channel; the fourth token waits to be sent, and the step
    // prepared ahead gave its activations back meanwhile (where it batches, that step was computed).
    assert_eq!(f.script.lock().computes, 4 + AHEAD);
    assert_eq!(f.used(ACTIVATIONS), 0);
    for expected in 0..10 {
        let event = stream.next().await.unwrap().unwrap();
        if expected > 0 {
            assert!(matches!(event, Event::Token { index, .. } if index == expected - 1), "{event:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_stops_reading_ends_at_the_total_limit_and_frees_everything() {
    let limit = Duration::from_secs(1);
    let timeouts = usine_executor::Timeouts { total: Some(limit), ..usine_executor::Timeouts::default() };
    let f = fixture(ExecutorConfig { channel_capacity: 2, timeouts, ..config() });
    let _model = f.loaded().await;
    let mut stream = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(1000)).unwrap();
    tokio::time::sleep(limit).await;
    tokio::task::yield_now().await;
    assert_eq!((f.used(ACTIVATIONS), f.used(KV_CACHE)), (0, 0));
    let stats = f.executor.stats();
    assert_eq!((stats.running, stats.timed_out), (0, 1));
    let mut last = None;
    while let Some(event) = stream.next().await {
        last = Some(event);
    }
    assert!(matches!(last, Some(Err(usine_executor::ExecutorError::Timeout { .. }))), "{last:?}");
}

#[tokio::test(start_paused = true)]
async fn a_generation_waiting_for_its_reader_keeps_its_memory_from_the_gc() {
    let f = fixture(ExecutorConfig { channel_capacity: 2, ..config() });
    let gc_pool = usine_memory::PoolConfig::new(1 << 20, 1024).idle_timeout(Some(Duration::from_secs(2)));
    f.memory.create_pool("kv-gc", gc_pool).unwrap();
    let _gc = f.memory.start_gc().unwrap();
    let executor =
        usine_executor::TaskExecutor::new(ExecutorConfig { kv_pool: "kv-gc".into(), ..config() }, &f.kernel, &f.memory)
            .unwrap();
    let _model = f.loaded().await;
    let mut stream = executor.generate(Request::prompt("lab", "Hi").max_tokens(20)).unwrap();
    stream.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await; // five idle timeouts without reading
    let output = stream.output().await.unwrap();
    assert_eq!(output.usage.generated_tokens, 20);
    assert_eq!(f.memory.pool_stats("kv-gc").unwrap().reclaimed, 0);
}

#[tokio::test(start_paused = true)]
async fn an_engine_that_panics_ends_the_stream_with_an_error_counted_as_a_failure() {
    let f = fixture(config());
    f.script.lock().panic_at = Some(3);
    let _model = f.loaded().await;
    let error = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(10)).unwrap().output().await.unwrap_err();
    assert!(matches!(error, usine_executor::ExecutorError::Aborted), "{error}");
    tokio::task::yield_now().await;
    assert_eq!((f.used(ACTIVATIONS), f.used(KV_CACHE)), (0, 0));
    let stats = f.executor.stats();
    assert_eq!((stats.failed, stats.cancelled, stats.running), (1, 0, 0));
}
