//! Paged kv-cache: one model's fixed-size blocks over a pool, the block table of each sequence, and a
//! prefix cache that lets a sequence reuse the blocks of an earlier one with the same leading tokens.
//!
//! Every block is one [`Lease`] of [`KvBlocks::block_bytes`], so the pool's figures are the real bytes
//! held. A block's books (which tables hold it, whether it is published, the order of cached blocks)
//! sit behind one `parking_lot` mutex (`books.rs`), held for the change only; pool calls made under it
//! take the pool's lock after it, never the other way round, and leases leaving the books are dropped
//! after it (or before asking the pool for memory again).
//!
//! One lock rather than a sharded map (`dashmap`), by measurement (`benches/blocks.rs`, the 2-core
//! development machine, shared; median of 5 runs' medians of 300 samples, and the range of those
//! medians): looking up the chain of a 4-block prefix in an index of 4,096 blocks takes 69 ns (46-81)
//! on one thread and 70 ns (47-180) on each of two under one lock per chain, 120 ns (110-130) and
//! 160 ns (96-280) with `DashMap::get` per block; a 64-block prefix 986 ns (683-1,096) and 1,051 ns
//! (950-1,181) against 1,366 ns (1,016-1,446) and 1,571 ns (1,041-1,642). The lookups are about an
//! eighth of the whole `start` and drop of a 64-block prefix (7.5 us, 6.5-8.1, on one thread; 8.1 us,
//! 5.6-8.5, on each of two), whose refcounts and LRU must change with the lookup anyway.

mod books;

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use twox_hash::XxHash3_64;

use self::books::{Books, Deferred, Link, Lookup, Released, Shown};
use crate::error::{MemoryError, Result};
use crate::lease::{Lease, ScopeId};
use crate::metrics::{BlockMetrics, to_f64};
use crate::pool::Pool;

/// Tokens per kv block unless told otherwise: 16, as vLLM's default.
pub const DEFAULT_BLOCK_TOKENS: u32 = 16;

/// One loaded model's kv-cache, cut into blocks of a fixed number of tokens over a [`Pool`].
///
/// Cheap to clone; all clones share the same blocks. A sequence holds a [`BlockTable`] (its block ids,
/// in order) from [`start`](Self::start), grows it with [`cover`](Self::cover) as its tokens grow,
/// and, once the kv of its tokens is computed, [`publish`](Self::publish)es its full blocks: a later
/// sequence whose context starts with the same tokens (a system prompt, say) then takes those blocks
/// instead of computing them again.
///
/// A block id is in `0..`[`total`](Self::total), stable while the block is held, and the lowest free
/// id is handed out first, so an engine can index its own storage by id and keep it dense. A block is
/// *in use* (held by one table or more), *cached* (published and held by none: it keeps its memory
/// until it is reused by a hit or evicted, least recently released first, when the pool runs out) or
/// *free*. At every observable point `free + cached + in_use == total`.
///
/// A block's lease belongs to the space's own [`scope`](Self::scope), not to a request: a block may
/// outlive the sequence that computed it and be shared by others, so releasing one request's scope
/// must not take it. Releasing the space's scope takes every block back at once (tables then fail to
/// [`touch`](Self::touch)). The pool's GC revokes blocks idle past its timeout: a table keeps its own
/// with [`touch`](Self::touch), and a cached block the GC took back is a miss, freed when met.
///
/// ```
/// use usine_memory::{KvBlocks, MemoryManager, PoolConfig};
///
/// let memory = MemoryManager::default();
/// let pool = memory.create_pool("kv-cache", PoolConfig::new(64 * 4096, 4096))?;
/// // 4 tokens a block, 1 KiB of kv a token: one pool block per kv block, 64 of them.
/// let kv = KvBlocks::new(pool.clone(), 0x5eed, 4, 1024)?;
/// assert_eq!((kv.block_bytes(), kv.total()), (4096, 64));
///
/// let prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
/// let mut first = kv.start(&prompt);
/// assert_eq!(first.cached_tokens(), 0); // nothing cached yet
/// kv.cover(&mut first, prompt.len())?; // 3 blocks
/// // ... the engine computes the kv of the prompt into blocks first.ids() ...
/// assert_eq!(kv.publish(&mut first, &prompt)?, 2); // the two full blocks
/// drop(first); // they stay cached, the partial third block is freed
///
/// // A second request with the same first 8 tokens skips them.
/// let mut second = kv.start(&[1, 2, 3, 4, 5, 6, 7, 8, 42]);
/// assert_eq!((second.cached_tokens(), second.ids()), (8, &[0, 1][..]));
/// kv.cover(&mut second, 9)?;
/// assert_eq!(pool.stats().used, 3 * 4096);
/// # Ok::<(), usine_memory::MemoryError>(())
/// ```
#[derive(Clone)]
pub struct KvBlocks {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    model: u64,
    scope: ScopeId,
    block_tokens: u32,
    block_bytes: u64,
    total: u32,
    books: Mutex<Books>,
    /// Told when a block is released (cached or freed), so that a waiting `cover_wait` looks again:
    /// a block going to the cache frees no pool memory, yet can be evicted.
    released: Notify,
    metrics: BlockMetrics,
}

