//! `cargo xtask gpu`: the candle engine on an NVIDIA card, in two halves, since the GPU machine has
//! no Rust toolchain and no network:
//!
//! - `cargo xtask gpu --bundle` (on the build machine): builds in release `usine` with the `cuda`
//!   feature, the engine's `random_model` example and this xtask, into `gpu-bundle/` (ignored by git).
//! - `gpu-bundle/xtask gpu` (on the GPU machine, from anywhere): makes the random models there, then
//!   1. checks that the card gives the CPU's greedy tokens on tiny models of both architectures, Q8_0 and
//!      Q4_0 (the passes differ in the order of float sums only);
//!   2. measures, per model: the first start (the graph compiled, the CUDA kernels with it) and a cached
//!      start (nothing compiled: the kernels come from the graph), the time to the first token, and
//!      `usine bench streams` (1, 4, 16 and 64 generations at once) on the card;
//!   3. runs the peers on the same shapes: llama.cpp, built there with its CUDA backend from the source
//!      `peers/llama-cpp` vendors (the bundle carries it, trimmed), through `peers/llama-cpp/gpu/bench.cpp`
//!      on the same GGUF files; and PyTorch's f16 matrix-vector chain (`peers/pytorch/matvec_chain.py`),
//!      eager and as a CUDA graph;
//!   4. prints a table: decode tokens/s at one stream and the share of the card's memory bandwidth it
//!      implies (the weights' bytes a token reads × tokens/s ÷ the card's bandwidth), beside the peers.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

/// Where CUDA's toolkit keeps NVRTC on the GPU machine.
const CUDA_LIBRARIES: &str = "/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib";

/// The bundle's folder, in the workspace root.
const BUNDLE: &str = "gpu-bundle";

/// Tiny models whose greedy tokens the card must give as the CPU does: preset and type.
const PARITY: [(&str, &str); 3] = [("tiny-llama", "q8_0"), ("tiny-llama", "q4_0"), ("tiny-qwen2", "q8_0")];

/// The speed table's models: preset, type and layers (their real counts).
const MODELS: [(&str, &str, usize); 3] =
    [("llama-3.2-1b", "q8_0", 16), ("llama-3.1-8b", "q4_0", 32), ("llama-3.1-8b", "q8_0", 32)];

/// The presets' widths, for the PyTorch peer: dim, heads, key-value heads, head width, feed-forward
/// width, vocabulary (the engine's `presets()`; xtask depends on no workspace crate).
fn widths(preset: &str) -> [usize; 6] {
    match preset {
        "llama-3.2-1b" => [2048, 32, 8, 64, 8192, 128_256],
        _ => [4096, 32, 8, 128, 14_336, 128_256],
    }
}

/// Prompt tokens and generated tokens of each peer stream.
const PEER_PROMPT: &str = "64";
const PEER_TOKENS: &str = "32";

/// llama.cpp's folders a CUDA build of the library needs: the rest (other backends, the server's web
/// interface) stays behind, to keep the bundle small.
const LLAMA_PATHS: [&str; 9] =
    ["CMakeLists.txt", "LICENSE", "cmake", "common", "include", "src", "tools", "vendor", "ggml"];
const LLAMA_LEFT_OUT: [&str; 15] = [
    "ggml/src/ggml-vulkan",
    "ggml/src/ggml-sycl",
    "ggml/src/ggml-opencl",
    "ggml/src/ggml-metal",
    "ggml/src/ggml-hexagon",
    "ggml/src/ggml-cann",
    "ggml/src/ggml-musa",
    "ggml/src/ggml-et",
    "ggml/src/ggml-webgpu",
    "ggml/src/ggml-zdnn",
    "ggml/src/ggml-zendnn",
    "ggml/src/ggml-openvino",
    "ggml/src/ggml-virtgpu",
    "tools/server",
    "tools/ui",
];

/// The llama.cpp source `peers/llama-cpp` builds (the `llama-cpp-sys-2` crate's copy).
fn llama_source(root: &Path) -> Result<PathBuf> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .manifest_path(root.join("peers").join("llama-cpp").join("Cargo.toml"))
        .exec()
        .context("the llama.cpp peer's metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "llama-cpp-sys-2")
        .context("no llama-cpp-sys-2 under peers/llama-cpp")?;
    Ok(package.manifest_path.parent().context("a manifest's folder")?.join("llama.cpp").into_std_path_buf())
}

