//! How a launch's range is split over CPU threads: the same for generated kernels (the
//! runtime's CPU device) and library GEMMs ([`crate::gemm`]), so that each thread's part,
//! and with it every result, is the same wherever the split is made.

/// Thread `t`'s contiguous part of `0..extent` when split `threads` ways.
pub fn chunk(extent: i64, t: usize, threads: usize) -> (i64, i64) {
    let at = |i: usize| (extent as i128 * i as i128 / threads as i128) as i64;
    (at(t), at(t + 1))
}