/// The blocks of one sequence, in order: block `i` holds its tokens `i * block_tokens ..`.
///
/// Made by [`KvBlocks::start`], grown by [`KvBlocks::cover`]. Dropping it releases every block: one
/// held by no other table goes to the cache if it is published (its memory kept), and is freed
/// otherwise.
pub struct BlockTable {
    inner: Arc<Inner>,
    ids: Vec<u32>,
    /// The published blocks holding this table's leading full blocks, as last seen: its own, those
    /// `start` found, or an identical block another table published first.
    chain: Vec<Link>,
    cached_tokens: usize,
}

/// A snapshot of a block space, taken under its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockStats {
    /// Block ids: the pool's capacity over the block size.
    pub total: u32,
    /// Ids neither held nor cached (the pool may still lack the memory for them).
    pub free: u32,
    /// Published blocks held by no table, keeping their memory for a later hit. Blocks the pool's GC
    /// took back are counted until they are met (looked up or evicted), then freed.
    pub cached: u32,
    /// Blocks held by one table or more.
    pub in_use: u32,
    /// Tokens that [`KvBlocks::start`] found cached, which need no computing.
    pub hit_tokens: u64,
    /// The other tokens passed to [`KvBlocks::start`].
    pub miss_tokens: u64,
    /// Cached blocks dropped from the cache other than by a hit: taken for new blocks when the pool ran
    /// out, found revoked by the GC, or left unreachable by their parent's eviction.
    pub evictions: u64,
}

/// One block as [`KvBlocks::block`] describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// Tables holding it; 0 for a cached block.
    pub refs: u32,
    /// What makes it findable, when it is published.
    pub published: Option<PublishedBlock>,
}

/// A published block's key and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedBlock {
    /// Its chained hash: of the model key, its parent's hash and its tokens.
    pub hash: u64,
    /// The block holding the tokens just before its own; `None` for a sequence's first block.
    pub parent: Option<u32>,
    /// Its tokens.
    pub tokens: Vec<u32>,
}

