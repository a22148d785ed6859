//! The configuration: defaults, then `usine.toml` (the user's config folder, then the working folder,
//! or the file `--config` names), then `USINE_*` environment variables, then flags; each value remembers
//! where it came from, for `usine config show` and for error messages.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use usine_engine::GenerationParams;

use crate::logging::{LogFormat, LogLevel};

/// Every setting, with its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// The engine: `webllm`, `transformers` (simulated), `candle` (a real model on the CPU), or `zero` (no
    /// work at all, to measure usine itself).
    pub(crate) engine: String,
    /// The model: one of the engine's profiles, or `engine/profile`; the engine's default when unset.
    pub(crate) model: Option<String>,
    /// The compiled-graph cache; `USINE_CACHE_DIR` or the platform's cache folder when unset.
    pub(crate) cache_dir: Option<PathBuf>,
    /// A folder whose GGUF files (`*.gguf`) join the catalog as `candle/<file name>`.
    pub(crate) models_dir: Option<PathBuf>,
    /// The fleet's shared graph tier: `redis://[user:password@]host[:port][/db]`. A graph missing from
    /// the cache is fetched from it, and one compiled here is published to it; none when unset.
    pub(crate) remote: Option<String>,
    /// Most time one call to the remote tier may take, in milliseconds; past it, loads go on without it.
    pub(crate) remote_timeout_ms: u64,
    /// How long the remote tier is left alone after an error, in milliseconds.
    pub(crate) remote_cool_down_ms: u64,
    /// How long a published graph stays in the remote tier, in seconds; 0 for as long as Redis keeps it.
    pub(crate) remote_ttl_seconds: u64,
    /// The largest graph published to (or fetched from) the remote tier, in MiB.
    pub(crate) remote_max_graph_mib: u64,
    /// Most time to wait for another host's compile of the same graph, in milliseconds, before
    /// compiling here.
    pub(crate) remote_wait_ms: u64,
    /// MiB shared by the `kv-cache`, `activations` and `uniforms` pools (70 / 25 / 5 %).
    pub(crate) memory_budget_mib: u64,
    /// MiB of the `weights` pool: loaded models.
    pub(crate) weights_budget_mib: u64,
    /// Threads of the CPU engine; cores minus two, at least one, when unset.
    pub(crate) threads: Option<usize>,
    /// Where the candle engine runs its passes: `auto` (an NVIDIA card where the build has the `cuda`
    /// feature and the machine a card, else the CPU), `cpu`, `cuda` or `cuda:N`.
    pub(crate) device: String,
    /// The longest context of a model file run by the candle engine, in tokens; the file's own when
    /// unset (a context shorter than the file's is a smaller memory plan).
    pub(crate) max_context: Option<u32>,
    /// How much the simulated engines' delays vary, a fraction from 0 to 1.
    pub(crate) jitter: f64,
    /// Most tokens to generate.
    pub(crate) max_tokens: u32,
    /// Sampling temperature, 0 (greedy) to 2.
    pub(crate) temperature: f32,
    /// Nucleus sampling mass, above 0 and at most 1.
    pub(crate) top_p: f32,
    /// Sample among this many most likely tokens only; 0 for all.
    pub(crate) top_k: u32,
    /// Seed of the sampler: the same seed gives the same text.
    pub(crate) seed: u64,
    /// Run a throwaway generation after loading, so that the first answer pays no first-use cost.
    pub(crate) warm: bool,
    /// Overlap the CPU stage of each step with the device stage of the one before.
    pub(crate) pipelining: bool,
    /// Most generations at once.
    pub(crate) max_concurrent: usize,
    /// Most generations of one model a batched step advances, where the engine batches; 1 for none.
    pub(crate) max_batch: usize,
    /// The token budget of one batched step: a step counts one, a prompt's chunk its tokens.
    pub(crate) max_pass_tokens: usize,
    /// Most requests waiting for a generation slot.
    pub(crate) queue_capacity: usize,
    /// Most time a request waits for a slot, in milliseconds.
    pub(crate) queue_timeout_ms: u64,
    /// Most time from a slot to the first token (the load, a compile included), in milliseconds.
    pub(crate) first_token_timeout_ms: u64,
    /// Most time between two tokens, in milliseconds.
    pub(crate) between_tokens_timeout_ms: u64,
    /// Most time for a whole request, in milliseconds.
    pub(crate) request_timeout_ms: u64,
    /// Most time a generation waits on a reader that takes nothing (a stalled client), in milliseconds;
    /// past it, the generation is cancelled and its slot and memory return.
    pub(crate) reader_timeout_ms: u64,
    /// The largest part of the kv-cache pool one request reserves before its first token, 0 to 1; past
    /// it, the request reserves a token's worth per token.
    pub(crate) kv_up_front_share: f64,
    /// `usine serve`: the address to listen on. Any but loopback needs `api_key`.
    pub(crate) bind: String,
    /// `usine serve`: the bearer token every endpoint but `/health` (and `/metrics`, unless
    /// `metrics_need_key`) demands; none when unset.
    pub(crate) api_key: Option<String>,
    /// `usine serve`: `/metrics` demands the key too.
    pub(crate) metrics_need_key: bool,
    /// `usine serve`: the largest request body, in bytes.
    pub(crate) max_body_bytes: usize,
    /// `usine serve`: the longest prompt (or conversation), in bytes.
    pub(crate) max_prompt_bytes: usize,
    /// `usine serve`: the most tokens a request may ask for.
    pub(crate) max_tokens_limit: u32,
    /// `usine serve`: models to warm up at start.
    pub(crate) warmup: Vec<String>,
    /// `usine serve`: report not ready (503) until the warm-ups are done.
    pub(crate) wait_for_warmup: bool,
    /// `usine serve`: how long running streams may go on after SIGTERM, in seconds.
    pub(crate) shutdown_grace_seconds: u64,
    /// `usine serve`: most connections open at once; more wait in the system's queue until one closes.
    pub(crate) max_connections: usize,
    /// `usine serve`: most time from a request's first byte to the end of its header, in milliseconds.
    pub(crate) header_read_timeout_ms: u64,
    /// `usine serve`: most time a connection may stay open without a request (before the first, or
    /// between two), in milliseconds.
    pub(crate) idle_timeout_ms: u64,
    /// `usine serve`: most time from a request's header to the end of its body, in milliseconds.
    pub(crate) body_read_timeout_ms: u64,
    /// `usine serve`: the largest request header (request line and fields), in bytes.
    pub(crate) max_header_bytes: usize,
    /// `usine serve`: the system's send buffer of each connection, in bytes (Linux doubles it for its
    /// own bookkeeping). What a client has not read waits there: a bound on the kernel memory a stalled
    /// client holds, and the point past which its stream blocks and `reader_timeout_ms` runs.
    pub(crate) send_buffer_bytes: usize,
    /// `usine serve`: an access log on stderr, one line per request (`log_format` sets text or JSON).
    pub(crate) access_log: bool,
    /// Logs on stderr at this level and above: `off`, `error`, `warn`, `info` (loads, compiles,
    /// evictions), `debug` (admission) or `trace`. `RUST_LOG`, when set, takes precedence and can set a
    /// level per crate (`usine_kernel=info,warn`).
    pub(crate) log_level: LogLevel,
    /// Logs as `text` (a line per event) or `json` (an object per line).
    pub(crate) log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        let params = GenerationParams::default();
        Self {
            engine: usine_engine_webllm::NAME.into(),
            model: None,
            cache_dir: None,
            models_dir: None,
            remote: None,
            remote_timeout_ms: 2_000,
            remote_cool_down_ms: 30_000,
            remote_ttl_seconds: 7 * 24 * 3600,
            remote_max_graph_mib: 8 << 10,
            remote_wait_ms: 600_000,
            memory_budget_mib: 4096,
            weights_budget_mib: 16384,
            threads: None,
            device: "auto".to_owned(),
            max_context: None,
            jitter: 0.05,
            max_tokens: 64,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            seed: 0,
            warm: true,
            pipelining: true,
            max_concurrent: 4,
            max_batch: 64,
            max_pass_tokens: 512,
            queue_capacity: 64,
            queue_timeout_ms: 60_000,
            first_token_timeout_ms: 300_000,
            between_tokens_timeout_ms: 30_000,
            request_timeout_ms: 600_000,
            reader_timeout_ms: 10_000,
            kv_up_front_share: 0.25,
            bind: "127.0.0.1:8080".into(),
            api_key: None,
            metrics_need_key: false,
            max_body_bytes: 1 << 20,
            max_prompt_bytes: 256 << 10,
            max_tokens_limit: 4096,
            warmup: Vec::new(),
            wait_for_warmup: false,
            shutdown_grace_seconds: 10,
            max_connections: 1024,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            body_read_timeout_ms: 60_000,
            max_header_bytes: 32 << 10,
            send_buffer_bytes: 64 << 10,
            access_log: true,
            log_level: LogLevel::Warn,
            log_format: LogFormat::Text,
        }
    }
}

