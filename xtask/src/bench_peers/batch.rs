//! `cargo xtask bench-peers --batch`: usine's continuous batching against llama.cpp's batch API, on
//! random-weight models at Q8_0 (bench-peers' 58 M model, and Qwen2.5-0.5B's shape with its 24 layers)
//! and [`THREADS`] threads: [`STREAMS`] greedy generations at once, [`TOKENS`] tokens each, all from
//! the same prompt.
//!
//! usine runs as `usine bench streams --json`, the release `usine` binary with a cache folder and a
//! configuration file of the benchmark's own (every setting at its default): one process runs the four
//! stream counts, each on an executor with a slot per generation, whose steps it batches. A first run
//! of each file (`usine run`) compiles its graph and is not counted. llama.cpp is bench-peers' peer in
//! its `batch` mode, a process per stream count: the sequences' prompts decoded in one batch, then
//! every step advancing all of them in one `llama_decode`, as its server batches its slots. Both start
//! from the same prompt token ids: the files' vocabulary is byte-level (ids 0 to 255 are the bytes), so
//! usine's bench prompt [`PROMPT`] is its bytes on both sides; every usine run is checked to report it.
//!
//! What each figure counts:
//! - decode tokens/s: all the streams' tokens while they decode together, over that time: usine's
//!   `decode_tokens_per_second` (the tokens that came while every stream was past its first token and
//!   none had ended), the peer's (its steps after the prompts' batch). Prompts are left out: usine
//!   fills them in chunks within its passes' token budget as the streams arrive, llama.cpp in one batch
//!   of all; the first-token column shows each way's cost.
//! - first token: usine's median generation's time to its first token, from its request; the peer's,
//!   from the start of the prompts' batch to the first tokens of all the sequences.
//! - mean batch: the sequences a batched step of usine advanced, on average. Over one stream it must be
//!   more than 1, or the run fails: batching did not happen.
//!
//! Each model: [`TURNS`] turns, each running usine's bench once and the peer once at each stream count,
//! in a rotating order (a slow spell falls on all); cells show the median and the range. A run during
//! which other programs took more than bench-peers' [`MAX_OTHERS`] of its time in CPU time is run
//! again, up to [`TRIES`] times, and the least disturbed kept, as in `--real` ([`super::real`]).
//! `--models NAME,...` measures only those models (a smoke test on the small one).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use super::real::{Timed, cell, kernels, ratio, source_state, spread, timed};
use super::{MAX_OTHERS, build, build_peer, load_average, number, run_json};

/// A model of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Model {
    /// usine's own byte-level model of this size (`random_model SIZE`), compiled to GGUF by the
    /// engine's `speed` example, as plain bench-peers makes it.
    Size(&'static str),
    /// A `random_model` preset's widths, with this many layers (its real count).
    Preset(&'static str, usize),
}

impl Model {
    fn name(self) -> &'static str {
        match self {
            Self::Size(name) | Self::Preset(name, _) => name,
        }
    }
}

const MODELS: [Model; 2] = [Model::Size("58m"), Model::Preset("qwen2.5-0.5b", 24)];
const QUANTIZATION: &str = "q8_0";
/// Threads of both sides: the benchmark machine's two cores.
const THREADS: usize = 2;
/// Generations at once: the stream counts of usine's bench, in its order.
const STREAMS: [usize; 4] = [1, 4, 16, 64];
/// Greedy tokens each generation generates (usine's bench's).
const TOKENS: usize = 32;
/// usine's bench prompt (`SENTENCE` in `cli/src/bench.rs`), checked against the one each run reports.
const PROMPT: &str = "The kernel keeps the right models resident and loads them fast. ";
/// Measured runs of each side per stream count.
const TURNS: usize = 3;
/// Runs of one measurement at most, for other programs' work.
const TRIES: usize = 3;

/// The models named in `names` (comma-separated), or all of them.
fn selected(names: Option<&str>) -> Result<Vec<Model>> {
    let Some(names) = names else { return Ok(MODELS.to_vec()) };
    names
        .split(',')
        .map(|name| {
            MODELS
                .iter()
                .copied()
                .find(|model| model.name() == name.trim())
                .with_context(|| format!("unknown model `{name}` (the models: {})", MODELS.map(Model::name).join(", ")))
        })
        .collect()
}

