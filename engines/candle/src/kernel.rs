//! The quantized matrix-vector product of decoding, the one place the time goes.
//!
//! candle's own Q8_0 and Q4_0 kernels use AVX2 only when the whole program is compiled for it
//! (`-C target-cpu=native`); a default build gets their scalar loops, about ten times slower. These
//! kernels pick AVX2 (and AVX-512 VNNI's one-instruction dot products) at run time instead, so a
//! portable binary runs at full speed, and fall back to plain Rust elsewhere.
//!
//! The weights are repacked once at load, from GGUF blocks (an f16 scale, then 32 quants) into f16
//! scales and quants, rows interleaved by four (see [`QMatrix`]). The vector is quantized to Q8_0 for
//! each product (as llama.cpp does): each block is then an integer dot product of 32 pairs, scaled
//! once. The team of threads (`team.rs`) splits the rows.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::GgmlDType;
use usine_engine::EngineError;

pub(crate) use crate::shape::BLOCK;

/// How the quants of a matrix are stored, per block of 32 values (the K-quants' 256-value blocks are
/// repacked as eight of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// One signed byte per value and a scale (llama.cpp's Q8_0).
    Q8,
    /// Two values per byte: in each block of 16 bytes, the low nibbles hold values 0..16 and the high
    /// nibbles values 16..32, each offset by 8 (llama.cpp's Q4_0); a scale.
    Q4,
    /// Nibbles as [`Format::Q4`] but unsigned (0..=15), a scale and a min: value = d × sc × q − dmin × m,
    /// with 6-bit `sc` and `m` per block and f16 `d` and `dmin` per 8 blocks, as llama.cpp's Q4_K has
    /// them (products exact in f32).
    Q4Min,
    /// One unsigned byte per value (0..=31), a scale and a min as [`Format::Q4Min`] (llama.cpp's Q5_K).
    Q8Min,
    /// One signed byte per value (−32..=31) and a scale for each half of the block (llama.cpp's Q6_K,
    /// whose scales cover 16 values).
    Q8Half,
}

impl Format {
    /// The format of GGUF's `dtype`, where these kernels run it.
    pub(crate) fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8),
            GgmlDType::Q4_0 => Some(Self::Q4),
            GgmlDType::Q4K => Some(Self::Q4Min),
            GgmlDType::Q5K => Some(Self::Q8Min),
            GgmlDType::Q6K => Some(Self::Q8Half),
            _ => None,
        }
    }

    /// Bytes of quants per block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Self::Q8 | Self::Q8Min | Self::Q8Half => BLOCK,
            Self::Q4 | Self::Q4Min => BLOCK / 2,
        }
    }

    /// f16 scales per block of a row.
    pub(crate) fn scales_per_block(self) -> usize {
        if self == Self::Q8Half { 2 } else { 1 }
    }

    /// Whether each block has a min, subtracted after its scale.
    pub(crate) fn has_min(self) -> bool {
        matches!(self, Self::Q4Min | Self::Q8Min)
    }

    /// Its name in a compiled graph's table.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Q8 => "q8",
            Self::Q4 => "q4",
            Self::Q4Min => "q4m",
            Self::Q8Min => "q8m",
            Self::Q8Half => "q8h",
        }
    }

    /// The format a table names.
    pub(crate) fn named(name: &str) -> Option<Self> {
        [Self::Q8, Self::Q4, Self::Q4Min, Self::Q8Min, Self::Q8Half].into_iter().find(|format| format.name() == name)
    }
}

/// One block of 32 values as the formats store it: the quants (signed, or unsigned for the formats with
/// a min), and f32 scales before they are rounded to f16; for the formats with a min, the block's 6-bit
/// scale and min and its 256-value block's f16 `d` and `dmin` (bits) instead.
struct Block32 {
    quants: [i16; BLOCK],
    scales: [f32; 2],
    exact: (u8, u8, u16, u16),
}

/// Blocks of 32 values that share a K-quant's `d` and `dmin`.
pub(crate) const SUPER: usize = 8;

/// The blocks of 32 values of one row of GGUF `dtype` (`data` holds whole blocks of it).
fn blocks32(dtype: GgmlDType, data: &[u8]) -> Vec<Block32> {
    let f16 = |bytes: &[u8]| half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
    let mut blocks = Vec::new();
    match dtype {
        GgmlDType::Q8_0 => {
            for block in data.chunks_exact(34) {
                let scale = f16(block);
                #[expect(clippy::cast_possible_wrap, reason = "Q8_0's quants are signed bytes")]
                let quants = std::array::from_fn(|i| i16::from(block[2 + i] as i8));
                blocks.push(Block32 { quants, scales: [scale; 2], exact: (0, 0, 0, 0) });
            }
        }
        GgmlDType::Q4_0 => {
            for block in data.chunks_exact(18) {
                let scale = f16(block);
                let quants = std::array::from_fn(|i| {
                    let byte = block[2 + i % 16];
                    i16::from(if i < 16 { byte & 0x0F } else { byte >> 4 }) - 8
                });
                blocks.push(Block32 { quants, scales: [scale; 2], exact: (0, 0, 0, 0) });
            }
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let (stride, high_bits) = if dtype == GgmlDType::Q4K { (144, false) } else { (176, true) };
            for block in data.chunks_exact(stride) {
                let packed = &block[4..16];
                let bits = |at: usize| u16::from_le_bytes([block[at], block[at + 1]]);
                // Eight 6-bit scales and mins, packed in 12 bytes.
                let scale_min = |j: usize| -> (u8, u8) {
                    if j < 4 {
                        (packed[j] & 63, packed[j + 4] & 63)
                    } else {
                        (
                            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
                            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
                        )
                    }
                };
                let (high, low) =
                    if high_bits { (&block[16..48], &block[48..176]) } else { (&block[0..0], &block[16..144]) };
                for j in 0..8 {
                    // Values of sub-block j: the low nibbles of a 32-byte chunk for even j, the high for odd.
                    let (chunk, shift) = (&low[(j / 2) * 32..(j / 2) * 32 + 32], if j % 2 == 0 { 0 } else { 4 });
                    let quants = std::array::from_fn(|l| {
                        let nibble = i16::from((chunk[l] >> shift) & 0x0F);
                        let fifth = if high_bits && high[l] & (1 << j) != 0 { 16 } else { 0 };
                        nibble + fifth
                    });
                    let (scale, min) = scale_min(j);
                    blocks.push(Block32 {
                        quants,
                        scales: [0.0; 2], // kept exact in `exact` instead
                        exact: (scale, min, bits(0), bits(2)),
                    });
                }
            }
        }
        GgmlDType::Q6K => {
            for block in data.chunks_exact(210) {
                let (ql, qh, scales, d) = (&block[0..128], &block[128..192], &block[192..208], f16(&block[208..210]));
                #[expect(clippy::cast_possible_wrap, reason = "Q6_K's scales are signed bytes")]
                let scale = |index: usize| d * f32::from(scales[index] as i8);
                let mut values = [0_i16; 256];
                for half in 0..2 {
                    let (ql, qh) = (&ql[half * 64..half * 64 + 64], &qh[half * 32..half * 32 + 32]);
                    for l in 0..32 {
                        let at = half * 128 + l;
                        values[at] = i16::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                        values[at + 32] = i16::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                        values[at + 64] = i16::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                        values[at + 96] = i16::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    }
                }
                for j in 0..8 {
                    let quants = std::array::from_fn(|l| values[j * 32 + l]);
                    blocks.push(Block32 { quants, scales: [scale(2 * j), scale(2 * j + 1)], exact: (0, 0, 0, 0) });
                }
            }
        }
        _ => {}
    }
    blocks
}

/// The environment variable that caps the kernels' instructions: `portable`, `avx2` or `avx512vnni`
/// (read once per process). Unset or empty: the best this CPU runs.
pub const ISA_VARIABLE: &str = "USINE_ISA";

