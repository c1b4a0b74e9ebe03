//! bitnet.cpp's I2_S tensors: the whole tensor's weights, flattened row-major, in groups of 128;
//! group g is 32 bytes, byte p of which holds weights 128g + p, +32, +64 and +96 in bits 7–6,
//! 5–4, 3–2 and 1–0, as codes {0, 1, 2} = value + 1. After the codes comes the tensor's one
//! scale (f32, the largest |weight|) and zero padding to 32 bytes, so a tensor of n weights
//! takes n/4 + 32 bytes. This is the layout of bitnet.cpp's reference `quantize_i2_s`, which
//! made the published 2B-4T GGUF; tests check it byte for byte against a transcription of that
//! quantizer (tests/fixtures/ggml-ternary/i2_s.*, made by
//! scripts/reference/make_i2s_fixture.py).

use super::TernaryMatrix;

/// Weights per I2_S group.
pub const QK_I2_S: usize = 128;
/// Bytes after the codes: the f32 scale and its padding.
pub const TRAILER: usize = 32;

/// Bytes of an I2_S tensor of `n` weights.
pub fn tensor_bytes(n: usize) -> usize {
    n / 4 + TRAILER
}

impl TernaryMatrix {
    /// The `rows × cols` matrix held as I2_S in `bytes` (`rows·cols` a multiple of 128). The
    /// matrix keeps the tensor's one scale. Errors name the byte or the value that is wrong.
    pub fn from_i2_s(bytes: &[u8], rows: usize, cols: usize) -> Result<TernaryMatrix, String> {
        let n = rows * cols;
        if !n.is_multiple_of(QK_I2_S) {
            return Err(format!(
                "I2_S holds groups of {QK_I2_S} weights; a {rows}×{cols} matrix has {n}"
            ));
        }
        if bytes.len() != tensor_bytes(n) {
            return Err(format!(
                "I2_S data of {} bytes for a {rows}×{cols} matrix (expected {} = {n}/4 codes + \
                 {TRAILER} for the scale)",
                bytes.len(),
                tensor_bytes(n)
            ));
        }
        let (codes, trailer) = bytes.split_at(n / 4);
        let scale = f32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        let mut values = vec![0i8; n];
        for (g, (src, dst)) in codes
            .chunks_exact(QK_I2_S / 4)
            .zip(values.chunks_exact_mut(QK_I2_S))
            .enumerate()
        {
            for (p, &b) in src.iter().enumerate() {
                for k in 0..4 {
                    let code = (b >> (6 - 2 * k)) & 3;
                    if code == 3 {
                        return Err(format!(
                            "byte {} holds code 3, which is not a ternary value",
                            g * QK_I2_S / 4 + p
                        ));
                    }
                    dst[32 * k + p] = code as i8 - 1;
                }
            }
        }
        let all_zero = values.iter().all(|&v| v == 0);
        if !(scale.is_finite() && (scale > 0.0 || (all_zero && scale == 0.0))) {
            return Err(format!("the tensor's scale {scale} must be finite and > 0"));
        }
        Ok(TernaryMatrix::from_values(
            &values,
            rows,
            cols,
            vec![scale.max(super::MIN_SCALE)],
        ))
    }

    /// Whether the matrix can be written as I2_S: one scale, whole 128-weight groups.
    pub fn check_i2_s(&self) -> Result<(), String> {
        let n = self.rows * self.cols;
        if self.scales.len() != 1 {
            return Err(format!(
                "I2_S holds one scale per tensor, and this {}×{} matrix has one per row; write \
                 it as TQ2_0 or TQ1_0",
                self.rows, self.cols
            ));
        }
        if !n.is_multiple_of(QK_I2_S) {
            return Err(format!(
                "a {}×{} matrix ({n} weights) is not a whole number of I2_S's {QK_I2_S}-weight \
                 groups",
                self.rows, self.cols
            ));
        }
        Ok(())
    }

    /// The matrix as I2_S (one scale per tensor, `rows·cols` a multiple of 128).
    pub fn to_i2_s(&self) -> Result<Vec<u8>, String> {
        self.check_i2_s()?;
        let n = self.rows * self.cols;
        let mut out = vec![0u8; tensor_bytes(n)];
        for (src, dst) in self
            .values()
            .chunks_exact(QK_I2_S)
            .zip(out.chunks_exact_mut(QK_I2_S / 4))
        {
            for (j, &v) in src.iter().enumerate() {
                dst[j % 32] |= ((v + 1) as u8) << (6 - 2 * (j / 32));
            }
        }
        out[n / 4..n / 4 + 4].copy_from_slice(&self.scales[0].to_le_bytes());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ternary::ggml::tests::{fixture, floats};

    /// The reference quantizer's bytes decode to its weights, and the matrix writes them back.
    #[test]
    fn matches_bitnet_cpp_quantizer() {
        let want = fixture("i2_s.bin");
        let x = floats(&fixture("i2_s.values.f32"));
        let (rows, cols) = (3, 256);
        assert_eq!(x.len(), rows * cols);
        let m = TernaryMatrix::from_i2_s(&want, rows, cols).unwrap();
        assert_eq!(m.scales.len(), 1);
        assert_eq!(m.dequantize(), x);
        assert_eq!(m.to_i2_s().unwrap(), want);
    }

    #[test]
    fn bad_data_is_refused_with_the_reason() {
        let t: Vec<i8> = (0..256).map(|i| (i % 3) as i8 - 1).collect();
        let m = TernaryMatrix::from_values(&t, 2, 128, vec![0.5]);
        let bytes = m.to_i2_s().unwrap();
        assert_eq!(bytes.len(), 64 + 32);
        let back = TernaryMatrix::from_i2_s(&bytes, 2, 128).unwrap();
        assert_eq!((back.scales.clone(), back.values()), (vec![0.5], t.clone()));
        let e = TernaryMatrix::from_i2_s(&bytes[1..], 2, 128).unwrap_err();
        assert!(e.contains("95 bytes"), "{e}");
        assert!(TernaryMatrix::from_i2_s(&bytes, 1, 100).is_err());
        let mut three = bytes.clone();
        three[5] = 0xff;
        let e = TernaryMatrix::from_i2_s(&three, 2, 128).unwrap_err();
        assert!(e.contains("byte 5"), "{e}");
        let mut nan = bytes.clone();
        nan[64..68].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(TernaryMatrix::from_i2_s(&nan, 2, 128).is_err());
        let per_row = TernaryMatrix::from_values(&t, 2, 128, vec![0.5, 0.25]);
        let e = per_row.to_i2_s().unwrap_err();
        assert!(e.contains("one scale per tensor"), "{e}");
    }
}
