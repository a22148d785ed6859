//! Model-based test of kv blocks: random operations against a plain model of the block space.
//!
//! The model keeps, per block, its holders and, when published, the whole token prefix it stands for
//! (no hashes, no parent links, no index: a lookup is a scan), the cached blocks in release order, and
//! which leases the GC took back. After every step the space's stats, every block, every table and the
//! pool's bytes must agree with it. Tokens come from a two-letter alphabet, so prefixes collide often.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use usine_memory::{BlockTable, KvBlocks, Lease, MemoryError, MemoryManager, Pool, PoolConfig, ScopeId};

const POOL_BLOCK: u64 = 512;
const BYTES_PER_TOKEN: u64 = 300;
const IDLE: Duration = Duration::from_secs(30);
const MAX_TABLES: usize = 8;

#[derive(Debug, Clone)]
enum Op {
    Start {
        tokens: Vec<u32>,
    },
    /// What a sequence does first: start, cover the prompt, publish it.
    Prefill {
        tokens: Vec<u32>,
    },
    Grow {
        table: usize,
        tokens: Vec<u32>,
    },
    GrowWait {
        table: usize,
        tokens: Vec<u32>,
    },
    Publish {
        table: usize,
        upto: usize,
    },
    Drop {
        table: usize,
    },
    Touch {
        table: usize,
    },
    Pressure {
        pool_blocks: u64,
    },
    Advance {
        secs: u64,
    },
    Gc,
}

fn tokens(max: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(0..2u32, 0..max)
}

/// A prompt: the start of one of two shared "system prompts", then random tokens.
fn prompt() -> impl Strategy<Value = Vec<u32>> {
    const SYSTEM: [[u32; 8]; 2] = [[0, 1, 1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 0, 1, 1, 1]];
    (0..2usize, 0..=8usize, tokens(6)).prop_map(|(system, len, tail)| [&SYSTEM[system][..len], &tail].concat())
}

fn op() -> impl Strategy<Value = Op> {
    let table = || any::<prop::sample::Index>().prop_map(|i| i.index(1 << 16));
    prop_oneof![
        2 => tokens(13).prop_map(|tokens| Op::Start { tokens }),
        2 => prompt().prop_map(|tokens| Op::Start { tokens }),
        3 => prompt().prop_map(|tokens| Op::Prefill { tokens }),
        4 => (table(), tokens(7)).prop_map(|(table, tokens)| Op::Grow { table, tokens }),
        1 => (table(), tokens(7)).prop_map(|(table, tokens)| Op::GrowWait { table, tokens }),
        3 => (table(), 0..24usize).prop_map(|(table, upto)| Op::Publish { table, upto }),
        3 => table().prop_map(|table| Op::Drop { table }),
        1 => table().prop_map(|table| Op::Touch { table }),
        1 => (0..8u64).prop_map(|pool_blocks| Op::Pressure { pool_blocks }),
        2 => (0..25u64).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Gc),
    ]
}

struct ModelBlock {
    refs: u32,
    /// Every token up to the end of this block, while it is published.
    prefix: Option<Vec<u32>>,
    revoked: bool,
    last_use: Duration,
}

struct ModelTable {
    tokens: Vec<u32>,
    ids: Vec<u32>,
    handle: BlockTable,
}

struct Pressure {
    lease: Lease,
    revoked: bool,
    last_use: Duration,
}

struct Model {
    width: usize,
    total: u32,
    block_bytes: u64,
    capacity: u64,
    blocks: BTreeMap<u32, ModelBlock>,
    /// Cached ids, least recently released first.
    lru: Vec<u32>,
    tables: Vec<ModelTable>,
    pressure: Option<Pressure>,
    now: Duration,
    hit_tokens: u64,
    miss_tokens: u64,
    evictions: u64,
}

impl Model {
    fn used(&self) -> u64 {
        let blocks = self.blocks.values().filter(|block| !block.revoked).count() as u64;
        let pressure = self.pressure.as_ref().filter(|pressure| !pressure.revoked).map_or(0, |p| p.lease.reserved());
        blocks * self.block_bytes + pressure
    }

    fn published(&self, prefix: &[u32]) -> Option<u32> {
        self.blocks.iter().find(|(_, block)| block.prefix.as_deref() == Some(prefix)).map(|(&id, _)| id)
    }

    fn lowest_free(&self) -> Option<u32> {
        (0..self.total).find(|id| !self.blocks.contains_key(id))
    }

    fn free(&mut self, id: u32) {
        let block = self.blocks.remove(&id).unwrap();
        assert!(block.refs == 0 && block.prefix.is_none());
    }

