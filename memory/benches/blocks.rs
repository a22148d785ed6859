//! Prefix lookups in the kv block index: one `parking_lot` mutex (what `KvBlocks` keeps) against a
//! sharded `DashMap`, from one and two threads, in one run.
//!
//! - `index`: the chained hashes of an `N`-block prefix looked up in an index of 4096 published blocks,
//!   every block found. `mutex_per_chain` takes the lock once for the whole chain, as `KvBlocks::start`
//!   does; `mutex_per_block` takes it once per block; `dashmap` gets each block from its shard.
//! - `start_drop`: the whole path, `KvBlocks::start` of a prompt whose first `N` blocks are cached
//!   (hashing, lookups and exact token comparison, touching the leases, taking the refcounts) and the
//!   table's drop (the blocks back to the cache). On two threads both start the same prompt, as two
//!   requests with one system prompt do.
//!
//! Run with `cargo bench -p usine-memory --bench blocks`; the figures and the decision they led to are in
//! the notes of `KvBlocks`' module (`src/blocks.rs`).

use std::collections::HashMap;

use dashmap::DashMap;
use divan::{Bencher, black_box};
use parking_lot::Mutex;
use usine_memory::{KvBlocks, MemoryManager, PoolConfig};

/// Published blocks in the index.
const INDEXED: u32 = 4096;
/// Tokens a block, the default.
const WIDTH: u32 = 16;

fn main() {
    divan::main();
}

/// Distinct, well-mixed keys, as chained hashes are.
fn hash(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29) ^ 0x5851_f42d_4c95_7f2d
}

#[divan::bench_group(threads = [1, 2])]
mod index {
    use super::*;

    fn chain(blocks: u64) -> Vec<u64> {
        (0..blocks).map(|i| hash(i * 61 % u64::from(INDEXED))).collect()
    }

    #[divan::bench(args = [4, 64])]
    fn mutex_per_chain(bencher: Bencher<'_, '_>, blocks: u64) {
        let index: Mutex<HashMap<u64, u32>> = Mutex::new((0..INDEXED).map(|i| (hash(u64::from(i)), i)).collect());
        let chain = chain(blocks);
        bencher.bench(|| {
            let index = index.lock();
            black_box(&chain).iter().map(|key| index.get(key).copied().unwrap_or_default()).fold(0, u32::wrapping_add)
        });
    }

    #[divan::bench(args = [4, 64])]
    fn mutex_per_block(bencher: Bencher<'_, '_>, blocks: u64) {
        let index: Mutex<HashMap<u64, u32>> = Mutex::new((0..INDEXED).map(|i| (hash(u64::from(i)), i)).collect());
        let chain = chain(blocks);
        bencher.bench(|| {
            black_box(&chain)
                .iter()
                .map(|key| index.lock().get(key).copied().unwrap_or_default())
                .fold(0, u32::wrapping_add)
        });
    }

    #[divan::bench(args = [4, 64])]
    fn dashmap(bencher: Bencher<'_, '_>, blocks: u64) {
        let index: DashMap<u64, u32> = (0..INDEXED).map(|i| (hash(u64::from(i)), i)).collect();
        let chain = chain(blocks);
        bencher.bench(|| {
            black_box(&chain)
                .iter()
                .map(|key| index.get(key).map(|id| *id).unwrap_or_default())
                .fold(0, u32::wrapping_add)
        });
    }
}

#[divan::bench_group(threads = [1, 2])]
mod start_drop {
    use super::*;

    #[divan::bench(args = [4, 64])]
    fn kv_blocks(bencher: Bencher<'_, '_>, blocks: u32) {
        let memory = MemoryManager::default();
        let pool = memory
            .create_pool("kv-cache", PoolConfig::new(u64::from(2 * INDEXED) << 12, 4096).idle_timeout(None))
            .expect("a valid pool");
        let kv = KvBlocks::new(pool, 1, WIDTH, 256).expect("valid blocks");
        let prompt: Vec<u32> = (0..blocks * WIDTH + 1).collect();
        let mut table = kv.start(&prompt);
        kv.cover(&mut table, prompt.len()).expect("room");
        kv.publish(&mut table, &prompt).expect("its own table");
        drop(table);
        bencher.bench(|| drop(black_box(kv.start(black_box(&prompt)))));
    }
}
