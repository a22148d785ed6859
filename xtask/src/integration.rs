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
    eprintln!("integration: usine serve on {base}, cache in {}", work.path().join("cache").display());
    check("server ready", wait_ready(&base, &mut server));
    let http = agent();
    check(
        "warm model",
        post(
            &http,
            &format!("{base}/usine/models/load"),
            &format!("{{\"model\": \"{MODEL}\", \"keep_alive_seconds\": -1}}"),
        )
        .map(|(_, body)| body),
    );
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
    check("pools back to zero after the load", pools_at_zero(&http, &base));
    check("client disconnects free memory", disconnects(&http, &base));
    check("hostile requests", hostile(&http, &base, work.path()));
    check("graceful shutdown on SIGTERM", shutdown(&base, &mut server));

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
        let child = Command::new(binary)
            .arg("serve")
            .current_dir(work)
            .env("USINE_CACHE_DIR", work.join("cache"))
            .env("XDG_CONFIG_HOME", work.join("config"))
            .env("USINE_BIND", format!("127.0.0.1:{port}"))
            .env("USINE_MAX_CONCURRENT", MAX_CONCURRENT.to_string())
            .env("USINE_QUEUE_CAPACITY", QUEUE_CAPACITY.to_string())
            .env("USINE_SHUTDOWN_GRACE_SECONDS", "2")
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