    /// Unpublishes `root` and every published block whose prefix extends its own; frees those no
    /// table holds.
    fn unpublish(&mut self, root: u32) {
        let root_prefix = self.blocks[&root].prefix.clone().unwrap();
        let below: Vec<u32> = self
            .blocks
            .iter()
            .filter(|(_, block)| block.prefix.as_ref().is_some_and(|prefix| prefix.starts_with(&root_prefix)))
            .map(|(&id, _)| id)
            .collect();
        for id in below {
            let block = self.blocks.get_mut(&id).unwrap();
            block.prefix = None;
            if block.refs == 0 {
                self.lru.retain(|&cached| cached != id);
                self.evictions += 1;
                self.free(id);
            }
        }
    }

    fn acquire(&mut self, id: u32) {
        let block = self.blocks.get_mut(&id).unwrap();
        block.refs += 1;
        if block.refs == 1 {
            self.lru.retain(|&cached| cached != id);
        }
    }

    fn release(&mut self, id: u32) {
        let block = self.blocks.get_mut(&id).unwrap();
        block.refs -= 1;
        if block.refs == 0 {
            if block.prefix.is_some() {
                self.lru.push(id);
            } else {
                self.free(id);
            }
        }
    }

    /// A block for a table without waiting: new memory on the lowest free id, else the oldest cached
    /// block (one the GC took back is freed, and the search goes on).
    fn take_now(&mut self) -> Option<u32> {
        loop {
            if let Some(id) = self.lowest_free()
                && self.capacity - self.used() >= self.block_bytes
            {
                let block = ModelBlock { refs: 1, prefix: None, revoked: false, last_use: self.now };
                self.blocks.insert(id, block);
                return Some(id);
            }
            let victim = *self.lru.first()?;
            self.acquire(victim);
            self.evictions += 1;
            self.unpublish(victim);
            let now = self.now;
            let block = self.blocks.get_mut(&victim).unwrap();
            if !block.revoked {
                block.last_use = now;
                return Some(victim);
            }
            self.release(victim);
        }
    }

    fn table(&self, index: usize) -> Option<usize> {
        (!self.tables.is_empty()).then(|| index % self.tables.len())
    }
}

/// What a cover is expected to end with.
#[derive(Debug, PartialEq)]
enum Covered {
    Done,
    TooLarge,
    /// No block now: the error `cover` gives.
    Exhausted,
}

fn cover_model(model: &mut Model, table: usize) -> Covered {
    let needed = model.tables[table].tokens.len().div_ceil(model.width);
    if needed > model.total as usize {
        return Covered::TooLarge;
    }
    while model.tables[table].ids.len() < needed {
        let Some(id) = model.take_now() else { return Covered::Exhausted };
        model.tables[table].ids.push(id);
    }
    Covered::Done
}

