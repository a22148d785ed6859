//! `Lease`: a reservation of whole blocks in one pool that returns itself when dropped.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{MemoryError, Result};
use crate::pool::PoolShared;

/// Identifies a lease within its pool; never reused by that pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub(crate) u64);

impl LeaseId {
    /// The number behind the id.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The unit of work a lease belongs to, typically one request; see
/// [`MemoryManager::release_scope`](crate::MemoryManager::release_scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeId(u64);

impl ScopeId {
    /// A scope with a caller-chosen number (a request id, say).
    pub const fn new(id: u64) -> Self {
        Self(id)
    }

    /// A scope number never handed out before by `fresh` in this process.
    ///
    /// `fresh` counts down from `u64::MAX`, so it does not meet small caller-chosen numbers.
    pub fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(u64::MAX);
        Self(NEXT.fetch_sub(1, Ordering::Relaxed))
    }

    /// The number behind the scope.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl From<u64> for ScopeId {
    fn from(id: u64) -> Self {
        Self(id)
    }
}

impl fmt::Display for ScopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "scope {}", self.0)
    }
}

/// Whole blocks reserved in one pool, returned to the pool when the lease is dropped.
///
/// A lease knows its length in bytes (what was asked for) and its reservation (that length rounded up
/// to whole blocks). It can grow and shrink in place, which is how a sequence's kv-cache follows its
/// tokens. The GC or [`MemoryManager::release_scope`](crate::MemoryManager::release_scope) may revoke
/// it: the blocks go back to the pool at once, exactly once, and the later drop frees nothing.
///
/// ```
/// use usine_memory::{MemoryManager, PoolConfig, ScopeId};
///
/// let memory = MemoryManager::default();
/// let pool = memory.create_pool("kv-cache", PoolConfig::new(64 * 1024, 4096))?;
/// {
///     let mut lease = pool.allocate(1000, ScopeId::new(1))?;
///     assert_eq!((lease.len(), lease.reserved()), (1000, 4096)); // one whole block
///     lease.try_grow(4000)?; // 5000 bytes now need two blocks
///     assert_eq!(pool.stats().used, 8192);
/// } // dropped: the blocks are back
/// assert_eq!(pool.stats().used, 0);
/// # Ok::<(), usine_memory::MemoryError>(())
/// ```
pub struct Lease {
    pub(crate) pool: Arc<PoolShared>,
    pub(crate) slot: usize,
    pub(crate) id: LeaseId,
    pub(crate) scope: ScopeId,
    pub(crate) len: u64,
    pub(crate) reserved: u64,
}

impl Lease {
    /// This lease's id, unique within its pool.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// The pool the blocks come from.
    pub fn pool(&self) -> &str {
        &self.pool.name
    }

    /// The scope the lease belongs to.
    pub fn scope(&self) -> ScopeId {
        self.scope
    }

    /// Bytes asked for, as grown and shrunk. A revoked lease keeps its last figures; see
    /// [`is_revoked`](Self::is_revoked).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the lease holds no bytes (it may still be grown).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes reserved in the pool: `len` rounded up to whole blocks.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Marks the lease as in use now, so that the GC leaves it alone for another idle period.
    ///
    /// Fails with [`MemoryError::Revoked`] once the GC or a scope release has taken it back.
    pub fn touch(&self) -> Result<()> {
        self.pool.touch(self)
    }

    /// Whether the GC or a scope release has taken this lease back.
    pub fn is_revoked(&self) -> bool {
        self.pool.is_revoked(self)
    }

    /// Grows the lease by `additional` bytes, reserving more blocks only when the new length needs them.
    ///
    /// A grow takes free blocks even when requests are queued for space: a running sequence that
    /// finishes frees its memory sooner than one that stalls. Fails without change with
    /// [`MemoryError::Exhausted`] when the blocks are not free (`requested` is `additional`),
    /// [`MemoryError::TooLarge`] when the new length exceeds the pool's capacity (`requested` is the
    /// new length), and [`MemoryError::Revoked`] when the lease was taken back.
    pub fn try_grow(&mut self, additional: u64) -> Result<()> {
        let (len, reserved) = self.pool.resize(self, ResizeBy::Grow(additional))?;
        self.len = len;
        self.reserved = reserved;
        Ok(())
    }

    /// Shrinks the lease by `released` bytes (at most down to zero), returning blocks no longer needed.
    ///
    /// Fails with [`MemoryError::Revoked`] when the lease was taken back.
    pub fn shrink(&mut self, released: u64) -> Result<()> {
        let (len, reserved) = self.pool.resize(self, ResizeBy::Shrink(released))?;
        self.len = len;
        self.reserved = reserved;
        Ok(())
    }

    /// The error for an operation on this lease after it was revoked.
    pub(crate) fn revoked_error(&self) -> MemoryError {
        MemoryError::Revoked { pool: self.pool.name.to_string(), lease: self.id }
    }
}

/// How a resize changes a lease's length.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ResizeBy {
    Grow(u64),
    Shrink(u64),
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self);
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("pool", &self.pool.name)
            .field("id", &self.id)
            .field("scope", &self.scope)
            .field("len", &self.len)
            .field("reserved", &self.reserved)
            .finish()
    }
}
