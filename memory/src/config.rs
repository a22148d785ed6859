//! Configuration: one pool, the manager, and the three standard pools cut from a total budget.

use std::time::Duration;

use crate::error::{MemoryError, Result};

/// Name of the pool for the sequences' key-value caches.
pub const KV_CACHE: &str = "kv-cache";
/// Name of the pool for per-step activations.
pub const ACTIVATIONS: &str = "activations";
/// Name of the pool for uniforms (small per-request parameters).
pub const UNIFORMS: &str = "uniforms";

/// Default idle time after which the GC revokes a lease: 30 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default high-water mark: 90 % of capacity.
pub const DEFAULT_HIGH_WATER_PERCENT: u8 = 90;
/// Default low-water mark: 80 % of capacity.
pub const DEFAULT_LOW_WATER_PERCENT: u8 = 80;
/// Default block size: 4 KiB.
pub const DEFAULT_BLOCK_SIZE: u64 = 4096;
/// Most events kept for a slow subscriber; a larger [`ManagerConfig::event_capacity`] is cut to this.
pub const MAX_EVENT_CAPACITY: usize = 1 << 20;
/// Longest pool name, in bytes (names become metric labels).
pub const MAX_POOL_NAME_LEN: usize = 64;

/// How one pool is sized and looked after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Capacity in bytes; a whole number of blocks.
    pub capacity: u64,
    /// Allocation granularity in bytes; requests round up to whole blocks.
    pub block_size: u64,
    /// The GC revokes leases not used for longer than this; `None` never revokes.
    pub idle_timeout: Option<Duration>,
    /// Use at or above this percentage of capacity turns the pressure high (an event).
    pub high_water_percent: u8,
    /// Use at or below this percentage turns high pressure back to normal (an event). The gap between
    /// the marks keeps a pool that hovers near the high mark from flapping.
    pub low_water_percent: u8,
}

impl PoolConfig {
    /// A pool of `capacity` bytes in blocks of `block_size`, with the default idle timeout (30 s) and
    /// water marks (high at 90 %, back to normal at 80 %).
    pub fn new(capacity: u64, block_size: u64) -> Self {
        Self {
            capacity,
            block_size,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            high_water_percent: DEFAULT_HIGH_WATER_PERCENT,
            low_water_percent: DEFAULT_LOW_WATER_PERCENT,
        }
    }

    /// Sets the idle timeout; `None` turns the GC off for this pool.
    #[must_use]
    pub fn idle_timeout(mut self, idle_timeout: Option<Duration>) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// Sets the water marks, in percent of capacity: pressure turns high at `high` (1 to 100) and
    /// back to normal at `low` (below `high`).
    #[must_use]
    pub fn water_marks(mut self, high: u8, low: u8) -> Self {
        self.high_water_percent = high;
        self.low_water_percent = low;
        self
    }

    pub(crate) fn validate(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        if self.capacity == 0 {
            return Err(MemoryError::ZeroCapacity { pool: name.to_owned() });
        }
        if self.block_size == 0 || !self.capacity.is_multiple_of(self.block_size) {
            return Err(MemoryError::BlockSize {
                pool: name.to_owned(),
                capacity: self.capacity,
                block_size: self.block_size,
            });
        }
        let (high, low) = (self.high_water_percent, self.low_water_percent);
        if !(1..=100).contains(&high) || low >= high {
            return Err(MemoryError::WaterMarks { pool: name.to_owned(), high, low });
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > MAX_POOL_NAME_LEN {
        "longer than 64 bytes"
    } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
        "only a-z, 0-9, `-` and `_` are allowed"
    } else {
        return Ok(());
    };
    Err(MemoryError::InvalidName { name: name.to_owned(), reason })
}

/// Settings of the manager itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Events kept for a slow subscriber before it starts losing the oldest (default 1024, at most
    /// [`MAX_EVENT_CAPACITY`]).
    pub event_capacity: usize,
    /// How often the background GC sweeps (default 10 s).
    pub gc_interval: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self { event_capacity: 1024, gc_interval: Duration::from_secs(10) }
    }
}

/// The three standard pools: `kv-cache`, `activations` and `uniforms`.
///
/// Build them from one total budget with [`StandardPools::from_budget`] (default shares 70 / 25 / 5 %),
/// or fill the fields for explicit sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandardPools {
    /// The `kv-cache` pool: keys and values of every live sequence.
    pub kv_cache: PoolConfig,
    /// The `activations` pool: per-step scratch space.
    pub activations: PoolConfig,
    /// The `uniforms` pool: small per-request parameters.
    pub uniforms: PoolConfig,
}

impl StandardPools {
    /// Default share of the budget for `kv-cache`, in percent: the cache grows with every token of every
    /// sequence and dominates inference memory.
    pub const KV_CACHE_SHARE: u64 = 70;
    /// Default share for `activations`, in percent: one step's scratch, per running sequence.
    pub const ACTIVATIONS_SHARE: u64 = 25;
    /// Default share for `uniforms`, in percent.
    pub const UNIFORMS_SHARE: u64 = 5;

    /// Cuts `total` bytes into the three pools by the default shares, each rounded down to whole
    /// blocks of [`DEFAULT_BLOCK_SIZE`].
    ///
    /// Fails with [`MemoryError::ZeroCapacity`] naming the first pool whose share is under one block.
    ///
    /// ```
    /// use usine_memory::StandardPools;
    ///
    /// let pools = StandardPools::from_budget(1 << 30)?; // 1 GiB
    /// assert_eq!(pools.kv_cache.capacity, 751_616_000); // 70 %, in whole 4 KiB blocks
    /// assert!(StandardPools::from_budget(4096).is_err()); // too small for three pools
    /// # Ok::<(), usine_memory::MemoryError>(())
    /// ```
    pub fn from_budget(total: u64) -> Result<Self> {
        let share = |name: &str, percent: u64| -> Result<PoolConfig> {
            // u128: `total * percent` must not overflow for budgets near u64::MAX.
            let bytes = u128::from(total) * u128::from(percent) / 100;
            let blocks = bytes / u128::from(DEFAULT_BLOCK_SIZE);
            let capacity =
                u64::try_from(blocks * u128::from(DEFAULT_BLOCK_SIZE)).expect("a share of a u64 is at most that u64");
            if capacity == 0 {
                return Err(MemoryError::ZeroCapacity { pool: name.to_owned() });
            }
            Ok(PoolConfig::new(capacity, DEFAULT_BLOCK_SIZE))
        };
        Ok(Self {
            kv_cache: share(KV_CACHE, Self::KV_CACHE_SHARE)?,
            activations: share(ACTIVATIONS, Self::ACTIVATIONS_SHARE)?,
            uniforms: share(UNIFORMS, Self::UNIFORMS_SHARE)?,
        })
    }

    pub(crate) fn named(&self) -> [(&'static str, &PoolConfig); 3] {
        [(KV_CACHE, &self.kv_cache), (ACTIVATIONS, &self.activations), (UNIFORMS, &self.uniforms)]
    }
}