/// A set of instructions the kernels are written for, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Plain Rust.
    Portable,
    /// AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2, FMA, F16C, and AVX-512 VNNI on 256-bit registers (`vpdpbusd`).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Isa {
    /// Its name, as [`ISA_VARIABLE`] takes it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => "avx512vnni",
        }
    }

    /// Every set compiled into this build, lowest first.
    fn all() -> Vec<Self> {
        let mut all = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        all.extend([Self::Avx2, Self::Avx512Vnni]);
        all
    }

    /// The best this CPU runs.
    fn hardware() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            if avx2
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Self::Avx512Vnni;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// The kernels the engine uses: the best this CPU runs, or the lower set [`ISA_VARIABLE`] names.
    /// A set this CPU lacks, or an unknown name, is an error (the same one on every call).
    pub(crate) fn chosen() -> Result<Self, EngineError> {
        static CHOSEN: OnceLock<Result<Isa, EngineError>> = OnceLock::new();
        CHOSEN
            .get_or_init(|| {
                let setting = std::env::var_os(ISA_VARIABLE).map(|value| value.to_string_lossy().into_owned());
                Self::choose(setting.as_deref(), Self::hardware())
            })
            .clone()
    }

    /// `setting` (a name, or unset or empty for no cap) checked against the best set `hardware` runs.
    fn choose(setting: Option<&str>, hardware: Self) -> Result<Self, EngineError> {
        let Some(name) = setting.filter(|name| !name.is_empty()) else {
            return Ok(hardware);
        };
        match Self::all().into_iter().find(|isa| isa.name() == name) {
            Some(isa) if isa <= hardware => Ok(isa),
            _ => Err(EngineError::InvalidParams {
                name: ISA_VARIABLE,
                value: name.to_owned(),
                limit: format!(
                    "the kernels this CPU runs ({})",
                    Self::all()
                        .into_iter()
                        .filter(|isa| *isa <= hardware)
                        .map(Self::name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }

    /// [`Self::chosen`], or the portable kernels where the setting is refused (the engine's load
    /// returns that error before it builds a model, so a model never gets here with a bad setting).
    pub(crate) fn detect() -> Self {
        Self::chosen().unwrap_or(Self::Portable)
    }

    /// Whether this CPU runs these kernels.
    fn runs_here(self) -> bool {
        self <= Self::hardware()
    }

    /// Every kernel this CPU can run, the portable one first, whatever [`ISA_VARIABLE`] says (for tests).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        Self::all().into_iter().filter(|isa| isa.runs_here()).collect()
    }
}

/// A tensor as GGUF stores it: its type, its rows and columns, and its bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Raw<'a> {
    pub(crate) dtype: GgmlDType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: &'a [u8],
}

/// Rows interleaved in a [`QMatrix`], and computed together.
pub(crate) const ROWS: usize = 4;

/// A quantized matrix, repacked for the kernels: `rows` × `cols`, its rows in groups of [`ROWS`]
/// (the last padded with zeros), each group's blocks interleaved — block 0 of its four rows, then
/// block 1 of each, and so on — so that a group is read as one sequential stream (four rows read side
/// by side from four places would be four streams, which the prefetchers follow badly).
#[derive(Debug, Clone)]
pub(crate) struct QMatrix {
    rows: usize,
    cols: usize,
    format: Format,
    /// Per group, per block, the scale of each of its rows: f16 bits, as GGUF has them (f32 would
    /// add a tenth to the bytes a Q4_0 product reads, and reading is what takes the time), as
    /// borrowed from a graph's raw section where it lies or owned; two per block for
    /// [`Format::Q8Half`] (each group-block's: the four rows' first halves, then their second).
    scales: Scales,
    /// For the formats with a min: per group, per 8 blocks, the `d` of each of its rows, then their
    /// `dmin` (f16 bits); their blocks' 6-bit `sc` and `m` are in `scales` (`sc | m << 8`).
    mins: Scales,
    /// Per group, per block, the quants of each of its rows (`format.block_bytes()` each).
    quants: Quants,
    isa: Isa,
}

impl QMatrix {
    /// Repacks GGUF tensors of shapes `[rows_i, cols]` (all Q8_0 or all Q4_0) as one matrix, their
    /// rows one after the other: stacked projections of the same vector take one product.
    #[cfg(test)]
    pub(crate) fn from_qtensors(parts: &[&candle_core::quantized::QTensor], isa: Isa) -> candle_core::Result<Self> {
        let data: Vec<_> = parts.iter().map(|part| part.data()).collect::<Result<_, _>>()?;
        let raw = parts
            .iter()
            .zip(&data)
            .map(|(part, data)| {
                let (rows, cols) = part.shape().dims2()?;
                Ok(Raw { dtype: part.dtype(), rows, cols, data })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Self::from_raw(&raw, isa)
    }

    /// Repacks GGUF tensors (all Q8_0 or all Q4_0, of one width) as one matrix, their rows one after
    /// the other: stacked projections of the same vector take one product.
    pub(crate) fn from_raw(parts: &[Raw<'_>], isa: Isa) -> candle_core::Result<Self> {
        // The kernels' safety rests on this: a matrix is only ever built for instructions this CPU has.
        if !isa.runs_here() {
            candle_core::bail!("this CPU does not run the {isa:?} kernels");
        }
        let first = parts.first().ok_or_else(|| candle_core::Error::Msg("no matrix".to_owned()))?;
        let format = Format::of(first.dtype).ok_or_else(|| {
            candle_core::Error::Msg(format!("{:?} matrices have no kernel (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)", first.dtype))
        })?;
        let cols = first.cols;
        if !cols.is_multiple_of(BLOCK) {
            candle_core::bail!("{cols} columns: not a multiple of the {BLOCK}-value block");
        }
        let mut rows = 0;
        for part in parts {
            if part.dtype != first.dtype || part.cols != cols {
                candle_core::bail!("stacked matrices differ in width or format");
            }
            rows += part.rows;
        }
        let (per_row, block_bytes, halves) = (cols / BLOCK, format.block_bytes(), format.scales_per_block());
        let padded = rows.next_multiple_of(ROWS);
        let mut scales = vec![0_u16; padded * per_row * halves];
        if format.has_min() && !per_row.is_multiple_of(SUPER) {
            candle_core::bail!("{cols} columns: not whole blocks of {} values", SUPER * BLOCK);
        }
        let mut mins = vec![0_u16; if format.has_min() { padded * per_row / SUPER * 2 } else { 0 }];
        let mut quants = vec![0; padded * per_row * block_bytes];
        // Signed Q8 quants become unsigned (+128) where the kernel multiplies unsigned by signed bytes.
        let flip = if bias(isa, format) == 128 { 0x80 } else { 0 };
        let source_bytes = first.dtype.type_size() * cols / first.dtype.block_size();
        let f16 = |value: f32| half::f16::from_f32(value).to_bits();
        let mut row = 0;
        for part in parts {
            if part.data.len() != part.rows * source_bytes {
                candle_core::bail!("{} bytes for {} rows of {source_bytes}", part.data.len(), part.rows);
            }
            for row_data in part.data.chunks_exact(source_bytes) {
                let (group, lane) = (row / ROWS, row % ROWS);
                for (block, decoded) in blocks32(first.dtype, row_data).into_iter().enumerate() {
                    let at = (group * per_row + block) * ROWS + lane;
                    if format.has_min() {
                        let (sc, m, d, dmin) = decoded.exact;
                        scales[at] = u16::from(sc) | (u16::from(m) << 8);
                        let first = ((group * (per_row / SUPER) + block / SUPER) * 2) * ROWS + lane;
                        (mins[first], mins[first + ROWS]) = (d, dmin);
                    } else {
                        // Q8_0 and Q4_0 keep GGUF's f16 scale as it is: the same bits back.
                        for (half, scale) in decoded.scales.iter().take(halves).enumerate() {
                            scales[((group * per_row + block) * halves + half) * ROWS + lane] = f16(*scale);
                        }
                    }
                    let stored = &mut quants[at * block_bytes..(at + 1) * block_bytes];
                    match format {
                        Format::Q4 | Format::Q4Min => {
                            let offset = if format == Format::Q4 { 8 } else { 0 };
                            for (j, byte) in stored.iter_mut().enumerate() {
                                #[expect(clippy::cast_sign_loss, clippy::cast_possible_truncation, reason = "nibbles")]
                                let nibble = |value: i16| (value + offset) as u8 & 0x0F;
                                *byte = nibble(decoded.quants[j]) | (nibble(decoded.quants[j + 16]) << 4);
                            }
                        }
                        Format::Q8 | Format::Q8Min | Format::Q8Half => {
                            for (byte, value) in stored.iter_mut().zip(decoded.quants) {
                                #[expect(clippy::cast_sign_loss, clippy::cast_possible_truncation, reason = "a byte")]
                                let byte_value = value as i8 as u8;
                                *byte = byte_value ^ flip;
                            }
                        }
                    }
                }
                row += 1;
            }
        }
        Ok(Self {
            rows,
            cols,
            format,
            scales: Scales::Owned(scales),
            mins: Scales::Owned(mins),
            quants: Quants::Owned(quants),
            isa,
        })
    }

    /// The scales, as f16 bits.
    fn scales(&self) -> &[u16] {
        self.scales.get()
    }

    /// The mins, as f16 bits (none for the formats without).
    fn mins(&self) -> &[u16] {
        self.mins.get()
    }

    /// The matrix's layout and bytes, to write into a compiled graph: its format, whether its Q8
    /// quants are stored unsigned, its rows and columns, its scales and mins (f16 bits) and its quants.
    pub(crate) fn parts(&self) -> (Format, bool, usize, usize, &[u16], &[u16], &[u8]) {
        let unsigned = bias(self.isa, self.format) == 128;
        (self.format, unsigned, self.rows, self.cols, self.scales(), self.mins(), self.quants.bytes())
    }

    /// A matrix whose scales, mins and quants are `scales`, `mins` and `quants` (of a compiled graph's
    /// raw section), for `isa`; quants stored `unsigned` (or not) are flipped into a copy where `isa`
    /// wants the other. Lengths are checked against the dimensions.
    pub(crate) fn from_parts(
        format: Format,
        unsigned: bool,
        (rows, cols): (usize, usize),
        [scales, mins, quants]: [Quants; 3],
        isa: Isa,
    ) -> Result<Self, String> {
        if !isa.runs_here() {
            return Err(format!("this CPU does not run the {isa:?} kernels"));
        }
        if !cols.is_multiple_of(BLOCK) || rows == 0 || (format.has_min() && !cols.is_multiple_of(BLOCK * SUPER)) {
            return Err(format!("a {format:?} matrix of {rows} × {cols}"));
        }
        // Checked: the dimensions come from a table that may be damaged.
        let blocks = rows.checked_next_multiple_of(ROWS).and_then(|rows| rows.checked_mul(cols / BLOCK));
        let bytes = |per_block: usize| blocks.and_then(|blocks| blocks.checked_mul(per_block));
        let expected = [
            bytes(2 * format.scales_per_block()),
            if format.has_min() { blocks.map(|blocks| blocks / SUPER * 2 * 2) } else { Some(0) },
            bytes(format.block_bytes()),
        ];
        if [Some(scales.bytes().len()), Some(mins.bytes().len()), Some(quants.bytes().len())] != expected {
            return Err(format!("a {rows} × {cols} matrix's bytes do not match its dimensions"));
        }
        let wanted = bias(isa, format) == 128;
        if unsigned && !matches!(format, Format::Q8 | Format::Q8Half) {
            return Err(format!("{format:?} quants are never stored flipped"));
        }
        let quants = if wanted != unsigned {
            Quants::Owned(quants.bytes().iter().map(|quant| quant ^ 0x80).collect())
        } else {
            quants
        };
        Ok(Self { rows, cols, format, scales: Scales::borrow(scales), mins: Scales::borrow(mins), quants, isa })
    }

    /// Rows of the matrix.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of its scales and quants.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        ((self.scales().len() + self.mins().len()) * 2 + self.quants.bytes().len()) as u64
    }

    /// Row `row`, dequantized (an embedding looked up): the values the blocks hold.
    pub(crate) fn row(&self, row: usize) -> Vec<f32> {
        assert!(row < self.rows, "row {row} of {}", self.rows);
        let (group, lane, per_row) = (row / ROWS, row % ROWS, self.cols / BLOCK);
        let (block_bytes, halves) = (self.format.block_bytes(), self.format.scales_per_block());
        #[expect(clippy::cast_possible_truncation, reason = "0 or 128: a byte")]
        let flip = bias(self.isa, self.format) as u8 & 0x80;
        let f32_of = |bits: u16| half::f16::from_bits(bits).to_f32();
        let mut values = Vec::with_capacity(self.cols);
        for block in 0..per_row {
            let at = (group * per_row + block) * ROWS + lane;
            let (scale, min) = if self.format.has_min() {
                let packed = self.scales()[at];
                let first = ((group * (per_row / SUPER) + block / SUPER) * 2) * ROWS + lane;
                let (d, dmin) = (f32_of(self.mins()[first]), f32_of(self.mins()[first + ROWS]));
                (d * f32::from(packed & 0xFF), dmin * f32::from(packed >> 8))
            } else {
                (0.0, 0.0)
            };
            let scale = |half: usize| {
                if self.format.has_min() {
                    scale
                } else {
                    f32_of(self.scales()[((group * per_row + block) * halves + half) * ROWS + lane])
                }
            };
            let quants = &self.quants.bytes()[at * block_bytes..(at + 1) * block_bytes];
            let value = |index: usize, quant: i16| f32::from(quant) * scale(index * halves / BLOCK) - min;
            match self.format {
                Format::Q8 | Format::Q8Min | Format::Q8Half => {
                    #[expect(clippy::cast_possible_wrap, reason = "signed bytes, once unflipped")]
                    let quant = |byte: u8| i16::from((byte ^ flip) as i8);
                    values.extend(quants.iter().enumerate().map(|(index, byte)| value(index, quant(*byte))));
                }
                Format::Q4 | Format::Q4Min => {
                    let offset = if self.format == Format::Q4 { 8 } else { 0 };
                    let nibble = |quant: u8| i16::from(quant) - offset;
                    values.extend(quants.iter().enumerate().map(|(index, byte)| value(index, nibble(byte & 0x0F))));
                    values.extend(quants.iter().enumerate().map(|(index, byte)| value(index + 16, nibble(byte >> 4))));
                }
            }
        }
        values
    }

    /// `out = self · x`.
    #[cfg(test)]
    pub(crate) fn matvec(&self, x: &[f32], out: &mut [f32]) {
        self.matvec_rows(x, 0, out);
    }

    /// Rows `first..first + out.len()` of `self · x`; `first` starts a group of [`ROWS`].
    #[cfg(test)]
    pub(crate) fn matvec_rows(&self, x: &[f32], first: usize, out: &mut [f32]) {
        assert_eq!(x.len(), self.cols, "a vector of {} values for {} columns", x.len(), self.cols);
        self.matvec_quantized([&self.quantize(x)], first, [out]);
    }

    /// `x` quantized for this matrix's products (once, for products with several tiles of rows).
    pub(crate) fn quantize(&self, x: &[f32]) -> Quantized {
        // The K-quants' vectors in blocks of 256 values, as llama.cpp quantizes them for these products:
        // finer blocks would be more exact, and further from it (measured by `cargo xtask parity`).
        let span = if self.format == Format::Q8 || self.format == Format::Q4 { BLOCK } else { BLOCK * SUPER };
        let bias = bias(self.isa, self.format);
        #[cfg(target_arch = "x86_64")]
        if self.isa != Isa::Portable && x.len().is_multiple_of(span) {
            // SAFETY: both SIMD sets include AVX2 and FMA, and the matrix was built for one this CPU
            // runs; the length is whole spans of whole blocks.
            #[allow(unsafe_code, reason = "the AVX2 quantizer, on a CPU checked to have it")]
            return unsafe { x86::quantize(x, bias, span) };
        }
        Quantized::new(x, bias, span)
    }

    /// Rows `first..first + outs[i].len()` of `self · vectors[i]`, for `N` vectors already quantized by
    /// [`quantize`](Self::quantize) (two for a prompt's products: each block of weights is read once for
    /// both, and each out is what one vector alone gets, to the bit).
    pub(crate) fn matvec_quantized<const N: usize>(
        &self,
        vectors: [&Quantized; N],
        first: usize,
        outs: [&mut [f32]; N],
    ) {
        for vector in vectors {
            let values = vector.quants.len();
            assert_eq!(values, self.cols, "a vector of {values} values for {} columns", self.cols);
        }
        let len = outs.first().map_or(0, |out| out.len());
        assert!(first.is_multiple_of(ROWS) && first + len <= self.rows, "rows {first}.. of {}", self.rows);
        if len == 0 {
            return;
        }
        let per_group = self.cols / BLOCK * ROWS;
        let groups = first / ROWS..(first + len).div_ceil(ROWS);
        let halves = self.format.scales_per_block();
        let scales = &self.scales()[groups.start * per_group * halves..groups.end * per_group * halves];
        let per_group_mins = self.cols / BLOCK / SUPER * 2 * ROWS;
        let mins = if self.format.has_min() {
            &self.mins()[groups.start * per_group_mins..groups.end * per_group_mins]
        } else {
            &[]
        };
        let block_bytes = self.format.block_bytes();
        let quants = &self.quants.bytes()[groups.start * per_group * block_bytes..groups.end * per_group * block_bytes];
        rows_dot(self.isa, self.format, [scales, mins], quants, vectors, outs);
    }
}

/// Bytes of a matrix (its scales, its quants): its own allocation while it is built, then a model's
/// arena, or a compiled graph's raw section where they lie (its file's mapping).
#[derive(Clone)]
pub(crate) enum Quants {
    Owned(Vec<u8>),
    Shared { owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize> },
}

impl std::fmt::Debug for Quants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quants").field("len", &self.bytes().len()).finish()
    }
}

impl Quants {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Self::Owned(bytes) => bytes,
            Self::Shared { owner, range } => &(**owner).as_ref()[range.clone()],
        }
    }
}

