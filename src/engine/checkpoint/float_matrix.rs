//! A float matrix kept in its stored dtype: the embeddings and the output head of a model,
//! read row by row (f32, or bf16 / f16 straight from the memory-mapped file) instead of being
//! expanded to f32 in memory. At microsoft/bitnet-b1.58-2B-4T's shapes the tied
//! 128256 × 2560 embedding is 0.66 GB as bf16 and would be 1.31 GB as f32, twice over when
//! the head is a transposed copy.

use super::st::{RawTensor, SharedBytes};
use crate::error::Result;
use safetensors::tensor::Dtype;
use std::sync::Arc;

/// The element type a [`FloatMatrix`] is held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    /// 32-bit float, held in memory.
    F32,
    /// bfloat16, the bytes of the weight file.
    Bf16,
    /// IEEE half, the bytes of the weight file.
    F16,
}

impl StoredDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::Bf16 | StoredDtype::F16 => 2,
        }
    }

    /// The dtype's usual name.
    pub fn name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "f32",
            StoredDtype::Bf16 => "bf16",
            StoredDtype::F16 => "f16",
        }
    }
}

#[derive(Clone)]
enum Data {
    F32(Arc<Vec<f32>>),
    Half(StoredDtype, SharedBytes),
}

/// A `rows × cols` row-major float matrix in its stored dtype; cloning shares the data.
#[derive(Clone)]
pub struct FloatMatrix {
    /// Rows (the vocabulary for embeddings and heads).
    pub rows: usize,
    /// Columns (the hidden size).
    pub cols: usize,
    data: Data,
}

impl std::fmt::Debug for FloatMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FloatMatrix({}×{} {})",
            self.rows,
            self.cols,
            self.dtype().name()
        )
    }
}

impl FloatMatrix {
    /// An f32 matrix held in memory. Panics unless `values` has `rows · cols` elements.
    pub fn from_f32(values: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(
            values.len(),
            rows * cols,
            "values of a {rows}×{cols} matrix"
        );
        FloatMatrix {
            rows,
            cols,
            data: Data::F32(Arc::new(values)),
        }
    }

    /// The 2-D float tensor `t` of shape `[rows, cols]`: bf16 and f16 stay in the mapped file,
    /// F32 and F64 are read into memory as f32. Errors name the file and the tensor: another
    /// shape or dtype, a non-finite value.
    pub fn read(t: &RawTensor, rows: usize, cols: usize) -> Result<Self> {
        t.expect_shape(&[rows, cols])?;
        let half = match t.dtype {
            Dtype::BF16 => StoredDtype::Bf16,
            Dtype::F16 => StoredDtype::F16,
            _ => return Ok(Self::from_f32(t.to_f32()?, rows, cols)),
        };
        let m = FloatMatrix {
            rows,
            cols,
            data: Data::Half(half, t.shared()),
        };
        // Non-finite halves have an all-ones exponent: checked on the bits, without widening.
        let exponent: u16 = match half {
            StoredDtype::Bf16 => 0x7F80,
            _ => 0x7C00,
        };
        let bad = match m.half_bits() {
            Some((_, bits)) => bits.iter().position(|&b| b & exponent == exponent),
            None => {
                let mut row = vec![0f32; cols];
                (0..rows).find_map(|r| {
                    m.row_into(r, &mut row);
                    row.iter()
                        .position(|x| !x.is_finite())
                        .map(|c| r * cols + c)
                })
            }
        };
        if let Some(i) = bad {
            let mut row = vec![0f32; cols];
            m.row_into(i / cols.max(1), &mut row);
            return Err(t.bad(format!(
                "non-finite value {} at index {i}",
                row[i % cols.max(1)]
            )));
        }
        Ok(m)
    }

    /// The stored element type.
    pub fn dtype(&self) -> StoredDtype {
        match &self.data {
            Data::F32(_) => StoredDtype::F32,
            Data::Half(d, _) => *d,
        }
    }

    /// Elements (`rows · cols`).
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the matrix has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held (or mapped).
    pub fn stored_bytes(&self) -> usize {
        self.len() * self.dtype().size()
    }

