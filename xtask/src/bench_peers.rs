//! `cargo xtask bench-peers`: the candle engine against llama.cpp on the same GGUF files. Random-weight
//! models of about 17 M and 58 M parameters, Q8_0 and Q4_0, one and two threads.
//!
//! Each GGUF file is compiled once per invocation, then compiled again four times, each compile failing
//! unless it gives the file's bytes; the file is checked unchanged after the runs. Both sides are timed
//! alike, in processes of their own, from the file on disk to the first token ready (read or map the file,
//! load, prefill, first greedy token), with the file's pages dropped from the page cache (cold) and
//! then kept (warm), and on to 128 greedy tokens (decode tokens/s over the 127 after the first). Both
//! start from usine's prompt token ids, and their greedy tokens must agree (see [`agreement`]). Each side
//! runs once to warm up, then eleven times in turns with the other; each column shows its own median. A run
//! during which other programs took CPU time is run again (see [`MAX_OTHERS`]).
//!
//! usine is the portable build (its kernels picked at run time; `USINE_ISA` passes through, and where the
//! best is AVX-512 VNNI a column shows the AVX2 kernels too); llama.cpp is built for this CPU, from
//! source, by the `llama-cpp-2` crate in `peers/llama-cpp` (a workspace of its own, out of the default
//! build and of `cargo test`); it needs cmake and libclang, installed from Debian's packages when missing.
//!
//! `--real` measures another table instead ([`real`]): models of real shapes, through the `usine` binary.
//! `--batch` another ([`batch`]): many generations at once, usine's continuous batching against
//! llama.cpp's batch API.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

pub(crate) mod batch;
pub(crate) mod real;

const SIZES: [&str; 2] = ["17m", "58m"];
const QUANTIZATIONS: [&str; 2] = ["q8_0", "q4_0"];
const THREADS: [&str; 2] = ["1", "2"];
const TOKENS: usize = 128;
/// Measured runs of each side per row; the table shows medians.
const REPEATS: usize = 11;
/// Compiles of each file: the first writes it, the others must give its bytes; the table shows the median.
const COMPILES: usize = 5;
/// The largest gap between llama.cpp's best logit and its runner-up at which usine may pick the
/// runner-up. Both quantize each product's vector to Q8_0, so a rounding difference anywhere (f16 or
/// f32 scales and kv-cache, the order of sums) flips some quants, and that grows through the layers of
/// these random models. Measured on the same contexts (llama.cpp's 128 greedy tokens; 17m Q8_0, 58m
/// Q4_0; logits spread with a standard deviation of 0.6): the two sides' logits differ by up to 0.034
/// and their top-two gaps by up to 0.033; usine's portable and SIMD kernels, whose sums only run in
/// another order, by up to 0.027 and 0.025. A pick that differs where the gap is larger is a fault.
const NEAR_TIE: f64 = 0.05;
/// The CPU time other programs may take during a run, as a share of its time, and two ticks more (both
/// sides read it from Linux's /proc/stat less their own, sampled in ticks of 10 ms; a quiet machine shows
/// 0 to 3 ticks per run): a run over it is run again, up to [`TRIES`] times, and the least disturbed
/// kept. On a shared two-core machine one build next door halves a two-thread run.
const MAX_OTHERS: f64 = 0.1;
const TICKS_SLACK: f64 = 0.02;
const TRIES: usize = 8;
/// How cold runs drop the file's pages from the page cache.
const DROP_METHOD: &str =
    "posix_fadvise(POSIX_FADV_DONTNEED) on the file (GNU dd iflag=nocache count=0), checked with fincore";

pub(crate) fn run_json(command: &mut Command) -> Result<Value> {
    let output = command.output().with_context(|| format!("starting {command:?}"))?;
    ensure!(output.status.success(), "{command:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout)?;
    let line = text.lines().last().with_context(|| format!("{command:?}: no output"))?;
    serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))
}

fn number(value: &Value, key: &str) -> Result<f64> {
    value[key].as_f64().with_context(|| format!("no number `{key}` in {value}"))
}

pub(crate) fn ids(value: &Value, key: &str) -> Result<Vec<u64>> {
    let list = value[key].as_array().with_context(|| format!("no list `{key}` in {value}"))?;
    list.iter().map(|id| id.as_u64().with_context(|| format!("`{key}`: {id} is not a token id"))).collect()
}

/// The median of `key` over `runs`.
fn median(runs: &[Value], key: &str) -> Result<f64> {
    let mut values = runs.iter().map(|run| number(run, key)).collect::<Result<Vec<_>>>()?;
    ensure!(!values.is_empty(), "no runs");
    values.sort_by(f64::total_cmp);
    Ok(values[values.len() / 2])
}