/// The keys, in the order `config show` prints them.
pub(crate) const KEYS: &[&str] = &[
    "engine",
    "model",
    "cache_dir",
    "models_dir",
    "remote",
    "remote_timeout_ms",
    "remote_cool_down_ms",
    "remote_ttl_seconds",
    "remote_max_graph_mib",
    "remote_wait_ms",
    "memory_budget_mib",
    "weights_budget_mib",
    "threads",
    "device",
    "max_context",
    "jitter",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "warm",
    "pipelining",
    "max_concurrent",
    "max_batch",
    "max_pass_tokens",
    "queue_capacity",
    "queue_timeout_ms",
    "first_token_timeout_ms",
    "between_tokens_timeout_ms",
    "request_timeout_ms",
    "reader_timeout_ms",
    "kv_up_front_share",
    "bind",
    "api_key",
    "metrics_need_key",
    "max_body_bytes",
    "max_prompt_bytes",
    "max_tokens_limit",
    "warmup",
    "wait_for_warmup",
    "shutdown_grace_seconds",
    "max_connections",
    "header_read_timeout_ms",
    "idle_timeout_ms",
    "body_read_timeout_ms",
    "max_header_bytes",
    "send_buffer_bytes",
    "access_log",
    "log_level",
    "log_format",
];

