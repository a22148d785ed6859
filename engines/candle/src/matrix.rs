//! A weight matrix of a model, as the forward pass multiplies it: quantized for the kernels of
//! `kernel.rs` (Q8_0, Q4_0, and the K-quants Q4_K, Q5_K, Q6_K repacked), a stack of such matrices of
//! different formats, or dense f32 for the float types (F32, F16, BF16, converted exactly at compile).

use candle_core::quantized::GgmlDType;

use crate::config::{Refused, first_line};
use crate::kernel::{Format, Isa, QMatrix, Quantized, Quants, ROWS, Raw};

/// A matrix of the forward pass.
#[derive(Debug)]
pub(crate) enum Matrix {
    Quantized(QMatrix),
    Dense(Dense),
    /// Matrices of different quantized formats stacked (a `Q4_K_M` file's query and key projections in
    /// Q4_K, its value projection in Q6_K), each of whole groups of rows.
    Stacked(Vec<Matrix>),
}

/// A vector made ready for one matrix's products.
pub(crate) enum Prepared<'a> {
    Quantized(Quantized),
    Dense(&'a [f32]),
    Stacked(Vec<Prepared<'a>>),
}

/// Rows of f32 values: its own, or 4-aligned bytes of a compiled graph's raw section.
#[derive(Debug)]
pub(crate) struct Dense {
    rows: usize,
    cols: usize,
    values: Floats,
}

#[derive(Debug)]
enum Floats {
    Owned(Vec<f32>),
    Shared(Quants),
}

impl Dense {
    /// `rows` × `cols` values in `bytes` (lengths checked by the caller), borrowed where 4-aligned.
    pub(crate) fn shared(rows: usize, cols: usize, bytes: Quants) -> Self {
        let values = match bytemuck::try_cast_slice::<u8, f32>(bytes.bytes()) {
            Ok(_) => Floats::Shared(bytes),
            Err(_) => Floats::Owned(
                bytes.bytes().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            ),
        };
        Self { rows, cols, values }
    }

    pub(crate) fn values(&self) -> &[f32] {
        match &self.values {
            Floats::Owned(values) => values,
            Floats::Shared(bytes) => bytemuck::try_cast_slice(bytes.bytes()).expect("4-aligned: checked in `shared`"),
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }
}

/// How a stack of parts of these types is held: quantized when they share a format the kernels run,
/// else dense.
fn format(dtypes: impl IntoIterator<Item = GgmlDType>) -> Option<Format> {
    let mut dtypes = dtypes.into_iter();
    let first = dtypes.next()?;
    dtypes.all(|dtype| dtype == first).then(|| Format::of(first)).flatten()
}

impl Matrix {
    /// `parts` (of one width) stacked, rows one after the other: projections of the same vector take
    /// one product.
    pub(crate) fn from_raw(parts: &[Raw<'_>], isa: Isa) -> Result<Self, Refused> {
        let quantized = |parts: &[Raw<'_>]| {
            QMatrix::from_raw(parts, isa).map(Self::Quantized).map_err(|error| Refused(first_line(&error)))
        };
        if format(parts.iter().map(|part| part.dtype)).is_some() {
            return quantized(parts);
        }
        let each_runs = parts.iter().all(|part| Format::of(part.dtype).is_some() && part.rows.is_multiple_of(ROWS));
        if each_runs && parts.len() > 1 {
            return parts
                .iter()
                .map(|part| quantized(std::slice::from_ref(part)))
                .collect::<Result<_, _>>()
                .map(Self::Stacked);
        }
        let cols = parts.first().map_or(0, |part| part.cols);
        let mut values = Vec::with_capacity(parts.iter().map(|part| part.rows * part.cols).sum());
        for part in parts {
            if part.cols != cols {
                return Err(Refused(format!("stacked matrices of {cols} and {} columns", part.cols)));
            }
            values.extend(dequantize(part)?);
        }
        Ok(Self::Dense(Dense { rows: values.len() / cols.max(1), cols, values: Floats::Owned(values) }))
    }

    /// Bytes it holds.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Self::Quantized(matrix) => matrix.bytes(),
            Self::Dense(matrix) => (matrix.values().len() * 4) as u64,
            Self::Stacked(parts) => parts.iter().map(Self::bytes).sum(),
        }
    }

    pub(crate) fn rows(&self) -> usize {
        match self {
            Self::Quantized(matrix) => matrix.rows(),
            Self::Dense(matrix) => matrix.rows,
            Self::Stacked(parts) => parts.iter().map(Self::rows).sum(),
        }
    }

    /// Row `row` as f32 values (an embedding looked up).
    pub(crate) fn row(&self, row: usize) -> Vec<f32> {
        match self {
            Self::Quantized(matrix) => matrix.row(row),
            Self::Dense(matrix) => matrix.values()[row * matrix.cols..][..matrix.cols].to_vec(),
            Self::Stacked(parts) => {
                let mut row = row;
                for part in parts {
                    if row < part.rows() {
                        return part.row(row);
                    }
                    row -= part.rows();
                }
                panic!("a row past the stack's")
            }
        }
    }

    /// The parts of a stack that rows `first..first + len` cross: each part's index, the first of its
    /// rows taken, and where its rows go in the output.
    fn pieces(parts: &[Self], first: usize, len: usize) -> Vec<(usize, usize, std::ops::Range<usize>)> {
        let mut pieces = Vec::new();
        let mut start = 0;
        for (index, part) in parts.iter().enumerate() {
            let (from, to) = (first.max(start), (first + len).min(start + part.rows()));
            if from < to {
                pieces.push((index, from - start, from - first..to - first));
            }
            start += part.rows();
        }
        pieces
    }

    /// Rows `first..first + out.len()` of `self · x`; `first` starts a group of [`ROWS`].
    pub(crate) fn matvec_rows(&self, x: &[f32], first: usize, out: &mut [f32]) {
        self.matvec_prepared(&self.prepare(x), first, out);
    }

    /// `x` made ready for this matrix's products: quantized for the kernels (once, for products of
    /// several tiles of rows), or as it is.
    pub(crate) fn prepare<'a>(&self, x: &'a [f32]) -> Prepared<'a> {
        match self {
            Self::Quantized(matrix) => Prepared::Quantized(matrix.quantize(x)),
            Self::Dense(_) => Prepared::Dense(x),
            Self::Stacked(parts) => Prepared::Stacked(parts.iter().map(|part| part.prepare(x)).collect()),
        }
    }

    /// [`matvec_prepared`](Self::matvec_prepared) of two vectors at once (each out the same, to the bit):
    /// the quantized kernels read each block of weights once for both.
    pub(crate) fn matvec_prepared_pair(&self, xs: [&Prepared<'_>; 2], first: usize, outs: [&mut [f32]; 2]) {
        match (self, xs) {
            (Self::Quantized(matrix), [Prepared::Quantized(a), Prepared::Quantized(b)]) => {
                matrix.matvec_quantized([a, b], first, outs);
            }
            (Self::Stacked(parts), [Prepared::Stacked(a), Prepared::Stacked(b)]) => {
                let [out_a, out_b] = outs;
                for (index, at, range) in Self::pieces(parts, first, out_a.len()) {
                    let outs = [&mut out_a[range.clone()], &mut out_b[range]];
                    parts[index].matvec_prepared_pair([&a[index], &b[index]], at, outs);
                }
            }
            _ => {
                let [out_a, out_b] = outs;
                self.matvec_prepared(xs[0], first, out_a);
                self.matvec_prepared(xs[1], first, out_b);
            }
        }
    }

    /// [`matvec_rows`](Self::matvec_rows) of a vector made ready by [`prepare`](Self::prepare).
    pub(crate) fn matvec_prepared(&self, x: &Prepared<'_>, first: usize, out: &mut [f32]) {
        match (self, x) {
            (Self::Quantized(matrix), Prepared::Quantized(vector)) => matrix.matvec_quantized([vector], first, [out]),
            (Self::Dense(matrix), Prepared::Dense(x)) => {
                assert_eq!(x.len(), matrix.cols, "a vector of {} values for {} columns", x.len(), matrix.cols);
                let values = matrix.values();
                for (index, out) in out.iter_mut().enumerate() {
                    *out = crate::model::dot(&values[(first + index) * matrix.cols..][..matrix.cols], x);
                }
            }
            (Self::Stacked(parts), Prepared::Stacked(xs)) => {
                for (index, at, range) in Self::pieces(parts, first, out.len()) {
                    parts[index].matvec_prepared(&xs[index], at, &mut out[range]);
                }
            }
            _ => unreachable!("a vector prepared by this matrix"),
        }
    }

    /// The quantized matrices, to move into a model's arena.
    pub(crate) fn quantized(&mut self) -> Vec<&mut QMatrix> {
        match self {
            Self::Quantized(matrix) => vec![matrix],
            Self::Dense(_) => Vec::new(),
            Self::Stacked(parts) => parts.iter_mut().flat_map(Self::quantized).collect(),
        }
    }
}

/// The values of `raw`, exactly as its blocks hold them.
pub(crate) fn dequantize(raw: &Raw<'_>) -> Result<Vec<f32>, Refused> {
    let two = |bytes: &[u8]| u16::from_le_bytes([bytes[0], bytes[1]]);
    Ok(match raw.dtype {
        GgmlDType::F32 => {
            raw.data.chunks_exact(4).map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])).collect()
        }
        GgmlDType::F16 => raw.data.chunks_exact(2).map(|bytes| half::f16::from_bits(two(bytes)).to_f32()).collect(),
        GgmlDType::BF16 => raw.data.chunks_exact(2).map(|bytes| half::bf16::from_bits(two(bytes)).to_f32()).collect(),
        dtype => {
            let tensor = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                raw.data,
                vec![raw.rows, raw.cols],
                &candle_core::Device::Cpu,
            )
            .and_then(|tensor| tensor.dequantize(&candle_core::Device::Cpu))
            .and_then(|tensor| tensor.flatten_all())
            .and_then(|tensor| tensor.to_vec1::<f32>());
            tensor.map_err(|error| Refused(format!("{dtype:?} weights: {}", first_line(&error))))?
        }
    })
}
