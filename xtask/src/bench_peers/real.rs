//! `cargo xtask bench-peers --real`: usine against llama.cpp on random-weight models of real shapes
//! (Qwen2.5-0.5B and TinyLlama-1.1B, every layer), Q8_0 and Q4_K_M, one and two threads: decode
//! tokens/s, prefill tokens/s on a [`PROMPT_BYTES`]-token prompt, and the cached load.
//!
//! usine runs as people run it, the release `usine` binary (`usine run --model FILE.gguf --json`), with
//! a cache folder and a configuration file of the benchmark's own (every setting at its default, but
//! `--no-warm`, so that "loaded" is the load alone). A first run of each file compiles its graph and is
//! not counted; every measured run must then say `"source":"disk"`. llama.cpp is bench-peers' peer, on
//! the same file and the same prompt token ids (the generated files' vocabulary is byte-level: ids 0 to
//! 255 are the bytes, so that [`prompt`]'s ASCII text is the same ids on both sides).
//!
//! What each figure counts:
//! - decode: tokens/s over the [`TOKENS`] − 1 greedy tokens after the first (usine's `tokens_per_second`,
//!   the peer's).
//! - prefill: the prompt's tokens over the time to the first token. usine's `time_to_first_token`
//!   counts from the request, after the load: admission, the kv-cache, the prompt's passes, the first
//!   token. The peer's `first_token_seconds` counts from before its load, so its `load_seconds` is taken
//!   off: what is left is its context (the kv-cache), the prompt's decode and the first token.
//! - cached load: usine's `loaded` event, from the compiled graph on disk to the model ready (the graph's
//!   pages in the page cache: the file was just written or read); llama.cpp's `load_seconds`, its mapped
//!   load of the GGUF file (likewise in the page cache). Neither side has touched the weights through
//!   its mapping yet: both pay those page faults in their prefill.
//!
//! Each row: [`TURNS`] turns, each running every side once in a rotating order (a slow spell falls on
//! all); cells show the median and the range. A run during which other programs took more than
//! bench-peers' [`MAX_OTHERS`] of its time in CPU time (the machine's busy ticks in `/proc/stat` less
//! this process's and its children's, read around each run) is run again, up to [`TRIES`] times, and the
//! least disturbed kept. Greedy tokens are compared with llama.cpp's first run of the row, and reported,
//! never failed: random models this wide have many near-ties.
//!
//! Where the CPU runs AVX-512 VNNI, a column shows usine on its AVX2 kernels too (`USINE_ISA=avx2`). The
//! `usine` measured is built from the working tree; the table's head says from which commit, and which
//! of its crates' files differed from it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use super::{MAX_OTHERS, NEAR_TIE, TICKS_SLACK, build, build_peer, ids, load_average};

/// `random_model`'s presets, with their real layer counts.
const MODELS: [(&str, usize); 2] = [("qwen2.5-0.5b", 24), ("tinyllama-1.1b", 22)];
const QUANTIZATIONS: [&str; 2] = ["q8_0", "q4_k_m"];
const THREADS: [usize; 2] = [1, 2];
/// The prompt's length, in bytes and so in tokens.
const PROMPT_BYTES: usize = 512;
/// Greedy tokens per run: the first, then [`TOKENS`] − 1 that the decode rate counts.
const TOKENS: usize = 64;
/// Measured runs of each side per row.
const TURNS: usize = 3;
/// Runs of one measurement at most, for other programs' work (these runs take seconds to a minute).
const TRIES: usize = 3;
/// The prompt's text, repeated and cut to [`PROMPT_BYTES`].
const TEXT: &str = "The mill by the river turned all winter, grinding the grain that the farmers brought down \
                    from the hills in carts. Each morning the miller opened the sluice, checked the stones, and \
                    wrote in his ledger how many sacks had come and gone. ";

/// The benchmark's prompt: [`TEXT`] cut to [`PROMPT_BYTES`] printable ASCII bytes, with no space at
/// either end (which a command line or a trim could lose).
pub(super) fn prompt() -> String {
    let mut text: String = TEXT.chars().cycle().take(PROMPT_BYTES).collect();
    if text.ends_with(' ') {
        text.pop();
        text.push('.');
    }
    text
}

