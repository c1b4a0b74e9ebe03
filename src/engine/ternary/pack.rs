//! Ternary values packed 2 bits each (code = value + 1): our native row-major layout, Hugging
//! Face's BitNet layout of four row blocks per byte, and the byte → values decode table.

use crate::engine::checkpoint::st::SharedBytes;

/// Bytes per row in the native packed layout.
pub fn native_row_bytes(cols: usize) -> usize {
    cols.div_ceil(4)
}

/// Pack ternary values (row-major `rows × cols`) into the native layout: row-major
/// `[rows, ceil(cols/4)]` bytes, weight `4j+k` of a row in bits `2k..2k+1` of byte `j`, code =
/// value + 1. Rows stay contiguous so the matrix-vector kernel streams one row at a time.
/// The bytes are resident (huge-page memory when large, see [`SharedBytes::resident`]).
pub fn pack_native(values: &[i8], rows: usize, cols: usize) -> SharedBytes {
    assert_eq!(
        values.len(),
        rows * cols,
        "matrix buffer does not match its shape"
    );
    let rb = native_row_bytes(cols);
    SharedBytes::resident(rows * rb, |out| pack_native_into(values, rows, cols, out))
}

/// [`pack_native`] into `out`, zeroed, of `rows × native_row_bytes(cols)` bytes.
fn pack_native_into(values: &[i8], rows: usize, cols: usize, out: &mut [u8]) {
    let rb = native_row_bytes(cols);
    for r in 0..rows {
        for c in 0..cols {
            let code = (values[r * cols + c] + 1) as u8;
            out[r * rb + c / 4] |= code << (2 * (c % 4));
        }
    }
    // Padding weights beyond `cols` are encoded as 0 (code 1) so that code 3 never appears.
    for r in 0..rows {
        for c in cols..rb * 4 {
            out[r * rb + c / 4] |= 1 << (2 * (c % 4));
        }
    }
}

/// Position of the first invalid code (3) in a packed buffer, as (byte index, bit position).
fn find_code3(packed: &[u8]) -> Option<(usize, usize)> {
    // A field is 3 when both its bits are set: `b & (b >> 1)` has its low bit set. Scanned
    // eight bytes at a time; the exact place is looked up only in a word that has one.
    const LOW_BITS: u64 = 0x5555_5555_5555_5555;
    let has_code3 = |w: u64| w & (w >> 1) & LOW_BITS != 0;
    let exact = |base: usize, bytes: &[u8]| {
        bytes.iter().enumerate().find_map(|(i, &b)| {
            (0..4)
                .find(|k| (b >> (2 * k)) & 3 == 3)
                .map(|k| (base + i, 2 * k))
        })
    };
    let words = packed.chunks_exact(8);
    let tail = words.remainder();
    for (j, w) in words.enumerate() {
        if has_code3(u64::from_le_bytes(w.try_into().expect("8 bytes"))) {
            return exact(8 * j, w);
        }
    }
    exact(packed.len() - tail.len(), tail)
}

/// Unpack the native layout. Errors with a description if a code 3 occurs.
pub fn unpack_native(
    packed: &[u8],
    rows: usize,
    cols: usize,
) -> std::result::Result<Vec<i8>, String> {
    let rb = native_row_bytes(cols);
    if packed.len() != rows * rb {
        return Err(format!(
            "packed buffer has {} bytes, expected {} for a {rows}×{cols} matrix",
            packed.len(),
            rows * rb
        ));
    }
    if let Some((i, bit)) = find_code3(packed) {
        return Err(format!(
            "invalid ternary code 3 in byte {i} (row {}, bits {bit}..{})",
            i / rb.max(1),
            bit + 1
        ));
    }
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            out.push(((packed[r * rb + c / 4] >> (2 * (c % 4))) & 3) as i8 - 1);
        }
    }
    Ok(out)
}

