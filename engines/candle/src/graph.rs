//! The compiled graph (schema 3): the model's configuration and a table of where each weight lies, as
//! text in the graph's bytes; and the weights themselves, laid out for the kernels (rows interleaved,
//! scales and quants apart), in its raw section. A load reads the table and points the model's
//! matrices into the raw section where it lies, the graph file's mapping: no weight is decoded or
//! copied, and two processes that load the same graph share its pages.
//!
//! ```text
//! usine-candle-graph 3
//! config architecture llama          (one line per field of `Config`; floats as their bits in hex)
//! q NAME FORMAT UNSIGNED ROWS COLS SCALES_AT SCALES_LEN MINS_AT MINS_LEN QUANTS_AT QUANTS_LEN
//!                                                                 a quantized matrix (FORMAT: q8, q4,
//!                                                                 q4m, q8m, q8h; see `kernel.rs`)
//! d NAME ROWS COLS AT LEN                                                       a dense f32 matrix
//! v NAME AT LEN                                                                 an f32 vector
//! s NAME COUNT       quantized matrices of different formats stacked: NAME.0, NAME.1, ... (`q` lines)
//! b NAME AT LEN              bytes: `vocabulary`, the tokenizer's (`tokenizer::Packed`, bincode)
//! ```
//!
//! Offsets and lengths are in bytes of the raw section; each weight starts at a multiple of 64.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use usine_engine::RawSection;

use crate::config::{Architecture, Config};
use crate::kernel::{Format, Isa, QMatrix, Quants, ROWS};
use crate::matrix::{Dense, Matrix};

/// The schema of the graphs this module writes.
pub(crate) const SCHEMA: u32 = 3;
const MAGIC: &str = "usine-candle-graph 3";
/// Each weight starts at a multiple of this in the raw section: whole cache lines, and the alignment of
/// every element type (the section itself starts at a page).
const ALIGN: usize = 64;

/// Writes a graph: the table, and the raw section.
pub(crate) struct Writer {
    table: String,
    raw: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(config: &Config) -> Self {
        let mut table = format!("{MAGIC}\n");
        let option = |value: Option<u32>| value.map_or_else(|| "-".to_owned(), |value| value.to_string());
        let fields = [
            ("architecture", config.architecture.name().to_owned()),
            ("dim", config.dim.to_string()),
            ("layers", config.layers.to_string()),
            ("heads", config.heads.to_string()),
            ("kv_heads", config.kv_heads.to_string()),
            ("head_dim", config.head_dim.to_string()),
            ("ffn", config.ffn.to_string()),
            ("context", config.context.to_string()),
            ("vocab", config.vocab.to_string()),
            ("rms_epsilon", format!("{:08x}", config.rms_epsilon.to_bits())),
            ("rope_theta", format!("{:08x}", config.rope_theta.to_bits())),
            ("rope_position_scale", format!("{:08x}", config.rope_position_scale.to_bits())),
            ("tied_output", u8::from(config.tied_output).to_string()),
            ("bos", option(config.bos)),
            ("eos", option(config.eos)),
        ];
        for (key, value) in fields {
            table.push_str(&format!("config {key} {value}\n"));
        }
        Self { table, raw: Vec::new() }
    }

    /// Appends `bytes` at the next aligned place; returns where.
    fn place(&mut self, bytes: &[u8]) -> usize {
        let at = self.raw.len().next_multiple_of(ALIGN);
        self.raw.resize(at, 0);
        self.raw.extend_from_slice(bytes);
        at
    }

