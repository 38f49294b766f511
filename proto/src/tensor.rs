//! Tensors on the wire: a dtype, a shape and the raw little-endian element bytes, row-major.
//! msgpack encodes the bytes as one `bin` value, so a tensor costs its data plus a few bytes.

use bytes::Bytes;
use half::bf16;
use serde::{Deserialize, Serialize};

/// Element type of a [`WireTensor`]; serialised as `"f32"` / `"bf16"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireDType {
    /// IEEE-754 binary32, 4 bytes little-endian.
    F32,
    /// bfloat16 (the top 16 bits of an f32), 2 bytes little-endian.
    BF16,
}

impl WireDType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::BF16 => 2,
        }
    }
}

/// A tensor that does not match its shape or dtype.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// `data.len()` differs from shape product × dtype size (or the element count of the
    /// values given to [`WireTensor::from_f32`] differs from the shape's).
    #[error("wrong shape: shape needs {expected_bytes} bytes but data has {actual_bytes}")]
    WrongShape {
        /// Bytes implied by the shape and dtype.
        expected_bytes: usize,
        /// Bytes actually present.
        actual_bytes: usize,
    },
    /// A rank-2 tensor was expected.
    #[error("expected a rank-2 tensor, got shape {shape:?}")]
    NotRank2 {
        /// The actual shape.
        shape: Vec<u32>,
    },
    /// The shape's element count overflows `usize`.
    #[error("shape {shape:?} is too large")]
    Overflow {
        /// The offending shape.
        shape: Vec<u32>,
    },
}

/// A dense row-major tensor: `data` holds shape product × `dtype.size()` little-endian bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Element type of `data`.
    pub dtype: WireDType,
    /// Dimensions, outermost first (hidden states are `[rows, hidden]`).
    pub shape: Vec<u32>,
    /// Raw little-endian elements; a msgpack `bin` on the wire (bytes' serde impl).
    pub data: Bytes,
}

impl WireTensor {
    /// Encodes `values` (row-major, `shape` product elements) as `dtype`: f32 as-is, or
    /// bf16 with round-to-nearest-even (`half::bf16::from_f32`).
    /// Errors with [`TensorError::WrongShape`] when `values.len()` does not match `shape`.
    pub fn from_f32(
        shape: Vec<u32>,
        values: &[f32],
        dtype: WireDType,
    ) -> Result<Self, TensorError> {
        let numel = numel(&shape)?;
        if numel != values.len() {
            return Err(TensorError::WrongShape {
                expected_bytes: numel * dtype.size(),
                actual_bytes: values.len() * dtype.size(),
            });
        }
        let mut data = Vec::with_capacity(numel * dtype.size());
        match dtype {
            WireDType::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            WireDType::BF16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes())),
        }
        Ok(WireTensor {
            dtype,
            shape,
            data: Bytes::from(data),
        })
    }

    /// Number of elements (shape product).
    pub fn numel(&self) -> Result<usize, TensorError> {
        numel(&self.shape)
    }

    /// Checks `data.len() == numel × dtype.size()` ([`TensorError::WrongShape`] otherwise).
    pub fn check(&self) -> Result<(), TensorError> {
        let expected_bytes = self
            .numel()?
            .checked_mul(self.dtype.size())
            .ok_or_else(|| TensorError::Overflow {
                shape: self.shape.clone(),
            })?;
        if expected_bytes != self.data.len() {
            return Err(TensorError::WrongShape {
                expected_bytes,
                actual_bytes: self.data.len(),
            });
        }
        Ok(())
    }

    /// Decodes the elements to f32 (bf16 widens exactly), after [`WireTensor::check`].
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, TensorError> {
        self.check()?;
        Ok(match self.dtype {
            WireDType::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            WireDType::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
        })
    }

    /// `(rows, cols)` of a rank-2 tensor; [`TensorError::NotRank2`] otherwise.
    pub fn dims2(&self) -> Result<(usize, usize), TensorError> {
        match self.shape.as_slice() {
            [r, c] => Ok((*r as usize, *c as usize)),
            _ => Err(TensorError::NotRank2 {
                shape: self.shape.clone(),
            }),
        }
    }

    /// Rows of a rank-2 tensor (e.g. tokens of `[rows, hidden]`).
    pub fn rows(&self) -> Result<usize, TensorError> {
        Ok(self.dims2()?.0)
    }

    /// Columns of a rank-2 tensor (e.g. the hidden size of `[rows, hidden]`).
    pub fn cols(&self) -> Result<usize, TensorError> {
        Ok(self.dims2()?.1)
    }
}

/// Shape product, checked for overflow.
fn numel(shape: &[u32]) -> Result<usize, TensorError> {
    shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d as usize))
        .ok_or_else(|| TensorError::Overflow {
            shape: shape.to_vec(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_exactly() {
        let v = [1.0f32, -2.5, 3.25e-8, f32::MAX, 0.0, -0.0];
        let t = WireTensor::from_f32(vec![2, 3], &v, WireDType::F32).unwrap();
        assert_eq!(t.data.len(), 24);
        assert_eq!(&t.data[..4], &1.0f32.to_le_bytes());
        assert_eq!(t.to_f32_vec().unwrap(), v);
        assert_eq!((t.rows().unwrap(), t.cols().unwrap()), (2, 3));
    }

    #[test]
    fn bf16_conversion_matches_half_round_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to even (1.0);
        // 1 + 3·2^-8 is halfway too and rounds up to the even 1 + 2^-6.
        let v = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            0.1,
            -3.7e5,
            1e-40,
        ];
        let t = WireTensor::from_f32(vec![5], &v, WireDType::BF16).unwrap();
        assert_eq!(t.data.len(), 10);
        let back = t.to_f32_vec().unwrap();
        for (x, y) in v.iter().zip(&back) {
            assert_eq!(*y, bf16::from_f32(*x).to_f32());
        }
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], 1.0 + 2f32.powi(-6));
    }

    #[test]
    fn inconsistent_tensors_are_rejected() {
        assert_eq!(
            WireTensor::from_f32(vec![2, 2], &[1.0; 3], WireDType::BF16),
            Err(TensorError::WrongShape {
                expected_bytes: 8,
                actual_bytes: 6
            })
        );
        let t = WireTensor {
            dtype: WireDType::F32,
            shape: vec![2, 2],
            data: Bytes::from(vec![0u8; 12]),
        };
        assert_eq!(
            t.to_f32_vec(),
            Err(TensorError::WrongShape {
                expected_bytes: 16,
                actual_bytes: 12
            })
        );
        let t = WireTensor {
            dtype: WireDType::F32,
            shape: vec![4],
            data: Bytes::from(vec![0u8; 16]),
        };
        assert!(matches!(t.rows(), Err(TensorError::NotRank2 { .. })));
        let t = WireTensor {
            dtype: WireDType::F32,
            shape: vec![u32::MAX; 3],
            data: Bytes::new(),
        };
        assert!(matches!(t.check(), Err(TensorError::Overflow { .. })));
    }

    #[test]
    fn dtype_names_are_lowercase() {
        assert_eq!(serde_json::to_string(&WireDType::BF16).unwrap(), "\"bf16\"");
        assert_eq!(
            serde_json::from_str::<WireDType>("\"f32\"").unwrap(),
            WireDType::F32
        );
    }
}
