//! The seam between the model and the [`kernel`](crate::kernel): weights resident in their
//! stored dtype ([`Weight`]), the projections that read them per token ([`Linear`]) and the
//! token embedding ([`Embedding`], which can share its weight with a tied LM head).
//!
//! Every weight that is read per token (routed and shared experts, the router and the shared
//! expert's gate, attention q/k/v/o, dense MLPs, the LM head) is a [`Linear`]; activations and
//! outputs are f32. Norm weights and biases are small and stay f32 tensors/vectors.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};

use crate::error::{ModelError, Result};
use crate::kernel::{Kernel, WeightData, WeightView};

/// 64 bytes, 64-byte aligned: the unit of a weight buffer (a cache line, one AVX-512 load).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// A weight matrix `[rows, cols]` (PyTorch `nn.Linear` layout: one row per output feature),
/// resident in its stored dtype (bf16, f16 or f32) in one 64-byte-aligned buffer: it holds
/// exactly `rows · cols · size_of(dtype)` bytes (rounded up to 64).
pub struct Weight {
    dtype: DType,
    rows: usize,
    cols: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weight")
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

fn elem_bytes(dtype: DType) -> Result<usize> {
    match dtype {
        DType::BF16 | DType::F16 => Ok(2),
        DType::F32 => Ok(4),
        other => Err(ModelError::InvalidInput(format!(
            "weights are bf16, f16 or f32, not {other:?}"
        ))),
    }
}

impl Weight {
    /// Stacks row blocks given as little-endian bytes (as safetensors stores them) into one
    /// `[Σ rows, cols]` matrix of `dtype`: `parts[i] = (rows_i, bytes_i)` with
    /// `bytes_i.len() = rows_i · cols · size_of(dtype)`. One copy, no conversion.
    ///
    /// Errors: a dtype other than bf16/f16/f32, or a part whose length does not match.
    pub fn from_le_parts(dtype: DType, cols: usize, parts: &[(usize, &[u8])]) -> Result<Self> {
        let eb = elem_bytes(dtype)?;
        let rows: usize = parts.iter().map(|p| p.0).sum();
        let total = rows * cols * eb;
        let mut lines = vec![Line([0; 64]); total.div_ceil(64)];
        // SAFETY: `lines` is `lines.len() * 64 ≥ total` initialised bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, total) };
        let mut at = 0;
        for &(r, bytes) in parts {
            if bytes.len() != r * cols * eb {
                return Err(ModelError::InvalidInput(format!(
                    "a weight block of {r} × {cols} {dtype:?} has {} bytes",
                    bytes.len()
                )));
            }
            buf[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        }
        #[cfg(target_endian = "big")]
        for e in buf.chunks_exact_mut(eb) {
            e.reverse();
        }
        Ok(Self {
            dtype,
            rows,
            cols,
            lines,
        })
    }

    /// An f32 matrix `[rows, cols]` from its values.
    ///
    /// Errors: `data.len() != rows · cols`.
    pub fn from_f32(rows: usize, cols: usize, data: &[f32]) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(ModelError::InvalidInput(format!(
                "{} values for a [{rows}, {cols}] weight",
                data.len()
            )));
        }
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::from_le_parts(DType::F32, cols, &[(rows, &bytes)])
    }

    /// A copy of a 2-D bf16/f16/f32 tensor, in its dtype.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let t = t.contiguous()?;
        let bytes: Vec<u8> = match t.dtype() {
            DType::BF16 => t
                .flatten_all()?
                .to_vec1::<bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F16 => t
                .flatten_all()?
                .to_vec1::<f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F32 => t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            other => {
                return Err(ModelError::InvalidInput(format!(
                    "weights are bf16, f16 or f32, not {other:?}"
                )))
            }
        };
        Self::from_le_parts(t.dtype(), cols, &[(rows, &bytes)])
    }

    /// The stored dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of the matrix (`rows · cols · size_of(dtype)`).
    pub fn bytes(&self) -> usize {
        self.rows * self.cols * self.dtype.size_in_bytes()
    }

    /// The matrix as the kernel reads it.
    pub fn view(&self) -> WeightView<'_> {
        let len = self.rows * self.cols;
        let ptr = self.lines.as_ptr();
        // SAFETY: the buffer holds `len` elements of the dtype, initialised, 64-byte aligned
        // (≥ the alignment of bf16, f16, f32); `half`'s types are `repr(transparent)` u16.
        let data = unsafe {
            match self.dtype {
                DType::BF16 => {
                    WeightData::Bf16(std::slice::from_raw_parts(ptr as *const bf16, len))
                }
                DType::F16 => WeightData::F16(std::slice::from_raw_parts(ptr as *const f16, len)),
                _ => WeightData::F32(std::slice::from_raw_parts(ptr as *const f32, len)),
            }
        };
        WeightView::packed(data, self.rows, self.cols)
    }

    /// Row `r` widened exactly to f32 into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match self.view().data {
            WeightData::Bf16(d) => {
                for (o, v) in out.iter_mut().zip(&d[r * c..(r + 1) * c]) {
                    *o = f32::from_bits((v.to_bits() as u32) << 16);
                }
            }
            WeightData::F16(d) => {
                for (o, v) in out.iter_mut().zip(&d[r * c..(r + 1) * c]) {
                    *o = v.to_f32();
                }
            }
            WeightData::F32(d) => out.copy_from_slice(&d[r * c..(r + 1) * c]),
        }
    }

    /// The whole matrix widened to an f32 tensor `[rows, cols]` (for references and baselines).
    pub fn to_f32_tensor(&self) -> Result<Tensor> {
        let mut v = vec![0f32; self.rows * self.cols];
        for (r, row) in v
            .chunks_exact_mut(self.cols.max(1))
            .enumerate()
            .take(self.rows)
        {
            self.row_into(r, row);
        }
        Ok(Tensor::from_vec(v, (self.rows, self.cols), &Device::Cpu)?)
    }
}

