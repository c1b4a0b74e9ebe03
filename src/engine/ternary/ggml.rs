//! ggml's ternary block formats (llama.cpp's TQ1_0 and TQ2_0): 256 weights per block sharing
//! one f16 scale `d`, each weight `d · t` with `t ∈ {−1, 0, +1}`. TQ2_0 packs four trits per
//! byte (66 bytes a block, 2.06 bits per weight); TQ1_0 packs five per byte in base 3 (54
//! bytes, 1.69 bits per weight). Layouts, rounding and the base-3 fixed point follow ggml's
//! reference quantizers; tests check them byte for byte against the `gguf` Python package
//! (tests/fixtures/ggml-ternary, made by scripts/reference/make_ggml_ternary_fixture.py).
//!
//! A [`TernaryMatrix`] holds one scale per tensor or per row, so a matrix converts to and
//! from these blocks exactly when every block of a row carries the row's scale — what
//! llama.cpp's BitNet converters write.

use super::TernaryMatrix;
use half::f16;

/// Weights per block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// Bytes of TQ1_0's five-trits-per-byte part, and of its four-trits-per-byte tail.
const TQ1_QS: usize = (QK_K - 4 * QK_K / 64) / 5; // 48
const TQ1_QH: usize = QK_K / 64; // 4

/// One of ggml's ternary block types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TernaryBlocks {
    /// Five trits per byte in base 3, 54 bytes per 256 weights.
    Tq1_0,
    /// Four 2-bit trits per byte, 66 bytes per 256 weights.
    Tq2_0,
}

impl TernaryBlocks {
    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            TernaryBlocks::Tq1_0 => "TQ1_0",
            TernaryBlocks::Tq2_0 => "TQ2_0",
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        match self {
            TernaryBlocks::Tq1_0 => TQ1_QS + TQ1_QH + 2,
            TernaryBlocks::Tq2_0 => QK_K / 4 + 2,
        }
    }

    /// Bytes of a row of `cols` weights (`cols` a multiple of [`QK_K`]).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / QK_K * self.block_bytes()
    }

    /// Write the block of trits `t` (256 values in −1..=1) with scale `d` into `out`.
    pub fn encode_block(self, t: &[i8], d: f16, out: &mut [u8]) {
        debug_assert_eq!((t.len(), out.len()), (QK_K, self.block_bytes()));
        let code = |i: usize| (t[i] + 1) as u8; // −1, 0, 1 → 0, 1, 2
        match self {
            TernaryBlocks::Tq2_0 => {
                // Byte j + m of each 32-byte group j holds weights 4j + 32n + m, n = 0..4.
                for j in (0..QK_K / 4).step_by(32) {
                    for m in 0..32 {
                        out[j + m] =
                            (0..4).fold(0u8, |q, n| q | code(4 * j + 32 * n + m) << (2 * n));
                    }
                }
            }
            TernaryBlocks::Tq1_0 => {
                // Five trits per byte, most significant first, as the fixed point
                // ⌈q · 256 / 243⌉ that the decoder's `(q · 3ⁿ mod 256) · 3 >> 8` reads back.
                let fixed = |q: u16| (q * 256).div_ceil(243) as u8;
                let base3 = |idx: &mut dyn Iterator<Item = usize>| {
                    idx.fold(0u16, |q, i| q * 3 + code(i) as u16)
                };
                // 32 bytes over weights 0..160, then 16 bytes over weights 160..240.
                for (m, o) in out[..32].iter_mut().enumerate() {
                    *o = fixed(base3(&mut (0..5).map(|n| m + 32 * n)));
                }
                for m in 0..16 {
                    out[32 + m] = fixed(base3(&mut (0..5).map(|n| 160 + m + 16 * n)));
                }
                // Four trits per byte over weights 240..256, shifted up one trit.
                for j in 0..TQ1_QH {
                    let q = base3(&mut (0..4).map(|m| 240 + j + 4 * m)) * 3;
                    out[TQ1_QS + j] = fixed(q);
                }
            }
        }
        let n = self.block_bytes();
        out[n - 2..].copy_from_slice(&d.to_le_bytes());
    }

    /// Read the block `b` into its 256 trits `t`; returns its scale.
    pub fn decode_block(self, b: &[u8], t: &mut [i8]) -> f16 {
        debug_assert_eq!((t.len(), b.len()), (QK_K, self.block_bytes()));
        match self {
            TernaryBlocks::Tq2_0 => {
                for j in (0..QK_K / 4).step_by(32) {
                    for n in 0..4 {
                        for m in 0..32 {
                            t[4 * j + 32 * n + m] = ((b[j + m] >> (2 * n)) & 3) as i8 - 1;
                        }
                    }
                }
            }
            TernaryBlocks::Tq1_0 => {
                const POW3: [u8; 5] = [1, 3, 9, 27, 81];
                let trit = |byte: u8, n: usize| {
                    let q = byte.wrapping_mul(POW3[n]);
                    ((q as u16 * 3) >> 8) as i8 - 1
                };
                let mut i = 0;
                for (start, len) in [(0, 32), (32, 16)] {
                    for n in 0..5 {
                        for m in 0..len {
                            t[i] = trit(b[start + m], n);
                            i += 1;
                        }
                    }
                }
                for n in 0..4 {
                    for j in 0..TQ1_QH {
                        t[i] = trit(b[TQ1_QS + j], n);
                        i += 1;
                    }
                }
            }
        }
        let n = self.block_bytes();
        f16::from_le_bytes([b[n - 2], b[n - 1]])
    }

    /// ggml's reference quantizer for a row of floats (a multiple of 256 long): per block,
    /// `d = max|x|` and `t = round(x / d)` (ties away from zero).
    pub fn quantize_row(self, x: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; self.row_bytes(x.len())];
        let mut t = [0i8; QK_K];
        for (xb, ob) in x.chunks(QK_K).zip(out.chunks_mut(self.block_bytes())) {
            let d = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (ti, &v) in t.iter_mut().zip(xb) {
                *ti = (v * inv).round().clamp(-1.0, 1.0) as i8;
            }
            self.encode_block(&t, f16::from_f32(d), ob);
        }
        out
    }

    /// The f32 values (`d · t`) of a row of blocks.
    pub fn dequantize_row(self, bytes: &[u8]) -> Vec<f32> {
        let mut out = Vec::with_capacity(bytes.len() / self.block_bytes() * QK_K);
        let mut t = [0i8; QK_K];
        for b in bytes.chunks(self.block_bytes()) {
            let d = self.decode_block(b, &mut t).to_f32();
            out.extend(t.iter().map(|&v| v as f32 * d));
        }
        out
    }
}