/// How far a run's greedy tokens agree with llama.cpp's reference run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Agreement {
    /// Tokens equal from the first.
    pub(crate) matched: usize,
    /// At the first difference, the reference's gap between its best logit and the runner-up, which
    /// the run picked; comparing stops there (the contexts differ after it).
    pub(crate) near_tie: Option<f64>,
}

/// `tokens` against the `reference` run of llama.cpp: equal, or equal up to a step where llama.cpp's
/// two best logits are within [`NEAR_TIE`] and `tokens` has its runner-up. Anything else is an error.
pub(crate) fn agreement(tokens: &[u64], reference: &Value) -> Result<Agreement> {
    let (expected, runner_up) = (ids(reference, "tokens")?, ids(reference, "runner_up")?);
    let gaps = reference["gaps"].as_array().context("no `gaps` in the reference")?;
    ensure!(tokens.len() == expected.len(), "{} tokens, llama.cpp {}", tokens.len(), expected.len());
    let Some(at) = tokens.iter().zip(&expected).position(|(a, b)| a != b) else {
        return Ok(Agreement { matched: tokens.len(), near_tie: None });
    };
    let gap = gaps.get(at).and_then(Value::as_f64).with_context(|| format!("no gap at step {at}"))?;
    ensure!(
        gap <= NEAR_TIE && runner_up.get(at) == Some(&tokens[at]),
        "greedy tokens differ at step {at}: {} where llama.cpp has {} (its runner-up {:?}, {gap} below; a near-tie \
         is {NEAR_TIE} at most)\n  this run: {tokens:?}\n  llama.cpp: {expected:?}",
        tokens[at],
        expected[at],
        runner_up.get(at),
    );
    Ok(Agreement { matched: at, near_tie: Some(gap) })
}

/// Whether `name` is a file of libclang itself (`libclang.so*`, `libclang-14.so*`), not of its C++ API.
fn is_libclang(name: &str) -> bool {
    let versioned = name.strip_prefix("libclang-").is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    (name.starts_with("libclang.so") || versioned) && name.contains(".so")
}

/// Where bindgen (through clang-sys) looks for libclang: `LIBCLANG_PATH`, then LLVM's folders.
fn libclang_found() -> Option<PathBuf> {
    let mut folders: Vec<PathBuf> = std::env::var_os("LIBCLANG_PATH").map(PathBuf::from).into_iter().collect();
    for parent in ["/usr/lib", "/usr/lib64", "/usr/local/lib"] {
        folders.push(PathBuf::from(parent));
        folders.push(PathBuf::from(parent).join("x86_64-linux-gnu"));
        if let Ok(entries) = std::fs::read_dir(parent) {
            let llvm = entries.flatten().filter(|entry| entry.file_name().to_string_lossy().starts_with("llvm"));
            folders.extend(llvm.map(|entry| entry.path().join("lib")));
        }
    }
    folders.into_iter().find_map(|folder| {
        std::fs::read_dir(folder)
            .ok()?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.file_name().is_some_and(|name| is_libclang(&name.to_string_lossy())))
    })
}

/// libclang (for the peer's bindings), from Debian's `libclang-dev` when missing: it has no command by
/// which `integration::installed` could find it.
fn libclang() -> Result<PathBuf> {
    if let Some(found) = libclang_found() {
        return Ok(found);
    }
    crate::integration::apt_install("libclang-dev")?;
    libclang_found().context("libclang-dev is installed, but no libclang.so was found (set LIBCLANG_PATH)")
}

