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

/// The lab's model prefilling in passes: each context token a pass fills adds 1 ms to it.
const FILL: Duration = Duration::from_millis(1);

// Would catch: a prompt computed whole while the others wait for their next token (a pass of 20 ms
// held up by the whole prefill), chunks past the token budget, steps left out of a pass for a chunk,
// a sequence stepped before its context is filled, or a chunked prompt whose text differs.
#[tokio::test(start_paused = true)]
async fn a_long_prompt_is_filled_in_chunks_within_the_token_budget_beside_the_others_steps() {
    let f = fixture(ExecutorConfig { max_concurrent: 2, max_pass_tokens: 8, ..config() });
    f.script.lock().fill = Some(FILL);
    let model = f.loaded().await;
    let long_prompt = "twenty bytes of text";
    let params = usine_engine::GenerationParams { max_tokens: 6, ..Default::default() };
    let alone = usine_engine::generate(model.model().as_ref(), long_prompt, &params).await.unwrap().tokens;

    let short = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(12)).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let long = f.executor.generate(Request::prompt("lab", long_prompt).max_tokens(6)).unwrap();
    let long = long.output().await.unwrap();
    assert_eq!(long.tokens, alone);
    // The short one's context (1 token) fills in a pass of 21 ms, its steps then take 20 ms a pass;
    // the long one joins at 50 ms and the pass from 61 ms takes 7 of its 19 tokens beside the short
    // one's step (the budget of 8), then 7 more, then 5 with its first step prepared during the pass,
    // which it takes in the next: 27 + 27 + 25 + 21 ms.
    assert_eq!(long.usage.time_to_first_token, Duration::from_millis(61 + 27 + 27 + 25 + 21 - 50));
    let short = short.output().await.unwrap();
    assert_eq!(short.tokens.len(), 12);
    let script = f.script.lock();
    assert_eq!(script.passes, [(vec![1], 0), (vec![7], 1), (vec![7], 1), (vec![5], 1)]);
    assert_eq!(f.executor.stats().filled_tokens, 20);
    assert_eq!((f.used(KV_CACHE), f.used(ACTIVATIONS)), (0, 0));
}

// Would catch: a prompt whose cached blocks are filled again (the hit not saved), blocks published
// before the passes computed them (a later prompt served kv that was never written), or a generation
// cancelled while its prompt fills that keeps its kv-cache or its place in the passes.
#[tokio::test(start_paused = true)]
async fn a_chunked_prompt_publishes_its_blocks_once_filled_and_a_cancelled_one_leaves_at_once() {
    let f = fixture(ExecutorConfig { max_pass_tokens: 8, ..config() });
    {
        let mut script = f.script.lock();
        script.fill = Some(FILL);
        script.kv_block_tokens = Some(4);
    }
    let _model = f.loaded().await;
    let prompt = "The kernel keeps models w"; // 25 tokens: 24 filled, 6 full blocks published
    let first = f.executor.generate(Request::prompt("lab", prompt).max_tokens(2)).unwrap();
    assert_eq!(first.output().await.unwrap().usage.cached_tokens, 0);
    let second = f.executor.generate(Request::prompt("lab", format!("{prompt}ith more")).max_tokens(2)).unwrap();
    let second = second.output().await.unwrap();
    assert_eq!(second.usage.cached_tokens, 24);
    let passes = std::mem::take(&mut f.script.lock().passes);
    // 24 tokens in chunks of 8; then the 9 past the cached 24, less the last.
    assert_eq!(passes, [(vec![8], 0), (vec![8], 0), (vec![8], 0), (vec![8], 0)]);

    let held = f.used(KV_CACHE);
    let mut cancelled = f.executor.generate(Request::prompt("lab", "x".repeat(200)).max_tokens(2)).unwrap();
    cancelled.next().await.unwrap().unwrap(); // started: its prompt fills, 8 tokens a pass
    tokio::time::sleep(COMPUTE * 3).await;
    assert!(f.used(KV_CACHE) > held);
    drop(cancelled);
    tokio::task::yield_now().await;
    assert_eq!(f.used(KV_CACHE), held, "its blocks are back at once");
    tokio::time::sleep(COMPUTE * 5).await;
    let filled: usize = f.script.lock().passes.iter().flat_map(|(fills, _)| fills).sum();
    assert!(filled < 199, "the passes stopped filling it: {filled} of 199 tokens");
    assert_eq!(f.used(ACTIVATIONS), 0);
}