/// The kernels usine picks here (`USINE_ISA` when set, else the best this CPU runs, read from
/// `/proc/cpuinfo` by the engine's rule), and whether the AVX2 kernels are another column.
pub(super) fn kernels() -> (String, bool) {
    if let Ok(chosen) = std::env::var("USINE_ISA") {
        return (chosen, false);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|line| line.starts_with("flags"))
        .map(|line| line.split_whitespace().collect())
        .unwrap_or_default();
    let has = |flag: &str| flags.contains(&flag);
    let avx2 = has("avx2") && has("fma") && has("f16c");
    if avx2 && has("avx512_vnni") && has("avx512vl") {
        ("avx512vnni".to_owned(), true)
    } else if avx2 {
        ("avx2".to_owned(), false)
    } else {
        ("portable".to_owned(), false)
    }
}

/// CPU ticks (USER_HZ, 100 a second): the machine's busy ones (steal included), and this process's
/// own with those of its children it waited for.
fn cpu_ticks() -> Result<(u64, u64)> {
    let machine = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields: Vec<u64> = machine
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy = fields.iter().take(8).enumerate().filter(|(index, _)| !matches!(index, 3 | 4)).map(|(_, t)| t).sum();
    let own = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // After the command's name, in parentheses: the state is field 3, then utime, stime, cutime and
    // cstime are fields 14 to 17.
    let own: Vec<&str> = own.rsplit_once(')').context("no command in /proc/self/stat")?.1.split_whitespace().collect();
    let mut mine = 0;
    for index in 11..15 {
        mine += own.get(index).context("short /proc/self/stat")?.parse::<u64>()?;
    }
    Ok((busy, mine))
}

/// A process's output, its wall time and the CPU time other programs took meanwhile.
pub(super) struct Timed {
    pub(super) stdout: String,
    pub(super) seconds: f64,
    pub(super) others: f64,
}

impl Timed {
    /// Other programs' share of the run's time, less [`TICKS_SLACK`].
    pub(super) fn disturbance(&self) -> f64 {
        (self.others - TICKS_SLACK).max(0.0) / self.seconds.max(f64::MIN_POSITIVE)
    }
}

/// Runs `command` to its end, and fails unless it succeeds.
pub(super) fn timed(command: &mut Command) -> Result<Timed> {
    let before = cpu_ticks()?;
    let start = Instant::now();
    let output = command.output().with_context(|| format!("starting {command:?}"))?;
    let seconds = start.elapsed().as_secs_f64();
    let after = cpu_ticks()?;
    let stdout = String::from_utf8(output.stdout)?;
    ensure!(output.status.success(), "{command:?} failed:\n{stdout}{}", String::from_utf8_lossy(&output.stderr));
    #[expect(clippy::cast_precision_loss, reason = "ticks of a run")]
    let others = (after.0 - before.0).saturating_sub(after.1 - before.1) as f64 / 100.0;
    Ok(Timed { stdout, seconds, others })
}

/// One measured run of either side.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    /// The cached load, in seconds.
    load: f64,
    /// The prompt's tokens per second (see the file's doc).
    prefill: f64,
    /// Tokens per second after the first.
    decode: f64,
    tokens: Vec<u64>,
}