/// One stream count's figures from one run of either side.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    tokens_per_second: f64,
    first_token_seconds: f64,
    /// usine's mean batch; none for the peer.
    mean_batch: Option<f64>,
}

/// A count in a JSON value, as a `usize`.
fn count(value: &Value, key: &str) -> Result<usize> {
    let count = value[key].as_u64().with_context(|| format!("no count `{key}` in {value}"))?;
    usize::try_from(count).with_context(|| format!("`{key}` {count} is too large"))
}

/// usine's figures at each of [`STREAMS`], from `usine bench streams --json`; fails where its prompt,
/// its tokens or its stream counts are not the peer's, or where a row of several streams shows no
/// batching.
fn usine_figures(stdout: &str) -> Result<Vec<Figures>> {
    let value: Value =
        serde_json::from_str(stdout).with_context(|| format!("usine bench printed no JSON:\n{stdout}"))?;
    let streams = &value["streams"];
    ensure!(
        streams["prompt"] == PROMPT,
        "usine's bench prompt is {}, not {PROMPT:?}: the peer's prompt ids would not be the same",
        streams["prompt"]
    );
    ensure!(
        count(streams, "tokens")? == TOKENS,
        "usine's bench generates {} tokens a stream, not {TOKENS}",
        streams["tokens"]
    );
    let rows = streams["rows"].as_array().context("no `streams.rows` in usine's output")?;
    let counts = rows.iter().map(|row| count(row, "streams")).collect::<Result<Vec<_>>>()?;
    ensure!(counts == STREAMS, "usine's bench ran {counts:?} streams, not {STREAMS:?}");
    rows.iter()
        .zip(STREAMS)
        .map(|(row, streams)| {
            let tokens = count(row, "tokens")?;
            ensure!(
                tokens == streams * TOKENS,
                "usine's {streams} streams generated {tokens} tokens, not {}: an end of sequence ended some early",
                streams * TOKENS
            );
            let mean_batch = number(row, "mean_batch")?;
            ensure!(
                streams == 1 || mean_batch > 1.0,
                "usine's {streams} streams had a mean batch of {mean_batch}: batching did not happen"
            );
            Ok(Figures {
                tokens_per_second: number(row, "decode_tokens_per_second")?,
                first_token_seconds: number(row, "first_token_seconds")?,
                mean_batch: Some(mean_batch),
            })
        })
        .collect()
}

/// The peer's figures from its `batch` line, which must be of `streams` streams of [`TOKENS`] tokens.
fn peer_figures(stdout: &str, streams: usize) -> Result<Figures> {
    let line = stdout.lines().last().context("the peer printed nothing")?;
    let value: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
    ensure!(count(&value, "streams")? == streams, "the peer ran {} streams, not {streams}", value["streams"]);
    ensure!(
        count(&value, "tokens")? == streams * TOKENS,
        "the peer generated {} tokens, not {}",
        value["tokens"],
        streams * TOKENS
    );
    Ok(Figures {
        tokens_per_second: number(&value, "decode_tokens_per_second")?,
        first_token_seconds: number(&value, "first_token_seconds")?,
        mean_batch: None,
    })
}

/// The cells after the model and the stream count of the row at `index` of [`STREAMS`], from each
/// side's runs at every stream count (`ours[index]`: usine's runs at `STREAMS[index]`).
fn cells(ours: &[Vec<Figures>], theirs: &[Vec<Figures>], index: usize) -> Vec<String> {
    let rates = |runs: &[Figures]| runs.iter().map(|run| run.tokens_per_second).collect::<Vec<_>>();
    let firsts = |runs: &[Figures]| runs.iter().map(|run| run.first_token_seconds).collect::<Vec<_>>();
    let batches = ours[index].iter().filter_map(|run| run.mean_batch).collect::<Vec<_>>();
    let (ours_rate, theirs_rate) = (rates(&ours[index]), rates(&theirs[index]));
    vec![
        cell(&ours_rate, 1.0, 1),
        cell(&theirs_rate, 1.0, 1),
        ratio(&ours_rate, &theirs_rate),
        format!("{}×", ratio(&ours_rate, &rates(&ours[0]))),
        cell(&batches, 1.0, 1),
        format!("{:.0} ms / {:.0} ms", spread(&firsts(&ours[index])).0 * 1e3, spread(&firsts(&theirs[index])).0 * 1e3),
    ]
}

