//! Cancellation and backpressure: a dropped stream stops its generation within one step and returns
//! every lease; a reader that does not read stops the generation instead of filling memory.

use std::time::Duration;

use usine_executor::{Event, ExecutorConfig, Request};
use usine_memory::{ACTIVATIONS, KV_CACHE};

use crate::{COMPUTE, config, fixture};

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
    // The start and three tokens fill the channel; the fourth token waits to be sent, the fifth is
    // prepared ahead.
    assert_eq!(f.script.lock().computes, 4);
    assert_eq!(f.used(ACTIVATIONS), crate::ACTIVATIONS_PER_STEP);
    for expected in 0..10 {
        let event = stream.next().await.unwrap().unwrap();
        if expected > 0 {
            assert!(matches!(event, Event::Token { index, .. } if index == expected - 1), "{event:?}");
        }
    }
}