    pub(crate) fn matrix(&mut self, name: &str, matrix: &Matrix) {
        match matrix {
            Matrix::Stacked(parts) => {
                self.table.push_str(&format!("s {name} {}\n", parts.len()));
                for (index, part) in parts.iter().enumerate() {
                    self.matrix(&format!("{name}.{index}"), part);
                }
            }
            Matrix::Quantized(matrix) => {
                let (format, unsigned, rows, cols, scales, mins, quants) = matrix.parts();
                let scales: Vec<u8> = scales.iter().flat_map(|scale| scale.to_le_bytes()).collect();
                let mins: Vec<u8> = mins.iter().flat_map(|min| min.to_le_bytes()).collect();
                let scales_at = self.place(&scales);
                let mins_at = self.place(&mins);
                let quants_at = self.place(quants);
                self.table.push_str(&format!(
                    "q {name} {} {} {rows} {cols} {scales_at} {} {mins_at} {} {quants_at} {}\n",
                    format.name(),
                    u8::from(unsigned),
                    scales.len(),
                    mins.len(),
                    quants.len()
                ));
            }
            Matrix::Dense(dense) => {
                let bytes: &[u8] = bytemuck::cast_slice(dense.values());
                let at = self.place(bytes);
                self.table.push_str(&format!("d {name} {} {} {at} {}\n", dense.rows(), dense.cols(), bytes.len()));
            }
        }
    }

    pub(crate) fn vector(&mut self, name: &str, values: &[f32]) {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let at = self.place(bytes);
        self.table.push_str(&format!("v {name} {at} {}\n", bytes.len()));
    }

    pub(crate) fn bytes(&mut self, name: &str, bytes: &[u8]) {
        let at = self.place(bytes);
        self.table.push_str(&format!("b {name} {at} {}\n", bytes.len()));
    }

    /// The graph's bytes (the table) and its raw section.
    pub(crate) fn finish(self) -> (Vec<u8>, Vec<u8>) {
        (self.table.into_bytes(), self.raw)
    }
}

/// Appends the bytes `name` to a written graph (its table and raw section), as [`Writer::bytes`] would.
#[cfg_attr(not(feature = "cuda"), allow(dead_code, reason = "the CUDA kernels' entry"))]
pub(crate) fn append_bytes(table: &mut Vec<u8>, raw: &mut Vec<u8>, name: &str, bytes: &[u8]) {
    let at = raw.len().next_multiple_of(ALIGN);
    raw.resize(at, 0);
    raw.extend_from_slice(bytes);
    table.extend_from_slice(format!("b {name} {at} {}\n", bytes.len()).as_bytes());
}

enum Entry {
    Quantized {
        format: Format,
        unsigned: bool,
        rows: usize,
        cols: usize,
        scales: Range<usize>,
        mins: Range<usize>,
        quants: Range<usize>,
    },
    Dense {
        rows: usize,
        cols: usize,
        values: Range<usize>,
    },
    Vector {
        values: Range<usize>,
    },
    Stack {
        parts: usize,
    },
    Bytes {
        values: Range<usize>,
    },
}

/// A graph read: its configuration, and its weights where they lie.
pub(crate) struct Reader {
    pub(crate) config: Config,
    entries: HashMap<String, Entry>,
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
}

/// Parses `field` of a table line.
fn number<T: std::str::FromStr>(field: Option<&str>, line: &str) -> Result<T, String> {
    field.and_then(|field| field.parse().ok()).ok_or_else(|| format!("table line `{line}`: a bad number"))
}

