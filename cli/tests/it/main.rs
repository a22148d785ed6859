//! End-to-end tests of the `usine` binary: each runs the real command in a fresh folder (its own cache,
//! no configuration but what the test writes) and checks its output and exit code.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns unwrap too: a panic is a test failure with its message"
)]

use std::path::Path;

use assert_cmd::Command;
use serde_json::Value;

mod files;
mod hostile;
mod logs;
mod migrate;
mod readme;
mod serve;
mod user;

/// `usine` in `dir`: its cache in `dir/cache`, its config folder `dir/config`, its working folder `dir`.
fn usine(dir: &Path) -> Command {
    let mut command = Command::cargo_bin("usine").unwrap();
    command
        .current_dir(dir)
        .env("USINE_CACHE_DIR", dir.join("cache"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("HOME", dir)
        .env_remove("RUST_BACKTRACE");
    for (key, _) in std::env::vars() {
        if key.starts_with("USINE_") && key != "USINE_CACHE_DIR" {
            command.env_remove(key);
        }
    }
    command
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// Flips a byte in the middle of a graph of the cache in `dir/cache`, as a failing disk would.
fn damage_a_graph(dir: &Path) {
    let graph = std::fs::read_dir(dir.join("cache/graphs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|ext| ext == "graph"))
        .unwrap();
    let mut bytes = std::fs::read(&graph).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&graph, bytes).unwrap();
}

/// The JSON lines of a `--json` run.
fn json_lines(output: &std::process::Output) -> Vec<Value> {
    stdout(output).lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))).collect()
}

#[test]
fn run_compiles_the_first_time_then_loads_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let first = usine(dir.path()).args(["run", "--model", "tiny", "Bonjour"]).output().unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("webllm/tiny: compiled and warmed up in"), "{}", stderr(&first));
    assert!(stderr(&first).contains("; the graph is cached in"), "{}", stderr(&first));
    assert!(stdout(&first).trim().len() > 10, "an answer: {:?}", stdout(&first));

    let second = usine(dir.path()).args(["run", "--model", "tiny", "Bonjour"]).output().unwrap();
    assert!(second.status.success());
    assert!(stderr(&second).contains("loaded from the compiled-graph cache and warmed up in"), "{}", stderr(&second));
    assert_eq!(stdout(&second), stdout(&first), "same seed, same answer");
    assert!(stderr(&second).contains("tokens/s"));
}

#[test]
fn run_json_prints_one_event_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let output = usine(dir.path()).args(["run", "--json", "-m", "tiny", "--max-tokens", "5", "Hi"]).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let events = json_lines(&output);
    let kinds: Vec<&str> = events.iter().map(|event| event["event"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"progress"), "the compile reports progress: {kinds:?}");
    assert_eq!(events.iter().find(|e| e["event"] == "loaded").unwrap()["source"], "compile");
    let indices: Vec<u64> =
        events.iter().filter(|e| e["event"] == "token").map(|e| e["index"].as_u64().unwrap()).collect();
    let tokens = indices.len() as u64;
    assert_eq!(indices, (0..tokens).collect::<Vec<_>>(), "tokens in order, none missing");
    let finished = events.last().unwrap();
    assert_eq!(finished["event"], "finished");
    let usage = &finished["usage"];
    assert_eq!(usage["generated_tokens"].as_u64().unwrap(), tokens);
    assert!(tokens <= 5 && tokens > 0);
    // The figures agree: queued before the first token, which came before the end, and the decode speed
    // over the tokens after the first fits between the first token and the end.
    let seconds = |key: &str| usage[key].as_f64().unwrap_or_else(|| panic!("no {key}: {usage}"));
    let (queued, first, total) =
        (seconds("queued_seconds"), seconds("time_to_first_token_seconds"), seconds("total_seconds"));
    assert!(queued <= first && first <= total, "{usage}");
    if tokens >= 2 {
        let decode = decode_seconds(tokens, seconds("tokens_per_second"));
        assert!(decode <= (total - first) + 1e-9 * total, "{usage}");
    }
}

#[test]
fn run_reads_the_prompt_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let output = usine(dir.path())
        .args(["run", "--engine", "transformers", "--model", "tiny", "--max-tokens", "8"])
        .write_stdin("What does the kernel do?\n")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("transformers/tiny"));
    assert!(!stdout(&output).trim().is_empty());
}

#[test]
fn a_corrupt_graph_is_quarantined_and_the_run_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    assert!(usine(dir.path()).args(["run", "-m", "tiny", "Hi"]).output().unwrap().status.success());
    damage_a_graph(dir.path());
    let graphs = dir.path().join("cache").join("graphs");

    let output = usine(dir.path()).args(["run", "-m", "tiny", "Hi"]).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("compiled and warmed up in"), "compiled again: {}", stderr(&output));
    assert!(!stdout(&output).trim().is_empty());
    assert_eq!(std::fs::read_dir(graphs.join("quarantine")).unwrap().count(), 1);
}