/// A matrix's scales (or mins): its own while it is built, or 2-aligned bytes of a graph's raw section.
#[derive(Debug, Clone)]
enum Scales {
    Owned(Vec<u16>),
    Shared(Quants),
}

impl Scales {
    /// `bytes`, borrowed where 2-aligned (a raw section places them so; a file read into memory rather
    /// than mapped may not be), else read into a copy.
    fn borrow(bytes: Quants) -> Self {
        match bytemuck::try_cast_slice::<u8, u16>(bytes.bytes()) {
            Ok(_) => Self::Shared(bytes),
            Err(_) => Self::Owned(bytes.bytes().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()),
        }
    }

    fn get(&self) -> &[u16] {
        match self {
            Self::Owned(scales) => scales,
            Self::Shared(bytes) => {
                bytemuck::try_cast_slice(bytes.bytes()).expect("2-aligned: checked when the matrix was built")
            }
        }
    }
}

/// The anonymous mapping of [`share_arena`], as bytes.
struct Arena(memmap2::MmapMut);

impl AsRef<[u8]> for Arena {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Moves the quants of `matrices` into one anonymous mapping that asks the system for huge pages
/// (2 MB). A product streams through megabytes of quants: on 4 KB pages the processor's prefetcher
/// stops at every page and each page costs a translation. (Where the system gives no huge pages, or
/// refuses the advice, the mapping works as ordinary memory.)
pub(crate) fn share_arena(matrices: &mut [&mut QMatrix]) -> std::io::Result<()> {
    let total: usize = matrices.iter().map(|matrix| matrix.quants.bytes().len()).sum();
    let mut arena = memmap2::MmapMut::map_anon(total.max(1))?;
    #[cfg(target_os = "linux")]
    let _ = arena.advise(memmap2::Advice::HugePage);
    let mut ranges = Vec::with_capacity(matrices.len());
    let mut at = 0;
    for matrix in matrices.iter() {
        let bytes = matrix.quants.bytes();
        arena[at..at + bytes.len()].copy_from_slice(bytes);
        ranges.push(at..at + bytes.len());
        at += bytes.len();
    }
    let arena: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(Arena(arena));
    for (matrix, range) in matrices.iter_mut().zip(ranges) {
        matrix.quants = Quants::Shared { owner: Arc::clone(&arena), range };
    }
    Ok(())
}

/// A vector quantized to Q8_0 for one product: a scale and 32 signed bytes per block, and for each
/// block the sums of its values in groups of 4 (the 8 lanes of a SIMD dot product), which turn a
/// product with unsigned quants back into the signed one.
pub(crate) struct Quantized {
    scales: Vec<f32>,
    /// Per block, its scale times the sum of its quants: the block's sum, for the formats' mins.
    sums: Vec<f32>,
    quants: Vec<i8>,
    /// Per block, 8 lanes: the sum of values 4l..4l+4, times minus the bias of the weights' unsigned
    /// quants (8 for Q4; 128 for Q8 stored unsigned).
    corrections: Vec<i32>,
}

impl Quantized {
    /// `x` quantized with one scale per `span` values (32, as Q8_0; or 256, as llama.cpp's Q8_K for its
    /// K-quant products, which it then matches), repeated for each block of 32 the kernels take.
    pub(crate) fn new(x: &[f32], bias: i32, span: usize) -> Self {
        let mut scales = Vec::with_capacity(x.len() / BLOCK);
        let mut quants = Vec::with_capacity(x.len());
        let span_largest: Vec<f32> =
            x.chunks(span).map(|part| part.iter().fold(0.0_f32, |largest, value| largest.max(value.abs()))).collect();
        for (index, block) in x.chunks_exact(BLOCK).enumerate() {
            let largest = span_largest[index * BLOCK / span];
            let scale = largest / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            scales.push(scale);
            // Rounded half away from zero, as `round` does, but by a truncating conversion: `round` is a
            // library call on CPUs without SSE4.1's rounding instruction (the default target).
            #[expect(clippy::cast_possible_truncation, reason = "rounded into -127..=127 by construction")]
            quants.extend(block.iter().map(|value| {
                let scaled = value * inverse;
                (scaled + 0.5_f32.copysign(scaled)) as i8
            }));
        }
        let corrections = quants
            .chunks_exact(4)
            .map(|lane| -bias * lane.iter().map(|value| i32::from(*value)).sum::<i32>())
            .collect();
        #[expect(clippy::cast_precision_loss, reason = "at most 32 × 127: exact in f32")]
        let sums = quants
            .chunks_exact(BLOCK)
            .zip(&scales)
            .map(|(block, scale)| block.iter().map(|value| i32::from(*value)).sum::<i32>() as f32 * scale)
            .collect();
        Self { scales, sums, quants, corrections }
    }
}

/// Each of `outs`' rows: the dot product of that row of blocks (`scales` and `mins`, `quants`) with its
/// vector (one vector for a decode step, two at once for a prompt: each out the same to the bit).
#[allow(unsafe_code, reason = "calls the SIMD kernels for the instructions found on this CPU")]
fn rows_dot<const N: usize>(
    isa: Isa,
    format: Format,
    [scales, mins]: [&[u16]; 2],
    quants: &[u8],
    vectors: [&Quantized; N],
    outs: [&mut [f32]; N],
) {
    let per_row = vectors[0].scales.len();
    // The lengths every kernel relies on (the SIMD ones read whole blocks through pointers): whole
    // groups of rows, the last perhaps partly in the outs.
    assert!(outs.iter().all(|out| out.len() == outs[0].len()));
    let blocks = outs[0].len().div_ceil(ROWS) * ROWS * per_row;
    assert_eq!(scales.len(), blocks * format.scales_per_block());
    assert_eq!(mins.len(), if format.has_min() { blocks / SUPER * 2 } else { 0 });
    assert!(!format.has_min() || per_row.is_multiple_of(SUPER));
    assert_eq!(quants.len(), blocks * format.block_bytes());
    for vector in vectors {
        assert_eq!((vector.quants.len(), vector.corrections.len()), (per_row * BLOCK, per_row * 8));
    }
    match isa {
        Isa::Portable => {
            for (vector, out) in vectors.into_iter().zip(outs) {
                portable::rows_dot(format, [scales, mins], quants, vector, out);
            }
        }
        // SAFETY: the matrix was built for an `Isa` this CPU runs (`from_parts` and `from_raw` check
        // it), and the lengths are checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe {
            match format {
                Format::Q8 => x86::rows_q8_avx2(scales, mins, quants, vectors, outs),
                Format::Q4 => x86::rows_q4_avx2(scales, mins, quants, vectors, outs),
                Format::Q4Min => x86::rows_q4m_avx2(scales, mins, quants, vectors, outs),
                Format::Q8Min => x86::rows_q8m_avx2(scales, mins, quants, vectors, outs),
                Format::Q8Half => x86::rows_q8h_avx2(scales, mins, quants, vectors, outs),
            }
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe {
            match format {
                Format::Q8 => x86::rows_q8_vnni(scales, mins, quants, vectors, outs),
                Format::Q4 => x86::rows_q4_vnni(scales, mins, quants, vectors, outs),
                Format::Q4Min => x86::rows_q4m_vnni(scales, mins, quants, vectors, outs),
                Format::Q8Min => x86::rows_q8m_vnni(scales, mins, quants, vectors, outs),
                Format::Q8Half => x86::rows_q8h_vnni(scales, mins, quants, vectors, outs),
            }
        },
    }
}

/// The bias of a matrix's stored quants: they are signed bytes minus it, as unsigned bytes. Q4's
/// nibbles are stored as they come (values + 8); signed Q8 quants are stored + 128 for VNNI, whose dot
/// product multiplies unsigned bytes by signed ones; the formats with a min store unsigned values.
fn bias(isa: Isa, format: Format) -> i32 {
    match (format, isa) {
        (Format::Q4, _) => 8,
        #[cfg(target_arch = "x86_64")]
        (Format::Q8 | Format::Q8Half, Isa::Avx512Vnni) => 128,
        (Format::Q8 | Format::Q8Half | Format::Q4Min | Format::Q8Min, _) => 0,
    }
}

mod portable {
    use super::{BLOCK, Format, Quantized, ROWS, SUPER};

