//! A float matrix kept in its stored dtype: the embeddings and the output head of a model,
//! read row by row (f32, or bf16 / f16 straight from the memory-mapped file) instead of being
//! expanded to f32 in memory. At microsoft/bitnet-b1.58-2B-4T's shapes the tied
//! 128256 × 2560 embedding is 0.66 GB as bf16 and would be 1.31 GB as f32, twice over when
//! the head is a transposed copy.

use super::resident::{aligned_u16, ResidentCopy};
use super::st::{RawTensor, SharedBytes};
use crate::error::{Error, Result};
use rayon::prelude::*;
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
    /// ggml's Q8_0: blocks of 32 int8 values sharing one f16 scale (8.5 bits per value),
    /// quantized in memory from the stored matrix.
    Q8_0,
}

/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;
/// Bytes of a mapped matrix read (scanned, or quantized to Q8_0) between two releases of
/// its pages.
const RELEASE_CHUNK_BYTES: usize = 32 << 20;

/// One row to Q8_0 as ggml's `quantize_row_q8_0_ref`: per block, scale = max|x| / 127 (kept
/// as f16) and values rounded to nearest, ties away from zero. With AVX-512 or AVX2 the
/// rounding is vector instructions instead of a libm call per element (the same values: the
/// rounding is exact either way).
pub fn quantize_q8_0_row(row: &[f32], qs: &mut [i8], scales: &mut [half::f16]) {
    #[inline(always)]
    fn body(row: &[f32], qs: &mut [i8], scales: &mut [half::f16]) {
        let blocks = row.chunks(Q8_0_BLOCK).zip(qs.chunks_mut(Q8_0_BLOCK));
        for ((x, q), s) in blocks.zip(scales) {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (q, &v) in q.iter_mut().zip(x) {
                *q = (v * inv).round() as i8;
            }
            *s = half::f16::from_f32(d);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(row: &[f32], qs: &mut [i8], scales: &mut [half::f16]) {
        body(row, qs, scales)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(row: &[f32], qs: &mut [i8], scales: &mut [half::f16]) {
        body(row, qs, scales)
    }

    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // Safety: the CPU has the features `avx512` is compiled for.
        return unsafe { avx512(row, qs, scales) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // Safety: the CPU has the features `avx2` is compiled for.
        return unsafe { avx2(row, qs, scales) };
    }
    body(row, qs, scales)
}

impl StoredDtype {
    /// Bytes held for `n` elements (a whole number of blocks for Q8_0).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            StoredDtype::F32 => 4 * n,
            StoredDtype::Bf16 | StoredDtype::F16 => 2 * n,
            StoredDtype::Q8_0 => n + 2 * n.div_ceil(Q8_0_BLOCK),
        }
    }

    /// The dtype's usual name.
    pub fn name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "f32",
            StoredDtype::Bf16 => "bf16",
            StoredDtype::F16 => "f16",
            StoredDtype::Q8_0 => "q8_0",
        }
    }
}

fn u16_bytes(bits: &[u16]) -> Vec<u8> {
    bits.iter().flat_map(|b| b.to_le_bytes()).collect()
}

#[derive(Clone)]
enum Data {
    F32(Arc<Vec<f32>>),
    /// bf16 / f16 bits, and their copy in huge-page memory as far as it is made (shared by
    /// every clone, so models built from one checkpoint hold one copy).
    Half(StoredDtype, SharedBytes, Arc<ResidentCopy>),
    Q8_0(Arc<Q8_0>),
}

/// Index of the first of `bits` whose exponent field (`exponent`, its mask) is all ones.
/// Blocks of 64 are tested without branches, so the scan runs at vector width.
fn first_with_exponent(bits: &[u16], exponent: u16) -> Option<usize> {
    const BLOCK: usize = 64;
    let bad = |b: &u16| b & exponent == exponent;
    let block = bits
        .chunks(BLOCK)
        .position(|c| c.iter().fold(false, |any, b| any | bad(b)))?;
    let at = block * BLOCK;
    bits[at..].iter().position(bad).map(|i| at + i)
}

/// Q8_0 values: value `i` is `qs()[i] · scales[i / 32]`.
struct Q8_0 {
    scales: Vec<half::f16>,
    /// The int8 values' bytes, resident (a large head in huge-page memory).
    qs: SharedBytes,
}

