//! The forward pass on an NVIDIA GPU (feature `cuda`), through `cudarc`: the driver and NVRTC are
//! loaded at run time, so a build needs no CUDA toolkit and a machine without a GPU runs the CPU
//! kernels as before.
//!
//! The kernels (`cuda.cu`) are compiled by NVRTC for the card's architecture into a cubin, which a
//! compile stores in the graph (`b cuda ARCH DRIVER SOURCE`, see [`Card::kernels_name`]): a cached
//! load compiles nothing. The matrices are uploaded as the graph lays them out for the CPU kernels
//! (Q8_0 and Q4_0, rows in groups of four), so one graph serves both devices. Activations are f32;
//! each product quantizes its vectors to Q8_0 blocks first and multiplies with integer dot products,
//! as the CPU kernels do. Each sequence keeps its keys and values in f32 on the card.

#![allow(unsafe_code, reason = "kernel launches and NVRTC's cubin, which cudarc's safe API does not cover")]

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use usine_engine::EngineError;

use crate::config::{Config, Rope};
use crate::kernel::Format;
use crate::matrix::Matrix;
use crate::model::{Model, PREFILL_CHUNK, rotary_angles};

/// The kernels' source.
const SOURCE: &str = include_str!("cuda.cu");

/// Sequences one product kernel multiplies at once (its accumulators are registers).
const VECTORS: usize = 8;

/// A card, as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    /// Its ordinal among the machine's cards.
    pub ordinal: usize,
    /// Its name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Its compute capability (9.0 for an H100).
    pub capability: (i32, i32),
    /// The driver's CUDA version (12080 for 12.8).
    pub driver: i32,
    /// Its memory, in bytes.
    pub memory: u64,
}

impl Card {
    /// The name of the kernels' entry in a graph compiled for this card: its architecture, its driver
    /// and a digest of the kernels' source (a new source compiles anew).
    pub fn kernels_name(&self) -> String {
        let source = blake3::hash(SOURCE.as_bytes()).to_hex();
        format!("cuda sm_{}{} {} {}", self.capability.0, self.capability.1, self.driver, &source[..16])
    }
}

impl std::fmt::Display for Card {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.capability;
        let (driver_major, driver_minor) = (self.driver / 1000, self.driver % 1000 / 10);
        #[expect(clippy::cast_precision_loss, reason = "a card's memory, shown in GiB")]
        let gib = self.memory as f64 / f64::from(1 << 30);
        write!(f, "{} (sm_{major}{minor}, {gib:.0} GiB, CUDA {driver_major}.{driver_minor} driver)", self.name)
    }
}

fn driver_error(what: &str) -> impl Fn(cudarc::driver::DriverError) -> EngineError + '_ {
    move |error| EngineError::Fatal { message: format!("CUDA: {what}: {error}") }
}

/// The card `ordinal`, or `None` where the machine has no CUDA driver or no such card.
pub fn detect(ordinal: usize) -> Option<Card> {
    // SAFETY: only tries to open the driver's library, which cudarc would otherwise fail to find with
    // a panic.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    let count = CudaContext::device_count().ok()?;
    if usize::try_from(count).ok()? <= ordinal {
        return None;
    }
    let context = CudaContext::new(ordinal).ok()?;
    card_of(&context, ordinal).ok()
}

fn card_of(context: &CudaContext, ordinal: usize) -> Result<Card, EngineError> {
    let mut driver = 0;
    // SAFETY: writes one int.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&raw mut driver) }
        .result()
        .map_err(driver_error("the driver's version"))?;
    Ok(Card {
        ordinal,
        name: context.name().map_err(driver_error("the card's name"))?,
        capability: context.compute_capability().map_err(driver_error("the card's architecture"))?,
        driver,
        memory: context.total_mem().map_err(driver_error("the card's memory"))? as u64,
    })
}