    /// The f32 values when the matrix is held as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::Half(..) => None,
        }
    }

    /// The raw 16-bit elements of a bf16 / f16 matrix, when the mapped bytes are 2-aligned
    /// (safetensors data always is).
    pub fn half_bits(&self) -> Option<(StoredDtype, &[u16])> {
        let Data::Half(d, bytes) = &self.data else {
            return None;
        };
        // SAFETY: every bit pattern is a valid u16; `align_to` returns the aligned middle.
        let (head, mid, _) = unsafe { bytes.align_to::<u16>() };
        (head.is_empty() && mid.len() == self.len()).then_some((*d, mid))
    }

    /// Row `r` as f32 into `out` (`cols` long).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        self.rows_into(r, out);
    }

    /// Rows `r0..r0 + out.len() / cols` as f32 into `out`.
    pub fn rows_into(&self, r0: usize, out: &mut [f32]) {
        let (start, n) = (r0 * self.cols, out.len());
        let (d, bytes) = match &self.data {
            Data::F32(v) => return out.copy_from_slice(&v[start..start + n]),
            Data::Half(d, bytes) => (*d, bytes),
        };
        let widen = |b: u16| match d {
            StoredDtype::Bf16 => f32::from_bits((b as u32) << 16),
            _ => half::f16::from_bits(b).to_f32(),
        };
        match self.half_bits() {
            Some((_, bits)) => {
                for (o, &b) in out.iter_mut().zip(&bits[start..start + n]) {
                    *o = widen(b);
                }
            }
            None => {
                let src = bytes[2 * start..2 * (start + n)].chunks_exact(2);
                for (o, c) in out.iter_mut().zip(src) {
                    *o = widen(u16::from_le_bytes([c[0], c[1]]));
                }
            }
        }
    }

    /// All values as little-endian f32 bytes (what an f32 tensor file holds), a row at a time:
    /// no f32 copy of the whole matrix in between.
    pub fn to_f32_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 * self.len());
        self.for_each_row(|row| out.extend(row.iter().flat_map(|x| x.to_le_bytes())));
        out
    }

    /// All values as f32 (a copy: `rows · cols · 4` bytes).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.as_ref().clone(),
            Data::Half(..) => {
                let mut out = vec![0f32; self.len()];
                self.rows_into(0, &mut out);
                out
            }
        }
    }

    /// Call `f` with each row as f32, in order (one row's buffer at a time).
    pub fn for_each_row(&self, mut f: impl FnMut(&[f32])) {
        if let Some(v) = self.as_f32() {
            v.chunks(self.cols.max(1)).for_each(f);
            return;
        }
        let mut row = vec![0f32; self.cols];
        for r in 0..self.rows {
            self.row_into(r, &mut row);
            f(&row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_rows_read_back_as_their_f32_values() {
        let values = [1.0f32, -2.5, 0.0, 3.0e-3, 65504.0, -1.0e-4];
        for (dtype, enc) in [
            (
                Dtype::BF16,
                values
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            (
                Dtype::F16,
                values
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        ] {
            let owned = super::super::st::OwnedTensor::raw(dtype, vec![2, 3], enc);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.safetensors");
            let mut map = std::collections::BTreeMap::new();
            map.insert("t".to_string(), owned);
            super::super::st::write_safetensors(&path, &map, None).unwrap();
            let tf = super::super::st::TensorFiles::open(&[path]).unwrap();
            let t = tf.get("t").unwrap();
            let want = t.to_f32().unwrap();
            let m = FloatMatrix::read(&t, 2, 3).unwrap();
            assert_eq!(m.dtype().size(), 2);
            assert_eq!(m.to_f32(), want);
            let le: Vec<u8> = want.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(m.to_f32_le_bytes(), le);
            let mut row = vec![0f32; 3];
            m.row_into(1, &mut row);
            assert_eq!(row, want[3..]);
            let mut seen = Vec::new();
            m.for_each_row(|r| seen.extend_from_slice(r));
            assert_eq!(seen, want);
            assert!(FloatMatrix::read(&t, 3, 2).is_err());
            // The same values behind a header of odd length: the data is not 2-aligned in
            // the map, and the byte-wise paths must read the same.
            let header = format!(
                r#"{{"t":{{"dtype":"{}","shape":[2,3],"data_offsets":[0,12]}}}}"#,
                if dtype == Dtype::BF16 { "BF16" } else { "F16" }
            );
            let header = if header.len() % 2 == 0 {
                header + " "
            } else {
                header
            };
            let mut file = (header.len() as u64).to_le_bytes().to_vec();
            file.extend_from_slice(header.as_bytes());
            file.extend_from_slice(t.data);
            let odd = dir.path().join("odd.safetensors");
            std::fs::write(&odd, file).unwrap();
            let tf_odd = super::super::st::TensorFiles::open(&[odd]).unwrap();
            let m_odd = FloatMatrix::read(&tf_odd.get("t").unwrap(), 2, 3).unwrap();
            assert!(m_odd.half_bits().is_none(), "the test needs unaligned data");
            assert_eq!(m_odd.to_f32(), want);
            // A NaN or an infinity anywhere is refused, naming where.
            for bad in [f32::NAN, f32::INFINITY] {
                let mut data = t.data.to_vec();
                let b = match dtype {
                    Dtype::BF16 => half::bf16::from_f32(bad).to_le_bytes(),
                    _ => half::f16::from_f32(bad).to_le_bytes(),
                };
                data[8..10].copy_from_slice(&b);
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("bad.safetensors");
                let mut map = std::collections::BTreeMap::new();
                map.insert(
                    "t".to_string(),
                    super::super::st::OwnedTensor::raw(dtype, vec![2, 3], data),
                );
                super::super::st::write_safetensors(&path, &map, None).unwrap();
                let tf = super::super::st::TensorFiles::open(&[path]).unwrap();
                let err = FloatMatrix::read(&tf.get("t").unwrap(), 2, 3).unwrap_err();
                assert!(err.to_string().contains("index 4"), "{err}");
            }
        }
    }
}