/// Bytes of `file` in the page cache, as util-linux's `fincore` reads them.
fn resident_bytes(file: &Path) -> Result<u64> {
    let output = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .context("running fincore (util-linux)")?;
    ensure!(output.status.success(), "fincore failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout)?;
    text.trim().parse().with_context(|| format!("fincore printed {text:?}"))
}

/// Drops `file`'s pages from the page cache (see [`DROP_METHOD`]; no root needed), and checks that none
/// is left.
fn drop_pages(file: &Path) -> Result<()> {
    // A page the kernel holds for a moment (a read-ahead in flight, a write-back) survives a drop: a few
    // tries, 100 ms apart, before the run is called not cold.
    let mut left = 0;
    for _ in 0..5 {
        let status = Command::new("dd")
            .arg(format!("if={}", file.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()
            .context("running dd")?;
        ensure!(status.success(), "dd could not drop the pages of {}", file.display());
        left = resident_bytes(file)?;
        if left == 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!("{left} bytes of {} are still in the page cache after dropping them five times", file.display())
}

/// The one-minute load average, where Linux gives it: other work on the machine skews the figures.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().unwrap_or("unknown").to_owned()
}

/// Builds a binary with cargo, and returns its path.
pub(crate) fn build(command: &mut Command, what: &str) -> Result<PathBuf> {
    let output = command.arg("--message-format=json-render-diagnostics").stderr(Stdio::inherit()).output()?;
    ensure!(output.status.success(), "building {what} failed");
    let text = String::from_utf8(output.stdout)?;
    let mut executables = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|message| message["executable"].as_str().map(PathBuf::from));
    executables.next_back().with_context(|| format!("cargo built no executable for {what}"))
}

/// Builds the llama.cpp peer (`peers/llama-cpp`) into `target/bench-peers`, installing cmake and
/// libclang first where they are missing, and returns its path.
pub(crate) fn build_peer(root: &Path) -> Result<PathBuf> {
    crate::integration::installed("cmake", "cmake")?;
    let libclang = libclang()?;
    eprintln!("building the llama.cpp peer (a few minutes the first time; libclang: {})", libclang.display());
    build(
        Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(root.join("peers/llama-cpp/Cargo.toml"))
            .env("CARGO_TARGET_DIR", root.join("target").join("bench-peers").join("target"))
            // llama.cpp at its best: built for this CPU (GGML_NATIVE, as a build of its own defaults to),
            // so that it uses AVX-512 and VNNI where usine's kernels find them at run time.
            .env("RUSTFLAGS", "-C target-cpu=native"),
        "the llama.cpp peer",
    )
}

/// One row's measured runs.
#[derive(Default)]
struct Runs {
    cold: Vec<Value>,
    warm: Vec<Value>,
}

/// A row of the table, for one model, quantization and thread count.
struct Row<'a> {
    speed: &'a Path,
    peer: &'a Path,
    gguf: &'a Path,
    threads: &'a str,
    /// Kernels of an extra usine column (`USINE_ISA`), if any.
    extra: Option<&'static str>,
    /// Runs repeated for other programs' work, and runs kept over [`MAX_OTHERS`] after [`TRIES`] tries.
    repeated: &'a std::cell::Cell<(usize, usize)>,
    /// A busy process runs beside (`--busy`): every run is disturbed on purpose and kept.
    busy: bool,
}

impl Row<'_> {
    /// `run` until other programs took at most [`MAX_OTHERS`] of its time in CPU time, or the least
    /// disturbed of [`TRIES`].
    fn undisturbed(&self, mut run: impl FnMut() -> Result<Value>) -> Result<Value> {
        if self.busy {
            return run();
        }
        let mut least: Option<(f64, Value)> = None;
        for _ in 0..TRIES {
            let value = run()?;
            let others = number(&value, "others_cpu_seconds")?;
            let share = (others - TICKS_SLACK).max(0.0) / number(&value, "total_seconds")?.max(f64::MIN_POSITIVE);
            if share <= MAX_OTHERS {
                return Ok(value);
            }
            let (repeated, kept) = self.repeated.get();
            self.repeated.set((repeated + 1, kept));
            if least.as_ref().is_none_or(|(least, _)| share < *least) {
                least = Some((share, value));
            }
            // Let a burst of other work pass.
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        let (repeated, kept) = self.repeated.get();
        self.repeated.set((repeated, kept + 1));
        Ok(least.expect("TRIES is more than zero").1)
    }

    fn ours(&self, kernels: Option<&str>) -> Result<Value> {
        let mut command = Command::new(self.speed);
        command.arg("run").arg(self.gguf).args([self.threads, &TOKENS.to_string()]);
        if let Some(kernels) = kernels {
            command.env("USINE_ISA", kernels);
        }
        run_json(&mut command)
    }

    fn theirs(&self, prompt: &str) -> Result<Value> {
        run_json(Command::new(self.peer).arg(self.gguf).args([self.threads, &TOKENS.to_string(), prompt]))
    }

    /// Warm-up runs, then turns; every run's tokens checked against llama.cpp's first. Returns the
    /// table's cells after the model, quantization and threads, and the agreement of usine's runs.
    fn measure(&self) -> Result<(Vec<String>, Agreement)> {
        // A first run of each, not counted: binaries, caches and clocks warm. usine's gives the prompt.
        let first = self.ours(None)?;
        let prompt = ids(&first, "prompt")?.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let reference = self.theirs(&prompt)?;
        let mut worst = Agreement { matched: TOKENS, near_tie: None };
        let mut check = |run: &Value| -> Result<()> {
            let agreement = agreement(&ids(run, "tokens")?, &reference)?;
            if agreement.matched < worst.matched {
                worst = agreement;
            }
            Ok(())
        };
        check(&first)?;
        if let Some(kernels) = self.extra {
            check(&self.ours(Some(kernels))?)?;
        }
        let (mut ours, mut theirs, mut extra) = (Runs::default(), Runs::default(), Vec::new());
        // Turns, one side then the other (in alternating order), so that a slow spell falls on both.
        for turn in 0..REPEATS {
            for side in [turn % 2, 1 - turn % 2] {
                if side == 0 {
                    ours.cold.push(self.undisturbed(|| {
                        drop_pages(self.gguf)?;
                        self.ours(None)
                    })?);
                    ours.warm.push(self.undisturbed(|| self.ours(None))?);
                    if let Some(kernels) = self.extra {
                        extra.push(self.undisturbed(|| self.ours(Some(kernels)))?);
                    }
                } else {
                    theirs.cold.push(self.undisturbed(|| {
                        drop_pages(self.gguf)?;
                        self.theirs(&prompt)
                    })?);
                    theirs.warm.push(self.undisturbed(|| self.theirs(&prompt))?);
                }
            }
        }
        for run in ours.cold.iter().chain(&ours.warm).chain(&extra) {
            check(run)?;
        }
        for run in theirs.cold.iter().chain(&theirs.warm) {
            let agreement = agreement(&ids(run, "tokens")?, &reference)?;
            ensure!(agreement.matched == TOKENS, "llama.cpp's runs disagree among themselves: {agreement:?}");
        }
        let (rate, theirs_rate) =
            (median(&ours.warm, "tokens_per_second")?, median(&theirs.warm, "tokens_per_second")?);
        let ms =
            |runs: &[Value]| -> Result<String> { Ok(format!("{:.0}", median(runs, "first_token_seconds")? * 1e3)) };
        let mut cells = vec![format!("{rate:.1}")];
        if self.extra.is_some() {
            cells.push(format!("{:.1}", median(&extra, "tokens_per_second")?));
        }
        cells.extend([
            format!("{theirs_rate:.1}"),
            format!("{:.2}", rate / theirs_rate.max(f64::MIN_POSITIVE)),
            format!("{} ms / {} ms", ms(&ours.cold)?, ms(&theirs.cold)?),
            format!("{} ms / {} ms", ms(&ours.warm)?, ms(&theirs.warm)?),
        ]);
        Ok((cells, worst))
    }
}

fn agreement_cell(agreement: Agreement) -> String {
    match agreement.near_tie {
        None => format!("{}/{TOKENS}", agreement.matched),
        Some(gap) => format!("{}/{TOKENS} (near-tie, gap {gap:.4})", agreement.matched),
    }
}

/// A process that keeps one core busy while it lives (`--busy`): the desktop application's neighbour.
struct Spinner(std::process::Child);

impl Spinner {
    fn start() -> Result<Self> {
        let child =
            Command::new("sh").args(["-c", "while :; do :; done"]).spawn().context("starting a busy process")?;
        Ok(Self(child))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `busy`: the whole table measured beside a process spinning on one core, for both sides (`--busy`).
#[allow(clippy::print_stdout, reason = "the table is the command's output")]
pub(crate) fn run(root: &Path, busy: bool) -> Result<ExitCode> {
    let work = root.join("target").join("bench-peers");
    std::fs::create_dir_all(&work)?;
    let peer = build_peer(root)?;
    let speed = build(
        Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "-p", "usine-engine-candle", "--example", "speed"])
            .current_dir(root),
        "usine's speed example",
    )?;
    // Started after the builds, so that they run at their usual speed.
    let busy = if busy { Some(Spinner::start()?) } else { None };
    let load_before = load_average();
    let repeated = std::cell::Cell::new((0, 0));
    let mut table = Vec::new();
    let mut kernels = String::new();
    for size in SIZES {
        let weights = work.join(format!("{size}.safetensors"));
        if !weights.exists() {
            crate::model::random_model(root, size, &weights.display().to_string())?;
        }
        for quantization in QUANTIZATIONS {
            // Compiled once by this invocation, then again with the same bytes or a failure.
            let gguf = work.join(format!("{size}-{quantization}.gguf"));
            if gguf.exists() {
                std::fs::remove_file(&gguf).with_context(|| format!("removing the old {}", gguf.display()))?;
            }
            let mut compiles = Vec::new();
            for _ in 0..COMPILES {
                let mut command = Command::new(&speed);
                command.arg("compile").arg(&weights).arg(quantization).arg(&gguf);
                compiles.push(run_json(&mut command)?);
            }
            let written = compiles.iter().filter(|compile| compile["written"].as_bool() == Some(true)).count();
            ensure!(written == 1, "{} compiles wrote {}: one should", written, gguf.display());
            let bytes = std::fs::read(&gguf).with_context(|| format!("reading {}", gguf.display()))?;
            let compile = median(&compiles, "compile_seconds")?;
            for threads in THREADS {
                // usine's default kernels, and AVX2's too where they are not the default.
                if kernels.is_empty() {
                    let mut command = Command::new(&speed);
                    command.arg("run").arg(&gguf).args([threads, "2"]);
                    kernels = run_json(&mut command)?["kernels"].as_str().context("no `kernels`")?.to_owned();
                }
                let extra = (kernels == "avx512vnni").then_some("avx2");
                let row = Row {
                    speed: &speed,
                    peer: &peer,
                    gguf: &gguf,
                    threads,
                    extra,
                    repeated: &repeated,
                    busy: busy.is_some(),
                };
                let (cells, agreement) = row.measure().with_context(|| format!("{size} {quantization} {threads}"))?;
                let line = format!(
                    "| {size} | {quantization} | {threads} | {} | {compile:.2} s | {} |",
                    cells.join(" | "),
                    agreement_cell(agreement)
                );
                eprintln!("{line}");
                table.push(line);
            }
            ensure!(std::fs::read(&gguf)? == bytes, "{} changed while the runs read it", gguf.display());
        }
    }
    let extra = if kernels == "avx512vnni" { " usine avx2 tokens/s |" } else { "" };
    println!("load average (1 min): {load_before} before, {} after", load_average());
    if busy.is_some() {
        println!("beside a process spinning on one core all along (`--busy`): runs are not repeated for it");
    }
    drop(busy);
    let (repeated, kept) = repeated.get();
    println!(
        "runs repeated as other programs took over {:.0}% of their time in CPU time: {repeated}; kept so after {TRIES} tries: {kept}",
        MAX_OTHERS * 100.0
    );
    println!(
        "usine's kernels: {kernels} ({}); cold page cache: {DROP_METHOD}",
        match std::env::var("USINE_ISA") {
            Ok(value) => format!("USINE_ISA={value}"),
            Err(_) => "the best this CPU runs".to_owned(),
        }
    );
    println!(
        "| model | quantization | threads | usine tokens/s |{extra} llama.cpp tokens/s | usine / llama.cpp | first token, cold (usine / llama.cpp) | first token, warm (usine / llama.cpp) | compile | tokens equal |"
    );
    println!("|---|---|---|---|{}---|---|---|---|---|---|", if extra.is_empty() { "" } else { "---|" });
    for line in table {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;

    fn reference(tokens: &[u64], runner_up: &[u64], gaps: &[f64]) -> Value {
        serde_json::json!({ "tokens": tokens, "runner_up": runner_up, "gaps": gaps })
    }

    #[test]
    fn tokens_agree_when_equal_or_parting_at_a_near_tie_onto_the_runner_up_only() {
        let theirs = reference(&[5, 6, 7, 8], &[1, 2, 3, 4], &[0.5, 0.4, 0.01, 0.3]);
        assert_eq!(agreement(&[5, 6, 7, 8], &theirs).unwrap(), Agreement { matched: 4, near_tie: None });
        assert_eq!(agreement(&[5, 6, 3, 0], &theirs).unwrap(), Agreement { matched: 2, near_tie: Some(0.01) });
        // Parting where the gap is wide, or onto another token than the runner-up, or a length apart.
        assert!(agreement(&[5, 2, 7, 8], &theirs).is_err());
        assert!(agreement(&[5, 6, 9, 8], &theirs).is_err());
        assert!(agreement(&[5, 6, 7], &theirs).is_err());
    }

    #[test]
    fn libclang_is_told_from_its_cpp_api_and_static_parts() {
        for name in ["libclang.so", "libclang.so.1", "libclang-14.so.1", "libclang-14.0.6.so"] {
            assert!(is_libclang(name), "{name}");
        }
        for name in ["libclang-cpp.so.14", "libclangAST.a", "libclang.a", "libclang-cpp14"] {
            assert!(!is_libclang(name), "{name}");
        }
    }
}
