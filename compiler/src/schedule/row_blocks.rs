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

/// Rows of a product taken together: a power of two, at most 8, such that the rows'
/// accumulators (`R · width` floats) fit 16 AVX-512 registers, and at most `limit` (the
/// rows there are). Wider rows than 256 floats are taken one at a time.
pub fn rows_per_block(width: usize, limit: usize) -> usize {
    let mut r = 8;
    while r > 1 && (r * width > 256 || r > limit) {
        r /= 2;
    }
    r
}

/// [`rows_per_block`], halved until it divides `rows` (so that no block is partial).
pub fn dividing_rows_per_block(width: usize, rows: usize) -> usize {
    let mut r = rows_per_block(width, rows);
    while rows % r != 0 {
        r /= 2;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_fit_sixteen_registers_and_the_rows() {
        assert_eq!(rows_per_block(64, 64), 4);
        assert_eq!(rows_per_block(128, 64), 2);
        assert_eq!(rows_per_block(3, 64), 8);
        assert_eq!(rows_per_block(3, 7), 4);
        assert_eq!(rows_per_block(1000, 64), 1);
        assert_eq!(rows_per_block(16, 1), 1);
        assert_eq!(dividing_rows_per_block(40, 6), 2);
        assert_eq!(dividing_rows_per_block(64, 64), 4);
        assert_eq!(dividing_rows_per_block(3, 5), 1);
    }
}
