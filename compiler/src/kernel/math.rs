//! The kernel IR's own definitions of math functions that libm would otherwise decide.
//!
//! `exp` is defined here, as an exact sequence of IEEE operations, rather than as "libm's
//! `expf`": the CPU writer emits the same sequence inline (`backend/llvm/vector_math.rs`),
//! so that loops calling it vectorize, and the reference executor computes it with this
//! function, so that generated code and the executor agree bit for bit. (GPUs call
//! libdevice's `__nv_expf`, 2 ulp; their checks have tolerances.)

/// `eˣ` in f32 to 1.0 ulp, SLEEF's `xexpf`: `q = rint(x / ln 2)`, `s = x − q·ln 2` in two
/// parts (Cody–Waite, the first exact in 16 bits), a degree-7 polynomial for `eˢ` in FMA
/// (Horner) form, then `2^q` applied in two halves, so that subnormal results and those up
/// to the overflow threshold take no intermediate overflow. Below −104 it is 0, above 104
/// +∞; NaN propagates through the arithmetic.
///
/// Every step is an exactly rounded IEEE operation (`mul_add` is a fused multiply-add,
/// `round_ties_even` is `rint` in the default rounding mode): the LLVM version must do
/// exactly these, in this order.
pub fn exp(x: f32) -> f32 {
    let q = (x * std::f32::consts::LOG2_E).round_ties_even();
    let s = q.mul_add(-EXP_LN2_HI, x);
    let s = q.mul_add(-EXP_LN2_LO, s);
    let mut u = EXP_POLY[0];
    for &k in &EXP_POLY[1..] {
        u = u.mul_add(s, k);
    }
    let u = 1.0 + (s * s).mul_add(u, s);
    // NaN goes to a bound (`max`/`min`, like LLVM's `maxnum`/`minnum`, return the other
    // operand; `clamp` would keep the NaN); the bound keeps both halves normal powers of two.
    #[allow(clippy::manual_clamp)]
    let qi = q.max(-EXP_Q_BOUND).min(EXP_Q_BOUND) as i32;
    let half = qi >> 1;
    let u = u * pow2(half) * pow2(qi - half);
    if x < -EXP_BOUND {
        0.0
    } else if x > EXP_BOUND {
        f32::INFINITY
    } else {
        u
    }
}

/// ln 2 in two parts: the first exact in 16 bits, so `q·EXP_LN2_HI` is exact.
pub const EXP_LN2_HI: f32 = 0.693_145_75;
pub const EXP_LN2_LO: f32 = 1.428_606_8e-6;
/// The polynomial's coefficients, highest degree first (then `1 + s + s²·u`).
pub const EXP_POLY: [f32; 6] = [0.000_198_527_62, 0.001_393_043_6, 0.008_333_361, 0.041_666_485, 0.166_666_67, 0.5];
/// Beyond ±this, `exp` is 0 or +∞.
pub const EXP_BOUND: f32 = 104.0;
/// The exponent `q` is clamped to ±this before it is converted to an integer.
pub const EXP_Q_BOUND: f32 = 150.0;

/// `2^k` for `−126 ≤ k ≤ 127`, from its bits.
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::exp;

    /// Within 1 ulp of libm's `expf` (itself within 0.5 ulp) over the whole range,
    /// including subnormal results, and exact at the special values.
    #[test]
    fn exp_is_within_one_ulp_of_libm() {
        let mut worst = 0u32;
        let mut x = -103.9f32;
        while x < 88.7 {
            let (got, want) = (exp(x), x.exp());
            if want >= f32::MIN_POSITIVE {
                let ulps = got.to_bits().abs_diff(want.to_bits());
                worst = worst.max(ulps);
            } else {
                // Subnormal: within one unit of the last place there is.
                assert!((got - want).abs() <= f32::from_bits(1) * 1.5, "exp({x}) = {got:e}, libm {want:e}");
            }
            x += 0.0137;
        }
        assert!(worst <= 1, "worst {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(-110.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(1.0), std::f32::consts::E);
    }
}
