//! The kv blocks of the models that page their kv-cache, one space per loaded model, and the
//! generations holding blocks of each, by age (who is pre-empted when blocks run out).

use std::sync::Arc;

use usine_engine::LoadedModel;
use usine_memory::{KvBlocks, MemoryError, Pool};

/// The kv blocks of each loaded model that pages its kv-cache: made at its first generation, and kept
/// while the model lives (its cached blocks serve later generations), then dropped with their memory
/// at the next generation of any model.
#[derive(Default)]
pub(crate) struct Spaces {
    spaces: parking_lot::Mutex<std::collections::HashMap<usize, Space>>,
}

/// A model (while it lives), its kv blocks, and the generations holding some.
type Space = (std::sync::Weak<dyn LoadedModel>, KvBlocks, Holders);

/// The generations that hold a model's kv blocks, by age: when blocks run out, all but the oldest give
/// theirs back, so that the oldest goes on, and one that gave its blocks back takes blocks again only
/// once it is the oldest (two pre-empting each other in turn would never end).
#[derive(Clone, Default)]
pub(crate) struct Holders(Arc<(parking_lot::Mutex<std::collections::BTreeSet<u64>>, tokio::sync::Notify)>);

/// A generation's place among its model's holders, left when dropped.
pub(crate) struct Holding {
    holders: Holders,
    age: u64,
}

impl Holders {
    pub(crate) fn join(&self) -> Holding {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let age = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.0.lock().insert(age);
        Holding { holders: self.clone(), age }
    }
}

impl Holding {
    pub(crate) fn is_oldest(&self) -> bool {
        self.holders.0.0.lock().first() == Some(&self.age)
    }

    /// Waits until no older generation holds blocks.
    pub(crate) async fn turn(&self) {
        loop {
            let older_left = self.holders.0.1.notified();
            if self.is_oldest() {
                return;
            }
            older_left.await;
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.holders.0.0.lock().remove(&self.age);
        self.holders.0.1.notify_waiters();
    }
}

impl Spaces {
    /// The blocks of `model`, made now over `pool` if it has none.
    pub(crate) fn of(
        &self,
        model: &Arc<dyn LoadedModel>,
        block_tokens: u32,
        pool: &Pool,
    ) -> Result<(KvBlocks, Holders), MemoryError> {
        let key = Arc::as_ptr(model).cast::<()>() as usize;
        let mut spaces = self.spaces.lock();
        spaces.retain(|_, (model, ..)| model.strong_count() > 0);
        if let Some((_, space, holders)) = spaces.get(&key) {
            return Ok((space.clone(), holders.clone()));
        }
        let space = KvBlocks::new(pool.clone(), key as u64, block_tokens, model.memory_plan().kv_bytes_per_token)?;
        let holders = Holders::default();
        spaces.insert(key, (Arc::downgrade(model), space.clone(), holders.clone()));
        Ok((space, holders))
    }
}