impl Reader {
    /// Reads the table `table` of a graph whose raw section is `raw`; every range is checked to lie in
    /// it, aligned.
    pub(crate) fn read(table: &[u8], raw: &RawSection) -> Result<Self, String> {
        let owner = raw.owner().ok_or_else(|| "the graph has no raw section".to_owned())?;
        let len = raw.as_bytes().len();
        let table = std::str::from_utf8(table).map_err(|_| "the table is not text".to_owned())?;
        let mut lines = table.lines();
        if lines.next() != Some(MAGIC) {
            return Err(format!("not a table of schema {SCHEMA}"));
        }
        let mut config: HashMap<&str, &str> = HashMap::new();
        let mut entries = HashMap::new();
        let range = |at: usize, bytes: usize, line: &str| -> Result<Range<usize>, String> {
            match at.checked_add(bytes) {
                Some(end) if end <= len && at.is_multiple_of(ALIGN) => Ok(at..end),
                _ => Err(format!("table line `{line}`: outside the raw section of {len} bytes")),
            }
        };
        for line in lines {
            let mut fields = line.split(' ');
            match fields.next() {
                Some("config") => {
                    let (Some(key), Some(value), None) = (fields.next(), fields.next(), fields.next()) else {
                        return Err(format!("table line `{line}`"));
                    };
                    config.insert(key, value);
                }
                Some("s") => {
                    let (Some(name), Some(parts), None) = (fields.next(), fields.next(), fields.next()) else {
                        return Err(format!("table line `{line}`"));
                    };
                    let parts: usize = number(Some(parts), line)?;
                    if !(2..=16).contains(&parts) || entries.insert(name.to_owned(), Entry::Stack { parts }).is_some() {
                        return Err(format!("table line `{line}`: a stack of {parts}, or a name twice"));
                    }
                }
                Some(kind @ ("q" | "d" | "v" | "b")) => {
                    let name = fields.next().ok_or_else(|| format!("table line `{line}`"))?.to_owned();
                    let mut next = || fields.next();
                    let entry = match kind {
                        "q" => {
                            let format = next()
                                .and_then(Format::named)
                                .ok_or_else(|| format!("table line `{line}`: a bad format"))?;
                            let unsigned = number::<u8>(next(), line)? == 1;
                            let (rows, cols) = (number(next(), line)?, number(next(), line)?);
                            let scales = range(number(next(), line)?, number(next(), line)?, line)?;
                            let mins = range(number(next(), line)?, number(next(), line)?, line)?;
                            let quants = range(number(next(), line)?, number(next(), line)?, line)?;
                            Entry::Quantized { format, unsigned, rows, cols, scales, mins, quants }
                        }
                        "d" => {
                            let (rows, cols): (usize, usize) = (number(next(), line)?, number(next(), line)?);
                            let values = range(number(next(), line)?, number(next(), line)?, line)?;
                            if rows.checked_mul(cols).and_then(|count| count.checked_mul(4)) != Some(values.len()) {
                                return Err(format!("table line `{line}`: {} bytes for {rows} × {cols}", values.len()));
                            }
                            Entry::Dense { rows, cols, values }
                        }
                        "v" => Entry::Vector { values: range(number(next(), line)?, number(next(), line)?, line)? },
                        _ => Entry::Bytes { values: range(number(next(), line)?, number(next(), line)?, line)? },
                    };
                    if fields.next().is_some() || entries.insert(name, entry).is_some() {
                        return Err(format!("table line `{line}`: extra fields, or a name twice"));
                    }
                }
                _ => return Err(format!("table line `{line}`")),
            }
        }
        let field = |key: &str| config.get(key).copied().ok_or_else(|| format!("table: `config {key}` missing"));
        let count = |key: &str| -> Result<usize, String> { number(Some(field(key)?), key) };
        let real = |key: &str| -> Result<f32, String> {
            u32::from_str_radix(field(key)?, 16).map(f32::from_bits).map_err(|_| format!("table: `config {key}`"))
        };
        let token = |key: &str| -> Result<Option<u32>, String> {
            match field(key)? {
                "-" => Ok(None),
                id => number(Some(id), key).map(Some),
            }
        };
        let architecture = match field("architecture")? {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => return Err(format!("table: architecture `{other}`")),
        };
        let config = Config {
            architecture,
            dim: count("dim")?,
            layers: count("layers")?,
            heads: count("heads")?,
            kv_heads: count("kv_heads")?,
            head_dim: count("head_dim")?,
            ffn: count("ffn")?,
            context: count("context")?,
            vocab: count("vocab")?,
            rms_epsilon: real("rms_epsilon")?,
            rope_theta: real("rope_theta")?,
            rope_position_scale: real("rope_position_scale")?,
            tied_output: count("tied_output")? == 1,
            bos: token("bos")?,
            eos: token("eos")?,
        };
        // The bounds a GGUF file's configuration is read within (`config.rs`): every size computed from
        // them then stays far from overflowing.
        let within = |value: usize, limit: usize| (1..=limit).contains(&value);
        let token = |token: Option<u32>| token.is_none_or(|token| (token as usize) < config.vocab);
        let fits = within(config.dim, crate::config::MAX_WIDTH)
            && within(config.ffn, crate::config::MAX_WIDTH)
            && within(config.vocab, crate::config::MAX_VOCAB)
            && within(config.layers, crate::config::MAX_LAYERS)
            && within(config.context, crate::config::MAX_CONTEXT)
            && within(config.heads, config.dim)
            && within(config.kv_heads, config.heads)
            && config.heads.is_multiple_of(config.kv_heads)
            && config.dim.is_multiple_of(config.heads)
            && config.head_dim == config.dim / config.heads
            && config.head_dim.is_multiple_of(2)
            && token(config.bos)
            && token(config.eos);
        if !fits {
            return Err(format!("table: a configuration that does not hold: {config:?}"));
        }
        Ok(Self { config, entries, owner })
    }