/// usine's run from its `--json` events: the `loaded` event, the tokens and the `finished` usage.
fn usine_run(stdout: &str) -> Result<(Run, String)> {
    let events = stdout
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).with_context(|| format!("not JSON: {line}")))
        .collect::<Result<Vec<_>>>()?;
    let event = |name: &str| events.iter().find(|event| event["event"] == name);
    let loaded = event("loaded").context("no `loaded` event")?;
    let source = loaded["source"].as_str().context("no `source` in the `loaded` event")?.to_owned();
    let usage = &event("finished").context("no `finished` event")?["usage"];
    let number =
        |value: &Value, key: &str| value[key].as_f64().with_context(|| format!("no number `{key}` in {value}"));
    let prompt = number(usage, "prompt_tokens")?;
    #[expect(clippy::cast_precision_loss, reason = "a few hundred tokens")]
    let expected = PROMPT_BYTES as f64;
    ensure!(prompt == expected, "usine counted {prompt} prompt tokens, not {PROMPT_BYTES}");
    let tokens: Vec<u64> = events
        .iter()
        .filter(|event| event["event"] == "token")
        .map(|event| event["id"].as_u64().with_context(|| format!("a token event without an id: {event}")))
        .collect::<Result<_>>()?;
    // An end-of-sequence token ends a run early, and the decode rate would count fewer tokens: then
    // another prompt is needed (greedy runs are deterministic).
    ensure!(
        tokens.len() == TOKENS,
        "usine generated {} tokens, not {TOKENS} ({}): the prompt leads to an end of sequence",
        tokens.len(),
        usage["finish"]
    );
    let run = Run {
        load: number(loaded, "seconds")?,
        prefill: prompt / number(usage, "time_to_first_token_seconds")?.max(f64::MIN_POSITIVE),
        decode: number(usage, "tokens_per_second")?,
        tokens,
    };
    Ok((run, source))
}

/// The peer's run from its JSON line, and that line (the reference for token agreement).
fn peer_run(stdout: &str) -> Result<(Run, Value)> {
    let line = stdout.lines().last().context("the peer printed nothing")?;
    let value: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
    let number = |key: &str| value[key].as_f64().with_context(|| format!("no number `{key}` in the peer's line"));
    let (load, first) = (number("load_seconds")?, number("first_token_seconds")?);
    #[expect(clippy::cast_precision_loss, reason = "a few hundred tokens")]
    let prompt = PROMPT_BYTES as f64;
    let run = Run {
        load,
        prefill: prompt / (first - load).max(f64::MIN_POSITIVE),
        decode: number("tokens_per_second")?,
        tokens: ids(&value, "tokens")?,
    };
    ensure!(run.tokens.len() == TOKENS, "the peer generated {} tokens, not {TOKENS}", run.tokens.len());
    Ok((run, value))
}

/// Where `tokens` part from llama.cpp's `reference` run, as a table cell: the tokens equal from the
/// first, and at the first difference llama.cpp's gap between its two best logits and whether `tokens`
/// took its runner-up there (a near-tie within [`NEAR_TIE`] is rounding; a larger gap would be a fault
/// in a small model, but these rows only report it).
pub(super) fn parting(tokens: &[u64], reference: &Value) -> Result<(usize, String)> {
    let (expected, runner_up) = (ids(reference, "tokens")?, ids(reference, "runner_up")?);
    let gaps = reference["gaps"].as_array().context("no `gaps` in the reference")?;
    let Some(at) = tokens.iter().zip(&expected).position(|(a, b)| a != b) else {
        let matched = tokens.len().min(expected.len());
        return Ok((matched, format!("{matched}/{}", expected.len())));
    };
    let gap = gaps.get(at).and_then(Value::as_f64).with_context(|| format!("no gap at step {at}"))?;
    let what = match (runner_up.get(at) == Some(&tokens[at]), gap <= NEAR_TIE) {
        (true, true) => format!("near-tie, gap {gap:.4}"),
        (true, false) => format!("llama.cpp's runner-up, gap {gap:.4}"),
        (false, _) => format!("neither of llama.cpp's two best, gap {gap:.4}"),
    };
    Ok((at, format!("{at}/{} ({what})", expected.len())))
}

/// The median and range of `values`.
pub(super) fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (sorted[sorted.len() / 2], sorted[0], sorted[sorted.len() - 1])
}

/// A cell: the median with the range, `digits` after the point, times `scale`.
pub(super) fn cell(values: &[f64], scale: f64, digits: usize) -> String {
    let (median, low, high) = spread(values);
    format!("{:.digits$} ({:.digits$}–{:.digits$})", median * scale, low * scale, high * scale)
}