/// Runs `f` on the f32 values of a CPU tensor, row-major (converted and made contiguous
/// first when needed; no copy when it already is f32 and contiguous).
pub(crate) fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let x = if x.dtype() == DType::F32 {
        x.contiguous()?
    } else {
        x.to_dtype(DType::F32)?.contiguous()?
    };
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(values)) = &*storage else {
        return Err(ModelError::InvalidInput(
            "the kernel takes CPU tensors".into(),
        ));
    };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        ModelError::InvalidInput("a non-contiguous tensor after contiguous()".into())
    })?;
    f(&values[start..end])
}

/// `y = x · Wᵀ + b` with `W: [out, in]` in its stored dtype, `b: [out]` f32 (optional),
/// `x: [.., in]` and `y: [.., out]` f32; the kernel's fixed summation order, then `+ b`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Arc<Weight>,
    bias: Option<Arc<[f32]>>,
}

impl Linear {
    /// `{name}.weight` `[out, inp]` from `ckpt` in its stored dtype, and `{name}.bias` `[out]`
    /// (f32) if `bias`.
    ///
    /// # Errors
    /// A missing tensor or one of another shape ([`ModelError`] from the checkpoint).
    pub(crate) fn load(
        ckpt: &mut crate::checkpoint::Checkpoint,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear> {
        let w = ckpt.load_weight(&format!("{name}.weight"), out, inp)?;
        let b = if bias {
            Some(
                ckpt.load(&format!("{name}.bias"), &[out])?
                    .to_vec1::<f32>()?,
            )
        } else {
            None
        };
        Linear::new(Arc::new(w), b)
    }

    /// Wraps a weight (shared, e.g. with a tied embedding) and an optional bias of `rows` values.
    ///
    /// Errors: a bias whose length is not the weight's row count.
    pub fn new(weight: Arc<Weight>, bias: Option<Vec<f32>>) -> Result<Self> {
        if let Some(b) = &bias {
            if b.len() != weight.rows() {
                return Err(ModelError::InvalidInput(format!(
                    "a bias of {} for {} outputs",
                    b.len(),
                    weight.rows()
                )));
            }
        }
        Ok(Self {
            weight,
            bias: bias.map(Into::into),
        })
    }

    /// The weight.
    pub fn weight(&self) -> &Arc<Weight> {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// Input features `in`.
    pub fn in_features(&self) -> usize {
        self.weight.cols()
    }

    /// Output features `out`.
    pub fn out_features(&self) -> usize {
        self.weight.rows()
    }

    /// Bytes of the weight matrix (the bias is not counted).
    pub fn weight_bytes(&self) -> usize {
        self.weight.bytes()
    }

    /// `y[m, out] = x[m, in] · Wᵀ + b` with the process default [`Kernel::from_env`].
    pub fn forward_f32(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        self.forward_with(&Kernel::from_env()?, x, m, y)
    }

    /// [`Linear::forward_f32`] with a given kernel (path and threads).
    ///
    /// Errors: `x.len() != m · in` or `y.len() != m · out`.
    pub fn forward_with(&self, kernel: &Kernel, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        kernel.matmul_t(x, m, &self.weight.view(), y)?;
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(b.len().max(1)) {
                for (v, &bv) in row.iter_mut().zip(b.iter()) {
                    *v += bv;
                }
            }
        }
        Ok(())
    }

    /// A new `[m, out]` f32 vector for `x: [m, in]`.
    pub fn forward_vec(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut y = vec![0f32; m * self.out_features()];
        self.forward_f32(x, m, &mut y)?;
        Ok(y)
    }

    /// `xs: [.., in]` (any float dtype; computed in f32) → `[.., out]` f32.
    ///
    /// Errors: the last dimension is not `in`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let k = self.in_features();
        if dims.last() != Some(&k) {
            return Err(ModelError::InvalidInput(format!(
                "input {dims:?} for a linear layer of {k} inputs"
            )));
        }
        let m = xs.elem_count() / k.max(1);
        let y = with_f32(xs, |x| self.forward_vec(x, m))?;
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = self.out_features();
        Ok(Tensor::from_vec(y, out, &Device::Cpu)?)
    }
}

/// The token embedding `[vocab, hidden]`: rows widened exactly to f32.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Arc<Weight>,
}

impl Embedding {
    /// Wraps the embedding matrix (shareable with a tied LM head).
    pub fn new(weight: Arc<Weight>) -> Self {
        Self { weight }
    }

    /// The matrix.
    pub fn weight(&self) -> &Arc<Weight> {
        &self.weight
    }

    /// `ids: [n]` → `[n, hidden]` f32.
    ///
    /// Errors: [`ModelError::TokenOutOfRange`].
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let h = self.weight.cols();
        let mut out = vec![0f32; ids.len() * h];
        for (row, &id) in out.chunks_exact_mut(h.max(1)).zip(ids) {
            if id as usize >= self.weight.rows() {
                return Err(ModelError::TokenOutOfRange {
                    token: id,
                    vocab_size: self.weight.rows(),
                });
            }
            self.weight.row_into(id as usize, row);
        }
        Ok(Tensor::from_vec(out, (ids.len(), h), &Device::Cpu)?)
    }
}
