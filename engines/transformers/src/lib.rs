#![doc = include_str!("../README.md")]

use std::time::Duration;

use usine_engine::Device;
use usine_engine_sim::{Batching, ConfigError, Flavor, Profile, Q4, Q5, Shape, SimConfig, SimEngine, TINY, Timeline};

/// The engine's name, as model specs name it.
pub const NAME: &str = "transformers";
/// The thread count the CPU profile's figures were taken at.
pub const REFERENCE_THREADS: usize = 4;

const fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// The seeds' default thread count: the machine's cores minus two, at least one.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get().saturating_sub(2).max(1))
}

/// Decode on `threads` threads: the step shrinks in proportion (decode on a CPU is compute-bound and
/// splits well across cores, up to memory bandwidth, which the profiles do not model).
fn scaled(step: Duration, threads: usize) -> Duration {
    let threads = u32::try_from(threads.max(1)).unwrap_or(u32::MAX);
    step * u32::try_from(REFERENCE_THREADS).expect("a small constant") / threads
}

/// A tiny model for demos and tests.
pub fn tiny(threads: usize) -> Profile {
    Profile {
        name: "tiny",
        source: "a 10M-parameter toy shape; timings scaled down from cpu-1b for fast tests",
        shape: TINY,
        timeline: Timeline {
            compile: vec![("loading weights", ms(30)), ("optimizing graph", ms(50))],
            load: ms(20),
            prefill_per_token: Duration::from_micros(500),
            prepare: ms(1),
            compute: scaled(ms(4), threads),
            first_use: ms(20),
            batch: Batching { max: 16, per_sequence: scaled(Duration::from_micros(500), threads) }, // 1/8 of a step
        },
        graph_bytes: 32 << 10,
    }
}

/// A 1B-class model on a laptop CPU: about 12 tokens/s on 4 threads (the seeds' CPU figure), scaled by
/// the thread count.
pub fn cpu_1b(threads: usize) -> Profile {
    Profile {
        name: "cpu-1b",
        source: "TinyLlama-1.1B shape (22 layers, 2048 hidden, 4 kv heads of 64); 12 tokens/s on 4 threads from the seeds, \
                 1.5 s graph optimization, 300 ms cached load, 6 ms per prompt token, 400 ms first use",
        shape: Shape {
            params: 1_100_000_000,
            layers: 22,
            hidden: 2048,
            kv_heads: 4,
            head_dim: 64,
            vocab: 32_000,
            max_context: 2048,
        },
        timeline: Timeline {
            compile: vec![("loading weights", ms(600)), ("optimizing graph", ms(900))],
            load: ms(300),
            prefill_per_token: ms(6),
            prepare: ms(5),
            compute: scaled(ms(84), threads), // 11.9 tokens/s on 4 threads
            first_use: ms(400),
            batch: Batching { max: 16, per_sequence: scaled(Duration::from_micros(10_500), threads) }, // 1/8 of a step
        },
        graph_bytes: 2 << 20,
    }
}

/// The Transformers-like flavor on `threads` threads: profiles `tiny` and `cpu-1b`, quantizations `q4`
/// (default) and `q5`.
pub fn flavor(threads: usize) -> Flavor {
    Flavor {
        name: NAME,
        version: "3.0.0-sim",
        device: Device::Cpu,
        profiles: vec![tiny(threads), cpu_1b(threads)],
        quantizations: vec![Q4, Q5],
    }
}

/// A simulated Transformers-like engine decoding on `threads` threads ([`default_threads`] is the
/// seeds' default); fails on a jitter outside 0..=1.
pub fn transformers(config: SimConfig, threads: usize) -> Result<SimEngine, ConfigError> {
    SimEngine::new(flavor(threads), config)
}