/// The ratio of two sides' medians.
pub(super) fn ratio(ours: &[f64], theirs: &[f64]) -> String {
    format!("{:.2}", spread(ours).0 / spread(theirs).0.max(f64::MIN_POSITIVE))
}

/// The binaries, folders and counters every row uses.
struct Bench {
    usine: PathBuf,
    peer: PathBuf,
    generator: PathBuf,
    work: PathBuf,
    config: PathBuf,
    cache: PathBuf,
    prompt: String,
    prompt_ids: String,
    /// The kernels of an extra usine column (`USINE_ISA`), if any.
    extra: Option<&'static str>,
    /// Runs repeated for other programs' work, and runs kept over [`MAX_OTHERS`] after [`TRIES`].
    repeated: usize,
    kept: usize,
}

/// `command` run until other programs took at most [`MAX_OTHERS`] of its time, or the least disturbed
/// of [`TRIES`] runs; counts the runs repeated, and those kept over the limit.
pub(super) fn least_disturbed(command: &mut Command, repeated: &mut usize, kept: &mut usize) -> Result<Timed> {
    let mut least: Option<(f64, Timed)> = None;
    for _ in 0..TRIES {
        let output = timed(command)?;
        let share = output.disturbance();
        let quiet = share <= MAX_OTHERS;
        if least.as_ref().is_none_or(|(least, _)| share < *least) {
            least = Some((share, output));
        }
        if quiet {
            break;
        }
        *repeated += 1;
        // Let a burst of other work pass.
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let (share, output) = least.expect("TRIES is more than zero");
    if share > MAX_OTHERS {
        *kept += 1;
    }
    Ok(output)
}

/// Which side a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Usine,
    UsineExtra,
    Peer,
}

