//! Where the model pages its kv-cache: a generation whose prompt starts with the full blocks of an
//! earlier one's takes them instead of computing them, and the pool counts blocks.

use usine_executor::Request;
use usine_memory::KV_CACHE;

use crate::{KV_PER_TOKEN, config, fixture};

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