    fn shared(&self, range: &Range<usize>) -> Quants {
        Quants::Shared { owner: Arc::clone(&self.owner), range: range.clone() }
    }

    /// The matrix `name`, of `rows` × `cols`, borrowed from the raw section.
    pub(crate) fn matrix(&self, name: &str, (rows, cols): (usize, usize), isa: Isa) -> Result<Matrix, String> {
        match self.entries.get(name) {
            Some(Entry::Quantized { format, unsigned, rows: r, cols: c, scales, mins, quants })
                if (*r, *c) == (rows, cols) =>
            {
                let parts = [self.shared(scales), self.shared(mins), self.shared(quants)];
                QMatrix::from_parts(*format, *unsigned, (rows, cols), parts, isa)
                    .map(Matrix::Quantized)
                    .map_err(|error| format!("`{name}`: {error}"))
            }
            Some(Entry::Dense { rows: r, cols: c, values }) if (*r, *c) == (rows, cols) => {
                Ok(Matrix::Dense(Dense::shared(rows, cols, self.shared(values))))
            }
            Some(Entry::Stack { parts }) => {
                let parts = (0..*parts)
                    .map(|index| {
                        let name = format!("{name}.{index}");
                        match self.entries.get(&name) {
                            // Whole groups of rows: a product's row ranges start at a group.
                            Some(Entry::Quantized { rows: r, cols: c, .. })
                                if *c == cols && r.is_multiple_of(ROWS) && *r <= rows =>
                            {
                                self.matrix(&name, (*r, *c), isa)
                            }
                            _ => Err(format!("table: no part `{name}` of whole groups of {cols}-wide rows")),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let stacked = Matrix::Stacked(parts);
                if stacked.rows() != rows {
                    return Err(format!("table: the stack `{name}` holds {} rows, not {rows}", stacked.rows()));
                }
                Ok(stacked)
            }
            _ => Err(format!("table: no matrix `{name}` of {rows} × {cols}")),
        }
    }

    /// The f32 vector `name` of `len` values (copied: norms and biases are small).
    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, String> {
        match self.entries.get(name) {
            Some(Entry::Vector { values }) if values.len() == len * 4 => {
                let bytes = &(*self.owner).as_ref()[values.clone()];
                Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            _ => Err(format!("table: no vector `{name}` of {len} values")),
        }
    }

    /// Where the bytes `name` (the vocabulary) lie in the raw section.
    pub(crate) fn bytes_range(&self, name: &str) -> Result<Range<usize>, String> {
        match self.entries.get(name) {
            Some(Entry::Bytes { values }) => Ok(values.clone()),
            _ => Err(format!("table: no bytes `{name}`")),
        }
    }

    /// Whether the table holds `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Bytes of the weights in the raw section.
    pub(crate) fn weight_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|entry| match entry {
                Entry::Quantized { scales, mins, quants, .. } => scales.len() + mins.len() + quants.len(),
                Entry::Dense { values, .. } | Entry::Vector { values } => values.len(),
                Entry::Stack { .. } | Entry::Bytes { .. } => 0,
            } as u64)
            .sum()
    }
}
