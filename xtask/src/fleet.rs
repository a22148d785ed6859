//! `cargo xtask fleet`: hosts sharing compiled graphs through a real Redis. Starts Debian's
//! `redis-server` on loopback (installed when missing) and `usine` processes with cache folders of their
//! own, standing for hosts, then checks what the remote tier promises: one compile for the fleet,
//! loads that go on when Redis is down, killed or paused, and damaged remote graphs never run.
//!
//! `cargo xtask fleet --bench` measures the load of the 58 M and the Qwen2.5-0.5B-shaped graphs from
//! Redis into a cold cache (`usine cache pull`) against the floor, plain `GET`s of the same chunks, and
//! against compiling.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::integration::installed;

/// The hosts' bound on one call to Redis: short, so that the paused-server check is quick.
const TIMEOUT_MS: u64 = 500;
/// The hosts' cool-down after an error: short, so that a restarted server is picked up soon.
const COOL_DOWN_MS: u64 = 1_000;
/// How long the paused-server check pauses Redis: far beyond the bound.
const PAUSE: Duration = Duration::from_secs(8);

/// A `redis-server` on a loopback port, in a folder of its own, saving nothing.
struct Redis {
    binary: String,
    port: u16,
    work: PathBuf,
    child: Option<Child>,
}

impl Redis {
    fn start(work: &Path) -> Result<Self> {
        let binary = installed("redis-server", "redis-server")?;
        let port = free_port()?;
        let mut redis = Self { binary, port, work: work.to_owned(), child: None };
        redis.restart()?;
        Ok(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port), empty, and waits for its `PING`.
    fn restart(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.work.join("redis.log"))?;
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.work)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        let started = Instant::now();
        while self.client().and_then(|mut c| Ok(redis::cmd("PING").query::<String>(&mut c)?)).is_err() {
            ensure!(started.elapsed() < Duration::from_secs(10), "redis-server did not answer within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn client(&self) -> Result<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        Ok(client.get_connection_with_timeout(Duration::from_secs(2))?)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The fleet: the `usine` binary, the models, the server, and a folder per host.
struct Fleet {
    binary: PathBuf,
    work: PathBuf,
    models: PathBuf,
    redis: Redis,
}

/// What one `usine run` said: where its graph came from, its text, how long it took.
#[derive(Debug)]
struct Ran {
    source: String,
    text: String,
    took: Duration,
}

impl Fleet {
    /// `usine` as host `host`: its own cache folder, the fleet's models and server.
    fn usine(&self, host: &str) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .env("USINE_CACHE_DIR", self.work.join("hosts").join(host))
            .env("USINE_MODELS_DIR", &self.models)
            .env("USINE_REMOTE", self.redis.url())
            .env("USINE_REMOTE_TIMEOUT_MS", TIMEOUT_MS.to_string())
            .env("USINE_REMOTE_COOL_DOWN_MS", COOL_DOWN_MS.to_string())
            .env("USINE_ENGINE", "candle")
            .env("USINE_WARM", "false")
            .env("USINE_LOG_LEVEL", "info")
            .env("RUST_BACKTRACE", "0")
            .env_remove("RUST_LOG");
        command
    }

    /// `usine run` of `model` as host `host`, waited for.
    fn run(&self, host: &str, model: &str) -> Result<Ran> {
        let started = Instant::now();
        let output = self.run_command(host, model).output()?;
        ran(host, output, started.elapsed())
    }

    fn run_command(&self, host: &str, model: &str) -> Command {
        let mut command = self.usine(host);
        command.args(["run", "--json", "--max-tokens", "6", "--model", model, "the fleet"]);
        command
    }

    /// The chunk keys and manifest key of the only graph in Redis whose manifest is `model`'s latest.
    fn manifest_of(&self, host: &str, model: &str) -> Result<(String, Value)> {
        let output = self.usine(host).args(["cache", "explain", "--json", "--model", model]).output()?;
        ensure!(output.status.success(), "cache explain: {}", String::from_utf8_lossy(&output.stderr));
        let explained: Value = serde_json::from_slice(&output.stdout)?;
        let file = explained["file"].as_str().context("cache explain gave no file")?;
        let key = format!("usine:graph:f2:{}:manifest", file.trim_end_matches(".graph"));
        let text: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut self.redis.client()?)?;
        let text = text.with_context(|| format!("no manifest {key} in Redis"))?;
        Ok((key, serde_json::from_slice(&text)?))
    }
}

/// A finished `usine run --json`: its `loaded` event's source and its text; an error if it failed.
fn ran(host: &str, output: std::process::Output, took: Duration) -> Result<Ran> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "host {host}: usine run failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut source = None;
    let mut text = String::new();
    for line in stdout.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else { continue };
        match event["event"].as_str() {
            Some("loaded") => source = event["source"].as_str().map(str::to_owned),
            Some("token" | "text") => text.push_str(event["text"].as_str().unwrap_or_default()),
            _ => {}
        }
    }
    let source = source.with_context(|| format!("host {host}: no `loaded` event in {stdout}"))?;
    Ok(Ran { source, text, took })
}

