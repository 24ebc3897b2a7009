//! Packing a bf16 product's operands into the zero-padded layouts both kernels read: A
//! row-major with 32-value steps of k, B in "VNNI" panels (for each pair of k, the pairs
//! (`B[k][n]`, `B[k+1][n]`) of 32 columns side by side).
//!
//! Packing is memory-bound work done on every call (the operands arrive from the
//! previous kernel), and in a training step it took a tenth of the time: the weight
//! gradients transpose a column-major A element by element, and the products with a
//! transposed weight read B element by element. So where the CPU has AVX-512 (every CPU
//! with AMX or AVX512-BF16 has it; checked anyway) the three common layouts are packed
//! with vector loads, gathers of bf16 pairs and one permutation per 32 values. The
//! scalar packers stay for any other stride and as the reference the tests hold the
//! vector ones to (they must write the same bits, padding included).

use super::View;
use std::arch::x86_64::*;

/// How operands are packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packer {
    Scalar,
    /// AVX-512 F and BW.
    Avx512,
}

impl Packer {
    /// The fastest packer this CPU has, decided once per process.
    pub fn detect() -> Packer {
        static PACKER: std::sync::OnceLock<Packer> = std::sync::OnceLock::new();
        *PACKER.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                Packer::Avx512
            } else {
                Packer::Scalar
            }
        })
    }

    /// Every packer this CPU can run (the tests compare them).
    pub fn all() -> Vec<Packer> {
        let mut all = vec![Packer::Scalar];
        if Packer::detect() == Packer::Avx512 {
            all.push(Packer::Avx512);
        }
        all
    }
}

/// Values between the starts of two rows of packed A: `kp`, and for a column-major A a
/// cache line more, so that rows are not a multiple of 4 KB apart (the same L1 set: its
/// packing writes every row in turn). Rows exactly `kp` apart load faster.
pub fn a_row(kp: usize, a: &View<u16>) -> usize {
    if a.rows == 1 && a.cols != 1 {
        kp + 32
    } else {
        kp
    }
}

/// Whether the byte offsets of 32 steps of `stride` values fit a gather's i32 indices.
fn gatherable(stride: isize) -> bool {
    stride > 0 && stride.checked_mul(2 * 32).is_some_and(|bytes| bytes <= i32::MAX as isize)
}

/// A (`m × k`) into `out`, row-major with `kp` columns ([`a_row`] apart) and `mp` rows,
/// zero-padded.
///
/// # Safety
/// `a` reaches `m × k` elements inside its buffer; `out` holds `mp` rows of [`a_row`]
/// values and is 64-byte aligned; `packer` is one of [`Packer::all`].
pub unsafe fn pack_a(out: &mut [u16], (m, k): (usize, usize), (mp, kp): (usize, usize), a: View<u16>, packer: Packer) {
    let lda = a_row(kp, &a);
    // SAFETY (every read below): inside A by the contract.
    if a.cols == 1 {
        for r in 0..m {
            let row = unsafe { std::slice::from_raw_parts(a.ptr.offset(r as isize * a.rows), k) };
            out[r * lda..r * lda + k].copy_from_slice(row);
        }
    } else if a.rows == 1 && packer == Packer::Avx512 && gatherable(a.cols) {
        // SAFETY: AVX-512 is present (the packer); the sizes are as documented.
        unsafe { transpose_columns(out.as_mut_ptr(), lda, (m, k), a) };
    } else if a.rows == 1 {
        // Column by column: contiguous reads, writes to `m` lines that stay in L1.
        let dst = out.as_mut_ptr();
        for kk in 0..k {
            let col = unsafe { a.ptr.offset(kk as isize * a.cols) };
            for r in 0..m {
                unsafe { *dst.add(r * lda + kk) = *col.add(r) };
            }
        }
    } else {
        for r in 0..m {
            for kk in 0..k {
                out[r * lda + kk] = unsafe { *a.ptr.offset(r as isize * a.rows + kk as isize * a.cols) };
            }
        }
    }
    // The padding: the columns past k of every row, the rows past m.
    for r in 0..m {
        out[r * lda + k..(r + 1) * lda].fill(0);
    }
    out[m * lda..mp * lda].fill(0);
}

/// 32 lanes of 16 bits selecting, from two registers of 16 bf16 pairs, the first (`odd`
/// false) or second value of each pair: 32 values of one row.
fn halves_of_pairs(odd: bool) -> [u16; 32] {
    std::array::from_fn(|i| (2 * i + odd as usize) as u16)
}

