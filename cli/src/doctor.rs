//! `usine doctor`: what this machine is (cores, memory, a GPU where one can be read) and the profile usine
//! picks from it: threads, pool sizes, engine and model.

use serde_json::json;
use sysinfo::System;

use crate::config::Loaded;
use crate::output;

/// A GPU, as NVML reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Gpu {
    name: String,
    memory_bytes: u64,
}

/// The seeds' GPU memory profiles: under 6 GiB a small model, 6 to 12 GiB the 7B at 4 bits, above that
/// the 7B at 5 bits (more exact); no GPU, the CPU engine.
fn profile(gpu: Option<&Gpu>) -> (&'static str, &'static str, &'static str, &'static str) {
    match gpu.map(|gpu| gpu.memory_bytes) {
        None => ("cpu", "transformers", "cpu-1b", "no GPU: the CPU engine"),
        Some(bytes) if bytes < 6 << 30 => ("low_memory", "webllm", "tiny", "under 6 GiB of GPU memory"),
        Some(bytes) if bytes < 12 << 30 => ("balanced", "webllm", "7b", "6 to 12 GiB: the 7B at q4"),
        Some(_) => ("performance", "webllm", "7b", "12 GiB or more: the 7B, q5 fits"),
    }
}

#[cfg(feature = "nvml")]
fn gpus() -> Result<Vec<Gpu>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|error| format!("NVML unavailable: {error}"))?;
    let count = nvml.device_count().map_err(|error| error.to_string())?;
    (0..count)
        .map(|index| {
            let device = nvml.device_by_index(index).map_err(|error| error.to_string())?;
            let name = device.name().map_err(|error| error.to_string())?;
            let memory = device.memory_info().map_err(|error| error.to_string())?;
            Ok(Gpu { name, memory_bytes: memory.total })
        })
        .collect()
}

#[cfg(not(feature = "nvml"))]
fn gpus() -> Result<Vec<Gpu>, String> {
    Err("built without the `nvml` feature: GPUs are not read".to_owned())
}

/// Where the candle engine would run its passes with this configuration's `device`: a card described,
/// or the CPU and why.
fn candle_device(loaded: &Loaded) -> String {
    #[cfg(feature = "candle")]
    {
        let device = &loaded.config.device;
        let engine = device
            .parse::<usine_engine_candle::Target>()
            .map_err(|error| anyhow::anyhow!(error))
            .and_then(|target| Ok(usine_engine_candle::CandleEngine::with_target(1, target)?));
        match engine {
            Ok(engine) => match engine.card() {
                Some(card) => format!("{card} (`device` {device})"),
                None if cfg!(feature = "cuda") => format!("the CPU (`device` {device}: no CUDA card here)"),
                None => format!("the CPU (`device` {device}; a build without the `cuda` feature)"),
            },
            Err(error) => format!("none: {error}"),
        }
    }
    #[cfg(not(feature = "candle"))]
    {
        let _ = loaded;
        "none (a build without the candle engine)".to_owned()
    }
}

pub(crate) fn doctor(loaded: &Loaded, remote: Option<crate::app::RemoteStatus>, json: bool) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut system = System::new();
    system.refresh_memory();
    let memory = system.total_memory();
    let available = system.available_memory();
    let (gpus, gpu_note) = match gpus() {
        Ok(gpus) => (gpus, None),
        Err(note) => (Vec::new(), Some(note)),
    };
    let threads = crate::app::threads(loaded);
    let pools = crate::app::pools(loaded)?;
    let (name, engine, model, why) = profile(gpus.first());
    let candle = candle_device(loaded);
    if json {
        let gpus: Vec<_> =
            gpus.iter().map(|gpu| json!({ "name": gpu.name, "memory_bytes": gpu.memory_bytes })).collect();
        output::json(&json!({
            "cores": cores, "memory_bytes": memory, "available_memory_bytes": available, "gpus": gpus,
            "gpu_note": gpu_note,
            "profile": { "name": name, "engine": engine, "model": model, "why": why },
            "threads": threads,
            "candle_device": candle,
            "remote": remote.as_ref().map(crate::app::RemoteStatus::json),
            "pools": {
                "kv-cache": pools.kv_cache.capacity, "activations": pools.activations.capacity,
                "uniforms": pools.uniforms.capacity, "weights": loaded.config.weights_budget_mib << 20,
            },
        }));
        return Ok(());
    }
    outln!("machine");
    outln!("  cores        {cores}");
    outln!("  memory       {} ({} available)", output::bytes(memory), output::bytes(available));
    match (&gpus[..], &gpu_note) {
        ([], Some(note)) => outln!("  gpu          none read ({note})"),
        ([], None) => outln!("  gpu          none"),
        (gpus, _) => {
            for gpu in gpus {
                outln!("  gpu          {} ({})", gpu.name, output::bytes(gpu.memory_bytes));
            }
        }
    }
    outln!("usine's choices for this machine");
    outln!("  profile      {name} ({why})");
    outln!(
        "  engine       {engine}, model {model} recommended (the default is webllm/7b, simulated; set `engine` and `model`)"
    );
    outln!("  threads      {threads} (cores minus two, at least one; `threads` overrides)");
    outln!("  candle       passes on {candle}");
    outln!(
        "  pools        kv-cache {}, activations {}, uniforms {} (memory_budget_mib {}); weights {}",
        output::bytes(pools.kv_cache.capacity),
        output::bytes(pools.activations.capacity),
        output::bytes(pools.uniforms.capacity),
        loaded.config.memory_budget_mib,
        output::bytes(loaded.config.weights_budget_mib << 20)
    );
    if let Some(remote) = remote {
        outln!("  remote tier  {}", remote.line());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_follows_the_gpu_memory() {
        let gpu = |gib: u64| Gpu { name: "test".into(), memory_bytes: gib << 30 };
        assert_eq!(profile(None).0, "cpu");
        assert_eq!(profile(Some(&gpu(4))).0, "low_memory");
        assert_eq!(profile(Some(&gpu(6))).0, "balanced");
        assert_eq!(profile(Some(&gpu(24))).0, "performance");
    }
}