    pub(super) fn rows_dot(
        format: Format,
        [scales, mins]: [&[u16]; 2],
        quants: &[u8],
        vector: &Quantized,
        out: &mut [f32],
    ) {
        let per_row = vector.scales.len();
        let (block_bytes, halves) = (format.block_bytes(), format.scales_per_block());
        let f32_of = |bits: u16| half::f16::from_bits(bits).to_f32();
        for (row, out) in out.iter_mut().enumerate() {
            let (group, lane) = (row / ROWS, row % ROWS);
            let (mut sum, mut subtracted) = (0.0_f32, 0.0_f32);
            for block in 0..per_row {
                let at = (group * per_row + block) * ROWS + lane;
                let weights = &quants[at * block_bytes..(at + 1) * block_bytes];
                let values = &vector.quants[block * BLOCK..(block + 1) * BLOCK];
                // The integer dot product of each half of the block (one scale for both but for Q8Half).
                #[expect(clippy::cast_possible_wrap, reason = "Q8 quants are signed bytes")]
                let product = |index: usize| -> i32 {
                    let value = i32::from(values[index]);
                    match format {
                        Format::Q8 | Format::Q8Half | Format::Q8Min => i32::from(weights[index] as i8) * value,
                        Format::Q4 | Format::Q4Min => {
                            let offset = if format == Format::Q4 { 8 } else { 0 };
                            let byte = weights[index % 16];
                            let nibble = if index < 16 { byte & 0x0F } else { byte >> 4 };
                            (i32::from(nibble) - offset) * value
                        }
                    }
                };
                let exact = format.has_min().then(|| {
                    let first = ((group * (per_row / SUPER) + block / SUPER) * 2) * ROWS + lane;
                    let (d, dmin) = (f32_of(mins[first]), f32_of(mins[first + ROWS]));
                    (d * f32::from(scales[at] & 0xFF), dmin * f32::from(scales[at] >> 8))
                });
                for half in 0..halves {
                    let span = BLOCK / halves;
                    let dot: i32 = (half * span..(half + 1) * span).map(product).sum();
                    let scale = exact.map_or_else(
                        || f32_of(scales[((group * per_row + block) * halves + half) * ROWS + lane]),
                        |(scale, _)| scale,
                    );
                    #[expect(clippy::cast_precision_loss, reason = "at most 32 × 127 × 128: exact in f32")]
                    let dot = dot as f32;
                    sum += dot * scale * vector.scales[block];
                }
                if let Some((_, min)) = exact {
                    subtracted += min * vector.sums[block];
                }
            }
            *out = sum - subtracted;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, reason = "SIMD loads and functions compiled for instructions found at run time")]
mod x86 {
    //! Each kernel is `unsafe` to call: the CPU must have its features (`QMatrix::from_qtensors` checks), and
    //! `rows_dot`'s checked lengths must hold (`scales`: a row of blocks per output, `quants`: theirs,
    //! the vector: a row's worth). Every load then reads whole blocks inside those slices.
    //!
    //! Four rows go at once: the vector's block is loaded once for them, and their four sums are
    //! independent chains the CPU overlaps. A block's integer dot product lands in 8 lanes of 4
    //! products; its two scales multiply it once, into a float accumulator per row.