/// One process of either side in a turn: usine's bench (every stream count), or the peer at one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Usine,
    /// The peer at `STREAMS[index]`.
    Peer(usize),
}

/// The processes of turn `turn`, in its order: each turn starts one further along.
fn order(turn: usize) -> Vec<Unit> {
    let units: Vec<Unit> = std::iter::once(Unit::Usine).chain((0..STREAMS.len()).map(Unit::Peer)).collect();
    (0..units.len()).map(|index| units[(turn + index) % units.len()]).collect()
}

/// The binaries, folders and counters every model uses.
struct Bench {
    usine: PathBuf,
    peer: PathBuf,
    config: PathBuf,
    cache: PathBuf,
    prompt_ids: String,
    /// Runs repeated for other programs' work, and runs kept over [`MAX_OTHERS`] after [`TRIES`].
    repeated: usize,
    kept: usize,
}

impl Bench {
    /// `usine VERB --config FILE --model GGUF ARGS`, with this benchmark's cache, configuration and
    /// threads (other `USINE_` settings of the environment left out, but `USINE_ISA`).
    fn usine(&self, verb: &[&str], gguf: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(&self.usine);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("USINE_") && key != "USINE_ISA" {
                command.env_remove(key);
            }
        }
        command
            .env("USINE_CACHE_DIR", &self.cache)
            .env("USINE_THREADS", THREADS.to_string())
            .args(verb)
            .arg("--config")
            .arg(&self.config)
            .arg("--model")
            .arg(gguf)
            .args(args);
        command
    }

    /// The first run of `gguf`, not counted: it compiles the graph. Returns the compile's seconds.
    fn compile(&self, gguf: &Path) -> Result<f64> {
        eprintln!("compiling {}", gguf.display());
        let args = ["--max-tokens", "2", "--temperature", "0", "--no-warm", "--json", "Hi"];
        let output = timed(&mut self.usine(&["run"], gguf, &args))?;
        let loaded = output
            .stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|event| event["event"] == "loaded")
            .context("no `loaded` event")?;
        ensure!(loaded["source"] == "compile", "the first run of {} did not compile: {loaded}", gguf.display());
        loaded["seconds"].as_f64().context("no `seconds` in the `loaded` event")
    }

    /// `command` run until other programs took at most [`MAX_OTHERS`] of its time, or the least
    /// disturbed of [`TRIES`] runs.
    fn quiet(&mut self, command: &mut Command) -> Result<Timed> {
        super::real::least_disturbed(command, &mut self.repeated, &mut self.kept)
    }

    /// The table's lines for `gguf`, shown as `label`.
    fn model(&mut self, gguf: &Path, label: &str) -> Result<Vec<String>> {
        let compile = self.compile(gguf)?;
        eprintln!("compiled in {compile:.1} s");
        let mut ours: Vec<Vec<Figures>> = vec![Vec::new(); STREAMS.len()];
        let mut theirs: Vec<Vec<Figures>> = vec![Vec::new(); STREAMS.len()];
        for turn in 0..TURNS {
            for unit in order(turn) {
                match unit {
                    Unit::Usine => {
                        let mut command = self.usine(&["bench", "streams"], gguf, &["--json"]);
                        let output = self.quiet(&mut command)?;
                        let figures = usine_figures(&output.stdout)?;
                        eprintln!(
                            "turn {turn}: usine {:?} tokens/s ({:.0} s)",
                            figures.iter().map(|run| run.tokens_per_second.round()).collect::<Vec<_>>(),
                            output.seconds
                        );
                        for (runs, figures) in ours.iter_mut().zip(figures) {
                            runs.push(figures);
                        }
                    }
                    Unit::Peer(index) => {
                        let streams = STREAMS[index];
                        let mut command = Command::new(&self.peer);
                        command
                            .arg("batch")
                            .arg(gguf)
                            .args([THREADS.to_string(), streams.to_string(), TOKENS.to_string()])
                            .arg(&self.prompt_ids);
                        let output = self.quiet(&mut command)?;
                        let figures = peer_figures(&output.stdout, streams)?;
                        eprintln!(
                            "turn {turn}: llama.cpp, {streams} streams: {:.0} tokens/s ({:.0} s)",
                            figures.tokens_per_second, output.seconds
                        );
                        theirs[index].push(figures);
                    }
                }
            }
        }
        Ok(STREAMS
            .iter()
            .enumerate()
            .map(|(index, streams)| format!("| {label} | {streams} | {} |", cells(&ours, &theirs, index).join(" | ")))
            .collect())
    }
}