/// The largest memory budget, in MiB: a PiB, far beyond any machine, and far from overflowing bytes.
pub(crate) const MAX_BUDGET_MIB: u64 = 1 << 30;

/// The shortest API key taken: a guessable key is no key.
pub(crate) const MIN_API_KEY_LEN: usize = 16;

/// The most connections `max_connections` may allow: far above what one process serves well.
pub(crate) const MAX_CONNECTIONS: usize = 1 << 20;

/// The longest connection time limit, in milliseconds: a day.
pub(crate) const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// The smallest and largest `max_header_bytes` (hyper reads no header in less than 8 KiB).
pub(crate) const HEADER_BYTES: std::ops::RangeInclusive<usize> = (8 << 10)..=(1 << 20);

/// The smallest and largest `send_buffer_bytes`: Linux takes no less than 4,608 bytes (it doubles what
/// it is given), and autotunes up to 4 MiB when left alone.
pub(crate) const SEND_BUFFER_BYTES: std::ops::RangeInclusive<usize> = (4 << 10)..=(4 << 20);

/// The longest remote tier time limit, in milliseconds: 10 minutes.
pub(crate) const REMOTE_MAX_MS: u64 = 600_000;

pub(crate) use usine_storage::redact_url as redact;

/// The name of the configuration file.
pub(crate) const FILE_NAME: &str = "usine.toml";

/// Values set by flags: only those given are layered over the rest.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Flags(pub(crate) Dict);

impl Flags {
    /// Sets `key` to `value` when a flag gave one.
    pub(crate) fn set(&mut self, key: &str, value: Option<impl Serialize>) {
        if let Some(value) = value {
            let value = figment::value::Value::serialize(value).expect("flag values are plain data");
            self.0.insert(key.to_owned(), value);
        }
    }
}

impl Provider for Flags {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flag")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.0.clone())]))
    }
}

/// The defaults, as a layer named for people.
struct Defaults;

impl Provider for Defaults {
    fn metadata(&self) -> Metadata {
        Metadata::named("default")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(Config::default()).data()
    }
}

/// The configuration and where each value came from.
pub(crate) struct Loaded {
    pub(crate) config: Config,
    figment: Figment,
}