async fn step(memory: &MemoryManager, pool: &Pool, kv: &KvBlocks, model: &mut Model, op: Op) {
    let width = model.width;
    match op {
        Op::Prefill { tokens } => {
            if model.tables.len() == MAX_TABLES {
                return;
            }
            let upto = tokens.len();
            Box::pin(step(memory, pool, kv, model, Op::Start { tokens })).await;
            let table = model.tables.len() - 1;
            Box::pin(step(memory, pool, kv, model, Op::Grow { table, tokens: Vec::new() })).await;
            Box::pin(step(memory, pool, kv, model, Op::Publish { table, upto })).await;
        }
        Op::Start { tokens } => {
            if model.tables.len() == MAX_TABLES {
                return;
            }
            let handle = kv.start(&tokens);
            let matchable = tokens.len().saturating_sub(1) / width;
            let mut found = Vec::new();
            for level in 0..matchable {
                match model.published(&tokens[..(level + 1) * width]) {
                    Some(id) => found.push(id),
                    None => break,
                }
            }
            let now = model.now;
            let live = found.iter().take_while(|id| !model.blocks[id].revoked).count();
            for id in &found[..live] {
                model.blocks.get_mut(id).unwrap().last_use = now;
            }
            if let Some(&revoked) = found.get(live) {
                model.unpublish(revoked);
            }
            found.truncate(live);
            for &id in &found {
                model.acquire(id);
            }
            let hit = found.len() * width;
            model.hit_tokens += hit as u64;
            model.miss_tokens += (tokens.len() - hit) as u64;
            assert_eq!((handle.ids(), handle.cached_tokens()), (&found[..], hit), "start {tokens:?}");
            // A hit's blocks hold exactly the request's tokens.
            for (level, &id) in handle.ids().iter().enumerate() {
                let published = kv.block(id).unwrap().published.unwrap();
                assert_eq!(published.tokens, tokens[level * width..(level + 1) * width]);
            }
            model.tables.push(ModelTable { tokens, ids: found, handle });
        }
        Op::Grow { table, tokens } => {
            let Some(table) = model.table(table) else { return };
            model.tables[table].tokens.extend(tokens);
            let len = model.tables[table].tokens.len();
            let result = kv.cover(&mut model.tables[table].handle, len);
            match (cover_model(model, table), result) {
                (Covered::Done, Ok(())) | (Covered::TooLarge, Err(MemoryError::TooLarge { .. })) => {}
                (Covered::Exhausted, Err(err)) => {
                    let expected = MemoryError::Exhausted {
                        pool: "kv".into(),
                        requested: model.block_bytes,
                        available: model.capacity - model.used(),
                        waiters: 0,
                    };
                    assert_eq!(err, expected);
                }
                (expected, result) => panic!("cover to {len}: expected {expected:?}, got {result:?}"),
            }
        }
        Op::GrowWait { table, tokens } => {
            let Some(table) = model.table(table) else { return };
            model.tables[table].tokens.extend(tokens);
            let len = model.tables[table].tokens.len();
            let timeout = Duration::from_secs(1);
            let started = tokio::time::Instant::now();
            let result = kv.cover_wait(&mut model.tables[table].handle, len, timeout).await;
            let waited = started.elapsed();
            match (cover_model(model, table), result) {
                (Covered::Done, Ok(())) | (Covered::TooLarge, Err(MemoryError::TooLarge { .. })) => {
                    assert_eq!(waited, Duration::ZERO);
                }
                (Covered::Exhausted, Err(err)) if model.capacity - model.used() >= model.block_bytes => {
                    // Memory but no id (blocks the GC took back are still held): granted at once, no id.
                    assert!(matches!(err, MemoryError::Exhausted { .. }), "{err}");
                    assert_eq!(waited, Duration::ZERO);
                }
                (Covered::Exhausted, Err(err)) => {
                    // Nothing else runs: the wait times out.
                    assert!(matches!(err, MemoryError::TimedOut { .. }), "{err}");
                    assert_eq!(waited, timeout);
                    model.now += timeout;
                }
                (expected, result) => panic!("cover_wait to {len}: expected {expected:?}, got {result:?}"),
            }
        }
        Op::Publish { table, upto } => {
            let Some(table) = model.table(table) else { return };
            let tokens = model.tables[table].tokens.clone();
            let tokens = &tokens[..upto.min(tokens.len())];
            let published = kv.publish(&mut model.tables[table].handle, tokens).unwrap();
            let full = (tokens.len() / width).min(model.tables[table].ids.len());
            let mut expected = 0;
            for level in 0..full {
                let prefix = &tokens[..(level + 1) * width];
                if model.published(prefix).is_some() {
                    continue;
                }
                let own = model.blocks.get_mut(&model.tables[table].ids[level]).unwrap();
                if own.prefix.is_some() || own.revoked {
                    break;
                }
                own.prefix = Some(prefix.to_vec());
                expected += 1;
            }
            assert_eq!(published, expected, "publish {tokens:?}");
        }
        Op::Drop { table } => {
            let Some(table) = model.table(table) else { return };
            let table = model.tables.swap_remove(table);
            drop(table.handle);
            for &id in table.ids.iter().rev() {
                model.release(id);
            }
        }
        Op::Touch { table } => {
            let Some(table) = model.table(table) else { return };
            let result = kv.touch(&model.tables[table].handle);
            let now = model.now;
            let mut revoked = false;
            for &id in &model.tables[table].ids {
                let block = model.blocks.get_mut(&id).unwrap();
                if block.revoked {
                    revoked = true;
                    break;
                }
                block.last_use = now;
            }
            assert_eq!(matches!(result, Err(MemoryError::Revoked { .. })), revoked, "{result:?}");
        }
        Op::Pressure { pool_blocks } => {
            drop(model.pressure.take());
            let bytes = pool_blocks * POOL_BLOCK;
            let result = pool.allocate(bytes, ScopeId::new(1));
            if bytes <= model.capacity - model.used() {
                model.pressure = Some(Pressure { lease: result.unwrap(), revoked: false, last_use: model.now });
            } else {
                assert!(
                    matches!(result, Err(MemoryError::Exhausted { .. } | MemoryError::TooLarge { .. })),
                    "{result:?}"
                );
            }
        }
        Op::Advance { secs } => {
            tokio::time::advance(Duration::from_secs(secs)).await;
            model.now += Duration::from_secs(secs);
        }
        Op::Gc => {
            let reclaimed = memory.gc_now();
            let now = model.now;
            let mut expected = 0;
            for block in model.blocks.values_mut().filter(|block| !block.revoked && now - block.last_use > IDLE) {
                block.revoked = true;
                expected += 1;
            }
            if let Some(pressure) = model.pressure.as_mut().filter(|p| !p.revoked && now - p.last_use > IDLE) {
                pressure.revoked = true;
                expected += 1;
            }
            assert_eq!(reclaimed.leases, expected);
        }
    }
}