/// Writes `model`'s GGUF file in `work` (the 58 M model's weights kept in bench-peers' folder, where
/// plain bench-peers keeps them), and returns its path.
pub(crate) fn gguf(model: Model, root: &Path, work: &Path, generator: &Path, speed: Option<&Path>) -> Result<PathBuf> {
    match model {
        Model::Preset(preset, layers) => {
            Ok(crate::model::generated_gguf(generator, work, preset, layers, QUANTIZATION)?.0)
        }
        Model::Size(size) => {
            let weights = root.join("target").join("bench-peers").join(format!("{size}.safetensors"));
            if !weights.exists() {
                eprintln!("writing {}", weights.display());
                // Written aside, then renamed: an interrupted write leaves no file that looks whole.
                let partial = weights.with_extension("safetensors.partial");
                let status = Command::new(generator).arg(size).arg(&partial).status()?;
                ensure!(status.success(), "random_model {size} failed");
                std::fs::rename(&partial, &weights)?;
            }
            // Compiled afresh, as plain bench-peers does: the engine's compile may have changed.
            let gguf = work.join(format!("{size}-{QUANTIZATION}.gguf"));
            if gguf.exists() {
                std::fs::remove_file(&gguf).with_context(|| format!("removing the old {}", gguf.display()))?;
            }
            let speed = speed.context("the speed example is built for the sized models")?;
            run_json(Command::new(speed).arg("compile").arg(&weights).arg(QUANTIZATION).arg(&gguf))?;
            Ok(gguf)
        }
    }
}