/// The kernels for `card`: NVRTC's cubin for its architecture.
pub(crate) fn compile(card: &Card) -> Result<Vec<u8>, EngineError> {
    use cudarc::nvrtc::{result, sys};
    let failed =
        |what: &str, error: result::NvrtcError| EngineError::Fatal { message: format!("NVRTC: {what}: {error:?}") };
    // SAFETY: only tries to open NVRTC's library.
    if !unsafe { sys::is_culib_present() } {
        return Err(EngineError::Fatal {
            message: "NVRTC (libnvrtc) is not installed: the CUDA kernels cannot be compiled".to_owned(),
        });
    }
    let source = std::ffi::CString::new(SOURCE).expect("no NUL in the source");
    let program = result::create_program(&source, None).map_err(|error| failed("creating the program", error))?;
    let (major, minor) = card.capability;
    let options = [format!("--gpu-architecture=sm_{major}{minor}"), "--std=c++17".to_owned()];
    // SAFETY: the program was just created and is destroyed once, below.
    let compiled = unsafe { result::compile_program(program, &options) };
    let outcome = match compiled {
        Err(error) => {
            // SAFETY: as above.
            let log = unsafe { result::get_program_log(program) }.unwrap_or_default();
            let log: Vec<u8> = log.iter().map(|&c| c.cast_unsigned()).take_while(|&c| c != 0).collect();
            Err(EngineError::Fatal {
                message: format!("NVRTC could not compile the kernels ({error:?}): {}", String::from_utf8_lossy(&log)),
            })
        }
        Ok(()) => {
            let mut size = 0;
            // SAFETY: the program compiled; the buffer is as long as NVRTC says.
            unsafe { sys::nvrtcGetCUBINSize(program, &raw mut size) }
                .result()
                .map_err(|error| failed("the cubin's size", error))
                .and_then(|()| {
                    let mut cubin = vec![0_u8; size];
                    unsafe { sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast()) }
                        .result()
                        .map_err(|error| failed("the cubin", error))?;
                    Ok(cubin)
                })
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { result::destroy_program(program) };
    outcome
}

/// An open card: its context, the one stream every pass runs on, and the kernels.
pub(crate) struct Gpu {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: Functions,
}

struct Functions {
    rms_norm: CudaFunction,
    quantize: CudaFunction,
    /// For 1, 2, 4 and 8 vectors at once.
    matmul_q8: [CudaFunction; 4],
    matmul_q4: [CudaFunction; 4],
    add: CudaFunction,
    silu_mul: CudaFunction,
    rope_store: CudaFunction,
    attention: CudaFunction,
}

impl Gpu {
    /// Opens the card `ordinal` and loads `cubin` (the kernels [`compile`] made for it).
    pub(crate) fn open(ordinal: usize, cubin: Vec<u8>) -> Result<Self, EngineError> {
        if detect(ordinal).is_none() {
            return Err(EngineError::Fatal { message: format!("no CUDA card {ordinal} on this machine") });
        }
        let context = CudaContext::new(ordinal).map_err(driver_error("opening the card"))?;
        // One stream, in order: cudarc's events between streams would only cost time.
        // SAFETY: every launch and copy of this engine goes to the one stream.
        unsafe { context.disable_event_tracking() };
        let module =
            context.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(driver_error("loading the kernels"))?;
        let function = |name: &str| module.load_function(name).map_err(driver_error("a kernel"));
        let functions = Functions {
            rms_norm: function("rms_norm")?,
            quantize: function("quantize")?,
            matmul_q8: [
                function("matmul_q8_1")?,
                function("matmul_q8_2")?,
                function("matmul_q8_4")?,
                function("matmul_q8_8")?,
            ],
            matmul_q4: [
                function("matmul_q4_1")?,
                function("matmul_q4_2")?,
                function("matmul_q4_4")?,
                function("matmul_q4_8")?,
            ],
            add: function("add")?,
            silu_mul: function("silu_mul")?,
            rope_store: function("rope_store")?,
            attention: function("attention")?,
        };
        let stream = context.default_stream();
        Ok(Self { context, stream, functions })
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, values: &[T]) -> Result<CudaSlice<T>, EngineError> {
        self.stream.clone_htod(values).map_err(|error| self.memory_error(std::mem::size_of_val(values), error))
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        count: usize,
    ) -> Result<CudaSlice<T>, EngineError> {
        self.stream
            .alloc_zeros(count.max(1))
            .map_err(|error| self.memory_error(count * std::mem::size_of::<T>(), error))
    }

    /// An allocation that failed: out of memory with the figures where the card is full.
    fn memory_error(&self, bytes: usize, error: cudarc::driver::DriverError) -> EngineError {
        if error.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let free = self.context.mem_get_info().map_or(0, |(free, _)| free);
            return EngineError::OutOfMemory { needed: bytes as u64, available: free as u64 };
        }
        EngineError::Fatal { message: format!("CUDA: allocating {bytes} bytes: {error}") }
    }
}