/// SIGTERM with a stream running: it goes on through the grace period (2 s here), then is cut, and the
/// server exits 0; meanwhile new requests are refused.
fn shutdown(base: &str, server: &mut Server) -> Result<String> {
    let streaming = {
        let base = base.to_owned();
        std::thread::spawn(move || stream_once(&base, 2000, None)) // four seconds of tokens
    };
    std::thread::sleep(Duration::from_millis(300));
    let exited = {
        signal(server.child.id(), "TERM")?;
        std::thread::sleep(Duration::from_millis(300));
        let refused = match agent().get(&format!("{base}/health")).call() {
            Err(ureq::Error::Status(503, _) | ureq::Error::Transport(_)) => true,
            Ok(_) | Err(_) => false,
        };
        ensure!(refused, "the server still took requests 300 ms after SIGTERM");
        server.terminate()?
    };
    let (status, done, ..) = streaming.join().expect("the streaming thread")?;
    ensure!(status == 200 && !done, "the running stream was not cut at the end of the grace period");
    Ok(format!("new requests refused, the running stream cut at the end of the grace period, {exited}"))
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
        Ok(format!("{} series families through Prometheus's API after {:?}", wanted.len(), start.elapsed()))
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
fn installed(command: &str, package: &str) -> Result<String> {
    let found = |command: &str| Command::new("which").arg(command).output().ok().filter(|o| o.status.success());
    if found(command).is_none() {
        eprintln!("integration: installing Debian's `{package}`");
        let sudo = if Command::new("id").arg("-u").output()?.stdout.starts_with(b"0") { vec![] } else { vec!["sudo"] };
        let mut install = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            install.arg("apt-get");
        }
        let status = install
            .args(["install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .context("running apt-get")?;
        ensure!(status.success(), "apt-get install {package} failed");
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
client = openai.OpenAI(base_url=os.environ["USINE_BASE"], api_key="not-needed-on-loopback")
model = os.environ["USINE_MODEL"]
whole = client.completions.create(model=model, prompt="The kernel", max_tokens=16, temperature=0)
assert whole.choices[0].text, whole
assert whole.usage.completion_tokens == 16, whole.usage
pieces = [c.choices[0].text for c in client.completions.create(model=model, prompt="The kernel", max_tokens=16, temperature=0, stream=True) if c.choices]
assert "".join(pieces) == whole.choices[0].text, (pieces, whole.choices[0].text)
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

/// One streaming request: its status, whether it ended with `[DONE]`, how long the answer's head took.
fn stream_once(
    base: &str,
    max_tokens: u32,
    read_events: Option<usize>,
) -> Result<(u16, bool, Duration, Option<String>)> {
    let body = format!(
        "{{\"model\": \"{MODEL}\", \"prompt\": \"Hi\", \"max_tokens\": {max_tokens}, \"temperature\": 0, \"stream\": true}}"
    );
    let start = Instant::now();
    let response =
        agent().post(&format!("{base}/v1/completions")).set("Content-Type", "application/json").send_string(&body);
    let head = start.elapsed();
    let response = match response {
        Ok(response) => response,
        Err(ureq::Error::Status(status, response)) => {
            return Ok((status, false, head, response.header("Retry-After").map(str::to_owned)));
        }
        Err(error) => return Err(error.into()),
    };
    let mut done = false;
    let mut events = 0;
    for line in BufReader::new(response.into_reader()).lines() {
        let Ok(line) = line else { break }; // the connection was cut: `done` says whether the end came first
        if let Some(data) = line.strip_prefix("data: ") {
            events += 1;
            done |= data == "[DONE]";
            if read_events.is_some_and(|limit| events >= limit) {
                break; // the connection drops with the reader
            }
        }
    }
    Ok((200, done, head, None))
}

fn overload(base: &str) -> Result<String> {
    let barrier = Arc::new(Barrier::new(OFFERED));
    let threads: Vec<_> = (0..OFFERED)
        .map(|_| {
            let (barrier, base) = (Arc::clone(&barrier), base.to_owned());
            std::thread::spawn(move || {
                barrier.wait();
                stream_once(&base, 300, None)
            })
        })
        .collect();
    let results: Vec<_> =
        threads.into_iter().map(|thread| thread.join().expect("a request thread")).collect::<Result<_>>()?;
    let admitted: Vec<_> = results.iter().filter(|(status, ..)| *status == 200).collect();
    let refused: Vec<_> = results.iter().filter(|(status, ..)| *status == 429).collect();
    ensure!(
        admitted.len() + refused.len() == OFFERED,
        "statuses other than 200 and 429: {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    ensure!(admitted.iter().all(|(_, done, ..)| *done), "an admitted stream did not end with [DONE]");
    ensure!(
        admitted.len() >= MAX_CONCURRENT + QUEUE_CAPACITY,
        "only {} admitted: slots and queue take {}",
        admitted.len(),
        MAX_CONCURRENT + QUEUE_CAPACITY
    );
    ensure!(!refused.is_empty(), "nothing refused with {OFFERED} offered");
    ensure!(refused.iter().all(|(.., retry)| retry.as_deref() == Some("1")), "a 429 without Retry-After: 1");
    let slowest = refused.iter().map(|(_, _, head, _)| *head).max().unwrap_or_default();
    ensure!(slowest < Duration::from_secs(1), "a 429 took {slowest:?}: refusals must be at once");
    Ok(format!(
        "{} admitted and completed, {} refused with 429 (slowest in {slowest:?})",
        admitted.len(),
        refused.len()
    ))
}

/// Waits for the kv-cache and activations pools to be back at zero.
fn pools_at_zero(http: &ureq::Agent, base: &str) -> Result<String> {
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
        ensure!(start.elapsed() < Duration::from_secs(5), "still in use after 5 s: {}", in_use.join(", "));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn disconnects(http: &ureq::Agent, base: &str) -> Result<String> {
    let (_, before) = get(http, &format!("{base}/metrics"))?;
    let threads: Vec<_> = (0..MAX_CONCURRENT)
        .map(|_| {
            let base = base.to_owned();
            std::thread::spawn(move || stream_once(&base, 2000, Some(3)))
        })
        .collect();
    for thread in threads {
        let (status, done, ..) = thread.join().expect("a request thread")?;
        ensure!(status == 200 && !done, "a stream meant to be cut ended by itself");
    }
    let zero = pools_at_zero(http, base)?;
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