/// The first 16 (`high` false) or last 16 columns of two 32-value rows as pairs: lane
/// 2j is row 0's column j, lane 2j + 1 row 1's (indices into the two registers).
fn interleaved(high: bool) -> [u16; 32] {
    std::array::from_fn(|i| ((i / 2) + 16 * high as usize + 32 * (i % 2)) as u16)
}

fn lanes(v: [u16; 32]) -> __m512i {
    // SAFETY: 64 bytes of plain data either way.
    unsafe { std::mem::transmute::<[u16; 32], __m512i>(v) }
}

/// The mask of the first `n` (at most 16) lanes.
fn first16(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as __mmask16
}

/// The mask of the first `n` (at most 32) lanes.
fn first32(n: usize) -> __mmask32 {
    ((1u64 << n.min(32)) - 1) as __mmask32
}

/// [`pack_a`]'s rows of a column-major A (element (r, kk) at `r + kk·cols`): for each
/// two rows and 32 values of k, two gathers of 16 pairs (A[r][kk], A[r+1][kk]) and two
/// permutations into the two rows. An odd last row is copied value by value (its pair's
/// second value may lie past the buffer).
///
/// # Safety
/// AVX-512 F and BW are present; `a.rows == 1`, [`gatherable`]`(a.cols)`; `a` reaches
/// `m × k` elements; `out` holds `m` rows `lda` (a multiple of 32, at least k rounded up
/// to 32) values apart.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn transpose_columns(out: *mut u16, lda: usize, (m, k): (usize, usize), a: View<u16>) {
    let step = a.cols;
    let index = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(step as i32),
    );
    let (first, second) = (lanes(halves_of_pairs(false)), lanes(halves_of_pairs(true)));
    let even_rows = m / 2 * 2;
    for k0 in (0..k).step_by(32) {
        let left = k - k0;
        let (low, high) = (first16(left), first16(left.saturating_sub(16)));
        // SAFETY (every access below): the gathered pairs (A[r][kk], A[r+1][kk]) for r + 1 < m
        // and kk < k are inside A; each row of `out` has room for 32 values from k0.
        unsafe {
            for r in (0..even_rows).step_by(2) {
                let base = a.ptr.offset(r as isize + k0 as isize * step) as *const i32;
                let g0 = _mm512_mask_i32gather_epi32::<2>(_mm512_setzero_si512(), low, index, base);
                let g1 = _mm512_mask_i32gather_epi32::<2>(
                    _mm512_setzero_si512(),
                    high,
                    index,
                    base.byte_offset(16 * step * 2),
                );
                _mm512_storeu_si512(out.add(r * lda + k0) as *mut _, _mm512_permutex2var_epi16(g0, first, g1));
                _mm512_storeu_si512(out.add((r + 1) * lda + k0) as *mut _, _mm512_permutex2var_epi16(g0, second, g1));
            }
            if m % 2 == 1 {
                let r = m - 1;
                for kk in k0..k.min(k0 + 32) {
                    *out.add(r * lda + kk) = *a.ptr.offset(r as isize + kk as isize * step);
                }
            }
        }
    }
}