/// Builds the bundle: `usine` (feature `cuda`), `random_model` and this xtask, in release.
pub(crate) fn bundle(root: &Path) -> Result<ExitCode> {
    let cargo = env!("CARGO");
    let build = |args: &[&str]| -> Result<()> {
        eprintln!("cargo build --release {}", args.join(" "));
        let status = Command::new(cargo).arg("build").arg("--release").args(args).current_dir(root).status()?;
        ensure!(status.success(), "cargo build --release {} failed", args.join(" "));
        Ok(())
    };
    build(&["-p", "usine-cli", "--features", "cuda"])?;
    build(&["-p", "usine-engine-candle", "--example", "random_model"])?;
    build(&["-p", "xtask"])?;
    let release = root.join("target").join("release");
    let bundle = root.join(BUNDLE);
    std::fs::create_dir_all(&bundle)?;
    for (from, to) in [
        (release.join("usine"), "usine"),
        (release.join("examples").join("random_model"), "random_model"),
        (release.join("xtask"), "xtask"),
        (root.join("peers").join("llama-cpp").join("gpu").join("bench.cpp"), "bench.cpp"),
        (root.join("peers").join("pytorch").join("matvec_chain.py"), "matvec_chain.py"),
    ] {
        std::fs::copy(&from, bundle.join(to)).with_context(|| format!("copying {}", from.display()))?;
    }
    let source = llama_source(root)?;
    let mut tar = Command::new("tar");
    tar.arg("-czf").arg(bundle.join("llama.cpp.tar.gz")).arg("-C").arg(source.parent().context("its folder")?);
    for left_out in LLAMA_LEFT_OUT {
        tar.arg(format!("--exclude=llama.cpp/{left_out}"));
    }
    tar.args(LLAMA_PATHS.map(|path| format!("llama.cpp/{path}")));
    ensure!(tar.status()?.success(), "tar of {} failed", source.display());
    eprintln!("{} is ready: carry it to the GPU machine and run `{BUNDLE}/xtask gpu` there", bundle.display());
    Ok(ExitCode::SUCCESS)
}

/// The bundle's tools, and a work folder beside them.
struct Tools {
    usine: PathBuf,
    generator: PathBuf,
    work: PathBuf,
}

impl Tools {
    /// `usine ARGS` on `device`, with the cache folder `cache`, its stdout's JSON lines.
    fn usine(&self, device: &str, cache: &Path, args: &[&str]) -> Result<Vec<Value>> {
        // NVRTC lies in the toolkit's folder, which the loader does not search by itself.
        let libraries = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        let output = Command::new(&self.usine)
            .env("LD_LIBRARY_PATH", format!("{CUDA_LIBRARIES}:{libraries}"))
            .env("USINE_DEVICE", device)
            .env("USINE_CACHE_DIR", cache)
            .env("RUST_BACKTRACE", "0")
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.usine.display()))?;
        ensure!(
            output.status.success(),
            "usine {} on {device} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).lines().filter_map(|line| serde_json::from_str(line).ok()).collect())
    }

    /// A random model of `preset`, `kind` and `layers`, written once into the work folder.
    fn model(&self, preset: &str, kind: &str, layers: usize) -> Result<PathBuf> {
        let path = self.work.join(format!("{preset}-{layers}-{kind}.gguf"));
        if !path.exists() {
            eprintln!("writing {}", path.display());
            let status = Command::new(&self.generator)
                .args(["gguf", preset, kind])
                .arg(&path)
                .arg(layers.to_string())
                .status()?;
            ensure!(status.success(), "random_model gguf {preset} {kind} failed");
        }
        Ok(path)
    }
}