/// Pack ternary values into Hugging Face's BitNet layout: uint8 `[rows/4, cols]`, where bits
/// `2i..2i+1` of packed row `p` hold output row `i·(rows/4) + p` (four concatenated blocks).
pub fn pack_hf(values: &[i8], rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(
        values.len(),
        rows * cols,
        "matrix buffer does not match its shape"
    );
    assert_eq!(rows % 4, 0, "HF packing needs rows divisible by 4");
    let pr = rows / 4;
    let mut out = vec![0u8; pr * cols];
    for i in 0..4 {
        for p in 0..pr {
            let r = i * pr + p;
            for c in 0..cols {
                out[p * cols + c] |= ((values[r * cols + c] + 1) as u8) << (2 * i);
            }
        }
    }
    out
}

/// Error unless `packed` is a valid Hugging Face packing of a `rows × cols` matrix: rows a
/// multiple of 4, the right length, no code 3.
fn check_hf(packed: &[u8], rows: usize, cols: usize) -> std::result::Result<(), String> {
    if !rows.is_multiple_of(4) {
        return Err(format!("{rows} output rows is not a multiple of 4"));
    }
    let pr = rows / 4;
    if packed.len() != pr * cols {
        return Err(format!(
            "packed buffer has {} bytes, expected {} for a {rows}×{cols} matrix",
            packed.len(),
            pr * cols
        ));
    }
    if let Some((i, bit)) = find_code3(packed) {
        return Err(format!(
            "invalid ternary code 3 at packed row {}, column {}, bits {bit}..{} (output row {})",
            i / cols.max(1),
            i % cols.max(1),
            bit + 1,
            (bit / 2) * pr + i / cols.max(1)
        ));
    }
    Ok(())
}

/// Unpack Hugging Face's layout (see [`pack_hf`]) into row-major `rows × cols` values.
pub fn unpack_hf(packed: &[u8], rows: usize, cols: usize) -> std::result::Result<Vec<i8>, String> {
    check_hf(packed, rows, cols)?;
    let pr = rows / 4;
    let mut out = vec![0i8; rows * cols];
    for p in 0..pr {
        for c in 0..cols {
            let b = packed[p * cols + c];
            for i in 0..4 {
                out[(i * pr + p) * cols + c] = ((b >> (2 * i)) & 3) as i8 - 1;
            }
        }
    }
    Ok(out)
}

/// Hugging Face's layout (see [`pack_hf`]) straight into the native one, without the values
/// in between: equal to `pack_native(&unpack_hf(..)?, ..)`, rows converted in parallel.
pub fn hf_to_native(
    packed: &[u8],
    rows: usize,
    cols: usize,
) -> std::result::Result<SharedBytes, String> {
    check_hf(packed, rows, cols)?;
    let rb = native_row_bytes(cols);
    Ok(SharedBytes::resident(rows * rb, |out| {
        hf_to_native_into(packed, rows, cols, out)
    }))
}

/// [`hf_to_native`] into `out` of `rows × native_row_bytes(cols)` bytes, `packed` checked.
fn hf_to_native_into(packed: &[u8], rows: usize, cols: usize, out: &mut [u8]) {
    use rayon::prelude::*;
    let (pr, rb) = (rows / 4, native_row_bytes(cols));
    if pr == 0 || rb == 0 {
        return;
    }
    // Output rows p, pr + p, 2pr + p and 3pr + p all come from packed row p: its bytes 4j..4j+3
    // hold their codes for columns 4j..4j+3, and byte j of each is one transposition away.
    let (top, bottom) = out.split_at_mut(2 * pr * rb);
    let (q0, q1) = top.split_at_mut(pr * rb);
    let (q2, q3) = bottom.split_at_mut(pr * rb);
    let halves = (q0.par_chunks_mut(rb)).zip(q1.par_chunks_mut(rb));
    let quarters = halves.zip(q2.par_chunks_mut(rb).zip(q3.par_chunks_mut(rb)));
    let whole = cols / 4;
    quarters.enumerate().for_each(|(p, ((r0, r1), (r2, r3)))| {
        let src = &packed[p * cols..(p + 1) * cols];
        let mut put = |j: usize, q: [u8; 4]| {
            let [a, b, c, d] = transpose_codes(u32::from_le_bytes(q)).to_le_bytes();
            (r0[j], r1[j], r2[j], r3[j]) = (a, b, c, d);
        };
        for (j, q) in src.chunks_exact(4).enumerate() {
            put(j, [q[0], q[1], q[2], q[3]]);
        }
        if whole < rb {
            // Columns past `cols` are padding: code 1 (value 0) in every field.
            let mut q = [0x55u8; 4];
            q[..cols - 4 * whole].copy_from_slice(&src[4 * whole..]);
            put(whole, q);
        }
    });
}