pub(crate) fn run(root: &Path) -> Result<ExitCode> {
    let work = tempfile::Builder::new().prefix("usine-fleet-").tempdir().context("a temporary folder")?;
    let binary = crate::integration::build(root)?;
    let models = work.path().join("models");
    generate_models(root, &models)?;
    let redis = Redis::start(work.path())?;
    eprintln!("fleet: redis-server on {}, hosts in {}", redis.url(), work.path().join("hosts").display());
    let fleet = Fleet { binary, work: work.path().to_owned(), models, redis };
    let mut failed = Vec::new();
    let mut check = |name: &'static str, outcome: Result<String>| match outcome {
        Ok(detail) => eprintln!("  ok    {name}: {detail}"),
        Err(error) => {
            eprintln!("  FAIL  {name}: {error:#}");
            failed.push(name);
        }
    };
    let mut fleet = fleet;
    check("one host compiles, three load from Redis", one_compiles(&fleet));
    check("eight hosts started at once on an empty store compile once", stampede(&fleet));
    check("damaged remote graphs are never run, and are replaced", damage(&fleet));
    check("Redis paused past the time bound: loads go on locally", paused(&fleet));
    check("Redis full: the load goes on, nothing half-published is served", full(&fleet));
    check("Redis killed: every host answers, and picks it up again", killed(&mut fleet));
    check("TLS and a password (rediss://): verified, or refused and compiled", tls(&fleet));
    eprintln!("\nfleet: 7 checks, {} failed", failed.len());
    if !failed.is_empty() {
        eprintln!("redis log:\n{}", std::fs::read_to_string(work.path().join("redis.log")).unwrap_or_default());
    }
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The models, copies of one small GGUF file under as many names as checks need (each name is its own
/// graph), and a larger one whose compile lasts long enough for eight hosts to meet on it.
fn generate_models(root: &Path, models: &Path) -> Result<()> {
    std::fs::create_dir_all(models)?;
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "usine-engine-candle", "--example", "random_model"])
        .current_dir(root)
        .status()?;
    ensure!(status.success(), "building the candle engine's random_model example failed");
    let metadata = cargo_metadata::MetadataCommand::new().current_dir(root).no_deps().exec()?;
    let generator = metadata.target_directory.join("debug").join("examples").join("random_model");
    let small = models.join("one.gguf");
    let make = |preset: &str, layers: &str, out: &Path| -> Result<()> {
        let output = Command::new(&generator).args(["gguf", preset, "q8_0"]).arg(out).arg(layers).output()?;
        ensure!(output.status.success(), "random_model: {}", String::from_utf8_lossy(&output.stderr));
        Ok(())
    };
    make("tiny-llama", "2", &small)?;
    for name in ["paused", "published", "killed", "back", "full", "tls"]
        .into_iter()
        .chain(DAMAGES.iter().map(|(name, _)| *name))
    {
        std::fs::copy(&small, models.join(format!("{name}.gguf")))?;
    }
    make("qwen2.5-0.5b", "2", &models.join("stampede.gguf"))
}

fn one_compiles(fleet: &Fleet) -> Result<String> {
    let first = fleet.run("h0", "candle/one")?;
    ensure!(first.source == "compile", "the first host's graph came from `{}`, not a compile", first.source);
    let mut detail = vec![format!("h0 compiled in {:.0?}", first.took)];
    for host in ["h1", "h2", "h3"] {
        let other = fleet.run(host, "candle/one")?;
        ensure!(other.source == "remote", "{host} loaded from `{}`, not from Redis", other.source);
        ensure!(other.text == first.text, "{host} generated {:?}, h0 {:?}", other.text, first.text);
        detail.push(format!("{host} from Redis in {:.0?}", other.took));
    }
    let again = fleet.run("h1", "candle/one")?;
    ensure!(again.source == "disk", "h1's second load came from `{}`, not its own cache", again.source);
    Ok(format!("{}; the same text on each; h1 again from its disk", detail.join(", ")))
}