/// Builds the llama.cpp peer with CUDA for `capability` (`90`) in the work folder, once: the library
/// from the bundle's source, then `bench.cpp` against it. `None`, saying why, where the machine has no
/// nvcc or CMake.
fn llama_peer(bundle: &Path, work: &Path, capability: &str) -> Result<Option<PathBuf>> {
    let peer = work.join("llama-peer");
    if peer.exists() {
        return Ok(Some(peer));
    }
    let nvcc = Path::new("/usr/local/cuda/bin/nvcc");
    if !nvcc.exists() || Command::new("cmake").arg("--version").output().is_err() {
        eprintln!("llama.cpp peer: no nvcc at {} or no cmake: not built", nvcc.display());
        return Ok(None);
    }
    let source = work.join("llama-source");
    if !source.join("llama.cpp").exists() {
        std::fs::create_dir_all(&source)?;
        let status =
            Command::new("tar").arg("-xzf").arg(bundle.join("llama.cpp.tar.gz")).arg("-C").arg(&source).status()?;
        ensure!(status.success(), "extracting llama.cpp failed");
    }
    let build = work.join("llama-build");
    let started = std::time::Instant::now();
    let status = Command::new("cmake")
        .arg("-S")
        .arg(source.join("llama.cpp"))
        .arg("-B")
        .arg(&build)
        .args(["-DGGML_CUDA=ON", &format!("-DCMAKE_CUDA_ARCHITECTURES={capability}")])
        .arg(format!("-DCMAKE_CUDA_COMPILER={}", nvcc.display()))
        .args(["-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"])
        .args(["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
        .args(["-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_APP=OFF"])
        .stdout(std::process::Stdio::null())
        .status()?;
    ensure!(status.success(), "configuring llama.cpp with CUDA failed");
    let jobs = std::thread::available_parallelism().map_or(4, std::num::NonZero::get).to_string();
    let status = Command::new("cmake")
        .arg("--build")
        .arg(&build)
        .args(["--target", "llama", "-j", &jobs])
        .stdout(std::process::Stdio::null())
        .status()?;
    ensure!(status.success(), "building llama.cpp with CUDA failed");
    let libraries = build.join("bin");
    let status = Command::new("g++")
        .args(["-O2", "-std=c++17"])
        .arg(bundle.join("bench.cpp"))
        .arg("-I")
        .arg(source.join("llama.cpp").join("include"))
        .arg("-I")
        .arg(source.join("llama.cpp").join("ggml").join("include"))
        .arg(format!("-L{}", libraries.display()))
        .arg("-lllama")
        .arg(format!("-Wl,-rpath,{}", libraries.display()))
        .arg("-o")
        .arg(&peer)
        .status()?;
    ensure!(status.success(), "compiling the llama.cpp peer failed");
    eprintln!("llama.cpp peer built with CUDA in {:.0} s", started.elapsed().as_secs_f64());
    Ok(Some(peer))
}

/// The peer's decode tokens/s by stream count on `model`.
fn llama_rates(peer: &Path, model: &Path) -> Result<Vec<(u64, f64)>> {
    let output = Command::new(peer).arg(model).args([PEER_PROMPT, PEER_TOKENS, "1", "4", "16", "64"]).output()?;
    ensure!(output.status.success(), "the llama.cpp peer failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|row| Some((row["streams"].as_u64()?, row["decode_tokens_per_second"].as_f64()?)))
        .collect())
}

/// PyTorch's f16 chain on `preset`'s shapes with `layers` layers: tokens/s eager and as a graph.
fn pytorch(bundle: &Path, preset: &str, layers: usize) -> Result<(f64, f64)> {
    let [dim, heads, kv_heads, head_dim, ffn, vocab] = widths(preset);
    let output = Command::new("python3")
        .arg(bundle.join("matvec_chain.py"))
        .args([dim, layers, heads, kv_heads, head_dim, ffn, vocab].map(|value| value.to_string()))
        .output()?;
    ensure!(output.status.success(), "the PyTorch peer failed: {}", String::from_utf8_lossy(&output.stderr));
    let value: Value = serde_json::from_slice(output.stdout.trim_ascii()).context("the PyTorch peer's line")?;
    Ok((
        value["eager_tokens_per_second"].as_f64().unwrap_or_default(),
        value["graph_tokens_per_second"].as_f64().unwrap_or_default(),
    ))
}

/// The greedy tokens of `usine run` on `device`.
fn tokens(events: &[Value]) -> Vec<u64> {
    events.iter().filter(|event| event["event"] == "token").filter_map(|event| event["id"].as_u64()).collect()
}

/// The card's name and its memory bandwidth in bytes/s (the maker's figure for the cards known).
fn card() -> Result<(String, f64)> {
    let output = Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
        .output()
        .context("nvidia-smi")?;
    let line = String::from_utf8_lossy(&output.stdout).lines().next().unwrap_or_default().to_owned();
    let bandwidth = if line.contains("H200") {
        4.8e12
    } else if line.contains("H100") && (line.contains("HBM3") || line.contains("SXM")) {
        3.35e12
    } else if line.contains("H100") {
        2.0e12
    } else {
        bail!("no bandwidth known for the card `{line}`");
    };
    Ok((line, bandwidth))
}

/// Runs the checks and measures on this machine's card (see the module's documentation); `models`
/// (`--models NAME,...`) keeps the table's models whose `PRESET-TYPE` contains one of the names.
pub(crate) fn run(models: Option<&str>) -> Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let bundle = exe.parent().context("the xtask's folder")?;
    let work = std::env::temp_dir().join("usine-gpu");
    std::fs::create_dir_all(&work)?;
    let tools = Tools { usine: bundle.join("usine"), generator: bundle.join("random_model"), work };
    let (card, bandwidth) = card()?;
    eprintln!("card: {card}");
    let capability = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().replace('.', ""))
        .unwrap_or_default();
    let peer = llama_peer(bundle, &tools.work, &capability).unwrap_or_else(|error| {
        eprintln!("llama.cpp peer: {error:#}");
        None
    });

    let mut failures = Vec::new();
    for (preset, kind) in PARITY {
        let model = tools.model(preset, kind, 2)?;
        let model = model.to_str().context("a UTF-8 path")?;
        let args = ["run", "--model", model, "--temperature", "0", "--max-tokens", "48", "--json", "The kernel"];
        let cpu = tokens(&tools.usine("cpu", &tools.work.join("cache-cpu"), &args)?);
        let gpu = tokens(&tools.usine("cuda", &tools.work.join("cache-gpu"), &args)?);
        let same = cpu.iter().zip(&gpu).take_while(|(a, b)| a == b).count();
        eprintln!("parity {preset} {kind}: {same} of {} greedy tokens the same on the card", cpu.len());
        if cpu != gpu || cpu.is_empty() {
            failures.push(format!("{preset} {kind}: the card's tokens {gpu:?}, the CPU's {cpu:?}"));
        }
    }

    let mut rows = Vec::new();
    let wanted = |preset: &str, kind: &str| {
        models.is_none_or(|names| names.split(',').any(|name| format!("{preset}-{kind}").contains(name)))
    };
    for (preset, kind, layers) in MODELS.into_iter().filter(|(preset, kind, _)| wanted(preset, kind)) {
        let path = tools.model(preset, kind, layers)?;
        let bytes = std::fs::metadata(&path)?.len();
        let model = path.to_str().context("a UTF-8 path")?;
        let cache = tools.work.join(format!("cache-{preset}-{kind}"));
        let _ = std::fs::remove_dir_all(&cache); // the first start compiles
        let args = ["run", "--model", model, "--temperature", "0", "--max-tokens", "16", "--json", "The kernel"];
        let loaded = |events: &[Value]| -> Result<(String, f64, f64)> {
            let loaded = events.iter().find(|event| event["event"] == "loaded").context("no `loaded` event")?;
            let finished = events.iter().find(|event| event["event"] == "finished").context("no `finished` event")?;
            Ok((
                loaded["source"].as_str().unwrap_or_default().to_owned(),
                loaded["seconds"].as_f64().unwrap_or_default(),
                finished["usage"]["time_to_first_token_seconds"].as_f64().unwrap_or_default(),
            ))
        };
        let first = loaded(&tools.usine("cuda", &cache, &args)?)?;
        let cached = loaded(&tools.usine("cuda", &cache, &args)?)?;
        eprintln!("{preset} {kind}: first start {first:?}, cached {cached:?}");
        let bench = tools.usine("cuda", &cache, &["bench", "streams", "--model", model, "--json"])?;
        let streams = bench.last().map(|value| value["streams"]["rows"].clone()).unwrap_or_default();
        let rates: Vec<(u64, f64)> = streams
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter_map(|row| Some((row["streams"].as_u64()?, row["decode_tokens_per_second"].as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        eprintln!("{preset} {kind}: decode tokens/s by streams {rates:?}");
        let one = rates.first().map_or(0.0, |(_, rate)| *rate);
        #[expect(clippy::cast_precision_loss, reason = "a file's bytes")]
        let share = bytes as f64 * one / bandwidth;
        let by_streams = |rates: &[(u64, f64)]| {
            rates.iter().map(|(streams, rate)| format!("{streams}: {rate:.0}")).collect::<Vec<_>>().join(", ")
        };
        let theirs = match &peer {
            Some(peer) => llama_rates(peer, &path).unwrap_or_else(|error| {
                eprintln!("llama.cpp peer on {preset} {kind}: {error:#}");
                Vec::new()
            }),
            None => Vec::new(),
        };
        eprintln!("{preset} {kind}: llama.cpp decode tokens/s by streams {theirs:?}");
        let torch = pytorch(bundle, preset, layers)
            .map(|(eager, graph)| format!("{eager:.0} / {graph:.0}"))
            .unwrap_or_else(|error| format!("({error:#})"));
        eprintln!("{preset} {kind}: PyTorch f16 chain (eager / graph) {torch}");
        rows.push(format!(
            "| {preset} {kind} | {:.2} GB | {one:.1} | {:.0} % | {} | {torch} | {} | {} | {:.2} s ({}) | {:.2} s ({}), first token {:.0} ms |",
            bytes as f64 / 1e9,
            share * 100.0,
            theirs.first().map_or_else(|| "-".to_owned(), |(_, rate)| format!("{rate:.1}")),
            by_streams(&rates),
            by_streams(&theirs),
            first.1,
            first.0,
            cached.1,
            cached.0,
            cached.2 * 1e3
        ));
    }
    eprintln!("card: {card}; bandwidth {:.2} TB/s", bandwidth / 1e12);
    eprintln!(
        "| model | weights | usine decode tokens/s, 1 stream | of the bandwidth | llama.cpp, 1 stream | PyTorch f16 chain, eager / graph | usine aggregate by streams | llama.cpp aggregate by streams | first start | cached start |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        eprintln!("{row}");
    }
    if failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for failure in &failures {
            eprintln!("parity: {failure}");
        }
        Ok(ExitCode::FAILURE)
    }
}