impl Bench {
    /// `usine run` on `gguf` with this benchmark's settings: `threads`, the kernels `kernels` (None:
    /// the environment's `USINE_ISA`, if any), `prompt` and `tokens` greedy tokens.
    fn usine(&self, gguf: &Path, threads: usize, kernels: Option<&str>, prompt: &str, tokens: usize) -> Command {
        let mut command = Command::new(&self.usine);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("USINE_") && key != "USINE_ISA" {
                command.env_remove(key);
            }
        }
        command
            .env("USINE_CACHE_DIR", &self.cache)
            .env("USINE_THREADS", threads.to_string())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--model")
            .arg(gguf)
            .args(["--max-tokens", &tokens.to_string(), "--temperature", "0", "--no-warm", "--json", prompt]);
        if let Some(kernels) = kernels {
            command.env("USINE_ISA", kernels);
        }
        command
    }

    /// The first run of `gguf`, not counted: it compiles the graph. Returns the compile's seconds.
    fn compile(&self, gguf: &Path) -> Result<f64> {
        eprintln!("compiling {}", gguf.display());
        let output = timed(&mut self.usine(gguf, THREADS[THREADS.len() - 1], None, "Hi", 2))?;
        let loaded = output
            .stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|event| event["event"] == "loaded")
            .context("no `loaded` event")?;
        ensure!(loaded["source"] == "compile", "the first run of {} did not compile: {loaded}", gguf.display());
        loaded["seconds"].as_f64().context("no `seconds` in the `loaded` event")
    }

    /// One measured run of `side`, run again while other programs took over [`MAX_OTHERS`] of its time
    /// (up to [`TRIES`] runs; the least disturbed kept). Returns the peer's line too.
    fn measure(&mut self, side: Side, gguf: &Path, threads: usize) -> Result<(Run, Option<Value>)> {
        let mut command = match side {
            Side::Usine => self.usine(gguf, threads, None, &self.prompt, TOKENS),
            Side::UsineExtra => self.usine(gguf, threads, self.extra, &self.prompt, TOKENS),
            Side::Peer => {
                let mut command = Command::new(&self.peer);
                command.arg(gguf).arg(threads.to_string()).arg(TOKENS.to_string()).arg(&self.prompt_ids);
                command
            }
        };
        let output = least_disturbed(&mut command, &mut self.repeated, &mut self.kept)?;
        if side == Side::Peer {
            let (run, line) = peer_run(&output.stdout)?;
            return Ok((run, Some(line)));
        }
        let (run, source) = usine_run(&output.stdout)?;
        ensure!(source == "disk", "a measured run of {} loaded from `{source}`, not the disk cache", gguf.display());
        Ok((run, None))
    }

    /// A row's cells after the model, quantization and threads, up to its tokens' agreement.
    fn row(&mut self, gguf: &Path, threads: usize) -> Result<Vec<String>> {
        let mut sides = vec![Side::Usine, Side::Peer];
        if self.extra.is_some() {
            sides.push(Side::UsineExtra);
        }
        let (mut ours, mut extra, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        let mut reference: Option<Value> = None;
        for turn in 0..TURNS {
            // A rotating order: each side goes first in some turn.
            for index in 0..sides.len() {
                let side = sides[(turn + index) % sides.len()];
                let (run, line) = self.measure(side, gguf, threads)?;
                match side {
                    Side::Usine => ours.push(run),
                    Side::UsineExtra => extra.push(run),
                    Side::Peer => {
                        if reference.is_none() {
                            reference = line;
                        }
                        theirs.push(run);
                    }
                }
            }
        }
        let reference = reference.context("no llama.cpp run")?;
        let decode = |runs: &[Run]| runs.iter().map(|run| run.decode).collect::<Vec<_>>();
        let prefill = |runs: &[Run]| runs.iter().map(|run| run.prefill).collect::<Vec<_>>();
        let load = |runs: &[Run]| runs.iter().map(|run| run.load).collect::<Vec<_>>();
        let mut cells = vec![cell(&decode(&ours), 1.0, 1)];
        if self.extra.is_some() {
            cells.push(cell(&decode(&extra), 1.0, 1));
        }
        cells.push(cell(&decode(&theirs), 1.0, 1));
        cells.push(ratio(&decode(&ours), &decode(&theirs)));
        cells.push(cell(&prefill(&ours), 1.0, 0));
        if self.extra.is_some() {
            cells.push(cell(&prefill(&extra), 1.0, 0));
        }
        cells.push(cell(&prefill(&theirs), 1.0, 0));
        cells.push(ratio(&prefill(&ours), &prefill(&theirs)));
        cells.push(cell(&load(&ours), 1e3, 0));
        cells.push(cell(&load(&theirs), 1e3, 0));
        // usine's worst run against llama.cpp's first; llama.cpp's own runs against it too.
        let mut worst: Option<(usize, String)> = None;
        for run in ours.iter().chain(&extra) {
            let parted = parting(&run.tokens, &reference)?;
            if worst.as_ref().is_none_or(|(matched, _)| parted.0 < *matched) {
                worst = Some(parted);
            }
        }
        let mut agreement = worst.context("no usine run")?.1;
        let peer_worst = theirs.iter().map(|run| parting(&run.tokens, &reference)).collect::<Result<Vec<_>>>()?;
        if let Some((matched, _)) = peer_worst.iter().filter(|(matched, _)| *matched < TOKENS).min_by_key(|(m, _)| *m) {
            agreement.push_str(&format!("; llama.cpp's own runs part at {matched}"));
        }
        cells.push(agreement);
        Ok(cells)
    }
}

/// The commit, and which files of the crates in `usine` differ from it, as `git status` says (the
/// `usine` measured is built from the working tree).
pub(super) fn source_state(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|output| output.status.success())
            // Trimmed at the end only: a porcelain line starts with its status, a space where unchanged.
            .map(|output| String::from_utf8_lossy(&output.stdout).trim_end().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "an unknown commit".to_owned());
    let changed = git(&["status", "--porcelain", "--", "engines", "kernel", "executor", "storage", "cli", "memory"])
        .unwrap_or_default();
    let changed = changed_paths(&changed);
    if changed.is_empty() {
        format!("{commit}, no local changes")
    } else {
        format!("{commit} with local changes in {}", changed.join(", "))
    }
}