    use std::arch::x86_64::{
        __m256, __m256i, _MM_HINT_T1, _mm_add_ps, _mm_add_ss, _mm_and_si128, _mm_cvtepi32_ps, _mm_cvtepu16_epi32,
        _mm_cvtph_ps, _mm_cvtss_f32, _mm_fmadd_ps, _mm_loadl_epi64, _mm_loadu_si128, _mm_movehdup_ps, _mm_movehl_ps,
        _mm_mul_ps, _mm_prefetch, _mm_set1_epi32, _mm_set1_ps, _mm_setzero_ps, _mm_srli_epi16, _mm_srli_epi32,
        _mm_storeu_ps, _mm256_add_epi32, _mm256_and_si256, _mm256_castps128_ps256, _mm256_castps256_ps128,
        _mm256_castsi128_si256, _mm256_cvtepi32_ps, _mm256_cvtph_ps, _mm256_dpbusd_epi32, _mm256_extractf128_ps,
        _mm256_fmadd_ps, _mm256_insertf128_si256, _mm256_loadu_si256, _mm256_madd_epi16, _mm256_maddubs_epi16,
        _mm256_mul_ps, _mm256_permutevar8x32_ps, _mm256_set1_epi8, _mm256_set1_epi16, _mm256_set1_ps,
        _mm256_setr_epi32, _mm256_setzero_ps, _mm256_sign_epi8,
    };

    use super::{BLOCK, Quantized, ROWS, SUPER};

