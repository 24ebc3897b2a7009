//! The 32 × 32 block of a bf16 product with AVX512-BF16 (`vdpbf16ps`, Cooper Lake, Zen 4
//! and later), for CPUs without AMX: each instruction multiplies 16 pairs of bf16 values
//! exactly and adds both products to 16 f32 sums — twice the work of an f32 FMA from half
//! the bytes. The block is four groups of 8 rows; a group keeps 8 × 32 sums in 16
//! registers and, per pair of k, loads the B panel's two registers of pairs and
//! broadcasts each row's pair of A.

use std::arch::x86_64::*;

/// Whether this CPU has AVX512-BF16 (and AVX-512 F).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// 16 u32 as the 32 bf16 (16 pairs) they hold.
#[inline(always)]
fn pairs(x: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
}

/// Rows of C a group computes.
const GROUP: usize = 8;

/// One 32 × 32 block of C: `C (+)= A·B` over `kp` values of k (even), with the operands
/// packed as for AMX (`bf16_gemm.rs`): A row-major, rows `lda` values apart (`lda` even);
/// B as `kp/2` rows of 32 pairs (`B[k][n]`, `B[k+1][n]`), 64-byte aligned. C at `cp`, rows
/// `c_stride` bytes apart, read first when `from_c` (else from zero).
///
/// Each lane's sum runs over k in order, so results do not depend on where the block lies
/// or on the thread split.
///
/// # Safety
/// [`available`] returned true; `ap` holds 32 rows of `kp` values `lda` apart, `bp` holds
/// `kp/2` rows of 64 values, and `cp` has 32 rows of 32 f32 at `c_stride`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn block(
    (ap, lda): (*const u16, usize),
    bp: *const u16,
    kp: usize,
    (cp, c_stride): (*mut f32, usize),
    from_c: bool,
) {
    for g in 0..32 / GROUP {
        // SAFETY (every access below): inside the packed operands and C by the contract.
        unsafe {
            let a = ap.add(g * GROUP * lda);
            let c = cp.byte_add(g * GROUP * c_stride);
            let mut sums = [[_mm512_setzero_ps(); 2]; GROUP];
            if from_c {
                for (r, s) in sums.iter_mut().enumerate() {
                    let row = c.byte_add(r * c_stride);
                    *s = [_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16))];
                }
            }
            for p in 0..kp / 2 {
                let b = bp.add(p * 64) as *const __m512i;
                let (b0, b1) = (pairs(_mm512_load_si512(b)), pairs(_mm512_load_si512(b.add(1))));
                for (r, s) in sums.iter_mut().enumerate() {
                    let pair = (a.add(r * lda + 2 * p) as *const i32).read();
                    let x = pairs(_mm512_set1_epi32(pair));
                    s[0] = _mm512_dpbf16_ps(s[0], x, b0);
                    s[1] = _mm512_dpbf16_ps(s[1], x, b1);
                }
            }
            for (r, s) in sums.iter().enumerate() {
                let row = c.byte_add(r * c_stride);
                _mm512_storeu_ps(row, s[0]);
                _mm512_storeu_ps(row.add(16), s[1]);
            }
        }
    }
}
