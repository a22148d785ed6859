//! `usine serve` as a process: the warm-up of its configured models at start, and SIGINT.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A running `usine serve` and the lines of its stderr so far.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
    /// Reads stderr to its end (the exit).
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// `usine serve` on a free loopback port, in `dir` (its cache in `dir/cache`, `dir/usine.toml` read),
    /// once it says where it listens.
    fn start(dir: &Path) -> Self {
        let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("usine"));
        for (key, _) in std::env::vars() {
            if key.starts_with("USINE_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .args(["serve", "--bind", "127.0.0.1:0"])
            .env("USINE_CACHE_DIR", dir.join("cache"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("HOME", dir)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = Vec::new();
        let base = loop {
            let line = lines.next().unwrap_or_else(|| panic!("serve ended before it listened: {log:?}")).unwrap();
            let address = line.strip_prefix("usine serve: listening on ").map(|rest| rest.split(' ').next());
            log.push(line.clone());
            if let Some(Some(address)) = address {
                break address.to_owned();
            }
        };
        let log = Arc::new(Mutex::new(log));
        let sink = Arc::clone(&log);
        let reader =
            std::thread::spawn(move || lines.map_while(Result::ok).for_each(|line| sink.lock().unwrap().push(line)));
        Self { child, base, log, reader: Some(reader) }
    }

    /// The status and JSON body of a GET, or the transport error's text.
    fn get(&self, path: &str) -> Result<(u16, Value), String> {
        match ureq::get(&format!("{}{path}", self.base)).timeout(Duration::from_secs(10)).call() {
            Ok(response) => Ok((response.status(), response.into_json().unwrap())),
            Err(ureq::Error::Status(status, response)) => Ok((status, response.into_json().unwrap())),
            Err(error) => Err(error.to_string()),
        }
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill").args([signal, &self.child.id().to_string()]).status();
        assert!(status.unwrap().success(), "kill {signal}");
    }

    /// The exit status, waited for until `deadline`, and the whole of stderr.
    fn exit_by(&mut self, deadline: Instant) -> (std::process::ExitStatus, String) {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.reader.take().unwrap().join().unwrap();
                return (status, self.log.lock().unwrap().join("\n"));
            }
            assert!(Instant::now() < deadline, "serve still runs; its log: {:?}", self.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Would catch: `serve` not starting the configured warm-up, or reporting ready before the model is
// loaded; any answer before the first 200 must be the warm-up's 503.
#[test]
fn serve_warms_up_its_configured_models_and_is_ready_once_they_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("usine.toml"), "warmup = [\"webllm/tiny\"]\nwait_for_warmup = true\n").unwrap();
    let server = Server::start(dir.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut not_ready = 0;
    loop {
        match server.get("/health").unwrap() {
            (200, body) => {
                assert_eq!(body, json!({ "status": "ready" }));
                break;
            }
            (503, body) => {
                assert_eq!(body, json!({ "status": "not_ready", "reason": "not ready: warming up webllm/tiny" }));
                not_ready += 1;
            }
            other => panic!("/health during the warm-up: {other:?}"),
        }
        assert!(Instant::now() < deadline, "not ready after 30 s: {:?}", server.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(10));
    }
    // Nothing but the warm-up asked for the model.
    let (status, loaded) = server.get("/usine/models/loaded").unwrap();
    assert_eq!(status, 200);
    let ids: Vec<&str> = loaded["models"].as_array().unwrap().iter().map(|m| m["model"].as_str().unwrap()).collect();
    assert_eq!(ids, ["webllm/tiny"], "{loaded} (503 seen {not_ready} times first)");
}

// Would catch: SIGINT killing the server (no exit code, the stream cut), stopping it without its grace
// period (the stream cut), being ignored (no exit, new requests still answered), or an exit code other
// than the 0 that `serve` returns on a clean shutdown.
#[test]
fn sigint_stops_serve_gracefully_a_running_stream_finishes_and_the_exit_is_0() {
    let dir = tempfile::tempdir().unwrap();
    // A grace far longer than the stream: the server exits when its last stream ends, not at the grace.
    std::fs::write(dir.path().join("usine.toml"), "shutdown_grace_seconds = 60\n").unwrap();
    let mut server = Server::start(dir.path());
    // 500 greedy tokens of the tiny model at 2 ms: a second of tokens left when SIGINT comes.
    let request = json!({ "model": "webllm/tiny", "prompt": "Hi", "max_tokens": 500, "temperature": 0,
                          "stream": true, "stream_options": { "include_usage": true } });
    let response = ureq::post(&format!("{}/v1/completions", server.base))
        .timeout(Duration::from_secs(60))
        .send_json(request)
        .unwrap();
    let mut events = BufReader::new(response.into_reader())
        .lines()
        .map_while(Result::ok) // a cut connection ends the stream, without its `[DONE]`
        .filter_map(|line| line.strip_prefix("data: ").map(str::to_owned));
    let first = events.next().unwrap();
    assert!(first.contains("\"text_completion\""), "{first}");

    server.signal("-INT");
    let signalled = Instant::now();
    // No new work from the signal on: a 503, or no connection at all once the listener is closed.
    loop {
        match server.get("/health") {
            Ok((503, body)) => {
                assert_eq!(body["reason"], "the server is shutting down");
                break;
            }
            Err(_) => break,
            Ok(other) => assert!(signalled.elapsed() < Duration::from_secs(5), "5 s after SIGINT: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let rest: Vec<String> = events.collect();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "the stream was cut: {rest:?}");
    let chunks: Vec<Value> = rest[..rest.len() - 1].iter().map(|data| serde_json::from_str(data).unwrap()).collect();
    let usage = chunks.iter().find_map(|chunk| chunk.get("usage").filter(|usage| !usage.is_null())).unwrap();
    assert_eq!(usage["completion_tokens"], 500, "every token came: {usage}");

    let (status, log) = server.exit_by(Instant::now() + Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}: {log}");
    assert!(log.contains("usine serve: shutting down; running streams have 60 s"), "{log}");
    assert!(!log.contains("the grace period is over"), "{log}");
}

// Would catch: the counts of use not written at shutdown. They are also written as loads happen, but
// at most once a second, so the uses of the last second reach `usage.json` only through the shutdown's
// write (and start-up warms the most used models from it).
#[test]
fn the_counts_of_use_are_saved_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    for _ in 0..3 {
        let request = json!({ "model": "webllm/tiny", "prompt": "Hi", "max_tokens": 2 });
        let response = ureq::post(&format!("{}/v1/completions", server.base))
            .timeout(Duration::from_secs(30))
            .send_json(request)
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    server.signal("-TERM");
    let (status, log) = server.exit_by(Instant::now() + Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status}: {log}");
    let counts: Value = serde_json::from_slice(&std::fs::read(dir.path().join("cache/usage.json")).unwrap()).unwrap();
    assert_eq!(counts, json!({ "webllm/tiny": 3 }), "{log}");
}
