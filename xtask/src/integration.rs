//! `cargo xtask integration`: everything real on loopback. Builds and starts `usine serve` on a free
//! port with a fresh cache folder, starts a real Prometheus scraping it every second, drives it with the
//! official OpenAI Python client and with load, disconnects and hostile requests, checks each outcome,
//! stops everything, and prints a report. Exits non-zero if any check failed.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

/// Generation slots and queue places of the server under test: small, so that load goes beyond them.
const MAX_CONCURRENT: usize = 4;
const QUEUE_CAPACITY: usize = 8;
/// Concurrent streams offered in the load step: well beyond slots and queue together.
const OFFERED: usize = 40;
/// The server's grace period after SIGTERM.
const GRACE: Duration = Duration::from_secs(2);
/// A model that compiles in 150 ms and decodes at about 500 tokens/s.
const MODEL: &str = "webllm/tiny";

/// One check's outcome, for the report.
struct Check {
    name: &'static str,
    outcome: Result<String>,
}

pub(crate) fn run(root: &Path) -> Result<ExitCode> {
    let work = tempfile::Builder::new().prefix("usine-integration-").tempdir().context("a temporary folder")?;
    let binary = build(root)?;
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let mut server = Server::start(&binary, work.path(), port)?;
    let mut checks = Vec::new();
    let mut check = |name, outcome: Result<String>| {
        let line = match &outcome {
            Ok(detail) => format!("  ok    {name}: {detail}"),
            Err(error) => format!("  FAIL  {name}: {error:#}"),
        };
        eprintln!("{line}");
        checks.push(Check { name, outcome });
    };
    eprintln!("integration: usine serve on {base}, cache in {}", cache_dir(work.path()).display());
    let ready = wait_ready(&base, &mut server);
    let failed_to_start = ready.is_err();
    check("server ready", ready);
    if !failed_to_start {
        let http = agent();
        let body = format!("{{\"model\": \"{MODEL}\", \"keep_alive_seconds\": -1}}");
        let warm = post(&http, &format!("{base}/usine/models/load"), &body)
            .and_then(|(status, body)| if status == 200 { Ok(body) } else { bail!("{status}: {body}") });
        check("warm model", warm);
        match Prometheus::start(work.path(), port) {
            Ok(mut prometheus) => {
                check("prometheus scrapes pool, kernel, executor and http series", prometheus.series_arrive(&http));
                check("promtool check metrics", promtool(&http, &base));
                prometheus.stop();
            }
            Err(error) => check("prometheus", Err(error)),
        }
        check("openai python client", openai_client(root, work.path(), &base));
        check("load beyond the queue", overload(&base));
        check("pools back to zero after the load", pools_at_zero(&http, &base, Duration::from_secs(5)));
        check("client disconnects free memory", disconnects(&http, &base));
        check("hostile requests", hostile(&http, &base, work.path()));
        check("graceful shutdown on SIGTERM", shutdown(&base, &mut server));
    }

    let failed: Vec<&Check> = checks.iter().filter(|check| check.outcome.is_err()).collect();
    eprintln!("\nintegration: {} checks, {} failed", checks.len(), failed.len());
    for check in &failed {
        eprintln!("  failed: {}", check.name);
    }
    if !failed.is_empty() {
        eprintln!(
            "\nthe server's log:\n{}",
            std::fs::read_to_string(work.path().join("serve.log")).unwrap_or_default()
        );
    }
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The server's cache folder: a few levels down, so that a path escaping it by `../` still lands inside
/// the run's folder, where the hostile check looks.
fn cache_dir(work: &Path) -> PathBuf {
    work.join("a").join("b").join("c").join("cache")
}

/// Builds `usine` and returns its path.
fn build(root: &Path) -> Result<PathBuf> {
    eprintln!("integration: building usine");
    let status =
        Command::new(env!("CARGO")).args(["build", "--quiet", "-p", "usine-cli"]).current_dir(root).status()?;
    ensure!(status.success(), "cargo build -p usine-cli failed");
    let metadata = cargo_metadata::MetadataCommand::new().current_dir(root).no_deps().exec()?;
    let binary = metadata.target_directory.join("debug").join(format!("usine{}", std::env::consts::EXE_SUFFIX));
    Ok(binary.into_std_path_buf())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build()
}

/// POSTs JSON; any status comes back with its body.
fn post(http: &ureq::Agent, url: &str, body: &str) -> Result<(u16, String)> {
    let response = http.post(url).set("Content-Type", "application/json").send_string(body);
    respond(response)
}

fn get(http: &ureq::Agent, url: &str) -> Result<(u16, String)> {
    respond(http.get(url).call())
}

fn respond(response: Result<ureq::Response, ureq::Error>) -> Result<(u16, String)> {
    match response {
        Ok(response) => Ok((response.status(), response.into_string()?)),
        Err(ureq::Error::Status(status, response)) => Ok((status, response.into_string()?)),
        Err(error) => Err(error.into()),
    }
}

struct Server {
    child: Child,
}

impl Server {
    fn start(binary: &Path, work: &Path, port: u16) -> Result<Self> {
        let log = std::fs::File::create(work.join("serve.log"))?;
        let mut command = Command::new(binary);
        // Nothing of the caller's environment configures the server under test (an API key would turn
        // every check into a 401): only what is set here.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("USINE_") {
                command.env_remove(key);
            }
        }
        let child = command
            .arg("serve")
            .current_dir(work)
            .env("HOME", work)
            .env("USINE_CACHE_DIR", cache_dir(work))
            .env("XDG_CONFIG_HOME", work.join("config"))
            .env("USINE_BIND", format!("127.0.0.1:{port}"))
            .env("USINE_MAX_CONCURRENT", MAX_CONCURRENT.to_string())
            .env("USINE_QUEUE_CAPACITY", QUEUE_CAPACITY.to_string())
            .env("USINE_SHUTDOWN_GRACE_SECONDS", GRACE.as_secs().to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { child })
    }

    /// Waits for the exit that SIGTERM started: status 0 within the grace period and a little more.
    fn terminate(&mut self) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "exited with {status}");
                return Ok(format!("exit 0 after {:?}", start.elapsed()));
            }
            ensure!(start.elapsed() < Duration::from_secs(10), "still running 10 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM with two streams running: the short one finishes with `[DONE]` within the grace period (2 s
/// here), the long one goes on through it and is cut at its end, new requests are refused meanwhile, and
/// the server exits 0.
fn shutdown(base: &str, server: &mut Server) -> Result<String> {
    let (started, first_events) = std::sync::mpsc::channel();
    let spawn = |max_tokens: u32| {
        let (base, started) = (base.to_owned(), started.clone());
        std::thread::spawn(move || stream_once(&base, max_tokens, None, Some(started)))
    };
    let long = spawn(2000); // four seconds of tokens
    let short = spawn(300); // 0.6 s
    for _ in 0..2 {
        first_events.recv_timeout(Duration::from_secs(10)).context("no first event from a stream")?;
    }
    signal(server.child.id(), "TERM")?;
    let terminated = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let refused = match agent().get(&format!("{base}/health")).call() {
        Err(ureq::Error::Status(503, _) | ureq::Error::Transport(_)) => true,
        Ok(_) | Err(_) => false,
    };
    ensure!(refused, "the server still took requests 300 ms after SIGTERM");
    let exited = server.terminate()?;
    let short = short.join().expect("the short stream's thread")?;
    ensure!(short.status == 200 && short.done, "a stream shorter than the grace period did not finish");
    let long = long.join().expect("the long stream's thread")?;
    ensure!(long.status == 200 && !long.done, "the long stream was not cut");
    let streamed_for = long.last_event.map(|last| last.saturating_duration_since(terminated)).unwrap_or_default();
    ensure!(
        streamed_for >= GRACE - Duration::from_millis(300),
        "the long stream stopped {streamed_for:?} after SIGTERM, before the end of the {GRACE:?} grace period"
    );
    Ok(format!(
        "new requests refused; a short stream finished; a long one went on for {streamed_for:.1?} and was cut; {exited}"
    ))
}

fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status()?;
    ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

fn wait_ready(base: &str, server: &mut Server) -> Result<String> {
    let start = Instant::now();
    let http = agent();
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("usine serve exited with {status}");
        }
        if let Ok((200, _)) = get(&http, &format!("{base}/health")) {
            return Ok(format!("/health answered 200 after {:?}", start.elapsed()));
        }
        ensure!(start.elapsed() < Duration::from_secs(30), "/health not ready after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Prometheus server scraping usine every second.
struct Prometheus {
    child: Child,
    base: String,
}

impl Prometheus {
    fn start(work: &Path, target: u16) -> Result<Self> {
        let binary = installed("prometheus", "prometheus")?;
        let port = free_port()?;
        let config = work.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: usine\n    \
                 static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )?;
        let log = std::fs::File::create(work.join("prometheus.log"))?;
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", work.join("prometheus-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        Ok(Self { child, base: format!("http://127.0.0.1:{port}") })
    }

    /// Queries Prometheus until one series of each layer has arrived.
    fn series_arrive(&mut self, http: &ureq::Agent) -> Result<String> {
        let wanted = [
            "usine_memory_pool_capacity_bytes",
            "usine_kernel_loads_total",
            "usine_executor_requests_total",
            "usine_http_requests_total",
        ];
        let start = Instant::now();
        let mut missing: Vec<&str> = wanted.to_vec();
        while !missing.is_empty() {
            if let Some(status) = self.child.try_wait()? {
                bail!("prometheus exited with {status}");
            }
            ensure!(start.elapsed() < Duration::from_secs(30), "no series after 30 s for: {}", missing.join(", "));
            missing.retain(|name| {
                let url = format!("{}/api/v1/query?query={name}", self.base);
                !matches!(get(http, &url), Ok((200, body)) if body.contains("\"result\":[{"))
            });
            std::thread::sleep(Duration::from_millis(500));
        }
        // Fresh figures, not only series registered at zero: the warm-up's compile is counted.
        let url = format!("{}/api/v1/query?query=usine_kernel_loads_total%7Bsource%3D%22compile%22%7D", self.base);
        let (_, body) = get(http, &url)?;
        ensure!(
            body.contains("\"1\"]"),
            "usine_kernel_loads_total{{source=\"compile\"}} is not 1 in Prometheus: {body}"
        );
        Ok(format!(
            "{} series families through Prometheus's API after {:?}, the compile counted",
            wanted.len(),
            start.elapsed()
        ))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The path of `command`, installing Debian's `package` when it is missing.
pub(crate) fn installed(command: &str, package: &str) -> Result<String> {
    let found = |command: &str| Command::new("which").arg(command).output().ok().filter(|o| o.status.success());
    if found(command).is_none() {
        eprintln!("integration: installing Debian's `{package}`");
        let root = Command::new("id").arg("-u").output()?.stdout.starts_with(b"0");
        // `sudo -n`: never wait for a password that nobody will type.
        let apt = |args: &[&str]| -> Result<bool> {
            let mut command = if root { Command::new("apt-get") } else { Command::new("sudo") };
            if !root {
                command.args(["-n", "apt-get"]);
            }
            let status = command.args(args).env("DEBIAN_FRONTEND", "noninteractive").stdout(Stdio::null()).status();
            Ok(status.context("running apt-get")?.success())
        };
        let _ = apt(&["update", "-q"])?; // stale package lists are the usual reason an install fails
        ensure!(apt(&["install", "-y", "-q", package])?, "apt-get install {package} failed");
    }
    let output = found(command).with_context(|| format!("`{command}` is still missing"))?;
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

fn promtool(http: &ureq::Agent, base: &str) -> Result<String> {
    let promtool = installed("promtool", "prometheus")?;
    let (status, metrics) = get(http, &format!("{base}/metrics"))?;
    ensure!(status == 200, "/metrics answered {status}");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("promtool's stdin")?.write_all(metrics.as_bytes())?;
    let output = child.wait_with_output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(output.status.success(), "promtool check metrics failed:\n{said}");
    let families = metrics.lines().filter(|line| line.starts_with("# TYPE usine_")).count();
    Ok(format!("{families} usine metric families, every one with HELP; promtool is satisfied"))
}

/// The official OpenAI Python client, in a virtual environment kept under `target/`.
fn openai_client(root: &Path, work: &Path, base: &str) -> Result<String> {
    let venv = root.join("target").join("xtask-venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        eprintln!("integration: making a Python virtual environment with the openai client");
        let status = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().context("python3 -m venv")?;
        ensure!(status.success(), "python3 -m venv failed (on Debian: apt install python3-venv)");
    }
    let has_openai = Command::new(&python).args(["-c", "import openai"]).stderr(Stdio::null()).status()?.success();
    if !has_openai {
        let status = Command::new(&python).args(["-m", "pip", "install", "--quiet", "openai"]).status()?;
        ensure!(status.success(), "pip install openai failed");
    }
    let script = work.join("client.py");
    std::fs::write(&script, OPENAI_SCRIPT)?;
    let output = Command::new(&python)
        .arg(&script)
        .env("USINE_BASE", format!("{base}/v1"))
        .env("USINE_MODEL", MODEL)
        .output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(output.status.success(), "the client script failed:\n{said}");
    Ok(said.trim().to_owned())
}

/// Streaming and non-streaming completions and chat completions with the official client.
const OPENAI_SCRIPT: &str = r#"
import os, openai
# No automatic retries: a 5xx or a 429 must fail this script, not hide behind a second try.
client = openai.OpenAI(base_url=os.environ["USINE_BASE"], api_key="not-needed-on-loopback", max_retries=0)
model = os.environ["USINE_MODEL"]
whole = client.completions.create(model=model, prompt="The kernel", max_tokens=16, temperature=0)
assert whole.choices[0].text, whole
assert whole.usage.completion_tokens == 16, whole.usage
chunks = list(client.completions.create(model=model, prompt="The kernel", max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}))
pieces = [c.choices[0].text for c in chunks if c.choices]
assert "".join(pieces) == whole.choices[0].text, (pieces, whole.choices[0].text)
assert chunks[-1].usage.completion_tokens == 16, chunks[-1]
chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What does usine do?"}], max_tokens=12)
assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content, chat
deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=12, stream=True) if c.choices]
assert "".join(deltas), deltas
try:
    client.completions.create(model="no-such-model", prompt="x")
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError:
    pass
print(f"completion {len(whole.choices[0].text)} chars, {len(pieces)} streamed chunks equal to it, chat {len(chat.choices[0].message.content)} chars, {len(deltas)} chat deltas, 404 raised as NotFoundError")
"#;

/// What one streaming request saw.
struct Streamed {
    status: u16,
    /// It ended with `[DONE]`.
    done: bool,
    /// Time to the response's head.
    head: Duration,
    retry_after: Option<String>,
    /// When its first and last `data:` lines came.
    first_event: Option<Instant>,
    last_event: Option<Instant>,
}

/// One streaming request of `max_tokens` greedy tokens; with `read_events`, the reader hangs up after
/// that many events; `started` is told when the first event arrives.
fn stream_once(
    base: &str,
    max_tokens: u32,
    read_events: Option<usize>,
    started: Option<std::sync::mpsc::Sender<()>>,
) -> Result<Streamed> {
    let body = format!(
        "{{\"model\": \"{MODEL}\", \"prompt\": \"Hi\", \"max_tokens\": {max_tokens}, \"temperature\": 0, \"stream\": true}}"
    );
    let start = Instant::now();
    let response =
        agent().post(&format!("{base}/v1/completions")).set("Content-Type", "application/json").send_string(&body);
    let head = start.elapsed();
    let mut streamed =
        Streamed { status: 200, done: false, head, retry_after: None, first_event: None, last_event: None };
    let response = match response {
        Ok(response) => response,
        Err(ureq::Error::Status(status, response)) => {
            streamed.status = status;
            streamed.retry_after = response.header("Retry-After").map(str::to_owned);
            return Ok(streamed);
        }
        Err(error) => return Err(error.into()),
    };
    let mut events = 0;
    for line in BufReader::new(response.into_reader()).lines() {
        let Ok(line) = line else { break }; // the connection was cut: `done` says whether the end came first
        if let Some(data) = line.strip_prefix("data: ") {
            events += 1;
            let now = Instant::now();
            streamed.first_event.get_or_insert(now);
            streamed.last_event = Some(now);
            if events == 1
                && let Some(started) = &started
            {
                let _ = started.send(());
            }
            streamed.done |= data == "[DONE]";
            if read_events.is_some_and(|limit| events >= limit) {
                break; // the connection drops with the reader
            }
        }
    }
    Ok(streamed)
}

fn overload(base: &str) -> Result<String> {
    let barrier = Arc::new(Barrier::new(OFFERED));
    let threads: Vec<_> = (0..OFFERED)
        .map(|_| {
            let (barrier, base) = (Arc::clone(&barrier), base.to_owned());
            std::thread::spawn(move || {
                barrier.wait();
                stream_once(&base, 300, None, None)
            })
        })
        .collect();
    let results: Vec<_> =
        threads.into_iter().map(|thread| thread.join().expect("a request thread")).collect::<Result<_>>()?;
    let admitted: Vec<&Streamed> = results.iter().filter(|streamed| streamed.status == 200).collect();
    let refused: Vec<&Streamed> = results.iter().filter(|streamed| streamed.status == 429).collect();
    ensure!(
        admitted.len() + refused.len() == OFFERED,
        "statuses other than 200 and 429: {:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    ensure!(admitted.iter().all(|streamed| streamed.done), "an admitted stream did not end with [DONE]");
    ensure!(
        admitted.len() >= MAX_CONCURRENT + QUEUE_CAPACITY,
        "only {} admitted: slots and queue take {}",
        admitted.len(),
        MAX_CONCURRENT + QUEUE_CAPACITY
    );
    ensure!(!refused.is_empty(), "nothing refused with {OFFERED} offered");
    ensure!(
        refused.iter().all(|streamed| streamed.retry_after.as_deref() == Some("1")),
        "a 429 without Retry-After: 1"
    );
    let slowest = refused.iter().map(|streamed| streamed.head).max().unwrap_or_default();
    ensure!(slowest < Duration::from_secs(1), "a 429 took {slowest:?}: refusals must be at once");
    Ok(format!(
        "{} admitted and completed, {} refused with 429 (slowest in {slowest:?})",
        admitted.len(),
        refused.len()
    ))
}

/// Waits for the kv-cache and activations pools to be back at zero.
fn pools_at_zero(http: &ureq::Agent, base: &str, within: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        let (_, body) = get(http, &format!("{base}/usine/pools"))?;
        let pools: serde_json::Value = serde_json::from_str(&body).context("/usine/pools is not JSON")?;
        let used = |name: &str| {
            pools["pools"]
                .as_array()
                .and_then(|pools| pools.iter().find(|pool| pool["name"] == name))
                .map(|pool| pool["used"].clone())
        };
        let in_use: Vec<String> = ["kv-cache", "activations"]
            .into_iter()
            .filter_map(|pool| match used(pool) {
                Some(used) if used == 0 => None,
                other => Some(format!("{pool}: {other:?}")),
            })
            .collect();
        if in_use.is_empty() {
            return Ok(format!("kv-cache and activations at 0 bytes after {:?}", start.elapsed()));
        }
        ensure!(start.elapsed() < within, "still in use after {within:?}: {}", in_use.join(", "));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn disconnects(http: &ureq::Agent, base: &str) -> Result<String> {
    let (_, before) = get(http, &format!("{base}/metrics"))?;
    let threads: Vec<_> = (0..MAX_CONCURRENT)
        .map(|_| {
            let base = base.to_owned();
            std::thread::spawn(move || stream_once(&base, 2000, Some(3), None))
        })
        .collect();
    for thread in threads {
        let streamed = thread.join().expect("a request thread")?;
        ensure!(streamed.status == 200 && !streamed.done, "a stream meant to be cut ended by itself");
    }
    // The cut streams had seconds of tokens left: memory back within a second is the cancellation's doing.
    let zero = pools_at_zero(http, base, Duration::from_secs(1))?;
    let (_, after) = get(http, &format!("{base}/metrics"))?;
    let cancelled = |text: &str| -> f64 {
        text.lines()
            .find(|line| line.starts_with("usine_executor_requests_total{outcome=\"cancelled\"}"))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let more = cancelled(&after) - cancelled(&before);
    ensure!(more >= MAX_CONCURRENT as f64, "only {more} cancellations counted for {MAX_CONCURRENT} cut streams");
    Ok(format!("{MAX_CONCURRENT} streams cut after 3 events, {more} counted as cancelled; {zero}"))
}

fn hostile(http: &ureq::Agent, base: &str, work: &Path) -> Result<String> {
    let before = files(work)?;
    let url = format!("{base}/v1/completions");
    let huge_prompt = format!("{{\"model\": \"{MODEL}\", \"prompt\": \"{}\"}}", "a".repeat(300 << 10));
    let cases: [(&str, String, u16); 7] = [
        ("bad JSON", "{\"model\": ".to_owned(), 400),
        ("wrong shape", "[1, 2, 3]".to_owned(), 400),
        ("prompt of 300 KiB", huge_prompt, 422),
        ("model `../../etc/passwd`", "{\"model\": \"../../etc/passwd\", \"prompt\": \"x\"}".to_owned(), 404),
        ("model `/etc/passwd`", "{\"model\": \"/etc/passwd\", \"prompt\": \"x\"}".to_owned(), 404),
        (
            "max_tokens of a billion",
            format!("{{\"model\": \"{MODEL}\", \"prompt\": \"x\", \"max_tokens\": 1000000000}}"),
            422,
        ),
        ("a NUL in the model id", "{\"model\": \"a\\u0000b\", \"prompt\": \"x\"}".to_owned(), 404),
    ];
    let mut seen = Vec::new();
    for (what, body, expected) in &cases {
        let (status, text) = post(http, &url, body)?;
        ensure!(status == *expected, "{what}: {status} instead of {expected}: {text}");
        ensure!(
            text.contains("\"error\":{") && text.contains("\"message\""),
            "{what}: not an OpenAI error body: {text}"
        );
        seen.push(format!("{what} {status}"));
    }
    // A body over the limit is refused from its length alone, before it is read: a client still sending
    // it sees the connection close, so this one announces 2 MiB and waits for the answer.
    let status = announce_body(base, "/v1/completions", 2 << 20)?;
    ensure!(status == 413, "a body of 2 MiB: {status} instead of 413");
    seen.push(format!("body of 2 MiB {status}"));
    let (status, _) = get(http, &format!("{base}/usine/models/progress?model=../../etc/passwd"))?;
    ensure!(status == 404, "progress of `../../etc/passwd`: {status}");
    for endpoint in ["load", "pin", "unpin", "unload"] {
        for id in ["../../../x", "../../../../../../tmp/usine-escape", "a/../../b"] {
            let (status, text) =
                post(http, &format!("{base}/usine/models/{endpoint}"), &format!("{{\"model\": \"{id}\"}}"))?;
            ensure!(status == 404, "{endpoint} of `{id}`: {status} {text}");
        }
    }
    let (status, text) = post(http, &format!("{base}/usine/warmup"), "{\"models\": [\"../../../x\"]}")?;
    ensure!(status == 404, "warm-up of `../../../x`: {status} {text}");
    seen.push("`../` ids on every lifecycle endpoint 404".to_owned());
    let (status, _) = get(http, &format!("{base}/health"))?;
    ensure!(status == 200, "the server is unwell after hostile requests: {status}");
    let after = files(work)?;
    let cache = work.join("cache");
    let outside: Vec<_> = after.difference(&before).filter(|path| !path.starts_with(&cache)).collect();
    ensure!(outside.is_empty(), "files written outside the cache folder: {outside:?}");
    Ok(seen.join(", "))
}

/// Sends the head of a POST announcing `length` bytes of JSON and a little of it, and returns the status
/// the server answers with.
fn announce_body(base: &str, path: &str, length: usize) -> Result<u16> {
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{\"model\": "
    )?;
    let mut status_line = String::new();
    BufReader::new(stream).read_line(&mut status_line)?;
    let status = status_line.split_whitespace().nth(1).context("no status line")?;
    Ok(status.parse()?)
}

/// Every file under `dir`, except Prometheus's data and logs (another process's).
fn files(dir: &Path) -> Result<std::collections::BTreeSet<PathBuf>> {
    let mut found = std::collections::BTreeSet::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.ends_with("prometheus-data") {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else {
                found.insert(path);
            }
        }
    }
    Ok(found)
}