impl KvBlocks {
    /// A block space of `block_tokens` tokens a block, at `bytes_per_token` bytes of kv a token, over
    /// `pool`. `model` is mixed into every block's hash; each space caches only its own blocks anyway.
    ///
    /// A block is `block_tokens * bytes_per_token` bytes rounded up to whole blocks of the pool, so its
    /// lease holds exactly [`block_bytes`](Self::block_bytes). Fails with
    /// [`MemoryError::InvalidKvBlocks`] when a size is zero, the block size overflows, a block exceeds
    /// the pool's capacity, or the pool would hold more than `u32::MAX` blocks.
    pub fn new(pool: Pool, model: u64, block_tokens: u32, bytes_per_token: u64) -> Result<Self> {
        let capacity = pool.capacity();
        let invalid = |reason| MemoryError::InvalidKvBlocks {
            pool: pool.name().to_owned(),
            capacity,
            block_tokens,
            bytes_per_token,
            reason,
        };
        if block_tokens == 0 {
            return Err(invalid("zero tokens per block"));
        }
        if bytes_per_token == 0 {
            return Err(invalid("zero bytes per token"));
        }
        let block_bytes = u64::from(block_tokens)
            .checked_mul(bytes_per_token)
            .and_then(|bytes| bytes.checked_next_multiple_of(pool.block_size()))
            .ok_or_else(|| invalid("the block size overflows 64 bits"))?;
        if block_bytes > capacity {
            return Err(invalid("a block exceeds the pool's capacity"));
        }
        let total = u32::try_from(capacity / block_bytes).map_err(|_| invalid("more than u32::MAX blocks"))?;
        let metrics = BlockMetrics::register(pool.name());
        metrics.free.increment(to_f64(u64::from(total)));
        let inner = Inner {
            pool,
            model,
            scope: ScopeId::fresh(),
            block_tokens,
            block_bytes,
            total,
            books: Mutex::new(Books::new()),
            released: Notify::new(),
            metrics,
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Bytes of one block: its lease's reservation.
    pub fn block_bytes(&self) -> u64 {
        self.inner.block_bytes
    }

    /// Tokens of one block.
    pub fn block_tokens(&self) -> u32 {
        self.inner.block_tokens
    }

    /// Block ids, `0..total`: the pool's capacity over [`block_bytes`](Self::block_bytes). Other users
    /// of the pool may leave room for fewer.
    pub fn total(&self) -> u32 {
        self.inner.total
    }

    /// The model key mixed into every block hash.
    pub fn model(&self) -> u64 {
        self.inner.model
    }

    /// The scope of every block's lease (see the type's documentation).
    pub fn scope(&self) -> ScopeId {
        self.inner.scope
    }

    /// The pool the blocks come from.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// A table for a sequence whose context starts with `tokens`, holding the longest chain of cached
    /// blocks that matches them, each compared token by token.
    ///
    /// Only full blocks within `tokens[..tokens.len() - 1]` are taken: the last token's logits must be
    /// computed, so its kv is too. The table's [`cached_tokens`](BlockTable::cached_tokens) says how
    /// many tokens were found (hit tokens); the rest of `tokens` count as miss tokens. A block whose
    /// lease the pool took back ends the chain and leaves the cache. Blocks found are marked in use.
    pub fn start(&self, tokens: &[u32]) -> BlockTable {
        let inner = &self.inner;
        let width = inner.block_tokens as usize;
        // The hashes need no lock.
        let hashes = chain_hashes(inner.model, &tokens[..tokens.len().saturating_sub(1)], width);
        let mut table = BlockTable { inner: Arc::clone(inner), ids: Vec::new(), chain: Vec::new(), cached_tokens: 0 };
        inner.change(|books, deferred| {
            let mut found: Vec<Link> = Vec::with_capacity(hashes.len());
            for (level, (&hash, block)) in hashes.iter().zip(tokens.chunks_exact(width)).enumerate() {
                let parent = found.last().map(|link| link.id);
                debug_assert_eq!(level, found.len());
                match books.lookup(hash, parent, block) {
                    Lookup::Found(link) => found.push(link),
                    Lookup::Collision | Lookup::Absent => break,
                }
            }
            let live = inner.pool.shared.touch_all(found.iter().map(|link| books.lease(link.id)));
            if let Some(revoked) = found.get(live) {
                books.unpublish(revoked.id, deferred);
            }
            found.truncate(live);
            for link in &found {
                books.acquire(link.id);
            }
            let hit = found.len() * width;
            books.hit_tokens += hit as u64;
            books.miss_tokens += (tokens.len() - hit) as u64;
            table.ids = found.iter().map(|link| link.id).collect();
            table.chain = found;
            table.cached_tokens = hit;
        });
        table
    }

    /// Grows `table` to hold `tokens` tokens, one block at a time: a new block from the pool, else the
    /// least recently released cached block, evicted.
    ///
    /// Fails with [`MemoryError::TooLarge`] when `tokens` need more blocks than the space has, and with
    /// [`MemoryError::Exhausted`] (the pool's figures) when neither the pool nor the cache has a block;
    /// the table then keeps the blocks it got, and nothing else stays taken.
    pub fn cover(&self, table: &mut BlockTable, tokens: usize) -> Result<()> {
        self.check_owner(table)?;
        let needed = self.inner.blocks_for(tokens)?;
        self.inner.change(|books, deferred| {
            while table.ids.len() < needed {
                let id = match self.inner.take_now(books, deferred)? {
                    Some(id) => id,
                    None => self.inner.refused(books)?,
                };
                table.ids.push(id);
            }
            Ok(())
        })
    }

    /// As [`cover`](Self::cover), waiting up to `timeout` in all for the pool's memory or a block to
    /// evict. The wait takes its turn in the pool's queue (first come, first served) and is woken by a
    /// block released in this space too.
    ///
    /// Fails with [`MemoryError::TimedOut`] after `timeout`, and as
    /// [`Pool::allocate_wait`] does; the table then keeps the blocks it got. Dropping the future leaves
    /// nothing taken beyond what the table holds.
    pub async fn cover_wait(&self, table: &mut BlockTable, tokens: usize, timeout: Duration) -> Result<()> {
        self.check_owner(table)?;
        let inner = &*self.inner;
        let needed = inner.blocks_for(tokens)?;
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let mut released = pin!(inner.released.notified());
            let done = inner.change(|books, deferred| {
                // Registered under the lock: a block released after this look wakes the wait below.
                released.as_mut().enable();
                while table.ids.len() < needed {
                    match inner.take_now(books, deferred)? {
                        Some(id) => table.ids.push(id),
                        None => return Ok(false),
                    }
                }
                Ok(true)
            })?;
            if done {
                return Ok(());
            }
            let remaining = deadline.map_or(timeout, |deadline| deadline.saturating_duration_since(Instant::now()));
            let mut granted = pin!(inner.pool.allocate_wait(inner.block_bytes, inner.scope, remaining));
            let lease = poll_fn(|cx| {
                if released.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None); // look at the cache again; dropping the wait leaves the queue
                }
                granted.as_mut().poll(cx).map(Some)
            })
            .await;
            if let Some(lease) = lease {
                let lease = lease?;
                let id = inner.change(|books, deferred| inner.place(books, deferred, lease))?;
                table.ids.push(id);
            }
        }
    }

    /// Records that the kv of the table's first `tokens.len()` tokens is computed: each full block
    /// among them that is not findable yet becomes findable by [`start`](Self::start), keyed by its
    /// chained hash. Returns how many of the table's blocks were published.
    ///
    /// Where an identical block (same tokens after the same chain) is already published, that one stays
    /// published and the table's own stays private. A table whose leading blocks came from such a block
    /// that was evicted since publishes its own again. `tokens` are the table's context; blocks it does
    /// not hold are skipped. Fails with [`MemoryError::ForeignBlockTable`] for another space's table.
    pub fn publish(&self, table: &mut BlockTable, tokens: &[u32]) -> Result<usize> {
        self.check_owner(table)?;
        let inner = &*self.inner;
        let width = inner.block_tokens as usize;
        let full = (tokens.len() / width).min(table.ids.len());
        if full == 0 {
            return Ok(0);
        }
        let published = inner.change(|books, _| {
            // The chain holds while its last link does: a published block's parent stays published.
            while table.chain.last().is_some_and(|link| !books.is_current(link)) {
                table.chain.pop();
            }
            let mut published = 0;
            let mut scratch = Vec::with_capacity(8 + 4 * width);
            for level in table.chain.len()..full {
                let parent = table.chain.last().copied();
                let block = &tokens[level * width..(level + 1) * width];
                let hash = chain_hash(inner.model, parent.map(|link| link.hash), block, &mut scratch);
                let parent = parent.map(|link| link.id);
                let link = match books.lookup(hash, parent, block) {
                    Lookup::Found(link) => link,
                    // Another block holds this hash: nothing after it could be found either.
                    Lookup::Collision => break,
                    Lookup::Absent => {
                        let own = table.ids[level];
                        if books.is_published(own) || books.lease(own).is_revoked() {
                            break;
                        }
                        published += 1;
                        books.publish(own, hash, parent, block)
                    }
                };
                table.chain.push(link);
            }
            published
        });
        Ok(published)
    }

    /// Marks every block of the table in use now, so the pool's GC leaves them alone for another idle
    /// period. Fails with [`MemoryError::Revoked`] when one was taken back (its kv may be gone), and
    /// with [`MemoryError::ForeignBlockTable`] for another space's table.
    pub fn touch(&self, table: &BlockTable) -> Result<()> {
        self.check_owner(table)?;
        let books = self.inner.books.lock();
        let touched = self.inner.pool.shared.touch_all(table.ids.iter().map(|&id| books.lease(id)));
        match table.ids.get(touched) {
            Some(&revoked) => Err(books.lease(revoked).revoked_error()),
            None => Ok(()),
        }
    }

    /// A snapshot of the space's figures.
    pub fn stats(&self) -> BlockStats {
        let books = self.inner.books.lock();
        BlockStats {
            total: self.inner.total,
            free: self.inner.total - books.in_use - books.cached,
            cached: books.cached,
            in_use: books.in_use,
            hit_tokens: books.hit_tokens,
            miss_tokens: books.miss_tokens,
            evictions: books.evictions,
        }
    }

    /// The block `id`, unless it is free.
    pub fn block(&self, id: u32) -> Option<BlockInfo> {
        self.inner.books.lock().describe(id)
    }

    fn check_owner(&self, table: &BlockTable) -> Result<()> {
        if Arc::ptr_eq(&self.inner, &table.inner) {
            Ok(())
        } else {
            Err(MemoryError::ForeignBlockTable { pool: table.inner.pool.name().to_owned() })
        }
    }
}

