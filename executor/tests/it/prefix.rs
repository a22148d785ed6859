//! Where the model pages its kv-cache: a generation whose prompt starts with the full blocks of an
//! earlier one's takes them instead of computing them, the pool counts blocks, and a generation that
//! finds none free in time gives its own back and resumes by recompute.

use usine_executor::{ExecutorConfig, KvReservation, Request};
use usine_memory::KV_CACHE;

use crate::{KV_PER_TOKEN, config, fixture, fixture_with_pools};

/// The lab's paged model: blocks of 4 tokens.
const BLOCK: usize = 4;

// Would catch: a prefix cache that never serves (every prompt computed whole), one that serves blocks
// of another prompt (a hit on a different token), a hit counted for the prompt's last token (whose
// kv must be computed for its logits), or cached blocks whose memory the pool no longer counts.
#[tokio::test(start_paused = true)]
async fn a_prompt_sharing_an_earlier_ones_full_blocks_takes_them_and_the_pool_counts_them() {
    let f = fixture(config());
    f.script.lock().kv_block_tokens = Some(u32::try_from(BLOCK).unwrap());
    let _model = f.loaded().await;
    // 26 tokens (bytes): its first 25 are computed by the prefill, 6 full blocks of them published.
    let first = "The kernel keeps models w";
    let output = f.executor.generate(Request::prompt("lab", format!("{first}x")).max_tokens(4)).unwrap();
    let output = output.output().await.unwrap();
    assert_eq!((output.usage.prompt_tokens, output.usage.cached_tokens), (26, 0));
    // Its 6 published blocks stay cached with their memory; its others went back.
    assert_eq!(f.used(KV_CACHE), 6 * BLOCK as u64 * KV_PER_TOKEN);

    let second = f.executor.generate(Request::prompt("lab", format!("{first}y and more")).max_tokens(4)).unwrap();
    let second = second.output().await.unwrap();
    assert_eq!(second.usage.cached_tokens, 24, "six blocks of the earlier prompt");
    let same = f.executor.generate(Request::prompt("lab", "The kernel keeps").max_tokens(4)).unwrap();
    let same = same.output().await.unwrap();
    assert_eq!(same.usage.cached_tokens, 12, "16 tokens: all but the last block, which holds the last token");
    let other = f.executor.generate(Request::prompt("lab", "A kernel keeps models").max_tokens(4)).unwrap();
    assert_eq!(other.output().await.unwrap().usage.cached_tokens, 0, "another first token shares nothing");

    let script = f.script.lock();
    let prefills: Vec<&(Vec<u32>, usize)> = script.blocks.iter().filter(|(ids, _)| !ids.is_empty()).collect();
    let (first_ids, second_ids) = (&prefills[0].0, &script.blocks.iter().find(|(_, cached)| *cached == 24).unwrap().0);
    assert_eq!(first_ids[..6], second_ids[..6], "the same blocks, not copies");
}

// Would catch: a paged generation that fails when the kv blocks run out while others hold them (rather
// than giving its own back and resuming), a resume that repeats or skips a token, or blocks kept by a
// pre-empted generation.
#[tokio::test(start_paused = true)]
async fn two_generations_the_blocks_cannot_hold_at_once_both_finish_one_pre_empted() {
    let config = ExecutorConfig { kv_reservation: KvReservation::PerToken, max_concurrent: 2, ..config() };
    // 12 blocks of 4 tokens; each generation needs 11 (2 prompt tokens and 40 generated).
    let f = fixture_with_pools(config, 12 * BLOCK as u64 * KV_PER_TOKEN, 1 << 20);
    f.script.lock().kv_block_tokens = Some(u32::try_from(BLOCK).unwrap());
    let model = f.loaded().await;
    let params = usine_engine::GenerationParams { max_tokens: 40, ..Default::default() };
    let alone = usine_engine::generate(model.model().as_ref(), "Hi", &params).await.unwrap().tokens;
    // Both read at once: a generation blocked on its reader keeps its blocks.
    let outputs: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(f.executor.generate(Request::prompt("lab", "Hi").params(params.clone())).unwrap().output())
        })
        .collect();
    for output in outputs {
        let output = output.await.unwrap().unwrap();
        assert_eq!(output.tokens, alone, "every token once, in order");
        assert_eq!(output.usage.retries, 0, "a pre-emption is not a retry");
    }
    let stats = f.executor.stats();
    assert!(stats.preemptions >= 1, "{stats:?}");
    assert_eq!(stats.completed, 2);
    assert_eq!(f.used(KV_CACHE), 0, "no full block of the prompt to keep cached");
}