/// A Q8_0 or Q4_0 matrix on the card, laid out as the graph has it.
struct GpuMatrix {
    scales: CudaSlice<u16>,
    quants: CudaSlice<u8>,
    rows: usize,
    blocks: usize,
    q4: bool,
    /// XORed into each word of Q8 quants stored unsigned (for the VNNI kernels) to sign them again.
    flip: i32,
}

impl GpuMatrix {
    fn new(gpu: &Gpu, name: &str, matrix: &Matrix) -> Result<Self, EngineError> {
        let refused = |what: String| EngineError::UnsupportedModel {
            message: format!("the CUDA kernels take Q8_0 and Q4_0 matrices; `{name}` is {what}"),
        };
        let Matrix::Quantized(matrix) = matrix else {
            return Err(refused(match matrix {
                Matrix::Stacked(_) => "a stack of several types".to_owned(),
                _ => "dense".to_owned(),
            }));
        };
        let (format, unsigned, rows, cols, scales, _, quants) = matrix.parts();
        let q4 = match format {
            Format::Q8 => false,
            Format::Q4 => true,
            other => return Err(refused(format!("{other:?}"))),
        };
        Ok(Self {
            scales: gpu.upload(scales)?,
            quants: gpu.upload(quants)?,
            rows,
            blocks: cols / crate::kernel::BLOCK,
            q4,
            flip: if unsigned { i32::from_ne_bytes([0x80; 4]) } else { 0 },
        })
    }
}

struct GpuLayer {
    attention_norm: CudaSlice<f32>,
    wqkv: GpuMatrix,
    qkv_bias: Option<CudaSlice<f32>>,
    wo: GpuMatrix,
    ffn_norm: CudaSlice<f32>,
    w13: GpuMatrix,
    w2: GpuMatrix,
}

/// A sequence's keys and values on the card: per layer and key-value head, `capacity` rows.
pub(crate) struct GpuCache {
    keys: CudaSlice<f32>,
    values: CudaSlice<f32>,
    capacity: usize,
    context: Arc<CudaContext>,
}

/// cudarc frees a slice on the dropping thread's current context without making its own current; a
/// sequence ends on an executor thread where no context is, and the free would fail (the memory kept,
/// the error reported by the next pass). So the context is made current first.
impl Drop for GpuCache {
    fn drop(&mut self) {
        let _ = self.context.bind_to_thread();
    }
}

/// The buffers of a pass of up to [`PREFILL_CHUNK`] tokens, made once.
struct Workspace {
    x: CudaSlice<f32>,
    h: CudaSlice<f32>,
    quants: CudaSlice<i8>,
    scales: CudaSlice<f32>,
    sums: CudaSlice<i32>,
    qkv: CudaSlice<f32>,
    attention: CudaSlice<f32>,
    y: CudaSlice<f32>,
    gate_up: CudaSlice<f32>,
    products: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    /// The attention's scores: a row of `scores_stride` a token and head, grown to the longest context.
    scores: CudaSlice<f32>,
    scores_stride: usize,
    /// Each token's rotary angles, position, cache capacity and cache pointers, and the rows whose
    /// logits are wanted: copied up each pass into buffers made once.
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    positions: CudaSlice<i32>,
    capacities: CudaSlice<i32>,
    keys: CudaSlice<u64>,
    values: CudaSlice<u64>,
    chosen: CudaSlice<i32>,
}

/// A model's weights on the card.
pub(crate) struct GpuModel {
    gpu: Gpu,
    /// The host's model: its configuration, embeddings (a row copied up a token) and rotary factors.
    host: Arc<Model>,
    layers: Vec<GpuLayer>,
    norm: CudaSlice<f32>,
    output: GpuMatrix,
    work: Mutex<Workspace>,
}

/// Its weights are freed with the context current, as a cache's are (see [`GpuCache`]'s `Drop`).
impl Drop for GpuModel {
    fn drop(&mut self) {
        let _ = self.gpu.context.bind_to_thread();
    }
}

/// Tokens of a pass: a token, its position and its sequence's cache.
pub(crate) type Token<'a> = (u32, usize, &'a GpuCache);

