//! What only a model that batches shows: several generations advance in one pass a step, join and
//! leave between passes, and share a pass by priority without starving anyone.

use std::time::Duration;

use tokio::time::Instant;
use usine_executor::{ExecutorConfig, Priority, Request};
use usine_memory::{ACTIVATIONS, KV_CACHE};

use crate::{COMPUTE, PREPARE, config, fixture};

/// A pass of `sequences`: the compute, and 1 ms for each sequence after the first (the lab's script).
fn pass(sequences: u32) -> Duration {
    COMPUTE + Duration::from_millis(1) * (sequences - 1)
}

// Would catch: generations of one model stepped each on its own (eighty passes where ten do), a batch
// that mixes up whose token is whose, or one that changes any generation's text.
#[tokio::test(start_paused = true)]
async fn eight_generations_advance_in_one_pass_a_step_each_with_its_own_tokens() {
    let f = fixture(ExecutorConfig { max_concurrent: 8, ..config() });
    let model = f.loaded().await;
    let prompts: Vec<String> = (0..8).map(|length| "Hi".repeat(length + 1)).collect();
    let mut alone = Vec::new();
    for prompt in &prompts {
        let params = usine_engine::GenerationParams { max_tokens: 10, ..Default::default() };
        alone.push(usine_engine::generate(model.model().as_ref(), prompt, &params).await.unwrap().tokens);
    }
    let start = Instant::now();
    let streams: Vec<_> = prompts
        .iter()
        .map(|prompt| f.executor.generate(Request::prompt("lab", prompt).max_tokens(10)).unwrap())
        .collect();
    for (stream, alone) in streams.into_iter().zip(&alone) {
        assert_eq!(&stream.output().await.unwrap().tokens, alone);
    }
    // The steps of all eight prepared together, then ten passes of eight, each preparing the next.
    assert_eq!(start.elapsed(), PREPARE + 10 * pass(8)); // 275 ms, where one at a time would take 2,005 ms
    let stats = f.executor.stats();
    assert_eq!((stats.batches, stats.batched_steps), (10, 80));
    assert_eq!((f.used(KV_CACHE), f.used(ACTIVATIONS)), (0, 0));
}

// Would catch: a generation that arrives while others run waiting for them to end (or starting a
// loop of its own), or one that stays in the passes after its last token.
#[tokio::test(start_paused = true)]
async fn a_generation_joins_the_passes_under_way_and_leaves_after_its_last_token() {
    let f = fixture(ExecutorConfig { max_concurrent: 2, ..config() });
    let _model = f.loaded().await;
    let long = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(10)).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let short = f.executor.generate(Request::prompt("lab", "Hello").max_tokens(3)).unwrap();
    let short = short.output().await.unwrap();
    // Passes end at 25, 45 and 65 ms; the one from 65 ms takes the newcomer, prepared then.
    assert_eq!(
        short.usage.time_to_first_token,
        Duration::from_millis(65) + PREPARE + pass(2) - Duration::from_millis(50)
    );
    let long = long.output().await.unwrap();
    assert_eq!(long.tokens.len(), 10);
    let stats = f.executor.stats();
    assert_eq!((stats.batches, stats.batched_steps), (10, 13));
}

// Would catch: a pass filled by order of arrival rather than priority, or a low-priority generation
// that waits for every higher one to end (starvation) instead of going first after eight passes.
#[tokio::test(start_paused = true)]
async fn a_full_pass_takes_the_higher_priority_and_one_passed_over_eight_times_goes_first() {
    let f = fixture(ExecutorConfig { max_concurrent: 3, max_batch: 2, ..config() });
    let _model = f.loaded().await;
    let submit = |priority, tokens| {
        f.executor.generate(Request::prompt("lab", "Hi").max_tokens(tokens).priority(priority)).unwrap()
    };
    let (high, low, waiting) = (submit(Priority::High, 12), submit(Priority::Low, 12), submit(Priority::Low, 3));
    let waiting = waiting.output().await.unwrap();
    // Eight passes of the two others (the first after their prepare stage), then its own, prepared then.
    assert_eq!(waiting.usage.time_to_first_token, PREPARE + 8 * pass(2) + PREPARE + pass(2));
    let (high, low) = (high.output().await.unwrap(), low.output().await.unwrap());
    assert_eq!((high.tokens.len(), low.tokens.len(), waiting.tokens.len()), (12, 12, 3));
    assert!(high.usage.total < low.usage.total, "the higher priority ends first");
}

// Would catch: one generation's cancellation ending or stalling the others of its pass, or its
// memory kept until the pass's last generation ends.
#[tokio::test(start_paused = true)]
async fn a_cancelled_generation_leaves_its_pass_and_the_others_go_on() {
    let f = fixture(ExecutorConfig { max_concurrent: 4, ..config() });
    let _model = f.loaded().await;
    let mut streams: Vec<_> =
        (0..4).map(|_| f.executor.generate(Request::prompt("lab", "Hi").max_tokens(20)).unwrap()).collect();
    let mut cancelled = streams.pop().unwrap();
    for _ in 0..5 {
        cancelled.next().await.unwrap().unwrap(); // the start, and four tokens
    }
    let held = f.used(KV_CACHE);
    drop(cancelled);
    tokio::task::yield_now().await;
    assert_eq!(f.used(KV_CACHE), held / 4 * 3, "its kv-cache is back at once");
    for stream in streams {
        assert_eq!(stream.output().await.unwrap().tokens.len(), 20);
    }
    assert_eq!((f.used(KV_CACHE), f.used(ACTIVATIONS)), (0, 0));
}
