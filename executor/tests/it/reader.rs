//! A reader that stalls, and one request's share of the kv-cache: a stalled reader is cut at its own
//! limit and everything it held goes back at once; a long `max_tokens` reserves at most its share up
//! front, then grows per token.

use std::time::Duration;

use usine_executor::{Event, ExecutorConfig, ExecutorError, Phase, Request, Timeouts};
use usine_memory::{ACTIVATIONS, KV_CACHE};

use crate::{KV_PER_TOKEN, config, fixture};

// Would catch: a generation blocked on its reader for ever (or until the whole request's limit), holding
// its slot, kv-cache and model, or a cut reader told nothing.
#[tokio::test(start_paused = true)]
async fn a_stalled_reader_is_cut_at_its_limit_and_the_next_request_gets_the_slot_at_once() {
    let timeouts = Timeouts { reader: Some(Duration::from_secs(1)), ..Timeouts::default() };
    let f = fixture(ExecutorConfig { channel_capacity: 2, max_concurrent: 1, timeouts, ..config() });
    let model = f.loaded().await;
    let mut stalled = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(1000)).unwrap();
    let mut next = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(3)).unwrap();
    // The start and the first token (25 ms: prepare 5, compute 20) fill the channel; the second token
    // (45 ms) waits for the reader from then on, for one second.
    let Some(Ok(Event::Started { queued, .. })) = next.next().await else { panic!("the next request starts") };
    assert_eq!(queued, Duration::from_millis(1045));
    assert_eq!(f.used(KV_CACHE), (2 + 3) * KV_PER_TOKEN, "the stalled one's kv-cache is back");
    let output = next.output().await.unwrap();
    assert_eq!(output.usage.generated_tokens, 3);
    let stats = f.executor.stats();
    assert_eq!((stats.timed_out, stats.timeouts_by_phase[4], stats.completed), (1, 1, 1), "{stats:?}");
    assert_eq!((f.used(KV_CACHE), f.used(ACTIVATIONS), model.id()), (0, 0, "lab"));

    // The reader, back, reads what was buffered, then why it was cut.
    assert!(matches!(stalled.next().await, Some(Ok(Event::Started { .. }))));
    assert!(matches!(stalled.next().await, Some(Ok(Event::Token { index: 0, .. }))));
    let error = stalled.next().await.unwrap().unwrap_err();
    assert!(
        matches!(error, ExecutorError::Timeout { phase: Phase::Reader, limit } if limit == Duration::from_secs(1)),
        "{error}"
    );
    assert_eq!(error.to_string(), "wait for the reader exceeded its limit of 1s");
    assert!(stalled.next().await.is_none());
}

// Would catch: the limit applied to a reader that keeps up, however slowly the tokens come.
#[tokio::test(start_paused = true)]
async fn a_reader_that_keeps_reading_is_never_cut() {
    let timeouts = Timeouts { reader: Some(Duration::from_millis(100)), ..Timeouts::default() };
    let f = fixture(ExecutorConfig { channel_capacity: 2, timeouts, ..config() });
    let mut stream = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(20)).unwrap();
    let mut tokens = 0;
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            Event::Token { .. } => tokens += 1,
            Event::Finished(_) => break,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(99)).await; // each wait just under the limit
    }
    assert_eq!((tokens, f.executor.stats().timed_out), (20, 0));
}

// Would catch: one request reserving most of the pool up front (the 2,048 of 2,867 MiB).
#[tokio::test(start_paused = true)]
async fn a_long_request_reserves_its_share_up_front_then_grows_per_token() {
    // A pool of 400 tokens and a share of a quarter: 100 tokens up front.
    let f =
        crate::fixture_with_pools(ExecutorConfig { kv_up_front_share: 0.25, ..config() }, 400 * KV_PER_TOKEN, 1 << 20);
    let mut stream = f.executor.generate(Request::prompt("lab", "Hello").max_tokens(300)).unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Event::Started { .. }))));
    assert_eq!(f.used(KV_CACHE), 100 * KV_PER_TOKEN);
    let output = stream.output().await.unwrap();
    assert_eq!(output.usage.generated_tokens, 300);
    assert_eq!(f.memory.pool_stats(KV_CACHE).unwrap().peak, (5 + 300) * KV_PER_TOKEN);
    assert_eq!(f.used(KV_CACHE), 0);

    // Within the share, everything is reserved up front, as before.
    let mut stream = f.executor.generate(Request::prompt("lab", "Hello").max_tokens(20)).unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Event::Started { .. }))));
    assert_eq!(f.used(KV_CACHE), (5 + 20) * KV_PER_TOKEN);
}

#[test]
fn the_share_is_a_fraction() {
    for share in [-0.1, 1.5, f64::NAN] {
        let error = ExecutorConfig { kv_up_front_share: share, ..ExecutorConfig::default() }.validate().unwrap_err();
        assert_eq!(error.name, "kv_up_front_share");
    }
}