impl Inner {
    /// Runs `change` on the books under the lock, sends the figures that changed to the metrics, then
    /// drops the leases that left the books.
    fn change<R>(&self, change: impl FnOnce(&mut Books, &mut Deferred) -> R) -> R {
        let mut deferred = Deferred::new();
        let result = {
            let mut books = self.books.lock();
            let result = change(&mut books, &mut deferred);
            books.debug_check(self.total);
            self.show(&mut books);
            result
        };
        drop(deferred);
        result
    }

    /// Sends the figures that changed since last time to the metrics: per change, not per block.
    fn show(&self, books: &mut Books) {
        let shown = &mut books.shown;
        let metrics = &self.metrics;
        let shift = |gauge: &metrics::Gauge, from: u32, to: u32| match to.cmp(&from) {
            std::cmp::Ordering::Greater => gauge.increment(f64::from(to - from)),
            std::cmp::Ordering::Less => gauge.decrement(f64::from(from - to)),
            std::cmp::Ordering::Equal => {}
        };
        shift(&metrics.in_use, shown.in_use, books.in_use);
        shift(&metrics.cached, shown.cached, books.cached);
        match books.cached.cmp(&shown.cached) {
            std::cmp::Ordering::Greater => {
                metrics.cached_bytes.increment(to_f64(u64::from(books.cached - shown.cached) * self.block_bytes));
            }
            std::cmp::Ordering::Less => {
                metrics.cached_bytes.decrement(to_f64(u64::from(shown.cached - books.cached) * self.block_bytes));
            }
            std::cmp::Ordering::Equal => {}
        }
        shift(&metrics.free, self.total - shown.in_use - shown.cached, self.total - books.in_use - books.cached);
        metrics.hit_tokens.increment(books.hit_tokens - shown.hit_tokens);
        metrics.miss_tokens.increment(books.miss_tokens - shown.miss_tokens);
        metrics.evictions.increment(books.evictions - shown.evictions);
        *shown = Shown {
            in_use: books.in_use,
            cached: books.cached,
            hit_tokens: books.hit_tokens,
            miss_tokens: books.miss_tokens,
            evictions: books.evictions,
        };
    }