impl GpuModel {
    /// Uploads `host`'s weights to `gpu`.
    pub(crate) fn new(gpu: Gpu, host: Arc<Model>) -> Result<Self, EngineError> {
        let config = &host.config;
        let mut layers = Vec::with_capacity(host.layers.len());
        for (index, layer) in host.layers.iter().enumerate() {
            let matrix = |name: &str, matrix: &Matrix| GpuMatrix::new(&gpu, &format!("blk.{index}.{name}"), matrix);
            let layer = GpuLayer {
                attention_norm: gpu.upload(&layer.attention_norm)?,
                wqkv: matrix("attn_qkv", &layer.wqkv)?,
                qkv_bias: layer.qkv_bias.as_deref().map(|bias| gpu.upload(bias)).transpose()?,
                wo: matrix("attn_output", &layer.wo)?,
                ffn_norm: gpu.upload(&layer.ffn_norm)?,
                w13: matrix("ffn_gate_up", &layer.w13)?,
                w2: matrix("ffn_down", &layer.w2)?,
            };
            layers.push(layer);
        }
        let output = GpuMatrix::new(&gpu, "output", &host.output)?;
        let norm = gpu.upload(&host.norm)?;
        let tokens = PREFILL_CHUNK;
        let widest = config.dim.max(config.heads * config.head_dim).max(config.ffn);
        let qkv_dim = config.heads * config.head_dim + 2 * config.kv_dim();
        let work = Workspace {
            x: gpu.zeros(tokens * config.dim)?,
            h: gpu.zeros(tokens * config.dim)?,
            quants: gpu.zeros(tokens * widest)?,
            scales: gpu.zeros(tokens * widest / crate::kernel::BLOCK)?,
            sums: gpu.zeros(tokens * widest / crate::kernel::BLOCK)?,
            qkv: gpu.zeros(tokens * qkv_dim)?,
            attention: gpu.zeros(tokens * config.heads * config.head_dim)?,
            y: gpu.zeros(tokens * config.dim)?,
            gate_up: gpu.zeros(tokens * 2 * config.ffn)?,
            products: gpu.zeros(tokens * config.ffn)?,
            logits: gpu.zeros(tokens * config.vocab)?,
            scores: gpu.zeros(tokens * config.heads * 256)?,
            scores_stride: 256,
            cos: gpu.zeros(tokens * config.head_dim / 2)?,
            sin: gpu.zeros(tokens * config.head_dim / 2)?,
            positions: gpu.zeros(tokens)?,
            capacities: gpu.zeros(tokens)?,
            keys: gpu.zeros(tokens)?,
            values: gpu.zeros(tokens)?,
            chosen: gpu.zeros(tokens)?,
        };
        Ok(Self { gpu, host, layers, norm, output, work: Mutex::new(work) })
    }

    pub(crate) fn config(&self) -> &Config {
        &self.host.config
    }

    /// The token an empty prompt starts from.
    pub(crate) fn start_token(&self) -> u32 {
        self.host.start_token()
    }

    /// A cache for `capacity` tokens, zeroed.
    pub(crate) fn cache(&self, capacity: usize) -> Result<GpuCache, EngineError> {
        let config = self.config();
        let values = config.layers * config.kv_heads * capacity.max(1) * config.head_dim;
        Ok(GpuCache {
            keys: self.gpu.zeros(values)?,
            values: self.gpu.zeros(values)?,
            capacity: capacity.max(1),
            context: Arc::clone(&self.gpu.context),
        })
    }