/// B (`k × n`) into `out` in 32-column panels, each `kp/2` rows of 32 pairs
/// (`B[k][n]`, `B[k+1][n]`) — the layout `tdpbf16ps` reads — zero-padded to `np` columns and
/// `kp` values of k.
///
/// # Safety
/// `b` reaches `k × n` elements inside its buffer; `out` holds `np × kp` values and is
/// 64-byte aligned; `packer` is one of [`Packer::all`].
pub unsafe fn pack_b(out: &mut [u16], (k, n): (usize, usize), (np, kp): (usize, usize), b: View<u16>, packer: Packer) {
    if packer == Packer::Avx512 && b.cols == 1 {
        // SAFETY: as documented; AVX-512 is present (the packer).
        return unsafe { interleave_rows(out.as_mut_ptr(), (k, n), (np, kp), b) };
    }
    if packer == Packer::Avx512 && b.rows == 1 && gatherable(b.cols) {
        // SAFETY: as documented; AVX-512 is present (the packer).
        return unsafe { gather_columns(out.as_mut_ptr(), (k, n), (np, kp), b) };
    }
    let panel = kp * 32;
    // Each pair as one u32: B[k][n] low, B[k+1][n] high (little-endian).
    let pairs = |p: usize, kk: usize| -> &mut [u32] {
        let at = p * panel + (kk / 2) * 64;
        // SAFETY: 64 u16 of a 64-byte aligned buffer are 32 aligned u32.
        unsafe { std::slice::from_raw_parts_mut(out.as_ptr().add(at) as *mut u32, 32) }
    };
    // SAFETY (every read below): inside B by the contract.
    let get = |kk: usize, j: usize| unsafe { *b.ptr.offset(kk as isize * b.rows + j as isize * b.cols) };
    for kk in (0..kp).step_by(2) {
        for p in 0..np / 32 {
            let dst = pairs(p, kk);
            let j0 = p * 32;
            let cols = n.saturating_sub(j0).min(32);
            if kk >= k {
                dst.fill(0);
                continue;
            }
            if b.cols == 1 {
                // Two rows side by side.
                let row = |kk: usize| unsafe {
                    std::slice::from_raw_parts(b.ptr.offset(kk as isize * b.rows + j0 as isize), cols)
                };
                let r0 = row(kk);
                if kk + 1 < k {
                    let r1 = row(kk + 1);
                    for j in 0..cols {
                        dst[j] = r0[j] as u32 | (r1[j] as u32) << 16;
                    }
                } else {
                    for j in 0..cols {
                        dst[j] = r0[j] as u32;
                    }
                }
            } else {
                for (j, d) in dst.iter_mut().enumerate().take(cols) {
                    let high = if kk + 1 < k { get(kk + 1, j0 + j) as u32 } else { 0 };
                    *d = get(kk, j0 + j) as u32 | high << 16;
                }
            }
            dst[cols..].fill(0);
        }
    }
}

/// [`pack_b`] for a row-major B: two rows of 32 columns loaded (masked at the last
/// panel) and interleaved by two permutations into the panel's 32 pairs.
///
/// # Safety
/// As for [`pack_b`], with `b.cols == 1` and AVX-512 F and BW present.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn interleave_rows(out: *mut u16, (k, n): (usize, usize), (np, kp): (usize, usize), b: View<u16>) {
    let panel = kp * 32;
    let (low, high) = (lanes(interleaved(false)), lanes(interleaved(true)));
    // SAFETY (every access below): rows kk < k and columns j0 + cols ≤ n of B; the panel's
    // 64 values at (kk/2)·64 inside `out`, 64-byte aligned.
    unsafe {
        let row = |kk: usize, j0: usize, mask: __mmask32| {
            if kk < k {
                _mm512_maskz_loadu_epi16(mask, b.ptr.offset(kk as isize * b.rows + j0 as isize) as *const i16)
            } else {
                _mm512_setzero_si512()
            }
        };
        for kk in (0..kp).step_by(2) {
            for p in 0..np / 32 {
                let j0 = p * 32;
                let mask = first32(n - j0);
                let (r0, r1) = (row(kk, j0, mask), row(kk + 1, j0, mask));
                let dst = out.add(p * panel + (kk / 2) * 64) as *mut __m512i;
                _mm512_store_si512(dst, _mm512_permutex2var_epi16(r0, low, r1));
                _mm512_store_si512(dst.add(1), _mm512_permutex2var_epi16(r0, high, r1));
            }
        }
    }
}