fn stampede(fleet: &Fleet) -> Result<String> {
    redis::cmd("FLUSHALL").query::<()>(&mut fleet.redis.client()?)?;
    let started = Instant::now();
    let children: Vec<(String, Child)> = (0..8)
        .map(|index| {
            let host = format!("s{index}");
            // The default bound: eight processes starting at once on a small machine answer slowly.
            let mut command = fleet.run_command(&host, "candle/stampede");
            command.env("USINE_REMOTE_TIMEOUT_MS", "2000");
            let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
            Ok((host, child))
        })
        .collect::<Result<_>>()?;
    let mut sources = std::collections::BTreeMap::<String, usize>::new();
    let (mut waited, mut unavailable) = (0, Vec::new());
    for (host, child) in children {
        let output = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("another host compiles it") {
            waited += 1;
        }
        unavailable.extend(stderr.lines().filter(|line| line.contains("tier unavailable")).map(str::to_owned));
        *sources.entry(ran(&host, output, started.elapsed())?.source).or_default() += 1;
    }
    ensure!(sources.get("compile") == Some(&1), "sources {sources:?}: not one compile; {unavailable:?}");
    ensure!(sources.get("remote") == Some(&7), "sources {sources:?}: not seven loads from Redis");
    Ok(format!("1 compile, 7 from Redis ({waited} waited on the compile lease), {:.1?} in all", started.elapsed()))
}

/// The damages done to a published graph, each to its own model.
const DAMAGES: [(&str, &str); 4] = [
    ("flipped", "a flipped byte in a chunk"),
    ("forged", "a flipped byte, the chunk's checksum forged in the manifest"),
    ("unmanifested", "a missing manifest"),
    ("truncated", "a truncated chunk"),
];

fn damage(fleet: &Fleet) -> Result<String> {
    let mut done = Vec::new();
    for (index, (name, what)) in DAMAGES.iter().enumerate() {
        let model = format!("candle/{name}");
        let first = fleet.run(&format!("d{index}a"), &model)?;
        ensure!(first.source == "compile", "{what}: the first load came from `{}`", first.source);
        let (manifest_key, manifest) = fleet.manifest_of(&format!("d{index}a"), &model)?;
        let chunk_key =
            format!("{}:{}:0", manifest_key.trim_end_matches(":manifest"), manifest["checksum"].as_str().unwrap_or(""));
        let mut redis = fleet.redis.client()?;
        let mut chunk: Vec<u8> = redis::cmd("GET").arg(&chunk_key).query(&mut redis)?;
        ensure!(!chunk.is_empty(), "{what}: no chunk {chunk_key}");
        match *name {
            "flipped" | "forged" => {
                let at = chunk.len() / 2;
                chunk[at] ^= 0x20;
                redis::cmd("SET").arg(&chunk_key).arg(&chunk).arg("KEEPTTL").query::<()>(&mut redis)?;
                if *name == "forged" {
                    let mut forged = manifest.clone();
                    forged["chunks"][0] = twox_hash::XxHash3_64::oneshot(&chunk).into();
                    let text = serde_json::to_vec(&forged)?;
                    redis::cmd("SET").arg(&manifest_key).arg(text).arg("KEEPTTL").query::<()>(&mut redis)?;
                }
            }
            "unmanifested" => redis::cmd("DEL").arg(&manifest_key).query::<()>(&mut redis)?,
            _ => {
                chunk.truncate(chunk.len() - 100);
                redis::cmd("SET").arg(&chunk_key).arg(&chunk).arg("KEEPTTL").query::<()>(&mut redis)?;
            }
        }
        let victim = fleet.run(&format!("d{index}b"), &model)?;
        ensure!(victim.source == "compile", "{what}: a fresh host loaded from `{}`, not a compile", victim.source);
        ensure!(victim.text == first.text, "{what}: the fresh host generated {:?}, not {:?}", victim.text, first.text);
        let healed = fleet.run(&format!("d{index}c"), &model)?;
        ensure!(healed.source == "remote", "{what}: after the recompile, a fresh host loaded from `{}`", healed.source);
        done.push(*what);
    }
    Ok(format!("{}: each recompiled by the next host, republished, then served from Redis", done.join("; ")))
}