impl Q8_0 {
    fn qs(&self) -> &[i8] {
        as_i8(&self.qs)
    }
}

/// Bytes as the int8 values they hold.
fn as_i8(bytes: &[u8]) -> &[i8] {
    // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len()) }
}

/// [`as_i8`] for writing.
fn as_i8_mut(bytes: &mut [u8]) -> &mut [i8] {
    // SAFETY: as in `as_i8`; the borrow is the same one.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len()) }
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
        Self::mapped(half, t.shared(), rows, cols).map_err(|m| t.bad(m))
    }

    /// A bf16 / f16 matrix over `bytes` (little-endian, `rows · cols` elements), checked for
    /// non-finite values; the error says where one is.
    pub fn mapped(
        half: StoredDtype,
        bytes: SharedBytes,
        rows: usize,
        cols: usize,
    ) -> std::result::Result<Self, String> {
        assert!(
            matches!(half, StoredDtype::Bf16 | StoredDtype::F16),
            "a mapped matrix is bf16 or f16"
        );
        if bytes.len() != 2 * rows * cols {
            return Err(format!(
                "{} bytes for a {rows}×{cols} {} matrix",
                bytes.len(),
                half.name()
            ));
        }
        let m = FloatMatrix {
            rows,
            cols,
            data: Data::Half(half, bytes, Arc::default()),
        };
        // Non-finite halves have an all-ones exponent: checked on the bits, without widening.
        let exponent: u16 = match half {
            StoredDtype::Bf16 => 0x7F80,
            _ => 0x7C00,
        };
        let bad = match m.half_bits() {
            // A chunk at a time, its pages given back once scanned: checking a 0.66 GB
            // embedding leaves none of it resident (rows are mapped in again when used).
            Some((_, bits)) => {
                let chunk = (RELEASE_CHUNK_BYTES / 2).max(1);
                let parts = bits.par_chunks(chunk).enumerate();
                parts.find_map_first(|(c, part)| {
                    let (at, len) = (c * chunk * 2, part.len() * 2);
                    if let Some(bytes) = m.half_bytes() {
                        bytes.populate_range(at, len);
                    }
                    let found = first_with_exponent(part, exponent);
                    m.data_release(at, len);
                    found.map(|i| c * chunk + i)
                })
            }
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
            return Err(format!(
                "non-finite value {} at index {i}",
                row[i % cols.max(1)]
            ));
        }
        Ok(m)
    }

    /// The stored element type.
    pub fn dtype(&self) -> StoredDtype {
        match &self.data {
            Data::F32(_) => StoredDtype::F32,
            Data::Half(d, ..) => *d,
            Data::Q8_0(_) => StoredDtype::Q8_0,
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
        self.dtype().bytes(self.len())
    }

    /// The f32 values when the matrix is held as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The raw 16-bit elements of a bf16 / f16 matrix as loaded (not its huge-page copy: see
    /// [`Self::half_row`]), when the mapped bytes are 2-aligned (safetensors data always is).
    pub fn half_bits(&self) -> Option<(StoredDtype, &[u16])> {
        let Data::Half(d, bytes, _) = &self.data else {
            return None;
        };
        let bits = aligned_u16(bytes).filter(|b| b.len() == self.len())?;
        Some((*d, bits))
    }

    /// Row `r`'s 16-bit elements of a bf16 / f16 matrix: from its huge-page copy once the
    /// piece holding the row is made ([`Self::make_resident`]), else as loaded (when 2-aligned,
    /// as for [`Self::half_bits`]).
    pub fn half_row(&self, r: usize) -> Option<&[u16]> {
        let Data::Half(_, _, copy) = &self.data else {
            return None;
        };
        let n = self.cols;
        let loaded = || self.half_bits()?.1.get(r * n..(r + 1) * n);
        copy.row(r, n).or_else(loaded)
    }

    /// Map in the file's pages of rows `r0..r0 + n` of a memory-mapped bf16 / f16 matrix in
    /// one call, ahead of reading them (see [`SharedBytes::populate_range`]), as far as they
    /// are not read from the huge-page copy; nothing for any other matrix.
    pub fn populate_rows(&self, r0: usize, n: usize) {
        if let Data::Half(_, bytes, copy) = &self.data {
            if copy.row(r0, self.cols).is_none() {
                bytes.populate_range(2 * r0 * self.cols, 2 * n * self.cols);
            }
        }
    }

    /// Copy a memory-mapped bf16 / f16 matrix into huge-page memory (see
    /// [`SharedBytes::into_resident`]), a piece of rows at a time on all threads. Each piece is
    /// read from as soon as it is made, and the mapping's pages under it are let go. The copy
    /// is made once for this matrix and its clones; nothing for any other matrix.
    pub fn make_resident(&self) {
        self.copy_pieces(true);
    }

    /// [`Self::make_resident`] on a thread of its own, one piece after another, leaving
    /// rayon's threads to the caller: `generate` copies the head while it decodes. None when
    /// there is nothing to copy.
    pub fn make_resident_in_background(&self) -> Option<std::thread::JoinHandle<()>> {
        self.half_bytes().filter(|b| b.is_mapped())?;
        let m = self.clone();
        let spawn = std::thread::Builder::new().name("resident-copy".into());
        spawn
            .spawn(move || {
                let start = std::time::Instant::now();
                m.copy_pieces(false);
                let mb = m.stored_bytes() as f64 / 1e6;
                tracing::info!(
                    "{mb:.0} MB copied into huge pages in {:.2} s",
                    start.elapsed().as_secs_f64()
                );
            })
            .ok()
    }

    /// See [`Self::make_resident`]; `parallel`: the pieces on rayon's threads.
    fn copy_pieces(&self, parallel: bool) {
        if let Data::Half(_, bytes, copy) = &self.data {
            if bytes.is_mapped() {
                copy.make(bytes, self.rows, self.cols, parallel);
            }
        }
    }

    /// The matrix whose row `i` is row `perm[i]` of this one, in the same dtype (a copy).
    pub fn permute_rows(&self, perm: &[usize]) -> FloatMatrix {
        assert_eq!(perm.len(), self.rows, "a permutation of the rows");
        let c = self.cols;
        let data = match &self.data {
            Data::F32(v) => Data::F32(Arc::new(
                perm.iter()
                    .flat_map(|&r| &v[r * c..(r + 1) * c])
                    .copied()
                    .collect(),
            )),
            Data::Half(d, bytes, _) => {
                let b: Vec<u8> = perm
                    .iter()
                    .flat_map(|&r| &bytes[2 * r * c..2 * (r + 1) * c])
                    .copied()
                    .collect();
                Data::Half(*d, SharedBytes::from_vec(b), Arc::default())
            }
            Data::Q8_0(q) => {
                let per = c / Q8_0_BLOCK;
                Data::Q8_0(Arc::new(Q8_0 {
                    qs: SharedBytes::resident(q.qs.len(), |out| {
                        for (dst, &r) in out.chunks_mut(c.max(1)).zip(perm) {
                            dst.copy_from_slice(&q.qs[r * c..(r + 1) * c]);
                        }
                    }),
                    scales: (perm.iter())
                        .flat_map(|&r| &q.scales[r * per..(r + 1) * per])
                        .copied()
                        .collect(),
                }))
            }
        };
        FloatMatrix {
            rows: self.rows,
            cols: c,
            data,
        }
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
            Data::Half(d, bytes, _) => (*d, bytes),
            Data::Q8_0(q) => {
                // Rows hold whole blocks, so `start` is a block boundary.
                let qs = &q.qs()[start..start + n];
                let scales = &q.scales[start / Q8_0_BLOCK..];
                let blocks = out.chunks_mut(Q8_0_BLOCK).zip(qs.chunks(Q8_0_BLOCK));
                for ((o, b), s) in blocks.zip(scales) {
                    let s = s.to_f32();
                    for (o, &v) in o.iter_mut().zip(b) {
                        *o = v as f32 * s;
                    }
                }
                return;
            }
        };
        let widen = |b: u16| match d {
            StoredDtype::Bf16 => f32::from_bits((b as u32) << 16),
            _ => half::f16::from_bits(b).to_f32(),
        };
        if self.half_bits().is_none() {
            let src = bytes[2 * start..2 * (start + n)].chunks_exact(2);
            for (o, c) in out.iter_mut().zip(src) {
                *o = widen(u16::from_le_bytes([c[0], c[1]]));
            }
            return;
        }
        // Row by row, each from its piece of the huge-page copy where made.
        for (i, o) in out.chunks_mut(self.cols.max(1)).enumerate() {
            let bits = self.half_row(r0 + i).expect("2-aligned rows");
            for (o, &b) in o.iter_mut().zip(bits) {
                *o = widen(b);
            }
        }
    }

    /// A `rows × cols` matrix from ggml Q8_0 blocks (34 bytes per 32 values: an f16 scale,
    /// then 32 int8), as GGUF files store it. Errors on a length mismatch or a non-finite
    /// scale.
    pub fn from_q8_0_blocks(bytes: &[u8], rows: usize, cols: usize) -> Result<FloatMatrix> {
        let n = rows * cols;
        if !cols.is_multiple_of(Q8_0_BLOCK) || bytes.len() != StoredDtype::Q8_0.bytes(n) {
            return Err(Error::Input(format!(
                "{} bytes of q8_0 blocks for a {rows}×{cols} matrix (expected {} in blocks of \
                 {Q8_0_BLOCK})",
                bytes.len(),
                StoredDtype::Q8_0.bytes(n)
            )));
        }
        let mut scales = Vec::with_capacity(n / Q8_0_BLOCK);
        let qs = SharedBytes::try_resident(n, |qs| {
            let blocks = bytes.chunks_exact(2 + Q8_0_BLOCK);
            for (i, (b, out)) in blocks.zip(qs.chunks_mut(Q8_0_BLOCK)).enumerate() {
                let d = half::f16::from_le_bytes([b[0], b[1]]);
                if !d.is_finite() {
                    return Err(Error::Input(format!(
                        "q8_0 block {i} has a non-finite scale {d}"
                    )));
                }
                scales.push(d);
                out.copy_from_slice(&b[2..]);
            }
            Ok(())
        })?;
        Ok(FloatMatrix {
            rows,
            cols,
            data: Data::Q8_0(Arc::new(Q8_0 { scales, qs })),
        })
    }

    /// The matrix as ggml Q8_0 blocks (a Q8_0 matrix as it is held; any other quantized
    /// first).
    pub fn to_q8_0_blocks(&self) -> Result<Vec<u8>> {
        let q = self.to_q8_0()?;
        let (qs, scales) = q.q8_0().expect("a Q8_0 matrix");
        let mut out = Vec::with_capacity(StoredDtype::Q8_0.bytes(self.len()));
        for (b, s) in qs.chunks(Q8_0_BLOCK).zip(scales) {
            out.extend(s.to_le_bytes());
            out.extend(b.iter().map(|&v| v as u8));
        }
        Ok(out)
    }

    /// The int8 values and f16 block scales of a Q8_0 matrix.
    pub fn q8_0(&self) -> Option<(&[i8], &[half::f16])> {
        match &self.data {
            Data::Q8_0(q) => Some((q.qs(), &q.scales)),
            _ => None,
        }
    }

    /// This matrix quantized to Q8_0 as ggml does it (per block of 32: scale = max|x| / 127
    /// stored as f16, values rounded to nearest, ties away from zero), in parallel over rows.
    /// Errors when a row is not a whole number of blocks. A Q8_0 matrix is itself (shared).
    pub fn to_q8_0(&self) -> Result<FloatMatrix> {
        if self.q8_0().is_some() {
            return Ok(self.clone());
        }
        if !self.cols.is_multiple_of(Q8_0_BLOCK) {
            return Err(Error::Input(format!(
                "a {}×{} matrix cannot be held as q8_0: its rows of {} are not a whole number \
                 of {Q8_0_BLOCK}-value blocks",
                self.rows, self.cols, self.cols
            )));
        }
        let (n, cols) = (self.len(), self.cols.max(1));
        let mut scales = vec![half::f16::ZERO; n / Q8_0_BLOCK];
        let per_row = (cols / Q8_0_BLOCK).max(1);
        // A chunk of rows at a time, whose mapped pages are given back once quantized: the
        // stored matrix and its Q8_0 copy are never both resident in full.
        let chunk_rows = (RELEASE_CHUNK_BYTES / (cols * self.dtype().bytes(1))).max(1);
        let qs = SharedBytes::resident(n, |qs| {
            let qs = as_i8_mut(qs).chunks_mut(chunk_rows * cols);
            for (c, (qs, scales)) in qs.zip(scales.chunks_mut(chunk_rows * per_row)).enumerate() {
                let rows = qs.par_chunks_mut(cols).zip(scales.par_chunks_mut(per_row));
                rows.enumerate().for_each_init(
                    || vec![0f32; cols],
                    |row, (r, (qs, scales))| {
                        self.row_into(c * chunk_rows + r, row);
                        quantize_q8_0_row(row, qs, scales);
                    },
                );
                self.release_rows(c * chunk_rows, qs.len() / cols);
            }
        });
        Ok(FloatMatrix {
            rows: self.rows,
            cols: self.cols,
            data: Data::Q8_0(Arc::new(Q8_0 { scales, qs })),
        })
    }

    /// Drop the resident pages of rows `r0..r0 + n` of a memory-mapped matrix once nothing
    /// reads them for a while (they are read from the file again when needed); nothing for
    /// one in memory.
    pub fn release_rows(&self, r0: usize, n: usize) {
        let row = self.dtype().bytes(self.cols);
        self.data_release(r0 * row, n * row);
    }

    /// Give back the mapped pages of data bytes `offset..offset + len`.
    fn data_release(&self, offset: usize, len: usize) {
        if let Some(bytes) = self.half_bytes() {
            bytes.release_range(offset, len);
        }
    }

    /// The bytes of a bf16 / f16 matrix as loaded (memory-mapped or not).
    fn half_bytes(&self) -> Option<&SharedBytes> {
        match &self.data {
            Data::Half(_, bytes, _) => Some(bytes),
            _ => None,
        }
    }

    /// The matrix as a safetensors dtype and its bytes: bf16 / f16 as stored, f32 and Q8_0
    /// as f32.
    pub fn to_safetensors_bytes(&self) -> (Dtype, Vec<u8>) {
        match self.half_bits() {
            Some((StoredDtype::Bf16, bits)) => (Dtype::BF16, u16_bytes(bits)),
            Some((_, bits)) => (Dtype::F16, u16_bytes(bits)),
            None => (Dtype::F32, self.to_f32_le_bytes()),
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
            _ => {
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
            assert_eq!(m.dtype().bytes(1), 2);
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

    /// Q8_0 blocks byte for byte as the `gguf` Python package makes them
    /// (scripts/reference/make_q8_0_fixture.py), and values read back as scale · q.
    #[test]
    fn q8_0_matches_ggml_and_reads_back_as_scale_times_q() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/q8_0");
        let values: Vec<f32> = std::fs::read(dir.join("values.f32"))
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let want = std::fs::read(dir.join("q8_0.bin")).unwrap();
        let m = FloatMatrix::from_f32(values, 6, 64).to_q8_0().unwrap();
        assert_eq!(m.dtype(), StoredDtype::Q8_0);
        assert_eq!(m.stored_bytes(), want.len());
        let (qs, scales) = m.q8_0().unwrap();
        assert_eq!(m.to_q8_0_blocks().unwrap(), want);
        let back = FloatMatrix::from_q8_0_blocks(&want, 6, 64).unwrap();
        assert_eq!(back.to_f32(), m.to_f32());
        let mut row = vec![0f32; 64];
        m.row_into(5, &mut row);
        for (c, &v) in row.iter().enumerate() {
            let s = scales[5 * 2 + c / Q8_0_BLOCK].to_f32();
            assert_eq!(v, qs[5 * 64 + c] as f32 * s);
        }
        assert_eq!(m.to_f32()[5 * 64..], row);
        // A Q8_0 matrix quantized again is itself, not re-rounded.
        let again = m.to_q8_0().unwrap();
        assert!(std::ptr::eq(again.q8_0().unwrap().0.as_ptr(), qs.as_ptr()));
        // Rows that are not whole blocks are refused.
        let err = FloatMatrix::from_f32(vec![0.0; 40], 2, 20)
            .to_q8_0()
            .unwrap_err();
        assert!(err.to_string().contains("2×20"), "{err}");
    }

    /// A memory-mapped matrix made resident reads back the same values from its copy, in
    /// pieces of whole huge pages, and its clones share the one copy (models built from one
    /// checkpoint hold the head once); in the background too.
    #[test]
    fn resident_copy_is_made_once_and_reads_the_file() {
        let (rows, cols) = (4096 + 7, 1536); // 12 MiB of bf16: two pieces and a ragged third
        let bits: Vec<u16> = (0..rows * cols)
            .map(|i| 0x3c00 ^ (i as u16 & 0x3ff))
            .collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        std::fs::write(&path, [&[0u8; 6][..], &bytes].concat()).unwrap();
        let mapped = super::super::st::map_file(&path)
            .unwrap()
            .slice(6, bytes.len());
        let m = FloatMatrix::mapped(StoredDtype::Bf16, mapped.clone(), rows, cols).unwrap();
        assert_eq!(
            super::super::resident::piece_rows(2 * cols),
            2048,
            "3 KiB rows: 6 MiB pieces, three whole huge pages"
        );
        let file_row = |r: usize| m.half_bits().unwrap().1[r * cols..].as_ptr();
        assert!(std::ptr::eq(m.half_row(5).unwrap().as_ptr(), file_row(5)));
        let (a, b) = (m.clone(), m.clone());
        a.make_resident();
        let mut row = vec![0f32; cols];
        for r in [0, 2047, 2048, 4095, 4096, rows - 1] {
            let (ra, rb) = (a.half_row(r).unwrap(), b.half_row(r).unwrap());
            assert_eq!(ra, &bits[r * cols..(r + 1) * cols], "row {r}");
            assert!(std::ptr::eq(ra.as_ptr(), rb.as_ptr()), "one copy");
            assert!(!std::ptr::eq(ra.as_ptr(), file_row(r)), "row {r} copied");
            m.row_into(r, &mut row);
            assert!(row
                .iter()
                .zip(ra)
                .all(|(x, &h)| x.to_bits() == (h as u32) << 16));
        }
        let again = a.half_row(0).unwrap().as_ptr();
        b.make_resident();
        assert!(
            std::ptr::eq(b.half_row(0).unwrap().as_ptr(), again),
            "made once"
        );
        let c = FloatMatrix::mapped(StoredDtype::Bf16, mapped, rows, cols).unwrap();
        c.make_resident_in_background().unwrap().join().unwrap();
        assert_eq!(c.half_row(rows - 1).unwrap(), &bits[(rows - 1) * cols..]);
        assert!(!std::ptr::eq(c.half_row(0).unwrap().as_ptr(), again));
        let in_memory = FloatMatrix::mapped(
            StoredDtype::Bf16,
            SharedBytes::from_vec(bytes.clone()),
            rows,
            cols,
        )
        .unwrap();
        assert!(in_memory.make_resident_in_background().is_none());
    }

    /// The blockwise scan finds the first non-finite half wherever it lies, as a plain search.
    #[test]
    fn scan_finds_the_first_all_ones_exponent() {
        for len in [0, 1, 63, 64, 65, 200] {
            for bad in (0..len).step_by(7).map(Some).chain([None]) {
                let mut bits: Vec<u16> = (0..len).map(|i| (i as u16) & 0x3fff).collect();
                if let Some(b) = bad {
                    bits[b] = 0x7f80 | 1; // a bf16 NaN
                    if b + 3 < len {
                        bits[b + 3] = 0xff80; // −∞ after it
                    }
                }
                assert_eq!(
                    super::first_with_exponent(&bits, 0x7f80),
                    bad,
                    "{len} {bad:?}"
                );
            }
        }
    }

    /// Halves round away from zero (ggml's `roundf`) on the vector path too, and every value
    /// equals the scalar rule's.
    #[test]
    fn q8_0_rounds_ties_away_from_zero() {
        // max |x| = 127 gives scale 1, so x itself is rounded.
        let mut x: Vec<f32> = vec![127.0, 0.5, -0.5, 1.5, -2.5, 126.5, -126.5, 0.49999997];
        x.extend((0..24).map(|i| i as f32 * 3.7 - 40.0));
        let (mut q, mut d) = (vec![0i8; 32], vec![half::f16::ZERO; 1]);
        quantize_q8_0_row(&x, &mut q, &mut d);
        assert_eq!(d[0].to_f32(), 1.0);
        assert_eq!(q[..8], [127, 1, -1, 2, -3, 127, -127, 0]);
        for (&v, &qv) in x.iter().zip(&q) {
            assert_eq!(qv, v.round() as i8, "{v}");
        }
    }
}