    /// Blocks needed for `tokens`, or `TooLarge` beyond the space.
    fn blocks_for(&self, tokens: usize) -> Result<usize> {
        let needed = tokens.div_ceil(self.block_tokens as usize);
        if needed > self.total as usize {
            return Err(MemoryError::TooLarge {
                pool: self.pool.name().to_owned(),
                requested: (needed as u64).saturating_mul(self.block_bytes),
                capacity: self.pool.capacity(),
            });
        }
        Ok(needed)
    }

    /// A block for a table, held by it, without waiting: a free id with new memory from the pool, else
    /// a cached block evicted. `None` when neither is there.
    fn take_now(&self, books: &mut Books, deferred: &mut Deferred) -> Result<Option<u32>> {
        loop {
            // Blocks freed by an eviction return their memory now, so that the pool can hand it out
            // again (the pool never calls into this space: its lock may be taken under this one).
            deferred.clear();
            // `can_allocate` first: a refusal the cache then makes up for is no failure of the pool.
            if let Some(id) = books.lowest_free(self.total)
                && self.pool.can_allocate(self.block_bytes)
            {
                match self.pool.allocate(self.block_bytes, self.scope) {
                    Ok(lease) => {
                        books.install(id, lease);
                        return Ok(Some(id));
                    }
                    Err(MemoryError::Exhausted { .. }) => {} // taken by another user of the pool since
                    Err(error) => return Err(error),
                }
            }
            let Some(victim) = books.evict(deferred) else { return Ok(None) };
            if books.lease(victim).touch().is_ok() {
                return Ok(Some(victim));
            }
            // The GC took it back: its memory is in the pool already, and its id is free again.
            books.release(victim, deferred);
        }
    }