fn paused(fleet: &Fleet) -> Result<String> {
    fleet.run("p0", "candle/published")?; // compiled and published before the pause
    let pause_ms = u64::try_from(PAUSE.as_millis())?;
    redis::cmd("CLIENT").arg("PAUSE").arg(pause_ms).arg("ALL").query::<()>(&mut fleet.redis.client()?)?;
    let paused_at = Instant::now();
    let mut detail = Vec::new();
    for (host, model) in [("p1", "candle/published"), ("p2", "candle/paused")] {
        let ran = fleet.run(host, model)?;
        ensure!(ran.source == "compile", "{host} ({model}) loaded from `{}` while Redis was paused", ran.source);
        detail.push(format!("{model} compiled in {:.1?}", ran.took));
    }
    let took = paused_at.elapsed();
    ensure!(took < PAUSE, "the loads took {took:?}, past the {PAUSE:?} pause: they waited for Redis");
    redis::cmd("CLIENT").arg("UNPAUSE").query::<()>(&mut fleet.redis.client()?)?;
    Ok(format!("{} (bound {TIMEOUT_MS} ms), both within the {PAUSE:?} pause", detail.join(", ")))
}

/// Redis out of memory (`maxmemory` just above what it holds, no eviction): a publish fails part-way;
/// the host answers all the same, and its chunks without a manifest are never served. Room again: the
/// next host compiles and publishes, and the one after loads from Redis.
fn full(fleet: &Fleet) -> Result<String> {
    let mut redis = fleet.redis.client()?;
    let info: String = redis::cmd("INFO").arg("memory").query(&mut redis)?;
    let used: u64 = info
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .context("INFO memory has no used_memory")?
        .trim()
        .parse()?;
    redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query::<()>(&mut redis)?;
    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(used + (256 << 10)).query::<()>(&mut redis)?;
    let outcome = (|| {
        let output = fleet.run_command("f0", "candle/full").output()?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let first = ran("f0", output, Duration::ZERO)?;
        ensure!(first.source == "compile", "the host under a full Redis loaded from `{}`", first.source);
        ensure!(stderr.contains("OOM"), "the host did not say Redis refused the publish: {stderr}");
        let output = fleet.usine("f0").args(["cache", "explain", "--json", "--model", "candle/full"]).output()?;
        let explained: Value = serde_json::from_slice(&output.stdout)?;
        let digest = explained["file"].as_str().context("cache explain gave no file")?.trim_end_matches(".graph");
        let left: Vec<String> = redis::cmd("KEYS").arg(format!("usine:graph:f2:{digest}:*")).query(&mut redis)?;
        ensure!(left.is_empty(), "the failed publish left {left:?} in Redis");
        let second = fleet.run("f1", "candle/full")?;
        ensure!(second.source == "compile", "a half-published graph was loaded from `{}`", second.source);
        Ok(first.text)
    })();
    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).query::<()>(&mut redis)?;
    let text = outcome?;
    let published = fleet.run("f2", "candle/full")?;
    ensure!(published.source == "compile", "with room again, a fresh host loaded from `{}`", published.source);
    let served = fleet.run("f3", "candle/full")?;
    ensure!(served.source == "remote" && served.text == text, "after the republish: {served:?}");
    Ok("Redis answered OOM to the publish; the host answered, compiling, and removed the chunks it had written; with room again, published then served".into())
}

