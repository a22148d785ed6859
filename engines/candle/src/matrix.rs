//! A weight matrix of a model, as the forward pass multiplies it: quantized for the kernels of
//! `kernel.rs` (Q8_0, Q4_0), or dense f32 for every other type (F32, F16, BF16, and the K-quants,
//! dequantized exactly at load: correct, but read at 32 bits a weight; own K-quant kernels are the
//! next step).

use candle_core::quantized::GgmlDType;

use crate::config::{Refused, first_line};
use crate::kernel::{Format, Isa, QMatrix, Quantized, Quants, Raw};

/// A matrix of the forward pass.
#[derive(Debug)]
pub(crate) enum Matrix {
    Quantized(QMatrix),
    Dense(Dense),
}

/// A vector made ready for one matrix's products.
pub(crate) enum Prepared<'a> {
    Quantized(Quantized),
    Dense(&'a [f32]),
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
        if format(parts.iter().map(|part| part.dtype)).is_some() {
            return QMatrix::from_raw(parts, isa).map(Self::Quantized).map_err(|error| Refused(first_line(&error)));
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
        }
    }

    pub(crate) fn rows(&self) -> usize {
        match self {
            Self::Quantized(matrix) => matrix.rows(),
            Self::Dense(matrix) => matrix.rows,
        }
    }

    /// Row `row` as f32 values (an embedding looked up).
    pub(crate) fn row(&self, row: usize) -> Vec<f32> {
        match self {
            Self::Quantized(matrix) => matrix.row(row),
            Self::Dense(matrix) => matrix.values()[row * matrix.cols..][..matrix.cols].to_vec(),
        }
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
        }
    }

    /// [`matvec_prepared`](Self::matvec_prepared) of two vectors at once (each out the same, to the bit):
    /// the quantized kernels read each block of weights once for both.
    pub(crate) fn matvec_prepared_pair(&self, xs: [&Prepared<'_>; 2], first: usize, outs: [&mut [f32]; 2]) {
        match (self, xs) {
            (Self::Quantized(matrix), [Prepared::Quantized(a), Prepared::Quantized(b)]) => {
                matrix.matvec_quantized([a, b], first, outs);
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
            _ => unreachable!("a vector prepared by this matrix"),
        }
    }

    /// The quantized matrix, to move into a model's arena.
    pub(crate) fn quantized(&mut self) -> Option<&mut QMatrix> {
        match self {
            Self::Quantized(matrix) => Some(matrix),
            Self::Dense(_) => None,
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