impl TernaryMatrix {
    /// The `rows × cols` matrix held as `ty` blocks in `bytes` (row-major, `cols` a multiple
    /// of 256). Every block of a row must carry the same scale; the matrix keeps one scale
    /// per tensor when all rows agree, else one per row. Errors say which row breaks it.
    pub fn from_ggml(
        ty: TernaryBlocks,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<TernaryMatrix, String> {
        if !cols.is_multiple_of(QK_K) {
            return Err(format!(
                "{} rows of {cols} weights are not a whole number of {QK_K}-weight blocks",
                ty.name()
            ));
        }
        let row_bytes = ty.row_bytes(cols);
        if bytes.len() != rows * row_bytes {
            return Err(format!(
                "{} data of {} bytes for a {rows}×{cols} matrix (expected {})",
                ty.name(),
                bytes.len(),
                rows * row_bytes
            ));
        }
        let mut values = vec![0i8; rows * cols];
        let mut scales = Vec::with_capacity(rows);
        let row_values = values.chunks_mut(cols.max(1));
        for (r, (src, dst)) in bytes.chunks(row_bytes.max(1)).zip(row_values).enumerate() {
            let mut row_scale = None;
            let blocks = src.chunks(ty.block_bytes()).zip(dst.chunks_mut(QK_K));
            for (k, (b, t)) in blocks.enumerate() {
                let d = ty.decode_block(b, t);
                if !d.is_finite() {
                    return Err(format!("row {r}, block {k}: scale {d} is not finite"));
                }
                if t.iter().all(|&v| v == 0) {
                    continue; // an all-zero block is the same under any scale
                }
                match row_scale {
                    None => row_scale = Some(d),
                    Some(s) if s.to_bits() == d.to_bits() => {}
                    Some(s) => {
                        return Err(format!(
                            "row {r} has blocks with different scales ({s}, then {d} in block \
                             {k}); bitsvf holds one scale per row"
                        ))
                    }
                }
            }
            scales.push(row_scale.map(f16::to_f32));
        }
        // An all-zero row takes any scale: the first row's that has one (or the smallest
        // scale bitsvf uses), so that a matrix whose other rows agree stays per tensor.
        let fill = scales.iter().flatten().next().copied();
        let fill = fill.unwrap_or(super::MIN_SCALE);
        let mut scales: Vec<f32> = scales.into_iter().map(|s| s.unwrap_or(fill)).collect();
        if scales.windows(2).all(|w| w[0].to_bits() == w[1].to_bits()) {
            scales.truncate(1);
        }
        if scales.is_empty() {
            scales.push(fill);
        }
        Ok(TernaryMatrix::from_values(&values, rows, cols, scales))
    }

    /// Whether the matrix can be written as `ty` blocks: rows of whole 256-weight blocks.
    pub fn check_ggml(&self, ty: TernaryBlocks) -> Result<(), String> {
        if !self.cols.is_multiple_of(QK_K) {
            return Err(format!(
                "a {}×{} matrix cannot be written as {}: rows of {} are not a whole number of \
                 {QK_K}-weight blocks",
                self.rows,
                self.cols,
                ty.name(),
                self.cols
            ));
        }
        Ok(())
    }

    /// The matrix as `ty` blocks, each carrying its row's scale rounded to f16 (`cols` a
    /// multiple of 256).
    pub fn to_ggml(&self, ty: TernaryBlocks) -> Result<Vec<u8>, String> {
        self.check_ggml(ty)?;
        let values = self.values();
        let row_bytes = ty.row_bytes(self.cols);
        let mut out = vec![0u8; self.rows * row_bytes];
        let rows = values
            .chunks(self.cols.max(1))
            .zip(out.chunks_mut(row_bytes.max(1)));
        for (r, (v, o)) in rows.enumerate() {
            let d = f16::from_f32(self.scale(r));
            for (t, b) in v.chunks(QK_K).zip(o.chunks_mut(ty.block_bytes())) {
                ty.encode_block(t, d, b);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A file of tests/fixtures/ggml-ternary (also read by the I2_S tests).
    pub(crate) fn fixture(name: &str) -> Vec<u8> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ggml-ternary");
        std::fs::read(dir.join(name)).unwrap()
    }

    /// Little-endian f32 values.
    pub(crate) fn floats(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// The reference quantizer's bytes and the decoded values, against the gguf package.
    #[test]
    fn blocks_match_the_gguf_package() {
        let x = floats(&fixture("values.f32"));
        for (ty, name) in [
            (TernaryBlocks::Tq1_0, "tq1_0"),
            (TernaryBlocks::Tq2_0, "tq2_0"),
        ] {
            let want = fixture(&format!("{name}.bin"));
            let got: Vec<u8> = x.chunks(512).flat_map(|row| ty.quantize_row(row)).collect();
            assert_eq!(got, want, "{name} bytes");
            let deq = floats(&fixture(&format!("{name}.dequant.f32")));
            assert_eq!(ty.dequantize_row(&want), deq, "{name} values");
        }
    }

    /// Rows 0 and 1 of the fixture are ternary with one scale each: they load as a
    /// per-row matrix and are written back to the same bytes. Row 2 has two scales.
    #[test]
    fn matrices_round_trip_and_mixed_scales_are_refused() {
        let x = floats(&fixture("values.f32"));
        for ty in [TernaryBlocks::Tq1_0, TernaryBlocks::Tq2_0] {
            let bytes: Vec<u8> = x[..1024]
                .chunks(512)
                .flat_map(|r| ty.quantize_row(r))
                .collect();
            let m = TernaryMatrix::from_ggml(ty, &bytes, 2, 512).unwrap();
            assert_eq!(m.scales, vec![0.75, 1.25]);
            assert_eq!(m.dequantize(), x[..1024].to_vec());
            assert_eq!(m.to_ggml(ty).unwrap(), bytes);
            let all: Vec<u8> = x.chunks(512).flat_map(|r| ty.quantize_row(r)).collect();
            let err = TernaryMatrix::from_ggml(ty, &all, 4, 512).unwrap_err();
            assert!(err.contains("row 2"), "{err}");
            let err = TernaryMatrix::from_ggml(ty, &bytes[1..], 2, 512).unwrap_err();
            assert!(err.contains("bytes"), "{err}");
            assert!(TernaryMatrix::from_ggml(ty, &bytes, 3, 256).is_err());
        }
        // One scale for every row: per tensor.
        let t: Vec<i8> = (0..512).map(|i| (i % 3) as i8 - 1).collect();
        let m = TernaryMatrix::from_values(&t, 2, 256, vec![0.5]);
        let bytes = m.to_ggml(TernaryBlocks::Tq2_0).unwrap();
        let back = TernaryMatrix::from_ggml(TernaryBlocks::Tq2_0, &bytes, 2, 256).unwrap();
        assert_eq!((back.scales.clone(), back.values()), (vec![0.5], t));
    }
}