/// `w`'s bytes k = 0..3 each hold four 2-bit codes (field i at bits 2i): byte i of the result
/// holds field i of each byte k at bits 2k — the 4 × 4 matrix of codes transposed, by swapping
/// its off-diagonal 2 × 2 blocks and then the off-diagonal codes within each block.
fn transpose_codes(w: u32) -> u32 {
    let t = ((w >> 12) ^ w) & 0x0000_F0F0;
    let w = w ^ t ^ (t << 12);
    let t = ((w >> 6) ^ w) & 0x00CC_00CC;
    w ^ t ^ (t << 6)
}

/// 256-entry table: a packed byte → its four ternary values.
pub(super) fn decode_table() -> &'static [[i8; 4]; 256] {
    static TABLE: std::sync::OnceLock<[[i8; 4]; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [[0i8; 4]; 256];
        for (b, row) in t.iter_mut().enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                *v = ((b >> (2 * k)) & 3) as i8 - 1;
            }
        }
        t
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::ternary_vec;
    use super::super::TernaryMatrix;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn native_pack_roundtrip((rows, cols, v) in (1usize..9, 1usize..23)
            .prop_flat_map(|(r, c)| (Just(r), Just(c), ternary_vec(r * c)))) {
            let p = pack_native(&v, rows, cols);
            prop_assert_eq!(unpack_native(&p, rows, cols).unwrap(), v.clone());
            prop_assert_eq!(TernaryMatrix::from_values(&v, rows, cols, vec![1.0]).values(), v);
        }

        #[test]
        fn hf_pack_roundtrip((rows, cols, v) in (1usize..5, 1usize..17)
            .prop_flat_map(|(r, c)| (Just(4 * r), Just(c), ternary_vec(4 * r * c)))) {
            let p = pack_hf(&v, rows, cols);
            prop_assert_eq!(unpack_hf(&p, rows, cols).unwrap(), v.clone());
            prop_assert_eq!(hf_to_native(&p, rows, cols).unwrap().to_vec(), pack_native(&v, rows, cols).to_vec());
        }
    }

    #[test]
    fn known_packing_bytes() {
        // native: row [-1,0,1,1] → codes 0,1,2,2 → 0b10_10_01_00
        assert_eq!(
            pack_native(&[-1, 0, 1, 1], 1, 4).to_vec(),
            vec![0b1010_0100]
        );
        // a 5-column row pads with code 1 (value 0)
        assert_eq!(
            pack_native(&[1, 1, 1, 1, -1], 1, 5).to_vec(),
            vec![0xAA, 0b0101_0100]
        );
        // hf: rows 0..4 of one column → bits 2i..2i+1 hold row i
        assert_eq!(pack_hf(&[-1, 0, 1, 0], 4, 1), vec![0b01_10_01_00]);
        assert!(unpack_hf(&[0xFF], 4, 1).unwrap_err().contains("code 3"));
        assert_eq!(
            hf_to_native(&[0xFF], 4, 1).unwrap_err(),
            unpack_hf(&[0xFF], 4, 1).unwrap_err()
        );
        assert!(hf_to_native(&[0x55; 3], 4, 1).is_err());
        // The word-at-a-time scan finds the exact byte and field, in a word and in the tail.
        for at in [0, 7, 13, 17] {
            let mut buf = vec![0x55u8; 18];
            buf[at] = 0b0011_0101;
            assert_eq!(find_code3(&buf), Some((at, 4)));
        }
        assert_eq!(find_code3(&[0x55u8; 18]), None);
        assert!(unpack_native(&[0b1100_0000], 1, 4)
            .unwrap_err()
            .contains("code 3"));
    }
}