/// The files read, lowest precedence first: the user's, then the working folder's; or only `explicit`.
pub(crate) fn files(explicit: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(path) = explicit {
        anyhow::ensure!(path.is_file(), "configuration file {} does not exist", path.display());
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    if let Some(dir) = dirs::config_dir() {
        files.push(dir.join("usine").join(FILE_NAME));
    }
    files.push(PathBuf::from(FILE_NAME));
    Ok(files.into_iter().filter(|path| path.is_file()).collect())
}

/// `USINE_API_KEY` as the string it is: the environment provider would read an all-digit key as a number.
struct ApiKeyEnv(Option<std::ffi::OsString>);

impl Provider for ApiKeyEnv {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        if let Some(key) = &self.0 {
            // The key is never shown, even when it is not text.
            let key = key.to_str().ok_or_else(|| figment::Error::from("USINE_API_KEY is not UTF-8".to_owned()))?;
            dict.insert("api_key".to_owned(), key.into());
        }
        Ok(Map::from([(Profile::Default, dict)]))
    }
}

/// Loads the configuration: defaults, `files`, the environment, then `flags`.
pub(crate) fn load(files: &[PathBuf], flags: Flags) -> anyhow::Result<Loaded> {
    load_with_key(files, flags, std::env::var_os("USINE_API_KEY"))
}

/// [`load`], with `USINE_API_KEY`'s value given.
fn load_with_key(files: &[PathBuf], flags: Flags, api_key: Option<std::ffi::OsString>) -> anyhow::Result<Loaded> {
    let mut figment = Figment::from(Defaults);
    for file in files {
        figment = figment.merge(Toml::file_exact(file));
    }
    let env = Env::prefixed("USINE_").only(KEYS).ignore(&["api_key"]);
    let figment = figment.merge(env).merge(ApiKeyEnv(api_key)).merge(flags);
    let config: Config = figment.extract().map_err(|error| anyhow::anyhow!(describe(&error)))?;
    let loaded = Loaded { config, figment };
    loaded.validate()?;
    Ok(loaded)
}

/// A number as people wrote it: a default held as an `f32` (`temperature` 0.7) reads back as
/// 0.699999988079071 in an `f64`, so a float that an `f32` holds exactly is printed as that `f32`.
fn shortest(number: &serde_json::Number) -> String {
    match number.as_f64() {
        #[allow(clippy::cast_possible_truncation, reason = "the round trip checks that nothing is lost")]
        Some(float) if !number.is_i64() && !number.is_u64() && f64::from(float as f32) == float => {
            (float as f32).to_string()
        }
        _ => number.to_string(),
    }
}