/// `a` equals `b` up to the rounding of two decimal conversions.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// The time from the first token to the last that a decode speed of `tokens_per_second` over `tokens`
/// tokens stands for (the speed counts the tokens after the first).
fn decode_seconds(tokens: u64, tokens_per_second: f64) -> f64 {
    (tokens - 1) as f64 / tokens_per_second
}

// Speeds are measured by `usine bench`, not claimed here: this checks that the report is whole and its
// figures agree with each other (counts, order, a speed within the time it was measured in).
#[test]
fn bench_json_parses_with_every_suite_and_consistent_figures_and_the_plot_is_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let output = usine(dir.path())
        .args(["bench", "all", "--model", "tiny", "--runs", "3", "--json", "--plot", "bench.svg"])
        .env("USINE_JITTER", "0") // the simulated delays at their nominal values, for the floors below
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let results: Value = serde_json::from_slice(&output.stdout).unwrap();
    let number = |value: &Value| value.as_f64().unwrap_or_else(|| panic!("not a number: {value}"));
    assert_eq!(results["model"], "webllm/tiny");
    let cold = &results["cold"];
    // Floors, not speeds: without jitter, the simulated tiny model sleeps 150 ms to compile, 15 ms to load
    // and 30 ms on its first use, and a sleep never ends early.
    assert!(number(&cold["compile_seconds"]) >= 0.150, "the first bench compiles: {cold}");
    for (run, least) in [("without_warming", 0.015), ("with_warming", 0.015 + 0.030)] {
        let run = &cold[run];
        assert_eq!(run["source"], "disk", "a cold start loads from the graph cache: {run}");
        let (load, first, total) =
            (number(&run["load_seconds"]), number(&run["first_token_seconds"]), number(&run["total_seconds"]));
        assert!(least <= load && load <= first && first <= total, "{run}");
    }
    let warm = &results["warm"];
    assert_eq!(warm["runs"], 3);
    assert!(warm["tokens"].as_u64().unwrap() >= 3, "every run generates: {warm}");
    let (min, median, mean, max) = (
        number(&warm["min_seconds"]),
        number(&warm["median_seconds"]),
        number(&warm["mean_seconds"]),
        number(&warm["max_seconds"]),
    );
    assert!(0.0 < min && min <= median && median <= max && min <= mean && mean <= max, "{warm}");
    assert!(number(&warm["stddev_seconds"]) <= (max - min) + 1e-12, "a spread within the range: {warm}");
    assert!(number(&warm["tokens_per_second"]) > 0.0, "{warm}");

    let lengths = results["max_tokens"].as_array().unwrap();
    assert_eq!(lengths.iter().map(|row| row["max_tokens"].as_u64().unwrap()).collect::<Vec<_>>(), [25, 50, 100, 150]);
    for row in lengths {
        assert_eq!(row["tokens"], row["max_tokens"], "greedy decoding reaches every length");
        let speed = number(&row["tokens_per_second"]);
        assert!(speed > 0.0, "{row}");
        let decode = decode_seconds(row["tokens"].as_u64().unwrap(), speed);
        assert!(decode <= number(&row["total_seconds"]) * (1.0 + 1e-9), "decoding within the run's time: {row}");
    }
    let contexts = results["context"].as_array().unwrap();
    assert_eq!(
        contexts.iter().map(|row| row["prompt"].as_str().unwrap()).collect::<Vec<_>>(),
        ["short", "medium", "long"]
    );
    let prompts: Vec<u64> = contexts.iter().map(|row| row["prompt_tokens"].as_u64().unwrap()).collect();
    assert!(prompts[0] < prompts[1] && prompts[1] < prompts[2], "{prompts:?}");
    for row in contexts {
        let (first, total) = (number(&row["first_token_seconds"]), number(&row["total_seconds"]));
        // The row does not say how many tokens (at most 32: greedy may still end after a sentence), but a
        // speed means two at least, and the time of one after the first fits between it and the end.
        let speed = number(&row["tokens_per_second"]);
        assert!(speed > 0.0 && first <= total && decode_seconds(2, speed) <= (total - first) + 1e-9 * total, "{row}");
    }
    let pipeline = &results["pipeline"];
    assert_eq!(pipeline["tokens"], 100);
    let (on, off) = (number(&pipeline["on_tokens_per_second"]), number(&pipeline["off_tokens_per_second"]));
    assert!(on > 0.0 && off > 0.0, "{pipeline}");
    assert!(close(number(&pipeline["speedup"]), on / off), "the speed-up is on over off: {pipeline}");
    let svg = std::fs::read_to_string(dir.path().join("bench.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("latency against tokens"), "{}", &svg[..svg.len().min(200)]);
}

#[test]
fn bad_flags_and_values_exit_2_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let output = usine(dir.path()).args(["run", "--temperature", "5", "Hi"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output).trim(),
        "error: bad configuration in command-line flag: key `temperature` is 5, expected 0..=2"
    );
    let output = usine(dir.path()).args(["run", "--bogus"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("unexpected argument '--bogus'"));
    let output = usine(dir.path()).args(["run", "--model", "13b", "Hi"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("engine `webllm` has no model `13b` (it has: tiny, 7b)"), "{}", stderr(&output));
    assert_eq!(stderr(&output).lines().count(), 1, "one line: {}", stderr(&output));
    let output = usine(dir.path()).args(["bench", "cold", "--plot", "x.jpg"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "checked before measuring");
    assert!(stderr(&output).contains("must end in .svg or .png"), "{}", stderr(&output));
}

#[test]
fn bad_configuration_names_the_file_the_key_and_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("usine.toml"), "max_tokens = \"many\"\n").unwrap();
    let output = usine(dir.path()).args(["run", "Hi"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("usine.toml") && message.contains("`max_tokens`"), "{message}");
    assert!(message.contains("expected u32"), "{message}");

    std::fs::write(dir.path().join("usine.toml"), "max_token = 5\n").unwrap();
    let message = stderr(&usine(dir.path()).args(["config", "show"]).output().unwrap());
    assert!(message.contains("usine.toml: unknown key `max_token` (the keys: engine, model, "), "{message}");
    assert!(!message.contains("``"), "{message}");
}

#[test]
fn config_show_says_where_each_value_came_from() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("usine.toml"), "temperature = 0.2\nmax_tokens = 10\n").unwrap();
    let output = usine(dir.path()).args(["config", "show", "--json"]).env("USINE_MAX_TOKENS", "7").output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let settings: Value = serde_json::from_slice(&output.stdout).unwrap();
    let setting = |key: &str| settings.as_array().unwrap().iter().find(|s| s["key"] == key).unwrap().clone();
    assert_eq!(setting("max_tokens")["value"], "7");
    assert_eq!(setting("max_tokens")["source"], "environment variable USINE_MAX_TOKENS");
    assert_eq!(setting("temperature")["value"], "0.2");
    assert!(setting("temperature")["source"].as_str().unwrap().ends_with("usine.toml"));
    assert_eq!(setting("engine")["source"], "default");
    assert_eq!(setting("top_p")["value"], "0.95", "a default f32 as written, not 0.949999988079071");
}

