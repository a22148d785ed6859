//! The books of one kv block space: which table holds each block, which blocks are published, and the
//! least recently used order of the cached ones.
//!
//! Plain data, changed only under the space's lock (see `blocks.rs`); nothing here calls the pool, and a
//! lease leaving the books is pushed to a `Deferred` list, dropped by the caller after the lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{BlockInfo, PublishedBlock};
use crate::lease::Lease;

/// Debug builds check the books after every change in spaces of at most this many blocks.
const CHECKED_UP_TO: usize = 1024;

/// Leases leaving the books, to drop after the lock (their `Drop` takes the pool's lock).
pub(super) type Deferred = Vec<Lease>;

/// One block space's books.
///
/// A block is *free* (no slot), *in use* (held by at least one table) or *cached* (published and held by
/// none: it keeps its lease and sits in `lru`). Published blocks form a forest: a published block's
/// parent is published too, so a block's id names the same content for as long as it is published.
pub(super) struct Books {
    /// By block id; `None` for a free id below `slots.len()`. Grows up to the highest id handed out.
    slots: Vec<Option<Block>>,
    /// The free ids below `slots.len()`; every id from `slots.len()` up to the total is free too.
    freed: BTreeSet<u32>,
    /// Chained hash of a published block → its id.
    index: HashMap<u64, u32>,
    /// Cached blocks by the time they were last released, oldest first.
    lru: BTreeMap<u64, u32>,
    /// Source of LRU stamps and publication serials, never reused.
    clock: u64,
    pub(super) in_use: u32,
    pub(super) cached: u32,
    pub(super) hit_tokens: u64,
    pub(super) miss_tokens: u64,
    pub(super) evictions: u64,
    /// The figures last sent to the metrics, to send changes only.
    pub(super) shown: Shown,
}

/// The figures last sent to the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Shown {
    pub(super) in_use: u32,
    pub(super) cached: u32,
    pub(super) hit_tokens: u64,
    pub(super) miss_tokens: u64,
    pub(super) evictions: u64,
}

/// A held or cached block.
struct Block {
    lease: Lease,
    /// Tables holding it.
    refs: u32,
    published: Option<Published>,
}

/// What makes a block findable by a later sequence.
struct Published {
    hash: u64,
    /// Unique to this publication: a table's chain names a block by id and serial, so that an id
    /// freed and handed out again is not mistaken for the block it recorded.
    serial: u64,
    parent: Option<u32>,
    /// The block's own tokens, compared at every lookup: a hash collision never serves another's kv.
    tokens: Box<[u32]>,
    /// Published blocks whose parent this is.
    children: Vec<u32>,
    /// Its key in `lru` while cached.
    stamp: Option<u64>,
}

/// A link of a table's chain: the published block that holds one of its leading full blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Link {
    pub(super) id: u32,
    pub(super) serial: u64,
    pub(super) hash: u64,
}

/// What the index holds for a block's chained hash.
pub(super) enum Lookup {
    /// A published block with this parent and these tokens.
    Found(Link),
    /// A published block with this hash but another parent or other tokens: a collision.
    Collision,
    /// No published block has this hash.
    Absent,
}

/// How a released block ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Released {
    /// Other tables still hold it.
    Held,
    /// Published, it went to the cache.
    Cached,
    /// Unpublished, its lease and id went back.
    Freed,
}