/// The paths of `git status --porcelain` lines (`XY PATH`).
fn changed_paths(porcelain: &str) -> Vec<&str> {
    porcelain.lines().filter_map(|line| line.get(3..)).collect()
}

/// The table (see the file's doc).
#[allow(clippy::print_stdout, reason = "the table is the command's output")]
pub(crate) fn run(root: &Path) -> Result<std::process::ExitCode> {
    let started = Instant::now();
    let work = root.join("target").join("bench-peers").join("real");
    std::fs::create_dir_all(&work)?;
    let peer = build_peer(root)?;
    eprintln!("building usine and the engine's random_model example");
    let usine = build(
        Command::new(env!("CARGO")).args(["build", "--release", "--quiet", "-p", "usine-cli"]).current_dir(root),
        "usine",
    )?;
    let generator = build(
        Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "-p", "usine-engine-candle", "--example", "random_model"])
            .current_dir(root),
        "the engine's random_model example",
    )?;
    let built_from = source_state(root);
    // A cache of the benchmark's own, fresh: every file's graph compiled by this invocation.
    let cache = work.join("cache");
    if cache.exists() {
        std::fs::remove_dir_all(&cache).with_context(|| format!("removing {}", cache.display()))?;
    }
    let config = work.join("usine.toml");
    std::fs::write(&config, "# cargo xtask bench-peers --real: every setting at its default\n")?;
    let (kernels, avx2) = kernels();
    let prompt = prompt();
    let prompt_ids = prompt.bytes().map(|byte| byte.to_string()).collect::<Vec<_>>().join(",");
    let mut bench = Bench {
        usine,
        peer,
        generator,
        work,
        config,
        cache: cache.clone(),
        prompt,
        prompt_ids,
        extra: avx2.then_some("avx2"),
        repeated: 0,
        kept: 0,
    };
    let load_before = load_average();
    let mut table = Vec::new();
    for (preset, layers) in MODELS {
        for quantization in QUANTIZATIONS {
            let (gguf, line) =
                crate::model::generated_gguf(&bench.generator, &bench.work, preset, layers, quantization)?;
            let params = line["params"].as_f64().with_context(|| format!("no `params` in {line}"))?;
            let bytes = std::fs::read(&gguf).map(|bytes| bytes.len()).unwrap_or_default();
            let compile = bench.compile(&gguf)?;
            for threads in THREADS {
                let row_started = Instant::now();
                let cells = bench.row(&gguf, threads).with_context(|| format!("{preset} {quantization} {threads}"))?;
                let line = format!(
                    "| {preset} ({:.0} M, {:.0} MB) | {quantization} | {threads} | {} | {compile:.1} s |",
                    params / 1e6,
                    bytes as f64 / 1e6,
                    cells.join(" | "),
                );
                eprintln!("{line} ({:.0} s)", row_started.elapsed().as_secs_f64());
                table.push(line);
            }
        }
    }
    std::fs::remove_dir_all(&cache).with_context(|| format!("removing {}", cache.display()))?;
    println!("usine built from {built_from}");
    println!("load average (1 min): {load_before} before, {} after", load_average());
    println!(
        "runs repeated as other programs took over {:.0}% of their time in CPU time: {}; kept so after {TRIES} tries: {}",
        MAX_OTHERS * 100.0,
        bench.repeated,
        bench.kept
    );
    println!(
        "usine's kernels: {kernels}{}; medians of {TURNS} turns (range); prompt {PROMPT_BYTES} tokens, {TOKENS} greedy tokens; {:.0} s in all",
        if std::env::var_os("USINE_ISA").is_some() { " (USINE_ISA)" } else { " (the best this CPU runs)" },
        started.elapsed().as_secs_f64()
    );
    let (extra_head, extra_rule) = if bench.extra.is_some() { (" usine avx2 |", "---|") } else { ("", "") };
    println!(
        "| model | quantization | threads | decode tokens/s: usine |{extra_head} llama.cpp | usine / llama.cpp | prefill tokens/s: usine |{extra_head} llama.cpp | usine / llama.cpp | cached load, ms: usine | llama.cpp | tokens equal | compile |"
    );
    println!("|---|---|---|---|{extra_rule}---|---|---|{extra_rule}---|---|---|---|---|---|");
    for line in table {
        println!("{line}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;

    #[test]
    fn the_prompt_is_exactly_its_length_in_printable_ascii_with_no_space_at_either_end() {
        let prompt = prompt();
        assert_eq!(prompt.len(), PROMPT_BYTES);
        assert!(prompt.bytes().all(|byte| (0x20..0x7f).contains(&byte)), "{prompt}");
        assert_eq!(prompt.trim(), prompt);
    }

    #[test]
    fn parting_reports_where_and_how_the_tokens_part_without_failing() {
        let theirs =
            serde_json::json!({ "tokens": [5, 6, 7, 8], "runner_up": [1, 2, 3, 4], "gaps": [0.5, 0.4, 0.01, 0.3] });
        assert_eq!(parting(&[5, 6, 7, 8], &theirs).unwrap(), (4, "4/4".to_owned()));
        assert_eq!(parting(&[5, 6, 3, 0], &theirs).unwrap(), (2, "2/4 (near-tie, gap 0.0100)".to_owned()));
        assert_eq!(parting(&[5, 2, 7, 8], &theirs).unwrap(), (1, "1/4 (llama.cpp's runner-up, gap 0.4000)".to_owned()));
        assert_eq!(
            parting(&[9, 6, 7, 8], &theirs).unwrap(),
            (0, "0/4 (neither of llama.cpp's two best, gap 0.5000)".to_owned())
        );
    }

    #[test]
    fn a_run_of_usine_is_read_from_its_events_and_its_rates_from_its_usage() {
        let tokens: Vec<String> = (0..TOKENS)
            .map(|index| format!(r#"{{"event":"token","index":{index},"id":{index},"text":"x"}}"#))
            .collect();
        let stdout = format!(
            "{{\"event\":\"loaded\",\"model\":\"m\",\"source\":\"disk\",\"seconds\":0.05}}\n{}\n{{\"event\":\"finished\",\"usage\":{{\"finish\":\"length\",\"prompt_tokens\":{PROMPT_BYTES},\"time_to_first_token_seconds\":2.0,\"tokens_per_second\":12.5}}}}",
            tokens.join("\n")
        );
        let (run, source) = usine_run(&stdout).unwrap();
        assert_eq!(source, "disk");
        assert_eq!((run.load, run.prefill, run.decode), (0.05, 256.0, 12.5));
        assert_eq!(run.tokens, (0..TOKENS as u64).collect::<Vec<_>>());
        // A run cut short by an end of sequence is refused: its decode rate counts fewer tokens.
        let short = stdout.replacen(&tokens[TOKENS - 1], "", 1);
        assert!(usine_run(&short).is_err());
    }

    #[test]
    fn the_peers_prefill_leaves_its_load_out() {
        let tokens: Vec<u64> = vec![1; TOKENS];
        let line = serde_json::json!({ "load_seconds": 0.5, "first_token_seconds": 2.5, "tokens_per_second": 10.0, "tokens": tokens });
        let (run, _) = peer_run(&line.to_string()).unwrap();
        assert_eq!((run.load, run.prefill, run.decode), (0.5, 256.0, 10.0));
    }

    #[test]
    fn changed_paths_keep_their_first_letter_whatever_the_status() {
        assert_eq!(
            changed_paths(" M engines/a.rs\nM  cli/b.rs\n?? kernel/c.rs"),
            ["engines/a.rs", "cli/b.rs", "kernel/c.rs"]
        );
    }

    #[test]
    fn a_cell_shows_the_median_and_the_range() {
        assert_eq!(cell(&[3.0, 1.0, 2.0], 1.0, 1), "2.0 (1.0–3.0)");
        assert_eq!(cell(&[0.041, 0.039, 0.045], 1e3, 0), "41 (39–45)");
        assert_eq!(ratio(&[2.0, 4.0, 3.0], &[2.0, 1.0, 3.0]), "1.50");
    }
}