/// The table (see the file's doc), of the models named in `names` (comma-separated), or all.
#[allow(clippy::print_stdout, reason = "the table is the command's output")]
pub(crate) fn run(root: &Path, names: Option<&str>) -> Result<std::process::ExitCode> {
    let started = Instant::now();
    let models = selected(names)?;
    let work = root.join("target").join("bench-peers").join("batch");
    std::fs::create_dir_all(&work)?;
    let peer = build_peer(root)?;
    eprintln!("building usine and the engine's random_model and speed examples");
    let usine = build(
        Command::new(env!("CARGO")).args(["build", "--release", "--quiet", "-p", "usine-cli"]).current_dir(root),
        "usine",
    )?;
    let example = |name: &str| {
        build(
            Command::new(env!("CARGO"))
                .args(["build", "--release", "--quiet", "-p", "usine-engine-candle", "--example", name])
                .current_dir(root),
            &format!("the engine's {name} example"),
        )
    };
    let generator = example("random_model")?;
    let speed = if models.iter().any(|model| matches!(model, Model::Size(_))) { Some(example("speed")?) } else { None };
    let built_from = source_state(root);
    // A cache of the benchmark's own, fresh: every file's graph compiled by this invocation.
    let cache = work.join("cache");
    if cache.exists() {
        std::fs::remove_dir_all(&cache).with_context(|| format!("removing {}", cache.display()))?;
    }
    let config = work.join("usine.toml");
    std::fs::write(&config, "# cargo xtask bench-peers --batch: every setting at its default\n")?;
    let prompt_ids = PROMPT.bytes().map(|byte| byte.to_string()).collect::<Vec<_>>().join(",");
    let mut bench = Bench { usine, peer, config, cache: cache.clone(), prompt_ids, repeated: 0, kept: 0 };
    let load_before = load_average();
    let mut table = Vec::new();
    for model in models {
        let gguf = gguf(model, root, &work, &generator, speed.as_deref())?;
        let bytes = std::fs::metadata(&gguf).map(|file| file.len()).unwrap_or_default();
        #[expect(clippy::cast_precision_loss, reason = "a file's size, shown in MB")]
        let megabytes = bytes as f64 / 1e6;
        let label = match model {
            Model::Size(size) => format!("{size} ({megabytes:.0} MB)"),
            Model::Preset(preset, layers) => format!("{preset}, {layers} layers ({megabytes:.0} MB)"),
        };
        let lines = bench.model(&gguf, &label).with_context(|| label.clone())?;
        for line in &lines {
            eprintln!("{line}");
        }
        table.extend(lines);
    }
    std::fs::remove_dir_all(&cache).with_context(|| format!("removing {}", cache.display()))?;
    let (kernels, _) = kernels();
    println!("usine built from {built_from}");
    println!("load average (1 min): {load_before} before, {} after", load_average());
    println!(
        "runs repeated as other programs took over {:.0}% of their time in CPU time: {}; kept so after {TRIES} tries: {}",
        MAX_OTHERS * 100.0,
        bench.repeated,
        bench.kept
    );
    println!(
        "usine's kernels: {kernels}{}; {QUANTIZATION}, {THREADS} threads; medians of {TURNS} turns (range); prompt {} tokens, {TOKENS} greedy tokens a stream; {:.0} s in all",
        if std::env::var_os("USINE_ISA").is_some() { " (USINE_ISA)" } else { " (the best this CPU runs)" },
        PROMPT.len(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "decode tokens/s: all the streams' tokens while they decode together, over that time, prompts left out; first token: usine's median stream from its request, llama.cpp's from its prompts' batch"
    );
    println!(
        "| model | streams | usine decode tokens/s | llama.cpp decode tokens/s | usine / llama.cpp | usine's gain over 1 stream | usine mean batch | first token, median (usine / llama.cpp) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for line in table {
        println!("{line}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;

    /// usine's bench output with `mean_batch` at each of [`STREAMS`], every stream generating its
    /// tokens.
    fn usine_output(mean_batch: [f64; 4]) -> String {
        let rows: Vec<Value> = STREAMS
            .iter()
            .zip(mean_batch)
            .map(|(&streams, mean_batch)| {
                serde_json::json!({
                    "streams": streams,
                    "tokens": streams * TOKENS,
                    "total_seconds": 1.0,
                    "decode_tokens_per_second": 10.0 * streams as f64,
                    "first_token_seconds": 0.1 * streams as f64,
                    "mean_batch": mean_batch,
                })
            })
            .collect();
        let value =
            serde_json::json!({ "model": "m", "streams": { "prompt": PROMPT, "tokens": TOKENS, "rows": rows } });
        serde_json::to_string_pretty(&value).unwrap()
    }

    #[test]
    fn usines_figures_are_read_from_its_pretty_printed_json_in_stream_order() {
        // Would catch: reading usine's multi-line JSON line by line, or rows out of order.
        let figures = usine_figures(&usine_output([1.0, 3.9, 15.5, 60.0])).unwrap();
        assert_eq!(figures.len(), STREAMS.len());
        assert_eq!(figures[2], Figures { tokens_per_second: 160.0, first_token_seconds: 1.6, mean_batch: Some(15.5) });
    }

    #[test]
    fn a_run_of_several_streams_without_batching_fails_and_says_so() {
        // Would catch: a table of several streams' figures that were run one by one.
        let error = usine_figures(&usine_output([1.0, 1.0, 15.5, 60.0])).unwrap_err().to_string();
        assert!(error.contains("4 streams") && error.contains("batching did not happen"), "{error}");
        // One stream has nothing to batch with.
        assert!(usine_figures(&usine_output([1.0, 2.0, 2.0, 2.0])).is_ok());
    }

    #[test]
    fn usines_run_fails_where_its_prompt_tokens_or_stream_counts_are_not_the_peers() {
        // Would catch: cli/src/bench.rs changing its prompt, tokens or stream counts while the peer
        // keeps the old ones, so that the two sides measure different work.
        let good = usine_output([1.0, 4.0, 16.0, 64.0]);
        let other_prompt = good.replace("loads them fast", "loads them slowly");
        assert!(usine_figures(&other_prompt).unwrap_err().to_string().contains("prompt"));
        let mut value: Value = serde_json::from_str(&good).unwrap();
        value["streams"]["tokens"] = serde_json::json!(64);
        assert!(usine_figures(&value.to_string()).is_err());
        let mut value: Value = serde_json::from_str(&good).unwrap();
        value["streams"]["rows"].as_array_mut().unwrap().pop();
        assert!(usine_figures(&value.to_string()).unwrap_err().to_string().contains("streams"));
        // An end of sequence that ended some streams early.
        let mut value: Value = serde_json::from_str(&good).unwrap();
        value["streams"]["rows"][1]["tokens"] = serde_json::json!(100);
        assert!(usine_figures(&value.to_string()).unwrap_err().to_string().contains("end of sequence"));
    }

    #[test]
    fn the_peers_figures_are_read_from_its_last_line_and_must_be_of_its_streams() {
        // Would catch: a peer line of another stream count or token count taken for this one.
        let line = r#"{"streams": 4, "tokens": 128, "total_seconds": 2.0, "first_token_seconds": 0.5, "tokens_per_second": 60.0, "decode_tokens_per_second": 64.0}"#;
        let stdout = format!("llama.cpp says hello\n{line}\n");
        assert_eq!(
            peer_figures(&stdout, 4).unwrap(),
            Figures { tokens_per_second: 64.0, first_token_seconds: 0.5, mean_batch: None }
        );
        assert!(peer_figures(&stdout, 16).is_err());
        assert!(peer_figures(&line.replace("128", "64"), 4).is_err());
    }

    #[test]
    fn a_row_shows_both_rates_their_ratio_usines_gain_its_batch_and_both_first_tokens() {
        // Would catch: the gain taken over the peer's one-stream rate instead of usine's, or the
        // sides swapped in the ratio or the first-token cell.
        let figures = |rates: [f64; 3], first: f64, batch: Option<f64>| {
            rates
                .iter()
                .map(|&rate| Figures { tokens_per_second: rate, first_token_seconds: first, mean_batch: batch })
                .collect::<Vec<_>>()
        };
        let ours = vec![figures([10.0, 9.0, 11.0], 0.1, Some(1.0)), figures([40.0, 30.0, 45.0], 0.25, Some(3.9))];
        let theirs = vec![figures([20.0, 20.0, 20.0], 0.05, None), figures([50.0, 50.0, 50.0], 0.2, None)];
        assert_eq!(
            cells(&ours, &theirs, 1),
            ["40.0 (30.0–45.0)", "50.0 (50.0–50.0)", "0.80", "4.00×", "3.9 (3.9–3.9)", "250 ms / 200 ms"]
        );
        assert_eq!(cells(&ours, &theirs, 0)[3], "1.00×");
    }

    #[test]
    fn every_process_of_a_turn_runs_once_and_each_turn_starts_one_further_along() {
        // Would catch: a turn that skips a stream count, or the same side always going first.
        for turn in 0..TURNS {
            let units = order(turn);
            assert_eq!(units.len(), STREAMS.len() + 1);
            assert!(units.contains(&Unit::Usine));
            assert!((0..STREAMS.len()).all(|index| units.contains(&Unit::Peer(index))));
        }
        assert_eq!(order(0)[0], Unit::Usine);
        assert_eq!(order(1)[0], Unit::Peer(0));
    }

    #[test]
    fn models_are_picked_by_name_and_an_unknown_one_is_refused_with_the_known_ones() {
        // Would catch: a typo in `--models` measuring nothing, or everything, silently.
        assert_eq!(selected(None).unwrap(), MODELS);
        assert_eq!(selected(Some("58m")).unwrap(), [Model::Size("58m")]);
        assert_eq!(selected(Some("qwen2.5-0.5b,58m")).unwrap(), [MODELS[1], MODELS[0]]);
        let error = selected(Some("58M")).unwrap_err().to_string();
        assert!(error.contains("58m, qwen2.5-0.5b"), "{error}");
        assert!(selected(Some("")).is_err());
    }

    #[test]
    fn the_prompt_is_printable_ascii_so_its_bytes_are_the_same_ids_on_both_sides() {
        // Would catch: a prompt whose bytes are not one token each in the byte-level vocabulary.
        assert!(PROMPT.bytes().all(|byte| (0x20..0x7f).contains(&byte)), "{PROMPT}");
    }
}
