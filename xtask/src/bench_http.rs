//! `cargo xtask bench-http`: streaming tokens/s through `usine serve` to local clients, with the
//! zero-cost engine, for 1 and 100 concurrent streams: the HTTP layer's share of the cost, to set beside
//! the executor's own figures (`cargo bench -p usine-executor`). A reader that falls behind gets the
//! tokens waiting for it in one event, so the table says how many tokens an event carried on average.
//!
//! `USINE_BENCH_BINARY=PATH` measures that `usine` binary instead of building the workspace's: two builds
//! measured in turns on the same machine, as a shared one's load drifts between runs.
//!
//! `--model FILE.gguf` measures a real model instead (the candle engine, its batching included): 1 and
//! 16 greedy streams of [`MODEL_TOKENS`] tokens, and the time between a stream's events, p50 and p99.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

/// Streams and tokens per stream of each measurement; each is run `RUNS` times and the median kept.
const CASES: [(usize, u32); 2] = [(1, 8000), (100, 1000)];
const RUNS: usize = 5;
/// Tokens of each stream on a real model, and its cases.
const MODEL_TOKENS: u32 = 64;
const MODEL_CASES: [(usize, u32); 2] = [(1, MODEL_TOKENS), (16, MODEL_TOKENS)];

/// What is measured: the zero engine, or a model file on the candle engine.
struct Target {
    /// The model's id in the server's catalog.
    id: String,
    cases: &'static [(usize, u32)],
    /// A real model may end a stream early (an end-of-sequence token): fewer tokens are allowed.
    exact: bool,
    /// Every stream's prompt.
    prompt: &'static str,
}