/// [`pack_b`] for a column-major B (element (kk, j) at `kk + j·cols`), where each pair
/// (B[kk][j], B[kk+1][j]) is one u32 in memory: two gathers of 16 columns' pairs per row
/// of a panel, panel by panel (32 columns read along k side by side). At an odd k the
/// last pair is read value by value (its second value may lie past the buffer).
///
/// # Safety
/// As for [`pack_b`], with `b.rows == 1`, [`gatherable`]`(b.cols)` and AVX-512 F and BW
/// present.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn gather_columns(out: *mut u16, (k, n): (usize, usize), (np, kp): (usize, usize), b: View<u16>) {
    let panel = kp * 32;
    let step = b.cols;
    let index = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(step as i32),
    );
    let whole_pairs = k / 2 * 2;
    for p in 0..np / 32 {
        let j0 = p * 32;
        let cols = (n - j0).min(32);
        let (low, high) = (first16(cols), first16(cols.saturating_sub(16)));
        // SAFETY (every access below): the pairs at kk + 1 < k of columns below n are inside
        // B; the panel's rows inside `out`, 64-byte aligned.
        unsafe {
            let base = b.ptr.offset(j0 as isize * step);
            for kk in (0..kp).step_by(2) {
                let dst = out.add(p * panel + (kk / 2) * 64) as *mut __m512i;
                let (g0, g1) = if kk < whole_pairs {
                    let at = base.add(kk) as *const i32;
                    (
                        _mm512_mask_i32gather_epi32::<2>(_mm512_setzero_si512(), low, index, at),
                        _mm512_mask_i32gather_epi32::<2>(
                            _mm512_setzero_si512(),
                            high,
                            index,
                            at.byte_offset(16 * step * 2),
                        ),
                    )
                } else {
                    let mut last = [0u32; 32];
                    if kk < k {
                        for (j, v) in last.iter_mut().enumerate().take(cols) {
                            *v = *base.offset(j as isize * step + kk as isize) as u32;
                        }
                    }
                    let v = last.as_ptr() as *const __m512i;
                    (_mm512_loadu_si512(v), _mm512_loadu_si512(v.add(1)))
                };
                _mm512_store_si512(dst, g0);
                _mm512_store_si512(dst.add(1), g1);
            }
        }
    }
}

/// A 32 × 32 block of f32 sums (`block`, row-major, 32 values a row) into `rows × cols`
/// of C at `c` (element (r, j) at `r·c.rows + j·c.cols`), added to what C holds where
/// `accumulate`. For blocks the kernels cannot store in place: the edges of C, and C
/// column-major (a weight gradient computed transposed), whose 32 × 32 block the vector
/// path transposes with gathers.
///
/// # Safety
/// `c` is writable for `rows × cols` (each at most 32) elements; `packer` is one of
/// [`Packer::all`].
pub unsafe fn unpack_c(
    block: &[f32; 32 * 32],
    c: View<f32>,
    (rows, cols): (usize, usize),
    accumulate: bool,
    packer: Packer,
) {
    if packer == Packer::Avx512 && (c.cols == 1 || c.rows == 1) {
        // SAFETY: as documented; AVX-512 is present (the packer).
        return unsafe { unpack_c_avx512(block, c, (rows, cols), accumulate) };
    }
    let out = c.ptr as *mut f32;
    for r in 0..rows {
        for (j, &v) in block[r * 32..r * 32 + cols].iter().enumerate() {
            // SAFETY: inside C by the contract.
            unsafe {
                let at = out.offset(r as isize * c.rows + j as isize * c.cols);
                *at = if accumulate { *at + v } else { v };
            }
        }
    }
}