impl Books {
    pub(super) fn new() -> Self {
        Self {
            slots: Vec::new(),
            freed: BTreeSet::new(),
            index: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            in_use: 0,
            cached: 0,
            hit_tokens: 0,
            miss_tokens: 0,
            evictions: 0,
            shown: Shown::default(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn block(&self, id: u32) -> &Block {
        self.slots[id as usize].as_ref().expect("a held or cached block")
    }

    fn block_mut(&mut self, id: u32) -> &mut Block {
        self.slots[id as usize].as_mut().expect("a held or cached block")
    }

    fn published_mut(&mut self, id: u32) -> &mut Published {
        self.block_mut(id).published.as_mut().expect("a published block")
    }

    /// The lease of a held or cached block.
    pub(super) fn lease(&self, id: u32) -> &Lease {
        &self.block(id).lease
    }

    /// Swaps the lease of a held block for another (of the same size).
    pub(super) fn replace_lease(&mut self, id: u32, lease: Lease) -> Lease {
        std::mem::replace(&mut self.block_mut(id).lease, lease)
    }

    /// The lowest free id below `total`.
    pub(super) fn lowest_free(&self, total: u32) -> Option<u32> {
        let fresh = u32::try_from(self.slots.len()).expect("at most `total` slots, a u32");
        self.freed.first().copied().or((fresh < total).then_some(fresh))
    }

    /// Gives the free id `id` a new block holding `lease`, held by one table.
    pub(super) fn install(&mut self, id: u32, lease: Lease) {
        let block = Block { lease, refs: 1, published: None };
        if (id as usize) < self.slots.len() {
            let removed = self.freed.remove(&id);
            debug_assert!(removed, "id {id} was free");
            self.slots[id as usize] = Some(block);
        } else {
            debug_assert_eq!(id as usize, self.slots.len(), "the lowest fresh id");
            self.slots.push(Some(block));
        }
        self.in_use += 1;
    }

    /// One more table holds `id`; a cached block leaves the cache.
    pub(super) fn acquire(&mut self, id: u32) {
        let block = self.slots[id as usize].as_mut().expect("a held or cached block");
        block.refs += 1;
        if block.refs == 1 {
            let stamp = block.published.as_mut().and_then(|published| published.stamp.take());
            self.lru.remove(&stamp.expect("a block held by no table is cached"));
            self.cached -= 1;
            self.in_use += 1;
        }
    }

    /// One table fewer holds `id`; at none, a published block is cached, an unpublished one freed.
    pub(super) fn release(&mut self, id: u32, deferred: &mut Deferred) -> Released {
        let stamp = self.tick();
        let block = self.slots[id as usize].as_mut().expect("a held block");
        block.refs -= 1;
        if block.refs > 0 {
            return Released::Held;
        }
        self.in_use -= 1;
        if let Some(published) = block.published.as_mut() {
            published.stamp = Some(stamp);
            self.lru.insert(stamp, id);
            self.cached += 1;
            Released::Cached
        } else {
            self.free(id, deferred);
            Released::Freed
        }
    }

    fn free(&mut self, id: u32, deferred: &mut Deferred) {
        let block = self.slots[id as usize].take().expect("a held or cached block");
        debug_assert!(block.refs == 0 && block.published.is_none(), "only an unheld, unpublished block is freed");
        self.freed.insert(id);
        deferred.push(block.lease);
    }

    /// The published block with this chained hash, parent and tokens.
    pub(super) fn lookup(&self, hash: u64, parent: Option<u32>, tokens: &[u32]) -> Lookup {
        let Some(&id) = self.index.get(&hash) else { return Lookup::Absent };
        let published = self.block(id).published.as_ref().expect("indexed blocks are published");
        if published.parent == parent && *published.tokens == *tokens {
            Lookup::Found(Link { id, serial: published.serial, hash })
        } else {
            Lookup::Collision
        }
    }

    /// Whether `link` still names a published block (the same publication).
    pub(super) fn is_current(&self, link: &Link) -> bool {
        self.slots
            .get(link.id as usize)
            .and_then(Option::as_ref)
            .and_then(|block| block.published.as_ref())
            .is_some_and(|published| published.serial == link.serial)
    }

    pub(super) fn is_published(&self, id: u32) -> bool {
        self.block(id).published.is_some()
    }

    /// Makes the held block `id` findable under `hash`, as the child of `parent` (published).
    pub(super) fn publish(&mut self, id: u32, hash: u64, parent: Option<u32>, tokens: &[u32]) -> Link {
        debug_assert!(!self.index.contains_key(&hash), "one block per hash");
        let serial = self.tick();
        let block = self.block_mut(id);
        debug_assert!(block.refs > 0 && block.published.is_none(), "a held, unpublished block");
        block.published =
            Some(Published { hash, serial, parent, tokens: tokens.into(), children: Vec::new(), stamp: None });
        if let Some(parent) = parent {
            self.published_mut(parent).children.push(id);
        }
        self.index.insert(hash, id);
        Link { id, serial, hash }
    }

    /// Unpublishes `root` and every block published below it (none of them is reachable without it).
    /// Those held by no table are freed and counted as evictions; held ones stay with their tables.
    pub(super) fn unpublish(&mut self, root: u32, deferred: &mut Deferred) {
        if let Some(parent) = self.block(root).published.as_ref().and_then(|published| published.parent) {
            self.published_mut(parent).children.retain(|&child| child != root);
        }
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            let published = self.block_mut(id).published.take().expect("below a published block, published");
            self.index.remove(&published.hash);
            stack.extend(published.children);
            if let Some(stamp) = published.stamp {
                self.lru.remove(&stamp);
                self.cached -= 1;
                self.evictions += 1;
                self.free(id, deferred);
            }
        }
    }

    /// Takes the least recently used cached block out of the cache for a table: held by it, unpublished
    /// (with everything published below it), counted as an eviction. `None` when nothing is cached.
    pub(super) fn evict(&mut self, deferred: &mut Deferred) -> Option<u32> {
        let (_, id) = self.lru.first_key_value()?;
        let id = *id;
        self.acquire(id);
        self.evictions += 1;
        self.unpublish(id, deferred);
        Some(id)
    }

    pub(super) fn describe(&self, id: u32) -> Option<BlockInfo> {
        let block = self.slots.get(id as usize)?.as_ref()?;
        Some(BlockInfo {
            refs: block.refs,
            published: block.published.as_ref().map(|published| PublishedBlock {
                hash: published.hash,
                parent: published.parent,
                tokens: published.tokens.to_vec(),
            }),
        })
    }

    /// Checks the books against themselves (debug builds only): counts, the index, the LRU, the forest.
    /// Costs a pass over every block, so it runs on small spaces only (every test's), up to
    /// [`CHECKED_UP_TO`] blocks.
    pub(super) fn debug_check(&self, total: u32) {
        if !cfg!(debug_assertions) || self.slots.len() > CHECKED_UP_TO {
            return;
        }
        let (mut in_use, mut cached) = (0u32, 0u32);
        for (id, block) in self.slots.iter().enumerate() {
            let id = u32::try_from(id).expect("ids are u32");
            let Some(block) = block else {
                assert!(self.freed.contains(&id), "free id {id} is in the free set");
                continue;
            };
            if block.refs > 0 {
                in_use += 1;
            } else {
                cached += 1;
            }
            if let Some(published) = &block.published {
                assert_eq!(self.index.get(&published.hash), Some(&id), "block {id} is indexed");
                assert_eq!(published.stamp.is_some(), block.refs == 0, "block {id}: cached iff in the lru");
                if let Some(stamp) = published.stamp {
                    assert_eq!(self.lru.get(&stamp), Some(&id));
                }
                if let Some(parent) = published.parent {
                    let parent =
                        self.block(parent).published.as_ref().expect("a published block's parent is published");
                    assert!(parent.children.contains(&id));
                }
            } else {
                assert!(block.refs > 0, "block {id}: held by no table, so published");
            }
        }
        assert_eq!((in_use, cached), (self.in_use, self.cached));
        assert_eq!(self.lru.len(), cached as usize);
        assert_eq!(self.index.len(), self.slots.iter().flatten().filter(|block| block.published.is_some()).count());
        assert!(self.freed.iter().all(|&id| (id as usize) < self.slots.len()));
        assert!(self.in_use + self.cached <= total);
    }
}