#[test]
fn cache_commands_list_explain_verify_and_clear() {
    let dir = tempfile::tempdir().unwrap();
    assert!(usine(dir.path()).args(["run", "-m", "tiny", "Hi"]).output().unwrap().status.success());
    let ls: Value =
        serde_json::from_slice(&usine(dir.path()).args(["cache", "ls", "--json"]).output().unwrap().stdout).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["status"], "valid");

    let explain = usine(dir.path()).args(["cache", "explain", "tiny"]).output().unwrap();
    assert!(stdout(&explain).starts_with("a graph is stored for webllm/tiny"), "{}", stdout(&explain));
    let explain = usine(dir.path()).args(["cache", "explain", "--model", "7b", "--json"]).output().unwrap();
    let explain: Value = serde_json::from_slice(&explain.stdout).unwrap();
    assert_eq!(explain["stored"], false);
    assert!(explain["closest"]["differs"].as_array().unwrap().iter().any(|part| part == "model"));

    let verify = usine(dir.path()).args(["cache", "verify"]).output().unwrap();
    assert_eq!(stdout(&verify).lines().next().unwrap(), "1 valid, 0 of a newer usine (left alone), 0 quarantined");
    let stats = usine(dir.path()).args(["cache", "stats"]).output().unwrap();
    assert!(stdout(&stats).starts_with("1 graph, "), "{}", stdout(&stats));
    let gc = usine(dir.path()).args(["cache", "gc"]).output().unwrap();
    assert_eq!(stdout(&gc).trim(), "nothing to do");

    let clear = usine(dir.path()).args(["cache", "clear"]).output().unwrap();
    assert!(stdout(&clear).contains("run `usine cache clear --yes`"));
    let clear = usine(dir.path()).args(["cache", "clear", "--yes"]).output().unwrap();
    assert!(stdout(&clear).starts_with("removed 1 of 1 graph "), "{}", stdout(&clear));
    let ls = usine(dir.path()).args(["cache", "ls"]).output().unwrap();
    assert!(stdout(&ls).starts_with("no compiled graphs"));
}