fn check(pool: &Pool, kv: &KvBlocks, model: &Model) {
    let stats = kv.stats();
    let in_use = u32::try_from(model.blocks.values().filter(|block| block.refs > 0).count()).unwrap();
    let cached = u32::try_from(model.blocks.values().filter(|block| block.refs == 0).count()).unwrap();
    assert_eq!(cached as usize, model.lru.len());
    assert_eq!(
        (stats.total, stats.free, stats.cached, stats.in_use),
        (model.total, model.total - in_use - cached, cached, in_use)
    );
    assert_eq!(stats.free + stats.cached + stats.in_use, stats.total);
    assert_eq!(
        (stats.hit_tokens, stats.miss_tokens, stats.evictions),
        (model.hit_tokens, model.miss_tokens, model.evictions)
    );
    // The pool's bytes: the unrelated lease and one block's worth per block whose lease is live.
    assert_eq!(pool.stats().used, model.used());
    for id in 0..model.total {
        let actual = kv.block(id);
        let Some(expected) = model.blocks.get(&id) else {
            assert_eq!(actual, None, "block {id} is free");
            continue;
        };
        let actual = actual.unwrap_or_else(|| panic!("block {id} is held or cached"));
        let holders = u32::try_from(model.tables.iter().filter(|table| table.ids.contains(&id)).count()).unwrap();
        assert_eq!((actual.refs, expected.refs), (holders, holders), "block {id}: refs are its tables");
        match (&actual.published, &expected.prefix) {
            (None, None) => {}
            (Some(published), Some(prefix)) => {
                assert_eq!(published.tokens, prefix[prefix.len() - model.width..], "block {id}");
                let parent = prefix.len().checked_sub(model.width).filter(|&len| len > 0);
                let parent = parent.map(|len| model.published(&prefix[..len]).expect("a published parent"));
                assert_eq!(published.parent, parent, "block {id}");
            }
            (actual, expected) => panic!("block {id}: published {actual:?}, expected {expected:?}"),
        }
    }
    for table in &model.tables {
        assert_eq!(table.handle.ids(), table.ids);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    // Would catch: a refcount off by one (a block freed while a table holds it, or never freed), a
    // cached block lost from the LRU or evicted out of order, a hit on blocks whose tokens differ, a
    // revoked block served, or the pool's bytes drifting from the blocks held.
    #[test]
    fn kv_blocks_agree_with_a_plain_model(
        width in 1..=3u32,
        pool_blocks in 4..24u64,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let memory = MemoryManager::default();
            let capacity = pool_blocks * POOL_BLOCK;
            let pool = memory.create_pool("kv", PoolConfig::new(capacity, POOL_BLOCK).idle_timeout(Some(IDLE))).unwrap();
            let kv = KvBlocks::new(pool.clone(), 7, width, BYTES_PER_TOKEN).unwrap();
            let block_bytes = (u64::from(width) * BYTES_PER_TOKEN).next_multiple_of(POOL_BLOCK);
            assert_eq!((kv.block_bytes(), u64::from(kv.total())), (block_bytes, capacity / block_bytes));
            let mut model = Model {
                width: width as usize,
                total: kv.total(),
                block_bytes,
                capacity,
                blocks: BTreeMap::new(),
                lru: Vec::new(),
                tables: Vec::new(),
                pressure: None,
                now: Duration::ZERO,
                hit_tokens: 0,
                miss_tokens: 0,
                evictions: 0,
            };
            for op in ops {
                step(&memory, &pool, &kv, &mut model, op).await;
                check(&pool, &kv, &model);
            }
            drop(std::mem::take(&mut model.tables));
            drop(model.pressure.take());
            drop(kv);
            assert_eq!(pool.stats().used, 0, "every table and the space gone: nothing used");
        });
    }
}
