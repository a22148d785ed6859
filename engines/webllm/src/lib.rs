#![doc = include_str!("../README.md")]

use std::time::Duration;

use usine_engine::Device;
use usine_engine_sim::{Batching, ConfigError, Flavor, Profile, Q4, Q5, Shape, SimConfig, SimEngine, TINY, Timeline};

/// The engine's name, as model specs name it.
pub const NAME: &str = "webllm";

const fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

const fn us(micros: u64) -> Duration {
    Duration::from_micros(micros)
}

/// A tiny model for demos and tests: every stage takes milliseconds.
pub fn tiny() -> Profile {
    Profile {
        name: "tiny",
        source: "a 10M-parameter toy shape; timings scaled down from the 7b profile for fast tests",
        shape: TINY,
        timeline: Timeline {
            compile: vec![
                ("fetching weights", ms(40)),
                ("compiling shaders", ms(80)),
                ("building pipelines", ms(20)),
                ("writing cache", ms(10)),
            ],
            load: ms(15),
            prefill_per_token: us(200),
            prepare: ms(1),
            compute: ms(2),
            first_use: ms(30),
            batch: Batching { max: 64, per_sequence: Duration::from_micros(20) }, // 1 % of a step
        },
        graph_bytes: 64 << 10,
    }
}

/// A 7B-class model on a laptop GPU, shaped on the seeds: compile about 4 s on first load, cached load
/// under 200 ms, about 28 tokens/s of decode, a prefill cost per prompt token, and a first-generation
/// penalty that warming removes.
pub fn seven_b() -> Profile {
    Profile {
        name: "7b",
        source: "Llama-2-7B shape (32 layers, 4096 hidden, 32 kv heads of 128); timings from the seeds: 4 s compile, \
                 150 ms cached load, 28 tokens/s on a laptop GPU (18-35 measured; 36 ms a step), 1.5 ms per prompt \
                 token, 800 ms first use",
        shape: Shape {
            params: 6_740_000_000,
            layers: 32,
            hidden: 4096,
            kv_heads: 32,
            head_dim: 128,
            vocab: 32_000,
            max_context: 4096,
        },
        timeline: Timeline {
            compile: vec![
                ("fetching weights", ms(1200)),
                ("compiling shaders", ms(2000)),
                ("building pipelines", ms(600)),
                ("writing cache", ms(200)),
            ],
            load: ms(150),
            prefill_per_token: us(1500),
            prepare: ms(2),
            compute: ms(36), // 27.8 tokens/s
            first_use: ms(800),
            batch: Batching { max: 64, per_sequence: Duration::from_micros(360) }, // 1 % of a step
        },
        graph_bytes: 4 << 20,
    }
}

/// The WebLLM-like flavor: profiles `tiny` and `7b`, quantizations `q4` (default) and `q5`.
pub fn flavor() -> Flavor {
    Flavor {
        name: NAME,
        version: "0.2.79-sim",
        device: Device::Gpu,
        profiles: vec![tiny(), seven_b()],
        quantizations: vec![Q4, Q5],
    }
}

/// A simulated WebLLM-like engine; fails on a jitter outside 0..=1.
pub fn webllm(config: SimConfig) -> Result<SimEngine, ConfigError> {
    SimEngine::new(flavor(), config)
}