    /// [`Quantized::new`] on AVX2, the same to the bit: each step is the same IEEE operation on each
    /// value (the largest magnitude, the scale and its inverse, a product, a half away from zero added,
    /// a truncation), and the sums are of integers. A vector was quantized for every matrix product, by
    /// every thread: 6 % of a 16-stream decode's profile, in scalar code.
    ///
    /// The caller checks the CPU and that `x` is whole spans of whole blocks.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize(x: &[f32], bias: i32, span: usize) -> Quantized {
        use std::arch::x86_64::{
            _mm_max_ps, _mm_max_ss, _mm256_add_ps, _mm256_and_ps, _mm256_andnot_ps, _mm256_cvttps_epi32,
            _mm256_hadd_epi32, _mm256_loadu_ps, _mm256_max_ps, _mm256_mullo_epi32, _mm256_or_ps, _mm256_packs_epi16,
            _mm256_packs_epi32, _mm256_permutevar8x32_epi32, _mm256_set1_epi32, _mm256_storeu_si256,
        };
        let blocks = x.len() / BLOCK;
        let mut scales = Vec::with_capacity(blocks);
        let mut sums = Vec::with_capacity(blocks);
        let mut quants = vec![0_i8; x.len()];
        let mut corrections = vec![0_i32; blocks * 8];
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        // The groups of four back in order after two horizontal additions, and the bytes after packing.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let minus_bias = _mm256_set1_epi32(-bias);
        for (span_index, part) in x.chunks_exact(span).enumerate() {
            let mut largest = _mm256_setzero_ps();
            for eight in part.chunks_exact(8) {
                // SAFETY: eight floats.
                let values = unsafe { _mm256_loadu_ps(eight.as_ptr()) };
                largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign, values));
            }
            let high = _mm256_extractf128_ps::<1>(largest);
            let four = _mm_max_ps(high, _mm256_castps256_ps128(largest));
            let two = _mm_max_ps(four, _mm_movehl_ps(four, four));
            let largest = _mm_cvtss_f32(_mm_max_ss(two, _mm_movehdup_ps(two)));
            let scale = largest / 127.0;
            let inverse = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            for (index, block) in part.chunks_exact(BLOCK).enumerate() {
                let block_index = span_index * (span / BLOCK) + index;
                let quantized: [__m256i; 4] = std::array::from_fn(|eighth| {
                    // SAFETY: a block is 32 floats.
                    let values = unsafe { _mm256_loadu_ps(block.as_ptr().add(eighth * 8)) };
                    let scaled = _mm256_mul_ps(values, inverse);
                    let rounded = _mm256_add_ps(scaled, _mm256_or_ps(half, _mm256_and_ps(sign, scaled)));
                    _mm256_cvttps_epi32(rounded)
                });
                let bytes = _mm256_permutevar8x32_epi32(
                    _mm256_packs_epi16(
                        _mm256_packs_epi32(quantized[0], quantized[1]),
                        _mm256_packs_epi32(quantized[2], quantized[3]),
                    ),
                    order,
                );
                let fours = _mm256_permutevar8x32_epi32(
                    _mm256_hadd_epi32(
                        _mm256_hadd_epi32(quantized[0], quantized[1]),
                        _mm256_hadd_epi32(quantized[2], quantized[3]),
                    ),
                    order,
                );
                // SAFETY: 32 bytes and 8 integers of this block's, inside the vectors made above.
                unsafe {
                    _mm256_storeu_si256(quants.as_mut_ptr().add(block_index * BLOCK).cast(), bytes);
                    _mm256_storeu_si256(
                        corrections.as_mut_ptr().add(block_index * 8).cast(),
                        _mm256_mullo_epi32(fours, minus_bias),
                    );
                }
                let mut lanes = [0_i32; 8];
                // SAFETY: eight integers into eight.
                unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), fours) };
                #[expect(clippy::cast_precision_loss, reason = "at most 32 × 127: exact in f32")]
                sums.push(lanes.iter().sum::<i32>() as f32 * scale);
                scales.push(scale);
            }
        }
        Quantized { scales, sums, quants, corrections }
    }

    /// How far ahead the kernels prefetch, in blocks: 1 to 2 KB, into L2 (into L1, or 32 blocks ahead,
    /// measured slower at 58 M parameters).
    const PREFETCH: usize = 64;

    /// The sum of the 8 lanes.
    #[target_feature(enable = "avx2")]
    fn sum_lanes(x: __m256) -> f32 {
        let high = _mm256_extractf128_ps::<1>(x);
        let sum = _mm_add_ps(high, _mm256_castps256_ps128(x));
        let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
        _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)))
    }

    /// 32 bytes at `at`.
    #[target_feature(enable = "avx2")]
    unsafe fn load(at: *const u8) -> __m256i {
        // SAFETY: the caller passes 32 readable bytes.
        unsafe { _mm256_loadu_si256(at.cast()) }
    }

    /// A Q4 block (16 bytes at `at`) as 32 unsigned bytes 0..=15, in value order.
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(at: *const u8) -> __m256i {
        // SAFETY: the caller passes 16 readable bytes.
        let packed = unsafe { _mm_loadu_si128(at.cast()) };
        let both = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(packed), _mm_srli_epi16::<4>(packed));
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Signed Q8 weights by signed values, without VNNI: `maddubs` takes unsigned bytes, so the signs
    /// move onto the values (products of -127..=127 do not saturate its 16-bit pairs).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8_avx2(at: *const u8, values: __m256i, _correction: __m256i) -> __m256i {
        // SAFETY: forwarded from the caller.
        let weights = unsafe { load(at) };
        let magnitudes = _mm256_sign_epi8(weights, weights);
        let pairs = _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(values, weights));
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    /// Q4 nibbles (unsigned, 0..=15) by signed values, then the correction for their bias of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_avx2(at: *const u8, values: __m256i, correction: __m256i) -> __m256i {
        // SAFETY: forwarded from the caller.
        let weights = unsafe { nibbles(at) };
        let pairs = _mm256_maddubs_epi16(weights, values);
        _mm256_add_epi32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)), correction)
    }

    /// Q8 weights stored unsigned (+128) by signed values in one instruction, starting from the
    /// correction for their bias.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn dot_q8_vnni(at: *const u8, values: __m256i, correction: __m256i) -> __m256i {
        // SAFETY: forwarded from the caller.
        _mm256_dpbusd_epi32(correction, unsafe { load(at) }, values)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn dot_q4_vnni(at: *const u8, values: __m256i, correction: __m256i) -> __m256i {
        // SAFETY: forwarded from the caller.
        _mm256_dpbusd_epi32(correction, unsafe { nibbles(at) }, values)
    }

    /// The products of `N` vectors at once (one for a decode step, two for a prompt's), each to the bit
    /// what it gets alone: each block of weights is brought from the cache once for all of them (a
    /// prompt's matrix products read a tile of rows for every token, and the cache's bandwidth, not the
    /// arithmetic, was their limit).
    macro_rules! rows_kernel {
        ($name:ident, $features:literal, $dot:ident, $block_bytes:expr, $half:expr, $min:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const N: usize>(
                scales: &[u16],
                mins: &[u16],
                quants: &[u8],
                vectors: [&Quantized; N],
                mut outs: [&mut [f32]; N],
            ) {
                let per_row = vectors[0].scales.len();
                let halves = if $half { 2 } else { 1 };
                let values = vectors.map(|vector| vector.quants.as_ptr().cast::<u8>());
                let corrections = vectors.map(|vector| vector.corrections.as_ptr().cast::<u8>());
                // Which lanes of a group-block's scales row r takes: its one scale in all eight lanes,
                // or (two scales a block) its first-half scale in lanes 0..4, whose sums cover values
                // 0..16, and its second-half one in lanes 4..8.
                let lanes: [__m256i; ROWS] = std::array::from_fn(|row| {
                    #[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "0..8")]
                    let (first, second) = (row as i32, if $half { row as i32 + 4 } else { row as i32 });
                    _mm256_setr_epi32(first, first, first, first, second, second, second, second)
                });
                let groups = outs[0].len().div_ceil(ROWS);
                for group in 0..groups {
                    let scales = &scales[group * per_row * ROWS * halves..(group + 1) * per_row * ROWS * halves];
                    let quants = quants[group * per_row * ROWS * $block_bytes..].as_ptr();
                    let mut sums = [[_mm256_setzero_ps(); ROWS]; N];
                    // The four rows' mins times each block's sum, subtracted at the end.
                    let mut subtracted = [_mm_setzero_ps(); N];
                    for block in 0..per_row {
                        // SAFETY: block < per_row, and each vector holds per_row blocks and corrections.
                        let (value, correction): ([__m256i; N], [__m256i; N]) = unsafe {
                            (
                                values.map(|values| load(values.add(block * BLOCK))),
                                corrections.map(|corrections| load(corrections.add(block * 32))),
                            )
                        };
                        // The rows' scales (f16 → f32 in one instruction), times each vector's; for the
                        // formats with a min, d × sc and dmin × m, exact in f32.
                        // SAFETY: the group holds per_row × ROWS × halves scales, and for the formats
                        // with a min, per_row / SUPER × 2 × ROWS mins.
                        let (row_scales, row_mins) = unsafe {
                            if $half {
                                let scales = _mm_loadu_si128(scales.as_ptr().add(block * ROWS * 2).cast());
                                (_mm256_cvtph_ps(scales), _mm_setzero_ps())
                            } else if $min {
                                let at = (group * (per_row / SUPER) + block / SUPER) * 2 * ROWS;
                                let d = _mm_cvtph_ps(_mm_loadl_epi64(mins.as_ptr().add(at).cast()));
                                let dmin = _mm_cvtph_ps(_mm_loadl_epi64(mins.as_ptr().add(at + ROWS).cast()));
                                let packed =
                                    _mm_cvtepu16_epi32(_mm_loadl_epi64(scales.as_ptr().add(block * ROWS).cast()));
                                let sc = _mm_cvtepi32_ps(_mm_and_si128(packed, _mm_set1_epi32(0xFF)));
                                let m = _mm_cvtepi32_ps(_mm_srli_epi32::<8>(packed));
                                (_mm256_castps128_ps256(_mm_mul_ps(d, sc)), _mm_mul_ps(dmin, m))
                            } else {
                                let scales = _mm_loadl_epi64(scales.as_ptr().add(block * ROWS).cast());
                                (_mm256_castps128_ps256(_mm_cvtph_ps(scales)), _mm_setzero_ps())
                            }
                        };
                        let row_scales =
                            vectors.map(|vector| _mm256_mul_ps(row_scales, _mm256_set1_ps(vector.scales[block])));
                        if $min {
                            for (subtracted, vector) in subtracted.iter_mut().zip(vectors) {
                                *subtracted = _mm_fmadd_ps(row_mins, _mm_set1_ps(vector.sums[block]), *subtracted);
                            }
                        }
                        // The stream a few blocks ahead, asked for now: one core keeps too few misses in
                        // flight for the hardware prefetcher alone. (A hint: it never faults, even past
                        // the end, hence the wrapping address.)
                        _mm_prefetch::<_MM_HINT_T1>(
                            quants.wrapping_add((block * ROWS + PREFETCH) * $block_bytes).cast::<i8>(),
                        );
                        for lane in 0..ROWS {
                            let at = block * ROWS + lane;
                            for v in 0..N {
                                // SAFETY: the group holds per_row × ROWS blocks (the caller checked the lengths).
                                let dot = unsafe { $dot(quants.add(at * $block_bytes), value[v], correction[v]) };
                                let scale = _mm256_permutevar8x32_ps(row_scales[v], lanes[lane]);
                                sums[v][lane] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), sums[v][lane]);
                            }
                        }
                    }
                    for ((out, sums), subtracted) in outs.iter_mut().zip(sums).zip(subtracted) {
                        let mut mins = [0.0_f32; ROWS];
                        // SAFETY: four floats into four.
                        unsafe { _mm_storeu_ps(mins.as_mut_ptr(), subtracted) };
                        let end = ((group + 1) * ROWS).min(out.len());
                        let out = &mut out[group * ROWS..end];
                        for ((out, sum), min) in out.iter_mut().zip(sums).zip(mins) {
                            *out = if $min { sum_lanes(sum) - min } else { sum_lanes(sum) };
                        }
                    }
                }
            }
        };
    }

    rows_kernel!(rows_q8_avx2, "avx2,fma,f16c", dot_q8_avx2, BLOCK, false, false);
    rows_kernel!(rows_q4_avx2, "avx2,fma,f16c", dot_q4_avx2, BLOCK / 2, false, false);
    rows_kernel!(rows_q4m_avx2, "avx2,fma,f16c", dot_q4_avx2, BLOCK / 2, false, true);
    rows_kernel!(rows_q8m_avx2, "avx2,fma,f16c", dot_q8_avx2, BLOCK, false, true);
    rows_kernel!(rows_q8h_avx2, "avx2,fma,f16c", dot_q8_avx2, BLOCK, true, false);
    rows_kernel!(rows_q8_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_q8_vnni, BLOCK, false, false);
    rows_kernel!(rows_q4_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_q4_vnni, BLOCK / 2, false, false);
    rows_kernel!(rows_q4m_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_q4_vnni, BLOCK / 2, false, true);
    rows_kernel!(rows_q8m_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_q8_vnni, BLOCK, false, true);
    rows_kernel!(rows_q8h_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_q8_vnni, BLOCK, true, false);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use candle_core::{Device, Tensor};

    use super::*;
    use candle_core::quantized::QTensor;

    fn matrix(rows: usize, cols: usize, dtype: GgmlDType, isa: Isa) -> (QMatrix, Vec<f32>) {
        #[expect(clippy::cast_precision_loss, reason = "test values")]
        let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let quantized = QTensor::quantize(&dense, dtype).unwrap();
        let dequantized = quantized.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (QMatrix::from_qtensors(&[&quantized], isa).unwrap(), dequantized)
    }

    /// Each row's product by the formats' definitions alone, in f64, and the sum of its terms'
    /// magnitudes (the scale of its rounding): the vector quantized to Q8_0 (per block, a scale of the
    /// largest magnitude over 127, values times its inverse rounded half away from zero) by candle's
    /// dequantized weights (exact: an f16 scale times a small integer). No code shared with the kernels.
    fn reference(weights: &[f32], x: &[f32]) -> Vec<(f64, f64)> {
        reference_in_spans(weights, x, BLOCK)
    }

    /// [`reference`] with the vector quantized in spans of `span` values (256 for the K-quants).
    fn reference_in_spans(weights: &[f32], x: &[f32], span: usize) -> Vec<(f64, f64)> {
        let mut vector = Vec::with_capacity(x.len());
        for block in x.chunks(span) {
            let scale = block.iter().fold(0.0_f32, |largest, value| largest.max(value.abs())) / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            vector.extend(block.iter().map(|value| f64::from((value * inverse).round()) * f64::from(scale)));
        }
        weights
            .chunks(x.len())
            .map(|row| {
                let terms = row.iter().zip(&vector).map(|(weight, value)| f64::from(*weight) * value);
                terms.fold((0.0, 0.0), |(sum, size), term| (sum + term, size + term.abs()))
            })
            .collect()
    }

    /// Every kernel this CPU runs gives the reference's product up to f32 rounding, and the portable
    /// kernel's, on an odd number of rows (a padded group) and of blocks. Which kernels were checked is
    /// printed; a CPU without SIMD checks the portable kernel alone, and says so.
    #[test]
    #[allow(clippy::print_stderr, reason = "which kernels were checked, shown with --nocapture")]
    fn every_kernel_matches_an_independent_product_and_the_portable_kernel() {
        let (rows, cols) = (67, 160);
        #[expect(clippy::cast_precision_loss, reason = "test values")]
        let x: Vec<f32> = (0..cols).map(|i| ((i * 31 % 17) as f32 - 8.0) / 4.0).collect();
        let kernels = Isa::available();
        assert_eq!(kernels.first(), Some(&Isa::Portable), "the portable kernel runs everywhere, and first");
        let mut compared = 0;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let mut results = Vec::new();
            for &isa in &kernels {
                let (matrix, weights) = matrix(rows, cols, dtype, isa);
                let mut out = vec![0.0; rows];
                matrix.matvec(&x, &mut out);
                let expected = reference(&weights, &x);
                assert_eq!(expected.len(), rows);
                for (row, (got, (want, size))) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (f64::from(*got) - want).abs() <= 1e-5 * size,
                        "{dtype:?} {isa:?} row {row}: {got} vs {want} (terms of {size})"
                    );
                }
                results.push((isa, out, expected));
            }
            // The SIMD kernels add in another order than the portable one: equal up to f32 rounding.
            let (portable, others) = results.split_first().expect("the portable kernel is first");
            for (isa, out, _) in others {
                for (row, ((a, b), (_, size))) in portable.1.iter().zip(out).zip(&portable.2).enumerate() {
                    assert!(f64::from((a - b).abs()) <= 1e-5 * size, "{dtype:?} row {row}: portable {a}, {isa:?} {b}");
                }
                compared += 1;
            }
        }
        let names: Vec<&str> = kernels.iter().map(|isa| isa.name()).collect();
        assert_eq!(compared, 2 * (kernels.len() - 1), "every SIMD kernel compared with the portable one");
        if kernels.len() == 1 {
            eprintln!("this CPU runs no SIMD kernel: only the portable kernel was checked, against the reference");
        } else {
            eprintln!("kernels checked against the reference and the portable kernel: {}", names.join(", "));
        }
    }

    /// Detection finds every kernel the CPU's flags allow: one it missed would be unused and untested
    /// without a word.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn detection_finds_the_kernels_the_cpu_flags_allow() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags: Vec<&str> =
            cpuinfo.lines().find(|line| line.starts_with("flags")).unwrap().split_whitespace().collect();
        let has = |flag: &str| flags.contains(&flag);
        let expected = match (has("avx2") && has("fma") && has("f16c"), has("avx512_vnni") && has("avx512vl")) {
            (true, true) => Isa::Avx512Vnni,
            (true, false) => Isa::Avx2,
            (false, _) => Isa::Portable,
        };
        assert_eq!(Isa::hardware(), expected);
        assert_eq!(Isa::available().last(), Some(&expected));
    }

    #[test]
    fn usine_isa_caps_the_kernels_and_refuses_a_set_the_cpu_lacks_or_an_unknown_name() {
        let best = *Isa::all().last().unwrap();
        assert_eq!(Isa::choose(None, best), Ok(best));
        assert_eq!(Isa::choose(Some(""), best), Ok(best));
        for isa in Isa::all() {
            assert_eq!(Isa::choose(Some(isa.name()), best), Ok(isa));
            assert_eq!(Isa::choose(Some(isa.name()), Isa::Portable).is_ok(), isa == Isa::Portable);
        }
        let error = Isa::choose(Some("avx512"), best).unwrap_err();
        assert!(matches!(&error, EngineError::InvalidParams { name: ISA_VARIABLE, .. }), "{error}");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            Isa::choose(Some("avx512vnni"), Isa::Avx2),
            Err(EngineError::InvalidParams {
                name: ISA_VARIABLE,
                value: "avx512vnni".to_owned(),
                limit: "the kernels this CPU runs (portable, avx2)".to_owned(),
            })
        );
    }

    #[test]
    fn stacked_matrices_give_their_products_one_after_the_other() {
        let isa = Isa::detect();
        let part = |rows: usize, cols: usize| {
            #[expect(clippy::cast_precision_loss, reason = "test values")]
            let values: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 / 13.0 - 0.4).collect();
            QTensor::quantize(&Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap(), GgmlDType::Q8_0).unwrap()
        };
        let (a, b) = (part(7, 64), part(22, 64));
        let stacked = QMatrix::from_qtensors(&[&a, &b], isa).unwrap();
        let x: Vec<f32> = (0..64_u8).map(|i| f32::from(i) / 64.0).collect();
        let (mut top, mut bottom, mut both) = (vec![0.0; 7], vec![0.0; 22], vec![0.0; 29]);
        QMatrix::from_qtensors(&[&a], isa).unwrap().matvec(&x, &mut top);
        QMatrix::from_qtensors(&[&b], isa).unwrap().matvec(&x, &mut bottom);
        stacked.matvec(&x, &mut both);
        assert_eq!(both, [top, bottom].concat());
        assert!(QMatrix::from_qtensors(&[&a, &part(8, 96)], isa).is_err());
    }

    // Would catch: the AVX2 quantizer parting from the scalar one by a bit anywhere (a scale, a rounding
    // at a half, a sum, a correction, the bytes' order after packing), for blocks of 32 and spans of
    // 256, every bias, a block of zeros, ties at a half, and magnitudes from tiny to huge.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_simd_quantizer_gives_the_scalar_ones_bits() {
        if !Isa::available().contains(&Isa::Avx2) {
            return; // a CPU without AVX2 never runs it
        }
        let bits = |q: &Quantized| {
            let floats = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (floats(&q.scales), floats(&q.sums), q.quants.clone(), q.corrections.clone())
        };
        #[expect(clippy::cast_precision_loss, reason = "test values")]
        let vectors: Vec<Vec<f32>> = vec![
            (0..512).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0).collect(),
            (0..512).map(|i| if i < 32 { 0.0 } else { (i as f32 * 0.37).sin() * 1e-6 }).collect(),
            (0..512).map(|i| (i as f32 * 1.91).cos() * 6.0e4).collect(),
            // Ties: 127 × k / 254, halves of the scale's steps.
            (0..512).map(|i| if i % 32 == 0 { 127.0 } else { (i % 255) as f32 * 0.5 - 63.0 }).collect(),
        ];
        for x in &vectors {
            for span in [BLOCK, BLOCK * SUPER] {
                for bias in [0, 8, 128] {
                    // SAFETY: AVX2 is there (checked above); 512 values are whole spans.
                    #[allow(unsafe_code, reason = "the quantizer under test")]
                    let simd = unsafe { x86::quantize(x, bias, span) };
                    assert_eq!(bits(&simd), bits(&Quantized::new(x, bias, span)), "span {span}, bias {bias}");
                }
            }
        }
    }

    // Would catch: a pair kernel giving a vector anything but what the one-vector kernel gives it (a
    // prompt's products and a decode step's would part), for every kernel this CPU runs.
    #[test]
    fn the_pair_kernels_give_each_vector_the_one_vector_products_to_the_bit() {
        for isa in Isa::available() {
            for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
                let (matrix, _) = matrix(13, 96, dtype, isa);
                let x = |seed: f32| (0..96_u8).map(|i| (f32::from(i) * seed).sin()).collect::<Vec<f32>>();
                let (a, b) = (matrix.quantize(&x(0.37)), matrix.quantize(&x(1.91)));
                let (mut one_a, mut one_b) = (vec![0.0; 12], vec![0.0; 12]);
                matrix.matvec_quantized([&a], 0, [&mut one_a]);
                matrix.matvec_quantized([&b], 0, [&mut one_b]);
                let (mut pair_a, mut pair_b) = (vec![0.0; 12], vec![0.0; 12]);
                matrix.matvec_quantized([&a, &b], 0, [&mut pair_a, &mut pair_b]);
                assert_eq!((pair_a, pair_b), (one_a, one_b), "{isa:?} {dtype:?}");
            }
        }
    }

    // Would catch: a K-quant block unpacked wrong (a scale or min of another sub-block, a nibble or a high
    // bit misplaced, a half-block scale on the wrong half), on every kernel this CPU runs. The repacked
    // scales and mins are rounded to f16 (llama.cpp multiplies the 6-bit ones out in f32), hence a
    // tolerance of a thousandth of the terms' magnitudes rather than f32 rounding.
    #[test]
    fn k_quant_blocks_repacked_give_the_products_of_their_values() {
        let (rows, cols) = (21, 512);
        #[expect(clippy::cast_precision_loss, reason = "test values")]
        let x: Vec<f32> = (0..cols).map(|i| ((i * 31 % 17) as f32 - 8.0) / 4.0).collect();
        for isa in Isa::available() {
            for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
                let (matrix, weights) = matrix(rows, cols, dtype, isa);
                let mut out = vec![0.0; rows];
                matrix.matvec(&x, &mut out);
                for (row, (got, (want, size))) in out.iter().zip(reference(&weights, &x)).enumerate() {
                    assert!(
                        (f64::from(*got) - want).abs() <= 1e-3 * size,
                        "{dtype:?} {isa:?} row {row}: {got} vs {want}"
                    );
                }
                // A row looked up is the row's values, to the same rounding (of its largest).
                let want = &weights[5 * cols..6 * cols];
                let largest = want.iter().fold(0.0_f32, |largest, value| largest.max(value.abs()));
                for (got, want) in matrix.row(5).iter().zip(want) {
                    assert!((got - want).abs() <= 1e-3 * largest, "{dtype:?} row 5: {got} vs {want}");
                }
            }
        }
    }
}