/// A configuration error in one line per problem: where, which key, what was wrong.
fn describe(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|error| {
            let key = error.path.join(".");
            let origin = error.metadata.as_ref().map(|metadata| origin(metadata, &error.path));
            let what = match &error.kind {
                figment::error::Kind::UnknownField(field, known) => {
                    format!("unknown key `{field}` (the keys: {})", known.join(", "))
                }
                // A type error would print the value: the key stays secret.
                _ if key == "api_key" => "expected a string (the value is not shown)".to_owned(),
                // A parse error quotes the file's line: not the key's.
                kind => kind
                    .to_string()
                    .lines()
                    .map(|line| if line.contains("api_key") { "  | api_key = (hidden)" } else { line })
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
            match origin {
                Some(origin) if !key.is_empty() && !matches!(error.kind, figment::error::Kind::UnknownField(..)) => {
                    format!("bad configuration in {origin}: key `{key}`: {what}")
                }
                Some(origin) => format!("bad configuration in {origin}: {what}"),
                None => format!("bad configuration: {what}"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Where a value came from, for people: a file's path, an environment variable's name, a flag.
fn origin(metadata: &Metadata, path: &[String]) -> String {
    match &metadata.source {
        Some(figment::Source::File(file)) => file.display().to_string(),
        _ if metadata.name.contains("environment") => {
            format!("environment variable USINE_{}", path.join("_").to_uppercase())
        }
        _ => metadata.name.to_string(),
    }
}

impl Loaded {
    /// Where `key`'s value came from.
    pub(crate) fn origin_of(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            Some(metadata) => origin(metadata, &[key.to_owned()]),
            None => "default".to_owned(),
        }
    }

    /// Checks the values against their limits, naming the key and where its value came from.
    fn validate(&self) -> anyhow::Result<()> {
        let config = &self.config;
        let outside = |key: &str, value: String, expected: &str| {
            anyhow::anyhow!("bad configuration in {}: key `{key}` is {value}, expected {expected}", self.origin_of(key))
        };
        let params = self.params();
        if let Err(usine_engine::EngineError::InvalidParams { name, value, limit }) = params.validate() {
            return Err(outside(name, value, &limit));
        }
        if !(0.0..=1.0).contains(&config.jitter) {
            return Err(outside("jitter", config.jitter.to_string(), "0..=1"));
        }
        for (key, mib) in
            [("memory_budget_mib", config.memory_budget_mib), ("weights_budget_mib", config.weights_budget_mib)]
        {
            if !(1..=MAX_BUDGET_MIB).contains(&mib) {
                return Err(outside(key, mib.to_string(), &format!("1..={MAX_BUDGET_MIB} (a PiB)")));
            }
        }
        if config.cache_dir.as_ref().is_some_and(|dir| dir.as_os_str().is_empty()) {
            return Err(outside("cache_dir", "empty".into(), "a folder (leave it unset for the default)"));
        }
        if config.max_context == Some(0) {
            return Err(outside("max_context", "0".into(), "at least 1 token (leave it unset for the model's own)"));
        }
        if !(1..=usine_executor::MAX_BATCH).contains(&config.max_batch) {
            let expected = format!("1..={} (1: no batching)", usine_executor::MAX_BATCH);
            return Err(outside("max_batch", config.max_batch.to_string(), &expected));
        }
        if !(1..=usine_executor::MAX_PASS_TOKENS).contains(&config.max_pass_tokens) {
            let expected = format!("1..={} tokens", usine_executor::MAX_PASS_TOKENS);
            return Err(outside("max_pass_tokens", config.max_pass_tokens.to_string(), &expected));
        }
        #[cfg(feature = "candle")]
        if let Err(expected) = config.device.parse::<usine_engine_candle::Target>() {
            return Err(outside("device", config.device.clone(), &expected));
        }
        if config.threads == Some(0) {
            return Err(outside("threads", "0".into(), "at least 1"));
        }
        if config.max_body_bytes == 0 || config.max_prompt_bytes == 0 || config.max_tokens_limit == 0 {
            let key =
                [("max_body_bytes", config.max_body_bytes == 0), ("max_prompt_bytes", config.max_prompt_bytes == 0)]
                    .into_iter()
                    .find(|(_, zero)| *zero)
                    .map_or("max_tokens_limit", |(key, _)| key);
            return Err(outside(key, "0".into(), "at least 1"));
        }
        if config.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(outside("bind", format!("`{}`", config.bind), "an address and port, such as 127.0.0.1:8080"));
        }
        if config.api_key.as_ref().is_some_and(|key| key.len() < MIN_API_KEY_LEN) {
            return Err(outside("api_key", "too short".into(), &format!("at least {MIN_API_KEY_LEN} characters")));
        }
        if !(1..=MAX_CONNECTIONS).contains(&config.max_connections) {
            let expected = format!("1..={MAX_CONNECTIONS}");
            return Err(outside("max_connections", config.max_connections.to_string(), &expected));
        }
        for (key, millis) in [
            ("header_read_timeout_ms", config.header_read_timeout_ms),
            ("idle_timeout_ms", config.idle_timeout_ms),
            ("body_read_timeout_ms", config.body_read_timeout_ms),
        ] {
            if !(1..=MAX_TIMEOUT_MS).contains(&millis) {
                return Err(outside(key, millis.to_string(), &format!("1..={MAX_TIMEOUT_MS} (a day)")));
            }
        }
        if !HEADER_BYTES.contains(&config.max_header_bytes) {
            let expected = format!("{}..={} (8 KiB to 1 MiB)", HEADER_BYTES.start(), HEADER_BYTES.end());
            return Err(outside("max_header_bytes", config.max_header_bytes.to_string(), &expected));
        }
        if !SEND_BUFFER_BYTES.contains(&config.send_buffer_bytes) {
            let expected = format!("{}..={} (4 KiB to 4 MiB)", SEND_BUFFER_BYTES.start(), SEND_BUFFER_BYTES.end());
            return Err(outside("send_buffer_bytes", config.send_buffer_bytes.to_string(), &expected));
        }
        for (key, millis) in [
            ("remote_timeout_ms", config.remote_timeout_ms),
            ("remote_cool_down_ms", config.remote_cool_down_ms),
            ("remote_wait_ms", config.remote_wait_ms),
        ] {
            if !(1..=REMOTE_MAX_MS).contains(&millis) {
                return Err(outside(key, millis.to_string(), &format!("1..={REMOTE_MAX_MS} (10 minutes)")));
            }
        }
        if !(1..=MAX_BUDGET_MIB).contains(&config.remote_max_graph_mib) {
            let expected = format!("1..={MAX_BUDGET_MIB}");
            return Err(outside("remote_max_graph_mib", config.remote_max_graph_mib.to_string(), &expected));
        }
        if let Some(url) = &config.remote {
            #[cfg(feature = "remote")]
            usine_storage::remote::RemoteTier::new(self.remote_config(url)).map_err(|error| match error {
                usine_storage::StorageError::RemoteUrl { message, .. } => {
                    let expected = format!("a Redis URL, redis://[user:password@]host[:port][/db] ({message})");
                    outside("remote", format!("`{}`", redact(url)), &expected)
                }
                other => outside("remote", format!("`{}`", redact(url)), &other.to_string()),
            })?;
            #[cfg(not(feature = "remote"))]
            return Err(outside(
                "remote",
                format!("`{}`", redact(url)),
                "unset: this build has no remote tier (feature `remote`)",
            ));
        }
        let executor = self.executor_config();
        executor.validate().map_err(|error| outside(error.name, error.value, &error.limit))?;
        if config.models_dir.as_ref().is_some_and(|dir| dir.as_os_str().is_empty()) {
            return Err(outside("models_dir", "empty".into(), "a folder (leave it unset for none)"));
        }
        let catalog = crate::app::Catalog::new(config)
            .with_context(|| format!("bad configuration in {}: key `models_dir`", self.origin_of("models_dir")))?;
        catalog.resolve(&config.engine, config.model.as_deref()).with_context(|| match config.model.as_deref() {
            Some(model) if crate::app::names_a_file(model) => {
                format!("bad configuration in {}: key `model`", self.origin_of("model"))
            }
            _ => format!(
                "bad configuration in {} / {}: keys `engine` and `model`",
                self.origin_of("engine"),
                self.origin_of("model")
            ),
        })?;
        Ok(())
    }

    /// The generation parameters the configuration gives.
    pub(crate) fn params(&self) -> GenerationParams {
        let config = &self.config;
        GenerationParams {
            max_tokens: config.max_tokens,
            temperature: config.temperature,
            top_p: config.top_p,
            top_k: config.top_k,
            seed: config.seed,
            stop: Vec::new(),
        }
    }

    /// The remote tier's settings the configuration gives, for the server at `url`.
    #[cfg(feature = "remote")]
    pub(crate) fn remote_config(&self, url: &str) -> usine_storage::remote::RemoteConfig {
        let config = &self.config;
        let millis = std::time::Duration::from_millis;
        let mut remote = usine_storage::remote::RemoteConfig::new(url);
        remote.timeout = millis(config.remote_timeout_ms);
        remote.cool_down = millis(config.remote_cool_down_ms);
        remote.wait = millis(config.remote_wait_ms);
        remote.ttl = (config.remote_ttl_seconds > 0).then(|| std::time::Duration::from_secs(config.remote_ttl_seconds));
        remote.max_graph_bytes = config.remote_max_graph_mib << 20;
        // Renewed every third of its life, each renewal within the timeout.
        remote.lease = remote.lease.max(3 * remote.timeout);
        remote
    }

    /// The executor's settings the configuration gives.
    pub(crate) fn executor_config(&self) -> usine_executor::ExecutorConfig {
        let config = &self.config;
        let millis = std::time::Duration::from_millis;
        usine_executor::ExecutorConfig {
            max_concurrent: config.max_concurrent,
            max_batch: config.max_batch,
            max_pass_tokens: config.max_pass_tokens,
            queue_capacity: config.queue_capacity,
            // A reader behind by this many tokens gets them in one server-sent event: at 16, 100 streams
            // of the zero engine went through HTTP at 0.3 of the executor's rate; at 64, above half.
            channel_capacity: 64,
            pipelining: config.pipelining,
            timeouts: usine_executor::Timeouts {
                queue: Some(millis(config.queue_timeout_ms)),
                first_token: Some(millis(config.first_token_timeout_ms)),
                between_tokens: Some(millis(config.between_tokens_timeout_ms)),
                total: Some(millis(config.request_timeout_ms)),
                reader: Some(millis(config.reader_timeout_ms)),
            },
            kv_up_front_share: config.kv_up_front_share,
            ..usine_executor::ExecutorConfig::default()
        }
    }

    /// Every key, its value as given (before any conversion), and where the value came from.
    pub(crate) fn show(&self) -> Vec<(&'static str, String, String)> {
        KEYS.iter()
            .map(|&key| {
                let value = match self.figment.find_value(key) {
                    Err(_) => "(unset)".to_owned(),
                    Ok(value) => match serde_json::to_value(&value) {
                        Ok(serde_json::Value::String(text)) => text,
                        Ok(serde_json::Value::Null) => "(unset)".to_owned(),
                        Ok(serde_json::Value::Number(number)) => shortest(&number),
                        Ok(other) => other.to_string(),
                        Err(_) => "?".to_owned(),
                    },
                };
                let value = match key {
                    "api_key" if value != "(unset)" => "(set, hidden)".to_owned(),
                    "remote" => redact(&value),
                    _ => value,
                };
                (key, value, self.origin_of(key))
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]
mod tests {
    use super::*;

    // Would catch: an all-digit key read as a number (and refused), or a key printed in an error.
    #[test]
    fn an_all_digit_api_key_is_a_string_and_no_error_prints_a_key() {
        let digits = "01234567890123456789";
        let loaded = load_with_key(&[], Flags::default(), Some(digits.into())).unwrap();
        assert_eq!(loaded.config.api_key.as_deref(), Some(digits));
        assert_eq!(loaded.origin_of("api_key"), "environment variable USINE_API_KEY");

        let short = "4242";
        let error = load_with_key(&[], Flags::default(), Some(short.into())).err().unwrap().to_string();
        assert_eq!(
            error,
            "bad configuration in environment variable USINE_API_KEY: key `api_key` is too short, expected at least 16 \
             characters"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(FILE_NAME);
        std::fs::write(&file, "api_key = 9876543210987654\n").unwrap();
        let error = load_with_key(std::slice::from_ref(&file), Flags::default(), None).err().unwrap().to_string();
        assert_eq!(
            error,
            format!(
                "bad configuration in {}: key `api_key`: expected a string (the value is not shown)",
                file.display()
            )
        );
        std::fs::write(&file, "api_key = 98765432109876543210\n").unwrap(); // too large: a parse error
        let error = load_with_key(std::slice::from_ref(&file), Flags::default(), None).err().unwrap().to_string();
        assert!(!error.contains("98765") && error.contains("api_key = (hidden)"), "{error}");
    }

    #[test]
    fn the_limits_of_serve_have_their_defaults() {
        let loaded = load_with_key(&[], Flags::default(), None).unwrap();
        let timeouts = loaded.executor_config().timeouts;
        let seconds = std::time::Duration::from_secs;
        assert_eq!((timeouts.total, timeouts.reader), (Some(seconds(600)), Some(seconds(10))));
        assert_eq!(loaded.executor_config().kv_up_front_share, 0.25);
        let mut flags = Flags::default();
        flags.set("kv_up_front_share", Some(1.5));
        let error = load_with_key(&[], flags, None).err().unwrap().to_string();
        assert_eq!(error, "bad configuration in command-line flag: key `kv_up_front_share` is 1.5, expected 0..=1");
        assert_eq!(loaded.config.send_buffer_bytes, 65_536);
        let mut flags = Flags::default();
        flags.set("send_buffer_bytes", Some(1024));
        let error = load_with_key(&[], flags, None).err().unwrap().to_string();
        assert_eq!(
            error,
            "bad configuration in command-line flag: key `send_buffer_bytes` is 1024, expected 4096..=4194304 (4 KiB \
             to 4 MiB)"
        );
    }
}