/// Four `usine serve` hosts; Redis killed: each answers a model nobody compiled yet (compiling it);
/// Redis back: a new model compiles once and the three others load it from Redis.
fn killed(fleet: &mut Fleet) -> Result<String> {
    let mut hosts = (0..4).map(|index| Host::start(fleet, &format!("k{index}"))).collect::<Result<Vec<_>>>()?;
    let outcome = (|| {
        fleet.redis.kill();
        for host in &hosts {
            host.complete("candle/killed")?;
        }
        let errors: Vec<f64> =
            hosts.iter().map(|host| host.metric("usine_storage_remote_errors_total")).collect::<Result<_>>()?;
        ensure!(errors.iter().all(|&e| e >= 1.0), "remote errors per host {errors:?}: a host did not notice");
        let compiles: Vec<f64> = hosts.iter().map(|host| host.loads("compile")).collect::<Result<_>>()?;
        ensure!(compiles.iter().all(|&c| c == 1.0), "compiles per host {compiles:?}");
        fleet.redis.restart()?;
        std::thread::sleep(Duration::from_millis(COOL_DOWN_MS + 200));
        for host in &hosts {
            host.complete("candle/back")?;
        }
        let compiles: Vec<f64> = hosts.iter().map(|host| host.loads("compile")).collect::<Result<_>>()?;
        let remote: Vec<f64> = hosts.iter().map(|host| host.loads("remote")).collect::<Result<_>>()?;
        ensure!(compiles == [2.0, 1.0, 1.0, 1.0], "compiles per host after Redis came back: {compiles:?}");
        ensure!(remote == [0.0, 1.0, 1.0, 1.0], "loads from Redis per host after it came back: {remote:?}");
        Ok(format!(
            "Redis down: 4 of 4 hosts answered, each compiling (remote errors {errors:?}); back: 1 compile, 3 loads from Redis"
        ))
    })();
    for host in &mut hosts {
        host.stop();
    }
    outcome
}

