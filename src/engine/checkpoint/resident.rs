//! The huge-page copy of a memory-mapped bf16 / f16 matrix, made a piece of rows at a time so
//! that a product can read each piece from its copy as soon as that piece is made (the rest
//! still from the file's pages): `generate` copies the head while it decodes.

use super::st::SharedBytes;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Bytes aimed at per piece.
const PIECE_BYTES: usize = 8 << 20;

/// See the module: empty until [`ResidentCopy::make`] starts, then filled piece by piece.
/// Shared by every clone of a matrix, so models built from one checkpoint hold one copy.
#[derive(Default)]
pub(super) struct ResidentCopy {
    pieces: OnceLock<Pieces>,
}

struct Pieces {
    /// Rows per piece (the last may hold fewer).
    rows: usize,
    made: Box<[OnceLock<SharedBytes>]>,
}

impl ResidentCopy {
    /// Row `r` (of `cols` 16-bit elements) from its piece's copy, once that piece is made and
    /// 2-aligned (a piece short of a huge page lives on the heap, where that is likely but not
    /// promised).
    pub(super) fn row(&self, r: usize, cols: usize) -> Option<&[u16]> {
        let pieces = self.pieces.get()?;
        let piece = pieces.made.get(r / pieces.rows)?.get()?;
        aligned_u16(piece)?.get((r % pieces.rows) * cols..(r % pieces.rows + 1) * cols)
    }

    /// Copy `bytes` (`rows` rows of `cols` 16-bit elements, memory-mapped) piece by piece, on
    /// rayon's threads when `parallel`, else on this one; the mapping's pages under each piece
    /// are let go once it is made. Pieces already made are not made again.
    pub(super) fn make(&self, bytes: &SharedBytes, rows: usize, cols: usize, parallel: bool) {
        let row = 2 * cols;
        let pieces = self.pieces.get_or_init(|| {
            let per = piece_rows(row);
            Pieces {
                rows: per,
                made: (0..rows.div_ceil(per)).map(|_| OnceLock::new()).collect(),
            }
        });
        let per = pieces.rows;
        let make = |(i, piece): (usize, &OnceLock<SharedBytes>)| {
            let (at, len) = (i * per * row, per.min(rows - i * per) * row);
            piece.get_or_init(|| bytes.slice(at, len).into_resident());
            bytes.release_range(at, len);
        };
        match parallel {
            true => pieces.made.par_iter().enumerate().for_each(make),
            false => pieces.made.iter().enumerate().for_each(make),
        }
    }
}

/// `bytes` as 16-bit elements when they start 2-aligned (their whole middle).
pub(super) fn aligned_u16(bytes: &[u8]) -> Option<&[u16]> {
    // SAFETY: every bit pattern is a valid u16; `align_to` returns the aligned middle.
    let (head, mid, _) = unsafe { bytes.align_to::<u16>() };
    head.is_empty().then_some(mid)
}

/// Rows per piece for rows of `row_bytes` bytes: a whole number of huge pages (the fewest rows
/// that fill some, times as many as come near [`PIECE_BYTES`]).
pub(super) fn piece_rows(row_bytes: usize) -> usize {
    let huge = super::huge::HUGE_PAGE;
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let whole = huge / gcd(huge, row_bytes.max(1));
    whole * (PIECE_BYTES / (whole * row_bytes.max(1))).max(1)
}