    /// One pass over `tokens` (at most [`PREFILL_CHUNK`]), writing each one's key and value into its
    /// cache; returns the logits after each token of `logits` (indices into `tokens`).
    pub(crate) fn forward(&self, tokens: &[Token<'_>], logits: &[usize]) -> Result<Vec<Vec<f32>>, EngineError> {
        let config = self.config();
        let count = tokens.len();
        if count == 0 || count > PREFILL_CHUNK || logits.iter().any(|&index| index >= count) {
            return Err(EngineError::Fatal { message: format!("a pass of {count} tokens (1 to {PREFILL_CHUNK})") });
        }
        for &(token, position, cache) in tokens {
            if position >= cache.capacity || position >= config.context {
                return Err(EngineError::Fatal {
                    message: format!("position {position} is beyond the kv-cache of {} tokens", cache.capacity),
                });
            }
            if token as usize >= config.vocab {
                return Err(EngineError::InvalidParams {
                    name: "token",
                    value: token.to_string(),
                    limit: format!("the vocabulary's 0..{}", config.vocab),
                });
            }
        }
        let mut work = self.work.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.pass(&mut work, tokens, logits)
    }

    #[expect(clippy::too_many_lines, reason = "one pass, kernel after kernel, as the CPU's reads")]
    fn pass(&self, work: &mut Workspace, tokens: &[Token<'_>], logits: &[usize]) -> Result<Vec<Vec<f32>>, EngineError> {
        let (gpu, config) = (&self.gpu, self.config());
        let stream = &gpu.stream;
        let launch_error = driver_error("a kernel launch");
        let count = tokens.len();
        let (dim, head_dim, heads, kv_heads) = (config.dim, config.head_dim, config.heads, config.kv_heads);
        let q_dim = heads * head_dim;
        let qkv_dim = q_dim + 2 * config.kv_dim();
        let int = |value: usize| i32::try_from(value).expect("a model's widths fit an i32");
        // The tokens' embeddings, angles, positions and caches.
        let embeddings = self.host.embeddings.as_ref().unwrap_or(&self.host.output);
        let x: Vec<f32> = tokens.iter().flat_map(|&(token, ..)| embeddings.row(token as usize)).collect();
        stream.memcpy_htod(&x, &mut work.x.slice_mut(..x.len())).map_err(driver_error("the embeddings"))?;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &(_, position, _) in tokens {
            let (c, s) = rotary_angles(config, self.host.rope_factors.as_deref(), position);
            cos.extend(c);
            sin.extend(s);
        }
        let positions: Vec<i32> = tokens.iter().map(|&(_, position, _)| int(position)).collect();
        let capacities: Vec<i32> = tokens.iter().map(|&(.., cache)| int(cache.capacity)).collect();
        let keys: Vec<u64> = tokens.iter().map(|&(.., cache)| cache.keys.device_ptr(stream).0).collect();
        let values: Vec<u64> = tokens.iter().map(|&(.., cache)| cache.values.device_ptr(stream).0).collect();
        let copy = driver_error("a pass's positions");
        stream.memcpy_htod(&cos, &mut work.cos.slice_mut(..cos.len())).map_err(&copy)?;
        stream.memcpy_htod(&sin, &mut work.sin.slice_mut(..sin.len())).map_err(&copy)?;
        stream.memcpy_htod(&positions, &mut work.positions.slice_mut(..count)).map_err(&copy)?;
        stream.memcpy_htod(&capacities, &mut work.capacities.slice_mut(..count)).map_err(&copy)?;
        stream.memcpy_htod(&keys, &mut work.keys.slice_mut(..count)).map_err(&copy)?;
        stream.memcpy_htod(&values, &mut work.values.slice_mut(..count)).map_err(&copy)?;
        let longest = tokens.iter().map(|&(_, position, _)| position + 1).max().unwrap_or(1);
        if longest > work.scores_stride {
            let stride = longest.next_power_of_two();
            work.scores = gpu.zeros(PREFILL_CHUNK * heads * stride)?;
            work.scores_stride = stride;
        }
        let halves = i32::from(config.rope() == Rope::Halves);
        #[expect(clippy::cast_precision_loss, reason = "a small head width")]
        let scale = 1.0 / (head_dim as f32).sqrt();
        let eps = config.rms_epsilon;
        let flat = |n: usize| LaunchConfig::for_num_elems(u32::try_from(n).expect("a pass's values"));
        for (index, layer) in self.layers.iter().enumerate() {
            // Attention.
            self.norm(work, false, &layer.attention_norm, count, eps)?;
            self.quantize(work, count * dim)?;
            self.matmul(work, &layer.wqkv, count, Out::Qkv)?;
            if let Some(bias) = &layer.qkv_bias {
                let n = count * qkv_dim;
                let (n_int, width) = (int(n), int(qkv_dim));
                let mut launch = stream.launch_builder(&gpu.functions.add);
                launch.arg(&mut work.qkv).arg(bias).arg(&n_int).arg(&width);
                unsafe { launch.launch(flat(n)) }.map_err(&launch_error)?;
            }
            let mut launch = stream.launch_builder(&gpu.functions.rope_store);
            let (qkv_width, heads_n, kv_n, head_n, layer_n) =
                (int(qkv_dim), int(heads), int(kv_heads), int(head_dim), int(index));
            launch
                .arg(&mut work.qkv)
                .arg(&qkv_width)
                .arg(&work.cos)
                .arg(&work.sin)
                .arg(&heads_n)
                .arg(&kv_n)
                .arg(&head_n)
                .arg(&halves)
                .arg(&work.keys)
                .arg(&work.values)
                .arg(&work.capacities)
                .arg(&work.positions)
                .arg(&layer_n);
            unsafe { launch.launch(grid(count, 256)) }.map_err(&launch_error)?;
            let stride = int(work.scores_stride);
            let mut launch = stream.launch_builder(&gpu.functions.attention);
            launch
                .arg(&work.qkv)
                .arg(&qkv_width)
                .arg(&mut work.attention)
                .arg(&work.keys)
                .arg(&work.values)
                .arg(&work.capacities)
                .arg(&work.positions)
                .arg(&layer_n)
                .arg(&heads_n)
                .arg(&kv_n)
                .arg(&head_n)
                .arg(&scale)
                .arg(&mut work.scores)
                .arg(&stride);
            unsafe { launch.launch(grid(count * heads, 128)) }.map_err(&launch_error)?;
            self.quantize_from(work, From::Attention, count * q_dim)?;
            self.matmul(work, &layer.wo, count, Out::Y)?;
            self.residual(work, count * dim)?;
            // Feed-forward.
            self.norm(work, false, &layer.ffn_norm, count, eps)?;
            self.quantize(work, count * dim)?;
            self.matmul(work, &layer.w13, count, Out::GateUp)?;
            let n = count * config.ffn;
            let (count_int, ffn_int) = (int(count), int(config.ffn));
            let mut launch = stream.launch_builder(&gpu.functions.silu_mul);
            launch.arg(&work.gate_up).arg(&mut work.products).arg(&count_int).arg(&ffn_int);
            unsafe { launch.launch(flat(n)) }.map_err(&launch_error)?;
            self.quantize_from(work, From::Products, n)?;
            self.matmul(work, &layer.w2, count, Out::Y)?;
            self.residual(work, count * dim)?;
        }
        if logits.is_empty() {
            stream.synchronize().map_err(driver_error("the pass"))?;
            return Ok(Vec::new());
        }
        let chosen: Vec<i32> = logits.iter().map(|&index| int(index)).collect();
        stream.memcpy_htod(&chosen, &mut work.chosen.slice_mut(..chosen.len())).map_err(&copy)?;
        self.norm(work, true, &self.norm, logits.len(), eps)?;
        self.quantize(work, logits.len() * dim)?;
        self.matmul(work, &self.output, logits.len(), Out::Logits)?;
        let vocab = config.vocab;
        let host: Vec<f32> =
            stream.clone_dtoh(&work.logits.slice(..logits.len() * vocab)).map_err(driver_error("the logits"))?;
        Ok(host.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// `h` = the RMS norm of `x`'s rows (or, `chosen`, of its rows in `work.chosen`).
    fn norm(
        &self,
        work: &mut Workspace,
        chosen: bool,
        weight: &CudaSlice<f32>,
        count: usize,
        eps: f32,
    ) -> Result<(), EngineError> {
        let dim = i32::try_from(self.config().dim).expect("a width");
        let null: u64 = 0;
        let mut launch = self.gpu.stream.launch_builder(&self.gpu.functions.rms_norm);
        launch.arg(&work.x);
        if chosen {
            launch.arg(&work.chosen);
        } else {
            launch.arg(&null);
        }
        launch.arg(weight).arg(&mut work.h).arg(&dim).arg(&eps);
        unsafe { launch.launch(grid(count, 256)) }.map_err(driver_error("rms_norm"))?;
        Ok(())
    }

    /// Quantizes the first `n` values of `h`.
    fn quantize(&self, work: &mut Workspace, n: usize) -> Result<(), EngineError> {
        self.quantize_from(work, From::H, n)
    }

    fn quantize_from(&self, work: &mut Workspace, from: From, n: usize) -> Result<(), EngineError> {
        let blocks = n / crate::kernel::BLOCK;
        let source = match from {
            From::H => &work.h,
            From::Attention => &work.attention,
            From::Products => &work.products,
        };
        let blocks_n = i32::try_from(blocks).expect("blocks");
        let mut launch = self.gpu.stream.launch_builder(&self.gpu.functions.quantize);
        launch.arg(source).arg(&mut work.quants).arg(&mut work.scales).arg(&mut work.sums).arg(&blocks_n);
        // A warp a block of 32 values: 8 blocks a 256-thread block.
        unsafe { launch.launch(grid(blocks.div_ceil(8), 256)) }.map_err(driver_error("quantize"))?;
        Ok(())
    }

    /// `out`'s first `count` rows = `matrix` × the quantized vectors, [`VECTORS`] at a time.
    fn matmul(&self, work: &mut Workspace, matrix: &GpuMatrix, count: usize, out: Out) -> Result<(), EngineError> {
        let functions = if matrix.q4 { &self.gpu.functions.matmul_q4 } else { &self.gpu.functions.matmul_q8 };
        let (rows, blocks) = (matrix.rows, matrix.blocks);
        let groups = rows.div_ceil(crate::kernel::ROWS);
        let config = grid((groups * 32).div_ceil(128), 128); // a warp a group of rows
        let (rows_n, blocks_n) = (i32::try_from(rows).expect("rows"), i32::try_from(blocks).expect("blocks"));
        let mut first = 0;
        while first < count {
            let left = count - first;
            let (which, vectors) = match left {
                8.. => (3, VECTORS),
                4..=7 => (2, 4),
                2..=3 => (1, 2),
                _ => (0, 1),
            };
            let xq = work.quants.slice(first * blocks * 32..);
            let xd = work.scales.slice(first * blocks..);
            let xs = work.sums.slice(first * blocks..);
            let target = match out {
                Out::Qkv => &mut work.qkv,
                Out::Y => &mut work.y,
                Out::GateUp => &mut work.gate_up,
                Out::Logits => &mut work.logits,
            };
            let mut y = target.slice_mut(first * rows..);
            let mut launch = self.gpu.stream.launch_builder(&functions[which]);
            launch
                .arg(&matrix.scales)
                .arg(&matrix.quants)
                .arg(&matrix.flip)
                .arg(&rows_n)
                .arg(&blocks_n)
                .arg(&xq)
                .arg(&xd)
                .arg(&xs)
                .arg(&mut y)
                .arg(&rows_n);
            unsafe { launch.launch(config) }.map_err(driver_error("matmul"))?;
            first += vectors;
        }
        Ok(())
    }

    /// `x` += `y`, over `n` values.
    fn residual(&self, work: &mut Workspace, n: usize) -> Result<(), EngineError> {
        let n_int = i32::try_from(n).expect("values");
        let mut launch = self.gpu.stream.launch_builder(&self.gpu.functions.add);
        launch.arg(&mut work.x).arg(&work.y).arg(&n_int).arg(&n_int);
        unsafe { launch.launch(LaunchConfig::for_num_elems(u32::try_from(n).expect("values"))) }
            .map_err(driver_error("add"))?;
        Ok(())
    }
}

/// `blocks` blocks of `threads` threads, in one dimension.
fn grid(blocks: usize, threads: u32) -> LaunchConfig {
    let blocks = u32::try_from(blocks).expect("a pass's blocks fit a grid");
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Which activations a quantization reads.
#[derive(Clone, Copy)]
enum From {
    H,
    Attention,
    Products,
}

/// Where a product writes.
#[derive(Clone, Copy)]
enum Out {
    Qkv,
    Y,
    GateUp,
    Logits,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Would catch: kernels NVRTC refuses (a header it lacks, a type, an intrinsic), found on the GPU
    // machine only after a build. Runs where NVRTC is installed (a card is not needed), on the H100's
    // architecture and an older one; says so and checks nothing where it is not.
    #[test]
    fn nvrtc_compiles_the_kernels_into_a_cubin() {
        // SAFETY: only tries to open NVRTC's library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("NVRTC is not installed here: the kernels were not compiled");
            return;
        }
        for capability in [(9, 0), (8, 0)] {
            let card = Card { ordinal: 0, name: "test".into(), capability, driver: 12080, memory: 0 };
            let cubin = compile(&card).unwrap_or_else(|error| panic!("{capability:?}: {error}"));
            assert!(cubin.starts_with(b"\x7fELF"), "a cubin is an ELF file");
        }
    }
}