#[test]
fn models_pools_and_doctor_describe_the_setup() {
    let dir = tempfile::tempdir().unwrap();
    let models: Value =
        serde_json::from_slice(&usine(dir.path()).args(["models", "--json"]).output().unwrap().stdout).unwrap();
    let ids: Vec<&str> = models.as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["webllm/tiny", "webllm/7b", "transformers/tiny", "transformers/cpu-1b", "zero/default", "candle/tiny-llama"]
    );
    assert!(models.as_array().unwrap().iter().any(|m| m["default"] == true && m["id"] == "webllm/7b"));

    let pools = usine(dir.path()).args(["pools", "--json"]).env("USINE_MEMORY_BUDGET_MIB", "1024").output().unwrap();
    let pools: Value = serde_json::from_slice(&pools.stdout).unwrap();
    let kv = pools.as_array().unwrap().iter().find(|p| p["name"] == "kv-cache").unwrap();
    assert_eq!(kv["capacity"], 751_616_000, "70 % of 1 GiB in 4 KiB blocks");

    let doctor: Value =
        serde_json::from_slice(&usine(dir.path()).args(["doctor", "--json"]).output().unwrap().stdout).unwrap();
    let cores = doctor["cores"].as_u64().unwrap();
    assert!(cores >= 1 && doctor["memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(doctor["threads"].as_u64().unwrap(), cores.saturating_sub(2).max(1));
    assert_eq!(doctor["profile"]["name"], "cpu", "no GPU is read here");
}

#[test]
fn help_has_examples_and_completions_are_printed() {
    let dir = tempfile::tempdir().unwrap();
    let commands = [
        "run",
        "bench",
        "cache",
        "cache ls",
        "cache stats",
        "cache verify",
        "cache explain",
        "cache gc",
        "cache migrate",
        "cache clear",
        "pools",
        "models",
        "doctor",
        "config",
        "config show",
        "serve",
        "completions",
    ];
    for command in commands {
        let help = usine(dir.path()).args(command.split(' ')).arg("--help").output().unwrap();
        assert!(help.status.success());
        assert!(stdout(&help).contains("Example"), "`usine {command} --help` has no example");
    }
    let completions = usine(dir.path()).args(["completions", "bash"]).output().unwrap();
    assert!(stdout(&completions).contains("_usine()"));
}

#[test]
fn ctrl_c_stops_the_generation_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // 2,000 greedy tokens at 2 ms (greedy decoding never ends this one early): four seconds.
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("usine"))
        .args(["run", "--json", "-m", "tiny", "--temperature", "0", "--max-tokens", "2000", "Hi"])
        .env("USINE_CACHE_DIR", dir.path().join("cache"))
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env("HOME", dir.path())
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    // Interrupt once tokens flow (the handler is installed before the load).
    let first = lines.by_ref().map(Result::unwrap).find(|line| line.contains("\"event\":\"token\"")).unwrap();
    assert!(first.contains("\"index\":0"), "{first}");
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let rest: Vec<Value> = lines.map(|line| serde_json::from_str(&line.unwrap()).unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let last = rest.last().unwrap();
    assert_eq!(last["event"], "cancelled", "{rest:?}");
    let tokens = last["generated_tokens"].as_u64().unwrap();
    assert!((1..2000).contains(&tokens), "{last}");
}

#[test]
fn the_candle_engine_answers_with_its_own_model_and_loads_it_from_the_cache_after() {
    let dir = tempfile::tempdir().unwrap();
    let first =
        usine(dir.path()).args(["run", "--engine", "candle", "--max-tokens", "16", "The kernel"]).output().unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("candle/tiny-llama: compiled"), "{}", stderr(&first));
    assert!(stderr(&first).contains("16 tokens"), "{}", stderr(&first));
    assert!(!stdout(&first).trim().is_empty());
    let second =
        usine(dir.path()).args(["run", "--engine", "candle", "--max-tokens", "16", "The kernel"]).output().unwrap();
    assert!(stderr(&second).contains("loaded from the compiled-graph cache"), "{}", stderr(&second));
    assert_eq!(stdout(&second), stdout(&first), "same seed, same answer");
    assert!(!dir.path().join("cache").join("sources").exists(), "the built-in weights are compiled from memory");
}

#[test]
fn the_version_carries_the_notice_of_the_built_in_model() {
    let dir = tempfile::tempdir().unwrap();
    let output = usine(dir.path()).arg("--version").output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.starts_with(&format!("usine {}", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.contains("The Rust Programming Language") && text.contains("MIT license"), "{text}");
}