/// [`unpack_c`] for a row-major C (masked rows of 32) or a column-major one (each
/// column of the block gathered, 16 rows at a time).
///
/// # Safety
/// As for [`unpack_c`], with `c.cols == 1 || c.rows == 1` and AVX-512 F present.
#[target_feature(enable = "avx512f")]
unsafe fn unpack_c_avx512(block: &[f32; 32 * 32], c: View<f32>, (rows, cols): (usize, usize), accumulate: bool) {
    let out = c.ptr as *mut f32;
    // `run` values at `at` in C, `value` and what C holds (where `accumulate`) added.
    let put = |at: *mut f32, mask: __mmask16, value: __m512| {
        // SAFETY: the caller passes masked lanes inside C.
        unsafe {
            let value = if accumulate { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), value) } else { value };
            _mm512_mask_storeu_ps(at, mask, value);
        }
    };
    // SAFETY (every access below): the masked lanes are rows below `rows` and columns below
    // `cols`, inside the block and inside C by the contract.
    unsafe {
        if c.cols == 1 {
            for r in 0..rows {
                for j in (0..cols).step_by(16) {
                    let mask = first16(cols - j);
                    put(
                        out.offset(r as isize * c.rows).add(j),
                        mask,
                        _mm512_maskz_loadu_ps(mask, block.as_ptr().add(r * 32 + j)),
                    );
                }
            }
        } else {
            let index = _mm512_mullo_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                _mm512_set1_epi32(32),
            );
            for j in 0..cols {
                for r in (0..rows).step_by(16) {
                    let mask = first16(rows - r);
                    let value =
                        _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, index, block.as_ptr().add(r * 32 + j));
                    put(out.offset(j as isize * c.cols).add(r), mask, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache line of values, as the product's scratch is.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u16; 32]);

    /// Packs with `pack` into aligned scratch of `len` values first set to a value no
    /// packer writes (so an unwritten value shows), and returns the values.
    fn packed(len: usize, pack: impl FnOnce(&mut [u16])) -> Vec<u16> {
        let mut lines = vec![Line([0xdead; 32]); len.div_ceil(32)];
        // SAFETY: the lines are contiguous u16, at least `len` of them.
        let out = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u16, len) };
        pack(out);
        out.to_vec()
    }

    /// Every packer writes the same bits as the scalar one, padding included, for
    /// row-major, column-major and strided operands of odd and non-multiple-of-32 sizes;
    /// the scalar one writes every value.
    #[test]
    fn every_packer_writes_what_the_scalar_one_does() {
        let packers = Packer::all();
        eprintln!("packers on this CPU: {packers:?}");
        for (rows, cols) in [(1usize, 1usize), (2, 3), (17, 31), (32, 32), (33, 64), (45, 100), (64, 257)] {
            // A `rows × cols` matrix in each layout, inside a buffer of twice its size (the
            // strided layouts skip every other value).
            let source: Vec<u16> =
                (0..2 * rows * cols).map(|i| ((i * 2_654_435_761) >> 7) as u16 & 0x7ff0 | 1).collect();
            let layouts = [(cols as isize, 1isize), (1, rows as isize), (2 * cols as isize, 2), (1, 2 * rows as isize)];
            for (r_stride, c_stride) in layouts {
                let v = View { ptr: source.as_ptr(), rows: r_stride, cols: c_stride };
                let (rp, cp) = (rows.div_ceil(32) * 32, cols.div_ceil(32) * 32);
                // As A it is m × k; as B, k × n.
                let both = |packer: Packer| {
                    // SAFETY: the view reaches `rows × cols` values of `source`; the scratch
                    // holds the padded sizes and is aligned.
                    let a = packed(rp * a_row(cp, &v), |out| unsafe { pack_a(out, (rows, cols), (rp, cp), v, packer) });
                    let b = packed(cp * rp, |out| unsafe { pack_b(out, (rows, cols), (cp, rp), v, packer) });
                    (a, b)
                };
                let want = both(Packer::Scalar);
                assert!(
                    !want.0.contains(&0xdead) && !want.1.contains(&0xdead),
                    "{rows}×{cols}: a value was not written"
                );
                for &packer in &packers[1..] {
                    let got = both(packer);
                    let layout = format!("{rows}×{cols}, strides ({r_stride}, {c_stride})");
                    assert!(got.0 == want.0, "{packer:?} packs A ({layout}) unlike the scalar packer");
                    assert!(got.1 == want.1, "{packer:?} packs B ({layout}) unlike the scalar packer");
                }
            }
        }
    }

    /// Every packer stores a block of sums into row-major, column-major and strided C the
    /// same way as the scalar one: copied, or added to C, only inside the edge sizes.
    #[test]
    fn every_packer_stores_blocks_as_the_scalar_one_does() {
        let block: [f32; 32 * 32] = std::array::from_fn(|i| (i as f32 * 0.37).sin() + 3000.0);
        for (rows, cols) in [(1usize, 1usize), (5, 32), (32, 7), (17, 19), (32, 32)] {
            let layouts = [(48isize, 1isize), (1, 40), (2 * 48, 2)];
            for (r_stride, c_stride) in layouts {
                for accumulate in [false, true] {
                    let stored = |packer: Packer| {
                        let mut c: Vec<f32> = (0..4096).map(|i| i as f32 * 0.5).collect();
                        let view = View { ptr: c.as_mut_ptr() as *const f32, rows: r_stride, cols: c_stride };
                        // SAFETY: 32 rows and columns at these strides lie inside 4096 values.
                        unsafe { unpack_c(&block, view, (rows, cols), accumulate, packer) };
                        c
                    };
                    let want = stored(Packer::Scalar);
                    assert!(want.iter().enumerate().any(|(i, &v)| v != i as f32 * 0.5), "nothing stored");
                    for &packer in &Packer::all()[1..] {
                        assert!(
                            stored(packer) == want,
                            "{packer:?} stores a {rows}×{cols} block at strides ({r_stride}, {c_stride}), accumulate {accumulate}, unlike the scalar packer"
                        );
                    }
                }
            }
        }
    }
}