/// A second server, on TLS only with a password, its certificate signed by a CA made for the run: a
/// host that trusts the CA (`SSL_CERT_FILE`) publishes and another loads; one that does not refuses the
/// server (an unknown issuer) and compiles; a wrong password is refused the same way.
fn tls(fleet: &Fleet) -> Result<String> {
    let openssl = installed("openssl", "openssl")?;
    let dir = fleet.work.join("tls");
    std::fs::create_dir_all(&dir)?;
    let ssl = |args: &[&str]| -> Result<()> {
        let output = Command::new(&openssl).args(args).current_dir(&dir).output()?;
        ensure!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        Ok(())
    };
    let ca_subject = "/CN=usine fleet CA";
    ssl(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj",
        ca_subject,
    ])?;
    ssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ])?;
    std::fs::write(dir.join("san.cnf"), "subjectAltName=DNS:localhost\n")?;
    let sign = ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"];
    ssl(&[&sign[..], &["-out", "server.crt", "-days", "1", "-extfile", "san.cnf"]].concat())?;
    let port = free_port()?;
    let password = "fleet-password-for-the-run";
    let log = std::fs::File::create(dir.join("redis-tls.log"))?;
    let mut server = Command::new(&fleet.redis.binary)
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt"])
        .args(["--tls-auth-clients", "no", "--requirepass", password])
        .current_dir(&dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting redis-server with TLS")?;
    let outcome = (|| {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(started.elapsed() < Duration::from_secs(10), "redis-server with TLS did not listen within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = format!("rediss://:{password}@localhost:{port}");
        let host = |name: &str, url: &str, trusted: bool| {
            let mut command = fleet.run_command(name, "candle/tls");
            command.env("USINE_REMOTE", url);
            // Without the CA: a file of no certificate, so that the system's own do not decide.
            command.env("SSL_CERT_FILE", dir.join(if trusted { "ca.crt" } else { "san.cnf" }));
            let output = command.output()?;
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            Ok::<_, anyhow::Error>((ran(name, output, Duration::ZERO)?, stderr))
        };
        let (first, _) = host("t0", &url, true)?;
        ensure!(first.source == "compile", "the first TLS host loaded from `{}`", first.source);
        let (second, _) = host("t1", &url, true)?;
        ensure!(second.source == "remote", "a host trusting the CA loaded from `{}`", second.source);
        let (stranger, stderr) = host("t2", &url, false)?;
        ensure!(stranger.source == "compile", "a host without the CA loaded from `{}`", stranger.source);
        ensure!(stderr.contains("UnknownIssuer"), "the host without the CA did not say why: {stderr}");
        let (wrong, stderr) = host("t3", &format!("rediss://:not-the-password@localhost:{port}"), true)?;
        ensure!(wrong.source == "compile", "a wrong password loaded from `{}`", wrong.source);
        ensure!(stderr.contains("AuthenticationFailed"), "a wrong password was not said: {stderr}");
        ensure!(!stderr.contains("not-the-password"), "a password was printed: {stderr}");
        Ok("published and loaded over TLS with the password; an unknown issuer and a wrong password refused, the hosts compiling".to_owned())
    })();
    let _ = server.kill();
    let _ = server.wait();
    outcome
}

/// A `usine serve` host.
struct Host {
    name: String,
    base: String,
    child: Child,
}

impl Host {
    fn start(fleet: &Fleet, name: &str) -> Result<Self> {
        let port = free_port()?;
        let log = std::fs::File::create(fleet.work.join(format!("{name}.log")))?;
        let child = fleet
            .usine(name)
            .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
            .env("USINE_ACCESS_LOG", "false")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let host = Self { name: name.to_owned(), base: format!("http://127.0.0.1:{port}"), child };
        let started = Instant::now();
        while ureq::get(&format!("{}/health", host.base)).call().is_err() {
            ensure!(started.elapsed() < Duration::from_secs(30), "{name} did not start within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(host)
    }

    fn complete(&self, model: &str) -> Result<()> {
        let body = serde_json::json!({ "model": model, "prompt": "the fleet", "max_tokens": 4 }).to_string();
        let response = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build()
            .post(&format!("{}/v1/completions", self.base))
            .set("Content-Type", "application/json")
            .send_string(&body);
        match response {
            Ok(response) if response.status() == 200 => Ok(()),
            Ok(response) => bail!("{}: {model} answered {}", self.name, response.status()),
            Err(error) => bail!("{}: {model}: {error}", self.name),
        }
    }

    /// The sum of the series of `name` on the host's `/metrics`.
    fn metric(&self, name: &str) -> Result<f64> {
        let text = ureq::get(&format!("{}/metrics", self.base)).call()?.into_string()?;
        Ok(series(&text, name, ""))
    }

    fn loads(&self, source: &str) -> Result<f64> {
        let text = ureq::get(&format!("{}/metrics", self.base)).call()?.into_string()?;
        Ok(series(&text, "usine_kernel_loads_total", &format!("source=\"{source}\"")))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of the samples of metric `name` whose labels contain `label`.
fn series(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `cargo xtask fleet --bench`: see the file's doc.
pub(crate) fn bench(root: &Path) -> Result<ExitCode> {
    use crate::bench_peers::batch::{self, Model};
    let work = root.join("target").join("bench-peers").join("fleet");
    std::fs::create_dir_all(&work)?;
    eprintln!("building usine and the engine's random_model and speed examples (release)");
    let build = |args: &[&str], what: &str| {
        crate::bench_peers::build(Command::new(env!("CARGO")).args(args).current_dir(root), what)
    };
    let usine = build(&["build", "--release", "--quiet", "-p", "usine-cli"], "usine")?;
    let generator = build(
        &["build", "--release", "--quiet", "-p", "usine-engine-candle", "--example", "random_model"],
        "random_model",
    )?;
    let speed = build(&["build", "--release", "--quiet", "-p", "usine-engine-candle", "--example", "speed"], "speed")?;
    let models = work.join("models");
    std::fs::create_dir_all(&models)?;
    // Every host starts with an empty cache.
    let hosts = work.join("hosts");
    if hosts.exists() {
        std::fs::remove_dir_all(&hosts).with_context(|| format!("removing {}", hosts.display()))?;
    }
    let redis = Redis::start(&work)?;
    let mut fleet = Fleet { binary: usine, work: work.clone(), models: models.clone(), redis };
    let mut rows = Vec::new();
    for model in [Model::Size("58m"), Model::Preset("qwen2.5-0.5b", 24)] {
        let gguf = batch::gguf(model, root, &work, &generator, Some(&speed))?;
        let name = gguf.file_name().and_then(|n| n.to_str()).context("a GGUF file name")?.to_owned();
        let link = models.join(&name);
        if !link.exists() {
            std::fs::hard_link(&gguf, &link).or_else(|_| std::fs::copy(&gguf, &link).map(drop))?;
        }
        let id = format!("candle/{}", name.trim_end_matches(".gguf"));
        rows.push(bench_model(&mut fleet, &id)?);
    }
    eprintln!(
        "| graph | bytes | plain GETs (floor) | the bytes written by dd, direct and synced | `usine cache pull` | pull / GETs | pull / dd | compile |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|");
    for row in rows {
        eprintln!("{row}");
    }
    Ok(ExitCode::SUCCESS)
}

const TURNS: usize = 5;

fn bench_model(fleet: &mut Fleet, id: &str) -> Result<String> {
    let hosts = fleet.work.join("hosts");
    let fresh = |fleet: &Fleet, host: &str| {
        let _ = std::fs::remove_dir_all(hosts.join(host));
        fleet.usine(host)
    };
    // Compiles, on fresh hosts without the tier.
    let mut compiles = Vec::new();
    for turn in 0..3 {
        let mut command = fresh(fleet, &format!("c{turn}"));
        command.env_remove("USINE_REMOTE").args(["run", "--json", "--max-tokens", "1", "--model", id, "x"]);
        let output = command.output()?;
        let event = loaded_event(&output)?;
        ensure!(event["source"] == "compile", "a fresh host's load came from {}", event["source"]);
        compiles.push(event["seconds"].as_f64().context("seconds")?);
    }
    // Published once.
    redis::cmd("FLUSHALL").query::<()>(&mut fleet.redis.client()?)?;
    let publisher = fleet.run("publisher", id)?;
    ensure!(publisher.source == "compile", "the publisher loaded from {}", publisher.source);
    let (_, manifest) = fleet.manifest_of("publisher", id)?;
    let bytes = manifest["len"].as_u64().context("len")?;
    let chunks = manifest["chunks"].as_array().context("chunks")?.len();
    let base = {
        let output = fleet.usine("publisher").args(["cache", "explain", "--json", "--model", id]).output()?;
        let explained: Value = serde_json::from_slice(&output.stdout)?;
        let file = explained["file"].as_str().context("file")?.trim_end_matches(".graph").to_owned();
        format!("usine:graph:f2:{file}:{}", manifest["checksum"].as_str().context("checksum")?)
    };
    let (mut floor, mut pulls, mut disk) = (Vec::new(), Vec::new(), Vec::new());
    for turn in 0..TURNS {
        // The floor: the same chunks by plain GETs, one after the other, into memory.
        let mut client = fleet.redis.client()?;
        let started = Instant::now();
        let mut got = 0;
        for index in 0..chunks {
            let chunk: Vec<u8> = redis::cmd("GET").arg(format!("{base}:{index}")).query(&mut client)?;
            got += chunk.len();
        }
        floor.push(started.elapsed().as_secs_f64());
        ensure!(got as u64 == bytes, "the plain GETs read {got} bytes of {bytes}");
        // The disk's own floor: as many bytes written past the page cache and synced, by `dd`.
        let file = fleet.work.join("dd-floor");
        let started = Instant::now();
        let status = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", file.display()))
            .args(["bs=2M", &format!("count={}", bytes.div_ceil(2 << 20)), "oflag=direct", "conv=fsync"])
            .stderr(Stdio::null())
            .status()?;
        disk.push(started.elapsed().as_secs_f64());
        ensure!(status.success(), "dd failed");
        std::fs::remove_file(&file)?;
        let mut command = fresh(fleet, &format!("pull{turn}"));
        let output = command.args(["cache", "pull", "--json", "--model", id]).output()?;
        ensure!(output.status.success(), "cache pull: {}", String::from_utf8_lossy(&output.stderr));
        let pulled: Value = serde_json::from_slice(&output.stdout)?;
        pulls.push(pulled["seconds"].as_f64().context("seconds")?);
    }
    let (floor, pull, compile, disk) =
        (spread(&mut floor), spread(&mut pulls), spread(&mut compiles), spread(&mut disk));
    #[expect(clippy::cast_precision_loss, reason = "a file's size in MB")]
    let megabytes = bytes as f64 / 1e6;
    Ok(format!(
        "| {id} | {megabytes:.0} MB | {} | {} | {} | {:.2} | {:.2} | {} |",
        floor.1,
        disk.1,
        pull.1,
        pull.0 / floor.0,
        pull.0 / disk.0,
        compile.1
    ))
}

/// The median of `values` and "median s (min–max)".
fn spread(values: &mut [f64]) -> (f64, String) {
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    (median, format!("{median:.3} s ({:.3}–{:.3})", values[0], values[values.len() - 1]))
}

fn loaded_event(output: &std::process::Output) -> Result<Value> {
    ensure!(output.status.success(), "usine run: {}", String::from_utf8_lossy(&output.stderr));
    let mut text = String::new();
    output.stdout.as_slice().read_to_string(&mut text)?;
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|event| event["event"] == "loaded")
        .context("no loaded event")
}