#[allow(clippy::print_stdout, reason = "the table is the command's output")]
pub(crate) fn run(root: &Path, model: Option<&Path>) -> Result<ExitCode> {
    // The server runs in a folder of its own: the file by its absolute path.
    let model = model.map(std::fs::canonicalize).transpose().context("the model file")?;
    let model = model.as_deref();
    let target = match model {
        None => Target { id: "zero/default".to_owned(), cases: &CASES, exact: true, prompt: "Hi" },
        Some(file) => {
            let stem = file.file_stem().and_then(|stem| stem.to_str()).context("a model file named in UTF-8")?;
            // A sentence (a random model may end a reply to "Hi" at once).
            let prompt = "The kernel keeps the right models resident and loads them fast.";
            Target { id: format!("candle/{stem}"), cases: &MODEL_CASES, exact: false, prompt }
        }
    };
    let binary = match std::env::var_os("USINE_BENCH_BINARY") {
        Some(binary) => std::path::PathBuf::from(binary),
        None => {
            eprintln!("bench-http: building usine (release)");
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--release", "-p", "usine-cli"])
                .current_dir(root)
                .status()?;
            ensure!(status.success(), "cargo build --release -p usine-cli failed");
            let metadata = cargo_metadata::MetadataCommand::new().current_dir(root).no_deps().exec()?;
            let binary =
                metadata.target_directory.join("release").join(format!("usine{}", std::env::consts::EXE_SUFFIX));
            binary.into_std_path_buf()
        }
    };
    let work = tempfile::Builder::new().prefix("usine-bench-http-").tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = Command::new(&binary)
        .arg("serve")
        .current_dir(work.path())
        .env_remove("USINE_BENCH_BINARY") // not a setting of the server's
        .env("USINE_CACHE_DIR", work.path().join("cache"))
        .env("XDG_CONFIG_HOME", work.path().join("config"))
        .env("USINE_BIND", format!("127.0.0.1:{port}"))
        .env("USINE_MAX_CONCURRENT", "128")
        .env("USINE_QUEUE_CAPACITY", "128")
        .env("USINE_MAX_TOKENS_LIMIT", "8000")
        .envs(model.map(|file| ("USINE_MODEL", file.as_os_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = measure(&base, &target);
    let _ = server.kill();
    let _ = server.wait();
    let rows = result?;
    println!("model {}; medians of {RUNS} runs", target.id);
    println!(
        "| streams | tokens in all | median time | tokens/s through HTTP | tokens per event | between events, p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for Row { streams, tokens, time, tokens_per_event, gaps } in rows {
        #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
        let rate = tokens as f64 / time.as_secs_f64();
        let [p50, p99] = [0.5, 0.99].map(|quantile| percentile(&gaps, quantile));
        println!("| {streams} | {tokens} | {time:.2?} | {rate:.0} | {tokens_per_event:.1} | {p50:.2?} | {p99:.2?} |");
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of the table.
struct Row {
    streams: usize,
    /// Tokens of one run, all streams together.
    tokens: u64,
    /// The median run's time.
    time: Duration,
    /// Tokens over text events, every run together.
    tokens_per_event: f64,
    /// The time between two text events of a stream, every run's, sorted.
    gaps: Vec<Duration>,
}

/// The `quantile` of `sorted` (nearest rank); zero when empty.
fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let rank = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(rank).copied().unwrap_or_default()
}

fn measure(base: &str, target: &Target) -> Result<Vec<Row>> {
    let http = ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build();
    let start = Instant::now();
    while http.get(&format!("{base}/health")).call().is_err() {
        ensure!(start.elapsed() < Duration::from_secs(30), "usine serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    http.post(&format!("{base}/usine/models/load"))
        .set("Content-Type", "application/json")
        .send_string(&format!("{{\"model\": \"{}\", \"keep_alive_seconds\": -1}}", target.id))?;
    let mut rows = Vec::new();
    for &(streams, max_tokens) in target.cases {
        let mut times = Vec::new();
        let mut gaps = Vec::new();
        let (mut tokens, mut all_tokens, mut all_events) = (0, 0, 0);
        for _ in 0..RUNS {
            let (counted, events, time, run_gaps) = round(base, target, streams, max_tokens)?;
            (tokens, all_tokens, all_events) = (counted, all_tokens + counted, all_events + events);
            times.push(time);
            gaps.extend(run_gaps);
        }
        times.sort();
        gaps.sort();
        #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
        let tokens_per_event = all_tokens as f64 / all_events as f64;
        rows.push(Row { streams, tokens, time: times[RUNS / 2], tokens_per_event, gaps });
    }
    Ok(rows)
}

/// `streams` concurrent streams of `max_tokens` each; the tokens received (as the usage at each stream's
/// end counts them), the events that carried their text, the time they took, and the time between two
/// text events of a stream.
fn round(base: &str, target: &Target, streams: usize, max_tokens: u32) -> Result<(u64, u64, Duration, Vec<Duration>)> {
    let barrier = Arc::new(Barrier::new(streams + 1));
    let threads: Vec<_> = (0..streams)
        .map(|_| {
            let (barrier, base, model, prompt) =
                (Arc::clone(&barrier), base.to_owned(), target.id.clone(), target.prompt);
            std::thread::spawn(move || -> Result<(u64, u64, Vec<Duration>)> {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build();
                let body = format!("{{\"model\": \"{model}\", \"prompt\": \"{prompt}\", \"max_tokens\": {max_tokens}, \"temperature\": 0, \"stream\": true, \"stream_options\": {{\"include_usage\": true}}}}");
                barrier.wait();
                let response = agent.post(&format!("{base}/v1/completions")).set("Content-Type", "application/json").send_string(&body)?;
                let (mut tokens, mut events, mut gaps, mut last) = (0, 0, Vec::new(), None);
                for line in BufReader::new(response.into_reader()).lines() {
                    let line = line?;
                    if line.starts_with("data: {") && line.contains("\"finish_reason\":null") {
                        events += 1;
                        let now = Instant::now();
                        if let Some(last) = last.replace(now) {
                            gaps.push(now - last);
                        }
                    } else if let Some(usage) = line.strip_prefix("data: ").filter(|data| data.contains("\"usage\"")) {
                        let usage: serde_json::Value = serde_json::from_str(usage)?;
                        tokens = usage["usage"]["completion_tokens"].as_u64().context("a usage without its tokens")?;
                    }
                }
                Ok((tokens, events, gaps))
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let (mut tokens, mut events, mut gaps) = (0, 0, Vec::new());
    for thread in threads {
        let (stream_tokens, stream_events, stream_gaps) =
            thread.join().expect("a client thread").context("a stream")?;
        (tokens, events) = (tokens + stream_tokens, events + stream_events);
        gaps.extend(stream_gaps);
    }
    let time = start.elapsed();
    let asked = streams as u64 * u64::from(max_tokens);
    ensure!(tokens == asked || (!target.exact && tokens > 0 && tokens <= asked), "{tokens} tokens received of {asked}");
    Ok((tokens, events, time, gaps))
}
