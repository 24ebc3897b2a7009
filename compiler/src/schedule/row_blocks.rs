//! Register blocking of the small matrix products inside generated CPU kernels (a
//! linear attention's chunk, a block attention's block): a product `O = A·B` of local
//! arrays is written as
//!
//! ```text
//! for each block of R rows i0..i0+R of O:
//!   O[i0+r, :] = 0                                  (r < R, a vector loop per row)
//!   for x in 0..K:
//!     for r in 0..R:  O[i0+r, :] = fma(A[i0+r, x], B[x, :], O[i0+r, :])
//! ```
//!
//! with R a constant, so that the code generator unrolls the row loop, keeps the R rows
//! of O in registers across the loop over x, and loads each row of B once per R rows.
//! A row at a time, each sum is a chain of dependent additions (an addition's latency per
//! term, whatever the width); R rows give R independent chains per register of B.
//!
//! R is bounded by the target's registers: the accumulators (`R · width` floats) get half
//! of the vector register file, the other half holds the loaded rows of B and the
//! broadcast elements of A. Past that the code generator spills accumulators to the
//! stack on every term (measured on an AVX2 AMD EPYC: with R = 4 rows of 64 floats, 32
//! ymm registers' worth, a training step's attention kernels took 56 ms; with R = 1, 37).

/// Accumulator floats of an AVX-512 target: 16 of its 32 zmm registers, 16 floats each.
pub const AVX512_ACCUMULATOR_FLOATS: usize = 16 * 16;
/// Accumulator floats of an AVX2 target: 8 of its 16 ymm registers, 8 floats each.
pub const AVX2_ACCUMULATOR_FLOATS: usize = 8 * 8;
/// Accumulator floats of an SSE-only target: 8 of its 16 xmm registers, 4 floats each.
pub const SSE_ACCUMULATOR_FLOATS: usize = 8 * 4;

/// Rows of a product taken together: a power of two, at most 8, such that the rows'
/// accumulators (`R · width` floats) fit in `accumulator_floats`, and at most `limit`
/// (the rows there are). Rows wider than the budget are taken one at a time.
pub fn rows_per_block(width: usize, limit: usize, accumulator_floats: usize) -> usize {
    let mut r = 8;
    while r > 1 && (r * width > accumulator_floats || r > limit) {
        r /= 2;
    }
    r
}

/// [`rows_per_block`], halved until it divides `rows` (so that no block is partial).
pub fn dividing_rows_per_block(width: usize, rows: usize, accumulator_floats: usize) -> usize {
    let mut r = rows_per_block(width, rows, accumulator_floats);
    while rows % r != 0 {
        r /= 2;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_fit_the_register_budget_and_the_rows() {
        let avx512 = AVX512_ACCUMULATOR_FLOATS;
        assert_eq!(rows_per_block(64, 64, avx512), 4);
        assert_eq!(rows_per_block(128, 64, avx512), 2);
        assert_eq!(rows_per_block(3, 64, avx512), 8);
        assert_eq!(rows_per_block(3, 7, avx512), 4);
        assert_eq!(rows_per_block(1000, 64, avx512), 1);
        assert_eq!(rows_per_block(16, 1, avx512), 1);
        assert_eq!(dividing_rows_per_block(40, 6, avx512), 2);
        assert_eq!(dividing_rows_per_block(64, 64, avx512), 4);
        assert_eq!(dividing_rows_per_block(3, 5, avx512), 1);
        let avx2 = AVX2_ACCUMULATOR_FLOATS;
        assert_eq!(rows_per_block(64, 64, avx2), 1);
        assert_eq!(rows_per_block(32, 64, avx2), 2);
        assert_eq!(rows_per_block(8, 64, avx2), 8);
        assert_eq!(dividing_rows_per_block(40, 6, avx2), 1);
    }
}