    /// The pool's refusal when `take_now` found nothing, with its figures; or a block after all, when
    /// memory came back to the pool meanwhile.
    fn refused(&self, books: &mut Books) -> Result<u32> {
        let Some(id) = books.lowest_free(self.total) else {
            // Every id is held by a table: the pool is (all but) full of this space's blocks.
            let stats = self.pool.stats();
            return Err(MemoryError::Exhausted {
                pool: stats.name,
                requested: self.block_bytes,
                available: stats.available,
                waiters: stats.waiters,
            });
        };
        let lease = self.pool.allocate(self.block_bytes, self.scope)?;
        books.install(id, lease);
        Ok(id)
    }

    /// Gives a lease granted after a wait an id: a free one, else a cached block's (whose own lease
    /// goes back). Fails, returning the lease, when every id is held by a table.
    fn place(&self, books: &mut Books, deferred: &mut Deferred, lease: Lease) -> Result<u32> {
        if let Some(id) = books.lowest_free(self.total) {
            books.install(id, lease);
            return Ok(id);
        }
        if let Some(victim) = books.evict(deferred) {
            deferred.push(books.replace_lease(victim, lease));
            return Ok(victim);
        }
        // Returned now (under this space's lock, not the pool's), so that the figures below count it.
        drop(lease);
        let stats = self.pool.stats();
        Err(MemoryError::Exhausted {
            pool: stats.name,
            requested: self.block_bytes,
            available: stats.available,
            waiters: stats.waiters,
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Every table is gone (each holds the space); the cached blocks' leases go with the books.
        let books = self.books.get_mut();
        self.metrics.cached.decrement(to_f64(u64::from(books.shown.cached)));
        self.metrics.cached_bytes.decrement(to_f64(u64::from(books.shown.cached) * self.block_bytes));
        self.metrics.in_use.decrement(to_f64(u64::from(books.shown.in_use)));
        self.metrics.free.decrement(to_f64(u64::from(self.total - books.shown.cached - books.shown.in_use)));
    }
}

impl BlockTable {
    /// The table's block ids, in token order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// How many leading tokens [`KvBlocks::start`] found cached: their kv need not be computed.
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// Tokens the table's blocks hold.
    pub fn capacity(&self) -> usize {
        self.ids.len() * self.inner.block_tokens as usize
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let inner = &*self.inner;
        inner.change(|books, deferred| {
            // Last block first: of blocks released together, the later ones of a chain are evicted
            // first, so the cache keeps whole prefixes longer.
            let mut returned = false;
            for &id in self.ids.iter().rev() {
                returned |= books.release(id, deferred) != Released::Held;
            }
            if returned {
                inner.released.notify_waiters();
            }
        });
    }
}

impl std::fmt::Debug for KvBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvBlocks")
            .field("pool", &self.inner.pool.name())
            .field("model", &format_args!("{:#x}", self.inner.model))
            .field("block_tokens", &self.inner.block_tokens)
            .field("block_bytes", &self.inner.block_bytes)
            .field("total", &self.inner.total)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for BlockTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockTable")
            .field("ids", &self.ids)
            .field("cached_tokens", &self.cached_tokens)
            .finish_non_exhaustive()
    }
}

/// The chained hashes of the full blocks of `tokens`.
fn chain_hashes(model: u64, tokens: &[u32], width: usize) -> Vec<u64> {
    let mut scratch = Vec::with_capacity(8 + 4 * width);
    let mut parent = None;
    tokens
        .chunks_exact(width)
        .map(|block| {
            let hash = chain_hash(model, parent, block, &mut scratch);
            parent = Some(hash);
            hash
        })
        .collect()
}

/// XXH3-64, seeded with the model key, of the parent's hash (none for a first block, so a first block's
/// input is shorter than any other's) and the block's tokens, little-endian.
fn chain_hash(model: u64, parent: Option<u64>, tokens: &[u32], scratch: &mut Vec<u8>) -> u64 {
    scratch.clear();
    if let Some(parent) = parent {
        scratch.extend_from_slice(&parent.to_le_bytes());
    }
    for token in tokens {
        scratch.extend_from_slice(&token.to_le_bytes());
    }
    XxHash3_64::oneshot_with_seed(model, scratch)
}
